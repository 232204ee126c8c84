"""Shards written by other tools (webdataset's ShardWriter, plain tar of .txt files) train through our stream.

What the stream reads is compared token for token with each text's token ids followed by the end-of-document
token, in the order the texts were written. The index lists them by plain names of its own directory (links)
with their sha256, which the stream checks as it reads them.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from data_pipeline.external import index_external_shards, main
from data_pipeline.shards import read_index
from data_pipeline.stream import TokenStream, eval_batches
from data_pipeline.tokenizer import EOT_TOKEN, eot_id, load_tokenizer

TEXTS = [f"def function_{i}(x):\n    return x * {i}  # the {i}th document\n" * (3 + i % 4) for i in range(40)]
# A document that mentions the end-of-document token as text, in the train and in the val part: it must stay
# text (several tokens, no document boundary) in the index's counts and in the stream alike.
TEXTS[5] += f"# {EOT_TOKEN} is only text here\n"
TEXTS[35] += f"# {EOT_TOKEN} is only text here\n"
DOCS_PER_SHARD = 10  # ShardWriter's maxcount


def _shardwriter_shards(directory, texts) -> str:
    pattern = str(directory / "sw-%04d.tar")
    with wds.ShardWriter(pattern, maxcount=DOCS_PER_SHARD) as sink:
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


def _tokens_of(tok, texts: list[str]) -> np.ndarray:
    """The token stream texts must become: each text's ids, then the end-of-document token."""
    return np.concatenate([np.array([*tok.encode(text).ids, eot_id(tok)], dtype=np.int64) for text in texts])


def _windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """The windows of seq_len + 1 tokens taken with stride seq_len, as the stream cuts them: (n, T + 1)."""
    n = (tokens.size - 1) // seq_len
    return tokens[np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)]


def _sorted_rows(rows: np.ndarray) -> np.ndarray:
    return rows[np.lexsort(rows.T[::-1])]


def _assert_batches_read(batches, tokens: np.ndarray) -> None:
    """Unshuffled batches are tokens[0:], inputs and targets one token apart, token for token."""
    inputs = torch.cat([x.reshape(-1) for x, _ in batches]).numpy()
    targets = torch.cat([y.reshape(-1) for _, y in batches]).numpy()
    np.testing.assert_array_equal(inputs, tokens[: inputs.size])
    np.testing.assert_array_equal(targets, tokens[1 : inputs.size + 1])


def test_foreign_shards_are_indexed_and_streamed(tiny_prepared, tmp_path):
    cfg, _ = tiny_prepared
    tokenizer_path = f"{cfg.prepared_dir}/tokenizer.json"
    train_texts, val_texts = TEXTS[:32], TEXTS[32:]
    indexed = str(tmp_path / "indexed")
    index = index_external_shards([_shardwriter_shards(tmp_path, train_texts)],
                                  [_tar_of_text_files(tmp_path, val_texts)], tokenizer_path, indexed)
    tok = load_tokenizer(tokenizer_path)
    shard_texts = [train_texts[i : i + DOCS_PER_SHARD] for i in range(0, len(train_texts), DOCS_PER_SHARD)]
    shard_tokens = [_tokens_of(tok, texts) for texts in shard_texts]
    listed = index["splits"]["train"]["shards"]
    expected = [(len(texts), tokens.size) for texts, tokens in zip(shard_texts, shard_tokens, strict=True)]
    assert [(s["n_docs"], s["n_tokens"]) for s in listed] == expected
    _assert_linked_by_plain_name(Path(indexed), index, sorted(tmp_path.glob("sw-*.tar")))
    train_tokens = np.concatenate(shard_tokens)
    assert index["splits"]["train"]["n_tokens"] == train_tokens.size

    # Read in index order: the texts' tokens, token for token, every batch of the epoch.
    T, B = 8, 2
    in_order = list(TokenStream(indexed, "train", T, B, seed=3, loop=False, shuffle=False))
    assert len(in_order) == (train_tokens.size - 1) // (B * T)
    _assert_batches_read(in_order, train_tokens)
    # Shuffled, one shard per block (no window spans two shards), one window per batch: an epoch is every
    # window of every shard, once.
    shuffled = list(TokenStream(indexed, "train", T, 1, seed=3, loop=False, shuffle_block_shards=1))
    assert all(torch.equal(x[:, 1:], y[:, :-1]) for x, y in shuffled)
    rows = np.concatenate([torch.cat([x, y[:, -1:]], dim=1).numpy() for x, y in shuffled])
    windows = np.concatenate([_windows(tokens, T) for tokens in shard_tokens])
    np.testing.assert_array_equal(_sorted_rows(rows), _sorted_rows(windows))
    # The validation tar, in the order `tar` stored the files.
    _assert_batches_read(eval_batches(indexed, T, B, 3), _tokens_of(tok, val_texts))


def _assert_linked_by_plain_name(out: Path, index: dict, train_files: list[Path]) -> None:
    """Each shard is listed by a plain name of out, a link to the shard, with the sha256 of the shard's bytes."""
    listed = index["splits"]["train"]["shards"]
    assert [s["file"] for s in listed] == [f"train-{i:05d}-{f.name}" for i, f in enumerate(train_files)]
    for shard, source in zip(listed, train_files, strict=True):
        assert (out / shard["file"]).resolve() == source.resolve()
        assert shard["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert read_index(out) == index  # what every reader checks: plain names, a sha256 per shard


def test_a_changed_external_shard_is_skipped_by_its_sha256(tiny_prepared, tmp_path, caplog):
    # Letters changed in a text shard leave valid UTF-8 and a valid tar: only the sha256 tells.
    cfg, _ = tiny_prepared
    pattern = _shardwriter_shards(tmp_path, TEXTS[:32])
    indexed = tmp_path / "indexed"
    index_external_shards([pattern], [_tar_of_text_files(tmp_path, TEXTS[32:])],
                          f"{cfg.prepared_dir}/tokenizer.json", str(indexed))  # fmt: skip
    victim = tmp_path / "sw-0001.tar"
    data = victim.read_bytes()
    at = data.index(b"function_")
    victim.write_bytes(data[:at] + b"FUNCTION_" + data[at + len(b"function_") :])
    stream = TokenStream(str(indexed), "train", 8, 2, seed=3, loop=False, shuffle_block_shards=4)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.shards"):
        list(stream)
    assert [err.url for err in stream.skips.skipped] == [f"{indexed}/train-00001-sw-0001.tar"]
    assert "sha256" in stream.skips.skipped[0].reason and "train-00001-sw-0001.tar" in caplog.text


def test_remote_shards_are_not_indexed_by_location(tiny_prepared, tmp_path):
    # An index names files of its own directory only: a pipe: or URL shard cannot be listed by its location.
    cfg, _ = tiny_prepared
    for remote in (f"pipe:cat {tmp_path}/x.tar", "https://example.com/x.tar"):
        with pytest.raises(ValueError, match="indexes local shards"):
            index_external_shards([remote], [remote], f"{cfg.prepared_dir}/tokenizer.json", str(tmp_path))


def test_cli_prints_counts(tiny_prepared, tmp_path, capsys):
    cfg, _ = tiny_prepared
    train = _shardwriter_shards(tmp_path, TEXTS[:20])
    val = _tar_of_text_files(tmp_path, TEXTS[20:24])
    assert main(["--train", train, "--val", val, "--tokenizer", f"{cfg.prepared_dir}/tokenizer.json",
                 "--out", str(tmp_path / "out")]) == 0
    n_tokens = _tokens_of(load_tokenizer(f"{cfg.prepared_dir}/tokenizer.json"), TEXTS[:20]).size
    assert f"train: 2 shards, 20 documents, {n_tokens:,} tokens" in capsys.readouterr().out


def test_our_shards_list_with_the_tar_command(tiny_prepared):
    cfg, index = tiny_prepared
    shard = f"{cfg.prepared_dir}/{index['splits']['train']['shards'][0]['file']}"
    members = subprocess.run(["tar", "-tf", shard], check=True, capture_output=True, text=True).stdout.split()
    assert members and all(m.endswith((".tokens.npy", ".json")) for m in members)
    assert sum(m.endswith(".tokens.npy") for m in members) == index["splits"]["train"]["shards"][0]["n_docs"]
