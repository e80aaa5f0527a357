"""Taylor hooks (Based): p_j = f(s_j) / Z with f(s) = 1 + s + s^2/2 >= 1/2 and Z = sum_j f(s_j).

Scores arrive in natural units (score unit 1). f is bounded below, so there is no running max and no
rescale: per tile l' = l + rowsum(f(s)), acc' = acc + f(s) @ v. Finalize: out = acc / Z, stat z = Z
(0 and out = 0 for empty rows). Disallowed keys (s = -inf in masked tiles) get f = 0, not f(-inf).
"""

import triton
import triton.language as tl

from .common import Hooks, safe_inv


@triton.jit
def taylor_f(s):
    """f(s) = 1 + s + s^2 / 2."""
    return 1.0 + s + 0.5 * s * s


@triton.jit
def update(s, m_i, l_i, par, MASKED: tl.constexpr):
    if MASKED:
        ok = s > float("-inf")
        p = tl.where(ok, taylor_f(tl.where(ok, s, 0.0)), 0.0)   # [BM, BN]; f(-inf) would be inf - inf
    else:
        p = taylor_f(s)                                          # [BM, BN]
    return p, l_i, m_i, l_i + tl.sum(p, 1)


@triton.jit
def finalize(m_i, l_i, par):
    return safe_inv(l_i), l_i, l_i


HOOKS = Hooks(
    name="taylor",
    score_unit=1.0,
    stats=("z",),
    update=update,
    finalize=finalize,
    rescale=False,
)
