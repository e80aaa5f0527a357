"""Triton kernels of flashmaps (installed as ``flashmaps.kernels``).

* ``common``: shared ``@triton.jit`` helpers (scores, masks, causal bounds, loads, dropout) and ``Hooks``.
* ``tile_loop``: the one forward kernel ``attn_fwd``.
* ``backward``: the backward kernels (preprocess, dK/dV, dQ), one copy for every normalizer.
* ``softmax``, ``taylor``, ``entmax15``, ``topk``: each normalizer's hooks (threshold pre-pass, and
  its backward rule).

``HOOKS`` maps a normalizer name to its ``common.Hooks``; adding a normalizer means adding a module
and an entry here, never editing the tile loop or the backward kernels.
"""

from . import backward, common, entmax15, softmax, taylor, tile_loop, topk
from .common import Hooks

HOOKS: dict[str, Hooks] = {m.HOOKS.name: m.HOOKS for m in (softmax, taylor, entmax15, topk)}


def hooks_for(name: str) -> Hooks:
    """The kernel hooks of the normalizer called ``name`` (``Normalizer.name``)."""
    try:
        return HOOKS[name]
    except KeyError:
        raise NotImplementedError(
            f"no Triton kernel hooks for the normalizer {name!r} (have: {', '.join(sorted(HOOKS))}); "
            "use backend='torch'"
        ) from None


__all__ = ["HOOKS", "Hooks", "hooks_for", "common", "tile_loop", "backward", "softmax", "taylor", "entmax15",
           "topk"]
