"""TokenStream: packed (inputs, targets) batches from the prepared shards, with exact resume.

Each epoch (0, 1, ...) has a shard order: the split's shards in index order, shuffled with
`random.Random(seed + epoch)` when shuffle=True.

shuffle=True (training) is invariant to the data-parallel layout, as in Megatron-LM: there is one global
window sequence, and dp ranks take their slices of each global micro-batch. The epoch's full shard order
(no dp split) is grouped into consecutive blocks of `shuffle_block_shards` shards. A block's token stream
(its shards' documents in the order they were written, each document's tokens ending in EOT) is cut into
windows of seq_len + 1 tokens taken with stride seq_len (window w is tokens [w*T, w*T + T + 1)); the tail of
a block that cannot fill a window is dropped. The windows of block b are emitted in the order of a
permutation drawn from `np.random.default_rng([seed, epoch, b])`; the global sequence is "block 0's
permuted windows, then block 1's, ...", epoch after epoch (loop=True). Each next() is one global
micro-step of G = dp_world_size * micro_batch_size windows starting at the cursor: rank r returns windows
[cursor + r*B, cursor + (r+1)*B) and every rank advances the cursor by G, so a batch may span two blocks
(and, with loop=True, two epochs), and the rank-r batches of a step concatenated in rank order are the
batch a single process with micro_batch_size G would get. Skipping the other ranks' windows is arithmetic
on the cursor: a rank loads only the blocks its own rows come from. With loop=False the stream stops when
the next global micro-step does not fit entirely in the epoch. Every window of an epoch is seen exactly
once in that epoch (by one rank); a batch's rows come from all over a block (a few MB of tokens) rather
than from one source file. Only one or two blocks are in memory. The I/O trade-off: every rank reads every
block it touches in full (nearly every block, as consecutive ranks share blocks), i.e. each rank reads
about the whole corpus per epoch; that is fine for corpora of this size, and a byte-offset index of the
shards (random access to single windows) is the scalable next step. The number of windows of each block
follows from index.json's token counts alone, so the resume state is just (epoch, global window cursor in
the epoch): the same on every rank, and valid at any dp_world_size or micro_batch_size (resuming under
another layout continues the same global sequence); loading it needs no replay.

split_mode="shards" (shuffle=True, for web-scale corpora): each reader reads only its own shards. A reader
is one process (num_workers=0) or one DataLoader worker of a dp rank: reader dp_rank * R + w of
dp_world_size * R, R = max(1, num_workers). The epoch's shuffled shard order is split order[reader::n_readers];
with ranks numbered node-major (rank = node * ranks_per_node + local rank, as torchrun does) this is "by node,
then by rank within the node, then by worker", with no num_nodes/node_rank of its own. A reader packs its own
shards into blocks of `shuffle_block_shards` and emits each block's windows in a permuted order (drawn from
(seed, epoch, block, reader)), micro_batch_size windows per batch. Batches therefore depend on the layout
(dp_world_size, num_workers, micro_batch_size), readers' epochs end at different batches, and with loop=False
readers may give different numbers of batches. A reader's position is a function of the number of batches it
has taken (window counts come from index.json), so the resume state is the number of batches the rank took:
the same on every rank of a synchronous job; it must be loaded under the same layout.

DataLoader workers (num_workers > 0, read through StreamLoader): the stream is an IterableDataset. In global
mode worker w of W produces the rank's batches k with k % W == w (it skips the others' by cursor arithmetic),
so the DataLoader's round-robin yields the same sequence as num_workers=0 and a state resumes at any W. In
shards mode worker w reads its own shards; after n batches worker w has produced n // W + (w < n % W). The
main process cannot read its workers' positions, so StreamLoader derives the state from the batches consumed.

shuffle=False (evaluation): the rank's shards, `order[dp_rank::dp_world_size]`, are read in index order as
one packed token stream; rows are windows of seq_len + 1 tokens taken with stride seq_len, so every token
after the first is a target exactly once and a batch starts on the token the previous batch's last row
ended on. Its resume state is the position of the next batch's first token: (epoch, shard position in the
epoch's order, sample index in that shard, token offset in that sample); the tokens left over after a batch
are re-read from the shard on resume. It needs at least dp_world_size shards.

Every shard is checked against the sha256 that index.json records for it, hashed as its bytes stream through
the decoder (no second read): a mismatch is a corrupt shard like any other, skipped, counted and named in
training, an error naming it in evaluation. (`verify_sha256=False` is there to measure what the check costs:
`python -m data_pipeline.bench`.) index.json's shard names are plain file names of prepared_dir (read_index
refuses anything else), so where shards come from is decided by prepared_dir alone.
"""

from __future__ import annotations

import logging
import multiprocessing
import random
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.config import SPLIT_MODES
from data_pipeline.prepare import TOKENIZER_FILE
from data_pipeline.shards import LoadedShard, SkipCounter, load_shard, open_shard, read_index, shard_url
from data_pipeline.tokenizer import tokenizer_from_json

logger = logging.getLogger(__name__)

STATE_VERSION = 4  # 4: split_mode and the batches taken (the position of a shards-mode stream)
# (3: shuffled streams: a global window cursor, dp layout and batch size not checked)
# (2: shuffled streams resume from (epoch, window); shuffle_block_shards in the layout)
_CACHED_SHARDS = 2  # the current shard and the one a batch spills into
_CACHED_BLOCKS = 2  # the current block and the one a batch spills into
_MAX_EMPTY_EPOCHS = 1000  # consecutive epochs without a window before a looping stream gives up
_SEED_MASK = (1 << 64) - 1  # SeedSequence takes non-negative entropy: map a negative seed into range


@dataclass(frozen=True)
class _EpochLayout:
    """Where the windows of one epoch (shuffle=True) are: per block, its shards and its window count."""

    blocks: list[list[str]]
    first_window: np.ndarray  # (n_blocks + 1,) int64: cumulative window counts, first_window[-1] == total

    @property
    def n_windows(self) -> int:
        return int(self.first_window[-1])


@dataclass(frozen=True)
class _Block:
    """A loaded block: its shards' tokens concatenated, and the order its windows are emitted in."""

    tokens: np.ndarray  # (n_tokens,) uint16/uint32
    order: np.ndarray  # (n_windows,) int64 permutation of the block's window indices


def _read_tokenizer(location: str) -> Tokenizer:
    # tokenizer_from_json, not Tokenizer.from_str: a text's literal "<|endoftext|>" must stay text here as it
    # did when data_pipeline.external counted the tokens (encode_special_tokens is not stored in the JSON).
    with open_shard(shard_url(location, TOKENIZER_FILE)) as handle:
        return tokenizer_from_json(handle.read().decode())


class TokenStream(IterableDataset):
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
        shuffle_block_shards: int = 4,
        split_mode: str = "global",
        num_workers: int = 0,
        verify_sha256: bool = True,
    ) -> None:
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len and micro_batch_size must be >= 1, got {seq_len}, {micro_batch_size}")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank must be in [0, {dp_world_size}), got {dp_rank}")
        if shuffle_block_shards < 1:
            raise ValueError(f"shuffle_block_shards must be >= 1, got {shuffle_block_shards}")
        if split_mode not in SPLIT_MODES:
            raise ValueError(f"split_mode must be one of {SPLIT_MODES}, got {split_mode!r}")
        if num_workers < 0 or (num_workers > 0 and not shuffle):
            raise ValueError(f"num_workers must be >= 0 and is for shuffle=True streams, got {num_workers}")
        # A local directory, a URL prefix (http, s3, ...) or a `pipe:` command template with {shard}.
        self.dir, self.verify_sha256 = prepared_dir, verify_sha256
        index = self._read_split(split)
        if not shuffle and len(self.shard_files) < dp_world_size:
            raise ValueError(
                f"the {split} split of {str(self.dir)!r} has {len(self.shard_files)} shards, fewer than "
                f"dp_world_size={dp_world_size}: lower data.shard_max_tokens and prepare again"
            )
        self.fingerprint = index["fingerprint"]
        self.split, self.seq_len, self.micro_batch_size, self.seed = split, seq_len, micro_batch_size, seed
        self.dp_rank, self.dp_world_size, self.loop, self.shuffle = dp_rank, dp_world_size, loop, shuffle
        self.shuffle_block_shards = shuffle_block_shards
        self.split_mode, self.num_workers = split_mode, num_workers
        self._sharded = shuffle and split_mode == "shards"
        # Readers per rank, and which one this object is (set in a DataLoader worker by __iter__).
        self._readers, self._role, self._in_worker = max(1, num_workers), 0, False
        self._skip_after = 0  # global mode in a worker: the other workers' batches skipped after each batch
        self._batches = 0  # batches this rank has taken (all its workers together)
        if self._sharded and len(self.shard_files) < dp_world_size * self._readers:
            raise ValueError(
                f"split_mode='shards' needs at least dp_world_size * max(1, num_workers) = "
                f"{dp_world_size * self._readers} shards; the {split} split of {str(self.dir)!r} has "
                f"{len(self.shard_files)}: lower data.shard_max_tokens and prepare again"
            )
        # shuffle=False: position of the next batch's first token (epoch, shard position, flat token offset).
        # shuffle=True: _epoch and _window, the index of the next global micro-step's first window in the
        # epoch's (global, dp-independent) emission order.
        self._epoch, self._shard_pos, self._offset, self._window = 0, 0, 0, 0
        self._cache: OrderedDict[str, LoadedShard] = OrderedDict()
        # Corrupt training shards are logged, counted and skipped (per process: each worker has its own,
        # mirrored into StreamLoader's shared counts when it sets `worker_skip_counts`).
        self.skips = SkipCounter()
        self.worker_skip_counts = None
        self._blocks: OrderedDict[tuple[int, int], _Block] = OrderedDict()
        self._layouts: OrderedDict[int, _EpochLayout] = OrderedDict()
        for role in range(self._readers if self._sharded else int(shuffle)):
            self._set_role(role)
            if self._layout_of(0).n_windows == 0:
                raise ValueError(
                    f"no block of {shuffle_block_shards} shards of the {split} split of {str(self.dir)!r} "
                    f"(for reader {self._reader} of {self._n_readers}) holds a window of seq_len + 1 = "
                    f"{seq_len + 1} tokens"
                )
        self._set_role(0)

    # --- shard order and loading -------------------------------------------------------------------
    def _read_split(self, split: str) -> dict:
        """Read index.json (its names checked) and take the split's shards, token counts and sha256s."""
        index = read_index(self.dir)
        # Shards indexed by data_pipeline.external hold text: tokenize it as it is read.
        self._load_kwargs = {"tokenizer": _read_tokenizer(self.dir)} if index.get("text_shards") else {}
        if split not in index["splits"]:
            raise ValueError(f"split {split!r} not in {str(self.dir)!r} (has {sorted(index['splits'])})")
        shards = index["splits"][split]["shards"]
        self.shard_files = [s["file"] for s in shards]
        self._shard_tokens = {s["file"]: int(s["n_tokens"]) for s in shards}
        self._shard_sha256 = {s["file"]: s["sha256"] for s in shards}
        return index

    def _load_args(self, name: str) -> tuple[str, dict]:
        """load_shard's arguments for shard `name`: its URL, the tokenizer of text shards, its sha256."""
        sha256 = self._shard_sha256[name] if self.verify_sha256 else None
        return shard_url(self.dir, name), {**self._load_kwargs, "expected_sha256": sha256}

    @property
    def _reader(self) -> int:
        return self.dp_rank * self._readers + self._role

    @property
    def _n_readers(self) -> int:
        return self.dp_world_size * self._readers

    def _set_role(self, role: int) -> None:
        """Read as reader `role` of this rank (shards mode); cached layouts and blocks belong to the old one."""
        if role != self._role:
            self._layouts.clear()
            self._blocks.clear()
        self._role = role

    def _epoch_shards(self, epoch: int) -> list[str]:
        """shuffle=True: the epoch's full shuffled order (global mode) or this reader's part of it (shards
        mode); shuffle=False: this rank's shards."""
        order = list(self.shard_files)
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
            return order[self._reader :: self._n_readers] if self._sharded else order
        return order[self.dp_rank :: self.dp_world_size]

    def _shard(self, name: str) -> LoadedShard:
        # The unshuffled (evaluation) path: a corrupt shard fails loudly rather than shrinking the set.
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        url, kwargs = self._load_args(name)
        shard = load_shard(url, **kwargs)
        self._cache[name] = shard
        if len(self._cache) > _CACHED_SHARDS:
            self._cache.popitem(last=False)
        return shard

    # --- shuffle=True: blocks of shards, windows in permuted order ---------------------------------
    def _layout_of(self, epoch: int) -> _EpochLayout:
        """The epoch's blocks and window counts, from index.json's token counts (nothing is loaded)."""
        if epoch in self._layouts:
            return self._layouts[epoch]
        names, k = self._epoch_shards(epoch), self.shuffle_block_shards
        blocks = [names[i : i + k] for i in range(0, len(names), k)]
        n_tokens = np.array([sum(self._shard_tokens[n] for n in b) for b in blocks], dtype=np.int64)
        n_windows = np.maximum(n_tokens - 1, 0) // self.seq_len  # window w needs tokens up to w*T + T
        layout = _EpochLayout(blocks, np.concatenate([[0], np.cumsum(n_windows)]).astype(np.int64))
        self._layouts[epoch] = layout
        if len(self._layouts) > 2:
            self._layouts.popitem(last=False)
        return layout

    def _window_order(self, epoch: int, block: int, n_windows: int) -> np.ndarray:
        entropy = [self.seed & _SEED_MASK, epoch, block] + ([self._reader + 1] if self._sharded else [])
        rng = np.random.default_rng(entropy)
        return rng.permutation(n_windows)

    def _block(self, epoch: int, block: int) -> _Block:
        key = (epoch, block)
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return self._blocks[key]
        layout = self._layout_of(epoch)
        names = layout.blocks[block]
        loaded_shards = [self.skips.load(url, **kwargs) for url, kwargs in map(self._load_args, names)]
        pieces = [shard.tokens for shard in loaded_shards if shard is not None]
        if not pieces:
            raise ValueError(f"every shard of the block {names} is corrupt")
        tokens = np.concatenate(pieces) if len(pieces) != 1 else pieces[0]
        n_windows = int(layout.first_window[block + 1] - layout.first_window[block])
        order = self._window_order(epoch, block, n_windows)
        if len(pieces) == len(names):
            expected = sum(self._shard_tokens[n] for n in names)
            if tokens.size != expected:
                raise ValueError(f"shards {names} hold {tokens.size} tokens, index.json says {expected}")
        else:
            # A corrupt shard was skipped: serve the block's good windows in place of the planned ones, so
            # batch shapes, cursors and resume states stay those index.json implies, on every rank alike.
            good_windows = max(tokens.size - 1, 0) // self.seq_len
            if good_windows == 0:
                raise ValueError(f"the readable shards of the block {names} hold no window of {self.seq_len + 1}")
            order = order % good_windows
        loaded = _Block(tokens=tokens, order=order)
        self._blocks[key] = loaded
        if len(self._blocks) > _CACHED_BLOCKS:
            self._blocks.popitem(last=False)
        return loaded

    @property
    def _step(self) -> int:
        """Windows the cursor moves per batch: the global micro-step, or this reader's own batch."""
        return self.micro_batch_size * (1 if self._sharded else self.dp_world_size)

    def _advance(self, epoch: int, window: int, n: int) -> tuple[int, int]:
        """The cursor n windows on (loop=True: across epochs, as _next_shuffled walks them); no data is read."""
        if not self.loop:  # batches never span epochs: past the end, the next batch raises StopIteration
            return epoch, window + n
        empty_epochs = 0
        while window + n > (n_windows := self._layout_of(epoch).n_windows):
            empty_epochs = empty_epochs + 1 if n_windows == 0 else 0
            if empty_epochs > _MAX_EMPTY_EPOCHS:
                raise RuntimeError(
                    f"{_MAX_EMPTY_EPOCHS} epochs in a row hold no window of {self.seq_len + 1} tokens"
                )
            n -= max(n_windows - window, 0)
            epoch, window = epoch + 1, 0
        return epoch, window + n

    def _seek_reader(self) -> None:
        """Shards mode: this reader's cursor after its share of the rank's self._batches batches."""
        n, r = divmod(self._batches, self._readers)
        own = n + (self._role < r)
        self._epoch, self._window = self._advance(0, 0, own * self.micro_batch_size)

    def _next_shuffled(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, step = self.micro_batch_size, self.seq_len, self._step
        # This reader's slice of the global micro-step (global mode), or all of its own batch (shards mode).
        lo, hi = (0, B) if self._sharded else (self.dp_rank * B, (self.dp_rank + 1) * B)
        epoch, window = self._epoch, self._window
        if not self.loop and window + step > self._layout_of(epoch).n_windows:
            raise StopIteration  # the global micro-step does not fit in the epoch: no rank gets a batch
        rows, empty_epochs, done = [], 0, 0  # done: windows of the global micro-step walked past
        offsets = np.arange(T + 1, dtype=np.int64)
        while done < step:
            layout = self._layout_of(epoch)
            if window >= layout.n_windows:
                empty_epochs = empty_epochs + 1 if layout.n_windows == 0 else 0
                if empty_epochs > _MAX_EMPTY_EPOCHS:
                    raise RuntimeError(
                        f"{_MAX_EMPTY_EPOCHS} epochs in a row hold no window of {T + 1} tokens"
                    )
                epoch, window = epoch + 1, 0
                continue
            block = int(np.searchsorted(layout.first_window, window, side="right") - 1)
            start, end = int(layout.first_window[block]), int(layout.first_window[block + 1])
            take = min(step - done, end - window)
            # The part of this run of windows [done, done + take) of the step that is this rank's [lo, hi):
            # only then is the block loaded; other ranks' windows are skipped by moving the cursor.
            first_mine, end_mine = max(done, lo), min(done + take, hi)
            if first_mine < end_mine:
                loaded = self._block(epoch, block)
                i = window - start + first_mine - done
                # The first token of each of this rank's windows here, then a (n, T + 1) gather.
                first = loaded.order[i : i + end_mine - first_mine] * T
                rows.append(loaded.tokens[first[:, None] + offsets])
            done += take
            window += take
        buf = torch.from_numpy((np.concatenate(rows) if len(rows) != 1 else rows[0]).astype(np.int64))
        self._epoch, self._window = self._advance(epoch, window, self._skip_after * step)
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()

    # --- shuffle=False: one packed stream ----------------------------------------------------------
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

    def _next_sequential(self) -> tuple[torch.Tensor, torch.Tensor]:
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

    def __iter__(self) -> TokenStream:
        info = get_worker_info()
        if info is None:
            return self
        # In DataLoader worker info.id: a copy of the stream at the rank's position after self._batches.
        if info.num_workers != self.num_workers:
            raise ValueError(
                f"TokenStream built for num_workers={self.num_workers} read by {info.num_workers}"
            )
        self._in_worker = True
        if self.worker_skip_counts is not None:
            self.skips.mirror_to(self.worker_skip_counts, info.id)
        if self._sharded:
            # The DataLoader asks worker 0 first: it takes over the role whose turn is next.
            self._set_role((info.id + self._batches) % self._readers)
            self._seek_reader()
        else:
            self._skip_after = self.num_workers - 1
            self._epoch, self._window = self._advance(self._epoch, self._window, info.id * self._step)
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.num_workers > 0 and not self._in_worker:
            raise RuntimeError(
                f"a TokenStream with num_workers={self.num_workers} is read through StreamLoader"
            )
        batch = self._next_shuffled() if self.shuffle else self._next_sequential()
        self._batches += 1
        return batch

    def _consumed(self, n: int) -> None:
        """StreamLoader, in the main process: n more batches were taken from the workers (arithmetic only)."""
        self._batches += n
        if not self._sharded:
            self._epoch, self._window = self._advance(self._epoch, self._window, n * self._step)

    # --- resume ------------------------------------------------------------------------------------
    def _layout(self) -> dict:
        """What a state must have been saved with to be loaded here."""
        layout = {
            "split": self.split,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_block_shards": self.shuffle_block_shards,
            "split_mode": self.split_mode,
            "fingerprint": self.fingerprint,
        }
        if self._sharded:  # the rank's batch count: the readers' shards and windows follow from the layout
            return {**layout, "dp_world_size": self.dp_world_size, "micro_batch_size": self.micro_batch_size}
        if self.shuffle:  # a global window cursor: valid at any dp layout, micro-batch size and worker count
            return layout
        return {**layout, "dp_rank": self.dp_rank, "dp_world_size": self.dp_world_size}

    def state_dict(self) -> dict:
        """JSON-serialisable position right after the last batch returned.

        shuffle=True: the same on every dp rank (the global window cursor, or in shards mode the batches taken).
        """
        state = {
            "version": STATE_VERSION,
            # Informative unless _layout checks them (shards mode, shuffle=False).
            "dp_world_size": self.dp_world_size,
            "micro_batch_size": self.micro_batch_size,
            "num_workers": self.num_workers,
            "batches": self._batches,
            **self._layout(),
        }
        if self._sharded:
            return state
        state["epoch"] = self._epoch
        if self.shuffle:
            return {**state, "window": self._window}
        names = self._epoch_shards(self._epoch)
        sample = offset = 0
        if self._shard_pos < len(names):
            starts = self._shard(names[self._shard_pos]).starts
            sample = int(np.searchsorted(starts, self._offset, side="right") - 1)
            offset = int(self._offset - starts[sample])
        return {**state, "shard_pos": self._shard_pos, "sample": sample, "offset_in_sample": offset}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict() of the same split, seq_len, seed, shuffle, block size and data.

        shuffle=True: from any dp layout, micro-batch size and worker count (the global sequence continues);
        shards mode: on any dp rank, from the same dp_world_size, micro_batch_size and max(1, num_workers);
        shuffle=False: from the same dp_rank and dp_world_size.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"TokenStream state version {state.get('version')!r}, expected {STATE_VERSION}")
        for key, mine in self._layout().items():
            if state.get(key) != mine:
                raise ValueError(
                    f"TokenStream state was saved with {key}={state.get(key)!r}, this stream has {key}={mine!r}"
                )
        batches = int(state["batches"])
        if batches < 0:
            raise ValueError(f"TokenStream state batches={batches} is negative")
        if self._sharded:
            saved = int(state["num_workers"])
            if max(1, saved) != self._readers:  # 0 and 1 worker: one reader per rank, the same data
                raise ValueError(
                    f"TokenStream state was saved with num_workers={saved}, this stream has "
                    f"num_workers={self.num_workers}: split_mode='shards' splits the shards by worker, so "
                    f"resume with num_workers={saved}"
                )
            self._batches = batches
            self._seek_reader()
            return
        epoch = int(state["epoch"])
        if epoch < 0:
            raise ValueError(f"TokenStream state epoch={epoch} is negative")
        if self.shuffle:
            window, n_windows = int(state["window"]), self._layout_of(epoch).n_windows
            if not 0 <= window <= n_windows:
                raise ValueError(f"TokenStream state window={window} out of range [0, {n_windows}]")
            self._epoch, self._window, self._batches = epoch, window, batches
            return
        shard_pos = int(state["shard_pos"])
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
        self._epoch, self._shard_pos, self._offset, self._batches = epoch, shard_pos, offset, batches


def _as_tuple(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch  # the DataLoader's default (batch_size=None) turns the tuple into a list


class StreamLoader:
    """A TokenStream's batches read by its num_workers DataLoader worker processes, with exact resume.

    The state is the stream's state after the batches consumed here, computed in this process by cursor
    arithmetic (no data read, no replay); num_workers=0 reads the stream in this process.
    """

    def __init__(self, stream: TokenStream, pin_memory: bool = False, prefetch_factor: int = 2) -> None:
        self.stream, self.num_workers = stream, stream.num_workers
        self._options = dict(pin_memory=pin_memory)
        if self.num_workers > 0:
            self._options["prefetch_factor"] = prefetch_factor
        self._batches = None  # the DataLoader's iterator, started on the first batch
        # Corrupt shards the workers skipped: each worker writes its count into its slot (shared memory);
        # the counts of workers already stopped (close) are carried in _skips_before.
        self._worker_skips = multiprocessing.Array("q", self.num_workers, lock=False) if self.num_workers else None
        self._skips_before = 0

    @property
    def seq_len(self) -> int:
        return self.stream.seq_len

    @property
    def micro_batch_size(self) -> int:
        return self.stream.micro_batch_size

    @property
    def skipped_shards(self) -> int:
        """Corrupt shards skipped so far, by this process or by its DataLoader workers."""
        if self.num_workers == 0:
            return self.stream.skips.count
        return self._skips_before + sum(self._worker_skips)

    def __iter__(self) -> StreamLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.num_workers == 0:
            return next(self.stream)
        if self._batches is None:
            # Workers get copies of the stream at its position now, and place themselves from it.
            self.stream.worker_skip_counts = self._worker_skips
            loader = DataLoader(
                self.stream,
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_as_tuple,
                **self._options,
            )
            self._batches = iter(loader)
        batch = next(self._batches)
        self.stream._consumed(1)
        return batch

    def close(self) -> None:
        """Stop the workers; the next batch starts new ones at the current position."""
        self._batches = None  # the iterator shuts its workers down when collected
        if self.num_workers > 0:
            self._skips_before += sum(self._worker_skips)
            self._worker_skips[:] = [0] * len(self._worker_skips)

    def state_dict(self) -> dict:
        """The stream's JSON state after the batches taken so far ("batches" counts them)."""
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue from a StreamLoader or TokenStream state (rules of TokenStream.load_state_dict)."""
        self.close()
        self.stream.load_state_dict(state)


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


def skipped_shards(stream) -> int | None:
    """Corrupt-shard skips of a training stream (TokenStream, StreamLoader or MixtureStream) so far, its
    DataLoader workers' included; None for an iterable that is none of these.

    A corrupt shard counts each time a reader skips it: once an epoch, and once for each worker that reads it.
    """
    if isinstance(stream, StreamLoader):
        return stream.skipped_shards
    if isinstance(stream, TokenStream):
        return stream.skips.count
    components = getattr(stream, "streams", None)  # a MixtureStream
    if components is None:
        return None
    counts = [skipped_shards(s) for s in components]
    return None if None in counts else sum(counts)
