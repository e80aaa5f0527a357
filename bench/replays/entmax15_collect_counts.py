"""Numpy replay of entmax15 COLLECT: support size and scores collected above the group-maxima threshold. Usage: python entmax15_collect_counts.py

Referenced by bench/TUNING.md (predictions made without a GPU)."""
import numpy as np
def ent_tau(x):  # sort-based exact threshold of a 1-D array (z units)
    z = np.sort(x)[::-1]; m = np.arange(1, len(z)+1)
    s1 = np.cumsum(z); s2 = np.cumsum(z*z)
    tau_m = (s1 - np.sqrt(np.maximum(s1*s1 - m*(s2-1), 0)))/m
    ms = np.max(np.where(tau_m < z, m, 0))
    return tau_m[ms-1], ms
rng = np.random.default_rng(0)
for S, GS, spread in ((1024, 8, 1), (8192, 32, 1), (16384, 64, 1), (16384, 64, 3), (131072, 512, 1), (4096, 16, 0.3)):
    KP = 64
    cs, sup = [], []
    for r in range(200):
        z = rng.standard_normal(S) * spread / 2
        gm = z.reshape(-1, GS).max(1)
        top = np.sort(gm)[::-1][:KP]
        lb, _ = ent_tau(top)
        tau, ms = ent_tau(z)
        assert lb <= tau + 1e-12
        cs.append((z >= lb).sum()); sup.append(ms)
    cs = np.array(cs)
    print(f"S={S} GS={GS} spread={spread}: support mean {np.mean(sup):.0f}; collected mean {cs.mean():.0f} max {cs.max()} frac>128 {np.mean(cs>128):.3f}")
