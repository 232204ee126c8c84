"""Shards written by other tools (webdataset's ShardWriter, plain tar of .txt files) train through our stream."""

from __future__ import annotations

import subprocess

import torch
import webdataset as wds

from data_pipeline.external import index_external_shards, main
from data_pipeline.stream import TokenStream, eval_batches
from data_pipeline.tokenizer import load_tokenizer

TEXTS = [f"def function_{i}(x):\n    return x * {i}  # the {i}th document\n" * (3 + i % 4) for i in range(40)]


def _shardwriter_shards(directory, texts) -> str:
    pattern = str(directory / "sw-%04d.tar")
    with wds.ShardWriter(pattern, maxcount=10) as sink:
        for i, text in enumerate(texts):
            sink.write({"__key__": f"doc{i:04d}", "txt": text})
    return str(directory / "sw-*.tar")


def _tar_of_text_files(directory, texts) -> str:
    files = []
    for i, text in enumerate(texts):
        (directory / f"file{i:03d}.txt").write_text(text)
        files.append(f"file{i:03d}.txt")
    subprocess.run(["tar", "-cf", "val-from-tar.tar", *files], cwd=directory, check=True)
    return str(directory / "val-from-tar.tar")


def test_foreign_shards_are_indexed_and_streamed(tiny_prepared, tmp_path):
    cfg, _ = tiny_prepared
    tokenizer_path = f"{cfg.prepared_dir}/tokenizer.json"
    train = _shardwriter_shards(tmp_path, TEXTS[:32])
    val = _tar_of_text_files(tmp_path, TEXTS[32:])
    index = index_external_shards([train], [val], tokenizer_path, str(tmp_path / "indexed"))
    tok = load_tokenizer(tokenizer_path)
    expected = sum(len(tok.encode(t).ids) + 1 for t in TEXTS[:32])  # +1: the end-of-document token
    assert index["splits"]["train"]["n_tokens"] == expected and len(index["splits"]["train"]["shards"]) == 4

    stream = TokenStream(str(tmp_path / "indexed"), "train", 8, 2, seed=3, shuffle_block_shards=2)
    x, y = next(stream)
    assert x.shape == (2, 8) and torch.equal(x[:, 1:], y[:, :-1])
    decoded = tok.decode(x[0].tolist())
    assert any(decoded in text for text in TEXTS[:32]) or "function_" in decoded
    assert eval_batches(str(tmp_path / "indexed"), 8, 2, 3)


def test_cli_prints_counts(tiny_prepared, tmp_path, capsys):
    cfg, _ = tiny_prepared
    train = _shardwriter_shards(tmp_path, TEXTS[:20])
    val = _tar_of_text_files(tmp_path, TEXTS[20:24])
    assert main(["--train", train, "--val", val, "--tokenizer", f"{cfg.prepared_dir}/tokenizer.json",
                 "--out", str(tmp_path / "out")]) == 0
    assert "train: 2 shards, 20 documents" in capsys.readouterr().out


def test_our_shards_list_with_the_tar_command(tiny_prepared):
    cfg, index = tiny_prepared
    shard = f"{cfg.prepared_dir}/{index['splits']['train']['shards'][0]['file']}"
    members = subprocess.run(["tar", "-tf", shard], check=True, capture_output=True, text=True).stdout.split()
    assert members and all(m.endswith((".tokens.npy", ".json")) for m in members)
    assert sum(m.endswith(".tokens.npy") for m in members) == index["splits"]["train"]["shards"][0]["n_docs"]
