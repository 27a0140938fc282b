"""Hostile and mistaken input to `anysat embed`, table-driven: each case must end with exit
status 2 and one `anysat: error:` line that names the value at fault, never a traceback, and
before any output is written."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest

from anysat import cli
from anysat.model.checkpoint import build_model, config_sha256, save_checkpoint, shipped_checkpoints
from anysat.modalities import resolve_sensors

DEMO = ["--start", "2020-11-01", "--end", "2021-10-31"]
BBOX = ["--bbox", "5.3189,50.6286,5.3334,50.6378", *DEMO]


def polygon(ring: list[list[float]]) -> dict:
    return {"type": "Polygon", "coordinates": [ring]}


GEOJSON = {
    "point.geojson": {"type": "Point", "coordinates": [5.32, 50.63]},
    "line.geojson": {"type": "Feature", "properties": {},
                     "geometry": {"type": "LineString", "coordinates": [[5.32, 50.63], [5.33, 50.64]]}},
    "empty.geojson": {"type": "FeatureCollection", "features": []},
    "bowtie.geojson": polygon([[5.32, 50.63], [5.33, 50.64], [5.33, 50.63], [5.32, 50.64], [5.32, 50.63]]),
    "projected.geojson": polygon([[660000, 5610000], [661000, 5610000], [661000, 5611000], [660000, 5610000]]),
    "antimeridian.geojson": polygon([[179, -17], [-179, -17], [-179, -16], [179, -16], [179, -17]]),
    "mercator.geojson": {"type": "FeatureCollection",
                         "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::3857"}},
                         "features": [{"type": "Feature", "properties": {},
                                       "geometry": polygon([[5, 50], [5.1, 50], [5.1, 50.1], [5, 50]])}]},
    "garbage.geojson": {"type": "Polygon", "coordinates": "not coordinates"},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Bad GeoJSON, bad checkpoints and a few other files the cases point at."""
    root = tmp_path_factory.mktemp("bad-input")
    for name, content in GEOJSON.items():
        (root / name).write_text(json.dumps(content))
    (root / "not-json.geojson").write_text("{this is not json")
    demo = shipped_checkpoints()["demo"]
    meta = json.loads((demo / "config.json").read_text())

    def checkpoint(name: str, config_text: str | None = None, weights: bytes | None = None) -> None:
        folder = root / name
        shutil.copytree(demo, folder)
        if weights is not None:
            (folder / "model.safetensors").write_bytes(weights)
        if config_text is not None:
            (folder / "config.json").write_text(config_text)

    def signed(config: dict, **fields) -> str:  # a config re-signed, as an attacker would
        return json.dumps({**meta, **fields, "config": config, "config_sha256": config_sha256(config)})

    checkpoint("ckpt-not-json", "{'config': nope")
    checkpoint("ckpt-no-keys", json.dumps({"sha256": meta["sha256"]}))
    checkpoint("ckpt-edited", json.dumps({**meta, "config": {**meta["config"], "depth": 3}}))
    checkpoint("ckpt-unknown-key", signed({**meta["config"], "layers": 12}))
    checkpoint("ckpt-missing-key", signed({k: v for k, v in meta["config"].items() if k != "modalities"}))
    checkpoint("ckpt-huge", signed({**meta["config"], "dim": 1_000_000}))
    checkpoint("ckpt-heads", signed({**meta["config"], "heads": 5}))
    checkpoint("ckpt-bad-std", signed({**meta["config"], "modalities": [
        {**meta["config"]["modalities"][0], "std": [0.0] * 9}, *meta["config"]["modalities"][1:]]}))
    # another model's config, re-signed: the weights no longer fit it
    checkpoint("ckpt-other-config", signed({**meta["config"], "depth": 3}))
    # a pickle under the safetensors name, its sha256 recorded: parsed, never unpickled
    payload = pickle.dumps({"weights": [1, 2, 3]})
    checkpoint("ckpt-pickle", signed(meta["config"], sha256=hashlib.sha256(payload).hexdigest()),
               weights=payload)
    checkpoint("ckpt-tampered", weights=b"\0" * 64)
    (root / "model-file.safetensors").write_bytes(b"\0" * 16)
    save_checkpoint(build_model("tiny", resolve_sensors(["s2"])), str(root / "ckpt-s2-only"))
    (root / "labels.csv").write_text("lon,lat,label\n5.32,50.63,a\n")
    (root / "occupied").write_text("a file where the output folder should be")
    return root


# (case id, extra CLI arguments, text the error must contain); {root} is the files fixture
CASES = [
    ("bbox-three-numbers", ["--bbox", "5,50,6", *DEMO], "bbox"),
    ("bbox-not-numbers", ["--bbox", "a,b,c,d", *DEMO], "'a,b,c,d'"),
    ("bbox-south-north-swapped", ["--bbox", "5.3,50.7,5.4,50.6", *DEMO], "(5.3, 50.7, 5.4, 50.6)"),
    ("bbox-longitude-200", ["--bbox", "200,50,201,51", *DEMO], "(200.0, 50.0, 201.0, 51.0)"),
    ("bbox-latitude-95", ["--bbox", "5,89,6,95", *DEMO], "(5.0, 89.0, 6.0, 95.0)"),
    ("bbox-nan", ["--bbox", "nan,50,6,51", *DEMO], "nan"),
    ("bbox-north-of-utm", ["--bbox", "10,83,20,86", *DEMO], "reaches 86 N: tiles are laid on UTM"),
    ("bbox-antarctica", ["--bbox", "10,-85,20,-70", *DEMO], "reaches 85 S: tiles are laid on UTM"),
    ("no-region", DEMO, "give exactly one of bbox or geojson"),
    ("bbox-and-geojson", [*BBOX, "--geojson", "{root}/point.geojson"], "give exactly one of bbox or geojson"),
    ("geojson-missing-file", ["--geojson", "{root}/nowhere.geojson", *DEMO], "nowhere.geojson"),
    ("geojson-not-json", ["--geojson", "{root}/not-json.geojson", *DEMO], "not-json.geojson"),
    ("geojson-point", ["--geojson", "{root}/point.geojson", *DEMO], "geojson is a Point"),
    ("geojson-linestring", ["--geojson", "{root}/line.geojson", *DEMO], "geojson is a LineString"),
    ("geojson-empty", ["--geojson", "{root}/empty.geojson", *DEMO], "geojson holds no geometry"),
    ("geojson-self-intersecting", ["--geojson", "{root}/bowtie.geojson", *DEMO], "Self-intersection"),
    ("geojson-projected", ["--geojson", "{root}/projected.geojson", *DEMO], "(660000.0, 5610000.0"),
    ("geojson-antimeridian", ["--geojson", "{root}/antimeridian.geojson", *DEMO], "spans 358.0 degrees"),
    ("geojson-other-crs", ["--geojson", "{root}/mercator.geojson", *DEMO], "EPSG::3857"),
    ("geojson-bad-coordinates", ["--geojson", "{root}/garbage.geojson", *DEMO], "not coordinates"),
    ("start-year-only", ["--bbox", "5.3,50.6,5.4,50.7", "--start", "2020", "--end", "2021-01-01"], "'2020'"),
    ("start-unix-time", ["--bbox", "5.3,50.6,5.4,50.7", "--start", "1609459200", "--end", "2021-01-02"], "'1609459200'"),
    ("start-month-13", ["--bbox", "5.3,50.6,5.4,50.7", "--start", "2021-13-01", "--end", "2021-12-31"], "'2021-13-01'"),
    ("start-after-end", ["--bbox", "5.3,50.6,5.4,50.7", "--start", "2021-06-01", "--end", "2021-01-01"], "start 2021-06-01 is after end 2021-01-01"),
    ("no-end", ["--bbox", "5.3,50.6,5.4,50.7", "--start", "2021-01-01"], "end"),
    ("unknown-sensor", [*BBOX, "--sensors", "s2,s7"], "s7"),
    ("no-sensor", [*BBOX, "--sensors", ","], "name at least one sensor"),
    ("patch-zero", [*BBOX, "--patch-size-m", "0"], "patch_size_m"),
    ("patch-negative", [*BBOX, "--patch-size-m", "-30"], "-30"),
    ("patch-not-multiple-of-gsd", [*BBOX, "--patch-size-m", "25", "--tile-size-m", "600"], "patch_size_m 25"),
    ("tile-infinite", [*BBOX, "--tile-size-m", "inf"], "tile_size_m: Input should be a finite number (got inf)"),
    ("tile-nan", [*BBOX, "--tile-size-m", "nan"], "tile_size_m: Input should be a finite number (got nan)"),
    ("tile-3000-km", [*BBOX, "--tile-size-m", "3000000"], "tile_size_m 3,000,000"),
    ("tile-not-multiple-of-patch", [*BBOX, "--tile-size-m", "610"], "tile_size_m 610"),
    ("time-bin-negative", [*BBOX, "--time-bin=-1D"], "'-1D'"),
    ("time-bin-unknown", [*BBOX, "--time-bin", "fortnightly"], "'fortnightly'"),
    ("max-cloud-150", [*BBOX, "--max-cloud", "150"], "max_cloud"),
    ("batch-size-zero", [*BBOX, "--batch-size", "0"], "batch_size"),
    ("tiles-per-batch-zero", [*BBOX, "--tiles-per-batch", "0"], "tiles_per_batch"),
    ("device-tpu", [*BBOX, "--device", "tpu"], "device 'tpu'"),
    ("device-cuda-absent", [*BBOX, "--device", "cuda:0"], "device 'cuda:0'"),
    ("fp16-on-cpu", [*BBOX, "--dtype", "fp16"], "dtype fp16"),
    ("unknown-product", [*BBOX, "--products", "cog,pdf"], "'pdf'"),
    ("classes-without-labels", [*BBOX, "--products", "classes"], "labels"),
    ("labels-missing-file", [*BBOX, "--products", "classes", "--labels", "{root}/nowhere.csv"], "nowhere.csv"),
    ("clusters-one", [*BBOX, "--products", "clusters", "--clusters", "1"], "clusters"),
    ("unknown-catalog-name", [*BBOX, "--catalog", "planetary"], "'planetary'"),
    ("static-catalog-missing", [*BBOX, "--catalog", "{root}/nowhere/catalog.json"], "nowhere/catalog.json"),
    ("output-is-a-file", [*BBOX, "--output", "{root}/occupied"], "occupied"),
    ("model-unknown-name", [*BBOX, "--model", "giant"], "giant"),
    ("model-is-a-file", [*BBOX, "--model", "{root}/model-file.safetensors"], "model-file.safetensors is a file"),
    ("checkpoint-config-not-json", [*BBOX, "--model", "{root}/ckpt-not-json"], "config.json is not JSON"),
    ("checkpoint-config-lacks-keys", [*BBOX, "--model", "{root}/ckpt-no-keys"], "needs `config`, `sha256`"),
    ("checkpoint-config-edited", [*BBOX, "--model", "{root}/ckpt-edited"], "does not match the config_sha256"),
    ("checkpoint-unknown-key", [*BBOX, "--model", "{root}/ckpt-unknown-key"], "unknown keys ['layers']"),
    ("checkpoint-missing-key", [*BBOX, "--model", "{root}/ckpt-missing-key"], "lacks keys ['modalities']"),
    ("checkpoint-absurd-size", [*BBOX, "--model", "{root}/ckpt-huge"], "dim is 1000000"),
    ("checkpoint-heads", [*BBOX, "--model", "{root}/ckpt-heads"], "heads 5"),
    ("checkpoint-zero-std", [*BBOX, "--model", "{root}/ckpt-bad-std"], "std: every value must be positive"),
    ("checkpoint-other-models-config", [*BBOX, "--model", "{root}/ckpt-other-config"], "do not fit its config.json"),
    ("checkpoint-pickle", [*BBOX, "--model", "{root}/ckpt-pickle"], "is not a safetensors file"),
    ("checkpoint-tampered-weights", [*BBOX, "--model", "{root}/ckpt-tampered"], "do not match the sha256"),
    ("checkpoint-without-sensor", [*BBOX, "--model", "{root}/ckpt-s2-only"], "sentinel-1"),
    ("quantize-int4", [*BBOX, "--quantize", "int4"], "'int4'"),
]


@pytest.mark.parametrize("case,args,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_error_naming_it(files, tmp_path, capsys, case, args, expected):
    args = [a.replace("{root}", str(files)) for a in args]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out")]
    try:
        code = cli.main(["embed", *args])
    except SystemExit as exc:  # argparse refuses its own way: usage + one error line, exit 2
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected.replace("{root}", str(files)) in lines[0], lines[0]
    # refused before any work: no tile embedded, no layer made
    assert not any((tmp_path / "out").glob("tiles/*")) and not any((tmp_path / "out").glob("embeddings/*"))


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40


def test_a_western_bbox_is_not_taken_for_an_option(capsys):
    """`--bbox -74,40.7,-73.9,40.8` (a negative first number) reaches the estimate."""
    assert cli.main(["plan", "--estimate", "--bbox", "-74,40.7,-73.9,40.8", "--tile-size-m", "6000"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["zones"] == 1


def test_an_s3_model_without_credentials_says_where_credentials_come_from(tmp_path, capsys,
                                                                         monkeypatch):
    import s3fs

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    s3fs.S3FileSystem.clear_instance_cache()
    code = cli.main(["embed", *BBOX, "--model", "s3://no-such-bucket/checkpoint",
                     "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert ("cannot read checkpoint s3://no-such-bucket/checkpoint: NoCredentialsError" in err
            and "AWS_ACCESS_KEY_ID" in err), err


@pytest.mark.parametrize("parameters", [{"blocks_per_run": 0}, {"max_concurrent_runs": 0}])
def test_a_continental_run_of_no_blocks_at_once_is_refused(parameters, tmp_path):
    from anysat.errors import RequestError
    from anysat.request import RegionRequest
    from flows.continental import continental

    request = RegionRequest.build(start="2021-01-01", end="2021-06-30",
                                  bbox=(5.3, 50.6, 5.31, 50.61), output_uri=str(tmp_path))
    with pytest.raises(RequestError, match="must be 1 or more"):
        continental.fn(request, **parameters)
    assert not any(tmp_path.iterdir())  # refused before any plan or lease


@pytest.mark.parametrize("deployment,expected", [("nope/none", "no deployment 'nope/none'"),
                                                 ("block", "expected flow-name/deployment-name")])
def test_a_continental_run_of_a_deployment_that_is_not_there_is_refused(
        deployment, expected, prefect_api, tmp_path):
    """Before the plan (hours for a continent), not at the first run it starts."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from anysat.errors import RequestError
    from anysat.request import RegionRequest
    from flows.continental import continental

    request = RegionRequest.build(start="2021-01-01", end="2021-06-30",
                                  bbox=(5.3, 50.6, 5.31, 50.61), output_uri=str(tmp_path))
    with temporary_settings(updates={PREFECT_API_URL: prefect_api}), \
            pytest.raises(RequestError, match=expected):
        continental.fn(request, deployment=deployment)
    assert not any(tmp_path.iterdir())


def test_an_estimate_with_tiles_no_run_could_take_is_refused(capsys):
    """The estimate checks sizes as a run does: 2,560 m is no whole number of 30 m patches."""
    assert cli.main(["plan", "--estimate", "--bbox=-10,35,30,70", "--tile-size-m", "2560"]) == 2
    assert "tile_size_m 2560 is not a multiple of patch_size_m 30" in capsys.readouterr().err


PRETRAIN_CASES = [  # (options, text the one error line must contain)
    (["--lr", "-1"], "lr (--lr) is -1.0: expected a positive number"),
    (["--lr", "nan"], "lr (--lr) is nan"),
    (["--weight-decay", "-0.1"], "weight_decay (--weight-decay) is -0.1"),
    (["--checkpoint-every", "0"], "checkpoint_every (--checkpoint-every) is 0"),
    (["--log-every", "0"], "log_every (--log-every) is 0"),
    (["--keep-checkpoints", "0"], "keep_checkpoints (--keep-checkpoints) is 0"),
    (["--warmup-steps", "-1"], "warmup_steps (--warmup-steps) is -1"),
    (["--workers", "-1"], "workers (--workers) is -1"),
    (["--shuffle-buffer", "0"], "shuffle_buffer (--shuffle-buffer) is 0"),
    (["--sensor-drop", "1.5"], "sensor_drop (--sensor-drop) is 1.5: expected a chance from 0 to 1"),
    (["--date-drop", "-0.1"], "date_drop (--date-drop) is -0.1"),
    (["--crop-sizes-m", "60,-120"], "crop_sizes_m (--crop-sizes-m) is (60.0, -120.0)"),
    (["--device", "tpu"], "device 'tpu' is not auto, cpu, cuda or cuda:N"),
    (["--device", "cuda"], "this torch sees no CUDA device"),
    (["--steps", "0"], "steps (--steps) is 0"),
    (["--seed", "-1"], "seed (--seed) is -1"),
    (["--nproc", "0"], "argument --nproc: expected a whole number of at least 1, got '0'"),
    (["--threads", "0"], "argument --threads: expected a whole number of at least 1, got '0'"),
]


@pytest.mark.parametrize("options,expected", PRETRAIN_CASES, ids=[" ".join(c[0]) for c in PRETRAIN_CASES])
def test_pretrain_options_out_of_range_are_one_clear_error(options, expected, tmp_path, capsys):
    """Refused before any chip is read (the store does not exist) or process started: no
    traceback from the optimiser, no modulo by zero at the first log step."""
    try:
        code = cli.main(["pretrain", "--chips", str(tmp_path / "nowhere.zarr"), "--out",
                         str(tmp_path / "run"), *options])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dim,expected", [(7, "config dim is 7: expected an integer from 8"),
                                          (12, "config dim 12 is not a multiple of temporal_heads 16")])
def test_a_width_the_model_cannot_take_is_refused_before_it_is_built(dim, expected):
    """`pretrain --dim 12` failed in the first forward (a reshape of 16 temporal heads)."""
    from anysat.model.checkpoint import build_model
    from anysat.modalities import resolve_sensors

    with pytest.raises(ValueError, match=expected):
        build_model("tiny", resolve_sensors(["s2", "s1"]), dim=dim)


def test_similar_takes_a_western_point_and_names_what_it_cannot_read(tmp_path, capsys):
    """`--point -74,40.7` was rewritten to `--bbox=...` (argparse: --point is required)."""
    (tmp_path / "hosts").write_text("not a layer")
    for args, expected in [(["--layer", str(tmp_path / "none.zarr")], "no embedding layer at"),
                           (["--layer", str(tmp_path / "hosts")], "no embedding layer at"),
                           (["--vectors", str(tmp_path / "hosts")], "cannot read patch vectors")]:
        assert cli.main(["similar", *args, "--point", "-74.0,40.7"]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err


@pytest.mark.parametrize("args,expected", [
    (["evaluate", "--max-points", "0"], "--max-points: expected a whole number of at least 1"),
    (["evaluate", "--device", "tpu"], "device 'tpu' is not cpu, cuda or cuda:N"),
    (["embed-points", "points.parquet", "--out", "out.parquet", "--batch-size", "0"],
     "--batch-size: expected a whole number of at least 1"),
    (["similar", "--layer", "layer.zarr", "--point", "5.3,50.6", "-k", "-2"],
     "-k: expected a whole number of at least 1")])
def test_evaluate_and_points_options_out_of_range(args, expected, tmp_path, capsys):
    """`--max-points 0` ran the whole evaluation; `--device tpu` was torch's traceback;
    `similar -k 0` printed nothing and `-k -2` all but two patches."""
    try:
        code = cli.main([*args, *(["--output", str(tmp_path)] if args[0] == "evaluate" else [])])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("rate", ["0", "-3", "nan"])
def test_an_estimate_at_no_throughput_is_refused(rate, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["plan", "--estimate", "--bbox=5,50,6,51", f"--km2-per-s={rate}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert f"--km2-per-s: expected a positive number, got '{rate}'" in err


def test_a_background_request_that_failed_is_one_line_not_a_traceback(caplog):
    """An S3 PUT still in flight under zarr when the store goes away fails in a task nobody
    awaits; asyncio would log its traceback beside the run's own clear error."""
    import asyncio
    import gc

    import anysat.storage  # noqa: F401 - installs the filter

    async def put():
        raise ConnectionResetError("Cannot write to closing transport")

    async def run():
        asyncio.ensure_future(put())
        await asyncio.sleep(0.01)

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        asyncio.run(run())
        gc.collect()
    [record] = [r for r in caplog.records  # (gc may also find other tests' unclosed sessions)
                if r.name == "asyncio" and "closing transport" in r.getMessage()]
    assert record.levelname == "WARNING" and record.exc_info is None
    assert record.getMessage() == ("a background request failed: ConnectionResetError: "
                                   "Cannot write to closing transport")
