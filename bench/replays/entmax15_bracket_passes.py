"""Float32 numpy replay of kernels/entmax15.py's bracket pre-pass (the rule `_step`): bracket passes per row and
per 128-row block, and how exact the final tau is (|sum p - 1| in float64 against the float32 scores).

Usage: python entmax15_bracket_passes.py S NP [spread] [--newton F|G] [--fmax X] [--near X] [--first lo|topK]
       [--miss mid|below] [--rows R] [--seed N]      (the defaults are the kernel's rule)

--newton F: Newton on F = sum (z - t)_+^2 - 1 (the step before issue 17); G (default): on G = sqrt(F + 1) - 1.
--fmax X: accept the exact polish only from a point t_a with F(t_a) <= X (default 1, the kernel's POLISH_FMAX;
inf = accept from any feasible point, the rule before issue 17 item 4's one point per pass).
--near X: also accept the polish r when the keys it wrongly counts (those in (t_a, r], each at least zmin_a) move
sum p by at most X: c_a (r - zmin_a)^2 <= X (0 = off, the rule before).
--first: the first point max z - 1 (lo, the rule before) or the threshold of the k largest scores alone (topK; the
kernel: top2, the range pass keeps the second largest).
--miss: a pass without a feasible point continues from the midpoint of the bracket at NP = 1 (mid; its lower end
at NP > 1, the rule before) or from the smaller root of the lowest point's support quadratic (below: a lower
bound).
Scores: z = N(0, 1) * spread / 2 (natural scores N(0, spread^2) in entmax15's unit 1/2), R rows (default 512).
The points of a pass, the sums (float32, a row at once rather than per key tile) and the step follow the kernel.

Referenced by bench/TUNING.md (predictions made without a GPU)."""
import sys

import numpy as np

f32 = np.float32


def exact_tau(z):
    """float64 tau of each row of z [R, S] (sort-based: the largest support m with tau_m < z_(m))."""
    zs = -np.sort(-z.astype(np.float64), 1)
    m = np.arange(1, z.shape[1] + 1)
    s1, s2 = np.cumsum(zs, 1), np.cumsum(zs * zs, 1)
    tm = (s1 - np.sqrt(np.maximum(s1 * s1 - m * (s2 - 1), 0))) / m
    sz = np.max(np.where(tm < zs, m, 0), 1)
    return tm[np.arange(len(z)), sz - 1]


def passes(z, NP=2, newton="G", fmax=1.0, near=0.0, first="top2", miss="below"):
    """(bracket passes per row, tau per row) for z [R, S] float32, following kernels/entmax15.py."""
    R, S = z.shape
    zs = -np.sort(-z, 1)
    zmax = zs[:, 0]
    n = np.full(R, S, f32)
    lo = zmax - f32(1)
    if first.startswith("top"):          # the threshold of the k largest alone (<= tau); top2: the kernel's
        k = int(first[3:])
        w = zs[:, :k] - zmax[:, None]
        c1, c2, m = np.cumsum(w, 1), np.cumsum(w * w, 1), np.arange(1, k + 1, dtype=f32)
        tm = (c1 - np.sqrt(np.maximum(c1 * c1 - m * (c2 - f32(1)), f32(0)))) / m
        msz = np.max(np.where(tm < w, np.arange(1, k + 1), 0), 1)
        lo = np.maximum(lo, zmax + tm[np.arange(R), msz - 1])
    up = zmax - f32(1) / np.sqrt(n)
    t0, t1, tau = lo.copy(), up.copy(), lo.copy()
    done = n <= 1
    cnt_pass = np.zeros(R, int)
    idx = np.arange(NP)
    frac = (idx / NP).astype(f32)
    r_ = np.arange(R)
    for _ in range(40):
        if done.all():
            break
        t = t0[:, None] + (t1 - t0)[:, None] * frac[None, :]                              # [R, NP]
        d = z[:, None, :] - t[:, :, None]
        pos = d > 0
        dp = np.where(pos, d, f32(0))
        cnt = pos.sum(2).astype(f32)
        s1 = dp.sum(2, dtype=f32)
        s2 = (dp * dp).sum(2, dtype=f32)
        zmin = np.where(pos, z[:, None, :], f32(np.inf)).min(2)
        a = np.where(s2 - f32(1) >= 0, idx[None], -1).max(1)
        found = a >= 0
        ai = np.clip(a, 0, NP - 1)
        t_a, c_a, s1_a, f_a, zmin_a = t[r_, ai], cnt[r_, ai], s1[r_, ai], s2[r_, ai] - f32(1), zmin[r_, ai]
        t_b = np.where(a + 1 >= NP, up, t[r_, np.clip(a + 1, 0, NP - 1)])
        disc = s1_a * s1_a - c_a * f_a
        r = t_a + f_a / np.maximum(s1_a + np.sqrt(np.maximum(disc, f32(0))), f32(1e-30))
        has_r = found & (disc >= 0)
        over = np.maximum(r - zmin_a, f32(0))
        exact = has_r & ((r < zmin_a) | (c_a * over * over <= f32(near))) & (f_a <= f32(fmax))
        if newton == "F":
            step = f_a / (f32(2) * np.maximum(s1_a, f32(1e-30)))
        else:
            r1 = np.sqrt(np.maximum(f_a + f32(1), f32(1)))
            step = f_a * r1 / ((r1 + f32(1)) * np.maximum(s1_a, f32(1e-30)))
        if miss == "below":              # no feasible point: the smaller root from t_0 (F < 0) is a lower bound
            c0, s10, f0 = cnt[:, 0], s1[:, 0], s2[:, 0] - f32(1)
            below = t[:, 0] + f0 / np.maximum(s10 + np.sqrt(np.maximum(s10 * s10 - c0 * f0, f32(0))), f32(1e-30))
            lo = np.where(found, np.maximum(lo, t_a), np.maximum(lo, below))
        else:
            lo = np.where(found, np.maximum(lo, t_a), lo)
        up = np.where(found, np.minimum(up, t_b), np.minimum(up, t0))
        up = np.where(has_r, np.minimum(up, r), up)
        up = np.maximum(up, lo)
        nxt = lo + f32(0.5) * (up - lo) if (NP == 1 and miss == "mid") else lo
        t0 = np.where(found, np.minimum(np.maximum(t_a + step, lo), up), nxt)
        t1 = up
        narrow = (up - lo) <= f32(2.4e-7) * np.maximum(np.abs(lo), f32(1))
        cnt_pass += ~done
        tau = np.where(done, tau, np.where(exact, r, lo))
        done = done | exact | narrow | ~(up - lo >= 0)
    return cnt_pass, tau


def main(argv):
    opts = {"--newton": "G", "--fmax": "1", "--near": "0", "--first": "top2", "--miss": "below", "--rows": "512",
            "--seed": "0"}
    for key in list(opts):
        if key in argv:
            i = argv.index(key)
            opts[key] = argv[i + 1]
            del argv[i:i + 2]
    S, NP = int(argv[1]), int(argv[2])
    spread = float(argv[3]) if len(argv) > 3 else 1.0
    rng = np.random.default_rng(int(opts["--seed"]))
    z = (rng.standard_normal((int(opts["--rows"]), S)) * spread / 2).astype(f32)
    pc, tau = passes(z, NP, opts["--newton"], float(opts["--fmax"]), float(opts["--near"]), opts["--first"],
                     opts["--miss"])
    blk = pc.reshape(-1, 128).max(1)
    err = np.abs((np.clip(z.astype(np.float64) - tau[:, None].astype(np.float64), 0, None) ** 2).sum(1) - 1)
    print(f"S={S} NP={NP} spread={spread} fmax={opts['--fmax']} near={opts['--near']} first={opts['--first']} "
          f"miss={opts['--miss']}: passes/row mean "
          f"{pc.mean():.2f} max {pc.max()}  per-128-block max {blk} mean {blk.mean():.2f}  hist {np.bincount(pc)}  "
          f"|sum p - 1| max {err.max():.2e}")


if __name__ == "__main__":
    main(list(sys.argv))
