"""Detection task end to end on a tiny synthetic LVIS dataset: training through the engine
and tools/train.py, checkpoint, tools/evaluate.py, the resolution sweep, repeat-factor
sampling in the engine's sampler, and detections coming back in original image coordinates;
the evaluator scoring the datasets' own reading of the ground truth (skips, zero-based ids),
COCO ground truth under the COCO protocol, zero-area predictions, dense-scene warnings."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool
from test_ground_truth import zero_based
import torch

from navit_dense.data.decode import BadInputWarning
from navit_dense.data.detection import lvis_repeat_factors, resize
from navit_dense.data.resize import budget_grid
from navit_dense.data.synthetic.lvis_random import to_coco_format
from navit_dense.engine.config import load_config, to_object
from navit_dense.engine.sampler import TokenBudgetSampler
from navit_dense.engine.task import PackPlan, get_task
from navit_dense.evaluation.lvis_eval import COCO_METRICS, LVIS_METRICS
from navit_dense.engine.resolution_sweep import COLUMNS, run_resolution_sweep, sweep_columns
from navit_dense.models.heads.owl import DetectorOutput, OwlHead, word_embeddings

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "detection" / "owl_navit_tiny_synthetic_lvis.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth_lvis")
    load_tool("make_synthetic_lvis").main(["--out", str(out), "--train-images", "24", "--val-images", "12", "--num-classes", "8",
                                       "--min-side", "64", "--max-side", "128"])  # fmt: skip
    return out


def overrides(data: Path, run_dir: Path) -> list[str]:
    return [
        f"output_dir={run_dir}",
        f"data.train_json={data}/lvis_v1_train.json", f"data.train_images={data}/images",
        f"data.val_json={data}/lvis_v1_val.json", f"data.val_images={data}/images",
        "model.backbone.depth=2", "model.backbone.embed_dim=64", "model.backbone.num_heads=2",
        "data.max_tokens_per_image=36", "data.seq_len=144", "data.tokens_per_batch=288",
        "data.crop_prob=0.5", "data.repeat_threshold=0.3", "data.federated_negatives=2",
        "data.token_drop.mode=constant", "data.token_drop.rate=0.25",
        "optim.warmup_steps=2", "train.steps=4", "train.log_every=1", "train.ckpt_every=2",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained_run(data, tmp_path_factory) -> tuple[Path, list[str]]:
    run_dir = tmp_path_factory.mktemp("run") / "owl"
    args = overrides(data, run_dir)
    assert load_tool("train").main(["--config", str(TINY_CONFIG), *args]) == 0
    return run_dir, args


def test_train_checkpoint_and_evaluate_through_the_tools(trained_run, tmp_path):
    run_dir, args = trained_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_steps] == [1, 2, 3, 4]
    for r in train_steps:
        assert all(math.isfinite(r[k]) for k in ("loss", "loss_cls", "loss_l1", "loss_giou", "loss_objectness", "grad_norm"))
        assert r["boxes"] >= 1 and r["images"] >= 1
    final_eval = [r for r in records if r["kind"] == "eval"][-1]
    assert final_eval["step"] == 4 and final_eval["images"] == 12

    out = tmp_path / "eval.json"
    assert load_tool("evaluate").main(["--config", str(TINY_CONFIG), "--checkpoint", str(run_dir / "checkpoints" / "last"),
                                   "--output", str(out), *args]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    metrics = report["metrics"]
    assert report["step"] == 4
    assert set(LVIS_METRICS) <= set(metrics) and metrics["images"] == 12 and metrics["detections"] > 0
    assert all(math.isfinite(v) for v in metrics.values())
    for k in ("AP", "APr", "APc", "APf"):
        assert 0.0 <= metrics[k] <= 1.0  # defined: every class, rare ones included, has val instances
    # The same weights give the same numbers as the trainer's own evaluation at the last step.
    assert metrics["AP"] == pytest.approx(final_eval["AP"], abs=1e-6)


def test_resolution_sweep_writes_json_csv_png(trained_run, tmp_path):
    run_dir, args = trained_run
    cfg = load_config(TINY_CONFIG, args)
    rows = run_resolution_sweep(cfg, run_dir / "checkpoints" / "last", [96, 48], tmp_path / "sweep")
    assert [r["max_res"] for r in rows] == [48, 96]
    for r, side in zip(rows, (48, 96)):
        assert set(COLUMNS) <= set(r)
        assert r["max_tokens_per_image"] == (side // 16) ** 2 and 1 <= r["mean_tokens_per_image"] <= r["max_tokens_per_image"]
        assert r["images"] == 12 and r["images_per_s"] > 0 and r["peak_mem_mb"] > 0
        assert all(math.isfinite(r[k]) and -1 <= r[k] <= 1 for k in ("AP", "AP50", "APr", "APc", "APf"))
    assert rows[0]["mean_tokens_per_image"] < rows[1]["mean_tokens_per_image"]
    report = json.loads((tmp_path / "sweep" / "resolution_sweep.json").read_text())
    assert report["rows"] == rows and report["patch_size"] == 16
    with open(tmp_path / "sweep" / "resolution_sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(COLUMNS) and [int(r["max_res"]) for r in table] == [48, 96]
    png = (tmp_path / "sweep" / "resolution_sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def _perfect_outputs(task, batch, targets, zero_width_rest: bool = False) -> DetectorOutput:
    """Real head outputs on the real packed batch, with logits and boxes replaced by the ground
    truth: image i's first G_i tokens predict its G_i boxes (normalized, as the head does).
    zero_width_rest: the other tokens predict zero-width boxes (as if clipped to nothing)."""
    head = OwlHead(32, num_classes=len(task.categories()))
    out = head(torch.randn(batch.num_sequences, batch.seq_len, 32), batch)
    logits = torch.full_like(out.logits, -10.0)
    boxes = out.pred_boxes.clone()
    if zero_width_rest:
        boxes[:, 2] = 0.0
    for i, t in enumerate(targets):
        rows = int(out.offsets[i]) + torch.arange(len(t["labels"]))
        assert int(out.offsets[i + 1]) - int(out.offsets[i]) >= len(rows)
        logits[rows, t["labels"]] = 10.0
        boxes[rows] = t["boxes"]
    return DetectorOutput(replace(out, logits=logits, pred_boxes=boxes), batch)


def test_evaluator_returns_detections_in_original_image_coordinates(data, tmp_path):
    cfg = to_object(load_config(TINY_CONFIG, overrides(data, tmp_path / "unused")))
    task = get_task("detection")(cfg)
    val = task.build_dataset("val")
    # Augmented (resized by 0.6 or 1.3) and then packed into small non-square grids: three
    # different frames, none of them the original.
    samples = [resize(val[i], 0.6 if i % 2 else 1.3) for i in range(len(val))]
    plan = PackPlan(max_tokens=[40] * len(samples), seed=0, patch_size=16, seq_len=160, num_prefix_tokens=0, algorithm="balanced", token_drop=None)
    batch, targets = task.collate(samples, plan)
    assert not torch.equal(batch.image_sizes, torch.tensor([s.orig_size for s in samples]))
    outputs = _perfect_outputs(task, batch, targets)

    evaluator = task.build_evaluator()
    evaluator.process(outputs, targets)
    metrics = evaluator.metrics()
    assert metrics["AP"] == pytest.approx(1.0) and metrics["APr"] == pytest.approx(1.0) and metrics["images"] == len(val)

    # Control: dropping the augmentation scale leaves the boxes in the resized frame -> AP collapses.
    unscaled = [{**t, "scale": (1.0, 1.0)} for t in targets]
    wrong = task.build_evaluator()
    wrong.process(outputs, unscaled)
    assert wrong.metrics()["AP"] < 0.5


def test_repeat_factors_reach_the_token_budget_sampler(data):
    cfg = to_object(load_config(TINY_CONFIG, overrides(data, Path("unused"))))
    train = get_task("detection")(cfg).build_dataset("train")
    factors = train.repeat_factors()
    assert np.allclose(factors, lvis_repeat_factors(train.image_labels(), 0.3)) and factors.max() > 1.5
    sizes = [train.image_size(i) for i in range(len(train))]
    sampler = TokenBudgetSampler(sizes, patch_size=16, max_tokens_per_image=36, tokens_per_batch=100, seed=0, repeat_factors=factors)
    counts = np.zeros(len(train))
    for epoch in range(30):
        sampler.set_epoch(epoch)
        keys = [k for micro in sampler for k in micro]
        seen = {}
        for k in keys:
            counts[k.index] += 1
            assert k.repeat == seen.get(k.index, 0)  # 0, 1, 2, ... per occurrence within the epoch
            seen[k.index] = k.repeat + 1
        by_image = {}
        for k in keys:
            by_image.setdefault(k.index, set()).add(k.seed)
        assert all(len(seeds) == seen[i] for i, seeds in by_image.items())  # each repeat has its own token-drop seed
    # About r_i occurrences per epoch (the tail micro-batch is dropped, so slightly fewer).
    assert np.corrcoef(counts / 30, factors)[0, 1] > 0.9
    assert abs(counts.sum() / 30 - factors.sum()) < 0.15 * factors.sum()
    # Evaluation never repeats.
    eval_sampler = TokenBudgetSampler(sizes, patch_size=16, max_tokens_per_image=36, tokens_per_batch=100, train=False, repeat_factors=factors)
    assert sorted(k.index for micro in eval_sampler for k in micro) == list(range(len(train)))


def test_word_embeddings_share_words():
    emb = word_embeddings(["magenta_cross", "magenta_circle", "blue_circle", "Blue circle"], 64)
    assert emb.shape == (4, 64) and torch.allclose(emb.norm(dim=-1), torch.ones(4))
    cos = emb @ emb.T
    assert cos[2, 3] == pytest.approx(1.0)  # same words, same query
    assert cos[0, 1] > 0.3 and cos[1, 2] > 0.3 and abs(float(cos[0, 2])) < 0.3  # one shared word vs none


def test_config_files_load():
    lvis = to_object(load_config(ROOT / "configs" / "detection" / "owl_navit_b16_lvis.yaml"))
    assert lvis.task == "detection" and lvis.model.backbone.name == "navit_b16"
    d = lvis.data
    assert (d.max_tokens_per_image, d.repeat_threshold, d.federated_negatives, d.topk) == (1024, 0.001, 50, 300)
    assert d.token_drop.mode != "none" and d.resolution.enabled and d.train_json.startswith("datasets/lvis")
    tiny = to_object(load_config(TINY_CONFIG))
    assert tiny.task == "detection" and tiny.data.repeat_threshold > 0


def test_coco_ground_truth_is_evaluated_with_the_coco_protocol(trained_run, data, tmp_path, capsys):
    run_dir, args = trained_run
    coco = tmp_path / "coco_val.json"
    coco.write_text(json.dumps(to_coco_format(json.loads((data / "lvis_v1_val.json").read_text()))))
    args = [*args, f"data.val_json={coco}"]
    out = tmp_path / "eval.json"
    checkpoint = str(run_dir / "checkpoints" / "last")
    assert load_tool("evaluate").main(["--config", str(TINY_CONFIG), "--checkpoint", checkpoint, "--output", str(out), *args]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert set(COCO_METRICS) <= set(metrics) and "APr" not in metrics
    assert all(0 <= metrics[k] <= 1 for k in ("AP", "AP50", "AR"))  # read at COCO's 100 detections, not -1
    capsys.readouterr()
    argv = ["--config", str(TINY_CONFIG), "--checkpoint", checkpoint, "--max-res", "48", "--out", str(tmp_path / "sweep"), *args]
    assert load_tool("eval_lvis").main(argv) == 0
    assert "AP75" in capsys.readouterr().out
    with open(tmp_path / "sweep" / "resolution_sweep.csv") as f:
        assert tuple(next(csv.reader(f))) == sweep_columns("coco")


def _val_variant(data: Path, tmp_path: Path, variant: str) -> Path:
    gt = json.loads((data / "lvis_v1_val.json").read_text())
    if variant == "negative_width_box":  # skipped by the training reading: must not be scored either
        gt["annotations"][0]["bbox"][2] *= -1
    else:  # an annotation tool's zero-based export
        gt, _ = zero_based(gt)
    path = tmp_path / f"{variant}.json"
    path.write_text(json.dumps(gt))
    return path


@pytest.mark.parametrize("variant", ["negative_width_box", "zero_based_ids"])
def test_evaluator_scores_the_val_data_as_read(data, tmp_path, variant):
    """Perfect predictions of the val dataset's targets score AP 1 whatever the file held: the
    evaluator's ground truth is the dataset's reading (a skipped box is not a missed object; a
    zero-based file is renumbered for both), and zero-area predictions are dropped and counted."""
    path = _val_variant(data, tmp_path, variant)
    cfg = to_object(load_config(TINY_CONFIG, [*overrides(data, tmp_path / "unused"), f"data.val_json={path}"]))
    task = get_task("detection")(cfg)
    with pytest.warns(BadInputWarning) as caught:
        val = task.build_dataset("val")
        evaluator = task.build_evaluator()
    assert len([w for w in caught if issubclass(w.category, BadInputWarning)]) == 1  # the reading's one warning
    samples = [val[i] for i in range(len(val))]
    plan = PackPlan(max_tokens=[40] * len(samples), seed=0, patch_size=16, seq_len=160, num_prefix_tokens=0, algorithm="balanced", token_drop=None)
    batch, targets = task.collate(samples, plan)
    evaluator.process(_perfect_outputs(task, batch, targets, zero_width_rest=True), targets)
    metrics = evaluator.metrics()
    assert metrics["AP"] == pytest.approx(1.0) and metrics["images"] == len(val)
    assert metrics["zero_area_detections"] > 0 and metrics["zero_area_detections"] < metrics["detections"]


def test_dense_scenes_are_warned_once_per_split_and_counted(data, tmp_path):
    cfg = to_object(load_config(TINY_CONFIG, [*overrides(data, tmp_path), "data.max_tokens_per_image=2", "data.topk=2"]))
    task = get_task("detection")(cfg)
    task.build_model()  # the token check needs the model's patch size
    with pytest.warns(BadInputWarning, match="recall is capped") as caught:
        train, val = task.build_dataset("train"), task.build_dataset("val")
    messages = [str(w.message) for w in caught if "recall is capped" in str(w.message)]
    assert len(messages) == 2 and "(train split)" in messages[0] and "(val split)" in messages[1]
    assert "data.max_tokens_per_image=2" in messages[0] and "data.topk=2" in messages[1]
    for split, ds in (("train", train), ("val", val)):
        gt = json.loads((data / f"lvis_v1_{split}.json").read_text())
        objects = {im["id"]: 0 for im in gt["images"]}
        for a in gt["annotations"]:
            objects[a["image_id"]] += 1
        tokens = {im["id"]: math.prod(budget_grid(im["height"], im["width"], 16, 2)) for im in gt["images"]}
        expected = {"more_objects_than_tokens": sum(objects[i] > tokens[i] for i in objects)}
        if split == "val":
            expected["more_objects_than_topk"] = sum(n > 2 for n in objects.values())
        assert ds.skip_summary()["recall_capped"] == expected and all(expected.values())
