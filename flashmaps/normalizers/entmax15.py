"""entmax15: 1.5-entmax, ``p_j = max(s_j/2 - tau, 0)^2`` with ``sum_j p_j = 1`` (as ``entmax.entmax15``)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from .base import Normalizer, register
from .rows import (NEG_INF, TwoPhaseRoot, exact_threshold, finite_or_zero, rowsum, safe_div, scatter_top,
                   zero_disallowed)

__all__ = ["Entmax15", "entmax15_threshold"]

@register
@dataclasses.dataclass(frozen=True)
class Entmax15(TwoPhaseRoot, Normalizer):
    """1.5-entmax (as ``entmax.entmax15``): with ``z = s/2``,
    ``p_j = max(z_j - tau, 0)^2`` and ``tau`` such that ``sum_j p_j = 1``.

    ``tau`` lies in ``[max z - 1, max z - n^(-1/2)]`` for ``n`` allowed keys; keys with ``z_j <= tau``
    get exactly 0. Row statistics: ``tau`` (in units of z; ``+inf`` for a row with no allowed key).
    Backward: with ``g = sqrt(p)``, ``dS = g * (dP - sum_j g_j dP_j / sum_j g_j)`` (the 1/2 of z = s/2
    cancels the 2 of d(x^2)).

    Merging partial results (the two-phase protocol, ``rows.TwoPhaseRoot``): tau is global, so independent
    partials do not merge. 1. each part's candidates are its local support ``{z > tau_part}`` (adding keys
    never lowers tau, so the union's support lies in the union of the local supports); 2. the union's tau is the
    threshold of the concatenated candidates; 3. each part's output at that tau, ``sum_j p_j v_j`` with
    ``p_j = max(z_j - tau, 0)^2`` NOT divided by the part's mass (the weights at the union's tau are final); 4. the merge
    sums the outputs (the masses sum to 1 up to the rounding of tau). Split-KV decoding runs the same protocol.
    Gradients through it are exact (``rows.TwoPhaseRoot``): phase 2's backward at the fixed tau plus tau's own
    gradient, which reaches every part's scores through the candidates (implicit function of sum p = 1).
    """

    name: ClassVar[str] = "entmax15"
    stats: ClassVar[tuple[str, ...]] = ("tau",)
    empty_stats: ClassVar[tuple[float, ...]] = (float("inf"),)
    sparse: ClassVar[bool] = True
    kernels: ClassVar[str] = "flashmaps.kernels.entmax15"
    order: ClassVar[int] = 20
    formula: ClassVar[str] = "`max(s_j/2 - tau, 0)^2`, `tau` such that `sum_j p_j = 1` (as `entmax.entmax15`)"
    merge_rule: ClassVar[str] = ("two-phase: local supports -> global `tau` -> sum of the parts' outputs at `tau` "
                                 "(`merge(..., threshold=)`); exact gradients")

    def _x(self, s):                             # the two-phase protocol (rows.TwoPhaseRoot)
        return s * 0.5

    def _w(self, d):
        return d.square()

    def _u(self, d):
        return d

    def reference_weights(self, s, allowed):
        tau = entmax15_threshold(s, allowed)
        p = torch.where(allowed, torch.clamp(s / 2 - tau, min=0) ** 2, torch.zeros_like(s))
        return zero_disallowed(p, allowed)

    def reference_stats(self, s, allowed):
        return {"tau": entmax15_threshold(s, allowed)[..., 0]}

    def torch_stats(self, s, masked):
        rows = s.reshape(-1, s.shape[-1])
        tau, top = exact_threshold(rows, _tau_of_sorted, power=2, unit=0.5)
        return {"tau": tau.view(s.shape[:-1] + (1,)), "_top": top}

    def torch_weights(self, s, st, masked):
        # p = (s/2 - tau)^2 = (s - 2 tau)^2 / 4; the 1/4 cancels in the normalization
        p = torch.clamp_(s - 2 * st["tau"], min=0).square_()        # +inf tau (empty row) gives 0
        return safe_div(p, rowsum(p))                                # exact simplex

    def torch_sparse(self, s, st):
        return scatter_top(s, st, lambda vals, st: torch.clamp_(vals * 0.5 - st["tau"], min=0).square_())

    def torch_dscores(self, s, p, dp, st):
        g = torch.sqrt(p)
        return g * (dp - safe_div(rowsum(g * dp), rowsum(g)))


def _tau_of_sorted(vals: torch.Tensor):
    """tau (z units) from the t largest scores of each row, sorted descending ([n, t], -inf = disallowed):
    the sort-based rule on a prefix of the row. For a support of the r largest z,
    ``tau_r = mean_r - sqrt(1/r - var_r)``; the support is the prefix where ``tau_r <= z_(r)``. Returns
    (tau [n, 1], +inf for an empty row; complete [n]: False where all t values are in the support)."""
    zs = vals * 0.5
    zmax = zs[:, :1]
    nonempty = zmax > NEG_INF
    # max 0; values below -2 (-inf included) raised to -2: still below any tau (tau >= max z - 1), and
    # the row stays sorted (the support-count rule below needs the sorted order)
    x = torch.clamp(zs - finite_or_zero(zmax), min=-2.0)
    rho = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device)
    mean = x.cumsum(1) / rho
    mean_sq = (x * x).cumsum(1) / rho
    tau_r = mean - torch.sqrt(torch.clamp(1 / rho - (mean_sq - mean * mean), min=0))
    support = (tau_r <= x).sum(1, keepdim=True)  # >= 1 (tau_1 = x_1 - 1)
    tau = tau_r.gather(1, support - 1) + zmax
    tau = torch.where(nonempty, tau, torch.full_like(tau, float("inf")))
    return tau, (support < x.shape[1]).squeeze(1)


def entmax15_threshold(s: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Exact 1.5-entmax threshold ``tau`` (units of ``z = s/2``) by a full sort, shape
    ``s.shape[:-1] + (1,)`` (the dense reference). Disallowed keys are replaced by ``max z - 2``, below any
    feasible tau (``tau >= max z - 1``), so they never enter the support. Rows with no allowed key get
    ``+inf``."""
    z = s / 2
    neg_inf = torch.tensor(NEG_INF, dtype=z.dtype, device=z.device)
    zmax = torch.where(allowed, z, neg_inf).amax(-1, keepdim=True)
    any_allowed = allowed.any(-1, keepdim=True)
    zmax = torch.where(any_allowed, zmax, torch.zeros_like(zmax))
    x = torch.where(allowed, z - zmax, torch.full_like(z, -2.0))  # shifted: max is 0
    xs, _ = torch.sort(x, dim=-1, descending=True)
    rho = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype, device=x.device)
    mean = xs.cumsum(-1) / rho
    mean_sq = (xs * xs).cumsum(-1) / rho
    delta = (1 - rho * (mean_sq - mean * mean)) / rho
    tau = mean - torch.sqrt(torch.clamp(delta, min=0))
    support = (tau <= xs).sum(-1, keepdim=True)
    tau_star = tau.gather(-1, support - 1)
    return torch.where(any_allowed, tau_star + zmax, torch.full_like(tau_star, float("inf")))
