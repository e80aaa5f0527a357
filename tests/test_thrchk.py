"""The threshold engine's exact polish on dense rows (issue 17 item 4, `thrchk`; bench/TUNING.md, "Issue 17 item 4:
the threshold engine row by row").

In a row whose support is (nearly) every key, the engine's first point (max z - 1 for sparsemax) lies far below tau
and F there is about the number of keys; a polish taken from there carries fp32 rounding of order eps F into
sum p (sparsemax at 512 dense keys: |sum p - 1| = 5.8e-5 before the fix). The kernel's tau must solve sum p = 1 to
fp32 rounding on such rows too.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_qkv

import flashmaps
from flashmaps import reference

triton_path = pytest.importorskip("flashmaps.triton_path")


@pytest.mark.parametrize("norm, alpha, spread", [pytest.param("sparsemax", 2.0, 0.3 / 512, id="sparsemax"),
                                                 pytest.param("entmax15", 1.5, 0.6 / 512 ** 0.5, id="entmax15")])
def test_dense_rows_sum_to_one(norm, alpha, spread):
    """One block of 16 rows over 512 keys whose scores spread by about `spread` (the support is every key): the
    kernel's tau gives sum_j (a s_j - tau)_+^(1/a) = 1 (a = alpha - 1) within 1e-5, the bound of the entmax15
    threshold test."""
    q, k, v = make_qkv(1, 1, 1, 16, 512, 16, seed=19)
    scale = spread / 4.0                                         # q . k ~ N(0, 16)
    # splits=1: the kernel's own pre-pass (at this small grid the default is split-KV, whose threshold is two-phase)
    res = triton_path.launch_forward(q, k, v, flashmaps.parse(norm), scale=scale, splits=1)
    s, _ = reference.scores_and_allowed(q, k, scale=scale)
    a = alpha - 1.0
    d = torch.clamp(a * s - res.stats["tau"].double()[..., None], min=0)
    assert (d > 0).double().mean() > 0.99                        # dense: (nearly) every key in the support
    sums = (d ** (1.0 / a)).sum(-1)
    assert (sums - 1).abs().max() < 1e-5
