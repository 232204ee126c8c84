"""Corpus documents from one or more sources (see `sources` for the formats), and the train/val split."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator

from data_pipeline.sources import (
    DOCUMENT_SUFFIXES,
    STDLIB,
    STDLIB_SKIP_DIRS,
    BadInputLog,
    file_documents,
    source_files,
)

__all__ = ["STDLIB", "STDLIB_SKIP_DIRS", "iter_documents", "parse_sources", "split_of"]

logger = logging.getLogger(__name__)


def parse_sources(source: str) -> list[str]:
    """The sources of a data.source value: one, or several separated by commas (paths may not hold one)."""
    sources = [s.strip() for s in source.split(",") if s.strip()]
    if not sources:
        raise ValueError(f"data.source {source!r} names no source")
    return sources


def iter_documents(
    source: str, max_corpus_mb: float, text_field: str = "text", bad_input: BadInputLog | None = None
) -> Iterator[tuple[str, str]]:
    """Yield (document id, text), source by source in the given order and files in sorted path order.

    Stops before the text read (UTF-8 bytes) would exceed max_corpus_mb (0: no cap). Bad input goes to
    `bad_input` (by default a non-strict log: warned about and skipped).
    """
    log = bad_input if bad_input is not None else BadInputLog()
    cap_bytes = max_corpus_mb * 1e6 if max_corpus_mb > 0 else float("inf")
    total = 0
    for one in parse_sources(source):
        root, files = source_files(one)
        if not files:
            raise FileNotFoundError(f"data.source {one!r} matches no {'/'.join(DOCUMENT_SUFFIXES)} files")
        # POSIX relative paths: the same document id (and split) on every OS.
        for rel, path in sorted((p.relative_to(root).as_posix(), p) for p in files):
            for doc_id, text in file_documents(path, rel, text_field, log):
                size = len(text.encode("utf-8"))
                if total + size > cap_bytes:
                    logger.info("corpus cap of %s MB reached at %s; stopping", max_corpus_mb, doc_id)
                    return
                total += size
                yield doc_id, text


def split_of(relative_path: str, val_fraction: float) -> str:
    """Return "train" or "val" from a sha256 of the document id: stable across runs, machines and Pythons."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "val" if u < val_fraction else "train"
