"""The dataset store: a directory of Parquet shards, a manifest.json and a README.md dataset card.

A shard is written under a temporary name and renamed when complete, after its checksum file
(`part-XXXXX.sha256`, in `sha256sum -c` format; not `.parquet.sha256`, which `datasets` would
take for a Parquet file); the manifest is written last, so a directory with a
manifest is a complete dataset and a crash never leaves a half-written shard under a final name. A shard is
trusted on resume only when it matches the checksum recorded when it was written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

import rayalign
from rayalign.data.schemas import schema_for

MANIFEST = "manifest.json"
CARD = "README.md"
SHARD_GLOB = "part-*.parquet"
CHECKSUM = ".sha256"
DATASET_FILE = re.compile(r"part-\d+\.(parquet|sha256)|manifest\.json|README\.md|.*\.tmp")


class DatasetError(RuntimeError):
    """A dataset that is incomplete, corrupted or of another schema; the message names the file."""


class DatasetWriteError(DatasetError, OSError):
    """A dataset file that could not be written (disk full, permission denied); the message names the file."""


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checksum_path(shard: Path) -> Path:
    return shard.with_suffix(CHECKSUM)


def recorded_sha256(shard: Path) -> str | None:
    """The checksum recorded when `shard` was written (its .sha256 file), or None when there is none."""
    try:
        digest = checksum_path(shard).read_text(encoding="ascii").split()[0]
    except (OSError, UnicodeDecodeError, IndexError):
        return None
    return digest if re.fullmatch(r"[0-9a-f]{64}", digest) else None


def shard_problem(shard: Path, manifest_sha256: str | None = None) -> str | None:
    """Why `shard` cannot be trusted (missing, or not the bytes recorded when it was written), or None.

    Checked against the manifest's checksum when given and against the shard's checksum file when present; a
    shard with neither was never recorded and is not trusted."""
    if not shard.is_file():
        return "missing"
    recorded = recorded_sha256(shard)
    if recorded is None and manifest_sha256 is None:
        return "no checksum was recorded when it was written"
    actual = sha256_file(shard)
    if manifest_sha256 is not None and actual != manifest_sha256:
        return "sha256 does not match the manifest (file changed or corrupted)"
    if recorded is not None and actual != recorded:
        return f"sha256 does not match {checksum_path(shard).name} (file changed or corrupted)"
    return None


def directory_checksums(path: Path) -> dict[str, str]:
    """sha256 of every file under `path`, by relative path (to check a saved policy or checkpoint later)."""
    return {str(f.relative_to(path)): sha256_file(f) for f in sorted(path.rglob("*")) if f.is_file()}


def directory_problems(path: Path, recorded: dict[str, str]) -> list[str]:
    """How the files under `path` differ from `recorded` (directory_checksums when written): missing, changed or
    extra files. Empty when identical."""
    if not path.is_dir():
        return [f"{path}: missing"]
    actual = {str(f.relative_to(path)) for f in path.rglob("*") if f.is_file()}
    problems = [f"{path / name}: missing" for name in sorted(set(recorded) - actual)]
    problems += [f"{path / name}: not written by this run" for name in sorted(actual - set(recorded))]
    problems += [f"{path / name}: sha256 does not match the checksum recorded when it was written"
                 for name in sorted(set(recorded) & actual) if sha256_file(path / name) != recorded[name]]
    return problems


def conform(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """Select and order `schema`'s columns from `table`, casting where safe; name what does not fit."""
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise DatasetError(f"{where}: missing column(s) {', '.join(missing)}")
    columns = []
    for f in schema:
        col = table.column(f.name)
        if not col.type.equals(f.type):
            try:
                col = col.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise DatasetError(f"{where}: column {f.name} has type {col.type}, expected {f.type}") from None
        if not f.nullable and col.null_count:
            raise DatasetError(f"{where}: column {f.name} has {col.null_count} null value(s), expected none")
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=schema)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DatasetWriteError(f"{path}: could not be written ({e.strerror or e}); the previous version is "
                                "kept") from e


def write_parquet_atomic(table: pa.Table, path: Path, *, checksum: bool = False, **options) -> Path:
    """Write `table` to `path` under a temporary name, sync, then rename: `path` is complete or absent (or as
    before). With `checksum`, the written bytes' sha256 goes to the .sha256 file beside `path` before the
    rename, so a shard in place always has its recorded checksum. A failed write (disk full, permission denied) raises
    DatasetWriteError naming `path`."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        if table.num_rows:
            pq.write_table(table, tmp, **options)
        else:  # no row group: datasets then reads "no data" (a 0-row group fails its reader)
            pq.ParquetWriter(tmp, table.schema, **options).close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if checksum:
            atomic_write_text(checksum_path(path), f"{sha256_file(tmp)}  {path.name}\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DatasetWriteError(f"{path}: could not be written ({e.strerror or e}); earlier shards are kept") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class DatasetWriter:
    """Writes one dataset. Shards may arrive in any order; `finalize` writes the card and manifest."""

    def __init__(self, path: str | Path, schema_name: str, *, config_hash: str = "", models: dict | None = None,
                 seeds: dict | None = None, languages: list[str] | None = None, description: str = "",
                 schema_params: dict | None = None, params: dict | None = None):
        self.path = Path(path)
        self.schema_name = schema_name
        self.version, self.schema = schema_for(schema_name, schema_params)
        self.meta = {"schema_params": schema_params or {}, "config_hash": config_hash, "models": models or {},
                     "seeds": seeds or {}, "params": params or {}, "languages": languages or [],
                     "description": description}
        check_dataset_dir(self.path, schema_name)
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob("*.tmp"):  # left by an interrupted write; never a complete shard
            stale.unlink()
        self.rejected: list[str] = []  # shards found damaged or unrecorded on resume, removed to be recomputed

    def has_shard(self, index: int) -> bool:
        """Whether shard `index` is on disk and matches the checksum recorded when it was written; a shard that
        does not is removed (and listed in `rejected`) so that it is computed again."""
        shard = self.path / shard_name(index)
        if not shard.is_file():
            return False
        problem = shard_problem(shard)
        if problem:
            self.rejected.append(f"{shard}: {problem}")
            shard.unlink()
            checksum_path(shard).unlink(missing_ok=True)
            return False
        return True

    def write_shard(self, index: int, table: pa.Table) -> Path:
        table = conform(table, self.schema, f"{self.path / shard_name(index)}")
        return write_parquet_atomic(table, self.path / shard_name(index), checksum=True, compression="zstd")

    def finalize(self, expected_shards: int | None = None) -> dict:
        """Write the card and the manifest, whose checksums are those recorded when each shard was written (a
        shard that no longer matches is refused, never re-hashed into the manifest)."""
        shards = sorted(self.path.glob(SHARD_GLOB))
        if expected_shards is not None and len(shards) != expected_shards:
            raise DatasetError(f"{self.path}: expected {expected_shards} shards, found {len(shards)}")
        entries, rows = [], 0
        for shard in shards:
            problem = shard_problem(shard)
            if problem:
                raise DatasetError(f"{shard}: {problem}; launch again to recompute it")
            n = pq.ParquetFile(shard).metadata.num_rows
            entries.append({"file": shard.name, "rows": n, "sha256": recorded_sha256(shard)})
            rows += n
        manifest = {
            "schema": self.schema_name,
            "schema_version": self.version,
            "rows": rows,
            "shards": entries,
            **self.meta,
            "rayalign_version": rayalign.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        kept = self._unchanged_manifest(manifest)
        if kept is not None:  # finalized before with the same content (a resumed stage): left as it was
            return kept
        atomic_write_text(self.path / CARD, dataset_card(manifest))
        atomic_write_text(self.path / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        return manifest

    def _unchanged_manifest(self, manifest: dict) -> dict | None:
        """The manifest on disk when it equals `manifest` but for its creation time and the card is there."""
        try:
            old = json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        new = json.loads(json.dumps(manifest, ensure_ascii=False))
        same = isinstance(old, dict) and {k: v for k, v in old.items() if k != "created"} == \
            {k: v for k, v in new.items() if k != "created"}
        return old if same and (self.path / CARD).is_file() else None


def is_dataset_dir(path: Path) -> bool:
    """Whether `path` holds a rayalign dataset's manifest (not any manifest.json: a web project has those too)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and {"schema", "shards"} <= set(manifest)


def enclosing_dataset(path: Path) -> Path | None:
    """The dataset directory that `path` lies inside, if any."""
    return next((d for d in Path(path).absolute().parents if is_dataset_dir(d)), None)


def refuse_inside_dataset(path: Path, what: str) -> None:
    dataset = enclosing_dataset(path)
    if dataset is not None:
        raise DatasetError(f"{path}: inside the dataset {dataset}; {what} is not written into another dataset's "
                           "directory (datasets.load_dataset would read it as part of that dataset)")


def check_dataset_dir(path: Path, schema_name: str) -> None:
    """Refuse to write a `schema_name` dataset into a directory that holds anything else: files that are not a
    dataset's, or a dataset of another schema, or that lies inside another dataset."""
    refuse_inside_dataset(path, f"a {schema_name} dataset")
    if not path.exists():
        return
    if not path.is_dir():
        raise DatasetError(f"{path}: exists and is not a directory; choose another output")
    others = foreign_files(path)
    if others:
        raise DatasetError(f"{path}: holds other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})"
                           f"; a {schema_name} dataset is written only into a new or empty directory or its own")
    try:
        held = json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("schema")
    except (OSError, ValueError, AttributeError):
        return
    if held != schema_name:
        raise DatasetError(f"{path}: holds a {held} dataset; a {schema_name} dataset is not written over it")


def trash_dir(parent: Path) -> Path:
    """Where a command moves what it replaces or does not trust: <parent>/trash-<date>-<time>."""
    return parent / f"trash-{time.strftime('%Y%m%d-%H%M%S')}"


def claim_output_dir(path: Path, schema_name: str, *, replace: bool = False, trash: Path | None = None,
                     check_only: bool = False) -> Path | None:
    """Make `path` ready for a new `schema_name` dataset that a command was told to write there: absent or empty is
    fine; a non-empty directory is refused unless `replace` and it holds a dataset of that schema, which is then
    moved into `trash` (returned); so is a directory inside another dataset. A run, an iteration, another kind of
    dataset or a user's files are never moved. `check_only`: refuse as it would, move nothing."""
    refuse_inside_dataset(path, "a new dataset")
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return None
    if not replace:
        raise DatasetError(f"{path}: exists and is not empty; choose a new directory, or pass --replace to move the "
                           "old one to the trash and write there")
    partial = all(re.fullmatch(r"part-\d+\.(parquet|sha256)(\.tmp)?", p.name) for p in path.iterdir())
    if not partial and (not is_dataset_dir(path) or any(p.is_dir() for p in path.iterdir())):
        raise DatasetError(f"{path}: --replace replaces only a dataset, and this is a directory of other things (a "
                           "run, an iteration or your files); choose a new directory")
    held = schema_name if partial else read_manifest(path).get("schema")  # partial: shards of a write that stopped
    if held != schema_name:
        raise DatasetError(f"{path}: holds a {held} dataset; --replace replaces only a {schema_name} dataset (a "
                           f"run keeps its {held} there); choose a new directory")
    if check_only:
        return None
    target = (trash or trash_dir(path.parent)) / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path, target)
    return target


def dataset_problems(path: str | Path) -> list[tuple[Path | None, str]]:
    """What makes the dataset at `path` untrustworthy, as (shard or None, message): an unreadable or missing
    manifest, shards not in it, and shards that are missing or do not match the checksums recorded when they
    were written. Empty when intact."""
    path = Path(path)
    try:
        listed = {entry["file"]: entry.get("sha256") for entry in read_manifest(path)["shards"]}
        problems = [(path / name, f"{path / name}: not in the manifest")
                    for name in sorted({p.name for p in path.glob(SHARD_GLOB)} - set(listed))]
    except DatasetError as e:
        listed, problems = {p.name: None for p in sorted(path.glob(SHARD_GLOB))}, [(None, str(e))]
    for name, sha in listed.items():
        problem = shard_problem(path / name, sha)
        if problem:
            problems.append((path / name, f"{path / name}: {problem}"))
    return problems


def foreign_files(path: Path) -> list[str]:
    """Files and folders in a dataset directory that are not the dataset's: `datasets.load_dataset(path)` would
    read a stray .parquet as rows of this dataset (or fail on its columns)."""
    return sorted(p.name for p in path.iterdir() if not (p.is_file() and DATASET_FILE.fullmatch(p.name)))


def remove_untrusted_shards(path: Path) -> list[str]:
    """Check a kept dataset before a resume builds on it. When anything is wrong, the untrusted shards and the
    manifest are removed, so the dataset counts as unfinished and only those shards are computed again.
    Returns the problems found."""
    problems = dataset_problems(path)
    if problems:
        for shard, _ in problems:
            if shard is not None:
                shard.unlink(missing_ok=True)
                checksum_path(shard).unlink(missing_ok=True)
        (path / MANIFEST).unlink(missing_ok=True)
    return [message for _, message in problems]


def _size_category(rows: int) -> str:
    """The Hub card's size_categories value (huggingface_hub's list)."""
    for limit, label in ((10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M"),
                         (10**7, "1M<n<10M"), (10**8, "10M<n<100M"), (10**9, "100M<n<1B"), (10**10, "1B<n<10B"),
                         (10**11, "10B<n<100B"), (10**12, "100B<n<1T")):
        if rows < limit:
            return label
    return "n>1T"


def dataset_card(manifest: dict) -> str:
    # No `configs:` entry: with one, `datasets` keys its cache by the directory's name and the glob alone, so
    # every `samples/` directory would load the first one cached. Without it, the key covers the resolved
    # shard paths and their modification times.
    header = {
        "language": manifest["languages"],
        "size_categories": [_size_category(manifest["rows"])],
        "tags": ["rayalign", manifest["schema"], "multilingual", "synthetic"],
    }
    models = "\n".join(f"- {role}: `{name}`" for role, name in manifest["models"].items()) or "- (none)"
    seeds = "\n".join(f"- {k}: {v}" for k, v in manifest["seeds"].items()) or "- (none)"
    return (
        f"---\n{yaml.safe_dump(header, sort_keys=False, allow_unicode=True)}---\n\n"
        f"# rayalign {manifest['schema']} dataset\n\n{manifest['description']}\n\n"
        f"- rows: {manifest['rows']} in {len(manifest['shards'])} Parquet shard(s)\n"
        f"- schema: {manifest['schema']} v{manifest['schema_version']}\n"
        f"- languages: {', '.join(manifest['languages'])}\n"
        f"- config hash: {manifest['config_hash']}\n- rayalign: {manifest['rayalign_version']}\n\n"
        f"Models:\n{models}\n\nSeeds:\n{seeds}\n\n"
        "Load with `polars.read_parquet(\"part-*.parquet\")` or "
        "`datasets.load_dataset(\"parquet\", data_files=\"part-*.parquet\")`; "
        "`rayalign validate` checks the shards against manifest.json.\n"
    )


def json_kind(value) -> str:
    """What a parsed JSON value is, in JSON's words."""
    if isinstance(value, bool):
        return "true/false"
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise DatasetError(f"{path}: no such dataset directory")
    if not mpath.is_file():
        raise DatasetError(f"{mpath}: missing; the dataset is incomplete (interrupted run?) or not a rayalign dataset")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except ValueError as e:  # malformed JSON, not UTF-8, or an integer of too many digits
        raise DatasetError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise DatasetError(f"{mpath}: expected a JSON object, got {json_kind(manifest)}")
    for key in ("schema", "schema_version", "rows", "shards"):
        if key not in manifest:
            raise DatasetError(f"{mpath}: missing field {key!r}")
    if not isinstance(manifest["schema"], str):
        raise DatasetError(f"{mpath}: schema: expected a schema name such as 'pairs', got {json_kind(manifest['schema'])}")
    for key, kind in (("models", dict), ("seeds", dict), ("params", dict), ("schema_params", dict), ("languages", list)):
        if manifest.get(key) is not None and not isinstance(manifest[key], kind):
            raise DatasetError(f"{mpath}: {key}: expected {'an object' if kind is dict else 'a list'}, got "
                               f"{json_kind(manifest[key])}")
    if not all(isinstance(lang, str) for lang in manifest.get("languages") or []):
        raise DatasetError(f"{mpath}: languages: expected language codes (strings), got {manifest['languages']!r}")
    for key in ("schema_version", "rows"):
        if not isinstance(manifest[key], int) or isinstance(manifest[key], bool):
            raise DatasetError(f"{mpath}: {key}: expected an integer, got {manifest[key]!r}")
    if not isinstance(manifest["shards"], list):
        raise DatasetError(f"{mpath}: shards: expected a list of {{file, rows, sha256}} objects, got "
                           f"{json_kind(manifest['shards'])}")
    seen = set()
    for i, entry in enumerate(manifest["shards"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) \
                or not re.fullmatch(r"part-\d+\.parquet", entry["file"]):
            raise DatasetError(f"{mpath}: shards[{i}]: expected {{file: part-NNNNN.parquet (a name in this directory), "
                               f"rows, sha256}}, got {entry!r}")
        if not isinstance(entry.get("rows"), int) or isinstance(entry["rows"], bool):
            raise DatasetError(f"{mpath}: shards[{i}] ({entry['file']}): rows: expected an integer, got "
                               f"{entry.get('rows')!r}")
        if not (isinstance(entry.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
            raise DatasetError(f"{mpath}: shards[{i}] ({entry['file']}): sha256: expected 64 hex digits, got "
                               f"{entry.get('sha256')!r}")
        if entry["file"] in seen:
            raise DatasetError(f"{mpath}: shards[{i}]: {entry['file']} is listed twice")
        seen.add(entry["file"])
    return manifest


def schema_difference(actual: pa.Schema, expected: pa.Schema) -> str:
    """What differs between a shard's columns and the schema's: missing or extra columns, a type, or the order."""
    missing = [n for n in expected.names if n not in actual.names]
    extra = [n for n in actual.names if n not in expected.names]
    if missing or extra:
        return "; ".join(([f"missing column(s) {', '.join(missing)}"] if missing else [])
                         + ([f"extra column(s) {', '.join(extra)}"] if extra else []))
    for f in expected:
        other = actual.field(f.name)
        if not other.type.equals(f.type):
            return f"column {f.name} has type {other.type}, expected {f.type}"
        if other.nullable != f.nullable:
            return f"column {f.name} is {'' if other.nullable else 'not '}nullable, expected the opposite"
    return f"columns {actual.names} are not in the schema's order {expected.names}"


def read_dataset(path: str | Path, schema_name: str | None = None, *, verify: bool = True) -> pa.Table:
    """Read a dataset after checking manifest, schema version, shard checksums, row counts and columns."""
    path = Path(path)
    manifest = read_manifest(path)
    name, version = manifest["schema"], manifest["schema_version"]
    if schema_name is not None and name != schema_name:
        raise DatasetError(f"{path / MANIFEST}: dataset holds {name!r} rows, expected {schema_name!r}")
    try:
        our_version, schema = schema_for(name, manifest.get("schema_params"))
    except ValueError as e:
        raise DatasetError(f"{path / MANIFEST}: {e}") from None
    if version != our_version:
        raise DatasetError(
            f"{path / MANIFEST}: schema {name} version {version}, this rayalign ({rayalign.__version__}) "
            f"reads version {our_version}"
        )
    on_disk = {p.name for p in path.glob(SHARD_GLOB)}
    listed = [s["file"] for s in manifest["shards"]]
    extra = sorted(on_disk - set(listed))
    if extra:
        raise DatasetError(f"{path}: shard(s) not in the manifest: {', '.join(extra)}")
    tables = []
    for entry in manifest["shards"]:
        shard = path / entry["file"]
        if not shard.is_file():
            raise DatasetError(f"{shard}: listed in the manifest but missing")
        problem = shard_problem(shard, entry["sha256"]) if verify else None
        if problem:
            raise DatasetError(f"{shard}: {problem}")
        try:
            table = pq.read_table(shard)
        except (pa.ArrowInvalid, OSError) as e:
            raise DatasetError(f"{shard}: unreadable Parquet ({e})") from None
        if table.num_rows != entry["rows"]:
            raise DatasetError(f"{shard}: {table.num_rows} rows, the manifest says {entry['rows']}")
        if not table.schema.equals(schema):
            raise DatasetError(f"{shard}: {schema_difference(table.schema, schema)} (schema {name} v{version})")
        tables.append(table)
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    if table.num_rows != manifest["rows"]:
        raise DatasetError(f"{path / MANIFEST}: rows {manifest['rows']} but shards hold {table.num_rows}")
    return table
