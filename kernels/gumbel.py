"""Gumbel hooks: softmax's (``kernels.softmax``) over (s + g) / tau, with the noise drawn in the kernels.

The score unit is LOG2E / tau (the launcher folds it into the scale), so the kernel scores are
(s_nat + g) * LOG2E / tau and softmax's update, finalize (lse of (s + g) / tau) and backward weights apply
unchanged. The noise hook (``Hooks.noise``, added by ``tiles.add_noise`` times the unit, after the mask bias)::

    g = -ln(-ln(max(U, tiny))),  U = lane 1 of tl.rand4x(seed, ((b * Hq + h) * L + i) * S + j)

(lane 0 is dropout's ``tl.rand``: an independent stream of the same counter). Backward: softmax's
dS = p * (dP - delta) times ``Hooks.grad_mult = 1/tau`` (d((s + g)/tau)/ds).
"""

import functools

import triton
import triton.language as tl
from triton.language.random import uint_to_uniform_float

from . import softmax
from .contract import LOG2E, NoArgs, make_hooks

TINY: tl.constexpr = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def gumbel_noise(seed, offset):
    """Standard Gumbel noise at the int64 counter offsets (the same numbers as
    ``flashmaps.normalizers.gumbel.gumbel_noise``)."""
    _, r1, _, _ = tl.randint4x(seed, offset)
    u = tl.maximum(uint_to_uniform_float(r1), TINY)
    return -tl.log(-tl.log(u))


@functools.lru_cache(maxsize=None)
def _hooks(tau: float):
    return make_hooks(name="gumbel", unit=float(LOG2E.value) / tau, n_stats=1, update=softmax.update,
                      finalize=softmax.finalize, rescale=True, bwd_rows=softmax.bwd_rows,
                      bwd_weights=softmax.bwd_weights, bwd_dscores=softmax.bwd_dscores, noise=gumbel_noise,
                      grad_mult=1.0 / tau)


def configure(norm, S):
    return _hooks(norm.tau), NoArgs(), 0
