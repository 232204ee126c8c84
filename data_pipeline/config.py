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
    lib2to3, pydoc_data); otherwise directories or globs (comma-separated) of `.txt`/`.py`, `.jsonl`,
    `.jsonl.gz`, `.jsonl.zst` and `.parquet` files."""

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

    # --- preparation ---
    text_field: str = "text"
    """Field holding a document's text in `.jsonl`/`.jsonl.gz`/`.jsonl.zst` lines and `.parquet` rows."""

    prepare_workers: int = 0
    """Processes tokenizing at prepare time; 0 means min(4, cpu_count). The shards do not depend on it."""

    shard_max_mb: float = 128.0
    """A shard is closed before its file would exceed this many MB (10**6 bytes), like
    shard_max_tokens; a larger document gets a shard of its own."""

    strict: bool = False
    """Fail on the first bad input (unreadable file, invalid UTF-8, malformed JSON line, missing or
    non-string text field) with an error naming file and line, instead of skipping and counting it."""
    # --- end preparation ---

    # --- streaming ---
    split: str = "global"
    """How training data is split over readers. "global": every dp rank walks one global window order and
    takes its slice of each global micro-batch (batches independent of the parallel layout; every rank reads
    every block). "shards": each dp rank and DataLoader worker reads only its own shards of the epoch's order
    (for web-scale corpora; batches depend on the layout, and a resume needs the same dp size, micro-batch
    size and num_workers)."""

    num_workers: int = 0
    """DataLoader worker processes reading training batches per rank (0: read in the training process)."""

    packing: bool = True
    """Fine-tuning data (from data_pipeline.prepare_sft): pack several samples into each sequence, attention
    kept inside each sample; false gives every sample a sequence of its own."""

    mixture: str = ""
    """Comma-separated `prepared_dir:weight` pairs (e.g. "data/web:0.7,data/code:0.3"): each training batch
    comes from one corpus, drawn with these weights; empty means prepared_dir alone."""
    # --- end streaming ---

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
        self._check_streaming()

    # --- streaming ---
    def _check_streaming(self) -> None:
        if self.split not in SPLIT_MODES:
            raise ValueError(f"data.split must be one of {SPLIT_MODES}, got {self.split!r}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        parse_mixture(self.mixture)

    # --- end streaming ---


# --- streaming ---
SPLIT_MODES = ("global", "shards")


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """data.mixture as [(prepared_dir, weight)]; [] when empty. Raises ValueError naming data.mixture."""
    if not spec.strip():
        return []
    pairs = []
    for entry in spec.split(","):
        path, _, weight = entry.strip().rpartition(":")
        try:
            value = float(weight)
        except ValueError:
            value = float("nan")
        if not path or not value > 0 or value == float("inf"):
            raise ValueError(
                f"data.mixture entry {entry.strip()!r} must be 'prepared_dir:weight' with weight > 0"
            )
        pairs.append((path, value))
    paths = [p for p, _ in pairs]
    if len(set(paths)) != len(paths):
        raise ValueError(f"data.mixture names a prepared_dir twice: {spec!r}")
    return pairs


# --- end streaming ---
