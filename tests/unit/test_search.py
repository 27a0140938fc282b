import datetime as dt

import pytest
from shapely.geometry import box

from anysat.errors import NoItemsError, SpecError
from anysat.modalities import available_specs
from anysat.stac import resolve_provider, search_items
from tests.conftest import DEMO_BBOX, DEMO_CATALOG

SPECS = available_specs()


def test_demo_search_returns_items_sorted_by_date():
    items = search_items(resolve_provider("demo"), SPECS["sentinel-2-l2a"], box(*DEMO_BBOX),
                         dt.date(2020, 1, 1), dt.date(2022, 1, 1))
    dates = [i.datetime.date() for i in items]
    assert len(items) == 12 and dates == sorted(dates)
    assert dates[0] == dt.date(2020, 11, 1) and set(items[0].assets) >= {"B02", "B12"}


def test_date_range_is_inclusive_and_ignored_for_timeless_dem():
    provider, region = resolve_provider("demo"), box(*DEMO_BBOX)
    spring = search_items(provider, SPECS["sentinel-1"], region, dt.date(2021, 3, 1), dt.date(2021, 5, 1))
    assert [i.datetime.month for i in spring] == [3, 4, 5]
    dem = search_items(provider, SPECS["copernicus-dem"], region, dt.date(2019, 1, 1), dt.date(2019, 1, 2))
    assert [i.id for i in dem] == ["COP-DEM-GLO-30-DEMO"]


def test_bbox_outside_the_catalog():
    with pytest.raises(NoItemsError, match=r"no sentinel-2-l2a items .* in catalog demo intersect the region \[10.0, 45.0"):
        search_items(resolve_provider("demo"), SPECS["sentinel-2-l2a"], box(10, 45, 10.1, 45.1),
                     dt.date(2021, 1, 1), dt.date(2021, 12, 31))


def test_static_catalog_by_path_uses_planetary_computer_naming():
    provider = resolve_provider(str(DEMO_CATALOG / "catalog.json"))
    assert provider.kind == "static"
    items = search_items(provider, SPECS["sentinel-1"], box(*DEMO_BBOX), dt.date(2021, 1, 1), dt.date(2021, 1, 31))
    assert [i.id for i in items] == ["S1-RTC-DEMO-20210101"]


def test_unknown_catalog():
    with pytest.raises(SpecError, match="unknown catalog 'nowhere'"):
        resolve_provider("nowhere")
    assert resolve_provider("earth-search").kind == "api"
