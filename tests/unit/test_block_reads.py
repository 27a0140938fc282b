"""Tiles read as one block give the same batches as each tile read alone."""

import datetime as dt
import logging

import pytest
import torch
from shapely.geometry import box

from anysat.cube.batch import load_block_batches, load_items_batch
from anysat.errors import TileReadError
from anysat.modalities import available_specs
from anysat.stac import resolve_provider, search_items
from anysat.tiles import Tile, compact_groups, plan_tiles
from tests.conftest import DEMO_BBOX

SPECS = available_specs()
SENSORS = [SPECS[n] for n in ("sentinel-2-l2a", "sentinel-1", "copernicus-dem")]
START, END = dt.date(2020, 11, 1), dt.date(2021, 10, 31)


@pytest.fixture(scope="module")
def items():
    provider = resolve_provider("demo")
    return {s.name: search_items(provider, s, DEMO_BBOX, START, END) for s in SENSORS}


def assert_same_batch(block, alone):
    """Equal; the DEM (10 m pixels warped to 30 m) to GDAL's warp approximation: its output
    depends a little on the window warped (0.125 source pixels, at most 0.2 m here)."""
    assert block[1] == alone[1]  # dates per sensor
    assert block[0].keys() == alone[0].keys()
    for key, value in alone[0].items():
        atol = 0.2 if key == "copernicus-dem" else 0
        torch.testing.assert_close(block[0][key], value, rtol=0, atol=atol, equal_nan=True,
                                   msg=key)


@pytest.mark.parametrize("time_bin", [None, "QS-DEC"])
def test_a_block_reads_what_each_tile_reads_alone(items, caplog, time_bin):
    # 250 m tiles: the DEM's 30 m pixels do not divide them, so its grid is snapped per tile
    tiles = plan_tiles(box(*DEMO_BBOX), 250)[:6]
    per_tile = [dict(items) for _ in tiles]
    per_tile[1]["sentinel-2-l2a"] = items["sentinel-2-l2a"][2:7]  # fewer dates than the block
    del per_tile[2]["sentinel-1"]                                 # a sensor the others have
    with caplog.at_level(logging.INFO, logger="anysat"):
        block = load_block_batches(per_tile, SENSORS, tiles, naming="demo", threads=2,
                                   time_bin=time_bin)
    assert "tile by tile" not in caplog.text  # read as one block, not the fallback
    for got, own, tile in zip(block, per_tile, tiles):
        assert_same_batch(got, load_items_batch(own, SENSORS, tile, naming="demo",
                                                time_bin=time_bin))
    assert block[1][1]["sentinel-2-l2a"] == (2 if time_bin else 5)
    assert "sentinel-1" not in block[2][0] and block[3][0]["sentinel-1"].shape[-2:] == (25, 25)


def test_a_tile_whose_data_fail_fails_alone_and_its_block_is_read(items, tmp_path):
    tiles = plan_tiles(box(*DEMO_BBOX), 250)[:4]
    broken = items["sentinel-2-l2a"][0].clone()
    broken.id += "-cut"
    next(iter(broken.assets.values())).href = str(tmp_path / "gone.tif")
    per_tile = [dict(items) for _ in tiles]
    per_tile[2]["sentinel-2-l2a"] = [broken, *items["sentinel-2-l2a"][1:]]
    block = load_block_batches(per_tile, SENSORS, tiles, naming="demo", threads=2)
    assert isinstance(block[2], TileReadError) and tiles[2].id in str(block[2])
    assert "gone.tif" in str(block[2])
    for i in (0, 1, 3):
        assert_same_batch(block[i], load_items_batch(per_tile[i], SENSORS, tiles[i], naming="demo"))


def test_compact_groups_never_span_far_outside_their_tiles():
    row = [Tile(32631, c, 9, 600.0) for c in range(10, 14)]
    wrapped = row + [Tile(32631, c, 8, 600.0) for c in range(0, 4)]  # the next grid row
    assert [len(g) for g in compact_groups(wrapped, 16)] == [4, 4]
    square = [Tile(32631, c, r, 600.0) for r in (9, 8) for c in range(10, 14)]
    assert [len(g) for g in compact_groups(square, 16)] == [8]
    assert [len(g) for g in compact_groups(square, 3)] == [3, 1, 3, 1]
    zones = row[:2] + [Tile(32632, 0, 9, 600.0)]
    assert [[t.epsg for t in g] for g in compact_groups(zones, 16)] == [[32631, 32631], [32632]]
