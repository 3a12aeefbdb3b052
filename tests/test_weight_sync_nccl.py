"""Online weight sync over NCCL on CUDA: trainer rank 0 broadcasts into the engines (one GPU per member)."""

import numpy as np
import pytest

from rayalign.config import ModelConfig, load_config


@pytest.mark.gpu
def test_nccl_broadcast_gives_the_engines_the_trainers_weights(ray_session, tiny_model):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL weight sync needs the trainer and the engine on two GPUs")
    from rayalign.actors.generator import GenerationGroup
    from rayalign.actors.rl_trainer import PolicyGroup
    from rayalign.actors.weight_sync import WeightSync, uses_nccl
    from test_online import greetings

    cfg = load_config(None, [f"policy.path={tiny_model}", "training.micro_batch_size=4", "training.lr=1.0e-3",
                             "training.warmup_ratio=0.0", "training.num_gpus=1", "engines.num_gpus=1",
                             "policy.dtype=float32"])
    assert uses_nccl(cfg)
    generators = GenerationGroup(tiny_model, cfg.policy, cfg.engines)
    trainer = PolicyGroup(tiny_model, ModelConfig(path=tiny_model), cfg.training)
    try:
        trainer.prepare(2, tiny_model)
        sequences = greetings(tiny_model)
        stats = trainer.rollout_stats(sequences)
        trainer.update(sequences, [1.0, -1.0, 0.5, -0.5], [s["logp"] for s in stats],
                       [s["ref_logp"] for s in stats], 0.1, "k3", 0.2)
        sync = WeightSync(trainer, generators, nccl=True)
        assert sync.push() is None  # nothing went through the object store
        params = trainer.parameters()
        engine = generators.weights()[0]
    finally:
        generators.shutdown()
        trainer.shutdown()
    assert engine.keys() == params.keys()
    # the trainer's bf16 values, widened exactly into the engine's float32 parameters
    assert all(np.array_equal(engine[k], params[k]) for k in params)
