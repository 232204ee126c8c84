"""Command line: `python -m trainer.cost plan|estimate [key=value ...] [--json]`.

    python -m trainer.cost plan model=gpt3-175b hardware=a100-80gb gpus=1024 tokens=300e9
    python -m trainer.cost estimate model=gpt3-1.3b hardware=h100-sxm parallel.tp=2 train.micro_batch_size=4

gpus=, tokens=, mfu= (default 0.4), global_batch= (sequences; default GPT-3's batch for the size) and top= are
the CLI's own; every other key=value is a Hydra override composed with conf/config.yaml. hardware=auto (the
default) means this machine's GPU, so without one name a preset. Bad input prints one line naming the problem
and exits with status 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys

USAGE = "usage: python -m trainer.cost plan|estimate [model=...] [hardware=...] [gpus=N tokens=T mfu=0.4] [--json]"
OWN_KEYS = {"gpus": int, "tokens": float, "mfu": float, "global_batch": int, "top": int}


class UsageError(ValueError):
    """The command line itself is wrong."""


def parse(argv: list[str]) -> tuple[str, dict, list[str], bool]:
    """(command, the CLI's own values, Hydra overrides, --json)."""
    as_json = "--json" in argv
    args = [a for a in argv if a != "--json"]
    if not args or args[0] not in ("plan", "estimate"):
        raise UsageError(f"expected a command, plan or estimate, got {args[0] if args else 'nothing'!r} ({USAGE})")
    own, overrides = {}, []
    for arg in args[1:]:
        key, sep, value = arg.partition("=")
        if not sep:
            raise UsageError(f"{arg!r}: expected key=value")
        if key in OWN_KEYS:
            try:
                number = float(value)
                own[key] = OWN_KEYS[key](number)
            except ValueError:
                raise UsageError(f"{key}={value!r}: must be a number") from None
            if OWN_KEYS[key] is int and number != own[key]:
                raise UsageError(f"{key}={value!r}: must be a whole number")
        else:
            overrides.append(arg)
    if not any(o.startswith("train.run_dir=") for o in overrides):
        overrides.append("train.run_dir=runs/cost")  # the default interpolates Hydra's runtime, absent here
    return args[0], own, overrides, as_json


def check(command: str, own: dict, config) -> None:
    """Raise UsageError for values the reports cannot use."""
    if command == "plan":
        for key in ("gpus", "tokens"):
            if key not in own:
                raise UsageError(f"plan needs {key}=")
        if config.hardware.peak_flops <= 0:
            raise UsageError(f"hardware={config.hardware.name} has no peak FLOP/s: pick a GPU, e.g. hardware=a100-80gb")
    for key in ("gpus", "tokens", "global_batch", "top"):
        if key in own and own[key] <= 0:
            raise UsageError(f"{key}={own[key]!r}: must be positive")
    if "mfu" in own and not 0 < own["mfu"] <= 1:
        raise UsageError(f"mfu={own['mfu']!r}: must be in (0, 1]")


def main(argv: list[str]) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from trainer.config import ConfigError, compose_config
    from trainer.cost.report import estimate_report, format_estimate, format_plan, plan_report
    from trainer.hardware import resolve_for_cost_cli

    try:
        command, own, overrides, as_json = parse(argv)
        config = compose_config(overrides)
        config = dataclasses.replace(config, hardware=resolve_for_cost_cli(config.hardware))
        check(command, own, config)
        if command == "plan":
            report = plan_report(config, own["gpus"], own["tokens"], own.get("mfu", 0.4), own.get("global_batch"),
                                 own.get("top", 5))
        else:
            report = estimate_report(config, own.get("mfu", 0.4))
    except (UsageError, ConfigError, HydraException, OmegaConfBaseException, ValueError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        kind = "config error: " if isinstance(err, ConfigError) else ""
        print(f"trainer.cost: {kind}{message}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(format_plan(report) if command == "plan" else format_estimate(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
