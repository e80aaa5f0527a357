"""Limits a GPU would hit, tested under the interpreter at the boundary: B * H past grid axis 1's 65535
programs (the head index spans grid axes 1 and 2), and taylor in fp16 past f(s) = 65504."""

import pytest
import torch
from helpers import KERNEL_DEVICE, grads, make_qkv, rel_err

import flashmaps
from flashmaps.kernels import tiles


def test_head_grid_splits_past_the_axis_limit():
    assert tiles.head_grid(1) == (1, 1)
    assert tiles.head_grid(65535) == (65535, 1)
    g1, g2 = tiles.head_grid(2048 * 32)                     # decode at B = 2048, H = 32
    assert g1 <= 65535 and g2 <= 65535 and g1 * g2 >= 2048 * 32 and g1 * g2 - 2048 * 32 < g2
    g1, g2 = tiles.head_grid(2**31 - 1)
    assert g1 <= 65535 and g2 <= 65535 and g1 * g2 >= 2**31 - 1


@pytest.mark.parametrize("norm", ["softmax", "entmax15"])
def test_heads_spread_over_two_grid_axes(norm, monkeypatch):
    """With the axis limit lowered to 4, B * Hq = 10 heads run on a (blocks, 4, 3) grid (two programs redo
    the last head) and B * Hkv = 5 on (blocks, 3, 2): forward and backward equal the one-axis launch."""
    shape = (2, 5, 5, 19, 23, 16, 16)
    q, k, v = make_qkv(*shape, seed=3)
    dout = torch.randn(q.shape[:3] + (16,), generator=torch.Generator().manual_seed(4)).to(q.device)

    def fn(q_, k_, v_):
        return flashmaps.attention(q_, k_, v_, norm, causal="upper_left", backend="triton")

    ref = grads(fn, q, k, v, dout)
    monkeypatch.setattr(tiles, "GRID_YZ", 4)
    assert tiles.head_grid(10) == (4, 3) and tiles.head_grid(5) == (3, 2)
    for a, b in zip(grads(fn, q, k, v, dout), ref):
        assert torch.equal(a, b)


def test_taylor_fp16_past_65504():
    """f(s) ~ s^2 / 2 passes fp16's 65504 at |s| ~ 362: the kernels feed f(s) 2^-10 to the fp16 tensor cores,
    so scores up to the unit's score_limit (~11585) give the float32 torch path's result."""
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(1, 2, 16, 16, generator=g) * 40).half().to(KERNEL_DEVICE)     # |s| up to ~2000
    k = (torch.randn(1, 2, 16, 16, generator=g) * 40).half().to(KERNEL_DEVICE)
    v = torch.randn(1, 2, 16, 16, generator=g).half().to(KERNEL_DEVICE)
    s_max = ((q.float() @ k.float().transpose(-1, -2)) / 4).abs().max().item()
    assert 400 < s_max < flashmaps.parse("taylor").score_limit(torch.float16)
    out, st = flashmaps.attention(q, k, v, "taylor", backend="triton", return_stats=True)
    ref, ref_st = flashmaps.attention(q.float(), k.float(), v.float(), "taylor", backend="torch", return_stats=True)
    assert torch.isfinite(out).all() and torch.isfinite(st["z"]).all()
    assert rel_err(out.float(), ref) < 2e-2 and rel_err(st["z"], ref_st["z"]) < 2e-2


def test_mask_key_offsets_past_int32():
    """A bool mask whose key stride puts key j at byte j * 2^28: keys 8 and up lie past 2^31, where an int32
    offset would wrap. The kernels compute the offset in int64 and see the same mask as a compact copy.
    (4 GiB of address space, a few pages touched.)"""
    L, S, sn = 4, 16, 2**28
    storage = torch.empty((S - 1) * sn + L, dtype=torch.bool, device=KERNEL_DEVICE)
    mask = storage.as_strided((1, 1, L, S), (0, 0, 1, sn))
    pattern = torch.rand(L, S, generator=torch.Generator().manual_seed(5)) < 0.6
    pattern[:, 0] = True
    mask.copy_(pattern.view(1, 1, L, S).to(KERNEL_DEVICE))
    q, k, v = make_qkv(1, 2, 2, L, S, 16, seed=6)
    out = flashmaps.attention(q, k, v, "softmax", attn_mask=mask, backend="triton")
    ref = flashmaps.attention(q, k, v, "softmax", attn_mask=mask.contiguous(), backend="triton")
    assert torch.equal(out, ref)
