"""Sparsemax hooks: the threshold pre-pass rule, the output pass and the backward rule.

Scores arrive in natural units (score unit 1). With n allowed keys::

    p_j = max(s_j - tau, 0),   tau such that F(tau) = sum_j max(s_j - tau, 0) - 1 = 0,
    tau in [max s - 1, max s - 1/n]   (F(max s - 1) >= 0 >= F(max s - 1/n))

Pre-pass: the threshold engine's `threshold.root_prepass` with the rule `RULE`. The range pass also keeps each
row's second-largest score s2 (``second``): the first point is the threshold of {max s, s2} alone,
max(max s - 1, (max s + s2 - 1) / 2), a lower bound (F of a subset of the scores is at most F). Per pass, at NP points t
the support count c = #{s > t}, s1 = sum (s - t)_+ and the smallest s above t; with a = the largest point
where F(t_a) = s1 - 1 >= 0 (so t_a <= tau):

* exact polish: if the support were {s > t_a}, tau = t_a + (s1 - 1) / c; that candidate r is exact iff
  r < min{s > t_a} (no score in (t_a, r]). F is convex and piecewise linear, so r is the Newton step from
  t_a and always a lower bound of tau: the next pass starts there. Taken (and r kept as the bracket's lower end)
  only from a point with F(t_a) <= 1 (`threshold.POLISH_FMAX`): from a far point (a dense row's max s - 1, F about
  the number of keys) r is off by about eps F(t_a) / c, sum p by eps F(t_a).
* bisection: tau lies in [t_a, t_{a+1}), so the bracket shrinks at least NP-fold per pass.
* no feasible point (rounding put every point above tau): the Newton step from the lowest point t_0 is a lower
  bound (F convex), the next point.

Collect method (``COLLECT``, experimental as for entmax15): the group maxima's own threshold is a lower
bound (F of a subset of the scores is at most F of all of them); tau is then the sort-based rule over the
collected scores (`sorted_threshold`).

Output pass: p = max(s - tau, 0) (no exp, no rescale), out = acc / sum p (an exact simplex), key tiles with
every s <= tau skipped. Stats: tau (+inf for empty rows).

Backward: w0 = tau (the saved thr); with the support indicator m = [s > tau] and the row term
delta = rowsum(dO * O2), O2 = sum_j m_j v_j / |K| (the second weighted sum with g = m),
dS = m * (dP - delta).
"""

import triton
import triton.language as tl

from .threshold import (Bracket, ThresholdRule, configure_root, feasible_point, polish_near, root_hooks, sorted_bound,
                        support_fold, support_zero)
from .tiles import pick_row, safe_inv

MAX_PASSES = 40
#: points per pass: 1, the Newton iterate alone (as entmax15's NPTS: sm_90 SASS per pre-pass tile 661 -> 377
#: at D = 64, 1268 -> 705 at D = 128, for 5.25 bracket passes per block instead of 4 at L = S = 512)
NPTS = 1
COLLECT = False


@triton.jit
def _init(smax, smin, n, args, NP: tl.constexpr, s2nd):
    """tau in [lo, max s - 1/n] with lo = the threshold of the two largest scores alone (<= tau: F of a subset is at
    most F), max(max s - 1, (max s + s2nd - 1) / 2); exact (= max s - 1) for a row with one key."""
    top = tl.where(n == 0, 0.0, smax)
    lo = tl.maximum(top - 1.0, 0.5 * (top + s2nd) - 0.5)            # s2nd = -inf without a second score
    up = top - 1.0 / tl.maximum(n, 1.0)
    return Bracket(lo, up, lo, up, lo, n <= 1.0)


@triton.jit
def _step(br, t, acc, args):
    """Polish at the largest point with F >= 0 (exact, or the Newton lower bound), and the bracket
    shrunk to [t_a, t_{a+1}); without a feasible point, the Newton step from the lowest one (a lower bound)."""
    cnt, s1, s2, smin = acc
    sel, found, t_a, t_b = feasible_point(s1 - 1.0, t, br)
    c_a = pick_row(cnt, sel)
    f_a = pick_row(s1, sel) - 1.0                                                         # F(t_a) >= 0
    smin_a = pick_row(smin, sel)
    r = t_a + f_a / tl.maximum(c_a, 1.0)                    # <= tau; exact when no score lies in (t_a, r]
    near = polish_near(f_a)                                 # (from a far point r is off by eps F(t_a) / c_a)
    exact = found & (r < smin_a) & near
    # no feasible point (rounding put every point above tau): F is convex, so the Newton step from the lowest
    # point t_0 (F(t_0) < 0) is a lower bound, computed from small sums (no far-point rounding); the next point
    sel0 = tl.arange(0, t.shape[1])[None, :] == 0
    below = pick_row(t, sel0) + (pick_row(s1, sel0) - 1.0) / tl.maximum(pick_row(cnt, sel0), 1.0)
    lo = tl.where(found, tl.maximum(br.lo, tl.where(near, tl.maximum(t_a, r), t_a)), tl.maximum(br.lo, below))
    up = tl.where(found, tl.minimum(br.up, t_b), tl.minimum(br.up, br.t0))
    up = tl.maximum(up, lo)
    t0 = tl.where(found, tl.minimum(tl.maximum(r, lo), up), lo)
    narrow = (up - lo) <= 2.4e-7 * tl.maximum(tl.abs(lo), 1.0)
    tau = tl.where(br.done, br.tau, tl.where(exact, r, lo))
    done = br.done | exact | narrow | ~(up - lo >= 0)      # (the last: NaN scores)
    return Bracket(lo, up, t0, up, tau, done)


@triton.jit
def sorted_threshold(srt, cnt, args):
    """The exact sparsemax threshold of each row's values srt [BM, C], sorted in descending order, -inf past
    cnt [BM] (int32); +inf for an empty row: tau_m = (S1_m - 1) / m over the m largest (relative to the
    largest), the support is the largest m with tau_m < s_m."""
    C: tl.constexpr = srt.shape[1]
    idx = tl.arange(0, C)
    top = tl.max(srt, 1)                                                                 # [BM]
    ok = idx[None, :] < cnt[:, None]
    w = tl.where(ok, srt - tl.where(cnt > 0, top, 0.0)[:, None], 0.0)                    # <= 0
    m = (idx + 1).to(tl.float32)[None, :]
    tau_m = (tl.cumsum(w, 1) - 1.0) / m
    msz = tl.max(tl.where(ok & (tau_m < w), idx[None, :] + 1, 0), 1)                     # support size
    tau_w = pick_row(tau_m, idx[None, :] == (msz - 1)[:, None])
    return tl.where(cnt > 0, top + tau_w, float("inf"))


RULE = ThresholdRule(points=NPTS, max_passes=MAX_PASSES, init=_init, zero=support_zero, fold=support_fold,
                     step=_step, bound=sorted_bound, sorted=sorted_threshold, second=True)


@triton.jit
def update(s, m_i, l_i, thr, MASKED: tl.constexpr):
    p = tl.maximum(s - thr[:, None], 0.0)       # [BM, BN]; -inf scores and +inf tau give 0
    return p, l_i, m_i, l_i + tl.sum(p, 1)


@triton.jit
def g_weights(s, thr):
    """g = the support indicator: O2 = sum_j m_j v_j / |K| is the mean of v over the support."""
    return (s > thr[:, None]).to(tl.float32)


@triton.jit
def g_finalize(l_i, l_g):
    return safe_inv(l_g), l_g


@triton.jit
def bwd_weights(s, w0, w1, MASKED: tl.constexpr):
    return tl.maximum(s - w0[:, None], 0.0)     # normalized: tau is exact (sum p = 1 to fp32 rounding)


@triton.jit
def bwd_dscores(p, s, dp, delta, w0, w1):
    """dS = m * (dP - delta), m = [s > tau], delta = rowsum(dO * O2) = mean of dP over the support."""
    return tl.where(s > w0[:, None], dp - delta[:, None], 0.0)


HOOKS = root_hooks(name="sparsemax", unit=1.0, rule=RULE, update=update, g_weights=g_weights, g_finalize=g_finalize,
                   bwd_weights=bwd_weights, bwd_dscores=bwd_dscores)


def configure(normalizer, S: int):
    """(hooks, runtime args, scratch columns) of a call over S keys: the module knobs NPTS and COLLECT."""
    return configure_root(HOOKS, S, collect=COLLECT, points=NPTS)
