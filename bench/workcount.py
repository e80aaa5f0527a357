"""Work per query block of every registered normalizer, counted under the Triton interpreter.

    TRITON_INTERPRET=1 python -m flashmaps.bench.workcount [--L 1024] [--D 64] [--norms softmax,entmax15]
                                                           [--inputs random,structured] [--block-mask on|off]

Runs the Triton forward and backward once per normalizer (its default spec) on N(0, 1) inputs and on structured
ones (`flashmaps.bench.structured`: q, k from 4 strong directions per 64-row / 64-key block, gap 6, seed 0;
fp32, B = 1, H = 1, L = S, seed 0, the GPU's first autotune candidate at D: BM, BN as an H100 would run them),
with the block mask of the sparse units (``triton_path.BLOCK_MASK``; ``--block-mask off``: without) and counts,
by wrapping the kernels' own jit functions in Python counters (the interpreter runs them as Python, so the
wrapper sees every call of every program):

- fwd score tiles: calls of ``tiles.score_tile`` (each is one Q K^T product of a BM x BN tile), over the
  threshold pre-passes and the output pass; ``passes`` = those / the output pass's tiles (calls of
  ``tile_loop._accumulate``): how many times a block streams K (1 for softmax; data dependent for the
  threshold engines);
- fwd P V tiles: calls of ``tile_loop._accumulate_live`` (tiles whose P @ V product runs: the output pass
  minus the tiles ``tile_live`` skipped);
- bwd dQ tiles per query block, bwd dK/dV tiles per key block: calls of ``backward._tile_weights`` inside
  ``_dq_loop`` / ``_dkdv_loop`` (score recomputations: the pairs the block mask skips do not count; those the
  per-tile ``tile_live`` test skips after Q K^T still count, their dP product not). With the atomic-dQ backward
  (the default unless deterministic) there is no dQ kernel: its products run inside the dK/dV tiles;
- block sparsity: the fraction of the forward's BM x BN tiles holding an allowed key whose weights are all 0,
  from the float64 reference weights (what a block mask could skip at best, independent of the kernels).

The output pass's tiles (``passes``' denominator) are the calls of ``tile_loop._accumulate`` (the output pass
visits every tile, with the block mask too).

Prints a Markdown table; ``x softmax`` is the forward score tiles relative to softmax's in the same run."""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections import Counter


def _wrap(module, name: str, key, counter: Counter):
    """Replace the jit function ``module.name`` by a Python function that counts its calls in
    ``counter[key()]`` (``key`` a callable: the count's name at call time)."""
    fn = getattr(module, name)

    def counted(*args, **kwargs):
        counter[key()] += 1
        return fn(*args, **kwargs)

    setattr(module, name, counted)


def count(spec: str, L: int, D: int, causal, inputs: str = "random") -> dict:
    """Counts of one normalizer: {"fwd": score tiles, "pv": P V tiles, "dq": dQ tiles, "dkdv": dK/dV tiles,
    "q_blocks", "k_blocks", "bn", "sparsity", ...} on ``inputs`` "random" or "structured"."""
    import torch

    import flashmaps
    from flashmaps import triton_configs, triton_path
    from flashmaps.functional import default_deterministic
    from flashmaps.kernels import backward, tile_loop, tiles

    counter: Counter = Counter()
    mode = ["fwd"]
    originals = [(m, n, getattr(m, n)) for m, n in ((tiles, "score_tile"), (tile_loop, "_accumulate"),
                                                     (tile_loop, "_accumulate_live"),
                                                     (backward, "_tile_weights"), (backward, "_dq_loop"),
                                                     (backward, "_dkdv_loop"))]
    _wrap(tiles, "score_tile", lambda: "fwd", counter)
    _wrap(tile_loop, "_accumulate", lambda: "out", counter)
    _wrap(tile_loop, "_accumulate_live", lambda: "pv", counter)
    _wrap(backward, "_tile_weights", lambda: mode[0], counter)

    def in_mode(name, m):
        fn = getattr(backward, name)

        def run(*args, **kwargs):
            mode[0] = m
            return fn(*args, **kwargs)

        setattr(backward, name, run)

    in_mode("_dq_loop", "dq")
    in_mode("_dkdv_loop", "dkdv")
    try:
        cls = triton_configs.dim_class(max(16, D), max(16, D))
        bm, bn, *_ = triton_configs.CONFIGS_BY_DIM[cls][0]
        dk = triton_configs.BWD_CONFIGS_BY_DIM["dkdv"][cls][0]
        dq = triton_configs.BWD_CONFIGS_BY_DIM["dq"][cls][0]
        gen = torch.Generator().manual_seed(0)
        q, k, v, dout = (torch.randn(1, 1, L, D, generator=gen) for _ in range(4))
        if inputs == "structured":
            from .structured import structured_qkv

            q, k, v = structured_qkv(1, 1, L, L, D, n_dirs=4, block=64, gap=6.0, seed=0)
        norm = flashmaps.parse(spec)
        t0 = time.time()
        res = triton_path.launch_forward(q, k, v, norm, causal=causal, save_extras=True, splits=1,
                                         config={"BM": bm, "BN": bn})
        if norm.triton(L)[0].has_backward:
            triton_path.launch_backward(dout, q, k, v, res.out, list(res.stats.values()), res.extras, norm,
                                        causal=causal, config={"dkdv": {"BM": dk[0], "BN": dk[1]},
                                                               "dq": {"BM": dq[0], "BN": dq[1]}})
        seconds = time.time() - t0
    finally:
        for m, n, fn in originals:
            setattr(m, n, fn)
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    if not counter["visited"]:
        counter["visited"] = counter["out"]
    return {**counter, "sparsity": _tile_sparsity(q, k, v, norm, causal, bm, bn), "q_blocks": cdiv(L, bm), "bm": bm, "bn": bn, "dq_blocks": cdiv(L, dq[0]),
            "dkdv_blocks": cdiv(L, dk[1]), "dq_tile": f"{dq[0]} x {dq[1]}", "dkdv_tile": f"{dk[0]} x {dk[1]}",
            "seconds": seconds, "atomic_dq": not default_deterministic()}


def _tile_sparsity(q, k, v, norm, causal, bm: int, bn: int) -> float:
    """Fraction of the BM x BN tiles with an allowed key whose float64 reference weights are all 0."""
    import torch

    from flashmaps import reference

    s, allowed = reference.scores_and_allowed(q, k, causal=causal or False, normalizer=norm)
    p = norm.reference_weights(s, allowed)[0, 0]                                               # (L, S)
    L, S = p.shape
    R, C = -(-L // bm), -(-S // bn)

    def tiles(x):
        pad = torch.zeros(R * bm, C * bn, dtype=torch.bool)
        pad[:L, :S] = x
        return pad.view(R, bm, C, bn).any(3).any(1)

    has_key, live = tiles(allowed[0, 0].expand(L, S)), tiles(p != 0)
    return 1.0 - live.sum().item() / max(1, has_key.sum().item())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--L", type=int, default=512, help="L = S")
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--norms", default=None, help="specs (default: every registered normalizer's default)")
    ap.add_argument("--inputs", default="random,structured", help="random (N(0, 1)) and/or structured inputs")
    ap.add_argument("--block-mask", choices=("on", "off"), default="on", help="the sparse units with (default here, "
                    "to count what it skips) or without it (the library's default: off, `triton_path.BLOCK_MASK`)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("workcount: set TRITON_INTERPRET=1 (the counters wrap the interpreted kernels)", file=sys.stderr)
        return 2
    import flashmaps
    from flashmaps import triton_path

    triton_path.BLOCK_MASK = args.block_mask == "on"
    norms = args.norms.split(",") if args.norms else [n.spec for n in flashmaps.defaults() if n.has_triton]
    print(f"L = S = {args.L}, D = {args.D}, fp32 inputs (seed 0): N(0, 1) (random) or `bench/structured.py` "
          f"(structured), default scale; block mask {args.block_mask} (the library's default: off); per query block of the "
          "forward (dQ), per key block of the dK/dV kernel; `passes`: forward score tiles / output-pass tiles "
          "visited (how many times a block streams K); `block sparsity`: dead BM x BN tiles / tiles with an "
          "allowed key (float64 reference). Method: `python -m flashmaps.bench.workcount` "
          "(bench/workcount.py: counters around the interpreted jit functions).\n")
    print("| normalizer | mask | inputs | block sparsity | fwd BM x BN | fwd score tiles | passes | x softmax | "
          "P V tiles | dQ tiles | dK/dV tiles |")
    print("|" + "---|" * 11)
    t0 = time.time()
    for inputs, causal in itertools.product(args.inputs.split(","), (None, "lower_right")):
        soft = None
        for spec in norms:
            c = count(spec, args.L, args.D, causal, inputs)
            fwd = c.get("fwd", 0) / c["q_blocks"]
            if spec == "softmax":
                soft = fwd
            print(f"| {spec} | {'causal' if causal else 'full'} | {inputs} | {100 * c['sparsity']:.1f}% | "
                  f"{c['bm']} x {c['bn']} | {fwd:.1f} | "
                  f"{c.get('fwd', 0) / max(1, c.get('visited', 0)):.2f} | {f'{fwd / soft:.2f}' if soft else '-'} | "
                  f"{c.get('pv', 0) / c['q_blocks']:.1f} | {dq_cell(c)} | "
                  f"{c.get('dkdv', 0) / c['dkdv_blocks']:.1f} ({c['dkdv_tile']}) |", flush=True)
    print(f"workcount: {time.time() - t0:.0f} s in the interpreter", file=sys.stderr)
    return 0


def dq_cell(c: dict) -> str:
    """The dQ column: tiles per query block of the dQ kernel, or where dQ is computed when there is none (the
    atomic-dQ backward adds it from the dK/dV kernel, whose column counts those tiles once)."""
    if c["atomic_dq"]:
        return "in dK/dV (atomic)"
    return f"{c.get('dq', 0) / c['dq_blocks']:.1f} ({c['dq_tile']})"


if __name__ == "__main__":
    raise SystemExit(main())
