"""Experiment trackers: W&B (offline mode, read back with wandb's own reader of .wandb files) and TensorBoard (read
back with tensorboard's event reader) hold the values of metrics.jsonl and train_log.jsonl. Nothing goes online."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from rayalign.config import load_config

pytest.importorskip("wandb")
pytest.importorskip("tensorboard")


@pytest.fixture(autouse=True)
def wandb_offline(monkeypatch):
    """No network: offline mode. WANDB_DIR stays unset (wandb reads it once per process), so each run's files go
    under its own run directory, in the test's tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


def wandb_records(run_dir) -> list[dict]:
    """Every record of the one offline run under `run_dir`, as wandb's `leet inspect --json` reads them."""
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(files[0])],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def history(records: list[dict]) -> list[dict]:
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def scalars(tensorboard_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def numbers(record: dict, skip=()) -> dict:
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in skip}


def test_records_written_while_open_are_logged_with_their_x_axis(tmp_path):
    """Lines already in metrics.jsonl when the trackers open (an earlier launch logged them) are left out; a train
    record brings its iteration's steps, numbered after the earlier iterations' steps (3 in iter-1 -> 4, 5)."""
    from rayalign.tracking import Trackers

    run_dir = tmp_path / "run"
    (run_dir / "iter-1").mkdir(parents=True)
    (run_dir / "iter-2").mkdir()
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text(json.dumps({"iteration": 1, "stage": "generate", "wall_seconds": 9.0}) + "\n")
    (run_dir / "iter-1" / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.7}) + "\n"
                                                                for s in (1, 2, 3)))
    (run_dir / "iter-2" / "train_log.jsonl").write_text(
        json.dumps({"step": 1, "loss": 0.5, "lr": 1e-5}) + "\n" + json.dumps({"step": 2, "loss": 0.25, "lr": 2e-5}) + "\n")
    cfg = load_config(None, ["logging.tensorboard=true", "logging.wandb.project=tests", "logging.wandb.mode=offline"])
    with Trackers(cfg, run_dir) as tracker:
        with open(metrics, "a") as f:
            f.write(json.dumps({"stage": "redo", "redo": ["train"], "moved": []}) + "\n")
            f.write(json.dumps({"iteration": 2, "stage": "train", "loss_mean": 0.375, "steps": 2,
                                "actor_nodes": ["a"], "objective": "dpo", "resumed": False}) + "\n")
            f.write('{"iteration": 2, "stage": "iteration", "fidelity_en": 0.5')  # not yet a whole line
        tracker.update()

    rows = history(wandb_records(run_dir))
    logged = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
    assert logged == [
        {"iteration": 2, "train/loss_mean": 0.375, "train/steps": 2},
        {"train_step/global_step": 4, "train_step/step": 1, "train_step/loss": 0.5, "train_step/lr": 1e-5},
        {"train_step/global_step": 5, "train_step/step": 2, "train_step/loss": 0.25, "train_step/lr": 2e-5}]
    tb = scalars(run_dir / "tensorboard")
    assert tb == {"train/loss_mean": [(2, 0.375)], "train/steps": [(2, 2.0)], "train_step/step": [(4, 1.0), (5, 2.0)],
                  "train_step/loss": [(4, 0.5), (5, 0.25)],
                  "train_step/lr": [(4, np.float32(1e-5)), (5, np.float32(2e-5))]}
    assert (run_dir / "wandb-run-id").is_file()


def test_a_missing_tracker_package_is_refused_at_config_check_naming_the_extra(monkeypatch):
    from click.testing import CliRunner

    from rayalign.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` raises ImportError
    result = CliRunner().invoke(main, ["config", str(REPO / "examples" / "quickstart.yaml"),
                                       "-o", "logging.wandb.project=p"])
    assert result.exit_code == 2 and "pip install -e '.[wandb]'" in result.output, result.output
    assert "Traceback" not in result.output
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    result = CliRunner().invoke(main, ["config", str(REPO / "examples" / "quickstart.yaml"),
                                       "-o", "logging.tensorboard=true"])
    assert result.exit_code == 2 and "pip install -e '.[tensorboard]'" in result.output, result.output
    ok = CliRunner().invoke(main, ["config", str(REPO / "examples" / "quickstart.yaml"), "-o", "logging.wandb.project=p",
                                   "-o", "logging.wandb.mode=disabled"])
    assert ok.exit_code == 0, ok.output  # disabled needs no package


def test_a_wandb_run_that_cannot_start_is_a_config_error_and_closes_tensorboard(tmp_path):
    """wandb.init refusing its arguments (here a project name with '/', which W&B does not allow) stops the run with
    a ConfigError naming logging.wandb and what to do, which the CLI prints without a traceback, and the TensorBoard
    writer opened before it is closed (its writer thread ends), not left running."""
    import threading

    from rayalign.config import ConfigError
    from rayalign.tracking import Trackers

    def tensorboard_writers():
        return {t for t in threading.enumerate() if type(t).__name__ == "_AsyncWriterThread"}

    before = tensorboard_writers()
    cfg = load_config(None, ["logging.tensorboard=true", "logging.wandb.project=team/project",
                             "logging.wandb.mode=offline"])
    with pytest.raises(ConfigError, match=r"logging.wandb: W&B could not start the run \(mode offline, project "
                       r"'team/project'\): UsageError: Invalid project name.*wandb login.*logging.wandb.mode=offline"):
        Trackers(cfg, tmp_path / "run")
    assert tensorboard_writers() == before
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))  # it had been opened


def test_report_plots_that_fail_at_the_end_of_a_run_only_warn(tmp_path, capsys):
    """The report's plots are sent to W&B when a run ends well; any failure to make them (here <run-dir>/report is a
    file, so the report cannot write there) is a warning, not an error for a run whose results are complete."""
    from rayalign.tracking import Trackers

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "stage": "iteration", "fidelity_en": 0.5})
                                           + "\n")
    (run_dir / "report").write_text("not a directory\n")
    cfg = load_config(None, ["logging.tensorboard=false", "logging.wandb.project=tests", "logging.wandb.mode=offline"])
    with Trackers(cfg, run_dir):
        pass
    err = " ".join(capsys.readouterr().err.split())
    assert "warning: the report's plots were not sent to W&B (FileExistsError:" in err, err
    assert f"rayalign report {run_dir}" in err
    assert [r["exit"]["exit_code"] for r in wandb_records(run_dir) if r["type"] == "exit"] == [0]  # a success


def test_logging_settings_leave_the_config_hash_unchanged():
    plain = load_config(REPO / "examples" / "quickstart.yaml")
    tracked = load_config(REPO / "examples" / "quickstart.yaml", ["logging.wandb.project=p", "logging.tensorboard=false"])
    assert tracked.logging.wandb.project == "p" and tracked.config_hash() == plain.config_hash()


def test_an_offline_run_logs_every_stage_iteration_and_step_as_written_to_its_files(small_tracked_run):
    """Two iterations through offline.run with both trackers on (conftest's small_tracked_run): W&B and TensorBoard
    hold each stage's and iteration's numbers at its iteration, and each optimizer step's at its global step, as in
    metrics.jsonl and train_log.jsonl; W&B also holds the resolved config and the report's plots."""
    run_dir = small_tracked_run
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [[json.loads(line) for line in (run_dir / f"iter-{t}" / "train_log.jsonl").read_text().splitlines()]
             for t in (1, 2)]
    expected, offset = [], 0
    for r in metrics:
        expected.append({"iteration": r["iteration"],
                         **{f"{r['stage']}/{k}": v for k, v in numbers(r, ("iteration",)).items()}})
        if r["stage"] == "train":  # then that iteration's steps, numbered after the earlier iterations' steps
            log = steps[r["iteration"] - 1]
            expected += [{"train_step/global_step": offset + s["step"],
                          **{f"train_step/{k}": v for k, v in numbers(s).items()}} for s in log]
            offset += len(log)
    assert [r["stage"] for r in metrics] == ["generate", "score", "pairs", "train", "iteration"] * 2
    records = wandb_records(run_dir)
    rows = history(records)
    logged = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows if "report/" not in str(row)]
    assert logged == expected
    assert len(steps[0]) == len(steps[1]) >= 2 and logged[4]["train_step/global_step"] == 1
    config = next(r["run"]["config"]["update"] for r in records if r["type"] == "run")
    assert config["training"]["loss"] == "dpo" and config["languages"] == ["en", "de"]
    images = {k.split(".")[0] for row in rows for k in row if k.startswith("report/")}  # report/<plot>.path, ...
    assert {"report/fidelity_by_iteration", "report/training_by_iteration"} <= images

    tb = scalars(run_dir / "tensorboard")
    assert tb["iteration/fidelity_en"] == [(t, np.float32(metrics[5 * t - 1]["fidelity_en"])) for t in (1, 2)]
    assert tb["train/loss_mean"] == [(t, np.float32(metrics[5 * t - 2]["loss_mean"])) for t in (1, 2)]
    assert tb["train_step/loss"] == [(i + 1, np.float32(r["loss"])) for i, r in enumerate(steps[0] + steps[1])]
    assert tb["generate/wall_seconds"] == [(t, np.float32(metrics[5 * (t - 1)]["wall_seconds"])) for t in (1, 2)]


def test_an_online_run_logs_every_step(ray_session, tiny_model, tmp_path):
    from rayalign.pipelines import online

    cfg = load_config(REPO / "examples" / "online-grpo-quickstart.yaml", [
        f"policy.path={tiny_model}", "languages=[en,de]", "online.steps=2", "online.prompts_per_step=1",
        "logging.tensorboard=false", "logging.wandb.project=tests", "logging.wandb.mode=offline"])
    run_dir = online.run(cfg, tmp_path / "run")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = history(wandb_records(run_dir))
    logged = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows if "report/" not in str(row)]
    assert logged == [{f"online/{k}": v for k, v in numbers(r).items()} for r in metrics]
    assert [r["online/step"] for r in logged] == [1, 2] and not (run_dir / "tensorboard").exists()


FAKE_KEY = "local-" + "0123456789abcdef" * 3  # the format of a W&B key (40+ characters after the prefix), never sent


@pytest.fixture
def no_wandb_credentials(monkeypatch, tmp_path):
    """A user with no W&B credentials anywhere wandb looks (a fresh home, netrc and settings directory, no key in the
    environment), mode unset, and no network: a connection attempt fails the test."""
    import socket

    from wandb.sdk import wandb_setup

    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setattr(wandb_setup, "_singleton", None)  # settings read afresh from this environment

    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    yield tmp_path
    assert not attempts, f"connections were attempted: {attempts}"


@pytest.mark.parametrize("mode", ["online", None])
def test_online_mode_without_a_wandb_key_is_refused_at_config_check(no_wandb_credentials, monkeypatch, mode):
    """logging.wandb with mode online (or unset: W&B's default is online) and no API key is refused by the config
    check, before Ray starts, naming logging.wandb.mode and the three ways out, rather than by wandb.init later."""
    from click.testing import CliRunner

    from rayalign.cli import main
    from rayalign.config import ConfigError
    from rayalign.tracking import check_trackers

    overrides = ["logging.wandb.project=p"] + ([f"logging.wandb.mode={mode}"] if mode else [])
    with pytest.raises(ConfigError, match=r"logging\.wandb\.mode is (online|unset, which W&B takes as online), but no "
                       r"W&B API key is configured.*`wandb login`.*WANDB_API_KEY.*logging\.wandb\.mode=offline"):
        check_trackers(load_config(None, overrides))
    result = CliRunner().invoke(main, ["config", str(REPO / "examples" / "quickstart.yaml")]
                                + [a for o in overrides for a in ("-o", o)])
    assert result.exit_code == 2 and "logging.wandb.mode" in result.output and "wandb login" in result.output, \
        result.output
    assert "Traceback" not in result.output

    # a key badly copied into WANDB_API_KEY is named
    monkeypatch.setenv("WANDB_API_KEY", "abc")
    with pytest.raises(ConfigError, match=r"credentials found are not usable \(WANDB_API_KEY invalid"):
        check_trackers(load_config(None, overrides))


def test_commands_that_never_track_need_no_wandb_credentials(no_wandb_credentials, tmp_path, monkeypatch):
    """`rayalign export --format verl` (and rescore, eval, hub-scan) refused a recipe with logging.wandb and no key."""
    from click.testing import CliRunner

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no Hub probe in this test without network

    from rayalign.cli import main

    quickstart, overrides = str(REPO / "examples" / "quickstart.yaml"), ["-o", "logging.wandb.project=p"]
    result = CliRunner().invoke(main, ["export", "--format", "verl", quickstart, str(tmp_path / "verl"), *overrides])
    assert result.exit_code == 0 and (tmp_path / "verl" / "train.parquet").is_file(), result.output
    refused = CliRunner().invoke(main, ["config", quickstart, *overrides])  # what runs the recipe is still checked
    assert refused.exit_code == 2 and "wandb login" in refused.output


def test_online_mode_with_a_wandb_key_or_offline_mode_passes_the_check(no_wandb_credentials, monkeypatch):
    from wandb.sdk import wandb_setup

    from rayalign.tracking import check_trackers

    online = load_config(None, ["logging.wandb.project=p", "logging.wandb.mode=online"])
    for mode in ("offline", "disabled"):  # no key needed
        check_trackers(load_config(None, ["logging.wandb.project=p", f"logging.wandb.mode={mode}"]))
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_trackers(load_config(None, ["logging.wandb.project=p"]))  # unset: WANDB_MODE decides
    monkeypatch.delenv("WANDB_MODE")

    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)  # in the environment
    check_trackers(online)
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setattr(wandb_setup, "_singleton", None)
    # in the netrc file `wandb login` writes (W&B's cloud, under its older host name too)
    (no_wandb_credentials / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    (no_wandb_credentials / ".netrc").chmod(0o600)
    check_trackers(online)
