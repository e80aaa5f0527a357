"""The block mask (``Static.BLOCK_MASK``): one liveness bit per cell of MASK_BLOCK query rows x MASK_BLOCK keys.

Glossary (besides `contract`'s)::

    cell        MASK_BLOCK x MASK_BLOCK (16 x 16) of one (batch, query head): query rows [16 r, 16 r + 16) x keys
                [16 c, 16 c + 16); every BM, BN of every config is a multiple of 16 dividing MASK_PAD (128),
                so a tile covers whole cells, and the mask's rows / columns are padded to MASK_PAD: no bounds
                checks
    live        int8 (B, Hq, R, C) contiguous (`contract.block_mask_shape`), 1 = the cell may hold a nonzero
                weight, 0 = dead: for every row i and key j of the cell, s_ij < floor_i or j is not allowed
    floor       NORM.live_floor(thr) [BM]: weights of scores below it are exactly 0 (+inf for rows >= L)

Writers and readers (all exact or conservative: a live cell is never marked dead)::

    threshold engine (``threshold.search``)   the first bracket pass marks each tile's cells against the
                                              bracket's lower end lo <= tau (floor(lo) <= floor(tau); entmax:
                                              max z - 1): one marking pass, not one per pass (the later, tighter
                                              brackets gained no tile on the structured inputs, bench/TUNING.md)
    top-k's running buffer (``topk``)        marks each tile against the buffer's running k-th largest after
                                              the tile's merge (it only grows: <= tau_k)
    output pass (``tile_loop``)               neither reads nor marks it: marking the computed tiles cost every
                                              input 23-38 % SASS per score tile, and skipping dead ones took a
                                              pipeline stage (top-k) or 6 % SASS (entmax15, D = 128) for a few
                                              tiles saved (bench/TUNING.md "Issue 17 item 5, the marking cost")
    backward (dK/dV, dQ, atomic dQ)           each program first lists its (query tile, key tile) pairs with a
                                              live cell (`live_tiles`, into BwdRows.lists) and loops over that
                                              list: a dead pair costs no load, no Q K^T and no branch

Each forward program first marks live every cell of the tiles it visits (`reset_cells`: no stale marks when
the autotuner reruns a launch): cells the pre-pass does not mark (no bracket pass, e.g. GIVEN_THR or top-k's
COLLECT mode) stay live and are simply computed. Cells no forward program visits keep the launcher's zeros
(dead): they are fully masked (causal, window) or past L / S, so a backward tile skipped because of them (with
its other cells dead) has no weight either. A NaN score or threshold marks its cell live, so the non-finite rule still sees it.
"""

import triton
import triton.language as tl

from .contract import MASK_BLOCK, MASK_PAD

#: tiles `live_tiles` tests per step
LIST_CHUNK = tl.constexpr(32)


@triton.jit
def mask_cols(S):
    """Cells per mask row: keys padded to MASK_PAD, / MASK_BLOCK."""
    return tl.cdiv(S, MASK_PAD) * (MASK_PAD // MASK_BLOCK)


@triton.jit
def cell_row(live, bh, start_m, L, S):
    """The int8 pointer of the mask of head bh = b * Hq + h at the cell row of query row start_m (a multiple of
    MASK_BLOCK), column 0."""
    rows = tl.cdiv(L, MASK_PAD) * (MASK_PAD // MASK_BLOCK)
    return live + (bh.to(tl.int64) * rows + start_m // MASK_BLOCK) * mask_cols(S)


@triton.jit
def _tile_cells(base, start_n, S, BM: tl.constexpr, BN: tl.constexpr):
    """[BM / 16, BN / 16] pointers of the cells of the tile (rows of ``base``'s cell row on) x keys
    [start_n, start_n + BN)."""
    r = tl.arange(0, BM // MASK_BLOCK)
    c = tl.arange(0, BN // MASK_BLOCK)
    return base + r[:, None] * mask_cols(S) + (c + start_n // MASK_BLOCK)[None, :]


@triton.jit
def live_tiles(lst, live, bh, row0, col0, dm, dn, per_head, total, L, S, BM: tl.constexpr, BN: tl.constexpr,
               CH: tl.constexpr):
    """Compact into lst (int16) the indices t in [0, total), ascending, of the tiles with a live cell, and return
    their count (a scalar). Tile t: head bh + t // per_head (bh = b * Hq + h), query rows row0 + u dm +
    [0, BM) and keys col0 + u dn + [0, BN) with u = t % per_head (row0, col0, dm, dn multiples of MASK_BLOCK).
    The backward loops over the list instead of testing each tile: no branch around Q K^T, so the loop keeps
    its software-pipeline stages (bench/TUNING.md "Issue 17 item 5, the marking cost"). CH tiles per step."""
    r = tl.arange(0, BM // MASK_BLOCK)
    c = tl.arange(0, BN // MASK_BLOCK)
    cnt = tl.sum(tl.zeros([CH], tl.int32), 0)
    tl.debug_barrier()                                 # every thread is done reading the slot's previous list
    for t0 in range(0, total, CH):
        t = t0 + tl.arange(0, CH)                                                       # [CH]
        h = t // per_head
        u = t - h * per_head
        base = cell_row(live, bh + h, row0 + u * dm, L, S) + (col0 + u * dn) // MASK_BLOCK
        cells = base[:, None, None] + r[None, :, None] * mask_cols(S) + c[None, None, :]  # [CH, BM / 16, BN / 16]
        x = tl.load(cells, mask=(t < total)[:, None, None], other=0).to(tl.int32)
        on = (tl.max(tl.max(x, 2), 1) != 0).to(tl.int32)                               # [CH]
        tl.store(lst + cnt + tl.cumsum(on, 0) - 1, t, mask=on != 0)
        cnt += tl.sum(on, 0)
    tl.debug_barrier()                                 # the list, stored by other threads of the program
    return cnt


@triton.jit
def reset_cells(base, lo, hi, S, BM: tl.constexpr, BN: tl.constexpr):
    """Mark live the cells of the block's tiles over keys [lo, hi) (lo a multiple of BN): the forward's first
    step, so that a pre-pass that marks nothing leaves them live (the launcher zeroes the buffer) and reruns
    of a launch by the autotuner see no stale marks."""
    ones = tl.full([BM // MASK_BLOCK, BN // MASK_BLOCK], 1, tl.int8)
    for start_n in range(lo, hi, BN):
        tl.store(_tile_cells(base, start_n, S, BM, BN), ones)


@triton.jit
def mark_tile(base, s, start_n, floor, S):
    """Store the liveness of the cells of the score tile s [BM, BN] (keys [start_n, start_n + BN)) against the
    row floors floor [BM]: a cell is dead when each of its scores is below its row's floor or -inf (not
    allowed); a NaN score or floor keeps it live."""
    BM: tl.constexpr = s.shape[0]
    BN: tl.constexpr = s.shape[1]
    MB: tl.constexpr = MASK_BLOCK
    dead = (s < floor[:, None]) | (s == float("-inf"))                                   # [BM, BN]
    x = tl.where(dead, 0, 1)
    x = tl.max(tl.reshape(x, [BM, BN // MB, MB]), 2)                                     # [BM, BN / 16]
    x = tl.max(tl.reshape(x, [BM // MB, MB, BN // MB]), 1)                               # [BM / 16, BN / 16]
    tl.store(_tile_cells(base, start_n, S, BM, BN), x.to(tl.int8))


@triton.jit
def row_floor(thr_h, offs_m, L, NORM: tl.constexpr):
    """NORM.live_floor(thr_h) [BM], +inf for rows >= L (their cells stay dead)."""
    return tl.where(offs_m < L, NORM.live_floor(thr_h), float("inf"))


@triton.jit
def marking_fold(state, s, start_n, ctx, BN: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr,
                 MASKED: tl.constexpr):
    """A threshold pass's fold (``NORM.rule.fold``) that also marks the tile's cells: ctx = (the rule's
    context, the block's cell-row pointer, floor [BM], S)."""
    inner, base, floor, S = ctx
    mark_tile(base, s, start_n, floor, S)
    return NORM.rule.fold(state, s, start_n, inner, BN, ST, NORM, MASKED)


@triton.jit
def floor_identity(thr):
    """live_floor of a unit whose weights vanish below thr itself (entmax15, sparsemax: p = 0 for s <= tau;
    top-k: for s < tau_k)."""
    return thr


__all__ = ["mask_cols", "cell_row", "live_tiles", "reset_cells", "mark_tile", "row_floor", "marking_fold", "floor_identity"]
