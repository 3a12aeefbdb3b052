"""Training checkpoints: resumed only when this run wrote and recorded them, loaded as weights only, with the
whole step log; a policy that cannot be saved is named."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from rayalign.config import load_config
from rayalign.data.store import DatasetWriteError


class Planted:
    """A pickle that creates a marker file when it is unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def config(model: str, checkpoint_every: int = 1):
    return load_config(None, ["name=ckpt", "languages=[en, es, de, fr, ru]", f"policy.path={model}",
                              "rewards.latent.enabled=true", "pairs.method=lacomsa", "training.loss=dpo",
                              "training.micro_batch_size=4", "training.gradient_accumulation=1",
                              "training.world_size=1", "training.num_cpus=1", "training.warmup_ratio=0.2",
                              f"training.checkpoint_every={checkpoint_every}"])


def new_run(tmp: Path, pairs_dataset: str) -> Path:
    shutil.copytree(pairs_dataset, tmp / "iter-1" / "pairs")
    return tmp


def train(cfg, run_dir: Path) -> dict:
    from rayalign.pipelines import offline

    offline.run(cfg, run_dir, stages=("train",))
    return [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if m.get("stage") == "train"][-1]


def train_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "iter-1" / "train_log.jsonl").read_text().splitlines()]


def weights(run_dir: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(run_dir / "iter-1" / "policy" / "model.safetensors")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model, pairs_dataset, ray_session):
    run_dir = new_run(tmp_path_factory.mktemp("straight"), pairs_dataset)
    return run_dir, train(config(tiny_model), run_dir)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny_model, pairs_dataset, ray_session):
    """A run interrupted (Ctrl-C) while saving the policy: every step trained, the last checkpoint (step 9 of 10)
    recorded in state.json."""
    from rayalign.actors.preference_trainer import PreferenceTrainerGroup as TrainerGroup

    def interrupt(self, path):
        raise KeyboardInterrupt

    run_dir = new_run(tmp_path_factory.mktemp("interrupted"), pairs_dataset)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TrainerGroup, "save", interrupt)
        with pytest.raises(KeyboardInterrupt):
            train(config(tiny_model), run_dir)
    return run_dir


def test_the_checkpoint_is_recorded_in_the_run_state(interrupted):
    record = json.loads((interrupted / "state.json").read_text())["checkpoints"]["iter-1/train.ckpt"]
    assert record["tag"] == "step-9" and "train_log.jsonl" in record["files"]
    assert not (interrupted / "iter-1" / "policy").exists()


def test_only_the_recorded_checkpoint_stays_on_disk(interrupted):
    """Every mid-stage checkpoint stayed until the stage ended: ten full optimizer states for ten steps."""
    tags = sorted(p.name for p in (interrupted / "iter-1" / "train.ckpt").iterdir() if p.is_dir())
    assert tags == ["step-9"]


def test_resumed_training_keeps_the_whole_log_and_equals_the_uninterrupted_run(interrupted, straight, tmp_path,
                                                                               tiny_model):
    run_dir = tmp_path / "run"
    shutil.copytree(interrupted, run_dir)
    result = train(config(tiny_model), run_dir)
    expected_dir, expected = straight
    assert result["resumed_from_step"] == 9 and result["steps"] == 10
    log, expected_log = train_log(run_dir), train_log(expected_dir)
    assert [r["step"] for r in log] == list(range(1, 11))
    for key in ("loss", "lr", "accuracy", "reward_margin"):
        assert [r[key] for r in log] == pytest.approx([r[key] for r in expected_log], abs=1e-6), key
    for key in ("loss_first", "loss_mean", "accuracy_mean"):
        assert result[key] == pytest.approx(expected[key], abs=1e-5), key
    got, want = weights(run_dir), weights(expected_dir)
    assert all(abs(got[k] - want[k]).max() < 1e-6 for k in want)
    assert "iter-1/train.ckpt" not in json.loads((run_dir / "state.json").read_text())["checkpoints"]


def test_a_changed_checkpoint_is_not_loaded_and_training_starts_over(interrupted, straight, tmp_path, tiny_model):
    run_dir = tmp_path / "run"
    shutil.copytree(interrupted, run_dir)
    states = run_dir / "iter-1" / "train.ckpt" / "step-9" / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 1
    states.write_bytes(bytes(data))
    result = train(config(tiny_model), run_dir)
    assert result["resumed_from_step"] == 0 and len(train_log(run_dir)) == 10
    assert list(run_dir.glob("trash-*/iter-1/train.ckpt/step-9/mp_rank_00_model_states.pt"))
    assert train_log(run_dir)[-1]["loss"] == pytest.approx(train_log(straight[0])[-1]["loss"], abs=1e-6)


def plant(ckpt: Path, marker: Path) -> None:
    (ckpt / "step-3").mkdir(parents=True)
    (ckpt / "latest").write_text("step-3")
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        (ckpt / "step-3" / name).write_bytes(pickle.dumps(Planted(marker)))


@pytest.mark.parametrize("checkpoint_every", [0, 1])
def test_a_planted_checkpoint_never_runs(tmp_path, tiny_model, pairs_dataset, ray_session, checkpoint_every):
    """Not written by this run (or checkpointing off): moved aside unread, and training starts from step 0."""
    run_dir, marker = new_run(tmp_path / "run", pairs_dataset), tmp_path / "pwned"
    plant(run_dir / "iter-1" / "train.ckpt", marker)
    result = train(config(tiny_model, checkpoint_every), run_dir)
    assert not marker.exists() and result["resumed_from_step"] == 0
    assert list(run_dir.glob("trash-*/iter-1/train.ckpt/step-3"))


def test_checkpoints_load_as_weights_only_and_a_failed_save_names_the_path(tmp_path, tiny_model, pairs_dataset,
                                                                          ray_session):
    """Even a checkpoint that passed every other check is read with weights_only: a pickle does not run. A policy
    that cannot be written (here its directory's parent is a file) is named, without a Ray traceback."""
    from rayalign.actors.preference_trainer import PreferenceTrainerGroup as TrainerGroup

    cfg, marker = config(tiny_model), tmp_path / "pwned"
    plant(tmp_path / "ckpt", marker)
    (tmp_path / "full").write_text("not a directory")
    group = TrainerGroup(tiny_model, cfg.policy, cfg.training)
    try:
        group.prepare(pairs_dataset, "pairs", "dpo", None)
        with pytest.raises(Exception, match="holds objects other than weights; not loaded"):
            group.resume(str(tmp_path / "ckpt"))
        with pytest.raises(DatasetWriteError) as failure:
            group.save(str(tmp_path / "full" / "policy"))
    finally:
        group.shutdown()
    assert not marker.exists()
    assert str(failure.value).startswith(f"{tmp_path / 'full' / 'policy'}: the trained policy could not be saved")
    assert "Traceback" not in str(failure.value)


def test_a_save_cut_between_deepspeed_and_the_record_resumes_from_the_recorded_checkpoint(tmp_path):
    """DeepSpeed wrote global_step3 and pointed `latest` at it, then the run stopped before recording it: the
    recorded global_step2 is kept and `latest` points back at it; global_step3 goes to the trash. A changed file in
    the recorded one still sets the whole directory aside."""
    from rayalign.data.store import directory_checksums
    from rayalign.run_dir import set_aside_untrusted_checkpoint

    run_dir = tmp_path / "run"
    ckpt = run_dir / "iter-1" / "train.ckpt"
    for step in (1, 2, 3):
        (ckpt / f"global_step{step}").mkdir(parents=True)
        (ckpt / f"global_step{step}" / "model.pt").write_bytes(b"weights %d" % step)
    record = {"tag": "global_step2", "files": directory_checksums(ckpt / "global_step2")}
    (ckpt / "latest").write_text("global_step3")
    set_aside_untrusted_checkpoint(ckpt, record, 1, run_dir)
    assert sorted(p.name for p in ckpt.iterdir()) == ["global_step2", "latest"]
    assert (ckpt / "latest").read_text() == "global_step2"
    assert [p.read_bytes() for p in run_dir.glob("trash-*/iter-1/train.ckpt/global_step3/model.pt")] == [b"weights 3"]
    (ckpt / "global_step2" / "model.pt").write_bytes(b"changed")
    set_aside_untrusted_checkpoint(ckpt, record, 1, run_dir)
    assert not ckpt.exists()
