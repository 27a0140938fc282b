"""Modality specs: what a sensor is (bands, GSD, scaling, statistics), loaded from YAML."""

from __future__ import annotations

import datetime as dt
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError,
                      model_validator)

from .errors import SpecError
from .resources import catalogs_dir

log = logging.getLogger("anysat")


class BandSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    mean: float
    std: PositiveFloat
    assets: dict[str, str] = Field(default_factory=dict)  # provider -> asset key, default `name`


class CloudMaskSpec(BaseModel):
    """A per-pixel quality asset, read with nearest resampling: a pixel is invalid when its
    value is one of `invalid_classes` (Sentinel-2 SCL) or has one of `invalid_bits` set
    (Landsat QA_PIXEL). Providers not named in `assets` have no mask (e.g. composites)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    assets: dict[str, str]  # provider -> asset key
    invalid_classes: tuple[int, ...] = ()
    invalid_bits: tuple[int, ...] = ()

    @model_validator(mode="after")
    def _one_rule(self) -> CloudMaskSpec:
        if bool(self.invalid_classes) == bool(self.invalid_bits):
            raise ValueError("give exactly one of invalid_classes or invalid_bits")
        return self


class BaselineOffset(BaseModel):
    """Sentinel-2's processing baseline 04.00 (from 25 January 2022) adds 1000 DN to every
    band: items of that baseline or later (`s2:processing_baseline`, or without one, acquired
    from `since`) take `offset`, the others the spec's. An item's own `raster:bands` offset,
    for the spec's scale, wins over both."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    baseline: str = "04.00"
    since: dt.date = dt.date(2022, 1, 25)
    offset: float


class ModalitySpec(BaseModel):
    """One sensor. Values are scaled to physical units: value * scale + offset (then dB)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    aliases: tuple[str, ...] = ()
    title: str = ""
    gsd_m: PositiveFloat
    time_series: bool
    # Single-image VHR sensors: the model reads s x s pixel blocks as one sub-patch
    # (a sub-patch is gsd_m * subpatch_px metres wide). Time series: 1 (one pixel).
    subpatch_px: PositiveInt = 1
    collections: dict[str, str]
    bands: tuple[BandSpec, ...] = Field(min_length=1)
    nodata: float | None = None
    scale: float = 1.0
    offset: float = 0.0
    offset_from_baseline: BaselineOffset | None = None
    transform: Literal["none", "db"] = "none"
    resampling: Literal["nearest", "bilinear", "cubic", "average"] = "bilinear"
    # Item property holding the scene cloud cover (%), for `max_cloud` searches.
    cloud_cover_property: str | None = None
    cloud_mask: CloudMaskSpec | None = None

    @model_validator(mode="after")
    def _unique_bands(self) -> ModalitySpec:
        names = [b.name for b in self.bands]
        if len(set(names)) != len(names):
            raise ValueError(f"band names repeat: {names}")
        return self

    @model_validator(mode="after")
    def _subpatch_for_images_only(self) -> ModalitySpec:
        if self.time_series and self.subpatch_px != 1:
            raise ValueError("subpatch_px applies to single-image sensors; time series use 1")
        return self

    @property
    def subpatch_m(self) -> float:
        return self.gsd_m * self.subpatch_px

    @property
    def band_names(self) -> list[str]:
        return [b.name for b in self.bands]

    def collection(self, provider: str) -> str:
        try:
            return self.collections[provider]
        except KeyError:
            raise SpecError(
                f"sensor '{self.name}' has no collection under the '{provider}' naming of "
                f"collection ids and asset keys (its spec names: "
                f"{', '.join(sorted(self.collections))}); give the catalog's naming with "
                "--catalog-naming (or `naming:` in a providers file), or add it to the spec's "
                "`collections` (--modalities DIR)"
            ) from None

    def asset_keys(self, provider: str) -> list[str]:
        return [b.assets.get(provider, b.name) for b in self.bands]

    def mask_asset(self, provider: str) -> str | None:
        return self.cloud_mask.assets.get(provider) if self.cloud_mask else None


def modalities_dir() -> Path:
    return catalogs_dir() / "modalities"


def spec_folders() -> tuple[Path, ...]:
    """The package's spec folder, then the user's (`ANYSAT_MODALITIES`, folders separated by
    the path separator; `--modalities` sets it): a user spec overrides a packaged one of the
    same name."""
    extra = os.environ.get("ANYSAT_MODALITIES", "")
    return (modalities_dir(), *(Path(p).expanduser().resolve() for p in extra.split(os.pathsep) if p))


def load_spec(path: Path) -> ModalitySpec:
    """Load and validate one spec; errors name the file and the field."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: cannot read modality spec: {exc}") from None
    try:
        return ModalitySpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"field '{'.'.join(str(p) for p in e['loc'])}': {e['msg']}" for e in exc.errors()
        )
        raise SpecError(f"{path}: invalid modality spec: {problems}") from None


@lru_cache(maxsize=8)  # spec files are read once per process, not per tile
def _load_folders(folders: tuple[Path, ...]) -> tuple[dict[str, ModalitySpec], dict[str, SpecError]]:
    """Specs by name, and the errors of files that do not load, by file stem: a broken spec
    fails only the runs that ask for it."""
    specs, broken = {}, {}
    for folder in folders:
        if not folder.is_dir():
            raise SpecError(f"modality spec folder {folder} (ANYSAT_MODALITIES / --modalities) "
                            "does not exist")
        for path in sorted(folder.glob("*.yaml")):
            try:
                spec = load_spec(path)
            except SpecError as exc:
                broken[path.stem] = exc
                log.warning("%s (runs that do not use it are not affected)", exc)
                continue
            specs[spec.name] = spec
            broken.pop(spec.name, None)
    return specs, broken


def available_specs(directory: Path | None = None) -> dict[str, ModalitySpec]:
    """Every spec that loads, by name (`directory`: that folder alone)."""
    return _load_folders((directory,) if directory else spec_folders())[0]


def resolve_sensors(names: list[str], directory: Path | None = None) -> list[ModalitySpec]:
    """Map sensor names or aliases (`s2`, `sentinel-1`, ...) to specs, in the order given."""
    specs, broken = _load_folders((directory,) if directory else spec_folders())
    lookup = {alias: s for s in specs.values() for alias in (s.name, *s.aliases)}
    for name in names:
        if name not in lookup and name in broken:
            raise broken[name]
    unknown = [n for n in names if n not in lookup]
    if unknown:
        raise SpecError(
            f"unknown sensor(s) {', '.join(repr(n) for n in unknown)}; known sensors: "
            + ", ".join(f"{s.name} ({', '.join(s.aliases)})" for s in specs.values())
            + (f"; specs that failed to load: {', '.join(sorted(broken))}" if broken else "")
            + " (add your own with --modalities DIR or ANYSAT_MODALITIES)"
        )
    resolved: list[ModalitySpec] = []
    for name in names:
        if lookup[name] not in resolved:
            resolved.append(lookup[name])
    return resolved
