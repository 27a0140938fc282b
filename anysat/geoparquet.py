"""GeoParquet 1.1 written with pyarrow alone: a WKB `geometry` column in lon/lat (OGC:CRS84,
the default when no `crs` is given) and the `geo` metadata that geopandas, GDAL and DuckDB read."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from . import storage

GEOMETRY_NAMES = {1: "Point", 3: "Polygon", 6: "MultiPolygon"}


def geo_metadata(geometry: np.ndarray) -> dict:
    types = sorted({int(t) for t in shapely.get_type_id(geometry)})
    bbox = [float(v) for v in shapely.total_bounds(geometry)] if len(geometry) else []
    return {"version": "1.1.0", "primary_column": "geometry",
            "columns": {"geometry": {"encoding": "WKB",
                                     "geometry_types": [GEOMETRY_NAMES[t] for t in types],
                                     "bbox": bbox}}}


def with_geometry(columns: dict, geometry: np.ndarray) -> pa.Table:
    """A table of `columns` plus the geometries as WKB, with the GeoParquet metadata."""
    table = pa.table({**columns, "geometry": shapely.to_wkb(geometry)})
    return table.replace_schema_metadata({b"geo": json.dumps(geo_metadata(geometry)).encode()})


def write(table: pa.Table, uri: str) -> None:
    """Write a (Geo)Parquet table to any URI, atomically."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes_atomic(uri, sink.getvalue().to_pybytes())


def read(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)
