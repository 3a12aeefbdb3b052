"""Experiment trackers: TensorBoard and Weights & Biases receive the records that metrics.jsonl and
train_log.jsonl hold, with the same values.

What goes where (the same tags in both trackers):
  <stage>/<key>        a stage's record (generate, score, pairs, train, hub-scan), x = iteration
  iteration/<key>      an iteration's summary line, x = iteration
  train_step/<key>     every optimizer step of train_log.jsonl, x = train_step/global_step (steps of earlier
                       iterations included)
  online/<key>         every online step, x = online/step
W&B also gets the resolved config and, at the end of a run, the plots of `rayalign report`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import uuid
from pathlib import Path

from rayalign.config import ConfigError, RunConfig

STEP_OF = {"iteration": "iteration", "train_step": "train_step/global_step", "online": "online/step"}
WANDB_ID_FILE = "wandb-run-id"


def check_trackers(cfg: RunConfig) -> None:
    """Refuse a recipe whose tracker package is missing, naming the extra that installs it."""
    log = cfg.logging
    wanted = [("tensorboard", "logging.tensorboard: true")] if log.tensorboard else []
    if log.wandb is not None and _wandb_mode(log.wandb.mode) != "disabled":
        wanted.append(("wandb", "logging.wandb"))
    for package, key in wanted:
        try:
            importlib.import_module(package)
        except ImportError:
            raise ConfigError(f"{key}: the {package} package is not installed; install the extra with "
                              f"`pip install -e '.[{package}]'` in the rayalign checkout (or `pip install {package}`), "
                              "or remove the setting") from None
    if log.wandb is not None and _wandb_mode(log.wandb.mode) == "online":
        _check_wandb_credentials(log.wandb.mode)


def _wandb_mode(mode: str | None) -> str:
    return mode or os.environ.get("WANDB_MODE") or "online"


def _check_wandb_credentials(mode: str | None) -> None:
    """Mode online needs W&B credentials in this process (the driver's, where wandb.init runs): refused here, before
    Ray starts, rather than by wandb.init once the run has begun. The credentials are looked up as wandb.init does
    (WANDB_API_KEY or WANDB_IDENTITY_TOKEN_FILE, the netrc entry of `wandb login`, wandb's settings), without
    prompting, without checking the key with the server and without touching the network."""
    try:
        from wandb.errors import AuthenticationError
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth

        settings = wandb_setup.singleton().settings
        host = wbauth.HostUrl(settings.base_url, app_url=settings.app_url)
    except Exception:  # noqa: BLE001 (another wandb's internals, unreadable settings): wandb.init will say
        return
    try:
        if wbauth.authenticate_session(host=host, source="rayalign", prompt=False, update_session=False):
            return
        problem = f"no W&B API key is configured for {host.url} (none in WANDB_API_KEY, the netrc file or wandb's settings)"
    except AuthenticationError as e:
        problem = f"the W&B credentials found are not usable ({str(e).rstrip('.')})"
    except Exception:  # noqa: BLE001
        return
    why = "online" if mode else ("unset and WANDB_MODE=online" if os.environ.get("WANDB_MODE") else
                                 "unset, which W&B takes as online")
    raise ConfigError(f"logging.wandb.mode is {why}, but {problem}. Run `wandb login` (it stores the key for this "
                      "user), set WANDB_API_KEY, or set logging.wandb.mode=offline (files under the run directory, "
                      "upload later with `wandb sync`)")


def _scalars(record: dict, skip: tuple[str, ...] = ()) -> dict[str, float]:
    """The record's numbers (not booleans, strings or lists)."""
    return {k: v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in skip}


class Trackers:
    """The run's trackers, opened by `with Trackers(cfg, run_dir) as tracker:` once the run directory is prepared.
    `update()` logs the metrics.jsonl lines written since the last call (those of earlier launches were logged by
    them), and after a train stage's line that iteration's train_log.jsonl."""

    def __init__(self, cfg: RunConfig, run_dir: Path, purge_step: int | None = None):
        """`purge_step`: the first step a resumed online run computes again; TensorBoard drops the earlier launch's
        points from that step on, as metrics.jsonl dropped their lines."""
        check_trackers(cfg)
        self.run_dir, self.tensorboard, self.wandb = Path(run_dir), None, None
        metrics = self.run_dir / "metrics.jsonl"
        self.offset = metrics.stat().st_size if metrics.is_file() else 0
        log = cfg.logging
        if log.tensorboard or log.tensorboard is None and importlib.util.find_spec("tensorboard") is not None:
            import yaml
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge_step)
            self.tensorboard.add_text("config", "```\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False) + "```")
        if log.wandb is not None and _wandb_mode(log.wandb.mode) != "disabled":
            self.wandb_prefixes: set[str] = set()
            try:
                self.wandb = _open_wandb(cfg, self.run_dir)
            except BaseException:
                self.close(ok=False)  # the TensorBoard writer opened above
                raise

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, *exc) -> None:
        self.close(ok=exc[0] is None)

    def update(self) -> None:
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        with open(path, "rb") as f:
            f.seek(self.offset)
            new = f.read()
        new = new[:new.rfind(b"\n") + 1]  # complete lines only
        self.offset += len(new)
        for line in new.decode("utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                self.log(record)

    def log(self, record: dict) -> None:
        """One metrics.jsonl record: an online step's (x = its step), or an offline stage's or iteration's line
        (x = its iteration); records without either (redo, verify) hold no numbers to plot."""
        stage = record.get("stage")
        if stage == "online":
            self._write("online", record["step"], _scalars(record))
        elif isinstance(stage, str) and isinstance(record.get("iteration"), int):
            self._write(stage, record["iteration"], _scalars(record, skip=("iteration",)))
            if stage == "train":
                self.train_steps(record["iteration"])

    def train_steps(self, iteration: int) -> None:
        """An iteration's optimizer steps (its train_log.jsonl), numbered after those of the earlier iterations."""
        offset = sum(_line_count(self.run_dir / f"iter-{t}" / "train_log.jsonl") for t in range(1, iteration))
        path = self.run_dir / f"iter-{iteration}" / "train_log.jsonl"
        for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
            record = json.loads(line)
            self._write("train_step", offset + record["step"], _scalars(record))

    def _write(self, prefix: str, x: int, values: dict) -> None:
        tags = {f"{prefix}/{k}": v for k, v in values.items()}
        if self.tensorboard is not None:
            for tag, value in tags.items():
                self.tensorboard.add_scalar(tag, value, x)
        if self.wandb is not None:
            x_key = STEP_OF.get(prefix, "iteration")
            if prefix not in self.wandb_prefixes:
                self.wandb.define_metric(f"{prefix}/*", step_metric=x_key)
                self.wandb_prefixes.add(prefix)
            self.wandb.log({x_key: x, **tags})

    def close(self, ok: bool = True) -> None:
        """Flush and close (once; later calls do nothing). A run that ended `ok` sends W&B the report's plots first;
        one that failed is marked failed there."""
        tensorboard, self.tensorboard = self.tensorboard, None
        if tensorboard is not None:
            tensorboard.close()
        run, self.wandb = self.wandb, None
        if run is not None:
            if ok:
                self._log_report_plots(run)
            run.finish(exit_code=0 if ok else 1)

    def _log_report_plots(self, run) -> None:
        """The plots of `rayalign report` for this run (written to <run-dir>/report/), as W&B images."""
        import wandb

        from rayalign.progress import console
        from rayalign.report import ReportError, report

        try:
            out = report(self.run_dir).parent
            images = {f"report/{png.stem}": wandb.Image(str(png)) for png in sorted(out.glob("*.png"))}
            if images:
                run.log(images)
        except ReportError:
            return
        except Exception as e:  # the run itself succeeded: a plot that cannot be made must not fail it
            why = str(e).strip().splitlines()[0][:300] if str(e).strip() else "no message"
            console.print(f"[yellow]warning[/]: the report's plots were not sent to W&B ({type(e).__name__}: {why}); "
                          f"the run's results are complete, and `rayalign report {self.run_dir}` draws the plots")


def _line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines()) if path.is_file() else 0


def _open_wandb(cfg: RunConfig, run_dir: Path):
    """A W&B run named after the recipe; its id is kept in the run directory, so a resumed run logs to the same
    W&B run. Files go under <run-dir>/wandb/ unless WANDB_DIR says otherwise."""
    import wandb

    w = cfg.logging.wandb
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id + "\n")
    mode = _wandb_mode(w.mode)
    try:
        run = wandb.init(project=w.project, entity=w.entity, mode=mode, id=run_id, resume="allow", name=cfg.name,
                         group=cfg.name.rpartition("/")[0] or None, config=json.loads(json.dumps(cfg.to_dict())),
                         dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
                         settings=wandb.Settings(console="off"))
    except Exception as e:
        why = str(e).strip().splitlines()[0][:300] if str(e).strip() else "no message"
        raise ConfigError(
            f"logging.wandb: W&B could not start the run (mode {mode}, project {w.project!r}"
            + (f", entity {w.entity!r}" if w.entity else "") + f"): {type(e).__name__}: {why}. Check "
            "logging.wandb's project and entity; for mode online run `wandb login` (it needs an API key and the "
            "network), or set "
            "logging.wandb.mode=offline (files under the run directory, upload later with `wandb sync`); or remove "
            "logging.wandb to run without W&B") from e
    for x_key in set(STEP_OF.values()):
        run.define_metric(x_key)
    return run
