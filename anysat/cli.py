"""`anysat` command line: the same runs as the Prefect flows, without a Prefect server."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import AnySatError
from .request import DEFAULT_MODEL, DEFAULT_SENSORS, RegionRequest

DEMO_BBOX = (5.3189, 50.6286, 5.3334, 50.6378)  # the demo catalog's 1 km2 in Belgium
DEMO_DATES = ("2020-11-01", "2021-10-31")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bbox", type=_floats, help="west,south,east,north in degrees")
    parser.add_argument("--geojson", help="path of a GeoJSON file with the region")
    parser.add_argument("--start", help="first date, YYYY-MM-DD")
    parser.add_argument("--end", help="last date (inclusive), YYYY-MM-DD")
    parser.add_argument("--sensors", default=",".join(DEFAULT_SENSORS),
                        help="comma-separated sensor names or aliases (s2, s1, dem)")
    parser.add_argument("--patch-size-m", type=float, default=30.0)
    parser.add_argument("--tile-size-m", type=float, default=600.0)
    parser.add_argument("--catalog", default="demo",
                        help="provider name (demo, planetary-computer, earth-search), STAC API "
                             "URL or static catalog.json")
    parser.add_argument("--output", default="outputs", help="output URI: a path, s3://, gs://, ...")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="checkpoint path/URI, `demo` (the shipped checkpoint) or a size "
                             "name for a random initialisation (tiny, small, base)")
    parser.add_argument("--tiles-per-batch", type=int, default=2)
    parser.add_argument("--max-cloud", type=float, help="scene cloud cover limit, percent")
    parser.add_argument("--time-bin", help="median per period: MS monthly, QS quarterly, 14D...")
    parser.add_argument("--cube-backend", choices=["odc-stac", "stackstac"], default="odc-stac")
    parser.add_argument("--demo", action="store_true",
                        help="the embedded demo region and dates where not given")


def request_from_args(args: argparse.Namespace) -> RegionRequest:
    geojson = None
    if args.geojson:
        try:
            with open(args.geojson) as f:
                geojson = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise AnySatError(f"cannot read --geojson {args.geojson}: {exc}") from None
    bbox = args.bbox if args.bbox or geojson else (DEMO_BBOX if args.demo else None)
    return RegionRequest.build(
        bbox=bbox, geojson=geojson,
        start=args.start or (DEMO_DATES[0] if args.demo else None),
        end=args.end or (DEMO_DATES[1] if args.demo else None),
        sensors=tuple(s.strip() for s in args.sensors.split(",") if s.strip()),
        patch_size_m=args.patch_size_m, tile_size_m=args.tile_size_m, catalog=args.catalog,
        output_uri=args.output, model=args.model, tiles_per_batch=args.tiles_per_batch,
        max_cloud=args.max_cloud, time_bin=args.time_bin, cube_backend=args.cube_backend,
    )


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=DEFAULT_MODEL,
                        help="checkpoint path/URI to judge (default: the shipped one)")
    parser.add_argument("--output", default="outputs",
                        help="where evaluation.md and evaluation.json go")
    parser.add_argument("--tasks", default="crop-types,land-cover",
                        help="comma-separated: crop-types, land-cover")
    parser.add_argument("--max-points", type=int,
                        help="a class-stratified sample of this many crop-type points (quick runs)")


def add_points_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("table", help="points table (Parquet): per sensor `<sensor>.<band>` and "
                                      "`<sensor>.dates` list columns, or WorldCereal extractions")
    parser.add_argument("--out", required=True, help="output Parquet: the input's other columns "
                                                     "and an `embedding` list column")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint path/URI or a size name")
    parser.add_argument("--batch-size", type=int, default=256, help="points per forward")


def run_embed(args: argparse.Namespace) -> None:
    from .pipeline import run_region

    manifest = run_region(request_from_args(args))
    print(json.dumps({k: manifest[k] for k in ("layer", "preview", "tiles", "area_km2")}, indent=2))


def run_evaluate(args: argparse.Namespace) -> None:
    from .evaluate import evaluate, markdown_table

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    rows = evaluate(args.checkpoint, args.output, tasks, max_points=args.max_points)
    print(markdown_table(rows, args.checkpoint))


def run_embed_points(args: argparse.Namespace) -> None:
    from .points import embed_points_table

    n = embed_points_table(args.table, args.out, args.model, args.batch_size)
    print(json.dumps({"points": n, "output": args.out}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anysat", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    embed = commands.add_parser("embed", help="embed a region into a Zarr layer and a preview")
    add_request_arguments(embed)
    embed.set_defaults(run=run_embed)
    evaluate = commands.add_parser("evaluate", help="probe a checkpoint on real labels against "
                                                    "raw features and random init")
    add_evaluate_arguments(evaluate)
    evaluate.set_defaults(run=run_evaluate)
    points = commands.add_parser("embed-points", help="embed point time series (a table) "
                                                      "into vectors")
    add_points_arguments(points)
    points.set_defaults(run=run_embed_points)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        args.run(args)
    except AnySatError as exc:
        print(f"anysat: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
