"""Which schedule an offline iteration runs: generation streaming into scoring, or one phase after the other.

Streaming holds the engines and the scorers at once, so it needs a cluster that places both side by side (or
colocates them on shared GPUs through fractional num_gpus). The datasets are the same under either schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

from rayalign.cluster.model_info import PlanError
from rayalign.cluster.spec import ClusterSpec, actors_fitting, take_gpus


@dataclass(frozen=True)
class Schedule:
    stream: bool
    reason: str  # one line, said in the plan and at launch

    def text(self) -> str:
        return f"schedule: {'stream' if self.stream else 'barrier'} ({self.reason})"


def _actors(cfg, spec: ClusterSpec) -> list[tuple[str, float, float]]:
    """(role, CPUs, GPUs) of every engine and scorer, as the pools reserve them (GPUs only on a GPU spec)."""
    e, r = cfg.engines, cfg.rewards
    on_gpu = bool(spec.gpus_per_node)
    engine_gpus = e.gpus_per_engine if on_gpu else 0.0
    return ([("engine", e.num_cpus, engine_gpus)] * e.count
            + [("scorer", r.num_cpus, r.num_gpus if on_gpu else 0.0)] * r.actors)


def first_fit(actors: list[tuple[str, float, float]], spec: ClusterSpec) -> tuple[list[list], str | None]:
    """Place (role, CPUs, GPUs) actors node by node, largest first, GPUs as Ray grants them (`actors_fitting`):
    each node's [CPUs left, [each GPU's share left]], and the role of the first actor that found no room (None when
    all fit)."""
    free = [[float(spec.cpus_per_node), [1.0] * spec.gpus_per_node] for _ in range(spec.nodes)]
    first: dict[tuple, int] = {}  # nodes only fill up: one an actor of a kind did not fit never fits that kind again
    for role, cpus, gpus in sorted(actors, key=lambda a: (a[2], a[1]), reverse=True):
        index = first.get((cpus, gpus), 0)
        while index < len(free) and not actors_fitting(cpus, gpus, free[index][0], free[index][1]):
            index += 1
        first[(cpus, gpus)] = index
        if index == len(free):
            return free, role
        free[index][0] -= cpus
        take_gpus(free[index][1], gpus)
    return free, None


def side_by_side(cfg, spec: ClusterSpec) -> str | None:
    """None when every engine and every scorer fit the cluster at once (first fit, largest first, node by node);
    else what does not fit."""
    actors = _actors(cfg, spec)
    _, role = first_fit(actors, spec)
    if role is None:
        return None
    need_cpus, need_gpus = sum(a[1] for a in actors), sum(a[2] for a in actors)
    return (f"{cfg.engines.count} engine(s) + {cfg.rewards.actors} scorer(s) need {need_cpus:g} CPUs"
            + (f" and {need_gpus:g} GPUs" if need_gpus else "") + f" at once; {spec.name} has "
            f"{spec.nodes * spec.cpus_per_node} CPUs" + (f" and {spec.total_gpus} GPUs" if spec.total_gpus else "")
            + f" (one {role} found no room)")


def streams(cfg) -> bool:
    """Whether an offline recipe has generation feeding a scoring phase, the two roles streaming can overlap."""
    r = cfg.rewards
    scored = r.latent.enabled or r.implicit.enabled or r.reward_model.enabled or bool(r.user.path)
    return cfg.mode != "online" and cfg.pairs.method != "dco" and bool(scored)


def fit_side_by_side(cfg, spec: ClusterSpec, engines: int, scorers: int) -> bool:
    import dataclasses

    return side_by_side(dataclasses.replace(cfg, engines=dataclasses.replace(cfg.engines, count=engines),
                                            rewards=dataclasses.replace(cfg.rewards, actors=scorers)), spec) is None


def most_beside(cfg, spec: ClusterSpec, engines: int | str, scorers: int | str, most: int) -> int:
    """The most actors, up to `most`, of the role given as "auto" that fit beside the other role's count; 0 when
    none does. Fewer fit as the other count rises, so a bisection finds it."""
    low, high = 0, most
    while low < high:
        mid = (low + high + 1) // 2
        fits = fit_side_by_side(cfg, spec, mid if engines == "auto" else engines, mid if scorers == "auto" else scorers)
        low, high = (mid, high) if fits else (low, mid - 1)
    return low


def balanced_counts(cfg, spec: ClusterSpec, most_engines: int, most_scorers: int) -> tuple[int, int] | None:
    """(engines, scorers) for a streamed iteration on `spec`: the pair that fits side by side and whose slower role
    finishes first, by the estimate's busy seconds of one engine and one scorer (both roles run at once, so the
    iteration lasts as long as the slower one); None without the figures or when no pair fits."""
    from rayalign.cluster.estimate import one_actor_busy

    busy = one_actor_busy(cfg, spec)
    if busy is None:
        return None
    generate, score = busy

    def scorers_beside(engines: int) -> int:
        return most_beside(cfg, spec, engines, "auto", most_scorers)

    # generation's seconds fall as engines rise and scoring's rise: the slower role is fastest where they cross
    low, high = 1, most_engines
    while low < high:
        mid = (low + high) // 2
        scorers = scorers_beside(mid)
        low, high = (mid + 1, high) if scorers and generate / mid > score / scorers else (low, mid)
    options = [(max(generate / e, score / s), e, s) for e in {low - 1, low} if e >= 1 for s in [scorers_beside(e)]
               if s]
    return min(options)[1:] if options else None


def choose_schedule(cfg, spec: ClusterSpec) -> Schedule:
    """The recipe's schedule on `spec` (its counts resolved): cluster.schedule, where auto streams when both roles
    fit side by side. Raises PlanError for `stream` on a cluster that cannot hold both."""
    asked = cfg.cluster.schedule
    if cfg.mode == "online":
        return Schedule(False, "online runs hold every role at once anyway")
    if not streams(cfg):
        return Schedule(False, "no generation feeding a scoring phase")
    if asked == "barrier":
        return Schedule(False, "cluster.schedule: barrier")
    crowded = side_by_side(cfg, spec)
    if crowded is None:
        how = "cluster.schedule: stream" if asked == "stream" else "engines and scorers fit side by side"
        return Schedule(True, f"{how}; scoring starts on finished sample shards")
    if asked == "stream":
        raise PlanError(f"cluster.schedule: stream holds engines and scorers at once, but {crowded}",
                        "set cluster.schedule: barrier (or auto), or lower engines.count / rewards.actors")
    return Schedule(False, f"auto: {crowded}")
