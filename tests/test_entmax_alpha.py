"""alpha-entmax (flashmaps.Entmax, "entmax:<alpha>"): the unit's float64 reference against the `entmax`
package's entmax_bisect (outputs and autograd gradients), the torch path against both (gradcheck in float64),
per-head alpha, the twins entmax:1.5 = entmax15 and entmax:2 = sparsemax, and the option errors. The registry
grid (test_torch_path, test_kernels_*) runs Entmax.examples() through every backend on top of this.
"""

import pytest
import torch
from helpers import grad_err, mask_for, qkv_for, rel_err

import flashmaps
from flashmaps import reference
from flashmaps.normalizers import Entmax15, parse
from flashmaps.normalizers.entmax import Entmax, entmax_threshold
from flashmaps.normalizers.sparsemax import Sparsemax

entmax = pytest.importorskip("entmax")

ALPHAS = [1.1, 1.25, 1.75, 1.95]


def scores(B=2, H=3, L=5, S=9, seed=0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, L, S, generator=g, dtype=torch.float64) * spread).requires_grad_()


@pytest.mark.parametrize("alpha", ALPHAS)
def test_reference_matches_entmax_bisect(alpha):
    """Weights and their gradients (float64 autograd through the reference's implicit Newton step) against
    the entmax package's bisection with its own autograd rule."""
    s = scores()
    allowed = torch.ones(s.shape, dtype=torch.bool)
    p = Entmax(alpha).reference_weights(s, allowed)
    want = entmax.entmax_bisect(s, alpha=alpha, dim=-1, n_iter=100)
    assert (p - want).abs().max() < 1e-12
    dp = torch.randn(s.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (g_ref,) = torch.autograd.grad(p, s, dp)
    (g_pkg,) = torch.autograd.grad(want, s, dp)
    assert (g_ref - g_pkg).abs().max() < 1e-10
    assert (p == 0).any(), "alpha-entmax gives exact zeros at this spread"


@pytest.mark.parametrize("alpha", [1.25, 1.75])
def test_threshold_bounds_and_masks(alpha):
    """tau lies in [max x - 1, max x - n^(1-alpha)]; disallowed keys never enter; empty rows get +inf."""
    s = scores().detach()
    allowed = torch.rand(s.shape, generator=torch.Generator().manual_seed(2)) < 0.6
    allowed[0, 0, 0] = False
    tau = entmax_threshold(s, allowed, alpha)[..., 0]
    x = torch.where(allowed, s * (alpha - 1), torch.tensor(float("-inf"), dtype=s.dtype))
    n = allowed.sum(-1)
    top = x.amax(-1)
    ok = n > 0
    assert tau[0, 0, 0] == float("inf")
    assert (tau[ok] >= top[ok] - 1 - 1e-12).all() and (tau[ok] <= top[ok] - n[ok] ** (1 - alpha) + 1e-12).all()
    p = Entmax(alpha).reference_weights(s, allowed)
    assert (p[~allowed] == 0).all() and torch.allclose(p.sum(-1)[ok], torch.ones(()).double())


@pytest.mark.parametrize("alpha, mask_kind, causal", [
    (1.25, "none", None), (1.25, "bool-B1LS-emptyrows", "lower_right"), ("per_head", "none", "lower_right"),
    ("per_head", "bool-B1LS-emptyrows", None)])
def test_torch_path_gradcheck(alpha, mask_kind, causal):
    """The torch path in float64: output against the reference and torch.autograd.gradcheck of its backward
    (GQA, Dqk != Dv, masks with empty rows, causal)."""
    shape = (1, 4, 2, 5, 9, 8, 6)
    q, k, v = (x.requires_grad_() for x in qkv_for(shape, torch.float64))
    mask = mask_for(mask_kind, shape, torch.float64)
    norm = Entmax(torch.tensor([1.1, 1.4, 1.7, 2.0], dtype=torch.float64) if alpha == "per_head" else alpha)

    def fn(q, k, v):
        return flashmaps.attention(q, k, v, norm, causal=causal or False, attn_mask=mask, enable_gqa=True,
                                   backend="torch")

    want = reference.attention(q, k, v, norm, causal=causal or False, attn_mask=mask, enable_gqa=True)
    assert rel_err(fn(q, k, v), want) < 1e-12
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_per_head_alpha_is_each_heads_own_call(monkeypatch):
    """A per-head alpha gives head h exactly the call with the float alpha_h (fp32, chunked by head or not),
    and agrees with entmax_bisect row by row."""
    from flashmaps import torch_path

    shape = (2, 4, 2, 7, 13, 8, 8)
    q, k, v = qkv_for(shape, torch.float32)
    alphas = [1.05, 1.3, 1.6, 1.9]
    out = flashmaps.attention(q, k, v, Entmax(torch.tensor(alphas)), enable_gqa=True, backend="torch")
    monkeypatch.setattr(torch_path, "CHUNK_ELEMS", 50)            # one kv head and one row per chunk
    chunked = flashmaps.attention(q, k, v, Entmax(torch.tensor(alphas)), enable_gqa=True, backend="torch")
    assert rel_err(chunked, out) < 1e-6
    for h, a in enumerate(alphas):
        one = flashmaps.attention(q[:, h:h + 1], k[:, h // 2:h // 2 + 1], v[:, h // 2:h // 2 + 1], Entmax(a),
                                  backend="torch")
        assert rel_err(out[:, h:h + 1], one) < 1e-6
    s = torch.matmul(q.double(), k.double().repeat_interleave(2, 1).transpose(-1, -2)) / 8 ** 0.5
    a = torch.tensor(alphas, dtype=torch.float64).view(1, 4, 1, 1).expand(2, 4, 7, 1)
    want = torch.matmul(entmax.entmax_bisect(s, alpha=a, dim=-1, n_iter=100), v.double().repeat_interleave(2, 1))
    assert rel_err(out, want) < 1e-5


def test_twins():
    """entmax:1.5 is entmax15 and entmax:2 is sparsemax (the same units: same kernels, same results); the
    general code at those alphas agrees with them to rounding."""
    assert parse("entmax:1.5") == Entmax15() and parse("entmax:2") == Sparsemax() and parse("entmax:2.0") == Sparsemax()
    shape = (1, 2, 2, 6, 17, 8, 8)
    q, k, v = qkv_for(shape, torch.float64)
    for alpha, twin in ((1.5, "entmax15"), (2.0, "sparsemax")):
        a = flashmaps.attention(q, k, v, f"entmax:{alpha:g}", backend="torch")
        assert torch.equal(a, flashmaps.attention(q, k, v, twin, backend="torch"))
        assert rel_err(flashmaps.attention(q, k, v, Entmax(alpha), backend="torch"), a) < 1e-12


def test_spec_round_trip_and_examples():
    assert parse("entmax:1.25") == Entmax(1.25) and Entmax(1.25).spec == "entmax:1.25"
    assert parse(Entmax(1.75).spec) == Entmax(1.75) and Entmax(1.25) != Entmax(1.75)
    per_head = Entmax(torch.tensor([1.2, 1.8]))
    assert per_head.spec == "entmax:per_head" and per_head == per_head and per_head != Entmax(1.2)
    assert all(isinstance(n, Entmax) for n in Entmax.examples())


@pytest.mark.parametrize("spec, match", [
    ("entmax", "needs alpha"), ("entmax:1", r"\(1, 2\]"), ("entmax:2.5", r"\(1, 2\]"), ("entmax:abc", "number"),
    ("entmax:per_head", "per-head alpha tensor"), ("entmax:nan", r"\(1, 2\]"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        parse(spec)


def test_bad_alpha_values():
    with pytest.raises(ValueError, match=r"alpha must lie in \(1, 2\]"):
        Entmax(0.5)
    with pytest.raises(TypeError, match="alpha must be a float"):
        Entmax("1.5")
    with pytest.raises(TypeError, match="alpha must be a float"):
        Entmax(True)
    with pytest.raises(ValueError, match=r"every alpha must lie in \(1, 2\]"):
        Entmax(torch.tensor([1.5, 1.0]))
    with pytest.raises(ValueError, match=r"shape \(Hq,\)"):
        Entmax(torch.ones(2, 2) * 1.5)
    with pytest.raises(ValueError, match="gradients with respect to alpha are not provided"):
        Entmax(torch.full((2,), 1.5, requires_grad=True))
    q, k, v = qkv_for((1, 4, 4, 3, 5, 8, 8), torch.float32)
    with pytest.raises(ValueError, match=r"shape \(Hq,\) = \(4,\)"):
        flashmaps.attention(q, k, v, Entmax(torch.tensor([1.2, 1.8])), backend="torch")


def test_triton_per_head_alpha():
    """The Triton kernels (interpreter on the CPU) with one alpha per query head (the kernels' head
    parameter): out, dq, dk, dv against float64 autograd of the reference; GQA, a mask with excluded keys,
    lower-right causal. (The registry grid runs the float-alpha example through every kernel test.)"""
    from helpers import KERNEL_DEVICE

    shape = (1, 4, 2, 19, 37, 16, 24)
    q, k, v = qkv_for(shape, torch.float32, device=KERNEL_DEVICE)
    mask = mask_for("float-inf-min-emptyrow", shape, torch.float32).to(KERNEL_DEVICE)
    norm = Entmax(torch.tensor([1.05, 1.3, 1.6, 1.95], device=KERNEL_DEVICE))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = flashmaps.attention(*leaves, norm, causal="lower_right", attn_mask=mask, enable_gqa=True, backend="triton")
    ref_leaves = [x.detach().double().cpu().requires_grad_() for x in (q, k, v)]
    ref = reference.attention(*ref_leaves, Entmax(norm.alpha.cpu().double()), causal="lower_right",
                              attn_mask=mask.cpu(), enable_gqa=True)
    assert rel_err(out, ref) < 1e-5
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, dout.to(out.dtype).to(out.device))
    want = torch.autograd.grad(ref, ref_leaves, dout)
    for name, a, b in zip("qkv", got, want):
        assert grad_err(a, b) < 1e-4, (name, grad_err(a, b))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_per_head_alpha_two_phase_merge(backend):
    """A per-head alpha through the two-phase protocol (its threshold in x = (alpha_h - 1) s units per head):
    three interleaved key parts merge into the full call."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 2, 40, 8, generator=g),
               torch.randn(1, 2, 40, 8, generator=g))
    norm = Entmax(alpha=torch.tensor([1.3, 1.8]))
    full = flashmaps.attention(q, k, v, norm, backend="torch")
    masks = [(torch.arange(40) % 3 == p).expand(1, 2, 3, 40) for p in range(3)]
    thr = flashmaps.global_threshold(norm, [flashmaps.threshold_candidates(q, k, norm, attn_mask=m) for m in masks])
    parts = [flashmaps.attention(q, k, v, norm, attn_mask=m, threshold=thr, return_stats=True, backend=backend)
             for m in masks]
    out, _ = flashmaps.merge(norm, [o for o, _ in parts], [s for _, s in parts], threshold=thr)
    assert rel_err(out, full) < 1e-5
