"""Packed variable-length sequences and the KV-cache call, in flash_attn's tensor layouts.

    attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, normalizer, ...)
        q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv): sequences packed without padding;
        sequence b is the rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q (and likewise for k, v).
    attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=..., block_table=None, ...)
        q (B, L, Hq, D); caches (B, S_max, Hkv, D), or (num_blocks, block_size, Hkv, D) with
        block_table (B, max_blocks) (a paged cache); optional in-place append of the new k, v (B, L_new, Hkv, D).

Varlen on the Triton backend is ONE launch per kernel over all the sequences (`flashmaps.triton_varlen`: the
forward, and the backward's preprocess, dK/dV and dQ, or the atomic-dQ pair), equal to running each sequence
separately; it falls back to one :func:`flashmaps.attention` call per sequence (views of the packed tensors: no
padding, no mask, no copy of q, k or v) for what the one launch does not do (`triton_varlen.supported`: dropout,
the stochastic units' noise, a unit whose options depend on the key count such as sigmoid's default b) and on
the torch (CPU) path. Validating cu_seqlens costs one tiny device->host read (8 flags), no per-sequence loop.
Both run every registered normalizer (both backends, gradients, GQA, windows); the KV cache as one call over the cache with a key-length mask per sequence, lower-right
aligned (the last query row is the newest key). A decoding step (L <= 16 query rows) takes the Triton
forward's split-KV path (``triton_path.split_plan``: the cache's keys split across programs, merged by the
unit's rule, or its two-phase protocol for the sparse units).
"""

from __future__ import annotations

import torch

from . import functional as fn
from .normalizers import Normalizer, parse
from . import triton_varlen
from .window import check_window, encode as encode_window

__all__ = ["attention_varlen", "attention_with_kvcache"]


def _check_cu_type(cu, argname: str) -> None:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{argname} must be a 1-D int32/int64 tensor of sequence starts (batch + 1 entries)")
    if cu.numel() < 2:
        raise ValueError(f"{argname} must have at least 2 entries (batch + 1), got {cu.numel()}")


def _check_max_type(m, argname: str) -> None:
    if isinstance(m, bool) or not isinstance(m, int):
        raise TypeError(f"{argname} must be an int, got {type(m).__name__}")


def _check_cu(cq, ck, total_q: int, total_k: int, max_q: int, max_k: int) -> None:
    """The values of cu_seqlens_q / _k (start at 0, non-decreasing, end at the packed total) and the max lengths,
    with tensor ops and ONE device->host read of 8 flags (CUDA: one tiny copy and sync; no per-sequence loop)."""
    flags = []
    for cu, total, m in ((cq, total_q, max_q), (ck, total_k, max_k)):
        d = cu[1:] - cu[:-1]
        flags += [cu[0] != 0, (d < 0).any(), cu[-1] != total, d.max() > m]
    bad = torch.stack(flags).tolist()
    for at, (cu, total, m, argname) in enumerate(((cq, total_q, max_q, "cu_seqlens_q"),
                                                  (ck, total_k, max_k, "cu_seqlens_k"))):
        vals = cu.tolist() if any(bad[4 * at: 4 * at + 4]) else None       # (error paths only)
        if bad[4 * at] or bad[4 * at + 1]:
            raise ValueError(f"{argname} must start at 0 and be non-decreasing, got {vals[:8]}...")
        if bad[4 * at + 2]:
            raise ValueError(f"{argname} must end at the number of packed rows ({total}), got {vals[-1]}")
        if bad[4 * at + 3]:
            longest = max(b - a for a, b in zip(vals, vals[1:]))
            name = "max_seqlen_" + argname[-1]
            raise ValueError(f"{name} = {m} is less than the longest sequence ({longest})")


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                     normalizer: str | Normalizer = "softmax", *, causal=False, window=None, scale=None,
                     softcap=None, dropout_p: float = 0.0, return_stats: bool = False, backend: str = "auto"):
    """Attention over packed variable-length sequences (flash_attn's ``flash_attn_varlen_func`` layout).

    Args:
        q: (total_q, Hq, D); k: (total_k, Hkv, D); v: (total_k, Hkv, Dv). Hq a multiple of Hkv (GQA).
        cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32/int64, the start of each sequence and the total.
        max_seqlen_q, max_seqlen_k: the longest query / key sequence (checked).
        normalizer, causal, window, scale, softcap, dropout_p, backend: as :func:`flashmaps.attention`, per
            sequence (causal=True is upper-left as SDPA, "lower_right" aligns the last query with the last key).
        return_stats: also return {name: (Hq, total_q)} (flash_attn's lse layout).

    Returns:
        out (total_q, Hq, Dv) in v's dtype [, stats]. Equal to running each sequence separately.

    The Triton backend runs ONE launch per kernel over every sequence (`flashmaps.triton_varlen`; with gradients
    through the statistics as :func:`flashmaps.attention`); dropout, the stochastic units and a unit whose options
    depend on the key count (sigmoid's default b) run one call per sequence, as does the torch (CPU) backend.
    The checks of cu_seqlens read 8 flags from the device (one tiny copy), with no per-sequence host loop.
    """
    norm = parse(normalizer)
    for name, x in (("q", q), ("k", k), ("v", v)):
        fn._check_tensor(x, name)
        if x.dim() != 3:
            raise ValueError(f"attention_varlen: {name} must be (total, heads, head_dim), got shape {tuple(x.shape)}")
    if k.shape[0] != v.shape[0] or k.shape[1] != v.shape[1]:
        raise ValueError(f"attention_varlen: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same total and heads")
    _check_cu_type(cu_seqlens_q, "cu_seqlens_q")
    _check_cu_type(cu_seqlens_k, "cu_seqlens_k")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.numel() - 1} sequences and cu_seqlens_k "
                         f"{cu_seqlens_k.numel() - 1}; they must match")
    _check_max_type(max_seqlen_q, "max_seqlen_q")
    _check_max_type(max_seqlen_k, "max_seqlen_k")
    _check_cu(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    dropout_p = fn._check_dropout(dropout_p)
    if fn._choose_backend(backend, q.device, q.dtype) == "triton" and q.shape[0] and k.shape[0] and \
            triton_varlen.supported(norm, max_seqlen_k, dropout_p):
        return _one_launch(q, k, v, cu_seqlens_q.to(q.device), cu_seqlens_k.to(q.device), max_seqlen_q, max_seqlen_k,
                           norm, causal, window, scale, softcap, return_stats)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, stats = [], []
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]].transpose(0, 1).unsqueeze(0)          # (1, Hq, L_b, D) views
        kb = k[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)
        vb = v[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)
        res = fn.attention(qb, kb, vb, norm, causal=causal, window=window, scale=scale, softcap=softcap,
                           enable_gqa=True, dropout_p=dropout_p, return_stats=return_stats, backend=backend)
        out_b, st_b = res if return_stats else (res, None)
        outs.append(out_b[0].transpose(0, 1))                         # (L_b, Hq, Dv)
        stats.append(st_b)
    out = torch.cat(outs, 0)
    if not return_stats:
        return out
    return out, {name: torch.cat([st[name][0] for st in stats], 1) for name in norm.stats}


def _one_launch(q, k, v, cq, ck, max_q, max_k, norm, causal, window, scale, softcap, return_stats):
    """The Triton path's one launch over every sequence (`flashmaps.triton_varlen`), after the checks that
    :func:`flashmaps.attention` makes."""
    fn._check_qkv(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], True)
    fn._check_head_tensor(norm.head_params(), q.shape[1], q.device, f"{norm.name}'s per-head parameters")
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {type(return_stats).__name__}")
    band = encode_window(fn._check_causal(causal), check_window(window))
    out, stats = triton_varlen.attention(q, k, v, cq, ck, max_q, max_k, norm, causal=band,
                                         scale=fn._check_scale(scale, q.shape[2]), softcap=fn._check_softcap(softcap),
                                         deterministic=torch.are_deterministic_algorithms_enabled())
    return (out, stats) if return_stats else out


def _cache_lengths(cache_seqlens, B: int, S_max: int, device) -> torch.Tensor:
    if cache_seqlens is None:
        return torch.full((B,), S_max, dtype=torch.int64, device=device)
    if isinstance(cache_seqlens, bool):
        raise TypeError("cache_seqlens must be an int or a (batch,) int tensor")
    if isinstance(cache_seqlens, int):
        lens = torch.full((B,), cache_seqlens, dtype=torch.int64, device=device)
    elif isinstance(cache_seqlens, torch.Tensor) and cache_seqlens.dtype in (torch.int32, torch.int64):
        if cache_seqlens.shape != (B,):
            raise ValueError(f"cache_seqlens must have shape ({B},), got {tuple(cache_seqlens.shape)}")
        lens = cache_seqlens.to(device=device, dtype=torch.int64)
    else:
        raise TypeError("cache_seqlens must be an int or a (batch,) int32/int64 tensor")
    if bool((lens < 0).any()) or bool((lens > S_max).any()):
        raise ValueError(f"cache_seqlens must be in [0, {S_max}] (the cache's capacity), got {lens.tolist()}")
    return lens


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens=None, block_table=None,
                           normalizer: str | Normalizer = "softmax", causal=False, window=None, scale=None,
                           softcap=None, return_stats: bool = False, backend: str = "auto"):
    """Attention of new queries against a KV cache (flash_attn's ``flash_attn_with_kvcache`` layout).

    Args:
        q: (B, L, Hq, D), the new tokens' queries.
        k_cache, v_cache: (B, S_max, Hkv, D / Dv), or with ``block_table`` a paged cache
            (num_blocks, block_size, Hkv, D / Dv).
        k, v: optional (B, L_new, Hkv, D / Dv): written into the cache IN PLACE at positions
            ``cache_seqlens[b] ..`` (the cache must have room), then attended to.
        cache_seqlens: int or (B,) int tensor, the keys already in each sequence's cache (default: all of it).
        block_table: (B, max_blocks) int32/int64, block ``block_table[b, n]`` holds keys
            ``[n * block_size, (n + 1) * block_size)`` of sequence b.
        normalizer, scale, softcap, backend: as :func:`flashmaps.attention`.
        causal: True aligns the queries with the NEWEST keys (lower-right: query row i sees the keys
            ``j <= i + n_b - L`` with n_b the sequence's keys after the append). window: (left, right) in the
            same alignment.
        return_stats: also return {name: (B, Hq, L)}.

    Returns:
        out (B, L, Hq, Dv) [, stats]. Equal to :func:`flashmaps.attention` on each sequence's first n_b keys.
    """
    norm = parse(normalizer)
    fn._check_tensor(q, "q")
    if q.dim() != 4:
        raise ValueError(f"attention_with_kvcache: q must be (B, L, Hq, D), got shape {tuple(q.shape)}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        fn._check_tensor(x, name)
        if x.dim() != 4:
            raise ValueError(f"attention_with_kvcache: {name} must be 4-D, got shape {tuple(x.shape)}")
    if (k is None) != (v is None):
        raise ValueError("attention_with_kvcache: give both k and v to append, or neither")
    win = check_window(window)
    if not isinstance(causal, bool):
        raise TypeError(f"attention_with_kvcache: causal must be a bool (lower-right aligned), got {causal!r}")
    B, L, Hq, D = q.shape
    paged = block_table is not None
    if paged:
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.shape[0] != B or \
                block_table.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"block_table must be a (B={B}, max_blocks) int32/int64 tensor")
        nblk, bs = k_cache.shape[:2]
        if bool(((block_table < 0) | (block_table >= nblk)).any()):
            raise ValueError(f"block_table entries must be block indices in [0, {nblk})")
        S_max = block_table.shape[1] * bs
    else:
        if k_cache.shape[0] != B:
            raise ValueError(f"k_cache has batch {k_cache.shape[0]}, q has {B}")
        S_max = k_cache.shape[1]
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} must match k_cache {tuple(k_cache.shape)} but for the "
                         "last dim")
    lens = _cache_lengths(cache_seqlens, B, S_max, q.device)
    if k is not None:
        for name, x, cache in (("k", k, k_cache), ("v", v, v_cache)):
            fn._check_tensor(x, name)
            if x.dim() != 4 or x.shape[0] != B or x.shape[2:] != cache.shape[2:]:
                raise ValueError(f"attention_with_kvcache: {name} must be (B={B}, L_new, {cache.shape[2]}, "
                                 f"{cache.shape[3]}), got {tuple(x.shape)}")
        if k.shape[1] != v.shape[1]:
            raise ValueError("attention_with_kvcache: k and v must have the same L_new")
        n_new = k.shape[1]
        if bool((lens + n_new > S_max).any()):
            raise ValueError(f"attention_with_kvcache: no room to append {n_new} keys: cache_seqlens + L_new must "
                             f"be <= {S_max}")
        pos = lens[:, None] + torch.arange(n_new, device=lens.device)[None, :]          # (B, L_new)
        with torch.no_grad():
            if paged:
                bs = k_cache.shape[1]
                blk = block_table.to(torch.int64).gather(1, pos // bs)
                k_cache[blk, pos % bs] = k.to(k_cache.dtype)
                v_cache[blk, pos % bs] = v.to(v_cache.dtype)
            else:
                rows = torch.arange(B, device=lens.device)[:, None]
                k_cache[rows, pos] = k.to(k_cache.dtype)
                v_cache[rows, pos] = v.to(v_cache.dtype)
        lens = lens + n_new
    if paged:                                 # the sequences' blocks in order: (B, S_max, Hkv, D)
        idx = block_table.to(torch.int64)
        kc = k_cache[idx].flatten(1, 2)
        vc = v_cache[idx].flatten(1, 2)
    else:
        kc, vc = k_cache, v_cache
    S = kc.shape[1]
    # key j of sequence b is allowed for query i when j < n_b and (causal / window, lower-right on n_b)
    j = torch.arange(S, device=q.device)
    i = torch.arange(L, device=q.device)
    n = lens[:, None, None]                                                            # (B, 1, 1)
    rel = j[None, None, :] - (i[None, :, None] + n - L)                                # j - (i + n_b - L)
    allowed = j[None, None, :] < n
    left, right = win if win is not None else (-1, -1)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if right >= 0:
        allowed = allowed & (rel <= right)
    if left >= 0:
        allowed = allowed & (rel >= -left)
    # one call over the whole cache: an option set by the key count is the cache's (sigmoid's default b = -log S_max;
    # pass "sigmoid:<b>" for another b)
    res = fn.attention(q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), norm, attn_mask=allowed[:, None],
                       scale=scale, softcap=softcap, enable_gqa=True, return_stats=return_stats, backend=backend)
    if return_stats:
        out, st = res
        return out.transpose(1, 2), st
    return res.transpose(1, 2)
