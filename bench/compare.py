"""``flashmaps compare``: the normalizers side by side on this machine.

For each normalizer (flashmaps on the device's default backend) and the baselines (torch SDPA, the
``entmax`` package over materialized scores): the relative error against ``flashmaps.reference`` in
float64, the time and extra peak memory of one call and their ratio to SDPA, and for entmax15 / top-k the
fraction of exact zero weights, read from the measured path itself (``v = I`` makes the output the weights).
"""

from __future__ import annotations

from pathlib import Path

from .harness import baseline_of, fmt_bytes, fmt_spread, format_table, run_jobs, sweep
from .providers import BASELINE, default_normalizers, flashmaps_provider, get_provider

__all__ = ["DEFAULTS", "compare_jobs", "summarize", "table"]

#: default sizes: small enough for the 2-core CPU to finish in well under 2 minutes, H100-sized on CUDA
DEFAULTS = {
    "cpu": dict(B=1, H=8, L=1024, D=64, dtype="float32", modes=("fwd",), max_ref_elems=1 << 25, min_run_time=0.3),
    "cuda": dict(B=2, H=16, L=8192, D=128, dtype="bfloat16", modes=("fwd", "fwd+bwd"), max_ref_elems=1 << 28,
                 min_run_time=None),
}


def compare_jobs(*, device: str, normalizers=None, backend: str | None = None, B: int, H: int,
                 Hkv: int | None = None, L: int, D: int, dtype: str, causal=None, modes=("fwd",),
                 max_ref_elems: int, min_run_time: float | None, baselines=(BASELINE, "entmax15-dense"),
                 inputs: str = "random") -> list[dict]:
    """The jobs of one comparison: every normalizer and baseline at one shape, forward jobs checked; ``inputs``
    "random" (N(0, 1)) or "structured" (`flashmaps.bench.structured`: real block sparsity)."""
    backend = backend or ("triton" if device == "cuda" else "torch")
    normalizers = default_normalizers() if normalizers is None else normalizers
    provs = [flashmaps_provider(n, backend) for n in normalizers] + [get_provider(b) for b in baselines]
    extra = {"check": True, "max_ref_elems": max_ref_elems, "inputs": inputs}
    if min_run_time is not None:
        extra["min_run_time"] = min_run_time
    return sweep(device=device, providers=provs, seqs=[L], modes=modes, batches=[B], heads=[H], kv_heads=[Hkv],
                 head_dims=[D], causals=[causal], dtypes=[dtype], **extra)


def summarize(rows: list[dict]) -> list[dict]:
    """Add the ratios to SDPA (time_vs_sdpa, mem_vs_sdpa) and display strings to each row."""
    out = []
    for r in rows:
        r = dict(r)
        base = baseline_of(rows, r)
        ok = r.get("status") == "ok"
        r["time_vs_sdpa"] = r["time_ms"] / base["time_ms"] if ok and base and base.get("time_ms") else None
        bm = base.get("peak_mem_bytes") if base else None
        r["mem_vs_sdpa"] = r["peak_mem_bytes"] / bm if ok and bm else None
        out.append(r)
    return out


def _display(r: dict) -> dict:
    d = dict(r)
    d["err_s"] = None if r.get("err") is None else f"{r['err']:.1e}"
    d["time_s"] = None if r.get("time_ms") is None else f"{r['time_ms']:.2f}"
    d["spread_s"] = fmt_spread(r)
    d["tvs_s"] = None if r.get("time_vs_sdpa") is None else f"{r['time_vs_sdpa']:.2f}x"
    d["mem_s"] = fmt_bytes(r.get("peak_mem_bytes"))
    d["mvs_s"] = None if r.get("mem_vs_sdpa") is None else f"{r['mem_vs_sdpa']:.2f}x"
    d["sp_s"] = None if r.get("sparsity") is None else f"{100 * r['sparsity']:.1f}%"
    d["bsp_s"] = None if r.get("block_sparsity") is None else f"{100 * r['block_sparsity']:.1f}%"
    d["status_s"] = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('message', '')}"[:70]
    return d


def table(rows: list[dict]) -> str:
    """The terminal table of a comparison (one block per mode)."""
    cols = [("provider", "provider"), ("normalizer", "normalizer"), ("rel err", "err_s"), ("ms", "time_s"),
            ("20-80%", "spread_s"), ("time/SDPA", "tvs_s"), ("extra peak", "mem_s"), ("mem/SDPA", "mvs_s"), ("zeros", "sp_s"),
            ("dead 64x64", "bsp_s"),
            ("status", "status_s")]
    blocks = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        sub = [_display(r) for r in rows if r["mode"] == mode]
        r0 = sub[0]
        head = (f"{mode}: B={r0['B']} Hq={r0['Hq']} Hkv={r0['Hkv']} L={r0['L']} S={r0['S']} D={r0['Dqk']} "
                f"{r0['dtype']} causal={r0['causal'] or 'no'}")
        blocks.append(head + "\n" + format_table(sub, cols))
    return "\n\n".join(blocks)


def run_compare(jobs: list[dict], out_dir: Path, **kw) -> list[dict]:
    """Run the comparison jobs (see :func:`flashmaps.bench.harness.run_jobs`) and add the SDPA ratios."""
    return summarize(run_jobs(jobs, log_path=out_dir / "compare.log", partial_path=out_dir / "compare.partial.jsonl",
                              desc="compare", **kw))
