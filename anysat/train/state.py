"""Resumable training checkpoints on any fsspec URI.

    {out}/checkpoints/step-00000100/
        encoder.safetensors  target.safetensors  predictor.safetensors  optimizer.safetensors
        state.json       step, learning rate, data position, RNG states, model config, recipe
        manifest.json    the sha256 of every file above; written last

A checkpoint counts only once its manifest exists and every file matches its sha256, so a
run killed while writing one (or a corrupted file) falls back to the previous checkpoint.
Nothing is unpickled: tensors are safetensors, the rest JSON.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .. import storage
from ..errors import CheckpointError

log = logging.getLogger("anysat")
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"step-(\d{8})$")
MODULES = ("encoder", "target", "predictor")


def _tensors_bytes(state: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()})


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as flat tensors (`{param}.{key}`) plus its JSON-able groups."""
    state = optimizer.state_dict()
    tensors = {f"{p}.{k}": v if torch.is_tensor(v) else torch.tensor(v)
               for p, s in state["state"].items() for k, v in s.items()}
    return tensors, {"param_groups": state["param_groups"]}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        p, k = key.split(".", 1)
        state.setdefault(int(p), {})[k] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups["param_groups"]})


def rng_state() -> dict:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict) -> None:
    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


def save_state(out_uri: str, step: int, modules: dict[str, torch.nn.Module],
               optimizer: torch.optim.Optimizer, info: dict, keep: int = 3) -> str:
    """Write the checkpoint of `step` (files first, manifest last); keep the newest `keep`."""
    folder = storage.join(out_uri, "checkpoints", f"step-{step:08d}")
    files = {f"{name}.safetensors": _tensors_bytes(module.state_dict())
             for name, module in modules.items()}
    tensors, groups = optimizer_tensors(optimizer)
    files["optimizer.safetensors"] = _tensors_bytes(tensors)
    files["state.json"] = json.dumps({**info, "step": step, "optimizer": groups,
                                      "rng": rng_state()}, indent=1).encode()
    for name, data in files.items():
        storage.write_bytes_atomic(storage.join(folder, name), data)
    manifest = {"step": step, "sha256": {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}}
    storage.write_bytes_atomic(storage.join(folder, MANIFEST), json.dumps(manifest).encode())
    for old in checkpoint_steps(out_uri)[:-keep]:
        fs, path = storage.filesystem(storage.join(out_uri, "checkpoints", f"step-{old:08d}"))
        fs.rm(path, recursive=True)
    return folder


def checkpoint_steps(out_uri: str) -> list[int]:
    """Steps of the checkpoint folders under out_uri, oldest first (complete or not)."""
    fs, path = storage.filesystem(storage.join(out_uri, "checkpoints"))
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    steps = (STEP_DIR.search(n.rstrip("/")) for n in names)
    return sorted(int(m.group(1)) for m in steps if m)


def load_latest(out_uri: str) -> dict | None:
    """The newest complete, uncorrupted checkpoint: {name: bytes-decoded parts}, or None."""
    for step in reversed(checkpoint_steps(out_uri)):
        folder = storage.join(out_uri, "checkpoints", f"step-{step:08d}")
        try:
            manifest = json.loads(storage.read_bytes(storage.join(folder, MANIFEST)))
            files = {n: storage.read_bytes(storage.join(folder, n)) for n in manifest["sha256"]}
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            log.warning("checkpoint %s is incomplete; skipping it", folder)
            continue
        bad = [n for n, d in files.items() if hashlib.sha256(d).hexdigest() != manifest["sha256"][n]]
        if bad:
            log.warning("checkpoint %s: %s do not match the manifest's sha256; skipping it", folder, bad)
            continue
        return {"folder": folder, "state": json.loads(files["state.json"]),
                **{n.removesuffix(".safetensors"): load_safetensors(d)
                   for n, d in files.items() if n.endswith(".safetensors")}}
    return None


def restore(checkpoint: dict, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> None:
    """Load a `load_latest` checkpoint into the modules and optimizer (same config checked
    by the caller); a tensor that does not fit is a CheckpointError naming it."""
    for name, module in modules.items():
        try:
            module.load_state_dict(checkpoint[name], strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {checkpoint['folder']} does not fit the {name}: "
                                  f"{str(exc).splitlines()[0]}") from None
    load_optimizer(optimizer, checkpoint["optimizer"], checkpoint["state"]["optimizer"])
    set_rng_state(checkpoint["state"]["rng"])
