"""How fast one loader process makes training batches (`ChipStream`, no model): one JSON line
per case. A GPU step must not wait for them: at batch B, a GPU doing S samples/s needs
S / samples_per_s loader workers per rank.

    python benchmarks/chip_stream.py                                  # the demo catalog's 120 m chips
    python benchmarks/chip_stream.py --chips outputs/pretrain-demo/chips/demo.zarr,outputs/pretrain-demo/chips/bigearthnet.zarr

Keys: case, store, batch_size, samples_per_s, s_per_batch, batches. The S3 store is the
loopback server (benchmarks/s3_loopback.py), whose own rate (150-600 GETs/s on 2 cores)
bounds the S3 cases here. The first batch (imports, the first reads) is left out; each case
runs about --seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3_loopback import s3_copy  # noqa: E402
from train_throughput import ingest_demo  # noqa: E402

from anysat.train.stream import ChipStream  # noqa: E402
from anysat.train.trainer import TrainConfig, prepare  # noqa: E402


def run_case(stores: list[str], store: str, batch_size: int, seconds: float) -> dict:
    cfg = TrainConfig(chips=stores, out=tempfile.mkdtemp(prefix="bench-stream-"),
                      batch_size=batch_size)
    prepared = prepare(cfg, 1)
    batches = iter(ChipStream(prepared.table, prepared.model.modalities, cfg.stream_config()))
    next(batches)
    started, count = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        next(batches)
        count += 1
    elapsed = time.perf_counter() - started
    return {"case": f"stream-b{batch_size}-{store}", "store": store, "batch_size": batch_size,
            "samples_per_s": round(count * batch_size / elapsed, 1),
            "s_per_batch": round(elapsed / count, 4), "batches": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chips", help="chip stores, comma-separated (default: ingest the demo catalog)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--stores", default="local,s3")
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as a DataLoader worker
    if args.chips:
        local = [os.path.abspath(c) if "://" not in c else c for c in args.chips.split(",")]
    else:
        local = [str(Path(tempfile.mkdtemp(prefix="bench-chips-")) / "chips.zarr")]
        ingest_demo(local[0])
    stores = {"local": local}
    if "s3" in args.stores.split(","):
        stores["s3"] = [s3_copy(c, f"chips-{i}.zarr") for i, c in enumerate(local)]
    for store in args.stores.split(","):
        for batch_size in args.batch_sizes:
            print(json.dumps(run_case(stores[store], store, batch_size, args.seconds)), flush=True)


if __name__ == "__main__":
    main()
