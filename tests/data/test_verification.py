"""Every shard is checked against its sha256 from index.json as it streams.

The repro of issue 11: 16 flipped bytes in the middle of a shard's token data leave a valid tar and a valid npy,
so without the check the stream trains on wrong token ids (ids beyond the vocabulary, an IndexError in the
embedding hundreds of steps later, the shard never named). With it, the training stream skips the shard,
counts it and names it, as any corrupt shard; the validation stream stops with an error naming it.
"""

from __future__ import annotations

import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.shards import CorruptShardError, load_shard
from data_pipeline.stream import TokenStream, eval_batches, skipped_shards

SEED, SEQ_LEN, BATCH, BLOCK_SHARDS = 5, 16, 3, 2
FLIPPED_BYTES = 16


def _token_payload(path: Path) -> tuple[int, int]:
    """(file offset, length) of the token data of the shard's largest tokens.npy member, after its npy header."""
    with tarfile.open(path) as tar:
        member = max((m for m in tar.getmembers() if m.name.endswith(".tokens.npy")), key=lambda m: m.size)
    with open(path, "rb") as f:
        f.seek(member.offset_data)
        head = f.read(10)
    assert head[:8] == b"\x93NUMPY\x01\x00", "a version 1.0 npy header"
    header = 10 + int.from_bytes(head[8:10], "little")
    return member.offset_data + header, member.size - header


def _flip_token_bytes(path: Path) -> None:
    """Invert FLIPPED_BYTES bytes in the middle of a document's token ids: the tar and npy stay valid."""
    start, length = _token_payload(path)
    assert length >= 4 * FLIPPED_BYTES
    at = start + 2 * (length // 4) - FLIPPED_BYTES // 2  # even: whole uint16/uint32 tokens are flipped
    data = bytearray(path.read_bytes())
    data[at : at + FLIPPED_BYTES] = bytes(b ^ 0xFF for b in data[at : at + FLIPPED_BYTES])
    path.write_bytes(bytes(data))


def _copy(tiny_prepared, tmp_path: Path, name: str) -> Path:
    cfg, _ = tiny_prepared
    copy = tmp_path / name
    shutil.copytree(cfg.prepared_dir, copy)
    return copy


def _training_stream(prepared_dir: Path, **kw) -> TokenStream:
    return TokenStream(str(prepared_dir), "train", SEQ_LEN, BATCH, seed=SEED, shuffle_block_shards=BLOCK_SHARDS,
                       loop=False, **kw)  # fmt: skip


def _assert_wrong_tokens_without_the_check(
    good_dir: Path, flipped_dir: Path, victim: str, index: dict
) -> None:
    """The repro: the flipped shard decodes, into token ids beyond the vocabulary, unless its sha256 is checked."""
    good = load_shard(good_dir / victim).tokens
    bad = load_shard(flipped_dir / victim).tokens
    assert np.count_nonzero(good != bad) == FLIPPED_BYTES // good.itemsize
    assert bad.max() >= index["vocab_size"]  # ids no embedding has: the IndexError of the repro
    unverified = list(_training_stream(flipped_dir, verify_sha256=False))
    assert max(int(x.max()) for x, _ in unverified) >= index["vocab_size"]


def test_a_training_shard_with_flipped_bytes_is_skipped_counted_and_named(tiny_prepared, tmp_path, caplog):
    cfg, index = tiny_prepared
    victim = index["splits"]["train"]["shards"][1]["file"]
    flipped = _copy(tiny_prepared, tmp_path, "flipped")
    _flip_token_bytes(flipped / victim)
    _assert_wrong_tokens_without_the_check(Path(cfg.prepared_dir), flipped, victim, index)
    # The same corpus with the victim cut in half: a corrupt shard the stream already skipped. Both streams must
    # skip the victim alike, so they give the same batches, inputs and targets, over the whole epoch.
    truncated = _copy(tiny_prepared, tmp_path, "truncated")
    data = (truncated / victim).read_bytes()
    (truncated / victim).write_bytes(data[: len(data) // 2])

    expected = list(_training_stream(truncated))
    stream = _training_stream(flipped)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data_pipeline.shards"):
        batches = list(stream)
    assert len(batches) == len(expected) > 0
    for (x, y), (ex, ey) in zip(batches, expected, strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert max(int(x.max()) for x, _ in batches) < index["vocab_size"]
    assert stream.skips.count == skipped_shards(stream) == 1  # its block is read once in the epoch
    skips = [r.getMessage() for r in caplog.records if "skipping corrupt shard" in r.getMessage()]
    assert len(skips) == 1 and skips[0].startswith(f"skipping corrupt shard {flipped}/{victim}: sha256 ")
    assert index["splits"]["train"]["shards"][1]["sha256"] in skips[0]


def test_a_validation_shard_with_flipped_bytes_stops_with_its_name(tiny_prepared, tmp_path):
    _, index = tiny_prepared
    victim = index["splits"]["val"]["shards"][0]["file"]
    flipped = _copy(tiny_prepared, tmp_path, "flipped")
    _flip_token_bytes(flipped / victim)
    with pytest.raises(CorruptShardError, match=f"corrupt shard {flipped}/{victim}: sha256 .* != expected"):
        eval_batches(str(flipped), 8, 2, 1_000_000)


def test_a_shard_read_through_a_pipe_is_verified_too(tiny_prepared, tmp_path):
    _, index = tiny_prepared
    victim = index["splits"]["train"]["shards"][0]["file"]
    flipped = _copy(tiny_prepared, tmp_path, "flipped")
    _flip_token_bytes(flipped / victim)
    stream = _training_stream(f"pipe:cat {flipped}/{{shard}}")
    list(stream)
    assert [err.url for err in stream.skips.skipped] == [f"pipe:cat {flipped}/{victim}"]
