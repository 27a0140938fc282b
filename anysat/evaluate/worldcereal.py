"""The WorldCereal public extractions (crop-type points with 12 monthly steps of Sentinel-2
L2A and Sentinel-1 per point) as point series in physical units, with their labels."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import AnySatError
from ..points import PointSeries

NODATA = 65535
STEPS = 12
# Our S2 L2A spec's bands (WorldCereal also has B8A, which the spec leaves out).
S2_BANDS = {"B02": "10m", "B03": "10m", "B04": "10m", "B05": "20m", "B06": "20m",
            "B07": "20m", "B08": "10m", "B11": "20m", "B12": "20m"}
S1_BANDS = {"vv": "SAR-VV", "vh": "SAR-VH"}
MIN_POINTS_PER_CLASS = 5


@dataclass
class LabelledPoints:
    series: PointSeries
    labels: np.ndarray      # ewoc_code per point
    lon: np.ndarray
    lat: np.ndarray
    ids: np.ndarray

    def subset(self, rows: np.ndarray) -> LabelledPoints:
        return LabelledPoints(self.series.subset(rows), self.labels[rows], self.lon[rows],
                              self.lat[rows], self.ids[rows])

    def sample(self, n: int, seed: int = 0, min_per_class: int = MIN_POINTS_PER_CLASS
               ) -> LabelledPoints:
        """About n points with the class shares kept (classes left under min_per_class are
        dropped), for quick runs."""
        if n >= len(self.labels):
            return self
        rng = np.random.default_rng(seed)
        rows = []
        for label in np.unique(self.labels):
            members = np.flatnonzero(self.labels == label)
            take = round(n * len(members) / len(self.labels))
            if take >= min_per_class:
                rows.append(rng.choice(members, take, replace=False))
        return self.subset(np.sort(np.concatenate(rows)))


def _monthly_dates(start: str, n: int) -> np.ndarray:
    first = dt.date.fromisoformat(str(start)[:10])
    months = [(first.month - 1 + i) for i in range(n)]
    days = [dt.date(first.year + m // 12, m % 12 + 1, 1) for m in months]
    return np.array(days, dtype="datetime64[D]").astype("int64").astype("float32")


def is_worldcereal_table(table: pd.DataFrame) -> bool:
    return {"OPTICAL-B02-ts0-10m", "SAR-VV-ts0-20m", "start_date"} <= set(table.columns)


def worldcereal_series(table: pd.DataFrame) -> PointSeries:
    """Sentinel-2 L2A and Sentinel-1 series of WorldCereal extraction rows. Reflectance =
    DN / 1e4; backscatter dB = 20 log10(DN) - 83 (WorldCereal's uint16 encoding); 65535 =
    missing."""

    def stack(columns: list[str]) -> np.ndarray:  # [N, T] per band
        raw = np.stack([table[c].to_numpy() for c in columns], axis=1).astype("float64")
        raw[raw == NODATA] = np.nan
        return raw

    s2 = np.stack([stack([f"OPTICAL-{b}-ts{t}-{res}" for t in range(STEPS)])
                   for b, res in S2_BANDS.items()], axis=2) / 1e4
    with np.errstate(divide="ignore", invalid="ignore"):
        s1 = np.stack([20 * np.log10(stack([f"{prefix}-ts{t}-20m" for t in range(STEPS)])) - 83
                       for prefix in S1_BANDS.values()], axis=2)
    s1[~np.isfinite(s1)] = np.nan
    dates = np.stack([_monthly_dates(s, STEPS) for s in table["start_date"]])
    return PointSeries({"sentinel-2-l2a": s2.astype("float32"), "sentinel-1": s1.astype("float32")},
                       {"sentinel-2-l2a": dates, "sentinel-1": dates.copy()})


def read_worldcereal_points(path: str, min_per_class: int = MIN_POINTS_PER_CLASS
                            ) -> LabelledPoints:
    """Points of the classes with at least `min_per_class` points, with their labels."""
    try:
        table = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise AnySatError(f"cannot read WorldCereal points {path}: {exc}") from None
    if not is_worldcereal_table(table):
        raise AnySatError(f"{path} is not a WorldCereal extraction table")
    counts = table["ewoc_code"].value_counts()
    table = table[table["ewoc_code"].isin(counts[counts >= min_per_class].index)]
    table = table.reset_index(drop=True)
    return LabelledPoints(worldcereal_series(table), table["ewoc_code"].to_numpy(),
                          table["lon"].to_numpy(), table["lat"].to_numpy(),
                          table["sample_id"].to_numpy())
