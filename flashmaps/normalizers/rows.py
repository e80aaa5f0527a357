"""Row helpers for writing normalizers in torch: reductions over the key dim, masked softmax, and the exact
threshold of the sparse normalizers (the torch side of the threshold engine).

Scores ``s`` are [..., S] with -inf exactly on disallowed keys (the torch path's convention) unless a
function takes an explicit ``allowed`` mask (the float64 references).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["NEG_INF", "rowsum", "safe_div", "finite_or_zero", "logsumexp", "lse_weights", "masked_softmax",
           "zero_disallowed", "exact_threshold", "newton_threshold", "scatter_top", "compact_candidates",
           "sum_parts", "TwoPhaseRoot"]

NEG_INF = float("-inf")


def rowsum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the key dim, kept: [..., 1]."""
    return x.sum(-1, keepdim=True)


def safe_div(x: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """x / den where den > 0; x / 1 elsewhere (an empty row's zeros stay zeros)."""
    return x / torch.where(den > 0, den, torch.ones_like(den))


def finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def logsumexp(s: torch.Tensor, masked: bool = True) -> torch.Tensor:
    """Natural-log log-sum-exp over the last dim, [..., 1]; -inf for a row of -inf."""
    m = s.amax(-1, keepdim=True)
    m = finite_or_zero(m) if masked else m
    return m + torch.log(rowsum(torch.exp(s - m)))


def lse_weights(s: torch.Tensor, lse: torch.Tensor, masked: bool = True) -> torch.Tensor:
    """exp(s - lse): softmax weights from the row's log-sum-exp (0 for -inf scores and empty rows)."""
    return torch.exp(s - (finite_or_zero(lse) if masked else lse))


def zero_disallowed(p: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """p with 0 on disallowed keys and on rows with no allowed key (the references' last step)."""
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    p = torch.where(allowed, p, zero)
    return torch.where(allowed.any(-1, keepdim=True), p, zero)


def masked_softmax(s: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the allowed keys (a float64-safe dense reference); rows with none are 0."""
    sm = torch.where(allowed, s, torch.tensor(NEG_INF, dtype=s.dtype, device=s.device))
    m = finite_or_zero(sm.amax(-1, keepdim=True))
    e = torch.where(allowed, torch.exp(sm - m), torch.zeros_like(s))
    return zero_disallowed(safe_div(e, rowsum(e)), allowed)


#: number of top scores per row the exact threshold looks at first (a full sort for the rows that need more)
FIRST_SELECTION = 64


def exact_threshold(rows: torch.Tensor, tau_of_sorted: Callable, first: int | None = None, *, power: int | None = None,
                    unit: float = 1.0):
    """Exact per-row threshold of a sparse normalizer from the top of each row.

    ``rows`` [n, S] scores (-inf = disallowed); ``tau_of_sorted(top) -> (tau [n, 1], complete [n])`` computes
    the threshold from each row's t largest values sorted in descending order, and says per row whether
    those t values were enough (the support is smaller than t). Rows that need more (a flat row: a fresh
    model's scores) get :func:`newton_threshold` when the normalizer is ``p_j = max(unit * s_j - tau, 0)^power``
    with ``power`` 1 or 2 (a few passes over the row, no sort), else one full sort. Returns (tau [n, 1],
    (top values [n, t0], their indices [n, t0], all_complete)) with t0 the first selection (default
    `FIRST_SELECTION`): when ``all_complete`` the weights are nonzero only on those keys."""
    first = FIRST_SELECTION if first is None else first
    n_keys = rows.shape[1]
    t = min(first + 1, n_keys)
    vals, idx = torch.topk(rows, t, dim=1, sorted=True)
    tau, complete = tau_of_sorted(vals)
    complete = complete | (vals[:, 0] == NEG_INF)              # an empty row's tau is final (+inf)
    all_complete = t == n_keys or bool(complete.all())
    if not all_complete:
        todo = torch.nonzero(~complete).squeeze(1)
        tau = tau.clone()
        if power is not None:
            top = vals[todo, :1] * unit                        # the rows' max (finite: the row has > t keys)
            tau_n, open_rows = newton_threshold(rows[todo] * unit - top, power)
            tau[todo] = tau_n + top
            todo = todo[open_rows]
        if todo.numel():                                       # no Newton rule, or Newton did not settle a row
            tau[todo] = tau_of_sorted(torch.sort(rows[todo], dim=1, descending=True).values)[0]
    return tau, (vals, idx, all_complete)


#: iterations of :func:`newton_threshold` before the rows left open go to the sort of `exact_threshold`
NEWTON_MAX_ITERS = 64


def newton_threshold(x: torch.Tensor, power: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(``tau`` [n, 1] with ``sum_j max(x_j - tau, 0)^power = 1``, open [n] bool), power 1 (sparsemax) or 2
    (1.5-entmax in z units), for rows ``x`` [n, S] shifted so that each row's max is 0 (-inf = disallowed).

    Newton from the lower bound ``tau = -1`` (there ``f(tau) = sum_j max(x_j - tau, 0)^power - 1 >= 0``): f is
    convex and decreasing, so the iterates rise monotonically to the root and the support ``{x > tau}`` only
    shrinks. Each iteration also solves the equation in closed form on the current support and stops a row
    when that solution keeps every support key above it (then it is the exact threshold). A few passes over
    the row whatever the scores; ``open`` marks the rows not settled within `NEWTON_MAX_ITERS`."""
    tau = torch.full((x.shape[0], 1), -1.0, dtype=x.dtype, device=x.device)
    out = torch.empty_like(tau)
    todo = torch.arange(x.shape[0], device=x.device)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    for _ in range(NEWTON_MAX_ITERS):
        support = x > tau
        r = support.sum(1, keepdim=True).to(x.dtype)
        xs = torch.where(support, x, zero)
        s1 = xs.sum(1, keepdim=True)
        if power == 1:
            polish = (s1 - 1) / r                              # Newton = the closed form (Michelot)
            nxt = polish
        else:
            s2 = (xs * xs).sum(1, keepdim=True)
            mean = s1 / r                                      # moments about the row max: no cancellation
            polish = mean - torch.sqrt(torch.clamp(1 / r - (s2 / r - mean * mean), min=0))
            lin = s1 - r * tau                                 # sum of (x - tau) over the support, > 0
            nxt = tau + (s2 - 2 * tau * s1 + r * tau * tau - 1) / (2 * lin)
        done = (x > polish).sum(1, keepdim=True).to(x.dtype) == r
        out[todo] = torch.where(done, polish, nxt)
        keep = ~done.squeeze(1)
        todo, x, tau = todo[keep], x[keep], nxt[keep]
        if not todo.numel():
            break
    open_rows = torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)
    open_rows[todo] = True
    return out, open_rows


def scatter_top(s: torch.Tensor, st: dict, weights_of_top: Callable, max_fraction: float = 0.25):
    """A sparse normalizer's ``torch_sparse`` from its ``exact_threshold`` selection ``st["_top"]``: (the
    selected keys' indices, ``weights_of_top(values, st)`` normalized to sum 1), or None (dense weights)
    when some row's support did not fit the first selection or the selection is over ``max_fraction`` of
    the row."""
    vals, idx, complete = st["_top"]
    if not complete or idx.shape[-1] > max_fraction * s.shape[-1]:
        return None
    shape = s.shape[:-1] + (-1,)
    w = weights_of_top(vals.view(shape), st)
    return idx.view(shape), safe_div(w, rowsum(w))


# ----------------------------------------------------------------------------------------------------
# the two-phase protocol of the sparse units (base.Normalizer, "the two-phase protocol")


def compact_candidates(s: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The scores s [..., S] where ``keep``, packed to the width of the widest row [..., m] (m >= 1, -inf padding,
    descending): a part's phase-1 candidates."""
    m = max(1, int(keep.sum(-1).max())) if keep.numel() else 1
    vals = torch.where(keep, s, torch.full((), NEG_INF, dtype=s.dtype, device=s.device))
    return torch.topk(vals, min(m, s.shape[-1]), dim=-1).values


def sum_parts(outs: list) -> torch.Tensor:
    """The sum of the parts' outputs in fp32 (fp64 for fp64), in outs[0]'s dtype."""
    acc = torch.float64 if outs[0].dtype == torch.float64 else torch.float32
    return sum(o.to(acc) for o in outs).to(outs[0].dtype)


class TwoPhaseRoot:
    """The two-phase protocol of a unit whose tau is the root of a decreasing ``F(tau) = sum_j w(x_j - tau) - 1``
    with ``x = a s`` (a = entmax15: 1/2, sparsemax: 1, entmax: alpha - 1), mixed into the unit's class; the unit
    supplies ``_x(s)`` (x from s), ``_w(d)`` (the unnormalized weights of ``d = x - tau``) and ``_u(d)`` (``u =
    a w'(d)``, the weight of its backward ``dS = u (dP - sum u dP / sum u)``: entmax15 d, sparsemax [d > 0],
    entmax d^(1/a - 1)).

    Phase 1: the local support ``{x > tau_part}`` (adding keys never lowers tau, so the union's support lies in
    the union of the local supports, and F over those candidates has the union's root). Phase 2: ``p_j = w(x_j -
    tau)`` at the union's tau, NOT divided by the part's sum (they are the union's final weights); the merge sums
    the parts' outputs. The summed mass is 1 up to the rounding of tau (not divided by: an exact tau needs no
    renormalization; tests check the mass with a column of ones in v).

    Size: the candidates are as wide as the widest local support, usually a few dozen keys; the worst case is
    a flat row (a fresh model's scores, all within 1 of the max), whose support is the whole part: phase 1 then
    moves as many numbers as that part's score rows (no safeguard beyond that: it stays exact).

    Gradients (exact; ``Normalizer.has_threshold_grads``): a part's output at a fixed tau has ``dS_j = u_j dP_j``
    (its ordinary backward with the row term 0) and ``dL/dtau = -sum_j w'(d_j) dP_j = -N / a`` with ``N = sum_j
    u_j dP_j`` over the part's keys; the implicit function ``sum_j w(x_j - tau) = 1`` over the union gives
    ``dtau/ds_j = a u_j / sum u`` for the union's keys, all of them among the candidates (so
    ``candidate_threshold_grad`` is ``g_tau a u(c) / sum u(c)``). Summed over the parts: ``dS_j = u_j (dP_j -
    sum_all u dP / sum_all u)``, the backward of the call over the union."""

    two_phase = True

    def threshold_candidates(self, s):
        tau = self.torch_stats(s.detach(), True)["tau"]          # (only compared: the candidates are s itself)
        return compact_candidates(s, self._x(s) > tau)

    def candidate_threshold(self, c):
        return {"tau": self.torch_stats(c, True)["tau"]}

    def torch_at_threshold(self, s, thr, masked):
        return {"tau": thr["tau"]}, self._w(torch.clamp(self._x(s) - thr["tau"], min=0))

    def kernel_threshold(self, thr):
        return thr["tau"]                                   # the kernels' tau is in x units too

    def merge_at_threshold(self, outs, stats, thr):
        return sum_parts(outs), {"tau": thr["tau"]}

    def _slope(self, t):
        """a = dx/ds, broadcast like the rows t [..., 1] (per head for a per-head alpha)."""
        return self._x(torch.ones_like(t))

    def _u_at(self, s, tau):
        return self._u(torch.clamp(self._x(s) - tau, min=0))         # -inf scores and +inf tau give 0

    def candidate_threshold_grad(self, c, thr, g_thr):
        u = self._u_at(c, thr["tau"])
        return g_thr["tau"] * self._slope(thr["tau"]) * safe_div(u, rowsum(u))

    def torch_dscores_at_threshold(self, s, p, dp, thr, st, g_st):
        ds = self._u_at(s, thr["tau"]) * dp
        return ds, {"tau": -rowsum(ds) / self._slope(thr["tau"])}

    def kernel_at_threshold_grad(self, dout, saved, st, g_st):
        # the forward's second sum at the given tau: O2 = sum_j u_j v_j / sum_j u_j and sum_g = sum_j u_j (raw)
        delta = (dout.float() * saved["o2"]).sum(-1)                          # N / sum u
        tau = st["tau"][..., None]
        return delta, {"tau": -(delta * saved["sum_g"]) / self._slope(tau)[..., 0]}
