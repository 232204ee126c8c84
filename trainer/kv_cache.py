"""Keys and values of the tokens decoded so far, so that each new token costs one position, not the whole prefix.

One preallocated buffer per block, (B, heads, max_len, head_dim), filled left to right. Rows may start with
padding (prompts of different lengths, left-padded to one length): `key_mask` marks the slots that hold real
tokens, and each row's positions count its real tokens only, so a padded prompt decodes exactly as it would
alone. `select` keeps, repeats or reorders rows (beam search, several samples per prompt).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """The decoding state of a batch: per-block keys and values, which slots are real tokens, the next positions."""

    def __init__(self, n_layer: int, batch: int, heads: int, head_dim: int, max_len: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch, heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.key_mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0  # slots filled
        self.max_len = max_len
        self._pending: torch.Tensor | None = None  # real-token mask of the tokens now being added

    def mark_padding(self, real: torch.Tensor) -> None:
        """Before a forward pass: which of its tokens (B, t) are real (False for left padding)."""
        self._pending = real.to(dtype=torch.bool, device=self.key_mask.device)

    def positions(self, new_tokens: int) -> torch.Tensor:
        """Position ids (B, new_tokens) of the tokens about to be added (all real unless `mark_padding` said
        otherwise). Padding gets position 0."""
        if self.length + new_tokens > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; {self.length} are filled, "
                             f"{new_tokens} more do not fit")
        batch = self.next_position.shape[0]
        if self._pending is None or self._pending.shape != (batch, new_tokens):
            self._pending = torch.ones(batch, new_tokens, dtype=torch.bool, device=self.key_mask.device)
        real = self._pending
        counted = self.next_position[:, None] + real.long().cumsum(dim=1) - 1
        return counted.clamp(min=0).masked_fill(~real, 0)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this call's keys and values (B, heads, t, hd) for `layer`; attention of q over every cached token."""
        start, stop = self.length, self.length + k.shape[2]
        self.keys[layer][:, :, start:stop] = k
        self.values[layer][:, :, start:stop] = v
        mask = self._mask(start, stop)
        return F.scaled_dot_product_attention(q, self.keys[layer][:, :, :stop], self.values[layer][:, :, :stop],
                                              attn_mask=mask)

    def _mask(self, start: int, stop: int) -> torch.Tensor:
        """(B, 1, t, stop): query slot i sees real key slots <= i, and always itself (so a padding query, whose
        output is never used, does not attend to nothing)."""
        device = self.key_mask.device
        keys_real = torch.cat([self.key_mask[:, :start], self._pending_mask()], dim=1)  # (B, stop)
        query_slots = torch.arange(start, stop, device=device)[:, None]
        key_slots = torch.arange(stop, device=device)[None, :]
        causal = key_slots <= query_slots  # (t, stop)
        itself = key_slots == query_slots
        return ((causal & keys_real[:, None, :]) | itself)[:, None]

    def _pending_mask(self) -> torch.Tensor:
        if self._pending is None:
            raise RuntimeError("KVCache.positions() must be called before the blocks attend")
        return self._pending

    def advance(self, new_tokens: int) -> None:
        """Every block has stored the new tokens: count them in."""
        real = self._pending_mask()
        self.key_mask[:, self.length:self.length + new_tokens] = real
        self.next_position += real.long().sum(dim=1)
        self.length += new_tokens
        self._pending = None

    def select(self, rows: torch.Tensor) -> None:
        """Keep the batch rows `rows` (indices, repeats allowed), in that order."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.key_mask = self.key_mask.index_select(0, rows)
        self.next_position = self.next_position.index_select(0, rows)
