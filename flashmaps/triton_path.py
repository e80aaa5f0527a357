"""The Triton backend: launches the one forward kernel (``flashmaps.kernels.tile_loop.attn_fwd``).

Entry points of the backend contract (wrapped as torch.library custom ops by :mod:`flashmaps.ops`;
inputs already validated), on CUDA tensors or on CPU tensors under ``TRITON_INTERPRET=1``::

    forward(q, k, v, normalizer, *, mask, causal, scale, softcap, dropout_p, seed, need_grad)
        -> (out (B, Hq, L, Dv) in v's dtype, [stat (B, Hq, L) fp32 in normalizer.stats order], aux)
    aux_shape(normalizer, q, k, v, need_grad) -> shape of aux (1-D fp32; see `unpack_aux`)
    backward(...)                     not written yet: raises NotImplementedError
    attention(q, k, v, normalizer, *, mask, causal, scale, softcap, dropout_p, return_stats)

The backward kernels and in-kernel dropout are a later issue: ``SUPPORTS_BACKWARD`` and
``SUPPORTS_DROPOUT`` are False, and ``forward`` raises NotImplementedError when gradients are needed or
dropout_p > 0 (the dispatcher routes those calls to the torch backend).

:func:`launch_forward` is the launcher itself (pinned configs, the saved extras by name); ``aux`` packs
what a FlashAttention-2 style backward needs besides q, k, v, out and the stats (`unpack_aux`).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch
import triton

from .kernels import common, hooks_for
from .kernels.tile_loop import attn_fwd
from .normalizers import Normalizer

__all__ = ["attention", "forward", "backward", "aux_shape", "unpack_aux", "launch_forward", "Forward",
           "SUPPORTS_BACKWARD", "SUPPORTS_DROPOUT"]

#: the backward kernels are not written yet (issue 4): gradients go through the torch backend
SUPPORTS_BACKWARD = False
#: dropout inside the kernels is not written yet (issue 4)
SUPPORTS_DROPOUT = False

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


def _bucket(n: int) -> int:
    """Autotune length bucket: the next power of two, at least 256."""
    return max(256, common.next_pow2(n))


#: autotune candidates per padded head-dim class (max(BD, BDV) <= 64, <= 128, <= 256):
#: (BM, BN, num_warps, num_stages)
CONFIGS_BY_DIM = {
    64: ((128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)),
    128: ((128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)),
    256: ((64, 64, 8, 2), (64, 32, 4, 2), (64, 64, 4, 2)),
}


def _dim_class(bd: int, bdv: int) -> int:
    return next(c for c in CONFIGS_BY_DIM if max(bd, bdv) <= c)


def _configs():
    seen = {c for cs in CONFIGS_BY_DIM.values() for c in cs}
    return [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in sorted(seen)]


def _prune(configs, named_args, **kwargs):
    """Keep the candidates of the head-dim class (registers and shared memory scale with BD, BDV)."""
    want = set(CONFIGS_BY_DIM[_dim_class(kwargs["BD"], kwargs["BDV"])])
    return [c for c in configs if (c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages) in want]


_KEYS = ["HEAD_D", "HEAD_DV", "L_BUCKET", "S_BUCKET", "NORM", "NORM_CONST", "IS_CAUSAL", "MASK_KIND",
         "SOFTCAP", "AUX", "DOT_PREC"]
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


def launch_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, normalizer: Normalizer, *,
                   mask: Optional[torch.Tensor] = None, causal: Optional[str] = None,
                   scale: Optional[float] = None, softcap: Optional[float] = None,
                   save_aux: bool = False, config: Optional[dict] = None) -> Forward:
    """Run the forward kernel. q (B, Hq, L, Dqk), k (B, Hkv, S, Dqk), v (B, Hkv, S, Dv), any strides;
    mask None or a (B, Hq, L, S) bool/float view; causal None | "upper_left" | "lower_right".

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

    if mask is None:
        mask_kind, mask_t, mstr, mask_min = common.MASK_NONE, stat0, (0, 0, 0, 0), 0.0
    elif mask.dtype == torch.bool:
        mask_kind, mask_min = common.MASK_BOOL, 0.0
        mask_t = mask.view(torch.uint8)                 # same strides, no copy
        mstr = mask_t.stride()
    else:
        mask_kind, mask_t = common.MASK_FLOAT, mask
        mstr = mask.stride()
        mask_min = float(torch.finfo(mask.dtype).min)   # entries <= this (and -inf) exclude the key

    qk_scale, cap_mult = common.fold_score_unit(scale, softcap, hooks.score_unit)
    norm_arg, norm_const = hooks.prepass_config(normalizer, S) if hooks.prepass_config else (0, 0)
    causal_off = (S - L) if causal == "lower_right" else 0
    BD, BDV = max(16, common.next_pow2(D)), max(16, common.next_pow2(DV))

    args = (q, k, v, out, mask_t, stat0, stat1, par, aux_l, aux_o,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mstr,
            Hq, Hq // Hkv, L, S, causal_off,
            float(qk_scale), float(cap_mult), float(hooks.score_unit), mask_min, float(norm_arg),
            _bucket(L), _bucket(S))
    meta = dict(
        HEAD_D=D, HEAD_DV=DV, BD=BD, BDV=BDV,
        IS_CAUSAL=causal is not None, MASK_KIND=mask_kind, SOFTCAP=softcap is not None,
        DOT_PREC=_dot_precision(q.dtype), NORM=hooks.name,
        UPDATE=hooks.update, FINALIZE=hooks.finalize, RESCALE=hooks.rescale, NUM_STATS=len(hooks.stats),
        HAS_PREPASS=hooks.has_prepass, PREPASS=hooks.prepass or common.no_prepass, NORM_CONST=norm_const,
        SKIP_DEAD=hooks.tile_live is not None, TILE_LIVE=hooks.tile_live or common.always_live,
        AUX=aux, AUX_WEIGHTS=hooks.aux_weights or common.no_aux_weights,
        AUX_FINALIZE=hooks.aux_finalize or common.no_aux_finalize,
    )
    if config is None and _INTERPRET:
        config = INTERPRET_CONFIG
    if config is not None:
        cfg = dict(config)
        launch = {k_: cfg.pop(k_) for k_ in ("num_warps", "num_stages") if k_ in cfg}
        grid = (triton.cdiv(L, cfg["BM"]), B * Hq)
        attn_fwd[grid](*args, **meta, **cfg, **launch)
    else:
        grid = lambda META: (triton.cdiv(L, META["BM"]), B * Hq)  # noqa: E731
        _attn_fwd_tuned[grid](*args, **meta)

    return Forward(out, dict(zip(hooks.stats, stats_t)), saved, hooks.score_unit, aux_buf)


def forward(q, k, v, normalizer: Normalizer, *, mask, causal, scale, softcap, dropout_p, seed, need_grad,
            config: Optional[dict] = None):
    """The custom op's forward (see the module docstring): (out, [stats], aux). ``seed`` is unused
    until dropout lands."""
    if dropout_p > 0 and not SUPPORTS_DROPOUT:
        raise NotImplementedError(
            "flashmaps' Triton kernels do not implement dropout yet (SUPPORTS_DROPOUT is False); "
            "use backend='torch' for dropout_p > 0"
        )
    if need_grad and not SUPPORTS_BACKWARD:
        raise NotImplementedError(
            "flashmaps' Triton backward kernels are not written yet (SUPPORTS_BACKWARD is False); "
            "use backend='torch' for inputs that require grad, or run under torch.no_grad()"
        )
    res = launch_forward(q, k, v, normalizer, mask=mask, causal=causal, scale=scale, softcap=softcap,
                         save_aux=need_grad, config=config)
    return res.out, list(res.stats.values()), res.aux


def backward(dout, q, k, v, out, stats, aux, normalizer: Normalizer, *, mask, causal, scale, softcap,
             dropout_p, seed):
    """Not written yet (SUPPORTS_BACKWARD is False); `forward` refuses need_grad before this is reached."""
    raise NotImplementedError("flashmaps' Triton backward kernels are not written yet; use backend='torch'")


def attention(q, k, v, normalizer: Normalizer, *, mask, causal, scale, softcap, dropout_p, return_stats,
              seed=None):
    """The backend contract of :mod:`flashmaps.functional`: out (B, Hq, L, Dv), or (out, stats dict)
    with return_stats; through the custom ops of :mod:`flashmaps.ops`."""
    from . import ops

    return ops.attention("triton", q, k, v, normalizer, mask=mask, causal=causal, scale=scale,
                         softcap=softcap, dropout_p=dropout_p, return_stats=return_stats, seed=seed)
