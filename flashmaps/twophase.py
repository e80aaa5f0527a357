"""Gradients through the two-phase protocol of the sparse units (``flashmaps.merge``'s docstring has the protocol).

The union's threshold is an ordinary tensor of the autograd graph, and each step is differentiable::

    cands_i = threshold_candidates(q, k_i)   # _Candidates: scores of k_i's keys -> dq, dk_i (a gather of scores)
    thr = global_threshold(cands)            # _GlobalThreshold: Normalizer.candidate_threshold_grad -> d cands
    out_i = attention(q, k_i, v_i, thr)      # _AtThreshold: the part at the FIXED threshold -> dq, dk_i, dv_i, d thr
    out = merge(outs, thr)                   # torch ops (a sum; top-k: the log-sum-exp merge of the parts' lse)

Entmax family (``rows.TwoPhaseRoot``): phase 2 gives ``dS_j = u_j dP_j`` and ``dL/dtau = -sum_j u_j dP_j / a``;
the threshold gives ``dtau/dc_j = a u_j / sum u`` over the candidates, which hold the union's support; summed,
``dS_j = u_j (dP_j - sum_all u dP / sum_all u)``: the backward of the call over the union, exactly. Top-k: the kept
sets are piecewise constant, the parts' lse carry the softmax statistic gradient (``dlse/ds_j = p_j``).

These are autograd.Functions over the backends' entry points (not custom ops: torch.compile breaks the graph
there), once differentiable (a double backward raises). Phase 1 always computes on the torch path (one matmul per chunk of rows), and so does its backward.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch.autograd.function import once_differentiable

from .normalizers import Normalizer

__all__ = ["candidates", "global_threshold", "at_threshold"]


class _Call(NamedTuple):
    """What a phase-1 or phase-2 call passes to its backend besides the tensors."""

    norm: Normalizer
    mask: Optional[torch.Tensor]
    causal: Optional[str]
    scale: float
    softcap: Optional[float]
    backend: str = "torch"
    names: tuple = ()               # the threshold's entries, in the order of the Function's inputs
    deterministic: bool = False


class _Candidates(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call, q, k):
        from . import torch_path

        ctx.call = call
        ctx.save_for_backward(q, k)
        return torch_path.threshold_candidates(q, k, call.norm, mask=call.mask, causal=call.causal, scale=call.scale,
                                               softcap=call.softcap)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        from . import torch_path

        q, k = ctx.saved_tensors
        c = ctx.call
        dq, dk = torch_path.threshold_candidates_backward(grad, q, k, c.norm, mask=c.mask, causal=c.causal,
                                                          scale=c.scale, softcap=c.softcap)
        return None, dq, dk


class _GlobalThreshold(torch.autograd.Function):
    """The threshold's values (computed outside, without a graph) attached to the candidates c."""

    @staticmethod
    def forward(ctx, norm, names, c, *vals):
        ctx.norm, ctx.names = norm, names
        ctx.save_for_backward(c, *vals)
        return tuple(x.clone() for x in vals)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        c, *vals = ctx.saved_tensors
        g = {n: x[..., None] for n, x in zip(ctx.names, grads) if x is not None}
        dc = None
        if g:
            thr = {n: x[..., None] for n, x in zip(ctx.names, vals)}
            dc = ctx.norm.candidate_threshold_grad(c, thr, g).to(c.dtype)
        return (None, None, dc) + (None,) * len(vals)


class _AtThreshold(torch.autograd.Function):
    """Phase 2 with gradients: (out, the part's own statistics (those the threshold does not give: top-k's lse))."""

    @staticmethod
    def forward(ctx, call, q, k, v, *thr_vals):
        norm = call.norm
        threshold = dict(zip(call.names, thr_vals))
        kw = dict(mask=call.mask, causal=call.causal, scale=call.scale, softcap=call.softcap)
        if call.backend == "torch":
            from . import torch_path

            out, st, extras = torch_path.forward(q, k, v, norm, dropout_p=0.0, seed=0, need_grad=True,
                                                 threshold=threshold, **kw)
        else:
            from . import triton_path

            res = triton_path.launch_forward(q, k, v, norm, save_extras=True, threshold=threshold, **kw)
            out, st, extras = res.out, [res.stats[n] for n in norm.stats], res.extras
        ctx.call = call
        ctx.save_for_backward(q, k, v, out, extras, *thr_vals, *st)
        return (out, *(x for n, x in zip(norm.stats, st) if n not in threshold))

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, *g_own):
        call = ctx.call
        norm, n_thr = call.norm, len(call.names)
        q, k, v, out, extras, *rest = ctx.saved_tensors
        thr_vals, st = rest[:n_thr], rest[n_thr:]
        own = [n for n in norm.stats if n not in call.names]
        g_st = dict(zip(own, g_own))
        kw = dict(mask=call.mask, causal=call.causal, scale=call.scale, softcap=call.softcap)
        if call.backend == "torch":
            from . import torch_path

            dq, dk, dv, dthr = torch_path.backward_at_threshold(dout, q, k, v, norm, dict(zip(call.names, thr_vals)),
                                                                g_st, **kw)
        else:
            from . import triton_path

            dq, dk, dv, dthr = triton_path.backward_at_threshold(dout, q, k, v, out, list(st), extras, norm, g_st,
                                                                 deterministic=call.deterministic, **kw)
        dthr = [dthr[n].to(x.dtype) if n in dthr else None for n, x in zip(call.names, thr_vals)]
        return (None, dq, dk, dv, *dthr)


def candidates(q, k, norm, *, mask, causal, scale, softcap) -> torch.Tensor:
    """Phase 1 (``functional.threshold_candidates``), differentiable w.r.t. q and k."""
    return _Candidates.apply(_Call(norm, mask, causal, scale, softcap), q, k)


def global_threshold(norm, c) -> dict:
    """The union's threshold {name: (B, Hq, L)} from the concatenated candidates c (B, Hq, L, M), differentiable."""
    with torch.no_grad():
        thr = {n: x[..., 0] for n, x in norm.candidate_threshold(c).items()}
    return dict(zip(thr, _GlobalThreshold.apply(norm, tuple(thr), c, *thr.values())))


def at_threshold(backend, q, k, v, norm, threshold, *, mask, causal, scale, softcap, deterministic):
    """Phase 2 with gradients w.r.t. q, k, v and the threshold: (out, stats reporting the given threshold)."""
    names = tuple(threshold)
    call = _Call(norm, mask, causal, scale, softcap, backend, names, bool(deterministic))
    out, *own = _AtThreshold.apply(call, q, k, v, *threshold.values())
    own = iter(own)
    return out, {n: threshold[n] if n in threshold else next(own) for n in norm.stats}
