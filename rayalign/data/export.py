"""`rayalign export`: a run's dataset in Hugging Face Hub layout, or a prompt set as verl's RL Parquet.

Hub layout: data/<lang>/train-<content hash>-00000-of-00001.parquet, one config per language plus `default`
(every language), and a README whose YAML header declares them. The content hash in the file names keeps
two exports in directories of the same name apart in one datasets cache: for a local directory with
`configs:`, `datasets` keys its cache by the directory's name and the file patterns alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from rayalign.data.store import DatasetError, _size_category, read_dataset, read_manifest, refuse_inside_dataset

STAGES = ("pairs", "scores", "samples")
TASKS = {"pairs": ["text-generation", "reinforcement-learning"], "kto": ["text-generation"],
         "dco": ["text-generation"], "scores": ["text-generation"], "samples": ["text-generation"]}


class ExportError(ValueError):
    """An export that cannot be made; the message names the path and what was expected."""


HUB_LICENSES = frozenset((  # the Hub's license identifiers (huggingface.co/docs/hub/repositories-licenses)
    "apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m "
    "afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 "
    "cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 "
    "cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 "
    "cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl "
    "gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc lppl-1.3c ms-pl mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql "
    "ofl-1.1 ncsa unlicense zlib pddl lgpl-lr llama2 llama3 llama3.1 llama3.2 llama3.3 gemma unknown other").split())


def check_license(license_id: str) -> None:
    """A license id the Hub accepts in a card (`other` for anything else, described in the card's text)."""
    if license_id not in HUB_LICENSES:
        close = sorted(x for x in HUB_LICENSES if license_id and license_id.lower().replace(" ", "-") in x)[:5]
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ExportError(f"--license {license_id!r}: not a Hub license id{hint}; use one such as apache-2.0, mit, "
                          "cc-by-4.0, or other (and name the license in the card)")


def find_dataset(path: Path, stage: str) -> Path:
    """A dataset directory itself, or in a run directory the last iteration's `stage` dataset."""
    if (path / "manifest.json").is_file():
        return path
    iterations = sorted((p for p in path.glob("iter-*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
    for it in reversed(iterations):
        if (it / stage / "manifest.json").is_file():
            return it / stage
    raise ExportError(f"{path}: neither a dataset (no manifest.json) nor a run with a finished {stage} dataset "
                      "(iter-*/" + stage + "/manifest.json)")


def _run_of(dataset: Path) -> Path | None:
    """The run that holds `dataset` (iter-<t>/<stage> or a dataset directly in it): the parent with a state.json."""
    return next((d for d in (dataset.parent.parent, dataset.parent) if (d / "state.json").is_file()), None)


def _run_config(dataset: Path) -> dict:
    """The config.yaml of the run that holds `dataset` ({} when there is none, or when it is not a run's); refused
    naming the file when it is not UTF-8, not YAML or not a mapping."""
    from rayalign.config.fields import read_yaml_file

    run = _run_of(dataset)
    if run is None or not (run / "config.yaml").is_file():
        return {}
    cfg = read_yaml_file(run / "config.yaml", "run config", ExportError) or {}
    if not isinstance(cfg, dict):
        raise ExportError(f"{run / 'config.yaml'}: expected a mapping of settings (the run's recipe), got "
                          f"{type(cfg).__name__}")
    return cfg


def _shown_source(dataset: Path) -> str:
    """The dataset as the card names it: from its run's name down (`<run>/iter-2/pairs`), else its own name, so
    that no local path is published and the card does not depend on how the source was spelled."""
    dataset = dataset.resolve()
    run = _run_of(dataset)
    return dataset.relative_to(run.parent).as_posix() if run else dataset.name


def _section(cfg: dict, key: str) -> dict:
    return cfg[key] if isinstance(cfg.get(key), dict) else {}


@contextlib.contextmanager
def _written_whole(out: Path):
    """A temporary directory beside the claimed, empty `out`, renamed to `out` once everything is written: a failed
    write (a full disk) leaves `out` empty, so the same export can run again; the error names the file."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        out.rmdir()
        tmp.rename(out)
    except (OSError, pa.ArrowException) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        where = getattr(e, "filename", None) or out
        raise ExportError(f"{where}: could not be written ({getattr(e, 'strerror', None) or e}); nothing was "
                          f"exported to {out}") from None


def _claim(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: exists and is not an empty directory; choose a new OUT")
    if (out.absolute().parent / "state.json").is_file() and re.fullmatch(r"iter-\d+|online|trash-.*", out.name):
        raise ExportError(f"{out}: a run's own directory name (the run {out.parent} keeps its iterations there); "
                          "choose an OUT outside the run")
    refuse_inside_dataset(out, "an export")
    out.mkdir(parents=True, exist_ok=True)


def _body(manifest: dict, cfg: dict, source: str, by_lang: dict[str, int]) -> str:
    models = "\n".join(f"- {role}: `{name}`" for role, name in manifest.get("models", {}).items()) or "- (none)"
    params = json.dumps(manifest.get("params", {}), indent=2, ensure_ascii=False, sort_keys=True)
    rewards = _section(cfg, "rewards")
    used = [name for name, section in rewards.items() if isinstance(section, dict)
            and (section.get("enabled") or (name == "user" and section.get("path")))]
    lines = [
        f"# {manifest['schema']} from a rayalign run\n",
        f"{manifest.get('description', '')}\n",
        "## How it was made\n",
        f"- rayalign {manifest.get('rayalign_version', '?')}, schema {manifest['schema']} "
        f"v{manifest['schema_version']}, config hash `{manifest.get('config_hash', '')}`",
        f"- source: `{source}` ({manifest['rows']} rows)",  # run-relative: the same however OUT was spelled
        f"- rows per config: {', '.join(f'{k} {v}' for k, v in by_lang.items())}",
        f"- rewards: {', '.join(used) or '(none recorded)'}",
    ]
    if cfg:
        pairs, training = _section(cfg, "pairs"), _section(cfg, "training")
        lines += [f"- pairs method: {pairs.get('method')}; training loss: {training.get('loss')}",
                  f"- sampling: {json.dumps(_section(cfg, 'sampling'), sort_keys=True)}",
                  f"- prompts: `{_section(cfg, 'prompts').get('path')}`"]
    lines += ["", "Models:", models, "", "Parameters:", "```json", params, "```", "",
              "## Loading", "", "```python", "import datasets",
              "datasets.load_dataset(REPO_OR_DIR, split=\"train\")        # every language",
              f"datasets.load_dataset(REPO_OR_DIR, {next(iter(by_lang))!r}, split=\"train\")  # one config", "```", ""]
    if cfg:
        lines += ["## Recipe", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True).rstrip(),
                  "```", ""]
    return "\n".join(lines)


def export_hub(source: Path, out: Path, *, stage: str = "pairs", license: str = "other",
               pretty_name: str | None = None) -> dict:
    """Write `source` (a dataset, or a run's last `stage` dataset) to `out` in Hub layout; returns the header."""
    dataset = find_dataset(source, stage)
    try:
        manifest, table = read_manifest(dataset), read_dataset(dataset)
    except DatasetError as e:
        raise ExportError(str(e)) from None
    if table.num_rows == 0:
        raise ExportError(f"{dataset}: no rows to export")
    order = manifest.get("languages") or []
    rank = lambda lang: (order.index(lang), "") if lang in order else (len(order), lang)  # noqa: E731
    if "lang" in table.column_names:
        groups = {(lang,): lang for lang in table.column("lang").to_pylist()}
        key = table.column("lang")
    elif {"lang_1", "lang_2"} <= set(table.column_names):  # DCO tuples: one config per language pair
        key = pc.binary_join_element_wise(table.column("lang_1"), table.column("lang_2"), "-")
        groups = dict(zip(zip(table.column("lang_1").to_pylist(), table.column("lang_2").to_pylist()),
                          key.to_pylist()))
    else:
        raise ExportError(f"{dataset}: {manifest['schema']} rows have no lang (or lang_1 and lang_2) column")
    configs_by = [groups[g] for g in sorted(groups, key=lambda g: [rank(lang) for lang in g])]
    bad = [name for name in configs_by if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", str(name))]
    if bad:  # each names a folder under data/: '../x' would write outside OUT
        raise ExportError(f"{dataset}: language value(s) {', '.join(map(repr, bad[:5]))} cannot name a Hub config "
                          "(letters, digits, '-' and '_' only)")
    languages = sorted({lang for g in groups for lang in g}, key=rank)
    digest = hashlib.sha256()
    for shard in manifest["shards"]:
        digest.update(shard["sha256"].encode())
    tag = digest.hexdigest()[:12]
    cfg = _run_config(dataset)  # read before anything is written: a damaged config.yaml leaves no partial export
    parts = {name: table.filter(pc.equal(key, name)) for name in configs_by}
    files = {name: Path("data") / name / f"train-{tag}-00000-of-00001.parquet" for name in configs_by}
    configs = [{"config_name": "default", "data_files": [{"split": "train", "path": f"data/*/train-{tag}-*.parquet"}],
                "default": True}]
    configs += [{"config_name": name, "data_files": [{"split": "train", "path": f"data/{name}/train-{tag}-*.parquet"}]}
                for name in configs_by]
    header = {
        "configs": configs,
        "language": languages,
        "license": license,
        "task_categories": TASKS.get(manifest["schema"], ["text-generation"]),
        "size_categories": [_size_category(table.num_rows)],
        "pretty_name": pretty_name or f"rayalign {manifest['schema']} ({', '.join(languages)})",
        "tags": ["rayalign", manifest["schema"], "multilingual", "synthetic"],
    }
    by_config = {name: part.num_rows for name, part in parts.items()}
    card = f"---\n{yaml.safe_dump(header, sort_keys=False, allow_unicode=True)}---\n\n" + \
        _body(manifest, cfg, _shown_source(dataset), by_config)
    if _same_export(out, card, parts, files):
        return {**header, "kept": True}
    _claim(out)
    with _written_whole(out) as tmp:
        for name, part in parts.items():
            (tmp / files[name]).parent.mkdir(parents=True)
            pq.write_table(part, tmp / files[name], compression="zstd")
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return header


def _same_export(out: Path, card: str, parts: dict[str, pa.Table], files: dict[str, Path]) -> bool:
    """Whether `out` already holds exactly this export (its card, and every file with the same rows), so that
    exporting again, e.g. to push it, keeps it."""
    try:
        if not out.is_dir() or (out / "README.md").read_text(encoding="utf-8") != card:
            return False
        present = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
        return present == {Path("README.md"), *files.values()} and \
            all(pq.read_table(out / files[name]).equals(part) for name, part in parts.items())
    except (OSError, UnicodeError, pa.ArrowException):
        return False


def verl_rows(prompts: pa.Table, data_source: str, ability: str = "multilingual") -> pa.Table:
    """verl's RL dataset rows: data_source, prompt (chat list), ability, reward_model {style, ground_truth}
    and extra_info {split, index, prompt_id, lang, reference}, as verl's prepare_data documents; ground_truth is the language the response should be in."""
    rows = []
    for i, r in enumerate(prompts.to_pylist()):
        rows.append({"data_source": data_source, "prompt": r["messages"], "ability": ability,
                     "reward_model": {"style": "rule", "ground_truth": r["lang"]},
                     "extra_info": {"split": "train", "index": i, "prompt_id": r["prompt_id"], "lang": r["lang"],
                                    "reference": r.get("reference") or ""}})
    return pa.Table.from_pylist(rows)


def export_verl(cfg, out: Path, *, data_source: str = "rayalign") -> Path:
    """The recipe's prompt set (all languages) as one verl RL Parquet file, out/train.parquet."""
    from rayalign.data.prompts import load_prompts

    prompts = load_prompts(cfg.prompts.path, cfg.languages, **cfg.prompts.load_kwargs())
    _claim(out)
    with _written_whole(out) as tmp:
        pq.write_table(verl_rows(prompts, data_source), tmp / "train.parquet")
    return out / "train.parquet"


def check_repo_id(repo: str) -> None:
    """A Hub repo id (`user/name`), checked before anything is written."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise ExportError(f"--push-to-hub {repo!r}: not a Hub repo id such as me/quickstart-pairs ("
                          f"{str(e).splitlines()[0]})") from None


def push_to_hub(out: Path, repo: str, *, private: bool = False) -> str:
    """Upload an export to the Hub dataset `repo` (needs the network and a token: `hf auth login` or HF_TOKEN)."""
    from huggingface_hub import HfApi, get_token

    if not get_token():
        raise ExportError("--push-to-hub: no Hugging Face token configured (run `hf auth login` or set HF_TOKEN)")
    api = HfApi()
    try:
        api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(out), repo_id=repo, repo_type="dataset",
                                 commit_message="rayalign export")
    except Exception as e:  # network, permissions: one clean line
        raise ExportError(f"--push-to-hub {repo}: upload failed ({type(e).__name__}: {str(e).splitlines()[0]})") \
            from None
    return getattr(info, "commit_url", f"https://huggingface.co/datasets/{repo}")

