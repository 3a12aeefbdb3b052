"""The openrlhf trainer backend against OpenRLHF's own code (the released wheel, installed without its CUDA
dependencies): its `train_dpo` argument parser takes our command, and its RewardDataset reads our pairs into the
token ids rayalign trains on."""

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from rayalign.config import TrainingConfig
from rayalign.data.schemas import schema_for
from rayalign.integrations.openrlhf import dpo_command, parse_dpo_command

T = TrainingConfig(loss="dpo", backend="openrlhf", micro_batch_size=2, gradient_accumulation=4, world_size=8,
                   zero_stage=3, beta=0.1, nll_weight=1.0, lr=5e-7, weight_decay=0.01, warmup_ratio=0.1,
                   max_grad_norm=0.5, epochs=2, max_length=768, seed=3)


def test_openrlhf_parser_reads_our_command_as_meant():
    command = dpo_command(T, "runs/x/iter-1/pairs", "/models/p", "runs/x/iter-1/policy.tmp")
    assert command[:5] == ["deepspeed", "--num_gpus", "8", "--module", "openrlhf.cli.train_dpo"]
    a = parse_dpo_command(command)
    assert a.model.model_name_or_path == a.ref.model_name_or_path == "/models/p"  # the training reference: t-1
    assert a.data.dataset == "runs/x/iter-1/pairs/part-*.parquet" and a.data.dataset_split == "train"
    assert (a.data.prompt_key, a.data.chosen_key, a.data.rejected_key) == ("prompt", "chosen", "rejected")
    assert {a.data.prompt_key, a.data.chosen_key, a.data.rejected_key} <= set(schema_for("pairs")[1].names)
    assert a.data.apply_chat_template is True and a.data.max_len == 768
    assert a.ckpt.output_dir == "runs/x/iter-1/policy.tmp"
    assert a.train.batch_size == 64 and a.train.micro_batch_size == 2  # 2 x 4 accumulation x 8 ranks
    assert a.ds.zero_stage == 3 and a.ds.param_dtype == "bf16" and a.train.seed == 3 and a.train.max_epochs == 2
    assert a.optim == "adam" and a.adam.lr == 5e-7 and list(a.adam.betas) == [0.9, 0.999]
    assert a.adam.weight_decay == 0.01 and a.lr_warmup_ratio == 0.1 and a.min_lr_ratio == 0.0
    assert a.max_norm == 0.5 and a.model.beta == 0.1 and a.model.nll_loss_coef == 1.0
    assert a.model.ipo_enable is False and a.model.label_smoothing == 0.0
    assert a.model.gradient_checkpointing_enable is False

    ipo = parse_dpo_command(dpo_command(dataclasses.replace(T, loss="ipo", nll_weight=0.0), "d", "p", "o"))
    assert ipo.model.ipo_enable is True and ipo.model.nll_loss_coef == 0
    cdpo = parse_dpo_command(dpo_command(dataclasses.replace(T, loss="cdpo", label_smoothing=0.2,
                                                             gradient_checkpointing=True), "d", "p", "o"))
    assert cdpo.model.label_smoothing == 0.2 and cdpo.model.gradient_checkpointing_enable is True


def test_openrlhf_parser_refuses_flags_it_does_not_have():
    """The flat flags of OpenRLHF 0.9 (and of rayalign's earlier command) are refused by name."""
    with pytest.raises(ValueError, match="does not take --pretrain --zero_stage"):
        parse_dpo_command(dpo_command(T, "d", "p", "o") + ["--pretrain", "p", "--zero_stage", "3"])


def test_openrlhf_reward_dataset_reads_our_pairs(tiny_model, pairs_dataset):
    """OpenRLHF's blending_datasets and RewardDataset (DPO mode), configured by the arguments its parser reads from
    our command, over our pairs: chosen/rejected token ids equal rayalign's training sequences, prompt included.

    OpenRLHF's DeepSpeed strategy needs flash-attn (CUDA) to import; the dataset code reads only `strategy.args`
    and `strategy.print`, so a namespace holding OpenRLHF's parsed arguments stands in for it."""
    import pyarrow.parquet as pq
    from openrlhf.datasets import RewardDataset
    from openrlhf.datasets.utils import blending_datasets
    from openrlhf.utils import get_tokenizer

    from rayalign.models import load_tokenizer
    from rayalign.training.data import encode_dataset

    args = parse_dpo_command(dpo_command(T, pairs_dataset, tiny_model, "o"))
    strategy = SimpleNamespace(args=args, print=lambda *_: None, is_rank_0=lambda: True)
    data = blending_datasets(args.data.dataset, None, strategy, args.train.seed, dataset_split=args.data.dataset_split)
    tokenizer = get_tokenizer(args.model.model_name_or_path, None, "right", strategy)
    theirs = RewardDataset(data, tokenizer, args.data.max_len, strategy, input_template=args.data.input_template,
                           is_dpo=True, num_processors=1)

    table = pq.read_table(f"{pairs_dataset}/part-00000.parquet")
    ours = encode_dataset(table, "pairs", load_tokenizer(tiny_model), max_length=T.max_length, source="pairs")
    assert len(theirs) == len(ours) == table.num_rows == 40
    for i, ((prompt, chosen), (prompt_r, rejected)) in enumerate(ours.sequences):
        chosen_ids, _, rejected_ids, _, prompt_len = theirs[i]
        assert prompt_len == len(prompt) and prompt_r == prompt
        assert chosen_ids[0].tolist() == prompt + chosen, i
        assert rejected_ids[0].tolist() == prompt + rejected, i


def test_openrlhf_loads_and_calls_our_reward_file(tmp_path):
    """`rayalign online --openrlhf-reward-file` output, loaded by OpenRLHF's SingleTurnAgentExecutor from the path
    given as --reward.remote_url, called through its reward path with a query built as its executor builds one
    (prompt + response token ids decoded with special tokens kept), and turned into an Experience by its samples
    generator. Rewards: fidelity 1 or 0 minus 0.5 x generated tokens / max_new_tokens (32 in the recipe), as `rayalign online`
    computes them; the end-of-turn token counts as generated."""
    import asyncio

    from click.testing import CliRunner
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    from rayalign.cli import main
    from rayalign.config import TINY_MODEL
    from rayalign.models import load_tokenizer, resolve_model_path

    path = tmp_path / "reward_func.py"
    recipe = str(Path(__file__).resolve().parents[1] / "examples" / "online-grpo-quickstart.yaml")
    result = CliRunner().invoke(main, ["online", recipe, "--openrlhf-reward-file", str(path),
                                       "-o", "online.length_weight=0.5"])
    assert result.exit_code == 0, result.output
    executor = SingleTurnAgentExecutor(str(path))
    assert executor.reward_func is not None
    tokenizer = load_tokenizer(resolve_model_path(TINY_MODEL))  # the recipe's policy
    response = "Es ist schon sehr spät am Abend, wir sollten nach Hause gehen."
    for lang, fidelity in (("de", 1.0), ("en", 0.0)):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Wie spät ist es?"}], tokenize=False,
                                               add_generation_prompt=True)
        prompt_ids = tokenizer(text=prompt, add_special_tokens=False)["input_ids"]
        action_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        query = tokenizer.decode(prompt_ids + action_ids, skip_special_tokens=False)
        assert query.endswith(tokenizer.eos_token)
        [info] = asyncio.run(executor._fetch_rewards_via_func([query], [prompt], [lang]))
        expected = fidelity - 0.5 * min(len(action_ids), 32) / 32
        assert info["rewards"].tolist() == pytest.approx([expected])
        sample = {"prompt": prompt, "label": lang, "observation_tokens": prompt_ids + action_ids,
                  "action_ranges": [(len(prompt_ids), len(prompt_ids) + len(action_ids))], "rollout_log_probs": None,
                  "truncated": False, "reward": info["rewards"], "scores": info["scores"],
                  "extra_logs": info["extra_logs"]}
        experience = SamplesGenerator._process_response_into_experience(None, sample, max_len=512)
        assert experience.rewards.tolist() == pytest.approx([expected])
        assert experience.info["language_fidelity"].tolist() == [fidelity]


def _train_ppo_ray_flags() -> set[str]:
    """Every option the installed `openrlhf.cli.train_ppo_ray` declares (read from its source: the module needs CUDA
    packages to import, and builds its parser under `if __name__ == "__main__":`)."""
    import ast
    import importlib.util

    origin = importlib.util.find_spec("openrlhf.cli.train_ppo_ray").origin
    flags = set()
    for node in ast.walk(ast.parse(Path(origin).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
    assert "--reward.remote_url" in flags and "--data.label_key" in flags  # the read found OpenRLHF's parser
    return flags


def test_the_cli_names_openrlhfs_real_reward_flags(tmp_path):
    """`rayalign online --openrlhf-reward-file` (its help and what it prints) names options train_ppo_ray takes:
    --reward.remote_url and --data.label_key (OpenRLHF 0.10.4+), not the older --remote_rm_url / --label_key."""
    import re

    import click
    from click.testing import CliRunner

    from rayalign.cli import main

    flags = _train_ppo_ray_flags()
    command = main.commands["online"]
    ours = {opt for param in command.get_params(click.Context(command)) for opt in param.opts}
    help_text = " ".join(CliRunner().invoke(main, ["online", "--help"]).output.split())
    in_help = set(re.findall(r"--[a-z][a-z_.-]*[a-z_]", help_text)) - ours
    assert in_help == {"--reward.remote_url"}, in_help
    path = tmp_path / "reward_func.py"
    recipe = str(Path(__file__).resolve().parents[1] / "examples" / "online-grpo-quickstart.yaml")
    result = CliRunner().invoke(main, ["online", recipe, "--openrlhf-reward-file", str(path)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert said.endswith(f"train_ppo_ray --reward.remote_url {path} --data.label_key lang"), said
    in_header = re.findall(r"--[a-z][a-z_.-]*[a-z_]", path.read_text(encoding="utf-8").split("\n", 1)[0])
    assert in_header == ["--reward.remote_url", "--data.label_key"], in_header
    assert in_help | {"--reward.remote_url", "--data.label_key"} <= flags


def test_rewards_the_reward_file_cannot_compute_are_refused_cleanly(tmp_path):
    """OpenRLHF's reward_func sees samples, not prompt groups or scoring actors: `rayalign online
    --openrlhf-reward-file` refuses online.user_weight and online.score_weight with the key (exit 2, no traceback)
    instead of writing a file whose rewards differ from `rayalign online`'s."""
    from click.testing import CliRunner

    from rayalign.cli import main

    user = tmp_path / "user_reward.py"
    user.write_text("def reward(group):\n    return [0.0] * len(group)\n")
    recipe = str(Path(__file__).resolve().parents[1] / "examples" / "online-grpo-quickstart.yaml")
    path = tmp_path / "reward_func.py"
    for overrides, key in ((["online.user_weight=1", f"rewards.user.path={user}"], "online.user_weight"),
                           (["online.score_weight=1", "online.score_reward=msa", "rewards.latent.enabled=true"],
                            "online.score_weight")):
        args = ["online", recipe, "--openrlhf-reward-file", str(path)]
        for override in overrides:
            args += ["-o", override]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (key, result.exception)
        assert f"Error: {key}: " in result.output and "Traceback" not in result.output, result.output
        assert not path.exists()


def test_the_openrlhf_backend_is_checked_before_any_work(tmp_path, tiny_model, monkeypatch):
    """A missing launcher, or a run directory OpenRLHF would split at ',' (its dataset list), failed with a
    traceback after generate, score and pairs had run; CPU training and batch alignment were accepted and then
    failed or were ignored."""
    from openrlhf.datasets.utils import blending_datasets

    from rayalign.config import ConfigError, load_config
    from rayalign.integrations.openrlhf import OpenRLHFError
    from rayalign.preflight import preflight

    gpu = ["training.backend=openrlhf", "training.num_gpus=1", f"policy.path={tiny_model}"]
    with pytest.raises(ConfigError, match="training.backend: openrlhf trains on GPUs"):
        load_config(REPO / "examples" / "quickstart.yaml", ["training.backend=openrlhf"])
    with pytest.raises(ConfigError, match="training.batch_alignment: OpenRLHF's trainer shuffles rows itself"):
        load_config(REPO / "examples" / "quickstart-batch-alignment.yaml", gpu)
    cfg = load_config(REPO / "examples" / "quickstart.yaml", gpu)
    preflight(cfg, tiny_model, tmp_path / "run")  # the deepspeed launcher here, and OpenRLHF's parser takes the flags
    # launch checks before Ray starts, with world_size still auto: --train.batch_size autoauto was an ArgumentError
    preflight(load_config(REPO / "examples" / "quickstart.yaml", [*gpu, "training.world_size=auto"]), tiny_model,
              tmp_path / "run")
    printed = []  # OpenRLHF reads 'x,y' as two datasets (and 'x@y' as a split of 'x')
    with pytest.raises(Exception):
        blending_datasets(f"{tmp_path / 'x,y' / 'iter-1' / 'pairs'}/part-*.parquet", None,
                          SimpleNamespace(print=printed.append, is_rank_0=lambda: True), 0)
    assert printed[0] == f"dataset: {tmp_path / 'x'}"
    with pytest.raises(OpenRLHFError, match="OpenRLHF splits --data.dataset at ',' and '@' and reads it as a glob"):
        preflight(cfg, tiny_model, tmp_path / "x,y")
    pairs = tmp_path / "exp[1]" / "iter-1" / "pairs"  # glob characters: OpenRLHF finds no file in the directory
    pairs.mkdir(parents=True)
    pq.write_table(pa.table({"prompt": ["p"], "chosen": ["c"], "rejected": ["r"]}), pairs / "part-00000.parquet")
    with pytest.raises(Exception):
        blending_datasets(f"{pairs}/part-*.parquet", None, SimpleNamespace(print=printed.append, is_rank_0=lambda: True), 0)
    with pytest.raises(OpenRLHFError, match=r"reads it as a glob \('\[', '\]', '\*', '\?'\)"):
        preflight(cfg, tiny_model, tmp_path / "exp[1]")
    monkeypatch.setenv("RAYALIGN_OPENRLHF_DEEPSPEED", str(tmp_path / "no" / "deepspeed"))
    with pytest.raises(OpenRLHFError, match=f"`{tmp_path / 'no' / 'deepspeed'}` was not found"):
        preflight(cfg, tiny_model, tmp_path / "run")
    assert not (tmp_path / "run").exists()
