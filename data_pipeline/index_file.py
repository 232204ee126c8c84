"""What an index.json may say: plain file names inside its prepared directory, and a sha256 per shard.

index.json is data, and data comes from anywhere: a downloaded corpus, a remote `data.prepared_dir`, an index
written by `data_pipeline.external`. Where the files are read from (a local directory, a URL prefix or a
`pipe:` command template) comes only from the user's own config, `data.prepared_dir`; every name an index
holds is joined to that location or substituted into its `{shard}`, so it must stay one file of it: a plain
file name (no `/` or `\\`, no `..`, no scheme such as `pipe:`/`file:`/`http:`, no leading `-`). The allowed
characters are those of a shell word that needs no quoting, so a name substituted into a `pipe:` template
runs nothing either. Every shard record also carries the sha256 of its bytes, which the stream checks as it
reads them.
"""

from __future__ import annotations

import re

# One shell word that needs no quoting, starting with a letter, digit or underscore (not '-', not '.').
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+,=@-]*")
_MAX_NAME = 255  # a file name on common file systems
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RULE = "a plain file name inside the prepared directory (letters, digits, '_.+,=@-'; no '/', '..' or scheme)"
_WHERE_LOCATIONS_GO = (
    "pipe: commands and URL templates belong in data.prepared_dir, never in index.json "
    "(an index written by an older data_pipeline.external: index the shards again)"
)


class BadIndexError(ValueError):
    """An index.json names what it may not (a path, a URL, a command) or lacks what the loader checks."""


def is_plain_file_name(name: object) -> bool:
    """Whether `name` is a file name that stays inside the prepared directory wherever it is substituted."""
    return (
        isinstance(name, str)
        and len(name) <= _MAX_NAME
        and ".." not in name
        and _PLAIN_NAME.fullmatch(name) is not None
    )


def check_file_name(name: object, index_url: str, entry: str) -> str:
    """`name` (the value of `entry` in the index read from index_url) if it is a plain file name."""
    if not is_plain_file_name(name):
        raise BadIndexError(f"{index_url}: {entry} = {name!r} is not {_RULE}; {_WHERE_LOCATIONS_GO}")
    return name


def _check_shard(shard: object, index_url: str, entry: str) -> None:
    """A shard record: {"file": plain name, "n_tokens": int >= 0, "sha256": 64 hex digits, ...}."""
    if not isinstance(shard, dict):
        raise BadIndexError(f"{index_url}: {entry} is not a shard record: {shard!r}")
    check_file_name(shard.get("file"), index_url, f"{entry}.file")
    n_tokens = shard.get("n_tokens")
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 0:
        raise BadIndexError(f"{index_url}: {entry}.n_tokens = {n_tokens!r} is not a token count")
    sha256 = shard.get("sha256")
    if not isinstance(sha256, str) or _SHA256.fullmatch(sha256) is None:
        raise BadIndexError(
            f"{index_url}: {entry}.sha256 = {sha256!r} is not a sha256 of the shard; prepare the data again "
            "(data.prepare=always) or index the shards again (python -m data_pipeline.external)"
        )


def check_index(index: object, index_url: str) -> dict:
    """The parsed index.json read from index_url, once every name and shard record in it is checked."""
    if not isinstance(index, dict) or not isinstance(index.get("splits"), dict):
        raise BadIndexError(f"{index_url}: not an index.json (no 'splits' object)")
    if "tokenizer" in index:
        check_file_name(index["tokenizer"], index_url, "tokenizer")
    for split, info in index["splits"].items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list):
            raise BadIndexError(f"{index_url}: splits.{split}.shards is not a list of shard records")
        for i, shard in enumerate(shards):
            _check_shard(shard, index_url, f"splits.{split}.shards[{i}]")
    return index
