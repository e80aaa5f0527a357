"""sparsemax: ``p_j = max(s_j - tau, 0)`` with ``sum_j p_j = 1`` (Martins & Astudillo, 2016)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from .base import Normalizer, register
from .rows import (NEG_INF, TwoPhaseRoot, exact_threshold, finite_or_zero, rowsum, safe_div, scatter_top,
                   zero_disallowed)

__all__ = ["Sparsemax", "sparsemax_threshold"]

@register
@dataclasses.dataclass(frozen=True)
class Sparsemax(TwoPhaseRoot, Normalizer):
    """Sparsemax, the Euclidean projection of the scores onto the simplex:
    ``p_j = max(s_j - tau, 0)`` with ``tau`` such that ``sum_j p_j = 1``.

    ``tau`` lies in ``[max s - 1, max s - 1/n]`` for ``n`` allowed keys; with the support ``K = {j: s_j > tau}``,
    ``tau = (sum_{j in K} s_j - 1) / |K|`` (the sort-based rule: the support is the largest r with
    ``s_(r) > (s_(1) + ... + s_(r) - 1) / r``). Keys with ``s_j <= tau`` get exactly 0.
    Row statistics: ``tau`` (score units; ``+inf`` for a row with no allowed key).
    Backward: with the support indicator ``m``, ``dS = m * (dP - sum_j m_j dP_j / |K|)``.

    Merging partial results (the two-phase protocol, ``rows.TwoPhaseRoot``): tau is global, so independent
    partials do not merge. 1. each part's candidates are its local support ``{s > tau_part}`` (adding keys
    never lowers tau, so the union's support lies in the union of the local supports); 2. the union's tau is the
    threshold of the concatenated candidates; 3. each part's output at that tau, ``sum_j p_j v_j`` with
    ``p_j = max(s_j - tau, 0)`` NOT divided by the part's mass (the weights at the union's tau are final); 4. the merge
    sums the outputs (the masses sum to 1 up to the rounding of tau). Split-KV decoding runs the same protocol.
    Gradients through it are exact (``rows.TwoPhaseRoot``): phase 2's backward at the fixed tau plus tau's own
    gradient, which reaches every part's scores through the candidates (implicit function of sum p = 1).
    """

    name: ClassVar[str] = "sparsemax"
    stats: ClassVar[tuple[str, ...]] = ("tau",)
    empty_stats: ClassVar[tuple[float, ...]] = (float("inf"),)
    sparse: ClassVar[bool] = True
    kernels: ClassVar[str] = "flashmaps.kernels.sparsemax"
    order: ClassVar[int] = 25
    formula: ClassVar[str] = "`max(s_j - tau, 0)`, `tau` such that `sum_j p_j = 1` (Martins & Astudillo 2016)"
    merge_rule: ClassVar[str] = ("two-phase: local supports -> global `tau` -> sum of the parts' outputs at `tau` "
                                 "(`merge(..., threshold=)`); exact gradients")

    def _x(self, s):                             # the two-phase protocol (rows.TwoPhaseRoot)
        return s

    def _w(self, d):
        return d

    def _u(self, d):
        return (d > 0).to(d.dtype)

    def reference_weights(self, s, allowed):
        tau = sparsemax_threshold(s, allowed)
        return zero_disallowed(torch.clamp(s - tau, min=0), allowed)

    def reference_stats(self, s, allowed):
        return {"tau": sparsemax_threshold(s, allowed)[..., 0]}

    def torch_stats(self, s, masked):
        tau, top = exact_threshold(s.reshape(-1, s.shape[-1]), _tau_of_sorted, power=1)
        return {"tau": tau.view(s.shape[:-1] + (1,)), "_top": top}

    def torch_weights(self, s, st, masked):
        p = torch.clamp(s - st["tau"], min=0)                     # +inf tau (empty row) gives 0
        return safe_div(p, rowsum(p))                             # exact simplex

    def torch_sparse(self, s, st):
        return scatter_top(s, st, lambda vals, st: torch.clamp(vals - st["tau"], min=0))

    def torch_dscores(self, s, p, dp, st):
        m = (p > 0).to(dp.dtype)
        return m * (dp - safe_div(rowsum(m * dp), rowsum(m)))


def _tau_of_sorted(vals: torch.Tensor):
    """tau from the t largest scores of each row, sorted descending ([n, t], -inf = disallowed): the
    sort-based rule on a prefix. Returns (tau [n, 1], +inf for an empty row; complete [n]: False where all
    t values are in the support, so that the row may need more than t)."""
    top = vals[:, :1]
    nonempty = top > NEG_INF
    # max 0; values below -2 (-inf included) raised to -2: still below any tau (tau >= max - 1), and the
    # row stays sorted
    x = torch.clamp(vals - finite_or_zero(top), min=-2.0)
    r = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device)
    tau_r = (x.cumsum(1) - 1) / r
    support = (tau_r < x).sum(1, keepdim=True)                    # >= 1 (tau_1 = x_1 - 1 < x_1)
    tau = tau_r.gather(1, support - 1) + top
    tau = torch.where(nonempty, tau, torch.full_like(tau, float("inf")))
    return tau, (support < x.shape[1]).squeeze(1)


def sparsemax_threshold(s: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The exact sparsemax threshold by a full sort (the dense reference), shape ``s.shape[:-1] + (1,)``;
    ``+inf`` for rows with no allowed key. Disallowed keys are sorted last (-inf) and never counted: the
    support of r keys must lie among the allowed ones."""
    neg = torch.tensor(NEG_INF, dtype=s.dtype, device=s.device)
    srt = torch.sort(torch.where(allowed, s, neg), dim=-1, descending=True).values
    n = allowed.sum(-1, keepdim=True)
    r = torch.arange(1, s.shape[-1] + 1, dtype=s.dtype, device=s.device)
    ok = r <= n                                                   # the r-th largest is an allowed key
    csum = torch.where(ok, srt, torch.zeros((), dtype=s.dtype, device=s.device)).cumsum(-1)
    tau_r = (csum - 1) / r
    in_support = ok & (srt > tau_r)
    k = in_support.sum(-1, keepdim=True).clamp(min=1)
    tau = tau_r.gather(-1, k - 1)
    return torch.where(n > 0, tau, torch.full_like(tau, float("inf")))
