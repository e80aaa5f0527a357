"""The kernels compile for the H100 (sm_90) on a machine without a GPU (`scripts/sm90-compile`: Triton's
bundled ptxas, no launch). CI has no GPU; this catches what the interpreter cannot: compile errors, shared
memory over the limit, kernels that stop building for the real target, and a serialized wgmma pipeline."""

import os
import pathlib
import subprocess
import sys

import pytest

import flashmaps

ROOT = pathlib.Path(__file__).resolve().parent.parent
H100_SMEM = 232448


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_every_kernel_compiles_for_sm90(causal):
    """Full attention with the deterministic backward (bwd-dkdv, bwd-dq), causal with the atomic dQ (bwd-dkdvq:
    the default backward, one compile per run to bound the cost)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "scripts" / "sm90-compile"), "--dims", "64"]
    cmd += ["--causal", "--atomic-dq"] if causal else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [ln.split() for ln in proc.stdout.splitlines()[1:] if ln.strip()]
    kernels = {(r[0], r[2]) for r in rows}
    for norm in (n.spec for n in flashmaps.defaults() if n.has_triton):
        for kernel in ("fwd", "bwd-pre") + (("bwd-dkdvq",) if causal else ("bwd-dkdv", "bwd-dq")):
            assert (norm, kernel) in kernels, (norm, kernel, proc.stdout)
    for r in rows:
        assert int(r[5]) <= H100_SMEM, r     # shared memory within the H100's limit
        # ptxas serialized the wgmma pipeline (a full wait after each product; any reason code); regression: every
        # non-causal forward and dQ kernel had C7515 while their loops could run zero times (issue 17)
        assert r[-1] != "wgmma-serialized", r
        # of the backward kernels only the atomic-dQ one has global atomics (its dQ tile adds)
        red = int(next(w for w in r if w.startswith("RED:")).split(":")[1])
        assert not r[2].startswith("bwd") or (red > 0) == (r[2] == "bwd-dkdvq"), r


def test_taylor_linear_kernels_compile_for_sm90_without_forward_spills():
    """kernels/linear.py at D = 16, Dv = 64, causal (`sm90-compile --linear 16`): the kernels build within
    the shared memory, the forward ones keep their fp32 state in registers (no stack) and the backward spills at
    most a few hundred bytes (136 when TRITON_AUTO_MAX_D was set to 16; D = 32 spills kilobytes)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "scripts" / "sm90-compile"), "--norms", "taylor", "--dims", "16", "--causal",
           "--linear", "16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r[2]: r for r in (ln.split() for ln in proc.stdout.splitlines()) if r and r[0] == "taylor-lin"}
    assert set(rows) == {"lin-piece", "lin-fwd", "lin-row-piece", "lin-bwd"}, proc.stdout
    stack = {name: int(next(w for w in r if w.startswith("STACK:")).split(":")[1]) for name, r in rows.items()}
    assert all(int(r[5]) <= H100_SMEM for r in rows.values()), rows
    assert stack["lin-fwd"] == stack["lin-piece"] == stack["lin-row-piece"] == 0 and stack["lin-bwd"] <= 512, stack


def test_varlen_kernels_compile_for_sm90():
    """The one-launch packed-sequence kernels (Static.VARLEN, `sm90-compile --varlen`: the early exits of programs
    past their sequence, the per-sequence Dims) build for sm_90 with an unserialized wgmma pipeline; a lower-right
    window covers the causal and the left-bound code."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "scripts" / "sm90-compile"), "--norms", "softmax", "--dims", "64", "--varlen",
           "--window", "64,0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [ln.split() for ln in proc.stdout.splitlines()[1:] if ln.strip()]
    assert {(r[0], r[2]) for r in rows} == {("softmax", k) for k in ("fwd", "bwd-pre", "bwd-dkdv", "bwd-dq")}, proc.stdout
    for r in rows:
        assert int(r[5]) <= H100_SMEM and r[-1] != "wgmma-serialized", r


def test_causal_deterministic_dkdv_is_not_serialized():
    """The deterministic dK/dV kernel, causal (its two loops), which `test_every_kernel_compiles_for_sm90` does not
    build: reading the non-finite rule's head flag after the loops made ptxas serialize its wgmma pipeline (C7515)
    for every dense unit (found in the regenerated offline report, session 6); the flag is now read first."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "scripts" / "sm90-compile"), "--norms", "softmax,taylor", "--dims", "64",
           "--causal"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [ln.split() for ln in proc.stdout.splitlines()[1:] if ln.strip()]
    assert {(r[0], r[2]) for r in rows} >= {(n, "bwd-dkdv") for n in ("softmax", "taylor")}, proc.stdout
    for r in rows:
        assert r[-1] != "wgmma-serialized", r
