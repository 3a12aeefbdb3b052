"""One step off the policy (online.async_train): the next step's rollouts are generated while a step trains, and
the ratio uses the generating engine's log-probs."""

import json

import numpy as np
import pytest

from conftest import REPO
from rayalign.config import load_config


def test_engine_token_logps_equal_a_plain_forward(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from rayalign.engines.hf import HFEngine
    from rayalign.models import encode_response, load_tokenizer

    tok = load_tokenizer(tiny_model)
    sequences = [encode_response(tok, [{"role": "user", "content": q}], a)
                 for q, a in [("Hi", "Hello there, friend"), ("Hallo", "Guten Tag"), ("Hola", "Buenas")]]
    got = HFEngine(tiny_model, dtype="float32", device="cpu", batch_size=2).token_logps(sequences)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        for (prompt, response), row in zip(sequences, got):
            logits = model(torch.tensor([prompt + response])).logits[0].double()
            expected = [float(torch.log_softmax(logits[len(prompt) - 1 + i], -1)[t]) for i, t in enumerate(response)]
            assert row == pytest.approx(expected, abs=1e-4)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("stage") == "online"]


@pytest.mark.slow
def test_one_step_off_policy_lags_the_ratio_and_resumes(ray_session, tiny_model, tmp_path):
    """One update per step (one epoch, one mini-batch): synchronous, the ratio of that update is exactly 1. One step
    off, step 1's rollouts come from the starting weights (ratio 1 up to the engine's and the trainer's rounding),
    but from step 2 on a step trains on rollouts of the policy one update behind, so the first epoch's ratios leave
    1. A relaunch after step 2's checkpoint trains step 3 on the rollouts saved with it: equal rollouts, policy
    within 1e-6."""
    import shutil

    from safetensors.numpy import load_file

    from rayalign.data.store import read_dataset
    from rayalign.pipelines import online

    cfg = load_config(REPO / "examples" / "online-grpo-quickstart.yaml", [
        f"policy.path={tiny_model}", "languages=[en,de]", "online.steps=3", "online.checkpoint_every=2",
        "online.prompts_per_step=1", "online.async_train=true", "training.lr=1.0e-3"])
    run_dir = online.run(cfg, tmp_path / "run")
    steps = metrics(run_dir)
    assert [s["step"] for s in steps] == [1, 2, 3]
    for s in steps:
        assert {"reward_mean", "kl", "clip_fraction", "entropy", "approx_kl", "grad_norm", "seconds_generate",
                "seconds_train", "seconds_sync"} <= set(s)
    assert steps[0]["approx_kl"] < 1e-9
    assert min(s["approx_kl"] for s in steps[1:]) > 1e3 * max(steps[0]["approx_kl"], 1e-12)
    assert (run_dir / "online" / "train.ckpt" / json.loads((run_dir / "state.json").read_text())
            ["online_checkpoint"]["policy"]["tag"] / "rollouts-next.parquet").is_file()
    expected_rollouts = read_dataset(run_dir / "online" / "step-0003", "rollouts")
    expected_policy = load_file(run_dir / "online" / "policy" / "model.safetensors")

    state = json.loads((run_dir / "state.json").read_text())
    state["finished"].remove("online/step-3")  # as if killed during step 3, after step 2's checkpoint
    (run_dir / "state.json").write_text(json.dumps(state))
    shutil.rmtree(run_dir / "online" / "policy")
    online.run(cfg, run_dir)
    assert read_dataset(run_dir / "online" / "step-0003", "rollouts").equals(expected_rollouts)
    resumed = load_file(run_dir / "online" / "policy" / "model.safetensors")
    assert max(float(np.abs(resumed[k] - expected_policy[k]).max()) for k in resumed) <= 1e-6
    assert [s["step"] for s in metrics(run_dir)] == [1, 2, 3]
    assert metrics(run_dir)[2]["approx_kl"] == pytest.approx(steps[2]["approx_kl"], rel=1e-3)
