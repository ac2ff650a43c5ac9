"""Reading a dataset's item catalog (schema.ItemCatalog) and checking it against dataset.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from embshard.datasets.schema import DatasetSpec, check_ids, check_no_nulls, flat_ids, read_parquet_table, reads_as
from embshard.datasets.storage import StoragePath, location
from embshard.errors import DataError


def read_catalog(dataset_dir: str | Path | StoragePath, spec: DatasetSpec, start: int = 0,
                 stop: int | None = None) -> pa.Table:
    """Catalog rows [start, stop) (item ids start..stop-1), every value checked like a split's."""
    if spec.catalog is None:
        raise DataError(f"{dataset_dir}: dataset {spec.name!r} has no item catalog")
    path = location(dataset_dir) / spec.catalog.path
    table = read_parquet_table(path, "dataset.json records an item catalog there")
    if table.num_rows != spec.catalog.rows:
        raise DataError(f"{path}: {table.num_rows:,} rows, dataset.json records {spec.catalog.rows:,}")
    expected = spec.catalog_arrow_schema()
    for field in expected:
        i = table.schema.get_field_index(field.name)
        if i < 0 or not reads_as(table.schema.field(i).type, field.type):
            raise DataError(f"{path}: column {field.name!r} missing or not of type {field.type}")
    stop = table.num_rows if stop is None else stop
    table = table.slice(start, stop - start).select(expected.names)
    # A null became a NaN float that every id check let pass: an IndexError at the first evaluation.
    check_no_nulls(path, table, expected.names, start)
    ids = table[spec.catalog.item_id].to_numpy()
    wrong = np.flatnonzero(ids != np.arange(start, stop))
    if wrong.size:
        raise DataError(f"{path}: column {spec.catalog.item_id!r}, row {start + wrong[0]}: id {ids[wrong[0]]}, "
                        f"expected {start + wrong[0]} (one row per id, in id order)")
    for name in spec.catalog.features:
        values, offsets = flat_ids(table[name])
        check_ids(path, name, values, spec.feature(name).cardinality, offsets=offsets, first_row=start)
    return table
