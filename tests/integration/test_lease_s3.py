"""The output lease on S3 (a real S3-compatible server on loopback): exclusive creation."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_exclusive_create_on_s3(s3_endpoint):
    """S3's conditional PUT: the second creator of the same lease object is told so."""
    from anysat import storage

    uri = "s3://anysat/lease-test/lease.json"
    assert storage.create_exclusive(uri, b"one") is True
    assert storage.create_exclusive(uri, b"two") is False
    assert storage.read_bytes(uri) == b"one"
    storage.remove(uri)


def test_s3_refuses_a_conditional_put_over_an_existing_object(s3_endpoint):
    """What `create_exclusive` relies on when two runs pass its existence check at once."""
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.pipe_file("anysat/lease-test/race.json", b"one", mode="create")
    with pytest.raises(OSError):
        fs.pipe_file("anysat/lease-test/race.json", b"two", mode="create")
    assert fs.cat_file("anysat/lease-test/race.json") == b"one"
