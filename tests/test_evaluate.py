"""trainer.evaluate: loss, perplexity and bits per byte of a model on a prepared split or on text files.

The models are random (no training): a tiny GPT written as a weights-only checkpoint with the tokenizer of a
tiny prepared corpus. Every number is checked against a computation done here from the same windows.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import pre_tokenizers

from data_pipeline.config import DataConfig
from data_pipeline.prepare import prepare
from data_pipeline.stream import TokenStream
from data_pipeline.tokenizer import EOT_TOKEN, load_tokenizer, train_tokenizer
from trainer.checkpoint import TrainerState, write_weights_checkpoint
from trainer.config import KernelsConfig, ModelConfig
from trainer.evaluate import main, token_byte_counts, unicode_to_byte
from trainer.model import GPT
from trainer.sharded_state import partition_dim

BLOCK = 32
# Multi-byte characters (2, 3 and 4 bytes in UTF-8): a 300-token vocabulary splits them into byte tokens.
WORDS = ["the", "model", "reads", "tokens", "and", "predicts", "next", "héllo", "wörld", "日本語", "😀", "ünïcödé",
         "def", "return", "value", "—", "shard", "window"]


def _document(i: int) -> str:
    """A deterministic document of a few dozen words; it starts with '#', a token of one byte."""
    words = [WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(20 + i % 9)]
    return "# " + " ".join(words) + ".\n"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A prepared corpus of 40 small documents with a 300-token vocabulary (one process, under a second)."""
    root = tmp_path_factory.mktemp("evaluate")
    source = root / "source"
    source.mkdir()
    for i in range(40):
        (source / f"doc{i:02d}.txt").write_text(_document(i), encoding="utf-8")
    out = root / "prepared"
    prepare(DataConfig(source=str(source), prepared_dir=str(out), vocab_size=300, val_fraction=0.3,
                       prepare_workers=1, shard_max_tokens=200))
    return out


def _write_model(path: Path, tokenizer_json: str | None, vocab: int, zero: bool = False) -> tuple[Path, GPT]:
    """A random GPT (or one with every weight zero: uniform logits) written as a weights-only checkpoint."""
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=vocab, init_std=0.5)
    model = GPT(cfg, KernelsConfig(), vocab, seed=0).eval()
    if zero:
        with torch.no_grad():
            for param in model.parameters():
                param.zero_()
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    weights["embedding.tokens.weight"] = weights["embedding.tokens.weight"][:vocab].contiguous()
    dims = {name: partition_dim(param) for name, param in model.named_parameters()}
    state = TrainerState(step=0, tokens_seen=0, layout={"tp": 1, "pp": 1, "dp": 1},
                         config={"model": dataclasses.asdict(cfg)}, vocab_size=vocab, weights_only=True)
    write_weights_checkpoint(path, state, weights, dims, tokenizer_json)
    return path, model


@pytest.fixture(scope="module")
def model(prepared, tmp_path_factory) -> tuple[Path, GPT]:
    """The checkpoint directory of a random model with the prepared corpus's tokenizer, and the model itself."""
    tokenizer_json = (prepared / "tokenizer.json").read_text()
    vocab = load_tokenizer(prepared / "tokenizer.json").get_vocab_size()
    return _write_model(tmp_path_factory.mktemp("model") / "ckpt", tokenizer_json, vocab)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: a second intra-op thread only spins on a loaded machine."""


def _run(capsys, *argv: str) -> dict:
    """main(argv) succeeds and prints the result as JSON."""
    assert main([*map(str, argv)]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _fails(capsys, *argv: str) -> str:
    """main(argv) exits 2 with a single line on stderr (no traceback); that line."""
    assert main([*map(str, argv)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def _expected_nats(model: GPT, vocab: int, ids: list[int], seq_len: int, n_windows: int) -> tuple[float, int]:
    """Summed cross entropy of the first n_windows windows (seq_len + 1 tokens, stride seq_len) of ids."""
    rows = torch.tensor([ids[w * seq_len : w * seq_len + seq_len + 1] for w in range(n_windows)])
    with torch.no_grad():
        logits = model(rows[:, :-1])[..., :vocab].float()
    nats = F.cross_entropy(logits.reshape(-1, vocab), rows[:, 1:].reshape(-1), reduction="sum")
    return float(nats), rows[:, 1:].numel()


def _vocab(prepared: Path) -> int:
    """The vocabulary of the prepared corpus's tokenizer (the models' vocabulary)."""
    return load_tokenizer(prepared / "tokenizer.json").get_vocab_size()


def _stream_ids(tokenizer, texts: list[str]) -> list[int]:
    """The token stream of documents as training packs them: each one's ids, then the end-of-text id."""
    eot = tokenizer.token_to_id(EOT_TOKEN)
    return [i for text in texts for i in [*tokenizer.encode(text).ids, eot]]


def _covering(texts: list[str], tokenizer) -> tuple[list[str], int]:
    """Documents (a prefix of texts, at least 3) and a seq_len <= BLOCK, >= 4 whose windows cover every token."""
    for n in range(3, len(texts) + 1):
        total = len(_stream_ids(tokenizer, texts[:n]))
        for seq_len in range(BLOCK, 3, -1):
            if (total - 1) % seq_len == 0:
                return texts[:n], seq_len
    raise AssertionError("no covering window length")


# --- the numbers ---------------------------------------------------------------------------------------
def test_prepared_split_loss_matches_independent_computation(prepared, model, capsys):
    """The val split's first windows, as the training evaluation stream cuts them, scored independently."""
    path, gpt = model
    result = _run(capsys, path, "--data", prepared, "--max-tokens", 3 * BLOCK, "--batch-size", 2, "--device", "cpu")
    stream = TokenStream(str(prepared), "val", BLOCK, 3, seed=0, loop=False, shuffle=False)
    inputs, targets = next(stream)
    with torch.no_grad():
        logits = gpt(inputs)[..., : _vocab(prepared)].float()
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    assert result["tokens"] == 3 * BLOCK and result["windows"] == 3
    assert result["loss"] == pytest.approx(expected, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-6)
    assert result["split"] == "val" and result["seq_len"] == BLOCK and result["data"] == [str(prepared)]
    assert result["model"] == str(path) and result["dtype"] == "float32"


def test_text_files_loss_and_bits_per_byte(prepared, model, tmp_path, capsys):
    """Documents of a .txt and a .jsonl, fully covered: every byte but the first token's is predicted."""
    path, gpt = model
    tokenizer = load_tokenizer(prepared / "tokenizer.json")
    texts, seq_len = _covering([_document(i) for i in range(100, 120)], tokenizer)
    (tmp_path / "a.txt").write_text(texts[0], encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[1:]), encoding="utf-8")
    out = tmp_path / "result.json"
    result = _run(capsys, path, "--data", f"{tmp_path / 'a.txt'},{tmp_path / 'b.jsonl'}", "--seq-len", seq_len,
                  "--out", out)
    ids = _stream_ids(tokenizer, texts)
    n_windows = (len(ids) - 1) // seq_len
    nats, n_tokens = _expected_nats(gpt, tokenizer.get_vocab_size(), ids, seq_len, n_windows)
    assert tokenizer.encode(texts[0]).tokens[0] == "#"  # the one token not predicted: one byte
    n_bytes = sum(len(t.encode("utf-8")) for t in texts) - 1
    assert any(len(t.encode("utf-8")) > len(t) for t in texts)  # multi-byte characters are in
    assert (result["tokens"], result["bytes"], result["windows"]) == (len(ids) - 1, n_bytes, n_windows)
    assert result["loss"] == pytest.approx(nats / n_tokens, rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-6)
    assert result["split"] is None and result["seq_len"] == seq_len
    assert json.loads(out.read_text()) == result


def test_several_data_arguments_are_one_stream(prepared, model, tmp_path, capsys):
    """`--data a b` and `--data a,b` evaluate the same stream."""
    path, _ = model
    for i in range(2):
        (tmp_path / f"{i}.txt").write_text(_document(200 + i) * 3, encoding="utf-8")
    files = [tmp_path / "0.txt", tmp_path / "1.txt"]
    spaced = _run(capsys, path, "--data", *files, "--seq-len", 16)
    commas = _run(capsys, path, "--data", ",".join(map(str, files)), "--seq-len", 16)
    assert spaced == {**commas, "data": spaced["data"]} and commas["data"] == spaced["data"]


def test_uniform_logits_give_log_vocab(prepared, tmp_path, capsys):
    """Every weight zero: all real logits are equal, the loss is ln(vocab) and the perplexity the vocabulary."""
    vocab = _vocab(prepared)
    path, _ = _write_model(tmp_path / "zero", (prepared / "tokenizer.json").read_text(), vocab, zero=True)
    result = _run(capsys, path, "--data", prepared, "--split", "train", "--max-tokens", 100)
    assert result["loss"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert result["perplexity"] == pytest.approx(vocab, rel=1e-5)
    assert result["tokens"] == 3 * BLOCK and result["split"] == "train"  # 100 tokens: three whole windows


def test_token_bytes_of_the_byte_level_alphabet():
    """The reversed GPT-2 table covers the byte-level alphabet, and a token's bytes are exactly what it holds."""
    table = unicode_to_byte()
    assert set(table) == set(pre_tokenizers.ByteLevel.alphabet()) and sorted(table.values()) == list(range(256))
    tokenizer = train_tokenizer(["日本語 😀 héllo " * 50], vocab_size=300)
    counts = token_byte_counts(tokenizer, tokenizer.get_vocab_size())
    assert counts[tokenizer.token_to_id(EOT_TOKEN)] == 0
    for text in ["日本語", "😀 héllo", "a\nb"]:
        ids = tokenizer.encode(text).ids
        assert sum(counts[i] for i in ids) == len(text.encode("utf-8"))


# --- bad input -------------------------------------------------------------------------------------------
def test_missing_paths(model, tmp_path, capsys):
    path, _ = model
    (tmp_path / "a.txt").write_text("some text", encoding="utf-8")
    assert "nothere" in _fails(capsys, tmp_path / "nothere", "--data", tmp_path / "a.txt")
    assert "missing.txt" in _fails(capsys, path, "--data", tmp_path / "missing.txt")
    assert "not a prepared directory" in _fails(capsys, path, "--data", tmp_path)
    assert "a directory among files" in _fails(capsys, path, "--data", tmp_path / "a.txt", tmp_path)
    assert "--out" in _fails(capsys, path, "--data", tmp_path / "a.txt", "--out", tmp_path / "no" / "r.json")


def test_text_files_need_the_models_tokenizer(prepared, tmp_path, capsys):
    path, _ = _write_model(tmp_path / "bare", None, _vocab(prepared))
    (tmp_path / "a.txt").write_text(_document(0), encoding="utf-8")
    assert "no tokenizer" in _fails(capsys, path, "--data", tmp_path / "a.txt")


def test_empty_or_unreadable_data(model, tmp_path, capsys):
    path, _ = model
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "short.md").write_text("# a b", encoding="utf-8")
    (tmp_path / "binary.bin").write_bytes(b"# \xff\xfe")
    (tmp_path / "bad.jsonl").write_text('{"text": "# a"}\n{"body": "b"}\n', encoding="utf-8")
    assert "empty" in _fails(capsys, path, "--data", tmp_path / "empty.txt")
    assert "33 tokens" in _fails(capsys, path, "--data", tmp_path / "short.md")
    assert "invalid_utf8" in _fails(capsys, path, "--data", tmp_path / "binary.bin")
    assert "line 2" in _fails(capsys, path, "--data", tmp_path / "bad.jsonl")


def test_prepared_with_another_tokenizer(prepared, tmp_path, capsys):
    other = train_tokenizer([_document(i) + " other words entirely" for i in range(30)], vocab_size=290)
    path, _ = _write_model(tmp_path / "other", other.to_str(), other.get_vocab_size())
    line = _fails(capsys, path, "--data", prepared)
    assert "another tokenizer" in line and str(prepared / "tokenizer.json") in line and str(path) in line


def test_seq_len_beyond_the_context(model, prepared, capsys):
    path, _ = model
    line = _fails(capsys, path, "--data", prepared, "--seq-len", 64)
    assert "64" in line and str(BLOCK) in line
