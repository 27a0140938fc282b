"""A zone's tiles grouped by search block (`plan._members`) and by task (`RunPlan.task_batches`)."""

import numpy as np
import pandas as pd
from shapely.geometry import box

from anysat.plan import RunPlan, _members, _zone_blocks
from anysat.tiles import Tile, plan_zones


def test_each_blocks_tiles_in_order_of_first_appearance():
    zone, = plan_zones(box(4.9, 50.4, 5.6, 50.9), 600.0)   # 7,820 tiles, 42 blocks
    blocks = _zone_blocks(zone)
    members = _members(blocks)
    expected = {b: np.flatnonzero(blocks == b) for b in dict.fromkeys(blocks)}
    assert list(members) == list(expected) and len(members) > 4
    assert all(np.array_equal(members[b], expected[b]) for b in expected)


def test_task_batches_take_whole_reading_squares():
    """A square split between two tasks is read whole by each (its box is fixed by the
    plan): 3x the read time of the 64-tile demo square in tasks of 16."""
    zone, = plan_zones(box(4.9, 50.4, 5.3, 50.7), 600.0)
    ids = [f"{zone.epsg}_600m_{c}_{r}" for c, r in zip(zone.cols, zone.rows)]
    tiles = pd.DataFrame({"epsg": zone.epsg, "col": zone.cols, "row": zone.rows,
                          "block": _zone_blocks(zone)}, index=ids)
    plan = RunPlan(uri="", request=None, fingerprint={}, hash="", zones=(), tiles=tiles,
                   sensors=(), read_side=8)
    order = plan.in_reading_order(ids)
    squares = [{t.id for t in group} for group, _ in
               plan.reading_blocks([Tile(zone.epsg, c, r, 600.0) for c, r in
                                    plan.tiles.loc[order, ["col", "row"]].to_numpy()])]
    assert len(squares) > 20 and {len(s) for s in squares} > {64}   # partial squares too
    for size in (1, 16, 64, 100, 1000):
        batches = plan.task_batches(ids, size)
        assert sum(batches, []) == order                  # every tile once, in reading order
        held = [{i for i, b in enumerate(batches) if s & set(b)} for s in squares]
        assert all(len(h) == 1 for h in held)             # no square split between tasks
        assert max(map(len, batches)) <= max(size, 64)
        first = {min(s, key=order.index): len(s) for s in squares}   # square by first tile
        # a batch ends only where the next square would take it past the size
        assert all(len(a) + first[b[0]] > size for a, b in zip(batches, batches[1:]))
    assert len(plan.task_batches(ids, 1000)) < len(squares)
