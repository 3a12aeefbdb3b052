"""Prompt sets read with datasets.load_dataset (hf:<dir or name>), and Hub names refused clearly when offline.

The Hub-layout directories are built here (data/<config>/*.parquet and a README with configs:); nothing
is downloaded. The offline tests use names that are not in any cache.
"""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from conftest import REPO
from rayalign.cli import main
from rayalign.data.prompts import PromptError, load_prompts

NOT_CACHED = "rayalign-tests/no-such-prompt-set"


def hub_layout(root, tables: dict[str, list[dict]]):
    """A dataset directory as the Hub lays it out: one config per key, data/<config>/train-*.parquet."""
    configs = []
    for name, rows in tables.items():
        (root / "data" / name).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), root / "data" / name / "train-00000-of-00001.parquet")
        configs.append({"config_name": name, "data_files": [{"split": "train", "path": f"data/{name}/train-*"}]})
    (root / "README.md").write_text("---\n" + yaml.safe_dump({"configs": configs}) + "---\n# prompts\n")
    return root


def per_language(tmp_path, langs=("en", "de", "fr"), ids=("q1", "q2")):
    return hub_layout(tmp_path / "ds", {lang: [{"question_id": i, "prompt": f"{lang} text {i}", "category": "x"}
                                              for i in ids] for lang in langs})


@pytest.fixture(autouse=True)
def restore_offline_env(monkeypatch):
    """The CLI sets HF_HUB_OFFLINE when the Hub cannot be reached: keep that inside each test."""
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(key, "0")


def test_one_config_per_language_with_column_mapping(tmp_path):
    ds = per_language(tmp_path)
    table = load_prompts(f"hf:{ds}", ["en", "de"], config="{lang}", columns={"prompt_id": "question_id"},
                         system_prompt="Be brief.")
    rows = table.to_pylist()
    assert [(r["prompt_id"], r["lang"]) for r in rows] == [("q1", "en"), ("q1", "de"), ("q2", "en"), ("q2", "de")]
    assert rows[1]["messages"] == [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "de text q1"}]
    assert rows[0]["source"] == f"hf:{ds}"


def test_one_table_with_a_language_column(tmp_path):
    rows = [{"id": i, "language": lang, "text": f"{lang}-{i}"} for i in (7, 3) for lang in ("en", "ru", "ja")]
    ds = hub_layout(tmp_path / "ds", {"default": rows})
    table = load_prompts(f"hf:{ds}", ["ru", "en"], columns={"prompt_id": "id", "instruction": "text",
                                                              "lang": "language"}, limit=1)
    assert [(r["prompt_id"], r["lang"], r["messages"][0]["content"]) for r in table.to_pylist()] == [
        ("3", "ru", "ru-3"), ("3", "en", "en-3")]


def test_a_missing_language_is_named_with_the_languages_the_dataset_has(tmp_path):
    ds = per_language(tmp_path)
    with pytest.raises(PromptError, match=r"no config for language\(s\) sw, ja .*it has configs: de, en, fr"):
        load_prompts(f"hf:{ds}", ["en", "sw", "ja"], config="{lang}", columns={"prompt_id": "question_id"})
    table = hub_layout(tmp_path / "t", {"default": [{"prompt_id": 1, "lang": lang, "instruction": "q"}
                                                    for lang in ("en", "de")]})
    with pytest.raises(PromptError, match=r"no rows for language\(s\) fr in column 'lang'; it has: de, en"):
        load_prompts(f"hf:{table}", ["en", "fr"])
    with pytest.raises(PromptError, match=r"no language column 'language' \(columns: prompt_id, lang, instruction\)"):
        load_prompts(f"hf:{table}", ["en"], columns={"lang": "language"})
    with pytest.raises(PromptError, match="no split 'test'"):
        load_prompts(f"hf:{table}", ["en"], split="test")


def test_parallel_checks_apply(tmp_path):
    uneven = hub_layout(tmp_path / "a", {"en": [{"question_id": "q1", "prompt": "a"}, {"question_id": "q2", "prompt": "b"}],
                                         "de": [{"question_id": "q1", "prompt": "c"}]})
    with pytest.raises(PromptError, match="1 prompt_id.s. lack languages: q2: de"):
        load_prompts(f"hf:{uneven}", ["en", "de"], config="{lang}", columns={"prompt_id": "question_id"})
    empty = hub_layout(tmp_path / "b", {"en": [{"question_id": "q1", "prompt": " "}]})
    with pytest.raises(PromptError, match=r"\[en/train\] row 0: empty prompt for prompt_id 'q1' \(en\)"):
        load_prompts(f"hf:{empty}", ["en"], config="{lang}", columns={"prompt_id": "question_id"})
    dup = hub_layout(tmp_path / "c", {"en": [{"question_id": "q1", "prompt": "a"}, {"question_id": "q1", "prompt": "b"}]})
    with pytest.raises(PromptError, match=r"row 1: duplicate \(prompt_id, lang\) \('q1', 'en'\)"):
        load_prompts(f"hf:{dup}", ["en"], config="{lang}", columns={"prompt_id": "question_id"})


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_hub_only_settings_on_sources_without_revisions_are_refused_at_config_check(tmp_path):
    """datasets ignores a revision for a local directory (it loads the directory as it is): refused, as are
    revision and config on a plain local prompt file, before anything runs."""
    per_language(tmp_path, langs=("en", "es", "de", "fr", "ru"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "hub", "prompts": {"path": "hf:ds", "config": "{lang}",
                                                                  "columns": {"prompt_id": "question_id"}}}))
    pinned = invoke("config", recipe, "-o", "prompts.revision=v2")
    assert pinned.exit_code == 2 and "prompts.revision: 'v2': hf:" in pinned.output and "no revisions" in pinned.output
    local = invoke("config", REPO / "examples" / "quickstart.yaml", "-o", "prompts.revision=v2")
    assert local.exit_code == 2 and "prompts.revision: applies to hf: sources" in local.output
    local = invoke("config", REPO / "examples" / "quickstart.yaml", "-o", "prompts.config={lang}")
    assert local.exit_code == 2 and "prompts.config: applies to hf: sources" in local.output
    local = invoke("config", REPO / "examples" / "quickstart.yaml", "-o", "prompts.split=test")  # was ignored
    assert local.exit_code == 2 and "prompts.split: applies to hf: sources" in local.output


def test_recipe_reads_a_local_hub_layout_relative_to_the_recipe(tmp_path):
    per_language(tmp_path, langs=("en", "es", "de", "fr", "ru"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "hub", "prompts": {"path": "hf:ds", "config": "{lang}",
                                                                  "columns": {"prompt_id": "question_id"}}}))
    result = invoke("config", recipe)
    assert result.exit_code == 0, result.output
    assert f"path: hf:{tmp_path / 'ds'}" in result.output
    bad = invoke("plan", recipe, "-o", "languages=[en,sw]", "-o", "anchor_language=en")
    assert bad.exit_code == 2 and "no config for language(s) sw" in bad.output


@pytest.mark.parametrize("forced_offline", [True, False])
def test_uncached_hub_names_fail_at_config_check_with_no_retries(forced_offline, monkeypatch):
    from rayalign.data.hub import hub_reachable

    if forced_offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    elif hub_reachable():
        pytest.skip("the Hugging Face Hub is reachable from here")
    quickstart = REPO / "examples" / "quickstart.yaml"
    for command in (["config"], ["plan"], ["launch", "--cluster", "local"]):
        result = invoke(*command, quickstart, "-o", f"prompts.path=hf:{NOT_CACHED}", "-o", "prompts.split=test")
        assert result.exit_code == 2, result.output
        assert f"prompts.path hf:{NOT_CACHED}: not in the local datasets cache" in result.output
        assert "Retrying" not in result.output and "Traceback" not in result.output
        if command == ["plan"]:  # a plan needs no weights, only sizes (test_cli_plan plans uncached 8B models)
            continue
        model = invoke(*command, quickstart, "-o", "policy.path=Qwen/Qwen2.5-0.5B-Instruct")
        assert model.exit_code == 2, model.output
        assert "policy.path: 'Qwen/Qwen2.5-0.5B-Instruct' is not a local directory and not in the Hugging Face cache" \
            in model.output


def test_shipped_hub_recipe_says_it_needs_the_dataset(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("config", REPO / "examples" / "hub-prompts-m-arenahard.yaml")
    assert result.exit_code == 2
    assert "prompts.path hf:CohereLabs/m-ArenaHard-v2.0 (config 'en'): not in the local datasets cache" in result.output


def test_local_hub_directories_of_one_name_and_an_edited_one_load_their_own_rows(tmp_path):
    """datasets caches a local directory with `configs:` by its name and file patterns alone: a second `ds` directory,
    or the first one edited, loaded the first one's cached rows."""
    first = per_language(tmp_path / "a")
    second = hub_layout(tmp_path / "b" / "ds", {lang: [{"question_id": i, "prompt": f"second {lang} {i}"}
                                                     for i in ("q1", "q2")] for lang in ("en", "de", "fr")})

    def read(ds):
        table = load_prompts(f"hf:{ds}", ["en", "de"], config="{lang}", columns={"prompt_id": "question_id"})
        return [r["messages"][0]["content"] for r in table.to_pylist()]

    assert read(first) == ["en text q1", "de text q1", "en text q2", "de text q2"]
    assert read(second) == ["second en q1", "second de q1", "second en q2", "second de q2"]
    pq.write_table(pa.Table.from_pylist([{"question_id": i, "prompt": f"edited {i}"} for i in ("q1", "q2")]),
                   first / "data" / "de" / "train-00000-of-00001.parquet")
    assert read(first) == ["en text q1", "edited q1", "en text q2", "edited q2"]


@pytest.mark.parametrize("config", ["{lang}_{x}", "{lang}{", "{}{lang}"])
def test_a_config_template_with_other_fields_is_refused_at_config_check(config):
    """A KeyError, ValueError or IndexError traceback from str.format once the prompts were read."""
    from rayalign.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"prompts.config: .*expected a config name, or a template whose only field "
                                          r"is \{lang\}"):
        load_config(None, ["prompts.path=hf:some/set", f"prompts.config={config!r}"])
    assert load_config(None, ["prompts.path=hf:some/set", "prompts.config=arena_{lang}"]).prompts.config == \
        "arena_{lang}"


def cached_hub_dataset(tmp_path, monkeypatch, name="me/prompts", langs=("en", "de")):
    """`name` in an offline datasets cache, one config per language, as datasets lays out a Hub dataset it has loaded
    (<namespace>___<name>/<config>/0.0.0/<hash>/): loaded here from a local directory, then filed under `name`."""
    import json
    import shutil

    import datasets

    src = per_language(tmp_path / "src", langs)
    cache = tmp_path / "hf-datasets"
    for lang in langs:
        datasets.load_dataset(str(src), lang, split="train", cache_dir=str(tmp_path / "local-cache"))
        built = next((tmp_path / "local-cache" / "ds" / lang / "0.0.0").glob("*/"))
        target = cache / name.replace("/", "___") / lang / "0.0.0" / built.name
        target.mkdir(parents=True)
        info = json.loads((built / "dataset_info.json").read_text()) | {"dataset_name": name.split("/")[1]}
        (target / "dataset_info.json").write_text(json.dumps(info))
        shutil.copy(built / "ds-train.arrow", target / f"{name.split('/')[1]}-train.arrow")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return name


def test_a_cached_hub_dataset_with_a_config_per_language_loads_offline(tmp_path, monkeypatch):
    """Offline, datasets lists only a "default" config for a cached dataset: the languages' configs were refused."""
    name = cached_hub_dataset(tmp_path, monkeypatch)
    table = load_prompts(f"hf:{name}", ["en", "de"], config="{lang}", columns={"prompt_id": "question_id"})
    assert [(r["prompt_id"], r["lang"], r["messages"][0]["content"]) for r in table.to_pylist()] == [
        ("q1", "en", "en text q1"), ("q1", "de", "de text q1"), ("q2", "en", "en text q2"), ("q2", "de", "de text q2")]
    with pytest.raises(PromptError, match=r"hf:me/prompts \(config 'fr'\): not in the local datasets cache"):
        load_prompts(f"hf:{name}", ["en", "fr"], config="{lang}", columns={"prompt_id": "question_id"})


def test_a_revision_is_refused_offline_where_the_cache_would_ignore_it(tmp_path, monkeypatch):
    import datasets

    name = cached_hub_dataset(tmp_path, monkeypatch)
    assert len(datasets.load_dataset(name, "de", split="train", revision="no-such-revision")) == 2  # ignored
    with pytest.raises(PromptError, match=r"prompts.revision: 'v2' cannot be checked: .* the datasets cache serves its copy of me/prompts whatever"):
        load_prompts(f"hf:{name}", ["en", "de"], config="{lang}", revision="v2", columns={"prompt_id": "question_id"})


def test_home_relative_saved_and_multi_config_directories(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HOME", str(tmp_path))
    per_language(tmp_path)  # ~/ds
    columns = {"prompt_id": "question_id"}
    assert load_prompts("hf:~/ds", ["en"], config="{lang}", columns=columns).num_rows == 2
    with pytest.raises(PromptError, match=r"hf:~?.*ds: it has several configs \(de, en, fr\); set prompts.config"):
        load_prompts("hf:~/ds", ["en"], columns=columns)
    rows = [{"id": "a", "lang": lang, "instruction": f"{lang} a"} for lang in ("en", "de")]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))  # one Dataset, not a DatasetDict
    assert [r["lang"] for r in load_prompts(f"hf:{tmp_path / 'saved'}", ["en", "de"],
                                            columns={"prompt_id": "id"}).to_pylist()] == ["en", "de"]


def test_a_source_lang_column_is_ignored_when_another_column_holds_the_language(tmp_path):
    rows = [{"id": "a", "language": lang, "lang": 3, "text": f"{lang}-a"} for lang in ("en", "de")]
    ds = hub_layout(tmp_path / "ds", {"default": rows})
    table = load_prompts(f"hf:{ds}", ["en", "de"], columns={"prompt_id": "id", "instruction": "text",
                                                             "lang": "language"})
    assert [(r["lang"], r["messages"][0]["content"]) for r in table.to_pylist()] == [("en", "en-a"), ("de", "de-a")]


def test_a_local_directory_without_data_files_is_refused_before_datasets_scans_it(tmp_path):
    """hf:../.. (the root folder) ran for minutes while datasets listed every file below it; a data file that does
    not parse said only "An error occurred while generating the dataset"."""
    (tmp_path / "empty" / "a" / "b").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no data here\n")
    with pytest.raises(PromptError, match="holds no dataset: no data files .* in it or its first two levels"):
        load_prompts(f"hf:{tmp_path / 'empty'}", ["en"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "train.json").write_text('{"a": [1, {"b"}\n')
    with pytest.raises(PromptError, match=r"cannot load \(.*; ArrowInvalid: JSON parse error"):
        load_prompts(f"hf:{tmp_path / 'broken'}", ["en"])
