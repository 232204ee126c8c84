"""prepare(): shard format, index.json, atomic writes, and the auto/always/never policy."""

from __future__ import annotations

import hashlib
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import TINY_SHARD_TOKENS, tiny_corpus_config

import data_pipeline.prepare as prep
from data_pipeline.prepare import ensure_prepared, fingerprint, load_index, main, prepare
from data_pipeline.tokenizer import load_tokenizer


def _shard_paths(cfg, index, split):
    return [Path(cfg.prepared_dir) / s["file"] for s in index["splits"][split]["shards"]]


def _read_docs(paths):
    """Samples of the shards read with plain webdataset, as (key, tokens, metadata)."""
    ds = wds.WebDataset([str(p) for p in paths], shardshuffle=False).decode()
    return [(s["__key__"], s["tokens.npy"], s["json"]) for s in ds]


def test_index_contents_and_checksums(tiny_prepared):
    cfg, index = tiny_prepared
    out = Path(cfg.prepared_dir)
    assert load_index(out) == index
    tok = load_tokenizer(out / index["tokenizer"])
    assert index["fingerprint"] == fingerprint(cfg)
    assert index["vocab_size"] == tok.get_vocab_size() and index["dtype"] == "uint16"
    assert index["eot_id"] == tok.token_to_id("<|endoftext|>")
    assert len(index["splits"]["train"]["shards"]) >= 4, "the tiny corpus should span several shards"
    for split in ("train", "val"):
        entry = index["splits"][split]
        assert entry["n_docs"] > 0
        assert entry["n_tokens"] == sum(s["n_tokens"] for s in entry["shards"])
        for i, shard in enumerate(entry["shards"]):
            path = out / shard["file"]
            assert shard["file"] == f"{split}-{i:05d}.tar"
            assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
            assert path.stat().st_size == shard["bytes"]
            assert shard["n_tokens"] <= TINY_SHARD_TOKENS or shard["n_docs"] == 1
    assert not list(out.glob("*.tmp"))


def test_shards_are_plain_webdataset(tiny_prepared):
    cfg, index = tiny_prepared
    eot = index["eot_id"]
    for split in ("train", "val"):
        paths = _shard_paths(cfg, index, split)
        docs = _read_docs(paths)
        assert len(docs) == index["splits"][split]["n_docs"]
        assert sum(t.size for _, t, _ in docs) == index["splits"][split]["n_tokens"]
        for key, tokens, meta in docs:
            assert tokens.dtype == np.uint16 and tokens[-1] == eot and eot not in tokens[:-1]
            assert meta["n_tokens"] == tokens.size and "." not in key
        with tarfile.open(paths[0]) as tar:
            names = tar.getnames()
        assert names and all(n.endswith((".tokens.npy", ".json")) for n in names)


def test_shards_decode_to_the_documents(tiny_prepared, tiny_corpus):
    cfg, index = tiny_prepared
    tok = load_tokenizer(Path(cfg.prepared_dir) / "tokenizer.json")
    docs = _read_docs(_shard_paths(cfg, index, "train") + _shard_paths(cfg, index, "val"))
    for _, tokens, meta in docs:
        text = (tiny_corpus / meta["path"]).read_bytes().decode("utf-8")
        assert tok.decode(tokens[:-1].tolist()) == text


def test_unigram_entropy_matches_train_tokens(tiny_prepared):
    cfg, index = tiny_prepared
    tokens = np.concatenate([t for _, t, _ in _read_docs(_shard_paths(cfg, index, "train"))])
    p = np.bincount(tokens) / tokens.size
    p = p[p > 0]
    expected = float(-(p * np.log(p)).sum())
    assert index["train_unigram_entropy_nats"] == pytest.approx(expected, rel=1e-9)
    assert 0 < expected < math.log(index["vocab_size"])


def test_failure_mid_prepare_leaves_no_shard(tiny_corpus, tmp_path, monkeypatch):
    real_write = prep._write_shard
    calls = []

    def failing_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(prep, "_write_shard", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(tiny_corpus_config(tiny_corpus, tmp_path))
    assert not list(tmp_path.glob("*.tar")) and not list(tmp_path.glob("*.tmp"))
    assert not (tmp_path / "index.json").exists()


def test_failed_reprepare_keeps_previous_data_consistent(tiny_corpus, tmp_path, monkeypatch):
    cfg = tiny_corpus_config(tiny_corpus, tmp_path)
    index = prepare(cfg)
    monkeypatch.setattr(prep, "_write_shard", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        prepare(tiny_corpus_config(tiny_corpus, tmp_path, seed=8))
    assert load_index(tmp_path) == index
    for shard in index["splits"]["train"]["shards"]:
        assert hashlib.sha256((tmp_path / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    assert not list(tmp_path.glob("*.tmp"))


def test_auto_reuses_then_reprepares_on_changed_config(tiny_corpus, tmp_path, monkeypatch):
    cfg = tiny_corpus_config(tiny_corpus, tmp_path)
    first = ensure_prepared(cfg)
    calls = []
    real_prepare = prep.prepare
    monkeypatch.setattr(prep, "prepare", lambda c: calls.append(c) or real_prepare(c))
    assert ensure_prepared(cfg) == first and not calls  # same fingerprint: reused

    bigger = tiny_corpus_config(tiny_corpus, tmp_path, shard_max_tokens=4 * TINY_SHARD_TOKENS)
    second = ensure_prepared(bigger)
    assert len(calls) == 1 and second["fingerprint"] == fingerprint(bigger) != first["fingerprint"]
    # Shards of the older, finer sharding are gone: the directory holds exactly what the index lists.
    listed = {s["file"] for split in ("train", "val") for s in second["splits"][split]["shards"]}
    assert {p.name for p in tmp_path.glob("*.tar")} == listed

    (tmp_path / second["splits"]["train"]["shards"][0]["file"]).unlink()  # damaged directory
    ensure_prepared(bigger)
    assert len(calls) == 2

    ensure_prepared(
        tiny_corpus_config(tiny_corpus, tmp_path, shard_max_tokens=4 * TINY_SHARD_TOKENS, prepare="always")
    )
    assert len(calls) == 3


def test_never_without_index_raises(tmp_path):
    cfg = tiny_corpus_config(tmp_path / "corpus", tmp_path / "prepared", prepare="never")
    with pytest.raises(FileNotFoundError, match="data.prepare='never'.*index.json"):
        ensure_prepared(cfg)


def test_token_dtype():
    assert prep.token_dtype(4096) == np.uint16 and prep.token_dtype(65535) == np.uint16
    assert prep.token_dtype(65536) == np.uint32 and prep.token_dtype(200_000) == np.uint32


def test_loaded_tokenizer_gives_identical_shards(tiny_prepared, tiny_corpus, tmp_path):
    cfg, index = tiny_prepared
    tok_path = str(Path(cfg.prepared_dir) / "tokenizer.json")
    again = prepare(tiny_corpus_config(tiny_corpus, tmp_path, tokenizer_path=tok_path, seed=cfg.seed))
    assert again["splits"] == index["splits"]  # same tokenizer and data: byte-identical shards
    assert again["fingerprint"] != index["fingerprint"]


def test_cli(tiny_corpus, tmp_path, capsys):
    main(["--source", str(tiny_corpus), "--out", str(tmp_path), "--vocab-size", "300", "--max-corpus-mb", "0",
          "--shard-max-tokens", "5000", "--val-fraction", "0.2"])  # fmt: skip
    out = capsys.readouterr().out
    assert "train:" in out and "val:" in out and "tokens" in out and "shards" in out
    assert json.loads((tmp_path / "index.json").read_text())["config"]["vocab_size"] == 300
