"""The block mask (issue 17 item 5, ``Static.BLOCK_MASK``, kernels/blockmask.py): on structured inputs where
16 x 16 cells are dead, the forward's pre-pass marks them and both backward kernels skip dead tiles before Q K^T.

Every sparse unit with ``Hooks.live_floor`` (from the registry), causal and not, GQA, Dqk != Dv, against the
float64 reference (out, dq, dk, dv); the mask is conservative (never marks a cell with a nonzero weight dead)
and the inputs really have dead cells; counters around the interpreted jit functions show tiles skipped."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import flashmaps
from flashmaps import reference, triton_path
from flashmaps.bench.structured import block_sparsity, exact_live_cells, structured_qkv
from flashmaps.kernels import backward, tile_loop
from helpers import HAS_CUDA, KERNEL_DEVICE, SPARSE_NORMS, grad_err, reference_grads, rel_err

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="interpreter test (counters wrap the interpreted kernels)")

#: the sparse units of the grid that get the block mask (Hooks.live_floor)
MASKED_NORMS = [s for s in SPARSE_NORMS if flashmaps.parse(s).triton(64)[0].live_floor is not None]
#: B, Hq, Hkv, L, S, Dqk, Dv: GQA, ragged L and S, Dqk != Dv
SHAPE = (1, 2, 1, 40, 72, 16, 24)
#: forward tiles of 2 x 2 cells (full) or of one cell (causal: the dQ kernel's 32-row blocks then read cells no
#: forward block visited), backward tiles of other shapes (the OR over cells, rows != cols)
FWD = {None: {"BM": 32, "BN": 32}, "lower_right": {"BM": 16, "BN": 16}}
BWD = {"dkdv": {"BM": 16, "BN": 32}, "dq": {"BM": 32, "BN": 16}}


def _inputs(seed=0):
    B, Hq, Hkv, L, S, D, Dv = SHAPE
    q, k, v = structured_qkv(B, Hq, L, S, D, Hkv=Hkv, Dv=Dv, n_dirs=4, block=16, seed=seed, device=KERNEL_DEVICE)
    dout = torch.randn(B, Hq, L, Dv, generator=torch.Generator().manual_seed(seed + 1)).to(KERNEL_DEVICE)
    return q, k, v, dout


@pytest.fixture(autouse=True)
def _block_mask_on(monkeypatch):
    """These tests are about the mask: on whatever the library's default (FLASHMAPS_BLOCK_MASK)."""
    monkeypatch.setattr(triton_path, "BLOCK_MASK", True)


def _run(spec, causal, deterministic, q, k, v, dout):
    n = flashmaps.parse(spec)
    res = triton_path.launch_forward(q, k, v, n, causal=causal, save_extras=True, config=FWD[causal])
    dq, dk, dv = triton_path.launch_backward(dout, q, k, v, res.out, list(res.stats.values()), res.extras, n,
                                             causal=causal, config=BWD, deterministic=deterministic)
    return res, (res.out, dq, dk, dv)


@pytest.mark.parametrize("causal", [None, "lower_right"], ids=["full", "causal"])
@pytest.mark.parametrize("spec", MASKED_NORMS)
def test_structured_matches_reference(spec, causal):
    """Triton (block mask on; atomic dQ without causal, the dQ kernel with it) = float64 reference, the mask
    covers every cell with a weight > 1e-6, and at least a third of the cells are dead. The launcher zeroes the
    buffer (all dead): cells no forward program writes (above the diagonal) must not matter."""
    q, k, v, dout = _inputs()
    B, Hq, _, L, S, _, _ = SHAPE
    res, got = _run(spec, causal, causal is not None, q, k, v, dout)
    ref = reference_grads(q, k, v, dout, spec, causal=causal)
    errs = {name: (rel_err if name == "out" else grad_err)(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref)}
    assert all(e < 1e-4 for e in errs.values()), errs
    live = res.live
    assert live is not None, "the block mask is off for a unit with live_floor"
    _, p = reference.attention(q.double(), k.double(), v.double(), spec, causal=causal or False, enable_gqa=True,
                               return_weights=True)
    need = exact_live_cells(torch.where(p > 1e-6, p, 0.0))                              # (B, Hq, R, C) bool
    cells = live[:, :, : need.shape[2], : need.shape[3]] != 0
    assert not (need & ~cells).any(), "a cell with a nonzero weight was marked dead"
    assert block_sparsity(live, L, S) > 0.3


def _counts(monkeypatch, spec, block_mask: bool):
    """(tiles of the output pass, score recomputes of the backward, results) with the block mask on or off."""
    monkeypatch.setattr(triton_path, "BLOCK_MASK", block_mask)
    counter: Counter = Counter()
    for module, name, key in ((tile_loop, "_accumulate", "out"), (backward, "_tile_weights", "bwd")):
        fn = getattr(module, name)

        def counted(*args, _fn=fn, _key=key, **kwargs):
            counter[_key] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    got = _run(spec, None, True, *_inputs())[1]
    monkeypatch.undo()
    return counter, got


@pytest.mark.parametrize("spec", ["entmax15", "topk:5"])
def test_dead_tiles_are_skipped(monkeypatch, spec):
    """The same results with the block mask as without, with fewer tiles: the pre-pass's marks (entmax15's first
    bracket pass, top-k's running buffer) make the backward recompute fewer score tiles; the output pass folds
    them all (it does not read the mask)."""
    on, got_on = _counts(monkeypatch, spec, True)
    off, got_off = _counts(monkeypatch, spec, False)
    for a, b in zip(got_on, got_off):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert on["bwd"] < off["bwd"], (on, off)
    assert on["out"] == off["out"], (on, off)


def test_harness_reports_block_sparsity_on_structured_inputs():
    """A checked bench job on structured inputs reports the dead 64 x 64 tiles of its weights (`bench.worker`),
    equal to the count from the float64 reference, and a nonzero one (the generator's point)."""
    from flashmaps.bench import worker

    job = dict(provider="entmax15-dense", mode="fwd", B=1, Hq=1, Hkv=1, L=128, S=192, Dqk=16, Dv=16, causal=None,
               dtype="float32", device="cpu", min_run_time=0.01, check=True, max_ref_elems=1 << 20,
               inputs="structured")
    row = worker.run_job(job)
    assert row["status"] == "ok" and row["err"] < 1e-5, row
    q, k, v = worker.make_inputs(row)
    _, p = reference.attention(q, k, v, "entmax15", return_weights=True)
    live = exact_live_cells(p, cell=worker.BLOCK_TILE)
    assert 0 < row["block_sparsity"] == pytest.approx(1 - live.double().mean().item(), abs=1e-12)
