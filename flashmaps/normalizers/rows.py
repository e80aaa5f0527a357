"""Row helpers for writing normalizers in torch: reductions over the key dim, masked softmax, and the exact
threshold of the sparse normalizers (the torch side of the threshold engine).

Scores ``s`` are [..., S] with -inf exactly on disallowed keys (the torch path's convention) unless a
function takes an explicit ``allowed`` mask (the float64 references).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["NEG_INF", "rowsum", "safe_div", "finite_or_zero", "logsumexp", "lse_weights", "masked_softmax",
           "zero_disallowed", "exact_threshold", "scatter_top"]

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


#: first number of top scores per row the exact threshold looks at (grown 8x for the rows that need more)
FIRST_SELECTION = 64


def exact_threshold(rows: torch.Tensor, tau_of_sorted: Callable, first: int | None = None):
    """Exact per-row threshold of a sparse normalizer from the top of each row.

    ``rows`` [n, S] scores (-inf = disallowed); ``tau_of_sorted(top) -> (tau [n, 1], complete [n])`` computes
    the threshold from each row's t largest values sorted in descending order, and says per row whether
    those t values were enough (the support is smaller than t). Rows that need more get 8x more, up to a
    full sort. Returns (tau [n, 1], (top values [n, t0], their indices [n, t0], all_complete)) with t0 the
    first selection (default `FIRST_SELECTION`): when ``all_complete`` the weights are nonzero only on those
    keys."""
    first = FIRST_SELECTION if first is None else first
    n_keys = rows.shape[1]
    t = min(first + 1, n_keys)
    vals, idx = torch.topk(rows, t, dim=1, sorted=True)
    tau, complete = tau_of_sorted(vals)
    all_complete = t == n_keys or bool(complete.all())
    if not all_complete:
        todo = torch.nonzero(~complete).squeeze(1)
        tau = tau.clone()
        while todo.numel():
            t = min(8 * t, n_keys)
            tau_t, complete_t = tau_of_sorted(torch.topk(rows[todo], t, dim=1, sorted=True).values)
            done = complete_t | (t == n_keys)
            tau[todo[done]] = tau_t[done]
            todo = todo[~done]
    return tau, (vals, idx, all_complete)


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
