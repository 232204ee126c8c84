"""Conversations (JSONL) -> tokenized SFT shards with loss masks (`python -m data_pipeline.prepare_sft`).

Input: `.jsonl`, `.jsonl.gz` or `.jsonl.zst` files (or directories/globs of them), one record per line, either
`{"prompt": str, "response": str}` (one user turn and one assistant turn) or
`{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` (used when both are given).
Each record is rendered with a chat template (data_pipeline.chat_template) into token ids and a loss mask.

Output, in --out (written in a temporary sibling directory, then renamed into place):
- `tokenizer.json`: the given tokenizer with the template's special tokens appended (in template order);
- `{split}-{shard:05d}.tar`: webdataset shards, one sample per record: `<key>.tokens.npy` (ids, uint16 or
  uint32), `<key>.mask.npy` (uint8 0/1, same length) and `<key>.json` ({"id": "file:line", "n_tokens",
  "n_trained"}); samples in a seeded order;
- `index.json`: kind "sft", vocab_size (added tokens included), base_vocab_size, eot_id, special_tokens (ids),
  template, dtype, the options, bad_input counts, truncated/dropped counts, and per split its shards, each
  with file, n_samples, n_tokens, n_trained, bytes, sha256 and `lengths` (tokens per sample, in shard order),
  so a loader can plan packing from index.json alone.

A record's id is `path:line` (path relative to its source root); a hash of it chooses the split, as prepare
does for documents, or a hash of the record's optional "group" string (records of one group, e.g. one source
module or one long document, then all land in the same split). A sample longer than --max-length is cut to it if the cut keeps a trained target (mask[1:]
has a 1), otherwise dropped; both are counted. A malformed line (bad JSON, missing fields, unknown role,
non-string content, empty conversation, no assistant turn) is logged with file and line, counted by kind and
skipped; --strict stops at the first with one error line. Bad arguments and missing files: one error line,
exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import random
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from data_pipeline.chat_template import (
    DEFAULT_TEMPLATE,
    BadConversation,
    ChatTemplate,
    add_special_tokens,
    check_messages,
    encode_segments,
    load_template,
    prompt_response_messages,
    segments,
)
from data_pipeline.corpus import split_of
from data_pipeline.prepare import (
    INDEX_FILE,
    SPLITS,
    TOKENIZER_FILE,
    _member_tar_bytes,
    _Sample,
    _sha256_file,
    _write_shard,
    shard_name,
    token_dtype,
)
from data_pipeline.sources import (
    JSONL_SUFFIXES,
    BadInputLog,
    SourceError,
    _decode,
    _open_jsonl,
    _read_errors,
    source_files,
)
from data_pipeline.tokenizer import eot_id, load_tokenizer

logger = logging.getLogger(__name__)

SFT_FORMAT_VERSION = 1
KIND = "sft"
SFT_BAD_INPUT_KINDS = (
    "unreadable", "invalid_utf8", "malformed_json", "missing_fields", "malformed_conversation",
    "non_string_content", "unknown_role", "empty_conversation", "no_assistant_turn",
)  # fmt: skip
RENDER_BATCH = 256
DEFAULT_MAX_LENGTH = 1025  # seq_len + 1 of a 1024-token model: input and target of every position
DEFAULT_SHARD_MAX_TOKENS = 250_000


class UsageError(ValueError):
    """A bad argument or a missing input: reported as one line, exit status 2."""


@dataclass
class SFTOptions:
    """What prepare_sft is asked to do (the CLI's arguments)."""

    sources: list[str]
    out: str
    tokenizer: str
    template: ChatTemplate = DEFAULT_TEMPLATE
    max_length: int = DEFAULT_MAX_LENGTH
    val_fraction: float = 0.05
    seed: int = 1234
    strict: bool = False
    shard_max_tokens: int = DEFAULT_SHARD_MAX_TOKENS

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise UsageError(f"--max-length must be >= 2 (an input and a target), got {self.max_length}")
        if not 0.0 < self.val_fraction <= 0.5:
            raise UsageError(f"--val-fraction must be in (0, 0.5], got {self.val_fraction}")
        if self.shard_max_tokens < 1:
            raise UsageError(f"--shard-max-tokens must be >= 1, got {self.shard_max_tokens}")
        if not self.sources:
            raise UsageError("no --source given")


@dataclass
class LengthCounts:
    """Samples cut to --max-length and samples dropped because the cut would leave nothing to train."""

    truncated: int = 0
    dropped_too_long: int = 0
    dropped_untrainable: int = 0  # no trained target at all (a template whose assistant turn comes first)
    first: dict[str, str] = field(default_factory=dict)


# --- reading -------------------------------------------------------------------------------------------
def record_messages(record: object) -> list[dict]:
    """The conversation of one JSON record (messages, or prompt/response); BadConversation if there is none."""
    if not isinstance(record, dict):
        raise BadConversation("malformed_json", f"a JSON {type(record).__name__}, not an object")
    if "messages" in record:
        return check_messages(record["messages"])
    if "prompt" not in record or "response" not in record:
        raise BadConversation("missing_fields", "neither 'messages' nor both 'prompt' and 'response'")
    for key in ("prompt", "response"):
        if not isinstance(record[key], str):
            raise BadConversation(
                "non_string_content", f"{key!r} is a {type(record[key]).__name__}, not a string"
            )
    return prompt_response_messages(record["prompt"], record["response"])


def _jsonl_files(source: str) -> tuple[Path, list[Path]]:
    try:
        root, files = source_files(source)
    except FileNotFoundError as e:
        raise UsageError(f"--source {source!r} does not exist") from e
    except SourceError as e:
        raise UsageError(str(e)) from e
    jsonl = sorted(f for f in files if f.name.endswith(JSONL_SUFFIXES))
    if not jsonl:
        raise UsageError(f"--source {source!r} holds no {'/'.join(JSONL_SUFFIXES)} files")
    return root, jsonl


def record_group(record: dict, sample_id: str) -> str:
    """What the split hashes: the record's optional "group" (records of one group share a split), or its id."""
    group = record.get("group", sample_id)
    if not isinstance(group, str):
        raise BadConversation("malformed_conversation", f"'group' is a {type(group).__name__}, not a string")
    return group


def _file_conversations(path: Path, rel: str, log: BadInputLog) -> Iterator[tuple[str, str, list[dict]]]:
    """(id, group, messages) per good line of one JSONL file; bad lines go to log."""
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
                sample_id = f"{rel}:{line_no}"
                try:
                    record = json.loads(line)
                    messages = record_messages(record)
                    group = record_group(record, sample_id)
                except json.JSONDecodeError as e:
                    log.report("malformed_json", path, where, str(e))
                    continue
                except BadConversation as e:
                    log.report(e.kind, path, where, str(e))
                    continue
                yield sample_id, group, messages
    except _read_errors() as e:
        log.report("unreadable", path, f"line {line_no + 1}" if line_no else None, repr(e))


def read_conversations(sources: list[str], log: BadInputLog) -> Iterator[tuple[str, str, list[dict]]]:
    """(id, group, messages) of every good record, source by source, files in sorted order."""
    for root, files in [_jsonl_files(s) for s in sources]:  # every source checked before any is read
        for path in files:
            yield from _file_conversations(path, path.relative_to(root).as_posix(), log)


# --- rendering and length limit ------------------------------------------------------------------------
def fit_length(
    ids: np.ndarray, mask: np.ndarray, max_length: int, counts: LengthCounts, sample_id: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """The sample, cut to max_length if longer; None (counted) if it has or keeps no trained target."""
    if ids.size <= max_length:
        if mask[1:].any():
            return ids, mask
        counts.dropped_untrainable += 1
        counts.first.setdefault("dropped_untrainable", sample_id)
        return None
    # Token 0 is never a target (targets are ids[1:]): a cut must keep a 1 in mask[1:max_length].
    if mask[1:max_length].any():
        counts.truncated += 1
        counts.first.setdefault("truncated", sample_id)
        return ids[:max_length], mask[:max_length]
    counts.dropped_too_long += 1
    counts.first.setdefault("dropped_too_long", sample_id)
    return None


def rendered_samples(
    tok: Tokenizer, opts: SFTOptions, items: list[tuple[str, list[dict]]], counts: LengthCounts
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(id, ids, mask) per conversation in order, rendered in batches, cut or dropped by max_length."""
    for i in range(0, len(items), RENDER_BATCH):
        batch = items[i : i + RENDER_BATCH]
        encoded = encode_segments(tok, [segments(opts.template, messages) for _, messages in batch])
        for (sample_id, _), (ids, mask) in zip(batch, encoded, strict=True):
            fitted = fit_length(ids, mask, opts.max_length, counts, sample_id)
            if fitted is not None:
                yield sample_id, *fitted


# --- writing -------------------------------------------------------------------------------------------
def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def make_sample(i: int, sample_id: str, ids: np.ndarray, mask: np.ndarray, dtype: np.dtype) -> _Sample:
    """One sample's tar members: tokens.npy, mask.npy and json (the key is the running number)."""
    meta = {"id": sample_id, "n_tokens": int(ids.size), "n_trained": int(mask.sum())}
    key = f"{i:08d}"
    members = {
        "json": json.dumps(meta).encode("utf-8"),
        "mask.npy": _npy(mask.astype(np.uint8)),
        "tokens.npy": _npy(ids.astype(dtype)),
    }
    size = sum(_member_tar_bytes(f"{key}.{ext}", len(data)) for ext, data in members.items())
    return _Sample(key, members, int(ids.size), size)


def _close_shard(out: Path, split: str, number: int, pending: list[tuple[_Sample, int]]) -> dict:
    """Write one shard (then rename it from its .tmp name) and return its index record."""
    path = out / shard_name(split, number)
    record = _write_shard(path, [s for s, _ in pending])
    os.replace(path.with_name(path.name + ".tmp"), path)
    record["n_samples"] = record.pop("n_docs")
    record["n_trained"] = sum(n for _, n in pending)
    record["lengths"] = [s.n_tokens for s, _ in pending]
    return record


def write_split(
    out: Path,
    split: str,
    samples: Iterator[tuple[str, np.ndarray, np.ndarray]],
    dtype: np.dtype,
    max_tokens: int,
) -> list[dict]:
    """Write a split's samples into shards of at most max_tokens tokens (a longer sample gets one alone)."""
    shards: list[dict] = []
    pending: list[tuple[_Sample, int]] = []
    pending_tokens = 0
    for i, (sample_id, ids, mask) in enumerate(samples):
        if pending and pending_tokens + ids.size > max_tokens:
            shards.append(_close_shard(out, split, len(shards), pending))
            pending, pending_tokens = [], 0
        pending.append((make_sample(i, sample_id, ids, mask, dtype), int(mask.sum())))
        pending_tokens += ids.size
    if pending:
        shards.append(_close_shard(out, split, len(shards), pending))
    return shards


def split_summary(shards: list[dict]) -> dict:
    """A split's index entry: totals over its shards, and the shards."""
    return {
        "n_samples": sum(s["n_samples"] for s in shards),
        "n_tokens": sum(s["n_tokens"] for s in shards),
        "n_trained": sum(s["n_trained"] for s in shards),
        "shards": shards,
    }


def _fingerprint(index: dict, tokenizer_sha256: str) -> str:
    """Hash of the data a stream reads: the shards' hashes, the tokenizer and the template."""
    hashed = {
        "shards": {split: [s["sha256"] for s in entry["shards"]] for split, entry in index["splits"].items()},
        "tokenizer_sha256": tokenizer_sha256,
        "template": index["template"],
    }
    return hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()


# --- the whole preparation ------------------------------------------------------------------------------
def _split_items(opts: SFTOptions, log: BadInputLog) -> dict[str, list[tuple[str, list[dict]]]]:
    """Good records by split (a hash of their group or id), each split sorted by id then shuffled by the seed."""
    items: dict[str, list[tuple[str, list[dict]]]] = {s: [] for s in SPLITS}
    for sample_id, group, messages in read_conversations(opts.sources, log):
        items[split_of(group, opts.val_fraction)].append((sample_id, messages))
    total = sum(map(len, items.values()))
    if total == 0:
        raise SourceError(
            f"no conversation to train on in {opts.sources} (bad input skipped: {log.describe()})"
        )
    for split, records in items.items():
        if not records:
            raise SourceError(
                f"all {total} records fell into the other split, none into {split}: add records or "
                f"{'lower' if split == 'train' else 'raise'} --val-fraction (got {opts.val_fraction})"
            )
        records.sort(key=lambda r: r[0])
        random.Random(f"{opts.seed}-{split}").shuffle(records)
    return items


def _base_index(opts: SFTOptions, tok: Tokenizer, base_vocab: int, special_ids: dict[str, int]) -> dict:
    vocab_size = tok.get_vocab_size()
    return {
        "format_version": SFT_FORMAT_VERSION,
        "kind": KIND,
        "tokenizer": TOKENIZER_FILE,
        "vocab_size": vocab_size,
        "base_vocab_size": base_vocab,
        "eot_id": eot_id(tok),
        "special_tokens": special_ids,
        "template": opts.template.to_dict(),
        "dtype": token_dtype(vocab_size).name,
        "config": {
            "sources": list(opts.sources),
            "tokenizer_path": opts.tokenizer,
            "max_length": opts.max_length,
            "val_fraction": opts.val_fraction,
            "seed": opts.seed,
            "shard_max_tokens": opts.shard_max_tokens,
        },
        "splits": {},
    }


def prepare_sft(opts: SFTOptions) -> dict:
    """Build opts.out (tokenizer.json, shards, index.json) atomically; return the index.

    Raises UsageError (bad arguments, missing files), SourceError (no usable records; BadInputError in strict).
    """
    out = Path(opts.out)
    _check_out(out)
    tok = _load_base_tokenizer(opts.tokenizer)
    base_vocab = tok.get_vocab_size()
    special_ids = add_special_tokens(tok, opts.template)
    log = BadInputLog(strict=opts.strict, kinds=SFT_BAD_INPUT_KINDS)
    items = _split_items(opts, log)
    index = _base_index(opts, tok, base_vocab, special_ids)
    counts = LengthCounts()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        dtype = np.dtype(index["dtype"])
        for split in SPLITS:
            samples = rendered_samples(tok, opts, items[split], counts)
            index["splits"][split] = split_summary(
                write_split(tmp, split, samples, dtype, opts.shard_max_tokens)
            )
            if not index["splits"][split]["shards"]:
                raise SourceError(
                    f"every {split} record was dropped (longer than --max-length={opts.max_length})"
                )
        (tmp / TOKENIZER_FILE).write_text(tok.to_str())
        index["bad_input"] = log.as_dict()
        index["truncated"], index["dropped_too_long"] = counts.truncated, counts.dropped_too_long
        index["dropped_untrainable"] = counts.dropped_untrainable
        index["fingerprint"] = _fingerprint(index, _sha256_file(tmp / TOKENIZER_FILE))
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if counts.first:
        logger.info("length limit %d: first cut or dropped %s", opts.max_length, counts.first)
    return index


def _load_base_tokenizer(path: str) -> Tokenizer:
    try:
        return load_tokenizer(path)
    except FileNotFoundError as e:
        raise UsageError(f"--tokenizer: {e}") from None
    except Exception as e:  # the tokenizers library raises its own exception types on bad JSON
        raise UsageError(f"--tokenizer {path!r} is not a usable tokenizer.json: {e}") from None


def _check_out(out: Path) -> None:
    """--out may be new, empty, or an earlier SFT preparation (replaced); anything else is not ours."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--out {str(out)!r} exists and is not a directory")
    if not any(out.iterdir()):
        return
    try:
        kind = json.loads((out / INDEX_FILE).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != KIND:
        raise UsageError(f"--out {str(out)!r} exists and is not an SFT prepared directory: choose another")


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished directory into place; an earlier one is renamed away first, then removed."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# --- command line --------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_pipeline.prepare_sft", description=__doc__.splitlines()[0]
    )
    p.add_argument("--source", nargs="+", action="extend", required=True,
                   help="JSONL files (.jsonl, .jsonl.gz, .jsonl.zst), directories or globs of them")  # fmt: skip
    p.add_argument("--out", required=True, help="prepared directory to write (replaced if an SFT one)")
    p.add_argument("--tokenizer", required=True, help="the pretraining tokenizer.json")
    p.add_argument("--template", default=None, help="chat template YAML (default: the built-in one)")
    p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                   help="tokens per sample, longer ones cut or dropped (use the model's seq_len + 1)")  # fmt: skip
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=1234, help="seeds the sample order in the shards")
    p.add_argument("--shard-max-tokens", type=int, default=DEFAULT_SHARD_MAX_TOKENS)
    p.add_argument("--strict", action="store_true", help="stop at the first malformed line")
    return p


def options_from_args(argv: list[str] | None) -> SFTOptions:
    """SFTOptions from the command line; UsageError on a bad value or a missing template file."""
    a = _parser().parse_args(argv)
    try:
        template = load_template(a.template) if a.template else DEFAULT_TEMPLATE
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--template: {e}") from None
    return SFTOptions(
        sources=a.source, out=a.out, tokenizer=a.tokenizer, template=template, max_length=a.max_length,
        val_fraction=a.val_fraction, seed=a.seed, strict=a.strict, shard_max_tokens=a.shard_max_tokens,
    )  # fmt: skip


def summary_lines(index: dict, out: str) -> list[str]:
    """What main prints: per split samples, tokens, trained tokens and shards; cut, dropped and bad input."""
    lines = []
    for split in SPLITS:
        s = index["splits"][split]
        lines.append(
            f"{split}: {s['n_samples']} samples, {s['n_tokens']} tokens ({s['n_trained']} trained), "
            f"{len(s['shards'])} shards"
        )
    max_length = index["config"]["max_length"]
    lines.append(
        f"longer than {max_length} tokens: {index['truncated']} truncated, {index['dropped_too_long']} dropped"
    )
    bad = ", ".join(f"{n} {kind}" for kind, n in index["bad_input"].items() if n) or "none"
    lines.append(f"bad input skipped: {bad}")
    if index["dropped_untrainable"]:
        lines.append(f"no trained token: {index['dropped_untrainable']} dropped")
    added = index["vocab_size"] - index["base_vocab_size"]
    lines.append(f"vocab {index['vocab_size']} ({index['base_vocab_size']} + {added} template tokens)")
    lines.append(f"written to {out}")
    return lines


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: prepare, print the summary; one error line and exit status 2 on failure."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        opts = options_from_args(argv)
        index = prepare_sft(opts)
    except (UsageError, SourceError) as e:  # BadInputError (--strict) is a SourceError
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for line in summary_lines(index, opts.out):
        print(line)


if __name__ == "__main__":
    main()
