"""sft_demo: signature records from the standard library, split by module through prepare_sft."""

from __future__ import annotations

import json

from test_sft_prepare import make_tokenizer, read_samples

from data_pipeline.corpus import split_of
from data_pipeline.prepare_sft import SFTOptions, prepare_sft
from data_pipeline.sft_demo import INSTRUCTION, main, module_name, module_records, stdlib_records

SOURCE = b'''
def add(a: int, b=2, *args, c, **kw) -> int:
    """Add numbers.

    More detail that is not in the prompt.
    """

async def fetch(url):
    """Fetch a URL."""

def _private():
    """Hidden."""

def undocumented(x):
    return x

class C:
    def method(self):
        """Methods are not top-level functions."""
'''


def test_module_records_take_public_documented_top_level_functions():
    records = list(module_records(SOURCE, "pkg.mod"))
    assert records == [
        {"prompt": f"{INSTRUCTION}\nAdd numbers.", "response": "def add(a: int, b=2, *args, c, **kw) -> int:",
         "group": "pkg.mod"},
        {"prompt": f"{INSTRUCTION}\nFetch a URL.", "response": "async def fetch(url):", "group": "pkg.mod"},
    ]  # fmt: skip
    assert module_name("json/__init__.py") == "json" and module_name("json/decoder.py") == "json.decoder"


def test_stdlib_records_are_deterministic_and_split_by_module(tmp_path, capsys):
    out = tmp_path / "demo.jsonl"
    main(["--out", str(out), "--max-modules", "30"])
    assert "from 30 modules" in capsys.readouterr().out
    lines = out.read_text().splitlines()
    assert [json.loads(x) for x in lines] == list(stdlib_records(30))
    groups = {json.loads(x)["group"] for x in lines}
    assert len(groups) == 30 and all(json.loads(x)["response"].endswith(":") for x in lines)
    index = prepare_sft(SFTOptions(sources=[str(out)], out=str(tmp_path / "prep"), val_fraction=0.3,
                                   tokenizer=str(make_tokenizer(tmp_path / "tok.json"))))  # fmt: skip
    for split in ("train", "val"):
        for _, _, meta in read_samples(tmp_path / "prep", index, split):
            line = int(meta["id"].rsplit(":", 1)[1])
            assert split_of(json.loads(lines[line - 1])["group"], 0.3) == split
