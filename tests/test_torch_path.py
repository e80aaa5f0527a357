"""The torch path (flashmaps.torch_path) against the float64 dense reference, torch SDPA and the `entmax`
package: forward, backward (fp64 gradcheck), row statistics, invariants, dropout, strides, chunking.

Ladder: reference.attention (dense, float64) is the ground truth; `entmax.entmax15` and torch SDPA are
independent oracles for entmax15 and softmax.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DEEP, NORMS as GRID, grad_err, mask_for as make_mask, pin_seed, qkv_for as make_qkv, ref_grads, rel_err

import flashmaps
from flashmaps import reference as R
from flashmaps import torch_path as TP
from flashmaps.normalizers import Entmax15, entmax15_threshold, parse, rows as RW
from flashmaps.normalizers import softmax as softmax_unit

#: the registry's grid plus top-k at k = 1, a middle k and k past S
NORMS = GRID + [s for s in ("topk:1", "topk:7", "topk:4096") if s not in GRID]

# (B, Hq, Hkv, L, S, Dqk, Dv)
SHAPES = [
    pytest.param((1, 1, 1, 1, 1, 16, 16), id="B1-Hq1-Hkv1-L1-S1-D16"),
    pytest.param((2, 2, 2, 1, 63, 16, 16), id="B2-Hq2-Hkv2-L1-S63-D16"),
    pytest.param((2, 4, 2, 63, 111, 40, 40), id="B2-Hq4-Hkv2-L63-S111-D40"),
    pytest.param((1, 3, 1, 111, 63, 72, 72), id="B1-Hq3-Hkv1-L111-S63-D72"),
    pytest.param((2, 2, 1, 129, 257, 16, 40), id="B2-Hq2-Hkv1-L129-S257-Dqk16-Dv40"),
]
MASKS = ["none", "bool-LS", "bool-B1LS-emptyrows", "float-inf-min-emptyrow"]
CAUSAL = [None, "upper_left", "lower_right"]

TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def check_against_reference(shape, norm, mask_kind, causal, dtype, tol, grads=True, softcap=None):
    q, k, v = make_qkv(shape, dtype)
    mask = make_mask(mask_kind, shape, dtype)
    qs, ks, vs = (x.clone().requires_grad_(grads) for x in (q, k, v))
    noise_seed = pin_seed(norm)
    out = flashmaps.attention(
        qs, ks, vs, norm, causal=causal or False, attn_mask=mask, enable_gqa=True, softcap=softcap,
        backend="torch",
    )
    assert out.shape == (shape[0], shape[1], shape[3], shape[6]) and out.dtype == dtype
    ref, ref_grad = ref_grads(q, k, v, norm, causal=causal or False, attn_mask=mask, softcap=softcap,
                              noise_seed=noise_seed)
    assert rel_err(out, ref) < tol, ("out", rel_err(out, ref))
    if grads:
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        got = torch.autograd.grad(out, (qs, ks, vs), dout.to(dtype))
        want = ref_grad(dout)
        for name, a, b in zip("qkv", got, want):
            assert a.dtype == dtype
            assert grad_err(a, b) < 4 * tol, (f"d{name}", grad_err(a, b))
    return out


@pytest.fixture
def small_chunks(monkeypatch):
    """Force many chunks (row, head and batch chunking) on small shapes, and the sparse (gathered) output
    of entmax15/topk with entmax15's growing top-r selection (r = 4, then 32, then the full row)."""
    monkeypatch.setattr(TP, "CHUNK_ELEMS", 1500)
    monkeypatch.setattr(RW, "FIRST_SELECTION", 4)


# ----------------------------------------------------------------------------------------------------
# the grid


@pytest.mark.parametrize("causal", CAUSAL, ids=["nocausal", "upper_left", "lower_right"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_grid_fp32(shape, norm, mask_kind, causal, small_chunks):
    check_against_reference(shape, norm, mask_kind, causal, torch.float32, TOL[torch.float32])


DTYPE_SHAPES = [SHAPES[2], SHAPES[3]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=["bf16", "fp16", "fp64"])
@pytest.mark.parametrize("causal", ["upper_left", "lower_right"])
@pytest.mark.parametrize("mask_kind", ["none", "bool-B1LS-emptyrows", "float-inf-min-emptyrow"])
@pytest.mark.parametrize("norm", GRID + ["topk:1"])
@pytest.mark.parametrize("shape", DTYPE_SHAPES)
def test_grid_dtypes(shape, norm, mask_kind, causal, dtype):
    check_against_reference(shape, norm, mask_kind, causal, dtype, TOL[dtype])


@pytest.mark.parametrize("norm", GRID)
@pytest.mark.parametrize("softcap", [0.7, 30.0], ids=["cap0.7", "cap30"])
def test_softcap(norm, softcap, small_chunks):
    check_against_reference(SHAPES[2].values[0], norm, "float-inf-min-emptyrow", "lower_right", torch.float32,
                            TOL[torch.float32], softcap=softcap)


@pytest.mark.parametrize("k", [1, 2, 62, 63, 64, 500])
def test_topk_every_k(k, small_chunks):
    """k from 1 to past S (S = 63): k >= S keeps every allowed key (tau = -inf)."""
    shape = (1, 2, 1, 17, 63, 16, 16)
    check_against_reference(shape, f"topk:{k}", "bool-B1LS-emptyrows", "upper_left", torch.float64, 1e-10)
    check_against_reference(shape, f"topk:{k}", "none", None, torch.float32, 1e-5)


# ----------------------------------------------------------------------------------------------------
# gradcheck (float64, first derivatives), no ties (random inputs)


@pytest.mark.parametrize("causal", ["upper_left", "lower_right"])
@pytest.mark.parametrize("norm", GRID + ["topk:3"])
def test_gradcheck(norm, causal, monkeypatch):
    monkeypatch.setattr(TP, "CHUNK_ELEMS", 40)  # several chunks
    shape = (1, 4, 2, 5, 7, 4, 3)  # GQA, Dqk != Dv, L < S
    q, k, v = (x.requires_grad_() for x in make_qkv(shape, torch.float64, seed=3))
    mask = make_mask("bool-B1LS-emptyrows", shape, torch.float64, seed=4).expand(1, 4, 5, 7)
    fm = torch.randn(5, 7, dtype=torch.float64).expand(1, 4, 5, 7)
    nrm = parse(norm)

    def f(q, k, v):
        a = TP.attention(q, k, v, nrm, mask=mask, causal=causal, scale=0.6, softcap=None, dropout_p=0.0,
                         return_stats=False, seed=torch.tensor(1234))   # (a stochastic unit's noise: fixed)
        b = TP.attention(q, k, v, nrm, mask=fm, causal=causal, scale=0.6, softcap=2.0, dropout_p=0.0,
                         return_stats=False, seed=torch.tensor(1234))
        return a, b

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("norm", DEEP)
def test_gradcheck_dropout_fixed_seed(norm):
    """With the seed fixed the dropout mask is a constant: the function is differentiable."""
    shape = (2, 2, 1, 6, 9, 4, 4)
    q, k, v = (x.requires_grad_() for x in make_qkv(shape, torch.float64, seed=5))
    nrm = parse(norm)

    def f(q, k, v):
        return TP.attention(q, k, v, nrm, mask=None, causal="lower_right", scale=0.5, softcap=None,
                            dropout_p=0.3, return_stats=False, seed=torch.tensor(1234))

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# invariants: with v = identity (S x S) the output is the weight matrix


@pytest.mark.parametrize("norm", GRID + ["topk:1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_invariants_identity_values(norm, dtype, small_chunks):
    """The weights' invariants, from each unit's declared properties: rows sum to one (sums_to_one), exact
    zeros on disallowed keys and empty rows, exact zeros among allowed keys and the reference's support
    (sparse), every allowed key weighted (dense); top-k keeps exactly k keys without ties."""
    nrm = parse(norm)
    B, Hq, Hkv, L, S, D = 2, 4, 2, 23, 31, 8
    q, k, _ = make_qkv((B, Hq, Hkv, L, S, D, 1), dtype, seed=11)
    q = q * 3  # peaked scores: entmax15 gets a genuinely sparse support
    v = torch.eye(S, dtype=dtype).expand(B, Hkv, S, S).requires_grad_()
    mask = make_mask("bool-B1LS-emptyrows", (B, Hq, Hkv, L, S, D, S), dtype)
    q.requires_grad_()
    w = flashmaps.attention(q, k, v, norm, attn_mask=mask, causal="lower_right", enable_gqa=True,
                            backend="torch")
    _, allowed = R.scores_and_allowed(q, k, attn_mask=mask, causal="lower_right", enable_gqa=True)
    n_allowed = allowed.sum(-1)  # (B, Hq, L)
    empty = n_allowed == 0
    assert empty.any() and (~empty).any()
    rows = w.detach().double().sum(-1)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    if nrm.sums_to_one:
        assert torch.all((rows[~empty] - 1).abs() < tol)
    assert torch.all(w[empty] == 0)  # empty rows exactly zero
    assert torch.all(w[~allowed.expand_as(w)] == 0)  # disallowed keys get exactly 0
    nnz = (w.detach() > 0).sum(-1)
    if nrm.name == "topk":
        assert torch.equal(nnz, torch.clamp(n_allowed, max=nrm.k))  # exactly k (no ties)
    if nrm.sparse:
        assert torch.any(nnz[~empty] < n_allowed[~empty])  # exact zeros among allowed keys
        ref = R.attention(q, k, v, norm, attn_mask=mask, causal="lower_right", enable_gqa=True)
        assert torch.equal(w.detach() > 0, ref > 0)  # same support as the exact reference
    else:
        assert torch.equal(nnz, n_allowed)
    # empty rows get zero gradient
    dq, dv = torch.autograd.grad(w, (q, v), torch.randn_like(w))
    assert torch.all(dq[empty] == 0)
    assert torch.isfinite(dq).all() and torch.isfinite(dv).all()


@pytest.mark.parametrize("k", [1, 5, 8, 9])
def test_topk_ties_at_threshold_are_all_kept(k):
    """Threshold semantics: keys tied with the k-th score are all kept (more than k keys). Each key
    vector appears 4 times, so every score is tied 4 ways; S = 40 keeps the sparse path in play."""
    B, H, L, S, D = 1, 2, 6, 40, 8
    g = torch.Generator().manual_seed(47)
    # entries on a 1/8 grid: every dot product is exact, so tied keys tie bit for bit whatever the matmul's
    # summation order (with random floats the copies of a key could differ in the last bit on some CPUs)
    q = torch.randint(-64, 65, (B, H, L, D), generator=g).float() / 8
    k10 = torch.randint(-64, 65, (B, H, 10, D), generator=g).float() / 8
    base = q @ k10.transpose(-1, -2)  # [B, H, L, 10]: the 10 distinct keys' scores must differ in every row
    assert torch.all(base.sort(-1).values.diff(dim=-1) > 0), "test setup: choose another seed"
    k_ = k10.repeat(1, 1, 4, 1)  # key j == key j % 10
    v = torch.eye(S).expand(B, H, S, S)
    w = flashmaps.attention(q, k_, v, f"topk:{k}", backend="torch")
    ref = R.attention(q, k_, v, f"topk:{k}")
    assert rel_err(w, ref) < 1e-5
    nnz = (w > 0).sum(-1)
    assert torch.all(nnz == 4 * math.ceil(k / 4))  # the whole tie group of the k-th score


def test_empty_rows_zero_grads_all_norms():
    shape = (1, 2, 2, 9, 6, 8, 8)
    for norm in NORMS:
        q, k, v = (x.requires_grad_() for x in make_qkv(shape, torch.float32))
        # lower_right with L > S: rows 0..2 have no key; bool mask empties rows 0, 3, 6
        mask = make_mask("bool-B1LS-emptyrows", shape, torch.float32)
        out, st = flashmaps.attention(q, k, v, norm, attn_mask=mask, causal="lower_right", return_stats=True,
                                      backend="torch")
        empty = torch.zeros(9, dtype=torch.bool)
        empty[[0, 1, 2, 3, 6]] = True
        assert torch.all(out[:, :, empty] == 0) and torch.isfinite(out).all()
        dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
        assert torch.all(dq[:, :, empty] == 0) and torch.isfinite(dk).all() and torch.isfinite(dv).all()
        nrm = parse(norm)
        for name, val in zip(nrm.stats, nrm.empty_stats):
            assert torch.all(st[name][:, :, empty] == val), (norm, name)


# ----------------------------------------------------------------------------------------------------
# entmax15: the `entmax` package as an independent oracle; tau exact on awkward rows


def test_entmax15_against_entmax_package():
    entmax = pytest.importorskip("entmax")
    shape = (2, 4, 2, 37, 53, 16, 24)
    q, k, v = make_qkv(shape, torch.float64, seed=21)
    q = q * 2
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    s, _ = R.scores_and_allowed(q, k, enable_gqa=True)
    p = entmax.entmax15(s, dim=-1)
    oracle = p @ v.repeat_interleave(2, dim=1)
    for dt, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        qq, kk, vv = (x.detach().to(dt).requires_grad_() for x in (q, k, v))
        out = flashmaps.attention(qq, kk, vv, "entmax15", enable_gqa=True, backend="torch")
        assert rel_err(out, oracle) < tol
        dout = torch.randn_like(oracle)
        want = torch.autograd.grad(oracle, (q, k, v), dout, retain_graph=True)
        got = torch.autograd.grad(out, (qq, kk, vv), dout.to(dt))
        for a, b in zip(got, want):
            assert rel_err(a, b) < 4 * tol


def _awkward_rows(S):
    g = torch.Generator().manual_seed(S)
    rows = [
        torch.zeros(S),  # all equal: tau = -1/sqrt(S), full support
        torch.cat([torch.tensor([50.0]), torch.zeros(S - 1)]),  # one dominant key: support 1
        torch.cat([torch.tensor([4.6]), torch.randn(S - 1, generator=g) - 1]),  # dominant, rest below max - 2
        torch.randn(S, generator=g) * 100,  # large magnitudes
        torch.cat([torch.full((S // 2,), 3.0), torch.full((S - S // 2,), 2.99)]),  # two close clusters
        torch.linspace(-1, 1, S),
        torch.randn(S, generator=g) * 1e-4,  # nearly uniform
    ]
    return torch.stack(rows)


@pytest.mark.parametrize("r", [1, 4, 64])
@pytest.mark.parametrize("S", [1, 2, 7, 111, 300])
def test_entmax15_tau_exact(S, r, monkeypatch):
    """tau from the top-r selection (grown x8 when the support does not fit) equals the full-sort
    reference, also on masked rows with fewer allowed keys than r.

    Regression: -inf (disallowed) keys sorted after allowed keys far below the max were once replaced by
    max - 2 out of order, which broke the support count (row: one dominant key, 51 others < max - 2)."""
    monkeypatch.setattr(RW, "FIRST_SELECTION", r)
    for dt, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        s = _awkward_rows(S).to(dt)
        allowed = torch.ones_like(s, dtype=torch.bool)
        if S > 2:
            allowed_masked = allowed.clone()
            allowed_masked[:, 1::3] = False
            s = torch.cat([s, s])
            allowed = torch.cat([allowed, allowed_masked])
        want = entmax15_threshold(s.double(), allowed).to(dt)
        got = Entmax15().torch_stats(torch.where(allowed, s, torch.tensor(float("-inf"), dtype=dt)), True)["tau"]
        scale = 1 + s.double().abs().amax(-1, keepdim=True) / 2
        assert torch.all((got - want).abs() <= tol * scale), (got, want)
        p = torch.where(allowed, torch.clamp(s.double() / 2 - got.double(), min=0) ** 2, torch.zeros(()))
        assert torch.all((p.sum(-1) - 1).abs() < 1e3 * tol)


# ----------------------------------------------------------------------------------------------------
# return_stats against values computed from reference.scores_and_allowed


def test_topk_reference_stats_match_a_sort():
    """The unit's reference statistics (torch.topk) against a plain sort, on rows with ties and masks."""
    g = torch.Generator().manual_seed(3)
    s = torch.randint(-4, 5, (6, 30), generator=g).double()
    allowed = torch.rand(6, 30, generator=g) < 0.7
    allowed[0] = False
    neg = torch.tensor(float("-inf"), dtype=s.dtype)
    sm = torch.where(allowed, s, neg)
    for k in (1, 5, 29, 30):
        st = parse(f"topk:{k}").reference_stats(s, allowed)
        n = allowed.sum(-1)
        kth = sm.sort(-1, descending=True).values[..., min(k, 30) - 1]
        tau = torch.where(n > k, kth, neg)
        kept = allowed & (s >= tau[..., None])
        assert torch.equal(st["tau"], tau)
        assert torch.equal(st["lse"], torch.logsumexp(torch.where(kept, s, neg), -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("norm,route", [(n, "chunked") for n in NORMS] + [("softmax", "sdpa")])
def test_return_stats(norm, route, dtype, small_chunks):
    Dv = 16 if route == "sdpa" else 12  # Dqk != Dv keeps softmax off the SDPA route
    shape = (2, 4, 2, 19, 23, 16, Dv)
    q, k, v = make_qkv(shape, dtype, seed=9)
    for mask_kind in ("bool-B1LS-emptyrows", "float-inf-min-emptyrow"):
        for causal in ("upper_left", "lower_right", None):
            mask = make_mask(mask_kind, shape, dtype)
            noise_seed = pin_seed(norm)
            _, st = flashmaps.attention(q, k, v, norm, attn_mask=mask, causal=causal or False, enable_gqa=True,
                                        return_stats=True, backend="torch")
            nrm = parse(norm)
            assert sorted(st) == sorted(nrm.stats)
            s, allowed = R.scores_and_allowed(q, k, attn_mask=mask, causal=causal or False, enable_gqa=True,
                                              normalizer=nrm, noise_seed=noise_seed)
            want = nrm.reference_stats(s, allowed)
            for name in nrm.stats:
                got = st[name]
                assert got.shape == (2, 4, 19)
                assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
                w = want[name]
                fin = torch.isfinite(w)
                assert torch.equal(torch.isfinite(got), fin) and torch.equal(got[~fin], w[~fin]), (name, causal)
                tol = 1e-12 if dtype == torch.float64 else 2e-6
                err = (got[fin].double() - w[fin]).abs() / (1 + w[fin].abs())
                assert not fin.any() or err.max() < tol, (name, causal, mask_kind, err.max())


def test_entmax_tau_stat_defines_the_weights():
    shape = (1, 2, 2, 11, 29, 8, 8)
    q, k, v = make_qkv(shape, torch.float64, seed=2)
    _, st = flashmaps.attention(q, k, v, "entmax15", causal="upper_left", return_stats=True, backend="torch")
    s, allowed = R.scores_and_allowed(q, k, causal="upper_left")
    p = torch.where(allowed, torch.clamp(s / 2 - st["tau"][..., None], min=0) ** 2, torch.zeros_like(s))
    assert torch.allclose(p.sum(-1), torch.ones(1, 2, 11, dtype=torch.float64), atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# softmax: against torch SDPA, and the SDPA route vs the chunked route


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("case", ["plain", "causal", "bool-mask", "float-mask", "gqa-causal-L>S"])
def test_softmax_vs_torch_sdpa(case, dtype):
    shape = (2, 4, 2 if "gqa" in case else 4, 37 if "L>S" in case else 29, 31, 16, 16)
    q, k, v = (x.requires_grad_() for x in make_qkv(shape, dtype, seed=13))
    kw = {}
    if case in ("causal", "gqa-causal-L>S"):
        kw["is_causal"] = True
    if case == "bool-mask":
        kw["attn_mask"] = make_mask("bool-LS", shape, dtype)
    if case == "float-mask":
        kw["attn_mask"] = torch.randn(29, 31).to(dtype)
    gqa = "gqa" in case
    out = flashmaps.sdpa(q, k, v, enable_gqa=gqa, **kw)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
        want_out = F.scaled_dot_product_attention(q64, k64, v64, enable_gqa=gqa, **{
            key: (val.double() if torch.is_tensor(val) and val.dtype != torch.bool else val) for key, val in kw.items()
        })
        want = torch.autograd.grad(want_out, (q64, k64, v64), dout.double())
    tol = TOL[dtype]
    assert rel_err(out, want_out) < tol
    for a, b in zip(got, want):
        assert rel_err(a, b) < 4 * tol


def test_softmax_sdpa_route_taken_and_equal_to_chunked(monkeypatch):
    """The dispatch is taken for plain contiguous inputs, refused for strided K, and both agree."""
    calls = []
    real = softmax_unit._sdpa_forward
    monkeypatch.setattr(softmax_unit, "_sdpa_forward", lambda *a: calls.append(1) or real(*a))
    shape = (2, 4, 2, 33, 41, 16, 16)
    q, k, v = make_qkv(shape, torch.float64, seed=17)
    mask = make_mask("float-inf-min-emptyrow", shape, torch.float64)
    a, sa = flashmaps.attention(q, k, v, attn_mask=mask, causal=True, enable_gqa=True, return_stats=True,
                                backend="torch")
    assert len(calls) == 1
    k_strided = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # head dim not unit stride
    b, sb = flashmaps.attention(q, k_strided, v, attn_mask=mask, causal=True, enable_gqa=True, return_stats=True,
                                backend="torch")
    assert len(calls) == 1
    assert rel_err(a, b) < 1e-12
    fin = torch.isfinite(sb["lse"])
    assert torch.equal(torch.isfinite(sa["lse"]), fin) and torch.allclose(sa["lse"][fin], sb["lse"][fin])
    assert not fin.all()  # the empty row reports -inf on both routes


@pytest.mark.parametrize(
    "mask_dtype,q_dtype,routed",
    [
        (torch.bool, torch.float32, True),
        (torch.float16, torch.float32, True),  # Hugging Face style finfo(fp16).min mask, exact in fp32
        (torch.bfloat16, torch.float32, True),
        (torch.float32, torch.bfloat16, False),  # rounding the bias to bf16 would change the result
        (torch.float64, torch.float32, False),
    ],
)
def test_softmax_sdpa_route_mask_dtypes(mask_dtype, q_dtype, routed, monkeypatch):
    calls = []
    real = softmax_unit._sdpa_forward
    monkeypatch.setattr(softmax_unit, "_sdpa_forward", lambda *a: calls.append(1) or real(*a))
    shape = (1, 2, 2, 19, 12, 16, 16)       # more query rows than softmax_unit.DECODE_ROWS
    q, k, v = make_qkv(shape, q_dtype, seed=19)
    if mask_dtype == torch.bool:
        mask = make_mask("bool-B1LS-emptyrows", shape, q_dtype)
    else:
        mask = (torch.randn(19, 12) * 2).to(mask_dtype)
        mask[:, ::4] = torch.finfo(mask_dtype).min
        mask[2] = torch.finfo(mask_dtype).min  # an empty row
    out, st = flashmaps.attention(q, k, v, attn_mask=mask, return_stats=True, backend="torch")
    assert bool(calls) == routed
    ref = R.attention(q, k, v, attn_mask=mask)
    assert rel_err(out, ref) < TOL[q_dtype]
    if mask_dtype != torch.bool:
        assert torch.all(out[:, :, 2] == 0) and torch.all(st["lse"][:, :, 2] == float("-inf"))


def test_softmax_decode_runs_the_chunk_loop(monkeypatch):
    """At most DECODE_ROWS query rows (decoding) the chunk loop runs, not torch's CPU flash op (it reads K/V
    3-5x faster there: bench/results/cpu/decode); the same result."""
    calls = []
    real = softmax_unit._sdpa_forward
    monkeypatch.setattr(softmax_unit, "_sdpa_forward", lambda *a: calls.append(1) or real(*a))
    for L in (1, softmax_unit.DECODE_ROWS, softmax_unit.DECODE_ROWS + 1):
        q, k, v = make_qkv((1, 4, 2, L, 300, 16, 16), torch.float32, seed=L)
        out = flashmaps.attention(q, k, v, enable_gqa=True, backend="torch")
        assert len(calls) == (L > softmax_unit.DECODE_ROWS)
        assert rel_err(out, R.attention(q, k, v, enable_gqa=True)) < TOL[torch.float32]


def _strided_qkv(case, B=2, H=4, L=9, S=11, D=8):
    g = torch.Generator().manual_seed(43)

    def rn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q, k, v = rn(B, H, L, D), rn(B, H, S, D), rn(B, H, S, D)
    if case == "k-batch-expanded":
        k = rn(1, H, S, D).expand(B, H, S, D)
    elif case == "k-heads-sliced":
        k = rn(B, 2 * H, S, D)[:, ::2]
    elif case == "k-seq-strided":
        k = rn(B, H, 2 * S, D)[:, :, ::2]
    elif case == "q-BLHD":
        q = rn(B, L, H, D).transpose(1, 2)
    elif case == "v-head-dim-sliced":
        v = rn(B, H, S, 2 * D)[..., :D]
    elif case == "q-heads-expanded":
        q = rn(B, 1, L, D).expand(B, H, L, D)
    return q, k, v


@pytest.mark.parametrize("causal", [False, True], ids=["nocausal", "causal"])
@pytest.mark.parametrize(
    "case", ["k-batch-expanded", "k-heads-sliced", "k-seq-strided", "q-BLHD", "v-head-dim-sliced", "q-heads-expanded"]
)
def test_softmax_sdpa_route_strided_inputs(case, causal, monkeypatch):
    """The SDPA op reads through strides when the head dim has unit stride (and is then routed)."""
    calls = []
    real = softmax_unit._sdpa_forward
    monkeypatch.setattr(softmax_unit, "_sdpa_forward", lambda *a: calls.append(1) or real(*a))
    q, k, v = (x.requires_grad_() for x in _strided_qkv(case, L=19))   # > DECODE_ROWS: routed
    out = flashmaps.attention(q, k, v, causal=causal, backend="torch")
    assert calls
    ref, ref_grad = ref_grads(q, k, v, "softmax", causal=causal)
    assert rel_err(out, ref) < 1e-12
    dout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), ref_grad(dout)):
        assert grad_err(a, b) < 1e-12


# ----------------------------------------------------------------------------------------------------
# dropout


def _dropout_call(q, k, v, norm, p, seed, causal="lower_right", mask=None):
    torch.manual_seed(seed)
    out = flashmaps.attention(q, k, v, norm, causal=causal, attn_mask=mask, enable_gqa=True, dropout_p=p,
                              backend="torch")
    return out


@pytest.mark.parametrize("norm", GRID)
def test_dropout_matches_reference_with_same_mask(norm, small_chunks):
    shape = (2, 4, 2, 21, 34, 8, 8)
    q, k, v = (x.requires_grad_() for x in make_qkv(shape, torch.float64, seed=23))
    mask = make_mask("bool-B1LS-emptyrows", shape, torch.float64)
    p = 0.3
    out = _dropout_call(q, k, v, norm, p, seed=5, mask=mask)
    torch.manual_seed(5)
    seed = TP.draw_seed()
    keep = TP.dropout_keep_mask(seed, (2, 4, 21, 34), p)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.03
    ref, ref_grad = ref_grads(q, k, v, norm, causal="lower_right", attn_mask=mask, dropout_mask=keep.double() / (1 - p),
                              noise_seed=seed)
    assert rel_err(out, ref) < 1e-12
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    for a, b in zip(got, ref_grad(dout)):
        assert rel_err(a, b) < 1e-12


def test_dropout_same_seed_same_result_any_chunking(monkeypatch):
    shape = (1, 2, 2, 40, 50, 8, 8)
    q, k, v = (x.requires_grad_() for x in make_qkv(shape, torch.float32, seed=29))
    results = []
    for chunk in (1 << 20, 700, 1 << 20):
        monkeypatch.setattr(TP, "CHUNK_ELEMS", chunk)
        out = _dropout_call(q, k, v, "entmax15", 0.2, seed=3)
        results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for a, b in zip(results[0], results[2]):  # same seed: bitwise equal
        assert torch.equal(a, b)
    for a, b in zip(results[0], results[1]):  # other chunking: same keep mask (only rounding differs)
        assert rel_err(a, b) < 1e-6
    other = _dropout_call(q, k, v, "entmax15", 0.2, seed=4)
    assert not torch.equal(other, results[0][0])


def test_dropout_mean_matches_no_dropout():
    """E[out] = out without dropout: the mean of n draws is within a few standard errors."""
    shape = (1, 2, 1, 6, 12, 4, 4)
    q, k, v = make_qkv(shape, torch.float64, seed=31)
    base = flashmaps.attention(q, k, v, "softmax", enable_gqa=True, backend="torch")
    n = 400
    draws = torch.stack([_dropout_call(q, k, v, "softmax", 0.4, seed=s, causal=False) for s in range(n)])
    mean, var = draws.mean(0), draws.var(0)
    # ||mean - base||^2 has expectation sum(var) / n; allow 2x in norm (4x in squared norm)
    assert (mean - base).norm() < 2 * math.sqrt(var.sum().item() / n)
    assert (draws[0] - base).norm() > 0.05 * base.norm()  # dropout does something


# ----------------------------------------------------------------------------------------------------
# strides, inputs untouched, chunk memory bound, the hook table


def test_any_strides(small_chunks):
    B, Hq, Hkv, L, S, D, Dv = 2, 4, 2, 13, 17, 8, 8
    g = torch.Generator().manual_seed(37)
    q = torch.randn(B, L, Hq, D, generator=g).transpose(1, 2)  # (B, Hq, L, D), BLHD layout
    k = torch.randn(D, B, Hkv, S, generator=g).permute(1, 2, 3, 0)  # head dim not unit stride
    v = torch.randn(B, Hkv, Dv, S, generator=g).transpose(-1, -2)
    mask = (torch.rand(S, L, generator=g) < 0.8).T  # transposed (L, S) bool mask
    for norm in ["softmax", "entmax15", "topk:3", "taylor"]:
        qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
        out = flashmaps.attention(qs, ks, vs, norm, attn_mask=mask, causal=True, enable_gqa=True, backend="torch")
        ref, ref_grad = ref_grads(q, k, v, norm, attn_mask=mask, causal=True)
        assert rel_err(out, ref) < 1e-5
        dout = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, (qs, ks, vs), dout), ref_grad(dout)):
            assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("norm", NORMS)
def test_inputs_not_modified(norm):
    shape = (1, 4, 2, 9, 11, 8, 8)
    q, k, v = (x.requires_grad_() for x in make_qkv(shape, torch.float32, seed=41))
    mask = make_mask("float-inf-min-emptyrow", shape, torch.float32)
    before = [x.detach().clone() for x in (q, k, v, mask)]
    for softcap, p in ((None, 0.0), (5.0, 0.2)):
        out = flashmaps.attention(q, k, v, norm, attn_mask=mask, causal=True, enable_gqa=True, softcap=softcap,
                                  dropout_p=p, backend="torch")
        out.sum().backward()
        for x, y in zip((q, k, v, mask), before):
            assert torch.equal(x.detach(), y)


def test_chunk_never_holds_more_than_the_budget(monkeypatch):
    """Memory bound: every score chunk has at most max(CHUNK_ELEMS, G*S) entries, never (L, S) per head
    for all heads (each registered unit's torch_stats wrapped: the hook the chunk loop calls)."""
    monkeypatch.setattr(TP, "CHUNK_ELEMS", 2000)
    seen = []
    for cls in flashmaps.registry().values():
        def torch_stats(self, s, masked, _real=cls.torch_stats):
            seen.append(s.numel())
            return _real(self, s, masked)

        monkeypatch.setattr(cls, "torch_stats", torch_stats)
    B, Hq, Hkv, L, S = 2, 4, 2, 64, 100
    q, k, v = make_qkv((B, Hq, Hkv, L, S, 8, 8), torch.float32)
    for norm in NORMS:
        seen.clear()
        flashmaps.attention(q, k, v, norm, enable_gqa=True, softcap=5.0, backend="torch")
        assert len(seen) > 1 and max(seen) <= 2000 and sum(seen) == B * Hq * L * S, norm


def test_every_registered_normalizer_has_torch_hooks():
    from flashmaps.normalizers.base import Normalizer

    for name, cls in flashmaps.registry().items():
        for hook in ("reference_weights", "torch_stats", "torch_weights", "torch_dscores"):
            assert getattr(cls, hook) is not getattr(Normalizer, hook), (name, hook)


@pytest.mark.parametrize("iters", [0, 1, 64], ids=["sort-only", "newton-1-then-sort", "newton"])
@pytest.mark.parametrize("spread", [0.0, 0.02, 1.0, 3.0], ids=["equal", "flat", "normal", "peaked"])
def test_exact_threshold_of_wide_supports(iters, spread, monkeypatch):
    """Rows whose support exceeds the first selection: the Newton iteration (with exact polish), the sort for
    the rows it leaves open, or both, give entmax15's and sparsemax's float64 thresholds."""
    from flashmaps.normalizers.entmax15 import _tau_of_sorted as entmax15_rows
    from flashmaps.normalizers.sparsemax import _tau_of_sorted as sparsemax_rows, sparsemax_threshold

    monkeypatch.setattr(RW, "NEWTON_MAX_ITERS", iters)
    g = torch.Generator().manual_seed(11)
    s = torch.randn(40, 300, generator=g, dtype=torch.float64) * spread
    s[:5, 150:] = float("-inf")
    allowed = s > float("-inf")
    tau, _ = RW.exact_threshold(s, entmax15_rows, 8, power=2, unit=0.5)
    assert torch.allclose(tau, entmax15_threshold(s, allowed), rtol=1e-9, atol=1e-12)
    tau, _ = RW.exact_threshold(s, sparsemax_rows, 8, power=1)
    assert torch.allclose(tau, sparsemax_threshold(s, allowed), rtol=1e-9, atol=1e-12)
