"""softmax: ``p_j = exp(s_j - m) / l``, the online-softmax recurrence of FlashAttention."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from .base import Normalizer, register
from .rows import NEG_INF, logsumexp, lse_weights, masked_softmax, rowsum

__all__ = ["Softmax", "merge_lse", "lse_stat_delta"]


@register
@dataclasses.dataclass(frozen=True)
class Softmax(Normalizer):
    """Softmax: ``p_j = exp(s_j - m) / l`` with ``m = max_j s_j``, ``l = sum_j exp(s_j - m)``.

    Row statistics: ``lse = m + log(l)`` (natural log; ``-inf`` for a row with no allowed key).
    Backward: ``dS = P * (dP - delta)``, ``delta = rowsum(dO * O)``.
    Merge over disjoint key sets: ``lse = logsumexp_i(lse_i)``, ``out = sum_i exp(lse_i - lse) out_i``.
    Gradient through ``lse``: ``dlse/ds_j = p_j``, so a gradient ``g`` of ``lse`` shifts the row term,
    ``delta' = delta - g`` (``stat_delta``; 0 on an empty row), and the merge is differentiable.
    """

    name: ClassVar[str] = "softmax"
    stats: ClassVar[tuple[str, ...]] = ("lse",)
    empty_stats: ClassVar[tuple[float, ...]] = (NEG_INF,)
    kernels: ClassVar[str] = "flashmaps.kernels.softmax"
    order: ClassVar[int] = 0
    formula: ClassVar[str] = "`exp(s_j - m) / sum_i exp(s_i - m)`; `lse` in natural log"
    merge_rule: ClassVar[str] = "log-sum-exp of `lse`"

    def reference_weights(self, s, allowed):
        return masked_softmax(s, allowed)

    def reference_stats(self, s, allowed):
        return {"lse": torch.logsumexp(torch.where(allowed, s, torch.full_like(s, NEG_INF)), -1)}

    def torch_stats(self, s, masked):
        return {"lse": logsumexp(s, masked)}

    def torch_weights(self, s, st, masked):
        return lse_weights(s, st["lse"], masked)          # exp(-inf) = 0: disallowed keys, empty rows

    def torch_dscores(self, s, p, dp, st):
        return p * (dp - rowsum(p * dp))

    def merge(self, outs, stats):
        return merge_lse(outs, [st["lse"] for st in stats])

    def stat_delta(self, stats, stat_grads):
        return lse_stat_delta(stats[0], stat_grads[0])

    def sink_stats(self, stats, sinks):          # attention sinks: flashmaps.sinks
        from ..sinks import lse_sink_stats
        lse, w = lse_sink_stats(stats[0], sinks)
        return [lse], w

    def sink_coef(self, stats, sinks):
        from ..sinks import lse_sink_coef
        return lse_sink_coef(stats[0], sinks)

    def torch_native_forward(self, q, k, v, *, mask, causal, scale, softcap, dropout_p):
        route = _sdpa_route(q, k, v, mask, causal, softcap, dropout_p)
        if route is None:
            return None
        fmask, is_causal = route
        out, lse = _sdpa_forward(q, k, v, fmask, is_causal, scale)
        lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
        if fmask is not None:  # the op reports 0 for a row with no allowed key; the contract says -inf
            lse = lse.masked_fill(_empty_rows(fmask, is_causal, (*q.shape[:3], k.shape[2])), NEG_INF)
        return out, [lse]

    def torch_native_backward(self, dout, q, k, v, out, stats, *, mask, causal, scale, softcap, dropout_p):
        route = _sdpa_route(q, k, v, mask, causal, softcap, dropout_p)
        if route is None:
            return None
        fmask, is_causal = route
        return _sdpa_backward(dout, q, k, v, out, stats[0], fmask, is_causal, scale)


def merge_lse(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Softmax results over disjoint key sets -> the result over their union, in fp32 (or fp64): the
    log-sum-exp merge. A part with lse = -inf (no allowed key there) has weight 0."""
    acc = torch.float64 if outs[0].dtype == torch.float64 else torch.float32
    lse_all = torch.stack([x.to(acc) for x in lses])                                   # [P, B, H, L]
    empty = (lse_all == NEG_INF).all(0)             # -inf if every part is (logsumexp's gradient there: NaN)
    lse = torch.logsumexp(torch.where(empty, 0.0, lse_all), 0).masked_fill(empty, NEG_INF)
    w = torch.exp(lse_all - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))   # [P, B, H, L]
    out = sum(wi[..., None] * o.to(acc) for wi, o in zip(w, outs))
    return out.to(outs[0].dtype), {"lse": lse}


def lse_stat_delta(lse: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The row-term shift of a log-sum-exp statistic (``Normalizer.stat_delta``): ``g`` (``dlse/ds_j = p_j``,
    times the normalizer's own chain), 0 on rows with no allowed key (``lse = -inf``, all weights 0)."""
    return torch.where(lse == NEG_INF, torch.zeros((), dtype=g.dtype, device=g.device), g)


# ----------------------------------------------------------------------------------------------------
# the torch path's native route: torch's CPU flash-attention op (the SDPA kernel, which returns logsumexp;
# its backward op takes it) whenever the semantics match exactly


def _compact(mask: torch.Tensor) -> torch.Tensor:
    """The smallest view of a broadcast view: size 1 wherever the stride is 0."""
    return mask[tuple(slice(0, 1) if st == 0 else slice(None) for st in mask.stride())]


#: at most this many query rows: the torch path's chunk loop instead of torch's CPU flash op (decoding)
DECODE_ROWS = 16


def _sdpa_route(q, k, v, mask, causal, softcap, dropout_p):
    """(float mask in q's dtype or None, is_causal) when the SDPA CPU op computes exactly our softmax,
    else None. Conditions: no softcap and no dropout (its dropout RNG is not ours), unit stride on the
    head dim and Dv == Dqk (the op assumes both), causal upper-left (or lower-right with L == S), more than DECODE_ROWS query rows, and a mask that
    converts exactly to q's dtype; excluded entries become -inf (the op would add finfo.min and give a
    fully excluded row the uniform average instead of 0)."""
    if softcap is not None or dropout_p > 0 or q.device.type != "cpu":
        return None
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or v.shape[-1] != q.shape[-1]:
        return None
    L, S = q.shape[2], k.shape[2]
    if causal not in (None, "upper_left", "lower_right"):      # a sliding window (flashmaps.window)
        return None
    if L <= DECODE_ROWS:  # decoding: the chunk loop's two matmuls read K/V 3-5x faster than the op (measured,
        return None       # bench/results/cpu/decode: 11-12 GB/s vs 2.2-3.0 GB/s at S = 4k-64k, D = 128)
    if causal == "lower_right" and L != S:
        return None
    # the op hides a NaN score (it returns a finite row): the chunk loop applies the non-finite rule. Every
    # score is finite when |q|max |k|max D is (one pass over q and k, none over the scores).
    inf = float("inf")
    bound = torch.linalg.vector_norm(q, inf).double() * torch.linalg.vector_norm(k, inf).double() * q.shape[-1]
    if not bool(bound < 1e37):
        return None
    is_causal = causal is not None
    if mask is None:
        return None, is_causal
    cm = _compact(mask)
    if cm.dtype != torch.bool and bool((torch.isnan(cm) | (cm == float("inf"))).any()):
        return None
    if cm.dtype == torch.bool:
        allowed = cm
        fm = torch.zeros(cm.shape, dtype=q.dtype, device=q.device)
    else:
        lossless = cm.dtype == q.dtype or (
            q.dtype in (torch.float32, torch.float64) and cm.dtype.itemsize < q.dtype.itemsize
        )
        if not lossless:
            return None
        allowed = cm > torch.finfo(cm.dtype).min
        fm = cm.to(q.dtype)
    fm = fm.masked_fill(~allowed, NEG_INF).expand(mask.shape)
    return fm, is_causal


def _sdpa_forward(q, k, v, fmask, is_causal, scale):
    """aten's CPU flash-attention forward: (out, lse) with lse = 0 for a row with no allowed key."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, is_causal, attn_mask=fmask, scale=scale
    )


def _sdpa_backward(dout, q, k, v, out, lse, fmask, is_causal, scale):
    lse = torch.where(lse == NEG_INF, torch.zeros((), dtype=lse.dtype), lse)  # back to the op's convention
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.contiguous(), q, k, v, out, lse, 0.0, is_causal, attn_mask=fmask, scale=scale
    )


def _empty_rows(fmask, is_causal, shape):
    """Bool (B, Hq, L): rows with no allowed key, given a -inf float mask (broadcast view) and causal."""
    B, Hq, L, S = shape
    allowed = _compact(fmask) > NEG_INF  # small broadcastable shape
    if is_causal:
        i = torch.arange(L, device=fmask.device)[:, None]
        j = torch.arange(S, device=fmask.device)[None, :]
        allowed = allowed & (j <= i)
    return ~allowed.any(-1).expand(B, Hq, L)
