import datetime as dt

import pytest
import torch
from shapely.geometry import box

from anysat.cube import load_cube, read_cube
from anysat.errors import CheckpointError, ModelInputError
from anysat.modalities import resolve_sensors
from anysat.model import build_model, load_model, save_checkpoint
from anysat.stac import resolve_provider, search_items
from anysat.tiles import Tile
from tests.conftest import CENTRAL_TILE, DEMO_BBOX

SPECS = resolve_sensors(["s2", "s1", "dem"])


@pytest.fixture(scope="module")
def batch():
    """The central demo tile (600 m): S2 12 x 9 x 60 x 60, S1 12 x 2 x 60 x 60, DEM 1 x 1 x 20 x 20."""
    tile, provider, out = Tile(*CENTRAL_TILE), resolve_provider("demo"), {}
    for spec in SPECS:
        items = search_items(provider, spec, box(*DEMO_BBOX), dt.date(2020, 11, 1), dt.date(2021, 10, 31))
        cube = read_cube(load_cube(items, spec, tile.geobox(spec.gsd_m), naming="demo"))
        out[spec.name] = torch.from_numpy(cube.values)[None]
        out[f"{spec.name}_dates"] = torch.from_numpy(
            cube.time.values.astype("datetime64[D]").astype("int64").astype("float32"))[None]
    return out


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", SPECS, seed=0)


def only(batch, *names):
    return {k: v for k, v in batch.items() if k.split("_")[0] in names}


@pytest.mark.parametrize("patch_size_m,sensors", [
    (10, ("sentinel-2-l2a", "sentinel-1")), (20, ("sentinel-2-l2a", "sentinel-1")),
    (30, ("sentinel-2-l2a", "sentinel-1", "copernicus-dem")), (60, ("copernicus-dem",)),
])
@torch.inference_mode()
def test_output_shapes(model, batch, patch_size_m, sensors):
    b = only(batch, *sensors)
    grid = 600 // patch_size_m
    assert model(b, patch_size_m, "tile").shape == (1, 256)
    patch = model(b, patch_size_m, "patch")
    assert patch.shape == (1, grid, grid, 256) and torch.isfinite(patch).all()
    finest = 30 if sensors == ("copernicus-dem",) else 10
    assert model(b, patch_size_m, "dense").shape == (1, 600 // finest, 600 // finest, 512)


@torch.inference_mode()
def test_cloudy_dates_are_masked_not_averaged_in(model, batch):
    """Dec and Jan are all-nodata (NaN) for S2: whatever their values, outputs do not change."""
    s2 = batch["sentinel-2-l2a"]
    mask = torch.isfinite(s2).all(dim=2)
    assert not mask[0, 1].any() and mask[0, 0].all()
    garbage = s2.clone()
    garbage[:, 1:3] = 1e6
    a = model({**batch, "sentinel-2-l2a_mask": mask}, 30, "patch")
    b = model({**batch, "sentinel-2-l2a": garbage, "sentinel-2-l2a_mask": mask}, 30, "patch")
    torch.testing.assert_close(a, b)
    # but a valid date does count
    c = model({**batch, "sentinel-2-l2a_mask": mask & (torch.arange(12) != 6)[None, :, None, None]}, 30, "patch")
    assert not torch.allclose(a, c)


@torch.inference_mode()
def test_patch_validity_follows_nodata(model, batch):
    b = only(batch, "sentinel-2-l2a")
    b["sentinel-2-l2a"] = b["sentinel-2-l2a"].clone()
    b["sentinel-2-l2a"][..., :30, :] = float("nan")   # northern half: no data at any date
    valid = model.patch_validity(b, 30)[0]
    assert not valid[:10].any() and valid[10:].all()     # 30 px = 10 patches of 30 m


def test_clear_errors(model, batch):
    with pytest.raises(ModelInputError, match="not a multiple of copernicus-dem's GSD 30"):
        model(batch, 20)
    with pytest.raises(ModelInputError, match="model has no sensor"):
        model({**batch, "landsat": batch["sentinel-1"]}, 30)
    small = {**batch, "sentinel-1": batch["sentinel-1"][..., :30, :30]}
    with pytest.raises(ModelInputError, match="different footprints"):
        model(small, 30)
    bad = batch["sentinel-1"].clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ModelInputError, match="NaN values in pixels marked valid"):
        model({**batch, "sentinel-1": bad, "sentinel-1_mask": torch.ones(1, 12, 60, 60, dtype=torch.bool)}, 30)
    with pytest.raises(ModelInputError, match="output must be"):
        model(batch, 30, "pixels")


@torch.inference_mode()
def test_checkpoint_round_trip_is_bit_exact(model, batch, tmp_path):
    save_checkpoint(model, str(tmp_path / "ckpt"), provenance={"note": "test"})
    loaded = load_model(str(tmp_path / "ckpt"))
    assert torch.equal(model(batch, 30, "patch"), loaded(batch, 30, "patch"))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(CheckpointError, match="do not match the sha256"):
        load_model(str(tmp_path / "ckpt"))
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_model(str(tmp_path / "missing"))


def test_seeded_builds_are_identical():
    a, b = build_model("tiny", SPECS, seed=3), build_model("tiny", SPECS, seed=3)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
