"""Dropout on the normalized weights, regenerated identically by the forward loop and the backward kernels.

The keep mask of query row i and key j of head (b, h) is Philox(seed, ((b * Hq + h) * L + i) * S + j)
>= dropout_p; kept weights are scaled by 1 / (1 - dropout_p).
"""

import triton
import triton.language as tl


@triton.jit
def dropout_keep(seed, row_base, i, j, S, dropout_p):
    """Keep mask of a tile of query rows i and keys j (broadcastable global indices, e.g. [BM, 1] and
    [1, BN]) of the head whose rows start at row_base = (b * Hq + h) * L (int64): the Philox uniform at
    offset (row_base + i) * S + j (unique per (b, h, i, j)) is >= dropout_p."""
    return tl.rand(seed, (row_base + i) * S + j) >= dropout_p


@triton.jit(do_not_specialize=["seed"])
def dropout_mask_kernel(Keep, seed, dropout_p, L, S, BM: tl.constexpr, BN: tl.constexpr):
    """The keep mask (B, Hq, L, S) as uint8 (for tests); grid (cdiv(L, BM), cdiv(S, BN), B * Hq)."""
    pid_bh = tl.program_id(2)
    i = (tl.program_id(0) * BM + tl.arange(0, BM))[:, None]                          # [BM, 1]
    j = (tl.program_id(1) * BN + tl.arange(0, BN))[None, :]                          # [1, BN]
    row_base = pid_bh.to(tl.int64) * L
    keep = dropout_keep(seed, row_base, i, j, S, dropout_p)
    tl.store(Keep + (row_base + i) * S + j, keep.to(tl.uint8), mask=(i < L) & (j < S))
