"""Numpy replay of kernels/topk.py's running buffer: data-dependent insertion steps per tile (block max over rows).
Usage: python topk_buffer_steps.py S BM [--k K] [--merge M]

--merge M: the kernel's rule since issue 17 item 4 (kernels/topk.py MERGE_AT): a tile in which some row has more
than M candidates (scores above its running k-th largest) is merged in one step (no insertion steps), else
inserted step by step. Without it: the first tile seeded directly (seed_first) or inserted too.

Referenced by bench/TUNING.md (predictions made without a GPU)."""
import numpy as np, sys, heapq
def steps(s, k, BN, seed_first=False, merge=None):
    R, S = s.shape
    # per row: process tiles; count insertion steps per tile = number of candidates inserted (each step inserts the max candidate > theta)
    total = 0; per_tile = []; merges = 0
    bufs = [[] for _ in range(R)]  # min-heaps
    for t0 in range(0, S, BN):
        tile = s[:, t0:t0+BN]
        mx = 0
        if merge is not None:
            theta = np.array([h[0] if len(h) >= k else -np.inf for h in bufs])
            if (tile > theta[:, None]).sum(1).max() > merge:
                for r in range(R):
                    vals = sorted(list(bufs[r]) + list(tile[r]), reverse=True)[:k]
                    bufs[r] = vals; heapq.heapify(bufs[r])
                merges += 1; per_tile.append(0); continue
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
    return total, per_tile, merges
if __name__ == "__main__":
    args = sys.argv[1:]
    K = 64; M = None
    if "--k" in args:
        i = args.index("--k"); K = int(args[i + 1]); del args[i:i + 2]
    if "--merge" in args:
        i = args.index("--merge"); M = int(args[i + 1]); del args[i:i + 2]
    rng = np.random.default_rng(0)
    S = int(args[0]); BM = int(args[1]); BN = 64
    s = rng.standard_normal((BM, S))
    if M is None:
        for sf in (False, True):
            tot, pt, _ = steps(s, K, BN, sf)
            print(f"S={S} BM={BM} k={K} seed_first={sf}: total steps {tot} over {S//BN} tiles; first 5 {pt[:5]}; last 5 {pt[-5:]}")
    else:
        tot, pt, mg = steps(s, K, BN, merge=M)
        print(f"S={S} BM={BM} k={K} merge>{M}: total steps {tot}, merged tiles {mg} of {S//BN}; first 5 {pt[:5]}; last 5 {pt[-5:]}")
