"""The benchmark harness: sweeps, the measuring worker process, tags, results files and tables.

    jobs = sweep(device="cpu", providers=[...], seqs=[256, 512], modes=["fwd"])
    rows = run_jobs(jobs, out_dir)       # list of dicts, one per job (failures included, with a status)
    write_results(rows, out_dir, "bench")  # bench.json + bench.csv, every row tagged

Each row: provider, family, normalizer, backend, mode, B, Hq, Hkv, L, S, Dqk, Dv, causal, dtype, status
("ok", "unavailable", "unsupported", "oom", "timeout", "crash", "error", "skipped"), message, time_ms (median),
time_q20_ms, time_q80_ms, n_runs, flops (``flops.attention_flops``), tflops, gbps (decode: K/V bytes read per
second; device-copy: read + written), peak_mem_bytes (extra peak of
one call), err / err_note / sparsity (checked jobs), suite (the gpucheck suite), config (pinned kernel
configs), knobs, tree (git sha of the checkout that ran it), tuned (autotuner choices made during the job),
cudagraph_ms (jobs with ``cudagraph``, on CUDA: the device-only time of the same call, replayed from a CUDA graph),
and the tags: device, device_kind, git_sha, date, versions.

Before/after in one run: ``add_baseline(jobs, DIR)`` adds, next to each flashmaps job, the same job run from
the checkout DIR (provider "<name>@base", its own worker process importing DIR's flashmaps and kernels;
see ``trees``), alternating which of the two goes first from case to case.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import itertools
import json
import os
import platform
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from . import trees
from .providers import BASELINE, Provider, get_provider, optional_versions

__all__ = [
    "device_kind",
    "device_name",
    "tags",
    "default_out_dir",
    "results_root",
    "sweep",
    "run_jobs",
    "write_results",
    "format_table",
    "parse_seq",
    "order_by_case",
    "spread",
    "fmt_spread",
    "trust_warnings",
    "end_load",
    "add_baseline",
    "prewarm",
]

ROW_FIELDS = (
    "provider", "family", "normalizer", "backend", "mode", "B", "Hq", "Hkv", "L", "S", "Dqk", "Dv", "causal",
    "dtype", "status", "message", "time_ms", "time_q20_ms", "time_q80_ms", "n_runs", "flops", "tflops",
    "gbps", "peak_mem_bytes", "err", "err_note", "sparsity", "suite", "config", "knobs", "tree", "tuned",
    "cudagraph_ms", "block_sparsity", "inputs",
)
FAILED = ("oom", "timeout", "crash")


# ----------------------------------------------------------------------------------------------------
# device and tags


def device_kind(requested: str | None = None) -> str:
    """"cuda" when a GPU is present (or requested), else "cpu"."""
    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device; use --device cpu")
    return requested


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(kind: str) -> str:
    """"NVIDIA H100 80GB HBM3" or "<cpu model> (<n> cores)"."""
    if kind == "cuda":
        return torch.cuda.get_device_name()
    return f"{_cpu_model()} ({os.cpu_count()} cores)"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "device"


def _package_root() -> Path:
    return Path(__file__).resolve().parent.parent


def git_sha() -> str:
    """HEAD of the checkout the package runs from (+ "-dirty" with uncommitted changes), or "unknown";
    FLASHMAPS_GIT_SHA overrides it (for a copy of a checkout without its history, e.g. on a lent GPU)."""
    return os.environ.get("FLASHMAPS_GIT_SHA") or trees.git_sha(_package_root())


def versions() -> dict[str, str | None]:
    """Versions of python, torch, triton, numpy, flashmaps and the optional baselines."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "numpy", "flashmaps"):
        try:
            out[name] = str(__import__(name).__version__)
        except Exception:
            out[name] = None
    out.update(optional_versions())
    return out


def tags(kind: str) -> dict:
    """The tags every results row carries: device, git sha, date (UTC, ISO 8601), library versions (and on
    the CPU the 1-minute load average when the run started)."""
    t = {
        "device": device_name(kind),
        "device_kind": kind,
        "git_sha": git_sha(),
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
    if kind == "cpu" and hasattr(os, "getloadavg"):  # a shared CPU's timings depend on the other load
        t["load_avg_1min"] = round(os.getloadavg()[0], 2)
    t.update({f"version_{k}": v for k, v in versions().items()})
    return t


def results_root() -> Path:
    """Where a user's runs write when no --out is given: $FLASHMAPS_RESULTS, else ./flashmaps-results (never the
    repository's committed bench/results/: a developer moves results there with --out)."""
    env = os.environ.get("FLASHMAPS_RESULTS")
    return Path(env) if env else Path.cwd() / "flashmaps-results"


def default_out_dir(kind: str) -> Path:
    """<results_root()>/<device>, e.g. ./flashmaps-results/cpu-amd-epyc-2-cores."""
    return results_root() / _slug(("cuda-" if kind == "cuda" else "cpu-") + device_name(kind))


# ----------------------------------------------------------------------------------------------------
# sweeps


def parse_seq(text: str) -> int:
    """"4096", "4k", "128K" -> int."""
    t = str(text).strip().lower()
    mult = 1024 if t.endswith("k") else 1
    try:
        n = int(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise ValueError(f"bad sequence length {text!r}; write e.g. 4096 or 4k") from None
    if n < 1:
        raise ValueError(f"sequence length must be >= 1, got {text!r}")
    return n


def sweep(
    *,
    device: str,
    providers: list[Provider],
    seqs,
    modes=("fwd",),
    batches=(1,),
    heads=(8,),
    kv_heads=(None,),
    head_dims=(64,),
    causals=(None,),
    dtypes=("float32",),
    tokens: int | None = None,
    **extra,
) -> list[dict]:
    """The cross product as a list of jobs, ordered so that each (provider, mode, shape) group runs its
    sequence lengths in increasing order (the harness skips what would surely fail or take too long).

    ``batches`` entries may be "auto": then B = max(1, tokens // seq). ``kv_heads`` None means = heads.
    "decode" jobs run with L = 1 and no causal mask (one row of a KV cache sees every key).
    """
    jobs = []
    for prov, mode, b, h, hkv, d, causal, dt in itertools.product(
        providers, modes, batches, heads, kv_heads, head_dims, causals, dtypes
    ):
        if mode == "decode" and causal is not None:
            continue
        for s in sorted(set(seqs)):
            B = max(1, (tokens or s) // s) if b == "auto" else int(b)
            Hkv = h if hkv is None else hkv
            jobs.append(dict(
                provider=prov.name, mode=mode, B=B, Hq=h, Hkv=Hkv, L=s, S=s, Dqk=d, Dv=d, causal=causal,
                dtype=dt, device=device, **extra,
            ))
            if prov.time_order != 2:  # a linear-time form: --max-call-s extrapolates its time linearly
                jobs[-1]["time_order"] = prov.time_order
    return jobs


def _group_key(job: dict) -> tuple:
    return tuple(job[k] for k in ("provider", "mode", "Hq", "Hkv", "Dqk", "Dv", "causal", "dtype"))


def order_by_case(jobs: list[dict]) -> list[dict]:
    """The jobs reordered case by case: every provider of one case (mode and shape) before the next case,
    so that a drift of the machine (clocks, other load) hits all providers alike. Cases keep the order in
    which their shape group first appears, lengths increase within a group (the skip rules need that) and
    providers keep their order."""
    def rank(values):
        return {v: i for i, v in reversed(list(enumerate(values)))}

    shape = rank([tuple(str(j.get(k)) for k in ("suite", "dtype", "Dqk", "Dv", "Hq", "Hkv", "causal")) for j in jobs])
    mode = rank([j["mode"] for j in jobs])
    prov = rank([j["provider"] for j in jobs])

    def key(j):
        s = tuple(str(j.get(k)) for k in ("suite", "dtype", "Dqk", "Dv", "Hq", "Hkv", "causal"))
        return (shape[s], j["S"], j["L"], mode[j["mode"]], prov[j["provider"]])

    return sorted(jobs, key=key)


#: the tree label of the jobs ``add_baseline`` adds (provider "<name>@base")
BASE_LABEL = "base"


def add_baseline(jobs: list[dict], root, sha: str | None = None, label: str = BASE_LABEL) -> list[dict]:
    """``jobs`` with a twin of every flashmaps job, run from the checkout ``root``: provider "<name>@<label>",
    ``tree`` = that checkout's git sha (or ``sha``), ``tree_root`` = its folder. Each twin is placed next to
    its job, before it in every other case; every job gets its ``tree`` tag."""
    root = str(Path(root).resolve())
    trees.package_dirs(root)  # raises if root is no checkout of flashmaps
    sha = sha or trees.git_sha(root)
    here = git_sha()
    out, flip = [], False
    last_case = None
    for job in jobs:
        case = tuple(job.get(k) for k in ("suite", "mode", "B", "Hq", "Hkv", "L", "S", "Dqk", "Dv", "causal", "dtype"))
        if case != last_case:
            flip, last_case = not flip, case
        job = dict(job, tree=job.get("tree") or here)
        if not job["provider"].startswith("flashmaps-"):
            out.append(job)
            continue
        twin = dict(job, provider=f"{job['provider']}@{label}", tree=sha, tree_root=root)
        out += [job, twin] if flip else [twin, job]
    return out


# ----------------------------------------------------------------------------------------------------
# running jobs in a worker process


class _Worker:
    """``python -m flashmaps.bench.worker`` with a reader thread, so that a hung job can time out."""

    def __init__(self, env: dict, log, mapping: dict):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flashmaps.bench.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=log, text=True, env=trees.child_env(mapping, env), bufsize=1,
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)  # EOF: the worker died or exited

    def run(self, job: dict, timeout: float):
        """The result row, or ("dead", returncode) / ("timeout", None)."""
        from .worker import RESULT_PREFIX

        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                return ("timeout", None)
            if line is None:
                return ("dead", self.proc.wait())
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX):])

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _worker_env(kind: str, mem_limit: int | None, threads: int | None, extra: dict | None = None) -> dict:
    env = dict(os.environ, **(extra or {}))
    if threads:
        env["FLASHMAPS_BENCH_THREADS"] = str(int(threads))
    if kind == "cuda":
        env.pop("TRITON_INTERPRET", None)  # time the compiled kernels, never the interpreter
    if kind == "cpu" and mem_limit:
        env["FLASHMAPS_BENCH_MEM_LIMIT"] = str(int(mem_limit))
    return env


def default_mem_limit() -> int | None:
    """80 % of the memory available now (CPU cases larger than that fail cleanly as "oom")."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * 0.8)
    except OSError:
        pass
    return None


def _skip_reason(job: dict, history: dict, max_call_s: float) -> str | None:
    """Skip a case larger than one that already failed, or one whose extrapolated time is too long."""
    prev = history.get(_group_key(job))
    if prev is None:
        return None
    if prev["status"] in FAILED:
        return f"skipped: a smaller case (S={prev['S']}) ended with {prev['status']}"
    if prev["status"] == "ok" and prev.get("time_ms"):
        ratio = job["S"] / prev["S"]
        scale = ratio if job["mode"] == "decode" else ratio ** job.get("time_order", 2)
        scale *= job["B"] / prev["B"]
        est = prev["time_ms"] * 1e-3 * scale
        if est > max_call_s:
            return (f"skipped: about {est:.0f} s per call extrapolated from S={prev['S']} "
                    f"(limit --max-call-s {max_call_s:g})")
    return None


def run_jobs(
    jobs: list[dict],
    *,
    log_path: Path | None = None,
    timeout: float = 600.0,
    max_call_s: float = 30.0,
    mem_limit: int | None = None,
    threads: int | None = None,
    progress: bool = True,
    desc: str = "bench",
    partial_path: Path | None = None,
    interrupted: list | None = None,
    deadline: float | None = None,
    env: dict | None = None,
) -> list[dict]:
    """Run ``jobs`` in worker processes (one per tree: a job's ``tree_root`` names another checkout, see
    :func:`add_baseline`; restarted after a crash or a timeout); one row per job.

    ``log_path`` gets the workers' stderr and one line per job; ``partial_path`` (JSON lines) gets each row
    as soon as it is measured. ``deadline`` (a ``time.monotonic()`` value): the jobs not started by then
    are recorded as skipped, and a job running then is stopped there. ``env``: extra environment variables
    of the workers. An interrupt (KeyboardInterrupt) stops the run and returns the rows measured so far;
    the number of rows is then appended to ``interrupted`` (if given)."""
    interrupted = [] if interrupted is None else interrupted
    if not jobs:
        return []
    kind = jobs[0]["device"]
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    partial = open(partial_path, "w") if partial_path else None
    bar = _progress(len(jobs), desc, progress)
    rows, history, workers = [], {}, {}
    worker_env = _worker_env(kind, mem_limit, threads, env)
    try:
        for job in jobs:
            bar.set_postfix_str(f"{job['provider']} {job['mode']} S={job['S']}")
            left = None if deadline is None else deadline - time.monotonic()
            reason = "skipped: time budget spent" if left is not None and left <= 0 else \
                _skip_reason(job, history, max_call_s)
            if reason:
                row = dict(job, status="skipped", message=reason)
            else:
                root = job.get("tree_root")
                if root not in workers:
                    mapping = trees.loaded_mapping() if root is None else trees.baseline_mapping(root)
                    workers[root] = _Worker(worker_env, log, mapping)
                case_timeout = timeout if left is None else min(timeout, left)
                res = workers[root].run(job, case_timeout)
                if isinstance(res, tuple):
                    what, rc = res
                    workers.pop(root).kill()
                    if what == "timeout":
                        row = dict(job, status="timeout", message=f"no result within {case_timeout:g} s" + (
                            " (end of the time budget)" if case_timeout < timeout else ""))
                    else:
                        st = "oom" if rc in (-9, 137) else "crash"
                        row = dict(job, status=st, message=f"worker process died (exit code {rc})")
                else:
                    row = res
                    if row.pop("restart_worker", False):
                        workers.pop(root).kill()
                history[_group_key(job)] = row
            rows.append(row)
            bar.update(1)
            if log_path:
                t = f"{row['time_ms']:.3f} ms" if row.get("time_ms") else ""
                log.write(f"[{len(rows)}/{len(jobs)} {time.strftime('%H:%M:%S')}] {job['provider']} {job['mode']} "
                          f"B={job['B']} H={job['Hq']} S={job['S']} D={job['Dqk']} causal={job['causal']} "
                          f"{job['dtype']}: {row['status']} {t} {row.get('message') or ''}\n")
                log.flush()
            if partial:
                partial.write(json.dumps(row, default=str) + "\n")
                partial.flush()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (see interruptible): keep what was measured
        for w in workers.values():
            w.kill()
        workers.clear()
        if log_path:
            log.write(f"interrupted after {len(rows)} of {len(jobs)} cases\n")
        interrupted.append(len(rows))
    finally:
        bar.close()
        if partial:
            partial.close()
        for w in workers.values():
            w.close()
        if log_path:
            log.close()
    return rows


def prewarm_jobs(jobs: list[dict], max_len: int = 512) -> list[dict]:
    """One compile-ahead job (``warm_only``, L = S <= ``max_len``, B = 1) per distinct flashmaps Triton
    kernel setup among ``jobs``: the kernels do not depend on the length, so the real cases then find
    them compiled in Triton's cache."""
    out, seen = [], set()
    for job in jobs:
        prov = get_provider(job["provider"])
        if prov.family != "flashmaps" or prov.backend != "triton":
            continue
        s = min(job["S"], max_len)
        warm = dict(job, B=1, L=min(job["L"], s), S=s, warm_only=True, check=False, check_rows=None)
        key = tuple(str(warm.get(k)) for k in ("provider", "tree_root", "mode", "Hq", "Hkv", "L", "S", "Dqk",
                                                "Dv", "causal", "dtype"))
        if key not in seen:
            seen.add(key)
            out.append(warm)
    return out


def prewarm(jobs: list[dict], n_procs: int, log_stem: Path | None = None, deadline: float | None = None,
            **kw) -> list[dict]:
    """Compile the flashmaps Triton kernels of ``jobs`` ahead, in ``n_procs`` worker processes at once
    (:func:`prewarm_jobs`, split round-robin; logs ``<log_stem>-prewarm-<i>.log``); returns their rows
    (status "ok" = compiled and ran once)."""
    from concurrent.futures import ThreadPoolExecutor

    warm = prewarm_jobs(jobs)
    n = max(1, min(n_procs, len(warm)))
    shards = [warm[i::n] for i in range(n)]

    def one(i):
        log = Path(f"{log_stem}-prewarm-{i}.log") if log_stem else None
        return run_jobs(shards[i], log_path=log, progress=False, max_call_s=float("inf"), deadline=deadline, **kw)

    with ThreadPoolExecutor(n) as pool:
        return [row for rows in pool.map(one, range(n)) for row in rows] if warm else []


class _NoBar:
    def set_postfix_str(self, *_):
        pass

    def update(self, *_):
        pass

    def close(self):
        pass


@contextlib.contextmanager
def interruptible():
    """Within this block SIGTERM (e.g. from ``timeout``) raises KeyboardInterrupt, like Ctrl-C, so that a
    stopped sweep still writes the results it has."""
    got = []

    def handler(signum, frame):
        # GNU timeout signals the process and then its process group: the second SIGTERM must not
        # interrupt the writing of the results, so further ones are ignored from here on
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        got.append(signum)
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        if not got:
            signal.signal(signal.SIGTERM, old)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bench extra is not installed: no bar, same results
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="case", file=sys.stderr, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------------
# results


def write_results(rows: list[dict], out_dir: Path, name: str, meta: dict, extra: dict | None = None,
                  fields: tuple[str, ...] = ROW_FIELDS) -> tuple[Path, Path]:
    """``<out>/<name>.json`` ({"meta", "rows", **extra}) and ``<out>/<name>.csv``, every row tagged with
    ``meta`` (``extra``: more top-level entries of the JSON, not copied into the rows). ``fields``: the
    columns every row has, first (default: the benchmark rows' ``ROW_FIELDS``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    first = tuple(fields)
    tagged = [{**{k: r.get(k) for k in first}, **{k: v for k, v in r.items() if k not in first
              and k not in meta and k != "device"}, **meta} for r in rows]
    jpath, cpath = out_dir / f"{name}.json", out_dir / f"{name}.csv"
    jpath.write_text(json.dumps({"meta": meta, "rows": tagged, **(extra or {})}, indent=1, default=str) + "\n")
    fields = list(first) + sorted({k for r in tagged for k in r} - set(first) - set(meta)) + list(meta)

    def cell(v):
        if v is None:
            return ""
        return json.dumps(v, default=str) if isinstance(v, (dict, list)) else v

    with open(cpath, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in tagged:
            w.writerow({k: cell(r.get(k)) for k in fields})
    return jpath, cpath


#: a row whose 20-80 % time spread exceeds this fraction of its median is flagged as noisy
NOISY_SPREAD = 0.25
#: a CPU whose 1-minute load average exceeds this fraction of its cores is flagged as loaded
LOADED_FRACTION = 0.5


def spread(row: dict) -> float | None:
    """(q80 - q20) / median of a row's times, or None."""
    t, lo, hi = row.get("time_ms"), row.get("time_q20_ms"), row.get("time_q80_ms")
    if not t or lo is None or hi is None:
        return None
    return (hi - lo) / t


def fmt_spread(row: dict) -> str | None:
    x = spread(row)
    return None if x is None else f"±{50 * x:.0f}%"


def trust_warnings(rows: list[dict], meta: dict) -> list[str]:
    """What says the timings of a run should not be trusted: rows whose spread is over `NOISY_SPREAD`, a
    CPU already loaded when the run started (load average over `LOADED_FRACTION` of the cores), and
    contradictions (fwd+bwd faster than fwd of the same case). One line each."""
    out = []
    cores = os.cpu_count() or 1
    start = meta.get("load_avg_1min")         # the end load counts the run's own threads: recorded, not judged
    if start is not None and start > LOADED_FRACTION * cores:
        out.append(f"the machine was loaded when the run started (1-minute load average {start:g} on {cores} "
                   "cores): other processes took CPU time, so the times are high and noisy; rerun on a quiet machine")
    noisy = [r for r in rows if r.get("status") == "ok" and (spread(r) or 0) > NOISY_SPREAD]
    for r in noisy[:8]:
        out.append(f"noisy: {r['provider']} {r['mode']} S={r['S']}: 20-80 % of the runs span "
                   f"{r['time_q20_ms']:.3g}-{r['time_q80_ms']:.3g} ms around a median of {r['time_ms']:.3g} ms")
    if len(noisy) > 8:
        out.append(f"noisy: {len(noisy) - 8} more rows")
    key = ("provider", "B", "Hq", "Hkv", "L", "S", "Dqk", "Dv", "causal", "dtype")
    fwd = {tuple(r.get(k) for k in key): r for r in rows if r.get("mode") == "fwd" and r.get("status") == "ok"}
    for r in rows:
        f = fwd.get(tuple(r.get(k) for k in key))
        if r.get("mode") == "fwd+bwd" and r.get("status") == "ok" and f and r["time_ms"] < f["time_ms"]:
            out.append(f"contradiction: {r['provider']} S={r['S']}: fwd+bwd {r['time_ms']:.3g} ms < fwd "
                       f"{f['time_ms']:.3g} ms (noise larger than the difference)")
    return out


def end_load(meta: dict) -> dict:
    """meta with the 1-minute load average at the end of the run (CPU)."""
    if meta.get("device_kind") == "cpu" and hasattr(os, "getloadavg"):
        meta = dict(meta, load_avg_1min_end=round(os.getloadavg()[0], 2))
    return meta


def load_rows(path: Path) -> tuple[dict, list[dict]]:
    """(meta, rows) from a results JSON written by :func:`write_results`."""
    data = json.loads(Path(path).read_text())
    return data.get("meta", {}), data["rows"]


def baseline_of(rows: list[dict], row: dict, baseline: str = BASELINE) -> dict | None:
    """The ``baseline`` provider's ok row for the same mode and shape as ``row``."""
    keys = ("mode", "B", "Hq", "Hkv", "L", "S", "Dqk", "Dv", "causal", "dtype")
    for r in rows:
        if r["provider"] == baseline and r.get("status") == "ok" and all(r.get(k) == row.get(k) for k in keys):
            return r
    return None


def fmt_value(v) -> str:
    """A table cell: "-" for None, floats to 3 significant digits (whole numbers from 1000 on)."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return str(v)


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain text table: ``columns`` = [(header, key)], values already formatted or formatted here."""
    cells = [[h for h, _ in columns]] + [[fmt_value(r.get(k)) for _, k in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt_bytes(n) -> str | None:
    if n is None:
        return None
    return f"{n / 2**20:.1f} MiB"
