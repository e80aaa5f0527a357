"""Helpers shared by the tests (no test file imports another): the normalizer grid from the registry, input
and mask makers, error measures, reference statistics and gradients.

The grid: ``NORMS`` holds the spec of every registered normalizer's ``examples()`` (a representative subset
of option values), so registering a normalizer puts it into every test that runs over ``NORMS``.
"""

from __future__ import annotations

import math

import pytest
import torch

import flashmaps
from flashmaps import reference, torch_path

HAS_CUDA = torch.cuda.is_available()
#: the device the Triton kernels run on in this session: "cuda" on a GPU machine, else "cpu" (interpreter)
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"

#: specs of every registered normalizer's examples (the test grid)
NORMS = [n.spec for n in flashmaps.examples()]
#: the ones with Triton kernels
TRITON_NORMS = [n.spec for n in flashmaps.examples() if n.has_triton]
#: the default instance of every normalizer with Triton kernels (topk:64): the CUDA tests at real sizes
TRITON_DEFAULTS = [n.spec for n in flashmaps.defaults() if n.has_triton]
#: the sparse ones of the grid
SPARSE_NORMS = [n.spec for n in flashmaps.examples() if n.has_triton and n.sparse]
#: one dense and one sparse normalizer (the first registered of each): the deep sweeps (head dims, block
#: shapes, dtypes) run over these rather than the whole registry, to bound their cost
DEEP = [next(n.spec for n in flashmaps.defaults() if n.has_triton and not n.sparse),
        next(n.spec for n in flashmaps.defaults() if n.has_triton and n.sparse)]
CAUSALS = [None, "upper_left", "lower_right"]
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def norm_params(specs=None) -> list:
    """pytest params (id = the spec) for the given specs (default: the grid)."""
    return [pytest.param(s, id=s) for s in (NORMS if specs is None else specs)]


# ----------------------------------------------------------------------------------------------------
# errors


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0/0 counts as 0); NaN anywhere gives inf."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    den = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / den if den > 0 else num


def grad_err(a, b):
    """rel_err with an absolute floor (RMS 0.1 per entry): a gradient that is exactly 0 in theory (S = 1:
    softmax over one key does not depend on q) is compared absolutely, not against rounding noise."""
    den = max(b.detach().double().norm().item(), 0.1 * math.sqrt(b.numel()))
    return (a.detach().double() - b.detach().double()).norm().item() / den


# ----------------------------------------------------------------------------------------------------
# inputs


def make_qkv(B, Hq, Hkv, L, S, D, Dv=None, dtype=torch.float32, device=KERNEL_DEVICE, seed=0, spread=1.0):
    """Random normal q (B, Hq, L, D), k (B, Hkv, S, D) (times ``spread``) and v (B, Hkv, S, Dv)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    Dv = D if Dv is None else Dv
    q = (torch.randn(B, Hq, L, D, generator=g) * spread).to(dtype=dtype, device=device)
    k = (torch.randn(B, Hkv, S, D, generator=g) * spread).to(dtype=dtype, device=device)
    v = torch.randn(B, Hkv, S, Dv, generator=g).to(dtype=dtype, device=device)
    return q, k, v


def qkv_for(shape, dtype, seed=0, device="cpu"):
    """q, k, v for shape = (B, Hq, Hkv, L, S, Dqk, Dv), drawn in float64 then cast."""
    B, Hq, Hkv, L, S, D, Dv = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, Dv, generator=g, dtype=torch.float64)
    return [x.to(dtype=dtype, device=device) for x in (q, k, v)]


def make_mask(kind, B, Hq, L, S, dtype=torch.float32, device=KERNEL_DEVICE, seed=1):
    """None, or a mask broadcastable to (B, Hq, L, S) of the given kind (a view, not expanded):
    "none", "bool" (B, 1, L, S) ~75 % True, "float" (1, Hq, L, S) bias with -inf / finfo.min holes,
    "empty_rows" (B, 1, L, S) float with every third row excluded through finfo.min and some through -inf."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "none":
        return None
    if kind == "bool":
        return (torch.rand(B, 1, L, S, generator=g) < 0.75).to(device)
    if kind == "float":
        m = torch.randn(1, Hq, L, S, generator=g)
        holes = torch.rand(1, Hq, L, S, generator=g)
        m = m.to(dtype)
        m[holes < 0.1] = float("-inf")
        m[(holes >= 0.1) & (holes < 0.2)] = torch.finfo(dtype).min
        return m.to(device)
    if kind == "empty_rows":
        m = torch.randn(B, 1, L, S, generator=g).to(dtype)
        m[:, :, 1::3, :] = torch.finfo(dtype).min
        m[:, :, 2::5, :] = float("-inf")
        return m.to(device)
    raise ValueError(kind)


def mask_for(kind, shape, dtype, seed=1):
    """A mask for shape = (B, Hq, Hkv, L, S, Dqk, Dv); kinds ending in 'emptyrow(s)' contain rows with no
    allowed key: "none", "bool-LS", "bool-B1LS-emptyrows", "float-inf-min-emptyrow"."""
    B, Hq, Hkv, L, S, D, Dv = shape
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "bool-LS":
        m = torch.rand(L, S, generator=g) < 0.7
        m[:, 0] = True  # no empty row
        return m
    if kind == "bool-B1LS-emptyrows":
        m = torch.rand(B, 1, L, S, generator=g) < 0.6
        m[:, :, ::3] = False  # rows 0, 3, 6, ... empty
        return m
    if kind == "float-inf-min-emptyrow":
        mdt = dtype if dtype != torch.float16 else torch.float32
        m = torch.randn(L, S, generator=g, dtype=torch.float64).to(mdt)
        r = torch.rand(L, S, generator=g)
        m[r < 0.15] = float("-inf")
        m[(r >= 0.15) & (r < 0.3)] = torch.finfo(mdt).min
        if L > 2:
            m[1] = torch.finfo(mdt).min  # a row excluded through finfo.min only (SDPA would average it)
            m[1, ::2] = float("-inf")
        return m
    raise ValueError(kind)


# ----------------------------------------------------------------------------------------------------
# references


#: the torch seed the grid sets before a public-API call of a stochastic normalizer (`pin_seed`)
GRID_TORCH_SEED = 1234


def pin_seed(norm, torch_seed: int = GRID_TORCH_SEED) -> int:
    """Call before a public-API call (which draws its seed from torch's default generator): for a stochastic
    normalizer (``Normalizer.stochastic``: gumbel), ``torch.manual_seed(torch_seed)`` and return the noise
    seed the call will draw, for the reference's ``noise_seed``; for the others 0 and nothing is touched."""
    if not flashmaps.parse(norm).stochastic:
        return 0
    torch.manual_seed(torch_seed)
    seed = torch_path.draw_seed()
    torch.manual_seed(torch_seed)
    return seed


def ref_stats(q, k, norm, *, causal=None, mask=None, scale=None, softcap=None, noise_seed=0):
    """The public row statistics computed densely in float64 by the unit's ``reference_stats``."""
    gqa = q.shape[1] != k.shape[1]
    s, allowed = reference.scores_and_allowed(q, k, causal=causal or False, attn_mask=mask, scale=scale,
                                              softcap=softcap, enable_gqa=gqa, normalizer=norm,
                                              noise_seed=noise_seed)
    return flashmaps.parse(norm).reference_stats(s, allowed)


def check_stats(stats, ref, tol):
    """Every statistic of ``ref`` matches: the same infinities, finite values within ``tol`` (relative to
    max(1, the largest magnitude))."""
    for name, want in ref.items():
        got = stats[name].double().cpu()
        want = want.cpu()
        assert got.shape == want.shape, name
        fin = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), fin), f"{name}: infinities at different rows"
        assert torch.equal(got[~fin], want[~fin]), f"{name}: wrong infinities"
        if fin.any():
            err = (got[fin] - want[fin]).abs().max().item()
            scale = max(1.0, want[fin].abs().max().item())
            assert err <= tol * scale, f"{name}: max abs err {err:.3g} (scale {scale:.3g})"


def grads(fn, q, k, v, dout):
    """(out, dq, dk, dv) of out = fn(q, k, v) with the output gradient dout."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return (out.detach(), *(x.grad for x in leaves))


def reference_grads(q, k, v, dout, norm, *, mask=None, causal=None, scale=None, softcap=None, dropout_mask=None,
                    noise_seed=0):
    """(out, dq, dk, dv) by float64 autograd through the dense reference."""
    gqa = q.shape[1] != k.shape[1]

    def fn(q_, k_, v_):
        return reference.attention(q_, k_, v_, norm, causal=causal or False, attn_mask=mask, scale=scale,
                                   softcap=softcap, enable_gqa=gqa, dropout_mask=dropout_mask,
                                   noise_seed=noise_seed)

    return grads(fn, q.double(), k.double(), v.double(), dout.double())


def ref_grads(q, k, v, norm, **kw):
    """Dense float64 reference output and the function to get its gradients for a given dout."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = reference.attention(q64, k64, v64, norm, enable_gqa=True, **kw)

    def grads_of(dout):
        return torch.autograd.grad(out, (q64, k64, v64), dout.double())

    return out, grads_of
