"""SFTStream: packed fine-tuning batches with loss masks, invariant to the data-parallel layout, exact resume.

Reads a directory written by `python -m data_pipeline.prepare_sft`. Each sample (ids, mask) becomes a piece
of p = min(len - 1, T) positions: input ids[:p], target ids[1:p + 1], loss mask mask[1:p + 1]. The last
input of a piece predicts the piece's own last token, never the next piece's first.

Rows. An epoch's sample order is the split's samples in index order (shards in index order, samples in shard
order), permuted by `np.random.default_rng([seed, epoch])` when shuffle. packing=True packs that order
greedily into rows of T positions: a row takes the next pieces while they fit and is closed when the next one
does not. packing=False gives each piece a row of its own. In a row, positions restart at 0 for each piece and
segment ids number its pieces 0, 1, ...; the rest of the row is padding: input eot_id, target 0, mask 0,
position 0 and segment id = the row's piece count (distinct from its pieces'), so attention restricted to equal
segment ids never crosses a piece border. The epoch's rows follow from index.json's per-sample lengths and the
seed alone: planning reads no shard.

Batches. As in TokenStream's global mode there is one global row sequence, epoch after epoch (loop=True):
each next() is a global micro-step of G = dp_world_size * micro_batch_size rows from the cursor, rank r takes
rows [cursor + r*B, cursor + (r+1)*B), and every rank moves the cursor by G. So the rank batches of a step
concatenated in rank order are the batch one process with micro_batch_size G gets, and the state (epoch,
global row cursor) resumes at any dp size or micro-batch size. loop=False (validation) stops once the cursor
passes the epoch's last row; the last step's rows past the end are all padding (mask 0), so every piece is
seen exactly once and every rank gets the same number of batches.

Shards are read whole, checked against index.json's sha256 (and its per-sample lengths) and kept in memory
once read: fine-tuning sets are small (a million 500-token samples are ~1.5 GB as uint16 + uint8). A
corrupt shard is an error naming it (the row plan depends on every sample). Each batch is an SFTBatch, a
tuple (input_ids, target_ids, loss_mask, segment_ids, position_ids); `batch.valid_tokens` is the mask sum.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from data_pipeline.shards import CorruptShardError, _load_npy, open_shard, read_index, shard_url

STATE_VERSION = 1
_CACHED_PLANS = 3  # the epoch being read, the next one a batch spills into, and one being planned ahead
_SEED_MASK = (1 << 64) - 1  # SeedSequence takes non-negative entropy: map a negative seed into range


class SFTBatch(NamedTuple):
    """One rank's micro-batch, every tensor (B, T)."""

    input_ids: torch.Tensor  # long
    target_ids: torch.Tensor  # long; 0 where loss_mask is 0 on padding
    loss_mask: torch.Tensor  # float32 0/1: 1 on assistant tokens and the end token closing each turn
    segment_ids: torch.Tensor  # int32: piece number in its row; padding has the row's piece count
    position_ids: torch.Tensor  # long: position within the piece, 0 on padding

    @property
    def valid_tokens(self) -> int:
        """Targets that count in the loss (the loss mask's sum)."""
        return int(self.loss_mask.sum().item())


@dataclass(frozen=True)
class SFTShard:
    """A loaded SFT shard: its samples' ids and masks concatenated, and where each sample starts."""

    tokens: np.ndarray  # (n_tokens,) uint16/uint32
    mask: np.ndarray  # (n_tokens,) uint8
    starts: np.ndarray  # (n_samples + 1,) int64, starts[-1] == n_tokens


@dataclass(frozen=True)
class _EpochPlan:
    """One epoch's rows: the sample order and where each row's pieces start in it."""

    order: np.ndarray  # (n_samples,) int64 global sample indices in emission order
    row_start: np.ndarray  # (n_rows + 1,) int64 offsets into order

    @property
    def n_rows(self) -> int:
        return self.row_start.size - 1


def pack_rows(piece_lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """Greedy packing in order: the (n_rows + 1,) offsets of each row's first piece (every piece <= seq_len)."""
    starts, fill = [0], 0
    for i, p in enumerate(piece_lengths.tolist()):
        if fill + p > seq_len:
            starts.append(i)
            fill = 0
        fill += p
    starts.append(len(piece_lengths))
    return np.array(starts, dtype=np.int64)


# --- shards ---------------------------------------------------------------------------------------------
def _group_members(data: bytes) -> list[dict[str, bytes]]:
    """The tar's samples in order: {suffix: bytes} per key (key = member name up to its first dot)."""
    samples: OrderedDict[str, dict[str, bytes]] = OrderedDict()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            if info.isreg():
                key, _, suffix = info.name.partition(".")
                samples.setdefault(key, {})[suffix] = tar.extractfile(info).read()
    return list(samples.values())


def load_sft_shard(url: str, expected_sha256: str | None, lengths: list[int] | None = None) -> SFTShard:
    """Read a shard whole; CorruptShardError if its sha256, members or sample lengths are not as expected."""
    stream = open_shard(url)
    try:
        data = stream.read()
    finally:
        stream.close()
    sha256 = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise CorruptShardError(url, f"sha256 {sha256} != expected {expected_sha256}")
    try:
        samples = _group_members(data)
        tokens = [_load_npy(s["tokens.npy"]) for s in samples]
        masks = [_load_npy(s["mask.npy"]) for s in samples]
    except (tarfile.TarError, KeyError, ValueError, EOFError, OSError) as e:
        raise CorruptShardError(url, f"not an SFT shard ({type(e).__name__}: {e})") from e
    sizes = [t.size for t in tokens]
    if [m.size for m in masks] != sizes or not samples:
        raise CorruptShardError(url, "no samples, or a mask whose length is not its tokens'")
    if lengths is not None and sizes != list(lengths):
        raise CorruptShardError(url, "sample lengths differ from index.json's")
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return SFTShard(np.concatenate(tokens), np.concatenate(masks).astype(np.uint8), starts)


class SFTStream:
    """Iterator of SFTBatch (B, T) from an SFT prepared directory: packed, dp-layout invariant, resumable."""

    def __init__(
        self,
        prepared_dir: str,
        split: str,
        seq_len: int,
        micro_batch_size: int,
        seed: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        shuffle: bool = True,
        loop: bool = True,
        packing: bool = True,
    ) -> None:
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len and micro_batch_size must be >= 1, got {seq_len}, {micro_batch_size}")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank must be in [0, {dp_world_size}), got {dp_rank}")
        self.dir, self.split = str(prepared_dir), split
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.seed, self.dp_rank, self.dp_world_size = seed, dp_rank, dp_world_size
        self.shuffle, self.loop, self.packing = shuffle, loop, packing
        self._read_index()
        self._plans: OrderedDict[int, _EpochPlan] = OrderedDict()
        self._shards: dict[int, SFTShard] = {}
        self._epoch, self._row, self._batches = 0, 0, 0

    def _read_index(self) -> None:
        index = read_index(self.dir)
        if index.get("kind") != "sft":
            raise ValueError(
                f"{self.dir!r} is not an SFT prepared directory (index kind {index.get('kind')!r}): "
                "prepare it with python -m data_pipeline.prepare_sft"
            )
        if self.split not in index["splits"]:
            raise ValueError(f"split {self.split!r} not in {self.dir!r} (has {sorted(index['splits'])})")
        self.eot_id, self.fingerprint = int(index["eot_id"]), index["fingerprint"]
        self._shard_records = index["splits"][self.split]["shards"]
        lengths = [np.asarray(s["lengths"], dtype=np.int64) for s in self._shard_records]
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
        if self.lengths.size == 0 or self.lengths.min() < 2:
            raise ValueError(
                f"the {self.split} split of {self.dir!r} has no samples, or one shorter than 2 tokens"
            )
        # Global sample index -> (shard, sample in shard).
        self._first_sample = np.concatenate([[0], np.cumsum([len(x) for x in lengths])]).astype(np.int64)

    # --- planning (index.json and the seed only) ---------------------------------------------------
    def _plan(self, epoch: int) -> _EpochPlan:
        if epoch in self._plans:
            return self._plans[epoch]
        n = self.lengths.size
        if self.shuffle:
            order = np.random.default_rng([self.seed & _SEED_MASK, epoch]).permutation(n)
        else:
            order = np.arange(n, dtype=np.int64)
        if self.packing:
            row_start = pack_rows(np.minimum(self.lengths[order] - 1, self.seq_len), self.seq_len)
        else:
            row_start = np.arange(n + 1, dtype=np.int64)
        plan = _EpochPlan(order.astype(np.int64), row_start)
        self._plans[epoch] = plan
        if len(self._plans) > _CACHED_PLANS:
            self._plans.popitem(last=False)
        return plan

    @property
    def _step(self) -> int:
        return self.micro_batch_size * self.dp_world_size

    def _advance(self, epoch: int, row: int, n: int) -> tuple[int, int]:
        """The cursor n rows on (loop=True: into the next epochs; then row < that epoch's row count)."""
        row += n
        if not self.loop:
            return epoch, row
        while row >= (n_rows := self._plan(epoch).n_rows):
            epoch, row = epoch + 1, row - n_rows
        return epoch, row

    def rows_in_epoch(self, epoch: int = 0) -> int:
        """Rows of the epoch's plan (packing=False: the number of samples)."""
        return self._plan(epoch).n_rows

    def rows_in_epochs(self, epochs: int) -> int:
        """Rows of epochs 0 .. epochs - 1 together: what `epochs` passes over the split take."""
        return sum(self.rows_in_epoch(epoch) for epoch in range(epochs))

    # --- samples and rows ---------------------------------------------------------------------------
    def _sample(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids and mask of global sample g (its shard loaded on first use and kept)."""
        shard_no = int(np.searchsorted(self._first_sample, g, side="right") - 1)
        if shard_no not in self._shards:
            record = self._shard_records[shard_no]
            url = shard_url(self.dir, record["file"])
            self._shards[shard_no] = load_sft_shard(url, record["sha256"], record["lengths"])
        shard = self._shards[shard_no]
        i = g - int(self._first_sample[shard_no])
        lo, hi = int(shard.starts[i]), int(shard.starts[i + 1])
        return shard.tokens[lo:hi], shard.mask[lo:hi]

    def _fill_row(self, arrays: tuple[np.ndarray, ...], b: int, samples: np.ndarray) -> None:
        """Write the pieces of `samples` into row b of (inputs, targets, mask, segments, positions)."""
        inputs, targets, mask, segments, positions = arrays
        T, at = self.seq_len, 0
        for k, g in enumerate(samples.tolist()):
            ids, m = self._sample(g)
            p = min(ids.size - 1, T)
            inputs[b, at : at + p] = ids[:p]
            targets[b, at : at + p] = ids[1 : p + 1]
            mask[b, at : at + p] = m[1 : p + 1]
            segments[b, at : at + p] = k
            positions[b, at : at + p] = np.arange(p)
            at += p
        segments[b, at:] = len(samples)  # padding: its own segment, input eot, target 0, mask 0, position 0

    def _batch(self, rows: list[tuple[int, int] | None]) -> SFTBatch:
        """The batch of the given (epoch, row)s; None is a row of padding only."""
        B, T = len(rows), self.seq_len
        inputs = np.full((B, T), self.eot_id, dtype=np.int64)
        targets, positions = np.zeros((B, T), dtype=np.int64), np.zeros((B, T), dtype=np.int64)
        mask, segments = np.zeros((B, T), dtype=np.float32), np.zeros((B, T), dtype=np.int32)
        arrays = (inputs, targets, mask, segments, positions)
        for b, where in enumerate(rows):
            if where is not None:
                epoch, row = where
                plan = self._plan(epoch)
                self._fill_row(arrays, b, plan.order[plan.row_start[row] : plan.row_start[row + 1]])
        return SFTBatch(*(torch.from_numpy(a) for a in arrays))

    def _rank_rows(self) -> list[tuple[int, int] | None]:
        """(epoch, row) of this rank's B rows of the current global step (None past the end, loop=False)."""
        B = self.micro_batch_size
        epoch, row = self._advance(self._epoch, self._row, self.dp_rank * B)
        rows: list[tuple[int, int] | None] = []
        for _ in range(B):
            rows.append((epoch, row) if row < self._plan(epoch).n_rows else None)
            epoch, row = self._advance(epoch, row, 1)
        return rows

    def __iter__(self) -> SFTStream:
        return self

    def __next__(self) -> SFTBatch:
        if not self.loop and self._row >= self._plan(self._epoch).n_rows:
            raise StopIteration
        batch = self._batch(self._rank_rows())
        self._epoch, self._row = self._advance(self._epoch, self._row, self._step)
        self._batches += 1
        return batch

    # --- resume --------------------------------------------------------------------------------------
    def _layout(self) -> dict:
        """What a state must have been saved with to be loaded here (dp size and batch size are free)."""
        return {
            "kind": "sft",
            "split": self.split,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "packing": self.packing,
            "fingerprint": self.fingerprint,
        }

    def state_dict(self) -> dict:
        """JSON-able position after the last batch: the same on every rank, valid at any dp size."""
        return {
            "version": STATE_VERSION,
            **self._layout(),
            "epoch": self._epoch,
            "row": self._row,
            "batches": self._batches,
            "dp_world_size": self.dp_world_size,  # informative
            "micro_batch_size": self.micro_batch_size,  # informative
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue the global row sequence from state_dict() of a stream over the same data and layout."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"SFTStream state version {state.get('version')!r}, expected {STATE_VERSION}")
        for key, mine in self._layout().items():
            if state.get(key) != mine:
                raise ValueError(
                    f"SFTStream state was saved with {key}={state.get(key)!r}, this stream has {mine!r}"
                )
        epoch, row, batches = int(state["epoch"]), int(state["row"]), int(state["batches"])
        if epoch < 0 or row < 0 or batches < 0:
            raise ValueError(f"SFTStream state epoch={epoch}, row={row}, batches={batches}: negative")
        if self.loop and row >= self._plan(epoch).n_rows:
            raise ValueError(f"SFTStream state row={row} out of range for epoch {epoch}")
        self._epoch, self._row, self._batches = epoch, row, batches


def sft_eval_batches(
    prepared_dir: str, seq_len: int, micro_batch_size: int, max_batches: int
) -> list[SFTBatch]:
    """The first max_batches packed batches of the val split, unshuffled: the same on every call and rank."""
    stream = SFTStream(prepared_dir, "val", seq_len, micro_batch_size, seed=0, shuffle=False, loop=False)
    batches = []
    for batch in stream:
        batches.append(batch)
        if len(batches) == max_batches:
            break
    return batches
