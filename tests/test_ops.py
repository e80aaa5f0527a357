"""The torch.library custom ops: opcheck, and torch.compile(fullgraph=True) through attention/sdpa."""

import pytest
import torch
from helpers import KERNEL_DEVICE, NORMS, pin_seed, rel_err

import flashmaps
from flashmaps import ops, reference



def _inputs(dtype=torch.float32, device="cpu", B=1, Hq=4, Hkv=2, L=12, S=17, D=16, Dv=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, D, generator=g, dtype=dtype).to(device)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=dtype).to(device)
    v = torch.randn(B, Hkv, S, Dv, generator=g, dtype=dtype).to(device)
    return q, k, v


def _opcheck_cases():
    """Every (normalizer, backend) pair once, the softcap alternating (its schema, fake and autograd registration
    are the same op either way): each unit meets both softcaps, each over one backend."""
    for i, norm in enumerate(NORMS):
        for j, (backend, device) in enumerate([("torch", "cpu"), ("triton", KERNEL_DEVICE)]):
            cap, cap_id = [(None, "nocap"), (4.0, "cap4")][(i + j) % 2]
            yield pytest.param(backend, device, norm, cap, id=f"{norm}-{cap_id}-{backend}")


@pytest.mark.parametrize("backend,device,norm,softcap", list(_opcheck_cases()))
def test_opcheck(backend, device, norm, softcap):
    dtype = torch.float64 if backend == "torch" else torch.float32
    q, k, v = (x.requires_grad_() for x in _inputs(dtype, device, Dv=8))
    mask = (torch.rand(12, 17, generator=torch.Generator().manual_seed(1)) > 0.3).to(device)
    mask = mask.expand(1, 4, 12, 17)
    seed = torch.zeros((), dtype=torch.int64)
    args = (q, k, v, mask, seed, backend, norm, "upper_left", 0.3, softcap, 0.0, True)
    # test_aot_dispatch_dynamic recomputes the op and compares gradients: entmax15/topk are piecewise
    # smooth, so random inputs (no ties) are fine
    torch.library.opcheck(torch.ops.flashmaps.attention_fwd.default, args)


@pytest.mark.parametrize("norm", NORMS)
def test_compile_fullgraph_cpu(norm):
    """A small model calling flashmaps.attention and flashmaps.sdpa compiles without graph breaks and
    gives the eager result, forward and backward."""
    torch._dynamo.reset()
    q, k, v = _inputs(torch.float32, "cpu", seed=3)
    proj = torch.nn.Linear(16, 16).double().float()

    def model(q, k, v):
        a = flashmaps.attention(proj(q), k, v, norm, causal=True, enable_gqa=True)
        b = flashmaps.sdpa(q, k, v, is_causal=False, enable_gqa=True, normalizer=norm)
        return (a + b).square().sum()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    qs = [q.clone().requires_grad_() for _ in range(2)]
    pin_seed(norm)                       # a stochastic normalizer: both runs draw the same seeds
    loss_c = compiled(qs[0], k, v)
    pin_seed(norm)
    loss_e = model(qs[1], k, v)
    loss_c.backward()
    loss_e.backward()
    assert rel_err(loss_c, loss_e) < 1e-6
    assert rel_err(qs[0].grad, qs[1].grad) < 1e-5


def test_compile_dropout_runs_and_differs():
    torch._dynamo.reset()
    q, k, v = _inputs(torch.float32, "cpu", seed=4)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v):
        return flashmaps.sdpa(q, k, v, dropout_p=0.5, enable_gqa=True)

    a, b = f(q, k, v), f(q, k, v)
    assert torch.isfinite(a).all() and not torch.equal(a, b)


def test_explicit_seed_reproduces_dropout():
    q, k, v = _inputs(torch.float64, "cpu", seed=5)
    norm = flashmaps.parse("entmax15")
    kw = dict(mask=None, causal=None, scale=0.25, softcap=None, dropout_p=0.4, return_stats=False)
    a = ops.attention("torch", q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), norm,
                      seed=torch.tensor(7), **kw)
    b = ops.attention("torch", q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), norm,
                      seed=torch.tensor(7), **kw)
    c = ops.attention("torch", q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), norm,
                      seed=torch.tensor(8), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    ref = reference.attention(q, k, v, norm, scale=0.25, enable_gqa=True)
    assert rel_err(a, ref) > 1e-3  # dropout did something


def test_compile_inductor_cpu():
    """The default compiler (inductor, C++ on the CPU) around the custom ops: same loss and gradients."""
    torch._dynamo.reset()
    q, k, v = _inputs(torch.float32, "cpu", seed=6)
    proj = torch.nn.Linear(16, 16)

    def model(q, k, v):
        return flashmaps.attention(proj(q), k, v, "entmax15", causal=True, enable_gqa=True).square().sum()

    compiled = torch.compile(model, fullgraph=True)
    qs = [q.clone().requires_grad_() for _ in range(2)]
    loss_c, loss_e = compiled(qs[0], k, v), model(qs[1], k, v)
    loss_c.backward()
    loss_e.backward()
    assert rel_err(loss_c, loss_e) < 1e-6
    assert rel_err(qs[0].grad, qs[1].grad) < 1e-5
