"""The placement planner: a recipe's phases on a cluster spec, with the actors, their placement and the memory
each GPU needs, checked before anything starts.

Offline phases (generate -> score -> train) run one after another, so each may use the whole cluster.
Memory is in GB (1e9 bytes). Activation and KV figures are estimates for planning, not measurements.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from rayalign.cluster.model_info import DTYPE_BYTES, ModelInfo, PlanError, model_info  # noqa: F401  (PlanError re-exported)
from rayalign.cluster.spec import GB, ClusterSpec
from rayalign.methods import SEQUENCES, schema_of

PROMPT_TOKENS = 256  # assumed prompt length (tokens) for KV cache and activation estimates
# training memory per parameter (mixed precision on GPU: bf16 weights and grads, fp32 Adam m, v and master
# weights; fp32 throughout on CPU), as (weights, grads, optimizer) bytes
ZERO_BYTES = {"gpu": (2, 2, 12), "cpu": (4, 4, 8)}


# ---- model sizes ----

# ---- the plan ----

def _count(n: int) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def _gb(value: float) -> str:
    return f"{value:.1f}" if value >= 0.1 else f"{value:.2g}"


@dataclass
class PhasePlan:
    """One phase's actors: how many, what each holds and reserves, where they go, and their memory."""

    phase: str  # generate, score, train
    role: str  # what one actor is, e.g. "vllm engine", "scorer", "trainer rank"
    actors: int
    device: str  # gpu or cpu
    cpus_per_actor: float
    gpus_per_actor: float
    placement: str
    nodes_used: int
    models: list[str]
    memory_gb: dict[str, float]  # per GPU (device gpu) or per actor in host memory (device cpu); with "total"
    capacity_gb: float  # what one GPU (or one actor's share of its node) holds; 0 = unknown, not checked
    details: str = ""

    def memory_text(self) -> str:
        lines = [f"{'+ ' if i else ''}{_gb(v)} {k.replace('kv_', 'KV ').replace('_', ' ')}"
                 for i, (k, v) in enumerate(kv for kv in self.memory_gb.items() if kv[0] != "total")]
        of = f" of {self.capacity_gb:g}" if self.capacity_gb else ""
        where = "" if self.device == "gpu" else " (host)"
        return "\n".join([*lines, f"= {_gb(self.memory_gb['total'])}{of}{where}"])


@dataclass
class Plan:
    recipe: str
    config_hash: str
    cluster: ClusterSpec
    models: dict[str, ModelInfo]  # by role: policy, reward_reference, reward_model, dco_reference
    phases: list[PhasePlan]
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # why a CPU-only preview would not run as written
    config: object = None  # the recipe with its auto counts resolved for this cluster
    estimate: dict = field(default_factory=dict)  # time per phase and iteration (rayalign.cluster.estimate)

    def phase(self, name: str) -> PhasePlan | None:
        return next((p for p in self.phases if p.phase == name), None)

    def table(self):
        """A rich table of the phases; the models, problems and notes are its caption."""
        from rich.markup import escape
        from rich.table import Table

        models = [f"{role}: {m.name} ({_count(m.parameters)} parameters, {m.num_layers} layers)"
                  for role, m in self.models.items()]
        caption = [*map(escape, models), *(f"[red]problem:[/] {escape(p)}" for p in self.problems),
                   *map(escape, self.notes)]
        table = Table("phase", "actors", "each", "placement", "GB per GPU\nor CPU actor", show_lines=True,
                      title=escape(f"{self.recipe} on {self.cluster.summary()}"), caption="\n".join(caption),
                      caption_justify="left")
        for p in self.phases:
            each = f"{p.cpus_per_actor:g} CPU"
            if p.device == "gpu":
                each = f"{p.gpus_per_actor:g} GPU\n{each}"
            table.add_row(p.phase, f"{p.actors} x {p.role}", each, p.placement,
                          escape(p.memory_text()) + (f"\n[dim]{escape(p.details)}[/]" if p.details else ""))
        return table

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "config_hash": self.config_hash, "cluster": dataclasses.asdict(self.cluster),
                "models": {role: dataclasses.asdict(m) for role, m in self.models.items()},
                "phases": [dataclasses.asdict(p) for p in self.phases], "notes": self.notes, "problems": self.problems,
                "estimate": self.estimate}


def save_plan(plan: Plan, run_dir: str | Path) -> Path | None:
    """Write plan.json into the run directory; not into one that holds a run with another config (the pipeline
    refuses that directory)."""
    run_dir = Path(run_dir)
    from rayalign.run_dir import read_state

    state = read_state(run_dir)  # a damaged one is refused here, before the run starts
    if state is not None and state["config_hash"] != plan.config_hash:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "plan.json"
    path.write_text(json.dumps(plan.to_dict(), indent=2))
    return path


class _Shortfalls:
    """Refuse what the cluster cannot hold; a CPU-only spec previews a (GPU) recipe, so there it is noted."""

    def __init__(self, spec: ClusterSpec):
        self.preview, self.found = spec.gpus_per_node == 0, []

    def __call__(self, reason: str, suggestion: str) -> None:
        if not self.preview:
            raise PlanError(reason, suggestion)
        self.found.append((reason, suggestion))


def _dtype_bytes(dtype: str, device: str) -> int:
    return DTYPE_BYTES[dtype] if dtype != "auto" else 2 if device == "gpu" else 4


def _place(phase: str, section: str, count_key: str, count: int, cpus: float, gpus: float, spec: ClusterSpec,
           refuse: _Shortfalls, pack: bool = False) -> tuple[int, str]:
    """(nodes used, placement text) for `count` actors of `cpus` and `gpus` each; refuses what does not fit."""
    fits = {"CPUs": (int(spec.cpus_per_node // cpus), cpus, spec.cpus_per_node)}
    if gpus:
        fits["GPUs"] = (int(spec.gpus_per_node // gpus), gpus, spec.gpus_per_node)
    unit = min(fits, key=lambda u: fits[u][0])  # the resource that bounds the actors per node
    per_node, each, node_has = fits[unit]
    if per_node == 0:
        refuse(f"{phase}: one actor needs {each:g} {unit}, more than a node of {spec.name} has ({node_has})",
               f"set {section}.num_{unit.lower()} <= {node_has}")
    elif count > per_node * spec.nodes:
        most = per_node * spec.nodes
        refuse(f"{phase}: {count} actors x {each:g} {unit} do not fit on {spec.name}: at most {per_node} per node x "
               f"{spec.nodes} node(s) = {most}", f"set {section}.{count_key} <= {most}")
    per_node = max(per_node, 1)
    if pack:
        nodes = min(spec.nodes, math.ceil(count / per_node))
        return nodes, f"PACK, {nodes} of {spec.nodes} nodes\n({min(count, per_node)} per node)"
    nodes = min(count, spec.nodes)
    return nodes, f"SPREAD, {nodes} of {spec.nodes} nodes" if count > 1 else f"1 of {spec.nodes} nodes"


def _gpu_usage(count: int, gpus: float, spec: ClusterSpec) -> str:
    return f"\n{count * gpus:g} of {spec.total_gpus} GPUs" if gpus else ""


def _check_host_memory(phase: str, section: str, per_actor_gb: float, count: int, cpus: float, spec: ClusterSpec,
                       refuse: _Shortfalls, batch_key: str) -> float:
    """The host memory one CPU actor may use (its node's memory over the actors sharing the node)."""
    sharing = max(1, min(count, int(spec.cpus_per_node // cpus) or 1))
    share = spec.memory_gb_per_node / sharing
    if per_actor_gb > share:
        refuse(f"{phase}: {sharing} actor(s) x {per_actor_gb:.1f} GB on one node > its {spec.memory_gb_per_node:g} GB "
               "of memory", f"lower {batch_key}, raise {section}.num_cpus (fewer actors per node), or use "
               "a smaller dtype")
    return share


def _on_gpu(phase: str, section: str, num_gpus: float, spec: ClusterSpec, refuse: _Shortfalls, fix: str) -> bool:
    if num_gpus and not spec.gpus_per_node:
        refuse(f"{phase}: {section}.num_gpus is {num_gpus:g} but cluster {spec.name} has no GPUs (planned here as CPU "
               "actors)", f"run on CPUs with -o {section}.num_gpus=0{fix}, or choose a GPU cluster")
    return bool(num_gpus and spec.gpus_per_node)


def _min_tensor_parallel(policy: ModelInfo, dtype_bytes: int, usable_gb: float, sequence_tokens: int) -> int:
    """The smallest power-of-two tensor-parallel size whose weights leave a KV cache for one sequence."""
    tp = 1
    while tp < 1024 and policy.weights_gb(dtype_bytes) / tp + \
            policy.kv_bytes_per_token(dtype_bytes, tp) * sequence_tokens / GB > usable_gb:
        tp *= 2
    return tp


def _generation(cfg, spec: ClusterSpec, policy: ModelInfo, refuse: _Shortfalls) -> PhasePlan:
    e = cfg.engines
    tp = getattr(e, "tensor_parallel_size", 1) if e.backend == "vllm" else 1
    sequence_tokens = PROMPT_TOKENS + cfg.sampling.max_new_tokens
    fix = " -o engines.backend=hf" if e.backend == "vllm" else ""
    device = "gpu" if _on_gpu("generate", "engines", e.num_gpus, spec, refuse, fix) else "cpu"
    dtype_bytes = _dtype_bytes(cfg.policy.dtype, device)
    role = f"{e.backend} engine"
    if device == "cpu":
        nodes, placement = _place("generate", "engines", "count", e.count, e.num_cpus, 0, spec, refuse)
        weights = policy.weights_gb(dtype_bytes)
        kv = e.batch_size * sequence_tokens * policy.kv_bytes_per_token(dtype_bytes) / GB
        share = _check_host_memory("generate", "engines", weights + kv, e.count, e.num_cpus, spec, refuse,
                                   "engines.batch_size")
        return PhasePlan("generate", role, e.count, "cpu", e.num_cpus, 0, placement, nodes, [policy.name],
                         {"weights": weights, "kv_cache": kv, "total": weights + kv}, share,
                         f"KV for {e.batch_size} x {sequence_tokens} tokens")

    if tp > spec.gpus_per_node:
        refuse(f"generate: engines.tensor_parallel_size {tp} > {spec.gpus_per_node} GPUs per node of {spec.name} (an "
               "engine's GPUs sit in one STRICT_PACK placement group, on one node)",
               f"set engines.tensor_parallel_size <= {spec.gpus_per_node}")
    gpus = tp if tp > 1 else e.num_gpus  # the pool reserves one GPU bundle per tensor-parallel rank
    nodes, placement = _place("generate", "engines", "count", e.count, e.num_cpus, gpus, spec, refuse)
    if tp > 1:
        placement = f"STRICT_PACK bundle of {tp} GPUs per engine (one node)\nengines {placement}"
    placement += _gpu_usage(e.count, gpus, spec)
    share = min(gpus, 1) * spec.gpu_memory_gb  # a fractional num_gpus shares one GPU's memory
    weights = policy.weights_gb(dtype_bytes) / tp
    per_token = policy.kv_bytes_per_token(dtype_bytes, tp)
    if e.backend == "vllm":
        util = e.gpu_memory_utilization
        usable = util * share
        kv = max(0.0, usable - weights)
        if share and kv * GB < per_token * sequence_tokens:
            min_tp = _min_tensor_parallel(policy, dtype_bytes, usable, sequence_tokens)
            over = ">" if weights > usable else "leave no KV cache for one sequence in"
            suggestion = (f"set engines.tensor_parallel_size >= {min_tp} (and engines.num_gpus to match)"
                          if min_tp <= spec.gpus_per_node else
                          f"even {spec.gpus_per_node}-way tensor parallelism on one node is not enough: use GPUs with "
                          "more memory or a smaller model")
            refuse(f"generate: {weights:.0f} GB of weights per GPU ({policy.name}, {policy.parameters / 1e9:.2f}B "
                   f"parameters x {dtype_bytes} B / tensor_parallel_size {tp}) {over} the {usable:.0f} GB an engine "
                   f"may use per GPU ({util:g} x {share:g} GB {spec.gpu_type})", suggestion)
        tokens = int(kv * GB // per_token)
        details = (f"{tokens:,} KV tokens = {tokens // sequence_tokens:,} x {sequence_tokens} (vLLM at {util:g})"
                   if share else "GPU memory unknown: not checked")
    else:
        kv = e.batch_size * sequence_tokens * per_token / GB
        if share and weights + kv > share:
            refuse(f"generate: {weights:.1f} GB of weights + {kv:.1f} GB KV cache (engines.batch_size {e.batch_size} x "
                   f"{sequence_tokens} tokens) > {share:g} GB per GPU", "lower engines.batch_size or use "
                   "engines.backend=vllm with tensor parallelism")
        details = f"KV for {e.batch_size} x {sequence_tokens} tokens"
    return PhasePlan("generate", role, e.count, "gpu", e.num_cpus, gpus, placement, nodes, [policy.name],
                     {"weights": weights, "kv_cache": kv, "total": weights + kv}, share, details)


def _scoring(cfg, spec: ClusterSpec, held: dict[str, ModelInfo], refuse: _Shortfalls) -> PhasePlan:
    r = cfg.rewards
    device = "gpu" if _on_gpu("score", "rewards", r.num_gpus, spec, refuse, "") else "cpu"
    dtypes = {"policy": cfg.policy.dtype, "dco_reference": (r.consistency.reference or cfg.policy).dtype,
              "reward_reference": r.implicit.reward_reference.dtype if r.implicit.reward_reference else "auto",
              "reward_model": r.reward_model.model.dtype if r.reward_model.model else "auto"}
    weights = sum(m.weights_gb(_dtype_bytes(dtypes[role], device)) for role, m in held.items())
    largest = max(held.values(), key=lambda m: m.parameters)
    dtype_bytes = _dtype_bytes(cfg.policy.dtype, device)
    # teacher-forced forward of rewards.batch_size sequences: response logits, their float32 log-softmax chunks
    # (2^26 values at a time), and every hidden state when latent rewards pool them
    response_tokens = r.batch_size * (cfg.sampling.max_new_tokens + 1)
    activations = (response_tokens * largest.vocab_size * dtype_bytes + 2**26 * 4) / GB
    if r.latent.enabled:
        activations += (r.batch_size * (PROMPT_TOKENS + cfg.sampling.max_new_tokens) * largest.hidden_size *
                        dtype_bytes * (largest.num_layers + 1)) / GB
    role = "scorer"
    models = [m.name for m in held.values()]
    if device == "cpu":
        nodes, placement = _place("score", "rewards", "actors", r.actors, r.num_cpus, 0, spec, refuse)
        share = _check_host_memory("score", "rewards", weights + activations, r.actors, r.num_cpus, spec, refuse,
                                   "rewards.batch_size")
        return PhasePlan("score", role, r.actors, "cpu", r.num_cpus, 0, placement, nodes, models,
                         {"weights": weights, "activations": activations, "total": weights + activations}, share)
    nodes, placement = _place("score", "rewards", "actors", r.actors, r.num_cpus, r.num_gpus, spec, refuse)
    placement += _gpu_usage(r.actors, r.num_gpus, spec)
    per_gpu = {"weights": weights / max(1, r.num_gpus), "activations": activations / max(1, r.num_gpus)}
    total = sum(per_gpu.values())
    share = min(r.num_gpus, 1) * spec.gpu_memory_gb
    if share and total > share:
        refuse(f"score: {len(held)} model(s), {weights:.0f} GB of weights + {activations:.0f} GB of activations "
               f"= {total:.0f} GB per GPU > {share:g} GB", "lower rewards.batch_size, or give each scorer more GPUs "
               "(rewards.num_gpus)")
    return PhasePlan("score", role, r.actors, "gpu", r.num_cpus, r.num_gpus, placement, nodes, models,
                     {**per_gpu, "total": total}, share)


def zero_memory_gb(parameters: int, world_size: int, zero_stage: int, device: str = "gpu") -> dict[str, float]:
    """Weights, gradients and optimizer state per rank under ZeRO: stage 1 shards the optimizer state over the
    ranks, stage 2 also the gradients, stage 3 also the weights."""
    weights, grads, optimizer = ZERO_BYTES[device]
    return {"weights": parameters * weights / (world_size if zero_stage >= 3 else 1) / GB,
            "gradients": parameters * grads / (world_size if zero_stage >= 2 else 1) / GB,
            "optimizer": parameters * optimizer / (world_size if zero_stage >= 1 else 1) / GB}


def activation_memory_gb(policy: ModelInfo, tokens: int, bytes_per_value: int, checkpointing: bool) -> float:
    """Training activations for `tokens` tokens in one micro-batch: 34 x tokens x hidden bytes per layer in 16-bit
    (Korthikanti et al. 2022: s*b*h*(34 + 5*a*s/h), the attention-score term gone with flash attention); with
    checkpointing only each layer's input is kept, plus one layer recomputed. Plus the logits and their float32
    log-softmax."""
    per_layer = 17 * tokens * policy.hidden_size * bytes_per_value
    kept = (tokens * policy.hidden_size * bytes_per_value * policy.num_layers + per_layer) if checkpointing else \
        per_layer * policy.num_layers
    return (kept + tokens * policy.vocab_size * (bytes_per_value + 4)) / GB


def _training(cfg, spec: ClusterSpec, policy: ModelInfo, refuse: _Shortfalls) -> PhasePlan:
    t = cfg.training
    device = "gpu" if _on_gpu("train", "training", t.num_gpus, spec, refuse, "") else "cpu"
    memory = zero_memory_gb(policy.parameters, t.world_size, t.zero_stage, device)
    tokens = t.micro_batch_size * len(SEQUENCES[schema_of(t.loss)]) * t.max_length
    memory["activations"] = activation_memory_gb(policy, tokens, 2 if device == "gpu" else 4, t.gradient_checkpointing)
    memory["total"] = sum(memory.values())
    details = (f"ZeRO-{t.zero_stage}, {tokens:,} tokens per micro-batch"
               f"{', checkpointed' if t.gradient_checkpointing else ''}")
    gpus = t.num_gpus if device == "gpu" else 0
    nodes, placement = _place("train", "training", "world_size", t.world_size, t.num_cpus, gpus, spec, refuse,
                              pack=True)
    if device == "cpu":
        share = _check_host_memory("train", "training", memory["total"], t.world_size, t.num_cpus, spec, refuse,
                                   "training.micro_batch_size")
    else:
        placement += _gpu_usage(t.world_size, gpus, spec)
        share = min(gpus, 1) * spec.gpu_memory_gb
        if share and memory["total"] > share:
            states = memory["total"] - memory["activations"]
            refuse(f"train: {memory['total']:.0f} GB per GPU (ZeRO-{t.zero_stage} states {states:.0f} GB over "
                   f"{t.world_size} rank(s) + {memory['activations']:.0f} GB activations) > {share:g} GB",
                   "raise training.zero_stage or training.world_size, set training.gradient_checkpointing=true, or "
                   "lower training.micro_batch_size")
    return PhasePlan("train", "trainer rank", t.world_size, device, t.num_cpus, gpus, placement, nodes,
                     [policy.name], memory, share, details)


def _per_node(cpus: float, gpus: float, spec: ClusterSpec) -> int:
    """Actors of `cpus` CPUs and `gpus` GPUs that one node holds (GPUs bound GPU actors, CPUs the rest)."""
    fits = [int(spec.cpus_per_node // cpus)]
    if gpus and spec.gpus_per_node:
        fits.append(int(round(spec.gpus_per_node / gpus, 6)))
    return max(1, min(fits))


def resolve_counts(cfg, spec: ClusterSpec):
    """The recipe with every `auto` count filled for the cluster: engines.count and rewards.actors as many as fit
    (offline phases run one after another, so each may take the whole cluster; under cluster.schedule stream, with
    both auto, the cluster is split between them so that they finish together), training.world_size as many ranks
    as fit, at most training.global_batch_size / micro_batch_size (a divisor of it, the accumulation derived)."""
    e, r, t = cfg.engines, cfg.rewards, cfg.training
    auto = [k for k, v in (("engines.count", e.count), ("rewards.actors", r.actors), ("training.world_size",
                                                                                       t.world_size)) if v == "auto"]
    if auto and cfg.mode == "online":
        raise PlanError(f"{', '.join(auto)}: auto is for offline runs, whose phases take the cluster in turn; an "
                        "online run places generation, scoring and training side by side", "give them as numbers")
    engines, rewards, training = e, r, t
    on_gpu = bool(spec.gpus_per_node)
    if e.count == "auto":
        gpus = e.gpus_per_engine if on_gpu else 0
        engines = dataclasses.replace(e, count=_per_node(e.num_cpus, gpus, spec) * spec.nodes)
    if r.actors == "auto":
        rewards = dataclasses.replace(r, actors=_per_node(r.num_cpus, r.num_gpus if on_gpu else 0, spec) * spec.nodes)
    from rayalign.cluster.schedule import balanced_counts, streams

    if cfg.cluster.schedule == "stream" and e.count == r.actors == "auto" and streams(cfg):
        split = balanced_counts(cfg, spec, engines.count, rewards.actors)
        if split:  # both roles at once: the cluster split so that they finish together
            engines, rewards = dataclasses.replace(e, count=split[0]), dataclasses.replace(r, actors=split[1])
    if t.world_size == "auto":
        most = _per_node(t.num_cpus, t.num_gpus if on_gpu else 0, spec) * spec.nodes
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


def _utilisation(phase: PhasePlan, spec: ClusterSpec, asked) -> str | None:
    """'<phase> uses X of Y GPUs' (or CPUs), with advice when it leaves most of the cluster idle."""
    if phase.device == "gpu":
        used, present, unit = phase.actors * phase.gpus_per_actor, spec.total_gpus, "GPUs"
    else:
        used, present, unit = phase.actors * phase.cpus_per_actor, spec.cpus_per_node * spec.nodes, "CPUs"
    if not present:
        return None
    line = f"{phase.phase}: {used:g} of {present:g} {unit} ({used / present:.0%})"
    if phase.device == "gpu" and used < present / 2:
        key = COUNT_KEYS[phase.phase]
        section, name = key.split(".")
        if getattr(getattr(asked, section), name) != "auto":
            line += f"; most of the cluster idles in this phase: set {key}: auto to fill it"
        elif phase.phase == "train":
            t = asked.training
            line += (f"; training.global_batch_size {t.global_batch_size} / micro_batch_size {t.micro_batch_size} "
                     f"caps the ranks at {t.global_batch_size // t.micro_batch_size}")
    return line


def plan(cfg, spec: ClusterSpec, strict: bool = False) -> Plan:
    """Map a recipe's phases onto the cluster and check that each fits; raises PlanError when one does not.

    On a CPU-only spec the recipe's actors are planned as CPU actors and what would not run as written is
    listed in `Plan.problems`; `strict` (launch) raises the first of them instead.
    """
    refuse = _Shortfalls(spec)
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
        phases.append(_generation(cfg, spec, models["policy"], refuse))
        held = {"policy": models["policy"]}
        if r.implicit.enabled:
            held["reward_reference"] = model_info(r.implicit.reward_reference.path)
        if r.reward_model.enabled:
            held["reward_model"] = model_info(r.reward_model.model.path)
    if method == "dco" or r.latent.enabled or r.implicit.enabled or r.reward_model.enabled or r.user.path:
        models.update(held)
        phases.append(_scoring(cfg, spec, held, refuse))
    else:
        notes.append("score: none (no reward needs a forward pass)")
    if getattr(cfg.training, "loss", None):
        phases.append(_training(cfg, spec, models["policy"], refuse))
    else:
        notes.append("train: none (training.loss is null)")
    if refuse.found and strict:
        raise PlanError(*refuse.found[0])
    problems = [f"{reason}; {suggestion}" for reason, suggestion in refuse.found]
    notes += [line for p in phases if (line := _utilisation(p, spec, asked))]
    from rayalign.cluster.estimate import estimate
    from rayalign.cluster.schedule import choose_schedule

    schedule = choose_schedule(cfg, spec)
    if schedule.stream:
        notes = [line.replace("phases run one after another; each may use the whole cluster", "generate and score "
                              "run side by side (scoring streams behind generation); train takes the whole cluster")
                 for line in notes]
    notes.append(schedule.text())
    result = Plan(cfg.name, cfg.config_hash(), spec, models, phases, notes, problems, config=cfg)
    result.estimate = estimate(result)
    return result
