"""flashmaps: blockwise attention with pluggable normalizers (softmax, taylor, entmax15, top-k).

    import flashmaps
    out = flashmaps.attention(q, k, v, "entmax15", causal=True)      # (B, Hq, L, Dv)
    out = flashmaps.sdpa(q, k, v, is_causal=True, normalizer="topk:64")  # torch SDPA's signature
"""

from importlib import import_module as _import_module

from . import reference
from .functional import attention, sdpa
from .normalizers import Entmax15, Normalizer, Softmax, Taylor, TopK, normalizers, parse

__version__ = "0.1.0"

__all__ = [
    "attention",
    "sdpa",
    "Normalizer",
    "Softmax",
    "Taylor",
    "Entmax15",
    "TopK",
    "normalizers",
    "parse",
    "reference",
    "__version__",
]

_LAZY = ("nn", "integrations", "cli")


def __getattr__(name):  # flashmaps.nn etc. are imported on first use
    if name in _LAZY:
        return _import_module(f".{name}", __name__)
    raise AttributeError(f"module 'flashmaps' has no attribute {name!r}")
