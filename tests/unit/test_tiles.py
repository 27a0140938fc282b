import json
import math
import subprocess
import sys

import pytest
from pyproj import Transformer
from shapely.geometry import box
from shapely.ops import transform as shapely_transform

from anysat.request import RegionRequest
from anysat.tiles import Tile, plan_tiles, plan_zones, utm_epsg
from tests.conftest import DEMO_BBOX


def test_utm_zone():
    assert utm_epsg(5.32, 50.63) == 32631
    assert utm_epsg(-70.6, -33.4) == 32719


def test_demo_region_plan_is_stable_and_row_major():
    tiles = plan_tiles(box(*DEMO_BBOX), 600)
    ids = [t.id for t in tiles]
    assert ids[0] == "32631_600m_1106_9353" and ids[-1] == "32631_600m_1108_9351"
    assert len(ids) == 9 and ids == [t.id for t in plan_tiles(box(*DEMO_BBOX), 600)]
    # a smaller region inside gives a subset with the same ids
    inner = plan_tiles(box(5.3245, 50.6318, 5.3275, 50.6340), 600)
    assert {t.id for t in inner} <= set(ids)


def test_tile_geometry():
    tile = Tile(32631, 1107, 9352, 600.0)
    assert tile.bounds == (664200.0, 5611200.0, 664800.0, 5611800.0)
    assert tile.geobox(10).shape == (60, 60) and tile.geobox(30).shape == (20, 20)
    assert tile.area_km2 == 0.36
    west, south, east, north = tile.bbox_lonlat
    assert 5.32 < west < east < 5.34 and 50.62 < south < north < 50.64


def test_a_region_across_two_zones_is_split_with_every_tile_once():
    region = box(5.9, 50.0, 6.1, 50.1)                       # 31N | 32N at 6 degrees east
    zones = plan_zones(region, 600.0)
    assert [z.epsg for z in zones] == [32631, 32632]
    ids = [t.id for z in zones for t in z.tiles()]
    assert len(ids) == len(set(ids)) and ids == [t.id for z in plan_zones(region, 600.0) for t in z.tiles()]
    # each zone's tiles cover only its own strip: none reaches more than a tile past 6 degrees
    for zone in zones:
        to_lonlat = Transformer.from_crs(zone.epsg, 4326, always_xy=True)
        for tile in zone.tiles():
            west, _, east, _ = to_lonlat.transform_bounds(*tile.bounds)
            assert (east <= 6.01) if zone.epsg == 32631 else (west >= 5.99)
    # the vectorised plan of one zone equals the per-tile reference
    strip = shapely_transform(Transformer.from_crs(4326, 32631, always_xy=True).transform,
                              box(5.9, 50.0, 6.0, 50.1).segmentize(0.01))
    x0, y0, x1, y1 = (v / 600 for v in strip.bounds)
    reference = [Tile(32631, c, r, 600.0) for r in range(math.ceil(y1) - 1, math.floor(y0) - 1, -1)
                 for c in range(math.floor(x0), math.ceil(x1))]
    expected = [t.id for t in reference if box(*t.bounds).intersection(strip).area > 0]
    assert [t.id for t in zones[0].tiles()] == expected


def test_a_bbox_across_the_antimeridian():
    request = RegionRequest.build(bbox=(179.9, -17.0, -179.9, -16.9), start="2021-01-01",
                                  end="2021-01-31")
    assert request.crosses_antimeridian and request.search_region == request.geometry
    zones = plan_zones(request.geometry, 600.0)
    assert [z.epsg for z in zones] == [32701, 32760]
    assert 200 < sum(z.area_km2 for z in zones) < 260       # 0.2 x 0.1 degrees near 17 S


PEAK_OF_CLI = """import atexit, runpy, sys
atexit.register(lambda: sys.stderr.write(next(
    line for line in open("/proc/self/status") if line.startswith("VmHWM"))))
sys.argv = ["anysat", *sys.argv[1:]]
runpy.run_module("anysat.cli", run_name="__main__")
"""


def test_plan_estimate_for_europe_is_quick_and_small():
    """Europe at 2,560 m (40 m patches: a tile is a whole number of them): about 1.6 M tiles
    over 7 zones, without a Python object per tile."""
    # the child's own peak (VmHWM), not RUSAGE_CHILDREN: a child's ru_maxrss counts the
    # pages of this process it was started from (2.4 GB, and a failure, in one CI run)
    result = subprocess.run([sys.executable, "-c", PEAK_OF_CLI, "plan", "--estimate", "--bbox",
                             "-10,35,30,70", "--tile-size-m", "2560", "--patch-size-m", "40"],
                            capture_output=True, text=True, check=True)
    peak_mb = int(result.stderr.rsplit("VmHWM:", 1)[1].split()[0]) / 1024
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [z["zone"] for z in lines[:-1]] == [f"EPSG:326{n}" for n in range(29, 36)]
    total = lines[-1]
    assert total["zones"] == 7 and 1.5e6 < total["tiles"] < 1.7e6 and total["device_hours"] > 0
    assert peak_mb < 2048, peak_mb


def test_a_very_large_run_is_warned_about_and_an_absurd_one_refused(caplog, monkeypatch):
    import logging

    from anysat.errors import RequestError
    from anysat.plan import check_run_size
    from anysat.request import RegionRequest

    belgium = RegionRequest.build(bbox=(2.5, 49.5, 6.4, 51.5), start="2021-01-01", end="2021-01-02")
    with caplog.at_level(logging.WARNING, logger="anysat"):
        check_run_size(belgium)                      # about 61,500 km2: 171,000 tiles of 600 m
    assert "a large run: about 170,9" in caplog.text and "61,5" in caplog.text
    monkeypatch.setenv("ANYSAT_MAX_TILES", "100000")
    with pytest.raises(RequestError, match="about 170,9.* tiles of 600 m, over the 100,000 one plan holds"):
        check_run_size(belgium)
