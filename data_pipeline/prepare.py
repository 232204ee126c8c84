"""Corpus -> tokenizer.json + tokenized webdataset shards + index.json (also `python -m data_pipeline.prepare`).

A shard `{split}-{shard:05d}.tar` holds one sample per document: `<key>.tokens.npy` (the document's
token ids followed by the end-of-text id, uint16 or uint32) and `<key>.json` ({"path", "n_tokens"}).
index.json is written last and atomically: it is the commit marker, so a directory with an index.json
is always complete and consistent with it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import random
import re
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import webdataset as wds
from tokenizers import Tokenizer
from tqdm import tqdm

from data_pipeline.config import DataConfig
from data_pipeline.corpus import STDLIB, STDLIB_SKIP_DIRS, iter_documents, split_of
from data_pipeline.tokenizer import eot_id, load_tokenizer, train_tokenizer

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
ENCODE_BATCH_DOCS = 256
# The config fields that change the prepared data; prepared_dir and the prepare policy do not.
FINGERPRINT_FIELDS = ("source", "vocab_size", "val_fraction", "max_corpus_mb", "shard_max_tokens", "seed")


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
    fields = {k: asdict(cfg)[k] for k in FINGERPRINT_FIELDS}
    fields["format_version"] = FORMAT_VERSION
    # A loaded tokenizer matters by its content, not its path.
    fields["tokenizer_sha256"] = _sha256_file(Path(cfg.tokenizer_path)) if cfg.tokenizer_path else None
    if cfg.source == STDLIB:
        fields["python"] = (
            f"{sys.version_info[0]}.{sys.version_info[1]}"  # each Python ships a different stdlib
        )
        fields["stdlib_skip_dirs"] = sorted(STDLIB_SKIP_DIRS)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _read_corpus(cfg: DataConfig) -> dict[str, list[tuple[str, str]]]:
    docs: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for rel, text in iter_documents(cfg.source, cfg.max_corpus_mb):
        docs[split_of(rel, cfg.val_fraction)].append((rel, text))
    for split, items in docs.items():
        if not items:
            raise ValueError(
                f"no documents of data.source {cfg.source!r} fell into the {split} split; "
                f"add documents or change data.val_fraction (got {cfg.val_fraction})"
            )
    return docs


def _get_tokenizer(cfg: DataConfig, train_docs: list[tuple[str, str]]) -> Tokenizer:
    if cfg.tokenizer_path:
        return load_tokenizer(cfg.tokenizer_path)
    logger.info("training a %d-token BPE tokenizer on %d documents", cfg.vocab_size, len(train_docs))
    return train_tokenizer((t for _, t in train_docs), cfg.vocab_size, length=len(train_docs))


def _encode_docs(
    tok: Tokenizer, docs: list[tuple[str, str]], dtype: np.dtype, desc: str
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (path, token ids + EOT) per document, encoding in batches (the Rust side is parallel)."""
    eot = eot_id(tok)
    batches = range(0, len(docs), ENCODE_BATCH_DOCS)
    for start in tqdm(batches, desc=desc, unit="batch", disable=not sys.stderr.isatty()):
        chunk = docs[start : start + ENCODE_BATCH_DOCS]
        for (rel, _), enc in zip(chunk, tok.encode_batch([t for _, t in chunk]), strict=True):
            ids = np.empty(len(enc.ids) + 1, dtype=dtype)
            ids[:-1] = enc.ids
            ids[-1] = eot
            yield rel, ids


def _doc_key(i: int, rel: str) -> str:
    # webdataset splits a name at its first dot and treats "/" as directories: keep the key flat,
    # dot-free and unique (the running number).
    return f"{i:06d}_" + re.sub(r"[^A-Za-z0-9_-]", "_", rel)


def _write_shard(path: Path, samples: list[tuple[str, np.ndarray]], first_index: int) -> dict:
    """Write one shard under a temporary name; return its index record (the caller renames it)."""
    tmp = path.with_name(path.name + ".tmp")
    # A fixed mtime makes shards byte-reproducible: same config, same sha256.
    with wds.TarWriter(str(tmp), mtime=0) as sink:
        for i, (rel, ids) in enumerate(samples):
            buf = io.BytesIO()
            np.save(buf, ids, allow_pickle=False)
            meta = {"path": rel, "n_tokens": int(ids.size)}
            sink.write(
                {"__key__": _doc_key(first_index + i, rel), "tokens.npy": buf.getvalue(), "json": meta}
            )
    return {
        "file": path.name,
        "n_docs": len(samples),
        "n_tokens": int(sum(ids.size for _, ids in samples)),
        "bytes": tmp.stat().st_size,
        "sha256": _sha256_file(tmp),
    }


def _write_split(
    out: Path,
    split: str,
    encoded: Iterator[tuple[str, np.ndarray]],
    shard_max_tokens: int,
    counts: np.ndarray | None,
) -> list[dict]:
    """Pack documents into shards of at most shard_max_tokens (a longer document gets a shard alone)."""
    shards: list[dict] = []
    pending: list[tuple[str, np.ndarray]] = []
    pending_tokens = n_written = 0

    def flush() -> None:
        nonlocal pending, pending_tokens, n_written
        shards.append(_write_shard(out / shard_name(split, len(shards)), pending, n_written))
        n_written += len(pending)
        pending, pending_tokens = [], 0

    for rel, ids in encoded:
        if counts is not None:
            counts += np.bincount(ids, minlength=counts.size)
        if pending and pending_tokens + ids.size > shard_max_tokens:
            flush()
        pending.append((rel, ids))
        pending_tokens += ids.size
    if pending:
        flush()
    return shards


def unigram_entropy(counts: np.ndarray) -> float:
    """H = -sum p log p in nats per token: the loss of a model that ignores context."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _commit(out: Path, tok: Tokenizer, index: dict) -> None:
    """Swap the new shards and tokenizer in, drop shards of an older prepare, then write index.json."""
    (out / INDEX_FILE).unlink(missing_ok=True)  # no index while files are being swapped
    _atomic_write_bytes(out / TOKENIZER_FILE, tok.to_str().encode())
    keep = set()
    for split in SPLITS:
        for shard in index["splits"][split]["shards"]:
            os.replace(out / (shard["file"] + ".tmp"), out / shard["file"])
            keep.add(shard["file"])
    for split in SPLITS:
        for old in out.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9].tar"):
            if old.name not in keep:
                old.unlink()
    _atomic_write_bytes(out / INDEX_FILE, (json.dumps(index, indent=1) + "\n").encode())


def prepare(cfg: DataConfig) -> dict:
    """Build tokenizer.json, the shards of both splits and index.json under cfg.prepared_dir; return the index."""
    out = Path(cfg.prepared_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = _read_corpus(cfg)
    tok = _get_tokenizer(cfg, docs["train"])
    vocab_size = tok.get_vocab_size()
    dtype = token_dtype(vocab_size)
    index: dict = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint(cfg),
        "config": {k: asdict(cfg)[k] for k in (*FINGERPRINT_FIELDS, "tokenizer_path")},
        "tokenizer": TOKENIZER_FILE,
        "vocab_size": vocab_size,
        "eot_id": eot_id(tok),
        "dtype": dtype.name,
        "splits": {},
    }
    counts = np.zeros(vocab_size, dtype=np.int64)
    try:
        for split in SPLITS:
            # Seeded shuffle: neighbouring files (one package) do not all land in one shard.
            items = sorted(docs[split])
            random.Random(f"{cfg.seed}-{split}").shuffle(items)
            encoded = _encode_docs(tok, items, dtype, desc=f"tokenize {split}")
            shards = _write_split(
                out, split, encoded, cfg.shard_max_tokens, counts if split == "train" else None
            )
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
    return index


def load_index(prepared_dir: str | Path) -> dict:
    """Read index.json of a prepared directory."""
    path = Path(prepared_dir) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist: prepare the data first (python -m data_pipeline.prepare)"
        )
    return json.loads(path.read_text())


def _stale_reason(cfg: DataConfig, out: Path) -> str | None:
    """Why the prepared directory cannot be reused as it is, or None if it can."""
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


def ensure_prepared(cfg: DataConfig) -> dict:
    """Apply the data.prepare policy ("auto", "always", "never") and return the index.

    Call it on one process (rank 0) and barrier before the others read the directory.
    """
    out = Path(cfg.prepared_dir)
    if cfg.prepare == "always":
        return prepare(cfg)
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
    p.add_argument("--source", default=d.source, help="'stdlib', a directory or a glob of .txt/.py files")
    p.add_argument("--out", default=d.prepared_dir, help="prepared directory")
    p.add_argument("--tokenizer", default=None, help="existing tokenizer.json (default: train one)")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--max-corpus-mb", type=float, default=d.max_corpus_mb, help="0 = no cap")
    p.add_argument("--shard-max-tokens", type=int, default=d.shard_max_tokens)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--prepare", choices=("auto", "always"), default="always", help="'auto' reuses a matching index"
    )
    a = p.parse_args(argv)
    return DataConfig(
        source=a.source, prepared_dir=a.out, tokenizer_path=a.tokenizer, vocab_size=a.vocab_size,
        val_fraction=a.val_fraction, max_corpus_mb=a.max_corpus_mb, shard_max_tokens=a.shard_max_tokens,
        seed=a.seed, prepare=a.prepare,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: prepare and print documents, tokens and shards per split."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = _parse_args(argv)
    index = ensure_prepared(cfg)
    for split in SPLITS:
        s = index["splits"][split]
        print(f"{split}: {s['n_docs']} documents, {s['n_tokens']} tokens, {len(s['shards'])} shards")
    print(
        f"vocab {index['vocab_size']}, train unigram entropy {index['train_unigram_entropy_nats']:.4f} nats/token"
    )
    print(f"written to {cfg.prepared_dir}")


if __name__ == "__main__":
    main()
