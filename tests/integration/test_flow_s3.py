"""The embed-region flow on a real Prefect server and Dask cluster, writing to a real
S3-compatible server on loopback, read back with xarray from s3://."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import odc.stac
import pyarrow.parquet as pq
import pytest
import rioxarray  # noqa: F401 - .rio accessor
import rasterio
import rasterio.io
import xarray as xr
from prefect.settings import PREFECT_API_URL, temporary_settings

from anysat import load_model
from anysat.products.stac import load_items, validate
from anysat.request import RegionRequest
from tests.conftest import DEMO_BBOX

pytestmark = pytest.mark.integration


def test_flow_writes_layer_to_s3(prefect_api, s3_endpoint):
    from flows.embed_region import embed_region

    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        request = RegionRequest.build(start="2020-11-01", end="2021-10-31", bbox=DEMO_BBOX,
                                      patch_size_m=60.0, output_uri="s3://anysat/demo-run",
                                      products=("cog", "vectors", "clusters"), clusters=4)
        state = embed_region(request, return_state=True)
    assert state.is_completed()
    manifest = state.result()
    assert [z["layer"] for z in manifest["layers"]] == ["s3://anysat/demo-run/embeddings/EPSG32631_patch60m.zarr"]

    fs = fsspec.filesystem("s3")
    assert fs.exists("anysat/demo-run/plan.json") and fs.exists("anysat/demo-run/plan/tiles.parquet")
    on_s3 = json.loads(fs.cat_file("anysat/demo-run/run.json"))
    assert on_s3["tiles"] == 9 and on_s3["area_km2"] == pytest.approx(3.24)
    assert len(fs.ls("anysat/demo-run/tiles")) == 9
    # a rerun finds every tile done, from its marker on S3 (markers read 16 at once there)
    from anysat import pipeline
    from anysat.plan import read_plan

    plan = read_plan("s3://anysat/demo-run", request)
    again = list(pipeline.embed_stream(plan, plan.tile_ids))
    assert sorted(r["tile"] for r in again) == sorted(plan.tile_ids)
    assert all(r["skipped"] and r["valid_patches"] > 0 for r in again)
    assert fs.cat_file("anysat/demo-run/preview/EPSG32631_pca.png")[:4] == b"\x89PNG"

    layer = xr.open_zarr(manifest["layers"][0]["layer"], consolidated=False, decode_coords="all")
    emb = layer.embedding.values
    assert emb.shape == (30, 30, load_model("demo").config.dim)       # the shipped checkpoint
    assert layer.rio.crs.to_epsg() == 32631 and layer.attrs["model"] == "demo"
    has_data = np.isfinite(emb).all(axis=-1)
    # the 1 km footprint (x 664000..665000) touches 18 columns of 60 m patches on the grid at 663600
    assert has_data.sum() == on_s3["patches_with_data"] == 18 * 18
    assert not np.isnan(emb[has_data]).any() and np.isnan(emb[~has_data]).all()

    # the products on S3, opened without our code
    zone = manifest["layers"][0]
    [cog] = zone["cogs"]
    assert cog == "s3://anysat/demo-run/cogs/EPSG32631/32631_69_584.tif"
    with rasterio.io.MemoryFile(fs.cat_file(cog)) as memory, memory.open() as src:
        assert src.crs.to_epsg() == 32631 and src.shape == (30, 30) and np.isnan(src.nodata)
        np.testing.assert_array_equal(np.moveaxis(src.read(), 0, -1), emb)
    with fs.open(zone["vectors"]["patches"], "rb") as f:
        assert pq.read_table(f).num_rows == 18 * 18
    [cluster_cog] = zone["clusters"]["cogs"]
    assert fs.cat_file(zone["clusters"]["png"])[:4] == b"\x89PNG"
    with rasterio.io.MemoryFile(fs.cat_file(cluster_cog)) as memory, memory.open() as src:
        clusters = src.read(1)
        assert src.crs.to_epsg() == 32631 and src.nodata == 255
    assert set(np.unique(clusters[has_data])) <= set(range(4)) and (clusters[~has_data] == 255).all()

    # its STAC, validated offline on S3, and loaded back by odc-stac through GDAL's S3 reader
    assert manifest["stac"] == "s3://anysat/demo-run/stac/collection.json"
    assert validate(manifest["stac"]) == 3
    host = s3_endpoint.removeprefix("http://")
    with rasterio.Env(AWS_S3_ENDPOINT=host, AWS_HTTPS="NO", AWS_VIRTUAL_HOSTING="FALSE"):
        loaded = odc.stac.load(load_items(manifest["stac"]), chunks=None).isel(time=0)
    values = np.stack([loaded[f"embeddings.{b + 1}"].values for b in range(emb.shape[-1])], axis=-1)
    np.testing.assert_array_equal(values, emb)


def test_bad_flow_parameters_fail_before_any_work(prefect_api, tmp_path):
    """The flow's parameter is the request model: Prefect validates it before the run starts."""
    from flows.embed_region import embed_region

    out = tmp_path / "never"
    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        state = embed_region(request={"start": "2021-06-01", "end": "2021-01-01",
                                      "bbox": list(DEMO_BBOX), "output_uri": str(out)},
                             return_state=True)
    assert state.is_failed()
    assert "start 2021-06-01 is after end 2021-01-01" in state.message
    assert not out.exists()
