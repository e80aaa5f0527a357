"""Plots of benchmark results (matplotlib, Agg backend, PNG): a separate step that reads the rows.

    bench:   one figure per (mode, dtype, causal, heads, head dim): TFLOP/s, extra peak memory and speed
             relative to SDPA (SDPA time / provider time) against the sequence length, one line per provider
    compare: one figure per mode: relative error, time / SDPA, extra peak memory / SDPA and the fraction of
             exact zero weights, one bar per provider

Only rows with status "ok" are drawn; the JSON/CSV next to the PNG hold every row.
"""

from __future__ import annotations

from pathlib import Path

from .harness import baseline_of

__all__ = ["plot_bench", "plot_compare"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _caption(meta: dict) -> str:
    return (f"{meta.get('device', '?')} | torch {meta.get('version_torch', '?')} | "
            f"triton {meta.get('version_triton', '?')} | git {str(meta.get('git_sha', '?'))[:12]} | "
            f"{meta.get('date', '')}")


def _safe(text) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in str(text))


def plot_bench(rows: list[dict], out_dir: Path, meta: dict | None = None) -> list[Path]:
    """PNG files (one per configuration group) of TFLOP/s, memory and speed vs SDPA against seq length."""
    plt = _plt()
    meta = meta or {}
    ok = [r for r in rows if r.get("status") == "ok" and r.get("time_ms")]
    groups: dict[tuple, list[dict]] = {}
    for r in ok:
        groups.setdefault((r["mode"], r["dtype"], r["causal"], r["Hq"], r["Hkv"], r["Dqk"], r["Dv"]), []).append(r)
    paths = []
    for (mode, dtype, causal, hq, hkv, dqk, dv), grp in sorted(groups.items(), key=lambda kv: str(kv[0])):
        fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
        providers = sorted({r["provider"] for r in grp})
        for prov in providers:
            pts = sorted((r for r in grp if r["provider"] == prov), key=lambda r: r["S"])
            s = [r["S"] for r in pts]
            style = "-" if prov.startswith("flashmaps") else "--"
            axes[0].plot(s, [r["tflops"] for r in pts], style, marker="o", ms=3, label=prov)
            mem = [(r["S"], r["peak_mem_bytes"] / 2**20) for r in pts if r.get("peak_mem_bytes")]
            if mem:
                axes[1].plot(*zip(*mem), style, marker="o", ms=3, label=prov)
            rel = []
            for r in pts:
                b = baseline_of(rows, r)
                if b:
                    rel.append((r["S"], b["time_ms"] / r["time_ms"]))
            if rel:
                axes[2].plot(*zip(*rel), style, marker="o", ms=3, label=prov)
        axes[0].set_ylabel("TFLOP/s (flops.py model)")
        axes[0].set_yscale("log")
        axes[1].set_ylabel("extra peak memory (MiB)")
        axes[1].set_yscale("log")
        if not any(baseline_of(rows, r) for r in grp):
            axes[2].text(0.5, 0.5, "no SDPA rows for this configuration", ha="center", va="center",
                         transform=axes[2].transAxes)
        axes[2].set_ylabel("speed vs SDPA (SDPA time / time)")
        axes[2].axhline(1.0, color="gray", lw=0.8)
        axes[2].set_yscale("log")
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length (L = S" + (", L = 1" if mode == "decode" else "") + ")")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=7, loc="best")
        title = f"{mode}  {dtype}  causal={causal or 'no'}  Hq={hq} Hkv={hkv} Dqk={dqk} Dv={dv}"
        fig.suptitle(title + "\n" + _caption(meta), fontsize=9)
        fig.tight_layout()
        name = _safe(f"bench-{mode}-{dtype}-{causal or 'full'}-h{hq}-kv{hkv}-d{dqk}") + ".png"
        path = Path(out_dir) / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_compare(rows: list[dict], out_dir: Path, meta: dict | None = None) -> list[Path]:
    """One PNG per mode: error, time / SDPA, memory / SDPA and sparsity, one bar per provider."""
    plt = _plt()
    meta = meta or {}
    paths = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        sub = [r for r in rows if r["mode"] == mode]
        if not any(r.get("status") == "ok" for r in sub):
            continue
        # every provider gets a slot; a failed one is labelled with its status and has no bars
        names = [r["provider"] if r.get("status") == "ok" else f"{r['provider']} ({r.get('status')})" for r in sub]
        panels = [
            ("relative error vs float64 reference", [r.get("err") for r in sub], True),
            ("time / SDPA time", [r.get("time_vs_sdpa") for r in sub], True),
            ("extra peak memory / SDPA's", [r.get("mem_vs_sdpa") for r in sub], True),
            ("fraction of exact zero weights", [r.get("sparsity") for r in sub], False),
        ]
        fig, axes = plt.subplots(1, 4, figsize=(18, 5))
        for ax, (label, vals, log) in zip(axes, panels):
            xs = [i for i, v in enumerate(vals) if v is not None and v > 0]
            ax.bar(xs, [vals[i] for i in xs], color=["C0" if names[i].startswith("flashmaps") else "C1" for i in xs])
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
            ax.set_title(label, fontsize=9)
            if log and xs:
                ax.set_yscale("log")
            if "SDPA" in label:
                ax.axhline(1.0, color="gray", lw=0.8)
            ax.grid(True, axis="y", alpha=0.3)
        r0 = sub[0]
        fig.suptitle(f"compare {mode}: B={r0['B']} Hq={r0['Hq']} Hkv={r0['Hkv']} L={r0['L']} S={r0['S']} "
                     f"D={r0['Dqk']} {r0['dtype']} causal={r0['causal'] or 'no'}\n" + _caption(meta), fontsize=9)
        fig.tight_layout()
        path = Path(out_dir) / (_safe(f"compare-{mode}") + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
