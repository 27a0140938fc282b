"""Distributed pretraining through the real path: `anysat ingest` writes chips, `anysat
pretrain` trains from them (torchrun with 2 gloo processes on CPU), checkpoints resume."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anysat import load_model
from anysat.model.checkpoint import build_model
from anysat.modalities import resolve_sensors
from anysat.tiles import Tile
from anysat.train.chips import read_chip, read_index, write_chip, write_index
from anysat.train.state import load_latest
from anysat.train.stream import ChipStream, StreamConfig, chip_table
from tests.conftest import ROOT

pytestmark = pytest.mark.integration
# A small model and one crop/patch size: the loss of a batch depends much on its patch size.
SMALL = ["--dim", "64", "--depth", "1", "--batch-size", "4", "--crop-sizes-m", "120",
         "--patch-sizes-m", "30", "--lr", "1e-3"]


def anysat(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "anysat.cli", *args], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, **(env or {})})
    if check and result.returncode:
        raise AssertionError(f"anysat {' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def chips(tmp_path_factory) -> str:
    """The demo catalog as 240 m chips (25 chips, S2 + S1 + DEM), through `anysat ingest`."""
    store = str(tmp_path_factory.mktemp("chips") / "demo.zarr")
    summary = json.loads(anysat("ingest", "--demo", "--chip-size-m", "240", "--store", store,
                                "--tiles-per-batch", "8").stdout)
    assert summary["chips"] == summary["chips_in_store"] == 25
    return store


def rank_logs(out: Path) -> dict[int, list[dict]]:
    return {r: [json.loads(line) for line in (out / "logs" / f"rank-{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)}


def test_ingest_rerun_skips_complete_chips_and_keeps_the_index(chips):
    summary = json.loads(anysat("ingest", "--demo", "--chip-size-m", "240", "--store", chips).stdout)
    assert summary["written"] == 0 and summary["skipped"] == 25 and summary["chips_in_store"] == 25
    index = read_index(chips)
    assert list(index.columns[:5]) == ["id", "epsg", "bounds", "size_m", "sensors"]
    assert set(index.sensors.iloc[0]) == {"sentinel-2-l2a", "sentinel-1", "copernicus-dem"}
    assert json.loads(index.shapes.iloc[0])["sentinel-2-l2a"] == [12, 9, 24, 24]
    # the ingest's saved plan (chips and their items) is reused, not made again
    plans = list((Path(chips) / "plans").glob("*/plan.json"))
    assert len(plans) == 1 and json.loads(plans[0].read_text())["zones"][0]["tiles"] == 25
    # read in the squares the shipped checkpoint's chips were read in (its DEM depends on them)
    assert json.loads(plans[0].read_text())["read_side"] == 4


def test_two_ranks_stay_identical_read_disjoint_chips_and_learn(chips, tmp_path):
    out = tmp_path / "run"
    anysat("pretrain", "--chips", chips, "--out", str(out), "--nproc", "2", "--workers", "1",
           "--steps", "60", "--log-every", "5", "--checkpoint-every", "30", *SMALL)
    logs = rank_logs(out)
    # identical parameters (a checksum of every weight) on both ranks after every logged step
    checks = {r: [row["checksum"] for row in rows if "checksum" in row] for r, rows in logs.items()}
    assert len(checks[0]) == 12 and checks[0] == checks[1]
    # each epoch every chip of a rank's share once, and the two shares disjoint
    seen = {r: [c for row in rows for c in row["chips"]] for r, rows in logs.items()}
    shares = {0: 13, 1: 12}  # 25 chips, every other one
    for epoch in range(2):
        a, b = (seen[r][epoch * shares[r]:(epoch + 1) * shares[r]] for r in (0, 1))
        assert len(set(a)) == len(a) and len(set(b)) == len(b)
        assert not set(a) & set(b) and len(set(a) | set(b)) == 25
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = (sum(m["loss"] for m in part) / 3 for part in (metrics[:3], metrics[-3:]))
    assert last < first - 0.05, [m["loss"] for m in metrics]
    # and without collapsing (the floors of the single-process test)
    assert metrics[-1]["embedding_std"] > 0.005 and metrics[-1]["rankme"] > 3
    model = load_model(str(out / "model"))
    assert model.config.dim == 64
    provenance = json.loads((out / "model" / "config.json").read_text())["provenance"]
    assert provenance["world"] == 2 and provenance["command"].startswith("anysat pretrain")


def test_gradient_accumulation_across_two_ranks(chips, tmp_path):
    out = tmp_path / "run"
    anysat("pretrain", "--chips", chips, "--out", str(out), "--nproc", "2", "--steps", "3",
           "--accumulation", "2", "--log-every", "1", *SMALL)
    logs = rank_logs(out)
    assert [row["checksum"] for row in logs[0]] == [row["checksum"] for row in logs[1]]
    assert all(len(row["chips"]) == 2 * 4 for rows in logs.values() for row in rows)  # 2 micro-batches
    state = load_latest(str(out))["state"]
    assert state["step"] == 3 and state["data"]["accumulation"] == 2


def test_a_killed_run_resumes_to_the_same_weights(chips, tmp_path):
    args = ["--chips", chips, "--steps", "40", "--log-every", "5", "--checkpoint-every", "5",
            "--workers", "1", *SMALL]
    anysat("pretrain", "--out", str(tmp_path / "whole"), *args)
    killed = tmp_path / "killed"
    job = subprocess.Popen([sys.executable, "-m", "anysat.cli", "pretrain", "--out", str(killed), *args],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = killed / "checkpoints" / "step-00000010" / "manifest.json"
    deadline = time.time() + 600
    while not manifest.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert not (killed / "model").exists(), "the run ended before it could be killed"
    resumed = anysat("pretrain", "--out", str(killed), *args)
    assert "resuming from" in resumed.stderr
    whole = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    again = load_file(killed / "model" / "model.safetensors")
    assert whole.keys() == again.keys()
    for key in whole:  # bitwise equal on CPU: same batches, same optimizer state, same RNG
        assert torch.equal(whole[key], again[key]), key
    curve = [json.loads(line)["loss"] for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    curve_again = [json.loads(line)["loss"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert curve_again == curve


def test_chips_on_s3_train_and_checkpoint_on_s3(chips, s3_endpoint):
    store, out = "s3://anysat/chips/train-demo.zarr", "s3://anysat/runs/s3-run"
    anysat("ingest", "--demo", "--bbox", "5.3245,50.6318,5.3275,50.6340", "--chip-size-m", "120",
           "--store", store)
    assert len(read_index(store)) >= 4
    # a loader worker forked after this process's S3 client ran (reading the index)
    anysat("pretrain", "--chips", store, "--out", out, "--steps", "4", "--checkpoint-every", "2",
           "--log-every", "2", "--workers", "1", *SMALL)
    assert load_latest(out)["state"]["step"] == 4
    assert load_model(f"{out}/model").config.dim == 64


# -- bad input: one clear error each, and no checkpoint left as the latest --------------------

def test_an_empty_store_is_a_clear_error(tmp_path):
    (tmp_path / "empty.zarr").mkdir()
    result = anysat("pretrain", "--chips", str(tmp_path / "empty.zarr"), "--out",
                    str(tmp_path / "run"), "--steps", "2", check=False)
    assert result.returncode == 2 and "has no complete chips" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "checkpoints").exists()


def test_chips_without_a_sensor_the_model_needs(chips, tmp_path):
    result = anysat("pretrain", "--chips", chips, "--out", str(tmp_path / "run"), "--sensors",
                    "s2,s1,landsat", "--steps", "2", check=False)
    assert result.returncode == 2 and "has sensor(s) ['landsat-c2-l2']" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_chips_whose_shapes_disagree(chips, tmp_path):
    store = str(tmp_path / "bad.zarr")
    row = read_index(chips).iloc[0]
    batch = read_chip(chips, row.id)
    batch["sentinel-1"] = batch["sentinel-1"][..., :20, :20]     # 200 m of S1 in a 240 m chip
    batch["sentinel-1_mask"] = batch["sentinel-1_mask"][..., :20, :20]
    tile = Tile(int(row.epsg), 0, 0, float(row.size_m))
    write_index(store, [write_chip(store, tile, batch, resolve_sensors(["s2", "s1", "dem"]))])
    result = anysat("pretrain", "--chips", store, "--out", str(tmp_path / "run"), "--steps", "2",
                    check=False)
    assert result.returncode == 2 and "shapes disagree" in result.stderr and "sentinel-1" in result.stderr


def test_an_unwritable_checkpoint_uri(chips, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    result = anysat("pretrain", "--chips", chips, "--out", str(tmp_path / "file" / "run"),
                    "--steps", "2", check=False)
    assert result.returncode == 2 and "cannot write to output" in result.stderr


def test_a_checkpoint_of_another_model_config_is_refused_and_kept(chips, tmp_path):
    out = str(tmp_path / "run")
    anysat("pretrain", "--chips", chips, "--out", out, "--steps", "2", "--checkpoint-every", "2", *SMALL)
    before = (tmp_path / "run" / "checkpoints" / "step-00000002" / "manifest.json").read_bytes()
    result = anysat("pretrain", "--chips", chips, "--out", out, "--steps", "4",
                    *[a if a != "64" else "32" for a in SMALL], check=False)
    assert result.returncode == 2 and "another model config" in result.stderr and "dim" in result.stderr
    assert load_latest(out)["state"]["step"] == 2
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "manifest.json").read_bytes() == before


def test_a_partial_or_corrupt_checkpoint_is_never_the_latest(chips, tmp_path):
    out = tmp_path / "run"
    anysat("pretrain", "--chips", chips, "--out", str(out), "--steps", "4", "--checkpoint-every", "2", *SMALL)
    newest = out / "checkpoints" / "step-00000004"
    (newest / "target.safetensors").write_bytes(b"corrupted")       # bytes rotted
    partial = out / "checkpoints" / "step-00000006"                  # died before its manifest
    partial.mkdir()
    (partial / "encoder.safetensors").write_bytes(b"half")
    assert load_latest(str(out))["state"]["step"] == 2


def test_the_stream_gives_the_same_batches_whatever_the_loader_workers_and_resumes(chips):
    model = build_model("tiny", resolve_sensors(["s2", "s1", "dem"]), dim=32, depth=1)
    table = chip_table([chips], model.modalities)
    config = StreamConfig(batch_size=3, shuffle_buffer=5)

    def batches(workers: int, start: int, n: int) -> list[dict]:
        stream = ChipStream(table, model.modalities, config, rank=1, world=2, start=start)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
        out = []
        for item in loader:
            out.append(item)
            if len(out) == n:
                return out

    plain, parallel, resumed = batches(0, 0, 6), batches(2, 0, 6), batches(0, 4, 2)
    for a, b in zip(plain, parallel):
        assert a["chips"] == b["chips"] and a["patch_size_m"] == b["patch_size_m"]
        assert all(torch.equal(a["batch"][k], b["batch"][k]) for k in a["batch"])
        assert torch.equal(a["masks"][0], b["masks"][0])
    assert [b["chips"] for b in resumed] == [b["chips"] for b in plain[4:6]]
    # rectangular batches: one crop size, dates padded with masked steps
    first = plain[0]["batch"]
    name = next(k for k in first if not k.endswith(("_mask", "_dates")))
    assert first[name].shape[0] == 3 and first[f"{name}_mask"].shape[:2] == first[name].shape[:2]


def test_ranks_draw_the_same_batch_shape_from_different_chips(chips):
    """DDP waits for the slowest rank at every step: batch g has one crop size, patch size and
    sensor subset on every rank (drawn per rank, a step cost the largest of the draws)."""
    model = build_model("tiny", resolve_sensors(["s2", "s1", "dem"]), dim=32, depth=1)
    table = chip_table([chips], model.modalities)
    config = StreamConfig(batch_size=2, crop_sizes_m=(60.0, 120.0, 240.0), sensor_drop=0.5)

    def shape(item: dict) -> tuple:
        sensors = sorted(k for k in item["batch"] if not k.endswith(("_mask", "_dates")))
        return item["patch_size_m"], item["batch"][sensors[0]].shape[-1], tuple(sensors)

    ranks = [list(itertools.islice(ChipStream(table, model.modalities, config, rank=r, world=2), 12))
             for r in (0, 1)]
    assert [shape(a) for a in ranks[0]] == [shape(b) for b in ranks[1]]
    assert len({shape(a) for a in ranks[0]}) > 2                      # the shapes still vary
    assert all(set(a["chips"]).isdisjoint(b["chips"]) for a, b in zip(*ranks))
