"""Forward speed and memory of AnySat: one JSON line per case.

    python benchmarks/model_forward.py [--size base] [--device cpu|cuda] [--dtype fp32|bf16]
        [--tiles 1] [--repeat 3] [--cases s2 s2+s1 s2+s1+aerial] [--subpatch-depth N]

Each case embeds a 60 x 60 px tile at 10 m (0.36 km2), 12 dates, patch 20 m, with random
weights and random inputs at the sensors' statistics (the setting of the reference figures:
official AnySat base on this 2-core CPU, S2 only 5.6 s per tile at 1.4 GB RSS, S2 + S1 11.3 s).
Keys: case, params, seconds_per_tile, km2_per_s, peak_rss_mb (+ device, dtype, size).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from anysat.modalities import resolve_sensors  # noqa: E402
from anysat.model import build_model  # noqa: E402

SIDE_M, DATES, PATCH_M = 600.0, 12, 20.0
CASES = {"s2": ["s2"], "s2+s1": ["s2", "s1"], "s2+s1+aerial": ["s2", "s1", "naip"]}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_batch(specs, tiles: int, device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batch = {}
    for spec in specs:
        t = DATES if spec.time_series else 1
        px = round(SIDE_M / spec.gsd_m)
        mean = torch.tensor([b.mean for b in spec.bands]).view(1, 1, -1, 1, 1)
        std = torch.tensor([b.std for b in spec.bands]).view(1, 1, -1, 1, 1)
        x = mean + std * torch.randn(tiles, t, len(spec.bands), px, px, generator=g)
        batch[spec.name] = x.to(device)
        days = torch.sort(torch.randint(18500, 18865, (tiles, t), generator=g), dim=1).values
        batch[f"{spec.name}_dates"] = days.float().to(device)
    return batch


def run_case(name: str, args) -> dict:
    specs = resolve_sensors(CASES[name])
    overrides = {} if args.subpatch_depth is None else {"subpatch_depth": args.subpatch_depth}
    model = build_model(args.size, specs, **overrides).to(args.device)
    batch = random_batch(specs, args.tiles, args.device)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def once():
        with torch.inference_mode(), autocast:
            model(batch, PATCH_M, "patch")
        if args.device == "cuda":
            torch.cuda.synchronize()

    once()  # warm-up (allocators, kernels)
    started = time.perf_counter()
    for _ in range(args.repeat):
        once()
    per_tile = (time.perf_counter() - started) / args.repeat / args.tiles
    return {"case": f"{args.size}-{name}", "params": sum(p.numel() for p in model.parameters()),
            "seconds_per_tile": round(per_tile, 4),
            "km2_per_s": round(SIDE_M ** 2 / 1e6 / per_tile, 4),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            **({"peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
               if args.device == "cuda" else {}),
            "device": args.device, "dtype": args.dtype, "tiles_per_batch": args.tiles,
            "subpatch_depth": model.config.subpatch_depth, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base", choices=["tiny", "small", "base"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--tiles", type=int, default=1, help="tiles per forward batch")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--subpatch-depth", type=int, default=None,
                        help="sub-patch transformer blocks (the official base uses 6)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    for name in args.cases:  # one process per case keeps peak RSS per case
        print(json.dumps(run_case(name, args)), flush=True)


if __name__ == "__main__":
    main()
