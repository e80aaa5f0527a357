"""torch.library custom ops: the forward and backward of every backend as two opaque, compile-safe ops.

``flashmaps::attention_fwd`` and ``flashmaps::attention_bwd`` have fake (meta) implementations and an
autograd formula, so ``torch.compile(fullgraph=True)`` traces code that calls ``flashmaps.attention`` or
``flashmaps.sdpa`` without graph breaks, and ``torch.library.opcheck`` holds.

A backend module (``flashmaps.torch_path``, ``flashmaps.triton_path``) provides::

    forward(q, k, v, normalizer, *, mask, causal, scale, softcap, dropout_p, seed, need_grad)
        -> (out (B, Hq, L, Dv) in v's dtype, stats [n_stats x (B, Hq, L)] float32/64 (or one
            (n_stats, B, Hq, L) tensor), extras Tensor)
    extras_shape(normalizer, q, k, v, need_grad) -> shape of ``extras`` (float32; () -> (0,) when unused)
    backward(dout, q, k, v, out, stats, extras, normalizer, *, mask, causal, scale, softcap, dropout_p, seed,
             delta_shift, deterministic)
        -> (dq, dk, dv)     (deterministic: a bitwise reproducible backward; False allows atomics)

``stats`` follow ``normalizer.stats``; ``extras`` carries whatever else the backend's backward needs (the
Triton kernels' kernel-unit thresholds and entmax15's O2). The op stacks the stats as one
(n_stats, B, Hq, L) tensor. Gradients through the statistics (``Normalizer.stat_delta``, for the units that
define it; the others' statistics are non-differentiable) reach the backend as ``delta_shift`` (B, Hq, L) or
None: its backward takes ``delta - delta_shift`` as the row term. A call that records no gradient
(``torch.no_grad()``, or no input requiring grad) runs the forward directly, without the autograd.Function
(eager mode). The dropout seed is an int64 tensor drawn from torch's default generator (``torch.manual_seed``
reproduces a call), so no ``.item()`` happens outside the op.
"""

from __future__ import annotations

import sys
from importlib import import_module
from typing import Optional

import torch

from .normalizers import Normalizer, parse

__all__ = ["attention", "backend_module"]

_MODULES = {"torch": "flashmaps.torch_path", "triton": "flashmaps.triton_path"}
#: the seed of a call without dropout or score noise (never written; an ordinary tensor even if flashmaps is
#: imported under torch.inference_mode(), so that autograd may save it)
with torch.inference_mode(False):
    _ZERO_SEED = torch.zeros((), dtype=torch.int64)


def backend_module(name: str):
    mod = sys.modules.get(_MODULES[name])
    return mod if mod is not None else import_module(_MODULES[name])


def _stats_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _call_kwargs(mask, seed, causal, scale, softcap, dropout_p, stochastic=False):
    return dict(
        mask=mask, causal=causal or None, scale=scale, softcap=softcap, dropout_p=dropout_p,
        seed=int(seed.item()) if dropout_p > 0 or stochastic else 0,
    )


@torch.library.custom_op("flashmaps::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], seed: torch.Tensor,
    backend: str, normalizer: str, causal: str, scale: float, softcap: Optional[float], dropout_p: float,
    need_grad: bool, head_params: Optional[torch.Tensor] = None, sinks: Optional[torch.Tensor] = None,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out (B, Hq, L, Dv), stats (n_stats, B, Hq, L), extras). ``causal`` is "" for none. ``head_params``:
    the normalizer's per-head parameters (``Normalizer.head_params``) or None; ``sinks``: (Hq,) attention sink
    logits or None (then out and stats are those of the call with the sinks, ``Normalizer.sink_stats``);
    ``deterministic``: saved for the backward op (the forward is deterministic either way)."""
    return _fwd_impl(q, k, v, mask, seed, backend, normalizer, causal, scale, softcap, dropout_p, need_grad,
                     head_params, sinks)


def _fwd_impl(q, k, v, mask, seed, backend, normalizer, causal, scale, softcap, dropout_p, need_grad,
              head_params=None, sinks=None, deterministic=False):
    norm = normalizer if isinstance(normalizer, Normalizer) else parse(normalizer, head_params=head_params)
    out, stats, extras = backend_module(backend).forward(
        q, k, v, norm, need_grad=need_grad, **_call_kwargs(mask, seed, causal, scale, softcap, dropout_p, norm.stochastic)
    )
    if sinks is not None:
        out, stats = _apply_sinks(norm, out, list(stats), sinks)
    # outputs must have the strides the fake implementation promises (contiguous)
    if isinstance(stats, torch.Tensor):  # a backend that wrote them into one (n_stats, B, Hq, L) buffer
        return out.contiguous(), stats.contiguous(), extras.contiguous()
    if not stats:  # a normalizer without row statistics (sigmoid): torch.stack needs one tensor
        return out.contiguous(), q.new_empty((0,) + tuple(q.shape[:3]), dtype=_stats_dtype(q)), extras.contiguous()
    return out.contiguous(), torch.stack(list(stats)), extras.contiguous()


@attention_fwd.register_fake
def _(q, k, v, mask, seed, backend, normalizer, causal, scale, softcap, dropout_p, need_grad, head_params=None,
      sinks=None, deterministic=False):
    norm = parse(normalizer, head_params=head_params)
    B, Hq, L, _ = q.shape
    out = q.new_empty((B, Hq, L, v.shape[-1]), dtype=v.dtype)
    stats = q.new_empty((len(norm.stats), B, Hq, L), dtype=_stats_dtype(q))
    extras = q.new_empty(backend_module(backend).extras_shape(norm, q, k, v, need_grad), dtype=torch.float32)
    return out, stats, extras


@torch.library.custom_op("flashmaps::attention_bwd", mutates_args=())
def attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    stats: torch.Tensor, extras: torch.Tensor, mask: Optional[torch.Tensor], seed: torch.Tensor, backend: str,
    normalizer: str, causal: str, scale: float, softcap: Optional[float], dropout_p: float,
    head_params: Optional[torch.Tensor] = None, delta_shift: Optional[torch.Tensor] = None,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv) shaped like q, k, v. ``delta_shift``: None, or (B, Hq, L) from the statistics' gradients
    (``Normalizer.stat_delta``): the row term becomes ``delta - delta_shift``."""
    return _bwd_impl(dout, q, k, v, out, stats, extras, mask, seed, backend, normalizer, causal, scale, softcap,
                     dropout_p, head_params, delta_shift, deterministic)


def _bwd_impl(dout, q, k, v, out, stats, extras, mask, seed, backend, normalizer, causal, scale, softcap, dropout_p,
              head_params=None, delta_shift=None, deterministic=False):
    norm = parse(normalizer, head_params=head_params)
    dq, dk, dv = backend_module(backend).backward(
        dout, q, k, v, out, list(stats.unbind(0)), extras, norm,
        **_call_kwargs(mask, seed, causal, scale, softcap, dropout_p, norm.stochastic), delta_shift=delta_shift,
        deterministic=deterministic,
    )
    if backend == "triton":                 # its kernels apply the non-finite rule (kernels.backward)
        return _like(dq, q), _like(dk, k), _like(dv, v)
    if stats.numel():
        dq, dk, dv = _nonfinite_grads(dq, dk, dv, stats)
    elif len(stats) == 0 and out.numel():  # no row statistic (sigmoid): the forward's NaN output rows mark them
        dq, dk, dv = _nonfinite_grads(dq, dk, dv, out.sum(-1)[None])
    return _like(dq, q), _like(dk, k), _like(dv, v)


def _nonfinite_grads(dq, dk, dv, stats):
    """The non-finite rule in the backward: a row whose forward met a NaN or +inf score has NaN statistics;
    its dq row and its head's dk and dv become NaN, whatever the normalizer (a threshold's comparisons, or a
    guarded 1/Z, would otherwise drop the NaN). A few elementwise passes over q-, k- and v-sized tensors: the
    torch path's (the Triton backward's kernels flag the rows and heads themselves, `kernels.backward`)."""
    bad = stats.isnan().any(0)                                    # (B, Hq, L)
    nan = dq.new_full((), float("nan"))          # a fill on the device, no host copy (CUDA-graph capturable)
    dq = torch.where(bad[..., None], nan, dq)
    B, Hq = bad.shape[:2]
    head = bad.any(-1).view(B, dk.shape[1], Hq // dk.shape[1]).any(-1)[..., None, None]   # (B, Hkv, 1, 1)
    return dq, torch.where(head, nan.to(dk.dtype), dk), torch.where(head, nan.to(dv.dtype), dv)


def _like(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad`` with the dtype and strides of ``torch.empty_like(x)`` (what the fake op promises)."""
    if grad.dtype == x.dtype and x.is_contiguous() and grad.stride() == x.stride():
        return grad                 # empty_like of a contiguous x has its strides: no allocation to compare
    want = torch.empty_like(x)
    if grad.dtype == want.dtype and grad.stride() == want.stride():
        return grad
    return want.copy_(grad)


@attention_bwd.register_fake
def _(dout, q, k, v, out, stats, extras, mask, seed, backend, normalizer, causal, scale, softcap, dropout_p,
      head_params=None, delta_shift=None, deterministic=False):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, seed, backend, normalizer, causal, scale, softcap, dropout_p, _ = inputs[:12]
    head_params, sinks, deterministic = (*inputs[12:], None, None, False)[:3]   # (optional: defaults)
    out, stats, extras = output
    ctx.save_for_backward(q, k, v, out, stats, extras, mask, seed, head_params, sinks)
    ctx.args = (backend, normalizer, causal, scale, softcap, dropout_p)
    stat_grads = parse(normalizer, head_params=head_params).has_stat_grads     # (Normalizer.stat_delta)
    ctx.mark_non_differentiable(*((extras,) if stat_grads else (stats, extras)))   # (one call: it replaces)
    ctx.deterministic = bool(deterministic)


def _backward(ctx, dout, dstats, _daux, bwd=attention_bwd):
    q, k, v, out, stats, extras, mask, seed, head_params, sinks = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()    # a loss on the statistics only
    norm = parse(ctx.args[1], head_params=head_params)
    shift = None
    if dstats is not None and norm.has_stat_grads:
        shift = norm.stat_delta(list(stats.unbind(0)), list(dstats.to(stats.dtype).unbind(0))).contiguous()
    dq, dk, dv = bwd(dout, q, k, v, out, stats, extras, mask, seed, *ctx.args, head_params, shift, ctx.deterministic)
    dsinks = None
    if sinks is not None and ctx.needs_input_grad[13]:
        dsinks = _sink_grad(norm, dout, out, stats, sinks, shift)
    return (dq, dk, dv, None, None, None, None, None, None, None, None, None, None, dsinks,
            None)[:len(ctx.needs_input_grad)]


# ----------------------------------------------------------------------------------------------------
# attention sinks (gpt-oss): one logit per query head in the denominator, with a zero value vector


def _apply_sinks(norm, out, stats, sinks):
    """(out_sink, stats_sink) from the plain call's result: ``out_sink = w * out`` with the normalizer's
    ``sink_stats``. The saved (out_sink, stats_sink) make the backends' ordinary backward exact for the call
    with the sink (the sink is one more key with a zero value: recomputed weights from stats_sink, row term
    rowsum(dO * out_sink))."""
    res = norm.sink_stats(stats, sinks)
    if res is None:
        raise ValueError(f"sinks: attention sinks are not defined for the normalizer {norm.spec!r}")
    new_stats, w = res
    return (out * w[..., None].to(out.dtype)), new_stats


def _sink_grad(norm, dout, out, stats, sinks, shift=None):
    """dL/dsink_h = -sum_{b,i} c_bhi * rowsum(dO * out_sink)_bhi (``Normalizer.sink_coef``, from the saved
    statistics of the call with the sink); the row term less ``shift`` with gradients through the statistics
    (softmax: ``dlse_sink/dsink = c``)."""
    c = norm.sink_coef(list(stats.unbind(0)), sinks)
    delta = (dout.to(c.dtype) * out.to(c.dtype)).sum(-1)                            # (B, Hq, L)
    if shift is not None:
        delta = delta - shift.to(c.dtype)
    return (-(c * delta).sum((0, 2))).to(sinks.dtype)


torch.library.register_autograd("flashmaps::attention_fwd", _backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The same forward and backward as the custom ops, for eager calls: calling a custom op imports
    ``torch._dynamo`` (about 2 s and 140 MiB on the first call), which eager code does not need."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _fwd_impl(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.set_materialize_grads(False)          # no gradient of the statistics: no row-term shift
        return output

    @staticmethod
    def backward(ctx, dout, dstats, daux):
        return _backward(ctx, dout, dstats, daux, bwd=_bwd_impl)


def _plain(x) -> bool:
    return type(x) is torch.Tensor or type(x) is torch.nn.Parameter


def _forward_op(*inputs):
    """The custom op when compiling or tracing (fake or wrapped tensors), the eager Function otherwise. The
    normalizer (inputs[6]) is the parsed instance: the custom op takes its spec string, the eager Function the
    instance itself (its forward, context and backward do not parse the spec again)."""
    q, k, v = inputs[:3]
    if torch.compiler.is_compiling() or not (_plain(q) and _plain(k) and _plain(v)):
        return attention_fwd(*inputs[:6], inputs[6].spec, *inputs[7:])
    return _Eager.apply(*inputs)


def attention(
    backend: str, q, k, v, normalizer: Normalizer, *, mask, causal, scale, softcap, dropout_p, return_stats,
    seed: Optional[torch.Tensor] = None, sinks: Optional[torch.Tensor] = None, deterministic: bool = False,
):
    """The backend contract of :mod:`flashmaps.functional`, routed through the custom ops.

    ``seed``: an int64 scalar tensor fixing the dropout mask and a stochastic normalizer's score noise (drawn
    from torch's default generator if None).
    ``sinks``: None or (Hq,) attention-sink logits (``Normalizer.sink_stats``); the normalizer's per-head
    parameters (``Normalizer.head_params``) travel beside its spec string.
    ``deterministic``: the backward is bitwise reproducible (the Triton backend's two-kernel backward; False lets
    it add dQ with atomics, ``triton_path.launch_backward``).
    """
    if seed is None:
        if dropout_p > 0 or normalizer.stochastic:
            seed = torch.randint(0, 2**62, (), dtype=torch.int64)
        elif torch.compiler.is_compiling() or not _plain(q):   # (under a fake or traced mode: its own tensor)
            seed = torch.zeros((), dtype=torch.int64)
        else:
            seed = _ZERO_SEED        # (read-only: no op writes its inputs; one allocation less per call)
    need_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or
                                             (sinks is not None and sinks.requires_grad))
    if not need_grad and not torch.compiler.is_compiling() and _plain(q) and _plain(k) and _plain(v):
        # nothing to record for autograd: the forward itself, without the Function's per-call cost (issue 17)
        args = (q, k, v, mask, seed, backend, normalizer, causal or "", scale, softcap, dropout_p, False,
                normalizer.head_params(), sinks)
        if torch.is_grad_enabled():   # (as inside the Function)
            with torch.no_grad():
                out, stats, _ = _fwd_impl(*args)
        else:
            out, stats, _ = _fwd_impl(*args)
    else:
        out, stats, _ = _forward_op(
            q, k, v, mask, seed, backend, normalizer, causal or "", scale, softcap, dropout_p, need_grad,
            normalizer.head_params(), sinks, bool(deterministic),
        )
    if not return_stats:
        return out
    return out, dict(zip(normalizer.stats, stats.unbind(0)))
