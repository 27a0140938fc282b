"""Build the embedded demo STAC catalog from the real WorldCereal openEO cube.

Source: ../shared/data/worldcereal/worldcereal_preprocessed_inputs.nc (WorldCereal
worldcereal-classification@6c57442, MIT): 12 monthly composites 2020-11..2021-10 over
100 x 100 px at 10 m in EPSG:32631 (Belgium).

Output: catalogs/demo/, a self-contained static STAC catalog laid out like the Planetary
Computer collections the pipeline reads in the cloud (collection ids, asset keys, proj/raster/eo
metadata), with one Cloud-Optimized GeoTIFF per band and date:
- sentinel-2-l2a: B02..B12 (9 bands), uint16 DN, scale 1e-4 -> reflectance, nodata 0
- sentinel-1-rtc: vv, vh as float32 linear backscatter, nodata -32768
- cop-dem-glo-30: data, float32 metres, nodata -32767 (one timeless item)

Run: python catalogs/build_demo.py [--source PATH] [--out catalogs/demo]
It also prints the normalisation statistics that catalogs/modalities/*.yaml carry.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
from pathlib import Path

import numpy as np
import pystac
import rasterio
import xarray as xr
from pyproj import Transformer
from pystac.extensions.eo import Band, EOExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parent.parent / "shared/data/worldcereal/worldcereal_preprocessed_inputs.nc"
EPSG = 32631
SOURCE_NODATA = 65535

S2_BANDS = {  # asset key -> (common name, centre wavelength in micrometres)
    "B02": ("blue", 0.49), "B03": ("green", 0.56), "B04": ("red", 0.665),
    "B05": ("rededge", 0.704), "B06": ("rededge", 0.74), "B07": ("rededge", 0.783),
    "B08": ("nir", 0.842), "B11": ("swir16", 1.61), "B12": ("swir22", 2.19),
}
S1_NODATA = -32768.0
DEM_NODATA = -32767.0
# The DEM is timeless; the real cop-dem-glo-30 items carry this datetime.
DEM_DATETIME = dt.datetime(2021, 4, 22, tzinfo=dt.timezone.utc)


def decode_backscatter(dn: np.ndarray) -> np.ndarray:
    """WorldCereal stores sigma0 as uint16 DN with dB = 20*log10(DN) - 83; return linear power."""
    db = 20.0 * np.log10(dn.astype("float64")) - 83.0
    return (10.0 ** (db / 10.0)).astype("float32")


def write_cog(path: Path, array: np.ndarray, transform, nodata, dtype: str, epsg: int = EPSG) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(
        driver="COG", width=array.shape[1], height=array.shape[0], count=1, dtype=dtype,
        crs=f"EPSG:{epsg}", transform=transform, nodata=nodata,
        compress="DEFLATE", blocksize=128, overviews="NONE",
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array.astype(dtype), 1)


def footprint(bounds: tuple[float, float, float, float], epsg: int = EPSG) -> tuple[list[float], dict]:
    to_lonlat = Transformer.from_crs(epsg, 4326, always_xy=True)
    x0, y0, x1, y1 = bounds
    ring = [to_lonlat.transform(x, y) for x, y in [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]]
    lons, lats = zip(*ring)
    bbox = [float(v) for v in (min(lons), min(lats), max(lons), max(lats))]
    return bbox, {"type": "Polygon", "coordinates": [[[float(x), float(y)] for x, y in ring]]}


def make_collection(cid: str, title: str, description: str, bbox, start, end) -> pystac.Collection:
    collection = pystac.Collection(
        id=cid, title=title, description=description, license="other",
        extent=pystac.Extent(pystac.SpatialExtent([bbox]), pystac.TemporalExtent([[start, end]])),
    )
    collection.add_link(pystac.Link("license", "../LICENSE", media_type="text/plain", title="Licences"))
    return collection


def make_item(item_id, when, bbox, geometry, shape, transform, bounds, epsg: int = EPSG) -> pystac.Item:
    item = pystac.Item(item_id, geometry=geometry, bbox=bbox, datetime=when, properties={})
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    proj.code = f"EPSG:{epsg}"
    proj.shape = list(shape)
    proj.transform = [float(v) for v in list(transform)[:6]]
    proj.bbox = list(bounds)
    RasterExtension.add_to(item)
    return item


def add_asset(item, key, href, raster_band: RasterBand, eo_band: Band | None = None, title=None):
    asset = pystac.Asset(href=href, media_type=pystac.MediaType.COG, roles=["data"], title=title or key)
    item.add_asset(key, asset)
    RasterExtension.ext(asset).bands = [raster_band]
    if eo_band is not None:
        EOExtension.ext(asset, add_if_missing=True).bands = [eo_band]


def build(source: Path, out: Path) -> dict:
    ds = xr.open_dataset(source, engine="h5netcdf")
    xs, ys = ds.x.values, ds.y.values
    res = float(xs[1] - xs[0])
    bounds = tuple(float(v) for v in (xs[0] - res / 2, ys[-1] - res / 2, xs[-1] + res / 2, ys[0] + res / 2))
    transform = rasterio.transform.from_origin(bounds[0], bounds[3], res, res)
    shape = (len(ys), len(xs))
    bbox, geometry = footprint(bounds)
    dates = [dt.datetime.fromisoformat(str(t)[:10]).replace(tzinfo=dt.timezone.utc) for t in ds.t.values]

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    catalog = pystac.Catalog(
        id="anysat-demo",
        description="AnySat demo: real WorldCereal monthly Sentinel-2 L2A, Sentinel-1 and DEM "
        "composites over 1 km2 in Belgium, laid out like the Planetary Computer collections.",
        title="AnySat embedded demo catalog",
    )
    s2 = make_collection("sentinel-2-l2a", "Sentinel-2 Level-2A (demo monthly composites)",
                         "Monthly Sentinel-2 L2A composites, 9 bands, 10 m.", bbox, dates[0], dates[-1])
    s1 = make_collection("sentinel-1-rtc", "Sentinel-1 RTC (demo monthly composites)",
                         "Monthly Sentinel-1 sigma0 VV/VH composites, linear power, 10 m.",
                         bbox, dates[0], dates[-1])
    dem = make_collection("cop-dem-glo-30", "Copernicus DEM GLO-30 (demo cut)",
                          "Elevation in metres, resampled to 10 m by the source cube.",
                          bbox, DEM_DATETIME, DEM_DATETIME)
    stats: dict[str, dict[str, tuple[float, float]]] = {"sentinel-2-l2a": {}, "sentinel-1-rtc": {}}

    for band, (common, wavelength) in S2_BANDS.items():
        values = ds[f"S2-L2A-{band}"].values
        valid = values[values != SOURCE_NODATA] * 1e-4
        stats["sentinel-2-l2a"][band] = (float(valid.mean()), float(valid.std()))
    for pol in ("vv", "vh"):
        db = 10 * np.log10(decode_backscatter(ds[f"S1-SIGMA0-{pol.upper()}"].values))
        stats["sentinel-1-rtc"][pol] = (float(db.mean()), float(db.std()))

    for i, when in enumerate(dates):
        stamp = when.strftime("%Y%m%d")
        item = make_item(f"S2-L2A-DEMO-{stamp}", when, bbox, geometry, shape, transform, bounds)
        item.properties["eo:cloud_cover"] = float(
            100 * (ds["S2-L2A-B02"].values[i] == SOURCE_NODATA).mean())
        item.properties["platform"] = "sentinel-2"
        for band, (common, wavelength) in S2_BANDS.items():
            dn = ds[f"S2-L2A-{band}"].values[i].astype("uint32")
            dn = np.where(dn == SOURCE_NODATA, 0, np.maximum(dn, 1))  # 0 is nodata, as in L2A
            href = out / "sentinel-2-l2a" / item.id / f"{band}.tif"
            write_cog(href, dn, transform, 0, "uint16")
            add_asset(item, band, str(href),
                      RasterBand.create(nodata=0, data_type=DataType.UINT16, scale=1e-4, offset=0.0,
                                        spatial_resolution=res),
                      Band.create(name=band, common_name=common, center_wavelength=wavelength))
        s2.add_item(item)

        item = make_item(f"S1-RTC-DEMO-{stamp}", when, bbox, geometry, shape, transform, bounds)
        item.properties.update({"platform": "sentinel-1", "sar:polarizations": ["VV", "VH"]})
        for pol in ("vv", "vh"):
            power = decode_backscatter(ds[f"S1-SIGMA0-{pol.upper()}"].values[i])
            href = out / "sentinel-1-rtc" / item.id / f"{pol}.tif"
            write_cog(href, power, transform, S1_NODATA, "float32")
            add_asset(item, pol, str(href),
                      RasterBand.create(nodata=S1_NODATA, data_type=DataType.FLOAT32,
                                        spatial_resolution=res, unit="linear power"))
        s1.add_item(item)

    elevation = ds["elevation"].values[0].astype("float32")
    stats["cop-dem-glo-30"] = {"data": (float(elevation.mean()), float(elevation.std()))}
    item = make_item("COP-DEM-GLO-30-DEMO", DEM_DATETIME, bbox, geometry, shape, transform, bounds)
    href = out / "cop-dem-glo-30" / item.id / "data.tif"
    write_cog(href, elevation, transform, DEM_NODATA, "float32")
    add_asset(item, "data", str(href),
              RasterBand.create(nodata=DEM_NODATA, data_type=DataType.FLOAT32, spatial_resolution=res,
                                unit="metre"))
    dem.add_item(item)

    for collection in (s2, s1, dem):
        catalog.add_child(collection)
    catalog.normalize_hrefs(str(out))
    catalog.make_all_asset_hrefs_relative()
    catalog.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=HERE / "demo")
    args = parser.parse_args()
    if not args.source.exists():
        raise SystemExit(f"source cube not found: {args.source} (expected ../shared beside the repo)")
    licence_files = {p.name: p.read_text() for p in (args.out.glob("LICENSE*"))} if args.out.exists() else {}
    extra = {p.name: p.read_text() for p in args.out.glob("*.md")} if args.out.exists() else {}
    stats = build(args.source, args.out)
    for name, text in {**licence_files, **extra}.items():  # keep licence and provenance files
        (args.out / name).write_text(text)
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
