"""The measuring process: runs benchmark jobs one by one and reports one JSON line per job.

The harness (``flashmaps.bench.harness``) starts ``python -m flashmaps.bench.worker`` and feeds it jobs on
stdin, one JSON object per line; for each job the worker prints ``@@result <json>`` on stdout. Running the
measurements in a child process means that an out-of-memory kill, a CUDA fault or a hang costs one data
point (the harness records it and starts a fresh worker), and that the CPU peak-RSS figure belongs to the
measured call alone.

One job = one provider, one mode, one shape. What is measured, in this order:

1. a warm-up call (compiles / autotunes; on CPU also creates the thread pool);
2. the extra peak memory of one call: on CUDA ``torch.cuda.max_memory_allocated()`` minus the memory
   allocated before the call; on the CPU the peak RSS (VmHWM, reset through /proc/self/clear_refs after
   ``malloc_trim``) minus the RSS before the call. Inputs, and for "bwd" the saved forward graph, are
   part of the baseline, so the figure is what the call itself adds (its output and workspace);
3. (``check`` jobs, forward modes) the relative error ``||out - ref|| / ||ref||`` against
   ``flashmaps.reference.attention`` in float64 on as many (batch, kv-head) slices as fit
   ``max_ref_elems``, and for sparse normalizers the fraction of exact zero weights among the allowed
   ones, read from the measured path itself: with ``v = I`` (identity, Dv = S) the output IS the weights;
4. the time: ``triton.testing.do_bench`` (median and 20/80 % quantiles, ms) on CUDA,
   ``torch.utils.benchmark.Timer.blocked_autorange`` (all threads) on the CPU.

A provider's knobs (``flashmaps-topk:64-triton[flashmaps.kernels.topk.COLLECT=True]``) are set for the
whole job, from before the provider is made until after the timing, and restored afterwards; the row
records them, the pinned configs and which configs Triton's autotuners chose during the job ("tuned").
Job options besides the shape: ``check`` (step 3), ``check_rows`` (the error of that many sampled query
rows over every key, for lengths whose full reference does not fit), ``warm_only`` (step 1 alone: the
compile-ahead of ``harness.prewarm``), ``cudagraph`` (CUDA: also the device-only time of the call replayed
from a CUDA graph, ``cudagraph_ms``, beside the eager time), ``min_run_time`` / ``min_runs`` (CPU),
``warmup_ms`` / ``rep_ms`` (CUDA), ``max_ref_elems``, ``seed``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import json
import os
import resource
import sys
import time
import traceback

import torch

from .flops import attention_flops
from .providers import get_provider

RESULT_PREFIX = "@@result "
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


# ----------------------------------------------------------------------------------------------------
# memory


def _proc_status(field: str) -> int:
    """A /proc/self/status field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def _reset_cpu_peak() -> int:
    """Return freed heap pages to the OS, reset the peak RSS to the current RSS, return that RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # "5" resets VmHWM (Linux >= 4.0)
    return _proc_status("VmRSS")


def cpu_extra_peak(fn, prepare=None) -> tuple[int, float]:
    """(peak RSS added by one call of ``fn`` in bytes, that call's seconds). ``prepare`` runs before the
    baseline is taken."""
    if prepare is not None:
        prepare()
    base = _reset_cpu_peak()
    t0 = time.perf_counter()
    fn()
    sec = time.perf_counter() - t0
    return max(0, _proc_status("VmHWM") - base), sec


def cuda_extra_peak(fn, prepare=None) -> tuple[int, float]:
    """(``torch.cuda.max_memory_allocated()`` added by one call of ``fn`` in bytes, that call's seconds)."""
    if prepare is not None:
        prepare()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    return max(0, torch.cuda.max_memory_allocated() - base), sec


# ----------------------------------------------------------------------------------------------------
# timing


def time_cpu(fn, min_run_time: float, min_runs: int = 3) -> dict:
    """Median and 20/80 % quantiles (ms) with torch.utils.benchmark on all of torch's threads: a
    ``blocked_autorange`` of ``min_run_time`` seconds, topped up to at least ``min_runs`` timed calls (a
    call longer than ``min_run_time`` would otherwise be timed once)."""
    import torch.utils.benchmark as tb

    timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)  # seconds per call, one entry per block
    n_calls = len(m.times) * m.number_per_run
    while len(times) < min_runs:
        times += timer.timeit(1).times
        n_calls += 1
    t = torch.tensor(times, dtype=torch.float64) * 1e3
    med, q20, q80 = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return {"time_ms": med, "time_q20_ms": q20, "time_q80_ms": q80, "n_runs": n_calls}


def time_cuda(fn, warmup_ms: float, rep_ms: float, grad_to_none=None, call_ms: float | None = None,
              min_runs: int = 3) -> dict:
    """Median and 20/80 % quantiles (ms) with triton.testing.do_bench (L2 flushed between runs).

    A call slower than ``rep_ms / min_runs`` (known from ``call_ms``, one call already timed) would get
    only do_bench's 5 estimation calls plus one timed run; it is timed ``min_runs`` times with CUDA events
    instead, which costs fewer calls and gives real quantiles."""
    if call_ms is not None and call_ms * min_runs > rep_ms:
        times = []
        for _ in range(min_runs):
            if grad_to_none:
                for t in grad_to_none:
                    t.grad = None
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        t = torch.tensor(times, dtype=torch.float64)
        med, q20, q80 = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
        return {"time_ms": med, "time_q20_ms": q20, "time_q80_ms": q80, "n_runs": min_runs}
    import triton.testing

    med, q20, q80 = triton.testing.do_bench(
        fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8]
    )
    return {"time_ms": med, "time_q20_ms": q20, "time_q80_ms": q80, "n_runs": None}


def time_cudagraph(fn, rep_ms: float) -> dict:
    """The device-only time (ms, median) of ``fn`` replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``:
    the calls captured once, so no host work per call), or None and the reason when the call cannot be captured."""
    import triton.testing

    try:
        return {"cudagraph_ms": triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")}
    except Exception as exc:  # noqa: BLE001 - a call that cannot be captured is a data point, not a failed job
        torch.cuda.synchronize()
        return {"cudagraph_ms": None, "cudagraph_note": f"{type(exc).__name__}: {exc}"[:200]}


# ----------------------------------------------------------------------------------------------------
# knobs


def _resolve(path: str):
    """(object, attribute name) of a dotted attribute path: the longest importable module prefix, then
    attributes ("flashmaps.kernels.topk.COLLECT", "torch._dynamo.config.recompile_limit")."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        try:
            obj = importlib.import_module(prefix)
        except ModuleNotFoundError as exc:
            if exc.name and not prefix.startswith(exc.name):
                raise  # the module exists but fails to import: that is the error to see
            continue
        for attr in parts[i:-1]:
            obj = getattr(obj, attr)
        if not hasattr(obj, parts[-1]):
            raise AttributeError(f"knob {path}: {'.'.join(parts[:-1])} has no attribute {parts[-1]!r}")
        return obj, parts[-1]
    raise ImportError(f"knob {path}: no importable module in that path")


@contextlib.contextmanager
def knobs_applied(knobs: dict):
    """Set each ``{"dotted.module.attr": value}`` for the duration of the block, then restore the old
    values (also when the block raises). An attribute that does not exist is an error: a knob whose
    target was renamed must not be measured as a silent no-op."""
    saved = []
    try:
        for path, value in (knobs or {}).items():
            obj, name = _resolve(path)
            saved.append((obj, name, getattr(obj, name)))
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, old in reversed(saved):
            setattr(obj, name, old)


def _autotuners() -> dict:
    """{"module.name": Triton Autotuner} of the flashmaps modules loaded in this process."""
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return {}
    found = {}
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith("flashmaps"):
            continue
        for attr, obj in list(vars(mod).items()):
            if isinstance(obj, Autotuner):
                found[f"{mod_name}.{attr}"] = obj
    return found


def _tuner_caches() -> dict:
    return {name: dict(getattr(t, "cache", {})) for name, t in _autotuners().items()}


def _tuned_since(before: dict) -> dict | None:
    """{autotuned kernel: chosen config} for the autotune keys first seen since ``before``."""
    out = {}
    for name, cache in _tuner_caches().items():
        new = [str(cfg) for key, cfg in cache.items() if key not in before.get(name, {})]
        if new:
            out[name.rsplit(".", 1)[-1]] = new[0] if len(new) == 1 else new
    return out or None


# ----------------------------------------------------------------------------------------------------
# one job


def make_inputs(job: dict, requires_grad: bool = False):
    """Deterministic q (B, Hq, L, Dqk), k (B, Hkv, S, Dqk), v (B, Hkv, S, Dv) for ``job``: N(0, 1), or with
    ``job["inputs"] == "structured"`` q, k from a few strong directions per 64-row / 64-key block, where block
    sparsity is real (`flashmaps.bench.structured`)."""
    dev, dt = job["device"], _DTYPES[job["dtype"]]
    if job.get("inputs", "random") == "structured":
        from .structured import structured_qkv

        qkv = structured_qkv(job["B"], job["Hq"], job["L"], job["S"], job["Dqk"], Hkv=job["Hkv"], Dv=job["Dv"],
                             block=BLOCK_TILE, seed=job.get("seed", 0))
        return [x.to(device=dev, dtype=dt).requires_grad_(requires_grad) for x in qkv]
    g = torch.Generator(device="cpu").manual_seed(job.get("seed", 0))
    shapes = (
        (job["B"], job["Hq"], job["L"], job["Dqk"]),
        (job["B"], job["Hkv"], job["S"], job["Dqk"]),
        (job["B"], job["Hkv"], job["S"], job["Dv"]),
    )
    out = []
    for shape in shapes:
        x = torch.randn(shape, generator=g, dtype=torch.float32).to(device=dev, dtype=dt)
        out.append(x.requires_grad_(requires_grad))
    return out


def _classify(exc: BaseException) -> str:
    msg = str(exc).lower()
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in msg or "can't allocate memory" in msg:
        return "oom"
    if isinstance(exc, MemoryError):
        return "oom"
    if isinstance(exc, NotImplementedError) or any(
        s in msg for s in ("no available kernel", "not supported", "unsupported", "only support", "not implemented")
    ):
        return "unsupported"
    return "error"


def _slices_that_fit(job: dict, max_elems: int) -> tuple[int, int]:
    """(batches, kv heads) to check the error on: the whole thing if B*Hq*L*S fits, else a prefix."""
    g = job["Hq"] // job["Hkv"]
    per_kv_head = g * job["L"] * job["S"]
    heads = max(1, min(job["Hkv"], max_elems // max(1, per_kv_head)))
    batches = max(1, min(job["B"], max_elems // max(1, per_kv_head * job["Hkv"]))) if heads == job["Hkv"] else 1
    return batches, heads


def _pin_noise_seed(norm_spec: str, job: dict) -> int:
    """A stochastic normalizer (gumbel) draws its noise seed from torch's default generator: seed it with the
    job's seed and return the noise seed the next call draws (the reference's ``noise_seed``); 0 otherwise."""
    from flashmaps import parse, torch_path

    if not parse(norm_spec).stochastic:
        return 0
    torch.manual_seed(job.get("seed", 0))
    seed = torch_path.draw_seed()
    torch.manual_seed(job.get("seed", 0))
    return seed


def check_sampled_rows(fn, q, k, v, job: dict, norm_spec: str, n_rows: int) -> dict:
    """Relative error of ``n_rows`` sampled query rows (batch 0, every head) against the float64
    reference over all S keys: the check for lengths whose full (L, S) reference does not fit."""
    from flashmaps import parse, reference

    L, S, causal = job["L"], job["S"], job["causal"]
    res = {"err": None, "err_note": ""}
    if parse(norm_spec).stochastic:  # its noise is indexed by the call's rows: a row subset draws other noise
        res["err_note"] = "no sampled-row check for a stochastic normalizer (the noise depends on the call's rows)"
        return res
    try:
        g = torch.Generator().manual_seed(job.get("seed", 0) + 1)
        rows = torch.randperm(L, generator=g)[:n_rows].sort().values.to(q.device)  # (n,)
        with torch.no_grad():
            out = fn(q[:1], k[:1], v[:1], causal)[:, :, rows]  # (1, Hq, n, Dv)
            mask = None
            if causal:
                j = torch.arange(S, device=q.device)[None, :]
                mask = j <= rows[:, None] + (0 if causal == "upper_left" else S - L)  # (n, S)
            ref = reference.attention(q[:1, :, rows], k[:1], v[:1], norm_spec, attn_mask=mask,
                                      enable_gqa=job["Hq"] != job["Hkv"])
            den, num = ref.norm().item(), (out.double() - ref).norm().item()
        res["err"] = float("inf") if not torch.isfinite(out).all() else (num / den if den > 0 else num)
        res["err_note"] = f"on {len(rows)} sampled rows of batch 0, every key"
    except Exception as exc:  # noqa: BLE001
        res["err_note"] = f"error check failed: {type(exc).__name__}: {exc}"[:200]
    return res


def check_error(fn, q, k, v, job: dict, norm_spec: str, max_elems: int) -> dict:
    """Relative error against the float64 reference, and exact-zero sparsity for sparse normalizers.
    A failure here is noted in ``err_note``; it does not void the timing of the job."""
    from flashmaps import parse, reference

    causal = job["causal"]
    nb, nh = _slices_that_fit(job, max_elems)
    g = job["Hq"] // job["Hkv"]
    res = {"err": None, "err_note": ""}
    try:
        if nb * nh * g * job["L"] * job["S"] > max_elems:
            res["err_note"] = f"reference too large (> {max_elems} scores)"
        else:
            qs, ks, vs = q[:nb, : nh * g], k[:nb, :nh], v[:nb, :nh]  # (nb, nh*g, L, D), (nb, nh, S, D)
            noise_seed = _pin_noise_seed(norm_spec, job)
            with torch.no_grad():
                out = fn(qs, ks, vs, causal)
                ref = reference.attention(qs, ks, vs, norm_spec, causal=causal or False, enable_gqa=g > 1,
                                          noise_seed=noise_seed)
                den = ref.norm().item()
                num = (out.double() - ref).norm().item()
            del ref
            res["err"] = float("inf") if not torch.isfinite(out).all() else (num / den if den > 0 else num)
            if (nb, nh) != (job["B"], job["Hkv"]):
                res["err_note"] = f"on {nb} batch x {nh} kv heads"
    except Exception as exc:  # noqa: BLE001
        res["err_note"] = f"error check failed: {type(exc).__name__}: {exc}"[:200]
    if parse(norm_spec).sparse:
        try:
            with torch.no_grad():
                res["sparsity"] = _sparsity(fn, q, k, job, res)
        except Exception as exc:  # noqa: BLE001
            res["err_note"] = (res["err_note"] + f"; sparsity failed: {type(exc).__name__}: {exc}")[:300]
    return res


#: the tile of the block sparsity (`_sparsity`): the forward tile the H100 runs the sparse units with
BLOCK_TILE = 64


def _sparsity(fn, q, k, job: dict, res: dict | None = None) -> float | None:
    """Fraction of exact zeros among the allowed weights of batch 0, query head 0, read from ``fn`` itself:
    with ``v`` = a block of columns of the identity, ``out = P @ v`` IS that block of the weights. Blocks of
    ``job["Dv"]`` columns keep every call at a head dim the provider is being benchmarked at anyway.
    ``res`` (a dict) also gets ``block_sparsity``: the fraction of the BLOCK_TILE x BLOCK_TILE tiles holding an
    allowed key whose weights are all 0 (what a block mask can skip)."""
    L, S = job["L"], job["S"]
    n_r, n_c = -(-L // BLOCK_TILE), -(-S // BLOCK_TILE)
    tile_live = torch.zeros(n_r, n_c, dtype=torch.bool, device=q.device)
    tile_allowed = torch.zeros(n_r, n_c, dtype=torch.bool, device=q.device)
    width = max(1, min(S, job["Dv"]))
    allowed_total, zeros = 0, 0
    qs, ks = q[:1, :1], k[:1, :1]  # (1, 1, L, D), (1, 1, S, D)
    i = torch.arange(L, device=q.device)[:, None]
    for c in range(0, S, width):
        w = min(width, S - c)
        eye = torch.zeros(1, 1, S, width, dtype=q.dtype, device=q.device)  # (1, 1, S, width)
        eye[0, 0, c:c + w, :w] = torch.eye(w, dtype=q.dtype, device=q.device)
        p = fn(qs, ks, eye, job["causal"])[0, 0, :, :w]  # (L, w) = P[:, c:c+w]
        j = torch.arange(c, c + w, device=q.device)[None, :]
        allowed = torch.ones(L, w, dtype=torch.bool, device=q.device)
        if job["causal"]:
            allowed = j <= i + (0 if job["causal"] == "upper_left" else S - L)
        allowed_total += int(allowed.sum())
        zeros += int(((p == 0) & allowed).sum())
        rows_t, cols_t = i[:, 0] // BLOCK_TILE, j[0] // BLOCK_TILE                      # (L,), (w,)
        for name, x in (("live", (p != 0) & allowed), ("allowed", allowed)):
            grid = tile_live if name == "live" else tile_allowed
            hit = torch.zeros(n_r, n_c, dtype=torch.int32, device=q.device)
            hit.index_put_((rows_t[:, None].expand(L, w), cols_t[None, :].expand(L, w)), x.to(torch.int32),
                           accumulate=True)
            grid |= hit > 0
    if res is not None and int(tile_allowed.sum()):
        res["block_sparsity"] = 1.0 - int(tile_live.sum()) / int(tile_allowed.sum())
    return zeros / allowed_total if allowed_total else None


def source_tree() -> str:
    """The checkout this process runs flashmaps from: the folder holding flashmaps/ and the kernels
    folder, or both folders when they are not one checkout (a mixed import)."""
    import importlib.util

    dirs = {}
    for pkg in ("flashmaps", "flashmaps.kernels"):
        spec = importlib.util.find_spec(pkg)
        dirs[pkg] = os.path.dirname(os.path.realpath(list(spec.submodule_search_locations)[0]))
    if len(set(dirs.values())) == 1:
        return dirs["flashmaps"]
    return "mixed: " + ", ".join(f"{k} from {v}" for k, v in dirs.items())


def run_job(job: dict) -> dict:
    """Measure one job; never raises (a failure is a status in the returned row)."""
    row = dict(job)
    row["source"] = source_tree()
    L = 1 if job["mode"] == "decode" else job["L"]
    row["L"] = job["L"] = L
    row["flops"] = attention_flops(job["mode"], job["B"], job["Hq"], L, job["S"], job["Dqk"], job["Dv"], job["causal"])
    row.update(status="ok", message="", time_ms=None, time_q20_ms=None, time_q80_ms=None, n_runs=None,
               tflops=None, gbps=None, peak_mem_bytes=None, err=None, err_note="", sparsity=None,
               cudagraph_ms=None)
    try:
        prov = get_provider(job["provider"])
        if prov.flops is not None:  # a provider with its own FLOP count (the Triton linear form)
            row["flops"] = prov.flops(job["mode"], job["B"], job["Hq"], L, job["S"], job["Dqk"], job["Dv"],
                                      job["causal"])
        row["family"], row["normalizer"], row["backend"] = prov.family, prov.normalizer, prov.backend
        row["config"], row["knobs"] = prov.config, prov.knobs or None
        reason = prov.unavailable(job["device"])
        if reason:
            row.update(status="unavailable", message=reason)
            return row
        reason = prov.unsupported(job)
        if reason:
            row.update(status="unsupported", message=reason)
            return row
        with knobs_applied(prov.knobs):
            try:
                fn = prov.make(job["device"])
            except Exception as exc:
                row.update(status="unavailable", message=f"{type(exc).__name__}: {exc}"[:300])
                return row
            tuners = _tuner_caches()
            _measure(row, job, fn, prov)
            row["tuned"] = _tuned_since(tuners)
    except BaseException as exc:  # noqa: BLE001 - every failure is a data point
        row.update(status=_classify(exc), message=f"{type(exc).__name__}: {exc}"[:300])
        if row["status"] == "error":
            row["traceback"] = traceback.format_exc()[-2000:]
    finally:
        gc.collect()
        if job["device"] == "cuda":
            torch.cuda.empty_cache()
    return row


def _measure(row: dict, job: dict, fn, prov) -> None:
    mode, cuda = job["mode"], job["device"] == "cuda"
    causal = job["causal"]
    grad = mode in ("bwd", "fwd+bwd")
    q, k, v = make_inputs(job, requires_grad=grad)
    leaves = [q, k, v]

    def clear_grads():
        for t in leaves:
            t.grad = None

    state = {}
    if mode in ("fwd", "decode"):
        def call():
            with torch.no_grad():
                return fn(q, k, v, causal)
        prepare = None
    elif mode == "fwd+bwd":
        dout = torch.randn(job["B"], job["Hq"], job["L"], job["Dv"], device=q.device, dtype=q.dtype)

        def call():
            clear_grads()
            fn(q, k, v, causal).backward(dout)
        prepare = clear_grads
    else:  # bwd: time the backward of one saved forward graph
        state["out"] = fn(q, k, v, causal)
        dout = torch.randn_like(state["out"])

        def call():
            clear_grads()
            state["out"].backward(dout, retain_graph=True)
        prepare = clear_grads

    call()  # warm-up: compile, autotune, thread pools
    if cuda:
        torch.cuda.synchronize()
    if job.get("warm_only"):
        row["message"] = "warm-up call only (compile ahead)"
        return
    row["peak_mem_bytes"], call_s = (cuda_extra_peak if cuda else cpu_extra_peak)(call, prepare)
    row["mem_method"] = "cuda.max_memory_allocated" if cuda else "peak RSS (VmHWM) in the worker process"
    if job.get("check") and mode in ("fwd", "decode"):
        row.update(check_error(fn, q, k, v, job, prov.normalizer, job.get("max_ref_elems", 1 << 24)))
    elif job.get("check_rows") and mode in ("fwd", "decode"):
        row.update(check_sampled_rows(fn, q, k, v, job, prov.normalizer, int(job["check_rows"])))
    if cuda:
        t = time_cuda(call, job.get("warmup_ms", 25), job.get("rep_ms", 100), grad_to_none=leaves if grad else None,
                      call_ms=call_s * 1e3, min_runs=job.get("min_runs", 3))
    else:
        t = time_cpu(call, job.get("min_run_time", 0.5), job.get("min_runs", 3))
    row.update(t)
    if cuda and job.get("cudagraph"):
        row.update(time_cudagraph(call, job.get("rep_ms", 100)))
    row["tflops"] = row["flops"] / (row["time_ms"] * 1e-3) / 1e12 if row["time_ms"] else None
    if mode == "decode" and row["time_ms"]:   # memory bound: the K/V bytes read per second (a copy also writes)
        nbytes = (k.numel() + v.numel()) * k.element_size() * (2 if prov.family == "copy" else 1)
        row["gbps"] = nbytes / (row["time_ms"] * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------------
# the loop


def _limit_memory() -> None:
    """On the CPU, cap the worker's data segment (FLASHMAPS_BENCH_MEM_LIMIT bytes) so that a case too large
    for the machine fails with an allocation error (recorded as "oom") instead of waking the OOM killer."""
    limit = os.environ.get("FLASHMAPS_BENCH_MEM_LIMIT")
    if limit:
        lim = int(limit)
        resource.setrlimit(resource.RLIMIT_DATA, (lim, lim))


def main() -> int:
    _limit_memory()
    threads = os.environ.get("FLASHMAPS_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    out = sys.stdout
    sys.stdout = sys.stderr  # anything a library prints goes to the log, not into the result stream
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        job = json.loads(line)
        row = run_job(job)
        # after a device-side fault the CUDA context is unusable: ask for a fresh worker
        msg = str(row.get("message", "")).lower()
        row["restart_worker"] = row["status"] == "error" and ("cuda error" in msg or "illegal" in msg)
        out.write(RESULT_PREFIX + json.dumps(row, default=str) + "\n")
        out.flush()
        if row["restart_worker"]:
            return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
