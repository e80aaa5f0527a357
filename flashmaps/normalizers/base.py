"""The normalizer contract and the one registry.

Attention for one query row is ``o = sum_j p_j v_j`` with ``p = N(s)``, a map from the row's scores to
weights. A normalizer is ONE unit: a subclass of :class:`Normalizer` in its own module (the built-in ones
in ``flashmaps/normalizers/<name>.py``, their Triton hooks in ``flashmaps/kernels/<name>.py``), holding

* its formula and options (the class docstring and dataclass fields), and its spec string
  (``from_spec`` / ``spec``: ``"topk:64"``);
* its float64 reference weights and row statistics (``reference_weights``, ``reference_stats``);
* the names of its row statistics and their values for a row with no allowed key (``stats``,
  ``empty_stats``; zero, one or two of them);
* its torch-path hooks (``torch_stats``, ``torch_weights``, ``torch_dscores``, optionally ``torch_sparse``)
  used by the CPU path's row-chunk loop, on the instance ``for_keys(S)`` returns for the call's S keys;
* its Triton hooks (``triton(S)``, from its kernels module's ``HOOKS`` / ``configure``);
* its rule for combining results over disjoint key sets (``merge``), or why there is none; a sparse unit's
  two-phase protocol (``two_phase``: ``threshold_candidates``, ``candidate_threshold``, ``torch_at_threshold``,
  ``kernel_threshold``, ``merge_at_threshold``; its gradients: ``candidate_threshold_grad``,
  ``torch_dscores_at_threshold``, ``kernel_at_threshold_grad``);
* optionally its score form (``score = "distance"``: ``-(n/2) ln(max(scale ||q - k||^2, tiny))`` instead of
  ``scale q.k``, honoured by every backend and the reference) and per-score noise (``stochastic`` and
  ``score_noise``: the call draws a seed like dropout's; the reference takes it as ``noise_seed``).

Everything else (the backends, tests, benchmarks, CLI, transformers names, docs) enumerates the registry:
:func:`register` a class and it is in. Users do the same from their own files (README, "Write your own
normalizer").

Conventions of the torch hooks (``s``: scores [..., S'] in the accumulation dtype, float32 or float64, -inf
exactly on disallowed keys; ``masked``: whether any key of the chunk may be disallowed; ``st``: the dict
``torch_stats`` returned, each entry [..., 1]; entries whose name starts with ``_`` stay in the chunk)::

    torch_stats(s, masked) -> st                 row statistics from full score rows (threshold pass)
    torch_weights(s, st, masked) -> p            normalized weights, 0 on disallowed keys and empty rows
    torch_dscores(s, p, dp, st) -> ds            dL/ds from dp = dL/dp (backward), 0 off the support
    torch_sparse(s, st) -> (idx, w) | None       optional: the only keys of each row that can be nonzero
                                                 and their weights (the forward scatters them)
    torch_native_forward / torch_native_backward optional: a whole call through a native op (softmax: torch's
                                                 CPU flash-attention op) where it is exact; None otherwise
"""

from __future__ import annotations

import dataclasses
import re
import sys
from importlib import import_module
from typing import ClassVar

import torch

__all__ = ["Normalizer", "register", "unregister", "registry", "names", "get", "parse", "defaults", "examples",
           "table"]

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """Base class of every normalizer (see the module docstring for the contract).

    Subclasses are frozen dataclasses whose fields are the options, set the class attributes below, and
    implement at least ``reference_weights`` and the three torch hooks."""

    #: registry name ("softmax"); also the prefix of the spec string and of the transformers name
    name: ClassVar[str] = ""
    #: names of the per-row statistics (each (B, Hq, L)) the forward returns (``return_stats=True``)
    stats: ClassVar[tuple[str, ...]] = ()
    #: the value of each statistic for a row with no allowed key (same order as ``stats``)
    empty_stats: ClassVar[tuple[float, ...]] = ()
    #: True if the weights can contain exact zeros for allowed keys
    sparse: ClassVar[bool] = False
    #: True if every row with an allowed key sums to one (tests check it)
    sums_to_one: ClassVar[bool] = True
    #: the module with the Triton hooks (``HOOKS`` and optionally ``configure``), or None (torch path only)
    kernels: ClassVar[str | None] = None
    #: how the spec is written in messages and docs ("topk:<k>"; default: the name)
    spec_help: ClassVar[str] = ""
    #: the weights p_j in one line, for the docs' table (default: the docstring's first line)
    formula: ClassVar[str] = ""
    #: how results over disjoint key sets combine, in words, for the docs' table
    merge_rule: ClassVar[str] = "none"
    #: position in listings (softmax first)
    order: ClassVar[int] = 100
    #: the forms ``attention(..., form=)`` can run this normalizer in: "quadratic" (the tile loop) and, for a
    #: polynomial map f, "linear" (``flashmaps.linear``: chunked linear attention with a fixed-size state)
    forms: ClassVar[tuple[str, ...]] = ("quadratic",)
    #: with "linear" in ``forms``: (c0, c1, c2) of ``f(s) = c0 + c1 s + c2 s^2`` with ``p_j = f(s_j) / sum f``
    linear_coeffs: ClassVar[tuple[float, float, float] | None] = None
    #: the form of the raw score: "dot" (``scale * q.k``) or "distance" (``-(n/2) ln(max(scale ||q - k||^2,
    #: tiny))`` with ``n = score_power`` and tiny float32's smallest normal; harmonic); softcap, mask bias and
    #: the normalizer follow as for any score. Every backend and the reference honour it.
    score: ClassVar[str] = "dot"
    #: True if the weights depend on random score noise drawn per call (``score_noise``; gumbel): the call
    #: takes a seed like dropout (drawn from torch's default generator, so ``torch.manual_seed`` reproduces a
    #: call), two unseeded calls differ, and the reference needs the seed (``reference.attention(noise_seed=)``)
    stochastic: ClassVar[bool] = False

    @property
    def score_power(self) -> float:
        """The exponent n of the distance form (``score = "distance"``): weights proportional to d^-n."""
        return 1.0

    def score_noise(self, seed: int, bh: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Stochastic normalizers: the noise (natural score units, float32) added to the scores after the mask
        bias, for seed ``seed``, heads ``bh = b * Hq + h``, query rows ``i`` and keys ``j`` (int64 tensors,
        broadcast together); the same numbers as the Triton hook ``Hooks.noise``."""
        raise NotImplementedError(f"{type(self).__name__} is not stochastic (no score_noise)")

    def score_limit(self, dtype: torch.dtype) -> float:
        """The largest ``|score|`` for which the weights of inputs of ``dtype`` stay finite on every backend
        (the non-finite rule: beyond it a row may be NaN; a NaN or +inf score always makes its row NaN)."""
        return float("inf")

    # -------------------------------------------------------------------------------- spec and options

    @classmethod
    def from_spec(cls, arg: str | None, *, argname: str = "normalizer") -> "Normalizer":
        """The instance for the part of a spec after ``name:`` (None when there is none)."""
        if arg is not None:
            raise ValueError(f"{argname}: normalizer {cls.name!r} takes no argument, got '{cls.name}:{arg}'")
        return cls()

    @property
    def spec(self) -> str:
        """The string that :func:`parse` turns back into this normalizer."""
        return self.name

    @classmethod
    def default(cls) -> "Normalizer":
        """The instance benchmarks, ``compare`` and the transformers name ``fmaps_<name>`` use by default."""
        return cls()

    @classmethod
    def examples(cls) -> list["Normalizer"]:
        """Representative instances for the test grid (a few option values, not a full product)."""
        return [cls.default()]

    def __str__(self) -> str:  # "topk:64"
        return self.spec

    def for_keys(self, S: int) -> "Normalizer":
        """The instance a call over S keys computes with (default: itself). A normalizer whose default option
        depends on the key count resolves it here (sigmoid's ``b = -log S``); the torch path calls it on the
        full key count before its chunk loop (the hooks see chunks of keys), ``triton(S)`` gets S itself."""
        return self

    # -------------------------------------------------------------------------------- reference

    def reference_weights(self, s: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Dense weights ``p`` (shape of ``s``, last dim = keys) from scores ``s`` and a bool ``allowed`` of
        the same shape, written independently of the fast paths. Disallowed keys get 0; a row with no
        allowed key is all 0."""
        raise NotImplementedError(f"{type(self).__name__} must implement reference_weights")

    def reference_stats(self, s: torch.Tensor, allowed: torch.Tensor) -> dict[str, torch.Tensor]:
        """The row statistics {name: s.shape[:-1]} computed densely (the empty-row values included)."""
        if self.stats:
            raise NotImplementedError(f"{type(self).__name__} must implement reference_stats")
        return {}

    # -------------------------------------------------------------------------------- torch path

    def torch_stats(self, s: torch.Tensor, masked: bool) -> dict:
        raise NotImplementedError(f"{type(self).__name__} has no torch-path hooks (torch_stats)")

    def torch_weights(self, s: torch.Tensor, st: dict, masked: bool) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no torch-path hooks (torch_weights)")

    def torch_dscores(self, s: torch.Tensor, p: torch.Tensor, dp: torch.Tensor, st: dict) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no torch-path backward (torch_dscores)")

    def torch_sparse(self, s: torch.Tensor, st: dict):
        return None

    def torch_native_forward(self, q, k, v, *, mask, causal, scale, softcap, dropout_p):
        """Optional: run the whole call with a native op when it computes exactly this normalizer
        (-> (out (B, Hq, L, Dv) in v's dtype, [stats (B, Hq, L)])), else None (the chunk loop runs)."""
        return None

    def torch_native_backward(self, dout, q, k, v, out, stats, *, mask, causal, scale, softcap, dropout_p):
        """Optional: (dq, dk, dv) natively, exactly when ``torch_native_forward`` ran natively; else None."""
        return None

    # -------------------------------------------------------------------------------- Triton

    @property
    def has_triton(self) -> bool:
        """Whether this normalizer has Triton kernels (``kernels`` set, or ``triton`` overridden)."""
        return self.kernels is not None or type(self).triton is not Normalizer.triton

    def triton(self, S: int):
        """(hooks, runtime args, scratch columns) of the Triton kernels for a call over S keys: the kernels
        module's ``configure(self, S)`` if it has one, else ``(HOOKS, NoArgs(), 0)``."""
        if self.kernels is None:
            raise NotImplementedError(
                f"the normalizer {self.spec!r} has no Triton kernels (set `kernels` to the module with its "
                "HOOKS); use backend='torch'"
            )
        mod = sys.modules.get(self.kernels) or import_module(self.kernels)
        configure = getattr(mod, "configure", None)
        if configure is not None:
            return configure(self, S)
        return mod.HOOKS, _no_args(), 0

    # -------------------------------------------------------------------------------- merging

    def merge(self, outs: list[torch.Tensor], stats: list[dict]) -> tuple[torch.Tensor, dict]:
        """Combine results over DISJOINT key sets of the same queries into the result over their union:
        ``outs[i]`` (B, Hq, L, Dv) and ``stats[i]`` {name: (B, Hq, L)} from ``return_stats=True``. Returns
        (out in outs[0]'s dtype, stats), with torch ops (autograd flows through the given tensors)."""
        raise NotImplementedError(f"the normalizer {self.spec!r} has no merge rule")

    # -------------------------------------------------------------------------------- statistic gradients

    def stat_delta(self, stats: list, stat_grads: list) -> "torch.Tensor | None":
        """Gradients through the row statistics (what makes :meth:`merge` differentiable w.r.t. q and k).

        From the statistics ``stats`` and the loss's gradients ``stat_grads`` w.r.t. them (lists of (B, Hq, L)
        in ``self.stats`` order) -> the shift ``d`` (B, Hq, L) of the backward's row term: with
        ``delta' = delta - d`` in place of ``delta = rowsum(dO * O)``, the backward rule (``torch_dscores``,
        the Triton ``bwd_dscores``) adds ``sum_n g_n dstat_n/ds_j`` to ``dS_j``. Softmax:
        ``dlse/ds_j = p_j`` and ``dS_j = p_j (dP_j - delta)``, so ``d = g_lse``; taylor: ``dZ/ds_j = f'(s_j)``
        and ``dS_j = f'(s_j)/Z (dP_j - delta)``, so ``d = Z g_Z``. ``d`` must be finite on rows with no
        allowed key (0 there). The backends apply it generically (Triton: after the preprocess kernel; the
        torch path: as one extra key with ``p = 1``, ``dp = -d``, so ``torch_dscores`` may couple the keys of
        a row only through ``rowsum(p * dp)``).

        None (the default): the statistics carry no gradient (thresholds: entmax's tau, top-k's k-th score,
        whose dependence on the scores is not of this form); ``attention(..., return_stats=True)`` then returns
        them non-differentiable."""
        return None

    @property
    def has_stat_grads(self) -> bool:
        """Whether the row statistics carry gradients (the class overrides :meth:`stat_delta`)."""
        return bool(self.stats) and type(self).stat_delta is not Normalizer.stat_delta
    # -------------------------------------------------------------------------------- the two-phase protocol

    # A sparse unit's threshold is global (it depends on every key), so independent partial results do not
    # merge. With ``two_phase = True`` a unit merges parts in two phases (``flashmaps.threshold_candidates``,
    # ``flashmaps.global_threshold``, ``attention(..., threshold=)``, ``flashmaps.merge(..., threshold=)``; the
    # backends' split-KV decoding uses the same hooks):
    #
    #   1. each part reports candidates: scores of its own keys that contain every key of the union's support
    #      (``threshold_candidates``: adding keys never lowers the threshold, so the union's support lies in
    #      the union of the parts' local supports / local top-k);
    #   2. ``candidate_threshold`` over the concatenated candidates is the union's threshold (a dict of [.., 1]
    #      entries; the full score row is a valid candidate set);
    #   3. each part computes its output AT that threshold (``torch_at_threshold``; the Triton forward with
    #      ``Static.GIVEN_THR`` loads ``kernel_threshold``) and reports the given threshold as its statistic;
    #   4. ``merge_at_threshold`` combines the parts (a sum, or log-sum-exp for top-k);
#   5. optionally gradients through all of it (``has_threshold_grads``, the hooks at the end of this section).

    #: True if the unit implements the two-phase protocol below (the sparse units)
    two_phase: ClassVar[bool] = False

    def threshold_candidates(self, s: torch.Tensor) -> torch.Tensor:
        """Phase 1: from a part's score rows ``s`` [..., S] (-inf = disallowed) the candidates [..., m] (natural
        score units, -inf padding, any order) that contain every key of the union's support."""
        raise NotImplementedError(f"the normalizer {self.spec!r} has no two-phase protocol")

    def candidate_threshold(self, c: torch.Tensor) -> dict:
        """Phase 1 -> 2: the union's threshold {name: [..., 1]} from the concatenated candidates [..., M]."""
        raise NotImplementedError(f"the normalizer {self.spec!r} has no two-phase protocol")

    def torch_at_threshold(self, s: torch.Tensor, thr: dict, masked: bool):
        """Phase 2 on the torch path: (row statistics {name: [..., 1]}, weights [..., S']) of a part's scores
        at the union's threshold ``thr`` ({name: [..., 1]}); the statistics report the given threshold."""
        raise NotImplementedError(f"the normalizer {self.spec!r} has no two-phase protocol")

    def kernel_threshold(self, thr: dict) -> torch.Tensor:
        """Phase 2 in the Triton forward: the (B, Hq, L) threshold in kernel units (``Static.GIVEN_THR``)."""
        raise NotImplementedError(f"the normalizer {self.spec!r} has no two-phase protocol")

    def merge_at_threshold(self, outs: list, stats: list, thr: dict) -> tuple[torch.Tensor, dict]:
        """Phase 2 -> union: combine the parts' results at the union's threshold ``thr`` ({name: (B, Hq, L)})."""
        raise NotImplementedError(f"the normalizer {self.spec!r} has no two-phase protocol")

    # Gradients through the protocol (optional; ``has_threshold_grads``): the merged output's gradients w.r.t. q
    # and every part's k, v equal those of the call over the union. The threshold is an ordinary tensor of the
    # autograd graph: ``flashmaps.threshold_candidates`` differentiates its candidates (scores of the part's keys,
    # recomputed under autograd: ``threshold_candidates`` must be torch ops), ``global_threshold`` its threshold
    # (``candidate_threshold_grad``), phase 2 its output w.r.t. q, k, v AND the threshold (the two hooks below,
    # one per backend), and the merge is torch ops. ``g_st`` holds the gradients of the part's own statistics
    # (those ``thr`` does not give: top-k's lse; None when unused); the shapes are [..., 1] rows in the torch hooks.

    def candidate_threshold_grad(self, c: torch.Tensor, thr: dict, g_thr: dict) -> torch.Tensor:
        """The gradient [..., M] w.r.t. the candidates ``c`` of a loss whose gradients w.r.t. the entries of
        ``thr = candidate_threshold(c)`` are ``g_thr`` ({name: [..., 1]}, only the entries that have one)."""
        raise NotImplementedError(f"the normalizer {self.spec!r} has no gradients through its two-phase protocol")

    def torch_dscores_at_threshold(self, s, p, dp, thr: dict, st: dict, g_st: dict):
        """Phase 2's backward rule on the torch path: (dL/ds [..., S'], {name: dL/dthr[name] [..., 1]}) of a part
        with scores ``s``, weights ``p`` and statistics ``st`` from ``torch_at_threshold(s, thr)``, and ``dp =
        dL/dp``, counting the threshold as an input (the implicit dependence of the union's threshold on the
        scores is the candidates' gradient, not this part's)."""
        raise NotImplementedError(f"the normalizer {self.spec!r} has no gradients through its two-phase protocol")

    def kernel_at_threshold_grad(self, dout, saved: dict, st: dict, g_st: dict):
        """Phase 2's backward on the Triton path: from dO (B, Hq, L, Dv), the forward's saved extras (``saved``:
        ``triton_path.Forward.saved`` with ``save_extras=True``) and the part's statistics ``st`` {name:
        (B, Hq, L)} -> (``delta_shift`` (B, Hq, L) or None for ``launch_backward``, which then gives the direct
        dq, dk, dv at the fixed threshold; {name: dL/dthr[name] (B, Hq, L)})."""
        raise NotImplementedError(f"the normalizer {self.spec!r} has no gradients through its two-phase protocol")

    @property
    def has_threshold_grads(self) -> bool:
        """Whether gradients flow through the two-phase protocol (the unit overrides the three hooks above)."""
        cls = type(self)
        return self.two_phase and all(getattr(cls, n) is not getattr(Normalizer, n) for n in
                                      ("candidate_threshold_grad", "torch_dscores_at_threshold",
                                       "kernel_at_threshold_grad"))

    # -------------------------------------------------------------------------------- per-head tensors

    # A call may carry per-query-head tensors beside the spec string (the custom ops take the normalizer as
    # a string): the normalizer's own parameters (``head_params``: Entmax's per-head alpha) and attention
    # sinks (``sinks``: one logit per head in the denominator). Defaults: neither.

    def head_params(self) -> "torch.Tensor | None":
        """This instance's per-head parameters, (Hq,) float (e.g. a per-head alpha), or None. When not None,
        ``spec`` names the class only ("entmax:per_head") and the tensor travels beside it to the backends,
        which rebuild the instance with :meth:`from_head_params` and take each chunk's heads with
        :meth:`for_heads`."""
        return None

    @classmethod
    def from_head_params(cls, arg: str | None, params: torch.Tensor) -> "Normalizer":
        """The instance for the spec argument ``arg`` and the per-head parameters ``params`` (Hq,)."""
        raise ValueError(f"the normalizer {cls.name!r} takes no per-head parameters")

    def kernel_head_params(self, Hq: int) -> "torch.Tensor":
        """The (Hq,) float tensor the Triton kernels load per query head when the hooks set ``head_param``
        (``kernels.contract.Hooks``); only called then."""
        raise NotImplementedError(f"the normalizer {self.spec!r} has no kernel head parameters")

    def for_heads(self, h0: int, h1: int) -> "Normalizer":
        """The instance restricted to query heads [h0, h1) of the call (the torch path's chunks); the torch
        hooks then see scores whose dims between the first and the last two are those heads."""
        return self

    def sink_stats(self, stats: list, sinks: torch.Tensor):
        """Attention sinks: one extra logit ``sink_h`` per query head in the denominator, with a zero value
        vector. From the row statistics of the plain call (list of (B, Hq, L)) and ``sinks`` (Hq,) ->
        (the statistics of the call with the sink, ``w`` (B, Hq, L) with ``out_sink = w * out``). The
        backends' ordinary backward, given those statistics and ``out_sink``, is exact for the call with the
        sink. None (the default): sinks are not defined for this normalizer."""
        return None

    def sink_coef(self, stats: list, sinks: torch.Tensor) -> torch.Tensor:
        """``c`` (B, Hq, L) from the statistics of the call with the sink: ``dL/dsink_h = -sum_{b,i} c *
        rowsum(dO * out_sink)`` (softmax: the sink's own weight ``exp(sink_h - lse)``)."""
        raise NotImplementedError(f"the normalizer {self.spec!r} has no attention sinks")


_NO_ARGS: list = []


def _no_args():
    """The one ``kernels.contract.NoArgs()`` (imported on first use: the torch path needs no Triton)."""
    if not _NO_ARGS:
        from ..kernels.contract import NoArgs

        _NO_ARGS.append(NoArgs())
    return _NO_ARGS[0]


# ----------------------------------------------------------------------------------------------------
# the registry

_REGISTRY: dict[str, type[Normalizer]] = {}


def register(cls: type[Normalizer] | None = None, *, replace: bool = False):
    """Add a normalizer class to the registry under ``cls.name`` (usable as ``@register`` or
    ``@register(replace=True)``). Registering another class under a taken name raises unless ``replace``."""
    if cls is None:
        return lambda c: register(c, replace=replace)
    if not (isinstance(cls, type) and issubclass(cls, Normalizer)) or cls is Normalizer:
        raise TypeError("register(cls): cls must be a subclass of flashmaps.Normalizer")
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:
        raise TypeError(f"register({cls.__name__}): decorate it with @dataclasses.dataclass(frozen=True)")
    if not isinstance(cls.name, str) or not _NAME.match(cls.name):
        raise ValueError(f"register({cls.__name__}): `name` must be lowercase letters, digits and '_', "
                         f"starting with a letter (e.g. 'relu2'), got {cls.name!r}")
    if len(cls.stats) != len(cls.empty_stats):
        raise ValueError(f"register({cls.__name__}): `stats` and `empty_stats` must have the same length")
    if cls.score not in ("dot", "distance"):
        raise ValueError(f"register({cls.__name__}): `score` must be 'dot' or 'distance', got {cls.score!r}")
    if len(cls.stats) > 2:
        raise ValueError(f"register({cls.__name__}): at most two row statistics, got {cls.stats}")
    if "linear" in cls.forms and (cls.linear_coeffs is None or len(cls.linear_coeffs) != 3 or len(cls.stats) != 1):
        raise ValueError(f"register({cls.__name__}): the 'linear' form needs linear_coeffs = (c0, c1, c2) of "
                         "f(s) = c0 + c1 s + c2 s^2 and one row statistic (the normalizer Z)")
    old = _REGISTRY.get(cls.name)
    if old is not None and old is not cls and not replace and old.__qualname__ != cls.__qualname__:
        raise ValueError(f"register({cls.__name__}): the name {cls.name!r} is taken by {old.__module__}."
                         f"{old.__qualname__}; choose another name or pass replace=True")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a registered normalizer (user-defined ones; tests)."""
    _REGISTRY.pop(name, None)


def registry() -> dict[str, type[Normalizer]]:
    """name -> class of every registered normalizer, in listing order (softmax first)."""
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (kv[1].order, kv[0])))


def names() -> list[str]:
    """The registered normalizer names, in listing order."""
    return list(registry())


def get(name: str) -> type[Normalizer]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown normalizer {name!r}; known: {_known()}") from None


def defaults() -> list[Normalizer]:
    """One default instance of every registered normalizer (``Normalizer.default()``), in listing order."""
    return [cls.default() for cls in registry().values()]


def examples() -> list[Normalizer]:
    """The representative instances of every registered normalizer (``Normalizer.examples()``): the grid
    tests run every backend over."""
    return [norm for cls in registry().values() for norm in cls.examples()]


def table() -> str:
    """The Markdown table of the registered normalizers (the README's, generated from the units)."""
    lines = ["| normalizer | weights `p_j` for row scores `s` | row statistics | sparse | merging partial results "
             "| Triton |", "|---|---|---|---|---|---|"]
    for cls in registry().values():
        inst = cls.default()
        formula = cls.formula or (cls.__doc__ or "").strip().splitlines()[0]
        stats = ", ".join(f"`{s}`" for s in cls.stats) or "none"
        lines.append(f"| `{cls.spec_help or cls.name}` | {formula} | {stats} | {'yes' if cls.sparse else 'no'} | "
                     f"{cls.merge_rule} | {'yes' if inst.has_triton else 'no'} |")
    return "\n".join(lines)


def _known() -> str:
    return ", ".join(f"'{cls.spec_help or cls.name}'" for cls in registry().values())


def parse(normalizer: "str | Normalizer", *, argname: str = "normalizer", head_params=None) -> Normalizer:
    """Turn a spec string (``"softmax"``, ``"topk:64"``; the part after ``:`` is the class's to parse) or a
    Normalizer instance into an instance. Raises ValueError/TypeError naming ``argname`` otherwise."""
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
            f"{argname} must be a string ({_known()}) or a flashmaps Normalizer, got {type(normalizer).__name__}"
        )
    text = normalizer.strip().lower()
    name, sep, arg = text.partition(":")
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"{argname}: unknown normalizer {normalizer!r}; known: {_known()}")
    if head_params is not None:                                   # (Normalizer.head_params)
        return cls.from_head_params(arg.strip() if sep else None, head_params)
    return cls.from_spec(arg.strip() if sep else None, argname=argname)
