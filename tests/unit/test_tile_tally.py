"""What a run sums of its tiles' results, as they come (`pipeline.TileTally`)."""

from types import SimpleNamespace

from anysat.pipeline import TileTally, embedded


def test_a_tally_counts_tiles_embedded_now_apart_from_those_done_before_and_failed():
    tally = TileTally()
    tally.add([{"tile": "32631_1_2", "valid_patches": 3, "area_km2": 0.36},
               {"tile": "32631_1_3", "valid_patches": 0, "area_km2": 0.36},
               {"tile": "32631_1_4", "valid_patches": 5, "area_km2": 0.36, "skipped": True}])
    tally.add([{"tile": "32632_7_8", "failed": "tile 32632_7_8: no pixels", "area_km2": 0.36},
               {"tile": "32632_7_9", "valid_patches": 4, "area_km2": 0.36}])
    assert (tally.ended, round(tally.area_km2, 2)) == (5, 1.8)
    assert dict(tally.done) == {32631: 3, 32632: 1} and dict(tally.with_data) == {32631: 2, 32632: 1}
    assert dict(tally.patches) == {32631: 8, 32632: 4}
    assert [r["tile"] for r in tally.failed] == ["32632_7_8"]
    assert (tally.embedded, round(tally.embedded_km2, 2)) == (3, 1.08)  # not the skipped tile
    plan = SimpleNamespace(tiles=[None] * 6, area_km2=2.16)
    assert tally.progress(plan) == "5/6 tiles (1 failed), 1.80/2.16 km2"
    assert embedded(tally, 2.0) == {"tiles": 3, "area_km2": 1.08, "seconds": 2.0, "km2_per_s": 0.54}
