"""Model configuration: sizes and the modalities a model was built for (from their specs)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from ..modalities import ModalitySpec

# name: (dim, depth, heads) of the encoder, as in the official AnySat configs, plus the
# JEPA predictor (dim, depth, heads); the official base predictor is 768-d, 4 blocks, 16 heads.
SIZES = {
    "tiny": {"dim": 256, "depth": 2, "heads": 4, "predictor": (256, 2, 8)},
    "small": {"dim": 512, "depth": 4, "heads": 8, "predictor": (512, 4, 16)},
    "base": {"dim": 768, "depth": 6, "heads": 12, "predictor": (768, 4, 16)},
}


@dataclass(frozen=True)
class ModalityConfig:
    """What the model knows of a sensor: bands, GSD, time series or not, input statistics."""

    name: str
    bands: tuple[str, ...]
    gsd_m: float
    time_series: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    subpatch_px: int = 1

    @classmethod
    def from_spec(cls, spec: ModalitySpec) -> ModalityConfig:
        return cls(spec.name, tuple(spec.band_names), float(spec.gsd_m), spec.time_series,
                   tuple(b.mean for b in spec.bands), tuple(b.std for b in spec.bands),
                   spec.subpatch_px)

    @property
    def subpatch_m(self) -> float:
        return self.gsd_m * self.subpatch_px


@dataclass(frozen=True)
class AnySatConfig:
    modalities: tuple[ModalityConfig, ...]
    dim: int = 256
    depth: int = 2
    heads: int = 4
    # The sub-patch transformer (sub-patch tokens of a patch -> the patch token). The official
    # base repeats the encoder's depth here (6 x 768-d over every sub-patch): most of its
    # compute. One block is our default; set it to `depth` for the official layout.
    subpatch_depth: int = 1
    temporal_heads: int = 16
    temporal_key_dim: int = 8
    mlp_ratio: float = 4.0
    size: str = "tiny"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_size(cls, size: str, specs: list[ModalitySpec], **overrides) -> AnySatConfig:
        if size not in SIZES:
            raise ValueError(f"unknown model size '{size}'; sizes: {', '.join(SIZES)}")
        s = {k: v for k, v in SIZES[size].items() if k != "predictor"}
        config = cls(tuple(ModalityConfig.from_spec(sp) for sp in specs),
                     **{**s, "size": size, **overrides})
        if overrides:  # a width or depth given: checked as a saved config is
            _check_config(json.loads(json.dumps(config.to_dict())))  # as config.json holds it
        return config

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> AnySatConfig:
        """A config from its JSON form, checked first (keys, types, sizes), so that a bad or
        hostile config.json fails with what is wrong before any tensor is allocated."""
        _check_config(raw)
        mods = tuple(
            ModalityConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in m.items()})
            for m in raw["modalities"]
        )
        return cls(**{**raw, "modalities": mods})

    def modality(self, name: str) -> ModalityConfig:
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(name)


# Bounds that hold every real configuration with room to spare; a config outside them is
# corrupt or hostile (dim 10^6 would allocate terabytes).
LIMITS = {"dim": (8, 8192), "depth": (1, 64), "heads": (1, 128), "subpatch_depth": (0, 64),
          "temporal_heads": (1, 128), "temporal_key_dim": (1, 1024), "mlp_ratio": (0.25, 16),
          "subpatch_px": (1, 64), "gsd_m": (0.01, 10_000)}
MAX_MODALITIES, MAX_BANDS = 32, 256


def _check_config(raw: object) -> None:
    """Raise ValueError naming the first problem of a config dict (see LIMITS)."""
    import math
    from dataclasses import MISSING, fields

    def number(where: str, value: object, key: str, integer: bool = True) -> None:
        kinds = (int,) if integer else (int, float)
        low, high = LIMITS[key]
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) \
                or not low <= value <= high:
            raise ValueError(f"{where} is {value!r}: expected {'an integer' if integer else 'a number'} "
                             f"from {low:g} to {high:g}")

    def keys(where: str, given: dict, cls: type) -> None:
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        if unknown := sorted(set(given) - known):
            raise ValueError(f"{where} has unknown keys {unknown} (known: {sorted(known)})")
        if missing := sorted(required - set(given)):
            raise ValueError(f"{where} lacks keys {missing}")

    if not isinstance(raw, dict):
        raise ValueError(f"config is a {type(raw).__name__}, not an object")
    keys("config", raw, AnySatConfig)
    for key in ("dim", "depth", "heads", "subpatch_depth", "temporal_heads", "temporal_key_dim"):
        if key in raw:
            number(f"config {key}", raw[key], key)
    if "mlp_ratio" in raw:
        number("config mlp_ratio", raw["mlp_ratio"], "mlp_ratio", integer=False)
    for heads, default in (("heads", 4), ("temporal_heads", 16)):  # each head a share of dim
        if raw.get("dim", 256) % raw.get(heads, default):
            raise ValueError(f"config dim {raw.get('dim', 256)} is not a multiple of {heads} "
                             f"{raw.get(heads, default)}")
    if raw.get("size", "tiny") not in SIZES:
        raise ValueError(f"config size {raw.get('size')!r} is not one of {list(SIZES)}")
    if not isinstance(raw.get("extra", {}), dict):
        raise ValueError("config extra is not an object")
    modalities = raw["modalities"]
    if not isinstance(modalities, list) or not 1 <= len(modalities) <= MAX_MODALITIES:
        raise ValueError(f"config modalities: expected a list of 1 to {MAX_MODALITIES} sensors")
    for i, m in enumerate(modalities):
        where = f"config modalities[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where} is not an object")
        keys(where, m, ModalityConfig)
        bands = m["bands"]
        if not isinstance(m["name"], str) or not isinstance(bands, list) \
                or not 1 <= len(bands) <= MAX_BANDS or not all(isinstance(b, str) for b in bands):
            raise ValueError(f"{where}: expected a name and a list of 1 to {MAX_BANDS} band names")
        for stat in ("mean", "std"):
            values = m[stat]
            if not isinstance(values, list) or len(values) != len(bands) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    for v in values):
                raise ValueError(f"{where} ({m['name']}) {stat}: expected {len(bands)} finite numbers")
        if any(v <= 0 for v in m["std"]):
            raise ValueError(f"{where} ({m['name']}) std: every value must be positive")
        number(f"{where} ({m['name']}) gsd_m", m["gsd_m"], "gsd_m", integer=False)
        number(f"{where} ({m['name']}) subpatch_px", m.get("subpatch_px", 1), "subpatch_px")
        if not isinstance(m["time_series"], bool):
            raise ValueError(f"{where} ({m['name']}) time_series: expected true or false")
