"""The linear form of Taylor attention (flashmaps.linear): outputs and gradients against the quadratic tile
loop and the float64 dense reference, chunk boundaries at awkward lengths, masks, refusals, the choice of
form, the recurrent decoding state, and that backward saves nothing that grows with L beyond the inputs and
outputs.

Ladder: reference.attention (dense, float64) is the ground truth; the quadratic taylor (torch path) is the
same function computed in another order.
"""

import pytest
import torch
from helpers import grad_err, qkv_for, ref_grads, ref_stats, check_stats, rel_err

import flashmaps
from flashmaps import linear

CAUSAL = [None, "upper_left", "lower_right"]


@pytest.fixture
def chunk16(monkeypatch):
    """The torch path's chunk of 16 rows (the Based kernel's), so L = 15, 16, 17 sit at the boundary."""
    monkeypatch.setattr(linear, "CHUNK", 16)


def _run(q, k, v, form, **kw):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out, st = flashmaps.attention(q, k, v, "taylor", enable_gqa=True, backend="torch", form=form, return_stats=True,
                                  **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return out, st, dout, torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))


def _check(shape, causal, mask=None, dtype=torch.float32, tol=1e-5):
    """Linear vs the float64 reference and vs the quadratic form: out, z, dq, dk, dv."""
    q, k, v = qkv_for(shape, dtype)
    out, st, dout, got = _run(q, k, v, "linear", causal=causal or False, attn_mask=mask)
    ref, ref_grad = ref_grads(q, k, v, "taylor", causal=causal or False, attn_mask=mask)
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) < tol, rel_err(out, ref)
    check_stats(st, ref_stats(q, k, "taylor", causal=causal, mask=mask), tol)
    want = ref_grad(dout)
    for name, a, b in zip("qkv", got, want):
        assert grad_err(a, b) < 4 * tol, (f"d{name}", grad_err(a, b))
    qout, _, _, qgot = _run(q, k, v, "quadratic", causal=causal or False, attn_mask=mask)
    assert rel_err(out, qout) < tol
    for name, a, b in zip("qkv", got, qgot):
        assert grad_err(a, b) < 4 * tol, (f"d{name} vs quadratic", grad_err(a, b))


@pytest.mark.parametrize("causal", CAUSAL, ids=["noncausal", "upper_left", "lower_right"])
@pytest.mark.parametrize("L", [1, 15, 16, 17, 1000])
@pytest.mark.parametrize("D", [16, 64])
def test_linear_matches_reference_and_quadratic(chunk16, L, D, causal):
    # GQA (Hq 2 per kv head), Dv != D; S = L except at L = 1000 where S = 1003 (lower_right sees 3 extra keys)
    S = L + 3 if L == 1000 else L
    _check((1, 2, 1, L, S, D, 8 if D == 16 else 24), causal)


@pytest.mark.parametrize("shape", [
    pytest.param((2, 4, 2, 17, 40, 5, 3), id="B2-Hq4-Hkv2-L17-S40-D5-Dv3"),   # S > L: lower_right has a prefix
    pytest.param((1, 2, 2, 40, 17, 16, 16), id="B1-Hq2-Hkv2-L40-S17-D16"),    # S < L: lower_right has empty rows
])
@pytest.mark.parametrize("causal", CAUSAL, ids=["noncausal", "upper_left", "lower_right"])
def test_linear_rectangular_float64(chunk16, shape, causal):
    _check(shape, causal, dtype=torch.float64, tol=1e-10)


@pytest.mark.parametrize("per_head", [False, True], ids=["mask-B11S", "mask-BHq1S"])
@pytest.mark.parametrize("causal", [None, "lower_right"], ids=["noncausal", "lower_right"])
def test_key_padding_mask(chunk16, per_head, causal):
    B, Hq, Hkv, L, S = 2, 4, 2, 33, 40
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(B, Hq if per_head else 1, 1, S, generator=g) < 0.6
    mask[1, 0] = False  # batch 1 (head 0): no key at all -> zero rows, zero gradients
    _check((B, Hq, Hkv, L, S, 8, 4), causal, mask=mask)


def test_bfloat16_runs_in_fp32(chunk16):
    q, k, v = qkv_for((1, 2, 1, 50, 50, 16, 16), torch.bfloat16)
    out = flashmaps.attention(q, k, v, "taylor", causal=True, enable_gqa=True, form="linear")
    ref = flashmaps.reference.attention(q, k, v, "taylor", causal=True, enable_gqa=True)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1e-2


def test_inputs_not_modified(chunk16):
    q, k, v = qkv_for((1, 2, 1, 40, 40, 8, 8), torch.float32)
    copies = [x.clone() for x in (q, k, v)]
    _run(q, k, v, "linear", causal=True)
    for x, c in zip((q, k, v), copies):
        assert torch.equal(x, c)


def test_backward_saves_only_inputs_and_outputs():
    """Memory must not grow with L: backward recomputes the states, so what autograd keeps is q, k, v, out
    and z (plus the key mask), never per-chunk states."""
    q, k, v = (x.requires_grad_() for x in qkv_for((1, 2, 2, 300, 300, 16, 16), torch.float32))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = flashmaps.attention(q, k, v, "taylor", causal=True, form="linear")
    budget = sum(x.numel() * x.element_size() for x in (q, k, v, out)) + out[..., 0].numel() * 4
    assert 0 < sum(saved) <= budget


# ----------------------------------------------------------------------------------------------------
# refusals and the choice of form


def _qkv(L=64, D=16):
    return qkv_for((1, 2, 2, L, L, D, D), torch.float32)


@pytest.mark.parametrize("kw, words", [
    (dict(softcap=30.0), "softcap"),
    (dict(dropout_p=0.1), "dropout"),
    (dict(attn_mask=torch.zeros(64, 64)), "float attn_mask"),
    (dict(attn_mask=torch.ones(64, 64, dtype=torch.bool).tril()), "dense mask"),
])
def test_linear_refuses_what_it_cannot_compute(kw, words):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=words):
        flashmaps.attention(q, k, v, "taylor", form="linear", **kw)
    choice = flashmaps.choose_form(q, k, v, "taylor", form="auto", **kw)  # auto falls back, saying why
    assert choice.form == "quadratic" and words in choice.reason


def test_form_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="no linear form"):
        flashmaps.attention(q, k, v, "softmax", form="linear")
    with pytest.raises(ValueError, match="form must be one of"):
        flashmaps.attention(q, k, v, "taylor", form="fast")
    assert flashmaps.choose_form(q, k, v, "softmax").form == "quadratic"


def test_auto_picks_by_the_cost_model():
    q, k, v = _qkv(L=4096)
    long = flashmaps.choose_form(q, k, v, "taylor", causal=True)
    assert long.form == "linear" and long.cost_linear < long.cost_quadratic and "linear" in long.reason
    q, k, v = _qkv(L=32)
    short = flashmaps.choose_form(q, k, v, "taylor", causal=True)
    assert short.form == "quadratic" and short.cost_quadratic <= short.cost_linear
    q, k, v = qkv_for((1, 1, 1, 1024, 1024, 64, 64), torch.float32)  # D = 64 needs longer sequences
    assert flashmaps.choose_form(q, k, v, "taylor", causal=True).form == "quadratic"
    assert flashmaps.choose_form(q, k, v, "taylor", form="linear").form == "linear"


def test_auto_runs_the_form_it_chose(monkeypatch):
    q, k, v = _qkv(L=1024)
    called = []
    monkeypatch.setattr(linear, "attention", lambda *a, **kw: called.append(1) or torch.zeros(1))
    flashmaps.attention(q, k, v, "taylor", causal=True)
    assert called
    called.clear()
    flashmaps.attention(q, k, v, "taylor", causal=True, form="quadratic")
    assert not called


# ----------------------------------------------------------------------------------------------------
# recurrent decoding


@pytest.mark.parametrize("n", [1, 2, 300])
def test_state_step_equals_the_causal_call(n):
    B, Hq, Hkv, D, Dv = 2, 4, 2, 16, 8
    q, k, v = qkv_for((B, Hq, Hkv, n, n, D, Dv), torch.float32)
    want = flashmaps.attention(q, k, v, "taylor", causal=True, enable_gqa=True, form="quadratic")
    st = flashmaps.TaylorState.empty(B, Hkv, D, Dv)
    size = st.memory_bytes()
    outs = [st.step(q[:, :, t], k[:, :, t], v[:, :, t]) for t in range(n)]
    assert st.memory_bytes() == size  # independent of the number of tokens
    got = torch.stack(outs, 2)
    assert got.shape == want.shape and rel_err(got, want) < 1e-5


def test_state_from_prefix_and_query():
    B, Hq, Hkv, n, P, D, Dv = 1, 3, 1, 40, 25, 8, 8
    q, k, v = qkv_for((B, Hq, Hkv, n, n, D, Dv), torch.float64)
    want = flashmaps.reference.attention(q, k, v, "taylor", causal=True, enable_gqa=True)
    st = flashmaps.TaylorState.from_prefix(k[:, :, :P], v[:, :, :P])
    assert rel_err(st.query(q[:, :, P - 1]), want[:, :, P - 1]) < 1e-12  # row P-1 sees exactly the prefix
    got = torch.cat([st.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1]) for t in range(P, n)], 2)
    assert rel_err(got, want[:, :, P:]) < 1e-12


def test_state_errors():
    st = flashmaps.TaylorState.empty(1, 2, 8, 4)
    q, k, v = torch.randn(1, 2, 8), torch.randn(1, 2, 8), torch.randn(1, 2, 5)
    with pytest.raises(ValueError, match="step"):
        st.step(q, k, v)
    with pytest.raises(ValueError, match="no linear form"):
        flashmaps.TaylorState.empty(1, 1, 4, 4, normalizer="softmax")


def test_bench_providers_sweep_the_forms():
    from flashmaps.bench import providers

    names = {p.name for p in providers.providers_for("cpu", ["taylor", "softmax"])}
    assert {"flashmaps-taylor-torch-linear", "flashmaps-taylor-torch-quadratic"} <= names
    assert not any(n.startswith("flashmaps-softmax-torch-") for n in names)
    q, k, v = _qkv(L=40)
    lin = providers.get_provider("flashmaps-taylor-torch-linear").make("cpu")(q, k, v, "upper_left")
    quad = providers.get_provider("flashmaps-taylor-torch-quadratic").make("cpu")(q, k, v, "upper_left")
    assert rel_err(lin, quad) < 1e-5
    with pytest.raises(ValueError, match="no form 'linear'"):
        providers.get_provider("flashmaps-softmax-torch-linear")




def test_register_checks_the_linear_contract():
    import dataclasses
    from typing import ClassVar

    @dataclasses.dataclass(frozen=True)
    class Poly(flashmaps.normalizers.get("taylor")):
        name: ClassVar[str] = "poly_no_coeffs"
        linear_coeffs: ClassVar = None

    with pytest.raises(ValueError, match="linear_coeffs"):
        flashmaps.register(Poly)
    assert "poly_no_coeffs" not in flashmaps.names()


def test_bench_extrapolates_the_linear_form_linearly():
    from flashmaps.bench import harness, providers

    provs = [providers.get_provider(f"flashmaps-taylor-torch-{f}") for f in ("linear", "quadratic")]
    jobs = harness.sweep(device="cpu", providers=provs, seqs=[1024, 4096], modes=["fwd"], batches=["1"], heads=[8],
                         kv_heads=[None], head_dims=[16], causals=["upper_left"], dtypes=["float32"], tokens=16384)
    for name, est_s in (("flashmaps-taylor-torch-linear", 4.0), ("flashmaps-taylor-torch-quadratic", 16.0)):
        small, big = [j for j in jobs if j["provider"] == name]
        history = {harness._group_key(small): dict(small, status="ok", time_ms=1000.0)}
        assert harness._skip_reason(big, history, max_call_s=est_s + 0.5) is None
        assert harness._skip_reason(big, history, max_call_s=est_s - 0.5) is not None
