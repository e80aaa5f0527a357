"""The threshold engine of the sparse normalizers: exact per-row thresholds from score passes only (no V).

A sparse normalizer's weights are zero below a per-row threshold tau (entmax15, sparsemax: the root of a
decreasing function F of tau; top-k: the k-th largest score). Its pre-pass finds tau exactly, streaming
the key tiles of its query block (``tiles.fold_keys``) without ever storing a score row. Two methods:

**bracket** (`search`, the default): one pass for each row's max, min and count of allowed scores, then
passes at NP points ``t0 + (t1 - t0) * a / NP`` (a = 0..NP-1) per row that accumulate the normalizer's
statistics at each point (support count and moments), after which the normalizer's step narrows the
bracket [lo, up] around tau, takes a Newton step, or polishes exactly (tau from the statistics of a point
whose support is already tau's; the F-root rules only from a point where F <= `POLISH_FMAX`, `polish_near`).
Passes repeat until every row of the block is done (at most ``max_passes``). The normalizer supplies the rule
(`ThresholdRule`, carried in its `Hooks` as ``NORM.rule``)::

    init(smax, smin, n, args, NP) -> Bracket  the first bracket from the row's range and count (with
                                              ``second``, one more argument: the row's second-largest score)
    zero(t) -> acc                            the statistics' zeros at the points t [BM, NP] (a tuple)
    fold(acc, s, start_n, t, BN, ST, NORM, MASKED) -> acc     a `tiles.fold_keys` fold: one tile's statistics
    step(br, t, acc, args) -> Bracket         the next bracket (and tau where the row is done)

**collect** (`collect_search`, experimental, off by default: exact and tested on the CPU, not validated on
a GPU): two passes without a data-dependent loop. Pass 1 keeps each row's largest maxima of groups of GS
consecutive keys (`top_group_max`); the normalizer's ``bound(buf, args, NORM)`` turns them into a lower bound lb
<= tau. Pass 2 stores every allowed score >= lb in the row's scratch (`collect_above`, KC slots), and the
normalizer's ``sorted(srt, cnt, args)`` computes tau exactly from those, sorted. A block in which some row
collected more than KC scores reports overflow; the caller then runs `search`.
"""

from typing import Any, NamedTuple, Optional

import triton
import triton.language as tl

from .blockmask import floor_identity, marking_fold, row_floor
from .contract import NoArgs, make_hooks, next_pow2
from .tiles import count_allowed, fold_keys, pick_row, safe_inv


class Bracket(NamedTuple):
    """Per-row [BM] search state: tau in [lo, up]; the next pass's points run from t0 towards t1; tau is
    the answer where done."""

    lo: Any
    up: Any
    t0: Any
    t1: Any
    tau: Any
    done: Any


class ThresholdRule(NamedTuple):
    """A sparse normalizer's rule for the engine (see the module docstring); ``bound`` and ``sorted`` only
    for the collect method. ``squares``: `support_fold` also sums (z - t)_+^2."""

    points: int
    max_passes: int
    init: Any
    zero: Any
    fold: Any
    step: Any
    bound: Optional[Any] = None
    sorted: Optional[Any] = None
    squares: bool = False
    fold_args: bool = False     # `fold` gets the context (t, args) instead of t (a rule with runtime arguments)
    second: bool = False        # the range pass also keeps each row's second-largest score: `init` gets it last


class RootConsts(NamedTuple):
    """``NORM.consts`` of a normalizer whose threshold is the root of a decreasing F (`root_prepass`)."""

    COLLECT: bool   # the collect method (else the bracket method)
    GS: int         # keys per group of the collect method's first pass
    KC: int         # scratch slots per row of the collect method


# ---------------------------------------------------------------------------------------------------
# the bracket method


@triton.jit
def _range_fold(state, s, start_n, ctx, BN: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr,
                MASKED: tl.constexpr):
    smax, smin, n = state
    smax = tl.maximum(smax, tl.max(s, 1))
    if MASKED:
        smin = tl.minimum(smin, tl.min(tl.where(s > float("-inf"), s, float("inf")), 1))
    else:
        smin = tl.minimum(smin, tl.min(s, 1))
    n = count_allowed(n, s, BN, MASKED)
    return smax, smin, n


@triton.jit
def row_range(blk, keys, BM: tl.constexpr, BN: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr):
    """(max, min, count) of each row's allowed scores [BM] (-inf, +inf, 0 for a row without one)."""
    state = (tl.full([BM], float("-inf"), tl.float32), tl.full([BM], float("inf"), tl.float32),
             tl.zeros([BM], tl.float32))
    return fold_keys(state, _range_fold, 0, blk, keys, BN, ST, NORM)


@triton.jit
def _second_fold(state, s, start_n, ctx, BN: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr,
                 MASKED: tl.constexpr):
    """`_range_fold` and the row's second-largest score (the largest below the max: a tied max counts once, so it
    may be lower than the second largest of the multiset; -inf without one)."""
    smax, smin, n, snd = state
    m = tl.max(s, 1)
    snd = tl.maximum(tl.maximum(snd, tl.max(tl.where(s < m[:, None], s, float("-inf")), 1)), tl.minimum(smax, m))
    smax, smin, n = _range_fold((smax, smin, n), s, start_n, ctx, BN, ST, NORM, MASKED)
    return smax, smin, n, snd


@triton.jit
def search(blk, keys, args, BM: tl.constexpr, BN: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr):
    """(tau [BM], n [BM]) by the bracket method with the rule NORM.rule; n counts each row's allowed keys."""
    if NORM.rule.second:
        ninf = tl.full([BM], float("-inf"), tl.float32)
        smax, smin, n, snd = fold_keys((ninf, tl.full([BM], float("inf"), tl.float32), tl.zeros([BM], tl.float32),
                                        ninf), _second_fold, 0, blk, keys, BN, ST, NORM)
        br = NORM.rule.init(smax, smin, n, args, NORM.rule.points, snd)
    else:
        smax, smin, n = row_range(blk, keys, BM, BN, ST, NORM)
        br = NORM.rule.init(smax, smin, n, args, NORM.rule.points)
    frac = tl.arange(0, NORM.rule.points).to(tl.float32) / NORM.rule.points                  # [NP]
    passes = tl.full([], 0, tl.int32)
    while (tl.max(tl.where(br.done, 0, 1)) > 0) & (passes < NORM.rule.max_passes):
        t = br.t0[:, None] + (br.t1 - br.t0)[:, None] * frac[None, :]                    # [BM, NP]
        if ST.BLOCK_MASK:
            if passes == 0:                            # the first bracket pass also marks the block mask, against
                acc = fold_keys(NORM.rule.zero(t), marking_fold, (_rule_ctx(t, args, NORM), keys.live,   # lo <= tau
                                row_floor(_with_param(br.lo, args, NORM), blk.offs_m, keys.L, NORM), keys.S),
                                blk, keys, BN, ST, NORM)
            else:
                acc = fold_keys(NORM.rule.zero(t), NORM.rule.fold, _rule_ctx(t, args, NORM), blk, keys, BN, ST, NORM)
        elif NORM.rule.fold_args:
            acc = fold_keys(NORM.rule.zero(t), NORM.rule.fold, (t, args), blk, keys, BN, ST, NORM)
        else:
            acc = fold_keys(NORM.rule.zero(t), NORM.rule.fold, t, blk, keys, BN, ST, NORM)
        br = NORM.rule.step(br, t, acc, args)
        passes += 1
    return br.tau, n


@triton.jit
def _rule_ctx(t, args, NORM: tl.constexpr):
    """The context of NORM.rule.fold: (t, args) with ``fold_args``, else t."""
    if NORM.rule.fold_args:
        return (t, args)
    else:
        return t


@triton.jit
def _with_param(x, args, NORM: tl.constexpr):
    """x [BM] as the hooks take a threshold: (x, hp) with NORM.head_param (the pre-pass gets args = (args, hp))."""
    if NORM.head_param:
        return (x, args[1])
    else:
        return x


@triton.jit
def point_columns(acc_col, x, sel):
    """acc_col [BM, NP] plus the row values x [BM] in the column picked by sel [1, NP] (one point)."""
    return acc_col + tl.where(sel, x[:, None], 0.0)


# ---------------------------------------------------------------------------------------------------
# the statistics of the F-root normalizers (entmax, sparsemax): support moments at each point


@triton.jit
def support_zero(t):
    """Zeros of `support_fold`'s statistics at the points t [BM, NP]."""
    return (tl.zeros(t.shape, tl.float32), tl.zeros(t.shape, tl.float32), tl.zeros(t.shape, tl.float32),
            tl.full(t.shape, float("inf"), tl.float32))


@triton.jit
def support_fold(acc, z, start_n, t, BN: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr,
                 MASKED: tl.constexpr):
    """Support moments at the points t [BM, NP]: count, sum (and, with NORM.rule.squares, sum of squares)
    of (z - t)_+ over the keys above t, and the smallest z above t."""
    cnt, s1, s2, zmin = acc
    NP: tl.constexpr = t.shape[1]
    cols = tl.arange(0, NP)
    for pt in tl.static_range(NP):                     # one [BM, BN] pass per point (no 3-D tensor)
        sel = cols[None, :] == pt                                                        # [1, NP]
        d = z - pick_row(t, sel)[:, None]                                                # [BM, BN]
        pos = d > 0
        dp = tl.where(pos, d, 0.0)
        cnt = point_columns(cnt, tl.sum(pos.to(tl.float32), 1), sel)                     # [BM, NP]
        s1 = point_columns(s1, tl.sum(dp, 1), sel)
        if NORM.rule.squares:
            s2 = point_columns(s2, tl.sum(dp * dp, 1), sel)
        zmin = tl.minimum(zmin, tl.where(sel, tl.min(tl.where(pos, z, float("inf")), 1)[:, None], float("inf")))
    return cnt, s1, s2, zmin


@triton.jit
def feasible_point(f, t, br):
    """The largest point a with F(t_a) = f[:, a] >= 0 (so t_a <= tau) for the values F f [BM, NP] at the
    points t: (sel [BM, NP] its one-hot column, found [BM] (False if rounding put every point above tau),
    t_a, t_b = the next point, or the bracket's upper end after the last)."""
    NP: tl.constexpr = t.shape[1]
    idx = tl.arange(0, NP)
    a = tl.max(tl.where(f >= 0.0, idx[None, :], -1), 1)                                # [BM]
    sel = idx[None, :] == a[:, None]
    t_b = pick_row(t, idx[None, :] == (a + 1)[:, None]) + tl.where(a + 1 >= NP, br.up, 0.0)
    return sel, a >= 0, pick_row(t, sel), t_b


#: the exact polish (tau from the statistics of a point t_a whose support is already tau's) is taken only from a point
#: with F(t_a) <= POLISH_FMAX (`polish_near`). Its fp32 error grows with F(t_a): the statistics (sums of (z - t_a)_+
#: over the support) round to a few ulps of their size, about F(t_a) + 1, and entmax15's discriminant also cancels.
#: In a dense row the first point lies far below tau (F ~ the number of keys): sparsemax's polish from there missed
#: sum p = 1 by 5.8e-5 at 512 keys and 2.9e-3 at 8192, entmax15's by 1.2e-5 at 90 (bench/TUNING.md, "Issue 17 item 4:
#: the threshold engine row by row"). A refused row goes on from the Newton iterate, close below tau.
POLISH_FMAX: tl.constexpr = tl.constexpr(1.0)


@triton.jit
def polish_near(f_a):
    """Whether the exact polish may be taken from a point where F = f_a [BM] (`POLISH_FMAX`)."""
    return f_a <= POLISH_FMAX


@triton.jit
def finalize_tau(m_i, l_i, thr):
    """The finalize hook of a normalizer whose one statistic is its threshold: out = acc / sum p, stat tau."""
    return safe_inv(l_i), thr, thr


@triton.jit
def live_above(s, thr):
    """The tile_live hook of the F-root normalizers: some score of the tile lies above its row's tau."""
    return tl.max(s - thr[:, None]) > 0


@triton.jit
def bwd_rows_tau(stat0, stat1, thr, g_sum):
    """The bwd_rows hook of a normalizer whose weights are a function of s - tau: (w0, w1) = (tau, tau)."""
    return thr, thr


@triton.jit
def sorted_bound(buf, args, NORM: tl.constexpr):
    """The collect method's bound for an F-root normalizer: the threshold (NORM.rule.sorted) of the row's
    largest group maxima alone, <= tau (F of the whole row is at least F of any subset of its scores); 0 for
    a row without an allowed key (nothing is collected)."""
    n_groups = tl.sum((buf > float("-inf")).to(tl.int32), 1)
    lb = NORM.rule.sorted(tl.sort(buf, 1, descending=True), n_groups, args)
    return tl.where(n_groups > 0, lb, 0.0)


#: group maxima kept per row by the collect method of `root_prepass`
KP_GROUPS: tl.constexpr = tl.constexpr(64)


@triton.jit
def root_prepass(blk, keys, args, scr, BM: tl.constexpr, BN: tl.constexpr, ST: tl.constexpr,
                 NORM: tl.constexpr):
    """The pre-pass hook of a normalizer whose tau is the root of a decreasing F (entmax, sparsemax): tau
    [BM] by the collect method when NORM.consts.COLLECT (the bracket method when a row overflows), else by
    the bracket method; +inf for rows with no allowed key."""
    if NORM.consts.COLLECT:
        buf = tl.full([BM, KP_GROUPS], float("-inf"), tl.float32)
        tau, n, overflow = collect_search(buf, blk, keys, args, scr, BM, BN, ST, NORM)
        if overflow:                                   # a row's support is too wide: the bracket passes
            tau, n = search(blk, keys, args, BM, BN, ST, NORM)
    else:
        tau, n = search(blk, keys, args, BM, BN, ST, NORM)
    return tl.where(n == 0, float("inf"), tau)


def root_hooks(*, name: str, unit: float, rule: ThresholdRule, update, g_weights, g_finalize, bwd_weights,
               bwd_dscores):
    """The `contract.Hooks` of an F-root normalizer (one statistic, its threshold tau): the pre-pass
    `root_prepass`, `finalize_tau`, `live_above`, `bwd_rows_tau` and the block mask's floor tau itself
    (`blockmask.floor_identity`), with the normalizer's own weights. At a given
    global threshold (``Static.GIVEN_THR``) the weights are final (``given_final``: no 1/l)."""
    return make_hooks(name=name, unit=unit, n_stats=1, update=update, finalize=finalize_tau, prepass=root_prepass,
                      tile_live=live_above, g_weights=g_weights, g_finalize=g_finalize, bwd_rows=bwd_rows_tau,
                      bwd_weights=bwd_weights, bwd_dscores=bwd_dscores, rule=rule, given_final=True,
                      live_floor=floor_identity)


def configure_root(hooks, S: int, *, collect: bool, points: int, kc: int = 128):
    """(hooks, runtime args, scratch columns) for `root_prepass`: the collect method's group size (about
    4 KP_GROUPS groups per row) and scratch, and the bracket method's points per pass."""
    gs = collect_group_size(S, 4 * int(KP_GROUPS.value))
    hooks = hooks._replace(consts=RootConsts(bool(collect), gs, kc), rule=hooks.rule._replace(points=points))
    return hooks, NoArgs(), kc if collect else 0


# ---------------------------------------------------------------------------------------------------
# the collect method: the largest group maxima, and collecting the scores above a bound


def collect_group_size(S: int, groups: int) -> int:
    """Keys per group (a power of two in [8, 256]) that gives a row of S keys about ``groups`` groups, for
    `top_group_max` (at least one group per tile once it reaches the tile size)."""
    return max(8, min(256, next_pow2(max(1, S // groups))))


@triton.jit
def _group_max_fold(state, s, start_n, ctx, BN: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr,
                    MASKED: tl.constexpr):
    """Merge one tile into buf [BM, KP]: the KP largest maxima of groups of GS = NORM.consts.GS keys seen so
    far, per row. Branch-free: BN // GS replacement steps per tile, none data dependent."""
    buf, n = state
    BM: tl.constexpr = buf.shape[0]
    G: tl.constexpr = BN // NORM.consts.GS if BN > NORM.consts.GS else 1
    slots = tl.arange(0, buf.shape[1])
    n = count_allowed(n, s, BN, MASKED)
    if G == 1:
        x = tl.max(s, 1)                                                                 # [BM]
        low, slot = tl.min(buf, 1, return_indices=True)
        buf = tl.where((slots[None, :] == slot[:, None]) & (x > low)[:, None], x[:, None], buf)
    else:
        gm = tl.max(tl.reshape(s, [BM, G, BN // G]), 2)                                  # [BM, G]
        cols = tl.arange(0, G)
        for g in tl.static_range(G):
            x = tl.max(tl.where(cols[None, :] == g, gm, float("-inf")), 1)              # [BM]
            low, slot = tl.min(buf, 1, return_indices=True)
            buf = tl.where((slots[None, :] == slot[:, None]) & (x > low)[:, None], x[:, None], buf)
    return buf, n


@triton.jit
def top_group_max(buf, blk, keys, BM: tl.constexpr, BN: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr):
    """(buf [BM, KP], n [BM]): the KP largest group maxima of each row (empty slots -inf; slots set to +inf
    never leave: a caller keeping k < KP maxima starts them at +inf) and its allowed-key count.

    The group maxima are distinct scores of the row, so the k-th largest of them is a LOWER bound of the
    row's k-th largest score, and any bound computed from them alone (e.g. entmax15's threshold of the
    maxima) holds for the whole row."""
    return fold_keys((buf, tl.zeros([BM], tl.float32)), _group_max_fold, 0, blk, keys, BN, ST, NORM)


@triton.jit
def _collect_fold(state, s, start_n, ctx, BN: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr,
                  MASKED: tl.constexpr):
    cnt = state
    lb, scr = ctx
    take = s >= lb[:, None]
    if MASKED:
        take = take & (s > float("-inf"))
    ti = take.to(tl.int32)
    pos = cnt[:, None] + tl.cumsum(ti, 1) - 1                                          # [BM, BN]
    tl.store(scr + pos, s, mask=take & (pos < NORM.consts.KC))
    return cnt + tl.sum(ti, 1)


@triton.jit
def collect_search(buf, blk, keys, args, scr, BM: tl.constexpr, BN: tl.constexpr, ST: tl.constexpr,
                   NORM: tl.constexpr):
    """(tau [BM], n [BM], overflow): the collect method (module docstring) with the rule NORM.rule, starting
    from the group-maxima buffer buf [BM, KP]; scr [BM, 1] points at each row's KC = NORM.consts.KC scratch
    slots. The stored values are the scores exactly as the output pass recomputes them (same tile shape),
    so a threshold picked among them compares exactly. overflow: some row collected more than KC scores
    (tau is then not valid; run `search`)."""
    buf, n = top_group_max(buf, blk, keys, BM, BN, ST, NORM)
    lb = NORM.rule.bound(buf, args, NORM)                                               # [BM]
    cnt = fold_keys(tl.zeros([BM], tl.int32), _collect_fold, (lb, scr), blk, keys, BN, ST, NORM)
    tl.debug_barrier()                             # other threads of the program stored the scores
    slots = tl.arange(0, NORM.consts.KC)
    vals = tl.load(scr + slots[None, :], mask=slots[None, :] < cnt[:, None], other=float("-inf"))
    srt = tl.sort(vals, 1, descending=True)                                             # [BM, KC]
    tau = NORM.rule.sorted(srt, cnt, args)
    return tau, n, tl.max((cnt > NORM.consts.KC).to(tl.int32)) > 0


__all__ = ["Bracket", "ThresholdRule", "RootConsts", "row_range", "search", "point_columns", "support_zero",
           "support_fold", "root_prepass", "configure_root", "collect_group_size", "top_group_max",
           "collect_search"]
