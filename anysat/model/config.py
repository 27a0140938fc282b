"""Model configuration: sizes and the modalities a model was built for (from their specs)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..modalities import ModalitySpec

# (dim, depth, heads) as in the official AnySat configs.
SIZES = {"tiny": (256, 2, 4), "small": (512, 4, 8), "base": (768, 6, 12)}


@dataclass(frozen=True)
class ModalityConfig:
    """What the model knows of a sensor: bands, GSD, time series or not, input statistics."""

    name: str
    bands: tuple[str, ...]
    gsd_m: float
    time_series: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_spec(cls, spec: ModalitySpec) -> ModalityConfig:
        return cls(spec.name, tuple(spec.band_names), float(spec.gsd_m), spec.time_series,
                   tuple(b.mean for b in spec.bands), tuple(b.std for b in spec.bands))


@dataclass(frozen=True)
class AnySatConfig:
    modalities: tuple[ModalityConfig, ...]
    dim: int = 256
    depth: int = 2
    heads: int = 4
    subpatch_depth: int = 1
    temporal_heads: int = 4
    mlp_ratio: float = 4.0
    size: str = "tiny"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_size(cls, size: str, specs: list[ModalitySpec]) -> AnySatConfig:
        if size not in SIZES:
            raise ValueError(f"unknown model size '{size}'; sizes: {', '.join(SIZES)}")
        dim, depth, heads = SIZES[size]
        return cls(tuple(ModalityConfig.from_spec(s) for s in specs), dim, depth, heads, size=size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> AnySatConfig:
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
