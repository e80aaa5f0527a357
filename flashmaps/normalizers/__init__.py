"""The normalizers: one unit each (``flashmaps/normalizers/<name>.py`` beside ``flashmaps/kernels/<name>.py``)
and one registry.

Every module of this package (except ``base``, ``rows`` and ``_``-prefixed ones) is imported here and
registers its class with :func:`register`, so adding a normalizer is adding its files. The classes are
reachable by name from this package and from ``flashmaps`` (``flashmaps.TopK``).

Strings are accepted wherever a normalizer is: ``"softmax"``, ``"topk:64"`` (``parse("topk:64") == TopK(64)``);
``names()`` lists the registered names, ``defaults()`` and ``examples()`` give instances.
"""

from __future__ import annotations

import pkgutil as _pkgutil
from importlib import import_module as _import_module

from . import rows
from .base import Normalizer, defaults, examples, get, names, parse, register, registry, table, unregister

_UNITS = [m.name for m in _pkgutil.iter_modules(__path__) if m.name not in ("base", "rows") and not m.name.startswith("_")]
for _unit in _UNITS:
    _import_module(f"{__name__}.{_unit}")

from .entmax15 import entmax15_threshold  # noqa: E402  (helpers the tests and references use)
from .topk import topk_threshold  # noqa: E402

__all__ = ["Normalizer", "register", "unregister", "registry", "names", "get", "parse", "defaults", "examples",
           "table", "rows", "entmax15_threshold", "topk_threshold"]


def classes() -> dict[str, type[Normalizer]]:
    """Class name -> class of every registered normalizer ("TopK": TopK)."""
    return {cls.__name__: cls for cls in registry().values()}


def __getattr__(name):  # flashmaps.normalizers.Sparsemax etc.: the registered classes by class name
    try:
        return classes()[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return sorted(set(globals()) | set(classes()))
