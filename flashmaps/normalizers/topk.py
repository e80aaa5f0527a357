"""topk: softmax over the k largest scores of each row (threshold semantics: ties at the k-th are kept)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from .base import Normalizer, register
from .rows import NEG_INF, logsumexp, lse_weights, masked_softmax, rowsum

__all__ = ["TopK", "topk_threshold"]

#: use the scattered (sparse) weights only when the listed keys are at most this fraction of the row
_SPARSE_FRACTION = 0.25


@register
@dataclasses.dataclass(frozen=True)
class TopK(Normalizer):
    """Top-k softmax: softmax over the keys whose score is at least ``tau_k``, the k-th largest
    allowed score of the row (``tau_k = -inf`` when the row has at most k allowed keys).

    Threshold semantics: every key tied with the k-th score is kept, so a row may keep more than k
    keys when scores tie. Row statistics: ``tau`` (the threshold ``tau_k``, in score units) and ``lse``
    (natural-log log-sum-exp over the kept keys). Backward: the softmax rule on the kept set.

    Merging partial results (the two-phase protocol): tau_k is global, so independent partials do not merge.
    1. each part's candidates are its k + 1 largest scores (the union's k + 1 largest lie among them);
    2. the union's ``tau_k`` is the k-th largest candidate, and ``cut`` (what phase 2 compares against) lies
    halfway between ``tau_k`` and the largest candidate below it: keeping ``s >= cut`` keeps exactly the keys
    with ``s >= tau_k`` even when a part recomputes its scores with other rounding (a key AT the threshold is
    the k-th largest itself; a plain ``s >= tau_k`` would drop it half of the time); ``cut = tau_k`` when no
    candidate lies below (ties); 3. each part's softmax over its kept keys (output and ``lse``), reporting the
    given ``tau``; 4. the log-sum-exp merge. Split-KV decoding runs the same protocol. Gradients through it are
    exact: the kept sets are piecewise constant in the scores (``cut`` gets none), each part's backward is the
    softmax rule on its kept keys with its ``lse``'s gradient as the row-term shift (``dlse/ds_j = p_j``, as
    softmax's ``stat_delta``), and ``tau`` (the k-th largest candidate) passes its gradient to that candidate.
    """

    k: int = 64
    name: ClassVar[str] = "topk"
    stats: ClassVar[tuple[str, ...]] = ("tau", "lse")
    empty_stats: ClassVar[tuple[float, ...]] = (NEG_INF, NEG_INF)
    sparse: ClassVar[bool] = True
    kernels: ClassVar[str] = "flashmaps.kernels.topk"
    spec_help: ClassVar[str] = "topk:<k>"
    order: ClassVar[int] = 30
    formula: ClassVar[str] = "softmax over the keys with `s_j >= tau_k`, the k-th largest score (ties kept)"
    merge_rule: ClassVar[str] = ("two-phase: local top-(k+1) -> global `tau_k` -> log-sum-exp merge of the parts' "
                                 "kept keys (`merge(..., threshold=)`); exact gradients")
    two_phase: ClassVar[bool] = True

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int):
            raise TypeError(f"TopK(k): k must be a positive int, got {type(self.k).__name__} {self.k!r}")
        if self.k < 1:
            raise ValueError(f"TopK(k): k must be >= 1, got {self.k}; use e.g. TopK(64) or 'topk:64'")

    @classmethod
    def from_spec(cls, arg, *, argname="normalizer"):
        if not arg:
            raise ValueError(f"{argname}: 'topk' needs k, written 'topk:<k>' (e.g. 'topk:64')")
        try:
            k = int(arg)
        except ValueError:
            raise ValueError(
                f"{argname}: malformed top-k spec 'topk:{arg}'; write 'topk:<k>' with a positive integer k "
                "(e.g. 'topk:64')"
            ) from None
        if k < 1:
            raise ValueError(f"{argname}: top-k needs k >= 1, got 'topk:{arg}' (e.g. 'topk:64')")
        return cls(k)

    @property
    def spec(self) -> str:
        return f"topk:{self.k}"

    @classmethod
    def default(cls) -> "TopK":
        return cls(64)

    @classmethod
    def examples(cls) -> list["TopK"]:
        return [cls(5)]

    def reference_weights(self, s, allowed):
        tau = topk_threshold(s, allowed, self.k)
        return masked_softmax(s, allowed & (s >= tau))

    def reference_stats(self, s, allowed):
        tau = topk_threshold(s, allowed, self.k)
        kept = torch.where(allowed & (s >= tau), s, torch.full_like(s, NEG_INF))
        return {"tau": tau[..., 0], "lse": torch.logsumexp(kept, -1)}

    def torch_stats(self, s, masked):
        k, n_keys = self.k, s.shape[-1]
        if k >= n_keys:  # every allowed key is kept
            tau = torch.full(s.shape[:-1] + (1,), NEG_INF, dtype=s.dtype, device=s.device)
            return {"tau": tau, "lse": logsumexp(s, True)}
        vals, idx = torch.topk(s, k + 1, dim=-1, sorted=True)  # [.., bl, k+1]
        kth, next_ = vals[..., k - 1: k], vals[..., k: k + 1]
        tau = torch.where(next_ > NEG_INF, kth, torch.full_like(kth, NEG_INF))  # -inf iff <= k allowed keys
        neg = torch.full((), NEG_INF, dtype=s.dtype, device=s.device)
        if bool((next_ == kth).logical_and_(next_ > NEG_INF).any()):  # a tie at tau: more than k kept keys
            return {"tau": tau, "lse": logsumexp(torch.where(s >= tau, s, neg), True)}
        kept = torch.where(vals >= tau, vals, neg)
        return {"tau": tau, "lse": logsumexp(kept, True), "_top": (kept, idx)}

    def torch_weights(self, s, st, masked):
        sk = torch.where(s >= st["tau"], s, torch.full((), NEG_INF, dtype=s.dtype, device=s.device))
        return lse_weights(sk, st["lse"], True)

    def torch_sparse(self, s, st):
        if "_top" not in st or self.k + 1 > _SPARSE_FRACTION * s.shape[-1]:
            return None
        kept, idx = st["_top"]
        return idx, lse_weights(kept, st["lse"], True)

    def torch_dscores(self, s, p, dp, st):
        return p * (dp - rowsum(p * dp))          # the softmax rule; p = 0 off the kept set

    # the two-phase protocol (base.Normalizer)

    def threshold_candidates(self, s):
        return torch.topk(s, min(self.k + 1, s.shape[-1]), dim=-1).values

    def candidate_threshold(self, c):
        neg = torch.full(c.shape[:-1] + (1,), NEG_INF, dtype=c.dtype, device=c.device)
        if c.shape[-1] <= self.k:                    # at most k keys in the union: keep every one
            return {"tau": neg, "cut": neg}
        srt = torch.sort(c, dim=-1, descending=True).values
        tau = torch.where(srt[..., self.k: self.k + 1] > NEG_INF, srt[..., self.k - 1: self.k], neg)
        below = torch.where(srt < tau, srt, neg).amax(-1, keepdim=True)           # the largest candidate < tau
        cut = tau - (tau - below) * 0.5
        cut = torch.where((below > NEG_INF) & (cut > below) & (cut <= tau), cut, tau)
        return {"tau": tau, "cut": cut}

    def torch_at_threshold(self, s, thr, masked):
        sk = torch.where(s >= thr["cut"], s, torch.full((), NEG_INF, dtype=s.dtype, device=s.device))
        lse = logsumexp(sk, True)
        return {"tau": thr["tau"], "lse": lse}, lse_weights(sk, lse, True)

    def kernel_threshold(self, thr):
        from ..kernels.contract import LOG2E
        return thr["cut"] * LOG2E.value                   # kernel scores are in log2 units

    def merge_at_threshold(self, outs, stats, thr):
        from .softmax import merge_lse
        out, st = merge_lse(outs, [x["lse"] for x in stats])
        return out, {"tau": thr["tau"], "lse": st["lse"]}

    def candidate_threshold_grad(self, c, thr, g_thr):
        with torch.enable_grad():                # candidate_threshold is sorts and selections: autograd through it
            leaf = c.detach().requires_grad_()
            out = self.candidate_threshold(leaf)
            names = [n for n in g_thr if out[n].requires_grad]
            if not names:                        # (at most k candidates: tau = -inf, no dependence)
                return torch.zeros_like(c)
            return torch.autograd.grad([out[n] for n in names], leaf, [g_thr[n] for n in names])[0]

    def torch_dscores_at_threshold(self, s, p, dp, thr, st, g_st):
        from .softmax import lse_stat_delta
        g = g_st.get("lse")
        delta = rowsum(p * dp) - (0 if g is None else lse_stat_delta(st["lse"], g))
        return p * (dp - delta), {}

    def kernel_at_threshold_grad(self, dout, saved, st, g_st):
        from .softmax import lse_stat_delta
        g = g_st.get("lse")
        return (None if g is None else lse_stat_delta(st["lse"], g)), {}

    def sink_stats(self, stats, sinks):          # attention sinks (flashmaps.sinks): one more kept logit
        from ..sinks import lse_sink_stats
        lse, w = lse_sink_stats(stats[1], sinks)
        return [stats[0], lse], w

    def sink_coef(self, stats, sinks):
        from ..sinks import lse_sink_coef
        return lse_sink_coef(stats[1], sinks)


def topk_threshold(s: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest allowed score per row, shape ``s.shape[:-1] + (1,)``; ``-inf`` where the row
    has at most ``k`` allowed keys (then every allowed key is kept)."""
    n_keys = s.shape[-1]
    neg_inf = torch.tensor(NEG_INF, dtype=s.dtype, device=s.device)
    if k >= n_keys or n_keys == 0:
        return torch.full(s.shape[:-1] + (1,), NEG_INF, dtype=s.dtype, device=s.device)
    sm = torch.where(allowed, s, neg_inf)
    kth = torch.topk(sm, k, dim=-1).values[..., -1:]
    n = allowed.sum(-1, keepdim=True)
    return torch.where(n > k, kth, neg_inf)
