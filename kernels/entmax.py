"""alpha-entmax hooks (1 < alpha <= 2, a float or one alpha per query head) and the threshold pre-pass rule.

Scores arrive in natural units (score unit 1). The head parameter (`contract.Hooks.head_param`) is
``a = alpha - 1`` of the program's query head, so every hook gets ``thr = (tau, a)`` ([BM] each) and the
pre-pass ``args = (NoArgs, a)``. With ``x = a s``, ``e = 1/a`` and n allowed keys::

    p_j = max(x_j - tau, 0)^e,   tau such that F(tau) = sum_j max(x_j - tau, 0)^e - 1 = 0,
    tau in [max x - 1, max x - n^(-a)]   (F(max x - 1) >= 0 >= F(max x - n^(-a)))

``d^e`` is ``exp2(e log2 d)`` for d > 0 and 0 otherwise (x = -inf and tau = +inf give 0).

Pre-pass: the threshold engine's bracket method (`threshold.search` via `threshold.root_prepass`) with the
rule `RULE` (``fold_args``: the fold needs a). The first pass's NP = 2 points are the bracket's lower end and
midpoint; per pass, at each point t: the support count, ``s1 = sum (x - t)_+^e``, ``s2 = sum (x - t)_+^(e-1)``,
and the smallest x above t. With t_a = the largest point where F(t_a) = s1 - 1 >= 0 (so t_a <= tau):

* Newton from t_a on ``G = (F + 1)^a - 1`` (the e-norm of (x - t)_+ minus 1: convex and decreasing, and
  linear in t for equal scores): ``t_a + s1 (1 - s1^-a) / s2`` <= tau (Newton from below never overshoots,
  so the iterates rise monotonically to tau); the bracket becomes [t_a, the first infeasible point).
* the next pass's two points straddle the Newton iterate, ``newton -+ 4 res`` (res = fp32 resolution,
  ``2.4e-7 max(|t_a|, 1)``): while Newton is still converging both are feasible and the upper one is the
  next t_a; once it has converged (to within rounding, on either side of the root) one pass closes the
  bracket to 8 res. A pass with no feasible point (rounding) bisects the bracket instead.
* done: when the Newton step is below res or the bracket below 10 res; tau = that final Newton iterate (for
  a general alpha there is no closed form on the support as for entmax15 and sparsemax: the last Newton
  step, at fp32 precision, is the polish). 3-5 passes per block of 16 rows in a float32 replay
  (bench/replays/entmax_alpha_newton.py), against 10-20 for Newton on F with bisection points.

Output pass (tile loop): p = (x - tau)_+^e, out = acc / sum p (an exact simplex), key tiles with every
x <= tau skipped. For the backward the loop also keeps ``O2 = sum_j u_j v_j / sum_j u_j`` with
``u = (x - tau)_+^(e-1) = p^(2 - alpha)``. Stats: tau (x units; +inf for empty rows).

Backward: (w0, w1) = (tau, a); dS = u (dP - delta) with delta = rowsum(dO * O2) = sum u dP / sum u, the
derivative with respect to s itself (e of dp/dx and a of dx/ds cancel; alpha = 1.5 gives entmax15's rule).
The weights are not renormalized by sum p there (1 to fp32 rounding).

``entmax:1.5`` and ``entmax:2`` never reach these kernels: they parse to entmax15 and sparsemax.
"""

import triton
import triton.language as tl

from .contract import make_hooks
from .threshold import (Bracket, ThresholdRule, configure_root, feasible_point, point_columns, root_prepass,
                        support_zero)
from .tiles import pick_row, safe_inv

MAX_PASSES = 60
NPTS = 2


@triton.jit
def _pow(d, e):
    """max(d, 0)^e for e >= 1 ([BM, BN] d, e broadcastable): exp2(e log2 d) above 0, else 0."""
    pos = d > 0
    return tl.where(pos, tl.exp2(e * tl.log2(tl.where(pos, d, 1.0))), 0.0)


@triton.jit
def _pow_support(d, e):
    """(d)_+^(e - 1) on the support d > 0 (the indicator when e = 1), else 0."""
    pos = d > 0
    return tl.where(pos, tl.exp2((e - 1.0) * tl.log2(tl.where(pos, d, 1.0))), 0.0)


# ------------------------------------------------------------------ the bracket rule (threshold engine)


@triton.jit
def _init(smax, smin, n, args, NP: tl.constexpr):
    """tau in [max x - 1, max x - n^(-a)]; exact (= max x - 1) for a row with one key."""
    a = args[1]
    top = tl.where(n == 0, 0.0, smax * a)
    lo = top - 1.0
    up = top - tl.exp2(-a * tl.log2(tl.maximum(n, 1.0)))
    return Bracket(lo, up, lo, up, lo, n <= 1.0)


@triton.jit
def _fold(acc, s, start_n, ctx, BN: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr, MASKED: tl.constexpr):
    """At the points t [BM, NP]: count, sum (x - t)_+^e, sum (x - t)_+^(e-1), and the smallest x above t."""
    t, args = ctx
    a = args[1]
    e = (1.0 / a)[:, None]                                                               # [BM, 1]
    x = s * a[:, None]                                                                   # [BM, BN]
    cnt, s1, s2, xmin = acc
    NP: tl.constexpr = t.shape[1]
    cols = tl.arange(0, NP)
    for pt in tl.static_range(NP):                     # one [BM, BN] pass per point (no 3-D tensor)
        sel = cols[None, :] == pt                                                        # [1, NP]
        d = x - pick_row(t, sel)[:, None]                                                # [BM, BN]
        pos = d > 0
        lg = tl.log2(tl.where(pos, d, 1.0))                                              # one log2 for both
        cnt = point_columns(cnt, tl.sum(pos.to(tl.float32), 1), sel)
        s1 = point_columns(s1, tl.sum(tl.where(pos, tl.exp2(e * lg), 0.0), 1), sel)     # (x - t)_+^e
        s2 = point_columns(s2, tl.sum(tl.where(pos, tl.exp2((e - 1.0) * lg), 0.0), 1), sel)   # ^(e - 1)
        xmin = tl.minimum(xmin, tl.where(sel, tl.min(tl.where(pos, x, float("inf")), 1)[:, None], float("inf")))
    return cnt, s1, s2, xmin


@triton.jit
def _step(br, t, acc, args):
    """Newton from the largest feasible point t_a, the bracket shrunk to [t_a, t_{a+1}); the next pass's two
    points straddle the Newton iterate (``newton -+ 4 res``, res = fp32 resolution of tau); done when the
    Newton step or the bracket is below a few res (tau = the Newton iterate)."""
    a = args[1]
    cnt, s1, s2, xmin = acc
    sel, found, t_a, t_b = feasible_point(s1 - 1.0, t, br)
    s1_a = tl.maximum(pick_row(s1, sel), 1.0)             # F(t_a) + 1 >= 1 (1 where no point is feasible)
    # Newton on G = (F + 1)^a - 1 (the e-norm of (x - t)_+, minus 1): convex and decreasing like F, so the
    # step from below still never overshoots, but G is linear in t for equal scores (one step is exact there)
    # where F's Newton shrinks the gap only by (1 - a) per step far from the root.
    # G(t_a) / -G'(t_a) = s1 (1 - s1^-a) / s2.
    step = s1_a * (1.0 - tl.exp2(-a * tl.log2(s1_a))) / tl.maximum(pick_row(s2, sel), 1e-30)
    newton = t_a + step                                                                  # <= tau
    lo = tl.where(found, tl.maximum(br.lo, t_a), br.lo)
    up = tl.where(found, tl.minimum(br.up, t_b), tl.minimum(br.up, br.t0))
    up = tl.maximum(up, lo)
    newton = tl.minimum(tl.maximum(newton, lo), up)
    res = 2.4e-7 * tl.maximum(tl.abs(lo), 1.0)
    # The next points: newton - 4 res and newton + 4 res (NP = 2, frac 0 and 1/2). Once Newton has converged,
    # its iterate sits on the root to within fp32 rounding, on either side of it: a point just below it is
    # feasible and one just above it is not, so that pass closes the bracket to 8 res. (Points at the iterate
    # and at the bracket's midpoint instead lost every pass whose iterate rounded above the root to a
    # bisection: 10-20 passes per block in fp32, against 3-5 now; bench/replays/entmax_alpha_newton.py.)
    t0 = tl.where(found, tl.maximum(newton - 4.0 * res, lo), lo)
    t1 = tl.where(found, tl.minimum(newton + 12.0 * res, up), up)
    settled = found & (step <= res)
    narrow = (up - lo) <= 10.0 * res
    tau = tl.where(br.done, br.tau, tl.where(found, newton, lo))
    done = br.done | settled | narrow | ~(up - lo >= 0)      # (the last: NaN scores)
    return Bracket(lo, up, t0, t1, tau, done)


RULE = ThresholdRule(points=NPTS, max_passes=MAX_PASSES, init=_init, zero=support_zero, fold=_fold, step=_step,
                     fold_args=True)


# ------------------------------------------------------------------ output pass and backward


@triton.jit
def update(s, m_i, l_i, thr, MASKED: tl.constexpr):
    tau, a = thr
    p = _pow(s * a[:, None] - tau[:, None], (1.0 / a)[:, None])                         # [BM, BN]
    return p, l_i, m_i, l_i + tl.sum(p, 1)


@triton.jit
def finalize(m_i, l_i, thr):
    tau, a = thr
    return safe_inv(l_i), tau, tau


@triton.jit
def tile_live(s, thr):
    tau, a = thr
    return tl.max(s * a[:, None] - tau[:, None]) > 0


@triton.jit
def live_floor(thr):
    """The block mask's floor: p > 0 needs s a - tau > 0, i.e. s > tau / a; lowered by 1e-5 relative so that the
    rounding of s a - tau never keeps a score below it (+inf stays +inf: rows without an allowed key)."""
    tau, a = thr
    f = tau / a
    return tl.where(f == float("inf"), f, f - (tl.abs(f) * 1e-5 + 1e-30))


@triton.jit
def g_weights(s, thr):
    """u = (x - tau)_+^(e - 1) = p^(2 - alpha)."""
    tau, a = thr
    return _pow_support(s * a[:, None] - tau[:, None], (1.0 / a)[:, None])


@triton.jit
def g_finalize(l_i, l_g):
    return safe_inv(l_g), l_g


@triton.jit
def bwd_rows(stat0, stat1, thr, g_sum):
    tau, a = thr
    return tau, a


@triton.jit
def _row_a(w1):
    """a per row ([BM]); 1 where a = 0 (rows past L load w1 = 0 in the backward: s * 0 would be NaN for a
    masked -inf score; with 1 their weights are 0 as they must be)."""
    return tl.where(w1 > 0, w1, 1.0)


@triton.jit
def bwd_weights(s, w0, w1, MASKED: tl.constexpr):
    a = _row_a(w1)
    return _pow(s * a[:, None] - w0[:, None], (1.0 / a)[:, None])


@triton.jit
def bwd_dscores(p, s, dp, delta, w0, w1):
    """dS = u (dP - delta), u = (x - tau)_+^(e - 1), delta = rowsum(dO * O2)."""
    a = _row_a(w1)
    return _pow_support(s * a[:, None] - w0[:, None], (1.0 / a)[:, None]) * (dp - delta[:, None])


HOOKS = make_hooks(name="entmax", unit=1.0, n_stats=1, update=update, finalize=finalize, prepass=root_prepass,
                   tile_live=tile_live, g_weights=g_weights, g_finalize=g_finalize, bwd_rows=bwd_rows,
                   bwd_weights=bwd_weights, bwd_dscores=bwd_dscores, rule=RULE, head_param=True,
                   given_final=True, live_floor=live_floor)


def configure(normalizer, S: int):
    """(hooks, runtime args, scratch columns): the bracket method (no collect rule for a general alpha)."""
    return configure_root(HOOKS, S, collect=False, points=NPTS)
