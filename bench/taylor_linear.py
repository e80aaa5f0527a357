"""The CPU goal of issue 14 (Taylor attention in linear time), measured side by side in one run.

    python -m flashmaps.bench.taylor_linear            (or: python bench/taylor_linear.py)

Problem: B=1, H=8, D=Dv=16, causal, float32, on the CPU.

Time (forward, L = S = 16k): the linear form and the quadratic tile loop of the same function, interleaved in
one subprocess (A B, then B A, ...) after a warm-up call each on a 1k problem, so that the other engineers'
load hits both alike; the speedup is the median over rounds of the per-round time ratio.

    linear      flashmaps.attention(q, k, v, "taylor", causal=True, form="linear")
    quadratic   flashmaps.attention(q, k, v, "taylor", causal=True, form="quadratic")

Memory (the linear form at L = S = 16k and 64k, forward and forward+backward, each in a fresh subprocess):
the process's peak resident set during the call minus the resident set after the inputs (and dout) are
allocated (the method of ``bench/cpu_goal.py``: the peak counter is reset through /proc/self/clear_refs),
and that minus the bytes of what the call returns (out, z, and dq, dk, dv for forward+backward): the
working memory, which must not grow with L.

Decode (``--decode``, its own JSON and PNG): tokens/s of recurrent decoding at growing context P, B=1,
H=8, D=Dv=16: ``TaylorState.step`` (the state built from the P-token prefix) vs the KV-cache call
``flashmaps.attention(q_t, k[:, :, :P+t+1], v[:, :, :P+t+1], "taylor", form="quadratic")`` (one query row
against the cache, a preallocated buffer sliced, no copies), each over the same ``--decode-steps`` tokens.

Goal: linear >= 5x faster than quadratic at 16k; working memory at 64k about the same as at 16k. Writes a
table to the terminal and JSON (device, versions, git sha, date, load average, raw timings) to --out
(default ./flashmaps-results/<device>/taylor_linear.json; the committed figures are in bench/results/cpu/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from flashmaps.bench import harness
from flashmaps.bench.cpu_goal import _peak_kib, _reset_peak, _rss_kib, _version

FORMS = ("linear", "quadratic")
GOAL_SPEEDUP = 5.0


def _inputs(B, H, L, D, grad=False):
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, L, D, generator=g).requires_grad_(grad) for _ in range(3)]


def _call(q, k, v, form):
    import flashmaps

    return flashmaps.attention(q, k, v, "taylor", causal=True, form=form, backend="torch", return_stats=True)


def worker_memory(args) -> dict:
    """The linear form's first full-size call in this fresh process: extra peak memory."""
    import torch

    bwd = args.mode == "fwd+bwd"
    q, k, v = _inputs(args.B, args.H, args.L, args.D, grad=bwd)
    dout = torch.randn(args.B, args.H, args.L, args.D) if bwd else None
    small = _inputs(1, 1, 256, args.D, grad=bwd)  # warm-up: code pages and thread pools are not working memory
    out, _ = _call(*small, "linear")
    if bwd:
        out.sum().backward()
    del small, out
    reset = _reset_peak()
    base_rss, base_peak = _rss_kib(), _peak_kib()
    t0 = time.perf_counter()
    with torch.set_grad_enabled(bwd):
        out, st = _call(q, k, v, "linear")
        if bwd:
            out.backward(dout)
    wall = time.perf_counter() - t0
    extra_kib = _peak_kib() - (base_rss if reset else base_peak)
    results = [out, st["z"]] + ([q.grad, k.grad, v.grad] if bwd else [])
    result_mib = sum(x.numel() * x.element_size() for x in results) / 2**20
    return {"L": args.L, "mode": args.mode, "extra_peak_mib": extra_kib / 1024, "results_mib": result_mib,
            "working_mib": extra_kib / 1024 - result_mib, "wall_s": wall, "peak_reset": reset,
            "threads": torch.get_num_threads()}


def worker_time(args) -> dict:
    import torch

    q, k, v = _inputs(args.B, args.H, args.L, args.D)
    small = _inputs(args.B, args.H, 1024, args.D)
    times = {f: [] for f in FORMS}
    with torch.no_grad():
        outs = {f: _call(*small, f)[0] for f in FORMS}  # warm-up
        for rnd in range(args.repeats):
            for f in (FORMS if rnd % 2 == 0 else FORMS[::-1]):
                t0 = time.perf_counter()
                outs[f] = _call(q, k, v, f)[0]
                times[f].append(time.perf_counter() - t0)
    a, b = outs["linear"].double(), outs["quadratic"].double()
    ratios = [tq / tl for tl, tq in zip(times["linear"], times["quadratic"])]
    return {"times_s": times, "speedup_per_round": ratios,
            "rel_err_linear_vs_quadratic": float((a - b).norm() / b.norm()),
            "threads": torch.get_num_threads()}


def decode(args) -> dict:
    """Tokens/s of TaylorState.step and of the KV-cache call at each context in ``args.decode_ctx``."""
    import torch

    import flashmaps

    B, H, D, n = args.B, args.H, args.D, args.decode_steps
    rows = []
    with torch.no_grad():
        wq, wk, wv = _inputs(B, H, 64, D)  # warm-up of both paths (first-call costs are not throughput)
        flashmaps.TaylorState.from_prefix(wk, wv).step(wq[:, :, 0], wk[:, :, 0], wv[:, :, 0])
        flashmaps.attention(wq[:, :, :1], wk, wv, "taylor", form="quadratic", backend="torch")
        for P in args.decode_ctx:
            q, k, v = _inputs(B, H, P + n, D)
            st = flashmaps.TaylorState.from_prefix(k[:, :, :P], v[:, :, :P])
            t0 = time.perf_counter()
            outs_state = [st.step(q[:, :, t], k[:, :, t], v[:, :, t]) for t in range(P, P + n)]
            t_state = time.perf_counter() - t0
            t0 = time.perf_counter()
            outs_cache = [flashmaps.attention(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], "taylor",
                                              form="quadratic", backend="torch") for t in range(P, P + n)]
            t_cache = time.perf_counter() - t0
            a, b = torch.stack(outs_state, 2).double(), torch.cat(outs_cache, 2).double()
            rows.append({"context": P, "steps": n, "state_tokens_per_s": n / t_state,
                         "kv_cache_tokens_per_s": n / t_cache, "state_bytes": st.memory_bytes(),
                         "kv_cache_bytes": 2 * B * H * (P + n) * D * 4,
                         "rel_err_state_vs_cache": float((a - b).norm() / b.norm())})
            r = rows[-1]
            print(f"  decode  context {P:6d}: state {r['state_tokens_per_s']:9.1f} tok/s "
                  f"({r['state_bytes'] / 2**20:.2f} MiB), KV-cache call {r['kv_cache_tokens_per_s']:9.1f} tok/s "
                  f"({r['kv_cache_bytes'] / 2**20:.1f} MiB), rel err {r['rel_err_state_vs_cache']:.1e}", flush=True)
    return {"rows": rows, "threads": torch.get_num_threads()}


def _plot_decode(rows, path: Path, caption: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctx = [r["context"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ctx, [r["state_tokens_per_s"] for r in rows], "o-", label="TaylorState.step (O(1) state)")
    ax.plot(ctx, [r["kv_cache_tokens_per_s"] for r in rows], "s-", label="KV-cache call (quadratic taylor)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens/s (B=1, H=8, D=16)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.text(0.01, 0.01, caption, fontsize=6)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _meta(args, threads, load_before) -> dict:
    import torch

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": harness.git_sha(),
        "device": {"cpu": harness._cpu_model(), "cores": os.cpu_count(), "threads": threads,
                   "platform": platform.platform()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "flashmaps": _version("flashmaps")},
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }


def _write(record, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


def linear_chunk() -> int:
    from flashmaps import linear

    return linear.CHUNK


def _run_worker(extra, args, L) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--B", str(args.B), "--H", str(args.H), "--D", str(args.D),
           "--L", str(L), *(["--threads", str(args.threads)] if args.threads else []), *extra]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"worker {extra} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--D", type=int, default=16)
    ap.add_argument("--L", type=int, default=16384, help="L = S of the timing (and worker) problem")
    ap.add_argument("--memory-L", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (each runs both forms)")
    ap.add_argument("--out", default=str(harness.default_out_dir("cpu") / "taylor_linear.json"),
                    help="JSON path (default: the harness's results folder, e.g. ./flashmaps-results/<device>/; the "
                    "committed bench/results/cpu/ only when named here); --decode writes taylor_decode.json/.png "
                    "beside it")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every measuring process (default: "
                    "torch's); 1 avoids OpenMP waits when other processes load the cores")
    ap.add_argument("--decode", action="store_true", help="measure decode throughput instead (JSON + PNG)")
    ap.add_argument("--decode-ctx", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--worker-memory", choices=("fwd", "fwd+bwd"), dest="mode", help=argparse.SUPPRESS)
    ap.add_argument("--worker-time", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.mode:
        print(json.dumps(worker_memory(args)))
        return 0
    if args.worker_time:
        print(json.dumps(worker_time(args)))
        return 0

    load_before = os.getloadavg()
    if args.decode:
        res = decode(args)
        out = Path(args.out).with_name("taylor_decode.json")
        record = {"benchmark": "taylor_decode", **_meta(args, res["threads"], load_before),
                  "problem": {"B": args.B, "H": args.H, "D": args.D, "Dv": args.D, "dtype": "float32"},
                  "rows": res["rows"]}
        _write(record, out)
        _plot_decode(res["rows"], out.with_suffix(".png"), f"{record['device']['cpu']} | torch "
                     f"{record['versions']['torch']} | git {record['git_sha'][:12]} | {record['date']}")
        print(f"plot:  {out.with_suffix('.png')}")
        return 0
    memory = []
    for L in args.memory_L:
        for mode in ("fwd", "fwd+bwd"):
            r = _run_worker(["--worker-memory", mode], args, L)
            memory.append(r)
            print(f"  memory  linear L={L:6d} {mode:8s} extra peak {r['extra_peak_mib']:8.1f} MiB, results "
                  f"{r['results_mib']:7.1f} MiB, working {r['working_mib']:7.1f} MiB ({r['wall_s']:.1f} s)", flush=True)
    timing = _run_worker(["--worker-time", "--repeats", str(args.repeats)], args, args.L)
    load_after = os.getloadavg()
    speedup = statistics.median(timing["speedup_per_round"])
    print(f"\nB={args.B} H={args.H} L=S={args.L} D=Dv={args.D} causal float32 forward, {timing['threads']} threads, "
          f"load average {load_before[0]:.2f} -> {load_after[0]:.2f} (other processes share the cores)")
    for f in FORMS:
        print(f"  {f:10s} median {statistics.median(timing['times_s'][f]):8.3f} s   min {min(timing['times_s'][f]):8.3f} s")
    print(f"  linear is {speedup:.1f}x faster than quadratic (goal >= {GOAL_SPEEDUP}x: "
          f"{'met' if speedup >= GOAL_SPEEDUP else 'MISSED'}); rel err linear vs quadratic "
          f"{timing['rel_err_linear_vs_quadratic']:.1e}")
    record = {
        "benchmark": "taylor_linear", **_meta(args, timing["threads"], load_before),
        "problem": {"B": args.B, "H": args.H, "L": args.L, "S": args.L, "D": args.D, "Dv": args.D,
                    "causal": "upper_left", "dtype": "float32", "chunk": linear_chunk()},
        "memory": memory,
        "timing": timing,
        "summary": {"speedup": speedup, "speedup_is": "median over interleaved rounds of the per-round time ratio",
                    "goal_speedup": GOAL_SPEEDUP, "met": speedup >= GOAL_SPEEDUP},
    }
    _write(record, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
