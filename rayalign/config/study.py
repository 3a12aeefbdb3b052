"""Study files: a base recipe, overrides and a grid of axes, read and checked into a Study; `expand` builds and
validates every run's RunConfig (the recipe loader's checks apply to each)."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from rayalign.config.fields import ConfigError, build_dataclass, config_field, read_yaml_file
from rayalign.config.run import RunConfig, load_config
from rayalign.config.sections import EvalConfig


SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")  # names that go into file names


RESERVED_COLUMNS = {"run", "run_dir", "status", "stage", "iteration", "policy", "pairs_rows", "loss_first",
                    "loss_mean", "reward_margin_mean", "accuracy_mean", "fidelity_mean", "steps", "dropped_too_long"}


RESERVED_PREFIXES = ("fidelity_", "seconds_", "eval_")


MAX_SLUG = 120


class StudyError(ValueError):
    """A study file that cannot be used, or a study with failed runs; the message names the file and the runs."""


@dataclass
class StudyConfig:
    """The keys of a study file, read by the same typed loader as a recipe's sections."""
    name: str | None = config_field(None, help="the study's name: its directory under runs_dir (letters, digits and "
                                    ". _ + -); null = the study file's name")
    recipe: str | None = config_field(None, help="the base recipe's path, relative to the study file (required)")
    runs_dir: str = config_field("runs", help="parent of the study directory, relative to the working directory")
    parallel: int = config_field(1, help="runs side by side, each on its own slice of the cluster (>= 1)")
    overrides: dict[str, Any] = config_field(factory=dict, help="settings for every run: config keys (dotted, as in "
                                             "-o key=value, or nested) and their values")
    grid: dict[str, Any] = config_field(factory=dict, help="the axes, crossed into runs: a config key and a list of "
                                        "values (a plain axis), or an axis name and a mapping of value names to "
                                        "overrides (a named axis)")
    eval: EvalConfig | None = config_field(None, help="evaluate each run's final policy (the options of rayalign "
                                           "eval); absent = no evaluation")


@dataclass
class Axis:
    name: str
    values: list  # plain axis: the config values; named axis: the names of its override sets
    overrides: list[list[str]]  # per value, the `key=value` overrides it applies
    named: bool


@dataclass
class Study:
    name: str
    path: Path  # the study file
    recipe: Path
    runs_dir: Path
    parallel: int
    overrides: list[str]
    axes: list[Axis]
    eval: dict | None  # keyword arguments of evaluate_policy; None = no evaluation

    @property
    def dir(self) -> Path:
        return self.runs_dir / self.name


@dataclass
class StudyRun:
    slug: str
    params: dict[str, Any]  # axis name -> value
    overrides: list[str]
    run_dir: Path
    cfg: RunConfig


def load_study(path: str | Path, *, runs_dir: str | Path | None = None) -> Study:
    """Read and check a study file; every run of its grid is built and validated (see `expand`).

    `runs_dir` replaces the file's runs_dir (default runs/, relative to the working directory like a recipe's
    run directory); the recipe and eval.candidates_path are relative to the study file.
    """
    path = Path(path).absolute()
    data = read_yaml_file(path, "study", StudyError)
    keys = ", ".join(f.name for f in fields(StudyConfig))
    if not isinstance(data, dict):
        raise StudyError(f"{path}: expected a mapping with keys {keys}, got {type(data).__name__}")
    if "eval" in data and data["eval"] is None:
        data["eval"] = {}  # `eval:` with nothing under it: evaluate with the defaults
    if "overrides" in data and not data["overrides"]:
        del data["overrides"]  # `overrides:` with every line commented out, or []
    if runs_dir is not None:
        data.pop("runs_dir", None)  # replaced by the caller's
    no_grid = StudyError(f"{path}: grid: expected a mapping of at least one axis (a config key: [values], or a "
                         f"name: {{value name: {{key: value, ...}}}}), got {data.get('grid')!r}")
    try:
        config = build_dataclass(StudyConfig, data, within="")
    except ConfigError as e:
        raise (no_grid if str(e).startswith("grid: expected a mapping,") else StudyError(f"{path}: {e}")) from None
    if not config.grid:
        raise no_grid
    name = config.name if config.name is not None else path.stem
    if not SAFE.fullmatch(name):
        given = "" if config.name is not None else ", taken from the file name: set name: in the file"
        raise StudyError(f"{path}: name: expected a name made of letters, digits and . _ + - (it names the study "
                         f"directory), got {name!r}{given}")
    if not config.recipe:
        raise StudyError(f"{path}: recipe: expected the base recipe's path, relative to the study file, got "
                         f"{config.recipe!r}")
    recipe = path.parent / config.recipe
    if not recipe.is_file():
        raise StudyError(f"{path}: recipe: {recipe} not found (the path is taken relative to the study file)")
    runs = runs_dir if runs_dir is not None else config.runs_dir
    if not str(runs):
        raise StudyError(f"{path}: runs_dir: expected a directory path, got {runs!r}")
    if config.parallel < 1:
        raise StudyError(f"{path}: parallel: expected an integer >= 1 (runs side by side), got {config.parallel}")
    eval_settings = None
    if config.eval is not None:  # the keys the file sets, as evaluate_policy's keyword arguments
        eval_settings = {key: getattr(config.eval, key) for key in data["eval"]}
        if eval_settings.get("candidates_path"):
            eval_settings["candidates_path"] = str(path.parent / eval_settings["candidates_path"])
    study = Study(name=name, path=path, recipe=recipe, runs_dir=Path(runs), parallel=config.parallel,
                  overrides=_flatten(config.overrides, path, "overrides"),
                  axes=[_axis(path, axis, values) for axis, values in config.grid.items()], eval=eval_settings)
    _check_keys(study)
    expand(study)
    return study


def _check_keys(study: Study) -> None:
    """A key set by two axes would make runs that differ only in their labels; name and run_dir are the study's."""
    def keys(overrides: list[str]) -> set[str]:
        return {o.partition("=")[0] for o in overrides}

    owner: dict[str, str] = {}
    for where, found in [("overrides", keys(study.overrides))] + [
            (f"grid.{axis.name}", set().union(*map(keys, axis.overrides))) for axis in study.axes]:
        for key in sorted(found):
            if key in ("name", "run_dir") or key.startswith(("name.", "run_dir.")):
                raise StudyError(f"{study.path}: {where}: {key} is set by the study (each run's directory is "
                                 f"runs_dir/name/<run>); use the study's name and runs_dir keys")
            if where == "overrides":
                continue
            clash = next((other for other in owner if key == other or key.startswith(other + ".")
                          or other.startswith(key + ".")), None)
            if clash is not None and owner[clash] != where:
                raise StudyError(f"{study.path}: {where} and {owner[clash]} both set {key}; runs would differ only "
                                 "in their labels. Set each key in one axis")
            owner[key] = where


def _axis(path: Path, name, values) -> Axis:
    where = f"{path}: grid.{name}"
    if not isinstance(name, str) or not SAFE.fullmatch(name):
        raise StudyError(f"{where}: expected an axis name made of letters, digits and . _ + - (it goes into run "
                         "directory names)")
    if name in RESERVED_COLUMNS or name.startswith(RESERVED_PREFIXES):
        raise StudyError(f"{where}: the name is taken by a results column; rename the axis")
    if isinstance(values, dict) and values:  # named axis: value name -> overrides
        for value, settings in values.items():
            if not isinstance(value, str) or not SAFE.fullmatch(value):
                raise StudyError(f"{where}: value name {value!r}: expected letters, digits and . _ + -")
            if not isinstance(settings or {}, dict):
                raise StudyError(f"{where}.{value}: expected a mapping of config keys to values, got {settings!r}")
        return Axis(name, list(values), [_flatten(s or {}, path, f"grid.{name}.{v}") for v, s in values.items()],
                    named=True)
    if not isinstance(values, list) or not values:
        raise StudyError(f"{where}: expected a non-empty list of values (a plain axis: the config key {name}) or a "
                         f"mapping of value names to overrides (a named axis), got {values!r}")
    for value in values:
        if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value)):
            raise StudyError(f"{where}: value {value!r}: a plain axis takes scalars or lists of scalars; use a named "
                             "axis for sets of settings")
        odd = next((v for v in (value if isinstance(value, list) else [value])
                    if not isinstance(v, (str, int, float, bool, type(None)))), None)
        if odd is not None:  # YAML reads 2024-01-01 as a date, !!binary as bytes
            raise StudyError(f"{where}: value {odd!r} is a YAML {type(odd).__name__}, not text or a number; quote it "
                             f"(\"{odd}\") if it is text")
    if len({json.dumps(v) for v in values}) != len(values):
        raise StudyError(f"{where}: duplicate values in {values!r}")
    return Axis(name, list(values), [[f"{name}={_yaml(v)}"] for v in values], named=False)


def _yaml(value) -> str:
    """A value as one line of YAML that reads back as the same value (as `-o key=VALUE` parses it)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, allow_unicode=True).strip()
    return text.removesuffix("...").strip()


def _flatten(mapping: dict, path: Path, where: str, prefix: str = "") -> list[str]:
    """{a.b: 1, c: {d: 2}} -> ["a.b=1", "c.d=2"]: nested mappings set single keys, they never replace a section."""
    out = []
    for key, value in mapping.items():
        if not isinstance(key, str) or not key or "=" in key:
            raise StudyError(f"{path}: {where}: key {key!r}: expected a config key such as sampling.n")
        if isinstance(value, dict) and value:
            out += _flatten(value, path, where, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={_yaml(value)}")
    return out


def run_slug(params: dict[str, Any]) -> str:
    """A readable, file-name-safe directory name for one point of the grid: method-lacomsa_prompts.limit-8."""
    def text(value) -> str:
        if isinstance(value, list):
            return "+".join(text(v) for v in value)
        raw = _yaml(value) if isinstance(value, (bool, type(None))) else str(value)
        return re.sub(r"[^A-Za-z0-9.+-]+", "-", raw).strip("-.") or "empty"

    slug = "_".join(f"{axis}-{text(value)}" for axis, value in params.items())
    if len(slug) > MAX_SLUG:  # keep it a valid file name; the hash keeps it unique and stable
        slug = slug[:MAX_SLUG - 9].rstrip("-_.+") + "-" + hashlib.sha1(slug.encode()).hexdigest()[:8]
    return slug


def expand(study: Study) -> list[StudyRun]:
    """The cartesian product of the axes, in file order; each run's config is loaded and validated."""
    runs, seen = [], {}
    for picks in itertools.product(*(range(len(axis.values)) for axis in study.axes)):
        params = {axis.name: axis.values[i] for axis, i in zip(study.axes, picks)}
        slug = run_slug(params)
        if slug in seen:
            raise StudyError(f"{study.path}: runs {seen[slug]} and {params} get the same directory name {slug!r}; "
                             "use a named axis to name the values")
        seen[slug] = params
        overrides = [*study.overrides, *(o for axis, i in zip(study.axes, picks) for o in axis.overrides[i]),
                     f"name={study.name}/{slug}"]
        try:
            cfg = load_config(study.recipe, overrides)
        except ConfigError as e:  # "-o 'key=value': ..." speaks of the command line; here the study file set it
            message = re.sub(r"^-o '([^']*)':", r"setting \1:", str(e))
            raise StudyError(f"{study.path}: run {slug}: {message}") from None
        runs.append(StudyRun(slug, params, overrides, study.dir / slug, cfg))
    return runs
