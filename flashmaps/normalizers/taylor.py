"""taylor: Based's second-order Taylor map ``f(s) = 1 + s + s^2/2``."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from .base import Normalizer, register
from .rows import rowsum, safe_div, zero_disallowed

__all__ = ["Taylor"]


def _f(s):
    return 1 + s + 0.5 * s * s


@register
@dataclasses.dataclass(frozen=True)
class Taylor(Normalizer):
    """Second-order Taylor map of Based linear attention:
    ``p_j = f(s_j) / Z`` with ``f(s) = 1 + s + s^2/2 >= 1/2`` and ``Z = sum_j f(s_j)``.

    No running max is needed (``f`` is bounded below by 1/2). Row statistics: ``z`` (the normalizer Z,
    0 for a row with no allowed key). Backward: ``dS = f'(S)/Z * (dP - delta)`` with ``f'(s) = 1 + s``.
    Merge over disjoint key sets: ``z = sum_i z_i``, ``out = sum_i z_i out_i / z``.
    Forms: quadratic (the tile loop) and linear (``flashmaps.linear``: ``f(q'.k) = phi_q(q') . phi_k(k)``,
    a fixed-size state per head; ``attention(..., form="linear")``, decoding with ``flashmaps.TaylorState``).
    """

    name: ClassVar[str] = "taylor"
    stats: ClassVar[tuple[str, ...]] = ("z",)
    empty_stats: ClassVar[tuple[float, ...]] = (0.0,)
    kernels: ClassVar[str] = "flashmaps.kernels.taylor"
    order: ClassVar[int] = 10
    formula: ClassVar[str] = "`f(s_j) / Z`, `f(s) = 1 + s + s^2/2` (Based's 2nd-order Taylor map), `Z = sum_i f(s_i)`"
    merge_rule: ClassVar[str] = "sums of `z`"
    forms: ClassVar[tuple[str, ...]] = ("quadratic", "linear")
    linear_coeffs: ClassVar[tuple[float, float, float]] = (1.0, 1.0, 0.5)  # f(s) = 1 + s + s^2/2

    def score_limit(self, dtype):
        """f(s) ~ s^2/2 must fit float32 (the sums); in fp16 the Triton kernels feed f(s) 2^-10 to the
        tensor cores in fp16 (max 65504), so |s| <= sqrt(2 * 65504 * 2^10) ~ 11585."""
        top = 65504.0 * 2**10 if dtype == torch.float16 else torch.finfo(torch.float32).max
        return math.sqrt(2 * top) - 2

    def reference_weights(self, s, allowed):
        f = torch.where(allowed, _f(s), torch.zeros_like(s))
        return zero_disallowed(safe_div(f, rowsum(f)), allowed)

    def reference_stats(self, s, allowed):
        return {"z": torch.where(allowed, _f(s), torch.zeros_like(s)).sum(-1)}

    def _f_allowed(self, s, masked):
        f = _f(s)
        return torch.where(s != float("-inf"), f, torch.zeros((), dtype=s.dtype, device=s.device)) if masked else f

    def torch_stats(self, s, masked):
        return {"z": rowsum(self._f_allowed(s, masked))}          # 0 for an empty row

    def torch_weights(self, s, st, masked):
        return safe_div(self._f_allowed(s, masked), st["z"])

    def torch_dscores(self, s, p, dp, st):
        fprime = torch.where(p > 0, 1 + s, torch.zeros((), dtype=s.dtype, device=s.device))  # no inf * 0
        return safe_div(fprime, st["z"]) * (dp - rowsum(p * dp))

    def merge(self, outs, stats):
        acc = torch.float64 if outs[0].dtype == torch.float64 else torch.float32
        zs = [st["z"].to(acc) for st in stats]
        z = sum(zs)
        out = sum(zi[..., None] * o.to(acc) for zi, o in zip(zs, outs))
        out = out / torch.where(z > 0, z, torch.ones_like(z))[..., None]
        return out.to(outs[0].dtype), {"z": z}
