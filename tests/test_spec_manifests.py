"""OCI Distribution Spec v1.1.1 (and Docker V2 dialect): manifests.

Push (PUT) and pull (GET/HEAD) of OCI image manifests, OCI indexes, Docker
schema2 manifests and Docker manifest lists; Accept negotiation; validation
(missing blobs, invalid bodies, digest mismatch, size limit, tag grammar);
artifacts (`artifactType`, `subject`, empty config); concurrent tag pushes.

Every expectation is taken from spec.md of opencontainers/distribution-spec
v1.1.x or from the checks its conformance suite (conformance/01_pull_test.go,
02_push_test.go, 03_discovery_test.go, setup.go) makes; spec lines are quoted
where the expectation is not obvious.
"""

from __future__ import annotations

import base64
import json
import threading
from urllib.parse import urljoin
from uuid import uuid4

import httpx
import pytest

from conftest import DRIVERS, on_both_drivers

from oci import (
    assert_oci_error,
    new_repo,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    canonical,
    descriptor,
    make_image,
    push_blob,
    push_image,
    push_manifest,
    sha256,
    sha512,
)

pytestmark = pytest.mark.spec


@pytest.fixture(scope="module", params=DRIVERS)
def registry(request, registry):
    """Every test here runs on both blob drivers (the s3 one on a real SeaweedFS)."""
    return on_both_drivers(request, registry)

# spec.md, "Error Codes": "The `code` field MUST be one of the following:"
ALL_MANIFEST_TYPES = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST]
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
# What `docker pull` sends.
DOCKER_CLIENT_ACCEPT = ", ".join([DOCKER_MANIFEST, DOCKER_LIST, OCI_INDEX, OCI_MANIFEST])
EMPTY_JSON = b"{}"
FOUR_MIB = 4 * 1024 * 1024






def without_accept(client: httpx.Client, method: str, url: str) -> httpx.Response:
    """A request that carries no Accept header at all (httpx adds `Accept: */*` by default)."""
    req = client.build_request(method, url)
    del req.headers["Accept"]
    assert "accept" not in req.headers
    return client.send(req)


def put_raw(client: httpx.Client, repo: str, ref: str, body: bytes, content_type: str) -> httpx.Response:
    return client.put(f"/v2/{repo}/manifests/{ref}", content=body, headers={"Content-Type": content_type})


# --- building the four kinds of manifests -------------------------------------------------------


def _push_children(client, repo, media_type, n=2):
    children = []
    for arch in ["amd64", "arm64"][:n]:
        img = make_image(n_layers=1, layer_size=256, media_type=media_type)
        push_image(client, repo, img.digest, img)
        children.append((img, arch))
    return children


def build(client: httpx.Client, repo: str, kind: str) -> tuple[bytes, str]:
    """Push everything a manifest of `kind` references; return its body (unpushed) and media type."""
    if kind in (OCI_MANIFEST, DOCKER_MANIFEST):
        img = make_image(n_layers=2, layer_size=512, media_type=kind)
        for blob in [img.config, *img.layers]:
            push_blob(client, repo, blob)
        return img.manifest, kind
    child_type = OCI_MANIFEST if kind == OCI_INDEX else DOCKER_MANIFEST
    children = _push_children(client, repo, child_type)
    index = {
        "schemaVersion": 2,
        "mediaType": kind,
        "manifests": [
            descriptor(child_type, img.manifest, platform={"architecture": arch, "os": "linux"})
            for img, arch in children
        ],
    }
    return canonical(index), kind


KINDS = pytest.mark.parametrize(
    "kind", ALL_MANIFEST_TYPES, ids=["oci-manifest", "oci-index", "docker-manifest", "docker-list"]
)


def assert_manifest_response(r: httpx.Response, body: bytes, media_type: str, head: bool = False):
    assert r.status_code == 200, (r.status_code, r.text)
    # "In a successful response, the `Content-Type` header will indicate the type of the returned
    #  manifest. The registry SHOULD NOT include parameters on the `Content-Type` header."
    assert r.headers.get("content-type") == media_type, r.headers
    assert r.headers.get("docker-content-digest") == sha256(body), r.headers
    # "A successful response SHOULD contain the size in bytes of the uploaded blob in the header
    #  `Content-Length`."
    assert int(r.headers["content-length"]) == len(body), r.headers
    if head:
        assert r.content == b""
    else:
        # "The registry MUST store the manifest in the exact byte representation provided by the client."
        assert r.content == body


# --- PUT ----------------------------------------------------------------------------------------


@KINDS
def test_put_by_tag_201_with_location_and_digest(client, kind):
    repo = new_repo()
    body, mt = build(client, repo, kind)
    r = put_raw(client, repo, "v1", body, mt)
    # "Upon a successful upload, the registry MUST return response code `201 Created`, and MUST
    #  have the following header: Location: <location>" ... "The `<location>` is a pullable manifest URL."
    assert r.status_code == 201, (r.status_code, r.text)
    assert r.headers.get("docker-content-digest") == sha256(body)
    location = r.headers.get("location")
    assert location
    pulled = client.get(urljoin(str(client.base_url) + "/", location), headers={"Accept": mt})
    assert_manifest_response(pulled, body, mt)


@KINDS
def test_put_by_digest_201_with_location_and_digest(client, kind):
    repo = new_repo()
    body, mt = build(client, repo, kind)
    digest = sha256(body)
    r = put_raw(client, repo, digest, body, mt)
    assert r.status_code == 201, (r.status_code, r.text)
    # "The Docker-Content-Digest header returns the canonical digest of the uploaded blob, and MUST be
    #  equal to the client provided digest."
    assert r.headers.get("docker-content-digest") == digest
    location = r.headers.get("location")
    assert location
    pulled = client.get(urljoin(str(client.base_url) + "/", location), headers={"Accept": mt})
    assert_manifest_response(pulled, body, mt)


@KINDS
def test_get_and_head_by_tag_and_by_digest(client, kind):
    repo = new_repo()
    body, mt = build(client, repo, kind)
    push_manifest(client, repo, "latest", body, mt)
    for ref in ["latest", sha256(body)]:
        url = f"/v2/{repo}/manifests/{ref}"
        assert_manifest_response(client.get(url, headers={"Accept": mt}), body, mt)
        assert_manifest_response(client.head(url, headers={"Accept": mt}), body, mt, head=True)


@KINDS
def test_get_without_accept_header_returns_stored_type(client, kind):
    repo = new_repo()
    body, mt = build(client, repo, kind)
    push_manifest(client, repo, "t", body, mt)
    for ref in ["t", sha256(body)]:
        assert_manifest_response(without_accept(client, "GET", f"/v2/{repo}/manifests/{ref}"), body, mt)
        assert_manifest_response(
            without_accept(client, "HEAD", f"/v2/{repo}/manifests/{ref}"), body, mt, head=True
        )


@KINDS
def test_get_with_wildcard_and_client_accept_lists(client, kind):
    repo = new_repo()
    body, mt = build(client, repo, kind)
    push_manifest(client, repo, "t", body, mt)
    url = f"/v2/{repo}/manifests/t"
    assert_manifest_response(client.get(url, headers={"Accept": "*/*"}), body, mt)
    assert_manifest_response(client.get(url, headers={"Accept": DOCKER_CLIENT_ACCEPT}), body, mt)
    # The stored type among others, with quality values.
    others = [t for t in ALL_MANIFEST_TYPES if t != mt]
    accept = f"{others[0]};q=0.9, {mt};q=0.5, {others[1]}"
    assert_manifest_response(client.get(url, headers={"Accept": accept}), body, mt)
    # The same list split over repeated Accept headers (what containerd and Go clients send).
    repeated = [("Accept", t) for t in [*others, mt]]
    req = client.build_request("GET", url, headers=repeated)
    assert req.headers.get_list("accept") == [*others, mt]
    assert_manifest_response(client.send(req), body, mt)


@KINDS
def test_accept_listing_only_other_types_never_gets_a_different_type(client, kind):
    """A client that accepts only other manifest types must not be handed another (converted) type.

    spec.md defers to RFC 7231 for Accept; RFC 7231 5.3.2: "the origin server can either honor the
    header field by sending a 406 (Not Acceptable) response or disregard the header field by
    treating the response as if it is not subject to content negotiation". So: 404 (what
    distribution answers: MANIFEST_UNKNOWN) or 406, or the stored manifest unchanged - never a
    different manifest or a converted one (the stored bytes are the only representation)."""
    repo = new_repo()
    body, mt = build(client, repo, kind)
    push_manifest(client, repo, "t", body, mt)
    others = [t for t in ALL_MANIFEST_TYPES if t != mt] + [DOCKER_SCHEMA1_SIGNED]
    for ref in ["t", sha256(body)]:
        url = f"/v2/{repo}/manifests/{ref}"
        for accept in [", ".join(others), others[0], DOCKER_SCHEMA1_SIGNED]:
            r = client.get(url, headers={"Accept": accept})
            assert r.status_code in (200, 404, 406), (accept, r.status_code, r.headers, r.text)
            if r.status_code == 200:
                assert_manifest_response(r, body, mt)
            elif r.status_code == 404:
                assert_oci_error(r, 404, "MANIFEST_UNKNOWN")
            h = client.head(url, headers={"Accept": accept})
            assert h.status_code == r.status_code, (h.status_code, r.status_code)
            if h.status_code == 200:
                assert_manifest_response(h, body, mt, head=True)
        # And the stored type alone still works.
        assert_manifest_response(client.get(url, headers={"Accept": mt}), body, mt)


def test_manifest_bytes_stored_exactly_including_whitespace_and_unknown_fields(client):
    """The conformance suite pushes MarshalIndent'ed manifests whose config descriptor carries
    `data` and an unspecified field; they must be accepted and returned byte for byte."""
    repo = new_repo()
    config = json.dumps({"architecture": "amd64", "os": "linux", "author": uuid4().hex,
                         "rootfs": {"type": "layers", "diff_ids": []}}, indent="\t").encode()
    layer = b"layer-" + uuid4().bytes
    push_blob(client, repo, config)
    push_blob(client, repo, layer)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config),
            "data": base64.b64encode(config).decode(),
            "newUnspecifiedField": base64.b64encode(b"hello world").decode(),
        },
        "layers": [descriptor(OCI_LAYER, layer)],
        "annotations": {"z.last": "1", "a.first": "2", "unicode": "caf\u00e9 \u2693"},
    }
    body = json.dumps(manifest, indent="\t", ensure_ascii=False).encode() + b"\n"
    assert body != canonical(manifest)
    r = put_raw(client, repo, "exact", body, OCI_MANIFEST)
    assert r.status_code == 201, r.text
    assert r.headers["docker-content-digest"] == sha256(body)
    for ref in ["exact", sha256(body)]:
        assert_manifest_response(client.get(f"/v2/{repo}/manifests/{ref}", headers={"Accept": OCI_MANIFEST}),
                                 body, OCI_MANIFEST)


def test_manifest_without_media_type_field_and_without_layers(client):
    """conformance 02_push: "Registry should accept a manifest upload with no layers" (its manifest
    has no `mediaType` field); spec: "The uploaded manifest MUST reference any blobs that make up the
    object. However, the list of blobs MAY be empty." and the Content-Type of a pull "SHOULD match
    what the client pushed as the manifest's Content-Type"."""
    repo = new_repo()
    config = canonical({"architecture": "amd64", "os": "linux", "author": uuid4().hex})
    push_blob(client, repo, config)
    body = json.dumps({"schemaVersion": 2, "config": descriptor(OCI_CONFIG, config), "layers": []},
                      indent="\t").encode()
    r = put_raw(client, repo, "emptylayer", body, OCI_MANIFEST)
    assert r.status_code == 201, r.text
    assert r.headers.get("location")
    assert_manifest_response(client.get(f"/v2/{repo}/manifests/emptylayer", headers={"Accept": OCI_MANIFEST}),
                             body, OCI_MANIFEST)


def test_content_type_parameters_on_put_are_ignored(client):
    # "The registry SHOULD ignore parameters on the `Content-Type` header." and on pull
    # "The registry SHOULD NOT include parameters on the `Content-Type` header."
    repo = new_repo()
    body, mt = build(client, repo, OCI_MANIFEST)
    r = put_raw(client, repo, "params", body, f"{mt}; charset=utf-8")
    assert r.status_code == 201, r.text
    assert_manifest_response(client.get(f"/v2/{repo}/manifests/params", headers={"Accept": mt}), body, mt)


def test_put_same_manifest_twice_is_idempotent(client):
    repo = new_repo()
    body, mt = build(client, repo, OCI_MANIFEST)
    for ref in ["again", "again", sha256(body), sha256(body)]:
        r = put_raw(client, repo, ref, body, mt)
        assert r.status_code == 201, r.text
        assert r.headers["docker-content-digest"] == sha256(body)
    assert_manifest_response(client.get(f"/v2/{repo}/manifests/again", headers={"Accept": mt}), body, mt)


def test_retagging_moves_the_tag_and_keeps_the_old_manifest(client):
    repo = new_repo()
    first = push_image(client, repo, "moving")
    second = push_image(client, repo, "moving")
    r = client.get(f"/v2/{repo}/manifests/moving", headers={"Accept": OCI_MANIFEST})
    assert_manifest_response(r, second.manifest, OCI_MANIFEST)
    old = client.get(f"/v2/{repo}/manifests/{first.digest}", headers={"Accept": OCI_MANIFEST})
    assert_manifest_response(old, first.manifest, OCI_MANIFEST)


def test_one_manifest_many_tags(client):
    repo = new_repo()
    img = push_image(client, repo, "one")
    push_manifest(client, repo, "two", img.manifest)
    for tag in ["one", "two"]:
        r = client.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
        assert_manifest_response(r, img.manifest, OCI_MANIFEST)


def test_sha512_digest_reference(client):
    # "The Docker-Content-Digest header returns the canonical digest of the uploaded blob, and MUST
    #  be equal to the client provided digest."
    repo = new_repo()
    body, mt = build(client, repo, OCI_MANIFEST)
    digest = sha512(body)
    r = put_raw(client, repo, digest, body, mt)
    assert r.status_code == 201, (r.status_code, r.text)
    assert r.headers.get("docker-content-digest") == digest
    g = client.get(f"/v2/{repo}/manifests/{digest}", headers={"Accept": mt})
    assert g.status_code == 200, g.text
    assert g.content == body
    assert g.headers.get("content-type") == mt
    assert client.head(f"/v2/{repo}/manifests/{digest}", headers={"Accept": mt}).status_code == 200


# --- tag grammar --------------------------------------------------------------------------------

VALID_TAGS = ["A", "_", "0", "_under", "Mixed.Case-tag_1", "a" * 128, "v1.2.3-rc.1__x"]
INVALID_TAGS = [".INVALID_MANIFEST_NAME", "-dash", "a" * 129, "tag+plus", "tag@at"]


def test_valid_tag_grammar_accepted(client):
    # "`<reference>` as a tag MUST be at most 128 characters in length and MUST match the following
    #  regular expression: [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}"
    repo = new_repo()
    img = push_image(client, repo, "base")
    for tag in VALID_TAGS:
        push_manifest(client, repo, tag, img.manifest)
        r = client.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
        assert_manifest_response(r, img.manifest, OCI_MANIFEST)


@pytest.mark.parametrize("tag", INVALID_TAGS, ids=["leading-dot", "leading-dash", "129-chars",
                                                   "plus", "at-sign"])
def test_invalid_tag_grammar_rejected_on_put(client, tag):
    # "The `<reference>` MUST NOT be in any other format." TAG_INVALID is only a legacy Docker code
    # ("These error codes are OPTIONAL"), and "The `code` field MUST be one of the following" list,
    # which does not contain it: a bad tag is a bad manifest reference.
    repo = new_repo()
    img = push_image(client, repo, "base")
    r = put_raw(client, repo, tag, img.manifest, OCI_MANIFEST)
    assert_oci_error(r, 400, "MANIFEST_INVALID", "NAME_INVALID")
    tags = client.get(f"/v2/{repo}/tags/list").json()["tags"]
    assert tags == ["base"]


def test_get_and_head_invalid_tag_is_404(client):
    # conformance 01_pull / 02_push: GET and HEAD of ".INVALID_MANIFEST_NAME" must be 404.
    repo = new_repo()
    push_image(client, repo, "base")
    url = f"/v2/{repo}/manifests/.INVALID_MANIFEST_NAME"
    assert client.head(url).status_code == 404
    r = client.get(url, headers={"Accept": OCI_MANIFEST})
    assert r.status_code == 404, (r.status_code, r.text)


def test_get_malformed_digest_reference(client):
    # conformance 01_pull "400 response body should contain OCI-conforming JSON message":
    # GET manifests/sha256:totallywrong -> 400 or 404; a 400 carries a spec error code.
    repo = new_repo()
    push_image(client, repo, "base")
    r = client.get(f"/v2/{repo}/manifests/sha256:totallywrong", headers={"Accept": OCI_MANIFEST})
    assert r.status_code in (400, 404), (r.status_code, r.text)
    assert_oci_error(r, r.status_code)


# --- unknown manifests --------------------------------------------------------------------------


def test_unknown_manifest_404_manifest_unknown(client):
    # "If the manifest is not found in the repository, the response code MUST be `404 Not Found`."
    repo = new_repo()
    push_image(client, repo, "base")
    for ref in ["nosuchtag", sha256(uuid4().bytes)]:
        url = f"/v2/{repo}/manifests/{ref}"
        assert_oci_error(client.get(url, headers={"Accept": OCI_MANIFEST}), 404, "MANIFEST_UNKNOWN")
        h = client.head(url)
        assert h.status_code == 404
        assert h.content == b""


def test_manifest_in_unknown_repository_404(client):
    repo = new_repo("nosuchrepo")
    for ref in ["latest", sha256(uuid4().bytes)]:
        r = client.get(f"/v2/{repo}/manifests/{ref}", headers={"Accept": OCI_MANIFEST})
        assert_oci_error(r, 404, "NAME_UNKNOWN", "MANIFEST_UNKNOWN")
        assert client.head(f"/v2/{repo}/manifests/{ref}").status_code == 404


def test_manifest_is_scoped_to_its_repository(client):
    # "If the manifest is not found in the repository ..." - a digest pushed elsewhere is not here.
    repo_a, repo_b = new_repo(), new_repo()
    img = push_image(client, repo_a, "a")
    push_image(client, repo_b, "b")
    r = client.get(f"/v2/{repo_b}/manifests/{img.digest}", headers={"Accept": OCI_MANIFEST})
    assert_oci_error(r, 404, "MANIFEST_UNKNOWN")
    assert client.head(f"/v2/{repo_b}/manifests/{img.digest}").status_code == 404


# --- referenced content must exist ---------------------------------------------------------------
# "A registry MAY reject a manifest uploaded to the manifest endpoint with descriptors in other
#  fields that reference a manifest or blob that does not exist in the registry. When a manifest is
#  rejected for this reason, it MUST result in one or more `MANIFEST_BLOB_UNKNOWN` errors."
# Moorage rejects.


@pytest.mark.parametrize("kind", [OCI_MANIFEST, DOCKER_MANIFEST], ids=["oci", "docker"])
@pytest.mark.parametrize("missing", ["config", "layer"])
def test_missing_blob_rejected_manifest_blob_unknown(client, kind, missing):
    repo = new_repo()
    img = make_image(n_layers=2, layer_size=256, media_type=kind)
    blobs = [img.config, *img.layers]
    skip = img.config if missing == "config" else img.layers[1]
    for blob in blobs:
        if blob is not skip:
            push_blob(client, repo, blob)
    for ref in ["t", img.digest]:
        assert_oci_error(put_raw(client, repo, ref, img.manifest, kind), 400, "MANIFEST_BLOB_UNKNOWN")
        assert client.head(f"/v2/{repo}/manifests/{ref}").status_code == 404
    # Once the blob is there, the same bytes are accepted.
    push_blob(client, repo, skip)
    push_manifest(client, repo, "t", img.manifest, kind)


@pytest.mark.parametrize("kind", [OCI_INDEX, DOCKER_LIST], ids=["oci-index", "docker-list"])
def test_index_with_child_not_in_repository_rejected(client, kind):
    repo, other = new_repo(), new_repo()
    child_type = OCI_MANIFEST if kind == OCI_INDEX else DOCKER_MANIFEST
    present = make_image(n_layers=1, media_type=child_type)
    push_image(client, repo, present.digest, present)
    absent = make_image(n_layers=1, media_type=child_type)
    push_image(client, other, absent.digest, absent)  # exists, but in another repository
    index = canonical({
        "schemaVersion": 2, "mediaType": kind,
        "manifests": [
            descriptor(child_type, present.manifest, platform={"architecture": "amd64", "os": "linux"}),
            descriptor(child_type, absent.manifest, platform={"architecture": "arm64", "os": "linux"}),
        ],
    })
    for ref in ["idx", sha256(index)]:
        assert_oci_error(put_raw(client, repo, ref, index, kind), 400, "MANIFEST_BLOB_UNKNOWN")
        assert client.head(f"/v2/{repo}/manifests/{ref}").status_code == 404


# --- invalid manifests ---------------------------------------------------------------------------


def _valid_parts(client, repo):
    img = make_image(n_layers=1, layer_size=128)
    for blob in [img.config, *img.layers]:
        push_blob(client, repo, blob)
    return json.loads(img.manifest)


INVALID_BODIES = {
    "not-json": lambda m: (b"blablabla", OCI_MANIFEST),
    "empty-body": lambda m: (b"", OCI_MANIFEST),
    "json-null": lambda m: (b"null", OCI_MANIFEST),
    "json-array": lambda m: (b"[]", OCI_MANIFEST),
    "truncated": lambda m: (canonical(m)[:-5], OCI_MANIFEST),
    "schema-version-1": lambda m: (canonical({**m, "schemaVersion": 1}), OCI_MANIFEST),
    "schema-version-missing": lambda m: (canonical({k: v for k, v in m.items() if k != "schemaVersion"}),
                                         OCI_MANIFEST),
    "config-missing": lambda m: (canonical({k: v for k, v in m.items() if k != "config"}), OCI_MANIFEST),
    "layers-not-a-list": lambda m: (canonical({**m, "layers": m["layers"][0]}), OCI_MANIFEST),
    "config-digest-malformed": lambda m: (canonical({**m, "config": {**m["config"], "digest": "sha256:xyz"}}),
                                          OCI_MANIFEST),
    "layer-digest-missing": lambda m: (canonical({**m, "layers": [{k: v for k, v in m["layers"][0].items()
                                                                   if k != "digest"}]}), OCI_MANIFEST),
    "config-size-not-int": lambda m: (canonical({**m, "config": {**m["config"], "size": "12"}}),
                                      OCI_MANIFEST),
    "index-manifests-missing": lambda m: (canonical({"schemaVersion": 2, "mediaType": OCI_INDEX}), OCI_INDEX),
    # "If a manifest includes a `mediaType` field, clients MUST set the `Content-Type` header to the
    #  value specified by the `mediaType` field." A body declaring another type is not an OCI manifest.
    "media-type-mismatch": lambda m: (canonical(m), OCI_INDEX),
}


@pytest.mark.parametrize("case", list(INVALID_BODIES))
def test_invalid_manifest_rejected_manifest_invalid(client, case):
    repo = new_repo()
    body, content_type = INVALID_BODIES[case](_valid_parts(client, repo))
    r = put_raw(client, repo, "bad", body, content_type)
    # A descriptor digest that breaks the digest grammar may also be reported as DIGEST_INVALID
    # (what distribution answers); everything else is plainly "manifest invalid".
    codes = ("MANIFEST_INVALID", "DIGEST_INVALID") if case == "config-digest-malformed" else ("MANIFEST_INVALID",)
    assert_oci_error(r, 400, *codes)
    assert client.head(f"/v2/{repo}/manifests/bad").status_code == 404


def test_put_by_digest_with_mismatching_body_digest_invalid(client):
    repo = new_repo()
    body, mt = build(client, repo, OCI_MANIFEST)
    other, _ = build(client, repo, OCI_MANIFEST)
    wrong = sha256(other)
    assert_oci_error(put_raw(client, repo, wrong, body, mt), 400, "DIGEST_INVALID")
    for ref in [wrong, sha256(body)]:
        assert client.head(f"/v2/{repo}/manifests/{ref}").status_code == 404


def _padded_manifest(client, repo, total: int) -> bytes:
    img = make_image(n_layers=1, layer_size=128)
    for blob in [img.config, *img.layers]:
        push_blob(client, repo, blob)
    m = json.loads(img.manifest)
    m["annotations"] = {"pad": ""}
    pad = total - len(canonical(m))
    m["annotations"]["pad"] = "p" * pad
    body = canonical(m)
    assert len(body) == total
    return body


def test_manifest_of_exactly_4_mib_is_accepted(client):
    # "Client and registry implementations SHOULD expect to be able to support manifest pushes of at
    #  least 4 megabytes."
    repo = new_repo()
    body = _padded_manifest(client, repo, FOUR_MIB)
    r = put_raw(client, repo, "big", body, OCI_MANIFEST)
    assert r.status_code == 201, (r.status_code, r.text[:500])
    assert r.headers["docker-content-digest"] == sha256(body)
    g = client.get(f"/v2/{repo}/manifests/big", headers={"Accept": OCI_MANIFEST})
    assert_manifest_response(g, body, OCI_MANIFEST)


def test_manifest_over_4_mib_is_refused_413(client):
    # "A registry that enforces this limit SHOULD respond to a request to push a manifest over this
    #  limit with a response code `413 Payload Too Large`."
    repo = new_repo()
    body = _padded_manifest(client, repo, FOUR_MIB + 1)
    r = put_raw(client, repo, "toobig", body, OCI_MANIFEST)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    assert_oci_error(r, 413)
    assert client.head(f"/v2/{repo}/manifests/toobig").status_code == 404
    assert client.head(f"/v2/{repo}/manifests/{sha256(body)}").status_code == 404


# --- artifacts: artifactType, subject, empty config -----------------------------------------------


def _artifact(client, repo, *, subject: tuple[bytes, str] | None, artifact_type="application/vnd.example.sbom.v1",
              annotations=None) -> bytes:
    """An artifact manifest: empty config, one layer of `artifact_type`, optional subject."""
    push_blob(client, repo, EMPTY_JSON)
    payload = b"payload " + uuid4().bytes
    push_blob(client, repo, payload)
    m = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": descriptor(OCI_EMPTY, EMPTY_JSON),
        "layers": [descriptor(artifact_type, payload)],
    }
    if subject is not None:
        m["subject"] = descriptor(subject[1], subject[0])
    if annotations:
        m["annotations"] = annotations
    return json.dumps(m, indent="\t").encode()


def test_empty_config_descriptor_artifact(client):
    # The empty descriptor: "application/vnd.oci.empty.v1+json", the 2 bytes "{}",
    # sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a (conformance checks it).
    assert sha256(EMPTY_JSON) == "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    repo = new_repo()
    body = _artifact(client, repo, subject=None)
    r = put_raw(client, repo, "sbom", body, OCI_MANIFEST)
    assert r.status_code == 201, r.text
    # "...MUST respond with the response header `OCI-Subject`... to indicate to the client that the
    #  registry processed the request's `subject`": a manifest without subject has none to report.
    assert "oci-subject" not in r.headers
    assert_manifest_response(client.get(f"/v2/{repo}/manifests/sbom", headers={"Accept": OCI_MANIFEST}),
                             body, OCI_MANIFEST)
    blob = client.get(f"/v2/{repo}/blobs/{sha256(EMPTY_JSON)}")
    assert blob.status_code == 200
    assert blob.content == EMPTY_JSON


@pytest.mark.parametrize("by", ["tag", "digest"])
def test_manifest_with_subject_returns_oci_subject_header(client, by):
    # "When processing a request for an image manifest with the `subject` field, a registry
    #  implementation that supports the referrers API MUST respond with the response header
    #  `OCI-Subject: <subject digest>`"
    repo = new_repo()
    subject = push_image(client, repo, "subject")
    body = _artifact(client, repo, subject=(subject.manifest, OCI_MANIFEST))
    r = put_raw(client, repo, "sig" if by == "tag" else sha256(body), body, OCI_MANIFEST)
    assert r.status_code == 201, r.text
    assert r.headers.get("oci-subject") == subject.digest
    assert r.headers.get("docker-content-digest") == sha256(body)
    assert_manifest_response(client.get(f"/v2/{repo}/manifests/{sha256(body)}", headers={"Accept": OCI_MANIFEST}),
                             body, OCI_MANIFEST)


def test_manifest_with_missing_subject_is_accepted(client):
    # "A registry MUST initially accept an otherwise valid manifest with a `subject` field that
    #  references a manifest that does not exist in the repository, allowing clients to push a
    #  manifest and referrers to that manifest in either order."
    repo = new_repo()
    never_pushed = make_image()
    body = _artifact(client, repo, subject=(never_pushed.manifest, OCI_MANIFEST))
    r = put_raw(client, repo, sha256(body), body, OCI_MANIFEST)
    assert r.status_code == 201, r.text
    assert r.headers.get("oci-subject") == never_pushed.digest
    assert_manifest_response(client.get(f"/v2/{repo}/manifests/{sha256(body)}", headers={"Accept": OCI_MANIFEST}),
                             body, OCI_MANIFEST)


def test_index_with_subject_and_artifact_type_returns_oci_subject_header(client):
    # conformance 03_discovery pushes an index with artifactType and subject and expects OCI-Subject.
    repo = new_repo()
    subject = push_image(client, repo, "subject")
    children = [_artifact(client, repo, subject=(subject.manifest, OCI_MANIFEST)) for _ in range(2)]
    for child in children:
        push_manifest(client, repo, sha256(child), child)
    index = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "artifactType": "application/vnd.food.stand",
        "manifests": [descriptor(OCI_MANIFEST, c) for c in children],
        "subject": descriptor(OCI_MANIFEST, subject.manifest),
        "annotations": {"org.opencontainers.conformance.test": "test index"},
    }, indent="\t").encode()
    r = put_raw(client, repo, sha256(index), index, OCI_INDEX)
    assert r.status_code == 201, r.text
    assert r.headers.get("oci-subject") == subject.digest
    assert_manifest_response(client.get(f"/v2/{repo}/manifests/{sha256(index)}", headers={"Accept": OCI_INDEX}),
                             index, OCI_INDEX)


# --- concurrency ---------------------------------------------------------------------------------


def test_concurrent_pushes_of_one_tag(registry):
    repo = new_repo("race")
    n = 12
    images = [make_image(n_layers=1, layer_size=256) for _ in range(n)]
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def worker(i: int) -> None:
        with registry.client() as c:
            for blob in [images[i].config, *images[i].layers]:
                push_blob(c, repo, blob)
            barrier.wait(timeout=60)
            r = put_raw(c, repo, "contended", images[i].manifest, OCI_MANIFEST)
            results[i] = (r.status_code, r.headers.get("docker-content-digest"), r.text)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for img, res in zip(images, results):
        assert res is not None
        assert res[0] == 201, res
        assert res[1] == img.digest

    with registry.client() as c:
        r = c.get(f"/v2/{repo}/manifests/contended", headers={"Accept": OCI_MANIFEST})
        assert r.status_code == 200
        by_digest = {img.digest: img for img in images}
        assert r.headers["docker-content-digest"] in by_digest
        assert r.content == by_digest[r.headers["docker-content-digest"]].manifest
        for img in images:
            g = c.get(f"/v2/{repo}/manifests/{img.digest}", headers={"Accept": OCI_MANIFEST})
            assert_manifest_response(g, img.manifest, OCI_MANIFEST)
        assert c.get(f"/v2/{repo}/tags/list").json()["tags"] == ["contended"]
