"""Keeping K actors busy with shards, retrying a dead actor's shards on the others."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from rayalign.generation import RESUME_AFTER_LOST_ACTORS, ActorsLostError, FailedRowsError, actor_failure


@dataclass
class ShardStats:
    rows_in: int = 0
    rows_out: int = 0
    tokens: int = 0
    seconds: float = 0.0
    retries: int = 0
    failed_rows: int = 0  # rows that failed by themselves and were left out (see rayalign.generation.isolate_failures)
    skipped_shards: int = 0
    shards_by_actor: dict[int, int] = field(default_factory=dict)


class ShardFeed:
    """Shards that arrive while a pool runs (generation streaming into scoring): a producer `put`s each one as it
    is ready and `close`s the feed when no more will come; `abort` stops the consuming pool with the error."""

    def __init__(self):
        self.shards: dict[int, pa.Table] = {}
        self.closed = False
        self._arrived: queue.Queue = queue.Queue()
        self._error: BaseException | None = None

    def put(self, index: int, table: pa.Table) -> None:
        self.shards[index] = table
        self._arrived.put(index)

    def close(self) -> None:
        self._arrived.put(None)

    def abort(self, error: BaseException) -> None:
        self._error = error
        self._arrived.put(None)

    def arrived(self, block: bool) -> list[int]:
        """The indices put since the last call (waiting for one, or for the close, when `block`)."""
        out = []
        try:
            item = self._arrived.get() if block else self._arrived.get_nowait()
            while True:
                if item is None:
                    self.closed = True
                else:
                    out.append(item)
                item = self._arrived.get_nowait()
        except queue.Empty:
            pass
        if self._error is not None:
            raise RuntimeError(f"the shards' producer stopped: {self._error}")
        return out


def run_shards(actors: list, alive: list[int], call: Callable[[object, pa.Table], ray.ObjectRef],
               shards: list[pa.Table] | ShardFeed, on_shard: Callable[[int, pa.Table], None], *, skip=frozenset(),
               progress: Callable[[ShardStats], None] | None = None, max_retries: int = 3,
               token_column: str | None = None, on_errors: Callable[[int, pa.Table], None] | None = None,
               max_failed_rows: int = 0, per_actor: int = 2) -> ShardStats:
    """Run `call(actor, shard) -> (table, errors)` for every shard not in `skip`, `per_actor` in flight per actor
    (one running and one queued behind it, or more for actors that run several at once).

    A shard's failed rows go to `on_errors(index, errors)`, then its table to `on_shard(index, table)`, at once
    (in completion order). A shard whose actor died goes back to the queue for another actor; `alive` is
    updated in place. More than `max_failed_rows` failed rows in all raise FailedRowsError. `shards` may be a
    ShardFeed: its shards are taken as they arrive, until it is closed.
    """
    feed = shards if isinstance(shards, ShardFeed) else None
    shards = feed.shards if feed else shards
    stats = ShardStats(skipped_shards=len(skip))
    todo = [] if feed else [i for i in range(len(shards)) if i not in skip]
    attempts = {i: 0 for i in todo}
    in_flight: dict[ray.ObjectRef, tuple[int, int]] = {}
    started = time.perf_counter()

    def has_room(actor: int) -> bool:
        return sum(1 for _, a in in_flight.values() if a == actor) < per_actor

    def submit(actor: int) -> None:
        if todo:
            index = todo.pop(0)
            in_flight[call(actors[actor], shards[index])] = (index, actor)

    def take_arrived() -> None:  # streaming: queue what arrived, give idle actors work
        for index in feed.arrived(block=not in_flight):
            if index not in skip:
                todo.append(index)
                attempts[index] = 0
        for actor in alive:
            while todo and has_room(actor):
                submit(actor)

    for _ in range(per_actor):  # round-robin: every actor gets a shard before any gets a second
        for actor in list(alive):
            submit(actor)
    while in_flight or (feed and not feed.closed):
        if feed and not feed.closed:
            take_arrived()
            if not in_flight:
                continue
        done, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.05 if feed and not feed.closed else None)
        if not done:
            continue
        index, actor = in_flight.pop(done[0])
        try:
            table, errors = ray.get(done[0])
        except (RayActorError, ActorDiedError, ActorUnavailableError) as e:
            attempts[index] += 1
            if actor in alive:
                alive.remove(actor)
            if attempts[index] > max_retries or not alive:
                raise ActorsLostError(f"shard {index} failed {attempts[index]} time(s) as its actor died, "
                                      f"{len(alive)} actor(s) left ({actor_failure(e)}); {RESUME_AFTER_LOST_ACTORS}") \
                    from None
            stats.retries += 1
            todo.insert(0, index)
            for other in alive:  # the dead actor's queued shard comes back here too
                if has_room(other):
                    submit(other)
            continue
        if errors.num_rows:
            stats.failed_rows += errors.num_rows
            if on_errors:
                on_errors(index, errors)
        on_shard(index, table)
        if stats.failed_rows > max_failed_rows:  # after on_shard: the shard's other rows are kept
            first = errors.slice(0, 1).to_pylist()[0]
            raise FailedRowsError(
                f"{stats.failed_rows} row(s) failed by themselves, more than the {max_failed_rows} allowed; "
                f"shard {index}, prompt_id {first['prompt_id']} ({first['lang']}): {first['reason']}")
        stats.rows_in += shards[index].num_rows
        stats.rows_out += table.num_rows
        if token_column:
            stats.tokens += sum(table.column(token_column).to_pylist())
        stats.shards_by_actor[actor] = stats.shards_by_actor.get(actor, 0) + 1
        stats.seconds = time.perf_counter() - started
        if progress:
            progress(stats)
        submit(actor)
    stats.seconds = time.perf_counter() - started
    return stats


def placement_options(count: int, num_cpus: float, num_gpus: float, tensor_parallel_size: int = 1) -> tuple[list, list]:
    """Ray options for `count` actors and the placement groups made for them.

    A tensor-parallel engine gets one STRICT_PACK placement group of `tensor_parallel_size` GPU bundles
    (all on one node); other actors are spread over the nodes (SPREAD), as the cluster plan lays them out. A run
    on a study's slice of whole nodes keeps both on the slice's nodes (`pinning`).
    """
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if tensor_parallel_size > 1:
        groups = [placement_group([{"CPU": num_cpus / tensor_parallel_size, "GPU": 1.0}] * tensor_parallel_size,
                                  strategy="STRICT_PACK", **bundle_pinning(tensor_parallel_size))
                  for _ in range(count)]
        try:
            wait_started([g.ready() for g in groups], "tensor-parallel placement groups",
                         {"CPU": num_cpus, "GPU": tensor_parallel_size})
        except BaseException:  # an error or Ctrl-C while waiting: the groups made here go with it
            abandon([], groups)
            raise
        # the engine process holds a CPU share of the first bundle; its tensor-parallel workers use the GPUs
        return [{"num_cpus": num_cpus / tensor_parallel_size, "num_gpus": 0,
                 "scheduling_strategy": PlacementGroupSchedulingStrategy(g, placement_group_bundle_index=0)}
                for g in groups], groups
    strategy = {"scheduling_strategy": "SPREAD"} if count > 1 else {}
    return [{"num_cpus": num_cpus, "num_gpus": num_gpus, **strategy, **pinning()} for _ in range(count)], []


def node_selector() -> dict:
    """The label selector of the nodes this process's run is pinned to (a study's slice of whole nodes,
    rayalign.cluster.spec.pinned_nodes), or {} when Ray may place its actors anywhere."""
    from rayalign.cluster.spec import pinned_nodes

    _, node_ids = pinned_nodes()
    return {"ray.io/node-id": f"in({','.join(node_ids)})"} if node_ids else {}


def pinning() -> dict:
    """Actor options that keep an actor on the run's pinned nodes (none when unpinned)."""
    selector = node_selector()
    return {"label_selector": selector} if selector else {}


def bundle_pinning(bundles: int) -> dict:
    """placement_group() arguments that keep each of its `bundles` on the run's pinned nodes (none when unpinned)."""
    selector = node_selector()
    return {"bundle_label_selector": [selector] * bundles} if selector else {}


def check_pinned_alive(what: str) -> None:
    """ClusterError naming the slice and the node when a node the run is pinned to is gone: what waits for it
    (`what`) would never start."""
    from rayalign.cluster.spec import ClusterError, pinned_nodes

    name, node_ids = pinned_nodes()
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]} if node_ids else set()
    gone = [node_id for node_id in node_ids if node_id not in alive]
    if gone:
        raise ClusterError(f"slice {name}: node {gone[0]} is no longer alive, and the {what} are pinned to the "
                           f"slice's {len(node_ids)} node(s), so they cannot start; run the study again to pick the "
                           "slice's nodes anew")


def wait_started(refs: list, what: str, each: dict, every: float = 30.0) -> list:
    """ray.get(refs), saying every `every` seconds what is still waited for and what the cluster has free: actors
    that cannot be placed (a lost node, a cluster smaller than the recipe) would otherwise wait in silence."""
    import sys

    from rayalign.cluster.spec import pinned_nodes

    pending, waited = list(refs), 0.0
    while True:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=every)
        if not pending:
            return ray.get(refs)
        waited += every
        check_pinned_alive(what)
        free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        need = ", ".join(f"{v:g} {k}" for k, v in each.items() if v)
        name, node_ids = pinned_nodes()
        if node_ids:
            need += f", on slice {name}'s {len(node_ids)} node(s)"
        print(f"waiting {waited:.0f} s for {len(pending)} of {len(refs)} {what} to start ({need} each); the cluster "
              f"has {', '.join(f'{v:g} {k}' for k, v in free.items()) or 'nothing'} free. Actors already placed may still be "
              "loading their models (slow on a busy machine). A lost node or a cluster smaller than the recipe "
              "keeps them waiting: lower the count, or add nodes", file=sys.stderr,
              flush=True)


def remove_placement(groups: list) -> None:
    from ray.util.placement_group import remove_placement_group

    for group in groups:
        remove_placement_group(group)


def abandon(actors: list, groups: list) -> None:
    """Kill `actors` and remove the placement `groups` of a group whose constructor failed, before its error goes on:
    the callers' clean-up (a with block, an ExitStack) only covers groups that finished constructing. A failure here
    is not raised: the constructor's error is the one to report."""
    from ray.util.placement_group import remove_placement_group

    for actor in actors:
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 (already gone, or Ray itself is down)
            pass
    for group in groups:
        try:
            remove_placement_group(group)
        except Exception:  # noqa: BLE001
            pass


def start_actors(start: Callable[[object], object], items: list, groups: list) -> list:
    """`start(item)` (an actor handle) for each of `items`; if one raises (or Ctrl-C comes), the actors already
    started are killed and the placement `groups` removed, then the error goes on."""
    actors = []
    try:
        for item in items:
            actors.append(start(item))
    except BaseException:
        abandon(actors, groups)
        raise
    return actors


def actor_nodes(actors: list) -> list[str]:
    """The Ray node id each actor runs on."""
    return ray.get([a.where.remote() for a in actors])


def split_shards(table: pa.Table, shard_rows: int) -> list[pa.Table]:
    """Deterministic shards of `shard_rows` rows; the unit of work and of output files."""
    return [table.slice(i, shard_rows) for i in range(0, table.num_rows, shard_rows)]
