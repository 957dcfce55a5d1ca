"""Segmentation task: header-only image sizes, aspect-preserving augmentation that keeps
labels aligned, label sizes and global valid-pixel normalization in the collate / loss,
the evaluator's DDP merge, and a tiny train -> evaluate -> resolution sweep end to end."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool
import torch
from PIL import Image

from navit_dense.data.decode import BadInputWarning, ImageDecodeError, load_image
from navit_dense.engine.config import load_config, to_object
from navit_dense.engine.data import build_loader
from navit_dense.engine.distributed import init_distributed
from navit_dense.engine.optim import find_backbone
from navit_dense.engine.task import LossContext, PackPlan, get_task
from navit_dense.engine.trainer import evaluate, evaluate_checkpoint, seed_everything, train
from navit_dense.models.heads.segmenter import SegOutput
from navit_dense.data.seg_dataset import header_size
from navit_dense.data.seg_transforms import SegAugment
from navit_dense.evaluation.evaluators import SegEvaluator

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "segmentation" / "segmenter_linear_tiny_synthetic.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth_seg")
    load_tool("make_synthetic_seg").make_synthetic_seg(out, seed=0, n_train=32, n_val=8, min_side=64, max_side=160)
    return out


def tiny_cfg(data: Path, run_dir: Path, *extra: str):
    return load_config(CONFIG, [
        f"output_dir={run_dir}", f"data.root={data}",
        "model.backbone.depth=2", "model.backbone.embed_dim=64", "model.backbone.num_heads=2",
        "data.max_tokens_per_image=64", "data.seq_len=256", "data.tokens_per_batch=512",
        "optim.lr=2e-3", "optim.warmup_steps=5", "train.steps=40", "train.log_every=10",
        "train.eval_every=0", "train.ckpt_every=1000", *extra,
    ])  # fmt: skip


# ---- data -------------------------------------------------------------------------------------
def test_image_size_reads_headers_with_exif_orientation_and_without_decoding(data, tmp_path):
    task = get_task("segmentation")(to_object(tiny_cfg(data, tmp_path / "run")))
    ds = task.build_dataset("val")
    for i in range(len(ds)):
        assert ds.image_size(i) == tuple(ds.base[i]["image"].shape[-2:]) == tuple(ds.base[i]["label"].shape)
    # EXIF orientation 6 (rotate 90): load_image transposes, so the size must be swapped.
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (50, 20), (200, 10, 10)).save(rotated, exif=exif)
    assert header_size(str(rotated)) == tuple(load_image(rotated).shape[-2:]) == (50, 20)
    assert header_size(str(rotated), exif=False) == (20, 50)
    # A truncated file: its header still gives the size, its pixels cannot be decoded.
    full = (data / "images" / "validation" / "synth_0000.jpg").read_bytes()
    broken = tmp_path / "truncated.jpg"
    broken.write_bytes(full[: len(full) // 3])
    assert header_size(str(broken)) == ds.image_size(0)
    with pytest.raises(ImageDecodeError):
        load_image(broken)


def test_bad_training_samples_are_skipped_and_bad_eval_samples_raise(data, tmp_path):
    root = tmp_path / "data"
    for split in ("training", "validation"):
        for kind in ("images", "annotations"):
            (root / kind / split).mkdir(parents=True)
            for f in sorted((data / kind / split).iterdir())[:6]:
                (root / kind / split / f.name).write_bytes(f.read_bytes())
        jpg = root / "images" / split / "synth_0000.jpg"
        jpg.write_bytes(jpg.read_bytes()[:300])
    cfg = to_object(tiny_cfg(root, tmp_path / "run", "data.num_classes=8", "data.tokens_per_batch=128"))
    task = get_task("segmentation")(cfg)
    train_set, val_set = task.build_dataset("train"), task.build_dataset("val")
    with pytest.raises(ImageDecodeError):  # the dataset reports; the engine decides
        train_set[0]
    assert train_set[1] is not None
    pack = dict(patch_size=16, num_prefix_tokens=0, world_size=1, rank=0)
    train_loader = build_loader(task, train_set, cfg, train=True, **pack)
    train_loader.batch_sampler.set_epoch(1)
    keys = [k.index for micro in train_loader.batch_sampler for k in micro]
    assert 0 in keys  # the truncated image is drawn this epoch
    assert train_set.image_file(0) == str(root / "images" / "training" / "synth_0000.jpg")
    with pytest.warns(BadInputWarning, match="truncated"):
        micros = list(train_loader)
    assert sum((Counter(m.skipped) for m in micros), Counter()) == {"truncated": keys.count(0)}
    assert sum(m.batch.num_images for m in micros) == len(keys) - keys.count(0)
    val_loader = build_loader(task, val_set, cfg, train=False, **pack)
    val_loader.batch_sampler.set_epoch(0)
    with pytest.raises(ImageDecodeError):
        list(val_loader)


def test_dataset_metadata_conflicts_are_errors_naming_both(data, tmp_path):
    """meta.json says reduce_zero_label: true and 8 classes; a config that contradicts it would shift
    every label (mIoU 0.38 on the synthetic data) or mis-size the head: an error naming both."""
    for key, value, shown in (("reduce_zero_label", "false", "reduce_zero_label=False"), ("num_classes", "9", "num_classes=9")):
        task = get_task("segmentation")(to_object(tiny_cfg(data, tmp_path / "run", f"data.{key}={value}")))
        with pytest.raises(ValueError, match=rf"{shown} contradicts .*meta.json"):
            task.build_dataset("train")
    # Left unset, the dataset's own value is used; set consistently, it is accepted.
    for extra in ([], ["data.reduce_zero_label=true"]):
        ds = get_task("segmentation")(to_object(tiny_cfg(data, tmp_path / "run", "data.reduce_zero_label=null", *extra))).build_dataset("val")
        assert ds.base.reduce_zero_label is True and ds.base.classes == json.loads((data / "meta.json").read_text())["classes"]
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    (broken / "meta.json").write_text('{"classes": ["sky", ')
    task = get_task("segmentation")(to_object(tiny_cfg(broken, tmp_path / "run")))
    with pytest.raises(ValueError, match=r"meta.json: not valid JSON"):
        task.build_dataset("val")


def test_folder_format_takes_class_names(data, tmp_path):
    names = ["c%d" % i for i in range(8)]
    folder = ["data.format=folder", f"data.val_img_dir={data}/images/validation", f"data.val_ann_dir={data}/annotations/validation",
              "data.reduce_zero_label=true"]  # fmt: skip
    task = get_task("segmentation")(to_object(tiny_cfg(data, tmp_path / "run", *folder, f"data.class_names={names}")))
    assert task.build_dataset("val").base.classes == names
    assert task.build_evaluator().metric.class_names == names
    task = get_task("segmentation")(to_object(tiny_cfg(data, tmp_path / "run", *folder, f"data.class_names={names[:5]}")))
    with pytest.raises(ValueError, match=r"data \(val split\): num_classes=8 but 5 class names"):
        task.build_dataset("val")


def test_augmentation_keeps_aspect_ratio_and_label_alignment():
    augment = SegAugment(crop_prob=1.0, min_crop=0.3, flip_prob=0.5, photometric_prob=0.0, cat_max_ratio=0.75)
    H, W = 90, 150
    label = torch.randint(0, 8, (H, W))
    label[:10, :10] = 255
    # Channel 0 encodes the label and channel 1 the column, so any misaligned crop or flip shows.
    cols = torch.arange(W).float().expand(H, W)
    image = torch.stack([label.float() / 255, cols / W, torch.zeros(H, W)])
    flips = 0
    for seed in range(40):
        out = augment({"image": image, "label": label}, np.random.default_rng(seed))
        h, w = out["label"].shape
        assert out["image"].shape == (3, h, w)
        assert abs(h / w - H / W) < 2 / min(h, w)  # same fraction of both sides: aspect kept up to rounding
        assert torch.equal((out["image"][0] * 255).round().long(), out["label"])
        c = out["image"][1] * W
        flips += bool(c[0, 0] > c[0, -1])
        assert 0.75 <= out["budget_scale"] <= 1.25
    assert 5 < flips < 35  # both orientations occur
    # Photometric jitter changes the pixels (and nothing else).
    out = replace(augment, crop_prob=0.0, flip_prob=0.0, photometric_prob=1.0)({"image": torch.rand(3, H, W), "label": label}, np.random.default_rng(0))
    assert torch.equal(out["label"], label) and out["image"].shape == (3, H, W)


# ---- collate, loss, evaluator ---------------------------------------------------------------
def _plan(n: int, budget: int = 64, train: bool = True) -> PackPlan:
    return PackPlan(max_tokens=[budget] * n, seed=list(range(n)), patch_size=16, seq_len=256, num_prefix_tokens=0,
                    algorithm="balanced", token_drop=None, train=train)  # fmt: skip


def test_loss_normalized_by_global_valid_pixels_matches_one_big_batch(data, tmp_path):
    cfg = to_object(tiny_cfg(data, tmp_path / "run"))
    task = get_task("segmentation")(cfg)
    seed_everything(0)
    model = task.build_model()
    ds = task.build_dataset("train")
    samples = [ds[i] for i in range(6)]
    batch, targets = task.collate(samples, _plan(6))
    for y, size in zip(targets["labels"], batch.resized_sizes.tolist()):
        assert list(y.shape) == size  # labels at the packed size
    full = task.count(batch, targets)
    assert full["pixels"] == sum(int((s["label"] != 255).sum()) for s in [{"label": y} for y in targets["labels"]])
    loss_all = task.losses(model(batch), targets, LossContext(0, full))["loss"]
    # Two micro-batches of the same images, each normalized by the step's global count.
    parts = [task.collate(samples[:2], _plan(2)), task.collate(samples[2:], _plan(4))]
    totals = {k: sum(task.count(b, t)[k] for b, t in parts) for k in full}
    assert totals == full
    loss_split = sum(task.losses(model(b), t, LossContext(0, totals))["loss"] for b, t in parts)
    torch.testing.assert_close(loss_split, loss_all, rtol=1e-5, atol=1e-6)


def test_evaluator_merge_equals_one_evaluator():
    g = torch.Generator().manual_seed(0)
    sizes = [(20, 30), (17, 41), (33, 12), (25, 25)]
    logits = [torch.randn(4, h // 4 + 1, w // 4 + 1, generator=g) for h, w in sizes]
    labels = [torch.randint(0, 4, s, generator=g) for s in sizes]
    windows = [None, [(0, 0, 17, 22), (0, 20, 17, 41)], None, None]  # one image evaluated as two windows
    flat = [logits[0], logits[1], torch.randn(4, 5, 5, generator=g), logits[2], logits[3]]

    def run(ev, idx):
        take = [flat[j] for i in idx for j in ([0], [1, 2], [3], [4])[i]]
        ev.process(SegOutput(take, None), {"labels": [labels[i] for i in idx], "windows": [windows[i] for i in idx], "index": idx})
        return ev

    whole = run(SegEvaluator(4, keep=10), [0, 1, 2, 3])
    a, b = run(SegEvaluator(4, keep=10), [0, 1]), run(SegEvaluator(4, keep=10), [2, 3])
    a.merge([b.state()])
    assert a.metrics() == whole.metrics() and whole.metrics()["images"] == 4
    assert whole.metrics()["pixels"] == sum(h * w for h, w in sizes)
    assert sorted(a.predictions) == [0, 1, 2, 3] and a.predictions[1].shape == sizes[1]


# ---- end to end -------------------------------------------------------------------------------
def test_train_evaluate_and_resolution_sweep(data, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_cfg(data, run)
    c = to_object(cfg)
    # The untrained model, initialized exactly as the trainer does.
    seed_everything(c.seed)
    task = get_task("segmentation")(c)
    model = task.build_model()
    _, backbone = find_backbone(model)
    loader = build_loader(task, task.build_dataset("val"), c, patch_size=backbone.patch_size, num_prefix_tokens=backbone.num_prefix_tokens,
                          train=False, world_size=1, rank=0)  # fmt: skip
    untrained = evaluate(task, c, model, loader, init_distributed("cpu"))

    summary = train(cfg)
    trained = summary["final_metrics"]
    assert trained["images"] == 8 and set(trained) >= {"mIoU", "mAcc", "aAcc"}
    assert trained["mIoU"] > untrained["mIoU"] + 15, (untrained, trained)

    metrics, path = evaluate_checkpoint(cfg, run / "checkpoints" / "last")
    assert metrics == trained
    # Slide mode with a window larger than every image is whole-image inference.
    slide_big = evaluate_checkpoint(load_config(CONFIG, [*_overrides(cfg), "data.eval_mode=slide", "data.slide_window=1000"]), path)[0]
    assert slide_big == trained
    slide = evaluate_checkpoint(load_config(CONFIG, [*_overrides(cfg), "data.eval_mode=slide", "data.slide_window=64"]), path)[0]
    assert slide["images"] == 8 and 0 <= slide["mIoU"] <= 100 and slide != trained

    out = tmp_path / "sweep"
    tool = load_tool("eval_seg")
    assert tool.main(["--config", str(CONFIG), "--checkpoint", str(path), "--max-res", "96,128", "--out", str(out),
                      "--visualize", "2", *_overrides(cfg)]) == 0  # fmt: skip
    report = json.loads((out / "resolution_sweep.json").read_text())
    rows = report["rows"]
    assert [r["max_res"] for r in rows] == [96, 128]
    assert [r["max_tokens_per_image"] for r in rows] == [36, 64]
    assert rows[0]["mean_tokens_per_image"] < rows[1]["mean_tokens_per_image"] <= 64
    assert all(r["images"] == 8 and r["images_per_s"] > 0 and r["peak_mem_mb"] > 0 for r in rows)
    with open(out / "resolution_sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["mIoU"]) for r in table] == [r["mIoU"] for r in rows]
    png = out / "resolution_sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    vis = sorted((out / "vis").glob("*.png"))
    assert len(vis) == 2
    with Image.open(vis[0]) as im:
        assert im.width > 2 * im.height  # three panels side by side


def _overrides(cfg) -> list[str]:
    """The test's overrides of the config file, re-expressed as key=value strings."""
    c = to_object(cfg)
    return [f"output_dir={c.output_dir}", f"data.root={c.data.root}", "model.backbone.depth=2", "model.backbone.embed_dim=64",
            "model.backbone.num_heads=2", "data.max_tokens_per_image=64", "data.seq_len=256", "data.tokens_per_batch=512"]  # fmt: skip


@pytest.mark.parametrize("name", ["segmenter_linear_tiny_synthetic", "segmenter_mask_tiny_synthetic", "segmenter_linear_navit_b16_ade20k",
                                  "segmenter_linear_navit_dinov3_s16_ade20k"])
def test_configs_load_and_build(name):
    c = to_object(load_config(ROOT / "configs" / "segmentation" / f"{name}.yaml"))
    task = get_task("segmentation")(c)
    assert c.data.num_classes == (150 if "ade20k" in name else 8) and c.data.reduce_zero_label
    if "tiny" in name:  # the B/16 takes a while to build; its schema check above is what matters
        model = task.build_model()
        assert type(model.decoder).__name__ == ("LinearDecoder" if "linear" in name else "MaskTransformerDecoder")
