"""An imported OWLv2 evaluated zero-shot on LVIS-format data from its config, packed at native
aspect and square-padded as HF's processor does, at several max resolutions; then fine-tuned
through the engine and evaluated from its checkpoint (random small OWLv2 saved with
save_pretrained, queries from its own text tower: nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_tool
from test_owl_import import hf_detector

from navit_dense.data.synthetic.lvis_shapes import LvisShapesSpec, generate

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "detection" / "owlv2_base_patch16_lvis_zeroshot.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("owl_zeroshot")
    paths = generate(LvisShapesSpec(out=root / "data", train_images=16, val_images=8, num_classes=6, min_side=64, max_side=160, format="png"))
    owl = root / "owlv2"
    hf_detector("owlv2", seed=7).save_pretrained(owl)
    tool = load_tool("make_text_queries")
    cats = json.loads(paths["val"].read_text())["categories"]
    words = {w for t in tool.TEMPLATES["clip7"] for w in t.replace("{}", " ").replace(".", " . ").split()}
    words |= {w for c in cats for w in c["name"].replace("_", " ").split()}
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *sorted(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", model_max_length=16).save_pretrained(owl)
    queries = root / "queries.safetensors"
    assert tool.main(["--model", str(owl), "--categories", str(paths["val"]), "--out", str(queries)]) == 0
    overrides = [f"model.hf_owl={owl}", f"model.class_embeddings={queries}", f"data.val_json={paths['val']}",
                 f"data.val_images={paths['images']}", "data.max_tokens_per_image=64", "data.seq_len=72",
                 "data.tokens_per_batch=576", "train.device=cpu"]  # fmt: skip
    return root, paths, overrides


def test_zero_shot_sweep_native_and_square(setup):
    root, _, overrides = setup
    report = root / "sweep.json"
    argv = ["--config", str(CONFIG), "--max-res", "64,128", "--layouts", "native,square", "--out", str(root / "sweep"),
            "--json", str(report), *overrides, f"output_dir={root / 'zs'}"]  # fmt: skip
    assert load_tool("eval_lvis").main(argv) == 0
    rows = json.loads(report.read_text())["rows"]
    assert [(r["layout"], r["max_res"]) for r in rows] == [("native", 64), ("native", 128), ("square", 64), ("square", 128)]
    by = {(r["layout"], r["max_res"]): r for r in rows}
    for res in (64, 128):
        # same budget: a square canvas spends it all, the native image only its own aspect's share
        assert by[("square", res)]["mean_tokens_per_image"] == (res // 16) ** 2
        assert by[("native", res)]["mean_tokens_per_image"] < by[("square", res)]["mean_tokens_per_image"]
        for layout in ("native", "square"):
            r = by[(layout, res)]
            assert r["images"] == 8 and r["images_per_s"] > 0 and 0 <= r["AP"] <= 1
    assert (root / "sweep" / "resolution_sweep.png").stat().st_size > 0
    csv = (root / "sweep" / "resolution_sweep.csv").read_text().splitlines()
    assert csv[0].startswith("layout,max_res") and len(csv) == 5


def test_square_padding_keeps_pixel_coordinates(setup):
    """The square canvas is the image at its top-left: detections need no remapping."""
    import navit_dense.tasks  # noqa: F401
    from navit_dense.engine.config import load_config, to_object
    from navit_dense.engine.registry import get_task

    _, _, overrides = setup
    c = to_object(load_config(CONFIG, [*overrides, "data.square_pad=true", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]"]))
    task = get_task("detection")(c)
    image = torch.rand(3, 40, 70)
    out = task._pad_to_square(image)
    assert out.shape == (3, 70, 70) and torch.equal(out[:, :40, :70], image)
    assert torch.allclose(out[:, 40:], torch.tensor(-2.0))  # black after normalization: (0 - 0.5) / 0.25


def test_fine_tune_the_imported_detector_then_evaluate_its_checkpoint(setup):
    root, paths, overrides = setup
    run = root / "ft"
    train = [*overrides, f"data.train_json={paths['train']}", f"data.train_images={paths['images']}", "train.steps=2",
             "train.log_every=1", "optim.warmup_steps=0", f"output_dir={run}"]  # fmt: skip
    assert load_tool("train").main(["--config", str(CONFIG), *train]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and "AP" in summary["final_metrics"]
    report = root / "ft_sweep.json"
    argv = ["--config", str(CONFIG), "--checkpoint", str(run / "checkpoints" / "last"), "--max-res", "96",
            "--json", str(report), *overrides]  # fmt: skip
    assert load_tool("eval_lvis").main(argv) == 0
    (row,) = json.loads(report.read_text())["rows"]  # the architecture from config.json, the weights from the checkpoint
    assert row["layout"] == "native" and row["images"] == 8 and 0 <= row["AP"] <= 1


def test_square_padded_detections_are_clipped_to_the_image(setup):
    """A box over the square canvas is clipped to the real image, not to the padding."""
    from navit_dense.engine.config import load_config, to_object
    from navit_dense.engine.registry import get_task
    from navit_dense.engine.task import PackPlan
    from navit_dense.models.heads.owl import DetectorOutput, OwlOutput

    _, _, overrides = setup
    task = get_task("detection")(to_object(load_config(CONFIG, [*overrides, "data.square_pad=true"])))
    ds = task.build_dataset("val")
    samples = [ds[i] for i in range(3)]
    plan = PackPlan(max_tokens=[64] * 3, seed=0, patch_size=16, seq_len=72, num_prefix_tokens=1, algorithm="balanced", token_drop=None)
    batch, targets = task.collate(samples, plan)
    assert all(h == w for h, w in batch.layout.image_sizes)  # packed as squares
    T, K = batch.layout.token_offsets[-1], len(task.categories())
    whole = torch.tensor([[0.5, 0.5, 1.0, 1.0]]).expand(T, 4)  # every token: the whole square canvas
    owl = OwlOutput(torch.zeros(T, K), whole, None, torch.zeros(T, 1), batch.patch_image,
                    torch.zeros(T, dtype=torch.long), torch.tensor(batch.layout.token_offsets), batch.layout.token_offsets)  # fmt: skip
    evaluator = task.build_evaluator()
    evaluator.process(DetectorOutput(owl, batch), targets)
    sizes = {t["image_id"]: t["orig_size"] for t in targets}
    assert evaluator.results and any(max(sizes[r["image_id"]]) > min(sizes[r["image_id"]]) for r in evaluator.results)
    for r in evaluator.results:
        H, W = sizes[r["image_id"]]
        x, y, w, h = r["bbox"]
        assert x >= 0 and y >= 0 and x + w <= W + 1e-3 and y + h <= H + 1e-3
