"""The torch path: flashmaps attention written with torch ops (the CPU default, works on any device).

Glossary (shapes of one chunk; the whole module uses these names):

    B, Hq, Hkv, G     batch, query heads, key/value heads, group size G = Hq // Hkv
    L, S, D, Dv       query length, key length, q/k head dim, v head dim
    chunk             (bb batches) x (hc kv heads) x (all G query heads of those kv heads) x (bl query
                      rows) x (S' keys): the unit of work. S' = S, or fewer with causal masking (the keys
                      right of the last row's diagonal are never touched).
    s                 [bb, hc, G, bl, S'] scores in the accumulation dtype:
                      s = scale * q.k, then c * tanh(s / c) (softcap c), then + float mask;
                      a disallowed key has s = -inf exactly (an allowed key is always finite)
    st                the normalizer's row statistics, dict name -> [bb, hc, G, bl, 1]
    p                 [bb, hc, G, bl, S'] normalized weights (0 on disallowed keys and empty rows)
    keep              [bb, hc, G, bl, S'] dropout keep mask; the weights used are p * keep / (1 - p_drop)
    acc dtype         float32 for fp16/bf16/fp32 inputs, float64 for float64 inputs

Memory: a chunk holds full key rows for ``bl`` query rows (``bl`` chosen so that a chunk has about
``CHUNK_ELEMS`` scores), so memory is O(CHUNK_ELEMS + L * D) whatever L and S are, and every row
statistic (entmax's tau, top-k's k-th score) is computed exactly on full rows: no score matrix for all
heads at once, never an (L, S) matrix saved for backward. Each chunk is one matmul for the scores and
one for the output.

Normalizers plug in through ``HOOKS``, a table keyed by ``normalizer.name``; each entry provides

    prepass(norm, s, masked)  -> st           row statistics from the full score rows (threshold pass)
    weights(norm, s, st, masked) -> p         the normalized weights given the statistics (block update
                                              + finalize: the division by the normalizer is here)
    dscores(norm, s, p, dp, st) -> ds         backward rule, dp = dO @ V^T (times the dropout scale)
    sparse(norm, s, st) -> (idx, w) | None    optional: the only keys of each row that can be nonzero
                                              and their weights; the forward scatters them (no dense
                                              pass over the row to build p)

``masked`` says whether any key of the chunk may be disallowed (so the unmasked case skips the
``where``s). Statistics whose name starts with ``_`` stay inside the chunk. Adding a normalizer means
adding one entry; the chunk loop never changes.

Exact thresholds: top-k's tau is the k-th value of ``torch.topk`` on the full row (its (k+1)-th value
tells whether there is a tie at tau, which keeps more than k keys: then the dense path). entmax15's tau
comes from the ``SPARSE_R + 1`` largest scores of the row with the sort-based rule of ``entmax.entmax15``
(support of size r: ``tau = mean_r - sqrt(1/r - var_r)``), which is exact as soon as the support is
smaller than the selection; rows whose support fills it are redone with 8x more, up to a full sort.

Softmax without dropout or softcap dispatches to torch's CPU flash-attention op (the SDPA kernel, which
returns logsumexp; its backward op takes it) whenever the semantics match exactly: see
:func:`_sdpa_route`.

Backward: :func:`backward` (wrapped with :func:`forward` as torch.library custom ops by
:mod:`flashmaps.ops`) gets q, k, v and the row statistics only, and recomputes each chunk's scores and weights from them (no autograd graph over the loop, no
stored score matrix).

Dropout: one seed is drawn from torch's default generator per call (:func:`draw_seed`); the keep mask of
rows ``[16 r, 16 r + 16)`` of head ``(b, h)`` comes from a ``torch.Generator`` seeded with a mix of
``(seed, b, h, r)``, so forward and backward regenerate it identically, whatever the chunking.
:func:`dropout_keep_mask` rebuilds the whole mask for tests.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .normalizers import Normalizer

__all__ = ["attention", "HOOKS", "Hooks", "draw_seed", "dropout_keep_mask", "CHUNK_ELEMS"]

#: scores per chunk (about 4 MiB of float32); tests shrink it to exercise many chunks
CHUNK_ELEMS = 1 << 20
#: rows per dropout-generator block
_DROPOUT_ROWS = 16

_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------
# normalizer hooks


class Hooks(NamedTuple):
    """One normalizer's torch-path hooks (see the module docstring)."""

    prepass: Callable
    weights: Callable
    dscores: Callable
    #: optional: (norm, s, st) -> (idx [.., bl, r] int64, w [.., bl, r]) the normalized weights on the
    #: only keys that can be nonzero (the forward scatters them instead of computing dense weights), or
    #: None (then the dense ``weights`` are used)
    sparse: Callable | None = None


def _rowsum(x: torch.Tensor) -> torch.Tensor:
    return x.sum(-1, keepdim=True)


def _allowed(s: torch.Tensor) -> torch.Tensor:
    return s > _NEG_INF


def _safe_div(x, den):
    return x / torch.where(den > 0, den, torch.ones_like(den))


def _finite_or_zero(x):
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _logsumexp(s, masked):
    """Natural-log log-sum-exp over the last dim, [.., 1]; -inf for a row of -inf."""
    m = s.amax(-1, keepdim=True)
    m = _finite_or_zero(m) if masked else m
    return m + torch.log(_rowsum(torch.exp(s - m)))


# softmax: p = exp(s - lse); ds = p * (dp - rowsum(p * dp))


def _softmax_prepass(norm, s, masked):
    return {"lse": _logsumexp(s, masked)}


def _lse_weights(s, lse, masked):
    return torch.exp(s - (_finite_or_zero(lse) if masked else lse))  # exp(-inf) = 0: disallowed, empty


def _softmax_weights(norm, s, st, masked):
    return _lse_weights(s, st["lse"], masked)


def _softmax_dscores(norm, s, p, dp, st):
    return p * (dp - _rowsum(p * dp))


# taylor: f(s) = 1 + s + s^2/2, p = f(s) / Z; ds = f'(s) / Z * (dp - rowsum(p * dp)), f'(s) = 1 + s


def _taylor_f(s, masked):
    f = 1 + s + 0.5 * s * s
    return torch.where(_allowed(s), f, torch.zeros((), dtype=s.dtype, device=s.device)) if masked else f


def _taylor_prepass(norm, s, masked):
    return {"z": _rowsum(_taylor_f(s, masked))}  # 0 for an empty row


def _taylor_weights(norm, s, st, masked):
    return _safe_div(_taylor_f(s, masked), st["z"])


def _taylor_dscores(norm, s, p, dp, st):
    fprime = torch.where(p > 0, 1 + s, torch.zeros((), dtype=s.dtype, device=s.device))  # no inf * 0
    return _safe_div(fprime, st["z"]) * (dp - _rowsum(p * dp))


# Sparse normalizers look at the top-r scores of each row first (torch.topk on full rows: exact).

#: first number of top scores per row that entmax15 looks at (grown x8 for rows whose support is larger)
SPARSE_R = 64
#: use the scattered (sparse) weights only when the listed keys are at most this fraction of the row
_SPARSE_FRACTION = 0.25


def _flat_rows(x):
    return x.reshape(-1, x.shape[-1])


# entmax15: z = s/2, p = max(z - tau, 0)^2 with sum p = 1; with g = sqrt(p):
# ds = g * (dp - rowsum(g * dp) / rowsum(g))     (the 1/2 of z = s/2 cancels the 2 of d(x^2))


def _entmax15_tau_sorted(zs: torch.Tensor):
    """Exact threshold from the t largest z of each row, sorted descending ([n, t], -inf = disallowed),
    the sort-based rule of ``entmax.entmax15`` on a prefix of the row:
    for a support of the r largest, ``tau_r = mean_r - sqrt(1/r - var_r)``; the support is the prefix
    where ``tau_r <= z_(r)``. Returns (tau [n, 1] in z units, +inf for an empty row; complete [n] bool:
    False where all t values are in the support, so that the row may need more than t)."""
    zmax = zs[:, :1]
    nonempty = zmax > _NEG_INF
    # max 0; values below -2 (-inf included) raised to -2: still below any tau (tau >= max z - 1), and
    # the row stays sorted (the support-count rule below needs the sorted order)
    x = torch.clamp(zs - _finite_or_zero(zmax), min=-2.0)
    rho = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device)
    mean = x.cumsum(1) / rho
    mean_sq = (x * x).cumsum(1) / rho
    tau_r = mean - torch.sqrt(torch.clamp(1 / rho - (mean_sq - mean * mean), min=0))
    support = (tau_r <= x).sum(1, keepdim=True)  # >= 1 (tau_1 = x_1 - 1)
    tau = tau_r.gather(1, support - 1) + zmax
    tau = torch.where(nonempty, tau, torch.full_like(tau, float("inf")))
    return tau, (support < x.shape[1]).squeeze(1)


def _entmax15_tau(s: torch.Tensor):
    """Exact entmax15 tau (z units) of every row of the scores ``s`` [.., S'] (-inf = disallowed):
    [.., 1]. Also returns the first top-r selection (values in z units, indices) and whether it holds
    every row's support (then the weights are nonzero only on those keys)."""
    rows = _flat_rows(s)
    n_keys = rows.shape[1]
    t = min(SPARSE_R + 1, n_keys)
    vals, idx = torch.topk(rows, t, dim=1, sorted=True)
    zs = vals * 0.5
    tau, complete = _entmax15_tau_sorted(zs)
    all_complete = t == n_keys or bool(complete.all())
    if not all_complete:  # rows whose support has >= t keys: look at 8x more, up to a full sort
        todo = torch.nonzero(~complete).squeeze(1)
        tau_rows = tau.clone()
        while todo.numel():
            t = min(8 * t, n_keys)
            zt = torch.topk(rows[todo], t, dim=1, sorted=True).values * 0.5
            tau_t, complete_t = _entmax15_tau_sorted(zt)
            done = complete_t | (t == n_keys)
            tau_rows[todo[done]] = tau_t[done]
            todo = todo[~done]
        tau = tau_rows
    shape = s.shape[:-1] + (1,)
    return tau.view(shape), (zs.view(s.shape[:-1] + (-1,)), idx.view(s.shape[:-1] + (-1,)), all_complete)


def _entmax15_prepass(norm, s, masked):
    tau, top = _entmax15_tau(s)
    return {"tau": tau, "_top": top}


def _entmax15_weights(norm, s, st, masked):
    # p = (s/2 - tau)^2 = (s - 2 tau)^2 / 4; the 1/4 cancels in the normalization
    p = torch.clamp_(s - 2 * st["tau"], min=0).square_()  # +inf tau (empty row) gives 0
    return _safe_div(p, _rowsum(p))  # exact simplex


def _entmax15_sparse(norm, s, st):
    zs, idx, complete = st["_top"]
    if not complete or idx.shape[-1] > _SPARSE_FRACTION * s.shape[-1]:
        return None
    w = torch.clamp_(zs - st["tau"], min=0).square_()
    return idx, _safe_div(w, _rowsum(w))


def _entmax15_dscores(norm, s, p, dp, st):
    g = torch.sqrt(p)
    return g * (dp - _safe_div(_rowsum(g * dp), _rowsum(g)))


# topk: tau_k = k-th largest allowed score (-inf if the row has <= k allowed keys); softmax over
# {s >= tau_k} (ties kept); backward: the softmax rule (p = 0 off the kept set)


def _topk_prepass(norm, s, masked):
    k, n_keys = norm.k, s.shape[-1]
    if k >= n_keys:  # every allowed key is kept
        tau = torch.full(s.shape[:-1] + (1,), _NEG_INF, dtype=s.dtype, device=s.device)
        return {"tau": tau, "lse": _logsumexp(s, True)}
    vals, idx = torch.topk(s, k + 1, dim=-1, sorted=True)  # [.., bl, k+1]
    kth, next_ = vals[..., k - 1 : k], vals[..., k : k + 1]
    tau = torch.where(next_ > _NEG_INF, kth, torch.full_like(kth, _NEG_INF))  # -inf iff <= k allowed keys
    if bool((next_ == kth).logical_and_(next_ > _NEG_INF).any()):  # a tie at tau: more than k kept keys
        kept = torch.where(s >= tau, s, torch.full((), _NEG_INF, dtype=s.dtype, device=s.device))
        return {"tau": tau, "lse": _logsumexp(kept, True)}
    kept = torch.where(vals >= tau, vals, torch.full((), _NEG_INF, dtype=s.dtype, device=s.device))
    return {"tau": tau, "lse": _logsumexp(kept, True), "_top": (kept, idx)}


def _topk_weights(norm, s, st, masked):
    sk = torch.where(s >= st["tau"], s, torch.full((), _NEG_INF, dtype=s.dtype, device=s.device))
    return _lse_weights(sk, st["lse"], True)


def _topk_sparse(norm, s, st):
    if "_top" not in st or norm.k + 1 > _SPARSE_FRACTION * s.shape[-1]:
        return None
    kept, idx = st["_top"]
    return idx, _lse_weights(kept, st["lse"], True)


#: name -> hooks; register a new normalizer by adding an entry (the chunk loop never changes)
HOOKS: dict[str, Hooks] = {
    "softmax": Hooks(_softmax_prepass, _softmax_weights, _softmax_dscores),
    "taylor": Hooks(_taylor_prepass, _taylor_weights, _taylor_dscores),
    "entmax15": Hooks(_entmax15_prepass, _entmax15_weights, _entmax15_dscores, _entmax15_sparse),
    "topk": Hooks(_topk_prepass, _topk_weights, _softmax_dscores, _topk_sparse),
}


# ----------------------------------------------------------------------------------------------------
# dropout


def draw_seed() -> int:
    """The dropout seed of one call as :mod:`flashmaps.ops` draws it from torch's default CPU generator
    (``torch.manual_seed(n); draw_seed()`` gives the seed that the next call with dropout will use)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def _block_seed(seed: int, b: int, h: int, r: int) -> int:
    x = (seed ^ (b * 0x9E3779B97F4A7C15) ^ (h * 0xBF58476D1CE4E5B9) ^ (r * 0x94D049BB133111EB)) & (2**64 - 1)
    x = ((x ^ (x >> 31)) * 0xD6E8FEB86659FD93) & (2**64 - 1)  # splitmix-style finalizer
    return (x ^ (x >> 32)) & (2**63 - 1)


def _keep_rows(seed: int, b: int, h: int, i0: int, i1: int, S: int, p: float) -> torch.Tensor:
    """Keep mask (bool, CPU) of rows [i0, i1) of head (b, h): [i1 - i0, S]."""
    R = _DROPOUT_ROWS
    gen = torch.Generator(device="cpu")
    blocks = []
    for r in range(i0 // R, (i1 - 1) // R + 1):
        gen.manual_seed(_block_seed(seed, b, h, r))
        blocks.append(torch.rand((R, S), generator=gen) >= p)
    keep = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
    off = (i0 // R) * R
    return keep[i0 - off : i1 - off]


def dropout_keep_mask(seed: int, shape, dropout_p: float, device=None) -> torch.Tensor:
    """The bool keep mask (B, Hq, L, S) that :func:`attention` uses for dropout seed ``seed`` (see
    :func:`draw_seed`); the weights used are ``p * keep / (1 - dropout_p)``."""
    B, Hq, L, S = shape
    rows = [_keep_rows(seed, b, h, 0, L, S, dropout_p) for b in range(B) for h in range(Hq)]
    return torch.stack(rows).view(B, Hq, L, S).to(device)


def _chunk_keep(seed, p_drop, c, G, S, device, dtype):
    """Dropout scale keep / (1 - p) of a chunk: [bb, hc, G, bl, S']."""
    rows = [
        _keep_rows(seed, b, h * G + g, c.i0, c.i1, S, p_drop)[:, : c.sk]
        for b in range(c.b0, c.b1)
        for h in range(c.h0, c.h1)
        for g in range(G)
    ]
    keep = torch.stack(rows).view(c.b1 - c.b0, c.h1 - c.h0, G, c.i1 - c.i0, c.sk)
    return keep.to(device=device, dtype=dtype) * (1.0 / (1.0 - p_drop))


# ----------------------------------------------------------------------------------------------------
# the chunk loop


class _Chunk(NamedTuple):
    b0: int
    b1: int
    h0: int  # kv heads
    h1: int
    i0: int  # query rows
    i1: int
    sk: int  # keys [0, sk) (causal: keys right of the last row's diagonal are skipped)


def _chunks(B, Hkv, G, L, S, causal):
    """Yield the chunks that have at least one key (chunks whose rows are all empty are skipped)."""
    per_row = G * S
    budget = max(CHUNK_ELEMS, 1)
    bl = max(1, min(L, budget // per_row))
    hc = max(1, min(Hkv, budget // (per_row * L))) if bl == L else 1
    bb = max(1, min(B, budget // (per_row * L * Hkv))) if hc == Hkv else 1
    off = 0 if causal in (None, "upper_left") else S - L
    for i0 in range(0, L, bl):
        i1 = min(L, i0 + bl)
        sk = S if causal is None else min(S, i1 + off)
        if sk <= 0:
            continue
        for b0 in range(0, B, bb):
            for h0 in range(0, Hkv, hc):
                yield _Chunk(b0, min(B, b0 + bb), h0, min(Hkv, h0 + hc), i0, i1, sk)


class _Problem(NamedTuple):
    q5: torch.Tensor  # (B, Hkv, G, L, D), input dtype
    k: torch.Tensor  # (B, Hkv, S, D), acc dtype
    v: torch.Tensor  # (B, Hkv, S, Dv), acc dtype
    mask5: torch.Tensor | None  # (B, Hkv, G, L, S) view
    causal: str | None
    scale: float
    softcap: float | None
    acc: torch.dtype


def _scores(pb: _Problem, c: _Chunk, want_capgrad: bool = False):
    """Scores of a chunk: (s [bb, hc, G, bl, S'] with -inf on disallowed keys, masked?, q chunk
    [bb, hc, G*bl, D] times scale, the softcap derivative [bb, hc, G, bl, S'] or None)."""
    bb, hc, bl = c.b1 - c.b0, c.h1 - c.h0, c.i1 - c.i0
    G, D = pb.q5.shape[2], pb.q5.shape[4]
    qc = pb.q5[c.b0 : c.b1, c.h0 : c.h1, :, c.i0 : c.i1].to(pb.acc) * pb.scale  # [bb, hc, G, bl, D]
    qc = qc.reshape(bb, hc, G * bl, D)
    kc = pb.k[c.b0 : c.b1, c.h0 : c.h1, : c.sk]  # [bb, hc, S', D]
    s = torch.matmul(qc, kc.transpose(-1, -2)).view(bb, hc, G, bl, c.sk)  # [bb, hc, G, bl, S']
    capgrad = None
    if pb.softcap is not None:
        cap = pb.softcap
        s.div_(cap).tanh_()
        if want_capgrad:
            capgrad = 1 - s * s  # d(c tanh(x/c))/dx
        s.mul_(cap)
    disallowed = None
    if pb.causal is not None:
        off = 0 if pb.causal == "upper_left" else pb.k.shape[2] - pb.q5.shape[3]
        i = torch.arange(c.i0, c.i1, device=s.device)[:, None]
        j = torch.arange(c.sk, device=s.device)[None, :]
        disallowed = j > i + off  # [bl, S']
    if pb.mask5 is not None:
        mc = pb.mask5[c.b0 : c.b1, c.h0 : c.h1, :, c.i0 : c.i1, : c.sk]  # [bb, hc, G, bl, S'] view
        if mc.dtype == torch.bool:
            excl = ~mc
        else:
            excl = mc <= torch.finfo(mc.dtype).min
            s.add_(mc.to(pb.acc))
        disallowed = excl if disallowed is None else disallowed | excl
    masked = disallowed is not None
    if masked:
        s.masked_fill_(disallowed, _NEG_INF)
    return s, masked, qc, capgrad


def _prepare(q, k, v, mask, causal, scale, softcap):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    q5 = q.unflatten(1, (Hkv, G))  # (B, Hkv, G, L, D) view
    mask5 = None if mask is None else mask.unflatten(1, (Hkv, G))  # (B, Hkv, G, L, S) view
    return _Problem(q5, k.to(acc), v.to(acc), mask5, causal, scale, softcap, acc)


def _forward(pb: _Problem, hooks: Hooks, norm: Normalizer, dropout_p: float, seed: int | None):
    B, Hkv, G, L, _ = pb.q5.shape
    S, Dv = pb.k.shape[2], pb.v.shape[3]
    dev = pb.q5.device
    out5 = torch.zeros(B, Hkv, G, L, Dv, dtype=pb.acc, device=dev)
    stats = {
        name: torch.full((B, Hkv, G, L), val, dtype=pb.acc, device=dev)
        for name, val in zip(norm.stats, norm.empty_stats)
    }
    for c in _chunks(B, Hkv, G, L, S, pb.causal):
        bb, hc, bl = c.b1 - c.b0, c.h1 - c.h0, c.i1 - c.i0
        s, masked, _, _ = _scores(pb, c)
        st = hooks.prepass(norm, s, masked)
        vc = pb.v[c.b0 : c.b1, c.h0 : c.h1, : c.sk]  # [bb, hc, S', Dv]
        sparse = hooks.sparse(norm, s, st) if hooks.sparse is not None else None
        if sparse is not None:  # only r keys per row can be nonzero: scatter their weights, 2 passes
            idx, w = sparse  # [bb, hc, G, bl, r]
            p = s.zero_().scatter_(-1, idx, w)  # [bb, hc, G, bl, S'] (reuses the score buffer)
        else:
            p = hooks.weights(norm, s, st, masked)  # [bb, hc, G, bl, S']
        del s
        if dropout_p > 0:
            p = p * _chunk_keep(seed, dropout_p, c, G, S, dev, pb.acc)
        o = torch.matmul(p.view(bb, hc, G * bl, c.sk), vc)  # [bb, hc, G*bl, Dv]
        out5[c.b0 : c.b1, c.h0 : c.h1, :, c.i0 : c.i1] = o.view(bb, hc, G, bl, Dv)
        for name in stats:
            stats[name][c.b0 : c.b1, c.h0 : c.h1, :, c.i0 : c.i1] = st[name].squeeze(-1)
    return out5, stats


def _backward(pb: _Problem, hooks, norm, dropout_p, seed, stats, dout):
    B, Hkv, G, L, D = pb.q5.shape
    S, Dv = pb.k.shape[2], pb.v.shape[3]
    dev = pb.q5.device
    d5 = dout.unflatten(1, (Hkv, G))  # (B, Hkv, G, L, Dv)
    dq5 = torch.zeros(B, Hkv, G, L, D, dtype=pb.acc, device=dev)
    dk = torch.zeros(B, Hkv, S, D, dtype=pb.acc, device=dev)
    dv = torch.zeros(B, Hkv, S, Dv, dtype=pb.acc, device=dev)
    for c in _chunks(B, Hkv, G, L, S, pb.causal):
        bb, hc, bl = c.b1 - c.b0, c.h1 - c.h0, c.i1 - c.i0
        s, masked, qc, capgrad = _scores(pb, c, want_capgrad=True)
        st = {name: val[c.b0 : c.b1, c.h0 : c.h1, :, c.i0 : c.i1, None] for name, val in stats.items()}
        p = hooks.weights(norm, s, st, masked)  # [bb, hc, G, bl, S']
        kc = pb.k[c.b0 : c.b1, c.h0 : c.h1, : c.sk]  # [bb, hc, S', D]
        vc = pb.v[c.b0 : c.b1, c.h0 : c.h1, : c.sk]  # [bb, hc, S', Dv]
        doc = d5[c.b0 : c.b1, c.h0 : c.h1, :, c.i0 : c.i1].to(pb.acc).reshape(bb, hc, G * bl, Dv)
        dp = torch.matmul(doc, vc.transpose(-1, -2)).view(bb, hc, G, bl, c.sk)  # [bb, hc, G, bl, S']
        pd = p
        if dropout_p > 0:
            keep = _chunk_keep(seed, dropout_p, c, G, S, dev, pb.acc)
            dp = dp * keep
            pd = p * keep
        dv[c.b0 : c.b1, c.h0 : c.h1, : c.sk] += torch.matmul(pd.view(bb, hc, G * bl, c.sk).transpose(-1, -2), doc)
        ds = hooks.dscores(norm, s, p, dp, st)  # [bb, hc, G, bl, S'], 0 off the support
        if capgrad is not None:
            ds = ds * capgrad
        ds = ds.view(bb, hc, G * bl, c.sk)
        dq5[c.b0 : c.b1, c.h0 : c.h1, :, c.i0 : c.i1] = (torch.matmul(ds, kc) * pb.scale).view(bb, hc, G, bl, D)
        dk[c.b0 : c.b1, c.h0 : c.h1, : c.sk] += torch.matmul(ds.transpose(-1, -2), qc)
    return dq5.view(B, Hkv * G, L, D), dk, dv


# ----------------------------------------------------------------------------------------------------
# softmax through torch's CPU flash-attention op


def _compact(mask: torch.Tensor) -> torch.Tensor:
    """The smallest view of a broadcast view: size 1 wherever the stride is 0."""
    return mask[tuple(slice(0, 1) if st == 0 else slice(None) for st in mask.stride())]


def _sdpa_route(q, k, v, mask, causal, softcap, dropout_p):
    """(float mask in q's dtype or None, is_causal) when the SDPA CPU op computes exactly our softmax,
    else None. Conditions: no softcap and no dropout (its dropout RNG is not ours), unit stride on the
    head dim and Dv == Dqk (the op assumes both), causal upper-left (or lower-right with L == S), and a mask that
    converts exactly to q's dtype; excluded entries become -inf (the op would add finfo.min and give a
    fully excluded row the uniform average instead of 0)."""
    if softcap is not None or dropout_p > 0 or q.device.type != "cpu":
        return None
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or v.shape[-1] != q.shape[-1]:
        return None
    L, S = q.shape[2], k.shape[2]
    if causal == "lower_right" and L != S:
        return None
    is_causal = causal is not None
    if mask is None:
        return None, is_causal
    cm = _compact(mask)
    if cm.dtype == torch.bool:
        allowed = cm
        fm = torch.zeros(cm.shape, dtype=q.dtype, device=q.device)
    else:
        lossless = cm.dtype == q.dtype or (
            q.dtype in (torch.float32, torch.float64) and cm.dtype.itemsize < q.dtype.itemsize
        )
        if not lossless:
            return None
        allowed = cm > torch.finfo(cm.dtype).min
        fm = cm.to(q.dtype)
    fm = fm.masked_fill(~allowed, _NEG_INF).expand(mask.shape)
    return fm, is_causal


def _sdpa_forward(q, k, v, fmask, is_causal, scale):
    """aten's CPU flash-attention forward: (out, lse) with lse = 0 for a row with no allowed key."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, is_causal, attn_mask=fmask, scale=scale
    )


def _sdpa_backward(dout, q, k, v, out, lse, fmask, is_causal, scale):
    lse = torch.where(lse == _NEG_INF, torch.zeros((), dtype=lse.dtype), lse)  # back to the op's convention
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.contiguous(), q, k, v, out, lse, 0.0, is_causal, attn_mask=fmask, scale=scale
    )


def _empty_rows(fmask, is_causal, shape):
    """Bool (B, Hq, L): rows with no allowed key, given a -inf float mask (broadcast view) and causal."""
    B, Hq, L, S = shape
    allowed = _compact(fmask) > _NEG_INF  # small broadcastable shape
    if is_causal:
        i = torch.arange(L, device=fmask.device)[:, None]
        j = torch.arange(S, device=fmask.device)[None, :]
        allowed = allowed & (j <= i)
    return ~allowed.any(-1).expand(B, Hq, L)


# ----------------------------------------------------------------------------------------------------
# backend entry points (wrapped as torch.library custom ops by flashmaps.ops)


def aux_shape(normalizer: Normalizer, q, k, v, need_grad: bool) -> tuple[int, ...]:
    """The torch path saves nothing beyond the row statistics."""
    return (0,)


def forward(q, k, v, normalizer: Normalizer, *, mask, causal, scale, softcap, dropout_p, seed, need_grad):
    """-> (out (B, Hq, L, Dv) in v's dtype, [stat (B, Hq, L)] in ``normalizer.stats`` order, aux (0,)).

    Softmax goes through torch's CPU flash op where :func:`_sdpa_route` says it is exact; every other
    case through the chunk loop. ``seed`` fixes the dropout mask (unused when ``dropout_p == 0``)."""
    aux = torch.empty(0, dtype=torch.float32, device=q.device)
    if normalizer.name == "softmax":
        route = _sdpa_route(q, k, v, mask, causal, softcap, dropout_p)
        if route is not None:
            fmask, is_causal = route
            out, lse = _sdpa_forward(q, k, v, fmask, is_causal, scale)
            lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
            if fmask is not None:  # the op reports 0 for a row with no allowed key; the contract says -inf
                lse = lse.masked_fill(_empty_rows(fmask, is_causal, (*q.shape[:3], k.shape[2])), _NEG_INF)
            return out, [lse], aux
    hooks = _hooks(normalizer)
    pb = _prepare(q, k, v, mask, causal, scale, softcap)
    out5, stats = _forward(pb, hooks, normalizer, dropout_p, seed)
    B, Hq, L = q.shape[:3]
    out = out5.view(B, Hq, L, v.shape[3]).to(v.dtype)
    return out, [val.view(B, Hq, L) for val in stats.values()], aux


def backward(dout, q, k, v, out, stats, aux, normalizer: Normalizer, *, mask, causal, scale, softcap,
             dropout_p, seed):
    """Gradients (dq, dk, dv) by recomputing each chunk from q, k, v and the saved row statistics."""
    if normalizer.name == "softmax":
        route = _sdpa_route(q, k, v, mask, causal, softcap, dropout_p)
        if route is not None:
            fmask, is_causal = route
            dq, dk, dv = _sdpa_backward(dout, q, k, v, out, stats[0], fmask, is_causal, scale)
            return dq, dk, dv
    pb = _prepare(q, k, v, mask, causal, scale, softcap)
    B, Hkv, G, L, _ = pb.q5.shape
    st = {n: val.reshape(B, Hkv, G, L) for n, val in zip(normalizer.stats, stats)}
    dq, dk, dv = _backward(pb, _hooks(normalizer), normalizer, dropout_p, seed, st, dout)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _hooks(normalizer: Normalizer) -> Hooks:
    try:
        return HOOKS[normalizer.name]
    except KeyError:
        raise ValueError(
            f"normalizer {normalizer.name!r} has no torch-path hooks; add an entry to flashmaps.torch_path.HOOKS"
        ) from None


def attention(q, k, v, normalizer: Normalizer, *, mask, causal, scale, softcap, dropout_p, return_stats,
              seed=None):
    """The backend contract (see :mod:`flashmaps.functional`): q (B, Hq, L, Dqk), k (B, Hkv, S, Dqk),
    v (B, Hkv, S, Dv) -> out (B, Hq, L, Dv) in v's dtype, or (out, stats) with stats a dict
    name -> (B, Hq, L) float32 (float64 for float64 inputs) tensor. Runs through the custom ops of
    :mod:`flashmaps.ops`; ``seed`` (an int64 scalar tensor) fixes the dropout mask."""
    from . import ops

    return ops.attention("torch", q, k, v, normalizer, mask=mask, causal=causal, scale=scale, softcap=softcap,
                         dropout_p=dropout_p, return_stats=return_stats, seed=seed)
