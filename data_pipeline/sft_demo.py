"""An offline instruction task from the Python standard library (`python -m data_pipeline.sft_demo --out F`).

For every public top-level function with a docstring in the public modules of this Python's standard library
(of those prepare's "stdlib" source reads), one record: prompt "Write the signature of the Python function
documented as:" and the docstring's first paragraph; response the function's `def name(args):` line (`async
def` for a coroutine), rebuilt from the parsed source with `ast.unparse`, so annotations and defaults are as written.
Each record carries `"group": <module>`: prepare_sft splits by that, so all of a module's functions go to the
same split and validation measures modules the model has not seen. Sources are parsed, never imported;
modules in sorted path order, functions in source order: the output is the same on every run of one Python.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from data_pipeline.prepare import atomic_write_bytes
from data_pipeline.sources import STDLIB, source_files

logger = logging.getLogger(__name__)

INSTRUCTION = "Write the signature of the Python function documented as:"


def module_name(rel: str) -> str:
    """Dotted module name of a path relative to the stdlib root ("json/decoder.py" -> "json.decoder")."""
    parts = rel.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def signature_line(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The `def name(args):` line of a parsed function (return annotation included)."""
    returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    keyword = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    return f"{keyword} {node.name}({ast.unparse(node.args)}){returns}:"


def first_paragraph(docstring: str) -> str:
    """The docstring up to its first blank line (already dedented by ast.get_docstring)."""
    return docstring.strip().split("\n\n", 1)[0].strip()


def module_records(source: bytes, module: str) -> Iterator[dict]:
    """One record per public top-level function with a docstring in a module's source."""
    with warnings.catch_warnings():  # old escape sequences in some stdlib modules
        warnings.simplefilter("ignore", SyntaxWarning)
        tree = ast.parse(source)
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node, clean=True)
        if doc and first_paragraph(doc):
            yield {
                "prompt": f"{INSTRUCTION}\n{first_paragraph(doc)}",
                "response": signature_line(node),
                "group": module,
            }


def stdlib_records(max_modules: int = 0) -> Iterator[dict]:
    """Records of the stdlib's public modules in sorted order (the first max_modules that have any; 0: all)."""
    root, files = source_files(STDLIB)
    modules = 0
    for rel, path in sorted((p.relative_to(root).as_posix(), p) for p in files):
        module = module_name(rel)
        if any(part.startswith("_") for part in module.split(".")):  # private modules: not the public API
            continue
        try:
            records = list(module_records(path.read_bytes(), module))
        except (OSError, SyntaxError, ValueError) as e:  # ValueError: source with a null byte
            logger.warning("skipping %s: %s", rel, e)
            continue
        if records:
            yield from records
            modules += 1
            if modules == max_modules:
                return


def main(argv: list[str] | None = None) -> None:
    """CLI: write the records as JSONL to --out and print how many."""
    p = argparse.ArgumentParser(prog="python -m data_pipeline.sft_demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--max-modules", type=int, default=0, help="stop after this many modules (0: all)")
    a = p.parse_args(argv)
    if a.max_modules < 0:
        p.error(f"--max-modules must be >= 0, got {a.max_modules}")
    out = Path(a.out)
    if not out.parent.is_dir():
        print(f"error: the directory of --out {str(out)!r} does not exist", file=sys.stderr)
        raise SystemExit(2)
    records = list(stdlib_records(a.max_modules))
    atomic_write_bytes(out, "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))
    n_modules = len({r["group"] for r in records})
    print(f"{len(records)} functions from {n_modules} modules written to {out}")


if __name__ == "__main__":
    main()
