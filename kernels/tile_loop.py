"""The forward tile loop: one kernel, every normalizer.

A program owns BM query rows of one (batch, query head) and streams the key/value tiles of its kv head
(h // group: GQA without repeated K/V). The normalizer is ``NORM``, one ``tl.constexpr`` `contract.Hooks`;
this file never names a normalizer::

    thr = NORM.prepass(...)                  # per-row threshold in kernel units (entmax15, topk) or 0
                                             # (ST.GIVEN_THR: loaded from rows.thr, the two-phase protocol)
    state = (acc [BM, BDV], m [BM], l [BM], acc_g [BM, BDV], l_g [BM])
    state = fold_keys(state, _accumulate)    # the unmasked whole tiles, then the masked ones (tiles.fold_keys)
    out, stats = NORM.finalize(m, l, thr)    # keys >= hi are never touched (causal tile skipping)

Per tile (``_accumulate``)::

    p, alpha, m, l = NORM.update(s, m, l, thr)   # [BM, BN] weights, [BM] rescale, new state
                                                 # (NORM.update_raw(qk, qk_scale, ...) when ST.RAW_SCORES)
    acc = alpha * acc + p @ v                    # alpha only if NORM.rescale
    acc_g += g @ v, l_g += rowsum(g)             # only if NORM.has_g (g = g_weights(s, thr), entmax15's O2)

Dropout (ST.DROPOUT): the weights of the P @ V (and G @ V) products are multiplied by the keep mask
(``dropout.dropout_keep``), and out (and O2) by 1/(1 - dropout_p); the running state and the row
statistics (l, l_g, m) are computed without dropout.

With NORM.skip_dead the P @ V step is skipped for tiles where tile_live(s, thr) is False (no row of the
block keeps a key of the tile: entmax15 z <= tau, topk s < tau_k). With ST.BLOCK_MASK (`kernels.blockmask`) the
pre-pass writes the block mask and the output pass neither reads nor marks it (both cost the hot loop more
than they saved: bench/TUNING.md "Issue 17 item 5, the marking cost"); the backward skips by it.

Outputs (`contract.RowOut`): O (B, Hq, L, Dv) in v's dtype; stat0/stat1 (B, Hq, L) fp32 public stats; thr
(B, Hq, L) fp32 the pre-pass threshold in kernel units (saved for the backward); g_sum (B, Hq, L) and g_out
(B, Hq, L, Dv) fp32 from g_finalize (entmax15: sum_g and O2). All contiguous except O.
"""

from typing import Any, NamedTuple

import triton
import triton.language as tl

from .blockmask import cell_row, reset_cells
from .contract import Block, Keys
from .dropout import dropout_keep
from .tiles import (at_row, fold_keys, head_base, key_bounds, kv_desc, left_bounds, load_tile, mask_rows, mma,
                    query_program, rows_base, varlen_dims, work_program)


class _Work(NamedTuple):
    """One query block of the forward: rows [pid_m * BM, + BM) of (batch off_b, query head off_h), kv head off_hk,
    the keys of split ``split`` (ST.SPLIT; else 0)."""

    pid_m: Any
    off_b: Any
    off_h: Any
    off_hk: Any
    split: Any


class _Values(NamedTuple):
    """What the output pass needs per tile besides the scores."""

    thr: Any          # [BM] the pre-pass threshold
    i: Any            # [BM, 1] query rows
    v: Any            # V pointer at (batch, kv head)
    sn: Any           # V stride along keys
    sd: Any           # V stride along the head dim
    S: Any
    seed: Any
    drop_base: Any    # (b * Hq + h) * L, int64: the dropout counter base of the head
    drop_p: Any
    qk_scale: Any     # ScoreScale.qk_scale (ST.RAW_SCORES: NORM.update_raw scales the raw tiles)
    vd: Any = None    # ST.TMA: V's tensor descriptor at (batch, kv head) (`tiles.kv_desc`)


@triton.jit
def _accumulate(state, s, start_n, vals, BN: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr,
                MASKED: tl.constexpr):
    """Fold one score tile s [BM, BN] and its value tile into the running state."""
    if NORM.has_prepass:
        # the non-finite rule, before any tile is skipped: a NaN or +inf score makes its row's l NaN
        # (x * 0 is 0 for a finite x, NaN for NaN and +inf; excluded keys are -inf and add 0)
        acc, m_i, l_i, acc_g, l_g = state
        l_i = l_i + tl.sum(tl.where(s == float("-inf"), 0.0, s) * 0.0, 1)
        state = (acc, m_i, l_i, acc_g, l_g)
    if NORM.skip_dead:
        if NORM.tile_live(s, vals.thr):
            state = _accumulate_live(state, s, start_n, vals, BN, ST, NORM, MASKED)
    else:
        state = _accumulate_live(state, s, start_n, vals, BN, ST, NORM, MASKED)
    return state


@triton.jit
def _accumulate_live(state, s, start_n, vals, BN: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr,
                     MASKED: tl.constexpr):
    acc, m_i, l_i, acc_g, l_g = state
    if ST.RAW_SCORES:                                  # s = q.k unscaled (contract.Hooks.update_raw)
        p, alpha, m_i, l_i = NORM.update_raw(s, vals.qk_scale, m_i, l_i, vals.thr, MASKED)
    else:
        p, alpha, m_i, l_i = NORM.update(s, m_i, l_i, vals.thr, MASKED)               # [BM, BN]
    offs_n = tl.arange(0, BN)
    if ST.DROPOUT:
        keep = dropout_keep(vals.seed, vals.drop_base, vals.i, (start_n + offs_n)[None, :], vals.S, vals.drop_p)
        p = tl.where(keep, p, 0.0)
    if ST.TMA:
        v = vals.vd.load([start_n, 0])                                                 # [BN, BDV]
    else:
        v = load_tile(vals.v, start_n, offs_n, tl.arange(0, ST.BDV), vals.S, ST.HEAD_DV, vals.sn, vals.sd,
                      MASKED, ST.PAD_DV)                                               # [BN, BDV]
    if NORM.rescale:
        acc = acc * alpha[:, None]
    acc = mma(p.to(v.dtype), v, acc, ST)                                     # [BM, BDV]
    if NORM.has_g:
        g = NORM.g_weights(s, vals.thr)                                              # [BM, BN]
        l_g += tl.sum(g, 1)
        if ST.DROPOUT:
            g = tl.where(keep, g, 0.0)
        acc_g = mma(g.to(v.dtype), v, acc_g, ST)
    return acc, m_i, l_i, acc_g, l_g


@triton.jit(do_not_specialize=["seed"])
def attn_fwd(Q, K, V, O, M, rows, dims, scale, args, drop, seed, L_BUCKET, S_BUCKET, L_PAD,
             BM: tl.constexpr, BN: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr,
             SCRATCH_COLS: tl.constexpr, HP):
    """Grid (cdiv(L, BM), B * Hq). Q, K, V, O, M: `contract.View` (M a placeholder without a mask); rows:
    `contract.RowOut`; dims: `contract.Dims`; scale: `contract.ScoreScale`; args: the normalizer's runtime
    bundle; drop: `contract.Dropout` (ST.DROPOUT only). L_BUCKET, S_BUCKET: autotune keys only. The
    scratch has L_PAD >= every row index a program touches rows per (batch, head). HP: the (Hq,) fp32 head
    parameters with NORM.head_param (`contract.Hooks`), else a placeholder. ST.VARLEN: packed sequences, grid
    (cdiv(max_seqlen_q, BM), B * Hq); a program of sequence b works on its Dims (`tiles.varlen_dims`) and exits
    when its block starts past L_b; the scratch stays (B, Hq, L_PAD) with L_PAD from max_seqlen_q.
    ST.PERSISTENT: grid (P programs,); the work items w < n_work = cdiv(L, BM) * B * Hq run in rounds of P, round r
    giving item r * P + p to program p, or r * P + P - 1 - p when r is odd (a snake: the default order puts a causal
    head's heaviest blocks first, and straight rounds (w = p, p + P, ...) would give some programs mostly heavy
    blocks); item w is the block that program (w % cdiv(L, BM), w // cdiv(L, BM)) of the default grid runs
    (`tiles.work_program`: the same blocks, the same results bit for bit). The plain forward only: not with ST.SPLIT
    or ST.VARLEN (their launchers never set it; a compile error otherwise)."""
    if ST.PERSISTENT:                                  # a loop over work items, each one block (`_fwd_block`)
        tl.static_assert(not (ST.SPLIT or ST.VARLEN), "ST.PERSISTENT: the plain forward only (no SPLIT, VARLEN)")
        n_m = tl.cdiv(dims.L, BM)
        n_work = n_m * dims.B * dims.Hq
        n_prog = tl.num_programs(0)
        pid = tl.program_id(0)
        # the block's setup stays in the loop, unhoisted by LLVM (disable_licm) and by MLIR (the guard keeps the
        # block in a region of its own): offline sm_90, softmax D = 64 needs 151 registers per thread, 191-212
        # without one or both (the default grid: 108; bench/TUNING.md, "Issue 17 item 6")
        for r in tl.range(0, tl.cdiv(n_work, n_prog), disable_licm=True):
            w = r * n_prog + tl.where(r % 2 == 1, n_prog - 1 - pid, pid)
            pid_m, off_b, off_h, off_hk = work_program(w, n_m, dims, ST.IS_CAUSAL)
            if w < n_work:
                _fwd_block(Q, K, V, O, M, rows, dims, scale, args, drop, seed, L_PAD, HP,
                           _Work(pid_m, off_b, off_h, off_hk, 0), BM, BN, ST, NORM, SCRATCH_COLS)
    else:
        pid_m, off_b, off_h, off_hk = query_program(dims, ST.IS_CAUSAL)
        split = 0
        if ST.SPLIT:                                   # axis 0 is (query block, split)
            n_split = tl.cdiv(dims.S, dims.split_keys)
            split = pid_m % n_split
            pid_m = pid_m // n_split
        if ST.VARLEN:                                  # packed sequence off_b: its Dims, its rows and keys
            dims, k0 = varlen_dims(dims, off_b)
            if pid_m * BM >= dims.L:
                return
            Q, O, K, V = at_row(Q, dims.q0), at_row(O, dims.q0), at_row(K, k0), at_row(V, k0)
        _fwd_block(Q, K, V, O, M, rows, dims, scale, args, drop, seed, L_PAD, HP,
                   _Work(pid_m, off_b, off_h, off_hk, split), BM, BN, ST, NORM, SCRATCH_COLS)


@triton.jit
def _fwd_block(Q, K, V, O, M, rows, dims, scale, args, drop, seed, L_PAD, HP, work, BM: tl.constexpr,
               BN: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr, SCRATCH_COLS: tl.constexpr):
    """The forward of one query block, `_Work` ``work`` (ST.VARLEN: dims and views already the sequence's)."""
    pid_m, off_b, off_h, off_hk, split = work
    pid_bh = off_b * dims.Hq + off_h
    start_m = pid_m * BM
    offs_m = start_m + tl.arange(0, BM)                # [BM]
    offs_dv = tl.arange(0, ST.BDV)
    q = load_tile(head_base(Q, off_b, off_h), start_m, tl.arange(0, BM), tl.arange(0, ST.BD), dims.L,
                  ST.HEAD_D, Q.sr, Q.sc, True, ST.PAD_D)                              # [BM, BD]
    full_end, hi = key_bounds(start_m, dims.L, dims.S, dims.causal_off, BM, BN, ST.IS_CAUSAL,
                              ST.MASK_KIND != 0)
    lo, full_lo, full_end = left_bounds(start_m, dims.L, dims.left_off, full_end, hi, BM, BN, ST.LEFT)
    if ST.SPLIT:                                       # this program's keys: [k_lo, k_hi)
        k_lo = split * dims.split_keys
        k_hi = tl.minimum(k_lo + dims.split_keys, dims.S)
        hi = tl.minimum(hi, k_hi)
        full_end = tl.minimum(full_end, k_hi)
        lo = tl.maximum(lo, k_lo)
        full_lo = tl.maximum(full_lo, k_lo)
        narrow = full_lo >= full_end
        full_lo = tl.where(narrow, lo, full_lo)
        full_end = tl.where(narrow, lo, full_end)
        off_b_out = split * dims.B + off_b             # O and the statistics of split s live at [s]
    else:
        off_b_out = off_b
    blk = Block(q, offs_m, offs_m[:, None], full_end, hi, lo, full_lo)
    head_rows = pid_bh.to(tl.int64) * dims.L           # the head's row counter base (dropout, score noise)
    if ST.TMA:                                         # K and V tiles through TMA (`tiles.kv_desc`)
        kd = kv_desc(head_base(K, off_b, off_hk), dims.S, K.sr, BN, ST.BD, ST.HEAD_D)
        vd = kv_desc(head_base(V, off_b, off_hk), dims.S, V.sr, BN, ST.BDV, ST.HEAD_DV)
    else:
        kd = None
        vd = None
    live = 0
    if ST.BLOCK_MASK:                                  # the block mask at this block's cell rows: all live first
        live = cell_row(rows.live, pid_bh, start_m, dims.L, dims.S)
        reset_cells(live, lo, hi, dims.S, BM, BN)
        tl.debug_barrier()
    keys = Keys(head_base(K, off_b, off_hk), K.sr, K.sc, mask_rows(M, off_b, off_h, offs_m), M.sc, dims.L,
                dims.S, dims.causal_off, scale, dims.left_off, seed, head_rows, live, kd)
    row_base = rows_base(dims, off_b_out, off_h, ST.VARLEN)   # (B, Hq, L) row outputs ((Hq, total_q) VARLEN)

    if NORM.head_param:                                # one parameter per query head: hooks get (thr, hp)
        hp = tl.load(HP + off_h) + tl.zeros([BM], dtype=tl.float32)                    # [BM]
        args = (args, hp)
    if ST.GIVEN_THR:                                   # two-phase protocol: the global threshold, (B, Hq, L)
        thr = tl.load(rows.thr + pid_bh.to(tl.int64) * dims.L + offs_m, mask=offs_m < dims.L, other=0.0)
    elif NORM.has_prepass:
        scr = rows.scratch + (pid_bh.to(tl.int64) * L_PAD + offs_m)[:, None] * SCRATCH_COLS        # [BM, 1]
        thr = NORM.prepass(blk, keys, args, scr, BM, BN, ST, NORM)                     # [BM]
    else:
        thr = tl.zeros([BM], dtype=tl.float32)

    if NORM.head_param:
        thr_h = (thr, hp)
    else:
        thr_h = thr
    BDV: tl.constexpr = ST.BDV                         # (shapes take constexprs, not bundle fields)
    acc = tl.zeros([BM, BDV], dtype=tl.float32)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    if NORM.has_g:
        acc_g = tl.zeros([BM, BDV], dtype=tl.float32)
        l_g = tl.zeros([BM], dtype=tl.float32)
    else:
        acc_g = tl.zeros([1, 1], dtype=tl.float32)
        l_g = tl.zeros([1], dtype=tl.float32)
    vals = _Values(thr_h, blk.i, head_base(V, off_b, off_hk), V.sr, V.sc, dims.S, seed, head_rows, drop.p,
                   scale.qk_scale, vd)
    acc, m_i, l_i, acc_g, l_g = fold_keys((acc, m_i, l_i, acc_g, l_g), _accumulate, vals, blk, keys, BN, ST,
                                          NORM)

    inv_l, stat0, stat1 = NORM.finalize(m_i, l_i, thr_h)                                # [BM]
    if ST.GIVEN_THR and NORM.given_final:             # the weights at the global threshold are the union's
        inv_l = tl.full([BM], 1.0, tl.float32)
    # the non-finite rule: a row with a NaN or +inf score has l = NaN (softmax: exp2(NaN); the threshold units
    # through the sum in _accumulate) or +inf (taylor): NaN output and statistics
    row_good = l_i < float("inf")
    inv_l = tl.where(row_good, inv_l, float("nan"))
    stat0 = tl.where(row_good, stat0, float("nan"))
    stat1 = tl.where(row_good, stat1, float("nan"))
    row_ok = offs_m < dims.L
    o_ptrs = head_base(O, off_b_out, off_h) + offs_m[:, None] * O.sr + offs_dv[None, :] * O.sc
    if ST.DROPOUT:
        out = acc * (inv_l * drop.scale)[:, None]
    else:
        out = acc * inv_l[:, None]
    if ST.PAD_DV:
        tl.store(o_ptrs, out.to(O.ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_dv < ST.HEAD_DV)[None, :])
    else:
        tl.store(o_ptrs, out.to(O.ptr.dtype.element_ty), mask=row_ok[:, None])
    if NORM.n_stats > 0:
        tl.store(rows.stat0 + row_base + offs_m, stat0, mask=row_ok)
    if NORM.n_stats > 1:
        tl.store(rows.stat1 + row_base + offs_m, stat1, mask=row_ok)
    if NORM.has_prepass and not ST.GIVEN_THR:
        tl.store(rows.thr + row_base + offs_m, thr, mask=row_ok)
    if NORM.has_g:
        inv_g, g_sum = NORM.g_finalize(l_i, l_g)
        if ST.GIVEN_THR and NORM.given_final:         # final weights: the raw sum of g (phase 2's tau gradient)
            g_sum = l_g
        if ST.DROPOUT:
            inv_g = inv_g * drop.scale
        tl.store(rows.g_sum + row_base + offs_m, g_sum, mask=row_ok)
        a_ptrs = rows.g_out + (row_base + offs_m)[:, None] * ST.HEAD_DV + offs_dv[None, :]
        tl.store(a_ptrs, acc_g * inv_g[:, None], mask=row_ok[:, None] & (offs_dv < ST.HEAD_DV)[None, :])
