"""Gradients through the two-phase protocol of the sparse units (``flashmaps.twophase``): phase 1's candidates,
the union's threshold, phase 2's parts at it and the merge, for real key splits (k_i, v_i slices of the keys). The
merged output's dq and every part's dk_i, dv_i equal float64 autograd of the dense reference over all keys, on the
torch path (float64) and the Triton kernels (fp32, the interpreter on the CPU); gradcheck of the whole pipeline.
Without the threshold's own gradient (the implicit dependence of the union's tau on every key) these fail.
"""

import pytest
import torch
from helpers import KERNEL_DEVICE, grad_err, mask_for, rel_err

import flashmaps
from flashmaps import Entmax, reference, torch_path

#: the grid's units with a two-phase protocol (every one has its gradients)
TWO_PHASE = [n.spec for n in flashmaps.examples() if n.two_phase]
#: (B, Hq, Hkv, L, S, Dqk, Dv)
MHA = (1, 2, 2, 5, 19, 8, 6)
GQA = (2, 4, 2, 4, 21, 8, 4)


def test_every_two_phase_unit_has_gradients():
    assert {"entmax15", "sparsemax"} <= set(TWO_PHASE)
    assert all(flashmaps.parse(n).has_threshold_grads for n in TWO_PHASE)


def _inputs(shape, seed, parts):
    """q, k, v (float64), dout and a random partition of the S keys into ``parts`` non-empty index sets."""
    B, Hq, Hkv, L, S, D, Dv = shape
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, Hq, L, D, generator=g, dtype=torch.float64), torch.randn(B, Hkv, S, D, generator=g,
                                                                                  dtype=torch.float64)
    v, dout = torch.randn(B, Hkv, S, Dv, generator=g, dtype=torch.float64), torch.randn(B, Hq, L, Dv, generator=g,
                                                                                        dtype=torch.float64)
    part = torch.randint(0, parts, (S,), generator=g)
    part[:parts] = torch.arange(parts)
    return q * 1.5, k, v, dout, [torch.nonzero(part == p).squeeze(1) for p in range(parts)]


def _merged(q, k, v, norm, idx, backend, mask=None, **kw):
    """The two-phase protocol over the key parts ``idx`` (each a k[:, :, i], v[:, :, i] slice; ``mask`` (L, S) sliced
    alike) -> the merged (output, statistics)."""
    ks, vs = [k[:, :, i] for i in idx], [v[:, :, i] for i in idx]
    ms = [None if mask is None else mask[:, i].to(q.device) for i in idx]
    thr = flashmaps.global_threshold(norm, [flashmaps.threshold_candidates(q, kp, norm, attn_mask=m, enable_gqa=True,
                                                                           **kw) for kp, m in zip(ks, ms)])
    parts = [flashmaps.attention(q, kp, vp, norm, attn_mask=m, enable_gqa=True, threshold=thr, return_stats=True,
                                 backend=backend, **kw) for kp, vp, m in zip(ks, vs, ms)]
    return flashmaps.merge(norm, [o for o, _ in parts], [s for _, s in parts], threshold=thr)


def _finite(x):
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype))


def _check(norm, backend, shape, seed, parts, tol, *, causal=None, mask_kind="none", softcap=None, stat_loss=False):
    q, k, v, dout, idx = _inputs(shape, seed, parts)
    L, S = shape[3], shape[4]
    mask = mask_for(mask_kind, shape, torch.float64)
    if causal is not None:        # the parts see the full call's causal band through their slice of its mask
        off = 0 if causal == "upper_left" else S - L
        band = torch.arange(S)[None, :] <= torch.arange(L)[:, None] + off
        mask = band if mask is None else torch.where(band, mask, float("-inf"))
    dtype, device = (torch.float64, "cpu") if backend == "torch" else (torch.float32, KERNEL_DEVICE)
    leaves = [x.to(dtype=dtype, device=device).requires_grad_() for x in (q, k, v)]
    out, st = _merged(*leaves, norm, idx, backend, mask=mask, softcap=softcap)
    r = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = reference.attention(*r, norm, attn_mask=mask, softcap=softcap, enable_gqa=True)
    loss, ref_loss = (out.double() * dout.to(out.device)).sum(), (ref * dout).sum()
    if stat_loss:       # the merged statistics too (the union's tau; top-k's lse), against the reference's
        nrm = flashmaps.parse(norm)
        s, allowed = reference.scores_and_allowed(*r[:2], attn_mask=mask, softcap=softcap, enable_gqa=True,
                                                  normalizer=nrm)
        g = torch.Generator().manual_seed(seed + 100)
        for name, want in nrm.reference_stats(s, allowed).items():
            w = torch.randn(want.shape, generator=g, dtype=torch.float64)
            loss = loss + (_finite(st[name].double().cpu()) * w).sum()
            ref_loss = ref_loss + (_finite(want) * w).sum()
    got = torch.autograd.grad(loss, leaves)
    want = torch.autograd.grad(ref_loss, r)
    assert rel_err(out, ref) < tol
    for name, a, b in zip("qkv", got, want):
        assert grad_err(a, b) < tol, (f"d{name}", grad_err(a, b))


@pytest.mark.parametrize("case", ["gqa-lower_right-3parts", "upper_left-softcap-floatmask-2parts"])
@pytest.mark.parametrize("norm", TWO_PHASE)
def test_merged_gradients_equal_the_full_call_torch(norm, case, monkeypatch):
    """Torch path, float64: GQA with lower-right causal over 3 parts (Dqk != Dv; a loss on the merged statistics
    too), and upper-left causal with a softcap and a float mask with an empty row over 2 parts, in chunks of one
    row (phase 1's and phase 2's backward index the chunks' rows): to 1e-10."""
    if case.startswith("gqa"):
        _check(norm, "torch", GQA, 1, 3, 1e-10, causal="lower_right", stat_loss=True)
    else:
        monkeypatch.setattr(torch_path, "CHUNK_ELEMS", 20)
        _check(norm, "torch", MHA, 2, 2, 1e-10, causal="upper_left", mask_kind="float-inf-min-emptyrow", softcap=4.0)


@pytest.mark.parametrize("case", ["lower_right-2parts", "gqa-3parts"])
@pytest.mark.parametrize("norm", TWO_PHASE)
def test_merged_gradients_equal_the_full_call_triton(norm, case):
    """The Triton kernels (fp32; the interpreter on the CPU): lower-right causal over 2 parts, GQA over 3."""
    if case.startswith("gqa"):
        _check(norm, "triton", GQA, 3, 3, 2e-4)
    else:
        _check(norm, "triton", MHA, 4, 2, 2e-4, causal="lower_right")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_per_head_alpha_gradients(backend):
    """A per-head alpha (tau in x = (alpha_h - 1) s units per head, the slope a per head in every hook)."""
    norm = Entmax(alpha=torch.tensor([1.3, 1.8]))
    tol = 1e-10 if backend == "torch" else 2e-4
    _check(norm, backend, MHA, 5, 3, tol)


@pytest.mark.parametrize("norm", ["entmax15", "sparsemax"])
def test_gradcheck_of_the_pipeline(norm):
    """torch.autograd.gradcheck in float64 of (q, k_1, k_2, v_1, v_2) -> merged output (L = 3, S = 7 = 3 + 4)."""
    q, k, v, _, _ = _inputs((1, 2, 1, 3, 7, 4, 3), 6, 2)

    def fn(q, k1, k2, v1, v2):
        ks, vs = [k1, k2], [v1, v2]
        thr = flashmaps.global_threshold(norm, [flashmaps.threshold_candidates(q, kp, norm, enable_gqa=True)
                                                for kp in ks])
        parts = [flashmaps.attention(q, kp, vp, norm, enable_gqa=True, threshold=thr, return_stats=True,
                                     backend="torch") for kp, vp in zip(ks, vs)]
        return flashmaps.merge(norm, [o for o, _ in parts], [s for _, s in parts], threshold=thr)[0]

    args = [x.requires_grad_() for x in (q, k[:, :, :3].clone(), k[:, :, 3:].clone(), v[:, :, :3].clone(),
                                         v[:, :, 3:].clone())]
    assert torch.autograd.gradcheck(fn, args)
