"""Registers, shared memory, spills and tensor-core use of every Triton kernel, compiled for A100 and H100.

    python -m kernels.benchmarks.resources [--targets 80,90] [--all] [--kernels NAME,...] [--jobs N]
                                           [--out docs/kernel_resources.md] [--no-table]

Compiles each case of kernels/compile_check.py ahead of time (no GPU needed; results cached per kernel source,
Triton version and target, so a second run compiles only what changed), prints one row per case, writes the
markdown table to --out and refreshes kernels/compiled_resources.json, the table the autotuner prunes
spilling tiles with. --all adds the packed-sample (SEGMENTED) variants, GROUP 2 for every attention kernel and
LayerNorm without bias. Exits 1 when a config the autotuner may still pick spills, overflows shared memory,
lacks tensor-core instructions or does not compile, or when every config of a case is pruned (problems listed
in compile_check.KNOWN_PROBLEMS are reported and do not fail).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

from kernels import compile_check as cc

COLUMNS = ("kernel", "target", "dtype", "size", "variant", "config", "regs", "shared", "spills", "mma", "pruned / problem")


def variant(case: cc.Case) -> str:
    flags = dict(case.flags)
    if case.kernel.startswith("_layer"):
        return "RMS" if flags["IS_RMS"] else "bias" if flags["HAS_BIAS"] else "no bias"
    if not flags:
        return ""
    words = ["causal" if flags["CAUSAL"] else "full"]
    words += ["seg"] * bool(flags["SEGMENTED"]) + [f"g{flags['GROUP']}"] * (flags["GROUP"] > 1)
    return " ".join(words)


def row(case: cc.Case, res: dict) -> tuple:
    size = f"hd{case.size}" if case.kernel.startswith("_attn") else f"N={case.size}"
    note = "; ".join(cc.problems(case, res))
    if note and cc.KERNELS[case.kernel].tiles and cc.prunable(case, res) == cc.problems(case, res):
        note = f"pruned: {note}"
    if "error" in res:
        return (case.kernel, cc.TARGETS[case.target], case.dtype, size, variant(case),
                cc.config_label(dict(case.config)), "", "", "", "", note)
    return (case.kernel, cc.TARGETS[case.target], case.dtype, size, variant(case), cc.config_label(dict(case.config)),
            str(res["registers"]), str(res["shared"]), str(res["spills"]), res["mma"] or "-", note)


def format_rows(rows: list[tuple], markdown: bool) -> list[str]:
    if markdown:
        return ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)] + [
            "| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(COLUMNS, *rows, strict=False)]
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return [fmt(COLUMNS), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def summary(results: dict[cc.Case, dict]) -> list[str]:
    """Per kernel and target: cases, cases that spill, configs pruned, failures."""
    lines = ["| kernel | target | cases | spill | over shared | pruned | max regs | max shared |", "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(c.kernel, c.target) for c in results})
    for kernel, target in keys:
        mine = [(c, r) for c, r in results.items() if (c.kernel, c.target) == (kernel, target)]
        ok = [r for _, r in mine if "error" not in r]
        spill = sum(bool(r["spills"]) for r in ok)
        over = sum(r["shared"] > cc.SHARED_LIMITS[target] for r in ok)
        pruned = sum(bool(cc.prunable(c, r)) for c, r in mine) if cc.KERNELS[kernel].tiles else 0
        lines.append(f"| {kernel} | {cc.TARGETS[target]} | {len(mine)} | {spill} | {over} | {pruned} | "
                     f"{max((r['registers'] for r in ok), default='-')} | {max((r['shared'] for r in ok), default='-')} |")
    return lines


def markdown(results: dict[cc.Case, dict], failures: list[str], known: list[str], command: str) -> str:
    rows = [row(c, results[c]) for c in sorted(results, key=sort_key)]
    limits = ", ".join(f"{cc.TARGETS[t]} {b} B" for t, b in cc.SHARED_LIMITS.items())
    import triton

    parts = [
        "# Triton kernel resources",
        "",
        f"Written by `{command}` (Triton {triton.__version__}); the same results are in "
        "`kernels/compiled_resources.json`, which the autotuned attention kernels read on an A100 (sm_80) or "
        "H100 (sm_90a) to drop the tiles marked *pruned* below. Every case is compiled ahead of time, without a "
        "GPU. `regs`: registers per thread; `shared`: bytes per block (Triton's dynamic allocation plus the "
        f"cubin's static; limits {limits}); `spills`: stack + local bytes per thread (0 = no spills); `mma`: the "
        "tensor-core instruction in the SASS (HMMA; HGMMA is Hopper's warpgroup MMA). Sizes are head dims "
        "(attention) or row widths (layer norm, whose block and warps follow `calculate_settings`); `causal` / "
        "`full`: causal mask or none; `g2`: GROUP 2 (grouped-query attention).",
        "",
        "## Summary",
        "",
        *summary(results),
        "",
        f"Failures (configs the autotuner may still pick that spill, overflow shared memory or lack tensor cores; "
        f"cases with every config pruned): {len(failures)}.",
        *[f"- {f}" for f in failures],
        "",
        f"Known problems (reported, not failed on, until the kernel is fixed; `KNOWN_PROBLEMS` in "
        f"kernels/compile_check.py): {len(known)}.",
        *[f"- {f}" for f in known],
        "",
        "## All cases",
        "",
        *format_rows(rows, markdown=True),
    ]
    return "\n".join(parts) + "\n"


def sort_key(case: cc.Case) -> tuple:
    return (list(cc.KERNELS).index(case.kernel), case.dtype, case.size, case.flags, case.target,
            [v for _, v in case.config])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="80,90", help="compute capabilities to compile for (80: sm_80, 90: sm_90a)")
    parser.add_argument("--all", action="store_true", help="also SEGMENTED, GROUP 2 everywhere, LayerNorm without bias")
    parser.add_argument("--kernels", default=None, help=f"comma-separated subset of {', '.join(cc.KERNELS)}")
    parser.add_argument("--dtypes", default=",".join(cc.DTYPES))
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compiling processes")
    parser.add_argument("--out", default="docs/kernel_resources.md", help="markdown table ('' to skip)")
    parser.add_argument("--no-table", action="store_true", help="leave kernels/compiled_resources.json alone")
    parser.add_argument("--quiet", action="store_true", help="print the summary, not every case")
    args = parser.parse_args(argv)

    targets = [int(t) for t in args.targets.split(",")]
    unknown = [t for t in targets if t not in cc.TARGETS]
    if unknown:
        parser.error(f"--targets: {unknown} not among {list(cc.TARGETS)}")
    kernels = args.kernels.split(",") if args.kernels else None
    todo = cc.cases(kernels, targets, full=args.all, dtypes=args.dtypes.split(","))
    cache = cc.ResultCache()
    start = time.monotonic()
    fresh = Counter()

    def progress(done, total, case, res):
        fresh["n"] += 1
        line = f"[{done}/{total}] {case.key} ({res.get('seconds', 0):.1f} s)"
        if sys.stderr.isatty():
            print(f"\r{line}".ljust(110), end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    results = cc.sweep(todo, cache, jobs=args.jobs, progress=progress)
    if fresh["n"] and sys.stderr.isatty():
        print(file=sys.stderr)
    print(f"{len(results)} cases, {fresh['n']} compiled now in {time.monotonic() - start:.0f} s, the rest cached "
          f"({cache.root})", file=sys.stderr)
    failures, known = cc.check(results), cc.known_failures(results)
    rows = [row(c, results[c]) for c in sorted(results, key=sort_key)]
    if not args.quiet:
        print("\n".join(format_rows(rows, markdown=False)))
    print("\n".join(summary(results)))
    if not args.no_table:
        cc.update_table(results, cache)
        print(f"refreshed {cc.TABLE_PATH}")
    if args.out:
        command = "python -m kernels.benchmarks.resources" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(markdown(results, failures, known, command.strip()))
        print(f"wrote {args.out}")
    for f in known:
        print(f"known {f}", file=sys.stderr)
    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
