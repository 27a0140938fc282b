"""A zone's tiles grouped by search block (`plan._members`)."""

import numpy as np
from shapely.geometry import box

from anysat.plan import _members, _zone_blocks
from anysat.tiles import plan_zones


def test_each_blocks_tiles_in_order_of_first_appearance():
    zone, = plan_zones(box(4.9, 50.4, 5.6, 50.9), 600.0)   # 7,820 tiles, 42 blocks
    blocks = _zone_blocks(zone)
    members = _members(blocks)
    expected = {b: np.flatnonzero(blocks == b) for b in dict.fromkeys(blocks)}
    assert list(members) == list(expected) and len(members) > 4
    assert all(np.array_equal(members[b], expected[b]) for b in expected)
