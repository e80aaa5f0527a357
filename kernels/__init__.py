"""Triton code of flashmaps (installed as ``flashmaps.kernels``).

* ``contract``: the log base, the argument bundles and `Hooks`, the record a normalizer plugs in with
  (built by `make_hooks`).
* ``tiles``: loads, the matrix product, score tiles and masks, tile bounds, and `fold_keys`, the one sweep
  over a query block's key tiles.
* ``dropout``: the keep mask shared by the forward and backward kernels.
* ``threshold``: the threshold engine of the sparse normalizers (bracket passes, collect method).
* ``tile_loop``: the one forward kernel ``attn_fwd``; ``backward``: the backward kernels.
* ``softmax``, ``taylor``, ``entmax15``, ``topk``, ...: each normalizer's hooks, next to its Python unit in
  ``flashmaps/normalizers/``. A normalizer module defines ``HOOKS`` (and, when its kernels depend on the
  instance or on S, ``configure(normalizer, S) -> (hooks, args, scratch_cols)``); the loop and the backward
  kernels never name a normalizer.
"""

from .contract import Hooks, NoArgs, make_hooks
from .threshold import Bracket, ThresholdRule

__all__ = ["Hooks", "NoArgs", "make_hooks", "Bracket", "ThresholdRule"]
