"""Context parallelism: exact attention over a sequence sharded across the ranks of a torch.distributed group.

    import flashmaps.distributed as cp

    q_l, k_l, v_l = (cp.shard(x, layout="zigzag") for x in (q, k, v))     # this rank's (B, H, S/W, D)
    out_l = cp.attention(q_l, k_l, v_l, "entmax15", causal=True, layout="zigzag")
    out = cp.unshard(out_l, layout="zigzag")                             # (B, H, S, D) on every rank

Every rank holds ``S / W`` positions of the sequence (``W`` = the group's size); :func:`attention` returns
this rank's rows of ``flashmaps.attention`` over the whole sequence, forward and backward, with NCCL (GPUs)
or gloo (CPUs) underneath. Glossary:

    W, r          the group's size and this rank's index in it
    S, Sl         the full sequence length and one rank's share, Sl = S / W
    chunk         zigzag cuts the sequence into 2W chunks of c = S / (2W) positions; rank r holds chunks
                  r and 2W-1-r, so under a causal mask every rank sees the same number of (query, key) pairs
    kpm           key padding mask: bool (B, Sl) shard, True = may attend (the full mask is (B, S))

Layouts (the ``layout`` argument; :func:`shard` and :func:`unshard` must use the same one):

* ``"allgather"``: rank r holds positions ``[r Sl, (r+1) Sl)``. K, V (and kpm) are all-gathered along the
  sequence, then this rank's queries attend to all keys with ``flashmaps.attention``. Every normalizer works
  exactly, the sparse ones included: each query row sees every key of its row, so the threshold it computes
  (entmax15's tau, top-k's k-th score) IS the global threshold over all shards; no two-phase protocol is
  needed. Backward is autograd's: the adjoint of an all-gather is a reduce-scatter (sum) of dK and dV.
  Causal: the queries at global offset o attend to keys ``[0, o + Sl)`` with ``causal="lower_right"``, so
  keys to the right are never touched; the last rank does W times the work of the first.
* ``"zigzag"``: the same all-gather, on the load-balanced layout (chunks r and 2W-1-r); each local chunk at
  global offset o attends to keys ``[0, o + c)``. Needs S divisible by 2W. Use it for causal attention.
* ``"ring"``: rank r holds ``[r Sl, (r+1) Sl)`` and K, V (and kpm) blocks travel around the ring
  (send to r+1, receive from r-1), the transfer of the next block overlapping the attention of this one;
  the partial results combine by the normalizer's merge rule (``Normalizer.merge``: softmax by log-sum-exp,
  taylor by sums). Memory per rank is O(Sl) instead of O(S) (forward; autograd keeps every visited block
  for the backward). Backward is autograd's: the partial statistics carry gradients
  (``Normalizer.stat_delta``), so the merges are differentiable, and each ring step's backward sends the
  gradient of the block it received back to the block's previous holder (r -> r-1), step by step in reverse,
  until the gradients of K and V reach their owners. Every rank takes part in every step's backward transfer
  (a causal rank that skipped the last blocks anchors them to its output with a zero gradient). The sparse
  units (a global threshold) run the two-phase protocol (``Normalizer.two_phase``): K (and kpm) go around the
  ring once for the union's threshold (each step's candidates merged into the running ones), then K, V at that
  threshold, summed (top-k: log-sum-exp); K travels twice. Its gradients are exact (``flashmaps.twophase``: the
  threshold is differentiable w.r.t. every block's candidates, so K's gradient also travels back around the
  first ring); training with a merge rule whose statistics carry no gradient (a user unit without
  ``stat_delta``), or a two-phase unit without ``Normalizer.has_threshold_grads``, raises a ValueError.
  Normalizers with neither a merge rule nor the protocol raise a ValueError.

Communication per attention call and rank, with b the bytes per element (derivation in the README,
"Context parallelism"): all-gather layouts receive ``(W-1)/W * B * Hkv * S * (Dqk + Dv) * b`` bytes forward
and send the same in the reduce-scatter of backward; the ring moves the same volume in W-1 steps of
``B * Hkv * Sl * (Dqk + Dv) * b``. The K, V and kpm transfers are issued together (async) before waiting on
any of them, and the two reduce-scatters of backward likewise.
"""

from __future__ import annotations

import functools
import numbers
import zlib

import torch
import torch.distributed as dist

from . import functional
from .normalizers import Normalizer, parse

__all__ = ["attention", "shard", "unshard", "positions", "LAYOUTS"]

#: the layout names (module docstring)
LAYOUTS = ("allgather", "zigzag", "ring")


# ----------------------------------------------------------------------------------------------------
# layouts: which global positions each rank holds


def _check_layout(layout) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    return layout


def _pieces(layout: str, world: int) -> int:
    """How many equal pieces the layout cuts a sequence into (zigzag: two per rank)."""
    return 2 * world if layout == "zigzag" else world


def _check_length(n: int, layout: str, world: int, argname: str) -> None:
    pieces = _pieces(layout, world)
    if n % pieces:
        raise ValueError(
            f"{argname}: a sequence of {n} positions cannot be cut into {pieces} equal pieces (layout {layout!r} "
            f"on {world} ranks); pad it to a multiple of {pieces} and exclude the padding with key_padding_mask"
        )


def _spans(layout: str, world: int, rank: int, n_local: int) -> list[tuple[int, int, int]]:
    """(local start, global start, length) of the contiguous runs of positions this rank holds."""
    if layout == "zigzag":
        c = n_local // 2
        return [(0, rank * c, c), (c, (2 * world - 1 - rank) * c, c)]
    return [(0, rank * n_local, n_local)]


def positions(n: int, *, layout: str = "allgather", rank: int, world_size: int) -> torch.Tensor:
    """The global positions (int64, length n / world_size, increasing within each run) that ``rank`` holds
    of a sequence of ``n`` under ``layout``: allgather/ring ``[r n/W, (r+1) n/W)``; zigzag chunks r and 2W-1-r
    of 2W."""
    layout = _check_layout(layout)
    world, rank = _check_rank(rank, world_size)
    _check_length(n, layout, world, "positions")
    return torch.cat([torch.arange(g, g + m) for _, g, m in _spans(layout, world, rank, n // world)])


@functools.lru_cache(maxsize=64)
def _rank_order(n: int, layout: str, world: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(order, inverse): ``order`` the global positions of a rank-order concatenation of all shards,
    ``inverse = argsort(order)`` (rank order -> global order); None when both are the identity."""
    if layout != "zigzag":
        return None
    order = torch.cat([positions(n, layout=layout, rank=r, world_size=world) for r in range(world)])
    return order, torch.argsort(order)


# ----------------------------------------------------------------------------------------------------
# the group


def _check_rank(rank, world_size) -> tuple[int, int]:
    for val, name in ((rank, "rank"), (world_size, "world_size")):
        if isinstance(val, bool) or not isinstance(val, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(val).__name__}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return int(world_size), int(rank)


def _world_and_rank(group, rank=None, world_size=None) -> tuple[int, int]:
    """(W, r) of ``group`` (the default group when None), or the given overrides (both or neither)."""
    if (rank is None) != (world_size is None):
        raise ValueError("pass both rank and world_size, or neither (then they come from the process group)")
    if rank is not None:
        if group is not None:
            raise ValueError("pass either group or rank/world_size, not both")
        return _check_rank(rank, world_size)
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group('nccl' or 'gloo') "
            "first (torchrun sets its environment), or pass rank= and world_size= to shard()"
        )
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given group; call it on the group's ranks only")
    return dist.get_world_size(group), rank


def _global_rank(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


# ----------------------------------------------------------------------------------------------------
# collectives along the sequence


def _start_gathers(xs, world: int, group):
    """Issue an all-gather of every tensor of ``xs`` (async, all before any wait) -> [(work, parts)]."""
    pending = []
    for x in xs:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        pending.append((dist.all_gather(parts, x, group=group, async_op=True), parts))
    return pending


def _finish_gathers(pending, dim: int, order) -> list[torch.Tensor]:
    """Wait for each gather and lay it out in global order along ``dim`` (``order``: see _rank_order)."""
    outs = []
    for work, parts in pending:
        work.wait()
        full = torch.cat(parts, dim)  # rank order
        if order is not None:
            full = full.index_select(dim, order[1].to(full.device))
        outs.append(full)
    return outs


class _GatherSeq(torch.autograd.Function):
    """All-gather along ``dim`` into global order; backward: reduce-scatter (sum over ranks) of the gradient,
    each rank receiving the gradient of its own positions."""

    @staticmethod
    def forward(ctx, group, world, dim, order, *xs):
        ctx.group, ctx.world, ctx.dim, ctx.order = group, world, dim, order
        return tuple(_finish_gathers(_start_gathers(xs, world, group), dim, order))

    @staticmethod
    def backward(ctx, *grads):
        pending = []
        for g in grads:
            if ctx.order is not None:
                g = g.index_select(ctx.dim, ctx.order[0].to(g.device))  # global -> rank order
            parts = [p.contiguous() for p in g.chunk(ctx.world, ctx.dim)]
            out = torch.empty_like(parts[0])
            pending.append((dist.reduce_scatter(out, parts, group=ctx.group, async_op=True), out))
        outs = []
        for work, out in pending:
            work.wait()
            outs.append(out)
        return (None, None, None, None, *outs)


def _gather_seq(xs, dim: int, group, world: int, order) -> list[torch.Tensor]:
    """All-gather each tensor of ``xs`` along ``dim`` into global order (differentiable for float tensors)."""
    if world == 1:
        return list(xs)
    if any(x.requires_grad for x in xs) and torch.is_grad_enabled():
        return list(_GatherSeq.apply(group, world, dim, order, *xs))
    return _finish_gathers(_start_gathers(xs, world, group), dim, order)


def _dim(x: torch.Tensor, dim, argname: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{argname} must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [-{x.dim()}, {x.dim()}) for {argname} of shape {tuple(x.shape)}, "
                         f"got {dim!r}")
    return int(dim) % x.dim()


def shard(x: torch.Tensor, dim: int = 2, *, group=None, layout: str = "allgather", rank: int | None = None,
          world_size: int | None = None) -> torch.Tensor:
    """This rank's shard of a full tensor ``x`` along ``dim`` (the sequence: 2 for (B, H, S, D), 1 for a
    (B, S) key padding mask) under ``layout``: ``x.index_select(dim, positions(S, layout, rank, W))`` (a view
    for allgather/ring). ``rank``/``world_size`` override the group's (to cut shards without a process group).
    S must divide into W pieces (2W for zigzag). Gradients flow to the shard's positions of ``x``."""
    layout = _check_layout(layout)
    dim = _dim(x, dim, "x")
    world, rank = _world_and_rank(group, rank, world_size)
    n = x.shape[dim]
    _check_length(n, layout, world, "shard: x")
    spans = _spans(layout, world, rank, n // world)
    if len(spans) == 1:
        return x.narrow(dim, spans[0][1], spans[0][2])
    return torch.cat([x.narrow(dim, g, m) for _, g, m in spans], dim)


def unshard(x_local: torch.Tensor, dim: int = 2, *, group=None, layout: str = "allgather") -> torch.Tensor:
    """The full tensor (every rank gets it) from each rank's shard ``x_local`` along ``dim``: the inverse of
    :func:`shard` (an all-gather; its backward sends each rank the summed gradient of its positions)."""
    layout = _check_layout(layout)
    dim = _dim(x_local, dim, "x_local")
    world, _ = _world_and_rank(group)
    n_local = x_local.shape[dim]
    if layout == "zigzag" and n_local % 2:
        raise ValueError(f"unshard: layout 'zigzag' shards hold two equal chunks, got an odd length {n_local}")
    order = _rank_order(n_local * world, layout, world)
    return _gather_seq([x_local], dim, group, world, order)[0]


# ----------------------------------------------------------------------------------------------------
# attention


def _check_same_everywhere(meta: list[int], names: tuple[str, ...], group, world: int, device) -> None:
    """Raise the same ValueError on every rank if the ranks disagree on ``meta`` (one small all-gather)."""
    mine = torch.tensor(meta, dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    table = torch.stack(parts).cpu()
    bad = [name for i, name in enumerate(names) if not bool((table[:, i] == table[0, i]).all())]
    if bad:
        per_rank = {name: table[:, names.index(name)].tolist() for name in bad}
        raise ValueError(
            f"context-parallel attention: the ranks disagree on {', '.join(bad)} (per rank: {per_rank}); every "
            "rank must pass shards of one sequence cut with the same layout and the same options"
        )


def _check_kpm(key_padding_mask, k: torch.Tensor):
    if key_padding_mask is None:
        return None
    m = key_padding_mask
    if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
        got = m.dtype if isinstance(m, torch.Tensor) else type(m).__name__
        raise TypeError(f"key_padding_mask must be a bool tensor (True = may attend), got {got}")
    want = (k.shape[0], k.shape[2])
    if tuple(m.shape) != want:
        raise ValueError(f"key_padding_mask must be this rank's (batch, S_local) = {want} shard, got "
                         f"{tuple(m.shape)}; cut the full (B, S) mask with shard(mask, dim=1, layout=...)")
    if m.device != k.device:
        raise ValueError(f"key_padding_mask is on {m.device} but k is on {k.device}; move it with .to()")
    return m


def _has_merge(norm: Normalizer) -> bool:
    return type(norm).merge is not Normalizer.merge


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, normalizer: str | Normalizer = "softmax", *,
              causal=False, group=None, layout: str = "allgather", key_padding_mask: torch.Tensor | None = None,
              scale: float | None = None, softcap: float | None = None, enable_gqa: bool = False,
              backend: str = "auto", check: bool = True) -> torch.Tensor:
    """This rank's rows of ``flashmaps.attention`` over a sequence sharded across ``group``.

    ``o_i = sum_j p_ij v_j``, ``p_i = N(s_i)``, ``s_ij = scale * q_i . k_j`` over ALL keys j of the full
    sequence (those with ``key_padding_mask`` True, ``j <= i`` if causal), for the query positions i this
    rank holds. Exact for every registered normalizer, forward and backward (module docstring).

    Args:
        q: (B, Hq, Sl, Dqk), k: (B, Hkv, Sl, Dqk), v: (B, Hkv, Sl, Dv): this rank's shards (:func:`shard`)
            of one sequence (for non-causal cross-attention q and k may come from sequences of different
            lengths, each cut with the same layout).
        normalizer: as in ``flashmaps.attention`` ("softmax", "entmax15", "topk:<k>", an instance).
        causal: False, or True / "upper_left" / "lower_right" (the same thing here: q and k are one sequence,
            so their shards must have equal lengths).
        group: the process group (default: the default group). layout: "allgather", "zigzag" or "ring".
        key_padding_mask: None or this rank's bool (B, Sl) shard of a (B, S) mask, True = may attend.
        scale, softcap, enable_gqa, backend: as in ``flashmaps.attention`` (dropout and stochastic normalizers
            such as gumbel are not offered: the ranks would need one random stream).
        check: verify with one small all-gather that every rank passes the same shapes and options (a clear
            error instead of a hang or silently wrong result); False skips it.

    Returns:
        (B, Hq, Sl, Dv): this rank's rows of the output, in v's dtype, in the order of q's shard.
    """
    layout = _check_layout(layout)
    functional._check_qkv(q, k, v, enable_gqa)
    norm = parse(normalizer)
    causal_mode = functional._check_causal(causal)
    kpm = _check_kpm(key_padding_mask, k)
    if not isinstance(check, bool):
        raise TypeError(f"check must be a bool, got {type(check).__name__}")
    world, rank = _world_and_rank(group)
    L, S = q.shape[2], k.shape[2]
    if causal_mode is not None and L != S:
        raise ValueError(f"causal context parallelism needs q and k shards of one sequence (equal lengths), "
                         f"got {L} and {S}")
    for n, name in ((L, "q"), (S, "k")):
        if layout == "zigzag" and n % 2:
            raise ValueError(f"layout 'zigzag': a rank's {name} shard holds two equal chunks, so its length must "
                             f"be even, got {n}; pad the sequence to a multiple of {2 * world}")
    if norm.stochastic:
        raise ValueError(f"context parallelism does not take the stochastic normalizer {norm.spec!r}: its noise is "
                         "drawn per call and keyed by the local query and key indices, so the ranks would need one "
                         "random stream and global positions (as dropout, not offered); use flashmaps.attention")
    if layout == "ring":
        _check_ring(norm, q, k, v)
    if check and world > 1:
        meta = [*q.shape, *k.shape, v.shape[-1], kpm is not None, LAYOUTS.index(layout), causal_mode is not None,
                zlib.crc32(norm.spec.encode()), functional._FLOATS.index(q.dtype)]
        names = ("batch", "query heads", "query shard length", "head dim", "batch (k)", "kv heads",
                 "kv shard length", "head dim (k)", "head dim (v)", "key_padding_mask given", "layout", "causal",
                 "normalizer", "dtype")
        _check_same_everywhere(meta, names, group, world, q.device)
    norm = norm.for_keys(S * world)  # options set by the key count (sigmoid's b = -log S): the whole sequence's
    kw = dict(scale=scale, softcap=softcap, enable_gqa=enable_gqa, backend=backend)
    if layout == "ring":
        return _ring(q, k, v, norm, kpm, causal_mode is not None, group, world, rank, kw)
    # all-gather layouts: K, V (and the mask) of the whole sequence, in global order when causal needs it
    order = _rank_order(S * world, layout, world) if causal_mode is not None else None
    # the mask's gather (bool travels as uint8) is in flight while K's and V's are
    m_pending = _start_gathers([kpm.to(torch.uint8)], world, group) if kpm is not None and world > 1 else None
    k_all, v_all = _gather_seq([k, v], 2, group, world, order)  # (B, Hkv, S, D), (B, Hkv, S, Dv)
    m_all = None
    if kpm is not None:
        m_all = _finish_gathers(m_pending, 1, order)[0] if m_pending else kpm
        m_all = m_all.bool()[:, None, None, :]  # (B, 1, 1, S)
    if causal_mode is None:
        return functional.attention(q, k_all, v_all, norm, attn_mask=m_all, **kw)
    outs = []
    for start, g, m in _spans(layout, world, rank, L):
        end = g + m  # queries [g, g + m) see keys [0, end): the last query row sees all of them
        outs.append(functional.attention(
            q[:, :, start:start + m], k_all[:, :, :end], v_all[:, :, :end], norm, causal="lower_right",
            attn_mask=None if m_all is None else m_all[..., :end], **kw))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 2)  # (B, Hq, Sl, Dv)


# ----------------------------------------------------------------------------------------------------
# the ring


def _check_ring(norm: Normalizer, q, k, v) -> None:
    if not _has_merge(norm) and not norm.two_phase:
        raise ValueError(
            f"layout 'ring' combines partial results with the normalizer's merge rule, and {norm.spec!r} has none "
            "(a sparse normalizer's threshold is global over all keys); use layout='allgather' or 'zigzag', "
            "which are exact for every normalizer"
        )
    grads = norm.has_threshold_grads if norm.two_phase else norm.has_stat_grads
    if norm.stats and not grads and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        why = ("its two-phase protocol has no gradients (Normalizer.has_threshold_grads)" if norm.two_phase else
               "its row statistics carry no gradient (Normalizer.stat_delta), which the merge of the partial "
               "results needs")
        raise ValueError(
            f"layout 'ring' is forward-only for {norm.spec!r}: {why}; run it under torch.no_grad() "
            "for inference, or train with layout='allgather' or 'zigzag'"
        )


def _exchange(xs, ys, send_to: int, recv_from: int, group):
    """Start sending each of ``xs`` to ``send_to`` and receiving ``ys`` from ``recv_from`` -> the works."""
    ops = [op for x, y in zip(xs, ys) for op in (dist.P2POp(dist.isend, x, send_to, group),
                                                 dist.P2POp(dist.irecv, y, recv_from, group))]
    return dist.batch_isend_irecv(ops)


class _RingStep(torch.autograd.Function):
    """One ring transfer: send ``xs`` to ``send_to`` and receive the same shapes from ``recv_from`` into the
    returned tensors, asynchronously (the works go to ``works``: wait on them before reading the result).
    Backward: the received tensors' gradients go back to ``recv_from``, ours come from ``send_to``."""

    @staticmethod
    def forward(ctx, group, send_to, recv_from, works, *xs):
        ctx.group, ctx.send_to, ctx.recv_from = group, send_to, recv_from
        ctx.floats = [x.is_floating_point() for x in xs]
        ys = [torch.empty_like(x) for x in xs]
        works.extend(_exchange(xs, ys, send_to, recv_from, group))
        ctx.mark_non_differentiable(*[y for y, f in zip(ys, ctx.floats) if not f])
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grads):
        gs = [g.contiguous() for g, f in zip(grads, ctx.floats) if f]
        outs = [torch.empty_like(g) for g in gs]
        for work in _exchange(gs, outs, ctx.recv_from, ctx.send_to, ctx.group):
            work.wait()
        it = iter(outs)
        return (None, None, None, None, *[next(it) if f else None for f in ctx.floats])


class _Anchor(torch.autograd.Function):
    """``out`` unchanged; backward gives ``xs`` zero gradients, so that the ring steps that produced them run
    their backward transfers (which the other ranks wait for) even where this rank did not use them."""

    @staticmethod
    def forward(ctx, out, *xs):
        ctx.like = [(x.shape, x.dtype, x.device) for x in xs]
        return out.clone()

    @staticmethod
    def backward(ctx, g):
        return (g, *[torch.zeros(sh, dtype=dt, device=dev) for sh, dt, dev in ctx.like])


def _ring(q, k, v, norm, kpm, causal: bool, group, world: int, rank: int, kw) -> torch.Tensor:
    """K, V (and kpm) blocks travel r -> r+1; step t holds the block of rank (r - t) mod W. Causal: blocks of
    ranks < r are wholly visible, r's own is the diagonal (upper_left), ranks > r are skipped. A sparse unit
    (``Normalizer.two_phase``) first sends K (and kpm) around once for the union's threshold (phase 1: the
    running candidates of the blocks seen, re-compacted at each step), then K, V at that threshold."""
    tail = [kpm.to(torch.uint8)] if kpm is not None else []
    thr = _ring_threshold(q, k, norm, tail, causal, group, world, rank, kw) if norm.two_phase else None
    out = stats = None
    used, last = True, None
    for src, block in _ring_steps([k.contiguous(), v.contiguous()] + tail, group, world, rank):
        used, last = not (causal and src > rank), block
        if used:
            mask = None if kpm is None else block[2].bool()[:, None, None, :]  # (B, 1, 1, Sl)
            part = functional.attention(q, block[0], block[1], norm, attn_mask=mask,
                                        causal="upper_left" if causal and src == rank else False,
                                        return_stats=True, threshold=thr, **kw)
            if thr is not None:
                out, stats = part if out is None else norm.merge_at_threshold([out, part[0]], [stats, part[1]], thr)
            else:
                out, stats = part if out is None else norm.merge([out, part[0]], [stats, part[1]])
    if not used and last[0].requires_grad:   # the last block's ring steps must run backward here too
        out = _Anchor.apply(out, *last[:2])
    return out


def _ring_threshold(q, k, norm, tail, causal, group, world, rank, kw) -> dict:
    """Phase 1 of the two-phase protocol over the ring: the union's threshold {name: (B, Hq, Sl)} (differentiable:
    the candidates are scores, the re-compaction picks among them; ``functional.global_threshold``)."""
    cand = None
    used, last = True, None
    for src, block in _ring_steps([k.contiguous()] + tail, group, world, rank):
        used, last = not (causal and src > rank), block
        if used:
            mask = None if not tail else block[1].bool()[:, None, None, :]  # (B, 1, 1, Sl)
            c = functional.threshold_candidates(q, block[0], norm, attn_mask=mask, scale=kw["scale"],
                                                causal="upper_left" if causal and src == rank else False,
                                                softcap=kw["softcap"], enable_gqa=kw["enable_gqa"])
            cand = c if cand is None else norm.threshold_candidates(torch.cat([cand, c], -1))
    if not used and last[0].requires_grad:   # the last block's ring steps must run backward here too
        cand = _Anchor.apply(cand, last[0])
    return functional.global_threshold(norm, [cand])


def _ring_steps(block, group, world: int, rank: int):
    """Yield (src, the block of rank src) for the W steps of the ring, the next block's transfer in flight
    while the caller computes with this one (each transfer a `_RingStep`: its backward sends the gradients
    back)."""
    send_to, recv_from = _global_rank(group, (rank + 1) % world), _global_rank(group, (rank - 1) % world)
    for t in range(world):
        pending = []
        if t < world - 1:  # start moving this block on before computing with it
            nxt = list(_RingStep.apply(group, send_to, recv_from, pending, *block))
        yield (rank - t) % world, block
        for work in pending:
            work.wait()
        if t < world - 1:
            block = nxt
