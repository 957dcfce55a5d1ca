"""Start a NaViT from weights on disk: navit_dense checkpoints, timm ViTs (VisionTransformer; Eva:
DINOv3, EVA02, RoPE-ViT axial / mixed, Perception Encoder; NaFlexVit), HF SigLIP2 (NaFlex).

The architecture always comes from the config that built the model (so evaluation never
needs the pretrained file); the file must fit it. When it does not, the error names the
config fields to set, read off the checkpoint (e.g. ``pos_embed: learned2d``,
``pos_embed_grid: 14``, ``class_token: true`` for timm's vit_base_patch16_224; see
configs/_base_/backbones/).

What is loaded is the trunk: patch / position embeddings, prefix tokens, blocks and the final
norm (``norm`` or, for avg-pool checkpoints, ``fc_norm``: the ``fc_norm`` field). MAP pooling and
classifier weights (``head.*``, ``attn_pool.*``) and the mask token are task specific: the source's are skipped unless the model has the same parameters, and the model's
own stay as initialised when the source has none. Both are listed in the returned report.

Files: ``.safetensors``, or a torch checkpoint read with ``weights_only=True`` (a raw state
dict, or one under "state_dict" / "model"); a directory means its ``model.safetensors`` (an
engine checkpoint directory, or a HF ``save_pretrained`` directory).

What a timm file cannot say: RoPE (kind, temperature, grid), head counts (the blocks' unless
qk_norm / mixed RoPE record them; the attention pool's, ``map_num_heads``: 8 for Perception
Encoder core), eps and activation come from the config. A NaFlexVit file's linear patch embedding
(``embeds.proj.weight``) is read in timm's default channels-last patch layout; ``patch_layout``
says otherwise (see weight_import.timm_patch_layout).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import torch

from .navit import NaViT, NaViTConfig
from .weight_import import (
    ADDED_MODULES,
    PATCH_LAYOUTS,
    config_from_siglip2,
    config_from_timm,
    convert_siglip2_state_dict,
    convert_timm_state_dict,
    timm_patch_layout,
)

FORMATS = ("auto", "navit", "timm", "siglip2")
# Task-specific parameters (key prefixes): MAP pooling / classifier weights, and the mask token
# (present only with mask_fill=token). Loaded only where source and model agree exactly.
TASK_SPECIFIC = ("head.", "attn_pool.", "mask_token")
# Fields that describe what a checkpoint's weights compute (the rest are run-time choices).
_ARCH_FIELDS = ("patch_size", "in_chans", "conv_stem", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "qk_norm",
                "init_values", "act", "norm_eps", "pre_norm", "fc_norm", "final_norm", "class_token", "reg_tokens", "no_embed_class",
                "pos_embed", "pos_embed_grid", "pos_embed_mode", "pos_embed_antialias", "mlp_type", "rope", "rope_temperature",
                "rope_rotate_half", "rope_grid_offset", "rope_grid_indexing", "rope_ref_grid", "rope_shift_coords",
                "rope_jitter_coords", "rope_rescale_coords", "map_num_heads")  # fmt: skip
# Of those, what a timm file's tensors do not record: a hint takes the model's own value for them,
# so it never asks to change what the file cannot tell (num_heads: unless qk_norm / rope.freqs give it).
_NOT_IN_TIMM_WEIGHTS = ("act", "norm_eps", "rope_temperature", "rope_rotate_half", "rope_grid_offset", "rope_grid_indexing",
                        "rope_ref_grid", "rope_shift_coords", "rope_jitter_coords", "rope_rescale_coords", "map_num_heads")  # fmt: skip
_SIGNATURES = (  # (format, a key only that format has), first match wins
    ("navit", "patch_embed.convs.0.conv.weight"),  # conv stem: its linear part is patch_embed.proj, as in timm
    ("timm", "patch_embed.proj.weight"),
    ("timm", "embeds.proj.weight"),  # NaFlexVit
    ("siglip2", "embeddings.patch_embedding.weight"),
    ("navit", "patch_embed.weight"),
)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file (see the module docstring); never unpickles arbitrary objects."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        if (path / "model.safetensors").is_file():
            found = [path / "model.safetensors"]
        if len(found) != 1:
            raise FileNotFoundError(f"{path}: expected one model.safetensors (or a single *.safetensors) in the directory, found {[p.name for p in found]}")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickles with arbitrary objects, truncated files, not a checkpoint at all
        raise ValueError(f"{path}: not a readable torch checkpoint (.safetensors, or a state dict loadable with weights_only=True): {e}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a mapping of parameter names to tensors")
    return dict(state)


def detect_format(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> tuple[str, str]:
    """(format, key prefix) of a state dict: the first format whose signature key appears,
    under ``prefix`` if given, else under whatever prefix it has (e.g. "backbone.",
    "vision_model.", "module.")."""
    return _detect(state_dict, prefix)[:2]


def _detect(state_dict: Mapping[str, torch.Tensor], prefix: str) -> tuple[str, str, str]:
    for fmt, signature in _SIGNATURES:
        for key in state_dict:
            if key.endswith(signature) and key.startswith(prefix) and (len(key) == len(signature) or key[-len(signature) - 1] == "."):
                return fmt, key[: -len(signature)], key
    raise ValueError(
        f"cannot tell the format of these weights{f' under prefix {prefix!r}' if prefix else ''}: none of "
        f"{sorted({sig for _, sig in _SIGNATURES})} found (first keys: {sorted(state_dict)[:6]})"
    )


def _architecture_hint(source_cfg: NaViTConfig, model_cfg: NaViTConfig) -> str:
    diff = [f"{f}: {_yaml(getattr(source_cfg, f))}" for f in _ARCH_FIELDS if _differs(f, getattr(source_cfg, f), getattr(model_cfg, f))]
    return f"; the checkpoint's architecture needs model.backbone {{{', '.join(diff)}}}" if diff else ""


def _differs(field: str, source: Any, model: Any) -> bool:
    if field == "init_values":  # a checkpoint's LayerScale values are weights: only having it or not is architecture
        return (source is None) != (model is None)
    return source != model


def _yaml(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _source_config(fmt: str, state_dict: Mapping[str, torch.Tensor], path: Path, model_cfg: NaViTConfig) -> NaViTConfig | None:
    """The NaViTConfig the checkpoint itself describes (for error hints), if it can be read."""
    try:
        if fmt == "timm":
            unrecorded = {f: getattr(model_cfg, f) for f in _NOT_IN_TIMM_WEIGHTS}
            if "rope.freqs" not in state_dict:  # only mixed RoPE has weights
                unrecorded["rope"] = model_cfg.rope
            if not any(k.endswith(("q_norm.weight", "rope.freqs")) for k in state_dict):
                unrecorded["num_heads"] = model_cfg.num_heads
            return config_from_timm(state_dict, **unrecorded)
        config_file = (path if path.is_dir() else path.parent) / "config.json"
        if fmt == "siglip2" and config_file.is_file():
            config = json.loads(config_file.read_text())
            return config_from_siglip2(config.get("vision_config", config))
    except Exception:  # the hint is best effort; the shape error below stays the message
        return None
    return None


def load_pretrained(model: NaViT, path: str | Path, format: str = "auto", prefix: str = "", patch_layout: str = "auto") -> dict:
    """Load weights from ``path`` into ``model`` in place (see the module docstring).

    format: auto | navit | timm | siglip2. prefix: where the NaViT / source keys start in the
    file (auto: found from the format's signature key, e.g. "backbone." in a task checkpoint).
    patch_layout: auto | channels_last | channels_first, the column order of a timm file's linear
    patch embedding (auto: NaFlexVit's default, channels-last; see weight_import.timm_patch_layout).
    Returns a report: path, format, prefix, loaded (number of tensors), skipped_source_keys,
    kept_initialised (model parameters the file has no values for), zero_initialised (the
    ``local_conv`` parameters of a file trained without them: zeroed, so the loaded model computes
    the file's function and the convs learn from there), patch_layout (how a linear
    patch embedding was read; None for a Conv2d one or a non-timm file)."""
    if format not in FORMATS:
        raise ValueError(f"pretrained format {format!r} is not one of {FORMATS}")
    if patch_layout not in PATCH_LAYOUTS:
        raise ValueError(f"pretrained patch_layout {patch_layout!r} is not one of {PATCH_LAYOUTS}")
    path = Path(path)
    raw = read_state_dict(path)
    fmt, found_prefix, signature_key = _detect(raw, prefix)
    if format != "auto" and fmt != format:
        raise ValueError(f"{path}: weights look like {fmt!r} (key {signature_key!r}), not {format!r}")
    # Everything outside the prefix (an optimizer, a text tower, a detector's head) is not ours.
    state = {k[len(found_prefix) :]: v for k, v in raw.items() if k.startswith(found_prefix)}

    model_keys = model.state_dict()
    own_optional = {k for k in model_keys if k.startswith(TASK_SPECIFIC + ADDED_MODULES)}
    source_optional = {k for k in state if k.startswith(TASK_SPECIFIC)}
    trunk = {k: v for k, v in state.items() if k not in source_optional}
    optional = {k: v for k, v in state.items() if k in source_optional}
    layout = None
    if fmt == "navit":
        converted = dict(trunk)
        unexpected = sorted(set(converted) - set(model_keys))
        if unexpected:
            raise ValueError(f"{path}: weights {unexpected[:8]} do not belong to this NaViT (prefix {found_prefix!r})")
        converted.update(optional)
    else:
        trunk_cfg = replace(model.cfg, global_pool="none", num_classes=0)
        try:
            if fmt == "timm":
                layout = timm_patch_layout(trunk, patch_layout)
                converted = convert_timm_state_dict(trunk, trunk_cfg, patch_layout=patch_layout)  # target shapes from a meta-device NaViT
            else:
                converted = convert_siglip2_state_dict(trunk, trunk_cfg)
        except (ValueError, KeyError, RuntimeError) as e:  # RuntimeError: a reshape to the wrong grid
            source_cfg = _source_config(fmt, trunk, path, model.cfg)
            hint = _architecture_hint(source_cfg, model.cfg) if source_cfg is not None else ""
            raise ValueError(f"{path}: {fmt} weights do not fit model.backbone ({e}){hint}") from None
        if fmt == "timm":  # same names in NaViT: usable where the model has identical heads
            converted.update(optional)
    # A task-specific tensor is taken only if the model has the very same one (name and shape).
    shapes_ok = {k: v for k, v in converted.items() if k in model_keys and v.shape == model_keys[k].shape}
    bad = sorted(k for k in set(converted) - set(shapes_ok) if not k.startswith(TASK_SPECIFIC))
    if bad:
        raise ValueError(f"{path}: shapes do not fit model.backbone: " + ", ".join(
            f"{k} {tuple(converted[k].shape)} vs {tuple(model_keys[k].shape)}" for k in bad[:8]))  # fmt: skip
    missing = sorted(set(model_keys) - set(shapes_ok) - own_optional)
    if missing:
        raise ValueError(f"{path}: no values for {missing[:8]}{' ...' if len(missing) > 8 else ''} (prefix {found_prefix!r})")
    model.load_state_dict(shapes_ok, strict=False)
    zeroed = model.zero_added_modules(set(model_keys) - set(shapes_ok))
    return {
        "path": str(path),
        "format": fmt,
        "prefix": found_prefix,
        "loaded": len(shapes_ok),
        "skipped_source_keys": sorted(source_optional - set(shapes_ok)),
        "kept_initialised": sorted(set(model_keys) - set(shapes_ok) - set(zeroed)),
        "zero_initialised": sorted(zeroed),
        "patch_layout": layout,
    }



def with_pretrained(model: NaViT, path: str | Path = "", format: str = "auto", prefix: str = "", patch_layout: str = "auto") -> NaViT:
    """``model`` loaded from ``path`` by :func:`load_pretrained` (unchanged when path is empty):
    for configs that build objects by calling functions (detectron2 LazyConfig)."""
    if path:
        load_pretrained(model, path, format, prefix, patch_layout)
    return model
