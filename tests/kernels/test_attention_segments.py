"""Attention over packed rows (`segment_ids`): a query sees only earlier keys of its own segment.

The Triton kernel (in Triton's interpreter on the CPU, one 16x16 tile), PyTorch's SDPA with a boolean mask and
the reference against a float64 loop, each other and the defining properties: a packed row is each sample run
alone, and a token's output and gradients never see another segment's values. Shapes stay tiny (T <= 48,
head_dim 16) and dtypes fp32/fp16, as in test_attention_triton.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernels.attention import (
    attention_reference,
    attention_sdpa,
    causal_attention,
    flash_attention,
    flash_attention_forward,
    segment_layout,
)

# Error bound relative to the largest reference value (the reference runs in fp32 on the same rounded inputs),
# as in test_attention_triton.py.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3}
IMPLS = ("triton", "torch_sdpa", "reference")

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_close_to(actual, expected, dtype: torch.dtype, what: str = "", scale: float | None = None) -> None:
    """Max error within TOLERANCE[dtype] x scale (default: the largest expected value)."""
    assert actual.shape == expected.shape, what
    scale = scale or expected.abs().max().item() or 1.0
    error = (actual.float() - expected.float()).abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"{what}: max error {error:.3g} vs scale {scale:.3g} for {dtype}"


def make_qkv(batch, heads, kv_heads, seq_len, head_dim=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, seq_len, head_dim)] + 2 * [(batch, kv_heads, seq_len, head_dim)]
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def grads(fn, inputs, grad_out):
    """Output of fn(*inputs) and the gradients of <output, grad_out> w.r.t. the inputs."""
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = fn(*inputs)
    out.backward(grad_out)
    return out.detach(), [x.grad for x in inputs]


def from_lengths(*rows: list[int]) -> torch.Tensor:
    """(B, T) ids from each row's segment lengths; ids are arbitrary labels (here 7, 10, 13, ...)."""
    return torch.stack([torch.cat([torch.full((n,), 7 + 3 * s) for s, n in enumerate(r)]) for r in rows])


def random_lengths(seq_len: int, gen: torch.Generator, longest: int = 12) -> list[int]:
    lengths = []
    while sum(lengths) < seq_len:
        lengths.append(min(int(torch.randint(1, longest + 1, (1,), generator=gen)), seq_len - sum(lengths)))
    return lengths


def attention_loop(q, k, v, segment_ids):
    """Float64, one query at a time: query t of row b sees keys j <= t with segment_ids[b, j] == segment_ids[b, t]."""
    q, k, v = q.double(), k.double(), v.double()
    k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for t in range(q.shape[2]):
            keys = torch.nonzero(segment_ids[b, : t + 1] == segment_ids[b, t]).flatten()
            scores = q[b, :, t : t + 1] @ k[b, :, keys].transpose(-2, -1) / math.sqrt(q.shape[-1])
            out[b, :, t : t + 1] = torch.softmax(scores, dim=-1) @ v[b, :, keys]
    return out


# Layouts over T = 37 (two full 16-row tiles and a ragged one), two rows each.
LAYOUTS = {
    # row 1: a segment starting on a tile boundary (16), one on the last key of a tile (31)
    "several": from_lengths([5, 1, 1, 12, 18], [16, 15, 6]),
    "singletons": from_lengths([1] * 37, [36, 1]),  # every token alone; a last token alone
    "one_segment": from_lengths([37], [37]),
    "random": from_lengths(*(random_lengths(37, torch.Generator().manual_seed(s)) for s in (1, 2))),
    # Not sorted, segments not contiguous: the kernels must mask by id, not by runs.
    "unsorted": torch.randint(0, 3, (2, 37), generator=torch.Generator().manual_seed(3)),
}


def check_impls_against_reference(q, k, v, segment_ids, dtype, impls=("triton", "torch_sdpa")):
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref, ref_grads = grads(lambda *x: attention_reference(*x, segment_ids), [x.float() for x in (q, k, v)],
                           grad_out.float())
    for impl in impls:
        out, got = grads(lambda *x, impl=impl: causal_attention(*x, impl, segment_ids=segment_ids), (q, k, v),
                         grad_out)
        assert out.dtype == dtype
        for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *got), (ref, *ref_grads), strict=True):
            assert_close_to(a, b, dtype, f"{impl} {name}")


def test_reference_matches_a_float64_loop():
    q, k, v = make_qkv(2, 4, 2, 37)
    for name, ids in LAYOUTS.items():
        assert_close_to(attention_reference(q, k, v, ids), attention_loop(q, k, v, ids).float(), torch.float32, name)


@pytest.mark.parametrize(
    ("layout", "dtype"), [(name, torch.float32) for name in LAYOUTS] + [("several", torch.float16)]
)
def test_kernel_and_sdpa_match_reference(layout, dtype):
    impls = ("triton", "torch_sdpa") if dtype == torch.float32 else ("triton",)
    check_impls_against_reference(*make_qkv(2, 2, 2, 37, dtype=dtype), LAYOUTS[layout], dtype, impls)


@pytest.mark.parametrize("seed", [4, 5])
def test_random_layouts_at_48_tokens(seed):
    gen = torch.Generator().manual_seed(seed)
    ids = from_lengths(*(random_lengths(48, gen, longest=20) for _ in range(2)))
    check_impls_against_reference(*make_qkv(2, 2, 2, 48, seed=seed), ids, torch.float32)


@pytest.mark.parametrize(("kv_heads", "dtype"), [(2, torch.float32), (1, torch.float32), (2, torch.float16)])
def test_grouped_query_attention(kv_heads, dtype):
    impls = ("triton", "torch_sdpa") if dtype == torch.float32 else ("triton",)
    ids = from_lengths([3, 20, 1, 9], [33])
    check_impls_against_reference(*make_qkv(2, 4, kv_heads, 33, dtype=dtype), ids, dtype, impls)


@pytest.mark.parametrize("impl", IMPLS)
def test_one_segment_per_row_is_the_unsegmented_path(impl):
    q, k, v = make_qkv(2, 2, 2, 37)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    plain = grads(lambda *x: causal_attention(*x, impl), (q, k, v), grad_out)
    segmented = grads(lambda *x: causal_attention(*x, impl, segment_ids=LAYOUTS["one_segment"]), (q, k, v),
                      grad_out)
    for a, b in zip((plain[0], *plain[1]), (segmented[0], *segmented[1]), strict=True):
        if impl == "torch_sdpa":  # is_causal and a boolean mask take different CPU kernels
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:  # the kernel visits the same blocks in the same order: bit for bit
            assert torch.equal(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_packed_row_is_each_sample_attended_alone(impl):
    rows = [[7, 1, 19, 9, 12], [16, 25, 7]]  # T = 48
    ids = from_lengths(*rows)
    q, k, v = make_qkv(2, 2, 1, 48)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    out, packed_grads = grads(lambda *x: causal_attention(*x, impl, segment_ids=ids), (q, k, v), grad_out)
    # Errors relative to each whole tensor: a 1-token sample's dq is 0 up to rounding (softmax of one score).
    scales = [x.abs().max().item() for x in (out, *packed_grads)]
    for b, lengths in enumerate(rows):
        start = 0
        for n in lengths:
            part = slice(start, start + n)
            alone, alone_grads = grads(lambda *x: causal_attention(*x, impl),
                                       [x[b : b + 1, :, part] for x in (q, k, v)], grad_out[b : b + 1, :, part])
            what = f"{impl} row {b} tokens {part.start}:{part.stop}"
            for name, packed, want, scale in zip(("out", "dq", "dk", "dv"), (out, *packed_grads),
                                                 (alone, *alone_grads), scales, strict=True):
                assert_close_to(packed[b : b + 1, :, part], want, torch.float32, f"{what} {name}", scale)
            start += n


@pytest.mark.parametrize("impl", IMPLS)
def test_other_segments_values_never_reach_a_token(impl):
    ids = from_lengths([9, 17, 7, 15], [20, 28])  # T = 48; watch row 0, tokens 9..25
    watched = torch.zeros(2, 1, 48, 1, dtype=torch.bool)
    watched[0, :, 9:26] = True
    q, k, v = make_qkv(2, 2, 2, 48)
    # Gradients flow in only through the watched tokens' outputs.
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)) * watched
    changed = [torch.where(watched, x, y) for x, y in zip((q, k, v), make_qkv(2, 2, 2, 48, seed=9), strict=True)]
    fn = lambda *x: causal_attention(*x, impl, segment_ids=ids)  # noqa: E731
    out, grad = grads(fn, (q, k, v), grad_out)
    out_changed, grad_changed = grads(fn, changed, grad_out)
    assert torch.equal(out[0, :, 9:26], out_changed[0, :, 9:26]), "another segment's values changed the output"
    for name, a, b in zip(("dq", "dk", "dv"), grad, grad_changed, strict=True):
        assert torch.equal(a[0, :, 9:26], b[0, :, 9:26]), f"{name}: another segment's values changed it"
        # and the watched outputs send no gradient to any other token's q, k or v
        assert torch.equal(a * ~watched, torch.zeros_like(a)), f"{name}: gradient leaked to another segment"
        assert torch.equal(b * ~watched, torch.zeros_like(b)), f"{name}: gradient leaked to another segment"


def test_saved_log_sum_exp_covers_only_the_segment():
    ids = LAYOUTS["several"]
    q, k, v = make_qkv(2, 4, 2, 37)
    _, lse = flash_attention_forward(q, k, v, segment_ids=ids)
    scores = (q @ k.repeat_interleave(2, dim=1).transpose(-2, -1)) / math.sqrt(16)
    allowed = torch.ones(37, 37, dtype=torch.bool).tril() & (ids[:, :, None] == ids[:, None, :])[:, None]
    torch.testing.assert_close(lse, torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), -1),
                               rtol=1e-5, atol=1e-5)


def test_non_causal_kernel_with_segments_matches_sdpa():
    ids = LAYOUTS["several"]
    inputs = make_qkv(2, 2, 2, 37)
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1))
    mask = (ids[:, :, None] == ids[:, None, :])[:, None]  # whole segment, both directions
    out, got = grads(lambda *x: flash_attention(*x, causal=False, scale=0.3, segment_ids=ids), inputs, grad_out)
    ref, want = grads(lambda *x: F.scaled_dot_product_attention(*x, attn_mask=mask, scale=0.3), inputs, grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *got), (ref, *want), strict=True):
        assert_close_to(a, b, torch.float32, name)


def test_ids_are_compared_whole_not_truncated_to_32_bits():
    ids = torch.tensor([[0] * 10 + [2**32] * 10 + [2**40 + 1] * 11])  # equal in their low 32 bits
    check_impls_against_reference(*make_qkv(1, 2, 2, 31), ids, torch.float32)
    assert segment_layout(ids, torch.empty(1, 2, 31, 16)).ids.dtype == torch.int64


def test_segment_bounds_are_runs_for_sorted_rows_and_the_whole_row_otherwise():
    ids = torch.tensor([[4, 4, 5, 9, 9, 9], [1, 1, 2, 2, 1, 1], [3, 3, 3, 3, 3, 3]], dtype=torch.int16)
    layout = segment_layout(ids, torch.empty(3, 1, 6, 16))
    assert layout.ids.dtype == torch.int64 and torch.equal(layout.ids, ids.long())
    assert layout.first.tolist() == [[0, 0, 2, 3, 3, 3], [0] * 6, [0] * 6]
    assert layout.last.tolist() == [[1, 1, 2, 5, 5, 5], [5] * 6, [5] * 6]


def test_bad_segment_ids_raise_naming_them():
    q, k, v = make_qkv(2, 2, 2, 9)
    for impl in IMPLS:
        with pytest.raises(ValueError, match="segment_ids"):
            causal_attention(q, k, v, impl, segment_ids=torch.zeros(2, 8, dtype=torch.long))
        with pytest.raises(ValueError, match="segment_ids must be an integer"):
            causal_attention(q, k, v, impl, segment_ids=torch.zeros(2, 9))


def test_dispatch_passes_segments_to_every_implementation():
    ids = from_lengths([4, 5], [9])
    q, k, v = make_qkv(2, 2, 1, 9)
    want = attention_reference(q, k, v, ids)
    for impl in ("auto", *IMPLS):
        torch.testing.assert_close(causal_attention(q, k, v, impl, segment_ids=ids), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention_sdpa(q, k, v, ids), want, rtol=1e-5, atol=1e-5)
    out = causal_attention(q.requires_grad_(), k, v, "triton", segment_ids=ids)
    assert type(out.grad_fn).__name__ == "FlashAttentionFunctionBackward"
