"""The phases a plan is made of: one role's actors on a cluster spec (how many, where they go, the memory each GPU
or CPU actor needs), checked against the spec. rayalign.cluster.planner (offline, one phase after another) and
rayalign.cluster.online_plan (every role at once) build their plans from these.

Memory is in GB (1e9 bytes). Activation and KV figures are estimates for planning, not measurements.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, field

from rayalign.cluster.model_info import DTYPE_BYTES, ModelInfo, PlanError, model_info
from rayalign.cluster.spec import GB, ClusterSpec, actors_fitting, gpu_actors_fitting
from rayalign.methods import SEQUENCES, schema_of

PROMPT_TOKENS = 256  # assumed prompt length (tokens) for KV cache and activation estimates
# training memory per parameter (mixed precision on GPU: bf16 weights and grads, fp32 Adam m, v and master
# weights; fp32 throughout on CPU), as (weights, grads, optimizer) bytes
ZERO_BYTES = {"gpu": (2, 2, 12), "cpu": (4, 4, 8)}


def parameter_count(n: int) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def gb_text(value: float) -> str:
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
        lines = [f"{'+ ' if i else ''}{gb_text(v)} {k.replace('kv_', 'KV ').replace('_', ' ')}"
                 for i, (k, v) in enumerate(kv for kv in self.memory_gb.items() if kv[0] != "total")]
        of = f" of {self.capacity_gb:g}" if self.capacity_gb else ""
        where = "" if self.device == "gpu" else " (host)"
        return "\n".join([*lines, f"= {gb_text(self.memory_gb['total'])}{of}{where}"])


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

        models = [f"{role}: {m.name} ({parameter_count(m.parameters)} parameters, {m.num_layers} layers)"
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

    def estimate_table(self):
        from rayalign.cluster.estimate import estimate_table

        online = getattr(self.config, "mode", "offline") == "online"
        return estimate_table(self.estimate, self.config.online.steps if online else self.config.iterations)

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "config_hash": self.config_hash, "cluster": dataclasses.asdict(self.cluster),
                "models": {role: dataclasses.asdict(m) for role, m in self.models.items()},
                "phases": [dataclasses.asdict(p) for p in self.phases], "notes": self.notes, "problems": self.problems,
                "estimate": self.estimate}



class Shortfalls:
    """Refuse what the cluster cannot hold; a CPU-only spec previews a (GPU) recipe, so there it is noted."""

    def __init__(self, spec: ClusterSpec):
        self.preview, self.found = spec.gpus_per_node == 0, []

    def __call__(self, reason: str, suggestion: str) -> None:
        if not self.preview:
            raise PlanError(reason, suggestion)
        self.found.append((reason, suggestion))


def dtype_size(dtype: str, device: str) -> int:
    return DTYPE_BYTES[dtype] if dtype != "auto" else 2 if device == "gpu" else 4


def place(phase: str, section: str, count_key: str, count: int, cpus: float, gpus: float, spec: ClusterSpec,
           refuse: Shortfalls, pack: bool = False) -> tuple[int, str]:
    """(nodes used, placement text) for `count` actors of `cpus` and `gpus` each; refuses what does not fit."""
    fits = {"CPUs": (actors_fitting(cpus, 0, spec.cpus_per_node, []), cpus, spec.cpus_per_node)}
    if gpus:
        fits["GPUs"] = (gpu_actors_fitting(gpus, [1.0] * spec.gpus_per_node), gpus, spec.gpus_per_node)
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


def most_actors(cpus: float, gpus: float, spec: ClusterSpec) -> int:
    """Actors of `cpus` CPUs and `gpus` GPUs that the cluster holds, node by node (GPUs bound GPU actors, CPUs the
    rest); at least one per node."""
    fits = actors_fitting(cpus, gpus if spec.gpus_per_node else 0, spec.cpus_per_node, [1.0] * spec.gpus_per_node)
    return max(1, fits) * spec.nodes


def gpu_usage(count: int, gpus: float, spec: ClusterSpec) -> str:
    return f"\n{count * gpus:g} of {spec.total_gpus} GPUs" if gpus else ""


def check_host_memory(phase: str, section: str, per_actor_gb: float, count: int, cpus: float, spec: ClusterSpec,
                       refuse: Shortfalls, batch_key: str) -> float:
    """The host memory one CPU actor may use (its node's memory over the actors sharing the node)."""
    sharing = max(1, min(count, actors_fitting(cpus, 0, spec.cpus_per_node, []) or 1))
    share = spec.memory_gb_per_node / sharing
    if per_actor_gb > share:
        refuse(f"{phase}: {sharing} actor(s) x {per_actor_gb:.1f} GB on one node > its {spec.memory_gb_per_node:g} GB "
               "of memory", f"lower {batch_key}, raise {section}.num_cpus (fewer actors per node), or use "
               "a smaller dtype")
    return share


def on_gpu(phase: str, section: str, num_gpus: float, spec: ClusterSpec, refuse: Shortfalls, fix: str) -> bool:
    if num_gpus and not spec.gpus_per_node:
        refuse(f"{phase}: {section}.num_gpus is {num_gpus:g} but cluster {spec.name} has no GPUs (planned here as CPU "
               "actors)", f"run on CPUs with -o {section}.num_gpus=0{fix}, or choose a GPU cluster")
    return bool(num_gpus and spec.gpus_per_node)


def min_tensor_parallel(policy: ModelInfo, dtype_bytes: int, usable_gb: float, sequence_tokens: int) -> int:
    """The smallest power-of-two tensor-parallel size whose weights leave a KV cache for one sequence."""
    tp = 1
    while tp < 1024 and (policy.weights_gb(dtype_bytes) / tp + policy.kv_bytes_per_token(dtype_bytes, tp) *
                         sequence_tokens / GB > usable_gb or tp not in policy.tensor_parallel_sizes(tp)):
        tp *= 2
    return tp


def plan_generation(cfg, spec: ClusterSpec, policy: ModelInfo, refuse: Shortfalls) -> PhasePlan:
    e = cfg.engines
    tp = getattr(e, "tensor_parallel_size", 1) if e.backend == "vllm" else 1
    sequence_tokens = PROMPT_TOKENS + cfg.sampling.max_new_tokens
    fix = (f"{' -o engines.tensor_parallel_size=1' if tp > 1 else ''} (vLLM's CPU build: docs/vllm.md; or -o "
           "engines.backend=hf)") if e.backend == "vllm" else ""
    device = "gpu" if on_gpu("generate", "engines", e.num_gpus, spec, refuse, fix) else "cpu"
    dtype_bytes = dtype_size(cfg.policy.dtype, device)
    role = f"{e.backend} engine"
    if device == "cpu":
        nodes, placement = place("generate", "engines", "count", e.count, e.num_cpus, 0, spec, refuse)
        weights = policy.weights_gb(dtype_bytes)
        kv = e.batch_size * sequence_tokens * policy.kv_bytes_per_token(dtype_bytes) / GB
        share = check_host_memory("generate", "engines", weights + kv, e.count, e.num_cpus, spec, refuse,
                                   "engines.batch_size")
        return PhasePlan("generate", role, e.count, "cpu", e.num_cpus, 0, placement, nodes, [policy.name],
                         {"weights": weights, "kv_cache": kv, "total": weights + kv}, share,
                         f"KV for {e.batch_size} x {sequence_tokens} tokens")

    if tp > spec.gpus_per_node:
        refuse(f"generate: engines.tensor_parallel_size {tp} > {spec.gpus_per_node} GPUs per node of {spec.name} (an "
               "engine's GPUs sit in one STRICT_PACK placement group, on one node)",
               f"set engines.tensor_parallel_size <= {spec.gpus_per_node}")
    valid = policy.tensor_parallel_sizes(max(tp, spec.gpus_per_node))
    if tp not in valid:
        refuse(f"generate: engines.tensor_parallel_size {tp} does not divide {policy.name}'s {policy.num_heads} "
               f"attention heads ({policy.num_kv_heads} KV heads), which vLLM requires",
               f"set engines.tensor_parallel_size to one of {', '.join(map(str, valid))} (and engines.num_gpus to "
               "match)")
    gpus = tp if tp > 1 else e.num_gpus  # the pool reserves one GPU bundle per tensor-parallel rank
    nodes, placement = place("generate", "engines", "count", e.count, e.num_cpus, gpus, spec, refuse)
    if tp > 1:
        placement = f"STRICT_PACK bundle of {tp} GPUs per engine (one node)\nengines {placement}"
    placement += gpu_usage(e.count, gpus, spec)
    share = min(gpus, 1) * spec.gpu_memory_gb  # a fractional num_gpus shares one GPU's memory
    weights = policy.weights_gb(dtype_bytes) / tp
    per_token = policy.kv_bytes_per_token(dtype_bytes, tp)
    if e.backend == "vllm":
        util = e.gpu_memory_utilization
        usable = util * share
        kv = max(0.0, usable - weights)
        if share and kv * GB < per_token * sequence_tokens:
            min_tp = min_tensor_parallel(policy, dtype_bytes, usable, sequence_tokens)
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


def plan_scoring(cfg, spec: ClusterSpec, held: dict[str, ModelInfo], refuse: Shortfalls) -> PhasePlan:
    r = cfg.rewards
    device = "gpu" if on_gpu("score", "rewards", r.num_gpus, spec, refuse, "") else "cpu"
    dtypes = {"policy": cfg.policy.dtype, "dco_reference": (r.consistency.reference or cfg.policy).dtype,
              "reward_reference": r.implicit.reward_reference.dtype if r.implicit.reward_reference else "auto",
              "reward_model": r.reward_model.model.dtype if r.reward_model.model else "auto"}
    weights = sum(m.weights_gb(dtype_size(dtypes[role], device)) for role, m in held.items())
    largest = max(held.values(), key=lambda m: m.parameters)
    dtype_bytes = dtype_size(cfg.policy.dtype, device)
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
        nodes, placement = place("score", "rewards", "actors", r.actors, r.num_cpus, 0, spec, refuse)
        share = check_host_memory("score", "rewards", weights + activations, r.actors, r.num_cpus, spec, refuse,
                                   "rewards.batch_size")
        return PhasePlan("score", role, r.actors, "cpu", r.num_cpus, 0, placement, nodes, models,
                         {"weights": weights, "activations": activations, "total": weights + activations}, share)
    nodes, placement = place("score", "rewards", "actors", r.actors, r.num_cpus, r.num_gpus, spec, refuse)
    placement += gpu_usage(r.actors, r.num_gpus, spec)
    per_gpu = {"weights": weights, "activations": activations}  # a scorer holds its models whole on one GPU
    total = sum(per_gpu.values())
    share = min(r.num_gpus, 1) * spec.gpu_memory_gb
    if share and total > share:
        refuse(f"score: {len(held)} model(s), {weights:.0f} GB of weights + {activations:.0f} GB of activations "
               f"= {total:.0f} GB per GPU > {share:g} GB", "lower rewards.batch_size, choose GPUs with more memory, or "
               "score with a smaller model (a scorer holds its models whole on one GPU)")
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


def plan_training(cfg, spec: ClusterSpec, policy: ModelInfo, refuse: Shortfalls, phase: str = "train",
              role: str = "trainer rank", reference: bool = False, sequence_tokens: int | None = None) -> PhasePlan:
    """Trainer ranks under ZeRO; `reference`: each rank also holds a frozen copy of the policy (online KL);
    `sequence_tokens`: tokens per sequence (default training.max_length)."""
    t = cfg.training
    device = "gpu" if on_gpu(phase, "training", t.num_gpus, spec, refuse, "") else "cpu"
    memory = zero_memory_gb(policy.parameters, t.world_size, t.zero_stage, device)
    if reference:
        memory["reference"] = policy.weights_gb(dtype_size("auto", device))
    sequences = len(SEQUENCES[schema_of(t.loss)]) if t.loss else 1  # online: one rollout per row
    tokens = t.micro_batch_size * sequences * (sequence_tokens or t.max_length)
    memory["activations"] = activation_memory_gb(policy, tokens, 2 if device == "gpu" else 4, t.gradient_checkpointing)
    memory["total"] = sum(memory.values())
    details = (f"ZeRO-{t.zero_stage}, {tokens:,} tokens per micro-batch"
               f"{', checkpointed' if t.gradient_checkpointing else ''}")
    gpus = t.num_gpus if device == "gpu" else 0
    nodes, placement = place(phase, "training", "world_size", t.world_size, t.num_cpus, gpus, spec, refuse,
                              pack=True)
    if device == "cpu":
        share = check_host_memory(phase, "training", memory["total"], t.world_size, t.num_cpus, spec, refuse,
                                   "training.micro_batch_size")
    else:
        placement += gpu_usage(t.world_size, gpus, spec)
        share = min(gpus, 1) * spec.gpu_memory_gb
        if share and memory["total"] > share:
            frozen = memory.get("reference", 0.0)
            states = memory["total"] - memory["activations"] - frozen
            refuse(f"{phase}: {memory['total']:.0f} GB per GPU (ZeRO-{t.zero_stage} states {states:.0f} GB over "
                   f"{t.world_size} rank(s){f' + {frozen:.0f} GB frozen reference' if frozen else ''} + "
                   f"{memory['activations']:.0f} GB activations) > {share:g} GB",
                   training_memory_remedy(t))
    return PhasePlan(phase, role, t.world_size, device, t.num_cpus, gpus, placement, nodes, [policy.name], memory,
                     share, details)


def training_memory_remedy(t) -> str:
    """What can still lower a trainer rank's memory, given the recipe's settings (never what is already set)."""
    steps = [f"raise training.world_size (now {t.world_size})"]
    if t.zero_stage < 3:
        steps.insert(0, f"raise training.zero_stage (now {t.zero_stage})")
    if not t.gradient_checkpointing:
        steps.append("set training.gradient_checkpointing=true")
    if t.micro_batch_size > 1:
        steps.append(f"lower training.micro_batch_size (now {t.micro_batch_size})")
    return ", ".join(steps[:-1]) + f" or {steps[-1]}" if len(steps) > 1 else steps[0] + ", or use GPUs with more memory"


def scored_models(cfg, policy: ModelInfo) -> dict[str, ModelInfo]:
    """By role, the models a scorer holds for the recipe's forward rewards (DCO's reference aside)."""
    r, held = cfg.rewards, {"policy": policy}
    if r.implicit.enabled:
        held["reward_reference"] = model_info(r.implicit.reward_reference.path)
    if r.reward_model.enabled:
        held["reward_model"] = model_info(r.reward_model.model.path)
    return held
