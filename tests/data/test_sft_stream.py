"""SFTStream: pieces, packing, padding, data-parallel invariance, exact resume, validation, checksums."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch
from test_sft_prepare import good_records, prepare_dir, read_samples

from data_pipeline.sft_stream import SFTBatch, SFTStream, pack_rows, sft_eval_batches
from data_pipeline.shards import CorruptShardError

T = 48  # shorter than the longest samples: some pieces are cut to T


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(dir, index, {split: [(ids, mask)] in index order}) of 120 conversations of ~10 to ~100 tokens."""
    short = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(60)]
    records = [r for pair in zip(good_records(60), short, strict=True) for r in pair]
    out, index = prepare_dir(tmp_path_factory.mktemp("sft"), records, shard_max_tokens=800)
    samples = {
        s: [(t.astype(np.int64), m) for t, m, _ in read_samples(out, index, s)] for s in ("train", "val")
    }
    return out, index, samples


def _stream(prepared, split="train", batch=3, seed=5, **kw) -> SFTStream:
    return SFTStream(str(prepared[0]), split, T, batch, seed, **kw)


def _pieces_of_row(batch: SFTBatch, b: int, eot: int) -> list[tuple[tuple, tuple]]:
    """Row b's pieces as (ids[:p + 1], mask[1:p + 1]), checking positions, segments, shift and padding."""
    x, y, m, seg, pos = (t[b].tolist() for t in batch)
    runs, at = [], 0  # [start, end) of each run of one segment id
    while at < T:
        end = at + 1
        while end < T and seg[end] == seg[at]:
            end += 1
        runs.append((at, end))
        at = end
    last_start, last_end = runs[-1]
    padded = set(x[last_start:last_end]) == {eot} and not any(pos[last_start:last_end])
    pieces = []
    for k, (start, end) in enumerate(runs[:-1] if padded else runs):
        assert seg[start] == k, "segment ids number the row's pieces 0, 1, ..."
        assert pos[start:end] == list(range(end - start)), "positions restart at 0 for each piece"
        assert y[start : end - 1] == x[start + 1 : end], "inside a piece, each target is the next input"
        pieces.append((tuple(x[start:end] + [y[end - 1]]), tuple(int(v) for v in m[start:end])))
    if padded:
        pad = slice(last_start, last_end)
        assert seg[last_start] == len(pieces), "padding has its own segment id, after the pieces'"
        assert set(y[pad]) == {0} and set(m[pad]) == {0}
    return pieces


def _pieces(batches, eot) -> list:
    out = []
    for batch in batches:
        assert batch.input_ids.shape == (batch.input_ids.shape[0], T)
        assert batch.input_ids.dtype == torch.long and batch.target_ids.dtype == torch.long
        assert batch.loss_mask.dtype == torch.float32 and batch.segment_ids.dtype == torch.int32
        assert batch.position_ids.dtype == torch.long
        assert batch.valid_tokens == int(batch.loss_mask.sum())
        for b in range(batch.input_ids.shape[0]):
            out += _pieces_of_row(batch, b, eot)
    return out


def _expected_pieces(samples) -> Counter:
    """Each sample as the piece the stream must make of it (cut to T positions)."""
    return Counter(
        (
            tuple(ids[: min(ids.size - 1, T) + 1].tolist()),
            tuple(int(v) for v in mask[1 : min(ids.size - 1, T) + 1]),
        )
        for ids, mask in samples
    )


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("shuffle", [True, False])
def test_an_epoch_holds_every_piece_once(prepared, packing, shuffle):
    out, index, samples = prepared
    stream = _stream(prepared, packing=packing, shuffle=shuffle, loop=False)
    batches = list(stream)
    assert len(batches) == -(-stream.rows_in_epoch() // 3)
    pieces = _pieces(batches, index["eot_id"])
    assert Counter(pieces) == _expected_pieces(samples["train"])
    assert any(len(p[0]) == T + 1 for p in pieces), "some samples are longer than T: cut"
    if packing:
        assert stream.rows_in_epoch() < len(samples["train"]) - 10, "packing puts several pieces in a row"
    else:
        assert stream.rows_in_epoch() == len(samples["train"])


def test_piece_targets_end_on_their_own_sample(prepared):
    """A piece's last input predicts its sample's last token (the trained end token), not the next piece's first."""
    _, _, samples = prepared
    lengths = np.array([min(ids.size - 1, T) for ids, _ in samples["train"]])
    starts = pack_rows(lengths, T)
    r = next(r for r in range(len(starts) - 1) if starts[r + 1] - starts[r] >= 2)
    batch = list(islice(_stream(prepared, batch=1, shuffle=False, loop=False), r + 1))[-1]
    x, y, m = batch.input_ids[0], batch.target_ids[0], batch.loss_mask[0]
    (ids0, mask0), (ids1, _) = samples["train"][starts[r] : starts[r] + 2]
    p = ids0.size - 1
    assert y[:p].tolist() == ids0[1:].tolist() and m[:p].tolist() == mask0[1:].tolist()
    assert x[p] == ids1[0] and y[p - 1] == ids0[-1] != ids1[0]
    assert m[p - 1] == 1, "the end token closing the assistant turn is trained"


def test_unshuffled_rows_are_greedy_in_index_order(prepared):
    _, index, samples = prepared
    lengths = np.array([min(ids.size - 1, T) for ids, _ in samples["train"]])
    starts = pack_rows(lengths, T)
    stream = _stream(prepared, batch=1, shuffle=False, loop=False)
    rows = list(stream)
    assert len(rows) == len(starts) - 1
    for r, batch in enumerate(rows):
        expected = _expected_pieces(samples["train"][starts[r] : starts[r + 1]])
        assert _pieces_of_row(batch, 0, index["eot_id"]) == list(expected)  # Counter keeps insertion order
        if r + 2 < len(starts):  # greedy: the next piece did not fit
            assert lengths[starts[r] : starts[r + 1] + 1].sum() > T


def test_pack_rows():
    assert pack_rows(np.array([3, 4, 2, 5, 5]), 7).tolist() == [0, 2, 4, 5]
    assert pack_rows(np.array([3, 5, 2, 1, 7]), 7).tolist() == [0, 1, 3, 4, 5]  # in order: no backfill
    assert pack_rows(np.array([7, 7]), 7).tolist() == [0, 1, 2]


def _cat(batches):
    return [torch.cat(ts) for ts in zip(*batches, strict=True)]


def _assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_rank_batches_concatenated_are_the_single_process_batch(prepared):
    one = _stream(prepared, batch=4)
    ranks = [_stream(prepared, batch=2, dp_rank=r, dp_world_size=2) for r in range(2)]
    n = one.rows_in_epoch() // 4 + 3  # across an epoch boundary
    for _ in range(n):
        _assert_same(next(one), _cat([next(r) for r in ranks]))
    assert {json.dumps({**r.state_dict(), "dp_world_size": 0, "micro_batch_size": 0}) for r in ranks} == {
        json.dumps({**one.state_dict(), "dp_world_size": 0, "micro_batch_size": 0})
    }


def test_epochs_are_shuffled_differently_and_cover_every_piece(prepared):
    _, index, samples = prepared
    stream = _stream(prepared, batch=1)
    e0 = _pieces(islice(stream, stream.rows_in_epoch(0)), index["eot_id"])
    e1 = _pieces(islice(stream, stream.rows_in_epoch(1)), index["eot_id"])
    assert Counter(e0) == Counter(e1) == _expected_pieces(samples["train"]) and e0 != e1
    assert stream.state_dict()["epoch"] == 2 and stream.state_dict()["row"] == 0


@pytest.mark.parametrize("packing", [True, False])
def test_resume_continues_identically_under_any_dp_size(prepared, packing):
    epoch_steps = _stream(prepared, packing=packing).rows_in_epoch() // 4
    stops = (5, epoch_steps + 2)  # in the first epoch, and in the second
    full = _stream(prepared, batch=4, packing=packing)
    reference = [next(full) for _ in range(stops[-1] + 6)]
    for stop in stops:
        first = _stream(prepared, batch=4, packing=packing)
        for _ in range(stop):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
        assert state["epoch"] == (stop > epoch_steps)
        same = _stream(prepared, batch=4, packing=packing)
        same.load_state_dict(state)
        ranks = [_stream(prepared, batch=2, dp_rank=r, dp_world_size=2, packing=packing) for r in range(2)]
        for r in ranks:
            r.load_state_dict(state)
        for k in range(stop, stop + 6):
            _assert_same(next(same), reference[k])
            _assert_same(_cat([next(r) for r in ranks]), reference[k])


def test_state_from_other_data_or_layout_is_refused(prepared):
    state = _stream(prepared).state_dict()
    for other in (
        _stream(prepared, seed=6),
        _stream(prepared, packing=False),
        SFTStream(str(prepared[0]), "train", T + 1, 3, 5),
    ):
        with pytest.raises(ValueError, match="state was saved with"):
            other.load_state_dict(state)


def test_validation_covers_every_piece_once_at_any_dp_size(prepared):
    _, index, samples = prepared
    expected = _expected_pieces(samples["val"])
    batches = sft_eval_batches(str(prepared[0]), T, 2, max_batches=10_000)
    assert Counter(_pieces(batches, index["eot_id"])) == expected
    assert len(sft_eval_batches(str(prepared[0]), T, 2, max_batches=1)) == 1
    ranks = [list(_stream(prepared, "val", batch=2, dp_rank=r, dp_world_size=3, shuffle=False, loop=False))
             for r in range(3)]  # fmt: skip
    assert len({len(r) for r in ranks}) == 1, "every rank gets the same number of batches"
    assert Counter(_pieces([b for r in ranks for b in r], index["eot_id"])) == expected


def test_corrupt_or_wrong_shards_are_named(prepared, tmp_path):
    out, index, _ = prepared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = index["splits"]["train"]["shards"][0]["file"]
    data = bytearray((copy / shard).read_bytes())
    data[1000] ^= 1
    (copy / shard).write_bytes(data)
    stream = SFTStream(str(copy), "train", T, 64, 5, shuffle=False)
    with pytest.raises(CorruptShardError, match=shard):
        next(stream)
    with pytest.raises(ValueError, match="not an SFT prepared directory"):
        (copy / "index.json").write_text(json.dumps({**index, "kind": None}))
        SFTStream(str(copy), "train", T, 2, 5)
