"""Training chips: all sensors of a footprint with dates and masks, in sharded Zarr, on S3."""

import datetime as dt

import numpy as np
import pytest
import torch
import zarr

from anysat.modalities import available_specs
from anysat.cube.batch import load_tile_batch
from anysat.stac import resolve_provider
from anysat.tiles import Tile
from anysat.train.chips import list_chips, read_chip, write_chip
from anysat.train.ingest import write_chips
from anysat.train.pretrain import ChipSampler
from tests.conftest import CENTRAL_TILE

pytestmark = pytest.mark.integration
SPECS = [available_specs()[n] for n in ("sentinel-2-l2a", "sentinel-1", "copernicus-dem")]
START, END = dt.date(2020, 11, 1), dt.date(2021, 10, 31)


def test_chips_on_s3_round_trip_and_feed_the_sampler(s3_endpoint):
    store = "s3://anysat/chips/demo.zarr"
    tile = Tile(*CENTRAL_TILE)
    assert write_chips(resolve_provider("demo"), SPECS, [tile], START, END, store) == [tile.id]
    assert list_chips(store) == [tile.id]
    chip = read_chip(store, tile.id)
    batch, _ = load_tile_batch(resolve_provider("demo"), SPECS, tile, START, END)
    assert set(chip) == set(batch)
    for key, tensor in batch.items():
        np.testing.assert_array_equal(chip[key].numpy(), tensor.numpy())
    assert chip["sentinel-2-l2a_mask"].dtype == torch.bool and not chip["sentinel-2-l2a_mask"][0, 1].any()
    pixels = zarr.open_group(f"{store}/{tile.id}/sentinel-2-l2a", mode="r")["pixels"]
    assert pixels.shards == (12, 9, 60, 60) and pixels.chunks == (1, 9, 60, 60)
    # A rerun keeps complete chips.
    assert write_chips(resolve_provider("demo"), SPECS, [tile], START, END, store) == []
    sampler = ChipSampler(chip, {s.name: s.gsd_m for s in SPECS}, chip_m=300.0, step_m=30.0)
    sample = sampler.sample(2)
    assert sample["sentinel-2-l2a"].shape == (2, 12, 9, 30, 30)
    assert sample["sentinel-2-l2a_mask"].shape == (2, 12, 30, 30)


def test_an_interrupted_chip_is_not_listed_and_is_rewritten(tmp_path):
    store, tile = str(tmp_path / "chips.zarr"), Tile(*CENTRAL_TILE)
    batch, _ = load_tile_batch(resolve_provider("demo"), SPECS, tile, START, END)
    write_chip(store, tile, batch, SPECS)
    zarr.open_group(f"{store}/{tile.id}", mode="r+").attrs["complete"] = False  # died midway
    assert list_chips(store) == []
    with pytest.raises(FileNotFoundError, match="incomplete"):
        read_chip(store, tile.id)
    assert write_chips(resolve_provider("demo"), SPECS, [tile], START, END, store) == [tile.id]
    assert list_chips(store) == [tile.id]
