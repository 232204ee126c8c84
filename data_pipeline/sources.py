"""Input files and their documents: discovery of a source's files, one reader per format, bad-input reports.

Formats, by file name: `.txt` and `.py` (one document per file), `.jsonl`, `.jsonl.gz`, `.jsonl.zst` (one
document per line, its text under a configurable field) and `.parquet` (one document per row, same field).
A document's id is its file's path relative to the source root, plus `:line` (1-based) for a JSON line
or `:row` (0-based) for a parquet row: the train/val split hashes it.

Bad input (an unreadable file, invalid UTF-8, a malformed JSON line, a missing or non-string text field)
goes to a `BadInputLog`, which counts and skips it, or in strict mode raises `BadInputError`. A source that
cannot give documents at all (missing, no document files, a file of another type) raises `SourceError`.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import os
import sysconfig
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

STDLIB = "stdlib"
# Directories of the stdlib that are not the library's own source: tests (huge, full of odd encodings)
# and pydoc_data, one generated 0.8 MB dict of documentation prose that would dominate whichever split
# it lands in.
STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "pydoc_data"}
)
WHOLE_FILE_SUFFIXES = (".txt", ".py")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)
DOCUMENT_SUFFIXES = WHOLE_FILE_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES

BAD_INPUT_KINDS = ("unreadable", "invalid_utf8", "malformed_json", "missing_text", "non_string_text")
# Each kind is logged this many times, then only counted: a broken million-line file must not flood the log.
LOGGED_PER_KIND = 10
PARQUET_BATCH_ROWS = 4096


class SourceError(ValueError):
    """A data source that gives no documents to prepare (missing, no document files, all skipped); names it."""


class BadInputError(SourceError):
    """Bad input met with data.strict set: names the file, the line (or row) and the kind."""


class BadInputLog:
    """Counts bad input by kind and logs it; in strict mode raises on the first one instead."""

    def __init__(self, strict: bool = False, kinds: tuple[str, ...] = BAD_INPUT_KINDS) -> None:
        self.strict = strict
        self.kinds = kinds  # what may be reported (other readers, e.g. prepare_sft, have their own kinds)
        self.counts: Counter[str] = Counter()
        # The first place each kind was met, to name it when nothing else is left.
        self.first: dict[str, str] = {}

    def report(self, kind: str, path: Path, where: str | None, detail: str) -> None:
        """Record bad input of `kind` in `path` at `where` ("line 3", "row 0" or None for the whole file)."""
        assert kind in self.kinds, kind
        location = f"{path} {where}" if where else str(path)
        if self.strict:
            # `from None`: the error names the culprit; the library exception behind it adds nothing.
            raise BadInputError(
                f"bad input ({kind}) in {location}: {detail}; "
                "run without --strict (data.strict=false) to skip and count such input"
            ) from None
        self.counts[kind] += 1
        self.first.setdefault(kind, location)
        if self.counts[kind] <= LOGGED_PER_KIND:
            logger.warning("skipping %s: %s (%s)", location, kind, detail)
            if self.counts[kind] == LOGGED_PER_KIND:
                logger.warning("further %s input is counted but not logged", kind)

    def as_dict(self) -> dict[str, int]:
        """Counts of every kind, zeros included (the `bad_input` entry of index.json)."""
        return {kind: self.counts[kind] for kind in self.kinds}

    def describe(self) -> str:
        """What was skipped, with the first place of each kind: "1 invalid_utf8 (first: a.txt line 1)"."""
        return ", ".join(f"{n} {kind} (first: {self.first[kind]})" for kind, n in self.counts.items()) or "none"


def is_document_file(name: str) -> bool:
    return name.endswith(DOCUMENT_SUFFIXES)


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


def _is_candidate(path: Path) -> bool:
    # Broken symlinks are kept so that reading them reports them as unreadable rather than losing them
    # silently; directories, FIFOs and devices are not documents.
    return is_document_file(path.name) and (path.is_file() or path.is_symlink())


def source_files(source: str) -> tuple[Path, list[Path]]:
    """(root, files) for one source ("stdlib", a directory, a file or a glob); ids are relative to root."""
    if source == STDLIB:
        return _stdlib_files()
    path = Path(source)
    if path.is_dir():
        files = []
        for dirpath, _, filenames in os.walk(path):
            files.extend(p for p in (Path(dirpath) / f for f in filenames) if _is_candidate(p))
        return path, files
    if path.is_file():
        if not is_document_file(path.name):  # e.g. a binary: decoding it would only report it as bad input
            raise SourceError(
                f"data.source {source!r}: {path} is not a document file (one of {', '.join(DOCUMENT_SUFFIXES)})"
            )
        return path.parent, [path]
    if glob.has_magic(source):
        return _glob_root(source), [
            p for p in map(Path, glob.glob(source, recursive=True)) if _is_candidate(p)
        ]
    raise FileNotFoundError(f"data.source {source!r} does not exist")


def check_source(source: str) -> None:
    """Raise what reading one source would raise first: it does not exist, or it holds no document files."""
    _, files = source_files(source)
    if not files:
        raise SourceError(f"data.source {source!r} matches no {'/'.join(DOCUMENT_SUFFIXES)} files")


def _decode(raw: bytes, path: Path, where: str | None, log: BadInputLog) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if where is None:  # a whole file: name the line of the first bad byte
            line = raw.count(b"\n", 0, exc.start) + 1
            where = f"line {line}"
        log.report("invalid_utf8", path, where, str(exc))
        return None


def _text_of(value: object, field: str, path: Path, where: str, log: BadInputLog) -> str | None:
    """The text of one JSON record or parquet cell, or None (reported) when there is none."""
    if value is None:
        log.report("missing_text", path, where, f"no {field!r} field")
        return None
    if isinstance(value, bytes):  # a parquet binary column
        return _decode(value, path, where, log)
    if not isinstance(value, str):
        log.report("non_string_text", path, where, f"{field!r} is a {type(value).__name__}, not a string")
        return None
    return value


def _open_jsonl(path: Path) -> io.BufferedIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError as exc:
            raise ImportError(f"reading {path} needs the zstandard package (pip install zstandard)") from exc
        # read_across_frames: multi-frame files (pzstd, appended writes) are one stream.
        reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True)
        return io.BufferedReader(reader, buffer_size=1 << 20)
    return open(path, "rb")


def _read_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, EOFError)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def _jsonl_documents(path: Path, doc_id: str, field: str, log: BadInputLog) -> Iterator[tuple[str, str]]:
    line_no = 0
    try:
        with _open_jsonl(path) as f:
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                where = f"line {line_no}"
                line = _decode(raw, path, where, log)
                if line is None:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    log.report("malformed_json", path, where, str(exc))
                    continue
                if not isinstance(record, dict):
                    log.report(
                        "malformed_json", path, where, f"a JSON {type(record).__name__}, not an object"
                    )
                    continue
                text = _text_of(record.get(field), field, path, where, log)
                if text:
                    yield f"{doc_id}:{line_no}", text
    except _read_errors() as exc:
        # Documents before the damage were kept; the rest of the file is lost.
        log.report("unreadable", path, f"line {line_no + 1}" if line_no else None, repr(exc))


def _parquet_documents(path: Path, doc_id: str, field: str, log: BadInputLog) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(f"reading {path} needs the pyarrow package (pip install pyarrow)") from exc
    row = 0
    try:
        pf = pq.ParquetFile(path)
        if field not in pf.schema_arrow.names:
            for row in range(pf.metadata.num_rows):
                log.report("missing_text", path, f"row {row}", f"no {field!r} column")
            return
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
            for value in batch.column(0).to_pylist():
                text = _text_of(value, field, path, f"row {row}", log)
                if text:
                    yield f"{doc_id}:{row}", text
                row += 1
    except (OSError, pa.ArrowException) as exc:
        log.report("unreadable", path, f"row {row}" if row else None, repr(exc))


def file_documents(path: Path, doc_id: str, text_field: str, log: BadInputLog) -> Iterator[tuple[str, str]]:
    """Yield (document id, text) of one file in file order; empty documents are dropped silently."""
    name = path.name
    if name.endswith(JSONL_SUFFIXES):
        yield from _jsonl_documents(path, doc_id, text_field, log)
    elif name.endswith(PARQUET_SUFFIXES):
        yield from _parquet_documents(path, doc_id, text_field, log)
    else:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            log.report("unreadable", path, None, repr(exc))
            return
        # Decoded strictly, so the text is exactly the file (CRLF kept).
        text = _decode(raw, path, None, log)
        if text:
            yield doc_id, text
