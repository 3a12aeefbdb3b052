"""ActorGroup: K actors of one kind, placed as the plan lays them out, kept busy with shards (a dead actor's
shards retried on the others), and shut down with their placement groups. Use as a context manager."""

from __future__ import annotations

import pyarrow as pa
import ray
from ray.exceptions import RayActorError

from rayalign.actors.pool import actor_nodes, remove_placement, run_shards, wait_started
from rayalign.generation import RESUME_AFTER_LOST_ACTORS, ActorsLostError, actor_failure
from rayalign.progress import progress_bar


class ActorGroup:
    what = "actors"  # named in messages while actors wait to be placed

    def __init__(self, actors: list, placement: list, each: dict):
        self.actors, self.placement, self.each = actors, placement, each
        self.alive = list(range(len(actors)))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _map(self, call, shards, on_shard, **options):
        """`call(actor, shard)` over every shard (see pool.run_shards); model loading is not counted as work."""
        refs = {i: self.actors[i].ready.remote() for i in self.alive}
        try:
            wait_started(list(refs.values()), self.what, self.each)
        except RayActorError:  # one died since the last call: the others take its shards
            self._drop_dead(refs)
        return run_shards(self.actors, self.alive, call, shards, on_shard, **options)

    def _drop_dead(self, refs: dict) -> list:
        """The results of `refs` (actor index -> finished ref) of the actors that answered; those that died leave
        `alive`. With none left, RuntimeError."""
        results, error = [], None
        for i, ref in refs.items():
            try:
                results.append(ray.get(ref))
            except RayActorError as e:
                error = e
                self.alive.remove(i)
        if not self.alive:
            raise ActorsLostError(f"every one of the {len(refs)} {self.what} died ({actor_failure(error)}); "
                                  f"{RESUME_AFTER_LOST_ACTORS}") from None
        return results

    def gather(self, shards: list[pa.Table], *args, **options) -> pa.Table:
        """`run` every shard; the results in shard order. The group stays up."""
        results: dict[int, pa.Table] = {}
        self.run(shards, *args, results.__setitem__, **options)
        return pa.concat_tables([results[i] for i in range(len(shards))])

    def collect(self, shards: list[pa.Table], *args, label: str, unit: str = "rows") -> pa.Table:
        """`gather` behind a progress bar; the group shuts down after."""
        with self, progress_bar(label, sum(s.num_rows for s in shards), unit) as update:
            return self.gather(shards, *args, progress=update)

    def _broadcast(self, method: str, *args, weights) -> None:
        """Every live actor calls `method(*args, ref)`; weights go into the object store once (an ObjectRef, such
        as a trainer's published weights, is passed on as it is)."""
        ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)
        refs = {i: getattr(self.actors[i], method).remote(*args, ref) for i in self.alive}
        ray.wait(list(refs.values()), num_returns=len(refs))
        self._drop_dead(refs)  # a dead actor gets no weights and no more work

    def _gather(self, method: str, *args) -> list:
        return ray.get([getattr(self.actors[i], method).remote(*args) for i in self.alive])

    def nodes(self) -> list[str]:
        return actor_nodes([self.actors[i] for i in self.alive])

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        remove_placement(self.placement)
        self.actors, self.placement, self.alive = [], [], []
