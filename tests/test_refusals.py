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


def test_model_directories_every_actor_would_fail_on_are_refused_at_config_time(tmp_path, tiny_model):
    """No weights, a tokenizer that does not parse, no chat template, a missing directory, an unknown builtin: each
    refused by `rayalign config` (and so before a launch starts Ray), naming the key and the path."""
    import shutil

    def broken(name, change):
        path = tmp_path / name
        shutil.copytree(tiny_model, path)
        change(path)
        return path

    cases = {
        broken("noweights", lambda p: (p / "model.safetensors").unlink()): "no weights (expected model.safetensors",
        broken("badtok", lambda p: (p / "tokenizer.json").write_text("{\n oops")): "the tokenizer cannot be loaded",
        broken("nochat", lambda p: (p / "chat_template.jinja").unlink()): "the tokenizer has no chat template",
        "/nonexistent/model": "model directory not found",
        "builtin:nope": "no such builtin model (there is builtin:tiny-multilingual)",
    }
    recipe = Path(__file__).parents[1] / "examples" / "quickstart.yaml"
    for path, message in cases.items():
        result = CliRunner().invoke(main, ["config", str(recipe), "-o", f"policy.path={path}"])
        assert result.exit_code == 2, (path, result.output)
        assert f"policy.path: {path}" in " ".join(result.output.split()) and message in result.output, result.output
    assert CliRunner().invoke(main, ["config", str(recipe), "-o", f"policy.path={tiny_model}"]).exit_code == 0


def test_sampling_n_beyond_the_int32_sample_index_is_refused():
    with pytest.raises(ConfigError, match=r"sampling.n: expected a value <= 2147483647, got 2147483648"):
        load_config(None, ["sampling.n=2147483648"])
    assert load_config(None, ["sampling.n=64"]).sampling.n == 64


def test_a_user_reward_file_is_checked_at_config_time_without_running_it(tmp_path):
    """Missing, not Python, or without the function: refused by `rayalign config` (before any launch starts Ray);
    the file's code is not run there (it would print)."""
    recipe = Path(__file__).parents[1] / "examples" / "quickstart.yaml"
    reward = tmp_path / "reward.py"

    def config(text: str | None, function: str = "reward"):
        if text is not None:
            reward.write_text(text)
        return CliRunner().invoke(main, ["config", str(recipe), "-o", f"rewards.user.path={reward}",
                                         "-o", f"rewards.user.function={function}"])

    missing = config(None)
    assert missing.exit_code == 2 and f"rewards.user.path: {reward} not found" in " ".join(missing.output.split())
    broken = config("def reward(rows):\n    return [0.0 for r in rows\n")
    assert broken.exit_code == 2 and f"{reward}:2: not valid Python" in " ".join(broken.output.split())
    other = config("print('ran')\ndef score(rows):\n    return [0.0] * len(rows)\n")
    assert other.exit_code == 2 and "defines no function 'reward'" in other.output and "ran" not in other.output
    ok = config("print('ran')\nif True:\n    def reward(rows):\n        return [0.0] * len(rows)\n")
    assert ok.exit_code == 0 and "ran" not in ok.output


def test_hf_prompt_paths_that_are_empty_or_missing_local_directories_are_named_as_such():
    recipe = Path(__file__).parents[1] / "examples" / "quickstart.yaml"
    empty = CliRunner().invoke(main, ["config", str(recipe), "-o", "prompts.path=hf:"])  # YAML would read a mapping
    assert empty.exit_code == 2 and "expected hf:<dataset name or local dataset directory>" in empty.output
    local = CliRunner().invoke(main, ["config", str(recipe), "-o", "prompts.path=hf:./nope"])
    assert local.exit_code == 2 and "local dataset directory ./nope not found" in " ".join(local.output.split())


def test_a_check_across_keys_names_the_override_that_broke_it(tmp_path):
    recipe = Path(__file__).parents[1] / "examples" / "quickstart.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(recipe, ["languages=[de,fr]"])
    assert str(e.value).startswith(f"-o 'languages=[de,fr]' (with {recipe}): anchor_language: 'en' is not one of")
    broken = tmp_path / "recipe.yaml"
    broken.write_text("anchor_language: de\nlanguages: [en, fr]\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(broken))}: anchor_language"):
        load_config(broken, ["sampling.n=2"])  # the recipe's own mistake


def test_small_input_mistakes_are_named(tmp_path):
    """A study name taken from a file name with a space, an empty cluster spec, --stage on a dataset, upper-case
    language codes, `gold: true`: each named for what it is."""
    import json

    from rayalign.cluster.spec import ClusterError, load_cluster_spec
    from rayalign.config.study import StudyError, load_study
    from rayalign.data.prompts import PromptError, load_candidate_sets, load_prompts

    study = tmp_path / "my study.yaml"
    study.write_text(f"recipe: {Path(__file__).parents[1] / 'examples' / 'quickstart.yaml'}\ngrid: {{sampling.n: [2]}}\n")
    with pytest.raises(StudyError, match="got 'my study', taken from the file name: set name: in the file"):
        load_study(study)
    spec = tmp_path / "empty.yaml"
    spec.write_text("# nothing yet\n")
    with pytest.raises(ClusterError, match="expected a mapping of spec fields .* got an empty file"):
        load_cluster_spec(str(spec))
    dataset = tmp_path / "pairs"
    dataset.mkdir()
    (dataset / "manifest.json").write_text('{"schema": "pairs", "shards": []}')
    result = CliRunner().invoke(main, ["export", str(dataset), str(tmp_path / "out"), "--stage", "scores"])
    assert result.exit_code == 2 and "is a dataset itself" in " ".join(result.output.split())
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": "p1", "lang": lang, "instruction": "hi"}) + "\n"
                               for lang in ("EN", "DE")))
    with pytest.raises(PromptError, match=r"no prompts for languages \['en', 'de'\]; the file has DE, EN"):
        load_prompts(prompts, ["en", "de"])
    mc = tmp_path / "mc"
    mc.mkdir()
    for lang in ("en", "de"):
        (mc / f"{lang}.jsonl").write_text(json.dumps({"question_id": "q1", "question": "?", "candidates": ["a", "b"],
                                                      "gold": True}) + "\n")
    with pytest.raises(PromptError, match="gold must be an index into candidates"):
        load_candidate_sets(mc, ["en", "de"])


@pytest.mark.parametrize("row, expected", [
    ({"question": "a\ud800"}, "en.jsonl:1: question holds a lone surrogate (U+D800"),
    ({"candidates": ["a", "\udc80"]}, "en.jsonl:1: candidates[1] holds a lone surrogate"),
    ({"question_id": ""}, "en.jsonl:1: expected question_id and question as non-empty strings, got '' and '?'"),
    ({"question_id": 1}, "en.jsonl:1: expected question_id and question as non-empty strings, got 1 and '?'"),
])
def test_candidate_rows_that_are_not_text_are_named(tmp_path, row, expected):
    """A lone surrogate in a DCO candidate set was a UnicodeEncodeError traceback from pyarrow; an empty
    question_id was accepted."""
    import json

    from rayalign.data.prompts import PromptError, load_candidate_sets

    for lang in ("en", "de"):  # json.dumps writes lone surrogates as ASCII escapes, as a user's file may hold them
        fields = {"question_id": "q1", "question": "?", "candidates": ["a", "b"], "gold": 0}
        (tmp_path / f"{lang}.jsonl").write_text(json.dumps({**fields, **(row if lang == "en" else {})}) + "\n")
    with pytest.raises(PromptError, match=re.escape(expected)):
        load_candidate_sets(tmp_path, ["en", "de"])
