"""TokenStream: packed (inputs, targets) batches from the prepared shards, with exact resume.

Per data-parallel rank the token stream is: for epoch 0, 1, ...: the epoch's shard order (shuffled with
`random.Random(seed + epoch)`, then `order[dp_rank::dp_world_size]`), each shard's documents in the order
they were written, each document's tokens (ending in EOT). Rows are windows of seq_len + 1 tokens taken
with stride seq_len, so every token after the first is a target exactly once and a batch starts on the
token the previous batch's last row ended on.

The resume state is the position of the next batch's first token: (epoch, shard position in the epoch's
order, sample index in that shard, token offset in that sample). Nothing else needs saving: the tokens
left over after a batch are the ones at that position (the "carry" is re-read from the shard on resume).
"""

from __future__ import annotations

import io
import logging
import random
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from data_pipeline.prepare import load_index

logger = logging.getLogger(__name__)

STATE_VERSION = 1
_CACHED_SHARDS = 2  # the current shard and the one a batch spills into


@dataclass(frozen=True)
class _Shard:
    """A loaded shard: its documents concatenated, and where each document starts."""

    tokens: np.ndarray  # (n_tokens,) uint16/uint32
    starts: np.ndarray  # (n_docs,) int64, starts[0] == 0


def _load_shard(path: Path) -> _Shard:
    # webdataset's own tar reader: samples grouped by key, in the order they were written.
    docs = []
    for sample in wds.tariterators.tarfile_samples([{"url": str(path)}]):
        if "tokens.npy" not in sample:
            raise ValueError(f"shard {path}: sample {sample['__key__']!r} has no tokens.npy")
        docs.append(np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False))
    if not docs:
        raise ValueError(f"shard {path} holds no samples")
    starts = np.cumsum([0] + [d.size for d in docs[:-1]], dtype=np.int64)
    return _Shard(tokens=np.concatenate(docs), starts=starts)


class TokenStream:
    """Infinite (or one-epoch, loop=False) iterator of (inputs, targets) LongTensors [micro_batch_size, seq_len]."""

    def __init__(
        self,
        prepared_dir: str,
        split: str,
        seq_len: int,
        micro_batch_size: int,
        seed: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        loop: bool = True,
        shuffle: bool = True,
    ) -> None:
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len and micro_batch_size must be >= 1, got {seq_len}, {micro_batch_size}")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank must be in [0, {dp_world_size}), got {dp_rank}")
        self.dir = Path(prepared_dir)
        index = load_index(self.dir)
        if split not in index["splits"]:
            raise ValueError(f"split {split!r} not in {str(self.dir)!r} (has {sorted(index['splits'])})")
        self.shard_files = [s["file"] for s in index["splits"][split]["shards"]]
        if len(self.shard_files) < dp_world_size:
            raise ValueError(
                f"the {split} split of {str(self.dir)!r} has {len(self.shard_files)} shards, fewer than "
                f"dp_world_size={dp_world_size}: lower data.shard_max_tokens and prepare again"
            )
        self.fingerprint = index["fingerprint"]
        self.split, self.seq_len, self.micro_batch_size, self.seed = split, seq_len, micro_batch_size, seed
        self.dp_rank, self.dp_world_size, self.loop, self.shuffle = dp_rank, dp_world_size, loop, shuffle
        # Position of the next batch's first token: (epoch, shard position, flat token offset in that shard).
        self._epoch, self._shard_pos, self._offset = 0, 0, 0
        self._cache: OrderedDict[str, _Shard] = OrderedDict()

    # --- shard order and loading -------------------------------------------------------------------
    def _epoch_shards(self, epoch: int) -> list[str]:
        order = list(self.shard_files)
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order[self.dp_rank :: self.dp_world_size]

    def _shard(self, name: str) -> _Shard:
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        shard = _load_shard(self.dir / name)
        self._cache[name] = shard
        if len(self._cache) > _CACHED_SHARDS:
            self._cache.popitem(last=False)
        return shard

    # --- reading -----------------------------------------------------------------------------------
    def _read(self, pos: tuple[int, int, int], n: int) -> tuple[np.ndarray, tuple[int, int, int]] | None:
        """n tokens from pos and the position after them, or None if loop=False and the epoch ends first."""
        epoch, shard_pos, offset = pos
        pieces = []
        while n > 0:
            names = self._epoch_shards(epoch)
            if shard_pos == len(names):
                if not self.loop:
                    return None
                epoch, shard_pos = epoch + 1, 0
                continue
            tokens = self._shard(names[shard_pos]).tokens
            take = min(n, tokens.size - offset)
            pieces.append(tokens[offset : offset + take])
            n -= take
            offset += take
            if offset == tokens.size:
                shard_pos, offset = shard_pos + 1, 0
        return np.concatenate(pieces) if len(pieces) != 1 else pieces[0], (epoch, shard_pos, offset)

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.micro_batch_size, self.seq_len
        pos = (self._epoch, self._shard_pos, self._offset)
        body = self._read(pos, B * T)
        if body is None:
            raise StopIteration
        tokens, next_pos = body
        last = self._read(next_pos, 1)  # the last row's final target; also the next batch's first input
        if last is None:
            raise StopIteration
        buf = torch.from_numpy(np.concatenate([tokens, last[0]]).astype(np.int64))  # (B*T + 1,)
        inputs = buf[:-1].view(B, T)
        targets = buf[1:].unfold(0, T, T)  # (B, T): row b is buf[b*T + 1 : b*T + T + 1]
        self._epoch, self._shard_pos, self._offset = next_pos
        return inputs, targets.contiguous()

    # --- resume ------------------------------------------------------------------------------------
    def _layout(self) -> dict:
        return {
            "split": self.split,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "dp_rank": self.dp_rank,
            "dp_world_size": self.dp_world_size,
            "fingerprint": self.fingerprint,
        }

    def state_dict(self) -> dict:
        """JSON-serialisable position right after the last batch returned."""
        names = self._epoch_shards(self._epoch)
        sample = offset = 0
        if self._shard_pos < len(names):
            starts = self._shard(names[self._shard_pos]).starts
            sample = int(np.searchsorted(starts, self._offset, side="right") - 1)
            offset = int(self._offset - starts[sample])
        return {
            "version": STATE_VERSION,
            **self._layout(),
            "micro_batch_size": self.micro_batch_size,  # informative: positions are in tokens
            "epoch": self._epoch,
            "shard_pos": self._shard_pos,
            "sample": sample,
            "offset_in_sample": offset,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict(); it must come from the same split, seq_len, seed and dp layout."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"TokenStream state version {state.get('version')!r}, expected {STATE_VERSION}")
        for key, mine in self._layout().items():
            if state.get(key) != mine:
                raise ValueError(
                    f"TokenStream state was saved with {key}={state.get(key)!r}, this stream has {key}={mine!r}"
                )
        epoch, shard_pos = int(state["epoch"]), int(state["shard_pos"])
        names = self._epoch_shards(epoch)
        if not 0 <= shard_pos <= len(names):
            raise ValueError(f"TokenStream state shard_pos={shard_pos} out of range [0, {len(names)}]")
        offset = 0
        if shard_pos < len(names):
            shard = self._shard(names[shard_pos])
            sample, in_sample = int(state["sample"]), int(state["offset_in_sample"])
            if not 0 <= sample < shard.starts.size:
                raise ValueError(
                    f"TokenStream state sample={sample} out of range for shard {names[shard_pos]}"
                )
            offset = int(shard.starts[sample]) + in_sample
            if not 0 <= offset < shard.tokens.size:
                raise ValueError(f"TokenStream state offset_in_sample={in_sample} out of range")
        self._epoch, self._shard_pos, self._offset = epoch, shard_pos, offset


def eval_batches(prepared_dir: str, seq_len: int, micro_batch_size: int, max_batches: int) -> list:
    """The first max_batches (inputs, targets) of the val split, unshuffled: the same on every call and rank."""
    stream = TokenStream(prepared_dir, "val", seq_len, micro_batch_size, seed=0, loop=False, shuffle=False)
    batches = []
    for batch in stream:
        batches.append(batch)
        if len(batches) == max_batches:
            break
    if not batches:
        raise ValueError(
            f"the val split of {prepared_dir!r} is shorter than one batch of {micro_batch_size}x{seq_len + 1} tokens"
        )
    return batches
