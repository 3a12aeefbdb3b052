"""The placement planner: a recipe's phases on a cluster spec, with the actors, their placement and the memory
each GPU needs, checked before anything starts.

Offline phases (generate -> score -> train) run one after another, so each may use the whole cluster; an online
recipe is planned by rayalign.cluster.online_plan, its roles side by side.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rayalign.cluster.model_info import ModelInfo, PlanError, model_info  # noqa: F401  (re-exported)
from rayalign.cluster.phases import (PhasePlan, Plan, Shortfalls, most_actors, plan_generation, plan_scoring,
                                     plan_training, scored_models)
from rayalign.cluster.spec import ClusterSpec


def save_plan(plan: Plan, run_dir: str | Path) -> Path | None:
    """Write plan.json into the run directory; not into one that holds results of another config (the pipeline
    refuses that directory)."""
    run_dir = Path(run_dir)
    from rayalign.run_dir import holds_results, read_state

    state = read_state(run_dir)  # a damaged one is refused here, before the run starts
    if state is not None and not plan.config.matches(state["config_hash"]) and holds_results(state):
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "plan.json"
    path.write_text(json.dumps(plan.to_dict(), indent=2))
    return path


def resolve_counts(cfg, spec: ClusterSpec):
    """The recipe with every `auto` count filled for the cluster: engines.count and rewards.actors as many as fit
    (offline phases run one after another, so each may take the whole cluster; under cluster.schedule stream, with
    both auto, the cluster is split between them so that they finish together), training.world_size as many ranks
    as fit, at most training.global_batch_size / micro_batch_size (a divisor of it, the accumulation derived)."""
    e, r, t = cfg.engines, cfg.rewards, cfg.training
    auto = [k for k, v in (("engines.count", e.count), ("rewards.actors", r.actors), ("training.world_size",
                                                                                       t.world_size)) if v == "auto"]
    if auto and cfg.mode == "online":
        from rayalign.cluster.online_plan import resolve_online_counts

        return resolve_online_counts(cfg, spec)
    engines, rewards, training = e, r, t
    on_gpu = bool(spec.gpus_per_node)
    if e.count == "auto":
        gpus = e.gpus_per_engine if on_gpu else 0
        engines = dataclasses.replace(e, count=most_actors(e.num_cpus, gpus, spec))
    if r.actors == "auto":
        rewards = dataclasses.replace(r, actors=most_actors(r.num_cpus, r.num_gpus if on_gpu else 0, spec))
    from rayalign.cluster.schedule import balanced_counts, most_beside, streams

    if cfg.cluster.schedule == "stream" and "auto" in (e.count, r.actors) and streams(cfg):
        if e.count == r.actors:
            split = balanced_counts(cfg, spec, engines.count, rewards.actors)
        else:  # the auto role fills what the other leaves, both at once
            beside = most_beside(cfg, spec, e.count, r.actors, engines.count if e.count == "auto" else rewards.actors)
            split = beside and (beside if e.count == "auto" else e.count, beside if r.actors == "auto" else r.actors)
        if split:  # both roles at once: the cluster split so that they finish together
            engines, rewards = dataclasses.replace(e, count=split[0]), dataclasses.replace(r, actors=split[1])
    if t.world_size == "auto":
        most = most_actors(t.num_cpus, t.num_gpus if on_gpu else 0, spec)
        if t.global_batch_size:
            per_rank = t.global_batch_size // t.micro_batch_size
            world = max(w for w in range(1, min(most, per_rank) + 1) if per_rank % w == 0)
            training = dataclasses.replace(t, world_size=world, gradient_accumulation=per_rank // world)
        else:
            training = dataclasses.replace(t, world_size=most)
    resolved = dataclasses.replace(cfg, engines=engines, rewards=rewards, training=training)
    resolved.validate()
    return resolved


COUNT_KEYS = {"generate": "engines.count", "score": "rewards.actors", "train": "training.world_size"}


def with_counts(cfg, spec: ClusterSpec, address: str | None = None):
    """`cfg` with its auto counts filled for the running cluster (connecting to it first); as it is without any."""
    if "auto" not in (cfg.engines.count, cfg.rewards.actors, cfg.training.world_size):
        return cfg
    from rayalign.cluster.spec import connect, running_cluster_spec

    connect(spec, address)
    return resolve_counts(cfg, running_cluster_spec(spec))


def _utilisation(phases: list[PhasePlan], spec: ClusterSpec, asked) -> str | None:
    """'<phase> uses X of Y GPUs' (or CPUs) for phases that run at once (generate + score when streamed), with advice
    when they leave most of the cluster idle."""
    gpu = phases[0].device == "gpu"
    used = sum(p.actors * (p.gpus_per_actor if gpu else p.cpus_per_actor) for p in phases)
    present, unit = (spec.total_gpus, "GPUs") if gpu else (spec.cpus_per_node * spec.nodes, "CPUs")
    if not present:
        return None
    line = f"{' + '.join(p.phase for p in phases)}: {used:g} of {present:g} {unit} ({used / present:.0%})"
    if gpu and used < present / 2:
        fixed = [key for key in (COUNT_KEYS[p.phase] for p in phases)
                 if getattr(getattr(asked, key.split(".")[0]), key.split(".")[1]) != "auto"]
        if fixed:
            line += f"; most of the cluster idles in this phase: set {' and '.join(f'{k}: auto' for k in fixed)} " \
                    "to fill it"
        elif phases[0].phase == "train":
            t = asked.training
            line += (f"; training.global_batch_size {t.global_batch_size} / micro_batch_size {t.micro_batch_size} "
                     f"caps the ranks at {t.global_batch_size // t.micro_batch_size}")
    return line


def plan(cfg, spec: ClusterSpec, strict: bool = False) -> Plan:
    """Map a recipe's phases onto the cluster and check that each fits; raises PlanError when one does not.

    On a CPU-only spec the recipe's actors are planned as CPU actors and what would not run as written is
    listed in `Plan.problems`; `strict` (launch) raises the first of them instead.
    """
    if cfg.mode == "online":
        from rayalign.cluster.online_plan import plan_online

        return plan_online(cfg, spec, strict)
    refuse = Shortfalls(spec)
    asked, cfg = cfg, resolve_counts(cfg, spec)
    r, method = cfg.rewards, cfg.pairs.method
    models = {"policy": model_info(cfg.policy.path)}
    phases, notes = [], ["phases run one after another; each may use the whole cluster"]
    if spec.gpus_per_node and not spec.gpu_memory_gb:
        notes.append(f"GPU memory unknown (cluster {spec.name} has gpu_memory_gb 0): GPU memory not checked")
    if method == "dco":  # DCO scores parallel candidates with its fixed reference; no generation
        notes.append("generate: none (pairs.method dco learns from parallel candidate sets)")
        reference = r.consistency.reference
        held = {"dco_reference": model_info(reference.path) if reference else models["policy"]}
    else:
        phases.append(plan_generation(cfg, spec, models["policy"], refuse))
        held = scored_models(cfg, models["policy"])
    if method == "dco" or r.latent.enabled or r.implicit.enabled or r.reward_model.enabled or r.user.path:
        models.update(held)
        phases.append(plan_scoring(cfg, spec, held, refuse))
    else:
        notes.append("score: none (no reward needs a forward pass)")
    if getattr(cfg.training, "loss", None):
        phases.append(plan_training(cfg, spec, models["policy"], refuse))
    else:
        notes.append("train: none (training.loss is null)")
    if refuse.found and strict:
        raise PlanError(*refuse.found[0])
    problems = [f"{reason}; {suggestion}" for reason, suggestion in refuse.found]
    from rayalign.cluster.estimate import estimate
    from rayalign.cluster.schedule import choose_schedule

    schedule = choose_schedule(cfg, spec)
    together = [p for p in phases if schedule.stream and p.phase in ("generate", "score")]  # the first phases
    groups = ([together] if together else []) + [[p] for p in phases if p not in together]
    notes += [line for group in groups if (line := _utilisation(group, spec, asked))]
    if schedule.stream:
        notes = [line.replace("phases run one after another; each may use the whole cluster", "generate and score "
                              "run side by side (scoring streams behind generation); train takes the whole cluster")
                 for line in notes]
    notes.append(schedule.text())
    result = Plan(cfg.name, cfg.config_hash(), spec, models, phases, notes, problems, config=cfg)
    result.estimate = {**estimate(result), "stream": schedule.stream}
    return result
