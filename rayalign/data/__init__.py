"""Datasets: Arrow schemas, the sharded Parquet store, and prompt loading."""

from rayalign.data.schemas import SCHEMA_VERSIONS, schema_for
from rayalign.data.store import DatasetError, DatasetWriter, read_dataset, read_manifest

__all__ = ["SCHEMA_VERSIONS", "schema_for", "DatasetError", "DatasetWriter", "read_dataset", "read_manifest"]
