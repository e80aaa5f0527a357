"""Public functional API: argument checking (once, here), then dispatch to a backend.

Backends (``flashmaps.torch_path`` on any device, ``flashmaps.triton_path`` on CUDA or under
``TRITON_INTERPRET=1``) may assume valid input. Calls go through the custom ops of :mod:`flashmaps.ops`
(forward and backward as torch.library ops, so torch.compile traces them); what a call means::

    ops.attention(backend, q, k, v, normalizer, *, mask, causal, scale, softcap, dropout_p, return_stats)

    q (B, Hq, L, Dqk), k (B, Hkv, S, Dqk), v (B, Hkv, S, Dv): one float dtype, one device, Hq % Hkv == 0,
        L >= 1, S >= 1, any strides;
    normalizer: a Normalizer instance;
    mask: None, or a (B, Hq, L, S) tensor (a broadcast view with zero strides, never materialized),
        dtype bool (True = may attend) or floating (added to the scores; an entry <= finfo(mask.dtype).min,
        -inf included, excludes the key);
    causal: None, "upper_left" (j <= i) or "lower_right" (j <= i + S - L);
    scale: float; softcap: None or a float > 0; dropout_p: float in [0, 1);
    returns out (B, Hq, L, Dv) in v's dtype, or (out, {stat name: (B, Hq, L) tensor}) if return_stats.
"""

from __future__ import annotations

import math
import numbers
import os
import sys

import torch

from . import linear, ops
from .normalizers import Normalizer, parse
from .window import check_window
from .window import encode as encode_window

__all__ = ["attention", "sdpa", "merge", "threshold_candidates", "global_threshold", "SdpaValueError",
           "SdpaTypeError"]

_CAUSAL = {False: None, None: None, True: "upper_left", "upper_left": "upper_left", "lower_right": "lower_right"}
_BACKENDS = ("auto", "torch", "triton")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: what `linear._choose` says for form="auto" and a normalizer without a linear form (only .form is read)
_QUADRATIC = linear.FormChoice("quadratic", "", None, None)
#: the Triton backend on non-CUDA tensors: its interpreter, TRITON_INTERPRET=1 set before importing flashmaps
_TRITON_OFF_CUDA = os.environ.get("TRITON_INTERPRET") == "1"

#: the process-wide meaning of ``deterministic=None`` (:func:`attention`, the Triton backward): None follows
#: ``torch.are_deterministic_algorithms_enabled()``; True or False overrides it without touching torch's own
#: flag (the benchmarks set it as a knob, ``flashmaps.functional.DETERMINISTIC=True``, to time both backwards)
DETERMINISTIC: "bool | None" = None


def default_deterministic() -> bool:
    """What ``deterministic=None`` means now: :data:`DETERMINISTIC`, else torch's deterministic flag."""
    if DETERMINISTIC is not None:
        return bool(DETERMINISTIC)
    return torch.are_deterministic_algorithms_enabled()


# ----------------------------------------------------------------------------------------------------
# argument checking


def _check_tensor(x, argname: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{argname} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(
            f"{argname} has dtype {x.dtype}; flashmaps needs float16, bfloat16 or float32 "
            "(float64 on the torch backend); convert it with .to(torch.float32) or similar"
        )


def _check_qkv(q, k, v, enable_gqa: bool, names=("q", "k", "v")) -> None:
    nq, nk, nv = names
    for x, n in zip((q, k, v), names):
        _check_tensor(x, n)
        if x.dim() != 4:
            raise ValueError(
                f"{n} must be 4-D (batch, heads, seq_len, head_dim), got shape {tuple(x.shape)}; "
                "use flashmaps.sdpa for other ranks"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"{nq}, {nk}, {nv} must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them to one"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"{nq}, {nk}, {nv} must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, L, Dqk = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(
            f"batch sizes differ: {nq} has {B}, {nk} has {k.shape[0]}, {nv} has {v.shape[0]}; they must match"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(
            f"{nk} and {nv} must have the same sequence length (dim 2), got {k.shape[2]} and {v.shape[2]}"
        )
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"{nk} and {nv} must have the same number of heads, got {k.shape[1]} and {v.shape[1]}")
    if k.shape[3] != Dqk:
        raise ValueError(
            f"{nq} and {nk} must have the same head dim (dim 3), got {Dqk} and {k.shape[3]} "
            f"({nv} may differ)"
        )
    Hkv = k.shape[1]
    if Hq != Hkv:
        if not enable_gqa:
            raise ValueError(
                f"{nq} has {Hq} heads but {nk}/{nv} have {Hkv}; for grouped-query attention set enable_gqa=True"
            )
        if Hkv == 0 or Hq % Hkv:
            raise ValueError(
                f"Number of heads in key and value must divide the number of heads in query: grouped-query "
                f"attention needs the query heads ({Hq}) to be a multiple of the key/value heads ({Hkv})"
            )
    if Dqk == 0 or v.shape[3] == 0:
        raise ValueError(f"head dims must be >= 1, got {nq}/{nk}: {Dqk}, {nv}: {v.shape[3]}")


def _check_mask(attn_mask, shape, device, argname="attn_mask"):
    """Validate a bool/float mask and return it as a broadcast view of ``shape`` (B, Hq, L, S)."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"{argname} must be a torch.Tensor (bool or float) or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise TypeError(
            f"{argname} has dtype {attn_mask.dtype}; use a bool mask (True = may attend) or a float mask "
            "(added to the scores, -inf excludes)"
        )
    if attn_mask.device != device:
        raise ValueError(f"{argname} is on {attn_mask.device} but the inputs are on {device}; move it with .to()")
    if attn_mask.requires_grad:
        raise ValueError(
            f"{argname} requires grad, but flashmaps does not compute gradients with respect to the mask; "
            f"pass {argname}.detach()"
        )
    try:
        torch.broadcast_shapes(attn_mask.shape, shape)
    except RuntimeError:
        raise ValueError(
            f"{argname} of shape {tuple(attn_mask.shape)} does not broadcast to (batch, heads, L, S) = "
            f"{tuple(shape)}"
        ) from None
    if attn_mask.dim() > len(shape):
        raise ValueError(f"{argname} has {attn_mask.dim()} dims; at most {len(shape)} broadcast to {tuple(shape)}")
    return attn_mask.expand(shape)


def _check_causal(causal):
    try:
        return _CAUSAL[causal]
    except (KeyError, TypeError):
        raise ValueError(
            f"causal must be False, True, 'upper_left' or 'lower_right', got {causal!r}"
        ) from None


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if type(scale) is float and math.isfinite(scale):     # the common case without the ABC check (issue 17)
        return scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def _check_softcap(softcap):
    if softcap is None:
        return None
    if type(softcap) is float and 0.0 < softcap < math.inf:  # the common case without the ABC check (issue 17)
        return softcap
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a positive float or None, got {type(softcap).__name__}")
    softcap = float(softcap)
    if not (softcap > 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be a finite float > 0 (e.g. 50.0), got {softcap}; use None for no cap")
    return softcap


def _check_dropout(dropout_p) -> float:
    if type(dropout_p) is float and 0.0 <= dropout_p < 1.0:  # the common case without the ABC check (issue 17)
        return dropout_p
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return dropout_p


def _choose_backend(backend, device: torch.device, dtype: torch.dtype):
    if not isinstance(backend, str) or backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, _BACKENDS))}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and dtype != torch.float64 else "torch"
    if backend == "triton":
        if device.type != "cuda" and not _TRITON_OFF_CUDA:
            raise ValueError(
                f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before importing flashmaps "
                f"to run the kernels on the CPU (got tensors on {device}); or use backend='torch'"
            )
        if dtype == torch.float64:
            raise TypeError("backend='triton' supports float16, bfloat16 and float32; float64 needs backend='torch'")
    return backend


def _empty_result(q, k, v, norm: Normalizer, return_stats: bool):
    """S == 0: every row has no allowed key -> zeros (and the empty-row statistics)."""
    B, Hq, L, _ = q.shape
    # keep the result attached to the inputs so that .backward() works (and gives zero gradients)
    link = (q.sum() + k.sum() + v.sum()) * 0 if (q.requires_grad or k.requires_grad or v.requires_grad) else 0
    out = torch.zeros(B, Hq, L, v.shape[-1], dtype=v.dtype, device=v.device) + link
    if not return_stats:
        return out
    sdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    stats = {n: torch.full((B, Hq, L), val, dtype=sdt, device=q.device) for n, val in zip(norm.stats, norm.empty_stats)}
    return out, stats


# ----------------------------------------------------------------------------------------------------
# public API


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    normalizer: str | Normalizer = "softmax",
    *,
    causal=False,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    enable_gqa: bool = False,
    dropout_p: float = 0.0,
    return_stats: bool = False,
    backend: str = "auto",
    form: str = "auto",
    window: tuple[int, int] | None = None,
    sinks: torch.Tensor | None = None,
    deterministic: bool | None = None,
    threshold: dict | None = None,
):
    """Blockwise attention with a pluggable normalizer.

    ``o_i = sum_j p_ij v_j`` with ``p_i = N(s_i)`` and ``s_ij = scale * q_i . k_j`` (then
    ``softcap * tanh(s / softcap)`` if ``softcap``, then ``+ attn_mask`` if it is a float mask).

    Args:
        q: (B, Hq, L, Dqk). k: (B, Hkv, S, Dqk). v: (B, Hkv, S, Dv). One float dtype, one device.
        normalizer: "softmax", "taylor", "entmax15", "topk:<k>" or a Normalizer instance.
        causal: False, True (= "upper_left", j <= i, as SDPA's is_causal) or "lower_right"
            (j <= i + S - L, the KV-cache convention).
        attn_mask: bool (True = may attend) or float (added to the scores) broadcastable to
            (B, Hq, L, S). A float entry that is -inf or <= finfo(mask dtype).min excludes the key.
        scale: defaults to 1/sqrt(Dqk). softcap: None or > 0.
        enable_gqa: allow Hq to be a multiple of Hkv (query head h reads kv head h // (Hq // Hkv)).
        dropout_p: dropout on the normalized weights, scaled by 1/(1 - dropout_p).
        return_stats: also return the normalizer's row statistics, a dict of (B, Hq, L) float tensors
            (softmax: natural-log "lse"; taylor: "z"; entmax15: "tau"; topk: "tau", "lse"). Differentiable for
            the units with ``Normalizer.stat_delta`` (softmax, taylor, harmonic, gumbel, softpick), so that
            ``merge`` has exact gradients; the thresholds (entmax's, top-k's) are returned non-differentiable.
        backend: "auto" (Triton on CUDA, the torch path otherwise), "torch" or "triton".
        form: "auto", "quadratic" (the tile loop) or "linear" (normalizers whose ``forms`` have it, as taylor:
            chunked linear attention, O(L) time, a fixed-size state); "auto" follows
            ``flashmaps.choose_form`` (the cost model of ``flashmaps.linear.costs``), which also says why.
        window: None or (left, right), flash_attn's ``window_size``: key j is allowed for query i when
            ``i + off - left <= j <= i + off + right`` (-1: no bound on that side), ``off = S - L`` (lower-right
            alignment), or the alignment of ``causal`` when that is given (which also bounds the right side by
            0). Keys outside are excluded; whole tiles outside the band are never computed
            (``flashmaps.window``). The quadratic form only.
        sinks: None or a float tensor (Hq,): attention sinks (gpt-oss), one logit per query head added to
            every row's denominator with a zero value (softmax: ``out * sigmoid(lse - sink_h)``); softmax and
            topk only (``flashmaps.sinks``). Differentiable; the returned stats are those with the sink.
        deterministic: None (default: ``torch.are_deterministic_algorithms_enabled()``, so False unless
            ``torch.use_deterministic_algorithms(True)`` was called; :data:`DETERMINISTIC` overrides it), True
            or False. The Triton backward adds
            dQ with fp32 atomics from the dK/dV kernel when False (5 matrix products per tile instead of 7:
            faster; the last bits of dq vary between runs, as FlashAttention-2/3's and torch's flash SDPA
            backward by default) and runs the separate dQ kernel when True (bitwise reproducible). The forward
            and the torch backend are deterministic either way.
        threshold: None, or a sparse unit's threshold over a UNION of key sets, {name: (B, Hq, L)} from
            :func:`global_threshold`: phase 2 of the two-phase protocol (see :func:`merge`). The weights of these
            keys at that threshold (entmax family: ``sum_j p_j v_j`` not divided by this part's mass; top-k: the
            softmax over this part's kept keys, with its ``lse``); the stats report the given ``tau``. With
            gradients (units with ``Normalizer.has_threshold_grads``: all the built-in ones) the threshold is an
            input too: its gradient flows back through ``global_threshold`` and ``threshold_candidates`` to every
            part's scores, so the merged output has exactly the gradients of the call over the union. No dropout,
            no sinks.

    Returns:
        out (B, Hq, L, Dv) in v's dtype, or (out, stats) if return_stats. A row with no allowed key
        gives zeros.
    """
    _check_qkv(q, k, v, enable_gqa)
    norm = parse(normalizer)
    B, Hq, L, Dqk = q.shape
    S = k.shape[2]
    causal_mode = _check_causal(causal)
    win = check_window(window)
    mask = _check_mask(attn_mask, (B, Hq, L, S), q.device)
    scale_f = _check_scale(scale, Dqk)
    softcap_f = _check_softcap(softcap)
    dropout_f = _check_dropout(dropout_p)
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {type(return_stats).__name__}")
    if deterministic is None:
        deterministic = default_deterministic()
    elif not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be None, True or False, got {type(deterministic).__name__}")
    backend_name = _choose_backend(backend, q.device, q.dtype)
    band = encode_window(causal_mode, win)
    if win is not None and band != causal_mode:
        if form == "linear":
            raise ValueError("form='linear' takes no window (its state sums every earlier key); use "
                             "form='quadratic' or 'auto'")
        form = "quadratic" if form == "auto" else form
    if form == "auto" and "linear" not in norm.forms:   # nothing to choose: skip the cost model (issue 17)
        choice = _QUADRATIC
    else:
        choice = linear._choose(norm, form, L, S, Dqk, v.shape[3], mask=mask, causal=causal_mode, softcap=softcap_f,
                                dropout_p=dropout_f, backend=backend, resolved=backend_name)
    _check_head_tensor(norm.head_params(), Hq, q.device, f"{norm.name}'s per-head parameters")
    if sinks is not None:
        _check_head_tensor(sinks, Hq, q.device, "sinks")
        if type(norm).sink_stats is Normalizer.sink_stats:
            raise ValueError(f"sinks: attention sinks need a log-sum-exp denominator (softmax, topk); the normalizer "
                             f"{norm.spec!r} has none (see flashmaps.sinks)")
        if choice.form == "linear":
            raise ValueError("sinks: not supported by form='linear'; use form='quadratic'")
    if threshold is not None:
        _check_threshold(norm, threshold, (B, Hq, L), q.device, (q, k, v), dropout_f, sinks)
    if L == 0 or S == 0 or B == 0 or Hq == 0:
        return _empty_result(q, k, v, norm, return_stats)
    causal_mode = band
    if threshold is not None:
        return _at_threshold(backend_name, q, k, v, norm, threshold, mask=mask, causal=causal_mode, scale=scale_f,
                             softcap=softcap_f, return_stats=return_stats, deterministic=deterministic)
    if choice.form == "linear":
        return linear.attention(q, k, v, norm, mask=mask, causal=causal_mode, scale=scale_f, return_stats=return_stats,
                                backend=backend_name)
    return ops.attention(
        backend_name, q, k, v, norm, mask=mask, causal=causal_mode, scale=scale_f, softcap=softcap_f,
        dropout_p=dropout_f, return_stats=return_stats, **({} if sinks is None else {"sinks": sinks}),
        deterministic=deterministic,
    )


def _check_head_tensor(x, Hq: int, device, argname: str) -> None:
    """A per-query-head tensor: None, or float (Hq,) on the inputs' device."""
    if x is None:
        return
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or tuple(x.shape) != (Hq,):
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{argname} must be a float tensor of shape (Hq,) = ({Hq},), one value per query head; "
                         f"got {got}")
    if x.device != device:
        raise ValueError(f"{argname} is on {x.device}, the inputs on {device}; move it with .to(q.device)")


def merge(normalizer: str | Normalizer, outs, stats, threshold: dict | None = None):
    """Combine attention results over DISJOINT key sets of the same queries into the result over their union.

    ``outs[i]`` (B, Hq, L, Dv) and ``stats[i]`` (a dict {name: (B, Hq, L)}) are what
    ``attention(..., return_stats=True)`` returned for part i of the keys (e.g. two halves of a KV cache).
    Returns ``(out, stats)`` for the union, computed with torch ops on the given tensors (autograd flows
    through them, and the statistics returned by ``attention`` carry gradients for the units with
    ``Normalizer.stat_delta``: softmax, taylor, harmonic, gumbel, softpick; so a loss on the merged output has
    the gradients w.r.t. q, k, v of the call over all keys). The rule is the normalizer's own
    (``Normalizer.merge``): softmax by log-sum-exp (in fp32), taylor by sums.

    Sparse units (entmax15, sparsemax, entmax:<alpha>, topk:<k>: ``Normalizer.two_phase``) have a global
    threshold, so independent parts do not merge; they use the two-phase protocol (each unit's docstring)::

        cands = [flashmaps.threshold_candidates(q, k_i, norm) for each part]    # phase 1: (B, Hq, L, m_i)
        thr = flashmaps.global_threshold(norm, cands)                            # the union's {"tau", ...}
        parts = [flashmaps.attention(q, k_i, v_i, norm, threshold=thr, return_stats=True) for each part]
        out, stats = flashmaps.merge(norm, [o for o, _ in parts], [s for _, s in parts], threshold=thr)

    ``threshold`` is required for them (and refused for the others); every part must report the given ``tau``
    (a part computed independently does not, and raises). Gradients are exact (``flashmaps.twophase``): the
    threshold is a tensor of the autograd graph, and a loss on the merged output has the gradients w.r.t. q and
    every part's k, v of the call over the union: each part's backward at the fixed threshold, plus the
    threshold's own gradient (entmax family: ``dtau/ds_j = a u_j / sum u`` by the implicit function of
    ``sum p = 1``, ``u = dp/dx``; top-k: the parts' lse as for softmax), which reaches the scores through the
    candidates. Summed, ``dS_j = u_j (dP_j - sum_all u dP / sum_all u)``: the backward of the full call.
    """
    norm = parse(normalizer)
    if isinstance(outs, torch.Tensor) or not isinstance(outs, (list, tuple)) or not outs:
        raise TypeError("merge: outs must be a non-empty list of (B, Hq, L, Dv) tensors, one per part")
    if not isinstance(stats, (list, tuple)) or len(stats) != len(outs):
        raise TypeError(f"merge: stats must be a list of {len(outs)} dicts (one per part, from return_stats=True)")
    for i, (o, st) in enumerate(zip(outs, stats)):
        _check_tensor(o, f"outs[{i}]")
        if o.dim() != 4 or o.shape != outs[0].shape:
            raise ValueError(f"merge: outs[{i}] has shape {tuple(o.shape)}; every part must be (B, Hq, L, Dv) "
                             f"like outs[0] {tuple(outs[0].shape)}")
        if not isinstance(st, dict) or set(st) != set(norm.stats):
            got = sorted(st) if isinstance(st, dict) else type(st).__name__
            raise ValueError(f"merge: stats[{i}] must be a dict with exactly {list(norm.stats)} for {norm.spec!r}, "
                             f"got {got}")
        for name, x in st.items():
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(o.shape[:3]):
                raise ValueError(f"merge: stats[{i}][{name!r}] must be a (B, Hq, L) = {tuple(o.shape[:3])} tensor")
    if not norm.two_phase:
        if threshold is not None:
            raise ValueError(f"merge: threshold= is the two-phase protocol of the sparse units; {norm.spec!r} merges "
                             "independent parts without it")
        return norm.merge(list(outs), list(stats))
    if threshold is None:
        raise ValueError(f"merge: {norm.spec!r} has a global threshold: independent parts do not merge. Use the "
                         "two-phase protocol: thr = flashmaps.global_threshold(norm, [flashmaps.threshold_candidates("
                         "q, k_i, norm) ...]), each part's attention(..., threshold=thr), then merge(..., threshold=thr)")
    _check_threshold(norm, threshold, tuple(outs[0].shape[:3]), outs[0].device)
    for i, st in enumerate(stats):
        if not torch.equal(st["tau"], threshold["tau"].to(st["tau"].dtype)):
            raise ValueError(f"merge: stats[{i}]['tau'] is not the given threshold: part {i} was not computed at it "
                             "(pass threshold= to its attention call: phase 2 of the two-phase protocol)")
    return norm.merge_at_threshold(list(outs), list(stats), threshold)


def threshold_candidates(q, k, normalizer: str | Normalizer, *, causal=False, attn_mask=None, scale=None,
                         softcap=None, enable_gqa: bool = False, window=None) -> torch.Tensor:
    """Phase 1 of a sparse unit's two-phase protocol (see :func:`merge`): the candidates of the keys ``k``.

    q (B, Hq, L, Dqk), k (B, Hkv, S, Dqk); the other arguments as :func:`attention` for this part. Returns
    (B, Hq, L, m) scores (natural units, float32; float64 for float64 inputs; -inf padding) that hold every key
    of this part that can be in the union's support (entmax family: the local support ``{x > tau_part}``,
    m = the widest row's support, at worst S for flat rows; top-k: the k + 1 largest). Scores are computed with
    torch ops (one matmul per chunk of rows, on any device); differentiable w.r.t. q and k (the candidates are
    scores: their backward recomputes them chunk by chunk) for units with ``Normalizer.has_threshold_grads``."""
    _check_qkv(q, k, k, enable_gqa, names=("q", "k", "k"))
    norm = parse(normalizer)
    B, Hq, L, Dqk = q.shape
    S = k.shape[2]
    if not norm.two_phase:
        raise ValueError(f"threshold_candidates: {norm.spec!r} has no two-phase protocol (it merges independent "
                         "parts with flashmaps.merge); the sparse units have one")
    band = encode_window(_check_causal(causal), check_window(window))
    mask = _check_mask(attn_mask, (B, Hq, L, S), q.device)
    scale_f, softcap_f = _check_scale(scale, Dqk), _check_softcap(softcap)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if min(B, Hq, L, S) == 0:
        return torch.full((B, Hq, L, 1), float("-inf"), dtype=acc, device=q.device)
    from . import torch_path

    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad) and norm.has_threshold_grads:
        if norm.score != "dot":
            raise ValueError(f"threshold_candidates: gradients of {norm.spec!r}'s candidates are provided for the "
                             "dot-product score only; detach q and k")
        from . import twophase

        return twophase.candidates(q, k, norm, mask=mask, causal=band, scale=scale_f, softcap=softcap_f)
    with torch.no_grad():
        return torch_path.threshold_candidates(q, k, norm, mask=mask, causal=band, scale=scale_f, softcap=softcap_f)


def global_threshold(normalizer: str | Normalizer, candidates) -> dict:
    """The union's threshold from the parts' :func:`threshold_candidates` (a list of (B, Hq, L, m_i) tensors):
    {name: (B, Hq, L)} (``tau``; top-k also ``cut``, the value phase 2 compares against), for
    ``attention(..., threshold=)`` and ``merge(..., threshold=)``. Differentiable w.r.t. the candidates (units with
    ``Normalizer.has_threshold_grads``)."""
    norm = parse(normalizer)
    if not norm.two_phase:
        raise ValueError(f"global_threshold: {norm.spec!r} has no two-phase protocol")
    if isinstance(candidates, torch.Tensor) or not isinstance(candidates, (list, tuple)) or not candidates:
        raise TypeError("global_threshold: candidates must be a non-empty list of (B, Hq, L, m) tensors, one per part")
    for i, c in enumerate(candidates):
        if not isinstance(c, torch.Tensor) or c.dim() != 4 or c.shape[:3] != candidates[0].shape[:3]:
            raise ValueError(f"global_threshold: candidates[{i}] must be a (B, Hq, L, m) tensor like candidates[0]")
    c = torch.cat(candidates, -1)                          # (type promotion as torch.cat's)
    if torch.is_grad_enabled() and c.requires_grad:
        _check_threshold_grads(norm, "global_threshold")
        from . import twophase

        return twophase.global_threshold(norm, c)
    return {n: x[..., 0] for n, x in norm.candidate_threshold(c).items()}


def _check_threshold(norm, threshold, shape, device, inputs=(), dropout_p=0.0, sinks=None) -> None:
    """A two-phase unit's threshold {name: (B, Hq, L)} (from global_threshold) for phase 2 or the merge."""
    if not norm.two_phase:
        raise ValueError(f"threshold: {norm.spec!r} has no two-phase protocol (the sparse units have one)")
    if not isinstance(threshold, dict) or "tau" not in threshold:
        raise TypeError("threshold must be the dict flashmaps.global_threshold returned ({'tau': (B, Hq, L), ...})")
    for name, x in threshold.items():
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(shape) or not x.is_floating_point():
            raise ValueError(f"threshold[{name!r}] must be a float (B, Hq, L) = {tuple(shape)} tensor")
        if x.device != device:
            raise ValueError(f"threshold[{name!r}] is on {x.device}, the inputs on {device}")
    if dropout_p > 0 or sinks is not None:
        raise ValueError("threshold: phase 2 of the two-phase protocol takes no dropout_p and no sinks")
    if _needs_grad(*inputs, *threshold.values()):
        _check_threshold_grads(norm, "threshold")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _check_threshold_grads(norm, argname: str) -> None:
    if not norm.has_threshold_grads:
        raise ValueError(f"{argname}: gradients through the two-phase protocol are not provided for {norm.spec!r} "
                         "(it lacks Normalizer.candidate_threshold_grad, torch_dscores_at_threshold, "
                         "kernel_at_threshold_grad); run it under torch.no_grad() or detach q, k, v")


def _at_threshold(backend, q, k, v, norm, threshold, *, mask, causal, scale, softcap, return_stats, deterministic):
    """Phase 2 on a backend: out (B, Hq, L, Dv) [, stats reporting the given tau]; with gradients through
    ``flashmaps.twophase``."""
    try:
        if _needs_grad(q, k, v, *threshold.values()):
            from . import twophase

            out, stats = twophase.at_threshold(backend, q, k, v, norm, threshold, mask=mask, causal=causal,
                                               scale=scale, softcap=softcap, deterministic=deterministic)
        elif backend == "torch":
            from . import torch_path

            out, st, _ = torch_path.forward(q, k, v, norm, mask=mask, causal=causal, scale=scale, softcap=softcap,
                                            dropout_p=0.0, seed=0, need_grad=False, threshold=threshold)
            stats = dict(zip(norm.stats, st))
        else:
            from . import triton_path

            res = triton_path.launch_forward(q, k, v, norm, mask=mask, causal=causal, scale=scale, softcap=softcap,
                                             threshold=threshold)
            out, stats = res.out, res.stats
    except KeyError as e:
        raise ValueError(f"threshold: missing the entry {e} (pass the dict flashmaps.global_threshold returned)") from None
    return (out, stats) if return_stats else out


def _causal_from_bias(attn_mask, L: int, S: int):
    """Map torch.nn.attention.bias.CausalBias to a causal mode, or return None if not one. A CausalBias
    exists only once its module is imported, which this does not do (that module imports torch._dynamo)."""
    bias = sys.modules.get("torch.nn.attention.bias")
    if bias is None or attn_mask is None:
        return None
    CausalBias, CausalVariant = bias.CausalBias, bias.CausalVariant
    if not isinstance(attn_mask, CausalBias):
        return None
    if attn_mask.seq_len_q != L or attn_mask.seq_len_kv != S:
        raise ValueError(
            f"attn_mask: the causal bias was built for (L, S) = ({attn_mask.seq_len_q}, {attn_mask.seq_len_kv}) "
            f"but the inputs have ({L}, {S})"
        )
    return "upper_left" if attn_mask.variant == CausalVariant.UPPER_LEFT else "lower_right"


class SdpaValueError(RuntimeError, ValueError):
    """A bad argument to :func:`sdpa`: caught by ``except ValueError`` and, as torch's own SDPA errors are,
    by ``except RuntimeError``."""


class SdpaTypeError(RuntimeError, TypeError):
    """A wrong type or dtype given to :func:`sdpa`: caught by ``except TypeError`` and ``except RuntimeError``."""


def _sdpa_layout(query, key, value, enable_gqa: bool):
    """Broadcast sdpa's (..., L, E) inputs as torch does and return (q4, k4, v4, batch dims, heads out, rank
    out): q4 (B, Hq, L, E), k4/v4 (B, Hkv, S, E/Ev); the head counts are checked by ``_check_qkv``."""
    rank = max(query.dim(), key.dim(), value.dim())
    if rank == 4 and query.dim() == key.dim() == value.dim():
        hq, hkv = query.shape[1], key.shape[1]
        if (query.shape[0] == key.shape[0] == value.shape[0] and hkv == value.shape[1]
                and (hq == hkv or 1 not in (hq, hkv) or (enable_gqa and hkv == 1))):
            return query, key, value, tuple(query.shape[:1]), hq, rank   # already (B, H, L, E): no views (issue 17)
    r3 = max(rank, 3)
    q, k, v = (x.reshape((1,) * (r3 - x.dim()) + tuple(x.shape)) for x in (query, key, value))
    try:
        batch = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
        hkv = torch.broadcast_shapes(k.shape[-3:-2], v.shape[-3:-2])[0]
    except RuntimeError:
        raise ValueError(
            f"query, key, value have batch/head dims that do not broadcast: {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        ) from None
    hq = q.shape[-3]
    if hq != hkv and (hkv == 1 or hq == 1) and not (enable_gqa and hkv == 1):
        hq = hkv = max(hq, hkv)   # plain broadcasting of a single head, as torch's matmuls do (else: _check_qkv)
    n = math.prod(batch)

    def to4(x, h):
        x = x.expand(batch + (h,) + tuple(x.shape[-2:]))
        return x.reshape((n, h) + tuple(x.shape[-2:]))

    return to4(q, hq), to4(k, hkv), to4(v, hkv), batch, hq, rank


def sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    normalizer: str | Normalizer = "softmax",
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` with a choice of normalizer.

    query (..., Hq, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev) -> (..., Hq, L, Ev), as torch: any
    rank >= 2, leading dims broadcast against each other (2-D inputs are one head of one batch; 3-D ones have
    no head dim of their own). ``attn_mask`` is a bool or float tensor broadcastable to (..., Hq, L, S), or a
    ``torch.nn.attention.bias`` causal bias (``causal_upper_left`` / ``causal_lower_right``).
    ``dropout_p`` is applied whenever it is > 0 (as in torch: pass 0.0 in eval mode).
    The backward is deterministic when ``torch.are_deterministic_algorithms_enabled()`` (``deterministic`` of
    :func:`attention`; torch's flash SDPA backward switches the same way).

    Errors are :class:`SdpaValueError` / :class:`SdpaTypeError`: code written for torch catches them with
    ``except RuntimeError``, code written for flashmaps with ``except ValueError`` / ``except TypeError``.
    """
    try:
        return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, normalizer)
    except (SdpaValueError, SdpaTypeError):
        raise
    except TypeError as e:
        raise SdpaTypeError(str(e)) from None
    except ValueError as e:
        raise SdpaValueError(str(e)) from None


def _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, normalizer):
    names = ("query", "key", "value")
    for x, n in zip((query, key, value), names):
        _check_tensor(x, n)
    if min(query.dim(), key.dim(), value.dim()) < 2:
        raise ValueError(
            "Expected query, key, and value to all be at least 2 dimensional, but got "
            f"query.dim: {query.dim()} key.dim: {key.dim()} and value.dim: {value.dim()} instead."
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            "Expected query, key, and value to have the same dtype, but got "
            f"query.dtype: {query.dtype} key.dtype: {key.dtype} and value.dtype: {value.dtype} instead."
        )
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    L, S = query.shape[-2], key.shape[-2]
    causal = "upper_left" if is_causal else False
    bias_causal = _causal_from_bias(attn_mask, L, S)
    if (bias_causal is not None or attn_mask is not None) and is_causal:
        raise ValueError("_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True")
    if bias_causal is not None:
        causal, attn_mask = bias_causal, None
    q4, k4, v4, batch, hq, rank = _sdpa_layout(query, key, value, enable_gqa)
    _check_qkv(q4, k4, v4, enable_gqa, names=names)
    full = batch + (hq, L, S)
    if attn_mask is not None:
        attn_mask = _check_mask(attn_mask, full, query.device).reshape(q4.shape[:2] + (L, S))
    out = attention(
        q4, k4, v4, normalizer, causal=causal, attn_mask=attn_mask, scale=scale,
        enable_gqa=enable_gqa, dropout_p=dropout_p,
    )
    if out.dim() == rank:  # 4-D inputs
        return out
    return out.reshape((batch + (hq, L, value.shape[-1]))[-rank:])  # (..., Hq, L, Ev) at the inputs' rank
