"""Byte-level BPE tokenizer (HF `tokenizers`): every byte sequence round-trips exactly."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

EOT_TOKEN = "<|endoftext|>"


def _finish(tok: Tokenizer) -> Tokenizer:
    # A document that happens to contain the literal "<|endoftext|>" must stay text, not become the
    # separator: otherwise packing would see a false document boundary and decode(encode(x)) != x.
    tok.encode_special_tokens = True
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, length: int | None = None) -> Tokenizer:
    """Train a byte-level BPE tokenizer with `<|endoftext|>` as its only special token."""
    tok = Tokenizer(models.BPE())
    # No prefix space: it would add a byte that decoding cannot tell from the text's own.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        # All 256 byte symbols from the start, so bytes unseen in training still encode.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=length)
    if tok.get_vocab_size() < vocab_size:
        logger.warning("corpus too small for vocab_size=%d: got %d tokens", vocab_size, tok.get_vocab_size())
    return _finish(tok)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json; it must define `<|endoftext|>`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
    tok = Tokenizer.from_file(str(path))
    eot_id(tok)
    return _finish(tok)


def tokenizer_from_json(json_str: str) -> Tokenizer:
    """A tokenizer from the JSON of `Tokenizer.to_str()` (what tokenizer.json holds)."""
    tok = Tokenizer.from_str(json_str)
    eot_id(tok)
    return _finish(tok)


def encode_with_eot(tok: Tokenizer, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    """Token ids of each text followed by the end-of-text id, as arrays of `dtype`."""
    eot = eot_id(tok)
    out = []
    for enc in tok.encode_batch(texts):
        ids = np.empty(len(enc.ids) + 1, dtype=dtype)
        ids[:-1] = enc.ids
        ids[-1] = eot
        out.append(ids)
    return out


# The tokenizer of a pool worker process, loaded once by _init_encode_worker.
_worker_tok: Tokenizer | None = None


def _init_encode_worker(json_str: str) -> None:
    global _worker_tok
    # The pool's processes are the parallelism: one Rust thread pool per worker would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tok = tokenizer_from_json(json_str)


def _encode_in_worker(args: tuple[list[str], str]) -> list[np.ndarray]:
    texts, dtype_name = args
    assert _worker_tok is not None, "pool started without _init_encode_worker"
    return encode_with_eot(_worker_tok, texts, np.dtype(dtype_name))


def eot_id(tok: Tokenizer) -> int:
    """Id of the end-of-text token that separates packed documents."""
    idx = tok.token_to_id(EOT_TOKEN)
    if idx is None:
        raise ValueError(f"tokenizer has no {EOT_TOKEN!r} token")
    return idx
