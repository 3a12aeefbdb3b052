"""The cpu entries of cluster/throughput.yaml, from the tiny model's measured figures on this machine.

1. Peak FLOP/s of one CPU core: a float32 matmul on one thread.
2. A finished offline run of the tiny model (the run directory given; else two iterations run here). Its last
   iteration (warm caches: no first-run DeepSpeed compile) calibrates: generated tokens/s per CPU thread and the
   scoring and training efficiencies from each stage's busy seconds, each counted the way the estimate counts work
   (cluster/estimate.py); each phase's fixed start-up from wall minus busy seconds; the driver's pairs rate from
   the pairs stage's wall time. The estimate of that run then equals its measured stage times. Prints the entries
   and the estimate against the measurement.

    python benchmarks/estimate_calibration.py [--run-dir RUN] [--prompts 16]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def core_flops(size: int = 1024, repeats: int = 20) -> float:
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", help="a finished run of the tiny model (default: run one iteration here)")
    ap.add_argument("--recipe", default=str(REPO / "examples" / "quickstart.yaml"))
    ap.add_argument("--prompts", type=int, default=16)
    args = ap.parse_args()

    from rayalign.cluster import load_cluster_spec, plan
    from rayalign.cluster.estimate import load_table
    from rayalign.config import load_config

    peak = core_flops()
    if args.run_dir:
        run_dir = Path(args.run_dir)
        cfg = load_config(run_dir / "config.yaml")
    else:
        import ray

        from rayalign.pipelines import offline

        cfg = load_config(args.recipe, [f"prompts.limit={args.prompts}", "iterations=2", "engines.count=1",
                                        "rewards.actors=1", "cluster.schedule=barrier"])
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        run_dir = Path(tempfile.mkdtemp(prefix="rayalign-calibration-")) / "run"
        offline.run(cfg, run_dir, cluster="local")
        ray.shutdown()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = max(m["iteration"] for m in records if "wall_seconds" in m)
    measured = {m["stage"]: m for m in records if m.get("iteration") == last and "wall_seconds" in m}
    spec = load_cluster_spec("local")
    # the estimate with unit rates and no start-up: its busy seconds are then the work counted in tokens / FLOPs
    unit = load_config(run_dir / "config.yaml", ["cluster.generation_tokens_per_s=1", "cluster.device_tflops=1e-12",
                                                 "cluster.efficiency=1", "cluster.startup_seconds=0"])
    unit_plan = plan(unit, spec)
    work = {phase: v["busy"] for phase, v in unit_plan.estimate["phases"].items()}
    phases = {p.phase: p for p in unit_plan.phases}
    g = phases["generate"]
    tokens_per_thread = work["generate"] / measured["generate"]["seconds"] / g.cpus_per_actor
    efficiency = {phase: work[phase] / measured[phase]["seconds"] / peak for phase in ("score", "train")
                  if phase in work and phase in measured}
    startup = {phase: measured[phase]["wall_seconds"] - measured[phase]["seconds"]
               for phase in ("generate", "score", "train") if phase in measured}
    samples = measured["generate"]["samples"]
    pairs_rate = samples / measured["pairs"]["wall_seconds"]
    size = unit_plan.models["policy"].parameters / 1e9
    print(f"\nrun {run_dir}, iteration {last}: {cfg.prompts.limit} prompt ids x {len(cfg.languages)} languages, "
          f"n={cfg.sampling.n}, max_new_tokens {cfg.sampling.max_new_tokens}; {os.cpu_count()} CPU cores")
    print(f"one core, float32 matmul: {peak / 1e12:.4f} TFLOP/s")
    print("cluster/throughput.yaml cpu entries:")
    print(f"  generation_tokens_per_s: cpu: {{{size:.3g}: {tokens_per_thread:.0f}}}")
    print(f"  device_tflops: cpu: {peak / 1e12:.3g}")
    print(f"  efficiency: cpu: {{score: {efficiency.get('score', 0):.3g}, train: {efficiency.get('train', 0):.3g}}}")
    print("  startup_s: cpu: {" + ", ".join(f"{k}: {v:.2g}" for k, v in startup.items()) + "}")
    print(f"  pairs_samples_per_s: {pairs_rate:.0f}")
    table = load_table()
    print(f"in the table now: {table['generation_tokens_per_s']['cpu']}, {table['device_tflops']['cpu']}, "
          f"{table['efficiency']['cpu']}, {table['startup_s']['cpu']}, {table['pairs_samples_per_s']}")
    current = plan(load_config(run_dir / "config.yaml"), spec).estimate
    print(f"{'stage':<10}{'measured s':>12}{'estimate s':>12}")
    for phase, value in current["phases"].items():
        print(f"{phase:<10}{measured.get(phase, {}).get('wall_seconds', float('nan')):>12.1f}{value['seconds']:>12.1f}")


if __name__ == "__main__":
    main()
