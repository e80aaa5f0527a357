"""Top-k softmax hooks and the k-th-largest pre-pass.

Scores arrive in log2 units (score unit LOG2E, as softmax). tau_k = the k-th largest allowed score of
the row (-inf when the row has at most k allowed keys); every key with s >= tau_k is kept (threshold
semantics: ties at tau_k are all kept), and the output pass is the online softmax over the kept keys.

Pre-pass modes (NORM_CONST, chosen by the launcher from k and S, `prepass_config`):

* ALL (k >= S): tau = -inf, no pass at all.
* COLLECT (k <= KMAX with ``COLLECT = True``; experimental, off by default, see below): two passes, no
  data-dependent loop. Pass 1 keeps, per row, the k
  largest maxima of groups of GS consecutive keys (`common.top_group_max`; GS chosen so that a row
  has about 4k groups); their k-th largest, lb, is at most tau_k (the maxima are k distinct scores).
  Pass 2 stores every allowed score >= lb in the row's scratch (`common.collect_above`, KC = 2 KP
  slots; on random data about 1.2-1.4 k of them); tau_k is the k-th largest of those, read after one
  sort. If a row of the block collected more than KC scores, the block falls back to BUFFER.
* BUFFER (k <= KMAX, the default, and COLLECT's fallback): one pass keeping, per row, the multiset of
  the k largest scores seen so far in a [BM, KP] register buffer (KP = next power of two >= k; slots >= k hold +inf and never leave).
  theta = min(buffer) is the running k-th largest. Per tile, the candidates are the scores > theta;
  while any row of the block has one, its largest candidate replaces that row's minimum slot (one
  argmax over the tile and one argmin over the buffer per step). Sort-free; a tile costs
  (1 + insertions) steps, and on data in random order insertions get rare (k ln(S/k) per row).
* SELECT (larger k): exact count-based selection. One pass for max, min and n; then passes at NP
  interior points t of [lo, hi] counting c(t) = #{s >= t} with the smallest counted and largest
  uncounted score: c(t) == k gives tau = min{s >= t}, c(t) == k - 1 gives tau = max{s < t}; otherwise
  the bracket snaps to data values (lo = min{s >= t_a}, hi = max{s < t_b}) and shrinks at least
  (NP + 1)-fold; it ends when lo == hi (ties).

Stats: tau (score units: tau2 * LN2; the kernel-unit tau2 is also saved for the backward, which must
compare s >= tau2 in the same units and rounding) and the natural-log lse over the kept keys.

Backward (``kernels.backward``): the softmax rule on the kept set: r0 = tau2 (the saved par, compared
s >= tau2 against scores recomputed exactly as the forward computed them), r1 = lse2,
p = exp2(s - lse2) where s >= tau2 (else 0), dS = p * (dP - delta).
"""

import triton
import triton.language as tl

from .common import (LN2, LOG2E, Hooks, bounded_collect, collect_group_size, count_allowed, load_collected,
                     next_pow2, pick_row, safe_inv, score_tile)
from .softmax import bwd_dscores, lse2_for_backward, lse_natural, online_update

#: largest k handled by the collect / running-buffer modes (larger k uses the count-based select)
KMAX = 128
#: COLLECT mode: experimental, off by default. Exact and tested on the CPU (Triton's interpreter), but not
#: validated on a GPU: on the H100 (call C, bench/TUNING.md) the CUDA tests with it on compiled so slowly
#: that only 6 finished in 170 s (tl.sort over [BM, 128] tiles is the suspect). Set it to True to try it.
COLLECT = False
#: NORM_CONST of the COLLECT mode: COLLECT_FLAG | GS << 8 | KP
COLLECT_FLAG: tl.constexpr = tl.constexpr(1 << 20)
#: points per select pass (power of two)
SELECT_POINTS: tl.constexpr = tl.constexpr(8)
MODE_ALL: tl.constexpr = tl.constexpr(0)
MODE_SELECT: tl.constexpr = tl.constexpr(1)
MAX_PASSES: tl.constexpr = tl.constexpr(64)


# ------------------------------------------------------------------ running top-k buffer (small k)

@triton.jit
def _buffer_range(buf, theta, n, q, k_base, offs_n, offs_d, i, p_mask_rows, L, S, D, causal_off,
                  start, end, stride_kn, stride_kd, stride_mask_n, qk_scale, cap_mult, bias_mult,
                  mask_min, BN: tl.constexpr, MASKED: tl.constexpr, PAD_D: tl.constexpr,
                  IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr,
                  DOT_PREC: tl.constexpr):
    """Merge the key tiles [start, end) into the buffer [BM, KP] (theta = its row minimum)."""
    cols_n = tl.arange(0, BN)
    cols_k = tl.arange(0, buf.shape[1])
    for start_n in range(start, end, BN):
        s = score_tile(q, k_base, start_n, offs_n, offs_d, i, p_mask_rows, L, S, D, causal_off,
                       stride_kn, stride_kd, stride_mask_n, qk_scale, cap_mult, bias_mult, mask_min,
                       MASKED, PAD_D, IS_CAUSAL, MASK_KIND, SOFTCAP, DOT_PREC)          # [BM, BN]
        n = count_allowed(n, s, BN, MASKED)
        cand = tl.where(s > theta[:, None], s, float("-inf"))                           # [BM, BN]
        while tl.max(cand) > float("-inf"):
            x, ix = tl.max(cand, 1, return_indices=True)                                 # [BM]
            _, slot = tl.min(buf, 1, return_indices=True)                                # [BM]
            put = (cols_k[None, :] == slot[:, None]) & (x > theta)[:, None]
            buf = tl.where(put, x[:, None], buf)
            cand = tl.where(cols_n[None, :] == ix[:, None], float("-inf"), cand)
            theta = tl.min(buf, 1)
            cand = tl.where(cand > theta[:, None], cand, float("-inf"))
    return buf, theta, n


@triton.jit
def _kth_group_max(buf, kf):
    """The k-th largest group maximum (buf keeps k of them, slots >= k at +inf): <= tau_k; -inf while a row
    has fewer than k groups with an allowed key."""
    return tl.min(buf, 1)


@triton.jit
def _buffer_prepass(q, k_base, offs_n, offs_d, i, p_mask_rows, L, S, D, causal_off, full_end, hi,
                    stride_kn, stride_kd, stride_mask_n, qk_scale, cap_mult, bias_mult, mask_min, kf,
                    BM: tl.constexpr, BN: tl.constexpr, PAD_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
                    MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
                    KP: tl.constexpr):
    """tau2 [BM] by the running buffer of KP slots (-inf when the row has <= k allowed keys)."""
    slots = tl.arange(0, KP)
    buf = tl.where(slots[None, :] < kf, float("-inf"), float("inf")) + tl.zeros([BM, KP], tl.float32)
    theta = tl.full([BM], float("-inf"), tl.float32)
    n = tl.zeros([BM], tl.float32)
    buf, theta, n = _buffer_range(buf, theta, n, q, k_base, offs_n, offs_d, i, p_mask_rows, L, S, D,
                                  causal_off, 0, full_end, stride_kn, stride_kd, stride_mask_n,
                                  qk_scale, cap_mult, bias_mult, mask_min, BN, False, PAD_D,
                                  IS_CAUSAL, MASK_KIND, SOFTCAP, DOT_PREC)
    buf, theta, n = _buffer_range(buf, theta, n, q, k_base, offs_n, offs_d, i, p_mask_rows, L, S, D,
                                  causal_off, full_end, hi, stride_kn, stride_kd, stride_mask_n,
                                  qk_scale, cap_mult, bias_mult, mask_min, BN, True, PAD_D,
                                  IS_CAUSAL, MASK_KIND, SOFTCAP, DOT_PREC)
    return tl.where(n > kf, theta, float("-inf"))


# ------------------------------------------------------------------ count-based select (large k)

@triton.jit
def _range_stats(smax, smin, n, q, k_base, offs_n, offs_d, i, p_mask_rows, L, S, D, causal_off,
                 start, end, stride_kn, stride_kd, stride_mask_n, qk_scale, cap_mult, bias_mult,
                 mask_min, BN: tl.constexpr, MASKED: tl.constexpr, PAD_D: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    for start_n in range(start, end, BN):
        s = score_tile(q, k_base, start_n, offs_n, offs_d, i, p_mask_rows, L, S, D, causal_off,
                       stride_kn, stride_kd, stride_mask_n, qk_scale, cap_mult, bias_mult, mask_min,
                       MASKED, PAD_D, IS_CAUSAL, MASK_KIND, SOFTCAP, DOT_PREC)          # [BM, BN]
        smax = tl.maximum(smax, tl.max(s, 1))
        if MASKED:
            ok = s > float("-inf")
            n += tl.sum(ok.to(tl.float32), 1)
            smin = tl.minimum(smin, tl.min(tl.where(ok, s, float("inf")), 1))
        else:
            n += BN
            smin = tl.minimum(smin, tl.min(s, 1))
    return smax, smin, n


@triton.jit
def _counts(cnt, above_min, below_max, t, q, k_base, offs_n, offs_d, i, p_mask_rows, L, S, D,
            causal_off, start, end, stride_kn, stride_kd, stride_mask_n, qk_scale, cap_mult,
            bias_mult, mask_min, BN: tl.constexpr, MASKED: tl.constexpr, PAD_D: tl.constexpr,
            IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr,
            DOT_PREC: tl.constexpr):
    """At the points t [BM, NP]: #{s >= t}, min{s >= t} and max{s < t} (allowed s only)."""
    NP: tl.constexpr = t.shape[1]
    cols = tl.arange(0, NP)
    for start_n in range(start, end, BN):
        s = score_tile(q, k_base, start_n, offs_n, offs_d, i, p_mask_rows, L, S, D, causal_off,
                       stride_kn, stride_kd, stride_mask_n, qk_scale, cap_mult, bias_mult, mask_min,
                       MASKED, PAD_D, IS_CAUSAL, MASK_KIND, SOFTCAP, DOT_PREC)          # [BM, BN]
        for pt in tl.static_range(NP):                 # one [BM, BN] pass per point (no 3-D tensor)
            sel = cols[None, :] == pt                                                    # [1, NP]
            ge = s >= pick_row(t, sel)[:, None]                                          # [BM, BN]
            cnt += tl.where(sel, tl.sum(ge.to(tl.float32), 1)[:, None], 0.0)             # [BM, NP]
            above_min = tl.minimum(above_min, tl.where(
                sel, tl.min(tl.where(ge, s, float("inf")), 1)[:, None], float("inf")))
            below_max = tl.maximum(below_max, tl.where(
                sel, tl.max(tl.where(ge, float("-inf"), s), 1)[:, None], float("-inf")))
    return cnt, above_min, below_max


@triton.jit
def _select(q, k_base, offs_n, offs_d, i, p_mask_rows, L, S, D, causal_off, full_end, hi,
            stride_kn, stride_kd, stride_mask_n, qk_scale, cap_mult, bias_mult, mask_min, kf,
            BM: tl.constexpr, BN: tl.constexpr, PAD_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
            MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
            NP: tl.constexpr):
    smax = tl.full([BM], float("-inf"), tl.float32)
    smin = tl.full([BM], float("inf"), tl.float32)
    n = tl.zeros([BM], tl.float32)
    smax, smin, n = _range_stats(smax, smin, n, q, k_base, offs_n, offs_d, i, p_mask_rows, L, S, D,
                                 causal_off, 0, full_end, stride_kn, stride_kd, stride_mask_n,
                                 qk_scale, cap_mult, bias_mult, mask_min, BN, False, PAD_D,
                                 IS_CAUSAL, MASK_KIND, SOFTCAP, DOT_PREC)
    smax, smin, n = _range_stats(smax, smin, n, q, k_base, offs_n, offs_d, i, p_mask_rows, L, S, D,
                                 causal_off, full_end, hi, stride_kn, stride_kd, stride_mask_n,
                                 qk_scale, cap_mult, bias_mult, mask_min, BN, True, PAD_D,
                                 IS_CAUSAL, MASK_KIND, SOFTCAP, DOT_PREC)
    kb = tl.zeros([BM], tl.float32) + kf            # k per row
    few = n <= kb                                   # keep every allowed key
    lo = tl.where(few, 0.0, smin)                   # invariant: lo <= tau <= hi, both data values
    up = tl.where(few, 0.0, smax)
    tau = tl.where(kb == 1.0, smax, lo)
    done = few | (kb == 1.0) | (lo >= up)
    idx = tl.arange(0, NP)
    frac = (idx + 1).to(tl.float32) / (NP + 1)
    passes = tl.full([], 0, tl.int32)
    while (tl.max(tl.where(done, 0, 1)) > 0) & (passes < MAX_PASSES):
        t = lo[:, None] + (up - lo)[:, None] * frac[None, :]                            # [BM, NP]
        cnt = tl.zeros([BM, NP], tl.float32)
        amin = tl.full([BM, NP], float("inf"), tl.float32)
        bmax = tl.full([BM, NP], float("-inf"), tl.float32)
        cnt, amin, bmax = _counts(cnt, amin, bmax, t, q, k_base, offs_n, offs_d, i, p_mask_rows, L,
                                  S, D, causal_off, 0, full_end, stride_kn, stride_kd, stride_mask_n,
                                  qk_scale, cap_mult, bias_mult, mask_min, BN, False, PAD_D,
                                  IS_CAUSAL, MASK_KIND, SOFTCAP, DOT_PREC)
        cnt, amin, bmax = _counts(cnt, amin, bmax, t, q, k_base, offs_n, offs_d, i, p_mask_rows, L,
                                  S, D, causal_off, full_end, hi, stride_kn, stride_kd, stride_mask_n,
                                  qk_scale, cap_mult, bias_mult, mask_min, BN, True, PAD_D,
                                  IS_CAUSAL, MASK_KIND, SOFTCAP, DOT_PREC)
        eq_k = cnt == kf
        eq_k1 = cnt == kf - 1.0
        hit_k = tl.max(eq_k.to(tl.int32), 1) > 0
        hit_k1 = tl.max(eq_k1.to(tl.int32), 1) > 0
        v_k = tl.max(tl.where(eq_k, amin, float("-inf")), 1)        # min{s >= t} where c(t) == k
        v_k1 = tl.max(tl.where(eq_k1, bmax, float("-inf")), 1)      # max{s < t} where c(t) == k - 1
        a = tl.max(tl.where(cnt >= kf, idx[None, :], -1), 1)        # last point with c(t) >= k
        new_lo = tl.where(a >= 0, pick_row(amin, idx[None, :] == a[:, None]), lo)
        new_up = tl.where(a + 1 < NP, pick_row(bmax, idx[None, :] == (a + 1)[:, None]), up)
        lo = tl.maximum(lo, new_lo)
        up = tl.minimum(up, new_up)
        val = tl.where(hit_k, v_k, tl.where(hit_k1, v_k1, lo))
        fin = hit_k | hit_k1 | ~(lo < up)               # lo == up: ties; NaN scores stop too
        tau = tl.where(done, tau, val)
        done = done | fin
        passes += 1
    return tl.where(few, float("-inf"), tau)


@triton.jit
def prepass(q, k_base, offs_m, offs_n, offs_d, i, p_mask_rows, L, S, D, causal_off,
            full_end, hi, stride_kn, stride_kd, stride_mask_n, qk_scale, cap_mult, bias_mult,
            mask_min, norm_arg, scr_rows, BM: tl.constexpr, BN: tl.constexpr, PAD_D: tl.constexpr,
            IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr,
            DOT_PREC: tl.constexpr, NORM_CONST: tl.constexpr, KC: tl.constexpr):
    """tau2 [BM] (log2 units; -inf when the row has <= k allowed keys). norm_arg = k (a float).
    NORM_CONST: MODE_ALL (0), MODE_SELECT (1), KP >= 2 (buffer of KP slots), or COLLECT_FLAG | GS << 8 |
    KP (collect, KC = 2 KP scratch slots per row in scr_rows)."""
    kf = norm_arg
    if NORM_CONST == MODE_ALL:
        tau = tl.full([BM], float("-inf"), tl.float32)
    elif NORM_CONST == MODE_SELECT:
        tau = _select(q, k_base, offs_n, offs_d, i, p_mask_rows, L, S, D, causal_off, full_end, hi,
                      stride_kn, stride_kd, stride_mask_n, qk_scale, cap_mult, bias_mult, mask_min,
                      kf, BM, BN, PAD_D, IS_CAUSAL, MASK_KIND, SOFTCAP, DOT_PREC, SELECT_POINTS)
    elif NORM_CONST >= COLLECT_FLAG:
        KP: tl.constexpr = NORM_CONST & 255
        GS: tl.constexpr = (NORM_CONST >> 8) & 4095
        slots = tl.arange(0, KP)
        buf = tl.where(slots[None, :] < kf, float("-inf"), float("inf")) + tl.zeros([BM, KP], tl.float32)
        cnt, n = bounded_collect(buf, scr_rows, q, k_base, offs_n, offs_d, i, p_mask_rows, L, S, D, causal_off,
                                 full_end, hi, stride_kn, stride_kd, stride_mask_n, qk_scale, cap_mult,
                                 bias_mult, mask_min, kf, BN, PAD_D, IS_CAUSAL, MASK_KIND, SOFTCAP, DOT_PREC,
                                 GS, KC, _kth_group_max)
        srt = load_collected(scr_rows, cnt, KC)                                          # [BM, KC]
        kidx = kf.to(tl.int32) - 1
        tau = pick_row(srt, tl.arange(0, KC)[None, :] == kidx)                           # k-th largest
        if tl.max((cnt > KC).to(tl.int32)) > 0:        # some row collected too many: the exact buffer
            tau = _buffer_prepass(q, k_base, offs_n, offs_d, i, p_mask_rows, L, S, D, causal_off,
                                  full_end, hi, stride_kn, stride_kd, stride_mask_n, qk_scale, cap_mult,
                                  bias_mult, mask_min, kf, BM, BN, PAD_D, IS_CAUSAL, MASK_KIND, SOFTCAP,
                                  DOT_PREC, KP)
        tau = tl.where(n > kf, tau, float("-inf"))
    else:
        tau = _buffer_prepass(q, k_base, offs_n, offs_d, i, p_mask_rows, L, S, D, causal_off, full_end,
                              hi, stride_kn, stride_kd, stride_mask_n, qk_scale, cap_mult, bias_mult,
                              mask_min, kf, BM, BN, PAD_D, IS_CAUSAL, MASK_KIND, SOFTCAP, DOT_PREC,
                              NORM_CONST)
    return tau


@triton.jit
def keep(s, par):
    """Scores of the kept keys (s >= tau_k), -inf elsewhere."""
    return tl.where(s >= par[:, None], s, float("-inf"))


@triton.jit
def update(s, m_i, l_i, par, MASKED: tl.constexpr):
    return online_update(keep(s, par), m_i, l_i, True)


@triton.jit
def finalize(m_i, l_i, par):
    return safe_inv(l_i), par * LN2, lse_natural(m_i, l_i)


@triton.jit
def tile_live(s, par):
    """Some score in the tile is kept."""
    return tl.max((s >= par[:, None]).to(tl.int32)) > 0


@triton.jit
def bwd_rows(stat0, stat1, par, aux_l):
    return par, lse2_for_backward(stat1)


@triton.jit
def bwd_weights(s, r0, r1, MASKED: tl.constexpr):
    return tl.where(s >= r0[:, None], tl.exp2(s - r1[:, None]), 0.0)


def prepass_config(normalizer, S: int):
    """(norm_arg, NORM_CONST) for TopK(k) over S keys."""
    k = int(normalizer.k)
    if k >= S:
        return k, int(MODE_ALL.value)
    if k <= KMAX:
        kp = max(2, next_pow2(k))
        if not COLLECT:
            return k, kp
        return k, int(COLLECT_FLAG.value) | collect_group_size(S, 4 * k) << 8 | kp   # about 4k groups
    return k, int(MODE_SELECT.value)


def scratch_cols(normalizer, S: int) -> int:
    """Scratch slots per query row: 2 KP for the COLLECT mode, else 0."""
    k = int(normalizer.k)
    return 2 * max(2, next_pow2(k)) if (COLLECT and k < S and k <= KMAX) else 0


HOOKS = Hooks(
    name="topk",
    score_unit=float(LOG2E.value),
    stats=("tau", "lse"),
    update=update,
    finalize=finalize,
    rescale=True,
    prepass=prepass,
    tile_live=tile_live,
    prepass_config=prepass_config,
    scratch_cols=scratch_cols,
    bwd_rows=bwd_rows,
    bwd_weights=bwd_weights,
    bwd_dscores=bwd_dscores,
)
