"""Float32 numpy replay of kernels/topk.py's SELECT pre-pass (the count-based bracket, `RULE`: `_init`, `_counts`,
`_step` under `threshold.search`): select passes per 128-row block, against the BUFFER mode's steps and merges
(`topk_buffer_steps.steps`, the GPU's MERGE_AT rule) on the same scores, and the cost model per K tile.

Usage: python topk_select_passes.py [--S 512,1024,8192] [--k 8,64,128] [--np 4,8,16] [--inputs random,structured]
                                    [--blocks 2] [--sass FILE]

Scores per 128-row block: "random" N(0, 1) (float32); "structured" `bench/structured.py` (L = S, D = 64, 4
directions per 64-row / 64-key block, gap 6, seed 0, as bench/workcount.py; the first rows) scaled by LOG2E / sqrt(D) as the kernel's log2-unit scores. Every replayed tau is checked
against the k-th largest score of its row (exact selection). Passes: the block's select passes (the kernel's
while loop runs until every row of the block is done), not counting the range pass.

--sass FILE: a JSON file {"range": R, "pass": {NP: P}, "step": {KP: I}, "merge": {KP: M}, "tile": T} of SASS per
tile (scripts/sm90-compile; bench/TUNING.md, "top-k's pre-pass mode by measured cost") for the cost model:
BUFFER = T + (steps x I + merges x M) / tiles, SELECT = R + passes x P (per K tile).

Referenced by bench/TUNING.md (predictions made without a GPU)."""
import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from topk_buffer_steps import steps  # noqa: E402  (the BUFFER replay)

f32 = np.float32
MERGE_AT = {2: 2, 4: 3, 8: 3, 16: 4, 32: 6, 64: 7, 128: 11}       # kernels/topk.py
BM, BN = 128, 64


def select(s, k, NP=8, max_passes=64):
    """(block passes, tau [R]) of the count-based select on s [R, S] float32 (every row allowed)."""
    R, S = s.shape
    kf = f32(k)
    smax, smin = s.max(1), s.min(1)
    few = np.full(R, S <= k)
    lo = np.where(few, f32(0), smin)
    up = np.where(few, f32(0), smax)
    tau = np.where(k == 1, smax, lo)
    done = few | (k == 1) | (lo >= up)
    idx = np.arange(NP)
    frac = (idx / NP).astype(f32)
    r_ = np.arange(R)
    passes = 0
    while (~done).any() and passes < max_passes:
        step = (up - lo) / f32(NP + 1)
        t0, t1 = lo + step, lo + step * f32(NP + 1)
        t = t0[:, None] + (t1 - t0)[:, None] * frac[None, :]                      # [R, NP]
        ge = s[:, None, :] >= t[:, :, None]                                       # [R, NP, S]
        cnt = ge.sum(2).astype(f32)
        amin = np.where(ge, s[:, None, :], f32(np.inf)).min(2)
        bmax = np.where(ge, f32(-np.inf), s[:, None, :]).max(2)
        eq_k, eq_k1 = cnt == kf, cnt == kf - 1
        v_k = np.where(eq_k, amin, -np.inf).max(1)
        v_k1 = np.where(eq_k1, bmax, -np.inf).max(1)
        a = np.where(cnt >= kf, idx[None, :], -1).max(1)
        new_lo = np.where(a >= 0, amin[r_, np.maximum(a, 0)], lo)
        new_up = np.where(a + 1 < NP, bmax[r_, np.minimum(a + 1, NP - 1)], up)
        lo, up = np.maximum(lo, new_lo), np.minimum(up, new_up)
        val = np.where(eq_k.any(1), v_k, np.where(eq_k1.any(1), v_k1, lo)).astype(f32)
        tau = np.where(done, tau, val)
        done = done | eq_k.any(1) | eq_k1.any(1) | ~(lo < up)
        passes += 1
    return passes, tau


def scores(inputs, S, blocks, seed=0):
    """[blocks * BM, S] float32 scores."""
    L = blocks * BM
    if inputs == "random":
        return np.random.default_rng(seed).standard_normal((L, S)).astype(f32)
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    from bench.structured import structured_qkv

    q, k, _ = structured_qkv(1, 1, S, S, 64, block=64, seed=seed)      # as bench/workcount.py (L = S), first L rows
    return ((q[0, 0, :L].double() @ k[0, 0].double().T) * (math.log2(math.e) / 8.0)).float().numpy()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--S", default="512,1024,8192")
    ap.add_argument("--k", default="8,64,128")
    ap.add_argument("--np", default="4,8,16")
    ap.add_argument("--inputs", default="random,structured")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--sass", default=None)
    a = ap.parse_args(argv)
    sass = json.load(open(a.sass)) if a.sass else None
    nps = [int(x) for x in a.np.split(",")]
    head = "| inputs | S | k | BUFFER steps, merges / block (tiles) | " + " | ".join(f"SELECT passes NP={n}" for n in nps)
    if sass:
        head += " | BUFFER / tile | " + " | ".join(f"SELECT / tile NP={n}" for n in nps)
    print(head + " |")
    print("|" + "---|" * (head.count("|") ))
    for inputs in a.inputs.split(","):
        for S in (int(x) for x in a.S.split(",")):
            s = scores(inputs, S, a.blocks)
            for k in (int(x) for x in a.k.split(",")):
                kp = max(2, 1 << (k - 1).bit_length())
                exact = -np.sort(-s, 1)[:, k - 1]
                st, mg, sel = [], [], {n: [] for n in nps}
                for b in range(a.blocks):
                    blk = s[b * BM:(b + 1) * BM].astype(np.float64)
                    tot, _, merges = steps(blk, k, BN, merge=MERGE_AT[kp])
                    st.append(tot)
                    mg.append(merges)
                    for n in nps:
                        p, tau = select(s[b * BM:(b + 1) * BM], k, n)
                        assert np.array_equal(tau, exact[b * BM:(b + 1) * BM]), (inputs, S, k, n)
                        sel[n].append(p)
                tiles = S // BN
                row = (f"| {inputs} | {S} | {k} | {np.mean(st):.0f}, {np.mean(mg):.1f} ({tiles}) | "
                       + " | ".join(f"{np.mean(sel[n]):.1f}" for n in nps))
                if sass:
                    buf = sass["tile"] + (np.mean(st) * sass["step"][str(kp)] + np.mean(mg) * sass["merge"][str(kp)]) / tiles
                    row += f" | {buf:.0f} | " + " | ".join(
                        f"{sass['range'] + np.mean(sel[n]) * sass['pass'][str(n)]:.0f}" for n in nps)
                print(row + " |", flush=True)


if __name__ == "__main__":
    main()
