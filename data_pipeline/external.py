"""Index shards written elsewhere so the training stream can read them: `python -m data_pipeline.external`.

Shards made by `webdataset.ShardWriter` (`txt` samples) or by `tar` from `.txt` files, local or remote,
are listed by URL in an `index.json` with their token counts (tokenized once here to count them); the
stream then tokenizes their text as it reads them, with the tokenizer copied next to the index.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from data_pipeline.prepare import INDEX_FILE, TOKENIZER_FILE, atomic_write_bytes, token_dtype, unigram_entropy
from data_pipeline.shards import load_shard
from data_pipeline.tokenizer import eot_id, load_tokenizer

logger = logging.getLogger(__name__)


def _expand(patterns: list[str]) -> list[str]:
    """Local globs expanded and sorted; URLs and pipe: commands kept as given."""
    urls = []
    for pattern in patterns:
        if "://" in pattern or pattern.startswith("pipe:"):
            urls.append(pattern)
            continue
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise FileNotFoundError(f"no shard matches {pattern!r}")
        urls.extend(os.path.abspath(m) for m in matches)
    return urls


def index_external_shards(train: list[str], val: list[str], tokenizer_path: str, out_dir: str) -> dict:
    """Write `out_dir/index.json` (and the tokenizer) for existing text shards; returns the index."""
    tokenizer = load_tokenizer(tokenizer_path)
    eot = eot_id(tokenizer)
    vocab = tokenizer.get_vocab_size()
    counts = np.zeros(vocab, dtype=np.int64)
    splits = {}
    for split, patterns in (("train", train), ("val", val)):
        shards = []
        for url in _expand(patterns):
            loaded = load_shard(url, tokenizer=tokenizer, eot_id=eot)
            if split == "train":
                counts += np.bincount(loaded.tokens, minlength=vocab)
            shards.append({"file": url, "n_docs": int(loaded.n_docs), "n_tokens": int(loaded.tokens.size)})
            logger.info("%s: %s documents, %s tokens", url, f"{loaded.n_docs:,}", f"{loaded.tokens.size:,}")
        splits[split] = {"shards": shards, "n_docs": sum(s["n_docs"] for s in shards),
                         "n_tokens": sum(s["n_tokens"] for s in shards)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_path, out / TOKENIZER_FILE)
    listing = json.dumps(splits, sort_keys=True).encode() + Path(tokenizer_path).read_bytes()
    index = {
        "format_version": 1,
        "external": True,  # never re-prepared by data.prepare=auto
        "text_shards": True,  # the stream tokenizes as it reads
        "fingerprint": hashlib.sha256(listing).hexdigest(),
        "tokenizer": TOKENIZER_FILE,
        "vocab_size": vocab,
        "eot_id": eot,
        "dtype": token_dtype(vocab).name,
        "train_unigram_entropy_nats": unigram_entropy(counts),
        "splits": splits,
    }
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
        print(f"{split}: {len(info['shards'])} shards, {info['n_docs']:,} documents, {info['n_tokens']:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
