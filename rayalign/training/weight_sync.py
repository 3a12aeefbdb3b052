"""Online weight sync between CUDA trainers and engines, without a copy through host memory.

NCCL (trainer and engines on distinct GPUs): trainer rank 0 sends every parameter, one tensor at a time, over a
process group of its own (rank 0 = trainer rank 0, ranks 1.. = the engines' workers), beside DeepSpeed's default
group. NCCL refuses two ranks on one GPU, so engines that share trainer rank 0's GPU take CUDA IPC handles instead:
they open the trainer's own parameter memory and copy from it. CPU runs keep the object-store path (the trainer
publishes, the engines fetch). `sync_mode` chooses."""

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


def device_uuid() -> str | None:
    """The UUID of this process's current CUDA device (the same GPU has the same UUID in every process, whatever
    CUDA_VISIBLE_DEVICES numbers it), None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)


def sync_mode(trainer_gpu: tuple, engine_gpus: list[tuple], tensor_parallel: int, zero_stage: int) -> str:
    """"cuda ipc", "nccl" or "object store", from (node, GPU UUID or None) of trainer rank 0 and of each engine:
    IPC when every engine runs on rank 0's GPU (one worker each, and the full parameters on rank 0: ZeRO 0-2),
    NCCL when every member has a GPU of its own, else the object store."""
    members = [trainer_gpu, *engine_gpus]
    if any(uuid is None for _, uuid in members):
        return "object store"
    if tensor_parallel == 1 and zero_stage < 3 and all(gpu == trainer_gpu for gpu in engine_gpus):
        return "cuda ipc"
    if len(set(members)) == len(members):
        return "nccl"
    return "object store"


def share_parameters(module) -> list:
    """(name, GPU UUID, CUDA IPC handle) of every parameter of a module whose parameters are whole on this GPU.
    The receivers read the live parameters: share after the step and before the next one."""
    import torch
    from torch.multiprocessing.reductions import reduce_tensor

    torch.cuda.synchronize()  # the step's writes are done before another process reads the memory
    uuid = device_uuid()
    return [(name, uuid, reduce_tensor(param.data.detach())) for name, param in module.named_parameters()]


def open_shared(shared: list) -> Iterator[tuple[str, "object"]]:
    """(name, tensor) of `share_parameters`' handles, opened in this process without a copy."""
    import torch

    index = {str(torch.cuda.get_device_properties(i).uuid): i for i in range(torch.cuda.device_count())}
    for name, uuid, (rebuild, args) in shared:
        if uuid not in index:
            raise RuntimeError(f"CUDA IPC weight sync: the trainer's GPU {uuid} is not visible in this process")
        args = list(args)
        args[6] = index[uuid]  # the device index, as this process numbers the GPU
        yield name, rebuild(*args)
