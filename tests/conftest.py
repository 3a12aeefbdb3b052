"""Shared fixtures: one tiny model and one Ray instance per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROMPTS_DIR = REPO / "examples" / "data" / "prompts"

# Pure modules (no Ray, no model, no subprocess): `pytest -m unit` runs them in seconds.
UNIT_MODULES = {"test_config", "test_estimate", "test_judge", "test_losses", "test_pairs", "test_planner",
                "test_progress", "test_prompts", "test_slices", "test_report", "test_rewards_consistency",
                "test_rewards_implicit", "test_rewards_latent", "test_rl_losses", "test_store", "test_weight_sync",
                "test_layout", "test_paper_recipes"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rpartition(".")[2] in UNIT_MODULES:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """The tiny Llama chat model, built from the bundled corpus with a short training run."""
    from rayalign.models import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-model"), PROMPTS_DIR, train_steps=40))


@pytest.fixture(scope="session")
def ray_session():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_tracked_run(ray_session, tiny_model, tmp_path_factory) -> Path:
    """Two small iterations of the quickstart through offline.run, with W&B (offline: no network) and TensorBoard
    on. Shared and only read: test_tracking checks what the trackers hold, test_datasets_cache loads its datasets
    as one of its two runs (one run fewer for the session)."""
    import importlib.util

    from rayalign.config import load_config
    from rayalign.pipelines import offline

    trackers = all(importlib.util.find_spec(m) for m in ("wandb", "tensorboard"))  # else test_tracking skips
    cfg = load_config(REPO / "examples" / "quickstart.yaml", [
        f"policy.path={tiny_model}", "languages=[en,de]", "prompts.limit=4", "sampling.n=2", "sampling.max_new_tokens=8",
        "engines.count=1", "rewards.actors=1", "training.micro_batch_size=2", "training.gradient_accumulation=1",
        *(["logging.tensorboard=true", "logging.wandb.project=tests", "logging.wandb.mode=offline"] if trackers
          else ["logging.tensorboard=false"])])
    with pytest.MonkeyPatch.context() as env:  # as test_tracking's wandb_offline, whichever test asks first
        env.setenv("WANDB_MODE", "offline")
        env.delenv("WANDB_DIR", raising=False)
        env.setenv("WANDB_SILENT", "true")
        return offline.run(cfg, tmp_path_factory.mktemp("tracked") / "run")


def write_one_sample_run(run_dir: Path) -> Path:
    """A run directory holding iter-1/samples with one row: enough for `rayalign inspect` to read the run."""
    import pyarrow as pa

    from rayalign.data.schemas import schema_for
    from rayalign.data.store import DatasetWriter

    writer = DatasetWriter(run_dir / "iter-1" / "samples", "samples", languages=["en"])
    writer.write_shard(0, pa.Table.from_pylist([{
        "prompt_id": "p0", "lang": "en", "messages": [{"role": "user", "content": "hi"}], "reference": None,
        "source": "test", "sample_idx": 0, "response": "hello", "num_tokens": 2, "finish_reason": "stop", "seed": 0,
        "policy": "tiny", "lang_detected": "en"}], schema=schema_for("samples")[1]))
    writer.finalize()
    return run_dir


def write_pairs_dataset(model_path: str, out_dir, languages=("en", "es", "de", "fr", "ru"), prompts: int = 8) -> str:
    """A pairs dataset made the way the pipeline makes one: chosen = the corpus answer in the prompt's language,
    rejected = its first three words; reference log-probs and token counts scored by the HF engine."""
    import json

    from rayalign.data.store import DatasetWriter
    from rayalign.data.schemas import schema_for
    from rayalign.engines import ScoreRequest
    from rayalign.engines.hf import HFEngine
    import pyarrow as pa

    engine = HFEngine(model_path, dtype="float32", device="cpu", batch_size=16)
    rows = []
    for lang in languages:
        lines = (PROMPTS_DIR / f"{lang}.jsonl").read_text(encoding="utf-8").splitlines()[:prompts]
        for line in lines:
            r = json.loads(line)
            prompt = [{"role": "user", "content": r["instruction"]}]
            chosen, rejected = r["output"], " ".join(r["output"].split()[:3])
            rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}], "prompt_id": r["instruction_id"],
                         "lang": lang, "score_chosen": 1.0, "score_rejected": 0.0, "method": "lacomsa",
                         "iteration": 1})
    scored = engine.score([ScoreRequest(r["prompt"], r[side][0]["content"]) for side in ("chosen", "rejected")
                           for r in rows])
    n = len(rows)
    for i, r in enumerate(rows):
        r |= {"ref_logp_chosen": scored[i].logp, "ref_logp_rejected": scored[n + i].logp,
              "chosen_num_tokens": scored[i].num_tokens, "rejected_num_tokens": scored[n + i].num_tokens}
    writer = DatasetWriter(out_dir, "pairs", languages=list(languages), description="test pairs")
    writer.write_shard(0, pa.Table.from_pylist(rows, schema=schema_for("pairs")[1]))
    writer.finalize(expected_shards=1)
    return str(out_dir)


@pytest.fixture(scope="session")
def pairs_dataset(tiny_model, tmp_path_factory) -> str:
    return write_pairs_dataset(tiny_model, tmp_path_factory.mktemp("pairs") / "pairs")


def checkpoint_recorded(run_dir: Path, key: str = "iter-1/train.ckpt") -> bool:
    """Whether the run's state records a training checkpoint under `key`: only then will a relaunch resume from
    it (a checkpoint written but not yet recorded is set aside)."""
    from rayalign.run_dir import read_state

    return key in (read_state(run_dir) or {}).get("checkpoints", {})
