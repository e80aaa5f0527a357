"""Numpy replay of kernels/entmax15.py's bracket pre-pass: passes per row and per 128-row block. Usage: python entmax15_bracket_passes.py S NP [spread] [--newton F|G]

--newton F: Newton on F = sum (z - t)_+^2 - 1 (the step before issue 17); G (default): on G = sqrt(F + 1) - 1.

Referenced by bench/TUNING.md (predictions made without a GPU)."""
import numpy as np, sys
def passes(z, NP=2, newton_first=True):
    # z [R, S] float32; replicate kernels/entmax15.prepass per row; return passes per row
    R, S = z.shape
    zmax = z.max(1); n = np.full(R, S, np.float32)
    lo = zmax - 1; up = zmax - 1/np.sqrt(n); t0 = lo.copy(); tau = lo.copy()
    done = n <= 1; cnt_pass = np.zeros(R, int)
    idx = np.arange(NP); frac = idx / NP
    for p in range(40):
        if done.all(): break
        t = t0[:, None] + (up - t0)[:, None] * frac[None, :]
        d = z[:, None, :] - t[:, :, None]
        pos = d > 0; dp = np.where(pos, d, 0)
        cnt = pos.sum(2); s1 = dp.sum(2); s2 = (dp*dp).sum(2)
        zmin = np.where(pos, z[:, None, :], np.inf).min(2)
        a = np.where(s2 >= 1, idx[None], -1).max(1)
        found = a >= 0
        ai = np.clip(a, 0, NP-1); r_ = np.arange(R)
        t_a = t[r_, ai]; c_a = cnt[r_, ai]; s1_a = s1[r_, ai]; f_a = s2[r_, ai] - 1; zmin_a = zmin[r_, ai]
        t_b = np.where(a + 1 >= NP, up, t[r_, np.clip(a+1, 0, NP-1)])
        disc = s1_a**2 - c_a*f_a
        r = t_a + f_a / np.maximum(s1_a + np.sqrt(np.maximum(disc, 0)), 1e-30)
        has_r = found & (disc >= 0); exact = has_r & (r < zmin_a)
        if NEWTON == "F":
            newton = t_a + f_a / (2*np.maximum(s1_a, 1e-30))
        else:
            f1 = np.maximum(f_a + 1, 1); newton = t_a + (f1 - np.sqrt(f1)) / np.maximum(s1_a, 1e-30)
        lo = np.where(found, np.maximum(lo, t_a), lo)
        up = np.where(found, np.minimum(up, t_b), np.minimum(up, t0))
        up = np.where(has_r, np.minimum(up, r), up); up = np.maximum(up, lo)
        t0 = np.where(found, np.minimum(np.maximum(newton, lo), up), lo)
        narrow = (up - lo) <= 2.4e-7*np.maximum(np.abs(lo), 1)
        cnt_pass += ~done
        tau = np.where(done, tau, np.where(exact, r, lo)); done = done | exact | narrow
    return cnt_pass
rng = np.random.default_rng(0)
NEWTON = "G"
if "--newton" in sys.argv:
    i = sys.argv.index("--newton"); NEWTON = sys.argv[i + 1]; del sys.argv[i:i + 2]
S = int(sys.argv[1]); NP = int(sys.argv[2]); spread = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
z = (rng.standard_normal((512, S)).astype(np.float32) * spread / 2)
pc = passes(z, NP)
blk = pc.reshape(-1, 128).max(1)
print(f"S={S} NP={NP} spread={spread}: passes/row mean {pc.mean():.2f} max {pc.max()}  per-128-block max {blk}  hist {np.bincount(pc)}")
