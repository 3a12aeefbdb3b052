"""Generation streaming into scoring against the barrier schedule: one offline iteration's wall time both ways.

Runs the same recipe (the tiny model by default; generate -> score -> pairs -> train) into two run directories
in one process on one local Ray instance, with cluster.schedule barrier and then stream, and prints each
iteration's wall time, that of generate + score alone, the ratios barrier / stream, and whether the samples,
scores and pairs datasets are equal row for row. One engine and one scorer of one CPU each: on a 2-core machine
both fit side by side. Model loading and actor start-up are in the times, as a user waits for them.

    python benchmarks/streaming.py [--prompts 16] [--n 4] [--max-new-tokens 48] [--recipe examples/quickstart.yaml]
                                   [--model builtin:tiny-multilingual?train_steps=40]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def stage_seconds(run_dir: Path) -> dict[str, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["stage"]: r["wall_seconds"] for r in records if r.get("iteration") == 1 and "wall_seconds" in r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(REPO / "examples" / "quickstart.yaml"))
    ap.add_argument("--prompts", type=int, default=16, help="prompt ids (x the recipe's languages)")
    ap.add_argument("--n", type=int, default=4, help="samples per prompt row")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--shard-rows", type=int, default=8)
    ap.add_argument("--model", default="builtin:tiny-multilingual", help="policy model (a directory, or the tiny "
                    "model with options: builtin:tiny-multilingual?train_steps=40)")
    ap.add_argument("--keep", help="keep the two run directories under this directory")
    args = ap.parse_args()

    import ray

    from rayalign.config import load_config
    from rayalign.data.store import read_dataset
    from rayalign.models import resolve_model_path
    from rayalign.pipelines import offline

    resolve_model_path(args.model)  # the tiny model is built once, before either timing
    overrides = [f"policy.path={args.model}", f"prompts.limit={args.prompts}", f"sampling.n={args.n}", f"sampling.max_new_tokens={args.max_new_tokens}",
                 "iterations=1", "engines.count=1", "engines.num_cpus=1", f"engines.shard_rows={args.shard_rows}",
                 "rewards.actors=1", "rewards.num_cpus=1", "training.world_size=1", "training.num_cpus=1"]
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    root = Path(args.keep or tempfile.mkdtemp(prefix="rayalign-streaming-"))
    walls, stages = {}, {}
    try:
        for schedule in ("barrier", "stream"):
            cfg = load_config(args.recipe, [*overrides, f"cluster.schedule={schedule}"])
            run_dir = root / schedule
            shutil.rmtree(run_dir, ignore_errors=True)
            started = time.perf_counter()
            offline.run(cfg, run_dir, cluster="local")
            walls[schedule] = time.perf_counter() - started
            stages[schedule] = stage_seconds(run_dir)
        cfg = load_config(args.recipe, overrides)
        print(f"\n{cfg.prompts.limit} prompt ids x {len(cfg.languages)} languages x n={cfg.sampling.n}, max_new_tokens "
              f"{cfg.sampling.max_new_tokens}, shard_rows {cfg.engines.shard_rows}; 1 engine + 1 scorer of 1 CPU "
              f"each; {os.cpu_count()} CPU cores")
        print(f"{'schedule':<10}{'generate s':>12}{'score s':>10}{'gen+score s':>13}{'pairs s':>9}{'train s':>9}"
              f"{'iteration s':>13}")
        for schedule in ("barrier", "stream"):
            s = stages[schedule]
            print(f"{schedule:<10}{s['generate']:>12.1f}{s['score']:>10.1f}{s['generate'] + s['score']:>13.1f}"
                  f"{s.get('pairs', 0):>9.1f}{s.get('train', 0):>9.1f}{walls[schedule]:>13.1f}")
        both = {k: stages[k]["generate"] + stages[k]["score"] for k in stages}
        print(f"ratio barrier / stream: generate + score {both['barrier'] / both['stream']:.2f}x, whole iteration "
              f"{walls['barrier'] / walls['stream']:.2f}x")
        for dataset in ("samples", "scores", "pairs"):
            equal = read_dataset(root / "barrier" / "iter-1" / dataset).equals(
                read_dataset(root / "stream" / "iter-1" / dataset))
            print(f"{dataset}: {'identical' if equal else 'DIFFERENT'} row for row")
    finally:
        ray.shutdown()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
