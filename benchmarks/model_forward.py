"""Forward speed and memory of AnySat: one JSON line per case.

    python benchmarks/model_forward.py [--size base] [--device cpu|cuda] [--dtype fp32|bf16]
        [--tiles 1] [--repeat 3] [--cases s2 s2+s1 s2+s1+aerial s2+s1+dem] [--subpatch-depth N]
        [--side-m 600] [--patch-m 20] [--profile] [--attention]

Each case embeds a 60 x 60 px tile at 10 m (0.36 km2; `--side-m`), 12 dates, patch 20 m
(`--patch-m`), with random weights and random inputs at the sensors' statistics (the setting
of the reference figures: official AnySat base on this 2-core CPU, S2 only 5.6 s per tile at
1.4 GB RSS, S2 + S1 11.3 s). Keys: case, params, seconds_per_tile, km2_per_s, peak_rss_mb
(+ device, dtype, size, side_m, patch_m). `s2+s1+dem` at 30 m patches is what embed-region runs.

`--profile` adds where one more forward's time goes (torch.profiler): device_ms_per_tile on a
GPU, the top kernels (or host ops on a CPU) in ms per tile, and attention_share, the part of
that time in scaled-dot-product-attention kernels. `--flops` adds the forward's FLOPs
(FlopCounterMode: matmuls and attention): gflop_per_tile, tflop_per_s (what the timed forward
achieved) and flop_shares (each sensor's projector, the sub-patch encoder, the blocks...).
`--attention` adds, per case, the encoder blocks' attention alone at the case's shape (tile
token + every sensor's patch tokens, the model's heads) with the key mask the model passes on
an accelerator and without one: what dropping the mask when every token is valid would save
(a mask rules out flash kernels).
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
CASES = {"s2": ["s2"], "s2+s1": ["s2", "s1"], "s2+s1+aerial": ["s2", "s1", "naip"],
         "s2+s1+dem": ["s2", "s1", "dem"]}
ATTENTION_KERNELS = ("attention", "fmha", "flash", "sdpa")  # kernel names of SDPA backends


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_batch(specs, tiles: int, device, side_m: float = SIDE_M) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batch = {}
    for spec in specs:
        t = DATES if spec.time_series else 1
        px = round(side_m / spec.gsd_m)
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
    batch = random_batch(specs, args.tiles, args.device, args.side_m)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def once():
        with torch.inference_mode(), autocast:
            model(batch, args.patch_m, "patch")
        if args.device == "cuda":
            torch.cuda.synchronize()

    once()  # warm-up (allocators, kernels)
    started = time.perf_counter()
    for _ in range(args.repeat):
        once()
    per_tile = (time.perf_counter() - started) / args.repeat / args.tiles
    case = {"case": f"{args.size}-{name}", "params": sum(p.numel() for p in model.parameters()),
            "seconds_per_tile": round(per_tile, 4),
            "km2_per_s": round(args.side_m ** 2 / 1e6 / per_tile, 4),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            **({"peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
               if args.device == "cuda" else {}),
            "device": args.device, "dtype": args.dtype, "tiles_per_batch": args.tiles,
            "side_m": args.side_m, "patch_m": args.patch_m,
            "subpatch_depth": model.config.subpatch_depth, "threads": torch.get_num_threads()}
    if args.profile:
        case.update(profiled(once, args))
    if args.flops:
        case.update(counted_flops(model, batch, autocast, args, per_tile))
    if args.attention:
        tokens = 1 + len(specs) * round(args.side_m / args.patch_m) ** 2
        case["attention_ms_per_tile"] = attention_timings(
            args.tiles, tokens, model.config.dim, model.config.heads, args)
    return case


def profiled(once, args) -> dict:
    """One more forward under torch.profiler: kernel (GPU) or host-op (CPU) time per tile."""
    from torch.profiler import ProfilerActivity, profile

    gpu = args.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        once()
    times = {}
    for e in prof.key_averages():
        t = ((getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0))
             if gpu else e.self_cpu_time_total)
        if t:
            times[e.key] = t / 1000 / args.tiles   # ms per tile
    total = sum(times.values())
    attention = sum(t for k, t in times.items() if any(a in k.lower() for a in ATTENTION_KERNELS))
    top = sorted(times.items(), key=lambda kv: kv[1], reverse=True)[:10]
    return {"device_ms_per_tile" if gpu else "host_op_ms_per_tile": round(total, 2),
            "attention_share": round(attention / max(total, 1e-9), 3),
            "top_kernels" if gpu else "top_host_ops": [(k[:90], round(t, 2)) for k, t in top]}


def counted_flops(model, batch, autocast, args, seconds_per_tile: float) -> dict:
    """The forward's floating-point operations (matmuls and attention, as torch's
    FlopCounterMode counts them), what the timed forward achieved per second, and each
    part's share: where a device's time should go if every kernel ran at the same speed."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    # the CPU's attention kernel is not in torch's table
    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops}
    with torch.no_grad(), autocast, FlopCounterMode(display=False, depth=3,
                                                    custom_mapping=cpu_attention) as counter:
        model(batch, args.patch_m, "patch")
    total = counter.get_total_flops()
    counts = {tuple(name.split(".")[1:]): sum(ops.values())   # paths below the model
              for name, ops in counter.get_flop_counts().items()}
    parts: dict[str, int] = {}
    for path, flops in counts.items():
        if path in ((), ("projectors",)):
            continue
        group = path[:2] if path[0] == "projectors" else path[:1]   # a projector per sensor
        # the group's own count, or its children's where it is never called (a ModuleList)
        if path == group or group not in counts and len(path) == len(group) + 1:
            parts[".".join(group)] = parts.get(".".join(group), 0) + flops
    gflop = total / 1e9 / args.tiles
    return {"gflop_per_tile": round(gflop, 1), "tflop_per_s": round(gflop / seconds_per_tile / 1000, 2),
            "flop_shares": {k: round(v / total, 3) for k, v in
                            sorted(parts.items(), key=lambda kv: kv[1], reverse=True) if v / total >= 0.005}}


def attention_timings(tiles: int, tokens: int, dim: int, heads: int, args) -> dict:
    """ms per tile of one scaled-dot-product attention over `tokens` keys, with the boolean
    key mask [B, 1, 1, L] the encoder passes on an accelerator (every key valid) and without."""
    import torch.nn.functional as F

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    q, k, v = (torch.randn(tiles, heads, tokens, dim // heads, device=args.device, dtype=dtype)
               for _ in range(3))
    keep = torch.ones(tiles, 1, 1, tokens, dtype=torch.bool, device=args.device)
    out = {}
    for label, mask in (("masked", keep), ("unmasked", None)):
        def run():
            with torch.inference_mode():
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            if args.device == "cuda":
                torch.cuda.synchronize()
        run()
        started = time.perf_counter()
        for _ in range(args.repeat):
            run()
        out[label] = round(1000 * (time.perf_counter() - started) / args.repeat / tiles, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base", choices=["tiny", "small", "base"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--tiles", type=int, default=1, help="tiles per forward batch")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--subpatch-depth", type=int, default=None,
                        help="sub-patch transformer blocks (the official base uses 6)")
    parser.add_argument("--cases", nargs="+", default=list(CASES)[:3], choices=list(CASES))
    parser.add_argument("--side-m", type=float, default=SIDE_M, help="tile side, metres")
    parser.add_argument("--patch-m", type=float, default=PATCH_M, help="patch size, metres")
    parser.add_argument("--profile", action="store_true", help="add the time per kernel or op")
    parser.add_argument("--flops", action="store_true",
                        help="add the forward's FLOPs per tile, the rate achieved and each part's share")
    parser.add_argument("--attention", action="store_true",
                        help="add the encoder's attention alone, with and without its key mask")
    args = parser.parse_args()
    for name in args.cases:  # one process per case keeps peak RSS per case
        print(json.dumps(run_case(name, args)), flush=True)


if __name__ == "__main__":
    main()
