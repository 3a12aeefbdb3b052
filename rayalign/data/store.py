"""The dataset store: a directory of Parquet shards, a manifest.json and a README.md dataset card.

A shard is written under a temporary name and renamed when complete; the manifest is written last,
so a directory with a manifest is a complete dataset and a crash never leaves a half-written shard
under a final name.
"""

from __future__ import annotations

import hashlib
import json
import os
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


def write_parquet_atomic(table: pa.Table, path: Path, **options) -> Path:
    """Write `table` to `path` under a temporary name, sync, then rename: `path` is complete or absent (or as
    before). A failed write (disk full, permission denied) raises DatasetWriteError naming `path`."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        pq.write_table(table, tmp, **options)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
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
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob("*.tmp"):  # left by an interrupted write; never a complete shard
            stale.unlink()

    def has_shard(self, index: int) -> bool:
        return (self.path / shard_name(index)).is_file()

    def write_shard(self, index: int, table: pa.Table) -> Path:
        table = conform(table, self.schema, f"{self.path / shard_name(index)}")
        return write_parquet_atomic(table, self.path / shard_name(index), compression="zstd")

    def finalize(self, expected_shards: int | None = None) -> dict:
        shards = sorted(self.path.glob(SHARD_GLOB))
        if expected_shards is not None and len(shards) != expected_shards:
            raise DatasetError(f"{self.path}: expected {expected_shards} shards, found {len(shards)}")
        entries, rows = [], 0
        for shard in shards:
            n = pq.ParquetFile(shard).metadata.num_rows
            entries.append({"file": shard.name, "rows": n, "sha256": sha256_file(shard)})
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
        atomic_write_text(self.path / CARD, dataset_card(manifest))
        atomic_write_text(self.path / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        return manifest


def _size_category(rows: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M")):
        if rows < limit:
            return label
    return "n>1M"


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


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise DatasetError(f"{path}: no such dataset directory")
    if not mpath.is_file():
        raise DatasetError(f"{mpath}: missing; the dataset is incomplete (interrupted run?) or not a rayalign dataset")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{mpath}: not valid JSON ({e})") from None
    for key in ("schema", "schema_version", "rows", "shards"):
        if key not in manifest:
            raise DatasetError(f"{mpath}: missing field {key!r}")
    return manifest


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
        if verify and sha256_file(shard) != entry["sha256"]:
            raise DatasetError(f"{shard}: sha256 does not match the manifest (file changed or corrupted)")
        try:
            table = pq.read_table(shard)
        except (pa.ArrowInvalid, OSError) as e:
            raise DatasetError(f"{shard}: unreadable Parquet ({e})") from None
        if table.num_rows != entry["rows"]:
            raise DatasetError(f"{shard}: {table.num_rows} rows, the manifest says {entry['rows']}")
        if not table.schema.equals(schema):
            raise DatasetError(f"{shard}: columns {table.schema.names} do not match schema {name} v{version} "
                               f"({schema.names})")
        tables.append(table)
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    if table.num_rows != manifest["rows"]:
        raise DatasetError(f"{path / MANIFEST}: rows {manifest['rows']} but shards hold {table.num_rows}")
    return table
