"""Host cost per call (issue 17): the microseconds flashmaps spends in Python and torch per attention call on its
CUDA code path, up to the kernel launches, measured without a GPU.

    python -m flashmaps.bench.host [--out FILE] [--baseline FILE] [--rounds N] [--calls N] [--profile CASE]
                                   [--phases CASE] [--length N]

Method: every Triton launch is stubbed (``JITFunction.run`` returns at once; on an autotune-cache miss the
autotuner's timing is stubbed too and picks its first pruned candidate, once, in the warm-up), the inputs are
CPU tensors, and flashmaps takes its Triton backend as on CUDA (the functional layer is told that the Triton
path may run off CUDA, as under ``TRITON_INTERPRET=1``, and that ``backend="auto"`` means Triton; the kernels
stay compiled-mode ``JITFunction`` objects, so the autotuned launch path is the GPU's). Timed is everything
flashmaps does per call: argument checks, backend choice, the autograd.Function, the op plumbing, the launch
setup (hooks, bundles, buffers), the autotuner lookup, and the torch ops between the launches (which on the
CPU compute: the backward's zeroed dQ accumulator and its cast are most of fwd+bwd's arithmetic here, a few
launches on CUDA); not Triton's own argument binding and driver launch (unchanged by flashmaps).
"aten ops" counts the torch ops one call dispatches (each a launch or an allocation on CUDA).
``--device meta`` runs on meta tensors instead (no arithmetic at all, but torch's meta versions of stack,
where and any are Python code, slower than the CPU's): a data-dependent host sync (``.item()``) fails there.
``--python-only`` excludes the aten ops' execution (the CPU arithmetic, and torch's C++ dispatch with it): a
dispatch mode times each op and the per-call figure is the CPU time minus the ops' time minus the mode's own
overhead per op (calibrated on a trivial op, `_mode_overhead_ns`), i.e. the Python frames of flashmaps, of the
autograd.Function and of torch's Python layer; on CUDA add about one launch per "aten ops".

Cases at B=1, H=8, L=S=1024, D=64, bf16, for softmax and entmax15:

    fwd        flashmaps.attention(q, k, v, norm) under torch.no_grad()
    fwd-grad   the same with q, k, v requiring grad (the graph built, no backward)
    fwd+bwd    out = flashmaps.attention(...); out.backward(dout)
    sdpa       flashmaps.sdpa(q, k, v, normalizer=norm) under torch.no_grad()

Each case runs ``--calls`` calls per round, the cases interleaved round by round (so that the other load of a
shared machine hits all alike); the table gives the median and the minimum over rounds of the CPU time per call
(this thread's, torch on one thread: other processes' load changes the wall time, hardly this).
Writes JSON (device, versions, git sha, date, load average, per-case figures) to --out (default
./flashmaps-results/host.json; the committed figures are in bench/results/cpu/host/).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import json
import os
import pstats
import statistics
import time
from pathlib import Path

import torch

SHAPE = dict(B=1, H=8, L=1024, S=1024, D=64)
NORMALIZERS = ("softmax", "entmax15")
MODES = ("fwd", "fwd-grad", "fwd+bwd", "sdpa")


# ----------------------------------------------------------------------------------------------------
# the stubbed launch


def stub_launches() -> None:
    """Make every Triton kernel launch a no-op and every autotune a pick of the first pruned candidate."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    JITFunction.run = lambda self, *args, **kwargs: None
    # equal timings: min() keeps the first pruned candidate
    Autotuner._bench = lambda self, *args, config, **meta: [0.0, 0.0, 0.0]


def allow_triton_off_cuda() -> None:
    """Let the functional layer take the Triton backend for non-CUDA tensors (its ``TRITON_INTERPRET`` check),
    after the kernels were made (compiled-mode ``JITFunction``, not the interpreter's), and choose it for
    ``backend="auto"`` as it does for CUDA tensors."""
    from flashmaps import functional

    os.environ["TRITON_INTERPRET"] = "1"      # what the functional layer read per call before issue 17
    if hasattr(functional, "_TRITON_OFF_CUDA"):
        functional._TRITON_OFF_CUDA = True
    choose = functional._choose_backend

    def triton_for_auto(backend, device, dtype):   # "auto" picks Triton for CUDA tensors: so here too
        return choose("triton" if backend == "auto" else backend, device, dtype)

    functional._choose_backend = triton_for_auto


def setup() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the benchmark needs the compiled-mode kernels (their "
                         "launches are stubbed)")
    import flashmaps  # noqa: F401  (the kernels are made here, in compiled mode)
    import flashmaps.triton_path  # noqa: F401

    stub_launches()
    allow_triton_off_cuda()


# ----------------------------------------------------------------------------------------------------
# cases


def make_case(norm: str, mode: str, device: str = "cpu", dtype=torch.bfloat16):
    """A no-argument function running one call of the case (see the module docstring)."""
    import flashmaps

    B, H, L, S, D = (SHAPE[k] for k in ("B", "H", "L", "S", "D"))
    grad = mode in ("fwd-grad", "fwd+bwd")
    q, k, v = (torch.empty(B, H, n, D, device=device, dtype=dtype).requires_grad_(grad) for n in (L, S, S))
    dout = torch.empty(B, H, L, D, device=device, dtype=dtype)
    if mode == "fwd":
        def call():
            with torch.no_grad():
                flashmaps.attention(q, k, v, norm)
    elif mode == "fwd-grad":
        def call():
            flashmaps.attention(q, k, v, norm)
    elif mode == "fwd+bwd":
        def call():
            q.grad = k.grad = v.grad = None
            flashmaps.attention(q, k, v, norm).backward(dout)
    elif mode == "sdpa":
        def call():
            with torch.no_grad():
                flashmaps.sdpa(q, k, v, normalizer=norm)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return call


def _aten_timer():
    """A dispatch mode that sums the CPU time of the aten ops run under it (``.ns``) and counts them (``.n``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    clock = time.thread_time_ns

    class AtenTimer(TorchDispatchMode):
        ns = 0
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            t0 = clock()
            try:
                return func(*args, **(kwargs or {}))
            finally:
                AtenTimer.ns += clock() - t0
                AtenTimer.n += 1

    return AtenTimer


def _mode_overhead_ns(reps: int = 20000) -> float:
    """The CPU time `_aten_timer`'s mode adds to one aten op (its Python frame and clock reads): a trivial op
    timed with and without the mode."""
    x = torch.zeros(1)
    best = []
    for _ in range(3):
        t0 = time.thread_time_ns()
        for _ in range(reps):
            x.view(-1)
        plain = time.thread_time_ns() - t0
        with _aten_timer()():
            t0 = time.thread_time_ns()
            for _ in range(reps):
                x.view(-1)
            moded = time.thread_time_ns() - t0
        best.append((moded - plain) / reps)
    return min(best)


def measure(cases: dict, rounds: int, calls: int, python_only: bool = False) -> dict:
    """{name: [us per call, one per round]}, the cases interleaved round by round (after two warm-up calls).
    The time is this thread's CPU time (torch runs on one thread here): on a shared machine the other
    processes' load lengthens the wall time of a call, not the CPU time it uses. ``python_only``: minus the
    aten ops' own time and the timing mode's overhead per op (see the module docstring)."""
    for fn in cases.values():
        fn()
        fn()
    overhead = _mode_overhead_ns() if python_only else 0.0
    times = {name: [] for name in cases}
    for r in range(rounds):
        for name in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
            fn = cases[name]
            gc.collect()
            timer = _aten_timer() if python_only else None
            with timer() if python_only else contextlib.nullcontext():
                t0 = time.thread_time_ns()
                for _ in range(calls):
                    fn()
                ns = time.thread_time_ns() - t0
            if python_only:
                ns -= timer.ns + timer.n * overhead
            times[name].append(ns / calls / 1e3)
    return times


def count_ops(fn) -> int:
    """The aten ops one call dispatches (each one a kernel launch or an allocation on CUDA, some
    microseconds of host time there), after a first call (what a process does once is not counted)."""
    fn()
    timer = _aten_timer()
    with timer():
        fn()
    return timer.n


def profile(fn, calls: int, top: int = 30) -> str:
    fn()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    import io

    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("cumulative").print_stats(top)
    return out.getvalue()


#: (label, owner module or class name, function) wrapped by `phases`; the phases are their differences
_PHASE_FUNCS = (("A", "flashmaps", "attention"), ("B", "flashmaps.ops", "attention"),
                ("C", "flashmaps.ops", "_fwd_impl"), ("D", "flashmaps.triton_path", "launch_forward"),
                ("E", "flashmaps.triton_path", "_setup"), ("F", "flashmaps.triton_path", "_launch"),
                ("G", "torch.Tensor", "backward"), ("H", "flashmaps.ops", "_backward"),
                ("I", "flashmaps.ops", "_bwd_impl"), ("J", "flashmaps.triton_path", "launch_backward"),
                ("K", "flashmaps.triton_path", "bwd_rows_buffers"))


def phases(fn, rounds: int, calls: int) -> list[tuple[str, float]]:
    """[(phase, us per call)] of one case: the functions of `_PHASE_FUNCS` wrapped with timers (this thread's CPU
    time, inclusive), the minimum over rounds, differenced into phases (a wrapper adds well under a microsecond;
    `_setup` and `_launch` run in the forward and the backward alike: half of each is given to each side)."""
    import functools
    import importlib

    acc: dict = {}
    clock = time.thread_time_ns
    saved = []
    for label, owner_name, name in _PHASE_FUNCS:
        owner = torch.Tensor if owner_name == "torch.Tensor" else importlib.import_module(owner_name)
        f = getattr(owner, name)

        def timed(*a, _f=f, _label=label, **kw):
            t0 = clock()
            try:
                return _f(*a, **kw)
            finally:
                acc[_label] = acc.get(_label, 0) + clock() - t0

        saved.append((owner, name, f))
        setattr(owner, name, functools.wraps(f)(timed))
    try:
        for _ in range(3):
            fn()
        best: dict = {}
        for _ in range(rounds):
            acc.clear()
            gc.collect()
            t0 = clock()
            for _ in range(calls):
                fn()
            acc["T"] = clock() - t0
            for k, v in acc.items():
                best[k] = min(best.get(k, float("inf")), v / calls / 1e3)
    finally:
        for owner, name, f in saved:
            setattr(owner, name, f)
    g = best.get
    both = 2 if "G" in best else 1
    rows = [("argument checks, parse, backend choice (functional.attention)", g("A", 0) - g("B", 0)),
            ("ops.attention and the autograd.Function's forward side", g("B", 0) - g("C", 0)),
            ("ops._fwd_impl (the op's plumbing)", g("C", 0) - g("D", 0)),
            ("launch_forward: _setup (hooks, bundles)", g("E", 0) / both),
            ("launch_forward: _launch (autotune lookup, launch)", g("F", 0) / both),
            ("launch_forward: the rest (buffers, views, launch arguments)", g("D", 0) - (g("E", 0) + g("F", 0)) / both)]
    if both == 2:
        rows += [("Tensor.backward and the autograd engine (torch)", g("G", 0) - g("H", 0)),
                 ("ops._backward (saved tensors, context)", g("H", 0) - g("I", 0)),
                 ("ops._bwd_impl (stats, kwargs, output strides)", g("I", 0) - g("J", 0)),
                 ("launch_backward: _setup", g("E", 0) / 2), ("launch_backward: _launch (dK/dV)", g("F", 0) / 2),
                 ("launch_backward: bwd_rows_buffers (its zeros compute on the CPU)", g("K", 0)),
                 ("launch_backward: the rest (preprocess launch, dk, dv, the dq cast)",
                  g("J", 0) - g("K", 0) - (g("E", 0) + g("F", 0)) / 2)]
    return rows + [("the whole call (the bench's loop and the wrappers included)", g("T", 0))]


def summarize(times: dict, ops: dict) -> list[dict]:
    rows = []
    for name, ts in times.items():
        norm, mode = name.split(" ", 1)
        q = statistics.quantiles(ts, n=5, method="inclusive") if len(ts) >= 2 else [ts[0]] * 4
        rows.append({"case": name, "normalizer": norm, "mode": mode, "us_median": round(statistics.median(ts), 1),
                     "us_min": round(min(ts), 1), "us_q20": round(q[0], 1), "us_q80": round(q[3], 1),
                     "rounds": len(ts), "aten_ops": ops[name]})
    return rows


def table(rows: list[dict], base: dict | None = None) -> str:
    head = f"{'case':<22}{'median us':>11}{'min us':>9}{'q20-q80 us':>15}{'aten ops':>10}"
    if base:
        head += f"{'before med':>12}{'before min':>12}{'min now/before':>16}{'ops before':>12}"
    lines = [head]
    for r in rows:
        line = f"{r['case']:<22}{r['us_median']:>11.1f}{r['us_min']:>9.1f}{r['us_q20']:>7.1f}-{r['us_q80']:<7.1f}"
        line += f"{r['aten_ops']:>10}"
        b = (base or {}).get(r["case"])
        if b:
            line += (f"{b['us_median']:>12.1f}{b['us_min']:>12.1f}{r['us_min'] / b['us_min']:>16.2f}"
                     f"{b.get('aten_ops', ''):>12}")
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashmaps.bench.host", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default ./flashmaps-results/host.json)")
    ap.add_argument("--baseline", type=Path, default=None, help="an earlier results file: add its figures")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=200, help="calls per case and round")
    ap.add_argument("--normalizers", nargs="+", default=list(NORMALIZERS))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--profile", default=None, metavar="CASE",
                    help="print cProfile's cumulative top of one case ('softmax fwd') instead of timing")
    ap.add_argument("--device", default="cpu", choices=("cpu", "meta"),
                    help="the inputs' device: cpu (default; the torch ops between the launches compute) or meta "
                    "(no arithmetic, but torch implements some meta ops in Python: stack, where, any)")
    ap.add_argument("--python-only", action="store_true",
                    help="exclude the aten ops' execution (CPU arithmetic and C++ dispatch): the Python frames only")
    ap.add_argument("--label", default="", help="a note stored in the results (e.g. 'before')")
    ap.add_argument("--phases", default=None, metavar="CASE",
                    help="print where one case's host time goes ('softmax fwd+bwd'; see `phases`) instead of timing")
    ap.add_argument("--length", type=int, default=None, help="L = S of the cases (default 1024)")
    args = ap.parse_args(argv)
    setup()
    from . import harness

    if args.length:
        SHAPE.update(L=args.length, S=args.length)
    if args.phases:
        torch.set_num_threads(1)
        norm, mode = args.phases.split(" ", 1)
        print(f"| phase ({args.phases}, L=S={SHAPE['L']}) | us per call |\n|---|---|")
        for name, us in phases(make_case(norm, mode, args.device), args.rounds, args.calls):
            print(f"| {name} | {us:.1f} |")
        return 0
    if args.profile:
        norm, mode = args.profile.split(" ", 1)
        print(profile(make_case(norm, mode, args.device), args.calls))
        return 0
    torch.set_num_threads(1)
    cases = {f"{n} {m}": make_case(n, m, args.device) for n in args.normalizers for m in args.modes}
    meta = harness.tags("cpu")
    ops = {name: count_ops(fn) for name, fn in cases.items()}
    rows = summarize(measure(cases, args.rounds, args.calls, args.python_only), ops)
    base = None
    if args.baseline:
        base = {r["case"]: r for r in json.loads(args.baseline.read_text())["rows"]}
    print(f"host cost per call, B={SHAPE['B']} H={SHAPE['H']} L=S={SHAPE['L']} D={SHAPE['D']} bf16, launches "
          f"stubbed, {args.device} tensors{', aten ops excluded' if args.python_only else ''}; {args.rounds} rounds x "
          f"{args.calls} calls; {meta['device']}, load "
          f"{meta.get('load_avg_1min')}")
    print(table(rows, base))
    out = args.out or harness.results_root() / "host.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta.update(label=args.label, tensors=args.device, python_only=args.python_only, shape=SHAPE, dtype="bfloat16",
                rounds=args.rounds, calls=args.calls,
                method="launches stubbed (JITFunction.run no-op), Triton backend path as on CUDA; "
                       "per-call us = the thread's CPU time of a round / calls; median and min over rounds")
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
