"""Block configurations of the Triton kernels: the autotune candidates, the shared-memory fit, and the
autotuned kernel wrappers (the launcher in :mod:`flashmaps.triton_path` calls these or pins a config).

Candidates are (BM, BN, num_warps, num_stages) per padded head-dim class (max(BD, BDV) <= 64, <= 128,
<= 256), from the H100 sweeps (bench/TUNING.md; softmax, L = S = 8k, bf16, not causal).
"""

from __future__ import annotations

import torch
import triton

from .kernels.backward import attn_bwd_dkdv, attn_bwd_dq
from .kernels.tile_loop import attn_fwd

__all__ = ["CONFIGS_BY_DIM", "BWD_CONFIGS_BY_DIM", "FP32_FALLBACK", "dim_class", "smem_estimate", "fit_smem",
           "attn_fwd_tuned", "attn_bwd_dkdv_tuned", "attn_bwd_dq_tuned", "attn_bwd_dkdvq_tuned"]

#: forward: D = 128 (128, 128, 8, 3) 2.38 ms, (64, 64, 4, 3) 2.67, (128, 64, 8, 3) 2.71; D = 64 (128, 64, 8, 3)
#: 2.65 ms, (128, 128, 4, 3) 2.67, (64, 64, 4, 3) 2.82 (earlier first pick (128, 64, 4, 3): 3.09). entmax15 and
#: top-k were fastest at (64, 64, 4, 3) for both head dims.
CONFIGS_BY_DIM = {
    64: ((128, 64, 8, 3), (128, 128, 4, 3), (64, 64, 4, 3)),
    128: ((128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)),
    256: ((64, 64, 8, 2), (64, 32, 4, 2), (64, 64, 4, 2)),
}
#: added for fp32 inputs: small enough to fit whatever the others need (fp32 with 3xTF32 stores each streamed
#: operand twice, see `fit_smem`), so that autotuning never ends with every candidate out of resources
FP32_FALLBACK = (64, 32, 4, 1)

#: backward, per kernel. The dK/dV kernel keeps k, v, dk, dv tiles [BN, D] resident and streams BM query
#: rows; the dQ kernel keeps q, dO, dq [BM, D] and streams BN keys. D = 128 from the H100 sweep: dK/dV
#: (64, 64, 4, 2) 12.6 ms and (128, 64, 8, 2) 13.1 ms against 22.2 ms for the earlier (64, 32, 8, 2), whose
#: 8 warps on 32-key tiles starved the MMAs; dQ (128, 128, 8, 2) and (64, 64, 4, 2) each 4.5-5 ms faster than
#: (64, 64, 8, 2). D = 64 (second sweep, same shapes): dK/dV (64, 64, 4, 3) 9.18 ms, (128, 128, 8, 2) 9.28,
#: (64, 64, 4, 2) 10.17; dQ (64, 64, 4, 3) 0.6 ms faster than (64, 64, 4, 2). D = 256 keeps the small blocks
#: that compile without register spills (ptxas, not timed). BM >= 64 up to D = 128, like the forward, so
#: that the recomputed score tiles go through the same MMA shape (top-k compares them against the forward's
#: threshold).
BWD_CONFIGS_BY_DIM = {
    "dkdv": {64: ((64, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 2)), 128: ((64, 64, 4, 2), (128, 64, 8, 2)),
             256: ((32, 16, 4, 1),)},
    "dq": {64: ((64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 4, 2)),
           128: ((128, 128, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2)),
           256: ((32, 32, 4, 1), (32, 16, 4, 1))},
    # dK/dV with the atomic dQ (Static.ATOMIC_DQ; not timed yet): dK/dV's candidates, plus at D = 128 8 warps on
    # 64 x 64 tiles, where the dQ tile [BM, D] fp32 costs half the registers per thread (offline sm_90 build, causal:
    # softmax 40 B of stack against 336 B with 4 warps, entmax15 184 against 616; bench/TUNING.md, issue 17). At
    # D = 128 the 8-warp tile comes first: with 4 warps ptxas serializes softmax's full-attention wgmma pipeline
    # (C7512, 184 B of stack; 8 warps: none, 0 B; entmax15 656 -> 208 B; bench/results/offline/sm90-report.md)
    "dkdvq": {64: ((64, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 2)),
              128: ((64, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2)),
              256: ((32, 16, 4, 1),)},
}

#: fraction of the device's shared memory the estimate below may use: the estimate matched both figures the
#: H100 reported (see `smem_estimate`), and a candidate that still does not fit is skipped by the autotuner
SMEM_FRACTION = 1.0

_ESIZE = {"torch.float16": 2, "torch.bfloat16": 2, "torch.float32": 4}


def dim_class(bd: int, bdv: int) -> int:
    return next(c for c in CONFIGS_BY_DIM if max(bd, bdv) <= c)


def _config(t) -> triton.Config:
    bm, bn, w, st = t
    return triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st)


def _key(c: triton.Config) -> tuple:
    return c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages


def _smem_budget(t: torch.Tensor) -> int:
    if t.device.type != "cuda":
        return 1 << 62  # the interpreter has no shared memory limit
    props = triton.runtime.driver.active.utils.get_device_properties(t.device.index or 0)
    return int(props["max_shared_mem"] * SMEM_FRACTION)


def smem_estimate(blocks: dict, stages: int, esize: int, streamed: str, streamed_cols: int,
                  resident_cols: int) -> int:
    """Shared memory (bytes) of a kernel that keeps ``stages`` copies of the streamed tiles (``streamed``
    block rows x ``streamed_cols``) plus one resident tile (the other block x ``resident_cols``).
    Checked against the H100 twice (both fp32 forwards, 262144 bytes): D = 128 with BM = 128, BN = 64,
    3 stages, ieee dot: 3 * 64 * 256 * 4 + 128 * 128 * 4; and D = 72, Dv = 64 (BD = 128, BDV = 64) with
    BM = 128, BN = 64, 2 stages, 3xTF32 dot (which keeps a high and a low part of each streamed operand:
    ``streamed_cols`` doubled by the caller): 2 * 64 * 384 * 4 + 128 * 128 * 4."""
    resident = "BN" if streamed == "BM" else "BM"
    return (stages * blocks[streamed] * streamed_cols + blocks[resident] * resident_cols) * esize


def fit_smem(configs, esize: int, budget: int, streamed: str, streamed_cols: int, resident_cols: int):
    """Shrink the configs whose `smem_estimate` exceeds ``budget`` bytes: fewer stages first, then half
    the streamed block. The configs are written for 2-byte inputs; fp32 needs twice the memory (found on
    the H100: every fp32 candidate at D = 128 failed with OutOfResources before this step), and fp32 gets
    the `FP32_FALLBACK` candidate too."""
    if esize >= 4:
        configs = list(configs) + [_config(FP32_FALLBACK)]
    out, seen = [], set()
    for c in configs:
        blocks, stages = dict(c.kwargs), c.num_stages

        def need():
            return smem_estimate(blocks, stages, esize, streamed, streamed_cols, resident_cols)

        while need() > budget and stages > 1:
            stages -= 1
        while need() > budget and blocks[streamed] > 16:
            blocks[streamed] //= 2
        key = (blocks["BM"], blocks["BN"], c.num_warps, stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config(blocks, num_warps=c.num_warps, num_stages=stages))
    return out


def _operand_copies(st) -> int:
    """Copies of each streamed operand in shared memory: 2 for the 3xTF32 dot (high and low parts)."""
    return 2 if st.DOT_PREC == "tf32x3" else 1


def _tuned(kernel, table: dict, streamed: str, streamed_cols, resident_cols, keys, reset_to_zero=None):
    """``kernel`` autotuned over the candidates of ``table`` (dim class -> tuples), pruned to the call's
    dim class and shrunk to fit the shared memory for its dtype. ``reset_to_zero``: the arguments (tensors) that
    the kernel accumulates into, zeroed before each timed run and after the search."""
    configs = [_config(t) for t in sorted({t for ts in table.values() for t in ts})]

    def prune(configs, named_args, **kwargs):
        st = kwargs["ST"]
        want = set(table[dim_class(st.BD, st.BDV)])
        kept = [c for c in configs if _key(c) in want]
        return fit_smem(kept, _ESIZE[st.DTYPE], _smem_budget(named_args["Q"].ptr), streamed,
                        streamed_cols(st) * _operand_copies(st), resident_cols(st))

    return triton.autotune(configs=configs, key=keys, prune_configs_by={"early_config_prune": prune},
                           reset_to_zero=reset_to_zero)(kernel)


#: the forward streams k and v tiles (BN x (BD + BDV)) past the resident q tile (BM x BD)
attn_fwd_tuned = _tuned(attn_fwd, CONFIGS_BY_DIM, "BN", lambda st: st.BD + st.BDV, lambda st: st.BD,
                        ["ST", "NORM", "L_BUCKET", "S_BUCKET", "SCRATCH_COLS"])
#: dK/dV streams query rows (q, dO) past resident k, v tiles; dQ streams keys past resident q, dO
attn_bwd_dkdv_tuned = _tuned(attn_bwd_dkdv, BWD_CONFIGS_BY_DIM["dkdv"], "BM", lambda st: st.BD + st.BDV,
                             lambda st: st.BD + st.BDV, ["ST", "NORM", "L_BUCKET", "S_BUCKET"])
attn_bwd_dq_tuned = _tuned(attn_bwd_dq, BWD_CONFIGS_BY_DIM["dq"], "BN", lambda st: st.BD + st.BDV,
                           lambda st: st.BD + st.BDV, ["ST", "NORM", "L_BUCKET", "S_BUCKET"])
#: the same kernel with ST.ATOMIC_DQ: it adds into its dQ accumulator DQA, zeroed around the timed runs
attn_bwd_dkdvq_tuned = _tuned(attn_bwd_dkdv, BWD_CONFIGS_BY_DIM["dkdvq"], "BM", lambda st: st.BD + st.BDV,
                              lambda st: st.BD + st.BDV, ["ST", "NORM", "L_BUCKET", "S_BUCKET"], reset_to_zero=["DQA"])
