"""The GPU check: the CUDA tests, then benchmark suites through the one harness, as one results file.

    python -m flashmaps.bench.gpucheck OUTDIR [options]     (= flashmaps gpu-check; scripts/gpu-check)
    python -m flashmaps.bench.gpucheck --cpu-smoke OUTDIR   every code path on the CPU, Triton interpreted

Phases, each timed and printed:

1. tests: ``pytest -m cuda`` over tests/ (or ``--test-files``, ``-k --tests``), log in OUTDIR;
2. prewarm (``--prewarm N``): every flashmaps Triton kernel of the plan compiled once at a small length in
   N worker processes at once (``harness.prewarm``), so that the timed cases find them in Triton's cache
   (at most half of the budget left);
3. bench: the suites (``suites.SUITES``: h100-goals, long, tune, taylor-linear, decode) run by ``harness.run_jobs``, case by case;
   with ``--baseline-tree DIR`` each flashmaps case also runs from the checkout DIR, right next to it
   ("<provider>@base", ``harness.add_baseline``). ``--budget`` seconds bound the whole run: cases not
   started by then are recorded as skipped.

Results: OUTDIR/gpu-check-<UTC time>.json (``{"meta", "rows", "run"}``: the harness's rows and tags, and
the tests' summary, phase times and options) and .csv, logs next to them; a short ratio table is printed
last (:func:`summary`). ``--table`` prints the README tables of a results file, ``--plot`` draws it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import fnmatch
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from . import harness, trees
from .providers import get_provider, options_text, split_name, with_options
from .suites import Plan, suite_jobs

__all__ = ["Options", "run_check", "build_jobs", "run_tests", "summary", "markdown", "load", "plot"]

log = logging.getLogger(__name__)

#: statuses that mean the benchmark code (or a kernel) is broken, not that a case cannot run here
BAD = ("error", "crash", "timeout")
#: the worker environment of a smoke run: Triton's interpreter, and the bench providers allowed to use it
SMOKE_ENV = {"TRITON_INTERPRET": "1", "FLASHMAPS_BENCH_INTERPRET": "1"}


@dataclasses.dataclass
class Options:
    """One gpu-check run (see ``flashmaps gpu-check --help`` for each)."""

    outdir: Path
    suites: tuple = ("h100-goals",)
    plan: Plan = dataclasses.field(default_factory=Plan)
    providers: tuple = ()  # names or globs: keep only these (twins follow their provider)
    knobs: dict = dataclasses.field(default_factory=dict)  # set for every flashmaps provider
    baseline_tree: Path | None = None
    baseline_sha: str | None = None
    prewarm: int = 0
    budget: float = 450.0
    timeout: float = 300.0
    tests: bool = True
    bench: bool = True
    test_expr: str | None = None
    test_files: tuple = ()
    pytest_args: str = ""
    test_timeout: float = 150.0
    progress: bool = True


# ----------------------------------------------------------------------------------------------------
# phases


def run_tests(log_path: Path, *, expr: str | None = None, files=(), pytest_args: str = "", timeout: float = 150.0,
              env: dict | None = None) -> dict:
    """``pytest -m cuda`` in this checkout (its tree imported, see ``trees``): the returncode, the summary
    line, the failed tests and the seconds; the whole output goes to ``log_path``."""
    root = harness._package_root()
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "--durations=15",
           *([str(f) for f in files] or [str(root / "tests")]), *(["-k", expr] if expr else []),
           *shlex.split(pytest_args)]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=max(1.0, timeout),
                              env=trees.child_env(trees.loaded_mapping(), dict(os.environ, **(env or {}))))
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        text, rc = out + f"\n[gpu-check] pytest stopped after {timeout:.0f} s\n", 124
    log_path.write_text(" ".join(cmd) + "\n" + text)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    words = (" passed", " failed", " error", " skipped", " deselected", "no tests ran")
    summ = next((ln for ln in reversed(lines) if any(w in ln for w in words)), lines[-1] if lines else "")
    return {"returncode": rc, "summary": summ.strip("= "), "failed": [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))],
            "seconds": round(time.monotonic() - t0, 1), "command": " ".join(cmd[1:]), "log": log_path.name}


def _tree_label(name: str) -> str | None:
    """"base" of "flashmaps-softmax-triton@base", None without a tree label."""
    return split_name(name)[3]


def _untreed(name: str) -> str:
    return name.rsplit("@", 1)[0] if _tree_label(name) else name


def _matches(name: str, patterns) -> bool:
    base = _untreed(name)
    return any(base == p or fnmatch.fnmatchcase(base, p) for p in patterns)


def build_jobs(opts: Options) -> list[dict]:
    """The plan: the suites' jobs, filtered by ``opts.providers``, with ``opts.knobs`` on every flashmaps
    provider, tagged with their tree, and with the baseline tree's twins when ``opts.baseline_tree``."""
    jobs = suite_jobs(opts.suites, opts.plan)
    if opts.providers:
        jobs = [j for j in jobs if _matches(j["provider"], opts.providers)]
    if opts.knobs:
        for j in jobs:
            if j["provider"].startswith("flashmaps-"):
                j["provider"] = with_options(get_provider(j["provider"]), knobs=opts.knobs).name
    if opts.baseline_tree is not None:
        return harness.add_baseline(jobs, opts.baseline_tree, sha=opts.baseline_sha)
    sha = harness.git_sha()
    return [dict(j, tree=sha) for j in jobs]


def _meta(kind: str) -> dict:
    import torch

    meta = harness.tags(kind)
    if kind == "cuda":
        meta["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        meta["version_cuda"] = torch.version.cuda
    return meta


def run_check(opts: Options, echo=log.info) -> dict:
    """Run the phases of ``opts``; ``echo`` gets one line per phase and the tables. Returns {"path" (the
    results JSON), "rows", "tests", "phases" (seconds), "bad" (rows whose status is in BAD)}."""
    t_start = time.monotonic()
    deadline = t_start + opts.budget
    kind = opts.plan.device
    env = SMOKE_ENV if opts.plan.smoke else None
    outdir = Path(opts.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    stem = outdir / f"gpu-check-{stamp}"
    meta = _meta(kind)
    echo(f"[gpu-check] {meta['device']}: torch {meta['version_torch']}, triton {meta['version_triton']}, "
         f"git {meta['git_sha']}" + (" (cpu smoke: Triton interpreted, tiny shapes)" if opts.plan.smoke else ""))
    run = {"options": _jsonable(dataclasses.asdict(opts)), "phases": {}}
    result = {"rows": [], "tests": None, "phases": run["phases"], "bad": []}

    def phase(name, t0):
        run["phases"][name] = round(time.monotonic() - t0, 1)
        echo(f"[gpu-check] phase {name}: {run['phases'][name]:.1f} s")

    def save():
        path, _ = harness.write_results(result["rows"], outdir, stem.name, meta, extra={"run": run})
        result["path"] = path

    if opts.tests:
        t0 = time.monotonic()
        left = deadline - t0
        run["tests"] = result["tests"] = run_tests(
            Path(f"{stem}-pytest.log"), expr=opts.test_expr, files=opts.test_files, pytest_args=opts.pytest_args,
            timeout=min(opts.test_timeout, left), env=env)
        t = run["tests"]
        echo(f"[gpu-check] pytest -m cuda: returncode {t['returncode']}, {t['summary']}")
        for ln in t["failed"][:40]:
            echo("    " + ln[:200])
        phase("tests", t0)
        save()
    if opts.bench:
        jobs = build_jobs(opts)
        run["n_jobs"] = len(jobs)
        if opts.baseline_tree is not None:
            run["baseline_tree"] = {"path": str(Path(opts.baseline_tree).resolve()),
                                    "sha": next((j["tree"] for j in jobs if _tree_label(j["provider"])), None)}
        kw = dict(timeout=opts.timeout, env=env, mem_limit=harness.default_mem_limit() if kind == "cpu" else None)
        if opts.prewarm:
            t0 = time.monotonic()  # at most half of the time left: compiling ahead must not eat the measuring
            warm = harness.prewarm(jobs, opts.prewarm, log_stem=stem, deadline=t0 + (deadline - t0) / 2, **kw)
            run["prewarm"] = {"processes": opts.prewarm, "kernels": len(warm),
                              "not_ok": [f"{r['provider']} {r['mode']} D={r['Dqk']}: {r['status']} {r.get('message')}"[:200]
                                         for r in warm if r["status"] != "ok"]}
            phase("prewarm", t0)
        t0 = time.monotonic()
        echo(f"[gpu-check] bench: {len(jobs)} cases ({', '.join(opts.suites)}), "
             f"{max(0.0, deadline - t0):.0f} s of budget left")
        stopped: list = []
        with harness.interruptible():
            result["rows"] = harness.run_jobs(jobs, log_path=Path(f"{stem}-bench.log"),
                                              partial_path=Path(f"{stem}.partial.jsonl"), deadline=deadline,
                                              progress=opts.progress, desc="gpu-check", interrupted=stopped, **kw)
        run["interrupted"] = bool(stopped)
        phase("bench", t0)
        Path(f"{stem}.partial.jsonl").unlink(missing_ok=True)
    run["phases"]["total"] = round(time.monotonic() - t_start, 1)
    result["bad"] = [r for r in result["rows"] if r["status"] in BAD]
    save()
    return result


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


# ----------------------------------------------------------------------------------------------------
# tables


def _short(name: str) -> str:
    """"flashmaps-softmax-triton[fwd=64,64,4,3]@base" -> "softmax[fwd=64,64,4,3]@base"."""
    base, config, knobs, tree = split_name(name)
    return base.removeprefix("flashmaps-").removesuffix("-triton") + options_text(config, knobs) + (
        f"@{tree}" if tree else "")


def _plain(r: dict) -> bool:
    """A provider without pinned configs, knobs or tree label."""
    return not any(c in r["provider"] for c in "[@")


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok" and r.get("time_ms")]


def _case(r: dict) -> tuple:
    return tuple(r.get(k) for k in ("suite", "mode", "dtype", "Dqk", "Dv", "Hq", "Hkv", "causal", "B", "L", "S"))


def _render(cells: list[dict], columns: list[tuple[str, str]], md: bool) -> str:
    if not md:
        return harness.format_table(cells, columns)
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|---" * len(columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(harness.fmt_value(c.get(k)) for _, k in columns) + " |" for c in cells])


def _x(v) -> str | None:
    return None if v is None else f"{v:.2f}x"


def goal_tables(rows: list[dict], md: bool = False) -> str:
    """Per mode: time (ms) of every plain provider per case, our softmax against the fastest SDPA backend
    and FlexAttention (their time / softmax's: > 1 = softmax faster), each other normalizer's time /
    softmax's. Rows of the sweep suites (not long, not the pinned configs of tune)."""
    ok = [r for r in _ok(rows) if _plain(r) and r.get("suite") not in ("long", "taylor-linear", "decode")]
    out = []
    for suite, mode in dict.fromkeys((r.get("suite"), r["mode"]) for r in ok):
        sub = [r for r in ok if r["mode"] == mode and r.get("suite") == suite]
        provs = list(dict.fromkeys(r["provider"] for r in sub))
        cases: dict = {}
        for r in sub:
            cases.setdefault(_case(r), {})[r["provider"]] = r
        cells = []
        for case, by in cases.items():
            r0 = next(iter(by.values()))
            c = {"D": r0["Dqk"], "causal": "yes" if r0["causal"] else "no", "L": _len(r0["L"]), "B": r0["B"]}
            c.update({_short(p): by[p]["time_ms"] for p in by})
            soft = next((r for r in by.values() if r["family"] == "flashmaps" and r["normalizer"] == "softmax"), None)
            sdpa = [r["time_ms"] for r in by.values() if r["family"] == "sdpa"]
            flex = next((r["time_ms"] for r in by.values() if r["family"] == "flex"), None)
            if soft:
                t = soft["time_ms"]
                c["sm_graph"] = soft.get("cudagraph_ms")
                c["sm_sdpa"] = _x(min(sdpa) / t) if sdpa else None
                c["sm_flex"] = _x(flex / t) if flex else None
                for r in by.values():
                    if r["family"] == "flashmaps" and r is not soft:
                        c[f"{_short(r['provider'])}/sm"] = f"{r['time_ms'] / t:.2f}"
            cells.append(c)
        others = [f"{_short(p)}/sm" for p in provs if any(f"{_short(p)}/sm" in c for c in cells)]
        cols = [("D", "D"), ("causal", "causal"), ("L", "L"), ("B", "B")] + [(_short(p), _short(p)) for p in provs]
        cols += [("softmax CUDA graph (ms)", "sm_graph")] if any(c.get("sm_graph") for c in cells) else []
        cols += [("softmax vs best SDPA", "sm_sdpa")] + ([("softmax vs flex", "sm_flex")] if any(c.get("sm_flex") for c in cells) else [])
        cols += [(f"{k.split('/')[0]} / softmax", k) for k in others]
        title = f"{suite + ' ' if suite else ''}{mode}"
        out.append(f"{'**' if md else '== '}{title}{'**' if md else ' =='} (ms)\n\n" + _render(cells, cols, md))
    return "\n\n".join(out)


def _len(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def baseline_table(rows: list[dict], md: bool = False) -> str:
    """Every case run from both trees: time now / time from the baseline tree (< 1 = faster now), then
    per provider and mode the geometric mean, min and max of that ratio."""
    ok = _ok(rows)
    base = {(_untreed(r["provider"]), _case(r)): r for r in ok if _tree_label(r["provider"])}
    cells, ratios = [], {}
    for r in ok:
        b = base.get((r["provider"], _case(r)))
        if b is None:
            continue
        ratio = r["time_ms"] / b["time_ms"]
        ratios.setdefault((r["provider"], r["mode"]), []).append(ratio)
        cells.append({"provider": _short(r["provider"]), "mode": r["mode"], "D": r["Dqk"],
                      "causal": "yes" if r["causal"] else "no", "L": _len(r["L"]), "now": r["time_ms"],
                      "base": b["time_ms"], "ratio": f"{ratio:.3f}"})
    if not cells:
        return ""
    tree_now = next((r.get("tree") for r in ok if not _tree_label(r["provider"])), "?")
    tree_base = next(iter(base.values())).get("tree")
    head = f"now ({str(tree_now)[:12]}) vs base ({str(tree_base)[:12]}): time now / time base, < 1 = faster now"
    cols = [("provider", "provider"), ("mode", "mode"), ("D", "D"), ("causal", "causal"), ("L", "L"),
            ("now ms", "now"), ("base ms", "base"), ("now/base", "ratio")]
    geo = [{"provider": _short(p), "mode": m, "n": len(v), "geomean": f"{math.exp(sum(map(math.log, v)) / len(v)):.3f}",
            "min": f"{min(v):.3f}", "max": f"{max(v):.3f}"} for (p, m), v in ratios.items()]
    gcols = [("provider", "provider"), ("mode", "mode"), ("cases", "n"), ("geomean now/base", "geomean"),
             ("min", "min"), ("max", "max")]
    return head + "\n\n" + _render(cells, cols, md) + "\n\n" + _render(geo, gcols, md)


def tune_table(rows: list[dict], md: bool = False, top: int = 3) -> str:
    """Rows with pinned configs: per (mode, D, causal, normalizer, knobs) the ``top`` fastest configs."""
    groups: dict = {}
    for r in _ok(rows):
        if r.get("config"):
            key = (r["mode"], r["Dqk"], r["causal"], r["normalizer"], json.dumps(r.get("knobs"), sort_keys=True),
                   _tree_label(r["provider"]))
            groups.setdefault(key, []).append(r)
    cells = []
    for (mode, D, causal, norm, knobs, tree), rs in groups.items():
        rs.sort(key=lambda r: r["time_ms"])
        c = {"mode": mode, "D": D, "causal": "yes" if causal else "no", "normalizer": norm,
             "knobs": ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in (json.loads(knobs) or {}).items()) or None}
        c["tree"] = tree
        for i, r in enumerate(rs[:top]):
            c[f"c{i}"] = f"{options_text(r['config'])} {r['time_ms']:.3f} ms"
        cells.append(c)
    if not cells:
        return ""
    cols = [("mode", "mode"), ("D", "D"), ("causal", "causal"), ("normalizer", "normalizer"), ("knobs", "knobs")]
    cols += [("tree", "tree")] if any(c["tree"] for c in cells) else []
    cols += [(f"#{i + 1}", f"c{i}") for i in range(top)]
    return "fastest pinned configs\n\n" + _render(cells, cols, md)


def long_table(rows: list[dict], md: bool = False) -> str:
    """The long suite: per normalizer fwd / fwd+bwd time, extra peak memory and sampled-row error."""
    sub = [r for r in rows if r.get("suite") == "long"]
    cells: dict = {}
    for r in sub:
        c = cells.setdefault((r["provider"], r["L"]), {"provider": _short(r["provider"]), "L": _len(r["L"])})
        ok = r["status"] == "ok"
        if r["mode"] == "fwd":
            c["fwd"] = r["time_ms"] if ok else r["status"]
            c["err"] = None if r.get("err") is None else f"{r['err']:.1e}"
        else:
            c["fb"] = r["time_ms"] if ok else r["status"]
            c["mem"] = None if not r.get("peak_mem_bytes") else round(r["peak_mem_bytes"] / 2**20)
    if not cells:
        return ""
    cols = [("normalizer", "provider"), ("L = S", "L"), ("fwd ms", "fwd"), ("fwd+bwd ms", "fb"),
            ("extra peak fwd+bwd MiB", "mem"), ("rel. err, sampled rows", "err")]
    return "long context\n\n" + _render(list(cells.values()), cols, md)


def linear_table(rows: list[dict], md: bool = False) -> str:
    """The taylor-linear suite: per mode and L the time of the Triton linear kernel, the quadratic kernel
    and SDPA flash, quadratic / linear (> 1 = linear faster), the linear kernel's TFLOP/s (its own count,
    flops.linear_flops) and its sampled-row error."""
    cells: dict = {}
    for r in (r for r in rows if r.get("suite") == "taylor-linear"):
        c = cells.setdefault((r["mode"], r["L"]), {"mode": r["mode"], "L": _len(r["L"])})
        key = {"linear": "lin", "quadratic": "quad"}.get(r["provider"].rpartition("-")[2], "sdpa")
        c[key] = r["time_ms"] if r["status"] == "ok" else r["status"]
        if key == "lin" and r["status"] == "ok":
            c["tflops"] = None if r.get("tflops") is None else round(r["tflops"], 2)
            c["err"] = None if r.get("err") is None else f"{r['err']:.1e}"
    for c in cells.values():
        if isinstance(c.get("lin"), float) and isinstance(c.get("quad"), float):
            c["speedup"] = _x(c["quad"] / c["lin"])
    if not cells:
        return ""
    cols = [("mode", "mode"), ("L = S", "L"), ("linear ms", "lin"), ("quadratic ms", "quad"),
            ("sdpa-flash ms", "sdpa"), ("quadratic / linear", "speedup"), ("linear TFLOP/s", "tflops"),
            ("rel. err, sampled rows", "err")]
    return "taylor linear form (Triton, D = 16, causal, bf16)\n\n" + _render(list(cells.values()), cols, md)


def _gb(x):
    return None if x is None else (round(x) if x >= 100 else round(x, 2))


def decode_table(rows: list[dict], md: bool = False) -> str:
    """The decode suite: per (B, S) each provider's K/V GB/s and its fraction of the device copy's GB/s
    measured in the same run (the copy reads and writes K and V; decoding reads them once)."""
    sub = [r for r in rows if r.get("suite") == "decode"]
    copy = {(r["B"], r["S"]): r.get("gbps") for r in sub if r["provider"].startswith("device-copy")}
    cells = []
    for r in sub:
        if r["provider"].startswith("device-copy"):
            continue
        bw, ref = r.get("gbps"), copy.get((r["B"], r["S"]))
        cells.append({"provider": _short(r["provider"]), "B": r["B"], "S": _len(r["S"]),
                      "ms": r["time_ms"] if r["status"] == "ok" else r["status"],
                      "gbps": _gb(bw), "copy": _gb(ref),
                      "frac": None if bw is None or not ref else f"{bw / ref:.2f}",
                      "err": None if r.get("err") is None else f"{r['err']:.1e}"})
    if not cells:
        return ""
    cols = [("provider", "provider"), ("B", "B"), ("S", "S"), ("ms", "ms"), ("K/V GB/s", "gbps"),
            ("copy GB/s", "copy"), ("fraction of copy", "frac"), ("rel. err, sampled rows", "err")]
    return "decode (L = 1, Hq = 32, Hkv = 8, D = 128, bf16)\n\n" + _render(cells, cols, md)


def summary(rows: list[dict], md: bool = False) -> str:
    """Every table that has rows: the sweep suites' ratios, the long context, the pinned configs and
    the before/after comparison (last: the answer a baseline run is for)."""
    parts = [goal_tables(rows, md), long_table(rows, md), linear_table(rows, md), decode_table(rows, md),
             tune_table(rows, md),
             baseline_table(rows, md)]
    bad = {}
    for r in rows:
        if r["status"] not in ("ok", "unavailable"):
            bad.setdefault(r["status"], []).append(r)
    counts = ", ".join(f"{len(v)} {k}" for k, v in bad.items())
    tail = f"{len(_ok(rows))} of {len(rows)} cases ok" + (f"; {counts}" if counts else "")
    return "\n\n".join([p for p in parts if p] + [tail])


def markdown(rows: list[dict]) -> str:
    """The README tables of a results file (Markdown)."""
    return summary(rows, md=True)


# ----------------------------------------------------------------------------------------------------
# results files


def _legacy_rows(data: dict) -> tuple[dict, list[dict]]:
    """(meta, rows) of a results file of the former scripts/gpu-check (keys "bench" and "long")."""
    meta = {"device": data.get("device"), "version_torch": data.get("torch"), "version_triton": data.get("triton"),
            "git_sha": data.get("git_sha"), "date": data.get("date")}
    rows = []
    for r in data.get("bench", {}).get("rows", []):
        prov = r["provider"] + ("-triton" if r["provider"].startswith("flashmaps-") else "")
        rows.append({"provider": prov, "family": prov.split("-")[0], "suite": "h100-goals", "mode": r.get("mode", "fwd"),
                     "normalizer": prov.split("-")[1] if prov.startswith("flashmaps-") else "softmax",
                     "dtype": r["dtype"], "Dqk": r["D"], "Dv": r["D"], "Hq": r["H"], "Hkv": r["H"], "B": r["B"],
                     "L": r["L"], "S": r["S"], "causal": "upper_left" if r["causal"] else None,
                     "status": "ok" if "ms" in r else "error", "message": r.get("error"), "time_ms": r.get("ms"),
                     "tflops": r.get("tflops"), "err": r.get("rel_err_head0")})
    for r in data.get("long", []):
        rows.append({"provider": f"flashmaps-{r['normalizer']}-triton", "family": "flashmaps", "suite": "long",
                     "normalizer": r["normalizer"], "mode": r["mode"], "dtype": r["dtype"], "Dqk": r["D"], "Dv": r["D"],
                     "Hq": r["H"], "Hkv": r["H"], "B": r["B"], "L": r["L"], "S": r["S"], "causal": None,
                     "status": "ok" if "ms" in r else "error", "message": r.get("error"), "time_ms": r.get("ms"),
                     "tflops": r.get("tflops"), "err": r.get("rel_err_sampled_rows"),
                     "peak_mem_bytes": r["peak_extra_mib"] * 2**20 if r.get("peak_extra_mib") else None})
    return meta, rows


def load(path) -> tuple[dict, list[dict]]:
    """(meta, rows) of a gpu-check results file (also of the former scripts/gpu-check's)."""
    data = json.loads(Path(path).read_text())
    if "rows" in data and "meta" in data:
        return data["meta"], data["rows"]
    if "bench" in data or "long" in data:
        return _legacy_rows(data)
    raise ValueError(f"{path}: not a gpu-check results file (no rows)")


def plot(rows: list[dict], out_dir, meta: dict | None = None) -> list[Path]:
    """PNGs of gpu-check rows (``plot.plot_bench``; the pinned-config rows of tune are a table, not drawn)."""
    from .plot import plot_bench

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return plot_bench([r for r in rows if not r.get("config")], out_dir, meta)


def main(argv=None) -> int:
    """``python -m flashmaps.bench.gpucheck ARGS`` = ``flashmaps gpu-check ARGS``."""
    from flashmaps.cli import main as cli_main

    return cli_main(["gpu-check", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
