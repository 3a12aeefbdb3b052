"""Generation actors: each owns one engine; a group shards prompt rows over K of them."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from rayalign.config import EnginesConfig, ModelConfig, SamplingConfig


@ray.remote
class GenerationActor:
    """Owns one inference engine; `generate` turns a batch of prompt rows into samples rows."""

    def __init__(self, model_path: str, model: ModelConfig, engines: EnginesConfig):
        import torch

        from rayalign.engines import create_engine

        torch.set_num_threads(max(1, int(engines.num_cpus)))
        self.engine = create_engine(engines.backend, model_path, dtype=model.dtype, batch_size=engines.batch_size,
                                    trust_remote_code=model.trust_remote_code,
                                    tensor_parallel_size=engines.tensor_parallel_size)

    def generate(self, prompts: pa.Table, sampling: SamplingConfig, iteration: int, policy: str) -> pa.Table:
        from rayalign.generation import generate_samples

        return generate_samples(self.engine, prompts, sampling, iteration, policy)

    def ready(self) -> bool:
        return True

    def where(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "pid": os.getpid()}


@dataclass
class GenerationStats:
    rows: int = 0
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    retries: int = 0
    skipped_shards: int = 0
    shards_by_actor: dict[int, int] = field(default_factory=dict)


def split_shards(prompts: pa.Table, shard_rows: int) -> list[pa.Table]:
    """Deterministic shards of `shard_rows` prompt rows; the unit of work and of output files."""
    return [prompts.slice(i, shard_rows) for i in range(0, prompts.num_rows, shard_rows)]


class GenerationGroup:
    """K GenerationActors; keeps each busy with shards and hands finished shards to `on_shard` at once."""

    def __init__(self, model_path: str, model: ModelConfig, engines: EnginesConfig):
        self.engines = engines
        options = {"num_cpus": engines.num_cpus, "num_gpus": engines.num_gpus * engines.tensor_parallel_size
                   if engines.backend == "vllm" else engines.num_gpus}
        self.actors = [GenerationActor.options(**options).remote(model_path, model, engines)
                       for _ in range(engines.count)]
        self.alive = list(range(len(self.actors)))

    def run(self, shards: list[pa.Table], sampling: SamplingConfig, iteration: int, policy: str,
            on_shard: Callable[[int, pa.Table], None], skip: set[int] = frozenset(),
            progress: Callable[[GenerationStats, int], None] | None = None, max_retries: int = 3) -> GenerationStats:
        stats = GenerationStats(skipped_shards=len(skip))
        todo = [i for i in range(len(shards)) if i not in skip]
        ray.get([self.actors[i].ready.remote() for i in self.alive])  # model loading is not generation time
        attempts = {i: 0 for i in todo}
        in_flight: dict[ray.ObjectRef, tuple[int, int]] = {}
        started = time.perf_counter()

        def submit(actor: int) -> None:
            if todo:
                index = todo.pop(0)
                ref = self.actors[actor].generate.remote(shards[index], sampling, iteration, policy)
                in_flight[ref] = (index, actor)

        for actor in self.alive:  # two shards per actor: one running, one queued behind it
            submit(actor)
            submit(actor)
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            index, actor = in_flight.pop(done[0])
            try:
                table = ray.get(done[0])
            except (RayActorError, ActorDiedError, ActorUnavailableError) as e:
                attempts[index] += 1
                if actor in self.alive:
                    self.alive.remove(actor)
                if attempts[index] > max_retries or not self.alive:
                    raise RuntimeError(f"generation shard {index} failed {attempts[index]} time(s); "
                                       f"{len(self.alive)} actor(s) left: {e}") from e
                stats.retries += 1
                todo.insert(0, index)
                for other in self.alive:  # the dead actor's queued shard comes back here too
                    if sum(1 for _, a in in_flight.values() if a == other) < 2:
                        submit(other)
                continue
            on_shard(index, table)
            stats.rows += shards[index].num_rows
            stats.samples += table.num_rows
            stats.tokens += sum(table.column("num_tokens").to_pylist())
            stats.shards_by_actor[actor] = stats.shards_by_actor.get(actor, 0) + 1
            stats.seconds = time.perf_counter() - started
            if progress:
                progress(stats, sum(s.num_rows for s in shards))
            submit(actor)
        stats.seconds = time.perf_counter() - started
        return stats

    def locations(self) -> list[dict]:
        return ray.get([self.actors[i].where.remote() for i in self.alive])

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
