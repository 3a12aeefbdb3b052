"""Generation actors: each owns one engine; a group shards prompt rows over K of them."""

from __future__ import annotations

from typing import Callable

import pyarrow as pa
import ray

from rayalign.actors.groups import ActorGroup
from rayalign.actors.pool import ShardStats, placement_options, start_actors
from rayalign.config import EnginesConfig, ModelConfig, SamplingConfig
from rayalign.engines import GenerationRequest, SamplingParams


@ray.remote
class GenerationActor:
    """Owns one inference engine; `generate` turns a batch of prompt rows into samples rows."""

    def __init__(self, model_path: str, model: ModelConfig, engines: EnginesConfig):
        import torch

        from rayalign.engines import create_engine

        threads = max(1, int(engines.num_cpus))
        torch.set_num_threads(threads)
        self.on_gpu, self.tensor_parallel = engines.num_gpus > 0, engines.tensor_parallel
        self.engine = create_engine(engines.backend, model_path, dtype=model.dtype, batch_size=engines.batch_size,
                                    trust_remote_code=model.trust_remote_code,
                                    tensor_parallel_size=engines.tensor_parallel_size,
                                    gpu_memory_utilization=engines.gpu_memory_utilization,
                                    kv_cache_gib=engines.kv_cache_gib, max_model_len=engines.max_model_len,
                                    max_batch_tokens=engines.max_batch_tokens, cpu_threads=threads)
        # one short request first: the first call's one-time costs (kernels chosen, buffers allocated; about 0.8 s
        # on the tiny model on CPU) belong to start-up, not to the first shard
        try:
            self.engine.generate([GenerationRequest([{"role": "user", "content": "Hello"}],
                                                    SamplingParams(1.0, 1.0, 2, 0))])
        except self._refusals(engines.backend):  # a context shorter than the template: such rows fail, each in errors/
            pass

    @staticmethod
    def _refusals(backend: str) -> tuple[type[Exception], ...]:
        """The errors an engine raises for a request it refuses (not a failing engine)."""
        if backend == "vllm":
            from vllm.exceptions import VLLMValidationError

            return ValueError, VLLMValidationError
        return (ValueError,)

    def generate(self, prompts: pa.Table, sampling: SamplingConfig, iteration: int, policy: str,
                 token_ids: bool = False) -> tuple[pa.Table, pa.Table]:
        """(samples, errors): prompt rows that fail by themselves are left out and named in `errors`; `token_ids`:
        the samples carry the generated tokens (response_ids)."""
        from rayalign.generation import generate_isolating

        return generate_isolating(self.engine, prompts, sampling, iteration, policy, token_ids)

    def update_weights(self, named_tensors: dict) -> None:
        """Online RL: take the trainer's parameters (a Ray object, fetched once per actor)."""
        self.engine.update_weights(named_tensors)

    def weights(self) -> dict:
        return self.engine.weights()

    def join_weight_group(self, host: str, port: int, rank: int, world_size: int) -> None:
        self.engine.join_weight_group(host, port, rank, world_size)

    def receive_weights(self, meta: list) -> None:
        self.engine.receive_weights(meta)

    def receive_shared(self, shared: list) -> None:
        self.engine.receive_shared(shared)

    def gpu(self) -> tuple:
        """(node id, GPU UUID or None) of this actor's engine; a tensor-parallel engine's workers hold GPUs of their
        own (its placement group), named by the actor."""
        from rayalign.training.weight_sync import device_uuid

        context = ray.get_runtime_context()
        if self.tensor_parallel > 1:
            return context.get_node_id(), f"tensor-parallel workers of {context.get_actor_id()}"
        return context.get_node_id(), device_uuid() if self.on_gpu else None

    def token_logps(self, sequences: list) -> list[list[float]]:
        """Per-token log-probs of (prompt ids, response ids) under the engine's current weights: the behaviour policy
        of rollouts it generated (online.async records them before the engine takes newer weights)."""
        return self.engine.token_logps(sequences)

    def ready(self) -> bool:
        return True

    def where(self) -> str:
        return ray.get_runtime_context().get_node_id()


class GenerationGroup(ActorGroup):
    """K GenerationActors; keeps each busy with shards and hands finished shards to `on_shard` at once."""

    what = "generation actors"

    def __init__(self, model_path: str, model: ModelConfig, engines: EnginesConfig, concurrency: int | None = None):
        tp = engines.tensor_parallel_size if engines.backend == "vllm" else 1
        options, placement = placement_options(engines.count, engines.num_cpus, engines.num_gpus, tp)
        # more than one shard in flight lets a vLLM actor batch their requests in one engine (no idle tail while
        # a shard's last sequences finish); the HF engine takes one batch at a time
        self.concurrency = concurrency = concurrency or (engines.shards_in_flight if engines.backend == "vllm" else 1)
        actors = start_actors(lambda o: GenerationActor.options(**o, max_concurrency=concurrency).remote(
            model_path, model, engines), options, placement)
        super().__init__(actors, placement, {"CPU": engines.num_cpus, "GPU": engines.num_gpus})

    def run(self, shards: list[pa.Table], sampling: SamplingConfig, iteration: int, policy: str,
            on_shard: Callable[[int, pa.Table], None], skip=frozenset(),
            progress: Callable[[ShardStats], None] | None = None,
            on_errors: Callable[[int, pa.Table], None] | None = None, max_failed_rows: int = 0,
            token_ids: bool = False) -> ShardStats:
        return self._map(lambda actor, shard: actor.generate.remote(shard, sampling, iteration, policy, token_ids),
                         shards, on_shard, skip=skip, progress=progress, token_column="num_tokens",
                         on_errors=on_errors, max_failed_rows=max_failed_rows, per_actor=self.concurrency + 1)

    def update_weights(self, named_tensors) -> None:
        """Push new weights to every engine (a dict, or an ObjectRef such as a trainer's `publish_weights`)."""
        self._broadcast("update_weights", weights=named_tensors)

    def weights(self) -> list[dict]:
        return self._gather("weights")

    def token_logps(self, sequences: list) -> list[list[float]]:
        """Per-token log-probs of (prompt ids, response ids) pairs under the engines' current weights, in order
        (split over the live actors)."""
        if not sequences:
            return []
        actors = [self.actors[i] for i in self.alive]
        size = -(-len(sequences) // len(actors))
        parts = ray.get([a.token_logps.remote(sequences[s:s + size])
                         for a, s in zip(actors, range(0, len(sequences), size))])
        return [row for part in parts for row in part]
