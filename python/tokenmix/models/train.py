"""Train a tokenmix backbone on synthetic data, in one process or many (``torch.distributed``):
a smoke test of the training path, and the check that data-parallel training is exact.

    python -m tokenmix.models.train --model hornet_tiny_7x7 --steps 20 --batch 16
    torchrun --nproc_per_node=2 -m tokenmix.models.train --model hornet_tiny_7x7 --steps 20 --batch 16
    torchrun --nproc_per_node=2 -m tokenmix.models.train --model hornet_tiny_7x7 --fsdp

The data is one fixed batch of random images and labels, which the model learns to fit: the loss
falls step by step. ``--batch`` is the global batch: with N processes each takes its 1/N share
(every rank draws the whole batch from the same seed and keeps its slice), so the loss
curve of an N-process run equals the one-process run at the same ``--batch`` up to the order of
floating-point sums. The model is wrapped in ``DistributedDataParallel``, or sharded with FSDP's
``fully_shard`` under ``--fsdp``; the backend is gloo on CPU and NCCL on CUDA. Models with
BatchNorm (Hire-MLP) normalise over each rank's share, as DDP without SyncBatchNorm does: their
curves differ from the one-process run by design, as do those of models whose stochastic
layers (drop path, DynamicViT's Gumbel noise) draw per sample.

Rank 0 prints one JSON line (and writes it to ``--out``): the per-step loss averaged over ranks,
and, after the last step, the largest difference of any parameter between ranks and a checksum
(sum of squares) of the parameters.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

import tokenmix.models as models


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tokenmix.models.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="hornet_tiny_7x7", choices=models.list_models())
    p.add_argument("--config", default="{}", help="JSON dict of constructor overrides, e.g. a narrow variant")
    p.add_argument("--unfused", action="store_true", help="fused=False: the official eager token mixers")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16, help="global batch (split across processes)")
    p.add_argument("--size", type=int, default=224, help="input height and width")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fsdp", action="store_true", help="shard with fully_shard instead of DDP")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    return p.parse_args(argv)


def _flat_params(model: nn.Module) -> torch.Tensor:
    """Every parameter, whole (FSDP's shards gathered), flattened in fp64."""
    parts = []
    for p in model.parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        parts.append(t.reshape(-1).double().cpu())
    return torch.cat(parts)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world > 1
    device = torch.device(args.device)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    rank = dist.get_rank() if distributed else 0
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} does not split over {world} processes")

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = models.create(args.model, fused=not args.unfused, num_classes=args.num_classes,
                          **json.loads(args.config)).to(device).train()
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard
        fully_shard(model)
        net: nn.Module = model
    elif distributed:
        net = nn.parallel.DistributedDataParallel(model)
    else:
        net = model
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
    data = torch.Generator().manual_seed(args.seed + 1)
    share = args.batch // world
    x = torch.randn(args.batch, 3, args.size, args.size, generator=data)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=data)
    x, y = x[rank * share:(rank + 1) * share].to(device), y[rank * share:(rank + 1) * share].to(device)
    losses = []
    for step in range(args.steps):
        torch.manual_seed(args.seed + 1000 + step)  # stochastic layers (drop path, Gumbel noise) repeat run to run
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        if distributed:
            dist.all_reduce(mean)
            mean /= world
        losses.append(mean.item())

    flat = _flat_params(model)
    spread = 0.0
    if distributed:
        lo, hi = flat.clone(), flat.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        spread = (hi - lo).abs().max().item()
    result = {"model": args.model, "world_size": world, "mode": "fsdp" if args.fsdp else ("ddp" if distributed else "single"),
              "losses": losses, "param_spread": spread, "param_sumsq": flat.pow(2).sum().item()}
    if rank == 0:
        print(json.dumps(result), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f)
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
