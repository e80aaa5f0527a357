"""The non-finite rule, for every registered normalizer on both backends (Triton under the interpreter):

* a row with a NaN or +inf score (after softcap, mask and causal exclusion) gives NaN: its output, its row
  statistics and, in the backward, its dq row and its head's dk and dv; never a crash, never a finite row;
* a -inf score excludes its key, as a mask does (taylor's f(-inf) is undefined: its row may be NaN);
* a row whose scores are all finite and within the unit's ``score_limit(dtype)`` is finite.
"""

import math

import pytest
import torch
from helpers import DTYPE_NAMES, NORMS, TRITON_NORMS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashmaps

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (interpreter) on NaN/inf

NAN, INF = float("nan"), float("inf")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["torch", "triton"]


def _expected(q, k, causal, mask, scale):
    """(bad rows [B, Hq, L]: a NaN or +inf score among the allowed keys; finite rows: every allowed score
    finite; max |allowed finite score| per row), from fp32 scores as the kernels compute them."""
    B, Hq, L, D = q.shape
    G = Hq // k.shape[1]
    kk = k.float().repeat_interleave(G, 1)
    s = (q.float() @ kk.transpose(-1, -2)) * scale                                   # [B, Hq, L, S]
    S = s.shape[-1]
    allowed = torch.ones_like(s, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(L, S, dtype=torch.bool).tril()
    if mask is not None:
        m = mask.expand(B, Hq, L, S)
        if m.dtype == torch.bool:
            allowed &= m
        else:
            allowed &= m > torch.finfo(m.dtype).min
            s = s + torch.where(allowed, m.float(), torch.zeros((), dtype=torch.float32))
    s = torch.where(allowed, s, torch.full((), -INF))
    bad = (torch.isnan(s) | (s == INF)).any(-1)
    finite = torch.where(allowed, torch.isfinite(s), torch.ones((), dtype=torch.bool)).all(-1)
    top = torch.where(allowed & torch.isfinite(s), s.abs(), torch.zeros(())).amax(-1)
    return bad, finite, top


def _check(norm, q, k, v, causal, mask, backend, backward=True, **kw):
    spec = flashmaps.parse(norm)
    scale = 1 / math.sqrt(q.shape[-1])
    bad, finite, top = _expected(q, k, causal, mask, scale)
    q, k, v = (x.clone().requires_grad_(backward) for x in (q, k, v))
    before = [x.detach().clone() for x in (q, k, v)]
    out, stats = flashmaps.attention(q, k, v, norm, causal=causal, attn_mask=mask, enable_gqa=True,
                                     backend=backend, return_stats=True, **kw)
    assert all(torch.equal(a, b, ) or (a.isnan() == b.isnan()).all() for a, b in zip(before, (q, k, v)))
    assert out[bad].isnan().all(), "a row with a NaN or +inf score must be NaN"
    for name, val in stats.items():
        assert val[bad].isnan().all(), f"statistic {name} of a NaN row"
    ok = finite & ~bad & (top <= spec.score_limit(q.dtype))
    assert torch.isfinite(out[ok]).all(), "a row of finite scores within the unit's score_limit must be finite"
    if not backward:
        return
    out.float().nan_to_num(0.0).sum().backward() if not bad.any() else out.float().sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None
    if bad.any():
        assert q.grad[bad].isnan().all(), "dq of a NaN row"
        G = q.shape[1] // k.shape[1]
        heads = bad.any(-1).view(bad.shape[0], k.shape[1], G).any(-1)               # [B, Hkv]
        assert k.grad[heads].isnan().all() and v.grad[heads].isnan().all(), "dk, dv of a NaN row's head"
    return q, k, v


def _huge(dtype):
    """A finite value whose product with a normal one is a finite fp32 score and with itself overflows fp32
    (no boundary case, whichever order a backend multiplies the scale in)."""
    return 6e4 if dtype == torch.float16 else 1e30


def _inputs(dtype, B=1, Hq=2, Hkv=1, L=9, S=13, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    return q, k, v


INJECT = {
    "q-nan": lambda q, k: q[0, 1, 4].__setitem__(2, NAN),
    "k-nan": lambda q, k: k[0, 0, 6].__setitem__(0, NAN),
    "k-inf": lambda q, k: k[0, 0, 3].__setitem__(1, INF),
    "q-neg-inf": lambda q, k: q[0, 0, 2].__setitem__(5, -INF),
    "huge": lambda q, k: (q[0, 1, 7].fill_(_huge(q.dtype)), k[0, 0, 5].fill_(_huge(k.dtype))),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(INJECT))
@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_NAMES[d] for d in DTYPES])
@pytest.mark.parametrize("norm", NORMS)
def test_nonfinite_rule(norm, dtype, case, backend):
    if backend == "triton" and norm not in TRITON_NORMS:
        pytest.skip(f"{norm} has no Triton kernels")
    q, k, v = _inputs(dtype)
    INJECT[case](q, k)
    _check(norm, q, k, v, causal=case == "k-nan", mask=None, backend=backend)


@pytest.mark.parametrize("norm", ["sparsemax", "topk:5"])
def test_nonfinite_rule_deterministic(norm):
    """The Triton backward's other kernel set (deterministic=True: the dQ kernel, no atomic dQ) applies the rule
    too (its row flags; the above run the default atomic dQ): units whose weights would drop the NaN."""
    q, k, v = _inputs(torch.float32, B=2, Hq=4, Hkv=2)
    q[1, 2, 4, 2] = NAN                               # batch 1, kv head 1: the other heads' gradients stay finite
    q, k, v = _check(norm, q, k, v, causal=False, mask=None, backend="triton", deterministic=True)
    assert torch.isfinite(q.grad[0]).all() and torch.isfinite(q.grad[1, :2]).all(), "dq of the other heads"
    assert torch.isfinite(k.grad[0]).all() and torch.isfinite(k.grad[1, 0]).all(), "dk of the other kv heads"
    assert torch.isfinite(v.grad[0]).all() and torch.isfinite(v.grad[1, 0]).all(), "dv of the other kv heads"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_nan_in_a_masked_key_is_not_seen(norm, backend):
    """A NaN score of an excluded key (mask or causal) is not part of the row: the row stays finite."""
    if backend == "triton" and norm not in TRITON_NORMS:
        pytest.skip(f"{norm} has no Triton kernels")
    q, k, v = _inputs(torch.float32)
    k[0, 0, 12, 0] = NAN                              # the last key: excluded for every row by causal (L < S)
    out = flashmaps.attention(q, k, v, norm, causal=True, enable_gqa=True, backend=backend)
    assert torch.isfinite(out).all()


@st.composite
def _problem(draw):
    B, Hkv, G = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    L, S, D = draw(st.integers(1, 12)), draw(st.integers(1, 20)), draw(st.sampled_from([4, 8, 16]))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    q, k, v = _inputs(dtype, B, Hkv * G, Hkv, L, S, D, seed)
    values = [NAN, INF, -INF, _huge(dtype), -_huge(dtype), 1e4]
    for _ in range(draw(st.integers(0, 3))):
        x = draw(st.sampled_from([q, k]))
        idx = tuple(draw(st.integers(0, n - 1)) for n in x.shape)
        x[idx] = draw(st.sampled_from(values))
    kind = draw(st.sampled_from(["none", "bool", "float"]))
    mask = None
    if kind != "none":
        g = torch.Generator().manual_seed(seed + 1)
        if kind == "bool":
            mask = torch.rand(B, 1, L, S, generator=g) < 0.7
        else:
            mask = torch.randn(1, Hkv * G, L, S, generator=g)
            mask[torch.rand(mask.shape, generator=g) < 0.2] = -INF
            if draw(st.booleans()):
                mask[0, 0, 0, 0] = draw(st.sampled_from([NAN, INF]))
    causal = draw(st.sampled_from([False, True])) if L <= S else False
    return q, k, v, mask, causal


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(problem=_problem(), norm=st.sampled_from(NORMS), backend=st.sampled_from(BACKENDS))
def test_nonfinite_rule_property(problem, norm, backend):
    """Random shapes, dtypes, masks (NaN/+inf mask entries included), normalizers and injected NaN/inf/huge
    values: the rule holds, forward and backward, with no crash."""
    q, k, v, mask, causal = problem
    if backend == "triton" and norm not in TRITON_NORMS:
        backend = "torch"
    _check(norm, q, k, v, causal=causal, mask=mask, backend=backend)
