#!/usr/bin/env python
"""LVIS / COCO detection evaluation: of a detections file, or of a model at several max resolutions.

    python tools/eval_lvis.py --gt lvis_v1_val.json --dets results.json \\
        [--iou-type bbox|segm|both] [--protocol standard|fixed|both] [--reference] [--json OUT]
    python tools/eval_lvis.py --config CONFIG.yaml --checkpoint CKPT --max-res 256,384,512,768 \\
        [--out DIR] [overrides ...]

The sweep mode runs the model at each max resolution (token budget (max_res / P)^2, longer side
<= max_res) in one command and writes a table (AP, APr, APc, APf, tokens per image, images/s,
peak memory; COCO-format ground truth: COCO's AP columns) as JSON and CSV plus a PNG plot of AP
against max resolution into --out.

Metrics are AP, AP50, AP75, APs/m/l, APr/c/f (LVIS only) and AR, as fractions (-1 = undefined).
``--reference`` uses the official lvis API (slow) instead of the fast faster-coco-eval path;
both give the same numbers (tests/test_lvis_eval.py). COCO-format ground truth (no category
``frequency``) is evaluated with pycocotools and the standard protocol only.

File mode reads --gt as training and tools/evaluate.py read it (navit_dense.data.coco_json):
entries skipped there are skipped here, repairs (clipped boxes, recomputed areas) are applied,
and the counts are printed. A file whose ids start at 0 is renumbered (ids + 1): the ids of
--dets, which refer to the file, are shifted the same way. Also printed: detections with a
zero-area box (dropped, as lvis-api does) and where --max-dets limits recall (ground-truth
groups with more objects than the cap, detections the cap cut).

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

from navit_dense.data.decode import DataError
from navit_dense.evaluation.lvis_eval import (
    COCO_METRICS,
    IOU_TYPES,
    LVIS_METRICS,
    PROTOCOLS,
    EvalInputError,
    evaluate_lvis,
    gt_format,
    load_json,
    read_ground_truth,
    recall_caps,
    results_for_reading,
    validate_gt,
    with_masks_only,
    zero_area_detections,
)


def build_parser() -> argparse.ArgumentParser:
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=summary, epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    files = parser.add_argument_group("file mode: evaluate a detections file")
    files.add_argument("--gt", help="ground-truth JSON (LVIS or COCO format)")
    files.add_argument("--dets", help="detections JSON: a list of {image_id, category_id, score, bbox, [segmentation]}")

    sweep = parser.add_argument_group("sweep mode: evaluate a detector at several max resolutions")
    sweep.add_argument("--config", help="the run's config YAML (as given to tools/train.py)")
    sweep.add_argument("--checkpoint", help="checkpoint directory (or a run's checkpoints/last); omit it to evaluate "
                                            "the weights the config names (e.g. model.hf_owl, zero-shot)")
    sweep.add_argument("--max-res", default="256,384,512,768", help="comma-separated max image sides in pixels")
    sweep.add_argument("--layouts", default=None, help="comma-separated: native (packed at each image's aspect), square "
                                                       "(padded to a square first, as HF's Owlv2Processor); default: the config's data.square_pad")
    sweep.add_argument("--out", default=None, help="output folder (default: <run dir>/resolution_sweep)")
    sweep.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.val_json=...")

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
    if args.config or args.checkpoint or args.layouts:
        if not args.config:
            parser.error("sweep mode needs --config (and --checkpoint unless the config names its weights)")
        # The sweep evaluates boxes with the task's evaluator (LVIS standard protocol, fast path).
        ignored = [f"--{k.replace('_', '-')}" for k in ("iou_type", "protocol", "max_dets", "dets_per_cat", "reference")
                   if getattr(args, k) != parser.get_default(k)]  # fmt: skip
        if ignored:
            parser.error(f"{', '.join(ignored)} apply to file mode only; the sweep uses the detection task's evaluator")
        return run_sweep
    parser.error("nothing to evaluate: give --gt and --dets, or --config [--checkpoint]")


def run_sweep(args: argparse.Namespace) -> dict:
    import navit_dense.tasks  # noqa: F401  (registers the built-in tasks)
    from navit_dense.engine.config import load_config
    from navit_dense.engine.resolution_sweep import run_resolution_sweep

    try:
        max_res = [int(r) for r in args.max_res.split(",") if r.strip()]
    except ValueError:
        raise EvalInputError(f"--max-res: expected comma-separated integers, got {args.max_res!r}") from None
    from navit_dense.engine import checkpoint as ckpt
    from navit_dense.engine.config import to_object

    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()] if args.layouts else None
    try:
        cfg = load_config(args.config, args.overrides)
        # Next to the resolved checkpoint's run (--checkpoint may also name the run directory), else the config's output_dir.
        default = ckpt.resolve(args.checkpoint).parent.parent if args.checkpoint else Path(to_object(cfg).output_dir)
        out = Path(args.out) if args.out else default / "resolution_sweep"
        rows = run_resolution_sweep(cfg, args.checkpoint, max_res, out, layouts=layouts)
    except ValueError as e:  # config errors (ConfigError), bad layouts, a config without weights
        raise EvalInputError(str(e)) from None
    return {"mode": "sweep", "format": rows[0]["format"], "rows": rows, "out": str(out)}


def expand(choice: str, choices: tuple[str, ...]) -> tuple[str, ...]:
    return choices if choice == "both" else (choice,)


def note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


GROUPS = {"image": "image(s)", "image and category": "(image, category) pair(s)", "category": "categories"}


def cap_notes(caps: dict, protocol: str) -> None:
    flag = "--dets-per-cat" if protocol == "fixed" else "--max-dets"
    kept = f"the {caps['cap']} detections kept per {caps['per']} ({flag} {caps['cap']}, {protocol} protocol)"
    if caps["gt_groups_over_cap"]:
        note(f"recall is capped: {caps['gt_groups_over_cap']} {GROUPS[caps['per']]} hold more ground-truth objects than {kept}, "
             f"up to {caps['max_gt_per_group']}: AP stays below 100 even for perfect detections")  # fmt: skip
    if caps["detections_cut"]:
        note(f"detections were cut: {caps['detections_cut']} beyond {kept}, the lowest-scored, in {caps['groups_cut']} {GROUPS[caps['per']]}")


def read_inputs(args: argparse.Namespace) -> tuple[dict, list, dict, str]:
    """(ground truth JSON, detections, the reading's counts, format): --gt read as training reads
    it, --dets following that reading (ids shifted alike, entries on skipped images left out)."""
    gt, reading = read_ground_truth(args.gt)
    source = f"ground truth {args.gt}"
    fmt = gt_format(gt, source)
    validate_gt(gt, fmt, "bbox", source)
    dets, left_out = results_for_reading(load_json(args.dets, "detections"), reading)
    counts = {**reading.counts, "id_offsets": reading.id_offsets, "detections_left_out": left_out}
    if counts["total_skipped"] or counts["fixed"]:
        note(f"{source}: {reading.log} (as in training; the evaluation scores what remains)")
    if reading.id_offsets:
        note(f"{source}: ids shifted {reading.id_offsets} (zero-based file); the ids of {args.dets} are shifted alike")
    if left_out:
        note(f"{left_out} detection(s) on images / of categories skipped in the ground truth are left out")
    return gt, dets, counts, fmt


def run_files(args: argparse.Namespace) -> dict:
    for flag in ("max_dets", "dets_per_cat"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise EvalInputError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    gt, dets, gt_counts, fmt = read_inputs(args)  # read once for all (iou type, protocol) runs
    protocols = expand(args.protocol, PROTOCOLS)
    if fmt == "coco" and "fixed" in protocols:
        if args.protocol == "fixed":
            raise EvalInputError("the fixed protocol needs LVIS ground truth (categories with 'frequency')")
        note("COCO-format ground truth: the fixed protocol (LVIS only) is skipped")
        protocols = ("standard",)
    runs = []
    for iou_type in expand(args.iou_type, IOU_TYPES):
        scored = gt
        if iou_type == "segm":
            scored, no_mask = with_masks_only(gt)
            if no_mask:
                note(f"segm: {no_mask} annotation(s) whose segmentation was invalid (kept as boxes) are left out")
        for protocol in protocols:
            t0 = time.perf_counter()
            metrics = evaluate_lvis(scored, dets, iou_type, protocol, max_dets=args.max_dets, fast=not args.reference,
                                    dets_per_cat=args.dets_per_cat, dets_source=f"detections {args.dets}")
            zero_area = zero_area_detections(dets, fmt, iou_type)  # dets are validated by now
            caps = recall_caps(scored, dets, protocol, args.max_dets, args.dets_per_cat)
            cap_notes(caps, protocol)
            if zero_area and protocol == protocols[0]:
                note(f"{iou_type}: {zero_area} detection(s) with a zero-area box dropped (as lvis-api does)")
            runs.append({"iou_type": iou_type, "protocol": protocol, "metrics": metrics, "zero_area_detections": zero_area,
                         "recall_caps": caps, "seconds": round(time.perf_counter() - t0, 3)})  # fmt: skip
    return {
        "mode": "files",
        "gt": str(args.gt),
        "dets": str(args.dets),
        "format": fmt,
        "ground_truth": gt_counts,
        "implementation": ("lvis-api" if fmt == "lvis" else "pycocotools") if args.reference or fmt == "coco"
        else "faster-coco-eval",
        "max_dets": args.max_dets,
        "dets_per_cat": args.dets_per_cat,
        "num_detections": len(dets),
        "runs": runs,
    }


def format_table(report: dict) -> str:
    if report["mode"] == "sweep":
        from navit_dense.engine.resolution_sweep import SWEEP_METRICS

        keys = SWEEP_METRICS[report["format"]]
        head = f"{'layout':>7} {'max_res':>7} {'tokens':>7} " + " ".join(f"{k:>6}" for k in keys) + f" {'img/s':>7} {'peak MiB':>9}"
        rows = [f"{r['layout']:>7} {r['max_res']:>7} {r['mean_tokens_per_image']:>7.0f} " + " ".join(f"{100 * r[k]:6.2f}" for k in keys)
                + f" {r['images_per_s']:>7.1f} {r['peak_mem_mb']:>9.0f}" for r in report["rows"]]  # fmt: skip
        return "\n".join([head, "-" * len(head), *rows, f"(written to {report['out']})"])
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
    except (EvalInputError, DataError, FileNotFoundError) as e:  # bad files or flags; DataError: --gt, naming the entry
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
