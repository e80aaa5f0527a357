"""Top-k softmax hooks and the k-th-largest pre-pass.

Scores arrive in log2 units (score unit LOG2E, as softmax). tau_k = the k-th largest allowed score of
the row (-inf when the row has at most k allowed keys); every key with s >= tau_k is kept (threshold
semantics: ties at tau_k are all kept), and the output pass is the online softmax over the kept keys.

Pre-pass modes (``NORM.consts.MODE``, chosen from k and S by `configure`):

* ALL (k >= S): tau = -inf, no pass at all.
* COLLECT (k <= KMAX with ``COLLECT = True``; experimental, off by default, see below): two passes, no
  data-dependent loop. Pass 1 keeps, per row, the k
  largest maxima of groups of GS consecutive keys (`threshold.top_group_max`; GS chosen so that a row
  has about 4k groups); their k-th largest, lb, is at most tau_k (the maxima are k distinct scores).
  Pass 2 stores every allowed score >= lb in the row's scratch (`threshold.collect_search`, KC = 2 KP
  slots; on random data about 1.2-1.4 k of them); tau_k is the k-th largest of those, read after one
  sort. If a row of the block collected more than KC scores, the block falls back to BUFFER.
* BUFFER (k <= KMAX outside SELECT_UP_TO_S, and COLLECT's fallback): one pass keeping, per row, the multiset of
  the k largest scores seen so far in a [BM, KP] register buffer (KP = next power of two >= k; slots >= k hold +inf and never leave).
  theta = min(buffer) is the running k-th largest. Per tile, the candidates are the scores > theta;
  while any row of the block has one, its largest candidate replaces that row's minimum slot (one
  argmax over the tile and one argmin over the buffer per step). A tile costs (1 + insertions) steps, and
  on data in random order insertions get rare (k ln(S/k) per row). A tile in which some row has more than
  MERGE_AT[KP] candidates (the first tiles: every allowed score is one while the buffer fills) is merged in one
  data-independent step instead (`_merge_tile`: the buffer sorted ascending against the tile's KP largest
  descending, elementwise max: the KP largest of the union).
* SELECT (k > KMAX, and k <= KMAX at S <= SELECT_UP_TO_S[KP], at SELECT_SHORT_POINTS points per pass: cheaper
  there than the buffer's merges by the offline cost model): exact count-based selection, the bracket method of
  the threshold engine (`threshold.search` with the rule `RULE`). One pass for max, min and n; then passes at NP
  interior points t of [lo, hi] counting c(t) = #{s >= t} with the smallest counted and largest
  uncounted score: c(t) == k gives tau = min{s >= t}, c(t) == k - 1 gives tau = max{s < t}; otherwise
  the bracket snaps to data values (lo = min{s >= t_a}, hi = max{s < t_b}) and shrinks at least
  (NP + 1)-fold; it ends when lo == hi (ties).

Stats: tau (score units: tau2 * LN2; the kernel-unit tau2 is also saved for the backward, which must
compare s >= tau2 in the same units and rounding) and the natural-log lse over the kept keys.

Backward (``kernels.backward``): the softmax rule on the kept set: w0 = tau2 (the saved thr, compared
s >= tau2 against scores recomputed exactly as the forward computed them), w1 = lse2,
p = exp2(s - lse2) where s >= tau2 (else 0), dS = p * (dP - delta).
"""

import os
from typing import Any, NamedTuple

import triton
import triton.language as tl

from .blockmask import floor_identity, mark_tile, row_floor
from .contract import LN2, LOG2E, make_hooks, next_pow2
from .softmax import bwd_dscores, lse2_for_backward, lse_natural, online_update
from .threshold import Bracket, ThresholdRule, collect_group_size, collect_search, point_columns, search
from .tiles import count_allowed, fold_keys, pick_row, safe_inv

#: largest k handled by the collect / running-buffer modes (larger k uses the count-based select)
KMAX = 128
#: COLLECT mode: experimental, off by default. Exact and tested on the CPU (Triton's interpreter), but not
#: validated on a GPU: on the H100 (call C, bench/TUNING.md) the CUDA tests with it on compiled so slowly
#: that only 6 finished in 170 s (tl.sort over [BM, 128] tiles is the suspect). Set it to True to try it.
COLLECT = False
#: BUFFER: a tile in which some row has more than MERGE_AT[KP] candidates (scores above its running k-th
#: largest) is merged into the buffer in one step (`_merge_tile`) instead of one insertion step per candidate.
#: The thresholds are the merge's cost in insertion steps, from the offline sm_90 SASS at D = 64 (BN = 64;
#: bench/TUNING.md, "Issue 17 item 4, the remainder"): per tile, a merge took about 2.3, 3.3, 4.5, 5.9, 7.4 and
#: 10.7 insertion steps at KP = 2, 8, 16, 32, 64, 128 (KP = 4 interpolated).
MERGE_AT = {2: 2, 4: 3, 8: 3, 16: 4, 32: 6, 64: 7, 128: 11}
#: under the interpreter no merges (insertion steps only; see `configure`)
INTERPRET_NO_MERGE = True
#: points per select pass (power of two) for k > KMAX
SELECT_POINTS = 8
#: SELECT instead of BUFFER for k <= KMAX (COLLECT off): per buffer size KP, the largest S at which the count select
#: is the default (``{}``: BUFFER for every k <= KMAX). Offline cost model per K tile (SASS at D = 64, replays at
#: BM = 128, BN = 64, N(0, 1) and structured scores; bench/TUNING.md, "top-k's pre-pass mode by measured cost"): at
#: KP = 128 (64 < k <= 128) a buffer merge costs 8631 and nearly every tile of a short row merges: BUFFER 7650-8850
#: per tile at S <= 1024, SELECT at 2 points 174 + 7.5-8.5 passes x 601 = 4680-5280. From S = 2048 on structured
#: scores (and at 8k on both) the buffer inserts instead and SELECT no longer wins; at KP <= 64 BUFFER wins everywhere.
SELECT_UP_TO_S = {128: 1024}
#: points per select pass in that region: 601 SASS per pass tile and 7.5-8.5 passes; 8 points: 2161 and 4-5 passes
SELECT_SHORT_POINTS = 2
MAX_PASSES = 64
#: Consts.MODE values (constexpr: the pre-pass compares against them; ``.value`` in Python)
MODE_ALL: tl.constexpr = tl.constexpr(0)
MODE_SELECT: tl.constexpr = tl.constexpr(1)
MODE_BUFFER: tl.constexpr = tl.constexpr(2)
MODE_COLLECT: tl.constexpr = tl.constexpr(3)


class Consts(NamedTuple):
    """Compile-time options of the pre-pass (``NORM.consts``)."""

    MODE: int
    KP: int       # buffer slots (BUFFER, COLLECT): the next power of two >= k
    GS: int       # keys per group (COLLECT)
    KC: int       # scratch slots per row (COLLECT): 2 KP
    MERGE_AT: int = 8     # BUFFER: merge a tile with more candidates than this in some row (MERGE_AT[KP])


class Args(NamedTuple):
    """Runtime arguments (``args``)."""

    k: Any        # k as a float


# ------------------------------------------------------------------ running top-k buffer (small k)


@triton.jit
def _tile_desc(s, KP: tl.constexpr):
    """The KP largest scores of the tile s [BM, BN] in descending order [BM, KP] (-inf past BN when KP > BN);
    NaN scores (never inserted) count as -inf (an empty slot)."""
    BM: tl.constexpr = s.shape[0]
    BN: tl.constexpr = s.shape[1]
    x = tl.where(s == s, s, float("-inf"))                                              # NaN -> -inf
    if KP <= BN:
        return tl.topk(x, KP, dim=1)                                                     # [BM, KP]
    else:
        r = tl.arange(0, KP // BN)[None, :, None]                                        # [1, R, 1]
        pad = tl.reshape(tl.where(r == 0, x[:, None, :], float("-inf")), [BM, KP])      # [BM, R, BN] -> [BM, KP]
        return tl.sort(pad, 1, descending=True)


@triton.jit
def _merge_tile(buf, s):
    """The KP largest of the multiset union of buf [BM, KP] and the tile s [BM, BN], in one data-independent
    step (the bitonic top-k step): buf in ascending order against the tile's KP largest in descending order,
    elementwise max. The +inf slots (>= k) stay (nothing exceeds them), so the k others take the k largest
    of the buffer's k and the tile: the multiset the insertion steps would leave (ties included)."""
    return tl.maximum(tl.sort(buf, 1), _tile_desc(s, buf.shape[1]))


@triton.jit
def _buffer_fold(state, s, start_n, ctx, BN: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr,
                 MASKED: tl.constexpr):
    """Merge one score tile into the buffer [BM, KP] (theta = its row minimum)."""
    buf, theta, n = state
    cols_n = tl.arange(0, BN)
    cols_k = tl.arange(0, buf.shape[1])
    cand = tl.where(s > theta[:, None], s, float("-inf"))                                # [BM, BN]
    if tl.max(tl.sum((cand > float("-inf")).to(tl.int32), 1)) > NORM.consts.MERGE_AT:
        # many candidates (a row's first tiles): one merge instead of up to that many insertion steps
        buf = _merge_tile(buf, s)
        theta = tl.min(buf, 1)
        cand = tl.full([buf.shape[0], BN], float("-inf"), tl.float32)
    n = count_allowed(n, s, BN, MASKED)
    while tl.max(cand) > float("-inf"):
        x, ix = tl.max(cand, 1, return_indices=True)                                     # [BM]
        _, slot = tl.min(buf, 1, return_indices=True)                                    # [BM]
        put = (cols_k[None, :] == slot[:, None]) & (x > theta)[:, None]
        buf = tl.where(put, x[:, None], buf)
        cand = tl.where(cols_n[None, :] == ix[:, None], float("-inf"), cand)
        theta = tl.min(buf, 1)
        cand = tl.where(cand > theta[:, None], cand, float("-inf"))
    return buf, theta, n


@triton.jit
def _empty_buffer(kf, BM: tl.constexpr, KP: tl.constexpr):
    """[BM, KP]: k slots at -inf (to be filled), the slots >= k at +inf (never leave)."""
    slots = tl.arange(0, KP)
    return tl.where(slots[None, :] < kf, float("-inf"), float("inf")) + tl.zeros([BM, KP], tl.float32)


@triton.jit
def _buffer_prepass(blk, keys, args, BM: tl.constexpr, BN: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr):
    """tau2 [BM] by the running buffer of KP slots (-inf when the row has <= k allowed keys)."""
    state = (_empty_buffer(args.k, BM, NORM.consts.KP), tl.full([BM], float("-inf"), tl.float32),
             tl.zeros([BM], tl.float32))
    if ST.BLOCK_MASK:
        buf, theta, n = fold_keys(state, _marking_buffer_fold, (keys.live, keys.S, blk.offs_m, keys.L), blk, keys,
                                  BN, ST, NORM)
    else:
        buf, theta, n = fold_keys(state, _buffer_fold, 0, blk, keys, BN, ST, NORM)
    return tl.where(n > args.k, theta, float("-inf"))


@triton.jit
def _marking_buffer_fold(state, s, start_n, ctx, BN: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr,
                         MASKED: tl.constexpr):
    """`_buffer_fold` that also marks the tile's block-mask cells (ST.BLOCK_MASK) against the new running
    k-th largest theta: it only grows, so theta <= tau_k and a cell dead against it is dead (conservative;
    theta is -inf until k keys were seen). ctx = (cell-row pointer, S, the rows offs_m [BM], L)."""
    state = _buffer_fold(state, s, start_n, 0, BN, ST, NORM, MASKED)
    live, S, offs_m, L = ctx
    mark_tile(live, s, start_n, row_floor(state[1], offs_m, L, NORM), S)
    return state


# ------------------------------------------------------------------ count-based select (the engine's rule)


@triton.jit
def _next_points(lo, up, NP: tl.constexpr):
    """(t0, t1): the engine's NP points t0 + (t1 - t0) a / NP are the interior points
    lo + (up - lo) (a + 1) / (NP + 1)."""
    step = (up - lo) / (NP + 1)
    return lo + step, lo + step * (NP + 1)


@triton.jit
def _init(smax, smin, n, args, NP: tl.constexpr):
    few = n <= args.k                               # keep every allowed key
    lo = tl.where(few, 0.0, smin)                   # invariant: lo <= tau <= up, both data values
    up = tl.where(few, 0.0, smax)
    t0, t1 = _next_points(lo, up, NP)
    one = args.k == 1.0
    return Bracket(lo, up, t0, t1, tl.where(one, smax, lo), few | one | (lo >= up))


@triton.jit
def _zero(t):
    return (tl.zeros(t.shape, tl.float32), tl.full(t.shape, float("inf"), tl.float32),
            tl.full(t.shape, float("-inf"), tl.float32))


@triton.jit
def _counts(acc, s, start_n, t, BN: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr, MASKED: tl.constexpr):
    """At the points t [BM, NP]: #{s >= t}, min{s >= t} and max{s < t} (allowed s only)."""
    cnt, above_min, below_max = acc
    NP: tl.constexpr = t.shape[1]
    cols = tl.arange(0, NP)
    for pt in tl.static_range(NP):                 # one [BM, BN] pass per point (no 3-D tensor)
        sel = cols[None, :] == pt                                                        # [1, NP]
        ge = s >= pick_row(t, sel)[:, None]                                              # [BM, BN]
        cnt = point_columns(cnt, tl.sum(ge.to(tl.float32), 1), sel)                      # [BM, NP]
        above_min = tl.minimum(above_min, tl.where(
            sel, tl.min(tl.where(ge, s, float("inf")), 1)[:, None], float("inf")))
        below_max = tl.maximum(below_max, tl.where(
            sel, tl.max(tl.where(ge, float("-inf"), s), 1)[:, None], float("-inf")))
    return cnt, above_min, below_max


@triton.jit
def _step(br, t, acc, args):
    """c(t) == k gives tau = min{s >= t}, c(t) == k - 1 gives tau = max{s < t}; otherwise the bracket snaps
    to data values (lo = min{s >= t_a}, up = max{s < t_b}); lo == up ends it (ties)."""
    cnt, amin, bmax = acc
    NP: tl.constexpr = t.shape[1]
    idx = tl.arange(0, NP)
    kf = args.k
    eq_k = cnt == kf
    eq_k1 = cnt == kf - 1.0
    hit_k = tl.max(eq_k.to(tl.int32), 1) > 0
    hit_k1 = tl.max(eq_k1.to(tl.int32), 1) > 0
    v_k = tl.max(tl.where(eq_k, amin, float("-inf")), 1)        # min{s >= t} where c(t) == k
    v_k1 = tl.max(tl.where(eq_k1, bmax, float("-inf")), 1)      # max{s < t} where c(t) == k - 1
    a = tl.max(tl.where(cnt >= kf, idx[None, :], -1), 1)        # last point with c(t) >= k
    new_lo = tl.where(a >= 0, pick_row(amin, idx[None, :] == a[:, None]), br.lo)
    new_up = tl.where(a + 1 < NP, pick_row(bmax, idx[None, :] == (a + 1)[:, None]), br.up)
    lo = tl.maximum(br.lo, new_lo)
    up = tl.minimum(br.up, new_up)
    val = tl.where(hit_k, v_k, tl.where(hit_k1, v_k1, lo))
    fin = hit_k | hit_k1 | ~(lo < up)               # lo == up: ties; NaN scores stop too
    t0, t1 = _next_points(lo, up, NP)
    return Bracket(lo, up, t0, t1, tl.where(br.done, br.tau, val), br.done | fin)


@triton.jit
def _kth_group_max(buf, args, NORM: tl.constexpr):
    """The k-th largest group maximum (buf keeps k of them, slots >= k at +inf): <= tau_k; -inf while a row
    has fewer than k groups with an allowed key."""
    return tl.min(buf, 1)


@triton.jit
def _kth_collected(srt, cnt, args):
    """The k-th largest of the collected scores (sorted descending)."""
    return pick_row(srt, tl.arange(0, srt.shape[1]).to(tl.float32)[None, :] == args.k - 1.0)


RULE = ThresholdRule(points=SELECT_POINTS, max_passes=MAX_PASSES, init=_init, zero=_zero, fold=_counts,
                     step=_step, bound=_kth_group_max, sorted=_kth_collected)


@triton.jit
def prepass(blk, keys, args, scr, BM: tl.constexpr, BN: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr):
    """tau2 [BM] (log2 units; -inf when the row has <= k allowed keys)."""
    if NORM.consts.MODE == MODE_ALL:
        tau = tl.full([BM], float("-inf"), tl.float32)
    elif NORM.consts.MODE == MODE_SELECT:
        tau, n = search(blk, keys, args, BM, BN, ST, NORM)
        tau = tl.where(n <= args.k, float("-inf"), tau)
    elif NORM.consts.MODE == MODE_COLLECT:
        buf = _empty_buffer(args.k, BM, NORM.consts.KP)
        tau, n, overflow = collect_search(buf, blk, keys, args, scr, BM, BN, ST, NORM)
        if overflow:                                   # some row collected too many: the exact buffer
            tau = _buffer_prepass(blk, keys, args, BM, BN, ST, NORM)
        tau = tl.where(n > args.k, tau, float("-inf"))
    else:
        tau = _buffer_prepass(blk, keys, args, BM, BN, ST, NORM)
    return tau


# ------------------------------------------------------------------ output pass and backward


@triton.jit
def keep(s, thr):
    """Scores of the kept keys (s >= tau_k), -inf elsewhere."""
    return tl.where(s >= thr[:, None], s, float("-inf"))


@triton.jit
def update(s, m_i, l_i, thr, MASKED: tl.constexpr):
    return online_update(keep(s, thr), m_i, l_i, True)


@triton.jit
def finalize(m_i, l_i, thr):
    return safe_inv(l_i), thr * LN2, lse_natural(m_i, l_i)


@triton.jit
def tile_live(s, thr):
    """Some score in the tile is kept."""
    return tl.max((s >= thr[:, None]).to(tl.int32)) > 0


@triton.jit
def bwd_rows(stat0, stat1, thr, g_sum):
    return thr, lse2_for_backward(stat1)


@triton.jit
def bwd_weights(s, w0, w1, MASKED: tl.constexpr):
    return tl.where(s >= w0[:, None], tl.exp2(s - w1[:, None]), 0.0)


HOOKS = make_hooks(
    name="topk",
    unit=float(LOG2E.value),
    n_stats=2,
    update=update,
    finalize=finalize,
    rescale=True,
    prepass=prepass,
    tile_live=tile_live,
    bwd_rows=bwd_rows,
    bwd_weights=bwd_weights,
    bwd_dscores=bwd_dscores,
    rule=RULE,
    live_floor=floor_identity,     # the block mask: s < tau_k has weight 0
)


def configure(normalizer, S: int):
    """(hooks, runtime args, scratch columns) of TopK(k) over S keys; the mode from k, S, COLLECT and
    SELECT_UP_TO_S."""
    k = int(normalizer.k)
    kp = max(2, next_pow2(k))
    if k >= S:
        consts = Consts(MODE_ALL.value, kp, 8, 0)
    elif k <= KMAX and (COLLECT or S > SELECT_UP_TO_S.get(kp, 0)):
        mode = MODE_COLLECT.value if COLLECT else MODE_BUFFER.value
        # under the interpreter a merge (numpy's bitonic sorts) costs far more than an insertion step: none by
        # default, at main's test time (the top-k grids' "merge" mode runs the GPU's rule, MERGE_AT[KP])
        slow_sort = INTERPRET_NO_MERGE and os.environ.get("TRITON_INTERPRET") == "1"
        merge_at = 1 << 30 if slow_sort else MERGE_AT[kp]
        consts = Consts(mode, kp, collect_group_size(S, 4 * k), 2 * kp, merge_at)          # about 4k groups
    else:
        consts = Consts(MODE_SELECT.value, kp, 8, 0)
    points = SELECT_SHORT_POINTS if k <= KMAX else SELECT_POINTS
    hooks = HOOKS._replace(consts=consts, rule=RULE._replace(points=points))
    return hooks, Args(float(k)), consts.KC if consts.MODE == MODE_COLLECT.value else 0
