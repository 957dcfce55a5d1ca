"""Experiment configs: _base_ inheritance, overrides, typed task sections, helpful errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from navit_dense.engine.config import ConfigError, load_config, to_object, to_yaml
from navit_dense.engine.task import Task, register_task
from navit_dense.tasks.classification import ClassificationDataConfig, ClassificationModelConfig

TOY = Path(__file__).resolve().parents[1] / "configs" / "classification" / "toy.yaml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_shipped_toy_config_loads_typed():
    cfg = to_object(load_config(TOY))
    assert isinstance(cfg.model, ClassificationModelConfig) and isinstance(cfg.data, ClassificationDataConfig)
    assert cfg.task == "classification"
    assert cfg.model.backbone.depth == 2 and cfg.optim.layer_decay == 0.8
    assert cfg.optim.weight_decay == 0.05  # from _base_/adamw_cosine.yaml
    assert cfg.train.keep_last == 3  # from _base_/runtime.yaml


def test_base_chain_deep_merge_and_overrides(tmp_path):
    write(tmp_path / "bases/a.yaml", "task: classification\noptim: {lr: 0.5, warmup_steps: 7}\ntrain: {steps: 10}\n")
    write(tmp_path / "bases/b.yaml", "_base_: a.yaml\noptim: {lr: 0.25}\n")  # string form, relative to b.yaml
    write(tmp_path / "c.yaml", "train: {grad_accum: 3}\n")
    exp = write(tmp_path / "exp/run.yaml", "_base_: [../bases/b.yaml, ../c.yaml]\ntrain: {steps: 20}\n")
    cfg = to_object(load_config(exp, ["data.max_tokens_per_image=576", "model.backbone.name=navit_b16", "optim.betas=[0.8, 0.9]"]))
    assert cfg.optim.lr == 0.25 and cfg.optim.warmup_steps == 7  # b overrides a; a's sibling key survives
    assert cfg.train.steps == 20 and cfg.train.grad_accum == 3  # the file beats its bases; bases merge in order
    assert cfg.data.max_tokens_per_image == 576 and isinstance(cfg.data.max_tokens_per_image, int)
    assert cfg.model.backbone.name == "navit_b16" and cfg.optim.betas == [0.8, 0.9]


def test_later_base_wins_and_interpolation(tmp_path):
    write(tmp_path / "x.yaml", "task: classification\ntrain: {steps: 1}\n")
    write(tmp_path / "y.yaml", "train: {steps: 2}\n")
    exp = write(tmp_path / "e.yaml", "_base_: [x.yaml, y.yaml]\ntrain: {ckpt_every: '${train.steps}'}\n")
    cfg = to_object(load_config(exp))
    assert cfg.train.steps == 2 and cfg.train.ckpt_every == 2


def test_unknown_key_in_file_names_key_file_and_suggestions(tmp_path):
    base = write(tmp_path / "base.yaml", "task: classification\noptim: {layer_decya: 0.7}\n")
    exp = write(tmp_path / "exp.yaml", "_base_: base.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config(exp)
    msg = str(err.value)
    assert "optim.layer_decya" in msg and str(base) in msg and "optim.layer_decay" in msg


def test_misspelt_override_names_command_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(TOY, ["train.stpes=5"])
    msg = str(err.value)
    assert "train.stpes" in msg and "command line" in msg and "train.steps" in msg
    with pytest.raises(ConfigError, match=r"data\.max_tokens_per_imag'.*command line.*data\.max_tokens_per_image"):
        load_config(TOY, ["data.max_tokens_per_imag=5"])


def test_misplaced_key_suggests_full_path():
    with pytest.raises(ConfigError, match=r"did you mean .*train\.grad_accum"):
        load_config(TOY, ["grad_accum=2"])


def test_bad_value_type_is_reported_with_source(tmp_path):
    with pytest.raises(ConfigError, match=r"command line.*train\.steps"):
        load_config(TOY, ["train.steps=many"])
    bad = write(tmp_path / "bad.yaml", "task: classification\ntrain: {precision: [1]}\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_config(bad)


def test_unknown_task_and_missing_task(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown task 'clasification'.*did you mean classification"):
        load_config(TOY, ["task=clasification"])
    with pytest.raises(ConfigError, match="no 'task'"):
        load_config(write(tmp_path / "none.yaml", "seed: 1\n"))


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\ntask: classification\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_config_files_cannot_execute_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = write(tmp_path / "evil.yaml", f"task: classification\nseed: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not a valid config YAML"):
        load_config(evil)
    assert not marker.exists()


@dataclasses.dataclass
class _OtherModel:
    width: int = 3


class _OtherTask(Task):
    """A second task with its own model section, to show sections are per task."""

    ModelConfig = _OtherModel

    def build_model(self): ...
    def build_dataset(self, split): ...
    def collate(self, samples, plan): ...
    def losses(self, outputs, targets, ctx): ...
    def build_evaluator(self): ...


register_task("engine_test_other", _OtherTask)


def test_task_declares_its_own_sections():
    cfg = to_object(load_config(None, ["task=engine_test_other", "model.width=5"]))
    assert isinstance(cfg.model, _OtherModel) and cfg.model.width == 5
    with pytest.raises(ConfigError, match="model.label_smoothing"):
        load_config(None, ["task=engine_test_other", "model.label_smoothing=0.1"])
    assert to_object(load_config(TOY, ["model.label_smoothing=0.1"])).model.label_smoothing == 0.1


def test_saved_yaml_round_trips(tmp_path):
    cfg = load_config(TOY, ["train.steps=7", "optim.lr=1e-4"])
    saved = write(tmp_path / "config.yaml", to_yaml(cfg))
    again = load_config(saved)
    assert again == cfg and to_object(again).optim.lr == 1e-4
