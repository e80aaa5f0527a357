"""STAGING (moves into kernels/<normalizer>.py once the forward is done): each normalizer's backward
rule as ``@triton.jit`` hooks for ``kernels.backward``.

Per normalizer (see ``backward.BwdHooks``)::

    rows(stat0, stat1, par, aux) -> (r0, r1)        [BM] kernel-form row statistics (preprocess)
    weights(s, r0, r1, MASKED) -> p                 [BM, BN] normalized weights from kernel-unit s
    dscores(p, s, dp, delta, r0, r1) -> ds          [BM, BN] dL/ds_nat (natural score units)
"""

import triton
import triton.language as tl

from .common import LOG2E, safe_inv


@triton.jit
def _lse2(lse):
    """Natural-log lse -> log2 units; an empty row (-inf) becomes +inf so that exp2(s - lse2) = 0."""
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


# ------------------------------------------------------------------ softmax: p = exp2(s - lse2)

@triton.jit
def softmax_rows(stat0, stat1, par, aux):
    return _lse2(stat0), stat0


@triton.jit
def softmax_weights(s, r0, r1, MASKED: tl.constexpr):
    return tl.exp2(s - r0[:, None])


@triton.jit
def softmax_dscores(p, s, dp, delta, r0, r1):
    return p * (dp - delta[:, None])


# ------------------------------------------------------------------ taylor: p = f(s) / Z

@triton.jit
def taylor_rows(stat0, stat1, par, aux):
    return safe_inv(stat0), stat0


@triton.jit
def taylor_weights(s, r0, r1, MASKED: tl.constexpr):
    p = (1.0 + s + 0.5 * s * s) * r0[:, None]
    if MASKED:
        p = tl.where(s == float("-inf"), 0.0, p)
    return p


@triton.jit
def taylor_dscores(p, s, dp, delta, r0, r1):
    fprime = tl.where(s == float("-inf"), 0.0, 1.0 + s)
    return fprime * r0[:, None] * (dp - delta[:, None])


# ------------------------------------------------------------------ entmax15: p = max(z - tau, 0)^2

@triton.jit
def entmax15_rows(stat0, stat1, par, aux):
    return par, tl.zeros_like(par) + 1.0


@triton.jit
def entmax15_weights(s, r0, r1, MASKED: tl.constexpr):
    g = tl.maximum(s - r0[:, None], 0.0) * r1[:, None]
    return g * g


@triton.jit
def entmax15_dscores(p, s, dp, delta, r0, r1):
    g = tl.maximum(s - r0[:, None], 0.0) * r1[:, None]
    return g * (dp - delta[:, None])


# ------------------------------------------------------------------ topk: softmax over s >= tau2

@triton.jit
def topk_rows(stat0, stat1, par, aux):
    return par, _lse2(stat1)


@triton.jit
def topk_weights(s, r0, r1, MASKED: tl.constexpr):
    return tl.where(s >= r0[:, None], tl.exp2(s - r1[:, None]), 0.0)
