"""Dense reference attention: the ground truth for tests and benchmarks.

It materializes the full score matrix ``(B, Hq, L, S)`` in float64 (by default) and applies the
semantics of ``shared/ARCHITECTURE.md`` literally. It is slow and memory-hungry on purpose: it is the
thing every fast path is compared against, and nothing else in the package copies it.

    s_ij = scale * q_i . k_j                     (scale defaults to 1/sqrt(Dqk))
    s_ij = -(n/2) ln(max(scale ||q_i - k_j||^2, tiny))   (instead, for a normalizer with score = "distance")
    s_ij = c * tanh(s_ij / c)                    (if softcap c)
    s_ij = s_ij + bias_ij                        (float mask; -inf or <= finfo.min excludes the key)
    s_ij = s_ij + g_ij                           (stochastic normalizers: their score noise of noise_seed)
    allowed_ij = bool mask & causal & not excluded
    p_i = N(s_i restricted to allowed_i)         (0 for a row with no allowed key)
    o_i = sum_j p_ij v_j
"""

from __future__ import annotations

import math

import torch

from .normalizers import Normalizer, parse

__all__ = ["attention", "scores_and_allowed"]


def scores_and_allowed(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal=False,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    enable_gqa: bool = False,
    dtype: torch.dtype = torch.float64,
    normalizer: str | Normalizer | None = None,
    noise_seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``s`` (B, Hq, L, S) in ``dtype`` and the bool ``allowed`` (B, Hq, L, S). With a ``normalizer``,
    its score form (``Normalizer.score``) and, if it is stochastic, its score noise for ``noise_seed`` (the
    seed of the call: ``triton_path.launch_forward``'s ``seed``, 0 by default)."""
    norm = None if normalizer is None else parse(normalizer)
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if Hq != Hkv:
        if not enable_gqa or Hq % Hkv:
            raise ValueError(f"reference: Hq={Hq}, Hkv={Hkv} needs enable_gqa=True and Hq % Hkv == 0")
        k = k.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, S, D)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if norm is not None and norm.score == "distance":  # the squared distances directly, floored at float32 tiny
        d2 = (q.to(dtype)[:, :, :, None, :] - k.to(dtype)[:, :, None, :, :]).square().sum(-1)  # (B, Hq, L, S)
        s = -0.5 * norm.score_power * torch.log(torch.clamp(scale * d2, min=torch.finfo(torch.float32).tiny))
    else:
        s = scale * torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2))  # (B, Hq, L, S)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    allowed = torch.ones(B, Hq, L, S, dtype=torch.bool, device=q.device)
    if causal is True:
        causal = "upper_left"
    if causal:
        i = torch.arange(L, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        offset = 0 if causal == "upper_left" else S - L
        if causal not in ("upper_left", "lower_right"):
            raise ValueError(f"reference: unknown causal {causal!r}")
        allowed = allowed & (j <= i + offset)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            lowest = torch.finfo(attn_mask.dtype).min
            excluded = attn_mask <= lowest  # also catches -inf
            allowed = allowed & ~excluded
            s = s + torch.where(excluded, torch.zeros((), dtype=dtype), attn_mask.to(dtype))
    if norm is not None and norm.stochastic:
        ar = lambda n: torch.arange(n, dtype=torch.int64, device=q.device)  # noqa: E731
        s = s + norm.score_noise(int(noise_seed), ar(B * Hq).view(B, Hq, 1, 1), ar(L)[:, None], ar(S)).to(dtype)
    return s, allowed.expand(B, Hq, L, S)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    normalizer: str | Normalizer = "softmax",
    *,
    causal=False,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    enable_gqa: bool = False,
    dropout_mask: torch.Tensor | None = None,
    return_weights: bool = False,
    dtype: torch.dtype = torch.float64,
    noise_seed: int = 0,
):
    """Dense attention in ``dtype`` (float64 by default).

    q (B, Hq, L, Dqk), k (B, Hkv, S, Dqk), v (B, Hkv, S, Dv) -> out (B, Hq, L, Dv) in ``dtype``.
    ``dropout_mask``, if given, multiplies the normalized weights (broadcastable to (B, Hq, L, S), e.g.
    ``keep / (1 - p)``). With ``return_weights=True`` returns ``(out, p)`` with ``p`` (B, Hq, L, S)
    the normalized weights before dropout. Differentiable (float64 autograd) w.r.t. q, k, v. ``noise_seed``:
    the seed of a stochastic normalizer's score noise (see `scores_and_allowed`).
    """
    norm = parse(normalizer)
    s, allowed = scores_and_allowed(
        q, k, causal=causal, attn_mask=attn_mask, scale=scale, softcap=softcap,
        enable_gqa=enable_gqa, dtype=dtype, normalizer=norm, noise_seed=noise_seed,
    )
    p = norm.reference_weights(s, allowed)  # (B, Hq, L, S)
    Hq, Hkv = q.shape[1], v.shape[1]
    vv = v.to(dtype)
    if Hq != Hkv:
        vv = vv.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, S, Dv)
    pd = p if dropout_mask is None else p * dropout_mask.to(dtype)
    out = torch.matmul(pd, vv)  # (B, Hq, L, Dv)
    return (out, p) if return_weights else out
