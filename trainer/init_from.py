"""`train.init_from`: start a run from existing weights at any layout, with a fresh optimizer and schedule.

The weights come from a checkpoint of any layout, a weights-only checkpoint (`trainer.convert from-hf`) or a
Hugging Face GPT-2 directory. The model's shape must be the run's, and the tokenizer the weights were trained
with must be the one the run's data was tokenized with; each mismatch is one line naming the field.

Under LoRA (`finetune.lora.rank` > 0) these weights are the frozen base: they are loaded whether the adapters
start fresh or resume, and a resumed run checks they are the very weights its adapters were trained on.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from trainer.checkpoint import STATE_FILE, CheckpointError
from trainer.config import Config, ConfigError, ModelConfig
from trainer.engine import Engine
from trainer.inference import ModelLoadError, ModelWeights, read_model_weights
from trainer.lora import AdapterRecord, adapter_record, weights_fingerprint

log = logging.getLogger(__name__)
# What must agree between the weights and the run (name, dropout, initialisation and padding need not).
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "ffn_size", "bias", "layernorm_eps")


def initialize_from(config: Config, engine: Engine, index: dict) -> None:
    """Load `train.init_from`'s weights into the engine (every rank its own shard); step, data and Adam start at 0."""
    source = config.train.init_from
    try:
        weights = read_model_weights(source)
    except ModelLoadError as err:
        raise ConfigError(f"train.init_from={source}: {err}") from None
    check_same_shape(weights, config.model, index["vocab_size"], source)
    check_same_tokenizer(weights, Path(config.data.prepared_dir) / index["tokenizer"], source)
    engine.load_weights(lambda name: _weight(weights, name, source))
    lora = config.finetune.lora
    if lora.enabled:
        engine.adapters = AdapterRecord(source, weights_fingerprint(weights.weights), lora.rank, lora.alpha,
                                        list(lora.targets))
        log.info("LoRA rank %d on %s over the frozen weights of %s (%s)", lora.rank, ", ".join(lora.targets),
                 source, weights.source)
        return
    log.info("initialised from %s (%s): fresh optimizer and LR schedule, step 0, data from the start", source,
             weights.source)


def _weight(weights: ModelWeights, name: str, source: str):
    if name not in weights.weights:
        raise ConfigError(f"train.init_from={source}: holds no weight {name!r}")
    return weights.weights[name]


def check_same_shape(weights: ModelWeights, run: ModelConfig, run_vocab: int, source: str) -> None:
    """Refuse weights of another shape, naming the first field that differs.

    The run's vocabulary may extend the weights' (fine-tuning data adds its chat template's special tokens):
    the rows the weights lack start at zero."""
    if not weights.vocab_size <= run_vocab:
        raise ConfigError(f"train.init_from={source} has {weights.vocab_size} tokens, more than this run's data "
                          f"tokenizer ({run_vocab}): set data.tokenizer_path to the weights' tokenizer.json")
    for key in SHAPE_FIELDS:
        theirs, ours = getattr(weights.config, key), getattr(run, key)
        if theirs != ours:
            name = "model.ffn_hidden_size" if key == "ffn_size" else f"model.{key}"
            raise ConfigError(f"train.init_from={source} has {name}={theirs!r}; this run has {name}={ours!r} "
                              f"(model={run.name}): set {name}={theirs!r} or choose the matching model preset")


def check_same_tokenizer(weights: ModelWeights, data_tokenizer: Path, source: str) -> None:
    """Refuse a corpus tokenized differently from the weights' tokenizer (same vocabulary and merges)."""
    if weights.tokenizer_json is None:
        log.warning("train.init_from=%s has no tokenizer to compare with the data's; make sure the data was "
                    "tokenized with the tokenizer these weights were trained with", source)
        return
    if _bpe_tables(weights.tokenizer_json) != _bpe_tables(data_tokenizer.read_text(encoding="utf-8")):
        raise ConfigError(f"train.init_from={source} was trained with another tokenizer than {data_tokenizer}: "
                          f"set data.tokenizer_path to its tokenizer.json (and a data.prepared_dir of its own)")


def _bpe_tables(tokenizer_json: str) -> tuple[dict, list]:
    """The vocabulary and merges of a BPE tokenizer.json (merges as pairs, whichever way the file writes them)."""
    model = json.loads(tokenizer_json).get("model", {})
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    return model.get("vocab", {}), merges


def check_adapter_base(saved: dict, current: AdapterRecord | None, checkpoint: Path) -> None:
    """Refuse to resume adapters over other base weights than the ones they were trained on."""
    try:
        record = adapter_record(saved, f"{checkpoint / STATE_FILE}")
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    if current is None:
        raise CheckpointError(f"{checkpoint} holds LoRA adapters over {record.base}: resume it with "
                              f"finetune.lora.rank={record.rank} and train.init_from={record.base}")
    if current.base_fingerprint != record.base_fingerprint:
        raise CheckpointError(
            f"{checkpoint} holds LoRA adapters trained over the weights of {record.base} (fingerprint "
            f"{record.base_fingerprint}); train.init_from={current.base} holds other weights ({current.base_fingerprint}): "
            "point train.init_from at the base the adapters were trained on")
