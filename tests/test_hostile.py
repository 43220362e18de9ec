"""Hostile input over real HTTP(S): each gets its spec error, and nothing changes on disk.

Paths go out byte for byte (http.client, or raw sockets where the request
itself must lie); every request carries the admin's credentials, so what
refuses it is the input, never the authorization. Around each attack, the
storage directory's file list (with sizes; the audit log excepted, which
rightly records the refusals) and the metadata (repository and blob counts
from /health, the catalog) must stay as they were.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import threading
import time
from contextlib import contextmanager

import pytest

from conftest import ADMIN_PASSWORD, Registry, scratch
from moorage.api.connections import HEADER_SECONDS
from moorage.api.bodies import BODY_IDLE_SECONDS, BODY_RATE_GRACE_SECONDS
from oci import DUMMY_DIGEST, SPEC_ERROR_CODES, new_repo, push_image, sha256

pytestmark = pytest.mark.spec

BASIC = "Basic " + base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()
AUTH = {"Authorization": BASIC}
MAX_MANIFEST = 4 << 20


@pytest.fixture(scope="module")
def reg(request):
    r = Registry(scratch(request, "hostile") / "data").start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def client(reg):
    with reg.client(headers=AUTH) as c:
        yield c


@pytest.fixture(scope="module")
def repo(client) -> str:
    """A repository with an image, so that attacks have something to aim at."""
    name = new_repo("hostile")
    push_image(client, name, "v1")
    return name


# -- helpers ---------------------------------------------------------------------


def snapshot(reg: Registry) -> tuple[list[tuple[str, int]], tuple]:
    files = sorted((str(p.relative_to(reg.blob_dir)), p.stat().st_size)
                   for p in reg.blob_dir.rglob("*") if p.is_file() and p.relative_to(reg.blob_dir).parts[0] != "audit")
    with reg.client(headers=AUTH) as c:
        health = c.get("/health").json()
        catalog = c.get("/v2/_catalog").json()["repositories"]
    # Not etcd's revision: the replica's heartbeat bumps it every few seconds.
    return files, (health["repositories"], health["blobs"], catalog)


@contextmanager
def unchanged(reg: Registry):
    before = snapshot(reg)
    yield
    time.sleep(0.2)  # anything the server might still be doing after answering
    after = snapshot(reg)
    assert after[1] == before[1], ("metadata changed", before[1], after[1])
    assert after[0] == before[0], {"added": set(after[0]) - set(before[0]),
                                   "removed": set(before[0]) - set(after[0])}


def raw(reg: Registry, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """(status, headers, body) of a request sent exactly as given."""
    conn = reg.connection(timeout=30)
    try:
        conn.putrequest(method, path, skip_host=False, skip_accept_encoding=True)
        for k, v in {**AUTH, "Content-Length": str(len(body)), **(headers or {})}.items():
            conn.putheader(k, v)
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def sock(reg: Registry, timeout: float = 30.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", reg.port), timeout=timeout)
    if reg.tls:
        s = reg.ssl_context().wrap_socket(s, server_hostname="127.0.0.1")
    return s


def head(method: str, path: str, **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: registry", f"Authorization: {BASIC}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def response(s: socket.socket) -> tuple[int, bytes]:
    r = http.client.HTTPResponse(s)
    r.begin()
    return r.status, r.read()


def parse_response(data: bytes) -> tuple[int, bytes]:
    """(status, body) of a whole response already read from a socket."""
    class Bytes:
        def makefile(self, *_):
            return io.BytesIO(data)

    r = http.client.HTTPResponse(Bytes())
    r.begin()
    return r.status, r.read()


def closed(s: socket.socket) -> bool:
    """The server closed the connection (reads EOF or a reset)."""
    try:
        return s.recv(65536) == b""
    except (ConnectionError, OSError):
        return True


def oci_error(status: int, body: bytes, expected_status: int, *codes: str) -> None:
    assert status == expected_status, (status, body[:300])
    errors = json.loads(body)["errors"]
    assert errors and all(e["code"] in SPEC_ERROR_CODES for e in errors), errors
    if codes:
        assert errors[0]["code"] in codes, errors
    assert b"Traceback" not in body


def upload_with(client, repo: str, data: bytes) -> str:
    """An upload session with `data` acknowledged; returns its Location."""
    r = client.post(f"/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202, r.text
    r = client.patch(r.headers["Location"], content=data,
                     headers={"Content-Range": f"0-{len(data) - 1}", "Content-Type": "application/octet-stream"})
    assert r.status_code == 202, r.text
    return r.headers["Location"]


# -- names and digests -------------------------------------------------------------

ESCAPES = [
    "/v2/../../etc/passwd/manifests/latest",
    "/v2/%2e%2e/%2e%2e/etc/passwd/manifests/latest",
    "/v2/%2E%2E%2F%2E%2E%2Fetc/tags/list",
    "/v2/library/..%2f..%2f..%2fetc/blobs/uploads/",
    "/v2//etc/passwd/manifests/latest",
    "/v2/a/../../../b/blobs/" + DUMMY_DIGEST,
    "/v2/a%5c..%5c..%5cb/tags/list",
    "/v2/a\\..\\..\\b/manifests/latest",
    "/v2/a/%00/b/tags/list",
    "/v2/" + "a" * 300 + "/tags/list",
    "/v2/" + "/".join(["a"] * 200) + "/tags/list",
]


@pytest.mark.parametrize("path", ESCAPES)
@pytest.mark.parametrize("method", ["GET", "PUT", "POST", "DELETE"])
def test_names_that_leave_the_storage_directory(reg, method, path):
    with unchanged(reg):
        status, _, body = raw(reg, method, path, b'{"schemaVersion": 2}')
    # NAME_INVALID where a route matched; otherwise no route (404/405) or a request
    # aiohttp refuses to parse (400). Never a 2xx, never a 5xx.
    assert status in (400, 404, 405), (status, body[:200])
    if status == 400 and body.startswith(b"{"):
        oci_error(status, body, 400, "NAME_INVALID", "UNSUPPORTED")


@pytest.mark.parametrize("upload_id", ["..%2f..%2fetc%2fpasswd", "%2e%2e", "0" * 31 + "G", "a" * 200])
def test_upload_ids_that_leave_the_storage_directory(reg, repo, upload_id):
    with unchanged(reg):
        for method in ("GET", "PATCH", "PUT", "DELETE"):
            status, _, body = raw(reg, method, f"/v2/{repo}/blobs/uploads/{upload_id}?digest={DUMMY_DIGEST}", b"x")
            oci_error(status, body, 404, "BLOB_UPLOAD_UNKNOWN")


BAD_DIGESTS = [
    "sha256:abc",                                   # too short
    "sha256:" + "a" * 65,                           # too long
    "sha512:" + "a" * 64,                           # a sha256's length for sha512
    "md5:" + "a" * 32,                              # unknown algorithm
    "sha256:" + "A" * 64,                           # uppercase hex
    "sha256:" + "g" * 64,                           # not hex
    "sha256:..%2f..%2f..%2fetc%2fpasswd",           # a path
    "sha256",                                       # no hex at all
]


@pytest.mark.parametrize("digest", BAD_DIGESTS)
def test_digests_of_the_wrong_shape(reg, client, repo, digest):
    location = upload_with(client, repo, b"0123456789")
    with unchanged(reg):
        for method in ("GET", "HEAD", "DELETE"):
            status, _, body = raw(reg, method, f"/v2/{repo}/blobs/{digest}")
            if method == "HEAD":
                assert status == 400, status
            else:
                oci_error(status, body, 400, "DIGEST_INVALID")
        status, _, body = raw(reg, "GET", f"/v2/{repo}/referrers/{digest}")
        oci_error(status, body, 400, "DIGEST_INVALID")
        status, _, body = raw(reg, "POST", f"/v2/{repo}/blobs/uploads/?digest={digest}", b"hello")
        oci_error(status, body, 400, "DIGEST_INVALID")
        status, _, body = raw(reg, "PUT", f"{location}&digest={digest}")
        oci_error(status, body, 400, "DIGEST_INVALID")


# -- bodies that lie, chunks out of place ---------------------------------------------------


def test_content_length_shorter_than_the_body(reg, repo):
    data = b"x" * 100
    with unchanged(reg):
        s = sock(reg)
        try:
            s.sendall(head("POST", f"/v2/{repo}/blobs/uploads/?digest={sha256(data)}", **{"Content-Length": "50"})
                      + data)
            # The surplus parses as a second, malformed request; aiohttp may
            # refuse the whole exchange as malformed before answering the first.
            status, body = response(s)
            oci_error(status, body, 400, "DIGEST_INVALID", "UNSUPPORTED")
        finally:
            s.close()


def test_content_length_longer_than_the_body(reg, repo):
    data = b"y" * 100
    with unchanged(reg):
        s = sock(reg)
        try:
            s.sendall(head("POST", f"/v2/{repo}/blobs/uploads/?digest={sha256(data)}", **{"Content-Length": "200"})
                      + data)
            if reg.tls:
                s = s.unwrap()  # close_notify, then the TCP half-close below
            s.shutdown(socket.SHUT_WR)  # the rest never comes
            answer = b""
            try:
                while chunk := s.recv(65536):
                    answer += chunk
            except (ConnectionError, OSError):
                pass
            # The server drops the request (nobody left to answer) or refuses it; never stores it.
            assert not answer.startswith(b"HTTP/1.1 2"), answer[:200]
        finally:
            s.close()


def test_chunk_length_disagreeing_with_its_range(reg, client, repo):
    location = upload_with(client, repo, b"0123456789")
    with unchanged(reg):
        status, _, body = raw(reg, "PATCH", location, b"abcde", {"Content-Range": "10-19"})
        oci_error(status, body, 400, "BLOB_UPLOAD_INVALID")


@pytest.mark.parametrize("content_range,status,code", [
    ("20-29", 416, "BLOB_UPLOAD_INVALID"),     # past the end
    ("5-14", 416, "BLOB_UPLOAD_INVALID"),      # overlapping what was acknowledged
    ("0-9", 416, "BLOB_UPLOAD_INVALID"),       # the same chunk again
    ("-5-4", 400, "BLOB_UPLOAD_INVALID"),      # negative
    ("14-10", 400, "BLOB_UPLOAD_INVALID"),     # ends before it starts
    ("10-99999999999999999999", 400, "BLOB_UPLOAD_INVALID"),  # disagrees with the body's length
    ("bytes=ten-twenty", 400, "BLOB_UPLOAD_INVALID"),
])
def test_chunks_out_of_place(reg, client, repo, content_range, status, code):
    first, rest = b"0123456789", b"abcdefghij"
    location = upload_with(client, repo, first)
    with unchanged(reg):
        for method in ("PATCH", "PUT"):
            target = location if method == "PATCH" else f"{location}&digest={sha256(first + rest)}"
            got, headers, body = raw(reg, method, target, rest, {"Content-Range": content_range})
            oci_error(got, body, status, code)
            if got == 416:
                assert headers["range"] == "0-9", headers  # where to resume
    # The upload is undisturbed: it resumes at 10 and closes with the right digest.
    r = client.put(f"{location}&digest={sha256(first + rest)}", content=rest,
                   headers={"Content-Range": "10-19"})
    assert r.status_code == 201, r.text
    assert client.get(f"/v2/{repo}/blobs/{sha256(first + rest)}").content == first + rest


# -- heads and manifests over the limits -------------------------------------------------------


@pytest.mark.parametrize("what", ["field", "count", "line"])
def test_oversized_request_heads(reg, client, what):
    with unchanged(reg):
        s = sock(reg)
        try:
            if what == "field":
                request = head("GET", "/v2/", **{"X-Big": "a" * (20 << 10)})
            elif what == "count":
                request = head("GET", "/v2/", **{f"X-H{i}": "v" for i in range(150)})
            else:
                request = head("GET", "/v2/" + "a" * (10 << 10) + "/tags/list")
            s.sendall(request)
            status, body = response(s)
            oci_error(status, body, 431, "UNSUPPORTED")
            assert closed(s)
        finally:
            s.close()
    assert client.get("/v2/").status_code == 200  # and everyone else is still served


def test_oversized_manifests(reg, client, repo):
    big = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "annotations": {"pad": "p" * MAX_MANIFEST}}).encode()
    with unchanged(reg):
        # Declared: refused before a byte of the body is read.
        status, _, body = raw(reg, "PUT", f"/v2/{repo}/manifests/big", big,
                              {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        oci_error(status, body, 413, "SIZE_INVALID")
        # Not declared (chunked): refused as soon as it passes the limit.
        r = client.put(f"/v2/{repo}/manifests/big", content=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
                       headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        oci_error(r.status_code, r.content, 413, "SIZE_INVALID")
    assert client.get(f"/v2/{repo}/manifests/big").status_code == 404


# -- slow clients ---------------------------------------------------------------------------------


def test_slow_clients_are_cut_off_while_others_are_served(reg, client, repo):
    """Slowloris (a head trickled a byte at a time), a body that stalls, and a
    body sent a byte every two seconds, all at once: each is cut off after its
    limit, and meanwhile every other request is answered promptly."""
    first = b"0123456789"
    stalled_at = upload_with(client, repo, first)
    trickled_at = upload_with(client, repo, first)
    results: dict[str, object] = {}

    def slowloris():
        s = sock(reg)
        started = time.monotonic()
        try:
            s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: registry\r\n")
            s.settimeout(0.5)
            while time.monotonic() - started < HEADER_SECONDS + 10:
                try:
                    s.sendall(b"X")
                    if s.recv(1) == b"":
                        break
                except TimeoutError:
                    continue
                except (ConnectionError, OSError):
                    break
            results["slowloris"] = time.monotonic() - started
        finally:
            s.close()

    def stalled_body():
        s = sock(reg, timeout=BODY_IDLE_SECONDS + 15)
        started = time.monotonic()
        try:
            s.sendall(head("PATCH", stalled_at, **{"Content-Length": "1000", "Content-Range": "10-1009"}) + b"x" * 10)
            results["stalled"] = (*response(s), time.monotonic() - started, closed(s))
        finally:
            s.close()

    def trickled_body():
        s = sock(reg, timeout=10)
        started = time.monotonic()
        try:
            s.sendall(head("PATCH", trickled_at, **{"Content-Length": "1000", "Content-Range": "10-1009"}))
            s.settimeout(2.0)
            answer = b""
            while not answer and time.monotonic() - started < BODY_RATE_GRACE_SECONDS + 15:
                s.sendall(b"z")
                try:
                    answer = s.recv(65536)  # (a TLS socket's recv skips session tickets; select would not)
                except TimeoutError:
                    continue
            seconds = time.monotonic() - started
            while chunk := s.recv(65536):  # the server closes after its answer
                answer += chunk
            results["trickled"] = (*parse_response(answer), seconds)
        finally:
            s.close()

    before = snapshot(reg)
    def run(f):
        try:
            f()
        except BaseException as e:  # reported by the assertions below
            results[f.__name__ + " error"] = repr(e)

    threads = [threading.Thread(target=run, args=(f,)) for f in (slowloris, stalled_body, trickled_body)]
    for t in threads:
        t.start()
    slowest = 0.0
    while any(t.is_alive() for t in threads):
        t0 = time.monotonic()
        assert client.get(f"/v2/{repo}/manifests/v1").status_code == 200
        slowest = max(slowest, time.monotonic() - t0)
        time.sleep(0.25)
    for t in threads:
        t.join()
    assert slowest < 1.0, slowest
    assert not [k for k in results if k.endswith("error")], results

    assert HEADER_SECONDS - 1 <= results["slowloris"] <= HEADER_SECONDS + 3, results["slowloris"]
    status, body, seconds, was_closed = results["stalled"]
    oci_error(status, body, 408, "BLOB_UPLOAD_INVALID")
    assert BODY_IDLE_SECONDS - 1 <= seconds <= BODY_IDLE_SECONDS + 3 and was_closed, (seconds, was_closed)
    status, body, seconds = results["trickled"]
    oci_error(status, body, 408, "BLOB_UPLOAD_INVALID")
    assert BODY_RATE_GRACE_SECONDS <= seconds <= BODY_RATE_GRACE_SECONDS + 5, seconds
    time.sleep(0.2)
    assert snapshot(reg) == before  # neither body moved its upload
    for location in (stalled_at, trickled_at):
        assert client.get(location).headers["Range"] == "0-9"

