"""OCI Distribution Spec v1.1.1: content discovery and content management.

Referrers API, tags list, catalog (Docker V2), and deletion of manifests, tags
and blobs. Expectations come from spec.md of opencontainers/distribution-spec
v1.1.x and from the checks of its conformance suite (03_discovery_test.go,
04_management_test.go, setup.go); the non-obvious ones quote the spec.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from uuid import uuid4

import httpx
import pytest

from conftest import DRIVERS, on_both_drivers

from oci import (
    assert_oci_error,
    new_repo,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_MANIFEST,
    descriptor,
    make_image,
    push_blob,
    push_image,
    push_manifest,
    sha256,
)

pytestmark = pytest.mark.spec


@pytest.fixture(scope="module", params=DRIVERS)
def registry(request, registry):
    """Every test here runs on both blob drivers (the s3 one on a real SeaweedFS)."""
    return on_both_drivers(request, registry)

EMPTY_JSON = b"{}"
ANNOTATION = "org.opencontainers.conformance.test"
TYPE_A = "application/vnd.nhl.peanut.butter.bagel"
TYPE_B = "application/vnd.nba.strawberry.jam.croissant"
TYPE_INDEX = "application/vnd.food.stand"






def next_link(r: httpx.Response) -> str | None:
    """The target of a `Link: <url>; rel="next"` header (RFC 5988), or None."""
    link = r.headers.get("link")
    if link is None:
        return None
    m = re.search(r'<([^>]*)>\s*;\s*rel="?next"?', link)
    assert m, f"Link header without rel=next: {link!r}"
    return m.group(1)


def get_manifest(client, repo, ref, accept=f"{OCI_MANIFEST}, {OCI_INDEX}"):
    return client.get(f"/v2/{repo}/manifests/{ref}", headers={"Accept": accept})


# ==================================================================================================
# Referrers
# ==================================================================================================


@dataclass
class Pushed:
    body: bytes
    media_type: str
    artifact_type: str | None  # what the referrers descriptor must say (None: omitted)
    annotations: dict | None

    @property
    def digest(self) -> str:
        return sha256(self.body)


def _subject(body: bytes, media_type: str = OCI_MANIFEST) -> dict:
    return descriptor(media_type, body)


def push_config_artifact(client, repo, subject: dict, artifact_type: str, annotations: dict | None,
                         ref: str | None = None) -> Pushed:
    """An artifact whose type is its config mediaType (no artifactType field): conformance's
    refsManifest*ConfigArtifact."""
    push_blob(client, repo, EMPTY_JSON)
    config = f"config of {artifact_type} {uuid4()}".encode()
    push_blob(client, repo, config)
    m = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": descriptor(artifact_type, config),
        "subject": subject,
        "layers": [descriptor(OCI_EMPTY, EMPTY_JSON)],
    }
    if annotations:
        m["annotations"] = annotations
    body = json.dumps(m, indent="\t").encode()
    r = client.put(f"/v2/{repo}/manifests/{ref or sha256(body)}", content=body,
                   headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 201, (r.status_code, r.text)
    assert r.headers.get("oci-subject") == subject["digest"]
    return Pushed(body, OCI_MANIFEST, artifact_type, annotations)


def push_layer_artifact(client, repo, subject: dict, artifact_type: str, annotations: dict | None,
                        ref: str | None = None) -> Pushed:
    """An artifact with `artifactType` and the empty config: conformance's refsManifest*LayerArtifact."""
    push_blob(client, repo, EMPTY_JSON)
    payload = f"payload of {artifact_type} {uuid4()}".encode()
    push_blob(client, repo, payload)
    m = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": descriptor(OCI_EMPTY, EMPTY_JSON),
        "subject": subject,
        "layers": [descriptor(artifact_type, payload)],
    }
    if annotations:
        m["annotations"] = annotations
    body = json.dumps(m, indent="\t").encode()
    r = client.put(f"/v2/{repo}/manifests/{ref or sha256(body)}", content=body,
                   headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 201, (r.status_code, r.text)
    assert r.headers.get("oci-subject") == subject["digest"]
    return Pushed(body, OCI_MANIFEST, artifact_type, annotations)


def push_index_artifact(client, repo, subject: dict, children: list[Pushed], artifact_type: str | None,
                        annotations: dict | None) -> Pushed:
    m = {
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [descriptor(c.media_type, c.body) for c in children],
        "subject": subject,
    }
    if artifact_type:
        m["artifactType"] = artifact_type
    if annotations:
        m["annotations"] = annotations
    body = json.dumps(m, indent="\t").encode()
    r = client.put(f"/v2/{repo}/manifests/{sha256(body)}", content=body, headers={"Content-Type": OCI_INDEX})
    assert r.status_code == 201, (r.status_code, r.text)
    assert r.headers.get("oci-subject") == subject["digest"]
    return Pushed(body, OCI_INDEX, artifact_type, annotations)


def referrers(client, repo, digest, **params) -> tuple[httpx.Response, list[dict]]:
    r = client.get(f"/v2/{repo}/referrers/{digest}", params=params)
    # "Assuming a repository is found, this request MUST return a `200 OK` response code."
    assert r.status_code == 200, (r.status_code, r.text)
    # "The `Content-Type` header MUST be set to `application/vnd.oci.image.index.v1+json`."
    assert r.headers.get("content-type") == OCI_INDEX, r.headers
    body = r.json()
    # "Upon success, the response MUST be a JSON body with an image index containing a list of
    #  descriptors."
    assert body.get("schemaVersion") == 2, body
    assert body.get("mediaType", OCI_INDEX) == OCI_INDEX, body
    assert isinstance(body.get("manifests"), list), body
    return r, body["manifests"]


def assert_referrer_descriptors(found: list[dict], expected: list[Pushed]) -> None:
    """Exactly the expected referrers (in any order), each with the spec's descriptor fields."""
    digests = [d.get("digest") for d in found]
    assert len(digests) == len(set(digests)), f"duplicate descriptors: {digests}"
    assert sorted(digests) == sorted(p.digest for p in expected), (digests, [p.digest for p in expected])
    by_digest = {d["digest"]: d for d in found}
    for p in expected:
        d = by_digest[p.digest]
        assert d.get("mediaType") == p.media_type, d
        assert d.get("size") == len(p.body), d
        # "The descriptors MUST include an `artifactType` field that is set to the value of the
        #  `artifactType` in the image manifest or index, if present. If the `artifactType` is empty or
        #  missing in the image manifest, the value of `artifactType` MUST be set to the config
        #  descriptor `mediaType` value. If the `artifactType` is empty or missing in an index, the
        #  `artifactType` MUST be omitted."
        if p.artifact_type is None:
            assert "artifactType" not in d, d
        else:
            assert d.get("artifactType") == p.artifact_type, d
        # "The descriptors MUST include annotations from the image manifest or index."
        # (conformance: Expect(len(index.Manifests[i].Annotations)).To(Equal(1)))
        if p.annotations:
            assert d.get("annotations") == p.annotations, d
        else:
            assert not d.get("annotations"), d


@dataclass
class ReferrersScenario:
    repo: str
    subject: bytes
    missing_subject: bytes
    a_config: Pushed
    a_layer: Pushed
    index: Pushed
    index_untyped: Pushed
    b_config: Pushed
    b_layer: Pushed
    c_layer: Pushed

    @property
    def of_subject(self) -> list[Pushed]:
        return [self.a_config, self.a_layer, self.index, self.index_untyped, self.b_config, self.b_layer]


@pytest.fixture(scope="module")
def scenario(registry) -> ReferrersScenario:
    """conformance 03_discovery "References setup": referrers pushed both before and after their
    subject, one referrer to a subject that is never pushed, and (beyond it) an index without
    artifactType."""
    repo = new_repo("refs")
    with registry.client() as c:
        subject_img = make_image(n_layers=1)
        missing_img = make_image(n_layers=1)
        subj = _subject(subject_img.manifest)
        a_config = push_config_artifact(c, repo, subj, TYPE_A, {ANNOTATION: "test config a"})
        a_layer = push_layer_artifact(c, repo, subj, TYPE_A, {ANNOTATION: "test layer a"})
        index = push_index_artifact(c, repo, subj, [a_config, a_layer], TYPE_INDEX, {ANNOTATION: "test index"})
        index_untyped = push_index_artifact(c, repo, subj, [a_layer], None, {ANNOTATION: "untyped index"})
        push_image(c, repo, "tagtest0", subject_img)
        b_config = push_config_artifact(c, repo, subj, TYPE_B, {ANNOTATION: "test config b"})
        b_layer = push_layer_artifact(c, repo, subj, TYPE_B, {ANNOTATION: "test layer b"}, ref="signed-b")
        c_layer = push_layer_artifact(c, repo, _subject(missing_img.manifest), TYPE_B, None)
    return ReferrersScenario(repo, subject_img.manifest, missing_img.manifest, a_config, a_layer, index,
                             index_untyped, b_config, b_layer, c_layer)


def test_referrers_lists_all_manifests_with_that_subject(client, scenario):
    _, found = referrers(client, scenario.repo, sha256(scenario.subject))
    assert_referrer_descriptors(found, scenario.of_subject)


def test_referrers_filter_by_artifact_type(client, scenario):
    # "If filtering is requested and applied, the response MUST include a header
    #  `OCI-Filters-Applied: artifactType` denoting that an `artifactType` filter was applied."
    subject = sha256(scenario.subject)
    for artifact_type, expected in [
        (TYPE_A, [scenario.a_config, scenario.a_layer]),
        (TYPE_B, [scenario.b_config, scenario.b_layer]),
        (TYPE_INDEX, [scenario.index]),
        ("application/vnd.nobody.uses.this", []),
    ]:
        r, found = referrers(client, scenario.repo, subject, artifactType=artifact_type)
        assert r.headers.get("oci-filters-applied") == "artifactType", (artifact_type, r.headers)
        assert_referrer_descriptors(found, expected)


def test_referrers_of_subject_that_was_never_pushed(client, scenario):
    # conformance: "GET request to missing manifest should yield 200" with exactly the one referrer.
    _, found = referrers(client, scenario.repo, sha256(scenario.missing_subject))
    assert_referrer_descriptors(found, [scenario.c_layer])


def test_referrers_of_unknown_digest_is_empty_200(client, scenario):
    # "If a query results in no matching referrers, an empty manifest list MUST be returned."
    # "the registry MUST NOT return a `404 Not Found` to a referrers API requests."
    for digest in [sha256(b"hello world"), sha256(uuid4().bytes)]:
        _, found = referrers(client, scenario.repo, digest)
        assert found == []
        r, found = referrers(client, scenario.repo, digest, artifactType=TYPE_A)
        assert found == []


def test_referrers_of_a_referrer_or_a_plain_image(client, scenario):
    # Nothing has the referrer A (or the index's children) as subject.
    _, found = referrers(client, scenario.repo, scenario.a_config.digest)
    assert found == []


def test_referrers_invalid_digest_400(client, scenario):
    # "If the request is invalid, such as a `<digest>` with an invalid syntax, a `400 Bad Request`
    #  MUST be returned."
    for bad in ["sha256:totallywrong", "notadigest", "sha256:" + "g" * 64]:
        r = client.get(f"/v2/{scenario.repo}/referrers/{bad}")
        assert_oci_error(r, 400)


def test_referrers_are_scoped_to_the_repository(client):
    # "Each descriptor is of an image manifest or index in the same `<name>` namespace with a
    #  `subject` field that specifies the value of `<digest>`."
    repo_a, repo_b = new_repo("refs"), new_repo("refs")
    img = make_image(n_layers=1)
    push_image(client, repo_a, "s", img)
    push_image(client, repo_b, "s", img)
    in_a = push_layer_artifact(client, repo_a, _subject(img.manifest), TYPE_A, {ANNOTATION: "only in a"})
    _, found = referrers(client, repo_a, img.digest)
    assert_referrer_descriptors(found, [in_a])
    _, found = referrers(client, repo_b, img.digest)
    assert found == []


def test_referrer_pushed_twice_listed_once(client):
    repo = new_repo("refs")
    img = push_image(client, repo, "s")
    ref = push_layer_artifact(client, repo, _subject(img.manifest), TYPE_A, {ANNOTATION: "twice"}, ref="sig")
    for r in [ref.digest, "sig2"]:
        push_manifest(client, repo, r, ref.body, OCI_MANIFEST)
    _, found = referrers(client, repo, img.digest)
    assert_referrer_descriptors(found, [ref])


def test_deleting_a_referrer_removes_it_from_the_list(client):
    repo = new_repo("refs")
    img = push_image(client, repo, "s")
    keep = push_layer_artifact(client, repo, _subject(img.manifest), TYPE_A, {ANNOTATION: "keep"})
    gone = push_config_artifact(client, repo, _subject(img.manifest), TYPE_B, {ANNOTATION: "gone"}, ref="gone")
    _, found = referrers(client, repo, img.digest)
    assert_referrer_descriptors(found, [keep, gone])
    r = client.delete(f"/v2/{repo}/manifests/{gone.digest}")
    assert r.status_code == 202, (r.status_code, r.text)
    _, found = referrers(client, repo, img.digest)
    assert_referrer_descriptors(found, [keep])
    r, found = referrers(client, repo, img.digest, artifactType=TYPE_B)
    assert found == []


def test_referrer_listing_follows_the_manifest_not_its_tags(client):
    repo = new_repo("refs")
    img = push_image(client, repo, "s")
    ref = push_layer_artifact(client, repo, _subject(img.manifest), TYPE_A, {ANNOTATION: "tagged"}, ref="sig")
    # Deleting the referrer's only tag leaves the manifest, so it is still a referrer.
    assert client.delete(f"/v2/{repo}/manifests/sig").status_code == 202
    _, found = referrers(client, repo, img.digest)
    assert_referrer_descriptors(found, [ref])
    # Deleting the manifest removes it; pushing it again brings it back.
    assert client.delete(f"/v2/{repo}/manifests/{ref.digest}").status_code == 202
    _, found = referrers(client, repo, img.digest)
    assert found == []
    r = client.put(f"/v2/{repo}/manifests/{ref.digest}", content=ref.body, headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 201 and r.headers.get("oci-subject") == img.digest
    _, found = referrers(client, repo, img.digest)
    assert_referrer_descriptors(found, [ref])


def test_referrers_filter_with_structured_suffix_type(client):
    # A `+` in the artifactType must survive the query string (sent percent-encoded as %2B).
    repo = new_repo("refs")
    img = push_image(client, repo, "s")
    sig = push_layer_artifact(client, repo, _subject(img.manifest), "application/vnd.example.sig+json",
                              {ANNOTATION: "sig"})
    other = push_layer_artifact(client, repo, _subject(img.manifest), "application/vnd.example.sig",
                                {ANNOTATION: "not sig+json"})
    r, found = referrers(client, repo, img.digest, artifactType="application/vnd.example.sig+json")
    assert r.headers.get("oci-filters-applied") == "artifactType"
    assert_referrer_descriptors(found, [sig])
    r, found = referrers(client, repo, img.digest, artifactType="application/vnd.example.sig")
    assert_referrer_descriptors(found, [other])


def test_deleting_the_subject_keeps_its_referrers(client):
    # The referrers list is "a list of manifests with a subject relationship to a specified digest";
    # the referrer manifests still exist after their subject is deleted, and they may be pushed
    # before it (and so also outlive it).
    repo = new_repo("refs")
    img = push_image(client, repo, "s")
    ref = push_layer_artifact(client, repo, _subject(img.manifest), TYPE_A, {ANNOTATION: "orphan"})
    assert client.delete(f"/v2/{repo}/manifests/{img.digest}").status_code == 202
    assert get_manifest(client, repo, img.digest).status_code == 404
    assert get_manifest(client, repo, ref.digest).status_code == 200
    _, found = referrers(client, repo, img.digest)
    assert_referrer_descriptors(found, [ref])


def test_referrers_of_an_index_subject(client):
    repo = new_repo("refs")
    child = make_image(n_layers=1)
    push_image(client, repo, child.digest, child)
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                        "manifests": [descriptor(OCI_MANIFEST, child.manifest)]}).encode()
    push_manifest(client, repo, "multi", index, OCI_INDEX)
    ref = push_layer_artifact(client, repo, _subject(index, OCI_INDEX), TYPE_B, {ANNOTATION: "on index"})
    _, found = referrers(client, repo, sha256(index))
    assert_referrer_descriptors(found, [ref])
    _, found = referrers(client, repo, child.digest)
    assert found == []


# ==================================================================================================
# Tags list
# ==================================================================================================


TAGS = ["b2", "a10", "a9", "c", "a1", "0z", "b10", "a", "z9", "m"]


@pytest.fixture(scope="module")
def tagged(registry) -> tuple[str, list[str]]:
    repo = new_repo("tags")
    with registry.client() as c:
        img = push_image(c, repo, TAGS[0])
        for tag in TAGS[1:]:
            push_manifest(c, repo, tag, img.manifest)
    return repo, sorted(TAGS)


def tags_page(client, repo, **params) -> tuple[httpx.Response, list[str]]:
    r = client.get(f"/v2/{repo}/tags/list", params=params)
    assert r.status_code == 200, (r.status_code, r.text)
    assert r.headers.get("content-type", "").split(";")[0].strip() == "application/json"
    body = r.json()
    # Upon success, the response MUST be a json body in the following format: {"name":..., "tags": [...]}
    assert body.get("name") == repo, body
    assert "tags" in body, body
    return r, body["tags"] or []


def walk_tags(client, repo, **params) -> tuple[list[str], int]:
    r, tags = tags_page(client, repo, **params)
    pages = 1
    while (link := next_link(r)) is not None:
        r = client.get(link)
        assert r.status_code == 200, (link, r.status_code, r.text)
        tags += r.json()["tags"] or []
        pages += 1
        assert pages < 100
    return tags, pages


def test_tags_list_in_lexical_order(client, tagged):
    # "If the list is not empty, the tags MUST be in lexical order"
    repo, expected = tagged
    tags, _ = walk_tags(client, repo)
    assert tags == expected
    assert expected[:4] == ["0z", "a", "a1", "a10"]  # lexical, not natural, order


def test_tags_list_mixed_case_order_is_consistent_across_pages(client):
    # "the tags MUST be in lexical order (i.e. case-insensitive alphanumeric order)"; the conformance
    # suite also accepts plain byte order ("Historically, registries have not been lexical, so allow
    # `sort.Strings` to be valid too"). Either way, pages must follow the same order.
    repo = new_repo("tags")
    mixed = ["B", "a", "C", "b1", "A2", "c0", "_x", "Z"]
    img = push_image(client, repo, mixed[0])
    for tag in mixed[1:]:
        push_manifest(client, repo, tag, img.manifest)
    _, full = tags_page(client, repo)
    assert full in (sorted(mixed, key=str.lower), sorted(mixed)), full
    paged, _ = walk_tags(client, repo, n=3)
    assert paged == full
    _, tail = tags_page(client, repo, last=full[3])
    assert tail == full[4:]


def test_tags_list_n_limits_and_link_points_to_the_rest(client, tagged):
    # "The response to such a request MAY return fewer than `<int>` results, but only when the total
    #  number of tags attached to the repository is less than `<int>` or a `Link` header is provided.
    #  Otherwise, the response MUST include `<int>` results." ... "the `Link` header MUST be set
    #  according to RFC5988 with the Relation Type `rel="next"`."
    repo, expected = tagged
    r, tags = tags_page(client, repo, n=3)
    assert tags == expected[:3]
    assert next_link(r) is not None, r.headers  # more remain
    assert 'rel="next"' in r.headers["link"]
    walked, pages = walk_tags(client, repo, n=3)
    assert walked == expected
    assert pages >= 4


def test_tags_list_last(client, tagged):
    # "A request of this sort will return up to `<int>` tags, beginning non-inclusively with
    #  `<tagname>`." "When using the `last` query parameter, the `n` parameter is OPTIONAL."
    repo, expected = tagged
    _, tags = tags_page(client, repo, n=2, last=expected[2])
    assert tags == expected[3:5]
    walked, _ = walk_tags(client, repo, last=expected[2])
    assert walked == expected[3:]
    # conformance: "GET start of tag is set by `last` query parameter"
    half = len(expected) // 2
    _, first = tags_page(client, repo, n=half)
    _, second = tags_page(client, repo, n=half, last=first[-1])
    assert first + second == expected


def test_tags_list_last_between_tags_and_after_all(client, tagged):
    repo, expected = tagged
    walked, _ = walk_tags(client, repo, last="b0")  # not a tag: start after where it would sort
    assert walked == [t for t in expected if t > "b0"]
    r, tags = tags_page(client, repo, n=5, last=expected[-1])
    assert tags == []
    assert next_link(r) is None


def test_tags_list_n_zero_is_empty_without_link(client, tagged):
    # "When `n` is zero, this endpoint MUST return an empty list, and MUST NOT include a `Link` header."
    repo, _ = tagged
    r, _ = tags_page(client, repo, n=0)
    assert r.json()["tags"] == []
    assert "link" not in r.headers


def test_tags_list_last_page_has_no_link(client, tagged):
    repo, expected = tagged
    r, tags = tags_page(client, repo, n=len(expected) + 5)
    assert tags == expected
    assert "link" not in r.headers
    r, tags = tags_page(client, repo, n=5, last=expected[-3])
    assert tags == expected[-2:]
    assert "link" not in r.headers


@pytest.mark.parametrize("path", ["tags", "catalog"])
@pytest.mark.parametrize("n", ["-1", "abc", "1.5"])
def test_malformed_n_is_a_bad_request(client, tagged, path, n):
    # The spec defines `n` only as "an integer specifying the number of tags requested"; anything else
    # is a malformed request: 400 Bad Request. (405 would claim GET is not allowed on the resource -
    # RFC 9110 15.5.6: "the method received in the request-line is known by the origin server but
    # not supported by the target resource" - which is false here.)
    repo, _ = tagged
    url = f"/v2/{repo}/tags/list" if path == "tags" else "/v2/_catalog"
    r = client.get(url, params={"n": n})
    assert_oci_error(r, 400)


def test_tags_list_unknown_repository_404(client):
    r = client.get(f"/v2/{new_repo('nosuchrepo')}/tags/list")
    assert_oci_error(r, 404, "NAME_UNKNOWN")


def test_tags_list_of_repository_without_tags(client):
    # "The list of tags MAY be empty if there are no tags on the repository."
    repo = new_repo("tags")
    img = make_image()
    push_image(client, repo, img.digest, img)
    _, tags = tags_page(client, repo)
    assert tags == []


def test_tags_pushed_concurrently_are_all_listed(registry):
    repo = new_repo("tags")
    n = 16
    with registry.client() as c:
        img = push_image(c, repo, "seed")
    barrier = threading.Barrier(n)
    statuses: list = [None] * n

    def worker(i: int) -> None:
        with registry.client() as c:
            barrier.wait(timeout=60)
            r = c.put(f"/v2/{repo}/manifests/t{i:02d}", content=img.manifest,
                      headers={"Content-Type": OCI_MANIFEST})
            statuses[i] = r.status_code

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert statuses == [201] * n
    with registry.client() as c:
        tags, _ = walk_tags(c, repo)
    assert tags == sorted(["seed"] + [f"t{i:02d}" for i in range(n)])


# ==================================================================================================
# Catalog (Docker Registry HTTP API V2: GET /v2/_catalog?n=&last=)
# ==================================================================================================


def catalog_page(client, **params) -> tuple[httpx.Response, list[str]]:
    r = client.get("/v2/_catalog", params=params)
    assert r.status_code == 200, (r.status_code, r.text)
    assert r.headers.get("content-type", "").split(";")[0].strip() == "application/json"
    body = r.json()
    assert "repositories" in body, body
    return r, body["repositories"] or []


def walk_catalog(client, **params) -> list[str]:
    r, repos = catalog_page(client, **params)
    for _ in range(10_000):
        link = next_link(r)
        if link is None:
            return repos
        r = client.get(link)
        assert r.status_code == 200, (link, r.status_code, r.text)
        repos += r.json()["repositories"] or []
    raise AssertionError("catalog pagination does not end")


@pytest.fixture(scope="module")
def catalogued(registry) -> tuple[str, list[str]]:
    prefix = f"cat{uuid4().hex[:8]}"
    repos = [f"{prefix}/r{i}" for i in [3, 0, 4, 1, 2]]
    with registry.client() as c:
        for repo in repos:
            push_image(c, repo, "latest", make_image(n_layers=1, layer_size=64))
    return prefix, sorted(repos)


def test_catalog_lists_repositories_in_order(client, catalogued):
    prefix, ours = catalogued
    everything = walk_catalog(client)
    assert everything == sorted(everything)
    assert len(everything) == len(set(everything))
    assert [r for r in everything if r.startswith(prefix + "/")] == ours


def test_catalog_pagination_with_n_last_and_link(client, catalogued):
    prefix, ours = catalogued
    # Nothing but ours sorts between `prefix` and `prefix + "/r4"`.
    r, page = catalog_page(client, n=2, last=prefix)
    assert page == ours[:2]
    link = next_link(r)
    assert link is not None and 'rel="next"' in r.headers["link"]
    r = client.get(link)
    assert r.status_code == 200
    assert r.json()["repositories"] == ours[2:4]
    _, page = catalog_page(client, n=3, last=ours[1])
    assert page == ours[2:5]


def test_catalog_n_zero(client, catalogued):
    r, _ = catalog_page(client, n=0)
    assert r.json()["repositories"] == []
    assert "link" not in r.headers


def test_catalog_of_a_fresh_registry(fresh_registry):
    with fresh_registry.client() as c:
        _, repos = catalog_page(c)
        assert repos == []
        names = ["zeta/app", "alpha", "alpha/beta", "mid-dle/x.y_z"]
        for name in names:
            push_image(c, name, "v1", make_image(n_layers=1, layer_size=64))
        r, repos = catalog_page(c)
        assert repos == sorted(names)
        assert "link" not in r.headers
        assert walk_catalog(c, n=1) == sorted(names)
        r, page = catalog_page(c, n=2)
        assert page == sorted(names)[:2]
        assert next_link(r) is not None


# ==================================================================================================
# Content management: deletes
# ==================================================================================================


def tag_list(client, repo) -> list[str]:
    _, tags = tags_page(client, repo)
    return tags


def test_delete_manifest_by_digest(client):
    # "Upon success, the registry MUST respond with a `202 Accepted` code." ... "Once deleted, a
    #  `GET` to `/v2/<name>/manifests/<digest>` and any tag pointing to that digest will return a 404."
    repo = new_repo("del")
    img = push_image(client, repo, "one")
    push_manifest(client, repo, "two", img.manifest)
    other = push_image(client, repo, "other")
    r = client.delete(f"/v2/{repo}/manifests/{img.digest}")
    assert r.status_code == 202, (r.status_code, r.text)
    for ref in [img.digest, "one", "two"]:
        assert_oci_error(get_manifest(client, repo, ref), 404, "MANIFEST_UNKNOWN")
        assert client.head(f"/v2/{repo}/manifests/{ref}").status_code == 404
    # conformance: "GET request to tags list should reflect manifest deletion"
    assert tag_list(client, repo) == ["other"]
    assert get_manifest(client, repo, "other").content == other.manifest


def test_delete_tag_keeps_manifest(client):
    # "To delete a tag, perform a `DELETE` request to ... `/v2/<name>/manifests/<tag>`" ... "Upon
    #  success, the registry MUST respond with a `202 Accepted` code." ... "Once deleted, a `GET` to
    #  `/v2/<name>/manifests/<tag>` will return a 404."
    repo = new_repo("del")
    img = push_image(client, repo, "doomed")
    push_manifest(client, repo, "kept", img.manifest)
    r = client.delete(f"/v2/{repo}/manifests/doomed")
    assert r.status_code == 202, (r.status_code, r.text)
    assert_oci_error(get_manifest(client, repo, "doomed"), 404, "MANIFEST_UNKNOWN")
    assert client.head(f"/v2/{repo}/manifests/doomed").status_code == 404
    for ref in [img.digest, "kept"]:
        g = get_manifest(client, repo, ref)
        assert g.status_code == 200
        assert g.content == img.manifest
    assert tag_list(client, repo) == ["kept"]


def test_delete_last_tag_leaves_untagged_manifest(client):
    repo = new_repo("del")
    img = push_image(client, repo, "only")
    assert client.delete(f"/v2/{repo}/manifests/only").status_code == 202
    assert tag_list(client, repo) == []
    assert get_manifest(client, repo, img.digest).status_code == 200


def test_delete_unknown_manifest_or_tag_404(client):
    repo = new_repo("del")
    push_image(client, repo, "present")
    for ref in [sha256(uuid4().bytes), "absent"]:
        assert_oci_error(client.delete(f"/v2/{repo}/manifests/{ref}"), 404, "MANIFEST_UNKNOWN")
    assert tag_list(client, repo) == ["present"]


def test_delete_in_unknown_repository_404(client):
    # "If the repository does not exist, the response MUST return `404 Not Found`."
    repo = new_repo("nosuchrepo")
    for ref in [sha256(uuid4().bytes), "latest"]:
        assert_oci_error(client.delete(f"/v2/{repo}/manifests/{ref}"), 404, "NAME_UNKNOWN", "MANIFEST_UNKNOWN")


def test_delete_twice_second_is_404(client):
    repo = new_repo("del")
    img = push_image(client, repo, "t")
    assert client.delete(f"/v2/{repo}/manifests/{img.digest}").status_code == 202
    assert_oci_error(client.delete(f"/v2/{repo}/manifests/{img.digest}"), 404, "MANIFEST_UNKNOWN")
    assert_oci_error(client.delete(f"/v2/{repo}/manifests/t"), 404, "MANIFEST_UNKNOWN")


def test_delete_then_push_again(client):
    repo = new_repo("del")
    img = push_image(client, repo, "t")
    assert client.delete(f"/v2/{repo}/manifests/{img.digest}").status_code == 202
    push_manifest(client, repo, "t", img.manifest)
    g = get_manifest(client, repo, "t")
    assert g.status_code == 200 and g.content == img.manifest
    assert tag_list(client, repo) == ["t"]


def test_delete_is_scoped_to_the_repository(client):
    repo_a, repo_b = new_repo("del"), new_repo("del")
    img = make_image()
    push_image(client, repo_a, "t", img)
    push_image(client, repo_b, "t", img)
    assert client.delete(f"/v2/{repo_a}/manifests/{img.digest}").status_code == 202
    assert get_manifest(client, repo_a, "t").status_code == 404
    g = get_manifest(client, repo_b, "t")
    assert g.status_code == 200 and g.content == img.manifest


def test_delete_index_by_digest(client):
    repo = new_repo("del")
    child = make_image(n_layers=1)
    push_image(client, repo, child.digest, child)
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                        "manifests": [descriptor(OCI_MANIFEST, child.manifest)]}).encode()
    push_manifest(client, repo, "multi", index, OCI_INDEX)
    assert client.delete(f"/v2/{repo}/manifests/{sha256(index)}").status_code == 202
    assert get_manifest(client, repo, "multi").status_code == 404
    assert get_manifest(client, repo, child.digest).status_code == 200


def test_delete_blob(client):
    # conformance 04_management "Blob delete": 202 (or 404/405), then a GET of a deleted blob is 404.
    # spec: "Upon success, the registry MUST respond with code `202 Accepted`." ... "If blob deletion
    # is disabled, the registry MUST respond with either a `400 Bad Request` or a `405 Method Not
    # Allowed`."
    repo = new_repo("del")
    img = push_image(client, repo, "t")
    assert client.delete(f"/v2/{repo}/manifests/{img.digest}").status_code == 202
    r = client.delete(f"/v2/{repo}/blobs/{sha256(img.config)}")
    assert r.status_code in (202, 400, 405), (r.status_code, r.text)
    g = client.get(f"/v2/{repo}/blobs/{sha256(img.config)}")
    if r.status_code == 202:
        assert g.status_code == 404
        # "If the blob is not found, a `404 Not Found` code MUST be returned."
        assert_oci_error(client.delete(f"/v2/{repo}/blobs/{sha256(img.config)}"), 404, "BLOB_UNKNOWN")
        # The deleted config no longer satisfies a manifest that references it.
        r = client.put(f"/v2/{repo}/manifests/again", content=img.manifest, headers={"Content-Type": OCI_MANIFEST})
        assert_oci_error(r, 400, "MANIFEST_BLOB_UNKNOWN")
    else:
        assert g.status_code == 200 and g.content == img.config


# ==================================================================================================
# Everything above is metadata in etcd: it must survive a restart of the replica.
# ==================================================================================================


def test_manifests_tags_and_referrers_survive_restart(fresh_registry):
    repo = "keep/after-restart"
    with fresh_registry.client() as c:
        img = push_image(c, repo, "v1")
        push_manifest(c, repo, "v2", img.manifest)
        ref = push_layer_artifact(c, repo, _subject(img.manifest), TYPE_A, {ANNOTATION: "persisted"})
        gone = push_image(c, repo, "gone")
        assert c.delete(f"/v2/{repo}/manifests/{gone.digest}").status_code == 202
    fresh_registry.restart()
    with fresh_registry.client() as c:
        for ref_ in ["v1", "v2", img.digest]:
            g = get_manifest(c, repo, ref_)
            assert g.status_code == 200 and g.content == img.manifest
        assert get_manifest(c, repo, gone.digest).status_code == 404
        assert get_manifest(c, repo, "gone").status_code == 404
        assert tag_list(c, repo) == ["v1", "v2"]
        _, found = referrers(c, repo, img.digest)
        assert_referrer_descriptors(found, [ref])
        _, repos = catalog_page(c)
        assert repos == [repo]
