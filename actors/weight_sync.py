"""Online weight sync from the trainer to the generation engines, without the driver as a hop.

CUDA trainer and engines on distinct GPUs: an NCCL broadcast from trainer rank 0 into every engine worker. Engines on
trainer rank 0's GPU: CUDA IPC handles of its parameters, which they open and copy from (NCCL refuses two ranks
on one GPU). Otherwise: trainer rank 0 puts its gathered parameters into the object store and every engine
fetches that object (TrainerGroup.publish_weights). rayalign.training.weight_sync has the three paths' pieces."""

from __future__ import annotations

import ray

from rayalign.training.weight_sync import sync_mode


class WeightSync:
    def __init__(self, trainer, generators, engine_workers: int = 1):
        self.trainer, self.generators, self.meta = trainer, generators, None
        actors = [generators.actors[i] for i in generators.alive]
        trainer_gpu, *engine_gpus = ray.get([trainer.actors[0].gpu.remote()] + [a.gpu.remote() for a in actors])
        self.mode = sync_mode(tuple(trainer_gpu), [tuple(g) for g in engine_gpus], engine_workers,
                              trainer.training.zero_stage)
        if self.mode == "nccl":
            host, port = ray.get(trainer.actors[0].master.remote())
            world = 1 + len(actors) * engine_workers
            joins = [a.join_weight_group.remote(host, port, world) for a in trainer.actors]
            joins += [a.join_weight_group.remote(host, port, 1 + i * engine_workers, world) for i, a in enumerate(actors)]
            self.meta = ray.get(joins)[0]

    def push(self):
        """The trainer's current weights into every engine; returns the published object on the object-store path
        (None otherwise)."""
        actors = [self.generators.actors[i] for i in self.generators.alive]
        if self.mode == "object store":
            weights = self.trainer.publish_weights()  # put by the trainer, fetched by the engines
            self.generators.update_weights(weights)
            return weights
        if self.mode == "cuda ipc":
            shared = ray.get(self.trainer.actors[0].share_weights.remote())  # handles only: a few bytes per tensor
            ray.get([a.receive_shared.remote(shared) for a in actors])
            return None
        ray.get([a.broadcast_weights.remote() for a in self.trainer.actors]
                + [a.receive_weights.remote(self.meta) for a in actors])
