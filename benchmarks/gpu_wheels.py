"""Wheels for a GPU machine that cannot reach PyPI: `python -m benchmarks.gpu_wheels --into .whl`.

Run it where pip works. It collects, for the GPU machine's Python (default 3.12, manylinux x86-64), the
packages the training engine needs beyond what a CUDA PyTorch image already holds (torch, triton, numpy,
tokenizers, safetensors, pytest, ...): binary wheels are downloaded, source-only packages (DeepSpeed, built
with DS_BUILD_OPS=0 so no op is compiled; antlr4's runtime) are built here as pure-Python wheels. On the GPU
machine, `python -m benchmarks.gpu_acceptance --out DIR --wheels .whl` installs them with `--no-deps` into
its output folder, next to the machine's own CUDA torch.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

# What trainer.pretrain imports beyond a CUDA PyTorch image (W&B stays out: it is imported only when
# logging.wandb is on), at the versions installed where this runs (`make setup`'s, the ones CI tests).
BINARY_PACKAGES = [
    "megatron-core", "hydra-core", "omegaconf", "webdataset", "braceexpand", "hjson", "pydantic", "pydantic-core",
    "annotated-types", "typing-inspection", "zstandard",
]
SOURCE_ONLY_PACKAGES = ["deepspeed", "antlr4-python3-runtime"]
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 27, 28)] + ["manylinux2014_x86_64"]


def pinned(names: list[str]) -> list[str]:
    """name==version for each package, at the version installed in this interpreter."""
    try:
        return [f"{name}=={importlib.metadata.version(name)}" for name in names]
    except importlib.metadata.PackageNotFoundError as missing:
        raise SystemExit(f"{missing.name} is not installed here: run this with the project's venv (make setup)") from None


def download_binary(into: Path, python_version: str) -> None:
    """Binary (or pure) wheels for the target interpreter, without their dependencies."""
    platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
         "--python-version", python_version, "--implementation", "cp", *platform_args, "-d", str(into),
         *pinned(BINARY_PACKAGES)],
        check=True,
    )  # fmt: skip


def build_source_only(into: Path) -> None:
    """Pure-Python wheels of the source-only packages; DeepSpeed without any compiled op."""
    env = dict(os.environ, DS_BUILD_OPS="0")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(into),
         *pinned(SOURCE_ONLY_PACKAGES)],
        check=True, env=env,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--into", default=".whl", help="folder for the wheels (ignore it in git)")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python, e.g. 3.12")
    args = parser.parse_args(argv)
    into = Path(args.into)
    into.mkdir(parents=True, exist_ok=True)
    download_binary(into, args.python_version)
    build_source_only(into)
    wheels = sorted(into.glob("*.whl"))
    size_mb = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {size_mb:.1f} MiB, in {into}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
