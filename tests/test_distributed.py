"""flashmaps.distributed: context-parallel attention on 2 and 3 gloo processes equals the single-process call.

One spawn of 3 processes (the world, and a subgroup of 2) runs every case (every registered normalizer's examples x causal or not x layout x
key padding mask or not; the ring for the units with a merge rule or the sparse units' two-phase protocol, with
gradients) and saves each rank's local output and
gradients; the parent computes the single-process ``flashmaps.attention`` on the full sequence, cuts it with
the same layout and compares.
"""

from __future__ import annotations

import functools
import gc
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flashmaps
import flashmaps.distributed as cp
from helpers import NORMS, grad_err, rel_err

B, HQ, HKV, S, D = 2, 2, 1, 12, 8  # S divides into 2W pieces for W = 2 and 3 (zigzag)
TOL = {torch.float32: 2e-5, torch.float64: 1e-11}
#: the grid: every normalizer but the stochastic ones (their noise needs one random stream: refused, below)
CP_NORMS = [spec for spec in NORMS if not flashmaps.parse(spec).stochastic]
STOCHASTIC = [spec for spec in NORMS if flashmaps.parse(spec).stochastic]
#: the ring's: a merge rule of independent parts, or the sparse units' two-phase protocol
MERGEABLE = [n.spec for n in flashmaps.examples()
             if (type(n).merge is not flashmaps.Normalizer.merge or n.two_phase) and not n.stochastic]


def _cases():
    """(spec, causal, layout, padded, dtype): the grid each spawn runs."""
    cases = [(spec, causal, layout, padded, torch.float32)
             for spec in CP_NORMS for causal in (False, True) for layout in ("allgather", "zigzag")
             for padded in (False, True)]
    cases += [(spec, True, "zigzag", True, torch.float64) for spec in CP_NORMS]
    cases += [(spec, causal, "ring", padded, torch.float32)
              for spec in MERGEABLE for causal in (False, True) for padded in (False, True)]
    return cases


def _inputs(dtype, seed=0):
    """Full q (B, HQ, S, D), k, v (B, HKV, S, D), dout (B, HQ, S, D) and a (B, S) key padding mask whose
    batch 0 excludes key 0 (so the causal row 0 has no allowed key: a zero row)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, S, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, HKV, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, HKV, S, D, generator=g, dtype=torch.float64)
    dout = torch.randn(B, HQ, S, D, generator=g, dtype=torch.float64)
    kpm = torch.rand(B, S, generator=g) < 0.75
    kpm[0, 0] = False
    return [x.to(dtype) for x in (q, k, v, dout)] + [kpm]


def _forward_backward(attn, q, k, v, dout):
    """(out, dq, dk, dv) of ``attn(q, k, v)`` with the output gradient dout."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = attn(*leaves)
    out.backward(dout)
    return [out.detach()] + [x.grad for x in leaves]


def _forward_only(case) -> bool:
    """The ring runs a sparse unit by the two-phase protocol: forward only for a unit without its gradients (none
    in the registry: training one raises, `_bad_setups`)."""
    nrm = flashmaps.parse(case[0])
    return case[2] == "ring" and nrm.two_phase and not nrm.has_threshold_grads


def _run_cases(group):
    """Every case of the grid on ``group``: {case: this rank's out, dq, dk, dv and the unsharded out}."""
    results = {}
    for case in _cases():
        spec, causal, layout, padded, dtype = case
        q, k, v, dout, kpm = (cp.shard(x, 1 if x.dim() == 2 else 2, group=group, layout=layout)
                              for x in _inputs(dtype))
        kw = dict(causal=causal, group=group, layout=layout, key_padding_mask=kpm if padded else None,
                  enable_gqa=True, backend="torch", check=not padded)  # half the cases skip the agreement check
        if _forward_only(case):
            with torch.no_grad():
                out = cp.attention(q, k, v, spec, **kw)
            got = {"out": out}
        else:
            out, dq, dk, dv = _forward_backward(lambda q_, k_, v_: cp.attention(q_, k_, v_, spec, **kw),
                                                q, k, v, dout)
            got = {"out": out, "dq": dq, "dk": dk, "dv": dv}
        results[case] = {**got, "unshard": cp.unshard(out, group=group, layout=layout)}
    return results


class _NoThresholdGrad(flashmaps.Entmax15):
    """entmax15's two-phase protocol without its gradients (a user unit without the threshold-gradient hooks)."""

    candidate_threshold_grad = flashmaps.Normalizer.candidate_threshold_grad


class _NoStatGrad(flashmaps.Softmax):
    """softmax's merge rule without gradients through its statistics (a user unit without stat_delta)."""

    stat_delta = flashmaps.Normalizer.stat_delta


def _bad_setups(group, rank):
    """{name: the ValueError message (None if nothing was raised)} of calls every rank must refuse alike."""
    q, k, v, _, _ = _inputs(torch.float32)
    L = 4 if rank == 0 else 6  # the ranks disagree on the shard length
    calls = {
        "disagree": lambda: cp.attention(q[:, :, :L], k[:, :, :L], v[:, :, :L], group=group, enable_gqa=True),
        "ring_grad": lambda: cp.attention(q.clone().requires_grad_(), k, v, _NoStatGrad(), group=group,
                                          layout="ring", enable_gqa=True),
        "ring_sparse_grad": lambda: cp.attention(q.clone().requires_grad_(), k, v, _NoThresholdGrad(), group=group,
                                                 layout="ring", enable_gqa=True),
        "zigzag_odd": lambda: cp.attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], group=group, causal=True,
                                           layout="zigzag", enable_gqa=True),
        **{f"stochastic_{spec}": (lambda spec=spec: cp.attention(q, k, v, spec, group=group, enable_gqa=True))
           for spec in STOCHASTIC},
    }
    errors = {}
    for name, call in calls.items():
        try:
            call()
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    return errors


def _worker(rank, init_file, out_dir):
    """One of 3 gloo ranks: the grid on the whole world (W = 3), then on the subgroup of global ranks 1 and 2
    (W = 2; its rank 0 is global rank 1, so ring peers go through the group's rank mapping)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=3)
    torch.set_num_threads(1)
    pair = dist.new_group([1, 2])  # every rank takes part in creating it
    saved = {3: {"results": _run_cases(None), "errors": _bad_setups(None, rank)}}
    if rank in (1, 2):
        saved[2] = {"results": _run_cases(pair), "errors": _bad_setups(pair, rank - 1)}
    torch.save(saved, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    gc.collect()  # free what still holds gloo work before teardown
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned():
    """{world size: [each of its ranks' saved results]} from one spawn of 3 gloo processes."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=3, join=True)
        saved = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(3)]
    return {3: [s[3] for s in saved], 2: [saved[1][2], saved[2][2]]}


@functools.lru_cache(maxsize=None)
def _reference(case):
    """Single-process (out, dq, dk, dv) over the full sequence (torch backend)."""
    spec, causal, layout, padded, dtype = case
    q, k, v, dout, kpm = _inputs(dtype)
    mask = kpm[:, None, None, :] if padded else None

    def attn(q_, k_, v_):
        return flashmaps.attention(q_, k_, v_, spec, causal=causal, attn_mask=mask, enable_gqa=True, backend="torch")

    return _forward_backward(attn, q, k, v, dout)


@pytest.mark.parametrize("world", [2, 3], ids=["W2", "W3"])
def test_context_parallel_equals_single_process(spawned, world):
    per_rank = spawned[world]
    checked = 0
    for case in _cases():
        spec, causal, layout, padded, dtype = case
        ref = _reference(case)
        names = ["out"] if _forward_only(case) else ["out", "dq", "dk", "dv"]
        for rank, saved in enumerate(per_rank):
            got = saved["results"][case]
            assert rel_err(got["unshard"], ref[0]) <= TOL[dtype], (case, rank, "unshard")
            for name, full in zip(names, ref):
                want = cp.shard(full, layout=layout, rank=rank, world_size=world)
                err = rel_err(got[name], want) if name == "out" else grad_err(got[name], want)
                assert err <= TOL[dtype], (case, rank, name, err)
                checked += 1
    assert checked == world * sum(1 if _forward_only(c) else 4 for c in _cases())


@pytest.mark.parametrize("world", [2, 3], ids=["W2", "W3"])
def test_bad_setups_raise_on_every_rank(spawned, world):
    per_rank = spawned[world]
    expect = {"disagree": "disagree on query shard length, kv shard length", "ring_grad": "forward-only",
              "ring_sparse_grad": "forward-only", "zigzag_odd": "must be even",
              **{f"stochastic_{spec}": "one random stream" for spec in STOCHASTIC}}
    for rank, saved in enumerate(per_rank):
        for name, words in expect.items():
            msg = saved["errors"][name]
            assert msg is not None and words in msg, (rank, name, msg)


# ----------------------------------------------------------------------------------------------------
# without spawning


def test_positions_and_shard_cover_the_sequence():
    x = torch.arange(24.0).view(1, 1, 24, 1)
    for layout in cp.LAYOUTS:
        for world in (1, 2, 3):
            pos = [cp.positions(24, layout=layout, rank=r, world_size=world) for r in range(world)]
            assert sorted(torch.cat(pos).tolist()) == list(range(24)), (layout, world)
            for r in range(world):
                got = cp.shard(x, layout=layout, rank=r, world_size=world).flatten()
                assert torch.equal(got, pos[r].float()), (layout, world, r)
    zig = cp.positions(12, layout="zigzag", rank=0, world_size=3).tolist()
    assert zig == [0, 1, 10, 11]  # chunks 0 and 2W-1 = 5 of 2-element chunks


@pytest.mark.parametrize("call, err, words", [
    (lambda x: cp.shard(x, layout="zigzag", rank=0, world_size=5), ValueError, "10 equal pieces"),
    (lambda x: cp.shard(x, layout="allgather", rank=0, world_size=5), ValueError, "pad it to a multiple of 5"),
    (lambda x: cp.shard(x, layout="llama3", rank=0, world_size=2), ValueError, "layout must be one of"),
    (lambda x: cp.shard(x, rank=2, world_size=2), ValueError, "0 <= rank < world_size"),
    (lambda x: cp.shard(x, rank=0), ValueError, "both rank and world_size"),
    (lambda x: cp.shard(x, dim=4, rank=0, world_size=2), ValueError, "dim must be an int"),
], ids=["zigzag-uneven", "allgather-uneven", "bad-layout", "bad-rank", "half-override", "bad-dim"])
def test_shard_errors(call, err, words):
    x = torch.zeros(1, 2, 12, 4)
    with pytest.raises(err, match=words):
        call(x)


def test_attention_errors_without_group():
    q, k, v, _, kpm = _inputs(torch.float32)
    with pytest.raises(ValueError, match="not initialized"):
        cp.attention(q, k, v, enable_gqa=True)
    with pytest.raises(ValueError, match="layout must be one of"):
        cp.attention(q, k, v, enable_gqa=True, layout="ulysses")
    with pytest.raises(TypeError, match="key_padding_mask must be a bool"):
        cp.attention(q, k, v, enable_gqa=True, key_padding_mask=kpm.float())
    with pytest.raises(ValueError, match="S_local"):
        cp.attention(q, k, v, enable_gqa=True, key_padding_mask=kpm[:, :5])
    with pytest.raises(ValueError, match="enable_gqa"):
        cp.attention(q, k, v)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_rank_group_is_the_plain_call(tmp_path, backend):
    """W = 1 (no communication; the zigzag chunks call attention on key prefixes with causal="lower_right"):
    the same numbers as flashmaps.attention on both backends, and shard/unshard are identities."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        q, k, v, dout, kpm = _inputs(torch.float32)
        case = ("entmax15", True, "zigzag", True, torch.float32)
        got = _forward_backward(lambda q_, k_, v_: cp.attention(q_, k_, v_, "entmax15", causal=True,
                                                                layout="zigzag", key_padding_mask=kpm,
                                                                enable_gqa=True, backend=backend), q, k, v, dout)
        tol = TOL[torch.float32] if backend == "torch" else 1e-4  # the kernels sum in another order
        for a, b in zip(got, _reference(case)):
            assert grad_err(a, b) <= tol
        assert torch.equal(cp.unshard(cp.shard(q, layout="zigzag"), layout="zigzag"), q)
    finally:
        dist.destroy_process_group()


def test_lazy_attribute():
    assert flashmaps.distributed is cp
    assert "distributed" in dir(flashmaps)
