"""anysat.load_model from object storage: a checkpoint written to and read from a real
S3-compatible server on loopback."""

import pytest
import torch

import anysat
from anysat.errors import CheckpointError
from anysat.modalities import resolve_sensors
from anysat.model import build_model, save_checkpoint


def test_load_model_from_s3_uri(s3_endpoint):
    specs = resolve_sensors(["s2", "naip"])
    model = build_model("tiny", specs, seed=1)
    save_checkpoint(model, "s3://anysat/checkpoints/tiny-s2-naip", provenance={"test": True})
    loaded = anysat.load_model("s3://anysat/checkpoints/tiny-s2-naip")
    assert loaded.config == model.config
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match="no checkpoint at s3://anysat/checkpoints/missing"):
        anysat.load_model("s3://anysat/checkpoints/missing")
