"""detectron2 plug-in: backbone contract, native-resolution R-CNN, the LVIS LazyConfig end to end.

Runs against a real detectron2 build (see the README); skipped when detectron2 is not installed.
"""

import pytest

pytest.importorskip("detectron2")

import ast
import json
import math
from pathlib import Path

import numpy as np
import torch
from conftest import timm_weight_file
from PIL import Image, ImageDraw

from detectron2.config import LazyCall as L
from detectron2.config import CfgNode, LazyConfig, get_cfg, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.lvis import load_lvis_json
from detectron2.evaluation import inference_on_dataset
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling import build_backbone as d2_build_backbone
from detectron2.structures import ImageList
from detectron2.utils.events import EventStorage

from navit_dense.adapters.detectron2 import NativeResolutionRCNN, NaViTSimpleFPBackbone, add_navit_config
from navit_dense.models.navit import build_backbone

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "detectron2" / "mask_rcnn_navit_lvis.py"
DATASET = "synthetic_lvis_navit_tiny"
NUM_CLASSES = 3
STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}


def _documented_tiny_overrides() -> list[str]:
    """The tiny CPU variant as the config's docstring documents it (so the docs stay runnable)."""
    doc = ast.get_docstring(ast.parse(CONFIG.read_text()))
    block = doc.split("Tiny CPU smoke variant")[1].split("\n(for a dataset")[0]
    return block.split("\n", 1)[1].split()


# The documented tiny CPU variant, plus this test's dataset.
TINY = _documented_tiny_overrides() + [
    f"model.roi_heads.num_classes={NUM_CLASSES}",
    "model.roi_heads.box_predictor.fed_loss_num_classes=2",
    f"dataloader.train.dataset.names={DATASET}",
    f"dataloader.test.dataset.names={DATASET}",
]


def tiny_backbone(**kwargs) -> NaViTSimpleFPBackbone:
    # Built through LazyCall: the backbone must be constructible from a LazyConfig.
    cfg = L(NaViTSimpleFPBackbone)(
        net=L(build_backbone)(name="navit_ti16", depth=2, embed_dim=64, num_heads=2, global_pool="avg", mask_fill="zeros"),
        out_channels=32,
        **kwargs,
    )
    return instantiate(cfg)


# ---- backbone ---------------------------------------------------------------------------------
def test_output_shape_and_padding_constraints():
    backbone = tiny_backbone()
    shapes = backbone.output_shape()
    assert {k: s.stride for k, s in shapes.items()} == STRIDES
    assert all(s.channels == 32 for s in shapes.values())
    assert backbone.size_divisibility == 64
    assert backbone.padding_constraints == {"size_divisibility": 64, "square_size": 0}
    assert tiny_backbone(square_pad=256).padding_constraints["square_size"] == 256
    images = ImageList.from_tensors([torch.zeros(3, 70, 100)], padding_constraints=backbone.padding_constraints)
    assert tuple(images.tensor.shape[-2:]) == (128, 128)


def test_maps_per_image_equal_single_image_runs_and_are_top_left_aligned():
    torch.manual_seed(0)
    backbone = tiny_backbone().eval()
    a, b = torch.randn(3, 70, 100), torch.randn(3, 130, 50)  # not patch multiples, different aspect
    with torch.no_grad():
        both, alone = backbone([a, b]), [backbone([a]), backbone([b])]
    assert tuple(both["p2"].shape[-2:]) == (192 // 4, 128 // 4)  # largest image rounded up to 64
    for i, (img, single) in enumerate(zip((a, b), alone)):
        h, w = img.shape[-2:]
        for name, s in STRIDES.items():
            ref = single[name][0]
            got = both[name][i]
            torch.testing.assert_close(got[:, : ref.shape[1], : ref.shape[2]], ref, atol=1e-5, rtol=0)
            # Each image's map covers its patch-aligned extent ceil(h/16)*16 px, top-left; zeros beyond.
            cells = (math.ceil(math.ceil(h / 16) * 16 / s), math.ceil(math.ceil(w / 16) * 16 / s))
            nonzero = got.abs().sum(0) > 0
            assert nonzero[: cells[0], : cells[1]].all()
            assert not nonzero[cells[0] :].any() and not nonzero[:, cells[1] :].any()

    # detectron2's usual contract (a padded batch tensor) still works: each frame is one image.
    with torch.no_grad():
        padded = backbone(torch.randn(2, 3, 128, 192))
    assert {k: tuple(v.shape) for k, v in padded.items()} == {k: (2, 32, 128 // s, 192 // s) for k, s in STRIDES.items()}


@pytest.mark.parametrize("name, kwargs", [("vit_small_patch16_dinov3", dict(depth=2)),
                                          ("naflexvit_base_patch16_gap", dict(depth=2, embed_dim=96, num_heads=4))])  # fmt: skip
def test_with_pretrained_loads_dinov3_and_naflexvit_files_like_model_backbone_init(name, kwargs, tmp_path):
    """The LazyConfig's ``net=L(with_pretrained)(model=L(build_backbone)(...), path=...)`` uses
    model.backbone.init's loader: a timm DINOv3 file (Eva names, RoPE, storage tokens, LayerScale)
    and a NaFlexVit file (embeds.* names, a Linear over channels-last patches) fill the detector's
    NaViT with the weights a load_pretrained NaViT gets, and it computes timm's patch features."""
    from navit_dense import pack_images
    from navit_dense.models.pretrained import _ARCH_FIELDS, load_pretrained, with_pretrained
    from navit_dense.models.weight_import import navit_from_timm

    vit, path = timm_weight_file(name, kwargs, tmp_path)
    layout = {f: getattr(navit_from_timm(vit).cfg, f) for f in _ARCH_FIELDS}  # the config a user writes for this file
    dense = dict(name="navit_s16", global_pool="avg", mask_fill="zeros", **layout)
    backbone = instantiate(L(NaViTSimpleFPBackbone)(
        net=L(with_pretrained)(model=L(build_backbone)(**dense), path=str(path), format="timm", patch_layout="auto"),
        out_channels=32,
    )).eval()  # fmt: skip

    reference = build_backbone(**dense)
    report = load_pretrained(reference, path)  # what model.backbone.init does
    assert report["kept_initialised"] == [] and report["patch_layout"] == ("channels_last" if name.startswith("naflex") else None)
    ours = backbone.net.state_dict()
    assert ours.keys() == reference.state_dict().keys()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in ours.items())

    image = torch.randn(3, 160, 224)
    net = backbone.net
    batch = pack_images([image], 16, 140, 140 + net.num_prefix_tokens, num_prefix_tokens=net.num_prefix_tokens)
    with torch.no_grad():
        fmap = net(batch).feature_maps[0]  # [D, 10, 14]
        ref = vit.forward_features(image[None])
        ref = ref["patches"] if isinstance(ref, dict) else ref
        features = backbone([image])
    torch.testing.assert_close(fmap, ref[0, vit.num_prefix_tokens :].T.reshape(-1, 10, 14), atol=1e-4, rtol=0)
    assert {k: tuple(v.shape[1:2]) for k, v in features.items()} == {k: (32,) for k in STRIDES}


def test_yacs_registry():
    cfg = get_cfg()
    add_navit_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_navit_simple_fp_backbone"
    cfg.MODEL.NAVIT.NAME = "navit_ti16"
    # What merge_from_file does with a YAML `MODEL: {NAVIT: {OVERRIDES: {depth: 1}}}`.
    cfg.merge_from_other_cfg(CfgNode({"MODEL": {"NAVIT": {"OVERRIDES": {"depth": 1}}}}))
    cfg.merge_from_list(["MODEL.NAVIT.OUT_CHANNELS", "16"])
    backbone = d2_build_backbone(cfg, ShapeSpec(channels=3))
    assert isinstance(backbone, NaViTSimpleFPBackbone) and len(backbone.net.blocks) == 1
    assert {k: (s.channels, s.stride) for k, s in backbone.output_shape().items()} == {k: (16, s) for k, s in STRIDES.items()}
    assert META_ARCH_REGISTRY.get("NativeResolutionRCNN") is NativeResolutionRCNN


# ---- the LazyConfig on a tiny synthetic LVIS-format dataset ----------------------------------
# (height, width): two landscape images of different aspect ratios, one portrait.
IMAGE_SIZES = [(120, 160), (100, 200), (150, 110)]


def _write_dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    (root / "val2017").mkdir(parents=True)
    images, annotations = [], []
    for img_id, (h, w) in enumerate(IMAGE_SIZES, start=1):
        canvas = Image.fromarray(rng.integers(0, 80, (h, w, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(canvas)
        for k in range(2):
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
            poly = [x0, y0, x1, y0, x1, y1, x0, y1]
            draw.polygon(poly, fill=tuple(int(c) for c in rng.integers(120, 255, 3)))
            annotations.append({
                "id": len(annotations) + 1, "image_id": img_id, "category_id": (img_id + k) % NUM_CLASSES + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float((x1 - x0) * (y1 - y0)), "segmentation": [poly],
            })
        name = f"{img_id:012d}.jpg"
        canvas.save(root / "val2017" / name, quality=95)
        images.append({"id": img_id, "height": h, "width": w, "coco_url": f"http://images.cocodataset.org/val2017/{name}",
                       "neg_category_ids": [], "not_exhaustive_category_ids": []})
    categories = []
    for c in range(1, NUM_CLASSES + 1):
        anns = [a for a in annotations if a["category_id"] == c]
        categories.append({"id": c, "name": f"class_{c}", "synset": f"class_{c}.n.01", "frequency": "rcf"[c - 1],
                           "image_count": len({a["image_id"] for a in anns}), "instance_count": len(anns)})
    json_file = root / "lvis_synthetic.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return json_file


@pytest.fixture(scope="module")
def lvis_tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lvis_tiny")
    json_file = _write_dataset(root)
    cats = json.loads(json_file.read_text())["categories"]
    DatasetCatalog.register(DATASET, lambda: load_lvis_json(str(json_file), str(root) + "/"))
    MetadataCatalog.get(DATASET).set(
        json_file=str(json_file), image_root=str(root), evaluator_type="lvis",
        thing_classes=[c["name"] for c in cats],
        class_image_count=[{"id": c["id"], "image_count": c["image_count"]} for c in cats],  # federated loss
    )
    cfg = LazyConfig.load(str(CONFIG))
    LazyConfig.apply_overrides(cfg, TINY)
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    yield cfg, model
    DatasetCatalog.remove(DATASET)
    MetadataCatalog.remove(DATASET)


def test_config_is_lvis_recipe():
    cfg = LazyConfig.load(str(CONFIG))
    pred = cfg.model.roi_heads.box_predictor
    assert cfg.model.roi_heads.num_classes == 1203 and pred.use_fed_loss and pred.use_sigmoid_ce
    assert pred.test_topk_per_image == 300 and pred.test_score_thresh == 0.02
    assert cfg.dataloader.train.sampler.repeat_factors.repeat_thresh == 0.001
    assert cfg.dataloader.evaluator.max_dets_per_image == 300


def test_train_step(lvis_tiny):
    cfg, model = lvis_tiny
    assert isinstance(model, NativeResolutionRCNN) and model.roi_heads.box_predictor.use_fed_loss
    # The config's train loader (repeat-factor sampler from class frequencies) yields batches of 2.
    assert len(next(iter(instantiate(cfg.dataloader.train)))) == 2
    # A deterministic batch of two differently-shaped images through the config's train mapper.
    mapper = instantiate(cfg.dataloader.train.mapper)
    batch = [mapper(d) for d in DatasetCatalog.get(DATASET)[:2]]
    assert batch[0]["image"].shape != batch[1]["image"].shape
    assert all(len(x["instances"]) == 2 and x["instances"].has("gt_masks") for x in batch)

    model.train()
    model.zero_grad()
    with EventStorage(0):
        losses = model(batch)
    assert {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    grad = model.backbone.net.patch_embed.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # Every parameter takes part (DDP with find_unused_parameters=False needs that).
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_inference_in_original_coordinates(lvis_tiny):
    cfg, model = lvis_tiny
    model.eval()
    mapper = instantiate(cfg.dataloader.test.mapper)
    inputs = [mapper(d) for d in DatasetCatalog.get(DATASET)]
    with torch.no_grad():
        outputs = model(inputs)
        raw = model.inference(inputs, do_postprocess=False)
    for x, out, r in zip(inputs, outputs, raw):
        inst = out["instances"]
        H, W = x["height"], x["width"]
        h, w = x["image"].shape[-2:]
        assert (h, w) != (H, W)  # the mapper resized it
        assert inst.image_size == (H, W) and len(inst) > 0
        assert tuple(inst.pred_masks.shape[-2:]) == (H, W)
        expected = r.pred_boxes.tensor * torch.tensor([W / w, H / h, W / w, H / h])
        expected[:, 0::2] = expected[:, 0::2].clamp(0, W)
        expected[:, 1::2] = expected[:, 1::2].clamp(0, H)
        torch.testing.assert_close(inst.pred_boxes.tensor, expected)


def test_lvis_evaluator_end_to_end(lvis_tiny):
    import lvis

    cfg, model = lvis_tiny
    model.eval()
    original = lvis.LVISEval
    evaluator = instantiate(cfg.dataloader.evaluator)
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), evaluator)
    assert lvis.LVISEval is original  # the np.float fix is scoped to evaluate()
    for task in ("bbox", "segm"):
        assert set(results[task]) >= {"AP", "AP50", "APr", "APc", "APf"}
        assert math.isfinite(results[task]["AP"]) and 0 <= results[task]["AP"] <= 100
