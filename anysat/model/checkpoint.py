"""Checkpoints: safetensors weights + config.json (with sha256). Loading never unpickles."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .. import storage
from ..errors import CheckpointError
from ..modalities import ModalitySpec
from ..resources import catalogs_dir
from .anysat import AnySat
from .config import SIZES, AnySatConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def build_model(size: str, specs: list[ModalitySpec], seed: int = 0, **overrides) -> AnySat:
    """A freshly initialised model (seeded, so two builds are identical)."""
    torch.manual_seed(seed)
    return AnySat(AnySatConfig.from_size(size, specs, **overrides)).eval()


def save_checkpoint(model: AnySat, uri: str, provenance: dict | None = None,
                    dtype: torch.dtype = torch.float32) -> None:
    """Write weights (floating tensors as `dtype`), then the config that names their sha256
    (the config marks the checkpoint complete)."""
    weights = _weights_bytes(model, dtype)
    meta = {"config": model.config.to_dict(), "sha256": hashlib.sha256(weights).hexdigest(),
            "provenance": provenance or {}}
    storage.write_bytes_atomic(storage.join(uri, WEIGHTS), weights)
    storage.write_bytes_atomic(storage.join(uri, CONFIG), json.dumps(meta, indent=2).encode())


def shipped_checkpoints() -> dict[str, Path]:
    """Checkpoints that ship with the package, by name (catalogs/checkpoints/<name>)."""
    folder = catalogs_dir() / "checkpoints"
    return {p.name: p for p in sorted(folder.glob("*")) if (p / CONFIG).exists()}


def load_model(name_or_uri: str, specs: list[ModalitySpec] | None = None, seed: int = 0) -> AnySat:
    """A shipped checkpoint by name (`demo`), a checkpoint folder (local path or
    object-storage URI), or a size name for a seeded random initialisation built for `specs`."""
    if name_or_uri in SIZES:
        if specs is None:
            raise CheckpointError(f"model size '{name_or_uri}' needs the sensors it is built for")
        return build_model(name_or_uri, specs, seed)
    shipped = shipped_checkpoints()
    uri = storage.normalize_uri(str(shipped.get(name_or_uri, name_or_uri)))
    try:
        meta = json.loads(storage.read_bytes(storage.join(uri, CONFIG)))
        weights = storage.read_bytes(storage.join(uri, WEIGHTS))
    except FileNotFoundError:
        raise CheckpointError(
            f"no checkpoint at {name_or_uri} (expected {CONFIG} and {WEIGHTS}); "
            f"or give a shipped checkpoint ({', '.join(shipped) or 'none'}) or a model size: "
            f"{', '.join(SIZES)}") from None
    if hashlib.sha256(weights).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {name_or_uri}: weights do not match the sha256 in {CONFIG}")
    model = AnySat(AnySatConfig.from_dict(meta["config"]))
    model.load_state_dict(load_safetensors(weights), strict=True)
    return model.eval()


def _weights_bytes(model: AnySat, dtype: torch.dtype = torch.float32) -> bytes:
    return save_safetensors({k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
                             for k, v in model.state_dict().items()})


def weights_sha256(model: AnySat) -> str:
    """The sha256 a checkpoint of this model records (a model's id in products)."""
    return hashlib.sha256(_weights_bytes(model)).hexdigest()
