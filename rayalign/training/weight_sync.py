"""Online weight sync by NCCL broadcast, for CUDA trainers and engines: trainer rank 0 sends every parameter,
one tensor at a time, over a process group of its own (rank 0 = trainer rank 0, ranks 1.. = the engines' workers),
beside DeepSpeed's default group. NCCL needs one GPU per rank: the trainer and the engines on distinct devices.
CPU runs keep the object-store path (the trainer publishes, the engines fetch)."""

from __future__ import annotations

import datetime
from typing import Iterator

GROUP_PREFIX = "rayalign-weight-sync"


def join_group(host: str, port: int, rank: int, world_size: int, timeout_s: float = 600.0):
    """This process's member of the weight-sync group (rank 0 hosts the rendezvous store at host:port)."""
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        raise RuntimeError("NCCL weight sync needs CUDA in every member (trainer rank 0 and the engines)")
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0,
                          timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    return dist.ProcessGroupNCCL(dist.PrefixStore(GROUP_PREFIX, store), rank, world_size)


def broadcast(group, tensor) -> None:
    """Rank 0's `tensor` into every member's `tensor` (same shape and dtype, on the member's GPU)."""
    import torch.distributed as dist

    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


def parameter_meta(module, zero_stage: int) -> list[tuple[str, str, list[int]]]:
    """(name, dtype, full shape) of every parameter, in the order `send_parameters` sends them."""
    return [(name, str(p.dtype).removeprefix("torch."), list(p.ds_shape if zero_stage == 3 else p.shape))
            for name, p in module.named_parameters()]


def send_parameters(group, module, zero_stage: int, rank: int) -> None:
    """Every parameter from trainer rank 0 (under ZeRO-3 every rank joins each gather; rank 0 sends)."""
    import deepspeed

    for _, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], enabled=zero_stage == 3):
            if rank == 0:
                broadcast(group, param.data.contiguous())


def receive_parameters(group, meta: list, device) -> Iterator[tuple[str, "object"]]:
    """(name, tensor) of every parameter rank 0 sends, received into fresh buffers on `device`."""
    import torch

    for name, dtype, shape in meta:
        buffer = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        broadcast(group, buffer)
        yield name, buffer
