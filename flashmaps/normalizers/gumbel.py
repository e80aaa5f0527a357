"""gumbel: perturb-max attention, ``p = softmax((s + g) / tau)`` with i.i.d. standard Gumbel noise ``g``."""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import torch

from .base import Normalizer, register
from .harmonic import check_positive, float_spec, positive_option
from .rows import NEG_INF, logsumexp, lse_weights, masked_softmax, rowsum
from .softmax import Softmax

__all__ = ["Gumbel", "gumbel_noise", "noise_at", "philox_uniform"]

# Philox-4x32-10 (Salmon et al. 2011) exactly as Triton's ``tl.philox`` with 32-bit counters: key (seed_lo,
# seed_hi); uint32 values held in int64 tensors. The Gumbel stream's counter is (j, i, b * Hq + h, _STREAM).
_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
#: Triton's uint_to_uniform_float scale for 32-bit values ((2^23 - 1) / 2^23 * 2^-31, rounded to float32)
_U32_SCALE = 4.6566127342e-10
_TINY = torch.finfo(torch.float32).tiny
#: the fourth counter word of the Gumbel stream (kernels.gumbel.STREAM; dropout's counters have 0 there)
_STREAM = 0x2545F491


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product of uint32 ``a`` (int64 tensor) and the constant ``b``,
    through 16-bit halves of b so that no int64 product overflows."""
    p_lo = a * (b & 0xFFFF)                          # < 2^48
    p_hi = a * (b >> 16)                             # < 2^48
    return (p_hi + (p_lo >> 16)) >> 16, (p_lo + ((p_hi & 0xFFFF) << 16)) & _M32


def philox_uniform(seed: int, c0, c1, c2, c3, lane: int = 0) -> torch.Tensor:
    """float32 uniforms in [0, 1): Triton's ``uint_to_uniform_float`` of lane ``lane`` of
    ``tl.philox(seed, c0, c1, c2, c3)`` for 32-bit counters (int64 tensors or ints, broadcast together)."""
    seed = int(seed) & (2**64 - 1)
    c = list(torch.broadcast_tensors(*(torch.as_tensor(x, dtype=torch.int64) & _M32 for x in (c0, c1, c2, c3))))
    k0, k1 = seed & _M32, seed >> 32
    for _ in range(10):
        hi_b, lo_b = _mulhilo(c[2], _ROUND_B)
        hi_a, lo_a = _mulhilo(c[0], _ROUND_A)
        c = [hi_b ^ c[1] ^ k0, lo_b, hi_a ^ c[3] ^ k1, lo_a]
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    x = c[lane]
    x = torch.where(x >= 2**31, 2**32 - 1 - x, x)    # int32 bitcast x < 0 -> -x - 1
    return x.to(torch.float32) * torch.tensor(_U32_SCALE, dtype=torch.float32)


def gumbel_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel ``-ln(-ln(u))`` in float32, u floored at float32 tiny (u = 0 would give -inf)."""
    return -torch.log(-torch.log(u.clamp_min(_TINY)))


def gumbel_noise(seed: int, shape, device=None) -> torch.Tensor:
    """The noise g (B, Hq, L, S) float32 that a ``gumbel`` call with seed ``seed`` adds to its scores (both
    backends, forward and backward): g_bhij = -ln(-ln(U)), U the Philox uniform at counter
    (j, i, b * Hq + h, stream), whatever the call's L and S. The seed of ``flashmaps.attention`` is drawn from torch's default
    generator as for dropout: ``torch.manual_seed(n); flashmaps.torch_path.draw_seed()`` gives the seed of
    the next call. For tests and analysis (materializes B * Hq * L * S values)."""
    B, Hq, L, S = shape
    ar = functools.partial(torch.arange, dtype=torch.int64, device=device)
    return noise_at(seed, ar(B * Hq).view(B, Hq, 1, 1), ar(L)[:, None], ar(S))


def noise_at(seed: int, bh: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """The Gumbel noise of heads bh = b * Hq + h, query rows i and keys j (int64, broadcast together)."""
    return gumbel_from_uniform(philox_uniform(seed, j, i, bh, _STREAM))


@register
@dataclasses.dataclass(frozen=True)
class Gumbel(Normalizer):
    """Perturb-max (Gumbel-softmax) attention: ``p = softmax((s + g) / tau)``, ``tau > 0``, with ``g_ij``
    i.i.d. standard Gumbel per (b, h, i, j): ``g = -ln(-ln U)``, U the Philox-4x32 uniform at counter
    ``(j, i, b * Hq + h, stream)`` (a stream disjoint from dropout's) keyed by the call's seed (drawn from torch's default generator like dropout's, so ``torch.manual_seed`` reproduces a call).
    The noise is drawn in the kernels (forward and backward draw the same numbers); the torch path computes
    the same Philox numbers (:func:`gumbel_noise` materializes them). ``s`` is the usual score (softcap, mask
    bias); the noise is added after the bias.

    Gumbel-max identity: ``P[argmax_j (s_j + g_j) = j] = softmax(s)_j``, so as tau -> 0 the weights become a
    one-hot sample of softmax(s). Row statistic: ``lse = logsumexp((s + g) / tau)``. Backward:
    ``dS = P * (dP - delta) / tau`` (the noise is a constant). Merge over disjoint key sets: softmax's
    log-sum-exp merge of ``lse`` (differentiable: a gradient g of ``lse`` shifts the row term by g, as
    softmax's). It equals the whole call exactly when the parts drew the whole call's noise:
    the same seed and the same key indices j (parts selected by masks over the same keys, or a prefix of the
    keys, e.g. after one ``torch.manual_seed`` per call). Parts over other key slices (other indices j), or
    with their own seeds, carry other noise: the merge is then still softmax((s + g') / tau) with g' i.i.d. standard
    Gumbel per key when the parts' seeds differ (a different sample, not the whole call's), and correlated
    noise if two parts reuse one seed.
    """

    tau: float = 1.0

    name: ClassVar[str] = "gumbel"
    stats: ClassVar[tuple[str, ...]] = ("lse",)
    empty_stats: ClassVar[tuple[float, ...]] = (NEG_INF,)
    kernels: ClassVar[str] = "flashmaps.kernels.gumbel"
    order: ClassVar[int] = 70
    spec_help: ClassVar[str] = "gumbel:<tau>"
    formula: ClassVar[str] = "`softmax((s + g) / tau)_j`, `g` i.i.d. standard Gumbel per (b, h, i, j), seeded per call"
    merge_rule: ClassVar[str] = "log-sum-exp of `lse` (exact with the whole call's noise: same seed, same key indices)"
    stochastic: ClassVar[bool] = True

    def __post_init__(self):
        check_positive(self, "tau")

    @classmethod
    def from_spec(cls, arg, *, argname="normalizer"):
        return cls(positive_option(cls, "tau", arg, cls.tau, argname))

    @property
    def spec(self) -> str:
        return float_spec(self.name, self.tau)

    @classmethod
    def examples(cls):
        return [cls(0.5)]

    def score_noise(self, seed, bh, i, j):
        return noise_at(seed, bh, i, j)

    def reference_weights(self, s, allowed):
        return masked_softmax(s / self.tau, allowed)

    def reference_stats(self, s, allowed):
        return {"lse": torch.logsumexp(torch.where(allowed, s / self.tau, torch.full_like(s, NEG_INF)), -1)}

    def torch_stats(self, s, masked):
        return {"lse": logsumexp(s / self.tau, masked)}

    def torch_weights(self, s, st, masked):
        return lse_weights(s / self.tau, st["lse"], masked)

    def torch_dscores(self, s, p, dp, st):
        return p * (dp - rowsum(p * dp)) / self.tau

    merge = Softmax.merge
    stat_delta = Softmax.stat_delta          # dlse/ds_j = p_j / tau, dS = p (dP - delta) / tau: d = g_lse
