"""Streaming training batches from chip stores (local or object storage) for DDP pretraining.

`ChipStream` is an `IterableDataset` of ready batches (use `DataLoader(batch_size=None)`).

- **Shares.** Each epoch the chips of all stores are permuted (seeded by the epoch); rank r
  of R takes every R-th chip, so ranks read disjoint chips. A bounded shuffle buffer of chip
  ids gives them out at random within the epoch. Batch g of a rank is drawn from the buffer
  with its own generator (seed, rank, g), and DataLoader worker w of W builds the batches
  g = w, w + W, ...: workers read disjoint chips, and batch g is the same whatever W is.
  The shape of batch g (crop size, patch size, sensor subset) is drawn from a generator
  (seed, g) that every rank shares: DDP ranks wait for the slowest at each step, and with
  shapes drawn per rank a step cost the largest of the ranks' draws.
- **Resume.** Batch contents are a function of (seed, rank, g) and the chip ids: starting at
  batch g replays the id buffer (no pixels read) up to g.
- **Per batch**, as AnySat pretraining: one crop size (among `crop_sizes_m` that fit every
  chip of the batch), one patch size (among those that split the crop into 2 x 2 patches or
  more and hold some sensor), a sensor subset (each sensor dropped from the batch with chance
  `sensor_drop`, one kept), then the JEPA masks (context/target patch indices) and the
  context's date/sensor drops, made here as in I-JEPA's collator: the model only gathers.
  Time series of different lengths are padded with masked dates; a chip without a sensor
  of the batch has it all masked. Memory holds one batch of chips per worker.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .. import storage
from ..batch import pad_stack
from ..model.config import ModalityConfig
from ..sizes import common_step_m, is_multiple
from .chips import ChipStoreError, list_chips, read_chips, read_index
from .masks import MultiBlockMasks, context_validity

log = logging.getLogger("anysat")


@dataclass(frozen=True)
class StreamConfig:
    batch_size: int = 8
    crop_sizes_m: tuple[float, ...] = (60.0, 120.0)
    patch_sizes_m: tuple[float, ...] = (10.0, 20.0, 30.0, 60.0)
    shuffle_buffer: int = 256
    sensor_drop: float = 0.2
    date_drop: float = 0.7          # the context's, as JEPAConfig
    modality_drop: float = 0.7
    masks: MultiBlockMasks = field(default_factory=MultiBlockMasks)
    seed: int = 0


def _generator(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def _pick(options: list[float], generator: torch.Generator) -> float:
    """One of the options, from one uniform draw: ranks sharing the generator and the options
    pick the same one; a rank with other options (other chips) still picks a valid one."""
    return options[min(len(options) - 1, int(float(torch.rand(1, generator=generator)) * len(options)))]


def chip_table(stores: list[str], modalities: dict[str, ModalityConfig]) -> pd.DataFrame:
    """The index rows of every complete chip of the stores, checked against the model: one
    clear error for an empty store, a sensor no chip has, or a chip whose shapes disagree."""
    return check_chip_table(read_chip_indexes(stores), modalities)


def read_chip_indexes(stores: list[str]) -> pd.DataFrame:
    """The index rows of every complete chip of the stores (column `store` added); an error
    naming a store without complete chips."""
    tables = []
    for store in stores:
        store = storage.normalize_uri(store)
        index = read_index(store)
        if not len(index):
            hint = ("it has chips but no index.parquet: rerun `anysat ingest` or "
                    "anysat.train.chips.rebuild_index" if list_chips(store)
                    else "run `anysat ingest` to fill it")
            raise ChipStoreError(f"chip store {store} has no complete chips ({hint})")
        tables.append(index.assign(store=store))
    return pd.concat(tables, ignore_index=True)


def sensors_in(table: pd.DataFrame) -> set[str]:
    """Every sensor some chip of the table holds."""
    return {name for shapes in table.shapes for name in json.loads(shapes)}


def check_chip_table(table: pd.DataFrame, modalities: dict[str, ModalityConfig]) -> pd.DataFrame:
    """The table, if every chip suits the model (see `chip_table`)."""
    stores = list(dict.fromkeys(table.store))
    present: set[str] = set()
    for row in table.itertuples():
        shapes = json.loads(row.shapes)
        usable = [n for n in shapes if n in modalities]
        if not usable:
            raise ChipStoreError(f"chip {row.id} in {row.store} has sensors {list(shapes)}, none "
                                 f"of the model's {list(modalities)}")
        present.update(usable)
        for name in usable:
            t, c, h, w = shapes[name]
            spec = modalities[name]
            if c != len(spec.bands):
                raise ChipStoreError(f"chip {row.id} in {row.store}: {name} has {c} bands, the "
                                     f"model takes {len(spec.bands)} ({', '.join(spec.bands)})")
            if not (math.isclose(h * spec.gsd_m, row.size_m) and math.isclose(w * spec.gsd_m, row.size_m)):
                raise ChipStoreError(
                    f"chip {row.id} in {row.store}: {name} is {h} x {w} px at {spec.gsd_m:g} m, "
                    f"not the chip's {row.size_m:g} m footprint (shapes disagree: {shapes})")
    missing = [n for n in modalities if n not in present]
    if missing:
        raise ChipStoreError(f"no chip in {stores} has sensor(s) {missing} the model is built "
                             f"for; ingest them, or train a model without them (--sensors)")
    return table


class ChipStream(IterableDataset):
    """Endless training batches for one DDP rank (see the module docstring)."""

    def __init__(self, table: pd.DataFrame, modalities: dict[str, ModalityConfig],
                 config: StreamConfig, rank: int = 0, world: int = 1, start: int = 0):
        if len(table) < world:
            raise ChipStoreError(f"{len(table)} chips cannot feed {world} ranks: ingest more "
                                 "chips or train with fewer processes")
        self.table = table.reset_index(drop=True)
        # as lists: a batch looks up each of its chips' rows (pandas: 2 us a cell)
        self._ids, self._stores = list(self.table.id), list(self.table.store)
        self._sizes = [float(v) for v in self.table.size_m]
        self.modalities = modalities
        self.config = config
        self.rank, self.world, self.start = rank, world, start
        for size in sorted(set(self.table.size_m)):
            if not self._crop_sizes(size, list(modalities)):
                raise ChipStoreError(f"no crop size of {list(config.crop_sizes_m)} m fits chips of "
                                     f"{size:g} m with a patch size of {list(config.patch_sizes_m)}")

    # -- which chips -----------------------------------------------------------------------------
    def _epoch_ids(self, epoch: int) -> list[int]:
        """This rank's chips (table rows) in an epoch, in a seeded random order."""
        order = torch.randperm(len(self.table), generator=_generator(self.config.seed, 1, epoch))
        return order[self.rank::self.world].tolist()

    def plans(self) -> Iterator[tuple[int, list[int], torch.Generator]]:
        """(g, chip rows, generator) for batch g = 0, 1, ... of this rank; only ids, no pixels.
        The buffer takes the epoch's chips in order and gives them out at random; it empties
        before the next epoch begins, so each epoch every chip of the rank's share is drawn
        exactly once and never by another rank."""
        epoch, pending, buffer = 0, iter(self._epoch_ids(0)), []
        capacity = max(1, self.config.shuffle_buffer)
        for g in itertools.count():
            generator = _generator(self.config.seed, 2, self.rank, g)
            rows = []
            for _ in range(self.config.batch_size):
                buffer.extend(itertools.islice(pending, capacity - len(buffer)))
                if not buffer:  # the epoch is spent: the next one
                    epoch += 1
                    pending = iter(self._epoch_ids(epoch))
                    buffer.extend(itertools.islice(pending, capacity))
                slot = int(torch.randint(len(buffer), (1,), generator=generator))
                buffer[slot], buffer[-1] = buffer[-1], buffer[slot]
                rows.append(buffer.pop())
            yield g, rows, generator

    def probe(self, samples: int = 16) -> dict:
        """A fixed batch (the same for a seed, whatever the rank): what collapse monitors
        follow during a run. Random crops of the largest crop size from up to `samples`
        chips, every sensor, at the smallest patch size that holds them all."""
        order = torch.randperm(len(self.table), generator=_generator(self.config.seed, 3)).tolist()
        rows = [order[i % len(order)] for i in range(samples)]
        names = list(self.modalities)
        crop = max(self._crop_sizes(min(self._sizes[r] for r in rows), names))
        patches = self._patch_sizes(crop, names)
        whole = [p for p in patches if all(is_multiple(p, self.modalities[n].subpatch_m) for n in names)]
        config = dataclasses.replace(self.config, batch_size=samples, crop_sizes_m=(crop,),
                                     patch_sizes_m=(min(whole or patches),), sensor_drop=0.0)
        stream = ChipStream(self.table, self.modalities, config)
        return stream.make_batch(-1, rows, _generator(self.config.seed, 4))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for g, rows, generator in self.plans():
            if g >= self.start and (g - self.start) % workers == worker:
                yield self.make_batch(g, rows, generator, _generator(self.config.seed, 5, g))

    # -- one batch -------------------------------------------------------------------------------
    def _crop_sizes(self, side_m: float, sensors: list[str]) -> list[float]:
        step = common_step_m([self.modalities[n].gsd_m for n in sensors])
        return [c for c in self.config.crop_sizes_m if c <= side_m + 1e-6 and is_multiple(c, step)
                and self._patch_sizes(c, sensors)]

    def _patch_sizes(self, crop_m: float, sensors: list[str]) -> list[float]:
        return [p for p in self.config.patch_sizes_m if crop_m / p >= 2 and is_multiple(crop_m, p)
                and any(is_multiple(p, self.modalities[n].subpatch_m) for n in sensors)]

    def make_batch(self, g: int, rows: list[int], generator: torch.Generator,
                   shapes: torch.Generator | None = None) -> dict:
        """Batch g of these chip rows: crops, masks and drops from `generator`; crop size,
        patch size and sensor subset from `shapes` (default: `generator`)."""
        cfg = self.config
        shapes = shapes or generator
        chips = self._read(rows)
        names = [n for n in self.modalities if any(n in chip for _, chip in chips)]
        side = min(self._sizes[r] for r in rows)
        crops = self._crop_sizes(side, names)
        crop = _pick(crops, shapes)
        patches = self._patch_sizes(crop, names)
        patch = _pick(patches, shapes)
        names = [n for n in names if is_multiple(patch, self.modalities[n].subpatch_m)]
        names = self._sensor_subset(names, chips, shapes)
        step = common_step_m([self.modalities[n].gsd_m for n in names])
        batch: dict[str, list[torch.Tensor]] = {}
        for r, (_, chip) in zip(rows, chips):
            positions = int(round((self._sizes[r] - crop) / step)) + 1
            oy, ox = (torch.randint(positions, (2,), generator=generator) * step).tolist()
            for name in names:
                self._crop(batch, chip, name, oy, ox, crop)
        out = {k: pad_stack(k, v) for k, v in batch.items()}
        grid = round(crop / patch)
        context, targets = cfg.masks(len(rows), grid, generator)
        series = {n: self.modalities[n].time_series for n in names}
        context_valid = context_validity(out, series, cfg.date_drop, cfg.modality_drop, generator)
        return {"batch": out, "patch_size_m": patch, "masks": (context, targets),
                "context_valid": context_valid, "chips": [c for c, _ in chips], "index": g}

    def _read(self, rows: list[int]) -> list[tuple[str, dict]]:
        """(id, chip) of each row, each store's chips fetched in one call (`read_chips`)."""
        by_store: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            by_store.setdefault(self._stores[r], []).append(i)
        chips: list = [None] * len(rows)
        for store, places in by_store.items():
            ids = [self._ids[rows[i]] for i in places]
            for i, chip_id, chip in zip(places, ids, read_chips(store, ids)):
                chips[i] = (chip_id, chip)
        return chips

    def _sensor_subset(self, names: list[str], chips: list, generator: torch.Generator) -> list[str]:
        """Each sensor dropped with chance sensor_drop; every sample keeps a sensor it has.
        One draw per sensor of the model, so ranks sharing the generator drop the same ones."""
        draws = dict(zip(self.modalities, torch.rand(len(self.modalities), generator=generator).tolist()))
        keep = [n for n in names if draws[n] >= self.config.sensor_drop]
        if keep and all(any(n in chip for n in keep) for _, chip in chips):
            return keep
        return names

    def _crop(self, batch: dict, chip: dict, name: str, oy: float, ox: float, crop: float) -> None:
        gsd = self.modalities[name].gsd_m
        y, x, px = round(oy / gsd), round(ox / gsd), round(crop / gsd)
        if name in chip:
            pixels = chip[name][0, :, :, y:y + px, x:x + px]
            mask = chip[f"{name}_mask"][0, :, y:y + px, x:x + px]
            dates = chip[f"{name}_dates"][0]
        else:  # the chip lacks this sensor: one masked date
            pixels = torch.zeros(1, len(self.modalities[name].bands), px, px)
            mask = torch.zeros(1, px, px, dtype=torch.bool)
            dates = torch.zeros(1)
        batch.setdefault(name, []).append(torch.nan_to_num(pixels))
        batch.setdefault(f"{name}_mask", []).append(mask)
        batch.setdefault(f"{name}_dates", []).append(dates)
