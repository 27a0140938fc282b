"""Tiles read as one block give the same batches as each tile read alone."""

import datetime as dt
import gc
import logging
import tracemalloc

import numpy as np
import pytest
import torch
from shapely.geometry import box

from anysat.cube.batch import load_block_batches, load_items_batch, tensor_shapes
from anysat.errors import TileReadError
from anysat.modalities import available_specs
from anysat.stac import resolve_provider, search_items
from anysat.tiles import Tile, plan_tiles, square_groups, square_order
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


def test_a_tile_read_in_its_square_gets_the_same_values_whatever_is_read_with_it(items):
    """What a resumed run relies on: a tile's values (the warped DEM's too) do not depend on
    which of its square's tiles are read with it."""
    tiles = plan_tiles(box(*DEMO_BBOX), 250)
    extent = (min(t.col for t in tiles), max(t.row for t in tiles), 10**6, -10**6)
    (group, square), *_ = square_groups(tiles, [extent] * len(tiles), 8)
    assert len(group) >= 16
    full = load_block_batches([items] * len(group), SENSORS, group, area=square, naming="demo")
    alone = load_block_batches([items], SENSORS, group[-1:], area=square, naming="demo")
    for key, value in full[-1][0].items():
        torch.testing.assert_close(alone[0][0][key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    # the tile's own box would give other DEM values: what a fixed square guards against
    own_box = load_block_batches([items], SENSORS, group[-1:], naming="demo")
    assert not torch.equal(own_box[0][0]["copernicus-dem"].nan_to_num(),
                           full[-1][0]["copernicus-dem"].nan_to_num())


def test_square_groups_and_reading_order():
    cells = [Tile(32631, c, r, 600.0) for r in range(9, 1, -1) for c in range(3, 11)]  # 8 x 8
    order = square_order(np.array([t.col for t in cells]), np.array([t.row for t in cells]),
                         (3, 9), 16)
    ordered = [cells[i] for i in order]
    # every run of 16 is a 4 x 4 square, every run of 4 a 2 x 2 one
    for start in range(0, 64, 16):
        run = ordered[start:start + 16]
        assert len({t.col for t in run}) == 4 and len({t.row for t in run}) == 4
    assert {(t.col, t.row) for t in ordered[:4]} == {(3, 9), (4, 9), (3, 8), (4, 8)}
    groups = square_groups(ordered[:20], [(3, 9, 10, 2)] * 20, 4)
    assert [len(g) for g, _ in groups] == [16, 4]
    (nw, se) = groups[1][1]
    assert (nw.col, nw.row, se.col, se.row) == (7, 9, 10, 6)
    # a square is cut to its extent (no land read outside a search block's tiles)
    (_, (nw, se)), = square_groups(ordered[:1], [(3, 9, 4, 7)], 4)
    assert (nw.col, nw.row, se.col, se.row) == (3, 9, 4, 7)
    # a square never mixes zones, nor tiles of two extents (search blocks)
    mixed = [Tile(32631, 3, 9, 600.0), Tile(32632, 3, 9, 600.0), Tile(32631, 4, 9, 600.0)]
    extents = [(3, 9, 10, 2), (3, 9, 10, 2), (4, 9, 10, 2)]
    assert [len(g) for g, _ in square_groups(mixed, extents, 4)] == [1, 1, 1]


def test_block_readers_from_the_environment(monkeypatch):
    from anysat.errors import RequestError
    from anysat.readers import block_readers, reader_pool

    monkeypatch.setenv("ANYSAT_BLOCK_READERS", "3")
    assert block_readers() == 3
    monkeypatch.delenv("ANYSAT_BLOCK_READERS")
    assert 1 <= block_readers() <= 8
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("ANYSAT_BLOCK_READERS", bad)
        with pytest.raises(RequestError, match="ANYSAT_BLOCK_READERS"):
            block_readers()
    monkeypatch.delenv("ANYSAT_READER_POOL", raising=False)
    assert reader_pool() == "processes"
    monkeypatch.setenv("ANYSAT_READER_POOL", "threads")
    assert reader_pool() == "threads"
    monkeypatch.setenv("ANYSAT_READER_POOL", "fork")
    with pytest.raises(RequestError, match="ANYSAT_READER_POOL='fork': give one of processes, threads"):
        reader_pool()


def test_a_packed_square_comes_back_whole_and_aligned():
    """Reader processes hand a square back as one buffer: every tensor, of any dtype and
    shape, comes back equal, and a failed tile as it was."""
    import pickle

    from anysat.readers import ALIGN, _pack, _unpack

    tiles = [Tile(32631, 3, 9, 600.0), Tile(32631, 4, 9, 600.0), Tile(32631, 5, 9, 600.0)]
    batch = {"s2": torch.randn(1, 3, 9, 5, 5), "s2_mask": torch.rand(1, 3, 5, 5) > 0.5,
             "s2_dates": torch.tensor([[1.0, 40.0, 71.0]]), "dem": torch.randn(1, 1, 1, 3, 3)[..., ::2, ::2]}
    failed = {"tile": tiles[1].id, "failed": "tile 32631_600m_4_9: no data", "area_km2": 0.36}
    loaded = [(tiles[0], batch, {"s2": ["2021-01"]}, 0.5), failed,
              (tiles[2], {k: v * 2 if v.is_floating_point() else ~v for k, v in batch.items()},
               {}, 0.25)]
    buffer, layout = pickle.loads(pickle.dumps(_pack(list(loaded))))  # it lets go of the tiles
    assert buffer.dtype == torch.uint8 and buffer.dim() == 1
    back = _unpack(buffer, layout)
    assert back[1] == failed
    for (tile, got, dates, seconds), (tile0, want, dates0, seconds0) in zip(back[::2], loaded[::2]):
        assert (tile, dates, seconds) == (tile0, dates0, seconds0)
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key].dtype == value.dtype and got[key].shape == value.shape
            assert got[key].data_ptr() % ALIGN == buffer.data_ptr() % ALIGN
            torch.testing.assert_close(got[key], value, rtol=0, atol=0)


def test_reader_processes_yield_the_cpu_to_the_run():
    """Readers run at a lower priority than the run's process, whose thread drives the device."""
    import os

    import psutil

    from anysat import readers

    readers.start_readers(1)
    [pid] = list(readers._pools[1]._processes)
    assert readers.READER_NICE > 0
    assert psutil.Process(pid).nice() == min(19, os.nice(0) + readers.READER_NICE)


def test_writer_threads_from_the_environment(monkeypatch):
    from anysat.errors import RequestError
    from anysat.pipeline import WRITE_THREADS, write_threads

    monkeypatch.delenv("ANYSAT_WRITE_THREADS", raising=False)
    assert write_threads("/data/run") == WRITE_THREADS["local"]
    assert write_threads("s3://bucket/run") == WRITE_THREADS["object store"] > WRITE_THREADS["local"]
    monkeypatch.setenv("ANYSAT_WRITE_THREADS", "2")
    assert write_threads("s3://bucket/run") == 2
    for bad in ("0", "many", "-4"):
        monkeypatch.setenv("ANYSAT_WRITE_THREADS", bad)
        with pytest.raises(RequestError, match="ANYSAT_WRITE_THREADS"):
            write_threads("s3://bucket/run")


def test_a_block_holds_its_pixels_as_stored_until_its_tiles_are_batched(items):
    """A square read in turn with the model stays in memory while its tiles' forwards run:
    Sentinel-2's uint16 digital numbers are kept, not float32 reflectances (nor a mask the
    block's size), and each tile is made physical when it is batched."""
    tiles = plan_tiles(box(*DEMO_BBOX), 250)[:16]
    gc.collect()
    tracemalloc.start()
    try:
        block = load_block_batches([items] * len(tiles), SENSORS, tiles, naming="demo")
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    shapes = [tensor_shapes(batch) for batch, _ in block]  # what a reader packs by
    physical = sum(value.nbytes for batch, _ in block for value in dict(batch).values())
    assert shapes == [tensor_shapes(dict(batch)) for batch, _ in block]
    # as stored: 0.70 here (S2 uint16, S1 float32, and what a read keeps besides); float32: 1.19
    assert held < 0.85 * physical, (held, physical)
    assert_same_batch(block[5], load_items_batch(items, SENSORS, tiles[5], naming="demo"))
