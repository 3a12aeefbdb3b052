"""Online weight sync from the trainer to the generation engines, without the driver as a hop.

CUDA trainer and engines: an NCCL broadcast from trainer rank 0 into every engine worker
(rayalign.training.weight_sync). Otherwise: trainer rank 0 puts its gathered parameters into the object store
and every engine fetches that object (TrainerGroup.publish_weights)."""

from __future__ import annotations

import ray


def uses_nccl(cfg) -> bool:
    """NCCL when both the trainer and the engines hold GPUs (one per rank, as NCCL needs)."""
    return cfg.training.num_gpus > 0 and cfg.engines.num_gpus > 0


class WeightSync:
    def __init__(self, trainer, generators, nccl: bool, engine_workers: int = 1):
        self.trainer, self.generators, self.meta = trainer, generators, None
        if nccl:
            actors = [generators.actors[i] for i in generators.alive]
            host, port = ray.get(trainer.actors[0].master.remote())
            world = 1 + len(actors) * engine_workers
            joins = [a.join_weight_group.remote(host, port, world) for a in trainer.actors]
            joins += [a.join_weight_group.remote(host, port, 1 + i * engine_workers, world) for i, a in enumerate(actors)]
            self.meta = ray.get(joins)[0]

    def push(self):
        """The trainer's current weights into every engine; returns the published object on the object-store path
        (None over NCCL)."""
        if self.meta is None:
            weights = self.trainer.publish_weights()  # put by the trainer, fetched by the engines
            self.generators.update_weights(weights)
            return weights
        actors = [self.generators.actors[i] for i in self.generators.alive]
        ray.get([a.broadcast_weights.remote() for a in self.trainer.actors]
                + [a.receive_weights.remote(self.meta) for a in actors])
