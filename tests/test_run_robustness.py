"""Runs that never lose work and never mislead (issue 14): tiny datasets, images smaller than a
patch, empty micro-batches, resuming finished or crashed runs, metrics.jsonl after restarts,
corrupt checkpoints, checkpoints that do not fit the config, and the tools' messages."""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import load_tool
from test_engine_train import TINY as ENGINE_TINY

from navit_dense.data.decode import BadInputWarning, DataError
from navit_dense.data.synthetic.shapes import ShapesDataset
from navit_dense.engine import checkpoint as ckpt
from navit_dense.engine.config import ConfigError, load_config
from navit_dense.engine.sampler import TokenBudgetSampler
from navit_dense.engine.task import register_task
from navit_dense.engine.trainer import NoUsableDataError, evaluate_checkpoint, train
from navit_dense.evaluation.evaluators import AccuracyEvaluator
from navit_dense.tasks.classification import ClassificationDataConfig, ClassificationModelConfig, ClassificationTask

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "configs" / "classification" / "toy.yaml"
# The engine tests' tiny runs (images of 16-48 px at patch 8, ~8 images per micro-batch), smaller still.
TINY = [*ENGINE_TINY, "data.train_size=24", "data.val_size=0"]
# Same-size images: 32 px = 4x4 patches = 16 tokens, so tokens_per_batch=32 holds exactly two.
SAME_SIZE = ["data.image_min_side=32", "data.image_max_side=32", "data.max_tokens_per_image=16"]


def tiny_cfg(run_dir: Path, *overrides: str):
    return load_config(TOY, [f"output_dir={run_dir}", *TINY, *overrides])


def records(run_dir: Path, kind: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


# ---- test tasks --------------------------------------------------------------------------------
class _FlawedShapes(ShapesDataset):
    """Shapes whose images ``tiny`` are 1x1 pixels, and which name their files."""

    def __init__(self, size, min_side, max_side, seed, train, tiny=()):
        super().__init__(size, min_side, max_side, seed, train)
        for i in tiny:
            self.sizes[i] = (1, 1)

    def image_file(self, index: int) -> str:
        return f"shape_{index}.png"


@dataclass
class _FlawedDataConfig(ClassificationDataConfig):
    tiny_train: list[int] = field(default_factory=list)  # training images that are 1x1
    tiny_val: list[int] = field(default_factory=list)


@dataclass
class _FlawedModelConfig(ClassificationModelConfig):
    broken_evaluator: bool = False  # metrics() raises (a final evaluation that fails)
    broken_val_truth: bool = False  # build_evaluator() raises (a validation ground truth it refuses)


class _BrokenEvaluator(AccuracyEvaluator):
    def metrics(self):
        raise RuntimeError("the evaluator failed")


@register_task("robustness_test")
class _FlawedTask(ClassificationTask):
    ModelConfig, DataConfig = _FlawedModelConfig, _FlawedDataConfig

    def build_dataset(self, split):
        d = self.cfg.data
        size, tiny = {"train": (d.train_size, d.tiny_train), "val": (d.val_size, d.tiny_val)}[split]
        return _FlawedShapes(size, d.image_min_side, d.image_max_side, seed=0 if split == "train" else 1, train=split == "train", tiny=tiny) if size else None

    def build_evaluator(self):
        if self.cfg.model.broken_val_truth:
            raise ValueError("val.json: annotation 3 has a negative width")
        return _BrokenEvaluator() if self.cfg.model.broken_evaluator else AccuracyEvaluator()


# ---- finding 3: tiny datasets ---------------------------------------------------------------------
def test_one_image_trains_even_when_it_alone_exceeds_the_batch_budget(tmp_path):
    summary = train(tiny_cfg(tmp_path / "one", "data.train_size=1", "data.tokens_per_batch=4", "train.grad_accum=2", "train.steps=3"))
    assert summary["steps"] == 3
    assert [r["images"] for r in records(tmp_path / "one")] == [1, 1, 1]


def test_the_last_partial_micro_batch_and_step_of_an_epoch_are_used(tmp_path):
    # 5 images, two per micro-batch, two micro-batches per step: each epoch is [[2, 2], [1]].
    run = tmp_path / "run"
    summary = train(tiny_cfg(run, *SAME_SIZE, "data.train_size=5", "data.tokens_per_batch=32", "train.grad_accum=2", "train.steps=4"))
    assert summary["steps"] == 4
    assert [r["images"] for r in records(run)] == [4, 1, 4, 1]  # every image of every epoch


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("tokens_per_batch", [1, 40, 100, 1000])
def test_every_training_image_is_used_once_per_epoch(world_size, tokens_per_batch):
    dataset = ShapesDataset(17, 8, 64, seed=0, train=True)
    sizes = [dataset.image_size(i) for i in range(len(dataset))]
    samplers = [TokenBudgetSampler(sizes, patch_size=8, max_tokens_per_image=24, tokens_per_batch=tokens_per_batch, grad_accum=2,
                                   world_size=world_size, rank=r, seed=1) for r in range(world_size)]  # fmt: skip
    for epoch in (0, 1):
        _, _, steps = samplers[0].plan(epoch)
        micros = [m for step in steps for m in step]
        assert sorted(i for m in micros for i in m) == list(range(17))
        assert all(len(m) >= world_size for m in micros)  # every rank gets an image of every micro-batch
        assert all(1 <= len(step) <= 2 for step in steps)
        shards = []
        for s in samplers:
            s.set_epoch(epoch)
            shards.append(list(s))
        assert all(len(sh) == len(micros) for sh in shards)
        for m, parts in zip(micros, zip(*shards)):
            assert sorted(k.index for part in parts for k in part) == sorted(m)


def test_fewer_training_images_than_ranks_is_a_clear_error():
    with pytest.raises(ValueError, match=r"holds 1 image\(s\) for 2 ranks"):
        TokenBudgetSampler([(32, 32)], patch_size=8, max_tokens_per_image=16, tokens_per_batch=64, world_size=2, rank=0)


# ---- finding 8: images smaller than one patch -------------------------------------------------------
def test_an_image_smaller_than_a_patch_is_a_skipped_and_counted_training_sample(tmp_path):
    # One image per micro-batch: the step that draws the 1x1 image has nothing left and takes the next one.
    cfg = tiny_cfg(tmp_path / "run", "task=robustness_test", "data.train_size=3", "data.tiny_train=[1]", "data.tokens_per_batch=1", "train.steps=4")
    with pytest.warns(BadInputWarning, match=r"training sample 1 \(shape_1\.png\) skipped \(smaller_than_patch\): 1x1 is smaller than one 8x8 patch"):
        summary = train(cfg)
    assert summary["steps"] == 4 and [r["images"] for r in records(tmp_path / "run")] == [1, 1, 1, 1]
    # Skipped each time the epoch plans drew it before the 4th usable image.
    sampler = TokenBudgetSampler([(16, 16), (1, 1), (16, 16)], patch_size=8, max_tokens_per_image=24, tokens_per_batch=1, seed=0)
    drawn = [i for epoch in range(3) for step in sampler.plan(epoch)[2] for micro in step for i in micro]
    fourth_usable = [p for p, i in enumerate(drawn) if i != 1][3]
    skipped = drawn[:fourth_usable].count(1)
    assert skipped >= 1 and summary["skipped_samples"] == skipped and summary["skipped_by_reason"] == {"smaller_than_patch": skipped}


def test_an_image_smaller_than_a_patch_in_a_bigger_micro_batch_is_dropped_from_it(tmp_path):
    with pytest.warns(BadInputWarning, match="smaller_than_patch"):
        summary = train(tiny_cfg(tmp_path / "run", "task=robustness_test", "data.train_size=6", "data.tiny_train=[0, 4]", "train.steps=2"))
    assert [r["images"] for r in records(tmp_path / "run")] == [4, 4]
    assert summary["skipped_by_reason"] == {"smaller_than_patch": 4}


def test_a_whole_epoch_of_unusable_images_stops_with_the_reason(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", "task=robustness_test", "data.train_size=2", "data.tiny_train=[0, 1]", "data.tokens_per_batch=1", "train.steps=2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadInputWarning)
        with pytest.raises(NoUsableDataError, match="smaller_than_patch"):
            train(cfg)


def test_an_evaluation_image_smaller_than_a_patch_is_an_error_naming_it(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", "task=robustness_test", "data.val_size=4", "data.tiny_val=[2]", "train.steps=1")
    with pytest.raises(DataError, match=r"evaluation item 2 \(shape_2\.png\): 1x1 is smaller than one 8x8 patch"):
        train(cfg)


# ---- the final checkpoint comes before the final evaluation; the evaluator is built up front ----------
def test_a_failing_final_evaluation_loses_nothing_and_resume_only_evaluates(tmp_path):
    run = tmp_path / "run"
    common = ["task=robustness_test", "data.val_size=8", "train.steps=3", "train.ckpt_every=100", "train.best_metric=accuracy"]
    with pytest.raises(RuntimeError, match="the evaluator failed"):
        train(tiny_cfg(run, *common, "model.broken_evaluator=true"))
    assert ckpt.latest(run / "checkpoints").name == "step_000003"  # the trained weights are kept
    assert not (run / "summary.json").exists()
    summary = train(tiny_cfg(run, *common), resume=True)  # the evaluator fixed
    assert summary["steps"] == 3 and summary["final_metrics"]["images"] == 8
    assert summary["best_step"] == 3 and (run / "checkpoints" / "best").resolve().name == "step_000003"
    assert [r["step"] for r in records(run)] == [1, 2, 3] and [r["step"] for r in records(run, "eval")] == [3]
    meta = ckpt.read_meta(run / "checkpoints" / "step_000003")
    assert meta["train_state"]["best_step"] == 3 and meta["train_state"]["pending_eval"] is False


def test_a_validation_set_the_evaluator_refuses_fails_before_training(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="val.json: annotation 3"):
        train(tiny_cfg(run, "task=robustness_test", "data.val_size=8", "model.broken_val_truth=true", "train.steps=2"))
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


def test_evaluations_do_not_change_what_a_resume_reproduces(tmp_path):
    # Checkpoint, then evaluate, at step 2: resuming from that checkpoint must continue exactly.
    extra = ["data.val_size=8", "train.eval_every=2", "train.ckpt_every=2", "train.steps=4", "model.backbone.drop_path_rate=0.2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_cfg(straight, *extra))
    shutil.copytree(straight / "checkpoints" / "step_000002", resumed / "checkpoints" / "step_000002")
    train(tiny_cfg(resumed, *extra), resume=True)
    a, b = records(straight), records(resumed)
    assert [r["loss"] for r in a[2:]] == [r["loss"] for r in b]


# ---- finding 9: resuming a finished run -------------------------------------------------------------
def test_resuming_a_finished_run_keeps_its_summary(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_cfg(run, "data.val_size=8", "train.steps=2")
    summary = train(cfg)
    before = (run / "summary.json").read_text()
    assert summary["final_metrics"]["images"] == 8
    again = train(cfg, resume=True)
    assert (run / "summary.json").read_text() == before and again == json.loads(before)
    assert len(records(run, "eval")) == 1 and len(records(run)) == 2


# ---- finding 10: metrics.jsonl after restarts --------------------------------------------------------
@pytest.mark.parametrize("resume", [True, False])
def test_a_restart_before_the_first_checkpoint_logs_each_step_once(tmp_path, resume):
    run = tmp_path / "run"
    cfg = tiny_cfg(run, "train.steps=3", "train.ckpt_every=100")
    train(cfg)
    shutil.rmtree(run / "checkpoints")  # as if killed before its first checkpoint
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "kind": "tr')  # and a line cut short by the kill
    train(cfg, resume=resume)
    assert [r["step"] for r in records(run)] == [1, 2, 3]


# ---- finding 11: corrupt checkpoints -----------------------------------------------------------------
def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_truncated_meta_json_is_named_before_any_evaluation(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_cfg(run, "task=robustness_test", "train.steps=1"))
    _truncate(run / "checkpoints" / "step_000001" / "meta.json")
    # An evaluation set the evaluation would fail on: the checkpoint must be refused first.
    cfg = tiny_cfg(run, "task=robustness_test", "data.val_size=4", "data.tiny_val=[0]")
    with pytest.raises(ckpt.CheckpointError, match=r"step_000001/meta\.json: not readable JSON"):
        evaluate_checkpoint(cfg, run / "checkpoints" / "step_000001")
    code = load_tool("evaluate").main(["--config", str(run / "config.yaml"), "--checkpoint", str(run / "checkpoints" / "step_000001")])
    err = capsys.readouterr().err
    assert code == 2 and "meta.json: not readable JSON" in err and "Traceback" not in err


def test_a_truncated_safetensors_file_is_named(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_cfg(run, "train.steps=1"))
    _truncate(run / "checkpoints" / "step_000001" / "model.safetensors")
    code = load_tool("evaluate").main(["--config", str(run / "config.yaml"), "--checkpoint", str(run / "checkpoints" / "step_000001")])
    err = capsys.readouterr().err
    assert code == 2 and "step_000001/model.safetensors: not a whole safetensors file" in err


def test_resume_falls_back_to_the_newest_valid_checkpoint(tmp_path):
    extra = ["train.steps=4", "train.ckpt_every=1", "train.keep_last=5", "model.backbone.drop_path_rate=0.1"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train(tiny_cfg(straight, *extra))
    shutil.copytree(straight / "checkpoints", broken / "checkpoints", symlinks=True)
    # The two newest checkpoints are corrupt: step 3's optimizer state, step 4's meta.json.
    _truncate(broken / "checkpoints" / "step_000003" / "optimizer.safetensors")
    _truncate(broken / "checkpoints" / "step_000004" / "meta.json")
    with pytest.warns(ckpt.CheckpointWarning) as caught:
        train(tiny_cfg(broken, *extra), resume=True)
    messages = " ".join(str(w.message) for w in caught)
    assert "step_000004/meta.json" in messages and "step_000003/optimizer.safetensors" in messages
    a, b = records(straight), records(broken)
    assert [r["step"] for r in b] == [3, 4] and [r["loss"] for r in b] == [r["loss"] for r in a[2:]]  # resumed from step 2, exactly
    model_a, model_b = ckpt.load_weights(straight), ckpt.load_weights(broken)
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_cfg(run, "train.steps=1")
    train(cfg)
    (run / "checkpoints" / "step_000001" / "meta.json").write_text("")
    with pytest.warns(ckpt.CheckpointWarning), pytest.raises(ckpt.CheckpointError, match="none of the 1 checkpoints"):
        train(cfg, resume=True)


# ---- checkpoints that do not fit the config ------------------------------------------------------------
def test_a_checkpoint_of_another_head_size_names_the_tensor_and_both_shapes(tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(run, "train.steps=1", "model.backbone.num_classes=8"))
    expected = r"model\.safetensors: tensor 'backbone\.head\.weight' has shape \[8, 64\] in the checkpoint but \[4, 64\] in the model"
    with pytest.raises(ckpt.CheckpointError, match=expected):
        evaluate_checkpoint(tiny_cfg(run, "data.val_size=4"), run)
    with pytest.raises(ckpt.CheckpointError, match=expected):
        train(tiny_cfg(run, "train.steps=2"), resume=True)


# ---- messages ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [("optim.lr=-0.1", "optim.lr"), ("optim.lr=.nan", "optim.lr"), ("optim.eps=0", "optim.eps"),
                                           ("optim.betas=[0.9, 1.5]", "optim.betas"), ("train.collective_timeout_s=-1", "train.collective_timeout_s")])  # fmt: skip
def test_impossible_engine_values_are_config_errors_naming_the_key(tmp_path, override, key, capsys):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train(tiny_cfg(run, override))
    assert not (run / "checkpoints").exists()
    code = load_tool("train").main(["--config", str(TOY), "--output-dir", str(tmp_path / "tool"), *TINY, override])
    err = capsys.readouterr().err
    assert code == 2 and key in err and "Traceback" not in err


def test_missing_config_or_checkpoint_names_the_path(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    for tool in ("train", "evaluate"):
        extra = ["--checkpoint", str(tmp_path)] if tool == "evaluate" else []
        with pytest.raises(SystemExit) as exit_:
            load_tool(tool).main(["--config", str(missing), *extra])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and str(missing) in err and "Errno" not in err
    code = load_tool("evaluate").main(["--config", str(TOY), "--checkpoint", str(tmp_path / "no_run")])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path / "no_run") in err and "Errno" not in err


def test_the_tools_name_a_missing_input_file(tmp_path, capsys):
    run = tmp_path / "run"
    code = load_tool("train").main(["--config", str(TOY), "--output-dir", str(run), *TINY, "model.backbone.init.path=" + str(tmp_path / "w.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path / "w.safetensors") in err and "Traceback" not in err
