"""Resolution sampling (Patch n' Pack Sec. 3.1): per image, a target side length drawn from a
truncated normal biased towards low resolutions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import truncnorm


@dataclass(frozen=True)
class ResolutionSampler:
    """Side length in [min_side, max_side] (a multiple of ``multiple``). The normal lives on
    the unit interval [-1, 1] mapped onto [min_side, max_side]; ``loc < 0`` biases low."""

    min_side: int = 64
    max_side: int = 512
    loc: float = -0.5
    scale: float = 0.5
    multiple: int = 16

    def __post_init__(self) -> None:
        if not 0 < self.min_side <= self.max_side:
            raise ValueError(f"ResolutionSampler needs 0 < min_side <= max_side, got {self.min_side}, {self.max_side}")

    def sample(self, rng: np.random.Generator) -> int:
        return int(self.sample_many(rng, 1)[0])

    def sample_many(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n side lengths in one vectorized draw."""
        a, b = (-1.0 - self.loc) / self.scale, (1.0 - self.loc) / self.scale
        u = truncnorm.rvs(a, b, loc=self.loc, scale=self.scale, size=n, random_state=rng)
        side = self.min_side + (u + 1.0) / 2.0 * (self.max_side - self.min_side)
        side = np.round(side / self.multiple).astype(np.int64) * self.multiple
        return np.clip(side, self.min_side, self.max_side)

    def max_tokens(self, side: int, patch_size: int) -> int:
        """Token budget of a square image of the sampled side: (side / P)^2."""
        return max(1, (side // patch_size) ** 2)
