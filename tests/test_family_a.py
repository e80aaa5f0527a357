"""Unit-specific tests of taylor:<k>, sigmoid[:<b>] and softpick (the registry-driven grid covers masks, causal
kinds, GQA, Dqk != Dv, softcap, dropout and gradients of their examples()): options and their errors, the
properties each formula promises, merges over disjoint key sets, and extreme scores."""

import math

import pytest
import torch
from helpers import KERNEL_DEVICE, grads, make_qkv, reference_grads, rel_err

import flashmaps
from flashmaps import linear, reference
from flashmaps import torch_path as TP
from flashmaps.normalizers import parse
from flashmaps.normalizers.softpick import SOFTPICK_EPS


def _torch(q, k, v, norm, **kw):
    return flashmaps.attention(q, k, v, norm, backend="torch", enable_gqa=True, **kw)


def _triton(q, k, v, norm, **kw):
    return flashmaps.attention(q, k, v, norm, backend="triton", enable_gqa=True, **kw)


def _check_triton_against_reference(norm, q, k, v, tol=1e-5, **kw):
    """Output and q, k, v gradients of the Triton kernels against float64 autograd of the reference."""
    dout = torch.randn(q.shape[:3] + v.shape[-1:], generator=torch.Generator().manual_seed(9)).to(q.device)
    got = grads(lambda *a: _triton(*a, norm, **kw), q, k, v, dout)
    ref = reference_grads(q, k, v, dout, norm, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert rel_err(a, b) < tol, (name, rel_err(a, b))


# ---------------------------------------------------------------------------------------------------- taylor


def test_taylor_spec_and_order_errors():
    assert parse("taylor:2") == parse("taylor") and parse("taylor").spec == "taylor"
    assert parse("taylor:4").spec == "taylor:4" and parse(parse("taylor:6").spec).k == 6
    for bad, why in [("taylor:3", "odd"), ("taylor:1", "odd"), ("taylor:0", "at least 2"), ("taylor:-4", "at least 2"),
                     ("taylor:4.0", "malformed"), ("taylor:x", "malformed")]:
        with pytest.raises(ValueError, match=why):
            parse(bad)
    with pytest.raises(TypeError, match="even int"):
        flashmaps.Taylor(4.0)


def test_taylor_f_positive_and_horner_matches_the_series():
    """f_k > 0 for even k (min s^k/k! at f_{k-1} = 0), and the fast paths' Horner equals the reference's
    term-by-term series."""
    from flashmaps.normalizers import taylor as T

    s = torch.linspace(-30, 30, 6001, dtype=torch.float64)
    for k in (2, 4, 6, 8):
        f = T._f(s, k)
        assert (f > 0).all()
        assert torch.allclose(T._horner(s, k), f, rtol=1e-12, atol=0)
    assert (T._f(s, 3) < 0).any()           # why odd orders are refused


def test_taylor_high_order_linear_form_refused_and_auto_quadratic():
    q, k, v = make_qkv(1, 2, 2, 1024, 1024, 16, device="cpu")
    with pytest.raises(ValueError, match="degree <= 2"):
        flashmaps.attention(q, k, v, "taylor:4", form="linear", backend="torch")
    assert linear.choose_form(q, k, v, "taylor:4", causal=True).form == "quadratic"
    assert linear.choose_form(q, k, v, "taylor", causal=True).form == "linear"      # order 2 keeps it
    with pytest.raises(ValueError, match="no linear form"):
        flashmaps.TaylorState.empty(1, 2, 16, 16, normalizer="taylor:4")


def test_taylor_order_6_gradcheck_and_kernels():
    """An order outside examples(): the torch path by gradcheck (float64), the Triton kernels (their own
    compile of K = 6) against the float64 reference, with masks and GQA."""
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 2, 1, 5, 7, 4, 3, dtype=torch.float64, device="cpu", seed=2))
    mask = torch.rand(5, 7, generator=torch.Generator().manual_seed(1)) < 0.7
    assert torch.autograd.gradcheck(lambda *a: _torch(*a, "taylor:6", attn_mask=mask, causal="lower_right"),
                                    (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)
    q, k, v = make_qkv(1, 4, 2, 21, 37, 16, 24, seed=3)
    _check_triton_against_reference("taylor:6", q, k, v, causal="upper_left")


def test_taylor4_fp16_near_its_score_limit():
    """f_4 ~ s^4/24 passes fp16's 65504 at |s| ~ 35: the kernels' f 2^-10 keeps scores up to taylor:4's
    score_limit (~196) finite and equal to the float32 torch path."""
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(1, 2, 16, 16, generator=g) * 5).half().to(KERNEL_DEVICE)       # |s| up to ~120
    k = (torch.randn(1, 2, 16, 16, generator=g) * 5).half().to(KERNEL_DEVICE)
    v = torch.randn(1, 2, 16, 16, generator=g).half().to(KERNEL_DEVICE)
    s_max = ((q.float() @ k.float().transpose(-1, -2)) / 4).abs().max().item()
    limit = parse("taylor:4").score_limit(torch.float16)
    assert 40 < s_max < limit < 200
    out, st = _triton(q, k, v, "taylor:4", return_stats=True)
    ref, ref_st = _torch(q.float(), k.float(), v.float(), "taylor:4", return_stats=True)
    assert torch.isfinite(out).all() and torch.isfinite(st["z"]).all()
    assert rel_err(out.float(), ref) < 2e-2 and rel_err(st["z"], ref_st["z"]) < 2e-2


# ---------------------------------------------------------------------------------------------------- sigmoid


def test_sigmoid_spec_and_bias_errors():
    assert parse("sigmoid").b is None and parse("sigmoid:-2.5") == flashmaps.Sigmoid(-2.5)
    assert parse(flashmaps.Sigmoid(0.1).spec) == flashmaps.Sigmoid(0.1)
    assert flashmaps.Sigmoid().for_keys(50).b == -math.log(50)
    for bad in ("sigmoid:inf", "sigmoid:nan", "sigmoid:x", "sigmoid:"):
        with pytest.raises(ValueError, match="sigmoid"):
            parse(bad)
    with pytest.raises(TypeError, match="finite real"):
        flashmaps.Sigmoid("1")
    with pytest.raises(ValueError, match="finite"):
        flashmaps.Sigmoid(float("-inf"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sigmoid_default_bias_is_minus_log_S(backend):
    """"sigmoid" over S keys equals "sigmoid:<-log S>", and the reference's weights are sigmoid(s - log S)."""
    q, k, v = make_qkv(1, 2, 2, 9, 23, 16, seed=4, device=KERNEL_DEVICE if backend == "triton" else "cpu")
    fn = _triton if backend == "triton" else _torch
    a = fn(q, k, v, "sigmoid", causal="lower_right")
    b = fn(q, k, v, f"sigmoid:{-math.log(23)!r}", causal="lower_right")
    assert torch.equal(a, b)
    s, allowed = reference.scores_and_allowed(q, k, causal="lower_right")
    _, p = reference.attention(q, k, v, "sigmoid", causal="lower_right", return_weights=True)
    want = torch.where(allowed, 1 / (1 + torch.exp(-s) * 23), torch.zeros_like(s))
    assert torch.allclose(p, want, rtol=1e-12, atol=0)


def test_sigmoid_explicit_bias_kernels_and_gradcheck():
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 2, 1, 5, 7, 4, 3, dtype=torch.float64, device="cpu", seed=5))
    assert torch.autograd.gradcheck(lambda *a: _torch(*a, "sigmoid:1.5", causal="upper_left", softcap=3.0),
                                    (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)
    q, k, v = make_qkv(1, 2, 1, 19, 40, 16, 8, seed=6)
    _check_triton_against_reference("sigmoid:1.5", q, k, v, causal="lower_right")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sigmoid_extreme_scores_and_empty_rows(backend):
    """|s| ~ 1e4: stable (no exp of a large positive number): weights exactly 0 or 1, no NaN; a row with no
    allowed key outputs 0 and has zero gradient."""
    dev = KERNEL_DEVICE if backend == "triton" else "cpu"
    q, k, v = make_qkv(1, 1, 1, 16, 16, 16, seed=7, spread=40.0, device=dev)
    mask = torch.ones(16, 16, dtype=torch.bool, device=dev)
    mask[3] = False
    eye = torch.eye(16, device=dev)[None, None]
    w = flashmaps.attention(q, k, eye, "sigmoid:0", attn_mask=mask, backend=backend)
    s = (q.double() @ k.double().transpose(-1, -2)) / 4
    assert s.abs().max() > 1000
    want = torch.where(mask, torch.sigmoid(s), torch.zeros_like(s))
    assert torch.isfinite(w).all() and (w[0, 0, 3] == 0).all()
    assert (w.double() - want).abs().max() < 1e-6
    qg = q.clone().requires_grad_()
    out = flashmaps.attention(qg, k, v, "sigmoid:0", attn_mask=mask, backend=backend)
    (dq,) = torch.autograd.grad(out, qg, torch.ones_like(out))
    assert torch.isfinite(dq).all() and (dq[0, 0, 3] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sigmoid_merge_of_key_parts(backend):
    """Key parts [0, 13) and [13, 30) merge by sums when every part uses the whole call's b = -log 30
    explicitly; with each part's own default b (-log 13, -log 17) they do not (documented)."""
    dev = KERNEL_DEVICE if backend == "triton" else "cpu"
    q, k, v = make_qkv(1, 2, 2, 11, 30, 16, seed=8, device=dev)
    run = _triton if backend == "triton" else _torch
    full = run(q, k, v, "sigmoid")
    spec = f"sigmoid:{-math.log(30)!r}"
    parts = [run(q, k[:, :, sl], v[:, :, sl], spec, return_stats=True) for sl in (slice(0, 13), slice(13, 30))]
    out, st = flashmaps.merge(spec, [o for o, _ in parts], [s for _, s in parts])
    assert st == {} and rel_err(out, full) < 1e-6
    own = [run(q, k[:, :, sl], v[:, :, sl], "sigmoid", return_stats=True) for sl in (slice(0, 13), slice(13, 30))]
    wrong, _ = flashmaps.merge("sigmoid", [o for o, _ in own], [s for _, s in own])
    assert rel_err(wrong, full) > 0.1


# ---------------------------------------------------------------------------------------------------- softpick


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_softpick_zeros_and_all_negative_rows(backend):
    """Exact zeros for s <= 0 (which still count in the denominator: rows sum to < 1), a row whose scores are
    all negative outputs exactly 0, and the weights equal the formula in float64."""
    dev = KERNEL_DEVICE if backend == "triton" else "cpu"
    q, k, _ = make_qkv(1, 1, 1, 16, 24, 16, seed=10, device=dev)
    bias = torch.zeros(16, 24, device=dev)
    bias[5] = -50.0                                                      # every key of row 5 scores < 0
    s = (q.double() @ k.double().transpose(-1, -2)) / 4 + bias.double()  # (1, 1, L, S)
    assert (s[0, 0, 5] < 0).all() and (s > 0).any() and (s < 0).any()
    eye = torch.eye(24, device=dev)[None, None]
    w = flashmaps.attention(q, k, eye, "softpick", attn_mask=bias, backend=backend).double()
    x = torch.expm1(s)
    want = x.clamp(min=0) / (x.abs().sum(-1, keepdim=True) + SOFTPICK_EPS)
    assert (w.cpu() - want.cpu()).abs().max() < 1e-6
    assert torch.equal(w > 0, s > 0)
    assert (w[0, 0, 5] == 0).all() and (w.sum(-1) < 1).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_softpick_large_scores_stable(backend):
    """Scores up to ~500 (exp overflows float32 past 88): the running max keeps weights and lden finite and
    equal to the float64 formula."""
    dev = KERNEL_DEVICE if backend == "triton" else "cpu"
    q, k, v = make_qkv(1, 2, 1, 9, 40, 16, seed=11, spread=12.0, device=dev)
    out, st = flashmaps.attention(q, k, v, "softpick", backend=backend, enable_gqa=True, return_stats=True)
    s, allowed = reference.scores_and_allowed(q, k, enable_gqa=True)
    assert s.max() > 200
    ref = reference.attention(q, k, v, "softpick", enable_gqa=True)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-5
    ref_ld = parse("softpick").reference_stats(s, allowed)["lden"]
    assert (st["lden"].double().cpu() - ref_ld.cpu()).abs().max() < 1e-4 * ref_ld.abs().max()


def test_softpick_gradcheck_sign_terms():
    """float64 gradcheck with scores on both sides of 0 (the relu' and sign(s) terms), masks, causal, GQA."""
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 2, 1, 6, 9, 4, 3, dtype=torch.float64, device="cpu", seed=12,
                                                   spread=1.5))
    mask = torch.rand(6, 9, generator=torch.Generator().manual_seed(2)) < 0.7
    assert torch.autograd.gradcheck(lambda *a: _torch(*a, "softpick", attn_mask=mask, causal="lower_right"),
                                    (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_softpick_merge_of_key_parts(backend):
    """Three key parts (one with no key a row may attend: causal) merge into the full call: out and lden."""
    dev = KERNEL_DEVICE if backend == "triton" else "cpu"
    q, k, v = make_qkv(1, 2, 2, 12, 33, 16, seed=13, device=dev)
    run = _triton if backend == "triton" else _torch
    full, st_full = run(q, k, v, "softpick", causal="upper_left", return_stats=True)
    outs, stats = [], []
    for lo, hi in ((0, 5), (5, 20), (20, 33)):
        mask = torch.zeros(12, 33, dtype=torch.bool, device=dev)
        mask[:, lo:hi] = True
        o, st = run(q, k, v, "softpick", causal="upper_left", attn_mask=mask, return_stats=True)
        outs.append(o)
        stats.append(st)
    assert (stats[2]["lden"] == math.log(SOFTPICK_EPS)).any()         # rows with no key in the last part
    out, st = flashmaps.merge("softpick", outs, stats)
    assert rel_err(out, full) < 1e-5 and rel_err(st["lden"], st_full["lden"]) < 1e-5
