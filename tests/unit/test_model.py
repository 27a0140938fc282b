import dataclasses
import datetime as dt

import pytest
import torch
from shapely.geometry import box

from anysat.cube import load_cube, read_cube
from anysat.errors import CheckpointError, ModelInputError
from anysat.modalities import resolve_sensors
from anysat.model import AnySat, AnySatConfig, build_model, load_model, save_checkpoint
from anysat.model.layers import (CACHED_CODE_ELEMENTS, code_cache, patch_centres_m, patch_codes_m,
                                 sincos_2d_m)
from anysat.model.subpatch import subpatch_codes_m, subpatch_offsets_m
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
    with pytest.raises(ModelInputError, match="NaN values in pixels its mask marks valid"):
        model({**batch, "sentinel-1": bad, "sentinel-1_mask": torch.ones(1, 12, 60, 60, dtype=torch.bool)}, 30)
    with pytest.raises(ModelInputError, match="output must be"):
        model(batch, 30, "pixels")
    dates = batch["sentinel-1_dates"].clone()
    dates[0, 3] = float("nan")
    with pytest.raises(ModelInputError, match="sentinel-1: 'sentinel-1_dates' holds NaN"):
        model({**batch, "sentinel-1_dates": dates}, 30)
    with pytest.raises(ModelInputError, match="not a square multiple of the 90 m patch"):
        model(batch, 90)


@torch.inference_mode()
def test_checkpoint_round_trip_is_bit_exact(model, batch, tmp_path):
    save_checkpoint(model, str(tmp_path / "ckpt"), provenance={"note": "test"})
    loaded = load_model(str(tmp_path / "ckpt"))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert loaded.config == model.config
    # outputs: equal up to BLAS kernel choice between two instances (last-bit differences)
    torch.testing.assert_close(model(batch, 30, "patch"), loaded(batch, 30, "patch"),
                               rtol=1e-5, atol=1e-5)
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(CheckpointError, match="do not match the sha256"):
        load_model(str(tmp_path / "ckpt"))
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_model(str(tmp_path / "missing"))


@torch.inference_mode()
def test_seeded_builds_are_identical_and_deterministic(batch):
    a, b = build_model("tiny", SPECS, seed=3), build_model("tiny", SPECS, seed=3)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert torch.equal(a(batch, 30, "patch"), a(batch, 30, "patch"))   # one instance: bit-exact
    torch.testing.assert_close(a(batch, 30, "patch"), b(batch, 30, "patch"), rtol=1e-5, atol=1e-5)
    c = build_model("tiny", SPECS, seed=4)
    assert not torch.equal(a(batch, 30, "tile"), c(batch, 30, "tile"))


def test_position_codes_are_made_once_and_serve_inference_and_training(batch):
    """The patch and sub-patch codes are cached per layout: equal to computing them anew,
    and one first made under inference_mode still trains (no inference tensor in autograd)."""
    code_cache.cache_clear()
    model = build_model("tiny", SPECS, seed=5)
    side = {s.name: round(120 / s.gsd_m) for s in SPECS}  # a 120 m crop: a small backward
    batch = {k: v if k.endswith("_dates") else v[..., :side[k], :side[k]] for k, v in batch.items()}
    with torch.inference_mode():
        before = model(batch, 30, "patch")
    cpu = torch.device("cpu")
    assert not patch_codes_m(4, 30.0, 256, 10.0, cpu).is_inference()
    assert not subpatch_codes_m(30.0, 10.0, 256, cpu).is_inference()
    assert torch.equal(patch_codes_m(4, 30.0, 256, 10.0, cpu),
                       sincos_2d_m(*patch_centres_m(4, 30.0), 256, 10.0))
    assert torch.equal(subpatch_codes_m(30.0, 10.0, 256, cpu),
                       sincos_2d_m(*subpatch_offsets_m(30.0, 10.0), 256, 1.0))
    out = model(batch, 30, "patch")  # with autograd, from the codes made above
    out.square().mean().backward()
    assert code_cache.cache_info().hits >= 2 and code_cache.cache_info().currsize >= 2
    assert all(p.grad is not None for p in model.blocks.parameters())
    torch.testing.assert_close(out.detach(), before, rtol=1e-5, atol=1e-5)
    # a wide tile's codes are made anew, not kept (a cache of them would hold GBs)
    kept = code_cache.cache_info().currsize
    wide = patch_codes_m(300, 10.0, 256, 10.0, cpu)
    assert 300 * 300 * 256 > CACHED_CODE_ELEMENTS and code_cache.cache_info().currsize == kept
    assert torch.equal(wide, sincos_2d_m(*patch_centres_m(300, 10.0), 256, 10.0))


@torch.inference_mode()
def test_shuffling_dates_with_their_timestamps_changes_nothing(model, batch):
    order = torch.tensor([5, 0, 11, 3, 7, 1, 9, 2, 10, 4, 8, 6])
    shuffled = dict(batch)
    for name in ("sentinel-2-l2a", "sentinel-1"):
        shuffled[name] = batch[name][:, order]
        shuffled[f"{name}_dates"] = batch[f"{name}_dates"][:, order]
    torch.testing.assert_close(model(batch, 30, "patch"), model(shuffled, 30, "patch"),
                               rtol=1e-4, atol=1e-4)
    # the dates are read: the same pixels at other dates give other embeddings
    moved = {**batch, "sentinel-2-l2a_dates": batch["sentinel-2-l2a_dates"] + 120}
    assert not torch.allclose(model(batch, 30, "patch"), model(moved, 30, "patch"), atol=1e-3)


@torch.inference_mode()
def test_the_accelerator_path_chunks_pixels_differently_with_the_same_tokens(model, batch):
    """On an accelerator the temporal projector takes a tile's 3,600 pixels in one chunk (few,
    large kernels) instead of 512-pixel chunks: the same embeddings."""
    from anysat.model.layers import sync_free
    from anysat.model.projectors import PIXELS_PER_CHUNK

    assert batch["sentinel-2-l2a"].shape[-1] ** 2 > 2 * PIXELS_PER_CHUNK   # several CPU chunks
    for output in ("patch", "dense"):
        cpu = model(batch, 30, output=output)
        with sync_free():
            torch.testing.assert_close(model(batch, 30, output=output), cpu, rtol=1e-5, atol=1e-5)


def test_on_an_accelerator_a_training_forward_takes_its_pixels_in_one_chunk(batch, monkeypatch):
    """Without autograd the accelerator path bounds a temporal chunk's bytes (shrunk here, so a
    240 m crop makes two chunks); with autograd the backward keeps every chunk's activations
    anyway, so it takes all pixels in one chunk (fewer kernels to launch), with the tokens and
    gradients of the CPU's 512-pixel chunks."""
    from anysat.model import projectors
    from anysat.model.layers import sync_free

    monkeypatch.setattr(projectors, "OTHER_ACCELERATOR_CHUNK_BYTES", 2**20)
    chunks, pool = [], projectors.TemporalProjector._pool
    monkeypatch.setattr(projectors.TemporalProjector, "_pool",
                        lambda self, z, *args: chunks.append(len(z)) or pool(self, z, *args))
    crop = {"sentinel-2-l2a": batch["sentinel-2-l2a"][..., :24, :24],
            "sentinel-2-l2a_dates": batch["sentinel-2-l2a_dates"]}
    model = build_model("tiny", SPECS, seed=0)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        out = model(crop, 30, "patch")
        out.square().mean().backward()
        return out.detach(), [p.grad for p in model.parameters() if p.grad is not None]

    def taken():
        try:
            return chunks.copy()
        finally:
            chunks.clear()

    cpu, cpu_grads = forward_backward()
    cpu_chunks = taken()
    with sync_free():
        out, grads = forward_backward()
        training_chunks = taken()
        with torch.no_grad():
            inference = model(crop, 30, "patch")
        inference_chunks = taken()
    assert cpu_chunks == [512, 64] and inference_chunks == [512, 64] and training_chunks == [576]
    torch.testing.assert_close(out, cpu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inference, cpu, rtol=1e-5, atol=1e-5)
    assert len(grads) == len(cpu_grads) > 10
    for a, b in zip(grads, cpu_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@torch.inference_mode()
def test_one_date_is_a_valid_time_series(model, batch):
    one = {k: v[:, 6:7] for k, v in only(batch, "sentinel-2-l2a").items()}
    out = model(one, 20, "patch")
    assert out.shape == (1, 30, 30, 256) and torch.isfinite(out).all()


def _metric_model():
    """S2 at 10 m and the same sensor at 20 m: one model, two GSDs."""
    s2 = next(m for m in AnySatConfig.from_size("tiny", SPECS).modalities if m.name == "sentinel-2-l2a")
    coarse = dataclasses.replace(s2, name="s2-20m", gsd_m=20.0)
    torch.manual_seed(0)
    return AnySat(AnySatConfig(modalities=(s2, coarse)))


@torch.inference_mode()
def test_metric_positions_same_footprint_at_two_gsds(batch):
    """600 m at 10 m (60 px) and at 20 m (30 px): the same 10 x 10 grid of 60 m patches with
    the same positions; only the number of sub-patches per patch differs (36 vs 9)."""
    model = _metric_model()
    fine = only(batch, "sentinel-2-l2a")
    x = fine["sentinel-2-l2a"]
    coarse = {"s2-20m": torch.nn.functional.avg_pool2d(x.flatten(0, 1), 2).view(1, 12, 9, 30, 30),
              "s2-20m_dates": fine["sentinel-2-l2a_dates"]}
    fine_layout, coarse_layout = model.check_batch(fine, 60), model.check_batch(coarse, 60)
    assert fine_layout.grid == coarse_layout.grid == 10
    pos_fine = model.positions(fine_layout, None, 1)
    pos_coarse = model.positions(coarse_layout, None, 1)
    assert torch.equal(pos_fine, pos_coarse)
    _, s_fine, *_ = model.forward_features(fine, 60, keep_subpatches=True)
    _, s_coarse, *_ = model.forward_features(coarse, 60, keep_subpatches=True)
    assert s_fine["sentinel-2-l2a"].subpatches.shape[2] == 36
    assert s_coarse["s2-20m"].subpatches.shape[2] == 9
    assert model(fine, 60, "patch").shape == model(coarse, 60, "patch").shape == (1, 10, 10, 256)
    assert model(coarse, 60, "dense").shape == (1, 30, 30, 512)
    with pytest.raises(ModelInputError, match="not a multiple of s2-20m's GSD 20"):
        model(coarse, 30)


@torch.inference_mode()
def test_aerial_pixel_blocks_are_subpatches(batch):
    """A 1 m aerial image read as 10 x 10 pixel blocks (10 m sub-patches) beside S2."""
    specs = resolve_sensors(["s2", "naip"])
    model = build_model("tiny", specs)
    g = torch.Generator().manual_seed(0)
    aerial = {"naip": 100 + 40 * torch.randn(1, 1, 4, 600, 600, generator=g),
              "naip_dates": torch.tensor([[18800.0]])}
    both = {**only(batch, "sentinel-2-l2a"), **aerial}
    assert model(both, 20, "patch").shape == (1, 30, 30, 256)
    assert model(aerial, 20, "dense").shape == (1, 60, 60, 512)   # 10 m sub-patches
    with pytest.raises(ModelInputError, match="not a multiple of naip's 10-pixel sub-patch 10 m"):
        model(aerial, 5)
    # nodata pixels of the image are masked: values there do not matter
    mask = torch.ones(1, 1, 600, 600, dtype=torch.bool)
    mask[..., :300, :] = False
    garbage = aerial["naip"].clone()
    garbage[..., :300, :] = 1e5
    torch.testing.assert_close(model({**aerial, "naip_mask": mask}, 20, "patch"),
                               model({**aerial, "naip": garbage, "naip_mask": mask}, 20, "patch"))
