"""Inputs refused before any work starts, with the key or file and what was expected."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
from click.testing import CliRunner

from rayalign.cli import main
from rayalign.config import ConfigError, RunConfig, load_config


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def float_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    """Every config key that takes a float (alone, optional, or in a list)."""
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        args = typing.get_args(hint) or (hint,)
        sections = [a for a in args if dataclasses.is_dataclass(a)]
        if sections:
            keys += float_keys(sections[0], prefix + f.name + ".")
        elif float in args or any(typing.get_args(a) == (float,) for a in args):
            keys.append(prefix + f.name)
    return keys


def test_there_are_float_fields_to_check():
    assert {"sampling.temperature", "training.lr", "rewards.latent.alpha"} <= set(float_keys())


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("key", float_keys())
def test_every_float_field_refuses_non_finite_values(key, value):
    with pytest.raises(ConfigError, match=rf"^-o '{re.escape(key)}={re.escape(value)}': {re.escape(key)}: expected .*"
                                          r"finite number, got -?(nan|inf)"):
        load_config(None, [f"{key}={value}"])


def test_nan_temperature_exits_2_before_anything_runs(tmp_path):
    result = invoke("launch", "--run-dir", tmp_path / "run", Path(__file__).parents[1] / "examples" / "quickstart.yaml",
                    "-o", "sampling.temperature=.nan")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "sampling.temperature: expected a finite number, got nan" in "".join(result.output.split("\n"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["../../x", "/tmp/elsewhere", "a/../../b", "..", "a\\b", ""])
def test_a_run_name_that_leaves_runs_is_refused(name):
    with pytest.raises(ConfigError, match="is not a run name"):
        load_config(None, [f"name={name!r}"])


def test_nested_run_names_stay_under_runs():
    assert load_config(None, ["name=study/method-msa"]).resolved_run_dir() == Path("runs/study/method-msa")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_an_empty_recipe_is_refused(tmp_path, text):
    recipe = tmp_path / "empty.yaml"
    recipe.write_text(text)
    result = invoke("config", recipe)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{recipe}: the recipe is empty" in "".join(result.output.split("\n"))
