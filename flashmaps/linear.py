"""The linear-time form of polynomial attention (Based's Taylor map), its cost model and a decoding state.

A normalizer whose weights are ``p_j = f(s_j) / Z`` with a polynomial ``f(s) = c0 + c1 s + c2 s^2`` (its
``linear_coeffs``; taylor: ``(1, 1, 1/2)``) and whose ``forms`` include ``"linear"`` can run as linear
attention: ``f(q'.k) = phi_q(q') . phi_k(k)`` for the feature maps below, so a causal call keeps one
fixed-size state instead of the (L, S) score matrix. Same function as the quadratic tile loop (not an
approximation); only the order of the sums differs.

Glossary (the whole module uses these names):

    B, Hq, Hkv, G, Gm  batch, query heads, key/value heads, group size G = Hq // Hkv; Gm = G when a key
                       mask differs between the query heads of one group, else 1 (the state is shared)
    L, S, D, Dv        query length, key length, q/k head dim, v head dim
    q' = scale * q     s_ij = q'_i . k_j
    P                  the D(D+1)/2 pairs (a, b) with a <= b (the symmetry of x x^T)
    phi(x)             [1, x, x_a x_b over P]: F = 1 + D + D(D+1)/2 features
    w                  [c0, c1 (D times), c2 w_ab over P] with w_ab = 1 if a == b else 2, so that
                       phi(q') . (w * phi(k)) = c0 + c1 s + c2 (q'.k)^2 = f(s)   (phi_q = w * phi, phi_k = phi)
    v1 = [v, 1]        (.., Dv+1): the last column carries the normalizer Z
    U                  the running state sum_j phi(k_j) v1_j^T, [B, Hkv, Gm, F, Dv+1] in the acc dtype:
                       orders 0, 1, 2 of the issue (Dv, D x Dv, D(D+1)/2 x Dv) plus the normalizer row
    y_i = [N_i, Z_i]   phi(q'_i) (w * U)  +  sum_{j in the diagonal block} f(s_ij) v1_j;   o_i = N_i / Z_i
    chunk C            query rows [i0, i1) of one step; their diagonal block is the keys [a, b) that some
                       but maybe not all of them see (causal), masked there; keys [0, a) are in U

Causal schedule (``off`` = 0 for "upper_left", S - L for "lower_right"; row i sees keys j <= i + off):
the keys [0, clamp(off)) enter U first; chunk [i0, i1) has the diagonal block [clamp(i0 + off),
clamp(i1 + off)), which enters U after the chunk's rows are done. Non-causal: every key enters U first.

Backward (``_LinearFn``), with ``dy_i = [dO_i, -delta_i] / Z_i`` and ``delta_i = dO_i . o_i``: the
gradient of plain linear attention ``y = phi(q') (w * U)``: ``dphi(q') = dy (w * U)^T`` (a forward pass
recomputing U), ``dphi(k_j) = (w * W) v1_j`` and ``dv1_j = (w * W)^T phi(k_j)`` with the reverse state
``W = sum_i phi(q'_i) dy_i^T`` over
the rows that see key j in full (a reverse pass); diagonal blocks through ``f'(s) = c1 + 2 c2 s``. No
per-chunk state is stored: memory is O(F Dv + C (F + S_block)) beyond the inputs and outputs, whatever L.

Masks: causal, and bool key-padding masks (one allowed-set per (batch, head), the same for every query row:
a (B, Hq|1, 1, S) mask). A float mask adds a bias inside f (not separable), a dense mask has no shared
state, softcap makes f non-polynomial and dropout acts per (i, j) weight: these refuse the linear form.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .normalizers import Normalizer, parse

__all__ = ["attention", "choose_form", "costs", "FormChoice", "TaylorState", "FORMS", "CHUNK", "features",
           "feature_weights", "n_features"]

FORMS = ("auto", "quadratic", "linear")
#: query rows per step of the torch path's chunk loop (tests shrink it to put chunk boundaries at awkward L)
CHUNK = 128


# ----------------------------------------------------------------------------------------------------
# feature maps


def n_features(D: int) -> int:
    """F = 1 + D + D(D+1)/2."""
    return 1 + D + D * (D + 1) // 2


def features(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = [1, x, x_a x_b over the pairs a <= b (row-major: (0, 0..D-1), (1, 1..D-1), ...)]:
    [..., D] -> [..., F] (glossary). Written slice by slice (D products of contiguous runs, no gather)."""
    D = x.shape[-1]
    out = x.new_empty((*x.shape[:-1], n_features(D)))
    out[..., 0] = 1
    out[..., 1:1 + D] = x
    o = 1 + D
    for a in range(D):  # the pairs (a, a..D-1)
        torch.mul(x[..., a:a + 1], x[..., a:], out=out[..., o:o + D - a])
        o += D - a
    return out


def feature_weights(D: int, coeffs, dtype, device) -> torch.Tensor:
    """w (F,) with phi(q') . (w * phi(k)) = c0 + c1 s + c2 s^2: [c0, c1 (D times), c2 w_ab over the pairs]
    with w_ab = 1 on the diagonal and 2 off it (x x^T is symmetric)."""
    c0, c1, c2 = coeffs
    ia, ib = torch.triu_indices(D, D, device=device)  # the pairs a <= b, in the order of features()
    w = torch.cat([torch.tensor([c0] + [c1] * D, dtype=torch.float64, device=device),
                   torch.where(ia == ib, c2, 2.0 * c2).to(torch.float64)])
    return w.to(dtype)


def _features_grad(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """d/dx of ``(features(x) * g).sum()``: [..., D] from g [..., F]. The pair (a, b) adds g_ab x_b to
    dx_a and g_ab x_a to dx_b (2 g_aa x_a on the diagonal)."""
    D = x.shape[-1]
    dx = g[..., 1:1 + D].clone()
    o = 1 + D
    for a in range(D):
        ga = g[..., o:o + D - a]  # the pairs (a, a..D-1)
        o += D - a
        dx[..., a] += (ga * x[..., a:]).sum(-1)
        dx[..., a:] += ga * x[..., a:a + 1]
    return dx


# ----------------------------------------------------------------------------------------------------
# the chunk schedule and the problem


class _Problem(NamedTuple):
    q5: torch.Tensor  # (B, Hkv, G, L, D) view, input dtype
    k: torch.Tensor  # (B, Hkv, S, D), input dtype
    v: torch.Tensor  # (B, Hkv, S, Dv), input dtype
    km: torch.Tensor | None  # (B, Hkv, Gm, S) bool key mask (True = may attend) or None
    off: int | None  # causal offset (row i sees j <= i + off), None = not causal
    scale: float
    coeffs: tuple[float, float, float]
    acc: torch.dtype
    chunk: int
    w: torch.Tensor  # (F, 1) feature weights (feature_weights)

    @property
    def gm(self) -> int:
        return 1 if self.km is None else self.km.shape[2]


def _schedule(pb: _Problem):
    """(prefix end a0, [(i0, i1, a, b)]): keys [0, a0) enter U first; chunk rows [i0, i1), diagonal [a, b)."""
    L, S = pb.q5.shape[3], pb.k.shape[2]

    def clamp(x):
        return min(S, max(0, x))

    steps = []
    for i0 in range(0, L, pb.chunk):
        i1 = min(L, i0 + pb.chunk)
        a, b = (S, S) if pb.off is None else (clamp(i0 + pb.off), clamp(i1 + pb.off))
        steps.append((i0, i1, a, b))
    return (S if pb.off is None else clamp(pb.off)), steps


def _keys(pb: _Problem, j0: int, j1: int):
    """Keys [j0, j1): k [B, Hkv, 1, n, D], v1 [B, Hkv, 1, n, Dv+1], the masked v1 [B, Hkv, Gm, n, Dv+1] and
    the key mask [B, Hkv, Gm, 1, n] (or None)."""
    kb = pb.k[:, :, None, j0:j1].to(pb.acc)
    vb = pb.v[:, :, None, j0:j1].to(pb.acc)
    v1 = torch.cat([vb, torch.ones_like(vb[..., :1])], -1)
    if pb.km is None:
        return kb, v1, v1, None
    km = pb.km[:, :, :, None, j0:j1]  # [B, Hkv, Gm, 1, n]
    return kb, v1, v1 * km.transpose(-1, -2), km


def _rows(pb: _Problem, i0: int, i1: int) -> torch.Tensor:
    return pb.q5[:, :, :, i0:i1].to(pb.acc) * pb.scale  # q' [B, Hkv, G, C, D]


def _diag(pb: _Problem, qc, kb, km, i0, i1, a, b):
    """Scores s [B, Hkv, G, C, n] of a diagonal block and where they are allowed (bool, broadcastable)."""
    s = qc @ kb.transpose(-1, -2)  # [B, Hkv, G, C, n]
    i = torch.arange(i0, i1, device=s.device)[:, None]
    j = torch.arange(a, b, device=s.device)[None, :]
    allowed = j <= i + pb.off  # [C, n]
    if km is not None:
        allowed = allowed & km  # [B, Hkv, Gm, C, n]
    return s, allowed


def _f(s, coeffs):
    c0, c1, c2 = coeffs
    return c0 + s * (c1 + c2 * s)


def _fprime(s, coeffs):
    return coeffs[1] + 2.0 * coeffs[2] * s


def _add_state(U, pb: _Problem, j0: int, j1: int):
    """U += sum over keys [j0, j1) of phi(k_j) v1_j^T (masked keys add nothing), in blocks of ``chunk``."""
    for c0 in range(j0, j1, pb.chunk):
        kb, _, vm, _ = _keys(pb, c0, min(j1, c0 + pb.chunk))
        U += features(kb).transpose(-1, -2) @ vm  # [B, Hkv, Gm, F, Dv+1]
    return U


def _new_state(pb: _Problem):
    B, Hkv, _, _, D = pb.q5.shape
    return torch.zeros(B, Hkv, pb.gm, n_features(D), pb.v.shape[3] + 1, dtype=pb.acc, device=pb.q5.device)


def _forward(pb: _Problem):
    """-> (out [B, Hkv, G, L, Dv] acc dtype, z [B, Hkv, G, L])."""
    B, Hkv, G, L, _ = pb.q5.shape
    Dv = pb.v.shape[3]
    out = torch.empty(B, Hkv, G, L, Dv, dtype=pb.acc, device=pb.q5.device)
    z = torch.empty(B, Hkv, G, L, dtype=pb.acc, device=pb.q5.device)
    a0, steps = _schedule(pb)
    U = _add_state(_new_state(pb), pb, 0, a0)
    for i0, i1, a, b in steps:
        qc = _rows(pb, i0, i1)
        y = features(qc) @ (pb.w * U)  # [B, Hkv, G, C, Dv+1]
        if b > a:
            kb, v1, _, km = _keys(pb, a, b)
            s, allowed = _diag(pb, qc, kb, km, i0, i1, a, b)
            y = y + torch.where(allowed, _f(s, pb.coeffs), 0.0) @ v1
            U = _add_state(U, pb, a, b)
        zc = y[..., Dv]
        out[:, :, :, i0:i1] = y[..., :Dv] / torch.where(zc > 0, zc, 1.0)[..., None]
        z[:, :, :, i0:i1] = zc
    return out, z


def _sum_to(x: torch.Tensor, gm: int) -> torch.Tensor:
    """Sum the G query heads of x [B, Hkv, G, ...] down to the state's Gm (1 or G)."""
    return x.sum(2, keepdim=True) if gm == 1 else x


def _backward(pb: _Problem, out5, z5, dout5):
    """(dq [B, Hkv, G, L, D], dk [B, Hkv, S, D], dv [B, Hkv, S, Dv]) in the acc dtype (module docstring)."""
    Dv = pb.v.shape[3]

    def rows(i0, i1):  # q' and dy = [dO, -delta] / Z (0 for an empty row) of rows [i0, i1): [B, Hkv, G, C, *]
        do = dout5[:, :, :, i0:i1].to(pb.acc)
        z = z5[:, :, :, i0:i1, None]
        delta = (do * out5[:, :, :, i0:i1].to(pb.acc)).sum(-1, keepdim=True)
        return _rows(pb, i0, i1), torch.cat([do, -delta], -1) / torch.where(z > 0, z, 1.0) * (z > 0)

    dq = torch.zeros(pb.q5.shape, dtype=pb.acc, device=pb.q5.device)
    dk = torch.zeros(pb.k.shape, dtype=pb.acc, device=pb.k.device)
    dv = torch.zeros(pb.v.shape, dtype=pb.acc, device=pb.v.device)
    a0, steps = _schedule(pb)

    # pass 1 (rows in order): dq' = dphi/dq' applied to dy (w * U)^T, plus the diagonal block's ds @ k
    U = _add_state(_new_state(pb), pb, 0, a0)
    for i0, i1, a, b in steps:
        qc, dyc = rows(i0, i1)
        dqc = _features_grad(qc, dyc @ (pb.w * U).transpose(-1, -2))
        if b > a:
            kb, v1, _, km = _keys(pb, a, b)
            s, allowed = _diag(pb, qc, kb, km, i0, i1, a, b)
            ds = torch.where(allowed, _fprime(s, pb.coeffs) * (dyc @ v1.transpose(-1, -2)), 0.0)
            dqc = dqc + ds @ kb
            U = _add_state(U, pb, a, b)
        dq[:, :, :, i0:i1] = dqc * pb.scale

    # pass 2 (rows in reverse): W = sum phi(q') dy^T over the rows that see a block in full
    W = torch.zeros_like(U)

    def keys_from_state(j0, j1):
        kb, _, vm, km = _keys(pb, j0, j1)
        wW = pb.w * W
        dphi = (vm @ wW.transpose(-1, -2)).sum(2)  # [B, Hkv, n, F]
        dvm = features(kb) @ wW  # [B, Hkv, Gm, n, Dv+1]
        dv1 = (dvm if km is None else dvm * km.transpose(-1, -2)).sum(2)
        dk[:, :, j0:j1] += _features_grad(kb[:, :, 0], dphi)
        dv[:, :, j0:j1] += dv1[..., :Dv]
        return kb, km

    for i0, i1, a, b in reversed(steps):
        qc, dyc = rows(i0, i1)
        if b > a:
            kb, km = keys_from_state(a, b)
            _, v1, _, _ = _keys(pb, a, b)
            s, allowed = _diag(pb, qc, kb, km, i0, i1, a, b)
            p = torch.where(allowed, _f(s, pb.coeffs), 0.0)  # [B, Hkv, G, C, n]
            ds = torch.where(allowed, _fprime(s, pb.coeffs) * (dyc @ v1.transpose(-1, -2)), 0.0)
            dk[:, :, a:b] += (ds.transpose(-1, -2) @ qc).sum(2)
            dv[:, :, a:b] += (p.transpose(-1, -2) @ dyc).sum(2)[..., :Dv]
        W += _sum_to(features(qc).transpose(-1, -2) @ dyc, pb.gm)
    for j0 in range(0, a0, pb.chunk):
        keys_from_state(j0, min(a0, j0 + pb.chunk))
    return dq, dk, dv


class _LinearFn(torch.autograd.Function):
    """out, z = linear-form attention; backward recomputes the states (nothing per chunk is saved)."""

    @staticmethod
    def forward(ctx, q, k, v, km, off, scale, coeffs, chunk):
        pb = _prepare(q, k, v, km, off, scale, coeffs, chunk)
        out5, z5 = _forward(pb)
        B, Hq, L = q.shape[:3]
        out = out5.view(B, Hq, L, v.shape[3]).to(v.dtype)
        z = z5.view(B, Hq, L)
        ctx.save_for_backward(q, k, v, km, out, z)
        ctx.args = (off, scale, coeffs, chunk)
        ctx.mark_non_differentiable(z)
        return out, z

    @staticmethod
    def backward(ctx, dout, _dz):
        q, k, v, km, out, z = ctx.saved_tensors
        pb = _prepare(q, k, v, km, *ctx.args)
        B, Hkv, G, L, D = pb.q5.shape
        dq, dk, dv = _backward(pb, out.unflatten(1, (Hkv, G)), z.unflatten(1, (Hkv, G)),
                               dout.unflatten(1, (Hkv, G)))
        return dq.view(q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def _prepare(q, k, v, km, off, scale, coeffs, chunk) -> _Problem:
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    Hkv = k.shape[1]
    q5 = q.unflatten(1, (Hkv, q.shape[1] // Hkv))  # (B, Hkv, G, L, D) view
    w = feature_weights(q.shape[3], coeffs, acc, q.device)[:, None]
    return _Problem(q5, k, v, km, off, scale, tuple(coeffs), acc, chunk, w)


# ----------------------------------------------------------------------------------------------------
# the choice of form


class FormChoice(NamedTuple):
    """The form a call runs in and why: ``form`` ("quadratic" or "linear"), ``reason`` (one sentence),
    and the cost model's two estimates (multiply-adds; None where a form is not possible)."""

    form: str
    reason: str
    cost_quadratic: float | None
    cost_linear: float | None


def _key_padding(mask: torch.Tensor | None) -> bool:
    """Whether a (B, Hq, L, S) mask view is one allowed-set per (batch, head): the same for every row."""
    return mask is None or mask.shape[2] == 1 or mask.stride(2) == 0


def _why_not_linear(norm: Normalizer, mask, softcap, dropout_p) -> str | None:
    if "linear" not in norm.forms:
        return (f"the normalizer {norm.spec!r} has no linear form (its forms: {', '.join(norm.forms)}); "
                "a linear form needs a polynomial f of degree <= 2, as taylor's order 2")
    if softcap is not None:
        return "softcap makes f(c tanh(s/c)) non-polynomial, so it has no linear form; pass softcap=None"
    if dropout_p > 0:
        return "dropout acts on each weight p_ij, which the linear form never forms; pass dropout_p=0"
    if mask is not None and mask.dtype != torch.bool:
        return ("a float attn_mask adds a bias inside f (not separable into features); pass a bool key-padding "
                "mask (B, Hq or 1, 1, S) instead")
    if not _key_padding(mask):
        return ("attn_mask differs between query rows (a dense mask), which has no shared linear state; the linear "
                "form takes causal= and bool key-padding masks of shape (B, Hq or 1, 1, S)")
    return None


def costs(L: int, S: int, D: int, Dv: int, causal: bool, chunk: int = CHUNK) -> tuple[float, float]:
    """The cost model, in multiply-adds per (batch, query head):

        quadratic = L * S' * (D + Dv)                   S' = S, or about S/2 causal (tiles above the diagonal
                                                        are skipped)
        linear    = (L + S) * F * (Dv + 1)              phi(q') U for every row, phi(k) v1^T into U per key,
                    + L * C' * (D + Dv)                 plus the intra-chunk quadratic part (C' = chunk / 2
                                                        causal, 0 otherwise); F = 1 + D + D(D+1)/2 ~ D^2/2
    """
    F = n_features(D)
    quad = L * (S / 2 if causal else S) * (D + Dv)
    lin = (L + S) * F * (Dv + 1) + L * (min(chunk, S) / 2 if causal else 0) * (D + Dv)
    return float(quad), float(lin)


def _choose(norm: Normalizer, form, L, S, D, Dv, *, mask, causal, softcap, dropout_p, backend="auto",
            resolved="torch"):
    """The FormChoice of a checked call (``backend`` as the caller gave it, ``resolved`` the one it became).
    The linear form runs with torch ops on any device: an explicit backend="triton" rules it out (no linear
    Triton kernel yet); "auto" on CUDA keeps the tuned quadratic Triton kernel (the cost model counts
    multiply-adds, not the launches of a torch-op chunk loop), and form="linear" runs the torch ops there."""
    if not isinstance(form, str) or form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(map(repr, FORMS))}, got {form!r}")
    why = _why_not_linear(norm, mask, softcap, dropout_p)
    if why is None and backend == "triton":
        why = "the Triton backend has no linear-form kernel yet; use backend='torch' (or 'auto') for form='linear'"
    if why is None and form == "auto" and resolved == "triton":
        why = ("the Triton backend has no linear-form kernel yet and its quadratic kernel beats the torch-op linear "
               "form's launches; pass form='linear' to run the linear form with torch ops")
    if form == "linear":
        if why is not None:
            raise ValueError(f"form='linear' is not possible here: {why}")
        q_cost, l_cost = costs(L, S, D, Dv, causal is not None)
        return FormChoice("linear", "form='linear' was asked for", q_cost, l_cost)
    if form == "quadratic":
        q_cost, _ = costs(L, S, D, Dv, causal is not None)
        return FormChoice("quadratic", "form='quadratic' was asked for", q_cost, None)
    q_cost, l_cost = costs(L, S, D, Dv, causal is not None)
    if why is not None:
        return FormChoice("quadratic", f"auto: quadratic, because {why}", q_cost, None)
    if l_cost < q_cost:
        return FormChoice("linear", f"auto: linear, the cost model's {l_cost:.3g} multiply-adds per head < the "
                                    f"quadratic {q_cost:.3g} (L={L}, S={S}, D={D}, Dv={Dv})", q_cost, l_cost)
    return FormChoice("quadratic", f"auto: quadratic, the cost model's {q_cost:.3g} multiply-adds per head <= the "
                                   f"linear {l_cost:.3g} (L={L}, S={S}, D={D}, Dv={Dv})", q_cost, l_cost)


def choose_form(q, k, v, normalizer="taylor", *, form="auto", causal=False, attn_mask=None, softcap=None,
                dropout_p=0.0, enable_gqa=False, backend="auto") -> FormChoice:
    """The form ``flashmaps.attention(q, k, v, normalizer, form=form, ...)`` runs in, and why (a FormChoice).

    "auto" picks the linear form where the normalizer has one, the call's options allow it (no softcap,
    dropout, float or dense mask; causal and bool key-padding masks are fine) and the cost model of
    :func:`costs` says it does fewer multiply-adds: with D = Dv = 16 from about S = 450 causal, with D = 64
    from about S = 4.5k. ``form="linear"`` where it is not possible raises ValueError saying why."""
    from . import functional as fn

    fn._check_qkv(q, k, v, enable_gqa)
    B, Hq, L, D = q.shape
    S = k.shape[2]
    mask = fn._check_mask(attn_mask, (B, Hq, L, S), q.device)
    resolved = fn._choose_backend(backend, q.device, q.dtype)
    return _choose(parse(normalizer), form, L, S, D, v.shape[3], mask=mask, causal=fn._check_causal(causal),
                   softcap=fn._check_softcap(softcap), dropout_p=fn._check_dropout(dropout_p), backend=backend,
                   resolved=resolved)


# ----------------------------------------------------------------------------------------------------
# the backend entry


def _key_mask(mask, Hkv: int) -> torch.Tensor | None:
    """(B, Hq, L, S) key-padding view -> (B, Hkv, Gm, S) bool, Gm = 1 when the heads of a group agree."""
    if mask is None:
        return None
    km = mask[:, :, 0, :]  # (B, Hq, S) view
    B, Hq, S = km.shape
    if km.stride(1) == 0:  # one set for every head
        return km[:, :1, None].expand(B, Hkv, 1, S)
    return km.unflatten(1, (Hkv, Hq // Hkv))  # (B, Hkv, G, S)


def attention(q, k, v, normalizer: Normalizer, *, mask, causal, scale, return_stats, chunk: int | None = None):
    """The linear form (checked arguments, as :mod:`flashmaps.functional` passes them): q (B, Hq, L, D),
    k (B, Hkv, S, D), v (B, Hkv, S, Dv), mask None or a bool key-padding view (B, Hq, L, S), causal None,
    "upper_left" or "lower_right" -> out (B, Hq, L, Dv) in v's dtype, or (out, {"z": (B, Hq, L)})."""
    L, S = q.shape[2], k.shape[2]
    off = None if causal is None else (0 if causal == "upper_left" else S - L)
    out, z = _LinearFn.apply(q, k, v, _key_mask(mask, k.shape[1]), off, scale, normalizer.linear_coeffs,
                             chunk or CHUNK)
    return (out, {normalizer.stats[0]: z}) if return_stats else out


# ----------------------------------------------------------------------------------------------------
# recurrent decoding


class TaylorState:
    """O(1)-memory decoding state of Taylor (polynomial) attention: ``U = sum_j phi(k_j) [v_j, 1]^T``
    per (batch, kv head), [B, Hkv, F, Dv+1] in float32 (float64 for float64 inputs), F = 1 + D + D(D+1)/2.

    ``step(q_t, k_t, v_t)`` appends one token and returns its output
    ``y = phi(scale q_t) (w * U)``, ``o_t = y[:Dv] / y[Dv]`` (see the module glossary), which equals row t of
    ``flashmaps.attention(q, k, v, "taylor", causal=True)`` over the whole sequence. Memory does not depend
    on the number of tokens. GQA: query head h reads kv head h // (Hq // Hkv).

        st = flashmaps.TaylorState.from_prefix(k[:, :, :P], v[:, :, :P])   # or TaylorState.empty(B, Hkv, D, Dv)
        o_t = st.step(q_t, k_t, v_t)      # q_t (B, Hq, D), k_t (B, Hkv, D), v_t (B, Hkv, Dv) -> (B, Hq, Dv)
    """

    def __init__(self, state: torch.Tensor, *, scale: float | None = None, normalizer="taylor", dtype=None):
        norm = parse(normalizer)
        if "linear" not in norm.forms:
            raise ValueError(f"TaylorState: the normalizer {norm.spec!r} has no linear form (forms: "
                             f"{', '.join(norm.forms)})")
        if not isinstance(state, torch.Tensor) or state.dim() != 4:
            raise ValueError("TaylorState: state must be a (B, Hkv, F, Dv+1) tensor; build one with "
                             "TaylorState.empty(...) or TaylorState.from_prefix(k, v)")
        F = state.shape[2]
        D = int(round((math.sqrt(8 * F + 1) - 3) / 2))  # F = 1 + D + D(D+1)/2
        if n_features(D) != F:
            raise ValueError(f"TaylorState: state dim 2 is {F}, not 1 + D + D(D+1)/2 for any head dim D")
        self.U = state
        self.D, self.Dv = D, state.shape[3] - 1
        self.scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        self.coeffs = tuple(norm.linear_coeffs)
        self.w = feature_weights(D, self.coeffs, state.dtype, state.device)[:, None]
        self.dtype = dtype or state.dtype  # the dtype of the outputs

    @classmethod
    def empty(cls, B: int, Hkv: int, D: int, Dv: int, *, scale=None, normalizer="taylor", dtype=torch.float32,
              device=None) -> "TaylorState":
        """A state with no token yet (outputs in ``dtype``)."""
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        state = torch.zeros(B, Hkv, n_features(D), Dv + 1, dtype=acc, device=device)  # [B, Hkv, F, Dv+1]
        return cls(state, scale=scale, normalizer=normalizer, dtype=dtype)

    @classmethod
    def from_prefix(cls, k: torch.Tensor, v: torch.Tensor, *, scale=None, normalizer="taylor") -> "TaylorState":
        """The state after the tokens k (B, Hkv, P, D), v (B, Hkv, P, Dv) (P may be 0)."""
        from . import functional as fn

        fn._check_qkv(k, k, v, False, names=("k", "k", "v"))
        st = cls.empty(k.shape[0], k.shape[1], k.shape[3], v.shape[3], scale=scale, normalizer=normalizer,
                       dtype=v.dtype, device=k.device)
        return st.update(k, v)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> "TaylorState":
        """Append tokens k (B, Hkv, n, D), v (B, Hkv, n, Dv) (in place; returns self)."""
        with torch.no_grad():
            pb = _Problem(k.unsqueeze(2), k, v, None, None, 1.0, self.coeffs, self.U.dtype, CHUNK, self.w)
            _add_state(self.U.unsqueeze(2), pb, 0, k.shape[2])  # in place on the view [B, Hkv, 1, F, Dv+1]
        return self

    def step(self, q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
        """Append token t and return its output: q_t (B, Hq, D), k_t (B, Hkv, D), v_t (B, Hkv, Dv) ->
        (B, Hq, Dv) in the state's output dtype (4-D inputs with a length-1 dim 2 give (B, Hq, 1, Dv))."""
        four = q_t.dim() == 4
        q4, k4, v4 = (x if four else x.unsqueeze(2) for x in (q_t, k_t, v_t))
        from . import functional as fn

        fn._check_qkv(q4, k4, v4, True, names=("q_t", "k_t", "v_t"))
        B, Hq, n, D = q4.shape
        Hkv = k4.shape[1]
        if n != 1 or k4.shape[2] != 1 or (B, Hkv, D, v4.shape[3]) != (self.U.shape[0], self.U.shape[1], self.D,
                                                                      self.Dv):
            raise ValueError(f"step: expected q_t (B, Hq, D), k_t (B, Hkv, D), v_t (B, Hkv, Dv) with (B, Hkv, D, Dv) "
                             f"= {(self.U.shape[0], self.U.shape[1], self.D, self.Dv)}, got {tuple(q_t.shape)}, "
                             f"{tuple(k_t.shape)}, {tuple(v_t.shape)}")
        self.update(k4, v4)
        return self.query(q4 if four else q_t)

    def query(self, q: torch.Tensor) -> torch.Tensor:
        """Outputs of queries q (B, Hq, D) or (B, Hq, n, D) against the current state (no token appended)."""
        q4 = q if q.dim() == 4 else q.unsqueeze(2)
        B, Hq, n, D = q4.shape
        Hkv = self.U.shape[1]
        if Hq % Hkv or D != self.D or B != self.U.shape[0]:
            raise ValueError(f"query: q must be (B={self.U.shape[0]}, Hq, [n,] D={self.D}) with Hq a multiple of "
                             f"{Hkv}, got {tuple(q.shape)}")
        with torch.no_grad():
            qf = features(q4.unflatten(1, (Hkv, Hq // Hkv)).to(self.U.dtype) * self.scale)  # [B, Hkv, G, n, F]
            y = qf @ (self.w * self.U)[:, :, None]  # [B, Hkv, G, n, Dv+1]
            z = y[..., self.Dv:]
            out = (y[..., :self.Dv] / torch.where(z > 0, z, 1.0)).flatten(1, 2).to(self.dtype)  # (B, Hq, n, Dv)
        return out if q.dim() == 4 else out.squeeze(2)

    def memory_bytes(self) -> int:
        """Bytes held by the state: B * Hkv * F * (Dv+1) * element size, whatever the number of tokens."""
        return self.U.numel() * self.U.element_size()
