#!/usr/bin/env python
"""Context parallelism on the CPU: a small attention layer over a sequence sharded across gloo processes.

    torchrun --nproc-per-node 2 scripts/cp_example.py
    torchrun --nproc-per-node 3 scripts/cp_example.py --layout allgather --seq 36 --normalizers softmax topk:5

Every rank builds the same ``flashmaps.nn.Attention`` (same seed) and the same input ``x`` (B, S, E). Each
rank keeps its shard of the sequence (``flashmaps.distributed.shard``), projects it, runs
``flashmaps.distributed.attention`` (exact over the whole sequence) and the output projection, and
back-propagates ``sum(y_local^2)``; the parameter gradients are then summed over the ranks (as DDP would).
Rank 0 compares the gathered output (``unshard``) and the parameter gradients with the same layer run
in one process on the full sequence, and prints one line per normalizer:

    normalizer  out rel err  grad rel err   (||cp - single|| / ||single||)

The exit status is 1 if any error exceeds --tol.
"""

from __future__ import annotations

import argparse
import gc
import sys

import torch
import torch.distributed as dist

import flashmaps
import flashmaps.distributed as cp
import flashmaps.nn


def local_forward(layer: flashmaps.nn.Attention, x_local, *, layout: str, causal: bool, kpm_local):
    """The layer's forward on this rank's shard x_local (B, Sl, E), attention exact over all shards."""
    B, Sl, _ = x_local.shape
    H, Hkv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = layer.q_proj(x_local).view(B, Sl, H, D).transpose(1, 2)  # (B, H, Sl, D)
    k = layer.k_proj(x_local).view(B, Sl, Hkv, D).transpose(1, 2)  # (B, Hkv, Sl, D)
    v = layer.v_proj(x_local).view(B, Sl, Hkv, D).transpose(1, 2)  # (B, Hkv, Sl, D)
    out = cp.attention(q, k, v, layer.normalizer, causal=causal, layout=layout, key_padding_mask=kpm_local,
                       scale=layer.scale, enable_gqa=Hkv != H)  # (B, H, Sl, D)
    return layer.out_proj(out.transpose(1, 2).reshape(B, Sl, H * D))  # (B, Sl, E)


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", default="zigzag", choices=[x for x in cp.LAYOUTS if x != "ring"])
    p.add_argument("--seq", type=int, default=24, help="full sequence length S")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--embed", type=int, default=32)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--normalizers", nargs="*", default=None, help="specs (default: every registered example)")
    p.add_argument("--tol", type=float, default=1e-4)
    args = p.parse_args()

    dist.init_process_group("gloo")  # torchrun provides RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    causal = not args.non_causal
    specs = args.normalizers or [n.spec for n in flashmaps.examples()]
    failed = False
    if rank == 0:
        print(f"world {world}, layout {args.layout}, causal {causal}, B={args.batch} S={args.seq} E={args.embed} "
              f"H={args.heads} Hkv={args.kv_heads}\n{'normalizer':<12} {'out rel err':>12} {'grad rel err':>13}")
    for spec in specs:
        torch.manual_seed(0)  # the same layer and input on every rank
        layer = flashmaps.nn.Attention(args.embed, args.heads, num_kv_heads=args.kv_heads, normalizer=spec,
                                       causal=causal)
        x = torch.randn(args.batch, args.seq, args.embed)
        kpm = torch.rand(args.batch, args.seq) < 0.8  # key padding: True = a real token

        # one process, the full sequence
        y_ref = layer(x, attn_mask=kpm[:, None, None, :])
        y_ref.pow(2).sum().backward()
        g_ref = torch.cat([q.grad.flatten() for q in layer.parameters()])
        layer.zero_grad()

        # context parallel: this rank's shard of the sequence
        x_l = cp.shard(x, dim=1, layout=args.layout)
        kpm_l = cp.shard(kpm, dim=1, layout=args.layout)
        y_l = local_forward(layer, x_l, layout=args.layout, causal=causal, kpm_local=kpm_l)
        y_l.pow(2).sum().backward()
        g = torch.cat([q.grad.flatten() for q in layer.parameters()])
        dist.all_reduce(g)  # the loss is the sum of the ranks' losses
        y = cp.unshard(y_l.detach(), dim=1, layout=args.layout)
        e_out, e_grad = rel(y, y_ref.detach()), rel(g, g_ref)
        failed |= not (e_out <= args.tol and e_grad <= args.tol)
        if rank == 0:
            print(f"{spec:<12} {e_out:>12.2e} {e_grad:>13.2e}")
    dist.barrier()  # no rank tears the group down while another still uses it
    gc.collect()  # free what still holds gloo work before teardown (else an occasional abort at exit)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
