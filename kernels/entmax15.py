"""1.5-entmax hooks and the threshold pre-pass.

Scores arrive as z = s_nat / 2 (score unit 1/2). With n allowed keys::

    p_j = max(z_j - tau, 0)^2,   tau such that F(tau) = sum_j max(z_j - tau, 0)^2 - 1 = 0,
    tau in [max z - 1, max z - n^(-1/2)]   (F(max z - 1) >= 0 >= F(max z - n^(-1/2)))

Pre-pass (scores only, no V), per row:

1. one pass: zmax, the second-largest z2 and n; bracket lo = the threshold of {zmax, z2} alone (F(lo) >= 0: F
   of a subset is at most F; zmax - 1 if z2 <= zmax - 1), hi = zmax - n^(-1/2).
2. passes at NP points t_0 < ... < t_{NP-1} in [t0, hi) (t0 = the Newton iterate): for each point the
   support moments c = #{z > t}, s1 = sum (z - t)_+, s2 = sum (z - t)_+^2 and zmin = min{z : z > t}.
   With a = the largest point where F(t_a) = s2 - 1 >= 0 (so t_a <= tau):
   * exact polish: if the support were {z > t_a}, tau solves c y^2 - 2 s1 y + (s2 - 1) = 0 (y = tau -
     t_a, the smaller root, y = (s2 - 1) / (s1 + sqrt(s1^2 - c (s2 - 1)))), which is tau - the mean
     minus sqrt(1/c - variance) form - computed relative to t_a for accuracy. The candidate r = t_a + y
     is the exact tau iff r < zmin_a (no z in (t_a, tau]); otherwise r >= tau is an upper bound. Taken
     only from a point with F(t_a) <= 1 (`threshold.POLISH_FMAX`: its fp32 error grows with F(t_a)).
   * Newton from t_a on G = sqrt(F + 1) - 1 (the 2-norm of (z - t)_+ minus 1: convex and decreasing, and
     linear in t for equal scores): t_a + (s2 - sqrt(s2)) / s1 <= tau (as (s2 - 1) r / ((r + 1) s1), r = sqrt(s2)),
     the next t0; after a polish that was not exact (r >= zmin_a) over a wide support (c >= MID_SUPPORT keys),
     the middle of [the iterate, up] instead (up <= r: close above tau).
   * bisection: tau lies in [t_a, t_{a+1}), so the bracket shrinks at least NP-fold per pass.
   * no feasible point (rounding put the Newton iterate above tau): the smaller root of the lowest point's
     support quadratic is a lower bound, the next point.
   The block repeats passes until every row is exact (or its bracket is a few ulps wide).
   Steps 1-2 are the bracket method of the threshold engine (`threshold.search`) with the rule `RULE`.
   COLLECT mode (``COLLECT = True``; experimental, off by default: exact and CPU-tested, not validated on
   a GPU): the engine's collect method instead (`threshold.collect_search`): pass 1 keeps each row's
   KP_GROUPS largest maxima of groups of keys; their own threshold (`sorted_threshold`) is a lower bound
   lb <= tau. Pass 2 stores every z >= lb in the row's scratch (128 slots), and tau is the
   sort-based threshold of those (support = the largest m with tau_m < z_(m)). A block in which a row
   collected more than 128 scores (a support wider than about 100 keys) runs steps 1-2 instead.
3. the output pass (tile loop): p = max(z - tau, 0)^2 (no exp, no rescale), out = acc / sum p, and
   key tiles with every z <= tau are skipped (no P @ V).

Stats: tau (units of z; +inf for empty rows). For the backward (when gradients are needed) the loop
also keeps G = sum_j g_j v_j and sum_j g_j with g = max(z - tau, 0), giving O2 = G / sum g and
sum_g = sum g / sqrt(sum p) (the sum of sqrt of the normalized p).

Backward (``kernels.backward``): with g = max(z - tau, 0) (= sqrt(p)) and the row term
delta = rowsum(dO * O2) = sum_j g_j dP_j / sum_j g_j, the gradient with respect to the natural score
s = 2 z is dS = g * (dP - delta): dp/dz = 2 (diag(g) - g g^T / sum g) and dz/ds = 1/2 cancel. w0 = tau
(the saved thr); the weights are not renormalized by sum p (1 to fp32 rounding: tau is exact).
"""

import triton
import triton.language as tl

from .threshold import (Bracket, ThresholdRule, configure_root, feasible_point, polish_near, root_hooks, sorted_bound,
                        support_fold, support_zero)
from .tiles import pick_row, safe_inv

#: upper bound on the refinement passes of one block (each shrinks the bracket at least NP-fold)
MAX_PASSES = 40
#: points evaluated per refinement pass (power of two). 1 (the Newton iterate alone) since issue 17 item 4: a
#: bracket pass costs 419 SASS per tile at D = 64 (779 at D = 128) against 745 (1429) at 2 points. With the start
#: from the two largest scores (`_init`) a query block takes as many passes as main's 2 points did (work counter,
#: L = S = 512: 6; the replay: 4 bracket passes at S = 512 and 1024, 5 at 8192 against 4-5): the pre-pass costs
#: 38 % fewer instructions per K tile (bench/TUNING.md, "Issue 17 item 4: entmax15 at one point per pass"). One
#: point had lost accuracy before `threshold.POLISH_FMAX`: the first pass polished from max z - 1, far below tau.
#: H100, bf16, 16k, main's rule: the whole forward took 34.0 ms with 2 points and 41.9 ms with 4 (softmax 5.2).
NPTS = 1
#: COLLECT mode: experimental, off by default. Exact and tested on the CPU (Triton's interpreter), but not
#: validated on a GPU: on the H100 (call C, bench/TUNING.md) the CUDA tests with it on compiled so slowly
#: that only 6 finished in 170 s (tl.sort over [BM, 128] tiles is the suspect). Set it to True to try it.
COLLECT = False
#: support count at t_a from which a pass whose polish was not exact goes on from the middle of [Newton iterate, upper
#: end] instead of the iterate (`_step`): replay (bench/replays/root_polish_rows.py, "Issue 17 item 4: the threshold
#: engine row by row" in bench/TUNING.md), 128-row block maxima at S = 90-8192: structured inputs 0.25-0.75 bracket
#: passes fewer, random 0-0.5, sparse and dense rows unchanged (at 8: sparse rows +0.25; at 32: smaller gains)
MID_SUPPORT: tl.constexpr = tl.constexpr(16.0)


# ------------------------------------------------------------------ the bracket rule (threshold engine)


@triton.jit
def _init(zmax, zmin, n, args, NP: tl.constexpr, z2):
    """tau in [lo, max z - n^(-1/2)] with lo = the threshold of the two largest scores alone (<= tau: F of a subset
    is at most F; max z - 1 when z2 <= max z - 1); exact (= max z - 1) for a row with one key."""
    ztop = tl.where(n == 0, 0.0, zmax)
    h = 0.5 * (ztop - tl.where(n >= 2.0, z2, ztop - 2.0))                # half the gap; >= 0.5: z2 is not in it
    lo = ztop - tl.where(h < 0.5, h + tl.sqrt(tl.maximum(0.5 - h * h, 0.0)), 1.0)          # F(lo) >= 0
    up = ztop - tl.rsqrt(tl.maximum(n, 1.0))            # F(up) <= 0: upper bound
    return Bracket(lo, up, lo, up, lo, n <= 1.0)


@triton.jit
def _step(br, t, acc, args):
    """With a = the largest point where F(t_a) = s2 - 1 >= 0 (so t_a <= tau): the exact polish on the
    support {z > t_a}, a Newton step from t_a, and the bracket shrunk to [t_a, t_{a+1})."""
    cnt, s1, s2, zmin = acc
    sel, found, t_a, t_b = feasible_point(s2 - 1.0, t, br)
    c_a = pick_row(cnt, sel)
    s1_a = pick_row(s1, sel)
    f_a = pick_row(s2, sel) - 1.0                                                         # F(t_a) >= 0
    zmin_a = pick_row(zmin, sel)
    # exact polish on the support {z > t_a}: smaller root of c y^2 - 2 s1 y + F(t_a) = 0
    disc = s1_a * s1_a - c_a * f_a
    r = t_a + f_a / tl.maximum(s1_a + tl.sqrt(tl.maximum(disc, 0.0)), 1e-30)
    has_r = found & (disc >= 0)
    exact = has_r & (r < zmin_a) & polish_near(f_a)                    # from a point close to tau only
    # Newton on G = sqrt(F + 1) - 1 (the 2-norm of (z - t)_+, convex and decreasing like F, linear in t for
    # equal scores): from below it never overshoots and takes fewer passes than Newton on F (a replay:
    # bench/replays/entmax15_bracket_passes.py --newton G)
    r1 = tl.sqrt(tl.maximum(f_a + 1.0, 1.0))                                              # G(t_a) + 1
    newton = t_a + f_a * r1 / ((r1 + 1.0) * tl.maximum(s1_a, 1e-30))                  # <= tau
    # no feasible point (all above tau): the same smaller root from the lowest point t_0, whose support {z > t_0} lies
    # inside tau's, is a lower bound (the support's quadratic Q <= F below t_0, so Q(tau) <= 0; tau itself unless a
    # key lies in (root, t_0]), computed without cancellation (F(t_0) < 0); it is the next point
    sel0 = tl.arange(0, t.shape[1])[None, :] == 0
    c_0 = pick_row(cnt, sel0)
    s1_0 = pick_row(s1, sel0)
    f_0 = pick_row(s2, sel0) - 1.0
    below = pick_row(t, sel0) + f_0 / tl.maximum(s1_0 + tl.sqrt(tl.maximum(s1_0 * s1_0 - c_0 * f_0, 0.0)), 1e-30)
    lo = tl.where(found, tl.maximum(br.lo, t_a), tl.maximum(br.lo, below))
    up = tl.where(found, tl.minimum(br.up, t_b), tl.minimum(br.up, br.t0))
    up = tl.where(has_r, tl.minimum(up, r), up)
    up = tl.maximum(up, lo)
    # a polish that was not exact (r >= zmin_a: keys lie in (t_a, tau]) over a wide support put the upper end r close
    # above tau, while Newton creeps up on tau under those keys: the next point is the middle of [newton, up]. If it
    # lands above tau, the root below it (a lower bound) is the next. Only the point moves: exactness is unchanged
    mid = has_r & (r >= zmin_a) & (c_a >= MID_SUPPORT)
    t0 = tl.where(found, tl.minimum(tl.maximum(tl.where(mid, newton + 0.5 * (up - newton), newton), lo), up), lo)
    narrow = (up - lo) <= 2.4e-7 * tl.maximum(tl.abs(lo), 1.0)
    tau = tl.where(br.done, br.tau, tl.where(exact, r, lo))
    done = br.done | exact | narrow | ~(up - lo >= 0)      # (the last: NaN scores)
    return Bracket(lo, up, t0, up, tau, done)


@triton.jit
def sorted_threshold(srt, cnt, args):
    """The exact 1.5-entmax threshold (z units) of each row's values srt [BM, C], sorted in descending
    order, -inf past cnt [BM] (int32); +inf for an empty row. With prefix sums S1_m, S2_m of the m
    largest values (relative to the largest, for accuracy), tau_m = (S1_m - sqrt(S1_m^2 - m (S2_m - 1)))
    / m solves sum_{i <= m} (z_i - tau)^2 = 1, and the support size is the largest m with tau_m < z_m."""
    C: tl.constexpr = srt.shape[1]
    idx = tl.arange(0, C)
    top = tl.max(srt, 1)                                                                 # [BM]
    ok = idx[None, :] < cnt[:, None]
    w = tl.where(ok, srt - tl.where(cnt > 0, top, 0.0)[:, None], 0.0)                    # <= 0
    s1 = tl.cumsum(w, 1)
    s2 = tl.cumsum(w * w, 1)
    m = (idx + 1).to(tl.float32)[None, :]
    tau_m = (s1 - tl.sqrt(tl.maximum(s1 * s1 - m * (s2 - 1.0), 0.0))) / m
    msz = tl.max(tl.where(ok & (tau_m < w), idx[None, :] + 1, 0), 1)                     # support size
    tau_w = pick_row(tau_m, idx[None, :] == (msz - 1)[:, None])
    return tl.where(cnt > 0, top + tau_w, float("inf"))


RULE = ThresholdRule(points=NPTS, max_passes=MAX_PASSES, init=_init, zero=support_zero, fold=support_fold,
                     step=_step, bound=sorted_bound, sorted=sorted_threshold, squares=True, second=True)


# ------------------------------------------------------------------ output pass and backward


@triton.jit
def update(s, m_i, l_i, thr, MASKED: tl.constexpr):
    g = tl.maximum(s - thr[:, None], 0.0)       # [BM, BN]; -inf scores and +inf tau give 0
    p = g * g
    return p, l_i, m_i, l_i + tl.sum(p, 1)


@triton.jit
def g_weights(s, thr):
    return tl.maximum(s - thr[:, None], 0.0)


@triton.jit
def g_finalize(l_i, l_g):
    """(1 / sum g, sum_g) with g the square root of the normalized weights: sum g / sqrt(sum p)."""
    return safe_inv(l_g), l_g * tl.where(l_i > 0, tl.rsqrt(tl.where(l_i > 0, l_i, 1.0)), 0.0)


@triton.jit
def bwd_weights(s, w0, w1, MASKED: tl.constexpr):
    g = tl.maximum(s - w0[:, None], 0.0)        # [BM, BN]; -inf scores and +inf tau give 0
    return g * g


@triton.jit
def bwd_dscores(p, s, dp, delta, w0, w1):
    """dS = g * (dP - delta), g = max(z - tau, 0), delta = rowsum(dO * O2)."""
    return tl.maximum(s - w0[:, None], 0.0) * (dp - delta[:, None])


HOOKS = root_hooks(name="entmax15", unit=0.5, rule=RULE, update=update, g_weights=g_weights, g_finalize=g_finalize,
                   bwd_weights=bwd_weights, bwd_dscores=bwd_dscores)


def configure(normalizer, S: int):
    """(hooks, runtime args, scratch columns) of a call over S keys: the module knobs NPTS and COLLECT."""
    return configure_root(HOOKS, S, collect=COLLECT, points=NPTS)
