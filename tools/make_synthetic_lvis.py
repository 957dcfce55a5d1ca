#!/usr/bin/env python
"""Generate a small LVIS-v1-format detection dataset of textured shapes
(navit_dense.data.synthetic.lvis_shapes; see its docstring for the classes, the long tail and
the layout).

    python tools/make_synthetic_lvis.py --out /tmp/synth_lvis [--train-images 200 --val-images 60]
"""

from __future__ import annotations

import argparse
import json
import time

from navit_dense.data.synthetic.lvis_shapes import COLOURS, SHAPES, LvisShapesSpec, generate

__all__ = ["generate", "main", "parse_args"]


def parse_args(argv=None) -> LvisShapesSpec:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--train-images", type=int, default=200)
    p.add_argument("--val-images", type=int, default=60)
    p.add_argument("--num-classes", type=int, default=30, help=f"at most {len(SHAPES) * len(COLOURS)} (shape x colour)")
    p.add_argument("--min-side", type=int, default=96)
    p.add_argument("--max-side", type=int, default=384)
    p.add_argument("--min-radius", type=float, default=0.08, help="shape radius, fraction of the shorter image side")
    p.add_argument("--max-radius", type=float, default=0.22)
    p.add_argument("--rare-max", type=int, default=0, help="max train images of a rare class (0: 2%% of train images, >= 2)")
    p.add_argument("--common-max", type=int, default=0, help="max train images of a common class (0: 10%% of train images)")
    p.add_argument("--min-val-images", type=int, default=2, help="every class appears in at least this many val images")
    p.add_argument("--neg-fraction", type=float, default=0.5, help="fraction of absent classes listed in neg_category_ids")
    p.add_argument("--not-exhaustive-prob", type=float, default=0.15)
    p.add_argument("--format", choices=("jpg", "png"), default="jpg")
    p.add_argument("--jpeg-quality", type=int, default=92)
    p.add_argument("--seed", type=int, default=0)
    try:
        return LvisShapesSpec(**vars(p.parse_args(argv)))
    except ValueError as e:
        p.error(str(e))


def main(argv=None) -> None:
    start = time.perf_counter()
    args = parse_args(argv)
    paths = generate(args)
    cats = json.loads(paths["train"].read_text())["categories"]
    freq = {f: sum(c["frequency"] == f for c in cats) for f in "rcf"}
    print(f"wrote {paths['train']} and {paths['val']} ({len(cats)} classes, r/c/f = {freq['r']}/{freq['c']}/{freq['f']}) "
          f"in {time.perf_counter() - start:.1f}s")  # fmt: skip


if __name__ == "__main__":
    main()
