"""Taylor hooks: p_j = f_k(s_j) / Z with f_k(s) = sum_{m=0..k} s^m / m! (k even, so f_k > 0) and
Z = sum_j f_k(s_j); k = 2 is Based's f(s) = 1 + s + s^2/2 >= 1/2.

Scores arrive in natural units (score unit 1). f_k is bounded below by a positive number, so there is no
running max and no rescale: per tile l' = l + rowsum(f_k(s)), acc' = acc + f_k(s) @ v. Finalize: out = acc / Z,
stat z = Z (0 and out = 0 for empty rows). Disallowed keys (s = -inf in masked tiles) get f = 0, not f(-inf).

Backward (``kernels.backward``): w0 = 1/Z (0 for an empty row), p = f_k(s) / Z,
dS = f_k'(s) / Z * (dP - delta) with f_k' = f_{k-1} and delta = rowsum(dO * O).

The order k is a compile-time constant of the hooks themselves: the module-level hooks read the global
constexpr ``K`` (2), and `hooks_for_order(k)` copies the ones that read it with ``K = k`` in their own globals
(Triton puts a jit function's global constexpr values into its cache key, and the interpreter runs the copy
with its globals), so the forward and the backward kernels both see the order without a runtime argument or
``Hooks.consts``, and two orders never share a compiled kernel. f_k and f_k' by Horner:
f_k(s) = 1 + s (1 + s/2 (1 + s/3 (... (1 + s/k)))).
"""

import functools
import types

import triton
import triton.language as tl

from .contract import NoArgs, make_hooks
from .tiles import safe_inv

#: the forward's weights are f(s) * 2^-10 (exact): in fp16, f(s) up to 65504 * 2^10 (k = 2: |s| <= 11585)
#: reaches the tensor cores finite; out = acc / l is unchanged and the statistic z is l * 2^10
F_SCALE: tl.constexpr = tl.constexpr(2.0**-10)


@triton.jit
def taylor_poly(s, K: tl.constexpr):
    """f_K(s) = sum_{m=0..K} s^m / m! by Horner (K >= 0 a constexpr; f_0 = 1)."""
    f = tl.full(s.shape, 1.0, tl.float32)
    for m in tl.static_range(K, 0, -1):
        f = 1.0 + s * f * (1.0 / m)
    return f


#: the order k the module-level hooks compute (Based's 2); `hooks_for_order` rebinds it per order
K: tl.constexpr = tl.constexpr(2)


@triton.jit
def taylor_f_allowed(s, MASKED: tl.constexpr, K: tl.constexpr):
    """f_K(s) on allowed keys, 0 where s = -inf (masked tiles only; f(-inf) would be inf - inf). A NaN score
    stays NaN (the non-finite rule)."""
    if MASKED:
        ok = s != float("-inf")
        return tl.where(ok, taylor_poly(tl.where(ok, s, 0.0), K), 0.0)
    else:
        return taylor_poly(s, K)


@triton.jit
def update(s, m_i, l_i, thr, MASKED: tl.constexpr):
    p = taylor_f_allowed(s, MASKED, K) * F_SCALE                    # [BM, BN]
    return p, l_i, m_i, l_i + tl.sum(p, 1)


@triton.jit
def finalize(m_i, l_i, thr):
    return safe_inv(l_i), l_i * (1.0 / F_SCALE), l_i


@triton.jit
def bwd_rows(stat0, stat1, thr, g_sum):
    return safe_inv(stat0), stat0


@triton.jit
def bwd_weights(s, w0, w1, MASKED: tl.constexpr):
    return taylor_f_allowed(s, MASKED, K) * w0[:, None]


@triton.jit
def bwd_dscores(p, s, dp, delta, w0, w1):
    """dS = f_K'(s) / Z * (dP - delta), f_K' = f_{K-1}; p > 0 exactly on the allowed keys of non-empty rows."""
    fprime = tl.where(p > 0, taylor_poly(tl.where(p > 0, s, 0.0), K - 1), 0.0)         # [BM, BN]
    return fprime * w0[:, None] * (dp - delta[:, None])


def _with_constexprs(fn, **values):
    """A copy of the @triton.jit function ``fn`` whose module-level constexprs ``values`` are rebound (its own
    globals dict): what Triton compiles and caches per value (a global constexpr's value is part of a jit
    function's cache key), and what the interpreter runs."""
    py = fn.fn
    scope = dict(py.__globals__)
    scope.update({name: tl.constexpr(val) for name, val in values.items()})
    copy = types.FunctionType(py.__code__, scope, py.__name__, py.__defaults__, py.__closure__)
    copy.__qualname__, copy.__doc__, copy.__module__ = py.__qualname__, py.__doc__, py.__module__
    return triton.jit(copy)


def _hooks(order: int, update, bwd_weights, bwd_dscores):
    return make_hooks(name="taylor" if order == 2 else f"taylor{order}", unit=1.0, n_stats=1, update=update,
                      finalize=finalize, bwd_rows=bwd_rows, bwd_weights=bwd_weights, bwd_dscores=bwd_dscores)


@functools.lru_cache(maxsize=None)
def hooks_for_order(order: int):
    """The `contract.Hooks` of the Taylor map of even order ``order`` >= 2: the hooks that read ``K``, copied
    with ``K = order`` (cached: one set of functions, hence one compile of each kernel, per order)."""
    if order == 2:
        return HOOKS
    return _hooks(order, *(_with_constexprs(fn, K=order) for fn in (update, bwd_weights, bwd_dscores)))


#: Based's order 2
HOOKS = _hooks(2, update, bwd_weights, bwd_dscores)


def configure(normalizer, S: int):
    """(hooks, runtime args, scratch columns): the hooks of the normalizer's order."""
    return hooks_for_order(normalizer.k), NoArgs(), 0
