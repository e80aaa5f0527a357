"""harmonic:<n>: softmax over the distance form of the score, s = -(n/2) ln(max(scale ||q - k||^2, tiny)).

Options and errors, the reference against the definition p_j ~ d_j^-n, float64 gradcheck of the torch path,
the Triton kernels (forward and backward under the interpreter) against float64 autograd of the reference
for option values and cases the registry grid does not run, and the zero-distance floor.
"""

from __future__ import annotations

import pytest
import torch

import flashmaps
from flashmaps import ops, reference, triton_path
from flashmaps.normalizers.harmonic import Harmonic

from helpers import grad_err, make_mask, make_qkv, reference_grads, rel_err


def test_spec_and_options():
    assert flashmaps.parse("harmonic") == Harmonic(2.0)
    assert flashmaps.parse("harmonic:0.5") == Harmonic(0.5)
    for n in (Harmonic(3), Harmonic(0.1), Harmonic(1 / 3)):
        assert flashmaps.parse(n.spec) == n
    assert Harmonic(3).score_power == 3.0 and Harmonic.score == "distance"


@pytest.mark.parametrize("bad", ["harmonic:0", "harmonic:-1", "harmonic:x", "harmonic:inf", "harmonic:nan", "harmonic:"])
def test_bad_options(bad):
    with pytest.raises(ValueError, match=r"n must be a finite number > 0"):
        flashmaps.parse(bad)


def test_bad_option_types():
    with pytest.raises(TypeError, match="n must be a number"):
        Harmonic("2")
    with pytest.raises(ValueError, match="n must be a finite number > 0"):
        Harmonic(0.0)


@pytest.mark.parametrize("n", [0.5, 2.0, 3.0])
def test_reference_is_inverse_distance_power(n):
    """The reference's weights are d_j^-n / sum d_i^-n with d^2 = scale ||q - k||^2 (the definition,
    computed here without logs), under a causal mask."""
    q, k, v = make_qkv(1, 2, 1, 6, 9, 5, device="cpu", seed=3)
    _, p = reference.attention(q, k, v, Harmonic(n), causal="lower_right", enable_gqa=True, return_weights=True)
    d2 = (q.double()[..., :, None, :] - k.double()[..., None, :, :]).square().sum(-1) / 5 ** 0.5  # (1, 2, 6, 9)
    w = d2 ** (-n / 2) * torch.ones(6, 9).tril(9 - 6).double()
    assert rel_err(p, w / w.sum(-1, keepdim=True)) < 1e-12


def test_torch_path_gradcheck():
    """float64 gradcheck of the torch path (GQA, Dqk != Dv, float mask with holes, lower-right causal, softcap)."""
    q, k, v = make_qkv(1, 2, 1, 5, 7, 3, Dv=4, dtype=torch.float64, device="cpu", seed=4)
    mask = make_mask("float", 1, 2, 5, 7, dtype=torch.float64, device="cpu", seed=5)
    seed = torch.zeros((), dtype=torch.int64)

    def fn(q_, k_, v_):
        return ops.attention("torch", q_, k_, v_, Harmonic(3.0), mask=mask, causal="lower_right", scale=0.7,
                             softcap=4.0, dropout_p=0.0, return_stats=False, seed=seed)

    inputs = [x.requires_grad_() for x in (q, k, v)]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("n,mask_kind,causal,softcap", [
    pytest.param(0.5, "bool", "upper_left", None, id="n0.5-bool-upper_left"),
    pytest.param(3.0, "float", "lower_right", 3.0, id="n3-float-lower_right-softcap"),
])
def test_triton_against_reference(n, mask_kind, causal, softcap):
    """Forward, lse and (dq, dk, dv) of the Triton kernels against float64 autograd of the reference: GQA,
    Dqk != Dv, ragged tiles."""
    B, Hq, Hkv, L, S, D, Dv = 1, 4, 2, 19, 23, 12, 20
    q, k, v = make_qkv(B, Hq, Hkv, L, S, D, Dv=Dv, device="cpu", seed=6)
    mask = make_mask(mask_kind, B, Hq, L, S, device="cpu", seed=7)
    dout = torch.randn(B, Hq, L, Dv, generator=torch.Generator().manual_seed(8))
    norm = Harmonic(n)
    full = None if mask is None else mask.expand(B, Hq, L, S)
    res = triton_path.launch_forward(q, k, v, norm, mask=full, causal=causal, softcap=softcap, save_extras=True)
    ref = reference_grads(q, k, v, dout, norm, mask=mask, causal=causal, softcap=softcap)
    assert rel_err(res.out, ref[0]) < 1e-5
    dq, dk, dv = triton_path.launch_backward(dout, q, k, v, res.out, list(res.stats.values()), res.extras, norm,
                                             mask=full, causal=causal, softcap=softcap)
    for got, want in zip((dq, dk, dv), ref[1:]):
        assert grad_err(got, want) < 1e-4


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_distance_is_finite_and_dominant(backend):
    """A key equal to its query (distance 0, up to the rounding of |q|^2 + |k|^2 - 2 q.k) gets nearly all the
    weight, finite, and the gradients stay finite; q = k = 0 exactly is the floor (tiny), still finite."""
    q, k, v = make_qkv(1, 1, 1, 4, 6, 8, device="cpu", seed=9)
    k = k.clone()
    k[0, 0, 2] = q[0, 0, 1]                       # row 1 meets its own vector at key 2
    q = q.clone()
    q[0, 0, 3] = 0.0
    k[0, 0, 5] = 0.0                              # row 3: an exact zero distance at key 5
    eye = torch.eye(6)[None, None]                # v = I: the output is the weights
    leaves = [x.clone().requires_grad_() for x in (q, k, eye)]
    out = flashmaps.attention(*leaves, "harmonic", backend=backend)
    assert out[0, 0, 1, 2] > 0.99 and out[0, 0, 3, 5] > 0.99
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)
