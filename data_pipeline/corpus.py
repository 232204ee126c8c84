"""Corpus documents: the Python standard library or a directory/glob of text files, and the train/val split."""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

STDLIB = "stdlib"
TEXT_SUFFIXES = (".txt", ".py")
# Directories of the stdlib that are not the library's own source: tests (huge, full of odd encodings)
# and pydoc_data, one generated 0.8 MB dict of documentation prose that would dominate whichever split
# it lands in.
STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "pydoc_data"}
)


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return root, files


def _glob_root(pattern: str) -> Path:
    """The longest leading directory of a glob pattern that has no wildcard: relative paths start there."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    root = Path(*fixed) if fixed else Path(".")
    return root if root.is_dir() else root.parent


def _source_files(source: str) -> tuple[Path, list[Path]]:
    """(root, files) for a source; relative paths are taken against root."""
    if source == STDLIB:
        return _stdlib_files()
    path = Path(source)
    if path.is_dir():
        return path, [p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES]
    if path.is_file():
        return path.parent, [path]
    if glob.has_magic(source):
        return _glob_root(source), [Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file()]
    raise FileNotFoundError(f"data.source {source!r} does not exist")


def iter_documents(source: str, max_corpus_mb: float) -> Iterator[tuple[str, str]]:
    """Yield (relative_path, text) in sorted path order, stopping before the text read exceeds the cap.

    Files are read as bytes and decoded strictly, so the text is exactly the file (CRLF kept); a file
    that is not valid UTF-8 is skipped with a warning.
    """
    root, files = _source_files(source)
    if not files:
        raise FileNotFoundError(f"data.source {source!r} matches no .txt/.py files")
    # POSIX relative paths: the same document id (and split) on every OS.
    by_rel = sorted((p.relative_to(root).as_posix(), p) for p in files)
    cap_bytes = max_corpus_mb * 1e6 if max_corpus_mb > 0 else float("inf")
    total = 0
    for rel, path in by_rel:
        raw = path.read_bytes()
        if total + len(raw) > cap_bytes:
            logger.info("corpus cap of %s MB reached at %s; stopping", max_corpus_mb, rel)
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            logger.warning("skipping %s: not valid UTF-8 (%s)", path, exc)
            continue
        if not text:
            continue
        total += len(raw)
        yield rel, text


def split_of(relative_path: str, val_fraction: float) -> str:
    """Return "train" or "val" from a sha256 of the path: stable across runs, machines and Python versions."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "val" if u < val_fraction else "train"
