"""One lazy cube per sensor: xarray.DataArray[time, band, y, x] in physical units via odc-stac."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import odc.stac
import pystac
import xarray as xr
from odc.geo.geobox import GeoBox

from ..modalities import ModalitySpec


def load_cube(items: Sequence[pystac.Item], spec: ModalitySpec, geobox: GeoBox, *,
              naming: str = "planetary-computer",
              patch_url: Callable[[str], str] | None = None) -> xr.DataArray:
    """Lazy cube of `items` on `geobox` (CRS, resolution = the sensor's GSD), one Dask chunk.

    Values are physical (reflectance, dB backscatter, metres) as float32; nodata is NaN.
    Items of the same solar day are mosaicked. `patch_url` signs hrefs just before reading.
    """
    assets = spec.asset_keys(naming)
    raw = odc.stac.load(
        items, bands=assets, geobox=geobox, groupby="solar_day", chunks={"x": -1, "y": -1},
        resampling=spec.resampling, nodata=spec.nodata, patch_url=patch_url,
        fail_on_error=True,
    )
    cube = raw[assets].to_dataarray("band").assign_coords(band=spec.band_names)
    cube = cube.transpose("time", "band", "y", "x")
    valid = cube != spec.nodata if spec.nodata is not None else xr.ones_like(cube, dtype=bool)
    values = cube.astype("float32") * np.float32(spec.scale) + np.float32(spec.offset)
    if spec.transform == "db":
        valid = valid & (values > 0)
        values = 10 * np.log10(values.where(valid))
    cube = values.where(valid).astype("float32")
    cube.attrs = {"sensor": spec.name, "gsd_m": spec.gsd_m, "crs": str(geobox.crs)}
    return cube.rename(spec.name)


def read_cube(cube: xr.DataArray) -> xr.DataArray:
    """Read pixels into memory with local threads (safe inside a Dask worker's task)."""
    return cube.compute(scheduler="threads")
