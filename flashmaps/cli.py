"""The ``flashmaps`` command (also ``python -m flashmaps``).

    flashmaps compare [--out DIR]   the normalizers side by side on this machine: error vs the float64
                                    reference, time and extra peak memory vs torch SDPA, sparsity
    flashmaps compare --task mqar|drift
                                    what they learn: MQAR recall of a tiny model trained per normalizer
                                    (--preset quick|full), drift of a pretrained MiniLM's embeddings
    flashmaps bench [--normalizers ...] [--seq ...] [--modes ...] [--out DIR]
                                    the long-sequence sweep: TFLOP/s, time quantiles, memory per provider
    flashmaps plot RESULTS.json     redraw the PNGs of a bench/compare results file (e.g. from another machine)
    flashmaps info                  versions, device, backends and optional providers
    flashmaps gpu-check OUTDIR      on a CUDA machine: the CUDA tests, then benchmark suites (h100-goals,
                                    long, tune), optionally against a second checkout; --cpu-smoke runs
                                    every code path on the CPU (python -m flashmaps.bench.gpucheck)

Results (JSON + CSV, every row tagged with device, versions, git sha and date) and PNG plots go to --out,
by default ./flashmaps-results/<device>/ ($FLASHMAPS_RESULTS/<device>/ if set); the repository's committed
bench/results/ change only when --out names them. Every argument error is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import sys
from pathlib import Path

__all__ = ["main"]


# ----------------------------------------------------------------------------------------------------
# argument helpers


def _split(values) -> list[str]:
    """["256,512", "1k"] -> ["256", "512", "1k"] (lists may be given space- or comma-separated)."""
    out = []
    for v in values or []:
        out += [x for x in str(v).split(",") if x.strip()]
    return out


def _split_names(values) -> list[str]:
    """_split for provider names: commas inside [...] options belong to the name."""
    out = []
    for v in values or []:
        out += [x for x in re.split(r",(?![^\[]*\])", str(v)) if x.strip()]
    return out


def _causal(text: str):
    t = text.strip().lower()
    table = {"none": None, "no": None, "false": None, "0": None, "full": None, "true": "upper_left",
             "yes": "upper_left", "upper_left": "upper_left", "lower_right": "lower_right"}
    if t not in table:
        raise argparse.ArgumentTypeError(f"causal must be none, upper_left (= true) or lower_right, got {text!r}")
    return table[t]


_DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16", "half": "float16",
           "bf16": "bfloat16", "bfloat16": "bfloat16", "fp64": "float64", "float64": "float64"}


def _dtype(text: str) -> str:
    t = text.strip().lower()
    if t not in _DTYPES:
        raise argparse.ArgumentTypeError(f"dtype must be one of fp32, bf16, fp16, fp64, got {text!r}")
    return _DTYPES[t]


def _positive_float(text) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}") from None
    if not (x > 0 and x < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return x


def _positive_int(text) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``flashmaps <command>: error: <what to do>`` and exit status 2 (the usage
    is in --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _convert(values, fn, what):
    out = []
    for v in _split(values):
        try:
            out.append(fn(v))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            msg = str(exc)
            raise _UsageError(msg if msg.startswith(what) else f"{what}: {msg}") from None
    return out


def _normalizers(values) -> list[str]:
    from .normalizers import parse

    return _convert(values, lambda s: parse(s, argname="--normalizers").spec, "--normalizers")


def _normalizers_help() -> str:
    from .bench.providers import default_normalizers

    return ("normalizer specs of any registered normalizer (topk:<k> for top-k); default: one default instance "
            f"of each ({' '.join(default_normalizers())})")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results/<device>/ in a "
                   "checkout, else ./flashmaps-results/<device>/)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if present")
    p.add_argument("--normalizers", nargs="+", default=None, help=_normalizers_help())
    p.add_argument("--dtype", nargs="+", default=None, help="fp32 bf16 fp16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--min-run-time", type=_positive_float, default=None,
                   help="CPU: seconds of timed runs per case (torch.utils.benchmark blocked_autorange)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads in the measuring process "
                   "(default: torch's default, all cores)")
    p.add_argument("--timeout", type=_positive_float, default=600.0,
                   help="seconds one case may take before it is abandoned")
    p.add_argument("--no-plot", action="store_true", help="write JSON/CSV only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="flashmaps", description="flashmaps: attention with pluggable normalizers. "
                                 "Benchmarks and comparisons of the normalizers against torch SDPA and a float64 "
                                 "reference.")
    sub = ap.add_subparsers(dest="command", metavar="{compare,bench,plot,info,gpu-check}")

    c = sub.add_parser("compare", help="the normalizers side by side: error, time and memory vs SDPA, sparsity",
                       description="Each normalizer (flashmaps, default backend of the device) and the baselines "
                       "(torch SDPA, entmax package over materialized scores) at one shape: relative error vs the "
                       "float64 reference, time and extra peak memory vs SDPA, fraction of exact zero weights.")
    _add_common(c)
    c.add_argument("--seq", default=None, help="L = S (default 1024 on CPU, 8192 on CUDA; '4k' works)")
    c.add_argument("--batch", type=_positive_int, default=None, help="default 1 on CPU, 2 on CUDA")
    c.add_argument("--heads", type=_positive_int, default=None, help="query heads (default 8 on CPU, 16 on CUDA)")
    c.add_argument("--kv-heads", type=_positive_int, default=None, help="key/value heads (GQA; default = heads)")
    c.add_argument("--head-dim", type=_positive_int, default=None, help="default 64 on CPU, 128 on CUDA")
    c.add_argument("--causal", type=_causal, default=None, help="none (default), upper_left or lower_right")
    c.add_argument("--modes", nargs="+", default=None,
                   help="fwd, bwd, fwd+bwd (default fwd on CPU, fwd fwd+bwd on CUDA)")
    c.add_argument("--backend", choices=("torch", "triton"), default=None,
                   help="flashmaps backend (default: triton on CUDA, torch on CPU)")
    c.add_argument("--inputs", choices=("random", "structured"), default="random",
                   help="N(0, 1) inputs (default), or q, k from a few strong directions per 64-block, where whole "
                   "64 x 64 tiles of the sparse normalizers are dead (column 'dead 64x64')")
    from .bench.tasks import add_arguments as add_task_arguments  # --task mqar / drift and their options

    add_task_arguments(c)

    b = sub.add_parser("bench", help="the sweep over sequence lengths, modes and providers",
                       description="Sweep providers x modes x shapes; record time (median, 20/80 percent quantiles), "
                       "TFLOP/s (bench/flops.py) and extra peak memory; plot against sequence length.")
    _add_common(b)
    b.add_argument("--seq", nargs="+", default=None,
                   help="sequence lengths L = S (default CPU 256..16k, CUDA 512..128k, powers of two)")
    b.add_argument("--modes", nargs="+", default=None, help="fwd bwd fwd+bwd decode (default: all four)")
    b.add_argument("--providers", nargs="+", default=None,
                   help="provider names or globs, e.g. 'flashmaps-*' sdpa 'sdpa-*' flex entmax15-dense (default: all); "
                   "a name with options adds that provider, e.g. 'flashmaps-softmax-triton[fwd=128,64,8,3]'")
    b.add_argument("--batch", nargs="+", default=None,
                   help="batch sizes, or 'auto' = tokens // seq (default: 1 on CPU, auto on CUDA)")
    b.add_argument("--tokens", type=_positive_int, default=None, help="for --batch auto (default 16384)")
    b.add_argument("--heads", nargs="+", default=None, help="query heads (default 8 on CPU, 16 on CUDA)")
    b.add_argument("--kv-heads", nargs="+", default=None, help="key/value heads (GQA; default = heads)")
    b.add_argument("--head-dim", nargs="+", default=None, help="head dims (default 64 on CPU, 128 on CUDA)")
    b.add_argument("--causal", nargs="+", default=None,
                   help="none upper_left lower_right (default: none on CPU, none upper_left on CUDA)")
    b.add_argument("--max-call-s", type=_positive_float, default=None,
                   help="skip a case whose time per call, extrapolated from the previous length, exceeds this "
                   "(default 20 on CPU, 5 on CUDA)")

    p = sub.add_parser("plot", help="draw the PNGs of a results file", description="Redraw the plots of a "
                       "bench.json or compare.json (a separate step, e.g. for results measured elsewhere).")
    p.add_argument("results", type=Path, help="bench.json or compare.json")
    p.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: next to the results)")

    i = sub.add_parser("info", help="versions, device, backends, optional providers")
    i.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    _add_gpucheck(sub)
    return ap


def _add_gpucheck(sub) -> None:
    from .bench.suites import SUITES

    g = sub.add_parser(
        "gpu-check", help="on a CUDA machine: the CUDA tests, then benchmark suites, as one results file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The CUDA tests (pytest -m cuda), then the benchmark suites through the one harness "
        "(worker processes, do_bench medians and quantiles), as OUTDIR/gpu-check-<time>.json/.csv with logs; a "
        "ratio table is printed last, with the seconds of each phase.\n\nsuites:\n  h100-goals  bf16, D 128 "
        "and 64, L = S 1k 4k 16k, causal and not, fwd and fwd+bwd: flashmaps (softmax's fwd+bwd also with the "
        "deterministic backward, entmax15's with the block mask; softmax's and entmax15's fwd also through TMA), "
        "SDPA (default, flash, cudnn), "
        "flex\n  long        L = S = 128k, every normalizer, fwd and fwd+bwd, sampled-row error\n  tune        "
        "block configs of the forward and backward kernels and the pre-pass variants at L = S = 8k\n  "
        "taylor-linear  taylor's Triton linear kernel vs its quadratic one and SDPA flash, D 16, causal, L = S "
        "16k-128k\n\n"
        "examples:\n  flashmaps gpu-check out --prewarm 8 --long\n  flashmaps gpu-check out --no-tests "
        "--providers 'flashmaps-softmax-*' --baseline-tree ../old   # before/after, case by case\n  "
        "flashmaps gpu-check out --suites tune --no-tests --prewarm 12\n  flashmaps gpu-check --cpu-smoke")
    g.add_argument("outdir", nargs="?", type=Path, help="results folder (a temporary one for --cpu-smoke)")
    g.add_argument("--suites", nargs="+", default=None, metavar="NAME",
                   help=f"benchmark suites, of: {', '.join(SUITES)} (default h100-goals; --cpu-smoke: all)")
    g.add_argument("--long", action="store_true", help="add the long suite")
    what = g.add_mutually_exclusive_group()
    what.add_argument("--no-tests", "--bench-only", dest="no_tests", action="store_true", help="skip the tests")
    what.add_argument("--tests-only", action="store_true", help="only the tests")
    g.add_argument("--tests", default=None, metavar="EXPR", help="pytest -k EXPR: a subset of the CUDA tests")
    g.add_argument("--test-files", nargs="+", default=None, metavar="FILE",
                   help="test files (default tests/; --cpu-smoke: tests/test_api.py)")
    g.add_argument("--pytest-args", default=None, help="more pytest arguments, written --pytest-args='-n 4 -x' (default '-n 6'; --cpu-smoke: none)")
    g.add_argument("--test-timeout", type=_positive_float, default=150.0, help="seconds for the tests (default 150)")
    g.add_argument("--normalizers", nargs="+", default=None, help=_normalizers_help())
    g.add_argument("--providers", nargs="+", default=None, metavar="NAME",
                   help="keep only these providers (names or globs, e.g. 'flashmaps-softmax-*' sdpa)")
    g.add_argument("--knobs", nargs="+", default=None, metavar="PATH=VALUE",
                   help="set on every flashmaps provider, e.g. flashmaps.kernels.topk.COLLECT=True")
    g.add_argument("--dims", nargs="+", default=None, help="head dims of h100-goals and tune (default 128 64)")
    g.add_argument("--lengths", nargs="+", default=None, help="L = S of h100-goals (default 1k 4k 16k)")
    g.add_argument("--modes", nargs="+", default=None, help="modes of h100-goals (default fwd fwd+bwd)")
    g.add_argument("--baseline-tree", type=Path, default=None, metavar="DIR",
                   help="a second checkout (e.g. a git worktree of an older commit): every flashmaps case also "
                   "runs from it, next to this tree's ('<provider>@base'), and a now/base table is printed")
    g.add_argument("--baseline-sha", default=None, help="the tree tag of --baseline-tree (default: its git HEAD)")
    g.add_argument("--prewarm", type=int, default=None, metavar="N",
                   help="compile the flashmaps kernels in N processes first (default 0; --cpu-smoke: 2)")
    g.add_argument("--budget", type=_positive_float, default=450.0, metavar="SECONDS",
                   help="for the whole run; cases not started by then are recorded as skipped (default 450)")
    g.add_argument("--timeout", type=_positive_float, default=300.0, help="seconds one case may take (default 300)")
    g.add_argument("--cpu-smoke", action="store_true",
                   help="every code path on the CPU: Triton interpreted, tiny shapes, about a minute; no GPU needed")
    g.add_argument("--table", type=Path, default=None, metavar="JSON", help="print the Markdown tables of a results file")
    g.add_argument("--plot", nargs=2, type=Path, default=None, metavar=("JSON", "DIR"), help="PNG plots of a results file")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


# ----------------------------------------------------------------------------------------------------
# commands


def _kind(args) -> str:
    from .bench.harness import device_kind

    try:
        return device_kind(args.device)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None


def _out_dir(args, kind: str) -> Path:
    from .bench.harness import default_out_dir

    out = args.out if args.out is not None else default_out_dir(kind)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _UsageError(f"--out: cannot create the results folder {str(out)!r}: {exc.strerror}") from None
    return out


def _plots(fn, rows, out: Path, meta: dict) -> list[Path]:
    try:
        return fn(rows, out, meta)
    except ImportError as exc:
        print(f"(no plots: {exc}; pip install 'flashmaps[bench]')", file=sys.stderr)
        return []


def _unavailable_row(prov, kind: str) -> dict:
    return dict(provider=prov.name, family=prov.family, normalizer=prov.normalizer, backend=prov.backend,
                device=kind, status="unavailable", message=prov.unavailable(kind))


def cmd_compare(args) -> int:
    from .bench.tasks import dispatch

    status = dispatch(args)  # --task mqar / drift: run there; kernels: continue here
    if status is not None:
        return status
    from .bench import compare as cmp
    from .bench.harness import default_mem_limit, interruptible, parse_seq, tags, write_results
    from .bench.plot import plot_compare
    kind = _kind(args)
    d = cmp.DEFAULTS[kind]
    dtypes = _convert(args.dtype, _dtype, "--dtype") or [d["dtype"]]
    if len(dtypes) != 1:
        raise _UsageError("compare takes one --dtype")
    modes = _split(args.modes) or list(d["modes"])
    for m in modes:
        if m not in ("fwd", "bwd", "fwd+bwd"):
            raise _UsageError(f"--modes: compare runs fwd, bwd, fwd+bwd; got {m!r}")
    seqs = _convert([args.seq], parse_seq, "--seq") if args.seq else [d["L"]]
    if len(seqs) != 1:
        raise _UsageError(f"--seq: compare runs one length, got {args.seq!r} (flashmaps bench sweeps lengths)")
    L = seqs[0]
    H = args.heads or d["H"]
    if args.kv_heads and H % args.kv_heads:
        raise _UsageError(f"--heads {H} must be a multiple of --kv-heads {args.kv_heads}")
    jobs = cmp.compare_jobs(
        device=kind, normalizers=_normalizers(args.normalizers) or None, backend=args.backend,
        B=args.batch or d["B"], H=H, Hkv=args.kv_heads, L=L, D=args.head_dim or d["D"], dtype=dtypes[0],
        causal=args.causal, modes=modes, max_ref_elems=d["max_ref_elems"],
        min_run_time=args.min_run_time if args.min_run_time is not None else d["min_run_time"],
        inputs=getattr(args, "inputs", "random"),
    )
    out = _out_dir(args, kind)
    meta = tags(kind)
    print(f"flashmaps compare on {meta['device']} (torch {meta['version_torch']}, git {meta['git_sha'][:12]})",
          flush=True)
    stopped: list = []
    with interruptible():
        rows = cmp.run_compare(jobs, out, timeout=args.timeout, threads=args.threads, interrupted=stopped,
                               mem_limit=default_mem_limit() if kind == "cpu" else None,
                               progress=not args.no_progress)
    print(cmp.table(rows))
    meta, extra = _warn(rows, meta)
    jpath, cpath = write_results(rows, out, "compare", meta, extra)
    (out / "compare.partial.jsonl").unlink(missing_ok=True)
    pngs = [] if args.no_plot else _plots(plot_compare, rows, out, meta)
    print(f"\nresults: {jpath}  {cpath}" + "".join(f"\nplot:    {p}" for p in pngs))
    return _interrupted_status(stopped, len(jobs))


def _warn(rows: list[dict], meta: dict) -> tuple[dict, dict]:
    """Print what says the times should not be trusted; return (meta with the end load, the results file's
    extra entries: {"warnings": [...]})."""
    from .bench.harness import end_load, trust_warnings

    meta = end_load(meta)
    warnings = trust_warnings(rows, meta)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return meta, {"warnings": warnings}


def _interrupted_status(stopped: list, n_jobs: int) -> int:
    if stopped:
        print(f"interrupted: {stopped[0]} of {n_jobs} cases measured (the files above hold those)", file=sys.stderr)
        return 130
    return 0


_BENCH_DEFAULTS = {
    "cpu": dict(seq=[256 << i for i in range(7)], batch=["1"], heads=[8], head_dim=[64], causal=[None],
                dtype=["float32"], max_call_s=20.0, tokens=16384),
    "cuda": dict(seq=[512 << i for i in range(9)], batch=["auto"], heads=[16], head_dim=[128],
                 causal=[None, "upper_left"], dtype=["bfloat16"], max_call_s=5.0, tokens=16384),
}


def cmd_bench(args) -> int:
    from .bench.flops import MODES
    from .bench.harness import (
        default_mem_limit, fmt_bytes, fmt_spread, format_table, interruptible, order_by_case, parse_seq, run_jobs,
        sweep, tags, write_results,
    )
    from .bench.plot import plot_bench
    from .bench.providers import default_normalizers, get_provider, providers_for

    kind = _kind(args)
    d = _BENCH_DEFAULTS[kind]
    norms = _normalizers(args.normalizers) or list(default_normalizers())
    seqs = _convert(args.seq, parse_seq, "--seq") or d["seq"]
    modes = _split(args.modes) or list(MODES)
    for m in modes:
        if m not in MODES:
            raise _UsageError(f"--modes: unknown mode {m!r}; choose from {', '.join(MODES)}")
    batches = _convert(args.batch, lambda s: "auto" if s == "auto" else _positive_int(s), "--batch") or d["batch"]
    heads = _convert(args.heads, _positive_int, "--heads") or d["heads"]
    kv_heads = _convert(args.kv_heads, _positive_int, "--kv-heads") or [None]
    for h in heads:
        for hk in kv_heads:
            if hk is not None and h % hk:
                raise _UsageError(f"--heads {h} must be a multiple of --kv-heads {hk}")
    head_dims = _convert(args.head_dim, _positive_int, "--head-dim") or d["head_dim"]
    causals = _convert(args.causal, _causal, "--causal") or d["causal"]
    dtypes = _convert(args.dtype, _dtype, "--dtype") or d["dtype"]

    provs = providers_for(kind, norms)
    if args.providers:
        pats = _split_names(args.providers)
        provs = [p for p in provs if any(fnmatch.fnmatchcase(p.name, pat) for pat in pats)]
        for pat in pats:  # a name with options ("...[fwd=128,64,8,3]"), or one outside the default list
            # ("device-copy", the bandwidth yardstick of decode rows), adds that provider
            if ("[" in pat and "=" in pat) or (not any(c in pat for c in "*?[")
                                               and not any(p.name == pat for p in provs)):
                try:
                    provs.append(get_provider(pat))
                except ValueError as exc:
                    raise _UsageError(f"--providers: {exc}") from None
        if not provs:
            names = ", ".join(p.name for p in providers_for(kind, norms))
            raise _UsageError(f"--providers {' '.join(pats)} matches none of: {names}")
    unavailable = [p for p in provs if p.unavailable(kind)]
    runnable = [p for p in provs if p not in unavailable]
    timing = {}
    if args.min_run_time is not None:
        timing["min_run_time"] = args.min_run_time
    jobs = order_by_case(sweep(device=kind, providers=runnable, seqs=seqs, modes=modes, batches=batches, heads=heads,
                               kv_heads=kv_heads, head_dims=head_dims, causals=causals, dtypes=dtypes,
                               tokens=args.tokens or d["tokens"], **timing))   # providers interleaved case by case
    out = _out_dir(args, kind)
    meta = tags(kind)
    print(f"flashmaps bench on {meta['device']}: {len(jobs)} cases, {len(runnable)} providers "
          f"({len(unavailable)} unavailable), results in {out}", flush=True)
    rows = [_unavailable_row(p, kind) for p in unavailable]
    stopped: list = []
    with interruptible():
        rows += run_jobs(jobs, log_path=out / "bench.log", partial_path=out / "bench.partial.jsonl",
                         timeout=args.timeout, interrupted=stopped,
                         max_call_s=args.max_call_s if args.max_call_s is not None else d["max_call_s"],
                         mem_limit=default_mem_limit() if kind == "cpu" else None, threads=args.threads,
                         progress=not args.no_progress)
    for r in rows:
        r["mem_s"] = fmt_bytes(r.get("peak_mem_bytes"))
        r["spread_s"] = fmt_spread(r)
        r["status_s"] = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('message') or ''}"[:60]
    cols = [("provider", "provider"), ("mode", "mode"), ("B", "B"), ("H", "Hq"), ("S", "S"), ("D", "Dqk"),
            ("causal", "causal"), ("dtype", "dtype"), ("ms", "time_ms"), ("20-80%", "spread_s"),
            ("TFLOP/s", "tflops"), ("extra peak", "mem_s"), ("status", "status_s")]
    if any(r.get("gbps") for r in rows):     # decode rows: memory bound, K/V GB/s
        cols.insert(-2, ("K/V GB/s", "gbps"))
    print(format_table(rows, cols))
    for r in rows:
        for col in ("mem_s", "spread_s", "status_s"):
            r.pop(col, None)
    meta, extra = _warn(rows, meta)
    jpath, cpath = write_results(rows, out, "bench", meta, extra)
    (out / "bench.partial.jsonl").unlink(missing_ok=True)
    pngs = [] if args.no_plot else _plots(plot_bench, rows, out, meta)
    print(f"\nresults: {jpath}  {cpath}" + "".join(f"\nplot:    {p}" for p in pngs))
    return _interrupted_status(stopped, len(jobs))


def cmd_plot(args) -> int:
    from .bench.compare import summarize
    from .bench.harness import load_rows
    from .bench.plot import plot_bench, plot_compare

    if not args.results.is_file():
        raise _UsageError(f"{args.results} is not a file; pass a bench.json or compare.json written by flashmaps")
    meta, rows = load_rows(args.results)
    out = args.out or args.results.parent
    out.mkdir(parents=True, exist_ok=True)
    is_compare = any(r.get("err") is not None or "time_vs_sdpa" in r for r in rows)
    fn = plot_compare if is_compare else plot_bench
    pngs = _plots(fn, summarize(rows) if is_compare else rows, out, meta)
    print("\n".join(f"plot: {p}" for p in pngs) or "nothing to plot (no ok rows)")
    return 0


def cmd_info(args) -> int:
    from .bench.harness import device_name, format_table, versions
    from .bench.providers import providers_for

    kind = _kind(args)
    import torch

    threads = f", torch threads {torch.get_num_threads()}" if kind == "cpu" else ""
    print(f"device:   {device_name(kind)} [{kind}]{threads}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items() if v) +
          "; not installed: " + (", ".join(k for k, v in versions().items() if not v) or "-"))
    backends = []
    for b in ("torch", "triton"):
        try:
            __import__(f"flashmaps.{b}_path")
            st = "available"
        except Exception as exc:
            st = f"not importable ({type(exc).__name__}: {exc})"[:90]
        if b == "triton" and kind == "cpu":
            st += "; runs on CPU only under TRITON_INTERPRET=1 (tests, not benchmarks)"
        backends.append({"backend": b, "status": st})
    default = "triton" if kind == "cuda" else "torch"
    print(f"backends (default here: {default}):")
    print(format_table(backends, [("backend", "backend"), ("status", "status")]))
    print("benchmark providers:")
    prov_rows = []
    for p in providers_for(kind):
        reason = p.unavailable(kind)
        prov_rows.append({"provider": p.name, "computes": p.normalizer, "status": "available" if not reason else
                          f"unavailable: {reason}"[:100]})
    print(format_table(prov_rows, [("provider", "provider"), ("computes", "computes"), ("status", "status")]))
    return 0


def _knob_args(values) -> dict:
    from .bench.providers import split_name

    out = {}
    for item in values or []:
        path, sep, value = item.partition("=")
        if not sep:
            raise _UsageError(f"--knobs: write PATH=VALUE, got {item!r}")
        try:
            out.update(split_name(f"x[{path}={value}]")[2])
        except ValueError as exc:
            raise _UsageError(f"--knobs: {exc}") from None
    return out


def _gpucheck_options(args):
    import tempfile

    from .bench import gpucheck
    from .bench.flops import MODES
    from .bench.harness import parse_seq
    from .bench.suites import SUITES, Plan

    smoke = args.cpu_smoke
    suites = _split(args.suites) or (list(SUITES) if smoke else ["h100-goals"])
    if args.long and "long" not in suites:
        suites.append("long")
    for name in suites:
        if name not in SUITES:
            raise _UsageError(f"--suites: unknown suite {name!r}; choose from {', '.join(SUITES)}")
    modes = _split(args.modes) or None
    for m in modes or ():
        if m not in MODES:
            raise _UsageError(f"--modes: unknown mode {m!r}; choose from {', '.join(MODES)}")
    base = args.baseline_tree
    if base is not None and not (base / "flashmaps" / "__init__.py").is_file():
        raise _UsageError(f"--baseline-tree {base}: not a checkout of flashmaps (no flashmaps/__init__.py); "
                          "make one with: git worktree add DIR <commit>")
    plan = Plan(device="cpu" if smoke else "cuda", normalizers=tuple(_normalizers(args.normalizers)),
                dims=tuple(_convert(args.dims, _positive_int, "--dims")) or None,
                lengths=tuple(_convert(args.lengths, parse_seq, "--lengths")) or None,
                modes=tuple(modes) if modes else None, smoke=smoke)
    if args.outdir is None and not smoke:
        raise _UsageError("OUTDIR is required (the results folder)")
    knobs = _knob_args(args.knobs)
    if not smoke:
        import torch

        if not torch.cuda.is_available():
            raise _UsageError("torch sees no CUDA device here; --cpu-smoke runs every code path on the CPU")
    outdir = args.outdir or Path(tempfile.mkdtemp(prefix="gpu-check-smoke-"))
    root = Path(__file__).resolve().parent.parent
    return gpucheck.Options(
        outdir=outdir, suites=tuple(suites), plan=plan, providers=tuple(_split_names(args.providers)),
        knobs=knobs, baseline_tree=base, baseline_sha=args.baseline_sha,
        prewarm=args.prewarm if args.prewarm is not None else (2 if smoke else 0), budget=args.budget,
        timeout=args.timeout, tests=not args.no_tests, bench=not args.tests_only, test_expr=args.tests,
        test_files=tuple(args.test_files or ([root / "tests" / "test_api.py"] if smoke else [])),
        pytest_args=args.pytest_args if args.pytest_args is not None else ("" if smoke else "-n 6"),
        test_timeout=args.test_timeout, progress=not args.no_progress,
    )


def cmd_gpucheck(args) -> int:
    from .bench import gpucheck

    if args.table or args.plot:
        path = args.table or args.plot[0]
        try:
            meta, rows = gpucheck.load(path)
        except (OSError, ValueError, KeyError) as exc:
            raise _UsageError(f"{path}: {exc}") from None
        if args.table:
            print(gpucheck.markdown(rows))
        else:
            pngs = _plots(gpucheck.plot, rows, args.plot[1], meta)
            print("\n".join(f"plot: {p}" for p in pngs) or "nothing to plot (no ok rows)")
        return 0
    opts = _gpucheck_options(args)
    res = gpucheck.run_check(opts, echo=lambda line: print(line, flush=True))
    print("\n" + gpucheck.summary(res["rows"]) if res["rows"] else "")
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in res["phases"].items())
    print(f"\n[gpu-check] phases: {phases}\n[gpu-check] results: {res['path']}", flush=True)
    failed_tests = res["tests"] is not None and res["tests"]["returncode"] not in (0, 5)  # 5: none selected
    bad = [r for r in res["rows"] if r["status"] in (gpucheck.BAD if opts.plan.smoke else ("error", "crash"))]
    for r in bad[:20]:
        print(f"[gpu-check] {r['status']}: {r['provider']} {r['mode']} D={r['Dqk']} L={r['L']}: "
              f"{r.get('message')}"[:300], file=sys.stderr)
    return 1 if failed_tests or bad else 0


_COMMANDS = {"compare": cmd_compare, "bench": cmd_bench, "plot": cmd_plot, "info": cmd_info,
             "gpu-check": cmd_gpucheck}


def main(argv=None) -> int:
    """Entry point of the ``flashmaps`` console script; returns the exit status."""
    ap = _parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, one line already printed)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        ap.print_help()
        return 2
    try:
        return _COMMANDS[args.command](args)
    except _UsageError as exc:
        print(f"flashmaps {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
