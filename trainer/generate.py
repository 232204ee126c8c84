"""Generate text from a checkpoint or a Hugging Face GPT-2 directory: sampling, greedy or beam search.

    python -m trainer.generate CKPT_OR_HF_DIR --prompt "def main(" [--prompt "import "] [--max-new-tokens 64]
    python -m trainer.generate CKPT_OR_HF_DIR --prompts prompts.jsonl --greedy
    python -m trainer.generate CKPT_OR_HF_DIR --prompt "class " --num-beams 4 --length-penalty 0.8

Decoding mode: sampling by default (--temperature, --top-k, --top-p shape it); --greedy takes the best token
each step; --num-beams N > 1 runs beam search (beam sampling if a sampling option is given too). The same
semantics as transformers' generate() (trainer/decoding.py). --prompts reads a JSONL file: one object per
line with a "prompt" string (blank lines are skipped). Generation stops at the model's end-of-text token
unless --ignore-eos. Prompts are decoded together in batches of --batch-size, left-padded.

Printed: each prompt with its completions (decoded text), then a line with the new tokens per second (the
tokens of the returned completions / wall seconds of generation) and, when sampling, the seed. Bad input (an empty prompt, a prompt plus
--max-new-tokens beyond the model's context, an unreadable prompts file, settings out of range, a model
that cannot be loaded) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from trainer.decoding import GenerationSettings, InvalidSetting, generate
from trainer.inference import CachedDecoder, LoadedModel, ModelLoadError, add_base_argument, load_model

SAMPLING_OPTIONS = ("temperature", "top_k", "top_p")


class GenerateError(ValueError):
    """Bad command-line input; the message is the one line printed."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m trainer.generate", description=__doc__.splitlines()[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("model", type=Path, help="a checkpoint directory or a Hugging Face GPT-2 directory")
    add_base_argument(parser)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (may be given several times)")
    parser.add_argument("--prompts", type=Path, help='a JSONL file: one {"prompt": "..."} per line')
    parser.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per completion at most")
    parser.add_argument("--greedy", action="store_true", help="the most likely token each step (no sampling)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (default 1.0)")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens only (default 0 = off)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling: the smallest set holding this much "
                                                    "probability (default 1.0 = off)")
    parser.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1 = none)")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="beam search: a finished beam scores sum_logprobs / new_length ** this")
    parser.add_argument("--early-stopping", action="store_true",
                        help="beam search: stop a prompt as soon as it has num_beams finished beams")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeated tokens")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0, help="never repeat an n-gram of this size")
    parser.add_argument("--num-return-sequences", type=int, default=1, help="completions per prompt")
    parser.add_argument("--seed", type=int, help="sampling seed (default: a random one, printed at the end)")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                        help="auto: bf16 on CUDA, fp32 on the CPU")
    return parser


def read_prompts_file(path: Path) -> list[str]:
    """The "prompt" strings of a JSONL file; a bad line is named by file and line number."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise GenerateError(f"--prompts {path}: cannot read ({_reason(err)})") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise GenerateError(f"{path} line {number}: not JSON ({_reason(err)})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise GenerateError(f'{path} line {number}: expected an object with a "prompt" string')
        if not record["prompt"]:
            raise GenerateError(f"{path} line {number}: the prompt is empty")
        prompts.append(record["prompt"])
    if not prompts:
        raise GenerateError(f"--prompts {path}: holds no prompts")
    return prompts


def gather_prompts(args: argparse.Namespace) -> list[str]:
    """The --prompt texts, then those of --prompts."""
    for number, text in enumerate(args.prompt, start=1):
        if not text:
            raise GenerateError(f"--prompt number {number} is empty: generation needs some text to continue")
    prompts = list(args.prompt)
    if args.prompts is not None:
        prompts += read_prompts_file(args.prompts)
    if not prompts:
        raise GenerateError("no prompt: give --prompt TEXT or --prompts FILE.jsonl")
    return prompts


def settings_from_args(args: argparse.Namespace) -> GenerationSettings:
    """The GenerationSettings the options ask for (no eos yet: the model has it); a setting out of range is
    named by its option."""
    sampling_given = [name for name in SAMPLING_OPTIONS if getattr(args, name) is not None]
    if args.greedy and sampling_given:
        raise GenerateError(f"--greedy and --{_option(sampling_given[0])} contradict each other: greedy decoding "
                            "does not sample")
    do_sample = not args.greedy and (args.num_beams == 1 or bool(sampling_given))
    if args.batch_size < 1:
        raise GenerateError(f"--batch-size {args.batch_size}: must be at least 1")
    seed = args.seed
    if do_sample and seed is None:
        seed = random.randrange(2**31)  # printed with the results, so that --seed can repeat them
    try:
        return GenerationSettings(
            max_new_tokens=args.max_new_tokens, do_sample=do_sample,
            temperature=1.0 if args.temperature is None else args.temperature,
            top_k=0 if args.top_k is None else args.top_k, top_p=1.0 if args.top_p is None else args.top_p,
            num_beams=args.num_beams, length_penalty=args.length_penalty, early_stopping=args.early_stopping,
            repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
            num_return_sequences=args.num_return_sequences, seed=seed,
        )  # fmt: skip
    except InvalidSetting as err:
        raise GenerateError(f"--{_option(err.field)} {err.value}: {err.why}") from None


def encode_prompts(texts: list[str], loaded: LoadedModel, max_new_tokens: int) -> list[list[int]]:
    """Token ids of each prompt; each must leave room for --max-new-tokens in the model's context."""
    if loaded.tokenizer is None:
        raise GenerateError("the model directory holds no tokenizer (tokenizer.json), so text cannot be encoded")
    context = loaded.config.block_size
    encoded = []
    for number, ids in enumerate((e.ids for e in loaded.tokenizer.encode_batch(texts)), start=1):
        if not ids:
            raise GenerateError(f"prompt {number} encodes to no tokens")
        if len(ids) + max_new_tokens > context:
            raise GenerateError(f"prompt {number} has {len(ids)} tokens; with --max-new-tokens {max_new_tokens} "
                                f"that is {len(ids) + max_new_tokens}, more than the model's context of {context} "
                                "tokens (model.block_size)")
        encoded.append(ids)
    return encoded


@dataclass
class Run:
    """Completions (new token ids) of every prompt, and what producing them took."""

    completions: list[list[list[int]]]
    seconds: float

    @property
    def new_tokens(self) -> int:
        return sum(len(ids) for per_prompt in self.completions for ids in per_prompt)


def run_batches(loaded: LoadedModel, prompts: list[list[int]], settings: GenerationSettings,
                batch_size: int) -> Run:
    """Generate for the prompts, batch_size at a time (batch i samples with seed + i)."""
    decoder = CachedDecoder(loaded)
    completions: list[list[list[int]]] = []
    start = time.perf_counter()
    for index, first in enumerate(range(0, len(prompts), batch_size)):
        seed = None if settings.seed is None else settings.seed + index
        completions += generate(decoder, prompts[first:first + batch_size], replace(settings, seed=seed))
    return Run(completions, time.perf_counter() - start)


def print_completions(texts: list[str], run: Run, loaded: LoadedModel, settings: GenerationSettings) -> None:
    """Each prompt, then its completions as text; last, the speed (and the seed that repeats a sampling run)."""
    eos = settings.eos_token_id
    for number, (text, per_prompt) in enumerate(zip(texts, run.completions, strict=True), start=1):
        print(f"=== prompt {number} of {len(texts)} ===")
        print(text)
        for choice, ids in enumerate(per_prompt, start=1):
            ending = "end of text" if eos is not None and ids and ids[-1] == eos else "length limit"
            print(f"--- completion {choice} of {len(per_prompt)} ({len(ids)} new tokens, {ending}) ---")
            print(loaded.tokenizer.decode(ids, skip_special_tokens=False))
    rate = run.new_tokens / run.seconds if run.seconds > 0 else float("inf")
    seed = f", --seed {settings.seed}" if settings.do_sample else ""
    print(f"generated {run.new_tokens} new tokens in {run.seconds:.2f} s: {rate:.1f} tokens/s "
          f"({loaded.device}, {str(loaded.dtype).removeprefix('torch.')}{seed})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        texts = gather_prompts(args)
        settings = settings_from_args(args)
        loaded = load_model(args.model, device=args.device, dtype=args.dtype, base=args.base)
        eos = None if args.ignore_eos else loaded.eot_id
        settings = replace(settings, eos_token_id=eos)
        prompts = encode_prompts(texts, loaded, settings.max_new_tokens)
        run = run_batches(loaded, prompts, settings, args.batch_size)
    except (GenerateError, ModelLoadError) as err:
        print(f"error: {_reason(err)}", file=sys.stderr)
        return 2
    print_completions(texts, run, loaded, settings)
    return 0


def _option(field: str) -> str:
    return field.replace("_", "-")


def _reason(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
