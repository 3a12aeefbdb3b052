import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayalign.data.store import DatasetError, DatasetWriter, read_dataset, read_manifest, sha256_file


def prompts_table(ids, lang="en"):
    return pa.table({
        "prompt_id": ids, "lang": [lang] * len(ids),
        "messages": [[{"role": "user", "content": f"question {i}"}] for i in ids],
        "reference": [None] * len(ids), "source": ["test"] * len(ids),
    })


def write_dataset(path, shards=2):
    w = DatasetWriter(path, "prompts", config_hash="abc", languages=["en"], models={"policy": "m"},
                      seeds={"run_seed": 1})
    for i in range(shards):
        w.write_shard(i, prompts_table([f"p{i}{j}" for j in range(3)]))
    return w.finalize(expected_shards=shards)


def test_round_trip_manifest_and_card(tmp_path):
    manifest = write_dataset(tmp_path / "ds")
    assert manifest["rows"] == 6 and [s["rows"] for s in manifest["shards"]] == [3, 3]
    assert manifest["shards"][0]["sha256"] == sha256_file(tmp_path / "ds" / "part-00000.parquet")
    assert manifest["schema"] == "prompts" and manifest["schema_version"] == 1
    assert manifest["config_hash"] == "abc" and manifest["rayalign_version"]
    table = read_dataset(tmp_path / "ds", "prompts")
    assert table.column("prompt_id").to_pylist() == ["p00", "p01", "p02", "p10", "p11", "p12"]
    card = (tmp_path / "ds" / "README.md").read_text()
    assert card.startswith("---\nlanguage:\n- en\n") and "part-*.parquet" in card


def test_finalizing_an_unchanged_dataset_again_leaves_its_files_as_they_were(tmp_path):
    """A resumed stage finalizes its kept dataset again: with the same shards and settings, the manifest and the
    card stay byte for byte and keep their modification times (and creation stamp)."""
    first = write_dataset(tmp_path / "ds")
    files = {name: ((tmp_path / "ds" / name).stat().st_mtime_ns, (tmp_path / "ds" / name).read_bytes())
             for name in ("manifest.json", "README.md")}
    w = DatasetWriter(tmp_path / "ds", "prompts", config_hash="abc", languages=["en"], models={"policy": "m"},
                      seeds={"run_seed": 1})
    assert w.finalize(expected_shards=2) == first
    assert {name: ((tmp_path / "ds" / name).stat().st_mtime_ns, (tmp_path / "ds" / name).read_bytes())
            for name in files} == files
    other = DatasetWriter(tmp_path / "ds", "prompts", config_hash="def", languages=["en"], models={"policy": "m"},
                          seeds={"run_seed": 1}).finalize(expected_shards=2)  # other settings: written anew
    assert other["config_hash"] == "def" == read_manifest(tmp_path / "ds")["config_hash"]


def test_shards_are_renamed_only_when_complete(tmp_path, monkeypatch):
    w = DatasetWriter(tmp_path / "ds", "prompts")
    w.write_shard(0, prompts_table(["a"]))

    def broken_write(table, where, **kwargs):
        open(where, "wb").write(b"PAR1 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", broken_write)
    with pytest.raises(OSError, match="No space left"):
        w.write_shard(1, prompts_table(["b"]))
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["part-00000.parquet", "part-00000.sha256"]
    assert w.has_shard(0) and not w.has_shard(1)


def test_stale_tmp_files_are_removed_on_reopen(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "part-00003.parquet.tmp").write_bytes(b"half")
    DatasetWriter(tmp_path / "ds", "prompts")
    assert not list((tmp_path / "ds").glob("*.tmp"))


def test_writer_refuses_rows_of_another_schema(tmp_path):
    w = DatasetWriter(tmp_path / "ds", "prompts")
    with pytest.raises(DatasetError, match=r"part-00000.parquet: missing column\(s\) messages"):
        w.write_shard(0, pa.table({"prompt_id": ["a"], "lang": ["en"], "reference": [None], "source": ["x"]}))
    bad_nulls = prompts_table(["a"]).set_column(0, "prompt_id", pa.array([None], pa.string()))
    with pytest.raises(DatasetError, match="column prompt_id has 1 null value"):
        w.write_shard(0, bad_nulls)


def test_missing_manifest(tmp_path):
    (tmp_path / "ds").mkdir()
    with pytest.raises(DatasetError, match="manifest.json: missing; the dataset is incomplete"):
        read_dataset(tmp_path / "ds")


def test_checksum_mismatch_names_the_shard(tmp_path):
    write_dataset(tmp_path / "ds")
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    manifest["shards"][1]["sha256"] = "0" * 64
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"part-00001.parquet: sha256 does not match the manifest"):
        read_dataset(tmp_path / "ds")


def test_truncated_shard_is_detected(tmp_path):
    write_dataset(tmp_path / "ds")
    shard = tmp_path / "ds" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DatasetError, match="part-00000.parquet: sha256 does not match"):
        read_dataset(tmp_path / "ds")
    with pytest.raises(DatasetError, match="part-00000.parquet: unreadable Parquet"):
        read_dataset(tmp_path / "ds", verify=False)


def test_other_schema_version_is_refused(tmp_path):
    write_dataset(tmp_path / "ds")
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="schema prompts version 99, this rayalign .* reads version 1"):
        read_dataset(tmp_path / "ds")


def test_expected_schema_name(tmp_path):
    write_dataset(tmp_path / "ds")
    with pytest.raises(DatasetError, match="dataset holds 'prompts' rows, expected 'samples'"):
        read_dataset(tmp_path / "ds", "samples")


def test_missing_and_unlisted_shards(tmp_path):
    write_dataset(tmp_path / "ds")
    (tmp_path / "ds" / "part-00001.parquet").rename(tmp_path / "ds" / "part-00007.parquet")
    with pytest.raises(DatasetError, match="not in the manifest: part-00007.parquet"):
        read_dataset(tmp_path / "ds")
    (tmp_path / "ds" / "part-00007.parquet").unlink()
    with pytest.raises(DatasetError, match="part-00001.parquet: listed in the manifest but missing"):
        read_dataset(tmp_path / "ds")


def test_corrupt_manifest(tmp_path):
    write_dataset(tmp_path / "ds")
    (tmp_path / "ds" / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="manifest.json: not valid JSON"):
        read_manifest(tmp_path / "ds")



@pytest.mark.parametrize("edit, expected", [
    (lambda m: [m], "manifest.json: expected a JSON object, got a list"),
    (lambda m: {**m, "shards": None}, "shards: expected a list of {file, rows, sha256} objects, got null"),
    (lambda m: {**m, "shards": [s["file"] for s in m["shards"]]}, "shards[0]: expected {file: part-NNNNN.parquet"),
    (lambda m: {**m, "shards": [{k: v for k, v in s.items() if k != "file"} for s in m["shards"]]}, "shards[0]: "),
    (lambda m: {**m, "shards": [{**m["shards"][0], "file": "../other/part-00000.parquet"}, m["shards"][1]]},
     "shards[0]: expected {file: part-NNNNN.parquet (a name in this directory)"),
    (lambda m: {**m, "shards": m["shards"] + m["shards"][:1], "rows": 9}, "shards[2]: part-00000.parquet is listed twice"),
    (lambda m: {**m, "schema_version": "1"}, "schema_version: expected an integer, got '1'"),
    (lambda m: {**m, "shards": [{**m["shards"][0], "rows": "x"}, m["shards"][1]]}, "rows: expected an integer, got 'x'"),
    (lambda m: {**m, "shards": [{k: v for k, v in s.items() if k != "sha256"} for s in m["shards"]]},
     "shards[0] (part-00000.parquet): sha256: expected 64 hex digits, got None"),
])
def test_hand_edited_manifest_is_refused_naming_the_field(tmp_path, edit, expected):
    """A manifest edited into another shape: a DatasetError naming the field (was a TypeError/KeyError, or a shard
    outside the directory or listed twice read as if intact)."""
    from rayalign.data.store import dataset_problems

    write_dataset(tmp_path / "ds")
    path = tmp_path / "ds" / "manifest.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(DatasetError) as e:
        read_dataset(tmp_path / "ds")
    assert expected in str(e.value)
    assert [message for _, message in dataset_problems(tmp_path / "ds")][0].startswith(f"{path}: ")


@pytest.mark.parametrize("change, expected", [
    (lambda t: t.append_column("extra", pa.array([1] * t.num_rows)), "part-00001.parquet: extra column(s) extra"),
    (lambda t: t.drop_columns(["source"]), "part-00001.parquet: missing column(s) source"),
    (lambda t: t.set_column(0, "prompt_id", pa.array([1] * t.num_rows)),
     "part-00001.parquet: column prompt_id has type int64, expected string"),
])
def test_a_shard_with_other_columns_names_the_column(tmp_path, change, expected):
    """A shard rewritten with a column added, dropped or of another type (its checksums updated to match): the
    message names that column (it listed both column lists, identical when only a type differed)."""
    write_dataset(tmp_path / "ds")
    shard = tmp_path / "ds" / "part-00001.parquet"
    pq.write_table(change(pq.read_table(shard)), shard)
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    manifest["shards"][1]["sha256"] = sha256_file(shard)
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "ds" / "part-00001.sha256").write_text(f"{sha256_file(shard)}  part-00001.parquet\n")
    with pytest.raises(DatasetError) as e:
        read_dataset(tmp_path / "ds")
    assert expected in str(e.value)

def test_finalize_counts_shards(tmp_path):
    w = DatasetWriter(tmp_path / "ds", "prompts")
    w.write_shard(0, prompts_table(["a"]))
    with pytest.raises(DatasetError, match="expected 2 shards, found 1"):
        w.finalize(expected_shards=2)
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_an_actor_error_is_said_by_its_last_error_line_with_the_setting_to_change():
    """Ray's actor errors carry the actor's whole traceback; vLLM's KV-cache error advises gpu_memory_utilization,
    which rayalign does not use on CPU."""
    from rayalign.generation import actor_failure

    error = RuntimeError("The actor died because of an error raised in its creation task, ray::GenerationActor\n"
                         "Traceback (most recent call last):\n  File \"x.py\", line 3, in f\n    raise ValueError(...)\n"
                         "ValueError: No available memory for the cache blocks. Try increasing "
                         "`gpu_memory_utilization` when initializing the engine.\n")
    assert actor_failure(error) == ("ValueError: No available memory for the cache blocks. Try increasing "
                                    "`gpu_memory_utilization` when initializing the engine. (engines.kv_cache_gib "
                                    "sets each vLLM engine's KV cache; on GPUs, gpu_memory_utilization when unset)")
    assert actor_failure(RuntimeError("node lost\n")) == "node lost"
