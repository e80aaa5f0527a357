"""softpick: rectified softmax, ``p_j = relu(exp(s_j) - 1) / (sum_allowed |exp(s_j) - 1| + 1e-6)``."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from .base import Normalizer, register
from .rows import rowsum, zero_disallowed

__all__ = ["Softpick", "SOFTPICK_EPS"]

#: the denominator's epsilon
SOFTPICK_EPS = 1e-6


@register
@dataclasses.dataclass(frozen=True)
class Softpick(Normalizer):
    """Softpick (rectified softmax, 2025): ``p_j = relu(exp(s_j) - 1) / D``,
    ``D = sum_{j allowed} |exp(s_j) - 1| + 1e-6``.

    Keys with ``s_j <= 0`` get exactly 0 (they still count in D), so rows sum to at most one, and a row whose
    scores are all <= 0 outputs 0 (no attention sink is forced). Computed stably with a running max
    ``m = max(0, max_j s_j)``: ``exp(s) - 1 = e^m (exp(s - m) - e^-m)`` with both terms in [0, 1].

    Row statistic: ``lden = log D`` (``log 1e-6`` for a row with no allowed key), so that
    ``p_j = relu(exp(s_j - lden) - exp(-lden))``. Backward, with ``delta = sum_j p_j dP_j = rowsum(dO * O)``:
    ``dS_j = exp(s_j - lden) * ([s_j > 0] dP_j - sign(s_j) delta)`` (the numerator's relu' and the
    denominator's ``d|exp(s) - 1|/ds = sign(s) exp(s)``).

    Merge over disjoint key sets (each part's D counts the 1e-6 once): ``D = sum_i D_i - (n - 1) 1e-6``,
    ``out = sum_i D_i out_i / D``, ``lden = log D`` (computed relative to ``max_i lden_i``). Gradient through
    ``lden``: ``dlden/ds_j = sign(s_j) exp(s_j) / D``, so a gradient ``g`` of ``lden`` shifts the row term,
    ``delta' = delta - g`` (``stat_delta``).
    """

    name: ClassVar[str] = "softpick"
    stats: ClassVar[tuple[str, ...]] = ("lden",)
    empty_stats: ClassVar[tuple[float, ...]] = (math.log(SOFTPICK_EPS),)
    sparse: ClassVar[bool] = True
    sums_to_one: ClassVar[bool] = False
    kernels: ClassVar[str] = "flashmaps.kernels.softpick"
    order: ClassVar[int] = 60
    formula: ClassVar[str] = "`relu(exp(s_j) - 1) / (sum_i abs(exp(s_i) - 1) + 1e-6)` (rectified softmax)"
    merge_rule: ClassVar[str] = "sums of `exp(lden)` (the 1e-6 counted once)"

    def reference_weights(self, s, allowed):
        x = torch.where(allowed, torch.expm1(s), torch.zeros_like(s))
        den = x.abs().sum(-1, keepdim=True) + SOFTPICK_EPS
        return zero_disallowed(torch.clamp(x, min=0) / den, allowed)

    def reference_stats(self, s, allowed):
        x = torch.where(allowed, torch.expm1(s), torch.zeros_like(s))
        return {"lden": torch.log(x.abs().sum(-1) + SOFTPICK_EPS)}

    def torch_stats(self, s, masked):
        m = torch.clamp(s.amax(-1, keepdim=True), min=0)           # >= 0: both terms below lie in [0, 1]
        em = torch.exp(-m)
        x = torch.where(m < 64, em * torch.expm1(torch.clamp(s, max=64)), torch.exp(s - m) - em)  # (exp(s)-1)/e^m
        a = x.abs()
        if masked:
            a = torch.where(s == float("-inf"), torch.zeros((), dtype=s.dtype, device=s.device), a)
        return {"lden": m + torch.log(rowsum(a) + SOFTPICK_EPS * em)}

    def torch_weights(self, s, st, masked):
        ld = st["lden"]
        return torch.clamp(torch.exp(s - ld) - torch.exp(-ld), min=0)    # -inf scores give exactly 0

    def torch_dscores(self, s, p, dp, st):
        zero = torch.zeros((), dtype=s.dtype, device=s.device)
        e = torch.exp(s - st["lden"])                                    # exp(s) / D; 0 on disallowed keys
        return e * (torch.where(s > 0, dp, zero) - torch.sign(s) * rowsum(p * dp))

    def merge(self, outs, stats):
        acc = torch.float64 if outs[0].dtype == torch.float64 else torch.float32
        ld = torch.stack([st["lden"].to(acc) for st in stats])                # [P, B, H, L]
        top = ld.amax(0)
        w = torch.exp(ld - top)                                                # D_i / e^top
        floor = SOFTPICK_EPS * torch.exp(-top)
        den = torch.clamp(w.sum(0) - (len(outs) - 1) * floor, min=floor)     # D / e^top
        out = sum(wi[..., None] * o.to(acc) for wi, o in zip(w, outs)) / den[..., None]
        return out.to(outs[0].dtype), {"lden": top + torch.log(den)}

    def stat_delta(self, stats, stat_grads):
        return stat_grads[0]                        # an empty row's weights are 0: d does not matter there
