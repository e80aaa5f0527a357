"""gumbel:<tau>: p = softmax((s + g) / tau) with standard Gumbel noise g drawn per call in the kernels.

Options and errors, the noise (Triton's in-kernel Philox equals ``flashmaps.gumbel_noise``; its moments), the
seed (torch.manual_seed reproduces a call on both backends, which draw the same noise), forward and backward
against float64 autograd of the reference given the materialized noise (so the backward saw the forward's
noise), float64 gradcheck of the torch path, and the Gumbel-max identity as a statistical test.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

import flashmaps
from flashmaps import ops, reference, torch_path, triton_path
from flashmaps.kernels.gumbel import gumbel_noise as kernel_noise
from flashmaps.normalizers.gumbel import Gumbel

from helpers import KERNEL_DEVICE, grad_err, make_mask, make_qkv, rel_err

EULER_GAMMA = 0.5772156649015329


def test_spec_and_options():
    assert flashmaps.parse("gumbel") == Gumbel(1.0)
    assert flashmaps.parse("gumbel:0.25") == Gumbel(0.25)
    for g in (Gumbel(3), Gumbel(0.1), Gumbel(1 / 3)):
        assert flashmaps.parse(g.spec) == g
    assert Gumbel.stochastic and not flashmaps.parse("softmax").stochastic


@pytest.mark.parametrize("bad", ["gumbel:0", "gumbel:-2", "gumbel:abc", "gumbel:inf", "gumbel:"])
def test_bad_options(bad):
    with pytest.raises(ValueError, match=r"tau must be a finite number > 0"):
        flashmaps.parse(bad)
    with pytest.raises(TypeError, match="tau must be a number"):
        Gumbel(None)


def test_merge_with_other_noise_is_a_gumbel_sample_of_the_union():
    """Parts over sliced keys (their own S and seeds) merge by LSE into softmax((s + g') / tau) over the union,
    g' the parts' own noise: checked against the reference with the parts' noise put together."""
    q, k, v = make_qkv(1, 2, 2, 5, 12, 8, device="cpu", seed=11)
    norm = Gumbel(0.5)
    outs, stats, noise = [], [], []
    for sl in (slice(0, 5), slice(5, 12)):
        torch.manual_seed(40 + sl.start)
        seed = torch_path.draw_seed()
        torch.manual_seed(40 + sl.start)
        o, st = flashmaps.attention(q, k[:, :, sl], v[:, :, sl], norm, return_stats=True, backend="torch")
        outs.append(o)
        stats.append(st)
        noise.append(flashmaps.gumbel_noise(seed, (1, 2, 5, sl.stop - sl.start)))
    out, _ = flashmaps.merge(norm, outs, stats)
    s, allowed = reference.scores_and_allowed(q, k)
    p = norm.reference_weights(s + torch.cat(noise, -1).double(), allowed)
    assert rel_err(out, p @ v.double()) < 1e-5


@triton.jit
def _noise_kernel(Out, seed, L, S, BM: tl.constexpr, BN: tl.constexpr):
    bh = tl.program_id(0)
    i = tl.arange(0, BM)[:, None]
    j = tl.arange(0, BN)[None, :]
    tl.store(Out + (bh * L + i) * S + j, kernel_noise(seed, bh, i, j), mask=(i < L) & (j < S))


@pytest.mark.parametrize("seed", [0, 77, 2**62 - 3])
def test_kernel_noise_is_gumbel_noise(seed):
    """The kernels' noise hook draws exactly the numbers of flashmaps.gumbel_noise (float32 logs aside)."""
    B, Hq, L, S = 3, 5, 7, 11
    out = torch.empty(B, Hq, L, S, device=KERNEL_DEVICE)
    _noise_kernel[(B * Hq,)](out, seed, L, S, BM=8, BN=16)
    want = flashmaps.gumbel_noise(seed, (B, Hq, L, S))
    assert torch.allclose(out.cpu(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(want[:, :, :4, :6], flashmaps.gumbel_noise(seed, (B, Hq, 4, 6)))   # not a function of L, S


def test_noise_moments():
    """Standard Gumbel: mean = Euler's gamma, variance = pi^2 / 6; tolerances are 5 standard errors of the
    sample (the variance of the sample variance from the Gumbel's fourth central moment, 3 (pi^2/6)^2 * 2.4)."""
    g = flashmaps.gumbel_noise(123, (2, 4, 64, 64)).double()
    n = g.numel()
    var = math.pi**2 / 6
    assert abs(g.mean().item() - EULER_GAMMA) < 5 * math.sqrt(var / n)
    mu4 = var**2 * (3 + 12 / 5)                        # excess kurtosis of the Gumbel: 12/5
    assert abs(g.var().item() - var) < 5 * math.sqrt((mu4 - var**2) / n)
    assert torch.isfinite(g).all()
    assert not torch.equal(g, flashmaps.gumbel_noise(124, (2, 4, 64, 64)).double())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_manual_seed_reproduces_and_backends_agree(backend):
    q, k, v = make_qkv(1, 2, 1, 9, 13, 8, device="cpu", seed=1)
    torch.manual_seed(5)
    a = flashmaps.attention(q, k, v, "gumbel:0.5", backend=backend, enable_gqa=True)
    torch.manual_seed(5)
    b = flashmaps.attention(q, k, v, "gumbel:0.5", backend=backend, enable_gqa=True)
    c = flashmaps.attention(q, k, v, "gumbel:0.5", backend=backend, enable_gqa=True)
    torch.manual_seed(5)
    other = flashmaps.attention(q, k, v, "gumbel:0.5", backend="torch" if backend == "triton" else "triton",
                                enable_gqa=True)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert rel_err(a, other) < 1e-5
    torch.manual_seed(5)
    seed = torch_path.draw_seed()                      # the seed the call drew
    assert rel_err(a, reference.attention(q, k, v, "gumbel:0.5", enable_gqa=True, noise_seed=seed)) < 1e-5


@pytest.mark.parametrize("tau,mask_kind,causal,softcap,dropout_p", [
    pytest.param(0.3, "bool", "lower_right", None, 0.0, id="tau0.3-bool-lower_right"),
    pytest.param(2.0, "float", "upper_left", 5.0, 0.2, id="tau2-float-upper_left-softcap-dropout"),
])
def test_triton_against_reference(tau, mask_kind, causal, softcap, dropout_p):
    """Forward, lse and (dq, dk, dv) of the Triton kernels with seed 31 against float64 autograd of the
    reference given the noise of seed 31: the backward recomputes the forward's noise (GQA, Dqk != Dv)."""
    B, Hq, Hkv, L, S, D, Dv = 1, 4, 2, 17, 21, 12, 20
    q, k, v = make_qkv(B, Hq, Hkv, L, S, D, Dv=Dv, device="cpu", seed=2)
    mask = make_mask(mask_kind, B, Hq, L, S, device="cpu", seed=3)
    full = mask.expand(B, Hq, L, S)
    dout = torch.randn(B, Hq, L, Dv, generator=torch.Generator().manual_seed(4))
    norm, seed = Gumbel(tau), 31
    drop = None
    if dropout_p:
        drop = triton_path.dropout_keep_mask(seed, (B, Hq, L, S), dropout_p, device="cpu") / (1 - dropout_p)
    res = triton_path.launch_forward(q, k, v, norm, mask=full, causal=causal, softcap=softcap, save_extras=True,
                                     seed=seed, dropout_p=dropout_p)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = reference.attention(*leaves, norm, causal=causal, attn_mask=mask, softcap=softcap, enable_gqa=True,
                              dropout_mask=drop, noise_seed=seed)
    ref.backward(dout.double())
    assert rel_err(res.out, ref) < 1e-5
    s, allowed = reference.scores_and_allowed(q, k, causal=causal, attn_mask=mask, softcap=softcap,
                                              enable_gqa=True, normalizer=norm, noise_seed=seed)
    want_lse = norm.reference_stats(s, allowed)["lse"]
    fin = torch.isfinite(want_lse)
    assert torch.allclose(res.stats["lse"].double()[fin], want_lse[fin], atol=1e-4)
    dq, dk, dv = triton_path.launch_backward(dout, q, k, v, res.out, list(res.stats.values()), res.extras, norm,
                                             mask=full, causal=causal, softcap=softcap, seed=seed,
                                             dropout_p=dropout_p)
    for got, leaf in zip((dq, dk, dv), leaves):
        assert grad_err(got, leaf.grad) < 1e-4


def test_torch_path_gradcheck():
    """float64 gradcheck of the torch path at a fixed seed (GQA, Dqk != Dv, float mask, causal, softcap)."""
    q, k, v = make_qkv(1, 2, 1, 5, 7, 3, Dv=4, dtype=torch.float64, device="cpu", seed=5)
    mask = make_mask("float", 1, 2, 5, 7, dtype=torch.float64, device="cpu", seed=6)
    seed = torch.tensor(1234, dtype=torch.int64)

    def fn(q_, k_, v_):
        return ops.attention("torch", q_, k_, v_, Gumbel(0.7), mask=mask, causal="upper_left", scale=0.6,
                             softcap=3.0, dropout_p=0.0, return_stats=False, seed=seed)

    assert torch.autograd.gradcheck(fn, [x.requires_grad_() for x in (q, k, v)], eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend,rows", [("torch", 4096), ("triton", 512)])
def test_gumbel_max_identity(backend, rows):
    """P[argmax_j (s_j + g_j) = j] = softmax(s)_j: ``rows`` identical query rows (each row draws its own
    noise), two calls, v = I so that the output rows are the weights. (1) The argmax of each row's weights
    is argmax(s + g) for any tau: its frequencies match softmax(s) within 5 binomial standard errors
    (plus 1/N). (2) At tau = 1e-3 the mean weights match softmax(s) within the same bound plus the bias of a
    finite tau, at most (S - 1) tau / 4 per key (a Gumbel difference has density <= 1/4, and a key loses
    weight e^(-gap / tau) to the row's winner)."""
    S, D, tau = 6, 4, 1e-3
    g = torch.Generator().manual_seed(7)
    k = torch.randn(1, 1, S, D, generator=g)
    q = torch.randn(1, 1, 1, D, generator=g).expand(1, 1, rows, D).contiguous()
    eye = torch.eye(S)[None, None]
    probs = torch.softmax((q[0, 0, 0] @ k[0, 0].T) / math.sqrt(D), -1).double()           # [S]
    outs = []
    for call in range(2):
        torch.manual_seed(100 + call)
        outs.append(flashmaps.attention(q, k, eye, Gumbel(tau), backend=backend)[0, 0].double())  # [rows, S]
    p = torch.cat(outs)
    n = p.shape[0]
    freq = torch.bincount(p.argmax(-1), minlength=S).double() / n
    bound = 5 * torch.sqrt(probs * (1 - probs) / n) + 1 / n
    assert ((freq - probs).abs() <= bound).all(), (freq, probs)
    assert ((p.mean(0) - probs).abs() <= bound + (S - 1) * tau / 4).all(), (p.mean(0), probs)
