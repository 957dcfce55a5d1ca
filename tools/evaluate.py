#!/usr/bin/env python
"""Evaluate a checkpoint of any registered task; prints the metrics and writes them as JSON.

    python tools/evaluate.py --config configs/classification/toy.yaml --checkpoint runs/x/checkpoints/best [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import navit_dense.tasks  # noqa: F401  (registers the built-in tasks)
from navit_dense.engine import checkpoint as ckpt
from navit_dense.engine.config import ConfigError, load_config, option_help
from navit_dense.engine.distributed import CollectiveTimeoutError, shutdown
from navit_dense.engine.logger import error_message
from navit_dense.engine.task import task_names
from navit_dense.engine.trainer import evaluate_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Evaluate a checkpoint with its task's evaluator.",
        epilog=f"registered tasks: {', '.join(task_names())}\n\nengine options (override as key=value):\n{option_help()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="experiment YAML the checkpoint was trained with")
    parser.add_argument("--checkpoint", required=True, help="a step_N directory, checkpoints/{last,best}, or a run directory (its last checkpoint)")
    parser.add_argument("--split", default="val", help="dataset split (default: val)")
    parser.add_argument("--weights", choices=("auto", "ema", "model"), default="auto", help="auto: EMA weights when the checkpoint has them")
    parser.add_argument("--output", help="metrics JSON (default: eval_<checkpoint>_<split>.json beside the checkpoint directory)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.max_tokens_per_image=576")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        parser.error(str(e))
    ema = {"auto": None, "ema": True, "model": False}[args.weights]
    try:
        path = ckpt.resolve(args.checkpoint)  # every file checked before the evaluation, not after it
        step = ckpt.read_meta(path)["train_state"]["step"]
        metrics, path = evaluate_checkpoint(cfg, path, ema=ema, split=args.split)
    except (OSError, ValueError) as e:  # a missing or corrupt checkpoint, a bad evaluation item, a config mismatch
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    except CollectiveTimeoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        shutdown()
    record = {"checkpoint": str(path), "step": step, "split": args.split, "weights": args.weights, "metrics": metrics}
    out = Path(args.output) if args.output else path.parent / f"eval_{path.name}_{args.split}.json"
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 writes
        out.write_text(json.dumps(record, indent=1))
        print(json.dumps(metrics, indent=1))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
