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

Backward (``_linear_bwd``), with ``dy_i = [dO_i, -delta_i] / Z_i`` and ``delta_i = dO_i . o_i``: the
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
from typing import NamedTuple, Optional

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


def _backward(pb: _Problem, out5, z5, dout5, dz5=None):
    """(dq [B, Hkv, G, L, D], dk [B, Hkv, S, D], dv [B, Hkv, S, Dv]) in the acc dtype (module docstring).
    ``dz5``: None or the gradient of z (a loss on the statistic): the row term becomes ``delta - Z dz``."""
    Dv = pb.v.shape[3]

    def rows(i0, i1):  # q' and dy = [dO, -delta] / Z (0 for an empty row) of rows [i0, i1): [B, Hkv, G, C, *]
        do = dout5[:, :, :, i0:i1].to(pb.acc)
        z = z5[:, :, :, i0:i1, None]
        delta = (do * out5[:, :, :, i0:i1].to(pb.acc)).sum(-1, keepdim=True)
        if dz5 is not None:                    # dL/dZ = -delta / Z + dz (Normalizer.stat_delta: d = Z dz)
            delta = delta - z * dz5[:, :, :, i0:i1, None].to(pb.acc)
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


@torch.library.custom_op("flashmaps::linear_fwd", mutates_args=())
def _linear_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, km: Optional[torch.Tensor], off: Optional[int],
                scale: float, c0: float, c1: float, c2: float, chunk: int,
                backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out (B, Hq, L, Dv) in v's dtype, z (B, Hq, L) float32 (float64 for float64 inputs)), with torch
    ops (``backend="torch"``) or the Triton kernels of ``flashmaps.kernels.linear`` ("triton"). An opaque
    op (with a fake below) so that torch.compile traces the linear form without graph breaks."""
    if backend == "triton":
        return _triton_forward(q, k, v, km, off, scale, (c0, c1, c2), chunk)
    B, Hq, L = q.shape[:3]
    out5, z5 = _forward(_prepare(q, k, v, km, off, scale, (c0, c1, c2), chunk))
    return out5.reshape(B, Hq, L, v.shape[3]).to(v.dtype), z5.reshape(B, Hq, L)


@_linear_fwd.register_fake
def _(q, k, v, km, off, scale, c0, c1, c2, chunk, backend):
    z_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((*q.shape[:3], v.shape[3]), dtype=v.dtype), q.new_empty(q.shape[:3], dtype=z_dtype)


@torch.library.custom_op("flashmaps::linear_bwd", mutates_args=())
def _linear_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, km: Optional[torch.Tensor], out: torch.Tensor,
                z: torch.Tensor, dout: torch.Tensor, off: Optional[int], scale: float, c0: float, c1: float,
                c2: float, chunk: int, backend: str,
                dz: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv) in the dtypes and shapes of q, k, v (contiguous): the backward of ``_linear_fwd``;
    ``dz``: None or the gradient of z (B, Hq, L)."""
    if backend == "triton":
        return _triton_backward(q, k, v, km, out, z, dout, off, scale, (c0, c1, c2), chunk, dz)
    pb = _prepare(q, k, v, km, off, scale, (c0, c1, c2), chunk)
    B, Hkv, G, L, D = pb.q5.shape
    dq, dk, dv = _backward(pb, out.unflatten(1, (Hkv, G)), z.unflatten(1, (Hkv, G)), dout.unflatten(1, (Hkv, G)),
                           None if dz is None else dz.unflatten(1, (Hkv, G)))
    return dq.reshape(q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@_linear_bwd.register_fake
def _(q, k, v, km, out, z, dout, off, scale, c0, c1, c2, chunk, backend, dz=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


def _linear_setup(ctx, inputs, output):
    q, k, v, km, off, scale, c0, c1, c2, chunk, backend = inputs
    out, z = output
    ctx.save_for_backward(q, k, v, km, out, z)
    ctx.args = (off, scale, c0, c1, c2, chunk, backend)


def _linear_grad(ctx, dout, dz):
    """Backward recomputes the states from q, k, v, out and z (nothing per chunk is saved). z carries
    gradients (``Normalizer.stat_delta`` of a ``p = f(s) / Z`` unit: dZ/ds_j = f'(s_j), the row term less Z dz)."""
    q, k, v, km, out, z = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    dq, dk, dv = _linear_bwd(q, k, v, km, out, z, dout, *ctx.args, None if dz is None else dz.to(z.dtype).contiguous())
    return dq, dk, dv, None, None, None, None, None, None, None, None


_linear_fwd.register_autograd(_linear_grad, setup_context=_linear_setup)


def _prepare(q, k, v, km, off, scale, coeffs, chunk) -> _Problem:
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    Hkv = k.shape[1]
    q5 = q.unflatten(1, (Hkv, q.shape[1] // Hkv))  # (B, Hkv, G, L, D) view
    w = feature_weights(q.shape[3], coeffs, acc, q.device)[:, None]
    return _Problem(q5, k, v, km, off, scale, tuple(coeffs), acc, chunk, w)


# ----------------------------------------------------------------------------------------------------
# the Triton form (kernels/linear.py): launchers

#: the largest head dim D of the Triton linear kernel (its order-2 state is BD^2 x BV fp32 registers; see
#: the kernel's docstring): larger D runs the torch linear form or the quadratic kernel
TRITON_MAX_D = 128
#: query rows per chunk of the Triton kernel (>= 16, tl.dot's smallest tile; Based's chunk)
TRITON_CHUNK = 16


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


#: the largest D that form="auto" gives the Triton linear kernel: its registers fit at D <= 16 (sm_90
#: build of ``scripts/sm90-compile --linear``: no spill in the forward, 72 bytes in the causal backward);
#: at D = 32 both kernels spill kilobytes, so D in (16, 32] runs it only when form="linear" asks
TRITON_AUTO_MAX_D = 16
#: the largest D whose whole order-2 state is one program's (the fast path, one feature block); above it the
#: order-2 features split over BD^2 / TRITON_FEATURES programs of TRITON_FEATURES features each
TRITON_ONE_BLOCK_MAX_D = 32
#: order-2 features per program of the split path: 128 (TA = 2 rows of x x^T at D = 64, 32 blocks) with the
#: state 128 x 64 fp32, the register size of D = 16's 256 x 32; the sm_90 build (D = 64, Dv = 64, causal) has
#: no spill in the forward kernels and 128 bytes in the backward (256 features x 32: 240 and 304 bytes).
#: Tests raise it to interpret fewer programs (the same code).
TRITON_FEATURES = 128


def _auto_spills(D: int) -> bool:
    """Whether "auto" keeps the quadratic kernel because the linear kernel spills at this D: the one-block
    state of D in (TRITON_AUTO_MAX_D, TRITON_ONE_BLOCK_MAX_D] (1024 x 16 fp32 at D = 32). The split path
    (D > TRITON_ONE_BLOCK_MAX_D) keeps 256 x 32 per program, the registers of D = 16."""
    return TRITON_AUTO_MAX_D < D <= TRITON_ONE_BLOCK_MAX_D


def _triton_blocks(D: int, Dv: int):
    """(BD, BV, TA, num_warps): BD = D padded to a power of two >= 16; TA the rows a of ``x x^T`` per feature
    block (BD up to TRITON_ONE_BLOCK_MAX_D: TA = BD, one block, the whole order-2 state in one program; above:
    TA = TRITON_FEATURES // BD, NF = BD // TA blocks: 32 at D = 64); the Dv block BV that keeps the program's
    order-2 state TA BD x BV at <= 8192 fp32 (256 x 32 at D <= 16, 1024 x 16 at D <= 32, 128 x 64 at D = 64).
    Warps: the sm_90 builds with the fewest spills (8; 16 at D = 32)."""
    BD = max(16, _pow2(D))
    TA = BD if BD <= TRITON_ONE_BLOCK_MAX_D else max(1, TRITON_FEATURES // BD)
    BV = max(16, min(_pow2(Dv), 8192 // (TA * BD)))
    return BD, BV, TA, 16 if TA * BD > 256 else 8


def _triton_prec(dtype: torch.dtype) -> str:
    """tl.dot input precision of the kernel's fp32 operands: exact under the interpreter; on a GPU fp32
    inputs follow the quadratic kernel's setting, fp16/bf16 inputs use TF32 (10 mantissa bits, at least
    the inputs' 7-10)."""
    from . import triton_path

    if triton_path._INTERPRET:
        return "ieee"
    return triton_path._dot_precision(dtype) if dtype == torch.float32 else "tf32"


def _triton_args(q, k, v, km, off):
    """The launch arguments shared by both kernels: (key mask uint8 (B, Hq, S) view or a dummy, its strides,
    the strides of q, k, v, (Hq, G, L, S, OFF, A0), the constexprs, the grid, num_warps)."""
    B, Hq, L, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    if km is None:
        m, sm = q.new_empty(1, dtype=torch.uint8), (0, 0, 0)
    else:  # (B, Hkv, Gm, S) -> (B, Hq, S)
        m = km.expand(B, Hkv, Hq // Hkv, S).reshape(B, Hq, S).view(torch.uint8)
        sm = m.stride()
    A0 = S if off is None else min(S, max(0, off))
    BD, BV, TA, warps = _triton_blocks(D, Dv)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *sm)
    const = dict(D=D, DV=Dv, BD=BD, BV=BV, CAUSAL=off is not None, HAS_MASK=km is not None,
                 PREC=_triton_prec(q.dtype), TA=TA, num_warps=warps)
    return m, strides, (Hq, Hq // Hkv, L, S, off or 0, A0), const, (B * Hq, _cdiv(Dv, BV) * (BD // TA))


def _triton_check(q, k, v):
    D = q.shape[3]
    if D > TRITON_MAX_D:
        raise ValueError(f"the Triton linear form takes head dims D <= {TRITON_MAX_D} (its order-2 state is "
                         f"D^2 x Dv fp32 over D^2 / {TRITON_FEATURES} programs), got D={D}; use backend='torch' or "
                         "form='quadratic'")
    for x in (q, k, v):
        if x.stride(-1) != 1:
            raise ValueError("the Triton linear form needs q, k, v with a unit last-dim stride")


#: query rows per segment of the forward (a multiple of the chunk); None: ``_segments`` picks enough
#: segments to give the GPU about two programs per SM, each at least MIN_SEG_ROWS rows. Tests set it small.
TRITON_SEG_ROWS = None
MIN_SEG_ROWS = 1024


def _segments(L: int, programs: int, chunk: int, device: torch.device) -> tuple[int, int]:
    """(NS, rows per segment) of the forward: the rows split into NS segments that run in parallel, each
    starting from the state before it (the inclusive sum of the per-segment key pieces)."""
    if TRITON_SEG_ROWS:
        rows = TRITON_SEG_ROWS
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        rows = max(MIN_SEG_ROWS, _cdiv(L, max(1, 2 * sms // programs)))
    rows = _cdiv(rows, chunk) * chunk
    return _cdiv(L, rows), rows


def _triton_forward(q, k, v, km, off, scale, coeffs, chunk):
    """out (B, Hq, L, Dv) in v's dtype and z (B, Hq, L) fp32 from ``kernels.linear.linear_fwd``; with
    several segments, their starting states from ``linear_piece_state`` and a prefix sum (not causal: the
    total) over the segments, O(NS (1 + BD + BD^2) Dv) fp32 per (batch, head), NS bounded by the GPU's size
    and L / MIN_SEG_ROWS."""
    from .kernels.linear import linear_fwd

    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    _triton_check(q, k, v)
    B, Hq, L, _ = q.shape
    Dv = v.shape[3]
    m, strides, dims, const, grid = _triton_args(q, k, v, km, off)
    NF = const["BD"] // const["TA"]
    if NF == 1:
        out = torch.empty(B, Hq, L, Dv, dtype=v.dtype, device=q.device)
        z = torch.empty(B, Hq, L, dtype=torch.float32, device=q.device)
    else:  # per feature block: the partial numerators and z, summed below
        out = torch.empty(NF, B, Hq, L, Dv, dtype=torch.float32, device=q.device)
        z = torch.empty(NF, B, Hq, L, dtype=torch.float32, device=q.device)
    NS, rows = _segments(L, grid[0] * grid[1], chunk, q.device)
    hpre, zpre = _segment_states(k, v, m, off, strides, dims, const, grid, NS, rows, chunk)
    linear_fwd[(*grid, NS)](q, k, v, m, out, z, hpre, zpre, *strides, *out.stride()[-4:-1], *dims, rows, NS,
                            float(scale), *map(float, coeffs), C=chunk, SEGMENTED=NS > 1, **const,
                            sof=out.stride(0) if NF > 1 else 0, szf=z.stride(0) if NF > 1 else 0)
    if NF == 1:
        return out, z
    z = z.sum(0)
    out = out.sum(0) * torch.where(z > 0, 1.0 / torch.where(z > 0, z, 1.0), 0.0)[..., None]
    return out.to(v.dtype), z


def _state_bufs(B_H: int, NS: int, const: dict, Dv: int, device):
    FB = 1 + const["BD"] + const["BD"] ** 2
    return (torch.empty(B_H, NS, FB, Dv, dtype=torch.float32, device=device),
            torch.empty(B_H, NS, FB, dtype=torch.float32, device=device))


def _segment_states(k, v, m, off, strides, dims, const, grid, NS, rows, chunk):
    """(hpre, zpre): the state before each of the NS segments (the inclusive prefix sums of the pieces of
    ``linear_piece_state``; not causal: the total), or placeholders for one segment."""
    from .kernels.linear import linear_piece_state

    if NS == 1:
        return k, k
    hbuf, zbuf = _state_bufs(grid[0], NS, const, v.shape[3], k.device)
    linear_piece_state[(*grid, NS)](k, v, m, hbuf, zbuf, *strides[3:], dims[0], dims[1], dims[3], dims[4], rows, NS,
                                    C=chunk, **const)
    if off is None:  # every segment starts from all keys
        return tuple(x.sum(1, keepdim=True).expand_as(x).contiguous() for x in (hbuf, zbuf))
    return hbuf.cumsum(1), zbuf.cumsum(1)


def _segment_reverse_states(q, dout, rinv, gz, off, scale, const, grid, NS, rows, chunk):
    """(rpre, rzpre): the reverse state each segment starts its dk, dv pass from: the pieces of
    ``linear_row_piece`` summed over the segments after it (not causal: over all), or placeholders."""
    from .kernels.linear import linear_row_piece

    if NS == 1:
        return q, q
    rbuf, rzbuf = _state_bufs(grid[0], NS, const, dout.shape[3], q.device)
    keep = {n: const[n] for n in ("D", "DV", "BD", "BV", "PREC", "TA", "num_warps")}
    linear_row_piece[(*grid, NS)](q, dout, rinv, gz, rbuf, rzbuf, *q.stride()[:3], *dout.stride()[:3], q.shape[1],
                                  q.shape[2], rows, NS, float(scale), C=chunk, **keep)
    total = [x.sum(1, keepdim=True) for x in (rbuf, rzbuf)]
    if off is None:
        return tuple(t.expand_as(x).contiguous() for t, x in zip(total, (rbuf, rzbuf)))
    return tuple((t - x.cumsum(1)).contiguous() for t, x in zip(total, (rbuf, rzbuf)))


def _triton_backward(q, k, v, km, out, z, dout, off, scale, coeffs, chunk, dz=None):
    """(dq, dk, dv) in the dtypes of q, k, v from ``kernels.linear.linear_bwd``: the kernel writes fp32
    partial sums (dq, dk per Dv block, dk and dv per query head), summed here; rinv = 1/Z and
    gz = -delta/Z (0 for empty rows) come from torch ops on the saved out and z."""
    from .kernels.linear import linear_bwd

    q, k, v, dout = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, dout))
    B, Hq, L, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    rinv = torch.where(z > 0, 1.0 / torch.where(z > 0, z, 1.0), 0.0).float().contiguous()  # (B, Hq, L)
    delta = (dout.float() * out.float()).sum(-1)
    if dz is not None:                                          # a loss on z: the row term less Z dz
        delta = delta - z.float() * dz.float()
    gz = (-delta * rinv).contiguous()                                                      # -delta / Z
    m, strides, dims, const, grid = _triton_args(q, k, v, km, off)
    nv = grid[1]
    NS, rows = _segments(L, grid[0] * grid[1], chunk, q.device)
    hpre, zpre = _segment_states(k, v, m, off, strides, dims, const, grid, NS, rows, chunk)
    rpre, rzpre = _segment_reverse_states(q, dout, rinv, gz, off, scale, const, grid, NS, rows, chunk)
    NF = const["BD"] // const["TA"]
    dq = torch.empty(nv, B * Hq, L, D, dtype=torch.float32, device=q.device)
    dk = torch.zeros(nv, B * Hq, S, D, dtype=torch.float32, device=q.device)
    dv = torch.zeros(NF, B * Hq, S, Dv, dtype=torch.float32, device=q.device)
    linear_bwd[(*grid, NS)](q, k, v, m, dout, rinv, gz, dq, dk, dv, hpre, zpre, rpre, rzpre, *strides,
                            *dout.stride()[:3], *dims, rows, NS, B * Hq, float(scale), *map(float, coeffs), C=chunk,
                            SEGMENTED=NS > 1, **const)
    G = Hq // Hkv
    dq = dq.sum(0).view(B, Hq, L, D)
    dk = dk.sum(0).view(B, Hkv, G, S, D).sum(2)
    dv = dv.sum(0).view(B, Hkv, G, S, Dv).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)



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


def costs(L: int, S: int, D: int, Dv: int, causal: bool, chunk: int = CHUNK,
          backend: str = "torch") -> tuple[float, float]:
    """The cost model, in multiply-adds per (batch, query head):

        quadratic = L * S' * (D + Dv)                   S' = S, or about S/2 causal (tiles above the diagonal
                                                        are skipped)
        linear    = (L + S) * F * (Dv + 1)              phi(q') U for every row, phi(k) v1^T into U per key,
                    + L * C' * (D + Dv)                 plus the intra-chunk quadratic part (C' = chunk / 2
                                                        causal, 0 otherwise); F = 1 + D + D(D+1)/2 ~ D^2/2

    ``backend="triton"``: the Triton kernel's features, the full square over the padded head dim plus orders
    0 and 1 once per feature block (F = BD^2 + NF (1 + BD), BD = D padded to a power of two >= 16, NF the
    feature blocks of ``_triton_blocks``: 1 up to D = 32, BD^2 / 256 above; ``kernels/linear.py`` says why).
    """
    if backend == "triton":
        BD, _, TA, _ = _triton_blocks(D, Dv)
        F = BD * BD + (BD // TA) * (1 + BD)
    else:
        F = n_features(D)
    quad = L * (S / 2 if causal else S) * (D + Dv)
    lin = (L + S) * F * (Dv + 1) + L * (min(chunk, S) / 2 if causal else 0) * (D + Dv)
    return float(quad), float(lin)


def _choose(norm: Normalizer, form, L, S, D, Dv, *, mask, causal, softcap, dropout_p, backend="auto",
            resolved="torch"):
    """The FormChoice of a checked call (``backend`` as the caller gave it, ``resolved`` the one it became).
    On the Triton backend the linear form is the Triton kernel of ``kernels/linear.py`` for D <=
    TRITON_MAX_D and "auto" weighs it by the cost model with the kernel's features (for D <=
    TRITON_AUTO_MAX_D, where its registers do not spill); for larger D an explicit
    backend="triton" rules the linear form out, "auto" on CUDA keeps the quadratic Triton kernel (the cost
    model counts multiply-adds, not the launches of a torch-op chunk loop), and form="linear" with
    backend="auto" runs the torch ops there. The rule of "auto" on the Triton backend: the linear kernel where
    the cost model (its features) says fewer multiply-adds, except for D in (TRITON_AUTO_MAX_D,
    TRITON_ONE_BLOCK_MAX_D] (the one-block state spills; ``_auto_spills``); D in (32, TRITON_MAX_D] is the
    split kernel (D = Dv = 64 causal: linear from about S = 12.5k)."""
    if not isinstance(form, str) or form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(map(repr, FORMS))}, got {form!r}")
    why = _why_not_linear(norm, mask, softcap, dropout_p)
    kernel = resolved == "triton" and D <= TRITON_MAX_D
    too_wide = (f"the Triton linear kernel takes head dims D <= {TRITON_MAX_D} (its order-2 state is D^2 x Dv "
                f"fp32 registers over D^2 / {TRITON_FEATURES} programs), got D={D}")
    if why is None and backend == "triton" and not kernel:
        why = f"{too_wide}; use backend='torch' (or 'auto') for form='linear'"
    if why is None and form == "auto" and resolved == "triton" and not kernel:
        why = (f"{too_wide}, and the quadratic Triton kernel beats the torch-op linear form's launches; pass "
               "form='linear' to run the linear form with torch ops")
    if why is None and form == "auto" and kernel and _auto_spills(D):
        why = (f"the Triton linear kernel spills registers at {TRITON_AUTO_MAX_D} < D <= {TRITON_ONE_BLOCK_MAX_D} "
               f"(D={D}); pass form='linear' to run it anyway")
    cost_args = (L, S, D, Dv, causal is not None) + ((TRITON_CHUNK, "triton") if kernel else ())
    runs = "the Triton kernel" if kernel else "torch ops"
    if form == "linear":
        if why is not None:
            raise ValueError(f"form='linear' is not possible here: {why}")
        q_cost, l_cost = costs(*cost_args)
        return FormChoice("linear", f"form='linear' was asked for (runs as {runs})", q_cost, l_cost)
    if form == "quadratic":
        q_cost, _ = costs(*cost_args)
        return FormChoice("quadratic", "form='quadratic' was asked for", q_cost, None)
    q_cost, l_cost = costs(*cost_args)
    if why is not None:
        return FormChoice("quadratic", f"auto: quadratic, because {why}", q_cost, None)
    if l_cost < q_cost:
        return FormChoice("linear", f"auto: linear ({runs}), the cost model's {l_cost:.3g} multiply-adds per "
                                    f"head < the quadratic {q_cost:.3g} (L={L}, S={S}, D={D}, Dv={Dv})", q_cost,
                          l_cost)
    return FormChoice("quadratic", f"auto: quadratic, the cost model's {q_cost:.3g} multiply-adds per head <= "
                                   f"the linear form's ({runs}) {l_cost:.3g} (L={L}, S={S}, D={D}, Dv={Dv})", q_cost, l_cost)


def choose_form(q, k, v, normalizer="taylor", *, form="auto", causal=False, attn_mask=None, softcap=None,
                dropout_p=0.0, enable_gqa=False, backend="auto") -> FormChoice:
    """The form ``flashmaps.attention(q, k, v, normalizer, form=form, ...)`` runs in, and why (a FormChoice).

    "auto" picks the linear form where the normalizer has one, the call's options allow it (no softcap,
    dropout, float or dense mask; causal and bool key-padding masks are fine) and the cost model of
    :func:`costs` says it does fewer multiply-adds: with D = Dv = 16 from about S = 450 causal, with D = 64
    from about S = 4.5k. On the Triton backend the linear form is the Triton kernel (D <= TRITON_MAX_D;
    "auto" weighs it, with its full-square features, for D <= TRITON_AUTO_MAX_D and D > 32 (the split
    kernel): D = Dv = 16 from about S = 600 causal, D = Dv = 64 from about S = 12.5k). ``form="linear"``
    where it is not possible raises ValueError saying why."""
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


def attention(q, k, v, normalizer: Normalizer, *, mask, causal, scale, return_stats, chunk: int | None = None,
              backend: str = "torch"):
    """The linear form (checked arguments, as :mod:`flashmaps.functional` passes them): q (B, Hq, L, D),
    k (B, Hkv, S, D), v (B, Hkv, S, Dv), mask None or a bool key-padding view (B, Hq, L, S), causal None,
    "upper_left" or "lower_right" -> out (B, Hq, L, Dv) in v's dtype, or (out, {"z": (B, Hq, L)}).
    ``backend`` is the resolved backend of the call: "triton" runs the Triton kernels where D <=
    TRITON_MAX_D (larger D: the torch ops, as form="linear" with backend="auto" did before)."""
    L, S = q.shape[2], k.shape[2]
    off = None if causal is None else (0 if causal == "upper_left" else S - L)
    triton_form = backend == "triton" and q.shape[3] <= TRITON_MAX_D
    c0, c1, c2 = (float(c) for c in normalizer.linear_coeffs)
    out, z = _linear_fwd(q, k, v, _key_mask(mask, k.shape[1]), off, float(scale), c0, c1, c2,
                         chunk or (TRITON_CHUNK if triton_form else CHUNK), "triton" if triton_form else "torch")
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
