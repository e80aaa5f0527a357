"""Sigmoid hooks (FlashSigmoid): p_j = sigmoid(s_j + b), no normalization, no row statistic.

Scores arrive in log2 units (score unit LOG2E: s = LOG2E * s_nat), and so does the bias: the "pre-pass" only
writes b2 = LOG2E * b into every row's threshold ``thr`` (no score pass; b is a runtime argument, so every key
count S shares one compile although the default b = -log S depends on it). With x = s + b2 and
t = exp2(-|x|) = exp(-|s_nat + b|) in (0, 1]::

    sigmoid = 1 / (1 + t)  (x >= 0),   t / (1 + t)  (x < 0)       (never exp of a positive number)

A disallowed key (s = -inf) gets t = 0, p = 0. No rescale: acc' = acc + p @ v; the running l stays 0 (the
tile loop adds a NaN or +inf score into it: the non-finite rule), out = acc.

Backward (``kernels.backward``): w0 = b2 (the saved thr), p = sigmoid(s + w0),
dS = p (1 - p) dP (no row term: delta is unused).
"""

from typing import Any, NamedTuple

import triton
import triton.language as tl

from .contract import LOG2E, make_hooks


class Args(NamedTuple):
    """The runtime arguments: the bias in kernel units."""

    b2: Any


@triton.jit
def sigmoid2(x):
    """sigmoid(x LN2) of log2-unit x, stably: t = exp2(-|x|) in (0, 1]."""
    t = tl.exp2(-tl.abs(x))
    return tl.where(x >= 0, 1.0, t) / (1.0 + t)


@triton.jit
def prepass(blk, keys, args, scratch, BM: tl.constexpr, BN: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr):
    """thr = b2 for every row (no pass over the scores)."""
    return tl.full([BM], 0.0, tl.float32) + args.b2


@triton.jit
def update(s, m_i, l_i, thr, MASKED: tl.constexpr):
    p = sigmoid2(s + thr[:, None])                             # [BM, BN]
    return p, l_i, m_i, l_i


@triton.jit
def finalize(m_i, l_i, thr):
    return tl.full(l_i.shape, 1.0, tl.float32), l_i, l_i


@triton.jit
def bwd_rows(stat0, stat1, thr, g_sum):
    return thr, thr


@triton.jit
def bwd_weights(s, w0, w1, MASKED: tl.constexpr):
    return sigmoid2(s + w0[:, None])


@triton.jit
def bwd_dscores(p, s, dp, delta, w0, w1):
    """dS = p (1 - p) dP (from p: no exp2 again; 1 - p rounds to 0 only where p (1 - p) < 2^-24 anyway)."""
    return p * (1.0 - p) * dp


HOOKS = make_hooks(
    name="sigmoid",
    unit=float(LOG2E.value),
    n_stats=0,
    update=update,
    finalize=finalize,
    prepass=prepass,
    bwd_rows=bwd_rows,
    bwd_weights=bwd_weights,
    bwd_dscores=bwd_dscores,
)


def configure(normalizer, S: int):
    """(hooks, runtime args, scratch columns) of a call over S keys: b (default -log S) in log2 units."""
    return HOOKS, Args(float(normalizer.for_keys(S).b) * float(LOG2E.value)), 0
