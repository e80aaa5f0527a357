"""Shared ``@triton.jit`` helpers of the attention kernels (forward tile loop, threshold pre-passes,
and the backward kernels), plus the small Python record that plugs a normalizer into the loop.

Glossary (one program owns BM query rows; a tile is BM rows x BN keys)::

    i, j        query row in [0, L), key in [0, S); `offs_m` = start_m + arange(BM), `offs_n` = arange(BN)
    qk          q_i . k_j in fp32 (tl.dot)                                        # [BM, BN]
    s           the score in KERNEL UNITS: s = u * s_nat, where
                  s_nat = scale * qk                      (no softcap)
                  s_nat = c * tanh(scale * qk / c)        (softcap c)
                  s_nat = s_nat + bias_ij                 (float mask, after the cap)
                and u is the normalizer's score unit (`Hooks.score_unit`): LOG2E for the exp2-based
                normalizers (softmax, topk), 1/2 for entmax15 (so s is z = s_nat/2), 1 for taylor.
                The launcher folds u into the kernel's scalars (`fold_score_unit`); the kernels never
                multiply by LOG2E themselves. LOG2E / LN2 below are the ONE place the log base is named.
    allowed     j < S, and (causal) j <= i + causal_off, and (bool mask) m_ij, and (float mask)
                bias_ij > finfo(mask dtype).min (-inf and finfo.min EXCLUDE the key)
    masked tile a tile that needs the `allowed` test (diagonal causal tiles, the ragged last tile, every
                tile when a user mask is given). CONVENTION: in a masked tile the helpers return
                s = -inf exactly where the key is not allowed; unmasked tiles contain no -inf.

Flags (tl.constexpr unless noted)::

    IS_CAUSAL   causal attention; causal_off (runtime int) = 0 for upper_left, S - L for lower_right
    MASK_KIND   0: no mask, 1: bool mask (passed as a uint8 view), 2: float mask
    SOFTCAP     apply the cap; then qk_scale = scale / c and cap_mult = c * u, else qk_scale = scale * u
    DOT_PREC    tl.dot input precision for fp32 inputs ("ieee", "tf32", "tf32x3"), or "upcast": the
                interpreter workaround of `mma` (Triton 3.6's interpreter multiplies bf16 operands
                wrongly, so they are upcast to fp32 first, exactly)

Pointers: `*_base` pointers are already offset (in int64) to the (batch, head) of the program; per-tile
offsets are advanced with an int64 scalar (`start * int64(1) * stride`) so that long sequences with
large strides never overflow int32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------------
# the log base: kernels use exp2/log2; scores of the exp-based normalizers are carried in log2 units.

#: log2(e): natural-log scores times LOG2E are log2-unit scores (exp(s) == exp2(s * LOG2E))
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
#: ln(2): log2-unit values times LN2 are natural-log values (lse = lse2 * LN2)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)

#: MASK_KIND values
MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2


def fold_score_unit(scale: float, softcap: Optional[float], unit: float) -> tuple[float, float]:
    """Kernel scalars (qk_scale, cap_mult) with the score unit ``unit`` folded in.

    Kernel score: ``s = qk * qk_scale`` (no cap) or ``s = cap_mult * tanh(qk * qk_scale)`` (cap ``c``),
    equal to ``unit * s_nat`` (see the glossary). The float-mask bias is multiplied by ``unit`` too
    (the launcher passes ``bias_mult = unit``)."""
    if softcap is None:
        return scale * unit, 0.0
    return scale / softcap, softcap * unit


# ---------------------------------------------------------------------------------------------------
# the Python record a normalizer module fills in (one per module: softmax.HOOKS, taylor.HOOKS, ...)


@dataclasses.dataclass(frozen=True)
class Hooks:
    """How one normalizer plugs into the forward tile loop (`tile_loop.attn_fwd`).

    Every callable is a ``@triton.jit`` function passed to the kernel as a ``tl.constexpr`` argument:

    * ``update(s, m_i, l_i, par, MASKED) -> (p, alpha, m_new, l_new)``: weights ``p`` [BM, BN] (fp32,
      unnormalized) of one score tile, the rescale ``alpha`` [BM] of the old accumulator (ignored unless
      ``rescale``), and the new running state (``m`` running max or unused, ``l`` running normalizer).
    * ``finalize(m_i, l_i, par) -> (inv_l, stat0, stat1)``: ``out = acc * inv_l`` (0 for empty rows) and
      the public row statistics (``stats`` names them, natural-log / score units; stat1 is ignored if
      the normalizer has one statistic).
    * ``prepass(...) -> par`` [BM] (optional): the threshold pre-pass (scores only), kernel units.
    * ``tile_live(s, par) -> scalar bool`` (optional): False if the tile has no support in any row; the
      loop then skips the P @ V product (``skip_dead``).
    * ``aux_weights(s, par) -> g`` and ``aux_finalize(l_i, l_g) -> (inv_l_g, aux_stat)`` (optional):
      a second weighted sum ``G = sum_j g_j v_j`` kept for the backward (entmax15's ``O2`` and
      ``sum_g``), only computed when gradients will be needed.
    * ``prepass_config(normalizer, S) -> (norm_arg, NORM_CONST)``: a runtime int and a constexpr
      passed to every hook (top-k's k and its select mode; entmax15's points per pass).
    * ``scratch_cols(normalizer, S) -> KC`` (optional): fp32 scratch slots per query row the pre-pass
      gets (``scr_rows`` [BM, 1] pointers, KC columns each; see `collect_above`), 0 for none.

    The backward rule (`kernels.backward`; all three or none):

    * ``bwd_rows(stat0, stat1, par, aux_l) -> (r0, r1)`` [BM]: the saved row statistics in the form
      the two hooks below want (run once per row by the preprocess kernel).
    * ``bwd_weights(s, r0, r1, MASKED) -> p`` [BM, BN]: the normalized weights recomputed from a
      kernel-unit score tile (0 where s = -inf, and for empty rows).
    * ``bwd_dscores(p, s, dp, delta, r0, r1) -> ds`` [BM, BN]: dL/ds_nat (natural score units) from
      dp = dL/dp and the row term delta = rowsum(dO * O), or rowsum(dO * O2) for a normalizer with
      ``aux_weights`` (its second weighted sum replaces O).
    """

    name: str
    score_unit: float
    stats: tuple[str, ...]
    update: Callable
    finalize: Callable
    rescale: bool
    prepass: Optional[Callable] = None
    tile_live: Optional[Callable] = None
    aux_weights: Optional[Callable] = None
    aux_finalize: Optional[Callable] = None
    prepass_config: Optional[Callable] = None
    scratch_cols: Optional[Callable] = None
    bwd_rows: Optional[Callable] = None
    bwd_weights: Optional[Callable] = None
    bwd_dscores: Optional[Callable] = None

    @property
    def has_prepass(self) -> bool:
        return self.prepass is not None

    @property
    def has_backward(self) -> bool:
        return self.bwd_dscores is not None

    @property
    def has_aux(self) -> bool:
        return self.aux_weights is not None


# ---------------------------------------------------------------------------------------------------
# scalar math


@triton.jit
def tanh_f32(x):
    """tanh in fp32 through exp2 (no libdevice, so it runs in the interpreter too): sign(x) (1-e)/(1+e),
    e = exp(-2|x|). Absolute error ~1e-7."""
    e = tl.exp2(tl.abs(x) * (-2.0 * LOG2E))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def safe_inv(l):
    """1 / l where l > 0, else 0 (rows with no allowed key output exactly 0)."""
    return tl.where(l > 0, 1.0 / tl.where(l > 0, l, 1.0), 0.0)


@triton.jit
def mma(a, b, acc, DOT_PREC: tl.constexpr):
    """tl.dot(a, b) + acc (acc may be None) with fp32 accumulation; see DOT_PREC in the glossary."""
    if DOT_PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


# ---------------------------------------------------------------------------------------------------
# block bounds (which tiles a program visits)


@triton.jit
def key_bounds(start_m, L, S, causal_off, BM: tl.constexpr, BN: tl.constexpr,
               IS_CAUSAL: tl.constexpr, ALL_MASKED: tl.constexpr):
    """Key tiles visited by the query rows [start_m, start_m + BM) (forward and dQ kernels).

    Returns (full_end, hi): keys [0, full_end) form whole tiles that every row of the block may attend
    (no mask arithmetic needed; full_end is a multiple of BN), keys [full_end, hi) are visited as masked
    tiles, keys >= hi are masked for every row and never touched (causal tile skipping).
    ``ALL_MASKED`` (a user mask is given) makes every visited tile a masked one."""
    if IS_CAUSAL:
        last_row = tl.minimum(start_m + BM, L) - 1
        hi = tl.minimum(last_row + causal_off + 1, S)   # keys j <= i + off for the block's last row
        full = tl.minimum(start_m + causal_off + 1, S)  # ... and for its first row
        hi = tl.maximum(hi, 0)
        full = tl.maximum(full, 0)
    else:
        hi = S + 0 * start_m
        full = S + 0 * start_m
    full_end = (full // BN) * BN
    if ALL_MASKED:
        full_end = 0 * full_end
    return full_end, hi


@triton.jit
def query_bounds(start_n, L, S, causal_off, BM: tl.constexpr, BN: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, ALL_MASKED: tl.constexpr):
    """Query tiles visiting the keys [start_n, start_n + BN) (the dK/dV kernel's mirror of key_bounds).

    Returns (lo, full_start): rows [lo, L) may attend some key of the tile (lo is a multiple of BM);
    query tiles starting at or after full_start (a multiple of BM) see every key of the tile and need
    no mask arithmetic; tiles in [lo, full_start) are masked tiles. Without causal: lo = 0 and
    full_start = 0 (or L rounded up to BM when ALL_MASKED, i.e. every tile masked). The ragged last
    query tile and ragged key tile must still be bounds-checked by the caller's loads."""
    if IS_CAUSAL:
        first = tl.maximum(start_n - causal_off, 0)                       # row seeing key start_n
        last_key = tl.minimum(start_n + BN, S) - 1
        full = tl.maximum(last_key - causal_off, 0)                       # rows seeing the whole tile
        lo = (first // BM) * BM
        full_start = tl.minimum(((full + BM - 1) // BM) * BM, ((L + BM - 1) // BM) * BM)
        full_start = tl.maximum(full_start, lo)
    else:
        lo = 0 * start_n
        full_start = 0 * start_n
    if ALL_MASKED:
        full_start = tl.maximum(lo, ((L + BM - 1) // BM) * BM)
    return lo, full_start


# ---------------------------------------------------------------------------------------------------
# loads


@triton.jit
def load_tile(base, start, offs_r, offs_c, n_r, n_c, stride_r, stride_c,
              CHECK_R: tl.constexpr, CHECK_C: tl.constexpr):
    """Tile [R, C] of a row-major-ish 2-D view: element (start + r, c) at base + (start + r) * stride_r
    + c * stride_c, zero outside [0, n_r) x [0, n_c) when the corresponding CHECK flag is set."""
    start64 = start * tl.full([], 1, tl.int64)           # int64 tile offset (start may be a Python int)
    ptrs = base + start64 * stride_r + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
    if CHECK_R and CHECK_C:
        ok = ((start + offs_r) < n_r)[:, None] & (offs_c < n_c)[None, :]
        return tl.load(ptrs, mask=ok, other=0.0)
    elif CHECK_R:
        return tl.load(ptrs, mask=((start + offs_r) < n_r)[:, None], other=0.0)
    elif CHECK_C:
        return tl.load(ptrs, mask=(offs_c < n_c)[None, :], other=0.0)
    else:
        return tl.load(ptrs)


# ---------------------------------------------------------------------------------------------------
# scores


@triton.jit
def scale_scores(qk, qk_scale, cap_mult, SOFTCAP: tl.constexpr):
    """Kernel-unit scores from raw dot products: qk * qk_scale, or cap_mult * tanh(qk * qk_scale)."""
    if SOFTCAP:
        return cap_mult * tanh_f32(qk * qk_scale)
    else:
        return qk * qk_scale


@triton.jit
def mask_scores(s, i, j, L, S, causal_off, p_mask_rows, stride_mask_j, bias_mult, mask_min,
                IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr):
    """Apply the `allowed` test (and the float-mask bias) to a score tile of any orientation.

    ``i`` and ``j`` are broadcastable query/key index tensors (e.g. offs_m[:, None] and
    offs_n[None, :] for S, or the transposes for S^T); ``p_mask_rows`` is the mask pointer of each
    query row (base + i * stride_mask_i, int64), broadcastable like ``i``. Returns s + u * bias where
    allowed and -inf elsewhere (keys >= S, causal, bool False, float <= mask_min)."""
    ok = j < S
    if IS_CAUSAL:
        ok = ok & (j <= i + causal_off)
    if MASK_KIND == 1:
        mv = tl.load(p_mask_rows + j * stride_mask_j, mask=(i < L) & (j < S), other=0)
        ok = ok & (mv != 0)
    elif MASK_KIND == 2:
        bias = tl.load(p_mask_rows + j * stride_mask_j, mask=(i < L) & (j < S), other=0.0).to(tl.float32)
        ok = ok & (bias > mask_min)
        s = s + tl.where(ok, bias, 0.0) * bias_mult        # excluded entries: no finfo.min * u overflow
    return tl.where(ok, s, float("-inf"))


@triton.jit
def score_tile(q, k_base, start_n, offs_n, offs_d, i, p_mask_rows,
               L, S, D, causal_off, stride_kn, stride_kd, stride_mask_n,
               qk_scale, cap_mult, bias_mult, mask_min,
               MASKED: tl.constexpr, PAD_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
               MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr):
    """Score tile s [BM, BN] of the query block ``q`` [BM, BD] against keys [start_n, start_n + BN).

    ``i`` = offs_m[:, None]; ``MASKED`` tiles get the `allowed` test (and -inf outside it); unmasked
    tiles are whole tiles inside [0, S) that every row attends."""
    k = load_tile(k_base, start_n, offs_n, offs_d, S, D, stride_kn, stride_kd, MASKED, PAD_D)  # [BN, BD]
    qk = mma(q, tl.trans(k), None, DOT_PREC)                                                   # [BM, BN]
    s = scale_scores(qk, qk_scale, cap_mult, SOFTCAP)
    if MASKED:
        s = mask_scores(s, i, (start_n + offs_n)[None, :], L, S, causal_off, p_mask_rows, stride_mask_n,
                        bias_mult, mask_min, IS_CAUSAL, MASK_KIND)
    return s


# ---------------------------------------------------------------------------------------------------
# dropout (forward tile loop and backward regenerate the same numbers)


@triton.jit
def dropout_keep(seed, row_base, i, j, S, dropout_p):
    """Keep mask of a tile of query rows i and keys j (broadcastable global indices, e.g. [BM, 1] and
    [1, BN]) of the head whose rows start at row_base = (b * Hq + h) * L (int64): the Philox uniform at
    offset (row_base + i) * S + j (unique per (b, h, i, j)) is >= dropout_p."""
    return tl.rand(seed, (row_base + i) * S + j) >= dropout_p


@triton.jit(do_not_specialize=["seed"])
def dropout_mask_kernel(Keep, seed, dropout_p, L, S, BM: tl.constexpr, BN: tl.constexpr):
    """The keep mask (B, Hq, L, S) as uint8 (for tests); grid (cdiv(L, BM), cdiv(S, BN), B * Hq)."""
    pid_bh = tl.program_id(2)
    i = (tl.program_id(0) * BM + tl.arange(0, BM))[:, None]                          # [BM, 1]
    j = (tl.program_id(1) * BN + tl.arange(0, BN))[None, :]                          # [1, BN]
    row_base = pid_bh.to(tl.int64) * L
    keep = dropout_keep(seed, row_base, i, j, S, dropout_p)
    tl.store(Keep + (row_base + i) * S + j, keep.to(tl.uint8), mask=(i < L) & (j < S))


@triton.jit
def pick_row(x, sel):
    """x[r, a_r] [BM] for a one-hot selector sel [BM, NP] (0 where a selector row is empty): the threshold
    pre-passes keep NP candidate points per row and pick one per row this way."""
    return tl.sum(tl.where(sel, x, 0.0), 1)


# ---------------------------------------------------------------------------------------------------
# threshold pre-pass building blocks: the largest group maxima, and collecting the scores above a bound


@triton.jit
def count_allowed(n, s, BN: tl.constexpr, MASKED: tl.constexpr):
    """n [BM] plus the allowed keys of the score tile s [BM, BN] (all BN in an unmasked tile)."""
    if MASKED:
        return n + tl.sum((s > float("-inf")).to(tl.float32), 1)
    else:
        return n + BN


def collect_group_size(S: int, groups: int) -> int:
    """Keys per group (a power of two in [8, 256]) that gives a row of S keys about ``groups`` groups, for
    `top_group_max` (at least one group per tile once it reaches the tile size)."""
    return max(8, min(256, next_pow2(max(1, S // groups))))


@triton.jit
def top_group_max(buf, n, q, k_base, offs_n, offs_d, i, p_mask_rows, L, S, D, causal_off, start, end,
                  stride_kn, stride_kd, stride_mask_n, qk_scale, cap_mult, bias_mult, mask_min,
                  BN: tl.constexpr, MASKED: tl.constexpr, PAD_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
                  MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
                  GS: tl.constexpr):
    """Merge the key tiles [start, end) into buf [BM, KP]: the KP largest maxima of groups of GS
    consecutive keys (one group per tile when GS >= BN) seen so far, per row. Empty slots hold -inf
    (slots set to +inf never leave: a caller keeping k < KP maxima starts them at +inf). Branch-free:
    BN // GS replacement steps per tile, none data dependent. Also counts the allowed keys n [BM].

    The group maxima are distinct scores of the row, so the k-th largest of them is a LOWER bound of
    the row's k-th largest score (the top-k threshold), and any bound computed from them alone (e.g.
    entmax15's threshold of the maxima) holds for the whole row."""
    BM: tl.constexpr = buf.shape[0]
    G: tl.constexpr = BN // GS if BN > GS else 1
    slots = tl.arange(0, buf.shape[1])
    for start_n in range(start, end, BN):
        s = score_tile(q, k_base, start_n, offs_n, offs_d, i, p_mask_rows, L, S, D, causal_off,
                       stride_kn, stride_kd, stride_mask_n, qk_scale, cap_mult, bias_mult, mask_min,
                       MASKED, PAD_D, IS_CAUSAL, MASK_KIND, SOFTCAP, DOT_PREC)          # [BM, BN]
        n = count_allowed(n, s, BN, MASKED)
        if G == 1:
            x = tl.max(s, 1)                                                             # [BM]
            low, slot = tl.min(buf, 1, return_indices=True)
            buf = tl.where((slots[None, :] == slot[:, None]) & (x > low)[:, None], x[:, None], buf)
        else:
            gm = tl.max(tl.reshape(s, [BM, G, BN // G]), 2)                              # [BM, G]
            cols = tl.arange(0, G)
            for g in tl.static_range(G):
                x = tl.max(tl.where(cols[None, :] == g, gm, float("-inf")), 1)          # [BM]
                low, slot = tl.min(buf, 1, return_indices=True)
                buf = tl.where((slots[None, :] == slot[:, None]) & (x > low)[:, None], x[:, None], buf)
    return buf, n


@triton.jit
def collect_above(cnt, lb, scr_rows, q, k_base, offs_n, offs_d, i, p_mask_rows, L, S, D, causal_off,
                  start, end, stride_kn, stride_kd, stride_mask_n, qk_scale, cap_mult, bias_mult,
                  mask_min, BN: tl.constexpr, MASKED: tl.constexpr, PAD_D: tl.constexpr,
                  IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr,
                  DOT_PREC: tl.constexpr, KC: tl.constexpr):
    """Append each row's allowed scores s >= lb [BM] of the key tiles [start, end) to its scratch row
    (scr_rows [BM, 1] pointers, KC fp32 slots): cnt [BM] (int32) counts them; those past KC are counted
    but not stored (the caller checks cnt <= KC). The stored values are the scores exactly as the output
    pass recomputes them (same tile shape), so a threshold picked among them compares exactly."""
    for start_n in range(start, end, BN):
        s = score_tile(q, k_base, start_n, offs_n, offs_d, i, p_mask_rows, L, S, D, causal_off,
                       stride_kn, stride_kd, stride_mask_n, qk_scale, cap_mult, bias_mult, mask_min,
                       MASKED, PAD_D, IS_CAUSAL, MASK_KIND, SOFTCAP, DOT_PREC)          # [BM, BN]
        take = s >= lb[:, None]
        if MASKED:
            take = take & (s > float("-inf"))
        ti = take.to(tl.int32)
        pos = cnt[:, None] + tl.cumsum(ti, 1) - 1                                        # [BM, BN]
        tl.store(scr_rows + pos, s, mask=take & (pos < KC))
        cnt += tl.sum(ti, 1)
    return cnt


@triton.jit
def bounded_collect(buf, scr_rows, q, k_base, offs_n, offs_d, i, p_mask_rows, L, S, D, causal_off, full_end,
                    hi, stride_kn, stride_kd, stride_mask_n, qk_scale, cap_mult, bias_mult, mask_min, norm_arg,
                    BN: tl.constexpr, PAD_D: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                    SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, GS: tl.constexpr, KC: tl.constexpr,
                    BOUND: tl.constexpr):
    """The two passes of a collecting pre-pass: `top_group_max` into buf over the keys [0, full_end)
    (unmasked tiles) and [full_end, hi) (masked), then lb = BOUND(buf, norm_arg) [BM] (a lower bound of
    the row's threshold computed from its largest group maxima), then `collect_above` lb. Returns
    (cnt [BM] int32 scores collected into scr_rows, n [BM] allowed keys)."""
    BM: tl.constexpr = buf.shape[0]
    n = tl.zeros([BM], tl.float32)
    buf, n = top_group_max(buf, n, q, k_base, offs_n, offs_d, i, p_mask_rows, L, S, D, causal_off, 0, full_end,
                           stride_kn, stride_kd, stride_mask_n, qk_scale, cap_mult, bias_mult, mask_min,
                           BN, False, PAD_D, IS_CAUSAL, MASK_KIND, SOFTCAP, DOT_PREC, GS)
    buf, n = top_group_max(buf, n, q, k_base, offs_n, offs_d, i, p_mask_rows, L, S, D, causal_off, full_end, hi,
                           stride_kn, stride_kd, stride_mask_n, qk_scale, cap_mult, bias_mult, mask_min,
                           BN, True, PAD_D, IS_CAUSAL, MASK_KIND, SOFTCAP, DOT_PREC, GS)
    lb = BOUND(buf, norm_arg)
    cnt = tl.zeros([BM], tl.int32)
    cnt = collect_above(cnt, lb, scr_rows, q, k_base, offs_n, offs_d, i, p_mask_rows, L, S, D, causal_off,
                        0, full_end, stride_kn, stride_kd, stride_mask_n, qk_scale, cap_mult, bias_mult,
                        mask_min, BN, False, PAD_D, IS_CAUSAL, MASK_KIND, SOFTCAP, DOT_PREC, KC)
    cnt = collect_above(cnt, lb, scr_rows, q, k_base, offs_n, offs_d, i, p_mask_rows, L, S, D, causal_off,
                        full_end, hi, stride_kn, stride_kd, stride_mask_n, qk_scale, cap_mult, bias_mult,
                        mask_min, BN, True, PAD_D, IS_CAUSAL, MASK_KIND, SOFTCAP, DOT_PREC, KC)
    return cnt, n


@triton.jit
def load_collected(scr_rows, cnt, KC: tl.constexpr):
    """The collected scores [BM, KC] sorted in descending order (-inf past each row's count). A barrier
    first: other threads of the program stored them."""
    tl.debug_barrier()
    slots = tl.arange(0, KC)
    vals = tl.load(scr_rows + slots[None, :], mask=slots[None, :] < cnt[:, None], other=float("-inf"))
    return tl.sort(vals, 1, descending=True)


# ---------------------------------------------------------------------------------------------------
# small defaults for hooks a normalizer does not use


@triton.jit
def no_prepass(q, k_base, offs_m, offs_n, offs_d, i, p_mask_rows, L, S, D, causal_off,
               full_end, hi, stride_kn, stride_kd, stride_mask_n, qk_scale, cap_mult, bias_mult,
               mask_min, norm_arg, scr_rows, BM: tl.constexpr, BN: tl.constexpr, PAD_D: tl.constexpr,
               IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr,
               DOT_PREC: tl.constexpr, NORM_CONST: tl.constexpr, KC: tl.constexpr):
    """The pre-pass of normalizers without a threshold: par = 0."""
    return tl.zeros([BM], dtype=tl.float32)


@triton.jit
def always_live(s, par):
    return True


@triton.jit
def no_aux_weights(s, par):
    return s


@triton.jit
def no_aux_finalize(l_i, l_g):
    return l_g, l_g


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))
