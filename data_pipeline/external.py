"""Index shards written elsewhere so the training stream can read them: `python -m data_pipeline.external`.

Shards made by `webdataset.ShardWriter` (`txt` samples) or by `tar` from `.txt` files are tokenized once here
to count their tokens and hashed in the same pass, and listed in an `index.json` with their token counts
and sha256s; the stream then tokenizes their text as it reads it, with the tokenizer copied next to the index.

An index names files of its own directory only (see index_file): each shard is symlinked into the output
directory under a plain name (`train-00000-<its name>`), and the index lists those names. Shards on a server
are indexed from a local copy or a mount; the output directory, links followed, can then be served from
anywhere and read with data.prepared_dir set to that URL or `pipe:` template.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from data_pipeline.index_file import check_index
from data_pipeline.prepare import (
    INDEX_FILE,
    TOKENIZER_FILE,
    atomic_write_bytes,
    is_remote,
    token_dtype,
    unigram_entropy,
)
from data_pipeline.shards import load_shard_and_sha256
from data_pipeline.tokenizer import eot_id, load_tokenizer

logger = logging.getLogger(__name__)

# The links this module writes: `{split}-{5 digits}-{the shard's own name, made plain}`.
_LINK_NAME = re.compile(r"(train|val)-\d{5}-.+")
_MAX_OWN_NAME = 200


def _expand(patterns: list[str]) -> list[str]:
    """Local globs expanded and sorted, as real absolute paths; a URL or pipe: command is refused."""
    paths = []
    for pattern in patterns:
        if is_remote(pattern):
            raise ValueError(
                f"{pattern!r}: data_pipeline.external indexes local shards (a path or glob); index a local copy "
                "or a mount of remote shards, then serve the output directory next to them"
            )
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise FileNotFoundError(f"no shard matches {pattern!r}")
        paths.extend(os.path.realpath(m) for m in matches)  # the files themselves, not links to them
    return paths


def link_name(split: str, i: int, path: str) -> str:
    """The plain file name shard i of split is linked under: its own name, with other characters as '_'."""
    own = re.sub(r"[^A-Za-z0-9_.+,=@-]", "_", os.path.basename(path)).replace("..", "._")
    return f"{split}-{i:05d}-{own[-_MAX_OWN_NAME:]}"


def _link(out: Path, name: str, target: str) -> None:
    """out/name -> target, replacing an older link of that name."""
    tmp = out / f"{name}.link-tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, out / name)


def _drop_stale_links(out: Path, keep: set[str]) -> None:
    """Remove the links of an earlier index that this one does not list (regular files are never touched)."""
    for path in out.iterdir():
        if path.is_symlink() and _LINK_NAME.fullmatch(path.name) and path.name not in keep:
            path.unlink()


def _index_split(split: str, paths: list[str], out: Path, tokenizer, counts: np.ndarray | None) -> dict:
    """Tokenize and hash each shard once, link it into out; the split's record of index.json."""
    eot, shards = eot_id(tokenizer), []
    for i, path in enumerate(paths):
        loaded, sha256 = load_shard_and_sha256(path, tokenizer=tokenizer, eot_id=eot)
        if counts is not None:
            counts += np.bincount(loaded.tokens, minlength=counts.size)
        name = link_name(split, i, path)
        _link(out, name, path)
        shards.append(
            {
                "file": name,
                "n_docs": int(loaded.n_docs),
                "n_tokens": int(loaded.tokens.size),
                "sha256": sha256,
            }
        )
        logger.info("%s: %s documents, %s tokens", path, f"{loaded.n_docs:,}", f"{loaded.tokens.size:,}")
    return {
        "shards": shards,
        "n_docs": sum(s["n_docs"] for s in shards),
        "n_tokens": sum(s["n_tokens"] for s in shards),
    }


def index_external_shards(train: list[str], val: list[str], tokenizer_path: str, out_dir: str) -> dict:
    """Write `out_dir/index.json`, the tokenizer and a link per shard for existing text shards; return the index."""
    tokenizer = load_tokenizer(tokenizer_path)
    vocab = tokenizer.get_vocab_size()
    counts = np.zeros(vocab, dtype=np.int64)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inputs = {"train": _expand(train), "val": _expand(val)}
    splits = {
        split: _index_split(split, paths, out, tokenizer, counts if split == "train" else None)
        for split, paths in inputs.items()
    }
    shutil.copyfile(tokenizer_path, out / TOKENIZER_FILE)
    listing = json.dumps(splits, sort_keys=True).encode() + Path(tokenizer_path).read_bytes()
    index = {
        "format_version": 1,
        "external": True,  # never re-prepared by data.prepare=auto
        "text_shards": True,  # the stream tokenizes as it reads
        "fingerprint": hashlib.sha256(listing).hexdigest(),
        "tokenizer": TOKENIZER_FILE,
        "vocab_size": vocab,
        "eot_id": eot_id(tokenizer),
        "dtype": token_dtype(vocab).name,
        "train_unigram_entropy_nats": unigram_entropy(counts),
        "splits": splits,
    }
    check_index(index, str(out / INDEX_FILE))  # what every reader will check
    _drop_stale_links(out, {s["file"] for info in splits.values() for s in info["shards"]})
    atomic_write_bytes(out / INDEX_FILE, (json.dumps(index, indent=1) + "\n").encode())
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="append", required=True, help="shard glob or URL (repeatable)")
    parser.add_argument("--val", action="append", required=True, help="shard glob or URL (repeatable)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json to tokenize the text with")
    parser.add_argument("--out", required=True, help="directory for index.json and the tokenizer")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        index = index_external_shards(args.train, args.val, args.tokenizer, args.out)
    except (FileNotFoundError, ValueError) as err:
        logger.error("error: %s", err)
        return 2
    for split, info in index["splits"].items():
        print(
            f"{split}: {len(info['shards'])} shards, {info['n_docs']:,} documents, {info['n_tokens']:,} tokens"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
