"""The Triton backend: launches the forward kernel (``flashmaps.kernels.tile_loop.attn_fwd``) and the
backward kernels (``flashmaps.kernels.backward``).

Entry points of the backend contract (wrapped as torch.library custom ops by :mod:`flashmaps.ops`;
inputs already validated), on CUDA tensors or on CPU tensors under ``TRITON_INTERPRET=1``::

    forward(q, k, v, normalizer, *, mask, causal, scale, softcap, dropout_p, seed, need_grad)
        -> (out (B, Hq, L, Dv) in v's dtype, [stat (B, Hq, L) fp32 in normalizer.stats order], aux)
    aux_shape(normalizer, q, k, v, need_grad) -> shape of aux (1-D fp32; see `unpack_aux`)
    backward(dout, q, k, v, out, stats, aux, normalizer, *, mask, causal, scale, softcap, dropout_p, seed)
        -> (dq, dk, dv) in the dtypes of q, k, v (aux: the one forward() returned with need_grad=True)
    attention(q, k, v, normalizer, *, mask, causal, scale, softcap, dropout_p, return_stats)

:func:`launch_forward` / :func:`launch_backward` are the launchers themselves (pinned configs, the saved
extras by name); ``aux`` packs what the FlashAttention-2 style backward needs besides q, k, v, out and
the stats (`unpack_aux`). Dropout: ``seed`` (an int, e.g. :func:`flashmaps.torch_path.draw_seed`) and
``dropout_p`` give the keep mask of :func:`dropout_keep_mask`, regenerated identically by the backward.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch
import triton

from .kernels import common, hooks_for
from .kernels.backward import attn_bwd_dkdv, attn_bwd_dq, attn_bwd_preprocess
from .kernels.tile_loop import attn_fwd
from .normalizers import Normalizer

__all__ = ["attention", "forward", "backward", "aux_shape", "unpack_aux", "launch_forward",
           "launch_backward", "dropout_keep_mask", "Forward", "SUPPORTS_BACKWARD", "SUPPORTS_DROPOUT"]

#: gradients w.r.t. q, k, v through the Triton backward kernels
SUPPORTS_BACKWARD = True
#: dropout inside the kernels (Philox, regenerated in the backward)
SUPPORTS_DROPOUT = True

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
#: blocks under the interpreter: small, so that small test shapes still span several tiles
INTERPRET_CONFIG = {"BM": 16, "BN": 16}


class Forward(NamedTuple):
    """Result of :func:`launch_forward`.

    out: (B, Hq, L, Dv) in v's dtype. stats: the public row statistics {name: (B, Hq, L) fp32}.
    saved: what the backward needs besides q, k, v, out and stats (all fp32, contiguous):
      ``par``   (B, Hq, L) the pre-pass threshold in kernel units (entmax15: tau in z units, equal to
                stats["tau"]; topk: tau_k * LOG2E, exactly the value the kernel compared s >= against),
      ``sum_g`` (B, Hq, L) and ``o2`` (B, Hq, L, Dv): entmax15 with ``save_aux=True`` only.
      (views into ``aux``)
    score_unit: the factor u of the kernel's scores (s_kernel = u * s_natural; see kernels.common).
    aux: the packed 1-D fp32 buffer holding ``saved`` (see `unpack_aux`).
    """

    out: torch.Tensor
    stats: dict
    saved: dict
    score_unit: float
    aux: torch.Tensor


#: the scratch rows of a (batch, head) are padded to a multiple of this (the largest BM of any config)
SCRATCH_ROW_BLOCK = 128


def _bucket(n: int) -> int:
    """Autotune length bucket: the next power of two, at least 256."""
    return max(256, common.next_pow2(n))


#: autotune candidates per padded head-dim class (max(BD, BDV) <= 64, <= 128, <= 256):
#: (BM, BN, num_warps, num_stages), from the H100 sweeps (bench/TUNING.md; softmax, L = S = 8k, bf16, not
#: causal): D = 128 (128, 128, 8, 3) 2.38 ms, (64, 64, 4, 3) 2.67, (128, 64, 8, 3) 2.71; D = 64 (128, 64, 8, 3)
#: 2.65 ms, (128, 128, 4, 3) 2.67, (64, 64, 4, 3) 2.82 (earlier first pick (128, 64, 4, 3): 3.09). entmax15 and
#: top-k were fastest at (64, 64, 4, 3) for both head dims.
CONFIGS_BY_DIM = {
    64: ((128, 64, 8, 3), (128, 128, 4, 3), (64, 64, 4, 3)),
    128: ((128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)),
    256: ((64, 64, 8, 2), (64, 32, 4, 2), (64, 64, 4, 2)),
}
#: added for fp32 inputs: small enough to fit whatever the others need (fp32 with 3xTF32 stores each streamed
#: operand twice, see `_fit_smem`), so that autotuning never ends with every candidate out of resources
FP32_FALLBACK = (64, 32, 4, 1)


def _dim_class(bd: int, bdv: int) -> int:
    return next(c for c in CONFIGS_BY_DIM if max(bd, bdv) <= c)


def _configs():
    seen = {c for cs in CONFIGS_BY_DIM.values() for c in cs}
    return [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in sorted(seen)]


#: fraction of the device's shared memory the estimate below may use: the estimate matched both figures the
#: H100 reported (see `smem_estimate`), and a candidate that still does not fit is skipped by the autotuner
SMEM_FRACTION = 1.0


def _smem_budget(t: torch.Tensor) -> int:
    if t.device.type != "cuda":
        return 1 << 62  # the interpreter has no shared memory limit
    props = triton.runtime.driver.active.utils.get_device_properties(t.device.index or 0)
    return int(props["max_shared_mem"] * SMEM_FRACTION)


def smem_estimate(blocks: dict, stages: int, esize: int, streamed: str, streamed_cols: int,
                  resident_cols: int) -> int:
    """Shared memory (bytes) of a kernel that keeps ``stages`` copies of the streamed tiles (``streamed``
    block rows x ``streamed_cols``) plus one resident tile (the other block x ``resident_cols``).
    Checked against the H100 twice (both fp32 forwards, 262144 bytes): D = 128 with BM = 128, BN = 64,
    3 stages, ieee dot: 3 * 64 * 256 * 4 + 128 * 128 * 4; and D = 72, Dv = 64 (BD = 128, BDV = 64) with
    BM = 128, BN = 64, 2 stages, 3xTF32 dot (which keeps a high and a low part of each streamed operand:
    ``streamed_cols`` doubled by the caller): 2 * 64 * 384 * 4 + 128 * 128 * 4."""
    resident = "BN" if streamed == "BM" else "BM"
    return (stages * blocks[streamed] * streamed_cols + blocks[resident] * resident_cols) * esize


def _fit_smem(configs, esize: int, budget: int, streamed: str, streamed_cols: int, resident_cols: int):
    """Shrink the configs whose `smem_estimate` exceeds ``budget`` bytes: fewer stages first, then half
    the streamed block. The configs are written for 2-byte inputs; fp32 needs twice the memory (found on
    the H100: every fp32 candidate at D = 128 failed with OutOfResources before this step), and fp32 gets
    the `FP32_FALLBACK` candidate too."""
    if esize >= 4:
        bm, bn, w, st = FP32_FALLBACK
        configs = list(configs) + [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st)]
    out, seen = [], set()
    for c in configs:
        blocks, stages = dict(c.kwargs), c.num_stages

        def need():
            return smem_estimate(blocks, stages, esize, streamed, streamed_cols, resident_cols)

        while need() > budget and stages > 1:
            stages -= 1
        while need() > budget and blocks[streamed] > 16:
            blocks[streamed] //= 2
        key = (blocks["BM"], blocks["BN"], c.num_warps, stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config(blocks, num_warps=c.num_warps, num_stages=stages))
    return out


def _prune(configs, named_args, **kwargs):
    """Keep the candidates of the head-dim class (registers and shared memory scale with BD, BDV), shrunk
    to fit the shared memory for the input dtype."""
    want = set(CONFIGS_BY_DIM[_dim_class(kwargs["BD"], kwargs["BDV"])])
    kept = [c for c in configs if (c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages) in want]
    q = named_args["Q"]
    # the forward streams k and v tiles (BN x (BD + BDV)) past the resident q tile (BM x BD)
    bd, bdv = kwargs["BD"], kwargs["BDV"]
    return _fit_smem(kept, q.element_size(), _smem_budget(q), "BN", (bd + bdv) * _operand_copies(kwargs), bd)


def _operand_copies(kwargs) -> int:
    """Copies of each streamed operand in shared memory: 2 for the 3xTF32 dot (high and low parts)."""
    return 2 if kwargs["DOT_PREC"] == "tf32x3" else 1


_KEYS = ["HEAD_D", "HEAD_DV", "L_BUCKET", "S_BUCKET", "NORM", "NORM_CONST", "IS_CAUSAL", "MASK_KIND",
         "SOFTCAP", "AUX", "DOT_PREC", "DROPOUT"]
_attn_fwd_tuned = triton.autotune(configs=_configs(), key=_KEYS,
                                  prune_configs_by={"early_config_prune": _prune})(attn_fwd)


def _dot_precision(dtype: torch.dtype) -> str:
    if _INTERPRET:
        return "upcast" if dtype == torch.bfloat16 else "ieee"   # see DOT_PREC in kernels/common.py
    if dtype != torch.float32:
        return "ieee"
    # fp32 inputs: follow torch's matmul setting; without TF32 use 3xTF32 (about fp32 accuracy)
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def _aux_parts(normalizer: Normalizer, B: int, Hq: int, L: int, Dv: int, need_grad: bool) -> list:
    """[(name, shape)] of the packed aux buffer, in order: "par" (normalizers with a pre-pass), then
    "sum_g" and "o2" (normalizers with a second weighted sum, when gradients are needed)."""
    hooks = hooks_for(normalizer.name)
    parts = [("par", (B, Hq, L))] if hooks.has_prepass else []
    if need_grad and hooks.has_aux:
        parts += [("sum_g", (B, Hq, L)), ("o2", (B, Hq, L, Dv))]
    return parts


def aux_shape(normalizer: Normalizer, q, k, v, need_grad: bool) -> tuple[int, ...]:
    """Shape of the packed aux tensor returned by :func:`forward`: (total elements,)."""
    B, Hq, L = q.shape[:3]
    return (sum(math.prod(shape) for _, shape in _aux_parts(normalizer, B, Hq, L, v.shape[3], need_grad)),)


def unpack_aux(aux: torch.Tensor, normalizer: Normalizer, q, v, need_grad: bool) -> dict:
    """The named contiguous views of a packed aux buffer: {"par": (B, Hq, L), "sum_g": (B, Hq, L),
    "o2": (B, Hq, L, Dv)}, as present (see `Forward.saved` for their meaning)."""
    B, Hq, L = q.shape[:3]
    views, at = {}, 0
    for name, shape in _aux_parts(normalizer, B, Hq, L, v.shape[3], need_grad):
        n = math.prod(shape)
        views[name] = aux[at: at + n].view(shape)
        at += n
    return views


def _mask_args(mask: Optional[torch.Tensor], dummy: torch.Tensor):
    """(MASK_KIND, tensor to pass, its 4 strides, mask_min) of a (B, Hq, L, S) mask view or None."""
    if mask is None:
        return common.MASK_NONE, dummy, (0, 0, 0, 0), 0.0
    if mask.dtype == torch.bool:
        mask_t = mask.view(torch.uint8)                 # same strides, no copy
        return common.MASK_BOOL, mask_t, mask_t.stride(), 0.0
    # entries <= finfo.min (and -inf) exclude the key
    return common.MASK_FLOAT, mask, mask.stride(), float(torch.finfo(mask.dtype).min)


def _dropout_args(dropout_p: float, seed: int) -> tuple:
    """(seed, dropout_p, 1 / (1 - dropout_p)) kernel scalars."""
    return int(seed), float(dropout_p), 1.0 / (1.0 - float(dropout_p))


def _split_config(config: dict) -> tuple[dict, dict]:
    """{"BM", "BN", ...} -> (block constexprs, launch options num_warps / num_stages)."""
    cfg = dict(config)
    launch = {k_: cfg.pop(k_) for k_ in ("num_warps", "num_stages") if k_ in cfg}
    return cfg, launch


def launch_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, normalizer: Normalizer, *,
                   mask: Optional[torch.Tensor] = None, causal: Optional[str] = None,
                   scale: Optional[float] = None, softcap: Optional[float] = None,
                   save_aux: bool = False, dropout_p: float = 0.0, seed: int = 0,
                   config: Optional[dict] = None) -> Forward:
    """Run the forward kernel. q (B, Hq, L, Dqk), k (B, Hkv, S, Dqk), v (B, Hkv, S, Dv), any strides;
    mask None or a (B, Hq, L, S) bool/float view; causal None | "upper_left" | "lower_right".
    ``dropout_p`` > 0 drops weights with the keep mask of ``seed`` (:func:`dropout_keep_mask`).

    ``save_aux`` also computes the normalizer's backward extras (entmax15: sum_g and O2).
    ``config`` pins the blocks, e.g. {"BM": 64, "BN": 32, "num_warps": 4, "num_stages": 2},
    instead of autotuning (CUDA) or the interpreter's small blocks."""
    hooks = hooks_for(normalizer.name)
    B, Hq, L, D = q.shape
    Hkv, S, DV = k.shape[1], k.shape[2], v.shape[3]
    dev = q.device
    if scale is None:
        scale = 1.0 / math.sqrt(D)

    out = torch.empty((B, Hq, L, DV), dtype=v.dtype, device=dev)
    stats_t = [torch.empty((B, Hq, L), dtype=torch.float32, device=dev) for _ in hooks.stats]
    stat0 = stats_t[0]
    stat1 = stats_t[1] if len(stats_t) > 1 else stat0
    aux_buf = torch.empty(aux_shape(normalizer, q, k, v, save_aux), dtype=torch.float32, device=dev)
    saved = unpack_aux(aux_buf, normalizer, q, v, save_aux)
    aux = "o2" in saved
    par = saved.get("par", stat0)
    aux_l = saved.get("sum_g", stat0)
    aux_o = saved.get("o2", stat0)

    mask_kind, mask_t, mstr, mask_min = _mask_args(mask, stat0)

    qk_scale, cap_mult = common.fold_score_unit(scale, softcap, hooks.score_unit)
    norm_arg, norm_const = hooks.prepass_config(normalizer, S) if hooks.prepass_config else (0, 0)
    kc = hooks.scratch_cols(normalizer, S) if hooks.scratch_cols else 0
    l_pad = triton.cdiv(L, SCRATCH_ROW_BLOCK) * SCRATCH_ROW_BLOCK      # every row a program may touch
    scratch = torch.empty((B * Hq * l_pad, kc), dtype=torch.float32, device=dev) if kc else stat0
    causal_off = (S - L) if causal == "lower_right" else 0
    BD, BDV = max(16, common.next_pow2(D)), max(16, common.next_pow2(DV))

    args = (q, k, v, out, mask_t, stat0, stat1, par, aux_l, aux_o, scratch,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mstr,
            Hq, Hq // Hkv, L, S, causal_off,
            float(qk_scale), float(cap_mult), float(hooks.score_unit), mask_min, float(norm_arg),
            *_dropout_args(dropout_p, seed), _bucket(L), _bucket(S), l_pad)
    meta = dict(
        HEAD_D=D, HEAD_DV=DV, BD=BD, BDV=BDV,
        IS_CAUSAL=causal is not None, MASK_KIND=mask_kind, SOFTCAP=softcap is not None,
        DOT_PREC=_dot_precision(q.dtype), NORM=hooks.name,
        UPDATE=hooks.update, FINALIZE=hooks.finalize, RESCALE=hooks.rescale, NUM_STATS=len(hooks.stats),
        HAS_PREPASS=hooks.has_prepass, PREPASS=hooks.prepass or common.no_prepass, NORM_CONST=norm_const,
        SKIP_DEAD=hooks.tile_live is not None, TILE_LIVE=hooks.tile_live or common.always_live,
        AUX=aux, AUX_WEIGHTS=hooks.aux_weights or common.no_aux_weights,
        AUX_FINALIZE=hooks.aux_finalize or common.no_aux_finalize, DROPOUT=dropout_p > 0,
        SCRATCH_COLS=kc,
    )
    if config is None and _INTERPRET:
        config = INTERPRET_CONFIG
    if config is not None:
        cfg, launch = _split_config(config)
        grid = (triton.cdiv(L, cfg["BM"]), B * Hq)
        attn_fwd[grid](*args, **meta, **cfg, **launch)
    else:
        grid = lambda META: (triton.cdiv(L, META["BM"]), B * Hq)  # noqa: E731
        _attn_fwd_tuned[grid](*args, **meta)

    return Forward(out, dict(zip(hooks.stats, stats_t)), saved, hooks.score_unit, aux_buf)


def forward(q, k, v, normalizer: Normalizer, *, mask, causal, scale, softcap, dropout_p, seed, need_grad,
            config: Optional[dict] = None):
    """The custom op's forward (see the module docstring): (out, [stats], aux); ``need_grad`` also
    saves the backward extras in aux (entmax15's O2)."""
    if need_grad and not hooks_for(normalizer.name).has_backward:
        raise NotImplementedError(
            f"the normalizer {normalizer.name!r} has no Triton backward hooks (bwd_rows, bwd_weights, "
            "bwd_dscores in its kernels module); use backend='torch' for gradients"
        )
    res = launch_forward(q, k, v, normalizer, mask=mask, causal=causal, scale=scale, softcap=softcap,
                         save_aux=need_grad, dropout_p=dropout_p, seed=seed, config=config)
    return res.out, list(res.stats.values()), res.aux


# ---------------------------------------------------------------------------------------------------
# backward

#: backward autotune candidates per padded head-dim class: (BM, BN, num_warps, num_stages). The dK/dV
#: kernel keeps k, v, dk, dv tiles [BN, D] resident and streams BM query rows; the dQ kernel keeps q, dO,
#: dq [BM, D] and streams BN keys. D = 128 from the H100 sweep (bench/TUNING.md; softmax, L = S = 8k,
#: bf16, not causal): dK/dV (64, 64, 4, 2) 12.6 ms and (128, 64, 8, 2) 13.1 ms against 22.2 ms for the
#: earlier (64, 32, 8, 2), whose 8 warps on 32-key tiles starved the MMAs; dQ (128, 128, 8, 2) and
#: (64, 64, 4, 2) each 4.5-5 ms faster than (64, 64, 8, 2). D = 64 (second sweep, same shapes): dK/dV
#: (64, 64, 4, 3) 9.18 ms, (128, 128, 8, 2) 9.28, (64, 64, 4, 2) 10.17; dQ (64, 64, 4, 3) 0.6 ms faster than
#: (64, 64, 4, 2). D = 256 keeps the small blocks that compile without register spills (ptxas, not timed).
#: BM >= 64 up to D = 128, like the forward, so that the recomputed score tiles go through the same MMA
#: shape (top-k compares them against the forward's threshold).
BWD_CONFIGS_BY_DIM = {
    "dkdv": {64: ((64, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 2)), 128: ((64, 64, 4, 2), (128, 64, 8, 2)),
             256: ((32, 16, 4, 1),)},
    "dq": {64: ((64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 4, 2)),
           128: ((128, 128, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2)),
           256: ((32, 32, 4, 1), (32, 16, 4, 1))},
}
_BWD_KEYS = ["HEAD_D", "HEAD_DV", "L_BUCKET", "S_BUCKET", "IS_CAUSAL", "MASK_KIND", "SOFTCAP", "DOT_PREC",
             "DROPOUT", "SKIP_DEAD", "WEIGHTS", "DSCORES"]


def _bwd_tuned(kernel, which: str):
    table = BWD_CONFIGS_BY_DIM[which]
    seen = sorted({c for cs in table.values() for c in cs})
    configs = [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in seen]

    def prune(configs, named_args, **kwargs):
        want = set(table[_dim_class(kwargs["BD"], kwargs["BDV"])])
        kept = [c for c in configs if (c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages) in want]
        q = named_args["Q"]
        # dK/dV streams query rows (q, dO) past resident k, v tiles; dQ streams keys past resident q, dO
        cols = kwargs["BD"] + kwargs["BDV"]
        return _fit_smem(kept, q.element_size(), _smem_budget(q), "BM" if which == "dkdv" else "BN",
                         cols * _operand_copies(kwargs), cols)

    return triton.autotune(configs=configs, key=_BWD_KEYS,
                           prune_configs_by={"early_config_prune": prune})(kernel)


_attn_bwd_dkdv_tuned = _bwd_tuned(attn_bwd_dkdv, "dkdv")
_attn_bwd_dq_tuned = _bwd_tuned(attn_bwd_dq, "dq")
#: rows per program of the preprocess kernel (delta and the row statistics: memory bound)
_PRE_BM = 64


def launch_backward(dout, q, k, v, out, stats, aux, normalizer: Normalizer, *, mask=None, causal=None,
                    scale=None, softcap=None, dropout_p: float = 0.0, seed: int = 0,
                    config: Optional[dict] = None):
    """Gradients (dq, dk, dv) of the attention computed by :func:`launch_forward` (with save_aux=True,
    the same mask / causal / scale / softcap / dropout_p / seed), given dout (B, Hq, L, Dv), any strides.
    ``stats``: the public row statistics in ``normalizer.stats`` order; ``aux``: the packed buffer.

    Three launches (``kernels.backward``): the preprocess kernel (delta = rowsum(dO * O), or O2 for
    entmax15, and the rows' backward statistics), then dK/dV over key blocks and dQ over query blocks,
    both recomputing scores and weights tile by tile. ``config`` pins the blocks of both kernels (as in
    launch_forward) instead of autotuning (CUDA) or the interpreter's small blocks, or of each kernel:
    ``{"dkdv": {...}, "dq": {...}}`` (a kernel left out is autotuned)."""
    hooks = hooks_for(normalizer.name)
    if not hooks.has_backward:
        raise NotImplementedError(f"the normalizer {normalizer.name!r} has no Triton backward hooks")
    B, Hq, L, D = q.shape
    Hkv, S, DV = k.shape[1], k.shape[2], v.shape[3]
    dev = q.device
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    views = unpack_aux(aux, normalizer, q, v, True)
    if hooks.has_aux and "o2" not in views:
        raise ValueError("launch_backward: aux lacks the backward extras (entmax15's O2); run the forward "
                         "with need_grad=True")
    stat0 = stats[0].contiguous()
    stat1 = stats[1].contiguous() if len(stats) > 1 else stat0
    par = views.get("par", stat0)
    aux_l = views.get("sum_g", stat0)
    o_bwd = views["o2"] if hooks.has_aux else out        # the row term is taken against O2 for entmax15
    BD, BDV = max(16, common.next_pow2(D)), max(16, common.next_pow2(DV))

    # delta = rowsum(dO * O_bwd); (r0, r1) = BWD_ROWS(stats, par, sum_g): (B, Hq, L) fp32 each
    rows = torch.empty((3, B, Hq, L), dtype=torch.float32, device=dev)
    delta, r0, r1 = rows.unbind(0)
    pre_bm = INTERPRET_CONFIG["BM"] if _INTERPRET else _PRE_BM
    attn_bwd_preprocess[(triton.cdiv(L, pre_bm), B * Hq)](
        o_bwd, dout, stat0, stat1, par, aux_l, delta, r0, r1,
        *o_bwd.stride(), *dout.stride(), Hq, L, HEAD_DV=DV, BDV=BDV, BM=pre_bm, ROWS=hooks.bwd_rows)

    mask_kind, mask_t, mstr, mask_min = _mask_args(mask, stat0)
    qk_scale, cap_mult = common.fold_score_unit(scale, softcap, hooks.score_unit)
    causal_off = (S - L) if causal == "lower_right" else 0
    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    dk = torch.empty(k.shape, dtype=k.dtype, device=dev)
    dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
    scalars = (float(qk_scale), float(cap_mult), float(hooks.score_unit), mask_min, float(scale),
               *_dropout_args(dropout_p, seed), _bucket(L), _bucket(S))
    meta = dict(
        HEAD_D=D, HEAD_DV=DV, BD=BD, BDV=BDV, IS_CAUSAL=causal is not None, MASK_KIND=mask_kind,
        SOFTCAP=softcap is not None, DOT_PREC=_dot_precision(q.dtype), DROPOUT=dropout_p > 0,
        SKIP_DEAD=hooks.tile_live is not None, WEIGHTS=hooks.bwd_weights, DSCORES=hooks.bwd_dscores,
    )
    dkdv_args = (q, k, v, dout, mask_t, delta, r0, r1, dk, dv,
                 *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(), *mstr,
                 Hq, Hkv, Hq // Hkv, L, S, causal_off, *scalars)
    dq_args = (q, k, v, dout, mask_t, delta, r0, r1, dq,
               *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), *mstr,
               Hq, Hq // Hkv, L, S, causal_off, *scalars)
    if config is None and _INTERPRET:
        config = INTERPRET_CONFIG
    # config: one dict for both kernels, or {"dkdv": {...}, "dq": {...}} (either may be left out: autotune)
    per_kernel = config if config is not None and ("dkdv" in config or "dq" in config) else \
        {"dkdv": config, "dq": config}
    if per_kernel.get("dkdv") is not None:
        cfg, launch = _split_config(per_kernel["dkdv"])
        attn_bwd_dkdv[(triton.cdiv(S, cfg["BN"]), B * Hkv)](*dkdv_args, **meta, **cfg, **launch)
    else:
        _attn_bwd_dkdv_tuned[lambda META: (triton.cdiv(S, META["BN"]), B * Hkv)](*dkdv_args, **meta)
    if per_kernel.get("dq") is not None:
        cfg, launch = _split_config(per_kernel["dq"])
        attn_bwd_dq[(triton.cdiv(L, cfg["BM"]), B * Hq)](*dq_args, **meta, **cfg, **launch)
    else:
        _attn_bwd_dq_tuned[lambda META: (triton.cdiv(L, META["BM"]), B * Hq)](*dq_args, **meta)
    return dq, dk, dv


def backward(dout, q, k, v, out, stats, aux, normalizer: Normalizer, *, mask, causal, scale, softcap,
             dropout_p, seed, config: Optional[dict] = None):
    """The custom op's backward (see the module docstring): (dq, dk, dv)."""
    return launch_backward(dout, q, k, v, out, stats, aux, normalizer, mask=mask, causal=causal,
                           scale=scale, softcap=softcap, dropout_p=dropout_p, seed=seed, config=config)


def dropout_keep_mask(seed: int, shape, dropout_p: float, device=None) -> torch.Tensor:
    """The bool keep mask (B, Hq, L, S) the kernels use for ``seed`` (forward and backward): the weights
    applied are ``p * keep / (1 - dropout_p)``. Materializes (B, Hq, L, S): for tests, small sizes."""
    B, Hq, L, S = shape
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    keep = torch.empty((B, Hq, L, S), dtype=torch.uint8, device=device)
    bm, bn = 16, 64
    common.dropout_mask_kernel[(triton.cdiv(L, bm), triton.cdiv(S, bn), B * Hq)](
        keep, int(seed), float(dropout_p), L, S, BM=bm, BN=bn)
    return keep.bool()


def attention(q, k, v, normalizer: Normalizer, *, mask, causal, scale, softcap, dropout_p, return_stats,
              seed=None):
    """The backend contract of :mod:`flashmaps.functional`: out (B, Hq, L, Dv), or (out, stats dict)
    with return_stats; through the custom ops of :mod:`flashmaps.ops`."""
    from . import ops

    return ops.attention("triton", q, k, v, normalizer, mask=mask, causal=causal, scale=scale,
                         softcap=softcap, dropout_p=dropout_p, return_stats=return_stats, seed=seed)
