"""Search a provider for the items of one or more sensors over a region and a date range."""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from collections.abc import Sequence
from functools import lru_cache

import pystac
from shapely.geometry import box, mapping, shape
from shapely.geometry.base import BaseGeometry

from ..errors import NoItemsError, SpecError, UnknownCollectionError
from ..modalities import ModalitySpec
from .api import collection_exists, open_client, run_search
from .providers import Provider

log = logging.getLogger("anysat")

# A region is a lon/lat bbox (west, south, east, north), sent to APIs as `bbox`, or a shapely
# geometry in EPSG:4326, sent as `intersects`.
Region = BaseGeometry | tuple[float, float, float, float]


def region_geometry(region: Region) -> BaseGeometry:
    return region if isinstance(region, BaseGeometry) else box(*region)


def _item_interval(item: pystac.Item) -> tuple[dt.datetime, dt.datetime]:
    common = item.common_metadata
    return common.start_datetime or item.datetime, common.end_datetime or item.datetime


def _day_range(start: dt.date, end: dt.date) -> tuple[dt.datetime, dt.datetime]:
    utc = dt.timezone.utc
    return dt.datetime.combine(start, dt.time.min, utc), dt.datetime.combine(end, dt.time.max, utc)


def cloud_filter(prop: str, max_cloud: float) -> dict:
    """The CQL2-JSON filter `prop <= max_cloud`, sent to APIs that conform to Filter."""
    return {"op": "<=", "args": [{"property": prop}, max_cloud]}


def within_cloud_limit(item: pystac.Item, spec: ModalitySpec, max_cloud: float | None) -> bool:
    """Applied to every result, filtered server-side or not: some APIs ignore filters they do
    not know (a recorded Earth Search answer to `lte` holds scenes above the limit)."""
    if max_cloud is None or spec.cloud_cover_property is None:
        return True
    cover = item.properties.get(spec.cloud_cover_property)
    return cover is not None and cover <= max_cloud


@lru_cache(maxsize=8)
def _static_catalog(url: str) -> pystac.Catalog:
    try:
        return pystac.Catalog.from_file(url)
    except Exception as exc:  # noqa: BLE001 - surface which catalog could not be read
        raise SpecError(f"cannot read static STAC catalog {url}: {exc}") from None


def _search_static(provider: Provider, spec: ModalitySpec, region: BaseGeometry,
                   start: dt.date, end: dt.date) -> list[pystac.Item]:
    catalog = _static_catalog(provider.url)
    collection_id = spec.collection(provider.naming)
    collection = catalog.get_child(collection_id)
    if collection is None:
        children = ", ".join(c.id for c in catalog.get_children())
        raise UnknownCollectionError(
            f"catalog {provider.name} has no collection '{collection_id}' (it has: {children})")
    first, last = _day_range(start, end)
    items = []
    for item in collection.get_items(recursive=True):
        if item.geometry is None or not shape(item.geometry).intersects(region):
            continue
        item_start, item_end = _item_interval(item)
        if spec.time_series and (item_end < first or item_start > last):
            continue
        items.append(item)
    return items


def _search_api(provider: Provider, specs: Sequence[ModalitySpec], region: Region,
                start: dt.date, end: dt.date, max_cloud: float | None,
                page_size: int | None) -> dict[str, list[pystac.Item]]:
    """One request (paged) per group of sensors that share a date range and a cloud filter;
    the results are split per sensor by collection."""
    client = open_client(provider.url)
    supports_filter = client.conforms_to("FILTER")
    groups: dict[tuple, list[ModalitySpec]] = defaultdict(list)
    for spec in specs:
        cloud = spec.cloud_cover_property if max_cloud is not None else None
        groups[(spec.time_series, cloud)].append(spec)
    found: dict[str, list[pystac.Item]] = {}
    for (time_series, cloud), group in groups.items():
        by_collection = {spec.collection(provider.naming): spec for spec in group}
        query: dict = {"collections": list(by_collection)}
        if isinstance(region, BaseGeometry):
            query["intersects"] = mapping(region)
        else:
            query["bbox"] = list(region)
        if time_series:
            query["datetime"] = f"{start.isoformat()}/{end.isoformat()}"
        if cloud is not None and supports_filter:
            query["filter"] = cloud_filter(cloud, max_cloud)
            query["filter_lang"] = "cql2-json"
        if page_size:
            query["limit"] = page_size
        items = run_search(client, provider.name, query)
        for collection_id, spec in by_collection.items():
            found[spec.name] = [i for i in items if i.collection_id == collection_id]
            if not found[spec.name] and not collection_exists(client, collection_id):
                raise UnknownCollectionError(
                    f"STAC API {provider.name} has no collection '{collection_id}' "
                    f"(sensor {spec.name}); check the modality spec's collections")
    return found


def search_sensors(provider: Provider, specs: Sequence[ModalitySpec], region: Region,
                   start: dt.date, end: dt.date, *, max_cloud: float | None = None,
                   page_size: int | None = None) -> dict[str, list[pystac.Item]]:
    """Items per sensor name intersecting the region (see `Region`), sorted by date.

    Time series are limited to [start, end] (whole days, UTC); timeless sensors (DEM) are not.
    `max_cloud` (%) limits scene cloud cover of sensors that record it. A sensor with no items
    gets an empty list; an unknown collection or unreachable API raises.
    """
    if provider.kind == "static":
        geometry = region_geometry(region)
        found = {s.name: _search_static(provider, s, geometry, start, end) for s in specs}
    else:
        found = _search_api(provider, specs, region, start, end, max_cloud, page_size)
    result = {}
    for spec in specs:
        items = [i for i in found[spec.name] if within_cloud_limit(i, spec, max_cloud)]
        if len(items) < len(found[spec.name]):
            log.info("%s: %d of %d scenes above %g%% cloud cover left out", spec.name,
                     len(found[spec.name]) - len(items), len(found[spec.name]), max_cloud)
        result[spec.name] = sorted(items, key=lambda i: (_item_interval(i)[0], i.id))
    return result


def search_items(provider: Provider, spec: ModalitySpec, region: Region,
                 start: dt.date, end: dt.date, *, max_cloud: float | None = None) -> list[pystac.Item]:
    """Items of one sensor (see `search_sensors`); raises NoItemsError when nothing matches."""
    items = search_sensors(provider, [spec], region, start, end, max_cloud=max_cloud)[spec.name]
    if not items:
        raise NoItemsError(no_items_message(provider, spec, region, start, end, max_cloud))
    return items


def no_items_message(provider: Provider, spec: ModalitySpec, region: Region,
                     start: dt.date, end: dt.date, max_cloud: float | None = None) -> str:
    west, south, east, north = (round(v, 5) for v in region_geometry(region).bounds)
    when = f" between {start} and {end}" if spec.time_series else ""
    cloud = (f" with at most {max_cloud:g}% cloud cover"
             if max_cloud is not None and spec.cloud_cover_property else "")
    return (f"no {spec.name} items (collection '{spec.collection(provider.naming)}') in catalog "
            f"{provider.name} intersect the region [{west}, {south}, {east}, {north}]{when}{cloud}")
