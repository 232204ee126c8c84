"""load_shard from every location kind, text shards, and corrupt shards named and skipped."""

from __future__ import annotations

import functools
import gzip
import http.server
import io
import logging
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import fsspec  # noqa: F401 (loads fsspec.registry)
import numpy as np
import pytest
import webdataset as wds

from data_pipeline.prepare import load_index
from data_pipeline.shards import (
    CorruptShardError,
    SkipCounter,
    iter_shards_skipping_corrupt,
    load_shard,
    read_index,
    shard_url,
)
from data_pipeline.tokenizer import eot_id, load_tokenizer

TEXTS = [
    "def f(x):\n    return x + 1\n",
    "caf\u00e9 \u4e2d\u6587 <|endoftext|> done",
    "",
    "The quick brown fox.",
]


@pytest.fixture(scope="module")
def prepared(tiny_prepared) -> tuple[Path, dict]:
    cfg, index = tiny_prepared
    return Path(cfg.prepared_dir), index


@pytest.fixture(scope="module")
def first_shard(prepared) -> tuple[Path, dict]:
    out, index = prepared
    record = index["splits"]["train"]["shards"][0]
    return out / record["file"], record


@pytest.fixture(scope="module")
def http_base(prepared):
    """http://127.0.0.1:<port>/ serving the prepared directory from a thread."""
    handler = functools.partial(_QuietHandler, directory=str(prepared[0]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _npy_members(path: Path) -> list[np.ndarray]:
    """Reference decode: the tokens.npy members in archive order, read with tarfile and np.load."""
    with tarfile.open(path) as tar:
        return [
            np.load(io.BytesIO(tar.extractfile(m).read()))
            for m in tar.getmembers()
            if m.name.endswith(".tokens.npy")
        ]


def _expected_text_tokens(tok, texts: list[str]) -> np.ndarray:
    return np.concatenate([np.array([*tok.encode(t).ids, eot_id(tok)]) for t in texts])


@pytest.fixture(scope="module")
def tokenizer(prepared):
    return load_tokenizer(prepared[0] / "tokenizer.json")


@pytest.mark.parametrize("kind", ["path", "file", "pipe", "http"])
def test_prepared_shard_loads_from_every_location(kind, prepared, first_shard, http_base):
    out, _ = prepared
    path, record = first_shard
    base = {"path": str(out), "file": f"file://{out}", "pipe": f"pipe:cat {out}/{{shard}}", "http": http_base}
    url = shard_url(base[kind], record["file"])
    shard = load_shard(url, expected_sha256=record["sha256"])
    docs = _npy_members(path)
    np.testing.assert_array_equal(shard.tokens, np.concatenate(docs))
    assert shard.tokens.dtype == docs[0].dtype
    assert shard.n_docs == record["n_docs"] == len(docs) == shard.starts.size
    np.testing.assert_array_equal(shard.starts, np.cumsum([0] + [d.size for d in docs[:-1]]))
    assert shard.tokens.size == record["n_tokens"]


@pytest.mark.parametrize("kind", ["path", "pipe", "http"])
def test_read_index(kind, prepared, http_base):
    out, _ = prepared
    base = {"path": out, "pipe": f"pipe:cat {out}/{{shard}}", "http": http_base}[kind]
    assert read_index(base) == load_index(out)


def test_shard_url():
    assert shard_url("/data/prep", "train-00000.tar") == "/data/prep/train-00000.tar"
    assert shard_url("https://h/p/", "a.tar") == shard_url("https://h/p", "a.tar") == "https://h/p/a.tar"
    assert shard_url("s3://b/p", "a.tar") == "s3://b/p/a.tar"
    assert shard_url("pipe:aws s3 cp s3://b/{shard} -", "a.tar") == "pipe:aws s3 cp s3://b/a.tar -"
    with pytest.raises(ValueError, match="placeholder"):
        shard_url("pipe:cat /x", "a.tar")


def test_shardwriter_text_shard_is_tokenized(tmp_path, tokenizer):
    with wds.ShardWriter(str(tmp_path / "text-%03d.tar"), maxcount=100) as sink:
        for i, text in enumerate(TEXTS):
            sink.write({"__key__": f"doc{i:03d}", "txt": text})
        sink.write({"__key__": "doc_json", "json": {"text": TEXTS[0], "source": "x"}})
    shard = load_shard(tmp_path / "text-000.tar", tokenizer=tokenizer)
    expected = _expected_text_tokens(tokenizer, [*TEXTS, TEXTS[0]])
    np.testing.assert_array_equal(shard.tokens, expected)
    assert shard.n_docs == len(TEXTS) + 1 and shard.tokens.dtype == np.uint16
    with pytest.raises(ValueError, match="pass tokenizer="):
        load_shard(tmp_path / "text-000.tar")


def test_plain_tar_of_text_files_is_tokenized(tmp_path, tokenizer):
    names = ["a.txt", "sub/b.txt", "notes.v2.txt", "sub/empty.txt"]
    texts = [TEXTS[0], TEXTS[1], TEXTS[3], ""]
    for name, text in zip(names, texts, strict=True):
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / name).write_text(text, encoding="utf-8")
    subprocess.run(
        ["tar", "-cf", str(tmp_path / "plain.tar"), "-C", str(tmp_path / "src"), *names], check=True
    )
    shard = load_shard(tmp_path / "plain.tar", tokenizer=tokenizer, eot_id=eot_id(tokenizer))
    np.testing.assert_array_equal(shard.tokens, _expected_text_tokens(tokenizer, texts))
    assert shard.n_docs == len(names)


def test_gzipped_shard_loads_and_truncated_gzip_is_corrupt(tmp_path, first_shard):
    path, record = first_shard
    gz = tmp_path / "shard.tar.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert load_shard(gz).tokens.size == record["n_tokens"]
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(gz.read_bytes()[: gz.stat().st_size - 100])
    with pytest.raises(CorruptShardError, match=str(cut)):
        load_shard(cut)


def _member_offsets(path: Path) -> list[int]:
    with tarfile.open(path) as tar:
        return [m.offset for m in tar.getmembers()]


def _corrupt_variants(path: Path, tmp: Path) -> dict[str, Path]:
    data, offsets = path.read_bytes(), _member_offsets(path)
    middle = offsets[len(offsets) // 2]
    variants = {
        "half": data[: len(data) // 2],
        # Cut exactly between two members, and a garbled header in the middle: tarfile stops there
        # silently (webdataset's iterator would return the first half of the documents).
        "member_boundary": data[:middle],
        "garbled_header": data[:middle] + b"\x7f" * 512 + data[middle + 512 :],
        "no_end_block": data[: offsets[-1] + 1024].rstrip(b"\0"),
        "garbage": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "zero_bytes": b"",
    }
    out = {}
    for name, content in variants.items():
        out[name] = tmp / f"{name}.tar"
        out[name].write_bytes(content)
    out["empty_tar"] = tmp / "empty_tar.tar"
    subprocess.run(["tar", "-cf", str(out["empty_tar"]), "-T", "/dev/null"], check=True)
    out["bad_npy"] = tmp / "bad_npy.tar"
    with wds.TarWriter(str(out["bad_npy"])) as sink:
        sink.write({"__key__": "d0", "tokens.npy": b"\x93NUMPY\x01\x00v\x00{'descr'"})
    out["no_tokens"] = tmp / "no_tokens.tar"
    with wds.TarWriter(str(out["no_tokens"])) as sink:
        sink.write({"__key__": "d0", "json": {"path": "x.py"}})
    return out


@pytest.fixture(scope="module")
def corrupt_shards(first_shard, tmp_path_factory) -> dict[str, Path]:
    return _corrupt_variants(first_shard[0], tmp_path_factory.mktemp("corrupt"))


@pytest.mark.parametrize(
    "name",
    ["half", "member_boundary", "garbled_header", "no_end_block", "garbage", "zero_bytes", "empty_tar",
     "bad_npy", "no_tokens"],
)  # fmt: skip
def test_corrupt_shard_raises_naming_url(name, corrupt_shards):
    path = corrupt_shards[name]
    with pytest.raises(CorruptShardError, match=str(path)) as info:
        load_shard(path)
    assert info.value.url == str(path) and info.value.reason
    assert isinstance(info.value, ValueError)


def test_truncated_pipe_is_corrupt_and_failed_command_is_oserror(first_shard):
    path, record = first_shard
    url = f"pipe:head -c {record['bytes'] // 2} {path}"
    with pytest.raises(CorruptShardError, match="corrupt shard pipe:head"):
        load_shard(url)
    with pytest.raises(OSError) as info:
        load_shard(f"pipe:cat {path}.missing")
    assert not isinstance(info.value, CorruptShardError) and "pipe:cat" in str(info.value)


def test_missing_file_and_http_404_are_not_corrupt(tmp_path, http_base):
    with pytest.raises(FileNotFoundError):
        load_shard(tmp_path / "nope.tar")
    with pytest.raises(FileNotFoundError, match="404"):
        load_shard(http_base + "nope.tar")


def test_checksum_mismatch(first_shard):
    path, record = first_shard
    wrong = "0" * 64
    with pytest.raises(CorruptShardError, match=f"sha256 {record['sha256']} != expected {wrong}"):
        load_shard(path, expected_sha256=wrong)


def test_missing_s3fs_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # import s3fs raises ImportError
    # ...also when an earlier test imported it (fsspec.registry the attribute is a read-only view).
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "s3", raising=False)
    with pytest.raises(ImportError, match="needs the 's3fs' package: pip install s3fs"):
        load_shard("s3://bucket/prepared/train-00000.tar")


def test_skipping_corrupt_shards_logs_and_counts(first_shard, corrupt_shards, caplog):
    good = str(first_shard[0])
    urls = [good, str(corrupt_shards["half"]), good, str(corrupt_shards["empty_tar"])]
    skips = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="data_pipeline.shards"):
        loaded = list(iter_shards_skipping_corrupt(urls, skips))
    assert [u for u, _ in loaded] == [good, good] and skips.count == 2
    assert f"skipping corrupt shard {corrupt_shards['half']}: " in caplog.text
    assert [e.url for e in skips.skipped] == [urls[1], urls[3]]
    with pytest.raises(RuntimeError, match="max_skips=1"):
        list(iter_shards_skipping_corrupt(urls, SkipCounter(max_skips=1)))
