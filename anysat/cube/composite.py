"""Temporal binning: one NaN-aware median per period, stamped with the dates it came from."""

from __future__ import annotations

import numpy as np
import xarray as xr


def bin_time(cube: xr.DataArray, freq: str) -> xr.DataArray:
    """Median of each `freq` period (pandas offset: "MS" monthly, "QS" quarterly, "14D"...).

    The time coordinate of a bin is the mean acquisition time of its dates (what the model's
    day-of-year code sees), `period` is the bin start and `dates_in_bin` the count. Periods
    with no acquisition are dropped; a pixel cloudy on every date of a bin stays NaN.
    """
    stamps = xr.DataArray(cube.time.values.astype("datetime64[ns]").astype("int64"),
                          coords={"time": cube.time}, dims="time")
    try:
        counts = stamps.resample(time=freq).count()
    except ValueError as exc:
        raise ValueError(f"time bin {freq!r} is not a pandas offset alias (MS, QS, 14D...): {exc}") from None
    keep = np.flatnonzero(counts.values > 0)
    centre = stamps.resample(time=freq).mean().isel(time=keep)
    median = cube.resample(time=freq).median(skipna=True).isel(time=keep)
    binned = median.assign_coords(
        period=("time", median.time.values),
        dates_in_bin=("time", counts.values[keep]),
        time=centre.values.round().astype("int64").astype("datetime64[ns]"),
    )
    binned.attrs = {**cube.attrs, "time_bin": freq}
    return binned.astype("float32")
