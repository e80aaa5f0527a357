"""Softpick hooks: p_j = relu(exp(s_j) - 1) / D, D = sum_allowed |exp(s_j) - 1| + EPS, in log2 units.

Scores arrive as s = LOG2E * s_nat (exp(s_nat) = exp2(s)). The running max is clamped at 0, m >= 0, so that
exp(s_nat) - 1 = e^m (exp2(s - m) - exp2(-m)) has both terms in [0, 1]. Per tile::

    m' = max(m, rowmax(s), 0);  alpha = exp2(m - m');  x = exp2(s - m') - exp2(-m')
    p = max(x, 0);  l' = alpha * l + rowsum(|x| over allowed keys);  acc' = alpha * acc + p @ v

Disallowed keys (s = -inf) give x = -exp2(-m): p = 0, and they are left out of l. Finalize:
D / e^m = l + EPS exp2(-m), out = acc / (D / e^m), lden = log D = (m + log2(l + EPS exp2(-m))) * LN2
(log EPS for an empty row, whose out is 0).

Backward (``kernels.backward``): w0 = lden2 = lden * LOG2E, p = max(exp2(s - w0) - exp2(-w0), 0),
dS = exp2(s - w0) * ([s > 0] dP - sign(s) delta) with delta = rowsum(dO * O).
"""

import triton
import triton.language as tl

from .contract import LN2, LOG2E, make_hooks

#: the denominator's epsilon (flashmaps.normalizers.softpick.SOFTPICK_EPS)
EPS: tl.constexpr = tl.constexpr(1e-6)


@triton.jit
def update(s, m_i, l_i, thr, MASKED: tl.constexpr):
    m_new = tl.maximum(tl.maximum(m_i, tl.max(s, 1)), 0.0)      # [BM], finite
    alpha = tl.exp2(m_i - m_new)                                # 0 while m_i = -inf (nothing accumulated)
    x = tl.exp2(s - m_new[:, None]) - tl.exp2(-m_new)[:, None]  # [BM, BN]
    a = tl.abs(x)
    if MASKED:
        a = tl.where(s == float("-inf"), 0.0, a)
    return tl.maximum(x, 0.0), alpha, m_new, l_i * alpha + tl.sum(a, 1)


@triton.jit
def finalize(m_i, l_i, thr):
    m = tl.maximum(m_i, 0.0)
    den = l_i + EPS * tl.exp2(-m)                              # D / e^m > 0
    lden = (m + tl.log2(den)) * LN2
    return 1.0 / den, lden, lden


@triton.jit
def bwd_rows(stat0, stat1, thr, g_sum):
    return stat0 * LOG2E, stat0


@triton.jit
def bwd_weights(s, w0, w1, MASKED: tl.constexpr):
    return tl.maximum(tl.exp2(s - w0[:, None]) - tl.exp2(-w0)[:, None], 0.0)


@triton.jit
def bwd_dscores(p, s, dp, delta, w0, w1):
    """dS = exp(s_nat) / D ([s > 0] dP - sign(s) delta); 0 on disallowed keys (exp2(-inf) = 0)."""
    e = tl.exp2(s - w0[:, None])                               # [BM, BN]
    sgn = tl.where(s > 0, 1.0, tl.where(s < 0, -1.0, 0.0))
    return e * (tl.where(s > 0, dp, 0.0) - sgn * delta[:, None])


HOOKS = make_hooks(
    name="softpick",
    unit=float(LOG2E.value),
    n_stats=1,
    update=update,
    finalize=finalize,
    rescale=True,
    bwd_rows=bwd_rows,
    bwd_weights=bwd_weights,
    bwd_dscores=bwd_dscores,
)
