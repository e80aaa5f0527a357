"""Structured attention inputs where block sparsity is real (issue 17 item 5), deterministic by seed.

On N(0, 1) inputs every 64 x 64 tile of a sparse normalizer holds some nonzero weight; trained models'
heads attend a few regions. `structured_qkv` builds q and k from a few strong unit directions: query block
b (``block`` rows) and key block c (``block`` keys) each get one of ``n_dirs`` orthonormal directions at
random, and

    q_i = a * u_dir(i) + noise,   k_j = a * u_dir(j) + noise,   a = sqrt(gap * sqrt(D))

so that with the default scale 1/sqrt(D) a query scores about ``gap`` (natural units) higher against the
keys of its own direction than against the others: with gap >= 4 entmax15 / sparsemax / top-k give the
other key blocks zero weight, and the block sparsity is about 1 - 1/n_dirs.

`block_sparsity` is the fraction of dead 16 x 16 cells of the kernels' block mask (`flashmaps.kernels.blockmask`),
`exact_live_cells` the cells of given weights that hold a nonzero one.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["structured_qkv", "block_sparsity", "exact_live_cells"]


def structured_qkv(B: int, Hq: int, L: int, S: int, D: int, *, Hkv: Optional[int] = None, Dv: Optional[int] = None,
                   n_dirs: int = 4, block: int = 32, gap: float = 6.0, noise: float = 0.3, seed: int = 0,
                   dtype=torch.float32, device="cpu"):
    """(q (B, Hq, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv)) as described in the module docstring; v is N(0, 1).
    Query blocks of a GQA group share their kv head's key directions."""
    Hkv = Hq if Hkv is None else Hkv
    Dv = D if Dv is None else Dv
    if n_dirs > D:
        raise ValueError(f"structured_qkv: n_dirs must be at most D = {D}, got {n_dirs}")
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.linalg.qr(torch.randn(D, n_dirs, generator=gen, dtype=torch.float64))[0].T          # (n_dirs, D)
    a = math.sqrt(gap * math.sqrt(D))
    qd = torch.randint(n_dirs, (B, Hq, -(-L // block)), generator=gen).repeat_interleave(block, -1)[..., :L]
    kd = torch.randint(n_dirs, (B, Hkv, -(-S // block)), generator=gen).repeat_interleave(block, -1)[..., :S]
    q = a * dirs[qd] + noise * torch.randn(B, Hq, L, D, generator=gen, dtype=torch.float64)
    k = a * dirs[kd] + noise * torch.randn(B, Hkv, S, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, Dv, generator=gen, dtype=torch.float64)
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v))


def exact_live_cells(p: torch.Tensor, cell: int = 16) -> torch.Tensor:
    """Bool (B, H, cdiv(L, cell), cdiv(S, cell)): which cells of the weights p (B, H, L, S) hold a nonzero weight."""
    B, H, L, S = p.shape
    pad = torch.zeros(B, H, -(-L // cell) * cell, -(-S // cell) * cell, dtype=torch.bool, device=p.device)
    pad[..., :L, :S] = p != 0
    return pad.view(B, H, pad.shape[2] // cell, cell, pad.shape[3] // cell, cell).any(5).any(3)


def block_sparsity(live: torch.Tensor, L: int, S: int, cell: int = 16) -> float:
    """Fraction of dead (0) cells among the in-range cells (rows < L, keys < S) of an int8/bool block mask
    (B, Hq, R, C) (`flashmaps.triton_path.Forward.live`); cells no forward program visits (fully masked: causal,
    window) are 0 and count as dead."""
    cells = live[:, :, : -(-L // cell), : -(-S // cell)]
    return 1.0 - cells.ne(0).float().mean().item() if cells.numel() else 0.0
