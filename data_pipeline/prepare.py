"""Corpus -> tokenizer.json + tokenized webdataset shards + index.json (also `python -m data_pipeline.prepare`).

A shard `{split}-{shard:05d}.tar` holds one sample per document: `<key>.tokens.npy` (the document's
token ids followed by the end-of-text id, uint16 or uint32) and `<key>.json` ({"path", "n_tokens"}; the
path is the document id, `file`, `file:line` or `file:row`). Shards are written whole under a temporary
name; index.json is written last and atomically: it is the commit marker, so a directory with an
index.json is always complete and consistent with it.

Reading and packing run in this process; tokenizing runs on a pool of data.prepare_workers processes whose
results are taken in submission order, so the shards are byte-identical for any number of workers.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import re
import sys
import tarfile
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from multiprocessing.pool import Pool
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from data_pipeline.config import DataConfig
from data_pipeline.corpus import STDLIB, STDLIB_SKIP_DIRS, iter_documents, parse_sources, split_of
from data_pipeline.index_file import BadIndexError, check_index
from data_pipeline.sources import BadInputLog, SourceError
from data_pipeline.tokenizer import (
    _encode_in_worker,
    _init_encode_worker,
    encode_with_eot,
    eot_id,
    load_tokenizer,
    train_tokenizer,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
ENCODE_BATCH_DOCS = 256
# Batches handed to the pool ahead of the one being written: keeps every worker busy while bounding the
# encoded documents held in memory.
IN_FLIGHT_BATCHES_PER_WORKER = 4
MAX_DEFAULT_WORKERS = 4
# The config fields that change the prepared data; prepared_dir and the prepare policy do not.
FINGERPRINT_FIELDS = ("source", "vocab_size", "val_fraction", "max_corpus_mb", "shard_max_tokens", "seed")
# Fields added later, hashed only when they differ from their default: a directory prepared before they
# existed keeps its fingerprint (with the defaults, the shards are the same).
LATER_FINGERPRINT_FIELDS = ("text_field", "shard_max_mb")
# The tar layout of a shard, as webdataset's TarWriter writes it (through tarfile, default format);
# named here because the shard size limit predicts each sample's bytes from them.
TAR_USER = TAR_GROUP = "bigdata"
TAR_MODE = 0o444


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:05d}.tar"


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(cfg: DataConfig) -> str:
    """Hash of everything that determines the prepared data, stored in index.json."""
    values = asdict(cfg)
    hashed = {k: values[k] for k in FINGERPRINT_FIELDS}
    defaults = {f.name: f.default for f in fields(DataConfig)}
    hashed.update({k: values[k] for k in LATER_FINGERPRINT_FIELDS if values[k] != defaults[k]})
    hashed["format_version"] = FORMAT_VERSION
    # A loaded tokenizer matters by its content, not its path.
    hashed["tokenizer_sha256"] = _sha256_file(Path(cfg.tokenizer_path)) if cfg.tokenizer_path else None
    if STDLIB in parse_sources(cfg.source):
        hashed["python"] = (
            f"{sys.version_info[0]}.{sys.version_info[1]}"  # each Python ships a different stdlib
        )
        hashed["stdlib_skip_dirs"] = sorted(STDLIB_SKIP_DIRS)
    return hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()


def check_preparation_config(cfg: DataConfig) -> None:
    """Reject bad values of the preparation fields, naming the key."""
    if cfg.prepare_workers < 0:
        raise ValueError(f"data.prepare_workers must be >= 0 (0: automatic), got {cfg.prepare_workers}")
    if not cfg.shard_max_mb > 0:
        raise ValueError(f"data.shard_max_mb must be > 0, got {cfg.shard_max_mb}")
    if not cfg.text_field:
        raise ValueError("data.text_field must not be empty")
    parse_sources(cfg.source)


def num_workers(cfg: DataConfig) -> int:
    """Tokenizing processes: data.prepare_workers, or min(4, cpu_count) when it is 0."""
    return cfg.prepare_workers or min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name, then rename: readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _read_corpus(cfg: DataConfig, bad_input: BadInputLog) -> dict[str, list[tuple[str, str]]]:
    docs: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    documents = iter_documents(cfg.source, cfg.max_corpus_mb, cfg.text_field, bad_input)
    for rel, text in tqdm(documents, desc="read", unit="doc", disable=not sys.stderr.isatty()):
        docs[split_of(rel, cfg.val_fraction)].append((rel, text))
    _check_splits(cfg, docs, bad_input)
    return docs


def _check_splits(cfg: DataConfig, docs: dict[str, list[tuple[str, str]]], bad_input: BadInputLog) -> None:
    """Both splits need documents; when none were read at all, say so (data.val_fraction cannot help)."""
    total = sum(map(len, docs.values()))
    if total == 0:
        raise SourceError(
            f"data.source {cfg.source!r} yielded no documents (empty ones are dropped; bad input skipped: "
            f"{bad_input.describe()})"
        )
    for split, items in docs.items():
        if not items:
            other = "lower" if split == "train" else "raise"
            raise SourceError(
                f"all {total} documents of data.source {cfg.source!r} fell into the other split, none into "
                f"{split}: add documents or {other} data.val_fraction (got {cfg.val_fraction})"
            )


def _get_tokenizer(cfg: DataConfig, train_docs: list[tuple[str, str]]) -> Tokenizer:
    if cfg.tokenizer_path:
        return load_tokenizer(cfg.tokenizer_path)
    logger.info("training a %d-token BPE tokenizer on %d documents", cfg.vocab_size, len(train_docs))
    return train_tokenizer((t for _, t in train_docs), cfg.vocab_size, length=len(train_docs))


def _encode_docs(
    tok: Tokenizer, docs: list[tuple[str, str]], dtype: np.dtype, pool: Pool | None, workers: int, desc: str
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (id, token ids + EOT) per document in input order, encoding batches in the pool if any."""
    batches = [docs[i : i + ENCODE_BATCH_DOCS] for i in range(0, len(docs), ENCODE_BATCH_DOCS)]
    in_flight: deque = deque()
    with tqdm(total=len(docs), desc=desc, unit="doc", disable=not sys.stderr.isatty()) as progress:
        for n, batch in enumerate(batches):
            texts = [t for _, t in batch]
            if pool is None:
                in_flight.append((batch, encode_with_eot(tok, texts, dtype)))
            else:
                in_flight.append((batch, pool.apply_async(_encode_in_worker, ((texts, dtype.name),))))
            # Oldest batch first, whatever order the workers finish in: the output does not depend on them.
            last = n == len(batches) - 1
            while in_flight and (last or len(in_flight) >= IN_FLIGHT_BATCHES_PER_WORKER * workers):
                done, encoded = in_flight.popleft()
                ids_list = encoded if pool is None else encoded.get()
                yield from zip((rel for rel, _ in done), ids_list, strict=True)
                progress.update(len(done))


def _doc_key(i: int, rel: str) -> str:
    # webdataset splits a name at its first dot and treats "/" as directories: keep the key flat,
    # dot-free and unique (the running number).
    return f"{i:06d}_" + re.sub(r"[^A-Za-z0-9_-]", "_", rel)


@dataclass
class _Sample:
    """One document as it goes into a shard: its tar members, already serialized."""

    key: str
    members: dict[str, bytes]
    n_tokens: int
    tar_bytes: int


def _member_tar_bytes(name: str, size: int) -> int:
    """Bytes a member takes in a tar: its header (with a pax header for a long name) and padded data."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, TAR_MODE, TAR_USER, TAR_GROUP
    header = info.tobuf(tarfile.DEFAULT_FORMAT, tarfile.ENCODING, "surrogateescape")
    return len(header) + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _tar_file_bytes(member_bytes: int) -> int:
    """Size of a tar file whose members take member_bytes: end-of-archive blocks, padded to a record."""
    total = member_bytes + 2 * tarfile.BLOCKSIZE
    return -(-total // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _make_sample(i: int, rel: str, ids: np.ndarray) -> _Sample:
    buf = io.BytesIO()
    np.save(buf, ids, allow_pickle=False)
    meta = json.dumps({"path": rel, "n_tokens": int(ids.size)}).encode("utf-8")
    key = _doc_key(i, rel)
    members = {"json": meta, "tokens.npy": buf.getvalue()}
    size = sum(_member_tar_bytes(f"{key}.{ext}", len(data)) for ext, data in members.items())
    return _Sample(key, members, int(ids.size), size)


def _write_shard(path: Path, samples: list[_Sample]) -> dict:
    """Write one shard under a temporary name; return its index record (the caller renames it)."""
    # Imported here: webdataset imports torch (over a second), which the tokenizing workers, re-importing
    # this module as their __main__ under spawn, do not need.
    import webdataset as wds

    tmp = path.with_name(path.name + ".tmp")
    # A fixed mtime makes shards byte-reproducible: same config, same sha256.
    with wds.TarWriter(str(tmp), user=TAR_USER, group=TAR_GROUP, mode=TAR_MODE, mtime=0) as sink:
        for sample in samples:
            sink.write({"__key__": sample.key, **sample.members})
    return {
        "file": path.name,
        "n_docs": len(samples),
        "n_tokens": sum(s.n_tokens for s in samples),
        "bytes": tmp.stat().st_size,
        "sha256": _sha256_file(tmp),
    }


def _write_split(
    out: Path,
    split: str,
    encoded: Iterator[tuple[str, np.ndarray]],
    shard_max_tokens: int,
    shard_max_bytes: int,
    counts: np.ndarray | None,
) -> list[dict]:
    """Pack documents into shards of at most shard_max_tokens and shard_max_bytes (a larger document gets a
    shard alone)."""
    shards: list[dict] = []
    pending: list[_Sample] = []
    pending_tokens = pending_bytes = n_docs = 0
    for rel, ids in encoded:
        if counts is not None:
            counts += np.bincount(ids, minlength=counts.size)
        sample = _make_sample(n_docs, rel, ids)
        n_docs += 1
        too_many_tokens = pending_tokens + sample.n_tokens > shard_max_tokens
        too_many_bytes = _tar_file_bytes(pending_bytes + sample.tar_bytes) > shard_max_bytes
        if pending and (too_many_tokens or too_many_bytes):
            shards.append(_write_shard(out / shard_name(split, len(shards)), pending))
            pending, pending_tokens, pending_bytes = [], 0, 0
        pending.append(sample)
        pending_tokens += sample.n_tokens
        pending_bytes += sample.tar_bytes
    if pending:
        shards.append(_write_shard(out / shard_name(split, len(shards)), pending))
    return shards


def unigram_entropy(counts: np.ndarray) -> float:
    """H = -sum p log p in nats per token: the loss of a model that ignores context."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _commit(out: Path, tok: Tokenizer, index: dict) -> None:
    """Swap the new shards and tokenizer in, drop shards of an older prepare, then write index.json."""
    (out / INDEX_FILE).unlink(missing_ok=True)  # no index while files are being swapped
    atomic_write_bytes(out / TOKENIZER_FILE, tok.to_str().encode())
    keep = set()
    for split in SPLITS:
        for shard in index["splits"][split]["shards"]:
            os.replace(out / (shard["file"] + ".tmp"), out / shard["file"])
            keep.add(shard["file"])
    for split in SPLITS:
        for old in out.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9].tar"):
            if old.name not in keep:
                old.unlink()
    atomic_write_bytes(out / INDEX_FILE, (json.dumps(index, indent=1) + "\n").encode())


def _encode_pool(tok: Tokenizer, workers: int) -> contextlib.AbstractContextManager[Pool | None]:
    """A pool of `workers` processes that each load the tokenizer once, or no pool for one worker."""
    if workers <= 1:
        return contextlib.nullcontext()
    # spawn, not fork: the parent holds the Rust tokenizer's threads (and maybe torch's); forking a
    # threaded process can deadlock the child.
    ctx = multiprocessing.get_context("spawn")
    return ctx.Pool(workers, initializer=_init_encode_worker, initargs=(tok.to_str(),))


def prepare(cfg: DataConfig) -> dict:
    """Build tokenizer.json, the shards of both splits and index.json under cfg.prepared_dir; return the index.

    Bad input is skipped and counted in index["bad_input"], or with data.strict raises BadInputError.
    """
    check_preparation_config(cfg)
    out = Path(cfg.prepared_dir)
    out.mkdir(parents=True, exist_ok=True)
    bad_input = BadInputLog(strict=cfg.strict)
    docs = _read_corpus(cfg, bad_input)
    tok = _get_tokenizer(cfg, docs["train"])
    vocab_size = tok.get_vocab_size()
    dtype = token_dtype(vocab_size)
    index: dict = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint(cfg),
        "config": {
            k: asdict(cfg)[k] for k in (*FINGERPRINT_FIELDS, *LATER_FINGERPRINT_FIELDS, "tokenizer_path")
        },
        "tokenizer": TOKENIZER_FILE,
        "vocab_size": vocab_size,
        "eot_id": eot_id(tok),
        "dtype": dtype.name,
        "bad_input": bad_input.as_dict(),
        "splits": {},
    }
    counts = np.zeros(vocab_size, dtype=np.int64)
    workers = num_workers(cfg)
    try:
        with _encode_pool(tok, workers) as pool:
            for split in SPLITS:
                # Seeded shuffle: neighbouring files (one package) do not all land in one shard.
                items = sorted(docs[split])
                random.Random(f"{cfg.seed}-{split}").shuffle(items)
                encoded = _encode_docs(tok, items, dtype, pool, workers, desc=f"tokenize {split}")
                shards = _write_split(
                    out, split, encoded, cfg.shard_max_tokens, int(cfg.shard_max_mb * 1e6),
                    counts if split == "train" else None,
                )  # fmt: skip
                index["splits"][split] = {
                    "n_docs": sum(s["n_docs"] for s in shards),
                    "n_tokens": sum(s["n_tokens"] for s in shards),
                    "shards": shards,
                }
        index["train_unigram_entropy_nats"] = unigram_entropy(counts)
        _commit(out, tok, index)
    finally:
        # After a failure (or after _commit, where none is left) no temporary shard stays behind.
        for tmp in out.glob("*.tar.tmp"):
            tmp.unlink()
    for split in SPLITS:
        s = index["splits"][split]
        logger.info("%s: %d docs, %d tokens, %d shards", split, s["n_docs"], s["n_tokens"], len(s["shards"]))
    logger.info("bad input skipped: %s", bad_input_summary(index))
    return index


def _read_index_json(prepared_dir: str | Path) -> dict:
    """index.json of a prepared directory as it is, its names not yet checked."""
    path = Path(prepared_dir) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist: prepare the data first (python -m data_pipeline.prepare)"
        )
    return json.loads(path.read_text())


def load_index(prepared_dir: str | Path) -> dict:
    """Read index.json of a prepared directory; BadIndexError if it names anything but plain file names."""
    return check_index(_read_index_json(prepared_dir), str(Path(prepared_dir) / INDEX_FILE))


def _stale_reason(cfg: DataConfig, out: Path) -> str | None:
    """Why the prepared directory cannot be reused as it is, or None if it can.

    Sizes only, no hashing: a shard whose bytes changed but not its size is caught where it is read, since
    the stream checks every shard's sha256 as it streams (a corrupt training shard is skipped and counted,
    a validation shard stops the run). Hashing here would read the whole corpus once more at every start.
    An index that names anything but plain file names raises BadIndexError: it is not ours to overwrite.
    """
    try:
        index = load_index(out)
    except FileNotFoundError:
        return "no index.json"
    except json.JSONDecodeError:
        return "unreadable index.json"
    if index.get("fingerprint") != fingerprint(cfg):
        return "it was prepared from a different config"
    for split in SPLITS:
        for shard in index["splits"][split]["shards"]:
            path = out / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["bytes"]:
                return f"shard {shard['file']} is missing or has the wrong size"
    return None


def is_remote(location: str) -> bool:
    """A prepared-dir location that is a URL or a pipe: command template rather than a local directory."""
    return "://" in location or location.startswith("pipe:")


def ensure_prepared(cfg: DataConfig) -> dict:
    """Apply the data.prepare policy ("auto", "always", "never") and return the index.

    Call it on one process (rank 0) and barrier before the others read the directory.
    """
    if is_remote(cfg.prepared_dir):  # shards on a server or behind a command: read, never write
        from data_pipeline.shards import read_index  # shards imports this module

        return read_index(cfg.prepared_dir)
    out = Path(cfg.prepared_dir)
    existing = _read_index_json(out) if (out / INDEX_FILE).is_file() else None
    if existing is not None and (existing.get("external") or existing.get("kind") == "sft"):
        # Shards indexed by data_pipeline.external, or fine-tuning data written by data_pipeline.prepare_sft:
        # nothing here to prepare (never overwrite them with a pretraining corpus), the names checked as anywhere.
        return check_index(existing, str(out / INDEX_FILE))
    if cfg.prepare == "always":
        return prepare(cfg)  # replaces index.json whatever it said; removes only its own shard names
    reason = _stale_reason(cfg, out)
    if cfg.prepare == "never":
        if not (out / INDEX_FILE).is_file():
            raise FileNotFoundError(
                f"data.prepare='never' but {str(out / INDEX_FILE)!r} does not exist; "
                "run python -m data_pipeline.prepare or set data.prepare=auto"
            )
        if reason is not None:
            logger.warning("data.prepare='never': using %s although %s", out, reason)
        return load_index(out)
    if reason is None:
        logger.info("reusing prepared data in %s", out)
        return load_index(out)
    logger.info("preparing data in %s: %s", out, reason)
    return prepare(cfg)


def _parse_args(argv: list[str] | None) -> DataConfig:
    d = DataConfig()
    p = argparse.ArgumentParser(prog="python -m data_pipeline.prepare", description=__doc__.splitlines()[0])
    p.add_argument(
        "--source", action="append",
        help="'stdlib', a directory, a file or a glob of .txt/.py/.jsonl/.jsonl.gz/.jsonl.zst/.parquet files; "
        f"repeat for several sources (default: {d.source})",
    )  # fmt: skip
    p.add_argument("--out", default=d.prepared_dir, help="prepared directory")
    p.add_argument("--tokenizer", default=None, help="existing tokenizer.json (default: train one)")
    p.add_argument("--text-field", default=d.text_field, help="text field of JSON lines and parquet rows")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--max-corpus-mb", type=float, default=d.max_corpus_mb, help="0 = no cap")
    p.add_argument("--shard-max-tokens", type=int, default=d.shard_max_tokens)
    p.add_argument("--shard-max-mb", type=float, default=d.shard_max_mb)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--workers", type=int, default=d.prepare_workers, help="tokenizing processes; 0 = min(4, cpus)"
    )
    p.add_argument("--strict", action="store_true", help="fail on the first bad input instead of skipping it")
    p.add_argument(
        "--prepare", choices=("auto", "always"), default="always", help="'auto' reuses a matching index"
    )
    a = p.parse_args(argv)
    return DataConfig(
        source=",".join(a.source) if a.source else d.source, prepared_dir=a.out, tokenizer_path=a.tokenizer,
        text_field=a.text_field, vocab_size=a.vocab_size, val_fraction=a.val_fraction,
        max_corpus_mb=a.max_corpus_mb, shard_max_tokens=a.shard_max_tokens, shard_max_mb=a.shard_max_mb,
        seed=a.seed, prepare_workers=a.workers, strict=a.strict, prepare=a.prepare,
    )  # fmt: skip


def bad_input_summary(index: dict) -> str:
    """Bad input skipped, as in "2 malformed_json, 1 unreadable" ("none" if nothing was)."""
    counts = index.get("bad_input", {})  # absent from indexes written before it was counted
    return ", ".join(f"{n} {kind}" for kind, n in counts.items() if n) or "none"


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: prepare and print documents, tokens and shards per split, and the bad input skipped."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = _parse_args(argv)
    try:
        index = ensure_prepared(cfg)
    except (SourceError, FileNotFoundError, BadIndexError) as exc:  # BadInputError included
        raise SystemExit(f"error: {exc}") from None
    for split in SPLITS:
        s = index["splits"][split]
        print(f"{split}: {s['n_docs']} documents, {s['n_tokens']} tokens, {len(s['shards'])} shards")
    print(f"bad input skipped: {bad_input_summary(index)}")
    print(
        f"vocab {index['vocab_size']}, train unigram entropy {index['train_unigram_entropy_nats']:.4f} nats/token"
    )
    print(f"written to {cfg.prepared_dir}")


if __name__ == "__main__":
    main()
