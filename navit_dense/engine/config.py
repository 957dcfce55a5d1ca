"""Experiment configs: YAML files with ``_base_`` inheritance and dotted command-line
overrides, checked against typed dataclasses (OmegaConf structured configs).

The schema of a config depends on its ``task``: the engine owns ``optim``/``train`` and the
common packing fields of ``data``; each registered task supplies the dataclasses used for
``model`` and ``data`` (subclasses of :class:`ModelConfig` / :class:`DataConfig`).

Config files are data only: they are read with ``yaml.safe_load`` and no resolvers are
registered, so nothing in a file can run code.
"""

from __future__ import annotations

import difflib
import types
from dataclasses import MISSING as MISSING_FIELD
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..data import ResolutionSampler, TokenDrop
from ..models import NaViTConfig
from .registry import get_task, task_names

CLI = "command line"


def _where(source: str) -> str:
    return "on the command line" if source == CLI else f"in {source}"


class ConfigError(ValueError):
    pass


# ---- schema ---------------------------------------------------------------------------------
@dataclass
class BackboneInitConfig:
    """Weights to start from (fine-tuning); empty path = random init. See
    navit_dense.models.pretrained: the file must fit the architecture this config describes."""

    path: str = ""  # .safetensors / torch state dict / checkpoint or save_pretrained directory
    format: str = "auto"  # auto | navit | timm | siglip2
    prefix: str = ""  # where the backbone's keys start in the file; empty = found from the format


def config_schema(target: type, name: str, *, optional: bool = False, defaults: dict | None = None, exclude: tuple[str, ...] = (),
                  bases: tuple[type, ...] = (), extra: list[tuple] = ()) -> type:  # fmt: skip
    """A structured-config dataclass with the fields of the dataclass ``target`` it configures,
    so a field added there is settable from YAML without a hand-written mirror. Types become
    what OmegaConf accepts (``X | None`` -> Optional[X], tuples -> lists). ``optional``: every
    field defaults to None, meaning "keep the target's own default". ``bases`` contribute
    leading fields and methods, ``extra`` trailing (name, type, field) entries."""
    hints = get_type_hints(target)
    out = []
    for f in fields(target):
        if f.name in exclude or not f.init:
            continue
        kind = _omegaconf_type(hints[f.name])
        if optional:
            out.append((f.name, Optional[kind], field(default=None)))
        elif f.name in (defaults or {}):
            out.append((f.name, kind, field(default=defaults[f.name])))
        elif f.default_factory is not MISSING_FIELD:
            out.append((f.name, kind, field(default_factory=f.default_factory)))
        else:
            value = f.default
            out.append((f.name, kind, field(default_factory=lambda v=value: list(v)) if isinstance(value, tuple) else field(default=value)))
    cls = make_dataclass(name, [*out, *extra], bases=bases)
    cls.__doc__ = f"Configures {target.__module__}.{target.__qualname__} (fields generated from it). " + (bases[0].__doc__ or "" if bases else "")
    return cls


def _omegaconf_type(kind: Any) -> Any:
    origin, args = get_origin(kind), get_args(kind)
    if origin in (Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return Optional[_omegaconf_type(rest[0])] if len(rest) == 1 else Any
    if origin is tuple:
        return list[_omegaconf_type(args[0])] if args else list
    if origin is list:
        return list[_omegaconf_type(args[0])] if args else list
    return kind


@dataclass
class _NamedBackbone:
    """A named NaViT (navit_ti16 | navit_s16 | navit_b16 | navit_l16); fields left at None
    keep the named model's value (see navit_dense.models.NaViTConfig)."""

    name: str = "navit_ti16"

    def overrides(self) -> dict[str, Any]:
        """build_backbone keyword arguments: every architecture field that is set."""
        skip = {"name", "init"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip and getattr(self, f.name) is not None}


BackboneConfig = config_schema(NaViTConfig, "BackboneConfig", optional=True, bases=(_NamedBackbone,),
                               extra=[("init", BackboneInitConfig, field(default_factory=BackboneInitConfig))])  # fmt: skip


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)


@dataclass
class _Switch:
    """Off unless ``enabled``."""

    enabled: bool = False


# Patch n' Pack token dropping during training; mode none disables it.
TokenDropConfig = config_schema(TokenDrop, "TokenDropConfig", defaults={"mode": "none"})
# Per-image token budget sampled each epoch; its multiple is the model's patch size.
ResolutionConfig = config_schema(ResolutionSampler, "ResolutionConfig", exclude=("multiple",), bases=(_Switch,))


@dataclass
class DataConfig:
    max_tokens_per_image: int = 256  # patch budget of one image (before token dropping)
    seq_len: int = 1024  # capacity of one packed sequence
    tokens_per_batch: int = 4096  # GLOBAL tokens per micro-batch, summed over all ranks
    eval_tokens_per_batch: int = 0  # 0: same as tokens_per_batch
    packing: str = "balanced"  # see navit_dense.data.PACKING_ALGORITHMS
    max_images_per_seq: int = 0  # 0: no limit; 1: packing off (each image its own sequence, padded to the longest)
    max_side: Optional[int] = None  # cap on the longer side in pixels when packing (the resolution sweeps set it)
    num_workers: int = 0
    # Pack un-normalized pixels as uint8 patches, normalized on the device by the model (4x
    # fewer bytes to pin and copy; tasks that support it: detection, segmentation).
    # null (auto): on when the run's device is CUDA.
    uint8_patches: Optional[bool] = None
    token_drop: TokenDropConfig = field(default_factory=TokenDropConfig)
    resolution: ResolutionConfig = field(default_factory=ResolutionConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate of the last layer (heads)
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    layer_decay: float = 1.0  # layer-wise lr decay; 1.0 disables it
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine ends at lr * min_lr_ratio
    clip_grad: float = 0.0  # max global grad norm; 0 disables clipping


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step
    precision: str = "fp32"  # fp32 | bf16 (autocast, CPU and CUDA) | fp16 (autocast + GradScaler, CUDA only)
    ema_decay: float = 0.0  # 0 disables the weight EMA; evaluation uses the EMA when enabled
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    ckpt_every: int = 500
    keep_last: int = 3  # step checkpoints kept (best is kept separately)
    best_metric: str = ""  # evaluator metric selecting the `best` checkpoint; empty disables it
    best_mode: str = "max"  # max | min
    max_consecutive_nonfinite: int = 5  # stop after this many skipped NaN/inf steps in a row
    deterministic: bool = True  # torch.use_deterministic_algorithms (warn only)
    find_unused_parameters: bool = False  # DDP option, for heads that skip parameters on some steps
    # DDP: longest wait in a collective (gradient all-reduce, barrier, rank 0's evaluation merge)
    # before the run stops with an error, e.g. when another rank was stopped or hangs.
    collective_timeout_s: float = 1800.0
    device: str = "auto"  # auto | cpu | cuda
    # CPU runs on glibc: fix malloc's mmap / trim thresholds so freed activation buffers stay
    # in the heap instead of coming back as page faults every step (demo step 3-7% faster; the
    # process keeps its peak heap). utils/cpu_malloc.py; glibc's MALLOC_*_ variables win.
    cpu_malloc_tuning: bool = True


@dataclass
class Config:
    task: str = MISSING
    seed: int = 0
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def schema_for(task_name: str) -> type:
    """The Config dataclass of one task: its own model/data sections replace the generic ones."""
    task = get_task(task_name)
    return make_dataclass(
        "Config",
        [
            ("model", task.ModelConfig, field(default_factory=task.ModelConfig)),
            ("data", task.DataConfig, field(default_factory=task.DataConfig)),
        ],
        bases=(Config,),
    )


# ---- loading --------------------------------------------------------------------------------
def _read_chain(path: Path, stack: tuple[Path, ...] = ()) -> list[tuple[str, dict]]:
    """[(source, mapping)] for a file and its bases, bases first (each is merged in this order)."""
    path = path.resolve()
    if path in stack:
        raise ConfigError(f"_base_ cycle: {' -> '.join(str(p) for p in (*stack, path))}")
    if not path.is_file():
        where = f" (a _base_ of {stack[-1]})" if stack else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:  # includes python/object tags, which safe_load refuses
        raise ConfigError(f"{path}: not a valid config YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("_base_", [])
    chain: list[tuple[str, dict]] = []
    for base in [bases] if isinstance(bases, str) else bases:
        chain += _read_chain(path.parent / base, (*stack, path))
    return chain + [(str(path), data)]


def parse_overrides(items: list[str]) -> dict:
    """["a.b=1", "c=[1, 2]"] -> {"a": {"b": 1}, "c": [1, 2]}; values are parsed as YAML."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} on the {CLI} is not of the form key.path=value")
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} on the {CLI} conflicts with an earlier override of {part!r}")
        try:
            node[leaf] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r} on the {CLI}: value is not valid YAML: {e}") from None
    return out


def _all_keys(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in node.keys():
        keys.append(prefix + str(key))
        child = node._get_node(key)
        if isinstance(child, DictConfig) and is_dataclass(OmegaConf.get_type(child)):
            keys += _all_keys(child, f"{prefix}{key}.")
    return keys


def _check_keys(data: dict, node: DictConfig, source: str, root: DictConfig, prefix: str = "") -> None:
    """Unknown keys are errors naming the key, where it came from, and the closest valid keys."""
    for key, value in data.items():
        path = prefix + str(key)
        if key not in node.keys():  # `in node` is False for MISSING values
            close = difflib.get_close_matches(str(key), [str(k) for k in node.keys()], n=3, cutoff=0.5)
            hints = [prefix + c for c in close] or difflib.get_close_matches(path, _all_keys(root), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(hints)}?" if hints else f"; valid keys here: {', '.join(map(str, node.keys()))}"
            raise ConfigError(f"unknown config key '{path}' {_where(source)}{hint}")
        child = node._get_node(key)
        if isinstance(value, dict) and isinstance(child, DictConfig) and is_dataclass(OmegaConf.get_type(child)):
            _check_keys(value, child, source, root, path + ".")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> DictConfig:
    """Resolve a config file (and its bases) plus ``key=value`` overrides into a typed,
    read-only DictConfig."""
    chain = _read_chain(Path(path)) if path else []
    chain.append((CLI, parse_overrides(list(overrides))))
    task = next((d["task"] for _, d in reversed(chain) if "task" in d), None)
    if not task:
        raise ConfigError(f"no 'task' set in {path or CLI}; registered tasks: {', '.join(task_names()) or '(none: import navit_dense.tasks)'}")
    try:
        schema = schema_for(task)
    except KeyError as e:
        source = next(s for s, d in reversed(chain) if d.get("task") == task)
        raise ConfigError(f"{_where(source)}: {e.args[0]}") from None
    cfg = OmegaConf.structured(schema)
    for source, data in chain:
        _check_keys(data, cfg, source, cfg)
        try:
            cfg = OmegaConf.merge(cfg, data)
        except OmegaConfBaseException as e:
            raise ConfigError(f"invalid value {_where(source)}: {str(e).splitlines()[0]} (key {e.full_key})") from None
    try:
        OmegaConf.resolve(cfg)  # interpolations like ${train.steps}; no custom resolvers exist
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve {e.full_key}: {str(e).splitlines()[0]}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"required config keys not set: {', '.join(missing)}")
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_object(cfg: DictConfig) -> Config:
    """The typed dataclass instance the engine and tasks read."""
    return OmegaConf.to_object(cfg)


def to_yaml(cfg: DictConfig | Config) -> str:
    return OmegaConf.to_yaml(cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg), resolve=True)


def diff_configs(a: DictConfig, b: DictConfig) -> list[str]:
    """Dotted keys whose values differ (for warning when a resumed run changed its config)."""
    flat_a, flat_b = _flatten(OmegaConf.to_container(a)), _flatten(OmegaConf.to_container(b))
    return sorted(k for k in flat_a.keys() | flat_b.keys() if flat_a.get(k) != flat_b.get(k))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {prefix + str(k): v})
    return out


def option_help() -> str:
    """'section.key=default' lines for the engine-owned keys (the --help of tools/*.py);
    each task adds its own model/data keys (see its config dataclasses)."""
    lines = []

    def walk(obj, prefix: str) -> None:
        for f in fields(obj):
            value = getattr(obj, f.name)
            if is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            elif f.name != "task":
                lines.append(f"  {prefix}{f.name}={value}")

    walk(Config(), "")
    return "\n".join(lines)
