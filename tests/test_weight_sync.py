"""The choice of weight-sync path from where trainer rank 0 and the engines run: (node, GPU UUID or None)."""

from rayalign.training.weight_sync import sync_mode

TRAINER = ("node-1", "GPU-a")


def test_engines_on_the_trainers_gpu_take_cuda_ipc_handles():
    assert sync_mode(TRAINER, [("node-1", "GPU-a"), ("node-1", "GPU-a")], 1, 2) == "cuda ipc"


def test_engines_on_gpus_of_their_own_join_an_nccl_group():
    assert sync_mode(TRAINER, [("node-1", "GPU-b"), ("node-2", "GPU-a")], 1, 2) == "nccl"
    assert sync_mode(TRAINER, [("node-1", "GPU-b")], 2, 3) == "nccl"  # tensor parallel and ZeRO-3 broadcast too


def test_anything_else_goes_through_the_object_store():
    assert sync_mode(("node-1", None), [("node-1", None)], 1, 2) == "object store"  # CPU actors
    assert sync_mode(TRAINER, [("node-1", None)], 1, 2) == "object store"  # CPU engines
    assert sync_mode(TRAINER, [("node-1", "GPU-a")], 1, 3) == "object store"  # ZeRO-3: rank 0 holds a partition
    assert sync_mode(TRAINER, [("node-1", "GPU-a")], 2, 2) == "object store"  # one GPU cannot hold a TP group
    assert sync_mode(TRAINER, [("node-1", "GPU-a"), ("node-1", "GPU-b")], 1, 2) == "object store"  # mixed
    assert sync_mode(TRAINER, [("node-1", "GPU-b"), ("node-1", "GPU-b")], 1, 2) == "object store"  # shared GPU
