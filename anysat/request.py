"""A region request (what an analyst asks for), validated once at the boundary."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      model_validator)
from shapely.errors import ShapelyError
from shapely.geometry import MultiPolygon, box, shape
from shapely.geometry.base import BaseGeometry
from shapely.validation import explain_validity

from .devices import device_problem
from .errors import RequestError
from .modalities import ModalitySpec, resolve_sensors
from .sizes import is_multiple

DEFAULT_SENSORS = ("sentinel-2-l2a", "sentinel-1", "copernicus-dem")
DEFAULT_MODEL = "demo"  # the pretrained checkpoint that ships (catalogs/checkpoints/demo)
MAX_TILE_SIZE_M = 20_000.0  # 2,000 x 2,000 px of Sentinel-2 per tile and date
UTM_SOUTH, UTM_NORTH = -80.0, 84.0  # latitudes the UTM system is defined over
INT8_FROM_KM2 = 10_000.0  # `quantize="auto"` stores larger regions' layers as int8
# what chooses where, when and from what: the fields `anysat ingest` shares with `embed`
REGION_FIELDS = ("bbox", "geojson", "start", "end", "sensors", "catalog", "catalog_naming",
                 "tiles_per_batch", "max_cloud", "time_bin", "cube_backend")


def _iso_date(value: Any) -> Any:
    """Dates as YYYY-MM-DD (or date objects): pydantic alone would take '2020' as an error
    without the value and a Unix timestamp as a date."""
    if isinstance(value, (dt.date, dt.datetime)) or value is None:
        return value
    try:
        return dt.date.fromisoformat(str(value)) if len(str(value)) == 10 else _bad_date(value)
    except ValueError:
        return _bad_date(value)


def _bad_date(value: Any):
    raise ValueError(f"{value!r} is not a date as YYYY-MM-DD")


IsoDate = Annotated[dt.date, BeforeValidator(_iso_date)]
# metres: positive and finite (inf and nan would overflow the tile grid)
Metres = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class RegionRequest(BaseModel):
    """Region (lon/lat bbox or GeoJSON), dates (inclusive), sensors, sizes in metres, output."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Each field's description is also its `anysat embed` option's help (anysat.cli builds
    # the options from these fields), so fields and defaults are declared here only.
    bbox: tuple[float, float, float, float] | None = Field(
        None, description="west,south,east,north in degrees (west > east: across the antimeridian)")
    geojson: dict[str, Any] | None = Field(
        None, description="the region as GeoJSON (Polygon/MultiPolygon, lon/lat); the CLI takes "
                          "a file path", json_schema_extra={"cli": False})
    start: IsoDate = Field(description="first date, YYYY-MM-DD")
    end: IsoDate = Field(description="last date (inclusive), YYYY-MM-DD")
    sensors: tuple[str, ...] = Field(
        DEFAULT_SENSORS, description="sensor names or aliases (s2, s1, dem, landsat, naip, ...)")
    patch_size_m: Metres = Field(30.0, description="patch side in metres, a multiple of every "
                                                   "sensor's GSD: one embedding per patch")
    tile_size_m: Metres = Field(600.0, description="tile side in metres, a multiple of the patch "
                                                   "size: the unit read and embedded at once")
    catalog: str = Field("demo", description="provider name (demo, planetary-computer, "
                                             "earth-search, or one of ANYSAT_PROVIDERS), STAC API "
                                             "URL, or static catalog.json path/URI")
    catalog_naming: str | None = Field(
        None, description="whose collection ids and asset keys the catalog uses (a key of the "
                          "specs' `collections`: planetary-computer, earth-search, ...); default: "
                          "the provider's own, or planetary-computer for a URL or path")
    output_uri: str = Field("outputs", description="output URI: a path, s3://, gs://, ...",
                            json_schema_extra={"cli": "--output"})
    model: str = Field(DEFAULT_MODEL, description="checkpoint path/URI, `demo` (the shipped "
                                                  "checkpoint) or a size name for a random "
                                                  "initialisation (tiny, small, base)")
    tiles_per_batch: int = Field(64, ge=1, description="tiles per task (a Prefect task run) "
                                 "at most: tasks take whole reading squares (up to 8 x 8 "
                                 "tiles, `read_side` in plan.json), one alone where it holds "
                                 "more")
    batch_size: int = Field(4, ge=1, description="tiles per forward of the model")
    device: str = Field("cpu", description="cpu, cuda, cuda:N")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="autocast dtype of the "
                                                                       "forward")
    max_cloud: float | None = Field(None, ge=0, le=100, description="scene cloud cover limit, %")
    time_bin: str | None = Field(None, description="median per period, a pandas offset alias: "
                                                   "MS monthly, QS quarterly, 14D...")
    cube_backend: Literal["odc-stac", "stackstac"] = Field("odc-stac", description="cube reader")
    quantize: Literal["auto", "none", "int8"] = Field(
        "auto", description="int8: layers a quarter of the size (a per-pixel scale; the rule is "
                            f"in the layer's attributes); auto: int8 for regions over "
                            f"{INT8_FROM_KM2:,.0f} km2, else float32")
    products: tuple[Literal["cog", "vectors", "clusters", "classes"], ...] = Field(
        (), description="besides the layer and its preview: cog (a GeoTIFF per block of tiles), "
                        "vectors (GeoParquet of patches and tiles), clusters (k-means map), "
                        "classes (a linear-probe map of --labels)")
    clusters: int = Field(8, ge=2, le=255, description="k of the cluster map")
    labels: str | None = Field(None, description="labels for the class map: GeoJSON Points or "
                                                 "Polygons with a `label` property, or "
                                                 "Parquet/CSV points with lon, lat, label")

    @model_validator(mode="after")
    def _check(self) -> RegionRequest:
        if (self.bbox is None) == (self.geojson is None):
            raise ValueError("give exactly one of bbox or geojson")
        if self.bbox is not None:
            west, south, east, north = self.bbox
            # west > east is a box across the antimeridian (RFC 7946), if narrower than 180
            # degrees: a wider one is more likely west and east swapped
            width = east - west if west < east else east + 360 - west
            if not (-180 <= west <= 180 and -180 <= east <= 180 and 0 < width
                    and (west < east or width <= 180) and -90 <= south < north <= 90):
                raise ValueError(
                    f"bbox {self.bbox} must be (west, south, east, north) in degrees with "
                    "west < east (or west > east across the antimeridian) and south < north"
                )
        if self.start > self.end:
            raise ValueError(f"start {self.start} is after end {self.end}")
        if not self.sensors:
            raise ValueError("name at least one sensor")
        if self.tile_size_m > MAX_TILE_SIZE_M:
            raise ValueError(
                f"tile_size_m {self.tile_size_m:,.0f} is over {MAX_TILE_SIZE_M:,.0f} m: a tile is read and "
                "embedded in one piece, in memory; use tiles of a few km (the run splits the "
                "region into as many as it needs)")
        if not is_multiple(self.tile_size_m, self.patch_size_m):
            raise ValueError(
                f"tile_size_m {self.tile_size_m:g} is not a multiple of patch_size_m "
                f"{self.patch_size_m:g}"
            )
        if self.time_bin is not None:
            import pandas as pd

            try:
                offset = pd.tseries.frequencies.to_offset(self.time_bin)
            except ValueError:
                offset = None
            if offset is None or offset.n <= 0:
                raise ValueError(f"time_bin {self.time_bin!r} is not a positive pandas offset "
                                 "alias (MS monthly, QS quarterly, 14D...)")
        if problem := device_problem(self.device):
            raise ValueError(problem)
        if self.dtype == "fp16" and self.device == "cpu":
            raise ValueError("dtype fp16 needs a CUDA device; on CPU use fp32 or bf16")
        if "classes" in self.products and not self.labels:
            raise ValueError("the classes product needs labelled points or polygons (labels / --labels)")
        south, north = self.geometry.bounds[1::2]  # parses the GeoJSON: a bad one fails here
        if south < UTM_SOUTH or north > UTM_NORTH:
            reach = f"{north:g} N" if north > UTM_NORTH else f"{-south:g} S"
            raise ValueError(
                f"the region reaches {reach}: tiles are laid on UTM grids, defined from "
                f"{-UTM_SOUTH:g} S to {UTM_NORTH:g} N (the polar caps' UPS grids are not "
                "supported)")
        return self

    @classmethod
    def build(cls, **fields: Any) -> RegionRequest:
        """Validate fields; a bad one raises RequestError naming it and its value."""
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            raise RequestError(f"invalid request: {describe_errors(exc)}") from None

    @property
    def crosses_antimeridian(self) -> bool:
        return self.bbox is not None and self.bbox[0] > self.bbox[2]

    @property
    def search_region(self) -> BaseGeometry | tuple[float, float, float, float]:
        """What STAC searches get: the bbox as given, or the geometry (GeoJSON, or a bbox
        across the antimeridian as its two halves)."""
        return self.bbox if self.bbox is not None and not self.crosses_antimeridian else self.geometry

    @property
    def geometry(self) -> BaseGeometry:
        """Region in EPSG:4326."""
        if self.crosses_antimeridian:
            west, south, east, north = self.bbox
            return MultiPolygon([box(west, south, 180, north), box(-180, south, east, north)])
        if self.bbox is not None:
            return box(*self.bbox)
        return _region_from_geojson(self.geojson or {})

    @property
    def layer_dtype(self) -> Literal["int8", "float32"]:
        """How the layer stores embeddings: int8 when asked, or for a large region on auto
        (cosine to float32 above 0.9999, 0.37x the size)."""
        if self.quantize == "auto":
            return "int8" if self.area_km2 > INT8_FROM_KM2 else "float32"
        return "int8" if self.quantize == "int8" else "float32"

    @property
    def area_km2(self) -> float:
        """The region's area on the ellipsoid."""
        from pyproj import Geod

        return abs(Geod(ellps="WGS84").geometry_area_perimeter(self.geometry)[0]) / 1e6

    def provider(self):
        """The catalog to read, with the naming it was given."""
        from .stac.providers import resolve_provider

        return resolve_provider(self.catalog, self.catalog_naming)

    def modality_specs(self) -> list[ModalitySpec]:
        """Resolve the sensors and check that the patch size fits every sensor's GSD."""
        specs = resolve_sensors(list(self.sensors))
        for spec in specs:
            if not is_multiple(self.patch_size_m, spec.gsd_m):
                raise RequestError(
                    f"patch_size_m {self.patch_size_m:g} is not a multiple of the "
                    f"{spec.gsd_m:g} m GSD of sensor '{spec.name}'"
                )
        return specs


def describe_errors(exc: ValidationError) -> str:
    """pydantic's errors as one line, each naming the field and the value given."""
    problems = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e["loc"])
        message = e["msg"].removeprefix("Value error, ")
        given = e.get("input")
        if where and not isinstance(given, dict) and repr(given)[:60] not in message:
            message += f" (got {given!r:.60})"
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


def _region_from_geojson(gj: dict) -> BaseGeometry:
    """A GeoJSON Geometry, Feature or FeatureCollection as one lon/lat (multi)polygon, or a
    ValueError saying what is wrong with it (RFC 7946: lon/lat degrees, no other CRS)."""
    crs = (gj.get("crs") or {}).get("properties", {}).get("name", "") if isinstance(gj, dict) else ""
    if crs and not crs.upper().endswith(("CRS84", "4326")):
        raise ValueError(f"geojson declares CRS {crs!r}: GeoJSON regions are lon/lat degrees "
                         "(EPSG:4326, RFC 7946); reproject it")
    try:
        if gj.get("type") == "FeatureCollection":
            from shapely.ops import unary_union

            parts = [shape(f["geometry"]) for f in gj["features"]]
            region = unary_union(parts) if parts else None
        else:
            region = shape(gj["geometry"] if gj.get("type") == "Feature" else gj)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ShapelyError) as exc:
        import json

        raise ValueError(f"geojson is not a valid Geometry, Feature or FeatureCollection "
                         f"({type(exc).__name__}: {exc}): {json.dumps(gj, default=str)[:120]}"
                         ) from None
    if region is None or region.is_empty:
        raise ValueError("geojson holds no geometry (an empty FeatureCollection or geometry)")
    if region.geom_type not in ("Polygon", "MultiPolygon"):
        raise ValueError(f"geojson is a {region.geom_type}: a region must be a Polygon or "
                         "MultiPolygon (buffer a point or line into one)")
    west, south, east, north = region.bounds
    if not (-180 <= west and east <= 180 and -90 <= south and north <= 90):
        raise ValueError(f"geojson bounds {tuple(round(v, 3) for v in region.bounds)} are not "
                         "lon/lat degrees: is it in a projected CRS? GeoJSON regions are "
                         "EPSG:4326 (RFC 7946)")
    if not region.is_valid:
        raise ValueError(f"geojson polygon is not valid ({explain_validity(region)}): fix it, "
                         "e.g. with shapely.make_valid, so that the region is the one meant")
    for part in getattr(region, "geoms", [region]):
        west, _, east, _ = part.bounds
        if east - west > 180:  # most likely a ring drawn across the antimeridian
            raise ValueError(
                f"a geojson polygon spans {east - west:.1f} degrees of longitude ({west:g} to "
                f"{east:g}): one across the antimeridian must be split in two at +/-180 "
                "(RFC 7946 section 3.1.9), or give --bbox west,south,east,north with west > east")
    return region
