"""Scoring actors: each loads only the models a recipe's rewards need; a group shards samples over M."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import ray

from rayalign.actors.groups import ActorGroup
from rayalign.actors.pool import ShardStats, placement_options, start_actors
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


class ScoringGroup(ActorGroup):
    """M ScoringActors with the same models; `run` streams shards through them."""

    what = "scoring actors"

    def __init__(self, roles: dict[str, ModelRole], count: int, batch_size: int, num_cpus: float, num_gpus: float):
        options, placement = placement_options(count, num_cpus, num_gpus)
        actors = start_actors(lambda o: ScoringActor.options(**o).remote(roles, batch_size, int(num_cpus)), options,
                              placement)
        super().__init__(actors, placement, {"CPU": num_cpus, "GPU": num_gpus})

    @classmethod
    def for_recipe(cls, roles: dict[str, ModelRole], rewards) -> "ScoringGroup":
        """The recipe's scoring actors (rewards.actors, batch_size, num_cpus, num_gpus)."""
        return cls(roles, rewards.actors, rewards.batch_size, rewards.num_cpus, rewards.num_gpus)

    def num_layers(self, role: str) -> int:
        return ray.get(self.actors[self.alive[0]].num_layers.remote(role))

    def run(self, shards: list[pa.Table], specs: list[ForwardSpec], reward_model: str | None,
            on_shard: Callable[[int, pa.Table], None], skip=frozenset(),
            progress: Callable[[ShardStats], None] | None = None,
            on_errors: Callable[[int, pa.Table], None] | None = None, max_failed_rows: int = 0) -> ShardStats:
        return self._map(lambda a, shard: a.score.remote(shard, specs, reward_model), shards, on_shard, skip=skip,
                         progress=progress, on_errors=on_errors, max_failed_rows=max_failed_rows)

    def update_weights(self, role: str, named_tensors) -> None:
        self._broadcast("update_weights", role, weights=named_tensors)

    def weights(self, role: str) -> list[dict]:
        return self._gather("weights", role)
