"""Corpus reading, the deterministic split, and exact tokenizer round-trips."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from data_pipeline.corpus import iter_documents, split_of
from data_pipeline.tokenizer import EOT_TOKEN, eot_id, load_tokenizer, train_tokenizer

TRICKY = [
    "",
    " ",
    "caf\u00e9 na\u00efve \u00c5ngstr\u00f6m \u4e2d\u6587\u5b57 \u0645\u0631\u062d\u0628\u0627",
    "\ttab\tseparated\t\n\t\tindented",
    "trailing spaces   \nand more  \n   ",
    "windows\r\nline\r\nendings\r\n",
    "emoji \U0001f600\U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467 zwj",
    "literal " + EOT_TOKEN + " stays text",
    "\x00\x01\x7f control \u2028 separators \ufeff bom",
    "combining e\u0301 vs \u00e9",
]


@pytest.fixture(scope="module")
def tok(tiny_prepared):
    cfg, _ = tiny_prepared
    return load_tokenizer(Path(cfg.prepared_dir) / "tokenizer.json")


def test_documents_sorted_filtered_and_non_utf8_skipped(tiny_corpus, caplog):
    with caplog.at_level(logging.WARNING, logger="data_pipeline.sources"):
        docs = list(iter_documents(str(tiny_corpus), 0))
    paths = [p for p, _ in docs]
    assert paths == sorted(paths)
    assert "crlf.txt" in paths and any(p.startswith("pkg/") for p in paths)
    assert "latin1.txt" not in paths and "ignored.md" not in paths
    assert "latin1.txt" in caplog.text
    assert dict(docs)["crlf.txt"] == "line one\r\nline two\r\n\ttabbed  \r\n"  # bytes kept exactly


def test_glob_source_and_cap(tiny_corpus):
    docs = list(iter_documents(str(tiny_corpus / "pkg" / "*.py"), 0))
    assert docs and all("/" not in p and p.endswith(".py") for p, _ in docs)
    capped = list(iter_documents(str(tiny_corpus), 0.002))  # 2,000 bytes
    assert 0 < sum(len(t.encode()) for _, t in capped) <= 2000


@pytest.mark.parametrize("source", ["/does/not/exist", "/does/not/exist/*.txt"])
def test_missing_source_raises_naming_it(source):
    with pytest.raises(FileNotFoundError, match=source.replace("*", r"\*")):
        list(iter_documents(source, 0))


def test_empty_source_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no"):
        list(iter_documents(str(tmp_path), 0))


def test_stdlib_source_skips_tests_and_tools():
    docs = list(iter_documents("stdlib", 0.3))
    assert docs and all(p.endswith(".py") for p, _ in docs)
    skipped = ("test/", "tests/", "idlelib/", "lib2to3/", "site-packages/", "__pycache__/")
    assert not any(p.startswith(s) or "/" + s in p for p, _ in docs for s in skipped)


def test_split_is_deterministic_and_near_fraction():
    paths = [f"pkg{i % 7}/module_{i}.py" for i in range(4000)]
    first = [split_of(p, 0.05) for p in paths]
    assert first == [split_of(p, 0.05) for p in paths]
    assert 0.03 < first.count("val") / len(paths) < 0.07
    # Pinned: a sha256 of the path, so the split never changes across machines or Python versions.
    paths = ("a.py", "b.py", "c.py", "os.py", "json/decoder.py", "email/mime/text.py")
    assert [split_of(p, 0.5) for p in paths] == ["train", "val", "train", "train", "val", "train"]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky_strings(tok, text):
    assert tok.decode(tok.encode(text).ids) == text


def test_round_trip_real_stdlib_files(tok, stdlib_modules):
    # Whole modules the tiny tokenizer never saw: byte-level BPE must still be lossless.
    for path in stdlib_modules:
        text = path.read_bytes().decode("utf-8")
        assert tok.decode(tok.encode(text).ids) == text, path


def test_literal_eot_text_is_not_the_separator(tok):
    assert eot_id(tok) not in tok.encode("a " + EOT_TOKEN + " b").ids


def test_train_tokenizer_small_vocab_and_eot():
    tok = train_tokenizer(["hello world\n" * 10, "x = 1\ty = 2\r\n"], vocab_size=270)
    assert 257 <= tok.get_vocab_size() <= 270
    assert tok.id_to_token(eot_id(tok)) == EOT_TOKEN
    assert tok.decode(tok.encode("unseen \u00fc\U0001f600").ids) == "unseen \u00fc\U0001f600"


def test_load_tokenizer_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
