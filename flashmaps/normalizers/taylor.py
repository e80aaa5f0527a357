"""taylor: the Taylor map of even order k, ``f_k(s) = sum_{m=0..k} s^m / m!`` (k = 2: Based's ``1 + s + s^2/2``)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from .base import Normalizer, register
from .rows import rowsum, safe_div, zero_disallowed

__all__ = ["Taylor"]


def _f(s, k):
    """f_k(s) = sum_{m=0..k} s^m / m!, term by term (the reference's form; the fast paths use Horner)."""
    term, f = torch.ones_like(s), torch.ones_like(s)
    for m in range(1, k + 1):
        term = term * s / m
        f = f + term
    return f


def _horner(s, k):
    """f_k(s) by Horner: 1 + s (1 + s/2 (1 + ... (1 + s/k))); f_0 = 1."""
    f = torch.ones_like(s)
    for m in range(k, 0, -1):
        f = torch.addcmul(torch.ones_like(s), s, f, value=1.0 / m)
    return f


@register
@dataclasses.dataclass(frozen=True)
class Taylor(Normalizer):
    """Taylor map of even order ``k`` (``"taylor"`` = ``"taylor:2"``, Based linear attention):
    ``p_j = f_k(s_j) / Z`` with ``f_k(s) = sum_{m=0..k} s^m / m!`` and ``Z = sum_j f_k(s_j)``.

    For even k, f_k > 0 everywhere (its minimum is at f_k' = f_{k-1} = 0, where f_k = s^k / k! > 0; f_2 >= 1/2),
    so no running max is needed; odd orders are refused (f_k(s) -> -inf as s -> -inf: weights would be negative).
    Row statistics: ``z`` (the normalizer Z, 0 for a row with no allowed key). Backward:
    ``dS = f_k'(S)/Z * (dP - delta)`` with ``f_k' = f_{k-1}``. Merge over disjoint key sets:
    ``z = sum_i z_i``, ``out = sum_i z_i out_i / z``. Gradient through ``z``: ``dZ/ds_j = f_k'(s_j)``, so a
    gradient ``g`` of ``z`` shifts the row term, ``delta' = delta - Z g`` (``stat_delta``).
    Forms: quadratic (the tile loop) and, for k = 2 only, linear (``flashmaps.linear``:
    ``f(q'.k) = phi_q(q') . phi_k(k)``, a fixed-size state per head; ``attention(..., form="linear")``, decoding
    with ``flashmaps.TaylorState``). Order k > 2 would need O(D^k) features: quadratic only ("auto" picks it).
    """

    k: int = 2
    name: ClassVar[str] = "taylor"
    stats: ClassVar[tuple[str, ...]] = ("z",)
    empty_stats: ClassVar[tuple[float, ...]] = (0.0,)
    kernels: ClassVar[str] = "flashmaps.kernels.taylor"
    spec_help: ClassVar[str] = "taylor[:<k>]"
    order: ClassVar[int] = 10
    formula: ClassVar[str] = ("`f_k(s_j) / Z`, `f_k(s) = sum_{m<=k} s^m/m!` (even k; default 2, Based's "
                              "`1 + s + s^2/2`), `Z = sum_i f_k(s_i)`")
    merge_rule: ClassVar[str] = "sums of `z`"
    forms: ClassVar[tuple[str, ...]] = ("quadratic", "linear")
    linear_coeffs: ClassVar[tuple[float, float, float]] = (1.0, 1.0, 0.5)  # f(s) = 1 + s + s^2/2

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int):
            raise TypeError(f"Taylor(k): the order k must be an even int >= 2, got {type(self.k).__name__} {self.k!r}")
        if self.k < 2 or self.k % 2:
            why = ("f_k(s) -> -inf as s -> -inf for odd k, so weights could be negative and Z zero"
                   if self.k % 2 else "k must be at least 2")
            raise ValueError(f"Taylor(k): the order k must be an even int >= 2 (2, 4, 6, ...), got {self.k}: {why}")
        if self.k != 2:  # the linear form (features of f(s) = c0 + c1 s + c2 s^2) exists for order 2 only
            object.__setattr__(self, "forms", ("quadratic",))
            object.__setattr__(self, "linear_coeffs", None)

    @classmethod
    def from_spec(cls, arg, *, argname="normalizer"):
        if arg is None:
            return cls()
        try:
            k = int(arg)
        except ValueError:
            raise ValueError(f"{argname}: malformed Taylor spec 'taylor:{arg}'; write 'taylor:<k>' with an even "
                             "integer order k >= 2 (e.g. 'taylor:4'), or 'taylor' for order 2") from None
        try:
            return cls(k)
        except ValueError as e:
            raise ValueError(f"{argname}: 'taylor:{arg}': {e}") from None

    @property
    def spec(self) -> str:
        return self.name if self.k == 2 else f"{self.name}:{self.k}"

    @classmethod
    def examples(cls) -> list["Taylor"]:
        return [cls(2), cls(4)]

    def score_limit(self, dtype):
        """f_k(s) <= (|s| + k)^k / k! must fit float32 (the sums); in fp16 the Triton kernels feed f(s) 2^-10 to
        the tensor cores in fp16 (max 65504), so |s| <= (k! 65504 2^10)^(1/k) - k (k = 2: ~11585, k = 4: ~196)."""
        top = 65504.0 * 2**10 if dtype == torch.float16 else torch.finfo(torch.float32).max
        return math.exp((math.lgamma(self.k + 1) + math.log(top)) / self.k) - self.k

    def reference_weights(self, s, allowed):
        f = torch.where(allowed, _f(s, self.k), torch.zeros_like(s))
        return zero_disallowed(safe_div(f, rowsum(f)), allowed)

    def reference_stats(self, s, allowed):
        return {"z": torch.where(allowed, _f(s, self.k), torch.zeros_like(s)).sum(-1)}

    def _f_allowed(self, s, masked):
        if not masked:
            return _horner(s, self.k)
        ok = s != float("-inf")
        zero = torch.zeros((), dtype=s.dtype, device=s.device)
        return torch.where(ok, _horner(torch.where(ok, s, zero), self.k), zero)

    def torch_stats(self, s, masked):
        return {"z": rowsum(self._f_allowed(s, masked))}          # 0 for an empty row

    def torch_weights(self, s, st, masked):
        return safe_div(self._f_allowed(s, masked), st["z"])

    def torch_dscores(self, s, p, dp, st):
        zero = torch.zeros((), dtype=s.dtype, device=s.device)
        fprime = torch.where(p > 0, _horner(torch.where(p > 0, s, zero), self.k - 1), zero)   # f_k' = f_{k-1}
        return safe_div(fprime, st["z"]) * (dp - rowsum(p * dp))

    def merge(self, outs, stats):
        acc = torch.float64 if outs[0].dtype == torch.float64 else torch.float32
        zs = [st["z"].to(acc) for st in stats]
        z = sum(zs)
        out = sum(zi[..., None] * o.to(acc) for zi, o in zip(zs, outs))
        out = out / torch.where(z > 0, z, torch.ones_like(z))[..., None]
        return out.to(outs[0].dtype), {"z": z}

    def stat_delta(self, stats, stat_grads):
        return stats[0] * stat_grads[0]             # Z g: 0 on an empty row (Z = 0)
