#!/usr/bin/env python
"""Train any registered task.

    python tools/train.py --config configs/classification/toy.yaml [--resume] [--output-dir DIR] [key=value ...]
    torchrun --nproc_per_node=2 tools/train.py --config ...        # DDP (nccl on GPU, gloo on CPU)
"""

from __future__ import annotations

import argparse
import sys

import navit_dense.tasks  # noqa: F401  (registers the built-in tasks)
from navit_dense.data.decode import DataError
from navit_dense.engine.checkpoint import CheckpointError
from navit_dense.engine.config import ConfigError, load_config, option_help
from navit_dense.engine.distributed import CollectiveTimeoutError, shutdown
from navit_dense.engine.logger import error_message
from navit_dense.engine.task import task_names
from navit_dense.engine.trainer import NonFiniteLossError, NoUsableDataError, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train a NaViT task from a YAML config (with _base_ inheritance) plus dotted overrides.",
        epilog=f"registered tasks: {', '.join(task_names())}\n\nengine options (override as key=value):\n{option_help()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="experiment YAML, e.g. configs/classification/toy.yaml")
    parser.add_argument("--resume", action="store_true", help="continue the run in the output directory from its last checkpoint")
    parser.add_argument("--output-dir", help="run directory (default: output_dir from the config)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. model.backbone.name=navit_b16 data.max_tokens_per_image=576")
    args = parser.parse_args(argv)
    try:
        # --output-dir is an override, so the run's saved config.yaml names its real directory.
        cfg = load_config(args.config, args.overrides + ([f"output_dir={args.output_dir}"] if args.output_dir else []))
    except ConfigError as e:
        parser.error(str(e))
    try:
        train(cfg, resume=args.resume)
    except (ConfigError, CheckpointError, DataError, FileNotFoundError) as e:  # bad input, named in the message
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, NoUsableDataError, CollectiveTimeoutError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
