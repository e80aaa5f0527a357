"""Autotune candidates must fit the GPU's shared memory for every input dtype.

Regression: on the H100 (2026-11-22) the fp32 forward at D=128 picked only configs that asked for
262144 bytes of shared memory (limit 232448) and every fp32 CUDA call failed with OutOfResources; the
candidates had been written for 2-byte inputs. The prune step now shrinks them for the dtype.
"""

import pytest

triton_path = pytest.importorskip("flashmaps.triton_path")

H100_SMEM = 232448


def test_estimate_matches_the_h100_report():
    """The one shared-memory figure the H100 reported (fp32 forward, D = 128, BM = 128, BN = 64, 3 stages)."""
    need = triton_path.smem_estimate({"BM": 128, "BN": 64}, 3, 4, "BN", 128 + 128, 128)
    assert need == 262144


KERNELS = {  # table, streamed block, columns of the streamed and resident tiles at head dim d
    "fwd": (triton_path.CONFIGS_BY_DIM, "BN", lambda d: (2 * d, d)),
    "dkdv": (triton_path.BWD_CONFIGS_BY_DIM["dkdv"], "BM", lambda d: (2 * d, 2 * d)),
    "dq": (triton_path.BWD_CONFIGS_BY_DIM["dq"], "BN", lambda d: (2 * d, 2 * d)),
}


@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("esize", [2, 4], ids=["bf16", "fp32"])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_configs_fit_shared_memory(kernel, dim, esize):
    import triton

    table, streamed, cols = KERNELS[kernel]
    s_cols, r_cols = cols(dim)
    budget = int(H100_SMEM * triton_path.SMEM_FRACTION)
    configs = [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in table[dim]]
    fitted = triton_path._fit_smem(configs, esize, budget, streamed, s_cols, r_cols)
    assert fitted, "no candidate left"
    for c in fitted:
        assert triton_path.smem_estimate(c.kwargs, c.num_stages, esize, streamed, s_cols, r_cols) <= budget
        assert c.num_stages >= 1 and c.kwargs["BM"] >= 16 and c.kwargs["BN"] >= 16
    # every candidate that fits as written is kept as written
    as_written = {(bm, bn, w, st) for bm, bn, w, st in table[dim]
                  if triton_path.smem_estimate({"BM": bm, "BN": bn}, st, esize, streamed, s_cols, r_cols) <= budget}
    assert as_written <= {(c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages) for c in fitted}
