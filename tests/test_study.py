"""Studies: grid expansion, study-file checks, results collection, and a real tiny study end to end."""

from __future__ import annotations

import datetime
import json
import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import REPO
from rayalign.data.schemas import schema_for
from rayalign.data.store import DatasetWriter, read_dataset
from rayalign.config.study import run_slug
from rayalign.pipelines.study import StudyError, collect_results, expand, load_study, run_study, write_study_json

QUICKSTART = REPO / "examples" / "quickstart.yaml"


def study_file(tmp_path: Path, **fields) -> Path:
    data = {"name": "s", "recipe": str(QUICKSTART), "runs_dir": str(tmp_path / "runs"), **fields}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


METHODS = {"lacomsa": {"rewards.latent.enabled": True, "pairs.method": "lacomsa"},
           "msa": {"rewards.latent.enabled": True, "pairs.method": "msa"}}


# ---- the grid ----

def test_grid_is_the_cartesian_product_in_file_order(tmp_path):
    path = study_file(tmp_path, overrides={"iterations": 1, "training": {"lr": 1e-5}},
                      grid={"method": METHODS, "prompts.limit": [8, 16],
                            "languages": [["en", "es"], ["en", "de", "fr"]]})
    study = load_study(path)
    runs = expand(study)
    assert len(runs) == 2 * 2 * 2
    assert [r.slug for r in runs[:3]] == ["method-lacomsa_prompts.limit-8_languages-en+es",
                                          "method-lacomsa_prompts.limit-8_languages-en+de+fr",
                                          "method-lacomsa_prompts.limit-16_languages-en+es"]
    last = runs[-1]
    assert last.params == {"method": "msa", "prompts.limit": 16, "languages": ["en", "de", "fr"]}
    assert last.overrides == ["iterations=1", "training.lr=1.0e-05", "rewards.latent.enabled=true",
                              "pairs.method=msa", "prompts.limit=16", "languages=[en, de, fr]",
                              f"name=s/{last.slug}"]
    assert last.run_dir == tmp_path / "runs" / "s" / last.slug
    cfg = last.cfg
    assert (cfg.pairs.method, cfg.prompts.limit, cfg.languages, cfg.iterations) == ("msa", 16, ["en", "de", "fr"], 1)
    assert cfg.training.lr == 1e-5 and cfg.training.loss == "dpo"  # a nested override sets one key, not the section
    assert cfg.prompts.path == str(QUICKSTART.parent / "data/prompts")  # resolved as `rayalign launch` does
    assert [a.named for a in study.axes] == [True, False, False]


def test_named_axis_values_are_their_names_and_plain_ones_their_values(tmp_path):
    grid = {"model": {"tiny": {"policy.path": "builtin:tiny-multilingual"},
                      "small": {"policy": {"path": "/models/small", "dtype": "float32"}}},
            "sampling.n": [2, 4], "iterations": [1]}
    runs = expand(load_study(study_file(tmp_path, grid=grid)))
    assert [r.params["model"] for r in runs] == ["tiny", "tiny", "small", "small"]
    assert [r.cfg.sampling.n for r in runs] == [2, 4, 2, 4]
    assert runs[2].cfg.policy.path == "/models/small" and runs[2].cfg.policy.dtype == "float32"
    assert runs[3].slug == "model-small_sampling.n-4_iterations-1"


def test_slugs_are_safe_and_stable(tmp_path):
    odd = {"policy.path": "/models/Llama 3: 8B/", "training.lr": 5e-7, "x": None, "flag": True,
           "languages": ["en", "zh"]}
    slug = run_slug(odd)
    assert slug == "policy.path-models-Llama-3-8B_training.lr-5e-07_x-null_flag-true_languages-en+zh"
    assert re.fullmatch(r"[A-Za-z0-9._+-]+", slug) and run_slug(dict(odd)) == slug
    long = run_slug({"languages": ["en", "es", "de", "fr", "ru", "zh", "ja", "ko", "ar", "hi"] * 4})
    assert len(long) <= 120 and long == run_slug({"languages": ["en", "es", "de", "fr", "ru", "zh", "ja", "ko",
                                                               "ar", "hi"] * 4})
    path = study_file(tmp_path, grid={"method": METHODS, "prompts.limit": [4, 8]})
    assert [r.slug for r in expand(load_study(path))] == [r.slug for r in expand(load_study(path))]


# ---- bad study files ----

@pytest.mark.parametrize("fields, expected", [
    ({"grid": {"prompts.limit": [4]}, "gird": 1}, "gird: unknown key (expected one of: name, recipe, runs_dir, "
                                                  "parallel, overrides, grid, eval)"),
    ({"grid": {}}, "grid: expected a mapping of at least one axis"),
    ({"grid": {"prompts.limit": []}}, "grid.prompts.limit: expected a non-empty list"),
    ({"grid": {"prompts.limit": [4, 4]}}, "duplicate values"),
    ({"grid": {"policy": ["a"]}}, "grid.policy: the name is taken by a results column"),
    ({"grid": {"policy.path": ["a/b", "a b"]}}, "get the same directory name 'policy.path-a-b'"),
    ({"grid": {"prompts.limit": [4]}, "parallel": 0}, "parallel: expected an integer >= 1"),
    ({"grid": {"prompts.limit": [4]}, "eval": {"samples": 0}}, "eval.samples: expected a value >= 1"),
    ({"grid": {"prompts.limit": [4]}, "eval": {"judge": 1}}, "eval.judge: unknown key"),
    ({"grid": {"prompts.limit": [4]}, "eval": {"likelihood": "max"}},
     "eval.likelihood: expected one of sum, mean, sequence_mean"),
    ({"grid": {1: [4]}}, "grid: key 1: expected a string, got int"),
    ({"gird": {"prompts.limit": [4]}}, "gird: unknown key (expected one of: name, recipe,"),
    ({"grid": None}, "grid: expected a mapping of at least one axis"),
    ({"grid": [4]}, "grid: expected a mapping of at least one axis"),
    ({"grid": {"prompts.limit": [4]}, "recipe": 5}, "recipe: expected a string, got int 5"),
    ({"grid": {"prompts.limit": [4]}, "parallel": True}, "parallel: expected an integer, got bool True"),
    ({"grid": {"prompts.limit": [4]}, "eval": 3}, "eval: expected a mapping, got int 3"),
    ({"grid": {"prompts.limit": [4]}, "runs_dir": ["a"]}, "runs_dir: expected a string, got list ['a']"),
    ({"grid": {"sampling.n": [2, 3], "m": {"x": {"sampling": {"n": 4}}}}},
     "grid.m and grid.sampling.n both set sampling.n; runs would differ only in their labels"),
    ({"grid": {"sampling.n": [2, 3], "m": {"x": {"sampling.n": 4, "sampling.top_p": 0.9}}}},
     "grid.m and grid.sampling.n both set sampling.n"),
    ({"grid": {"name": ["a", "b"]}}, "grid.name: name is set by the study"),
    ({"grid": {"prompts.limit": [4]}, "overrides": {"run_dir": "x"}}, "overrides: run_dir is set by the study"),
    ({"grid": {"sampling.n": [1]}}, "run sampling.n-1: setting sampling.n=1: sampling.n: latent rewards"),
    ({"grid": {"prompts.revision": [datetime.date(2024, 1, 1), "main"]}},  # a TypeError traceback from json.dumps
     "grid.prompts.revision: value datetime.date(2024, 1, 1) is a YAML date, not text or a number; quote it "
     '("2024-01-01")'),
    ({"grid": {"prompts.revision": [[b"v1"]]}}, "grid.prompts.revision: value b'v1' is a YAML bytes"),
])
def test_bad_study_files_are_refused_with_the_key(tmp_path, fields, expected):
    with pytest.raises(StudyError, match=re.escape(expected)) as info:
        load_study(study_file(tmp_path, **fields))
    assert str(tmp_path / "study.yaml") in str(info.value)


@pytest.mark.parametrize("content, expected", [
    (b"grid: {prompts.limit: [4\n", "malformed YAML"),
    (b"name: caf\xe9\n", "not valid UTF-8 (invalid continuation byte at byte 9)"),
])
def test_unreadable_study_files_are_named(tmp_path, content, expected):
    path = tmp_path / "study.yaml"
    path.write_bytes(content)
    with pytest.raises(StudyError, match=re.escape(f"{path}: {expected}")):
        load_study(path)
    with pytest.raises(StudyError, match=re.escape(f"{tmp_path / 'none.yaml'}: study file not found")):
        load_study(tmp_path / "none.yaml")


def test_empty_sections_mean_the_defaults(tmp_path):
    assert load_study(study_file(tmp_path, grid={"prompts.limit": [4]}, eval=None)).eval == {}
    assert load_study(study_file(tmp_path, grid={"prompts.limit": [4]})).eval is None
    for empty in (None, [], {}):  # `overrides:` with every line commented out
        assert load_study(study_file(tmp_path, grid={"prompts.limit": [4]}, overrides=empty)).overrides == []
    # the caller's runs directory replaces the file's, which is then not read
    study = load_study(study_file(tmp_path, grid={"prompts.limit": [4]}, runs_dir=""), runs_dir=tmp_path / "other")
    assert study.dir == tmp_path / "other" / "s"


def test_config_lists_the_study_file_keys_from_the_loader(tmp_path):
    from click.testing import CliRunner

    from rayalign.cli import main

    listed = CliRunner().invoke(main, ["config", "--study"], terminal_width=200)
    assert listed.exit_code == 0, listed.output
    for key in ("name", "recipe", "runs_dir", "parallel", "overrides", "grid", "eval.likelihood", "eval.samples"):
        assert re.search(rf"^. {re.escape(key)} ", listed.output, re.M), key
    assert "sampling.temperature" not in listed.output
    refused = CliRunner().invoke(main, ["config", "--study", str(REPO / "examples" / "quickstart.yaml")])
    assert refused.exit_code == 2 and "give it alone" in refused.output


def test_study_eval_takes_every_setting_rayalign_eval_takes(tmp_path):
    """The eval section is checked as EvalConfig, like `rayalign eval`'s options: every likelihood and accuracy
    mode the command offers is accepted in a study file too."""
    study = load_study(study_file(tmp_path, grid={"prompts.limit": [4]},
                                  eval={"likelihood": "sequence_mean", "accuracy": "continuation", "samples": 2}))
    assert study.eval == {"likelihood": "sequence_mean", "accuracy": "continuation", "samples": 2}


def test_a_value_that_breaks_a_run_names_the_study_file_the_run_and_the_key(tmp_path):
    path = study_file(tmp_path, grid={"method": METHODS, "sampling.n": [4, 1]})
    with pytest.raises(StudyError) as info:
        load_study(path)
    message = str(info.value)
    assert message.startswith(f"{path}: run method-lacomsa_sampling.n-1: ")
    assert "sampling.n: latent rewards score each anchor response" in message
    path = study_file(tmp_path, grid={"prompts.limt": [4]})
    with pytest.raises(StudyError, match=re.escape("run prompts.limt-4: override prompts.limt: unknown key 'limt'")):
        load_study(path)


def test_a_missing_base_recipe_is_named(tmp_path):
    path = study_file(tmp_path, recipe="nowhere.yaml", grid={"prompts.limit": [4]})
    with pytest.raises(StudyError, match=re.escape(f"{path}: recipe: {tmp_path / 'nowhere.yaml'} not found")):
        load_study(path)


def test_missing_prompts_or_models_stop_the_study_before_anything_runs(tmp_path):
    path = study_file(tmp_path, grid={"languages": [["en", "es"], ["en", "ja"]]})
    with pytest.raises(StudyError, match=re.escape("run languages-en+ja: ") + ".*no prompt file for language 'ja'"):
        run_study(path)
    path = study_file(tmp_path, grid={"policy.path": [str(tmp_path / "no-model")]})
    missing = re.escape(f"{path}: run policy.path-") + ".*no-model: model directory not found"
    with pytest.raises(StudyError, match=missing):
        run_study(path)
    assert not (tmp_path / "runs").exists()


# ---- results ----

def write_run(run_dir: Path, records: list[dict]) -> None:
    run_dir.mkdir(parents=True)
    lines = [{"iteration": r["iteration"], "stage": "generate", "rows": 1} for r in records]
    lines += [{"stage": "iteration", **r} for r in records]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def eval_row(metric, value, lang="all", stat="mean", layer=None, other_lang=None):
    return {"policy": "iter-2/policy", "metric": metric, "stat": stat, "lang": lang, "other_lang": other_lang,
            "layer": layer, "value": value, "count": 10}


def test_results_collect_iterations_axes_and_the_final_evaluation(tmp_path):
    study_dir = tmp_path / "s"
    write_run(study_dir / "a", [
        {"iteration": 1, "policy": "p0", "pairs_rows": 10, "loss_mean": 0.69, "fidelity_en": 1.0, "fidelity_es": 0.5,
         "seconds_generate": 3.0},
        {"iteration": 2, "policy": "iter-1/policy", "pairs_rows": 12, "loss_mean": 0.6, "fidelity_en": 0.9,
         "fidelity_es": 0.6, "seconds_generate": 2.5}])
    write_run(study_dir / "b", [{"iteration": 1, "policy": "p0", "pairs_rows": 20, "fidelity_en": 0.8,
                                 "fidelity_es": 0.7, "fidelity_de": 0.3, "seconds_train": 4.0}])
    (study_dir / "c").mkdir()  # failed before any iteration
    rows = [eval_row("fidelity", 0.75, stat="share"), eval_row("fidelity", 0.9, "en", "share"),
            eval_row("fidelity", 0.6, "es", "share"), eval_row("response_tokens", 12.0),
            eval_row("rankc", 0.4), eval_row("rankc", 0.3, "en", other_lang="es"), eval_row("accuracy", 0.55),
            eval_row("silhouette", 0.1, layer=0), eval_row("silhouette", 0.35, layer=2),
            eval_row("silhouette", 0.2, layer=4), eval_row("r_lacomsa", 0.12), eval_row("r_lacomsa", 0.5, stat="max"),
            eval_row("judge_win_rate", 0.25, stat="share"), eval_row("lpr", 0.8, "ru", "share"),
            eval_row("lpr", 0.9, stat="share"), eval_row("wpr", 0.5, stat="share"), eval_row("lcpr", 0.6, stat="share")]
    writer = DatasetWriter(study_dir / "a" / "eval" / "final" / "results", "eval")
    writer.write_shard(0, pa.Table.from_pylist(rows, schema=schema_for("eval")[1]))
    writer.finalize(expected_shards=1)
    write_study_json(study_dir, {"name": "s", "study_file": "study.yaml", "axes": ["method", "languages"], "runs": [
        {"run": "a", "params": {"method": "msa", "languages": ["en", "es"]}, "status": "finished"},
        {"run": "b", "params": {"method": "lacomsa", "languages": ["en", "es", "de"]}, "status": "finished"},
        {"run": "c", "params": {"method": "icr", "languages": ["en"]}, "status": "failed"}]})

    table = collect_results(study_dir)
    assert table.equals(pq.read_table(study_dir / "results.parquet"))
    assert table.column_names[:6] == ["run", "run_dir", "status", "method", "languages", "iteration"]
    assert table.schema.field("languages").type == pa.list_(pa.string())
    got = table.to_pylist()
    assert [(r["run"], r["iteration"], r["method"]) for r in got] == [("a", 1, "msa"), ("a", 2, "msa"),
                                                                      ("b", 1, "lacomsa")]
    assert [r["fidelity_mean"] for r in got] == pytest.approx([0.75, 0.75, 0.6])  # (0.8 + 0.7 + 0.3) / 3
    assert got[0]["fidelity_de"] is None and got[2]["seconds_generate"] is None and got[2]["seconds_train"] == 4.0
    assert got[2]["languages"] == ["en", "es", "de"] and got[1]["run_dir"] == str(study_dir / "a")
    final = {k: v for k, v in got[1].items() if k.startswith("eval_")}
    assert final == {"eval_fidelity_mean": 0.75, "eval_fidelity_en": 0.9, "eval_fidelity_es": 0.6,
                     "eval_rankc_mean": 0.4, "eval_accuracy_mean": 0.55, "eval_silhouette_max": 0.35,
                     "eval_r_lacomsa_mean": 0.12, "eval_judge_win_rate": 0.25, "eval_lpr": 0.9, "eval_wpr": 0.5,
                     "eval_lcpr": 0.6}
    assert all(v is None for r in (got[0], got[2]) for k, v in r.items() if k.startswith("eval_"))


# ---- running (offline.run replaced: failures, skipping) ----

def test_a_failed_run_is_recorded_and_the_others_go_on(tmp_path, monkeypatch, ray_session):
    from rayalign.pipelines import offline

    calls = []

    def fake_run(cfg, run_dir, *, cluster, address, planned):
        calls.append(run_dir.name)
        if cfg.prompts.limit == 8 and cfg.pairs.method == "msa":
            raise RuntimeError("engine exploded\nout of memory on shard 3")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").write_text(json.dumps(
            {"iteration": 1, "stage": "iteration", "pairs_rows": cfg.prompts.limit, "fidelity_en": 1.0}) + "\n")
        (run_dir / "state.json").write_text(json.dumps({"config_hash": cfg.config_hash(),
                                                        "finished": ["iter-1/summary"]}))
        return run_dir

    monkeypatch.setattr(offline, "run", fake_run)
    path = study_file(tmp_path, overrides={"iterations": 1, "training.num_cpus": 1},
                      grid={"method": METHODS, "prompts.limit": [4, 8]})
    lines = []
    with pytest.raises(StudyError, match=re.escape("1 of 4 run(s) failed: method-msa_prompts.limit-8 (RuntimeError: "
                                                   "out of memory on shard 3; log ")):
        run_study(path, progress=lines.append)
    study_dir = tmp_path / "runs" / "s"
    record = json.loads((study_dir / "study.json").read_text())
    assert [e["status"] for e in record["runs"]] == ["finished", "finished", "finished", "failed"]
    failed = record["runs"][-1]
    assert failed["error"] == "RuntimeError: out of memory on shard 3"
    assert "engine exploded" in Path(failed["log"]).read_text()
    assert pq.read_table(study_dir / "results.parquet").column("pairs_rows").to_pylist() == [4, 8, 4]
    assert "study s: run 4/4 method-msa_prompts.limit-8 failed" in "\n".join(lines)

    calls.clear()
    with pytest.raises(StudyError):
        run_study(path, progress=lines.append)
    assert calls == ["method-msa_prompts.limit-8"]  # finished runs are kept, the failed one is retried


def test_the_error_of_a_launch_log_is_its_last_error_line(tmp_path):
    from rayalign.pipelines.study import _log_error

    log = tmp_path / "launch.log"
    log.write_text("==> launch ...\nTraceback (most recent call last):\n  File x\nray.exceptions.RayActorError: "
                   "actor died\n\n(raylet) shutting down\n")
    assert _log_error(log) == "ray.exceptions.RayActorError: actor died"
    log.write_text("plan ...\nError: prompts.limit: expected a value >= 1, got 0\n")
    assert _log_error(log) == "Error: prompts.limit: expected a value >= 1, got 0"


# ---- a real tiny study ----

def e2e_study(tmp_path: Path, tiny_model: str, grid: dict, **fields) -> Path:
    overrides = {"iterations": 1, "languages": ["en", "es", "de"], "policy.path": tiny_model,
                 "sampling": {"n": 4, "max_new_tokens": 16}, "engines.count": 1, "rewards.actors": 1,
                 "training": {"micro_batch_size": 4, "gradient_accumulation": 1, "num_cpus": 1}}
    return study_file(tmp_path, name="tiny", overrides=overrides, grid=grid, **fields)


def test_a_tiny_study_runs_collects_and_skips_on_a_second_call(tmp_path, tiny_model, ray_session):
    import shutil

    from conftest import PROMPTS_DIR

    prompts = tmp_path / "prompts"
    shutil.copytree(PROMPTS_DIR, prompts)
    path = e2e_study(tmp_path, tiny_model, {"method": METHODS, "prompts.limit": [4]},  # 2 runs: a short test
                     eval={"prompts_limit": 2, "samples": 2})
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, "overrides": {**data["overrides"], "prompts.path": str(prompts)}}))
    started = time.perf_counter()
    study_dir = run_study(path, progress=print)
    print(f"tiny study: {time.perf_counter() - started:.1f} s")
    assert study_dir == tmp_path / "runs" / "tiny"
    slugs = ["method-lacomsa_prompts.limit-4", "method-msa_prompts.limit-4"]
    for slug in slugs:
        state = json.loads((study_dir / slug / "state.json").read_text())
        assert state["finished"][-1] == "iter-1/summary" and "iter-1/train" in state["finished"]
    record = json.loads((study_dir / "study.json").read_text())
    assert [(e["run"], e["status"]) for e in record["runs"]] == [(s, "finished") for s in slugs]
    rows = pq.read_table(study_dir / "results.parquet").to_pylist()
    assert [(r["method"], r["prompts.limit"]) for r in rows] == [("lacomsa", 4), ("msa", 4)]
    for row, slug in zip(rows, slugs):  # fidelity: the share of the iteration's samples detected in their language
        samples = read_dataset(study_dir / slug / "iter-1" / "samples", "samples").to_pylist()
        for lang in ("en", "es", "de"):
            mine = [r["lang_detected"] == lang for r in samples if r["lang"] == lang]
            assert row[f"fidelity_{lang}"] == pytest.approx(sum(mine) / len(mine))
        assert row["fidelity_mean"] == pytest.approx(sum(row[f"fidelity_{x}"] for x in ("en", "es", "de")) / 3)
        assert row["pairs_rows"] > 0 and row["loss_first"] == pytest.approx(0.693147, abs=1e-3)
    for row, slug in zip(rows, slugs):  # each final policy evaluated: the eval columns are its results
        results = read_dataset(study_dir / slug / "eval" / "final" / "results", "eval").to_pylist()
        fidelity = {r["lang"]: r["value"] for r in results if r["metric"] == "fidelity"}
        assert row["eval_fidelity_mean"] == fidelity["all"] and row["eval_fidelity_es"] == fidelity["es"]
        assert row["eval_silhouette_max"] == max(r["value"] for r in results
                                                 if r["metric"] == "silhouette" and r["lang"] == "all")
        assert row["eval_r_lacomsa_mean"] == next(r["value"] for r in results if r["metric"] == "r_lacomsa"
                                                  and r["stat"] == "mean" and r["lang"] == "all")
        assert {r["policy"] for r in results} == {"iter-1/policy"}

    watched = [study_dir / s / f for s in slugs for f in ("state.json", "metrics.jsonl",
                                                          "eval/final/results/manifest.json")]
    before = {f: f.read_bytes() for f in watched}
    lines = []
    run_study(path, progress=lines.append)
    assert {f: f.read_bytes() for f in before} == before
    assert "2 run(s), 2 finished earlier, 0 to run" in lines[0]
    assert pq.read_table(study_dir / "results.parquet").num_rows == 2

    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, "eval": {**data["eval"], "silhouette_prompts": 0}}))  # only evals rerun
    run_study(path, progress=lines.append)
    assert {f: f.read_bytes() for f in watched[:2]} == {f: before[f] for f in watched[:2]}
    assert all(len(list((study_dir / s / "eval" / "final").glob("results.stale-*"))) == 1 for s in slugs)

    # the study file's runs changed under the same name: refused before anything starts, the records untouched
    records = {f: f.read_bytes() for f in (study_dir / "study.json", study_dir / "results.parquet", *watched[:2])}
    data = yaml.safe_load(path.read_text())
    data["overrides"]["sampling"]["max_new_tokens"] = 12
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(StudyError, match=re.escape(f"run {slugs[0]}: {study_dir / slugs[0]} holds a run of another "
                                                   "config") + r".*give the study another name \(or runs_dir\), "
                                                                 r".*Nothing was changed"):
        run_study(path, progress=lines.append)
    assert {f: f.read_bytes() for f in records} == records

    # its prompt rows edited since the runs finished: refused as launch refuses, not kept as current results
    data["overrides"]["sampling"]["max_new_tokens"] = 16
    path.write_text(yaml.safe_dump(data))
    rows = (prompts / "es.jsonl").read_text(encoding="utf-8").splitlines()
    edited = {**json.loads(rows[0]), "instruction": "EDITED " + json.loads(rows[0])["instruction"]}
    (prompts / "es.jsonl").write_text("\n".join([json.dumps(edited, ensure_ascii=False), *rows[1:]]) + "\n",
                                      encoding="utf-8")
    with pytest.raises(StudyError, match=re.escape(f"run {slugs[0]}: prompts.path: {prompts}: the prompt rows "
                                                   "differ from those this run started with") + ".*"
                                         + re.escape(f"delete {study_dir / slugs[0]} to run it again")):
        run_study(path, progress=lines.append)
    assert {f: f.read_bytes() for f in records} == records


@pytest.mark.slow
def test_runs_side_by_side_as_launch_subprocesses(tmp_path, tiny_model, ray_session):
    path = e2e_study(tmp_path, tiny_model, {"prompts.limit": [4, 8]}, parallel=2)
    study_dir = run_study(path, progress=print)
    record = json.loads((study_dir / "study.json").read_text())
    assert [e["status"] for e in record["runs"]] == ["finished", "finished"]
    for entry in record["runs"]:
        log = (study_dir / entry["run"] / "launch.log").read_text()
        assert "done:" in log
    rows = pq.read_table(study_dir / "results.parquet").to_pylist()
    assert [r["prompts.limit"] for r in rows] == [4, 8] and rows[1]["pairs_rows"] > rows[0]["pairs_rows"]
