"""Providers (catalogs/providers.yaml), or any STAC API URL / static catalog path given directly."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import yaml

from ..errors import SpecError
from ..resources import catalogs_dir

# Catalogs given by URL or path use Planetary Computer collection ids, as the demo does.
DEFAULT_COLLECTION_NAMING = "planetary-computer"


@dataclass(frozen=True)
class Provider:
    name: str
    kind: Literal["static", "api"]
    url: str
    naming: str  # which key of a modality spec's `collections` names its collections here
    signing: str | None = None


@lru_cache(maxsize=1)
def known_providers() -> dict[str, Provider]:
    path = catalogs_dir() / "providers.yaml"
    raw = yaml.safe_load(path.read_text())
    providers = {}
    for name, entry in raw.items():
        url = entry["url"]
        if entry["kind"] == "static" and "://" not in url:
            url = str((path.parent / url).resolve())
        providers[name] = Provider(name, entry["kind"], url, name, entry.get("signing"))
    return providers


def resolve_provider(catalog: str) -> Provider:
    """A provider name from providers.yaml, a STAC API URL, or a static catalog.json path/URI."""
    providers = known_providers()
    if catalog in providers:
        return providers[catalog]
    if catalog.endswith(".json"):
        return Provider(catalog, "static", catalog, DEFAULT_COLLECTION_NAMING)
    if catalog.startswith(("http://", "https://")):
        return Provider(catalog, "api", catalog, DEFAULT_COLLECTION_NAMING)
    raise SpecError(
        f"unknown catalog '{catalog}': use one of {', '.join(providers)}, a STAC API URL "
        "or the path/URI of a static catalog.json"
    )
