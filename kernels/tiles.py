"""Tiles: loads, the matrix product, score tiles and their masks, and which tiles a program visits.

Shared by the forward loop, the threshold pre-passes and the backward kernels (names in `contract`).
Pointers: ``View`` bases are offset to the (batch, head) of the program in int64; per-tile offsets are
advanced with an int64 scalar (``start * int64(1) * stride``), so long sequences with large strides never
overflow int32.
"""

import triton
import triton.language as tl

from .contract import LOG2E, MASK_BOOL, MASK_FLOAT, Dims, View

# ---------------------------------------------------------------------------------------------------
# scalar math


@triton.jit
def tanh_f32(x):
    """tanh in fp32 through exp2 (no libdevice, so it runs in the interpreter too): sign(x) (1-e)/(1+e),
    e = exp(-2|x|). Absolute error ~1e-7."""
    e = tl.exp2(tl.abs(x) * (-2.0 * LOG2E))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def safe_inv(l):
    """1 / l where l > 0, else 0 (rows with no allowed key output exactly 0)."""
    return tl.where(l > 0, 1.0 / tl.where(l > 0, l, 1.0), 0.0)


@triton.jit
def mma(a, b, acc, ST: tl.constexpr):
    """tl.dot(a, b) + acc (acc may be None) with fp32 accumulation, at the precision ST.DOT_PREC (a
    `contract.Static`: its string field cannot be passed on as an argument of its own)."""
    DOT_PREC: tl.constexpr = ST.DOT_PREC
    if DOT_PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def pick_row(x, sel):
    """x[r, a_r] [BM] for a one-hot selector sel [BM, NP] (0 where a selector row is empty)."""
    return tl.sum(tl.where(sel, x, 0.0), 1)


@triton.jit
def count_allowed(n, s, BN: tl.constexpr, MASKED: tl.constexpr):
    """n [BM] plus the allowed keys of the score tile s [BM, BN] (all BN in an unmasked tile)."""
    if MASKED:
        return n + tl.sum((s > float("-inf")).to(tl.float32), 1)
    else:
        return n + BN


# ---------------------------------------------------------------------------------------------------
# pointers and loads


@triton.jit
def head_base(view, off_b, off_h):
    """The pointer of ``view`` (a contract.View) at (batch off_b, head off_h), in int64."""
    return view.ptr + off_b.to(tl.int64) * view.sb + off_h.to(tl.int64) * view.sh


@triton.jit
def mask_rows(mask, off_b, off_h, offs_m):
    """[BM, 1] pointers of the mask rows offs_m of (off_b, off_h) (a placeholder view when no mask)."""
    return head_base(mask, off_b, off_h) + offs_m.to(tl.int64)[:, None] * mask.sr


@triton.jit
def load_tile(base, start, offs_r, offs_c, n_r, n_c, stride_r, stride_c,
              CHECK_R: tl.constexpr, CHECK_C: tl.constexpr):
    """Tile [R, C] of a row-major-ish 2-D view: element (start + r, c) at base + (start + r) * stride_r
    + c * stride_c, zero outside [0, n_r) x [0, n_c) when the corresponding CHECK flag is set."""
    start64 = start * tl.full([], 1, tl.int64)           # int64 tile offset (start may be a Python int)
    ptrs = base + start64 * stride_r + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
    if CHECK_R and CHECK_C:
        ok = ((start + offs_r) < n_r)[:, None] & (offs_c < n_c)[None, :]
        return tl.load(ptrs, mask=ok, other=0.0)
    elif CHECK_R:
        return tl.load(ptrs, mask=((start + offs_r) < n_r)[:, None], other=0.0)
    elif CHECK_C:
        return tl.load(ptrs, mask=(offs_c < n_c)[None, :], other=0.0)
    else:
        return tl.load(ptrs)


# ---------------------------------------------------------------------------------------------------
# scores


@triton.jit
def scale_scores(qk, scale, SOFTCAP: tl.constexpr):
    """Kernel-unit scores from raw dot products: qk * qk_scale, or cap_mult * tanh(qk * qk_scale)."""
    if SOFTCAP:
        return scale.cap_mult * tanh_f32(qk * scale.qk_scale)
    else:
        return qk * scale.qk_scale


@triton.jit
def mask_scores(s, i, j, keys, ST: tl.constexpr):
    """Apply the `allowed` test (and the float-mask bias) to a score tile of query rows i and keys j
    (broadcastable index tensors, e.g. [BM, 1] and [1, BN]). Returns s + u * bias where allowed and -inf
    elsewhere (keys >= S, causal, bool False, float <= mask_min)."""
    ok = j < keys.S
    if ST.IS_CAUSAL:
        ok = ok & (j <= i + keys.causal_off)
    if ST.LEFT:
        ok = ok & (j >= i + keys.left_off)
    if ST.MASK_KIND == MASK_BOOL:
        mv = tl.load(keys.mask_rows + j.to(tl.int64) * keys.mask_sn, mask=(i < keys.L) & (j < keys.S), other=0)
        ok = ok & (mv != 0)
    elif ST.MASK_KIND == MASK_FLOAT:
        bias = tl.load(keys.mask_rows + j.to(tl.int64) * keys.mask_sn, mask=(i < keys.L) & (j < keys.S),
                       other=0.0)
        bias = bias.to(tl.float32)
        ok = ok & (bias > keys.scale.mask_min)
        s = s + tl.where(ok, bias, 0.0) * keys.scale.bias_mult   # excluded entries: no finfo.min * u overflow
    return tl.where(ok, s, float("-inf"))


@triton.jit
def kv_desc(base, n, sn, BN: tl.constexpr, BD: tl.constexpr, HEAD: tl.constexpr):
    """Static.TMA: a tensor descriptor over the [n, HEAD] rows at ``base`` (row stride sn, column stride 1)
    whose [BN, BD] tiles TMA loads, zero outside [0, n) x [0, HEAD): the same tile as `load_tile` with both
    checks, so masked and unmasked tiles read alike (the launcher checks strides and alignment: `tma_ok`)."""
    return tl.make_tensor_descriptor(base, shape=[n, HEAD], strides=[sn, 1], block_shape=[BN, BD])


@triton.jit
def qk_tile(q, keys, start_n, BN: tl.constexpr, ST: tl.constexpr, MASKED: tl.constexpr):
    """Raw dot products q k^T [BM, BN] of the query tile q [BM, BD] with keys [start_n, start_n + BN)."""
    if ST.TMA:
        k = keys.kd.load([start_n, 0])                                                 # [BN, BD]
    else:
        k = load_tile(keys.k, start_n, tl.arange(0, BN), tl.arange(0, ST.BD), keys.S, ST.HEAD_D, keys.sn, keys.sd,
                      MASKED, ST.PAD_D)                                                # [BN, BD]
    return mma(q, tl.trans(k), None, ST)


@triton.jit
def log_distance(q, k, qk, scale):
    """The distance form of the raw score (Static.DISTANCE) of q [BM, BD] against k [BN, BD], qk = q k^T:
    d2 = max(|q|^2 + |k|^2 - 2 q.k, 0), x = scale.dist_scale * d2, and
    (s_pre = dist_mult * ln(max(x, tiny)) [BM, BN], chain = d s_pre / d d2 * 2 = 2 dist_mult / d2, 0 where
    x <= tiny): dL/dq_i = sum_j c_ij (q_i - k_j), dL/dk_j = sum_i c_ij (k_j - q_i) with c = dL/ds_pre * chain.
    tiny = float32's smallest normal: a zero distance is a finite, dominant score."""
    qf = q.to(tl.float32)
    kf = k.to(tl.float32)
    d2 = tl.sum(qf * qf, 1)[:, None] + tl.sum(kf * kf, 1)[None, :] - 2.0 * qk               # [BM, BN]
    d2 = tl.where(d2 < 0.0, 0.0, d2)                 # (not tl.maximum: a NaN distance stays NaN, the non-finite rule)
    x = d2 * scale.dist_scale
    ok = x > 1.1754943508222875e-38
    s_pre = scale.dist_mult * tl.log(tl.where(x < 1.1754943508222875e-38, 1.1754943508222875e-38, x))
    chain = tl.where(ok, 2.0 * scale.dist_mult / tl.where(ok, d2, 1.0), 0.0)
    return s_pre, chain


@triton.jit
def score_tile(blk, keys, start_n, BN: tl.constexpr, ST: tl.constexpr, MASKED: tl.constexpr):
    """Kernel-unit score tile s [BM, BN] of the query block ``blk`` against keys [start_n, start_n + BN).
    ``MASKED`` tiles get the `allowed` test (and -inf outside it); unmasked tiles are whole tiles inside
    [0, S) that every row of the block attends. ``ST.DISTANCE``: the raw score is `log_distance`'s instead of
    the dot product (a constexpr branch: the dot-product path is unchanged). ``ST.RAW_SCORES``: s is the raw
    q.k (-inf outside `allowed`; `contract.raw_scores_ok` excludes the softcap and the float-mask bias)."""
    if ST.DISTANCE:
        k = load_tile(keys.k, start_n, tl.arange(0, BN), tl.arange(0, ST.BD), keys.S, ST.HEAD_D, keys.sn,
                      keys.sd, MASKED, ST.PAD_D)                                       # [BN, BD]
        raw, _ = log_distance(blk.q, k, mma(blk.q, tl.trans(k), None, ST), keys.scale)
    else:
        raw = qk_tile(blk.q, keys, start_n, BN, ST, MASKED)
    if ST.RAW_SCORES:
        s = raw                                      # unscaled: the output pass's NORM.update_raw scales
    else:
        s = scale_scores(raw, keys.scale, ST.SOFTCAP)
    if MASKED:
        s = mask_scores(s, blk.i, (start_n + tl.arange(0, BN))[None, :], keys, ST)
    return s


@triton.jit
def add_noise(s, i, j, keys, NORM: tl.constexpr):
    """s + u * NORM.noise(seed, b * Hq + h, i, j) for a score tile of query rows i [BM, 1] and keys j [1, BN]
    (``Hooks.has_noise``); -inf (excluded keys) stays -inf."""
    bh = (keys.row_base // keys.L).to(tl.int32)
    return s + NORM.noise(keys.seed, bh, i, j) * keys.scale.bias_mult


# ---------------------------------------------------------------------------------------------------
# which tiles a program visits


#: programs per grid axis 1 or 2 (CUDA's limit): the (batch, head) index spans both (`head_grid`)
GRID_YZ = 65535


def head_grid(n_heads: int) -> tuple[int, int]:
    """Grid axes 1 and 2 for ``n_heads`` (batch, head) programs: (n_heads, 1) up to 65535, else split so that
    B * H past 65535 (decode at B = 2048, H = 32) still launches; see `head_program`."""
    g2 = -(-n_heads // GRID_YZ)
    return -(-n_heads // g2), g2


@triton.jit
def head_program(n_heads):
    """The (batch, head) index of a program on a grid (blocks, *head_grid(n_heads)). The few programs past
    n_heads - 1 (when axis 2 is used) redo the last one: they store the same values (a kernel that adds with
    atomics returns early there instead: the atomic-dQ dK/dV kernel)."""
    return tl.minimum(tl.program_id(1) + tl.program_id(2) * tl.num_programs(1), n_heads - 1)


@triton.jit
def _query_block(pid_m, n_m, pid_bh, dims, IS_CAUSAL: tl.constexpr):
    """(query block index, batch, query head, kv head) of block pid_m of n_m and head pid_bh = b * Hq + h; causal
    grids run the heaviest blocks (the last rows) first."""
    if IS_CAUSAL:
        pid_m = n_m - 1 - pid_m
    off_h = pid_bh % dims.Hq
    return pid_m, pid_bh // dims.Hq, off_h, off_h // dims.group      # GQA: query head h reads kv head h // group


@triton.jit
def query_program(dims, IS_CAUSAL: tl.constexpr):
    """`_query_block` of a program of a grid (cdiv(L, BM), *head_grid(B * Hq))."""
    return _query_block(tl.program_id(0), tl.num_programs(0), head_program(dims.B * dims.Hq), dims, IS_CAUSAL)


@triton.jit
def work_program(w, n_m, dims, IS_CAUSAL: tl.constexpr):
    """`_query_block` of work item w of a persistent grid (Static.PERSISTENT): the program (w % n_m, w // n_m) of
    the grid (n_m = cdiv(L, BM), B * Hq), i.e. the items in the default grid's launch order (axis 0 fastest)."""
    return _query_block(w % n_m, n_m, w // n_m, dims, IS_CAUSAL)


@triton.jit
def rows_base(dims, off_b, off_h, VARLEN: tl.constexpr):
    """The int64 offset of row 0 of head (off_b, off_h) in the row outputs: (B, Hq, L) contiguous, or with
    Static.VARLEN (Hq, total_q) at the sequence's first packed row (dims from `varlen_dims`)."""
    if VARLEN:
        return off_h.to(tl.int64) * dims.row_stride + dims.q0
    else:
        return (off_b * dims.Hq + off_h).to(tl.int64) * dims.L


@triton.jit
def varlen_dims(dims, off_b):
    """Static.VARLEN: (the Dims of packed sequence off_b, its first key k0). L, S become the sequence's lengths
    L_b, S_b, the band offsets are shifted by S_b - L_b when lower-right aligned (dims.align), q0 is its first
    packed query row: `key_bounds` and the masks then work per sequence as in a call on that sequence alone."""
    q0 = tl.load(dims.cu_q + off_b)
    k0 = tl.load(dims.cu_k + off_b)
    L = tl.load(dims.cu_q + off_b + 1) - q0
    S = tl.load(dims.cu_k + off_b + 1) - k0
    shift = dims.align * (S - L)
    return Dims(dims.B, dims.Hq, dims.group, L, S, dims.causal_off + shift, dims.left_off + shift, dims.split_keys,
                dims.cu_q, dims.cu_k, dims.align, dims.row_stride, q0), k0


@triton.jit
def at_row(view, r):
    """``view`` (a contract.View) with its row 0 moved to row r (a packed sequence's first row, Static.VARLEN)."""
    return View(view.ptr + r.to(tl.int64) * view.sr, view.sb, view.sh, view.sr, view.sc)


@triton.jit
def key_bounds(start_m, L, S, causal_off, BM: tl.constexpr, BN: tl.constexpr,
               IS_CAUSAL: tl.constexpr, ALL_MASKED: tl.constexpr):
    """Key tiles visited by the query rows [start_m, start_m + BM) (forward and dQ kernels).

    Returns (full_end, hi): keys [0, full_end) form whole tiles that every row of the block may attend
    (no mask arithmetic needed; full_end is a multiple of BN), keys [full_end, hi) are visited as masked
    tiles, keys >= hi are masked for every row and never touched (causal tile skipping).
    ``ALL_MASKED`` (a user mask is given) makes every visited tile a masked one."""
    if IS_CAUSAL:
        last_row = tl.minimum(start_m + BM, L) - 1
        hi = tl.minimum(last_row + causal_off + 1, S)   # keys j <= i + off for the block's last row
        full = tl.minimum(start_m + causal_off + 1, S)  # ... and for its first row
        hi = tl.maximum(hi, 0)
        full = tl.maximum(full, 0)
    else:
        hi = S + 0 * start_m
        full = S + 0 * start_m
    full_end = (full // BN) * BN
    if ALL_MASKED:
        full_end = 0 * full_end
    return full_end, hi


@triton.jit
def left_bounds(start_m, L, left_off, full_end, hi, BM: tl.constexpr, BN: tl.constexpr, LEFT: tl.constexpr):
    """A window's left bound (j >= i + left_off) for the query rows [start_m, start_m + BM), after
    `key_bounds`: returns (lo, full_lo, full_end). Keys < lo (a multiple of BN) are excluded for every row of
    the block and never read; [lo, full_lo) are masked tiles, [full_lo, full_end) whole unmasked tiles,
    [full_end, hi) masked tiles. A band narrower than a tile has no unmasked part (full_lo = full_end = lo).
    Without LEFT: (0, 0, full_end)."""
    if LEFT:
        last_row = tl.minimum(start_m + BM, L) - 1
        lo = (tl.minimum(tl.maximum(start_m + left_off, 0), hi) // BN) * BN
        full_lo = ((tl.maximum(last_row + left_off, 0) + BN - 1) // BN) * BN   # every row sees keys >= it
        narrow = full_lo >= full_end
        full_lo = tl.where(narrow, lo, full_lo)
        full_end = tl.where(narrow, lo, full_end)
    else:
        lo = 0 * start_m
        full_lo = 0 * start_m
    return lo, full_lo, full_end


@triton.jit
def left_query_bounds(start_n, L, S, left_off, lo, full_start, BM: tl.constexpr, BN: tl.constexpr,
                      LEFT: tl.constexpr):
    """A window's left bound for the keys [start_n, start_n + BN) (the dK/dV kernel), after `query_bounds`:
    returns (full_start, full_stop, stop). Rows >= stop see no key of the tile (never visited); query tiles in
    [full_start, full_stop) see every key of the tile, [lo, full_start) and [full_stop, stop) are masked.
    Without LEFT: (full_start, L, L)."""
    if LEFT:
        last_key = tl.minimum(start_n + BN, S) - 1
        stop = tl.minimum(tl.maximum(last_key - left_off + 1, 0), L)           # rows i <= j - left_off
        full_stop = (tl.maximum(start_n - left_off + 1, 0) // BM) * BM          # rows seeing the first key
        full_stop = tl.minimum(full_stop, stop)
        narrow = full_stop <= full_start
        full_start = tl.where(narrow, lo, full_start)
        full_stop = tl.where(narrow, lo, full_stop)
    else:
        full_stop = L + 0 * start_n
        stop = L + 0 * start_n
    return full_start, full_stop, stop


@triton.jit
def query_bounds(start_n, L, S, causal_off, BM: tl.constexpr, BN: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, ALL_MASKED: tl.constexpr):
    """Query tiles visiting the keys [start_n, start_n + BN) (the dK/dV kernel's mirror of key_bounds).

    Returns (lo, full_start): rows [lo, L) may attend some key of the tile (lo is a multiple of BM);
    query tiles starting at or after full_start (a multiple of BM) see every key of the tile and need
    no mask arithmetic; tiles in [lo, full_start) are masked tiles. Without causal: lo = 0 and
    full_start = 0 (or L rounded up to BM when ALL_MASKED, i.e. every tile masked). The ragged last
    query tile and ragged key tile must still be bounds-checked by the caller's loads."""
    if IS_CAUSAL:
        first = tl.maximum(start_n - causal_off, 0)                       # row seeing key start_n
        last_key = tl.minimum(start_n + BN, S) - 1
        full = tl.maximum(last_key - causal_off, 0)                       # rows seeing the whole tile
        lo = (first // BM) * BM
        full_start = tl.minimum(((full + BM - 1) // BM) * BM, ((L + BM - 1) // BM) * BM)
        full_start = tl.maximum(full_start, lo)
    else:
        lo = 0 * start_n
        full_start = 0 * start_n
    if ALL_MASKED:
        full_start = tl.maximum(lo, ((L + BM - 1) // BM) * BM)
    return lo, full_start


# ---------------------------------------------------------------------------------------------------
# the one sweep over a block's key tiles: the unmasked tiles, then the masked ones


@triton.jit
def fold_keys(state, FOLD: tl.constexpr, ctx, blk, keys, BN: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr):
    """Fold every key tile the block visits into ``state`` (any tuple):
    ``state = FOLD(state, s, start_n, ctx, BN, ST, NORM, MASKED)`` for the score tile s [BM, BN] of keys
    [start_n, start_n + BN): first the whole unmasked tiles [0, full_end), then the masked ones
    [full_end, hi). The forward's output pass and every threshold pass are this sweep. With a window's left
    bound (ST.LEFT) the sweep starts at blk.lo: masked [lo, full_lo), unmasked [full_lo, full_end), ..."""
    if ST.LEFT or ST.SPLIT:
        state = _fold_range(state, FOLD, ctx, blk, keys, blk.lo, blk.full_lo, BN, ST, NORM, True)
    state = _fold_range(state, FOLD, ctx, blk, keys, blk.full_lo, blk.full_end, BN, ST, NORM, False)
    state = _fold_range(state, FOLD, ctx, blk, keys, blk.full_end, blk.hi, BN, ST, NORM, True)
    return state


@triton.jit
def _fold_range(state, FOLD: tl.constexpr, ctx, blk, keys, start, end, BN: tl.constexpr, ST: tl.constexpr,
                NORM: tl.constexpr, MASKED: tl.constexpr):
    # the guard: a loop that may run zero times lets ptxas put the accumulators' initialisation inside the
    # wgmma pipeline and serialize it (C7515, a full wait after every product); guarded, it pipelines
    if start < end:
        for start_n in range(start, end, BN):
            s = score_tile(blk, keys, start_n, BN, ST, MASKED)                          # [BM, BN]
            if NORM.has_noise:
                s = add_noise(s, blk.i, (start_n + tl.arange(0, BN))[None, :], keys, NORM)
            state = FOLD(state, s, start_n, ctx, BN, ST, NORM, MASKED)
    return state


__all__ = ["tanh_f32", "safe_inv", "mma", "pick_row", "count_allowed", "head_base", "mask_rows", "load_tile",
           "scale_scores", "mask_scores", "qk_tile", "score_tile", "log_distance", "add_noise", "key_bounds", "query_bounds", "query_program",
           "left_bounds", "left_query_bounds",
           "fold_keys", "rows_base", "varlen_dims", "at_row", "kv_desc",
           "work_program"]
