"""Scoring actors: each loads only the models a recipe's rewards need; a group shards samples over M."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import ray

from rayalign.actors.pool import (ShardStats, actor_nodes, placement_options, remove_placement, run_shards,
                                  wait_started)
from rayalign.config import ModelConfig
from rayalign.scoring.forward import ForwardSpec


@dataclass(frozen=True)
class ModelRole:
    path: str  # resolved, loadable path
    model: ModelConfig
    kind: str = "lm"  # "lm" (causal LM, teacher-forced) or "reward_model" (sequence classification)


@ray.remote
class ScoringActor:
    def __init__(self, roles: dict[str, ModelRole], batch_size: int, num_threads: int):
        import torch

        from rayalign.engines.hf import HFEngine
        from rayalign.engines.reward_model import RewardModelEngine

        torch.set_num_threads(max(1, num_threads))
        self.engines = {}
        for name, role in roles.items():
            cls = HFEngine if role.kind == "lm" else RewardModelEngine
            self.engines[name] = cls(role.path, dtype=role.model.dtype, batch_size=batch_size,
                                     trust_remote_code=role.model.trust_remote_code)

    def ready(self) -> bool:
        return True

    def where(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def num_layers(self, role: str) -> int:
        return self.engines[role].model.config.num_hidden_layers

    def update_weights(self, role: str, named_tensors: dict) -> None:
        """Online RL: the scoring copy of a model (the policy) takes the trainer's new parameters."""
        self.engines[role].update_weights(named_tensors)

    def weights(self, role: str) -> dict:
        return self.engines[role].weights()

    def score(self, table: pa.Table, specs: list[ForwardSpec], reward_model: str | None) -> tuple[pa.Table, pa.Table]:
        """(scored rows, errors): samples that fail by themselves are left out and named in `errors`."""
        from rayalign.scoring.forward import forward_rows_isolating

        return forward_rows_isolating(self.engines, table, specs, reward_model)


class ScoringGroup:
    """M ScoringActors with the same models; `run` streams shards through them."""

    def __init__(self, roles: dict[str, ModelRole], count: int, batch_size: int, num_cpus: float, num_gpus: float):
        options, self.placement = placement_options(count, num_cpus, num_gpus)
        self.each = {"CPU": num_cpus, "GPU": num_gpus}
        self.actors = [ScoringActor.options(**o).remote(roles, batch_size, int(num_cpus)) for o in options]
        self.alive = list(range(count))

    def num_layers(self, role: str) -> int:
        return ray.get(self.actors[self.alive[0]].num_layers.remote(role))

    def run(self, shards: list[pa.Table], specs: list[ForwardSpec], reward_model: str | None,
            on_shard: Callable[[int, pa.Table], None], skip=frozenset(),
            progress: Callable[[ShardStats], None] | None = None,
            on_errors: Callable[[int, pa.Table], None] | None = None, max_failed_rows: int = 0) -> ShardStats:
        wait_started([self.actors[i].ready.remote() for i in self.alive], "scoring actors", self.each)
        return run_shards(self.actors, self.alive, lambda a, shard: a.score.remote(shard, specs, reward_model),
                          shards, on_shard, skip=skip, progress=progress, on_errors=on_errors,
                          max_failed_rows=max_failed_rows)

    def update_weights(self, role: str, named_tensors: dict) -> None:
        ref = named_tensors if isinstance(named_tensors, ray.ObjectRef) else ray.put(named_tensors)
        ray.get([self.actors[i].update_weights.remote(role, ref) for i in self.alive])

    def weights(self, role: str) -> list[dict]:
        return ray.get([self.actors[i].weights.remote(role) for i in self.alive])

    def nodes(self) -> list[str]:
        return actor_nodes([self.actors[i] for i in self.alive])

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        remove_placement(self.placement)
