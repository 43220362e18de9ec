"""The permission matrix: every role against every operation, over real HTTP and with skopeo.

One replica and one set of users serve the whole module (argon2id makes every
fresh login cost ~50 ms). Each cell is its own test, named `who-operation`,
so a failure says exactly which permission is wrong. Allowed operations must
succeed; every other one must be refused with 401 or 403 and the spec's error
body, and must change nothing.

Roles, on the repository `perm/private` (private):
    anonymous   no credentials (docker's anonymous token dance)
    reader      role read on it            writer     role write on it
    repoadmin   role admin on it           member     role write through the team `devs`
    admin       the cluster admin          unknown    a user that does not exist
    wrongpw     a real user, wrong password
    othertoken  a valid admin token, but for another repository
    expired     a valid admin token for it, expired (token.lifetime_seconds set to its
                minimum, 30 s, for the one token; the cells run after it has passed)
"""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from auth import fetch_token, parse_challenge
from conftest import ADMIN_PASSWORD, Registry, moorage, scratch, wait_for
from layout import Layout
from oci import MANIFEST_ACCEPT, OCI_MANIFEST, canonical, descriptor, error_codes, make_image, push_image, sha256
from test_skopeo import skopeo, tls

pytestmark = pytest.mark.security

PASSWORD = "matrix-password-1"
REPO, PUBLIC, SECRET, OTHER = "perm/private", "perm/public", "perm/secret", "perm/other"
OURS = {REPO, PUBLIC, SECRET, OTHER}
ARTIFACT = "application/vnd.moorage.test.signature"
LIFETIME = 30  # token.lifetime_seconds' minimum

ROLES = ["anonymous", "reader", "writer", "repoadmin", "member", "admin", "unknown", "wrongpw", "othertoken",
         "expired"]
REGISTRY_OPS = ["pull", "push", "delete", "tags", "catalog", "referrers"]
ADMIN_OPS = ["useradmin", "join", "remove", "config"]
READ = {"pull", "tags", "catalog", "referrers"}
ALLOWED: dict[str, set[str]] = {
    "anonymous": {"catalog"},  # the public repositories only
    "reader": READ,
    "writer": READ | {"push"},
    "repoadmin": READ | {"push", "delete"},
    "member": READ | {"push"},
    "admin": set(REGISTRY_OPS + ADMIN_OPS),
    "unknown": set(), "wrongpw": set(), "othertoken": set(), "expired": set(),
}
# What each role's catalog shows of this module's repositories (None: may not list).
CATALOG = {"anonymous": {PUBLIC}, "reader": {REPO, PUBLIC}, "writer": {REPO, PUBLIC}, "repoadmin": {REPO, PUBLIC},
           "member": {REPO, PUBLIC}, "admin": OURS}
# Refusals: 401 for whoever has no valid credentials (or a token that lacks the
# scope), 403 for a known user who may not.
FORBIDDEN_ROLES = {"reader", "writer", "repoadmin", "member"}


@dataclass
class World:
    registry: Registry
    base: dict                   # the image every read looks at: tag "base"
    base_digest: str
    referrer_digest: str
    layout: Layout               # an OCI layout with one image "v1", for skopeo pushes
    tokens: dict[str, str] = field(default_factory=dict)   # othertoken / expired
    expires_at: float = 0.0
    source_ip: int = 10          # wrong-password cells come from their own 127.0.0.N
    admin: httpx.Client | None = None
    joined: Registry | None = None

    def password(self, role: str) -> str:
        return "not-the-password" if role == "wrongpw" else PASSWORD

    def user(self, role: str) -> str | None:
        return {"anonymous": None, "unknown": "ghost", "wrongpw": "victim", "othertoken": None,
                "expired": None}.get(role, role)

    def _next_ip(self) -> str:
        # Failed logins are slowed down per (address, user): each cell of the
        # wrong-password and unknown-user rows comes from its own loopback address.
        self.source_ip += 1
        return f"127.0.0.{self.source_ip}"

    def client(self, role: str) -> httpx.Client:
        """The registry as `role` speaks to it: docker's token dance, or a fixed token."""
        if role in self.tokens:
            if role == "expired":
                time.sleep(max(0.0, self.expires_at - time.time() + 1))
            return self.registry.client(auth=_Fixed(self.tokens[role]))
        if role == "admin":
            return self.registry.client()
        if role in ("wrongpw", "unknown"):
            transport = httpx.HTTPTransport(verify=self.registry.ssl_context(), local_address=self._next_ip())
            return self.registry.client(self.user(role), self.password(role), transport=transport)
        return self.registry.client(self.user(role), self.password(role))

    def admin_api(self, role: str) -> httpx.Client:
        """The admin API as `role` calls it: HTTP Basic (tokens are not accepted there)."""
        if role in self.tokens:
            return self.registry.client(auth=_Fixed(self.tokens[role]))
        user = self.user(role)
        if user is None:
            return self.registry.client(auth=None)
        password = ADMIN_PASSWORD if role == "admin" else self.password(role)
        if role in ("wrongpw", "unknown"):
            transport = httpx.HTTPTransport(verify=self.registry.ssl_context(), local_address=self._next_ip())
            return self.registry.client(auth=(user, password), transport=transport)
        return self.registry.client(auth=(user, password))


class _Fixed(httpx.Auth):
    """A token the test already holds, sent as is (no dance: it must stand or fall alone)."""

    def __init__(self, token: str):
        self.token = token

    def auth_flow(self, request):
        request.headers["Authorization"] = f"Bearer {self.token}"
        yield request


def cli(registry: Registry, *args: str) -> None:
    moorage(*args, "--existing", registry.url)


@pytest.fixture(scope="module")
def world(request) -> World:
    root = scratch(request, "permissions")
    registry = Registry(root / "data").start()
    world = None
    try:
        world = _build(registry, root)
        yield world
    finally:
        if world is not None and world.joined is not None and world.joined.proc.poll() is None:
            world.joined.kill9()
        registry.stop()


def _build(registry: Registry, root: Path) -> World:
    # The expiring token first, so that its 30 s run out while everything else happens.
    with registry.client(auth=None) as c:
        cli(registry, "config", "set", "token.lifetime_seconds", str(LIFETIME))
        wait_for(lambda: c.get("/health").json()["settings"]["token.lifetime_seconds"] == LIFETIME, 10,
                 "the lifetime setting to apply")
        r = fetch_token(c, [f"repository:{REPO}:pull,push,delete", "registry:catalog:*"], "admin", ADMIN_PASSWORD)
        expires_at = time.time() + LIFETIME
        cli(registry, "config", "unset", "token.lifetime_seconds")
        assert r.json()["expires_in"] == LIFETIME
        expiring = r.json()["token"]
        r = fetch_token(c, [f"repository:{OTHER}:pull,push,delete"], "admin", ADMIN_PASSWORD)
        other = r.json()["token"]

    # Users, a team, grants and a public repository, through the admin API (the
    # CLI's own tests cover the commands; here they would cost a second each).
    with registry.client(auth=("admin", ADMIN_PASSWORD)) as api:
        for user in ("reader", "writer", "repoadmin", "member", "victim"):
            api.put(f"/_admin/users/{user}", json={"password": PASSWORD}).raise_for_status()
        api.put("/_admin/teams/devs").raise_for_status()
        api.put("/_admin/teams/devs/members/member").raise_for_status()
        for kind, name, role in [("user", "reader", "read"), ("user", "writer", "write"),
                                 ("user", "repoadmin", "admin"), ("team", "devs", "write"),
                                 ("user", "victim", "read")]:
            api.put("/_admin/grants", json={kind: name, "repo": REPO, "role": role}).raise_for_status()
        api.put("/_admin/visibility", json={"repo": PUBLIC, "visibility": "public"}).raise_for_status()

    admin = registry.client()
    image = push_image(admin, REPO, "base")
    for repo in (PUBLIC, SECRET, OTHER):
        push_image(admin, repo, "v1")
    # A referrer of the base image, for the referrers cells.
    empty = b"{}"
    signature = canonical({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": ARTIFACT,
                           "config": descriptor("application/vnd.oci.empty.v1+json", empty),
                           "layers": [descriptor("application/vnd.oci.empty.v1+json", empty)],
                           "subject": descriptor(OCI_MANIFEST, image.manifest)})
    admin.post(f"/v2/{REPO}/blobs/uploads/", params={"digest": sha256(empty)}, content=empty).raise_for_status()
    admin.put(f"/v2/{REPO}/manifests/{sha256(signature)}", content=signature,
              headers={"Content-Type": OCI_MANIFEST}).raise_for_status()

    layout = Layout(root / "layout")
    layout.tag("v1", OCI_MANIFEST, layout.image(random.Random(4), n_layers=1, max_file=4096).manifest)

    world = World(registry, {"config": image.config, "manifest": image.manifest}, sha256(image.manifest),
                  sha256(signature), layout, tokens={"othertoken": other, "expired": expiring},
                  expires_at=expires_at, admin=admin)
    # Before it expires, the very same token works: the later refusal is the expiry's doing.
    with registry.client(auth=_Fixed(world.tokens["expired"])) as c:
        assert c.get(f"/v2/{REPO}/manifests/base", headers={"Accept": MANIFEST_ACCEPT}).status_code == 200
    return world


# --------------------------------------------------------------------------- operations over HTTP


def op_pull(w: World, c: httpx.Client, role: str) -> httpx.Response:
    r = c.get(f"/v2/{REPO}/manifests/base", headers={"Accept": MANIFEST_ACCEPT})
    if r.status_code != 200:
        return r
    assert r.content == w.base["manifest"]
    r = c.get(f"/v2/{REPO}/blobs/{sha256(w.base['config'])}")
    if r.status_code == 200:
        assert r.content == w.base["config"]
    return r


def op_push(w: World, c: httpx.Client, role: str) -> httpx.Response:
    image = make_image(n_layers=1, layer_size=256)
    for blob in (image.config, *image.layers):
        r = c.post(f"/v2/{REPO}/blobs/uploads/", params={"digest": sha256(blob)}, content=blob)
        if r.status_code != 201:
            return _unchanged(w, r, lambda: _blob_absent(w, sha256(blob)))
    r = c.put(f"/v2/{REPO}/manifests/push-{role}", content=image.manifest, headers={"Content-Type": OCI_MANIFEST})
    if r.status_code == 201:
        assert w.admin.get(f"/v2/{REPO}/manifests/push-{role}", headers={"Accept": MANIFEST_ACCEPT}).content \
            == image.manifest
    return r


def op_delete(w: World, c: httpx.Client, role: str) -> httpx.Response:
    victim = push_image(w.admin, REPO, f"del-{role}")  # an image of the cell's own
    path = f"/v2/{REPO}/manifests/{victim.digest}"
    r = c.delete(path)
    after = w.admin.get(path, headers={"Accept": MANIFEST_ACCEPT}).status_code
    assert after == (404 if r.status_code == 202 else 200), (r.status_code, after)
    return r


def op_tags(w: World, c: httpx.Client, role: str) -> httpx.Response:
    r = c.get(f"/v2/{REPO}/tags/list")
    if r.status_code == 200:
        assert "base" in r.json()["tags"]
    return r


def op_catalog(w: World, c: httpx.Client, role: str) -> httpx.Response:
    r = c.get("/v2/_catalog", params={"n": 10000})
    if r.status_code == 200:
        seen = set(r.json()["repositories"]) & OURS
        assert seen == CATALOG[role], (role, seen)
    return r


def op_referrers(w: World, c: httpx.Client, role: str) -> httpx.Response:
    r = c.get(f"/v2/{REPO}/referrers/{w.base_digest}")
    if r.status_code == 200:
        assert [m["digest"] for m in r.json()["manifests"]] == [w.referrer_digest]
    return r


def op_useradmin(w: World, c: httpx.Client, role: str) -> httpx.Response:
    r = c.put(f"/_admin/users/made-by-{role}", json={"password": PASSWORD})
    listed = {u["name"] for u in w.admin.get("/_admin/users", auth=("admin", ADMIN_PASSWORD)).json()["users"]}
    assert (f"made-by-{role}" in listed) == (r.status_code == 200), (r.status_code, r.text)
    return r


def op_join(w: World, c: httpx.Client, role: str) -> httpx.Response:
    if role == "admin":
        # A real join, with `moorage join` as the admin: the new replica serves.
        joined = w.joined = Registry(w.registry.data_dir.parent / "joined", storage_dir=w.registry.blob_dir,
                                     join=w.registry.url)
        joined.start(timeout=90)
        status = json.loads(moorage("status", "--existing", w.registry.url, "--json").stdout)
        assert joined.replica_id in json.dumps(status)
        # Every replica verifies every replica's tokens locally: one issued by the first works here.
        with w.registry.client(auth=None) as first:
            token = fetch_token(first, [f"repository:{REPO}:pull"], "admin", ADMIN_PASSWORD).json()["token"]
        with joined.client(auth=_Fixed(token)) as there:
            r = there.get(f"/v2/{REPO}/manifests/base", headers={"Accept": MANIFEST_ACCEPT})
            assert r.status_code == 200 and r.content == w.base["manifest"]
        return httpx.Response(200)
    # Refused before the body is even looked at: an empty one would be a 400 otherwise.
    return c.post("/_admin/cluster/join", json={})


def op_remove(w: World, c: httpx.Client, role: str) -> httpx.Response:
    if role == "admin":
        assert w.joined is not None, "the join cell runs first"
        r = c.delete(f"/_admin/cluster/replicas/{w.joined.replica_id}")
        if r.status_code == 200:
            w.joined.proc.wait(30)  # a removed replica shuts itself down
        return r
    # No such replica: had authorization failed open, this would be a 404.
    return c.delete("/_admin/cluster/replicas/0123456789ab")


def op_config(w: World, c: httpx.Client, role: str) -> httpx.Response:
    return c.put("/_admin/config/log.level", json={"value": "info"})


HTTP_OPS: dict[str, Callable[[World, httpx.Client, str], httpx.Response]] = {
    "pull": op_pull, "push": op_push, "delete": op_delete, "tags": op_tags, "catalog": op_catalog,
    "referrers": op_referrers, "useradmin": op_useradmin, "join": op_join, "remove": op_remove,
    "config": op_config,
}


def _blob_absent(w: World, digest: str) -> bool:
    return w.admin.head(f"/v2/{REPO}/blobs/{digest}").status_code == 404


def _unchanged(w: World, r: httpx.Response, check: Callable[[], bool]) -> httpx.Response:
    assert check(), "a refused write left something behind"
    return r


def expected_refusal(role: str, op: str) -> int:
    if op in ADMIN_OPS:
        # The admin API: a known user who is not a cluster admin is 403, everyone else 401.
        return 403 if role in FORBIDDEN_ROLES else 401
    return 403 if role in FORBIDDEN_ROLES else 401


def assert_refused(r: httpx.Response, role: str, op: str) -> None:
    status = expected_refusal(role, op)
    assert r.status_code == status, (role, op, r.status_code, r.text[:300])
    if op in ADMIN_OPS:
        assert isinstance(r.json().get("error"), str), r.text  # the admin API's error shape
        return
    assert error_codes(r) == (["UNAUTHORIZED"] if status == 401 else ["DENIED"]), r.text
    if status == 401:
        challenge = parse_challenge(r.headers["WWW-Authenticate"])
        assert challenge is not None and challenge["service"] == "moorage", r.headers
        assert challenge["realm"] == f"{w_url(r)}/token"
        scope = "registry:catalog:*" if op == "catalog" else f"repository:{REPO}:"
        assert challenge["scope"].startswith(scope), challenge
        if role == "othertoken":
            assert challenge.get("error") == "insufficient_scope", challenge
        if role == "expired":
            assert challenge.get("error") == "invalid_token" and "expired" in r.text, (challenge, r.text)


def w_url(r: httpx.Response) -> str:
    return f"{r.request.url.scheme}://{r.request.url.netloc.decode()}"


def cells(roles: list[str], ops: list[str]) -> dict:
    pairs = [(role, op) for role in roles for op in ops]
    return {"argnames": "role,op", "argvalues": pairs, "ids": [f"{r}-{o}" for r, o in pairs]}


# Join precedes remove in every row. The expired row runs at the end of the
# module (test_*_after_expiry), so its wait for the token to run out overlaps
# every other test.
BEFORE_EXPIRY = [r for r in ROLES if r != "expired"]


@pytest.mark.parametrize(**cells(BEFORE_EXPIRY, REGISTRY_OPS + ADMIN_OPS))
def test_http(world: World, role: str, op: str):
    client = world.admin_api(role) if op in ADMIN_OPS else world.client(role)
    with client:
        r = HTTP_OPS[op](world, client, role)
    if op in ALLOWED[role]:
        assert r.status_code in (200, 201, 202), (role, op, r.status_code, r.text[:300])
    else:
        assert_refused(r, role, op)


# --------------------------------------------------------------------------- skopeo


def skopeo_creds(w: World, role: str, side: str = "") -> list[str]:
    if role in w.tokens:
        if role == "expired":
            time.sleep(max(0.0, w.expires_at - time.time() + 1))
        return [f"--{side}registry-token", w.tokens[role]]
    user = w.user(role)
    if user is None:
        return [f"--{side}no-creds"]
    return [f"--{side}creds", f"{user}:{ADMIN_PASSWORD if role == 'admin' else w.password(role)}"]


SKOPEO_OPS = ["pull", "push", "delete", "tags"]


@pytest.mark.parametrize(**cells(BEFORE_EXPIRY, SKOPEO_OPS))
def test_skopeo(world: World, role: str, op: str, tmp_path):
    base = f"docker://{world.registry.host}/{REPO}"
    if op == "pull":
        out = skopeo("copy", *tls(base, "src-"), *skopeo_creds(world, role, "src-"), f"{base}:base",
                     f"oci:{tmp_path / 'pulled'}:x", check=False)
        if out.returncode == 0:
            blobs = {p.name for p in (tmp_path / "pulled" / "blobs" / "sha256").iterdir()}
            assert sha256(world.base["config"]).split(":")[1] in blobs
    elif op == "push":
        out = skopeo("copy", *tls(base, "dest-"), *skopeo_creds(world, role, "dest-"),
                     f"oci:{world.layout.path}:v1", f"{base}:sk-{role}", check=False)
        present = world.admin.get(f"/v2/{REPO}/manifests/sk-{role}", headers={"Accept": MANIFEST_ACCEPT})
        assert (present.status_code == 200) == (out.returncode == 0), (present.status_code, out.stderr)
    elif op == "delete":
        victim = push_image(world.admin, REPO, f"skdel-{role}")
        out = skopeo("delete", *tls(base), *skopeo_creds(world, role), f"{base}@{victim.digest}", check=False)
        after = world.admin.get(f"/v2/{REPO}/manifests/{victim.digest}", headers={"Accept": MANIFEST_ACCEPT})
        assert after.status_code == (404 if out.returncode == 0 else 200), (after.status_code, out.stderr)
    else:
        out = skopeo("list-tags", *tls(base), *skopeo_creds(world, role), base, check=False)
        if out.returncode == 0:
            assert "base" in json.loads(out.stdout)["Tags"]
    if op in ALLOWED[role]:
        assert out.returncode == 0, out.stderr
    else:
        assert out.returncode != 0, out.stdout
        # skopeo reports the registry's refusal (401 or 403), not some other failure.
        text = out.stderr.lower()
        assert any(s in text for s in ("unauthorized", "denied", "authentication required",
                                       "invalid username/password", "401", "403")), out.stderr


# --------------------------------------------------------------------------- around the matrix


def test_challenges_say_where_and_what(world: World):
    with world.registry.client(auth=None) as c:
        r = c.get("/v2/")
        assert r.status_code == 401 and error_codes(r) == ["UNAUTHORIZED"]
        challenge = parse_challenge(r.headers["WWW-Authenticate"])
        assert challenge == {"realm": f"{world.registry.url}/token", "service": "moorage"}
        # A valid anonymous token is enough for the version check, as docker expects.
        token = fetch_token(c).json()["token"]
        assert c.get("/v2/", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        r = c.put(f"/v2/{REPO}/manifests/x", content=b"{}", headers={"Content-Type": OCI_MANIFEST})
        assert parse_challenge(r.headers["WWW-Authenticate"])["scope"] == f"repository:{REPO}:pull,push"
        r = c.delete(f"/v2/{REPO}/blobs/{world.base_digest}")
        assert parse_challenge(r.headers["WWW-Authenticate"])["scope"] == f"repository:{REPO}:delete"
        # A Host header that could break out of the quoted realm is not echoed.
        r = c.get("/v2/", headers={"Host": 'evil",x="1'})
        assert 'evil' not in r.headers["WWW-Authenticate"]


def test_anonymous_pulls_public_repositories_only(world: World):
    with world.registry.client(None) as c:
        assert c.get(f"/v2/{PUBLIC}/manifests/v1", headers={"Accept": MANIFEST_ACCEPT}).status_code == 200
        assert c.get(f"/v2/{PUBLIC}/tags/list").json()["tags"] == ["v1"]
        r = c.post(f"/v2/{PUBLIC}/blobs/uploads/")
        assert r.status_code == 401 and error_codes(r) == ["UNAUTHORIZED"]
    # Without any token at all, too (a plain GET, as curl would).
    with world.registry.client(auth=None) as c:
        assert c.get(f"/v2/{PUBLIC}/manifests/v1", headers={"Accept": MANIFEST_ACCEPT}).status_code == 200
        assert c.get(f"/v2/{SECRET}/manifests/v1").status_code == 401


def test_refusals_do_not_reveal_whether_a_repository_exists(world: World):
    with world.registry.client("victim", PASSWORD) as c:  # may read perm/private only
        there = c.get(f"/v2/{SECRET}/manifests/v1")
        missing = c.get("/v2/perm/nothing-here/manifests/v1")
        assert there.status_code == missing.status_code == 403
        # The bodies differ only in the name asked for.
        assert there.text.replace(SECRET, "NAME") == missing.text.replace("perm/nothing-here", "NAME")
    with world.registry.client(auth=None) as c:
        there, missing = c.get(f"/v2/{SECRET}/tags/list"), c.get("/v2/perm/nothing-here/tags/list")
        assert there.status_code == missing.status_code == 401 and there.json() == missing.json()


def test_basic_credentials_are_accepted_directly(world: World):
    with world.registry.client(auth=("reader", PASSWORD)) as c:
        assert c.get(f"/v2/{REPO}/manifests/base", headers={"Accept": MANIFEST_ACCEPT}).status_code == 200
        r = c.delete(f"/v2/{REPO}/manifests/{world.base_digest}")
        assert r.status_code == 403 and error_codes(r) == ["DENIED"]


def test_token_endpoint_grants_the_intersection_and_ignores_junk(world: World):
    with world.registry.client(auth=None) as c:
        r = fetch_token(c, [f"repository:{REPO}:pull,push,delete", f"repository(plugin):{PUBLIC}:pull",
                            "registry:catalog:*", "junk", "repository::pull", "repository:UPPER:pull",
                            "repository:../x:pull", "foo:bar:baz", f"repository:{SECRET}:pull"],
                        "reader", PASSWORD)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["token"] == body["access_token"] and body["expires_in"] == 300 and body["issued_at"]
        access = _claims(body["token"])["access"]
        assert {(a["type"], a["name"], tuple(a["actions"])) for a in access} == {
            ("repository", REPO, ("pull",)), ("repository", PUBLIC, ("pull",)), ("registry", "catalog", ("*",))}
        # A repository's token carries every action its user may do there, whatever was asked:
        # a client that answers a pull's challenge may push with it (oras-py does).
        r = fetch_token(c, [f"repository:{REPO}:pull"], "writer", PASSWORD)
        assert r.status_code == 200 and _claims(r.json()["token"])["access"] == [
            {"type": "repository", "name": REPO, "actions": ["pull", "push"]}]
        # Asking for what one may not have is not an error: an empty grant.
        r = fetch_token(c, [f"repository:{SECRET}:push"], "reader", PASSWORD)
        assert r.status_code == 200 and _claims(r.json()["token"])["access"] == []
        r = fetch_token(c, [f"repository:{REPO}:pull"], "reader", "wrong-password")
        assert r.status_code == 401 and error_codes(r) == ["UNAUTHORIZED"]
        r = c.get("/token", params={"service": "someone-else"})
        assert r.status_code == 400 and error_codes(r)


def test_oauth2_post_with_refresh_tokens(world: World):
    with world.registry.client(auth=None) as c:
        r = c.post("/token", data={"grant_type": "password", "username": "writer", "password": PASSWORD,
                                   "scope": f"repository:{REPO}:pull,push registry:catalog:*",
                                   "service": "moorage", "client_id": "test", "access_type": "offline"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["scope"] == f"repository:{REPO}:pull,push registry:catalog:*"
        refresh, access = body["refresh_token"], body["access_token"]
        r = c.post("/token", data={"grant_type": "refresh_token", "refresh_token": refresh,
                                   "scope": f"repository:{REPO}:pull", "client_id": "test"})
        assert r.status_code == 200 and "refresh_token" not in r.json()
        assert _claims(r.json()["access_token"])["sub"] == "writer"
        # Neither kind of token stands in for the other.
        r = c.post("/token", data={"grant_type": "refresh_token", "refresh_token": access, "client_id": "t"})
        assert r.status_code == 401 and r.json()["error"] == "invalid_grant"
        assert c.get("/v2/", headers={"Authorization": f"Bearer {refresh}"}).status_code == 401
        r = c.post("/token", data={"grant_type": "password", "username": "writer", "password": "nope-nope"})
        assert r.status_code == 401 and error_codes(r) == ["UNAUTHORIZED"]
        r = c.post("/token", data={"grant_type": "client_credentials"})
        assert r.status_code == 400 and r.json()["error"] == "unsupported_grant_type"


def test_revoking_a_grant_applies_to_tokens_already_issued(world: World):
    with world.registry.client(auth=("admin", ADMIN_PASSWORD)) as api, \
            world.registry.client("fleeting", PASSWORD) as c:
        api.put("/_admin/users/fleeting", json={"password": PASSWORD}).raise_for_status()
        api.put("/_admin/grants", json={"user": "fleeting", "repo": REPO, "role": "read"}).raise_for_status()
        url = f"/v2/{REPO}/manifests/base"
        assert c.get(url, headers={"Accept": MANIFEST_ACCEPT}).status_code == 200
        token = c.auth.tokens[(f"repository:{REPO}:pull",)]
        api.request("DELETE", "/_admin/grants", json={"user": "fleeting", "repo": REPO}).raise_for_status()
        r = c.get(url, headers={"Authorization": f"Bearer {token}"}, auth=None)
        assert r.status_code == 403 and error_codes(r) == ["DENIED"]
        api.delete("/_admin/users/fleeting").raise_for_status()
        r = c.get(url, headers={"Authorization": f"Bearer {token}"}, auth=None)
        assert r.status_code == 401 and error_codes(r) == ["UNAUTHORIZED"]


def test_mount_needs_pull_on_the_source_else_a_plain_upload(world: World):
    with world.registry.client("writer", PASSWORD) as c:  # may push perm/private, may not read perm/secret
        config = sha256(world.base["config"])
        secret_config = sha256(make_image().config)  # any digest: the answer must not depend on it
        for digest in (config, secret_config):
            r = c.post(f"/v2/{REPO}/blobs/uploads/", params={"mount": digest, "from": SECRET})
            assert r.status_code == 202 and "Location" in r.headers, (r.status_code, r.text)


def test_failed_logins_are_slowed_down(world: World):
    transport = httpx.HTTPTransport(verify=world.registry.ssl_context(), local_address="127.0.0.250")
    with world.registry.client(auth=None, transport=transport) as c:
        for _ in range(5):
            assert fetch_token(c, (), "victim", "wrong-password").status_code == 401
        r = fetch_token(c, (), "victim", PASSWORD)  # even the right password waits now
        assert r.status_code == 429 and error_codes(r) == ["TOOMANYREQUESTS"], r.text
        wait = int(r.headers["Retry-After"])
        assert 1 <= wait <= 300
        r = c.get("/_admin/users", auth=("victim", PASSWORD))
        assert r.status_code == 429 and "Retry-After" in r.headers
        time.sleep(wait + 0.1)
        assert fetch_token(c, (), "victim", PASSWORD).status_code == 200
        # The success reset the count: one more failure is a plain 401 again.
        assert fetch_token(c, (), "victim", "wrong-password").status_code == 401
    with world.registry.client(auth=None) as c:  # another address was never slowed down
        assert fetch_token(c, (), "victim", PASSWORD).status_code == 200


def _claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


# --------------------------------------------------------------------------- the expired row, last


@pytest.mark.parametrize(**cells(["expired"], REGISTRY_OPS + ADMIN_OPS))
def test_http_after_expiry(world: World, role: str, op: str):
    test_http(world, role, op)


@pytest.mark.parametrize(**cells(["expired"], SKOPEO_OPS))
def test_skopeo_after_expiry(world: World, role: str, op: str, tmp_path):
    test_skopeo(world, role, op, tmp_path)
