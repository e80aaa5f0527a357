"""The one FLOP model of the benchmarks (every TFLOP/s figure flashmaps prints or plots comes from here).

    pairs      = number of allowed (query i, key j) pairs of one head:
                   no mask        L * S
                   "upper_left"   sum_i min(i + 1, S)               (j <= i)
                   "lower_right"  sum_i clamp(i + S - L + 1, 0, S)  (j <= i + S - L)
    fwd        = 2 * B * Hq * pairs * (Dqk + Dv)        S = Q K^T (Dqk) and O = P V (Dv)
    bwd        = 2 * B * Hq * pairs * (3 * Dqk + 2 * Dv) recompute S = Q K^T, dP = dO V^T, dV = P^T dO,
                                                         dQ = dS K, dK = dS^T Q  (= 2.5 x fwd when Dqk = Dv)
    fwd+bwd    = fwd + bwd
    decode     = fwd with L = 1

A multiply-add counts as 2 FLOPs; element-wise work (exp, tanh, thresholds) is not counted. The count is the
same NOMINAL work for every provider, whatever it really does (an entmax threshold pre-pass re-reads Q K^T,
a dense baseline materializes all L * S scores, a causal kernel may or may not skip masked tiles), so
TFLOP/s = nominal FLOPs / time is a speed comparable across providers, not a hardware utilization.
"""

from __future__ import annotations

__all__ = ["MODES", "allowed_pairs", "attention_flops", "linear_flops"]

#: the benchmark modes; "decode" is a forward pass with one query row (L = 1) against S keys
MODES = ("fwd", "bwd", "fwd+bwd", "decode")


def _sum_clamped(a: int, n: int, hi: int) -> int:
    """sum_{i=0}^{n-1} clamp(a + i, 0, hi) for integers, in O(1)."""
    if n <= 0 or hi <= 0:
        return 0
    # terms below 0 contribute 0, terms in [0, hi] contribute themselves, terms above hi contribute hi
    first_pos = max(0, -a)  # first i with a + i >= 0
    first_cap = max(0, hi - a)  # first i with a + i >= hi
    lo_i, mid_end = min(first_pos, n), min(first_cap, n)
    total = 0
    if mid_end > lo_i:  # i in [lo_i, mid_end): a + i in [0, hi)
        cnt = mid_end - lo_i
        total += cnt * (a + lo_i) + cnt * (cnt - 1) // 2
    if n > max(mid_end, lo_i):
        total += (n - max(mid_end, lo_i)) * hi
    return total


def allowed_pairs(L: int, S: int, causal=None) -> int:
    """Number of allowed (i, j) pairs of one head: L*S, or the causal count (see the module docstring)."""
    if causal in (None, False):
        return L * S
    if causal in (True, "upper_left"):
        return _sum_clamped(1, L, S)  # row i keeps min(i + 1, S) keys
    if causal == "lower_right":
        return _sum_clamped(S - L + 1, L, S)  # row i keeps clamp(i + S - L + 1, 0, S) keys
    raise ValueError(f"causal must be None/False, True, 'upper_left' or 'lower_right', got {causal!r}")


def attention_flops(mode: str, B: int, Hq: int, L: int, S: int, Dqk: int, Dv: int | None = None, causal=None) -> int:
    """Nominal FLOPs of one call in ``mode`` ("fwd", "bwd", "fwd+bwd", "decode") for q (B, Hq, L, Dqk),
    k (B, Hkv, S, Dqk), v (B, Hkv, S, Dv); for "decode" L is taken as 1 whatever is passed."""
    Dv = Dqk if Dv is None else Dv
    if mode == "decode":
        L = 1
    pairs = B * Hq * allowed_pairs(L, S, causal)
    return _by_mode(mode, 2 * pairs * (Dqk + Dv), 2 * pairs * (3 * Dqk + 2 * Dv))


def _by_mode(mode: str, fwd: int, bwd: int) -> int:
    """The count of ``mode`` from the forward's and the backward's."""
    if mode in ("fwd", "decode"):
        return fwd
    if mode == "bwd":
        return bwd
    if mode == "fwd+bwd":
        return fwd + bwd
    raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


def linear_flops(mode: str, B: int, Hq: int, L: int, S: int, Dqk: int, Dv: int | None = None, causal=None,
                 chunk: int = 16) -> int:
    """FLOPs of the chunked linear form of order-2 Taylor attention as the Triton kernel
    (``kernels/linear.py``) computes it, the count of the ``flashmaps-taylor-triton-linear`` provider (its
    rows are NOT the nominal ``attention_flops``: the linear form does other work). Per (batch, query head),
    with F' = D + D^2 (orders 1 and 2 over the full square of the head dim; order 0 is an add),
    n = the keys that enter the state (S; causal upper_left min(L, S), the keys some row sees) and
    C = chunk (the full C x C diagonal tile is computed, causal only):

        fwd  = 2 * (L + n) * F' * (Dv + 1)        phi(q') U readout per row, phi(k) [v, 1]^T per key
             + 2 * L * C * (D + Dv)               causal: the diagonal tile s = q' k^T and A v
        bwd  = 2 * (2 L + 3 n) * F' * (Dv + 1)    dq pass: the state again + dy U^T per row; dk/dv pass: the
                                                  reverse state per row, dv and dk from it per key
             + 2 * L * C * (4 D + 3 Dv)           causal: s twice, dA twice, ds k, ds^T q', A^T g
    """
    Dv = Dqk if Dv is None else Dv
    if mode == "decode":
        L = 1
    if causal in (None, False):
        n, diag = S, 0
    elif causal in (True, "upper_left", "lower_right"):
        n, diag = min(S, max(0, L if causal != "lower_right" else S)), chunk
    else:
        raise ValueError(f"causal must be None/False, True, 'upper_left' or 'lower_right', got {causal!r}")
    feats = (Dqk + Dqk * Dqk) * (Dv + 1)
    return _by_mode(mode, 2 * B * Hq * ((L + n) * feats + L * diag * (Dqk + Dv)),
                    2 * B * Hq * ((2 * L + 3 * n) * feats + L * diag * (4 * Dqk + 3 * Dv)))
