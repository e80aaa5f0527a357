"""Attention sinks (gpt-oss): one learned logit ``sink_h`` per query head that joins every row's denominator
with a zero value vector.

For softmax, ``p_j = exp(s_j) / (exp(sink_h) + sum_k exp(s_k))``, so with the plain call's ``lse``::

    lse_sink = logaddexp(lse, sink_h),   out_sink = out * exp(lse - lse_sink) = out * sigmoid(lse - sink_h)

The call with the sink is softmax over the keys plus one key of value 0, so its backward is the ordinary one
given ``(out_sink, lse_sink)``: recomputed weights ``exp(s - lse_sink)``, row term ``rowsum(dO * out_sink)``,
``dS = P (dP - delta)``. The sink's own gradient: its weight ``p_sink = exp(sink_h - lse_sink)`` and
``d p_j / d sink = -p_j p_sink``, so ``dL/dsink_h = -sum_{b,i} p_sink * rowsum(dO * out_sink)``.

Which normalizers take a sink (``Normalizer.sink_stats``): the ones whose denominator is a log-sum-exp
statistic, softmax (``lse``) and topk (its ``lse``: the sink is one more kept logit, whatever tau_k).
The others refuse: a threshold normalizer (entmax, sparsemax) has no denominator to add a term to (the sink
would have to enter the threshold equation), and for taylor a sink would add ``f(sink)`` to ``Z`` (possible,
not provided). A row with no allowed key keeps output 0 (all its weight goes to the sink).
"""

from __future__ import annotations

import torch

__all__ = ["lse_sink_stats", "lse_sink_coef"]


def _heads(sinks: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """sinks (Hq,) as (1, Hq, 1) in the dtype of the statistic ``like`` (B, Hq, L)."""
    return sinks.to(device=like.device, dtype=like.dtype).view(1, -1, 1)


def lse_sink_stats(lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse_sink, w) from the plain call's natural-log ``lse`` (B, Hq, L) (-inf for an empty row) and
    ``sinks`` (Hq,): ``lse_sink = logaddexp(lse, sink)``, ``w = exp(lse - lse_sink)`` (0 for an empty row)."""
    sk = _heads(sinks, lse)
    lse_sink = torch.logaddexp(lse, sk)
    return lse_sink, torch.exp(lse - lse_sink)


def lse_sink_coef(lse_sink: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """The sink's weight ``exp(sink_h - lse_sink)`` (B, Hq, L)."""
    return torch.exp(_heads(sinks, lse_sink) - lse_sink)
