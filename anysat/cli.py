"""`anysat` command line: the same runs as the Prefect flows, without a Prefect server."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Iterable
from types import UnionType
from typing import Literal, Union, get_args, get_origin

from pydantic_core import PydanticUndefined

from .errors import AnySatError
from .redact import redact_logs, without_secrets
from .request import DEFAULT_MODEL, REGION_FIELDS, RegionRequest

DEMO_BBOX = (5.3189, 50.6286, 5.3334, 50.6378)  # the demo catalog's 1 km2 in Belgium
DEMO_DATES = ("2020-11-01", "2021-10-31")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _strings(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_model_options(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """One option per RegionRequest field, built from the field itself (type, choices,
    default and description): the request model is where fields are declared. Options not
    given stay out of the namespace, so the model's defaults apply."""
    for name in names:
        info = RegionRequest.model_fields[name]
        extra = info.json_schema_extra or {}
        if extra.get("cli") is False:
            continue
        annotation = info.annotation
        if get_origin(annotation) in (Union, UnionType):  # X | None
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        kwargs: dict = {"dest": name, "default": argparse.SUPPRESS}
        if get_origin(annotation) is Literal:
            kwargs["choices"] = list(get_args(annotation))
        elif get_origin(annotation) is tuple:
            numbers = get_args(annotation)[0] is float
            kwargs["type"] = _floats if numbers else _strings
        elif annotation in (int, float):
            kwargs["type"] = annotation
        default = info.get_default()
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        suffix = f" (default: {shown})" if shown not in (None, "", PydanticUndefined) else ""
        kwargs["help"] = (info.description or "") + ("; comma-separated" if get_origin(annotation)
                                                     is tuple else "") + suffix
        kwargs["help"] = kwargs["help"].replace("%", "%%")  # argparse formats help with %
        parser.add_argument(extra.get("cli", "--" + name.replace("_", "-")), **kwargs)


def add_region_arguments(parser: argparse.ArgumentParser) -> None:
    """Where, when, which sensors, from which catalog: shared by `embed` and `ingest`."""
    add_model_options(parser, REGION_FIELDS)
    parser.add_argument("--geojson", help="path of a GeoJSON file with the region")
    parser.add_argument("--modalities", help="a folder of your own sensor specs (YAML, as "
                                             "catalogs/modalities/); sets ANYSAT_MODALITIES")
    parser.add_argument("--demo", action="store_true",
                        help="the embedded demo region and dates where not given")


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    add_region_arguments(parser)
    add_model_options(parser, [n for n in RegionRequest.model_fields if n not in REGION_FIELDS])


def _read_geojson(path: str | None) -> dict | None:
    if not path:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise AnySatError(f"cannot read --geojson {path}: {exc}") from None


def region_fields(args: argparse.Namespace) -> dict:
    """The request fields given on the command line (and the demo's region and dates with
    --demo where not given)."""
    if args.modalities:  # an environment variable, so that worker processes see it too
        os.environ["ANYSAT_MODALITIES"] = os.pathsep.join(
            filter(None, [os.environ.get("ANYSAT_MODALITIES"), args.modalities]))
    fields = {name: getattr(args, name) for name in RegionRequest.model_fields if hasattr(args, name)}
    geojson = _read_geojson(args.geojson)
    if geojson is not None:
        fields["geojson"] = geojson
    if args.demo:
        if "bbox" not in fields and geojson is None:
            fields["bbox"] = DEMO_BBOX
        fields.setdefault("start", DEMO_DATES[0])
        fields.setdefault("end", DEMO_DATES[1])
    return fields


def request_from_args(args: argparse.Namespace) -> RegionRequest:
    return RegionRequest.build(**region_fields(args))


def add_ingest_arguments(parser: argparse.ArgumentParser) -> None:
    add_region_arguments(parser)
    parser.add_argument("--chip-size-m", type=float, default=240.0,
                        help="chip side in metres (a multiple of every sensor's GSD); chips "
                             "are the tiles of the fixed grid of this size")
    parser.add_argument("--store", required=True, help="chip store URI: a path, s3://...")


def ingest_request_from_args(args: argparse.Namespace) -> RegionRequest:
    from .train.ingest import ingest_request

    return ingest_request(args.chip_size_m, args.store, **region_fields(args))


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    from .train.trainer import TrainConfig as C

    parser.add_argument("--chips", required=True, help="chip store URI(s), comma-separated")
    parser.add_argument("--out", required=True, help="run URI: checkpoints, metrics, final model")
    parser.add_argument("--model", default=C.model, choices=["tiny", "small", "base"])
    parser.add_argument("--sensors", help="comma-separated; default: every sensor the chips hold")
    parser.add_argument("--dim", type=int, help="encoder width (default: the size's)")
    parser.add_argument("--depth", type=int, help="encoder blocks (default: the size's)")
    parser.add_argument("--steps", type=int, default=C.steps)
    parser.add_argument("--batch-size", type=int, default=C.batch_size, help="per process")
    parser.add_argument("--accumulation", type=int, default=C.accumulation,
                        help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, default=C.lr)
    parser.add_argument("--weight-decay", type=float, default=C.weight_decay)
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--crop-sizes-m", type=_floats, default=C.crop_sizes_m)
    parser.add_argument("--patch-sizes-m", type=_floats, default=C.patch_sizes_m)
    parser.add_argument("--shuffle-buffer", type=int, default=C.shuffle_buffer,
                        help="chips held to shuffle from, per loader")
    parser.add_argument("--sensor-drop", type=float, default=C.sensor_drop)
    parser.add_argument("--date-drop", type=float, default=C.date_drop)
    parser.add_argument("--modality-drop", type=float, default=C.modality_drop)
    parser.add_argument("--decorrelation", type=float, default=C.decorrelation)
    parser.add_argument("--seed", type=int, default=C.seed)
    parser.add_argument("--checkpoint-every", type=int, default=C.checkpoint_every)
    parser.add_argument("--keep-checkpoints", type=int, default=C.keep_checkpoints)
    parser.add_argument("--log-every", type=int, default=C.log_every)
    parser.add_argument("--monitor-every", type=int, default=C.monitor_every,
                        help="collapse monitors on a fixed probe batch every N steps (0: off)")
    parser.add_argument("--workers", type=int, default=C.workers, help="loader processes per rank")
    parser.add_argument("--nproc", type=_count, default=1, help="processes (torchrun when > 1)")
    parser.add_argument("--threads", type=_count, help="torch threads per process")
    parser.add_argument("--device", default=C.device, help="auto, cpu, cuda")
    parser.add_argument("--dtype", default=C.dtype, choices=["auto", "fp32", "bf16"])
    parser.add_argument("--save-dtype", default=C.save_dtype, choices=["float32", "float16"])
    parser.add_argument("--json-progress", action="store_true",
                        help="print one JSON line per log step (what the Prefect flow reads)")


def train_config_from_args(args: argparse.Namespace, argv: list[str]):
    from .train.trainer import TrainConfig

    return TrainConfig(
        chips=[c.strip() for c in args.chips.split(",") if c.strip()], out=args.out,
        model=args.model, sensors=[s.strip() for s in args.sensors.split(",")] if args.sensors else None,
        dim=args.dim, depth=args.depth, steps=args.steps, batch_size=args.batch_size,
        accumulation=args.accumulation, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, shuffle_buffer=args.shuffle_buffer,
        keep_checkpoints=args.keep_checkpoints,
        crop_sizes_m=tuple(args.crop_sizes_m), patch_sizes_m=tuple(args.patch_sizes_m),
        sensor_drop=args.sensor_drop, date_drop=args.date_drop, modality_drop=args.modality_drop,
        decorrelation=args.decorrelation, seed=args.seed, checkpoint_every=args.checkpoint_every,
        log_every=args.log_every, monitor_every=args.monitor_every, workers=args.workers,
        device=args.device, dtype=args.dtype,
        save_dtype=args.save_dtype, json_progress=args.json_progress,
        # under torchrun the parent's command line (with --nproc) is what reproduces the run
        provenance={"command": os.environ.get("ANYSAT_PRETRAIN_COMMAND")
                    or " ".join(["anysat pretrain", *argv])})


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=DEFAULT_MODEL,
                        help="checkpoint path/URI to judge (default: the shipped one)")
    parser.add_argument("--output", default="outputs",
                        help="where evaluation.md and evaluation.json go")
    parser.add_argument("--tasks", default="crop-types,land-cover",
                        help="comma-separated: crop-types, land-cover")
    parser.add_argument("--max-points", type=_count,
                        help="a class-stratified sample of this many crop-type points (quick runs)")
    parser.add_argument("--device", default="cpu", help="where the embeddings are computed (cpu, cuda)")


def add_points_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("table", help="points table (Parquet): per sensor `<sensor>.<band>` and "
                                      "`<sensor>.dates` list columns, or WorldCereal extractions")
    parser.add_argument("--out", required=True, help="output Parquet: the input's other columns "
                                                     "and an `embedding` list column")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint path/URI or a size name")
    parser.add_argument("--batch-size", type=_count, default=256, help="points per forward")


def run_embed(args: argparse.Namespace) -> None:
    from .pipeline import run_region

    manifest = run_region(request_from_args(args))
    print(json.dumps({k: manifest[k] for k in ("layers", "tiles", "area_km2", "plan")}, indent=2))


def run_evaluate(args: argparse.Namespace) -> None:
    from .evaluate import evaluate, markdown_table

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    rows = evaluate(args.checkpoint, args.output, tasks, max_points=args.max_points,
                    device=args.device)
    print(markdown_table(rows, args.checkpoint))


def run_embed_points(args: argparse.Namespace) -> None:
    from .points import embed_points_table

    n = embed_points_table(args.table, args.out, args.model, args.batch_size)
    print(json.dumps({"points": n, "output": args.out}))


# End-to-end km2/s of `benchmarks/embed_region.py` (demo checkpoint, S2 + S1 + DEM, 30 m
# patches) on a 2-core CPU: what `plan --estimate` assumes unless told otherwise.
MEASURED_KM2_PER_S = 0.5  # 2026-11-26: 64 tiles of 600 m, 23.04 km2 in 41-46 s


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    add_request_arguments(parser)
    parser.add_argument("--estimate", action="store_true",
                        help="only count tiles per UTM zone and estimate device-hours (no "
                             "search, nothing written; needs only the region and tile size)")
    parser.add_argument("--km2-per-s", type=_positive, default=MEASURED_KM2_PER_S,
                        help="throughput to estimate with (default: measured on a 2-core CPU)")


def run_plan(args: argparse.Namespace) -> None:
    if args.estimate:
        return estimate_plan(args)
    from . import lease, storage
    from .pipeline import plan_run

    request = request_from_args(args)
    with lease.hold(request.output_uri, "anysat plan"):
        plan = plan_run(request, create_layers=False)
    tiles = plan.tiles
    print(json.dumps({
        "plan": plan.plan_uri, "hash": plan.hash, "tiles": len(tiles),
        "area_km2": round(plan.area_km2, 4), "blocks": int(tiles["block"].nunique()),
        "tiles_without_items": int((tiles["status"] == "no-items").sum()),
        "zones": [{"epsg": z.epsg, "tiles": z.tiles, "area_km2": round(z.area_km2, 4)}
                  for z in plan.zones],
        "items": json.loads(storage.read_bytes(plan.plan_uri))["items"],
    }, indent=2))


def estimate_plan(args: argparse.Namespace) -> None:
    from .tiles import plan_zones

    today = dt.date.today().isoformat()  # the grid does not depend on dates
    fields = {**region_fields(args), "start": today, "end": today}
    # sizes checked as a run would (a tile a whole number of patches), nothing else
    request = RegionRequest.build(**{k: v for k, v in fields.items()
                                     if k in REGION_FIELDS or k.endswith("_size_m")})
    zones = plan_zones(request.geometry, request.tile_size_m)
    for zone in zones:
        print(json.dumps({"zone": f"EPSG:{zone.epsg}", "tiles": len(zone),
                          "area_km2": round(zone.area_km2, 1)}))
    area = sum(z.area_km2 for z in zones)
    print(json.dumps({"zones": len(zones), "tiles": sum(len(z) for z in zones),
                      "area_km2": round(area, 1), "km2_per_s": args.km2_per_s,
                      "device_hours": round(area / args.km2_per_s / 3600, 2)}))


def add_similar_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--layer", help="an embedding layer (Zarr) URI")
    source.add_argument("--vectors", help="a patch GeoParquet URI (`--products vectors`)")
    parser.add_argument("--point", type=_floats, required=True, help="lon,lat of the query patch")
    parser.add_argument("-k", type=_count, default=10, help="how many patches")


def run_similar(args: argparse.Namespace) -> None:
    from .products.vectors import similar_in_layer, similar_in_vectors

    if len(args.point) != 2:
        raise AnySatError(f"--point takes lon,lat; got {len(args.point)} numbers")
    lon, lat = args.point
    found = (similar_in_layer(args.layer, lon, lat, args.k) if args.layer
             else similar_in_vectors(args.vectors, lon, lat, args.k))
    for row in found:
        print(json.dumps(row))


def run_ingest(args: argparse.Namespace) -> None:
    from .train.ingest import run_ingest

    print(json.dumps(run_ingest(ingest_request_from_args(args)), indent=2))


def run_pretrain(args: argparse.Namespace) -> None:
    import subprocess

    import torch

    from .train.trainer import prepare, torchrun_command, train

    argv = args.argv
    cfg = train_config_from_args(args, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        prepare(cfg, args.nproc)  # bad input fails here, before any process starts
        env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}),
               "ANYSAT_PRETRAIN_COMMAND": cfg.provenance["command"]}
        code = subprocess.run(torchrun_command(argv, args.nproc), env=env).returncode
        if code:
            raise AnySatError(f"pretraining failed: torchrun exited with {code} (see the log "
                              f"above); rerun the same command to resume from {cfg.out}")
        return
    summary = train(cfg)
    if int(os.environ.get("RANK", 0)) == 0 and not cfg.json_progress:
        print(json.dumps(summary, indent=2))


def attach_negative_values(argv: list[str]) -> list[str]:
    """`--bbox -10,35,30,70` as `--bbox=-10,...` (and `--point`): argparse takes a value that
    starts with a minus sign (any western place) for an option otherwise."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in ("--bbox", "--point") and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anysat", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_arguments, run in (
            ("embed", "embed a region into a Zarr layer and a preview", add_request_arguments,
             run_embed),
            ("evaluate", "probe a checkpoint on real labels against raw features and random init",
             add_evaluate_arguments, run_evaluate),
            ("embed-points", "embed point time series (a table) into vectors",
             add_points_arguments, run_embed_points),
            ("plan", "plan a run (tiles per UTM zone, items per tile) and save it under the "
                     "output; --estimate only counts tiles", add_plan_arguments, run_plan),
            ("similar", "the patches most like a place (cosine similarity), over a layer or "
                        "patch vectors", add_similar_arguments, run_similar),
            ("ingest", "write training chips of a region and dates to a chip store",
             add_ingest_arguments, run_ingest),
            ("pretrain", "JEPA pretraining from chip stores (torchrun DDP with --nproc > 1), "
                         "resumable", add_pretrain_arguments, run_pretrain)):
        command = commands.add_parser(name, help=help_text)
        add_arguments(command)
        command.set_defaults(run=run)
    argv = attach_negative_values(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv[1:]  # after the command name: what a torchrun child gets
    # torchrun children: rank 0 tells the story, the others only warn
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    redact_logs(logging.getLogger("anysat"))  # no signed URL in any log line
    try:
        args.run(args)
    except AnySatError as exc:
        print(f"anysat: error: {without_secrets(str(exc))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
