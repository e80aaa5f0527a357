"""entmax: alpha-entmax for ``1 < alpha <= 2``, ``p_j = max((alpha - 1) s_j - tau, 0)^(1/(alpha - 1))`` with
``sum_j p_j = 1`` (Peters, Niculae & Martins 2019), with one alpha per call or one per query head."""

from __future__ import annotations

import dataclasses
import numbers
from typing import ClassVar

import torch

from .base import Normalizer, register
from .rows import (NEG_INF, TwoPhaseRoot, exact_threshold, finite_or_zero, rowsum, safe_div, scatter_top,
                   zero_disallowed)

__all__ = ["Entmax", "entmax_threshold", "PER_HEAD"]

#: the spec argument of an Entmax whose alpha is a per-head tensor ("entmax:per_head"): the tensor itself
#: travels beside the spec string (``head_params`` of the custom op; see ``Normalizer.head_params``)
PER_HEAD = "per_head"
#: iterations of the safeguarded Newton solver (each at least halves the bracket: 64 reach float64's eps)
MAX_ITERS = 80


@register
@dataclasses.dataclass(frozen=True, eq=False)
class Entmax(TwoPhaseRoot, Normalizer):
    """alpha-entmax, ``1 < alpha <= 2``: with ``x = (alpha - 1) s`` and ``e = 1/(alpha - 1)``,
    ``p_j = max(x_j - tau, 0)^e`` and ``tau`` such that ``sum_j p_j = 1`` (Peters, Niculae & Martins 2019).

    ``tau`` lies in ``[max x - 1, max x - n^(1 - alpha)]`` for ``n`` allowed keys (``F(tau) = sum_j
    max(x_j - tau, 0)^e - 1`` is convex and decreasing, >= 0 at the lower end and <= 0 at the upper one).
    There is no closed form for a general alpha: tau comes from Newton steps from the lower bound (which never
    overshoot: F is convex) safeguarded by bisection (each step at least halves the bracket), then one last
    Newton step at the accumulation precision; the weights are divided by their sum (an exact simplex).
    ``alpha = 1.5`` is ``entmax15`` and ``alpha = 2`` is ``sparsemax``: ``parse("entmax:1.5")`` and
    ``parse("entmax:2")`` return those instances (same kernels, same results); ``Entmax(alpha=1.5)`` built
    directly runs this general code (equal up to rounding).

    ``alpha`` is a float, or a float tensor of shape ``(Hq,)``: one alpha per query head (spec
    ``"entmax:per_head"``; the tensor travels to the backends as the call's head parameters). Gradients with
    respect to a tensor alpha are not provided: one that requires grad raises.

    Row statistics: ``tau`` (units of x; ``+inf`` for a row with no allowed key).
    Backward: with ``u = max(x - tau, 0)^(e - 1) = p^(2 - alpha)`` (unnormalized), the derivative with
    respect to s itself is ``dS = u * (dP - sum_j u_j dP_j / sum_j u_j)`` (implicit differentiation of
    ``F(tau, x) = 0``; the factor ``e`` of ``dp/dx`` and ``alpha - 1`` of ``dx/ds`` cancel). alpha = 1.5
    gives entmax15's ``g = sqrt(p)``, alpha = 2 sparsemax's support indicator.

    Merging partial results (the two-phase protocol, ``rows.TwoPhaseRoot``): tau is global, so independent
    partials do not merge. 1. each part's candidates are its local support ``{x > tau_part}`` (adding keys
    never lowers tau, so the union's support lies in the union of the local supports); 2. the union's tau is the
    threshold of the concatenated candidates; 3. each part's output at that tau, ``sum_j p_j v_j`` with
    ``p_j = max(x_j - tau, 0)^e`` NOT divided by the part's mass (the weights at the union's tau are final); 4. the merge
    sums the outputs (the masses sum to 1 up to the rounding of tau). Split-KV decoding runs the same protocol.
    Gradients through it are exact (``rows.TwoPhaseRoot``): phase 2's backward at the fixed tau plus tau's own
    gradient, which reaches every part's scores through the candidates (implicit function of sum p = 1).
    """

    alpha: float | torch.Tensor = 1.25

    name: ClassVar[str] = "entmax"
    stats: ClassVar[tuple[str, ...]] = ("tau",)
    empty_stats: ClassVar[tuple[float, ...]] = (float("inf"),)
    sparse: ClassVar[bool] = True
    kernels: ClassVar[str] = "flashmaps.kernels.entmax"
    order: ClassVar[int] = 22
    spec_help: ClassVar[str] = "entmax:<alpha>"
    formula: ClassVar[str] = ("`max((alpha-1) s_j - tau, 0)^(1/(alpha-1))`, `tau` such that `sum_j p_j = 1`, "
                              "1 < alpha <= 2 (Peters et al. 2019)")
    merge_rule: ClassVar[str] = ("two-phase: local supports -> global `tau` -> sum of the parts' outputs at `tau` "
                                 "(`merge(..., threshold=)`); exact gradients")

    def _x(self, s):                             # the two-phase protocol (rows.TwoPhaseRoot)
        return s * self._a(s)

    def _w(self, d):
        return d.pow(1.0 / self._a(d))

    def _u(self, d):
        return torch.where(d > 0, d.pow(1.0 / self._a(d) - 1.0), torch.zeros_like(d))   # p^(2 - alpha)

    def __post_init__(self):
        a = self.alpha
        if isinstance(a, torch.Tensor):
            if a.dim() != 1 or not a.is_floating_point() or a.numel() == 0:
                raise ValueError(f"Entmax: alpha as a tensor must be a 1-D float tensor of shape (Hq,), one alpha "
                                 f"per query head; got dtype {a.dtype}, shape {tuple(a.shape)}")
            if a.requires_grad:
                raise ValueError("Entmax: gradients with respect to alpha are not provided; pass "
                                 "alpha.detach() (a tensor alpha that requires grad is refused)")
            ad = a.detach()
            if not bool(((ad > 1) & (ad <= 2)).all()):
                raise ValueError(f"Entmax: every alpha must lie in (1, 2], got {ad.tolist()}")
            return
        if isinstance(a, bool) or not isinstance(a, numbers.Real):
            raise TypeError(f"Entmax: alpha must be a float in (1, 2] or a (Hq,) tensor, got {type(a).__name__}")
        if not (1 < float(a) <= 2):
            raise ValueError(f"Entmax: alpha must lie in (1, 2] (1 would be softmax: use 'softmax'), got {a}")
        object.__setattr__(self, "alpha", float(a))

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        if self.per_head or other.per_head:
            return self.alpha is other.alpha
        return self.alpha == other.alpha

    def __hash__(self):
        return hash((self.name, id(self.alpha) if self.per_head else self.alpha))

    @property
    def per_head(self) -> bool:
        return isinstance(self.alpha, torch.Tensor)

    # ---------------------------------------------------------------------------- spec

    @classmethod
    def from_spec(cls, arg, *, argname="normalizer"):
        if arg is None:
            raise ValueError(f"{argname}: 'entmax' needs alpha in (1, 2]: 'entmax:<alpha>' (e.g. 'entmax:1.25')")
        if arg == PER_HEAD:
            raise ValueError(f"{argname}: 'entmax:{PER_HEAD}' names an Entmax with a per-head alpha tensor; pass "
                             "flashmaps.Entmax(alpha=tensor of shape (Hq,)) instead of the string")
        try:
            alpha = float(arg)
        except ValueError:
            raise ValueError(f"{argname}: alpha of 'entmax:<alpha>' must be a number in (1, 2], got {arg!r}") from None
        if not (1 < alpha <= 2):
            raise ValueError(f"{argname}: alpha of 'entmax:<alpha>' must lie in (1, 2], got {arg!r}")
        if alpha == 1.5:      # the twins: the same results as the dedicated units (their kernels)
            from .entmax15 import Entmax15
            return Entmax15()
        if alpha == 2.0:
            from .sparsemax import Sparsemax
            return Sparsemax()
        return cls(alpha)

    @property
    def spec(self) -> str:
        return f"{self.name}:{PER_HEAD}" if self.per_head else f"{self.name}:{self.alpha:g}"

    @classmethod
    def examples(cls):
        return [cls(1.25)]

    # ---------------------------------------------------------------------------- per-head parameters

    def head_params(self):
        """The per-head alpha (Hq,), or None for a float alpha (``Normalizer.head_params``)."""
        return self.alpha.detach() if self.per_head else None

    @classmethod
    def from_head_params(cls, arg, params):
        if arg != PER_HEAD:
            raise ValueError(f"normalizer: per-head parameters go with 'entmax:{PER_HEAD}', got 'entmax:{arg}'")
        return cls._bare(params)

    @classmethod
    def _bare(cls, alpha):
        """An instance without the option checks (a per-head alpha already checked when the user built it, or
        a fake tensor under torch.compile, whose values cannot be read)."""
        obj = cls.__new__(cls)
        object.__setattr__(obj, "alpha", alpha)
        return obj

    def kernel_head_params(self, Hq):
        """alpha - 1 per query head (the Triton hooks' ``a``; ``contract.Hooks.head_param``)."""
        if self.per_head:
            return self.alpha.detach().float() - 1.0
        return torch.full((Hq,), self.alpha - 1.0)

    def for_heads(self, h0, h1):
        return self._bare(self.alpha[h0:h1]) if self.per_head else self

    def _a(self, s: torch.Tensor):
        """alpha - 1, a float or a tensor broadcastable against scores s [..., heads..., rows, keys] whose dims
        between the first and the last two are the query heads (reference (B, Hq, L, S): Hq; torch-path chunk
        [bb, hc, G, bl, S']: hc x G)."""
        if not self.per_head:
            return self.alpha - 1.0
        heads = s.shape[1:-2]
        return (self.alpha.to(device=s.device, dtype=s.dtype) - 1.0).view(*heads, 1, 1)

    # ---------------------------------------------------------------------------- reference

    def reference_weights(self, s, allowed):
        a = self._a(s)
        x = torch.where(allowed, s * a, torch.full_like(s, NEG_INF))
        tau = entmax_threshold(s, allowed, self.alpha if not self.per_head else a + 1.0)
        p = torch.clamp(x - tau, min=0) ** (1.0 / a)
        return zero_disallowed(p, allowed)

    def reference_stats(self, s, allowed):
        a = self._a(s)
        return {"tau": entmax_threshold(s, allowed, a + 1.0 if self.per_head else self.alpha)[..., 0]}

    # ---------------------------------------------------------------------------- torch path

    def torch_stats(self, s, masked):
        a = self._a(s)
        if self.per_head:                       # one exponent per row: the solver on the full rows
            rows = (s * a).reshape(-1, s.shape[-1])
            e = (1.0 / a).expand(s.shape[:-1] + (1,)).reshape(-1, 1)
            return {"tau": _solve(rows, e)[0].view(s.shape[:-1] + (1,))}
        e = 1.0 / a
        tau, top = exact_threshold(s.reshape(-1, s.shape[-1]), lambda vals: _solve(vals * a, e))
        return {"tau": tau.view(s.shape[:-1] + (1,)), "_top": top}

    def torch_weights(self, s, st, masked):
        a = self._a(s)
        p = torch.clamp_(s * a - st["tau"], min=0).pow_(1.0 / a)     # +inf tau (empty row) gives 0
        return safe_div(p, rowsum(p))                                 # exact simplex

    def torch_sparse(self, s, st):
        if "_top" not in st:
            return None
        a = self._a(s)
        return scatter_top(s, st, lambda vals, st: torch.clamp_(vals * a - st["tau"], min=0).pow_(1.0 / a))

    def torch_dscores(self, s, p, dp, st):
        a = self._a(s)
        d = s * a - st["tau"]
        pos = d > 0
        u = torch.where(pos, torch.clamp(d, min=0) ** (1.0 / a - 1.0), torch.zeros_like(d))   # p^(2 - alpha)
        return u * (dp - safe_div(rowsum(u * dp), rowsum(u)))


def _solve(x: torch.Tensor, e):
    """(tau [n, 1], complete [n]) with ``sum_j max(x_j - tau, 0)^e = 1`` for rows x [n, m] (-inf = disallowed;
    an empty row gets +inf), e a float >= 1 or an [n, 1] tensor.

    Newton on ``G(t) = (sum_j (x_j - t)_+^e)^(1/e) - 1`` (the e-norm of (x - t)_+, minus 1) from the lower
    bound ``t = max x - 1``: G is convex and decreasing, so the iterates rise monotonically to the root (and
    G is linear in t for equal values: one step is exact there, where Newton on F = sum (x - t)_+^e - 1
    shrinks the gap only by 1 - 1/e per step far from the root); the Newton step is
    ``s1 (1 - s1^(-1/e)) / s2`` with ``s1 = sum (x - t)_+^e`` and ``s2 = sum (x - t)_+^(e-1)``. A row stops when
    its step is below 4 ulps of t (a step taken from just above the root, where rounding can put an iterate,
    is negative and as small); rows that stop leave the working set. ``complete``: the row's smallest value is
    not in the support (when x holds a row's largest values in descending order, as ``rows.exact_threshold``
    passes them, tau is then the whole row's)."""
    top = x.amax(1, keepdim=True)
    nonempty = top > NEG_INF
    y = x - finite_or_zero(top)                                               # max 0
    n = (y > NEG_INF).sum(1, keepdim=True).clamp(min=1).to(x.dtype)
    ee = torch.as_tensor(e, dtype=x.dtype, device=x.device).expand(top.shape)    # [n, 1]
    hi = -n ** (-1.0 / ee)                                                    # F(hi) <= 0
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    one = torch.ones((), dtype=x.dtype, device=x.device)
    tol = 4 * torch.finfo(x.dtype).eps
    tau = torch.full_like(top, -1.0)                                          # F(max - 1) >= 0
    rows = torch.arange(x.shape[0], device=x.device)
    yy, t, er, hr = y, tau, ee, hi
    for _ in range(MAX_ITERS):
        d = yy - t
        pos = d > 0
        dp = torch.where(pos, d, one)
        pe = torch.where(pos, torch.exp(er * torch.log(dp)), zero)           # (x - t)_+^e
        s1 = rowsum(pe)
        s2 = rowsum(pe / dp)                                                  # (x - t)_+^(e - 1)
        step = s1 * (1 - s1 ** (-1.0 / er)) / s2.clamp(min=torch.finfo(x.dtype).tiny)
        step = torch.where(s1 > 0, step, zero)                                # (no key above t: stop)
        t = torch.minimum(t + step, hr)
        tau[rows] = t
        going = (step > tol * t.abs().clamp(min=1)).squeeze(1)
        if not bool(going.any()):
            break
        rows, yy, t, er, hr = rows[going], yy[going], t[going], er[going], hr[going]
    tau = tau + finite_or_zero(top)
    tau = torch.where(nonempty, tau, torch.full_like(tau, float("inf")))
    return tau, tau[:, 0] >= x[:, -1]


def entmax_threshold(s: torch.Tensor, allowed: torch.Tensor, alpha) -> torch.Tensor:
    """The alpha-entmax threshold ``tau`` (units of x = (alpha - 1) s), shape ``s.shape[:-1] + (1,)``, ``+inf``
    for rows with no allowed key: the dense float64 reference, written independently of the fast paths (plain
    bisection to the precision of s's dtype, then one Newton step taken WITH autograd from the detached
    bisection result: its value is the root, its gradient the implicit-function one, ``dtau/dx_k = u_k /
    sum u`` with ``u = (x - tau)_+^(e - 1)``). ``alpha``: a float or a tensor broadcastable to s[..., :1]."""
    a = alpha - 1.0
    e = 1.0 / a
    x = torch.where(allowed, s * a, torch.full_like(s, NEG_INF))
    any_allowed = allowed.any(-1, keepdim=True)
    top = finite_or_zero(x.amax(-1, keepdim=True))
    lo, hi = (top - 1.0).detach(), top.detach()
    xd = x.detach()
    ed = e.detach() if isinstance(e, torch.Tensor) else e
    for _ in range(64 if s.dtype == torch.float64 else 40):  # F(lo) >= 0 > F(hi); width 2^-64: then Newton
        mid = (lo + hi) * 0.5
        f = rowsum(torch.clamp(xd - mid, min=0) ** ed) - 1
        lo, hi = torch.where(f >= 0, mid, lo), torch.where(f >= 0, hi, mid)
    d = x - lo
    pos = d > 0
    dc = torch.where(pos, d, torch.zeros_like(d))
    f = rowsum(dc ** e) - 1
    df = e * rowsum(torch.where(pos, dc ** (e - 1), torch.zeros_like(d)))
    tau = lo + f / torch.where(df > 0, df, torch.ones_like(df))
    return torch.where(any_allowed, tau, torch.full_like(tau, float("inf")))

