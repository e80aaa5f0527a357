"""Autotune candidates must fit the GPU's shared memory for every input dtype.

Regression: on the H100 (2026-11-22) the fp32 forward at D=128 picked only configs that asked for
262144 bytes of shared memory (limit 232448) and every fp32 CUDA call failed with OutOfResources; the
candidates had been written for 2-byte inputs. The prune step now shrinks them for the dtype.
"""

import pytest

cfgs = pytest.importorskip("flashmaps.triton_configs")

H100_SMEM = 232448


def test_estimate_matches_the_h100_reports():
    """The shared-memory figures the H100 reported (both 262144 bytes): fp32 forward at D = 128 with BM = 128,
    BN = 64, 3 stages (ieee dot); and at D = 72, Dv = 64 (blocks 128 and 64) with 2 stages and the 3xTF32
    dot, which keeps two copies of each streamed operand."""
    assert cfgs.smem_estimate({"BM": 128, "BN": 64}, 3, 4, "BN", 128 + 128, 128) == 262144
    copies = cfgs._operand_copies(type("ST", (), {"DOT_PREC": "tf32x3"}))
    assert cfgs.smem_estimate({"BM": 128, "BN": 64}, 2, 4, "BN", (128 + 64) * copies, 128) == 262144


def test_fp32_gets_a_small_fallback_candidate():
    import triton

    configs = [triton.Config({"BM": 128, "BN": 128}, num_warps=8, num_stages=3)]
    fitted = cfgs.fit_smem(configs, 4, H100_SMEM, "BN", 2 * 256 * 2, 256)
    assert cfgs.FP32_FALLBACK in {(c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages) for c in fitted}
    assert len(cfgs.fit_smem(configs, 2, H100_SMEM, "BN", 256, 128)) == 1


KERNELS = {  # table, streamed block, columns of the streamed and resident tiles at head dim d
    "fwd": (cfgs.CONFIGS_BY_DIM, "BN", lambda d: (2 * d, d)),
    "dkdv": (cfgs.BWD_CONFIGS_BY_DIM["dkdv"], "BM", lambda d: (2 * d, 2 * d)),
    "dq": (cfgs.BWD_CONFIGS_BY_DIM["dq"], "BN", lambda d: (2 * d, 2 * d)),
    "dkdvq": (cfgs.BWD_CONFIGS_BY_DIM["dkdvq"], "BM", lambda d: (2 * d, 2 * d)),
}


@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("esize", [2, 4], ids=["bf16", "fp32"])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_configs_fit_shared_memory(kernel, dim, esize):
    import triton

    table, streamed, cols = KERNELS[kernel]
    s_cols, r_cols = cols(dim)
    budget = int(H100_SMEM * cfgs.SMEM_FRACTION)
    configs = [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in table[dim]]
    fitted = cfgs.fit_smem(configs, esize, budget, streamed, s_cols, r_cols)
    assert fitted, "no candidate left"
    for c in fitted:
        assert cfgs.smem_estimate(c.kwargs, c.num_stages, esize, streamed, s_cols, r_cols) <= budget
        assert c.num_stages >= 1 and c.kwargs["BM"] >= 16 and c.kwargs["BN"] >= 16
    # every candidate that fits as written is kept as written
    as_written = {(bm, bn, w, st) for bm, bn, w, st in table[dim]
                  if cfgs.smem_estimate({"BM": bm, "BN": bn}, st, esize, streamed, s_cols, r_cols) <= budget}
    assert as_written <= {(c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages) for c in fitted}
