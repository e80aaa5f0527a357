"""The named benchmark plans of ``flashmaps gpu-check`` (``python -m flashmaps.bench.gpucheck``): each suite
is a list of harness jobs (``harness.sweep`` rows), ordered case by case.

    h100-goals  bf16, D in {128, 64} with H = 2048 / D heads, L = S in {1k, 4k, 16k} with B * L = 16k
                tokens, causal (upper_left) and not. fwd: flashmaps (Triton) for every default normalizer,
                torch SDPA (default dispatch, flash, cuDNN) and FlexAttention; fwd+bwd: flashmaps and SDPA.
                Forward error against the float64 reference (one head) up to L = 4k.
                softmax's forward also on the persistent grid (knob ``flashmaps.triton_path.PERSISTENT``) at
                L in {1k, 2k} beside the default grid (issue 17 item 6).
    long        L = S = 128k, B = 1, H = 8, D = 128, bf16, not causal, every normalizer, fwd and fwd+bwd;
                32 sampled query rows of the forward checked against the reference over all keys
                (dense attention would need 256 GiB of bf16 scores).
    tune        the block-config sweep at L = S = 8k, B = 2, H = 2048 / D, D in {128, 64}, causal and not:
                the forward kernel (FWD_CONFIGS; the first normalizer at every candidate, the others at
                three), the backward kernels ("bwd" mode: dK/dV candidates with dQ pinned to its first,
                then dQ candidates with dK/dV pinned), the COLLECT pre-pass on and off for the sparse
                normalizers (knob ``flashmaps.kernels.<name>.COLLECT``, D = 128), and autotuned flashmaps
                fwd+bwd with SDPA (default, flash) at the same shapes.
    taylor-linear  the Triton linear form of taylor vs its quadratic kernel and SDPA flash: B = 1, H = 8,
                D = Dv = 16, bf16, causal, L = S 16k-128k, fwd and fwd+bwd (no jobs without taylor).
    decode      L = 1 against S = 4k-128k keys, B in {1, 8}, Hq = 32, Hkv = 8, D = 128, bf16: every normalizer,
                SDPA, FlexAttention and a device copy of K/V, as K/V GB/s (fraction of the copy's GB/s).

The softmax rows of h100-goals and decode (flashmaps softmax, SDPA) also time the call replayed from a CUDA
graph (``cudagraph_ms``, device-only) beside the eager time.

``Plan`` carries the choices every suite shares (normalizers, overrides of the grid, smoke). ``smoke``
shrinks the suites to tiny float32 shapes with 16 x 16 blocks, the sweep suites to their causal cases (the
long suite is not causal: both mask paths stay), and keeps one job per provider kind, mode and check:
every code path once, under Triton's interpreter on the CPU.
"""

from __future__ import annotations

import dataclasses

from flashmaps.normalizers import parse

from .harness import order_by_case, sweep
from .providers import default_normalizers, flashmaps_provider, get_provider, split_name, with_options

__all__ = ["Plan", "SUITES", "suite_jobs", "FWD_CONFIGS", "BWD_CONFIGS"]

#: tokens (batch x L) and width (heads x D) of the sweep suites
TOKENS, WIDTH = 16384, 2048

#: forward candidates per head dim: (BM, BN, num_warps, num_stages) (H100 sweeps, bench/TUNING.md)
FWD_CONFIGS = {
    128: [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (128, 128, 8, 3),
          (128, 32, 4, 3), (64, 128, 4, 2), (128, 64, 8, 2), (128, 64, 8, 4)],
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 128, 4, 3), (128, 64, 4, 4),
         (128, 128, 8, 4), (64, 128, 4, 3), (128, 64, 8, 3)],
}
#: backward candidates per kernel and head dim
BWD_CONFIGS = {
    "dkdv": {128: [(64, 32, 8, 2), (64, 32, 8, 1), (128, 32, 8, 2), (64, 64, 8, 2), (128, 64, 8, 2),
                   (64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2)],
             64: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 2),
                  (128, 128, 8, 2)]},
    "dq": {128: [(64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2),
                 (128, 128, 8, 2), (64, 128, 8, 2)],
           64: [(64, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2), (64, 128, 4, 2), (64, 64, 4, 3)]},
}
#: the forward config of the pre-pass variants
VARIANT_CONFIG = (64, 64, 4, 3)
#: the blocks every pinned config becomes in a smoke run (the interpreter's)
SMOKE_CONFIG = {"BM": 16, "BN": 16}
#: the h100-goals lengths that get the persistent forward grid's row (``flashmaps.triton_path.PERSISTENT``)
PERSISTENT_MAX_L = 2048


@dataclasses.dataclass
class Plan:
    """What every suite shares. ``dims`` overrides the head dims of h100-goals and tune, ``lengths`` and
    ``modes`` those of h100-goals; ``None`` keeps a suite's own."""

    device: str = "cuda"
    normalizers: tuple = ()
    dims: tuple | None = None
    lengths: tuple | None = None
    modes: tuple | None = None
    smoke: bool = False

    def __post_init__(self):
        self.normalizers = tuple(self.normalizers) or default_normalizers()


def _cfg(t) -> dict:
    return dict(zip(("BM", "BN", "num_warps", "num_stages"), t))


def _fm(spec: str, **config):
    return with_options(flashmaps_provider(spec, "triton"), config=config)


def _grid(plan: Plan, provs, *, dims, seqs, modes, causals=(None, "upper_left"), batches=("auto",),
          heads=None, **extra) -> list[dict]:
    causals = causals[-1:] if plan.smoke else causals
    jobs = []
    for D in dims:
        H = heads or max(1, WIDTH // D)
        jobs += sweep(device=plan.device, providers=provs, seqs=seqs, modes=modes, batches=batches, heads=[H],
                      head_dims=[D], causals=causals, dtypes=["bfloat16"], tokens=TOKENS, **extra)
    return jobs


def goals(plan: Plan) -> list[dict]:
    fm = [flashmaps_provider(n, "triton") for n in plan.normalizers]
    sdpa = [get_provider(n) for n in ("sdpa", "sdpa-flash", "sdpa-cudnn")]
    dims, seqs = plan.dims or (128, 64), plan.lengths or (1024, 4096, 16384)
    jobs = []
    # the two-kernel deterministic backward beside the default atomic-dQ one (issue 17 item 3)
    det = [with_options(flashmaps_provider("softmax", "triton"), knobs={"flashmaps.functional.DETERMINISTIC": True})
           for n in plan.normalizers if n == "softmax"]
    # K and V through TMA descriptors beside the pointer loads (issue 17 item 6; off by default until timed)
    tma = [with_options(flashmaps_provider(n, "triton"), knobs={"flashmaps.triton_path.TMA_KV": True})
           for n in plan.normalizers if n in ("softmax", "entmax15")]
    # entmax15 with the block mask (issue 17 item 5; off by default: on random inputs it skips nothing, so this
    # row is its cost; the structured rows below what it saves)
    nomask = [with_options(flashmaps_provider(n, "triton"), knobs={"flashmaps.triton_path.BLOCK_MASK": True})
              for n in plan.normalizers if n == "entmax15"]
    for mode in plan.modes or ("fwd", "fwd+bwd"):
        provs = fm + tma + sdpa + [get_provider("flex")] if mode == "fwd" else fm + det + nomask + sdpa[:1]
        jobs += _grid(plan, provs, dims=dims, seqs=seqs, modes=[mode])
    # softmax's forward on a persistent grid beside the default grid at the short lengths (issue 17 item 6; off by
    # default until timed): L <= PERSISTENT_MAX_L of the lengths, (1k, 2k) by default, the default softmax added where
    # the grid above has no such length
    if "softmax" in plan.normalizers and "fwd" in (plan.modes or ("fwd",)):
        soft = flashmaps_provider("softmax", "triton")
        pers = with_options(soft, knobs={"flashmaps.triton_path.PERSISTENT": True})
        short = [L for L in plan.lengths if L <= PERSISTENT_MAX_L] if plan.lengths else [1024, 2048]
        jobs += _grid(plan, [pers], dims=dims, seqs=short, modes=["fwd"])
        jobs += _grid(plan, [soft], dims=dims, seqs=[L for L in short if L not in seqs], modes=["fwd"])
    for j in jobs:  # the forward against the float64 reference where one head of it fits
        if j["mode"] == "fwd" and j["L"] <= 4096:
            j.update(check=True, max_ref_elems=1 << 24)
    return _graph_timed(jobs)


def _graph_timed(jobs: list[dict]) -> list[dict]:
    """Issue 17: the softmax rows (flashmaps softmax and SDPA) also get the device-only time of the call replayed
    from a CUDA graph (``cudagraph_ms``) beside the eager time: the difference is the per-call host cost."""
    for j in jobs:
        p = get_provider(j["provider"])
        if p.normalizer == "softmax" and p.family in ("flashmaps", "sdpa"):
            j["cudagraph"] = True
    return jobs


def long(plan: Plan) -> list[dict]:
    provs = [flashmaps_provider(n, "triton") for n in plan.normalizers]
    jobs = _grid(plan, provs, dims=[128], seqs=[131072], modes=["fwd", "fwd+bwd"], causals=[None], batches=[1],
                 heads=8)
    for j in jobs:
        if j["mode"] == "fwd":
            j["check_rows"] = 32
    return jobs


def tune(plan: Plan) -> list[dict]:
    first, others = plan.normalizers[0], plan.normalizers[1:]
    dims = plan.dims or (128, 64)
    jobs = []
    for D in dims:
        fwd = FWD_CONFIGS.get(D) or FWD_CONFIGS[128]
        dkdv, dq = (BWD_CONFIGS[k].get(D) or BWD_CONFIGS[k][128] for k in ("dkdv", "dq"))
        provs = {"fwd": [_fm(first, fwd=_cfg(c)) for c in fwd] + [_fm(n, fwd=_cfg(c)) for n in others for c in fwd[:3]],
                 "bwd": [_fm(first, dkdv=_cfg(c), dq=_cfg(dq[0])) for c in dkdv]
                 + [_fm(first, dkdv=_cfg(dkdv[0]), dq=_cfg(c)) for c in dq[1:]]
                 + [_fm(n, dkdv=_cfg(dkdv[0]), dq=_cfg(dq[0])) for n in others],
                 "fwd+bwd": [flashmaps_provider(n, "triton") for n in plan.normalizers]
                 + [get_provider(n) for n in ("sdpa", "sdpa-flash")]}
        provs["fwd"] += [get_provider(n) for n in ("sdpa", "sdpa-flash")]
        if D == (128 if 128 in dims else dims[0]):  # the pre-pass variants, at one head dim
            sparse = [n for n in plan.normalizers if parse(n).sparse]
            provs["fwd"] += [with_options(_fm(n, fwd=_cfg(VARIANT_CONFIG)),
                                          knobs={f"flashmaps.kernels.{parse(n).name}.COLLECT": on})
                             for n in sparse for on in (False, True)]
        for mode, ps in provs.items():
            jobs += _grid(plan, ps, dims=[D], seqs=[8192], modes=[mode])
    return jobs


def taylor_linear(plan: Plan) -> list[dict]:
    """Issue 14 on the GPU: each normalizer with a linear form (taylor), its Triton linear kernel against its
    quadratic kernel and SDPA (flash) at B = 1, H = 8, D = Dv = 16, bf16, causal, L = S 16k to 128k, fwd
    and fwd+bwd; 32 sampled forward rows checked. The linear rows' TFLOP/s count flops.linear_flops."""
    specs = [n for n in plan.normalizers if "linear" in parse(n).forms]
    provs = [flashmaps_provider(n, "triton", form) for n in specs for form in ("linear", "quadratic")]
    if not provs:
        return []
    jobs = _grid(plan, provs + [get_provider("sdpa-flash")], dims=[16], seqs=[16384, 32768, 65536, 131072],
                 modes=["fwd", "fwd+bwd"], causals=("upper_left",), batches=[1], heads=8)
    for j in jobs:
        if j["mode"] == "fwd":
            j["check_rows"] = 32
    return jobs


def decode(plan: Plan) -> list[dict]:
    """Issue 13 on the GPU: decoding (L = 1) at B in {1, 8}, Hq = 32, Hkv = 8, D = 128, bf16, S 4k to 128k:
    every normalizer's Triton forward (split-KV where its merge rule allows), SDPA (default, flash),
    FlexAttention and a device copy of K and V (the bandwidth yardstick), as K/V GB/s; the forward checked
    against the reference on sampled rows."""
    provs = [flashmaps_provider(n, "triton") for n in plan.normalizers]
    provs += [get_provider(n) for n in ("sdpa", "sdpa-flash", "flex", "device-copy")]
    jobs = []
    for B in (1, 8):
        jobs += sweep(device=plan.device, providers=provs, seqs=plan.lengths or (4096, 16384, 65536, 131072),
                      modes=["decode"], batches=[B], heads=[32], kv_heads=[8], head_dims=[128], causals=[None],
                      dtypes=["bfloat16"])
    for j in jobs:
        if not j["provider"].startswith("device-copy"):
            j["check_rows"] = 1
    return _graph_timed(jobs)


#: suite name -> jobs of a Plan
SUITES = {"h100-goals": goals, "long": long, "tune": tune, "taylor-linear": taylor_linear, "decode": decode}


def _shrunk(job: dict) -> dict:
    """A job at smoke size: D = 16, 2 heads, B = 1, L = S = 32, float32, pinned configs 16 x 16."""
    base, config, knobs, tree = split_name(job["provider"])
    name = job["provider"]
    if config:
        name = with_options(get_provider(base), {k: SMOKE_CONFIG for k in config}, knobs, tree).name
    small = dict(job, provider=name, B=1, Hq=2, Hkv=2, L=min(job["L"], 32), S=min(job["S"], 32), Dqk=16, Dv=16,
                 dtype="float32", min_run_time=0.0, min_runs=1)
    if small.get("check_rows"):
        small["check_rows"] = 8
    return small


def suite_jobs(names, plan: Plan) -> list[dict]:
    """The jobs of the suites ``names`` in order, each tagged with its suite, ordered case by case
    (``harness.order_by_case``); at smoke size when ``plan.smoke``, one job per distinct case."""
    out, seen = [], set()
    for name in names:
        if name not in SUITES:
            raise ValueError(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
        jobs = [dict(j, suite=name) for j in SUITES[name](plan)]
        if plan.smoke:
            small = []
            for j in map(_shrunk, jobs):
                if _smoke_key(j) not in seen:
                    seen.add(_smoke_key(j))
                    small.append(j)
            jobs = small
        out += order_by_case(jobs)
    return out


def _smoke_key(job: dict) -> tuple:
    """What a smoke run keeps one job of (the first): the provider without its config values and knob
    values, the mode and whether the error check samples rows."""
    base, config, knobs, _ = split_name(job["provider"])
    return base, tuple(sorted(config)), tuple(sorted(knobs)), job["mode"], bool(job.get("check_rows"))
