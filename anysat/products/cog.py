"""Cloud-optimised GeoTIFFs of an embedding layer, one per block of tiles, for GIS users.

Each COG holds a block's patch embeddings as float32 bands (int8 layers dequantized), NaN as
nodata, the layer's CRS and transform, and averaged overviews. GDAL's COG driver writes them
(through rasterio); each is written locally, then published whole.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

from .. import storage
from .zarr_layer import LayerGrid, embeddings, layer_grid, read_layer


def block_window(grid: LayerGrid, cols: np.ndarray, rows: np.ndarray) -> tuple[slice, slice, Affine]:
    """The layer's pixel window (y, x) covering tiles at grid columns/rows, and its transform."""
    px = grid.tile_px
    x0, y0 = (int(cols.min()) - grid.col0) * px, (grid.row0 - int(rows.max())) * px
    x1, y1 = (int(cols.max()) + 1 - grid.col0) * px, (grid.row0 - int(rows.min()) + 1) * px
    return slice(y0, y1), slice(x0, x1), grid.transform * Affine.translation(x0, y0)


def write_cog(values: np.ndarray, transform: Affine, epsg: int, uri: str, *,
              nodata: float = float("nan"), overviews: str = "average",
              band_name: str | None = "embedding") -> None:
    """[y, x, band] (its dtype kept) -> a COG at `uri`, written locally then published whole."""
    height, width, bands = values.shape
    profile = {"driver": "COG", "width": width, "height": height, "count": bands,
               "dtype": values.dtype.name, "crs": f"EPSG:{epsg}", "transform": transform,
               "nodata": nodata, "compress": "deflate", "blocksize": 256,
               "overview_resampling": overviews, "BIGTIFF": "IF_SAFER",
               **({"predictor": 3} if values.dtype.kind == "f" else {})}
    with tempfile.TemporaryDirectory() as folder:
        local = str(Path(folder) / "block.tif")
        with rasterio.open(local, "w", **profile) as dst:
            dst.write(np.moveaxis(values, -1, 0))
            for band in range(bands if band_name else 0):
                dst.set_band_description(band + 1, f"{band_name}_{band}")
        storage.put_file_atomic(local, uri)


def export_cogs(layer_uri: str, blocks: dict[str, tuple[np.ndarray, np.ndarray]], out_uri: str
                ) -> list[str]:
    """One COG per block (`blocks`: name -> the grid columns and rows of its tiles) under
    `out_uri`; returns their URIs. A block is read from the layer alone (memory: one block)."""
    ds = read_layer(layer_uri)
    grid = layer_grid(ds)
    written = []
    for name, (cols, rows) in blocks.items():
        y, x, transform = block_window(grid, cols, rows)
        uri = storage.join(out_uri, f"{name}.tif")
        write_cog(embeddings(ds, y, x).astype("float32"), transform, grid.epsg, uri)
        written.append(uri)
    return written
