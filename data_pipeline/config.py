"""Structured config for the data pipeline (the `data` group of the Hydra config)."""

from dataclasses import dataclass
from typing import Optional

PREPARE_POLICIES = ("auto", "always", "never")
# Byte-level BPE needs all 256 byte tokens plus the end-of-text special token.
MIN_VOCAB_SIZE = 256 + 1


@dataclass
class DataConfig:
    """Where the corpus comes from, how it is tokenized and sharded, and when to (re)prepare it."""

    source: str = "stdlib"
    """"stdlib": the `.py` files of this Python's standard library (no tests, site-packages, idlelib,
    lib2to3); otherwise a directory (its `.txt`/`.py` files, recursively) or a glob of files."""

    prepared_dir: str = "data/prepared/stdlib"
    """Where tokenizer.json, the shards and index.json are written (the trainer makes it absolute)."""

    # Optional[...] rather than `str | None`: the form every OmegaConf version accepts in a structured config.
    tokenizer_path: Optional[str] = None  # noqa: UP045
    """An existing tokenizer.json to use instead of training one on the train split."""

    vocab_size: int = 4096
    """Target BPE vocabulary size, special token included (a small corpus may give fewer)."""

    val_fraction: float = 0.05
    """Fraction of documents sent to validation, chosen by a hash of their relative path."""

    max_corpus_mb: float = 24.0
    """Cap on raw text read, in MB (10**6 bytes), files taken in sorted order; 0 means no cap."""

    shard_max_tokens: int = 250_000
    """A shard is closed before it would exceed this many tokens (a longer document gets its own)."""

    seed: int = 1234
    """Seeds the document order inside shards at prepare time."""

    shuffle_block_shards: int = 4
    """Training batches draw windows in a random order from blocks of this many consecutive shards (of the
    epoch's shuffled shard order, per data-parallel rank); more shards mix more documents per batch and hold
    more tokens in memory. Not part of the prepared data: changing it only refuses a resume."""

    prepare: str = "auto"
    """"auto": prepare when index.json is missing or from another config; "always"; "never"."""

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction <= 0.5:
            raise ValueError(f"data.val_fraction must be in (0, 0.5], got {self.val_fraction}")
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"data.vocab_size must be >= 256 + 1, got {self.vocab_size}")
        if self.shard_max_tokens <= 0:
            raise ValueError(f"data.shard_max_tokens must be > 0, got {self.shard_max_tokens}")
        if self.shuffle_block_shards < 1:
            raise ValueError(f"data.shuffle_block_shards must be >= 1, got {self.shuffle_block_shards}")
        if self.prepare not in PREPARE_POLICIES:
            raise ValueError(f"data.prepare must be one of {PREPARE_POLICIES}, got {self.prepare!r}")
        if self.max_corpus_mb < 0:
            raise ValueError(f"data.max_corpus_mb must be >= 0, got {self.max_corpus_mb}")
        if not self.source:
            raise ValueError("data.source must not be empty")
        if not self.prepared_dir:
            raise ValueError("data.prepared_dir must not be empty")
