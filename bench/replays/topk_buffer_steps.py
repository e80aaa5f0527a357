"""Numpy replay of kernels/topk.py's running buffer: data-dependent insertion steps per tile (block max over rows). Usage: python topk_buffer_steps.py S BM

Referenced by bench/TUNING.md (predictions made without a GPU)."""
import numpy as np, sys, heapq
def steps(s, k, BN, seed_first=False):
    R, S = s.shape
    # per row: process tiles; count insertion steps per tile = number of candidates inserted (each step inserts the max candidate > theta)
    total = 0; per_tile = []
    bufs = [[] for _ in range(R)]  # min-heaps
    for t0 in range(0, S, BN):
        tile = s[:, t0:t0+BN]
        mx = 0
        for r in range(R):
            h = bufs[r]
            if seed_first and t0 == 0 and BN >= k:
                vals = sorted(tile[r], reverse=True)[:k]; bufs[r] = h = list(vals); heapq.heapify(h); cnt = 0
                # remaining candidates of the tile > theta: none (we took the top k)
            else:
                cnt = 0
                cand = sorted(tile[r], reverse=True)
                for x in cand:
                    theta = h[0] if len(h) >= k else -np.inf
                    if x > theta:
                        if len(h) >= k: heapq.heapreplace(h, x)
                        else: heapq.heappush(h, x)
                        cnt += 1
                    else: break
            mx = max(mx, cnt)
        per_tile.append(mx); total += mx
    return total, per_tile
rng = np.random.default_rng(0)
S = int(sys.argv[1]); BM = int(sys.argv[2]); BN = 64
s = rng.standard_normal((BM, S))
for sf in (False, True):
    tot, pt = steps(s, 64, BN, sf)
    print(f"S={S} BM={BM} seed_first={sf}: total steps {tot} over {S//BN} tiles; first 5 {pt[:5]}; last 5 {pt[-5:]}")
