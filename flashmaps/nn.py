"""``torch.nn`` building blocks on top of :func:`flashmaps.attention`.

    import flashmaps.nn

    attn = flashmaps.nn.Attention(512, num_heads=8, num_kv_heads=2, normalizer="entmax15", causal=True)
    y = attn(x)                        # self-attention: x (B, L, 512) -> y (B, L, 512)
    cross = flashmaps.nn.Attention(512, num_heads=8, kv_dim=768, normalizer="topk:16")
    y = cross(x, context)              # cross-attention: context (B, S, 768) -> y (B, L, 512)
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from .functional import _check_causal, _check_dropout, _check_scale, _check_softcap, attention
from .normalizers import Normalizer, parse

__all__ = ["Attention"]


def _positive_int(value, argname: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"Attention: {argname} must be a positive int, got {value!r}")
    return int(value)


class Attention(nn.Module):
    """Multi-head self- or cross-attention with a pluggable normalizer (grouped-query when
    ``num_kv_heads < num_heads``).

    ``y = out_proj(concat_h N(scale * q_h k_h^T + mask) v_h)`` with ``q = q_proj(x)``,
    ``k = k_proj(context)``, ``v = v_proj(context)`` (``context = x`` for self-attention) and ``N`` the
    normalizer applied row by row (softmax, taylor, entmax15, topk:<k>).

    Args:
        embed_dim: E, the feature size of ``x`` and of the output.
        num_heads: H, query heads.
        num_kv_heads: Hkv, key/value heads (default H); H must be a multiple of Hkv. Query head h reads
            kv head h // (H // Hkv), as in Llama's grouped-query attention.
        head_dim: D per head (default E // H, which then must divide evenly).
        kv_dim: feature size of ``context`` for cross-attention (default E).
        normalizer: "softmax", "taylor", "entmax15", "topk:<k>" or a Normalizer instance.
        causal: False, True / "upper_left" (key j visible to query i iff j <= i) or "lower_right"
            (j <= i + S - L: the queries are the last L positions of the keys, as with a KV cache).
        dropout: dropout on the normalized attention weights, applied only in training mode.
        bias: whether the four projections have a bias.
        softcap: None or c > 0: scores become ``c * tanh(s / c)`` (Gemma 2).
        scale: score scale (default 1/sqrt(D)).
        device, dtype: for the parameters.

    Shapes:
        x (B, L, E); context (B, S, kv_dim) or None; output (B, L, E).
        attn_mask: bool (True = may attend) or float (added to the scores; -inf excludes), broadcastable
        to (B, H, L, S); a key padding mask ``keep`` (B, S) is passed as ``keep[:, None, None, :]``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        kv_dim: int | None = None,
        normalizer: str | Normalizer = "softmax",
        causal=False,
        dropout: float = 0.0,
        bias: bool = True,
        softcap: float | None = None,
        scale: float | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        embed_dim = _positive_int(embed_dim, "embed_dim")
        num_heads = _positive_int(num_heads, "num_heads")
        num_kv_heads = num_heads if num_kv_heads is None else _positive_int(num_kv_heads, "num_kv_heads")
        if num_heads % num_kv_heads:
            raise ValueError(
                f"Attention: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads}), "
                "e.g. num_heads=8 with num_kv_heads=1, 2, 4 or 8"
            )
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(
                    f"Attention: embed_dim ({embed_dim}) is not divisible by num_heads ({num_heads}); "
                    "pass head_dim explicitly"
                )
            head_dim = embed_dim // num_heads
        head_dim = _positive_int(head_dim, "head_dim")
        kv_dim = embed_dim if kv_dim is None else _positive_int(kv_dim, "kv_dim")

        self.embed_dim, self.kv_dim = embed_dim, kv_dim
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.normalizer = parse(normalizer)
        self.causal = _check_causal(causal) or False
        self.dropout = _check_dropout(dropout)
        self.softcap = _check_softcap(softcap)
        self.scale = _check_scale(scale, head_dim)
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(kv_dim, num_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(kv_dim, num_kv_heads * head_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias, **factory)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, normalizer={self.normalizer}, causal={self.causal!r}, dropout={self.dropout}"
        )

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        attn_mask: torch.Tensor | None = None,
        causal=None,
    ) -> torch.Tensor:
        """x (B, L, E), context (B, S, kv_dim) or None (self-attention) -> (B, L, E).

        ``causal`` overrides the module's setting for this call (None keeps it); ``attn_mask`` is
        broadcastable to (B, H, L, S).
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"Attention: x must be (batch, seq_len, embed_dim={self.embed_dim}), got {got}")
        if context is None:
            if self.kv_dim != self.embed_dim:
                raise ValueError(
                    f"Attention: this module was built for cross-attention (kv_dim={self.kv_dim}); "
                    "pass context (batch, S, kv_dim)"
                )
            context = x
        elif (
            not isinstance(context, torch.Tensor)
            or context.dim() != 3
            or context.shape[-1] != self.kv_dim
            or context.shape[0] != x.shape[0]
        ):
            got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise ValueError(
                f"Attention: context must be (batch={x.shape[0]}, S, kv_dim={self.kv_dim}), got {got}"
            )
        causal = self.causal if causal is None else causal
        B, L, _ = x.shape
        S = context.shape[1]
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        k = self.k_proj(context).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        v = self.v_proj(context).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        out = attention(
            q, k, v, self.normalizer,
            causal=causal,
            attn_mask=attn_mask,
            scale=self.scale,
            softcap=self.softcap,
            enable_gqa=self.num_kv_heads != self.num_heads,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, L, D)
        out = out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)  # (B, L, H*D)
        return self.out_proj(out)  # (B, L, E)
