"""DataConfig validation names the offending key."""

import pytest

from data_pipeline.config import DataConfig


def test_defaults_are_valid():
    cfg = DataConfig()
    assert cfg.source == "stdlib" and cfg.prepare == "auto" and cfg.tokenizer_path is None


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("vocab_size", 100, "data.vocab_size must be >= 256 + 1, got 100"),
        ("val_fraction", 0.0, "data.val_fraction"),
        ("val_fraction", 0.6, "data.val_fraction"),
        ("shard_max_tokens", 0, "data.shard_max_tokens"),
        ("prepare", "sometimes", "data.prepare"),
        ("shuffle_block_shards", 0, "data.shuffle_block_shards must be >= 1, got 0"),
        ("max_corpus_mb", -1.0, "data.max_corpus_mb"),
        ("source", "", "data.source"),
    ],
)
def test_invalid_values_name_the_key(field, value, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        DataConfig(**{field: value})


def test_usable_as_omegaconf_structured_config():
    omegaconf = pytest.importorskip("omegaconf")
    conf = omegaconf.OmegaConf.structured(DataConfig)
    merged = omegaconf.OmegaConf.merge(conf, {"vocab_size": 512, "tokenizer_path": "x.json"})
    cfg = omegaconf.OmegaConf.to_object(merged)
    assert isinstance(cfg, DataConfig) and cfg.vocab_size == 512
    with pytest.raises(ValueError, match="data.vocab_size"):
        omegaconf.OmegaConf.to_object(omegaconf.OmegaConf.merge(conf, {"vocab_size": 10}))
