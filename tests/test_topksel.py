"""top-k's pre-pass mode by measured cost (kernels/topk.py `configure`, ``SELECT_UP_TO_S``): the count select at
``SELECT_SHORT_POINTS`` points per pass for 64 < k <= KMAX at short S, the buffer elsewhere; both exact there."""

from __future__ import annotations

import pytest
import torch
from test_kernels_forward import run_case

from flashmaps.kernels import topk as topk_kernels
from flashmaps.normalizers import TopK

pytest.importorskip("flashmaps.triton_path")


def _mode(k, S):
    hooks = topk_kernels.configure(TopK(k), S)[0]
    return hooks.consts.MODE, hooks.rule.points


def test_topk_mode_rule(monkeypatch):
    """SELECT at KP = 128 up to SELECT_UP_TO_S[128] keys, BUFFER beyond it, for KP <= 64, and with the table
    emptied; k > KMAX keeps SELECT at SELECT_POINTS."""
    sel, buf = topk_kernels.MODE_SELECT.value, topk_kernels.MODE_BUFFER.value
    top = topk_kernels.SELECT_UP_TO_S[128]
    short = (sel, topk_kernels.SELECT_SHORT_POINTS)
    assert _mode(65, 66) == _mode(128, top) == _mode(100, 512) == short
    assert _mode(65, top + 1)[0] == _mode(128, 8192)[0] == _mode(64, 512)[0] == _mode(8, 100)[0] == buf
    assert _mode(129, 512) == (sel, topk_kernels.SELECT_POINTS)
    monkeypatch.setattr(topk_kernels, "SELECT_UP_TO_S", {})
    assert _mode(100, 512)[0] == buf


@pytest.mark.parametrize("mode", ["select", "buffer"])
def test_topk_short_select_ties(mode, monkeypatch):
    """k = 70 over S = 150 (KP = 128): the default (select at 2 points) and the buffer, with integer scores
    (ties at tau everywhere), causal (139-150 keys per row), against the float64 reference."""
    if mode == "buffer":
        monkeypatch.setattr(topk_kernels, "SELECT_UP_TO_S", {})
    assert _mode(70, 150)[0] == getattr(topk_kernels, f"MODE_{mode.upper()}").value
    g = torch.Generator().manual_seed(41)
    q = torch.randint(-2, 3, (1, 1, 12, 4), generator=g).float()
    k_ = torch.randint(-2, 3, (1, 1, 150, 4), generator=g).float()          # integer scores: ties at tau
    v = torch.randn(1, 1, 150, 8, generator=g)
    res, _ = run_case(q, k_, v, "topk:70", scale=1.0, causal="lower_right", stats_tol=1e-6)
    assert torch.isfinite(res.stats["tau"]).all()                          # every row has more than k keys
