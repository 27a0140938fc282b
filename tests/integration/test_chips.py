"""Training chips: all sensors of a footprint with dates and masks, one object per chip, on S3."""

import datetime as dt
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

from anysat import storage
from anysat.cube.batch import load_tile_batch
from anysat.modalities import available_specs
from anysat.stac import resolve_provider
from anysat.tiles import Tile
from anysat.train.chips import (CHIP_SUFFIX, ChipStoreError, chip_record, chip_uri, list_chips,
                                read_chip, read_chips, read_index, rebuild_index, write_chip)
from anysat.train.ingest import write_chips
from anysat.train.pretrain import ChipSampler
from tests.conftest import CENTRAL_TILE, slow_s3_server

pytestmark = pytest.mark.integration
SPECS = [available_specs()[n] for n in ("sentinel-2-l2a", "sentinel-1", "copernicus-dem")]
START, END = dt.date(2020, 11, 1), dt.date(2021, 10, 31)


@pytest.fixture(scope="module")
def demo_batch():
    batch, _ = load_tile_batch(resolve_provider("demo"), SPECS, Tile(*CENTRAL_TILE), START, END)
    return batch


class _Requests(logging.Handler):
    """The S3 requests the loopback server answers (its werkzeug access log), by method."""

    def __init__(self):
        super().__init__()
        self.methods: list[str] = []
        self.gets: list[str] = []     # the status of each GET: 200 whole, 206 a byte range

    def emit(self, record):
        message = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())   # werkzeug's colours
        _, request, status = message.split('"')[:3]
        method = request.split()[0]
        self.methods.append(method)
        if method == "GET":
            self.gets.append(status.split()[0])

    def __enter__(self):
        log = logging.getLogger("werkzeug")
        self.saved_level = log.level
        log.setLevel(logging.INFO)
        log.addHandler(self)
        return self

    def __exit__(self, *exc):
        log = logging.getLogger("werkzeug")
        log.removeHandler(self)
        log.setLevel(self.saved_level)


def test_chips_on_s3_round_trip_in_one_request_and_feed_the_sampler(s3_endpoint, demo_batch):
    store = "s3://anysat/chips/demo.zarr"
    tile = Tile(*CENTRAL_TILE)
    assert write_chips(resolve_provider("demo"), SPECS, [tile], START, END, store) == [tile.id]
    assert list_chips(store) == [tile.id]
    fs, path = storage.filesystem(store)
    assert fs.exists(f"{path}/{tile.id}{CHIP_SUFFIX}")   # the whole chip is one object
    with _Requests() as requests:
        chip = read_chip(store, tile.id)
    assert requests.methods.count("GET") == 1, requests.methods
    assert set(chip) == set(demo_batch)
    for key, tensor in demo_batch.items():
        assert chip[key].dtype == tensor.dtype
        np.testing.assert_array_equal(chip[key].numpy(), tensor.numpy())
    assert chip["sentinel-2-l2a_mask"].dtype == torch.bool and not chip["sentinel-2-l2a_mask"][0, 1].any()
    assert read_index(store).id.tolist() == [tile.id]
    # What an ingest rerun asks of each chip: its header alone, a ranged read (206).
    with _Requests() as requests:
        row = chip_record(store, tile.id)
    assert requests.gets == ["206"], requests.gets
    assert row == read_index(store).iloc[0].to_dict() | {"bounds": row["bounds"], "sensors": row["sensors"]}
    # A rerun keeps complete chips.
    assert write_chips(resolve_provider("demo"), SPECS, [tile], START, END, store) == []
    sampler = ChipSampler(chip, {s.name: s.gsd_m for s in SPECS}, chip_m=300.0, step_m=30.0)
    sample = sampler.sample(2)
    assert sample["sentinel-2-l2a"].shape == (2, 12, 9, 30, 30)
    assert sample["sentinel-2-l2a_mask"].shape == (2, 12, 30, 30)


def test_a_batch_of_chips_is_fetched_in_one_call_in_order(s3_endpoint, demo_batch):
    store = "s3://anysat/chips/batch.zarr"
    tiles = [Tile(*CENTRAL_TILE), Tile(CENTRAL_TILE[0], CENTRAL_TILE[1] + 1, CENTRAL_TILE[2], 600.0)]
    shifted = {k: v + 1 if v.is_floating_point() else v for k, v in demo_batch.items()}
    for tile, batch in zip(tiles, [demo_batch, shifted]):
        write_chip(store, tile, batch, SPECS)
    ids = [tiles[1].id, tiles[0].id, tiles[1].id]   # a batch spanning epochs draws a chip twice
    with _Requests() as requests:
        chips = read_chips(store, ids)
    assert requests.methods.count("GET") == 2, requests.methods
    for chip, expected in zip(chips, [shifted, demo_batch, shifted]):
        np.testing.assert_array_equal(chip["sentinel-2-l2a"].numpy(), expected["sentinel-2-l2a"].numpy())
    with pytest.raises(FileNotFoundError, match="no chip absent"):
        read_chips(store, [tiles[0].id, "absent"])


def test_a_store_whose_path_looks_like_a_pattern_is_read_as_it_is(tmp_path, demo_batch):
    store, tile = str(tmp_path / "run[1]" / "chips.zarr"), Tile(*CENTRAL_TILE)
    write_chip(store, tile, demo_batch, SPECS)
    chip, = read_chips(store, [tile.id])
    np.testing.assert_array_equal(chip["sentinel-1"].numpy(), demo_batch["sentinel-1"].numpy())
    assert storage.read_many([chip_uri(store, "absent"), chip_uri(store, tile.id)])[0] is None


@pytest.fixture
def slow_s3(s3_endpoint):
    """Chip GETs answered after 100 ms (`slow_s3_server`)."""
    yield from slow_s3_server("GET", re.escape(CHIP_SUFFIX) + "$")


def test_a_batch_of_chips_goes_out_at_once_not_ten_at_a_time(slow_s3, demo_batch):
    """s3fs's default pool holds 10 connections: a batch of chips would wait 100 ms per 10."""
    endpoint, slow = slow_s3
    store = "s3://anysat/chips/slow.zarr"
    ids = []
    for i in range(32):
        tile = Tile(CENTRAL_TILE[0], CENTRAL_TILE[1] + i, CENTRAL_TILE[2], 600.0)
        write_chip(store, tile, demo_batch, SPECS)
        ids.append(tile.id)
    # read by another process, whose S3 client points at the slow server
    code = f"from anysat.train.chips import read_chips; print(len(read_chips({store!r}, {ids!r})))"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "AWS_ENDPOINT_URL": endpoint},
                          capture_output=True, text=True, check=True)
    assert done.stdout.split()[-1] == "32" and slow.most > 10, (slow.most, done.stderr[-2000:])


def test_a_chip_being_written_is_not_listed_and_a_damaged_one_is_rewritten(tmp_path, demo_batch):
    store, tile = str(tmp_path / "chips.zarr"), Tile(*CENTRAL_TILE)
    write_chip(store, tile, demo_batch, SPECS)
    whole = (tmp_path / "chips.zarr" / f"{tile.id}{CHIP_SUFFIX}").read_bytes()
    # A writer killed midway leaves only its temporary file: no chip.
    (tmp_path / "chips.zarr" / f"{tile.id}{CHIP_SUFFIX}").rename(
        tmp_path / "chips.zarr" / f"{tile.id}{CHIP_SUFFIX}.tmp-0123")
    assert list_chips(store) == []
    with pytest.raises(FileNotFoundError, match=f"no chip {tile.id}"):
        read_chip(store, tile.id)
    # A damaged object (cut short by a copy tool) is named, and the next ingest rewrites it.
    with open(chip_uri(store, tile.id), "wb") as f:
        f.write(whole[: len(whole) // 2])
    with pytest.raises(ChipStoreError, match=f"chip {tile.id} in .* is damaged"):
        read_chip(store, tile.id)
    assert write_chips(resolve_provider("demo"), SPECS, [tile], START, END, store) == [tile.id]
    assert list_chips(store) == [tile.id]
    assert torch.equal(read_chip(store, tile.id)["sentinel-1_mask"], demo_batch["sentinel-1_mask"])


def _write_zarr_chip(store: str, tile: Tile, batch: dict, complete: bool) -> None:
    """A chip in the layout stores had before one object per chip (a Zarr group)."""
    group = zarr.open_group(store, mode="a", zarr_format=3).create_group(tile.id)
    names = [s.name for s in SPECS]
    group.attrs.update({"tile": tile.id, "epsg": tile.epsg, "bounds": list(tile.bounds),
                        "size_m": tile.size_m, "sensors": names, "complete": complete})
    for name in names:
        sensor = group.create_group(name)
        sensor.create_array("pixels", data=batch[name][0].numpy())
        sensor.create_array("mask", data=batch[f"{name}_mask"][0].numpy())
        sensor.create_array("dates", data=batch[f"{name}_dates"][0].numpy().astype("int32"))


def test_stores_of_the_earlier_zarr_layout_are_still_read_and_indexed(tmp_path, demo_batch):
    store = str(tmp_path / "old.zarr")
    done, dying = Tile(*CENTRAL_TILE), Tile(CENTRAL_TILE[0], CENTRAL_TILE[1] + 1, CENTRAL_TILE[2], 600.0)
    _write_zarr_chip(store, done, demo_batch, complete=True)
    _write_zarr_chip(store, dying, demo_batch, complete=False)
    assert list_chips(store) == [done.id]
    chip = read_chip(store, done.id)
    for key, tensor in demo_batch.items():
        np.testing.assert_array_equal(chip[key].numpy(), tensor.numpy())
    with pytest.raises(FileNotFoundError, match="incomplete"):
        read_chip(store, dying.id)
    index = rebuild_index(store)
    assert index.id.tolist() == [done.id] and list(index.sensors[0]) == [s.name for s in SPECS]
