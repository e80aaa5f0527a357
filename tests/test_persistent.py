"""Issue 17 item 6: the forward on a persistent grid (``Static.PERSISTENT``, ``triton_path.PERSISTENT``), under the
interpreter with `triton_path.PERSISTENT_INTERPRET_PROGRAMS` (3) programs, so that the programs loop over several
query blocks, some over fewer (n_work not a multiple of 3): out, the row statistics, the backward's
extras and the gradients through it are bit-identical to the default grid's (each block is computed by the same
code in either grid). A few registry units (softmax, entmax15, topk), causal and not, GQA, a mask, Dqk != Dv. GPU
timing pending (off by default)."""

from __future__ import annotations

import pytest
import torch
from helpers import KERNEL_DEVICE, make_mask, make_qkv

import flashmaps
from flashmaps import triton_path
from flashmaps.kernels.contract import Static

pytestmark = pytest.mark.skipif(KERNEL_DEVICE != "cpu" and not torch.cuda.is_available(), reason="no kernels")

#: (unit, causal, (B, Hq, Hkv, L, S, Dqk, Dv), mask kind): with the interpreter's BM = 16 the query blocks are
#: cdiv(L, 16) * B * Hq = 8, 4, 6 work items on 3 programs (8: 3 + 3 + 2 items, 4: 2 + 1 + 1, not multiples)
CASES = [
    ("softmax", "upper_left", (1, 4, 2, 20, 24, 16, 16), None),
    ("entmax15", None, (1, 2, 2, 20, 24, 16, 24), "bool"),
    ("topk:4", "lower_right", (1, 2, 1, 40, 30, 16, 16), None),
]


def _run(spec, causal, shape, mask_kind, persistent, monkeypatch):
    """(out, stats, dq, dk, dv) of one fwd+bwd through the Triton backend, the grid ``persistent``."""
    B, Hq, Hkv, L, S, D, Dv = shape
    q, k, v = (x.requires_grad_() for x in make_qkv(B, Hq, Hkv, L, S, D, Dv, seed=11))
    mask = make_mask(mask_kind, B, Hq, L, S) if mask_kind else None
    monkeypatch.setattr(triton_path, "PERSISTENT", persistent)
    out, stats = flashmaps.attention(q, k, v, spec, causal=causal, attn_mask=mask, enable_gqa=Hq != Hkv,
                                     backend="triton", return_stats=True)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)))
    return out.detach(), {n: s.detach() for n, s in stats.items()}, q.grad, k.grad, v.grad


@pytest.mark.parametrize("spec,causal,shape,mask_kind", CASES, ids=[c[0] for c in CASES])
def test_persistent_grid_is_bit_identical(spec, causal, shape, mask_kind, monkeypatch):
    seen, extras = [], []                              # the forward launches and the backward's extras
    real, real_forward = triton_path._launch, triton_path.launch_forward

    def spy(kernel, tuned, config, grid_of, args, meta):
        if kernel is triton_path.attn_fwd:
            seen.append((meta["ST"].PERSISTENT, grid_of(triton_path.INTERPRET_CONFIG)))
        return real(kernel, tuned, config, grid_of, args, meta)

    def spy_forward(*a, **kw):
        res = real_forward(*a, **kw)
        extras.append(res.extras.clone())
        return res

    monkeypatch.setattr(triton_path, "_launch", spy)
    monkeypatch.setattr(triton_path, "launch_forward", spy_forward)
    base = _run(spec, causal, shape, mask_kind, False, monkeypatch)
    pers = _run(spec, causal, shape, mask_kind, True, monkeypatch)
    B, Hq, _, L = shape[:4]
    n_work = -(-L // triton_path.INTERPRET_CONFIG["BM"]) * B * Hq
    assert n_work > triton_path.PERSISTENT_INTERPRET_PROGRAMS
    assert seen == [(False, (-(-L // 16), B * Hq, 1)), (True, (triton_path.PERSISTENT_INTERPRET_PROGRAMS,))]
    out0, st0, *g0 = base
    out1, st1, *g1 = pers
    assert torch.equal(out0, out1)
    assert st0.keys() == st1.keys() and all(torch.equal(st0[n], st1[n]) for n in st0)
    assert len(extras) == 2 and torch.equal(extras[0], extras[1])
    for a, b in zip(g0, g1):
        assert a is not None and torch.equal(a, b)


def test_persistent_programs(monkeypatch):
    """On a GPU: SMs x the occupancy estimate of (dim class, BM), never more than the work; the grid function sees
    the chosen config's BM."""
    monkeypatch.setattr(triton_path, "_INTERPRET", False)
    monkeypatch.setattr(triton_path, "PERSISTENT_PER_SM", {(64, 64): 3, (128, 64): 2})
    st64 = Static.make(D=64, Dv=48, causal=False, mask_kind=0, softcap=False, dot_prec="ieee", dropout=False,
                       dtype="torch.bfloat16")
    st128 = st64._replace(HEAD_D=128, HEAD_DV=128, BD=128, BDV=128)
    assert triton_path.persistent_programs(10 ** 6, 128, st64, 132) == 132
    assert triton_path.persistent_programs(10 ** 6, 64, st64, 132) == 3 * 132
    assert triton_path.persistent_programs(10 ** 6, 64, st128, 100) == 2 * 100
    assert triton_path.persistent_programs(150, 64, st128, 132) == 150
    grid = triton_path._persistent_grid(1000, 16 * 32, st64, 132)      # 16 x 32 heads of 1000 rows
    assert grid({"BM": 128}) == (132,) and grid({"BM": 64}) == (3 * 132,)
    assert triton_path._persistent_grid(100, 2, st64, 132)({"BM": 64}) == (4,)     # 2 blocks x 2 heads


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_work_items_in_the_default_grids_order(causal):
    """Item w is program (w % n_m, w // n_m) of the default grid (axis 0 fastest, the order blocks launch in),
    causal blocks heaviest (last rows) first as `tiles.query_program` runs them; GQA: kv head h // group."""
    from flashmaps.kernels.contract import Dims
    from flashmaps.kernels.tiles import work_program

    B, Hq, group, n_m = 2, 4, 2, 3
    dims = Dims(B, Hq, group, 40, 40, 0, 0, 0)
    got = [work_program.fn(w, n_m, dims, causal) for w in range(n_m * B * Hq)]
    want = [(n_m - 1 - m if causal else m, bh // Hq, bh % Hq, bh % Hq // group) for bh in range(B * Hq)
            for m in range(n_m)]
    assert got == want


def test_persistent_kernel_compiles_for_sm90():
    """The persistent forward builds for the H100 (`scripts/sm90-compile --persistent`, Triton's bundled ptxas, no
    launch): softmax and entmax15 at D = 64 with an unserialized wgmma pipeline and no stack. Regression: with the
    block's setup hoisted out of the work loop softmax needed 191-212 registers per thread (151 with it kept in:
    `tile_loop.attn_fwd`; bench/TUNING.md, "Issue 17 item 6")."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(root / "scripts" / "sm90-compile"), "--norms", "softmax,entmax15", "--dims", "64",
           "--no-bwd", "--persistent"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r[0]: dict(w.split(":") for w in r if ":" in w) | {"serial": r[-1]}
            for r in (ln.split() for ln in proc.stdout.splitlines()[1:]) if r and r[2] == "fwd"}
    assert set(rows) == {"softmax", "entmax15"}, proc.stdout
    assert all(r["serial"] == "-" and r["STACK"] == "0" for r in rows.values()), rows
    assert int(rows["softmax"]["REG"]) <= 170, rows
