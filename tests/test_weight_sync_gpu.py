"""Online weight sync on CUDA: trainer rank 0 broadcasts over NCCL into engines on GPUs of their own, and hands
CUDA IPC handles to engines on its own GPU."""

import numpy as np
import pytest

from rayalign.config import ModelConfig, load_config


def sync_after_a_step(tiny_model, gpus: list[str]) -> tuple[str, object, dict, dict]:
    """(sync mode, what push returned, trainer parameters, first engine's weights) after one policy update."""
    from rayalign.actors.generator import GenerationGroup
    from rayalign.actors.rl_trainer import PolicyGroup
    from rayalign.actors.weight_sync import WeightSync
    from test_online import greetings

    cfg = load_config(None, [f"policy.path={tiny_model}", "training.micro_batch_size=4", "training.lr=1.0e-3",
                             "training.warmup_ratio=0.0", "policy.dtype=float32", *gpus])
    generators = GenerationGroup(tiny_model, cfg.policy, cfg.engines)
    trainer = PolicyGroup(tiny_model, ModelConfig(path=tiny_model), cfg.training)
    try:
        trainer.prepare(2, tiny_model)
        sequences = greetings(tiny_model)
        stats = trainer.rollout_stats(sequences)
        trainer.update(sequences, [1.0, -1.0, 0.5, -0.5], [s["logp"] for s in stats],
                       [s["ref_logp"] for s in stats], 0.1, "k3", 0.2)
        sync = WeightSync(trainer, generators)
        pushed = sync.push()
        return sync.mode, pushed, trainer.parameters(), generators.weights()[0]
    finally:
        generators.shutdown()
        trainer.shutdown()


@pytest.mark.gpu
def test_nccl_broadcast_gives_the_engines_the_trainers_weights(ray_session, tiny_model):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL weight sync needs the trainer and the engine on two GPUs")
    mode, pushed, params, engine = sync_after_a_step(tiny_model, ["training.num_gpus=1", "engines.num_gpus=1"])
    assert mode == "nccl" and pushed is None  # nothing went through the object store
    assert engine.keys() == params.keys()
    # the trainer's bf16 values, widened exactly into the engine's float32 parameters
    assert all(np.array_equal(engine[k], params[k]) for k in params)


@pytest.mark.gpu
def test_engines_on_the_trainers_gpu_take_its_weights_by_cuda_ipc(ray_session, tiny_model):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("CUDA IPC weight sync needs a GPU")
    mode, pushed, params, engine = sync_after_a_step(tiny_model, ["training.num_gpus=0.5", "engines.num_gpus=0.5"])
    assert mode == "cuda ipc" and pushed is None  # only handles travelled
    assert engine.keys() == params.keys()
    assert all(np.array_equal(engine[k], params[k]) for k in params)
