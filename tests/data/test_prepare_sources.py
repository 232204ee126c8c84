"""prepare() on JSONL/parquet/text sources: shards round-trip, bad input in index.json, several workers give
the same bytes, the shard size limit in MB, and the CLI's counts and --strict."""

from __future__ import annotations

import gzip
import json
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import zstandard
from conftest import tiny_corpus_config

import data_pipeline.prepare as prep
from data_pipeline.config import DataConfig
from data_pipeline.prepare import fingerprint, main, prepare
from data_pipeline.sources import BadInputError
from data_pipeline.tokenizer import load_tokenizer

EXPECTED_BAD = {
    "unreadable": 1,
    "invalid_utf8": 2,
    "malformed_json": 1,
    "missing_text": 2,
    "non_string_text": 1,
}


def _stdlib_texts(n: int) -> list[str]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[::3][:n]
    return [p.read_text(encoding="utf-8")[:400] for p in files]


def _jsonl(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Every input kind with some bad input; returns (root, {document id: text}) of the good documents."""
    root = tmp_path_factory.mktemp("mixed")
    texts = iter(
        _stdlib_texts(48) + ["caf\u00e9 \u4e2d\u6587 \U0001f600\r\n\ttab", "<|endoftext|> stays text"]
    )
    expected: dict[str, str] = {}

    def take(doc_id: str) -> str:
        expected[doc_id] = next(texts)
        return expected[doc_id]

    (root / "txt").mkdir()
    for i in range(5):
        (root / "txt" / f"{i}.txt").write_text(take(f"txt/{i}.txt"), encoding="utf-8")
    (root / "txt" / "latin1.txt").write_bytes("ol\u00e9".encode("latin-1"))  # invalid_utf8
    (root / "txt" / "gone.txt").symlink_to(root / "nowhere")  # unreadable
    lines = [_jsonl([{"text": take(f"plain.jsonl:{n}"), "id": n}]) for n in range(1, 11)]
    lines[3] = b'{"text": broken\n'  # malformed_json
    del expected["plain.jsonl:4"]
    lines[6] = _jsonl([{"title": "no text"}])  # missing_text
    del expected["plain.jsonl:7"]
    lines.append(b'{"text": "\xff"}\n')  # invalid_utf8
    (root / "plain.jsonl").write_bytes(b"".join(lines))
    gz = _jsonl({"text": take(f"packed.jsonl.gz:{n}")} for n in range(1, 11))
    (root / "packed.jsonl.gz").write_bytes(gzip.compress(gz))
    zst = _jsonl({"text": take(f"packed.jsonl.zst:{n}")} for n in range(1, 11)) + _jsonl([{"text": 3}])
    (root / "packed.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(zst))  # non_string_text
    rows = [take(f"rows.parquet:{n}") for n in range(12)] + [None]  # missing_text
    pq.write_table(pa.table({"text": rows, "n": list(range(13))}), root / "rows.parquet", row_group_size=5)
    return root, expected


def _config(root, out, **overrides) -> DataConfig:
    return tiny_corpus_config(root, out, **{"val_fraction": 0.25, "prepare_workers": 1, **overrides})


@pytest.fixture(scope="module")
def mixed_prepared(mixed_corpus, tmp_path_factory) -> tuple[DataConfig, dict]:
    root, _ = mixed_corpus
    cfg = _config(root, tmp_path_factory.mktemp("mixed_prepared"))
    return cfg, prepare(cfg)


def _samples(cfg, index) -> list[tuple[np.ndarray, dict]]:
    paths = [
        str(Path(cfg.prepared_dir) / s["file"])
        for sp in ("train", "val")
        for s in index["splits"][sp]["shards"]
    ]
    return [(s["tokens.npy"], s["json"]) for s in wds.WebDataset(paths, shardshuffle=False).decode()]


def test_every_input_kind_round_trips(mixed_corpus, mixed_prepared):
    _, expected = mixed_corpus
    cfg, index = mixed_prepared
    tok = load_tokenizer(Path(cfg.prepared_dir) / "tokenizer.json")
    samples = _samples(cfg, index)
    assert sorted(meta["path"] for _, meta in samples) == sorted(expected)
    for tokens, meta in samples:
        assert tokens[-1] == index["eot_id"]
        assert tok.decode(tokens[:-1].tolist()) == expected[meta["path"]], meta["path"]


def test_bad_input_is_counted_in_the_index(mixed_prepared):
    _, index = mixed_prepared
    assert index["bad_input"] == EXPECTED_BAD
    assert index["config"]["text_field"] == "text" and index["config"]["shard_max_mb"] == 128.0


def test_two_workers_write_the_same_bytes(mixed_corpus, mixed_prepared, tmp_path, monkeypatch):
    cfg, index = mixed_prepared
    # Small batches and a short in-flight window: many tasks, finishing out of order across the workers.
    monkeypatch.setattr(prep, "ENCODE_BATCH_DOCS", 3)
    monkeypatch.setattr(prep, "IN_FLIGHT_BATCHES_PER_WORKER", 1)
    again = prepare(_config(mixed_corpus[0], tmp_path, prepare_workers=2))
    assert again["splits"] == index["splits"]  # per-shard sha256 included
    assert (tmp_path / "tokenizer.json").read_bytes() == (
        Path(cfg.prepared_dir) / "tokenizer.json"
    ).read_bytes()


def test_shard_size_limit_in_mb(mixed_corpus, tmp_path):
    limit = 25_000  # bytes; tar files grow in 10,240-byte records, so shards hold 20,480 bytes at most
    cfg = _config(mixed_corpus[0], tmp_path, shard_max_mb=limit / 1e6, shard_max_tokens=10**9)
    index = prepare(cfg)
    shards = index["splits"]["train"]["shards"]
    assert len(shards) >= 3
    for shard in shards:
        assert shard["bytes"] == (tmp_path / shard["file"]).stat().st_size
        assert shard["bytes"] <= limit or shard["n_docs"] == 1
    assert fingerprint(cfg) != fingerprint(_config(mixed_corpus[0], tmp_path, shard_max_tokens=10**9))


def test_predicted_sample_bytes_are_exact(tmp_path):
    # Long ids get a pax header: the prediction must count it, or shards could exceed the limit.
    samples = [
        prep._make_sample(i, rel, np.arange(n, dtype=np.uint16))
        for i, (rel, n) in enumerate([("a.txt", 3), ("d/" * 80 + "long.jsonl:12", 700), ("b", 0)])
    ]
    record = prep._write_shard(tmp_path / "x.tar", samples)
    assert record["bytes"] == prep._tar_file_bytes(sum(s.tar_bytes for s in samples))


def test_fingerprint_of_an_older_config_is_unchanged():
    # Pinned from before text_field and shard_max_mb existed: directories prepared then are still reused.
    cfg = DataConfig(source="/corpus/dir", prepared_dir="x")
    assert fingerprint(cfg) == "a567fa5ad54fdd527002bc94c9b6c1e64993514a27069ad387803be19a1ea954"
    assert fingerprint(DataConfig(source="/corpus/dir", prepared_dir="x", text_field="body")) != fingerprint(
        cfg
    )
    assert fingerprint(DataConfig(source="/corpus/dir", prepared_dir="x", prepare_workers=3)) == fingerprint(
        cfg
    )


@pytest.mark.parametrize("field, value", [("shard_max_mb", 0.0), ("prepare_workers", -1), ("text_field", "")])
def test_bad_preparation_values_name_the_key(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"data.{field}"):
        prepare(_config(tmp_path, tmp_path / "out", **{field: value}))


def test_cli_several_sources_prints_counts(mixed_corpus, tmp_path, capsys):
    root, expected = mixed_corpus
    main(["--source", str(root / "*.jsonl*"), "--source", str(root / "txt"), "--out", str(tmp_path),
          "--vocab-size", "300", "--max-corpus-mb", "0", "--val-fraction", "0.25", "--workers", "1"])  # fmt: skip
    out = capsys.readouterr().out
    index = json.loads((tmp_path / "index.json").read_text())
    n_docs = sum(1 for doc_id in expected if not doc_id.startswith("rows.parquet"))
    assert index["splits"]["train"]["n_docs"] + index["splits"]["val"]["n_docs"] == n_docs
    for split in ("train", "val"):
        s = index["splits"][split]
        assert f"{split}: {s['n_docs']} documents, {s['n_tokens']} tokens, {len(s['shards'])} shards" in out
    assert (
        "bad input skipped: 1 unreadable, 2 invalid_utf8, 1 malformed_json, 1 missing_text, 1 non_string_text"
        in out
    )
    assert index["config"]["source"] == f"{root / '*.jsonl*'},{root / 'txt'}"


def test_strict_fails_naming_file_and_line_and_writes_nothing(mixed_corpus, tmp_path):
    root, _ = mixed_corpus
    with pytest.raises(BadInputError, match=f"{root / 'packed.jsonl.zst'} line 11"):
        prepare(_config(root / "packed.jsonl.zst", tmp_path, strict=True))
    with pytest.raises(SystemExit, match=f"error: bad input .* in {root / 'plain.jsonl'} line 4"):
        main(["--source", str(root / "plain.jsonl"), "--out", str(tmp_path), "--strict"])
    assert not list(tmp_path.iterdir())
