#!/usr/bin/env python
"""Open-vocabulary class queries: text embeddings of a dataset's category names.

    python tools/make_text_queries.py --model DIR --categories LVIS.json --out queries.safetensors
        [--templates clip7|single|FILE] [--synonyms] [--batch 256] [--device auto]

DIR is a local HF ``save_pretrained`` directory of a dual encoder with ``get_text_features``
(SigLIP / SigLIP2, CLIP, ...) and its tokenizer, e.g. google/siglip2-base-patch16-naflex, whose
vision tower is configs/_base_/backbones/siglip2_base_patch16_naflex.yaml, or an OWL-ViT / OWLv2
detector directory (its own text tower: the queries its class head was trained against, see
configs/detection/owlv2_base_patch16_lvis_zeroshot.yaml). Nothing is downloaded.

Per category (LVIS / COCO JSON ``categories``, sorted by id: the detector's label order), each
prompt template is filled with the readable name (``bow_(weapon)`` -> ``bow (weapon)``; with
--synonyms every LVIS synonym too), encoded, L2-normalized, averaged, and normalized again (CLIP's
prompt ensembling, as OWL-ViT uses for its class queries). SigLIP models get
``padding="max_length"`` (how they were trained), others pad to the longest prompt.

Writes ``class_embeddings`` [K, D] float32 and ``category_ids`` [K] int64 (the detection task
checks that they match its categories), with the model, templates and names as metadata.
Use it with ``model.class_embeddings=queries.safetensors model.query_dim=D``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from navit_dense.data.coco_json import Category, load_instances
from navit_dense.data.detection import CategoryMap

TEMPLATES = {
    # CLIP's 7-template ImageNet ensemble (Radford et al. 2021, prompt-engineering notebook).
    "clip7": ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
              "a {} in a video game.", "art of the {}.", "a photo of the small {}."],
    "single": ["a photo of a {}."],
}  # fmt: skip


def readable(name: str) -> str:
    """LVIS-style ``bow_(weapon)`` / ``hot-air_balloon`` -> ``bow (weapon)`` / ``hot-air balloon``."""
    return " ".join(name.replace("_", " ").split())


def load_categories(path: str | Path) -> list[Category]:
    """The categories of a COCO / LVIS JSON (navit_dense.data.load_instances, strict) in the
    detector's label order (CategoryMap: sorted ids)."""
    dataset = load_instances(path, strict=True, require_annotations=False)
    if not dataset.categories:
        raise ValueError(f"{path}: no categories")
    empty = [c.id for c in dataset.categories.values() if not c.name.strip()]
    if empty:
        raise ValueError(f"{path}: categories with an empty 'name' (ids {empty[:5]}) cannot be turned into text")
    return [dataset.categories[i] for i in CategoryMap(dataset.categories.values()).category_ids]


def load_templates(spec: str) -> list[str]:
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--templates {spec!r}: not one of {sorted(TEMPLATES)} and not a file")
    templates = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"{path}: every line must hold exactly one '{{}}' for the class name; bad: {bad[:3]}")
    return templates


def category_prompts(category: Category, templates: list[str], synonyms: bool) -> list[str]:
    names = [category.name, *(category.synonyms if synonyms else ())]
    unique = list(dict.fromkeys(readable(n) for n in names))
    return [t.format(n) for n in unique for t in templates]


class TextEncoder:
    """L2-normalized text features of a local HF dual encoder."""

    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"--model {model_dir}: not a save_pretrained directory (no config.json)")
        self.model = AutoModel.from_pretrained(model_dir).to(device).eval()
        if not hasattr(self.model, "get_text_features"):
            raise ValueError(f"--model {model_dir}: {type(self.model).__name__} has no text tower (get_text_features)")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.device = device
        text_cfg = getattr(self.model.config, "text_config", self.model.config)
        self.max_length = int(getattr(text_cfg, "max_position_embeddings", 64))
        self.siglip = self.model.config.model_type in ("siglip", "siglip2")

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        padding = "max_length" if self.siglip else True
        inputs = self.tokenizer(texts, padding=padding, max_length=self.max_length, truncation=True, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        out = self.model.get_text_features(**inputs)
        features = getattr(out, "pooler_output", out)
        return F.normalize(features.float(), dim=-1).cpu()


def make_queries(encoder, categories: list[Category], templates: list[str], synonyms: bool = False, batch: int = 256) -> torch.Tensor:
    """[K, D] unit class queries: per category, the normalized mean of its normalized prompt features."""
    prompts = [category_prompts(c, templates, synonyms) for c in categories]
    flat = [p for ps in prompts for p in ps]
    features = torch.cat([encoder(flat[i : i + batch]) for i in range(0, len(flat), batch)])
    out, start = [], 0
    for ps in prompts:
        out.append(features[start : start + len(ps)].mean(0))
        start += len(ps)
    return F.normalize(torch.stack(out), dim=-1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="local save_pretrained directory of a dual encoder + tokenizer")
    ap.add_argument("--categories", required=True, help="COCO / LVIS JSON whose 'categories' name the classes")
    ap.add_argument("--out", required=True, help="output .safetensors")
    ap.add_argument("--templates", default="clip7", help=f"{' | '.join(TEMPLATES)} | a file with one '{{}}' template per line")
    ap.add_argument("--synonyms", action="store_true", help="also average over each category's LVIS synonyms")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = ap.parse_args(argv)

    from safetensors.torch import save_file

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        categories = load_categories(args.categories)
        templates = load_templates(args.templates)
        encoder = TextEncoder(args.model, device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    queries = make_queries(encoder, categories, templates, args.synonyms, args.batch)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    metadata = {"model": str(args.model), "templates": json.dumps(templates), "synonyms": str(args.synonyms),
                "names": json.dumps([c.name for c in categories])}  # fmt: skip
    save_file({"class_embeddings": queries.contiguous(), "category_ids": torch.tensor([c.id for c in categories])}, str(tmp), metadata)
    os.replace(tmp, out)  # never a half-written file under the final name
    print(f"{out}: {queries.shape[0]} classes x {queries.shape[1]} dims ({len(templates)} templates{', synonyms' if args.synonyms else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
