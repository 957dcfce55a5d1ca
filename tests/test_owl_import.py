"""OWL-ViT / OWLv2 detectors imported from HF transformers (random small configs, nothing
downloaded): the packed NaViT detector computes what the HF detector computes, on HF's own
square input and, one image at a time with ``interpolate_pos_encoding``, at native aspect."""

from __future__ import annotations

import pytest
import torch

from navit_dense.data import pack_images
from navit_dense.models.heads.owl import compute_box_bias, owl_detector_from_hf, token_boxes

transformers = pytest.importorskip("transformers")

P, SIDE, Q = 16, 128, 5
TOL = 1e-4


def hf_detector(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=SIDE, patch_size=P)
    if kind == "owlv2":
        cfg = transformers.Owlv2Config(text_config=text, vision_config=vision, projection_dim=64)
        model = transformers.Owlv2ForObjectDetection(cfg)
    else:
        cfg = transformers.OwlViTConfig(text_config=text, vision_config=vision, projection_dim=64)
        model = transformers.OwlViTForObjectDetection(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # random init leaves LayerNorms at identity: make every weight count
                p.add_(0.1 * torch.randn_like(p))
            elif name.startswith(("class_head.logit", "objectness_head", "box_head")):
                p.mul_(0.1)  # HF's random heads give logits in the hundreds; trained ones are O(10)
    return model.eval()


def hf_outputs(model, images: torch.Tensor, interpolate: bool = False):
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 100, (Q, 8), generator=g).repeat(images.shape[0], 1)  # the same Q queries per image
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=images, attention_mask=torch.ones_like(input_ids),
                    interpolate_pos_encoding=interpolate)  # fmt: skip
    return out


def ours(detector, images: list[torch.Tensor], queries: torch.Tensor):
    batch = pack_images(images, P, max_tokens=[(im.shape[1] // P) * (im.shape[2] // P) for im in images], seq_len=256,
                        num_prefix_tokens=1)  # fmt: skip
    assert batch.layout.grids == tuple((im.shape[1] // P, im.shape[2] // P) for im in images)  # no resampling
    with torch.no_grad():
        return detector(batch, class_embeddings=queries).owl


@pytest.mark.parametrize("kind", ["owlv2", "owlvit"])
def test_parity_on_hf_square_input(kind):
    model = hf_detector(kind)
    images = torch.randn(3, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(2))
    ref = hf_outputs(model, images)
    detector = owl_detector_from_hf(model).eval()
    queries = ref.text_embeds[0]  # the same queries for every image
    out = ours(detector, list(images), queries)
    rows = SIDE // P * (SIDE // P)
    assert out.logits.shape == (3 * rows, Q)
    torch.testing.assert_close(out.logits, ref.logits.reshape(-1, Q), atol=TOL, rtol=0)
    torch.testing.assert_close(out.pred_boxes, ref.pred_boxes.reshape(-1, 4), atol=TOL, rtol=0)
    if kind == "owlv2":
        torch.testing.assert_close(out.objectness, ref.objectness_logits.reshape(-1), atol=TOL, rtol=0)
    else:
        assert out.objectness is None
    # Token order: row-major within each image, images in input order.
    assert torch.equal(out.token_index, torch.arange(rows).repeat(3))


def test_native_aspect_packed_equals_hf_one_image_at_a_time():
    model = hf_detector("owlv2", seed=3)
    g = torch.Generator().manual_seed(4)
    images = [torch.randn(3, h, w, generator=g) for h, w in [(96, 160), (144, 64), (128, 128), (48, 112)]]
    queries = hf_outputs(model, images[2][None]).text_embeds[0]
    detector = owl_detector_from_hf(model).eval()
    out = ours(detector, images, queries)
    logits, boxes, obj = out.split("logits"), out.split("pred_boxes"), out.split("objectness")
    for i, im in enumerate(images):
        ref = hf_outputs(model, im[None], interpolate=True)
        torch.testing.assert_close(logits[i], ref.logits[0], atol=TOL, rtol=0)
        torch.testing.assert_close(boxes[i], ref.pred_boxes[0], atol=TOL, rtol=0)
        torch.testing.assert_close(obj[i], ref.objectness_logits[0], atol=TOL, rtol=0)


@pytest.mark.parametrize("grid", [(8, 8), (3, 7), (6, 2)])
def test_corner_box_bias_is_transformers_own(grid):
    model = hf_detector("owlv2")
    h, w = grid
    tok = torch.arange(h * w)
    ours_bias = compute_box_bias(torch.tensor([[h, w]]), torch.zeros_like(tok), tok, anchor="corner")
    torch.testing.assert_close(ours_bias, model.compute_box_bias(h, w), atol=1e-6, rtol=0)
    # The centre anchor (trained from scratch here) is half a cell before the corner.
    shift = token_boxes(torch.tensor([[h, w]]), torch.zeros_like(tok), tok, "corner") - token_boxes(
        torch.tensor([[h, w]]), torch.zeros_like(tok), tok, "center"
    )
    torch.testing.assert_close(shift[:, :2], torch.tensor([0.5 / w, 0.5 / h]).expand(h * w, 2))


def test_from_a_save_pretrained_directory(tmp_path):
    model = hf_detector("owlv2", seed=5)
    model.save_pretrained(tmp_path)
    images = torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(6))
    ref = hf_outputs(model, images)
    out = ours(owl_detector_from_hf(tmp_path).eval(), list(images), ref.text_embeds[0])
    torch.testing.assert_close(out.logits, ref.logits.reshape(-1, Q), atol=TOL, rtol=0)
    # Architecture only (a fine-tuned checkpoint replaces the weights): same shapes, no file read.
    bare = owl_detector_from_hf(tmp_path, load_weights=False)
    assert {k: v.shape for k, v in bare.state_dict().items()} == {k: v.shape for k, v in owl_detector_from_hf(tmp_path).state_dict().items()}
    with pytest.raises(FileNotFoundError, match="config.json"):
        owl_detector_from_hf(tmp_path / "nope")
