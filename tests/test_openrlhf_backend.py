"""The openrlhf trainer backend's command; checked against OpenRLHF's own CLI where openrlhf imports."""

import dataclasses
import subprocess
import sys

import pytest

from rayalign.config import TrainingConfig
from rayalign.data.schemas import schema_for
from rayalign.openrlhf import dpo_command

T = TrainingConfig(loss="dpo", backend="openrlhf", micro_batch_size=2, gradient_accumulation=4, world_size=8,
                   zero_stage=3, beta=0.1, nll_weight=1.0)


def flags(command: list[str]) -> dict:
    out, i = {}, command.index("openrlhf.cli.train_dpo") + 1
    while i < len(command):
        key = command[i]
        if i + 1 < len(command) and not command[i + 1].startswith("--"):
            out[key], i = command[i + 1], i + 2
        else:
            out[key], i = True, i + 1
    return out


def test_command_maps_our_pairs_and_training_settings():
    f = flags(dpo_command(T, "runs/x/iter-1/pairs", "/models/p", "runs/x/iter-1/policy"))
    columns = set(schema_for("pairs")[1].names)
    assert {f["--prompt_key"], f["--chosen_key"], f["--rejected_key"]} <= columns and f["--apply_chat_template"]
    assert f["--train_batch_size"] == "64" and f["--micro_train_batch_size"] == "2" and f["--zero_stage"] == "3"
    assert f["--pretrain"] == f["--ref_pretrain"] == "/models/p"  # the training reference is policy t-1
    assert f["--nll_loss_coef"] == "1.0" and "--ipo" not in f and "--label_smoothing" not in f
    ipo = flags(dpo_command(dataclasses.replace(T, loss="ipo", nll_weight=0.0), "d", "p", "o"))
    assert ipo["--ipo"] and "--nll_loss_coef" not in ipo
    assert flags(dpo_command(dataclasses.replace(T, loss="cdpo", label_smoothing=0.2), "d", "p", "o"))[
        "--label_smoothing"] == "0.2"


def test_openrlhf_cli_knows_every_flag():
    pytest.importorskip("openrlhf")
    help_text = subprocess.run([sys.executable, "-m", "openrlhf.cli.train_dpo", "--help"], capture_output=True,
                               text=True, timeout=300).stdout
    for key in flags(dpo_command(T, "d", "p", "o")):
        assert key in help_text, key
