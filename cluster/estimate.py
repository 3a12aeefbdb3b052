"""Time estimates of a plan's phases, per iteration, before anything runs.

generate: prompt rows x n x max_new_tokens tokens (every response assumed to run to max_new_tokens: an upper
    bound) over engines x tokens/s per engine (cluster/throughput.yaml by GPU family and model size).
score: 2 x parameters x tokens FLOPs per model forward (prompt + response tokens of every sample) over
    scorers x FLOP/s per scorer x efficiency.
train: 6 x parameters x tokens FLOPs (forward and backward of every sequence of every example, epochs times)
    over ranks x FLOP/s per rank x efficiency.
Start-up (model loading, actor start) and the pairs phase (polars on the driver) are not estimated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

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
    sources: list[str] = field(default_factory=list)


def load_table(path: Path = THROUGHPUT_FILE) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


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
        tp = e.tensor_parallel_size if e.backend == "vllm" else 1
        units = (tp if tp > 1 else max(e.num_gpus, 1)) if device == "gpu" else e.num_cpus
        tokens_per_s = per_unit * units
        source = f"throughput.yaml {family} ({per_unit:,.0f} tokens/s per {'GPU' if device == 'gpu' else 'CPU'})"
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
    return Figures(tokens_per_s, flops, efficiency, sources)


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


def phase_seconds(cfg, phases: dict, models: dict, prompt_rows: int, prompt_tokens: float,
                  figures_by_phase: dict[str, Figures]) -> dict[str, dict]:
    """{phase: {"seconds", "work"}} for one iteration. `phases`: phase name -> (actors, units per actor), units
    being GPUs of a GPU actor or CPUs of a CPU actor; `models`: role -> parameters."""
    out = {}
    s, n = cfg.sampling, cfg.sampling.n
    sequence = prompt_tokens + s.max_new_tokens
    if "generate" in phases:
        engines, _ = phases["generate"]
        tokens = prompt_rows * n * s.max_new_tokens
        rate = engines * figures_by_phase["generate"].tokens_per_s_per_engine
        out["generate"] = {"seconds": tokens / rate if rate else None,
                           "work": f"{tokens:,.0f} tokens / ({engines} x "
                                   f"{figures_by_phase['generate'].tokens_per_s_per_engine:,.0f} tokens/s)"}
    if "score" in phases and "generate" in phases:
        actors, units = phases["score"]
        f = figures_by_phase["score"]
        tokens = prompt_rows * n * sequence
        flops = 2 * sum(models[role] for role in forward_roles(cfg)) * tokens
        rate = actors * units * f.device_flops * f.efficiency["score"]
        out["score"] = {"seconds": flops / rate if rate else None,
                        "work": f"{flops:.3g} FLOPs (2 x parameters x {tokens:,.0f} tokens per forward) / ({actors} x "
                                f"{units:g} x {f.device_flops:.3g} FLOP/s x {f.efficiency['score']:g})"}
    if "train" in phases and cfg.pairs.method not in ("dco",):
        ranks, units = phases["train"]
        f, t = figures_by_phase["train"], cfg.training
        examples = prompt_rows * (2 if t.loss == "kto" else 1)  # one pair (best vs worst) per prompt row
        if not cfg.pairs.include_anchor:
            examples = examples * (len(cfg.languages) - 1) / len(cfg.languages)
        tokens = examples * SEQUENCES_PER_EXAMPLE.get(t.loss, 2) * min(sequence, t.max_length) * t.epochs
        flops = 6 * models["policy"] * tokens
        rate = ranks * units * f.device_flops * f.efficiency["train"]
        out["train"] = {"seconds": flops / rate if rate else None,
                        "work": f"{flops:.3g} FLOPs (6 x parameters x {tokens:,.0f} tokens) / ({ranks} x {units:g} x "
                                f"{f.device_flops:.3g} FLOP/s x {f.efficiency['train']:g})"}
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
    """The plan's estimate, per iteration and in all: {"phases": {phase: {seconds, work}}, "iteration_seconds",
    "total_seconds", "prompt_rows", "prompt_tokens", "figures": [...]}; phases without a figure have seconds None."""
    cfg, spec = run_plan.config, run_plan.cluster
    prompt_rows, prompt_tokens = prompt_stats(cfg)
    models = {role: m.parameters for role, m in run_plan.models.items()}
    phases, figures_by_phase, sources = {}, {}, []
    for p in run_plan.phases:
        units = p.gpus_per_actor if p.device == "gpu" else p.cpus_per_actor
        phases[p.phase] = (p.actors, units)
        figures_by_phase[p.phase] = f = figures(cfg, p.device, spec.gpu_type, run_plan.models["policy"].parameters)
        sources += [s for s in f.sources if s.split(":")[0] in (p.phase, "score, train") and s not in sources]
    if prompt_rows is None:
        return {"phases": {}, "figures": sources, "note": "prompt rows unknown (an hf: source without "
                "prompts.limit): no estimate"}
    result = phase_seconds(cfg, phases, models, prompt_rows, prompt_tokens, figures_by_phase)
    known = [v["seconds"] for v in result.values() if v["seconds"] is not None]
    per_iteration = sum(known) if known else None
    return {"phases": result, "iteration_seconds": per_iteration,
            "total_seconds": per_iteration * cfg.iterations if per_iteration is not None else None,
            "prompt_rows": prompt_rows, "prompt_tokens": round(prompt_tokens, 1), "figures": sources}


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"


def estimate_table(result: dict, iterations: int, title: str = "estimated time per iteration"):
    """A rich table of an estimate: phase, time, how it was counted; the figures' sources as its caption."""
    from rich.markup import escape
    from rich.table import Table

    caption = [escape(line) for line in result.get("figures", [])]
    if result.get("note"):
        caption.insert(0, escape(result["note"]))
    if result.get("prompt_rows") is not None:
        caption.insert(0, f"{result['prompt_rows']} prompt rows of about {result['prompt_tokens']:g} tokens; "
                          "start-up and the pairs phase not counted")
    table = Table("phase", "time", "counted as", title=title, caption="\n".join(caption), caption_justify="left")
    for phase, value in result.get("phases", {}).items():
        table.add_row(phase, duration(value["seconds"]), escape(value["work"]))
    if result.get("iteration_seconds") is not None:
        table.add_row("iteration", duration(result["iteration_seconds"]),
                      f"x {iterations} iteration(s) = {duration(result['total_seconds'])}")
    return table
