"""Pretrain the checkpoint that ships (`catalogs/checkpoints/demo`), reproducibly:

    python -m anysat.train.demo_checkpoint --out catalogs/checkpoints/demo    (make pretrain-demo)

Data: the demo catalog (Belgium, S2 L2A + S1 + DEM, 12 months) and the BigEarthNet S2 + S1
pairs in catalogs/pretrain/ (Austria, Ireland, Portugal, Finland) -- never the WorldCereal
points or the eo-learn scene that `anysat evaluate` probes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time

import torch

from ..modalities import resolve_sensors
from ..model import AnySat, AnySatConfig
from ..resources import catalogs_dir
from .footprints import FootprintSampler, bigearthnet_footprints, demo_footprint
from .jepa import JEPAConfig
from .monitors import collapse_monitors
from .pretrain import pretrain, save_pretrained

log = logging.getLogger("anysat")

SENSORS = ["s2", "s1", "dem"]
PATCH_SIZES_M = [10.0, 20.0, 30.0, 60.0]
CHIP_SIZES_M = (60.0, 120.0)
PROBE_PATCH_M = 30.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="catalogs/checkpoints/demo", help="checkpoint folder/URI")
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--decorrelation", type=float, default=JEPAConfig.decorrelation_weight)
    parser.add_argument("--date-drop", type=float, default=JEPAConfig.date_drop)
    parser.add_argument("--modality-drop", type=float, default=JEPAConfig.modality_drop)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fp32", action="store_true", help="store fp32 weights (default fp16)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    specs = resolve_sensors(SENSORS)
    by_name = {s.name: s for s in specs}
    footprints = [demo_footprint(specs), *bigearthnet_footprints(
        catalogs_dir() / "pretrain" / "bigearthnet", by_name["sentinel-2-l2a"],
        by_name["sentinel-1"])]
    log.info("pretraining footprints: %s", ", ".join(
        f"{f.name} ({f.side_m:g} m, {'+'.join(f.gsd_m)})" for f in footprints))
    sampler = FootprintSampler(footprints, CHIP_SIZES_M, seed=args.seed)
    probe = FootprintSampler(footprints[:1], (120.0,), seed=args.seed + 99).sample(16)

    jepa_config = JEPAConfig(decorrelation_weight=args.decorrelation, date_drop=args.date_drop,
                             modality_drop=args.modality_drop)
    config = dataclasses.replace(AnySatConfig.from_size("tiny", specs), dim=args.dim,
                                 depth=args.depth)
    torch.manual_seed(args.seed)
    model = AnySat(config).to(args.device)
    started = time.perf_counter()
    jepa, history = pretrain(
        model, sampler, args.steps, PATCH_SIZES_M, batch_size=args.batch_size, lr=args.lr,
        config=jepa_config, seed=args.seed, log_every=100, monitor_every=250,
        monitor=lambda m: collapse_monitors(m, probe, PROBE_PATCH_M))
    curve = [{k: round(v, 5) if isinstance(v, float) else v for k, v in h.items()}
             for h in history if h["step"] % 50 == 0 or h["step"] == len(history) - 1]
    save_pretrained(jepa, args.out, history, {
        "data": [f.name for f in footprints],
        "data_licences": {"demo": "catalogs/demo/LICENSE (MIT, WorldCereal; Copernicus data)",
                          "bigearthnet": "catalogs/pretrain/bigearthnet/LICENSE (Apache-2.0; "
                                         "BigEarthNet CDLA-Permissive-1.0; Copernicus data)"},
        "recipe": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                   "seed": args.seed, "patch_sizes_m": PATCH_SIZES_M,
                   "chip_sizes_m": list(CHIP_SIZES_M), "jepa": dataclasses.asdict(jepa_config),
                   "command": " ".join(["python -m anysat.train.demo_checkpoint",
                                         *(sys.argv[1:] if argv is None else argv)])},
        "seconds": round(time.perf_counter() - started, 1),
        "curve": curve,
    }, dtype=torch.float32 if args.fp32 else torch.float16)
    log.info("wrote %s (%d steps, %.0f s)", args.out, args.steps, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
