"""Hugging Face GPT-2 directories read as our GPT's weights, and our weights written as one.

Our GPT is GPT-2: the same layers, tanh GELU (`gelu_new`), a token embedding tied to the output layer. Only the
layout of the weights differs:

    HF GPT2LMHeadModel                       our single-process GPT
    transformer.wte / wpe                    embedding.tokens / embedding.positions
    transformer.h.{i}.ln_1 / ln_2            blocks.{i}.ln_attn / ln_mlp
    transformer.h.{i}.attn.c_attn (C, 3C)    blocks.{i}.attn.qkv (3C, C): rows per head (head, q|k|v, head_dim)
    transformer.h.{i}.attn.c_proj (C, C)     blocks.{i}.attn.proj (C, C), transposed
    transformer.h.{i}.mlp.c_fc (C, F)        blocks.{i}.mlp.fc (F, C), transposed
    transformer.h.{i}.mlp.c_proj (F, C)      blocks.{i}.mlp.proj (C, F), transposed
    transformer.ln_f                         head.ln_f
    lm_head (tied to wte, not saved)         (the token embedding)

HF's Conv1D layers hold the transpose of `nn.Linear`'s weight, and `c_attn`'s outputs are all queries, then all
keys, then all values. Its non-parameter buffers (`attn.bias`, `attn.masked_bias`) are ignored. transformers is
never imported here: the files are read and written with safetensors, torch and tokenizers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from data_pipeline.tokenizer import EOT_TOKEN, tokenizer_from_json
from trainer.checkpoint import _first_line  # an error's first line, without torch's unsafe-load advice
from trainer.config import ConfigError, ModelConfig
from trainer.inference import ModelLoadError, ModelWeights

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
ARCHITECTURE = "GPT2LMHeadModel"
# The MLP's activation: both names are GELU's tanh approximation, which our MLP computes.
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
# GPT2Config options our GPT does not have, with the value under which they change nothing.
UNSUPPORTED_OPTIONS = {"scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
                       "add_cross_attention": False, "scale_attn_weights": True}
BUFFER_NAME = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
HF_PREFIX = "transformer."
LM_HEAD = "lm_head.weight"
# The ModelConfig fields an imported model gets beyond its shape (padding as in conf/model/gpt2-small.yaml).
IMPORTED_NAME = "gpt2-hf"
PAD_VOCAB_TO_MULTIPLE = 128


class HfExportError(ValueError):
    """Our weights cannot be written as a Hugging Face GPT-2 directory; the message names the problem."""


# ---------------------------------------------------------------------------------------------------------
# The mapping between the two sets of names and layouts.


@dataclass(frozen=True)
class TensorPair:
    """One weight under both names, the shape HF gives it, and how its layout changes between the two."""

    ours: str
    hf: str  # without the "transformer." prefix
    hf_shape: tuple[int, ...]
    layout: str  # "same", "transposed", "qkv_weight" or "qkv_bias"

    @property
    def our_shape(self) -> tuple[int, ...]:
        return self.hf_shape[::-1] if self.layout in ("transposed", "qkv_weight") else self.hf_shape


def tensor_pairs(cfg: ModelConfig, vocab_size: int) -> list[TensorPair]:
    """Every weight of the model, in our order."""
    c, f = cfg.n_embd, cfg.ffn_size
    pairs = [TensorPair("embedding.tokens.weight", "wte.weight", (vocab_size, c), "same"),
             TensorPair("embedding.positions.weight", "wpe.weight", (cfg.block_size, c), "same")]
    for i in range(cfg.n_layer):
        ours, hf = f"blocks.{i}.", f"h.{i}."
        pairs += [
            TensorPair(ours + "ln_attn.weight", hf + "ln_1.weight", (c,), "same"),
            TensorPair(ours + "ln_attn.bias", hf + "ln_1.bias", (c,), "same"),
            TensorPair(ours + "attn.qkv.weight", hf + "attn.c_attn.weight", (c, 3 * c), "qkv_weight"),
            TensorPair(ours + "attn.qkv.bias", hf + "attn.c_attn.bias", (3 * c,), "qkv_bias"),
            TensorPair(ours + "attn.proj.weight", hf + "attn.c_proj.weight", (c, c), "transposed"),
            TensorPair(ours + "attn.proj.bias", hf + "attn.c_proj.bias", (c,), "same"),
            TensorPair(ours + "ln_mlp.weight", hf + "ln_2.weight", (c,), "same"),
            TensorPair(ours + "ln_mlp.bias", hf + "ln_2.bias", (c,), "same"),
            TensorPair(ours + "mlp.fc.weight", hf + "mlp.c_fc.weight", (c, f), "transposed"),
            TensorPair(ours + "mlp.fc.bias", hf + "mlp.c_fc.bias", (f,), "same"),
            TensorPair(ours + "mlp.proj.weight", hf + "mlp.c_proj.weight", (f, c), "transposed"),
            TensorPair(ours + "mlp.proj.bias", hf + "mlp.c_proj.bias", (c,), "same"),
        ]
    return pairs + [TensorPair("head.ln_f.weight", "ln_f.weight", (c,), "same"),
                    TensorPair("head.ln_f.bias", "ln_f.bias", (c,), "same")]


def _qkv_parts_to_heads(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows ordered (q|k|v, head, head_dim), as HF's c_attn outputs, reordered to (head, q|k|v, head_dim)."""
    return t.reshape(3, n_head, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _qkv_heads_to_parts(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `_qkv_parts_to_heads`."""
    return t.reshape(n_head, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def hf_to_ours(pair: TensorPair, t: torch.Tensor, n_head: int) -> torch.Tensor:
    """An HF tensor in our layout."""
    if pair.layout == "transposed":
        t = t.t()
    elif pair.layout == "qkv_weight":
        t = _qkv_parts_to_heads(t.t(), n_head)
    elif pair.layout == "qkv_bias":
        t = _qkv_parts_to_heads(t, n_head)
    return t.contiguous()


def ours_to_hf(pair: TensorPair, t: torch.Tensor, n_head: int) -> torch.Tensor:
    """One of our tensors in HF's layout."""
    if pair.layout == "transposed":
        t = t.t()
    elif pair.layout == "qkv_weight":
        t = _qkv_heads_to_parts(t, n_head).t()
    elif pair.layout == "qkv_bias":
        t = _qkv_heads_to_parts(t, n_head)
    return t.contiguous()


# ---------------------------------------------------------------------------------------------------------
# Reading a Hugging Face directory.


def read_hf_directory(path: str | Path) -> ModelWeights:
    """The model a Hugging Face GPT-2 directory holds, as our single-process weights and tokenizer.

    Anything that is not a GPT-2 our GPT computes exactly raises ModelLoadError naming the file and field.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: no such directory (expected a Hugging Face GPT-2 directory)")
    raw = read_config_json(path / CONFIG_FILE)
    cfg, vocab_size = model_config_from_hf(raw, path / CONFIG_FILE)
    tensors, weights_file = read_hf_tensors(path)
    weights = _mapped_weights(tensors, cfg, vocab_size, weights_file, tied=raw.get("tie_word_embeddings", True))
    tokenizer_json = read_hf_tokenizer(path, vocab_size)
    return ModelWeights(cfg, vocab_size, weights, tokenizer_json, "hf")


def read_config_json(file: Path) -> dict:
    """config.json as a dict, if it describes a GPT-2 language model."""
    if not file.is_file():
        raise ModelLoadError(f"{file}: missing (not a Hugging Face model directory)")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{file}: unreadable ({_first_line(err)})") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{file}: a JSON {type(raw).__name__}, not an object")
    if raw.get("model_type") != "gpt2":
        raise ModelLoadError(f"{file}: model_type is {raw.get('model_type')!r}; only 'gpt2' models can be imported")
    architectures = raw.get("architectures")
    if architectures is not None and architectures != [ARCHITECTURE]:
        raise ModelLoadError(f"{file}: architectures is {architectures!r}; only [{ARCHITECTURE!r}] can be imported")
    return raw


def model_config_from_hf(raw: dict, file: Path) -> tuple[ModelConfig, int]:
    """Our ModelConfig and the vocabulary size of a GPT2Config dict; an option our GPT lacks is refused."""
    for option, neutral in UNSUPPORTED_OPTIONS.items():
        if raw.get(option, neutral) != neutral:
            raise ModelLoadError(f"{file}: {option}={json.dumps(raw[option])} is not supported (our GPT computes "
                                 f"{option}={json.dumps(neutral)})")
    activation = raw.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise ModelLoadError(f"{file}: activation_function={activation!r} is not supported (our MLP uses gelu_new)")
    shape = {key: _positive(raw, key, file) for key in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")}
    n_inner = None if raw.get("n_inner") is None else _positive(raw, "n_inner", file)
    eps = raw.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
        raise ModelLoadError(f"{file}: layer_norm_epsilon is {eps!r}, not a positive number")
    try:
        cfg = ModelConfig(name=IMPORTED_NAME, n_layer=shape["n_layer"], n_head=shape["n_head"],
                          n_embd=shape["n_embd"], block_size=shape["n_positions"], vocab_size=shape["vocab_size"],
                          pad_vocab_to_multiple=PAD_VOCAB_TO_MULTIPLE, ffn_hidden_size=n_inner, bias=True,
                          layernorm_eps=float(eps), dropout=0.0)
    except ConfigError as err:
        raise ModelLoadError(f"{file}: {err}") from None
    return cfg, shape["vocab_size"]


def _positive(raw: dict, key: str, file: Path) -> int:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelLoadError(f"{file}: {key} is {value!r}, not a positive integer")
    return value


def read_hf_tensors(path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """Every tensor of the directory's weights file(s), names without the "transformer." prefix, buffers
    dropped; and the file (or index) they came from."""
    for name, loader in ((SAFETENSORS_FILE, _load_safetensors), (SAFETENSORS_INDEX, _load_sharded),
                         (PICKLE_FILE, _load_pickle), (PICKLE_INDEX, _load_sharded)):
        file = path / name
        if file.is_file():
            tensors = loader(file)
            return {_hf_name(key): value for key, value in tensors.items()
                    if not BUFFER_NAME.fullmatch(_hf_name(key))}, file
    raise ModelLoadError(f"{path}: no weights ({SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {PICKLE_FILE} or "
                         f"{PICKLE_INDEX})")


def _hf_name(key: str) -> str:
    return key.removeprefix(HF_PREFIX)


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except Exception as err:  # noqa: BLE001 - any decoder failure means the same thing to the user
        raise ModelLoadError(f"{file}: unreadable safetensors file ({_first_line(err)})") from None


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only: a weights file holds tensors, never code to run.
        tensors = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"{file}: unreadable or unsafe weights file ({_first_line(err)})") from None
    if not isinstance(tensors, dict):
        raise ModelLoadError(f"{file}: holds a {type(tensors).__name__}, not a dict of tensors")
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise ModelLoadError(f"{file}: {name!r} is a {type(tensor).__name__}, not a tensor")
    return tensors


def _load_sharded(index: Path) -> dict[str, torch.Tensor]:
    """The tensors of the files an index.json's weight_map names."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelLoadError(f"{index}: unreadable weight index ({_first_line(err)})") from None
    load = _load_safetensors if index.name == SAFETENSORS_INDEX else _load_pickle
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        shard = index.parent / name
        if not shard.is_file():
            raise ModelLoadError(f"{shard}: missing (named by {index.name})")
        tensors.update(load(shard))
    return tensors


def _mapped_weights(tensors: dict[str, torch.Tensor], cfg: ModelConfig, vocab_size: int, file: Path,
                    tied: object) -> dict[str, torch.Tensor]:
    """HF's tensors under our names and layouts; a missing, extra or wrong-shaped one is named."""
    pairs = tensor_pairs(cfg, vocab_size)
    _check_output_layer(tensors, file, tied)
    if extra := sorted(set(tensors) - {p.hf for p in pairs} - {LM_HEAD}):
        raise ModelLoadError(f"{file}: unexpected tensor {extra[0]!r} (not part of GPT2LMHeadModel)")
    weights = {}
    for pair in pairs:
        if pair.hf not in tensors:
            raise ModelLoadError(f"{file}: no tensor {pair.hf!r}")
        tensor = tensors[pair.hf]
        if tuple(tensor.shape) != pair.hf_shape:
            raise ModelLoadError(f"{file}: tensor {pair.hf!r} has shape {tuple(tensor.shape)}; config.json "
                                 f"implies {pair.hf_shape}")
        weights[pair.ours] = hf_to_ours(pair, tensor, cfg.n_head)
    return weights


def _check_output_layer(tensors: dict[str, torch.Tensor], file: Path, tied: object) -> None:
    """Our output layer is the token embedding: an lm_head that differs from it cannot be imported."""
    head, table = tensors.get(LM_HEAD), tensors.get("wte.weight")
    if head is None:
        if tied is False:
            raise ModelLoadError(f"{file.parent / CONFIG_FILE}: tie_word_embeddings=false but {file.name} has no "
                                 f"{LM_HEAD!r} (our GPT ties the output layer to the token embedding)")
        return
    if table is None or head.shape != table.shape or not torch.equal(head, table):
        raise ModelLoadError(f"{file}: {LM_HEAD!r} differs from 'transformer.wte.weight' (an untied output "
                             f"layer; our GPT ties it to the token embedding)")


def read_hf_tokenizer(path: Path, vocab_size: int) -> str | None:
    """The directory's tokenizer as tokenizer.json text: its tokenizer.json, or one built from vocab.json and
    merges.txt (byte-level BPE as GPT-2's); None if it has neither."""
    file = path / TOKENIZER_FILE
    if file.is_file():
        tokenizer = _parse_tokenizer(file, lambda: tokenizer_from_json(file.read_text(encoding="utf-8")))
    elif (path / VOCAB_FILE).is_file() or (path / MERGES_FILE).is_file():
        file = path / VOCAB_FILE
        tokenizer = _parse_tokenizer(file, lambda: bpe_tokenizer(path / VOCAB_FILE, path / MERGES_FILE))
    else:
        return None
    if tokenizer.get_vocab_size() != vocab_size:
        raise ModelLoadError(f"{file}: the tokenizer has {tokenizer.get_vocab_size()} tokens but config.json has "
                             f"vocab_size={vocab_size}")
    return tokenizer.to_str()


def _parse_tokenizer(file: Path, parse: Callable[[], Tokenizer]) -> Tokenizer:
    try:
        return parse()
    except ModelLoadError:
        raise
    except Exception as err:  # noqa: BLE001 - tokenizers' own exception types are not importable
        raise ModelLoadError(f"{file}: unreadable tokenizer ({_first_line(err)})") from None


def bpe_tokenizer(vocab_file: Path, merges_file: Path) -> Tokenizer:
    """GPT-2's tokenizer from its vocab.json and merges.txt: byte-level BPE, no prefix space, `<|endoftext|>`
    special (an id of the vocabulary, not a new one)."""
    for file in (vocab_file, merges_file):
        if not file.is_file():
            raise ModelLoadError(f"{file}: missing ({vocab_file.name} and {merges_file.name} come together)")
    tokenizer = Tokenizer(models.BPE.from_file(str(vocab_file), str(merges_file)))
    if tokenizer.token_to_id(EOT_TOKEN) is None:
        raise ModelLoadError(f"{vocab_file}: has no {EOT_TOKEN!r} token")
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(EOT_TOKEN, special=True)])
    return tokenizer


# ---------------------------------------------------------------------------------------------------------
# Writing a Hugging Face directory.


def write_hf_directory(weights: ModelWeights, out: str | Path) -> Path:
    """Write `weights` as a Hugging Face GPT-2 directory that `from_pretrained` loads; returns its path.

    The files go into `<out>.tmp` and are renamed to `out` when complete; an existing non-empty `out` is refused.
    Without a tokenizer, no tokenizer files are written and the special token ids are left unset.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HfExportError(f"{out}: already exists and is not empty; choose another output directory")
    tensors = hf_tensors(weights)
    tokenizer = tokenizer_from_json(weights.tokenizer_json) if weights.tokenizer_json else None
    eot = tokenizer.token_to_id(EOT_TOKEN) if tokenizer else None
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _write_json(staging / CONFIG_FILE, hf_config(weights, eot, _dtype_name(tensors)))
        _write_json(staging / "generation_config.json",
                    {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot})
        save_file(tensors, str(staging / SAFETENSORS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            write_hf_tokenizer(tokenizer, staging, weights.config.block_size)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def hf_tensors(weights: ModelWeights) -> dict[str, torch.Tensor]:
    """Our weights under HF's names and layouts ("transformer." prefix; the tied lm_head omitted, as
    `save_pretrained` does)."""
    cfg = weights.config
    if not cfg.bias:
        raise HfExportError("model.bias=false: GPT-2 has biases in every linear layer and LayerNorm")
    tensors = {}
    for pair in tensor_pairs(cfg, weights.vocab_size):
        tensor = weights.weights.get(pair.ours)
        if tensor is None:
            raise HfExportError(f"{weights.source}: no tensor {pair.ours!r}")
        if tuple(tensor.shape) != pair.our_shape:
            raise HfExportError(f"{weights.source}: tensor {pair.ours!r} has shape {tuple(tensor.shape)}; its model "
                                f"config implies {pair.our_shape}")
        tensors[HF_PREFIX + pair.hf] = ours_to_hf(pair, tensor, cfg.n_head)
    return tensors


def _dtype_name(tensors: dict[str, torch.Tensor]) -> str:
    return str(next(iter(tensors.values())).dtype).removeprefix("torch.")


def hf_config(weights: ModelWeights, eot: int | None, dtype: str) -> dict:
    """A GPT2Config dict (transformers' defaults for the fields our GPT does not have)."""
    cfg = weights.config
    return {
        "architectures": [ARCHITECTURE], "model_type": "gpt2", "vocab_size": weights.vocab_size,
        "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
        "n_inner": cfg.ffn_hidden_size, "activation_function": "gelu_new", "layer_norm_epsilon": cfg.layernorm_eps,
        "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "initializer_range": cfg.init_std,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "add_cross_attention": False, "use_cache": True, "tie_word_embeddings": True,
        "bos_token_id": eot, "eos_token_id": eot, "dtype": dtype,
        "summary_type": "cls_index", "summary_use_proj": True, "summary_activation": None,
        "summary_proj_to_labels": True, "summary_first_dropout": 0.1,
    }


def write_hf_tokenizer(tokenizer: Tokenizer, out: Path, max_length: int) -> None:
    """tokenizer.json (and vocab.json, merges.txt for a BPE), with a tokenizer_config.json that makes
    `AutoTokenizer` encode and decode as our tokenizer does: a literal `<|endoftext|>` in text stays text
    (`split_special_tokens`, our `encode_special_tokens`), no prefix space, no token added around the text."""
    (out / TOKENIZER_FILE).write_text(tokenizer.to_str(), encoding="utf-8")
    if isinstance(tokenizer.model, models.BPE):
        tokenizer.model.save(str(out))
    special = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer", **special, "model_max_length": max_length,
        "add_prefix_space": False, "add_bos_token": False, "split_special_tokens": True,
        "clean_up_tokenization_spaces": False, "errors": "replace",
    })
    _write_json(out / "special_tokens_map.json", special)


def _write_json(file: Path, payload: dict) -> None:
    file.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
