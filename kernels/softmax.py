"""Softmax hooks: the online-softmax recurrence, in log2 units.

Scores arrive as s = LOG2E * s_nat (the launcher folds LOG2E into the scale, see common.LOG2E), so
exp(s_nat - m_nat) = exp2(s - m). Per tile::

    m' = max(m, rowmax(s));  alpha = exp2(m - m');  p = exp2(s - m');  l' = alpha * l + rowsum(p)
    acc' = alpha * acc + p @ v                                    (done by the tile loop)

Where s is just the scaled product (no softcap, float mask or noise: `contract.raw_scores_ok`) the output
pass hands ``update_raw`` the raw tile qk = q.k and s = qk * qk_scale is never formed: the row max is taken on
qk and exp2(qk * qk_scale - m') is one multiply-add per score.

Finalize: out = acc / l, lse = (m + log2 l) * LN2 (natural log), -inf and out = 0 for empty rows.
In a masked tile a row can be all -inf; its m stays -inf and exp2 uses 0 in its place (no NaN).

Backward (``kernels.backward``): w0 = lse2 = lse * LOG2E (+inf for an empty row, so exp2(s - w0) = 0
there), p = exp2(s - lse2), dS = p * (dP - delta) with delta = rowsum(dO * O).
"""

import triton
import triton.language as tl

from .contract import LN2, LOG2E, make_hooks
from .tiles import safe_inv


@triton.jit
def online_update(s, m_i, l_i, MASKED: tl.constexpr):
    """One online-softmax step on log2-unit scores s [BM, BN] -> (p, alpha, m_new, l_new)."""
    return online_update_scaled(s, 1.0, m_i, l_i, MASKED)


@triton.jit
def online_update_scaled(x, mult, m_i, l_i, MASKED: tl.constexpr):
    """`online_update` on s = x * mult [BM, BN] (mult > 0) without forming s: m' = max(m, rowmax(x) * mult)
    (= max(m, rowmax(s)): rounding is monotone), p = exp2(x * mult - m'), one multiply-add per score
    (D = 128 forward, offline: 605 -> 528 SASS instructions per tile, bench/TUNING.md "Issue 17").
    mult = 1.0 folds away (``update``: the same machine code as before)."""
    m_new = tl.maximum(m_i, tl.max(x, 1) * mult)                # [BM]
    if MASKED:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # all-masked rows so far: no -inf - -inf
    else:
        m_use = m_new                                          # unmasked tiles are finite
    p = tl.exp2(x * mult - m_use[:, None])                     # [BM, BN]
    alpha = tl.exp2(m_i - m_use)                               # [BM]
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new


@triton.jit
def lse_natural(m_i, l_i):
    """Natural-log logsumexp from the log2-unit state; -inf for empty rows."""
    return tl.where(l_i > 0, (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) * LN2, float("-inf"))


@triton.jit
def update(s, m_i, l_i, thr, MASKED: tl.constexpr):
    return online_update(s, m_i, l_i, MASKED)


@triton.jit
def update_raw(qk, qk_scale, m_i, l_i, thr, MASKED: tl.constexpr):
    """`update` on the unscaled tile (s = qk * qk_scale, `contract.Hooks.update_raw`)."""
    return online_update_scaled(qk, qk_scale, m_i, l_i, MASKED)


@triton.jit
def finalize(m_i, l_i, thr):
    lse = lse_natural(m_i, l_i)
    return safe_inv(l_i), lse, lse


@triton.jit
def lse2_for_backward(lse):
    """Natural-log lse -> log2 units; an empty row (-inf) gets +inf so that exp2(s - lse2) = 0."""
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def bwd_rows(stat0, stat1, thr, g_sum):
    return lse2_for_backward(stat0), stat0


@triton.jit
def bwd_weights(s, w0, w1, MASKED: tl.constexpr):
    return tl.exp2(s - w0[:, None])


@triton.jit
def bwd_dscores(p, s, dp, delta, w0, w1):
    """The softmax rule dS = p * (dP - delta)."""
    return p * (dp - delta[:, None])


HOOKS = make_hooks(
    name="softmax",
    unit=float(LOG2E.value),
    n_stats=1,
    update=update,
    finalize=finalize,
    rescale=True,
    update_raw=update_raw,
    bwd_rows=bwd_rows,
    bwd_weights=bwd_weights,
    bwd_dscores=bwd_dscores,
)
