"""Fixtures: a tiny corpus (slices of real stdlib files plus edge cases), prepared once per session."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from data_pipeline.config import DataConfig
from data_pipeline.prepare import prepare

TINY_VOCAB = 320
TINY_SHARD_TOKENS = 1500


def stdlib_sample(n: int) -> list[Path]:
    """n real stdlib modules spread over the sorted list (deterministic)."""
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    step = max(1, len(files) // n)
    return files[::step][:n]


def tiny_corpus_config(root: Path, out: Path, **overrides) -> DataConfig:
    fields = dict(
        source=str(root), prepared_dir=str(out), vocab_size=TINY_VOCAB, val_fraction=0.15,
        max_corpus_mb=0, shard_max_tokens=TINY_SHARD_TOKENS, seed=7, prepare="auto",
    )  # fmt: skip
    fields.update(overrides)
    return DataConfig(**fields)


@pytest.fixture(scope="session")
def stdlib_modules() -> list[Path]:
    """25 whole stdlib modules, spread over the alphabet."""
    return stdlib_sample(25)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """~45 small documents: slices of stdlib modules, some prose, CRLF and unicode, one non-UTF-8 file."""
    root = tmp_path_factory.mktemp("corpus")
    for i, path in enumerate(stdlib_sample(40)):
        text = path.read_text(encoding="utf-8")[:700]
        sub = root / ("pkg" if i % 3 == 0 else "") / f"{path.stem}.py"
        sub.parent.mkdir(exist_ok=True)
        sub.write_text(text, encoding="utf-8")
    (root / "crlf.txt").write_bytes(b"line one\r\nline two\r\n\ttabbed  \r\n")
    (root / "unicode.txt").write_text(
        "caf\u00e9 na\u00efve \u4e2d\u6587 \U0001f600 <|endoftext|> end\n", encoding="utf-8"
    )
    (root / "prose.txt").write_text("The quick brown fox jumps over the lazy dog. " * 8, encoding="utf-8")
    (root / "latin1.txt").write_bytes("ol\u00e9 se\u00f1or".encode("latin-1"))  # not UTF-8: skipped
    (root / "ignored.md").write_text("not a .txt/.py file")
    return root


@pytest.fixture(scope="session")
def tiny_prepared(tiny_corpus, tmp_path_factory) -> tuple[DataConfig, dict]:
    """The tiny corpus prepared once: (config, index). Tests must not modify this directory."""
    cfg = tiny_corpus_config(tiny_corpus, tmp_path_factory.mktemp("prepared"))
    return cfg, prepare(cfg)
