"""Many objects in one call, on the S3 server on loopback: a continental run's lookups and
its STAC Items (a zone's ~1,000 blocks) go out at once, not one round trip after another."""

import os
import subprocess
import sys

import pytest

from anysat import storage
from tests.conftest import slow_s3_server

pytestmark = pytest.mark.integration


@pytest.fixture
def slow_puts(s3_endpoint):
    """PUTs under `many/` answered after 100 ms (`slow_s3_server`)."""
    yield from slow_s3_server("PUT", r"/many/")


def test_many_objects_are_written_whole_at_once(slow_puts, tmp_path):
    endpoint, slow = slow_puts
    objects = {f"s3://anysat/many/{i}.json": f'{{"block": {i}}}'.encode() for i in range(24)}
    # written by another process, whose S3 client points at the slow server
    code = f"from anysat import storage; storage.write_many({objects!r})"
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "AWS_ENDPOINT_URL": endpoint},
                   capture_output=True, text=True, check=True)
    assert storage.read_many(list(objects)) == list(objects.values())
    assert slow.most > 1, slow.most   # in turn, one PUT would be held at a time
    local = {str(tmp_path / "items" / f"{i}.json"): bytes([65 + i]) * (i + 1) for i in range(3)}
    storage.write_many(local)
    assert storage.read_many(list(local)) == list(local.values())
    assert not [p for p in (tmp_path / "items").iterdir() if p.suffix != ".json"]  # no temporary left
