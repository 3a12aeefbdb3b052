"""Online weight sync, seconds per GB of parameters: through the driver (the trainer's parameters gathered to
the driver, which puts them into the object store) against the trainer publishing them itself (the engines
fetch them from the trainer actor's object; the driver holds only a reference). Both push to K = 2 generation
actors, for the tiny model and a ~100M-parameter Llama built locally with random weights; the engines'
weights are checked equal to the trainer's after each sync.

    python benchmarks/weight_sync.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def build_100m(out: Path, tokenizer_dir: str) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def measure(model_path: str, repeats: int) -> dict:
    import ray

    from rayalign.actors.generator import GenerationGroup
    from rayalign.actors.rl_trainer import PolicyGroup
    from rayalign.config import ModelConfig, load_config

    cfg = load_config(None, [f"policy.path={model_path}", "engines.count=2", "training.micro_batch_size=1"])
    generators = GenerationGroup(model_path, ModelConfig(path=model_path), cfg.engines)
    trainer = PolicyGroup(model_path, ModelConfig(path=model_path), cfg.training)
    try:
        trainer.prepare(1, model_path)
        reference = trainer.parameters()
        gb = sum(v.nbytes for v in reference.values()) / 1e9
        times = {"driver": [], "direct": []}
        for _ in range(repeats):
            started = time.perf_counter()
            generators.update_weights(trainer.parameters())
            times["driver"].append(time.perf_counter() - started)
            started = time.perf_counter()
            generators.update_weights(trainer.publish_weights())
            times["direct"].append(time.perf_counter() - started)
        for weights in generators.weights():
            assert all(np.array_equal(weights[k], reference[k]) for k in reference), "engine weights differ"
    finally:
        generators.shutdown()
        trainer.shutdown()
    best = {k: min(v) for k, v in times.items()}
    return {"gb": gb, **{f"{k}_s": v for k, v in best.items()}, **{f"{k}_s_per_gb": v / gb for k, v in best.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import ray

    from rayalign.models import ensure_tiny_model

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    tiny = str(ensure_tiny_model())
    with tempfile.TemporaryDirectory() as tmp:
        models = {"tiny": tiny, "llama-100m": build_100m(Path(tmp) / "llama-100m", tiny)}
        print(f"{'model':<12} {'GB':>7} {'driver s':>9} {'direct s':>9} {'driver s/GB':>12} {'direct s/GB':>12} "
              f"{'speed-up':>9}")
        for name, path in models.items():
            r = measure(path, args.repeats)
            print(f"{name:<12} {r['gb']:7.3f} {r['driver_s']:9.3f} {r['direct_s']:9.3f} {r['driver_s_per_gb']:12.2f} "
                  f"{r['direct_s_per_gb']:12.2f} {r['driver_s'] / r['direct_s']:8.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
