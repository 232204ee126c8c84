"""Reading each input format, document ids, and bad input: counted and skipped, or fatal with --strict."""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_pipeline.corpus import iter_documents, parse_sources
from data_pipeline.sources import BAD_INPUT_KINDS, BadInputError, BadInputLog

TEXTS = [
    "first doc\n",
    "caf\u00e9 \u4e2d\u6587 \U0001f600\r\nline",
    "x = 1\n\tindented  ",
    "<|endoftext|> literal",
]


def _jsonl_bytes(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def _read(source, text_field="text", strict=False, cap_mb=0):
    log = BadInputLog(strict=strict)
    return dict(iter_documents(str(source), cap_mb, text_field, log)), log.as_dict()


def _no_bad(**counts) -> dict:
    return {kind: counts.get(kind, 0) for kind in BAD_INPUT_KINDS}


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_formats_one_document_per_line(tmp_path, suffix):
    data = _jsonl_bytes({"text": t, "meta": i} for i, t in enumerate(TEXTS))
    data = gzip.compress(data) if suffix.endswith(".gz") else data
    data = zstandard.ZstdCompressor().compress(data) if suffix.endswith(".zst") else data
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / f"part{suffix}").write_bytes(data)
    docs, bad = _read(tmp_path)
    assert docs == {f"sub/part{suffix}:{i + 1}": t for i, t in enumerate(TEXTS)}
    assert bad == _no_bad()


def test_parquet_one_document_per_row_and_text_field(tmp_path):
    table = pa.table({"id": list(range(len(TEXTS))), "body": TEXTS})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=2)  # rows numbered across row groups
    docs, bad = _read(tmp_path, text_field="body")
    assert docs == {f"t.parquet:{i}": t for i, t in enumerate(TEXTS)} and bad == _no_bad()


def test_parquet_binary_column_is_decoded_strictly(tmp_path):
    pq.write_table(
        pa.table({"text": pa.array([b"ok bytes", b"\xff\xfe bad", None], pa.binary())}),
        tmp_path / "b.parquet",
    )
    docs, bad = _read(tmp_path)
    assert docs == {"b.parquet:0": "ok bytes"}
    assert bad == _no_bad(invalid_utf8=1, missing_text=1)


def test_jsonl_bad_lines_are_counted_and_skipped(tmp_path, caplog):
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b'{"text": "unterminated',
        json.dumps({"other": "no text"}).encode(),
        json.dumps({"text": 42}).encode(),
        b"",  # blank: not a document, not an error
        b'{"text": "bad \xff byte"}',
        json.dumps(["a", "list"]).encode(),
        json.dumps({"text": None}).encode(),
        json.dumps({"text": ""}).encode(),  # empty document: dropped silently
        json.dumps({"text": "good two"}).encode() + b"\r",
    ]
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.WARNING, logger="data_pipeline.sources"):
        docs, bad = _read(tmp_path)
    assert docs == {"d.jsonl:1": "good one", "d.jsonl:10": "good two"}
    assert bad == _no_bad(malformed_json=2, missing_text=2, non_string_text=1, invalid_utf8=1)
    assert f"{tmp_path / 'd.jsonl'} line 2" in caplog.text and "malformed_json" in caplog.text


def test_unreadable_and_non_utf8_files_are_counted(tmp_path):
    (tmp_path / "good.txt").write_text("kept")
    (tmp_path / "gone.jsonl").symlink_to(tmp_path / "nowhere.jsonl")  # broken symlink: unreadable
    (tmp_path / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    (tmp_path / "latin1.txt").write_bytes("line one\nol\u00e9".encode("latin-1"))
    (tmp_path / "folder.txt").mkdir()  # a directory named like a file is walked, not read
    (tmp_path / "folder.txt" / "inner.txt").write_text("inside")
    docs, bad = _read(tmp_path)
    assert docs == {"good.txt": "kept", "folder.txt/inner.txt": "inside"}
    assert bad == _no_bad(unreadable=2, invalid_utf8=1)


def test_truncated_gzip_keeps_earlier_lines(tmp_path):
    data = gzip.compress(_jsonl_bytes({"text": f"doc {i} " * 50} for i in range(200)))
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    docs, bad = _read(tmp_path)
    assert 0 < len(docs) < 200 and bad == _no_bad(unreadable=1)


def _bad_case(tmp_path: Path, case: str) -> tuple[Path, str]:
    """Write one good file and one bad one; return the bad file and where the error is."""
    (tmp_path / "a_good.txt").write_text("fine")
    if case == "malformed_json":
        path = tmp_path / "b.jsonl"
        path.write_bytes(_jsonl_bytes([{"text": "ok"}]) + b"{oops\n")
        return path, "line 2"
    if case == "missing_text":
        path = tmp_path / "b.jsonl.zst"
        data = _jsonl_bytes([{"text": "ok"}, {"text": "ok"}, {"title": "no text"}])
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
        return path, "line 3"
    if case == "non_string_text":
        path = tmp_path / "b.parquet"
        pq.write_table(pa.table({"text": [7]}), path)
        return path, "row 0"
    if case == "invalid_utf8":
        path = tmp_path / "b.txt"
        path.write_bytes(b"one\ntwo\nthr\xffee\n")
        return path, "line 3"
    path = tmp_path / "b.jsonl.gz"
    path.symlink_to(tmp_path / "missing.jsonl.gz")
    return path, ""


@pytest.mark.parametrize("case", BAD_INPUT_KINDS)
def test_strict_fails_naming_file_and_line(tmp_path, case):
    path, where = _bad_case(tmp_path, case)
    with pytest.raises(BadInputError, match=re.escape(f"({case}) in {path} {where}".rstrip())) as info:
        _read(tmp_path, strict=True)
    assert isinstance(info.value, ValueError) and info.value.__suppress_context__
    _, bad = _read(tmp_path)  # the same input without strict: counted once
    assert bad == _no_bad(**{case: 1})


def test_several_sources_in_order_and_cap(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    (tmp_path / "one" / "b.txt").write_text("b" * 600)
    (tmp_path / "one" / "a.txt").write_text("a" * 600)
    (tmp_path / "two" / "c.jsonl").write_bytes(_jsonl_bytes([{"text": "c" * 600}] * 3))
    source = f"{tmp_path / 'two' / '*.jsonl'}, {tmp_path / 'one'}"
    assert parse_sources(source) == [str(tmp_path / "two" / "*.jsonl"), str(tmp_path / "one")]
    docs = list(iter_documents(source, 0))
    assert [d for d, _ in docs] == ["c.jsonl:1", "c.jsonl:2", "c.jsonl:3", "a.txt", "b.txt"]
    capped = list(iter_documents(source, 0.002))  # 2,000 bytes: three documents of 600
    assert [d for d, _ in capped] == ["c.jsonl:1", "c.jsonl:2", "c.jsonl:3"]


def test_source_list_must_name_a_source():
    with pytest.raises(ValueError, match="names no source"):
        parse_sources(" , ")
