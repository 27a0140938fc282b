"""STAC API access through pystac-client: retries with backoff, errors that say what failed.

Retries (429 and 5xx, connection errors) back off exponentially and honour Retry-After.
Deployments tune them with ANYSAT_STAC_RETRIES (default 5), ANYSAT_STAC_BACKOFF_S (first wait,
doubling; default 1) and ANYSAT_STAC_TIMEOUT_S (per request; default 60).
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

import pystac
from pystac_client import Client
from pystac_client.exceptions import APIError
from pystac_client.stac_api_io import StacApiIO
from urllib3.util.retry import Retry

from ..errors import CatalogUnreachableError

log = logging.getLogger("anysat")
RETRY_STATUSES = (429, 500, 502, 503, 504)


def retry_settings() -> tuple[int, float, float]:
    """(retries, first backoff in s, per-request timeout in s), read from the environment."""
    env = os.environ.get
    return (int(env("ANYSAT_STAC_RETRIES", 5)), float(env("ANYSAT_STAC_BACKOFF_S", 1.0)),
            float(env("ANYSAT_STAC_TIMEOUT_S", 60)))


def _explain(url: str, exc: Exception) -> CatalogUnreachableError:
    status = getattr(exc, "status_code", None)
    retries = retry_settings()[0]
    if status is None:
        reason = f"cannot reach STAC API {url} (after {retries} retries): {str(exc)[:300]}"
    else:
        reason = f"STAC API {url} answered HTTP {status} (after {retries} retries for 429/5xx)"
        if str(exc):
            reason += f": {str(exc)[:300]}"
    return CatalogUnreachableError(reason)


@lru_cache(maxsize=8)
def _open(url: str, retries: int, backoff: float, timeout: float) -> Client:
    retry = Retry(total=retries, backoff_factor=backoff, status_forcelist=RETRY_STATUSES,
                  allowed_methods=None,  # searches are POSTs, and safe to repeat
                  respect_retry_after_header=True, raise_on_status=False)
    try:
        return Client.open(url, stac_io=StacApiIO(max_retries=retry, timeout=timeout))
    except (APIError, OSError) as exc:
        raise _explain(url, exc) from None


def open_client(url: str) -> Client:
    """The API's client, opened once per process and retry settings (the landing page is
    fetched once, not per tile)."""
    return _open(url, *retry_settings())


def run_search(client: Client, name: str, query: dict) -> list[pystac.Item]:
    """All pages of one item search. Logs the query without secrets (there are none in it:
    signing happens later, per asset href)."""
    shown = {k: v for k, v in query.items() if k != "intersects"}
    log.debug("searching %s: %s", name, shown)
    try:
        search = client.search(**query)
        items = []
        for page, collection in enumerate(search.pages(), start=1):
            items.extend(collection.items)
            log.debug("%s: page %d, %d items so far", name, page, len(items))
        return items
    except (APIError, OSError) as exc:
        raise _explain(client.get_self_href() or name, exc) from None


def collection_exists(client: Client, collection_id: str) -> bool:
    try:
        return client.get_collection(collection_id) is not None
    except (APIError, OSError) as exc:
        raise _explain(client.get_self_href() or collection_id, exc) from None
