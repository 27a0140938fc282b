"""Our search code against real recorded Planetary Computer and Earth Search answers.

vcrpy matches method, URL and JSON body, so each test also proves we send the recorded request.
"""

import datetime as dt
import json

import pystac
import pytest
from shapely.geometry import Point, Polygon, shape

from anysat.modalities import available_specs
from anysat.stac import resolve_provider, search_sensors
from anysat.stac.api import _open
from anysat.stac.search import cloud_filter, within_cloud_limit
from tests.conftest import ROOT

CASSETTES = ROOT / "tests" / "data" / "cassettes"
SPECS = available_specs()


@pytest.fixture(scope="module")
def vcr_config():
    return {"match_on": ["method", "scheme", "host", "port", "path", "query", "body"],
            "record_mode": "none"}


@pytest.fixture(scope="module")
def vcr_cassette_dir():
    return str(CASSETTES)


@pytest.fixture(autouse=True)
def fresh_clients():
    _open.cache_clear()  # each test replays the landing page it recorded
    yield
    _open.cache_clear()


@pytest.mark.vcr("earth-search-s2-landsat-point.yaml")
def test_earth_search_two_sensors_one_paged_request_split_per_sensor(vcr):
    found = search_sensors(resolve_provider("earth-search"),
                           [SPECS["sentinel-2-l2a"], SPECS["landsat-c2-l2"]],
                           Point(-105.1019, 40.1672), dt.date(2023, 10, 8), dt.date(2023, 10, 8))
    assert [i.id for i in found["sentinel-2-l2a"]] == ["S2A_13TDE_20231008_0_L2A"]
    assert [i.id for i in found["landsat-c2-l2"]] == ["LC08_L2SP_033032_20231008_02_T1"]
    assert vcr.play_count == 3 and vcr.all_played  # landing page, page 1, page 2 (next token)
    # Earth Search's asset keys are the ones the specs map for it.
    s2, landsat = found["sentinel-2-l2a"][0], found["landsat-c2-l2"][0]
    assert set(SPECS["sentinel-2-l2a"].asset_keys("earth-search")) <= set(s2.assets)
    assert SPECS["sentinel-2-l2a"].mask_asset("earth-search") in s2.assets
    assert set(SPECS["landsat-c2-l2"].asset_keys("earth-search")) <= set(landsat.assets)
    assert SPECS["landsat-c2-l2"].mask_asset("earth-search") in landsat.assets


@pytest.mark.vcr("planetary-computer-naip-polygon.yaml")
def test_planetary_computer_polygon_search_for_a_timeless_sensor(vcr):
    polygon = Polygon([(-73.21, 43.99), (-73.21, 44.05), (-73.12, 44.05), (-73.12, 43.99)])
    items = search_sensors(resolve_provider("planetary-computer"), [SPECS["naip"]], polygon,
                           dt.date(2020, 1, 1), dt.date(2020, 12, 31))["naip"]
    assert len(items) == 42 and vcr.all_played
    dates = [i.datetime for i in items]
    assert dates == sorted(dates) and dates[0].year == 2011 and dates[-1].year == 2023
    assert all(shape(i.geometry).intersects(polygon) for i in items)
    assert all("image" in i.assets for i in items)


def test_cloud_limit_is_checked_on_every_result():
    """Earth Search answered a `lte 40` filter with scenes above 40% and radar scenes without
    cloud cover: the limit is applied to results whatever the server did with the filter."""
    recorded = json.loads((CASSETTES / "earth-search-filter-response.json").read_text())
    assert recorded["request"]["filter"] == {"op": "lte", "args": [{"property": "eo:cloud_cover"}, 40]}
    items = [pystac.Item.from_dict(f) for f in recorded["features"]]
    spec = SPECS["sentinel-2-l2a"]
    covers = {i.id: i.properties.get("eo:cloud_cover") for i in items}
    kept = {i.id for i in items if within_cloud_limit(i, spec, 40)}
    assert kept == {k for k, c in covers.items() if c is not None and c <= 40}
    assert 0 < len(kept) < len(items) and any(c is None for c in covers.values())
    assert all(within_cloud_limit(i, SPECS["sentinel-1"], 40) for i in items)  # no property: no limit
    assert cloud_filter("eo:cloud_cover", 40) == {"op": "<=", "args": [{"property": "eo:cloud_cover"}, 40]}


@pytest.mark.vcr("earth-search-s2-landsat-point.yaml")
def test_earth_search_items_give_cube_geometry_without_pixels():
    from anysat.cube import load_cube
    from anysat.tiles import plan_tiles

    point = Point(-105.1019, 40.1672)
    specs = [SPECS["sentinel-2-l2a"], SPECS["landsat-c2-l2"]]
    found = search_sensors(resolve_provider("earth-search"), specs, point, dt.date(2023, 10, 8),
                           dt.date(2023, 10, 8))
    tile = plan_tiles(point.buffer(0.001), 600.0)[0]
    for spec, backend in zip(specs, ("odc-stac", "stackstac")):
        cube = load_cube(found[spec.name], spec, tile.geobox(spec.gsd_m), naming="earth-search",
                         backend=backend)
        side = round(600 / spec.gsd_m)
        assert cube.attrs["crs"] == "EPSG:32613" and cube.shape == (1, len(spec.bands), side, side)
        assert list(cube.band.values) == spec.band_names
        assert str(cube.time.values[0])[:10] == "2023-10-08"
