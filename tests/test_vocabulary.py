"""The vocabulary rule: the model preset fixes it; data, tokenizer and cost model follow or are refused."""

from __future__ import annotations

import re

import pytest

from tests.conftest import SMALL_RUN, small_corpus_args
from tests.test_cli import config_error_line, nothing_started, pretrain
from trainer.config import ConfigError, compose_config
from trainer.cost.report import estimate_report
from trainer.run import run


@pytest.mark.parametrize(("preset", "vocab"), [("tiny", 4096), ("gpt2-small", 50257), ("gpt3-1.3b", 50257)])
def test_the_preset_fixes_the_vocabulary_of_data_and_cost(preset, vocab):
    config = compose_config([f"model={preset}", "train.run_dir=."])
    assert config.model.vocab_size == vocab
    assert config.data.vocab_size == vocab  # a tokenizer trained for the corpus gets the model's size
    report = estimate_report(config, 0.4)
    assert report["model"]["vocab_size"] == vocab


def test_a_tokenizer_of_another_size_is_refused_before_anything_is_prepared(small_corpus, tmp_path):
    tokenizer = small_corpus / "tokenizer.json"  # 512 tokens
    args = [*SMALL_RUN, *small_corpus_args(small_corpus), f"data.prepared_dir={tmp_path / 'prepared'}",
            f"data.tokenizer_path={tokenizer}", "model.vocab_size=600"]
    result = pretrain(args, tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    line = config_error_line(result.stderr)
    assert line.startswith(f"model.vocab_size=600 (model=tiny) but data.tokenizer_path={tokenizer} has 512 tokens")
    assert nothing_started(tmp_path)


def test_prepared_data_of_another_size_is_refused(small_corpus, tmp_path):
    config = compose_config([*SMALL_RUN, *small_corpus_args(small_corpus), "model.vocab_size=600",
                             "data.vocab_size=512", f"train.run_dir={tmp_path}"])
    message = (f"model.vocab_size=600 (model=tiny) but the tokenizer trained for data.prepared_dir={small_corpus} "
               "has 512 tokens")
    with pytest.raises(ConfigError, match=re.escape(message)):
        run(config)
