"""Point time series: per-point pixel values and dates of each sensor -> model batches and
embeddings, vectorised over points (one forward per chunk of points, no loop over points).

A points table (Parquet) has one row per point and, per sensor (its spec name), one column
per band holding a list of T values in physical units (NaN = missing) and a `dates` column
holding the T dates: `sentinel-2-l2a.B02`, ..., `sentinel-2-l2a.dates`. Other columns (ids,
lon, lat, labels) are carried through to the output.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from . import storage
from .errors import ModelInputError
from .model import AnySat, load_model
from .request import DEFAULT_MODEL

DATES = "dates"


@dataclass
class PointSeries:
    """values[sensor]: float32 [N, T, C] in physical units, NaN missing; dates[sensor]:
    float32 [N, T] days since 1970-01-01."""

    values: dict[str, np.ndarray]
    dates: dict[str, np.ndarray]

    def __len__(self) -> int:
        return next(iter(self.values.values())).shape[0]

    def subset(self, rows: np.ndarray) -> PointSeries:
        return PointSeries({k: v[rows] for k, v in self.values.items()},
                           {k: v[rows] for k, v in self.dates.items()})


def series_from_table(table: pd.DataFrame, model: AnySat) -> PointSeries:
    """The sensors of `model` found in the table's columns (at least one)."""
    values, dates = {}, {}
    for name, spec in model.modalities.items():
        columns = [f"{name}.{band}" for band in spec.bands]
        present = [c for c in columns if c in table.columns]
        if not present:
            continue
        missing = sorted(set(columns) - set(present)) + (
            [f"{name}.{DATES}"] if f"{name}.{DATES}" not in table.columns else [])
        if missing:
            raise ModelInputError(f"points table: sensor {name} lacks column(s) {missing}")
        try:
            bands = [np.stack(table[c].to_numpy()).astype("float32") for c in columns]
            when = np.stack(table[f"{name}.{DATES}"].to_numpy()).astype("datetime64[D]")
        except ValueError as exc:
            raise ModelInputError(f"points table: {name}: every row needs the same number of "
                                  f"dates in every band ({exc})") from None
        values[name] = np.stack(bands, axis=2)
        dates[name] = when.astype("int64").astype("float32")
        if values[name].shape[:2] != dates[name].shape:
            raise ModelInputError(f"points table: {name}: {values[name].shape[1]} values per "
                                  f"band but {dates[name].shape[1]} dates")
    if not values:
        raise ModelInputError("points table has no column of the model's sensors; expected "
                              f"e.g. '{next(iter(model.modalities))}.<band>' list columns")
    return PointSeries(values, dates)


def series_to_table(series: PointSeries, model: AnySat, extra: pd.DataFrame | None = None
                    ) -> pd.DataFrame:
    """The inverse of `series_from_table` (extra columns first)."""
    columns = {} if extra is None else {c: extra[c].to_numpy() for c in extra.columns}
    for name, values in series.values.items():
        for i, band in enumerate(model.modalities[name].bands):
            columns[f"{name}.{band}"] = list(values[:, :, i])
        days = series.dates[name].astype("int64").astype("datetime64[D]")
        columns[f"{name}.{DATES}"] = [list(row.astype(object)) for row in days]  # Parquet date32
    return pd.DataFrame(columns)


def point_footprint_m(model: AnySat, sensors: list[str]) -> float:
    """The smallest square footprint every sensor can tile: the least common multiple of their
    sub-patch sizes (10 m for S2 + S1, 30 m with the 30 m DEM)."""
    sizes = [round(model.modalities[s].subpatch_m * 1000) for s in sensors]
    return math.lcm(*sizes) / 1000


def points_batch(series: PointSeries, model: AnySat, footprint_m: float, device=None
                 ) -> dict[str, torch.Tensor]:
    """A model batch [N, T, C, k, k]: each point's pixel repeated over the footprint."""
    batch = {}
    for name, values in series.values.items():
        k = round(footprint_m / model.modalities[name].gsd_m)
        x = torch.from_numpy(values).to(device)
        valid = torch.isfinite(x).all(dim=2)
        batch[name] = torch.nan_to_num(x)[..., None, None].expand(-1, -1, -1, k, k)
        batch[f"{name}_mask"] = valid[..., None, None].expand(-1, -1, k, k)
        batch[f"{name}_dates"] = torch.from_numpy(series.dates[name]).to(device)
    return batch


@torch.inference_mode()
def embed_points(model: AnySat, series: PointSeries, batch_size: int = 256) -> np.ndarray:
    """Tile embeddings [N, D] of point time series, `batch_size` points per forward."""
    footprint = point_footprint_m(model, list(series.values))
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(series), batch_size):
        rows = np.arange(start, min(start + batch_size, len(series)))
        batch = points_batch(series.subset(rows), model, footprint, device)
        out.append(model(batch, footprint, output="tile").float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.dim), "float32")


def embed_points_table(table_uri: str, out_uri: str, model: str | AnySat = DEFAULT_MODEL,
                       batch_size: int = 256) -> int:
    """Read a points table (our layout, or WorldCereal extractions), embed every point and
    write its other columns plus an `embedding` list column (atomically); returns the count."""
    from .evaluate.worldcereal import is_worldcereal_table, worldcereal_series  # imports us

    net = load_model(model) if isinstance(model, str) else model
    try:
        table = pd.read_parquet(io.BytesIO(storage.read_bytes(storage.normalize_uri(table_uri))))
    except (OSError, ValueError) as exc:
        raise ModelInputError(f"cannot read points table {table_uri}: {exc}") from None
    if is_worldcereal_table(table):
        series = worldcereal_series(table)
        extra = table[[c for c in table.columns if not c.startswith(("OPTICAL-", "SAR-", "METEO-"))]]
    else:
        series = series_from_table(table, net)
        extra = table[[c for c in table.columns if c.split(".")[0] not in series.values]]
    vectors = embed_points(net, series, batch_size)
    out = extra.reset_index(drop=True).copy()
    out["embedding"] = list(vectors)
    buffer = io.BytesIO()
    out.to_parquet(buffer, index=False)
    storage.write_bytes_atomic(storage.normalize_uri(out_uri), buffer.getvalue())
    return len(out)
