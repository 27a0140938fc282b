"""The `ingest` and `pretrain` flows on a real Prefect server: chips written by Dask workers,
then a torchrun job (2 gloo processes) whose loss and collapse monitors the flow reports."""

from __future__ import annotations

import pytest
from prefect.artifacts import Artifact
from prefect.settings import PREFECT_API_URL, temporary_settings

from anysat import load_model
from anysat.request import RegionRequest
from anysat.train.chips import read_index
from anysat.train.trainer import TrainConfig
from tests.conftest import SMALL_BBOX

pytestmark = pytest.mark.integration


def test_ingest_then_pretrain_flows(prefect_api, tmp_path):
    from flows.ingest import ingest
    from flows.pretrain import pretrain

    store, out = str(tmp_path / "chips.zarr"), str(tmp_path / "run")
    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        request = RegionRequest.build(start="2020-11-01", end="2021-10-31", bbox=SMALL_BBOX,
                                      tile_size_m=120.0, output_uri=store)   # chips of 120 m
        state = ingest(request, return_state=True)
        assert state.is_completed()
        summary = state.result()
        assert summary["chips"] == summary["chips_in_store"] == len(read_index(store)) >= 4
        config = TrainConfig(chips=[store], out=out, steps=6, batch_size=2, dim=32, depth=1,
                             log_every=2, crop_sizes_m=(120.0,), patch_sizes_m=(30.0,))
        state = pretrain(config, nproc=2, return_state=True)
        assert state.is_completed()
        result = state.result()
        curve = Artifact.get("pretrain-curve")
    assert result["world"] == 2 and [e["step"] for e in result["curve"]] == [2, 4, 6]
    assert all(e["rankme"] > 1 and e["embedding_std"] > 0 and e["samples_per_s"] > 0
               for e in result["curve"])
    assert curve is not None and "rankme" in curve.data
    assert load_model(result["model"]).config.dim == 32


def test_pretrain_flow_fails_with_the_jobs_reason(prefect_api, tmp_path):
    from flows.pretrain import pretrain

    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        config = TrainConfig(chips=[str(tmp_path / "none.zarr")], out=str(tmp_path / "run"), steps=2)
        state = pretrain(config, return_state=True)
    assert state.is_failed()
    with pytest.raises(RuntimeError, match="has no complete chips"):
        state.result()


def test_pretrain_flow_refuses_options_out_of_range_before_the_job(prefect_api, tmp_path):
    from anysat.errors import AnySatError
    from flows.pretrain import pretrain

    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        config = TrainConfig(chips=[str(tmp_path / "none.zarr")], out=str(tmp_path / "run"),
                             steps=2, log_every=0)
        state = pretrain(config, return_state=True)
    assert state.is_failed()
    with pytest.raises(AnySatError, match=r"log_every \(--log-every\) is 0"):
        state.result()
