#!/usr/bin/env python
"""LVIS / COCO detection evaluation from files; prints a table and writes JSON.

    python tools/eval_lvis.py --gt lvis_v1_val.json --dets results.json \\
        [--iou-type bbox|segm|both] [--protocol standard|fixed|both] [--reference] [--json OUT]

Metrics are AP, AP50, AP75, APs/m/l, APr/c/f (LVIS only) and AR, as fractions (-1 = undefined).
``--reference`` uses the official lvis API (slow) instead of the fast faster-coco-eval path;
both give the same numbers (tests/test_lvis_eval.py). COCO-format ground truth (no category
``frequency``) is evaluated with pycocotools and the standard protocol only.

Modes: the file mode (--gt/--dets) is one mode of this CLI; another mode (e.g. evaluating a model
checkpoint) adds its own argument group and a ``run_<mode>`` function, and ``select_mode`` picks
the mode from the arguments given.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from navit_dense.evaluation.lvis_eval import (
    COCO_METRICS,
    IOU_TYPES,
    LVIS_METRICS,
    PROTOCOLS,
    EvalInputError,
    evaluate_lvis,
    gt_format,
    load_json,
)


def build_parser() -> argparse.ArgumentParser:
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=summary, epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    files = parser.add_argument_group("file mode: evaluate a detections file")
    files.add_argument("--gt", help="ground-truth JSON (LVIS or COCO format)")
    files.add_argument("--dets", help="detections JSON: a list of {image_id, category_id, score, bbox, [segmentation]}")

    common = parser.add_argument_group("evaluation options")
    common.add_argument("--iou-type", choices=IOU_TYPES + ("both",), default="bbox")
    common.add_argument("--protocol", choices=PROTOCOLS + ("both",), default="standard",
                        help="standard: <= max-dets per image (LVIS 300); fixed: Fixed AP, top dets-per-cat per class")
    common.add_argument("--max-dets", type=int, default=None,
                        help="per-image cap, standard protocol (LVIS 300, COCO 100)")
    common.add_argument("--dets-per-cat", type=int, default=10_000, help="per-class cap, fixed protocol")
    common.add_argument("--reference", action="store_true", help="use the official lvis API instead of the fast path")
    common.add_argument("--json", metavar="OUT", help="write all results to this JSON file")
    return parser


def select_mode(args: argparse.Namespace, parser: argparse.ArgumentParser):
    if args.gt or args.dets:
        if not (args.gt and args.dets):
            parser.error("file mode needs both --gt and --dets")
        return run_files
    parser.error("nothing to evaluate: give --gt and --dets")


def expand(choice: str, choices: tuple[str, ...]) -> tuple[str, ...]:
    return choices if choice == "both" else (choice,)


def run_files(args: argparse.Namespace) -> dict:
    gt = load_json(args.gt, "ground truth")  # loaded once for all (iou type, protocol) runs
    dets = load_json(args.dets, "detections")
    fmt = gt_format(gt)
    protocols = expand(args.protocol, PROTOCOLS)
    if fmt == "coco" and "fixed" in protocols:
        if args.protocol == "fixed":
            raise EvalInputError("the fixed protocol needs LVIS ground truth (categories with 'frequency')")
        print("note: COCO-format ground truth: the fixed protocol (LVIS only) is skipped", file=sys.stderr)
        protocols = ("standard",)
    runs = []
    for iou_type in expand(args.iou_type, IOU_TYPES):
        for protocol in protocols:
            t0 = time.perf_counter()
            metrics = evaluate_lvis(gt, dets, iou_type, protocol, max_dets=args.max_dets, fast=not args.reference,
                                    dets_per_cat=args.dets_per_cat)
            runs.append({"iou_type": iou_type, "protocol": protocol, "metrics": metrics,
                         "seconds": round(time.perf_counter() - t0, 3)})
    return {
        "mode": "files",
        "gt": str(args.gt),
        "dets": str(args.dets),
        "format": fmt,
        "implementation": ("lvis-api" if fmt == "lvis" else "pycocotools") if args.reference or fmt == "coco"
        else "faster-coco-eval",
        "max_dets": args.max_dets,
        "dets_per_cat": args.dets_per_cat,
        "num_detections": len(dets),
        "runs": runs,
    }


def format_table(report: dict) -> str:
    keys = LVIS_METRICS if report["format"] == "lvis" else COCO_METRICS
    head = f"{'iou':<5} {'protocol':<9} " + " ".join(f"{k:>6}" for k in keys) + f" {'sec':>7}"
    lines = [head, "-" * len(head)]
    for run in report["runs"]:
        vals = " ".join(f"{100 * run['metrics'][k]:6.2f}" if run["metrics"][k] >= 0 else f"{'-':>6}" for k in keys)
        lines.append(f"{run['iou_type']:<5} {run['protocol']:<9} {vals} {run['seconds']:7.2f}")
    lines.append(f"(percent; '-' = undefined, no ground truth in the group; {report['implementation']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run = select_mode(args, parser)
    logging.getLogger("lvis").setLevel(logging.ERROR)  # lvis-api warns on every in-memory result list
    try:
        report = run(args)
    except (EvalInputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
