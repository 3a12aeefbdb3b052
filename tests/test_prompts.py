import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import PROMPTS_DIR
from rayalign.data.prompts import PromptError, load_prompts

LANGS = ["en", "es", "de", "fr", "ru"]


def write_dir(tmp_path, rows_by_lang):
    d = tmp_path / "prompts"
    d.mkdir()
    for lang, rows in rows_by_lang.items():
        (d / f"{lang}.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return d


def test_bundled_set_is_parallel_in_five_languages():
    table = load_prompts(PROMPTS_DIR, LANGS)
    ids = set(table.column("prompt_id").to_pylist())
    assert len(ids) >= 60 and table.num_rows == 5 * len(ids)
    assert table.schema.names == ["prompt_id", "lang", "messages", "reference", "source"]
    first = table.to_pylist()[:5]
    assert [r["lang"] for r in first] == LANGS and len({r["prompt_id"] for r in first}) == 1
    assert all(r["messages"][0]["role"] == "user" and r["reference"] for r in first)
    from rayalign.languages import detect_language
    rows = table.to_pylist()
    detected = sum(detect_language(r["messages"][0]["content"] + " " + r["reference"]) == r["lang"] for r in rows)
    assert detected / len(rows) > 0.95


def test_directory_layout_with_limit_and_system_prompt(tmp_path):
    d = write_dir(tmp_path, {
        "en": [{"instruction_id": i, "instruction": f"q{i}", "input": "ctx" if i == 1 else ""} for i in range(3)],
        "de": [{"instruction_id": i, "instruction": f"f{i}"} for i in range(3)],
        "fr": [{"instruction_id": 0, "instruction": "only one"}],  # not configured: ignored
    })
    table = load_prompts(d, ["en", "de"], limit=2, system_prompt="Be brief.")
    rows = table.to_pylist()
    assert [(r["prompt_id"], r["lang"]) for r in rows] == [("0", "en"), ("0", "de"), ("1", "en"), ("1", "de")]
    assert rows[2]["messages"] == [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "q1\n\nctx"}]


def test_jsonl_and_parquet_files(tmp_path):
    rows = [{"prompt_id": "a", "lang": "en", "messages": [{"role": "user", "content": "hi"}]},
            {"prompt_id": "a", "lang": "de", "instruction": "hallo"},
            {"prompt_id": "a", "lang": "ja", "instruction": "other language, ignored"}]
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    t1 = load_prompts(f, ["en", "de"])
    assert t1.column("lang").to_pylist() == ["en", "de"]
    pq.write_table(pa.Table.from_pylist([{"prompt_id": "a", "lang": l, "instruction": "x"} for l in ("en", "de")]),
                   tmp_path / "p.parquet")
    assert load_prompts(tmp_path / "p.parquet", ["en", "de"]).num_rows == 2


def test_missing_languages_are_listed(tmp_path):
    d = write_dir(tmp_path, {
        "en": [{"instruction_id": f"p{i}", "instruction": "q"} for i in range(3)],
        "de": [{"instruction_id": "p0", "instruction": "f"}],
        "ru": [{"instruction_id": "p0", "instruction": "в"}, {"instruction_id": "p2", "instruction": "в"}],
    })
    with pytest.raises(PromptError) as e:
        load_prompts(d, ["en", "de", "ru"])
    assert "2 prompt_id(s) lack languages: p1: de, ru; p2: de" in str(e.value)


def test_missing_language_file(tmp_path):
    d = write_dir(tmp_path, {"en": [{"instruction_id": 0, "instruction": "q"}]})
    with pytest.raises(PromptError, match="no prompt file for language 'de'"):
        load_prompts(d, ["en", "de"])


def test_empty_prompt_names_file_line_and_id(tmp_path):
    d = write_dir(tmp_path, {"en": [{"instruction_id": 0, "instruction": "q"}, {"instruction_id": 1, "instruction": "  "}]})
    with pytest.raises(PromptError, match=r"en.jsonl:2: empty prompt for prompt_id 1 \(en\)"):
        load_prompts(d, ["en"])


def test_duplicate_prompt_names_both_lines(tmp_path):
    d = write_dir(tmp_path, {"en": [{"instruction_id": "a", "instruction": "q"}, {"instruction_id": "b", "instruction": "r"},
                                    {"instruction_id": "a", "instruction": "s"}]})
    with pytest.raises(PromptError) as e:
        load_prompts(d, ["en"])
    assert "en.jsonl:3: duplicate (prompt_id, lang) ('a', 'en') (first at" in str(e.value)
    assert "en.jsonl:1)" in str(e.value)


def test_malformed_jsonl_line(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    (d / "en.jsonl").write_text('{"instruction_id": 0, "instruction": "q"}\n{"instruction_id": 1, "instruction": \n')
    with pytest.raises(PromptError, match=r"en.jsonl:2: malformed JSON"):
        load_prompts(d, ["en"])


def test_invalid_utf8_names_line(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    (d / "en.jsonl").write_bytes(b'{"instruction_id": 0, "instruction": "q"}\n{"instruction_id": 1, "instruction": "\xff\xfe"}\n')
    with pytest.raises(PromptError, match=r"en.jsonl:2: invalid UTF-8 \(byte 0xff"):
        load_prompts(d, ["en"])


def test_byte_order_mark_at_the_start_of_a_file_is_accepted_and_one_mid_file_named(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    bom = b"\xef\xbb\xbf"  # as Windows tools save UTF-8
    (d / "en.jsonl").write_bytes(bom + b'{"instruction_id": 0, "instruction": "q"}\n')
    (d / "de.json").write_bytes(bom + b'[{"instruction_id": 0, "instruction": "f"}]')
    assert load_prompts(d, ["en", "de"]).column("prompt_id").to_pylist() == ["0", "0"]
    (d / "en.jsonl").write_bytes(b'{"instruction_id": 0, "instruction": "q"}\n' + bom + b'{"instruction_id": 1, "instruction": "r"}\n')
    with pytest.raises(PromptError, match=r"en.jsonl:2: a UTF-8 byte order mark \(BOM\) starts this line; only the "
                                          r"start of the file may hold one"):
        load_prompts(d, ["en"])


def test_missing_source_and_id(tmp_path):
    with pytest.raises(PromptError, match="prompt source not found"):
        load_prompts(tmp_path / "nowhere", ["en"])
    d = write_dir(tmp_path, {"en": [{"instruction": "q"}]})
    with pytest.raises(PromptError, match=r"en.jsonl:1: missing prompt_id \(or instruction_id\)"):
        load_prompts(d, ["en"])


@pytest.mark.parametrize("row, expected", [
    ({"instruction_id": ["a"], "instruction": "q"}, r"en.jsonl:2: instruction_id must be a string or an integer, got list \['a'\]"),
    ({"instruction_id": 1.5, "instruction": "q"}, r"en.jsonl:2: instruction_id must be a string or an integer, got float 1.5"),
    ({"instruction_id": True, "instruction": "q"}, r"en.jsonl:2: instruction_id must be a string or an integer, got bool"),
    ({"prompt_id": {"x": 1}, "instruction": "q"}, r"en.jsonl:2: prompt_id must be a string or an integer, got dict"),
    ({"prompt_id": "", "instruction": "q"}, r"en.jsonl:2: prompt_id is empty"),
    ({"instruction_id": "  ", "instruction": "q"}, r"en.jsonl:2: instruction_id is empty"),
])
def test_prompt_id_of_another_type_or_empty_names_file_line_and_field(tmp_path, row, expected):
    d = write_dir(tmp_path, {"en": [{"instruction_id": "ok", "instruction": "q"}, row]})
    with pytest.raises(PromptError, match=expected):
        load_prompts(d, ["en"])


def test_parquet_prompt_id_of_another_type_names_the_row(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"prompt_id": [1], "lang": "en", "instruction": "x"}]), tmp_path / "p.parquet")
    with pytest.raises(PromptError, match=r"p.parquet row 0: prompt_id must be a string or an integer, got list"):
        load_prompts(tmp_path / "p.parquet", ["en"])


def test_skip_holds_out_the_first_ids_and_limit_counts_after_it():
    langs = ["en", "de"]
    held_out = load_prompts(PROMPTS_DIR, langs, skip=60)
    assert sorted(set(held_out.column("prompt_id").to_pylist())) == ["p060", "p061", "p062", "p063"]
    train = load_prompts(PROMPTS_DIR, langs, limit=2, skip=1)
    assert train.column("prompt_id").to_pylist() == ["p001", "p001", "p002", "p002"]
    with pytest.raises(PromptError, match="prompts.skip 64 leaves none of its 64 prompt ids"):
        load_prompts(PROMPTS_DIR, langs, skip=64)


def test_a_prompt_file_edited_in_place_is_read_again(tmp_path):
    """Prompt sources are parsed once per content: an edit of the same size with the old modification time (as a
    coarse file-system clock would leave it) still gives the new rows."""
    import os

    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"prompt_id": str(i), "lang": lang, "instruction": f"q{i}"})
                              for i in range(2) for lang in ("en", "de")))
    first = load_prompts(path, ["en", "de"])
    assert load_prompts(path, ["en", "de"]) is first  # parsed once
    stamp = path.stat()
    path.write_text(path.read_text().replace("q1", "z1"))
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert path.stat().st_size == stamp.st_size and path.stat().st_mtime_ns == stamp.st_mtime_ns
    edited = load_prompts(path, ["en", "de"])
    assert [m[0]["content"] for m in edited.column("messages").to_pylist()] == ["q0", "q0", "z1", "z1"]
    assert load_prompts(path, ["en", "de"], limit=1).num_rows == 2  # other settings, another entry


def test_columns_map_local_files_and_a_mapped_column_must_exist(tmp_path):
    rows = {lang: [{"qid": "q1", "text": f"question in {lang}"}, {"qid": "q2", "text": "another"}]
            for lang in ("en", "de")}
    d = write_dir(tmp_path, rows)
    table = load_prompts(d, ["en", "de"], columns={"prompt_id": "qid", "instruction": "text"})
    assert table.column("prompt_id").to_pylist() == ["q1", "q1", "q2", "q2"]
    assert table.column("messages").to_pylist()[1] == [{"role": "user", "content": "question in de"}]
    with pytest.raises(PromptError, match=r"en.jsonl:1: no column 'body' \(prompts.columns.instruction\); the row "
                                          r"has 'qid', 'text'"):
        load_prompts(d, ["en", "de"], columns={"prompt_id": "qid", "instruction": "body"})
    single = tmp_path / "all.jsonl"
    single.write_text(json.dumps({"prompt_id": "a", "language": "en", "instruction": "hi"}) + "\n")
    with pytest.raises(PromptError, match=r"all.jsonl:1: no column 'lng' \(prompts.columns.lang\)"):
        load_prompts(single, ["en"], columns={"lang": "lng"})
    assert load_prompts(single, ["en"], columns={"lang": "language"}).column("lang").to_pylist() == ["en"]


def test_json_strings_holding_unicode_line_separators_are_one_line(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028, U+0085, form feed and U+001C raw inside strings; str.splitlines
    broke the line there ("malformed JSON: Unterminated string")."""
    texts = {"en": "a\u2028b", "de": "c\x85d\x0ce\x1cf"}
    table = load_prompts(write_dir(tmp_path, {lang: [{"instruction_id": 1, "instruction": t}]
                                              for lang, t in texts.items()}), ["en", "de"])
    assert [r["messages"][0]["content"] for r in table.to_pylist()] == [texts["en"], texts["de"]]


@pytest.mark.parametrize("row, expected", [
    ({"instruction_id": "p1", "instruction": "a\ud800b"}, "en.jsonl:1: messages[0] holds a lone surrogate (U+D800 at "
                                                           "character 1)"),
    ({"instruction_id": "p1", "instruction": "q", "output": "\udfff"}, "en.jsonl:1: reference holds a lone surrogate"),
    ({"instruction_id": "p\udc80", "instruction": "q"}, "en.jsonl:1: prompt_id holds a lone surrogate"),
    ({"instruction_id": "p1", "instruction": "\u200b\u200b\ufeff "}, "en.jsonl:1: empty prompt for prompt_id 'p1'"),
    ({"instruction_id": "p1", "messages": [{"role": "system", "content": "x"}]},
     "en.jsonl:1: messages have no user turn (roles: system)"),
    ({"instruction_id": "p1", "instruction": "q", "output": ["a", "b"]},
     "en.jsonl:1: output must be text (a reference answer), got list"),
])
def test_text_that_is_not_text_or_invisible_is_named(tmp_path, row, expected):
    """A lone surrogate escape was a UnicodeEncodeError traceback from pyarrow; zero-width-only prompts passed as
    non-empty; messages without a user turn were called an "empty prompt"."""
    d = tmp_path / "prompts"
    d.mkdir()
    (d / "en.jsonl").write_text(json.dumps(row) + "\n")  # ASCII escapes, as json writes lone surrogates
    with pytest.raises(PromptError) as e:
        load_prompts(d, ["en"])
    assert str(e.value).startswith(str(d / "en.jsonl")) and expected in str(e.value)


def test_a_numeric_reference_is_kept_as_text(tmp_path):
    """A math set's numeric answer became null."""
    d = write_dir(tmp_path, {"en": [{"instruction_id": 1, "instruction": "2+40?", "reference": 42},
                                    {"instruction_id": 2, "instruction": "1/2?", "output": 0.5}]})
    assert load_prompts(d, ["en"]).column("reference").to_pylist() == ["42", "0.5"]


def test_a_null_prompt_id_falls_back_to_instruction_id(tmp_path):
    d = write_dir(tmp_path, {"en": [{"prompt_id": None, "instruction_id": "p7", "instruction": "q"}]})
    assert load_prompts(d, ["en"]).column("prompt_id").to_pylist() == ["p7"]
