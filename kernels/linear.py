"""The chunked linear form of polynomial (order-2 Taylor) attention in Triton: forward and backward.

Same function as the quadratic tile loop with ``f(s) = c0 + c1 s + c2 s^2`` (``Normalizer.linear_coeffs``;
taylor: (1, 1, 1/2)); only the order of the sums differs (``flashmaps.linear`` has the math and the torch
form). One program per (batch, query head, Dv block, feature block) streams chunks of C query rows and keeps
its part of the running state in fp32 registers.

Glossary (names of this file):

    C, BD, BV      chunk rows (>= 16: tl.dot), the head dim padded to a power of two >= 16, the Dv block
    TA, NF         rows a of x x^T per feature block, NF = BD // TA blocks (feature blocks, below)
    q' = scale q   [C, BD] fp32;  x2 = vec(x x^T) [C, BD*BD] (``outer``): the FULL square, not the D(D+1)/2
                   pairs of the torch form: a gather of the pairs has no Triton primitive, while the full
                   square is one reshape and plain tl.dot tiles (BD = 16: 256 features for 136, 1.9x the
                   multiply-adds of the order-2 part, all on tensor cores)
    state          h0 [BV] = sum v_j,  h1 [BD, BV] = sum k_j v_j^T,  h2 [BD*BD, BV] = sum k2_j v_j^T
                   z0 = sum 1,  z1 [BD] = sum k_j,  z2 [BD*BD] = sum k2_j      (keys j that entered; the
                   normalizer Z is its own vector state rather than a column of ones padded onto v)
    readout        y_i = c0 h0 + c1 q'_i h1 + c2 q2_i h2,  Z_i = c0 z0 + c1 q'_i . z1 + c2 q2_i . z2
    diagonal       the keys [a, b) that the chunk's rows see in part (causal): A = f(q' k^T) masked [C, C],
                   y += A v, Z += rowsum(A); they enter the state after the chunk
    m_j            1 for a key that may be attended (bool key-padding mask, in range), else 0
    OFF            causal offset: row i sees j <= i + OFF (0 upper_left, S - L lower_right); A0 = the keys
                   [0, A0) every row sees (clamp(OFF) causal, S otherwise) enter the state first

Backward, with g_i = dO_i / Z_i (this Dv block) and gz_i = -delta_i / Z_i (delta = dO . o over all of Dv;
added by the first Dv block only), both 0 for an empty row: dA_ij = g_i . v_j + gz_i, ds = f'(s) dA.

    dq pass (rows in order, the forward's state):  dq'_i = c1 (h1 g_i + z1 gz_i) + 2 c2 M_i q'_i,
        M_i = reshape(h2 g_i + z2 gz_i, [BD, BD]) (symmetric: h2 sums symmetric k2), + ds @ k on the diagonal
    dk, dv pass (rows in reverse, the reverse state over the rows that see a key in full):
        r0 = sum g_i, r1 = sum q'_i g_i^T, r2 = sum q2_i g_i^T, rz1 = sum gz_i q'_i, rz2 = sum gz_i q2_i
        dv_j = m_j (c0 r0 + c1 k_j r1 + c2 k2_j r2)
        dk_j = m_j (c1 (r1 v_j + rz1) + 2 c2 reshape(r2 v_j + rz2, [BD, BD]) k_j),  + the diagonal's
        ds^T q' and A^T g
No per-chunk state is stored (O(1) extra memory in L besides the gradient buffers). dq and dk are summed
over the Dv blocks, dk and dv over the query heads of a GQA group, by the launcher (partial buffers in fp32).

Segments (program_id(2)): the rows split into NS segments of SEG_ROWS (a multiple of C) run in parallel.
``linear_piece_state`` sums each segment's piece of the keys (``piece_keys``) and ``linear_row_piece`` each
segment's piece of the reverse state; the launcher's prefix sums (torch) give each segment the state
before it (hpre, zpre) and the reverse state of the rows after it (rpre, rzpre); not causal: the totals,
and the dk, dv pass takes the segment's piece of the keys. NS = 1: one kernel, the states built inside.

Feature blocks (program_id(1) = Dv block * NF + feature block f; the launcher's ``_triton_blocks``). TA = BD
(NF = 1, D <= 32): the whole order-2 state in one program, 256 x 32 fp32 registers at D <= 16 (the Based /
flash-linear-attention case), 1024 x 16 at D <= 32. D > 32: the order-2 features split over NF programs, each
keeping the rows a in [f TA, (f + 1) TA) of x x^T (TA BD features: 128 by default, so the state is 128 x 64
fp32 at D = 64, NF = 32); x2 is then [C, TA*BD] (``outer``: x's block columns picked by ``rows_a``, a select
over a [C, NF, TA] view) and M q' / the dk contraction land on the block's columns (``spread_a``). Every block
computes orders 0 and 1 and the diagonal blocks too but adds them only in block 0 (``first_only``): redundant
work NF (1 + BD) Dv + the diagonal per row, about 50% on top of the order-2 BD^2 Dv at D = 64 (the cost model
counts it). The blocks' partial sums meet in fp32 buffers reduced by the launcher (torch sums): the forward
writes per block the undivided numerator y and z (NF x (L Dv + L) fp32 per (batch, head): 32x the fp32 output
at D = 64, written once and read once), the backward dq, dk per (Dv block, feature block) and dv per feature
block (NV NF x (L + S) D + NF S Dv fp32); the segment states keep their full size (O(NS (1 + BD + BD^2) Dv),
each block storing its rows). So the split path trades O(NF L Dv) extra memory and traffic (O(L), as the
gradients) for registers that fit; the state itself is never spilled to or streamed from global memory.
Limits: D <= 128 (the launcher's TRITON_MAX_D; TA = 1 at BD = 256 would be possible but is not tested).
"""

import triton
import triton.language as tl


@triton.jit
def dot(a, b, PREC: tl.constexpr):
    """a @ b in fp32 (both operands fp32) at input precision PREC."""
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def feature_block(NF: tl.constexpr):
    """(pid_v, pid_f): program_id(1) = pid_v NF + pid_f, the Dv block and the feature block."""
    pid = tl.program_id(1)
    return pid // NF, pid % NF


@triton.jit
def block_of(pid_f, BD: tl.constexpr, TA: tl.constexpr):
    """[1, NF, 1]: True at feature block pid_f, for a [C, NF, TA] view of [C, BD] columns."""
    return (tl.arange(0, BD // TA) == pid_f)[None, :, None]


@triton.jit
def rows_a(x, pid_f, C: tl.constexpr, BD: tl.constexpr, TA: tl.constexpr):
    """x[:, a] for the TA rows a of feature block pid_f: [C, TA] (x itself when TA == BD)."""
    if TA < BD:
        x = tl.sum(tl.where(block_of(pid_f, BD, TA), tl.reshape(x, (C, BD // TA, TA)), 0.0), 1)
    return x


@triton.jit
def spread_a(y, pid_f, C: tl.constexpr, BD: tl.constexpr, TA: tl.constexpr):
    """The inverse of rows_a: y [C, TA] at the columns a of feature block pid_f of a [C, BD] (0 elsewhere)."""
    if TA < BD:
        y = tl.reshape(tl.where(block_of(pid_f, BD, TA), y[:, None, :], 0.0), (C, BD))
    return y


@triton.jit
def first_only(x, pid_f, SPLIT: tl.constexpr):
    """x in feature block 0 (orders 0 and 1, the diagonal blocks), 0 in the others."""
    if SPLIT:
        return x * (pid_f == 0).to(tl.float32)
    else:
        return x


@triton.jit
def outer(x, pid_f, C: tl.constexpr, BD: tl.constexpr, TA: tl.constexpr):
    """x2 [C, TA*BD] with x2[r, t*BD + b] = x[r, a_t] x[r, b] (x [C, BD]; a_t the rows of block pid_f)."""
    return tl.reshape(rows_a(x, pid_f, C, BD, TA)[:, :, None] * x[:, None, :], (C, TA * BD))


@triton.jit
def contract_sq(t2, x, pid_f, C: tl.constexpr, BD: tl.constexpr, TA: tl.constexpr):
    """sum_b reshape(t2, [C, TA, BD])[r, t, b] x[r, b] at the columns a_t of a [C, BD] (t2 [C, TA*BD])."""
    return spread_a(tl.sum(tl.reshape(t2, (C, TA, BD)) * x[:, None, :], 2), pid_f, C, BD, TA)


@triton.jit
def poly(s, c0, c1, c2):
    return c0 + s * (c1 + c2 * s)


@triton.jit
def load_rows(p, stride_r, r0, n_end, cols, n_cols, C: tl.constexpr):
    """x [C, len(cols)] fp32: rows [r0, r0 + C) below n_end, columns below n_cols (0 elsewhere)."""
    r = r0 + tl.arange(0, C)
    ok = (r < n_end)[:, None] & (cols < n_cols)[None, :]
    return tl.load(p + r.to(tl.int64)[:, None] * stride_r + cols[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def key_weight(p_m, stride_ms, j0, j_end, C: tl.constexpr, HAS_MASK: tl.constexpr):
    """m [C] fp32: 1 for the keys [j0, j0 + C) below j_end that the key-padding mask allows, else 0."""
    j = j0 + tl.arange(0, C)
    ok = j < j_end
    if HAS_MASK:
        ok = ok & (tl.load(p_m + j.to(tl.int64) * stride_ms, mask=ok, other=0) != 0)
    return ok.to(tl.float32)


@triton.jit
def add_outer_state(s0, s1, s2, x, w, pid_f, C: tl.constexpr, BD: tl.constexpr, TA: tl.constexpr,
                    PREC: tl.constexpr):
    """(s0, s1, s2) += (sum_r w_r, x^T w, x2^T w) for rows x [C, BD] weighted by w [C, BV] (x2: block pid_f)."""
    x2 = outer(x, pid_f, C, BD, TA)
    return (s0 + tl.sum(w, 0), s1 + dot(tl.trans(x), w, PREC), s2 + dot(tl.trans(x2), w, PREC))


@triton.jit
def add_outer_vec(t1, t2, x, u, pid_f, C: tl.constexpr, BD: tl.constexpr, TA: tl.constexpr):
    """(t1, t2) += (sum_r u_r x_r, sum_r u_r x2_r) for rows x [C, BD] weighted by u [C] (x2: block pid_f)."""
    x2 = outer(x, pid_f, C, BD, TA)
    return t1 + tl.sum(x * u[:, None], 0), t2 + tl.sum(x2 * u[:, None], 0)


@triton.jit
def diag_block(qs, kb, i0, j0, j_end, m, OFF, c0, c1, c2, C: tl.constexpr, PREC: tl.constexpr):
    """Scores s [C, C] of rows [i0, i0 + C) against keys [j0, j0 + C), where they are allowed (causal,
    below j_end, key mask m) and f(s) there (0 elsewhere)."""
    s = dot(qs, tl.trans(kb), PREC)                                     # [C, C]
    i = i0 + tl.arange(0, C)
    j = j0 + tl.arange(0, C)
    ok = (j[None, :] <= i[:, None] + OFF) & (m[None, :] > 0)
    return s, ok, tl.where(ok, poly(s, c0, c1, c2), 0.0)


@triton.jit
def diag_range(i0, L, S, OFF, C: tl.constexpr):
    """The diagonal keys [a, b) of the chunk [i0, min(L, i0 + C)) (causal)."""
    a = tl.minimum(tl.maximum(i0 + OFF, 0), S)
    b = tl.minimum(tl.maximum(tl.minimum(i0 + C, L) + OFF, 0), S)
    return a, b


@triton.jit
def program_base(q, k, v, km, sqb, sqh, skb, skh, svb, svh, smb, smh, Hq, G, BV: tl.constexpr, NF: tl.constexpr):
    """(pid_bh, pid_v) of the program and its base pointers: q and the key mask at (batch, query head),
    k and v at (batch, kv head) (v at the program's Dv block); last, the feature block pid_f."""
    pid_bh = tl.program_id(0)
    pid_v, pid_f = feature_block(NF)
    b_ = (pid_bh // Hq).to(tl.int64)
    h_ = (pid_bh % Hq).to(tl.int64)
    hk = h_ // G
    return (pid_bh, pid_v, q + b_ * sqb + h_ * sqh, k + b_ * skb + hk * skh, v + b_ * svb + hk * svh + pid_v * BV,
            km + b_ * smb + h_ * smh, pid_f)


@triton.jit
def load_keys(p_k, p_v, p_m, sks, svs, sms, j0, j_end, cd, cv, nv, D: tl.constexpr, C: tl.constexpr,
              HAS_MASK: tl.constexpr):
    """Keys [j0, j0 + C) below j_end: k [C, BD], their weights m [C] and the masked values m v [C, BV]."""
    kb = load_rows(p_k, sks, j0, j_end, cd, D, C)
    m = key_weight(p_m, sms, j0, j_end, C, HAS_MASK)
    return kb, m, load_rows(p_v, svs, j0, j_end, cv, nv, C) * m[:, None]


@triton.jit
def add_keys(h0, h1, h2, z0, z1, z2, kb, m, vm, pid_f, C: tl.constexpr, BD: tl.constexpr, TA: tl.constexpr,
             PREC: tl.constexpr):
    """The state (glossary; order 2: feature block pid_f) plus the keys kb with weights m and masked values vm."""
    h0, h1, h2 = add_outer_state(h0, h1, h2, kb, vm, pid_f, C, BD, TA, PREC)
    z1, z2 = add_outer_vec(z1, z2, kb, m, pid_f, C, BD, TA)
    return h0, h1, h2, z0 + tl.sum(m, 0), z1, z2


@triton.jit
def prefix_state(p_k, p_v, p_m, sks, svs, sms, j_start, j_end, cd, cv, nv, pid_f, D: tl.constexpr,
                 BD: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
                 TA: tl.constexpr):
    """The state of the keys [j_start, j_end) (from nothing): [0, A0) is the prefix that every row sees."""
    h0 = tl.zeros([BV], tl.float32)
    h1 = tl.zeros([BD, BV], tl.float32)
    h2 = tl.zeros([TA * BD, BV], tl.float32)
    z0 = tl.zeros([1], tl.float32)
    z1 = tl.zeros([BD], tl.float32)
    z2 = tl.zeros([TA * BD], tl.float32)
    for j0 in range(j_start, j_end, C):
        kb, m, vm = load_keys(p_k, p_v, p_m, sks, svs, sms, j0, j_end, cd, cv, nv, D, C, HAS_MASK)
        h0, h1, h2, z0, z1, z2 = add_keys(h0, h1, h2, z0, z1, z2, kb, m, vm, pid_f, C, BD, TA, PREC)
    return h0, h1, h2, z0, z1, z2


@triton.jit
def piece_keys(seg, S, OFF, SEG_ROWS, NS, CAUSAL: tl.constexpr):
    """The keys [j0, j1) of segment seg's piece of the state: causal, the keys that enter between the
    starts of segments seg - 1 and seg (piece 0: the prefix [0, A0) and nothing before), so that the
    inclusive sum of pieces 0..s is the state before segment s; not causal, the S keys split in NS parts."""
    if CAUSAL:
        j1 = tl.minimum(tl.maximum(seg * SEG_ROWS + OFF, 0), S)
        j0 = tl.where(seg == 0, 0, tl.minimum(tl.maximum((seg - 1) * SEG_ROWS + OFF, 0), S))
    else:
        per = tl.cdiv(S, NS)
        j0 = tl.minimum(seg * per, S)
        j1 = tl.minimum(j0 + per, S)
    return j0, j1


@triton.jit
def state_at(hbuf, zbuf, pid_bh, pid_v, pid_f, seg, NS, cd, cv, BD: tl.constexpr, BV: tl.constexpr,
             DV: tl.constexpr, TA: tl.constexpr):
    """Pointers and offsets of segment seg's state in hbuf [B*Hq, NS, 1 + BD + BD^2, DV] (h0 at row 0, h1 at
    rows 1.., h2 after; this program's Dv block and feature block) and zbuf [B*Hq, NS, 1 + BD + BD^2]."""
    FB: tl.constexpr = 1 + BD + BD * BD
    c2 = pid_f * (TA * BD) + tl.arange(0, TA * BD)
    row = pid_bh.to(tl.int64) * NS + seg
    p_h = hbuf + row * FB * DV + pid_v * BV
    p_zs = zbuf + row * FB
    return (p_h + cv, p_h + (1 + cd)[:, None] * DV + cv[None, :], p_h + (1 + BD + c2)[:, None] * DV + cv[None, :],
            p_zs + tl.arange(0, 1), p_zs + 1 + cd, p_zs + 1 + BD + c2)


@triton.jit
def store_state(hbuf, zbuf, pid_bh, pid_v, pid_f, seg, NS, cd, cv, nv, h0, h1, h2, z0, z1, z2, BD: tl.constexpr,
                BV: tl.constexpr, DV: tl.constexpr, TA: tl.constexpr):
    """Store a state (the z part from the first Dv block only, orders 0 and 1 from feature block 0 only)."""
    p0, p1, p2, pz0, pz1, pz2 = state_at(hbuf, zbuf, pid_bh, pid_v, pid_f, seg, NS, cd, cv, BD, BV, DV, TA)
    okv = cv < nv
    f0 = pid_f == 0
    tl.store(p0, h0, mask=okv & f0)
    tl.store(p1, h1, mask=okv[None, :] & f0)
    tl.store(p2, h2, mask=okv[None, :])
    if pid_v == 0:
        if pid_f == 0:
            tl.store(pz0, z0)
            tl.store(pz1, z1)
        tl.store(pz2, z2)


@triton.jit
def load_state(hbuf, zbuf, pid_bh, pid_v, pid_f, seg, NS, cd, cv, nv, BD: tl.constexpr, BV: tl.constexpr,
               DV: tl.constexpr, TA: tl.constexpr):
    p0, p1, p2, pz0, pz1, pz2 = state_at(hbuf, zbuf, pid_bh, pid_v, pid_f, seg, NS, cd, cv, BD, BV, DV, TA)
    okv = cv < nv
    return (tl.load(p0, mask=okv, other=0.0), tl.load(p1, mask=okv[None, :], other=0.0),
            tl.load(p2, mask=okv[None, :], other=0.0), tl.load(pz0), tl.load(pz1), tl.load(pz2))


@triton.jit
def linear_piece_state(k, v, km, hbuf, zbuf, skb, skh, sks, svb, svh, svs, smb, smh, sms,
                       Hq, G, S, OFF, SEG_ROWS, NS,
                       D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                       CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr, TA: tl.constexpr):
    """hbuf [B*Hq, NS, 1 + BD + BD^2, DV] and zbuf [B*Hq, NS, 1 + BD + BD^2] fp32: the state of each
    segment's piece of the keys (``piece_keys``), one program per (batch, query head, Dv and feature block,
    segment)."""
    pid_bh, pid_v, _, p_k, p_v, p_m, pid_f = program_base(k, k, v, km, 0, 0, skb, skh, svb, svh, smb, smh, Hq, G,
                                                          BV, BD // TA)
    seg = tl.program_id(2)
    cd = tl.arange(0, BD)
    cv = tl.arange(0, BV)
    nv = DV - pid_v * BV
    j0, j1 = piece_keys(seg, S, OFF, SEG_ROWS, NS, CAUSAL)
    h0, h1, h2, z0, z1, z2 = prefix_state(p_k, p_v, p_m, sks, svs, sms, j0, j1, cd, cv, nv, pid_f, D, BD, BV, C,
                                          HAS_MASK, PREC, TA)
    store_state(hbuf, zbuf, pid_bh, pid_v, pid_f, seg, NS, cd, cv, nv, h0, h1, h2, z0, z1, z2, BD, BV, DV, TA)


@triton.jit
def rows_dy(p_q, p_do, p_r, p_gz, sql, sdl, i0, L, cd, cv, nv, first, scale, D: tl.constexpr, C: tl.constexpr):
    """Rows [i0, i0 + C): q' [C, BD], g = dO / Z [C, BV] and gz = -delta / Z [C] (first Dv block only)."""
    rows = i0 + tl.arange(0, C)
    qs = load_rows(p_q, sql, i0, L, cd, D, C) * scale
    ri = tl.load(p_r + rows, mask=rows < L, other=0.0)
    gz = tl.load(p_gz + rows, mask=rows < L, other=0.0) * first
    return qs, load_rows(p_do, sdl, i0, L, cv, nv, C) * ri[:, None], gz


@triton.jit
def bwd_base(q, k, v, km, do, rinv, gzr, sqb, sqh, skb, skh, svb, svh, smb, smh, sdb, sdh, Hq, G, L,
             BV: tl.constexpr, NF: tl.constexpr):
    """program_base plus the pointers of dO (this Dv block), 1/Z and -delta/Z of the program's rows."""
    pid_bh, pid_v, p_q, p_k, p_v, p_m, pid_f = program_base(q, k, v, km, sqb, sqh, skb, skh, svb, svh, smb, smh, Hq,
                                                            G, BV, NF)
    p_do = do + (pid_bh // Hq).to(tl.int64) * sdb + (pid_bh % Hq).to(tl.int64) * sdh + pid_v * BV
    return (pid_bh, pid_v, p_q, p_k, p_v, p_m, p_do, rinv + pid_bh.to(tl.int64) * L, gzr + pid_bh.to(tl.int64) * L,
            pid_f)


@triton.jit
def linear_row_piece(q, do, rinv, gzr, rbuf, rzbuf, sqb, sqh, sql, sdb, sdh, sdl, Hq, L, SEG_ROWS, NS, scale,
                     D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                     PREC: tl.constexpr, TA: tl.constexpr):
    """rbuf, rzbuf (as hbuf, zbuf): each segment's piece of the reverse state, the sums over its rows of
    q' g^T, q2 g^T (and g) and of gz q', gz q2 (glossary), one program per (batch, head, Dv and feature block,
    segment)."""
    pid_bh, pid_v, p_q, _, _, _, p_do, p_r, p_gz, pid_f = bwd_base(q, q, q, q, do, rinv, gzr, sqb, sqh, 0, 0, 0, 0,
                                                                  0, 0, sdb, sdh, Hq, 1, L, BV, BD // TA)
    seg = tl.program_id(2)
    cd = tl.arange(0, BD)
    cv = tl.arange(0, BV)
    nv = DV - pid_v * BV
    first = (pid_v == 0).to(tl.float32)
    r0 = tl.zeros([BV], tl.float32)
    r1 = tl.zeros([BD, BV], tl.float32)
    r2 = tl.zeros([TA * BD, BV], tl.float32)
    rz1 = tl.zeros([BD], tl.float32)
    rz2 = tl.zeros([TA * BD], tl.float32)
    for i0 in range(seg * SEG_ROWS, tl.minimum(L, (seg + 1) * SEG_ROWS), C):
        qs, g, gz = rows_dy(p_q, p_do, p_r, p_gz, sql, sdl, i0, L, cd, cv, nv, first, scale, D, C)
        r0, r1, r2 = add_outer_state(r0, r1, r2, qs, g, pid_f, C, BD, TA, PREC)
        rz1, rz2 = add_outer_vec(rz1, rz2, qs, gz, pid_f, C, BD, TA)
    store_state(rbuf, rzbuf, pid_bh, pid_v, pid_f, seg, NS, cd, cv, nv, r0, r1, r2, tl.zeros([1], tl.float32), rz1,
                rz2, BD, BV, DV, TA)


@triton.jit
def linear_fwd(q, k, v, km, o, zout, hpre, zpre,
               sqb, sqh, sql, skb, skh, sks, svb, svh, svs, smb, smh, sms, sob, soh, sol,
               Hq, G, L, S, OFF, A0, SEG_ROWS, NS, scale, c0, c1, c2,
               D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr, SEGMENTED: tl.constexpr,
               TA: tl.constexpr, sof, szf):
    """o [B, Hq, L, DV] (v's dtype) and z [B*Hq, L] fp32 (the glossary's readout + diagonal) of the rows
    [seg SEG_ROWS, (seg + 1) SEG_ROWS) of segment seg = program_id(2). SEGMENTED: the state before the
    segment comes from hpre, zpre (the inclusive sums of ``linear_piece_state``'s pieces), else (one segment)
    from the prefix keys [0, A0). Split features (TA < BD): feature block f writes its partial numerator y
    (fp32, not divided) at o + f sof and its partial z at zout + f szf; the launcher sums and divides."""
    SPLIT: tl.constexpr = TA < BD
    pid_bh, pid_v, p_q, p_k, p_v, p_m, pid_f = program_base(q, k, v, km, sqb, sqh, skb, skh, svb, svh, smb, smh, Hq,
                                                            G, BV, BD // TA)
    seg = tl.program_id(2)
    p_o = o + (pid_bh // Hq).to(tl.int64) * sob + (pid_bh % Hq).to(tl.int64) * soh + pid_v * BV
    p_z = zout + pid_bh.to(tl.int64) * L
    if SPLIT:
        p_o += pid_f.to(tl.int64) * sof
        p_z += pid_f.to(tl.int64) * szf
    cd = tl.arange(0, BD)
    cv = tl.arange(0, BV)
    nv = DV - pid_v * BV

    if SEGMENTED:
        h0, h1, h2, z0, z1, z2 = load_state(hpre, zpre, pid_bh, pid_v, pid_f, seg, NS, cd, cv, nv, BD, BV, DV, TA)
    else:
        h0, h1, h2, z0, z1, z2 = prefix_state(p_k, p_v, p_m, sks, svs, sms, 0, A0, cd, cv, nv, pid_f, D, BD, BV, C,
                                              HAS_MASK, PREC, TA)
    for i0 in range(seg * SEG_ROWS, tl.minimum(L, (seg + 1) * SEG_ROWS), C):
        qs = load_rows(p_q, sql, i0, L, cd, D, C) * scale               # q' [C, BD]
        q2 = outer(qs, pid_f, C, BD, TA)                                # [C, TA*BD]
        y = first_only(c0 * h0[None, :] + c1 * dot(qs, h1, PREC), pid_f, SPLIT) + c2 * dot(q2, h2, PREC)  # [C, BV]
        zz = first_only(c0 * z0 + c1 * tl.sum(qs * z1[None, :], 1), pid_f, SPLIT) + c2 * tl.sum(q2 * z2[None, :], 1)
        if CAUSAL:
            a, b = diag_range(i0, L, S, OFF, C)
            kb, m, vm = load_keys(p_k, p_v, p_m, sks, svs, sms, a, b, cd, cv, nv, D, C, HAS_MASK)
            _, _, fa = diag_block(qs, kb, i0, a, b, m, OFF, c0, c1, c2, C, PREC)
            fa = first_only(fa, pid_f, SPLIT)
            y += dot(fa, vm, PREC)
            zz += tl.sum(fa, 1)
            h0, h1, h2, z0, z1, z2 = add_keys(h0, h1, h2, z0, z1, z2, kb, m, vm, pid_f, C, BD, TA, PREC)
        rows = i0 + tl.arange(0, C)
        ok = (rows < L)[:, None] & (cv < nv)[None, :]
        if not SPLIT:
            y = y * tl.where(zz > 0, 1.0 / tl.where(zz > 0, zz, 1.0), 0.0)[:, None]
        tl.store(p_o + rows.to(tl.int64)[:, None] * sol + cv[None, :], y.to(o.dtype.element_ty), mask=ok)
        if pid_v == 0:
            tl.store(p_z + rows, zz, mask=rows < L)


@triton.jit
def linear_bwd(q, k, v, km, do, rinv, gzr, dq, dk, dv, hpre, zpre, rpre, rzpre,
               sqb, sqh, sql, skb, skh, sks, svb, svh, svs, smb, smh, sms, sdb, sdh, sdl,
               Hq, G, L, S, OFF, A0, SEG_ROWS, NS, N_BH, scale, c0, c1, c2,
               D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr, SEGMENTED: tl.constexpr,
               TA: tl.constexpr):
    """dq [NV*NF, B*Hq, L, D], dk [NV*NF, B*Hq, S, D] (partial over the Dv and feature blocks) and dv
    [NF, B*Hq, S, DV] (partial over the feature blocks; per query head), fp32 contiguous, zero-initialized
    (keys no row sees keep 0). rinv = 1/Z, gzr = -delta/Z [B*Hq, L].
    Segment seg = program_id(2) takes the rows [seg SEG_ROWS, (seg + 1) SEG_ROWS) and the keys whose
    gradient they complete: causal, their diagonal blocks (and segment 0 the prefix [0, A0)); not causal,
    the segment's piece of the keys. SEGMENTED: the starting states come from hpre, zpre (the forward's, as
    in linear_fwd) and rpre, rzpre (the reverse state of the rows after the segment; not causal: all rows)."""
    SPLIT: tl.constexpr = TA < BD
    pid_bh, pid_v, p_q, p_k, p_v, p_m, p_do, p_r, p_gz, pid_f = bwd_base(q, k, v, km, do, rinv, gzr, sqb, sqh, skb,
                                                                         skh, svb, svh, smb, smh, sdb, sdh, Hq, G, L,
                                                                         BV, BD // TA)
    seg = tl.program_id(2)
    part = tl.program_id(1).to(tl.int64) * N_BH + pid_bh                # (Dv block, feature block, head)
    p_dq = dq + part * L * D
    p_dk = dk + part * S * D
    p_dv = dv + (pid_f.to(tl.int64) * N_BH + pid_bh) * S * DV + pid_v * BV
    cd = tl.arange(0, BD)
    cv = tl.arange(0, BV)
    nv = DV - pid_v * BV
    first = (pid_v == 0).to(tl.float32)                                 # the gz terms: one Dv block adds them
    i_lo = seg * SEG_ROWS
    i_hi = tl.minimum(L, i_lo + SEG_ROWS)

    # ---- dq: the forward's state, rows in order
    if SEGMENTED:
        h0, h1, h2, z0, z1, z2 = load_state(hpre, zpre, pid_bh, pid_v, pid_f, seg, NS, cd, cv, nv, BD, BV, DV, TA)
    else:
        h0, h1, h2, z0, z1, z2 = prefix_state(p_k, p_v, p_m, sks, svs, sms, 0, A0, cd, cv, nv, pid_f, D, BD, BV, C,
                                              HAS_MASK, PREC, TA)
    for i0 in range(i_lo, i_hi, C):
        rows = i0 + tl.arange(0, C)
        qs, g, gz = rows_dy(p_q, p_do, p_r, p_gz, sql, sdl, i0, L, cd, cv, nv, first, scale, D, C)
        t1 = dot(g, tl.trans(h1), PREC) + gz[:, None] * z1[None, :]     # [C, BD]
        t2 = dot(g, tl.trans(h2), PREC) + gz[:, None] * z2[None, :]     # [C, TA*BD]
        dqs = first_only(c1 * t1, pid_f, SPLIT) + (2.0 * c2) * contract_sq(t2, qs, pid_f, C, BD, TA)
        if CAUSAL:
            a, b = diag_range(i0, L, S, OFF, C)
            kb, m, vm = load_keys(p_k, p_v, p_m, sks, svs, sms, a, b, cd, cv, nv, D, C, HAS_MASK)
            s, ok, _ = diag_block(qs, kb, i0, a, b, m, OFF, c0, c1, c2, C, PREC)
            ds = tl.where(ok, (c1 + 2.0 * c2 * s) * (dot(g, tl.trans(vm), PREC) + gz[:, None]), 0.0)
            dqs += dot(first_only(ds, pid_f, SPLIT), kb, PREC)
            h0, h1, h2, z0, z1, z2 = add_keys(h0, h1, h2, z0, z1, z2, kb, m, vm, pid_f, C, BD, TA, PREC)
        ok = (rows < L)[:, None] & (cd < D)[None, :]
        tl.store(p_dq + rows.to(tl.int64)[:, None] * D + cd[None, :], dqs * scale, mask=ok)

    # ---- dk, dv: the reverse state over the rows that see a key in full, rows in reverse
    if SEGMENTED:
        r0, r1, r2, _, rz1, rz2 = load_state(rpre, rzpre, pid_bh, pid_v, pid_f, seg, NS, cd, cv, nv, BD, BV, DV, TA)
        rz1 = rz1 * first
        rz2 = rz2 * first
    else:
        r0 = tl.zeros([BV], tl.float32)
        r1 = tl.zeros([BD, BV], tl.float32)
        r2 = tl.zeros([TA * BD, BV], tl.float32)
        rz1 = tl.zeros([BD], tl.float32)
        rz2 = tl.zeros([TA * BD], tl.float32)
    if CAUSAL or not SEGMENTED:
        n_chunks = tl.cdiv(i_hi - i_lo, C)
        for t in range(0, n_chunks):
            i0 = i_lo + (n_chunks - 1 - t) * C
            qs, g, gz = rows_dy(p_q, p_do, p_r, p_gz, sql, sdl, i0, L, cd, cv, nv, first, scale, D, C)
            if CAUSAL:
                a, b = diag_range(i0, L, S, OFF, C)
                kb, m, vm = load_keys(p_k, p_v, p_m, sks, svs, sms, a, b, cd, cv, nv, D, C, HAS_MASK)
                dkb, dvb = keys_from_state(kb, vm, m, r0, r1, r2, rz1, rz2, c0, c1, c2, pid_f, C, BD, TA, PREC)
                s, ok, fa = diag_block(qs, kb, i0, a, b, m, OFF, c0, c1, c2, C, PREC)
                ds = tl.where(ok, (c1 + 2.0 * c2 * s) * (dot(g, tl.trans(vm), PREC) + gz[:, None]), 0.0)
                dkb += dot(tl.trans(first_only(ds, pid_f, SPLIT)), qs, PREC)
                dvb += dot(tl.trans(first_only(fa, pid_f, SPLIT)), g, PREC)
                store_keys(p_dk, p_dv, dkb, dvb, a, b, cd, cv, nv, D, DV, C)
            r0, r1, r2 = add_outer_state(r0, r1, r2, qs, g, pid_f, C, BD, TA, PREC)
            rz1, rz2 = add_outer_vec(rz1, rz2, qs, gz, pid_f, C, BD, TA)
    if CAUSAL:
        j_lo = 0
        j_hi = tl.where(seg == 0, A0, 0)                                # the prefix: segment 0, after all rows
    else:
        j_lo, j_hi = piece_keys(seg, S, OFF, SEG_ROWS, NS, CAUSAL)      # (one segment: all S keys)
    for j0 in range(j_lo, j_hi, C):                                     # keys every row sees
        kb, m, vm = load_keys(p_k, p_v, p_m, sks, svs, sms, j0, j_hi, cd, cv, nv, D, C, HAS_MASK)
        dkb, dvb = keys_from_state(kb, vm, m, r0, r1, r2, rz1, rz2, c0, c1, c2, pid_f, C, BD, TA, PREC)
        store_keys(p_dk, p_dv, dkb, dvb, j0, j_hi, cd, cv, nv, D, DV, C)


@triton.jit
def keys_from_state(kb, vm, m, r0, r1, r2, rz1, rz2, c0, c1, c2, pid_f, C: tl.constexpr, BD: tl.constexpr,
                    TA: tl.constexpr, PREC: tl.constexpr):
    """(dk [C, BD], dv [C, BV]) of the keys kb, vm (masked by m) from the reverse state (glossary; order 2:
    feature block pid_f, orders 0 and 1 from block 0 only)."""
    SPLIT: tl.constexpr = TA < BD
    k2 = outer(kb, pid_f, C, BD, TA)
    dvb = (first_only(c0 * r0[None, :] + c1 * dot(kb, r1, PREC), pid_f, SPLIT) + c2 * dot(k2, r2, PREC)) * m[:, None]
    u1 = dot(vm, tl.trans(r1), PREC) + rz1[None, :]                     # [C, BD]
    u2 = dot(vm, tl.trans(r2), PREC) + rz2[None, :]                     # [C, TA*BD]
    dkb = (first_only(c1 * u1, pid_f, SPLIT) + (2.0 * c2) * contract_sq(u2, kb, pid_f, C, BD, TA)) * m[:, None]
    return dkb, dvb


@triton.jit
def store_keys(p_dk, p_dv, dkb, dvb, j0, j_end, cd, cv, nv, D: tl.constexpr, DV: tl.constexpr, C: tl.constexpr):
    """Store dk [C, BD] and dv [C, BV] of the keys [j0, j0 + C) below j_end."""
    j = (j0 + tl.arange(0, C)).to(tl.int64)
    ok = j < j_end
    tl.store(p_dk + j[:, None] * D + cd[None, :], dkb, mask=ok[:, None] & (cd < D)[None, :])
    tl.store(p_dv + j[:, None] * DV + cv[None, :], dvb, mask=ok[:, None] & (cv < nv)[None, :])
