"""The plan's time estimate: its arithmetic against hand-worked numbers, the table's lookup, and `rayalign inspect`
showing the estimate beside the measured time."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import REPO
from rayalign.cli import main
from rayalign.cluster import load_cluster_spec, plan
from rayalign.cluster.planner import PlanError
from rayalign.cluster.estimate import gpu_family, interpolate, load_table
from rayalign.config import load_config

LACOMSA = REPO / "examples" / "lacomsa-llama3-8b.yaml"
LLAMA3_8B = 8_030_261_248  # parameters (cluster/models.yaml)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_interpolation_is_log_log_between_sizes_and_one_over_parameters_beyond():
    table = {1: 10000, 8: 2500}
    assert interpolate(table, 8) == pytest.approx(2500)
    # 2B: a third of the way from 1 to 8 on a log scale: 10000 x (2500 / 10000)^(1/3) = 6299.605
    assert interpolate(table, 2) == pytest.approx(6299.605, rel=1e-6)
    assert interpolate(table, 16) == pytest.approx(1250)  # 2500 x 8 / 16
    assert interpolate(table, 0.5) == pytest.approx(20000)  # 10000 x 1 / 0.5


def test_gpu_families_name_the_table_rows():
    assert gpu_family("A100-80GB") == gpu_family("NVIDIA A100-SXM4-80GB") == "A100"
    assert gpu_family("H200-141GB") == "H200" and gpu_family("none") == "cpu"
    table = load_table()
    for family in ("A100", "H100", "H200", "cpu"):
        assert family in table["generation_tokens_per_s"] and family in table["device_tflops"]


@pytest.fixture
def prompts(tmp_path):
    """10 prompt ids in en and de, each instruction 400 characters: 100 tokens at 4 characters a token."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt_id": f"p{i}", "lang": lang, "instruction": "x" * 400}) + "\n"
                            for i in range(10) for lang in ("en", "de")))
    return path


def eight_gpu_recipe(prompts, *more):
    return load_config(LACOMSA, [f"prompts.path={prompts}", "languages=[en,de]", "sampling.n=4",
                                 "sampling.max_new_tokens=100", "engines.count=8", "rewards.actors=8",
                                 "training.world_size=8", "training.global_batch_size=null",
                                 "training.max_length=1024", "iterations=3", *more])


def test_estimate_per_phase_against_hand_worked_numbers(prompts):
    cfg = eight_gpu_recipe(prompts, "cluster.generation_tokens_per_s=1000", "cluster.device_tflops=100",
                           "cluster.efficiency=0.5", "cluster.startup_seconds=10")
    result = plan(cfg, load_cluster_spec("a100x8"))
    assert result.models["policy"].parameters == LLAMA3_8B
    est = result.estimate
    assert est["prompt_rows"] == 20 and est["prompt_tokens"] == 100
    busy = {phase: v["busy"] for phase, v in est["phases"].items()}
    # generate: 20 rows x 4 samples x 100 tokens = 8000 tokens over 8 engines x 1000 tokens/s
    assert busy["generate"] == pytest.approx(1.0)
    # score: 2 x 8,030,261,248 x (80 samples x (100 + 100) tokens) = 2.56968359936e14 FLOPs
    #        over 8 scorers x 1 GPU x 100e12 FLOP/s x 0.5 = 4e14 FLOP/s
    assert busy["score"] == pytest.approx(0.64242089984)
    # pairs: 80 samples at the table's driver rate
    assert busy["pairs"] == pytest.approx(80 / load_table()["pairs_samples_per_s"])
    # train: one pair per prompt row, 2 sequences of 200 tokens: 8000 tokens; 6 x 8,030,261,248 x 8000
    #        = 3.85452539904e14 FLOPs over 8 ranks x 100e12 x 0.5
    assert busy["train"] == pytest.approx(0.96363134976)
    # start-up: 10 s fixed + the bf16 checkpoint, 8,030,261,248 x 2 bytes = 16.060522496 GB at the table's GPU rate
    load = 16.060522496 / load_table()["load_gb_per_s"]["gpu"]
    startup = {phase: v["startup"] for phase, v in est["phases"].items()}
    assert startup == pytest.approx({"generate": 10 + load, "score": 10 + load, "pairs": 0, "train": 10 + load})
    iteration = 1.0 + 0.64242089984 + 80 / load_table()["pairs_samples_per_s"] + 0.96363134976 + 3 * (10 + load)
    assert est["iteration_seconds"] == pytest.approx(iteration)
    assert est["total_seconds"] == pytest.approx(3 * iteration)


@pytest.mark.parametrize("override, tokens", [
    ("pairs.include_anchor=false", 10 * 2 * 200),  # the de pairs only: 10 pairs of 2 sequences of 200 tokens
    ("training.epochs=2", 2 * 20 * 2 * 200),  # every pair twice
    ("training.max_length=150", 20 * 2 * 150),  # prompt + response (200 tokens) truncated to 150
])
def test_training_estimate_follows_the_pairs_it_will_see(prompts, override, tokens):
    cfg = eight_gpu_recipe(prompts, "cluster.device_tflops=100", "cluster.efficiency=0.5", override)
    train = plan(cfg, load_cluster_spec("a100x8")).estimate["phases"]["train"]["busy"]
    assert train == pytest.approx(6 * LLAMA3_8B * tokens / (8 * 100e12 * 0.5))  # 6 N FLOPs a token over 8 ranks


def test_dco_estimate_counts_its_candidates_and_tuples(tmp_path):
    """DCO: no generation; the pairs stage scores every candidate with the reference, then training sees one
    tuple of 4 sequences per question, language pair and draw."""
    cands = tmp_path / "mc"
    cands.mkdir()
    for lang in ("en", "de", "fr"):  # 3 questions of 40 characters, 4 candidates of 8 characters: 12 tokens a row
        (cands / f"{lang}.jsonl").write_text("".join(json.dumps(
            {"question_id": f"q{i}", "question": "q" * 40, "candidates": ["c" * 8] * 4, "gold": 0}) + "\n"
            for i in range(3)))
    cfg = load_config(REPO / "examples" / "dco-llama3-8b.yaml", [
        f"rewards.consistency.candidates_path={cands}", "languages=[en,de,fr]", "rewards.actors=2",
        "training.world_size=4", "rewards.consistency.pairs_per_question=5", "rewards.consistency.language_pairs=all",
        "cluster.device_tflops=100", "cluster.efficiency=0.5", "cluster.startup_seconds=0"])
    est = plan(cfg, load_cluster_spec("a100x8")).estimate
    assert set(est["phases"]) == {"pairs", "train"}
    # 3 questions x 3 languages x 4 candidates = 36 rows of 12 tokens: 2 x 8,030,261,248 x 432 = 6.93814571827e12
    # FLOPs over 2 scorers x 100e12 x 0.5 = 0.0693814571827 s, then 36 rows at the driver's rate
    pairs = est["phases"]["pairs"]
    assert pairs["busy"] == pytest.approx(0.0693814571827 + 36 / load_table()["pairs_samples_per_s"])
    assert "45 tuples" in pairs["work"]  # 3 questions x 3 language pairs (en-de, en-fr, de-fr) x 5 draws
    # train: 45 tuples x 4 sequences x 12 tokens = 2160 tokens; 6 x 8,030,261,248 x 2160 = 1.04072185774e14 FLOPs
    # over 4 ranks x 100e12 x 0.5
    assert est["phases"]["train"]["busy"] == pytest.approx(0.520360928870)


def test_dco_without_readable_candidates_says_so(tmp_path):
    cfg = load_config(REPO / "examples" / "dco-llama3-8b.yaml", [f"rewards.consistency.candidates_path={tmp_path}/no"])
    est = plan(cfg, load_cluster_spec("a100x8")).estimate
    assert "not estimated" in est["note"] and est["phases"] == {}


def test_estimate_from_the_table_for_the_spec_gpu(prompts):
    cfg = eight_gpu_recipe(prompts)
    est = plan(cfg, load_cluster_spec("a100x8")).estimate
    # A100 row: 2500 tokens/s at 8B, 300 at 70B; 8.03B lies t of the way on a log scale:
    # t = ln(8.030261248 / 8) / ln(70 / 8) = 0.0037755 / 2.1690537; 2500 x (300 / 2500)^t = 2490.8 tokens/s
    per_engine = 2500 * (300 / 2500) ** (0.0037755 / 2.1690537)
    assert per_engine == pytest.approx(2490.8, abs=0.1)
    assert est["phases"]["generate"]["busy"] == pytest.approx(8000 / (8 * 2490.8), rel=1e-4)
    # score at 312 TFLOP/s x 0.3 per GPU: 2.56968359936e14 / (8 x 93.6e12)
    assert est["phases"]["score"]["busy"] == pytest.approx(2.56968359936e14 / 7.488e14)
    # train with 4 sequences of a KTO-free pair loss, ZeRO settings do not enter: 3.85452539904e14 / 7.488e14
    assert est["phases"]["train"]["busy"] == pytest.approx(3.85452539904e14 / 7.488e14)
    # start-up from the table's GPU row: fixed seconds by phase + 16.060522496 GB of bf16 weights at its GB/s
    table = load_table()
    for phase in ("generate", "score", "train"):
        expected = table["startup_s"]["gpu"][phase] + 16.060522496 / table["load_gb_per_s"]["gpu"]
        assert est["phases"][phase]["seconds"] == pytest.approx(est["phases"][phase]["busy"] + expected)
    assert any("throughput.yaml A100" in line for line in est["figures"])


def test_scoring_counts_every_forward_of_the_recipe(prompts, tmp_path):
    """ICR with the cross-lingual prompt: the policy twice (native, cross-lingual) and the reward reference once."""
    cfg = eight_gpu_recipe(prompts, "rewards.implicit.enabled=true", "rewards.implicit.prompt=cross_lingual",
                           "rewards.implicit.reward_reference.path=princeton-nlp/Llama-3-Base-8B-SFT-DPO",
                           "cluster.device_tflops=100", "cluster.efficiency=0.5")
    est = plan(cfg, load_cluster_spec("a100x8")).estimate
    assert est["phases"]["score"]["busy"] == pytest.approx(3 * 0.64242089984)


def test_plan_prints_the_estimate_and_json_holds_it(prompts):
    args = ["plan", "--cluster", "a100x8", LACOMSA, "-o", f"prompts.path={prompts}", "-o", "languages=[en,de]"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "estimated time per iteration" in result.output and "tokens/s" in result.output
    data = json.loads(invoke(*args, "--json").output)
    assert set(data["estimate"]["phases"]) == {"generate", "score", "pairs", "train"}


def test_inspect_shows_the_estimate_beside_the_measured_time(tmp_path, monkeypatch):
    import rayalign.cli
    from conftest import write_one_sample_run

    run_dir = write_one_sample_run(tmp_path / "run")
    (run_dir / "plan.json").write_text(json.dumps({"estimate": {"phases": {
        "generate": {"seconds": 12.5, "work": ""}, "score": {"seconds": 30.25, "work": ""}}}}))
    (run_dir / "metrics.jsonl").write_text(
        json.dumps({"iteration": 1, "stage": "generate", "wall_seconds": 14.0}) + "\n"
        + json.dumps({"iteration": 1, "stage": "score", "wall_seconds": 28.5}) + "\n")
    monkeypatch.setattr(rayalign.cli.console, "width", 160)
    result = invoke("inspect", run_dir)
    assert result.exit_code == 0, result.output
    assert "estimate s" in result.output
    lines = {line.split("│")[2].strip(): line for line in result.output.splitlines() if line.count("│") > 4}
    assert "14.0" in lines["generate"] and "12.5" in lines["generate"]
    assert "28.5" in lines["score"] and "30.2" in lines["score"]


def test_streamed_auto_counts_split_the_cluster_so_both_roles_finish_together(prompts):
    """cluster.schedule stream with engines.count and rewards.actors auto: all 64 GPUs of a100x64, split so that
    the slower role finishes first. One engine's and one scorer's busy seconds, from the table's A100 row:
    generate 20 rows x 4 x 100 tokens = 8000 tokens at 2490.8 tokens/s; score 2 x 8,030,261,248 x 80 x 200 FLOPs
    = 2.56968359936e14 at 312e12 x 0.3 FLOP/s."""
    cfg = load_config(LACOMSA, [f"prompts.path={prompts}", "languages=[en,de]", "sampling.n=4",
                                "sampling.max_new_tokens=100", "cluster.schedule=stream"])
    result = plan(cfg, load_cluster_spec("a100x64"))
    counts = {p.phase: p.actors for p in result.phases}
    engines, scorers = counts["generate"], counts["score"]
    assert engines + scorers == 64
    generate, score = 8000 / 2490.8, 2.56968359936e14 / (312e12 * 0.3)

    def seconds(e, s):
        return max(generate / e, score / s)

    assert all(seconds(engines, scorers) <= seconds(e, 64 - e) + 1e-9 for e in range(1, 64))
    assert "schedule: stream" in "\n".join(result.notes)
    # the barrier schedule keeps giving each phase the whole cluster
    barrier = plan(load_config(LACOMSA, [f"prompts.path={prompts}", "cluster.schedule=barrier"]),
                   load_cluster_spec("a100x64"))
    assert {p.phase: p.actors for p in barrier.phases}["generate"] == 64


ONLINE_GRPO = REPO / "examples" / "online-grpo-llama3-8b.yaml"


def test_online_estimate_per_step_against_hand_worked_numbers(prompts):
    """GRPO on a100x8: 4 engines (auto: the GPUs the ranks leave), 4 policy ranks; 2 prompt ids x 2 languages x n 4 = 16 rollouts per step."""
    cfg = load_config(ONLINE_GRPO, [f"prompts.path={prompts}", "languages=[en,de]", "sampling.n=4",
                                    "sampling.max_new_tokens=100", "training.world_size=4",
                                    "training.micro_batch_size=1", "online.prompts_per_step=2", "online.ppo_epochs=3",
                                    "online.steps=10", "cluster.generation_tokens_per_s=1000",
                                    "cluster.device_tflops=100", "cluster.efficiency=0.5", "cluster.startup_seconds=10"])
    est = plan(cfg, load_cluster_spec("a100x8")).estimate
    assert est["unit"] == "step"
    busy = {phase: v["busy"] for phase, v in est["phases"].items()}
    # generate: 16 rollouts x 100 tokens = 1600 tokens over 4 engines x 1000 tokens/s
    assert busy["generate"] == pytest.approx(0.4)
    # reward: policy and reference forwards, 2 x 2 x 8,030,261,248 x (16 x (100 + 100) tokens) = 1.0278734397e14
    #         FLOPs over 4 ranks x 100e12 x 0.5 = 2e14 FLOP/s
    assert busy["reward"] == pytest.approx(0.51393671987)
    # train: 6 x 8,030,261,248 x 3200 tokens x 3 epochs = 4.6254304788e14 FLOPs over 2e14 FLOP/s
    assert busy["train"] == pytest.approx(2.31271523942)
    step = 0.4 + 0.51393671987 + 2.31271523942
    assert est["iteration_seconds"] == pytest.approx(step)
    # start-up once: 10 s + the bf16 checkpoint (16.060522496 GB) at the table's GPU rate; the roles start together
    startup = 10 + 16.060522496 / load_table()["load_gb_per_s"]["gpu"]
    assert est["total_seconds"] == pytest.approx(startup + 10 * step)


def test_online_plan_fills_a100x64_with_engines_and_refuses_roles_that_do_not_fit_together():
    with pytest.raises(PlanError, match=r"train: 81 GB per GPU \(ZeRO-3 states 64 GB over 2 rank\(s\) \+ 16 GB frozen "
                                        r"reference \+ 1 GB activations\) > 80 GB"):  # 8.03B x 16 bytes / 2 ranks
        plan(load_config(ONLINE_GRPO, ["training.world_size=2", "training.micro_batch_size=1"]),
             load_cluster_spec("a100x8"))

    def online(*more):
        return plan(load_config(ONLINE_GRPO, list(more)), load_cluster_spec("a100x64"))

    fixed = online("engines.count=4")  # 4 engines + 4 policy ranks: most of the cluster idles, and the plan says so
    assert [(p.phase, p.actors) for p in fixed.phases] == [("generate", 4), ("train", 4)]
    assert any(n.startswith("all roles: 8 of 64 GPUs (12%); most of the cluster idles") for n in fixed.notes)
    filled = online()  # as shipped, engines.count auto: 64 GPUs - 4 policy ranks = 60 engines of 1 GPU
    assert [(p.phase, p.actors) for p in filled.phases] == [("generate", 60), ("train", 4)]
    assert "all roles: 64 of 64 GPUs (100%)" in filled.notes
    ppo = online("online.algorithm=ppo")  # and 4 critic ranks
    assert [(p.phase, p.actors) for p in ppo.phases] == [("generate", 56), ("train", 4), ("critic", 4)]
    # each policy rank holds a frozen reference for the KL: 8,030,261,248 x 2 bytes
    assert ppo.phase("train").memory_gb["reference"] == pytest.approx(16.060522496)
    assert "reference" not in ppo.phase("critic").memory_gb
    with pytest.raises(PlanError, match=r"online: the roles \(generate 6 \+ train 4 \+ critic 4 actors\) run side by "
                                        r"side and need 14 GPUs; the cluster has 8 \(a100x8\)"):
        plan(load_config(ONLINE_GRPO, ["engines.count=6", "online.algorithm=ppo"]), load_cluster_spec("a100x8"))


def test_launch_dry_run_of_an_online_recipe_shows_the_online_plan():
    result = invoke("launch", "--dry-run", "--cluster", "a100x64", ONLINE_GRPO)
    text = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "60 x vllm engine" in text and "4 x policy rank" in text and "estimated time per step" in text
    assert "x 200 step(s) + start-up" in text and "pairs" not in text


def test_a_total_is_not_a_sum_of_the_stages_that_could_be_estimated(tmp_path):
    """On a GPU the throughput table does not know, generate, score and train are '?', and the iteration row
    summed only pairs: 0.69 s."""
    from rich.console import Console

    from rayalign.cluster.estimate import estimate_table

    spec = tmp_path / "mi300.yaml"
    spec.write_text("name: mi300\nnodes: 1\ncpus_per_node: 96\ngpus_per_node: 8\ngpu_type: MI300X\n"
                    "gpu_memory_gb: 192\nmemory_gb_per_node: 1024\n")
    est = plan(load_config(LACOMSA), load_cluster_spec(str(spec))).estimate
    assert est["phases"]["pairs"]["seconds"] > 0 and est["unknown"] == ["generate", "score", "train"]
    assert est["iteration_seconds"] is None and est["total_seconds"] is None
    console = Console(width=200, record=True)
    console.print(estimate_table(est, 2))
    text = console.export_text()
    assert "not estimated: no figures for generate, score, train" in text
    assert "the sum is an upper bound" not in text  # the barrier schedule: nothing overlaps
    streamed = plan(load_config(LACOMSA, ["cluster.schedule=stream"]), load_cluster_spec("a100x8")).estimate
    assert streamed["stream"] and not est["stream"]
    console.print(estimate_table(streamed, 2))
    assert "streamed generate and score overlap, the sum is an upper bound" in console.export_text()


def test_dco_reads_its_reference_checkpoint_once_when_it_is_the_policy():
    """The start-up counted the policy's checkpoint twice (as policy and as DCO reference): 36.1 s and 61.1 s."""
    est = plan(load_config(REPO / "examples" / "dco-llama3-8b.yaml"), load_cluster_spec("a100x8")).estimate
    checkpoint = LLAMA3_8B * 2 / 1e9 / 2  # bf16 bytes at 2 GB/s: 8.03 s
    table = load_table()["startup_s"]["gpu"]
    assert est["phases"]["pairs"]["startup"] == pytest.approx(table["score"] + checkpoint)  # 20 + 8.03
    assert est["phases"]["train"]["startup"] == pytest.approx(table["train"] + checkpoint)  # 45 + 8.03


def test_a_slow_rate_is_printed_with_its_digits():
    """The CPU preview of the 8B recipe printed "(0 tokens/s per CPU)"."""
    est = plan(load_config(LACOMSA), load_cluster_spec("local")).estimate
    per_cpu = 2391 * 0.00105 / (LLAMA3_8B / 1e9)  # throughput.yaml cpu: 1 / parameters beyond its one size
    assert f"generate: throughput.yaml cpu ({per_cpu:.3g} tokens/s per CPU)" in est["figures"]
    assert f"{per_cpu:.3g}" == "0.313"
