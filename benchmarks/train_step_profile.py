"""Where a JEPA training step's time goes, host against device (torch.profiler): one JSON line
per model and batch size.

The step is the trainer's (`forward_loss` in bf16 autocast on a GPU, backward,
`apply_gradients`: clipping, fused AdamW, EMA update) on
chips of the demo's central tile (S2 + S1 + DEM, 120 m chips, 30 m patches, I-JEPA masks and
context dates drawn as the loader draws them), on fixed shapes, so only the step is measured.
Keys: model, batch_size, device, dtype, ops_per_step (torch ops dispatched, views included),
step_ms (wall), device_ms (kernel time per step, on a GPU), device_busy (device_ms / step_ms)
and top_device_kernels / top_host_ops (name, ms per step). A step whose device_busy is low is
bound by the host (Python, kernel launches), not by the GPU.

    python benchmarks/train_step_profile.py --device cuda --models tiny,base --batch-sizes 64 256

`--gpu-ops GB` counts, on any machine, the ops a step would launch on a GPU of that memory (its
sync-free paths, bf16 autocast, its chunk sizes), forward and backward without the optimiser,
on fake tensors (no memory, no arithmetic): keys model, batch_size, gpu_memory_gb,
forward_ops, step_ops (ops that launch no kernel, such as views, included).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

DEMO_TILE = (32631, 1107, 9352, 600.0)  # the demo's central tile of 600 m (UTM 31N)


class _OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is not torch.ops.prim.device.default  # fake tensors' device queries
        return func(*args, **(kwargs or {}))


def chips():
    from anysat.cube.batch import load_tile_batch
    from anysat.modalities import resolve_sensors
    from anysat.stac import resolve_provider
    from anysat.tiles import Tile
    from anysat.train.pretrain import ChipSampler

    specs = resolve_sensors(["s2", "s1", "dem"])
    footprint, _ = load_tile_batch(resolve_provider("demo"), specs, Tile(*DEMO_TILE),
                                   dt.date(2020, 11, 1), dt.date(2021, 10, 31))
    return specs, ChipSampler(footprint, {s.name: s.gsd_m for s in specs}, chip_m=120, step_m=30)


def run_case(specs, sampler, model_size: str, batch_size: int, device: torch.device,
             bf16: bool, steps: int) -> dict:
    from anysat.model import build_model
    from anysat.train import JEPA, MultiBlockMasks
    from anysat.train.masks import context_validity
    from anysat.train.trainer import adamw, apply_gradients, forward_loss, prepare_device

    torch.manual_seed(0)
    prepare_device(device)
    batch = {k: v.to(device) for k, v in sampler.sample(batch_size).items()}
    series = {s.name: s.time_series for s in specs}
    generator = torch.Generator().manual_seed(0)
    item = {"batch": batch, "patch_size_m": 30,  # a loader item, already on the device
            "masks": tuple(m.to(device) for m in MultiBlockMasks()(batch_size, 4, generator)),
            "context_valid": {k: v.to(device) for k, v in
                              context_validity(batch, series, 0.7, 0.7, generator).items()}}
    jepa = JEPA(build_model(model_size, specs, seed=0)).to(device)
    params = [*jepa.encoder.parameters(), *jepa.predictor.parameters()]  # as the trainer's
    optimizer = adamw(params, 1e-4, 0.04)

    def step():  # the trainer's step, without DDP and accumulation
        forward_loss(jepa, item, device, bf16, False)["loss"].backward()
        apply_gradients(jepa, params, optimizer, 0.996)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):  # warm-up: allocator, kernels chosen
        step()
    counter = _OpCount()
    with counter:
        step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        began = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = time.perf_counter() - began
    events = prof.key_averages()
    host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    case = {"model": model_size, "batch_size": batch_size, "device": device.type,
            "dtype": "bf16" if bf16 else "fp32", "ops_per_step": counter.count,
            "step_ms": round(1000 * wall / steps, 2),
            "top_host_ops": [(e.key, round(e.self_cpu_time_total / 1000 / steps, 2)) for e in host]}
    if device.type == "cuda":
        kernels = collections.Counter()
        for e in events:
            kernels[e.key] += getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        device_ms = sum(kernels.values()) / 1000 / steps
        case.update(device_ms=round(device_ms, 2), device_busy=round(device_ms / case["step_ms"], 3),
                    top_device_kernels=[(k, round(v / 1000 / steps, 2)) for k, v in kernels.most_common(8)])
    return case


def count_gpu_ops(specs, sampler, model_size: str, batch_size: int, memory_gb: float) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from anysat.model import build_model, projectors
    from anysat.model.layers import sync_free
    from anysat.train import JEPA, MultiBlockMasks
    from anysat.train.masks import context_validity
    from anysat.train.trainer import forward_loss

    chunk = projectors.gpu_chunk_bytes(int(memory_gb * 2**30))
    projectors.accelerator_chunk_bytes = lambda device: chunk  # as on that GPU (see there)
    few = sampler.sample(8)
    batch = {k: v.repeat(-(-batch_size // 8), *[1] * (v.ndim - 1))[:batch_size] for k, v in few.items()}
    generator = torch.Generator().manual_seed(0)
    masks = MultiBlockMasks()(batch_size, 4, generator)
    seen = context_validity(batch, {s.name: s.time_series for s in specs}, 0.7, 0.7, generator)
    jepa = JEPA(build_model(model_size, specs, seed=0))
    counter = _OpCount()
    with FakeTensorMode(allow_non_fake_inputs=True) as fake, sync_free():
        item = {"batch": {k: fake.from_tensor(v) for k, v in batch.items()}, "patch_size_m": 30,
                "masks": tuple(fake.from_tensor(m) for m in masks),
                "context_valid": {k: fake.from_tensor(v) for k, v in seen.items()}}
        with counter:
            loss = forward_loss(jepa, item, torch.device("cpu"), True, False)["loss"]
        forward = counter.count
        with counter:
            loss.backward()
    return {"model": model_size, "batch_size": batch_size, "gpu_memory_gb": memory_gb,
            "forward_ops": forward, "step_ops": counter.count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,base")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--gpu-ops", type=float, metavar="GB",
                        help="only count the ops a step launches on a GPU of this memory")
    args = parser.parse_args()
    device = torch.device(args.device)
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    specs, sampler = chips()
    for model_size in args.models.split(","):
        for batch_size in args.batch_sizes:
            if args.gpu_ops:
                print(json.dumps(count_gpu_ops(specs, sampler, model_size, batch_size, args.gpu_ops)),
                      flush=True)
                continue
            print(json.dumps(run_case(specs, sampler, model_size, batch_size, device, bf16,
                                      args.steps)), flush=True)


if __name__ == "__main__":
    main()
