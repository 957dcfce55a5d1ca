#!/usr/bin/env python
"""Pack real photos of very different aspect ratios, run a NaViT backbone, report the packing.

Photos come from scikit-image's data folder (CC0 / public domain, shipped with the package).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import navit_dense as nd

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "text.png", "hubble_deep_field.jpg", "page.png")


def load_photos() -> dict[str, torch.Tensor]:
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    out = {}
    for name in PHOTOS:
        rgb = np.asarray(Image.open(folder / name).convert("RGB"), dtype=np.float32) / 255.0
        out[name] = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="navit_ti16", choices=nd.list_models())
    parser.add_argument("--max-tokens-per-image", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()

    torch.manual_seed(0)
    photos = load_photos()
    model = nd.build_backbone(args.model).eval()
    batch = nd.pack_images(list(photos.values()), patch_size=model.patch_size, max_tokens_per_image=args.max_tokens_per_image, seq_len=args.seq_len)
    with torch.inference_mode():
        out = model(batch)  # warm-up
        start = time.perf_counter()
        for _ in range(args.repeats):
            out = model(batch)
        seconds = (time.perf_counter() - start) / args.repeats

    print(f"{args.model}: {batch.num_images} photos packed into {batch.num_sequences} x {batch.seq_len} tokens")
    print(f"{'photo':24s} {'H x W':>11s} {'grid h x w':>11s} {'tokens':>7s}  feature map")
    rows = []
    for (name, image), grid, fmap in zip(photos.items(), batch.grid_sizes.tolist(), out.feature_maps):
        H, W = image.shape[1:]
        print(f"{name:24s} {H:>5d} x {W:<5d} {grid[0]:>4d} x {grid[1]:<4d} {grid[0] * grid[1]:>7d}  {tuple(fmap.shape)}")
        rows.append(dict(photo=name, size=[H, W], grid=grid, feature_map=list(fmap.shape)))
    report = dict(
        model=args.model,
        images=batch.num_images,
        sequences=batch.num_sequences,
        seq_len=batch.seq_len,
        pad_fraction=round(batch.pad_fraction, 4),
        images_per_s=round(batch.num_images / seconds, 2),
        pooled_shape=list(out.pooled.shape),
        per_image=rows,
    )
    print(f"padding fraction {report['pad_fraction']:.2%}, throughput {report['images_per_s']} images/s (CPU, {torch.get_num_threads()} threads)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
