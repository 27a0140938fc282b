"""`anysat` command line: the same runs as the Prefect flows, without a Prefect server."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import AnySatError
from .request import DEFAULT_SENSORS, RegionRequest

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
    parser.add_argument("--model", default="tiny", help="checkpoint path/URI or a size name")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anysat", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    embed = commands.add_parser("embed", help="embed a region into a Zarr layer and a preview")
    add_request_arguments(embed)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        from .pipeline import run_region

        manifest = run_region(request_from_args(args))
    except AnySatError as exc:
        print(f"anysat: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: manifest[k] for k in ("layer", "preview", "tiles", "area_km2")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
