"""Security (issue 7): safe YAML only, no remote code unless the recipe says so, reward code only from the
recipe's path, and datasets of plain Parquet with no pickled Python objects."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from conftest import PROMPTS_DIR, REPO
from rayalign.cli import main
from rayalign.config import ConfigError, load_config


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# ---- YAML: safe loading only ----

@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/new:os.system",
                                 "!!python/name:os.system", "!!python/object:builtins.dict"])
def test_python_tags_in_a_recipe_are_refused_and_nothing_runs(tmp_path, tag):
    marker = tmp_path / "pwned"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: {tag} ['touch {marker}']\n")
    result = invoke("config", recipe)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert str(recipe) in "".join(result.output.split("\n")) and "malformed YAML" in result.output
    assert not marker.exists()
    result = invoke("config", "-o", f"name={tag} ['touch {marker}']")  # overrides are YAML values too
    assert result.exit_code == 2 and not marker.exists()


def test_python_tags_in_a_cluster_spec_are_refused(tmp_path):
    from rayalign.cluster import load_cluster_spec
    from rayalign.cluster.spec import ClusterError

    marker = tmp_path / "pwned"
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ClusterError, match=re.escape(str(spec))):
        load_cluster_spec(str(spec))
    assert not marker.exists()


def test_no_unsafe_yaml_or_pickle_in_the_package():
    """yaml.load only with the package's UniqueKeyLoader, which is the safe loader refusing duplicate keys."""
    import yaml

    from rayalign.config.fields import UniqueKeyLoader

    assert issubclass(UniqueKeyLoader, yaml.SafeLoader) and UniqueKeyLoader.yaml_constructors is not \
        yaml.UnsafeLoader.yaml_constructors
    pattern = re.compile(r"yaml\.(load|unsafe_load|full_load)\(|\bpickle\.loads?\(|yaml\.(Unsafe|Full)?Loader\b")
    found = [f"{p.relative_to(REPO)}:{n}" for d in ("rayalign", "actors", "pipelines", "cluster")
             for p in sorted((REPO / d).rglob("*.py"))
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if pattern.search(line) and "yaml.load(text, Loader=UniqueKeyLoader)" not in line]
    assert found == []
    with pytest.raises(yaml.constructor.ConstructorError):  # the tags only unsafe loaders construct are refused
        yaml.load("!!python/object/apply:os.system ['true']", Loader=UniqueKeyLoader)


# ---- trust_remote_code ----

def test_trust_remote_code_is_off_by_default_for_every_model():
    cfg = load_config(None, ["rewards.implicit.enabled=true", "rewards.reward_model.enabled=true",
                             "rewards.reward_model.model.path=/models/rm",
                             "rewards.implicit.reward_reference.path=/models/ref"])
    models = {"policy": cfg.policy,
              "implicit reward reference": cfg.rewards.implicit.reward_reference,
              "reward model": cfg.rewards.reward_model.model}
    assert {name: m.trust_remote_code for name, m in models.items()} == dict.fromkeys(models, False)
    assert load_config(None, ["policy.trust_remote_code=true"]).policy.trust_remote_code is True


def test_no_code_path_turns_remote_code_on_by_itself():
    """Every trust_remote_code argument in the package is a variable carried from the recipe, never `True`."""
    found = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for d in ("rayalign", "actors", "pipelines", "cluster")
             for p in sorted((REPO / d).rglob("*.py"))
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"trust_remote_code\s*=\s*True", line)]
    assert found == []


def test_loaders_and_engine_pass_the_recipes_value(tiny_model, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayalign.engines import create_engine

    seen = []
    for cls in (AutoTokenizer, AutoModelForCausalLM):
        original = cls.from_pretrained.__func__

        def recording(klass, path, *args, _original=original, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code")))
            return _original(klass, path, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(recording))
    for value in (False, True):
        cfg = load_config(None, [f"policy.path={tiny_model}", f"policy.trust_remote_code={value}"])
        seen.clear()
        create_engine("hf", tiny_model, dtype="float32", batch_size=2, trust_remote_code=cfg.policy.trust_remote_code)
        assert seen == [("AutoTokenizer", value), ("AutoModelForCausalLM", value)]


def test_generation_and_scoring_actors_pass_the_recipes_value():
    """The actors hand their ModelConfig's trust_remote_code to the engine (checked in the actor's source: the
    actor runs in another process)."""
    for path in ("actors/generator.py", "actors/scorer.py", "actors/trainer.py"):
        source = (REPO / path).read_text(encoding="utf-8")
        calls = re.findall(r"trust_remote_code\s*=\s*([\w.]+)", source)
        positional = re.findall(r"load_(?:causal_lm|tokenizer)\([^)]*trust_remote_code\)", source)
        assert calls or positional, path
        assert all(c.endswith("trust_remote_code") for c in calls), (path, calls)


@pytest.fixture
def remote_code_model(tiny_model, tmp_path) -> tuple[Path, Path]:
    """A copy of the tiny model whose config and tokenizer config point (auto_map) at a .py file that writes a
    marker file when it is imported."""
    model = tmp_path / "evil-model"
    shutil.copytree(tiny_model, model)
    marker = tmp_path / "remote-code-ran"
    (model / "modeling_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
        "class EvilConfig(LlamaConfig):\n    pass\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((model / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": [None, "modeling_evil.EvilTokenizer"]}
    (model / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return model, marker


def test_auto_map_code_does_not_run_without_trust_remote_code(remote_code_model):
    from rayalign.engines.hf import HFEngine
    from rayalign.models import load_causal_lm, load_tokenizer

    model, marker = remote_code_model
    cfg = load_config(None, [f"policy.path={model}"])
    assert cfg.policy.trust_remote_code is False
    tokenizer = load_tokenizer(str(model), cfg.policy.trust_remote_code)
    lm = load_causal_lm(str(model), "float32", "cpu", cfg.policy.trust_remote_code)
    engine = HFEngine(str(model), dtype="float32", device="cpu", batch_size=2,
                      trust_remote_code=cfg.policy.trust_remote_code)
    assert not marker.exists()
    assert type(lm).__name__ == type(engine.model).__name__ == "LlamaForCausalLM"
    assert "Evil" not in type(tokenizer).__name__
    assert not any("modeling_evil" in name for name in sys.modules)
    load_causal_lm(str(model), "float32", "cpu", trust_remote_code=True)  # the fixture's code does run when trusted
    assert marker.read_text() == "ran"


# ---- reward files: only from the path the recipe names ----

def test_reward_file_is_loaded_only_from_the_recipes_path(tmp_path, monkeypatch):
    import numpy as np

    from rayalign.scoring.rewards import load_user_reward, user_rewards

    marker = tmp_path / "imported-by-name"
    decoy_dir = tmp_path / "on_sys_path"
    decoy_dir.mkdir()
    (decoy_dir / "my_reward.py").write_text(f"open({str(marker)!r}, 'w').write('x')\ndef reward(g):\n"
                                            "    return [9.0] * len(g)\n")
    monkeypatch.syspath_prepend(str(decoy_dir))
    monkeypatch.chdir(decoy_dir)
    with pytest.raises(ConfigError, match=r"rewards\.user\.path: .*elsewhere/my_reward\.py not found"):
        load_user_reward(str(tmp_path / "elsewhere" / "my_reward.py"), "reward")
    with pytest.raises(ConfigError, match="not found"):
        load_user_reward("my_reward", "reward")  # a module name is not a path
    assert not marker.exists()

    named = tmp_path / "recipe_dir" / "my_reward.py"
    named.parent.mkdir()
    named.write_text("def reward(g):\n    return [1.5] * len(g)\n")
    table = pa.Table.from_pylist([{"prompt_id": "a", "lang": "en", "sample_idx": 0, "response": "x"}])
    assert user_rewards(table, str(named), "reward").tolist() == [1.5]
    assert not marker.exists() and "my_reward" not in sys.modules
    assert np.all(user_rewards(table, str(named), "reward") == 1.5)


def test_relative_reward_path_resolves_from_the_recipe_not_the_working_directory(tmp_path, monkeypatch):
    recipe_dir, cwd = tmp_path / "recipes", tmp_path / "cwd"
    (recipe_dir / "rewards").mkdir(parents=True)
    (cwd / "rewards").mkdir(parents=True)
    (recipe_dir / "rewards" / "r.py").write_text("def reward(g):\n    return [1.0] * len(g)\n")
    (cwd / "rewards" / "r.py").write_text("def reward(g):\n    return [2.0] * len(g)\n")
    (recipe_dir / "recipe.yaml").write_text("rewards: {user: {path: rewards/r.py}}\n")
    monkeypatch.chdir(cwd)
    cfg = load_config(recipe_dir / "recipe.yaml")
    assert cfg.rewards.user.path == str(recipe_dir / "rewards" / "r.py")


# ---- datasets: plain Parquet, no pickle ----

PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def plain_types(dtype: pa.DataType) -> list[str]:
    """Types inside `dtype` that are not plain Arrow data (binary blobs, extension types)."""
    if isinstance(dtype, pa.ExtensionType):
        return [str(dtype)]
    if pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype) or pa.types.is_fixed_size_binary(dtype):
        return [str(dtype)]
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype):
        return plain_types(dtype.value_type)
    if pa.types.is_struct(dtype):
        return [t for i in range(dtype.num_fields) for t in plain_types(dtype.field(i).type)]
    if pa.types.is_map(dtype):
        return plain_types(dtype.key_type) + plain_types(dtype.item_type)
    return []


@pytest.fixture(scope="module")
def quickstart_like_run(tmp_path_factory, tiny_model, ray_session):
    tmp = tmp_path_factory.mktemp("plain")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(f"name: plain\nlanguages: [en, de]\npolicy: {{path: {tiny_model}}}\n"
                      f"prompts: {{path: {PROMPTS_DIR}, limit: 2}}\n"
                      "sampling: {n: 2, max_new_tokens: 8, seed: 2}\n"
                      "engines: {count: 1, batch_size: 8, shard_rows: 2}\n"
                      "rewards: {latent: {enabled: true}, actors: 1}\npairs: {method: lacomsa}\n")
    result = invoke("launch", recipe, "--run-dir", tmp / "run")
    assert result.exit_code == 0, result.output
    return tmp / "run"


def test_every_shard_is_plain_parquet_without_pickle(quickstart_like_run, pairs_dataset):
    shards = sorted(quickstart_like_run.rglob("*.parquet")) + sorted(Path(pairs_dataset).glob("*.parquet"))
    datasets = {p.parent.name for p in shards}
    assert {"samples", "scores", "pairs"} <= datasets
    for shard in shards:
        metadata = pq.read_metadata(shard).metadata or {}
        for key, value in metadata.items():
            assert key not in (b"pandas",), (shard, key)  # no pandas round-trip metadata
            assert not value.startswith(PICKLE_MAGIC) and b"py_extension_type" not in value, (shard, key)
            assert b"ARROW:extension" not in key, (shard, key)
        schema = pq.read_schema(shard)
        assert [(f.name, plain_types(f.type)) for f in schema if plain_types(f.type)] == [], shard
        table = pq.read_table(shard)  # plain pyarrow: no pandas, no extension types registered
        assert table.num_rows >= 0 and all(not isinstance(f.type, pa.ExtensionType) for f in table.schema)
        for field in table.schema:
            assert field.metadata is None or not any(v.startswith(PICKLE_MAGIC) for v in field.metadata.values())
    manifest_files = sorted(quickstart_like_run.rglob("manifest.json"))
    assert manifest_files and all(json.loads(p.read_text()) for p in manifest_files)  # JSON, not pickle
