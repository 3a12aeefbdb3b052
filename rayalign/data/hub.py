"""Hugging Face Hub sources: prompt sets read with `datasets.load_dataset`, model ids, and what to do offline.

A Hub name that is neither cached nor reachable is refused at once, before any work starts: with no
network (or HF_HUB_OFFLINE=1) the Hub clients would otherwise retry with backoff and fail deep inside a run.
When the Hub cannot be reached, this process and the actors it starts run with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import tempfile
from pathlib import Path

HF_PREFIX = "hf:"
TRUE = {"1", "ON", "YES", "TRUE"}
_unreachable = False  # set when this process went offline because the Hub could not be reached


class HubError(ValueError):
    """A Hub prompt set or model that cannot be used here; the message names the key and what to do."""


def _env_offline() -> bool:
    return any(os.environ.get(k, "").upper() in TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                               "TRANSFORMERS_OFFLINE"))


def hub_reachable() -> bool:
    """False when HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) is set or one request to the Hub fails."""
    return not _env_offline() and _probe()


@functools.lru_cache(maxsize=1)
def _probe(timeout: float = 3.0) -> bool:
    """One request to the Hub endpoint (proxies from the environment apply), no retries."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
        return True
    except Exception:  # DNS, connection refused, timeout, proxy: all mean "not reachable from here"
        return False


def go_offline_if_unreachable() -> bool:
    """Set HF_HUB_OFFLINE=1 for this process and its children when the Hub cannot be reached; True if offline."""
    global _unreachable
    if hub_reachable():
        return False
    if not _env_offline():
        _unreachable = True
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    return True


@contextlib.contextmanager
def _offline_clients(offline: bool):
    """The datasets and huggingface_hub clients read their offline flag at import; set it for this block."""
    if not offline:
        yield
        return
    import datasets.config
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _why_offline() -> str:
    return ("HF_HUB_OFFLINE is set" if _env_offline() and not _unreachable
            else f"the Hugging Face Hub ({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}) cannot be reached")


def split_hf_path(path: str) -> tuple[str, bool]:
    """(dataset name or directory, is a local directory) of an `hf:` prompts.path."""
    target = path[len(HF_PREFIX):].strip()
    if not target:
        raise HubError(f"prompts.path: {path!r}: expected hf:<dataset name or local dataset directory>")
    local = Path(target).expanduser().is_dir()
    if not local and target.startswith((".", "/", "~")):  # a path, not a Hub name
        raise HubError(f"prompts.path: {path}: local dataset directory {target} not found")
    if local and not _holds_data(Path(target).expanduser()):  # datasets would scan it all (hf:/ took minutes)
        raise HubError(f"prompts.path: {path}: {target} holds no dataset: no data files ({', '.join(DATA_FILES)}) in "
                       "it or its first two levels of folders, and no save_to_disk files")
    return (str(Path(target).expanduser()) if local else target), local


DATA_FILES = (".parquet", ".arrow", ".jsonl", ".json", ".csv")


def _holds_data(directory: Path, depth: int = 3, budget: int = 10_000) -> bool:
    """Whether `directory` (or its folders, `depth` levels down) holds a data file; gives up after `budget`
    entries."""
    level = [directory]
    for _ in range(depth):
        folders = []
        for folder in level:
            try:
                entries = list(itertools.islice(folder.iterdir(), budget))
            except OSError:
                continue
            budget -= len(entries)
            if any(e.suffix in DATA_FILES and e.is_file() for e in entries):
                return True
            folders += [e for e in entries if e.is_dir() and not e.name.startswith(".")]
            if budget <= 0:
                return False
        level = folders
    return False


def _load_one(target: str, local: bool, config: str | None, split: str, revision: str | None):
    import datasets

    where = f"prompts.path hf:{target}" + (f" (config {config!r})" if config else "")
    offline = not local and not hub_reachable()
    try:
        if local and (Path(target) / "dataset_info.json").is_file() and (Path(target) / "state.json").is_file():
            return datasets.load_from_disk(target, keep_in_memory=True)  # one Dataset.save_to_disk directory
        if local:  # prepared afresh: datasets caches a local directory with `configs:` by its name and patterns alone,
            # so another directory of the same name, or this one edited, would load the cached rows
            with tempfile.TemporaryDirectory(prefix="rayalign-hf-") as cache:
                return datasets.load_dataset(target, config, split=split, cache_dir=cache, keep_in_memory=True)
        with _offline_clients(offline):
            return datasets.load_dataset(target, config, split=split, revision=revision)
    except Exception as e:  # the datasets client raises many types; each becomes one clean message
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if offline:
            raise HubError(
                f"{where}: not in the local datasets cache ({datasets.config.HF_DATASETS_CACHE}) and {_why_offline()}."
                f" Load it once where the Hub is reachable (datasets.load_dataset({target!r}"
                f"{', ' + repr(config) if config else ''}, split={split!r})) and copy the cache, or save it to a "
                "directory (save_to_disk, or Parquet files in Hub layout) and set prompts.path: hf:<directory>") from None
        if "config name is missing" in text.lower():
            raise HubError(f"{where}: it has several configs ({', '.join(_config_names(target, local, revision))}); "
                           "set prompts.config to one, or to '{lang}' when each language is a config") from None
        if "split" in text.lower():
            raise HubError(f"{where}: no split {split!r} ({text}); set prompts.split") from None
        cause = e.__cause__ or e.__context__  # DatasetGenerationError says only "An error occurred"
        why = f"; {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}" if cause else ""
        raise HubError(f"{where}: cannot load ({type(e).__name__}: {text}{why})") from None


def _config_names(target: str, local: bool, revision: str | None) -> list[str]:
    """The dataset's config names; [] when unknown (offline, datasets' cache lists only "default", so each
    config's own load says whether the cache has it)."""
    import datasets

    if not local and not hub_reachable():
        return []
    try:
        return sorted(datasets.get_dataset_config_names(target, revision=revision))
    except Exception:
        return []


def read_hub_rows(path: str, languages: list[str], *, split: str, revision: str | None, config: str | None,
                  lang_column: str) -> list[tuple[str, dict, str | None]]:
    """(where, row, language or None) for `languages` from an hf: source, one config per language when
    config contains "{lang}", otherwise one table whose `lang_column` holds the language codes."""
    target, local = split_hf_path(path)
    if local and revision:
        raise HubError(f"prompts.revision: {revision!r}: hf:{target} is a local directory, which has no revisions "
                       "(datasets would ignore it); remove prompts.revision, or name the Hub dataset")
    if revision and not local and not hub_reachable():
        raise HubError(f"prompts.revision: {revision!r} cannot be checked: {_why_offline()}, and offline the datasets "
                       f"cache serves its copy of {target} whatever the revision. Remove prompts.revision to use the "
                       "cached copy, or run where the Hub is reachable")
    rows: list[tuple[str, dict, str | None]] = []
    if config and "{lang}" in config:
        names = _config_names(target, local, revision)
        missing = [lang for lang in languages if names and config.format(lang=lang) not in names]
        if missing:
            raise HubError(f"prompts.path hf:{target}: no config for language(s) {', '.join(missing)} "
                           f"(prompts.config {config!r}); it has configs: {', '.join(names)}")
        for lang in languages:
            name = config.format(lang=lang)
            table = _load_one(target, local, name, split, revision)
            rows += [(f"hf:{target} [{name}/{split}] row {i}", row, lang) for i, row in enumerate(table)]
        return rows
    table = _load_one(target, local, config, split, revision)
    if lang_column not in table.column_names:
        raise HubError(f"prompts.path hf:{target}: no language column {lang_column!r} (columns: "
                       f"{', '.join(table.column_names)}); set prompts.columns.lang, or prompts.config: "
                       "'{lang}' for a dataset with one config per language")
    present = sorted({str(v) for v in table[lang_column]})
    missing = [lang for lang in languages if lang not in present]
    if missing:
        raise HubError(f"prompts.path hf:{target}: no rows for language(s) {', '.join(missing)} in column "
                       f"{lang_column!r}; it has: {', '.join(present[:50])}")
    wanted = set(languages)
    return [(f"hf:{target} [{split}] row {i}", row, row[lang_column]) for i, row in enumerate(table)
            if row[lang_column] in wanted]


def check_hub_dataset(path: str, *, revision: str | None = None) -> None:
    """Refuse, before any work, an hf: dataset name that is neither cached nor reachable, or absent from the Hub."""
    target, local = split_hf_path(path)
    if local:
        return
    if not hub_reachable():
        return  # read_hub_rows in offline mode decides: the cache has it, or a clear HubError
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().dataset_info(target, revision=revision, timeout=10)
    except RepositoryNotFoundError:
        raise HubError(f"prompts.path: {path!r}: no dataset {target!r} on the Hugging Face Hub (or it is private "
                       "and no token is configured)") from None
    except RevisionNotFoundError:
        raise HubError(f"prompts.revision: {revision!r} not found in dataset {target!r}") from None
    except Exception:
        pass  # gated, rate-limited: loading will say more


def check_model_source(key: str, path: str) -> None:
    """Refuse a Hub model id that is not in the local Hugging Face cache when the Hub cannot be reached."""
    from huggingface_hub import constants, try_to_load_from_cache

    if path.startswith("builtin:") or Path(path).expanduser().exists() or path.startswith((".", "/", "~")):
        return  # the tiny model, or a local directory (checked by resolve_model_path)
    try:
        cached = try_to_load_from_cache(path, "config.json")
    except Exception:  # not a valid repo id
        raise HubError(f"{key}: {path!r} is neither a local model directory nor a Hugging Face model id") from None
    if isinstance(cached, str) or hub_reachable():
        return
    raise HubError(f"{key}: {path!r} is not a local directory and not in the Hugging Face cache "
                   f"({constants.HF_HUB_CACHE}), and {_why_offline()}. Download it where the Hub is reachable "
                   f"(hf download {path}) and copy the cache, or set {key} to a local model directory")
