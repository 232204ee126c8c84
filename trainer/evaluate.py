"""Evaluate a model on text: mean next-token loss, perplexity and bits per byte.

    python -m trainer.evaluate CKPT_OR_HF_DIR --data PREPARED_DIR [--split val|train]
    python -m trainer.evaluate CKPT_OR_HF_DIR --data a.txt,b.jsonl c.txt [--out result.json]

The data is a prepared directory (what `data_pipeline.prepare` writes; its tokens are read as stored, shard
after shard in index order, each shard checked against its sha256, and its tokenizer must be the model's), or
text files (`.jsonl`: a document per line, its "text" field; any other file: one document, UTF-8) tokenized
with the model's tokenizer, every document followed by the end-of-text token as in training.

What is measured. The token stream is cut into windows of seq_len + 1 tokens taken with stride seq_len, as
the evaluation stream of training does (data_pipeline.stream, shuffle=False): window w is tokens
[w*T, w*T + T + 1), the model reads its first T tokens and predicts its last T, so the predicted tokens of
consecutive windows do not overlap and every token after the first is predicted exactly once. A tail too
short for a window is left out, and so are windows past `--max-tokens` predicted tokens (the cap is
rounded down to whole windows).
- loss: the mean over predicted tokens of the cross entropy (nats), computed in fp32 over the real
  vocabulary (the padding columns are dropped) and summed in fp64;
- perplexity: exp(loss);
- bits per byte: the total cross entropy in bits (nats / ln 2) divided by the number of UTF-8 bytes of the
  predicted tokens. It does not depend on the tokenizer, so models with different vocabularies compare.
  A token's bytes are those its byte-level BPE string stands for (GPT-2's byte <-> unicode alphabet), so a
  token holding part of a multi-byte character counts exactly the bytes it holds (decoding tokens one by one
  would not); the end-of-text token (any special token) counts 0 bytes. Over text files whose documents are
  fully covered this is the text's own byte count, less the first token's.

Bad input (a missing path, empty data, another tokenizer, a sequence length beyond the model's context)
is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from data_pipeline.prepare import INDEX_FILE, TOKENIZER_FILE, atomic_write_bytes
from data_pipeline.shards import load_shard, read_index, shard_url
from data_pipeline.sources import BadInputLog, file_documents
from data_pipeline.tokenizer import encode_with_eot, load_tokenizer
from trainer.inference import LoadedModel, add_base_argument, load_model

DEFAULT_BATCH_SIZE = 8
TEXT_FIELD = "text"
ENCODE_GROUP = 256  # documents tokenized in one batch


class EvalError(ValueError):
    """Bad input to the evaluation; the message says what, and names the path or option."""


@dataclass(frozen=True)
class Totals:
    """What the windows added up to: cross entropy (nats), predicted tokens, their bytes, windows."""

    nats: float = 0.0
    tokens: int = 0
    bytes: int = 0
    windows: int = 0

    def __add__(self, other: Totals) -> Totals:
        return Totals(self.nats + other.nats, self.tokens + other.tokens, self.bytes + other.bytes,
                      self.windows + other.windows)


# --- bytes of tokens ---------------------------------------------------------------------------------
@cache
def unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character that stands for each of the 256 bytes -> the byte.

    Printable bytes stand for themselves; the others (control characters, space, ...) are mapped in order
    to the characters from U+0100 on.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return {char: byte for byte, char in chars.items()}


def is_byte_level(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer's token strings are byte-level BPE strings (its decoder maps them back to bytes)."""
    decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
    return decoder.get("type") == "ByteLevel"


def token_byte_counts(tokenizer: Tokenizer, size: int) -> np.ndarray:
    """(size,) int64: the UTF-8 bytes each token id stands for; special tokens and unknown ids count 0."""
    special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    alphabet = unicode_to_byte()
    counts = np.zeros(size, dtype=np.int64)
    for i in range(size):
        token = tokenizer.id_to_token(i)
        if token is None or i in special:
            continue
        # A character outside the alphabet (an added, non-special token's plain text) counts its own bytes.
        counts[i] = sum(1 if char in alphabet else len(char.encode()) for char in token)
    return counts


# --- data --------------------------------------------------------------------------------------------
def data_paths(args: list[str]) -> list[Path]:
    """The --data arguments as paths: several arguments, each possibly a comma-separated list."""
    paths = []
    for arg in args:
        parts = [arg] if Path(arg).exists() else [p for p in arg.split(",") if p]
        paths.extend(Path(p) for p in parts)
    if not paths:
        raise EvalError("--data: no path given")
    for path in paths:
        if not path.exists():
            raise EvalError(f"--data {path}: no such file or directory")
    return paths


def is_prepared(paths: list[Path]) -> bool:
    """Whether --data names one prepared directory (rather than text files)."""
    if len(paths) > 1 or not paths[0].is_dir():
        return False
    if not (paths[0] / INDEX_FILE).is_file():
        raise EvalError(f"--data {paths[0]}: not a prepared directory (no {INDEX_FILE}; run data_pipeline.prepare)")
    return True


def _tokenizer_signature(tokenizer: Tokenizer) -> tuple[dict, list]:
    """What makes two tokenizers give the same ids: the vocabulary (special tokens included) and the merges."""
    return tokenizer.get_vocab(with_added_tokens=True), json.loads(tokenizer.to_str())["model"].get("merges", [])


def check_same_tokenizer(data: Tokenizer, model: Tokenizer, data_dir: Path, model_path: Path) -> None:
    """Refuse data tokenized with another tokenizer than the model's, naming both."""
    if _tokenizer_signature(data) == _tokenizer_signature(model):
        return
    raise EvalError(f"--data {data_dir} was tokenized with another tokenizer ({data_dir / TOKENIZER_FILE}, "
                    f"{data.get_vocab_size()} tokens) than the model's ({model_path}, {model.get_vocab_size()} "
                    "tokens): evaluate on data prepared with the model's tokenizer, or on text files")


def prepared_tokens(prepared: Path, split: str, tokenizer: Tokenizer) -> Iterator[np.ndarray]:
    """The tokens of a prepared directory's split, shard after shard in index order (sha256 checked)."""
    index = read_index(prepared)
    if split not in index["splits"]:
        raise EvalError(f"--split {split}: {prepared} has no such split (has {', '.join(sorted(index['splits']))})")
    load_kwargs = {"tokenizer": tokenizer} if index.get("text_shards") else {}
    for shard in index["splits"][split]["shards"]:
        url = shard_url(prepared, shard["file"])
        yield load_shard(url, expected_sha256=shard["sha256"], **load_kwargs).tokens


def check_text_files(files: list[Path]) -> None:
    """Refuse a directory among text files (a binary file is refused when read: it is not UTF-8)."""
    for path in files:
        if path.is_dir():
            raise EvalError(f"--data {path}: a directory among files; give one prepared directory or text files")


def text_tokens(files: list[Path], tokenizer: Tokenizer) -> Iterator[np.ndarray]:
    """The documents of text files tokenized, each followed by the end-of-text id, file after file.

    `.jsonl` (`.gz`, `.zst`) and `.parquet` files hold a document per record (its "text"); any other file is
    one document, read as UTF-8 exactly (data_pipeline.sources.file_documents).
    """
    for path in files:
        log = BadInputLog(strict=True)  # bad input stops the evaluation: the numbers would not be what was asked
        texts = (text for _, text in file_documents(path, path.name, TEXT_FIELD, log))
        while group := list(islice(texts, ENCODE_GROUP)):
            yield from encode_with_eot(tokenizer, group, np.dtype(np.int64))


def windows(chunks: Iterable[np.ndarray], seq_len: int) -> Iterator[np.ndarray]:
    """Windows of seq_len + 1 tokens with stride seq_len over the concatenated chunks; the short tail is dropped."""
    pending = np.empty(0, dtype=np.int64)
    for chunk in chunks:
        pending = np.concatenate([pending, chunk.astype(np.int64)])
        n = (pending.size - 1) // seq_len
        for w in range(n):
            yield pending[w * seq_len : w * seq_len + seq_len + 1]
        pending = pending[n * seq_len :]


def batches(rows: Iterator[np.ndarray], batch_size: int, max_windows: int | None) -> Iterator[torch.Tensor]:
    """(B, seq_len + 1) LongTensors of up to batch_size windows, at most max_windows windows in all."""
    rows = islice(rows, max_windows)  # no window past the cap is cut (nor its shard read)
    while batch := list(islice(rows, batch_size)):
        yield torch.from_numpy(np.stack(batch))


# --- scoring ---------------------------------------------------------------------------------------
@torch.inference_mode()
def score_batch(loaded: LoadedModel, batch: torch.Tensor, byte_counts: np.ndarray) -> Totals:
    """The summed cross entropy of a batch's predicted tokens (1..seq_len of each window), in fp32."""
    ids = batch.to(loaded.device)
    logits = loaded.model(ids[:, :-1])[..., : loaded.vocab_size].float()
    targets = ids[:, 1:]
    nats = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").double().sum()
    n_bytes = int(byte_counts[batch[:, 1:].numpy()].sum())
    return Totals(float(nats), targets.numel(), n_bytes, batch.shape[0])


def score(loaded: LoadedModel, rows: Iterable[torch.Tensor], byte_counts: np.ndarray) -> Totals:
    """The totals over all batches."""
    totals = Totals()
    for batch in rows:
        totals += score_batch(loaded, batch, byte_counts)
    return totals


def metrics(totals: Totals) -> dict:
    """loss (mean nats per predicted token), perplexity and bits per byte (None when no byte was predicted)."""
    loss = totals.nats / totals.tokens
    bits_per_byte = totals.nats / math.log(2) / totals.bytes if totals.bytes else None
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": bits_per_byte,
            "tokens": totals.tokens, "bytes": totals.bytes, "windows": totals.windows}


# --- command line ----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a checkpoint directory or a Hugging Face GPT-2 directory")
    add_base_argument(parser)
    parser.add_argument("--data", nargs="+", required=True,
                        help="a prepared directory, or text files (several, or comma-separated)")
    parser.add_argument("--split", choices=("val", "train"), default="val", help="split of a prepared directory")
    parser.add_argument("--seq-len", type=int, help="tokens the model reads per window (default: its block_size)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="windows per forward pass")
    parser.add_argument("--max-tokens", type=int, help="evaluate at most this many predicted tokens")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on the CPU), fp32 or bf16")
    parser.add_argument("--out", type=Path, help="also write the result to this JSON file")
    return parser.parse_args(argv)


def check_sizes(args: argparse.Namespace, block_size: int) -> tuple[int, int | None]:
    """The sequence length and the window cap; options out of range are refused, naming the numbers."""
    seq_len = block_size if args.seq_len is None else args.seq_len
    if not 1 <= seq_len <= block_size:
        raise EvalError(f"--seq-len {seq_len}: must be between 1 and the model's context of {block_size} tokens "
                        "(model.block_size)")
    if args.batch_size < 1:
        raise EvalError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.max_tokens is None:
        return seq_len, None
    if args.max_tokens < seq_len:
        raise EvalError(f"--max-tokens {args.max_tokens}: less than one window of --seq-len {seq_len} tokens")
    return seq_len, args.max_tokens // seq_len


def data_stream(args: argparse.Namespace, loaded: LoadedModel, paths: list[Path]
                ) -> tuple[Iterator[np.ndarray], Tokenizer, str | None]:
    """The data's tokens (lazily), the tokenizer that gives their bytes, and the split (None for text files)."""
    if is_prepared(paths):
        data_tok = load_tokenizer(paths[0] / TOKENIZER_FILE)
        if loaded.tokenizer is not None:
            check_same_tokenizer(data_tok, loaded.tokenizer, paths[0], args.model)
        elif data_tok.get_vocab_size() > loaded.vocab_size:
            raise EvalError(f"--data {paths[0]}: its tokenizer has {data_tok.get_vocab_size()} tokens, more than "
                            f"the model's vocabulary of {loaded.vocab_size} ({args.model})")
        else:
            print(f"warning: {args.model} has no tokenizer; assuming {paths[0]} was tokenized with the model's",
                  file=sys.stderr)
        return prepared_tokens(paths[0], args.split, data_tok), data_tok, args.split
    check_text_files(paths)
    if loaded.tokenizer is None:
        raise EvalError(f"{args.model}: holds no tokenizer ({TOKENIZER_FILE}), so text files cannot be tokenized; "
                        "give a prepared directory")
    return text_tokens(paths, loaded.tokenizer), loaded.tokenizer, None


def evaluate(args: argparse.Namespace) -> dict:
    """The result of the evaluation the command line asks for (the JSON that is printed)."""
    paths = data_paths(args.data)
    if args.out is not None and not args.out.parent.is_dir():
        raise EvalError(f"--out {args.out}: no such directory {args.out.parent}")
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, base=args.base)
    seq_len, max_windows = check_sizes(args, loaded.config.block_size)
    chunks, tokenizer, split = data_stream(args, loaded, paths)
    byte_level = is_byte_level(tokenizer)
    if not byte_level:
        print(f"warning: the tokenizer of {args.model} is not byte-level BPE: bits per byte not computed",
              file=sys.stderr)
    size = max(loaded.vocab_size, tokenizer.get_vocab_size())
    byte_counts = token_byte_counts(tokenizer, size) if byte_level else np.zeros(size, dtype=np.int64)
    totals = score(loaded, batches(windows(chunks, seq_len), args.batch_size, max_windows), byte_counts)
    if totals.windows == 0:
        raise EvalError(f"--data {', '.join(map(str, paths))}: empty, fewer than one window of --seq-len + 1 = "
                        f"{seq_len + 1} tokens" + (f" in its {split} split" if split else ""))
    result = metrics(totals)
    if not byte_level:
        result["bytes"] = result["bits_per_byte"] = None
    return {**result, "model": str(args.model), "data": [str(p) for p in paths], "split": split,
            "seq_len": seq_len, "batch_size": args.batch_size, "max_tokens": args.max_tokens,
            "device": str(loaded.device), "dtype": str(loaded.dtype).removeprefix("torch.")}


def write_result(out: Path, text: str) -> None:
    """Write the JSON result atomically (a reader sees no file or the whole one)."""
    try:
        atomic_write_bytes(out, text.encode())
    except OSError as err:
        raise EvalError(f"--out {out}: cannot write it ({err.strerror or err})") from None


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; print the result as JSON (and write it to --out). Bad input: one line, exit 2."""
    args = parse_args(argv)
    try:
        text = json.dumps(evaluate(args), indent=1) + "\n"
        if args.out is not None:
            write_result(args.out, text)
    # EvalError, ModelLoadError, corrupt shards, bad index or input files are ValueErrors; missing files OSErrors.
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
