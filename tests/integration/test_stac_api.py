"""The same search code against a real STAC API on loopback (the demo catalog behind rustac's
stac-server), through a proxy that answers 429/503 first, and against a closed port."""

import datetime as dt
import json
import http.server
import threading
import urllib.request

import numpy as np
import pytest
from shapely.geometry import Polygon

from anysat.errors import CatalogUnreachableError, NoItemsError, UnknownCollectionError
from anysat.modalities import available_specs
from anysat.cube.batch import load_tile_batch
from anysat.stac import resolve_provider, search_items, search_sensors
from anysat.stac.api import _open
from anysat.tiles import Tile
from tests.conftest import CENTRAL_TILE, DEMO_BBOX, Held, free_port

pytestmark = pytest.mark.integration
SPECS = available_specs()
DEMO_SPECS = [SPECS["sentinel-2-l2a"], SPECS["sentinel-1"], SPECS["copernicus-dem"]]
START, END = dt.date(2020, 11, 1), dt.date(2021, 10, 31)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setenv("ANYSAT_STAC_RETRIES", "3")
    monkeypatch.setenv("ANYSAT_STAC_BACKOFF_S", "0.01")
    _open.cache_clear()
    yield
    _open.cache_clear()


def ids(found):
    return {name: [i.id for i in items] for name, items in found.items()}


def test_api_finds_what_the_static_catalog_holds(stac_api):
    api = search_sensors(resolve_provider(stac_api), DEMO_SPECS, DEMO_BBOX, START, END, max_cloud=20)
    static = search_sensors(resolve_provider("demo"), DEMO_SPECS, DEMO_BBOX, START, END, max_cloud=20)
    assert ids(api) == ids(static)
    # Two demo composites record 100% cloud cover (months with no clear pixel); the server
    # does not conform to Filter, so the limit is applied to its results.
    assert [len(v) for v in ids(api).values()] == [10, 12, 1]
    everything = search_sensors(resolve_provider(stac_api), DEMO_SPECS, DEMO_BBOX, START, END)
    assert [len(v) for v in ids(everything).values()] == [12, 12, 1]
    # A GeoJSON polygon (sent as `intersects`) and a narrower date range.
    west, south, east, north = DEMO_BBOX
    polygon = Polygon([(west, south), (east, south), (west, north)])
    spring = search_sensors(resolve_provider(stac_api), DEMO_SPECS[:2], polygon,
                            dt.date(2021, 3, 1), dt.date(2021, 5, 31))
    assert [i.datetime.month for i in spring["sentinel-1"]] == [3, 4, 5]


def test_pixels_read_through_the_api_equal_the_static_catalog(stac_api):
    tile = Tile(*CENTRAL_TILE)
    via_api, dates_api = load_tile_batch(resolve_provider(stac_api), DEMO_SPECS, tile, START, END)
    static, dates_static = load_tile_batch(resolve_provider("demo"), DEMO_SPECS, tile, START, END)
    assert dates_api == dates_static == {"sentinel-2-l2a": 12, "sentinel-1": 12, "copernicus-dem": 1}
    for key, tensor in static.items():
        np.testing.assert_array_equal(via_api[key].numpy(), tensor.numpy())


def test_empty_result_and_unknown_collection(stac_api):
    provider = resolve_provider(stac_api)
    with pytest.raises(NoItemsError, match=r"no sentinel-1 items .* between 2015-01-01 and 2015-12-31"):
        search_items(provider, SPECS["sentinel-1"], DEMO_BBOX, dt.date(2015, 1, 1), dt.date(2015, 12, 31))
    typo = SPECS["sentinel-1"].model_copy(update={"collections": {"planetary-computer": "sentinel-1-rct"}})
    with pytest.raises(UnknownCollectionError, match="has no collection 'sentinel-1-rct' .sensor sentinel-1"):
        search_sensors(provider, [typo], DEMO_BBOX, START, END)


class FlakyProxy(http.server.BaseHTTPRequestHandler):
    """Forwards to the STAC API, answering the first `failures` requests with an error."""

    upstream = ""
    failures: list[tuple[int, dict]] = []
    seen: list[int] = []
    paths: list[str] = []
    searches: Held | None = None   # when set, each search is held before it is forwarded

    def _forward(self):
        self.paths.append(self.path)
        if self.path.startswith("/search") and self.searches:
            self.searches.hold()
        if self.failures:
            status, headers = self.failures.pop(0)
            self.seen.append(status)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        request = urllib.request.Request(self.upstream + self.path, data=body, method=self.command,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as answer:
            data = answer.read().replace(self.upstream.encode(), self.proxy_url.encode())
        self.seen.append(200)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _forward

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky_proxy(stac_api):
    port = free_port()
    FlakyProxy.upstream, FlakyProxy.proxy_url = stac_api, f"http://127.0.0.1:{port}"
    FlakyProxy.failures, FlakyProxy.seen, FlakyProxy.paths = [], [], []
    FlakyProxy.searches = None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), FlakyProxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield FlakyProxy
    server.shutdown()


def test_retries_429_and_5xx_then_succeeds(flaky_proxy):
    flaky_proxy.failures = [(503, {}), (429, {"Retry-After": "0"}), (502, {})]
    items = search_items(resolve_provider(flaky_proxy.proxy_url), SPECS["sentinel-1"], DEMO_BBOX, START, END)
    assert len(items) == 12
    assert flaky_proxy.seen[:4] == [503, 429, 502, 200]


def test_persistent_errors_and_unreachable_api_say_what_failed(flaky_proxy):
    flaky_proxy.failures = [(503, {})] * 10
    with pytest.raises(CatalogUnreachableError, match=r"answered HTTP 503 \(after 3 retries"):
        search_items(resolve_provider(flaky_proxy.proxy_url), SPECS["sentinel-1"], DEMO_BBOX, START, END)
    assert flaky_proxy.seen == [503] * 4
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(CatalogUnreachableError, match=f"cannot reach STAC API {closed}"):
        search_items(resolve_provider(closed), SPECS["sentinel-1"], DEMO_BBOX, START, END)


def test_a_run_searches_once_per_block_not_per_tile(flaky_proxy, tmp_path):
    """The plan searches each block of tiles once; embedding reads the plan's items."""
    from anysat.pipeline import run_region
    from anysat.request import RegionRequest

    def searches() -> int:
        return sum(p.startswith("/search") for p in flaky_proxy.paths)

    search_sensors(resolve_provider(flaky_proxy.proxy_url), DEMO_SPECS, DEMO_BBOX, START, END)
    per_search = searches()                      # requests of one search: sensor groups x pages
    flaky_proxy.paths.clear()
    request = RegionRequest.build(bbox=DEMO_BBOX, start=START, end=END, tile_size_m=300,
                                  patch_size_m=60, catalog=flaky_proxy.proxy_url,
                                  output_uri=str(tmp_path / "run"))
    manifest = run_region(request)
    blocks = json.loads((tmp_path / "run" / "plan.json").read_text())["blocks"]
    assert manifest["tiles"] == 20 and blocks == 2    # the square kilometre meets 2 blocks
    assert searches() == blocks * per_search
    assert manifest["patches_with_data"] > 0


def test_blocks_are_searched_at_once_into_the_same_plan(flaky_proxy, tmp_path, monkeypatch):
    """A continent is thousands of blocks of a few seconds' search each: they go out several
    at once (ANYSAT_SEARCH_THREADS), and the plan is the one searched block after block."""
    from anysat.plan import make_plan
    from anysat.request import RegionRequest

    plans = {}
    for threads in ("1", "8"):
        monkeypatch.setenv("ANYSAT_SEARCH_THREADS", threads)
        flaky_proxy.searches = Held(0.2)
        request = RegionRequest.build(bbox=DEMO_BBOX, start=START, end=END, tile_size_m=60,
                                      patch_size_m=60, catalog=flaky_proxy.proxy_url,
                                      output_uri=str(tmp_path / threads))
        plan = make_plan(request, "0" * 64, 8)
        plans[threads] = plan
        most = flaky_proxy.searches.most
        assert most == 1 if threads == "1" else most > 1, (threads, most)
    one, eight = plans["1"], plans["8"]
    assert eight.tiles["block"].nunique() > 2
    assert one.tiles.equals(eight.tiles)
    for tile in one.tile_ids:
        assert ids(one.items(tile)) == ids(eight.items(tile))
    files = sorted(p.name for p in (tmp_path / "1" / "plan" / "items").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "8" / "plan" / "items").iterdir())
    assert all((tmp_path / "1" / "plan" / "items" / f).read_bytes()
               == (tmp_path / "8" / "plan" / "items" / f).read_bytes() for f in files)
