"""Cluster specs, the Ray-cluster check and the placement planner: pure, no Ray, no model built."""

import dataclasses
import json
import re

import pytest
import torch
import yaml

from conftest import REPO
from rayalign.cluster.model_info import MODELS_FILE, PlanError, count_parameters, model_info
from rayalign.cluster.phases import Shortfalls, plan_generation, zero_memory_gb
from rayalign.cluster.planner import plan, save_plan
from rayalign.cluster.spec import (
    ClusterError, check_cluster, load_cluster_spec, running_cluster_spec, shipped_specs,
)
from rayalign.config import TINY_MODEL, ConfigError, load_config

STUDIES = sorted(str(p.relative_to(REPO)) for p in (REPO / "examples").glob("*study*.yaml"))
RECIPES = sorted(str(p.relative_to(REPO)) for p in (REPO / "examples").glob("*.yaml") if str(p.relative_to(REPO))
                 not in STUDIES)
LLAMA3_8B = 8_030_261_248
LLAMA3_70B = 70_553_706_496
GOOD_SPEC = dict(name="mine", nodes=2, cpus_per_node=32, gpus_per_node=8, gpu_type="A100-80GB", gpu_memory_gb=80,
                 memory_gb_per_node=512)


def recipe(name, *overrides):
    return load_config(REPO / "examples" / name, overrides)


# ---- specs ----

def test_shipped_specs_load():
    assert {"local", "a100x8", "a100x64", "h100x16", "h200x8"} <= set(shipped_specs())
    assert "models" not in shipped_specs()
    shapes = {name: (s.nodes, s.gpus_per_node, s.gpu_memory_gb)
              for name in shipped_specs() if (s := load_cluster_spec(name))}
    assert shapes["a100x8"] == (1, 8, 80) and shapes["a100x64"] == (8, 8, 80)
    assert shapes["h100x16"] == (2, 8, 80) and shapes["h200x8"] == (1, 8, 141)
    for name in shipped_specs():
        spec = load_cluster_spec(name)
        assert spec.cpus_per_node >= 1 and spec.memory_gb_per_node > 0
    local = load_cluster_spec("local")
    assert local.nodes == 1 and "gpus_per_node" in local.auto_fields and "nodes" in local.auto_fields


def test_spec_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(GOOD_SPEC))
    spec = load_cluster_spec(str(path))
    assert spec.total_gpus == 16 and spec.source == str(path) and spec.auto_fields == ()


@pytest.mark.parametrize("change, message", [
    ({"nodes": 0}, "nodes: expected an integer from 1 to 100,000"),
    ({"nodes": "two"}, "nodes: expected an integer from 1 to 100,000"),
    ({"nodes": 10**9}, "nodes: expected an integer from 1 to 100,000"),
    ({"gpu_memory_gb": float("nan")}, "gpu_memory_gb: expected a number of GB from 0 to 1,024"),
    ({"gpu_memory_gb": float("inf")}, "gpu_memory_gb: expected a number of GB from 0 to 1,024"),
    ({"memory_gb_per_node": float("nan")}, "memory_gb_per_node: expected a number > 0"),
    ({"cpus_per_node": 2.5}, "cpus_per_node: expected an integer >= 1"),
    ({"gpus_per_node": -1}, "gpus_per_node: expected an integer >= 0"),
    ({"gpus_per_node": True}, "gpus_per_node: expected an integer >= 0"),
    ({"gpu_memory_gb": -80}, "gpu_memory_gb: expected a number of GB from 0 to 1,024"),
    ({"gpu_memory_gb": 81920}, "gpu_memory_gb: expected a number of GB from 0 to 1,024"),
    ({"memory_gb_per_node": 0}, "memory_gb_per_node: expected a number > 0"),
    ({"name": ""}, "name: expected a non-empty string"),
    ({"gpu_type": 100}, "gpu_type: expected a non-empty string"),
    ({"gpu_type": "none"}, "gpu_type: gpus_per_node is 8"),
    ({"gpu_memory_gb": 0}, "gpu_memory_gb: gpus_per_node is 8"),
    ({"gpus_per_node": 0}, "gpus_per_node: 0, but gpu_type 'A100-80GB'"),
    ({"gpus": 8}, "gpus: unknown key"),
    ({"memory_gb_per_node": None}, "memory_gb_per_node: expected a number > 0"),
    pytest.param({"gpu_type": "auto"}, "gpu_type: 'auto' reads the GPU of this machine, which has none",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="measures this machine's GPU")),
    pytest.param({"gpu_memory_gb": "auto"}, "gpu_memory_gb: 'auto' reads the GPU of this machine, which has none",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="measures this machine's GPU")),
])
def test_bad_spec_is_refused_naming_file_and_field(tmp_path, change, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**GOOD_SPEC, **change}))
    with pytest.raises(ClusterError) as e:
        load_cluster_spec(str(path))
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_spec_numbers_in_exponent_form_read_as_recipes_read_them(tmp_path):
    """YAML 1.1 reads 8e1 as text: recipes took it as 80.0, cluster specs refused it."""
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(GOOD_SPEC).replace("gpu_memory_gb: 80", "gpu_memory_gb: 8e1")
                    + "memory_gb_per_node: 1.5e3\n" * ("memory_gb_per_node" not in GOOD_SPEC))
    spec = load_cluster_spec(str(path))
    assert spec.gpu_memory_gb == 80.0
    path.write_text(yaml.safe_dump({**GOOD_SPEC, "cpus_per_node": "3e1"}))
    with pytest.raises(ClusterError, match="cpus_per_node: expected an integer >= 1"):  # counts stay integers
        load_cluster_spec(str(path))


def test_a_spec_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(yaml.safe_dump(GOOD_SPEC).replace("name:", "# caf\xe9\nname:").encode("latin-1"))
    with pytest.raises(ClusterError, match=f"{path}: not valid UTF-8"):
        load_cluster_spec(str(path))


def test_spec_file_problems(tmp_path):
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({k: v for k, v in GOOD_SPEC.items() if k != "gpu_memory_gb"}))
    with pytest.raises(ClusterError, match="gpu_memory_gb: missing key"):
        load_cluster_spec(str(missing))
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ClusterError, match="expected a mapping"):
        load_cluster_spec(str(tmp_path / "list.yaml"))
    with pytest.raises(ClusterError, match="unknown cluster 'nowhere'.*a100x64"):
        load_cluster_spec("nowhere")
    with pytest.raises(ClusterError, match="unknown cluster 'models'"):
        load_cluster_spec("models")


# ---- the Ray cluster against the spec ----

def ray_nodes(count, gpus, cpus=96, accelerator="A100", head=True):
    worker = {"CPU": cpus, "GPU": gpus, "memory": 900e9, **({f"accelerator_type:{accelerator}": 1} if gpus else {})}
    return [{"CPU": 8, "memory": 30e9}] * head + [dict(worker) for _ in range(count)]


def test_check_cluster_matches_and_mismatches(capsys):
    spec = load_cluster_spec("a100x64")
    assert check_cluster(spec, ray_nodes(8, 8)) == []  # the CPU-only head node is not one of the spec's nodes
    with pytest.raises(ClusterError) as e:
        check_cluster(spec, ray_nodes(2, 4, accelerator="H100"))
    message = str(e.value)
    assert "8 GPU nodes in the spec, 2 in the cluster" in message and "8 GPUs per node in the spec, 4" in message
    assert "GPU type A100-80GB in the spec, H100" in message and "--allow-mismatch" in message
    assert len(check_cluster(spec, ray_nodes(2, 4), allow_mismatch=True)) == 2
    assert "warning:" in capsys.readouterr().err
    # auto fields (the local spec) describe whatever runs them: nothing to compare
    assert check_cluster(load_cluster_spec("local"), ray_nodes(4, 2)) == []


def test_local_spec_takes_the_shape_of_the_joined_cluster():
    measured = running_cluster_spec(load_cluster_spec("local"), ray_nodes(4, 2, cpus=2, accelerator="H100"))
    assert (measured.nodes, measured.gpus_per_node, measured.cpus_per_node, measured.gpu_type) == (4, 2, 2, "H100")
    a100x8 = load_cluster_spec("a100x8")
    assert running_cluster_spec(a100x8, ray_nodes(1, 4)) is a100x8  # a fixed spec is kept as written
    # a CPU cluster whose head was started with --num-cpus=0: the head holds no actors and is not a node
    cpu_only = [{"CPU": 0, "memory": 30e9}] + ray_nodes(2, 0, cpus=2, head=False)
    measured = running_cluster_spec(load_cluster_spec("local"), cpu_only)
    assert (measured.nodes, measured.cpus_per_node, measured.gpus_per_node) == (2, 2, 0)


# ---- model sizes ----

@pytest.mark.parametrize("name", yaml.safe_load(MODELS_FILE.read_text()))
def test_models_yaml_parameters_match_the_architecture(name):
    entry = yaml.safe_load(MODELS_FILE.read_text())[name]
    assert count_parameters(entry) == entry["parameters"]


def test_llama3_8b_by_hand():
    # embeddings in and out: 2 x 128256 x 4096; per layer: q, o 4096^2 each, k, v 4096 x 1024 each,
    # MLP 3 x 4096 x 14336, two norms; 32 layers; final norm
    per_layer = 2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    assert 2 * 128256 * 4096 + 32 * per_layer + 4096 == LLAMA3_8B
    info = model_info("meta-llama/Meta-Llama-3-8B-Instruct")
    assert info.parameters == LLAMA3_8B and info.num_kv_heads == 8 and info.head_dim == 128
    assert info.kv_bytes_per_token(2) == 2 * 32 * 8 * 128 * 2  # K and V x layers x KV heads x head dim x bf16
    assert info.kv_bytes_per_token(2, tensor_parallel_size=16) == 2 * 32 * 1 * 128 * 2  # replicated past 8 ranks
    assert model_info("Qwen/Qwen2.5-7B-Instruct").parameters == 7_615_616_512
    assert model_info("meta-llama/Meta-Llama-3-70B-Instruct").parameters == LLAMA3_70B


def test_model_directory_is_read_from_config_and_safetensors_headers(tmp_path):
    import torch
    from safetensors.torch import save_file

    config = {"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 10,
              "intermediate_size": 16, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"a": torch.zeros(3, 5), "b": torch.zeros(7)}, tmp_path / "model.safetensors")
    info = model_info(str(tmp_path))
    assert info.parameters == 22 and info.dtype_bytes == 2 and info.head_dim == 4  # from the headers, exact
    (tmp_path / "model.safetensors").unlink()
    # without weights, from the config: 2 layers x (q, k, v, o 4 x 8 x 8 + gate, up, down 3 x 8 x 16 + 2 norms x 8)
    # + embeddings and an untied head 2 x 10 x 8 + the final norm 8
    assert model_info(str(tmp_path)).parameters == 2 * (4 * 8 * 8 + 3 * 8 * 16 + 16) + 2 * 10 * 8 + 8 == 1480


def test_tiny_model_is_sized_without_building_it(tmp_path, monkeypatch):
    import rayalign.models

    monkeypatch.setenv("RAYALIGN_CACHE", str(tmp_path))  # nothing cached here
    monkeypatch.setattr(rayalign.models, "build_tiny_model", lambda *a, **k: pytest.fail("built the model"))
    info = model_info(TINY_MODEL + "?train_steps=150")
    assert info.num_layers == 4 and info.hidden_size == 128 and 0.5e6 < info.parameters < 2e6


def test_unknown_model_is_a_plan_error():
    with pytest.raises(PlanError, match="nobody/unknown-13b: unknown model size.*models.yaml"):
        model_info("nobody/unknown-13b")


# ---- plans ----

@pytest.mark.parametrize("path", RECIPES)
def test_every_shipped_recipe_plans_on_a100x64_and_local(path):
    cfg = load_config(REPO / path)
    big = plan(cfg, load_cluster_spec("a100x64"))
    assert big.phases and big.problems == []
    for phase in big.phases:
        assert phase.actors >= 1 and 0 < phase.memory_gb["total"] <= (phase.capacity_gb or float("inf"))
    local = plan(cfg, load_cluster_spec("local"))
    assert all(p.device == "cpu" for p in local.phases)
    if "quickstart" in path:  # the tiny recipes run here as written
        assert local.problems == []
    json.dumps(big.to_dict())


def test_llama3_8b_memory_by_hand():
    result = plan(recipe("lacomsa-llama3-8b.yaml", "training.loss=dpo", "training.num_gpus=1",
                         "training.world_size=8", "training.zero_stage=2"), load_cluster_spec("a100x64"))
    generate, score, train = result.phases
    weights = LLAMA3_8B * 2 / 1e9  # 16.06 GB of bf16 weights at tensor parallel size 1
    assert weights == pytest.approx(16.06, abs=0.01) and generate.memory_gb["weights"] == pytest.approx(weights)
    kv_budget = 0.9 * 80 - weights  # vLLM takes 0.9 of the GPU; the rest of it after weights is KV cache
    assert generate.memory_gb["kv_cache"] == pytest.approx(kv_budget)
    assert f"{int(kv_budget * 1e9 // (2 * 32 * 8 * 128 * 2)):,} KV tokens" in generate.details  # 426,784
    assert generate.placement.startswith("SPREAD, 8 of 8 nodes") and "64 of 64 GPUs" in generate.placement
    assert score.memory_gb["weights"] == pytest.approx(weights)
    # ZeRO-2 over 8 ranks: bf16 weights 2 B/param whole, grads 2 and fp32 Adam + master 12 sharded
    assert train.memory_gb["weights"] + train.memory_gb["gradients"] + train.memory_gb["optimizer"] == \
        pytest.approx(LLAMA3_8B * (2 + 14 / 8) / 1e9)
    assert train.placement.startswith("PACK, 1 of 8 nodes")
    assert sum(zero_memory_gb(LLAMA3_8B, 8, 3).values()) == pytest.approx(LLAMA3_8B * 16 / 8 / 1e9)
    assert sum(zero_memory_gb(LLAMA3_8B, 8, 1).values()) == pytest.approx(LLAMA3_8B * (4 + 12 / 8) / 1e9)


def test_70b_at_tensor_parallel_1_is_refused_with_the_reason():
    with pytest.raises(PlanError) as e:
        plan(recipe("lacomsa-llama3-8b.yaml", "policy.path=meta-llama/Meta-Llama-3-70B-Instruct"),
             load_cluster_spec("a100x8"))
    assert "141 GB of weights per GPU" in e.value.reason and "> the 72 GB" in e.value.reason
    assert "engines.tensor_parallel_size >= 2" in e.value.suggestion
    tp2 = recipe("lacomsa-llama3-8b.yaml", "policy.path=meta-llama/Meta-Llama-3-70B-Instruct",
                 "engines.tensor_parallel_size=2", "engines.num_gpus=2", "engines.count=4", "rewards.actors=2",
                 "training.loss=null", "iterations=1")
    generate = plan_generation(tp2, load_cluster_spec("a100x8"), model_info(tp2.policy.path),
                               Shortfalls(load_cluster_spec("a100x8")))
    assert generate.memory_gb["weights"] == pytest.approx(LLAMA3_70B * 2 / 2 / 1e9)
    assert generate.gpus_per_actor == 2 and "STRICT_PACK bundle of 2 GPUs" in generate.placement
    # a scorer holds the 70B whole on one GPU (it was planned as split over rewards.num_gpus, which nothing did)
    with pytest.raises(PlanError) as e:
        plan(tp2, load_cluster_spec("a100x8"))
    assert e.value.reason.startswith("score: 1 model(s), 141 GB of weights") and "> 80 GB" in e.value.reason
    assert "a scorer holds its models whole on one GPU" in e.value.suggestion
    with pytest.raises(ConfigError, match=r"rewards.num_gpus: expected a value <= 1.0, got 4.0 \(GPUs per scoring "
                                          r"actor, at most 1: a scorer holds its models whole on one GPU"):
        recipe("lacomsa-llama3-8b.yaml", "rewards.num_gpus=4")


@pytest.mark.parametrize("overrides, spec, message", [
    (["engines.tensor_parallel_size=16", "engines.num_gpus=16"], "a100x8",
     "tensor_parallel_size 16 > 8 GPUs per node"),
    (["engines.tensor_parallel_size=3", "engines.num_gpus=3"], "a100x8",  # vLLM: 32 heads, 8 KV heads
     "set engines.tensor_parallel_size to one of 1, 2, 4, 8 (and engines.num_gpus to match)"),
    (["engines.tensor_parallel_size=6", "engines.num_gpus=6", "policy.path=Qwen/Qwen2.5-7B-Instruct"], "a100x8",
     "set engines.tensor_parallel_size to one of 1, 2, 4"),  # 28 heads, 4 KV heads: 8 does not divide 28
    (["engines.count=65"], "a100x64", "set engines.count <= 64"),
    (["rewards.actors=9"], "a100x8", "set rewards.actors <= 8"),
    (["engines.num_cpus=200"], "a100x8", "set engines.num_cpus <= 96"),
    (["training.loss=dpo", "training.num_gpus=1", "training.world_size=8", "training.zero_stage=0"], "a100x8",
     "raise training.zero_stage"),
])
def test_what_does_not_fit_is_refused(overrides, spec, message):
    with pytest.raises(PlanError, match=re.escape(message)):
        plan(recipe("lacomsa-llama3-8b.yaml", *overrides), load_cluster_spec(spec))


def test_memory_and_room_advice_names_only_what_is_left_to_change():
    """The 8B online recipe already has ZeRO-3 and gradient checkpointing: the advice names neither."""
    a100x8 = load_cluster_spec("a100x8")
    with pytest.raises(PlanError) as e:
        plan(recipe("online-grpo-llama3-8b.yaml", "training.world_size=1"), a100x8)
    assert e.value.suggestion == "raise training.world_size (now 1) or lower training.micro_batch_size (now 4)"
    with pytest.raises(PlanError) as e:
        plan(recipe("lacomsa-llama3-8b.yaml", "training.world_size=1", "training.zero_stage=2",
                    "training.micro_batch_size=1", "training.gradient_checkpointing=false",
                    "training.global_batch_size=null"), a100x8)
    assert e.value.suggestion == ("raise training.zero_stage (now 2), raise training.world_size (now 1) or set "
                                  "training.gradient_checkpointing=true")
    with pytest.raises(PlanError) as e:
        plan(recipe("online-grpo-llama3-8b.yaml", "engines.count=6"), a100x8)
    assert e.value.suggestion == ("lower engines.count (now 6, or set it to auto); lower training.world_size (now 4); "
                                  "or use a larger cluster")
    with pytest.raises(PlanError) as e:  # PPO: a critic per policy rank; 1 rank runs out of memory, 8 out of room
        plan(recipe("online-grpo-llama3-8b.yaml", "online.algorithm=ppo", "training.world_size=auto"), a100x8)
    assert "micro-batches of 4: 1, 2, 4, 5, 8 of 1-8 do; with 1 rank(s): train: 148 GB per GPU" in str(e.value)
    assert "with 8 rank(s): engines.count: auto leaves no room for an engine" in str(e.value)


def test_cpu_only_spec_previews_gpu_recipes_and_strict_refuses():
    local = load_cluster_spec("local")
    preview = plan(recipe("lacomsa-llama3-8b.yaml"), local)
    assert any("engines.num_gpus is 1 but cluster local has no GPUs" in p for p in preview.problems)
    with pytest.raises(PlanError, match="engines.num_gpus=0"):
        plan(recipe("lacomsa-llama3-8b.yaml"), local, strict=True)
    quickstart = plan(recipe("quickstart.yaml"), local, strict=True)
    assert quickstart.phase("generate").device == "cpu" and quickstart.phase("generate").actors == 2


def test_plan_table_and_saved_json(tmp_path):
    from rich.console import Console

    result = plan(recipe("icr-llama3-8b.yaml"), load_cluster_spec("h100x16"))
    console = Console(width=120, record=True)
    console.print(result.table())
    text = console.export_text()
    assert "vllm engine" in text and "reward_reference: princeton-nlp/Llama-3-Base-8B-SFT" in text
    path = save_plan(result, tmp_path / "run")
    saved = json.loads(path.read_text())
    assert saved["cluster"]["name"] == "h100x16" and [p["phase"] for p in saved["phases"]][:2] == ["generate", "score"]
    assert saved["models"]["policy"]["parameters"] == LLAMA3_8B
    other = tmp_path / "other"
    other.mkdir()
    (other / "state.json").write_text(json.dumps({"config_hash": "another", "finished": ["iter-1/generate"]}))
    assert save_plan(result, other) is None and not (other / "plan.json").exists()


def test_every_run_of_the_gpu_scaling_study_plans_on_one_a100_node():
    from rayalign.pipelines.study import expand, load_study

    runs = expand(load_study(REPO / "examples" / "scaling-study-llama3-8b.yaml"))
    assert len(runs) == 12
    for run in runs:
        assert plan(run.cfg, load_cluster_spec("a100x8")).problems == [], run.slug


def test_auto_counts_fill_a100x64_and_the_global_batch_caps_the_ranks():
    result = plan(recipe("lacomsa-llama3-8b.yaml"), load_cluster_spec("a100x64"))
    generate, score, train = result.phases
    assert (generate.actors, score.actors, train.actors) == (64, 64, 8)  # 8 nodes x 8 GPUs; 16 / 2 = 8 ranks
    assert result.config.training.gradient_accumulation == 1 and result.config.engines.count == 64
    assert "generate: 64 of 64 GPUs (100%)" in result.notes and "score: 64 of 64 GPUs (100%)" in result.notes
    assert ("train: 8 of 64 GPUs (12%); training.global_batch_size 16 / micro_batch_size 2 caps the ranks at 8"
            in result.notes)
    # without a global batch the ranks fill the cluster; with one of 24 at 2 per rank: the largest divisor of 12
    assert plan(recipe("lacomsa-llama3-8b.yaml", "training.global_batch_size=null"),
                load_cluster_spec("a100x64")).phase("train").actors == 64
    capped = plan(recipe("lacomsa-llama3-8b.yaml", "training.global_batch_size=24"), load_cluster_spec("a100x8"))
    assert capped.phase("train").actors == 6 and capped.config.training.gradient_accumulation == 2
    # tensor parallel engines: 2 GPUs each -> 4 per node
    tp2 = plan(recipe("lacomsa-llama3-8b.yaml", "engines.tensor_parallel_size=2", "engines.num_gpus=2"),
               load_cluster_spec("a100x64"))
    assert tp2.phase("generate").actors == 32 and "generate: 64 of 64 GPUs (100%)" in tp2.notes


def test_fixed_counts_that_leave_the_cluster_idle_are_named():
    result = plan(recipe("lacomsa-llama3-8b.yaml", "engines.count=8", "rewards.actors=8", "cluster.schedule=barrier"),
                  load_cluster_spec("a100x64"))
    assert ("generate: 8 of 64 GPUs (12%); most of the cluster idles in this phase: set engines.count: auto to fill it"
            in result.notes)
    assert any(n.startswith("score: 8 of 64 GPUs (12%); most of the cluster idles") for n in result.notes)
    streamed = plan(recipe("lacomsa-llama3-8b.yaml", "engines.count=8", "rewards.actors=8"),  # auto: side by side
                    load_cluster_spec("a100x64"))
    assert ("generate + score: 16 of 64 GPUs (25%); most of the cluster idles in this phase: set engines.count: auto "
            "and rewards.actors: auto to fill it") in streamed.notes


def test_auto_counts_on_cpus_and_online_engines_fill_what_training_leaves():
    from rayalign.cluster.planner import resolve_counts
    from rayalign.cluster.spec import ClusterSpec

    spec = ClusterSpec(name="cpu", nodes=2, cpus_per_node=8, gpus_per_node=0, gpu_type="", gpu_memory_gb=0,
                       memory_gb_per_node=32)
    cfg = resolve_counts(load_config(None, ["engines.count=auto", "engines.num_cpus=2", "rewards.actors=auto",
                                            "rewards.num_cpus=3", "training.world_size=auto"]), spec)
    assert (cfg.engines.count, cfg.rewards.actors, cfg.training.world_size) == (8, 4, 16)
    # online: every role at once; 16 CPUs - 2 policy ranks x 2 - 2 critic ranks x 2 - 1 scorer x 3 = 5: 2 engines of 2
    online = ["mode=online", "online.algorithm=ppo", "online.score_weight=1", "rewards.latent.enabled=true",
              "training.world_size=2", "training.num_cpus=2", "rewards.actors=1", "rewards.num_cpus=3",
              "engines.num_cpus=2"]
    assert resolve_counts(load_config(None, online + ["engines.count=auto"]), spec).engines.count == 2
    # scorers auto: the count whose estimated step is fastest among those that fit beside the other roles
    chosen = resolve_counts(load_config(None, online + ["rewards.actors=auto", "engines.count=auto"]), spec)
    fitting = {}
    for scorers in range(1, 6):
        trial = plan(load_config(None, online + [f"rewards.actors={scorers}", "engines.count=auto"]), spec)
        if not trial.problems:
            fitting[scorers] = trial.estimate["iteration_seconds"]
    assert set(fitting) == {1, 2} and chosen.rewards.actors == min(fitting, key=fitting.get)
    # no room left: on GPUs refused; on CPUs one engine, and the plan names what does not fit side by side
    with pytest.raises(PlanError, match="leaves no room for an engine: the other online roles use 8 of 8 GPUs"):
        resolve_counts(load_config(None, ["mode=online", "engines.count=auto", "engines.num_gpus=1",
                                          "training.world_size=8", "training.num_gpus=1"]), load_cluster_spec("a100x8"))
    crowded = load_config(None, online + ["engines.count=auto", "training.world_size=3", "online.prompts_per_step=3"])
    assert resolve_counts(crowded, spec).engines.count == 1
    with pytest.raises(PlanError, match=r"need 17 CPUs; the cluster has 16 \(cpu\)"):
        plan(crowded, spec, strict=True)


def test_host_memory_advice_names_real_keys(tmp_path):
    import re

    from rayalign.config import describe_fields

    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(dict(name="small", nodes=1, cpus_per_node=8, gpus_per_node=0, gpu_memory_gb=0,
                                        gpu_type="none", memory_gb_per_node=0.05)))
    problems = plan(recipe("quickstart.yaml"), load_cluster_spec(str(path))).problems
    advised = [m.group(1) for p in problems for m in re.finditer(r"lower ([\w.]+)", p)]
    assert "training.micro_batch_size" in advised and "rewards.batch_size" in advised
    keys = {key for key, _, _ in describe_fields()}
    assert set(advised) <= keys, set(advised) - keys


def test_online_auto_trainer_ranks_take_the_fastest_estimated_step_that_fits():
    """a100x8, online GRPO on the 8B policy, 320 rollouts per step in micro-batches of 4: ranks must divide 80.
    Worked by hand from the estimate's figures (A100: 2,491 generated tokens/s per engine, 312 TFLOP/s x 0.3):
    generation 163,840 tokens = 65.8 engine-seconds; reward forwards (policy and reference, 2 x 2 x N x 168,096
    tokens) and training (6 x N x 168,096) = 10 x 8.03e9 x 168,096 / 9.36e13 = 144 rank-seconds. One rank cannot
    hold ZeRO-3 states and a reference; 8 ranks leave no engine. Per step: 2 ranks 65.8 / 6 + 144 / 2 = 83 s,
    4 ranks 16.4 + 36.1 = 52.5 s, 5 ranks 21.9 + 28.8 = 50.8 s: 5 ranks and 3 engines."""
    result = plan(recipe("online-grpo-llama3-8b.yaml", "training.world_size=auto"), load_cluster_spec("a100x8"))
    assert result.phase("train").actors == 5 and result.phase("generate").actors == 3
    assert result.estimate["iteration_seconds"] == pytest.approx(50.8, abs=0.3)
    explicit = plan(recipe("online-grpo-llama3-8b.yaml", "training.world_size=4"), load_cluster_spec("a100x8"))
    assert result.estimate["iteration_seconds"] < explicit.estimate["iteration_seconds"]
    # micro-batches of 7 cannot split 320 rollouts whatever the ranks: that is the refusal
    with pytest.raises(PlanError, match=r"must be a multiple of training.micro_batch_size x training.world_size = 7"):
        plan(recipe("online-grpo-llama3-8b.yaml", "training.world_size=auto", "training.micro_batch_size=7"),
             load_cluster_spec("a100x8"))
    # every rank count that divides 320 / 4 = 80 leaves no room beside 8 fixed engines: refused with the counts
    with pytest.raises(PlanError, match=r"training.world_size: auto: no count fits a100x8 beside the other online "
                                        r"roles \(engines.count 8, rewards.actors 1\)"):
        plan(recipe("online-grpo-llama3-8b.yaml", "training.world_size=auto", "engines.count=8"),
             load_cluster_spec("a100x8"))


def test_online_auto_scorers_on_a_gpu_cluster_take_the_fastest_count_of_cpu_scorers():
    """CPU scorers on a100x8 (96 CPUs) beside GPU engines and ranks: the count is bounded by CPUs, not GPUs, and
    the choice is the fastest of an exhaustive scan of explicit counts."""
    scored = ["online.score_weight=0.5", "rewards.latent.enabled=true", "rewards.latent.hub_layer=16"]
    spec = load_cluster_spec("a100x8")
    chosen = plan(recipe("online-grpo-llama3-8b.yaml", *scored, "rewards.actors=auto"), spec)
    seconds = {}
    for scorers in range(1, 97):
        try:
            trial = plan(recipe("online-grpo-llama3-8b.yaml", *scored, f"rewards.actors={scorers}"), spec)
        except PlanError:  # host memory
            continue
        if not trial.problems:
            seconds[scorers] = trial.estimate["iteration_seconds"]
    assert chosen.phase("score").actors == min(seconds, key=seconds.get) > 8
    assert chosen.estimate["iteration_seconds"] == pytest.approx(min(seconds.values()))


def test_online_auto_ranks_keep_a_global_batch_in_whole_accumulation_steps():
    result = plan(recipe("online-grpo-llama3-8b.yaml", "training.world_size=auto", "training.global_batch_size=16"),
                  load_cluster_spec("a100x8"))
    t = result.config.training
    assert t.world_size == 4 and t.micro_batch_size * t.gradient_accumulation * t.world_size == 16
    assert result.phase("generate").actors == 4


def test_online_mini_batches_are_checked_by_plan_and_set_the_accumulation():
    """40 rollouts (2 prompts x 5 languages x n=4): a mini-batch of 20 on 1 rank of micro-batches of 4 is 5
    accumulation steps, on 5 ranks 1; 7 does not divide 40, and 20 does not hold whole micro-batches of 8 on 1 rank.
    `rayalign plan` refuses both (before, only the launch did, after printing a plan)."""
    cfg = recipe("online-grpo-quickstart.yaml", "online.mini_batch_size=20", "training.micro_batch_size=4")
    assert cfg.online_training(40).gradient_accumulation == 5 and cfg.online_training(40).loss is None
    five = recipe("online-grpo-quickstart.yaml", "online.mini_batch_size=20", "training.micro_batch_size=4",
                  "training.world_size=5")
    assert five.online_training(40).gradient_accumulation == 1
    assert recipe("online-grpo-quickstart.yaml").online_training(40).gradient_accumulation == 5  # 40 / 8
    for overrides, expected in ((["online.mini_batch_size=7"], "online.mini_batch_size: 7 does not divide a step's "
                                 "rollout (2 prompts x 5 languages x n=4 = 40 samples); choose a divisor, or change "
                                 "online.prompts_per_step or sampling.n"),
                                (["online.mini_batch_size=20"], "must be a multiple of training.micro_batch_size x "
                                 "training.world_size = 8; change online.mini_batch_size, training.micro_batch_size"),
                                (["sampling.n=3"], "x n=3 = 30 samples)) must be a multiple of training.micro_batch_size"
                                 " x training.world_size = 8; change online.mini_batch_size (unset: the whole step, so "
                                 "online.prompts_per_step or sampling.n)")):
        for counts in ([], ["training.world_size=auto"]):
            with pytest.raises(PlanError, match=re.escape(expected)):
                plan(recipe("online-grpo-quickstart.yaml", *overrides, *counts), load_cluster_spec("local"))


def test_a_run_with_auto_counts_resumes_under_the_recipe_that_made_it(tmp_path):
    """The relaunch check compared the recipe's `auto` with the counts the run recorded: "changed: rewards.actors
    (2 -> 'auto')", and a study counted its finished runs as failed."""
    from rayalign.cluster.planner import resolve_counts
    from rayalign.cluster.spec import ClusterSpec
    from rayalign.config.study import StudyRun
    from rayalign.pipelines.study import run_finished
    from rayalign.run_dir import RunConfigChanged, check_run_dir_config, prepare_run_dir, write_state

    spec = ClusterSpec(name="cpu", nodes=1, cpus_per_node=8, gpus_per_node=0, gpu_type="", gpu_memory_gb=0,
                       memory_gb_per_node=32)
    asked = load_config(None, ["rewards.actors=auto", "training.world_size=auto", "training.global_batch_size=8",
                               "training.micro_batch_size=1", "iterations=1"])
    resolved = resolve_counts(asked, spec)
    assert (resolved.rewards.actors, resolved.training.world_size, resolved.training.gradient_accumulation) == (8, 8, 1)
    run_dir = tmp_path / "run"
    state = prepare_run_dir(resolved, run_dir)
    write_state(run_dir, {**state, "finished": ["iter-1/generate", "iter-1/summary"]})
    assert check_run_dir_config(asked, run_dir)["finished"] == ["iter-1/generate", "iter-1/summary"]
    assert run_finished(StudyRun(slug="r", params={}, overrides=[], run_dir=run_dir, cfg=asked))
    # resolved otherwise on this cluster: a change like any other
    smaller = resolve_counts(asked, dataclasses.replace(spec, cpus_per_node=4))
    with pytest.raises(RunConfigChanged, match=r"changed: .*rewards.actors \(8 -> 4\)"):
        check_run_dir_config(smaller, run_dir)


def test_online_roles_are_placed_node_by_node():
    """engines.count: auto filled the GPUs the other roles left in total: 60 engines beside 4 policy ranks of 48
    CPUs on a100x64, though those ranks take every CPU of 2 nodes (8 x 96 CPUs, 8 GPUs)."""
    a100x64 = load_cluster_spec("a100x64")
    result = plan(recipe("online-grpo-llama3-8b.yaml", "training.num_cpus=48"), a100x64)
    # 4 ranks of 48 CPUs fill 2 nodes' CPUs; 6 nodes x min(96 CPUs / 4, 8 GPUs) = 48 engines
    assert result.phase("generate").actors == 48
    assert "all roles: 52 of 64 GPUs (81%)" in result.notes
    with pytest.raises(PlanError) as e:
        plan(recipe("online-grpo-llama3-8b.yaml", "training.num_cpus=48", "engines.count=60"), a100x64)
    assert "need 64 GPUs and 432 CPUs, within the cluster's totals, but not node by node: one engine finds no " \
           "node with room" in e.value.reason
    assert plan(recipe("online-grpo-llama3-8b.yaml"), a100x64).phase("generate").actors == 60  # 8 CPUs a rank


@pytest.mark.parametrize("share, per_gpu", [(0.3, 3), (0.1, 10), (0.5, 2), (0.25, 4), (1.0, 1)])
def test_fractional_gpus_fill_the_cluster_as_ray_grants_them(share, per_gpu):
    """Ray takes a GPU fraction below 1 from one GPU: 0.3 GPU engines fit 3 per GPU, 24 on 8 GPUs. The auto count
    was 26 (7.8 of 8 GPUs, 2 engines never placed), and 0.1 gave 80 then refused its own count (8 // 0.1 = 79)."""
    from rayalign.cluster.schedule import first_fit
    from rayalign.cluster.spec import load_cluster_spec

    spec = load_cluster_spec("a100x8")
    cfg = load_config(REPO / "examples" / "quickstart.yaml", [f"engines.num_gpus={share}", "engines.count=auto"])
    assert plan(cfg, spec).phase("generate").actors == 8 * per_gpu
    actor = ("engine", 1.0, share)
    assert first_fit([actor] * (8 * per_gpu), spec)[1] is None
    assert first_fit([actor] * (8 * per_gpu + 1), spec)[1] == "engine"
    free, _ = first_fit([("scorer", 1.0, 1.0), actor], spec)
    assert free[0][1] == pytest.approx([0.0, 1.0 - share] + [1.0] * 6)  # a whole GPU, then a fraction of the next
