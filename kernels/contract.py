"""The contract between the kernels and a normalizer: the log base, the argument bundles, and `Hooks`.

Glossary (one program owns BM query rows; a tile is BM rows x BN keys)::

    i, j        query row in [0, L), key in [0, S)
    qk          q_i . k_j in fp32 (tl.dot)                                        # [BM, BN]
    s           the score in KERNEL UNITS: s = u * s_nat, where
                  s_nat = scale * qk                      (no softcap)
                  s_nat = c * tanh(scale * qk / c)        (softcap c)
                  s_nat = s_nat + bias_ij                 (float mask, after the cap)
                  s_nat = s_nat + g_ij                    (Hooks.has_noise: the normalizer's noise, after the bias)
                with scale * qk replaced by -(n/2) ln(max(scale ||q_i - k_j||^2, tiny)) in the distance form
                (Static.DISTANCE, `tiles.log_distance`; n, scale in ScoreScale.dist_mult / dist_scale)
                and u is the normalizer's score unit (`Hooks.unit`): LOG2E for the exp2-based
                normalizers (softmax, topk), 1/2 for entmax15 (so s is z = s_nat/2), 1 for taylor.
                The launcher folds u into the scalars (`fold_score_unit`); kernels never multiply by
                LOG2E themselves. LOG2E / LN2 below are the ONE place the log base is named.
    allowed     j < S, and (causal) j <= i + causal_off, and (window, ST.LEFT) j >= i + left_off, and (bool mask) m_ij, and (float mask)
                bias_ij > finfo(mask dtype).min (-inf and finfo.min EXCLUDE the key)
    masked tile a tile that needs the `allowed` test (diagonal causal tiles, the ragged last tile, every
                tile when a user mask is given). CONVENTION: in a masked tile s = -inf exactly where
                the key is not allowed; unmasked tiles contain no -inf.

Runtime argument bundles (named tuples: Triton passes their fields as kernel arguments)::

    View        a 4-D tensor (batch, head, row, col): pointer and its four strides
    Dims        Hq, group (= Hq // Hkv), L, S, causal_off (0 upper-left, S - L lower-right; a window's right
                bound: off + right), left_off (a window's left bound: off - left; `flashmaps.window`); with
                Static.VARLEN also the packed sequences' cu_q, cu_k, alignment and row stride
    ScoreScale  qk_scale, cap_mult, bias_mult (= u), mask_min (float masks: entries <= it exclude)
    Keys        one program's key side, built in the kernel: k base pointer and strides, the mask
                pointer of each query row, lengths and the ScoreScale (everything `tiles.score_tile` needs),
                and the block mask at the program's cell rows (Static.BLOCK_MASK)
    Block       one program's query block: q tile [BM, BD], row indices, and the key bounds
                (keys [0, full_end) unmasked whole tiles, [full_end, hi) masked tiles, >= hi never read; with
                a window's left bound, ST.LEFT: [lo, full_lo) masked, [full_lo, full_end) unmasked, < lo never read)

Compile-time bundles (passed as ONE ``tl.constexpr`` each; a constexpr field inside a runtime tuple does
not compile, a whole tuple as a constexpr does)::

    Static      the flags of a call: head dims and their padded blocks, causal, mask kind, softcap,
                dot precision, dropout, dtype (the autotuner keys on it), window, split-KV, distance form, and
                the backward's atomic dQ (ATOMIC_DQ: every normalizer gets it through the one dK/dV kernel),
                and the block mask (BLOCK_MASK, below)
    Hooks       the normalizer: its ``@triton.jit`` functions and flags (see the class)

Block mask (Static.BLOCK_MASK; `kernels.blockmask`): one int8 liveness bit per CELL of MASK_BLOCK query rows x
MASK_BLOCK keys, (B, Hq, cdiv(L, MASK_PAD) * MASK_PAD / MASK_BLOCK, cdiv(S, MASK_PAD) * MASK_PAD / MASK_BLOCK)
contiguous, padded so that every tile of every config (BM, BN: multiples of MASK_BLOCK dividing MASK_PAD)
covers whole cells in bounds. 0 = dead: every key of the cell has zero weight for every row of the cell
(s < Hooks.live_floor(thr), or not allowed). Written by the forward's pre-pass only, against a lower bound of the
final threshold (the threshold engine's first bracket pass: the bracket's lower end; top-k's running buffer: its
running k-th largest), so conservative; read by both backward kernels, which skip a tile pair whose cells are
all 0 before its Q K^T product (the output pass neither reads nor marks it).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, NamedTuple, Optional

import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------------
# the log base: kernels use exp2/log2; scores of the exp-based normalizers are carried in log2 units.

#: log2(e): natural-log scores times LOG2E are log2-unit scores (exp(s) == exp2(s * LOG2E))
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
#: ln(2): log2-unit values times LN2 are natural-log values (lse = lse2 * LN2)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)

#: Static.MASK_KIND values (constexpr: kernels compare against them; ``.value`` in Python)
MASK_NONE: tl.constexpr = tl.constexpr(0)
MASK_BOOL: tl.constexpr = tl.constexpr(1)
MASK_FLOAT: tl.constexpr = tl.constexpr(2)

#: block mask (Static.BLOCK_MASK): query rows and keys per cell (the smallest BM, BN of any config)
MASK_BLOCK: tl.constexpr = tl.constexpr(16)
#: the block mask's rows and columns are padded to a multiple of this many rows / keys (the largest BM, BN)
MASK_PAD: tl.constexpr = tl.constexpr(128)


def fold_score_unit(scale: float, softcap: Optional[float], unit: float) -> tuple[float, float]:
    """Kernel scalars (qk_scale, cap_mult) with the score unit ``unit`` folded in.

    Kernel score: ``s = qk * qk_scale`` (no cap) or ``s = cap_mult * tanh(qk * qk_scale)`` (cap ``c``),
    equal to ``unit * s_nat``. The float-mask bias is multiplied by ``unit`` too (``bias_mult``)."""
    if softcap is None:
        return scale * unit, 0.0
    return scale / softcap, softcap * unit


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


# ---------------------------------------------------------------------------------------------------
# argument bundles


class View(NamedTuple):
    """A 4-D tensor view (batch, head, row, col): its pointer and strides."""

    ptr: Any
    sb: Any
    sh: Any
    sr: Any
    sc: Any

    @classmethod
    def of(cls, t) -> "View":
        return cls(t, *t.stride())


class Dims(NamedTuple):
    B: Any
    Hq: Any
    group: Any
    L: Any
    S: Any
    causal_off: Any
    left_off: Any     # window: key j is allowed for row i only if j >= i + left_off (read when ST.LEFT)
    split_keys: Any   # split-KV (ST.SPLIT): keys per split, a multiple of every BN; 0 otherwise
    # packed variable-length sequences (ST.VARLEN; 0 otherwise): B sequences, grid axis 1 = (sequence, head);
    # `tiles.varlen_dims` turns these into ONE sequence's Dims (L, S, offsets of that sequence, q0 its first row)
    cu_q: Any = 0        # (B + 1,) int32 first packed query row of each sequence, then total_q
    cu_k: Any = 0        # (B + 1,) int32 first packed key of each sequence, then total_k
    align: Any = 0       # 1: causal_off / left_off are lower-right aligned per sequence (+ S_b - L_b), 0: upper-left
    row_stride: Any = 0  # total_q: the row outputs (stats, thr, g_sum, g_out, BwdRows, DQA) are (Hq, total_q)
    q0: Any = 0          # (inside the kernels) the sequence's first packed row


class ScoreScale(NamedTuple):
    qk_scale: Any
    cap_mult: Any
    bias_mult: Any
    mask_min: Any
    dist_scale: Any   # distance form (Static.DISTANCE): the scale inside the log (1.0 otherwise)
    dist_mult: Any    # distance form: -(n/2), s_pre = dist_mult * ln(max(dist_scale * ||q - k||^2, tiny))


class Dropout(NamedTuple):
    """dropout_p and scale = 1 / (1 - dropout_p) (the seed is a kernel argument of its own: it must not be
    specialized on)."""

    p: Any
    scale: Any


class Keys(NamedTuple):
    """What a score tile of one program needs (built inside the kernel)."""

    k: Any            # K pointer at (batch, kv head)
    sn: Any           # K stride along keys
    sd: Any           # K stride along the head dim
    mask_rows: Any    # [BM, 1] mask pointers of the program's query rows (any placeholder when no mask)
    mask_sn: Any      # mask stride along keys
    L: Any
    S: Any
    causal_off: Any
    scale: Any        # ScoreScale
    left_off: Any     # Dims.left_off
    seed: Any         # the call's seed (score noise, Hooks.has_noise)
    row_base: Any     # (b * Hq + h) * L, int64 (as dropout's): the noise's head index is row_base // L
    live: Any = 0     # Static.BLOCK_MASK: the block mask's int8 pointer at the block's first cell row (blockmask)
    kd: Any = None    # Static.TMA: K's tensor descriptor at (batch, kv head) (`tiles.kv_desc`), else None


class Block(NamedTuple):
    """One program's query block (built inside the kernel)."""

    q: Any            # [BM, BD] query tile
    offs_m: Any       # [BM] row indices
    i: Any            # [BM, 1] row indices
    full_end: Any     # keys [0, full_end): whole tiles every row attends (no mask arithmetic)
    hi: Any           # keys [full_end, hi): masked tiles; keys >= hi are never read
    lo: Any           # ST.LEFT: keys < lo are never read, [lo, full_lo) are masked tiles (else both 0)
    full_lo: Any


class Static(NamedTuple):
    """Compile-time flags of a call (one ``tl.constexpr``)."""

    HEAD_D: int
    HEAD_DV: int
    BD: int           # HEAD_D padded to a power of two >= 16
    BDV: int
    IS_CAUSAL: bool
    MASK_KIND: int    # MASK_NONE, MASK_BOOL (a uint8 view) or MASK_FLOAT
    SOFTCAP: bool     # then qk_scale = scale / c and cap_mult = c * u
    DOT_PREC: str     # tl.dot input precision for fp32 ("ieee", "tf32", "tf32x3"), or "upcast" (interpreter:
                      # Triton 3.6's interpreter multiplies bf16 operands wrongly; upcast to fp32 first, exact)
    DROPOUT: bool
    DTYPE: str        # the input dtype (an autotune key: the bundles hide the tensors' dtypes from it)
    PAD_D: bool       # BD != HEAD_D: loads of the head dim need a bound check
    PAD_DV: bool
    LEFT: bool = False       # a sliding window's left bound (Dims.left_off); IS_CAUSAL is the right bound
    SPLIT: bool = False      # split-KV forward: program (query block, split) folds the keys of its split only and
                             # writes a partial result (fp32 O and statistics at [split]); the launcher merges them
    DISTANCE: bool = False   # the distance form of the score (Normalizer.score == "distance"): the raw score
                             # is -(n/2) ln(max(scale ||q - k||^2, tiny)) instead of scale * q.k (tiles.score_tile)
    ATOMIC_DQ: bool = False  # backward: the dK/dV kernel also adds each tile's dQ into an fp32 buffer with atomics
                             # (5 matrix products per tile pair instead of 7; the dQ kernel is not launched;
                             # summation order varies run to run). False: the deterministic two-kernel backward
    GIVEN_THR: bool = False  # the two-phase protocol's second phase (sparse units): no pre-pass, thr is LOADED from
                             # RowOut.thr (kernel units, (B, Hq, L)), and with Hooks.given_final out = acc (no 1/l)
                             # and g_sum = sum g itself (its backward's threshold gradient needs the raw sum)
    RAW_SCORES: bool = False # the output pass hands NORM.update_raw the unscaled tile q.k (see Hooks, `raw_scores_ok`)
    VARLEN: bool = False     # packed variable-length sequences in one launch (Dims.cu_q ...): Q, O, DQ are (1, Hq,
                             # total_q, D) views and K, V, DK, DV (1, Hkv, total_k, D) (batch stride 0); a program
                             # of sequence b works on `tiles.varlen_dims`'s Dims and views rebased by `tiles.at_row`
                             # (not combined with a mask, DROPOUT, score noise, SPLIT or GIVEN_THR: their row counters
                             # and layouts are the (B, Hq, L) ones; `flashmaps.triton_varlen.supported`)
    TMA: bool = False        # the forward reads its K and V tiles through tensor descriptors (TMA on sm_90,
                             # `tiles.kv_desc`); the launcher sets it (`triton_path.TMA_KV`, `tma_ok`)
    BLOCK_MASK: bool = False # the block mask (module docstring): the forward's pre-pass writes it (Keys.live), the
                             # backward skips dead tiles by it (BwdRows.live); `block_mask_ok`
    PERSISTENT: bool = False # the forward on a persistent grid (programs,): each program loops over query blocks
                             # (`tile_loop.attn_fwd`, `tiles.work_program`); the plain forward only (not SPLIT, VARLEN);
                             # the launcher sets it (`triton_path.PERSISTENT`)

    @classmethod
    def make(cls, *, D: int, Dv: int, causal: bool, mask_kind: int, softcap: bool, dot_prec: str, dropout: bool,
             dtype: str, left: bool = False, split: bool = False, distance: bool = False,
             atomic_dq: bool = False, given_thr: bool = False, raw_scores: bool = False,
             varlen: bool = False, tma: bool = False, block_mask: bool = False) -> "Static":
        BD, BDV = max(16, next_pow2(D)), max(16, next_pow2(Dv))
        return cls(D, Dv, BD, BDV, bool(causal), int(getattr(mask_kind, "value", mask_kind)), bool(softcap), dot_prec, bool(dropout), dtype,
                   BD != D, BDV != Dv, bool(left), bool(split), bool(distance), bool(atomic_dq), bool(given_thr),
                   bool(raw_scores), bool(varlen), bool(tma), bool(block_mask))


class RowOut(NamedTuple):
    """The forward's per-row outputs, (B, Hq, L) fp32 contiguous (placeholders where unused): the public
    statistics, the pre-pass threshold ``thr``, the second weighted sum (``g_sum`` (B, Hq, L) and ``g_out``
    (B, Hq, L, Dv)), and the pre-pass ``scratch`` ((B * Hq * L_PAD, SCRATCH_COLS) fp32)."""

    stat0: Any
    stat1: Any
    thr: Any
    g_sum: Any
    g_out: Any
    scratch: Any
    live: Any = 0     # Static.BLOCK_MASK: the block mask (int8, see the module docstring), written by the forward


class BwdRows(NamedTuple):
    """The backward's per-row terms, (B, Hq, L) fp32 contiguous: delta = rowsum(dO * O_bwd) and the
    normalizer's (w0, w1) = bwd_rows(...)."""

    delta: Any
    w0: Any
    w1: Any
    live: Any = 0     # Static.BLOCK_MASK: the forward's block mask (int8, see the module docstring)
    # the non-finite rule (`backward`'s docstring), written by the preprocess (fp32)
    head_bad: Any = 0  # (B * Hkv,) zeroed by the launcher: (b, kv head) has a bad row (its dk, dv are NaN)
    row_bad: Any = 0   # (B, Hq, L) like delta, without ST.ATOMIC_DQ: NaN for a bad row (its dq row NaN), else -0.0
    lists: Any = 0    # Static.BLOCK_MASK: int16 scratch, a slot per backward program for its list of live tiles
                      # (`blockmask.live_tiles`); as many elements as the block mask (any BM, BN >= MASK_BLOCK).
                      # int16, not int32: an int32 index load is pipelined (cp.async) and costs the loads that
                      # depend on it a stage; the launcher keeps the indices < 2**15


class NoArgs(NamedTuple):
    """The runtime arguments of a normalizer that has none."""

    unused: Any = 0.0


# ---------------------------------------------------------------------------------------------------
# defaults for hooks a normalizer does not use


@triton.jit
def no_prepass(blk, keys, args, scratch, BM: tl.constexpr, BN: tl.constexpr, ST: tl.constexpr,
               NORM: tl.constexpr):
    """The pre-pass of normalizers without a threshold: thr = 0."""
    return tl.zeros([BM], dtype=tl.float32)


@triton.jit
def always_live(s, thr):
    return True


@triton.jit
def no_g_weights(s, thr):
    return s


@triton.jit
def no_g_finalize(l_i, l_g):
    return l_g, l_g


@triton.jit
def no_bwd_rows(stat0, stat1, thr, g_sum):
    return stat0, stat1


@triton.jit
def no_bwd_weights(s, w0, w1, MASKED: tl.constexpr):
    return s


@triton.jit
def no_bwd_dscores(p, s, dp, delta, w0, w1):
    return p


# ---------------------------------------------------------------------------------------------------
# the normalizer record


class Hooks(NamedTuple):
    """How one normalizer plugs into the kernels. Passed to them as one ``tl.constexpr`` (``NORM``); build
    it with :func:`make_hooks`. Every function is ``@triton.jit``.

    Forward (``tile_loop.attn_fwd``)::

        update(s, m_i, l_i, thr, MASKED) -> (p, alpha, m_new, l_new)
            weights p [BM, BN] (fp32, unnormalized) of one kernel-unit score tile, the rescale alpha [BM]
            of the old accumulator (used only if ``rescale``), the new running state (m: running max or
            unused; l: running normalizer)
        finalize(m_i, l_i, thr) -> (inv_l, stat0, stat1)
            out = acc * inv_l (0 for empty rows) and the public row statistics (``n_stats`` of them)
        prepass(blk, keys, args, scratch, BM, BN, ST, NORM) -> thr [BM]      (if ``has_prepass``)
            the per-row threshold in kernel units, from score passes only (`threshold`); ``args`` is the
            normalizer's runtime bundle, ``scratch`` [BM, 1] pointers to ``scratch_cols`` fp32 slots per row
        tile_live(s, thr) -> scalar bool                                      (if ``skip_dead``)
            False when no row of the block keeps a key of the tile: its P @ V is skipped
        g_weights(s, thr) -> g; g_finalize(l_i, l_g) -> (inv_g, g_stat)   (if ``has_g``)
            a second weighted sum G = sum_j g_j v_j kept for the backward (entmax15's O2 and sum g)

    Backward (``backward``)::

        bwd_rows(stat0, stat1, thr, g_sum) -> (w0, w1)       the row statistics as the two hooks below want
        bwd_weights(s, w0, w1, MASKED) -> p                 the normalized weights of a score tile
        bwd_dscores(p, s, dp, delta, w0, w1) -> ds          dL/ds_nat from dp = dL/dp and the row term delta
                                                            (rowsum(dO * O), or rowsum(dO * O2) with has_g)

    ``consts`` holds the normalizer instance's compile-time options (e.g. top-k's buffer size), read by
    its own forward hooks as ``NORM.consts`` (the backward kernels get the hooks with ``consts = ()``, so
    that instances differing only there share one backward compile). ``rule`` is a sparse normalizer's
    `threshold.ThresholdRule` (read by the threshold engine as ``NORM.rule``), or None.

    Score noise (``has_noise``; stochastic normalizers such as gumbel)::

        noise(seed, bh, i, j) -> g          noise [BM, BN] in natural score units of head bh = b * Hq + h (int32
                                            scalar), query rows i [BM, 1], keys j [1, BN] (int32), a function of
                                            (seed, bh, i, j) only (not of the call's L or S);
                                            ``tiles.fold_keys`` and the backward add g * u to every score tile
                                            after the mask bias (-inf stays -inf), so forward, threshold passes
                                            and backward see the same noise

    ``grad_mult`` multiplies dS (the backward's dQ, dK) for normalizers whose weights depend on the score
    through a constant factor the hooks do not see (gumbel: p = softmax((s + g) / tau), grad_mult = 1/tau).

    Read the fields inside kernels as ``NORM.field`` (or ``NORM.rule.field``); never pass a nested tuple
    such as ``NORM.rule`` itself as an argument (Triton does not compile that).

    ``head_param`` (default False): the normalizer has one fp32 parameter per query head (alpha-entmax's
    alpha - 1), the (Hq,) tensor ``Normalizer.kernel_head_params`` that the launcher passes as the kernel
    argument ``HP``. The forward kernel then loads ``hp = HP[h]`` (broadcast [BM]) and hands the hooks
    ``thr`` as the pair ``(thr, hp)`` (update, finalize, tile_live, g_weights; the prepass gets ``args`` as
    ``(args, hp)``), the backward preprocess hands ``bwd_rows`` ``thr`` as ``(thr, hp)``: the rest of the
    backward sees the parameter through ``(w0, w1)``. Normalizers without it are unchanged.

    ``given_final`` (default False): the two-phase protocol of a sparse unit (``Static.GIVEN_THR``: the forward
    loads the GLOBAL threshold of the union of key parts instead of running the pre-pass over its own keys).
    True: the weights at that threshold are already the union's final weights (entmax family: they sum to one
    over the union), so the output is ``acc`` itself (finalize's ``inv_l`` is not applied); False (top-k): the
    part's output is ``acc * inv_l`` with its statistics (lse), merged by the unit's rule.
    Raw scores (``update_raw``, optional; softmax's)::

        update_raw(qk, qk_scale, m_i, l_i, thr, MASKED) -> (p, alpha, m_new, l_new)
            what ``update`` returns for s = qk * qk_scale, given the unscaled tile qk [BM, BN] (q.k, -inf
            exactly where a key is not allowed) and the scalar qk_scale > 0: the hook folds the scale into
            its own arithmetic (softmax: the row max on qk, then exp2(qk * qk_scale - m) as one multiply-add
            per score instead of a multiply and a subtract). The output pass calls it instead of ``update``
            when ``Static.RAW_SCORES``, which the launcher sets only where s is that product
            (`raw_scores_ok`: no softcap, no float-mask bias, no noise, the dot-product score, qk_scale > 0)
            and nothing else of the output pass reads s (no pre-pass, ``tile_live`` or ``g_weights``).

    Block mask (``live_floor``, optional; the sparse units')::

        live_floor(thr) -> floor [BM]       a per-row score level in kernel units below which every weight is
                                            exactly 0 (rounding included): p_ij = 0 whenever s_ij < floor_i
                                            (entmax15, sparsemax, topk: thr itself; alpha-entmax: tau / (alpha - 1),
                                            lowered by a few ulps). Also given the threshold engine's lower bound
                                            of thr (the bracket's lo), so it must be nondecreasing in thr. A unit
                                            with it (and a pre-pass and ``tile_live``) gets Static.BLOCK_MASK
                                            (`block_mask_ok`); without it nothing changes.
    """

    name: str
    src_key: str        # hash of the hooks' sources: Triton's on-disk cache key sees only this tuple's repr
    unit: float         # the score unit u
    n_stats: int        # 0, 1 or 2 public row statistics
    rescale: bool
    has_prepass: bool
    skip_dead: bool
    has_g: bool
    has_backward: bool
    consts: tuple
    rule: Any
    update: Any
    finalize: Any
    prepass: Any
    tile_live: Any
    g_weights: Any
    g_finalize: Any
    bwd_rows: Any
    bwd_weights: Any
    bwd_dscores: Any
    has_noise: bool = False
    noise: Any = None
    grad_mult: float = 1.0
    head_param: bool = False
    given_final: bool = False
    update_raw: Any = None
    live_floor: Any = None

    def with_consts(self, consts) -> "Hooks":
        return self._replace(consts=consts)


def make_hooks(*, name: str, unit: float, n_stats: int, update: Callable, finalize: Callable,
               rescale: bool = False, prepass: Optional[Callable] = None, tile_live: Optional[Callable] = None,
               g_weights: Optional[Callable] = None, g_finalize: Optional[Callable] = None,
               bwd_rows: Optional[Callable] = None, bwd_weights: Optional[Callable] = None,
               bwd_dscores: Optional[Callable] = None, consts: tuple = (), rule: Any = None,
               noise: Optional[Callable] = None, grad_mult: float = 1.0,
               head_param: bool = False, given_final: bool = False, update_raw: Optional[Callable] = None,
               live_floor: Optional[Callable] = None) -> Hooks:
    """A normalizer's `Hooks`; the optional parts get no-op defaults and their flags."""
    if not 0 <= n_stats <= 2:
        raise ValueError(f"make_hooks({name!r}): n_stats must be 0, 1 or 2, got {n_stats}")
    if (g_weights is None) != (g_finalize is None):
        raise ValueError(f"make_hooks({name!r}): give both g_weights and g_finalize, or neither")
    bwd = (bwd_rows, bwd_weights, bwd_dscores)
    if any(f is None for f in bwd) and any(f is not None for f in bwd):
        raise ValueError(f"make_hooks({name!r}): give all three backward hooks, or none")
    fns = dict(update=update, finalize=finalize, prepass=prepass or no_prepass, tile_live=tile_live or always_live,
               g_weights=g_weights or no_g_weights, g_finalize=g_finalize or no_g_finalize,
               bwd_rows=bwd_rows or no_bwd_rows, bwd_weights=bwd_weights or no_bwd_weights,
               bwd_dscores=bwd_dscores or no_bwd_dscores)
    for field, fn in fns.items():
        if not _is_jit(fn):
            raise TypeError(f"make_hooks({name!r}): {field} must be a @triton.jit function, got {fn!r}")
    for field, fn in (("noise", noise), ("update_raw", update_raw), ("live_floor", live_floor)):
        if fn is not None and not _is_jit(fn):
            raise TypeError(f"make_hooks({name!r}): {field} must be a @triton.jit function, got {fn!r}")
    rule_fns = [f for f in (rule or ()) if _is_jit(f)] + [f for f in (noise, update_raw, live_floor) if f is not None]
    return Hooks(name=name, src_key=_src_key([*fns.values(), *rule_fns]), unit=float(unit), n_stats=n_stats,
                 rescale=bool(rescale), has_prepass=prepass is not None, skip_dead=tile_live is not None,
                 has_g=g_weights is not None, has_backward=bwd_dscores is not None, consts=consts,
                 rule=rule, **fns, has_noise=noise is not None, noise=noise, grad_mult=float(grad_mult),
                 head_param=bool(head_param), given_final=bool(given_final), update_raw=update_raw,
                 live_floor=live_floor)


def raw_scores_ok(hooks: Hooks, *, softcap: bool, mask_kind: int, distance: bool, qk_scale: float) -> bool:
    """Whether the forward's output pass may hand ``hooks.update_raw`` the unscaled tiles (``Static.RAW_SCORES``):
    the hook exists, s is exactly qk * qk_scale (-inf where not allowed) with qk_scale > 0 (so that
    max(qk) * qk_scale is max(s), rounding being monotone), and no other hook of the output pass reads s."""
    return (hooks.update_raw is not None and not softcap and int(getattr(mask_kind, "value", mask_kind)) != MASK_FLOAT.value
            and not distance and not hooks.has_noise and qk_scale > 0 and not hooks.has_prepass
            and not hooks.skip_dead and not hooks.has_g)


def block_mask_ok(hooks: Hooks, *, split: bool = False, given_thr: bool = False) -> bool:
    """Whether a call gets the block mask (``Static.BLOCK_MASK``): the unit has ``live_floor``, a pre-pass and
    ``tile_live``, and the call is neither split-KV nor a given threshold (phase 2: forward only, no pre-pass)."""
    return (hooks.live_floor is not None and hooks.has_prepass and hooks.skip_dead and not split
            and not given_thr)


def block_mask_shape(B: int, Hq: int, L: int, S: int) -> tuple:
    """(B, Hq, rows, cols) of the block mask of a call (module docstring: padded cells)."""
    pad, blk = int(MASK_PAD.value), int(MASK_BLOCK.value)
    return B, Hq, -(-L // pad) * pad // blk, -(-S // pad) * pad // blk


def _is_jit(fn) -> bool:
    """A @triton.jit function (an InterpretedFunction under TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(fn, (triton.runtime.jit.JITFunction, InterpretedFunction))


def _src_key(fns) -> str:
    """Triton's cache key of each function (its source and the sources of what it calls), hashed; under
    the interpreter (no compile cache) the functions' own sources."""
    h = hashlib.sha256()
    for fn in fns:
        key = getattr(fn, "cache_key", None)
        h.update((key if isinstance(key, str) else repr(getattr(fn, "src", fn))).encode())
    return h.hexdigest()[:16]
