"""index.json never runs a command nor reads outside the prepared directory, whoever wrote it.

The repros of issue 11: a shard "file" of `pipe:touch pwned; ...` was executed, `../x` and absolute names were
read outside the prepared directory. Every reader of an index (TokenStream, eval_batches, read_index as the
trainer's mixture components use it, load_index, ensure_prepared with an external index or prepare=never)
refuses such a name with one error naming the index file and the entry, before anything is opened.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from data_pipeline.index_file import BadIndexError, is_plain_file_name
from data_pipeline.prepare import ensure_prepared, load_index
from data_pipeline.shards import read_index, shard_url
from data_pipeline.stream import TokenStream, eval_batches


def _copy_with(tiny_prepared, tmp_path: Path, edit) -> Path:
    """A copy of the prepared corpus whose index.json was changed by edit(index)."""
    cfg, _ = tiny_prepared
    copy = tmp_path / "prepared"
    shutil.copytree(cfg.prepared_dir, copy)
    index = json.loads((copy / "index.json").read_text())
    edit(index)
    (copy / "index.json").write_text(json.dumps(index))
    return copy


def _naming(split: str, name: str):
    def edit(index: dict) -> None:
        index["splits"][split]["shards"][0]["file"] = name

    return edit


def _refused(copy: Path, entry: str):
    """pytest.raises for the BadIndexError that names copy's index.json and the entry."""
    return pytest.raises(
        BadIndexError, match=rf"{re.escape(str(copy))}/index\.json: {entry} = .* is not a plain file name"
    )


def _first_batch(location: str, split: str) -> None:
    if split == "val":
        eval_batches(location, 8, 2, 1)
    else:
        next(TokenStream(location, "train", 8, 2, seed=0, shuffle=False))


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_pipe_command_as_a_shard_name_is_refused_and_never_run(tiny_prepared, tmp_path, split):
    _, index = tiny_prepared
    pwned = tmp_path / "pwned"
    real = tmp_path / "prepared" / index["splits"][split]["shards"][0]["file"]
    copy = _copy_with(tiny_prepared, tmp_path, _naming(split, f"pipe:touch {pwned}; cat {real}"))
    with _refused(copy, rf"splits\.{split}\.shards\[0\]\.file"):
        _first_batch(str(copy), split)
    assert not pwned.exists()


def test_a_name_cannot_inject_a_command_into_a_pipe_location(tiny_prepared, tmp_path):
    # data.prepared_dir is a pipe: template (the user's own); a shard name substituted into it must not
    # become a second command.
    _, index = tiny_prepared
    pwned = tmp_path / "pwned"
    first = index["splits"]["train"]["shards"][0]["file"]
    copy = _copy_with(tiny_prepared, tmp_path, _naming("train", f"{first}; touch {pwned}"))
    with _refused(copy, r"splits\.train\.shards\[0\]\.file"):
        _first_batch(f"pipe:cat {copy}/{{shard}}", "train")
    assert not pwned.exists()


@pytest.mark.parametrize("name", ["../secret.tar", "/etc/passwd", "ABSOLUTE", "file:secret.tar"])
def test_names_outside_the_prepared_directory_are_refused(tiny_prepared, tmp_path, name):
    # A readable shard outside the prepared directory, which the old code streamed.
    _, index = tiny_prepared
    secret = tmp_path / "secret.tar"
    shutil.copyfile(Path(tiny_prepared[0].prepared_dir) / index["splits"]["val"]["shards"][0]["file"], secret)
    name = {"ABSOLUTE": str(secret), "file:secret.tar": f"file://{secret}"}.get(name, name)
    copy = _copy_with(tiny_prepared, tmp_path, _naming("val", name))
    with _refused(copy, r"splits\.val\.shards\[0\]\.file"):
        _first_batch(str(copy), "val")


@pytest.mark.parametrize(
    "read",
    [
        pytest.param(lambda d: read_index(d), id="read_index"),  # the trainer's index and mixture components
        pytest.param(lambda d: read_index(f"pipe:cat {d}/{{shard}}"), id="read_index-pipe"),
        pytest.param(load_index, id="load_index"),
        pytest.param(lambda d: TokenStream(str(d), "train", 8, 2, seed=0), id="TokenStream"),
    ],
)
def test_every_reader_checks_the_names(tiny_prepared, tmp_path, read):
    copy = _copy_with(tiny_prepared, tmp_path, _naming("train", "/etc/passwd"))
    with _refused(copy, r"splits\.train\.shards\[0\]\.file"):
        read(copy)


@pytest.mark.parametrize("external", [False, True])
def test_ensure_prepared_checks_an_index_it_does_not_write(tiny_prepared, tmp_path, external):
    # prepare=never, or an external index: the index is read as it is, never rewritten.
    cfg, _ = tiny_prepared

    def edit(index: dict) -> None:
        _naming("train", "../x.tar")(index)
        index["external"] = external

    copy = _copy_with(tiny_prepared, tmp_path, edit)
    with _refused(copy, r"splits\.train\.shards\[0\]\.file"):
        ensure_prepared(dataclasses.replace(cfg, prepared_dir=str(copy), prepare="never"))


@pytest.mark.parametrize("name", ["pipe:cat tokenizer.json", "../tokenizer.json", "/etc/passwd"])
def test_the_tokenizer_name_is_checked(tiny_prepared, tmp_path, name):
    copy = _copy_with(tiny_prepared, tmp_path, lambda index: index.update(tokenizer=name))
    with _refused(copy, "tokenizer"):
        read_index(copy)


def test_shards_must_carry_their_sha256(tiny_prepared, tmp_path):
    copy = _copy_with(
        tiny_prepared, tmp_path, lambda index: index["splits"]["train"]["shards"][0].pop("sha256")
    )
    with pytest.raises(BadIndexError, match=r"splits\.train\.shards\[0\]\.sha256 = None is not a sha256"):
        read_index(copy)


def test_shard_url_takes_plain_names_only():
    assert shard_url("/data/prep", "train-00000.tar") == "/data/prep/train-00000.tar"
    for name in ("/etc/passwd", "../x.tar", "pipe:touch x", "https://h/x.tar", "x.tar;ls", "-n", "", ".."):
        with pytest.raises(BadIndexError, match="not a plain file name"):
            shard_url("pipe:cat /data/{shard}", name)


@pytest.mark.parametrize(
    ("name", "plain"),
    [
        ("train-00000.tar", True),
        ("sw-0001.tar.gz", True),
        ("a_b+c=d,e@f.tar", True),
        ("", False),
        (".", False),
        ("..", False),
        ("...tar", False),
        (".hidden", False),
        ("-rf", False),
        ("a/b.tar", False),
        ("a\\b.tar", False),
        ("pipe:x", False),
        ("file:x", False),
        ("http:x", False),
        ("a b.tar", False),
        ("a$(id).tar", False),
        ("a\nb", False),
        ("x" * 256, False),
        (3, False),
    ],
)
def test_plain_file_names(name, plain):
    assert is_plain_file_name(name) is plain
