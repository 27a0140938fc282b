"""Both cube backends, cloud masks, temporal binning, and cube geometry from real items."""

import datetime as dt
import json
import shutil

import numpy as np
import pystac
import pytest
import rasterio
import xarray as xr
from shapely.geometry import box

from anysat.cube import bin_time, load_cube, read_cube
from anysat.cube.masks import invalid_pixels
from anysat.errors import SpecError
from anysat.modalities import available_specs
from anysat.stac import resolve_provider, search_items
from anysat.tiles import Tile, plan_tiles
from tests.conftest import CENTRAL_TILE, DEMO_BBOX, DEMO_CATALOG

SPECS = available_specs()
TILE = Tile(*CENTRAL_TILE)
START, END = dt.date(2020, 11, 1), dt.date(2021, 10, 31)
SHARED_STAC = DEMO_CATALOG.parents[2] / "shared" / "data" / "stac"


def demo_items(name):
    return search_items(resolve_provider("demo"), SPECS[name], DEMO_BBOX, START, END)


@pytest.mark.parametrize("name", ["sentinel-2-l2a", "sentinel-1", "copernicus-dem"])
def test_a_cube_read_at_once_equals_the_lazy_one(name):
    spec = SPECS[name]
    lazy = read_cube(load_cube(demo_items(name), spec, TILE.geobox(spec.gsd_m), naming="demo"))
    eager = load_cube(demo_items(name), spec, TILE.geobox(spec.gsd_m), naming="demo", lazy=False)
    assert eager.chunks is None                        # numpy, no Dask graph
    xr.testing.assert_identical(eager, lazy)


@pytest.mark.parametrize("name,tolerance", [("sentinel-2-l2a", 0), ("sentinel-1", 0),
                                            ("copernicus-dem", 0.3)])
def test_odc_stac_and_stackstac_give_the_same_cube(name, tolerance):
    spec = SPECS[name]
    cubes = [load_cube(demo_items(name), spec, TILE.geobox(spec.gsd_m), naming="demo", backend=b)
             for b in ("odc-stac", "stackstac")]
    for lazy in cubes:  # lazy on Dask, one chunk per tile
        assert lazy.chunks is not None and lazy.data.numblocks == (1, 1, 1, 1)
    odc, stk = (read_cube(c) for c in cubes)
    assert odc.dims == stk.dims == ("time", "band", "y", "x") and odc.shape == stk.shape
    for coord in ("time", "band", "x", "y"):
        np.testing.assert_array_equal(odc[coord].values, stk[coord].values)
    assert odc.odc.geobox == stk.odc.geobox == TILE.geobox(spec.gsd_m)
    np.testing.assert_array_equal(np.isnan(odc.values), np.isnan(stk.values))
    # The 10 m grids align with the COGs: identical. The 30 m DEM is resampled (bilinear) by
    # two different warpers: within 0.3 m of ~150 m.
    np.testing.assert_allclose(odc.values, stk.values, rtol=0, atol=tolerance)


def test_unknown_backend():
    with pytest.raises(SpecError, match="unknown cube backend 'gdal'"):
        load_cube(demo_items("sentinel-1"), SPECS["sentinel-1"], TILE.geobox(10), naming="demo",
                  backend="gdal")


def test_mask_rules_for_scl_classes_and_qa_pixel_bits():
    import xarray as xr

    s2, landsat = SPECS["sentinel-2-l2a"].cloud_mask, SPECS["landsat-c2-l2"].cloud_mask
    scl = xr.DataArray(np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, np.nan]))
    assert invalid_pixels(scl, s2).values.tolist() == [
        True, True, False, True, False, False, False, False, True, True, True, False, False]
    # QA_PIXEL: 21824 clear land, 21952 clear water, 1 fill, 22280 cloud (bit 3),
    # 23888 cloud shadow (bit 4), 54596 cirrus (bit 2), 21826 dilated cloud (bit 1).
    qa = xr.DataArray(np.array([21824, 21952, 1, 22280, 23888, 54596, 21826], dtype="float32"))
    assert invalid_pixels(qa, landsat).values.tolist() == [False, False, True, True, True, True, True]


@pytest.fixture(scope="module")
def cloudy_catalog(tmp_path_factory):
    """The demo's June S2 item with a real-layout 20 m SCL asset added: vegetation (4) in the
    west half, high-probability cloud (9) in the east half of the central tile."""
    root = tmp_path_factory.mktemp("cloudy")
    shutil.copytree(DEMO_CATALOG / "sentinel-2-l2a" / "S2-L2A-DEMO-20210601", root / "item")
    item = pystac.Item.from_file(str(root / "item" / "S2-L2A-DEMO-20210601.json"))
    item.clear_links()
    with rasterio.open(root / "item" / "B04.tif") as src:
        profile, bounds = src.profile, src.bounds
    width, height = profile["width"] // 2, profile["height"] // 2
    transform = rasterio.transform.from_bounds(*bounds, width, height)
    scl = np.full((height, width), 4, dtype="uint8")
    col = int((TILE.bounds[0] + TILE.size_m / 2 - bounds.left) // 20)
    scl[:, col:] = 9
    with rasterio.open(root / "item" / "SCL.tif", "w", driver="GTiff", width=width, height=height,
                       count=1, dtype="uint8", crs=profile["crs"], transform=transform, nodata=0) as dst:
        dst.write(scl, 1)
    item.add_asset("SCL", pystac.Asset(str(root / "item" / "SCL.tif"), roles=["data"]))
    for asset in item.assets.values():
        asset.href = str((root / "item" / asset.href.split("/")[-1]).resolve())
    return item


@pytest.mark.parametrize("backend", ["odc-stac", "stackstac"])
def test_scl_clouds_become_nan_on_every_band(cloudy_catalog, backend):
    spec = SPECS["sentinel-2-l2a"]
    masked = read_cube(load_cube([cloudy_catalog], spec, TILE.geobox(10), backend=backend))
    plain = read_cube(load_cube([cloudy_catalog], spec, TILE.geobox(10), naming="demo", backend=backend))
    assert masked.shape == plain.shape == (1, 9, 60, 60)
    west, east = masked.values[..., :30], masked.values[..., 30:]
    assert np.isnan(east).all() and not np.isnan(west).any()
    np.testing.assert_array_equal(west, plain.values[..., :30])


def test_monthly_input_binned_by_quarter_keeps_dates():
    spec = SPECS["sentinel-2-l2a"]
    lazy = load_cube(demo_items("sentinel-2-l2a"), spec, TILE.geobox(10), naming="demo")
    binned = bin_time(lazy, "QS-DEC")
    assert binned.data.numblocks[2:] == (1, 1)  # still lazy
    binned, monthly = read_cube(binned), read_cube(lazy).values
    assert binned.dates_in_bin.values.tolist() == [1, 3, 3, 3, 2]
    assert str(binned.period.values[1])[:10] == "2020-12-01"
    # Dec, Jan, Feb composites: stamped at their mean date, median over the clear ones.
    assert str(binned.time.values[1])[:10] == "2021-01-01"
    np.testing.assert_allclose(binned.values[1], np.nanmedian(monthly[1:4], axis=0), rtol=1e-6)
    assert binned.dims == ("time", "band", "y", "x") and binned.attrs["time_bin"] == "QS-DEC"


@pytest.mark.parametrize("backend", ["odc-stac", "stackstac"])
def test_geometry_of_13_planetary_computer_items_without_reading_pixels(backend):
    """Real PC sentinel-2-l2a items of MGRS 35MNM (June-July 2020): the grid and time axis
    come from metadata alone; hrefs point to the internet and are never read."""
    features = json.loads((SHARED_STAC / "odc-stac/data/site2-2020_jun_jul-35MNM.geojson").read_text())
    items = [pystac.Item.from_dict(f) for f in features["features"]]
    spec = SPECS["sentinel-2-l2a"]
    tile = plan_tiles(box(27.5, -7.75, 27.505, -7.745), 600.0)[0]
    cube = load_cube(items, spec, tile.geobox(10), naming="planetary-computer", backend=backend)
    assert tile.epsg == 32735 and cube.attrs["crs"] == "EPSG:32735"
    assert cube.dims == ("time", "band", "y", "x") and cube.shape == (13, 9, 60, 60)
    assert list(cube.band.values) == spec.band_names
    assert cube.attrs["transform"] == (10.0, 0.0, tile.bounds[0], 0.0, -10.0, tile.bounds[3])
    dates = sorted({i.datetime.date() for i in items})
    assert [str(t)[:10] for t in cube.time.values] == [str(d) for d in dates]
    assert dates[0] == dt.date(2020, 6, 1) and dates[-1] == dt.date(2020, 7, 31)


def test_a_raster_georeferenced_by_gcps_only(tmp_path):
    """Sentinel-1 GRD style: no CRS, no transform, only ground control points (here the demo
    S1 pixels rewritten so, GCPs at pixel centres). odc-stac warps it to the same cube as the
    original; stackstac cannot, and says so by name."""
    from rasterio.control import GroundControlPoint

    spec = SPECS["sentinel-1"]
    original = demo_items("sentinel-1")[0]
    item = original.clone()
    item.make_asset_hrefs_absolute()
    for key in ("vv", "vh"):
        with rasterio.open(item.assets[key].get_absolute_href()) as src:
            data, t, crs, nodata = src.read(), src.transform, src.crs, src.nodata
        h, w = data.shape[1:]
        gcps = [GroundControlPoint(row=r + 0.5, col=c + 0.5, x=(t * (c + 0.5, r + 0.5))[0],
                                   y=(t * (c + 0.5, r + 0.5))[1])
                for r in (0, h // 2, h - 1) for c in (0, w // 2, w - 1)]
        with rasterio.open(tmp_path / f"{key}.tif", "w", driver="GTiff", width=w, height=h,
                           count=1, dtype=data.dtype, nodata=nodata) as dst:
            dst.write(data)
            dst.gcps = (gcps, crs)
        item.assets[key].href = str(tmp_path / f"{key}.tif")
        for field in [f for f in item.assets[key].extra_fields if f.startswith("proj:")]:
            del item.assets[key].extra_fields[field]
    for field in [f for f in item.properties if f.startswith("proj:")]:
        del item.properties[field]
    with rasterio.open(tmp_path / "vv.tif") as src:
        assert src.crs is None and src.transform.is_identity and len(src.gcps[0]) == 9
    geobox = TILE.geobox(spec.gsd_m)
    warped = load_cube([item], spec, geobox, naming="demo", lazy=False)
    expected = load_cube([original], spec, geobox, naming="demo", lazy=False)
    np.testing.assert_allclose(warped.values, expected.values, atol=1e-4)
    with pytest.raises(SpecError, match=r"vv.tif is georeferenced by ground control points only.*"
                                        r"--cube-backend odc-stac"):
        load_cube([item], spec, geobox, naming="demo", backend="stackstac", lazy=False)


def test_a_multi_band_asset_is_read_band_by_band_when_the_item_lists_its_bands():
    """NAIP: one 4-band `image` asset (a real NAIP crop from ../shared/data/pretrain); the
    spec reads image.1..4. Without `raster:bands` the error says what to add; stackstac,
    one band per asset, refuses; a media type odc-stac does not read is named."""
    from affine import Affine
    from odc.geo.geobox import GeoBox
    from pyproj import Transformer
    from shapely.geometry import mapping

    path = SHARED_STAC.parent / "pretrain" / "stactools-naip" / "m_3211605_ne_11_060_20200415.tif"
    with rasterio.open(path) as src:
        bounds, crs, pixels = src.bounds, src.crs, src.read()
    to_lonlat = Transformer.from_crs(crs, 4326, always_xy=True)
    west, south = to_lonlat.transform(bounds.left, bounds.bottom)
    east, north = to_lonlat.transform(bounds.right, bounds.top)

    def item(**asset_fields):
        found = pystac.Item("naip", mapping(box(west, south, east, north)), [west, south, east, north],
                            dt.datetime(2020, 4, 15, tzinfo=dt.timezone.utc), {})
        fields = {"media_type": "image/tiff; application=geotiff", **asset_fields}
        found.add_asset("image", pystac.Asset(str(path), roles=["data"], media_type=fields.pop("media_type"),
                                              extra_fields=fields))
        return found

    spec = SPECS["naip"]
    x, y = Transformer.from_crs(crs, 32611, always_xy=True).transform(
        (bounds.left + bounds.right) / 2, (bounds.top + bounds.bottom) / 2)
    geobox = GeoBox((60, 60), Affine(1, 0, round(x) - 30, 0, -1, round(y) + 30), "EPSG:32611")
    listed = {"raster:bands": [{"data_type": "uint8"}] * 4}
    cube = load_cube([item(**listed)], spec, geobox, naming="planetary-computer", lazy=False)
    assert cube.shape == (1, 4, 60, 60) and list(cube.band.values) == ["red", "green", "blue", "nir"]
    # each band is the file's band (the 60 m window's mean, against the whole crop's: same order)
    means = np.nanmean(cube.values[0], axis=(1, 2))
    assert np.all(np.abs(means - pixels.reshape(4, -1).mean(axis=1)) < 25)
    assert means[3] > means[2]  # vegetation: NIR above blue
    with pytest.raises(SpecError, match=r"band 1 of the multi-band asset 'image'.*add `raster:bands`"):
        load_cube([item()], spec, geobox, naming="planetary-computer", lazy=False)
    with pytest.raises(SpecError, match="stackstac reads one band per asset"):
        load_cube([item(**listed)], spec, geobox, naming="planetary-computer", backend="stackstac")
    with pytest.raises(SpecError, match="media type 'application/x-naip' is not read as raster"):
        load_cube([item(media_type="application/x-naip", **listed)], spec, geobox,
                  naming="planetary-computer", lazy=False)
    with pytest.raises(SpecError, match=r"reads asset 'image.1', which the item lacks \(it has: visual\)"):
        renamed = item(**listed)
        renamed.assets["visual"] = renamed.assets.pop("image")
        load_cube([renamed], spec, geobox, naming="planetary-computer", lazy=False)


def test_data_far_from_the_spec_or_coarser_than_its_gsd_are_warned_about(caplog):
    """Sentinel-1 digital numbers read as if calibrated (+30 dB off), and 60 m pixels for a
    10 m sensor: one warning each, naming the sensor, band and figures."""
    from anysat.cube import batch

    spec = SPECS["sentinel-1"]
    items = demo_items("sentinel-1")
    cube = read_cube(load_cube(items, spec, TILE.geobox(spec.gsd_m), naming="demo"))
    batch._warned.clear()
    batch.warn_if_unusual(cube.values, spec, items)
    assert not caplog.records  # the demo's own data are as the spec says
    batch.warn_if_unusual(cube.values + 30, spec, items)
    coarse = items[0].clone()
    coarse.properties["proj:transform"] = [60.0, 0, 600000, 0, -60.0, 5700000]
    batch.warn_if_unusual(cube.values + 30, spec, [coarse])  # warned once per kind only
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "sentinel-1: band vv has median" in messages[0] and "std from the spec's mean -9.795" in messages[0]
    assert f"item {coarse.id} has 60 m pixels, coarser than 3 x the spec's 10 m GSD" in messages[1]
