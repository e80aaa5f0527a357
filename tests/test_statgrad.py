"""Gradients through the row statistics (``Normalizer.stat_delta``): a loss on ``attention(...,
return_stats=True)``'s statistics back-propagates to q, k, v (and the sinks), so ``flashmaps.merge`` of parts over
disjoint key sets has the gradients of the call over all keys. Checked against float64 autograd of the dense
reference (the quadratic and the linear form), by gradcheck on the torch path, and merged-vs-full on both
backends; the threshold units' statistics stay non-differentiable.
"""

import pytest
import torch
from helpers import KERNEL_DEVICE, NORMS, grad_err, pin_seed, qkv_for, ref_stats, rel_err

import flashmaps
from flashmaps import reference

#: the grid's units with a merge rule / with gradients through their statistics
MERGE_NORMS = [n for n in NORMS if type(flashmaps.parse(n)).merge is not flashmaps.Normalizer.merge]
STAT_NORMS = [n for n in NORMS if flashmaps.parse(n).has_stat_grads]
LINEAR_NORMS = [n for n in STAT_NORMS if "linear" in flashmaps.parse(n).forms]
BACKENDS = ["torch", "triton"]
#: (B, Hq, Hkv, L, S, Dqk, Dv): GQA, Dqk != Dv, one query tile and a partial key tile under the interpreter
SHAPE = (1, 2, 1, 6, 13, 8, 4)


def _inputs(backend, seed=0):
    dtype, device = (torch.float64, "cpu") if backend == "torch" else (torch.float32, KERNEL_DEVICE)
    return [x.requires_grad_() for x in qkv_for(SHAPE, dtype, seed=seed, device=device)]


def _tol(backend):
    return 1e-10 if backend == "torch" else 2e-4


def test_the_grid_covers_the_units():
    assert {"softmax", "taylor"} <= set(STAT_NORMS) <= set(MERGE_NORMS) and "taylor" in LINEAR_NORMS
    assert all(flashmaps.parse(n).stats for n in STAT_NORMS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", MERGE_NORMS)
def test_merge_gradients_equal_the_full_call(norm, backend):
    """flashmaps.merge over a random partition of the keys (bool masks over the same keys, so a stochastic unit
    draws the full call's noise; causal, so early rows have no key in a part): output and dq, dk, dv of a loss
    on the merged output equal those of the call over all keys."""
    q, k, v = _inputs(backend)
    B, Hq, _, L, S, _, Dv = SHAPE
    dout = torch.randn(B, Hq, L, Dv, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(q)
    part = torch.randint(0, 2, (S,), generator=torch.Generator().manual_seed(3))
    part[:2] = 1                                       # row 0 (key 0 only) has no key in part 0
    causal = torch.arange(S)[None, :] <= torch.arange(L)[:, None]
    pin_seed(norm)
    full = flashmaps.attention(q, k, v, norm, causal=True, enable_gqa=True, backend=backend)
    want = torch.autograd.grad(full, (q, k, v), dout)
    outs, stats = [], []
    for p in range(2):
        pin_seed(norm)
        o, st = flashmaps.attention(q, k, v, norm, attn_mask=(causal & (part == p)).to(q.device), enable_gqa=True,
                                    return_stats=True, backend=backend)
        outs.append(o)
        stats.append(st)
    out, _ = flashmaps.merge(norm, outs, stats)
    assert rel_err(out, full) < _tol(backend)
    got = torch.autograd.grad(out, (q, k, v), dout)
    for name, a, b in zip("qkv", got, want):
        assert grad_err(a, b) < _tol(backend), f"d{name}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm, form", [(n, "quadratic") for n in STAT_NORMS] + [(n, "linear") for n in LINEAR_NORMS])
def test_stat_gradients_match_the_reference(norm, form, backend):
    """A loss on (out, stats) with GQA, lower-right causal and softcap (the quadratic form; the linear form takes
    none): dq, dk, dv equal float64 autograd of the dense reference (its output and ``reference_stats``)."""
    q, k, v = _inputs(backend, seed=1)
    B, Hq, _, L, S, _, Dv = SHAPE
    gen = torch.Generator().manual_seed(7)
    dout = torch.randn(B, Hq, L, Dv, generator=gen, dtype=torch.float64)
    nrm = flashmaps.parse(norm)
    gst = {name: torch.randn(B, Hq, L, generator=gen, dtype=torch.float64) for name in nrm.stats}
    kw = dict(causal="lower_right", softcap=3.0 if form == "quadratic" else None)
    noise = pin_seed(norm)
    out, st = flashmaps.attention(q, k, v, norm, enable_gqa=True, return_stats=True, backend=backend, form=form,
                                  **kw)
    loss = (out.double() * dout).sum() + sum((st[n].double() * g).sum() for n, g in gst.items())
    got = torch.autograd.grad(loss, (q, k, v))

    r = [x.detach().double().cpu().requires_grad_() for x in (q, k, v)]
    ref = reference.attention(*r, norm, enable_gqa=True, noise_seed=noise, **kw)
    rst = ref_stats(r[0], r[1], norm, noise_seed=noise, **kw)
    ref_loss = (ref * dout).sum() + sum((rst[n] * g).sum() for n, g in gst.items())
    want = torch.autograd.grad(ref_loss, r)
    for name, a, b in zip("qkv", got, want):
        assert grad_err(a, b) < _tol(backend), f"d{name}"


@pytest.mark.parametrize("case", ["softmax-native", "softmax-sinks", "taylor:4-stats-only"])
def test_torch_path_gradcheck(case):
    """torch.autograd.gradcheck in float64 of (out, stat) through the torch path: softmax with more than 16 query
    rows (its forward through torch's CPU flash op, the backward through the chunk loop), softmax with attention
    sinks (the sink's gradient through lse too), taylor with a loss on ``z`` alone (no output gradient)."""
    norm, extra = case.split("-", 1)
    shape = (1, 2, 1, 18 if extra == "native" else 3, 5, 3, 2)
    q, k, v = (x.requires_grad_() for x in qkv_for(shape, torch.float64))
    sinks = torch.randn(2, dtype=torch.float64).requires_grad_() if extra == "sinks" else None
    name = flashmaps.parse(norm).stats[0]

    def fn(q, k, v, *sk):
        out, st = flashmaps.attention(q, k, v, norm, causal=True, enable_gqa=True, return_stats=True,
                                      backend="torch", sinks=sk[0] if sk else None)
        return st[name] if extra == "stats-only" else (out, st[name])

    args = (q, k, v) + ((sinks,) if sinks is not None else ())
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("norm", [n for n in NORMS if flashmaps.parse(n).stats])
def test_which_statistics_are_differentiable(norm):
    """The statistics carry gradients exactly for the units with ``stat_delta``; the others' (thresholds)
    are returned non-differentiable."""
    q, k, v = (x.requires_grad_() for x in qkv_for((1, 2, 2, 3, 4, 4, 4), torch.float64))
    pin_seed(norm)
    out, st = flashmaps.attention(q, k, v, norm, return_stats=True, backend="torch")
    assert out.requires_grad
    assert all(x.requires_grad == flashmaps.parse(norm).has_stat_grads for x in st.values())


def test_compiled_custom_op_has_the_stat_gradients():
    """Through the custom ops (torch.compile, fullgraph) the statistics' gradients match the eager call's."""
    q, k, v = qkv_for((1, 2, 2, 5, 7, 4, 4), torch.float64)

    def loss(q, k, v):
        out, st = flashmaps.attention(q, k, v, "taylor", return_stats=True, backend="torch")
        return out.sum() + (st["z"] * st["z"]).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    grads = [torch.autograd.grad(f(*leaves), leaves)
             for f in (compiled, loss) for leaves in [[x.clone().requires_grad_() for x in (q, k, v)]]]
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-12
