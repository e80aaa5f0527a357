"""Float32 numpy replay of the threshold engine's bracket method (kernels/threshold.py `search`) with the rules of
kernels/sparsemax.py and kernels/entmax15.py, row by row: bracket passes, how each row finished (exact polish,
narrow bracket) and from how far (F(t_a) at the polish), and how exact tau is: its error in float32 ulps against
the exact float64 tau of the same float32 scores, and |sum p - 1| (float64 sums of the float32 scores and tau).

Usage: python root_polish_rows.py NORM [--S 90,512,1024,8192] [--inputs dense,random,sparse,structured] [--rows R]
       [--rule fixed|before|main] [--np NP] [--fmax X] [--near X] [--bn BN] [--compare RULE] [--list N] [--seed N]

NORM: sparsemax or entmax15. --rule: fixed (default: this branch's kernels), before (the kernels before it: sparsemax
started from max z - 1 (fixed: from the threshold of the two largest scores, as entmax15 since session 6; --first lo
or top2 overrides), polished from any feasible point, kept r as the lower end and bisected a pass without a feasible
point; entmax15 went on from the Newton iterate after a polish that was not exact, where fixed takes the middle of
[the iterate, the upper end] over a support of 16+ keys, `MID_SUPPORT`) or main (entmax15 before issue 17 item 4's
one point per pass, main d2ff240: NP = 2, first point max z - 1, polish from any feasible point, a pass without a
feasible point goes on from the bracket's lower end). --np NP: points per pass (default: the rule's). --fmax X: take
the exact polish only from a point with F(t_a) <= X (default: the rule's; fixed: 1, `threshold.POLISH_FMAX`).
--near X: entmax15's polish also accepted when the keys it wrongly counts move sum p by at most X (as
entmax15_bracket_passes.py). --compare RULE: also replay RULE and list (the first N, default 12) rows whose pass
counts differ (support size, each rule's last polish point and error), with a summary of the rows that take more
passes.
Errors: "tau err ulps" in ulps of tau itself and "score ulps" in ulps of max(|z|, |tau|) over the row (the resolution
at which the kernel forms z - tau: a tau near 0 has tiny ulps of its own).
Inputs (natural scores, then the normalizer's unit: z = s, sparsemax; z = s / 2, entmax15):
  dense: N(0, 1) x 0.3 / S (sparsemax) or x 0.3 / sqrt(S) (entmax15): the support is (nearly) every key at every S;
  random: N(0, 1); sparse: N(0, 4^2);
  structured: `flashmaps.bench.structured.structured_qkv` (4 directions, 64-key blocks, gap 6, D = 64, seed 0, the
         workcount's inputs), fp32 q k^T / sqrt(D).
Per key tile of BN keys (default 64, the forward's first candidate at D = 64) the sums are float32 and accumulated
across tiles in order, as `tiles.fold_keys` does (numpy's pairwise sum within a tile stands for tl.sum's tree). At
BN = 16 (the interpreter's tile) the kernel's tau equals the replay's bit for bit on tests/test_thrchk.py's dense rows
(splits = 1), under both the fixed and the before rule.

Referenced by bench/TUNING.md ("Issue 17 item 4: the threshold engine row by row").
"""
import argparse
import sys

import numpy as np

f32 = np.float32
RES = f32(2.4e-7)


def exact_tau(z, norm):
    """float64 tau of each row of z [R, S] (sort-based: the largest support m with tau_m < z_(m))."""
    zs = -np.sort(-z.astype(np.float64), 1)
    m = np.arange(1, z.shape[1] + 1)
    s1 = np.cumsum(zs, 1)
    if norm == "sparsemax":
        tm = (s1 - 1) / m
    else:
        s2 = np.cumsum(zs * zs, 1)
        tm = (s1 - np.sqrt(np.maximum(s1 * s1 - m * (s2 - 1), 0))) / m
    sz = np.max(np.where(tm < zs, m, 0), 1)
    return tm[np.arange(len(z)), sz - 1], sz


def sum_p(z, tau, norm):
    """float64 sum p of the float32 scores z [R, S] at the float32 taus [R]."""
    d = np.clip(z.astype(np.float64) - tau[:, None].astype(np.float64), 0, None)
    return (d if norm == "sparsemax" else d * d).sum(1)


def fold(z, t, bn, squares):
    """The support statistics (count, s1, s2, zmin) [R, NP] at the points t [R, NP], as `threshold.support_fold`
    over key tiles of bn keys: float32 per tile, accumulated across tiles in order."""
    R, S = z.shape
    NP = t.shape[1]
    cnt, s1, s2 = (np.zeros((R, NP), f32) for _ in range(3))
    zmin = np.full((R, NP), np.inf, f32)
    for j in range(0, S, bn):
        zt = z[:, None, j:j + bn]
        d = zt - t[:, :, None]
        pos = d > 0
        dp = np.where(pos, d, f32(0))
        cnt += pos.sum(2).astype(f32)
        s1 += dp.sum(2, dtype=f32)
        if squares:
            s2 += (dp * dp).sum(2, dtype=f32)
        zmin = np.minimum(zmin, np.where(pos, zt, f32(np.inf)).min(2))
    return cnt, s1, s2, zmin


def replay(z, norm, rule="fixed", fmax=None, bn=64, near=0.0, np_=None, first=None):
    """Per row: passes, tau (float32), how it finished ("polish", "narrow"), F(t_a) of its last polish
    candidate, following the kernel's `_init` and `_step`. first: the first point, "lo" (max z - 1) or "top2" (the
    threshold of the two largest scores alone, a lower bound; the range pass keeps the second largest, `second`);
    default the rule's."""
    R, S = z.shape
    zs = -np.sort(-z, 1)
    zmax = zs[:, 0]
    n = np.full(R, S, f32)
    entmax = norm == "entmax15"
    NP = np_ or (2 if rule == "main" else 1)
    if fmax is None:
        fmax = np.inf if (rule == "main" or (rule == "before" and not entmax)) else 1.0
    fmax = f32(fmax)
    if first is None:
        first = "lo" if (rule == "main" or (rule == "before" and not entmax)) else "top2"
    lo = zmax - f32(1)
    z2 = zs[:, 1] if S > 1 else np.full(R, -np.inf, f32)
    if entmax:
        if first == "top2":
            h = f32(0.5) * (zmax - z2)
            lo = zmax - np.where(h < f32(0.5), h + np.sqrt(np.maximum(f32(0.5) - h * h, f32(0))), f32(1))
        up = zmax - f32(1) / np.sqrt(n)
    else:
        if first == "top2":
            lo = np.maximum(lo, f32(0.5) * (zmax + z2) - f32(0.5))
        up = zmax - f32(1) / n
    t0, t1, tau = lo.copy(), up.copy(), lo.copy()
    done = n <= 1
    how = np.array(["one"] * R, dtype=object)
    f_last = np.full(R, np.nan)
    npass = np.zeros(R, int)
    idx = np.arange(NP)
    frac = (idx / NP).astype(f32)
    r_ = np.arange(R)
    for _ in range(60 if entmax else 40):
        if done.all():
            break
        t = t0[:, None] + (t1 - t0)[:, None] * frac[None, :]
        cnt, s1, s2, zmin = fold(z, t, bn, entmax)
        f = (s2 if entmax else s1) - f32(1)
        a = np.where(f >= 0, idx[None], -1).max(1)
        found = a >= 0
        ai = np.clip(a, 0, NP - 1)
        t_a, c_a, s1_a, f_a, zmin_a = t[r_, ai], cnt[r_, ai], s1[r_, ai], f[r_, ai], zmin[r_, ai]
        t_b = np.where(a + 1 >= NP, up, t[r_, np.clip(a + 1, 0, NP - 1)])
        if entmax:
            disc = s1_a * s1_a - c_a * f_a
            r = t_a + f_a / np.maximum(s1_a + np.sqrt(np.maximum(disc, f32(0))), f32(1e-30))
            has_r = found & (disc >= 0)
            over = np.maximum(r - zmin_a, f32(0))
            exact = has_r & ((r < zmin_a) | (c_a * over * over <= f32(near))) & (f_a <= fmax)
            r1 = np.sqrt(np.maximum(f_a + f32(1), f32(1)))
            newton = t_a + f_a * r1 / ((r1 + f32(1)) * np.maximum(s1_a, f32(1e-30)))
            if rule == "main":
                lo = np.where(found, np.maximum(lo, t_a), lo)
            else:
                c0, s10, f0 = cnt[:, 0], s1[:, 0], f[:, 0]
                below = t[:, 0] + f0 / np.maximum(s10 + np.sqrt(np.maximum(s10 * s10 - c0 * f0, f32(0))),
                                                  f32(1e-30))
                lo = np.where(found, np.maximum(lo, t_a), np.maximum(lo, below))
            up = np.where(found, np.minimum(up, t_b), np.minimum(up, t0))
            up = np.where(has_r, np.minimum(up, r), up)
            up = np.maximum(up, lo)
            nxt = lo
            if rule == "fixed":              # a polish not exact over >= MID_SUPPORT keys: the middle of [newton, up]
                newton = np.where(has_r & (r >= zmin_a) & (c_a >= f32(16)), newton + f32(0.5) * (up - newton), newton)
            t0n = np.where(found, np.minimum(np.maximum(newton, lo), up), nxt)
        else:
            r = t_a + f_a / np.maximum(c_a, f32(1))             # the Newton step from t_a: <= tau
            near_a = f_a <= fmax
            exact = found & (r < zmin_a) & near_a
            if rule == "fixed":              # r from a far point (F(t_a) > fmax) is no bound to trust: lo = t_a
                lo = np.where(found, np.maximum(lo, np.where(near_a, np.maximum(t_a, r), t_a)), lo)
            else:
                lo = np.where(found, np.maximum(lo, np.maximum(t_a, r)), lo)
            up = np.where(found, np.minimum(up, t_b), np.minimum(up, t0))
            if rule == "fixed":              # no feasible point: Newton from t_0 (F convex: a lower bound)
                below = t[:, 0] + f[:, 0] / np.maximum(cnt[:, 0], f32(1))
                lo = np.where(found, lo, np.maximum(lo, below))
            up = np.maximum(up, lo)
            if rule == "fixed":
                nxt = lo
                t0n = np.where(found, np.minimum(np.maximum(r, lo), up), nxt)
            else:
                nxt = lo + f32(0.5) * (up - lo) if NP == 1 else lo                    # `threshold.miss_point`
                t0n = np.where(found, np.minimum(lo, up), nxt)
        t0, t1 = t0n, up
        narrow = (up - lo) <= RES * np.maximum(np.abs(lo), f32(1))
        live = ~done
        npass += live
        f_last = np.where(live & found, f_a, f_last)
        how = np.where(live & exact, "polish", np.where(live & narrow, "narrow", how))
        tau = np.where(done, tau, np.where(exact, r, lo))
        done = done | exact | narrow | ~(up - lo >= 0)
    return npass, tau, how, f_last


def scores(kind, S, R, norm, seed=0):
    """float32 kernel-unit scores [R, S] (see the module docstring)."""
    unit = f32(1.0 if norm == "sparsemax" else 0.5)
    rng = np.random.default_rng(seed)
    if kind == "structured":
        import torch

        from flashmaps.bench.structured import structured_qkv

        q, k, _ = structured_qkv(1, 1, R, S, 64, n_dirs=4, block=64, gap=6.0, seed=seed)
        s = (q[0, 0] @ k[0, 0].T).numpy().astype(f32) * f32(1 / 8)
        return s * unit
    spread = {"dense": (0.3 / S if norm == "sparsemax" else 0.3 / np.sqrt(S)), "random": 1.0, "sparse": 4.0}[kind]
    return (rng.standard_normal((R, S)) * spread).astype(f32) * unit


def measure(z, norm, rule, fmax, bn, near=0.0, np_=None, first=None):
    npass, tau, how, f_last = replay(z, norm, rule, fmax, bn, near, np_, first)
    ex, supp = exact_tau(z, norm)
    ulps = np.abs(tau.astype(np.float64) - ex) / np.spacing(np.abs(ex).astype(f32)).astype(np.float64)
    top = np.maximum(np.abs(z).max(1), np.abs(ex).astype(f32))
    sulps = np.abs(tau.astype(np.float64) - ex) / np.spacing(top).astype(np.float64)
    err = np.abs(sum_p(z, tau, norm) - 1)
    return dict(npass=npass, tau=tau, how=how, f_last=f_last, ulps=ulps, sulps=sulps, err=err, supp=supp)


def summary(m, R):
    blk = m["npass"].reshape(-1, 128).max(1) if R % 128 == 0 else np.array([m["npass"].max()])
    pol = m["how"] == "polish"
    return (f"passes/row {m['npass'].mean():.2f} (max {m['npass'].max()}), per 128-row block {blk.mean():.2f} | "
            f"tau err ulps max {m['ulps'].max():.1f}, score ulps {m['sulps'].max():.2f} | "
            f"|sum p - 1| max {m['err'].max():.1e} | support {m['supp'].min()}-{m['supp'].max()} | "
            f"polished {pol.sum()}/{R}, max F(t_a) {m['f_last'][pol].max() if pol.any() else 0:.3g}")


def compare(m, o, S, rule, other, n_list):
    """Print the rows whose pass counts differ between the replays m (rule) and o (other), and a summary of those
    that take more passes under rule."""
    diff = np.nonzero(m["npass"] != o["npass"])[0]
    more = m["npass"] > o["npass"]
    print(f"  rows with more passes: {more.sum()}, fewer: {(m['npass'] < o['npass']).sum()}")
    if more.any():
        po = more & (o["how"] == "polish")
        sup = o["supp"][more]
        f_po = o["f_last"][po].max() if po.any() else 0
        print(f"  the rows with more passes: support {sup.min()}-{sup.max()} of {S}; {other} finished "
              f"{po.sum()} by the polish, from F(t_a) <= {f_po:.3g} ({(po & (o['f_last'] > 1)).sum()} from "
              f"F > 1), tau err <= {o['ulps'][more].max():.1f} ulps ({o['sulps'][more].max():.2f} score "
              f"ulps), |sum p - 1| <= {o['err'][more].max():.1e}; {rule}: {m['ulps'][more].max():.1f} ulps "
              f"({m['sulps'][more].max():.2f}), {m['err'][more].max():.1e}")
    for i in diff[:n_list]:
        print(f"    row {i:4d}: passes {o['npass'][i]} -> {m['npass'][i]}  support {o['supp'][i]}/{S}  "
              f"{other}: {o['how'][i]} from F={o['f_last'][i]:.3g} ulps {o['ulps'][i]:.1f} "
              f"|sum p - 1| {o['err'][i]:.1e};  {rule}: {m['how'][i]} from F={m['f_last'][i]:.3g} "
              f"ulps {m['ulps'][i]:.1f} |sum p - 1| {m['err'][i]:.1e}")


def main(argv):
    ap = argparse.ArgumentParser(description="row-by-row replay of the threshold engine (see the module docstring)")
    ap.add_argument("norm", choices=["sparsemax", "entmax15"])
    ap.add_argument("--S", default="90,512,1024,8192")
    ap.add_argument("--inputs", default="dense,random,sparse,structured")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--rule", default="fixed", choices=["fixed", "before", "main"])
    ap.add_argument("--np", type=int, default=0)
    ap.add_argument("--fmax", type=float, default=None)
    ap.add_argument("--near", type=float, default=0.0)
    ap.add_argument("--first", default=None, choices=["lo", "top2"])
    ap.add_argument("--bn", type=int, default=64)
    ap.add_argument("--compare", default="", choices=["", "fixed", "before", "main"])
    ap.add_argument("--list", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    for kind in a.inputs.split(","):
        for S in map(int, a.S.split(",")):
            rows = min(a.rows, 256) if S >= 8192 else a.rows
            z = scores(kind, S, rows, a.norm, a.seed)
            m = measure(z, a.norm, a.rule, a.fmax, a.bn, a.near, a.np, a.first)
            print(f"{a.norm} {a.rule} fmax={a.fmax or 'rule'} first={a.first or 'rule'} {kind:10s} S={S:5d}: "
                  f"{summary(m, rows)}")
            if a.compare:
                o = measure(z, a.norm, a.compare, None, a.bn)
                print(f"  vs {a.compare}: {summary(o, rows)}")
                compare(m, o, S, a.rule, a.compare, a.list)


if __name__ == "__main__":
    main(sys.argv[1:])
