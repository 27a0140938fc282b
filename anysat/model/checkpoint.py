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
    config = model.config.to_dict()
    meta = {"config": config, "sha256": hashlib.sha256(weights).hexdigest(),
            "config_sha256": config_sha256(config), "provenance": provenance or {}}
    storage.write_bytes_atomic(storage.join(uri, WEIGHTS), weights)
    storage.write_bytes_atomic(storage.join(uri, CONFIG), json.dumps(meta, indent=2).encode())


def shipped_checkpoints() -> dict[str, Path]:
    """Checkpoints that ship with the package, by name (catalogs/checkpoints/<name>)."""
    folder = catalogs_dir() / "checkpoints"
    return {p.name: p for p in sorted(folder.glob("*")) if (p / CONFIG).exists()}


def load_model(name_or_uri: str, specs: list[ModalitySpec] | None = None, seed: int = 0) -> AnySat:
    """A shipped checkpoint by name (`demo`), a checkpoint folder (local path or
    object-storage URI), or a size name for a seeded random initialisation built for `specs`.
    A checkpoint's config is checked (keys, sizes, its sha256) before any tensor is built,
    and its weights against their sha256 before they are parsed (safetensors: no pickle)."""
    if name_or_uri in SIZES:
        if specs is None:
            raise CheckpointError(f"model size '{name_or_uri}' needs the sensors it is built for")
        return build_model(name_or_uri, specs, seed)
    meta, weights = read_checkpoint(name_or_uri)
    try:
        config = AnySatConfig.from_dict(meta["config"])
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {name_or_uri}: {CONFIG}: {exc}") from None
    if hashlib.sha256(weights).hexdigest() != meta["sha256"]:
        raise CheckpointError(f"checkpoint {name_or_uri}: weights do not match the sha256 in {CONFIG}")
    try:
        tensors = load_safetensors(weights)
    except Exception as exc:  # safetensors raises its own SafetensorError on any bad header
        raise CheckpointError(f"checkpoint {name_or_uri}: {WEIGHTS} is not a safetensors file "
                              f"({type(exc).__name__}: {exc}); nothing in it was executed") from None
    model = AnySat(config)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        problems = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise CheckpointError(
            f"checkpoint {name_or_uri}: its weights do not fit its {CONFIG} ({len(problems)} "
            f"problems, first: {problems[0] if problems else exc})") from None
    return model.eval()


def config_sha256(config: dict) -> str:
    """The sha256 of a config's canonical JSON: config.json records it, so a config edited or
    swapped after saving is refused."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def checkpoint_uri(name_or_uri: str) -> str:
    """The folder of a shipped checkpoint (by name) or of a checkpoint path/URI."""
    return storage.normalize_uri(str(shipped_checkpoints().get(name_or_uri, name_or_uri)))


def read_checkpoint(name_or_uri: str) -> tuple[dict, bytes]:
    """config.json (checked: JSON, keys, config sha256) and the weights' bytes of a checkpoint,
    or a CheckpointError saying what is wrong."""
    shipped = shipped_checkpoints()
    uri = checkpoint_uri(name_or_uri)
    if Path(uri).is_file():
        raise CheckpointError(f"model {name_or_uri} is a file; a checkpoint is a folder with "
                              f"{CONFIG} and {WEIGHTS} (or give a shipped checkpoint: "
                              f"{', '.join(shipped) or 'none'}, or a size: {', '.join(SIZES)})")
    try:
        raw = storage.read_bytes(storage.join(uri, CONFIG))
        weights = storage.read_bytes(storage.join(uri, WEIGHTS))
    except FileNotFoundError:
        raise CheckpointError(
            f"no checkpoint at {name_or_uri} (expected {CONFIG} and {WEIGHTS}); "
            f"or give a shipped checkpoint ({', '.join(shipped) or 'none'}) or a model size: "
            f"{', '.join(SIZES)}") from None
    except Exception as exc:  # object storage: credentials, permissions, network
        hint = (" (credentials come from the environment or the provider's standard chain, "
                "e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
                if "://" in uri else "")
        raise CheckpointError(f"cannot read checkpoint {name_or_uri}: {type(exc).__name__}: "
                              f"{exc}{hint}") from None
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {name_or_uri}: {CONFIG} is not JSON ({exc})") from None
    if not isinstance(meta, dict) or not {"config", "sha256", "config_sha256"} <= set(meta):
        raise CheckpointError(f"checkpoint {name_or_uri}: {CONFIG} needs `config`, `sha256` "
                              "and `config_sha256` (save checkpoints with anysat.save_checkpoint)")
    if config_sha256(meta["config"]) != meta["config_sha256"]:
        raise CheckpointError(f"checkpoint {name_or_uri}: its config does not match the "
                              f"config_sha256 in {CONFIG} (edited or swapped after saving)")
    return meta, weights


def _weights_bytes(model: AnySat, dtype: torch.dtype = torch.float32) -> bytes:
    return save_safetensors({k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
                             for k, v in model.state_dict().items()})


def weights_sha256(model: AnySat) -> str:
    """The sha256 a checkpoint of this model records (a model's id in products)."""
    return hashlib.sha256(_weights_bytes(model)).hexdigest()
