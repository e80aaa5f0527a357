"""Taylor hooks (Based): p_j = f(s_j) / Z with f(s) = 1 + s + s^2/2 >= 1/2 and Z = sum_j f(s_j).

Scores arrive in natural units (score unit 1). f is bounded below, so there is no running max and no
rescale: per tile l' = l + rowsum(f(s)), acc' = acc + f(s) @ v. Finalize: out = acc / Z, stat z = Z
(0 and out = 0 for empty rows). Disallowed keys (s = -inf in masked tiles) get f = 0, not f(-inf).

Backward (``kernels.backward``): w0 = 1/Z (0 for an empty row), p = f(s) / Z,
dS = f'(s) / Z * (dP - delta) with f'(s) = 1 + s and delta = rowsum(dO * O).
"""

import triton
import triton.language as tl

from .contract import make_hooks
from .tiles import safe_inv


@triton.jit
def taylor_f(s):
    """f(s) = 1 + s + s^2 / 2."""
    return 1.0 + s + 0.5 * s * s


@triton.jit
def taylor_f_allowed(s, MASKED: tl.constexpr):
    """f(s) on allowed keys, 0 where s = -inf (masked tiles only; f(-inf) would be inf - inf). A NaN score
    stays NaN (the non-finite rule)."""
    if MASKED:
        ok = s != float("-inf")
        return tl.where(ok, taylor_f(tl.where(ok, s, 0.0)), 0.0)
    else:
        return taylor_f(s)


#: the forward's weights are f(s) * 2^-10 (exact): in fp16, f(s) up to 65504 * 2^10 (|s| <= 11585) reaches the
#: tensor cores finite; out = acc / l is unchanged and the statistic z is l * 2^10
F_SCALE: tl.constexpr = tl.constexpr(2.0**-10)


@triton.jit
def update(s, m_i, l_i, thr, MASKED: tl.constexpr):
    p = taylor_f_allowed(s, MASKED) * F_SCALE                    # [BM, BN]
    return p, l_i, m_i, l_i + tl.sum(p, 1)


@triton.jit
def finalize(m_i, l_i, thr):
    return safe_inv(l_i), l_i * (1.0 / F_SCALE), l_i


@triton.jit
def bwd_rows(stat0, stat1, thr, g_sum):
    return safe_inv(stat0), stat0


@triton.jit
def bwd_weights(s, w0, w1, MASKED: tl.constexpr):
    return taylor_f_allowed(s, MASKED) * w0[:, None]


@triton.jit
def bwd_dscores(p, s, dp, delta, w0, w1):
    """dS = f'(s) / Z * (dP - delta); p > 0 exactly on the allowed keys of non-empty rows."""
    fprime = tl.where(p > 0, 1.0 + s, 0.0)                      # [BM, BN]
    return fprime * w0[:, None] * (dp - delta[:, None])


HOOKS = make_hooks(
    name="taylor",
    unit=1.0,
    n_stats=1,
    update=update,
    finalize=finalize,
    bwd_rows=bwd_rows,
    bwd_weights=bwd_weights,
    bwd_dscores=bwd_dscores,
)
