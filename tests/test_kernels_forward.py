"""The Triton forward kernel (kernels/tile_loop.py + the normalizer hooks) against the float64 reference.

On CPU the kernels run under TRITON_INTERPRET=1 (conftest) with 16x16 blocks, so the small shapes
here still span several query blocks and key tiles (full, diagonal and ragged ones). Tests marked
``cuda`` run only on a GPU, at realistic sizes, with the real compiler (and autotuning).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import triton
import triton.language as tl
from helpers import (CAUSALS, DEEP, DTYPE_NAMES, KERNEL_DEVICE, SPARSE_NORMS, TRITON_DEFAULTS, TRITON_NORMS, pin_seed,
                     check_stats, make_mask, make_qkv, ref_stats, rel_err)

import flashmaps
from flashmaps import reference
from flashmaps.kernels import topk as topk_kernels
from flashmaps.kernels.threshold import RootConsts
from flashmaps.kernels.tiles import key_bounds, query_bounds
from flashmaps.normalizers import Entmax15, TopK

triton_path = pytest.importorskip("flashmaps.triton_path")

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
NORMS = TRITON_NORMS
# Triton's interpreter indexes ranges with 1-element numpy arrays (its own deprecation warning), and numpy
# warns about the intended inf arithmetic of masked scores (-inf bias, finfo.min * log2(e) overflowing)
pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]


# ----------------------------------------------------------------------------------------------------
# helpers


def run_case(q, k, v, norm, *, causal=None, mask=None, scale=None, softcap=None, tol=None, stats_tol=None,
             config=None):
    norm = flashmaps.parse(norm)
    res = triton_path.launch_forward(q, k, v, norm, mask=None if mask is None else mask.expand(
        q.shape[0], q.shape[1], q.shape[2], k.shape[2]), causal=causal, scale=scale, softcap=softcap,
        config=config)
    gqa = q.shape[1] != k.shape[1]
    ref = reference.attention(q, k, v, norm, causal=causal or False, attn_mask=mask, scale=scale,
                              softcap=softcap, enable_gqa=gqa)
    tol = TOL[q.dtype] if tol is None else tol
    assert res.out.dtype == v.dtype and res.out.shape == ref.shape
    err = rel_err(res.out, ref)
    assert err < tol, f"rel err {err:.3g} >= {tol}"
    if stats_tol is not None:
        check_stats(res.stats, ref_stats(q, k, norm, causal=causal, mask=mask, scale=scale, softcap=softcap),
                    stats_tol)
    return res, ref


# ----------------------------------------------------------------------------------------------------
# the grid: every normalizer x mask kind x causal kind; GQA x dtype balanced over them (fp16 on a slice)


def _grid():
    """normalizer x mask x causal in full; (GQA, dtype) balanced: the cell (mask m, causal c) takes the two of the
    four (GQA, dtype) pairs numbered 3m + c and 3m + c + 2 (mod 4). So every (normalizer, mask) and every
    (normalizer, causal) meets all four pairs, at half the cost of the full product."""
    cases = []
    pairs = [(gqa, dtype) for gqa in (False, True) for dtype in (torch.float32, torch.bfloat16)]
    for norm in NORMS:
        for mi, mask in enumerate(("none", "bool", "float", "empty_rows")):
            for ci, causal in enumerate(CAUSALS):
                for gqa, dtype in (pairs[(3 * mi + ci) % 4], pairs[(3 * mi + ci + 2) % 4]):
                    cases.append(pytest.param(norm, mask, causal, gqa, dtype, id=(
                        f"{norm}-{mask}-{causal or 'full'}-{'gqa' if gqa else 'mha'}-{DTYPE_NAMES[dtype]}")))
                # fp16: one GQA case per (normalizer, mask, causal) triple would triple the cost; one per mask
                if causal == "lower_right":
                    cases.append(pytest.param(norm, mask, causal, True, torch.float16,
                                              id=f"{norm}-{mask}-{causal}-gqa-fp16"))
    return cases


@pytest.mark.parametrize("norm,mask_kind,causal,gqa,dtype", _grid())
def test_grid(norm, mask_kind, causal, gqa, dtype):
    B, Hq, Hkv, L, S, D = 1, 2, (1 if gqa else 2), 33, 45, 24
    q, k, v = make_qkv(B, Hq, Hkv, L, S, D, Dv=20, dtype=dtype, seed=NORMS.index(norm) * 10 + len(mask_kind))
    mask = make_mask(mask_kind, B, Hq, L, S, dtype)
    stats_tol = 2e-5 if dtype == torch.float32 else None
    res, ref = run_case(q, k, v, norm, causal=causal, mask=mask, stats_tol=stats_tol)
    # rows with no allowed key: exactly 0
    _, allowed = reference.scores_and_allowed(q, k, causal=causal or False, attn_mask=mask, enable_gqa=gqa)
    empty = ~allowed.any(-1)
    if mask_kind == "empty_rows":
        assert empty.any()
    assert torch.equal(res.out[empty].float().cpu(), torch.zeros_like(res.out[empty].float().cpu()))


# ----------------------------------------------------------------------------------------------------
# shapes: head dims (padded, Dqk != Dv), L = 1, ragged sizes, block sizes


@pytest.mark.parametrize("norm", DEEP)
@pytest.mark.parametrize("D,Dv", [(16, 64), (40, 40), (72, 24), (80, 80), (96, 160), (160, 96), (256, 16)],
                         ids=lambda x: str(x))
def test_head_dims(norm, D, Dv):
    q, k, v = make_qkv(1, 2, 1, 19, 37, D, Dv=Dv, seed=D + Dv)
    run_case(q, k, v, norm, causal="lower_right", stats_tol=2e-5)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("causal", CAUSALS)
@pytest.mark.parametrize("S", [1, 7, 40])
def test_single_query(norm, causal, S):
    """L = 1 (decoding): upper_left sees key 0 only, lower_right sees every key."""
    q, k, v = make_qkv(2, 4, 2, 1, S, 32, seed=S)
    run_case(q, k, v, norm, causal=causal, stats_tol=2e-5)


@pytest.mark.parametrize("norm", NORMS)
def test_lower_right_more_queries_than_keys(norm):
    """L > S with lower_right: the first L - S rows have no key and output 0."""
    q, k, v = make_qkv(1, 2, 2, 41, 18, 16, seed=3)
    res, _ = run_case(q, k, v, norm, causal="lower_right", stats_tol=2e-5)
    assert torch.equal(res.out[:, :, : 41 - 18], torch.zeros_like(res.out[:, :, : 41 - 18]))


@pytest.mark.parametrize("bm,bn", [(16, 32), (32, 16), (64, 64)])
def test_block_shapes(bm, bn):
    q, k, v = make_qkv(1, 2, 2, 50, 70, 32, seed=bm + bn)
    for norm in DEEP:
        run_case(q, k, v, norm, causal="upper_left", config={"BM": bm, "BN": bn}, stats_tol=2e-5)


@pytest.mark.parametrize("norm", NORMS)
def test_strided_inputs(norm):
    """Non-contiguous q/k/v (BLHD transposes, a stepped head dim, a slice of a larger tensor), and a
    broadcast mask with zero strides: results equal the contiguous ones, inputs are untouched."""
    B, H, L, S, D = 2, 2, 21, 34, 16
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, L, H, D, generator=g).transpose(1, 2)                 # (B, H, L, D), stride_l = H*D
    k = torch.randn(B, H, S, 2 * D, generator=g)[..., ::2]                  # stride_d = 2
    v = torch.randn(B, S + 5, H, 3 * D, generator=g)[:, 3:S + 3, :, D:2 * D].transpose(1, 2)
    mask = torch.rand(S, generator=g) < 0.8                                 # (S,) -> (B, H, L, S), zero strides
    before = [x.clone() for x in (q, k, v)]
    res, _ = run_case(q, k, v, norm, causal="upper_left", mask=mask, stats_tol=2e-5)
    res_c = triton_path.launch_forward(q.contiguous(), k.contiguous(), v.contiguous(), flashmaps.parse(norm),
                                mask=mask.expand(B, H, L, S).contiguous(), causal="upper_left")
    assert rel_err(res.out, res_c.out) < 1e-6
    for x, y in zip((q, k, v), before):
        assert torch.equal(x, y)


@pytest.mark.parametrize("norm", NORMS)
def test_softcap_and_scale(norm):
    q, k, v = make_qkv(1, 2, 1, 30, 40, 32, seed=7, spread=2.0)
    mask = make_mask("float", 1, 2, 30, 40, torch.float32)
    run_case(q, k, v, norm, softcap=3.0, scale=0.4, mask=mask, stats_tol=2e-5)
    run_case(q, k, v, norm, scale=0.05, causal="lower_right", stats_tol=2e-5)


def test_softmax_raw_scores_only_where_s_is_the_scaled_product():
    """Issue 17 item 6: softmax's output pass takes the row max on the raw q.k and folds the scale into exp2's
    multiply-add (`contract.Hooks.update_raw`, Static.RAW_SCORES) only where s = qk * qk_scale with qk_scale > 0.
    A negative scale (max(qk) * scale would be the row's smallest score), a softcap, a float-mask bias, noise or
    the distance form keep the scaled path; the grid above covers the raw path (default scale, bool masks,
    causal) and the softcap / float mask ones."""
    from flashmaps.kernels.contract import MASK_BOOL, MASK_FLOAT, raw_scores_ok

    hooks = flashmaps.parse("softmax").triton(40)[0]
    plain = dict(softcap=False, mask_kind=MASK_BOOL, distance=False, qk_scale=0.1)
    assert raw_scores_ok(hooks, **plain)
    for change in (dict(softcap=True), dict(mask_kind=MASK_FLOAT), dict(distance=True), dict(qk_scale=-0.1)):
        assert not raw_scores_ok(hooks, **{**plain, **change}), change
    assert not raw_scores_ok(flashmaps.parse("topk:8").triton(40)[0], **plain)      # a pre-pass reads s
    q, k, v = make_qkv(1, 2, 1, 30, 40, 32, seed=8, spread=2.0)
    run_case(q, k, v, "softmax", scale=-4.0, causal="lower_right", mask=make_mask("bool", 1, 2, 30, 40),
             stats_tol=2e-5)


def test_float32_mask_with_bf16_inputs():
    q, k, v = make_qkv(1, 2, 2, 20, 30, 16, dtype=torch.bfloat16, seed=8)
    mask = make_mask("float", 1, 2, 20, 30, torch.float32)
    for norm in NORMS:
        run_case(q, k, v, norm, mask=mask)


# ----------------------------------------------------------------------------------------------------
# tile skipping: tiles that must not be touched are poisoned with NaN


@pytest.mark.parametrize("norm", NORMS)
def test_causal_tiles_skipped(norm):
    """upper_left, L = 20 < S = 64: keys >= 32 (two whole tiles) are above the causal frontier of every
    row. They hold NaN in K and V; a kernel that loads them, even masked, produces NaN (0 * NaN in P @ V,
    NaN scores in the pre-passes)."""
    L, S = 20, 64
    q, k, v = make_qkv(1, 2, 2, L, S, 16, seed=9)
    k_p, v_p = k.clone(), v.clone()
    k_p[:, :, 32:] = float("nan")
    v_p[:, :, 32:] = float("nan")
    res = triton_path.launch_forward(q, k_p, v_p, flashmaps.parse(norm), causal="upper_left")
    ref = reference.attention(q, k, v, flashmaps.parse(norm), causal="upper_left")
    assert rel_err(res.out, ref) < 1e-5


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("causal", ["upper_left", "lower_right"])
def test_causal_tiles_skipped_per_block(norm, causal):
    """Query block b (rows [16b, 16b+16)) touches key tiles up to its diagonal only: with key tile t
    poisoned (NaN in K and V), the blocks that never see tile t stay exact and the blocks that do are
    NaN (so the poison is really read where it should be). lower_right: L = 48, S = 64, offset 16."""
    L, S = (64, 64) if causal == "upper_left" else (48, 64)
    off = S - L if causal == "lower_right" else 0
    q, k, v = make_qkv(1, 1, 1, L, S, 16, seed=10)
    ref = reference.attention(q, k, v, norm, causal=causal)
    for t in (1, 2, 3):
        first_reader = max(0, 16 * t - off) // 16 * 16          # first row of the first block reading tile t
        if first_reader == 0:
            continue
        k_p, v_p = k.clone(), v.clone()
        k_p[:, :, 16 * t: 16 * t + 16] = float("nan")
        v_p[:, :, 16 * t: 16 * t + 16] = float("nan")
        res = triton_path.launch_forward(q, k_p, v_p, flashmaps.parse(norm), causal=causal)
        rows = slice(0, first_reader)
        assert rel_err(res.out[:, :, rows], ref[:, :, rows]) < 1e-5
        if not flashmaps.parse(norm).sparse:                     # (sparse normalizers may skip NaN tiles)
            assert torch.isnan(res.out[:, :, first_reader:]).all()


@pytest.mark.parametrize("norm", [n for n in SPARSE_NORMS if flashmaps.parse(n).triton(48)[0].skip_dead])
def test_dead_tiles_skip_pv(norm):
    """A key tile whose scores are all below the row thresholds contributes nothing: its V may be NaN.
    (The sparse units that skip dead tiles; softpick's zero weights still count in its denominator.)"""
    L, S, D = 16, 48, 16
    q, k, v = make_qkv(1, 1, 1, L, S, D, seed=11)
    q = q.abs() + 0.5
    k[:, :, 16:32] = -k[:, :, 16:32].abs() - 3.0                  # tile 1: very negative scores
    v_p = v.clone()
    v_p[:, :, 16:32] = float("nan")
    res = triton_path.launch_forward(q, k, v_p, flashmaps.parse(norm))
    ref = reference.attention(q, k, v, flashmaps.parse(norm))
    assert rel_err(res.out, ref) < 1e-5


@triton.jit
def _bounds_kernel(Out, L, S, causal_off, BM: tl.constexpr, BN: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   ALL_MASKED: tl.constexpr):
    pid = tl.program_id(0)
    full_end, hi = key_bounds(pid * BM, L, S, causal_off, BM, BN, IS_CAUSAL, ALL_MASKED)
    lo, full_start = query_bounds(pid * BN, L, S, causal_off, BM, BN, IS_CAUSAL, ALL_MASKED)
    tl.store(Out + pid * 4 + 0, full_end)
    tl.store(Out + pid * 4 + 1, hi)
    tl.store(Out + pid * 4 + 2, lo)
    tl.store(Out + pid * 4 + 3, full_start)


@pytest.mark.parametrize("causal", CAUSALS)
@pytest.mark.parametrize("L,S", [(1, 1), (1, 50), (37, 37), (64, 48), (20, 70), (70, 20), (33, 100)])
@pytest.mark.parametrize("all_masked", [False, True])
def test_block_bounds(causal, L, S, all_masked):
    """tiles.key_bounds (query block -> key tiles) and tiles.query_bounds (key tile -> query blocks,
    for the backward) against brute force: every allowed (i, j) is visited, and a tile called unmasked
    has every in-range pair allowed."""
    BM, BN = 16, 32
    off = S - L if causal == "lower_right" else 0
    nm, nn = triton.cdiv(L, BM), triton.cdiv(S, BN)
    out = torch.zeros(max(nm, nn), 4, dtype=torch.int32, device=KERNEL_DEVICE)
    _bounds_kernel[(max(nm, nn),)](out, L, S, off, BM, BN, causal is not None, all_masked)
    out = out.cpu()
    i = torch.arange(L)[:, None]
    j = torch.arange(S)[None, :]
    allowed = (j <= i + off) if causal else torch.ones(L, S, dtype=torch.bool)
    for m in range(nm):
        full_end, hi = out[m, 0].item(), out[m, 1].item()
        rows = allowed[m * BM: (m + 1) * BM]
        assert full_end % BN == 0 and 0 <= full_end <= max(hi, 0) <= S
        assert not rows[:, max(hi, 0):].any()                               # nothing allowed is skipped
        assert rows[:, :full_end].all()                                     # unmasked tiles: all allowed
        if all_masked:
            assert full_end == 0
    for n in range(nn):
        lo, full_start = out[n, 2].item(), out[n, 3].item()
        cols = allowed[:, n * BN: (n + 1) * BN]
        assert lo % BM == 0 and full_start % BM == 0 and 0 <= lo <= full_start
        assert not cols[:lo].any()                                          # rows < lo see no key of the tile
        assert cols[full_start:].all()                                      # unmasked query tiles
        if all_masked:
            assert full_start >= L


# ----------------------------------------------------------------------------------------------------
# top-k: every k, ties, every pre-pass mode

#: buffer: the interpreter's default (insertion steps only); merge: the GPU's rule (a tile with more than
#: MERGE_AT[KP] candidates in some row merged at once, insertion steps otherwise: both paths and their interplay)
TOPK_MODES = ["collect", "buffer", "merge", "select"]


def _topk_mode(mode, monkeypatch):
    monkeypatch.setattr(topk_kernels, "COLLECT", mode == "collect")
    monkeypatch.setattr(topk_kernels, "SELECT_UP_TO_S", {})       # buffer / merge: the buffer for every k <= KMAX
    if mode == "select":
        monkeypatch.setattr(topk_kernels, "KMAX", 0)
    if mode == "merge":
        monkeypatch.setattr(topk_kernels, "INTERPRET_NO_MERGE", False)


@pytest.mark.parametrize("mode", TOPK_MODES)
@pytest.mark.parametrize("k", [1, 2, 3, 16, 42, 43, 44, 100])
def test_topk_every_k(mode, k, monkeypatch):
    """S = 43: k = 1, small k, k near S (42 = S - 1: KP = 64, like any k in 33..64), k = S and k > S (every key
    kept, tau = -inf)."""
    _topk_mode(mode, monkeypatch)
    q, k_, v = make_qkv(1, 2, 1, 18, 43, 16, seed=k)
    res, _ = run_case(q, k_, v, f"topk:{k}", causal=None, stats_tol=2e-5)
    if k >= 43:
        assert torch.isinf(res.stats["tau"]).all()


@pytest.mark.parametrize("mode", TOPK_MODES)
@pytest.mark.parametrize("k", [1, 4, 7])
def test_topk_ties(mode, k, monkeypatch):
    """Integer scores with many ties: every key tied with the k-th score is kept (threshold semantics)."""
    _topk_mode(mode, monkeypatch)
    g = torch.Generator().manual_seed(12)
    L, S = 20, 50
    q = torch.zeros(1, 1, L, 4)
    q[..., 0] = 1.0
    k_ = torch.zeros(1, 1, S, 4)
    k_[..., 0] = torch.randint(0, 5, (S,), generator=g).float()   # scores in {0, .., 4}: ties everywhere
    v = torch.randn(1, 1, S, 8, generator=g)
    res, _ = run_case(q, k_, v, f"topk:{k}", scale=1.0, causal="lower_right", stats_tol=1e-6)
    # with ties more than k keys are kept
    s, allowed = reference.scores_and_allowed(q, k_, causal="lower_right", scale=1.0)
    kept = (allowed & (s >= res.stats["tau"].double()[..., None])).sum(-1)
    assert (kept > k).any()


@pytest.mark.parametrize("causal, ks", [(None, (20,)), ("lower_right", (3,))])
def test_topk_collect_long_rows_and_overflow(causal, ks, monkeypatch):
    """COLLECT over many tiles and groups (S = 700: groups of 8 keys, two per interpreter tile), with
    random scores (few scores above the bound: no overflow) and with all scores equal (every score
    is >= the bound: the rows overflow the KC = 2 KP slots and the block falls back to the buffer).
    Two query blocks (L = 20: a full block and a partial one) of one head, GQA of two query heads."""
    monkeypatch.setattr(topk_kernels, "COLLECT", True)
    q, k, v = make_qkv(1, 2, 1, 20, 700, 16, seed=16)
    for kk in ks:
        assert topk_kernels.configure(TopK(kk), 700)[0].consts.MODE == topk_kernels.MODE_COLLECT.value
        run_case(q, k, v, f"topk:{kk}", causal=causal, stats_tol=2e-5)
    res, _ = run_case(torch.zeros_like(q), k, v, "topk:8", causal=causal, stats_tol=1e-6)
    assert torch.isfinite(res.out).all()


#: the normalizers whose pre-pass is the threshold engine's root_prepass (an F-root threshold) with a collect
#: method (a rule with ``sorted``; alpha-entmax has the bracket method only)
ROOT_NORMS = [n for n in SPARSE_NORMS if isinstance(flashmaps.parse(n).triton(300)[0].consts, RootConsts)
              and flashmaps.parse(n).triton(300)[0].rule.sorted is not None]


@pytest.mark.parametrize("norm, causal", [(n, (None, "lower_right")[i % 2]) for i, n in enumerate(ROOT_NORMS)])
def test_root_collect_mode_and_overflow(norm, causal, monkeypatch):
    """The collect method of root_prepass (group maxima bound, collected scores, sort-based threshold):
    random scores (support of a few keys: no overflow), a wide support (scaled-down scores: more than KC = 128
    keys above the bound, the block falls back to the bracket passes), and equal scores (every key). Collect is
    off by default (experimental): the causal kinds alternate over the units instead of a full product."""
    nrm = flashmaps.parse(norm)
    monkeypatch.setattr(importlib.import_module(nrm.kernels), "COLLECT", True)
    q, k, v = make_qkv(1, 1, 1, 16, 300, 16, seed=17, spread=1.5)
    assert nrm.triton(300)[0].consts.COLLECT
    run_case(q, k, v, norm, causal=causal, stats_tol=2e-5)
    run_case(q * 0.02, k, v, norm, causal=causal, stats_tol=2e-5)
    run_case(torch.zeros_like(q), k, v, norm, causal=causal, stats_tol=2e-5)


@pytest.mark.parametrize("norm", ["entmax15", "sparsemax"])
def test_root_points_per_pass(norm, monkeypatch):
    """The bracket method at NPTS = 1 (the default: the Newton iterate alone; a row without a feasible point
    goes on from a lower bound), 2 and 4 points per pass: the same exact tau, causal, over 19 tiles."""
    mod = importlib.import_module(flashmaps.parse(norm).kernels)
    q, k, v = make_qkv(1, 1, 1, 16, 300, 16, seed=18, spread=1.5)
    for npts in (1, 2, 4):
        monkeypatch.setattr(mod, "NPTS", npts)
        assert flashmaps.parse(norm).triton(300)[0].rule.points == npts
        run_case(q, k, v, norm, causal="lower_right", stats_tol=2e-5)


def test_topk_select_long_rows(monkeypatch):
    """The count-based select over many tiles (k > KMAX), with causal diagonal tiles and a bool mask."""
    q, k, v = make_qkv(1, 1, 1, 16, 300, 16, seed=13)
    mask = make_mask("bool", 1, 1, 16, 300, torch.float32)
    for kk in (150, 200, 299):
        run_case(q, k, v, f"topk:{kk}", mask=mask, causal="lower_right", stats_tol=2e-5)


def test_topk_selects_the_k_largest():
    """Without ties exactly k keys per row are kept (k-th largest threshold)."""
    q, k, v = make_qkv(1, 2, 2, 17, 40, 16, seed=14)
    for kk in (1, 5, 39):
        res = triton_path.launch_forward(q, k, v, TopK(kk))
        s, _ = reference.scores_and_allowed(q, k)
        kept = (s >= res.stats["tau"].double()[..., None] - 1e-6).sum(-1)
        assert torch.equal(kept, torch.full_like(kept, kk))


# ----------------------------------------------------------------------------------------------------
# entmax15: threshold exactness, sparsity, the backward extras, the entmax package


@pytest.mark.parametrize("spread", [0.3, 1.0, 4.0])
@pytest.mark.parametrize("causal", [None, "upper_left"])
def test_entmax15_threshold(spread, causal):
    """tau exact to fp32 rounding over score ranges from dense (0.3) to very sparse (4.0)."""
    q, k, v = make_qkv(1, 2, 2, 24, 90, 32, seed=15, spread=spread)
    res, _ = run_case(q, k, v, "entmax15", causal=causal, stats_tol=3e-6)
    s, allowed = reference.scores_and_allowed(q, k, causal=causal or False)
    p = torch.clamp(s / 2 - res.stats["tau"].double()[..., None], min=0) ** 2
    sums = torch.where(allowed, p, torch.zeros_like(p)).sum(-1)
    assert (sums - 1).abs().max() < 1e-5                           # the kernel's tau solves sum p = 1


def test_entmax15_ties_and_single_key():
    """Many equal scores (support boundary on a tie) and rows with exactly one allowed key."""
    g = torch.Generator().manual_seed(16)
    L, S = 18, 40
    q = torch.zeros(1, 1, L, 4)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, S, 4)
    k[..., 0] = torch.randint(0, 4, (S,), generator=g).float() * 0.5
    v = torch.randn(1, 1, S, 8, generator=g)
    run_case(q, k, v, "entmax15", scale=1.0, causal="upper_left", stats_tol=2e-6)


def test_entmax15_against_entmax_package():
    entmax = pytest.importorskip("entmax")
    q, k, v = make_qkv(1, 2, 2, 20, 33, 16, seed=17, spread=1.5)
    out = triton_path.launch_forward(q, k, v, Entmax15()).out
    s, _ = reference.scores_and_allowed(q, k)
    p = entmax.entmax15(s, dim=-1)
    assert rel_err(out, p @ v.double()) < 1e-5


@pytest.mark.parametrize("causal", [None, "lower_right"])
def test_entmax15_backward_extras(causal):
    """save_extras: sum_g = sum_j sqrt(p_j) and O2 = sum_j sqrt(p_j) v_j / sum_g, and thr = tau."""
    q, k, v = make_qkv(1, 2, 1, 22, 35, 16, Dv=24, seed=18)
    mask = make_mask("empty_rows", 1, 2, 22, 35, torch.float32)
    res = triton_path.launch_forward(q, k, v, Entmax15(), causal=causal, mask=mask.expand(1, 2, 22, 35),
                              save_extras=True)
    _, p = reference.attention(q, k, v, "entmax15", causal=causal or False, attn_mask=mask,
                               enable_gqa=True, return_weights=True)
    g = p.sqrt()
    sum_g = g.sum(-1)
    o2 = (g @ v.double().repeat_interleave(2, dim=1)) / torch.where(sum_g > 0, sum_g, 1)[..., None]
    assert rel_err(res.saved["sum_g"], sum_g) < 1e-5
    assert rel_err(res.saved["o2"], o2) < 1e-5
    assert torch.equal(res.saved["thr"], res.stats["tau"])
    empty = sum_g == 0
    assert empty.any() and (res.saved["o2"][empty] == 0).all() and (res.saved["sum_g"][empty] == 0).all()


def test_entmax15_output_is_sparse():
    q, k, v = make_qkv(1, 1, 1, 16, 64, 16, seed=19, spread=3.0)
    res = triton_path.launch_forward(q, k, v, Entmax15())
    s, _ = reference.scores_and_allowed(q, k)
    support = (s / 2 > res.stats["tau"].double()[..., None]).sum(-1)
    assert (support < 64).all() and (support >= 1).all()


def test_topk_saved_threshold_is_kernel_units():
    q, k, v = make_qkv(1, 1, 1, 16, 40, 16, seed=20)
    res = triton_path.launch_forward(q, k, v, TopK(4))
    assert res.score_unit == pytest.approx(math.log2(math.e))
    assert torch.allclose(res.saved["thr"] * math.log(2), res.stats["tau"], rtol=1e-6)


# ----------------------------------------------------------------------------------------------------
# the backend contract through the public API


def test_public_api_dispatch():
    q, k, v = make_qkv(1, 4, 2, 17, 23, 16, seed=21)
    out, stats = flashmaps.attention(q, k, v, "topk:4", causal=True, enable_gqa=True, return_stats=True,
                                     backend="triton")
    ref = reference.attention(q, k, v, "topk:4", causal=True, enable_gqa=True)
    assert rel_err(out, ref) < 1e-5 and set(stats) == {"tau", "lse"}


def test_against_cpu_path():
    """The Triton kernels and the torch backend agree (fp32)."""
    q, k, v = make_qkv(1, 2, 1, 25, 37, 16, seed=22)
    mask = make_mask("bool", 1, 2, 25, 37, torch.float32)
    for norm in NORMS:
        pin_seed(norm)              # a stochastic normalizer: both calls draw the same noise seed
        a, sa = flashmaps.attention(q, k, v, norm, attn_mask=mask, causal="lower_right", enable_gqa=True,
                                    backend="triton", return_stats=True)
        pin_seed(norm)
        b, sb = flashmaps.attention(q, k, v, norm, attn_mask=mask, causal="lower_right", enable_gqa=True,
                                    backend="torch", return_stats=True)
        assert rel_err(a, b) < 1e-5
        check_stats(sa, {n: x.double() for n, x in sb.items()}, 2e-5)


@pytest.mark.parametrize("norm", NORMS)
def test_backend_contract_aux(norm):
    """forward() of the custom-op contract: stats in normalizer order, extras packed as extras_shape says, and
    unpack_extras giving back the launcher's saved tensors (also with the backward extras)."""
    q, k, v = make_qkv(1, 2, 1, 20, 30, 16, Dv=8, seed=24)
    n = flashmaps.parse(norm)
    out, stats, extras = triton_path.forward(q, k, v, n, mask=None, causal="upper_left", scale=0.25,
                                          softcap=None, dropout_p=0.0, seed=0, need_grad=False)
    assert extras.dtype == torch.float32 and tuple(extras.shape) == triton_path.extras_shape(n, q, k, v, False)
    assert len(stats) == len(n.stats)
    res = triton_path.launch_forward(q, k, v, n, causal="upper_left", scale=0.25, save_extras=True)
    assert torch.equal(out, res.out) and all(torch.equal(a, b) for a, b in zip(stats, res.stats.values()))
    assert tuple(res.extras.shape) == triton_path.extras_shape(n, q, k, v, True)
    views = triton_path.unpack_extras(res.extras, n, q, v, True)
    assert set(views) == set(res.saved) and all(torch.equal(views[x], res.saved[x]) for x in views)
    hooks = n.triton(30)[0]
    if hooks.has_prepass:
        assert torch.equal(triton_path.unpack_extras(extras, n, q, v, False)["thr"], res.saved["thr"])
    if hooks.has_g:
        assert set(views) == {"thr", "sum_g", "o2"} and views["o2"].shape == (1, 2, 20, 8)


# ----------------------------------------------------------------------------------------------------
# CUDA: realistic sizes, the real compiler (run by scripts/gpu-check)

CUDA_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def cuda_cfg(D, Dv=None):
    """A pinned config (autotuning every case would compile each kernel several times)."""
    big = max(D, Dv or D) > 128
    return {"BM": 64, "BN": 32 if big else 64, "num_warps": 8 if big else 4, "num_stages": 2}


def _realistic_cases():
    cases = [pytest.param(n, c, torch.bfloat16, id=f"{n}-{c or 'full'}-bf16")
             for n in NORMS + [d for d in TRITON_DEFAULTS if d not in NORMS] for c in CAUSALS]
    cases += [pytest.param(n, "lower_right", d, id=f"{n}-lower_right-{DTYPE_NAMES[d]}")
              for n in DEEP for d in (torch.float16, torch.float32)]
    return cases


@pytest.mark.cuda
@pytest.mark.parametrize("norm,causal,dtype", _realistic_cases())
def test_cuda_realistic(norm, causal, dtype):
    q, k, v = make_qkv(2, 8, 2, 1000, 1537, 64, dtype=dtype, device="cuda", seed=30)
    run_case(q, k, v, norm, causal=causal, tol=CUDA_TOL[dtype], config=cuda_cfg(64),
             stats_tol=1e-3 if dtype == torch.float32 else None)


def _dims_cases():
    dims = [(16, 128), (40, 40), (64, 64), (72, 72), (80, 80), (96, 96), (128, 128), (160, 160), (256, 256),
            (128, 64)]
    cases = [pytest.param(n, d, dv, id=f"{n}-{d}-{dv}") for n in DEEP for d, dv in dims]
    cases += [pytest.param(n, d, d, id=f"{n}-{d}-{d}") for n in NORMS if n not in DEEP for d in (40, 160)]
    return cases


@pytest.mark.cuda
@pytest.mark.parametrize("norm,D,Dv", _dims_cases())
def test_cuda_head_dims(norm, D, Dv):
    q, k, v = make_qkv(1, 4, 4, 777, 1025, D, Dv=Dv, dtype=torch.bfloat16, device="cuda", seed=D)
    run_case(q, k, v, norm, causal="lower_right", tol=2e-2, config=cuda_cfg(D, Dv))


@pytest.mark.cuda
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("mask_kind", ["bool", "float", "empty_rows"])
def test_cuda_masks_gqa_softcap(norm, mask_kind):
    B, Hq, Hkv, L, S = 2, 8, 2, 600, 900
    q, k, v = make_qkv(B, Hq, Hkv, L, S, 128, dtype=torch.bfloat16, device="cuda", seed=31)
    mask = make_mask(mask_kind, B, Hq, L, S, torch.bfloat16, device="cuda")
    run_case(q, k, v, norm, mask=mask, softcap=20.0, tol=2e-2, config=cuda_cfg(128))


@pytest.mark.cuda
@pytest.mark.parametrize("norm", NORMS)
def test_cuda_decode_and_strides(norm):
    B, H, S, D = 4, 8, 3000, 128
    g = torch.Generator().manual_seed(32)
    q = torch.randn(B, 1, H, D, generator=g).cuda().bfloat16().transpose(1, 2)
    k = torch.randn(B, S, H, D, generator=g).cuda().bfloat16().transpose(1, 2)
    v = torch.randn(B, S, H, D, generator=g).cuda().bfloat16().transpose(1, 2)
    run_case(q, k, v, norm, causal="lower_right", tol=2e-2, config=cuda_cfg(D))


@pytest.mark.cuda
@pytest.mark.parametrize("k, S", [(1, 2048), (64, 2048), (128, 2048), (129, 2048), (1000, 2048), (2047, 2048),
                                  (96, 1024), (128, 1024)])
def test_cuda_topk_every_mode(k, S):
    """Every pre-pass mode: at S = 2048 buffer for k <= KMAX and select (8 points) beyond; at S = 1024 the select
    at 2 points of 64 < k <= KMAX (`topk.SELECT_UP_TO_S`). Small-integer q and k make every q.k exact on the GPU
    too (no near-ties that fp32 rounding could order differently from the float64 reference) while leaving many
    exact ties at the threshold."""
    g = torch.Generator().manual_seed(33)
    q = torch.randint(-2, 3, (1, 4, 512, 64), generator=g).float().cuda()
    k_ = torch.randint(-2, 3, (1, 4, S, 64), generator=g).float().cuda()
    v = torch.randn(1, 4, S, 64, generator=g).cuda()
    run_case(q, k_, v, f"topk:{k}", causal="lower_right", scale=0.05, tol=1e-4, stats_tol=1e-5,
             config=cuda_cfg(64))


@pytest.mark.cuda
def test_cuda_autotuned_entmax15_threshold_exact():
    """Through the autotuner (no pinned config), fp32, tau to fp32 rounding."""
    q, k, v = make_qkv(1, 4, 4, 1024, 4096, 128, device="cuda", seed=34, spread=1.5)
    run_case(q, k, v, "entmax15", tol=1e-4, stats_tol=1e-5)


@pytest.mark.cuda
def test_cuda_other_config():
    q, k, v = make_qkv(1, 2, 2, 300, 300, 64, dtype=torch.bfloat16, device="cuda", seed=35)
    for norm in NORMS:
        run_case(q, k, v, norm, causal="upper_left", config={"BM": 128, "BN": 32, "num_warps": 8,
                                                             "num_stages": 3})
