"""sigmoid: FlashSigmoid's unnormalized map ``p_j = sigmoid(s_j + b)``, default ``b = -log S``."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from .base import Normalizer, register
from .rows import zero_disallowed

__all__ = ["Sigmoid"]


@register
@dataclasses.dataclass(frozen=True)
class Sigmoid(Normalizer):
    """Sigmoid attention (Apple's FlashSigmoid): ``p_j = sigmoid(s_j + b) = 1 / (1 + exp(-(s_j + b)))`` on
    allowed keys, no normalization (rows do not sum to one). ``b`` defaults to ``-log S`` with S the number of
    keys of the call (``"sigmoid"``), or is given (``"sigmoid:<b>"``, ``Sigmoid(b=-4.0)``).

    Row statistics: none. Backward: ``dS = p (1 - p) dP`` (no row term). A row with no allowed key outputs 0.
    Computed stably (``exp(-|x|)`` only, never ``exp`` of a positive number).

    Merge over disjoint key sets: ``out = sum_i out_i``, correct only when every part used the SAME ``b``. The
    default ``b = -log S`` depends on the part's own key count, so for partial calls (split KV cache, ring
    attention) pass ``b`` explicitly, ``b = -log S_total``: ``attention(..., "sigmoid:<b>")`` for each part.
    """

    b: float | None = None
    name: ClassVar[str] = "sigmoid"
    stats: ClassVar[tuple[str, ...]] = ()
    empty_stats: ClassVar[tuple[float, ...]] = ()
    sums_to_one: ClassVar[bool] = False
    kernels: ClassVar[str] = "flashmaps.kernels.sigmoid"
    spec_help: ClassVar[str] = "sigmoid[:<b>]"
    order: ClassVar[int] = 50
    formula: ClassVar[str] = "`sigmoid(s_j + b)`, no normalization, `b = -log S` by default (FlashSigmoid)"
    merge_rule: ClassVar[str] = "sums of `out` (parts need the same explicit `b`)"

    def __post_init__(self):
        if self.b is None:
            return
        if isinstance(self.b, bool) or not isinstance(self.b, (int, float)):
            raise TypeError(f"Sigmoid(b): the bias b must be a finite real number or None (= -log S), got "
                            f"{type(self.b).__name__} {self.b!r}")
        if not math.isfinite(self.b):
            raise ValueError(f"Sigmoid(b): the bias b must be finite (-inf < b < inf), got {self.b}")
        object.__setattr__(self, "b", float(self.b))

    @classmethod
    def from_spec(cls, arg, *, argname="normalizer"):
        if arg is None:
            return cls()
        try:
            b = float(arg)
        except ValueError:
            raise ValueError(f"{argname}: malformed sigmoid spec 'sigmoid:{arg}'; write 'sigmoid:<b>' with a finite "
                             "real bias b (e.g. 'sigmoid:-6.9'), or 'sigmoid' for b = -log S") from None
        if not math.isfinite(b):
            raise ValueError(f"{argname}: 'sigmoid:{arg}': the bias b must be finite (-inf < b < inf)")
        return cls(b)

    @property
    def spec(self) -> str:
        return self.name if self.b is None else f"{self.name}:{self.b!r}"

    @classmethod
    def examples(cls) -> list["Sigmoid"]:
        return [cls()]                         # an explicit b runs the same code: tests/test_family_a.py

    def for_keys(self, S: int) -> "Sigmoid":
        """The instance with ``b`` resolved: ``b = -log S`` when not given (0 for S = 0)."""
        return self if self.b is not None else Sigmoid(-math.log(S) if S > 0 else 0.0)

    def reference_weights(self, s, allowed):
        b = self.for_keys(s.shape[-1]).b
        p = 1.0 / (1.0 + torch.exp(-(torch.where(allowed, s, torch.zeros_like(s)) + b)))
        return zero_disallowed(p, allowed)

    def torch_stats(self, s, masked):
        return {}

    def torch_weights(self, s, st, masked):
        return torch.sigmoid(s + self.b)                           # -inf scores give exactly 0

    def torch_dscores(self, s, p, dp, st):
        return p * torch.sigmoid(-(s + self.b)) * dp               # p (1 - p), without the cancellation of 1 - p

    def merge(self, outs, stats):
        acc = torch.float64 if outs[0].dtype == torch.float64 else torch.float32
        return sum(o.to(acc) for o in outs).to(outs[0].dtype), {}
