"""Packed variable-length sequences on the Triton backend in ONE launch per kernel (``Static.VARLEN``).

flash_attn's ``flash_attn_varlen_func`` layout: q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv),
sequence b the rows [cu_q[b], cu_q[b + 1]) of q and [cu_k[b], cu_k[b + 1]) of k and v. The forward is one
``attn_fwd`` launch on the grid (cdiv(max_seqlen_q, BM), batch * Hq); each program reads its sequence's four
offsets from cu_q, cu_k on the device (``tiles.varlen_dims``), exits when its query block is past the
sequence, and otherwise runs the ordinary tile loop on that sequence's rows and keys (views rebased by
``tiles.at_row``; causal / lower-right / windows aligned per sequence). The backward is the usual preprocess
(one launch over the (1, Hq, total_q) rows: it is row-wise), dK/dV on (cdiv(max_seqlen_k, BN), batch * Hkv)
and dQ (or the atomic dQ inside dK/dV). Row outputs (statistics, the pre-pass threshold, entmax15's sum_g and
O2, the backward's rows and the atomic dQ buffer) are (Hq, total_q): flash_attn's lse layout. No host sync:
cu_seqlens are read by the kernels only.

The normalizer's kernel configuration is the one for max_seqlen_k keys (``Normalizer.triton``): every unit's
configuration is correct for any S <= that (top-k's modes, the threshold engine's group sizes); a unit whose
OPTIONS depend on the key count (``Normalizer.for_keys``, sigmoid's default b = -log S) is not run here
(:func:`supported`). Not here either: dropout and score noise (their counters are the per-sequence calls'
(head, row) of a batch of one), split-KV, a given threshold; :mod:`flashmaps.inference` runs those per sequence.
The backward's non-finite rule (`flashmaps.ops`: a row with a NaN statistic gets a NaN dq row, and its sequence's
kv head NaN dk, dv) is applied per sequence by the kernels (`kernels.backward`; the preprocess flags (sequence,
head) through CU_Q).
"""

from __future__ import annotations

import torch

from . import triton_configs
from .kernels.backward import attn_bwd_dkdv, attn_bwd_dq, attn_bwd_preprocess
from .kernels.contract import Dims, RowOut, View
from .kernels.tiles import head_grid
from .kernels.tile_loop import attn_fwd
from .normalizers import Normalizer
from .triton_path import (_INTERPRET, _PRE_BM, INTERPRET_CONFIG, SCRATCH_ROW_BLOCK, Forward, _bucket, _cdiv,
                          _extras_size, _launch, _setup, _unpack, bwd_rows_buffers, shift_rows)
from .window import bounds

__all__ = ["supported", "launch_forward", "launch_backward", "attention"]


def supported(normalizer: Normalizer, max_seqlen_k: int, dropout_p: float) -> bool:
    """Whether the one-launch path computes what the per-sequence calls compute (see the module docstring)."""
    return (dropout_p == 0 and not normalizer.stochastic and normalizer.has_triton
            and normalizer.for_keys(max(1, max_seqlen_k)) is normalizer)


def _packed(x) -> View:
    """(total, H, D) as a (1, H, total, D) View (batch stride 0: every sequence's programs see the same base)."""
    return View(x, 0, x.stride(1), x.stride(0), x.stride(2))


def _as4(x):
    return x.transpose(0, 1).unsqueeze(0)                         # (1, H, total, D) view


def _setup_varlen(q, k, v, cu_q, cu_k, max_q, max_k, normalizer, causal, scale, softcap, placeholder):
    """`triton_path._setup` on the packed tensors, with the hooks of max_k keys and the VARLEN Dims / Static."""
    total_q, Hq = q.shape[:2]
    Hkv = k.shape[1]
    s_cfg = max(1, min(max_k, k.shape[0]))                         # Normalizer.triton(S) sees max_seqlen_k
    c = _setup(_as4(q), _as4(k)[:, :, :s_cfg], _as4(v)[:, :, :s_cfg], normalizer, None, None, scale, softcap, 0.0,
               0, placeholder)
    band = bounds(causal, 0, 0)                                    # offsets with off = 0; + S_b - L_b per sequence
    lower = bool(causal) and (causal == "lower_right" or causal.startswith("window:lower_right"))
    static = c.static._replace(IS_CAUSAL=band.right_off is not None, LEFT=band.left_off is not None, VARLEN=True)
    dims = Dims(cu_q.numel() - 1, Hq, Hq // Hkv, max_q, max_k, band.right_off or 0, band.left_off or 0, 0,
                cu_q.contiguous(), cu_k.contiguous(), int(lower), total_q, 0)
    return c._replace(static=static, dims=dims, B=cu_q.numel() - 1)


def launch_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, normalizer: Normalizer, *, causal=None, scale=None,
                   softcap=None, save_extras: bool = False, config=None) -> Forward:
    """The forward in one launch: out (total_q, Hq, Dv) in v's dtype, stats {name: (Hq, total_q)} fp32 (views of
    ``stats_all`` (n_stats, Hq, total_q)), the packed extras of a (1, Hq, total_q) call (`triton_path.Forward`).
    ``causal``: None or a `flashmaps.window.encode` string, aligned per sequence."""
    total_q, Hq = q.shape[:2]
    dev = q.device
    placeholder = torch.empty(1, dtype=torch.float32, device=dev)
    c = _setup_varlen(q, k, v, cu_q, cu_k, max_q, max_k, normalizer, causal, scale, softcap, placeholder)
    if save_extras and not c.hooks.has_backward:
        raise NotImplementedError(f"the normalizer {normalizer.spec!r} has no Triton backward hooks; use "
                                  "backend='torch' for gradients")
    q4, v4 = _as4(q), _as4(v)
    out = torch.empty((total_q, Hq, v.shape[2]), dtype=v.dtype, device=dev)
    stats_all = torch.empty((len(normalizer.stats), Hq, total_q), dtype=torch.float32, device=dev)
    stats_t = list(stats_all.unbind(0))
    extras = torch.empty(_extras_size(c.hooks, q4, v4, save_extras), dtype=torch.float32, device=dev)
    saved = _unpack(extras, c.hooks, q4, v4, save_extras)
    l_pad = _cdiv(max_q, SCRATCH_ROW_BLOCK) * SCRATCH_ROW_BLOCK     # scratch: (sequence, head) x padded rows
    kc = c.scratch_cols
    scratch = torch.empty((c.B * Hq * l_pad, kc), dtype=torch.float32, device=dev) if kc else placeholder
    rows = RowOut(stats_t[0] if stats_t else placeholder, stats_t[-1] if stats_t else placeholder,
                  saved.get("thr", placeholder), saved.get("sum_g", placeholder), saved.get("o2", placeholder),
                  scratch)
    norm = c.hooks._replace(has_g=c.hooks.has_g and save_extras)
    args = (_packed(q), _packed(k), _packed(v), _packed(out), c.mask, rows, c.dims, c.scale, c.args, c.drop, c.seed,
            _bucket(max_q), _bucket(max_k), l_pad)
    _launch(attn_fwd, triton_configs.attn_fwd_tuned, config,
            lambda META: (_cdiv(max_q, META["BM"]), *head_grid(c.B * Hq)), args,
            dict(ST=c.static, NORM=norm, SCRATCH_COLS=kc, HP=c.hp))
    return Forward(out, dict(zip(normalizer.stats, stats_t)), saved, c.hooks.unit, extras, stats_all)


def launch_backward(dout, q, k, v, out, stats, extras, cu_q, cu_k, max_q: int, max_k: int, normalizer: Normalizer, *,
                    causal=None, scale=None, softcap=None, delta_shift=None, deterministic: bool = False,
                    config=None):
    """(dq, dk, dv) shaped like q, k, v of :func:`launch_forward` (``save_extras=True``; ``stats`` the list of
    (Hq, total_q)). One preprocess launch, one dK/dV launch and (``deterministic``) one dQ launch, or the
    atomic dQ inside dK/dV; ``delta_shift`` None or (Hq, total_q) as in `triton_path.launch_backward`."""
    total_q, Hq = q.shape[:2]
    dev = q.device
    placeholder = torch.empty(1, dtype=torch.float32, device=dev)
    c = _setup_varlen(q, k, v, cu_q, cu_k, max_q, max_k, normalizer, causal, scale, softcap, placeholder)
    if not c.hooks.has_backward:
        raise NotImplementedError(f"the normalizer {normalizer.spec!r} has no Triton backward hooks")
    q4, v4 = _as4(q), _as4(v)
    views = _unpack(extras, c.hooks, q4, v4, True)
    stats = [x.contiguous() for x in stats]
    rows = RowOut(stats[0] if stats else placeholder, stats[-1] if stats else placeholder,
                  views.get("thr", placeholder), views.get("sum_g", placeholder), placeholder, placeholder)
    o_bwd = views["o2"] if c.hooks.has_g else _as4(out)
    norm = c.hooks.with_consts(())
    # the preprocess is row-wise: one launch over the packed rows as a (1, Hq, total_q) call; the non-finite rule's
    # head flags per (sequence, head) (CU_Q)
    atomic = not deterministic
    rb, dq_acc = bwd_rows_buffers((Hq, total_q), c.B * c.Hkv, q.shape[2], atomic, placeholder, placeholder)
    pre_bm = INTERPRET_CONFIG["BM"] if _INTERPRET else _PRE_BM
    attn_bwd_preprocess[(_cdiv(total_q, pre_bm), *head_grid(Hq))](
        View.of(o_bwd), View.of(_as4(dout)), rows, rb, 1, Hq, total_q, BM=pre_bm,
        ST=c.static._replace(VARLEN=False, ATOMIC_DQ=atomic), NORM=norm, HP=c.hp,
        SHIFT=shift_rows(delta_shift, (Hq, total_q), dev), DQA=dq_acc, CU_Q=c.dims.cu_q, N_SEQ=c.B,
        GROUP=Hq // c.Hkv)
    dk = torch.empty(k.shape, dtype=k.dtype, device=dev)
    dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
    Q, K, V, DO = _packed(q), _packed(k), _packed(v), _packed(dout)
    tail = (rb, c.dims, c.scale, c.sm_scale, c.drop, c.seed, _bucket(max_q), _bucket(max_k))
    per_kernel = config if config is not None and ("dkdv" in config or "dq" in config) else \
        {"dkdv": config, "dq": config}
    _launch(attn_bwd_dkdv, triton_configs.attn_bwd_dkdvq_tuned if atomic else triton_configs.attn_bwd_dkdv_tuned,
            per_kernel.get("dkdv"), lambda META: (_cdiv(max_k, META["BN"]), *head_grid(c.B * c.Hkv)),
            (Q, K, V, DO, c.mask, _packed(dk), _packed(dv), *tail),
            dict(ST=c.static._replace(ATOMIC_DQ=atomic), NORM=norm, DQA=dq_acc))
    if atomic:
        return dq_acc.view(Hq, total_q, q.shape[2]).transpose(0, 1).to(q.dtype).contiguous(), dk, dv
    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    _launch(attn_bwd_dq, triton_configs.attn_bwd_dq_tuned, per_kernel.get("dq"),
            lambda META: (_cdiv(max_q, META["BM"]), *head_grid(c.B * Hq)),
            (Q, K, V, DO, c.mask, _packed(dq), *tail), dict(ST=c.static, NORM=norm))
    return dq, dk, dv


class _Varlen(torch.autograd.Function):
    """out (total_q, Hq, Dv) and the stats (n_stats, Hq, total_q); gradients through the stats for the units with
    ``Normalizer.stat_delta`` (as `flashmaps.ops`)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, norm, causal, scale, softcap, deterministic):
        res = launch_forward(q, k, v, cu_q, cu_k, max_q, max_k, norm, causal=causal, scale=scale, softcap=softcap,
                             save_extras=True)
        ctx.save_for_backward(q, k, v, res.out, res.stats_all, res.extras, cu_q, cu_k)
        ctx.args = (max_q, max_k, norm, causal, scale, softcap, deterministic)
        if not norm.has_stat_grads:
            ctx.mark_non_differentiable(res.stats_all)
        ctx.set_materialize_grads(False)
        return res.out, res.stats_all

    @staticmethod
    def backward(ctx, dout, dstats):
        q, k, v, out, stats, extras, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, norm, causal, scale, softcap, deterministic = ctx.args
        dout = torch.zeros_like(out) if dout is None else dout
        shift = None
        if dstats is not None and norm.has_stat_grads:
            shift = norm.stat_delta([s[None] for s in stats.unbind(0)],
                                    [g[None] for g in dstats.to(stats.dtype).unbind(0)])[0]
        dq, dk, dv = launch_backward(dout, q, k, v, out, list(stats.unbind(0)), extras, cu_q, cu_k, max_q, max_k,
                                     norm, causal=causal, scale=scale, softcap=softcap, delta_shift=shift,
                                     deterministic=deterministic)
        return dq, dk, dv, *([None] * 9)


def attention(q, k, v, cu_q, cu_k, max_q: int, max_k: int, normalizer: Normalizer, *, causal=None, scale=None,
              softcap=None, deterministic: bool = False):
    """(out (total_q, Hq, Dv), stats {name: (Hq, total_q)}) through the one-launch kernels, with autograd when
    q, k or v requires grad. Arguments validated by the caller (`flashmaps.inference.attention_varlen`)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out, stats_all = _Varlen.apply(q, k, v, cu_q, cu_k, max_q, max_k, normalizer, causal, scale, softcap,
                                       deterministic)
    else:
        res = launch_forward(q, k, v, cu_q, cu_k, max_q, max_k, normalizer, causal=causal, scale=scale,
                             softcap=softcap)
        out, stats_all = res.out, res.stats_all
    return out, dict(zip(normalizer.stats, stats_all.unbind(0)))
