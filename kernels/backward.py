"""The backward kernels (FlashAttention-2 shape), one copy for every normalizer.

Glossary (besides `contract`'s: i, j, s in kernel units, allowed, masked tile)::

    dO          gradient of the output                                               # [BM, BDV]
    O_bwd       the output the row term is taken against: O itself, or the forward's second weighted sum
                (entmax15: O2 = sum_j g_j v_j / sum_j g_j) when NORM.has_g
    delta       rowsum(dO * O_bwd), per query row                                    # [BM]
    w0, w1      the normalizer's row statistics in kernel form (NORM.bwd_rows, run by the preprocess
                kernel): softmax (lse2, -), taylor (1/Z, -), entmax15 (tau, -), topk (tau2, lse2)
    p           normalized weights recomputed from s and (w0, w1) (NORM.bwd_weights)       # [BM, BN]
    keep        dropout keep mask (``dropout.dropout_keep``: the same numbers as the forward loop)
    p_d         the weights the forward used: p * keep / (1 - dropout_p)            # [BM, BN]
    dP          dO @ V^T, times keep / (1 - dropout_p)                              # [BM, BN]
    dS          dL/ds_nat = NORM.bwd_dscores(p, s, dP, delta, w0, w1)               # [BM, BN]
                times (1 - tanh^2) with a softcap
    dQ = scale * dS @ K,  dK = scale * dS^T @ Q,  dV = p_d^T @ dO
                (the distance form, ST.DISTANCE: dS times the chain of tiles.log_distance, then
                dQ_i = sum_j dS_ij (q_i - k_j), dK_j = sum_i dS_ij (k_j - q_i); the launcher's sm_scale is 1;
                both times NORM.grad_mult)

Kernels:

* ``attn_bwd_preprocess``   grid (cdiv(L, BM), B*Hq): delta, w0, w1, the non-finite rule's flags.
* ``attn_bwd_dkdv``         grid (cdiv(S, BN), B*Hkv): a program owns BN keys of one kv head and loops over
                            the query tiles of its group's query heads, one flat loop over (head, tile) in a
                            fixed order (GQA without atomics: deterministic).
                            Causal: query tiles [lo, full_start) masked, [full_start, L) unmasked
                            (``tiles.query_bounds``); tiles above the diagonal are never visited.
* ``attn_bwd_dq``           grid (cdiv(L, BM), B*Hq): a program owns BM query rows and loops over the
                            key tiles like the forward (``tiles.key_bounds``).

With ST.VARLEN (packed sequences, `flashmaps.triton_varlen`) the dK/dV and dQ grids span max_seqlen_k / _q and
a program works on its sequence's Dims and rows (`tiles.varlen_dims`), exiting past them; the preprocess runs
unchanged over the (1, Hq, total_q) rows.

With ST.ATOMIC_DQ the dK/dV kernel also computes each visited tile's dQ = sm_scale * dS @ K (the dQ kernel's
chain, `_dq_product`) and adds it into DQA, an fp32 (B, Hq, L, HEAD_D) contiguous buffer zeroed by the
launcher, with ``tl.atomic_add``; the dQ kernel is then not launched. Matrix products per (query tile, key
tile) pair: forward 2 (QK^T, PV); backward 7 with the two kernels (dK/dV: QK^T, dO V^T, P^T dO, dS^T Q; dQ:
QK^T, dO V^T, dS K), 5 with ATOMIC_DQ (the dQ kernel's QK^T and dO V^T recompute is gone). The pairs the
dK/dV kernel skips (fully masked, above the diagonal, outside a window, dead with NORM.skip_dead) have dS = 0,
so DQA gets the same terms as the dQ kernel sums, in an order that varies between runs (fp32 rounding only).

The non-finite rule (as `flashmaps.ops._nonfinite_grads` on the torch path): a row whose forward met a NaN or
+inf score has NaN statistics; its dq row and its kv head's dk, dv are NaN, whatever the normalizer (a
threshold's comparisons or a guarded 1/Z would drop the NaN). The preprocess finds the bad rows and flags
them (rb.head_bad per (b, kv head); the dq row: NaN in DQA or rb.row_bad), the dK/dV and dQ kernels' epilogues
store NaN where flagged: no pass over the gradients after the kernels.

With ST.BLOCK_MASK (`kernels.blockmask`: the forward's int8 liveness cells, BwdRows.live) both kernels (and the
atomic dQ with them) skip a (query tile, key tile) pair whose cells are all dead before loading its rows or
computing Q K^T: 0 of the 7 (5) products instead of the 2 the NORM.skip_dead test below still spends. Each loop
first lists its pairs with a live cell (`blockmask.live_tiles`, into the program's slot of BwdRows.lists) and
then runs over the list: no branch around the loads and Q K^T, so the loop keeps its pipeline stages.

Scores are recomputed in the forward's orientation (q @ k^T, the same tiles under the interpreter) so
that top-k's comparison s >= tau2 sees the values the forward saw. With NORM.skip_dead a tile whose
weights are all 0 is skipped after the score product: its contribution is exactly 0. Rows past L are
loaded as zeros (q = dO = 0, row statistics 0): their weights stay finite and their dS = p (0 - 0) and
dO rows are 0, so they add nothing; empty rows get p = 0 from their statistics.
"""

from typing import Any, NamedTuple

import triton
import triton.language as tl

from .blockmask import LIST_CHUNK, cell_row, live_tiles
from .contract import Keys
from .dropout import dropout_keep
from .tiles import (add_noise, head_base, head_program, key_bounds, left_bounds, left_query_bounds, load_tile, log_distance,
                    mask_rows, mask_scores, mma, query_bounds, query_program, scale_scores, at_row, rows_base,
                    varlen_dims)


class _Rows(NamedTuple):
    """One query tile's backward inputs."""

    q: Any            # [BM, BD]
    do: Any           # [BM, BDV]
    delta: Any        # [BM]
    w0: Any
    w1: Any
    i: Any            # [BM, 1] query rows
    drop_base: Any    # (b * Hq + h) * L, int64


# ---------------------------------------------------------------------------------------------------
# the per-tile recompute shared by the dK/dV and dQ kernels


@triton.jit
def _tile_weights(rw, k, j, keys, ST: tl.constexpr, NORM: tl.constexpr, MASKED: tl.constexpr):
    """Scores s [BM, BN] of the query rows ``rw`` against keys j [1, BN] (k [BN, BD]), recomputed as
    ``tiles.score_tile`` computes them (same helpers, same orientation), the softcap derivative
    dcap = 1 - tanh^2 (or 1.0) and the weights p = bwd_weights(s, w0, w1)."""
    qk = mma(rw.q, tl.trans(k), None, ST)                                     # [BM, BN]
    if ST.DISTANCE:
        qk, chain = log_distance(rw.q, k, qk, keys.scale)                              # [BM, BN] each
    s = scale_scores(qk, keys.scale, ST.SOFTCAP)
    if ST.SOFTCAP:
        t = s * (1.0 / keys.scale.cap_mult)                                            # tanh, before the bias
        dcap = 1.0 - t * t
    else:
        dcap = 1.0
    if ST.DISTANCE:
        dcap = dcap * chain                          # the chain through the log-distance (tiles.log_distance)
    if MASKED:
        s = mask_scores(s, rw.i, j, keys, ST)
    if NORM.has_noise:
        s = add_noise(s, rw.i, j, keys, NORM)
    p = NORM.bwd_weights(s, rw.w0, rw.w1, MASKED)                                      # [BM, BN]
    return s, dcap, p


@triton.jit
def _tile_dscores(rw, s, dcap, p, v, j, S, seed, drop, ST: tl.constexpr, NORM: tl.constexpr):
    """(p_d, dS) of a tile: the weights the forward applied (with dropout) and dL/d(pre-cap score)."""
    dp = mma(rw.do, tl.trans(v), None, ST)                                    # [BM, BN]
    if ST.DROPOUT:
        keep = dropout_keep(seed, rw.drop_base, rw.i, j, S, drop.p)
        p_d = tl.where(keep, p * drop.scale, 0.0)
        dp = tl.where(keep, dp * drop.scale, 0.0)
    else:
        p_d = p
    ds = NORM.bwd_dscores(p, s, dp, rw.delta, rw.w0, rw.w1)                            # [BM, BN]
    if ST.SOFTCAP:
        ds = ds * dcap
    elif ST.DISTANCE:
        ds = ds * dcap
    return p_d, ds


@triton.jit
def _dq_product(dq, ds, k, q, ST: tl.constexpr):
    """dq [BM, BD] (or None) plus the unscaled dQ of a tile: dS @ K [BM, BN] @ [BN, BD], or in the distance form
    dQ_i = sum_j dS_ij (q_i - k_j) (see tiles.log_distance)."""
    if ST.DISTANCE:
        return mma((-ds).to(k.dtype), k, dq, ST) + q.to(tl.float32) * tl.sum(ds, 1)[:, None]
    else:
        return mma(ds.to(k.dtype), k, dq, ST)                                              # [BM, BD]


@triton.jit
def _load_rows(Q, DO, rb, off_b, off_h, start_m, dims, BM: tl.constexpr, ST: tl.constexpr):
    """The `_Rows` of query rows [start_m, start_m + BM) of head (off_b, off_h)."""
    rows = tl.arange(0, BM)
    offs_m = start_m + rows                                                            # [BM]
    row_ok = offs_m < dims.L
    row_base = rows_base(dims, off_b, off_h, ST.VARLEN)
    q = load_tile(head_base(Q, off_b, off_h), start_m, rows, tl.arange(0, ST.BD), dims.L, ST.HEAD_D, Q.sr, Q.sc,
                  True, ST.PAD_D)                                                      # [BM, BD]
    do = load_tile(head_base(DO, off_b, off_h), start_m, rows, tl.arange(0, ST.BDV), dims.L, ST.HEAD_DV,
                   DO.sr, DO.sc, True, ST.PAD_DV)                                      # [BM, BDV]
    delta = tl.load(rb.delta + row_base + offs_m, mask=row_ok, other=0.0)               # [BM]
    w0 = tl.load(rb.w0 + row_base + offs_m, mask=row_ok, other=0.0)
    w1 = tl.load(rb.w1 + row_base + offs_m, mask=row_ok, other=0.0)
    return _Rows(q, do, delta, w0, w1, offs_m[:, None], row_base)


# ---------------------------------------------------------------------------------------------------
# preprocess


@triton.jit
def attn_bwd_preprocess(O, DO, rows, rb, B, Hq, L, BM: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr, HP,
                        SHIFT=None, DQA=None, CU_Q=None, N_SEQ=1, GROUP=1):
    """delta = rowsum(dO * O_bwd) (minus SHIFT[row] when given: the statistics' gradients, ``delta_shift``) and
    (w0, w1) = NORM.bwd_rows(stat0, stat1, thr, g_sum) into rb (`contract.BwdRows`), all (B, Hq, L) fp32
    contiguous. O (= O_bwd), DO: `contract.View`; rows: the forward's `contract.RowOut`; HP: the head parameters
    with NORM.head_param (bwd_rows gets (thr, hp)).

    The non-finite rule (see the module docstring): a bad row (a NaN statistic; NORM.n_stats == 0: a NaN row sum
    of O_bwd) sets its kv head's flag rb.head_bad[b * Hkv + h // GROUP] = 1 (zeroed by the launcher; GROUP =
    Hq / Hkv) and marks its dq row: NaN into DQA's row (ST.ATOMIC_DQ; DQA zeroed, the atomic adds keep it NaN),
    else rb.row_bad[row] = NaN (-0.0 for the other rows: the dQ kernel adds it). CU_Q (int32, N_SEQ + 1): packed
    sequences run as one (1, Hq, total_q) call; the flag's b is then the row's sequence."""
    pid_bh = head_program(B * Hq)
    off_b = pid_bh // Hq
    off_h = pid_bh % Hq
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)                                  # [BM]
    rows64 = offs_m.to(tl.int64)[:, None]          # a strided dO: row * stride may pass 2^31
    offs_dv = tl.arange(0, ST.BDV)
    ok = (offs_m < L)[:, None] & (offs_dv < ST.HEAD_DV)[None, :]
    o = tl.load(head_base(O, off_b, off_h) + rows64 * O.sr + offs_dv[None, :] * O.sc, mask=ok, other=0.0)
    do = tl.load(head_base(DO, off_b, off_h) + rows64 * DO.sr + offs_dv[None, :] * DO.sc, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)                           # [BM]
    row = pid_bh.to(tl.int64) * L + offs_m
    row_ok = offs_m < L
    stat0 = tl.load(rows.stat0 + row, mask=row_ok, other=0.0)
    stat1 = tl.load(rows.stat1 + row, mask=row_ok, other=0.0)
    thr = tl.load(rows.thr + row, mask=row_ok, other=0.0)
    extras = tl.load(rows.g_sum + row, mask=row_ok, other=0.0)
    if NORM.n_stats > 0:
        bad = (stat0 != stat0) | (stat1 != stat1)
    else:                                       # no row statistic (sigmoid): the forward's NaN output rows
        o_sum = tl.sum(o.to(tl.float32), 1)
        bad = o_sum != o_sum
    bad = bad & row_ok                                                                 # [BM]
    if NORM.head_param:
        thr = (thr, tl.load(HP + off_h) + tl.zeros([BM], dtype=tl.float32))
    w0, w1 = NORM.bwd_rows(stat0, stat1, thr, extras)
    if SHIFT is not None:
        delta -= tl.load(SHIFT + row, mask=row_ok, other=0.0)
    tl.store(rb.delta + row, delta, mask=row_ok)
    tl.store(rb.w0 + row, w0, mask=row_ok)
    tl.store(rb.w1 + row, w1, mask=row_ok)
    flag = off_b * (Hq // GROUP) + off_h // GROUP + tl.zeros([BM], dtype=tl.int32)
    if CU_Q is not None:                        # packed: the row's sequence
        seq = tl.zeros([BM], dtype=tl.int32)
        for n in range(1, N_SEQ):
            seq += (offs_m >= tl.load(CU_Q + n)).to(tl.int32)
        flag = seq * (Hq // GROUP) + off_h // GROUP
    tl.store(rb.head_bad + flag, tl.full([BM], 1.0, tl.float32), mask=bad)
    if ST.ATOMIC_DQ:
        offs_d = tl.arange(0, ST.BD)
        nan = tl.full([BM, ST.BD], float("nan"), tl.float32)
        tl.store(DQA + row[:, None] * ST.HEAD_D + offs_d[None, :], nan,
                 mask=bad[:, None] & (offs_d < ST.HEAD_D)[None, :])
    else:
        tl.store(rb.row_bad + row, tl.where(bad, float("nan"), -0.0), mask=row_ok)


# ---------------------------------------------------------------------------------------------------
# dK, dV


@triton.jit
def _dkdv_loop(dk, dv, k, v, j, Q, DO, M, rb, dims, scale, seed, drop, off_b, off_hk, start, end,
               BM: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr, MASKED: tl.constexpr, DQA, sm_scale):
    """Accumulate the query tiles [start, end) of the query heads of kv head off_hk into dk [BN, BD],
    dv [BN, BDV]: one flat loop over (head g, tile) in a fixed order (a nested head loop costs registers
    and spills on sm_90). With ST.ATOMIC_DQ each tile's sm_scale * dQ is added into DQA (fp32
    (B, Hq, L, HEAD_D) contiguous)."""
    n_tiles = tl.cdiv(end - start, BM)
    BN: tl.constexpr = k.shape[0]
    if n_tiles > 0:                                     # (guarded: see tiles._fold_range)
        if ST.BLOCK_MASK:                               # only the pairs with a live cell, listed first: no branch
            start_n = tl.program_id(0) * BN             # the kernel's key block
            kv_bh = off_b * (dims.Hq // dims.group) + off_hk   # this program's list slot in rb.lists
            slot = kv_bh.to(tl.int64) * tl.cdiv(dims.S, BN) + tl.program_id(0)
            lst = rb.lists + slot * (dims.group * tl.cdiv(dims.L, BM))
            cnt = live_tiles(lst, rb.live, off_b * dims.Hq + off_hk * dims.group, start, start_n, BM, 0, n_tiles,
                             dims.group * n_tiles, dims.L, dims.S, BM, BN, LIST_CHUNK)
            for i in range(0, cnt):
                dk, dv = _dkdv_pair(dk, dv, k, v, j, Q, DO, M, rb, dims, scale, seed, drop, off_b, off_hk, start,
                                    n_tiles, tl.load(lst + i).to(tl.int32), BM, ST, NORM, MASKED, DQA, sm_scale)
        else:
            for t in range(0, dims.group * n_tiles):
                dk, dv = _dkdv_pair(dk, dv, k, v, j, Q, DO, M, rb, dims, scale, seed, drop, off_b, off_hk, start,
                                    n_tiles, t, BM, ST, NORM, MASKED, DQA, sm_scale)
    return dk, dv


@triton.jit
def _dkdv_pair(dk, dv, k, v, j, Q, DO, M, rb, dims, scale, seed, drop, off_b, off_hk, start, n_tiles, t,
               BM: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr, MASKED: tl.constexpr, DQA, sm_scale):
    """`_dkdv_loop`'s step t: query head off_hk * group + t // n_tiles, query tile t % n_tiles from start."""
    g = t // n_tiles
    start_m = start + (t - g * n_tiles) * BM
    off_h = off_hk * dims.group + g                     # GQA: the query heads reading this kv head
    rw = _load_rows(Q, DO, rb, off_b, off_h, start_m, dims, BM, ST)
    keys = Keys(0, 0, 0, mask_rows(M, off_b, off_h, start_m + tl.arange(0, BM)), M.sc, dims.L, dims.S,
                dims.causal_off, scale, dims.left_off, seed, rw.drop_base, 0)   # (no key pointer: the k tile is resident)
    s, dcap, p = _tile_weights(rw, k, j, keys, ST, NORM, MASKED)
    live = True
    if NORM.skip_dead:
        live = tl.max(p) > 0
    if live:
        p_d, ds = _tile_dscores(rw, s, dcap, p, v, j, dims.S, seed, drop, ST, NORM)
        dv = mma(tl.trans(p_d).to(rw.do.dtype), rw.do, dv, ST)                      # [BN, BDV]
        if ST.DISTANCE:                 # dK_j += sum_i c_ij (k_j - q_i), c = ds (see tiles.log_distance)
            dk = mma(tl.trans(-ds).to(rw.q.dtype), rw.q, dk, ST) + k.to(tl.float32) * tl.sum(ds, 0)[:, None]
        else:
            dk = mma(tl.trans(ds).to(rw.q.dtype), rw.q, dk, ST)                     # [BN, BD]
        if ST.ATOMIC_DQ:
            if ST.DISTANCE:     # the keys j >= S of a ragged unmasked tile (zeros) have dS != 0: their
                ds = tl.where(j < dims.S, ds, 0.0)      # dS K is 0 but their dS q_i is not
            offs_d = tl.arange(0, ST.BD)[None, :]
            tl.atomic_add(DQA + (rw.drop_base + rw.i) * ST.HEAD_D + offs_d,
                          _dq_product(None, ds, k, rw.q, ST) * sm_scale,                           # [BM, BD]
                          mask=(rw.i < dims.L) & (offs_d < ST.HEAD_D), sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["seed"])
def attn_bwd_dkdv(Q, K, V, DO, M, DK, DV, rb, dims, scale, sm_scale, drop, seed, L_BUCKET, S_BUCKET,
                  BM: tl.constexpr, BN: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr, DQA):
    """dK, dV of BN keys of one kv head; grid (cdiv(S, BN), B * Hkv). Q, K, V, DO, M, DK, DV:
    `contract.View`; rb: `contract.BwdRows`; sm_scale: the natural scale (dK = sm_scale dS^T Q).
    L_BUCKET, S_BUCKET: autotune keys. DQA: with ST.ATOMIC_DQ the fp32 (B, Hq, L, HEAD_D) contiguous dQ
    accumulator, zeroed (a placeholder otherwise)."""
    pid_n = tl.program_id(0)
    Hkv = dims.Hq // dims.group
    pid_bh = head_program(dims.B * Hkv)
    if ST.ATOMIC_DQ:      # a program that redoes the last head (tiles.head_program) would add its dQ twice
        if tl.program_id(1) + tl.program_id(2) * tl.num_programs(1) >= dims.B * Hkv:
            return
    off_b = pid_bh // Hkv
    off_hk = pid_bh % Hkv
    head_bad = tl.load(rb.head_bad + (off_b * Hkv + off_hk)) > 0      # the non-finite rule's flag (the epilogue)
    start_n = pid_n * BN
    if ST.VARLEN:                                      # packed sequence off_b: its Dims, its rows and keys
        dims, k0 = varlen_dims(dims, off_b)
        if start_n >= dims.S:
            return
        Q, DO, K, V = at_row(Q, dims.q0), at_row(DO, dims.q0), at_row(K, k0), at_row(V, k0)
        DK, DV = at_row(DK, k0), at_row(DV, k0)
    keys_n = tl.arange(0, BN)
    offs_d = tl.arange(0, ST.BD)
    offs_dv = tl.arange(0, ST.BDV)
    j = (start_n + keys_n)[None, :]                                                    # [1, BN]
    k = load_tile(head_base(K, off_b, off_hk), start_n, keys_n, offs_d, dims.S, ST.HEAD_D, K.sr, K.sc,
                  True, ST.PAD_D)                                                      # [BN, BD]
    v = load_tile(head_base(V, off_b, off_hk), start_n, keys_n, offs_dv, dims.S, ST.HEAD_DV, V.sr, V.sc,
                  True, ST.PAD_DV)                                                     # [BN, BDV]
    BD: tl.constexpr = ST.BD                           # (shapes take constexprs, not bundle fields)
    BDV: tl.constexpr = ST.BDV
    dk = tl.zeros([BN, BD], dtype=tl.float32)
    dv = tl.zeros([BN, BDV], dtype=tl.float32)
    lo, full_start = query_bounds(start_n, dims.L, dims.S, dims.causal_off, BM, BN, ST.IS_CAUSAL,
                                  ST.MASK_KIND != 0)
    full_start, full_stop, stop = left_query_bounds(start_n, dims.L, dims.S, dims.left_off, lo, full_start, BM, BN,
                                                    ST.LEFT)
    dk, dv = _dkdv_loop(dk, dv, k, v, j, Q, DO, M, rb, dims, scale, seed, drop, off_b, off_hk, lo, full_start,
                        BM, ST, NORM, True, DQA, sm_scale)
    dk, dv = _dkdv_loop(dk, dv, k, v, j, Q, DO, M, rb, dims, scale, seed, drop, off_b, off_hk, full_start,
                        full_stop, BM, ST, NORM, False, DQA, sm_scale)
    if ST.LEFT:
        dk, dv = _dkdv_loop(dk, dv, k, v, j, Q, DO, M, rb, dims, scale, seed, drop, off_b, off_hk, full_stop,
                            stop, BM, ST, NORM, True, DQA, sm_scale)
    key_ok = (start_n + keys_n) < dims.S
    dk_ptrs = head_base(DK, off_b, off_hk) + (start_n + keys_n)[:, None] * DK.sr + offs_d[None, :] * DK.sc
    dv_ptrs = head_base(DV, off_b, off_hk) + (start_n + keys_n)[:, None] * DV.sr + offs_dv[None, :] * DV.sc
    dk_ok = key_ok[:, None] & (offs_d < ST.HEAD_D)[None, :]
    dv_ok = key_ok[:, None] & (offs_dv < ST.HEAD_DV)[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.ptr.dtype.element_ty), mask=dk_ok)
    tl.store(dv_ptrs, dv.to(DV.ptr.dtype.element_ty), mask=dv_ok)
    # the non-finite rule: NaN over the stored tiles if the kv head has a bad row (head_bad is read before the
    # loops: read here, as an add on the accumulators or as this branch, it made ptxas serialize the causal
    # deterministic kernel's wgmma pipeline, C7515)
    if head_bad:
        tl.store(dk_ptrs, (dk + float("nan")).to(DK.ptr.dtype.element_ty), mask=dk_ok)
        tl.store(dv_ptrs, (dv + float("nan")).to(DV.ptr.dtype.element_ty), mask=dv_ok)


# ---------------------------------------------------------------------------------------------------
# dQ


@triton.jit
def _dq_loop(dq, rw, keys, v_base, V, seed, drop, start, end, BN: tl.constexpr, ST: tl.constexpr,
             NORM: tl.constexpr, MASKED: tl.constexpr, lst=0):
    """Accumulate the key tiles [start, end) into dq [BM, BD] (unscaled); with ST.BLOCK_MASK keys.live is the
    block mask at the block's cell rows, and only the tiles with a live cell are visited, listed first into
    lst (the program's slot of BwdRows.lists; no branch in the loop)."""
    BM: tl.constexpr = rw.q.shape[0]
    if start < end:                                     # (guarded: see tiles._fold_range)
        if ST.BLOCK_MASK:
            n_tiles = tl.cdiv(end - start, BN)
            cnt = live_tiles(lst, keys.live, 0, 0, start, 0, BN, n_tiles, n_tiles, keys.L, keys.S, BM, BN,
                             LIST_CHUNK)
            for i in range(0, cnt):
                start_n = start + tl.load(lst + i).to(tl.int32) * BN
                dq = _dq_pair(dq, rw, keys, v_base, V, seed, drop, start_n, BN, ST, NORM, MASKED)
        else:
            for start_n in range(start, end, BN):
                dq = _dq_pair(dq, rw, keys, v_base, V, seed, drop, start_n, BN, ST, NORM, MASKED)
    return dq


@triton.jit
def _dq_pair(dq, rw, keys, v_base, V, seed, drop, start_n, BN: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr,
             MASKED: tl.constexpr):
    """`_dq_loop`'s step: the key tile [start_n, start_n + BN)."""
    keys_n = tl.arange(0, BN)
    k = load_tile(keys.k, start_n, keys_n, tl.arange(0, ST.BD), keys.S, ST.HEAD_D, keys.sn, keys.sd,
                  MASKED, ST.PAD_D)                                                            # [BN, BD]
    j = (start_n + keys_n)[None, :]                                                            # [1, BN]
    s, dcap, p = _tile_weights(rw, k, j, keys, ST, NORM, MASKED)
    live = True
    if NORM.skip_dead:
        live = tl.max(p) > 0
    if live:
        v = load_tile(v_base, start_n, keys_n, tl.arange(0, ST.BDV), keys.S, ST.HEAD_DV, V.sr, V.sc,
                      MASKED, ST.PAD_DV)                                                       # [BN, BDV]
        p_d, ds = _tile_dscores(rw, s, dcap, p, v, j, keys.S, seed, drop, ST, NORM)
        dq = _dq_product(dq, ds, k, rw.q, ST)                                                  # [BM, BD]
    return dq


@triton.jit(do_not_specialize=["seed"])
def attn_bwd_dq(Q, K, V, DO, M, DQ, rb, dims, scale, sm_scale, drop, seed, L_BUCKET, S_BUCKET,
                BM: tl.constexpr, BN: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr):
    """dQ of BM query rows of one query head; grid (cdiv(L, BM), B * Hq). Arguments as attn_bwd_dkdv."""
    pid_m, off_b, off_h, off_hk = query_program(dims, ST.IS_CAUSAL)
    if ST.VARLEN:                                      # packed sequence off_b: its Dims, its rows and keys
        dims, k0 = varlen_dims(dims, off_b)
        if pid_m * BM >= dims.L:
            return
        Q, DO, DQ, K, V = at_row(Q, dims.q0), at_row(DO, dims.q0), at_row(DQ, dims.q0), at_row(K, k0), at_row(V, k0)
    start_m = pid_m * BM
    offs_m = start_m + tl.arange(0, BM)                                                # [BM]
    offs_d = tl.arange(0, ST.BD)
    rw = _load_rows(Q, DO, rb, off_b, off_h, start_m, dims, BM, ST)
    live = 0
    lst = 0
    if ST.BLOCK_MASK:                                  # the block mask at this block's cell rows, its list slot
        live = cell_row(rb.live, off_b * dims.Hq + off_h, start_m, dims.L, dims.S)
        lst = rb.lists + ((off_b * dims.Hq + off_h).to(tl.int64) * tl.cdiv(dims.L, BM) + pid_m) * tl.cdiv(dims.S, BN)
    keys = Keys(head_base(K, off_b, off_hk), K.sr, K.sc, mask_rows(M, off_b, off_h, offs_m), M.sc, dims.L,
                dims.S, dims.causal_off, scale, dims.left_off, seed, rw.drop_base, live)
    v_base = head_base(V, off_b, off_hk)
    full_end, hi = key_bounds(start_m, dims.L, dims.S, dims.causal_off, BM, BN, ST.IS_CAUSAL,
                              ST.MASK_KIND != 0)
    lo, full_lo, full_end = left_bounds(start_m, dims.L, dims.left_off, full_end, hi, BM, BN, ST.LEFT)
    BD: tl.constexpr = ST.BD                           # (shapes take constexprs, not bundle fields)
    dq = tl.zeros([BM, BD], dtype=tl.float32)
    if ST.LEFT:
        dq = _dq_loop(dq, rw, keys, v_base, V, seed, drop, lo, full_lo, BN, ST, NORM, True, lst)
    dq = _dq_loop(dq, rw, keys, v_base, V, seed, drop, full_lo, full_end, BN, ST, NORM, False, lst)
    dq = _dq_loop(dq, rw, keys, v_base, V, seed, drop, full_end, hi, BN, ST, NORM, True, lst)
    dq_ptrs = head_base(DQ, off_b, off_h) + offs_m[:, None] * DQ.sr + offs_d[None, :] * DQ.sc
    nan_row = tl.load(rb.row_bad + rows_base(dims, off_b, off_h, ST.VARLEN) + offs_m, mask=offs_m < dims.L,
                      other=0.0)                   # the non-finite rule: NaN for a bad row, -0.0 (x + -0.0 = x) else
    tl.store(dq_ptrs, (dq * sm_scale + nan_row[:, None]).to(DQ.ptr.dtype.element_ty),
             mask=(offs_m < dims.L)[:, None] & (offs_d < ST.HEAD_D)[None, :])
