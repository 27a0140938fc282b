import datetime as dt

import numpy as np
import pytest
import rasterio
from shapely.geometry import box

from anysat.cube import load_cube, read_cube
from anysat.modalities import available_specs
from anysat.stac import resolve_provider, search_items
from anysat.tiles import Tile
from tests.conftest import CENTRAL_TILE, DEMO_BBOX, DEMO_CATALOG

SPECS = available_specs()
TILE = Tile(*CENTRAL_TILE)


def cube_for(name):
    spec = SPECS[name]
    items = search_items(resolve_provider("demo"), spec, box(*DEMO_BBOX), dt.date(2020, 11, 1), dt.date(2021, 10, 31))
    return load_cube(items, spec, TILE.geobox(spec.gsd_m), naming="demo")


def test_sentinel2_cube_shape_crs_dates_and_nodata():
    lazy = cube_for("sentinel-2-l2a")
    assert lazy.data.numblocks[2:] == (1, 1)  # the tile is one spatial chunk
    cube = read_cube(lazy)
    assert cube.dims == ("time", "band", "y", "x") and cube.shape == (12, 9, 60, 60)
    assert cube.odc.geobox.crs.epsg == 32631
    assert cube.odc.geobox.affine.c == 664200 and cube.odc.geobox.affine.f == 5611800
    assert str(cube.time.values[0])[:10] == "2020-11-01" and list(cube.band.values[:2]) == ["B02", "B03"]
    per_date_nan = np.isnan(cube.values).mean(axis=(1, 2, 3))
    assert per_date_nan[1] == 1 and per_date_nan[2] == 1 and per_date_nan[0] == 0  # Dec, Jan cloudy


def test_sentinel2_values_are_reflectance_of_the_cog_pixels():
    cube = read_cube(cube_for("sentinel-2-l2a"))
    with rasterio.open(DEMO_CATALOG / "sentinel-2-l2a/S2-L2A-DEMO-20210601/B04.tif") as src:
        window = rasterio.windows.from_bounds(*TILE.bounds, transform=src.transform)
        dn = src.read(1, window=window)
    june = cube.sel(band="B04").isel(time=7).values
    np.testing.assert_allclose(june, dn * 1e-4, rtol=1e-6)


def test_sentinel1_in_db_and_dem_at_30m():
    s1 = read_cube(cube_for("sentinel-1"))
    with rasterio.open(DEMO_CATALOG / "sentinel-1-rtc/S1-RTC-DEMO-20201101/vv.tif") as src:
        window = rasterio.windows.from_bounds(*TILE.bounds, transform=src.transform)
        power = src.read(1, window=window)
    np.testing.assert_allclose(s1.sel(band="vv").isel(time=0).values, 10 * np.log10(power), rtol=1e-5)
    dem = read_cube(cube_for("copernicus-dem"))
    assert dem.shape == (1, 1, 20, 20) and 140 < float(dem.mean()) < 175
    assert dem.odc.geobox.resolution.x == 30
