"""Gumbel hooks: softmax's (``kernels.softmax``) over (s + g) / tau, with the noise drawn in the kernels.

The score unit is LOG2E / tau (the launcher folds it into the scale), so the kernel scores are
(s_nat + g) * LOG2E / tau and softmax's update, finalize (lse of (s + g) / tau) and backward weights apply
unchanged. The noise hook (``Hooks.noise``, added by ``tiles.add_noise`` times the unit, after the mask bias)::

    g = -ln(-ln(max(U, tiny))),  U = uniform(lane 0 of Philox-4x32-10(key seed, counter (j, i, b * Hq + h, STREAM)))

(dropout's ``tl.rand`` counters are (offset_lo, offset_hi, 0, 0): a disjoint stream). The noise of key j of
query row i of head (b, h) does not depend on the call's L or S. Backward: softmax's
dS = p * (dP - delta) times ``Hooks.grad_mult = 1/tau`` (d((s + g)/tau)/ds).
"""

import functools

import triton
import triton.language as tl
from triton.language.random import uint_to_uniform_float

from . import softmax
from .contract import LOG2E, NoArgs, make_hooks

TINY: tl.constexpr = tl.constexpr(1.1754943508222875e-38)
#: the fourth Philox counter word of the Gumbel stream (dropout's counters have 0 there: disjoint streams)
STREAM: tl.constexpr = tl.constexpr(0x2545F491)


@triton.jit
def gumbel_noise(seed, bh, i, j):
    """Standard Gumbel noise [BM, BN] of head bh, query rows i [BM, 1], keys j [1, BN] (the same numbers as
    ``flashmaps.normalizers.gumbel.gumbel_noise``)."""
    zero = i * 0 + j * 0                                                               # [BM, BN] int32
    r, _, _, _ = tl.philox(seed, j + zero, i + zero, bh + zero, zero + STREAM)
    u = tl.maximum(uint_to_uniform_float(r), TINY)
    return -tl.log(-tl.log(u))


@functools.lru_cache(maxsize=None)
def _hooks(tau: float):
    return make_hooks(name="gumbel", unit=float(LOG2E.value) / tau, n_stats=1, update=softmax.update,
                      finalize=softmax.finalize, rescale=True, bwd_rows=softmax.bwd_rows,
                      bwd_weights=softmax.bwd_weights, bwd_dscores=softmax.bwd_dscores, noise=gumbel_noise,
                      grad_mult=1.0 / tau)


def configure(norm, S):
    return _hooks(norm.tau), NoArgs(), 0
