"""Sparsemax against the `entmax` package (an independent oracle of the reference and its gradient).

Everything else (the torch path, the Triton forward and backward under masks, causal kinds, GQA, Dqk != Dv,
softcap, empty rows, dropout, the transformers name, compare and bench) comes from the registry grid."""

import pytest
import torch
from helpers import rel_err

import flashmaps
from flashmaps import reference

entmax = pytest.importorskip("entmax")


def test_reference_matches_the_entmax_package_row_by_row():
    """Masked rows: entmax.sparsemax over each row's allowed scores only."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(40, 33, generator=g, dtype=torch.float64) * torch.tensor([0.1, 1.0, 5.0]).repeat(14)[:40, None]
    allowed = torch.rand(40, 33, generator=g) < 0.6
    allowed[0] = False
    allowed[1] = False
    allowed[1, 4] = True
    p = flashmaps.Sparsemax().reference_weights(s, allowed)
    for i in range(40):
        want = torch.zeros(33, dtype=torch.float64)
        if allowed[i].any():
            want[allowed[i]] = entmax.sparsemax(s[i, allowed[i]], dim=-1)
        assert torch.allclose(p[i], want, atol=1e-12), i
    assert torch.equal(p[0], torch.zeros(33, dtype=torch.float64)) and p[1, 4] == 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_attention_and_gradients_match_the_entmax_package(backend):
    q, k, v = (torch.randn(1, 2, 13, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    q = q * 2
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    out = flashmaps.attention(qq, kk, vv, "sparsemax", backend=backend)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    s, _ = reference.scores_and_allowed(q64, k64)
    want = entmax.sparsemax(s, dim=-1) @ v64
    assert rel_err(out, want) < 1e-5
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (qq, kk, vv), dout)
    ref = torch.autograd.grad(want, (q64, k64, v64), dout.double())
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-4
    assert (entmax.sparsemax(s, dim=-1) == 0).any()               # a genuinely sparse case
