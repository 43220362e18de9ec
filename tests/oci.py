"""Small OCI helpers shared by the tests: digests, blob and image pushes over HTTP.

They speak the wire protocol directly (httpx), so they exercise the registry
the way a client library would, and assert on every status they see.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass

import httpx

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha512(data: bytes) -> str:
    return "sha512:" + hashlib.sha512(data).hexdigest()


def descriptor(media_type: str, data: bytes, **extra) -> dict:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data), **extra}


def push_blob(client: httpx.Client, repo: str, data: bytes) -> str:
    """Monolithic single-POST push; returns the digest."""
    digest = sha256(data)
    r = client.post(
        f"/v2/{repo}/blobs/uploads/",
        params={"digest": digest},
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 201, (r.status_code, r.text)
    assert r.headers["Docker-Content-Digest"] == digest
    return digest


def push_manifest(client: httpx.Client, repo: str, ref: str, manifest: dict | bytes,
                  media_type: str | None = None) -> str:
    body = manifest if isinstance(manifest, bytes) else canonical(manifest)
    if media_type is None:
        media_type = json.loads(body)["mediaType"]
    r = client.put(f"/v2/{repo}/manifests/{ref}", content=body, headers={"Content-Type": media_type})
    assert r.status_code == 201, (r.status_code, r.text)
    assert r.headers["Docker-Content-Digest"] == sha256(body)
    return sha256(body)


def canonical(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


@dataclass
class Image:
    config: bytes
    layers: list[bytes]
    manifest: bytes

    @property
    def digest(self) -> str:
        return sha256(self.manifest)


def make_image(n_layers: int = 2, layer_size: int = 1024, media_type: str = OCI_MANIFEST,
               **manifest_extra) -> Image:
    """An image of random layers; the config names the layers' diff ids."""
    layers = [os.urandom(layer_size) for _ in range(n_layers)]
    docker = media_type == DOCKER_MANIFEST
    config = canonical({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha256(layer) for layer in layers]},
    })
    manifest = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": descriptor(DOCKER_CONFIG if docker else OCI_CONFIG, config),
        "layers": [descriptor(DOCKER_LAYER if docker else OCI_LAYER, layer) for layer in layers],
        **manifest_extra,
    }
    return Image(config, layers, canonical(manifest))


def push_image(client: httpx.Client, repo: str, ref: str, image: Image | None = None) -> Image:
    image = image or make_image()
    for blob in [image.config, *image.layers]:
        push_blob(client, repo, blob)
    push_manifest(client, repo, ref, image.manifest)
    return image


def error_codes(response: httpx.Response) -> list[str]:
    """The OCI error codes of an error body; asserts the body has the spec's shape."""
    body = response.json()
    assert isinstance(body.get("errors"), list) and body["errors"], body
    for err in body["errors"]:
        assert isinstance(err.get("code"), str) and isinstance(err.get("message"), str), err
    return [err["code"] for err in body["errors"]]

# The spec's error code table ("The `code` field MUST be one of the following").
SPEC_ERROR_CODES = {
    "BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID",
    "NAME_UNKNOWN", "SIZE_INVALID", "UNAUTHORIZED", "DENIED", "UNSUPPORTED", "TOOMANYREQUESTS",
}

# conformance/setup.go: dummyDigest = godigest.FromString("hello world")
DUMMY_DIGEST = "sha256:b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"


def new_repo(prefix: str = "test") -> str:
    """A repository name of a test's own, so tests never see each other's data."""
    return f"{prefix}/{uuid.uuid4().hex[:10]}"


def assert_oci_error(r: httpx.Response, status: int, *codes: str) -> list[str]:
    """`status` with exactly the spec's error body; its first code is one of `codes`."""
    assert r.status_code == status, (r.status_code, dict(r.headers), r.text)
    assert r.headers.get("content-type", "").split(";")[0].strip() == "application/json", r.headers
    body = r.json()
    assert isinstance(body, dict) and set(body) == {"errors"}, body
    found = error_codes(r)
    for err in body["errors"]:
        assert set(err) <= {"code", "message", "detail"}, err
        assert err["code"] in SPEC_ERROR_CODES, err
    if codes:
        # conformance: Expect(errorResponses[0].Code).To(Equal(...))
        assert found[0] in codes, (found, codes)
    return found



# --- chunked (resumable) uploads -------------------------------------------------------
# Each helper follows the spec: always continue at the Location of the latest response.


def start_upload(client: httpx.Client, repo: str) -> str:
    """POST an empty upload session; returns its Location."""
    r = client.post(f"/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202, (r.status_code, r.text)
    assert r.headers.get("Location"), r.headers
    return r.headers["Location"]


def range_end(response: httpx.Response) -> int:
    """The offset (bytes received) an upload response reports in its `Range: 0-<last>`."""
    rng = response.headers.get("Range")
    assert rng is not None, (response.status_code, dict(response.headers))
    start, _, last = rng.removeprefix("bytes=").partition("-")
    assert start == "0", rng
    return int(last) + 1


def patch_chunk(client: httpx.Client, location: str, data: bytes, offset: int) -> str:
    """PATCH one chunk at `offset`; asserts the new offset; returns the next Location."""
    r = client.patch(location, content=data, headers={
        "Content-Type": "application/octet-stream",
        "Content-Range": f"{offset}-{offset + len(data) - 1}",
    })
    assert r.status_code == 202, (r.status_code, r.text)
    assert range_end(r) == offset + len(data), r.headers.get("Range")
    return r.headers.get("Location") or location


def with_digest(location: str, digest: str) -> httpx.URL:
    """The Location plus `digest=`, keeping its own query (httpx's params= would replace it)."""
    return httpx.URL(location).copy_merge_params({"digest": digest})


def finish_upload(client: httpx.Client, location: str, digest: str, data: bytes = b"") -> str:
    """PUT ?digest= (with an optional last chunk); asserts 201 and the digest."""
    r = client.put(with_digest(location, digest), content=data,
                   headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, (r.status_code, r.text)
    assert r.headers["Docker-Content-Digest"] == digest
    return digest


def push_blob_chunked(client: httpx.Client, repo: str, data: bytes, chunk: int = 64 * 1024) -> str:
    location, offset = start_upload(client, repo), 0
    while offset < len(data):
        location = patch_chunk(client, location, data[offset:offset + chunk], offset)
        offset += len(data[offset:offset + chunk])
    return finish_upload(client, location, sha256(data))


def pull_blob(client: httpx.Client, repo: str, digest: str) -> bytes:
    r = client.get(f"/v2/{repo}/blobs/{digest}", follow_redirects=True)
    assert r.status_code == 200, (repo, digest, r.status_code, r.text[:300])
    assert sha256(r.content) == digest, (repo, digest, len(r.content))
    return r.content


MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])


def pull_manifest(client: httpx.Client, repo: str, ref: str) -> bytes:
    r = client.get(f"/v2/{repo}/manifests/{ref}", headers={"Accept": MANIFEST_ACCEPT})
    assert r.status_code == 200, (repo, ref, r.status_code, r.text[:300])
    assert r.headers["Docker-Content-Digest"] == sha256(r.content), (repo, ref)
    return r.content


def raw_request(registry, method: str, path: str, body: bytes = b"",
                headers: dict | None = None) -> tuple[int, dict, bytes]:
    """A request whose path goes out byte for byte (httpx would resolve `..`)."""
    conn = registry.connection()
    try:
        hdrs = {"Content-Length": str(len(body))}
        if path.startswith("/v2/"):
            hdrs["Authorization"] = registry.authorization(method, path)
        hdrs.update(headers or {})
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()
