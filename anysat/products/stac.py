"""STAC description of a run's products, so odc-stac, QGIS or pystac open them without our code.

Under `<output>/stac/`:
- `collection.json`: the run (region, dates, embedding width and type: the Embeddings
  extension's `emb:` fields), zone-wide products as assets (Zarr layers, previews, vectors,
  map PNGs), links to the model and to the source catalog;
- `items/<zone>_<block>.json`: one Item per block of tiles, its `embeddings` asset the block's
  COG (or, without `--products cog`, the zone's Zarr layer), with the projection of that
  window, and the block's cluster/class COGs;
- `model.json`: an Item with the MLM extension (architecture, inputs per sensor with their
  normalisation, output, weights and their sha256).
Structural links are relative (the folder can be moved); asset hrefs are the absolute URIs
that run.json lists. Documents are written atomically, the collection last.

The extension schemas the files declare are validated offline by `validate` against schemas
kept in catalogs/stac-schemas/ (see its README for what they are).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from odc.geo.geobox import GeoBox

from .. import storage
from ..model import AnySat
from ..model.checkpoint import CONFIG, WEIGHTS, checkpoint_uri
from ..model.config import SIZES
from ..redact import without_secrets
from ..resources import catalogs_dir
from .cog import block_window
from .quantize import NODATA, RULE
from .zarr_layer import layer_grid, read_layer

STAC_VERSION = "1.1.0"
EMBEDDINGS = "https://stac-extensions.github.io/embeddings/v0.0.1/schema.json"
MLM = "https://stac-extensions.github.io/mlm/v1.4.0/schema.json"
PROJECTION = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
FILE = "https://stac-extensions.github.io/file/v2.1.0/schema.json"
SCHEMAS = {EMBEDDINGS: "embeddings-v0.0.1.json", MLM: "mlm-v1.4.0.json",
           PROJECTION: "projection-v2.0.0.json", FILE: "file-v2.1.0.json"}
COG_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
ZARR_TYPE = "application/vnd+zarr"
PARQUET_TYPE = "application/vnd.apache.parquet"


def collection_uri(output_uri: str) -> str:
    return storage.join(output_uri, "stac", "collection.json")


def write_stac(plan, model: AnySat, layers: list[dict], finished: str) -> str:
    """Write the run's STAC (model Item, block Items, then the Collection); returns the
    Collection's URI. `layers` are run.json's per-zone entries (their product URIs)."""
    request = plan.request
    root = storage.join(plan.uri, "stac")
    interval = {"start_datetime": f"{request.start}T00:00:00Z",
                "end_datetime": f"{request.end}T23:59:59Z"}
    model_item = _model_item(request, model, finished, f"anysat-{plan.hash[:16]}")
    _write(storage.join(root, "model.json"), model_item)
    item_ids = []
    for zone in layers:  # a zone's block Items at once (a continent's zone: ~1,000 blocks)
        items = _block_items(plan, zone, interval, finished)
        storage.write_many({storage.join(root, "items", f"{item['id']}.json"): _encoded(item)
                            for item in items})
        item_ids += [item["id"] for item in items]
    dim = plan.zones[0].grid.dim
    west, south, east, north = request.geometry.bounds
    provider = request.provider()
    collection = {
        "type": "Collection", "stac_version": STAC_VERSION, "stac_extensions": [EMBEDDINGS],
        "id": f"anysat-{plan.hash[:16]}",
        "title": f"AnySat embeddings, {request.start} to {request.end}",
        "description": (f"{dim}-d AnySat patch embeddings (one pixel per {request.patch_size_m:g} m "
                        f"patch) of {', '.join(request.sensors)} from {request.start} to "
                        f"{request.end}, model {request.model}, run plan {plan.hash[:16]}."),
        "license": "other",
        "extent": {"spatial": {"bbox": [[west, south, east, north]]},
                   "temporal": {"interval": [[interval["start_datetime"], interval["end_datetime"]]]}},
        "emb:type": "pixel", "emb:dimensions": dim, "data_type": _stored_dtype(plan),
        "gsd": request.patch_size_m,
        "emb:temporal_resolution": f"{request.start}/{request.end}",
        "emb:fit_for_use": ["classification", "clustering", "retrieval"],
        "summaries": {"proj:code": [f"EPSG:{z['epsg']}" for z in layers]},
        "item_assets": {"embeddings": {"title": "patch embeddings of a block of tiles",
                                       "roles": ["data"]}},
        "assets": _zone_assets(layers, plan),
        "links": [
            {"rel": "root", "href": "./collection.json", "type": "application/json"},
            {"rel": "self", "href": collection_uri(plan.uri), "type": "application/json"},
            {"rel": "emb:model", "href": "./model.json", "type": "application/geo+json",
             "title": f"model {request.model} (STAC MLM Item)"},
            {"rel": "emb:source-data", "href": without_secrets(provider.url),
             "title": f"source catalog '{provider.name}' ({provider.kind})"},
            *({"rel": "item", "href": f"./items/{i}.json", "type": "application/geo+json"}
              for i in item_ids),
        ],
    }
    uri = collection_uri(plan.uri)
    _write(uri, collection)
    return uri


def _stored_dtype(plan) -> str:
    return plan.zones[0].grid.dtype


def _write(uri: str, document: dict) -> None:
    storage.write_bytes_atomic(uri, _encoded(document))


def _encoded(document: dict) -> bytes:
    return json.dumps(document, indent=1).encode()


def _links() -> list[dict]:
    return [{"rel": rel, "href": "../collection.json", "type": "application/json"}
            for rel in ("collection", "parent", "root")]


def _zone_assets(layers: list[dict], plan) -> dict[str, dict]:
    """The products that cover a whole zone, keyed `EPSG<code>_<product>`."""
    assets: dict[str, dict] = {}
    for zone in layers:
        key = f"EPSG{zone['epsg']}"
        assets[f"{key}_layer"] = {
            "href": zone["layer"], "type": ZARR_TYPE, "roles": ["data"],
            "title": f"embedding layer, EPSG:{zone['epsg']} ({_stored_dtype(plan)}"
                     f"{', with a per-pixel scale: ' + RULE if _stored_dtype(plan) == 'int8' else ''})"}
        assets[f"{key}_preview"] = {"href": zone["preview"], "type": "image/png",
                                    "roles": ["overview"], "title": "PCA-RGB preview"}
        for kind, path in zone.get("vectors", {}).items():
            assets[f"{key}_vectors_{kind}"] = {"href": path, "type": PARQUET_TYPE, "roles": ["data"],
                                               "title": f"GeoParquet of {kind} embeddings"}
        for kind in ("clusters", "classes"):
            if kind in zone:
                assets[f"{key}_{kind}"] = {"href": zone[kind]["png"], "type": "image/png",
                                           "roles": ["visual"], "title": f"{kind} map"}
    return assets


def _block_items(plan, zone: dict, interval: dict, finished: str) -> list[dict]:
    """One Item per block of the zone's tiles (the COG blocks), with that window's projection."""
    request, epsg = plan.request, zone["epsg"]
    grid = layer_grid(read_layer(zone["layer"]))
    tiles = plan.tiles[plan.tiles["epsg"] == epsg]
    cogs = {Path(u).stem: u for u in zone.get("cogs", [])}
    maps = {kind: {Path(u).stem: u for u in zone[kind]["cogs"]}
            for kind in ("clusters", "classes") if kind in zone}
    items = []
    for block, group in tiles.groupby("block"):
        y, x, transform = block_window(grid, group["col"].to_numpy(), group["row"].to_numpy())
        shape = [y.stop - y.start, x.stop - x.start]
        footprint = GeoBox(shape, transform, f"EPSG:{epsg}").footprint("EPSG:4326", npoints=8)
        if block in cogs:
            nodata = {"nodata": "nan", "data_type": "float32"}
            embeddings = {"href": cogs[block], "type": COG_TYPE, "roles": ["data"],
                          "bands": [{"name": f"embedding_{b}", **nodata} for b in range(grid.dim)]}
        else:  # no COGs asked for: the zone's layer holds this block's window
            embeddings = {"href": zone["layer"], "type": ZARR_TYPE, "roles": ["data"],
                          "data_type": grid.dtype}
        assets = {"embeddings": {**embeddings, "title": f"{grid.dim}-d patch embeddings"}}
        for kind, by_block in maps.items():
            if block in by_block:
                assets[kind] = {"href": by_block[block], "type": COG_TYPE, "roles": ["data"],
                                "bands": [{"name": kind, "data_type": "uint8", "nodata": 255}]}
        properties = {
            "datetime": None, **interval, "created": finished,
            "proj:code": f"EPSG:{epsg}", "proj:shape": shape,
            "proj:transform": list(transform)[:6], "gsd": request.patch_size_m,
            "emb:runtime_parameters": {
                "sensors": list(request.sensors), "patch_size_m": request.patch_size_m,
                "tile_size_m": request.tile_size_m, "time_bin": request.time_bin,
                "max_cloud": request.max_cloud, "forward_dtype": request.dtype,
                "plan_hash": plan.hash, "tiles": len(group)},
        }
        if grid.quantized and block not in cogs:
            properties["emb:quantization"] = {
                "method": f"per-pixel symmetric int8: {RULE}; nodata {NODATA}",
                "original_dtype": "float32", "quantized_dtype": "int8"}
        items.append({
            "type": "Feature", "stac_version": STAC_VERSION,
            "stac_extensions": [EMBEDDINGS, PROJECTION],
            "id": f"EPSG{epsg}_{block}", "collection": f"anysat-{plan.hash[:16]}",
            "geometry": footprint.json, "bbox": list(footprint.boundingbox),
            "properties": properties, "assets": assets, "links": _links(),
        })
    return items


def _checkpoint(name_or_uri: str) -> tuple[str, str] | None:
    """(weights URI, their file sha256) of a checkpoint; None for a size name (random init)."""
    if name_or_uri in SIZES:
        return None
    uri = checkpoint_uri(name_or_uri)
    meta = json.loads(storage.read_bytes(storage.join(uri, CONFIG)))
    return storage.join(uri, WEIGHTS), meta["sha256"]


def _model_item(request, model: AnySat, finished: str, collection_id: str) -> dict:
    """The MLM Item: what the model takes (per sensor, normalised by the spec statistics)
    and gives (one embedding per patch)."""
    config = model.config
    inputs = [{
        "name": spec.name, "bands": list(spec.bands),
        "input": {"shape": [-1, -1 if spec.time_series else 1, len(spec.bands), -1, -1],
                  "dim_order": ["batch", "time", "bands", "height", "width"],
                  "data_type": "float32"},
        "description": (f"{spec.name} at {spec.gsd_m:g} m"
                        f"{', a time series with day-of-year codes' if spec.time_series else ''}"),
        "value_scaling": [{"type": "z-score", "mean": m, "stddev": s}
                          for m, s in zip(spec.mean, spec.std)],
        "resize_type": None,
    } for spec in config.modalities]
    properties = {
        "datetime": finished,
        "mlm:name": f"anysat-{request.model}",
        "mlm:architecture": "AnySat: scale-adaptive ViT, JEPA-pretrained",
        "mlm:tasks": ["similarity-search", "classification", "segmentation"],
        "mlm:framework": "pytorch", "mlm:framework_version": torch.__version__.split("+")[0],
        "mlm:accelerator": "cuda" if str(request.device).startswith("cuda") else "amd64",
        "mlm:accelerator_constrained": False,
        "mlm:total_parameters": int(sum(p.numel() for p in model.parameters())),
        "mlm:pretrained": request.model not in SIZES,
        "mlm:batch_size_suggestion": request.batch_size,
        "mlm:input": inputs,
        "mlm:output": [{
            "name": "patch embeddings", "tasks": ["similarity-search"],
            "result": {"shape": [-1, config.dim, -1, -1],
                       "dim_order": ["batch", "embedding", "height", "width"],
                       "data_type": "float32"},
            "description": f"one {config.dim}-d embedding per {request.patch_size_m:g} m patch",
            "classification:classes": [], "post_processing_function": None,
        }],
        "mlm:hyperparameters": {"dim": config.dim, "depth": config.depth, "heads": config.heads,
                                "size": config.size},
    }
    assets = {}
    checkpoint = _checkpoint(request.model)
    if checkpoint:
        weights, sha256 = checkpoint
        assets["weights"] = {
            "href": weights, "type": "application/octet-stream; application=safetensors",
            "roles": ["mlm:model", "mlm:weights", "data"], "mlm:artifact_type": "safetensors",
            "file:checksum": "1220" + sha256, "title": f"{request.model} weights (safetensors)"}
    return {"type": "Feature", "stac_version": STAC_VERSION, "stac_extensions": [MLM, FILE],
            "id": f"model-{Path(request.model).name or 'model'}", "collection": collection_id,
            "geometry": None,
            "properties": properties, "assets": assets, "links": [
                {"rel": rel, "href": "./collection.json", "type": "application/json"}
                for rel in ("collection", "parent", "root")]}


def validate(uri: str) -> int:
    """Validate the Collection at `uri` and every document it links (model and Items)
    against the STAC core and extension schemas, offline; returns how many were checked.
    Raises jsonschema's ValidationError naming the document and field."""
    from pystac.validation import validate_dict
    from pystac.validation.stac_validator import JsonSchemaSTACValidator

    validator = JsonSchemaSTACValidator()
    folder = catalogs_dir() / "stac-schemas"
    for schema_uri, name in SCHEMAS.items():
        validator.schema_cache[schema_uri] = json.loads((folder / name).read_text())
    documents = [(uri, json.loads(storage.read_bytes(uri))), *_linked(uri, ("item", "emb:model"))]
    for href, document in documents:
        validate_dict(document, validator=validator, href=href)
    return len(documents)


def load_items(uri: str) -> list[Any]:
    """The block Items of a run's STAC Collection as pystac Items (for `odc.stac.load`)."""
    import pystac

    return [pystac.Item.from_dict(document) for _, document in _linked(uri, ("item",))]


def _linked(uri: str, rels: tuple[str, ...]) -> list[tuple[str, dict]]:
    """(URI, document) of every link of the Collection at `uri` with one of `rels`."""
    base = uri.rsplit("/", 1)[0]
    found = []
    for link in json.loads(storage.read_bytes(uri))["links"]:
        if link["rel"] in rels:
            linked = storage.join(base, link["href"].removeprefix("./"))
            found.append((linked, json.loads(storage.read_bytes(linked))))
    return found


__all__ = ["collection_uri", "load_items", "validate", "write_stac"]
