"""tools/make_text_queries.py: prompt-ensembled text queries from a local HF dual encoder
(a tiny random SigLIP2 with a word-level tokenizer: nothing downloaded) equal the encoder's
own features averaged per category, in the detector's label order; the detection task
refuses a query file made for another category list."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import load_tool
from safetensors.torch import load_file

from navit_dense.models.heads.owl import OwlHead, check_query_order

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CATEGORIES = [  # unsorted ids, LVIS-style names and synonyms
    {"id": 7, "name": "hot-air_balloon", "synonyms": ["hot-air_balloon"]},
    {"id": 3, "name": "bow_(weapon)", "synonyms": ["bow_(weapon)", "longbow"]},
    {"id": 5, "name": "cat", "synonyms": ["cat", "kitty"]},
]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Siglip2Config, Siglip2Model

    tool = load_tool("make_text_queries")
    words = {w for t in tool.TEMPLATES["clip7"] + tool.TEMPLATES["single"] for w in t.replace("{}", " ").replace(".", " . ").split()}
    words |= {"hot-air", "balloon", "bow", "(weapon)", "cat", "longbow", "kitty", "."}
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *sorted(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = tmp_path_factory.mktemp("siglip2_text")
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(out)
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=len(vocab),
                max_position_embeddings=16, pad_token_id=0, bos_token_id=None, eos_token_id=None)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=8, num_patches=16)
    Siglip2Model(Siglip2Config(text_config=text, vision_config=vision)).eval().save_pretrained(out)
    return out


def _reference(model_dir, prompts_per_class):
    """The encoder's own normalized text features, averaged per class and normalized."""
    from transformers import AutoModel, AutoTokenizer

    model, tokenizer = AutoModel.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for prompts in prompts_per_class:
        inputs = tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt")
        with torch.no_grad():
            feats = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output
        rows.append(F.normalize(F.normalize(feats, dim=-1).mean(0), dim=0))
    return torch.stack(rows)


def test_queries_equal_the_encoders_ensembled_features_in_label_order(encoder_dir, tmp_path):
    tool = load_tool("make_text_queries")
    (tmp_path / "lvis.json").write_text(json.dumps({"images": [], "annotations": [], "categories": CATEGORIES}))
    out = tmp_path / "queries.safetensors"
    assert tool.main(["--model", str(encoder_dir), "--categories", str(tmp_path / "lvis.json"), "--out", str(out), "--synonyms"]) == 0
    saved = load_file(str(out))
    assert saved["category_ids"].tolist() == [3, 5, 7]
    q = saved["class_embeddings"]
    assert q.shape == (3, 32) and torch.allclose(q.norm(dim=-1), torch.ones(3))
    t = tool.TEMPLATES["clip7"]
    names = [["bow (weapon)", "longbow"], ["cat", "kitty"], ["hot-air balloon"]]  # readable, synonyms deduplicated
    expected = _reference(encoder_dir, [[tpl.format(n) for n in ns for tpl in t] for ns in names])
    torch.testing.assert_close(q, expected, atol=1e-5, rtol=1e-5)
    assert not out.with_name(out.name + ".tmp").exists()
    # The detector's head loads the queries tensor of the two-tensor file.
    head = OwlHead(32, 0, 32)
    torch.testing.assert_close(head.load_class_embeddings(out).detach(), q)


def test_query_files_for_another_category_list_are_refused(encoder_dir, tmp_path):
    tool = load_tool("make_text_queries")
    (tmp_path / "lvis.json").write_text(json.dumps({"images": [], "annotations": [], "categories": CATEGORIES}))
    out = tmp_path / "q.safetensors"
    assert tool.main(["--model", str(encoder_dir), "--categories", str(tmp_path / "lvis.json"), "--out", str(out), "--templates", "single"]) == 0
    check_query_order(str(out), [3, 5, 7])
    with pytest.raises(ValueError, match=r"differ from the dataset's at label 1 \(\[5, 7\] vs \[6, 7\]\)"):
        check_query_order(str(out), [3, 6, 7])


def test_bad_inputs_get_clear_errors(encoder_dir, tmp_path, capsys):
    tool = load_tool("make_text_queries")
    cats = tmp_path / "lvis.json"
    cats.write_text(json.dumps({"images": [], "annotations": [], "categories": CATEGORIES}))
    bad_templates = tmp_path / "templates.txt"
    bad_templates.write_text("a photo of a {}.\nno placeholder here\n")
    (tmp_path / "nameless.json").write_text(json.dumps({"images": [], "categories": [{"id": 1, "name": " "}]}))
    (tmp_path / "bad_id.json").write_text(json.dumps({"images": [], "categories": [{"id": "1", "name": "cat"}]}))
    cases = [
        (["--templates", str(bad_templates)], "exactly one '{}'"),
        (["--templates", "clip80"], "not one of"),
        (["--categories", str(tmp_path / "nameless.json")], "empty 'name' (ids [1])"),
        (["--categories", str(tmp_path / "bad_id.json")], "expected an integer"),
        (["--model", str(tmp_path)], "not a save_pretrained directory"),
    ]
    for extra, message in cases:
        argv = ["--model", str(encoder_dir), "--categories", str(cats), "--out", str(tmp_path / "x.safetensors"), *extra]
        assert tool.main(argv) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
