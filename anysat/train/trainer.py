"""Distributed JEPA pretraining from chip stores: one process per rank under `torchrun`
(gloo on CPU, nccl on GPU) or a single process; bf16 autocast on GPU, gradient
accumulation, warm-up + cosine learning rate, the EMA tau schedule, resumable checkpoints.

    anysat pretrain --chips s3://bucket/chips.zarr --model tiny --steps 10000 --nproc 2 --out s3://bucket/run1

Under `--out`: `checkpoints/step-*/` (resumable state, see `state`), `model/` (the EMA
encoder as a checkpoint `anysat.load_model` reads, written at the end), `metrics.jsonl`
(loss, samples/s, collapse monitors every `log_every` steps) and `logs/rank-*.jsonl` (per
rank: the chips of each batch and a checksum of the parameters, to audit the run).
A run restarted with the same command resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from .. import storage
from ..devices import device_problem
from ..errors import AnySatError, CheckpointError
from ..model import AnySat, save_checkpoint
from ..model.checkpoint import build_model
from ..model.config import SIZES
from ..modalities import available_specs, resolve_sensors
from .jepa import JEPA, JEPAConfig, ema_momentum
from .masks import MultiBlockMasks
from .monitors import collapse_monitors
from .pretrain import learning_rate
from .state import load_latest, restore, save_state
from .stream import ChipStream, StreamConfig, check_chip_table, read_chip_indexes, sensors_in

log = logging.getLogger("anysat")
# The target's statistics are averaged over ranks after each step (`_average_buffers`), not
# copied from rank 0 before each forward; the option's name changed in torch 2.13.
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                   inspect.signature(DistributedDataParallel.__init__).parameters
                   else {"broadcast_buffers": False})


@dataclass
class TrainConfig:
    chips: list[str]
    out: str
    model: str = "tiny"                     # size: tiny, small, base
    sensors: list[str] | None = None        # default: every sensor the chips hold
    dim: int | None = None                  # overrides of the size's width and depth
    depth: int | None = None
    steps: int = 1000
    batch_size: int = 8                     # per rank and micro-batch
    accumulation: int = 1                   # micro-batches per optimizer step
    lr: float = 3e-4
    warmup_steps: int | None = None         # default: a tenth of the steps
    weight_decay: float = 0.04
    crop_sizes_m: tuple[float, ...] = (60.0, 120.0)
    patch_sizes_m: tuple[float, ...] = (10.0, 20.0, 30.0, 60.0)
    shuffle_buffer: int = 256
    sensor_drop: float = 0.2
    date_drop: float = JEPAConfig.date_drop
    modality_drop: float = JEPAConfig.modality_drop
    decorrelation: float = JEPAConfig.decorrelation_weight
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    monitor_every: int = 0                  # collapse monitors on a fixed probe batch (0: off)
    workers: int = 0                        # DataLoader worker processes per rank
    device: str = "auto"                    # auto: cuda when there is one
    dtype: str = "auto"                     # auto: bf16 autocast on cuda, fp32 on cpu
    save_dtype: str = "float32"             # of the final model: float32 or float16
    json_progress: bool = False             # one JSON line per log step on stdout
    provenance: dict = field(default_factory=dict)

    def check(self) -> None:
        """Raise AnySatError naming the first option out of range, before any data is read
        or process started (not a traceback from the optimiser or a modulo by zero mid-run)."""
        def bad(name: str, what: str) -> AnySatError:
            return AnySatError(f"{name} (--{name.replace('_', '-')}) is "
                               f"{getattr(self, name)!r}: expected {what}")

        least = {"steps": 1, "batch_size": 1, "accumulation": 1, "shuffle_buffer": 1,
                 "checkpoint_every": 1, "keep_checkpoints": 1, "log_every": 1, "dim": 1,
                 "depth": 1, "warmup_steps": 0, "monitor_every": 0, "workers": 0, "seed": 0}
        for name, low in least.items():
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < low):
                raise bad(name, f"an integer of at least {low}")
        for name, positive in (("lr", True), ("weight_decay", False), ("decorrelation", False)):
            value = getattr(self, name)
            if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
                raise bad(name, "a positive number" if positive else "a number of 0 or more")
        for name in ("sensor_drop", "date_drop", "modality_drop"):
            if not 0 <= getattr(self, name) <= 1:
                raise bad(name, "a chance from 0 to 1")
        for name in ("crop_sizes_m", "patch_sizes_m"):
            sizes = getattr(self, name)
            if not sizes or not all(math.isfinite(v) and v > 0 for v in sizes):
                raise bad(name, "one or more positive sizes in metres")
        for name, known in (("model", SIZES), ("dtype", ("auto", "fp32", "bf16")),
                            ("save_dtype", ("float32", "float16"))):
            if getattr(self, name) not in known:
                raise bad(name, f"one of {', '.join(known)}")
        if problem := device_problem(self.device, auto=True):
            raise AnySatError(problem)

    def jepa_config(self) -> JEPAConfig:
        return JEPAConfig(decorrelation_weight=self.decorrelation, date_drop=self.date_drop,
                          modality_drop=self.modality_drop)

    def stream_config(self) -> StreamConfig:
        return StreamConfig(self.batch_size, tuple(self.crop_sizes_m), tuple(self.patch_sizes_m),
                            self.shuffle_buffer, self.sensor_drop, self.date_drop,
                            self.modality_drop, MultiBlockMasks(), self.seed)

    def data_recipe(self, world: int) -> dict:
        """What fixes the data each step sees: a resumed run must not change it."""
        return {"chips": [storage.normalize_uri(c) for c in self.chips], "seed": self.seed,
                "batch_size": self.batch_size, "accumulation": self.accumulation, "world": world,
                "crop_sizes_m": list(self.crop_sizes_m), "patch_sizes_m": list(self.patch_sizes_m),
                "sensor_drop": self.sensor_drop, "date_drop": self.date_drop,
                "modality_drop": self.modality_drop, "shuffle_buffer": self.shuffle_buffer}


@dataclass
class Prepared:
    model: AnySat
    table: pd.DataFrame
    checkpoint: dict | None


def _world() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def prepare(cfg: TrainConfig, world: int) -> Prepared:
    """Every check before training, so bad input fails before a process is spawned: output
    writable, chips usable by the model, the newest checkpoint made by this same recipe."""
    cfg.check()
    storage.check_writable(cfg.out)
    table = read_chip_indexes(cfg.chips)
    present = sensors_in(table)
    specs = resolve_sensors(cfg.sensors or [n for n in available_specs() if n in present])
    overrides = {k: v for k, v in (("dim", cfg.dim), ("depth", cfg.depth)) if v}
    try:
        model = build_model(cfg.model, specs, cfg.seed, **overrides)
    except ValueError as exc:  # a width or depth out of the model's bounds
        raise AnySatError(f"model {cfg.model} with {overrides}: {exc}") from None
    table = check_chip_table(table, model.modalities)
    checkpoint = load_latest(cfg.out)
    if checkpoint is not None:
        saved = checkpoint["state"]
        config = json.loads(json.dumps(model.config.to_dict()))  # as state.json holds it
        if saved["model_config"] != config:
            diff = {k: (saved["model_config"].get(k), v) for k, v in config.items()
                    if saved["model_config"].get(k) != v}
            raise CheckpointError(
                f"{checkpoint['folder']} was made by another model config (checkpoint vs this "
                f"run: {_short(diff)}); use another --out or the same model options")
        if saved["data"] != cfg.data_recipe(world):
            diff = {k: (saved["data"].get(k), v) for k, v in cfg.data_recipe(world).items()
                    if saved["data"].get(k) != v}
            raise CheckpointError(f"{checkpoint['folder']} was made with other data settings "
                                  f"(checkpoint vs this run: {_short(diff)}); a resumed run "
                                  "must see the same data: use another --out")
    return Prepared(model, table, checkpoint)


def _short(diff: dict) -> str:
    return "; ".join(f"{k}: {str(a)[:60]} vs {str(b)[:60]}" for k, (a, b) in diff.items())


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _checksum(module: torch.nn.Module) -> float:
    """A cheap fingerprint of the weights (equal on every rank after every step)."""
    with torch.no_grad():
        return float(sum(p.double().sum() * (i + 1) for i, p in enumerate(module.state_dict().values())
                         if p.is_floating_point()))


def _write_lines(uri: str, rows: list[dict]) -> None:
    storage.write_bytes_atomic(uri, "".join(json.dumps(r) + "\n" for r in rows).encode())


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) the pretraining in this process: rank RANK of WORLD_SIZE when launched
    by torchrun. Returns the summary rank 0 also writes into the final model's provenance."""
    cfg.check()
    rank, world, local_rank = _world()
    device = _device(cfg, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    prepare_device(device)
    cfg.out = storage.normalize_uri(cfg.out)
    prepared = prepare(cfg, world)
    model, checkpoint = prepared.model, prepared.checkpoint
    jepa = JEPA(model.train(), cfg.jepa_config()).to(device)
    params = [*jepa.encoder.parameters(), *jepa.predictor.parameters()]
    optimizer = adamw(params, cfg.lr, cfg.weight_decay)
    modules = {"encoder": jepa.encoder, "target": jepa.target, "predictor": jepa.predictor}
    start = 0
    if checkpoint is not None:
        restore(checkpoint, modules, optimizer)
        start = checkpoint["state"]["step"]
        log.info("resuming from %s at step %d", checkpoint["folder"], start)
    net = (DistributedDataParallel(jepa, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True, **_NO_BUFFER_SYNC)
           if world > 1 else jepa)
    stream = ChipStream(prepared.table, model.modalities, cfg.stream_config(), rank, world,
                        start=start * cfg.accumulation)
    loader = DataLoader(stream, batch_size=None, num_workers=cfg.workers,
                        pin_memory=device.type == "cuda",
                        prefetch_factor=4 if cfg.workers else None,
                        persistent_workers=cfg.workers > 0)
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
    warmup = max(1, cfg.steps // 10) if cfg.warmup_steps is None else cfg.warmup_steps
    jcfg = jepa.config
    info = {"model_config": model.config.to_dict(), "data": cfg.data_recipe(world),
            "recipe": _recipe(cfg)}
    metrics = _read_lines(storage.join(cfg.out, "metrics.jsonl"), start) if rank == 0 else []
    rank_log = _read_lines(storage.join(cfg.out, "logs", f"rank-{rank}.jsonl"), start)
    if rank == 0:
        log.info("pretraining %s (%d-d, %d blocks, sensors %s) on %d chips from %s: steps %d-%d, "
                 "%d rank(s) x batch %d x %d micro-batches, %s on %s", cfg.model, model.config.dim,
                 model.config.depth, list(model.modalities), len(prepared.table),
                 ", ".join(cfg.chips), start + 1, cfg.steps, world, cfg.batch_size,
                 cfg.accumulation, "bf16 autocast" if bf16 else "fp32", device)
    probe = stream.probe() if cfg.monitor_every and rank == 0 else None  # on log steps
    probed = False
    batches = iter(loader)
    before = metrics[-1]["seconds"] if metrics else 0.0   # training time of earlier runs
    started = window_start = time.perf_counter()
    wait = 0.0
    window_steps, window_loss = 0, torch.zeros((), device=device)
    for step in range(start, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg.steps, cfg.lr, warmup)
        chips = []
        done = step + 1
        logging_step = done % cfg.log_every == 0 or done == cfg.steps
        for micro in range(cfg.accumulation):
            waited = time.perf_counter()
            item = next(batches)
            wait += time.perf_counter() - waited
            chips += item["chips"]
            sync = (net.no_sync() if world > 1 and micro < cfg.accumulation - 1
                    else contextlib.nullcontext())
            with sync:
                out = forward_loss(net, item, device, bf16, logging_step)
                (out["loss"] / cfg.accumulation).backward()
        apply_gradients(jepa, params, optimizer,
                        ema_momentum(step, cfg.steps, jcfg.ema_start, jcfg.ema_end))
        if world > 1:
            _average_buffers(jepa.target, world)
        window_steps += 1
        window_loss += out["loss"].detach().float()  # no host sync until the log step
        if logging_step:
            values = torch.tensor([window_loss.item() / window_steps, float(out["embedding_std"]),
                                   float(out["rankme"]), wait], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(values)
                values /= world
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - window_start
            # loss: the mean over the steps since the last log; monitors: of this step's batch
            record = {"step": done, "loss": round(values[0].item(), 5),
                      "embedding_std": round(values[1].item(), 5), "rankme": round(values[2].item(), 3),
                      "lr": optimizer.param_groups[0]["lr"], "patch_m": item["patch_size_m"],
                      "samples_per_s": round(window_steps * cfg.batch_size * cfg.accumulation * world / elapsed, 2),
                      "loader_wait_share": round(values[3].item() / elapsed, 4),
                      "seconds": round(before + time.perf_counter() - started, 2),
                      "peak_rss_mb": _peak_rss_mb()}
            if device.type == "cuda":
                record["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            if probe is not None and (done % cfg.monitor_every == 0 or done == cfg.steps
                                      or not probed):
                probed = True
                jepa.target.eval()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    record.update({f"probe_{k}": round(v, 5) for k, v in collapse_monitors(
                        jepa.target, _to(probe["batch"], device), probe["patch_size_m"]).items()})
                jepa.target.train()
            rank_log.append({"step": done, "rank": rank, "chips": chips, "checksum": _checksum(jepa)})
            if rank == 0:
                metrics.append(record)
                log.info("step %d/%d: loss %.4f, std %.4f, rankme %.1f, %.1f samples/s, loader "
                         "wait %.0f %%, patch %g m%s", done, cfg.steps, record["loss"],
                         record["embedding_std"], record["rankme"], record["samples_per_s"],
                         100 * record["loader_wait_share"], record["patch_m"], "".join(
                             f", {k} {v:.3g}" for k, v in record.items() if k.startswith("probe_")))
                if cfg.json_progress:
                    print(json.dumps({"event": "progress", **record}), flush=True)
            window_start, wait, window_steps = time.perf_counter(), 0.0, 0
            window_loss.zero_()
        else:
            rank_log.append({"step": done, "rank": rank, "chips": chips})
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            _write_lines(storage.join(cfg.out, "logs", f"rank-{rank}.jsonl"), rank_log)
            if rank == 0:
                _write_lines(storage.join(cfg.out, "metrics.jsonl"), metrics)
                save_state(cfg.out, done, modules, optimizer, info, keep=cfg.keep_checkpoints)
                log.info("checkpoint: step %d -> %s", done, cfg.out)
            if world > 1:
                dist.barrier()
    summary = {"steps": cfg.steps, "world": world, "chips": len(prepared.table),
               "seconds": metrics[-1]["seconds"] if metrics else None,
               "seconds_this_run": round(time.perf_counter() - started, 1),
               "final_loss": metrics[-1]["loss"] if metrics else None,
               "first_loss": metrics[0]["loss"] if metrics else None}
    if rank == 0:
        save_checkpoint(jepa.target, storage.join(cfg.out, "model"), provenance={
            **cfg.provenance, "recipe": _recipe(cfg), "data": cfg.data_recipe(world), **summary,
            "curve": metrics}, dtype=getattr(torch, cfg.save_dtype))
        log.info("wrote the EMA encoder to %s", storage.join(cfg.out, "model"))
        if cfg.json_progress:
            print(json.dumps({"event": "done", **summary, "model": storage.join(cfg.out, "model")}),
                  flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def prepare_device(device: torch.device) -> None:
    if device.type == "cuda":
        # Batch shapes change every step (crop, patch size, context size): cuDNN's attention
        # builds a plan per new shape on the CPU, 115 ms of a 330 ms step (base, batch 64,
        # H100 profile); the flash and memory-efficient kernels need none.
        torch.backends.cuda.enable_cudnn_sdp(False)


def forward_loss(net: torch.nn.Module, item: dict, device: torch.device, bf16: bool,
                 monitors: bool) -> dict:
    """The JEPA forward of one loader item (`stream.ChipStream`): loss, and the collapse
    monitors when asked (they sync with the host)."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return net(_to(item["batch"], device), item["patch_size_m"], None,
                   tuple(m.to(device, non_blocking=True) for m in item["masks"]),
                   _to(item["context_valid"], device), monitors)


def apply_gradients(jepa: JEPA, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    momentum: float) -> None:
    """After the backward: clip, step, clear the gradients, then move the EMA target."""
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    jepa.update_target(momentum)


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused where the device has the kernel: one launch for every parameter on a GPU,
    and on CPU a quarter of the per-tensor loop's time (base: 110 vs 422 ms a step, one
    thread), which every DDP rank pays in full."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _peak_rss_mb() -> float:
    """Peak resident memory of this process, MB (loader workers count once they exit)."""
    return round(max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                     resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024, 1)


def _recipe(cfg: TrainConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("provenance", "json_progress")}


def _average_buffers(module: torch.nn.Module, world: int) -> None:
    """The target's running output statistics, averaged over ranks (each saw its own batch)."""
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    flat = torch.cat([b.flatten() for b in buffers])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


def _read_lines(uri: str, upto_step: int) -> list[dict]:
    """The rows of a JSONL log up to a resumed step (later rows belong to the lost run)."""
    if upto_step == 0 or not storage.exists(uri):
        return []
    rows = [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line]
    return [r for r in rows if r["step"] <= upto_step]


def torchrun_command(argv: list[str], nproc: int) -> list[str]:
    """The torchrun command that runs `anysat pretrain argv` on nproc local processes
    (without `--nproc`, which torchrun's own parser would take for `--nproc-per-node`)."""
    child, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        child.append(arg)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "anysat.cli", "pretrain", *child]
