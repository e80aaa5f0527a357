"""Issue 17 item 6: the forward's K and V tiles through tensor descriptors (Static.TMA, `tiles.kv_desc`), under
the interpreter: the same results as the pointer loads, bit for bit (the same tiles, zero outside the head's
[S, D], reach the same products), for every normalizer, with the paths that change which tiles are read (ragged
S and D, causal, masks, windows, GQA, split-KV, the two-phase threshold), and the fallback where descriptors
cannot be used. GPU timing pending (off by default: ``triton_path.TMA_KV``)."""

from __future__ import annotations

import pytest
import torch
from helpers import KERNEL_DEVICE, TRITON_NORMS, make_mask, make_qkv, pin_seed

import flashmaps
from flashmaps import triton_path

pytestmark = pytest.mark.skipif(KERNEL_DEVICE != "cpu" and not torch.cuda.is_available(), reason="no kernels")


def _both(monkeypatch, fn):
    """fn() with the pointer loads, then with the descriptors; also records which Static each launch saw."""
    seen = []
    real = triton_path._launch

    def spy(kernel, tuned, config, grid_of, args, meta):
        seen.append(meta["ST"].TMA)
        return real(kernel, tuned, config, grid_of, args, meta)

    monkeypatch.setattr(triton_path, "_launch", spy)
    monkeypatch.setattr(triton_path, "TMA_KV", False)
    plain = fn()
    n_plain = len(seen)
    monkeypatch.setattr(triton_path, "TMA_KV", True)
    tma = fn()
    return plain, tma, seen[:n_plain], seen[n_plain:]


@pytest.mark.parametrize("norm", TRITON_NORMS)
def test_descriptor_loads_equal_pointer_loads(norm, monkeypatch):
    """Ragged S (not a multiple of the tile) and D (24: padded to 32), GQA, causal lower-right: bitwise equal."""
    q, k, v = make_qkv(1, 2, 1, 19, 37, 24, seed=3)

    def fn():
        pin_seed(norm)                                # gumbel: the same noise in both calls
        return flashmaps.attention(q, k, v, norm, causal="lower_right", enable_gqa=True, backend="triton",
                                   return_stats=True)

    (o1, s1), (o2, s2), st_plain, st_tma = _both(monkeypatch, fn)
    assert not any(st_plain) and st_tma and all(st_tma)
    assert torch.equal(o1, o2)
    for name in s1:
        assert torch.equal(s1[name], s2[name]), name


@pytest.mark.parametrize("case", ["mask-window", "split", "threshold"])
def test_descriptor_loads_on_the_other_paths(case, monkeypatch):
    norm = "entmax15" if case == "threshold" else "softmax"
    if case == "split":
        q, k, v = make_qkv(1, 2, 1, 2, 700, 16, seed=4)
        fn = lambda: triton_path.launch_forward(q, k, v, flashmaps.parse(norm), splits=3).out  # noqa: E731
    elif case == "threshold":
        q, k, v = make_qkv(1, 2, 2, 5, 40, 16, seed=5)
        thr = flashmaps.global_threshold(norm, [flashmaps.threshold_candidates(q, k, norm)])
        fn = lambda: flashmaps.attention(q, k, v, norm, threshold=thr, backend="triton")  # noqa: E731
    else:
        q, k, v = make_qkv(2, 2, 2, 21, 33, 16, seed=6)
        mask = make_mask("bool", 2, 2, 21, 33)
        fn = lambda: flashmaps.attention(q, k, v, norm, attn_mask=mask, window=(7, 2),  # noqa: E731
                                         backend="triton")
    plain, tma, st_plain, st_tma = _both(monkeypatch, fn)
    assert st_tma and all(st_tma) and not any(st_plain)
    assert torch.equal(plain, tma)


def test_unaligned_views_fall_back_to_pointer_loads(monkeypatch):
    """A K whose head dim is strided, or whose rows are not 16-byte aligned, keeps the pointer loads."""
    q, k, v = make_qkv(1, 2, 2, 9, 20, 16, seed=7)
    strided = torch.randn(1, 2, 20, 32)[..., ::2]                     # stride 2 along D
    odd = torch.randn(1 * 2 * 20 * 17 + 1)[1:].view(1, 2, 20, 17)[..., :16]   # 17-float rows: 68 bytes
    assert triton_path.tma_ok(k, v)
    assert not triton_path.tma_ok(strided) and not triton_path.tma_ok(odd)
    for kk in (strided, odd):
        plain, tma, _, st_tma = _both(monkeypatch, lambda: flashmaps.attention(q, kk, v, backend="triton"))
        assert not any(st_tma) and torch.equal(plain, tma)


@pytest.mark.cuda
@pytest.mark.parametrize("norm", ["softmax", "entmax15", "topk:64"])
def test_descriptor_loads_on_the_gpu(norm, monkeypatch):
    """On the GPU (TMA, device-side descriptors): bf16 at a real size, causal, ragged S, against the pointer
    loads; the calling thread's allocator is installed only when none is set."""
    from triton.runtime import _allocation

    q, k, v = make_qkv(2, 8, 2, 1000, 1500, 128, dtype=torch.bfloat16, device="cuda", seed=9)
    fn = lambda: flashmaps.attention(q, k, v, norm, causal="lower_right", enable_gqa=True)  # noqa: E731
    plain, tma, _, st_tma = _both(monkeypatch, fn)
    assert all(st_tma) and (plain.float() - tma.float()).abs().max().item() <= 1e-2
    mine = lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda")  # noqa: E731
    token = _allocation._allocator.set(mine)
    try:
        fn()
        assert _allocation._allocator.get() is mine
    finally:
        _allocation._allocator.reset(token)
