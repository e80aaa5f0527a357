"""harmonic: softmax over a log-distance score, ``p_j = d_j^-n / sum_i d_i^-n`` with ``d_j^2 = scale ||q - k_j||^2``."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from .base import Normalizer, register
from .softmax import Softmax

__all__ = ["Harmonic", "positive_option"]


def positive_option(cls: type[Normalizer], field: str, arg: str | None, default: float, argname: str) -> float:
    """The float option ``field`` of the spec ``"<name>:<arg>"`` (``default`` when there is no argument),
    finite and > 0; a ValueError naming the option and its range otherwise."""
    if arg is None:
        return default
    try:
        value = float(arg)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{argname}: {cls.name}'s {field} must be a finite number > 0 (e.g. '{cls.name}:"
                         f"{default:g}'), got '{cls.name}:{arg}'")
    return value


def check_positive(obj: Normalizer, field: str) -> None:
    """The dataclass check of a float option that must be finite and > 0 (TypeError for a non-number)."""
    value = getattr(obj, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{type(obj).__name__}: {field} must be a number > 0, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{type(obj).__name__}: {field} must be a finite number > 0, got {value!r}")
    object.__setattr__(obj, field, float(value))


def float_spec(name: str, value: float) -> str:
    """``"name:value"`` with the shortest text that parses back to ``value``."""
    text = f"{value:g}"
    return f"{name}:{text if float(text) == value else repr(value)}"


@register
@dataclasses.dataclass(frozen=True)
class Harmonic(Normalizer):
    """Harmonic attention: ``p_j = d_j^-n / sum_i d_i^-n``, ``d_j^2 = scale ||q - k_j||^2``, that is softmax
    over the log-distance score

        ``s_j = -(n/2) ln(max(scale ||q - k_j||^2, tiny))``   (instead of ``scale q.k``; ``n > 0``)

    with ``||q - k||^2 = |q|^2 + |k|^2 - 2 q.k`` in the kernels and ``tiny`` float32's smallest normal, so a
    zero distance is a finite, dominant score; then softcap and mask bias as for any score, then softmax.
    The score form is the contract's ``score = "distance"`` (every backend's score tile and its backward:
    ``ds/dq_i = -n (q_i - k_j) / ||q_i - k_j||^2``); the weights, statistics, backward rule and merge are
    softmax's (its hooks, reused). Row statistic: ``lse`` of the log-distance scores (``-inf`` for an empty
    row). Merge over disjoint key sets: the log-sum-exp merge, as softmax.
    """

    n: float = 2.0

    name: ClassVar[str] = "harmonic"
    stats: ClassVar[tuple[str, ...]] = Softmax.stats
    empty_stats: ClassVar[tuple[float, ...]] = Softmax.empty_stats
    kernels: ClassVar[str] = "flashmaps.kernels.harmonic"
    order: ClassVar[int] = 60
    spec_help: ClassVar[str] = "harmonic:<n>"
    formula: ClassVar[str] = ("`d_j^-n / sum_i d_i^-n`, `d_j^2 = scale ||q - k_j||^2` (softmax of "
                              "`-(n/2) ln(max(d_j^2, tiny))`)")
    merge_rule: ClassVar[str] = Softmax.merge_rule
    score: ClassVar[str] = "distance"

    def __post_init__(self):
        check_positive(self, "n")

    @classmethod
    def from_spec(cls, arg, *, argname="normalizer"):
        return cls(positive_option(cls, "n", arg, cls.n, argname))

    @property
    def spec(self) -> str:
        return float_spec(self.name, self.n)

    @classmethod
    def examples(cls):
        return [cls(2.0)]

    @property
    def score_power(self) -> float:
        return self.n

    # softmax over the (distance-form) scores: its reference, torch hooks and merge
    reference_weights = Softmax.reference_weights
    reference_stats = Softmax.reference_stats
    torch_stats = Softmax.torch_stats
    torch_weights = Softmax.torch_weights
    torch_dscores = Softmax.torch_dscores
    merge = Softmax.merge
    stat_delta = Softmax.stat_delta
