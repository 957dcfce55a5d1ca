#!/usr/bin/env python
"""Time the fast LVIS evaluation path against the official lvis API on the same detections.

    python tools/benchmark_lvis_eval.py --json bench_lvis_eval.json [--images 200 --categories 1000]

Generates a synthetic LVIS-format dataset (navit_dense.data.synthetic.lvis_random) and a noisy
detection file with more than 300 detections on most images, then times
``evaluate_lvis(fast=True)`` (faster-coco-eval core) and ``evaluate_lvis(fast=False)``
(official lvis API 0.5.3) end to end from in-memory JSON objects (validation included in both),
for each IoU type and protocol. Reports the speed ratio (wall clock, and CPU time of the process
which is steadier on a shared machine) and the largest metric difference.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path

from navit_dense.evaluation.lvis_eval import evaluate_lvis
from navit_dense.data.synthetic.lvis_random import make_detections, make_lvis_gt

TARGET_SPEEDUP = 5.0
TARGET_MAX_DIFF = 1e-4


def timed(fn):
    """(result, wall seconds, CPU seconds of this process, all threads)."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, metavar="OUT", help="write the report here")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--categories", type=int, default=1203, help="LVIS v1 has 1203")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iou-types", default="bbox,segm")
    parser.add_argument("--protocols", default="standard,fixed")
    parser.add_argument("--repeats", type=int, default=3, help="fast-path repeats (median reported)")
    parser.add_argument("--reference-repeats", type=int, default=1, help="reference repeats (median reported)")
    args = parser.parse_args(argv)
    logging.getLogger("lvis").setLevel(logging.ERROR)  # lvis-api warns on every in-memory result list
    iou_types = args.iou_types.split(",")

    t0 = time.perf_counter()
    gt = make_lvis_gt(args.images, args.categories, seed=args.seed)
    # 250-400 false positives per image on top of the true detections: most images exceed the
    # 300 cap, like a detector's fixed-size output.
    dets = make_detections(gt, seed=args.seed + 1, with_masks="segm" in iou_types, false_positives_per_image=(250, 400))
    gen_s = time.perf_counter() - t0
    per_img = Counter(d["image_id"] for d in dets)
    dataset = {
        "images": len(gt["images"]),
        "categories": len(gt["categories"]),
        "categories_by_frequency": dict(Counter(c["frequency"] for c in gt["categories"])),
        "categories_with_gt": len({a["category_id"] for a in gt["annotations"]}),
        "gt_annotations": len(gt["annotations"]),
        "detections": len(dets),
        "max_detections_per_image": max(per_img.values()),
        "images_over_300_detections": sum(n > 300 for n in per_img.values()),
        "generation_seconds": round(gen_s, 2),
    }
    print(json.dumps(dataset), flush=True)

    # One-time imports (lvis pulls in cv2 and matplotlib, ~0.5 s) must not land in a timing.
    import faster_coco_eval.faster_eval_api_cpp  # noqa: F401
    import lvis  # noqa: F401
    import pycocotools.mask  # noqa: F401

    load_before = os.getloadavg()
    runs = []
    for iou_type in iou_types:
        for protocol in args.protocols.split(","):
            ref_times, fast_times = [], []
            # Interleaved, so a load change on the shared machine hits both methods alike.
            for r in range(max(args.reference_repeats, args.repeats)):
                if r < args.reference_repeats:
                    ref, wall, cpu = timed(lambda: evaluate_lvis(gt, dets, iou_type, protocol, fast=False))
                    ref_times.append((wall, cpu))
                if r < args.repeats:
                    fast, wall, cpu = timed(lambda: evaluate_lvis(gt, dets, iou_type, protocol, fast=True))
                    fast_times.append((wall, cpu))
            ref_s, ref_cpu = (statistics.median(t[i] for t in ref_times) for i in (0, 1))
            fast_s, fast_cpu = (statistics.median(t[i] for t in fast_times) for i in (0, 1))
            diffs = {k: abs(fast[k] - ref[k]) for k in ref}
            run = {
                "iou_type": iou_type,
                "protocol": protocol,
                "reference_seconds": round(ref_s, 3),
                "fast_seconds": round(fast_s, 3),
                "speedup": round(ref_s / fast_s, 2),
                "reference_cpu_seconds": round(ref_cpu, 3),
                "fast_cpu_seconds": round(fast_cpu, 3),
                "speedup_cpu": round(ref_cpu / fast_cpu, 2),
                "timings_wall_cpu": {"reference": ref_times, "fast": fast_times},
                "max_abs_metric_diff": max(diffs.values()),
                "metric_diffs": diffs,
                "reference_metrics": ref,
                "fast_metrics": fast,
            }
            runs.append(run)
            print(f"{iou_type:<5} {protocol:<9} reference {ref_s:6.2f}s (cpu {ref_cpu:5.2f})  fast {fast_s:5.2f}s "
                  f"(cpu {fast_cpu:4.2f})  speedup {run['speedup']:4.1f}x (cpu {run['speedup_cpu']:4.1f}x)  "
                  f"max|diff| {run['max_abs_metric_diff']:.1e}  "
                  f"AP {ref['AP']:.4f} APr {ref['APr']:.4f}", flush=True)

    report = {
        "dataset": dataset,
        "runs": runs,
        "min_speedup": min(r["speedup"] for r in runs),
        "min_speedup_cpu": min(r["speedup_cpu"] for r in runs),
        "max_abs_metric_diff": max(r["max_abs_metric_diff"] for r in runs),
        "target": {"speedup": TARGET_SPEEDUP, "max_abs_metric_diff": TARGET_MAX_DIFF},
        "versions": {p: version(p) for p in ("numpy", "lvis", "faster-coco-eval", "pycocotools")},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
    }
    report["meets_target"] = (report["min_speedup"] >= TARGET_SPEEDUP
                              and report["max_abs_metric_diff"] <= TARGET_MAX_DIFF)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"min speedup {report['min_speedup']}x (cpu {report['min_speedup_cpu']}x), "
          f"max |metric diff| {report['max_abs_metric_diff']:.1e}, "
          f"meets target: {report['meets_target']} -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
