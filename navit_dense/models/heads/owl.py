"""OWL-ViT / OWLv2-style open-vocabulary detection head on NaViT patch tokens.

Every kept patch token predicts one box and one score per class query (Minderer et al.
2022, 2023). The head runs on the packed tokens gathered to a flat [T, D] stream (no padding,
no per-image loop); rows are ordered per image in input order, so image i owns rows
``offsets[i]:offsets[i + 1]`` and each row carries its grid cell in ``token_index``.
Dropped tokens (token dropping) are simply absent: they produce no predictions.

Shapes: T = kept patch tokens over the batch, K = class queries, D = backbone width,
Dq = query-space width, N = images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import batched_nms, box_convert, clip_boxes_to_image

from ...data.packed_batch import PackedBatch
from ..navit import NaViT, NaViTOutput
from ..unpack import unpack_prefix

_BIAS_EPS = 1e-4  # OWLv2 compute_box_bias: keeps the inverse sigmoid finite at 0 and 1


def inverse_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """OWLv2's clamped logit: log(x + eps) - log1p(-x + eps)."""
    return torch.log(x + _BIAS_EPS) - torch.log1p(-x + _BIAS_EPS)


BOX_BIASES = ("center", "corner")


def token_boxes(grid_sizes: torch.Tensor, image_index: torch.Tensor, token_index: torch.Tensor, anchor: str = "center") -> torch.Tensor:
    """float [T, 4]: each token's own grid cell as normalized (cx, cy, w, h).

    grid_sizes: long [N, 2] (h_i, w_i); image_index, token_index: long [T]. Rectangular per
    image: a token of an h x w grid is 1/w wide and 1/h tall. ``anchor`` places (cx, cy):
    "center" at the cell centre ((col + 0.5) / w), "corner" at its far corner ((col + 1) / w),
    the convention OWL-ViT / OWLv2 checkpoints were trained with (transformers'
    ``normalize_grid_corner_coordinates``).
    """
    if anchor not in BOX_BIASES:
        raise ValueError(f"box bias anchor must be one of {BOX_BIASES}, got {anchor!r}")
    hw = grid_sizes.to(token_index.device)[image_index].float()  # [T, 2] (h, w)
    h, w = hw.unbind(-1)
    row = torch.div(token_index, w.long(), rounding_mode="floor").float()
    col = token_index.float() - row * w
    shift = 0.5 if anchor == "center" else 1.0
    return torch.stack([(col + shift) / w, (row + shift) / h, 1.0 / w, 1.0 / h], dim=-1)


def compute_box_bias(grid_sizes: torch.Tensor, image_index: torch.Tensor, token_index: torch.Tensor, anchor: str = "center") -> torch.Tensor:
    """float [T, 4] box bias (OWLv2 compute_box_bias, per image and per axis): inverse
    sigmoid of the token's cell, so a zero box-MLP output predicts the token's own cell."""
    return inverse_sigmoid(token_boxes(grid_sizes, image_index, token_index, anchor).clamp(0.0, 1.0))


def _mlp(dim: int, out_dim: int, act: type[nn.Module] = nn.GELU) -> nn.Sequential:
    # OWL-ViT box / objectness heads: three dense layers with GELU in between.
    return nn.Sequential(nn.Linear(dim, dim), act(), nn.Linear(dim, dim), act(), nn.Linear(dim, out_dim))


@dataclass
class OwlOutput:
    """Per-token predictions for a packed batch, rows grouped by image in input order."""

    logits: torch.Tensor  # [T, K] class logits
    pred_boxes: torch.Tensor  # [T, 4] normalized (cx, cy, w, h) in [0, 1] of the image's own extent
    objectness: torch.Tensor | None  # [T] objectness logits (OWLv2), None when disabled
    class_embeds: torch.Tensor  # [T, Dq] unit-norm token embeddings in query space (image-conditioned queries)
    image_index: torch.Tensor  # long [T]: input index of the image owning each row
    token_index: torch.Tensor  # long [T]: row * w_i + col in that image's patch grid
    offsets: torch.Tensor  # long [N + 1]: image i owns rows offsets[i]:offsets[i + 1]
    row_offsets: tuple[int, ...]  # the same offsets on the host (from the batch's layout)
    token_cells: torch.Tensor | None = None  # [T, 4] each token's own grid cell, normalized (cx, cy, w, h)

    @property
    def num_images(self) -> int:
        return len(self.row_offsets) - 1

    @property
    def rows_per_image(self) -> list[int]:
        return [b - a for a, b in zip(self.row_offsets[:-1], self.row_offsets[1:])]

    def split(self, name: str) -> list[torch.Tensor]:
        """Per-image list of one field, e.g. ``out.split("pred_boxes")[i]`` is [T_i, 4]."""
        return list(getattr(self, name).split(self.rows_per_image))


class OwlHead(nn.Module):
    """OWL-ViT class head + box head, OWLv2 objectness head, on NaViT tokens.

    num_classes: K learned class queries ([K, query_dim] parameter, closed vocabulary). With 0,
        queries must come from :meth:`set_class_embeddings` / :meth:`load_class_embeddings`
        (e.g. text embeddings) or the ``class_embeddings`` argument of ``forward``.
    merge_class_token: OWL-ViT multiplies patch tokens by the class-token output before the
        heads; needs a backbone with a class token.
    detach_objectness: OWLv2 trains objectness on detached features so it cannot distort them.
    prior_prob / init_logit_scale: the class logit starts at log(p / (1 - p)) for every token
        (RetinaNet prior) with logit scale ``init_logit_scale``, so focal loss starts stable
        when training from scratch; imported OWL weights overwrite both.
    box_bias: where a zero box-MLP output puts a token's box: "center" of its cell (trained
        from scratch here), or "corner" (the far corner, as OWL-ViT / OWLv2 checkpoints do).
    """

    def __init__(
        self,
        embed_dim: int,
        num_classes: int = 0,
        query_dim: int | None = None,
        *,
        objectness: bool = True,
        merge_class_token: bool = False,
        detach_objectness: bool = True,
        prior_prob: float = 0.01,
        init_logit_scale: float = 3.0,
        box_bias: str = "center",
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if init_logit_scale <= 0:
            raise ValueError(f"init_logit_scale must be > 0, got {init_logit_scale}")
        if box_bias not in BOX_BIASES:
            raise ValueError(f"box_bias must be one of {BOX_BIASES}, got {box_bias!r}")
        self.embed_dim = embed_dim
        self.query_dim = query_dim or embed_dim
        self.merge_class_token = merge_class_token
        self.detach_objectness = detach_objectness
        self.box_bias = box_bias
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.box_head = _mlp(embed_dim, 4)
        self.class_proj = nn.Linear(embed_dim, self.query_dim)
        self.logit_shift = nn.Linear(embed_dim, 1)
        self.logit_scale = nn.Linear(embed_dim, 1)
        self.objectness_head = _mlp(embed_dim, 1) if objectness else None
        self.class_embeddings: torch.Tensor | None
        if num_classes:
            self.class_embeddings = nn.Parameter(torch.randn(num_classes, self.query_dim))
        else:
            self.register_buffer("class_embeddings", None)

        prior_logit = float(np.log(prior_prob / (1.0 - prior_prob)))
        # Zero box output: every token starts by predicting its own cell (the box bias).
        nn.init.zeros_(self.box_head[-1].weight)
        nn.init.zeros_(self.box_head[-1].bias)
        # elu(b) + 1 = init_logit_scale; shift chosen so (0 + shift) * scale = prior logit.
        nn.init.zeros_(self.logit_scale.weight)
        nn.init.constant_(self.logit_scale.bias, init_logit_scale - 1.0 if init_logit_scale >= 1 else np.log(init_logit_scale))
        nn.init.zeros_(self.logit_shift.weight)
        nn.init.constant_(self.logit_shift.bias, prior_logit / init_logit_scale)
        if self.objectness_head is not None:
            nn.init.constant_(self.objectness_head[-1].bias, prior_logit)

    # ---- class queries -------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return 0 if self.class_embeddings is None else int(self.class_embeddings.shape[0])

    def _check_queries(self, emb: torch.Tensor, what: str) -> torch.Tensor:
        if not torch.is_tensor(emb):
            emb = torch.as_tensor(np.asarray(emb))
        if emb.dim() != 2 or emb.shape[1] != self.query_dim or emb.shape[0] == 0:
            raise ValueError(f"{what}: expected a [num_classes, {self.query_dim}] tensor, got shape {tuple(emb.shape)}")
        if not emb.is_floating_point():
            raise TypeError(f"{what}: expected floating-point embeddings, got {emb.dtype}")
        if not bool(torch.isfinite(emb).all()):
            raise ValueError(f"{what}: contains NaN or infinite values")
        return emb

    def set_class_embeddings(self, embeddings: torch.Tensor, trainable: bool = False) -> None:
        """Replace the class queries with [K', query_dim] embeddings (K' may differ from K, so
        an unseen class list can be evaluated). Stored as a buffer (saved in the state dict)
        unless ``trainable``. Replacing a trained parameter invalidates optimizers holding it."""
        emb = self._check_queries(embeddings, "set_class_embeddings").detach()
        ref = self.class_proj.weight
        emb = emb.to(device=ref.device, dtype=ref.dtype).clone()
        if "class_embeddings" in self._parameters or "class_embeddings" in self._buffers:
            delattr(self, "class_embeddings")
        if trainable:
            self.class_embeddings = nn.Parameter(emb)
        else:
            self.register_buffer("class_embeddings", emb)

    def load_class_embeddings(self, path: str | Path, key: str | None = None, trainable: bool = False) -> torch.Tensor:
        """Load [K, query_dim] queries from .safetensors / .npy / .npz and install them.
        ``key`` picks the tensor in a multi-tensor file (default: the only one, or
        "class_embeddings")."""
        path = Path(path)
        if path.suffix == ".npy":
            emb = torch.from_numpy(np.load(path))
        elif path.suffix in (".safetensors", ".npz"):
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                tensors = load_file(str(path))
            else:
                with np.load(path) as npz:
                    tensors = {k: torch.from_numpy(npz[k]) for k in npz.files}
            if key is None:
                key = next(iter(tensors)) if len(tensors) == 1 else "class_embeddings"
            if key not in tensors:
                raise KeyError(f"{path}: no tensor named {key!r}; available: {sorted(tensors)}")
            emb = tensors[key]
        else:
            raise ValueError(f"{path}: unsupported class-embedding file type {path.suffix!r}; use .safetensors, .npy or .npz")
        self._check_queries(emb, f"load_class_embeddings({path.name})")
        self.set_class_embeddings(emb.float(), trainable=trainable)
        return self.class_embeddings

    # ---- forward -------------------------------------------------------------------------
    def forward(
        self,
        features: NaViTOutput | torch.Tensor,
        batch: PackedBatch | None = None,
        class_embeddings: torch.Tensor | None = None,
    ) -> OwlOutput:
        """features: a NaViTOutput (its final ``tokens`` are used) or packed tokens [S, L, D]
        (e.g. an intermediate layer) together with their ``batch``.
        class_embeddings: optional [K', query_dim] queries for this call only."""
        if isinstance(features, NaViTOutput):
            tokens, batch = features.tokens, features.batch if batch is None else batch
        else:
            tokens = features
        if batch is None:
            raise TypeError("OwlHead needs the PackedBatch when given raw packed tokens")
        if tokens.shape[:2] != batch.segment_ids.shape or tokens.shape[-1] != self.embed_dim:
            raise ValueError(
                f"tokens {tuple(tokens.shape)} do not match batch [S, L]={tuple(batch.segment_ids.shape)} "
                f"and embed_dim={self.embed_dim}"
            )
        queries = self.class_embeddings if class_embeddings is None else self._check_queries(class_embeddings, "class_embeddings")
        if queries is None:
            raise RuntimeError(
                "OwlHead has no class queries: build it with num_classes > 0, call set_class_embeddings / "
                "load_class_embeddings, or pass class_embeddings="
            )

        # Rows grouped by input image, row-major inside each image (the layout's patch order):
        # per-image results become slices, and no boolean mask syncs the host.
        x = batch.flat(tokens).index_select(0, batch.patch_slots)  # [T, D]
        seg = batch.patch_image
        tok = batch.flat(batch.token_index).index_select(0, batch.patch_slots)
        if self.merge_class_token:
            if batch.num_prefix_tokens < 1:
                raise ValueError("merge_class_token=True needs a backbone with a class token (num_prefix_tokens >= 1)")
            x = x * unpack_prefix(tokens, batch)[:, 0][seg]
        x = self.norm(x)

        cells = token_boxes(batch.grid_sizes, seg, tok)
        anchors = cells if self.box_bias == "center" else token_boxes(batch.grid_sizes, seg, tok, self.box_bias)
        pred_boxes = torch.sigmoid(self.box_head(x) + inverse_sigmoid(anchors.clamp(0.0, 1.0)).to(x.dtype))

        embeds = F.normalize(self.class_proj(x), dim=-1)
        logits = embeds @ F.normalize(queries.to(x.dtype), dim=-1).T
        scale = F.elu(self.logit_scale(x)) + 1.0
        logits = (logits + self.logit_shift(x)) * scale

        objectness = None
        if self.objectness_head is not None:
            objectness = self.objectness_head(x.detach() if self.detach_objectness else x).squeeze(-1)

        offsets = torch.tensor(batch.layout.token_offsets, dtype=torch.long, device=x.device)
        return OwlOutput(logits, pred_boxes, objectness, embeds, seg, tok, offsets, batch.layout.token_offsets, cells)


# ---- the detector and its class queries --------------------------------------------------
@dataclass
class DetectorOutput:
    owl: OwlOutput  # per-token logits / boxes / objectness
    batch: PackedBatch  # the packed input: image sizes for post-processing


class OwlDetector(nn.Module):
    """NaViT backbone + OwlHead: ``detector(packed_batch) -> DetectorOutput``."""

    def __init__(self, backbone: nn.Module, head: OwlHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, batch: PackedBatch, class_embeddings: torch.Tensor | None = None) -> DetectorOutput:
        """class_embeddings: [K, query_dim] queries for this call (e.g. text embeddings of
        another vocabulary); default the head's own."""
        # Packed tokens straight into the head: no per-image feature maps are needed.
        tokens = self.backbone.forward_features(batch)
        return DetectorOutput(self.head(tokens, batch, class_embeddings=class_embeddings), batch)


def word_embeddings(names: list[str], dim: int) -> torch.Tensor:
    """[K, dim] unit vectors: the normalized sum of one fixed Gaussian vector per word of each
    name (words split on '_' and spaces; a word's vector is seeded by its SHA-256, so it is the
    same for every run and vocabulary)."""
    out = []
    for name in names:
        vecs = []
        for word in name.lower().replace("_", " ").split():
            seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
            vecs.append(np.random.default_rng(seed).standard_normal(dim))
        out.append(np.sum(vecs, axis=0))
    emb = torch.tensor(np.stack(out), dtype=torch.float32)
    return emb / emb.norm(dim=-1, keepdim=True)


def check_query_order(path: str, category_ids: list[int]) -> None:
    """A query file that records its ``category_ids`` (tools/make_text_queries.py) must list
    this dataset's categories in label order (sorted ids); files without them are trusted."""
    if not str(path).endswith(".safetensors"):
        return
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        if "category_ids" not in f.keys():
            return
        ids = f.get_tensor("category_ids").tolist()
    if ids != list(category_ids):
        diff = next((i for i, (a, b) in enumerate(zip(ids, category_ids)) if a != b), min(len(ids), len(category_ids)))
        raise ValueError(f"{path}: its category_ids differ from the dataset's at label {diff} "
                         f"({ids[diff:diff + 3]} vs {list(category_ids)[diff:diff + 3]}): made for another category list")  # fmt: skip


# ---- import edge: HF OWL-ViT / OWLv2 checkpoints -------------------------------------------------
# HF head module -> OwlHead module (Linear layers of the 3-layer MLPs sit at 0, 2, 4).
_HF_HEAD_KEYS = {
    "layer_norm": "norm",
    "class_head.dense0": "class_proj",
    "class_head.logit_shift": "logit_shift",
    "class_head.logit_scale": "logit_scale",
    **{f"{head}.dense{j}": f"{head}.{2 * j}" for head in ("box_head", "objectness_head") for j in range(3)},
}


def _hf_owl_source(model_or_dir: Any, load_weights: bool) -> tuple[Any, dict[str, torch.Tensor] | None]:
    """(config, state dict or None) of an Owlv2ForObjectDetection / OwlViTForObjectDetection
    object or ``save_pretrained`` directory."""
    if isinstance(model_or_dir, nn.Module):
        return model_or_dir.config, model_or_dir.state_dict() if load_weights else None
    from transformers import AutoConfig, AutoModelForZeroShotObjectDetection

    path = Path(model_or_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a save_pretrained directory of an OWL-ViT / OWLv2 detector (no config.json)")
    if not load_weights:
        return AutoConfig.from_pretrained(path), None
    model = AutoModelForZeroShotObjectDetection.from_pretrained(path)
    return model.config, model.state_dict()


def owl_detector_from_hf(model_or_dir: Any, load_weights: bool = True, **backbone_overrides) -> OwlDetector:
    """An :class:`OwlDetector` computing what an HF ``Owlv2ForObjectDetection`` or
    ``OwlViTForObjectDetection`` (a model object, or its ``save_pretrained`` directory) computes,
    on packed native-aspect batches: the CLIP vision tower becomes the NaViT backbone (class
    token merged into every patch token, learned position grid resized per image like
    ``interpolate_pos_encoding``), then the checkpoint's class head (logit shift / scale), box
    head with its corner box bias, and OWLv2's objectness head.

    Queries: pass text embeddings of the class names (``tools/make_text_queries.py --model DIR``
    runs this checkpoint's own text tower) as ``class_embeddings=`` or install them with
    ``head.set_class_embeddings``. ``load_weights=False`` builds the architecture from the
    config alone (evaluating a fine-tuned navit_dense checkpoint). ``backbone_overrides``: NaViT
    options that do not change the function (attn_kernel, drop_path_rate, out_indices, ...)."""
    from ..weight_import import config_from_hf_clip_vision, navit_from_hf_clip_vision

    config, sd = _hf_owl_source(model_or_dir, load_weights)
    kind = getattr(config, "model_type", "")
    if kind not in ("owlv2", "owlvit"):
        raise ValueError(f"{model_or_dir}: expected an OWL-ViT / OWLv2 detector config, got model_type {kind!r}")
    overrides = {"global_pool": "none", "mask_fill": "zeros", **backbone_overrides}
    if sd is None:
        backbone = NaViT(config_from_hf_clip_vision(config, **overrides))
    else:
        backbone = navit_from_hf_clip_vision((sd, config), prefix=f"{kind}.vision_model.", **overrides).train()
    vc = config.vision_config
    head = OwlHead(
        vc.hidden_size,
        0,
        config.text_config.hidden_size,  # class_head.dense0 maps into the text (query) space
        objectness=kind == "owlv2",
        merge_class_token=True,
        detach_objectness=True,
        box_bias="corner",
        norm_eps=vc.layer_norm_eps,
    )
    if sd is not None:
        mapped = {f"{new}.{k[len(old) + 1:]}": v for old, new in _HF_HEAD_KEYS.items() for k, v in sd.items() if k.startswith(old + ".")}
        head.load_state_dict(mapped, strict=True)
    return OwlDetector(backbone, head)


# ---- post-processing ---------------------------------------------------------------------
def target_sizes(batch: PackedBatch, scale: float | torch.Tensor | Sequence | None = None) -> torch.Tensor:
    """float [N, 2] (H, W) to express boxes in: the size each image had before packing
    (``batch.image_sizes``), divided by the augmentation scale the caller applied to the
    original (a float, [N] or per axis [N, 2] as (sy, sx))."""
    sizes = batch.image_sizes.float()
    if scale is None:
        return sizes
    s = torch.as_tensor(scale, dtype=torch.float32, device=sizes.device)
    if s.dim() == 1:
        s = s[:, None]
    if s.dim() > 2 or (s.dim() == 2 and s.shape[0] != sizes.shape[0]):
        raise ValueError(f"scale must be a float, [N] or [N, 2] for N={sizes.shape[0]} images, got shape {tuple(s.shape)}")
    return sizes / s


@torch.no_grad()
def postprocess(
    outputs: OwlOutput,
    batch: PackedBatch,
    topk: int = 300,
    nms_iou: float | None = None,
    score_thresh: float = 0.0,
    *,
    use_objectness: bool = False,
    scale: float | torch.Tensor | Sequence | None = None,
    box_format: str = "xyxy",
    pre_nms_topk: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Per image (input order): {"boxes" [k, 4], "scores" [k], "labels" [k] (class index),
    "token_index" [k]}, sorted by score, k <= topk.

    scores = sigmoid(class logit) (times sigmoid(objectness) with ``use_objectness``); the top
    ``topk`` (token, class) pairs per image are kept (LVIS: 300). With ``nms_iou``, class-wise
    NMS runs on the best ``pre_nms_topk`` (default 4 * topk) pairs first. Boxes are in
    ORIGINAL pixel coordinates: predictions are relative to the image extent, which the
    budget resize stretches per axis, so they map back by the pre-packing size (see
    :func:`target_sizes` for ``scale``), clipped to the image. box_format: xyxy | xywh | cxcywh.
    """
    sizes = target_sizes(batch, scale).to(outputs.pred_boxes.device)
    logits, boxes = outputs.split("logits"), outputs.split("pred_boxes")
    obj = outputs.split("objectness") if use_objectness else [None] * len(logits)
    tokens = outputs.split("token_index")
    pre = topk if nms_iou is None else (pre_nms_topk or 4 * topk)
    results = []
    for i, (lg, bx, ob, tk) in enumerate(zip(logits, boxes, obj, tokens)):
        scores = lg.sigmoid()
        if ob is not None:
            scores = scores * ob.sigmoid()[:, None]
        K = scores.shape[1]
        top, flat = scores.flatten().topk(min(pre, scores.numel()))
        keep = top > score_thresh
        top, flat = top[keep], flat[keep]
        row, label = flat // K, flat % K
        H, W = sizes[i].tolist()
        xyxy = box_convert(bx[row], "cxcywh", "xyxy") * bx.new_tensor([W, H, W, H])
        xyxy = clip_boxes_to_image(xyxy, (round(H), round(W)))
        if nms_iou is not None:
            kept = batched_nms(xyxy, top, label, nms_iou)[:topk]
            xyxy, top, label, row = xyxy[kept], top[kept], label[kept], row[kept]
        out_boxes = xyxy if box_format == "xyxy" else box_convert(xyxy, "xyxy", box_format)
        results.append({"boxes": out_boxes, "scores": top, "labels": label, "token_index": tk[row]})
    return results


def to_coco_results(
    results: Sequence[dict[str, torch.Tensor]],
    image_ids: Sequence[int],
    category_ids: Sequence[int],
    box_format: str = "xyxy",
) -> list[dict]:
    """COCO / LVIS result records {image_id, category_id, bbox [x, y, w, h], score}.
    category_ids maps a class index to its dataset category id."""
    if len(results) != len(image_ids):
        raise ValueError(f"{len(results)} results for {len(image_ids)} image ids")
    cats = np.asarray(category_ids)
    records = []
    for res, image_id in zip(results, image_ids):
        xywh = box_convert(res["boxes"], box_format, "xywh").cpu().tolist()
        for box, score, label in zip(xywh, res["scores"].cpu().tolist(), res["labels"].cpu().tolist()):
            records.append({"image_id": int(image_id), "category_id": int(cats[label]), "bbox": box, "score": float(score)})
    return records
