"""tools/compare_navit_vit.py: its FLOP accounting against torch's own FLOP counter, the square
regimes' data paths, and a tiny end-to-end run (JSON shape, equal compute, padding counted)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import box_convert

import navit_dense as nd
from navit_dense.data import TokenDrop
from navit_dense.data.detection import DetectionSample
from navit_dense.engine.config import load_config, to_object
from navit_dense.engine.registry import get_task
from navit_dense.engine.task import PackPlan

from conftest import load_tool

tool = load_tool("compare_navit_vit")

DET_DATA = {"train_images": 36, "val_images": 8, "num_classes": 12, "min_side": 64, "max_side": 160}
SEG_DATA = {"seed": 0, "n_train": 12, "n_val": 4, "min_side": 64, "max_side": 160}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny synthetic datasets, made once (the end-to-end run reuses them from its --work)."""
    work = tmp_path_factory.mktemp("compare")
    det = {**load_tool("demo").DATA_PARAMS, **DET_DATA}
    return work, tool.detection_data(work / "data_detection", det), tool.segmentation_data(work / "data_segmentation", SEG_DATA)


def _matmul_flops(counts: dict) -> float:
    """Matrix-multiply and convolution FLOPs of one module in a FlopCounterMode table (SDPA
    excluded: torch counts it on some backends and not on others)."""
    return float(sum(v for op, v in counts.items() if str(op).split(".")[1] in ("mm", "addmm", "bmm", "convolution")))


def test_flops_match_torch_flop_counter():
    """Every Linear / Conv as run (sequence padding included) equals torch's own count of the
    model's matmuls and convolutions; attention is 4 * D * (each image's run length)^2 per block;
    the planner's layout-only count of the blocks agrees; eval forwards are not counted."""
    torch.manual_seed(0)
    model = nd.build_backbone("navit_ti16", depth=2, embed_dim=64, num_heads=2, global_pool="none", class_token=True,
                              conv_stem=[8, 16]).train()  # fmt: skip
    images = [torch.rand(3, h, w) for h, w in ((64, 160), (96, 96), (48, 112))]
    batch = nd.pack_images(images, patch_size=16, max_tokens_per_image=30, seq_len=48, num_prefix_tokens=1,
                           token_drop=TokenDrop(mode="constant", rate=0.3), seed=[1, 2, 3])  # fmt: skip
    lay = batch.layout
    slots = lay.num_sequences * lay.seq_len
    assert slots > lay.num_tokens  # the batch holds sequence padding: it must be counted
    compute = tool.TrainCompute().attach(model)
    with FlopCounterMode(display=False) as counter:
        model(batch)
    table = counter.get_flop_counts()
    torch_all = _matmul_flops(table["Global"])
    torch_blocks = sum(_matmul_flops(table[name]) for name in table if name.split(".")[-2:-1] == ["blocks"])
    assert 0 < torch_blocks < torch_all  # the stem and patch embedding are counted too
    assert torch_blocks == pytest.approx(sum(tool.linear_flops_per_token(b) for b in model.blocks) * slots, rel=1e-9)
    attention = 2 * 4 * 64 * sum((k + 1) ** 2 for k in lay.num_kept)  # 2 blocks, width 64, one class token per image
    assert compute.forward_flops == pytest.approx(torch_all + attention, rel=1e-9)
    assert compute.blocks_forward_flops == pytest.approx(torch_blocks + attention, rel=1e-9)
    assert compute.blocks_forward_flops == pytest.approx(tool.blocks_forward_flops(model.blocks, batch), rel=1e-12)  # the planner's count
    assert compute.train_flops == 3 * compute.forward_flops
    assert (compute.train_tokens, compute.image_tokens, compute.images, compute.forwards) == (slots, lay.num_tokens, 3, 1)
    model.eval()
    with torch.no_grad():
        model(batch)
    assert compute.forwards == 1  # evaluation is not training compute
    compute.detach()
    model.train()(batch)
    assert compute.forwards == 1


def test_detection_square_pad_trains_on_boxes_relative_to_the_square(data):
    work, det_over, _ = data
    c = to_object(load_config(tool.regime_config("detection", "vit"), det_over))
    task = get_task("detection")(c)
    task.build_model()
    H, W = 64, 128
    box = torch.tensor([[10.0, 20.0, 50.0, 40.0]])
    sample = DetectionSample(image=torch.rand(3, H, W), boxes=box, labels=torch.tensor([0]), orig_size=(H, W))
    plan = PackPlan(max_tokens=[64], seed=[0], patch_size=16, seq_len=64, num_prefix_tokens=0, algorithm="balanced", token_drop=None, train=True)
    batch, targets = task.collate([sample], plan)
    assert batch.layout.grids == ((8, 8),) and batch.layout.image_sizes == ((W, W),)  # padded to the longer side
    assert torch.allclose(targets[0]["boxes"] * W, box_convert(box, "xyxy", "cxcywh"))  # the square's pixels are the image's


def test_segmentation_square_resize(data):
    work, _, seg_over = data
    c = to_object(load_config(tool.regime_config("segmentation", "vit"), seg_over))
    task = get_task("segmentation")(c)
    label = torch.zeros(48, 128, dtype=torch.long)
    label[:, 64:] = 1
    sample = {"image": torch.rand(3, 48, 128), "label": label, "index": 0, "budget_scale": 1.0}
    plan = PackPlan(max_tokens=[16], seed=[0], patch_size=16, seq_len=16, num_prefix_tokens=0, algorithm="balanced", token_drop=None, train=True)
    batch, targets = task.collate([sample], plan)
    assert batch.layout.grids == ((4, 4),)
    (y,) = targets["labels"]  # stretched with the image: the right half is still class 1
    assert y.shape == (64, 64) and (y[:, 32:] == 1).all() and (y[:, :32] == 0).all()
    batch, targets = task.collate([sample], PackPlan(max_tokens=[16], seed=[0], patch_size=16, seq_len=16, num_prefix_tokens=0,
                                                     algorithm="balanced", token_drop=None))  # fmt: skip
    assert batch.layout.grids == ((4, 4),) and targets["labels"][0].shape == (48, 128)  # evaluated at the original size
    with pytest.raises(ValueError, match="square_resize"):
        get_task("segmentation")(to_object(load_config(tool.regime_config("segmentation", "vit"), [*seg_over, "data.eval_mode=slide"])))


def test_tiny_comparison_end_to_end(data, capsys):
    work, _, _ = data
    out = work / "tiny.json"
    argv = ["--quick", "--json", str(out), "--work", str(work), "--seeds", "0", "--max-res", "64,128", "--curve-points", "1",
            "--steps", "detection=8", "--steps", "segmentation=6", "--threads", "1", "--markdown",
            *(f"--data=detection.{k}={v}" for k, v in DET_DATA.items()), *(f"--data=segmentation.{k}={v}" for k, v in SEG_DATA.items()),
            "--navit", "data.tokens_per_batch=512", "--vit", "data.tokens_per_batch=512"]  # fmt: skip
    assert tool.main(argv) == 0
    result = json.loads(out.read_text())
    for task, metrics in (("detection", ("AP", "APr")), ("segmentation", ("mIoU",))):
        navit, vit = result[task]["navit"], result[task]["vit"]
        assert abs(vit["train_flops"] / navit["train_flops"] - 1) <= 0.05
        for e in (navit, vit):
            assert e["train_flops"] > 0 and e["train_tokens"] >= e["image_tokens"] > 0
            assert set(e["eval"]) == {"64", "128"}
            for row in e["eval"].values():
                assert all(k in row and k in row["sd"] for k in metrics)
        (v,) = vit["seeds"]
        assert v["planned_train_flops"] == pytest.approx(v["train_flops"], rel=0.01)  # the plan is the stream it trained on
        assert 0 < navit["train_flops_blocks"] < navit["train_flops"]
        assert navit["seeds"][0]["steps"] == {"detection": 8, "segmentation": 6}[task]
        budget = load_config(tool.regime_config(task, "vit")).data.max_tokens_per_image
        # Every square image costs the whole budget grid (padding included); NaViT's images cost less.
        assert vit["image_tokens"] == vit["images"] * budget
        assert navit["image_tokens"] < navit["images"] * budget
        assert vit["eval"]["128"]["tokens_per_image"] == 64 and navit["eval"]["128"]["tokens_per_image"] < 64
    assert result["meta"]["seeds"] == [0]
    csv = out.with_suffix(".csv").read_text().splitlines()
    assert csv[0].startswith("task,regime,max_res,metric") and len(csv) == 1 + 2 * 2 * (5 + 3)
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| detection | navit |" in capsys.readouterr().out


def test_bad_input_exits_2(tmp_path, capsys):
    assert tool.main(["--quick", "--json", str(tmp_path / "x.json"), "--tasks", "classification"]) == 2
    assert tool.main(["--quick", "--json", str(tmp_path / "x.json"), "--data", "detection.nope=1"]) == 2
    assert "nope" in capsys.readouterr().err


def test_packing_off_key(data):
    """data.max_images_per_seq=1 (packing off, a README ablation key) reaches the engine's packer."""
    from navit_dense.engine.data import build_loader

    _, _, seg_over = data
    layouts = {}
    for limit in (0, 1):
        c = to_object(load_config(tool.regime_config("segmentation", "navit"), [*seg_over, f"data.max_images_per_seq={limit}"]))
        task = get_task("segmentation")(c)
        loader = build_loader(task, task.build_dataset("train"), c, patch_size=16, num_prefix_tokens=0, train=True, world_size=1, rank=0)
        loader.batch_sampler.set_epoch(0)
        layouts[limit] = next(iter(loader)).batch.layout
    assert layouts[0].num_sequences < layouts[0].num_images  # packed
    assert layouts[1].num_sequences == layouts[1].num_images == layouts[0].num_images  # same images, one per sequence
