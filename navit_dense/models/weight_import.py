"""Import pretrained ViT weights into NaViT: timm ``VisionTransformer``, HF ``Siglip2VisionModel``
and HF CLIP-style vision towers (CLIP, OWL-ViT, OWLv2).

Both converters work in two steps, so a checkpoint can be converted without building the
source model: ``config_from_*`` reads the architecture (from the model object, or from
state-dict shapes plus keyword overrides), ``convert_*_state_dict`` renames and reshapes the
tensors. ``navit_from_*`` does both and loads the result strictly: every NaViT tensor must be
produced (only the NaViT-specific ``mask_token`` keeps its init) and every source tensor must
be used, so a feature NaViT cannot express fails loudly instead of being dropped.

Layouts:
- timm patch embedding is a Conv2d [D, C, P, P]; flattening it gives our (c, py, px) patches.
- timm NaFlexVit (``embeds.*``) embeds patches with a Linear [D, P*P*C] over patches flattened
  (py, px, c) (its default ``patchify_channels_last=True``); its columns are permuted. The
  layout is not recorded in a file: ``patch_layout`` states it where it is not timm's default.
- HF SigLIP2 (NaFlex) embeds patches flattened (py, px, c); its columns are permuted.
- Absolute position tables become our ``learned2d`` grid, resized per image like the source
  does it (timm: bicubic + antialias, SigLIP2: bilinear + antialias).
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, Mapping

import torch
import torch.nn as nn

from .navit import NaViT, NaViTConfig

_ALLOWED_MISSING = {"mask_token"}  # NaViT-only parameter, no counterpart in any source
# NaViT-only modules added to an imported trunk; zero-initialised on import (see _load).
ADDED_MODULES = ("local_convs.",)


# ---- shared helpers ----------------------------------------------------------------------
def _mlp_ratio(hidden: int, dim: int) -> float:
    """A ratio with int(dim * ratio) == hidden (NaViT's Mlp sizing); hidden / dim can round down."""
    ratio = hidden / dim
    if int(dim * ratio) != hidden:
        ratio = (hidden + 0.5) / dim
    return ratio


def _make_config(found: dict[str, Any], overrides: Mapping[str, Any]) -> NaViTConfig:
    valid = {f.name for f in fields(NaViTConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise TypeError(f"unknown NaViTConfig option(s) {unknown}; valid options: {sorted(valid)}")
    merged = {**found, **overrides}
    if "out_indices" in merged:
        merged["out_indices"] = tuple(merged["out_indices"])
    if merged.get("global_pool") == "token" and not merged.get("class_token"):
        raise ValueError("unsupported: global_pool='token' without a class token (no class token with 'token' pool)")
    return NaViTConfig(**merged)


def _expected_shapes(cfg: NaViTConfig, reference: NaViT | None) -> dict[str, torch.Size]:
    if reference is None:  # shapes only: no memory, no initialisation
        with torch.device("meta"):
            reference = NaViT(cfg)
    elif reference.cfg != cfg:
        raise ValueError("reference model was built from a different config")
    return {k: v.shape for k, v in reference.state_dict().items()}


def _finish(out: dict[str, torch.Tensor], expected: dict[str, torch.Size], source: str) -> dict[str, torch.Tensor]:
    """Zero-fill Linear biases the source was built without (bias=False is the same map as a
    zero bias), then check every NaViT tensor is present with the right shape."""
    for key, shape in expected.items():
        if key not in out and key.endswith(".bias") and key[: -len("bias")] + "weight" in out:
            out[key] = torch.zeros(shape, dtype=out[key[: -len("bias")] + "weight"].dtype)
    missing = sorted(k for k in set(expected) - set(out) - _ALLOWED_MISSING if not k.startswith(ADDED_MODULES))
    if missing:
        raise ValueError(f"{source} checkpoint lacks weights NaViT needs for this config: {missing}")
    bad = [
        f"{k}: {tuple(v.shape)} vs NaViT {tuple(expected[k])}"
        for k, v in out.items()
        if k in expected and v.shape != expected[k]
    ]
    if bad:
        raise ValueError(f"{source} weights do not fit the NaViT config: {bad}")
    return out


def _load(model: NaViT, state_dict: dict[str, torch.Tensor]) -> NaViT:
    result = model.load_state_dict(state_dict, strict=False)
    model.zero_added_modules(result.missing_keys)
    missing = {k for k in result.missing_keys if not k.startswith(ADDED_MODULES)} - _ALLOWED_MISSING
    if missing or result.unexpected_keys:
        unexpected = sorted(result.unexpected_keys)
        raise ValueError(f"weight import mismatch: missing {sorted(missing)}, unexpected {unexpected}")
    return model.eval()


# ---- timm VisionTransformer ----------------------------------------------------------------
# Source keys NaViT has no place for, with the timm feature they belong to (for error messages).
_TIMM_KEY_HINTS = {
    "rope": "rotary position embeddings (rope)",
    "rope.freqs": "learned per-block RoPE frequencies (rope: mixed)",
    "fc1_g": "SwiGLU / GLU MLP",
    "fc1_x": "SwiGLU / GLU MLP",
    "w12": "SwiGLU MLP",
    "mlp.norm": "MLP inner norm (scale_mlp_norm)",
    "attn.norm": "attention inner norm (scale_attn_norm)",
    "patch_embed.norm": "patch-embedding norm (embed_norm_layer)",
    "embeds.norm": "NaFlex embedding norm (embed_norm_layer / input_norm_layer)",
    "dist_token": "distillation token (DeiT distilled)",
    "head_dist": "distillation head (DeiT distilled)",
    "attn_pool.pos_embed": "attention-pool position embedding",
    "attn_pool.q_norm": "attention-pool qk norm",
    "lambda": "differential attention",
    "gamma_1": "EVA/BEiT-style block (these checkpoints often use rope)",
    "q_bias": "EVA/BEiT-style split q/v bias",
}
_TIMM_ACTS = {"GELU": "gelu", "GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu"}


def _timm_act(act: nn.Module) -> str | None:
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    return _TIMM_ACTS.get(type(act).__name__)


def _is_identity(m: nn.Module | None) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _attn_gated(blocks: nn.ModuleList, problems: list[str]) -> bool:
    """Whether every block has timm's attention output gate (``gated`` / ``attn_gated``: NaViT's
    attn_gated, the same Linear named ``attn.gate``, its bias present iff the qkv bias is)."""
    attns = [getattr(b, "attn", None) for b in blocks]  # other block types are reported by the caller
    gates = [getattr(a, "gate", None) for a in attns]
    if any(g is None for g in gates) and any(g is not None for g in gates):
        problems.append("gated attention in some blocks only")
    qkv_bias = [getattr(getattr(a, "qkv", None), "bias", None) is not None or getattr(a, "q_bias", None) is not None for a in attns]
    if any(g is not None and (g.bias is not None) != q for g, q in zip(gates, qkv_bias)):
        problems.append("an attention gate whose bias differs from the qkv bias")
    return gates[0] is not None


def _timm_trunk_fields(model: nn.Module, mlp_hidden: int, patch_size: int, in_chans: int) -> dict[str, Any]:
    """The sizes every timm ViT-family model states the same way."""
    return dict(patch_size=patch_size, in_chans=in_chans, embed_dim=model.embed_dim, depth=len(model.blocks),
                num_heads=model.blocks[0].attn.num_heads, mlp_ratio=_mlp_ratio(mlp_hidden, model.embed_dim))  # fmt: skip


def _eva_model_fields(model: nn.Module, pooled: bool = True) -> dict[str, Any]:
    """Architecture of a timm Eva (EVA02, DINOv3, Perception Encoder, RoPE-ViT axial and mixed);
    raises naming every feature NaViT lacks. RoPE is carried over as NaViT's own (timm's modules,
    same arguments; mixed RoPE's learned frequencies are the weight ``rope.freqs``); Eva's
    q/v-only bias becomes a qkv bias whose k part is zero. ``pooled=False``: the trunk only
    (global_pool "none"), so the pooling head is not checked."""
    from timm.layers import GluMlp, Mlp, PatchEmbed
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, RotaryEmbeddingDinoV3, RotaryEmbeddingMixed
    from timm.models.eva import EvaBlock

    problems: list[str] = []
    pe, blk = model.patch_embed, model.blocks[0]
    if type(pe) is not PatchEmbed or not isinstance(pe.proj, nn.Conv2d) or pe.patch_size[0] != pe.patch_size[1] or not _is_identity(pe.norm):
        problems.append("patch embedding other than square, non-overlapping, norm-free PatchEmbed")
    for i, b in enumerate(model.blocks):
        if type(b) is not EvaBlock:
            problems.append(f"block type {type(b).__name__} (blocks.{i}: post-norm blocks)")
            break
        a = b.attn
        if getattr(a, "qkv", None) is None:
            problems.append("separate q / k / v projections (qkv_fused=False)")
        if not _is_identity(a.norm):
            problems.append("attention inner norm (scale_attn_inner)")
        if not (_is_identity(a.q_norm) and _is_identity(a.k_norm)):
            problems.append("qk norm inside Eva attention")
        if getattr(a, "num_kv_heads", a.num_heads) != a.num_heads:
            problems.append("grouped-query attention (num_kv_heads)")
        glu = type(b.mlp) is GluMlp and isinstance(b.mlp.act, nn.SiLU) and not b.mlp.gate_last
        if type(b.mlp) is not Mlp and not glu:
            problems.append(f"MLP {type(b.mlp).__name__} (supported: Mlp, Eva's SiLU GluMlp)")
            break
        if not _is_identity(b.mlp.norm):
            problems.append("MLP inner norm (scale_mlp)")
        if (b.gamma_1 is None) != (b.gamma_2 is None):
            problems.append("LayerScale on the attention branch only")
    rope = model.rope
    if rope is None:
        kind, rope_fields = "none", {}
    elif type(rope) in (RotaryEmbeddingCat, RotaryEmbeddingDinoV3):
        kind = "cat" if type(rope) is RotaryEmbeddingCat else "dinov3"
        if kind == "cat" and (rope.in_pixels or rope.linear_bands or rope.grid_type != "index"):
            problems.append("axial RoPE in pixel units, linear bands or a non-index grid")
        if kind == "dinov3" and (rope.normalize_coords != "separate" or rope.min_period is not None or rope.max_period is not None):
            problems.append("DINOv3 RoPE with non-default coordinate normalization or periods")
        ref = getattr(rope, "ref_feat_shape", None)
        if ref is not None and ref[0] != ref[1]:
            problems.append(f"non-square RoPE reference grid {tuple(ref)}")
        rope_fields = dict(rope_temperature=float(rope.temperature), rope_rotate_half=bool(blk.attn.rotate_half),
                           rope_grid_offset=float(rope.grid_offset), rope_grid_indexing=rope.grid_indexing,
                           rope_ref_grid=int(ref[0]) if ref is not None else 0, rope_shift_coords=rope.shift_coords,
                           rope_jitter_coords=rope.jitter_coords, rope_rescale_coords=rope.rescale_coords)  # fmt: skip
    elif type(rope) is RotaryEmbeddingMixed:
        kind = "mixed"
        if any(b.attn.rotate_half for b in model.blocks) or tuple(rope.freqs.shape[1:3]) != (len(model.blocks), blk.attn.num_heads):
            problems.append(f"mixed RoPE with rotate-half channels or frequencies {tuple(rope.freqs.shape)} not per block and head")
        rope_fields = dict(rope_temperature=float(rope.temperature), rope_rotate_half=False, rope_grid_indexing=rope.grid_indexing,
                           rope_shift_coords=rope.shift_coords, rope_jitter_coords=rope.jitter_coords,
                           rope_rescale_coords=rope.rescale_coords)  # fmt: skip
    else:
        problems.append(f"rotary embedding {type(rope).__name__} (multimodal / other rotary embeddings)")
    pool = model.global_pool
    if pool not in ("token", "avg", "map"):
        problems.append(f"global_pool={pool!r} on an Eva model (supported: token, avg, map)")
    ap = getattr(model, "attn_pool", None)
    act = _timm_act(blk.mlp.act) if type(blk.mlp) is Mlp else "gelu"  # a GLU block's SiLU gate is fixed
    if act is None:
        problems.append(f"activation {type(blk.mlp.act).__name__}")
    if pooled and pool == "map":
        fc1 = getattr(blk.mlp, "fc1", None)
        hidden = fc1.out_features // (2 if type(blk.mlp) is not Mlp else 1) if fc1 is not None else None
        if (type(ap).__name__ != "AttentionPoolLatent" or ap.latent_len != 1 or ap.pos_embed is not None
                or not (_is_identity(ap.q_norm) and _is_identity(ap.k_norm)) or ap.mlp is None):  # fmt: skip
            problems.append("attention pool other than one latent with an MLP and no qk norm / position embedding")
        elif ap.norm.eps != blk.norm1.eps or ap.mlp.fc1.out_features != hidden or _timm_act(ap.mlp.act) != act or \
                (ap.kv.bias is not None) != (blk.attn.qkv.bias is not None or getattr(blk.attn, "q_bias", None) is not None):  # fmt: skip
            problems.append("attention pool whose norm eps, MLP width / activation or qkv bias differ from the blocks' "
                            "(NaViT's MAP head shares them)")  # fmt: skip
    reg = model.reg_token.shape[1] if getattr(model, "reg_token", None) is not None else 0
    grid = pe.grid_size
    pos = model.pos_embed
    gated = _attn_gated(model.blocks, problems)
    if pos is not None and grid[0] != grid[1]:
        problems.append(f"non-square position grid {tuple(grid)}")
    if problems:
        raise ValueError(f"unsupported timm {type(model).__name__} feature(s): " + "; ".join(dict.fromkeys(problems)))
    norms = [m for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    is_glu = type(blk.mlp) is not Mlp
    return dict(
        **_timm_trunk_fields(model, blk.mlp.fc1.out_features // (2 if is_glu else 1), pe.patch_size[0], pe.proj.in_channels),
        mlp_type="glu" if is_glu else "mlp",
        qkv_bias=blk.attn.qkv.bias is not None or getattr(blk.attn, "q_bias", None) is not None,
        attn_gated=gated,
        init_values=1.0 if blk.gamma_1 is not None else None,  # value is overwritten by the weights
        act=act,
        norm_eps=norms[0].eps if norms else 1e-6,
        pre_norm=not _is_identity(model.norm_pre),
        class_token=model.cls_token is not None,
        reg_tokens=reg,
        no_embed_class=pos is not None and pos.shape[1] == grid[0] * grid[1],
        pos_embed="learned2d" if pos is not None else "none",
        pos_embed_grid=grid[0],
        pos_embed_mode="bicubic",
        pos_embed_antialias=True,
        rope=kind,
        **rope_fields,
        global_pool=pool if pooled else "none",
        fc_norm=not _is_identity(model.fc_norm),
        # timm's Eva has either a final norm or fc_norm; with neither (PE spatial / lang) features are the last block's output
        final_norm=not _is_identity(model.norm) or not _is_identity(model.fc_norm),
        map_include_prefix=True,  # Eva's attention pool sees every token
        # Perception Encoder core (vit_pe_core_*) pools with 8 heads over blocks with their own count
        map_num_heads=ap.num_heads if pooled and pool == "map" and ap.num_heads != blk.attn.num_heads else 0,
        num_classes=model.head.out_features if isinstance(model.head, nn.Linear) else 0,
    )


def _naflex_model_fields(model: nn.Module) -> dict[str, Any]:
    """Architecture of a timm NaFlexVit: a linear patch embedding (channels-last patches are
    permuted on import), a learned position grid resized per image (or a factorized one, read
    at fractional coordinates as NaFlex resizes it), plain ViT blocks, or the Eva blocks NaFlexVit
    builds for gated attention (``attn_gated``, without RoPE: Eva's q / v bias, gamma LayerScale)."""
    from timm.layers import Mlp
    from timm.layers.attention import Attention
    from timm.models.eva import EvaAttention, EvaBlock
    from timm.models.vision_transformer import Block

    problems: list[str] = []
    e, blk = model.embeds, model.blocks[0]
    if not e.is_linear or e.norm_input is not None or e.patch_size[0] != e.patch_size[1]:
        problems.append("a NaFlex patch embedding other than linear, square and norm-free")
    if e.pos_embed_type not in ("learned", "factorized") or e.pos_embed_ar_preserving or e.pos_embed_use_grid_sample:
        problems.append(f"position embedding {e.pos_embed_type!r} (ar_preserving / grid_sample variants)")
    for i, b in enumerate(model.blocks):
        eva = type(b) is EvaBlock and type(b.attn) is EvaAttention and b.attn.qkv is not None
        if not (eva or type(b) is Block and type(b.attn) is Attention) or type(b.mlp) is not Mlp:
            problems.append(f"blocks.{i}: {type(b).__name__} / {type(b.attn).__name__} / {type(b.mlp).__name__} "
                            "(supported: ViT Block, Attention, Mlp; EvaBlock, fused-qkv EvaAttention without RoPE)")  # fmt: skip
            break
        if not (_is_identity(b.attn.norm) and _is_identity(b.mlp.norm)):
            problems.append("attention / MLP inner norms")
        if eva and (b.gamma_1 is None) != (b.gamma_2 is None):
            problems.append("LayerScale on the attention branch only")
    gated = _attn_gated(model.blocks, problems)
    pool = model.global_pool
    if pool not in ("token", "avg", "map", ""):
        problems.append(f"global_pool={pool!r}")
    ap = getattr(model, "attn_pool", None)
    if ap is not None and (ap.latent_len != 1 or ap.pos_embed is not None or ap.mlp is None or not isinstance(ap.q, nn.Linear)
                           or not (_is_identity(ap.q_norm) and _is_identity(ap.k_norm))):  # fmt: skip
        problems.append("attention pool other than one latent with q projection and MLP, no qk norm / position embedding")
    grid = e.pos_embed_grid_size
    if grid is not None and grid[0] != grid[1]:
        problems.append(f"non-square position grid {tuple(grid)}")
    if problems:
        raise ValueError("unsupported timm NaFlexVit feature(s): " + "; ".join(dict.fromkeys(problems)))
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    return dict(
        **_timm_trunk_fields(model, blk.mlp.fc1.out_features, e.patch_size[0], e.in_chans),
        qkv_bias=blk.attn.qkv.bias is not None or getattr(blk.attn, "q_bias", None) is not None,
        qk_norm=not _is_identity(blk.attn.q_norm),
        attn_gated=gated,
        # value is overwritten by the weights
        init_values=1.0 if not _is_identity(getattr(blk, "ls1", None)) or getattr(blk, "gamma_1", None) is not None else None,
        act=_timm_act(blk.mlp.act),
        norm_eps=norms[0].eps if norms else 1e-6,
        pre_norm=not _is_identity(model.norm_pre),
        class_token=e.has_class_token,
        reg_tokens=e.num_reg_tokens,
        no_embed_class=True,  # NaFlex adds positions to patch tokens only
        pos_embed="learned2d" if e.pos_embed_type == "learned" else "fractional",
        pos_embed_grid=grid[0],
        pos_embed_mode=e.pos_embed_interp_mode,
        pos_embed_antialias=bool(e.pos_embed_antialias),
        global_pool=pool or "none",
        fc_norm=not _is_identity(model.fc_norm),
        final_norm=not _is_identity(model.norm) or not _is_identity(model.fc_norm),
        map_include_prefix=bool(model.pool_include_prefix),
        # attn_pool_num_heads: a pool with its own head count (0: the blocks')
        map_num_heads=ap.num_heads if ap is not None and ap.num_heads != blk.attn.num_heads else 0,
        num_classes=model.head.out_features if isinstance(model.head, nn.Linear) else 0,
    )


# Patch layouts of a linear patch embedding: how its input columns flatten a patch.
PATCH_LAYOUTS = ("auto", "channels_last", "channels_first")
_LAYOUT_HELP = ("patch_layout='channels_last' (patches flattened (py, px, c): timm NaFlexVit's default "
                "patchify_channels_last=True) or 'channels_first' ((c, py, px): patchify_channels_last=False)")  # fmt: skip


def is_naflex_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether tensors are named like a timm NaFlexVit's (patch embedding ``embeds.proj.weight``)."""
    return "embeds.proj.weight" in state_dict


def timm_patch_layout(state_dict: Mapping[str, torch.Tensor], patch_layout: str = "auto") -> str | None:
    """How the columns of a timm-family file's linear patch embedding flatten a patch, or None
    when the embedding is a Conv2d (whose layout is its own). ``auto``: a NaFlexVit linear
    embedding (``embeds.proj.weight`` [D, P*P*C]) is read as timm's default, channels-last
    (every ``naflexvit_*`` model); a linear embedding anywhere else cannot be told and needs
    ``patch_layout``."""
    if patch_layout not in PATCH_LAYOUTS:
        raise ValueError(f"patch_layout {patch_layout!r} is not one of {PATCH_LAYOUTS}")
    key = "embeds.proj.weight" if is_naflex_state_dict(state_dict) else "patch_embed.proj.weight"
    w = state_dict.get(key)
    if w is None or w.dim() != 2:
        return None
    if patch_layout != "auto":
        return patch_layout
    if key == "embeds.proj.weight":
        return "channels_last"
    raise ValueError(f"{key} {tuple(w.shape)} is a Linear over flattened patches whose column order the file does not "
                     f"record: pass {_LAYOUT_HELP}")  # fmt: skip


def _naflex_state_dict(sd: Mapping[str, torch.Tensor], patch_size: int | None, in_chans: int, patch_layout: str = "auto") -> dict[str, torch.Tensor]:
    """NaFlexVit tensor names -> timm VisionTransformer names (what convert_timm_state_dict reads):
    a linear patch embedding becomes the Conv2d weight [D, C, P, P] it equals (columns read in
    ``patch_layout``, see timm_patch_layout), ``embeds.*`` tokens / tables lose their prefix.
    ``patch_size`` None: read from the weight's width and ``in_chans``."""
    layout = timm_patch_layout(sd, patch_layout)
    sd = dict(sd)
    w = sd.pop("embeds.proj.weight")
    if w.dim() == 2:
        D, K, C = w.shape[0], w.shape[1], in_chans
        P = patch_size if patch_size else math.isqrt(K // C)
        if P * P * C != K:
            raise ValueError(f"NaFlex embeds.proj.weight {tuple(w.shape)} does not take patch_size x patch_size x in_chans "
                             f"= {P} x {P} x {C} inputs: set patch_size / in_chans to the checkpoint's")  # fmt: skip
        # columns flattened (py, px, c) or (c, py, px); NaViT's are (c, py, px)
        w = w.reshape(D, P, P, C).permute(0, 3, 1, 2) if layout == "channels_last" else w.reshape(D, C, P, P)
    out = {"patch_embed.proj.weight": w}
    D = w.shape[0]
    if "embeds.proj.bias" in sd:
        out["patch_embed.proj.bias"] = sd.pop("embeds.proj.bias")
    for key in ("cls_token", "reg_token"):
        if f"embeds.{key}" in sd:
            out[key] = sd.pop(f"embeds.{key}")
    if "embeds.pos_embed" in sd:
        table = sd.pop("embeds.pos_embed")  # [1, H, W, D]
        if table.dim() != 4 or table.shape[1] != table.shape[2]:
            raise ValueError(f"NaFlex embeds.pos_embed {tuple(table.shape)}: NaViT's learned2d table is a square [1, G, G, D] grid")
        out["pos_embed"] = table.reshape(1, -1, D)  # no prefix entries: NaFlex adds positions to patches only
    for axis, ours in (("y", "row"), ("x", "col")):  # factorized tables go straight to NaViT's names
        if f"embeds.pos_embed_{axis}" in sd:
            out[f"pos_embed.{ours}"] = sd.pop(f"embeds.pos_embed_{axis}").reshape(-1, D)
    return {**out, **sd}


def _is_eva_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.endswith((".gamma_1", ".q_bias")) for k in sd)


def _eva_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Eva tensor names -> timm VisionTransformer names: gamma_1/2 -> ls1/2.gamma, and the q/v
    biases (k has none) -> one qkv bias with a zero k part."""
    out = {}
    for key, value in sd.items():
        head, _, leaf = key.rpartition(".")
        if leaf in ("gamma_1", "gamma_2"):
            out[f"{head}.ls{leaf[-1]}.gamma"] = value
        elif leaf == "q_bias":
            out[f"{head}.qkv.bias"] = torch.cat([value, torch.zeros_like(value), sd[f"{head}.v_bias"]])
        elif leaf != "v_bias":
            out[key] = value
    return out


def _timm_model_fields(model: nn.Module, pooled: bool = True) -> dict[str, Any]:
    """Architecture of a timm VisionTransformer (or Eva, see _eva_model_fields); raises naming
    every feature NaViT lacks. ``pooled=False``: the trunk only, the pooling head is not checked."""
    from timm.layers import Mlp, PatchEmbed
    from timm.layers.attention import Attention
    from timm.models.eva import Eva
    from timm.models.vision_transformer import Block, VisionTransformer

    if isinstance(model, Eva):
        return _eva_model_fields(model, pooled)
    if type(model).__name__ == "NaFlexVit":
        return _naflex_model_fields(model)

    problems: list[str] = []
    if getattr(model, "rope", None) is not None or any("rope" in n.lower() for n, _ in model.named_modules()):
        problems.append("rotary position embeddings (rope)")
    mlp_kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith("mlp")}
    if any("glu" in k.lower() for k in mlp_kinds):
        problems.append(f"SwiGLU / GLU MLP ({', '.join(sorted(mlp_kinds))})")
    if type(model) is not VisionTransformer:  # subclasses (e.g. DeiT distilled) add tokens/heads
        raise ValueError(
            f"unsupported timm model class {type(model).__name__}"
            + (f" ({'; '.join(problems)})" if problems else "")
            + ": only timm.models.vision_transformer.VisionTransformer can be imported"
        )

    D = model.embed_dim
    pe = model.patch_embed
    if type(pe) is not PatchEmbed or not isinstance(pe.proj, nn.Conv2d):
        problems.append(f"patch embedding {type(pe).__name__} (hybrid / non-PatchEmbed stem)")
    else:
        if pe.patch_size[0] != pe.patch_size[1] or tuple(pe.proj.stride) != tuple(pe.patch_size):
            problems.append(f"non-square or overlapping patches {pe.patch_size}")
        if not _is_identity(pe.norm):
            problems.append("patch-embedding norm (embed_norm_layer)")
    if model.pos_embed is not None and pe.grid_size[0] != pe.grid_size[1]:
        problems.append(f"non-square position grid {tuple(pe.grid_size)}")

    blk = model.blocks[0]
    for i, b in enumerate(model.blocks):
        if type(b) is not Block:
            problems.append(f"block type {type(b).__name__} (blocks.{i})")
            break
        if type(b.attn) is not Attention:
            problems.append(f"attention type {type(b.attn).__name__} (blocks.{i})")
            break
        if not _is_identity(b.attn.norm):
            problems.append("attention inner norm (scale_attn_norm)")
        if b.attn.head_dim * b.attn.num_heads != D:
            problems.append(f"attention head dim {b.attn.head_dim} x {b.attn.num_heads} heads != embed_dim {D}")
        if type(b.mlp) is not Mlp or not isinstance(b.mlp.fc1, nn.Linear):
            problems.append(f"MLP type {type(b.mlp).__name__} (blocks.{i})")
            break
        if not _is_identity(b.mlp.norm):
            problems.append("MLP inner norm (scale_mlp_norm)")
        if _timm_act(b.mlp.act) is None:
            problems.append(f"activation {type(b.mlp.act).__name__}")
        if _timm_act(b.mlp.act) != _timm_act(blk.mlp.act):
            problems.append("different activations across blocks")
        if b.attn.num_heads != blk.attn.num_heads:
            problems.append("different head counts across blocks")

    norms = [m for n, m in model.named_modules() if "norm" in n.rsplit(".", 1)[-1] and not _is_identity(m)]
    not_ln = sorted({type(m).__name__ for m in norms if not isinstance(m, nn.LayerNorm)})
    if not_ln:
        problems.append(f"norm layer(s) {not_ln} (only LayerNorm)")
    eps = sorted({m.eps for m in norms if isinstance(m, nn.LayerNorm)})
    if len(eps) > 1:
        problems.append(f"mixed LayerNorm eps {eps}")
    if any(isinstance(m, nn.LayerNorm) and not m.elementwise_affine for m in norms):
        problems.append("LayerNorm without affine parameters")

    pool = model.global_pool
    if pool not in ("token", "avg", "map"):
        problems.append(f"global_pool={pool!r} (supported: token, avg, map)")
    if pool == "avg" and model.pool_include_prefix:
        problems.append("avg pooling over prefix tokens (pool_include_prefix=True)")
    if pool == "map" and pooled:
        ap = model.attn_pool
        if type(ap).__name__ != "AttentionPoolLatent":
            problems.append(f"attention pool {type(ap).__name__}")
        else:
            if ap.latent_len != 1 or ap.pos_embed is not None or not isinstance(ap.q, nn.Linear):
                problems.append("attention pool with several latents, a position embedding, or no q projection")
            if not (_is_identity(ap.q_norm) and _is_identity(ap.k_norm)):
                problems.append("attention-pool qk norm")
            if ap.mlp is None or ap.out_features != D or ap.num_heads != blk.attn.num_heads:
                problems.append("attention pool with out_features / heads differing from the blocks")
            elif ap.mlp.fc1.out_features != blk.mlp.fc1.out_features or _timm_act(ap.mlp.act) != _timm_act(blk.mlp.act):
                problems.append("attention-pool MLP differing from the block MLP")
            if (ap.kv.bias is not None) != (blk.attn.qkv.bias is not None):
                problems.append("attention-pool qkv bias differing from the blocks' qkv_bias")
    if not isinstance(model.head, (nn.Linear, nn.Identity)):
        problems.append(f"classifier head {type(model.head).__name__}")
    gated = _attn_gated(model.blocks, problems)
    if problems:
        raise ValueError("unsupported timm ViT feature(s): " + "; ".join(dict.fromkeys(problems)))

    return dict(
        **_timm_trunk_fields(model, blk.mlp.fc1.out_features, pe.patch_size[0], pe.proj.in_channels),
        qkv_bias=blk.attn.qkv.bias is not None,
        qk_norm=not _is_identity(blk.attn.q_norm),
        attn_gated=gated,
        init_values=1.0 if not _is_identity(blk.ls1) else None,  # value is overwritten by the weights
        act=_timm_act(blk.mlp.act),
        norm_eps=eps[0] if eps else 1e-6,
        pre_norm=not _is_identity(model.norm_pre),
        class_token=model.cls_token is not None,
        reg_tokens=model.num_reg_tokens,
        no_embed_class=model.no_embed_class,
        pos_embed="learned2d" if model.pos_embed is not None else "none",
        pos_embed_grid=pe.grid_size[0],
        pos_embed_mode="bicubic",  # timm resample_abs_pos_embed defaults
        pos_embed_antialias=True,
        global_pool=pool,
        fc_norm=not _is_identity(model.fc_norm),
        final_norm=not _is_identity(model.norm) or not _is_identity(model.fc_norm),  # neither: timm's final_norm=False
        map_include_prefix=bool(model.pool_include_prefix),
        num_classes=model.head.out_features if isinstance(model.head, nn.Linear) else 0,
    )


def _timm_state_dict_fields(sd: Mapping[str, torch.Tensor], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Architecture from timm state-dict shapes (VisionTransformer; NaFlexVit ``embeds.*`` names;
    Eva ``gamma_1`` / ``q_bias`` names, whose SiLU GLU MLP and mixed RoPE ``rope.freqs`` are read).
    eps, activation, the head count (without qk_norm or rope.freqs), the attention pool's head
    count and every RoPE option but "mixed" are not recorded in weights: they default to timm's
    ViT defaults (1e-6, exact GELU, no RoPE) or must be passed as overrides (num_heads; an Eva
    file needs ``rope``)."""
    naflex = is_naflex_state_dict(sd)
    if naflex:  # the patch layout only orders columns: any reading gives the same fields
        sd = _naflex_state_dict(sd, overrides.get("patch_size"), overrides.get("in_chans", 3), "channels_last")
    eva = _is_eva_state_dict(sd)
    if eva:
        sd = _eva_state_dict(sd)
    freqs = sd.get("rope.freqs")  # mixed RoPE: [2, depth, heads, head_dim / 2]
    hints = sorted({hint for k in sd if k != "rope.freqs" for pat, hint in _TIMM_KEY_HINTS.items() if pat in k})
    fc1, fc2 = sd.get("blocks.0.mlp.fc1.weight"), sd.get("blocks.0.mlp.fc2.weight")
    glu = fc1 is not None and fc2 is not None and fc1.shape[0] != fc2.shape[1]
    if glu and not (eva and fc1.shape[0] == 2 * fc2.shape[1]):  # Eva's GluMlp (SiLU gate first) is NaViT's mlp_type glu
        hints.append("SwiGLU / GLU MLP (packed fc1 twice as wide as fc2's input)")
    if hints:
        raise ValueError(f"unsupported timm ViT feature(s): {hints}")
    if eva and freqs is None and "rope" not in overrides:
        raise ValueError("an Eva-style timm state dict (gamma_1 / q_bias: DINOv3, EVA02, RoPE-ViT, ...) whose rotary "
                         "embedding the weights do not record: pass rope= (none | cat | dinov3) with its rope_* options, "
                         "or import the timm model object")  # fmt: skip
    missing = [k for k in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight") if k not in sd]
    if missing:
        raise ValueError(f"not a timm VisionTransformer state dict: no {missing}")
    w = sd["patch_embed.proj.weight"]
    if w.dim() != 4 or w.shape[2] != w.shape[3]:
        raise ValueError(f"unsupported timm patch embedding weight shape {tuple(w.shape)} (need square Conv2d patches)")
    D, C, P = w.shape[0], w.shape[1], w.shape[2]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    class_token = "cls_token" in sd
    reg_tokens = sd["reg_token"].shape[1] if "reg_token" in sd else 0
    num_prefix = int(class_token) + reg_tokens

    if "blocks.0.attn.q_norm.weight" in sd:
        num_heads = D // sd["blocks.0.attn.q_norm.weight"].shape[0]
    elif freqs is not None:
        num_heads = freqs.shape[2]
    elif "num_heads" in overrides:
        num_heads = overrides["num_heads"]
    else:
        raise ValueError("num_heads cannot be read from a timm state dict without qk_norm: pass num_heads=...")

    found: dict[str, Any] = dict(
        patch_size=P,
        in_chans=C,
        embed_dim=D,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=_mlp_ratio(fc2.shape[1] if glu else sd["blocks.0.mlp.fc1.weight"].shape[0], D),
        mlp_type="glu" if glu else "mlp",
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        qk_norm="blocks.0.attn.q_norm.weight" in sd,
        attn_gated="blocks.0.attn.gate.weight" in sd,  # timm's gated attention: the same Linear name
        init_values=1.0 if "blocks.0.ls1.gamma" in sd else None,
        act="gelu",
        norm_eps=1e-6,
        pre_norm="norm_pre.weight" in sd,
        class_token=class_token,
        reg_tokens=reg_tokens,
        pos_embed="learned2d" if "pos_embed" in sd else "none",
        pos_embed_mode="bicubic",
        pos_embed_antialias=True,
        fc_norm="fc_norm.weight" in sd,
        final_norm="norm.weight" in sd or "fc_norm.weight" in sd,  # neither: features are the last block's output
        num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
        # timm >= 1.0 VisionTransformer / NaFlexVit AttentionPoolLatent sees patch tokens only; Eva's every token
        map_include_prefix=eva and not naflex,
    )
    if freqs is not None:
        if freqs.dim() != 4 or freqs.shape[:2] != (2, depth) or freqs.shape[3] * 2 * num_heads != D:
            raise ValueError(f"rope.freqs {tuple(freqs.shape)} is not mixed RoPE's [2, depth={depth}, heads, head_dim / 2]")
        found["rope"] = "mixed"
    if "pos_embed.row" in sd:  # NaFlex factorized tables, read at fractional coordinates
        found.update(pos_embed="fractional", pos_embed_grid=sd["pos_embed.row"].shape[0], no_embed_class=True)
    if "pos_embed" in sd:
        T = sd["pos_embed"].shape[1]
        # The table has entries for the prefix tokens unless no_embed_class (never in NaFlex); when
        # not told, the reading that leaves a square grid wins (with-prefix first, as timm's default).
        choices = [overrides["no_embed_class"]] if "no_embed_class" in overrides else [True] if naflex else [False, True]
        for no_embed in choices:
            G = math.isqrt(max(T - (0 if no_embed else num_prefix), 0))
            if G * G == T - (0 if no_embed else num_prefix):
                found.update(no_embed_class=no_embed, pos_embed_grid=G)
                break
        else:
            raise ValueError(f"timm pos_embed with {T} entries is not a square grid (+{num_prefix} prefix tokens)")
    if "attn_pool.latent" in sd:
        found["global_pool"] = "map"
    elif found["fc_norm"] or not class_token:
        found["global_pool"] = "avg"
    else:
        found["global_pool"] = "token"
    return found


def config_from_timm(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], **overrides) -> NaViTConfig:
    """NaViTConfig equivalent to a timm VisionTransformer (or its state dict + overrides).

    Overrides replace any NaViTConfig field (e.g. out_indices, attn_kernel, drop_path_rate);
    ``global_pool="none"`` describes the trunk alone (no pooling head, no classifier)."""
    pooled = overrides.get("global_pool") != "none"
    if isinstance(model_or_state_dict, nn.Module):
        found = _timm_model_fields(model_or_state_dict, pooled)
    else:
        found = _timm_state_dict_fields(model_or_state_dict, overrides)
    if not pooled:
        found.update(global_pool="none", num_classes=0, map_num_heads=0)
    return _make_config(found, overrides)


def convert_timm_state_dict(
    state_dict: Mapping[str, torch.Tensor], cfg: NaViTConfig, reference: NaViT | None = None, patch_layout: str = "auto"
) -> dict[str, torch.Tensor]:
    """timm VisionTransformer tensors (or Eva's: DINOv3, EVA02, RoPE-ViT axial / mixed, whose
    learned ``rope.freqs`` keep their name, Perception Encoder; or NaFlexVit's ``embeds.*``) ->
    NaViT state dict for ``cfg`` (see config_from_timm). ``reference``: a NaViT built from cfg, to
    read target shapes without building another. ``patch_layout``: column order of a linear patch
    embedding (see timm_patch_layout; auto reads a NaFlexVit file as timm's channels-last default)."""
    layout = timm_patch_layout(state_dict, patch_layout)
    if is_naflex_state_dict(state_dict):
        state_dict = _naflex_state_dict(state_dict, cfg.patch_size, cfg.in_chans, patch_layout)
    sd = _eva_state_dict(state_dict) if _is_eva_state_dict(state_dict) else dict(state_dict)
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return sd[key]

    D = cfg.embed_dim
    w = take("patch_embed.proj.weight")
    if w.dim() == 2 and layout == "channels_last":  # a linear embedding over (py, px, c) columns
        P, C = cfg.patch_size, cfg.in_chans
        if w.shape[1] != P * P * C:
            raise ValueError(f"patch_embed.proj.weight {tuple(w.shape)} does not take patch_size x patch_size x in_chans = {P} x {P} x {C} inputs")
        w = w.reshape(-1, P, P, C).permute(0, 3, 1, 2)
    out: dict[str, torch.Tensor] = {"patch_embed.weight": w.reshape(D, -1)}
    if "patch_embed.proj.bias" in sd:  # CLIP-style (pre_norm) stems have none: zero-filled below
        out["patch_embed.bias"] = take("patch_embed.proj.bias")

    prefix = []
    if "cls_token" in sd:
        prefix.append(take("cls_token").reshape(-1, D))
    if "reg_token" in sd:
        prefix.append(take("reg_token").reshape(-1, D))
    if prefix:
        out["prefix_tokens"] = torch.cat(prefix, 0)

    if "pos_embed" in sd:
        table = take("pos_embed").reshape(-1, D)
        n_prefix = 0 if cfg.no_embed_class else cfg.num_prefix_tokens
        if n_prefix:
            out["prefix_pos"] = table[:n_prefix]
        G = cfg.pos_embed_grid
        if table.shape[0] - n_prefix != G * G:
            raise ValueError(f"timm pos_embed has {table.shape[0] - n_prefix} grid entries, config expects {G}x{G}")
        out["pos_embed.weight"] = table[n_prefix:].reshape(G, G, D)

    # Everything else already uses NaViT's names (blocks.*, norm*, fc_norm, attn_pool.*, head).
    expected = _expected_shapes(cfg, reference)
    for key in sd:
        if key not in used and key in expected:
            out[key] = take(key)

    unused = sorted(set(sd) - used)
    if unused:
        hints = sorted({hint for k in unused for pat, hint in _TIMM_KEY_HINTS.items() if pat in k})
        raise ValueError(
            "unsupported timm ViT feature(s)"
            + (f" {hints}" if hints else "")
            + f": no NaViT equivalent for weights {unused[:12]}{' ...' if len(unused) > 12 else ''}"
        )
    return _finish(out, expected, "timm")


def navit_from_timm(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], *, patch_layout: str = "auto", **overrides) -> NaViT:
    """NaViT (eval mode) computing the same function as a timm VisionTransformer (or Eva, or
    NaFlexVit model).

    Pass the timm model itself (architecture read from its modules) or its state dict (shapes
    give the architecture; pass num_heads, and norm_eps / act when not timm's defaults; RoPE
    options, and map_num_heads for a pool with its own head count, are not in the weights either).
    ``global_pool="none"`` imports the trunk alone: the source's pooling head and classifier
    (``attn_pool.*``, ``head.*``) are left out, as asked. ``patch_layout``: see timm_patch_layout
    (a NaFlexVit model object states its own)."""
    cfg = config_from_timm(model_or_state_dict, **overrides)
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    if type(model_or_state_dict).__name__ == "NaFlexVit":
        own = "channels_last" if model_or_state_dict.embeds.channels_last else "channels_first"
        if patch_layout not in ("auto", own):
            raise ValueError(f"patch_layout={patch_layout!r}, but this NaFlexVit flattens patches {own}")
        patch_layout = own
    if cfg.global_pool == "none":
        sd = {k: v for k, v in sd.items() if not k.startswith(("attn_pool.", "head."))}
    model = NaViT(cfg)
    return _load(model, convert_timm_state_dict(sd, cfg, reference=model, patch_layout=patch_layout))


# ---- HF transformers SigLIP2 (NaFlex) --------------------------------------------------------
# transformers ACT2FN names -> NaViT activations ("gelu_new" / "gelu_pytorch_tanh" are the tanh form).
_HF_ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu"}


def _hf_encoder_fields(vc: Any, source: str) -> dict[str, Any]:
    """The NaViTConfig fields every HF CLIP / SigLIP vision encoder config states the same way."""
    if vc.hidden_act not in _HF_ACTS:
        raise ValueError(f"unsupported {source} activation {vc.hidden_act!r}; supported: {sorted(_HF_ACTS)}")
    return dict(
        in_chans=vc.num_channels,
        embed_dim=vc.hidden_size,
        depth=vc.num_hidden_layers,
        num_heads=vc.num_attention_heads,
        mlp_ratio=_mlp_ratio(vc.intermediate_size, vc.hidden_size),
        qkv_bias=True,
        act=_HF_ACTS[vc.hidden_act],
        norm_eps=vc.layer_norm_eps,
    )


def _hf_encoder_layers(take, depth: int) -> dict[str, torch.Tensor]:
    """CLIP / SigLIP encoder layers (pre-LN; separate q, k, v projections) -> NaViT blocks."""
    out = {}
    for i in range(depth):
        src, dst = f"encoder.layers.{i}.", f"blocks.{i}."
        for a, b in [("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.out_proj", "attn.proj"),
                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]:  # fmt: skip
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = take(f"{src}{a}.{p}")
        for p in ("weight", "bias"):
            out[f"{dst}attn.qkv.{p}"] = torch.cat([take(f"{src}self_attn.{n}_proj.{p}") for n in "qkv"], 0)
    return out


def _siglip2_vision_config(config: Any) -> Any:
    config = getattr(config, "vision_config", config)  # a full Siglip2Config
    if isinstance(config, Mapping):
        from transformers import Siglip2VisionConfig

        config = Siglip2VisionConfig(**config)
    return config


def config_from_siglip2(config: Any, **overrides) -> NaViTConfig:
    """NaViTConfig equivalent to a Siglip2VisionConfig (or Siglip2Config, or its dict)."""
    vc = _siglip2_vision_config(config)
    P = vc.patch_size
    if isinstance(P, (list, tuple)):
        if P[0] != P[1]:
            raise ValueError(f"unsupported SigLIP2 feature: non-square patch size {P}")
        P = P[0]
    G = math.isqrt(vc.num_patches)
    if G * G != vc.num_patches:
        raise ValueError(f"SigLIP2 num_patches={vc.num_patches} is not a square position grid")
    use_head = getattr(vc, "vision_use_head", True)
    found = dict(
        **_hf_encoder_fields(vc, "SigLIP2"),
        patch_size=P,
        class_token=False,
        reg_tokens=0,
        pos_embed="learned2d",
        pos_embed_grid=G,
        pos_embed_mode="bilinear",  # Siglip2VisionEmbeddings.resize_positional_embeddings
        pos_embed_antialias=True,
        # Without the MAP head SigLIP2 has no pooled output; NaViT then mean-pools.
        global_pool="map" if use_head else "avg",
        fc_norm=False,
        num_classes=0,
    )
    return _make_config(found, overrides)


def convert_siglip2_state_dict(
    state_dict: Mapping[str, torch.Tensor], cfg: NaViTConfig, reference: NaViT | None = None
) -> dict[str, torch.Tensor]:
    """Siglip2VisionModel tensors (optionally under a 'vision_model.' prefix, as in a full
    Siglip2Model checkpoint; text-tower keys are then ignored) -> NaViT state dict.
    ``reference``: a NaViT built from cfg, to read target shapes without building another."""
    sd = dict(state_dict)
    if any(k.startswith("vision_model.") for k in sd):
        sd = {k[len("vision_model.") :]: v for k, v in sd.items() if k.startswith("vision_model.")}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return sd[key]

    D, P, C, G = cfg.embed_dim, cfg.patch_size, cfg.in_chans, cfg.pos_embed_grid
    # NaFlex patches are flattened (py, px, c); NaViT's are (c, py, px).
    w = take("embeddings.patch_embedding.weight")
    out = {
        "patch_embed.weight": w.reshape(D, P, P, C).permute(0, 3, 1, 2).reshape(D, C * P * P),
        "patch_embed.bias": take("embeddings.patch_embedding.bias"),
        # nn.Embedding(G*G, D) is read as a row-major (G, G, D) grid by SigLIP2.
        "pos_embed.weight": take("embeddings.position_embedding.weight").reshape(G, G, D),
        "norm.weight": take("post_layernorm.weight"),
        "norm.bias": take("post_layernorm.bias"),
    }
    out.update(_hf_encoder_layers(take, cfg.depth))
    if cfg.global_pool == "map":
        # nn.MultiheadAttention packs [q; k; v] rows in in_proj; MAPHead splits q from kv.
        in_w, in_b = take("head.attention.in_proj_weight"), take("head.attention.in_proj_bias")
        out.update({
            "attn_pool.latent": take("head.probe").reshape(1, 1, D),
            "attn_pool.q.weight": in_w[:D],
            "attn_pool.q.bias": in_b[:D],
            "attn_pool.kv.weight": in_w[D:],
            "attn_pool.kv.bias": in_b[D:],
        })
        for a, b in [("attention.out_proj", "proj"), ("layernorm", "norm"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]:
            for p in ("weight", "bias"):
                out[f"attn_pool.{b}.{p}"] = take(f"head.{a}.{p}")
    unused = sorted(set(sd) - used)
    if unused:
        raise ValueError(f"SigLIP2 weights with no NaViT equivalent (config mismatch?): {unused[:12]}")
    return _finish(out, _expected_shapes(cfg, reference), "SigLIP2")


def navit_from_siglip2(model_or_state_dict_and_config: Any, **overrides) -> NaViT:
    """NaViT (eval mode) computing the same function as an HF Siglip2VisionModel (NaFlex).

    Accepts a Siglip2VisionModel, a Siglip2Model (its vision tower is used), or a
    ``(state_dict, config)`` pair. Feed it images packed by :func:`pack_images` with the
    model's patch size; NaFlex's own resize rule is the one ``budget_grid`` implements."""
    sd, config = _hf_vision_source(model_or_state_dict_and_config, "navit_from_siglip2", "a Siglip2VisionModel / Siglip2Model")
    cfg = config_from_siglip2(config, **overrides)
    model = NaViT(cfg)
    return _load(model, convert_siglip2_state_dict(sd, cfg, reference=model))


def _hf_vision_source(src: Any, caller: str, accepted: str) -> tuple[Mapping[str, torch.Tensor], Any]:
    """(state dict, config) of an HF vision model (or of the ``vision_model`` of a dual encoder),
    or of a ``(state_dict, config)`` pair."""
    if isinstance(src, nn.Module):
        src = getattr(src, "vision_model", src)
        return src.state_dict(), src.config
    if isinstance(src, (tuple, list)) and len(src) == 2:
        return src[0], src[1]
    raise TypeError(f"{caller} takes {accepted} or a (state_dict, config) pair")


# ---- HF CLIP-style vision towers (CLIP, OWL-ViT, OWLv2) ---------------------------------------
def config_from_hf_clip_vision(config: Any, **overrides) -> NaViTConfig:
    """NaViTConfig equivalent to an HF CLIP-style vision config (CLIPVisionConfig,
    OwlViTVisionConfig, Owlv2VisionConfig, or a full config holding one as ``vision_config``):
    class token, learned square position table (resized per image bicubic WITHOUT antialias, as
    ``interpolate_pos_encoding`` does), pre-LayerNorm, pre-LN blocks, final LayerNorm."""
    vc = getattr(config, "vision_config", config)
    if vc.image_size % vc.patch_size:
        raise ValueError(f"image_size {vc.image_size} is not a multiple of patch_size {vc.patch_size}")
    found = dict(
        **_hf_encoder_fields(vc, "CLIP vision"),
        patch_size=vc.patch_size,
        pre_norm=True,
        class_token=True,
        reg_tokens=0,
        pos_embed="learned2d",
        pos_embed_grid=vc.image_size // vc.patch_size,
        pos_embed_mode="bicubic",
        pos_embed_antialias=False,
        global_pool="token",  # CLIP's pooled output: the class token after the final norm
        fc_norm=False,
        num_classes=0,
    )
    return _make_config(found, overrides)


def convert_hf_clip_vision_state_dict(
    state_dict: Mapping[str, torch.Tensor], cfg: NaViTConfig, reference: NaViT | None = None, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """HF CLIP-style vision-tower tensors (keys ``embeddings.*``, ``encoder.layers.*``, ...
    under ``prefix``, e.g. "owlv2.vision_model.") -> NaViT state dict. Source keys outside
    ``prefix`` are ignored; every key under it must be used."""
    sd = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return sd[key]

    D, G = cfg.embed_dim, cfg.pos_embed_grid
    pos = take("embeddings.position_embedding.weight")  # [1 + G*G, D]: class position first
    out = {
        "patch_embed.weight": take("embeddings.patch_embedding.weight").reshape(D, -1),  # Conv2d: (c, py, px) already
        "prefix_tokens": take("embeddings.class_embedding").reshape(1, D),
        "prefix_pos": pos[:1],
        "pos_embed.weight": pos[1:].reshape(G, G, D),
        "norm_pre.weight": take("pre_layernorm.weight"),
        "norm_pre.bias": take("pre_layernorm.bias"),
        "norm.weight": take("post_layernorm.weight"),
        "norm.bias": take("post_layernorm.bias"),
    }
    out.update(_hf_encoder_layers(take, cfg.depth))
    sd.pop("embeddings.position_ids", None)  # a buffer some checkpoints carry
    unused = sorted(set(sd) - used)
    if unused:
        raise ValueError(f"vision-tower weights with no NaViT equivalent (config mismatch?): {unused[:12]}")
    return _finish(out, _expected_shapes(cfg, reference), "CLIP vision")


def navit_from_hf_clip_vision(model_or_state_dict_and_config: Any, prefix: str = "", **overrides) -> NaViT:
    """NaViT (eval mode) computing the same function as an HF CLIP-style vision tower (see
    :func:`config_from_hf_clip_vision`): a CLIPVisionModel / OwlViT / Owlv2 vision model (its
    ``vision_model`` is used), or a ``(state_dict, config)`` pair whose vision keys start with
    ``prefix`` (e.g. "owlv2.vision_model." in a detector checkpoint)."""
    sd, config = _hf_vision_source(model_or_state_dict_and_config, "navit_from_hf_clip_vision", "a CLIP-style vision model")
    cfg = config_from_hf_clip_vision(config, **overrides)
    model = NaViT(cfg)
    return _load(model, convert_hf_clip_vision_state_dict(sd, cfg, reference=model, prefix=prefix))
