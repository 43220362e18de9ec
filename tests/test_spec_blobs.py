"""OCI Distribution Spec v1.1.1, pulling blobs: GET/HEAD, ranges, deletion, digests.

Every expectation here comes from the spec text (quoted where not obvious) or
from what the conformance suite v1.1.1 checks in its Pull and Push categories
(conformance/01_pull_test.go, 02_push_test.go). Real HTTP against a real
`moorage serve`.
"""

from __future__ import annotations

import hashlib
import json
import os

import httpx
import pytest

from conftest import DRIVERS, on_both_drivers

from oci import raw_request, DUMMY_DIGEST, assert_oci_error, new_repo, push_blob, sha256, sha512

pytestmark = pytest.mark.spec


@pytest.fixture(scope="module", params=DRIVERS)
def registry(request, registry):
    """Every test here runs on both blob drivers (the s3 one on a real SeaweedFS)."""
    return on_both_drivers(request, registry)








def digest_matches(header: str, body: bytes) -> bool:
    """Whether a Docker-Content-Digest value is a valid digest of `body`."""
    algorithm, _, hexpart = header.partition(":")
    if algorithm not in ("sha256", "sha512"):
        return False
    return hashlib.new(algorithm, body).hexdigest() == hexpart


def push_sha512(client: httpx.Client, repo: str, data: bytes) -> str:
    digest = sha512(data)
    r = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=data,
                    headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, (r.status_code, r.text)
    assert r.headers.get("Location")
    return digest



# --------------------------------------------------------------------------- GET / HEAD


def test_get_existing_blob_returns_exact_bytes_and_headers(client):
    repo = new_repo()
    data = os.urandom(4096)
    digest = push_blob(client, repo, data)
    r = client.get(f"/v2/{repo}/blobs/{digest}")
    # "A request for an existing blob must return: 200 OK; Body: the blob's raw
    #  bytes; Headers: Docker-Content-Digest: <digest>"
    assert r.status_code == 200, r.text
    assert r.content == data
    assert r.headers["Docker-Content-Digest"] == digest
    assert int(r.headers["Content-Length"]) == len(data)


def test_head_existing_blob_has_digest_and_length_and_no_body(client):
    repo = new_repo()
    data = os.urandom(3000)
    digest = push_blob(client, repo, data)
    r = client.head(f"/v2/{repo}/blobs/{digest}")
    # HEAD: "200 OK; Docker-Content-Digest: <digest>; Content-Length: <size in
    #  bytes> - The exact size of the stored object. A HEAD response must not
    #  include a response body."
    assert r.status_code == 200
    assert r.headers["Docker-Content-Digest"] == digest
    assert int(r.headers["Content-Length"]) == len(data)
    assert r.content == b""


def test_head_blob_sends_no_body_on_the_wire(registry, client):
    repo = new_repo()
    data = b"x" * 777
    digest = push_blob(client, repo, data)
    # Two requests on one connection: if HEAD leaked a body, the second
    # response would be garbage.
    conn = registry.connection()
    try:
        auth = {"Authorization": registry.authorization("GET", f"/v2/{repo}/blobs/{digest}")}
        conn.request("HEAD", f"/v2/{repo}/blobs/{digest}", headers=auth)
        first = conn.getresponse()
        assert first.status == 200
        assert first.getheader("Content-Length") == str(len(data))
        first.read()
        conn.request("GET", f"/v2/{repo}/blobs/{digest}", headers=auth)
        second = conn.getresponse()
        assert second.status == 200
        assert second.read() == data
    finally:
        conn.close()


def test_get_unknown_blob_is_404_blob_unknown(client):
    repo = new_repo()
    push_blob(client, repo, os.urandom(64))  # the repository exists
    # conformance: "GET nonexistent blob should result in 404 response"
    r = client.get(f"/v2/{repo}/blobs/{DUMMY_DIGEST}")
    assert_oci_error(r, 404, "BLOB_UNKNOWN")


def test_head_unknown_blob_is_404_without_body(client):
    repo = new_repo()
    push_blob(client, repo, os.urandom(64))
    # conformance: "HEAD request to nonexistent blob should result in 404 response"
    r = client.head(f"/v2/{repo}/blobs/{DUMMY_DIGEST}")
    assert r.status_code == 404
    assert r.content == b""


def test_get_blob_of_unknown_repository_is_404(client):
    r = client.get(f"/v2/{new_repo('nosuchrepo')}/blobs/{DUMMY_DIGEST}")
    assert_oci_error(r, 404, "BLOB_UNKNOWN", "NAME_UNKNOWN")
    r = client.head(f"/v2/{new_repo('nosuchrepo')}/blobs/{DUMMY_DIGEST}")
    assert r.status_code == 404


def test_blob_of_one_repository_is_not_served_from_another(client):
    a, b = new_repo(), new_repo()
    data = os.urandom(512)
    digest = push_blob(client, a, data)
    push_blob(client, b, os.urandom(512))  # b exists, but without this blob
    # "If the blob does not exist in the repository, the registry must return 404"
    r = client.get(f"/v2/{b}/blobs/{digest}")
    assert_oci_error(r, 404, "BLOB_UNKNOWN")
    assert client.head(f"/v2/{b}/blobs/{digest}").status_code == 404
    assert client.get(f"/v2/{a}/blobs/{digest}").content == data


def test_zero_length_blob(client):
    repo = new_repo()
    digest = push_blob(client, repo, b"")
    r = client.get(f"/v2/{repo}/blobs/{digest}")
    assert r.status_code == 200
    assert r.content == b""
    assert r.headers["Docker-Content-Digest"] == digest
    h = client.head(f"/v2/{repo}/blobs/{digest}")
    assert h.status_code == 200
    assert h.headers["Content-Length"] == "0"


def test_blob_location_from_push_is_pullable(client):
    repo = new_repo()
    data = os.urandom(100)
    r = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": sha256(data)}, content=data,
                    headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201
    # "<blob-location> is a pullable blob URL"
    g = client.get(r.headers["Location"])
    assert g.status_code == 200
    assert g.content == data


# --------------------------------------------------------------------------- Range


RANGE_BLOB_SIZE = 1000


@pytest.fixture
def range_blob(client):
    repo = new_repo("ranges")
    data = os.urandom(RANGE_BLOB_SIZE)
    digest = push_blob(client, repo, data)
    return repo, digest, data


@pytest.mark.parametrize("range_header,first,last", [
    ("bytes=0-0", 0, 0),
    ("bytes=0-99", 0, 99),
    ("bytes=100-199", 100, 199),
    ("bytes=999-999", 999, 999),
    ("bytes=900-", 900, 999),                 # open-ended
    ("bytes=-10", 990, 999),                  # suffix
    ("bytes=500-100000", 500, 999),           # last-pos past the end is clamped (RFC 9110 14.1.2)
    ("bytes=-5000", 0, 999),                  # suffix longer than the blob: the whole blob
])
def test_range_request_returns_206_partial_content(client, range_blob, range_header, first, last):
    repo, digest, data = range_blob
    # "Registries should support the HTTP Range: request header as defined in RFC 9110"
    r = client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": range_header})
    assert r.status_code == 206, (r.status_code, r.headers)
    assert r.headers["Content-Range"] == f"bytes {first}-{last}/{len(data)}"
    assert int(r.headers["Content-Length"]) == last - first + 1
    assert r.content == data[first:last + 1]


@pytest.mark.parametrize("range_header", ["bytes=1000-", "bytes=1000-1005", "bytes=5000-6000"])
def test_unsatisfiable_range_is_416(client, range_blob, range_header):
    repo, digest, data = range_blob
    r = client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": range_header})
    # RFC 9110 15.5.17: first-pos >= current length is unsatisfiable; "the
    # server SHOULD send a Content-Range header field with an unsatisfied-range
    # value" (bytes */<complete-length>).
    assert r.status_code == 416, (r.status_code, r.headers)
    assert r.headers.get("Content-Range") == f"bytes */{len(data)}"


def test_syntactically_invalid_range_is_ignored_or_rejected(client, range_blob):
    repo, digest, data = range_blob
    # RFC 9110 14.2: a recipient MAY ignore an invalid Range header; it must
    # not serve a made-up partial body.
    r = client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=abc-def"})
    assert r.status_code in (200, 416), r.status_code
    if r.status_code == 200:
        assert r.content == data


def test_range_on_unknown_blob_is_404(client, range_blob):
    repo, _, _ = range_blob
    r = client.get(f"/v2/{repo}/blobs/{DUMMY_DIGEST}", headers={"Range": "bytes=0-10"})
    assert_oci_error(r, 404, "BLOB_UNKNOWN")


def test_resumable_pull_reassembles_blob_from_ranges(client):
    # Use case "Resumable Pull": "The client keeps the partial data and uses
    # http Range requests to avoid downloading repeated data."
    repo = new_repo("ranges")
    data = os.urandom(1024 * 1024 + 17)
    digest = push_blob(client, repo, data)
    first = client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=0-333332"})
    assert first.status_code == 206
    got = first.content
    while len(got) < len(data):
        end = min(len(got) + 300_000, len(data)) - 1
        r = client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": f"bytes={len(got)}-{end}"})
        assert r.status_code == 206
        assert r.headers["Content-Range"] == f"bytes {len(got)}-{end}/{len(data)}"
        got += r.content
    assert got == data


# --------------------------------------------------------------------------- DELETE


def test_delete_blob_is_202_then_404(client):
    repo = new_repo()
    keep = push_blob(client, repo, os.urandom(64))
    data = os.urandom(256)
    digest = push_blob(client, repo, data)
    # "Upon success, the registry MUST respond with code 202 Accepted."
    r = client.delete(f"/v2/{repo}/blobs/{digest}")
    assert r.status_code == 202, (r.status_code, r.text)
    assert client.head(f"/v2/{repo}/blobs/{digest}").status_code == 404
    assert_oci_error(client.get(f"/v2/{repo}/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    # "If the blob is not found, a 404 Not Found code MUST be returned."
    assert_oci_error(client.delete(f"/v2/{repo}/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    # The other blob of the repository is untouched.
    assert client.head(f"/v2/{repo}/blobs/{keep}").status_code == 200


def test_delete_unknown_blob_is_404(client):
    repo = new_repo()
    push_blob(client, repo, os.urandom(64))
    assert_oci_error(client.delete(f"/v2/{repo}/blobs/{DUMMY_DIGEST}"), 404, "BLOB_UNKNOWN")


def test_delete_in_one_repository_keeps_the_blob_in_another(client):
    a, b = new_repo(), new_repo()
    data = os.urandom(2048)
    digest = push_blob(client, a, data)
    assert push_blob(client, b, data) == digest
    assert client.delete(f"/v2/{a}/blobs/{digest}").status_code == 202
    assert client.head(f"/v2/{a}/blobs/{digest}").status_code == 404
    r = client.get(f"/v2/{b}/blobs/{digest}")
    assert r.status_code == 200
    assert r.content == data


def test_blob_can_be_pushed_again_after_delete(client):
    repo = new_repo()
    data = os.urandom(1500)
    digest = push_blob(client, repo, data)
    assert client.delete(f"/v2/{repo}/blobs/{digest}").status_code == 202
    assert push_blob(client, repo, data) == digest
    r = client.get(f"/v2/{repo}/blobs/{digest}")
    assert r.status_code == 200
    assert r.content == data


# --------------------------------------------------------------------------- digests


INVALID_DIGESTS = [
    "sha256:abc",                            # too short
    "sha256:" + "g" * 64,                    # not hex
    "sha256:" + "A" * 64,                    # image-spec: sha256 encoded MUST match /[a-f0-9]{64}/
    "sha256:" + "a" * 65,                    # too long
    "sha256:",                               # empty encoded part
    "sha256",                                # no separator
    "notadigest",
    ":" + "a" * 64,                          # empty algorithm
    "sha512:" + "a" * 64,                    # sha512 is 128 hex digits
    "SHA256:" + "a" * 64,                    # image-spec: algorithm components are [a-z0-9]+
]


@pytest.mark.parametrize("bad", INVALID_DIGESTS)
def test_get_blob_with_invalid_digest_is_400_digest_invalid(client, bad):
    repo = new_repo()
    push_blob(client, repo, os.urandom(32))
    assert_oci_error(client.get(f"/v2/{repo}/blobs/{bad}"), 400, "DIGEST_INVALID")


@pytest.mark.parametrize("bad", ["sha256:abc", "sha256:" + "A" * 64, "notadigest"])
def test_head_blob_with_invalid_digest_is_400(client, bad):
    repo = new_repo()
    push_blob(client, repo, os.urandom(32))
    r = client.head(f"/v2/{repo}/blobs/{bad}")
    assert r.status_code == 400
    assert r.content == b""


@pytest.mark.parametrize("bad", ["sha256:abc", "notadigest", "sha512:" + "b" * 64])
def test_delete_blob_with_invalid_digest_is_400_digest_invalid(client, bad):
    repo = new_repo()
    push_blob(client, repo, os.urandom(32))
    assert_oci_error(client.delete(f"/v2/{repo}/blobs/{bad}"), 400, "DIGEST_INVALID")


@pytest.mark.parametrize("path_digest", [
    "sha256:..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    "..%2f..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    "sha256:%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
])
def test_digest_path_traversal_reads_nothing(registry, client, path_digest):
    repo = new_repo()
    push_blob(client, repo, os.urandom(32))
    status, _, body = raw_request(registry, "GET", f"/v2/{repo}/blobs/{path_digest}")
    assert status in (400, 404), (status, body[:200])
    assert b"root:" not in body
    if status == 400:
        codes = [e["code"] for e in json.loads(body)["errors"]]
        assert {"DIGEST_INVALID", "NAME_INVALID"} & set(codes), codes


# --------------------------------------------------------------------------- sha512


def test_sha512_blob_get_and_head(client):
    repo = new_repo("sha512")
    data = os.urandom(5000)
    digest = push_sha512(client, repo, data)
    r = client.get(f"/v2/{repo}/blobs/{digest}")
    assert r.status_code == 200, r.text
    assert r.content == data
    # Docker-Content-Digest "must be a valid digest; must match the digest of
    # the returned blob"
    assert digest_matches(r.headers["Docker-Content-Digest"], data), r.headers["Docker-Content-Digest"]
    h = client.head(f"/v2/{repo}/blobs/{digest}")
    assert h.status_code == 200
    assert int(h.headers["Content-Length"]) == len(data)
    assert digest_matches(h.headers["Docker-Content-Digest"], data)


def test_sha512_blob_range_and_delete(client):
    repo = new_repo("sha512")
    data = os.urandom(3000)
    digest = push_sha512(client, repo, data)
    r = client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=1000-1999"})
    assert r.status_code == 206
    assert r.content == data[1000:2000]
    assert r.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
    assert client.delete(f"/v2/{repo}/blobs/{digest}").status_code == 202
    assert_oci_error(client.get(f"/v2/{repo}/blobs/{digest}"), 404, "BLOB_UNKNOWN")


def test_unknown_sha512_blob_is_404_blob_unknown(client):
    repo = new_repo("sha512")
    push_blob(client, repo, os.urandom(32))
    assert_oci_error(client.get(f"/v2/{repo}/blobs/{sha512(b'never pushed')}"), 404, "BLOB_UNKNOWN")
