from shapely.geometry import box

from anysat.tiles import Tile, plan_tiles, utm_epsg
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
