"""Time estimates of a plan's phases, per iteration, before anything runs. Each phase is its start-up plus its
busy time, and is named as the run's stages are (generate, score, pairs, train), so `rayalign inspect` can set each
beside the stage's measured wall time.

start-up: a fixed figure per device kind and phase (Ray actor start, engine or DeepSpeed set-up) plus the checkpoint
    bytes each actor reads at load_gb_per_s (actors start in parallel).
generate: prompt rows x n x max_new_tokens tokens (every response assumed to run to max_new_tokens: an upper
    bound) over engines x tokens/s per engine (cluster/throughput.yaml by GPU family and model size).
score: 2 x parameters x tokens FLOPs per model forward (prompt + response tokens of every sample) over
    scorers x FLOP/s per scorer x efficiency.
pairs: samples over the driver's pairs_samples_per_s; DCO: its reference's forward over every candidate (as score)
    and then the tuples; LIDR's self-translation is not estimated.
train: 6 x parameters x tokens FLOPs (forward and backward of every sequence of every example, epochs times)
    over ranks x FLOP/s per rank x efficiency.
DeepSpeed's one-time op compile on a machine's first run is not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from rayalign.cluster.model_info import read_table

THROUGHPUT_FILE = Path(__file__).parent / "throughput.yaml"
CHARS_PER_TOKEN = 4  # prompt tokens are estimated from the prompts' characters
PROMPT_TOKENS = 256  # when the prompts cannot be read here (an hf: source not on this machine)
SEQUENCES_PER_EXAMPLE = {"kto": 1, "dco": 4}  # pair losses: chosen + rejected


@dataclass
class Figures:
    """The throughput figures an estimate uses, and where each came from."""

    tokens_per_s_per_engine: float
    device_flops: float  # one GPU, or one CPU core
    efficiency: dict[str, float]  # score, train
    startup_s: dict[str, float]  # fixed start-up by phase: generate, score, train
    load_gb_per_s: float  # checkpoint bytes one actor reads per second
    sources: list[str] = field(default_factory=list)

    def startup(self, phase: str, load_gb: float) -> float:
        return self.startup_s[phase] + load_gb / self.load_gb_per_s


def checkpoint_gb(run_plan, phase) -> float:
    """GB of the checkpoints a phase's actors read at start-up, each once (DCO's reference may be the policy), in
    their published dtype."""
    distinct = {m.name: m for m in run_plan.models.values()}.values()
    return sum(m.parameters * m.dtype_bytes for m in distinct if m.name in phase.models) / 1e9


def rate(value: float) -> str:
    """A rate for the estimate's text: whole numbers with separators, three significant digits below 100."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def load_table(path: Path = THROUGHPUT_FILE) -> dict:
    return read_table(path)


def gpu_family(name: str) -> str:
    """'A100-80GB', 'NVIDIA A100-SXM4-80GB' -> 'A100'; no GPU -> 'cpu'."""
    name = name.replace("NVIDIA", "").strip()
    return name.split("-")[0].split()[0].upper() if name and name.lower() != "none" else "cpu"


def interpolate(by_size: dict, billions: float) -> float:
    """Tokens/s at `billions` parameters: log-log between the table's sizes, 1 / parameters beyond them."""
    points = sorted((float(size), float(value)) for size, value in by_size.items())
    if billions <= points[0][0]:
        return points[0][1] * points[0][0] / billions
    if billions >= points[-1][0]:
        return points[-1][1] * points[-1][0] / billions
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if s0 <= billions <= s1:
            t = (math.log(billions) - math.log(s0)) / (math.log(s1) - math.log(s0))
            return math.exp(math.log(v0) + t * (math.log(v1) - math.log(v0)))
    raise AssertionError("unreachable")


def figures(cfg, device: str, gpu_type: str, parameters: int, table: dict | None = None) -> Figures:
    """Tokens/s of one engine, FLOP/s of one device and the efficiencies: the recipe's cluster.* keys where
    given, else the table's entry for the GPU family (or cpu)."""
    table = table or load_table()
    family = gpu_family(gpu_type) if device == "gpu" else "cpu"
    e, c = cfg.engines, cfg.cluster
    sources = []
    if c.generation_tokens_per_s:
        tokens_per_s, source = c.generation_tokens_per_s, "cluster.generation_tokens_per_s"
    elif family in table["generation_tokens_per_s"]:
        per_unit = interpolate(table["generation_tokens_per_s"][family], parameters / 1e9)
        units = max(e.gpus_per_engine, 1) if device == "gpu" else e.num_cpus
        tokens_per_s = per_unit * units
        source = f"throughput.yaml {family} ({rate(per_unit)} tokens/s per {'GPU' if device == 'gpu' else 'CPU'})"
    else:
        tokens_per_s, source = 0.0, f"no generation figure for {family}: set cluster.generation_tokens_per_s"
    sources.append(f"generate: {source}")
    if c.device_tflops:
        flops, source = c.device_tflops * 1e12, "cluster.device_tflops"
    elif family in table["device_tflops"]:
        flops, source = table["device_tflops"][family] * 1e12, f"throughput.yaml {family}"
    else:
        flops, source = 0.0, f"no FLOP/s figure for {family}: set cluster.device_tflops"
    kind = "gpu" if device == "gpu" else "cpu"
    efficiency = ({"score": c.efficiency, "train": c.efficiency} if c.efficiency else dict(table["efficiency"][kind]))
    sources.append(f"score, train: {flops / 1e12:g} TFLOP/s per {'GPU' if device == 'gpu' else 'CPU core'} "
                   f"({source}) x efficiency {efficiency['score']:g} / {efficiency['train']:g} "
                   f"({'cluster.efficiency' if c.efficiency else f'throughput.yaml {kind}'})")
    startup_s = ({phase: c.startup_seconds for phase in ("generate", "score", "train")} if c.startup_seconds is not None
                 else dict(table["startup_s"][kind]))
    load = table["load_gb_per_s"][kind]
    sources.append(f"start-up: {', '.join(f'{k} {v:g} s' for k, v in startup_s.items())} "
                   f"({'cluster.startup_seconds' if c.startup_seconds is not None else f'throughput.yaml {kind}'}) "
                   f"+ checkpoint GB / {load:g} GB/s")
    return Figures(tokens_per_s, flops, efficiency, startup_s, load, sources)


def prompt_stats(cfg) -> tuple[int | None, float]:
    """(prompt rows, mean prompt tokens) of the recipe's prompts when they can be read here, else (rows from
    prompts.limit when set, PROMPT_TOKENS)."""
    from rayalign.data.prompts import load_prompts

    if not str(cfg.prompts.path).startswith("hf:"):
        try:
            prompts = load_prompts(cfg.prompts.path, cfg.languages, **cfg.prompts.load_kwargs())
        except Exception:  # noqa: BLE001 - the plan goes on without the estimate's row count
            prompts = None
        if prompts is not None and prompts.num_rows:
            chars = sum(len(m["content"]) for row in prompts.column("messages").to_pylist() for m in row)
            return prompts.num_rows, chars / prompts.num_rows / CHARS_PER_TOKEN
    rows = cfg.prompts.limit * len(cfg.languages) if cfg.prompts.limit else None
    return rows, PROMPT_TOKENS


def candidate_stats(cfg) -> tuple[int, int, float] | None:
    """DCO's candidate sets: (questions, candidate rows over every language, mean prompt + candidate tokens);
    None when they cannot be read here."""
    from rayalign.data.prompts import load_candidate_sets

    try:
        cands = load_candidate_sets(cfg.rewards.consistency.candidates_path, cfg.languages)
    except Exception:  # noqa: BLE001 - the plan goes on without this estimate
        return None
    if not cands.num_rows:
        return None
    chars = sum(len(m["content"]) for row in cands.column("messages").to_pylist() for m in row) + \
        sum(len(text) for text in cands.column("candidate").to_pylist())
    return len(set(cands.column("prompt_id").to_pylist())), cands.num_rows, chars / cands.num_rows / CHARS_PER_TOKEN


def _timed(busy: float | None, startup: float, work: str) -> dict:
    return {"seconds": None if busy is None else startup + busy, "busy": busy, "startup": startup,
            "work": work}


def _forward(flops: float, actors: int, units: float, f: Figures, kind: str) -> tuple[float | None, str]:
    speed = actors * units * f.device_flops * f.efficiency[kind]
    return (flops / speed if speed else None,
            f"/ ({actors} x {units:g} x {f.device_flops:.3g} FLOP/s x {f.efficiency[kind]:g})")


def phase_seconds(cfg, phases: dict, models: dict, prompt_rows: int, prompt_tokens: float,
                  figures_by_phase: dict[str, Figures], load_gb: dict[str, float], pairs_rate: float,
                  candidates: tuple[int, int, float] | None = None) -> dict[str, dict]:
    """{stage: {"seconds", "busy", "startup", "work"}} for one iteration. `phases`: plan phase -> (actors, units
    per actor), units being GPUs of a GPU actor or CPUs of a CPU actor; `models`: role -> parameters; `load_gb`:
    plan phase -> checkpoint GB one actor reads; `candidates`: DCO's candidate_stats."""
    from rayalign.pairs import dco_language_pairs

    out = {}
    s, n, t = cfg.sampling, cfg.sampling.n, cfg.training
    sequence = prompt_tokens + s.max_new_tokens
    samples = prompt_rows * n
    dco = cfg.pairs.method == "dco"
    if "generate" in phases:
        engines, _ = phases["generate"]
        f = figures_by_phase["generate"]
        tokens = samples * s.max_new_tokens
        speed = engines * f.tokens_per_s_per_engine
        out["generate"] = _timed(tokens / speed if speed else None, f.startup("generate", load_gb["generate"]),
                                 f"{tokens:,.0f} tokens / ({engines} x {rate(f.tokens_per_s_per_engine)} tokens/s)")
    if "score" in phases and not dco:
        f = figures_by_phase["score"]
        tokens = samples * sequence
        flops = 2 * sum(models[role] for role in forward_roles(cfg)) * tokens
        busy, over = _forward(flops, *phases["score"], f, "score")
        out["score"] = _timed(busy, f.startup("score", load_gb["score"]),
                              f"{flops:.3g} FLOPs (2 x parameters x {tokens:,.0f} tokens per forward) {over}")
    if dco and "score" in phases and candidates:
        questions, rows, cand_tokens = candidates
        f = figures_by_phase["score"]
        flops = 2 * models["dco_reference"] * rows * cand_tokens
        busy, over = _forward(flops, *phases["score"], f, "score")
        tuples = questions * len(dco_language_pairs(cfg.languages, cfg.anchor_language,
                                                    cfg.rewards.consistency.language_pairs)) \
            * cfg.rewards.consistency.pairs_per_question
        out["pairs"] = _timed(None if busy is None else busy + rows / pairs_rate, f.startup("score", load_gb["score"]),
                              f"reference forward: {flops:.3g} FLOPs (2 x parameters x {rows:,} candidates x "
                              f"{cand_tokens:.0f} tokens) {over}; {tuples:,} tuples")
    elif cfg.pairs.method == "lidr":
        out["pairs"] = _timed(None, 0.0, "LIDR self-translation: not estimated")
    elif not dco and "generate" in phases:
        out["pairs"] = _timed(samples / pairs_rate, 0.0, f"{samples:,.0f} samples / {pairs_rate:,.0f} samples/s "
                                                         "(polars on the driver)")
    if "train" in phases and (not dco or candidates):
        ranks, units = phases["train"]
        f = figures_by_phase["train"]
        if dco:  # one tuple per question, language pair and draw: chosen and rejected in both languages
            examples, length = tuples, candidates[2]
        else:  # one pair (best vs worst) per prompt row
            examples, length = prompt_rows * (2 if t.loss == "kto" else 1), sequence
            if not cfg.pairs.include_anchor:
                examples = examples * (len(cfg.languages) - 1) / len(cfg.languages)
        tokens = examples * SEQUENCES_PER_EXAMPLE.get(t.loss, 2) * min(length, t.max_length) * t.epochs
        flops = 6 * models["policy"] * tokens
        busy, over = _forward(flops, ranks, units, f, "train")
        out["train"] = _timed(busy, f.startup("train", load_gb["train"]),
                              f"{flops:.3g} FLOPs (6 x parameters x {tokens:,.0f} tokens) {over}")
    return out


def forward_roles(cfg) -> list[str]:
    """The model of each teacher-forced forward per sample (rayalign.pipelines.offline.scoring_setup's specs)."""
    r = cfg.rewards
    roles = ["policy"]
    if r.implicit.enabled:
        roles += ["policy"] * (r.implicit.prompt == "cross_lingual") + ["reward_reference"]
    if r.reward_model.enabled:
        roles.append("reward_model")
    return roles


def estimate(run_plan) -> dict:
    """The plan's estimate, per iteration and in all: {"phases": {stage: {seconds, busy, startup, work}},
    "iteration_seconds", "total_seconds", "prompt_rows", "prompt_tokens", "figures": [...]}; a stage without a
    figure has seconds None."""
    cfg, spec = run_plan.config, run_plan.cluster
    table = load_table()
    prompt_rows, prompt_tokens = prompt_stats(cfg)
    models = {role: m.parameters for role, m in run_plan.models.items()}
    phases, figures_by_phase, load_gb, sources = {}, {}, {}, []
    for p in run_plan.phases:
        units = p.gpus_per_actor if p.device == "gpu" else p.cpus_per_actor
        phases[p.phase] = (p.actors, units)
        load_gb[p.phase] = checkpoint_gb(run_plan, p)
        figures_by_phase[p.phase] = f = figures(cfg, p.device, spec.gpu_type, run_plan.models["policy"].parameters,
                                                table)
        sources += [s for s in f.sources if s.split(":")[0] in (p.phase, "score, train", "start-up")
                    and s not in sources]
    pairs_rate = table["pairs_samples_per_s"]
    sources.append(f"pairs: {pairs_rate:,} samples/s (throughput.yaml)")
    candidates = candidate_stats(cfg) if cfg.pairs.method == "dco" else None
    if prompt_rows is None and cfg.pairs.method != "dco":
        return {"phases": {}, "figures": sources, "note": "prompt rows unknown (an hf: source without "
                "prompts.limit): no estimate"}
    result = phase_seconds(cfg, phases, models, prompt_rows or 0, prompt_tokens, figures_by_phase, load_gb,
                           pairs_rate, candidates)
    unknown = [phase for phase, v in result.items() if v["seconds"] is None]
    per_iteration = None if unknown or not result else sum(v["seconds"] for v in result.values())
    out = {"phases": result, "iteration_seconds": per_iteration, "unknown": unknown,
           "total_seconds": per_iteration * cfg.iterations if per_iteration is not None else None,
           "prompt_rows": prompt_rows, "prompt_tokens": round(prompt_tokens, 1), "figures": sources}
    if cfg.pairs.method == "dco":  # no prompts: the candidate sets are the work
        out["prompt_rows"] = None
        out["note"] = (f"{candidates[1]:,} candidate rows of about {candidates[2]:.3g} tokens; DeepSpeed's first-run "
                       "op compile not counted" if candidates else f"DCO candidates not readable here "
                       f"({cfg.rewards.consistency.candidates_path}): pairs and train not estimated")
    return out


def one_actor_busy(cfg, spec) -> tuple[float, float] | None:
    """Busy seconds of one iteration's generation on one engine and its scoring on one scorer, with the counts'
    figures on `spec` (what a streamed split balances); None without a figure for either. Both scale with the
    prompt rows, so an unknown count (an hf: source) counts one row."""
    from rayalign.cluster.model_info import model_info

    r, e = cfg.rewards, cfg.engines
    prompt_rows, prompt_tokens = prompt_stats(cfg)
    paths = {"policy": cfg.policy.path, "reward_reference": r.implicit.reward_reference and
             r.implicit.reward_reference.path, "reward_model": r.reward_model.model and r.reward_model.model.path}
    models = {role: model_info(path).parameters for role, path in paths.items() if path}
    on_gpu = bool(spec.gpus_per_node)
    units = {"generate": (e.gpus_per_engine if on_gpu and e.num_gpus else e.num_cpus, on_gpu and e.num_gpus),
             "score": (r.num_gpus if on_gpu and r.num_gpus else r.num_cpus, on_gpu and r.num_gpus)}
    figs = {phase: figures(cfg, "gpu" if gpu else "cpu", spec.gpu_type, models["policy"])
            for phase, (_, gpu) in units.items()}
    phases = {phase: (1, unit) for phase, (unit, _) in units.items()}
    busy = phase_seconds(cfg, phases, models, prompt_rows or 1, prompt_tokens, figs, {"generate": 0, "score": 0},
                         1.0)
    gen, score = busy["generate"]["busy"], busy.get("score", {}).get("busy")
    return (gen, score) if gen and score else None


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"


def estimate_table(result: dict, iterations: int, title: str | None = None):
    """A rich table of an estimate: stage, time, start-up within it, how the rest was counted; the figures'
    sources as its caption. An online estimate (unit "step") counts `iterations` steps and its start-up once."""
    from rich.markup import escape
    from rich.table import Table

    caption = [escape(line) for line in result.get("figures", [])]
    if result.get("note"):
        caption.insert(0, escape(result["note"]))
    if result.get("prompt_rows") is not None:
        caption.insert(0, f"{result['prompt_rows']} prompt rows of about {result['prompt_tokens']:g} tokens; "
                          + ("streamed generate and score overlap, the sum is an upper bound; " if result.get("stream")
                             else "") + "DeepSpeed's first-run op compile not counted")
    unit = result.get("unit", "iteration")
    table = Table("stage", "time", "start-up", "counted as", title=title or f"estimated time per {unit}",
                  caption="\n".join(caption), caption_justify="left")
    for phase, value in result.get("phases", {}).items():
        startup = "" if unit == "step" else duration(value.get("startup"))  # a step's start-up is counted once
        table.add_row(phase, duration(value["seconds"]), startup, escape(value["work"]))
    if result.get("unknown"):
        table.add_row(unit, "?", "", f"not estimated: no figures for {', '.join(result['unknown'])}")
    elif result.get("iteration_seconds") is not None:
        once = f" + start-up {duration(result['startup_seconds'])}" if "startup_seconds" in result else ""
        table.add_row(unit, duration(result["iteration_seconds"]), "",
                      f"x {iterations} {unit}(s){once} = {duration(result['total_seconds'])}")
    return table
