"""Ahead-of-time compile check of the Triton kernels, and the autotuning prune it feeds.

Every kernel is compiled, without a GPU, for sm_80 (A100) and sm_90a (H100) over the cases it is launched
with: each autotune tile, dtype, head dim (attention) or row width (layer norm), causal or not, GROUP 1 or
more (dK/dV). Each compiled case is read back for registers, shared memory (Triton's dynamic allocation
plus the cubin's static), spill bytes (cuobjdump's STACK and LOCAL) and the tensor-core instructions of its
SASS (HMMA, or HGMMA on sm_90a). `python -m kernels.benchmarks.resources` runs the sweep and writes the
results to `compiled_resources.json` next to this file; the autotuned attention kernels read that table at
run time (`resource_pruner`) and drop, on an A100 or H100, the tiles that spill or overflow shared memory
there. Compiled results are cached per kernel source hash, Triton version and target.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("compiled_resources.json")
# Compile targets: compute capability -> the name ptxas knows it by.
TARGETS = {80: "sm_80", 90: "sm_90a"}
# The most shared memory one block may use (static + dynamic, after opting in), the CUDA guide's
# "maximum shared memory per thread block": A100 163 KiB of its 164 KiB per SM, H100 227 KiB of 228 KiB.
# These are what cudaDevAttrMaxSharedMemoryPerBlockOptin reports and what Triton checks at launch.
SHARED_LIMITS = {80: 163 * 1024, 90: 227 * 1024}
# GPUs whose compile results the pruner applies: capability -> target. Others (sm_86, sm_89, ...) prune nothing.
CAPABILITY_TARGETS = {(8, 0): 80, (9, 0): 90}
DTYPES = ("fp16", "bf16", "fp32")
# Layer-norm row widths: GPT widths, and the widest row the fused kernel takes (64 KiB of input).
LN_WIDTHS = (768, 2048, 4096, 8192, 12288)
LN_MAX_WIDTHS = {"fp16": 32768, "bf16": 32768, "fp32": 16384}
# Problems the check reports without failing, until the kernel is fixed: (kernel, smallest size) -> why.
KNOWN_PROBLEMS = {
    ("_layer_norm_bwd_dx_kernel", 12288): (
        "rows of 16k-32k elements run on 16-32 warps (calculate_settings), which caps a thread at 128/64 "
        "registers, and the kernel keeps w, dw and db for its share of the row besides x, dy and xhat; a fix "
        "belongs in kernels/layernorm.py"),
}
# Bumped when what a case compiles changes in this file (signatures, specialisation): old caches then miss.
CHECK_VERSION = 1


# ----------------------------------------------------------------------------------------------------------
# Kernels and cases.
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelSpec:
    """How to compile one kernel: its module, argument types and what its cases vary over.

    args: (name, type) of the runtime arguments; "*T" is a pointer of the case's dtype, "*SEG" / "*SEGB" the
    segment ids (int64) / bounds (int32) when SEGMENTED and the fp32 stand-in the launcher passes otherwise.
    aligned: integer arguments the launcher's usual shapes make multiples of 16 (Triton specialises on that).
    """

    name: str
    module: str
    args: tuple[tuple[str, str], ...]
    aligned: tuple[str, ...]
    size: str  # the constexpr a case's size sets: HEAD_DIM, or the row width (BLOCK_SIZE from it)
    tiles: str | None = None  # the attribute of `module` holding the autotune tiles; None: one launch config
    tensor_cores: bool = False  # its matmuls must lower to tensor-core instructions
    groups: tuple[int, ...] = (1,)  # GROUP values compiled (GROUP is a loop count only in dK/dV)


_ATTN = "kernels.attention"
_LN = "kernels.layernorm"
KERNELS = {
    spec.name: spec
    for spec in (
        KernelSpec("_attn_fwd_kernel", _ATTN,
                   (("Q", "*T"), ("K", "*T"), ("V", "*T"), ("Out", "*T"), ("L", "*fp32"), ("SEG", "*SEG"),
                    ("SEG_LO", "*SEGB"), ("sm_scale", "fp32"), ("T", "i32"), ("n_heads", "i32")),
                   ("T",), "HEAD_DIM", "FWD_TILES", tensor_cores=True),
        KernelSpec("_attn_bwd_preprocess", _ATTN,
                   (("Out", "*T"), ("DO", "*T"), ("Delta", "*fp32"), ("T", "i32")), ("T",), "HEAD_DIM"),
        KernelSpec("_attn_bwd_dkdv_kernel", _ATTN,
                   (("Q", "*T"), ("K", "*T"), ("V", "*T"), ("DO", "*T"), ("L", "*fp32"), ("Delta", "*fp32"),
                    ("DK", "*T"), ("DV", "*T"), ("SEG", "*SEG"), ("SEG_HI", "*SEGB"), ("sm_scale", "fp32"),
                    ("T", "i32"), ("n_heads", "i32")),
                   ("T",), "HEAD_DIM", "BWD_DKDV_TILES", tensor_cores=True, groups=(1, 2)),
        KernelSpec("_attn_bwd_dq_kernel", _ATTN,
                   (("Q", "*T"), ("K", "*T"), ("V", "*T"), ("DO", "*T"), ("L", "*fp32"), ("Delta", "*fp32"),
                    ("DQ", "*T"), ("SEG", "*SEG"), ("SEG_LO", "*SEGB"), ("sm_scale", "fp32"), ("T", "i32"),
                    ("n_heads", "i32")),
                   ("T",), "HEAD_DIM", "BWD_DQ_TILES", tensor_cores=True),
        KernelSpec("_layer_norm_fwd_kernel", _LN,
                   (("X", "*T"), ("Y", "*T"), ("W", "*T"), ("B", "*T"), ("Mean", "*fp32"), ("Rstd", "*fp32"),
                    ("stride", "i32"), ("N", "i32"), ("eps", "fp32")),
                   ("stride", "N"), "N"),
        KernelSpec("_layer_norm_bwd_dx_kernel", _LN,
                   (("X", "*T"), ("DY", "*T"), ("DX", "*T"), ("W", "*T"), ("Mean", "*fp32"), ("Rstd", "*fp32"),
                    ("DW_partial", "*fp32"), ("DB_partial", "*fp32"), ("M", "i32"), ("N", "i32"),
                    ("rows_per_program", "i32")),
                   ("M", "N"), "N"),
    )
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One compilation: a kernel at one target, dtype, size, set of flag constexprs and launch config."""

    kernel: str
    target: int
    dtype: str
    size: int  # head dim, or layer-norm row width
    flags: tuple[tuple[str, object], ...]  # sorted (constexpr, value): CAUSAL, SEGMENTED, GROUP, HAS_BIAS, ...
    config: tuple[tuple[str, int], ...]  # sorted (name, value): BLOCK_M, BLOCK_N / BLOCK_SIZE, num_warps, ...

    @property
    def key(self) -> str:
        flags = ",".join(f"{k}={int(v)}" for k, v in self.flags)
        return f"{self.kernel}|{self.target}|{self.dtype}|{self.size}|{flags}|{config_label(dict(self.config))}"

    @property
    def group_key(self) -> tuple:
        """The cases that differ only in their config: the autotuner chooses among these."""
        return (self.kernel, self.target, self.dtype, self.size, self.flags)

    def to_json(self) -> dict:
        return {"kernel": self.kernel, "target": self.target, "dtype": self.dtype, "size": self.size,
                "flags": dict(self.flags), "config": dict(self.config)}

    @classmethod
    def from_json(cls, row: dict) -> Case:
        return cls(row["kernel"], row["target"], row["dtype"], row["size"], tuple(sorted(row["flags"].items())),
                   tuple(sorted(row["config"].items())))


def config_label(config: dict) -> str:
    """'128x64 w4 s3' (BLOCK_M x BLOCK_N), 'B128 w4 s3' (one block dim) or 'B1024 w4 s3' (BLOCK_SIZE)."""
    if "BLOCK_N" in config:
        block = f"{config['BLOCK_M']}x{config['BLOCK_N']}"
    else:
        block = f"B{config.get('BLOCK_M', config.get('BLOCK_SIZE'))}"
    return f"{block} w{config['num_warps']} s{config['num_stages']}"


def tile_config(tile: tuple[int, int, int, int]) -> dict:
    """An attention tile (BLOCK_M, BLOCK_N, num_stages, num_warps) as a case config."""
    m, n, stages, warps = tile
    return {"BLOCK_M": m, "BLOCK_N": n, "num_stages": stages, "num_warps": warps}


def config_key(config: dict) -> tuple:
    """(BLOCK_M, BLOCK_N, num_stages, num_warps) of a case's config: how the prune index names a tile."""
    return (config.get("BLOCK_M"), config.get("BLOCK_N"), config["num_stages"], config["num_warps"])


def triton_config_key(config) -> tuple:
    """config_key of a triton.Config."""
    return config_key({**config.kwargs, "num_stages": config.num_stages, "num_warps": config.num_warps})


def _ln_settings(width: int, dtype: str) -> dict:
    from kernels.layernorm import calculate_settings

    block, warps = calculate_settings(width, 4 if dtype == "fp32" else 2)
    return {"BLOCK_SIZE": block, "num_warps": warps, "num_stages": 3}


def cases(kernels: Iterable[str] | None = None, targets: Iterable[int] = (80, 90), full: bool = False,
          dtypes: Iterable[str] = DTYPES) -> list[Case]:
    """Every case to compile. Attention: each tile x dtype x head dim 16-128 x causal or not (x GROUP 1, 2 for
    dK/dV); `full` adds SEGMENTED (packed samples) and GROUP 2 for the kernels where GROUP is only an index
    division. Layer norm: LayerNorm with bias and RMSNorm (`full`: LayerNorm without bias too) at LN_WIDTHS and
    the widest row the kernel takes, with calculate_settings' block and warps."""
    from kernels.attention import TRITON_HEAD_DIMS

    out = []
    for name in kernels or KERNELS:
        spec = KERNELS[name]
        mod = importlib.import_module(spec.module)
        for target in targets:
            for dtype in dtypes:
                if spec.module == _ATTN:
                    tiles = [tile_config(t) for t in getattr(mod, spec.tiles)] if spec.tiles else \
                        [{"BLOCK_M": 128, "num_stages": 3, "num_warps": 4}]  # the launcher's preprocess block
                    groups = (1, 2) if full else spec.groups
                    variants = [{"CAUSAL": c, "SEGMENTED": s, "GROUP": g} for c in (True, False)
                                for s in ((False, True) if full else (False,)) for g in groups]
                    if not spec.tiles:
                        variants = [{}]
                    for hd in TRITON_HEAD_DIMS:
                        for flags in variants:
                            for tile in tiles:
                                out.append(Case(name, target, dtype, hd, tuple(sorted(flags.items())),
                                                tuple(sorted(tile.items()))))
                else:
                    norms = [{"HAS_BIAS": True, "IS_RMS": False}, {"HAS_BIAS": False, "IS_RMS": True}]
                    if full:
                        norms.insert(1, {"HAS_BIAS": False, "IS_RMS": False})
                    for width in (*LN_WIDTHS, LN_MAX_WIDTHS[dtype]):
                        for flags in norms:
                            out.append(Case(name, target, dtype, width, tuple(sorted(flags.items())),
                                            tuple(sorted(_ln_settings(width, dtype).items()))))
    return out


# ----------------------------------------------------------------------------------------------------------
# Compiling.
# ----------------------------------------------------------------------------------------------------------


def interpreted() -> bool:
    """Whether this process defines @triton.jit functions for Triton's interpreter (TRITON_INTERPRET=1 was set
    when triton.language was imported): they, and Triton's own library functions, cannot be compiled here."""
    from triton.language import standard
    from triton.runtime.jit import JITFunction

    return not isinstance(standard.cdiv, JITFunction)


@contextlib.contextmanager
def _compiling_env():
    """Start processes without TRITON_INTERPRET, so that they define compilable kernels."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def _jit_function(name: str):
    """The JITFunction of kernel `name` (for an autotuned kernel, the one its Autotuner wraps)."""
    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(KERNELS[name].module), name)
    while not isinstance(fn, JITFunction):
        if not hasattr(fn, "fn"):
            raise RuntimeError(f"{name} is {type(fn).__name__}: compile in a process without TRITON_INTERPRET=1")
        fn = fn.fn
    return fn


def _python_function(obj):
    while not inspect.isfunction(obj):
        obj = obj.fn
    return obj


def kernel_source_hash(name: str) -> str:
    """sha256 of what decides kernel `name`'s compiled code: its source and that of the @triton.jit functions it
    calls (without decorators or line numbers, so editing other code in the module leaves it alone), the
    argument types the check compiles it with, the Triton version and CHECK_VERSION."""
    import triton

    spec = KERNELS[name]
    mod = importlib.import_module(spec.module)
    seen, sources, todo = set(), [], [name]
    while todo:
        fname = todo.pop()
        if fname in seen:
            continue
        seen.add(fname)
        src = inspect.getsource(_python_function(getattr(mod, fname)))
        src = src[re.search(r"^\s*def ", src, re.M).start():]
        sources.append(f"{fname}\n{src}")
        for node in ast.walk(ast.parse(inspect.cleandoc(src) if src[0].isspace() else src)):
            if isinstance(node, ast.Name) and node.id not in seen and _is_jit(getattr(mod, node.id, None)):
                todo.append(node.id)
    parts = [triton.__version__, str(CHECK_VERSION), repr((spec.args, spec.aligned)), *sorted(sources)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _is_jit(obj) -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return isinstance(obj, JITFunction | InterpretedFunction)


def _signature(spec: KernelSpec, case: Case) -> tuple[dict, dict, dict]:
    """Triton's signature, constexprs and attrs (16-divisibility of pointers and aligned ints) for `case`."""
    import triton.language as tl

    flags = dict(case.flags)
    segmented = flags.get("SEGMENTED", False)
    sig, attrs = {}, {}
    fn = _jit_function(case.kernel)
    for i, (arg, kind) in enumerate(spec.args):
        assert fn.arg_names[i] == arg, f"{case.kernel}: argument {i} is {fn.arg_names[i]}, the check says {arg}"
        kind = {"*T": f"*{case.dtype}", "*SEG": "*i64" if segmented else "*fp32",
                "*SEGB": "*i32" if segmented else "*fp32"}.get(kind, kind)
        sig[arg] = kind
        if kind.startswith("*") or arg in spec.aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    config = dict(case.config)
    constexprs = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    if spec.module == _ATTN:
        constexprs["HEAD_DIM"] = case.size
        constexprs.update(flags)
    else:
        constexprs.update(flags)
        constexprs["ACC_DTYPE"] = tl.float32
    for name in constexprs:
        sig[name] = "constexpr"
    missing = set(fn.arg_names) - set(sig)
    assert not missing, f"{case.kernel}: the compile check does not set {sorted(missing)}"
    return sig, constexprs, attrs


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def read_cubin(cubin: bytes) -> dict:
    """Registers, static shared, stack and local bytes (cuobjdump --dump-resource-usage) and the tensor-core
    instruction the SASS uses ("HGMMA", "HMMA" or None) of a one-kernel cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage.split("Function", 1)[1]))
    mma = "HGMMA" if re.search(r"\bHGMMA\b", sass) else "HMMA" if re.search(r"\bHMMA\b", sass) else None
    return {"registers": int(fields["REG"]), "static_shared": int(fields["SHARED"]),
            "stack": int(fields["STACK"]), "local": int(fields["LOCAL"]), "mma": mma}


def compile_case(case: Case) -> dict:
    """Compile `case` ahead of time and return its resources: registers, shared (dynamic + static bytes),
    spills (stack + local bytes), mma and the compile time; or {"error": ...} when it does not compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = KERNELS[case.kernel]
    start = time.perf_counter()
    try:
        sig, constexprs, attrs = _signature(spec, case)
        config = dict(case.config)
        options = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # TRITON_DEFAULT_FP_FUSION unset: fusion on, as at run time
            compiled = triton.compile(ASTSource(fn=_jit_function(case.kernel), signature=sig,
                                                constexprs=constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", case.target, 32), options=options)
        res = read_cubin(compiled.asm["cubin"])
    except Exception as e:  # noqa: BLE001 - a case that does not compile is a result to report
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}",
                "seconds": round(time.perf_counter() - start, 2)}
    res["shared"] = compiled.metadata.shared + res.pop("static_shared")
    res["spills"] = res.pop("stack") + res.pop("local")
    res["seconds"] = round(time.perf_counter() - start, 2)
    return res


# ----------------------------------------------------------------------------------------------------------
# Problems, the cache and the sweep.
# ----------------------------------------------------------------------------------------------------------


def problems(case: Case, res: dict) -> list[str]:
    """What is wrong with a compiled case: does not compile, spills, overflows shared memory, lacks tensor cores."""
    if "error" in res:
        return [f"does not compile ({res['error']})"]
    out = []
    if res["spills"]:
        out.append(f"spills {res['spills']} B")
    if res["shared"] > SHARED_LIMITS[case.target]:
        out.append(f"shared {res['shared']} B > {SHARED_LIMITS[case.target]} B")
    if KERNELS[case.kernel].tensor_cores and not res["mma"]:
        out.append("no tensor-core instructions")
    return out


def prunable(case: Case, res: dict) -> list[str]:
    """The problems the autotuner avoids by dropping the config (spills, shared); not a missing tensor core."""
    return [p for p in problems(case, res) if p.startswith(("spills", "shared"))]


def where(case: Case) -> str:
    """'sm_80 hd128 bf16 causal' / 'sm_90a N=768 fp16 RMS': where a result holds, for messages."""
    flags = dict(case.flags)
    if case.kernel.startswith("_attn"):
        words = [f"hd{case.size}", case.dtype, "causal" if flags.get("CAUSAL") else "non-causal" if flags else ""]
        words += ["segmented"] * bool(flags.get("SEGMENTED")) + [f"group {flags['GROUP']}"] * (flags.get("GROUP", 1) > 1)
    else:
        words = [f"N={case.size}", case.dtype, "RMS" if flags["IS_RMS"] else "bias" if flags["HAS_BIAS"] else "no bias"]
    return " ".join([TARGETS[case.target], *filter(None, words)])


def cache_dir() -> Path:
    """Where compiled results are cached: $HYDRAGPT_COMPILE_CACHE, else ~/.cache/hydragpt/compile_check."""
    if os.environ.get("HYDRAGPT_COMPILE_CACHE"):
        return Path(os.environ["HYDRAGPT_COMPILE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hydragpt" / "compile_check"


@dataclass
class ResultCache:
    """Compiled results by case key, one JSON file per kernel and source hash (which includes Triton's version);
    seeded from the committed table where its hash is current, so a sweep only compiles what changed."""

    root: Path = field(default_factory=cache_dir)
    hashes: dict[str, str] = field(default_factory=dict)
    results: dict[str, dict[str, dict]] = field(default_factory=dict)  # kernel -> case key -> result

    def _path(self, kernel: str) -> Path:
        return self.root / f"{kernel}-{self.hash(kernel)[:20]}.json"

    def hash(self, kernel: str) -> str:
        if kernel not in self.hashes:
            self.hashes[kernel] = kernel_source_hash(kernel)
        return self.hashes[kernel]

    def kernel_results(self, kernel: str) -> dict[str, dict]:
        if kernel not in self.results:
            found = {}
            table = load_table()
            entry = table.get("kernels", {}).get(kernel, {})
            if entry.get("source_hash") == self.hash(kernel):
                found.update({c.key: r for c, r in table_rows({"kernels": {kernel: entry}})})
            with contextlib.suppress(OSError, ValueError):
                found.update(json.loads(self._path(kernel).read_text()))
            self.results[kernel] = found
        return self.results[kernel]

    def get(self, case: Case) -> dict | None:
        return self.kernel_results(case.kernel).get(case.key)

    def put(self, case: Case, res: dict) -> None:
        self.kernel_results(case.kernel)[case.key] = res

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for kernel, found in self.results.items():
            on_disk = {}  # what another sweep of the same source saved meanwhile
            with contextlib.suppress(OSError, ValueError):
                on_disk = json.loads(self._path(kernel).read_text())
            tmp = self._path(kernel).with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**on_disk, **found}, sort_keys=True))
            tmp.replace(self._path(kernel))


RESULT_FIELDS = ("registers", "shared", "spills", "mma", "error", "seconds")


def _result_of(row: dict) -> dict:
    return {k: row[k] for k in RESULT_FIELDS if k in row}


def _compile_worker(case: Case) -> tuple[Case, dict]:
    return case, compile_case(case)


def compile_all(todo: list[Case], jobs: int = 1) -> Iterator[tuple[Case, dict]]:
    """(case, result) for each of `todo`, in order, compiled on `jobs` processes; in a process whose kernels are
    interpreted (the test suite on a machine without a GPU), on fresh processes without the interpreter."""
    if todo and (jobs > 1 or interpreted()):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn" if interpreted() else "fork")
        with _compiling_env(), ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=ctx) as pool:
            yield from pool.map(_compile_worker, todo, chunksize=1)
    else:
        for case in todo:
            yield case, compile_case(case)


def sweep(todo: list[Case], cache: ResultCache | None = None, jobs: int = 1, progress=None,
          save_every: float = 30.0) -> dict[Case, dict]:
    """Results of every case in `todo`, compiling (on `jobs` processes) those the cache lacks; the cache is
    saved every `save_every` seconds and at the end, so an interrupted sweep resumes where it stopped."""
    cache = cache or ResultCache()
    out = {c: r for c in todo if (r := cache.get(c)) is not None}
    missing = [c for c in todo if c not in out]
    last = time.monotonic()
    for case, res in compile_all(missing, jobs):
        out[case] = res
        cache.put(case, res)
        if progress:
            progress(len(out), len(todo), case, res)
        if time.monotonic() - last > save_every:
            cache.save()
            last = time.monotonic()
    cache.save()
    return out


# ----------------------------------------------------------------------------------------------------------
# The committed table and the run-time prune.
# ----------------------------------------------------------------------------------------------------------


def load_table(path: Path = TABLE_PATH) -> dict:
    """The committed compile results: {"triton", "shared_limits", "kernels": {name: {"source_hash", "results"}}}."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def table_rows(table: dict) -> Iterator[tuple[Case, dict]]:
    """(case, result) of every row of a table."""
    for kernel, entry in table.get("kernels", {}).items():
        for row in entry["results"]:
            yield Case.from_json({**row, "kernel": kernel}), _result_of(row)


def write_table(results: dict[Case, dict], cache: ResultCache, path: Path = TABLE_PATH) -> None:
    """Write `results` as the committed table: one row per line, sorted, so that diffs stay readable."""
    import triton

    by_kernel: dict[str, list] = {}
    for case in sorted(results, key=lambda c: c.key):
        row = {**case.to_json(), **{k: v for k, v in results[case].items() if k != "seconds"}}
        del row["kernel"]  # the key the rows are listed under
        by_kernel.setdefault(case.kernel, []).append(row)
    lines = ["{", f'  "triton": {json.dumps(triton.__version__)},',
             f'  "shared_limits": {json.dumps({str(k): v for k, v in SHARED_LIMITS.items()})},', '  "kernels": {']
    for i, (kernel, rows) in enumerate(sorted(by_kernel.items())):
        lines.append(f'    {json.dumps(kernel)}: {{"source_hash": {json.dumps(cache.hash(kernel))}, "results": [')
        lines += [f"      {json.dumps(r, sort_keys=True)}{',' if j < len(rows) - 1 else ''}" for j, r in enumerate(rows)]
        lines.append("    ]}" + ("," if i < len(by_kernel) - 1 else ""))
    lines += ["  }", "}"]
    Path(path).write_text("\n".join(lines) + "\n")


def update_table(results: dict[Case, dict], cache: ResultCache, path: Path = TABLE_PATH) -> None:
    """Write `results` into the committed table, keeping the rows of other cases whose kernel source is unchanged
    (a sweep over fewer targets or kernels refreshes only those)."""
    merged = {c: r for c, r in table_rows(load_table(path))
              if load_table(path)["kernels"][c.kernel]["source_hash"] == cache.hash(c.kernel)}
    merged.update(results)
    write_table(merged, cache, path)


def _findings(results: dict[Case, dict]) -> list[tuple[Case, str]]:
    """(case, message) for each config the autotuner may still pick (one not pruned for spills or shared memory)
    with a problem, each case (kernel, target, dtype, size, flags) whose every config is pruned, and each
    problem of a kernel with a single launch config."""
    groups: dict[tuple, list[tuple[Case, dict]]] = {}
    for case, res in results.items():
        groups.setdefault(case.group_key, []).append((case, res))
    found = []
    for members in groups.values():
        case0 = members[0][0]
        tuned = KERNELS[case0.kernel].tiles is not None
        kept = [(c, r) for c, r in members if not (tuned and prunable(c, r))]
        if not kept:
            found.append((case0, f"{case0.kernel} at {where(case0)}: every config is pruned ("
                          + "; ".join(f"{config_label(dict(c.config))}: {', '.join(prunable(c, r))}"
                                      for c, r in members) + ")"))
        found += [(c, f"{c.kernel} {config_label(dict(c.config))} at {where(c)}: {p}")
                  for c, r in kept for p in problems(c, r)]
    return sorted(found, key=lambda f: f[1])


def known_problem(case: Case) -> str | None:
    """Why `case` is in KNOWN_PROBLEMS, or None."""
    return next((why for (kernel, size), why in KNOWN_PROBLEMS.items()
                 if case.kernel == kernel and case.size >= size), None)


def check(results: dict[Case, dict]) -> list[str]:
    """Failures among compiled results (see _findings), except the KNOWN_PROBLEMS; and a KNOWN_PROBLEMS entry
    whose cases were compiled without a problem (it is fixed: remove the entry)."""
    found = _findings(results)
    failures = [msg for case, msg in found if not known_problem(case)]
    for (kernel, size), _why in KNOWN_PROBLEMS.items():
        compiled = [c for c in results if c.kernel == kernel and c.size >= size]
        if compiled and not any(c.kernel == kernel and c.size >= size for c, _ in found):
            failures.append(f"KNOWN_PROBLEMS lists {kernel} at size >= {size}, which now compiles clean: remove it")
    return failures


def known_failures(results: dict[Case, dict]) -> list[str]:
    """The findings KNOWN_PROBLEMS accepts, each with the reason."""
    return [f"{msg} (known: {known_problem(case)})" for case, msg in _findings(results) if known_problem(case)]


def prune_index(table: dict) -> dict[tuple, dict[tuple, str]]:
    """{(kernel, target, dtype, head dim, flags): {(BLOCK_M, BLOCK_N, num_stages, num_warps): reason}} of the
    configs that spill or overflow shared memory, from a table's results."""
    index: dict[tuple, dict[tuple, str]] = {}
    for case, res in table_rows(table):
        bad = prunable(case, res)
        entry = index.setdefault(case.group_key, {})
        if bad:
            entry[config_key(dict(case.config))] = f"{', '.join(bad)} at {where(case)}"
    return index


@functools.cache
def _committed_index() -> dict[tuple, dict[tuple, str]]:
    return prune_index(load_table())


@functools.cache
def device_target(index: int) -> int | None:
    """The compile target whose results hold on CUDA device `index` (80, 90), or None."""
    import torch

    return CAPABILITY_TARGETS.get(tuple(torch.cuda.get_device_capability(index)))


_DTYPE_NAMES = {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}


def pruned_configs(kernel: str, target: int | None, dtype: str, head_dim: int, flags: dict,
                   index: dict | None = None) -> dict[tuple, str]:
    """{config key: reason} of the configs the table rules out for these arguments; empty for an unknown target
    or case. GROUP above 2 reads GROUP 2 (a loop count of the same code), and flags the sweep did not
    compile read the nearest compiled variant (GROUP 1, not SEGMENTED)."""
    index = _committed_index() if index is None else index
    if target is None:
        return {}
    flags = dict(flags)
    if "GROUP" in flags:
        flags["GROUP"] = min(int(flags["GROUP"]), 2)
    candidates = [flags, {**flags, "GROUP": 1}, {**flags, "SEGMENTED": False}, {**flags, "GROUP": 1, "SEGMENTED": False}]
    for cand in candidates:
        key = (kernel, target, dtype, head_dim, tuple(sorted((k, v) for k, v in cand.items())))
        if key in index:
            return index[key]
    return {}


def resource_pruner(kernel: str):
    """An autotuner `early_config_prune` for attention kernel `kernel`: keeps the configs the committed table
    does not rule out on the device the tensors are on; all of them when it rules out every one (the compile
    check fails in that case, so it does not happen with a current table)."""

    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        if not getattr(q, "is_cuda", False):
            return configs
        flags = {k: bool(kwargs[k]) if k != "GROUP" else int(kwargs[k])
                 for k in ("CAUSAL", "SEGMENTED", "GROUP") if k in kwargs}
        ruled_out = pruned_configs(kernel, device_target(q.device.index or 0), _DTYPE_NAMES.get(str(q.dtype), ""),
                                   int(kwargs["HEAD_DIM"]), flags)
        kept = [c for c in configs if triton_config_key(c) not in ruled_out]
        return kept or configs

    prune.kernel = kernel
    return prune
