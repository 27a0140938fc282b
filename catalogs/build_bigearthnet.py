"""Build catalogs/pretrain/bigearthnet/, a static STAC catalog of the six BigEarthNet
Sentinel-2 L2A + Sentinel-1 patch pairs, so that pretraining chips come from them through
the same path as from any catalog (`anysat ingest`).

Source: ../shared/data/pretrain/bigearthnet-s1s2-examples (kai-tub/bigearthnet_common@2010779,
Apache-2.0; BigEarthNet CDLA-Permissive-1.0): per place a 1.2 km S2 L2A patch (uint16
reflectance x 1e4; B02 B03 B04 B08 at 10 m, B05 B06 B07 B11 B12 at 20 m) and an S1 patch
(float32 sigma0 in dB, 10 m). The catalog holds:
- sentinel-2-l2a: the nine bands of our S2 spec, copied as COGs at their own resolution
  (nodata 0, scale 1e-4);
- sentinel-1-rtc: VV and VH as linear power (10^(dB/10)) COGs, as the Planetary Computer's
  RTC collection and the demo catalog hold them (the S1 spec turns them back into dB);
- footprints.geojson: one feature per place (each in its own UTM zone), what to ingest.

Run: python catalogs/build_bigearthnet.py [--source PATH] [--out catalogs/pretrain/bigearthnet]
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
from pystac.extensions.eo import Band
from pystac.extensions.raster import DataType, RasterBand

from build_demo import S1_NODATA, S2_BANDS, add_asset, footprint, make_collection, make_item, write_cog

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parent.parent / "shared/data/pretrain/bigearthnet-s1s2-examples"
KEEP = ("LICENSE", "PROVENANCE.md")


def read(path: Path) -> tuple[np.ndarray, rasterio.Affine, int]:
    with rasterio.open(path) as src:
        return src.read(1), src.transform, src.crs.to_epsg()


def build(source: Path, out: Path) -> list[dict]:
    kept = {name: (out / name).read_bytes() for name in KEEP if (out / name).exists()}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name, data in kept.items():
        (out / name).write_bytes(data)
    catalog = pystac.Catalog(id="anysat-pretrain-bigearthnet", title="BigEarthNet examples (pretraining)",
                             description="Six BigEarthNet S2 L2A + S1 patch pairs (Austria, Ireland, "
                                         "Portugal, Finland), one date each, for JEPA pretraining.")
    items: dict[str, list[pystac.Item]] = {"sentinel-2-l2a": [], "sentinel-1-rtc": []}
    features = []
    for s1_dir in sorted((source / "BigEarthNet-S1-Example").iterdir()):
        meta = json.loads(next(s1_dir.glob("*_labels_metadata.json")).read_text())
        s2_dir = source / "BigEarthNet-S2-Example" / meta["corresponding_s2_patch"]
        s2_when = dt.datetime.strptime(s2_dir.name.split("_")[2][:8], "%Y%m%d").replace(tzinfo=dt.timezone.utc)
        s1_when = dt.datetime.fromisoformat(meta["acquisition_time"]).replace(tzinfo=dt.timezone.utc)
        _, transform, epsg = read(next(s2_dir.glob("*_B02.tif")))
        bounds = (transform.c, transform.f - 1200.0, transform.c + 1200.0, transform.f)
        bbox, geometry = footprint(bounds, epsg)
        features.append({"type": "Feature", "geometry": geometry,
                         "properties": {"place": s1_dir.name, "epsg": epsg}})

        item = make_item(s2_dir.name, s2_when, bbox, geometry, (120, 120), transform, bounds, epsg)
        item.properties.update({"platform": "sentinel-2", "eo:cloud_cover": 0.0})
        for band, (common, wavelength) in S2_BANDS.items():
            dn, band_transform, _ = read(next(s2_dir.glob(f"*_{band}.tif")))
            href = out / "sentinel-2-l2a" / item.id / f"{band}.tif"
            write_cog(href, dn, band_transform, 0, "uint16", epsg)
            add_asset(item, band, str(href),
                      RasterBand.create(nodata=0, data_type=DataType.UINT16, scale=1e-4, offset=0.0,
                                        spatial_resolution=band_transform.a),
                      Band.create(name=band, common_name=common, center_wavelength=wavelength))
        items["sentinel-2-l2a"].append(item)

        item = make_item(s1_dir.name, s1_when, bbox, geometry, (120, 120), transform, bounds, epsg)
        item.properties.update({"platform": "sentinel-1", "sar:polarizations": ["VV", "VH"]})
        for pol in ("vv", "vh"):
            db, band_transform, _ = read(next(s1_dir.glob(f"*_{pol.upper()}.tif")))
            power = np.where(np.isfinite(db), 10.0 ** (db / 10.0), S1_NODATA).astype("float32")
            href = out / "sentinel-1-rtc" / item.id / f"{pol}.tif"
            write_cog(href, power, band_transform, S1_NODATA, "float32", epsg)
            add_asset(item, pol, str(href),
                      RasterBand.create(nodata=S1_NODATA, data_type=DataType.FLOAT32,
                                        spatial_resolution=band_transform.a, unit="linear power"))
        items["sentinel-1-rtc"].append(item)

    lons = [x for f in features for x, _ in f["geometry"]["coordinates"][0]]
    lats = [y for f in features for _, y in f["geometry"]["coordinates"][0]]
    whole = [min(lons), min(lats), max(lons), max(lats)]
    for cid, title in (("sentinel-2-l2a", "Sentinel-2 L2A (BigEarthNet patches)"),
                       ("sentinel-1-rtc", "Sentinel-1 sigma0, linear power (BigEarthNet patches)")):
        dates = [i.datetime for i in items[cid]]
        collection = make_collection(cid, title, title + ".", whole, min(dates), max(dates))
        for item in items[cid]:
            collection.add_item(item)
        catalog.add_child(collection)
    catalog.normalize_hrefs(str(out))
    catalog.make_all_asset_hrefs_relative()
    catalog.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    (out / "footprints.geojson").write_text(json.dumps(
        {"type": "FeatureCollection", "features": features}, indent=1) + "\n")
    return features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=HERE / "pretrain" / "bigearthnet")
    args = parser.parse_args()
    if not args.source.exists():
        raise SystemExit(f"source not found: {args.source} (expected ../shared beside the repo)")
    for feature in build(args.source, args.out):
        print(feature["properties"])


if __name__ == "__main__":
    main()
