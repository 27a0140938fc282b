"""The saved run plan: written once, read back, the only source of a run's items, refused for
another request, and split per UTM zone (one layer each)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely
import xarray as xr
from shapely.geometry import box

from anysat.plan import PlanMismatchError, make_plan, read_plan, read_side, tile_footprints
from anysat.request import RegionRequest
from anysat.stac import resolve_provider, search_sensors
from anysat.tiles import ZoneTiles
from tests.conftest import DEMO_BBOX, SMALL_BBOX

pytestmark = pytest.mark.integration
DATES = ("2020-11-01", "2021-10-31")


def anysat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "anysat.cli", *args], capture_output=True,
                          text=True, timeout=600)


def test_plan_is_written_read_back_and_holds_each_tiles_items(tmp_path):
    out = tmp_path / "run"
    result = anysat("plan", "--demo", "--output", str(out), "--tile-size-m", "300")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["zones"] == [{"epsg": 32631, "tiles": printed["tiles"], "area_km2": printed["area_km2"]}]
    assert printed["blocks"] < printed["tiles"]              # one search per block, not per tile
    assert not (out / "embeddings").exists()                 # planning writes no layer

    table = pq.read_table(out / "plan" / "tiles.parquet")
    geo = json.loads(table.schema.metadata[b"geo"])          # GeoParquet 1.1, WKB in lon/lat
    assert geo["primary_column"] == "geometry" and geo["columns"]["geometry"]["encoding"] == "WKB"
    footprints = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    region = box(*DEMO_BBOX)
    assert all(f.intersects(region) and f.area > 0 for f in footprints)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == printed["tiles"]
    # fixed-width rows, read whole by every worker: item counts, not item ids (a year of S2
    # and S1 is some 200 ids a tile: 1.7 GB a worker for 100,000 tiles as lists)
    assert not [f.name for f in table.schema if pa.types.is_list(f.type) or f.name.startswith("items")]
    counts = {s: table.column(f"n_items.{s}").to_numpy() for s in printed["items"]}
    assert all(c.sum() >= printed["items"][s] > 0 for s, c in counts.items())

    plan = read_plan(str(out))
    assert plan.hash == printed["hash"] and plan.tile_ids == ids
    # every tile holds exactly what a search over that tile alone finds, in the same order
    request = RegionRequest.build(bbox=DEMO_BBOX, start=DATES[0], end=DATES[1])
    specs = request.modality_specs()
    for tile_id in ids:
        tile = plan.tile(tile_id)
        alone = search_sensors(resolve_provider("demo"), specs, tile.bbox_lonlat, request.start,
                               request.end)
        planned = plan.items(tile_id)
        assert {s: [i.id for i in v] for s, v in planned.items()} == \
            {s: [i.id for i in v] for s, v in alone.items() if v}
        assert all(a.get_absolute_href().startswith("/") for v in planned.values()
                   for i in v for a in i.assets.values())
        assert {s: len(v) for s, v in planned.items()} == \
            {s: int(c[ids.index(tile_id)]) for s, c in counts.items() if c[ids.index(tile_id)]}

    # how tiles are grouped into reads is the plan's (300 m tiles: squares of 8 x 8); a plan
    # saved before it was recorded reads as it did then (4 x 4), whatever READ_SIDE is now
    saved = json.loads((out / "plan.json").read_text())
    assert saved["read_side"] == plan.read_side == 8
    # squares hold at most READ_BYTES of cubes: 12 dates of S2 (9 bands + SCL) and S1 over
    # 2,400 m tiles read 4 x 4, a year of S2 (70 dates) 2 x 2, a 10 km tile of it alone
    tile_mb = {"600 m, 12 dates": 2.1, "2,400 m, 12 dates": 34, "2,400 m, 70 dates": 180,
               "10 km, 70 dates": 2800}
    assert [read_side(int(mb * 2**20)) for mb in tile_mb.values()] == [8, 4, 2, 1]
    assert read_side(int(2.1 * 2**20), most=4) == 4
    del saved["read_side"]
    (out / "plan.json").write_text(json.dumps(saved))
    assert read_plan(str(out)).read_side == 4
    # a plan of the version before (item ids in the tile table) is refused, not misread
    (out / "plan.json").write_text(json.dumps({**saved, "version": 1}))
    with pytest.raises(PlanMismatchError, match="a plan of version 1, this anysat writes version 2"):
        read_plan(str(out))


def test_a_changed_rerun_into_the_same_output_is_refused(tmp_path):
    out = tmp_path / "run"
    first = anysat("embed", "--demo", "--bbox", ",".join(map(str, SMALL_BBOX)), "--output", str(out))
    assert first.returncode == 0, first.stderr
    plan_before = (out / "plan.json").read_bytes()
    layer_before = xr.open_zarr(out / "embeddings" / "EPSG32631_patch30m.zarr",
                                consolidated=False).embedding.values
    for args, names in ((["--model", "tiny"], ["model: planned 'demo', now 'tiny'", "model_sha256"]),
                        (["--start", "2021-03-01"], ["start: planned '2020-11-01', now '2021-03-01'"]),
                        (["--sensors", "s2,s1"], ["sensors: planned"]),
                        (["--patch-size-m", "60"], ["patch_size_m: planned 30.0, now 60.0"])):
        again = anysat("embed", "--demo", "--bbox", ",".join(map(str, SMALL_BBOX)),
                       "--output", str(out), *args)
        assert again.returncode == 2 and "Traceback" not in again.stderr
        assert f"output {out} holds a run planned for another request" in again.stderr
        assert all(n in again.stderr for n in names), again.stderr
    assert (out / "plan.json").read_bytes() == plan_before
    layer_after = xr.open_zarr(out / "embeddings" / "EPSG32631_patch30m.zarr",
                               consolidated=False).embedding.values
    np.testing.assert_array_equal(layer_after, layer_before)
    # options that do not change the embeddings resume the same plan
    same = anysat("embed", "--demo", "--bbox", ",".join(map(str, SMALL_BBOX)), "--output",
                  str(out), "--batch-size", "2", "--tiles-per-batch", "5")
    assert same.returncode == 0, same.stderr
    assert (out / "plan.json").read_bytes() == plan_before


def test_a_region_across_two_zones_gets_a_layer_per_zone(tmp_path):
    # the demo's square kilometre (31N) and a square east of 6 E (32N), where the demo
    # catalog has no items: each zone its own grid and layer, every tile in exactly one
    east = (6.001, 50.6286, 6.006, 50.6310)
    geojson = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": box(*b).__geo_interface__}
        for b in (SMALL_BBOX, east)]}
    path = tmp_path / "region.geojson"
    path.write_text(json.dumps(geojson))
    out = tmp_path / "run"
    result = anysat("embed", "--demo", "--geojson", str(path), "--output", str(out),
                    "--sensors", "s2,s1", "--patch-size-m", "60", "--products", "vectors")
    assert result.returncode == 0, result.stderr
    assert "EPSG:32632 has no patch with data: no vectors for it" in result.stderr
    assert "4 of 5 tiles had no valid pixel" in result.stderr
    manifest = json.loads((out / "run.json").read_text())
    assert [z["epsg"] for z in manifest["layers"]] == [32631, 32632]
    plan = read_plan(str(out))
    assert sorted(set(plan.tiles["epsg"])) == [32631, 32632]
    assert set(plan.tiles.loc[plan.tiles["epsg"] == 32632, "status"]) == {"no-items"}
    markers = {p.stem: json.loads(p.read_text()) for p in (out / "tiles").glob("*.json")}
    assert sorted(markers) == sorted(plan.tile_ids)
    for zone in manifest["layers"]:
        layer = xr.open_zarr(zone["layer"], consolidated=False, decode_coords="all")
        assert layer.rio.crs.to_epsg() == zone["epsg"]
        in_zone = [m for m in markers.values() if m["epsg"] == zone["epsg"]]
        assert len(in_zone) == zone["tiles"]
        has_data = int(np.isfinite(layer.embedding.values).all(axis=-1).sum())
        assert has_data == zone["patches_with_data"] == sum(m["valid_patches"] for m in in_zone)
    assert manifest["layers"][0]["patches_with_data"] > 0 == manifest["layers"][1]["patches_with_data"]
    assert "vectors" in manifest["layers"][0] and "vectors" not in manifest["layers"][1]
    assert manifest["tiles_without_data"] == 4
    assert {m["status"] for m in markers.values() if m["epsg"] == 32632} == {"no-data"}


def test_a_plan_across_the_antimeridian(tmp_path):
    # Fiji: zone 60S west of 180, 1S east of it; the demo catalog has nothing there
    request = RegionRequest.build(bbox=(179.99, -16.01, -179.99, -16.0), start=DATES[0],
                                  end=DATES[1], tile_size_m=600, patch_size_m=60,
                                  output_uri=str(tmp_path / "fiji"))
    plan = make_plan(request, model_sha256="0" * 64, dim=8)
    assert [z.epsg for z in plan.zones] == [32701, 32760]
    assert len(plan.tile_ids) == len(set(plan.tile_ids))
    assert set(plan.tiles["status"]) == {"no-items"}
    footprints = shapely.from_wkb(pq.read_table(tmp_path / "fiji" / "plan" / "tiles.parquet")
                                  .column("geometry").to_numpy(zero_copy_only=False))
    assert all(-180 <= f.bounds[0] and f.bounds[2] <= 180 for f in footprints)
    # a tile straddling 180 degrees becomes the two sides of the line
    straddling = ZoneTiles(32760, 600.0, np.array([1368]), np.array([13713]))
    footprint = tile_footprints(straddling)[0]
    assert footprint.geom_type == "MultiPolygon"
    assert footprint.bounds[0] == -180 and footprint.bounds[2] == 180
    widths = [g.bounds[2] - g.bounds[0] for g in footprint.geoms]   # 600 m is about 0.0056 deg here
    assert sum(widths) == pytest.approx(600 / (111.32e3 * np.cos(np.radians(16))), rel=0.02)


def test_a_run_where_no_tile_has_data_fails_loudly(tmp_path):
    """A catalog whose every Sentinel-2 pixel is nodata: no empty layer passed off as done."""
    import shutil

    import rasterio

    from tests.conftest import DEMO_CATALOG

    catalog = tmp_path / "catalog"
    shutil.copytree(DEMO_CATALOG, catalog)
    for path in (catalog / "sentinel-2-l2a").rglob("*.tif"):
        with rasterio.open(path, "r+", IGNORE_COG_LAYOUT_BREAK="YES") as dst:
            dst.write(np.zeros((dst.count, dst.height, dst.width), dtype=dst.dtypes[0]))
    out = tmp_path / "run"
    result = anysat("embed", "--demo", "--catalog", str(catalog / "catalog.json"), "--sensors",
                    "s2", "--output", str(out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "none of the 9 tiles had a valid pixel" in result.stderr
    assert not (out / "run.json").exists()


def test_done_markers_are_read_a_search_block_at_a_time(tmp_path):
    """A resumed run looks its tiles' markers up block by block as its reads reach them, not
    all before the first read (a continent's run: a million round trips to an object store)."""
    from anysat import pipeline, storage
    from anysat.cli import DEMO_DATES

    request = RegionRequest.build(bbox=DEMO_BBOX, start=DEMO_DATES[0], end=DEMO_DATES[1],
                                  tile_size_m=60.0, patch_size_m=60.0, output_uri=str(tmp_path))
    plan = pipeline.plan_run(request, create_layers=False)
    ids = plan.in_reading_order(plan.tile_ids)
    blocks = plan.tiles.loc[ids, "block"].to_numpy()
    assert len(set(blocks)) > 1   # 60 m tiles: blocks of 960 m over the demo's kilometre
    done = ids[:5]
    for tile in done:
        storage.write_bytes_atomic(plan.marker_uri(tile), json.dumps({"tile": tile}).encode())
    parts = pipeline._unfinished(plan, ids)
    skipped, todo = next(parts)
    assert [r["tile"] for r in skipped] == done and all(r["skipped"] for r in skipped)
    assert len(skipped) + len(todo) == (blocks == blocks[0]).sum()   # the first block only
    assert sum(len(s) + len(t) for s, t in parts) == len(ids) - (blocks == blocks[0]).sum()
