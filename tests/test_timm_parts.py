"""The backbone's building blocks come from timm.layers; each is checked against the formula
the project used to implement by hand, so swapping them changed no number."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from navit_dense.models import build_backbone
from navit_dense.models.pos_embed import Learned2dPosEmbed


@pytest.mark.parametrize(
    "act, reference",
    [
        ("gelu", lambda x: F.gelu(x)),
        ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh")),
        ("quick_gelu", lambda x: x * torch.sigmoid(1.702 * x)),
    ],
)
def test_block_mlp_and_layerscale_are_the_plain_formulas(act, reference):
    torch.manual_seed(0)
    net = build_backbone("navit_ti16", depth=1, embed_dim=32, num_heads=2, act=act, init_values=0.1)
    block = net.blocks[0]
    x = torch.randn(5, 32)
    mlp = block.mlp
    assert torch.equal(mlp(x), mlp.fc2(reference(mlp.fc1(x))))
    assert torch.equal(block.ls1(x), x * block.ls1.gamma) and torch.equal(block.ls1.gamma, torch.full((32,), 0.1))
    # Parameter names stay those of timm ViTs (and of earlier navit_dense checkpoints).
    assert {n for n, _ in block.named_parameters()} >= {"mlp.fc1.weight", "mlp.fc2.bias", "ls1.gamma", "ls2.gamma"}


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_learned_grid_resampling_is_plain_interpolate(mode, dtype):
    torch.manual_seed(0)
    emb = Learned2dPosEmbed(16, (6, 9), mode=mode, antialias=True).to(dtype)
    for h, w in [(6, 9), (3, 4), (11, 2), (12, 18)]:
        table = emb.weight.permute(2, 0, 1)[None].float()
        ref = F.interpolate(table, size=(h, w), mode=mode, align_corners=False, antialias=True)
        ref = ref[0].permute(1, 2, 0).reshape(h * w, -1).to(dtype)
        assert torch.equal(emb.resized(h, w), ref)
