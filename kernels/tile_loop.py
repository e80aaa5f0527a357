"""The forward tile loop: one kernel, every normalizer.

A program owns BM query rows of one (batch, query head) and streams the key/value tiles of its kv head
(h // GROUP: GQA without repeated K/V). The normalizer is a set of ``@triton.jit`` hooks passed as
``tl.constexpr`` arguments (see ``common.Hooks``); this file never names a normalizer::

    par = PREPASS(...)                       # per-row threshold in kernel units (entmax15, topk) or 0
    state = (acc [BM, BDV], m [BM], l [BM], acc_g [BM, BDV], l_g [BM])
    state = tile_loop(state, keys [0, full_end),  MASKED=False)   # whole tiles every row attends
    state = tile_loop(state, keys [full_end, hi), MASKED=True)    # diagonal / ragged / user-mask tiles
    out, stats = FINALIZE(m, l, par)          # keys >= hi are never touched (causal tile skipping)

Per tile (``_accumulate``)::

    s = score_tile(...)                       # [BM, BN] kernel units, -inf where not allowed
    p, alpha, m, l = UPDATE(s, m, l, par)     # [BM, BN] weights, [BM] rescale, new state
    acc = alpha * acc + p @ v                 # alpha only if RESCALE
    acc_g += g @ v, l_g += rowsum(g)          # only if AUX (g = AUX_WEIGHTS(s, par), e.g. entmax15's O2)

Dropout (DROPOUT): the weights of the P @ V (and G @ V) products are multiplied by the keep mask
(``common.dropout_keep``, Philox at ((b*Hq + h)*L + i)*S + j), and out (and O2) by 1/(1 - dropout_p);
the running state and the row statistics (l, l_g, m) are computed without dropout.

With SKIP_DEAD the P @ V step is skipped for tiles where TILE_LIVE(s, par) is False (no row of the
block keeps a key of the tile: entmax15 z <= tau, topk s < tau_k).

Outputs: Out (B, Hq, L, Dv) in v's dtype; Stat0/Stat1 (B, Hq, L) fp32 public stats; Par (B, Hq, L)
fp32 the pre-pass threshold in kernel units (saved for the backward); AuxL (B, Hq, L) and AuxO
(B, Hq, L, Dv) fp32 from AUX_FINALIZE (entmax15: sum_g and O2). All contiguous.
"""

import triton
import triton.language as tl

from .common import dropout_keep, key_bounds, load_tile, mma, score_tile


@triton.jit
def _accumulate(acc, m_i, l_i, acc_g, l_g, s, par, i, v_base, start_n, offs_n, offs_dv, S, DV,
                stride_vn, stride_vd, seed, drop_base, dropout_p, MASKED: tl.constexpr,
                PAD_DV: tl.constexpr, DOT_PREC: tl.constexpr, UPDATE: tl.constexpr,
                RESCALE: tl.constexpr, AUX: tl.constexpr, AUX_WEIGHTS: tl.constexpr,
                DROPOUT: tl.constexpr):
    """Fold one score tile s [BM, BN] and its value tile into the running state."""
    p, alpha, m_i, l_i = UPDATE(s, m_i, l_i, par, MASKED)                                # [BM, BN]
    if DROPOUT:
        keep = dropout_keep(seed, drop_base, i, (start_n + offs_n)[None, :], S, dropout_p)  # [BM, BN]
        p = tl.where(keep, p, 0.0)
    v = load_tile(v_base, start_n, offs_n, offs_dv, S, DV, stride_vn, stride_vd, MASKED, PAD_DV)  # [BN, BDV]
    if RESCALE:
        acc = acc * alpha[:, None]
    acc = mma(p.to(v.dtype), v, acc, DOT_PREC)                      # [BM, BDV]
    if AUX:
        g = AUX_WEIGHTS(s, par)                                                          # [BM, BN]
        l_g += tl.sum(g, 1)
        if DROPOUT:
            g = tl.where(keep, g, 0.0)
        acc_g = mma(g.to(v.dtype), v, acc_g, DOT_PREC)
    return acc, m_i, l_i, acc_g, l_g


@triton.jit
def tile_loop(acc, m_i, l_i, acc_g, l_g, q, par, i, p_mask_rows, k_base, v_base,
              offs_n, offs_d, offs_dv, start, end, L, S, D, DV, causal_off,
              stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n,
              qk_scale, cap_mult, bias_mult, mask_min, seed, drop_base, dropout_p,
              BN: tl.constexpr, MASKED: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
              IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr,
              DOT_PREC: tl.constexpr, UPDATE: tl.constexpr, RESCALE: tl.constexpr,
              SKIP_DEAD: tl.constexpr, TILE_LIVE: tl.constexpr, AUX: tl.constexpr,
              AUX_WEIGHTS: tl.constexpr, DROPOUT: tl.constexpr):
    """The one loop over key tiles [start, end) (a multiple of BN apart, except a ragged end).
    Called for the unmasked tiles (MASKED=False) and again for the masked ones (MASKED=True)."""
    for start_n in range(start, end, BN):
        s = score_tile(q, k_base, start_n, offs_n, offs_d, i, p_mask_rows, L, S, D, causal_off,
                       stride_kn, stride_kd, stride_mask_n, qk_scale, cap_mult, bias_mult, mask_min,
                       MASKED, PAD_D, IS_CAUSAL, MASK_KIND, SOFTCAP, DOT_PREC)          # [BM, BN]
        if SKIP_DEAD:
            if TILE_LIVE(s, par):
                acc, m_i, l_i, acc_g, l_g = _accumulate(
                    acc, m_i, l_i, acc_g, l_g, s, par, i, v_base, start_n, offs_n, offs_dv, S, DV,
                    stride_vn, stride_vd, seed, drop_base, dropout_p, MASKED, PAD_DV, DOT_PREC, UPDATE,
                    RESCALE, AUX, AUX_WEIGHTS, DROPOUT)
        else:
            acc, m_i, l_i, acc_g, l_g = _accumulate(
                acc, m_i, l_i, acc_g, l_g, s, par, i, v_base, start_n, offs_n, offs_dv, S, DV,
                stride_vn, stride_vd, seed, drop_base, dropout_p, MASKED, PAD_DV, DOT_PREC, UPDATE,
                RESCALE, AUX, AUX_WEIGHTS, DROPOUT)
    return acc, m_i, l_i, acc_g, l_g


@triton.jit(do_not_specialize=["seed"])
def attn_fwd(Q, K, V, Out, Mask, Stat0, Stat1, Par, AuxL, AuxO, Scratch,
             stride_qb, stride_qh, stride_qm, stride_qd,
             stride_kb, stride_kh, stride_kn, stride_kd,
             stride_vb, stride_vh, stride_vn, stride_vd,
             stride_ob, stride_oh, stride_om, stride_od,
             stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
             Hq, GROUP, L, S, causal_off,
             qk_scale, cap_mult, bias_mult, mask_min, norm_arg, seed, dropout_p, drop_scale,
             L_BUCKET, S_BUCKET, L_PAD,
             HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr,
             IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr,
             DOT_PREC: tl.constexpr, NORM: tl.constexpr,
             UPDATE: tl.constexpr, FINALIZE: tl.constexpr, RESCALE: tl.constexpr,
             NUM_STATS: tl.constexpr, HAS_PREPASS: tl.constexpr, PREPASS: tl.constexpr,
             NORM_CONST: tl.constexpr, SKIP_DEAD: tl.constexpr, TILE_LIVE: tl.constexpr,
             AUX: tl.constexpr, AUX_WEIGHTS: tl.constexpr, AUX_FINALIZE: tl.constexpr,
             DROPOUT: tl.constexpr, SCRATCH_COLS: tl.constexpr):
    """Grid (cdiv(L, BM), B * Hq). NORM names the normalizer (autotune key only). L_BUCKET and
    S_BUCKET are autotune keys only. seed, dropout_p, drop_scale = 1/(1 - dropout_p): DROPOUT only.
    Scratch: (B * Hq * L_PAD, SCRATCH_COLS) fp32 rows the pre-pass may use (L_PAD >= every row index a
    program touches), or a dummy when SCRATCH_COLS == 0."""
    PAD_D: tl.constexpr = BD != HEAD_D
    PAD_DV: tl.constexpr = BDV != HEAD_DV
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m        # heaviest blocks first
    pid_bh = tl.program_id(1)
    off_b = pid_bh // Hq
    off_h = pid_bh % Hq
    off_hk = off_h // GROUP                            # GQA: query head h reads kv head h // GROUP
    start_m = pid_m * BM
    offs_m = start_m + tl.arange(0, BM)                # [BM]
    rows = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    i = offs_m[:, None]                                # [BM, 1]

    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
    p_mask_rows = (Mask + off_b.to(tl.int64) * stride_mask_b + off_h.to(tl.int64) * stride_mask_h
                   + offs_m.to(tl.int64)[:, None] * stride_mask_m)                    # [BM, 1]
    q = load_tile(q_base, start_m, rows, offs_d, L, HEAD_D, stride_qm, stride_qd, True, PAD_D)  # [BM, BD]

    full_end, hi = key_bounds(start_m, L, S, causal_off, BM, BN, IS_CAUSAL, MASK_KIND != 0)
    row_base = pid_bh.to(tl.int64) * L                 # (B, Hq, L) contiguous row statistics

    if HAS_PREPASS:
        scr_rows = Scratch + (pid_bh.to(tl.int64) * L_PAD + offs_m)[:, None] * SCRATCH_COLS   # [BM, 1]
        par = PREPASS(q, k_base, offs_m, offs_n, offs_d, i, p_mask_rows, L, S, HEAD_D, causal_off,
                      full_end, hi, stride_kn, stride_kd, stride_mask_n, qk_scale, cap_mult,
                      bias_mult, mask_min, norm_arg, scr_rows, BM, BN, PAD_D, IS_CAUSAL, MASK_KIND,
                      SOFTCAP, DOT_PREC, NORM_CONST, SCRATCH_COLS)                        # [BM]
    else:
        par = tl.zeros([BM], dtype=tl.float32)

    acc = tl.zeros([BM, BDV], dtype=tl.float32)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    if AUX:
        acc_g = tl.zeros([BM, BDV], dtype=tl.float32)
        l_g = tl.zeros([BM], dtype=tl.float32)
    else:
        acc_g = tl.zeros([1, 1], dtype=tl.float32)
        l_g = tl.zeros([1], dtype=tl.float32)

    acc, m_i, l_i, acc_g, l_g = tile_loop(
        acc, m_i, l_i, acc_g, l_g, q, par, i, p_mask_rows, k_base, v_base, offs_n, offs_d, offs_dv,
        0, full_end, L, S, HEAD_D, HEAD_DV, causal_off, stride_kn, stride_kd, stride_vn, stride_vd,
        stride_mask_n, qk_scale, cap_mult, bias_mult, mask_min, seed, row_base, dropout_p,
        BN, False, PAD_D, PAD_DV, IS_CAUSAL, MASK_KIND, SOFTCAP, DOT_PREC,
        UPDATE, RESCALE, SKIP_DEAD, TILE_LIVE, AUX, AUX_WEIGHTS, DROPOUT)
    acc, m_i, l_i, acc_g, l_g = tile_loop(
        acc, m_i, l_i, acc_g, l_g, q, par, i, p_mask_rows, k_base, v_base, offs_n, offs_d, offs_dv,
        full_end, hi, L, S, HEAD_D, HEAD_DV, causal_off, stride_kn, stride_kd, stride_vn, stride_vd,
        stride_mask_n, qk_scale, cap_mult, bias_mult, mask_min, seed, row_base, dropout_p,
        BN, True, PAD_D, PAD_DV, IS_CAUSAL, MASK_KIND, SOFTCAP, DOT_PREC,
        UPDATE, RESCALE, SKIP_DEAD, TILE_LIVE, AUX, AUX_WEIGHTS, DROPOUT)

    inv_l, stat0, stat1 = FINALIZE(m_i, l_i, par)                                      # [BM]
    row_ok = offs_m < L
    o_ptrs = (Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
              + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od)
    if DROPOUT:
        out = acc * (inv_l * drop_scale)[:, None]
    else:
        out = acc * inv_l[:, None]
    if PAD_DV:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv < HEAD_DV)[None, :])
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(Stat0 + row_base + offs_m, stat0, mask=row_ok)
    if NUM_STATS > 1:
        tl.store(Stat1 + row_base + offs_m, stat1, mask=row_ok)
    if HAS_PREPASS:
        tl.store(Par + row_base + offs_m, par, mask=row_ok)
    if AUX:
        inv_g, aux_l = AUX_FINALIZE(l_i, l_g)
        if DROPOUT:
            inv_g = inv_g * drop_scale
        tl.store(AuxL + row_base + offs_m, aux_l, mask=row_ok)
        a_ptrs = AuxO + (row_base + offs_m)[:, None] * HEAD_DV + offs_dv[None, :]
        tl.store(a_ptrs, acc_g * inv_g[:, None], mask=row_ok[:, None] & (offs_dv < HEAD_DV)[None, :])
