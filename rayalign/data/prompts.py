"""Load parallel prompt sets into the prompts schema, refusing bad input with file, line and id.

Accepted sources:
- a JSONL file or a Parquet file with `prompt_id` (or `instruction_id`), `lang`, and `messages` or
  `instruction` (plus optional `input`, `output`/`reference`);
- a directory with one file per language, `<lang>.jsonl`, `<lang>.json` (a list of objects) or
  `<lang>.parquet`, holding `instruction_id` and `instruction` (the layout of the ICR and LaCoMSA data);
- `hf:<dataset name or local dataset directory>`, read with `datasets.load_dataset`: one config per
  language (`config="{lang}"`) or one table with a language column.
`columns` maps rayalign's field names (prompt_id, instruction, lang) to the source's column names.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rayalign.data.schemas import schema_for


class PromptError(ValueError):
    """A prompt source that cannot be used; the message names the file, line or prompt."""


def _decode(path: Path, data: bytes) -> str:
    """The file's text; a byte order mark at its start (as Windows tools save UTF-8) is dropped."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PromptError(f"{path}:{line}: invalid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    text = _decode(path, path.read_bytes())
    records = []
    for lineno, line in enumerate(text.split("\n"), 1):  # JSON strings may hold U+2028, U+0085: not line ends
        if not line.strip():
            continue
        if line.startswith("\ufeff"):
            raise PromptError(f"{path}:{lineno}: a UTF-8 byte order mark (BOM) starts this line; only the start of "
                              "the file may hold one (were files joined?): remove it")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        except ValueError as e:  # an integer of more digits than Python converts
            raise PromptError(f"{path}:{lineno}: {e}") from None
        if not isinstance(obj, dict):
            raise PromptError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        records.append((f"{path}:{lineno}", obj))
    return records


def _read_json(path: Path) -> list[tuple[str, dict]]:
    text = _decode(path, path.read_bytes())
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PromptError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise PromptError(f"{path}: {e}") from None
    if not isinstance(data, list) or not all(isinstance(o, dict) for o in data):
        raise PromptError(f"{path}: expected a JSON list of objects")
    return [(f"{path}[{i}]", obj) for i, obj in enumerate(data)]


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowInvalid, OSError) as e:
        raise PromptError(f"{path}: unreadable Parquet ({e})") from None
    return [(f"{path} row {i}", row) for i, row in enumerate(rows)]


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}


def _read(path: Path) -> list[tuple[str, dict]]:
    reader = READERS.get(path.suffix)
    if reader is None:
        raise PromptError(f"{path}: unsupported prompt file type (expected {', '.join(READERS)})")
    return reader(path)


INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))  # zero-width characters


def _utf8(where: str, field: str, value) -> None:
    """Refuse a string that is not UTF-8 text: a lone surrogate, as a JSON escape such as \\ud800 can make."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PromptError(f"{where}: {field} holds a lone surrogate (U+{ord(value[e.start]):04X} at character "
                              f"{e.start}), which is not text: fix the escape") from None


def _to_row(where: str, obj: dict, lang: str | None, system_prompt: str | None, source: str) -> dict:
    prompt_id = obj.get("prompt_id")
    prompt_id = obj.get("instruction_id") if prompt_id is None else prompt_id
    if prompt_id is None:
        raise PromptError(f"{where}: missing prompt_id (or instruction_id)")
    id_field = "prompt_id" if obj.get("prompt_id") is not None else "instruction_id"
    if isinstance(prompt_id, bool) or not isinstance(prompt_id, (str, int)):
        raise PromptError(f"{where}: {id_field} must be a string or an integer, got {type(prompt_id).__name__} "
                          f"{prompt_id!r}")
    if not str(prompt_id).strip():
        raise PromptError(f"{where}: {id_field} is empty; every prompt needs an id, the same in every language")
    lang = obj.get("lang", lang)
    if lang is None:
        raise PromptError(f"{where}: missing lang")
    if not isinstance(lang, str):
        raise PromptError(f"{where}: lang must be an ISO 639-1 code such as 'de', got {type(lang).__name__} {lang!r}")
    if obj.get("messages") is not None:
        messages = obj["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise PromptError(f"{where}: messages must be a list of {{role, content}} strings")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if not any(m["role"] == "user" for m in messages):
            raise PromptError(f"{where}: messages have no user turn (roles: "
                              f"{', '.join(m['role'] for m in messages) or 'none'})")
        text = " ".join(m["content"] for m in messages if m["role"] == "user")
    else:
        instruction = obj.get("instruction", obj.get("prompt"))
        if instruction is not None and not isinstance(instruction, str):
            raise PromptError(f"{where}: instruction must be a string, got {type(instruction).__name__}")
        text = (instruction or "").strip()
        extra = obj.get("input")
        if isinstance(extra, str) and extra.strip():
            text = f"{text}\n\n{extra.strip()}"
        messages = [{"role": "user", "content": text}]
    if not text.translate(INVISIBLE).strip():
        raise PromptError(f"{where}: empty prompt for prompt_id {prompt_id!r} ({lang})")
    reference = obj.get("reference", obj.get("output"))
    ref_field = "reference" if obj.get("reference") is not None else "output"
    if isinstance(reference, float) and not math.isfinite(reference):
        raise PromptError(f"{where}: {ref_field} is {reference} (JSON NaN or Infinity): expected a reference answer")
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        reference = str(reference)  # a numeric answer, as math sets hold
    elif reference is not None and not isinstance(reference, str):
        raise PromptError(f"{where}: {ref_field} must be text (a reference answer), got {type(reference).__name__} "
                          f"{str(reference)[:60]!r}")
    for field, value in (("prompt_id", prompt_id), ("lang", lang), ("reference", reference),
                         *((f"messages[{i}]", m["content"]) for i, m in enumerate(messages))):
        _utf8(where, field, value)
    if system_prompt:
        messages = [{"role": "system", "content": system_prompt}] + messages
    return {"prompt_id": str(prompt_id), "lang": lang, "messages": messages,
            "reference": reference, "source": source, "_where": where}


def _mapped(where: str, obj: dict, columns: dict[str, str]) -> dict:
    """The row with prompts.columns' source columns read as rayalign's fields; a mapped column must exist."""
    missing = [f"{col!r} (prompts.columns.{field})" for field, col in columns.items() if col not in obj]
    if missing:
        raise PromptError(f"{where}: no column {', '.join(missing)}; the row has {', '.join(map(repr, obj)) or 'none'}")
    return {**obj, **{field: obj[col] for field, col in columns.items()}} if columns else obj


def load_prompts(path: str | Path, languages: list[str], *, limit: int | None = None, skip: int = 0,
                 system_prompt: str | None = None, split: str = "train", revision: str | None = None,
                 config: str | None = None, columns: dict[str, str] | None = None) -> pa.Table:
    """Load a parallel prompt set for `languages`; every prompt_id must be present in every language.

    `split`, `revision` and `config` apply to hf: sources; `columns` maps prompt_id, instruction and lang
    to the source's column names."""
    columns = {k: v for k, v in (columns or {}).items() if v}
    if str(path).startswith("hf:"):
        from rayalign.data.hub import HubError, read_hub_rows

        try:
            hub_rows = read_hub_rows(str(path), languages, split=split, revision=revision, config=config,
                                     lang_column=columns.get("lang", "lang"))
        except HubError as e:
            raise PromptError(str(e)) from None
        rows = []
        for where, obj, lang in hub_rows:
            obj = _mapped(where, obj, {k: v for k, v in columns.items() if k != "lang"})
            rows.append(_to_row(where, {**obj, "lang": lang}, lang, system_prompt, str(path)))  # read_hub_rows' lang
        return _parallel(str(path), rows, languages, limit, skip)
    key = _version(Path(path), languages, limit, skip, system_prompt, columns)
    if key is not None and key in _LOADED:
        return _LOADED[key]
    table = _load_local(Path(path), languages, limit, skip, system_prompt, columns)
    if key is not None:
        _LOADED.clear()  # one prompt set per process in practice; keep the latest
        _LOADED[key] = table
    return table


_LOADED: dict[tuple, pa.Table] = {}  # a launch reads its prompts in the CLI, the plan and the run: parsed once


def _version(path: Path, *settings) -> tuple | None:
    """The cache key of a local prompt source: the settings and every file's content digest (hashing is cheap
    beside parsing, and no file-system timestamp granularity can hide an edit)."""
    try:
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        digests = tuple((f.name, hashlib.blake2b(f.read_bytes(), digest_size=16).hexdigest()) for f in files
                        if f.is_file())
    except OSError:
        return None
    return (str(path.resolve()), json.dumps(settings, sort_keys=True, default=str), digests)


def _load_local(path: Path, languages: list[str], limit: int | None, skip: int, system_prompt: str | None,
                columns: dict[str, str]) -> pa.Table:
    rows: list[dict] = []
    if path.is_dir():
        for lang in languages:
            files = [path / f"{lang}{ext}" for ext in READERS if (path / f"{lang}{ext}").is_file()]
            if not files:
                raise PromptError(f"{path}: no prompt file for language {lang!r} "
                                  f"(expected {lang}.jsonl, {lang}.json or {lang}.parquet)")
            if len(files) > 1:
                raise PromptError(f"{path}: several files for language {lang!r}: {', '.join(f.name for f in files)}")
            for where, obj in _read(files[0]):
                row = _to_row(where, _mapped(where, obj, columns), lang, system_prompt, files[0].name)
                if row["lang"] != lang:
                    raise PromptError(f"{where}: lang {row['lang']!r} in the file for {lang!r}")
                rows.append(row)
    elif path.is_file():
        rows = [_to_row(where, _mapped(where, obj, columns), None, system_prompt, path.name)
                for where, obj in _read(path)]
        found = sorted({r["lang"] for r in rows})
        rows = [r for r in rows if r["lang"] in languages]
        if not rows and found:
            raise PromptError(f"{path}: no prompts for languages {languages}; the file has {', '.join(found)}")
    else:
        raise PromptError(f"{path}: prompt source not found")
    return _parallel(path, rows, languages, limit, skip)


def _parallel(path, rows: list[dict], languages: list[str], limit: int | None, skip: int = 0) -> pa.Table:
    """Refuse duplicates and ids missing a language; sort by (prompt_id, language order); keep `limit` ids after
    the first `skip`."""
    seen: dict[tuple[str, str], str] = {}
    for row in rows:
        key = (row["prompt_id"], row["lang"])
        if key in seen:
            raise PromptError(f"{row['_where']}: duplicate (prompt_id, lang) {key} (first at {seen[key]})")
        seen[key] = row["_where"]
    by_id: dict[str, set[str]] = {}
    for pid, lang in seen:
        by_id.setdefault(pid, set()).add(lang)
    missing = {pid: [lang for lang in languages if lang not in langs] for pid, langs in by_id.items()}
    missing = {pid: langs for pid, langs in missing.items() if langs}
    if missing:
        shown = "; ".join(f"{pid}: {', '.join(langs)}" for pid, langs in sorted(missing.items())[:10])
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise PromptError(f"{path}: {len(missing)} prompt_id(s) lack languages: {shown}{more}")
    if not rows:
        raise PromptError(f"{path}: no prompts for languages {languages}")

    ids = sorted(by_id)[skip:]
    if not ids:
        raise PromptError(f"{path}: prompts.skip {skip} leaves none of its {len(by_id)} prompt ids")
    ids = ids[:limit] if limit else ids
    order = {lang: i for i, lang in enumerate(languages)}
    keep = set(ids)
    rows = sorted((r for r in rows if r["prompt_id"] in keep), key=lambda r: (r["prompt_id"], order[r["lang"]]))
    for r in rows:
        del r["_where"]
    return pa.Table.from_pylist(rows, schema=schema_for("prompts")[1])


def load_candidate_sets(path: str | Path, languages: list[str]) -> pa.Table:
    """A parallel candidate set (multiple choice or fill-in): a directory with <lang>.jsonl rows holding
    question_id, question, candidates (list of strings, the same order in every language) and gold.
    Returns one row per (question, language, candidate)."""
    path = Path(path)
    if not path.is_dir():
        raise PromptError(f"{path}: candidate set directory not found")
    seen: dict[str, dict] = {}
    rows = []
    for lang in languages:
        file = path / f"{lang}.jsonl"
        if not file.is_file():
            raise PromptError(f"{path}: no candidate file for language {lang!r} (expected {lang}.jsonl)")
        for where, obj in _read_jsonl(file):
            qid, question, cands, gold = (obj.get(k) for k in ("question_id", "question", "candidates", "gold"))
            if not isinstance(qid, str) or not qid.strip() or not isinstance(question, str) or not question.strip():
                raise PromptError(f"{where}: expected question_id and question as non-empty strings, got "
                                  f"{qid!r} and {question!r:.60}")
            if not isinstance(cands, list) or len(cands) < 2 or not all(isinstance(c, str) and c.strip() for c in cands):
                raise PromptError(f"{where}: candidates must be a list of at least 2 non-empty strings")
            for field, value in (("question_id", qid), ("question", question), *(
                    (f"candidates[{i}]", c) for i, c in enumerate(cands))):
                _utf8(where, field, value)
            if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(cands):
                raise PromptError(f"{where}: gold must be an index into candidates (0..{len(cands) - 1}), got {gold!r}")
            first = seen.setdefault(qid, {"n": len(cands), "gold": gold, "where": where, "langs": set()})
            if lang in first["langs"]:
                raise PromptError(f"{where}: duplicate question_id {qid!r}")
            if (len(cands), gold) != (first["n"], first["gold"]):
                raise PromptError(f"{where}: question {qid!r} has {len(cands)} candidates with gold {gold}, but "
                                  f"{first['where']} has {first['n']} with gold {first['gold']} (must be parallel)")
            first["langs"].add(lang)
            for i, cand in enumerate(cands):
                rows.append({"prompt_id": qid, "lang": lang, "messages": [{"role": "user", "content": question}],
                             "candidate_idx": i, "candidate": cand, "gold": gold})
    missing = {q: [lang for lang in languages if lang not in v["langs"]] for q, v in seen.items()}
    missing = {q: m for q, m in missing.items() if m}
    if missing:
        shown = "; ".join(f"{q}: {', '.join(m)}" for q, m in sorted(missing.items())[:10])
        raise PromptError(f"{path}: {len(missing)} question(s) lack languages: {shown}")
    if not rows:
        raise PromptError(f"{path}: no questions in {', '.join(f'{lang}.jsonl' for lang in languages)}")
    return pa.Table.from_pylist(sorted(rows, key=lambda r: (r["prompt_id"], languages.index(r["lang"]),
                                                            r["candidate_idx"])))
