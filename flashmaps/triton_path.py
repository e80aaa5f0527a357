"""The Triton backend: launches the forward kernel (``flashmaps.kernels.tile_loop.attn_fwd``) and the
backward kernels (``flashmaps.kernels.backward``).

Entry points of the backend contract (wrapped as torch.library custom ops by :mod:`flashmaps.ops`;
inputs already validated), on CUDA tensors or on CPU tensors under ``TRITON_INTERPRET=1``::

    forward(q, k, v, normalizer, *, mask, causal, scale, softcap, dropout_p, seed, need_grad)
        -> (out (B, Hq, L, Dv) in v's dtype, stats (n_stats, B, Hq, L) fp32 in normalizer.stats order (a list
            of (B, Hq, L) after a split-KV forward), extras)
    extras_shape(normalizer, q, k, v, need_grad) -> shape of extras (1-D fp32; see `unpack_extras`)
    backward(dout, q, k, v, out, stats, extras, normalizer, *, mask, causal, scale, softcap, dropout_p, seed,
             delta_shift, deterministic)
        -> (dq, dk, dv) in the dtypes of q, k, v (extras: the one forward() returned with need_grad=True;
        delta_shift: None or (B, Hq, L), subtracted from the row term delta; deterministic: see `launch_backward`)
    attention(q, k, v, normalizer, *, mask, causal, scale, softcap, dropout_p, return_stats)

:func:`launch_forward` / :func:`launch_backward` are the launchers themselves (pinned configs, the saved
extras by name); ``extras`` packs what the FlashAttention-2 style backward needs besides q, k, v, out and
the stats (`unpack_extras`). Both build their kernel arguments with `_setup`: the normalizer's hooks
(``Normalizer.triton``), the argument bundles of ``flashmaps.kernels.contract`` and the static flags.
Dropout: ``seed`` (an int, e.g. :func:`flashmaps.torch_path.draw_seed`) and ``dropout_p`` give the keep mask
of :func:`dropout_keep_mask`, regenerated identically by the backward. Autotune candidates:
:mod:`flashmaps.triton_configs`.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, NamedTuple, Optional

import torch
import triton

from . import triton_configs
from .kernels.backward import attn_bwd_dkdv, attn_bwd_dq, attn_bwd_preprocess
from .kernels.contract import (MASK_BLOCK, MASK_BOOL, MASK_FLOAT, MASK_NONE, BwdRows, Dims, Dropout, Hooks, RowOut,
                               ScoreScale, Static, View, block_mask_ok, block_mask_shape, fold_score_unit,
                               raw_scores_ok)
from .kernels.dropout import dropout_mask_kernel
from .kernels.tiles import head_grid
from .kernels.tile_loop import attn_fwd
from .normalizers import Normalizer
from .window import bounds

__all__ = ["attention", "forward", "backward", "extras_shape", "unpack_extras", "launch_forward",
           "launch_backward", "dropout_keep_mask", "Forward", "SUPPORTS_BACKWARD", "SUPPORTS_DROPOUT"]

#: gradients w.r.t. q, k, v through the Triton backward kernels
SUPPORTS_BACKWARD = True
#: dropout inside the kernels (Philox, regenerated in the backward)
SUPPORTS_DROPOUT = True

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
#: blocks under the interpreter: small, so that small test shapes still span several tiles
INTERPRET_CONFIG = {"BM": 16, "BN": 16}
#: the scratch rows of a (batch, head) are padded to a multiple of this (the largest BM of any config)
SCRATCH_ROW_BLOCK = 128
#: rows per program of the preprocess kernel (delta and the row statistics: memory bound)
_PRE_BM = 64
#: split-KV decoding: the keys of a split are a multiple of this (every BN of the configs divides it)
SPLIT_KEY_BLOCK = 256
#: the SM count :func:`split_plan` assumes without a CUDA device (the interpreter): an H100 / H200's 132
DEFAULT_SM_COUNT = 132
#: at most this many query rows for a split-KV forward (decoding, speculative decoding, short chunks)
SPLIT_MAX_L = 16
#: issue 17 item 6: the forward reads K and V through tensor descriptors (TMA on sm_90; Static.TMA) where
#: `tma_ok` allows. Off by default until a GPU times it against the pointer loads (a benchmark knob:
#: ``flashmaps.triton_path.TMA_KV=True``); the interpreter runs the same descriptor loads on the CPU.
TMA_KV = False
#: a TMA descriptor's base address and row strides are multiples of this many bytes
_TMA_ALIGN = 16
#: the block mask (kernels.blockmask, Static.BLOCK_MASK) for the units that support it. Off by default until a GPU
#: times it: its marking left the output pass and the backward loops over lists of live tiles (offline sm_90: the
#: forward's hot loop and the backward's pipeline stages are main's), but on random inputs, where nothing is dead,
#: the marking bracket pass still costs about 5.6 % of entmax15's forward instructions per key tile and the list
#: loops up to 8 % per backward tile, and the lists (global scratch read back after a barrier) have never run
#: compiled: bench/TUNING.md, "Issue 17 item 5, the marking cost". True (or the environment variable
#: FLASHMAPS_BLOCK_MASK=1) turns it on; a call whose mask would pass BLOCK_MASK_MAX_BYTES (L * S / 256 bytes per
#: head) runs without it
BLOCK_MASK = os.environ.get("FLASHMAPS_BLOCK_MASK", "0") == "1"
BLOCK_MASK_MAX_BYTES = 1 << 28
#: issue 17 item 6: the plain (unsplit) forward on a persistent grid (Static.PERSISTENT, `persistent_programs`
#: programs, each looping over query blocks in the default grid's order: the same results bit for bit). Off by
#: default until a GPU times it at short L (bench/TUNING.md, "Issue 17 item 6, a persistent forward grid"); True (or
#: FLASHMAPS_PERSISTENT=1) turns it on
PERSISTENT = os.environ.get("FLASHMAPS_PERSISTENT", "0") == "1"
#: resident persistent forward programs per SM by (dim class (`triton_configs.dim_class`), BM), 1 where not listed:
#: the offline sm_90 build of the persistent kernel (65536 registers and 228 KiB of shared memory per SM;
#: bench/TUNING.md, "Issue 17 item 6"): BM = 128 (8 warps) 151-255 registers per thread, 1 per SM; BM = 64 (4 warps)
#: softmax 166 / 244 registers at D = 64 / 128 (3 / 2 per SM), entmax15 249 / 255 (2 / 2)
PERSISTENT_PER_SM = {(64, 64): 2, (128, 64): 2}
#: the programs of a persistent grid under the interpreter: few, so that tests loop over several blocks per program
PERSISTENT_INTERPRET_PROGRAMS = 3


class Forward(NamedTuple):
    """Result of :func:`launch_forward`.

    out: (B, Hq, L, Dv) in v's dtype. stats: the public row statistics {name: (B, Hq, L) fp32}.
    saved: what the backward needs besides q, k, v, out and stats (all fp32, contiguous):
      ``thr``   (B, Hq, L) the pre-pass threshold in kernel units (entmax15: tau in z units, equal to
                stats["tau"]; topk: tau_k * LOG2E, exactly the value the kernel compared s >= against; with a
                given threshold, phase 2 of the two-phase protocol, the one it ran at: top-k's cut * LOG2E),
      ``sum_g`` (B, Hq, L) and ``o2`` (B, Hq, L, Dv): normalizers with a second weighted sum (entmax15)
                with ``save_extras=True`` only (at a given threshold ``sum_g`` is the raw sum of g, which the
                threshold's gradient needs: ``Normalizer.kernel_at_threshold_grad``).
      (views into ``extras``)
    score_unit: the factor u of the kernel's scores (s_kernel = u * s_natural; see kernels.contract).
    extras: the packed 1-D fp32 buffer holding ``saved`` (see `unpack_extras`).
    stats_all: the stats as one (n_stats, B, Hq, L) buffer (``stats`` are its views), or None (split-KV).
    live: the block mask (int8 (B, Hq, R, C), `kernels.blockmask`; a view at the end of ``extras``), or None.
    """

    out: torch.Tensor
    stats: dict
    saved: dict
    score_unit: float
    extras: torch.Tensor
    stats_all: Optional[torch.Tensor] = None
    live: Optional[torch.Tensor] = None


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) in plain Python (``triton.cdiv`` is a constexpr function: a few microseconds per host call)."""
    return -(-a // b)


@functools.lru_cache(maxsize=1024)
def _bucket(n: int) -> int:
    """Autotune length bucket: the next power of two, at least 256."""
    return max(256, 1 << max(0, math.ceil(math.log2(max(1, n)))))


def _dot_precision(dtype: torch.dtype) -> str:
    if _INTERPRET:
        return "upcast" if dtype == torch.bfloat16 else "ieee"   # see Static.DOT_PREC
    if dtype != torch.float32:
        return "ieee"
    # fp32 inputs: follow torch's matmul setting; without TF32 use 3xTF32 (about fp32 accuracy)
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def _extras_parts(hooks, B: int, Hq: int, L: int, Dv: int, need_grad: bool, S: int = 0) -> list:
    """[(name, shape)] of the packed extras buffer, in order: "thr" (normalizers with a pre-pass), then
    "sum_g" and "o2" (normalizers with a second weighted sum, when gradients are needed), then "live" (the
    block mask's int8 cells packed 4 to a float, `_block_mask`; it needs the key length S)."""
    parts = [("thr", (B, Hq, L))] if hooks.has_prepass else []
    if need_grad and hooks.has_g:
        parts += [("sum_g", (B, Hq, L)), ("o2", (B, Hq, L, Dv))]
    if S and _block_mask(hooks, B, Hq, L, S):
        parts += [("live", (-(-math.prod(block_mask_shape(B, Hq, L, S)) // 4),))]
    return parts


def _block_mask(hooks, B: int, Hq: int, L: int, S: int) -> bool:
    """Whether an unsplit call with a computed threshold gets the block mask (`BLOCK_MASK`, `contract.block_mask_ok`)."""
    return BLOCK_MASK and block_mask_ok(hooks) and math.prod(block_mask_shape(B, Hq, L, S)) <= BLOCK_MASK_MAX_BYTES


def block_mask_view(views: dict, B: int, Hq: int, L: int, S: int):
    """The int8 (B, Hq, R, C) block mask inside ``views["live"]`` (`_unpack` with S), or None."""
    if "live" not in views:
        return None
    shape = block_mask_shape(B, Hq, L, S)
    return views["live"].view(torch.int8)[: math.prod(shape)].view(shape)


def extras_shape(normalizer: Normalizer, q, k, v, need_grad: bool) -> tuple[int, ...]:
    """Shape of the packed extras tensor returned by :func:`forward`: (total elements,)."""
    return (_extras_size(normalizer.triton(k.shape[2])[0], q, v, need_grad, k.shape[2]),)


def _extras_size(hooks, q, v, need_grad: bool, S: int = 0) -> int:
    B, Hq, L = q.shape[:3]
    return sum(math.prod(shape) for _, shape in _extras_parts(hooks, B, Hq, L, v.shape[3], need_grad, S))


def unpack_extras(extras: torch.Tensor, normalizer: Normalizer, q, v, need_grad: bool, S: int = 1) -> dict:
    """The named contiguous views of a packed extras buffer: {"thr": (B, Hq, L), "sum_g": (B, Hq, L),
    "o2": (B, Hq, L, Dv)}, as present (see `Forward.saved` for their meaning), and "live" (the block mask,
    `block_mask_view`) when the true key length ``S`` is given."""
    return _unpack(extras, normalizer.triton(S)[0], q, v, need_grad, S if S > 1 else 0)


def _unpack(extras: torch.Tensor, hooks, q, v, need_grad: bool, S: int = 0) -> dict:
    B, Hq, L = q.shape[:3]
    parts = _extras_parts(hooks, B, Hq, L, v.shape[3], need_grad, S)
    if not parts:
        return {}
    sizes = [math.prod(shape) for _, shape in parts]
    rest = extras.shape[0] - sum(sizes)          # (the block mask's cells when S is not given)
    if len(parts) == 1 and not rest:             # the whole buffer: one view (issue 17: fewer ops per call)
        return {parts[0][0]: extras.view(parts[0][1])}
    if rest < 0:                                 # too short (not this call's extras): each view fails as it did
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return {name: extras[at: at + n].view(shape) for (name, shape), at, n in zip(parts, starts, sizes)}
    pieces = extras.split(sizes + [rest] if rest else sizes)       # one op for all the parts
    return {name: piece.view(shape) for (name, shape), piece in zip(parts, pieces)}


class _Call(NamedTuple):
    """What the forward and the backward launches share: the normalizer's kernel side and the bundles."""

    hooks: Any            # contract.Hooks
    args: Any             # the normalizer's runtime bundle
    scratch_cols: int
    static: Static
    dims: Dims
    scale: ScoreScale
    mask: View
    drop: Dropout
    seed: int
    sm_scale: float
    B: int
    Hkv: int
    hp: Any               # the (Hq,) fp32 head parameters (contract.Hooks.head_param) or the placeholder


#: {a call's static key (`_setup`): the _Call fields that depend on it alone}; emptied when it reaches _PLANS_MAX
_PLANS: dict = {}
_PLANS_MAX = 256


def _setup(q, k, v, normalizer: Normalizer, mask, causal, scale, softcap, dropout_p, seed, placeholder) -> _Call:
    B, Hq, L, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    hooks, args, scratch_cols = normalizer.triton(S)     # every call: it reads its module's knobs (COLLECT, NPTS)
    if mask is None:
        mask_view = View(placeholder, 0, 0, 0, 0)
    elif mask.dtype == torch.bool:
        mask_view = View.of(mask.view(torch.uint8))   # same strides, no copy
    else:  # entries <= finfo.min (and -inf) exclude the key
        mask_view = View.of(mask)
    # issue 17 (host cost): the rest depends on this key and the unit's (hooks, args, scratch_cols) only: built once
    # (`_PLANS`; a plan whose triton(S) record differs, a module knob changed, is rebuilt)
    key = (normalizer, B, Hq, L, D, Hkv, S, Dv, q.dtype, None if mask is None else mask.dtype, causal, scale, softcap,
           dropout_p, _dot_precision(q.dtype))
    try:
        plan = _PLANS.get(key)
    except TypeError:                  # an unhashable user normalizer (a list option): no plan cache
        plan, key = None, None
    if plan is None or not (plan.scratch_cols == scratch_cols and (plan.hooks is hooks or plan.hooks == hooks)
                            and (plan.args is args or plan.args == args)):
        plan = _plan(normalizer, hooks, args, scratch_cols, B, Hq, L, D, Hkv, S, Dv, q.dtype,
                     None if mask is None else mask.dtype, causal, scale, softcap, dropout_p)
        if key is not None:
            if len(_PLANS) >= _PLANS_MAX:
                _PLANS.clear()
            _PLANS[key] = plan
    return _Call(plan.hooks, plan.args, plan.scratch_cols, plan.static, plan.dims, plan.scale, mask_view, plan.drop,
                 int(seed), plan.sm_scale, B, Hkv, _head_params(normalizer, plan.hooks, Hq, placeholder))


class _Hashed:
    """A hashable value with its hash computed once, equal to a _Hashed of an equal value: a Hooks record in a
    cache key (hashing its JIT functions costs microseconds per call)."""

    __slots__ = ("value", "hash")

    def __init__(self, value):
        self.value, self.hash = value, hash(value)

    def __hash__(self):
        return self.hash

    def __eq__(self, other):
        return self is other or (type(other) is _Hashed and self.hash == other.hash and self.value == other.value)


#: {(id(obj), tag): (obj, what `_memo` made of it)}: holding obj, so that its id is not reused while it is listed;
#: emptied when it reaches _PLANS_MAX
_MEMO: dict = {}


def _memo(obj, tag, make):
    """``make()``, once per object ``obj`` (by identity) and ``tag``: the calls of one plan (`_setup`) share their
    hooks and static records, so what is derived from them (a variant, a `_Hashed`) is derived once."""
    key = (id(obj), tag)
    hit = _MEMO.get(key)
    if hit is not None and hit[0] is obj:
        return hit[1]
    made = make()
    if len(_MEMO) >= _PLANS_MAX:
        _MEMO.clear()
    _MEMO[key] = (obj, made)
    return made


def _hashed(value) -> _Hashed:
    return _memo(value, None, lambda: _Hashed(value))


def _variant(record, **fields):
    """``record._replace(**fields)`` (a NamedTuple), made once per record object and fields."""
    return _memo(record, tuple(fields.items()), lambda: record._replace(**fields))


def _plan(normalizer, hooks, args, scratch_cols, B, Hq, L, D, Hkv, S, Dv, dtype, mask_dtype, causal, scale,
          softcap, dropout_p) -> _Call:
    """The _Call of `_setup` without its per-call fields (mask view, seed, head parameters: None)."""
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if mask_dtype is None:
        mask_kind, mask_min = MASK_NONE, 0.0
    elif mask_dtype == torch.bool:
        mask_kind, mask_min = MASK_BOOL, 0.0
    else:
        mask_kind, mask_min = MASK_FLOAT, float(torch.finfo(mask_dtype).min)
    distance = normalizer.score == "distance"   # the scale goes inside the log (tiles.log_distance)
    qk_scale, cap_mult = fold_score_unit(1.0 if distance else scale, softcap, hooks.unit)
    band = bounds(causal, L, S)                      # causal / window offsets (flashmaps.window)
    static = Static.make(D=D, Dv=Dv, causal=band.right_off is not None, mask_kind=mask_kind,
                         softcap=softcap is not None, dot_prec=_dot_precision(dtype), dropout=dropout_p > 0,
                         dtype=str(dtype), left=band.left_off is not None, distance=distance,
                         raw_scores=raw_scores_ok(hooks, softcap=softcap is not None, mask_kind=mask_kind,
                                                  distance=distance, qk_scale=qk_scale))
    dims = Dims(B, Hq, Hq // Hkv, L, S, band.right_off or 0, band.left_off or 0, 0)
    drop = Dropout(float(dropout_p), 1.0 / (1.0 - float(dropout_p)))
    return _Call(hooks, args, scratch_cols, static, dims,
                 ScoreScale(float(qk_scale), float(cap_mult), float(hooks.unit), mask_min, float(scale),
                            -0.5 * normalizer.score_power if distance else 0.0), None, drop,
                 None, (1.0 if distance else float(scale)) * hooks.grad_mult, B, Hkv, None)


#: {device: its placeholder} (`_placeholder`)
_PLACEHOLDERS: dict = {}


def _placeholder(dev) -> torch.Tensor:
    """The fp32 (1,) tensor the launchers pass for an unused pointer argument, one per device (kept: an allocation
    less per launch; no kernel reads or writes it)."""
    ph = _PLACEHOLDERS.get(dev)
    if ph is None:
        with torch.inference_mode(False):
            ph = _PLACEHOLDERS[dev] = torch.empty(1, dtype=torch.float32, device=dev)
    return ph


def tma_ok(*views: torch.Tensor) -> bool:
    """Whether the (B, H, S, D) tensors can be read through TMA descriptors of one (batch, head) each: unit
    stride along D, every (batch, head) base and row 16-byte aligned (`kernels.tiles.kv_desc`)."""
    for x in views:
        size = x.element_size()
        if x.stride(3) != 1 or x.data_ptr() % _TMA_ALIGN:
            return False
        if any((x.stride(d) * size) % _TMA_ALIGN for d in range(3) if x.shape[d] > 1):
            return False
    return True


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _tma_static(static: Static, k, v) -> Static:
    """``static`` with TMA set when :data:`TMA_KV` is on and `tma_ok` allows. On CUDA, device-side descriptors
    need Triton's global-scratch allocator: installed (torch's caching allocator) when the calling context has
    none (it is a context variable: per thread), never replacing one the user set."""
    if not TMA_KV or not tma_ok(k, v):
        return static
    if k.is_cuda:
        from triton.runtime import _allocation

        if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
            triton.set_allocator(_scratch)
    return static._replace(TMA=True)


def _head_params(normalizer, hooks, Hq, placeholder):
    """The kernels' HP argument: ``normalizer.kernel_head_params`` (Hq,) fp32 contiguous, or the placeholder."""
    if not hooks.head_param:
        return placeholder
    return normalizer.kernel_head_params(Hq).to(device=placeholder.device, dtype=torch.float32).contiguous()


def _split_config(config: dict) -> tuple[dict, dict]:
    """{"BM", "BN", ...} -> (block constexprs, launch options num_warps / num_stages)."""
    cfg = dict(config)
    launch = {k_: cfg.pop(k_) for k_ in ("num_warps", "num_stages") if k_ in cfg}
    return cfg, launch


#: {(autotuner, its key values): (the chosen config's block constexprs, all its launch kwargs)}: see `_launch`
_CHOSEN: dict = {}
#: {autotuner: the positions of its key arguments in the kernel's argument list}
_KEY_AT: dict = {}


def _launch(kernel, tuned, config, grid_of, args, meta):
    """Run ``kernel`` with a pinned ``config`` (or the interpreter's small blocks), else autotuned.

    Autotuned: the first call of a key goes through the autotuner (which times the candidates); later calls
    launch ``kernel`` with the config it chose, looked up here (issue 17: the autotuner's own per-call key
    building was a third of the host cost of a call). The key is the autotuner's ``key`` arguments; the
    autotuner also keys on the dtypes of tensor arguments, and the only one here is HP (always fp32). Code that
    empties an autotuner's ``cache`` to tune again empties ``_CHOSEN`` too."""
    if config is None and _INTERPRET:
        config = INTERPRET_CONFIG
    if config is not None:
        cfg, launch = _split_config(config)
        kernel[grid_of(cfg)](*args, **meta, **cfg, **launch)
        return
    at = _KEY_AT.get(tuned)
    if at is None:
        at = _KEY_AT[tuned] = tuple(tuned.arg_names.index(name) for name in tuned.keys)
    n = len(args)
    key = [tuned]
    for i in at:
        x = args[i] if i < n else meta[tuned.arg_names[i]]
        key.append(_hashed(x) if type(x) is Hooks else x)       # (a Hooks record: its hash computed once)
    key = tuple(key)
    chosen = _CHOSEN.get(key)
    if chosen is None:
        tuned[grid_of](*args, **meta)
        _CHOSEN[key] = (tuned.best_config.kwargs, tuned.best_config.all_kwargs())
    else:
        kernel[grid_of(chosen[0])](*args, **meta, **chosen[1])


def split_plan(B: int, Hq: int, L: int, S: int, sm_count: int) -> int:
    """How many key splits a forward of (B, Hq, L, S) runs on ``sm_count`` SMs (1: no split).

    Split-KV (Flash-Decoding): with few query rows (L <= SPLIT_MAX_L) the grid has only B * Hq programs, each
    streaming all S keys, which leaves most SMs idle. Splitting the keys n ways gives B * Hq * n programs;
    n is chosen to reach about 2 programs per SM, with at least SPLIT_KEY_BLOCK keys per split and at most
    64 splits. The partial results are merged by the normalizer's merge rule."""
    if L > SPLIT_MAX_L or S < 2 * SPLIT_KEY_BLOCK:
        return 1
    programs = B * Hq * _cdiv(L, 64)
    if programs >= sm_count:
        return 1
    return max(1, min(_cdiv(2 * sm_count, programs), S // SPLIT_KEY_BLOCK, 64))


#: {CUDA device: its SM count} (`_sm_count`)
_SM_COUNT: dict = {}


def _sm_count(dev) -> int:
    if dev.type == "cuda":
        n = _SM_COUNT.get(dev)
        if n is None:
            n = _SM_COUNT[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
        return n
    return DEFAULT_SM_COUNT


def persistent_programs(n_work: int, BM: int, static: Static, sm_count: int) -> int:
    """The programs of a persistent forward grid of ``n_work`` query blocks (cdiv(L, BM) * B * Hq): ``sm_count``
    x `PERSISTENT_PER_SM`, or `PERSISTENT_INTERPRET_PROGRAMS` under the interpreter; never more than ``n_work``."""
    if _INTERPRET:
        return min(n_work, PERSISTENT_INTERPRET_PROGRAMS)
    per_sm = PERSISTENT_PER_SM.get((triton_configs.dim_class(static.BD, static.BDV), BM), 1)
    return max(1, min(n_work, sm_count * per_sm))


def _persistent_grid(L: int, heads: int, static: Static, sm_count: int):
    """The grid function of a persistent forward (Static.PERSISTENT) of ``heads`` = B * Hq heads of L rows: it
    sees the chosen config's BM (autotuned or pinned, `_launch`)."""
    return lambda META: (persistent_programs(_cdiv(L, META["BM"]) * heads, META["BM"], static, sm_count),)


def _can_split(normalizer: Normalizer, hooks, save_extras: bool = False) -> bool:
    """Split-KV needs a merge rule: for independent parts (no threshold pre-pass and no second weighted sum), or
    a sparse unit's two-phase protocol (``Normalizer.two_phase``: the union's threshold first, then the splits at
    it, Static.GIVEN_THR) when the backward's extras are not needed (they come from the unsplit forward)."""
    if normalizer.two_phase and hooks.has_prepass:
        return not save_extras
    return not hooks.has_prepass and not hooks.has_g and type(normalizer).merge is not Normalizer.merge


def _given_threshold(q, k, normalizer, c, mask, causal, scale, softcap, threshold):
    """The two-phase protocol's phase 2: the call's bundles with Static.GIVEN_THR and (the union's threshold
    {name: (B, Hq, L)} fp32, its kernel-unit (B, Hq, L) tensor). ``threshold`` None: phase 1 over the call's keys
    on the torch path (one matmul per chunk of rows: the scores, then the unit's threshold of the full rows)."""
    from . import torch_path

    if threshold is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        cand = torch_path.threshold_candidates(q, k, normalizer, mask=mask, causal=causal, scale=scale, softcap=softcap)
        threshold = {n: x[..., 0] for n, x in normalizer.candidate_threshold(cand).items()}
    threshold = {n: x.to(device=q.device, dtype=torch.float32).contiguous() for n, x in threshold.items()}
    thr_k = normalizer.kernel_threshold(threshold).to(torch.float32).contiguous()
    return c._replace(static=c.static._replace(GIVEN_THR=True)), threshold, thr_k


def _launch_split(q, k, v, normalizer, c, n_split, args_of, config, threshold=None) -> tuple[torch.Tensor, dict]:
    """The forward as n_split key splits in one launch (grid axis 0: query block x split), merged."""
    B, Hq, L, _ = q.shape
    S, DV = k.shape[2], v.shape[3]
    split_keys = _cdiv(_cdiv(S, n_split), SPLIT_KEY_BLOCK) * SPLIT_KEY_BLOCK
    n_split = _cdiv(S, split_keys)
    dev = q.device
    out_p = torch.empty((n_split * B, Hq, L, DV), dtype=torch.float32, device=dev)
    stats_p = [torch.empty((n_split * B, Hq, L), dtype=torch.float32, device=dev) for _ in normalizer.stats]
    dims = c.dims._replace(split_keys=split_keys)
    static = c.static._replace(SPLIT=True)
    args, meta = args_of(out_p, stats_p, dims, static)
    _launch(attn_fwd, triton_configs.attn_fwd_tuned, config,
            lambda META: (triton.cdiv(L, META["BM"]) * n_split, *head_grid(B * Hq)), args, meta)
    outs = list(out_p.view(n_split, B, Hq, L, DV))
    parts = [{name: st.view(n_split, B, Hq, L)[i] for name, st in zip(normalizer.stats, stats_p)}
             for i in range(n_split)]
    if threshold is not None:      # the two-phase protocol: the parts at the union's threshold
        out, stats = normalizer.merge_at_threshold(outs, parts, threshold)
    else:
        out, stats = normalizer.merge(outs, parts)
    return out.to(v.dtype), {name: stats[name].float().contiguous() for name in normalizer.stats}


def launch_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, normalizer: Normalizer, *,
                   mask: Optional[torch.Tensor] = None, causal: Optional[str] = None,
                   scale: Optional[float] = None, softcap: Optional[float] = None,
                   save_extras: bool = False, dropout_p: float = 0.0, seed: int = 0,
                   config: Optional[dict] = None, splits: Optional[int] = None,
                   threshold: Optional[dict] = None) -> Forward:
    """Run the forward kernel. q (B, Hq, L, Dqk), k (B, Hkv, S, Dqk), v (B, Hkv, S, Dv), any strides;
    mask None or a (B, Hq, L, S) bool/float view; causal None | "upper_left" | "lower_right".
    ``dropout_p`` > 0 drops weights with the keep mask of ``seed`` (:func:`dropout_keep_mask`).

    ``save_extras`` also computes the normalizer's backward extras (entmax15: sum_g and O2).
    ``config`` pins the blocks, e.g. {"BM": 64, "BN": 32, "num_warps": 4, "num_stages": 2},
    instead of autotuning (CUDA) or the interpreter's small blocks. ``splits``: the number of key splits
    (split-KV; default :func:`split_plan` for normalizers that can merge independent parts or run the two-phase
    protocol, else 1). ``threshold``: a two-phase unit's phase 2 at the union's threshold {name: (B, Hq, L)}
    (``Normalizer.kernel_threshold``, Static.GIVEN_THR; with ``save_extras`` for units with
    ``Normalizer.has_threshold_grads``: `backward_at_threshold`): the statistics named there are reported as given."""
    B, Hq, L, _ = q.shape
    S, DV = k.shape[2], v.shape[3]
    dev = q.device
    placeholder = _placeholder(dev)
    c = _setup(q, k, v, normalizer, mask, causal, scale, softcap, dropout_p, seed, placeholder)
    static = _tma_static(c.static, k, v)
    if static is not c.static:
        c = c._replace(static=static)
    if save_extras and not c.hooks.has_backward:
        raise NotImplementedError(
            f"the normalizer {normalizer.spec!r} has no Triton backward hooks (bwd_rows, bwd_weights, "
            "bwd_dscores in its kernels module); use backend='torch' for gradients"
        )
    if threshold is not None and (not (normalizer.two_phase and c.hooks.has_prepass) or
                                  (save_extras and not normalizer.has_threshold_grads)):
        raise ValueError(f"threshold: {normalizer.spec!r} has no two-phase protocol, or gradients were asked for "
                         "and it has none through it (Normalizer.has_threshold_grads)")
    if splits is None:
        splits = split_plan(B, Hq, L, S, _sm_count(dev)) if _can_split(normalizer, c.hooks, save_extras) else 1
    elif splits > 1 and not _can_split(normalizer, c.hooks, save_extras):
        raise ValueError(f"splits: {normalizer.spec!r} cannot merge key splits here (no merge rule, or the "
                         "backward's extras of a threshold or a second weighted sum); use splits=1")
    thr_k = None
    if threshold is not None or (splits > 1 and normalizer.two_phase and c.hooks.has_prepass):
        c, threshold, thr_k = _given_threshold(q, k, normalizer, c, mask, causal, scale, softcap, threshold)
    out = torch.empty((B, Hq, L, DV), dtype=v.dtype, device=dev)
    stats_all = torch.empty((len(normalizer.stats), B, Hq, L), dtype=torch.float32, device=dev)
    stats_t = list(stats_all.unbind(0))       # one buffer: the op returns it as is (no torch.stack)
    extras_buf = torch.empty(_extras_size(c.hooks, q, v, save_extras, S),
                          dtype=torch.float32, device=dev)
    saved = _unpack(extras_buf, c.hooks, q, v, save_extras, S)
    # (phase 2 of the two-phase protocol, thr_k given, runs no pre-pass: its cells stay live, nothing is skipped)
    live = block_mask_view(saved, B, Hq, L, S) if splits == 1 else None
    saved.pop("live", None)                        # (Forward.live; `saved` keeps what unpack_extras(S=1) gives)
    if live is not None:      # zeros: the cells no program visits (never read as deciding) are deterministic
        live.zero_()
        c = c._replace(static=c.static._replace(BLOCK_MASK=True))
    if thr_k is not None and "thr" in saved:                   # phase 2: the kernel-unit threshold it ran at
        saved["thr"].copy_(thr_k)
    l_pad = _cdiv(L, SCRATCH_ROW_BLOCK) * SCRATCH_ROW_BLOCK      # every row a program may touch
    kc = c.scratch_cols
    scratch = torch.empty((B * Hq * l_pad, kc), dtype=torch.float32, device=dev) if kc else placeholder
    rows = RowOut(stats_t[0] if stats_t else placeholder, stats_t[-1] if stats_t else placeholder,
                  saved.get("thr", placeholder) if thr_k is None else thr_k, saved.get("sum_g", placeholder),
                  saved.get("o2", placeholder), scratch, placeholder if live is None else live)
    norm = _variant(c.hooks, has_g=False) if c.hooks.has_g and not save_extras else c.hooks   # the second sum
                                                                                                 # only when needed

    def args_of(o, st, dims, static):
        rw = rows._replace(stat0=st[0], stat1=st[-1]) if st else rows
        return ((View.of(q), View.of(k), View.of(v), View.of(o), c.mask, rw, dims, c.scale, c.args, c.drop, c.seed,
                 _bucket(L), _bucket(S), l_pad), dict(ST=static, NORM=norm, SCRATCH_COLS=kc, HP=c.hp))

    if splits > 1:
        out, stats = _launch_split(q, k, v, normalizer, c, splits, args_of, config, threshold)
        return Forward(out, stats, saved, c.hooks.unit, extras_buf, None, live)
    if PERSISTENT:           # one axis of programs, each looping over query blocks (Static.PERSISTENT)
        args, meta = args_of(out, stats_t, c.dims, c.static._replace(PERSISTENT=True))
        grid_of = _persistent_grid(L, B * Hq, c.static, _sm_count(dev))
    else:
        args, meta = args_of(out, stats_t, c.dims, c.static)
        grid_of = lambda META: (_cdiv(L, META["BM"]), *head_grid(B * Hq))  # noqa: E731
    _launch(attn_fwd, triton_configs.attn_fwd_tuned, config, grid_of, args, meta)
    stats = dict(zip(normalizer.stats, stats_t))
    if threshold is not None:                              # phase 2 reports the union's threshold
        stats.update({n: x for n, x in threshold.items() if n in stats})
    return Forward(out, stats, saved, c.hooks.unit, extras_buf, stats_all, live)


def forward(q, k, v, normalizer: Normalizer, *, mask, causal, scale, softcap, dropout_p, seed, need_grad,
            config: Optional[dict] = None):
    """The custom op's forward (see the module docstring): (out, [stats], extras); ``need_grad`` also
    saves the backward extras in extras (entmax15's O2)."""
    res = launch_forward(q, k, v, normalizer, mask=mask, causal=causal, scale=scale, softcap=softcap,
                         save_extras=need_grad, dropout_p=dropout_p, seed=seed, config=config)
    return res.out, list(res.stats.values()) if res.stats_all is None else res.stats_all, res.extras


# ---------------------------------------------------------------------------------------------------
# backward


def launch_backward(dout, q, k, v, out, stats, extras, normalizer: Normalizer, *, mask=None, causal=None,
                    scale=None, softcap=None, dropout_p: float = 0.0, seed: int = 0,
                    config: Optional[dict] = None, delta_shift: Optional[torch.Tensor] = None,
                    deterministic: Optional[bool] = None):
    """Gradients (dq, dk, dv) of the attention computed by :func:`launch_forward` (with save_extras=True,
    the same mask / causal / scale / softcap / dropout_p / seed), given dout (B, Hq, L, Dv), any strides.
    ``stats``: the public row statistics in ``normalizer.stats`` order; ``extras``: the packed buffer.

    Three launches (``kernels.backward``; two with the atomic dQ, below): the preprocess kernel (delta =
    rowsum(dO * O), or O2 for entmax15, and the rows' backward statistics), then dK/dV over key blocks and dQ
    over query blocks, both recomputing scores and weights tile by tile. ``config`` pins the blocks of both
    kernels (as in launch_forward) instead of autotuning (CUDA) or the interpreter's small blocks, or of each kernel:
    ``{"dkdv": {...}, "dq": {...}}`` (a kernel left out is autotuned). ``delta_shift``: None or (B, Hq, L),
    subtracted from delta by the preprocess kernel (gradients through the row statistics,
    ``Normalizer.stat_delta``). The kernels apply the non-finite rule (a row with a NaN statistic: its dq row and
    its kv head's dk, dv are NaN; `kernels.backward`).

    ``deterministic`` False: two launches; the dK/dV kernel also adds each tile's dQ into an fp32 buffer with
    atomics (``Static.ATOMIC_DQ``: 5 matrix products per tile pair instead of 7, no dQ kernel; the fp32
    summation order, hence the last bits of dq, varies between runs). True: the dQ kernel (bitwise
    reproducible). None (default): ``functional.default_deterministic()`` (torch's deterministic flag unless
    ``flashmaps.functional.DETERMINISTIC`` overrides it)."""
    B, Hq, L, _ = q.shape
    S = k.shape[2]
    dev = q.device
    placeholder = _placeholder(dev)
    c = _setup(q, k, v, normalizer, mask, causal, scale, softcap, dropout_p, seed, placeholder)
    if not c.hooks.has_backward:
        raise NotImplementedError(f"the normalizer {normalizer.spec!r} has no Triton backward hooks")
    views = _unpack(extras, c.hooks, q, v, True, S)
    live = block_mask_view(views, B, Hq, L, S)         # the forward's block mask (it ran unsplit: gradients)
    # (the int16 tile lists hold every tile index; one list slot per (head, block): no program that redoes a head)
    if (live is not None and (Hq // c.Hkv) * _cdiv(L, MASK_BLOCK) < 1 << 15 and _cdiv(S, MASK_BLOCK) < 1 << 15
            and head_grid(B * Hq)[1] == 1):
        c = c._replace(static=c.static._replace(BLOCK_MASK=True))
    else:
        live = None
    if c.hooks.has_g and "o2" not in views:
        raise ValueError("launch_backward: extras lacks the backward extras (entmax15's O2); run the forward "
                         "with need_grad=True")
    stats = [x.contiguous() for x in stats]
    rows = RowOut(stats[0] if stats else placeholder, stats[-1] if stats else placeholder,
                  views.get("thr", placeholder), views.get("sum_g", placeholder), placeholder, placeholder)
    o_bwd = views["o2"] if c.hooks.has_g else out      # the row term is taken against O2 for entmax15
    norm = _memo(c.hooks, "bwd", lambda: c.hooks.with_consts(()))   # consts are forward-only: one backward per hooks

    if deterministic is None:
        from .functional import default_deterministic

        deterministic = default_deterministic()
    atomic = not deterministic
    # delta = rowsum(dO * O_bwd) - delta_shift; (w0, w1) = bwd_rows(stats, thr, sum_g): (B, Hq, L) fp32 each,
    # the non-finite rule's flags; atomic dQ: the zeroed fp32 accumulator the dK/dV kernel adds into
    # (and the block mask's per-program lists of live tiles, int16: see `BwdRows.lists`)
    lists = placeholder if live is None else torch.empty(live.shape, dtype=torch.int16, device=dev)
    rb, dq_acc = bwd_rows_buffers((B, Hq, L), B * c.Hkv, q.shape[-1], atomic,
                                  placeholder if live is None else live, placeholder, lists)
    pre_bm = INTERPRET_CONFIG["BM"] if _INTERPRET else _PRE_BM
    attn_bwd_preprocess[(_cdiv(L, pre_bm), *head_grid(B * Hq))](
        View.of(o_bwd), View.of(dout), rows, rb, B, Hq, L, BM=pre_bm, ST=_variant(c.static, ATOMIC_DQ=atomic),
        NORM=norm, HP=c.hp, SHIFT=shift_rows(delta_shift, (B, Hq, L), dev), DQA=dq_acc, GROUP=Hq // c.Hkv)

    dk = torch.empty(k.shape, dtype=k.dtype, device=dev)
    dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
    Q, K, V, DO = View.of(q), View.of(k), View.of(v), View.of(dout)
    tail = (rb, c.dims, c.scale, c.sm_scale, c.drop, c.seed, _bucket(L), _bucket(S))
    meta = dict(ST=c.static, NORM=norm)
    # config: one dict for both kernels, or {"dkdv": {...}, "dq": {...}} (either may be left out: autotune)
    per_kernel = config if config is not None and ("dkdv" in config or "dq" in config) else \
        {"dkdv": config, "dq": config}
    _launch(attn_bwd_dkdv, triton_configs.attn_bwd_dkdvq_tuned if atomic else triton_configs.attn_bwd_dkdv_tuned,
            per_kernel.get("dkdv"),
            lambda META: (_cdiv(S, META["BN"]), *head_grid(B * c.Hkv)),
            (Q, K, V, DO, c.mask, View.of(dk), View.of(dv), *tail),
            dict(meta, ST=_variant(c.static, ATOMIC_DQ=atomic), DQA=dq_acc))
    if atomic:
        return dq_acc.view(q.shape).to(q.dtype), dk, dv
    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    _launch(attn_bwd_dq, triton_configs.attn_bwd_dq_tuned, per_kernel.get("dq"),
            lambda META: (_cdiv(L, META["BM"]), *head_grid(B * Hq)), (Q, K, V, DO, c.mask, View.of(dq), *tail), meta)
    return dq, dk, dv


def bwd_rows_buffers(rows_shape, heads: int, head_d: int, atomic: bool, live, placeholder, lists=0):
    """(`BwdRows`, DQA) of a backward over ``rows_shape`` query rows ((B, Hq, L), or (Hq, total_q) packed) of
    head dim ``head_d``: delta, w0, w1, ``live`` (the block mask or a placeholder), the non-finite rule's flags
    (head_bad: ``heads`` = B * Hkv (b, kv head) flags; row_bad without the atomic dQ) and with ``atomic`` the fp32
    dQ accumulator (rows_shape + (head_d,), flat); ``lists``: `BwdRows.lists`. All but ``live`` and ``lists`` are
    views of ONE zeroed allocation, split in one op (issue 17: two ops instead of five; the rows, written by the
    preprocess, start 16-byte aligned past the flags)."""
    n = math.prod(rows_shape)
    n_rows, dq_n = (3, n * head_d) if atomic else (4, 0)
    pad = -heads % 4
    dqa, head_bad, _, *rows = torch.zeros(dq_n + heads + pad + n_rows * n, dtype=torch.float32,
                                          device=placeholder.device).split([dq_n, heads, pad] + [n] * n_rows)
    if atomic:
        return BwdRows(*rows, live, head_bad, placeholder, lists), dqa
    return BwdRows(*rows[:3], live, head_bad, rows[3], lists), placeholder


def shift_rows(delta_shift: Optional[torch.Tensor], rows_shape, dev) -> Optional[torch.Tensor]:
    """``delta_shift`` as the preprocess kernel's SHIFT: fp32 contiguous of rows_shape, or None."""
    if delta_shift is None:
        return None
    return delta_shift.to(device=dev, dtype=torch.float32).expand(rows_shape).contiguous()


def backward(dout, q, k, v, out, stats, extras, normalizer: Normalizer, *, mask, causal, scale, softcap,
             dropout_p, seed, config: Optional[dict] = None, delta_shift=None,
             deterministic: Optional[bool] = None):
    """The custom op's backward (see the module docstring): (dq, dk, dv); ``deterministic`` as in
    `launch_backward`."""
    return launch_backward(dout, q, k, v, out, stats, extras, normalizer, mask=mask, causal=causal,
                           scale=scale, softcap=softcap, dropout_p=dropout_p, seed=seed, config=config,
                           delta_shift=delta_shift, deterministic=deterministic)


def backward_at_threshold(dout, q, k, v, out, stats, extras, normalizer: Normalizer, stat_grads: dict, *, mask,
                          causal, scale, softcap, deterministic: Optional[bool] = None):
    """Gradients of phase 2 of the two-phase protocol (``launch_forward(..., threshold=, save_extras=True)``) with
    the threshold as an input: (dq, dk, dv, {name: (B, Hq, L)} the threshold's gradients). ``stats``: the forward's
    statistics in ``normalizer.stats`` order; ``stat_grads``: the gradients of the part's own statistics (top-k's
    lse). The ordinary backward kernels (their weights at the saved threshold) with the row-term shift of
    ``Normalizer.kernel_at_threshold_grad``."""
    saved = unpack_extras(extras, normalizer, q, v, True, k.shape[2])
    shift, dthr = normalizer.kernel_at_threshold_grad(dout, saved, dict(zip(normalizer.stats, stats)), stat_grads)
    dq, dk, dv = launch_backward(dout, q, k, v, out, stats, extras, normalizer, mask=mask, causal=causal, scale=scale,
                                 softcap=softcap, delta_shift=shift, deterministic=deterministic)
    return dq, dk, dv, dthr


def dropout_keep_mask(seed: int, shape, dropout_p: float, device=None) -> torch.Tensor:
    """The bool keep mask (B, Hq, L, S) the kernels use for ``seed`` (forward and backward): the weights
    applied are ``p * keep / (1 - dropout_p)``. Materializes (B, Hq, L, S): for tests, small sizes."""
    B, Hq, L, S = shape
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    keep = torch.empty((B, Hq, L, S), dtype=torch.uint8, device=device)
    bm, bn = 16, 64
    dropout_mask_kernel[(triton.cdiv(L, bm), triton.cdiv(S, bn), B * Hq)](
        keep, int(seed), float(dropout_p), L, S, BM=bm, BN=bn)
    return keep.bool()


def attention(q, k, v, normalizer: Normalizer, *, mask, causal, scale, softcap, dropout_p, return_stats,
              seed=None):
    """The backend contract of :mod:`flashmaps.functional`: out (B, Hq, L, Dv), or (out, stats dict)
    with return_stats; through the custom ops of :mod:`flashmaps.ops`."""
    from . import ops

    return ops.attention("triton", q, k, v, normalizer, mask=mask, causal=causal, scale=scale,
                         softcap=softcap, dropout_p=dropout_p, return_stats=return_stats, seed=seed)
