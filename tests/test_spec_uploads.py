"""OCI Distribution Spec v1.1.1, pushing blobs: upload sessions, chunks, mounts, names.

Mirrors every check of the conformance suite v1.1.1 Push category
(conformance/02_push_test.go: "Blob Upload Streamed", "Blob Upload
Monolithic", "Blob Upload Chunked", "Cross-Repository Blob Mount") and the
error-code check of its Pull category, plus what the spec text requires.
Real HTTP against a real `moorage serve`.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit
from uuid import uuid4

import httpx
import pytest

from conftest import DRIVERS, on_both_drivers

from oci import (
    DUMMY_DIGEST, OCI_MANIFEST, SPEC_ERROR_CODES, assert_oci_error, error_codes, new_repo, push_blob,
    raw_request, sha256, sha512, with_digest,
)

pytestmark = pytest.mark.spec


@pytest.fixture(scope="module", params=DRIVERS)
def registry(request, registry):
    """Every test here runs on both blob drivers (the s3 one on a real SeaweedFS)."""
    return on_both_drivers(request, registry)

OCTET = {"Content-Type": "application/octet-stream"}






def loc_path(location: str) -> str:
    """The path of a Location, absolute or relative (the suite's GetRelativeLocation)."""
    return urlsplit(location).path


def start_upload(client: httpx.Client, repo: str) -> str:
    """POST an upload session; returns its Location."""
    r = client.post(f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
    # "A successful response must return 202 Accepted [and] include a Location header"
    assert r.status_code == 202, (r.status_code, r.text)
    location = r.headers.get("Location")
    assert location, r.headers
    return location


def patch_chunk(client: httpx.Client, location: str, data: bytes, start: int | None) -> httpx.Response:
    headers = dict(OCTET)
    if start is not None:
        headers["Content-Range"] = f"{start}-{start + len(data) - 1}"
    return client.patch(location, content=data, headers=headers)


def assert_chunk_accepted(r: httpx.Response, end: int) -> str:
    """A 202 PATCH response: Location, Range 0-<end>, Docker-Upload-UUID; returns Location."""
    # "The response for each successful chunk upload MUST be 202 Accepted, and
    #  MUST have the following headers: Location: <location> Range: 0-<end-of-range>"
    assert r.status_code == 202, (r.status_code, r.text)
    assert r.headers.get("Location"), r.headers
    assert r.headers.get("Range") == f"0-{end}", r.headers
    uuid = r.headers.get("Docker-Upload-UUID")
    assert uuid, r.headers
    assert uuid in r.headers["Location"], (uuid, r.headers["Location"])
    return r.headers["Location"]


def close_upload(client: httpx.Client, location: str, digest: str, data: bytes = b"",
                 headers: dict | None = None) -> httpx.Response:
    hdrs = dict(OCTET)
    hdrs.update(headers or {})
    return client.put(with_digest(location, digest), content=data, headers=hdrs)


def assert_created(client: httpx.Client, r: httpx.Response, repo: str, data: bytes,
                   digest: str) -> None:
    """A 201 closing an upload: a pullable Location that serves exactly `data`."""
    assert r.status_code == 201, (r.status_code, r.text)
    location = r.headers.get("Location")
    assert location, r.headers
    if "Docker-Content-Digest" in r.headers:
        assert r.headers["Docker-Content-Digest"] == digest
    g = client.get(location)
    assert g.status_code == 200, (location, g.status_code)
    assert g.content == data
    g = client.get(f"/v2/{repo}/blobs/{digest}")
    assert g.status_code == 200
    assert g.content == data


def upload_status(client: httpx.Client, location: str) -> httpx.Response:
    return client.get(location)



def raw_error_codes(body: bytes) -> list[str]:
    doc = json.loads(body)
    assert isinstance(doc.get("errors"), list) and doc["errors"], doc
    return [e["code"] for e in doc["errors"]]


# --------------------------------------------------------------------------- base


def test_api_version_check(client):
    r = client.get("/v2/")
    # "If the response is 200 OK, then the registry implements this
    #  specification." / "the Docker-Distribution-API-Version header SHOULD be
    #  set to registry/2.0"
    assert r.status_code == 200
    assert r.headers.get("Docker-Distribution-API-Version") == "registry/2.0"


# --------------------------------------------------------------------------- monolithic


def test_post_starts_session_in_the_repository(client):
    repo = new_repo()
    location = start_upload(client, repo)
    # conformance: the session Location HavePrefix "/v2/<name>/blobs/uploads/"
    assert loc_path(location).startswith(f"/v2/{repo}/blobs/uploads/")
    # "<location> must contain a UUID identifying a unique upload session"
    other = start_upload(client, repo)
    assert loc_path(other) != loc_path(location)


def test_monolithic_post_then_put(client):
    repo = new_repo()
    data = os.urandom(2000)
    digest = sha256(data)
    location = start_upload(client, repo)
    # conformance: "PUT upload of a blob should yield a 201 Response"
    r = close_upload(client, location, digest, data)
    assert_created(client, r, repo, data, digest)


def test_monolithic_put_of_empty_json_blob(client):
    # conformance Setup: "Upload empty JSON blob needed for further tests"
    repo = new_repo()
    data = b"{}"
    digest = sha256(data)
    assert digest == "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    r = close_upload(client, start_upload(client, repo), digest, data)
    assert_created(client, r, repo, data, digest)


def test_monolithic_put_of_zero_length_blob(client):
    repo = new_repo()
    digest = sha256(b"")
    r = close_upload(client, start_upload(client, repo), digest, b"")
    assert_created(client, r, repo, b"", digest)


def test_single_post_with_digest(client):
    repo = new_repo()
    data = os.urandom(3000)
    digest = sha256(data)
    r = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=data,
                    headers=OCTET)
    # "Successful completion of the request MUST return a 201 Created and MUST
    #  include the following header: Location: <blob-location>"
    assert r.status_code == 201, (r.status_code, r.text)
    assert r.headers["Docker-Content-Digest"] == digest
    assert_created(client, r, repo, data, digest)


def test_single_post_with_wrong_digest_is_400_and_leaves_nothing(client):
    repo = new_repo()
    data = os.urandom(1000)
    claimed = sha256(b"something else")
    r = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": claimed}, content=data,
                    headers=OCTET)
    # DIGEST_INVALID: "provided digest did not match uploaded content"
    assert_oci_error(r, 400, "DIGEST_INVALID")
    assert client.head(f"/v2/{repo}/blobs/{claimed}").status_code == 404
    assert client.head(f"/v2/{repo}/blobs/{sha256(data)}").status_code == 404


@pytest.mark.parametrize("bad", ["sha256:abc", "notadigest", "sha256:" + "Z" * 64])
def test_single_post_with_invalid_digest_is_400(client, bad):
    repo = new_repo()
    r = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": bad}, content=b"data",
                    headers=OCTET)
    assert_oci_error(r, 400, "DIGEST_INVALID")
    assert client.head(f"/v2/{repo}/blobs/{sha256(b'data')}").status_code == 404


def test_put_with_wrong_digest_is_400_and_leaves_nothing(client):
    repo = new_repo()
    data = os.urandom(1000)
    claimed = sha256(data + b"!")
    location = start_upload(client, repo)
    r = close_upload(client, location, claimed, data)
    assert_oci_error(r, 400, "DIGEST_INVALID")
    assert client.head(f"/v2/{repo}/blobs/{claimed}").status_code == 404
    assert client.head(f"/v2/{repo}/blobs/{sha256(data)}").status_code == 404


def test_chunked_put_with_wrong_digest_is_400_and_leaves_nothing(client):
    repo = new_repo()
    data = os.urandom(600)
    location = start_upload(client, repo)
    location = assert_chunk_accepted(patch_chunk(client, location, data[:300], 0), 299)
    location = assert_chunk_accepted(patch_chunk(client, location, data[300:], 300), 599)
    claimed = sha256(data[:300])
    assert_oci_error(close_upload(client, location, claimed), 400, "DIGEST_INVALID")
    assert client.head(f"/v2/{repo}/blobs/{claimed}").status_code == 404
    assert client.head(f"/v2/{repo}/blobs/{sha256(data)}").status_code == 404


@pytest.mark.parametrize("bad", ["sha256:abc", "md5", "sha256:" + "A" * 64])
def test_put_with_invalid_digest_string_is_400(client, bad):
    repo = new_repo()
    r = close_upload(client, start_upload(client, repo), bad, b"payload")
    assert_oci_error(r, 400, "DIGEST_INVALID")


def test_put_without_digest_is_400(client):
    repo = new_repo()
    location = start_upload(client, repo)
    # "The closing PUT request MUST include the <digest> of the whole blob"
    r = client.put(location, content=b"payload", headers=OCTET)
    assert_oci_error(r, 400, "DIGEST_INVALID", "BLOB_UPLOAD_INVALID")
    assert client.head(f"/v2/{repo}/blobs/{sha256(b'payload')}").status_code == 404


# --------------------------------------------------------------------------- streamed


def test_streamed_patch_then_put(client):
    # conformance "Blob Upload Streamed": PATCH with the blob in the body and
    # no Content-Range -> 202; PUT <location>?digest= (no body) -> 201 + Location
    repo = new_repo()
    data = os.urandom(42)
    digest = sha256(data)
    location = start_upload(client, repo)
    r = patch_chunk(client, location, data, None)
    location = assert_chunk_accepted(r, len(data) - 1)
    r = close_upload(client, location, digest)
    assert_created(client, r, repo, data, digest)


def test_streamed_patches_append(client):
    repo = new_repo()
    parts = [os.urandom(n) for n in (100, 1, 4096, 7)]
    data = b"".join(parts)
    location = start_upload(client, repo)
    written = 0
    for part in parts:
        written += len(part)
        location = assert_chunk_accepted(patch_chunk(client, location, part, None), written - 1)
    r = upload_status(client, location)
    assert r.status_code == 204
    assert r.headers["Range"] == f"0-{written - 1}"
    assert_created(client, close_upload(client, location, sha256(data)), repo, data, sha256(data))


def test_streamed_patch_of_a_few_mib(client):
    repo = new_repo()
    data = os.urandom(3 * 1024 * 1024 + 5)
    location = start_upload(client, repo)
    location = assert_chunk_accepted(patch_chunk(client, location, data, None), len(data) - 1)
    digest = sha256(data)
    r = close_upload(client, location, digest)
    assert_created(client, r, repo, data, digest)


# --------------------------------------------------------------------------- chunked


def chunks_42() -> tuple[bytes, bytes, bytes]:
    """conformance setupChunkedBlob(42): chunk 1 is [0, 22), chunk 2 [22, 42)."""
    blob = os.urandom(42)
    return blob, blob[:22], blob[22:]


def test_chunked_upload_patch_patch_put(client):
    repo = new_repo()
    blob, c1, c2 = chunks_42()
    location = start_upload(client, repo)
    location = assert_chunk_accepted(patch_chunk(client, location, c1, 0), 21)
    location = assert_chunk_accepted(patch_chunk(client, location, c2, 22), 41)
    # conformance: "PUT request with digest should return 201" (Content-Length: 0)
    r = close_upload(client, location, sha256(blob), headers={"Content-Length": "0"})
    assert_created(client, r, repo, blob, sha256(blob))


def test_chunked_upload_final_chunk_in_closing_put(client):
    # "The final chunk MAY be uploaded using a PATCH request or it MAY be
    #  uploaded in the closing PUT request."
    repo = new_repo()
    blob, c1, c2 = chunks_42()
    location = start_upload(client, repo)
    location = assert_chunk_accepted(patch_chunk(client, location, c1, 0), 21)
    r = close_upload(client, location, sha256(blob), c2, headers={"Content-Range": "22-41"})
    assert_created(client, r, repo, blob, sha256(blob))


def test_chunked_upload_final_chunk_in_put_without_content_range(client):
    repo = new_repo()
    blob, c1, c2 = chunks_42()
    location = start_upload(client, repo)
    location = assert_chunk_accepted(patch_chunk(client, location, c1, 0), 21)
    r = close_upload(client, location, sha256(blob), c2)
    assert_created(client, r, repo, blob, sha256(blob))


def test_first_chunk_out_of_order_is_416(client):
    # conformance: "Out-of-order blob upload should return 416"
    repo = new_repo()
    _, _, c2 = chunks_42()
    location = start_upload(client, repo)
    r = patch_chunk(client, location, c2, 22)
    # "If a chunk is uploaded out of order, the registry MUST respond with a
    #  416 Requested Range Not Satisfiable code."
    assert r.status_code == 416, (r.status_code, r.text)


def test_conformance_chunked_sequence_with_retry_and_stale_status(client):
    """The exact sequence of the suite's "Blob Upload Chunked" context."""
    repo = new_repo()
    blob, c1, c2 = chunks_42()
    post_location = start_upload(client, repo)
    # "PATCH request with first chunk should return 202" and Range == "0-21"
    r = patch_chunk(client, post_location, c1, 0)
    assert_chunk_accepted(r, 21)
    # "Retry previous blob chunk should return 416" (sent to the POST's Location)
    r = patch_chunk(client, post_location, c1, 0)
    assert r.status_code == 416, (r.status_code, r.text)
    # "Get on stale blob upload should return 204 with a range and location"
    r = upload_status(client, post_location)
    assert r.status_code == 204, (r.status_code, r.text)
    assert r.headers.get("Location")
    assert r.headers.get("Range") == "0-21"
    # "PATCH request with second chunk should return 202" with Range 0-41
    r = patch_chunk(client, r.headers["Location"], c2, 22)
    location = assert_chunk_accepted(r, 41)
    # "PUT request with digest should return 201"
    r = close_upload(client, location, sha256(blob), headers={"Content-Length": "0"})
    assert_created(client, r, repo, blob, sha256(blob))


@pytest.mark.parametrize("start,size", [
    (0, 10),    # repeats bytes already received
    (10, 20),   # overlaps the end of the first chunk
    (21, 5),    # one byte of overlap
    (23, 5),    # leaves a one-byte gap
    (100, 5),   # far past the end
])
def test_chunk_not_starting_at_the_offset_is_416_and_upload_survives(client, start, size):
    repo = new_repo()
    blob = os.urandom(60)
    location = start_upload(client, repo)
    location = assert_chunk_accepted(patch_chunk(client, location, blob[:22], 0), 21)
    r = patch_chunk(client, location, os.urandom(size), start)
    assert r.status_code == 416, (r.status_code, r.text)
    # "A GET request may be used to retrieve the current valid offset and upload location."
    s = upload_status(client, location)
    assert s.status_code == 204
    assert s.headers["Range"] == "0-21"
    location = assert_chunk_accepted(patch_chunk(client, s.headers["Location"], blob[22:], 22), 59)
    assert_created(client, close_upload(client, location, sha256(blob)), repo, blob, sha256(blob))


@pytest.mark.parametrize("content_range", [
    "22-99",          # claims more bytes than the body has
    "22-30",          # claims fewer bytes than the body has
    "22-",            # no end
    "-41",            # no start
    "30-22",          # end before start
    "abc",
])
def test_malformed_content_range_is_rejected_and_upload_survives(client, content_range):
    repo = new_repo()
    blob, c1, c2 = chunks_42()
    location = start_upload(client, repo)
    location = assert_chunk_accepted(patch_chunk(client, location, c1, 0), 21)
    r = client.patch(location, content=c2, headers={**OCTET, "Content-Range": content_range})
    # The range "MUST match the following regular expression: ^[0-9]+-[0-9]+$"
    # and is "the byte range of the chunk"; a range that is unusable or that
    # disagrees with the body cannot be accepted (end-5 fails with 404/416; a
    # malformed request may also be a plain 400).
    assert r.status_code in (400, 416), (r.status_code, r.text)
    s = upload_status(client, location)
    assert s.status_code == 204
    assert s.headers["Range"] == "0-21"
    location = assert_chunk_accepted(patch_chunk(client, s.headers["Location"], c2, 22), 41)
    assert_created(client, close_upload(client, location, sha256(blob)), repo, blob, sha256(blob))


def test_many_small_chunks(client):
    repo = new_repo()
    blob = os.urandom(64 * 1024 + 3)
    location = start_upload(client, repo)
    offset = 0
    step = 8 * 1024
    while offset < len(blob):
        part = blob[offset:offset + step]
        location = assert_chunk_accepted(patch_chunk(client, location, part, offset),
                                         offset + len(part) - 1)
        offset += len(part)
    assert_created(client, close_upload(client, location, sha256(blob)), repo, blob, sha256(blob))


def _pieces(data: bytes, size: int):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def test_streamed_patch_with_chunked_transfer_encoding(client):
    # A streaming client does not know the length up front and sends the PATCH
    # body with Transfer-Encoding: chunked (no Content-Length).
    repo = new_repo()
    data = os.urandom(700_001)
    location = start_upload(client, repo)
    r = client.patch(location, content=_pieces(data, 65_536), headers=OCTET)
    assert r.request.headers.get("Transfer-Encoding") == "chunked"
    location = assert_chunk_accepted(r, len(data) - 1)
    assert_created(client, close_upload(client, location, sha256(data)), repo, data, sha256(data))


def test_single_post_and_closing_put_with_chunked_transfer_encoding(client):
    repo = new_repo()
    data = os.urandom(300_000)
    digest = sha256(data)
    r = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest},
                    content=_pieces(data, 50_000), headers=OCTET)
    assert r.status_code == 201, (r.status_code, r.text)
    assert_created(client, r, repo, data, digest)
    repo2 = new_repo()
    location = start_upload(client, repo2)
    r = client.put(with_digest(location, digest), content=_pieces(data, 40_000), headers=OCTET)
    assert_created(client, r, repo2, data, digest)


def test_racing_first_chunks_on_one_session_accept_exactly_one(registry, client):
    # Chunks "MUST be uploaded in order, with the first byte of a chunk being
    # the last chunk's <end-of-range> plus one": of N racing "0-1023" chunks,
    # one is the first chunk and every other one is out of order (416). The
    # 202 acknowledges that chunk's bytes; a 416 chunk must leave no trace.
    # Several rounds, since a lost race is a matter of timing.
    n = 8
    with ThreadPoolExecutor(n) as pool:
        for _ in range(4):
            repo = new_repo("concurrent")
            location = start_upload(client, repo)
            candidates = [os.urandom(1024) for _ in range(n)]
            barrier = threading.Barrier(n)

            def work(i):
                with registry.client() as c:
                    barrier.wait(timeout=30)
                    return patch_chunk(c, location, candidates[i], 0).status_code

            statuses = list(pool.map(work, range(n)))
            assert sorted(statuses) == [202] + [416] * (n - 1), statuses
            winner = candidates[statuses.index(202)]
            s = upload_status(client, location)
            assert s.status_code == 204
            assert s.headers["Range"] == "0-1023"
            r = close_upload(client, s.headers["Location"], sha256(winner))
            assert_created(client, r, repo, winner, sha256(winner))


def test_upload_resumes_after_registry_restart(fresh_registry):
    # Use case "Resumable Push": after connectivity returns "The registry
    # notifies the build server that the upload has already been partially
    # attempted. The build server responds by only sending the remaining data".
    repo = new_repo()
    data = os.urandom(200_000)
    with fresh_registry.client() as c:
        location = start_upload(c, repo)
        location = assert_chunk_accepted(patch_chunk(c, location, data[:120_000], 0), 119_999)
    fresh_registry.restart()
    with fresh_registry.client() as c:
        s = upload_status(c, location)
        assert s.status_code == 204, (s.status_code, s.text)
        assert s.headers["Range"] == "0-119999"
        location = assert_chunk_accepted(patch_chunk(c, s.headers["Location"], data[120_000:], 120_000),
                                         len(data) - 1)
        assert_created(c, close_upload(c, location, sha256(data)), repo, data, sha256(data))


# --------------------------------------------------------------------------- status, cancel


def test_status_of_fresh_session_is_204_with_location(client):
    repo = new_repo()
    location = start_upload(client, repo)
    r = upload_status(client, location)
    # end-13: GET /v2/<name>/blobs/uploads/<reference> -> 204
    assert r.status_code == 204, (r.status_code, r.text)
    assert r.headers.get("Location")
    assert loc_path(r.headers["Location"]).startswith(f"/v2/{repo}/blobs/uploads/")


def test_status_tracks_progress(client):
    repo = new_repo()
    blob = os.urandom(300)
    location = start_upload(client, repo)
    for start, end in ((0, 99), (100, 249), (250, 299)):
        location = assert_chunk_accepted(patch_chunk(client, location, blob[start:end + 1], start), end)
        r = upload_status(client, location)
        # "The response to an active upload <location> MUST be a 204 No Content
        #  response code, and MUST have the following headers: Location, Range"
        assert r.status_code == 204
        assert r.headers["Range"] == f"0-{end}"
        assert r.headers.get("Location")
        location = r.headers["Location"]
    assert_created(client, close_upload(client, location, sha256(blob)), repo, blob, sha256(blob))


def test_cancel_upload(client):
    repo = new_repo()
    location = start_upload(client, repo)
    location = assert_chunk_accepted(patch_chunk(client, location, b"abc", 0), 2)
    # "If successful, the response SHOULD be a 204 No Content response code." (end-14: 204)
    r = client.delete(location)
    assert r.status_code == 204, (r.status_code, r.text)
    assert_oci_error(upload_status(client, location), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_oci_error(patch_chunk(client, location, b"def", 3), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_oci_error(close_upload(client, location, sha256(b"abc")), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_oci_error(client.delete(location), 404, "BLOB_UPLOAD_UNKNOWN")
    assert client.head(f"/v2/{repo}/blobs/{sha256(b'abc')}").status_code == 404


def test_completed_upload_session_is_closed(client):
    repo = new_repo()
    data = b"closing time"
    location = start_upload(client, repo)
    location = assert_chunk_accepted(patch_chunk(client, location, data, 0), len(data) - 1)
    assert close_upload(client, location, sha256(data)).status_code == 201
    assert_oci_error(upload_status(client, location), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_oci_error(patch_chunk(client, location, b"more", len(data)), 404, "BLOB_UPLOAD_UNKNOWN")


@pytest.mark.parametrize("method", ["GET", "PATCH", "PUT", "DELETE"])
def test_unknown_upload_id_is_404_blob_upload_unknown(client, method):
    repo = new_repo()
    start_upload(client, repo)  # the repository has an upload, just not this one
    url = f"/v2/{repo}/blobs/uploads/{uuid4()}"
    params = {"digest": sha256(b"x")} if method == "PUT" else None
    r = client.request(method, url, params=params, content=b"x" if method in ("PATCH", "PUT") else None,
                       headers=OCTET)
    assert_oci_error(r, 404, "BLOB_UPLOAD_UNKNOWN")


def test_upload_session_belongs_to_its_repository(client):
    a, b = new_repo(), new_repo()
    location = start_upload(client, a)
    session = loc_path(location).rsplit("/", 1)[-1]
    assert session
    other = f"/v2/{b}/blobs/uploads/{session}"
    assert_oci_error(client.get(other), 404, "BLOB_UPLOAD_UNKNOWN")
    data = b"not yours"
    assert_oci_error(close_upload(client, other, sha256(data), data), 404, "BLOB_UPLOAD_UNKNOWN")
    assert client.head(f"/v2/{b}/blobs/{sha256(data)}").status_code == 404
    # the session itself is untouched
    assert upload_status(client, location).status_code == 204


@pytest.mark.parametrize("session", [
    "..%2f..%2f..%2f..%2f..%2f..%2ftmp%2fMARKER",
    "%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fMARKER",
    "..",
])
def test_upload_id_traversal_writes_nothing(registry, client, session):
    repo = new_repo()
    start_upload(client, repo)
    marker = f"mrk{uuid4().hex}"
    path = f"/v2/{repo}/blobs/uploads/{session.replace('MARKER', marker)}"
    for method, body in (("GET", b""), ("PATCH", b"evil " + marker.encode()),
                         ("PUT", b"evil"), ("DELETE", b"")):
        status, _, _ = raw_request(registry, method, path, body, OCTET)
        assert status in (400, 404, 405), (method, path, status)
    assert not find_marker(registry, marker)


# --------------------------------------------------------------------------- mount


def test_cross_repository_mount(client):
    src, dst = new_repo("mount"), new_repo("mount")
    data = os.urandom(1234)
    digest = push_blob(client, src, data)
    r = client.post(f"/v2/{dst}/blobs/uploads/", params={"mount": digest, "from": src})
    # "The response to a successful mount MUST be 201 Created, and MUST contain
    #  the following header: Location: <blob-location>"
    assert r.status_code == 201, (r.status_code, r.text)
    # conformance: Location == "/v2/<crossmountNamespace>/blobs/<digest>"
    assert loc_path(r.headers["Location"]) == f"/v2/{dst}/blobs/{digest}"
    assert r.headers.get("Docker-Content-Digest", digest) == digest
    g = client.get(r.headers["Location"])
    assert g.status_code == 200
    assert g.content == data
    h = client.head(f"/v2/{dst}/blobs/{digest}")
    assert h.status_code == 200
    assert int(h.headers["Content-Length"]) == len(data)


def test_mount_without_from_of_unknown_blob_starts_a_session(client):
    # conformance: "Cross-mounting of a blob without the from argument should
    # yield session id" (mount=dummyDigest, no from) -> 202 + Location
    dst = new_repo("mount")
    r = client.post(f"/v2/{dst}/blobs/uploads/", params={"mount": DUMMY_DIGEST})
    assert r.status_code == 202, (r.status_code, r.text)
    assert r.headers.get("Location")
    data = b"hello world"
    assert_created(client, close_upload(client, r.headers["Location"], DUMMY_DIGEST, data),
                   dst, data, DUMMY_DIGEST)


def test_mount_without_from_of_known_blob_is_201_or_202(client):
    # "The registry MAY treat the from parameter as optional, and it MAY
    #  cross-mount the blob if it can be found."
    src, dst = new_repo("mount"), new_repo("mount")
    data = os.urandom(300)
    digest = push_blob(client, src, data)
    r = client.post(f"/v2/{dst}/blobs/uploads/", params={"mount": digest})
    assert r.status_code in (201, 202), (r.status_code, r.text)
    if r.status_code == 201:
        assert loc_path(r.headers["Location"]) == f"/v2/{dst}/blobs/{digest}"
        assert client.get(f"/v2/{dst}/blobs/{digest}").content == data
    else:
        assert loc_path(r.headers["Location"]).startswith(f"/v2/{dst}/blobs/uploads/")
        assert client.head(f"/v2/{dst}/blobs/{digest}").status_code == 404


def test_failed_mount_blob_not_in_source_starts_a_working_session(client):
    src, dst = new_repo("mount"), new_repo("mount")
    push_blob(client, src, os.urandom(64))  # src exists, without our blob
    data = os.urandom(500)
    digest = sha256(data)
    r = client.post(f"/v2/{dst}/blobs/uploads/", params={"mount": digest, "from": src})
    # "if a registry ... is unable to mount the requested blob, it SHOULD return
    #  a 202. This indicates that the upload session has begun"
    assert r.status_code == 202, (r.status_code, r.text)
    # conformance: "Cross-mounting of nonexistent blob should yield session id"
    assert loc_path(r.headers["Location"]).startswith(f"/v2/{dst}/blobs/uploads/")
    assert client.head(f"/v2/{dst}/blobs/{digest}").status_code == 404
    assert_created(client, close_upload(client, r.headers["Location"], digest, data), dst, data, digest)


def test_failed_mount_source_repository_missing_starts_a_working_session(client):
    dst = new_repo("mount")
    data = os.urandom(500)
    digest = sha256(data)
    r = client.post(f"/v2/{dst}/blobs/uploads/",
                    params={"mount": digest, "from": new_repo("nosuchrepo")})
    assert r.status_code == 202, (r.status_code, r.text)
    location = r.headers["Location"]
    assert loc_path(location).startswith(f"/v2/{dst}/blobs/uploads/")
    location = assert_chunk_accepted(patch_chunk(client, location, data[:200], 0), 199)
    assert_created(client, close_upload(client, location, digest, data[200:]), dst, data, digest)


def test_mount_does_not_leak_blob_pushed_only_elsewhere(client):
    # A blob in repository X must not be mountable "from" a repository Y that
    # never had it.
    x, y, dst = new_repo("mount"), new_repo("mount"), new_repo("mount")
    data = os.urandom(256)
    digest = push_blob(client, x, data)
    push_blob(client, y, os.urandom(16))
    r = client.post(f"/v2/{dst}/blobs/uploads/", params={"mount": digest, "from": y})
    assert r.status_code == 202, (r.status_code, r.text)
    assert client.head(f"/v2/{dst}/blobs/{digest}").status_code == 404


def test_mounted_blob_survives_delete_in_source(client):
    src, dst = new_repo("mount"), new_repo("mount")
    data = os.urandom(700)
    digest = push_blob(client, src, data)
    r = client.post(f"/v2/{dst}/blobs/uploads/", params={"mount": digest, "from": src})
    assert r.status_code == 201
    assert client.delete(f"/v2/{src}/blobs/{digest}").status_code == 202
    assert client.head(f"/v2/{src}/blobs/{digest}").status_code == 404
    g = client.get(f"/v2/{dst}/blobs/{digest}")
    assert g.status_code == 200
    assert g.content == data


def test_mount_of_sha512_blob(client):
    src, dst = new_repo("mount"), new_repo("mount")
    data = os.urandom(900)
    digest = sha512(data)
    r = client.post(f"/v2/{src}/blobs/uploads/", params={"digest": digest}, content=data, headers=OCTET)
    assert r.status_code == 201
    r = client.post(f"/v2/{dst}/blobs/uploads/", params={"mount": digest, "from": src})
    assert r.status_code == 201, (r.status_code, r.text)
    assert loc_path(r.headers["Location"]) == f"/v2/{dst}/blobs/{digest}"
    assert client.get(f"/v2/{dst}/blobs/{digest}").content == data


# --------------------------------------------------------------------------- sha512


def test_sha512_single_post(client):
    repo = new_repo("sha512")
    data = os.urandom(4000)
    digest = sha512(data)
    r = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=data, headers=OCTET)
    assert r.status_code == 201, (r.status_code, r.text)
    assert_created(client, r, repo, data, digest)


def test_sha512_post_then_put(client):
    repo = new_repo("sha512")
    data = os.urandom(4000)
    digest = sha512(data)
    assert_created(client, close_upload(client, start_upload(client, repo), digest, data),
                   repo, data, digest)


def test_sha512_chunked(client):
    repo = new_repo("sha512")
    data = os.urandom(10_000)
    digest = sha512(data)
    location = start_upload(client, repo)
    location = assert_chunk_accepted(patch_chunk(client, location, data[:4000], 0), 3999)
    location = assert_chunk_accepted(patch_chunk(client, location, data[4000:9000], 4000), 8999)
    r = close_upload(client, location, digest, data[9000:], headers={"Content-Range": "9000-9999"})
    assert_created(client, r, repo, data, digest)


def test_sha512_wrong_digest_is_400(client):
    repo = new_repo("sha512")
    data = os.urandom(100)
    claimed = sha512(data + b"?")
    r = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": claimed}, content=data, headers=OCTET)
    assert_oci_error(r, 400, "DIGEST_INVALID")
    assert client.head(f"/v2/{repo}/blobs/{claimed}").status_code == 404
    assert client.head(f"/v2/{repo}/blobs/{sha512(data)}").status_code == 404


# --------------------------------------------------------------------------- concurrency


def _push_one_way(registry, repo: str, data: bytes, way: int) -> tuple[int, str]:
    digest = sha256(data)
    with registry.client() as c:
        if way == 0:
            r = c.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=data,
                       headers=OCTET)
        elif way == 1:
            r = close_upload(c, start_upload(c, repo), digest, data)
        elif way == 2:
            location = start_upload(c, repo)
            third = len(data) // 3
            for start, end in ((0, third), (third, 2 * third)):
                r = patch_chunk(c, location, data[start:end], start)
                assert r.status_code == 202, (r.status_code, r.text)
                location = r.headers["Location"]
            r = close_upload(c, location, digest, data[2 * third:])
        else:
            location = start_upload(c, repo)
            r = patch_chunk(c, location, data, None)
            assert r.status_code == 202, (r.status_code, r.text)
            r = close_upload(c, r.headers["Location"], digest)
        return r.status_code, r.text


def test_concurrent_pushes_of_the_same_blob(registry, client):
    # "If process A and B upload the same layer at the same time, both
    #  operations will proceed and the first to complete will be stored"
    repo = new_repo("concurrent")
    data = os.urandom(512 * 1024 + 11)
    n = 16
    barrier = threading.Barrier(n)

    def work(i):
        barrier.wait(timeout=30)
        return _push_one_way(registry, repo, data, i % 4)

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(work, range(n)))
    assert [s for s, _ in results] == [201] * n, results
    digest = sha256(data)
    r = client.get(f"/v2/{repo}/blobs/{digest}")
    assert r.status_code == 200
    assert r.content == data
    assert int(client.head(f"/v2/{repo}/blobs/{digest}").headers["Content-Length"]) == len(data)


def test_concurrent_pushes_of_the_same_blob_to_many_repositories(registry, client):
    repos = [new_repo("concurrent") for _ in range(8)]
    data = os.urandom(256 * 1024)
    barrier = threading.Barrier(len(repos))

    def work(i):
        barrier.wait(timeout=30)
        return _push_one_way(registry, repos[i], data, i % 4)

    with ThreadPoolExecutor(len(repos)) as pool:
        results = list(pool.map(work, range(len(repos))))
    assert [s for s, _ in results] == [201] * len(repos), results
    for repo in repos:
        r = client.get(f"/v2/{repo}/blobs/{sha256(data)}")
        assert r.status_code == 200
        assert r.content == data


def test_concurrent_chunked_uploads_do_not_mix(registry, client):
    repo = new_repo("concurrent")
    blobs = [os.urandom(100_000 + i) for i in range(8)]
    barrier = threading.Barrier(len(blobs))

    def work(i):
        barrier.wait(timeout=30)
        return _push_one_way(registry, repo, blobs[i], 2)

    with ThreadPoolExecutor(len(blobs)) as pool:
        results = list(pool.map(work, range(len(blobs))))
    assert [s for s, _ in results] == [201] * len(blobs), results
    for blob in blobs:
        r = client.get(f"/v2/{repo}/blobs/{sha256(blob)}")
        assert r.status_code == 200
        assert hashlib.sha256(r.content).digest() == hashlib.sha256(blob).digest()


# --------------------------------------------------------------------------- error bodies


@pytest.mark.parametrize("case", [
    "blob_unknown", "upload_unknown", "digest_invalid", "name_invalid", "manifest_unknown",
])
def test_error_bodies_have_the_spec_shape(client, case):
    repo = new_repo()
    push_blob(client, repo, b"exists")
    r, status = {
        "blob_unknown": lambda: (client.get(f"/v2/{repo}/blobs/{DUMMY_DIGEST}"), 404),
        "upload_unknown": lambda: (client.get(f"/v2/{repo}/blobs/uploads/{uuid4()}"), 404),
        "digest_invalid": lambda: (client.get(f"/v2/{repo}/blobs/sha256:nothex"), 400),
        "name_invalid": lambda: (client.post("/v2/Bad-Name/blobs/uploads/"), 400),
        "manifest_unknown": lambda: (client.get(f"/v2/{repo}/manifests/nosuchtag"), 404),
    }[case]()
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers.get("Content-Type", "").startswith("application/json"), r.headers
    # "If the response body is in JSON format, it MUST have the following
    #  format: {"errors": [{"code": ..., "message": ..., "detail": ...}]}"
    body = r.json()
    assert set(body) == {"errors"}, body
    assert isinstance(body["errors"], list) and body["errors"], body
    for err in body["errors"]:
        assert set(err) <= {"code", "message", "detail"}, err
        assert err["code"] in SPEC_ERROR_CODES, err
        assert isinstance(err.get("message", ""), str), err
        # "detail" is OPTIONAL and MAY be arbitrary JSON: anything parsed is fine.


def test_bad_manifest_reference_error_is_oci_json(client):
    # conformance Pull "Error codes": "400 response body should contain
    # OCI-conforming JSON message" (GET manifests/sha256:totallywrong -> 400 or 404)
    repo = new_repo()
    push_blob(client, repo, b"exists")
    r = client.get(f"/v2/{repo}/manifests/sha256:totallywrong",
                   headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code in (400, 404), (r.status_code, r.text)
    if r.status_code == 400:
        assert error_codes(r)[0] in SPEC_ERROR_CODES


# --------------------------------------------------------------------------- names


def find_marker(registry, marker: str) -> list[str]:
    """Every file or directory whose name holds `marker`, wherever a bad join could land."""
    found = []
    roots = {registry.data_dir.parent.parent, Path.cwd()}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in (".git", ".venv", "node_modules")]
            found += [os.path.join(dirpath, n) for n in dirnames + filenames if marker in n]
    for top in (Path("/"), Path("/tmp"), Path("/work"), registry.blob_dir,
                registry.data_dir, registry.data_dir.parent):
        try:
            found += [str(top / n) for n in os.listdir(top) if marker in n]
        except FileNotFoundError:
            pass
    return sorted(set(found))


# Each name is invalid against the spec's grammar
#   [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*
# or its length bound; M is replaced by a unique lowercase marker.
INVALID_NAMES = {
    "uppercase": "Upper/M",
    "uppercase_encoded": "%55pper/M",
    "dotdot_inside": "M/../escape",
    "dotdot_traversal": "../../../../../../../../tmp/M",
    "dotdot_encoded": "%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/tmp/M",
    "dotdot_encoded_upper": "%2E%2E/%2E%2E/%2E%2E/tmp/M",
    "slash_encoded_traversal": "x%2f..%2f..%2f..%2f..%2f..%2ftmp%2fM",
    "leading_slash": "/M",
    "leading_slash_encoded": "%2fM",
    "trailing_slash": "M/",
    "double_slash": "a//M",
    "single_dot": "./M",
    "leading_dash": "-M",
    "double_dot_separator": "a..M",
    "triple_underscore": "a___M",
    "space": "a%20M",
    "nul": "a%00M",
    "too_long": "M" + "a" * 256,
    "too_long_components": "M/" + "/".join(["abcdefghij"] * 24),
}

OPERATIONS = {
    "start_upload": ("POST", "/v2/{name}/blobs/uploads/", False),
    "single_post": ("POST", "/v2/{name}/blobs/uploads/?digest={digest}", True),
    "get_blob": ("GET", "/v2/{name}/blobs/{digest}", False),
    "head_blob": ("HEAD", "/v2/{name}/blobs/{digest}", False),
    "delete_blob": ("DELETE", "/v2/{name}/blobs/{digest}", False),
    "mount": ("POST", "/v2/{name}/blobs/uploads/?mount={digest}&from=library/src", False),
}


@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize("kind", list(INVALID_NAMES))
def test_invalid_repository_name_is_400_name_invalid(registry, kind, operation):
    marker = f"mrk{uuid4().hex[:12]}"
    name = INVALID_NAMES[kind].replace("M", marker)
    body = f"payload {marker}".encode()
    method, template, with_body = OPERATIONS[operation]
    path = template.format(name=name, digest=sha256(body))
    status, headers, data = raw_request(registry, method, path, body if with_body else b"",
                                        OCTET if with_body else None)
    # NAME_INVALID: "invalid repository name"
    assert status == 400, (path, status, data[:300])
    if method != "HEAD":
        assert "NAME_INVALID" in raw_error_codes(data), data
    assert not find_marker(registry, marker)


def test_rejected_names_leave_the_registry_working(registry, client):
    for kind in ("dotdot_traversal", "dotdot_encoded", "leading_slash"):
        raw_request(registry, "POST", f"/v2/{INVALID_NAMES[kind]}/blobs/uploads/?digest={sha256(b'x')}",
                    b"x", OCTET)
    assert client.get("/v2/").status_code == 200
    repo = new_repo()
    assert push_blob(client, repo, b"still fine") == sha256(b"still fine")


@pytest.mark.parametrize("name", [
    "a",
    "0",
    "a/b/c/d/e",
    "a.b",
    "a_b",
    "a__b",
    "a-b",
    "a---b",
    "a-b.c_d__e/f0-9",
])
def test_valid_repository_names_are_accepted(client, name):
    name = f"{name}{uuid4().hex[:6]}"
    data = os.urandom(32)
    assert push_blob(client, name, data) == sha256(data)
    assert client.get(f"/v2/{name}/blobs/{sha256(data)}").content == data


def test_long_valid_repository_name_is_accepted(client):
    # Well under the spec's bounds (255 with host; "the maximum <name> is 229
    # characters" for registry.example.org:5000).
    name = "/".join([uuid4().hex[:20]] * 9) + "/" + uuid4().hex[:10]  # 199 characters
    assert len(name) < 229
    data = os.urandom(32)
    assert push_blob(client, name, data) == sha256(data)
    location = start_upload(client, name)
    assert loc_path(location).startswith(f"/v2/{name}/blobs/uploads/")
