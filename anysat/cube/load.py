"""One cube per sensor: xarray.DataArray[time, band, y, x] in physical units, lazy on Dask or
read at once.

Two readers give the same cube: odc-stac (default) and stackstac. Both read the items' assets
onto the tile's GeoBox (the sensor's GSD on the tile grid), mosaic items of one solar day,
resample data bands with the spec's method and quality masks with nearest. Then, shared:
nodata and cloud-masked pixels become NaN, values are scaled to physical units (and dB).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import odc.stac
import pystac
import xarray as xr
from odc.geo.geobox import GeoBox
from odc.geo.xr import xr_coords

from ..errors import SpecError
from ..modalities import ModalitySpec
from ..redact import without_secrets
from .masks import invalid_pixels

log = logging.getLogger("anysat")
# GDAL retries transient HTTP errors (429, 5xx) with backoff, unless a deployment says otherwise
for _key, _value in (("GDAL_HTTP_MAX_RETRY", "5"), ("GDAL_HTTP_RETRY_DELAY", "1")):
    os.environ.setdefault(_key, _value)
Backend = Literal["odc-stac", "stackstac"]
BACKENDS: tuple[Backend, ...] = ("odc-stac", "stackstac")


def solar_day(item: pystac.Item) -> np.datetime64:
    """The local solar date (what odc-stac groups by): UTC time shifted by longitude / 15 h."""
    west, _, east, _ = item.bbox
    offset = np.timedelta64(int((west + east) / 2 / 15 * 3600), "s")
    return (np.datetime64(item.datetime.replace(tzinfo=None), "s") + offset).astype("datetime64[D]")


def item_offset(item: pystac.Item, spec: ModalitySpec, asset: str) -> float:
    """The offset that turns this item's scaled DNs into physical values: its own
    `raster:bands` offset (if recorded for the spec's scale), else the spec's baseline rule,
    else the spec's offset."""
    bands = item.assets[asset].extra_fields.get("raster:bands") if asset in item.assets else None
    if bands and "offset" in bands[0] and np.isclose(bands[0].get("scale", 1.0), spec.scale):
        return float(bands[0]["offset"])
    rule = spec.offset_from_baseline
    if rule is None:
        return spec.offset
    baseline = item.properties.get("s2:processing_baseline")
    if baseline is not None:
        try:
            newer = float(baseline) >= float(rule.baseline)
        except ValueError:
            newer = item.datetime.date() >= rule.since if item.datetime else False
    else:
        newer = item.datetime is not None and item.datetime.date() >= rule.since
    return rule.offset if newer else spec.offset


def _offsets_per_day(items: Sequence[pystac.Item], spec: ModalitySpec, asset: str,
                     n_times: int) -> np.ndarray:
    """One offset per time step of the cube (its solar days, in order)."""
    by_day: dict = {}
    for item in items:
        by_day.setdefault(solar_day(item), item_offset(item, spec, asset))
    offsets = np.array([by_day[d] for d in sorted(by_day)], dtype="float32")
    if len(offsets) != n_times:  # grouping differs from ours: fall back to one offset
        return np.full(n_times, offsets[0] if len(offsets) else spec.offset, dtype="float32")
    return offsets


def _read_odc(items: Sequence[pystac.Item], assets: list[str], resampling: dict[str, str],
              geobox: GeoBox, nodata: float | None, patch_url, lazy: bool = True,
              threads: int = 1) -> xr.DataArray:
    # eager (chunks=None): read now into numpy, no Dask graph per tile. odc-stac's `pool`
    # starts new threads every call: for a block of tiles only (one small tile read with it
    # ran at 0.6x plain rasterio reads in benchmarks/cube_load.py). On 2 local cores it gains
    # nothing (decompression holds them); it is there for remote COGs, whose opens and range
    # requests wait on the network (not measured here).
    raw = _load_odc(items, assets, resampling, geobox, nodata, patch_url, lazy, threads)
    return raw[assets].to_dataarray("band").transpose("time", "band", "y", "x")


def _load_odc(items: Sequence[pystac.Item], assets: list[str], resampling: dict[str, str],
              geobox: GeoBox, nodata: float | None, patch_url, lazy: bool,
              threads: int) -> xr.Dataset:
    return odc.stac.load(items, bands=assets, geobox=geobox, groupby="solar_day",
                         chunks={"x": -1, "y": -1} if lazy else None, resampling=resampling,
                         nodata=nodata, patch_url=patch_url, fail_on_error=True,
                         pool=threads if threads > 1 and not lazy else None)


def _read_stackstac(items: Sequence[pystac.Item], assets: list[str], resampling: dict[str, str],
                    geobox: GeoBox, nodata: float | None, patch_url, lazy: bool = True,
                    threads: int = 1) -> xr.DataArray:
    import stackstac
    from rasterio.enums import Resampling

    # stackstac reads hrefs as written (no relative resolution, no per-read hook): give it
    # copies with absolute hrefs, signed just before the stack is built.
    items = sorted(items, key=lambda i: i.datetime)  # the order of `days` below
    readable = [_readable(item, assets, patch_url) for item in items]
    _refuse_gcp_only(readable, assets)
    fill = np.nan if nodata is None else nodata
    parts = []
    for method in dict.fromkeys(resampling[a] for a in assets):  # one stack per resampling
        some = [a for a in assets if resampling[a] == method]
        parts.append(stackstac.stack(
            readable, assets=some, epsg=geobox.crs.epsg, resolution=abs(geobox.resolution.x),
            bounds=tuple(geobox.boundingbox), snap_bounds=False, resampling=Resampling[method],
            dtype="float32", fill_value=np.float32(fill), rescale=False,
            chunksize=(1, 1, -1, -1), properties=False, band_coords=False, xy_coords="center",
            sortby_date=False,
        ))
    stack = xr.concat(parts, "band").sel(band=assets) if len(parts) > 1 else parts[0]
    days = np.array([solar_day(i) for i in items])
    stack = stack.assign_coords(time=stack.time.values.astype("datetime64[ns]"),
                                solar_day=("time", days))
    groups = [stack.isel(time=np.flatnonzero(days == day)) for day in np.unique(days)]
    mosaics = [stackstac.mosaic(g, dim="time", nodata=fill).expand_dims(time=[g.time.values.min()])
               if g.sizes["time"] > 1 else g for g in groups]  # first valid pixel of the day
    cube = xr.concat([m.drop_vars("solar_day", errors="ignore") for m in mosaics], "time")
    cube = cube.drop_vars([c for c in cube.coords if c not in ("time", "band")])
    if cube.shape[-2:] != geobox.shape.yx:
        raise SpecError(f"stackstac gave a {cube.shape[-2:]} grid for a {geobox.shape.yx} tile")
    return cube.assign_coords(xr_coords(geobox))  # the same x/y and spatial_ref as odc-stac


def _check_assets(items: Sequence[pystac.Item], spec: ModalitySpec, keys: list[str],
                  naming: str, backend: str) -> None:
    """Every asset the spec reads is in every item and readable as raster, and a band of a
    multi-band asset (`image.2`: band 2 of asset `image`) is listed in the asset's
    `raster:bands` or `bands`: odc-stac's own errors (`KeyError: ('image', 2)`) say none of it."""
    from odc.stac._mdtools import is_raster_data

    for item in items:
        for key in keys:
            name, _, number = key.rpartition(".")
            multi = key not in item.assets and number.isdigit() and name in item.assets
            asset = item.assets.get(name if multi else key)
            where = f"item {item.id}: sensor {spec.name} (naming '{naming}') reads asset '{key}'"
            if asset is None:
                raise SpecError(f"{where}, which the item lacks (it has: "
                                f"{', '.join(sorted(item.assets))}); set the band's `assets` for "
                                f"this naming in the spec, or give --catalog-naming")
            if not is_raster_data(asset):
                raise SpecError(f"{where}, whose media type {asset.media_type!r} is not read as "
                                "raster: give it `type: image/tiff; application=geotiff` (or no "
                                "type and the role `data`)")
            if multi:
                listed = asset.extra_fields.get("bands") or asset.extra_fields.get("raster:bands") or []
                if backend == "stackstac":
                    raise SpecError(f"{where}: stackstac reads one band per asset; use "
                                    "--cube-backend odc-stac for multi-band assets")
                if len(listed) < int(number):
                    raise SpecError(
                        f"{where}: band {number} of the multi-band asset '{name}', whose bands "
                        f"the item does not list ({len(listed)} listed): add `raster:bands` "
                        "(STAC 1.0) or `bands` (STAC 1.1) to the asset, one entry per band, "
                        'e.g. [{"data_type": "uint8"}, ...]')


def _refuse_gcp_only(items: list[dict], assets: list[str]) -> None:
    """stackstac needs a CRS and transform: items that give none make it open the file, and a
    raster georeferenced by ground control points only (Sentinel-1 GRD) crashes it. Refuse
    those by name; odc-stac warps them from their GCPs."""
    import rasterio

    projected = ("proj:epsg", "proj:code", "proj:wkt2", "proj:projjson")
    for item in items:
        if any(k in item["properties"] for k in projected):
            continue
        href = item["assets"][assets[0]]["href"]
        if any(k in item["assets"][assets[0]] for k in projected):
            continue
        with rasterio.open(href) as src:
            if src.crs is None and src.gcps[0]:
                raise SpecError(
                    f"item {item['id']}: {without_secrets(href)} is georeferenced by ground "
                    "control points only (no CRS or transform), which stackstac cannot read; "
                    "use --cube-backend odc-stac (it warps from the GCPs)")


def plain_item(item: pystac.Item) -> dict:
    """An item dict with absolute, unsigned asset hrefs and no links (never followed: they may
    point to live servers)."""
    plain = item.to_dict(include_self_link=False, transform_hrefs=False)
    plain["links"] = []
    for key, asset in item.assets.items():
        plain["assets"][key]["href"] = asset.get_absolute_href() or asset.href
    return plain


def _readable(item: pystac.Item, assets: list[str],
              patch_url: Callable[[str], str] | None) -> dict:
    """`plain_item` with the assets to read signed."""
    plain = plain_item(item)
    if patch_url:
        for key in assets:
            plain["assets"][key]["href"] = patch_url(plain["assets"][key]["href"])
    return plain


READERS = {"odc-stac": _read_odc, "stackstac": _read_stackstac}


def _assets_to_read(items: Sequence[pystac.Item], spec: ModalitySpec, naming: str,
                    backend: str) -> tuple[list[str], str | None, dict[str, str]]:
    """The spec's data assets, its cloud-mask asset (None if not every item has it), and the
    resampling of each, checked against the items."""
    if backend not in READERS:
        raise SpecError(f"unknown cube backend '{backend}': use one of {', '.join(BACKENDS)}")
    assets = spec.asset_keys(naming)
    mask_asset = spec.mask_asset(naming)
    if mask_asset and not all(mask_asset in item.assets for item in items):
        # e.g. composites served under a provider's naming: their cloud mask is already applied
        log.warning("%s: not every item has the '%s' asset; no per-pixel cloud mask applied",
                    spec.name, mask_asset)
        mask_asset = None
    _check_assets(items, spec, [*assets, *filter(None, [mask_asset])], naming, backend)
    resampling = {a: spec.resampling for a in assets}
    if mask_asset:
        resampling[mask_asset] = "nearest"  # classes and bit flags must not be interpolated
    return assets, mask_asset, resampling


def load_cube(items: Sequence[pystac.Item], spec: ModalitySpec, geobox: GeoBox, *,
              naming: str = "planetary-computer",
              patch_url: Callable[[str], str] | None = None,
              backend: Backend = "odc-stac", lazy: bool = True, threads: int = 1) -> xr.DataArray:
    """Cube of `items` on `geobox` (CRS, resolution = the sensor's GSD): lazy, one Dask chunk,
    or with `lazy=False` read now (odc-stac reads into numpy, on `threads` threads, and the
    scaling and masking run in numpy: what a task that needs the pixels at once wants).

    Values are physical (reflectance, dB backscatter, metres) as float32; nodata and pixels
    the spec's cloud mask rejects are NaN. `patch_url` signs hrefs just before reading.
    """
    assets, mask_asset, resampling = _assets_to_read(items, spec, naming, backend)
    if backend == "odc-stac" and not lazy:
        cube = _stored(items, spec, geobox, assets, mask_asset, resampling, patch_url,
                       threads).cube()
    else:
        cube = _physical_lazy(READERS[backend](items, list(resampling), resampling, geobox,
                                               spec.nodata, patch_url, lazy, threads),
                              assets, mask_asset, spec, items, lazy)
    cube.attrs = {"sensor": spec.name, "gsd_m": spec.gsd_m, "crs": str(geobox.crs),
                  "transform": tuple(geobox.affine)[:6], "backend": backend}
    return cube.rename(spec.name)


def read_stored(items: Sequence[pystac.Item], spec: ModalitySpec, geobox: GeoBox, *,
                naming: str = "planetary-computer",
                patch_url: Callable[[str], str] | None = None, threads: int = 1) -> StoredPixels:
    """`load_cube(lazy=False)`'s read on odc-stac, its pixels kept as stored: made physical
    a window at a time (`StoredPixels.physical`), the same values as the cube's."""
    assets, mask_asset, resampling = _assets_to_read(items, spec, naming, "odc-stac")
    return _stored(items, spec, geobox, assets, mask_asset, resampling, patch_url, threads)


def _physical_lazy(raw: xr.DataArray, assets: list[str], mask_asset: str | None,
                   spec: ModalitySpec, items: Sequence[pystac.Item], lazy: bool) -> xr.DataArray:
    """Scaled and masked in xarray: on Dask (lazy) or as read by stackstac."""
    cube = raw.sel(band=assets)
    valid = cube.notnull()
    if spec.nodata is not None:
        valid = valid & (cube != spec.nodata)
    if mask_asset:
        valid = valid & ~invalid_pixels(raw.sel(band=mask_asset), spec.cloud_mask)
    offsets = _offsets_per_day(items, spec, assets[0], cube.sizes["time"])
    values = cube.astype("float32") * np.float32(spec.scale) + xr.DataArray(offsets, dims="time")
    if spec.transform == "db":
        valid = valid & (values > 0)
        values = 10 * np.log10(values.where(valid))
    cube = values.where(valid).astype("float32").assign_coords(band=spec.band_names)
    return cube.chunk({"time": -1, "band": -1, "y": -1, "x": -1}) if lazy else read_cube(cube)


def _stored(items: Sequence[pystac.Item], spec: ModalitySpec, geobox: GeoBox, assets: list[str],
            mask_asset: str | None, resampling: dict[str, str], patch_url,
            threads: int) -> StoredPixels:
    bands = _load_odc(items, list(resampling), resampling, geobox, spec.nodata, patch_url,
                      False, threads)
    first = bands[assets[0]]
    return StoredPixels(
        bands=[bands[asset].values for asset in assets],
        rejected=(invalid_pixels(bands[mask_asset], spec.cloud_mask).values if mask_asset
                  else None),
        offsets=_offsets_per_day(items, spec, assets[0], first.sizes["time"]),
        spec=spec, coords=dict(first.coords))


Window = slice | list[int]


@dataclass
class StoredPixels:
    """A sensor's pixels as odc-stac read them, each band in its stored type (Sentinel-2's
    uint16 digital numbers: half the bytes of float32), made physical a window at a time
    with `_physical_lazy`'s arithmetic in numpy. A square of tiles read in turn with the
    model stays in memory while its tiles' forwards run: held like this, a 64-tile square of
    Sentinel-2 and -1 is 72 MB instead of 122 MB."""
    bands: list[np.ndarray]       # per data asset: (time, y, x), as stored
    rejected: np.ndarray | None   # (time, y, x): pixels the cloud mask rejects
    offsets: np.ndarray           # (time,) float32: each solar day's offset
    spec: ModalitySpec
    coords: dict                  # the read's time, y, x (and spatial_ref) coordinates

    @property
    def times(self) -> np.ndarray:
        return self.coords["time"].values

    def physical(self, times: Window = slice(None), rows: slice = slice(None),
                 cols: slice = slice(None)) -> np.ndarray:
        """(time, band, y, x) float32 of a window: scaled, offset, in dB if the spec says so;
        nodata, rejected and (for dB) non-positive pixels NaN. A band at a time, so no mask
        or copy of every band is made beside the result."""
        spec = self.spec
        offsets = self.offsets[times][:, None, None]
        rejected = None if self.rejected is None else self.rejected[times, rows, cols]
        first = self.bands[0][times, rows, cols]
        values = np.empty((first.shape[0], len(self.bands), *first.shape[1:]), np.float32)
        for index, band in enumerate(self.bands):
            raw, out = band[times, rows, cols], values[:, index]
            invalid = np.isnan(raw) if raw.dtype.kind == "f" else np.zeros(raw.shape, bool)
            if spec.nodata is not None:
                invalid |= raw == spec.nodata
            if rejected is not None:
                invalid |= rejected
            out[...] = raw
            out *= np.float32(spec.scale)
            out += offsets
            if spec.transform == "db":
                invalid |= ~(out > 0)
                with np.errstate(invalid="ignore", divide="ignore"):  # those are NaN below
                    np.log10(out, out=out)  # on every pixel: 2x faster than with `where=`
                out *= np.float32(10)
            _set_nan(out, invalid)
        return values

    def cube(self) -> xr.DataArray:
        """All of it, physical, as `load_cube` gives it."""
        return xr.DataArray(self.physical(), dims=("time", "band", "y", "x"),
                            coords={**self.coords, "band": self.spec.band_names})


def _set_nan(values: np.ndarray, where: np.ndarray) -> None:
    """`values[where] = np.nan` for float32 values, without a branch per pixel: a cloud
    mask's ragged pattern made numpy's masked store 5x slower (36 dates of 60 x 60 pixels,
    30 % rejected: 0.39 ms against 0.08 a band), most of `StoredPixels.physical`'s time."""
    bits = values.view(np.uint32)
    hit = where.view(np.uint8).astype(np.uint32)
    np.bitwise_and(bits, hit - np.uint32(1), out=bits)  # 0 where hit (1 - 1), else kept (0 - 1)
    hit *= np.uint32(0x7FC00000)                          # float32 NaN: np.float32(np.nan)'s bits
    np.bitwise_or(bits, hit, out=bits)


def read_cube(cube: xr.DataArray) -> xr.DataArray:
    """Read pixels into memory with local threads (safe inside a Dask worker's task)."""
    return cube.compute(scheduler="threads")
