"""CUDA checks for a GPU machine that has torch and transformers but neither Ray nor vLLM.

1. The HF engine scores the same rows in bfloat16 and float32 on CUDA (and float32 on CPU). Pass: float32
   on CUDA equals float32 on CPU within 1e-3 nats per token, and bfloat16 is within 0.05 nats per token of
   float32 on average (bfloat16 keeps 8 bits of mantissa: about 0.4% per logit).
2. One DeepSpeed ZeRO-2 trainer rank on CUDA in bfloat16: the TrainerActor's own setup, prepare, train_steps
   and save, called directly (no Ray: a stand-in supplies only ray.util.get_node_ip_address). Pass: the
   steps run, the loss is finite, every parameter's fp32 master copy changes, and the saved checkpoint loads.
3. Online weight sync by CUDA IPC: that trainer rank shares its parameters' handles (share_parameters) with an HF
   engine in another process on the same GPU, whose weights were zeroed (HFEngine.receive_shared). Pass: every
   parameter equals the trainer's bit for bit, and the engine scores like an engine loaded from the saved
   checkpoint (1e-5 nats per token). Seconds per GB for the tiny model and a ~100M-parameter Llama.
4. The NCCL weight-sync group (join_group, broadcast) between two processes on the one GPU: NCCL refuses two
   ranks on one device, and this records what it said (the NCCL path needs two GPUs: tests/test_weight_sync_gpu.py).
5. One online policy rank (PolicyTrainer, ZeRO-2, bfloat16 on CUDA): rollout_stats, then two PPO updates on the
   same rollouts against the log-probs recorded before the first. Pass: the rank's bf16 log-probs of the rollouts
   are within 0.05 nats per token of the HF engine's float32 scoring on CPU (mean), the first update sees ratio 1
   (approx KL below 1e-3, nothing clipped: bf16 forwards of one model may differ slightly between batchings), and
   the second sees the ratio move (approx KL above 1e-4) with the tight clip acting on some tokens.

    python benchmarks/cuda_check.py --model MODEL_DIR --pairs PAIRS_DIR [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import socket
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def ray_stand_in() -> None:
    try:
        import ray  # noqa: F401  (only whether it imports)
    except ImportError:
        print("Ray is not installed here: a stand-in supplies ray.util.get_node_ip_address only")
        sys.modules["ray"] = types.SimpleNamespace(util=types.SimpleNamespace(get_node_ip_address=lambda: "127.0.0.1"))


def score_rows(limit: int) -> list:
    from rayalign.engines import ScoreRequest

    rows = []
    for lang in ("en", "es", "de", "fr", "ru"):
        for line in (REPO / "examples/data/prompts" / f"{lang}.jsonl").read_text(encoding="utf-8").splitlines()[:limit]:
            r = json.loads(line)
            rows.append(ScoreRequest([{"role": "user", "content": r["instruction"]}], r["output"]))
    return rows


def check_scoring(model: str, limit: int) -> dict:
    from rayalign.engines.hf import HFEngine

    rows = score_rows(limit)
    results = {}
    for name, dtype, device in (("cpu_fp32", "float32", "cpu"), ("cuda_fp32", "float32", "cuda"),
                                ("cuda_bf16", "bfloat16", "cuda")):
        engine = HFEngine(model, dtype=dtype, device=device, batch_size=32)
        started = time.perf_counter()
        results[name] = engine.score(rows, layers=[1])
        print(f"  {name}: {len(rows)} rows in {time.perf_counter() - started:.2f} s")
        del engine
    tokens = torch.tensor([r.num_tokens for r in results["cpu_fp32"]], dtype=torch.float64)
    assert all([r.num_tokens for r in results[k]] == tokens.int().tolist() for k in results), "token counts differ"

    def per_token_gap(a, b):
        gap = torch.tensor([x.logp - y.logp for x, y in zip(results[a], results[b])], dtype=torch.float64).abs()
        return float((gap / tokens).mean()), float((gap / tokens).max())

    fp32_mean, fp32_max = per_token_gap("cuda_fp32", "cpu_fp32")
    bf16_mean, bf16_max = per_token_gap("cuda_bf16", "cuda_fp32")
    ref = torch.tensor([r.logp for r in results["cuda_fp32"]])
    bf16 = torch.tensor([r.logp for r in results["cuda_bf16"]])
    n = len(ref) // 2  # pair row i with row n + i: does bf16 keep the order of the two log-probs?
    order_kept = float(((ref[:n] > ref[n:2 * n]) == (bf16[:n] > bf16[n:2 * n])).float().mean())
    pooled_gap = max(float(abs(x.pooled[1] - y.pooled[1]).max()) for x, y in zip(results["cuda_fp32"],
                                                                                  results["cpu_fp32"]))
    out = {"rows": len(rows), "tokens_mean": float(tokens.mean()), "cuda_fp32_vs_cpu_per_token_mean": fp32_mean,
           "cuda_fp32_vs_cpu_per_token_max": fp32_max, "bf16_vs_fp32_per_token_mean": bf16_mean,
           "bf16_vs_fp32_per_token_max": bf16_max, "bf16_pair_order_kept": order_kept,
           "pooled_layer1_cuda_vs_cpu_max": pooled_gap}
    out["pass"] = fp32_mean < 1e-3 and fp32_max < 1e-2 and bf16_mean < 0.05
    return out


def ready_rank(cls, model: str, t, **options):
    """A trainer rank of `cls` (the actor classes, called directly) set up as a one-rank group on a free port."""
    from rayalign.config import ModelConfig

    rank = cls(0, model, ModelConfig(path=model), t, **options)
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    rank.setup("127.0.0.1", port)
    return rank


def check_zero2(model: str, pairs: str, out_dir: Path, steps: int) -> dict:
    ray_stand_in()
    from rayalign.actors.preference_trainer import PreferenceTrainer
    from rayalign.config import TrainingConfig
    from rayalign.models import load_causal_lm

    t = TrainingConfig(loss="dpo", lr=1e-4, micro_batch_size=4, gradient_accumulation=2, world_size=1,
                       zero_stage=2, num_gpus=1, warmup_ratio=0.0)
    started = time.perf_counter()
    rank = ready_rank(PreferenceTrainer, model, t, dco_beta=1.0)
    info = rank.prepare(pairs, "pairs", "dpo", None)
    setup_s = time.perf_counter() - started
    from deepspeed.utils import safe_get_full_fp32_param

    def weights():  # the bf16 weights the model runs with, and the optimizer's fp32 master copies
        named = list(rank.engine.module.named_parameters())
        return ({k: v.detach().float().cpu().clone() for k, v in named},
                {k: safe_get_full_fp32_param(v).detach().cpu().clone() for k, v in named})

    before, master_before = weights()
    torch.cuda.reset_peak_memory_stats()
    records = rank.train_steps(steps)
    after, master_after = weights()
    changed = sum(not torch.equal(before[k], after[k]) for k in before)
    master_changed = sum(not torch.equal(master_before[k], master_after[k]) for k in before)
    saved = out_dir / "zero2-policy"
    rank.save(str(saved))
    reloaded = load_causal_lm(str(saved), "float32", "cpu")
    params = {k: v.detach().float().cpu() for k, v in rank.engine.module.named_parameters()}
    reload_gap = max(float((params[k] - v.detach()).abs().max()) for k, v in reloaded.named_parameters())
    losses = [r["loss"] for r in records]
    out = {"setup_and_prepare_s": round(setup_s, 2), "rows": info["rows"], "steps": len(records),
           "dtype": str(next(rank.engine.module.parameters()).dtype), "zero_stage": rank.ds_config["zero_optimization"],
           "loss_first": losses[0], "loss_last": losses[-1], "accuracy_last": records[-1].get("accuracy"),
           "step_seconds_mean": sum(r["seconds"] for r in records[1:]) / max(1, len(records) - 1),
           "losses": [round(x, 4) for x in losses], "bf16_params_changed": f"{changed}/{len(before)}",
           "fp32_master_params_changed": f"{master_changed}/{len(before)}", "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20,
           "saved_reload_max_abs_gap": reload_gap}
    # bf16 weights near 1.0 (the norms) move only once the fp32 master has moved by half a bf16 step (2^-8)
    out["pass"] = all(math.isfinite(x) for x in losses) and master_changed == len(before) and reload_gap < 1e-2
    check_zero2.rank = rank  # the trained rank: check 3 syncs its weights
    return out


def param_hashes(module) -> dict:
    return {name: hashlib.sha256(p.detach().float().cpu().numpy().tobytes()).hexdigest()
            for name, p in module.named_parameters()}


def engine_process(model: str, conn) -> None:
    """An HF engine on the GPU, weights zeroed, that takes shared parameters until told to stop."""
    from rayalign.engines.hf import HFEngine

    engine = HFEngine(model, dtype="float32", device="cuda", batch_size=32)
    with torch.no_grad():
        for p in engine.model.parameters():
            p.zero_()
    conn.send("ready")
    while (message := conn.recv()) is not None:
        shared, rows, check = message
        started = time.perf_counter()
        engine.receive_shared(shared)
        seconds = time.perf_counter() - started
        scores = engine.score(rows, layers=[1]) if rows else []
        conn.send({"seconds": seconds, "hashes": param_hashes(engine.model) if check else {},
                   "logp": [r.logp for r in scores], "tokens": [r.num_tokens for r in scores]})


def sync_by_ipc(module, model: str, rows: list, repeats: int) -> dict:
    """Push `module`'s parameters to an engine process on this GPU `repeats` times; the first reply's hashes and
    scores, and the seconds of each push (handles made, sent, opened and copied, acknowledged). Only the first
    push is checked (hashing every parameter on the host would dominate the time), so the best of the others is
    the sync's own time."""
    from rayalign.training.weight_sync import share_parameters

    context = torch.multiprocessing.get_context("spawn")
    here, there = context.Pipe()
    process = context.Process(target=engine_process, args=(model, there))
    process.start()
    try:
        assert here.recv() == "ready"
        replies, seconds = [], []
        for i in range(repeats):
            started = time.perf_counter()
            here.send((share_parameters(module), rows if i == 0 else [], i == 0))
            replies.append(here.recv())
            seconds.append(time.perf_counter() - started)
        here.send(None)
    finally:
        process.join(120)
        if process.is_alive():
            process.kill()
    gb = sum(p.numel() * p.element_size() for p in module.parameters()) / 1e9
    return {"reply": replies[0], "seconds": seconds, "gb": gb,
            "seconds_per_gb": min(seconds[1:]) / gb, "engine_copy_seconds_per_gb": min(r["seconds"] for r in replies) / gb}


def check_ipc_sync(rank, model: str, saved: Path, rows_per_language: int, out_dir: Path) -> dict:
    from rayalign.actors.rl_trainer import PolicyTrainer
    from rayalign.config import TrainingConfig
    from rayalign.engines.hf import HFEngine

    rows = score_rows(rows_per_language)
    tiny = sync_by_ipc(rank.engine.module, model, rows, 3)
    expected = param_hashes(rank.engine.module)
    equal = sum(tiny["reply"]["hashes"].get(k) == v for k, v in expected.items())
    reference = [r.logp for r in HFEngine(str(saved), dtype="float32", device="cuda", batch_size=32).score(rows, layers=[1])]
    reply = tiny["reply"]
    gap = max(abs(a - b) / n for a, b, n in zip(reply["logp"], reference, reply["tokens"]))
    # a ~100M-parameter Llama (random weights) through the same trainer setup, for seconds per GB
    sys.path.insert(0, str(REPO / "benchmarks"))
    from weight_sync import build_100m

    big = build_100m(out_dir / "llama-100m", model)
    t = TrainingConfig(lr=1e-4, micro_batch_size=1, world_size=1, zero_stage=2, num_gpus=1, warmup_ratio=0.0)
    policy = ready_rank(PolicyTrainer, big, t)
    policy.prepare(1, big)
    large = sync_by_ipc(policy.engine.module, big, [], 3)
    big_expected = param_hashes(policy.engine.module)
    big_equal = sum(large["reply"]["hashes"].get(k) == v for k, v in big_expected.items())
    out = {"tiny_params_equal": f"{equal}/{len(expected)}", "tiny_score_gap_vs_saved_per_token_max": gap,
           "tiny_gb": tiny["gb"], "tiny_push_seconds": tiny["seconds"], "tiny_seconds_per_gb": tiny["seconds_per_gb"],
           "llama100m_params": sum(p.numel() for p in policy.engine.module.parameters()),
           "llama100m_params_equal": f"{big_equal}/{len(big_expected)}", "llama100m_gb": large["gb"],
           "llama100m_push_seconds": large["seconds"], "llama100m_seconds_per_gb": large["seconds_per_gb"],
           "llama100m_engine_copy_seconds_per_gb": large["engine_copy_seconds_per_gb"]}
    out["pass"] = equal == len(expected) and big_equal == len(big_expected) and gap < 1e-5
    return out


def nccl_member(rank: int, port: int, conn) -> None:
    from rayalign.training.weight_sync import broadcast, join_group

    try:
        group = join_group("127.0.0.1", port, rank, 2, timeout_s=60)
        tensor = torch.full((1 << 18,), 1.0 if rank == 0 else 0.0, device="cuda")
        broadcast(group, tensor)
        torch.cuda.synchronize()
        conn.send(("received", float(tensor.sum())))
    except Exception as error:  # what NCCL says is the finding
        conn.send(("refused", f"{type(error).__name__}: {' '.join(str(error).split())[:500]}"))


def check_nccl_one_gpu(timeout_s: float = 90.0) -> dict:
    context = torch.multiprocessing.get_context("spawn")
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    pipes = [context.Pipe() for _ in range(2)]
    members = [context.Process(target=nccl_member, args=(r, port, pipes[r][1])) for r in range(2)]
    for m in members:
        m.start()
    results, deadline = [], time.monotonic() + timeout_s
    for here, _ in pipes:
        results.append(here.recv() if here.poll(max(0.0, deadline - time.monotonic())) else ("no answer", f"{timeout_s} s"))
    for m in members:
        m.join(5)
        if m.is_alive():
            m.kill()
    return {"nccl_version": ".".join(map(str, torch.cuda.nccl.version())), "rank0": results[0], "rank1": results[1]}


def guarded(check, *args) -> dict:
    """A check's report, or its error as the report (so that the checks after it still run)."""
    import traceback

    try:
        return check(*args)
    except Exception:
        return {"pass": False, "error": traceback.format_exc()[-3000:]}


def check_rl_policy(model: str, rows: int, num_gpus: int = 1) -> dict:
    ray_stand_in()
    from rayalign.actors.rl_trainer import PolicyTrainer
    from rayalign.config import TrainingConfig
    from rayalign.engines.hf import HFEngine
    from rayalign.models import encode_response

    requests = score_rows(rows)[:8]
    t = TrainingConfig(loss=None, lr=1e-2, micro_batch_size=4, gradient_accumulation=2, world_size=1, zero_stage=2,
                       num_gpus=num_gpus, warmup_ratio=0.0)
    rank = ready_rank(PolicyTrainer, model, t)
    rank.prepare(2, model)
    sequences = [encode_response(rank.tokenizer, r.messages, r.response) for r in requests]
    stats = sorted(rank.rollout_stats(sequences), key=lambda s: s["row"])
    scored = HFEngine(model, dtype="float32", device="cpu", batch_size=8).score(requests)
    assert [len(s["logp"]) for s in stats] == [r.num_tokens for r in scored], "token counts differ"
    gaps = [abs(sum(s["logp"]) - r.logp) / r.num_tokens for s, r in zip(stats, scored)]
    old, ref = [s["logp"] for s in stats], [s["ref_logp"] for s in stats]
    advantages = [1.0, -1.0] * 4
    first = rank.update(sequences, advantages, old, ref, 0.0, "k3", 1e-3)
    second = rank.update(sequences, advantages, old, ref, 0.0, "k3", 1e-3)
    out = {"rollouts": len(sequences), "bf16_cuda_vs_fp32_cpu_logp_per_token_mean": sum(gaps) / len(gaps),
           "bf16_cuda_vs_fp32_cpu_logp_per_token_max": max(gaps), "first_update": first, "second_update": second}
    out["pass"] = (out["bf16_cuda_vs_fp32_cpu_logp_per_token_mean"] < 0.05 and first["approx_kl"] < 1e-3
                   and first["clip_fraction"] == 0.0 and second["approx_kl"] > 1e-4 and second["clip_fraction"] > 0
                   and all(math.isfinite(v) for v in (first["policy_loss"], second["policy_loss"])))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--pairs", required=True)
    parser.add_argument("--out", default="cuda-check")
    parser.add_argument("--rows-per-language", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    import transformers

    report["transformers"] = transformers.__version__
    print("scoring: HF engine, bf16 vs fp32")
    report["scoring"] = guarded(check_scoring, args.model, args.rows_per_language)
    print(json.dumps(report["scoring"], indent=1))
    print("DeepSpeed ZeRO-2 trainer rank on CUDA")
    report["zero2"] = guarded(check_zero2, args.model, args.pairs, out_dir, args.steps)
    print(json.dumps(report["zero2"], indent=1))
    print("online weight sync by CUDA IPC, trainer rank -> HF engine process on the same GPU")
    report["ipc_sync"] = guarded(lambda *a: check_ipc_sync(check_zero2.rank, *a), args.model, out_dir / "zero2-policy",
                                 args.rows_per_language, out_dir)
    print(json.dumps(report["ipc_sync"], indent=1))
    print("NCCL weight-sync group, two processes on one GPU")
    report["nccl_one_gpu"] = guarded(check_nccl_one_gpu)
    print(json.dumps(report["nccl_one_gpu"], indent=1))
    print("online policy rank on CUDA: two PPO updates on one rollout batch")
    report["rl_policy"] = guarded(check_rl_policy, args.model, args.rows_per_language)
    print(json.dumps(report["rl_policy"], indent=1))
    (out_dir / "cuda_check.json").write_text(json.dumps(report, indent=1))
    ok = all(report[k]["pass"] for k in ("scoring", "zero2", "ipc_sync", "rl_policy"))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
