import tracemalloc

import numpy as np
import pytest
from PIL import Image

from anysat.products import LayerGrid, create_layer, maps, read_layer, write_tile
from anysat.errors import OutputNotWritableError
from anysat.tiles import Tile

TILES = [Tile(32631, 1106, 9353, 600.0), Tile(32631, 1107, 9353, 600.0), Tile(32631, 1107, 9352, 600.0)]


def test_layer_round_trip_with_georeference(tmp_path):
    uri = str(tmp_path / "layer.zarr")
    grid = LayerGrid.covering(TILES, patch_size_m=60, dim=8)
    create_layer(uri, grid, {"model": "test"})
    rng = np.random.default_rng(0)
    written = {t.id: rng.normal(size=(10, 10, 8)).astype("float32") for t in TILES[:2]}
    for tile in TILES[:2]:
        write_tile(uri, grid, tile, written[tile.id])
    ds = read_layer(uri)
    assert ds.embedding.dims == ("y", "x", "band") and ds.embedding.shape == (20, 20, 8)
    assert ds.embedding.encoding["chunks"] == (10, 10, 8)
    assert ds.rio.crs.to_epsg() == 32631
    assert tuple(ds.rio.transform())[:6] == (60.0, 0.0, 663600.0, 0.0, -60.0, 5612400.0)
    np.testing.assert_array_equal(ds.embedding[:10, :10].values, written[TILES[0].id])
    np.testing.assert_array_equal(ds.embedding[:10, 10:].values, written[TILES[1].id])
    assert np.isnan(ds.embedding[10:, :].values).all()   # tiles not written read as nodata
    assert float(ds.x[0]) == 663630.0 and float(ds.y[0]) == 5612370.0  # pixel centres


def test_existing_layer_is_reused_only_on_the_same_grid(tmp_path):
    uri = str(tmp_path / "layer.zarr")
    grid = LayerGrid.covering(TILES, patch_size_m=60, dim=8)
    create_layer(uri, grid, {})
    write_tile(uri, grid, TILES[0], np.ones((10, 10, 8), "float32"))
    create_layer(uri, grid, {})     # resume: keeps what was written
    assert float(read_layer(uri).embedding[0, 0, 0]) == 1.0
    with pytest.raises(OutputNotWritableError, match="another grid"):
        create_layer(uri, LayerGrid.covering(TILES, patch_size_m=30, dim=8), {})
    with pytest.raises(OutputNotWritableError, match="a layer of another run .plan none: written before"):
        create_layer(uri, grid, {"plan_hash": "abc"})


def test_a_continental_zone_is_created_without_a_task_per_tile(tmp_path):
    """A zone of 90,000 tiles of 2,400 m (720 x 720 km): metadata only, in memory that does
    not grow with its tiles (a dask graph of a task per tile held 303 MB and took 30 s)."""
    grid = LayerGrid(32631, 2400.0, 30.0, 1000, 9000, 300, 300, 768)
    tracemalloc.start()
    try:
        create_layer(str(tmp_path / "layer.zarr"), grid, {"plan_hash": "x"}, preview_max_side=2048)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MB"
    ds = read_layer(str(tmp_path / "layer.zarr"))
    assert ds.embedding.shape == (24_000, 24_000, 768)
    assert ds.embedding.encoding["chunks"] == (80, 80, 768)   # a chunk per tile
    assert not any((tmp_path / "layer.zarr" / "embedding").rglob("c/*"))  # no chunk written


def test_pca_preview_png_drawn_tile_by_tile(tmp_path):
    uri = str(tmp_path / "layer.zarr")
    grid = LayerGrid.covering(TILES, patch_size_m=60, dim=16)      # 2 x 2 tiles of 10 px
    create_layer(uri, grid, {})
    rng = np.random.default_rng(1)
    for tile in TILES:                                              # the fourth tile stays empty
        emb = rng.normal(size=(10, 10, 16)).astype("float32")
        emb[:5] = np.nan
        write_tile(uri, grid, tile, emb)
    ds = read_layer(uri)
    rgba = maps.render(ds, maps.pca_colour(maps.sample_pixels(ds)), max_side=2048)
    size = maps.write_png(rgba, str(tmp_path / "p" / "preview.png"))
    image = np.asarray(Image.open(tmp_path / "p" / "preview.png"))
    assert size == (260, 260) and image.shape == (260, 260, 4)     # 20 px, upscaled 13x
    alpha = image[::13, ::13, 3]
    assert (alpha[:5, :] == 0).all() and (alpha[5:10, :] == 255).all()   # rows without data
    assert (alpha[15:, :10] == 0).all() and (alpha[15:, 10:] == 255).all()
    assert image[5 * 13:10 * 13, :, :3].std() > 20   # the colours carry the embedding's variance
    pooled = maps.render(ds, maps.pca_colour(maps.sample_pixels(ds)), max_side=4)
    assert pooled.shape == (4, 4, 4)                              # tiles average-pooled 5 x 5


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_a_layer_wider_than_its_preview_gets_an_overview_that_draws_the_same_preview(tmp_path, dtype):
    """Each tile is pooled into the overview as it is written, so a continent's preview never
    reads its layer back; drawn from the overview, a float32 layer's preview is the one drawn
    from the layer, pixel for pixel. An int8 layer's overview pools the float values."""
    from anysat.products.zarr_layer import pool_mean, read_overview, read_preview_cells

    uri = str(tmp_path / "layer.zarr")
    grid = LayerGrid.covering(TILES, patch_size_m=60, dim=16, dtype=dtype)  # 2 x 2 tiles of 10 px
    create_layer(uri, grid, {}, preview_max_side=4)               # 20 px: pooled 5 x 5
    rng = np.random.default_rng(3)
    written = {}
    for tile in TILES:                                            # the fourth tile stays empty
        written[tile.id] = rng.normal(size=(10, 10, 16)).astype("float32")
        written[tile.id][:5, :7] = np.nan                         # a cell half empty, one empty
        write_tile(uri, grid, tile, written[tile.id].copy())
    cells, f = read_overview(uri)
    assert f == 5 and cells.shape == (4, 4, 16) and cells.chunks == (2, 2, 16)
    assert sorted(read_layer(uri).data_vars) == (["embedding"] if dtype == "float32" else ["embedding", "scale"])
    region = grid.tile_region(TILES[2])
    y, x = region["y"].start // f, region["x"].start // f
    np.testing.assert_array_equal(cells[y:y + 2, x:x + 2], pool_mean(written[TILES[2].id], 5))
    empty = grid.tile_region(Tile(32631, 1106, 9352, 600.0))      # the tile not written
    assert np.isnan(cells[empty["y"].start // f:, :empty["x"].stop // f]).all()
    assert np.isfinite(cells[:]).all(-1).sum() == 3 * 3       # per tile: 1 of 4 cells empty
    sample = maps.sample_cells(cells)
    assert sample.shape == (9, 16) and np.isfinite(sample).all()
    colour = maps.pca_colour(sample)
    drawn = maps.render_cells(cells, colour)
    assert drawn.shape == (4, 4, 4) and (drawn[..., 3] == 255).sum() == 9
    if dtype == "float32":
        np.testing.assert_array_equal(drawn, maps.render(read_layer(uri), colour, max_side=4))
    np.testing.assert_array_equal(read_preview_cells(uri, 4)[:], cells[:])  # the overview
    small = str(tmp_path / "small.zarr")
    create_layer(small, grid, {}, preview_max_side=2048)
    assert read_overview(small) is None                # no wider than the preview: no overview,
    own = read_preview_cells(small, 2048)              # a float32 layer's pixels are its cells
    assert own.shape == (20, 20, 16) if dtype == "float32" else own is None


def test_int8_layer_round_trip_keeps_the_direction_of_every_embedding(tmp_path):
    from anysat.products import embeddings
    from anysat.products.quantize import NODATA

    uri = str(tmp_path / "int8.zarr")
    grid = LayerGrid.covering(TILES, patch_size_m=60, dim=64, dtype="int8")
    create_layer(uri, grid, {})
    rng = np.random.default_rng(2)
    written = rng.normal(size=(10, 10, 64)).astype("float32") * rng.uniform(0.01, 5, (10, 10, 1))
    written[3, 4] = np.nan                                   # a patch without data
    write_tile(uri, grid, TILES[0], written.copy())
    ds = read_layer(uri)
    assert ds.embedding.dtype == np.int8 and ds.scale.dtype == np.float32
    assert ds.embedding.attrs["nodata"] == NODATA and "scale" in ds.embedding.attrs["dequantization"]
    raw = ds.embedding[:10, :10].values
    assert (raw[3, 4] == NODATA).all() and (raw[~np.isnan(written).any(-1)] > NODATA).all()
    back = embeddings(ds, slice(0, 10), slice(0, 10))
    valid = np.isfinite(written).all(-1)
    assert np.array_equal(np.isfinite(back).all(-1), valid) and np.isnan(embeddings(ds)[10:]).all()
    a, b = written[valid], back[valid]
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cosine.min() > 0.999
