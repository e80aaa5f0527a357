"""``flashmaps compare --task mqar``: what each normalizer learns on multi-query associative recall.

MQAR (Zoology, Arora et al. 2023) as defined there: a vocabulary of V tokens is split in half, keys from
``[1, V/2)`` and values from ``[V/2, V)``. A sequence of length T with p pairs starts with the context
``k_1 v_1 k_2 v_2 ... k_p v_p`` (distinct keys, distinct values), then every key is queried once: key
``k_i`` sits at position ``2p + 2 g_i`` with distinct gaps ``g_i`` drawn from ``{0, ..., (T - 2p)/2 - 1}``
with probability ``P(g) ∝ (g + 1)^(a - 1)`` (a = 0.01: queries cluster near the context, the long tail is
far away); every other position holds a uniform random token. The model must output ``v_i`` at the
position of the query ``k_i`` (the loss and the accuracy count only those positions).

The model (:class:`TinyLM`): token + learned position embedding -> ``layers`` x (pre-norm residual
``x + Attention(LN(x))`` with ``flashmaps.nn.Attention`` (causal), then ``x + MLP(LN(x))``, MLP
``E -> 4E -> E`` with GELU) -> LN -> linear head over the vocabulary. One model per normalizer, the same
seeds (parameter init and training stream), the same number of steps, AdamW with linear warmup and cosine
decay, and the learning rate swept over a small grid as Zoology does: the reported accuracy of a
normalizer is at its best learning rate (mean over seeds of the mean accuracy over the test settings).

Each run records the test accuracy per (sequence length, pairs), a learning curve (training loss, and test
accuracy on a subset at a few points), the global gradient norm before clipping at every step (mean,
median, min, max, and the count of non-finite steps), its wall time and CPU time (the process's; with
one thread per run the time an unloaded core would take), the fraction of exact zeros in the
trained attention weights over the allowed (causal) keys (read from the attention path itself: with
``v = I`` the output is the weight matrix) and in the parameters.

Training draws a fresh batch at every step from a generator seeded by the run's seed (an endless stream,
where Zoology trains epochs over a fixed set); the test sets come from a fixed seed shared by all runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import statistics
import time

import torch
from torch import nn

__all__ = ["Preset", "PRESETS", "mqar_examples", "TinyLM", "train_run", "summarize", "run_mqar", "markdown"]


@dataclasses.dataclass(frozen=True)
class Preset:
    """One experiment: sizes, the (sequence length, pairs) settings, budget, learning-rate grid, seeds."""

    vocab: int = 64
    d_model: int = 64
    heads: int = 2
    layers: int = 2
    #: (sequence length, number of key-value pairs) trained on (mixed step by step) and tested on
    settings: tuple[tuple[int, int], ...] = ((32, 4), (64, 8))
    steps: int = 800
    batch: int = 32
    lrs: tuple[float, ...] = (3e-3, 6e-3)
    seeds: tuple[int, ...] = (0, 1)
    weight_decay: float = 0.1
    warmup: float = 0.1
    clip: float = 1.0
    #: test examples per setting (final accuracy), and the subset used for the learning curve
    test_examples: int = 500
    curve_examples: int = 128
    curve_points: int = 6
    data_seed: int = 1234
    power_a: float = 0.01


PRESETS = {
    # every registered normalizer in under 10 minutes on 2 CPU cores (measured: see the README)
    "quick": Preset(),
    # more of Zoology's grid (its vocabulary, longer sequences, more pairs, wider model, 3 learning rates):
    # a GPU job, not run or timed yet
    "full": Preset(d_model=128, settings=((64, 4), (64, 8), (64, 16), (128, 8), (128, 16), (128, 32),
                                          (256, 16), (256, 32), (256, 64)),
                   vocab=8192, steps=3000, batch=64, lrs=(3e-4, 1e-3, 3e-3), seeds=(0, 1, 2),
                   test_examples=1000, curve_examples=256, curve_points=10),
}


# ----------------------------------------------------------------------------------------------------
# data


def mqar_examples(n: int, seq_len: int, num_pairs: int, vocab: int, *, generator: torch.Generator,
                  power_a: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` MQAR sequences: (inputs (n, seq_len) int64, targets (n, seq_len) int64, -100 except at the
    ``num_pairs`` query positions of each row, where the target is the value paired with the queried key).

    Keys are drawn from ``[1, vocab/2)``, values from ``[vocab/2, vocab)``, without repetition in a row.
    Needs ``num_pairs <= vocab/2 - 1`` and ``seq_len >= 4 * num_pairs`` (room for the context and one
    query slot per key)."""
    half = vocab // 2
    if num_pairs < 1 or num_pairs > half - 1:
        raise ValueError(f"mqar_examples: num_pairs must be in 1..vocab/2 - 1 = {half - 1}, got {num_pairs}")
    if seq_len < 4 * num_pairs:
        raise ValueError(f"mqar_examples: seq_len ({seq_len}) must be at least 4 * num_pairs ({4 * num_pairs})")
    ctx = 2 * num_pairs
    slots = (seq_len - ctx) // 2  # query slots: positions ctx, ctx + 2, ...
    keys = torch.rand(n, half - 1, generator=generator).argsort(dim=1)[:, :num_pairs] + 1  # (n, p) in [1, half)
    values = torch.rand(n, vocab - half, generator=generator).argsort(dim=1)[:, :num_pairs] + half  # (n, p)
    inputs = torch.randint(vocab, (n, seq_len), generator=generator)  # (n, T) the filler
    inputs[:, 0:ctx:2], inputs[:, 1:ctx:2] = keys, values
    weight = power_a * torch.arange(1, slots + 1, dtype=torch.float64) ** (power_a - 1)  # (slots,)
    gaps = torch.multinomial(weight.expand(n, slots), num_pairs, replacement=False, generator=generator)  # (n, p)
    qpos = ctx + 2 * gaps  # (n, p) the query positions, key i queried at qpos[:, i]
    inputs.scatter_(1, qpos, keys)
    targets = torch.full((n, seq_len), -100, dtype=torch.long)
    targets.scatter_(1, qpos, values)
    return inputs, targets


def _test_sets(p: Preset, n: int) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(p.data_seed)
    return {(T, k): mqar_examples(n, T, k, p.vocab, generator=g, power_a=p.power_a) for T, k in p.settings}


# ----------------------------------------------------------------------------------------------------
# the model


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, normalizer):
        super().__init__()
        from flashmaps.nn import Attention

        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads, normalizer=normalizer, causal=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):  # (B, T, E)
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Embedding -> ``layers`` x (pre-norm attention + MLP) -> LN -> vocabulary logits (B, T, V)."""

    def __init__(self, vocab: int, max_len: int, d_model: int, heads: int, layers: int, normalizer):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d_model), nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, heads, normalizer) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids (B, T) -> (B, T, V)
        x = self.tok(ids) + self.pos.weight[: ids.shape[1]]  # (B, T, E)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


@torch.no_grad()
def _accuracy(model: TinyLM, inputs, targets) -> float:
    """Fraction of the query positions (targets != -100) where the logits' argmax is the target."""
    T, V = inputs.shape[1], model.head.out_features
    batch = max(1, (1 << 26) // (T * V))  # logits of at most 2^26 floats at a time (256 MiB)
    hit = total = 0
    for i in range(0, len(inputs), batch):
        x, y = inputs[i:i + batch], targets[i:i + batch]
        m = y != -100
        hit += (model(x).argmax(-1)[m] == y[m]).sum().item()
        total += m.sum().item()
    return hit / total


@torch.no_grad()
def attention_zero_fraction(model: TinyLM, inputs: torch.Tensor) -> list[float]:
    """Per layer, the fraction of exact zeros among the allowed (causal) attention weights on ``inputs``
    (B, T), read from the attention call itself: ``attention(q, k, I)`` = the weights P (B, H, T, T)."""
    from flashmaps import attention

    seen = []
    hooks = [blk.attn.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0])))
             for blk in model.blocks]
    try:
        model(inputs)
    finally:
        for h in hooks:
            h.remove()
    B, T = inputs.shape
    allowed = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
    out = []
    for mod, x in seen:  # x (B, T, E): the attention module's input
        q = mod.q_proj(x).view(B, T, mod.num_heads, mod.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = mod.k_proj(x).view(B, T, mod.num_kv_heads, mod.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        eye = torch.eye(T, dtype=x.dtype, device=x.device).expand(B, mod.num_kv_heads, T, T)  # (B, Hkv, T, T)
        p = attention(q, k, eye, mod.normalizer, causal=True, scale=mod.scale, softcap=mod.softcap,
                      enable_gqa=mod.num_kv_heads != mod.num_heads)  # (B, H, T, T) = P
        zeros = ((p == 0) & allowed.to(p.device)).sum().item()
        out.append(zeros / (allowed.sum().item() * B * mod.num_heads))
    return out


# ----------------------------------------------------------------------------------------------------
# one run


def _lr_at(step: int, steps: int, lr: float, warmup: float) -> float:
    """Linear warmup over the first ``warmup`` fraction of the steps, then cosine decay to 0."""
    w = max(1, int(warmup * steps))
    if step < w:
        return lr * (step + 1) / w
    return lr * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))


@contextlib.contextmanager
def _pinned_torch(threads: int | None, dev: torch.device):
    """torch's thread count and deterministic mode for one run, restored afterwards (a run inside a test or a
    notebook must not leave the whole process deterministic: that would also switch flashmaps' own
    ``deterministic=None`` default for every later call)."""
    was = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled())
    torch.set_num_threads(threads or 1)
    torch.use_deterministic_algorithms(True, warn_only=dev.type != "cpu")  # CUDA: some ops have no such mode
    try:
        yield
    finally:
        torch.set_num_threads(was[0])
        torch.use_deterministic_algorithms(was[1], warn_only=was[2])


def train_run(normalizer: str, lr: float, seed: int, preset: Preset, *, device: str = "cpu",
              threads: int | None = None, steps: int | None = None, test=None, on_step=None) -> dict:
    """Train one model and evaluate it. Returns a dict: normalizer (the spec), lr, seed, accuracy
    {(T, pairs): test accuracy}, curve {step, loss, accuracy}, grad-norm statistics, wall_s, zero fractions.

    Deterministic for a given (normalizer, lr, seed, preset, threads) on the CPU: ``torch.manual_seed``,
    deterministic algorithms, and a fixed thread count (``threads``; default 1), both restored on return."""
    dev = torch.device(device)
    with _pinned_torch(threads, dev):
        return _train_run(normalizer, lr, seed, preset, dev, steps, test, on_step)


def _train_run(normalizer, lr, seed, preset, dev, steps, test, on_step) -> dict:
    from flashmaps.normalizers import parse

    norm = parse(normalizer, argname="normalizer")
    steps = preset.steps if steps is None else steps
    torch.manual_seed(seed)
    max_len = max(T for T, _ in preset.settings)
    model = TinyLM(preset.vocab, max_len, preset.d_model, preset.heads, preset.layers, norm).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=preset.weight_decay)
    stream = torch.Generator().manual_seed(seed)
    test = _test_sets(preset, preset.test_examples) if test is None else test
    curve_at = sorted({round(steps * (i + 1) / preset.curve_points) for i in range(preset.curve_points)} - {0})

    def evaluate(n=None):
        model.eval()
        acc = {key: _accuracy(model, x[:n].to(dev), y[:n].to(dev)) for key, (x, y) in test.items()}
        model.train()
        return acc

    losses, norms, curve = [], [], []
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(steps):
        T, k = preset.settings[step % len(preset.settings)]  # the settings mixed step by step
        x, y = mqar_examples(preset.batch, T, k, preset.vocab, generator=stream, power_a=preset.power_a)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, preset.warmup)
        logits = model(x.to(dev))  # (B, T, V)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.to(dev).flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), preset.clip).item()  # norm before clipping
        if math.isfinite(gnorm):
            opt.step()  # a non-finite gradient is counted and skipped
        losses.append(loss.item())
        norms.append(gnorm)
        if step + 1 in curve_at:
            acc = evaluate(preset.curve_examples)
            curve.append({"step": step + 1, "loss": statistics.fmean(losses[-max(1, steps // 20):]),
                          "accuracy": statistics.fmean(acc.values())})
        if on_step is not None:
            on_step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    model.eval()
    accuracy = evaluate()
    finite = [g for g in norms if math.isfinite(g)]
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    probe = next(iter(test.values()))[0][:16].to(dev)
    return dict(
        normalizer=norm.spec, lr=lr, seed=seed, steps=steps, accuracy=accuracy, curve=curve,
        final_loss=statistics.fmean(losses[-max(1, steps // 20):]), wall_s=wall, cpu_s=cpu,
        grad_norm_mean=statistics.fmean(finite) if finite else None,
        grad_norm_median=statistics.median(finite) if finite else None,
        grad_norm_min=min(finite) if finite else None, grad_norm_max=max(finite) if finite else None,
        grad_nonfinite_steps=len(norms) - len(finite),
        grad_norm_first=norms[0], grad_norm_last=norms[-1],
        attn_zero_fraction=attention_zero_fraction(model, probe),
        param_zero_fraction=(params == 0).double().mean().item(),
    )


# ----------------------------------------------------------------------------------------------------
# the sweep and its report


def _run_star(args):
    return train_run(*args[:4], **args[4])


def _runs_in_pool(tasks: list, jobs: int, progress: bool) -> list[dict]:
    """train_run over ``tasks`` [(normalizer, lr, seed, preset, kwargs)], in ``jobs`` spawned processes when
    ``jobs > 1`` (each run seeds and fixes its own threads), with a progress bar over the runs; the results
    come in the order of ``tasks`` whatever the timing."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from .harness import _progress

    bar = _progress(len(tasks), "mqar", progress)
    results = []
    with contextlib.ExitStack() as stack:
        if jobs > 1:
            pool = stack.enter_context(ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")))
            pending = [pool.submit(_run_star, t) for t in tasks]
        for i, t in enumerate(tasks):
            bar.set_postfix_str(f"{t[0]} lr={t[1]:g} seed={t[2]}")
            results.append(pending[i].result() if jobs > 1 else _run_star(t))
            bar.update(1)
            if not progress:
                print(f"[mqar] {i + 1}/{len(tasks)} {t[0]} lr={t[1]:g} seed={t[2]}: {results[-1]['wall_s']:.1f} s "
                      f"({results[-1]['cpu_s']:.1f} s CPU)",
                      flush=True)
    bar.close()
    return results


def rows_of(results: list[dict]) -> list[dict]:
    """One row per (run, setting): normalizer, lr, seed, seq_len, num_pairs, test_accuracy and the run's
    statistics; ``best_lr`` marks the rows at the normalizer's best learning rate (:func:`best_lrs`)."""
    best = best_lrs(results)
    rows = []
    for r in results:
        run = {k: v for k, v in r.items() if k not in ("accuracy", "curve")}
        for (T, k), acc in r["accuracy"].items():
            rows.append(dict(run, seq_len=T, num_pairs=k, test_accuracy=acc, best_lr=r["lr"] == best[r["normalizer"]]))
    return rows


def best_lrs(results: list[dict]) -> dict[str, float]:
    """normalizer -> the learning rate with the highest mean (over seeds and settings) test accuracy."""
    score: dict[tuple, list] = {}
    for r in results:
        score.setdefault((r["normalizer"], r["lr"]), []).append(statistics.fmean(r["accuracy"].values()))
    best: dict[str, tuple] = {}
    for (norm, lr), accs in score.items():
        m = statistics.fmean(accs)
        if norm not in best or m > best[norm][1]:
            best[norm] = (lr, m)
    return {n: lr for n, (lr, _) in best.items()}


def summarize(rows: list[dict]) -> list[dict]:
    """Per normalizer (at its best lr) and setting: mean and standard deviation over seeds of the test
    accuracy, and the run statistics averaged over seeds."""
    groups: dict[tuple, list] = {}
    for r in rows:
        if r["best_lr"]:
            groups.setdefault((r["normalizer"], r["seq_len"], r["num_pairs"]), []).append(r)
    out = []
    for (norm, T, k), grp in groups.items():
        acc = [r["test_accuracy"] for r in grp]

        def mean(key):
            vals = [r[key] for r in grp if r[key] is not None]
            return statistics.fmean(vals) if vals else None

        out.append(dict(
            normalizer=norm, seq_len=T, num_pairs=k, lr=grp[0]["lr"], n_seeds=len(grp),
            test_accuracy=statistics.fmean(acc), test_accuracy_std=statistics.pstdev(acc) if len(acc) > 1 else 0.0,
            grad_norm_median=mean("grad_norm_median"), grad_norm_max=mean("grad_norm_max"),
            grad_nonfinite_steps=sum(r["grad_nonfinite_steps"] for r in grp), wall_s=mean("wall_s"),
            cpu_s=mean("cpu_s"),
            attn_zero_fraction=statistics.fmean(statistics.fmean(r["attn_zero_fraction"]) for r in grp),
        ))
    return out


def markdown(summary: list[dict]) -> str:
    """The Markdown table: one row per normalizer, accuracy (mean ± std over seeds) per setting, then
    the best lr, gradient-norm median / max, attention zeros and seconds per run."""
    settings = list(dict.fromkeys((r["seq_len"], r["num_pairs"]) for r in summary))
    norms = list(dict.fromkeys(r["normalizer"] for r in summary))
    by = {(r["normalizer"], r["seq_len"], r["num_pairs"]): r for r in summary}
    head = ["normalizer"] + [f"T={T} pairs={k}" for T, k in settings] + [
        "best lr", "grad norm median / max", "zero attn weights", "CPU s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in norms:
        r0 = by[(n, *settings[0])]
        cells = [f"`{n}`"] + [f"{by[(n, *s)]['test_accuracy']:.3f} ± {by[(n, *s)]['test_accuracy_std']:.3f}"
                              if (n, *s) in by else "-" for s in settings]
        gm = "-" if r0["grad_norm_median"] is None else f"{r0['grad_norm_median']:.2f} / {r0['grad_norm_max']:.1f}"
        cells += [f"{r0['lr']:g}", gm, f"{100 * r0['attn_zero_fraction']:.1f} %", f"{r0['cpu_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_mqar(preset: Preset, normalizers: list[str], *, device: str = "cpu", threads: int | None = None,
             jobs: int = 1, progress: bool = True) -> tuple[list[dict], list[dict], list[dict]]:
    """Every (normalizer, lr, seed) of the preset: (rows, summary, curves); see :func:`rows_of`,
    :func:`summarize`; curves: one entry per run {normalizer, lr, seed, points [{step, loss, accuracy}]}."""
    tasks = [(n, lr, seed, preset, {"device": device, "threads": threads})
             for n in normalizers for lr in preset.lrs for seed in preset.seeds]
    results = _runs_in_pool(tasks, jobs, progress)
    rows = rows_of(results)
    curves = [{"normalizer": r["normalizer"], "lr": r["lr"], "seed": r["seed"], "points": r["curve"]} for r in results]
    return rows, summarize(rows), curves


# ----------------------------------------------------------------------------------------------------
# the command


#: the columns of mqar.csv, first (the JSON rows carry the same keys)
FIELDS = ("normalizer", "seq_len", "num_pairs", "lr", "seed", "best_lr", "test_accuracy", "final_loss", "steps",
          "wall_s", "cpu_s", "grad_norm_mean", "grad_norm_median", "grad_norm_min", "grad_norm_max",
          "grad_nonfinite_steps", "grad_norm_first", "grad_norm_last", "attn_zero_fraction", "param_zero_fraction")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``--task mqar`` (on the ``compare`` parser)."""
    g = p.add_argument_group("--task mqar")
    g.add_argument("--preset", choices=tuple(PRESETS), default=None, help="quick (default; every normalizer in "
                   "under 10 minutes on 2 CPU cores) or full (more of Zoology's grid; meant for a GPU)")
    g.add_argument("--steps", type=int, default=None, help="training steps per run (default: the preset's)")
    g.add_argument("--seeds", nargs="+", default=None, help="seeds (default: the preset's, 0 1)")
    g.add_argument("--lrs", nargs="+", default=None, help="learning-rate grid (default: the preset's)")
    g.add_argument("--jobs", type=int, default=None, help="runs in parallel processes (default: min(2, cores))")


def _numbers(values, fn, what: str, error) -> tuple:
    from flashmaps.cli import _split

    out = []
    for v in _split(values):
        try:
            x = fn(v)
        except ValueError:
            error(f"{what}: expected numbers, got {v!r}")
        if x < 0 or (what == "--lrs" and x == 0):
            error(f"{what}: expected a positive number, got {v!r}")
        out.append(x)
    return tuple(out)


def run_command(args, ctx) -> int:
    """``flashmaps compare --task mqar``: run the preset, print the table, write mqar.json/.csv and PNGs."""
    import os

    error = ctx.error
    preset = PRESETS[args.preset or "quick"]
    change = {}
    if args.steps is not None:
        if args.steps < 1:
            error(f"--steps: expected a positive integer, got {args.steps}")
        change["steps"] = args.steps
    if args.seeds:
        change["seeds"] = _numbers(args.seeds, int, "--seeds", error)
    if args.lrs:
        change["lrs"] = _numbers(args.lrs, float, "--lrs", error)
    preset = dataclasses.replace(preset, **change)
    jobs = args.jobs if args.jobs is not None else min(2, os.cpu_count() or 1)
    if jobs < 1:
        error(f"--jobs: expected a positive integer, got {jobs}")
    norms = ctx.normalizers()
    kind = ctx.kind()
    out = ctx.out_dir()
    print(f"flashmaps compare --task mqar: {len(norms)} normalizers ({' '.join(norms)}) x {len(preset.lrs)} lrs x "
          f"{len(preset.seeds)} seeds, {preset.steps} steps each, {jobs} processes; results in {out}", flush=True)
    t0 = time.perf_counter()
    rows, summary, curves = run_mqar(preset, norms, device="cuda" if kind == "cuda" else "cpu",
                                     threads=args.threads, jobs=1 if kind == "cuda" else jobs,
                                     progress=not args.no_progress)
    total = time.perf_counter() - t0
    cpu = sum({(r["normalizer"], r["lr"], r["seed"]): r["cpu_s"] for r in rows}.values())
    print(markdown(summary))
    extra = {"preset": dataclasses.asdict(preset), "summary": summary, "curves": curves, "total_wall_s": total,
             "total_cpu_s_of_runs": cpu, "jobs": jobs, "threads_per_run": args.threads or 1}
    paths = ctx.write(rows, "mqar", FIELDS, extra)
    if not args.no_plot:
        from .plot import plot_mqar

        paths += ctx.plots(plot_mqar, summary, curves)
    print(f"\ntotal {total:.0f} s wall; the runs took {cpu:.0f} s of CPU time ({cpu / jobs:.0f} s per process)\n"
          + "\n".join(f"wrote {p}" for p in paths))
    return 0
