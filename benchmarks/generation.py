"""Generation throughput: the HF engine called directly vs K = 1 and K = 2 GenerationActors on Ray.

All three runs generate the same shards of the bundled prompt set with the same seeds, in this one
process, and must produce identical rows; the ratios show the cost of the actor layer (K = 1 vs
direct) and the gain from sharding over actors (K = 2). Model loading is excluded from the times.

    python benchmarks/generation.py [--prompts 32] [--n 4] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32, help="prompt ids (x 5 languages)")
    ap.add_argument("--n", type=int, default=4, help="samples per prompt row")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--model", default=None, help="model directory (default: the cached tiny model)")
    args = ap.parse_args()

    import ray
    import torch

    from rayalign.actors.generator import GenerationGroup, split_shards
    from rayalign.config import load_config
    from rayalign.data.prompts import load_prompts
    from rayalign.engines.hf import HFEngine
    from rayalign.generation import generate_samples
    from rayalign.models import ensure_tiny_model

    model = args.model or str(ensure_tiny_model())
    cfg = load_config(REPO / "examples" / "quickstart.yaml", [
        f"sampling.n={args.n}", f"sampling.max_new_tokens={args.max_new_tokens}", f"policy.path={model}"])
    prompts = load_prompts(cfg.prompts.path, cfg.languages, **{**cfg.prompts.load_kwargs(), "limit": args.prompts})
    shards = split_shards(prompts, cfg.engines.shard_rows)
    print(f"{prompts.num_rows} prompt rows x n={args.n} = {prompts.num_rows * args.n} samples, "
          f"{len(shards)} shards of {cfg.engines.shard_rows} rows, batch {cfg.engines.batch_size}, "
          f"max_new_tokens {args.max_new_tokens}, {os.cpu_count()} CPU cores")

    results = {}

    torch.set_num_threads(int(cfg.engines.num_cpus))  # the same threads one actor gets
    engine = HFEngine(model, batch_size=cfg.engines.batch_size)
    generate_samples(engine, shards[0].slice(0, 1), cfg.sampling, 1, "warmup")
    started = time.perf_counter()
    direct = pa.concat_tables([generate_samples(engine, s, cfg.sampling, 1, cfg.policy.path) for s in shards])
    results["direct (no Ray)"] = (direct, time.perf_counter() - started)
    del engine

    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    for k in (1, 2):
        cfg.engines.count = k
        group = GenerationGroup(model, cfg.policy, cfg.engines)
        out = {}
        stats = group.run(shards, cfg.sampling, 1, cfg.policy.path, lambda i, t: out.__setitem__(i, t))
        group.shutdown()
        results[f"Ray K={k}"] = (pa.concat_tables([out[i] for i in sorted(out)]), stats.seconds)
    ray.shutdown()

    base_table, base_seconds = results["direct (no Ray)"]
    print(f"\n{'mode':<16}{'samples':>9}{'seconds':>9}{'samples/s':>11}{'tokens/s':>10}{'vs direct':>11}  rows equal")
    for mode, (table, seconds) in results.items():
        tokens = sum(table.column("num_tokens").to_pylist())
        print(f"{mode:<16}{table.num_rows:>9}{seconds:>9.2f}{table.num_rows / seconds:>11.1f}{tokens / seconds:>10.1f}"
              f"{base_seconds / seconds:>10.2f}x  {table.equals(base_table)}")


if __name__ == "__main__":
    main()
