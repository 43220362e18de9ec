"""Blob bodies over HTTPS go out as slices of a memory map (api/blobfile.py), window by window.

A blob a few windows long, pulled whole and by ranges that start and end on,
just before and just after window and slice boundaries, over the registry's
real TLS: every byte must be the blob's.
"""

from __future__ import annotations

import os

import pytest

from moorage.api.blobfile import SLICE, WINDOW
from oci import new_repo, push_blob, sha256

pytestmark = pytest.mark.spec

SIZE = 2 * WINDOW + 3 * SLICE + 12345


@pytest.fixture(scope="module")
def blob(registry) -> tuple[str, str, bytes]:
    assert registry.tls, "this test is about the HTTPS path"
    data = os.urandom(SIZE)
    repo = new_repo("blobfile")
    with registry.client() as c:
        digest = push_blob(c, repo, data)
    return repo, digest, data


def test_whole_blob_over_tls(registry, blob):
    repo, digest, data = blob
    with registry.client() as c:
        r = c.get(f"/v2/{repo}/blobs/{digest}")
    assert r.status_code == 200
    assert int(r.headers["Content-Length"]) == SIZE
    assert sha256(r.content) == digest


@pytest.mark.parametrize("first,last", [
    (0, 0),
    (WINDOW - 1, WINDOW),                  # across the first window boundary
    (WINDOW, 2 * WINDOW - 1),              # exactly one window
    (SLICE - 7, WINDOW + SLICE + 7),       # starts and ends inside slices
    (2 * WINDOW + 5, SIZE - 1),            # the tail, a partial window
    (12345, SIZE - 1),                     # nearly all of it, from an unaligned offset
])
def test_ranges_across_windows(registry, blob, first, last):
    repo, digest, data = blob
    with registry.client() as c:
        r = c.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": f"bytes={first}-{last}"})
    assert r.status_code == 206
    assert r.headers["Content-Range"] == f"bytes {first}-{last}/{SIZE}"
    assert r.content == data[first:last + 1]
