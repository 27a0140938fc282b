"""Embeddings as vectors: GeoParquet rows of patches and of tiles (footprint in lon/lat), and
`similar`: the patches most like a place, by cosine similarity, over a layer or such a table.

Patch rows: tile, epsg, row and col (the patch's pixel in its zone's layer), footprint, the
run's date range and model, `embedding` (float32 list). Tile rows: the mean of the tile's
valid patch embeddings and the count of patches it averages. Written tile by tile, so memory
holds one tile (plus the rows, which are what the file holds).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import shapely
from pyproj import Transformer

from .. import geoparquet
from ..errors import AnySatError
from .zarr_layer import LayerGrid, embeddings, layer_grid, read_layer


def patch_footprints(grid: LayerGrid, y0: int, x0: int, height: int, width: int) -> np.ndarray:
    """Lon/lat squares of the layer's pixels [y0:y0+height, x0:x0+width], row-major."""
    t = grid.transform
    xs = t.c + t.a * (x0 + np.arange(width + 1))
    ys = t.f + t.e * (y0 + np.arange(height + 1))
    gx, gy = np.meshgrid(xs, ys)
    lon, lat = Transformer.from_crs(grid.epsg, 4326, always_xy=True).transform(gx, gy)
    corners = np.stack([lon, lat], axis=-1)                                   # [h+1, w+1, 2]
    rings = np.stack([corners[:-1, :-1], corners[:-1, 1:], corners[1:, 1:], corners[1:, :-1],
                      corners[:-1, :-1]], axis=2)                              # [h, w, 5, 2]
    return shapely.polygons(rings.reshape(height * width, 5, 2))


def _embedding_column(vectors: np.ndarray) -> pa.Array:
    flat = pa.array(vectors.astype("float32").reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])


def layer_vectors(layer_uri: str, tiles: list[tuple[str, int, int]], meta: dict
                  ) -> tuple[pa.Table, pa.Table]:
    """The patch and tile tables of a layer's tiles (`tiles`: id, grid column, grid row);
    `meta` (start, end, model, model_sha256) goes into every row."""
    from ..tiles import Tile

    ds = read_layer(layer_uri)
    grid = layer_grid(ds)
    px = grid.tile_px
    patch_parts, tile_parts = [], []
    for tile_id, col, row in tiles:
        region = grid.tile_region(Tile(grid.epsg, col, row, grid.tile_size_m))
        values = embeddings(ds, region["y"], region["x"]).reshape(px * px, grid.dim)
        valid = np.isfinite(values).all(axis=1)
        if not valid.any():
            continue
        footprints = patch_footprints(grid, region["y"].start, region["x"].start, px, px)[valid]
        rr, cc = np.divmod(np.flatnonzero(valid), px)
        patch_parts.append((tile_id, rr + region["y"].start, cc + region["x"].start,
                            values[valid], footprints))
        tile_parts.append((tile_id, values[valid].mean(axis=0), int(valid.sum()),
                           shapely.union_all(footprints).envelope))
    if not patch_parts:
        raise AnySatError(f"layer {layer_uri} has no patch with data: no vectors to write")
    n = sum(len(p[1]) for p in patch_parts)
    patches = geoparquet.with_geometry({
        "tile": np.concatenate([np.full(len(p[1]), p[0]) for p in patch_parts]),
        "epsg": np.full(n, grid.epsg, dtype="int32"),
        "row": np.concatenate([p[1] for p in patch_parts]).astype("int32"),
        "col": np.concatenate([p[2] for p in patch_parts]).astype("int32"),
        **{k: np.full(n, str(v)) for k, v in meta.items()},
        "embedding": _embedding_column(np.concatenate([p[3] for p in patch_parts])),
    }, np.concatenate([p[4] for p in patch_parts]))
    m = len(tile_parts)
    tiles_table = geoparquet.with_geometry({
        "tile": [t[0] for t in tile_parts], "epsg": np.full(m, grid.epsg, dtype="int32"),
        "patches": np.array([t[2] for t in tile_parts], dtype="int32"),
        **{k: np.full(m, str(v)) for k, v in meta.items()},
        "embedding": _embedding_column(np.stack([t[1] for t in tile_parts])),
    }, np.array([t[3] for t in tile_parts], dtype=object))
    return patches, tiles_table


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def similar_in_layer(layer_uri: str, lon: float, lat: float, k: int = 10) -> list[dict]:
    """The k patches of a layer most like the patch at (lon, lat), most similar first (the
    query patch itself first, similarity 1). Read tile by tile."""
    ds = read_layer(layer_uri)
    grid = layer_grid(ds)
    x, y = Transformer.from_crs(4326, grid.epsg, always_xy=True).transform(lon, lat)
    col, row = ~grid.transform * (x, y)
    col, row = int(np.floor(col)), int(np.floor(row))
    height, width = ds["embedding"].shape[:2]
    if not (0 <= row < height and 0 <= col < width):
        raise AnySatError(f"point ({lon}, {lat}) is outside layer {layer_uri}")
    query = embeddings(ds, slice(row, row + 1), slice(col, col + 1))[0, 0]
    if not np.isfinite(query).all():
        raise AnySatError(f"the layer has no data at ({lon}, {lat}): pick a point with data")
    query = _unit(query)
    best: list[tuple[float, int, int]] = []
    px = grid.tile_px
    for y0 in range(0, height, px):
        for x0 in range(0, width, px):
            block = embeddings(ds, slice(y0, y0 + px), slice(x0, x0 + px))
            sims = (_unit(block) @ query).reshape(-1)
            sims[~np.isfinite(sims)] = -np.inf
            top = np.argsort(-sims)[:k]
            h, w = block.shape[:2]
            best += [(float(sims[i]), y0 + i // w, x0 + i % w) for i in top if np.isfinite(sims[i])]
            # the query first, also when another patch is exactly as similar
            best = sorted(best, key=lambda b: (-b[0], (b[1], b[2]) != (row, col)))[:k]
    to_lonlat = Transformer.from_crs(grid.epsg, 4326, always_xy=True)
    results = []
    for sim, r, c in best:
        cx, cy = grid.transform * (c + 0.5, r + 0.5)
        plon, plat = to_lonlat.transform(cx, cy)
        results.append({"similarity": round(sim, 6), "lon": plon, "lat": plat, "row": int(r),
                        "col": int(c), "epsg": grid.epsg})
    return results


def similar_in_vectors(vectors_uri: str, lon: float, lat: float, k: int = 10) -> list[dict]:
    """The k rows of a patch GeoParquet most like the patch whose footprint holds (lon, lat)."""
    try:
        table = geoparquet.read(vectors_uri)
    except (FileNotFoundError, pa.ArrowInvalid) as exc:
        raise AnySatError(f"cannot read patch vectors {vectors_uri} ({type(exc).__name__}: "
                          f"{exc})") from None
    if not {"geometry", "embedding", "tile", "row", "col"} <= set(table.column_names):
        raise AnySatError(f"{vectors_uri} is no patch vectors table (it needs geometry, "
                          f"embedding, tile, row and col; it has {table.column_names})")
    footprints = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    holding = np.flatnonzero(shapely.contains_xy(footprints, lon, lat))
    if not len(holding):
        raise AnySatError(f"no patch of {vectors_uri} holds the point ({lon}, {lat})")
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype("float32")
    sims = _unit(vectors) @ _unit(vectors[holding[0]])
    order = np.lexsort((np.arange(len(sims)) != holding[0], -sims))[:k]  # the query first
    centres = shapely.centroid(footprints[order])
    return [{"similarity": round(float(sims[i]), 6), "lon": float(c.x), "lat": float(c.y),
             "tile": table.column("tile")[int(i)].as_py(), "row": table.column("row")[int(i)].as_py(),
             "col": table.column("col")[int(i)].as_py()} for i, c in zip(order, centres)]
