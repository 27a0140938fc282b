"""Maps of an embedding layer, made tile by tile so that a continent's layer is never in memory:
a PCA-RGB preview, a k-means cluster map, and a linear-probe class map from labelled points
or polygons.

Each model (PCA axes, k-means centres, a logistic regression) is fitted on a bounded sample of
the layer's pixels (or on the labelled patches), then applied tile by tile. Previews are PNGs at
most `max_side` pixels wide (tiles average-pooled); class and cluster maps are also written at
full resolution as uint8 COGs per block of tiles (255 = no data).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from functools import partial

import numpy as np
import xarray as xr
import zarr
from affine import Affine
from PIL import Image
from shapely.geometry.base import BaseGeometry

from .. import storage
from ..errors import AnySatError
from .cog import block_window, write_cog
from .zarr_layer import LayerGrid, embeddings, layer_grid, pool_factor, pool_mean

NO_CLASS = 255
SAMPLE = 20_000  # pixels a map's model is fitted on
BAND_BYTES = 64 * 2**20  # an overview is read in row bands of about this many bytes
POLYGON_PATCHES = 2_000  # patches a labelled polygon contributes at most


def _tiles(grid: LayerGrid) -> Iterator[tuple[slice, slice]]:
    px = grid.tile_px
    for y0 in range(0, grid.n_rows * px, px):
        for x0 in range(0, grid.n_cols * px, px):
            yield slice(y0, y0 + px), slice(x0, x0 + px)


def sample_pixels(ds: xr.Dataset, n: int = SAMPLE, seed: int = 0) -> np.ndarray:
    """Up to n valid pixels [n, D], drawn from tiles in a random order (a few per tile, so a
    large layer is sampled everywhere without reading it all); [0, D] for an empty layer."""
    grid = layer_grid(ds)
    return _sample([partial(embeddings, ds, y, x) for y, x in _tiles(grid)], grid.dim, n, seed)


def _sample(reads: list[Callable[[], np.ndarray]], dim: int, n: int, seed: int) -> np.ndarray:
    """Up to n valid rows [n, D] of what `reads` give ([..., D] each), taken in a random
    order, a few rows from each, until there are n."""
    rng = np.random.default_rng(seed)
    per_read = max(1, math.ceil(n / len(reads)) * 2)
    picked, total = [], 0
    for i in rng.permutation(len(reads)):
        values = reads[i]().reshape(-1, dim)
        # a patch without data is NaN whole: rows drawn by their first value, then checked
        rows = np.flatnonzero(np.isfinite(values[:, 0]))
        if len(rows):
            chosen = values[rows[rng.choice(len(rows), min(per_read, len(rows)), replace=False)]]
            picked.append(chosen[np.isfinite(chosen).all(axis=1)])
            total += len(picked[-1])
        if total >= n:
            break
    return np.concatenate(picked)[:n] if picked else np.zeros((0, dim), np.float32)


def render(ds: xr.Dataset, colour: Callable[[np.ndarray], np.ndarray], max_side: int,
           pool: str = "mean") -> np.ndarray:
    """An RGBA preview: each tile pooled by `pool` (mean, or the first pixel of each cell for
    classes), `colour` maps [n, D] valid embeddings to [n, 4] uint8."""
    grid = layer_grid(ds)
    f = pool_factor(grid, max_side)
    side = grid.tile_px // f
    canvas = np.zeros((grid.n_rows * side, grid.n_cols * side, 4), dtype=np.uint8)
    for y, x in _tiles(grid):
        values = embeddings(ds, y, x)
        pooled = pool_mean(values, f) if pool == "mean" else values[::f, ::f]
        canvas[y.start // f:y.start // f + side, x.start // f:x.start // f + side] = \
            _coloured(pooled, colour)
    return canvas


def _coloured(cells: np.ndarray, colour: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """[h, w, D] (NaN rows: no data) -> [h, w, 4] uint8, transparent where no data."""
    flat = cells.reshape(-1, cells.shape[-1])
    ok = np.isfinite(flat).all(axis=1)
    rgba = np.zeros((len(flat), 4), dtype=np.uint8)
    if ok.all():
        rgba[:] = colour(flat)
    elif ok.any():
        rgba[ok] = colour(flat[ok])
    return rgba.reshape(*cells.shape[:2], 4)


def _bands(cells: zarr.Array) -> list[slice]:
    """Row bands of an overview of about BAND_BYTES each, whole tiles high: zarr fetches a
    band's chunks at once (a round trip each on object storage)."""
    side = cells.chunks[0]
    rows = max(1, BAND_BYTES // (side * cells.shape[1] * cells.shape[2] * 4)) * side
    return [slice(y0, y0 + rows) for y0 in range(0, cells.shape[0], rows)]


def sample_cells(cells: zarr.Array, n: int = SAMPLE, seed: int = 0) -> np.ndarray:
    """Up to n valid overview cells [n, D] (a layer's tiles mean-pooled: `read_overview`),
    from row bands in a random order, a few from each."""
    return _sample([partial(cells.__getitem__, band) for band in _bands(cells)], cells.shape[2],
                   n, seed)


def render_cells(cells: zarr.Array, colour: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The mean-pooled preview (`render`'s) drawn from a layer's overview, a band at a time:
    the layer itself is never read."""
    canvas = np.zeros((*cells.shape[:2], 4), dtype=np.uint8)
    for band in _bands(cells):
        canvas[band] = _coloured(cells[band], colour)
    return canvas


def write_png(rgba: np.ndarray, uri: str, min_side_px: int = 256) -> tuple[int, int]:
    """Write an RGBA PNG (nearest-upscaled to at least `min_side_px`); returns its size."""
    factor = max(1, math.ceil(min_side_px / max(rgba.shape[:2])))
    image = Image.fromarray(rgba, mode="RGBA").resize(
        (rgba.shape[1] * factor, rgba.shape[0] * factor), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    storage.write_bytes_atomic(uri, buffer.getvalue())
    return image.size


def pca_colour(sample: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Embeddings -> RGBA: the sample's first 3 principal components, 2-98 % stretched
    (grey when the sample is too small to have components)."""
    if len(sample) < 2:
        return lambda values: np.tile(np.array([128, 128, 128, 255], np.uint8), (len(values), 1))
    mean = sample.mean(axis=0)
    x = sample - mean
    _, axes = np.linalg.eigh((x.T @ x).astype(np.float64))
    top = axes[:, ::-1][:, :3].astype(np.float32)
    comps = x @ top
    lo, hi = np.percentile(comps, [2, 98], axis=0)
    span = np.where(hi > lo, hi - lo, 1)
    shift = mean @ top + lo  # projected, then shifted: no copy of the values minus their mean

    def colour(values: np.ndarray) -> np.ndarray:
        scaled = np.clip((values @ top - shift) / span, 0, 1)
        rgb = (scaled * 255).round().astype(np.uint8)
        return np.concatenate([rgb, np.full((len(values), 1), 255, np.uint8)], axis=1)

    return colour


PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60),
                    (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
                    (255, 250, 200), (128, 0, 0), (170, 255, 195)], dtype=np.uint8)


def class_colour(predict: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    def colour(values: np.ndarray) -> np.ndarray:
        rgb = PALETTE[predict(values) % len(PALETTE)]
        return np.concatenate([rgb, np.full((len(values), 1), 255, np.uint8)], axis=1)

    return colour


def write_class_cogs(ds: xr.Dataset, predict: Callable[[np.ndarray], np.ndarray],
                     blocks: dict[str, tuple[np.ndarray, np.ndarray]], out_uri: str) -> list[str]:
    """uint8 class COGs per block (255 = no data), overviews by mode."""
    grid = layer_grid(ds)
    written = []
    for name, (cols, rows) in blocks.items():
        y, x, transform = block_window(grid, cols, rows)
        values = embeddings(ds, y, x)
        h, w = values.shape[:2]
        flat = values.reshape(-1, grid.dim)
        ok = np.isfinite(flat).all(axis=1)
        classes = np.full(len(flat), NO_CLASS, dtype=np.uint8)
        if ok.any():
            classes[ok] = predict(flat[ok]).astype(np.uint8)
        uri = storage.join(out_uri, f"{name}.tif")
        write_cog(classes.reshape(h, w, 1), transform, grid.epsg, uri, nodata=NO_CLASS,
                  overviews="mode", band_name=None)
        written.append(uri)
    return written


def kmeans(sample: np.ndarray, k: int, seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    from sklearn.cluster import MiniBatchKMeans

    if len(sample) < k:
        raise AnySatError(f"{len(sample)} patches with data cannot make {k} clusters")
    model = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3).fit(sample)
    return lambda values: model.predict(values.astype(np.float32))


def point_embeddings(ds: xr.Dataset, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """The layer's embedding at each point [n, D] (NaN rows for points off the layer or
    without data)."""
    from pyproj import Transformer

    grid = layer_grid(ds)
    x, y = Transformer.from_crs(4326, grid.epsg, always_xy=True).transform(lon, lat)
    col, row = ~grid.transform * (np.asarray(x), np.asarray(y))
    col, row = np.floor(col).astype(int), np.floor(row).astype(int)
    height, width = ds["embedding"].shape[:2]
    out = np.full((len(col), grid.dim), np.nan, dtype=np.float32)
    inside = (row >= 0) & (row < height) & (col >= 0) & (col < width)
    for i in np.flatnonzero(inside):
        out[i] = embeddings(ds, slice(row[i], row[i] + 1), slice(col[i], col[i] + 1))[0, 0]
    return out


def polygon_embeddings(ds: xr.Dataset, polygon: BaseGeometry, limit: int = POLYGON_PATCHES,
                       seed: int = 0) -> np.ndarray:
    """Embeddings [n, D] of the layer's patches whose centres lie inside a lon/lat polygon and
    have data (a seeded sample of at most `limit`); only the polygon's window is read."""
    from pyproj import Transformer
    from rasterio.features import geometry_mask
    from shapely.ops import transform as reproject

    grid = layer_grid(ds)
    to_grid = Transformer.from_crs(4326, grid.epsg, always_xy=True).transform
    shape = reproject(to_grid, polygon)
    west, south, east, north = shape.bounds
    height, width = ds["embedding"].shape[:2]
    c0, r0 = ~grid.transform * (west, north)
    c1, r1 = ~grid.transform * (east, south)
    y = slice(max(int(np.floor(r0)), 0), min(int(np.ceil(r1)), height))
    x = slice(max(int(np.floor(c0)), 0), min(int(np.ceil(c1)), width))
    if y.start >= y.stop or x.start >= x.stop:
        return np.empty((0, grid.dim), np.float32)
    window = grid.transform * Affine.translation(x.start, y.start)
    inside = geometry_mask([shape], (y.stop - y.start, x.stop - x.start), window, invert=True)
    values = embeddings(ds, y, x)[inside]
    values = values[np.isfinite(values).all(axis=1)]
    if len(values) > limit:
        values = values[np.random.default_rng(seed).choice(len(values), limit, replace=False)]
    return values


def linear_probe(values: np.ndarray, labels: np.ndarray
                 ) -> tuple[Callable[[np.ndarray], np.ndarray], list[str], int]:
    """A logistic regression of the labels on embeddings [n, D] (NaN rows: points without
    data, left out); the predictor (class index per embedding), the class names, and how
    many samples it used."""
    from sklearn.linear_model import LogisticRegression

    ok = np.isfinite(values).all(axis=1)
    names, index = np.unique(np.asarray(labels)[ok].astype(str), return_inverse=True)
    if ok.sum() < 2 or len(names) < 2:
        raise AnySatError(f"{int(ok.sum())} labelled patches with data, in "
                          f"{len(names)} classes: a class map needs at least 2 of each")
    if len(names) > NO_CLASS:
        raise AnySatError(f"{len(names)} classes: a class map holds at most {NO_CLASS}")
    model = LogisticRegression(max_iter=2000).fit(values[ok], index)
    return (lambda v: model.predict(v.astype(np.float32)).astype(np.uint8)), [str(n) for n in names], int(ok.sum())


def labelled_embeddings(ds: xr.Dataset, uri: str) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings [n, D] and labels from labels at `uri`: GeoJSON features with a `label`
    property (a Point gives the patch under it, a Polygon or MultiPolygon the patches whose
    centres it holds), or a table (Parquet, CSV) of `lon`, `lat`, `label` points."""
    import json

    import pandas as pd
    from shapely.geometry import shape

    hint = ("(GeoJSON Points or Polygons with a `label` property, or a table with lon, lat, "
            "label)")
    try:
        if not uri.endswith((".geojson", ".json")):
            table = (pd.read_csv if uri.endswith(".csv") else pd.read_parquet)(uri)
            lon, lat = table["lon"].to_numpy(float), table["lat"].to_numpy(float)
            return point_embeddings(ds, lon, lat), table["label"].to_numpy()
        features = json.loads(storage.read_bytes(uri))["features"]
        parts, labels = [], []
        for i, feature in enumerate(features):
            geometry, label = shape(feature["geometry"]), feature["properties"]["label"]
            if geometry.geom_type == "Point":
                values = point_embeddings(ds, np.array([geometry.x]), np.array([geometry.y]))
            elif geometry.geom_type in ("Polygon", "MultiPolygon"):
                values = polygon_embeddings(ds, geometry, seed=i)
            else:
                raise AnySatError(f"labels {uri}: feature {i} is a {geometry.geom_type}; "
                                  f"labels are Points or Polygons {hint}")
            parts.append(values)
            labels += [label] * len(values)
    except (OSError, KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise AnySatError(f"cannot read labels {uri}: {type(exc).__name__}: {exc} {hint}") from None
    return np.concatenate(parts) if parts else np.empty((0, 0)), np.array(labels)
