"""Search a provider for one sensor's items over a region and a date range."""

from __future__ import annotations

import datetime as dt
from functools import lru_cache

import pystac
from shapely.geometry import mapping, shape
from shapely.geometry.base import BaseGeometry

from ..errors import NoItemsError, SpecError
from ..modalities import ModalitySpec
from .providers import Provider


def _day_range(start: dt.date, end: dt.date) -> tuple[dt.datetime, dt.datetime]:
    utc = dt.timezone.utc
    return (dt.datetime.combine(start, dt.time.min, utc), dt.datetime.combine(end, dt.time.max, utc))


@lru_cache(maxsize=8)
def _static_catalog(url: str) -> pystac.Catalog:
    try:
        return pystac.Catalog.from_file(url)
    except Exception as exc:  # noqa: BLE001 - surface which catalog could not be read
        raise SpecError(f"cannot read static STAC catalog {url}: {exc}") from None


def _item_interval(item: pystac.Item) -> tuple[dt.datetime, dt.datetime]:
    common = item.common_metadata
    start = common.start_datetime or item.datetime
    end = common.end_datetime or item.datetime
    return start, end


def _search_static(provider: Provider, collection_id: str, region: BaseGeometry,
                   interval: tuple[dt.datetime, dt.datetime] | None) -> list[pystac.Item]:
    catalog = _static_catalog(provider.url)
    collection = catalog.get_child(collection_id)
    if collection is None:
        children = ", ".join(c.id for c in catalog.get_children())
        raise SpecError(f"catalog {provider.name} has no collection '{collection_id}' (it has: {children})")
    items = []
    for item in collection.get_items(recursive=True):
        if item.geometry is None or not shape(item.geometry).intersects(region):
            continue
        if interval is not None:
            start, end = _item_interval(item)
            if end < interval[0] or start > interval[1]:
                continue
        items.append(item)
    return items


def _search_api(provider: Provider, collection_id: str, region: BaseGeometry,
                interval: tuple[dt.datetime, dt.datetime] | None) -> list[pystac.Item]:
    from pystac_client import Client

    client = Client.open(provider.url)
    search = client.search(
        collections=[collection_id],
        intersects=mapping(region),
        datetime=[t.isoformat() for t in interval] if interval else None,
    )
    return list(search.items())


def search_items(provider: Provider, spec: ModalitySpec, region_lonlat: BaseGeometry,
                 start: dt.date, end: dt.date) -> list[pystac.Item]:
    """Items of `spec`'s collection on `provider` intersecting the region (EPSG:4326).

    Time series are limited to [start, end] (whole days, UTC); timeless sensors (DEM) are not.
    Raises NoItemsError when nothing matches.
    """
    collection_id = spec.collection(provider.naming)
    interval = _day_range(start, end) if spec.time_series else None
    run = _search_static if provider.kind == "static" else _search_api
    items = sorted(run(provider, collection_id, region_lonlat, interval), key=lambda i: _item_interval(i)[0])
    if not items:
        west, south, east, north = (round(v, 5) for v in region_lonlat.bounds)
        when = f" between {start} and {end}" if spec.time_series else ""
        raise NoItemsError(
            f"no {spec.name} items (collection '{collection_id}') in catalog {provider.name} "
            f"intersect the region [{west}, {south}, {east}, {north}]{when}"
        )
    return items
