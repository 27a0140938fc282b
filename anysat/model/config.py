"""Model configuration: sizes and the modalities a model was built for (from their specs)."""

from __future__ import annotations

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
        return cls(tuple(ModalityConfig.from_spec(sp) for sp in specs),
                   **{**s, "size": size, **overrides})

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
