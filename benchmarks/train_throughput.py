"""Pretraining throughput through the real path (`anysat pretrain`, torchrun for nproc > 1):
one JSON line per case.

    python benchmarks/train_throughput.py                       # CPU: tiny and base, 1 x 2 and 2 x 1, local and S3
    python benchmarks/train_throughput.py --chips outputs/bench-chips.zarr --device cuda --dtype bf16 \\
        --models base --batch-sizes 8 32 128 --workers 6          # GPU: a batch-size sweep

Keys: case, model, nproc, threads, workers, batch_size, device, dtype, store, samples_per_s,
loader_wait_share (share of step time spent waiting for the loader), peak_rss_mb (rank 0),
gpu_busy (mean nvidia-smi utilisation while training, on a GPU), gpu_peak_mb, steps.
The first logged window (start-up, warm-up) is left out of the rates. Without --chips the
demo catalog is ingested into 120 m chips first (81 chips, about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from s3_loopback import s3_copy  # noqa: E402


def ingest_demo(store: str) -> None:
    subprocess.run([sys.executable, "-m", "anysat.cli", "ingest", "--demo", "--chip-size-m", "120",
                    "--store", store, "--tiles-per-batch", "16"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)


class GpuSampler:
    """nvidia-smi utilisation samples (percent) every 100 ms while running."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu",
                                      "--format=csv,noheader,nounits", "-lms", "100"],
                                     stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append((time.time(), float(line.split(",")[0])))
            except ValueError:
                pass

    def mean_between(self, start: float, end: float) -> float | None:
        self.proc.terminate()
        values = [v for t, v in self.samples if start <= t <= end]
        return round(sum(values) / len(values) / 100, 3) if values else None


def run_case(args, chips: str, model: str, nproc: int, threads: int, batch_size: int,
             store: str) -> dict:
    out = tempfile.mkdtemp(prefix="bench-run-")
    command = [sys.executable, "-m", "anysat.cli", "pretrain", "--chips", chips, "--out", out,
               "--model", model, "--steps", str(args.steps), "--batch-size", str(batch_size),
               "--log-every", str(args.log_every), "--checkpoint-every", str(args.steps),
               "--nproc", str(nproc), "--threads", str(threads), "--workers", str(args.workers),
               "--device", args.device, "--dtype", args.dtype, "--crop-sizes-m", args.crop_sizes_m,
               "--json-progress"]
    sampler = GpuSampler() if args.device.startswith("cuda") else None
    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads),
                                "PYTHONUNBUFFERED": "1"})
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(job.stderr), daemon=True).start()
    progress, arrived = [], []  # each progress line, and when it arrived (GPU busy window)
    for line in job.stdout:
        if line.startswith("{") and (event := json.loads(line)).get("event") == "progress":
            progress.append(event)
            arrived.append(time.time())
    job.wait()
    if job.returncode or len(progress) < 2:
        raise SystemExit(f"case failed ({job.returncode}):\n{''.join(stderr)[-3000:]}")
    steady = progress[1:]
    case = {"case": f"{model}-{nproc}x{threads}-b{batch_size}-{store}-{args.device}", "model": model,
            "nproc": nproc, "threads": threads, "workers": args.workers, "batch_size": batch_size,
            "device": args.device, "dtype": args.dtype, "store": store, "steps": args.steps,
            "samples_per_s": round(sum(e["samples_per_s"] for e in steady) / len(steady), 2),
            "loader_wait_share": round(sum(e["loader_wait_share"] for e in steady) / len(steady), 4),
            "peak_rss_mb": progress[-1]["peak_rss_mb"]}
    if sampler is not None:
        # the steady windows: from the first progress line to the last, not the start-up
        # before them nor the final checkpoint after (which took most of a base case's time)
        case["gpu_busy"] = sampler.mean_between(arrived[0], arrived[-1])
        case["gpu_peak_mb"] = progress[-1].get("gpu_peak_mb")
    return case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chips", help="chip store (default: ingest the demo catalog)")
    parser.add_argument("--models", default="tiny,base")
    parser.add_argument("--layouts", default="1x2,2x1", help="processes x threads, comma-separated")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    parser.add_argument("--stores", default="local,s3")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1, help="loader processes per rank")
    parser.add_argument("--crop-sizes-m", default="60,120")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    chips = args.chips or str(Path(tempfile.mkdtemp(prefix="bench-chips-")) / "chips.zarr")
    if not args.chips:
        ingest_demo(chips)
    stores = {"local": os.path.abspath(chips) if "://" not in chips else chips}
    if "s3" in args.stores.split(","):
        stores["s3"] = s3_copy(chips)
    for model in args.models.split(","):
        for layout in args.layouts.split(","):
            nproc, threads = (int(v) for v in layout.split("x"))
            for batch_size in args.batch_sizes:
                for store in args.stores.split(","):
                    print(json.dumps(run_case(args, stores[store], model, nproc, threads,
                                              batch_size, store)), flush=True)


if __name__ == "__main__":
    main()
