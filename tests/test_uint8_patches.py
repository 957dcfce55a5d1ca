"""uint8 patches (``data.uint8_patches``, ``pack_images(..., pixel_norm=...)``): un-normalized
pixels packed as uint8, 4x fewer bytes to pin and copy, normalized by the model on the device
(``PackedBatch.pixel_values``). Checked against the float path on the same 8-bit pixels:
exactly where no resize happens, within the rounding bound where one does; the metadata
through .to / pickling / pin_memory; no host round trip in the forward; the detection and
segmentation tasks end to end; bad inputs named."""

from __future__ import annotations

import math
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import load_tool

from navit_dense import build_backbone, pack_images
from navit_dense.data import TokenDrop
from navit_dense.data.packed_batch import PixelNorm
from navit_dense.data.packing import to_uint8_pixels
from navit_dense.engine.config import ConfigError, load_config, to_object
from navit_dense.engine.task import LossContext, PackPlan, get_task
from navit_dense.engine.trainer import seed_everything, train
from navit_dense.utils.host_sync import HostSyncCounter

ROOT = Path(__file__).resolve().parents[1]
P = 8
NORM = PixelNorm((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # ImageNet, the tasks' default
# Rounding the resized [0, 255] image to uint8 moves each pixel by at most half a level; the
# resize is a convex combination (antialiased bilinear weights are >= 0 and sum to 1), so it
# commutes with the per-channel affine normalization and adds no error of its own.
ROUNDING_BOUND = 0.5 / (255 * min(NORM.std))


def uint8_images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]


def normalized(image: torch.Tensor, norm: PixelNorm = NORM) -> torch.Tensor:
    """The float path: decoding's x / 255, then the datasets' Normalize."""
    mean, std = torch.tensor(norm.mean).view(-1, 1, 1), torch.tensor(norm.std).view(-1, 1, 1)
    return (image.float().div_(255) - mean) / std


def both_paths(images, **kwargs):
    return pack_images(images, P, pixel_norm=NORM, **kwargs), pack_images([normalized(im) for im in images], P, **kwargs)


# ---- packing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", [0, 2])
def test_without_resize_the_model_input_is_the_float_path_exactly(prefix):
    sizes = [(32, 48), (40, 24), (64, 64), (8, 120)]  # patch multiples packed at their own grid: no resize
    images = uint8_images(sizes)
    kw = dict(max_tokens=[h * w // P**2 for h, w in sizes], seq_len=160, num_prefix_tokens=prefix,
              token_drop=TokenDrop("constant", rate=0.3), seed=[0, 1, 2, 3])  # fmt: skip
    ours, ref = both_paths(images, **kw)
    ours.validate()
    assert ours.patches.dtype == torch.uint8 and ours.pixel_norm == NORM and ref.pixel_norm is None
    assert ours.layout.grids == ref.layout.grids == tuple((h // P, w // P) for h, w in sizes)
    for name in ("segment_ids", "token_index", "positions", "patch_slots", "cu_seqlens"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    assert bool((ours.patches[ours.padding_mask | ours.prefix_mask] == 0).all())
    values = ours.pixel_values()
    assert values.dtype == torch.float32 and torch.equal(values, ref.patches)  # padding and prefix slots: 0, as the float path
    assert torch.equal(ours.pixel_values(torch.bfloat16), ref.patches.to(torch.bfloat16))
    # float images in [0, 1] (as decoded: x / 255) pack to the same uint8 patches
    assert torch.equal(pack_images([im.float().div_(255) for im in images], P, pixel_norm=NORM, **kw).patches, ours.patches)


@pytest.mark.parametrize("as_float", [False, True])
def test_with_resize_the_difference_is_the_rounding_after_the_resize(as_float):
    sizes = [(37, 91), (120, 45), (23, 23), (64, 200), (150, 150)]
    images = uint8_images(sizes, seed=1)
    kw = dict(max_tokens_per_image=40, seq_len=128, num_prefix_tokens=1)
    ours, ref = both_paths(images, **kw)
    if as_float:  # [0, 1] floats (what the datasets hand over) are resized as they are, then rounded
        ours = pack_images([im.float().div_(255) for im in images], P, pixel_norm=NORM, **kw)
    assert ours.layout.grids == ref.layout.grids and all(g[0] * P != h for g, (h, _) in zip(ours.layout.grids, sizes))
    diff = (ours.pixel_values() - ref.patches).abs()
    assert 0 < float(diff.max()) <= ROUNDING_BOUND + 1e-6
    assert float(diff.mean()) < ROUNDING_BOUND / 2  # rounding errors spread over [-0.5, 0.5] levels
    assert bool((diff[ours.padding_mask | ours.prefix_mask] == 0).all())
    # Exactly: the float path applied to the rounded resize of each image.
    from navit_dense.data.patchify import patchify
    from navit_dense.data.resize import resize_to_grid

    values = ours.pixel_values()
    for i, (s, o) in enumerate(zip(ours.layout.seq_index, ours.layout.seq_offset)):
        grid, start = ours.layout.grids[i], o + 1
        rounded = to_uint8_pixels(resize_to_grid(images[i].float().div_(255) if as_float else images[i].float(), grid, P),
                                  max_value=1.0 if as_float else 255.0)
        assert torch.equal(values[s, start : start + grid[0] * grid[1]], patchify(normalized(rounded), P))


def test_patches_cost_a_quarter_of_the_bytes():
    ours, ref = both_paths(uint8_images([(40, 60), (90, 30), (16, 16)]), max_tokens_per_image=24, seq_len=64)
    a, b = ours.tensor_bytes(), ref.tensor_bytes()
    assert a["patches"] * 4 == b["patches"] == ref.patches.numel() * 4
    assert {k: v for k, v in a.items() if k != "patches"} == {k: v for k, v in b.items() if k != "patches"}
    assert sum(a.values()) < sum(b.values())


def test_the_normalization_travels_with_the_batch():
    batch = pack_images(uint8_images([(40, 60), (90, 30)]), P, 24, 64, pixel_norm=NORM)
    for moved in (batch.to("cpu"), pickle.loads(pickle.dumps(batch)), batch._map_tensors(torch.clone)):
        assert moved.pixel_norm == NORM and moved.patches.dtype == torch.uint8
        moved.validate()
        assert torch.equal(moved.pixel_values(), batch.pixel_values())
    with pytest.raises(ValueError, match="pixel_norm must be set exactly when patches are uint8"):
        replace(batch, pixel_norm=None).validate()
    with pytest.raises(ValueError, match="pixel_norm is None"):
        replace(batch, pixel_norm=None).pixel_values()
    with pytest.raises(ValueError, match="1 channels"):
        replace(batch, pixel_norm=PixelNorm((0.5,), (0.5,))).validate()


@pytest.mark.parametrize(
    "image, norm, match",
    [
        (torch.full((3, 32, 32), -0.5), NORM, r"span \[-0.5, -0.5\].*before normalization"),
        (torch.rand(3, 32, 32) * 255, NORM, r"float in \[0, 1\] or uint8 in \[0, 255\]"),  # [0, 255] floats: not the convention
        (torch.full((3, 32, 32), float("nan")), NORM, "span"),
        (torch.zeros(3, 32, 32, dtype=torch.int32), NORM, r"uint8 images in \[0, 255\] or float ones in \[0, 1\]"),
        (torch.zeros(1, 32, 32, dtype=torch.uint8), NORM, "3-channel"),
        (torch.zeros(3, 32, 32, dtype=torch.uint8), PixelNorm((0.5,), (0.5,)), r"pixel_norm has 1 channel\(s\) but images\[0\] has 3"),
        (torch.zeros(3, 32, 32, dtype=torch.uint8), None, "pass pixel_norm"),
    ],
)
def test_bad_inputs_are_named(image, norm, match):
    with pytest.raises((ValueError, TypeError), match=match):
        pack_images([image], P, 16, 32, pixel_norm=norm)


def test_pixel_norm_checks_its_values():
    with pytest.raises(ValueError, match="one value per channel"):
        PixelNorm((0.5, 0.5, 0.5), (0.5, 0.5))
    with pytest.raises(ValueError, match="std .* positive"):
        PixelNorm((0.5, 0.5, 0.5), (0.5, 0.0, 0.5))
    assert PixelNorm([0, 1, 0.5], [1, 1, 1]) == PixelNorm((0.0, 1.0, 0.5), (1.0, 1.0, 1.0))  # lists from configs: hashable tuples


def test_black_and_white_images_keep_their_levels_through_the_resize():
    black, white = torch.zeros(3, 32, 32), torch.ones(3, 16, 48)
    black[0, 0, 0], white[0, 0, 0] = -1e-7, 1 + 1e-7  # float rounding of an earlier interpolation is no error
    batch = pack_images([black, white], P, 12, 32, pixel_norm=NORM)
    assert batch.layout.grids == ((3, 3), (2, 6))  # both resized
    kept = ~batch.padding_mask
    assert torch.equal(batch.patches[kept].unique(), torch.tensor([0, 255], dtype=torch.uint8))  # no overshoot past the clamp
    ref = pack_images([normalized(black.mul(255).to(torch.uint8)), normalized(white.mul(255).to(torch.uint8))], P, 12, 32)
    torch.testing.assert_close(batch.pixel_values(), ref.patches, rtol=0, atol=1e-6)  # the float path's resize: float error only


# ---- model --------------------------------------------------------------------------------------
def test_forward_reads_no_device_value_and_matches_the_float_batch():
    torch.manual_seed(0)
    sizes = [(32, 48), (40, 24), (16, 64)]
    kw = dict(max_tokens=[h * w // P**2 for h, w in sizes], seq_len=64, num_prefix_tokens=1,
              token_drop=TokenDrop("constant", rate=0.25), seed=[1, 2, 3])  # fmt: skip
    ours, ref = both_paths(uint8_images(sizes), **kw)
    net = build_backbone("navit_ti16", patch_size=P, depth=2, embed_dim=32, num_heads=2, class_token=True, global_pool="avg").train()
    with HostSyncCounter() as syncs:
        out = net(ours)
        out.pooled.square().sum().backward()
    assert syncs.total == 0, dict(syncs.calls)
    with torch.no_grad():
        net.eval()
        torch.testing.assert_close(net(ours).tokens, net(ref).tokens, rtol=0, atol=0)


# ---- tasks --------------------------------------------------------------------------------------
DET_CONFIG = ROOT / "configs" / "detection" / "owl_navit_tiny_synthetic_lvis.yaml"
SEG_CONFIG = ROOT / "configs" / "segmentation" / "segmenter_linear_tiny_synthetic.yaml"
TINY = ["model.backbone.depth=2", "model.backbone.embed_dim=64", "model.backbone.num_heads=2"]


@pytest.fixture(scope="module")
def det_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth_lvis")
    load_tool("make_synthetic_lvis").main(["--out", str(out), "--train-images", "8", "--val-images", "4", "--num-classes", "6",
                                       "--min-side", "48", "--max-side", "112"])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth_seg")
    load_tool("make_synthetic_seg").make_synthetic_seg(out, seed=0, n_train=8, n_val=4, min_side=48, max_side=112)
    return out


def det_overrides(data: Path, run: Path) -> list[str]:
    return [f"output_dir={run}", f"data.train_json={data}/lvis_v1_train.json", f"data.train_images={data}/images",
            f"data.val_json={data}/lvis_v1_val.json", f"data.val_images={data}/images", *TINY,
            "data.max_tokens_per_image=36", "data.seq_len=144", "data.tokens_per_batch=288", "data.federated_negatives=2",
            "data.crop_prob=0.5", "train.steps=2", "train.log_every=1", "optim.warmup_steps=0"]  # fmt: skip


def seg_overrides(data: Path, run: Path) -> list[str]:
    return [f"output_dir={run}", f"data.root={data}", *TINY, "data.max_tokens_per_image=36", "data.seq_len=144",
            "data.tokens_per_batch=288", "train.steps=2", "train.log_every=1", "optim.warmup_steps=0"]  # fmt: skip


def _step_both_ways(config: Path, overrides: list[str], n: int):
    """One training step's loss for the same samples packed both ways (same weights, same augmentation)."""
    losses = {}
    for on in (True, False):
        cfg = to_object(load_config(config, [*overrides, f"data.uint8_patches={str(on).lower()}"]))
        task = get_task(cfg.task)(cfg)
        assert (task.pixel_norm is not None) == on
        seed_everything(0)
        model = task.build_model().train()
        ds = task.build_dataset("train")
        samples = []
        for i in range(n):
            torch.manual_seed(100 + i)  # the engine seeds each sample's augmentation
            samples.append(ds[i])
        images = [s.image if hasattr(s, "image") else s["image"] for s in samples]
        lowest = min(float(im.min()) for im in images)
        assert all(im.dtype == torch.float32 for im in images) and (lowest >= 0 if on else lowest < 0)  # [0, 1] / normalized
        plan = PackPlan(max_tokens=[36] * n, seed=list(range(n)), patch_size=16, seq_len=144, num_prefix_tokens=0, algorithm="balanced",
                        token_drop=None, train=True)  # fmt: skip
        batch, targets = task.collate(samples, plan)
        assert (batch.patches.dtype == torch.uint8) == on and (batch.pixel_norm == task.pixel_norm)
        torch.manual_seed(0)  # drop path
        loss = task.losses(model(batch), targets, LossContext(0, task.count(batch, targets)))["loss"]
        loss.backward()
        assert math.isfinite(float(loss.detach())) and all(p.grad is None or bool(p.grad.isfinite().all()) for p in model.parameters())
        losses[on] = float(loss.detach())
    return losses


def test_detection_training_step_with_uint8_patches(det_data, tmp_path):
    losses = _step_both_ways(DET_CONFIG, det_overrides(det_data, tmp_path / "run"), 6)
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)  # only the rounding after the budget resize differs


def test_segmentation_training_step_with_uint8_patches(seg_data, tmp_path):
    losses = _step_both_ways(SEG_CONFIG, seg_overrides(seg_data, tmp_path / "run"), 6)
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)  # rounding after the photometric jitter and the resize


def test_segmentation_trains_and_evaluates_through_the_engine_with_uint8_patches(seg_data, tmp_path):
    summary = train(load_config(SEG_CONFIG, [*seg_overrides(seg_data, tmp_path / "run"), "data.uint8_patches=true",
                                             "data.eval_mode=slide", "data.slide_window=64"]))  # fmt: skip
    assert summary["steps"] == 2 and summary["final_metrics"]["images"] == 4


def test_square_pad_pads_uint8_images_with_black(det_data, tmp_path):
    task = get_task("detection")(to_object(load_config(DET_CONFIG, [*det_overrides(det_data, tmp_path), "data.uint8_patches=true"])))
    image = torch.rand(3, 20, 30) * 0.5 + 0.5  # un-normalized [0, 1] pixels: black is 0
    out = task._pad_to_square(image)
    assert out.shape == (3, 30, 30) and torch.equal(out[:, :20], image) and not out[:, 20:].any()


def test_the_config_key(det_data, tmp_path):
    base = det_overrides(det_data, tmp_path)
    expected_auto = torch.cuda.is_available()
    for value, device, on in (("null", "auto", expected_auto), ("null", "cpu", False), ("true", "cpu", True), ("false", "auto", False)):
        task = get_task("detection")(to_object(load_config(DET_CONFIG, [*base, f"data.uint8_patches={value}", f"train.device={device}"])))
        assert (task.pixel_norm is not None) == on, (value, device)
    cfg = load_config(None, ["task=classification", "data.uint8_patches=true"])
    with pytest.raises(ConfigError, match="data.uint8_patches=true: task 'classification' packs normalized float patches only"):
        get_task("classification")(to_object(cfg))
    assert get_task("classification")(to_object(load_config(None, ["task=classification", "train.device=cuda"]))).pixel_norm is None
    with pytest.raises(ConfigError, match="uint8_patches"):
        load_config(DET_CONFIG, [*base, "data.uint8_patches=maybe"])
    with pytest.raises(ConfigError, match="data.mean / data.std"):
        get_task("detection")(to_object(load_config(DET_CONFIG, [*base, "data.uint8_patches=true", "data.std=[0.2,0,0.2]"])))


# ---- CUDA (tools/gpu_check.sh runs the cuda-marked tests) ----------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_uint8_batch_is_normalized_on_the_device():
    sizes = [(37, 91), (120, 45), (64, 64)]
    batch = pack_images(uint8_images(sizes), 16, 24, 64, num_prefix_tokens=1, pixel_norm=NORM)
    pinned = batch.pin_memory()
    assert pinned.patches.is_pinned() and pinned.pixel_norm == NORM and pinned.layout is batch.layout
    on_device = pinned.to("cuda", non_blocking=True)
    assert on_device.patches.dtype == torch.uint8 and on_device.pixel_norm == NORM
    # CUDA divides by a scalar as a multiply by its reciprocal: within an ulp of the CPU values.
    torch.testing.assert_close(on_device.pixel_values().cpu(), batch.pixel_values(), rtol=1e-6, atol=1e-6)
    net = build_backbone("navit_ti16", patch_size=16, depth=2, embed_dim=64, num_heads=2, class_token=True, global_pool="avg").cuda()
    with HostSyncCounter() as syncs, torch.autocast("cuda", dtype=torch.bfloat16):
        net(on_device).pooled.float().sum().backward()
    assert syncs.total == 0, dict(syncs.calls)
    with torch.no_grad():
        torch.testing.assert_close(net(on_device).pooled.cpu(), net.cpu()(batch).pooled, rtol=1e-3, atol=1e-3)
