"""Image classification on the backbone's pooled vector (the engine's toy task)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ...data.packed_batch import PackedBatch


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(batch), batch)
