"""Providers (catalogs/providers.yaml), or any STAC API URL / static catalog path given directly."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
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
    token_env: str | None = None  # `signing: sas-token`: the variable that holds the token


def _read_providers(path: Path) -> dict[str, Provider]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        providers = {}
        for name, entry in raw.items():
            url = entry["url"]
            if entry["kind"] == "static" and "://" not in url:
                url = str((path.parent / url).resolve())
            if entry["kind"] not in ("static", "api"):
                raise ValueError(f"kind {entry['kind']!r} is not static or api")
            providers[name] = Provider(name, entry["kind"], url, entry.get("naming", name),
                                       entry.get("signing"), entry.get("token_env"))
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SpecError(f"providers file {path}: {type(exc).__name__}: {exc} (each entry: kind "
                        "static|api, url, and optionally naming, signing, token_env)") from None
    return providers


@lru_cache(maxsize=4)
def _providers(extra: str) -> dict[str, Provider]:
    providers = _read_providers(catalogs_dir() / "providers.yaml")
    for path in filter(None, extra.split(os.pathsep)):
        providers.update(_read_providers(Path(path).expanduser().resolve()))
    return providers


def known_providers() -> dict[str, Provider]:
    """The packaged providers, then the user's (`ANYSAT_PROVIDERS`: YAML files of the same
    form, separated by the path separator), which may add or override entries."""
    return _providers(os.environ.get("ANYSAT_PROVIDERS", ""))


def resolve_provider(catalog: str, naming: str | None = None) -> Provider:
    """A provider name from the providers files, a STAC API URL, or a static catalog.json
    path/URI. `naming` says whose collection ids and asset keys the catalog uses (a spec's
    `collections` key); a URL or path is read with Planetary Computer's unless told."""
    providers = known_providers()
    if catalog in providers:
        found = providers[catalog]
    elif catalog.endswith(".json"):
        found = Provider(catalog, "static", catalog, DEFAULT_COLLECTION_NAMING)
    elif catalog.startswith(("http://", "https://")):
        found = Provider(catalog, "api", catalog, DEFAULT_COLLECTION_NAMING)
    else:
        raise SpecError(
            f"unknown catalog '{catalog}': use one of {', '.join(providers)}, a STAC API URL "
            "or the path/URI of a static catalog.json (or add it to a providers file named by "
            "ANYSAT_PROVIDERS)"
        )
    return replace(found, naming=naming) if naming else found
