"""`anysat embed` as a user runs it: a real subprocess on the demo catalog."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import rioxarray  # noqa: F401 - .rio accessor
import pytest
import xarray as xr

from anysat import load_model
from anysat.evaluate.position import position_omega2
from tests.conftest import DEMO_BBOX, SMALL_BBOX

pytestmark = pytest.mark.integration


def embed(*args: str, output, wait=True):
    cmd = [sys.executable, "-m", "anysat.cli", "embed", "--demo", "--output", str(output), *args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_embed_small_region_writes_layer_preview_and_manifest(tmp_path):
    bbox = ",".join(map(str, SMALL_BBOX))
    result = embed("--bbox", bbox, "--sensors", "s2,s1", "--patch-size-m", "20", output=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    manifest = json.loads((tmp_path / "run.json").read_text())
    assert printed["layers"] == manifest["layers"] and manifest["tiles"] == 1
    layer = xr.open_zarr(manifest["layers"][0]["layer"], consolidated=False, decode_coords="all")
    emb = layer.embedding.values
    dim = load_model("demo").config.dim                                 # the shipped checkpoint
    assert emb.shape == (30, 30, dim) and np.isfinite(emb).all()      # central tile: all data
    assert layer.rio.crs.to_epsg() == 32631 and layer.rio.resolution() == (20.0, -20.0)
    assert (tmp_path / "preview" / "EPSG32631_pca.png").stat().st_size > 1000
    assert "tiles" in result.stderr and "km2" in result.stderr      # progress in domain terms


@pytest.mark.parametrize("args,message", [
    (["--bbox", "10,45,10.1,45.1"], "no sentinel-2-l2a items (collection 'sentinel-2-l2a') in catalog demo intersect"),
    (["--start", "2021-06-01", "--end", "2021-01-01"], "start 2021-06-01 is after end 2021-01-01"),
    (["--sensors", "s2,sentinel-9"], "unknown sensor(s) 'sentinel-9'"),
    (["--patch-size-m", "20"], "patch_size_m 20 is not a multiple of the 30 m GSD of sensor 'copernicus-dem'"),
    (["--tile-size-m", "3000000"], "tile_size_m 3,000,000 is over 20,000 m"),
    (["--bbox=-10,35,30,70"], "tiles of 600 m, over the 5,000,000 one plan holds (ANYSAT_MAX_TILES)"),
])
def test_bad_input_gets_one_clear_error(tmp_path, args, message):
    result = embed(*args, output=tmp_path / "out")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "run.json").exists()


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = embed(output=blocker / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"cannot write to output {blocker / 'out'}" in result.stderr


def test_killed_run_leaves_nothing_looking_complete_and_resumes(tmp_path):
    out = tmp_path / "killed"
    proc = embed("--tiles-per-batch", "1", output=out, wait=False)
    deadline = time.time() + 300
    while not list((out / "tiles").glob("*.json")) if (out / "tiles").exists() else True:
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {p.name for p in (out / "tiles").glob("*.json")}
    assert 1 <= len(done_before) < 9 and not (out / "run.json").exists()

    resumed = embed("--tiles-per-batch", "1", output=out)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "run.json").read_text())["tiles"] == 9
    # the resumed layer equals an uninterrupted run's
    fresh = embed(output=tmp_path / "fresh")
    assert fresh.returncode == 0, fresh.stderr
    a = xr.open_zarr(json.loads((out / "run.json").read_text())["layers"][0]["layer"], consolidated=False)
    b = xr.open_zarr(json.loads((tmp_path / "fresh" / "run.json").read_text())["layers"][0]["layer"],
                     consolidated=False)
    np.testing.assert_allclose(a.embedding.values, b.embedding.values, rtol=1e-5, atol=1e-5)
    assert np.isfinite(a.embedding.values).all(axis=-1).sum() == 34 * 34   # 1 km2 at 30 m patches
    # the shipped checkpoint's layer is about the land, not the patch's place in its tile
    assert position_omega2(b.embedding.values, tile_px=20) < 0.15


def test_a_second_run_into_an_output_being_written_is_refused(tmp_path):
    """Two runs started into one output: the second (other dates: it would mix its tiles into
    the first's layer) is refused at once while the first holds the lease; the first ends
    complete and the lease is gone."""
    out = tmp_path / "shared"
    first = embed("--tiles-per-batch", "1", output=out, wait=False)
    deadline = time.time() + 300
    while not (out / "lease.json").exists():
        assert first.poll() is None, first.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    second = embed("--start", "2021-01-01", output=out)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"output {out} is being written by another run (anysat embed on" in second.stderr
    assert first.wait(timeout=600) == 0, first.stderr.read()
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["request"]["start"] == "2020-11-01" and manifest["tiles"] == 9
    assert not (out / "lease.json").exists()


def test_a_sensor_of_the_users_own_spec_folder_is_embedded(tmp_path):
    """The README's path for a new sensor: a spec in a folder given with --modalities (here
    a copy of the S2 spec under a new name), embedded with a model built for it."""
    from anysat.modalities import modalities_dir

    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "my-sensor.yaml").write_text((modalities_dir() / "sentinel-2-l2a.yaml").read_text()
                                          .replace("name: sentinel-2-l2a", "name: my-sensor")
                                          .replace("aliases: [s2, sentinel-2]", "aliases: [mine]"))
    (specs / "half-written.yaml").write_text("name: half\nbands: [")  # fails only its runs
    result = embed("--modalities", str(specs), "--sensors", "mine", "--model", "tiny",
                   "--tile-size-m", "1200", output=tmp_path / "out")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "run.json").read_text())
    assert manifest["request"]["sensors"] == ["mine"] and manifest["patches_with_data"] > 0
    assert "half-written.yaml" in result.stderr  # warned about, not fatal


def test_a_tile_that_cannot_be_read_fails_alone_and_a_rerun_retries_it(tmp_path):
    """One S2 scene covers only the central tile and its B02 file is missing: that tile
    fails with its id and the asset, the other 8 complete; with the file back, a rerun
    embeds only that tile."""
    import shutil

    from anysat.tiles import Tile
    from tests.conftest import CENTRAL_TILE, DEMO_CATALOG

    catalog = tmp_path / "catalog"
    shutil.copytree(DEMO_CATALOG, catalog)
    scene = catalog / "sentinel-2-l2a" / "S2-L2A-DEMO-20210601"
    item = json.loads((scene / "S2-L2A-DEMO-20210601.json").read_text())
    west, south, east, north = Tile(*CENTRAL_TILE).bbox_lonlat
    lon, lat = (west + east) / 2, (south + north) / 2
    item["bbox"] = [lon - 1e-4, lat - 1e-4, lon + 1e-4, lat + 1e-4]
    item["geometry"] = {"type": "Polygon", "coordinates": [[
        [lon - 1e-4, lat - 1e-4], [lon + 1e-4, lat - 1e-4], [lon + 1e-4, lat + 1e-4],
        [lon - 1e-4, lat + 1e-4], [lon - 1e-4, lat - 1e-4]]]}
    (scene / "S2-L2A-DEMO-20210601.json").write_text(json.dumps(item))
    (scene / "B02.tif").rename(tmp_path / "B02.tif")
    out = tmp_path / "out"

    failed = embed("--catalog", str(catalog / "catalog.json"), output=out)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    central = "32631_600m_1107_9352"
    assert f"1 of 9 tiles failed, the other 8 are done: tile {central}: cannot read sentinel-2-l2a" in failed.stderr
    assert "B02.tif" in failed.stderr and "Rerun the same command" in failed.stderr
    done = sorted(p.stem for p in (out / "tiles").glob("*.json"))
    assert len(done) == 8 and central not in done and not (out / "run.json").exists()

    (tmp_path / "B02.tif").rename(scene / "B02.tif")
    before = {p.name: p.stat().st_mtime_ns for p in (out / "tiles").glob("*.json")}
    retried = embed("--catalog", str(catalog / "catalog.json"), output=out)
    assert retried.returncode == 0, retried.stderr
    assert json.loads((out / "run.json").read_text())["tiles"] == 9
    after = {p.name: p.stat().st_mtime_ns for p in (out / "tiles").glob("*.json")}
    assert set(after) - set(before) == {f"{central}.json"}
    assert all(after[name] == mtime for name, mtime in before.items())   # only the failed one redone
