"""Hugging Face transformers integration: run any model's attention through flashmaps.

    from flashmaps.integrations.transformers import register

    register()   # "fmaps_<name>" for every registered normalizer: fmaps_softmax, fmaps_entmax15, ...
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fmaps_entmax15")
    model.config.fmaps_topk_k = 32            # option k of "fmaps_topk" (default 64), read at every call
    model.set_attn_implementation("fmaps_topk")
    register("fmaps_top8", "topk:8")          # any other normalizer under a name of your choice

Nothing is patched: each name is registered in transformers' ``AttentionInterface`` (the attention
function below) and in its ``AttentionMaskInterface`` (transformers' own ``sdpa_mask``, wrapped: a bool
``(B, 1, L, S)`` mask, True = may attend, or ``None`` where a plain causal mask suffices). Without the mask
function a custom name would silently get no mask at all (no padding, no causality, no sliding window).

It works for every model that routes its attention through ``AttentionInterface`` (the model class has
``_supports_attention_backend = True``: Llama, Mistral, Qwen2, Gemma 2, BERT from transformers 5, ...),
transformers >= 4.53. Names must not contain "flash": transformers 5.x sends those to its hub-kernel
loader.

The attention function follows transformers' calling convention and the rules of its own
``sdpa_attention_forward``:

* query (B, Hq, L, D), key/value (B, Hkv, S, D) -> out (B, L, Hq, Dv) contiguous, and ``None`` weights.
  Grouped-query attention is native (no ``repeat_kv``: query head h reads kv head h // (Hq // Hkv)).
* causality: ``is_causal`` (or ``module.is_causal``, default True) is used only when no mask is given
  and L > 1. A single query token (KV-cache decoding) attends to every key. When L < S without a mask
  (prefill into an empty static cache: the mask function skipped the mask because the cache is empty),
  the keys beyond the first L are empty slots, so K/V are cropped to L and the mask is upper-left causal,
  exactly what SDPA's ``is_causal`` computes there. With a mask, the mask alone decides.
* ``sliding_window`` runs as flashmaps' native window (``attention(window=)``: tiles outside it are never
  computed), as transformers' mask functions define it (causal: a query at position t sees keys
  t - sliding_window < j <= t; bidirectional: |t - j| <= sliding_window). The registered mask function
  (:func:`sliding_mask`, transformers' ``sdpa_mask`` plus a check) recognises a sliding layer's mask that
  is plain causal-window, with the queries at the last L key positions (``q_offset + L == kv_offset + S``),
  and no other pattern; the attention function then runs the native lower-right causal window and drops
  the mask when the batch has no padding, or keeps the mask beside the window (the mask for the padding,
  the window to skip tiles) when it has. Any other mask (a static cache whose queries do not sit at the
  last positions, custom or packed patterns, a mask the model sliced) is applied as given: exact, no tile
  skipped. With no mask at all the ``sliding_window`` argument is applied natively the same way.
* packed batches (``DataCollatorWithFlattening``: batch 1 with the ``cu_seq_lens_q/k`` and
  ``max_length_q/k`` kwargs) run through :func:`flashmaps.attention_varlen`, each sequence on its own keys
  (causal within it), without the block-diagonal mask.
* ``softcap`` (Gemma 2): ``s = softcap * tanh(scaling * q.k / softcap)`` before the mask.
* ``position_bias`` (T5 family): added to the scores, combined with the mask as SDPA's path does.
* ``dropout`` applies only while ``module.training`` is True.
* attention sinks (gpt-oss): the ``s_aux`` kwarg (or ``module.sinks``), one logit per query head in the
  denominator (``flashmaps.sinks``; softmax and topk, other normalizers refuse them).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
import weakref

import torch

from ..functional import attention
from ..normalizers import Normalizer, parse, registry

__all__ = ["register", "attention_forward", "names", "config_attr", "sliding_mask", "TOPK_CONFIG_ATTR",
           "TOPK_DEFAULT_K"]



class _MaskNotes:
    """Masks from :func:`sliding_mask` known to be plain causal-window with the queries at the last key
    positions: mask -> (sliding_window, whether the batch has no padding). Keyed by identity (tensors have no
    usable equality) with a weak reference: a freed mask leaves by itself, a new tensor at its address does
    not inherit its note."""

    def __init__(self):
        self._notes: dict[int, tuple] = {}

    def __setitem__(self, mask: torch.Tensor, note: tuple) -> None:
        key = id(mask)
        self._notes[key] = (weakref.ref(mask), note)
        weakref.finalize(mask, self._notes.pop, key, None)

    def get(self, mask) -> "tuple | None":
        entry = self._notes.get(id(mask))
        return entry[1] if entry is not None and entry[0]() is mask else None


_NATIVE_WINDOW = _MaskNotes()

#: the model-config attribute that sets k for "fmaps_topk" (``config_attr("topk", "k")``)
TOPK_CONFIG_ATTR = "fmaps_topk_k"
#: k for "fmaps_topk" when the config has no ``fmaps_topk_k`` (``TopK.default()``)
TOPK_DEFAULT_K = 64

_MIN_TRANSFORMERS = "4.53"
# transformers gives these names (or substrings) a meaning of its own: refuse them
_RESERVED = ("eager", "sdpa", "flex_attention", "paged")


# ----------------------------------------------------------------------------------------------------
# the attention function


def names() -> list[str]:
    """The names ``register()`` adds: ``fmaps_<name>`` for every registered normalizer."""
    return [f"fmaps_{name}" for name in registry()]


def config_attr(name: str, option: str) -> str:
    """The model-config attribute that sets an option of ``fmaps_<name>`` (``fmaps_topk_k``)."""
    return f"fmaps_{name}_{option}"


class _FromConfig:
    """The normalizer of ``fmaps_<name>``: the class's default instance, each option overridden by the
    model config attribute ``fmaps_<name>_<option>`` when present (read at every call)."""

    def __init__(self, cls: type[Normalizer]):
        self.cls = cls
        self.options = [f.name for f in dataclasses.fields(cls)]

    def __eq__(self, other):
        return isinstance(other, _FromConfig) and other.cls is self.cls

    def __hash__(self):
        return hash(self.cls)

    def __call__(self, module) -> Normalizer:
        config = getattr(module, "config", None)
        overrides = tuple((o, getattr(config, config_attr(self.cls.name, o))) for o in self.options
                          if getattr(config, config_attr(self.cls.name, o), None) is not None)
        return _instance(self.cls, overrides)


@functools.lru_cache(maxsize=256)
def _instance(cls, overrides: tuple) -> Normalizer:
    try:
        return dataclasses.replace(cls.default(), **dict(overrides))
    except (TypeError, ValueError) as err:
        what = ", ".join(f"config.{config_attr(cls.name, o)} = {v!r}" for o, v in overrides)
        raise ValueError(f"{what} is not valid for fmaps_{cls.name}: {err}") from None


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    *,
    normalizer: str | Normalizer = "softmax",
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function convention, computed by :func:`flashmaps.attention`.

    Args:
        module: the calling attention layer (read for ``training``, ``is_causal`` and ``config``).
        query: (B, Hq, L, D). key: (B, Hkv, S, D). value: (B, Hkv, S, Dv), Hq a multiple of Hkv.
        attention_mask: None, or bool (True = may attend) / float (added; <= finfo.min excludes)
            broadcastable to (B, Hq, L, S); a longer last dim is cut to S.
        dropout: dropout probability on the normalized weights, applied only if ``module.training``.
        scaling: score scale (default 1/sqrt(D)). softcap: Gemma 2's attention logit cap.
        sliding_window: applied here only when there is no mask (see the module docstring).
        is_causal: overrides ``module.is_causal``; used only when there is no mask and L > 1.
        normalizer: the normalizer (a Normalizer, a spec string, or a callable ``module -> Normalizer``).
        kwargs: ``position_bias`` (float, broadcastable to (B, Hq, L, S)) and ``s_aux`` (gpt-oss's attention
            sinks, (Hq,); or ``module.sinks``: ``flashmaps.sinks``, softmax and topk) are supported; other model
            kwargs are ignored, as in transformers' SDPA path.

    Returns:
        (out (B, L, Hq, Dv) contiguous, None).
    """
    sinks = kwargs.get("s_aux")                  # gpt-oss: the layer's learned per-head sink logits
    if sinks is None and isinstance(getattr(module, "sinks", None), torch.Tensor):
        sinks = module.sinks
    if kwargs.get("head_mask") is not None:
        raise NotImplementedError("flashmaps does not support head_mask; use attn_implementation='eager'")
    if kwargs.get("cache") is not None:
        raise NotImplementedError(
            "flashmaps does not support transformers' paged cache (continuous batching) yet; "
            "use generate() or attn_implementation='sdpa'"
        )
    if kwargs.get("output_attentions", False):
        warnings.warn(
            "flashmaps attention does not materialize the attention weights (output_attentions=True gives None); "
            "use attn_implementation='eager' to get them",
            stacklevel=2,
        )
    norm = normalizer(module) if callable(normalizer) and not isinstance(normalizer, Normalizer) else normalizer
    L, S = query.shape[2], key.shape[2]
    native = _NATIVE_WINDOW.get(attention_mask) if isinstance(attention_mask, torch.Tensor) else None
    if native is not None and attention_mask.shape[-1] != S:
        native = None
    mask = attention_mask
    if mask is not None and mask.shape[-1] > S:
        mask = mask[..., :S]  # static caches may hand a longer mask
    position_bias = kwargs.get("position_bias")

    # the is_causal rule of transformers' sdpa_attention_forward
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if native is not None:
        # a `sliding_mask` mask: plain causal window, queries at the last key positions. The native lower-right
        # causal window, with the mask only for the padding
        sw, no_padding = native
        mask = None if no_padding else mask
        causal_kind = "lower_right" if L > 1 else False
        window = (sw - 1, 0) if S > sw else None
    else:
        causal = bool(is_causal) and L > 1 and mask is None
        if causal and S > L:
            # no mask and more keys than queries: prefill into an empty static cache, keys L.. are empty slots
            key, value = key[:, :, :L], value[:, :, :L]  # (B, Hkv, L, D)
            if position_bias is not None:
                position_bias = position_bias[..., :L]
            S = L
        causal_kind = "upper_left" if causal else False
        window = None
        if mask is None and sliding_window is not None and S > sliding_window:
            # transformers' windows (causal: t - w < j <= t; bidirectional: |t - j| <= w), queries at the last L
            # key positions: flashmaps' native window (lower-right), whole tiles outside it never computed
            sw = int(sliding_window)
            window = (sw - 1, 0) if is_causal else (sw, sw)
    if position_bias is not None:
        if mask is None:
            mask = position_bias
        elif mask.dtype == torch.bool:
            mask = torch.where(mask, position_bias, float("-inf"))
        else:  # keep excluded keys excluded: finfo.min + bias would be a finite (huge negative) score
            excluded = mask <= torch.finfo(mask.dtype).min
            mask = (position_bias + mask).masked_fill(excluded, float("-inf"))

    training = getattr(module, "training", False)
    packed = _packed_lengths(kwargs, query, key, position_bias)
    if packed is not None:
        return _packed_forward(query, key, value, norm, packed, bool(is_causal), scaling, softcap, window,
                               float(dropout) if training else 0.0), None
    out = attention(
        query, key, value, norm,
        causal=causal_kind,
        attn_mask=mask,
        scale=scaling,
        softcap=softcap,
        enable_gqa=query.shape[1] != key.shape[1],
        dropout_p=float(dropout) if training else 0.0,
        window=window,
        **({} if sinks is None else {"sinks": sinks}),
    )  # (B, Hq, L, Dv)
    return out.transpose(1, 2).contiguous(), None  # (B, L, Hq, Dv)


def sliding_mask(*args, **kwargs):
    """The mask function registered with every name: transformers' ``sdpa_mask(**kwargs)``, and when it is a
    sliding layer's plain causal-window mask with the queries at the last key positions (checked from the
    arguments alone: ``local_size`` given, ``allow_is_causal_skip`` (transformers clears it for any extra
    pattern), ``q_offset + q_length == kv_offset + kv_length``, and ``mask_function`` probed on a few
    positions), the mask is remembered so that the attention function runs the native window instead
    (module docstring). The padding check reads the 2-D padding mask once per call (transformers' own skip
    test does the same); nothing is remembered while compiling or with transformers < 5 (no ``q_offset``)."""
    from transformers.masking_utils import sdpa_mask      # (registration checked the version)

    out = sdpa_mask(*args, **kwargs)
    if isinstance(out, torch.Tensor) and out.dtype == torch.bool:
        try:
            named = _signature(sdpa_mask).bind(*args, **kwargs).arguments
        except TypeError:
            return out
        named.update(named.pop("kwargs", {}))
        native = _plain_causal_window(**named)
        if native is not None:
            _NATIVE_WINDOW[out] = native
    return out


@functools.cache
def _signature(fn):
    return inspect.signature(fn)


def _plain_causal_window(*, q_length=None, kv_length=None, q_offset=None, kv_offset=0, mask_function=None,
                         attention_mask=None, local_size=None, allow_is_causal_skip=True, **_):
    """(local_size, no_padding) when sdpa_mask's arguments describe a plain causal window with the queries
    at the last key positions, else None."""
    ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (q_length, kv_length, q_offset, kv_offset))
    if (local_size is None or not allow_is_causal_skip or not ints or mask_function is None
            or q_offset + q_length != kv_offset + kv_length or torch.compiler.is_compiling()):
        return None
    w = int(local_size)
    t = torch.tensor([0, 1, w - 1, w, 2 * w + 1, 3 * w + 5])[:, None]       # query positions
    j = torch.arange(0, 3 * w + 8)[None, :]                                  # key positions
    try:
        got = torch.as_tensor(mask_function(torch.tensor(0), torch.tensor(0), t, j)).expand(t.shape[0], j.shape[1])
    except Exception:          # a mask function that is not index-arithmetic: leave the mask as it is
        return None
    if not torch.equal(got.bool(), (j <= t) & (j > t - w)):
        return None
    if attention_mask is None:
        return w, True
    pad = attention_mask
    if pad.dim() != 2:
        return None
    if pad.shape[-1] > kv_length:
        pad = pad[:, kv_offset:kv_offset + kv_length]
    return w, bool(pad.all())


def _packed_lengths(kwargs, query, key, position_bias):
    """(cu_q, cu_k, max_q, max_k) of a packed batch (transformers' ``DataCollatorWithFlattening`` hands the
    ``cu_seq_lens_q/k`` and ``max_length_q/k`` kwargs; batch 1, sequences back to back), else None."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None or query.shape[0] != 1 or position_bias is not None:
        return None
    if int(cu_q[-1]) != query.shape[2] or int(cu_k[-1]) != key.shape[2]:
        return None                       # lengths of another layout (e.g. a cache): the mask decides
    lens_q, lens_k = (cu_q[1:] - cu_q[:-1]).tolist(), (cu_k[1:] - cu_k[:-1]).tolist()
    return cu_q, cu_k, int(kwargs.get("max_length_q") or max(lens_q)), int(kwargs.get("max_length_k") or max(lens_k))


def _packed_forward(query, key, value, norm, packed, causal, scaling, softcap, window, dropout_p):
    """Packed sequences through :func:`flashmaps.attention_varlen` (causal within each sequence, no mask):
    (1, Hq, T, D) -> (1, T, Hq, Dv)."""
    from ..inference import attention_varlen

    cu_q, cu_k, max_q, max_k = packed
    out = attention_varlen(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu_q, cu_k,
                           max_q, max_k, norm, causal="lower_right" if causal else False, window=window, scale=scaling, softcap=softcap,
                           dropout_p=dropout_p)                                   # (T, Hq, Dv)
    return out.unsqueeze(0).contiguous()


# ----------------------------------------------------------------------------------------------------
# registration


def _check_name(name) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"register: the name must be a non-empty string, got {name!r}")
    low = name.lower()
    if "flash" in low:
        raise ValueError(
            f"register: {name!r} contains 'flash'; transformers 5.x sends every attention name containing "
            "'flash' to its flash-attention / hub-kernel loader. Pick another name, e.g. 'fmaps_...'"
        )
    if any(c in name for c in "/:|@") or any(c.isspace() for c in name):
        raise ValueError(
            f"register: {name!r} contains '/', ':', '|', '@' or whitespace, which transformers reads as a hub "
            "kernel repo or an implementation prefix; use letters, digits and '_', e.g. 'fmaps_mine'"
        )
    if any(r in low for r in _RESERVED):
        raise ValueError(
            f"register: {name!r} contains one of {', '.join(map(repr, _RESERVED))}, names transformers "
            "treats specially; use e.g. 'fmaps_mine'"
        )
    return name


def _check_normalizer(normalizer) -> Normalizer:
    try:
        return parse(normalizer)
    except (TypeError, ValueError) as err:
        raise ValueError(f"register: invalid normalizer: {err}") from None


def _interfaces():
    """(AttentionInterface, AttentionMaskInterface, sdpa_mask) of the installed transformers."""
    try:
        import transformers
    except ImportError:
        raise ImportError(
            "flashmaps.integrations.transformers needs Hugging Face transformers >= "
            f"{_MIN_TRANSFORMERS}: pip install 'flashmaps[hf]'"
        ) from None
    from packaging.version import Version

    if Version(transformers.__version__).release < Version(_MIN_TRANSFORMERS).release:
        raise ImportError(
            f"flashmaps.integrations.transformers needs transformers >= {_MIN_TRANSFORMERS} (AttentionInterface "
            f"and AttentionMaskInterface), found {transformers.__version__}; pip install -U transformers"
        )
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    return AttentionInterface, AttentionMaskInterface, sdpa_mask


def _named_forward(name: str, normalizer):
    """The attention function registered under ``name``: :func:`attention_forward` with ``normalizer``."""

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                softcap=None, is_causal=None, **kwargs):
        return attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            sliding_window=sliding_window, softcap=softcap, is_causal=is_causal, normalizer=normalizer, **kwargs,
        )

    forward.__name__ = forward.__qualname__ = f"{name}_attention_forward"
    forward.__doc__ = f"flashmaps attention registered as {name!r} (see attention_forward)."
    forward.normalizer = normalizer
    return forward


def register(name: str | None = None, normalizer: str | Normalizer | None = None) -> list[str]:
    """Register flashmaps attention in transformers under ``name``.

    ``register()`` adds ``fmaps_<name>`` for every registered normalizer (:func:`names`): its default
    instance, each option read at every call from the model config attribute ``fmaps_<name>_<option>``
    when present (``fmaps_topk_k``: k of ``fmaps_topk``, default 64). ``register(name, normalizer)`` adds
    one more name for any normalizer (``"topk:8"``, ``TopK(8)``, ...). Registering a name again is harmless
    (the latest normalizer wins).

    Each name goes into ``AttentionInterface`` (the attention function) and ``AttentionMaskInterface``
    (:func:`sliding_mask`: transformers' ``sdpa_mask``, plus the native-window check), after which
    ``from_pretrained(..., attn_implementation=name)`` and
    ``model.set_attn_implementation(name)`` work.

    Raises:
        ValueError: the name contains "flash" (or another name transformers reserves), or the normalizer
            is invalid. ImportError: transformers is missing or older than 4.53.

    Returns:
        the registered names.
    """
    if name is None:
        if normalizer is not None:
            raise ValueError("register(name, normalizer): give a name for the normalizer, e.g. 'fmaps_mine'")
        todo = {f"fmaps_{n}": _FromConfig(cls) if dataclasses.fields(cls) else cls.default()
                for n, cls in registry().items()}
    else:
        if normalizer is None:
            raise ValueError(
                f"register({name!r}): give a normalizer too, e.g. register({name!r}, 'topk:8'); "
                "register() with no arguments adds the built-in fmaps_* names"
            )
        todo = {_check_name(name): _check_normalizer(normalizer)}
    attn_interface, mask_interface, sdpa_mask = _interfaces()
    for n, norm in todo.items():
        attn_interface.register(n, _named_forward(n, norm))
        mask_interface.register(n, sliding_mask)
    return list(todo)

