"""The Triton backward kernels (kernels/backward.py + each normalizer's backward hooks) and dropout.

dq, dk, dv of the Triton backend against float64 autograd through ``flashmaps.reference.attention`` (the
ground truth; fp32 kernels, relative error below 1e-4) and against the torch backend. On CPU the kernels
run under TRITON_INTERPRET=1 (conftest) with 16x16 blocks, so these small shapes still span several
query and key tiles (full, diagonal, ragged and fully masked ones). Tests marked ``cuda`` run only on a
GPU, with the real compiler, at larger sizes.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (DEEP, KERNEL_DEVICE, SPARSE_NORMS, TRITON_DEFAULTS, TRITON_NORMS, grads, make_mask as _make_mask,
                     make_qkv, pin_seed, reference_grads, rel_err)

import flashmaps
from flashmaps import reference, torch_path

triton_path = pytest.importorskip("flashmaps.triton_path")

# Triton's interpreter indexes ranges with 1-element numpy arrays (its own deprecation warning)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

GRAD_TOL = 1e-4          # fp32 gradients vs the float64 reference
OUT_TOL = 1e-5
NORMS = TRITON_NORMS


# ----------------------------------------------------------------------------------------------------
# helpers


def make_inputs(B, Hq, Hkv, L, S, D, Dv, *, dtype=torch.float32, device=KERNEL_DEVICE, seed=0, spread=1.0):
    """q, k, v (as the forward tests make them) and an output gradient dout."""
    q, k, v = make_qkv(B, Hq, Hkv, L, S, D, Dv, dtype=dtype, device=device, seed=seed, spread=spread)
    g = torch.Generator(device="cpu").manual_seed(seed + 1000)
    dout = torch.randn(B, Hq, L, Dv, generator=g).to(dtype=dtype, device=device)
    return q, k, v, dout


def make_mask(kind, B, Hq, L, S, *, device=KERNEL_DEVICE, seed=1):
    """A float32/bool mask of helpers.make_mask's kinds, not expanded."""
    return _make_mask(kind, B, Hq, L, S, torch.float32, device=device, seed=seed)


def triton_attention(q, k, v, norm, *, mask=None, causal=None, scale=None, softcap=None, dropout_p=0.0,
                     **kw):
    """The Triton backend through the public API (custom ops and their autograd); ``kw``: more arguments of
    flashmaps.attention (window, deterministic)."""
    return flashmaps.attention(q, k, v, norm, causal=causal or False, attn_mask=mask, scale=scale,
                               softcap=softcap, enable_gqa=q.shape[1] != k.shape[1], dropout_p=dropout_p,
                               backend="triton", **kw)


def check_close(got, ref, tol=GRAD_TOL, out_tol=OUT_TOL, what=("out", "dq", "dk", "dv")):
    errs = {name: rel_err(g, r) for name, g, r in zip(what, got, ref)}
    bad = {n: e for n, e in errs.items() if not e < (out_tol if n == "out" else tol)}
    assert not bad, f"relative errors {errs}"
    return errs


# ----------------------------------------------------------------------------------------------------
# gradients against the float64 reference and the torch backend

#            B  Hq Hkv  L   S   D   Dv  mask          causal         softcap
CASES = [
    (1, 2, 2, 37, 45, 24, 24, "none", None, None),
    (2, 4, 2, 33, 50, 16, 40, "bool", "upper_left", None),           # GQA, Dqk != Dv
    (1, 3, 1, 40, 29, 24, 16, "float", "lower_right", None),         # MQA, L > S: rows with no key
    (1, 2, 1, 29, 47, 20, 24, "empty_rows", None, 5.0),              # softcap, fully excluded rows
    (1, 2, 2, 1, 35, 16, 16, "none", "lower_right", None),           # L = 1 (decoding)
    (2, 2, 1, 45, 45, 32, 16, "float", "upper_left", 4.0),
    (1, 2, 2, 50, 31, 16, 24, "bool", "lower_right", 2.0),
]


def _case_id(c):
    B, Hq, Hkv, L, S, D, Dv, mask, causal, cap = c
    cap_id = f"-cap{cap:g}" if cap else ""
    return f"B{B}-Hq{Hq}-Hkv{Hkv}-L{L}-S{S}-D{D}-Dv{Dv}-{mask}-{causal or 'nocausal'}{cap_id}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("norm", NORMS)
def test_grads_match_reference_and_torch(norm, case):
    B, Hq, Hkv, L, S, D, Dv, mask_kind, causal, softcap = case
    q, k, v, dout = make_inputs(B, Hq, Hkv, L, S, D, Dv)
    mask = make_mask(mask_kind, B, Hq, L, S)
    noise_seed = pin_seed(norm)
    got = grads(lambda *a: triton_attention(*a, norm, mask=mask, causal=causal, softcap=softcap),
                q, k, v, dout)
    ref = reference_grads(q, k, v, dout, norm, mask=mask, causal=causal, softcap=softcap, noise_seed=noise_seed)
    check_close(got, ref)

    # the torch backend (fp32) agrees as closely
    gqa = Hq != Hkv
    pin_seed(norm)
    tor = grads(lambda *a: flashmaps.attention(*a, norm, causal=causal or False, attn_mask=mask,
                                               softcap=softcap, enable_gqa=gqa, backend="torch"),
                q, k, v, dout)
    check_close(got, tor)

    # rows with no allowed key: output and query gradient exactly 0
    _, allowed = reference.scores_and_allowed(q, k, causal=causal or False, attn_mask=mask, enable_gqa=gqa)
    empty = ~allowed.any(-1)                                                   # (B, Hq, L)
    if mask_kind == "empty_rows" or (causal == "lower_right" and L > S):
        assert empty.any()
    assert (got[0][empty] == 0).all() and (got[1][empty] == 0).all()


@pytest.mark.parametrize("norm,spread", [pytest.param(n, 3.0, id=f"{n}-sparse") for n in SPARSE_NORMS]
                         + [pytest.param("topk:1", 1.0, id="topk1")])
def test_sparse_tiles_are_skipped_exactly(norm, spread):
    """Large scores make most key tiles of a row dead (no support): skipping them must not change the
    gradients (they contribute exactly 0)."""
    q, k, v, dout = make_inputs(1, 2, 1, 48, 80, 16, 16, spread=spread, seed=3)
    got = grads(lambda *a: triton_attention(*a, norm, causal="lower_right"), q, k, v, dout)
    ref = reference_grads(q, k, v, dout, norm, causal="lower_right")
    check_close(got, ref)


@pytest.mark.parametrize("k_top,S", [(130, 150), (40, 40), (1, 33)], ids=["select-k130", "all-k40", "k1"])
def test_topk_threshold_modes(k_top, S):
    """top-k's three pre-pass modes (count select for k > 128, keep-all for k >= S, buffer) feed the
    same backward rule."""
    q, k, v, dout = make_inputs(1, 1, 1, 7, S, 16, 16, seed=5)
    norm = f"topk:{k_top}"
    got = grads(lambda *a: triton_attention(*a, norm), q, k, v, dout)
    ref = reference_grads(q, k, v, dout, norm)
    check_close(got, ref)


def test_topk_ties_keep_every_tied_key():
    """Keys tied with the k-th score are all kept (threshold semantics) in the backward too."""
    q, k, v, dout = make_inputs(1, 1, 1, 9, 40, 16, 16, seed=6)
    k[:, :, 20:30] = k[:, :, 3:4]                     # eleven identical keys ...
    k[:, :, 5] = 1.3 * k[:, :, 3] + 0.1 * k[:, :, 5]  # ... below two larger ones ...
    k[:, :, 7] = 1.2 * k[:, :, 3] + 0.1 * k[:, :, 7]
    q = 2 * k[:, :, 3:4] + 0.3 * q                    # ... in every row: tau_4 is the tied score
    got = grads(lambda *a: triton_attention(*a, "topk:4"), q, k, v, dout)
    ref_out, ref_p = reference.attention(q.double(), k.double(), v.double(), "topk:4", return_weights=True)
    assert ((ref_p > 0).sum(-1) == 13).all()        # 2 + 11 tied keys kept in every row
    ref = reference_grads(q, k, v, dout, "topk:4")
    check_close(got, ref)


def test_any_strides():
    """Non-contiguous q, k, v (a (B, L, H, D) layout) and a non-contiguous output gradient (and a
    non-default scale)."""
    B, Hq, Hkv, L, S, D, Dv = 1, 4, 2, 35, 41, 16, 24
    q, k, v, dout = make_inputs(B, Hq, Hkv, L, S, D, Dv, seed=7)
    qs, ks, vs = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    douts = dout.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not qs.is_contiguous() and not douts.is_contiguous()
    for norm, scale in (("softmax", None), ("entmax15", 0.7)):
        got = grads(lambda *a: triton_attention(*a, norm, causal="upper_left", scale=scale), qs, ks, vs, douts)
        ref = reference_grads(q, k, v, dout, norm, causal="upper_left", scale=scale)
        check_close(got, ref)


def test_deterministic():
    """deterministic=True, no atomics: two backward passes give bitwise equal gradients (GQA accumulates in one
    program; dQ in the dQ kernel). (Under the interpreter the programs run in order, so the atomic path repeats
    too: the check has teeth on a GPU.)"""
    q, k, v, dout = make_inputs(1, 4, 1, 33, 40, 16, 16, seed=8)
    fn = lambda *x: triton_attention(*x, "softmax", causal="upper_left", deterministic=True)  # noqa: E731
    a = grads(fn, q, k, v, dout)
    b = grads(fn, q, k, v, dout)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------------
# the atomic dQ (Static.ATOMIC_DQ, deterministic=False) against the two-kernel backward and the reference

ATOMIC_NORMS = [n for n in ("softmax", "taylor", "entmax15", "topk:5", "harmonic:2") if n in NORMS]

#                B  Hq Hkv  L   S   D   Dv  mask     causal         softcap window
ATOMIC_CASES = [(1, 2, 1, 35, 43, 16, 24, "bool", "lower_right", None, None),    # GQA, Dqk != Dv, ragged tiles
                (1, 3, 1, 29, 37, 24, 16, "float", "upper_left", 3.0, (9, 0))]   # MQA, softcap, window (ST.LEFT)


def _left_band(L, S, left, causal):
    """Bool (L, S): j >= i + off - left, the left bound of a window (the right one is the causal bound)."""
    off = 0 if causal == "upper_left" else S - L
    return torch.arange(S)[None, :] >= torch.arange(L)[:, None] + off - left


@pytest.mark.parametrize("case", ATOMIC_CASES, ids=lambda c: _case_id(c[:-1]) + (f"-win{c[-1][0]}" if c[-1] else ""))
@pytest.mark.parametrize("norm", ATOMIC_NORMS)
def test_atomic_dq_matches_two_kernel_backward_and_reference(norm, case):
    """dq from the dK/dV kernel's atomics equals the dQ kernel's up to fp32 rounding (the same terms in another
    order), dk and dv are unchanged, and both agree with float64 autograd of the reference."""
    B, Hq, Hkv, L, S, D, Dv, mask_kind, causal, softcap, window = case
    q, k, v, dout = make_inputs(B, Hq, Hkv, L, S, D, Dv, seed=17)
    mask = make_mask(mask_kind, B, Hq, L, S)
    ref_mask = mask
    if window is not None:
        band = _left_band(L, S, window[0], causal).to(mask.device)
        ref_mask = (mask & band) if mask.dtype == torch.bool else mask.masked_fill(~band, float("-inf"))
    noise_seed = pin_seed(norm)
    kw = dict(mask=mask, causal=causal, softcap=softcap, **({"window": window} if window else {}))
    atomic = grads(lambda *a: triton_attention(*a, norm, deterministic=False, **kw), q, k, v, dout)
    pin_seed(norm)
    det = grads(lambda *a: triton_attention(*a, norm, deterministic=True, **kw), q, k, v, dout)
    ref = reference_grads(q, k, v, dout, norm, mask=ref_mask, causal=causal, softcap=softcap, noise_seed=noise_seed)
    check_close(atomic, ref)
    check_close(det, ref)
    check_close(atomic, det, tol=1e-6, out_tol=1e-12)          # (one forward, twice)


@pytest.mark.cuda
@pytest.mark.parametrize("norm", DEEP)
def test_deterministic_cuda(norm):
    """On the GPU, where the atomics' order varies: deterministic=True repeats bit for bit, the atomic dQ agrees
    with it to fp32 rounding (bf16 inputs, autotuned, causal, GQA)."""
    q, k, v, dout = make_inputs(2, 8, 2, 1000, 1031, 128, 128, dtype=torch.bfloat16, device="cuda", seed=19)

    def run(det):
        return grads(lambda *a: triton_attention(*a, norm, causal="lower_right", deterministic=det), q, k, v, dout)

    a, b, atomic = run(True), run(True), run(False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    check_close(atomic, a, tol=1e-2, out_tol=1e-12)


def test_deterministic_default_follows_torch(monkeypatch):
    """deterministic=None is torch.are_deterministic_algorithms_enabled() at the call; True / False override it
    (a bad value: tests/test_api.py)."""
    seen = []
    real = triton_path.launch_backward

    def spy(*a, **kw):
        seen.append(kw["deterministic"])
        return real(*a, **kw)

    monkeypatch.setattr(triton_path, "launch_backward", spy)
    q, k, v, dout = make_inputs(1, 2, 1, 9, 12, 16, 16, seed=18)
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        for flag, arg in ((False, None), (True, None), (True, False), (False, True)):
            torch.use_deterministic_algorithms(flag)
            grads(lambda *x: triton_attention(*x, "softmax", deterministic=arg), q, k, v, dout)
        # the process-wide override (the benchmarks' knob) wins over torch's flag, not over an explicit argument
        torch.use_deterministic_algorithms(False)
        for knob, arg in ((True, None), (False, None), (True, False)):
            monkeypatch.setattr(flashmaps.functional, "DETERMINISTIC", knob)
            grads(lambda *x: triton_attention(*x, "softmax", deterministic=arg), q, k, v, dout)
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)
    assert seen == [False, True, False, True, True, False, False]


# ----------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)], ids=["bf16", "fp16"])
@pytest.mark.parametrize("norm", DEEP)
def test_half_precision(norm, dtype, tol):
    """fp16/bf16 inputs: gradients in the input dtype, fp32 accumulation."""
    q, k, v, dout = make_inputs(1, 2, 1, 33, 37, 16, 24, dtype=dtype, seed=13)
    got = grads(lambda *a: triton_attention(*a, norm, causal="upper_left"), q, k, v, dout)
    assert all(g.dtype == dtype for g in got)
    ref = reference_grads(q, k, v, dout, norm, causal="upper_left")
    check_close(got, ref, tol=tol, out_tol=tol)


# ----------------------------------------------------------------------------------------------------
# GPU (real compiler and autotuning; kept small: scripts/gpu-check runs these)


@pytest.mark.cuda
@pytest.mark.parametrize("norm,dtype,causal,tol", [
    *[pytest.param(n, torch.float32, "lower_right", 1e-4, id=f"{n}-fp32-lower_right")
      for n in NORMS + [d for d in TRITON_DEFAULTS if d not in NORMS]],
    *[pytest.param(n, torch.bfloat16, None, 3e-2, id=f"{n}-bf16") for n in TRITON_DEFAULTS],
])
def test_grads_cuda(norm, dtype, causal, tol):
    B, Hq, Hkv, L, S, D, Dv = 2, 8, 2, 1000, 1031, 72, 64
    q, k, v, dout = make_inputs(B, Hq, Hkv, L, S, D, Dv, dtype=dtype, device="cuda")
    mask = make_mask("float", B, Hq, L, S, device="cuda")
    got = grads(lambda *a: triton_attention(*a, norm, causal=causal, mask=mask), q, k, v, dout)
    ref = reference_grads(q, k, v, dout, norm, causal=causal, mask=mask)
    check_close(got, ref, tol=tol, out_tol=tol)


@pytest.mark.cuda
@pytest.mark.parametrize("norm,D,Dv", [
    *[pytest.param(n, d, dv, id=f"{n}-{d}-{dv}") for n in DEEP
      for d, dv in ((16, 16), (64, 64), (128, 128), (256, 256), (96, 160))],
    *[pytest.param(n, d, d, id=f"{n}-{d}-{d}") for n in TRITON_DEFAULTS if n not in DEEP for d in (64, 256)],
])
def test_grads_cuda_head_dims(norm, D, Dv):
    """Every head-dim class of the backward configs (16 to 256), bf16, autotuned, causal (lower right)."""
    B, Hq, Hkv, L, S = 1, 4, 2, 513, 700
    q, k, v, dout = make_inputs(B, Hq, Hkv, L, S, D, Dv, dtype=torch.bfloat16, device="cuda", seed=D)
    got = grads(lambda *a: triton_attention(*a, norm, causal="lower_right"), q, k, v, dout)
    ref = reference_grads(q, k, v, dout, norm, causal="lower_right")
    check_close(got, ref, tol=3e-2, out_tol=3e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("norm", DEEP)
def test_compile_cuda_matches_eager(norm):
    """torch.compile (inductor, fullgraph) around the Triton custom ops on the GPU: same out and grads."""
    q, k, v, dout = make_inputs(2, 8, 2, 256, 384, 64, 64, dtype=torch.bfloat16, device="cuda", seed=40)

    def fn(q_, k_, v_):
        return triton_attention(q_, k_, v_, norm, causal="lower_right") * 2.0

    eager = grads(fn, q, k, v, dout)
    compiled = grads(torch.compile(fn, fullgraph=True), q, k, v, dout)
    for e, c in zip(eager, compiled):
        assert rel_err(c, e) < 1e-6


# ----------------------------------------------------------------------------------------------------
# dropout


def _keep_for(torch_seed, shape, p):
    """The keep mask the Triton backend uses after torch.manual_seed(torch_seed): flashmaps.ops draws the
    seed as torch_path.draw_seed does."""
    torch.manual_seed(torch_seed)
    return triton_path.dropout_keep_mask(torch_path.draw_seed(), shape, p, device=KERNEL_DEVICE)


def test_dropout_same_seed_same_result_different_seed_differs():
    q, k, v, dout = make_inputs(1, 2, 1, 33, 40, 16, 16, seed=9)
    fn = lambda *a: triton_attention(*a, "softmax", causal="upper_left", dropout_p=0.3)  # noqa: E731
    torch.manual_seed(11)
    a = grads(fn, q, k, v, dout)
    torch.manual_seed(11)
    b = grads(fn, q, k, v, dout)
    torch.manual_seed(12)
    c = grads(fn, q, k, v, dout)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(not torch.equal(x, y) for x, y in zip(a, c))


def test_dropout_keep_mask_statistics():
    """Kept fraction within 5 sigma of 1 - p; the (b, h) slices draw different numbers."""
    B, Hq, L, S, p = 2, 3, 40, 50, 0.3
    keep = _keep_for(5, (B, Hq, L, S), p)
    assert keep.shape == (B, Hq, L, S) and keep.dtype == torch.bool
    n = keep.numel()
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert torch.equal(keep, _keep_for(5, (B, Hq, L, S), p))


@pytest.mark.parametrize("norm", NORMS)
def test_dropout_grads_match_reference_with_same_mask(norm):
    B, Hq, Hkv, L, S, D, Dv, p = 1, 4, 2, 35, 43, 16, 24, 0.25
    q, k, v, dout = make_inputs(B, Hq, Hkv, L, S, D, Dv, seed=10)
    mask = make_mask("bool", B, Hq, L, S)
    keep = _keep_for(21, (B, Hq, L, S), p)
    noise_seed = pin_seed(norm, 21)                 # a stochastic unit's noise: the same seed as the dropout's
    torch.manual_seed(21)
    got = grads(lambda *a: triton_attention(*a, norm, mask=mask, causal="lower_right", dropout_p=p),
                q, k, v, dout)
    ref = reference_grads(q, k, v, dout, norm, mask=mask, causal="lower_right",
                          dropout_mask=keep.double() / (1 - p), noise_seed=noise_seed)
    check_close(got, ref)


def test_dropout_output_mean_matches_no_dropout():
    """E[out] = out without dropout: over T seeds, ||mean - out||^2 lies within a factor 3 of its
    expected value sum(Var)/T, Var = p/(1-p) * sum_j w_j^2 v_j^2 (w = the reference weights)."""
    B, Hq, L, S, D, p, T = 1, 2, 32, 48, 16, 0.4, 8
    q, k, v, _ = make_inputs(B, Hq, Hq, L, S, D, D, seed=12)
    with torch.no_grad():
        base = triton_attention(q, k, v, "softmax")
        outs = []
        for t in range(T):
            torch.manual_seed(100 + t)
            outs.append(triton_attention(q, k, v, "softmax", dropout_p=p))
    mean = torch.stack(outs).double().mean(0)
    _, w = reference.attention(q.double(), k.double(), v.double(), "softmax", return_weights=True)
    var = p / (1 - p) * torch.matmul(w * w, v.double() ** 2)                   # (B, Hq, L, D)
    expected = var.sum().item() / T
    got = (mean - base.double()).pow(2).sum().item()
    assert expected / 3 < got < 3 * expected, (got, expected)


def test_dropout_leaves_row_statistics_unchanged():
    """The normalizer statistics are computed without dropout (only the P @ V weights are dropped)."""
    q, k, v, _ = make_inputs(1, 2, 1, 20, 37, 16, 16, seed=14)
    for norm in NORMS:
        with torch.no_grad():
            torch.manual_seed(3)    # a stochastic normalizer: both calls draw the same noise seed
            _, st = flashmaps.attention(q, k, v, norm, causal=True, enable_gqa=True, return_stats=True,
                                        backend="triton")
            torch.manual_seed(3)
            _, st_d = flashmaps.attention(q, k, v, norm, causal=True, enable_gqa=True, return_stats=True,
                                          dropout_p=0.5, backend="triton")
        assert all(torch.equal(st[n], st_d[n]) for n in st), norm


@pytest.mark.cuda
@pytest.mark.parametrize("norm", DEEP)
def test_dropout_cuda(norm):
    B, Hq, Hkv, L, S, D, Dv, p = 2, 4, 2, 300, 333, 64, 64, 0.2
    q, k, v, dout = make_inputs(B, Hq, Hkv, L, S, D, Dv, device="cuda", seed=15)
    keep = _keep_for(31, (B, Hq, L, S), p)
    torch.manual_seed(31)
    got = grads(lambda *a: triton_attention(*a, norm, causal="upper_left", dropout_p=p), q, k, v, dout)
    ref = reference_grads(q, k, v, dout, norm, causal="upper_left", dropout_mask=keep.double() / (1 - p))
    check_close(got, ref, out_tol=1e-4)
