"""NaViT: a ViT over packed, native-resolution images (Dehghani et al., arXiv 2307.06304).

One model family, timm style: ``forward_features`` (packed tokens) / ``forward_head``
(per-image pooling) / ``forward`` (everything a dense head needs, unpacked per image).
Named configs: navit_ti16, navit_s16, navit_b16, navit_l16.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn as nn
from timm.layers import GELUTanh, GluMlp, LayerScale, Mlp, QuickGELU, apply_rot_embed_cat
from timm.models._features import feature_take_indices

from ..data.packed_batch import PackedBatch
from .attention import AttentionContext, packed_attention
from .patch_embed import PatchConvStem
from .pos_embed import build_pos_embed, build_rope, is_mixed_rope, mixed_rope_coords, mixed_rope_embed, packed_rope
from .unpack import maps_to_padded, unpack_prefix, unpack_to_maps


@dataclass(frozen=True)
class NaViTConfig:
    patch_size: int = 16
    in_chans: int = 3
    # Widths of stride-2 3x3 convs run inside every patch before the linear embedding
    # (PatchConvStem); empty: the plain ViT linear patch embedding.
    conv_stem: tuple[int, ...] = ()
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_norm: bool = False
    # Sigmoid output gate on attention, per channel, from the block input (timm NaFlexVit
    # ``attn_gated`` / Attention(gated=True), Qwen gated attention): a query can scale its
    # attention output towards zero instead of needing sink tokens (padding canvas, registers).
    attn_gated: bool = False
    # k x k depthwise convolution over each image's own patch grid (zero-padded at the image's
    # border, never across images), added to the tokens before every block: CPVT's positional
    # encoding generator / LocalViT's locality, packed. 0: none. Packing stays exact.
    local_conv: int = 0
    init_values: float | None = None  # LayerScale init; None disables it
    act: str = "gelu"  # gelu | gelu_tanh | quick_gelu
    mlp_type: str = "mlp"  # mlp (fc1, act, fc2) | glu (SiLU-gated: EVA02's GluMlp, fc1 twice as wide)
    norm_eps: float = 1e-6
    pre_norm: bool = False  # LayerNorm before the first block (CLIP-style)
    class_token: bool = False
    reg_tokens: int = 0
    no_embed_class: bool = False  # prefix tokens get no positional embedding
    pos_embed: str = "factorized"  # factorized | fractional | sincos2d | learned2d | none
    pos_embed_grid: int = 64  # table size (cells per side) of learned embeddings
    pos_embed_mode: str = "bicubic"  # learned2d resize: bicubic (timm) | bilinear (SigLIP2)
    pos_embed_antialias: bool = True
    # 2D rotary embedding on q/k of patch tokens: none | cat (axial: EVA02, PE, RoPE-ViT) | dinov3 |
    # mixed (RoPE-ViT RoPE-Mixed: learned x / y frequencies per block and head, parameter rope.freqs)
    rope: str = "none"
    rope_temperature: float = 10000.0  # frequency base (mixed: of the initial frequencies; RoPE-ViT uses 10)
    rope_rotate_half: bool = False  # channel layout: rotate-half instead of interleaved pairs (as the checkpoint needs)
    rope_grid_offset: float = 0.0
    rope_grid_indexing: str = "ij"  # "xy": x is the column (timm RoPE-ViT / PE checkpoints)
    rope_ref_grid: int = 0  # cat: rescale coordinates to this reference grid side (EVA02's ref_feat_shape); 0: none
    rope_shift_coords: float | None = None  # dinov3 / mixed train-time coordinate augmentations
    rope_jitter_coords: float | None = None
    rope_rescale_coords: float | None = None
    global_pool: str = "map"  # map | avg | token | none (dense heads that need no pooled vector)
    fc_norm: bool = False  # norm after pooling instead of before (timm semantics)
    final_norm: bool = True  # LayerNorm after the last block (False: none, e.g. Perception Encoder spatial / lang)
    map_include_prefix: bool = True  # MAP also attends to prefix tokens (timm 1.0.31 default: patches only)
    map_num_heads: int = 0  # heads of the MAP head; 0: the blocks' num_heads (Perception Encoder core pools with 8)
    num_classes: int = 0
    drop_path_rate: float = 0.0
    attn_kernel: str = "auto"  # auto | segment | flex | varlen | dense
    window_size: int = 0  # ViTDet: attention within window_size x window_size windows of each image's grid; 0: global
    global_attn_indexes: tuple[int, ...] = ()  # with windows, the blocks that stay global (negative: from the end)
    out_indices: tuple[int, ...] = (-1,)
    feature_norm: bool = True  # apply the final norm to every returned feature layer
    mask_fill: str = "token"  # dropped grid cells in feature maps: learned "token" or "zeros"

    def __post_init__(self):
        # YAML gives lists; a tuple keeps the config hashable and comparable.
        object.__setattr__(self, "global_attn_indexes", tuple(int(i) for i in self.global_attn_indexes))
        object.__setattr__(self, "conv_stem", tuple(int(c) for c in self.conv_stem))
        if self.window_size < 0:
            raise ValueError(f"window_size must be >= 0 (0: global attention), got {self.window_size}")
        bad = [i for i in self.global_attn_indexes if not -self.depth <= i < self.depth]
        if bad:
            raise ValueError(f"global_attn_indexes {bad} are not blocks of a depth-{self.depth} model")

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    def block_window_size(self, index: int) -> int:
        """Window size of block ``index`` (0: global attention)."""
        return 0 if index in {i % self.depth for i in self.global_attn_indexes} else self.window_size


MODEL_CONFIGS: dict[str, dict] = {
    "navit_ti16": dict(embed_dim=192, depth=12, num_heads=3),
    "navit_s16": dict(embed_dim=384, depth=12, num_heads=6),
    "navit_b16": dict(embed_dim=768, depth=12, num_heads=12),
    "navit_l16": dict(embed_dim=1024, depth=24, num_heads=16),
}


# timm's activation layers, by the names configs use.
ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": GELUTanh, "quick_gelu": QuickGELU}


def _activation(name: str) -> type[nn.Module]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _block_mlp(cfg: NaViTConfig) -> nn.Module:
    hidden = int(cfg.embed_dim * cfg.mlp_ratio)
    if cfg.mlp_type == "glu":  # timm's GluMlp as Eva builds it: act(first half) * second half
        return GluMlp(cfg.embed_dim, 2 * hidden, act_layer=nn.SiLU, gate_last=False)
    if cfg.mlp_type != "mlp":
        raise ValueError(f"mlp_type must be mlp or glu, got {cfg.mlp_type!r}")
    return Mlp(cfg.embed_dim, hidden, act_layer=_activation(cfg.act))


class Attention(nn.Module):
    def __init__(self, cfg: NaViTConfig, window_size: int = 0):
        super().__init__()
        self.window_size = window_size
        dim = cfg.embed_dim
        if dim % cfg.num_heads:
            raise ValueError(f"embed_dim={dim} is not divisible by num_heads={cfg.num_heads}")
        self.num_heads = cfg.num_heads
        self.head_dim = dim // cfg.num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=cfg.qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.gate = nn.Linear(dim, dim, bias=cfg.qkv_bias) if cfg.attn_gated else None  # timm Attention(gated=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, rope: torch.Tensor | None = None) -> torch.Tensor:
        """rope: this block's own rotary embedding [S, H, L, 2 * Dh] (mixed RoPE, interleaved
        channels), else the one of ctx shared by all blocks."""
        S, L, D = x.shape
        # [S, H, L, Dh] views of the projection: unbind(2) (not permute + unbind(0)) lets autograd
        # stack the q / k / v gradients straight into its [S, L, 3, H, Dh] layout, one copy not two.
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(S, L, 3, self.num_heads, self.head_dim).unbind(2))
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rot_embed_cat(q, rope), apply_rot_embed_cat(k, rope)
        elif ctx.rope is not None:  # [S, 1, L, 2 * Dh], built once per forward by the backbone
            q, k = apply_rot_embed_cat(q, ctx.rope, half=ctx.rope_half), apply_rot_embed_cat(k, ctx.rope, half=ctx.rope_half)
        # Under autocast LayerNorm (qk_norm) and the rotation return fp32 while v keeps the
        # autocast dtype: one dtype for every kernel (FlexAttention's backward refuses mixed ones).
        out = packed_attention(q.to(v.dtype), k.to(v.dtype), v, ctx, window_size=self.window_size)
        out = out.reshape(S, L, D)
        if self.gate is not None:  # per token and channel: padding slots stay zero (out is zero there)
            out = out * self.gate(x).sigmoid()
        return self.proj(out)


class GridConv(nn.Module):
    """Depthwise k x k convolution of the patch tokens on each image's own grid: tokens are
    scattered into a zero [N, D, H, W] stack (layout.padded_cells), convolved, gathered back;
    prefix and padding slots get zeros. Dropped tokens' cells stay zero."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"local_conv must be an odd kernel size (or 0), got {kernel_size}")
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        # The grid is channels-last in memory (a view of the token-major [N, H, W, D] stack), so
        # the weight's gradient comes channels-last: give the weight those strides too, or DDP's
        # gradient buckets (laid out like the parameter) warn and copy on every step.
        w = self.conv.weight.data
        self.conv.weight.data = torch.empty_strided(w.shape, (w[0].numel(), 1, w.shape[3], 1), dtype=w.dtype).copy_(w)

    def forward(self, x: torch.Tensor, batch: PackedBatch, cells: torch.Tensor) -> torch.Tensor:
        lay, D = batch.layout, x.shape[-1]
        H, W = max(h for h, _ in lay.grids), max(w for _, w in lay.grids)
        tokens = batch.flat(x).index_select(0, batch.patch_slots)  # [T, D]
        grid = tokens.new_zeros(lay.num_images * H * W, D).index_copy(0, cells, tokens)
        grid = self.conv(grid.view(lay.num_images, H, W, D).permute(0, 3, 1, 2))
        out = grid.permute(0, 2, 3, 1).reshape(-1, D).index_select(0, cells)
        return tokens.new_zeros(x.shape[0] * x.shape[1], D).index_copy(0, batch.patch_slots, out).view_as(x)


class Block(nn.Module):
    """Pre-LN transformer block; stochastic depth drops whole images, not whole sequences."""

    def __init__(self, cfg: NaViTConfig, drop_path: float, window_size: int = 0):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg, window_size)
        self.ls1 = LayerScale(dim, cfg.init_values) if cfg.init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = _block_mlp(cfg)
        self.ls2 = LayerScale(dim, cfg.init_values) if cfg.init_values else nn.Identity()
        self.drop_path = drop_path

    def _residual_scale(self, ctx: AttentionContext, x: torch.Tensor) -> torch.Tensor | None:
        if not (self.training and self.drop_path > 0):
            return None
        batch = ctx.batch
        keep = torch.rand(batch.num_images, device=x.device) >= self.drop_path
        scale = keep.to(x.dtype) / (1.0 - self.drop_path)
        return scale[batch.segment_ids.clamp(min=0)].unsqueeze(-1)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, rope: torch.Tensor | None = None) -> torch.Tensor:
        attn = self.ls1(self.attn(self.norm1(x), ctx, rope))
        scale = self._residual_scale(ctx, x)
        x = x + (attn if scale is None else attn * scale)
        mlp = self.ls2(self.mlp(self.norm2(x)))
        scale = self._residual_scale(ctx, x)
        return x + (mlp if scale is None else mlp * scale)


class MAPHead(nn.Module):
    """Multihead attention pooling (one learned probe per image), timm AttentionPoolLatent /
    SigLIP layout. Softmax is taken per image over that image's tokens only, vectorized with
    scatter reductions over segment ids (no per-image loop, no padding)."""

    def __init__(self, cfg: NaViTConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.num_heads = cfg.map_num_heads or cfg.num_heads
        if cfg.map_num_heads < 0 or dim % self.num_heads:
            raise ValueError(f"map_num_heads={cfg.map_num_heads}: embed_dim={dim} must split into that many MAP heads (0: num_heads)")
        self.head_dim = dim // self.num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.latent, std=dim**-0.5)
        self.q = nn.Linear(dim, dim, bias=cfg.qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), act_layer=_activation(cfg.act))
        self.include_prefix = cfg.map_include_prefix

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        H, Dh, N = self.num_heads, self.head_dim, batch.num_images
        slots = batch.valid_slots if self.include_prefix else batch.patch_slots
        seg = batch.flat(batch.segment_ids).index_select(0, slots)  # [T]
        k, v = self.kv(batch.flat(x).index_select(0, slots)).view(-1, 2, H, Dh).unbind(1)  # [T, H, Dh]
        q = self.q(self.latent).view(H, Dh) * Dh**-0.5
        logits = (k * q).sum(-1)  # [T, H]
        index = seg[:, None].expand(-1, H)
        peak = logits.new_full((N, H), float("-inf")).scatter_reduce(0, index, logits, "amax", include_self=True)
        weights = (logits - peak[seg]).exp()
        denom = logits.new_zeros(N, H).index_add(0, seg, weights)
        pooled = logits.new_zeros(N, H, Dh).index_add(0, seg, weights[..., None] * v) / denom[..., None]
        pooled = self.proj(pooled.reshape(N, H * Dh))
        return pooled + self.mlp(self.norm(pooled))


@dataclass
class NaViTOutput:
    """Everything the backbone produces for one packed batch. Per-image lists follow the
    input order of ``pack_images``."""

    tokens: torch.Tensor  # [S, L, D] final (normed) packed tokens
    feature_maps: list[torch.Tensor]  # per image [D, h_i, w_i] from the last of out_indices
    intermediates: dict[int, list[torch.Tensor]]  # layer index -> per-image maps, for all out_indices
    pooled: torch.Tensor | None  # [N, D] (or [N, num_classes] with a classifier head); None if global_pool="none"
    prefix_tokens: torch.Tensor | None  # [N, num_prefix_tokens, D] or None
    batch: PackedBatch = field(repr=False)

    def padded(self, layer: int | None = None, size_divisibility: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-padded [N, D, H, W] view and bool [N, H, W] valid mask, for heads that need a batch tensor."""
        maps = self.feature_maps if layer is None else self.intermediates[layer]
        return maps_to_padded(maps, size_divisibility)


class NaViT(nn.Module):
    def __init__(self, cfg: NaViTConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.embed_dim = self.num_features = dim
        if cfg.conv_stem:
            self.patch_embed = PatchConvStem(cfg.in_chans, cfg.patch_size, cfg.conv_stem, dim)
        else:
            self.patch_embed = nn.Linear(cfg.in_chans * cfg.patch_size**2, dim)
        self.pos_embed = build_pos_embed(
            cfg.pos_embed, dim, cfg.pos_embed_grid, mode=cfg.pos_embed_mode, antialias=cfg.pos_embed_antialias
        )
        if cfg.num_prefix_tokens:
            self.prefix_tokens = nn.Parameter(torch.zeros(cfg.num_prefix_tokens, dim))
            nn.init.normal_(self.prefix_tokens, std=1e-6 if cfg.class_token else 0.02)
            embed_prefix = cfg.pos_embed != "none" and not cfg.no_embed_class
            self.prefix_pos = nn.Parameter(torch.zeros(cfg.num_prefix_tokens, dim)) if embed_prefix else None
        self.rope = build_rope(cfg.rope, dim, cfg.num_heads, depth=cfg.depth, temperature=cfg.rope_temperature, rotate_half=cfg.rope_rotate_half,
                               grid_offset=cfg.rope_grid_offset, grid_indexing=cfg.rope_grid_indexing, ref_grid=cfg.rope_ref_grid,
                               shift_coords=cfg.rope_shift_coords, jitter_coords=cfg.rope_jitter_coords,
                               rescale_coords=cfg.rope_rescale_coords)  # fmt: skip
        self.norm_pre = nn.LayerNorm(dim, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linspace, without a tensor (meta-device builds)
        self.blocks = nn.ModuleList([Block(cfg, r, cfg.block_window_size(i)) for i, r in enumerate(rates)])
        self.local_convs = nn.ModuleList([GridConv(dim, cfg.local_conv) for _ in range(cfg.depth)]) if cfg.local_conv else None
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps) if cfg.final_norm and not cfg.fc_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(dim, eps=cfg.norm_eps) if cfg.fc_norm else nn.Identity()
        if cfg.global_pool not in ("map", "avg", "token", "none"):
            raise ValueError(f"global_pool must be map|avg|token|none, got {cfg.global_pool!r}")
        if cfg.global_pool == "token" and not cfg.class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        self.attn_pool = MAPHead(cfg) if cfg.global_pool == "map" else None
        if cfg.global_pool == "none" and cfg.num_classes:
            raise ValueError("num_classes needs a pooled vector: set global_pool to map, avg or token")
        self.head = nn.Linear(dim, cfg.num_classes) if cfg.num_classes else nn.Identity()
        if cfg.mask_fill not in ("token", "zeros"):
            raise ValueError(f"mask_fill must be 'token' or 'zeros', got {cfg.mask_fill!r}")
        self.mask_token = nn.Parameter(torch.zeros(dim)) if cfg.mask_fill == "token" else None
        self.out_indices = tuple(i % cfg.depth for i in cfg.out_indices)
        self.apply(_init_weights)

    # ---- embedding -----------------------------------------------------------------------
    def _check(self, batch: PackedBatch) -> None:
        if not isinstance(batch, PackedBatch):
            raise TypeError(f"NaViT takes a PackedBatch (see navit_dense.pack_images), got {type(batch).__name__}")
        if batch.patch_size != self.patch_size:
            raise ValueError(f"batch was packed with patch_size={batch.patch_size}, model uses {self.patch_size}")
        if batch.num_prefix_tokens != self.num_prefix_tokens:
            raise ValueError(
                f"batch reserves {batch.num_prefix_tokens} prefix slots per image but the model has "
                f"{self.num_prefix_tokens} prefix tokens: pack with num_prefix_tokens=model.num_prefix_tokens"
            )

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        x = self.patch_embed(batch.pixel_values(next(self.patch_embed.parameters()).dtype))  # uint8 patches: normalized here
        if self.pos_embed is not None:
            x = x + self.pos_embed(batch).to(x.dtype)
        if self.num_prefix_tokens:
            prefix = self.prefix_tokens if self.prefix_pos is None else self.prefix_tokens + self.prefix_pos
            slot = torch.arange(batch.seq_len, device=x.device)[None] - batch.seq_offset[batch.segment_ids.clamp(min=0)]
            slot = slot.clamp(0, self.num_prefix_tokens - 1)
            x = torch.where(batch.prefix_mask[..., None], prefix.to(x.dtype)[slot], x)
        x = x.masked_fill(batch.padding_mask[..., None], 0.0)
        return self.norm_pre(x)

    # ---- timm-style API ---------------------------------------------------------------------
    def _run_blocks(self, batch: PackedBatch, take: set[int], norm: bool, last: int | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(tokens after block ``last`` (default: all blocks), {i: tokens after block i} for i in
        ``take``, passed through the final norm when ``norm``)."""
        self._check(batch)
        # RoPE once per forward for every block; mixed RoPE: token coordinates once, each
        # block's rotation from its own learned frequencies.
        mixed = is_mixed_rope(self.rope)
        rope = packed_rope(self.rope, batch) if self.rope is not None and not mixed else None
        coords = mixed_rope_coords(self.rope, batch) if mixed else None
        ctx = AttentionContext(batch, self.cfg.attn_kernel, rope=rope, rope_half=self.cfg.rope_rotate_half)
        x = self.embed(batch)
        cells = torch.from_numpy(batch.layout.padded_cells).to(x.device) if self.local_convs is not None else None
        inter: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks[: None if last is None else last + 1]):
            if cells is not None:
                x = x + self.local_convs[i](x, batch, cells)
            x = block(x, ctx, mixed_rope_embed(self.rope, coords, i) if mixed else None)
            if i in take:
                inter[i] = self.norm(x) if norm else x
        return x, inter

    def _features(self, batch: PackedBatch) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(final normed tokens [S, L, D], {layer: packed tokens [S, L, D]} for the config's out_indices)."""
        x, inter = self._run_blocks(batch, set(self.out_indices), self.cfg.feature_norm)
        last = len(self.blocks) - 1
        final = inter[last] if (last in inter and self.cfg.feature_norm) else self.norm(x)
        return final, inter

    def forward_intermediates(
        self,
        batch: PackedBatch,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's ``forward_intermediates``, per image: the outputs of blocks ``indices`` (last n
        if an int, all if None, negative counting from the end), each a list over images in
        input order of [D, h_i, w_i] maps ("NCHW"; dropped cells hold the mask token, or zeros)
        or [h_i * w_i, D] row-major tokens ("NLC"); with ``return_prefix_tokens`` each image's
        entry is a (map, [num_prefix_tokens, D]) pair. Returns that list when
        ``intermediates_only``, else (final normed packed tokens [S, L, D], the list).
        ``stop_early`` skips the blocks after the last one asked for (then no final tokens)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be NCHW or NLC, got {output_fmt!r}")
        take, last = feature_take_indices(len(self.blocks), indices)
        if stop_early and not intermediates_only:
            raise ValueError("stop_early needs intermediates_only=True: the final tokens need every block")
        x, inter = self._run_blocks(batch, set(take), norm, last if stop_early else None)
        out = []
        for i in take:
            maps = unpack_to_maps(inter[i], batch, self.mask_token)
            if output_fmt == "NLC":
                maps = [m.flatten(1).T for m in maps]
            if return_prefix_tokens and self.num_prefix_tokens:
                maps = list(zip(maps, unpack_prefix(inter[i], batch).unbind(0)))
            out.append(maps)
        return out if intermediates_only else (self.norm(x), out)

    def forward_features(self, batch: PackedBatch) -> torch.Tensor:
        return self._features(batch)[0]

    def forward_head(self, x: torch.Tensor, batch: PackedBatch, pre_logits: bool = False) -> torch.Tensor | None:
        pool = self.cfg.global_pool
        if pool == "none":
            return None
        if pool == "map":
            pooled = self.attn_pool(x, batch)
        elif pool == "token":
            pooled = unpack_prefix(x, batch)[:, 0]
        else:
            patches = batch.flat(x).index_select(0, batch.patch_slots)
            total = x.new_zeros(batch.num_images, x.shape[-1]).index_add(0, batch.patch_image, patches)
            pooled = total / batch.num_kept.to(x.device, x.dtype)[:, None]
        pooled = self.fc_norm(pooled)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, batch: PackedBatch) -> NaViTOutput:
        final, inter = self._features(batch)
        maps = {i: unpack_to_maps(t, batch, self.mask_token) for i, t in inter.items()}
        return NaViTOutput(
            tokens=final,
            feature_maps=maps[self.out_indices[-1]],
            intermediates=maps,
            pooled=self.forward_head(final, batch),
            prefix_tokens=unpack_prefix(final, batch) if self.num_prefix_tokens else None,
            batch=batch,
        )

    @torch.no_grad()
    def zero_added_modules(self, missing_keys) -> list[str]:
        """Zero the local convs a loaded checkpoint had no values for (a trunk trained without
        ``local_conv``): their residual branches then start at zero and the model computes the
        checkpoint's function exactly. Returns the names zeroed."""
        missing = set(missing_keys)
        zeroed = [n for n, _ in self.named_parameters() if n.startswith("local_convs.") and n in missing]
        for name in zeroed:
            self.get_parameter(name).zero_()
        return zeroed

    def no_weight_decay(self) -> set[str]:
        names = {"mask_token", "prefix_tokens", "prefix_pos", "attn_pool.latent"}
        names |= {n for n, _ in self.named_parameters() if n.startswith("pos_embed.")}
        return names


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_backbone(name: str = "navit_ti16", **overrides) -> NaViT:
    """Build a named NaViT; keyword arguments override any NaViTConfig field."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODEL_CONFIGS)}")
    valid = {f.name for f in fields(NaViTConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise TypeError(f"unknown NaViTConfig option(s) {unknown}; valid options: {sorted(valid)}")
    if "out_indices" in overrides:
        overrides["out_indices"] = tuple(overrides["out_indices"])
    return NaViT(replace(NaViTConfig(**MODEL_CONFIGS[name]), **overrides))


def list_models() -> list[str]:
    return sorted(MODEL_CONFIGS)
