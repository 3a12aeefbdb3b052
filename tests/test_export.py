"""rayalign export: Hub layout read back with the real `datasets`, and verl's RL Parquet columns."""

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from conftest import REPO
from rayalign.cli import main
from rayalign.data.store import DatasetWriter

LANGS = ["en", "de", "fr"]


def pairs_run(run, tag: str, ids=("p0", "p1")):
    """A run directory with one finished pairs dataset (rows written by the store's own writer)."""
    def chat(role, text):
        return [{"role": role, "content": text}]

    rows = [{"prompt": chat("user", f"{lang} {pid}"), "chosen": chat("assistant", f"{tag} good {lang}"),
             "rejected": chat("assistant", f"{tag} bad {lang}"), "prompt_id": pid, "lang": lang,
             "score_chosen": 1.0, "score_rejected": 0.5, "ref_logp_chosen": -3.0, "ref_logp_rejected": -4.0,
             "chosen_num_tokens": 3, "rejected_num_tokens": 3, "method": "lacomsa", "iteration": 1}
            for pid in ids for lang in LANGS]
    import pyarrow as pa

    writer = DatasetWriter(run / "iter-1" / "pairs", "pairs", config_hash="abc123", languages=LANGS,
                           models={"policy": "builtin:tiny-multilingual"}, params={"method": "lacomsa"},
                           description="best-vs-worst pairs")
    writer.write_shard(0, pa.Table.from_pylist(rows))
    writer.finalize()
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "r", "rewards": {"latent": {"enabled": True}},
                                                     "pairs": {"method": "lacomsa"}, "training": {"loss": "dpo"}}))
    (run / "state.json").write_text("{}")  # what makes it a run
    return run


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line(text: str) -> str:
    return " ".join(text.split())


def test_export_hub_layout_loads_per_language_and_whole(tmp_path):
    import datasets

    run = pairs_run(tmp_path / "run", "A")
    out = tmp_path / "export"
    result = invoke("export", run, out, "--license", "apache-2.0")
    assert result.exit_code == 0, result.output
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet"))
    assert [f.split("/")[:2] for f in files] == [["data", "de"], ["data", "en"], ["data", "fr"]]
    assert all(f.split("/")[2].startswith("train-") for f in files)
    card = (out / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert {"configs", "language", "license", "task_categories", "size_categories", "pretty_name", "tags"} <= set(header)
    assert [c["config_name"] for c in header["configs"]] == ["default", "en", "de", "fr"]
    assert header["language"] == LANGS and header["license"] == "apache-2.0" and header["size_categories"] == ["n<1K"]
    for text in ("config hash `abc123`", "policy: `builtin:tiny-multilingual`", "rewards: latent",
                 "pairs method: lacomsa; training loss: dpo", '"method": "lacomsa"', "rayalign 0."):
        assert text in card, text
    cache = tmp_path / "cache"
    de = datasets.load_dataset(str(out), "de", split="train", cache_dir=str(cache))
    assert de.num_rows == 2 and set(de["lang"]) == {"de"}
    assert de[0]["chosen"] == [{"role": "assistant", "content": "A good de"}]
    whole = datasets.load_dataset(str(out), cache_dir=str(cache))
    assert list(whole) == ["train"] and whole["train"].num_rows == 6
    assert sorted(set(whole["train"]["lang"])) == sorted(LANGS)


def test_two_exports_named_the_same_load_as_themselves_in_one_cache(tmp_path):
    import datasets

    cache = str(tmp_path / "cache")
    loaded = {}
    for tag, ids in (("A", ("p0",)), ("B", ("p0", "p1", "p2"))):
        out = tmp_path / tag / "export"  # the same directory name
        assert invoke("export", pairs_run(tmp_path / f"run{tag}", tag, ids), out).exit_code == 0
        fr = datasets.load_dataset(str(out), "fr", split="train", cache_dir=cache)
        loaded[tag] = (fr.num_rows, fr[0]["chosen"][0]["content"],
                       datasets.load_dataset(str(out), split="train", cache_dir=cache).num_rows)
    assert loaded == {"A": (1, "A good fr", 3), "B": (3, "B good fr", 9)}


def test_export_refuses_bad_sources_and_outputs(tmp_path):
    run = pairs_run(tmp_path / "run", "A")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    refused = invoke("export", run, tmp_path / "full")
    assert refused.exit_code == 2 and "exists and is not an empty directory" in refused.output
    none = invoke("export", run, tmp_path / "o", "--stage", "samples")
    assert none.exit_code == 2 and "nor a run with a finished samples dataset" in none.output
    # options the format does not use, and license ids the Hub would reject, are refused before anything is written
    verl = ["--format", "verl"]
    for source, options, expected in [
            (run / "iter-1" / "pairs", verl, "neither a recipe file nor a run directory (no config.yaml)"),
            (run, verl + ["--stage", "scores"], "--stage: not used by --format verl"),
            (run, verl + ["--license", "mit"], "--license: not used by --format verl"),
            (run, ["-o", "prompts.limit=2"], "-o: not used by --format hub"),
            (run, ["--license", "MIT"], "--license 'MIT': not a Hub license id (close: mit)"),
            (run, ["--license", ""], "--license '': not a Hub license id"),
            (run, ["--push-to-hub", "bad repo"], "--push-to-hub 'bad repo': not a Hub repo id such as"),
            (run, ["--push-to-hub", "a/b/c"], "--push-to-hub 'a/b/c': not a Hub repo id such as")]:
        result = invoke("export", source, tmp_path / "x", *options)
        assert result.exit_code == 2 and expected in " ".join(result.output.split()), (options, result.output)
        assert not (tmp_path / "x").exists()
    (run / "state.json").write_text("{}")  # an OUT named as the run's own directories would pass for one
    for name in ("iter-3", "online"):
        result = invoke("export", run, run / name)
        assert result.exit_code == 2 and f"{run / name}: a run's own directory name" in one_line(result.output)
        assert not (run / name).exists()
    # a run whose last iteration has no pairs: the earlier iteration's, said so
    pairs_run(tmp_path / "two", "B")
    (tmp_path / "two" / "iter-2").mkdir()
    result = invoke("export", tmp_path / "two", tmp_path / "y")
    assert result.exit_code == 0 and "iter-2 has no finished pairs dataset; exporting" in result.output


def test_exporting_again_keeps_the_same_export_and_refuses_a_different_one(tmp_path):
    """README's export, then the same export with --push-to-hub: the second export was refused ("exists and is not
    an empty directory"), so the documented push never ran."""
    run = pairs_run(tmp_path / "run", "A")
    out = tmp_path / "export"
    assert invoke("export", run, out, "--license", "apache-2.0").exit_code == 0
    card, stamp = (out / "README.md").read_text(), {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = invoke("export", run, out, "--license", "apache-2.0")
    assert again.exit_code == 0 and f"kept (it already holds this export) {out}" in " ".join(again.output.split())
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamp
    with pytest.MonkeyPatch.context() as patch:  # the same export, its source spelled from another directory:
        patch.chdir(tmp_path / "run")  # the card names it from the run down
        respelled = invoke("export", ".", out, "--license", "apache-2.0")
    assert respelled.exit_code == 0 and "kept" in respelled.output, respelled.output
    assert "- source: `run/iter-1/pairs` (6 rows)" in card and str(tmp_path) not in card
    assert 'datasets.load_dataset(REPO_OR_DIR, \'en\', split="train")  # one config' in card
    other_card = invoke("export", run, out, "--license", "mit")  # another card: not this export
    assert other_card.exit_code == 2 and "exists and is not an empty directory" in other_card.output
    other_rows = invoke("export", pairs_run(tmp_path / "run2", "B"), out)
    assert other_rows.exit_code == 2 and "exists and is not an empty directory" in other_rows.output
    (de,) = out.glob("data/de/*.parquet")
    table = pq.read_table(de)
    pq.write_table(table.slice(0, 1), de)  # an export damaged after it was written is not kept as this one
    damaged = invoke("export", run, out, "--license", "apache-2.0")
    assert damaged.exit_code == 2 and "exists and is not an empty directory" in damaged.output
    assert (out / "README.md").read_text() == card


def test_dco_tuples_export_one_config_per_language_pair(tmp_path):
    """DCO's dataset has lang_1 and lang_2 and no lang: it was refused ("rows have no lang column")."""
    import datasets
    import pyarrow as pa

    def chat(role, text):
        return [{"role": role, "content": text}]

    rows = [{"prompt_id": pid, **{f"{k}_{side}": chat("user" if k == "prompt" else "assistant", f"{k} {lang} {pid}")
                                  for side, lang in ((1, l1), (2, l2)) for k in ("prompt", "chosen", "rejected")},
             "lang_1": l1, "lang_2": l2, "ref_logp_chosen_1": -1.0, "ref_logp_rejected_1": -2.0,
             "ref_logp_chosen_2": -1.5, "ref_logp_rejected_2": -2.5, "gamma_12": 0.1, "gamma_21": 10.0,
             "method": "dco", "iteration": 1}
            for pid in ("p0", "p1", "p2") for l1, l2 in (("en", "fr"), ("en", "de"), ("de", "fr"))]
    writer = DatasetWriter(tmp_path / "run" / "iter-1" / "pairs", "dco", config_hash="d", languages=LANGS)
    writer.write_shard(0, pa.Table.from_pylist(rows))
    writer.finalize()
    out = tmp_path / "export"
    result = invoke("export", tmp_path / "run", out)
    assert result.exit_code == 0, result.output
    header = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert [c["config_name"] for c in header["configs"]] == ["default", "en-de", "en-fr", "de-fr"]
    assert header["language"] == LANGS and header["tags"][1] == "dco"
    cache = str(tmp_path / "cache")
    en_de = datasets.load_dataset(str(out), "en-de", split="train", cache_dir=cache)
    assert en_de.num_rows == 3 and set(en_de["lang_1"]) == {"en"} and set(en_de["lang_2"]) == {"de"}
    assert en_de[0]["chosen_2"] == [{"role": "assistant", "content": "chosen de p0"}]
    assert datasets.load_dataset(str(out), split="train", cache_dir=cache).num_rows == 9


def test_push_to_hub_needs_a_token_and_names_a_failed_upload(tmp_path, monkeypatch):
    """The real huggingface_hub client, never the real Hub: no token at all, then a token and a Hub endpoint
    where nothing listens."""
    import socket

    from huggingface_hub import constants

    run = pairs_run(tmp_path / "run", "A")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    push = invoke("export", run, tmp_path / "p", "--push-to-hub", "me/pairs")
    assert push.exit_code == 2 and "no Hugging Face token configured" in push.output
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    push = invoke("export", run, tmp_path / "q", "--push-to-hub", "me/pairs")
    assert push.exit_code == 2 and "--push-to-hub me/pairs: upload failed" in push.output
    assert (tmp_path / "q" / "README.md").is_file()  # the export itself is kept
    push = invoke("export", run, tmp_path / "q", "--push-to-hub", "me/pairs")  # the push retried on the same OUT
    assert push.exit_code == 2 and "kept (it already holds this export)" in push.output
    assert "--push-to-hub me/pairs: upload failed" in push.output



def test_a_damaged_run_config_is_named_and_nothing_is_written(tmp_path):
    """The run's config.yaml edited into bad YAML, a list or other bytes: refused naming it before OUT is made (it
    was a traceback after the per-language files were written); a section of another type is left out of the card."""
    run = pairs_run(tmp_path / "run", "A")
    for i, (text, expected) in enumerate([(b"name: [\n", "config.yaml: malformed YAML"),
                                          (b"- a\n", "config.yaml: expected a mapping of settings"),
                                          (b"\xff\xfe", "config.yaml: not valid UTF-8")]):
        (run / "config.yaml").write_bytes(text)
        result = invoke("export", run, tmp_path / f"out{i}")
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert expected in result.output and str(run / "config.yaml") in result.output
        assert not (tmp_path / f"out{i}").exists()
    (run / "config.yaml").write_text("name: r\nrewards: 5\nsampling: fast\nprompts: 3\n")
    assert invoke("export", run, tmp_path / "out").exit_code == 0

def test_export_verl_prompt_set(tmp_path):
    out = tmp_path / "verl"
    result = invoke("export", "--format", "verl", REPO / "examples" / "quickstart.yaml", out, "-o", "prompts.limit=2",
                    "-o", "languages=[en,de]")
    assert result.exit_code == 0, result.output
    table = pq.read_table(out / "train.parquet")
    assert table.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    rows = table.to_pylist()
    assert len(rows) == 4 and [r["extra_info"]["lang"] for r in rows] == ["en", "de", "en", "de"]
    assert rows[1]["prompt"][-1]["role"] == "user" and rows[1]["reward_model"] == {"style": "rule",
                                                                                   "ground_truth": "de"}
    assert rows[0]["extra_info"]["prompt_id"] == rows[1]["extra_info"]["prompt_id"]
    assert [r["extra_info"]["index"] for r in rows] == [0, 1, 2, 3] and rows[0]["data_source"] == "rayalign"
    assert isinstance(rows[0]["ability"], str)


def test_verls_own_loader_reads_the_exported_prompt_set(tmp_path, tiny_model):
    """verl 0.9.1's RLHFDataset (installed with --no-deps) over `export --format verl`: every row, its chat as the
    prompt files hold it, its index and language; none dropped by verl's prompt-length filter."""
    import json

    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    out = tmp_path / "verl"
    result = invoke("export", "--format", "verl", REPO / "examples" / "quickstart.yaml", out, "-o", "prompts.limit=3",
                    "-o", "languages=[en,de,ru]")
    assert result.exit_code == 0, result.output
    instruction = {}
    for lang in ("en", "de", "ru"):
        for line in (REPO / "examples/data/prompts" / f"{lang}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            instruction[row["instruction_id"], lang] = row["instruction"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = OmegaConf.create({"cache_dir": str(tmp_path / "verl-cache"), "max_prompt_length": 256})
    dataset = RLHFDataset(str(out / "train.parquet"), tokenizer, config)
    assert len(dataset) == 9
    seen = []
    for i in range(len(dataset)):
        item = dataset[i]
        key = (item["extra_info"]["prompt_id"], item["extra_info"]["lang"])
        assert item["raw_prompt"] == [{"role": "user", "content": instruction[key]}]
        assert item["index"] == i and item["reward_model"]["ground_truth"] == key[1]
        seen.append(key)
    assert seen == [(pid, lang) for pid in ("p000", "p001", "p002") for lang in ("en", "de", "ru")]


def test_a_config_yaml_beside_a_copied_dataset_is_not_published(tmp_path):
    """Only a run's own config.yaml (state.json beside it) goes into the card: a copied dataset's neighbour is not."""
    import shutil

    run = pairs_run(tmp_path / "run", "A")
    project = tmp_path / "project"
    shutil.copytree(run / "iter-1" / "pairs", project / "pairs")
    (project / "config.yaml").write_text("wandb_api_key: SECRET123\n")
    result = invoke("export", project / "pairs", tmp_path / "out")
    assert result.exit_code == 0, result.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert "SECRET123" not in card and "## Recipe" not in card and "- source: `pairs` (6 rows)" in card


def test_hub_size_categories_beyond_a_million_rows():
    from rayalign.data.store import _size_category

    assert [_size_category(n) for n in (999, 10**6 - 1, 10**6, 2 * 10**7, 10**9, 10**12)] == [
        "n<1K", "100K<n<1M", "1M<n<10M", "10M<n<100M", "1B<n<10B", "n>1T"]


def test_an_empty_dataset_loads_as_no_rows(tmp_path):
    """With no part-*.parquet file, datasets.load_dataset(dir) served manifest.json as one row. Now the directory
    holds one shard without rows: Arrow and polars read no rows, and datasets, which cannot hold an empty split,
    says there is no data."""
    import datasets
    import polars as pl
    import pyarrow as pa

    from rayalign.data.store import read_dataset

    from rayalign.config import load_config
    from rayalign.data.schemas import schema_for
    from rayalign.run_dir import write_table

    cfg = load_config(REPO / "examples" / "quickstart.yaml")
    empty = pa.Table.from_pylist([], schema=schema_for("pairs")[1])
    write_table(empty, tmp_path / "run" / "iter-1" / "pairs", "pairs", cfg, 1, {}, {}, "no pairs", shard_rows=16)
    pairs = tmp_path / "run" / "iter-1" / "pairs"
    assert read_dataset(pairs, "pairs").num_rows == 0
    assert pl.read_parquet(pairs / "part-*.parquet").columns == schema_for("pairs")[1].names
    with pytest.raises(ValueError, match="corresponds to no data"):
        datasets.load_dataset(str(pairs), split="train", cache_dir=str(tmp_path / "cache"))


def test_a_language_value_that_is_a_path_is_refused(tmp_path):
    """Config folders are named by the lang column: '../../escaped' wrote a Parquet file outside OUT."""
    import pyarrow as pa

    run = pairs_run(tmp_path / "run", "A")
    table = pa.Table.from_pylist([{**row, "lang": "../../escaped"} for row in
                                  pq.read_table(run / "iter-1" / "pairs" / "part-00000.parquet").to_pylist()])
    writer = DatasetWriter(tmp_path / "bad" / "pairs", "pairs", languages=["en"])
    writer.write_shard(0, table)
    writer.finalize()
    result = invoke("export", tmp_path / "bad" / "pairs", tmp_path / "deep" / "a" / "out")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "language value(s) '../../escaped' cannot name a Hub config" in one_line(result.output)
    assert not (tmp_path / "deep").exists()


def test_a_failed_write_leaves_no_partial_export(tmp_path, monkeypatch):
    """A full disk mid-export left some languages' files in OUT, and the rerun was refused ("not an empty
    directory"). The write is injected to fail as a full disk does, on the second file."""
    import errno

    import rayalign.data.export as export

    run, out = pairs_run(tmp_path / "run", "A"), tmp_path / "export"
    real, calls = export.pq.write_table, []

    def full_disk(table, where, **kwargs):
        calls.append(where)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(where))
        return real(table, where, **kwargs)

    monkeypatch.setattr(export.pq, "write_table", full_disk)
    result = invoke("export", run, out)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{calls[1]}: could not be written (No space left on device); nothing was exported to {out}" in \
        one_line(result.output)
    assert out.is_dir() and not any(out.iterdir()) and [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []
    monkeypatch.setattr(export.pq, "write_table", real)
    assert invoke("export", run, out).exit_code == 0 and len(list(out.glob("data/*/*.parquet"))) == 3
