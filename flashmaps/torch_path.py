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

Normalizers plug in through their units' torch hooks (``flashmaps.normalizers.base``)::

    norm.torch_stats(s, masked) -> st          row statistics from the full score rows (threshold pass)
    norm.torch_weights(s, st, masked) -> p     the normalized weights given the statistics
    norm.torch_dscores(s, p, dp, st) -> ds     backward rule, dp = dO @ V^T (times the dropout scale)
    norm.torch_sparse(s, st) -> (idx, w) | None   the only keys of each row that can be nonzero and their
                                               weights; the forward scatters them (no dense pass)

``masked`` says whether any key of the chunk may be disallowed (so the unmasked case skips the
``where``s). Statistics whose name starts with ``_`` stay inside the chunk. The chunk loop never names a
normalizer. Exact thresholds (entmax15's tau, top-k's k-th score) are computed on full rows
(``normalizers.rows.exact_threshold``).

A normalizer may run a call natively instead (``torch_native_forward`` / ``torch_native_backward``):
softmax without dropout or softcap dispatches to torch's CPU flash-attention op whenever the semantics
match exactly (``flashmaps.normalizers.softmax``).

Backward: :func:`backward` (wrapped with :func:`forward` as torch.library custom ops by
:mod:`flashmaps.ops`) gets q, k, v and the row statistics only, and recomputes each chunk's scores and weights from them (no autograd graph over the loop, no
stored score matrix).

Dropout: one seed is drawn from torch's default generator per call (:func:`draw_seed`); the keep mask of
rows ``[16 r, 16 r + 16)`` of head ``(b, h)`` comes from a ``torch.Generator`` seeded with a mix of
``(seed, b, h, r)``, so forward and backward regenerate it identically, whatever the chunking.
:func:`dropout_keep_mask` rebuilds the whole mask for tests.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .normalizers import Normalizer
from .window import bounds

__all__ = ["attention", "draw_seed", "dropout_keep_mask", "CHUNK_ELEMS"]

#: scores per chunk (about 4 MiB of float32); tests shrink it to exercise many chunks
CHUNK_ELEMS = 1 << 20
#: rows per dropout-generator block
_DROPOUT_ROWS = 16

_NEG_INF = float("-inf")


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
        _keep_rows(seed, b, h * G + g, c.i0, c.i1, S, p_drop)[:, c.k0 : c.sk]
        for b in range(c.b0, c.b1)
        for h in range(c.h0, c.h1)
        for g in range(G)
    ]
    keep = torch.stack(rows).view(c.b1 - c.b0, c.h1 - c.h0, G, c.i1 - c.i0, c.sk - c.k0)
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
    sk: int  # keys [k0, sk): causal / windows skip the keys outside every row's band (flashmaps.window)
    k0: int = 0


def _chunks(B, Hkv, G, L, S, causal):
    """Yield the chunks that have at least one key (chunks whose rows are all empty are skipped)."""
    band = bounds(causal, L, S)
    width = S
    if band.left_off is not None and band.right_off is not None:
        width = max(1, min(S, band.right_off - band.left_off + 1))
    per_row = G * width
    budget = max(CHUNK_ELEMS, 1)
    bl = max(1, min(L, budget // per_row))
    if width < S:
        bl = min(bl, max(width, 64))  # a chunk reads about bl + width keys: keep it near the band
    hc = max(1, min(Hkv, budget // (per_row * L))) if bl == L else 1
    bb = max(1, min(B, budget // (per_row * L * Hkv))) if hc == Hkv else 1
    for i0 in range(0, L, bl):
        i1 = min(L, i0 + bl)
        sk = S if band.right_off is None else min(S, i1 + band.right_off)
        k0 = 0 if band.left_off is None else min(S, max(0, i0 + band.left_off))
        if sk <= k0:
            continue
        for b0 in range(0, B, bb):
            for h0 in range(0, Hkv, hc):
                yield _Chunk(b0, min(B, b0 + bb), h0, min(Hkv, h0 + hc), i0, i1, sk, k0)


class _Problem(NamedTuple):
    q5: torch.Tensor  # (B, Hkv, G, L, D), input dtype
    k: torch.Tensor  # (B, Hkv, S, D), acc dtype
    v: torch.Tensor  # (B, Hkv, S, Dv), acc dtype
    mask5: torch.Tensor | None  # (B, Hkv, G, L, S) view
    causal: str | None
    scale: float
    softcap: float | None
    acc: torch.dtype
    norm: Normalizer | None = None  # its score form ("distance": the power n) and score noise (stochastic)
    seed: int = 0


#: float32's smallest normal: the floor of the distance form's scale * ||q - k||^2
_TINY = torch.finfo(torch.float32).tiny


def _scores(pb: _Problem, c: _Chunk, want_capgrad: bool = False):
    """Scores of a chunk: (s [bb, hc, G, bl, S'] with -inf on disallowed keys, masked?, q chunk
    [bb, hc, G*bl, D] times scale (unscaled in the distance form), the chain factor ds_final/ds
    [bb, hc, G, bl, S'] of the softcap and the distance form, or None). A stochastic normalizer's noise is
    added after the mask."""
    bb, hc, bl = c.b1 - c.b0, c.h1 - c.h0, c.i1 - c.i0
    G, D = pb.q5.shape[2], pb.q5.shape[4]
    distance = pb.norm is not None and pb.norm.score == "distance"   # q unscaled: the scale is inside the log
    qc = pb.q5[c.b0 : c.b1, c.h0 : c.h1, :, c.i0 : c.i1].to(pb.acc) * (1.0 if distance else pb.scale)
    qc = qc.reshape(bb, hc, G * bl, D)  # [bb, hc, G*bl, D]
    kc = pb.k[c.b0 : c.b1, c.h0 : c.h1, c.k0 : c.sk]  # [bb, hc, S', D]
    s = torch.matmul(qc, kc.transpose(-1, -2)).view(bb, hc, G, bl, c.sk - c.k0)  # [bb, hc, G, bl, S']
    capgrad = None
    if distance:  # s = -(n/2) ln(max(scale d2, tiny)), d2 = |q|^2 + |k|^2 - 2 q.k; chain = ds/dd2 * 2
        d2 = (qc.square().sum(-1)[..., None] + kc.square().sum(-1)[..., None, :]).view(bb, hc, G, bl, c.sk - c.k0)
        d2 = (d2 - 2 * s).clamp_min_(0)
        ok = d2 * pb.scale > _TINY
        n = pb.norm.score_power
        s = (d2 * pb.scale).clamp_min(_TINY).log_().mul_(-0.5 * n)
        if want_capgrad:
            capgrad = torch.where(ok, -n / torch.where(ok, d2, torch.ones((), dtype=d2.dtype)), 0.0)
    if pb.softcap is not None:
        cap = pb.softcap
        s.div_(cap).tanh_()
        if want_capgrad:
            capgrad = 1 - s * s if capgrad is None else capgrad * (1 - s * s)  # d(c tanh(x/c))/dx
        s.mul_(cap)
    disallowed = None
    if pb.causal is not None:
        band = bounds(pb.causal, pb.q5.shape[3], pb.k.shape[2])
        i = torch.arange(c.i0, c.i1, device=s.device)[:, None]
        j = torch.arange(c.k0, c.sk, device=s.device)[None, :]
        if band.right_off is not None:
            disallowed = j > i + band.right_off  # [bl, S']
        if band.left_off is not None:
            left = j < i + band.left_off
            disallowed = left if disallowed is None else disallowed | left
    if pb.mask5 is not None:
        mc = pb.mask5[c.b0 : c.b1, c.h0 : c.h1, :, c.i0 : c.i1, c.k0 : c.sk]  # [bb, hc, G, bl, S'] view
        if mc.dtype == torch.bool:
            excl = ~mc
        else:
            excl = mc <= torch.finfo(mc.dtype).min
            s.add_(mc.to(pb.acc))
        disallowed = excl if disallowed is None else disallowed | excl
    masked = disallowed is not None
    if masked:
        s.masked_fill_(disallowed, _NEG_INF)
    if pb.norm is not None and pb.norm.stochastic:  # the score noise of (b * Hq + h, i, j)
        ar = functools.partial(torch.arange, dtype=torch.int64, device=s.device)
        h = ar(c.h0, c.h1)[:, None] * G + ar(G)                                       # [hc, G] query heads
        bh = ar(c.b0, c.b1)[:, None, None] * (pb.q5.shape[1] * G) + h                 # [bb, hc, G]
        g = pb.norm.score_noise(pb.seed, bh[..., None, None], ar(c.i0, c.i1)[:, None], ar(c.k0, c.sk))
        s.add_(g.to(s.dtype))                                                         # -inf stays -inf
    return s, masked, qc, capgrad


def _nonfinite_rows(s: torch.Tensor):
    """The non-finite rule: rows [bb, hc, G, bl, 1] with a NaN or +inf score give NaN (output, statistics,
    gradients) whatever the normalizer; None when there are none (the usual case: one max per row). Their
    scores are zeroed in place so that no normalizer's threshold code sees them."""
    m = s.amax(-1, keepdim=True)
    bad = torch.isnan(m) | (m == float("inf"))
    if not bool(bad.any()):
        return None
    s.masked_fill_(bad, 0.0)
    return bad


def _prepare(q, k, v, mask, causal, scale, softcap, norm=None, seed=0):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    q5 = q.unflatten(1, (Hkv, G))  # (B, Hkv, G, L, D) view
    mask5 = None if mask is None else mask.unflatten(1, (Hkv, G))  # (B, Hkv, G, L, S) view
    return _Problem(q5, k.to(acc), v.to(acc), mask5, causal, scale, softcap, acc, norm, seed)


def _forward(pb: _Problem, norm: Normalizer, dropout_p: float, seed: int | None, threshold=None):
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
        hn = norm.for_heads(c.h0 * G, c.h1 * G)  # the chunk's query heads (per-head parameters)
        s, masked, _, _ = _scores(pb, c)
        bad = _nonfinite_rows(s)
        vc = pb.v[c.b0 : c.b1, c.h0 : c.h1, c.k0 : c.sk]  # [bb, hc, S', Dv]
        if threshold is not None:  # the two-phase protocol's phase 2: the weights at the union's threshold
            thr = {n: val[c.b0 : c.b1, c.h0 : c.h1, :, c.i0 : c.i1, None] for n, val in threshold.items()}
            st, p = hn.torch_at_threshold(s, thr, masked)
            sparse = None
        else:
            st = hn.torch_stats(s, masked)
            sparse, p = hn.torch_sparse(s, st), None
        if sparse is not None:  # only r keys per row can be nonzero: scatter their weights, 2 passes
            idx, w = sparse  # [bb, hc, G, bl, r]
            p = s.zero_().scatter_(-1, idx, w)  # [bb, hc, G, bl, S'] (reuses the score buffer)
        elif p is None:
            p = hn.torch_weights(s, st, masked)  # [bb, hc, G, bl, S']
        del s
        if bad is not None:
            p = p.masked_fill(bad, float("nan"))
            st = {n: val.masked_fill(bad, float("nan")) for n, val in st.items() if not n.startswith("_")}
        if dropout_p > 0:
            p = p * _chunk_keep(seed, dropout_p, c, G, S, dev, pb.acc)
        o = torch.matmul(p.view(bb, hc, G * bl, c.sk - c.k0), vc)  # [bb, hc, G*bl, Dv]
        out5[c.b0 : c.b1, c.h0 : c.h1, :, c.i0 : c.i1] = o.view(bb, hc, G, bl, Dv)
        for name in stats:
            stats[name][c.b0 : c.b1, c.h0 : c.h1, :, c.i0 : c.i1] = st[name].squeeze(-1)
    return out5, stats


class _AtThreshold(NamedTuple):
    """The two-phase protocol's phase 2 in `_backward` ({name: (B, Hkv, G, L)} each): the union's threshold, the
    gradients of the part's own statistics (``Normalizer.torch_dscores_at_threshold``), and the threshold's
    gradients (zeros, filled by the chunk loop)."""

    thr: dict
    g_st: dict
    dthr: dict


def _rows_of(val: torch.Tensor, c: _Chunk) -> torch.Tensor:
    """The chunk's rows [bb, hc, G, bl, 1] of a (B, Hkv, G, L) row tensor."""
    return val[c.b0 : c.b1, c.h0 : c.h1, :, c.i0 : c.i1, None]


def _backward(pb: _Problem, norm, dropout_p, seed, stats, dout, shift=None, at=None):
    B, Hkv, G, L, D = pb.q5.shape
    S, Dv = pb.k.shape[2], pb.v.shape[3]
    dev = pb.q5.device
    d5 = dout.unflatten(1, (Hkv, G))  # (B, Hkv, G, L, Dv)
    dq5 = torch.zeros(B, Hkv, G, L, D, dtype=pb.acc, device=dev)
    dk = torch.zeros(B, Hkv, S, D, dtype=pb.acc, device=dev)
    dv = torch.zeros(B, Hkv, S, Dv, dtype=pb.acc, device=dev)
    for c in _chunks(B, Hkv, G, L, S, pb.causal):
        bb, hc, bl = c.b1 - c.b0, c.h1 - c.h0, c.i1 - c.i0
        hn = norm.for_heads(c.h0 * G, c.h1 * G)  # the chunk's query heads (per-head parameters)
        s, masked, qc, capgrad = _scores(pb, c, want_capgrad=True)
        bad = _nonfinite_rows(s)
        st = {name: val[c.b0 : c.b1, c.h0 : c.h1, :, c.i0 : c.i1, None] for name, val in stats.items()}
        if bad is not None:
            st = {name: val.masked_fill(bad, 0.0) for name, val in st.items()}
        if at is None:
            p = hn.torch_weights(s, st, masked)  # [bb, hc, G, bl, S']
        else:  # phase 2 of the two-phase protocol: the weights at the union's threshold
            thr = {n: _rows_of(val, c) for n, val in at.thr.items()}
            st, p = hn.torch_at_threshold(s, thr, masked)
        if bad is not None:
            p = p.masked_fill(bad, float("nan"))
        kc = pb.k[c.b0 : c.b1, c.h0 : c.h1, c.k0 : c.sk]  # [bb, hc, S', D]
        vc = pb.v[c.b0 : c.b1, c.h0 : c.h1, c.k0 : c.sk]  # [bb, hc, S', Dv]
        doc = d5[c.b0 : c.b1, c.h0 : c.h1, :, c.i0 : c.i1].to(pb.acc).reshape(bb, hc, G * bl, Dv)
        dp = torch.matmul(doc, vc.transpose(-1, -2)).view(bb, hc, G, bl, c.sk - c.k0)  # [bb, hc, G, bl, S']
        pd = p
        if dropout_p > 0:
            keep = _chunk_keep(seed, dropout_p, c, G, S, dev, pb.acc)
            dp = dp * keep
            pd = p * keep
        dv[c.b0 : c.b1, c.h0 : c.h1, c.k0 : c.sk] += torch.matmul(pd.view(bb, hc, G * bl, c.sk - c.k0).transpose(-1, -2),
                                                                  doc)
        if at is not None:  # the threshold counts as an input: its gradient per row (Normalizer hook)
            ds, dthr = hn.torch_dscores_at_threshold(s, p, dp, thr, st, {n: _rows_of(g, c) for n, g in at.g_st.items()})
            for name, x in dthr.items():
                _rows_of(at.dthr[name], c).copy_(x)
        elif shift is None:
            ds = hn.torch_dscores(s, p, dp, st)  # [bb, hc, G, bl, S'], 0 off the support
        else:  # the row term less the shift: one extra key with s = 0, p = 1, dp = -shift (Normalizer.stat_delta)
            sh = shift[c.b0 : c.b1, c.h0 : c.h1, :, c.i0 : c.i1, None]
            ds = hn.torch_dscores(*(torch.cat([x, y.expand_as(sh)], -1) for x, y in
                                    ((s, s.new_zeros(())), (p, p.new_ones(())), (dp, -sh))), st)[..., :-1]
        if bad is not None:
            ds = ds.masked_fill(bad, float("nan"))
        if capgrad is not None:
            ds = ds * capgrad
        ds = ds.view(bb, hc, G * bl, c.sk - c.k0)
        if pb.norm.score == "distance":  # dq_i = sum_j ds_ij (q_i - k_j), dk_j = sum_i ds_ij (k_j - q_i)
            dqc = qc * ds.sum(-1, keepdim=True) - torch.matmul(ds, kc)
            dk[c.b0 : c.b1, c.h0 : c.h1, c.k0 : c.sk] += kc * ds.sum(-2)[..., None] - torch.matmul(ds.transpose(-1, -2), qc)
        else:
            dqc = torch.matmul(ds, kc) * pb.scale
            dk[c.b0 : c.b1, c.h0 : c.h1, c.k0 : c.sk] += torch.matmul(ds.transpose(-1, -2), qc)
        dq5[c.b0 : c.b1, c.h0 : c.h1, :, c.i0 : c.i1] = dqc.view(bb, hc, G, bl, D)
    return dq5.view(B, Hkv * G, L, D), dk, dv


# ----------------------------------------------------------------------------------------------------
# backend entry points (wrapped as torch.library custom ops by flashmaps.ops)


def extras_shape(normalizer: Normalizer, q, k, v, need_grad: bool) -> tuple[int, ...]:
    """The torch path saves nothing beyond the row statistics."""
    return (0,)


def forward(q, k, v, normalizer: Normalizer, *, mask, causal, scale, softcap, dropout_p, seed, need_grad,
            threshold=None):
    """-> (out (B, Hq, L, Dv) in v's dtype, [stat (B, Hq, L)] in ``normalizer.stats`` order, extras (0,)).

    The normalizer's ``torch_native_forward`` first (softmax: torch's CPU flash op where it computes exactly
    our softmax), else the chunk loop. ``seed`` fixes the dropout mask (unused when ``dropout_p == 0``).
    ``threshold``: a two-phase unit's phase 2 (``Normalizer.torch_at_threshold``) at the union's threshold
    {name: (B, Hq, L)} (its backward: :func:`backward_at_threshold`)."""
    extras = torch.empty(0, dtype=torch.float32, device=q.device)
    native = None if threshold is not None else normalizer.torch_native_forward(
        q, k, v, mask=mask, causal=causal, scale=scale, softcap=softcap, dropout_p=dropout_p)
    if native is not None:
        out, stats = native
        return out, stats, extras
    pb = _prepare(q, k, v, mask, causal, scale, softcap, normalizer, seed)
    if threshold is not None:
        B, Hkv, G, L = pb.q5.shape[:4]
        threshold = {n: val.to(pb.acc).reshape(B, Hkv, G, L) for n, val in threshold.items()}
    out5, stats = _forward(pb, normalizer.for_keys(k.shape[2]), dropout_p, seed, threshold)
    B, Hq, L = q.shape[:3]
    out = out5.view(B, Hq, L, v.shape[3]).to(v.dtype)
    return out, [val.view(B, Hq, L) for val in stats.values()], extras


def threshold_candidates(q, k, normalizer: Normalizer, *, mask, causal, scale, softcap) -> torch.Tensor:
    """Phase 1 of a two-phase unit (``Normalizer.threshold_candidates``) over the keys k: (B, Hq, L, m) natural-unit
    scores in the accumulation dtype, -inf padding (rows with no allowed key: all -inf). The union's threshold
    over several key sets is ``normalizer.candidate_threshold`` of their candidates concatenated (the candidates of
    all keys give the call's own threshold). Scores as the forward computes them, one chunk at a time."""
    pb = _prepare(q, k, k[..., :1], mask, causal, scale, softcap, normalizer)
    B, Hkv, G, L, _ = pb.q5.shape
    norm = normalizer.for_keys(k.shape[2])
    parts = []
    for c in _chunks(B, Hkv, G, L, k.shape[2], pb.causal):
        s, _, _, _ = _scores(pb, c)
        parts.append((c, norm.for_heads(c.h0 * G, c.h1 * G).threshold_candidates(s)))  # [bb, hc, G, bl, m_c]
    m = max([x.shape[-1] for _, x in parts], default=1)
    cand = torch.full((B, Hkv, G, L, m), _NEG_INF, dtype=pb.acc, device=q.device)
    for c, x in parts:
        cand[c.b0 : c.b1, c.h0 : c.h1, :, c.i0 : c.i1, : x.shape[-1]] = x
    return cand.view(B, Hkv * G, L, m)


def backward(dout, q, k, v, out, stats, extras, normalizer: Normalizer, *, mask, causal, scale, softcap,
             dropout_p, seed, delta_shift=None, deterministic=None):
    """Gradients (dq, dk, dv) by recomputing each chunk from q, k, v and the saved row statistics (or the
    normalizer's ``torch_native_backward``, when its forward ran natively and ``delta_shift`` is None).
    ``delta_shift``: None or (B, Hq, L), the statistics' gradients as a shift of the row term
    (``Normalizer.stat_delta``). ``deterministic`` is accepted for the backend contract and unused: this path
    has no atomics of its own (torch's ops follow ``torch.use_deterministic_algorithms``)."""
    if delta_shift is None:
        native = normalizer.torch_native_backward(dout, q, k, v, out, stats, mask=mask, causal=causal, scale=scale,
                                                  softcap=softcap, dropout_p=dropout_p)
        if native is not None:
            return native
    pb = _prepare(q, k, v, mask, causal, scale, softcap, normalizer, seed)
    B, Hkv, G, L, _ = pb.q5.shape
    st = {n: val.reshape(B, Hkv, G, L) for n, val in zip(normalizer.stats, stats)}
    shift = None if delta_shift is None else delta_shift.to(pb.acc).reshape(B, Hkv, G, L)
    dq, dk, dv = _backward(pb, normalizer.for_keys(k.shape[2]), dropout_p, seed, st, dout, shift)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def backward_at_threshold(dout, q, k, v, normalizer: Normalizer, threshold: dict, stat_grads: dict, *, mask, causal,
                          scale, softcap):
    """Gradients of phase 2 of the two-phase protocol (``forward(..., threshold=)``) with the threshold as an input:
    (dq, dk, dv, {name: (B, Hq, L)} the gradients of ``threshold``'s entries). ``stat_grads``: {name: (B, Hq, L)}
    the gradients of the part's own statistics (those ``threshold`` does not give; top-k's lse). Recomputes each
    chunk's weights at the threshold (``Normalizer.torch_at_threshold``); the rule is
    ``Normalizer.torch_dscores_at_threshold``."""
    pb = _prepare(q, k, v, mask, causal, scale, softcap, normalizer)
    B, Hkv, G, L, _ = pb.q5.shape
    rows = {n: x.to(pb.acc).reshape(B, Hkv, G, L) for n, x in threshold.items()}
    at = _AtThreshold(rows, {n: g.to(pb.acc).reshape(B, Hkv, G, L) for n, g in stat_grads.items() if g is not None},
                      {n: torch.zeros_like(x) for n, x in rows.items()})
    dq, dk, dv = _backward(pb, normalizer.for_keys(k.shape[2]), 0.0, 0, {}, dout, at=at)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), {n: x.view(B, Hkv * G, L) for n, x in at.dthr.items()}


def threshold_candidates_backward(grad, q, k, normalizer: Normalizer, *, mask, causal, scale, softcap):
    """The gradient of :func:`threshold_candidates` (the dot-product score): (dq, dk) from ``grad`` (B, Hq, L, m)
    w.r.t. its candidates. Each chunk's candidates are recomputed from its scores under autograd (the unit's
    ``threshold_candidates`` is torch ops: values picked from the scores), then dq, dk as in the backward."""
    pb = _prepare(q, k, k[..., :1], mask, causal, scale, softcap, normalizer)
    B, Hkv, G, L, D = pb.q5.shape
    S = k.shape[2]
    g5 = grad.to(pb.acc).reshape(B, Hkv, G, L, -1)
    dq5 = torch.zeros(B, Hkv, G, L, D, dtype=pb.acc, device=q.device)
    dk = torch.zeros(B, Hkv, S, D, dtype=pb.acc, device=q.device)
    norm = normalizer.for_keys(S)
    for c in _chunks(B, Hkv, G, L, S, pb.causal):
        bb, hc, bl = c.b1 - c.b0, c.h1 - c.h0, c.i1 - c.i0
        s, _, qc, capgrad = _scores(pb, c, want_capgrad=True)
        with torch.enable_grad():
            leaf = s.detach().requires_grad_()
            cand = norm.for_heads(c.h0 * G, c.h1 * G).threshold_candidates(leaf)   # [bb, hc, G, bl, m_c]
            g = g5[c.b0 : c.b1, c.h0 : c.h1, :, c.i0 : c.i1, : cand.shape[-1]]
            ds = torch.autograd.grad(cand, leaf, g)[0] if cand.requires_grad else torch.zeros_like(s)
        if capgrad is not None:
            ds = ds * capgrad
        ds = ds.view(bb, hc, G * bl, c.sk - c.k0)
        kc = pb.k[c.b0 : c.b1, c.h0 : c.h1, c.k0 : c.sk]  # [bb, hc, S', D]
        dq5[c.b0 : c.b1, c.h0 : c.h1, :, c.i0 : c.i1] = (torch.matmul(ds, kc) * pb.scale).view(bb, hc, G, bl, D)
        dk[c.b0 : c.b1, c.h0 : c.h1, c.k0 : c.sk] += torch.matmul(ds.transpose(-1, -2), qc)
    return dq5.view(B, Hkv * G, L, D).to(q.dtype), dk.to(k.dtype)


def attention(q, k, v, normalizer: Normalizer, *, mask, causal, scale, softcap, dropout_p, return_stats,
              seed=None):
    """The backend contract (see :mod:`flashmaps.functional`): q (B, Hq, L, Dqk), k (B, Hkv, S, Dqk),
    v (B, Hkv, S, Dv) -> out (B, Hq, L, Dv) in v's dtype, or (out, stats) with stats a dict
    name -> (B, Hq, L) float32 (float64 for float64 inputs) tensor. Runs through the custom ops of
    :mod:`flashmaps.ops`; ``seed`` (an int64 scalar tensor) fixes the dropout mask."""
    from . import ops

    return ops.attention("torch", q, k, v, normalizer, mask=mask, causal=causal, scale=scale, softcap=softcap,
                         dropout_p=dropout_p, return_stats=return_stats, seed=seed)
