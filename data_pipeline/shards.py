"""Open and decode one shard from anywhere: local paths, `file:`, `pipe:` commands, http(s), s3, gs.

A location is where a prepared directory lives: a local directory, a URL prefix (`https://host/prepared/`,
`s3://bucket/prepared`) or a `pipe:` template whose `{shard}` is replaced by a file name
(`pipe:aws s3 cp s3://bucket/prepared/{shard} -`). `shard_url(location, file)` names one of its files,
`read_index(location)` reads its index.json, `load_shard(url)` decodes one shard. The location comes from the
user's config; a file name read from an index is only ever a plain name inside it (see index_file), so data
files never choose a command, a URL or a path outside the prepared directory.

A shard is a tar (optionally gzip/bzip2/xz compressed) of webdataset samples, grouped by key exactly as
webdataset groups them: a sample with `tokens.npy` (prepare's format) is used as is; one with a text member
(`.txt`, or `.json` holding a "text" field) is tokenized on the fly and ends with EOT, so shards written by
`webdataset.ShardWriter` from `{"__key__": ..., "txt": ...}` or by `tar -cf` from `.txt` files stream too.

Failures come in two kinds, and a loader should treat them differently:
- `CorruptShardError` (a ValueError): the bytes arrived but are not a valid shard (truncated, garbage, bad npy,
  no samples, checksum mismatch). The same bytes fail the same way on every rank and every rerun, so
  skipping the shard keeps the data order reproducible: `SkipCounter` logs and counts such skips.
- anything else (`OSError` from a failed `pipe:` command, HTTP error, missing file; `ImportError` for a
  missing fsspec backend): the bytes did not arrive. That is transient or a configuration error; skipping
  it would make the data order depend on the network, so it propagates.

Truncation is detected wherever the cut falls: inside a member (tarfile's "unexpected end of data"), inside
a header or exactly between members (every byte after the last member must be zero, and there must be an
end-of-archive block), inside a compressed stream (the decompressor's end-of-stream check).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import re
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from tokenizers import Tokenizer
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys

from data_pipeline.index_file import BadIndexError, check_index, is_plain_file_name
from data_pipeline.prepare import INDEX_FILE, token_dtype
from data_pipeline.tokenizer import eot_id as tokenizer_eot_id

logger = logging.getLogger(__name__)

SHARD_PLACEHOLDER = "{shard}"
# fsspec backends that are separate packages: named in the error when they are missing.
FSSPEC_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
HTTP_TIMEOUT_S = 60.0
_READ_BUFFER = 1 << 20
# Bytes read last that are kept to check the end of the archive: tarfile reads 10 KiB records, so where it
# stopped is always within the last two records it read.
_TAIL_KEEP = 4 * tarfile.RECORDSIZE
_TEXT_SUFFIXES = ("txt", "text")
# The header np.save writes for a 1-D integer array; anything else goes through np.load.
_NPY_V1_MAGIC = b"\x93NUMPY\x01\x00"
_NPY_1D_INT = re.compile(
    rb"\{'descr': '([<>|]?[ui][1248])', 'fortran_order': False, 'shape': \((\d+),\), \} *\n"
)


class CorruptShardError(ValueError):
    """The shard's bytes are not a valid shard; `url` and `reason` say which and why."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"corrupt shard {url}: {reason}")
        self.url, self.reason = url, reason

    def __reduce__(self):  # picklable across DataLoader worker processes
        return type(self), (self.url, self.reason)


class _SourceError(Exception):
    """An error of the underlying stream (the bytes did not arrive), kept apart from parse errors."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass(frozen=True)
class LoadedShard:
    """A decoded shard: its documents' tokens concatenated, and where each document starts."""

    tokens: np.ndarray  # (n_tokens,) uint16/uint32, every document ending with EOT
    starts: np.ndarray  # (n_docs,) int64, starts[0] == 0
    n_docs: int


# --- locations -------------------------------------------------------------------------------------
def shard_url(base: str | os.PathLike, file: str) -> str:
    """The URL of `file` in a prepared-dir location: a local dir, a URL prefix or a `{shard}` template.

    `file` must be a plain file name of that location (index_file.is_plain_file_name): a path, URL or
    `pipe:` command read from a data file must never decide what is opened or run.
    """
    base = str(base)
    if not is_plain_file_name(file):
        raise BadIndexError(f"{file!r} is not a plain file name inside the prepared directory {base!r}")
    if SHARD_PLACEHOLDER in base:
        return base.replace(SHARD_PLACEHOLDER, file)  # not str.format: shell commands hold braces too
    if base.startswith("pipe:"):
        raise ValueError(f"pipe: location {base!r} needs a {SHARD_PLACEHOLDER} placeholder for the file name")
    if "://" in base or base.startswith("file:"):
        return base.rstrip("/") + "/" + file
    return os.path.join(base, file)


def open_shard(url: str | os.PathLike) -> BinaryIO:
    """A binary stream of `url`: a local path, `file:`, `pipe:<command>`, http(s)://, or any fsspec URL."""
    url = str(url)
    if url.startswith(("pipe:", "file:")):
        return gopen(url, "rb")  # pipe: raises OSError on read/close if the command fails
    scheme, sep, _ = url.partition("://")
    if not sep:
        return open(url, "rb")
    if scheme in ("http", "https"):
        return _open_http(url)
    return _open_fsspec(url, scheme)


def _open_http(url: str) -> BinaryIO:
    # The standard library streams sequentially just as well as fsspec, whose http backend needs aiohttp.
    try:
        return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise FileNotFoundError(f"{url}: HTTP 404 not found") from e
        raise OSError(f"{url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise OSError(f"{url}: {e.reason}") from e


def _open_fsspec(url: str, scheme: str) -> BinaryIO:
    try:
        import fsspec
    except ImportError as e:
        raise ImportError(f"opening {url!r} needs the 'fsspec' package: pip install fsspec") from e
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as e:
        package = FSSPEC_PACKAGES.get(scheme, f"the fsspec backend for {scheme}://")
        raise ImportError(
            f"opening {url!r} needs the {package!r} package: pip install {package} ({e})"
        ) from e
    except ValueError as e:
        raise ValueError(f"cannot open {url!r}: unknown URL scheme {scheme!r}") from e
    return fsspec.open(url, "rb").open()


def read_index(base: str | os.PathLike) -> dict:
    """index.json of a prepared-dir location (local dir, URL prefix or `pipe:` template), its names checked.

    Raises BadIndexError naming the entry if a name in it is not a plain file name (index_file.check_index).
    """
    url = shard_url(base, INDEX_FILE)
    stream = open_shard(url)
    try:
        data = stream.read()
    finally:
        stream.close()  # a pipe: reports its command's exit status here
    try:
        index = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{url} is not a valid index.json: {e}") from e
    return check_index(index, url)


# --- byte layers under the tar reader ---------------------------------------------------------------
class _Source(io.RawIOBase):
    """The opened stream, hashed as it is read; its errors become _SourceError."""

    def __init__(self, stream: BinaryIO, sha256: bool) -> None:
        self.stream, self.hash = stream, hashlib.sha256() if sha256 else None

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        try:
            data = self.stream.read(len(buf))
        except Exception as e:
            raise _SourceError(e) from e
        n = len(data)
        buf[:n] = data
        if self.hash is not None:
            self.hash.update(data)
        return n


class _Tracked:
    """The tar bytes (after decompression), counting position and keeping the last bytes read."""

    def __init__(self, stream) -> None:
        self.stream, self.pos, self.tail = stream, 0, b""

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.pos += len(data)
        self.tail = (self.tail + data)[-_TAIL_KEEP:]
        return data


def _decompressed(raw: io.BufferedReader):
    """Decompress by magic bytes: decompressors check their end-of-stream marker, tarfile's '|*' does not."""
    magic = raw.peek(6)[:6]
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(raw)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw)
    return raw


# Raised by tarfile, the decompressors and numpy on bad bytes (_SourceError is none of these).
_PARSE_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, ValueError)


def _tar_members(tar_bytes: _Tracked) -> Iterator[dict]:
    """{"fname", "data", "__url__"} per regular member, as webdataset's tar_file_iterator yields them.

    tarfile is driven here rather than inside webdataset's iterator because the end check needs the
    TarFile's offset: tarfile silently stops at an unreadable header after the first member.
    """
    tar = tarfile.open(fileobj=tar_bytes, mode="r|")
    for info in tar:
        name = info.name
        if info.isreg() and not (name.startswith("__") and name.endswith("__")):
            yield {"fname": name, "data": tar.extractfile(info).read(), "__url__": ""}
        tar.members = []  # stream mode: keep memory flat
    # Every byte after the last member is padding: a non-zero one is a garbled header or a cut-off member.
    tail_start = tar_bytes.pos - len(tar_bytes.tail)
    rest = tar_bytes.tail[tar.offset - tail_start :]
    n_after = len(rest)
    while True:
        if rest.count(0) != len(rest):
            raise tarfile.ReadError(f"non-zero bytes after the member ending at byte {tar.offset}")
        rest = tar_bytes.read(_READ_BUFFER)
        if not rest:
            break
        n_after += len(rest)
    if n_after < tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"no end-of-archive block after byte {tar.offset} (truncated?)")


def _load_npy(data: bytes) -> np.ndarray:
    # np.load parses the header with ast.literal_eval: ~0.3 ms, more than reading a document's tokens.
    if data[:8] == _NPY_V1_MAGIC:
        end = 10 + int.from_bytes(data[8:10], "little")
        match = _NPY_1D_INT.fullmatch(data, 10, end)
        if match:
            dtype, n = np.dtype(match[1].decode()), int(match[2])
            if len(data) - end != n * dtype.itemsize:
                raise ValueError(f"{len(data) - end} data bytes for {n} x {dtype}")
            return np.frombuffer(data, dtype, count=n, offset=end)
    return np.load(io.BytesIO(data), allow_pickle=False)


def _decode_sample(sample: dict, url: str) -> np.ndarray | list[str]:
    """A sample's token ids, or its texts (to be tokenized), in member order."""
    key = sample["__key__"]
    if "tokens.npy" in sample:
        try:
            ids = _load_npy(sample["tokens.npy"])
        except (ValueError, EOFError, OSError) as e:
            raise CorruptShardError(url, f"sample {key!r}: unreadable tokens.npy ({e})") from e
        if ids.ndim != 1 or ids.dtype.kind not in "ui":
            raise CorruptShardError(
                url, f"sample {key!r}: tokens.npy is {ids.dtype} {ids.shape}, not 1-D ints"
            )
        return ids
    try:
        texts = [
            data.decode("utf-8")
            for suffix, data in sample.items()
            if suffix in _TEXT_SUFFIXES or suffix.endswith(".txt")  # `tar` of "a.b.txt": key a, suffix b.txt
        ]
        if not texts and "json" in sample:
            meta = json.loads(sample["json"])
            if isinstance(meta, dict) and isinstance(meta.get("text"), str):
                texts = [meta["text"]]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptShardError(url, f"sample {key!r}: undecodable text ({e})") from e
    if not texts:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise CorruptShardError(url, f"sample {key!r} has no tokens.npy, .txt or json text (has {members})")
    return texts


def _read_docs(tar_bytes: _Tracked, url: str) -> list[np.ndarray | str]:
    docs: list[np.ndarray | str] = []
    samples = group_by_keys(_tar_members(tar_bytes))
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            break
        except _PARSE_ERRORS as e:
            raise CorruptShardError(url, f"unreadable tar ({type(e).__name__}: {e})") from e
        decoded = _decode_sample(sample, url)
        docs.extend([decoded] if isinstance(decoded, np.ndarray) else decoded)
    return docs


def _tokenize(docs: list[np.ndarray | str], url: str, tokenizer: Tokenizer | None, eot: int | None) -> None:
    """Replace the text documents of docs by their token ids + EOT, in place (one batched encode)."""
    at = [i for i, d in enumerate(docs) if isinstance(d, str)]
    if not at:
        return
    if tokenizer is None:
        raise ValueError(f"shard {url} holds text samples: pass tokenizer= (and eot_id=) to load_shard")
    eot = tokenizer_eot_id(tokenizer) if eot is None else eot
    dtype = token_dtype(max(tokenizer.get_vocab_size(), eot + 1))
    for i, enc in zip(at, tokenizer.encode_batch([docs[i] for i in at]), strict=True):
        ids = np.empty(len(enc.ids) + 1, dtype=dtype)
        ids[:-1] = enc.ids
        ids[-1] = eot
        docs[i] = ids


def load_shard(
    url: str | os.PathLike,
    tokenizer: Tokenizer | None = None,
    eot_id: int | None = None,
    expected_sha256: str | None = None,
) -> LoadedShard:
    """Decode one shard; raise CorruptShardError on bad bytes, OSError/ImportError if they cannot be read.

    Text samples need `tokenizer` (eot_id defaults to its `<|endoftext|>`). With expected_sha256 the raw
    (still compressed) bytes are hashed as they stream, in the same single pass, and compared.
    """
    url = str(url)
    docs, sha256 = _read_shard_docs(url, hashed=expected_sha256 is not None)
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise CorruptShardError(url, f"sha256 {sha256} != expected {expected_sha256}")
    return _assemble(docs, url, tokenizer, eot_id)


def load_shard_and_sha256(
    url: str | os.PathLike, tokenizer: Tokenizer | None = None, eot_id: int | None = None
) -> tuple[LoadedShard, str]:
    """load_shard, and the sha256 of the shard's raw bytes computed in the same pass (to index it)."""
    url = str(url)
    docs, sha256 = _read_shard_docs(url, hashed=True)
    return _assemble(docs, url, tokenizer, eot_id), sha256


def _read_shard_docs(url: str, hashed: bool) -> tuple[list[np.ndarray | str], str | None]:
    """The shard's documents (token arrays or texts) and, if hashed, the sha256 of every byte read."""
    stream = open_shard(url)
    source = _Source(stream, sha256=hashed)
    raw = io.BufferedReader(source, _READ_BUFFER)
    corrupt: CorruptShardError | None = None
    try:
        try:
            docs = _read_docs(_Tracked(_decompressed(raw)), url)
        except CorruptShardError as e:
            corrupt = e
        _drain(raw)  # hash every byte; a pipe's command ends normally instead of on a broken pipe
    except _SourceError as e:
        raise OSError(f"reading {url}: {e.cause}") from e.cause
    finally:
        try:
            stream.close()
        except Exception as e:  # a failed pipe: command; its exit status is known only now
            raise OSError(f"reading {url}: {e}") from e
    if corrupt is not None:
        raise corrupt
    return docs, source.hash.hexdigest() if hashed else None


def _assemble(
    docs: list[np.ndarray | str], url: str, tokenizer: Tokenizer | None, eot: int | None
) -> LoadedShard:
    """The LoadedShard of a shard's documents, its texts tokenized."""
    if not docs:
        raise CorruptShardError(url, "the archive holds no samples")
    _tokenize(docs, url, tokenizer, eot)
    starts = np.cumsum([0] + [d.size for d in docs[:-1]], dtype=np.int64)
    return LoadedShard(tokens=np.concatenate(docs), starts=starts, n_docs=len(docs))


def _drain(raw: io.BufferedReader) -> None:
    while raw.read(_READ_BUFFER):
        pass


# --- skipping corrupt shards --------------------------------------------------------------------------
class SkipCounter:
    """Loads shards, logging and counting the corrupt ones instead of raising (other errors propagate).

    One per loader (per DataLoader worker: counts are per process, and a worker mirrors its count into
    shared memory for the main process, see mirror_to). max_skips bounds how many may be skipped before a
    RuntimeError, so that a wholly broken dataset fails loudly instead of looping.
    """

    def __init__(self, max_skips: int | None = None) -> None:
        self.max_skips = max_skips
        self.skipped: list[CorruptShardError] = []
        # In a DataLoader worker: a shared-memory slot where the count is mirrored for the main process.
        self._mirror: tuple | None = None

    @property
    def count(self) -> int:
        return len(self.skipped)

    def mirror_to(self, shared_counts, slot: int) -> None:
        """Keep shared_counts[slot] (a multiprocessing array) equal to this counter's count."""
        self._mirror = (shared_counts, slot)
        shared_counts[slot] = self.count

    def record(self, err: CorruptShardError) -> None:
        """Log and count one skipped shard."""
        self.skipped.append(err)
        if self._mirror is not None:
            shared_counts, slot = self._mirror
            shared_counts[slot] = self.count
        logger.warning("skipping corrupt shard %s: %s", err.url, err.reason)
        if self.max_skips is not None and self.count > self.max_skips:
            raise RuntimeError(
                f"{self.count} corrupt shards skipped, more than max_skips={self.max_skips}"
            ) from err

    def load(self, url: str | os.PathLike, **load_kwargs) -> LoadedShard | None:
        """load_shard(url, **load_kwargs), or None (logged, counted) if the shard is corrupt."""
        try:
            return load_shard(url, **load_kwargs)
        except CorruptShardError as err:
            self.record(err)
            return None


def iter_shards_skipping_corrupt(
    urls: Iterable[str], skips: SkipCounter | None = None, **load_kwargs
) -> Iterator[tuple[str, LoadedShard]]:
    """(url, shard) for each loadable shard of urls; corrupt ones are logged and counted in `skips`."""
    skips = SkipCounter() if skips is None else skips
    for url in urls:
        shard = skips.load(url, **load_kwargs)
        if shard is not None:
            yield str(url), shard
