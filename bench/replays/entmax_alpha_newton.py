"""Torch replay of kernels/entmax.py's bracket pre-pass (alpha-entmax, NP = 2 points): passes per block of 16
rows with Newton on F = sum (x - t)_+^e - 1 (the old step) and on G = (F + 1)^a - 1 (the e-norm form, the current
step). Usage: python bench/replays/entmax_alpha_newton.py

Referenced by bench/TUNING.md (predictions made without a GPU)."""
import torch, math, sys
def passes(x, a, rule, NP=2, BM=16, max_passes=60):
    # x: [R, n] scores in natural units (s); returns passes per block
    e = 1.0 / a
    X = x.double() * a
    n = torch.full((X.shape[0],), float(X.shape[1]), dtype=torch.float64)
    top = X.max(1).values
    lo = top - 1.0; up = top - n ** (-a)
    t0, t1 = lo.clone(), up.clone(); tau = lo.clone(); done = n <= 1
    frac = torch.arange(NP, dtype=torch.float64) / NP
    out = []
    for b in range(0, X.shape[0], BM):
        sl = slice(b, b + BM)
        lo_, up_, t0_, t1_, done_ = lo[sl].clone(), up[sl].clone(), t0[sl].clone(), t1[sl].clone(), done[sl].clone()
        Xb = X[sl]
        p = 0
        while (~done_).any() and p < max_passes:
            t = t0_[:, None] + (t1_ - t0_)[:, None] * frac[None]
            d = Xb[:, None, :] - t[:, :, None]
            pos = d > 0
            dc = torch.where(pos, d, torch.zeros_like(d))
            s1 = (dc ** e).sum(-1); s2 = torch.where(pos, dc ** (e - 1), torch.zeros_like(d)).sum(-1)
            f = s1 - 1
            idx = torch.arange(NP)
            ai = torch.where(f >= 0, idx[None], torch.full_like(f, -1, dtype=torch.long)).max(1).values
            found = ai >= 0
            aic = ai.clamp(min=0)
            t_a = t.gather(1, aic[:, None])[:, 0]
            t_b = torch.where(ai + 1 >= NP, up_, t.gather(1, (ai + 1).clamp(max=NP - 1)[:, None])[:, 0])
            S1 = s1.gather(1, aic[:, None])[:, 0]; S2 = s2.gather(1, aic[:, None])[:, 0]
            if rule == "F":
                step = (S1 - 1) / torch.clamp(S2 / a, min=1e-30)
            else:
                step = (S1 - S1 ** (1 - a)) / torch.clamp(S2, min=1e-30)
            newton = t_a + step
            nlo = torch.where(found, torch.maximum(lo_, t_a), lo_)
            nup = torch.where(found, torch.minimum(up_, t_b), torch.minimum(up_, t0_))
            nup = torch.maximum(nup, nlo)
            newton = torch.minimum(torch.maximum(newton, nlo), nup)
            t0n = torch.where(found, newton, nlo)
            res = 2.4e-7 * torch.clamp(nlo.abs(), min=1.0)
            settled = found & ((step <= res) | ((nup - nlo) <= res))
            done_ = done_ | settled | ((nup - nlo) <= res)
            lo_, up_, t0_, t1_ = nlo, nup, t0n, nup
            p += 1
        out.append(p)
    return out
g = torch.Generator().manual_seed(0)
for S in (64, 1024, 8192):
    for scale in (1.0, 0.25, 0.02):
        x = torch.randn(64, S, generator=g) * scale * 4   # scores ~ N(0, (4 scale)^2)
        for al in (1.25, 1.75):
            pf = passes(x, al - 1, "F"); pg = passes(x, al - 1, "G")
            print(f"S={S:5d} sd={4*scale:5.2f} alpha={al}: F-newton passes/block {sum(pf)/len(pf):5.1f} max {max(pf)}  G-newton {sum(pg)/len(pg):5.1f} max {max(pg)}")
