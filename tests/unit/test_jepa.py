import dataclasses
import datetime as dt
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from anysat.modalities import resolve_sensors
from anysat.model import AnySat, AnySatConfig, load_model
from anysat.model.layers import sync_free
from anysat.cube.batch import load_tile_batch
from anysat.stac import resolve_provider
from anysat.tiles import Tile
from anysat.train import (JEPA, JEPAConfig, MultiBlockMasks, effective_rank,
                          ema_momentum, rankme)
from anysat.train.jepa import milnce, normalise_targets
from anysat.train.masks import context_validity
from anysat.train.chips import write_chip, write_index
from anysat.train.pretrain import ChipSampler, learning_rate
from anysat.train.state import load_latest
from anysat.train.trainer import TrainConfig, train
from tests.conftest import CENTRAL_TILE

SPECS = resolve_sensors(["s2", "s1", "dem"])


def small_model(seed: int = 0) -> AnySat:
    """tiny's layout at 64-d: fast enough for hundreds of CPU steps in a test."""
    config = dataclasses.replace(AnySatConfig.from_size("tiny", SPECS), dim=64, heads=4)
    torch.manual_seed(seed)
    return AnySat(config)


@pytest.fixture(scope="module")
def sampler():
    footprint, _ = load_tile_batch(resolve_provider("demo"), SPECS, Tile(*CENTRAL_TILE),
                                   dt.date(2020, 11, 1), dt.date(2021, 10, 31))
    return ChipSampler(footprint, {s.name: s.gsd_m for s in SPECS}, chip_m=120, step_m=30)


def test_context_never_sees_masked_patches(sampler):
    """Gradients of the JEPA loss reach the input pixels of context patches only."""
    jepa = JEPA(small_model(), JEPAConfig(date_drop=0.0, modality_drop=0.0))
    batch = sampler.sample(2)
    batch["sentinel-2-l2a"] = batch["sentinel-2-l2a"].clone().requires_grad_(True)
    context, targets = MultiBlockMasks()(2, 4, torch.Generator().manual_seed(7))
    jepa(batch, 30, torch.Generator().manual_seed(7), (context, targets))["loss"].backward()
    grad = batch["sentinel-2-l2a"].grad.abs().sum(dim=(1, 2))               # [B, 12, 12] px
    per_patch = grad.view(2, 4, 3, 4, 3).sum(dim=(2, 4)).view(2, 16)        # 30 m = 3 px
    rows = torch.arange(2)[:, None]
    assert (per_patch[rows, targets] == 0).all()
    assert (per_patch[rows, context] > 0).all()


def test_target_encoder_gets_no_gradient_and_ema_is_exact(sampler):
    jepa = JEPA(small_model())
    out = jepa(sampler.sample(2), 30, torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in jepa.target.parameters())
    assert all(p.grad is not None for p in jepa.predictor.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in jepa.encoder.parameters())
    with torch.no_grad():
        for p in jepa.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in jepa.target.parameters()]
    jepa.update_target(0.9)
    for old, new, online in zip(before, jepa.target.parameters(), jepa.encoder.parameters()):
        torch.testing.assert_close(new, 0.9 * old + (1 - 0.9) * online, rtol=1e-6, atol=1e-6)
    assert ema_momentum(0, 100) == 0.996 and ema_momentum(100, 100) == 1.0
    assert ema_momentum(50, 100) == pytest.approx(0.998)


def test_multiblock_masks_are_blocks_disjoint_and_rectangular():
    masks = MultiBlockMasks()
    context, targets = masks(16, 8, torch.Generator().manual_seed(1))
    assert context.shape[0] == targets.shape[0] == 16
    assert context.shape[1] >= 1 and targets.shape[1] >= 1
    for c, t in zip(context, targets):
        assert not set(c.tolist()) & set(t.tolist())                # targets never in context
        assert c.tolist() == sorted(c.tolist()) and len(set(c.tolist())) == len(c)
    # one sample's targets: a union of rectangles of 15-20 % of the grid each
    _, one = masks.sample_one(8, torch.Generator().manual_seed(3))
    grid = torch.zeros(64, dtype=torch.bool)
    grid[one] = True
    rows, cols = grid.view(8, 8).nonzero().unbind(1)
    assert 0.15 * 64 * 0.5 <= len(one) <= 4 * 0.2 * 64 * 1.5
    assert len(set(rows.tolist())) < len(one) or len(set(cols.tolist())) < len(one)  # not scattered
    # a 2 x 2 grid still gets a context and a target
    small_c, small_t = masks(4, 2, torch.Generator().manual_seed(0))
    assert small_c.shape[1] >= 1 and small_t.shape[1] >= 1


def test_batch_target_normalisation_leaves_no_constant_to_predict():
    z = torch.randn(4, 16, 32) * 0.01 + torch.randn(32)             # a large shared constant
    layer = normalise_targets(z, "layer")
    batch = normalise_targets(z, "batch")
    spread = lambda t: float(t.reshape(-1, 32).std(dim=0).mean())   # noqa: E731
    assert spread(layer) < 0.1 < 0.9 < spread(batch)                # per LN alone: near-constant
    torch.testing.assert_close(batch.mean(-1), torch.zeros(4, 16), atol=1e-5, rtol=0)


def test_learning_rate_warms_up_then_decays():
    lrs = [learning_rate(s, 100, 1e-3, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 1e-5


def test_context_batch_hides_dates_and_sensors_through_masks(sampler):
    jepa = JEPA(small_model(), JEPAConfig(date_drop=0.5, modality_drop=0.9))
    batch = sampler.sample(4)
    layout = jepa.encoder.check_batch(batch, 30)
    seen = jepa.context_batch(batch, layout, torch.Generator().manual_seed(0))
    for name in layout.sensors:
        valid = AnySat._valid(batch, name)
        assert not (seen[f"{name}_mask"] & ~valid).any()        # never more than the data
        assert seen[name] is batch[name]                         # values untouched
    kept = torch.stack([seen[f"{n}_mask"].flatten(1).any(1) for n in layout.sensors], 1)
    assert kept.any(dim=1).all()                                 # every sample keeps a sensor
    s2 = seen["sentinel-2-l2a_mask"]
    assert s2.sum() < AnySat._valid(batch, "sentinel-2-l2a").sum()


# Floors the collapse monitors of the test run must stay above (patch embeddings of the
# trainer's fixed probe batch, 64-d model). A collapsed run (the old random 50 % masks without
# target normalisation) ended at std 0.0004 and RankMe 1.1.
FLOORS = {"std": 0.005, "rankme": 3.0, "effective_rank": 4.0}


def test_pretraining_learns_without_collapse(sampler, tmp_path):
    """The training loop (`trainer.train`, one process) on the central demo tile as a chip."""
    store = str(tmp_path / "chips.zarr")
    write_index(store, [write_chip(store, Tile(*CENTRAL_TILE), sampler.footprint, SPECS)])
    cfg = TrainConfig(chips=[store], out=str(tmp_path / "run"), dim=64, steps=150, batch_size=4,
                      lr=3e-4, crop_sizes_m=(120.0,), patch_sizes_m=(30.0, 60.0), sensor_drop=0.0,
                      log_every=10, monitor_every=50, checkpoint_every=150)
    train(cfg)
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = sum(h["loss"] for h in history[:2]) / 2
    last = sum(h["loss"] for h in history[-2:]) / 2
    assert last < 0.9 * first, (first, last)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    monitored = [h for h in history if "probe_rankme" in h]
    assert [h["step"] for h in monitored] == [10, 50, 100, 150]
    print({name: [round(h[f"probe_{name}"], 4) for h in monitored] for name in FLOORS})
    for name, floor in FLOORS.items():   # above the floor, and never below half the start
        values = [h[f"probe_{name}"] for h in monitored]
        assert min(values) > max(floor, 0.5 * values[0]), (name, values)
    loaded = load_model(str(tmp_path / "run" / "model"))
    final = load_latest(str(tmp_path / "run"))["target"]
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in final.items())


def test_monitors_flag_a_collapsed_representation():
    collapsed = torch.randn(1, 64).expand(256, 64) + 1e-4 * torch.randn(256, 64)
    spread = torch.randn(256, 64)
    assert rankme(collapsed) < 1.1 < FLOORS["rankme"] < rankme(spread)
    one_direction = torch.randn(256, 1) * torch.randn(1, 64) + 1e-3 * torch.randn(256, 64)
    assert effective_rank(one_direction) < 1.1 < FLOORS["effective_rank"] < effective_rank(spread)


def test_milnce_option(sampler):
    jepa = JEPA(small_model(), JEPAConfig(milnce_weight=0.5, modality_drop=0.0,
                                          decorrelation_weight=0.0))
    out = jepa(sampler.sample(2), 30, torch.Generator().manual_seed(0))
    assert torch.isfinite(out["milnce"]) and out["milnce"] > 0
    torch.testing.assert_close(out["loss"], out["jepa"] + 0.5 * out["milnce"])
    # same token in every sensor: positives beat negatives -> lower loss than unrelated tokens
    base = torch.randn(1, 1, 16, 32)
    valid = torch.ones(1, 2, 16, dtype=torch.bool)
    aligned = milnce(base.expand(1, 2, 16, 32), valid, 0.1)
    unrelated = milnce(torch.randn(1, 2, 16, 32), valid, 0.1)
    assert aligned < unrelated


def test_rankme_tells_collapse_from_spread():
    assert rankme(torch.ones(64, 16)) == pytest.approx(1.0, abs=0.01)
    assert rankme(torch.randn(256, 16)) > 12
    assert effective_rank(torch.randn(4096, 16)) > 14


def test_decorrelation_tells_independent_from_collapsed_features():
    from anysat.train.jepa import decorrelation

    independent = torch.randn(512, 32)
    collapsed = torch.randn(512, 1) * torch.randn(1, 32) + 0.01 * torch.randn(512, 32)
    assert decorrelation(independent) < 0.01 < 0.9 < decorrelation(collapsed)


class _HostSyncs(TorchDispatchMode):
    """Counts the ops that make the host wait for the device's result."""
    SYNCS = ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.masked_select")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += str(func).startswith(self.SYNCS)
        return func(*args, **(kwargs or {}))


def test_the_accelerator_path_makes_no_host_sync_and_gives_the_same_step(sampler):
    """On a GPU each branch on tensor values (`if mask.all()`, `nonzero`, `int(buffer)`) stops
    the host queueing kernels until the device catches up; a training step there takes the
    paths that need none. Taken on the CPU (`sync_free`), two steps make no host sync and give
    the same losses, gradients and target statistics (clouds and hidden dates included)."""
    batch = sampler.sample(4)
    masks = MultiBlockMasks()(4, 4, torch.Generator().manual_seed(3))
    series = {s.name: s.time_series for s in SPECS}
    # what the context sees is drawn in the loader, as the trainer's stream does
    seen = [context_validity(batch, series, 0.7, 0.7, torch.Generator().manual_seed(i)) for i in range(2)]

    def two_steps():
        jepa = JEPA(small_model())
        counter = _HostSyncs()
        with counter:
            losses = [jepa(batch, 30, None, masks, seen[i], monitors=False)["loss"] for i in range(2)]
            sum(losses).backward()
        grads = [p.grad for p in jepa.encoder.parameters() if p.grad is not None]
        return counter.count, torch.stack(losses), grads, jepa.target.patch_mean.clone()

    syncs, losses, grads, statistics = two_steps()
    with sync_free():
        free_syncs, free_losses, free_grads, free_statistics = two_steps()
    assert syncs > 10 and free_syncs == 0
    torch.testing.assert_close(free_losses, losses, rtol=1e-5, atol=1e-6)
    assert len(free_grads) == len(grads)
    for a, b in zip(free_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(free_statistics, statistics)
    # inference (dense output, cloudy dates) too
    model = small_model().eval()
    with torch.no_grad():
        dense = model(batch, 30, output="dense")
        with sync_free():
            torch.testing.assert_close(model(batch, 30, output="dense"), dense, rtol=1e-5, atol=1e-5)
