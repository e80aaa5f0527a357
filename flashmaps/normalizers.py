"""The normalizer registry: the map N from a row of scores to the probability simplex.

Attention for one query row is ``o = sum_j p_j v_j`` with ``p = N(s)``. Every normalizer here is a
small frozen object that knows

* its formula (its docstring),
* its dense reference weights (``reference_weights``, float64-capable, used by
  :mod:`flashmaps.reference` and nothing else),
* the names of the row statistics it saves (``stats``), which ``attention(..., return_stats=True)``
  returns and the backward pass / merging of partial results consume.

Backends look a normalizer up by ``name``; adding one means adding a class here, its torch hooks and its
Triton hooks, never editing a tile loop.

Strings are accepted wherever a normalizer is: ``"softmax"``, ``"taylor"``, ``"entmax15"``,
``"topk:<k>"`` (``parse("topk:64") == TopK(64)``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

__all__ = [
    "Normalizer",
    "Softmax",
    "Taylor",
    "Entmax15",
    "TopK",
    "parse",
    "normalizers",
    "register",
    "defaults",
]


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """Base class. Subclasses set ``name`` and ``stats`` and implement ``reference_weights``."""

    name: ClassVar[str] = ""
    #: names of the per-row statistics (each shaped (B, Hq, L)) saved by the forward pass
    stats: ClassVar[tuple[str, ...]] = ()
    #: the value of each statistic for a row with no allowed key (same order as ``stats``)
    empty_stats: ClassVar[tuple[float, ...]] = ()
    #: True if the weights can contain exact zeros for allowed keys (entmax15, topk)
    sparse: ClassVar[bool] = False

    @property
    def spec(self) -> str:
        """The string form that :func:`parse` turns back into this normalizer."""
        return self.name

    @classmethod
    def default(cls) -> "Normalizer":
        """The instance benchmarks, ``compare`` and the transformers names use by default."""
        return cls()

    def reference_weights(self, s: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Dense weights ``p`` (same shape as ``s``, last dim = keys) from scores ``s`` and a bool
        ``allowed`` of the same shape. Disallowed keys get 0; a row with no allowed key is all 0."""
        raise NotImplementedError

    def __str__(self) -> str:  # "topk:64"
        return self.spec


def _empty_rows_to_zero(p: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    p = torch.where(allowed, p, torch.zeros((), dtype=p.dtype, device=p.device))
    return torch.where(allowed.any(-1, keepdim=True), p, torch.zeros((), dtype=p.dtype, device=p.device))


def _masked_softmax(s: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
    sm = torch.where(allowed, s, neg_inf)
    m = sm.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.where(allowed, torch.exp(sm - m), torch.zeros_like(s))
    denom = e.sum(-1, keepdim=True)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    return _empty_rows_to_zero(p, allowed)


@dataclasses.dataclass(frozen=True)
class Softmax(Normalizer):
    """Softmax: ``p_j = exp(s_j - m) / l`` with ``m = max_j s_j``, ``l = sum_j exp(s_j - m)``.

    Row statistics: ``lse = m + log(l)`` (natural log; ``-inf`` for a row with no allowed key).
    """

    name: ClassVar[str] = "softmax"
    stats: ClassVar[tuple[str, ...]] = ("lse",)
    empty_stats: ClassVar[tuple[float, ...]] = (float("-inf"),)

    def reference_weights(self, s, allowed):
        return _masked_softmax(s, allowed)


@dataclasses.dataclass(frozen=True)
class Taylor(Normalizer):
    """Second-order Taylor map of Based linear attention:
    ``p_j = f(s_j) / Z`` with ``f(s) = 1 + s + s^2/2 >= 1/2`` and ``Z = sum_j f(s_j)``.

    No running max is needed (``f`` is bounded below by 1/2). Row statistics: ``z`` (the normalizer Z,
    0 for a row with no allowed key).
    """

    name: ClassVar[str] = "taylor"
    stats: ClassVar[tuple[str, ...]] = ("z",)
    empty_stats: ClassVar[tuple[float, ...]] = (0.0,)

    def reference_weights(self, s, allowed):
        f = torch.where(allowed, 1 + s + 0.5 * s * s, torch.zeros_like(s))
        z = f.sum(-1, keepdim=True)
        p = f / torch.where(z > 0, z, torch.ones_like(z))
        return _empty_rows_to_zero(p, allowed)


@dataclasses.dataclass(frozen=True)
class Entmax15(Normalizer):
    """1.5-entmax (as ``entmax.entmax15``): with ``z = s/2``,
    ``p_j = max(z_j - tau, 0)^2`` and ``tau`` such that ``sum_j p_j = 1``.

    ``tau`` lies in ``[max z - 1, max z - n^(-1/2)]`` for ``n`` allowed keys; keys with ``z_j <= tau``
    get exactly 0. Row statistics: ``tau`` (in units of z; ``+inf`` for a row with no allowed key).
    """

    name: ClassVar[str] = "entmax15"
    stats: ClassVar[tuple[str, ...]] = ("tau",)
    empty_stats: ClassVar[tuple[float, ...]] = (float("inf"),)
    sparse: ClassVar[bool] = True

    def reference_weights(self, s, allowed):
        tau = entmax15_threshold(s, allowed)
        z = s / 2
        p = torch.where(allowed, torch.clamp(z - tau, min=0) ** 2, torch.zeros_like(s))
        return _empty_rows_to_zero(p, allowed)


def entmax15_threshold(s: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Exact 1.5-entmax threshold ``tau`` (units of ``z = s/2``), shape ``s.shape[:-1] + (1,)``.

    Sort-based: for the support of size ``r`` (the ``r`` largest z), ``tau = mean - sqrt(1/r - var)``;
    the support is the largest ``r`` with ``tau_r <= z_(r)``. Disallowed keys are replaced by
    ``max z - 2``, below any feasible tau (``tau >= max z - 1``), so they never enter the support.
    Rows with no allowed key get ``+inf``.
    """
    z = s / 2
    neg_inf = torch.tensor(float("-inf"), dtype=z.dtype, device=z.device)
    zmax = torch.where(allowed, z, neg_inf).amax(-1, keepdim=True)
    any_allowed = allowed.any(-1, keepdim=True)
    zmax = torch.where(any_allowed, zmax, torch.zeros_like(zmax))
    x = torch.where(allowed, z - zmax, torch.full_like(z, -2.0))  # shifted: max is 0
    xs, _ = torch.sort(x, dim=-1, descending=True)
    rho = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype, device=x.device)
    mean = xs.cumsum(-1) / rho
    mean_sq = (xs * xs).cumsum(-1) / rho
    delta = (1 - rho * (mean_sq - mean * mean)) / rho
    tau = mean - torch.sqrt(torch.clamp(delta, min=0))
    support = (tau <= xs).sum(-1, keepdim=True)
    tau_star = tau.gather(-1, support - 1)
    return torch.where(any_allowed, tau_star + zmax, torch.full_like(tau_star, float("inf")))


@dataclasses.dataclass(frozen=True)
class TopK(Normalizer):
    """Top-k softmax: softmax over the keys whose score is at least ``tau_k``, the k-th largest
    allowed score of the row (``tau_k = -inf`` when the row has at most k allowed keys).

    Threshold semantics: every key tied with the k-th score is kept, so a row may keep more than k
    keys when scores tie. Row statistics: ``tau`` (the threshold ``tau_k``, in score units) and ``lse``
    (natural-log log-sum-exp over the kept keys).
    """

    k: int = 64
    name: ClassVar[str] = "topk"
    stats: ClassVar[tuple[str, ...]] = ("tau", "lse")
    empty_stats: ClassVar[tuple[float, ...]] = (float("-inf"), float("-inf"))
    sparse: ClassVar[bool] = True

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int):
            raise TypeError(f"TopK(k): k must be a positive int, got {type(self.k).__name__} {self.k!r}")
        if self.k < 1:
            raise ValueError(f"TopK(k): k must be >= 1, got {self.k}; use e.g. TopK(64) or 'topk:64'")

    @property
    def spec(self) -> str:
        return f"topk:{self.k}"

    @classmethod
    def default(cls) -> "TopK":
        return cls(64)

    def reference_weights(self, s, allowed):
        tau = topk_threshold(s, allowed, self.k)
        keep = allowed & (s >= tau)
        return _masked_softmax(s, keep)


def topk_threshold(s: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest allowed score per row, shape ``s.shape[:-1] + (1,)``; ``-inf`` where the row
    has at most ``k`` allowed keys (then every allowed key is kept)."""
    n_keys = s.shape[-1]
    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
    if k >= n_keys or n_keys == 0:
        return torch.full(s.shape[:-1] + (1,), float("-inf"), dtype=s.dtype, device=s.device)
    sm = torch.where(allowed, s, neg_inf)
    kth = torch.topk(sm, k, dim=-1).values[..., -1:]
    n = allowed.sum(-1, keepdim=True)
    return torch.where(n > k, kth, neg_inf)


_REGISTRY: dict[str, type[Normalizer]] = {}


def register(cls: type[Normalizer]) -> type[Normalizer]:
    """Add a normalizer class to the registry under ``cls.name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Normalizer)) or not cls.name:
        raise TypeError("register(cls): cls must be a Normalizer subclass with a non-empty `name`")
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (Softmax, Taylor, Entmax15, TopK):
    register(_cls)


def defaults() -> list[Normalizer]:
    """One default instance of every registered normalizer (``Normalizer.default()``), softmax first."""
    return [cls.default() for cls in sorted(_REGISTRY.values(), key=lambda c: (c.name != "softmax", c.name))]


def normalizers() -> list[str]:
    """The registered normalizer names (``"topk"`` is spelled ``"topk:<k>"`` as a string)."""
    return sorted(_REGISTRY)


def _known() -> str:
    return ", ".join(f"'{n}:<k>'" if n == "topk" else f"'{n}'" for n in normalizers())


def parse(normalizer: str | Normalizer, *, argname: str = "normalizer") -> Normalizer:
    """Turn ``"softmax"``, ``"taylor"``, ``"entmax15"``, ``"topk:64"`` or a Normalizer instance into a
    Normalizer instance. Raises ValueError/TypeError naming ``argname`` otherwise."""
    if isinstance(normalizer, Normalizer):
        if type(normalizer) is Normalizer:
            raise TypeError(f"{argname}: the Normalizer base class is abstract; use one of {_known()}")
        return normalizer
    if isinstance(normalizer, type) and issubclass(normalizer, Normalizer):
        raise TypeError(
            f"{argname}: got the class {normalizer.__name__}; pass an instance such as "
            f"{normalizer.__name__}() or a string ({_known()})"
        )
    if not isinstance(normalizer, str):
        raise TypeError(
            f"{argname} must be a string ({_known()}) or a flashmaps Normalizer, "
            f"got {type(normalizer).__name__}"
        )
    text = normalizer.strip().lower()
    name, sep, arg = text.partition(":")
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"{argname}: unknown normalizer {normalizer!r}; known: {_known()}")
    if cls is TopK:
        if not sep or not arg.strip():
            raise ValueError(f"{argname}: {normalizer!r} needs k, written 'topk:<k>' (e.g. 'topk:64')")
        try:
            k = int(arg.strip())
        except ValueError:
            raise ValueError(
                f"{argname}: malformed top-k spec {normalizer!r}; write 'topk:<k>' with a positive "
                "integer k (e.g. 'topk:64')"
            ) from None
        if k < 1:
            raise ValueError(f"{argname}: top-k needs k >= 1, got {normalizer!r} (e.g. 'topk:64')")
        return TopK(k)
    if sep:
        raise ValueError(f"{argname}: normalizer {name!r} takes no argument, got {normalizer!r}")
    return cls()
