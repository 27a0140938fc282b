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


def test_sentinel2_offset_follows_each_items_processing_baseline():
    """Baseline 04.00 (from 2022-01-25) adds 1000 DN: only those items get -0.1."""
    from anysat.cube.load import item_offset

    spec = SPECS["sentinel-2-l2a"]
    items = search_items(resolve_provider("demo"), spec, box(*DEMO_BBOX), dt.date(2020, 11, 1),
                         dt.date(2021, 10, 31))
    old = items[0]
    assert item_offset(old, spec, "B04") == 0.0  # its raster:bands say offset 0 (2020)
    newer = old.clone()
    for asset in newer.assets.values():
        asset.extra_fields.pop("raster:bands", None)
    newer.properties["s2:processing_baseline"] = "05.09"   # as Planetary Computer records it
    assert item_offset(newer, spec, "B04") == pytest.approx(-0.1)
    newer.properties["s2:processing_baseline"] = "02.14"
    assert item_offset(newer, spec, "B04") == 0.0
    del newer.properties["s2:processing_baseline"]
    newer.datetime = dt.datetime(2023, 5, 1, tzinfo=dt.timezone.utc)   # no baseline: by date
    assert item_offset(newer, spec, "B04") == pytest.approx(-0.1)
    newer.assets["B04"].extra_fields["raster:bands"] = [{"scale": 0.0001, "offset": -0.1}]
    assert item_offset(newer, spec, "B04") == pytest.approx(-0.1)  # Earth Search's record wins
    assert item_offset(newer, SPECS["sentinel-1"], "vv") == SPECS["sentinel-1"].offset

    # in a cube: the same pixels, one date marked baseline 05.09, are 0.1 lower on that date only
    geobox = TILE.geobox(spec.gsd_m)
    before = read_cube(load_cube(items, spec, geobox, naming="demo"))
    marked = [i.clone() for i in items]
    for asset in marked[0].assets.values():
        asset.extra_fields.pop("raster:bands", None)
    marked[0].properties["s2:processing_baseline"] = "05.09"
    after = read_cube(load_cube(marked, spec, geobox, naming="demo"))
    np.testing.assert_allclose(after.values[0], before.values[0] - 0.1, atol=1e-6)
    np.testing.assert_array_equal(after.values[1:], before.values[1:])


def test_pixels_set_to_nan_without_a_branch_equal_a_masked_store():
    """`_set_nan` (bit operations, for a reader's speed) gives the bits of `values[where] =
    np.nan`, in a band's strided view of a (time, band, y, x) block too."""
    from anysat.cube.load import _set_nan

    rng = np.random.default_rng(0)
    block = rng.normal(size=(5, 3, 40, 40)).astype(np.float32)
    block[0, 1, 0, :6] = [0.0, -0.0, np.inf, -np.inf, -0.0, np.inf]
    where = rng.random((5, 40, 40)) < 0.3
    where[0, 0, :6] = [False] * 4 + [True] * 2
    expected = block.copy()
    expected[:, 1][where] = np.nan
    _set_nan(block[:, 1], where)
    assert block.tobytes() == expected.tobytes()
