"""Stacking footprints into one batch: padded dates change nothing, B > 1 equals B = 1."""

from __future__ import annotations

import torch

from anysat.batch import stack_samples
from anysat.model import build_model
from anysat.modalities import resolve_sensors


def sample(t: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dates = torch.arange(t, dtype=torch.float32)[None] * 30 + 18600
    return {"sentinel-2-l2a": torch.rand(1, t, 9, 6, 6, generator=g) * 0.3,
            "sentinel-2-l2a_dates": dates, "sentinel-2-l2a_mask": torch.ones(1, t, 6, 6, dtype=torch.bool),
            "sentinel-1": torch.randn(1, t, 2, 6, 6, generator=g) * 2 - 12,
            "sentinel-1_dates": dates, "sentinel-1_mask": torch.rand(1, t, 6, 6, generator=g) > 0.2}


def test_a_stacked_batch_of_different_series_lengths_equals_one_by_one():
    model = build_model("tiny", resolve_sensors(["s2", "s1"]), seed=1, dim=64)
    samples = [sample(3, 0), sample(5, 1), sample(1, 2)]
    batch = stack_samples(samples)
    assert batch["sentinel-2-l2a"].shape == (3, 5, 9, 6, 6)
    assert not batch["sentinel-1_mask"][0, 3:].any() and torch.isfinite(batch["sentinel-1_dates"]).all()
    with torch.inference_mode():
        together = model(batch, 20, "patch")
        alone = torch.cat([model(s, 20, "patch") for s in samples])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_read_errors_name_the_file_but_never_a_signing_token():
    from anysat.cube.batch import describe
    from anysat.redact import without_secrets

    try:
        try:
            raise OSError("https://x.blob.core.windows.net/c/B02.tif?st=2026&sig=SECRET: 403")
        except OSError as inner:
            raise RuntimeError("Read failed. See previous exception for details.") from inner
    except RuntimeError as exc:
        text = without_secrets(describe(exc))
    assert "B02.tif" in text and "403" in text and "SECRET" not in text and "sig=" not in text


def test_dates_without_a_valid_pixel_are_left_out_with_the_same_embeddings():
    """The demo's central tile has 2 of its 12 Sentinel-2 dates under cloud everywhere: a run
    leaves them out of the forward (an accelerator computes every pixel-date, masked or not),
    and the tile's embeddings stay the same, on the CPU's paths and the accelerator's."""
    import datetime as dt

    from anysat.batch import without_empty_dates
    from anysat.cube.batch import load_tile_batch
    from anysat.model.layers import sync_free
    from anysat.stac import resolve_provider
    from anysat.tiles import Tile
    from tests.conftest import CENTRAL_TILE

    specs = resolve_sensors(["s2", "s1", "dem"])
    batch, _ = load_tile_batch(resolve_provider("demo"), specs, Tile(*CENTRAL_TILE),
                               dt.date(2020, 11, 1), dt.date(2021, 10, 31))
    batch = dict(batch)
    kept = without_empty_dates(batch)
    seen = batch["sentinel-2-l2a_mask"][0].flatten(1).any(1)
    assert batch["sentinel-2-l2a"].shape[1] == 12 and int(seen.sum()) == 10
    assert kept["sentinel-2-l2a"].shape[1] == kept["sentinel-2-l2a_dates"].shape[1] == 10
    torch.testing.assert_close(kept["sentinel-2-l2a_dates"][0], batch["sentinel-2-l2a_dates"][0, seen])
    torch.testing.assert_close(kept["sentinel-2-l2a"], batch["sentinel-2-l2a"][:, seen], equal_nan=True)
    assert kept["sentinel-1"] is batch["sentinel-1"]  # every date has data: untouched
    model = build_model("tiny", specs, seed=0)
    with torch.inference_mode():
        for output in ("tile", "patch", "dense"):
            torch.testing.assert_close(model(kept, 30, output), model(batch, 30, output),
                                       rtol=1e-5, atol=1e-5)
            with sync_free():
                torch.testing.assert_close(model(kept, 30, output), model(batch, 30, output),
                                           rtol=1e-5, atol=1e-5)
    # a sensor without any valid pixel keeps one date, so that it keeps its shape
    cloudy = without_empty_dates({**batch, "sentinel-2-l2a_mask": torch.zeros_like(batch["sentinel-2-l2a_mask"])})
    assert cloudy["sentinel-2-l2a"].shape == (1, 1, 9, 60, 60)
    # a batch stacked leaving them out, each sample copied once: the same as stacking the
    # samples without them (the second tile loses 3 other dates, so both are padded)
    from anysat.batch import stack_samples

    other = {**batch, "sentinel-2-l2a_mask": batch["sentinel-2-l2a_mask"].clone(),
             "sentinel-1_mask": batch["sentinel-1_mask"].clone()}
    other["sentinel-2-l2a_mask"][:, 4:7] = False
    other["sentinel-1_mask"][:, 0] = False
    stacked = stack_samples([batch, other], without_empty=True)
    expected = stack_samples([without_empty_dates(batch), without_empty_dates(other)])
    assert stacked.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(stacked[key], expected[key], rtol=0, atol=0, equal_nan=True)
    assert stacked["sentinel-2-l2a"].shape[1] == 10 and stacked["sentinel-1_dates"].shape[1] == \
        batch["sentinel-1_dates"].shape[1]
    assert not stacked["sentinel-2-l2a_mask"][1, 7:].any()          # padded dates are masked
    assert (stacked["sentinel-2-l2a_dates"][1, 7:] == stacked["sentinel-2-l2a_dates"][1, 6]).all()
