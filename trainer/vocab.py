"""Vocabulary padding, shared by the model that pads its token table and the cost model that counts it.

Kept free of torch and megatron imports so that `python -m trainer.cost` starts without them.
"""

from __future__ import annotations

import math


def padded_vocab_size(vocab_size: int, multiple: int, tp: int) -> int:
    """Round the vocabulary up so each tensor-parallel shard is a multiple of `multiple` rows."""
    step = multiple * tp
    return int(math.ceil(vocab_size / step) * step)
