"""Products of a demo run as users open them: the int8 layer against float32, COGs read by
rasterio, GeoParquet vectors, and `anysat similar` over the layer and over the vectors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
from rio_cogeo.cogeo import cog_validate
from shapely.geometry import box

from anysat.products import embeddings, read_layer
from anysat.products.cog import block_window
from anysat.products.zarr_layer import layer_grid
from tests.conftest import DEMO_BBOX

pytestmark = pytest.mark.integration


def anysat(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "anysat.cli", *args], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("products")
    # labelled points: the demo square's northern and southern halves
    west, south, east, north = DEMO_BBOX
    rng = np.random.default_rng(0)
    points = [(rng.uniform(west, east), rng.uniform(south, north)) for _ in range(40)]
    (root / "labels.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [lon, lat]},
         "properties": {"label": "north" if lat > (south + north) / 2 else "south"}}
        for lon, lat in points]}))
    anysat("embed", "--demo", "--patch-size-m", "60", "--output", str(root / "float"))
    anysat("embed", "--demo", "--patch-size-m", "60", "--output", str(root / "int8"),
           "--quantize", "int8", "--products", "cog,vectors,clusters,classes", "--clusters", "5",
           "--labels", str(root / "labels.geojson"))
    return {kind: json.loads((root / kind / "run.json").read_text()) for kind in ("float", "int8")}


def test_int8_layer_keeps_the_float_embeddings_direction(runs):
    full = embeddings(read_layer(runs["float"]["layers"][0]["layer"]))
    small = read_layer(runs["int8"]["layers"][0]["layer"])
    assert small.embedding.dtype == np.int8
    back = embeddings(small)
    valid = np.isfinite(full).all(-1)
    assert valid.sum() == runs["int8"]["patches_with_data"] and np.array_equal(valid, np.isfinite(back).all(-1))
    a, b = full[valid], back[valid]
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert np.percentile(cosine, 1) > 0.999


def test_cog_has_the_layers_grid_nodata_and_values(runs):
    zone = runs["int8"]["layers"][0]
    ds = read_layer(zone["layer"])
    grid = layer_grid(ds)
    [cog] = zone["cogs"]
    assert cog_validate(cog) == (True, [], [])  # tiled, overviews, header first
    with rasterio.open(cog) as src:
        assert src.crs.to_epsg() == grid.epsg and np.isnan(src.nodata) and src.count == grid.dim
        values = np.moveaxis(src.read(), 0, -1)
        # the demo's tiles all lie in one block: its window is the whole layer
        y, x, transform = block_window(grid, np.array([grid.col0, grid.col0 + grid.n_cols - 1]),
                                       np.array([grid.row0 - grid.n_rows + 1, grid.row0]))
        assert src.transform == transform == grid.transform
    np.testing.assert_array_equal(values, embeddings(ds, y, x))


def test_vectors_are_geoparquet_of_valid_patches_inside_the_region(runs):
    zone = runs["int8"]["layers"][0]
    patches = pq.read_table(zone["vectors"]["patches"])
    geo = json.loads(patches.schema.metadata[b"geo"])
    assert geo["columns"]["geometry"]["encoding"] == "WKB" and "crs" not in geo["columns"]["geometry"]
    assert patches.num_rows == zone["patches_with_data"]
    footprints = shapely.from_wkb(patches.column("geometry").to_numpy(zero_copy_only=False))
    west, south, east, north = DEMO_BBOX
    assert shapely.intersects(footprints, box(west - 1e-3, south - 1e-3, east + 1e-3, north + 1e-3)).all()
    assert set(patches.column("start").to_pylist()) == {"2020-11-01"}
    assert len(patches.column("embedding")[0]) == layer_grid(read_layer(zone["layer"])).dim
    tiles = pq.read_table(zone["vectors"]["tiles"])
    assert sum(tiles.column("patches").to_pylist()) == patches.num_rows


def test_similar_finds_the_query_patch_first_in_layer_and_vectors(runs):
    zone = runs["int8"]["layers"][0]
    point = "5.326,50.633"
    over_layer = [json.loads(line) for line in anysat(
        "similar", "--layer", zone["layer"], "--point", point, "-k", "5").stdout.splitlines()]
    over_vectors = [json.loads(line) for line in anysat(
        "similar", "--vectors", zone["vectors"]["patches"], "--point", point, "-k", "5").stdout.splitlines()]
    assert over_layer[0]["similarity"] == pytest.approx(1.0) and len(over_layer) == 5
    assert [(r["row"], r["col"]) for r in over_layer] == [(r["row"], r["col"]) for r in over_vectors]
    assert all(a["similarity"] >= b["similarity"] for a, b in zip(over_layer, over_layer[1:]))


@pytest.mark.parametrize("kind,classes", [("clusters", set(range(5))), ("classes", {0, 1})])
def test_cluster_and_class_maps_have_the_layers_grid(runs, kind, classes):
    zone = runs["int8"]["layers"][0]
    ds = read_layer(zone["layer"])
    grid = layer_grid(ds)
    has_data = np.isfinite(embeddings(ds)).all(-1)
    product = zone[kind]
    assert cog_validate(product["cogs"][0])[0]
    with rasterio.open(product["cogs"][0]) as src:
        assert src.crs.to_epsg() == grid.epsg and src.transform == grid.transform
        assert src.nodata == 255 and src.dtypes == ("uint8",)
        values = src.read(1)
    assert values.shape == has_data.shape and (values[~has_data] == 255).all()
    assert set(np.unique(values[has_data])) <= classes and len(np.unique(values[has_data])) > 1
    if kind == "classes":
        assert product["classes"] == ["north", "south"]
    assert Path(product["png"]).read_bytes()[:4] == b"\x89PNG"


def test_preview_of_a_large_layer_never_holds_the_layer(tmp_path):
    """A 600 x 600 px x 128-d layer (184 MB as float32) previewed within 60 MB."""
    import zarr

    from anysat.products import LayerGrid, create_layer

    uri = str(tmp_path / "big.zarr")
    grid = LayerGrid(32631, 600.0, 30.0, 1000, 9000, 30, 30, 128)
    create_layer(uri, grid, {})
    array = zarr.open_array(f"{uri}/embedding", mode="r+")
    rng = np.random.default_rng(0)
    for y0 in range(0, 600, 100):
        array[y0:y0 + 100] = rng.normal(size=(100, 600, 128)).astype("float32")
    script = (
        "import resource, sys\n"
        "from anysat.products import maps, read_layer\n"
        "ds = read_layer(sys.argv[1])\n"
        "colour = maps.pca_colour(maps.sample_pixels(ds))\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "maps.write_png(maps.render(ds, colour, 2048), sys.argv[2])\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n")
    result = subprocess.run([sys.executable, "-c", script, uri, str(tmp_path / "p.png")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 60            # MB more than before drawing: never the layer
    assert (tmp_path / "p.png").stat().st_size > 1000


def _stac_document(collection_uri: str, rel: str) -> tuple[str, dict]:
    collection = json.loads(Path(collection_uri).read_text())
    [link] = [link for link in collection["links"] if link["rel"] == rel][:1]
    path = Path(collection_uri).parent / link["href"]
    return str(path), json.loads(path.read_text())


@pytest.mark.parametrize("kind", ["float", "int8"])
def test_stac_is_valid_offline_against_core_and_extension_schemas(runs, kind):
    from anysat.products.stac import validate

    run = runs[kind]
    assert validate(run["stac"]) == 3  # the Collection, the model Item and the one block's Item
    collection = json.loads(Path(run["stac"]).read_text())
    dim = layer_grid(read_layer(run["layers"][0]["layer"])).dim
    assert collection["emb:dimensions"] == dim and collection["emb:type"] == "pixel"
    assert collection["data_type"] == {"float": "float32", "int8": "int8"}[kind]
    _, item = _stac_document(run["stac"], "item")
    # without COGs the block's embeddings are the zone's Zarr layer
    expected = run["layers"][0]["cogs"][0] if kind == "int8" else run["layers"][0]["layer"]
    assert item["assets"]["embeddings"]["href"] == expected
    _, model = _stac_document(run["stac"], "emb:model")
    weights = model["assets"]["weights"]
    import hashlib
    assert weights["file:checksum"] == "1220" + hashlib.sha256(Path(weights["href"]).read_bytes()).hexdigest()
    # read back through pystac's MLM extension
    import pystac
    from pystac.extensions.mlm import MLMExtension

    mlm = MLMExtension.ext(pystac.Item.from_dict(model))
    assert mlm.mlm_name == f"anysat-{run['request']['model']}" and mlm.pretrained
    assert [i.name for i in mlm.input] == list(run["request"]["sensors"])
    assert mlm.input[0].input.dim_order == ["batch", "time", "bands", "height", "width"]
    assert mlm.output[0].result.shape == [-1, dim, -1, -1]


@pytest.mark.parametrize("document,field,bad", [
    ("collection", "emb:dimensions", "192"),
    ("collection", "emb:type", "tile"),
    ("item", "proj:shape", [30]),
    ("emb:model", "mlm:tasks", ["embedding"]),
    ("emb:model", "mlm:input", None),
])
def test_stac_schemas_reject_a_wrong_field(runs, tmp_path, document, field, bad):
    """The schemas kept in the repo guard: one wrong field makes validation fail."""
    import shutil

    from pystac.errors import STACValidationError

    from anysat.products.stac import validate

    folder = tmp_path / "stac"
    shutil.copytree(Path(runs["int8"]["stac"]).parent, folder)
    if document == "collection":
        path, doc = str(folder / "collection.json"), json.loads((folder / "collection.json").read_text())
        target = doc
    else:
        path, doc = _stac_document(str(folder / "collection.json"), document)
        target = doc["properties"]
    if bad is None:
        target.pop(field)
    else:
        target[field] = bad
    Path(path).write_text(json.dumps(doc))
    with pytest.raises(STACValidationError):
        validate(str(folder / "collection.json"))


def test_odc_stac_loads_the_block_items_into_the_layers_array(runs):
    import odc.stac

    from anysat.products.stac import load_items

    run = runs["int8"]
    layer = read_layer(run["layers"][0]["layer"])
    grid = layer_grid(layer)
    loaded = odc.stac.load(load_items(run["stac"]), chunks=None).isel(time=0)
    bands = [f"embeddings.{b + 1}" for b in range(grid.dim)]
    values = np.stack([loaded[b].values for b in bands], axis=-1)
    assert loaded.odc.geobox.crs.epsg == grid.epsg
    assert loaded.odc.geobox.affine == grid.transform
    np.testing.assert_array_equal(values, embeddings(layer))
    assert "clusters" in loaded and "classes" in loaded


def test_polygon_labels_give_the_patches_whose_centres_they_hold(runs, tmp_path):
    from pyproj import Transformer

    from anysat.errors import AnySatError
    from anysat.products import maps

    ds = read_layer(runs["int8"]["layers"][0]["layer"])
    west, south, east, north = DEMO_BBOX
    middle = (south + north) / 2
    halves = {"north": box(west, middle, east, north), "south": box(west, south, east, middle)}
    labels = tmp_path / "polygons.geojson"
    labels.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": shapely.geometry.mapping(poly), "properties": {"label": name}}
        for name, poly in halves.items()]}))
    values, names = maps.labelled_embeddings(ds, str(labels))
    # expected: patches with data whose centre, in lon/lat, lies in each half
    grid = layer_grid(ds)
    xs, ys = np.meshgrid(ds.x.values, ds.y.values)
    lon, lat = Transformer.from_crs(grid.epsg, 4326, always_xy=True).transform(xs, ys)
    has_data = np.isfinite(embeddings(ds)).all(-1)
    for name, poly in halves.items():
        inside = shapely.contains_xy(poly, lon, lat) & has_data
        assert (names == name).sum() == inside.sum() > 0
        np.testing.assert_array_equal(np.sort(values[names == name], axis=0),
                                      np.sort(embeddings(ds)[inside], axis=0))
    predict, classes, used = maps.linear_probe(values, names)
    assert classes == ["north", "south"] and used == len(values)

    line = tmp_path / "line.geojson"
    line.write_text(json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature",
        "geometry": {"type": "LineString", "coordinates": [[west, south], [east, north]]},
        "properties": {"label": "x"}}]}))
    with pytest.raises(AnySatError, match="feature 0 is a LineString; labels are Points or Polygons"):
        maps.labelled_embeddings(ds, str(line))
