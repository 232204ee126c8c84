"""Hugging Face GPT-2 import and export (trainer/hf_gpt2.py, trainer/convert.py), against transformers itself.

A small random `GPT2LMHeadModel` (no download) with a tokenizer we train is saved as transformers saves it; our
model must compute its logits, the directory exported back must load in transformers with every weight in
place, and the exported tokenizer must encode and decode as ours does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from data_pipeline.tokenizer import EOT_TOKEN, load_tokenizer, tokenizer_from_json, train_tokenizer
from trainer import convert
from trainer.checkpoint import STATE_FILE, checkpoint_problem
from trainer.hf_gpt2 import BUFFER_NAME
from trainer.inference import load_model

transformers = pytest.importorskip("transformers")

MIXED_TEXT = ("Plain ASCII, accents (café, naïve, Ærøskøbing), emoji 😀🚀👩‍💻, CJK 你好世界 こんにちは 안녕하세요,\n"
              "newlines\n\n and\ttabs\t\t, a literal <|endoftext|> inside the text, and   runs of spaces.  ")
CORPUS = [MIXED_TEXT, "The quick brown fox jumps over the lazy dog. " * 4,
          "def main():\n\treturn 0\n" * 3, "Déjà vu: ça va? Über straße! 東京 北京 上海 😀😀 " * 3]
VOCAB_TARGET = 400
SHAPE = {"n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 64, "n_inner": 96}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, VOCAB_TARGET)


@pytest.fixture(scope="module")
def hf_model(tokenizer):
    """A random GPT-2 whose every weight (biases and LayerNorms too) differs from its initial value."""
    eot = tokenizer.token_to_id(EOT_TOKEN)
    config = transformers.GPT2Config(vocab_size=tokenizer.get_vocab_size(), bos_token_id=eot, eos_token_id=eot,
                                     **SHAPE)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, hf_model, tokenizer) -> Path:
    """As `save_pretrained` writes it, with the tokenizer.json."""
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    hf_model.save_pretrained(path)
    (path / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def legacy_dir(tmp_path_factory, hf_dir, hf_model, tokenizer) -> Path:
    """As older GPT-2 directories are: pytorch_model.bin without the "transformer." prefix and with the attention
    mask buffers, and the tokenizer as vocab.json + merges.txt."""
    path = tmp_path_factory.mktemp("hf") / "legacy"
    path.mkdir()
    shutil.copy(hf_dir / "config.json", path / "config.json")
    state = {name.removeprefix("transformer."): t.clone() for name, t in hf_model.state_dict().items()
             if name != "lm_head.weight"}
    for i in range(SHAPE["n_layer"]):
        n = SHAPE["n_positions"]
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, path / "pytorch_model.bin")
    tokenizer.model.save(str(path))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, hf_dir) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "imported"
    assert convert.main(["from-hf", str(hf_dir), "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, checkpoint) -> Path:
    path = tmp_path_factory.mktemp("export") / "gpt2"
    assert convert.main(["to-hf", str(checkpoint), "--out", str(path)]) == 0
    return path


def token_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))


def our_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    loaded = load_model(path, device="cpu", dtype="fp32")
    with torch.no_grad():
        return loaded.model(ids)[..., : loaded.vocab_size]


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def hf_parameters(model) -> dict[str, torch.Tensor]:
    """Its weights without the attention-mask buffers (older versions keep them in the state dict)."""
    return {name: t for name, t in model.state_dict().items()
            if not BUFFER_NAME.fullmatch(name.removeprefix("transformer."))}


# --- import ------------------------------------------------------------------------------------------------


def test_hf_directory_gives_transformers_logits(hf_dir, hf_model, tokenizer):
    ids = token_ids(tokenizer.get_vocab_size())
    torch.testing.assert_close(our_logits(hf_dir, ids), hf_logits(hf_model, ids), atol=1e-5, rtol=0)
    loaded = load_model(hf_dir, device="cpu", dtype="fp32")
    assert (loaded.source, loaded.config.ffn_size, loaded.eot_id) == ("hf", 96, tokenizer.token_to_id(EOT_TOKEN))
    assert loaded.tokenizer.encode(MIXED_TEXT).ids == tokenizer.encode(MIXED_TEXT).ids


def test_legacy_directory_gives_the_same_model(legacy_dir, hf_model, tokenizer):
    ids = token_ids(tokenizer.get_vocab_size())
    torch.testing.assert_close(our_logits(legacy_dir, ids), hf_logits(hf_model, ids), atol=1e-5, rtol=0)
    loaded = load_model(legacy_dir, device="cpu", dtype="fp32")
    assert loaded.tokenizer.encode(MIXED_TEXT).ids == tokenizer.encode(MIXED_TEXT).ids
    ids = loaded.tokenizer.encode(MIXED_TEXT).ids + [loaded.eot_id]
    assert loaded.tokenizer.decode(ids, skip_special_tokens=False) == MIXED_TEXT + EOT_TOKEN


def test_from_hf_checkpoint_gives_transformers_logits(checkpoint, hf_model, tokenizer):
    assert checkpoint_problem(checkpoint) is None
    state = json.loads((checkpoint / STATE_FILE).read_text())
    assert (state["weights_only"], state["layout"], state["vocab_size"]) == (True, {"tp": 1, "pp": 1, "dp": 1},
                                                                             tokenizer.get_vocab_size())
    assert load_tokenizer(checkpoint / "tokenizer.json").to_str() == tokenizer.to_str()
    ids = token_ids(tokenizer.get_vocab_size())
    torch.testing.assert_close(our_logits(checkpoint, ids), hf_logits(hf_model, ids), atol=1e-5, rtol=0)


# --- export ------------------------------------------------------------------------------------------------


def test_exported_directory_loads_in_transformers_with_the_same_logits(exported, checkpoint, tokenizer):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(exported, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    ids = token_ids(tokenizer.get_vocab_size())
    torch.testing.assert_close(hf_logits(model.eval(), ids), our_logits(checkpoint, ids), atol=1e-5, rtol=0)
    config = json.loads((exported / "config.json").read_text())
    eot = tokenizer.token_to_id(EOT_TOKEN)
    assert (config["bos_token_id"], config["eos_token_id"], config["n_inner"]) == (eot, eot, 96)
    assert load_file(str(exported / "model.safetensors")).keys().isdisjoint({"lm_head.weight"})


def test_import_then_export_keeps_every_tensor(exported, hf_model):
    model = transformers.AutoModelForCausalLM.from_pretrained(exported)
    original, roundtrip = hf_parameters(hf_model), hf_parameters(model)
    assert original.keys() == roundtrip.keys()
    for name, tensor in original.items():
        assert torch.equal(roundtrip[name], tensor), name


def test_tp2_checkpoint_exports_the_same_tensors(checkpoint, exported, tmp_path):
    """A checkpoint saved at tp=2 (fabricated from the tp=1 one: each split tensor halved along its partition dim,
    the vocabulary padded for tp=2) exports exactly what the tp=1 one does."""
    tp2 = tmp_path / "tp2"
    tp2.mkdir()
    weights = load_file(str(checkpoint / "model-tp00-pp00.safetensors"))
    meta = json.loads((checkpoint / "shard-tp00-pp00.json").read_text())
    table = weights["embedding.tokens.weight"]
    weights["embedding.tokens.weight"] = torch.cat([table, table.new_zeros(512 - table.shape[0], table.shape[1])])
    for rank in range(2):
        shard = {name: t if meta["partition_dims"][name] is None
                 else t.chunk(2, dim=meta["partition_dims"][name])[rank].contiguous() for name, t in weights.items()}
        save_file(shard, str(tp2 / f"model-tp{rank:02d}-pp00.safetensors"))
        (tp2 / f"shard-tp{rank:02d}-pp00.json").write_text(json.dumps(meta))
    state = json.loads((checkpoint / STATE_FILE).read_text())
    (tp2 / STATE_FILE).write_text(json.dumps({**state, "layout": {"tp": 2, "pp": 1, "dp": 1}}))
    shutil.copy(checkpoint / "tokenizer.json", tp2 / "tokenizer.json")
    out = tmp_path / "hf"
    assert convert.main(["to-hf", str(tp2), "--out", str(out)]) == 0
    expected, got = load_file(str(exported / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_checkpoint_without_tokenizer_exports_with_a_warning(checkpoint, tmp_path, caplog):
    bare = tmp_path / "bare"
    shutil.copytree(checkpoint, bare)
    (bare / "tokenizer.json").unlink()
    with caplog.at_level("WARNING"):
        assert convert.main(["to-hf", str(bare), "--out", str(tmp_path / "hf")]) == 0
    assert any(r.levelname == "WARNING" and "no tokenizer.json" in r.message for r in caplog.records)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "generation_config.json",
                                                                   "model.safetensors"]


def test_to_hf_refuses_a_non_empty_output_directory(checkpoint, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert convert.main(["to-hf", str(checkpoint), "--out", str(tmp_path / "out")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert not (tmp_path / "out.tmp").exists()


def test_from_hf_refuses_an_existing_output_directory(hf_dir, checkpoint, capsys):
    assert convert.main(["from-hf", str(hf_dir), "--out", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "already exists" in err
    assert checkpoint_problem(checkpoint) is None


# --- tokenizer ---------------------------------------------------------------------------------------------


def test_exported_tokenizer_encodes_and_decodes_as_ours(exported, tokenizer):
    hf = transformers.AutoTokenizer.from_pretrained(exported)
    ours = tokenizer_from_json(tokenizer.to_str())
    assert hf.is_fast
    ids = ours.encode(MIXED_TEXT).ids
    assert EOT_TOKEN in MIXED_TEXT and ours.token_to_id(EOT_TOKEN) not in ids  # the literal stays text
    assert hf(MIXED_TEXT)["input_ids"] == hf.encode(MIXED_TEXT) == ids
    with_special = [ours.token_to_id(EOT_TOKEN), *ids, ours.token_to_id(EOT_TOKEN), *ids[:5]]
    assert hf.decode(with_special) == ours.decode(with_special, skip_special_tokens=False)
    assert hf.decode(ids) == MIXED_TEXT
    assert (hf.eos_token, hf.bos_token, hf.model_max_length) == (EOT_TOKEN, EOT_TOKEN, SHAPE["n_positions"])


# --- bad input ---------------------------------------------------------------------------------------------


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def _edit_weights(path: Path, name: str, change) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    tensors[name] = change(tensors.get(name, tensors["transformer.wte.weight"]))
    save_file(tensors, str(path / "model.safetensors"))


def _drop_tensor(path: Path, name: str) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    del tensors[name]
    save_file(tensors, str(path / "model.safetensors"))


class Payload:
    """An object a weights file must not hold (unpickling it could run code)."""


def _unsafe_pickle(path: Path) -> None:
    (path / "model.safetensors").unlink()
    torch.save({"wte.weight": Payload()}, path / "pytorch_model.bin")


def _not_tensors(path: Path) -> None:
    (path / "model.safetensors").unlink()
    torch.save({"wte.weight": [1, 2]}, path / "pytorch_model.bin")


def _other_tokenizer(path: Path) -> None:
    (path / "tokenizer.json").write_text(train_tokenizer(["a small corpus " * 10], 300).to_str())


BAD_INPUTS = {
    "no config.json": (lambda p: (p / "config.json").unlink(), "config.json: missing"),
    "unparsable config.json": (lambda p: (p / "config.json").write_text("{not json"), "config.json: unreadable"),
    "foreign model_type": (lambda p: _edit_config(p, model_type="llama"), "model_type is 'llama'"),
    "other architecture": (lambda p: _edit_config(p, architectures=["GPT2ForSequenceClassification"]),
                           "architectures is ['GPT2ForSequenceClassification']"),
    "field not an integer": (lambda p: _edit_config(p, n_head="four"), "n_head is 'four', not a positive integer"),
    "other activation": (lambda p: _edit_config(p, activation_function="relu"), "activation_function='relu'"),
    "inverse layer scaling": (lambda p: _edit_config(p, scale_attn_by_inverse_layer_idx=True),
                              "scale_attn_by_inverse_layer_idx=true is not supported"),
    "unscaled attention": (lambda p: _edit_config(p, scale_attn_weights=False), "scale_attn_weights=false"),
    "wrong-shaped tensor": (lambda p: _edit_weights(p, "transformer.h.1.attn.c_attn.weight", lambda t: t[:, :-2].contiguous()),
                            "tensor 'h.1.attn.c_attn.weight' has shape (64, 190); config.json implies (64, 192)"),
    "missing tensor": (lambda p: _drop_tensor(p, "transformer.h.0.ln_2.bias"), "no tensor 'h.0.ln_2.bias'"),
    "untied lm_head": (lambda p: _edit_weights(p, "lm_head.weight", lambda t: t + 1), "'lm_head.weight' differs"),
    "unreadable weights": (lambda p: (p / "model.safetensors").write_bytes(b"\x00garbage" * 8),
                           "model.safetensors: unreadable safetensors file"),
    "unsafe pickle": (_unsafe_pickle, "pytorch_model.bin: unreadable or unsafe weights file (refused: it holds Python objects other than "
                                   "tensors and plain values"),
    "pickle of other values": (_not_tensors, "pytorch_model.bin: 'wte.weight' is a list, not a tensor"),
    "no weights": (lambda p: (p / "model.safetensors").unlink(), "no weights (model.safetensors"),
    "tokenizer of another size": (_other_tokenizer, "tokenizer.json: the tokenizer has 269 tokens but config.json has vocab_size=400"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_hf_directory_is_one_line_and_exit_status_2(case, hf_dir, tmp_path, capsys):
    spoil, expected = BAD_INPUTS[case]
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    spoil(bad)
    assert convert.main(["from-hf", str(bad), "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert expected in err
    assert not (tmp_path / "ckpt").exists()
