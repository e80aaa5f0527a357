"""Sliding windows, packed variable-length sequences and the KV-cache call (flashmaps.window, flashmaps.inference).

Windows are checked against the same band written as a bool mask (built here from the formula, through the
dense float64 reference), varlen against each sequence run separately, the KV cache against the contiguous
call; every normalizer of the grid on the torch path, the Triton kernels under the interpreter."""

from __future__ import annotations

import math

import pytest
import torch

import flashmaps
import flashmaps.torch_path as TP
from flashmaps import reference
from flashmaps.triton_path import INTERPRET_CONFIG

from helpers import (DEEP, GRID_TORCH_SEED, KERNEL_DEVICE, SPARSE_NORMS, TRITON_NORMS, grad_err, norm_params, pin_seed,
                     qkv_for, rel_err)


def band_mask(L, S, left, right, causal):
    """Bool (L, S): key j allowed for row i when i + off - left <= j <= i + off + right (the issue's formula)."""
    off = 0 if causal == "upper_left" else S - L
    if causal is not None:
        right = 0 if right < 0 else min(right, 0)
    i = torch.arange(L)[:, None]
    j = torch.arange(S)[None, :]
    ok = torch.ones(L, S, dtype=torch.bool)
    if right >= 0:
        ok &= j <= i + off + right
    if left >= 0:
        ok &= j >= i + off - left
    return ok


def _ref(q, k, v, norm, mask, noise_seed=0):
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    out = reference.attention(q64, k64, v64, norm, attn_mask=mask, enable_gqa=True, noise_seed=noise_seed)
    return out, (q64, k64, v64)


def call_seeds(norm, n: int) -> list[int]:
    """The noise seeds n public calls of a stochastic normalizer will draw after ``torch.manual_seed`` (pinned
    here), else zeros (see helpers.pin_seed)."""
    if not flashmaps.parse(norm).stochastic:
        return [0] * n
    torch.manual_seed(GRID_TORCH_SEED)
    seeds = [TP.draw_seed() for _ in range(n)]
    torch.manual_seed(GRID_TORCH_SEED)
    return seeds


def _check_window(norm, backend, shape, window, causal, dtype, tol_out, tol_grad):
    B, Hq, Hkv, L, S, D, Dv = shape
    q, k, v = (x.requires_grad_() for x in qkv_for(shape, dtype, seed=L + S, device=KERNEL_DEVICE if backend == "triton" else "cpu"))
    noise_seed = pin_seed(norm)
    out = flashmaps.attention(q, k, v, norm, causal=causal or False, window=window, enable_gqa=True, backend=backend)
    ref, leaves = _ref(q, k, v, norm, band_mask(L, S, *window, causal), noise_seed)
    assert rel_err(out, ref) < tol_out
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype).to(out.device))
    want = torch.autograd.grad(ref, leaves, dout)
    for g, w, name in zip(got, want, "qkv"):
        assert grad_err(g, w) < tol_grad, name


WINDOWS = [(5, 2), (0, 0), (17, -1), (-1, 3), (33, 33)]
CAUSALS = [None, "upper_left", "lower_right"]
SHAPES = [(1, 4, 2, 40, 40, 16, 16), (2, 2, 1, 21, 70, 16, 8), (1, 2, 2, 70, 20, 8, 16)]


@pytest.mark.parametrize("norm", norm_params())
@pytest.mark.parametrize("causal", CAUSALS, ids=str)
def test_window_equals_band_mask_torch(norm, causal, monkeypatch):
    monkeypatch.setattr(TP, "CHUNK_ELEMS", 300)                   # many row chunks, each reading its band only
    for i, window in enumerate(WINDOWS):
        for shape in (SHAPES[i % 3], SHAPES[(i + 1) % 3]):
            _check_window(norm, "torch", shape, window, causal, torch.float64, 1e-10, 1e-8)


@pytest.mark.parametrize("norm", norm_params(TRITON_NORMS))
def test_window_equals_band_mask_triton(norm):
    for shape, window, causal in [(SHAPES[1], (17, -1), "lower_right"), (SHAPES[2], (5, 2), "upper_left")]:
        _check_window(norm, "triton", shape, window, causal, torch.float32, 2e-5, 2e-4)


@pytest.mark.parametrize("norm", norm_params(DEEP))
@pytest.mark.parametrize("causal", CAUSALS, ids=str)
def test_window_triton_sweep(norm, causal):
    """The dense unit meets every (window, causal) pair; the sparse one (its pre-pass makes it about 2.5x
    dearer under the interpreter) a rotation: each window once over the three causal kinds."""
    cases = [(SHAPES[0], (5, 2)), (SHAPES[0], (0, 0)), (SHAPES[0], (-1, 3)), (SHAPES[1], (17, -1)),
             (SHAPES[2], (33, 33))]
    if flashmaps.parse(norm).sparse:
        cases = cases[CAUSALS.index(causal)::len(CAUSALS)]
    for shape, window in cases:
        _check_window(norm, "triton", shape, window, causal, torch.float32, 2e-5, 2e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("norm", ["softmax", "entmax15"])
def test_window_never_reads_tiles_outside_the_band(backend, norm):
    """Keys in whole tiles outside every row's band hold NaN values: a tile that were read and masked would
    put 0 * NaN = NaN into the output. Skipped, they leave it finite."""
    L = S = 96
    left = 8
    bn = INTERPRET_CONFIG["BN"]
    q, k, v = qkv_for((1, 2, 2, L, S, 16, 16), torch.float32, device=KERNEL_DEVICE if backend == "triton" else "cpu")
    # rows [64, 96) see keys >= 64 - 8 = 56: keys of the tiles below 48 are outside every band of those rows
    v = v.clone()
    v[:, :, : 48 - bn] = float("nan")
    q = q[:, :, 64:]
    out = flashmaps.attention(q, k, v, norm, causal="lower_right", window=(left, 0), backend=backend)
    assert torch.isfinite(out).all()
    ref, _ = _ref(q, k, torch.nan_to_num(v), norm, band_mask(32, S, left, 0, "lower_right"))
    assert rel_err(out, ref) < 2e-5


def test_window_errors():
    q, k, v = qkv_for((1, 1, 1, 4, 4, 16, 16), torch.float32)
    for bad, exc in [((1,), TypeError), ([1, 2, 3], TypeError), ((-2, 0), ValueError), ((1.5, 0), TypeError),
                     ((True, 0), TypeError), ("10", TypeError)]:
        with pytest.raises(exc, match="window"):
            flashmaps.attention(q, k, v, window=bad)
    with pytest.raises(ValueError, match="window"):
        flashmaps.attention(q, k, v, "taylor", window=(2, 0), form="linear")
    # (-1, -1) is no window at all; causal with (-1, 0) is plain causal
    torch.testing.assert_close(flashmaps.attention(q, k, v, window=(-1, -1)), flashmaps.attention(q, k, v))
    torch.testing.assert_close(flashmaps.attention(q, k, v, causal=True, window=(-1, 0)),
                               flashmaps.attention(q, k, v, causal=True))


# ----------------------------------------------------------------------------------------------------
# varlen


def _packed(lens_q, lens_k, Hq, Hkv, D, Dv, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), Hq, D, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    k = torch.randn(sum(lens_k), Hkv, D, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    v = torch.randn(sum(lens_k), Hkv, Dv, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    cq = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=device)
    ck = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cq, ck


def _separate(q, k, v, cq, ck, norm, seeds, **kw):
    outs, seeds = [], iter(seeds)
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]].transpose(0, 1)[None]
        kb, vb = (x[ck[b]:ck[b + 1]].transpose(0, 1)[None] for x in (k, v))
        seed = next(seeds) if qb.shape[2] and kb.shape[2] else 0
        outs.append(reference.attention(qb.double(), kb.double(), vb.double(), norm, enable_gqa=True, noise_seed=seed,
                                        **kw)[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("norm", norm_params())
@pytest.mark.parametrize("causal", [False, "lower_right"], ids=str)
def test_varlen_equals_each_sequence(norm, causal):
    lens_q, lens_k = [5, 1, 0, 19, 7], [5, 9, 3, 19, 30]
    q, k, v, cq, ck = _packed(lens_q, lens_k, 4, 2, 8, 16, torch.float64, "cpu")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    seeds = call_seeds(norm, sum(1 for a, b in zip(lens_q, lens_k) if a and b))   # empty sequences draw none
    out, st = flashmaps.attention_varlen(q, k, v, cq, ck, 19, 30, norm, causal=causal, backend="torch",
                                         return_stats=True)
    assert out.shape == (sum(lens_q), 4, 16) and all(x.shape == (4, sum(lens_q)) for x in st.values())
    qr, kr, vr = (x.detach().clone().requires_grad_() for x in (q, k, v))
    ref = _separate(qr, kr, vr, cq.tolist(), ck.tolist(), norm, seeds, causal=causal)
    assert rel_err(out, ref) < 1e-10
    dout = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (qr, kr, vr), dout)):
        assert grad_err(g, w) < 1e-8


@pytest.mark.parametrize("norm", norm_params(DEEP))
def test_varlen_triton(norm):
    lens_q, lens_k = [3, 17, 8], [20, 17, 1]
    q, k, v, cq, ck = _packed(lens_q, lens_k, 2, 1, 16, 16, torch.float32, KERNEL_DEVICE)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = flashmaps.attention_varlen(q, k, v, cq, ck, 17, 20, norm, causal="lower_right", window=(4, 0),
                                     backend="triton")
    qr, kr, vr = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    outs = []
    for b, (a0, a1, b0, b1) in enumerate(zip(cq.tolist(), cq.tolist()[1:], ck.tolist(), ck.tolist()[1:])):
        m = band_mask(a1 - a0, b1 - b0, 4, 0, "lower_right")
        outs.append(reference.attention(qr[a0:a1].transpose(0, 1)[None], kr[b0:b1].transpose(0, 1)[None],
                                        vr[b0:b1].transpose(0, 1)[None], norm, attn_mask=m,
                                        enable_gqa=True)[0].transpose(0, 1))
    ref = torch.cat(outs)
    assert rel_err(out, ref) < 2e-5
    dout = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), dout.float().to(out.device))
    for g, w in zip(got, torch.autograd.grad(ref, (qr, kr, vr), dout)):
        assert grad_err(g, w) < 2e-4


def test_varlen_errors():
    q, k, v, cq, ck = _packed([3, 4], [3, 4], 2, 2, 8, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        flashmaps.attention_varlen(q, k, v, torch.tensor([0, 3, 6], dtype=torch.int32), ck, 4, 4)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        flashmaps.attention_varlen(q, k, v, cq, torch.tensor([0, 5, 3], dtype=torch.int32), 4, 4)
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        flashmaps.attention_varlen(q, k, v, [0, 3, 7], ck, 4, 4)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        flashmaps.attention_varlen(q, k, v, cq, ck, 3, 4)
    with pytest.raises(ValueError, match="sequences"):
        flashmaps.attention_varlen(q, k, v, cq, torch.tensor([0, 7], dtype=torch.int32), 4, 7)
    with pytest.raises(ValueError, match="total, heads"):
        flashmaps.attention_varlen(q[None], k, v, cq, ck, 4, 4)


# ----------------------------------------------------------------------------------------------------
# KV cache


def _cache_case(B=3, S_max=48, Hq=4, Hkv=2, D=16, Dv=16, L=2, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(B, S_max, Hkv, D, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    vc = torch.randn(B, S_max, Hkv, Dv, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    q = torch.randn(B, L, Hq, D, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    kn = torch.randn(B, L, Hkv, D, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    vn = torch.randn(B, L, Hkv, Dv, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    return q, kc, vc, kn, vn


def _page(cache, block_size, perm):
    """A paged copy of a (B, S_max, H, D) cache: blocks shuffled by ``perm``, and the table that finds them."""
    B, S_max = cache.shape[:2]
    nb = S_max // block_size
    blocks = cache.reshape(B * nb, block_size, *cache.shape[2:])
    paged = torch.empty_like(blocks)
    paged[perm] = blocks
    return paged, perm.view(B, nb).to(torch.int32)


@pytest.mark.parametrize("norm", norm_params())
def test_kvcache_equals_each_sequence_and_paged(norm):
    q, kc, vc, kn, vn = _cache_case()
    lens = torch.tensor([0, 17, 40], dtype=torch.int32)
    kc0, vc0 = kc.clone(), vc.clone()
    noise_seed = pin_seed(norm)
    out = flashmaps.attention_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, normalizer=norm, causal=True,
                                           backend="torch")
    # the append happened in place, nowhere else
    for b, n in enumerate(lens.tolist()):
        torch.testing.assert_close(kc[b, n:n + 2], kn[b])
        torch.testing.assert_close(kc[b, :n], kc0[b, :n])
        torch.testing.assert_close(kc[b, n + 2:], kc0[b, n + 2:])
    # each sequence b sees its first n_b keys, lower-right causal on n_b (one batched reference: the noise of a
    # stochastic normalizer is keyed by the batch index)
    allowed = torch.zeros(3, 1, 2, 48, dtype=torch.bool)
    for b, n in enumerate((lens + 2).tolist()):
        allowed[b, 0, :, :n] = band_mask(2, n, -1, 0, "lower_right")
    ref = reference.attention(q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), norm, attn_mask=allowed,
                              enable_gqa=True, noise_seed=noise_seed)
    assert rel_err(out.transpose(1, 2), ref) < 1e-10
    # the same through a shuffled paged cache (appending into the blocks)
    perm = torch.randperm(3 * 6, generator=torch.Generator().manual_seed(1))
    kp, table = _page(kc0, 8, perm)
    vp, _ = _page(vc0, 8, perm)
    pin_seed(norm)
    out_p = flashmaps.attention_with_kvcache(q, kp, vp, kn, vn, cache_seqlens=lens, block_table=table,
                                             normalizer=norm, causal=True, backend="torch")
    torch.testing.assert_close(out_p, out, rtol=0, atol=1e-12)
    torch.testing.assert_close(kp[table.long()].flatten(1, 2), kc)


@pytest.mark.parametrize("norm", norm_params(TRITON_NORMS))
def test_kvcache_decode_triton(norm):
    """Decode shapes (L = 1 and 4) over up to 75 keys (5 interpreter tiles), GQA, lower-right causal, a window,
    paged (the thousands of keys: the split-KV tests below)."""
    for L, window in [(1, None), (4, (30, 0))]:
        q, kc, vc, _, _ = _cache_case(B=2, S_max=80, L=L, dtype=torch.float32, device=KERNEL_DEVICE, seed=L)
        lens = torch.tensor([75, 37], dtype=torch.int32)
        perm = torch.randperm(2 * 5, generator=torch.Generator().manual_seed(2))
        kp, table = _page(kc, 16, perm)
        vp, _ = _page(vc, 16, perm)
        noise_seed = pin_seed(norm)
        out = flashmaps.attention_with_kvcache(q, kp, vp, cache_seqlens=lens, block_table=table.to(kp.device),
                                               normalizer=norm, causal=True, window=window, backend="triton")
        allowed = torch.zeros(2, 1, L, 80, dtype=torch.bool)
        for b, n in enumerate(lens.tolist()):
            allowed[b, 0, :, :n] = band_mask(L, n, *(window or (-1, -1)), "lower_right")
        ref, _ = _ref(q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), norm, allowed, noise_seed)
        assert rel_err(out.transpose(1, 2), ref) < 2e-5


def test_kvcache_errors():
    q, kc, vc, kn, vn = _cache_case(B=2, S_max=8)
    with pytest.raises(ValueError, match="no room"):
        flashmaps.attention_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=7)
    with pytest.raises(ValueError, match="cache_seqlens"):
        flashmaps.attention_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([1, 9]))
    with pytest.raises(ValueError, match="both k and v"):
        flashmaps.attention_with_kvcache(q, kc, vc, kn)
    with pytest.raises(TypeError, match="block_table"):
        flashmaps.attention_with_kvcache(q, kc, vc, block_table=torch.zeros(3, 1))
    with pytest.raises(ValueError, match="block indices"):
        flashmaps.attention_with_kvcache(q, kc, vc, block_table=torch.full((2, 1), 5, dtype=torch.int32))
    with pytest.raises(TypeError, match="causal"):
        flashmaps.attention_with_kvcache(q, kc, vc, causal="upper_left")
    kc0 = kc.clone()
    with pytest.raises(ValueError):
        flashmaps.attention_with_kvcache(q, kc, vc, kn[:, :1], vn, cache_seqlens=0)
    torch.testing.assert_close(kc, kc0)                  # a refused call writes nothing


# ----------------------------------------------------------------------------------------------------
# split-KV decoding


def test_split_plan():
    from flashmaps.triton_path import SPLIT_KEY_BLOCK, split_plan

    assert split_plan(1, 32, 1, 65536, 132) == 9           # 32 programs -> about 2 per SM
    assert split_plan(2, 32, 1, 65536, 132) == 5
    assert split_plan(8, 32, 1, 65536, 132) == 1           # 256 programs: about 2 per SM already
    assert split_plan(1, 4, 1, 1100, 132) == 1100 // SPLIT_KEY_BLOCK   # at least SPLIT_KEY_BLOCK keys a split
    assert split_plan(1, 32, 64, 65536, 132) == 1          # prefill: enough query blocks
    assert split_plan(1, 32, 1, 300, 132) == 1             # short cache
    assert split_plan(16, 32, 1, 65536, 132) == 1          # 512 programs already fill the SMs
    assert split_plan(1, 1, 1, 10**7, 132) == 64           # capped


def _decode_case(norm, L, S, causal, window, splits, grad):
    from flashmaps import triton_path

    q, k, v = qkv_for((1, 4, 2, L, S, 16, 16), torch.float32, seed=S + L, device=KERNEL_DEVICE)
    norm = flashmaps.parse(norm)
    res = triton_path.launch_forward(q, k, v, norm, causal=flashmaps.window.encode(causal, window), splits=splits)
    m = band_mask(L, S, *(window or (-1, -1)), causal)
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    ref = reference.attention(q64, k64, v64, norm, attn_mask=m, enable_gqa=True)
    assert rel_err(res.out, ref) < 2e-5
    want = reference.scores_and_allowed(q64, k64, attn_mask=m, enable_gqa=True, normalizer=norm)
    for name, st in res.stats.items():
        ref_st = norm.reference_stats(*want)[name]
        fin = torch.isfinite(ref_st)
        assert torch.equal(fin, torch.isfinite(st.cpu()))
        assert rel_err(st.cpu()[fin], ref_st[fin]) < 2e-5
    if grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        out = flashmaps.attention(q, k, v, norm, causal=causal, window=window, enable_gqa=True, backend="triton")
        dout = torch.randn(out.shape, dtype=torch.float64)
        got = torch.autograd.grad(out, (q, k, v), dout.float().to(out.device))
        for g, w in zip(got, torch.autograd.grad(ref, (q64, k64, v64), dout)):
            assert grad_err(g, w) < 2e-4


@pytest.mark.parametrize("norm", norm_params(TRITON_NORMS))
def test_split_kv_decode_triton(norm, monkeypatch):
    """Decode shapes through the automatic plan: normalizers with a merge rule, or the sparse units' two-phase
    protocol, run split (checked); both against the float64 reference."""
    from flashmaps import triton_path

    n = flashmaps.parse(norm)
    can = triton_path._can_split(n, n.triton(600)[0])
    assert (triton_path.split_plan(1, 4, 3, 600, triton_path.DEFAULT_SM_COUNT) > 1)
    calls = []
    real = triton_path._launch_split
    monkeypatch.setattr(triton_path, "_launch_split", lambda *a, **kw: calls.append(a[5]) or real(*a, **kw))
    _decode_case(norm, 3, 600, "lower_right", None, None, False)
    assert bool(calls) == can and all(c > 1 for c in calls)


@pytest.mark.parametrize("norm", ["softmax", "taylor"])
def test_split_kv_decode_sweep(norm):
    for L, S, causal, window, splits in [(1, 2100, None, None, 7), (16, 1000, "lower_right", (300, 0), 3),
                                         (5, 700, "lower_right", None, 2)]:
        _decode_case(norm, L, S, causal, window, splits, grad=(L == 5))
    with pytest.raises(ValueError, match="splits"):
        from flashmaps import triton_path

        q, k, v = qkv_for((1, 1, 1, 1, 600, 16, 16), torch.float32, device=KERNEL_DEVICE)
        # a threshold unit splits through the two-phase protocol, forward only: not with the backward's extras
        triton_path.launch_forward(q, k, v, flashmaps.parse("entmax15"), splits=2, save_extras=True)


@pytest.mark.parametrize("norm", norm_params([n for n in SPARSE_NORMS if flashmaps.parse(n).two_phase]))
def test_split_kv_two_phase(norm):
    """Split-KV of the sparse units (the two-phase protocol: the union's threshold, then the splits at it):
    explicit splits with a window and GQA, against the float64 reference; the parts' masses sum to one (a
    column of ones in v comes out as ones: the entmax family does not renormalize the merged output)."""
    from flashmaps import triton_path

    _decode_case(norm, 16, 1000, "lower_right", (300, 0), 3, grad=False)
    q, k, v = qkv_for((1, 4, 2, 2, 700, 16, 16), torch.float32, seed=5, device=KERNEL_DEVICE)
    ones = torch.ones_like(v[..., :1])
    res = triton_path.launch_forward(q, k, ones, flashmaps.parse(norm), splits=3)
    assert (res.out - 1).abs().max().item() < 2e-6
