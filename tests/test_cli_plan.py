"""`rayalign plan`, `launch --dry-run` / `--allow-mismatch` / plan.json, and `submit`, through click's CliRunner.

Nothing here starts Ray: launch's connect and pipeline are replaced by recorders.
"""

import json

import pytest
from click.testing import CliRunner

from conftest import REPO
from rayalign.cli import main

LACOMSA = str(REPO / "examples" / "lacomsa-llama3-8b.yaml")
QUICKSTART = str(REPO / "examples" / "quickstart.yaml")
SEVENTY_B = "policy.path=meta-llama/Meta-Llama-3-70B-Instruct"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def no_run(monkeypatch):
    """launch's connect and pipeline, recorded instead of run."""
    import rayalign.cluster
    import rayalign.cluster.spec
    from rayalign.pipelines import offline

    calls = {}
    monkeypatch.setattr(rayalign.cluster, "connect", lambda spec, address=None, allow_mismatch=False: calls.update(
        connect={"spec": spec.name, "address": address, "allow_mismatch": allow_mismatch}))
    monkeypatch.setattr(rayalign.cluster.spec, "running_cluster_spec", lambda spec: spec)
    monkeypatch.setattr(offline, "run", lambda cfg, run_dir, **kwargs: calls.update(run=kwargs) or run_dir)
    return calls


def test_plan_prints_the_table():
    result = invoke("plan", "--cluster", "a100x64", LACOMSA)
    assert result.exit_code == 0, result.output
    for text in ("lacomsa-llama3-8b on a100x64", "64 x vllm engine", "16.1 weights", "426,784 KV tokens",
                 "64 x scorer", "8 x trainer rank", "generate: 64 of 64 GPUs (100%)",
                 "policy: princeton-nlp/Llama-3-Base-8B-SFT-DPO (8.03B parameters"):
        assert text in result.output, text


def test_plan_refusal_exits_2_with_the_reason():
    result = invoke("plan", "--cluster", "a100x8", LACOMSA, "-o", SEVENTY_B)
    assert result.exit_code == 2
    assert "141 GB of weights per GPU" in result.output and "engines.tensor_parallel_size >= 2" in result.output


def test_plan_json_is_what_launch_saves():
    result = invoke("plan", "--cluster", "h200x8", "--json", LACOMSA)
    assert result.exit_code == 0, result.output
    saved = json.loads(result.output)
    assert saved["cluster"]["gpu_memory_gb"] == 141 and saved["phases"][0]["role"] == "vllm engine"


def test_launch_dry_run_prints_the_plan_and_starts_nothing(tmp_path, no_run):
    result = invoke("launch", "--dry-run", "--cluster", "a100x64", LACOMSA, "--run-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "64 x vllm engine" in result.output
    assert no_run == {} and not (tmp_path / "run").exists()
    refused = invoke("launch", "--dry-run", "--cluster", "local", LACOMSA)
    assert refused.exit_code == 2 and "engines.num_gpus is 1 but cluster local has no GPUs" in refused.output


def test_launch_saves_plan_json_and_threads_allow_mismatch(tmp_path, no_run):
    run_dir = tmp_path / "run"
    result = invoke("launch", "--cluster", "a100x8", LACOMSA, "--run-dir", run_dir, "--address", "ray://head:10001",
                    "--allow-mismatch")
    assert result.exit_code == 0, result.output
    assert no_run["connect"] == {"spec": "a100x8", "address": "ray://head:10001", "allow_mismatch": True}
    assert no_run["run"] == {"cluster": "a100x8", "address": "ray://head:10001", "planned": True,
                             "preflighted": False}  # a Ray client: its models are checked where they load
    saved = json.loads((run_dir / "plan.json").read_text())
    assert saved["recipe"] == "lacomsa-llama3-8b" and saved["cluster"]["name"] == "a100x8"
    refused = invoke("launch", "--cluster", "a100x8", LACOMSA, "-o", SEVENTY_B, "--run-dir", tmp_path / "r2")
    assert refused.exit_code == 2 and not (tmp_path / "r2").exists()


def test_submit_builds_the_job(monkeypatch, tmp_path):
    import rayalign.cluster.submit

    submitted = {}

    def fake_submit(address, spec, wait=False, echo=print):
        submitted.update(address=address, spec=spec, wait=wait)
        echo("job log line\n")
        return "raysubmit_1", "SUCCEEDED"

    monkeypatch.setattr(rayalign.cluster.submit, "submit", fake_submit)
    result = invoke("submit", "--address", "http://head:8265", "--working-dir", tmp_path, "--pip", "rayalign[gpu]",
                    "--env", "HF_HOME=/data/hf", "--wait", "--", "launch", "--cluster", "a100x64", "my recipe.yaml")
    assert result.exit_code == 0, result.output
    assert "job log line" in result.output and "raysubmit_1: SUCCEEDED" in result.output
    assert submitted["spec"]["entrypoint"] == "rayalign launch --cluster a100x64 'my recipe.yaml'"
    assert submitted["spec"]["runtime_env"]["env_vars"] == {"HF_HOME": "/data/hf"} and submitted["wait"]
    bad = invoke("submit", "--env", "NOVALUE", "--", "config")
    assert bad.exit_code == 2 and "--env 'NOVALUE': expected KEY=VALUE" in bad.output
    for args, expected in [(["--address", "notaurl", "--", "config"], "the Ray dashboard's HTTP address"),
                           (["--address", "head:6379", "--", "config"], "not the host:6379 address"),
                           (["--", "rayalign", "plan", "x.yaml"], "'rayalign': not a rayalign command (drop the "
                                                                  "leading 'rayalign')"),
                           (["--", "nosuch"], "'nosuch': not a rayalign command")]:
        bad = invoke("submit", *args)
        assert bad.exit_code == 2 and expected in " ".join(bad.output.split()) and "Traceback" not in bad.output, args


def test_a_cpu_recipe_that_does_not_fit_exits_2_while_a_gpu_preview_exits_0():
    quickstart = REPO / "examples" / "quickstart.yaml"
    result = invoke("plan", "--cluster", "local", quickstart, "-o", "engines.count=100000")
    assert result.exit_code == 2 and "does not fit: generate: 100000 actors x 1 CPUs do not fit" in " ".join(
        result.output.split())
    preview = invoke("plan", "--cluster", "local", LACOMSA)
    assert preview.exit_code == 0 and "problem:" in preview.output


def test_launch_refuses_what_it_can_check_before_ray_starts(no_run, tmp_path):
    """More engines than the CPUs of a spec, a hub layer beyond the model's, or a reward file that fails to import
    were refused only after Ray had started and plan.json was written."""
    spec = tmp_path / "two.yaml"
    spec.write_text("name: two\nnodes: 1\ncpus_per_node: 2\ngpus_per_node: 0\ngpu_type: none\ngpu_memory_gb: 0\n"
                    "memory_gb_per_node: 16\n")
    reward = tmp_path / "reward.py"
    reward.write_text("import not_a_module_here\ndef reward(samples):\n    return [0.0] * len(samples)\n")
    run_dir = tmp_path / "run"
    for overrides, expected in ((["engines.count=5"], "generate: 5 actors x 1 CPUs do not fit on two: at most 2 per "
                                                      "node x 1 node(s) = 2; set engines.count <= 2"),
                                (["rewards.latent.hub_layer=99"], "rewards.latent.hub_layer: 99 is beyond the "
                                                                  "model's 4 layers"),
                                ([f"rewards.user.path={reward}"],
                                 "importing it raised ModuleNotFoundError")):
        result = invoke("launch", "--cluster", spec, QUICKSTART, "--run-dir", run_dir,
                        *[a for o in overrides for a in ("-o", o)])
        assert result.exit_code == 2 and expected in " ".join(result.output.split()), result.output
        assert "connect" not in no_run and not run_dir.exists()
