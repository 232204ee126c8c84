"""The model outside training: one process, no process group, on the CPU or CUDA, in fp32 or bf16.

`load_model(path)` takes a checkpoint directory of any layout (ours, or a weights-only one from
`trainer.convert from-hf`) or a Hugging Face GPT-2 directory, and returns the single-process GPT (the same
parameter names as in training) with its tokenizer. A LoRA checkpoint holds adapters only: its base model is
named by the caller (`base`, the `--base` flag), checked against the fingerprint the checkpoint recorded, and the
adapters are merged into its weights. `CachedDecoder` runs it for decoding with a KV cache:
prefill the prompts, then one token at a time (trainer/decoding.py drives it).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
from tokenizers import Tokenizer

from data_pipeline.tokenizer import EOT_TOKEN, tokenizer_from_json
from trainer.checkpoint import STATE_FILE, CheckpointError, CheckpointReader
from trainer.config import ConfigError, KernelsConfig, ModelConfig
from trainer.kv_cache import KVCache
from trainer.lora import adapter_record, merge_adapters, weights_fingerprint
from trainer.model import GPT

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOKEN_TABLE = "embedding.tokens.weight"


class ModelLoadError(ValueError):
    """A model directory cannot be loaded; the message names the file and the problem."""


@dataclass
class ModelWeights:
    """A model as files hold it: its shape, real vocabulary, single-process weights (vocabulary rows unpadded)."""

    config: ModelConfig
    vocab_size: int
    weights: dict[str, torch.Tensor]
    tokenizer_json: str | None
    source: str  # "checkpoint" or "hf"


@dataclass
class LoadedModel:
    """A model ready to run: the GPT in eval mode on its device, its tokenizer (None if the files had none)."""

    model: GPT
    tokenizer: Tokenizer | None
    config: ModelConfig
    vocab_size: int
    eot_id: int | None
    source: str
    device: torch.device
    dtype: torch.dtype


def is_hf_directory(path: Path) -> bool:
    """A transformers model directory (config.json) rather than one of our checkpoints (trainer_state.json)."""
    return path.is_dir() and (path / "config.json").is_file() and not (path / STATE_FILE).is_file()


def read_model_weights(path: str | Path, base: str | Path | None = None) -> ModelWeights:
    """The weights and shape held by a checkpoint directory or a Hugging Face GPT-2 directory; for a LoRA
    checkpoint, the weights of `base` with its adapters merged in."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: no such directory (expected a checkpoint or a Hugging Face GPT-2 directory)")
    if is_hf_directory(path):
        from trainer.hf_gpt2 import read_hf_directory  # noqa: PLC0415 - only for Hugging Face directories

        return read_hf_directory(path)
    if not (path / STATE_FILE).is_file():
        raise ModelLoadError(f"{path}: neither a checkpoint ({STATE_FILE}) nor a Hugging Face directory (config.json)")
    return _checkpoint_weights(path, base)


def _checkpoint_weights(path: Path, base: str | Path | None) -> ModelWeights:
    from trainer.export import consolidated_weights  # noqa: PLC0415

    try:
        reader = CheckpointReader(path)
        config = model_config_from_dict(reader.state.config.get("model"), f"{path / STATE_FILE}")
        vocab = reader.state.vocab_size
        if vocab <= 0:
            raise ModelLoadError(f"{path / STATE_FILE}: records no vocab_size (saved by an older version)")
        weights = consolidated_weights(reader)
        if reader.state.adapters is not None:
            weights = _merged_into_base(weights, reader, base)
            # The run's vocabulary may extend the base's (a chat template's tokens): those rows stayed zero.
            table = weights[TOKEN_TABLE]
            weights[TOKEN_TABLE] = _pad_vocab_rows(table, torch.Size([vocab, table.shape[1]]))
        return ModelWeights(config, vocab, weights, reader.tokenizer_json(), "checkpoint")
    except CheckpointError as err:
        raise ModelLoadError(str(err)) from None


def _merged_into_base(adapters: dict[str, torch.Tensor], reader: CheckpointReader,
                      base: str | Path | None) -> dict[str, torch.Tensor]:
    """A LoRA checkpoint's adapters folded into the weights of the base the caller names (checked against the
    fingerprint the checkpoint recorded). The recorded path is only quoted, never read: the caller decides."""
    try:
        record = adapter_record(reader.state.adapters, f"{reader.path / STATE_FILE}")
    except ValueError as err:
        raise ModelLoadError(str(err)) from None
    if base is None:
        raise ModelLoadError(f"{reader.path} holds LoRA adapters (rank {record.rank}) trained over {record.base}: "
                             f"name that base model with --base {record.base}")
    base_weights = read_model_weights(base).weights
    if (found := weights_fingerprint(base_weights)) != record.base_fingerprint:
        raise ModelLoadError(f"--base {base}: not the weights the adapters of {reader.path} were trained over "
                             f"(fingerprint {found}, the checkpoint records {record.base_fingerprint} of {record.base})")
    try:
        return merge_adapters(base_weights, adapters, record.scale)
    except KeyError as err:
        raise ModelLoadError(f"{reader.path}: {err.args[0]}") from None


def add_base_argument(parser) -> None:
    """`--base DIR` on a command that loads a model: the base model of a LoRA checkpoint."""
    parser.add_argument("--base", type=Path, help="for a LoRA checkpoint: its base model (the run's train.init_from), "
                                                  "into whose weights the adapters are merged")


def model_config_from_dict(saved: object, where: str) -> ModelConfig:
    """The ModelConfig recorded in a checkpoint's config; a missing or foreign section names `where`."""
    if not isinstance(saved, dict):
        raise ModelLoadError(f"{where}: its config has no 'model' section")
    known = {f.name for f in fields(ModelConfig)}
    try:
        return ModelConfig(**{k: v for k, v in saved.items() if k in known})
    except (ConfigError, TypeError) as err:
        raise ModelLoadError(f"{where}: {err}") from None


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda: no CUDA device is visible on this machine")
    if name not in ("cpu", "cuda"):
        raise ModelLoadError(f"--device {name!r}: must be auto, cpu or cuda")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA, fp32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ModelLoadError(f"--dtype {name!r}: must be auto, fp32 or bf16")
    return DTYPES[name]


def build_model(weights: ModelWeights, kernels: KernelsConfig | None = None) -> GPT:
    """The single-process GPT holding `weights` (fp32, CPU). A missing, extra or wrong-shaped tensor is named."""
    model = GPT(weights.config, kernels or KernelsConfig(), weights.vocab_size, seed=0)
    state = model.state_dict()
    expected, given = set(state), set(weights.weights)
    if missing := sorted(expected - given):
        raise ModelLoadError(f"{weights.source}: no tensor {missing[0]!r}" + _more(missing))
    if extra := sorted(given - expected):
        raise ModelLoadError(f"{weights.source}: unexpected tensor {extra[0]!r}" + _more(extra))
    for name, tensor in weights.weights.items():
        target = state[name]
        value = _pad_vocab_rows(tensor, target.shape) if name == TOKEN_TABLE else tensor
        if value.shape != target.shape:
            raise ModelLoadError(f"{weights.source}: tensor {name!r} has shape {tuple(tensor.shape)}, the model "
                                 f"needs {tuple(target.shape)}")
        target.copy_(value)
    return model.eval()


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def _pad_vocab_rows(table: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The token table with zero rows added up to the model's padded vocabulary (padding logits are masked)."""
    if table.ndim != 2 or table.shape[0] >= shape[0] or table.shape[1] != shape[1]:
        return table
    return torch.cat([table, table.new_zeros(shape[0] - table.shape[0], shape[1])])


def load_model(path: str | Path, device: str = "auto", dtype: str = "auto",
               kernels: KernelsConfig | None = None, base: str | Path | None = None) -> LoadedModel:
    """A checkpoint or Hugging Face GPT-2 directory as a model ready to run on `device` in `dtype` (`base`: the
    base model of a LoRA checkpoint)."""
    target = resolve_device(device)
    precision = resolve_dtype(dtype, target)
    weights = read_model_weights(path, base)
    model = build_model(weights, kernels).to(device=target, dtype=precision)
    tokenizer = tokenizer_from_json(weights.tokenizer_json) if weights.tokenizer_json else None
    eot = tokenizer.token_to_id(EOT_TOKEN) if tokenizer else None
    return LoadedModel(model, tokenizer, weights.config, weights.vocab_size, eot, weights.source, target, precision)


class CachedDecoder:
    """A loaded model as decoding drives it: `prefill` the (left-padded) prompts, then `decode` a token per row.

    Logits come back in fp32, over the real vocabulary only (padding rows dropped).
    """

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.vocab_size = loaded.vocab_size
        self.cache: KVCache | None = None

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_length: int) -> torch.Tensor:
        cfg, loaded = self.loaded.config, self.loaded
        if max_length > cfg.block_size:
            raise ValueError(f"{max_length} tokens exceed the model's context of {cfg.block_size} (model.block_size)")
        self.cache = KVCache(cfg.n_layer, input_ids.shape[0], cfg.n_head, cfg.head_dim, max_length,
                             loaded.device, loaded.dtype)
        self.cache.mark_padding(attention_mask)
        return self._next_token_logits(input_ids)

    @torch.inference_mode()
    def decode(self, next_ids: torch.Tensor) -> torch.Tensor:
        return self._next_token_logits(next_ids[:, None])

    def select(self, rows: torch.Tensor) -> None:
        self._require_cache().select(rows.to(self.loaded.device))

    def _next_token_logits(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.loaded.model(ids.to(self.loaded.device), cache=self._require_cache())
        return logits[:, -1, : self.vocab_size].float()

    def _require_cache(self) -> KVCache:
        if self.cache is None:
            raise RuntimeError("CachedDecoder.prefill must come first")
        return self.cache

