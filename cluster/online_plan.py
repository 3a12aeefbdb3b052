"""Online recipes on a cluster. The online loop holds every role at once: the generation engines, the policy's
trainer ranks (each with a frozen reference for the KL), PPO's critic ranks and, with online.score_weight, the
scorers. Each role is planned as its offline phase is (placement, memory per GPU or per CPU actor); together they
must fit the cluster: their GPUs, CPUs and host memory are summed against the cluster's totals, and their actors
placed node by node, largest first (an actor's CPUs and GPUs lie on one node). engines.count: auto gives
generation what the other roles leave on each node; training.world_size and rewards.actors auto take the counts
whose estimated step is fastest.

The estimate is per step: generate (rollouts x max_new_tokens over the engines), reward (the trainer's forward of
policy, reference and critic over every rollout, and the scorers'), train (6 x parameters x tokens per update
epoch, the critic's after the policy's); the weight sync is not estimated. Start-up is counted once.
"""

from __future__ import annotations

import dataclasses
import math

from rayalign.cluster.estimate import PROMPT_TOKENS as UNREAD_PROMPT_TOKENS, _forward, _timed, checkpoint_gb, \
    figures, forward_roles, load_table, prompt_stats, rate
from rayalign.cluster.model_info import PlanError, model_info
from rayalign.cluster.phases import (PROMPT_TOKENS, Plan, Shortfalls, most_actors, plan_generation, plan_scoring,
                                     plan_training, scored_models)
from rayalign.cluster.schedule import first_fit
from rayalign.cluster.spec import ClusterSpec, actors_fitting

def _roles(cfg) -> list[str]:
    o = cfg.online
    return ["generate"] + ["score"] * bool(o.score_weight) + ["train"] + ["critic"] * (o.algorithm == "ppo")


def _demand(cfg, role: str, on_gpu: bool) -> tuple[float, float]:
    """(GPUs, CPUs) one actor of the role reserves; GPUs only on a GPU cluster."""
    e, r, t = cfg.engines, cfg.rewards, cfg.training
    gpus, cpus = {"generate": (e.gpus_per_engine if e.num_gpus else 0, e.num_cpus),
                  "score": (r.num_gpus, r.num_cpus)}.get(role, (t.num_gpus, t.num_cpus))
    return (gpus if on_gpu else 0), cpus


def _count(cfg, role: str) -> int:
    e, r, t = cfg.engines, cfg.rewards, cfg.training
    return {"generate": e.count, "score": r.actors}.get(role, t.world_size)


def _actors(cfg, spec: ClusterSpec, roles: list[str]) -> list[tuple[str, float, float]]:
    """(actor name, CPUs, GPUs) of every actor of `roles`."""
    on_gpu = bool(spec.gpus_per_node)
    names = {"generate": "engine", "score": "scorer", "train": "policy rank", "critic": "critic rank"}
    return [(names[role], *reversed(_demand(cfg, role, on_gpu))) for role in roles for _ in range(_count(cfg, role))]


def resolve_online_counts(cfg, spec: ClusterSpec):
    """The online recipe with its auto counts filled: training.world_size and rewards.actors as the pair whose
    estimated step is fastest (ties to fewer actors), engines.count: auto with what the other roles leave."""
    e, r, t = cfg.engines, cfg.rewards, cfg.training
    if "auto" in (r.actors, t.world_size):
        return _fastest_split(cfg, spec)
    if e.count != "auto":
        return cfg
    on_gpu = bool(spec.gpus_per_node)
    others = _actors(cfg, spec, _roles(cfg)[1:])
    gpus_used, cpus_used = sum(a[2] for a in others), sum(a[1] for a in others)
    gpus, cpus = _demand(cfg, "generate", on_gpu)
    free, _ = first_fit(others, spec)  # engines fill what the other roles leave on each node
    count = sum(actors_fitting(cpus, gpus, c, g) for c, g in free)
    if count < 1 and not on_gpu:  # a CPU preview of a GPU recipe: one engine, and the plan lists what does not fit
        count = 1
    if count < 1:
        used = (f"{gpus_used:g} of {spec.total_gpus} GPUs and " if gpus else "") + \
            f"{cpus_used:g} of {spec.cpus_per_node * spec.nodes} CPUs"
        raise PlanError(f"engines.count: auto leaves no room for an engine: the other online roles use {used}, and no "
                        f"node has {cpus:g} CPUs{f' and {gpus:g} GPU(s)' if gpus else ''} left for one",
                        "lower training.world_size, rewards.actors or their num_cpus, or use a larger cluster")
    resolved = dataclasses.replace(cfg, engines=dataclasses.replace(e, count=count))
    resolved.validate()
    return resolved


def _fastest_split(cfg, spec: ClusterSpec):
    """Try every trainer rank count that splits a step's mini-batches (and training.global_batch_size, when set)
    into whole micro-batches, and scorer counts on a rough geometric
    ladder (one scorer when no scored reward is used); plan each with engines.count as given (auto: the rest) and
    keep the fastest estimated step among those that fit. Without throughput figures: the fewest actors that fit."""
    from rayalign.config import ConfigError

    e, r, t, o = cfg.engines, cfg.rewards, cfg.training, cfg.online
    on_gpu = bool(spec.gpus_per_node)

    def most(role: str) -> int:
        gpus, cpus = _demand(cfg, role, on_gpu)
        return most_actors(cpus, gpus, spec)

    def with_ranks(w: int):
        """The training section on w ranks, the accumulation derived from a global batch; None when w ranks cannot
        split the global batch, or a step's mini-batches (RunConfig.online_training), into whole micro-batches."""
        if t.global_batch_size and t.global_batch_size % (t.micro_batch_size * w):
            return None
        training = dataclasses.replace(t, world_size=w, gradient_accumulation=t.global_batch_size // (
            t.micro_batch_size * w) if t.global_batch_size else t.gradient_accumulation)
        try:
            dataclasses.replace(cfg, training=training).online_training(rollouts)
        except ConfigError:
            return None
        return training

    rollouts = cfg.rollouts_per_step(prompt_stats(cfg)[0])
    if t.world_size == "auto":
        try:  # what no rank count can mend: a mini-batch that does not divide the step, or splits a micro-batch
            dataclasses.replace(cfg, training=dataclasses.replace(t, world_size=1)).online_training(rollouts)
        except ConfigError as e:
            raise PlanError(str(e)) from None
        trainings = [training for w in range(1, most("train") + 1) if (training := with_ranks(w))]
    else:
        trainings = [t]
    if r.actors != "auto":
        scorers = [r.actors]
    elif o.score_weight:
        ladder = sorted({round(1.5 ** k) for k in range(40)})
        scorers = [n for n in ladder if n <= most("score")]
    else:
        scorers = [1]  # no scored reward: no scorer runs
    fallback, reasons = [], {}

    def trial(training, n: int):
        """(estimated step seconds, actors) and the resolved config of `training`'s ranks and n scorers; None when
        it does not fit (the first resolved config is kept for a CPU preview)."""
        candidate = dataclasses.replace(cfg, training=training, rewards=dataclasses.replace(r, actors=n))
        try:
            candidate.validate()
            planned = plan_online(candidate, spec)
        except (PlanError, ConfigError) as e:
            reasons[(training.world_size, n)] = getattr(e, "reason", str(e))
            return None
        fallback.append(planned.config)
        if planned.problems:
            return None
        seconds = planned.estimate["iteration_seconds"]
        return (math.inf if seconds is None else seconds, training.world_size + n), planned.config

    tried = [found for training in trainings for n in scorers if (found := trial(training, n))]
    best = min(tried, key=lambda found: found[0], default=None)
    if best is not None and len(scorers) > 1:  # between the best scorer count's neighbours on the ladder
        training, n = best[1].training, best[1].rewards.actors
        i = scorers.index(n)
        low, high = scorers[max(i - 1, 0)], scorers[min(i + 1, len(scorers) - 1)]
        nearby = [found for m in range(low + 1, high) if m != n and (found := trial(training, m))]
        best = min([best, *nearby], key=lambda found: found[0])
    if best is not None:
        return best[1]
    if fallback and not on_gpu:  # a CPU preview of a GPU recipe: the plan lists what does not fit
        return fallback[0]
    auto = [k for k, v in (("training.world_size", t.world_size), ("rewards.actors", r.actors)) if v == "auto"]
    fixed = [f"{k} {v}" for k, v in (("engines.count", e.count), ("training.world_size", t.world_size),
                                     ("rewards.actors", r.actors)) if v != "auto"]
    ranks = [training.world_size for training in trainings]
    rule = (f"; trainer ranks must divide a mini-batch into micro-batches of {t.micro_batch_size}: "
            f"{', '.join(map(str, ranks)) or 'none'} of 1-{most('train')} do" if t.world_size == "auto" else "")
    # why the ends failed (the fewest and the most ranks that split the batch, with the fewest scorers): at one
    # end memory usually, at the other the room left for the other roles
    ends = sorted({min(ranks, default=0), max(ranks, default=0)})
    why = "".join(f"; with {w} rank(s): {reasons[w, scorers[0]]}" for w in ends if (w, scorers[0]) in reasons)
    raise PlanError(f"{', '.join(auto)}: auto: no count fits {spec.name} beside the other online roles"
                    f"{' (' + ', '.join(fixed) + ')' if fixed else ''}{rule}{why}",
                    "give every count as a number to see what does not fit, lower the fixed ones, or use a larger "
                    "cluster")


def _fewer_actors(asked, resolved, last: str) -> str:
    """Lower the counts the recipe fixed above 1 (an engine count also by setting it to auto); then `last`."""
    counts = [("engines.count", asked.engines.count, resolved.engines.count),
              ("training.world_size", asked.training.world_size, resolved.training.world_size)]
    if resolved.online.score_weight:
        counts.append(("rewards.actors", asked.rewards.actors, resolved.rewards.actors))
    steps = [f"lower {key} (now {now}{', or set it to auto' if key == 'engines.count' else ''})"
             for key, given, now in counts if given != "auto" and now > 1]
    return "; ".join(steps) + f"; or {last}" if steps else last


def plan_online(cfg, spec: ClusterSpec, strict: bool = False) -> Plan:
    """Plan an online recipe's roles side by side; raises PlanError when they do not fit together (`strict`, or
    on a GPU cluster), else lists the problems of a CPU-only preview."""
    from rayalign.config import ConfigError

    refuse = Shortfalls(spec)
    asked, cfg = cfg, resolve_online_counts(cfg, spec)
    try:  # the step's rollouts split into mini-batches of whole micro-batches on every rank
        cfg.online_training(cfg.rollouts_per_step(prompt_stats(cfg)[0]))
    except ConfigError as e:
        raise PlanError(str(e)) from None
    policy = model_info(cfg.policy.path)
    models = {"policy": policy}
    sequence = PROMPT_TOKENS + cfg.sampling.max_new_tokens
    phases = [plan_generation(cfg, spec, policy, refuse)]
    if cfg.online.score_weight:
        held = scored_models(cfg, policy)
        models.update(held)
        phases.append(plan_scoring(cfg, spec, held, refuse))
    phases.append(plan_training(cfg, spec, policy, refuse, role="policy rank", reference=True,
                                sequence_tokens=sequence))
    if cfg.online.algorithm == "ppo":
        phases.append(plan_training(cfg, spec, policy, refuse, phase="critic", role="critic rank",
                                sequence_tokens=sequence))
    together = " + ".join(f"{p.phase} {p.actors}" for p in phases)
    gpus = sum(p.actors * p.gpus_per_actor for p in phases)
    cpus = sum(p.actors * p.cpus_per_actor for p in phases)
    all_cpus = spec.cpus_per_node * spec.nodes
    if gpus > spec.total_gpus:
        refuse(f"online: the roles ({together} actors) run side by side and need {gpus:g} GPUs; the cluster has "
               f"{spec.total_gpus} ({spec.name})", _fewer_actors(asked, cfg, "use a larger cluster"))
    if cpus > all_cpus:
        refuse(f"online: the roles ({together} actors) run side by side and need {cpus:g} CPUs; the cluster has "
               f"{all_cpus:g} ({spec.name})", _fewer_actors(asked, cfg, "lower the num_cpus of engines, rewards "
                                                           "or training"))
    if gpus <= spec.total_gpus and cpus <= all_cpus:
        _, homeless = first_fit(_actors(cfg, spec, _roles(cfg)), spec)
        if homeless is not None:
            refuse(f"online: the roles ({together} actors) need {gpus:g} GPUs and {cpus:g} CPUs, within the "
                   f"cluster's totals, but not node by node: one {homeless} finds no node with room "
                   f"({spec.nodes} x {spec.cpus_per_node} CPUs, {spec.gpus_per_node} GPUs)",
                   _fewer_actors(asked, cfg, "lower the num_cpus of engines, rewards or training"))
    host = sum(p.actors * p.memory_gb["total"] for p in phases if p.device == "cpu")
    if host > spec.memory_gb_per_node * spec.nodes:
        refuse(f"online: the CPU actors side by side need about {host:.1f} GB of host memory; {spec.name} has "
               f"{spec.memory_gb_per_node * spec.nodes:g} GB", "lower engines.count, training.world_size, "
               "training.micro_batch_size or engines.batch_size")
    if refuse.found and strict:
        raise PlanError(*refuse.found[0])
    notes = [f"online: {', '.join(p.phase for p in phases)} run side by side for every step"]
    if spec.total_gpus:
        line = f"all roles: {gpus:g} of {spec.total_gpus} GPUs ({gpus / spec.total_gpus:.0%})"
        if gpus < spec.total_gpus / 2 and asked.engines.count != "auto":
            line += "; most of the cluster idles: set engines.count: auto to give the rest to generation"
        notes.append(line)
    else:
        notes.append(f"all roles: {cpus:g} of {all_cpus:g} CPUs ({cpus / all_cpus:.0%})")
    result = Plan(cfg.name, cfg.config_hash(), spec, models, phases, notes,
                  [f"{reason}; {suggestion}" for reason, suggestion in refuse.found], config=cfg)
    result.estimate = online_estimate(result)
    return result


def online_estimate(run_plan: Plan) -> dict:
    """Seconds per online step by phase (generate, reward, train) and for the whole run, start-up once; the
    shape of rayalign.cluster.estimate.estimate, with `unit` "step"."""
    cfg, spec = run_plan.config, run_plan.cluster
    o, s = cfg.online, cfg.sampling
    table = load_table()
    prompt_rows, prompt_tokens = prompt_stats(cfg)
    rollouts = cfg.rollouts_per_step(prompt_rows)
    tokens = rollouts * (prompt_tokens + s.max_new_tokens)
    params = {role: m.parameters for role, m in run_plan.models.items()}
    by_phase = {p.phase: p for p in run_plan.phases}
    figs = {name: figures(cfg, p.device, spec.gpu_type, params["policy"], table) for name, p in by_phase.items()}

    def units(name: str) -> tuple[int, float]:
        p = by_phase[name]
        return p.actors, p.gpus_per_actor if p.device == "gpu" else p.cpus_per_actor

    phases = {}
    engines, f = by_phase["generate"].actors, figs["generate"]
    speed = engines * f.tokens_per_s_per_engine
    generated = rollouts * s.max_new_tokens
    phases["generate"] = _timed(generated / speed if speed else None, 0.0,
                                f"{generated:,.0f} tokens / ({engines} x {rate(f.tokens_per_s_per_engine)} tokens/s)")
    ppo = "critic" in by_phase
    forwards = 2 + ppo  # policy and reference on the trainer ranks, the critic's values
    flops = 2 * params["policy"] * tokens * forwards
    busy, over = _forward(flops, *units("train"), figs["train"], "score")
    work = f"{flops:.3g} FLOPs ({forwards} forwards x 2 x parameters x {tokens:,.0f} tokens) {over}"
    if "score" in by_phase:
        scored = 2 * sum(params[role] for role in forward_roles(cfg)) * tokens
        more, over = _forward(scored, *units("score"), figs["score"], "score")
        busy = None if busy is None or more is None else busy + more
        work += f"; scorers {scored:.3g} FLOPs {over}"
    phases["reward"] = _timed(busy, 0.0, work)
    flops = 6 * params["policy"] * tokens * o.ppo_epochs
    busy, over = _forward(flops, *units("train"), figs["train"], "train")
    work = f"{flops:.3g} FLOPs (6 x parameters x {tokens:,.0f} tokens x {o.ppo_epochs} epoch(s)) {over}"
    if ppo:
        more, _ = _forward(flops, *units("critic"), figs["critic"], "train")
        busy = None if busy is None or more is None else busy + more
        work += ", then as much for the critic"
    phases["train"] = _timed(busy, 0.0, work)
    unknown = [phase for phase, v in phases.items() if v["seconds"] is None]
    per_step = None if unknown else sum(v["seconds"] for v in phases.values())
    load = {name: checkpoint_gb(run_plan, p) for name, p in by_phase.items()}
    startup = max(figs[name].startup("generate" if name == "generate" else "score" if name == "score" else "train",
                                     load[name]) for name in by_phase)
    sources = []
    for f in figs.values():
        sources += [line for line in f.sources if line not in sources]
    if prompt_rows is None:
        sources.insert(0, f"prompt tokens unknown (an hf: source): {UNREAD_PROMPT_TOKENS} assumed")
    return {"unit": "step", "phases": phases, "iteration_seconds": per_step, "unknown": unknown,
            "startup_seconds": startup,
            "total_seconds": None if per_step is None else startup + per_step * o.steps, "prompt_rows": None,
            "prompt_tokens": round(prompt_tokens, 1), "figures": sources,
            "note": f"{rollouts:,} rollouts per step of about {prompt_tokens:.3g} prompt + {s.max_new_tokens} new "
                    f"tokens (every response assumed to run to max_new_tokens); weight sync not estimated; "
                    f"start-up {startup:.3g} s once (the roles start side by side)"}
