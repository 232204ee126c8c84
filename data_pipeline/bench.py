"""Loader throughput vs what training consumes (`python -m data_pipeline.bench [--prepared DIR]`).

Measures tokens/s delivered by TokenStream over local shards with 0, 1 and 2 DataLoader workers, and the
raw decode rate of `shards.load_shard`, and compares them with the tokens/s of the newest training run
(`runs/*/metrics.jsonl` summary: tokens_trained / train_seconds). Targets: the loader delivers at least
20x what training consumes, and at least 5M tokens/s in one process from pre-tokenized shards.

The stream checks each shard's sha256 as it reads it; what that costs is measured in the same run, with and
without the check (0 workers and the raw decode, in CPU time, alternately, best of three), as a ratio.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset

from data_pipeline.config import DataConfig
from data_pipeline.prepare import load_index, prepare
from data_pipeline.shards import load_shard
from data_pipeline.stream import TokenStream

TARGET_RATIO = 20.0
TARGET_TOKENS_PER_S = 5e6
# Rates of the sha256 comparison are the best of this many alternating measurements: noise between two
# measurements can be larger than the cost being measured.
VERIFY_REPEATS = 3


class _StreamDataset(IterableDataset):
    """A TokenStream that is not an IterableDataset, as a DataLoader dataset: each worker iterates a copy."""

    def __init__(self, stream: TokenStream) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator:
        return iter(self.stream)


def _rate(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    seconds: float,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Tokens/s of the input batches, after the first one (worker start-up and first loads excluded)."""
    next(batches)
    tokens, start = 0, clock()
    while (elapsed := clock() - start) < seconds:
        inputs, _ = next(batches)
        tokens += inputs.numel()
    return tokens / elapsed


def _stream_maker(prepared: Path, seq_len: int, micro_batch_size: int) -> Callable[..., IterableDataset]:
    """(num_workers, verify) -> a train TokenStream for a DataLoader with that many workers, checking the
    shards' sha256 or not, as this version allows."""
    # A TokenStream that knows its DataLoader workers takes their number (and checks it in each worker).
    parameters = inspect.signature(TokenStream).parameters
    takes_workers, takes_verify = "num_workers" in parameters, "verify_sha256" in parameters

    def make(num_workers: int, verify: bool = True) -> IterableDataset:
        kwargs = {"num_workers": num_workers} if takes_workers else {}
        if takes_verify:
            kwargs["verify_sha256"] = verify
        stream = TokenStream(str(prepared), "train", seq_len, micro_batch_size, seed=0, **kwargs)
        return stream if isinstance(stream, IterableDataset) else _StreamDataset(stream)

    return make


def _best_alternating(measure: Callable[[bool], float], repeats: int) -> tuple[float, float]:
    """The best of `repeats` measure(True) and measure(False), taken alternately: (verified, unverified)."""
    best = {True: 0.0, False: 0.0}
    for _ in range(repeats):
        for verify in (True, False):
            best[verify] = max(best[verify], measure(verify))
    return best[True], best[False]


def _loader(dataset: IterableDataset, num_workers: int) -> Iterator:
    return iter(DataLoader(dataset, batch_size=None, num_workers=num_workers))


def _workers_split_the_stream(make: Callable[[int], IterableDataset]) -> bool:
    """Whether 2 workers deliver different batches (a stream unaware of workers is replayed by each)."""
    try:
        first, second = itertools.islice(_loader(make(2), 2), 2)  # worker 0's first, then worker 1's
    except (ValueError, RuntimeError) as e:
        print(f"TokenStream with 2 workers failed: {e}")
        return False
    return not torch.equal(first[0], second[0])


def _raw_decode_rate(
    shards: list[tuple[str, str]],
    seconds: float,
    verify: bool = False,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """load_shard's tokens/s over (url, sha256) shards, checking the sha256 or not."""
    load_shard(shards[0][0])  # warm the page cache and imports
    tokens, start = 0, clock()
    for url, sha256 in itertools.cycle(shards):
        tokens += load_shard(url, expected_sha256=sha256 if verify else None).tokens.size
        if (elapsed := clock() - start) >= seconds:
            return tokens / elapsed
    raise AssertionError("unreachable")


def _print_verification_cost(label: str, verified: float, unverified: float) -> None:
    print(
        f"{label}: {verified / 1e6:8.2f} M tokens/s with sha256, {unverified / 1e6:8.2f} M without; "
        f"with/without = {verified / unverified:.3f} (cost {100 * (1 - verified / unverified):.1f}%)"
    )


def _measure_verification_cost(
    make: Callable[..., IterableDataset], shards: list[tuple[str, str]], seconds: float
) -> None:
    """Print the tokens/s of one process with and without the sha256 check, and their ratio.

    In CPU seconds of this process (time.process_time): the hashing runs in it, and on a shared machine
    the other processes' load, which moves wall-clock rates by +-25% between two runs, does not count.
    """
    cpu = time.process_time

    def stream_rate(verify: bool) -> float:
        return _rate(_loader(make(0, verify), 0), seconds, cpu)

    def raw_rate(verify: bool) -> float:
        return _raw_decode_rate(shards, seconds, verify, cpu)

    print(f"sha256 check, CPU time of this process (best of {VERIFY_REPEATS}, taken alternately):")
    _print_verification_cost("  TokenStream, 0 workers", *_best_alternating(stream_rate, VERIFY_REPEATS))
    _print_verification_cost("  load_shard raw decode ", *_best_alternating(raw_rate, VERIFY_REPEATS))


def training_rate(runs_dir: Path) -> tuple[float, Path] | None:
    """tokens_trained / train_seconds of the newest run's metrics.jsonl summary, or None."""
    for path in sorted(runs_dir.glob("*/metrics.jsonl"), key=lambda p: p.stat().st_mtime, reverse=True):
        for line in reversed(path.read_text().splitlines()):
            try:
                summary = json.loads(line).get("summary")
            except json.JSONDecodeError:
                continue
            if summary and summary.get("train_seconds") and summary.get("tokens_trained"):
                return summary["tokens_trained"] / summary["train_seconds"], path
    return None


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def run(prepared: Path, runs_dir: Path, seq_len: int, micro_batch_size: int, seconds: float) -> None:
    """Measure and print the rates, the training rate, their ratio and the PASS/FAIL lines."""
    index = load_index(prepared)
    train = index["splits"]["train"]
    print(f"prepared: {prepared} (train: {train['n_tokens']:,} tokens in {len(train['shards'])} shards)")
    print(f"batches: {micro_batch_size} x {seq_len} tokens, ~{seconds:g} s per measurement")

    make = _stream_maker(prepared, seq_len, micro_batch_size)
    rates = {0: _rate(_loader(make(0), 0), seconds)}  # the sha256 check included, as training reads
    print(f"TokenStream, 0 workers: {rates[0] / 1e6:8.2f} M tokens/s")
    if _workers_split_the_stream(make):
        for n in (1, 2):
            rates[n] = _rate(_loader(make(n), n), seconds)
            print(f"TokenStream, {n} workers: {rates[n] / 1e6:8.2f} M tokens/s")
    else:
        print(
            "TokenStream, 1-2 workers: not supported by this version (every worker replays the same stream)"
        )
    shards = [(str(prepared / s["file"]), s["sha256"]) for s in train["shards"]]
    raw = _raw_decode_rate(shards, seconds)
    print(f"load_shard raw decode:  {raw / 1e6:8.2f} M tokens/s")
    _measure_verification_cost(make, shards, seconds)

    loader = rates[0]  # one process, as the trainer uses it
    consumed = training_rate(runs_dir)
    if consumed is None:
        print(f"training consumes: unknown (no summary in {runs_dir}/*/metrics.jsonl)")
        print(f"SKIP loader >= {TARGET_RATIO:g}x training: training rate unknown")
    else:
        rate, path = consumed
        print(
            f"training consumes: {rate / 1e6:8.4f} M tokens/s ({path}); loader/training = {loader / rate:,.0f}x"
        )
        print(f"{_verdict(loader >= TARGET_RATIO * rate)} loader >= {TARGET_RATIO:g}x training")
    print(
        f"{_verdict(loader >= TARGET_TOKENS_PER_S)} loader >= {TARGET_TOKENS_PER_S / 1e6:g}M tokens/s per process "
        f"(TokenStream, 0 workers: {loader / 1e6:.2f}M; raw decode {raw / 1e6:.2f}M)"
    )


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    from trainer.config import ModelConfig, TrainConfig  # the default training run's batch shape

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m data_pipeline.bench", description=__doc__.splitlines()[0])
    p.add_argument("--prepared", type=Path, default=None, help="default: prepare stdlib into a temp dir")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="where the training runs' metrics are")
    p.add_argument("--seq-len", type=int, default=ModelConfig().block_size)
    p.add_argument("--micro-batch-size", type=int, default=TrainConfig().micro_batch_size)
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    a = p.parse_args(argv)
    if a.prepared is not None:
        run(a.prepared, a.runs, a.seq_len, a.micro_batch_size, a.seconds)
        return
    with tempfile.TemporaryDirectory(prefix="bench-prepared-") as tmp:
        print(f"preparing the stdlib corpus (default settings) into {tmp} ...")
        start = time.perf_counter()
        prepare(DataConfig(prepared_dir=tmp))
        print(f"prepared in {time.perf_counter() - start:.1f} s")
        run(Path(tmp), a.runs, a.seq_len, a.micro_batch_size, a.seconds)


if __name__ == "__main__":
    main()
