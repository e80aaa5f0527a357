"""flashmaps: blockwise attention with pluggable normalizers.

    import flashmaps
    out = flashmaps.attention(q, k, v, "entmax15", causal=True)      # (B, Hq, L, Dv)
    out = flashmaps.sdpa(q, k, v, is_causal=True, normalizer="topk:64")  # torch SDPA's signature
    flashmaps.names()                                                  # the registered normalizers

Normalizer classes are reachable by their class name (``flashmaps.TopK(64)``); ``flashmaps.register``
adds your own (README, "Write your own normalizer").
"""

from importlib import import_module as _import_module

from . import normalizers, reference
from .functional import (SdpaTypeError, SdpaValueError, attention, global_threshold, merge, sdpa,
                         threshold_candidates)
from .inference import attention_varlen, attention_with_kvcache
from .linear import TaylorState, choose_form
from .normalizers import Normalizer, defaults, examples, names, parse, register, registry, unregister
from .normalizers.gumbel import gumbel_noise

__version__ = "0.1.0"

__all__ = [
    "attention",
    "sdpa",
    "merge",
    "threshold_candidates",
    "global_threshold",
    "attention_varlen",
    "attention_with_kvcache",
    "SdpaValueError",
    "SdpaTypeError",
    "choose_form",
    "TaylorState",
    "Normalizer",
    "register",
    "unregister",
    "registry",
    "names",
    "defaults",
    "examples",
    "parse",
    "normalizers",
    "reference",
    "gumbel_noise",
    "__version__",
]

_LAZY = ("nn", "integrations", "cli", "distributed")


def __getattr__(name):  # flashmaps.nn etc. are imported on first use; normalizer classes by class name
    if name in _LAZY:
        return _import_module(f".{name}", __name__)
    cls = normalizers.classes().get(name)
    if cls is not None:
        return cls
    raise AttributeError(f"module 'flashmaps' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(normalizers.classes()))
