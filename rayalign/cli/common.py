"""The `rayalign` command line: parse, load the config, call a pipeline."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console

from rayalign import __version__

console = Console()
err = Console(stderr=True)

OVERRIDE_HELP = "override a recipe setting, e.g. -o sampling.n=8 -o languages=[en,de] (repeatable)"


class UserError(click.ClickException):
    """A problem with the user's input: printed without a traceback, exit code 2."""

    exit_code = 2


def user_errors(fn):
    """Turn rayalign's input errors into clean messages (no traceback)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from rayalign.cluster.planner import PlanError
        from rayalign.cluster.spec import ClusterError
        from rayalign.config import ConfigError
        from rayalign.data.prompts import PromptError
        from rayalign.data.store import DatasetError
        from rayalign.eval.judge import JudgeError
        from rayalign.failures import CheckpointError, NonFiniteLossError, TrainerLostError
        from rayalign.generation import ActorsLostError, FailedRowsError
        from rayalign.integrations.openrlhf import OpenRLHFError
        from rayalign.models import ModelLoadError
        from rayalign.pipelines.study import StudyError
        from rayalign.report import ReportError
        from rayalign.scoring.rewards import RewardError
        from rayalign.training.data import TrainingDataError

        known = (ConfigError, PromptError, DatasetError, ModelLoadError, ClusterError, PlanError, FailedRowsError,
                 RewardError, JudgeError, StudyError, ReportError, TrainerLostError, TrainingDataError, CheckpointError,
                 ActorsLostError, NonFiniteLossError, OpenRLHFError)
        try:
            return fn(*args, **kwargs)
        except known as e:  # also as raised inside an actor: Ray's RayTaskError(cause) is an instance of the cause
            raise UserError(str(getattr(e, "cause", None) or e)) from None
        except OSError as e:  # a path that cannot be written or read: the path and the reason
            where = f"{e.filename}: " if e.filename else ""
            raise UserError(f"{where}{e.strerror or e}") from None
        except RecursionError:
            raise UserError("an input file is nested too deeply to read (a JSON or YAML value inside thousands of "
                            "brackets)") from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted: run the same command again to resume (finished stages, shards and "
                       "checkpoints are kept)", err=True)
            sys.exit(130)

    return wrapper


def load_recipe(recipe, overrides, *, sources: bool = True, models: bool = True, trackers: bool = True):
    """The recipe, validated; with `trackers` (commands that run the recipe, and config and plan), its trackers'
    packages and credentials present; with `sources`, its prompt set (and with `models`, its models) checked readable
    from here before Ray starts: a Hub name neither cached nor reachable is refused at once."""
    from rayalign.config import load_config
    from rayalign.data.hub import HubError
    from rayalign.preflight import check_sources
    from rayalign.tracking import check_trackers

    cfg = load_config(recipe, overrides)
    if trackers:
        check_trackers(cfg)
    if sources:
        try:
            check_sources(cfg, models=models)
        except HubError as e:
            raise UserError(str(e)) from None
    return cfg


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="rayalign")
def main():
    """rayalign: multilingual self-alignment of LLMs on Ray.

    \b
    Quick start (tiny offline model, CPU, a few minutes):
      rayalign launch --cluster local examples/quickstart.yaml
      rayalign inspect runs/quickstart
    """


CLUSTER_HELP = "cluster spec: a shipped name (local, a100x8, a100x64, h100x16, h200x8) or the path of a spec YAML"


def run_dir_of(cfg, run_dir) -> Path:
    return Path(run_dir) if run_dir else cfg.resolved_run_dir()


POLICY_HELP = "checkpoint to evaluate: initial (the recipe's policy), iter-N (the run's iteration N), online (an " \
              "online run's final policy), or a path; default: the run's latest trained policy, else initial"
