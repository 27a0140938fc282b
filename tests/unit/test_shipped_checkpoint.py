"""The checkpoint that ships: loads by name, says how it was made, fp16 storage is faithful."""

from __future__ import annotations

import json

import torch

from anysat import load_model
from anysat.model import build_model, save_checkpoint
from anysat.model.checkpoint import shipped_checkpoints
from anysat.modalities import resolve_sensors


def test_demo_checkpoint_loads_by_name_with_its_provenance():
    assert "demo" in shipped_checkpoints()
    model = load_model("demo")
    assert set(model.modalities) == {"sentinel-2-l2a", "sentinel-1", "copernicus-dem"}
    meta = json.loads((shipped_checkpoints()["demo"] / "config.json").read_text())
    provenance = meta["provenance"]
    assert provenance["steps"] == provenance["recipe"]["steps"] and len(meta["sha256"]) == 64
    # made through the real path: chips by `anysat ingest`, `anysat pretrain` on 2 processes
    assert provenance["world"] == 2 and "--nproc 2" in provenance["command"]
    assert [c.rsplit("/", 1)[-1] for c in provenance["data"]["chips"]] == ["demo.zarr", "bigearthnet.zarr"]
    curve = provenance["curve"]
    assert curve[-1]["step"] == provenance["steps"]
    assert {"probe_rankme", "probe_effective_rank", "probe_std"} <= set(curve[-1])
    assert int(model.statistics_updates) == provenance["steps"]       # output statistics kept
    assert (model.patch_std > 0).all() and (model.tile_std > 0).all()


def test_fp16_checkpoint_is_faithful_to_the_fp32_model(tmp_path):
    model = build_model("tiny", resolve_sensors(["s2", "s1"]), seed=3)
    save_checkpoint(model, str(tmp_path / "half"), dtype=torch.float16)
    half = load_model(str(tmp_path / "half"))
    assert (tmp_path / "half" / "model.safetensors").stat().st_size < 0.55 * sum(
        p.numel() * 4 for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    batch = {"sentinel-2-l2a": torch.rand(2, 4, 9, 6, 6, generator=g) * 0.3,
             "sentinel-2-l2a_dates": torch.tensor([[18600.0, 18630, 18660, 18690]] * 2),
             "sentinel-1": torch.randn(2, 4, 2, 6, 6, generator=g) * 2 - 12,
             "sentinel-1_dates": torch.tensor([[18600.0, 18630, 18660, 18690]] * 2)}
    with torch.inference_mode():
        torch.testing.assert_close(half(batch, 20, "tile"), model(batch, 20, "tile"),
                                   rtol=2e-2, atol=2e-2)
