"""The packed-layout contract: everything per image is computed once at pack time (host ints
in ``PackedBatch.layout`` plus slot index tensors), survives moves and pickling, and is the only
way modules learn the layout, so no module reads sizes back from the device."""

from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from navit_dense.data import TokenDrop, pack_images
from navit_dense.data.packing import grid_layout
from navit_dense.models import build_backbone, unpack_prefix, unpack_to_maps
from navit_dense.models.heads.owl import OwlHead
from navit_dense.models.heads.segmenter import Segmenter, build_decoder
from navit_dense.utils.host_sync import HostSyncCounter

P = 8


def images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


@given(
    sizes=st.lists(st.tuples(st.integers(8, 90), st.integers(8, 90)), min_size=1, max_size=7),
    prefix=st.integers(0, 2),
    drop=st.booleans(),
)
def test_layout_matches_the_tensors(sizes, prefix, drop):
    batch = pack_images(images(sizes), P, 40, 96, num_prefix_tokens=prefix,
                        token_drop=TokenDrop("constant", rate=0.4) if drop else None, seed=list(range(len(sizes))))  # fmt: skip
    batch.validate()  # includes the layout and every slot index tensor
    lay = batch.layout
    assert lay.num_tokens == int((~batch.padding_mask).sum())
    assert batch.pad_fraction == pytest.approx(float(batch.padding_mask.float().mean()))
    assert lay.max_run_length == int(batch.run_lengths.max())
    for i in range(lay.num_images):
        rows = slice(lay.token_offsets[i], lay.token_offsets[i + 1])
        # image-major patch stream: image i's kept tokens, row-major
        tok = batch.token_index.reshape(-1)[batch.patch_slots[rows]]
        assert torch.equal(tok, tok.sort().values) and len(tok) == lay.num_kept[i]


def test_layout_survives_moves_and_pickling():
    batch = pack_images(images([(30, 70), (64, 20)]), P, 30, 64, num_prefix_tokens=1)
    moved = batch.to("cpu", non_blocking=True)
    assert moved.layout is batch.layout and moved.runs() == batch.runs()
    again = pickle.loads(pickle.dumps(batch))  # DataLoader workers send batches pickled
    again.validate()
    assert again.layout.runs == batch.layout.runs and again.layout.cell_offsets == batch.layout.cell_offsets


def test_grid_layout_is_built_once_per_batch():
    batch = pack_images(images([(30, 70), (64, 20), (40, 40)]), P, 30, 64, token_drop=TokenDrop("constant", rate=0.5))
    dec = grid_layout(batch, 3)
    assert grid_layout(batch, 3) is dec and grid_layout(batch, 2) is not dec
    dec.validate()
    assert dec.layout.num_kept == dec.layout.areas == batch.layout.areas  # every cell, dropped ones included
    assert dec.layout.seq_index == batch.layout.seq_index  # each image stays in its sequence


@pytest.mark.parametrize("pos_embed", ["factorized", "fractional", "sincos2d", "learned2d"])
@pytest.mark.parametrize("pool", ["map", "avg", "token"])
def test_backbone_and_heads_never_read_the_device(pos_embed, pool):
    torch.manual_seed(0)
    batch = pack_images(images([(30, 70), (64, 20), (40, 40), (9, 90)]), P, 30, 64, num_prefix_tokens=1,
                        token_drop=TokenDrop("constant", rate=0.3), seed=[1, 2, 3, 4])  # fmt: skip
    net = build_backbone("navit_ti16", patch_size=P, depth=2, embed_dim=32, num_heads=2, class_token=True,
                         pos_embed=pos_embed, pos_embed_grid=8, global_pool=pool, drop_path_rate=0.2)  # fmt: skip
    owl = OwlHead(32, num_classes=5, merge_class_token=True)
    mask = Segmenter(net, build_decoder("mask_transformer", 32, 4, dim=32, depth=1, num_heads=2))
    linear = build_decoder("linear", 32, 4)
    net.train()
    with HostSyncCounter() as syncs:
        out = net(batch)
        owl(out)
        mask(batch)
        linear(out)
        unpack_prefix(out.tokens, batch)
        out.pooled.sum().backward()
    assert syncs.total == 0, dict(syncs.calls)


def test_the_counter_sees_syncs():
    x = torch.arange(6)
    with HostSyncCounter() as syncs:
        x[x > 2]
        x.tolist()
        bool(x.sum())
        torch.repeat_interleave(x, x)
        torch.repeat_interleave(x, 2)  # a Python int count is no sync
        torch.repeat_interleave(x, x, output_size=15)  # nor a known output size
    assert dict(syncs.calls) == {"bool_index": 1, "tolist": 1, "bool": 1, "repeat_interleave": 1}


def test_unpack_uses_the_slots():
    batch = pack_images(images([(30, 70), (64, 20)]), P, 30, 64, token_drop=TokenDrop("constant", rate=0.5), seed=[0, 1])
    tokens = torch.randn(batch.num_sequences, batch.seq_len, 4)
    maps = unpack_to_maps(tokens, batch, fill=torch.full((4,), 7.0))
    for i, m in enumerate(maps):
        assert tuple(m.shape[1:]) == batch.layout.grids[i]
        flat = m.reshape(4, -1).T
        kept = batch.kept_indices(i)
        s, o = batch.layout.seq_index[i], batch.layout.seq_offset[i]
        assert torch.equal(flat[kept], tokens[s, o : o + len(kept)])
        dropped = torch.ones(flat.shape[0], dtype=torch.bool)
        dropped[kept] = False
        assert bool((flat[dropped] == 7.0).all())
