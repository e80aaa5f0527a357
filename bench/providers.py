"""The benchmark providers: one registry of "things that compute attention", measured the same way.

A provider is a name, the normalizer it computes (so that its error can be checked against
``flashmaps.reference``), and a function ``fn(q, k, v, causal) -> out`` for q (B, Hq, L, Dqk),
k (B, Hkv, S, Dqk), v (B, Hkv, S, Dv) with ``causal`` in {None, "upper_left", "lower_right"}.

    flashmaps-<spec>-<backend>  flashmaps.attention(normalizer=<spec>, backend=<backend>): "torch" on every
                                device, "triton" on CUDA only (the CPU interpreter is far too slow to time)
    flashmaps-<spec>-<backend>-<form>  the same with form= "linear" or "quadratic" (taylor);
                                flashmaps-taylor-triton-linear is the Triton linear kernel, its FLOPs
                                counted by flops.linear_flops (the others: flops.attention_flops)
    sdpa, sdpa-<kernel>         torch's scaled_dot_product_attention, default dispatch or one kernel forced
                                with torch.nn.attention.sdpa_kernel (math on CPU; flash, efficient, cudnn,
                                math on CUDA)
    flex                        torch FlexAttention (compiled), CUDA only
    entmax15-dense              the ``entmax`` package's entmax15 over the materialized (B, Hq, L, S) scores
    fla-based                   flash-linear-attention's parallel Based kernel (the taylor map), if importable
    adasplash                   AdaSplash (1.5-entmax flash attention), if importable
    device-copy                 not attention: a copy of K and V, the bandwidth yardstick of decode rows

Options in brackets after a name, separated by ";", pin kernel configs and set variant knobs:

    flashmaps-softmax-triton[fwd=128,128,8,3]          the forward kernel's (BM, BN, num_warps, num_stages)
    flashmaps-entmax15-triton[bwd=64,64,4,2]           both backward kernels (or dkdv=... and dq=... apart)
    flashmaps-topk:64-triton[fwd=64,64,4,3;flashmaps.kernels.topk.COLLECT=True]
                                                       a knob: a dotted attribute path set to a Python
                                                       literal inside the worker for the duration of a case

Configs go to ``flashmaps.triton_path.launch_forward(..., config=)`` / ``launch_backward(..., config=)``
(flashmaps Triton providers only; a config of two numbers pins BM, BN alone); knobs work on any provider.
A suffix ``@<label>`` (``flashmaps-softmax-triton@base``) names the same provider run from another
checkout of the repository (``harness.add_baseline``); the label is only a name, the worker of that tree
runs it.

A provider that cannot run here (package missing, no CUDA) is *unavailable* with a reason; a case it
cannot do (a kernel that rejects fp32, a causal-only kernel asked for full attention) is *unsupported*.
Both are recorded as data points by the harness, never raised.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import math
import os
import re
from typing import Callable

import torch

from flashmaps.normalizers import parse

from .flops import linear_flops

__all__ = [
    "Provider",
    "default_normalizers",
    "BASELINE",
    "split_name",
    "options_text",
    "with_options",
    "providers_for",
    "get_provider",
    "flashmaps_provider",
]

#: the provider every "x SDPA" ratio is taken against
BASELINE = "sdpa"

Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "str | None"], torch.Tensor]
#: the pinned-config keys of a provider name, in the order they are written
CONFIG_KEYS = ("fwd", "dkdv", "dq")


def default_normalizers() -> tuple[str, ...]:
    """The normalizers benchmarked when none are named: the spec of one default instance of every
    registered normalizer (``flashmaps.normalizers.defaults()``), softmax first."""
    from flashmaps.normalizers import defaults  # imported here: a baseline tree's worker never needs it

    return tuple(n.spec for n in defaults())


@dataclasses.dataclass(frozen=True)
class Provider:
    """One benchmarked implementation.

    ``make(device)`` returns ``fn(q, k, v, causal) -> out`` (or raises: the provider is then unavailable);
    ``probe(device)`` returns None when the provider can run on ``device``, else the reason it cannot;
    ``limits(case)`` returns None when the provider supports the case, else why not.
    """

    name: str
    family: str  # "flashmaps" | "sdpa" | "flex" | "entmax" | "fla" | "adasplash"
    normalizer: str  # the map it computes, as a flashmaps normalizer spec
    make: Callable[[str], Fn]
    probe: Callable[[str], "str | None"]
    backend: str | None = None
    dense: bool = False  # materializes the (L, S) scores
    limits: Callable[[dict], "str | None"] = lambda case: None
    config: "dict | None" = None  # pinned kernel configs {"fwd"|"dkdv"|"dq": {"BM", "BN", ...}}
    knobs: dict = dataclasses.field(default_factory=dict)  # {"dotted.module.attr": value}, set in the worker
    time_order: int = 2  # how the time grows with L = S (2; 1 for a linear-time form): the harness's extrapolation
    flops: "Callable | None" = None  # its own FLOP count (flops.linear_flops); None: the nominal attention_flops

    def unavailable(self, device: str) -> str | None:
        """None if this provider can run on ``device`` ("cpu"/"cuda"), else the reason it cannot."""
        try:
            return self.probe(device)
        except Exception as exc:  # a probe must never take the harness down
            return f"{type(exc).__name__}: {exc}"

    def unsupported(self, case: dict) -> str | None:
        """None if this provider can run ``case`` (a job dict), else why not."""
        return self.limits(case)


# ----------------------------------------------------------------------------------------------------
# helpers


def _gqa(q, k) -> bool:
    return q.shape[1] != k.shape[1]


def _module_version(name: str) -> str | None:
    try:
        mod = importlib.import_module(name)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "installed"))


def _import_or_reason(name: str) -> str | None:
    try:
        importlib.import_module(name)
    except Exception as exc:
        return f"{name} not importable ({type(exc).__name__}: {exc})"[:200]
    return None


def _needs_cuda(device: str, what: str) -> str | None:
    if device != "cuda" or not torch.cuda.is_available():
        return f"{what} is benchmarked on CUDA only"
    return None


def _repeat_kv(q, k, v):
    """Dense baselines that do not understand GQA get repeated K/V (as a user of them would)."""
    if _gqa(q, k):
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # (B, Hq, S, D)
    return k, v


def _causal_allowed(L: int, S: int, causal, device) -> torch.Tensor:
    """(L, S) bool, True = may attend (ARCHITECTURE.md's two causal conventions)."""
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    return j <= i + (0 if causal == "upper_left" else S - L)


# ----------------------------------------------------------------------------------------------------
# flashmaps


def _interpreted() -> bool:
    """Triton on the CPU: only under TRITON_INTERPRET=1 and FLASHMAPS_BENCH_INTERPRET=1 (``gpucheck
    --cpu-smoke`` sets both in its workers: a check of the code paths, never a timing)."""
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("FLASHMAPS_BENCH_INTERPRET") == "1"


def flashmaps_provider(spec: str, backend: str, form: str | None = None) -> Provider:
    """``flashmaps-<spec>-<backend>``: flashmaps.attention with one normalizer on one backend (form "auto");
    ``flashmaps-<spec>-<backend>-<form>`` with ``form=`` "linear" or "quadratic" (normalizers with a linear
    form: the two forms side by side)."""
    norm = parse(spec)
    spec = norm.spec  # canonical ("TopK(64)" / "topk:64" -> "topk:64"); raises on a bad spec
    if form is not None and form not in norm.forms:
        raise ValueError(f"normalizer {spec!r} has no form {form!r} (its forms: {', '.join(norm.forms)})")

    def make(device):
        import flashmaps

        norm = flashmaps.parse(spec)

        def fn(q, k, v, causal):
            return flashmaps.attention(
                q, k, v, norm, causal=causal or False, enable_gqa=_gqa(q, k), backend=backend, form=form or "auto"
            )

        return fn

    def probe(device):
        if backend == "triton" and not (device == "cpu" and _interpreted()):
            reason = _needs_cuda(device, "the triton backend (on CPU only its interpreter runs)")
            if reason:
                return reason
        return _import_or_reason(f"flashmaps.{backend}_path")

    name = f"flashmaps-{spec}-{backend}" + (f"-{form}" if form else "")
    # the Triton linear kernel's rows count its own work (flops.linear_flops), every other the nominal one
    count = linear_flops if (form, backend) == ("linear", "triton") else None
    return Provider(name, "flashmaps", spec, make, probe, backend=backend, time_order=1 if form == "linear" else 2,
                    flops=count)


def _pinned_make(spec: str, config: dict):
    """make(device) of a flashmaps Triton provider with pinned configs: the launchers themselves
    (``launch_forward(config=)``, ``launch_backward(config=)``; a kernel without a config autotunes),
    wrapped in an autograd.Function so that every mode (fwd, bwd, fwd+bwd) times the same calls."""

    def make(device):
        import flashmaps
        from flashmaps import triton_path

        norm = flashmaps.parse(spec)
        fwd_cfg = config.get("fwd")
        bwd_cfg = {"dkdv": config.get("dkdv"), "dq": config.get("dq")}

        # the backend contract's forward/backward (positional results: the same in older trees, so that
        # baseline-tree twins run these too)
        kw = dict(mask=None, scale=None, softcap=None, dropout_p=0.0, seed=0)

        class Pinned(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v, causal):
                need = any(ctx.needs_input_grad[:3])
                out, stats, extras = triton_path.forward(q, k, v, norm, causal=causal, need_grad=need,
                                                         config=fwd_cfg, **kw)
                if need:
                    ctx.causal, ctx.stats, ctx.extras = causal, stats, extras
                    ctx.save_for_backward(q, k, v, out)
                return out

            @staticmethod
            def backward(ctx, dout):
                q, k, v, out = ctx.saved_tensors
                dq, dk, dv = triton_path.backward(dout, q, k, v, out, ctx.stats, ctx.extras, norm,
                                                  causal=ctx.causal, config=bwd_cfg, **kw)
                return dq, dk, dv, None

        def fn(q, k, v, causal):
            return Pinned.apply(q, k, v, causal)

        return fn

    return make


def _parse_config(key: str, text: str) -> dict:
    """"128,64,8,3" -> {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 3} ("16,16": BM and BN only)."""
    try:
        nums = [int(x) for x in text.split(",")]
    except ValueError:
        nums = []
    if len(nums) not in (2, 4) or min(nums) < 1:
        raise ValueError(f"config {key}={text!r}: write BM,BN,num_warps,num_stages (or BM,BN), e.g. {key}=128,64,8,3")
    return dict(zip(("BM", "BN", "num_warps", "num_stages"), nums))


def _config_text(cfg: dict) -> str:
    return ",".join(str(cfg[k]) for k in ("BM", "BN", "num_warps", "num_stages") if k in cfg)


_KNOB_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


def _knob_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string


def _knob_text(value) -> str:
    """A knob value as written in a name: a word as it is, anything else as a Python literal."""
    if isinstance(value, str) and _knob_value(value) == value and re.fullmatch(r"[\w.:/+-]+", value):
        return value
    return repr(value)


def options_text(config: dict | None, knobs: dict | None = None) -> str:
    """The canonical "[...]" of a provider name ("" without options)."""
    config = config or {}
    parts = []
    if "fwd" in config:
        parts.append(f"fwd={_config_text(config['fwd'])}")
    if config.get("dkdv") is not None and config.get("dkdv") == config.get("dq"):
        parts.append(f"bwd={_config_text(config['dkdv'])}")
    else:
        parts += [f"{k}={_config_text(config[k])}" for k in ("dkdv", "dq") if k in config]
    parts += [f"{path}={_knob_text(value)}" for path, value in sorted((knobs or {}).items())]
    return f"[{';'.join(parts)}]" if parts else ""


def split_name(name: str) -> tuple[str, dict, dict, str | None]:
    """"base[opts]@tree" -> (base, config, knobs, tree label or None); raises ValueError on bad options."""
    m = re.fullmatch(r"([^\[\]@]+)(?:\[([^\]]*)\])?(?:@([\w.-]+))?", name.strip())
    if not m:
        raise ValueError(f"malformed provider name {name!r}; write e.g. flashmaps-softmax-triton[fwd=128,64,8,3]")
    base, opts, tree = m.group(1), m.group(2), m.group(3)
    config, knobs = {}, {}
    for item in (opts or "").split(";"):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise ValueError(f"provider option {item!r} in {name!r}: write key=value")
        if key in CONFIG_KEYS:
            config[key] = _parse_config(key, value)
        elif key == "bwd":
            config["dkdv"] = config["dq"] = _parse_config(key, value)
        elif _KNOB_PATH.match(key):
            knobs[key] = _knob_value(value)
        else:
            raise ValueError(f"provider option {key!r} in {name!r}: expected fwd=, bwd=, dkdv=, dq= or a knob "
                             "as a dotted attribute path (module.attr=value)")
    return base, config, knobs, tree


def with_options(prov: Provider, config: dict | None = None, knobs: dict | None = None,
                 tree: str | None = None) -> Provider:
    """``prov`` with pinned configs (flashmaps Triton providers only), knobs and a tree label added to
    those it has, renamed "<name>[<options>]@<tree>"."""
    base, _, _, old_tree = split_name(prov.name)
    config = {k: dict(v) for k, v in {**(prov.config or {}), **(config or {})}.items() if v is not None}
    knobs = {**prov.knobs, **(knobs or {})}
    tree = tree or old_tree
    bad = set(config) - set(CONFIG_KEYS)
    if bad:
        raise ValueError(f"unknown config keys {sorted(bad)}; use {', '.join(CONFIG_KEYS)}")
    for path in knobs:
        if not _KNOB_PATH.match(path):
            raise ValueError(f"knob {path!r}: expected a dotted attribute path such as flashmaps.kernels.topk.COLLECT")
    make = prov.make
    if config:
        if prov.family != "flashmaps" or prov.backend != "triton":
            raise ValueError(f"{prov.name}: pinned configs are for flashmaps-<normalizer>-triton providers")
        make = _pinned_make(prov.normalizer, config)
    name = base + options_text(config, knobs) + (f"@{tree}" if tree else "")
    return dataclasses.replace(prov, name=name, make=make, config=config or None, knobs=knobs)


# ----------------------------------------------------------------------------------------------------
# torch SDPA


_SDPA_KERNELS = {  # provider suffix -> SDPBackend member name
    "math": "MATH",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
}


def _sdpa_provider(kernel: str | None) -> Provider:
    def make(device):
        import contextlib

        import torch.nn.functional as F
        from torch.nn.attention.bias import causal_lower_right

        if kernel is None:
            ctx = contextlib.nullcontext
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backend = getattr(SDPBackend, _SDPA_KERNELS[kernel])

            def ctx():
                return sdpa_kernel(backend)

        def fn(q, k, v, causal):
            kw = {"enable_gqa": True} if _gqa(q, k) else {}
            with ctx():
                if causal == "lower_right" and q.shape[2] != k.shape[2]:
                    bias = causal_lower_right(q.shape[2], k.shape[2])
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, **kw)
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal is not None, **kw)

        return fn

    def probe(device):
        if kernel in ("flash", "efficient", "cudnn"):
            return _needs_cuda(device, f"the SDPA {kernel} kernel")
        if kernel is not None:
            from torch.nn.attention import SDPBackend  # noqa: F401  (torch >= 2.3)
        return None

    name = "sdpa" if kernel is None else f"sdpa-{kernel}"
    return Provider(name, "sdpa", "softmax", make, probe, backend=kernel or "default", dense=kernel == "math")


# ----------------------------------------------------------------------------------------------------
# FlexAttention (CUDA)


#: torch._dynamo's recompile limits are raised to this for FlexAttention (see _flex_provider)
FLEX_RECOMPILE_LIMIT = 256


def raise_recompile_limit(limit: int = FLEX_RECOMPILE_LIMIT) -> None:
    """Raise torch._dynamo's per-function recompile limit (``recompile_limit``, formerly
    ``cache_size_limit``) to at least ``limit``, and the accumulated limit with it."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), limit))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 16 * limit))


def _flex_provider() -> Provider:
    def make(device):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        # flex_attention compiles once per (head dim, causal, length, ...): past dynamo's default limit of
        # 8 recompiles it silently ran uncompiled, with dense scores (18-73 ms at D=64 causal, then out of
        # memory at 16k on the H100), so one worker timing many cases needs a higher limit
        raise_recompile_limit()
        compiled = torch.compile(flex_attention, dynamic=False)
        masks: dict = {}

        def fn(q, k, v, causal):
            L, S = q.shape[2], k.shape[2]
            block_mask = None
            if causal is not None:
                key = (L, S, causal, q.device)
                if key not in masks:
                    off = 0 if causal == "upper_left" else S - L

                    def mask_mod(b, h, i, j):
                        return j <= i + off

                    masks[key] = create_block_mask(mask_mod, None, None, L, S, device=q.device)
                block_mask = masks[key]
            return compiled(q, k, v, block_mask=block_mask, enable_gqa=_gqa(q, k))

        return fn

    def probe(device):
        return _needs_cuda(device, "FlexAttention") or _import_or_reason("torch.nn.attention.flex_attention")

    return Provider("flex", "flex", "softmax", make, probe, backend="compiled")


# ----------------------------------------------------------------------------------------------------
# entmax package over materialized scores


def _entmax_dense_provider() -> Provider:
    def make(device):
        from entmax import entmax15

        def fn(q, k, v, causal):
            k, v = _repeat_kv(q, k, v)
            scale = 1.0 / math.sqrt(q.shape[-1])
            s = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # (B, Hq, L, S), fp32 as flashmaps accumulates
            if causal is not None:
                s = s.masked_fill(~_causal_allowed(q.shape[2], k.shape[2], causal, q.device), float("-inf"))
            p = entmax15(s, dim=-1)  # (B, Hq, L, S)
            return torch.matmul(p.to(v.dtype), v)  # (B, Hq, L, Dv)

        return fn

    def probe(device):
        return _import_or_reason("entmax")

    return Provider("entmax15-dense", "entmax", "entmax15", make, probe, backend="dense", dense=True)


def _copy_provider() -> Provider:
    """Not attention: a device copy of K and V (into buffers made at the first call), the memory-bandwidth
    yardstick of the decode rows (its GB/s counts the bytes read and written)."""
    def make(device):
        bufs = {}

        def fn(q, k, v, causal):
            if "k" not in bufs:
                bufs["k"], bufs["v"] = torch.empty_like(k), torch.empty_like(v)
            bufs["k"].copy_(k)
            bufs["v"].copy_(v)
            return bufs["v"]

        return fn

    return Provider("device-copy", "copy", "softmax", make, lambda device: None, backend="copy")


# ----------------------------------------------------------------------------------------------------
# optional third-party kernels (when importable)


def _fla_based_provider() -> Provider:
    def make(device):
        from fla.ops.based import parallel_based

        params = inspect.signature(parallel_based).parameters
        kw = {"head_first": True} if "head_first" in params else {}

        def fn(q, k, v, causal):
            # Based's parallel kernel: causal (upper_left, L == S), f(s) = 1 + s + s^2/2 normalized by Z
            return parallel_based(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), use_norm=True, **kw)

        return fn

    def probe(device):
        return _needs_cuda(device, "flash-linear-attention") or _import_or_reason("fla.ops.based")

    def limits(case):
        if case.get("causal") != "upper_left" or case["L"] != case["S"]:
            return "fla parallel_based is causal-only with L == S"
        if case["Hq"] != case["Hkv"]:
            return "fla parallel_based has no GQA"
        if case["Dqk"] > 128:
            return "fla parallel_based supports feature dims up to 128"
        return None

    return Provider("fla-based", "fla", "taylor", make, probe, backend="triton", limits=limits)


def _adasplash_provider() -> Provider:
    def make(device):
        from adasplash import adasplash

        def fn(q, k, v, causal):
            return adasplash(q, k, v, alpha=1.5, is_causal=causal is not None)

        return fn

    def probe(device):
        return _needs_cuda(device, "AdaSplash") or _import_or_reason("adasplash")

    def limits(case):
        if case.get("causal") == "lower_right" and case["L"] != case["S"]:
            return "adasplash has no lower-right causal mask"
        return None

    return Provider("adasplash", "adasplash", "entmax15", make, probe, backend="triton", limits=limits)


# ----------------------------------------------------------------------------------------------------
# the registry


def providers_for(device: str, normalizers=None, *, baselines: bool = True) -> list[Provider]:
    """Every provider that belongs in a benchmark on ``device`` ("cpu" or "cuda"), available or not;
    ``normalizers`` defaults to :func:`default_normalizers`.

    flashmaps: one provider per normalizer and backend (torch everywhere, triton on CUDA only), and for a
    normalizer with a linear form (taylor) one per form on the torch backend (``-linear``, ``-quadratic``)
    and, on CUDA, the Triton linear kernel (``flashmaps-taylor-triton-linear``, FLOPs by flops.linear_flops);
    baselines: SDPA (default dispatch and each kernel of the device), FlexAttention (CUDA), the dense
    entmax package, flash-linear-attention's Based and AdaSplash (reported unavailable when missing).
    """
    backends = ("triton", "torch") if device == "cuda" else ("torch",)
    normalizers = default_normalizers() if normalizers is None else normalizers
    out = [flashmaps_provider(spec, b) for b in backends for spec in normalizers]
    out += [flashmaps_provider(spec, "torch", form) for spec in normalizers if "linear" in parse(spec).forms
            for form in parse(spec).forms]
    if device == "cuda":  # the Triton linear kernel (the quadratic one is flashmaps-<spec>-triton above)
        out += [flashmaps_provider(spec, "triton", "linear") for spec in normalizers if "linear" in parse(spec).forms]
    if not baselines:
        return out
    kernels = ("flash", "efficient", "cudnn", "math") if device == "cuda" else ("math",)
    out.append(_sdpa_provider(None))
    out += [_sdpa_provider(kern) for kern in kernels]
    if device == "cuda":
        out.append(_flex_provider())
    out += [_entmax_dense_provider(), _fla_based_provider(), _adasplash_provider()]
    return out


_FIXED = {
    "sdpa": lambda: _sdpa_provider(None),
    **{f"sdpa-{kern}": (lambda kern=kern: _sdpa_provider(kern)) for kern in _SDPA_KERNELS},
    "flex": _flex_provider,
    "entmax15-dense": _entmax_dense_provider,
    "fla-based": _fla_based_provider,
    "adasplash": _adasplash_provider,
    "device-copy": _copy_provider,
}


def _base_provider(name: str) -> Provider:
    if name in _FIXED:
        return _FIXED[name]()
    if name.startswith("flashmaps-"):
        rest, form = name[len("flashmaps-"):], None
        if rest.rpartition("-")[2] in ("linear", "quadratic"):
            rest, _, form = rest.rpartition("-")
        spec, sep, backend = rest.rpartition("-")
        if sep and backend in ("torch", "triton"):
            return flashmaps_provider(spec, backend, form)
    known = ", ".join(sorted(_FIXED))
    raise ValueError(f"unknown provider {name!r}; known: flashmaps-<normalizer>-<torch|triton>[-<form>], {known} "
                     "(options in brackets: [fwd=BM,BN,warps,stages;bwd=...;module.attr=value])")


def get_provider(name: str) -> Provider:
    """The provider called ``name`` ("flashmaps-topk:64-torch", "sdpa-math", "entmax15-dense",
    "flashmaps-softmax-triton[fwd=128,64,8,3]", "flashmaps-softmax-triton@base", ...)."""
    base, config, knobs, tree = split_name(name)
    prov = _base_provider(base)
    return with_options(prov, config, knobs, tree) if (config or knobs or tree) else prov


def optional_versions() -> dict[str, str | None]:
    """Versions of the optional baseline packages (None when not importable)."""
    return {name: _module_version(name) for name in ("entmax", "fla", "adasplash")}
