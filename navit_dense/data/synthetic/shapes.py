"""Toy classification data: synthetic textured shapes at random sizes and aspect ratios,
label = shape. Small enough to exercise the whole engine end to end on a CPU."""

from __future__ import annotations

import numpy as np
import torch

SHAPES = ("disk", "square", "triangle", "ring")


class ShapesDataset:
    """Image i: one textured shape on a noisy background; its size, aspect ratio, colours and
    textures are drawn from (seed, i), so ``image_size`` is known without rendering. Training
    images are flipped at random (global RNG, which the engine seeds per sample and epoch)."""

    def __init__(self, size: int, min_side: int, max_side: int, seed: int, train: bool):
        rng = np.random.default_rng([seed, 0])
        self.sizes = rng.integers(min_side, max_side + 1, size=(size, 2))
        self.labels = rng.integers(0, len(SHAPES), size=size)
        self.seed, self.train = seed, train

    def __len__(self) -> int:
        return len(self.labels)

    def image_size(self, index: int) -> tuple[int, int]:
        return int(self.sizes[index, 0]), int(self.sizes[index, 1])

    def __getitem__(self, index: int) -> dict:
        h, w = self.image_size(index)
        label = int(self.labels[index])
        rng = np.random.default_rng([self.seed, 1, index])
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        r = rng.uniform(0.3, 0.45) * min(h, w)
        cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
        dy, dx = y - cy, x - cx
        dist = np.hypot(dy, dx)
        mask = {
            "disk": dist < r,
            "square": np.maximum(abs(dy), abs(dx)) < 0.8 * r,
            "triangle": (dy > -r) & (dy < 0.7 * r) & (abs(dx) < 0.6 * (dy + r)),
            "ring": (dist < r) & (dist > 0.55 * r),
        }[SHAPES[label]]
        angle, freq = rng.uniform(0, np.pi), rng.uniform(0.2, 0.8)
        stripes = 0.5 + 0.5 * np.sin(freq * (x * np.cos(angle) + y * np.sin(angle)))
        # A bright striped shape on a dark noisy background: learnable by a 2-block model in minutes.
        fg = (0.6 + 0.4 * rng.uniform(0, 1, 3))[:, None, None] * (0.75 + 0.25 * stripes)
        bg = rng.uniform(0, 0.4, 3)[:, None, None] + rng.normal(0, 0.05, (3, h, w))
        image = torch.from_numpy(np.where(mask, fg, bg).astype(np.float32)) * 2 - 1
        if self.train and torch.rand(()) < 0.5:  # global RNG: the engine seeds it per sample
            image = image.flip(-1)
        return {"image": image, "label": label}
