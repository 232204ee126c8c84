"""`make finetune`: fine-tune the model `make train` pretrained on an offline task, and print before and after.

    python -m trainer.finetune_demo [--base CKPT] [--max-modules N] [OVERRIDES for trainer.finetune ...]

The task (data_pipeline/sft_demo.py): a docstring of a stdlib function in, its `def name(args):` line out,
split by module, so the held-out functions come from modules never trained on. The steps:
1. write the task's JSONL and prepare it (`prepare_sft`) with the base model's tokenizer;
2. measure the base model on the held-out (val) split: the mean loss over the response tokens (the masked
   SFT loss, with the template's new tokens given zero embeddings as fine-tuning starts them), and a task
   score from greedy answers to the held-out prompts (KV-cached decoding, trainer/decoding.py): exact match
   of the signature line, the function's name right, and a well-formed `def` line;
3. fine-tune with the real entry point, `python -m trainer.finetune` (the train/finetune preset, this demo's
   settings, then the given overrides, which win);
4. measure the fine-tuned checkpoint the same way and print both.

The base is the newest checkpoint of runs/tiny (what `make train` writes), or --base. Bad input (no base, a
run directory this demo did not make) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from data_pipeline.chat_template import ChatTemplate, render_generation_prompt
from data_pipeline.corpus import split_of
from data_pipeline.prepare import TOKENIZER_FILE, atomic_write_bytes
from data_pipeline.prepare_sft import SFTOptions, prepare_sft
from data_pipeline.sft_demo import stdlib_records
from data_pipeline.sft_stream import SFTStream
from data_pipeline.tokenizer import EOT_TOKEN, load_tokenizer
from trainer.checkpoint import CheckpointError, resolve_resume
from trainer.decoding import GenerationSettings
from trainer.generate import run_batches
from trainer.inference import LoadedModel, ModelLoadError, build_model, read_model_weights, resolve_device

BASE_RUN = Path("runs/tiny")
# The demo's settings for trainer.finetune (the command line's overrides come after them and win).
DEMO_OVERRIDES = ("train.eval_interval=10", "train.checkpoint_interval=0")
MARKER = ".finetune_demo"  # in a run directory this demo made (and may remove to start again)
DEF_LINE = re.compile(r"(?:async\s+)?def\s+([A-Za-z_]\w*)\s*\(")


class DemoError(ValueError):
    """Bad input to the demo; the message is the one line printed."""


@dataclasses.dataclass
class Scores:
    """A model on the held-out split: mean response loss (nats/token), and shares of greedy answers that are
    the signature line exactly, name the function right, and are a well-formed `def` line."""

    loss: float
    exact: float
    name: float
    well_formed: float
    answers: list[str]


def base_checkpoint(run_dir: Path) -> Path:
    """The newest intact checkpoint of a run directory; DemoError saying how to get one if there is none."""
    try:
        path = resolve_resume("auto", run_dir / "checkpoints")
    except CheckpointError as err:
        raise DemoError(str(err)) from None
    if path is None:
        raise DemoError(f"no checkpoint in {run_dir}/checkpoints to fine-tune: run `make train` first (a few "
                        "minutes on a CPU), or name one with --base")
    return path


def write_task(path: Path, max_modules: int) -> list[dict]:
    """The task's records (sft_demo) as JSONL at path."""
    records = list(stdlib_records(max_modules))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))
    return records


def prepare_task(jsonl: Path, tokenizer_json: str, out: Path, max_length: int, val_fraction: float) -> dict:
    """prepare_sft of the task with the base model's tokenizer; the index."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Path(tmp) / TOKENIZER_FILE
        tokenizer.write_text(tokenizer_json, encoding="utf-8")
        return prepare_sft(SFTOptions(sources=[str(jsonl)], out=str(out), tokenizer=str(tokenizer),
                                      max_length=max_length, val_fraction=val_fraction))


def load_for_task(path: Path, prepared: Path, vocab_size: int, base: Path | None = None) -> LoadedModel:
    """A model with the task's vocabulary (a base model's token table grows by zero rows, as fine-tuning
    starts it) and the task's tokenizer (the base's plus the chat template's tokens); `base`: the model a LoRA
    checkpoint's adapters are merged into."""
    weights = dataclasses.replace(read_model_weights(path, base), vocab_size=vocab_size)
    device = resolve_device("auto")
    tokenizer = load_tokenizer(prepared / TOKENIZER_FILE)
    return LoadedModel(build_model(weights).to(device), tokenizer, weights.config, vocab_size,
                       tokenizer.token_to_id(EOT_TOKEN), weights.source, device, torch.float32)


@torch.inference_mode()
def response_loss(loaded: LoadedModel, prepared: Path, batch_size: int = 16) -> float:
    """Mean cross entropy over the trained (response) tokens of the whole val split, as training evaluates."""
    stream = SFTStream(str(prepared), "val", loaded.config.block_size, batch_size, seed=0, shuffle=False,
                       loop=False)
    nats = tokens = 0.0
    for ids, targets, mask, segments, positions in stream:
        inputs = tuple(t.to(loaded.device) for t in (ids, segments, positions))
        nats += float(loaded.model(inputs, (targets.to(loaded.device), mask.to(loaded.device))))
        tokens += float(mask.sum())
    return nats / tokens


def answers(loaded: LoadedModel, template: ChatTemplate, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers (text up to the end token) to the prompts, rendered as in training."""
    ids = [render_generation_prompt(loaded.tokenizer, template, [{"role": "user", "content": p}]).tolist()
           for p in prompts]
    settings = GenerationSettings(max_new_tokens=max_new_tokens, eos_token_id=loaded.eot_id)
    run = run_batches(loaded, ids, settings, batch_size=32)
    return [loaded.tokenizer.decode(per_prompt[0]).strip() for per_prompt in run.completions]


def is_well_formed(answer: str) -> bool:
    """Whether the answer's first line is a function definition line (`def f(...):`, annotations allowed)."""
    try:
        tree = ast.parse(answer.split("\n", 1)[0] + "\n    pass\n")
    except (SyntaxError, ValueError):
        return False
    return len(tree.body) == 1 and isinstance(tree.body[0], ast.FunctionDef | ast.AsyncFunctionDef)


def score(loaded: LoadedModel, prepared: Path, template: ChatTemplate, held_out: list[dict],
          max_new_tokens: int) -> Scores:
    """The loss and the task scores of one model."""
    got = answers(loaded, template, [r["prompt"] for r in held_out], max_new_tokens)
    pairs = list(zip(got, (r["response"] for r in held_out), strict=True))
    return Scores(
        loss=response_loss(loaded, prepared),
        exact=sum(a == e for a, e in pairs) / len(pairs),
        name=sum(function_name(a) == function_name(e) for a, e in pairs) / len(pairs),
        well_formed=sum(map(is_well_formed, got)) / len(pairs),
        answers=got,
    )


def function_name(line: str) -> str:
    """The name a `def` line defines ("" if the text is not one: never equal to a signature's name)."""
    match = DEF_LINE.match(line)
    return match.group(1) if match else ""


def held_out_records(records: list[dict], loaded: LoadedModel, template: ChatTemplate, val_fraction: float,
                     max_new_tokens: int) -> list[dict]:
    """The val split's records (prepare_sft's split by module) whose prompt leaves room for the answer."""
    room = loaded.config.block_size - max_new_tokens
    val = [r for r in records if split_of(r["group"], val_fraction) == "val"]
    fits = [len(render_generation_prompt(loaded.tokenizer, template, [{"role": "user", "content": r["prompt"]}]))
            <= room for r in val]
    kept = [r for r, ok in zip(val, fits, strict=True) if ok]
    if not kept:
        raise DemoError(f"no held-out prompt leaves room for --max-new-tokens {max_new_tokens} in the model's "
                        f"context of {loaded.config.block_size} tokens")
    return kept


def fresh_run_dir(run_dir: Path, base: Path) -> None:
    """Remove an earlier run of this demo (marked), so the fine-tuning starts from the base again."""
    if run_dir.resolve() in base.resolve().parents:
        raise DemoError(f"--run-dir {run_dir} holds the base model {base}: choose another")
    if run_dir.exists():
        if not (run_dir / MARKER).is_file():
            raise DemoError(f"--run-dir {run_dir} exists and was not made by this demo: choose another")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / MARKER).touch()


def finetune_overrides(base: Path, prepared: Path, run_dir: Path, overrides: list[str]) -> list[str]:
    """trainer.finetune's overrides: from base, on the prepared task, the demo's settings, then the caller's."""
    return [f"train.init_from={base}", f"data.prepared_dir={prepared}", f"train.run_name={run_dir.name}",
            *DEMO_OVERRIDES, *overrides]


def fine_tune(base: Path, prepared: Path, run_dir: Path, overrides: list[str]) -> Path:
    """Run `python -m trainer.finetune` from base on the prepared task, in run_dir; its final checkpoint."""
    command = [sys.executable, "-m", "trainer.finetune", *finetune_overrides(base, prepared, run_dir, overrides),
               f"hydra.run.dir={run_dir}"]
    print("$ " + " ".join(command[1:]), flush=True)
    if (status := subprocess.run(command).returncode) != 0:
        raise DemoError(f"fine-tuning failed (exit status {status}); its log is in {run_dir}")
    return base_checkpoint(run_dir)


def table(before: Scores, after: Scores, n: int) -> str:
    """Before and after, one line per figure."""
    rows = [("response loss (nats/token)", f"{before.loss:.3f}", f"{after.loss:.3f}")]
    for label, key in (("exact signature", "exact"), ("function name right", "name"),
                       ("well-formed def line", "well_formed")):
        rows.append((label, f"{getattr(before, key):.1%}", f"{getattr(after, key):.1%}"))
    lines = [f"{'held-out (' + str(n) + ' functions)':<28}{'before':>10}{'after':>10}"]
    lines += [f"{label:<28}{b:>10}{a:>10}" for label, b, a in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.finetune_demo", description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides for trainer.finetune (they win over the demo's)")
    p.add_argument("--base", type=Path, help=f"the model to fine-tune (default: the newest checkpoint of {BASE_RUN})")
    p.add_argument("--jsonl", type=Path, default=Path("data/prepared/sft-signatures.jsonl"),
                   help="the task's records")
    p.add_argument("--prepared", type=Path, default=Path("data/prepared/sft-signatures"), help="prepared task")
    p.add_argument("--run-dir", type=Path, default=Path("runs/tiny-signatures"), help="the fine-tuning run")
    p.add_argument("--max-modules", type=int, default=0, help="stdlib modules to take (0: all)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of modules held out")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens an answer may have")
    return p.parse_args(argv)


def demo(args: argparse.Namespace, tune: Callable[[Path, Path, Path, list[str]], Path] = fine_tune
         ) -> tuple[Scores, Scores]:
    """The whole demo: data, before, fine-tuning (by `tune`), after; prints as it goes."""
    started = time.perf_counter()
    base = args.base or base_checkpoint(BASE_RUN)
    try:
        weights = read_model_weights(base)
    except ModelLoadError as err:
        raise DemoError(f"--base: {err}") from None
    if weights.tokenizer_json is None:
        raise DemoError(f"--base {base}: holds no tokenizer.json to prepare the task with")
    fresh_run_dir(args.run_dir, base)
    records = write_task(args.jsonl, args.max_modules)
    index = prepare_task(args.jsonl, weights.tokenizer_json, args.prepared, weights.config.block_size + 1,
                         args.val_fraction)
    template = ChatTemplate.from_dict(index["template"])
    print(f"task: {len(records)} functions in {args.jsonl}, prepared in {args.prepared} "
          f"({index['splits']['train']['n_samples']} train / {index['splits']['val']['n_samples']} held out)")
    loaded = load_for_task(base, args.prepared, index["vocab_size"])
    held_out = held_out_records(records, loaded, template, args.val_fraction, args.max_new_tokens)
    before = score(loaded, args.prepared, template, held_out, args.max_new_tokens)
    print(f"before ({base}): response loss {before.loss:.3f}, exact {before.exact:.1%}", flush=True)
    tuned = tune(base, args.prepared, args.run_dir, args.overrides)
    after = score(load_for_task(tuned, args.prepared, index["vocab_size"], base), args.prepared, template,
                  held_out, args.max_new_tokens)
    report(args.run_dir, base, tuned, held_out, before, after, time.perf_counter() - started)
    return before, after


def report(run_dir: Path, base: Path, tuned: Path, held_out: list[dict], before: Scores, after: Scores,
           seconds: float) -> None:
    """Print the table and a few answers; write the figures and every answer to run_dir/demo.json."""
    print(f"\nfine-tuned {base} -> {tuned}\n{table(before, after, len(held_out))}")
    examples = [{"docstring": r["prompt"].split("\n", 1)[1], "expected": r["response"], "before": old, "after": new}
                for r, old, new in zip(held_out, before.answers, after.answers, strict=True)]
    for example in examples[:3]:
        print(f"\n{example['docstring'].splitlines()[0]}\n  expected: {example['expected']}\n  before:   "
              f"{example['before'][:80]!r}\n  after:    {example['after'][:80]!r}")
    result = {"base": str(base), "checkpoint": str(tuned), "held_out": len(held_out), "seconds": round(seconds, 1),
              "before": _figures(before), "after": _figures(after), "answers": examples}
    atomic_write_bytes(run_dir / "demo.json", (json.dumps(result, indent=1) + "\n").encode())
    print(f"\n{seconds:.0f} s in all; figures and every answer in {run_dir / 'demo.json'}")


def _figures(scores: Scores) -> dict:
    return {k: v for k, v in dataclasses.asdict(scores).items() if k != "answers"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.max_modules < 0 or not 0 < args.val_fraction <= 0.5 or args.max_new_tokens < 1:
            raise DemoError("--max-modules must be >= 0, --val-fraction in (0, 0.5], --max-new-tokens >= 1")
        demo(args)
    except (ValueError, OSError) as err:  # DemoError, and what preparing or loading refuses (named)
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
