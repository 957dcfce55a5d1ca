"""Token dropping from Patch n' Pack (Sec. 3.1): the rate is sampled once per image, and the
same draw decides how many tokens the image occupies in the packed sequence and which ones
the model sees. Dropping is a data-side operation; evaluation pipelines pass ``None``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenDrop:
    """mode:
    - ``constant``: every image drops ``rate``;
    - ``beta``: rate ~ Beta(alpha, beta) per image, scaled into [0, max_rate];
    - ``resolution``: rate grows linearly with the image's token count, from ``min_rate`` at
      ``min_tokens`` to ``max_rate`` at ``max_tokens`` (high resolutions drop more).
    """

    mode: str = "constant"
    rate: float = 0.5
    alpha: float = 2.0
    beta: float = 2.0
    min_rate: float = 0.0
    max_rate: float = 0.9
    min_tokens: int = 64
    max_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.mode not in ("constant", "beta", "resolution"):
            raise ValueError(f"TokenDrop.mode must be constant|beta|resolution, got {self.mode!r}")
        for name in ("rate", "min_rate", "max_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"TokenDrop.{name} must be in [0, 1), got {value}")

    def sample_rate(self, rng: np.random.Generator, num_tokens: int) -> float:
        if self.mode == "constant":
            return self.rate
        if self.mode == "beta":
            return float(rng.beta(self.alpha, self.beta)) * self.max_rate
        span = max(self.max_tokens - self.min_tokens, 1)
        t = min(max((num_tokens - self.min_tokens) / span, 0.0), 1.0)
        return self.min_rate + t * (self.max_rate - self.min_rate)

    @staticmethod
    def num_kept(num_tokens: int, rate: float) -> int:
        """Tokens that survive dropping at ``rate``; at least one always does."""
        return max(1, int(round(num_tokens * (1.0 - rate))))

    def expected_kept(self, num_tokens: int) -> int:
        """What an image will keep, known before packing (the token-budget sampler's cost):
        exact for the constant / resolution modes, the mean for beta (drawn at packing time)."""
        if self.mode == "beta":
            return self.num_kept(num_tokens, self.alpha / (self.alpha + self.beta) * self.max_rate)
        return self.num_kept(num_tokens, self.sample_rate(None, num_tokens))  # no randomness in these modes

    def sample_keep(self, rng: np.random.Generator, num_tokens: int) -> tuple[float, np.ndarray]:
        """(rate, sorted kept indices); at least one token always survives."""
        rate = self.sample_rate(rng, num_tokens)
        kept = np.sort(rng.permutation(num_tokens)[: self.num_kept(num_tokens, rate)])
        return rate, kept
