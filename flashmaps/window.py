"""Key ranges of a query row: causal alignment and sliding windows, as one "band" rule.

Every backend sees one string ``causal`` (the ops' schema carries strings): ``None`` (every key),
``"upper_left"`` (j <= i), ``"lower_right"`` (j <= i + S - L) or a window
``"window:<align>:<left>:<right>"``. With ``off`` = 0 (``upper_left``) or S - L (``lower_right``), key j is
allowed for query row i when::

    i + off - left <= j <= i + off + right          (left / right = -1: no bound on that side)

as flash_attn's ``window_size=(left, right)`` (lower-right alignment). Causal is the band (-1, 0).

:func:`bounds` turns the string into the two offsets the kernels test, ``j <= i + right_off`` and
``j >= i + left_off`` (None where there is no bound): the Triton kernels skip whole tiles outside the band
(``tiles.key_bounds`` / ``tiles.left_bounds``) and the torch path's chunks read only the keys inside it.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Band", "encode", "bounds", "check_window"]


class Band(NamedTuple):
    """``j <= i + right_off`` (None: no right bound) and ``j >= i + left_off`` (None: no left bound)."""

    right_off: int | None
    left_off: int | None


def check_window(window, argname: str = "window") -> tuple[int, int] | None:
    """None or a (left, right) pair of ints >= -1 (-1: no bound on that side), as flash_attn's window_size."""
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"{argname} must be None or a pair (left, right) of ints (-1 for no bound on that side), "
                        f"got {window!r}")
    out = []
    for side, w in zip(("left", "right"), window):
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"{argname}: the {side} bound must be an int (-1 for no bound), got {w!r}")
        if w < -1:
            raise ValueError(f"{argname}: the {side} bound must be >= 0, or -1 for no bound, got {w}")
        out.append(int(w))
    return out[0], out[1]


def encode(causal: str | None, window: tuple[int, int] | None) -> str | None:
    """The one string of a call from its causal mode (None, "upper_left", "lower_right") and window.

    A window is aligned like ``causal`` when that is given, lower-right otherwise; causal bounds its right side
    by 0 (``min(right, 0)``, as flash_attn's causal + window_size)."""
    if window is None or window == (-1, -1) and causal is None:
        return causal
    left, right = window
    if causal is not None:
        right = 0 if right < 0 else min(right, 0)
    align = causal or "lower_right"
    if left < 0 and right == 0:
        return align                              # the window adds nothing to causal
    return f"window:{align}:{left}:{right}"


def bounds(causal: str | None, L: int, S: int) -> Band:
    """The band offsets of ``causal`` (an :func:`encode` string) for L queries and S keys."""
    if causal is None or causal == "":
        return Band(None, None)
    if causal == "upper_left":
        return Band(0, None)
    if causal == "lower_right":
        return Band(S - L, None)
    kind, align, left, right = causal.split(":")
    if kind != "window" or align not in ("upper_left", "lower_right"):
        raise ValueError(f"not a key-range rule: {causal!r}")
    off = 0 if align == "upper_left" else S - L
    left, right = int(left), int(right)
    return Band(None if right < 0 else off + right, None if left < 0 else off - left)


def is_window(causal: str | None) -> bool:
    return bool(causal) and causal.startswith("window:")
