"""The backward kernels (FlashAttention-2 shape), one copy for every normalizer.

Glossary (besides ``common``'s: i, j, s in kernel units, allowed, masked tile, flags)::

    dO          gradient of the output                                               # [BM, BDV]
    O_bwd       the output the row term is taken against: O itself, or the forward's AUX output
                (entmax15: O2 = sum_j g_j v_j / sum_j g_j) when the normalizer has one
    delta       rowsum(dO * O_bwd), per query row                                    # [BM]
    r0, r1      the normalizer's row statistics in kernel form (ROWS = Hooks.bwd_rows, run by the
                preprocess kernel): softmax (lse2, -), taylor (1/Z, -), entmax15 (tau, -), topk (tau2, lse2)
    p           normalized weights recomputed from s and (r0, r1) (WEIGHTS = Hooks.bwd_weights)  # [BM, BN]
    keep        dropout keep mask, Philox(seed, ((b*Hq + h)*L + i)*S + j) >= dropout_p
                (``common.dropout_keep``: the same numbers as the forward tile loop)
    p_d         the weights the forward used: p * keep / (1 - dropout_p)            # [BM, BN]
    dP          dO @ V^T, times keep / (1 - dropout_p)                              # [BM, BN]
    dS          dL/ds_nat = DSCORES(p, s, dP, delta, r0, r1) (Hooks.bwd_dscores)    # [BM, BN]
                (softmax: p (dP - delta); taylor: f'(s)/Z (dP - delta); entmax15: g (dP - delta);
                topk: the softmax rule, p = 0 off the kept set); times (1 - tanh^2) with a softcap
    dQ = scale * dS @ K,  dK = scale * dS^T @ Q,  dV = p_d^T @ dO

Kernels:

* ``attn_bwd_preprocess``   grid (cdiv(L, BM), B*Hq): delta, r0, r1.
* ``attn_bwd_dkdv``         grid (cdiv(S, BN), B*Hkv): a program owns BN keys of one kv head and loops over
                            the query tiles of its GROUP query heads, one flat loop over (head, tile) in a
                            fixed order (GQA without atomics: deterministic).
                            Causal: query tiles [lo, full_start) masked, [full_start, L) unmasked
                            (``common.query_bounds``); tiles above the diagonal are never visited.
* ``attn_bwd_dq``           grid (cdiv(L, BM), B*Hq): a program owns BM query rows and loops over the
                            key tiles like the forward (``common.key_bounds``).

Scores are recomputed in the forward's orientation (q @ k^T, the same tiles under the interpreter) so
that top-k's comparison s >= tau2 sees the values the forward saw. With SKIP_DEAD (sparse normalizers)
a tile whose weights are all 0 is skipped after the score product: its contribution is exactly 0.
Rows past L are loaded as zeros (q = dO = 0, row statistics 0): their weights stay finite and their
dS = p (0 - 0) and dO rows are 0, so they add nothing; empty rows get p = 0 from their statistics.
"""

import triton
import triton.language as tl

from .common import dropout_keep, key_bounds, load_tile, mask_scores, mma, query_bounds, scale_scores


# ---------------------------------------------------------------------------------------------------
# the per-tile recompute shared by the dK/dV and dQ kernels


@triton.jit
def _tile_weights(q, k, i, j, p_mask_rows, r0, r1, L, S, causal_off, stride_mask_n,
                  qk_scale, cap_mult, bias_mult, mask_min,
                  MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                  SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, WEIGHTS: tl.constexpr):
    """Scores s [BM, BN] (kernel units, computed as ``common.score_tile`` computes them: the same
    helpers, the same orientation), the softcap derivative dcap = 1 - tanh^2 (or 1.0) and the weights
    p = WEIGHTS(s, r0, r1)."""
    qk = mma(q, tl.trans(k), None, DOT_PREC)                              # [BM, BN]
    s = scale_scores(qk, qk_scale, cap_mult, SOFTCAP)
    if SOFTCAP:
        t = s * (1.0 / cap_mult)                                           # tanh, before the mask bias
        dcap = 1.0 - t * t
    else:
        dcap = 1.0
    if MASKED:
        s = mask_scores(s, i, j, L, S, causal_off, p_mask_rows, stride_mask_n, bias_mult, mask_min,
                        IS_CAUSAL, MASK_KIND)
    p = WEIGHTS(s, r0, r1, MASKED)                                                    # [BM, BN]
    return s, dcap, p


@triton.jit
def _tile_dscores(p, s, dcap, do, v, delta, r0, r1, i, j, S, seed, drop_base, dropout_p, drop_scale,
                  SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, DROPOUT: tl.constexpr,
                  DSCORES: tl.constexpr):
    """(p_d, dS) of a tile: the weights the forward applied (with dropout) and dL/d(pre-cap score)."""
    dp = mma(do, tl.trans(v), None, DOT_PREC)                             # [BM, BN]
    if DROPOUT:
        keep = dropout_keep(seed, drop_base, i, j, S, dropout_p)
        p_d = tl.where(keep, p * drop_scale, 0.0)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    else:
        p_d = p
    ds = DSCORES(p, s, dp, delta, r0, r1)                                             # [BM, BN]
    if SOFTCAP:
        ds = ds * dcap
    return p_d, ds


# ---------------------------------------------------------------------------------------------------
# preprocess


@triton.jit
def attn_bwd_preprocess(O, DO, Stat0, Stat1, Par, AuxL, Delta, R0, R1,
                        stride_ob, stride_oh, stride_om, stride_od,
                        stride_dob, stride_doh, stride_dom, stride_dod,
                        Hq, L, HEAD_DV: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr,
                        ROWS: tl.constexpr):
    """delta = rowsum(dO * O_bwd) and (r0, r1) = ROWS(stat0, stat1, par, aux), all (B, Hq, L) fp32
    contiguous (Stat0/Stat1/Par/AuxL are the forward's contiguous row outputs)."""
    pid_bh = tl.program_id(1)
    off_b = pid_bh // Hq
    off_h = pid_bh % Hq
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)                                  # [BM]
    offs_dv = tl.arange(0, BDV)
    ok = (offs_m < L)[:, None] & (offs_dv < HEAD_DV)[None, :]
    o = tl.load(O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od, mask=ok, other=0.0)
    do = tl.load(DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)                           # [BM]
    row = pid_bh.to(tl.int64) * L + offs_m
    row_ok = offs_m < L
    stat0 = tl.load(Stat0 + row, mask=row_ok, other=0.0)
    stat1 = tl.load(Stat1 + row, mask=row_ok, other=0.0)
    par = tl.load(Par + row, mask=row_ok, other=0.0)
    aux = tl.load(AuxL + row, mask=row_ok, other=0.0)
    r0, r1 = ROWS(stat0, stat1, par, aux)
    tl.store(Delta + row, delta, mask=row_ok)
    tl.store(R0 + row, r0, mask=row_ok)
    tl.store(R1 + row, r1, mask=row_ok)


# ---------------------------------------------------------------------------------------------------
# dK, dV


@triton.jit
def _dkdv_tile(dk, dv, k, v, q, do, i, j, p_mask_rows, delta, r0, r1, L, S, causal_off,
               stride_mask_n, qk_scale, cap_mult, bias_mult, mask_min, seed, drop_base, dropout_p,
               drop_scale, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
               SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, DROPOUT: tl.constexpr,
               SKIP_DEAD: tl.constexpr, WEIGHTS: tl.constexpr, DSCORES: tl.constexpr):
    s, dcap, p = _tile_weights(q, k, i, j, p_mask_rows, r0, r1, L, S, causal_off, stride_mask_n,
                               qk_scale, cap_mult, bias_mult, mask_min,
                               MASKED, IS_CAUSAL, MASK_KIND, SOFTCAP, DOT_PREC, WEIGHTS)  # [BM, BN]
    live = True
    if SKIP_DEAD:
        live = tl.max(p) > 0
    if live:
        p_d, ds = _tile_dscores(p, s, dcap, do, v, delta, r0, r1, i, j, S, seed, drop_base,
                                dropout_p, drop_scale, SOFTCAP, DOT_PREC, DROPOUT, DSCORES)
        dv = mma(tl.trans(p_d).to(do.dtype), do, dv, DOT_PREC)    # [BN, BDV]
        dk = mma(tl.trans(ds).to(q.dtype), q, dk, DOT_PREC)       # [BN, BD]
    return dk, dv


@triton.jit
def _dkdv_loop(dk, dv, k, v, Q, DO, Mask, Delta, R0, R1, j, off_b, off_hk, start, end,
               Hq, GROUP, L, S, causal_off,
               stride_qb, stride_qh, stride_qm, stride_qd, stride_dob, stride_doh, stride_dom, stride_dod,
               stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
               qk_scale, cap_mult, bias_mult, mask_min, seed, dropout_p, drop_scale,
               HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
               BM: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
               MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
               DROPOUT: tl.constexpr, SKIP_DEAD: tl.constexpr, WEIGHTS: tl.constexpr,
               DSCORES: tl.constexpr):
    """Accumulate the query tiles [start, end) of the GROUP query heads of kv head off_hk into
    dk [BN, BD], dv [BN, BDV]: one flat loop over (head g, tile) in a fixed order (a nested head loop
    costs registers and spills on sm_90)."""
    rows = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    n_tiles = tl.cdiv(end - start, BM)
    for t in range(0, GROUP * n_tiles):
        g = t // n_tiles
        start_m = start + (t - g * n_tiles) * BM
        off_h = off_hk * GROUP + g                  # GQA: the query heads reading this kv head
        q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        do_base = DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
        row_base = (off_b * Hq + off_h).to(tl.int64) * L
        offs_m = start_m + rows                                                        # [BM]
        row_ok = offs_m < L
        q = load_tile(q_base, start_m, rows, offs_d, L, HEAD_D, stride_qm, stride_qd,
                      True, BD != HEAD_D)                                              # [BM, BD]
        do = load_tile(do_base, start_m, rows, offs_dv, L, HEAD_DV, stride_dom, stride_dod,
                       True, BDV != HEAD_DV)                                           # [BM, BDV]
        delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)             # [BM]
        r0 = tl.load(R0 + row_base + offs_m, mask=row_ok, other=0.0)
        r1 = tl.load(R1 + row_base + offs_m, mask=row_ok, other=0.0)
        i = offs_m[:, None]                                                            # [BM, 1]
        p_mask_rows = (Mask + off_b.to(tl.int64) * stride_mask_b + off_h.to(tl.int64) * stride_mask_h
                       + offs_m.to(tl.int64)[:, None] * stride_mask_m)                # [BM, 1]
        dk, dv = _dkdv_tile(dk, dv, k, v, q, do, i, j, p_mask_rows, delta, r0, r1, L, S, causal_off,
                            stride_mask_n, qk_scale, cap_mult, bias_mult, mask_min, seed, row_base,
                            dropout_p, drop_scale, MASKED, IS_CAUSAL, MASK_KIND, SOFTCAP, DOT_PREC,
                            DROPOUT, SKIP_DEAD, WEIGHTS, DSCORES)
    return dk, dv


@triton.jit(do_not_specialize=["seed"])
def attn_bwd_dkdv(Q, K, V, DO, Mask, Delta, R0, R1, DK, DV,
                  stride_qb, stride_qh, stride_qm, stride_qd,
                  stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd,
                  stride_dob, stride_doh, stride_dom, stride_dod,
                  stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                  stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                  stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
                  Hq, Hkv, GROUP, L, S, causal_off,
                  qk_scale, cap_mult, bias_mult, mask_min, scale, seed, dropout_p, drop_scale,
                  L_BUCKET, S_BUCKET,
                  HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr,
                  IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr,
                  DOT_PREC: tl.constexpr, DROPOUT: tl.constexpr, SKIP_DEAD: tl.constexpr,
                  WEIGHTS: tl.constexpr, DSCORES: tl.constexpr):
    """dK, dV of BN keys of one kv head; grid (cdiv(S, BN), B * Hkv). L_BUCKET, S_BUCKET: autotune keys."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // Hkv
    off_hk = pid_bh % Hkv
    start_n = pid_n * BN
    keys = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    j = (start_n + keys)[None, :]                                                      # [1, BN]
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
    k = load_tile(k_base, start_n, keys, offs_d, S, HEAD_D, stride_kn, stride_kd,
                  True, BD != HEAD_D)                                                  # [BN, BD]
    v = load_tile(v_base, start_n, keys, offs_dv, S, HEAD_DV, stride_vn, stride_vd,
                  True, BDV != HEAD_DV)                                                # [BN, BDV]
    dk = tl.zeros([BN, BD], dtype=tl.float32)
    dv = tl.zeros([BN, BDV], dtype=tl.float32)
    lo, full_start = query_bounds(start_n, L, S, causal_off, BM, BN, IS_CAUSAL, MASK_KIND != 0)
    dk, dv = _dkdv_loop(dk, dv, k, v, Q, DO, Mask, Delta, R0, R1, j, off_b, off_hk, lo, full_start,
                        Hq, GROUP, L, S, causal_off,
                        stride_qb, stride_qh, stride_qm, stride_qd,
                        stride_dob, stride_doh, stride_dom, stride_dod,
                        stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
                        qk_scale, cap_mult, bias_mult, mask_min, seed, dropout_p, drop_scale,
                        HEAD_D, HEAD_DV, BD, BDV, BM, True, IS_CAUSAL, MASK_KIND, SOFTCAP,
                        DOT_PREC, DROPOUT, SKIP_DEAD, WEIGHTS, DSCORES)
    dk, dv = _dkdv_loop(dk, dv, k, v, Q, DO, Mask, Delta, R0, R1, j, off_b, off_hk, full_start, L,
                        Hq, GROUP, L, S, causal_off,
                        stride_qb, stride_qh, stride_qm, stride_qd,
                        stride_dob, stride_doh, stride_dom, stride_dod,
                        stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
                        qk_scale, cap_mult, bias_mult, mask_min, seed, dropout_p, drop_scale,
                        HEAD_D, HEAD_DV, BD, BDV, BM, False, IS_CAUSAL, MASK_KIND, SOFTCAP,
                        DOT_PREC, DROPOUT, SKIP_DEAD, WEIGHTS, DSCORES)
    key_ok = (start_n + keys) < S
    dk_ptrs = (DK + off_b.to(tl.int64) * stride_dkb + off_hk.to(tl.int64) * stride_dkh
               + (start_n + keys)[:, None] * stride_dkn + offs_d[None, :] * stride_dkd)
    dv_ptrs = (DV + off_b.to(tl.int64) * stride_dvb + off_hk.to(tl.int64) * stride_dvh
               + (start_n + keys)[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd)
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty),
             mask=key_ok[:, None] & (offs_d < HEAD_D)[None, :])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=key_ok[:, None] & (offs_dv < HEAD_DV)[None, :])


# ---------------------------------------------------------------------------------------------------
# dQ


@triton.jit
def _dq_loop(dq, q, do, delta, r0, r1, i, p_mask_rows, k_base, v_base, start, end, L, S, causal_off,
             stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n,
             qk_scale, cap_mult, bias_mult, mask_min, seed, drop_base, dropout_p, drop_scale,
             HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
             BN: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
             MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
             DROPOUT: tl.constexpr, SKIP_DEAD: tl.constexpr, WEIGHTS: tl.constexpr,
             DSCORES: tl.constexpr):
    """Accumulate the key tiles [start, end) into dq [BM, BD] (unscaled)."""
    keys = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    for start_n in range(start, end, BN):
        k = load_tile(k_base, start_n, keys, offs_d, S, HEAD_D, stride_kn, stride_kd,
                      MASKED, BD != HEAD_D)                                            # [BN, BD]
        j = (start_n + keys)[None, :]                                                  # [1, BN]
        s, dcap, p = _tile_weights(q, k, i, j, p_mask_rows, r0, r1, L, S, causal_off, stride_mask_n,
                                   qk_scale, cap_mult, bias_mult, mask_min,
                                   MASKED, IS_CAUSAL, MASK_KIND, SOFTCAP, DOT_PREC, WEIGHTS)
        live = True
        if SKIP_DEAD:
            live = tl.max(p) > 0
        if live:
            v = load_tile(v_base, start_n, keys, offs_dv, S, HEAD_DV, stride_vn, stride_vd,
                          MASKED, BDV != HEAD_DV)                                      # [BN, BDV]
            p_d, ds = _tile_dscores(p, s, dcap, do, v, delta, r0, r1, i, j, S, seed, drop_base,
                                    dropout_p, drop_scale, SOFTCAP, DOT_PREC, DROPOUT, DSCORES)
            dq = mma(ds.to(k.dtype), k, dq, DOT_PREC)              # [BM, BD]
    return dq


@triton.jit(do_not_specialize=["seed"])
def attn_bwd_dq(Q, K, V, DO, Mask, Delta, R0, R1, DQ,
                stride_qb, stride_qh, stride_qm, stride_qd,
                stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd,
                stride_dob, stride_doh, stride_dom, stride_dod,
                stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
                Hq, GROUP, L, S, causal_off,
                qk_scale, cap_mult, bias_mult, mask_min, scale, seed, dropout_p, drop_scale,
                L_BUCKET, S_BUCKET,
                HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr,
                IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr,
                DOT_PREC: tl.constexpr, DROPOUT: tl.constexpr, SKIP_DEAD: tl.constexpr,
                WEIGHTS: tl.constexpr, DSCORES: tl.constexpr):
    """dQ of BM query rows of one query head; grid (cdiv(L, BM), B * Hq). L_BUCKET, S_BUCKET: autotune
    keys."""
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m        # heaviest blocks first
    pid_bh = tl.program_id(1)
    off_b = pid_bh // Hq
    off_h = pid_bh % Hq
    off_hk = off_h // GROUP
    start_m = pid_m * BM
    rows = tl.arange(0, BM)
    offs_m = start_m + rows                                                            # [BM]
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    i = offs_m[:, None]                                                                # [BM, 1]
    row_ok = offs_m < L
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    do_base = DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
    p_mask_rows = (Mask + off_b.to(tl.int64) * stride_mask_b + off_h.to(tl.int64) * stride_mask_h
                   + offs_m.to(tl.int64)[:, None] * stride_mask_m)                    # [BM, 1]
    q = load_tile(q_base, start_m, rows, offs_d, L, HEAD_D, stride_qm, stride_qd, True, BD != HEAD_D)
    do = load_tile(do_base, start_m, rows, offs_dv, L, HEAD_DV, stride_dom, stride_dod,
                   True, BDV != HEAD_DV)                                               # [BM, BDV]
    row_base = pid_bh.to(tl.int64) * L
    delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)                 # [BM]
    r0 = tl.load(R0 + row_base + offs_m, mask=row_ok, other=0.0)
    r1 = tl.load(R1 + row_base + offs_m, mask=row_ok, other=0.0)

    full_end, hi = key_bounds(start_m, L, S, causal_off, BM, BN, IS_CAUSAL, MASK_KIND != 0)
    dq = tl.zeros([BM, BD], dtype=tl.float32)
    dq = _dq_loop(dq, q, do, delta, r0, r1, i, p_mask_rows, k_base, v_base, 0, full_end, L, S,
                  causal_off, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n,
                  qk_scale, cap_mult, bias_mult, mask_min, seed, row_base, dropout_p, drop_scale,
                  HEAD_D, HEAD_DV, BD, BDV, BN, False, IS_CAUSAL, MASK_KIND, SOFTCAP, DOT_PREC,
                  DROPOUT, SKIP_DEAD, WEIGHTS, DSCORES)
    dq = _dq_loop(dq, q, do, delta, r0, r1, i, p_mask_rows, k_base, v_base, full_end, hi, L, S,
                  causal_off, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n,
                  qk_scale, cap_mult, bias_mult, mask_min, seed, row_base, dropout_p, drop_scale,
                  HEAD_D, HEAD_DV, BD, BDV, BN, True, IS_CAUSAL, MASK_KIND, SOFTCAP, DOT_PREC,
                  DROPOUT, SKIP_DEAD, WEIGHTS, DSCORES)
    dq_ptrs = (DQ + off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh
               + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd)
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d < HEAD_D)[None, :])
