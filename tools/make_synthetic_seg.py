#!/usr/bin/env python
"""Generate a small synthetic semantic-segmentation dataset in ADE20K layout
(navit_dense.data.synthetic.ade_regions; see its docstring for the classes and the layout).

    python tools/make_synthetic_seg.py --out data/synth_seg [--seed 0 --train 48 --val 16]
"""

from __future__ import annotations

import argparse
import sys
import time

from navit_dense.data.synthetic.ade_regions import make_synthetic_seg

__all__ = ["main", "make_synthetic_seg"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=48, help="training images")
    ap.add_argument("--val", type=int, default=16, help="validation images")
    ap.add_argument("--min-side", type=int, default=96)
    ap.add_argument("--max-side", type=int, default=320)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    make_synthetic_seg(args.out, args.seed, args.train, args.val, args.min_side, args.max_side)
    print(f"wrote {args.train} + {args.val} images to {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
