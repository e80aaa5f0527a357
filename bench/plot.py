"""Plots of benchmark results (matplotlib, Agg backend, PNG): a separate step that reads the rows.

    bench:   one figure per (mode, dtype, causal, heads, head dim): TFLOP/s, extra peak memory and speed
             relative to SDPA (SDPA time / provider time) against the sequence length, one line per provider
    compare: one figure per mode: relative error, time / SDPA, extra peak memory / SDPA and the fraction of
             exact zero weights, one bar per provider
    mqar:    test accuracy per normalizer and (sequence length, pairs), bars with the standard deviation over
             seeds as error bars; learning curves (training loss, test accuracy) at each one's best lr
    drift:   cosine similarity to softmax's embeddings and nearest-neighbour agreement per layer swapped

Only rows with status "ok" are drawn; the JSON/CSV next to the PNG hold every row.
"""

from __future__ import annotations

from pathlib import Path

from .harness import baseline_of

__all__ = ["plot_bench", "plot_compare", "plot_mqar", "plot_drift"]


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


def plot_mqar(summary: list[dict], curves: list[dict], out_dir: Path, meta: dict | None = None) -> list[Path]:
    """mqar-accuracy.png (bars: mean test accuracy over seeds at each normalizer's best lr, error bars one
    standard deviation) and mqar-curves.png (training loss and test accuracy against the step, mean over
    seeds at the best lr)."""
    plt = _plt()
    meta = meta or {}
    norms = list(dict.fromkeys(r["normalizer"] for r in summary))
    settings = list(dict.fromkeys((r["seq_len"], r["num_pairs"]) for r in summary))
    by = {(r["normalizer"], r["seq_len"], r["num_pairs"]): r for r in summary}
    width = 0.8 / max(1, len(norms))
    fig, ax = plt.subplots(figsize=(max(9, 1.6 * len(settings) + 4), 4.8))
    for i, n in enumerate(norms):
        xs = [j + (i - (len(norms) - 1) / 2) * width for j, s in enumerate(settings) if (n, *s) in by]
        rs = [by[(n, *s)] for s in settings if (n, *s) in by]
        ax.bar(xs, [r["test_accuracy"] for r in rs], width, yerr=[r["test_accuracy_std"] for r in rs], capsize=2,
               label=f"{n} (lr {rs[0]['lr']:g})")
    ax.set_xticks(range(len(settings)))
    ax.set_xticklabels([f"T={t}, pairs={k}" for t, k in settings])
    ax.set_ylabel("MQAR test accuracy (mean ± std over seeds)")
    ax.set_ylim(0, 1.05)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("MQAR: what each normalizer learns\n" + _caption(meta), fontsize=9)
    fig.tight_layout()
    paths = [Path(out_dir) / "mqar-accuracy.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    best = {r["normalizer"]: r["lr"] for r in summary}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for n in norms:
        runs = [c["points"] for c in curves if c["normalizer"] == n and c["lr"] == best[n] and c["points"]]
        if not runs:
            continue
        steps = [p["step"] for p in runs[0]]
        for ax, key in zip(axes, ("loss", "accuracy")):
            ax.plot(steps, [sum(r[i][key] for r in runs) / len(runs) for i in range(len(steps))], marker="o", ms=3,
                    label=n)
    axes[0].set_ylabel("training loss (query positions)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("test accuracy (curve subset, mean over settings)")
    axes[1].set_ylim(0, 1.05)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle("MQAR learning curves (best lr, mean over seeds)\n" + _caption(meta), fontsize=9)
    fig.tight_layout()
    paths.append(Path(out_dir) / "mqar-curves.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def plot_drift(rows: list[dict], out_dir: Path, meta: dict | None = None) -> list[Path]:
    """drift.png: per normalizer, the mean cosine similarity to softmax's embeddings and the top-1
    neighbour agreement against the layer swapped (each alone, then all)."""
    plt = _plt()
    meta = meta or {}
    cols = list(dict.fromkeys(r["layers"] for r in rows))
    by = {(r["normalizer"], r["layers"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for n in dict.fromkeys(r["normalizer"] for r in rows):
        for ax, key in zip(axes, ("cos_mean", "top1_agreement")):
            ax.plot(range(len(cols)), [by[(n, c)][key] for c in cols], marker="o", ms=4, label=n)
    for ax, label in zip(axes, ("cosine similarity to softmax's embedding (mean)",
                                "nearest-neighbour agreement with softmax")):
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels([f"layer {c}" if c != "all" else "all" for c in cols])
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle("drift: one normalizer swapped into all-MiniLM-L6-v2, zero-shot\n" + _caption(meta), fontsize=9)
    fig.tight_layout()
    path = Path(out_dir) / "drift.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
