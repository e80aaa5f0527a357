"""Numpy replay of top-k COLLECT: scores collected above the k-th largest group maximum, and buffer steps with that floor. Usage: python topk_collect_counts.py S BM G

Referenced by bench/TUNING.md (predictions made without a GPU)."""
import numpy as np, sys, heapq
rng = np.random.default_rng(0)
S = int(sys.argv[1]); BM = int(sys.argv[2]); BN = 64; k = 64; G = int(sys.argv[3]) if len(sys.argv) > 3 else 1
for dist in ("normal", "t3"):
    s = rng.standard_normal((BM, S)) if dist == "normal" else rng.standard_t(3, (BM, S))
    # group maxima: groups of BN // G consecutive keys
    gm = s.reshape(BM, -1, BN // G).max(2)
    lb = -np.sort(-gm, 1)[:, k - 1]
    c = (s >= lb[:, None]).sum(1)
    tau = -np.sort(-s, 1)[:, k - 1]
    # stage-2 buffer with floor lb: steps per tile = blockmax of inserted count
    total = 0
    bufs = [[] for _ in range(BM)]
    for t0 in range(0, S, BN):
        mx = 0
        for r in range(BM):
            h = bufs[r]; cnt = 0
            for x in sorted(s[r, t0:t0+BN], reverse=True):
                theta = h[0] if len(h) >= k else lb[r]
                if x >= theta and (len(h) < k or x > h[0]):
                    if len(h) >= k: heapq.heapreplace(h, x)
                    else: heapq.heappush(h, x)
                    cnt += 1
                else: break
            mx = max(mx, cnt)
        total += mx
    ok = all(abs(bufs[r][0] - tau[r]) < 1e-12 for r in range(BM))
    print(f"{dist} S={S} G={G}: count >= LB: mean {c.mean():.0f} max {c.max()} (k={k}); stage-2 buffer steps {total} over {S//BN} tiles; exact {ok}")
