"""Autotune candidates must fit the GPU's shared memory for every input dtype.

Regression: on the H100 (2026-11-22) the fp32 forward at D=128 picked only configs that asked for
262144 bytes of shared memory (limit 232448) and every fp32 CUDA call failed with OutOfResources; the
candidates had been written for 2-byte inputs. The prune step now shrinks them for the dtype.
"""

import pytest

triton_path = pytest.importorskip("flashmaps.triton_path")

H100_SMEM = 232448


def _need(c, streamed, BD, BDV, esize):
    resident = "BN" if streamed == "BM" else "BM"
    return (c.num_stages * c.kwargs[streamed] + c.kwargs[resident]) * (BD + BDV) * esize


@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("esize", [2, 4], ids=["bf16", "fp32"])
@pytest.mark.parametrize("table,streamed", [
    (triton_path.CONFIGS_BY_DIM, "BN"),
    (triton_path.BWD_CONFIGS_BY_DIM["dkdv"], "BM"),
    (triton_path.BWD_CONFIGS_BY_DIM["dq"], "BN"),
], ids=["fwd", "dkdv", "dq"])
def test_configs_fit_shared_memory(table, streamed, dim, esize):
    import triton

    budget = int(H100_SMEM * triton_path.SMEM_FRACTION)
    configs = [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in table[dim]]
    fitted = triton_path._fit_smem(configs, esize, budget, streamed, dim, dim)
    assert fitted, "no candidate left"
    for c in fitted:
        assert _need(c, streamed, dim, dim, esize) <= budget
        assert c.num_stages >= 1 and c.kwargs["BM"] >= 16 and c.kwargs["BN"] >= 16
    if esize == 2 and dim <= 128:  # the bf16 candidates measured on the H100 stay as written
        assert {(c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages) for c in fitted} == set(table[dim])
