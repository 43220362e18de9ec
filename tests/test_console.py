"""The web console in a real browser: Debian's Chromium driven by Playwright, against a cluster of three.

Everything a person does is done by clicking and typing in the page; what
it changed is then checked through the registry's own APIs and clients
(skopeo runs the pull command the page shows, exactly as shown). Every page
is checked by axe-core, and screenshots of each land in
build/console-screenshots/ (the best are copied to docs/console/).
"""

from __future__ import annotations

import base64
import json
import random
import re
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from moorage.meta.records import ManifestRecord, decoder

from browser import axe_violations, launch, new_context, screenshot, sign_in
from conftest import ADMIN_PASSWORD, Cluster, Registry, free_port, moorage, scratch, wait_for
from layout import Layout
from oci import (OCI_EMPTY, OCI_INDEX, OCI_MANIFEST, canonical, descriptor, make_image, push_blob, push_image,
                 push_manifest, sha256)

pytestmark = pytest.mark.console

READER, READER_PASSWORD = "reader", "reader-long-password"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SCRIPT = "<script>window.__pwned = 'script'</script>"
IMG = '"><img src=x onerror="window.__pwned = \'img\'">'
SBOM_TYPE = "application/spdx+json"


class Content:
    """What the tests browse, pushed once: by skopeo, as an artifact, and over the API."""

    def __init__(self, reg: Registry, tmp: Path):
        rng = random.Random(14)
        layout = Layout(tmp / "layout")
        amd, arm = layout.image(rng, arch="amd64"), layout.image(rng, arch="arm64", variant="v8")
        index = layout.index([amd, arm])
        layout.tag("1.0", OCI_MANIFEST, amd.manifest)
        layout.tag("multi", OCI_INDEX, index)
        for tag in ("1.0", "multi"):
            skopeo("copy", "--all", "--dest-cert-dir", str(reg.cert_dir), "--dest-creds", f"admin:{ADMIN_PASSWORD}",
                   f"oci:{layout.path}:{tag}", f"docker://{reg.host}/demo/hello:{tag}")
        self.image, self.index_digest = amd, sha256(index)
        self.layers = [sha256(layer) for layer in amd.layers]
        # An SBOM whose subject is the image: an artifact, as oras attaches one.
        with reg.client() as c:
            sbom, empty = b'{"spdxVersion": "SPDX-2.3", "name": "hello"}', b"{}"
            push_blob(c, "demo/hello", sbom)
            push_blob(c, "demo/hello", empty)
            artifact = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": SBOM_TYPE,
                        "config": descriptor(OCI_EMPTY, empty), "layers": [descriptor(SBOM_TYPE, sbom)],
                        "subject": descriptor(OCI_MANIFEST, amd.manifest)}
            self.sbom = push_manifest(c, "demo/hello", sha256(canonical(artifact)), artifact)
            push_image(c, "secret/app", "v1")
        moorage("user", "add", READER, "--password-file", str(_file(tmp / "reader.pw", READER_PASSWORD)),
                "--existing", reg.url)
        moorage("perm", "grant", "--user", READER, "--repo", "demo/*", "--role", "read", "--existing", reg.url)


def _file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def skopeo(*args: str, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120, **kw)
    assert out.returncode == 0, f"skopeo {' '.join(args)}:\n{out.stderr}"
    return out


# -- fixtures: one cluster of three, one browser, for the whole module ------------------------

@pytest.fixture(scope="module")
def cluster3(request) -> Iterator[Cluster]:
    c = Cluster(scratch(request, "console"))
    first = c.start_first()
    c.join(first)
    c.join(first)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def reg(cluster3) -> Registry:
    return cluster3.replicas[0]


@pytest.fixture(scope="module")
def content(reg, request) -> Content:
    return Content(reg, scratch(request, "content"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = launch(p)
        yield b
        b.close()


@pytest.fixture(scope="module")
def admin(browser, reg, content) -> Iterator[Page]:
    """A browser tab signed in as admin, shared by the module's tests."""
    context = new_context(browser)
    page = context.new_page()
    sign_in(page, reg.url, "admin", ADMIN_PASSWORD)
    yield page
    context.close()


@pytest.fixture
def reader(browser, reg, content) -> Iterator[Page]:
    context = new_context(browser)
    page = context.new_page()
    sign_in(page, reg.url, READER, READER_PASSWORD)
    yield page
    context.close()


def admin_api(reg: Registry, user: str = "admin", password: str = ADMIN_PASSWORD) -> httpx.Client:
    return httpx.Client(base_url=reg.url, auth=(user, password), verify=reg.ssl_context(), timeout=30)


def csrf_of(page: Page) -> str:
    return page.locator("input[name=csrf]").first.input_value()


# -- what must be shown ---------------------------------------------------------------------

def test_find_a_skopeo_pushed_image_its_layers_and_referrer_then_pull_as_shown(admin, reg, content, tmp_path):
    page = admin
    page.goto(f"{reg.url}/console/")
    page.get_by_label("Search repositories").fill("hello")
    page.get_by_role("button", name="Search").click()
    page.get_by_role("link", name="demo/hello").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("demo/hello")
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name="multi", exact=True))
    expect(row).to_contain_text("linux/amd64")
    expect(row).to_contain_text("linux/arm64/v8")
    expect(row.get_by_role("cell").nth(5)).to_have_text("admin")  # who pushed it (skopeo, as admin)
    page.get_by_role("link", name="1.0", exact=True).click()

    expect(page.get_by_role("heading", level=1)).to_have_text("demo/hello:1.0")
    layers = page.locator("section", has=page.get_by_role("heading", name="Layers")).locator("tbody tr")
    expect(layers).to_have_count(1 + len(content.layers))  # the config, then each layer
    for i, digest in enumerate(content.layers, start=1):
        expect(layers.nth(i)).to_contain_text(digest[:19])
    referrers = page.locator("section", has=page.get_by_role("heading", name="Referrers"))
    expect(referrers.get_by_role("heading", name=re.compile("SBOMs"))).to_contain_text(SBOM_TYPE)
    expect(referrers.get_by_role("link", name=content.sbom[:19])).to_be_visible()
    expect(page.locator("pre.json")).to_contain_text(content.layers[0])
    screenshot(page, "image")

    # The referrer's own page names the image as its subject.
    referrers.get_by_role("link", name=content.sbom[:19]).click()
    expect(page.get_by_role("link", name=content.image.digest)).to_be_visible()
    page.go_back()

    # The skopeo command, run exactly as shown, with the CA and credentials where skopeo looks for them.
    command = page.get_by_label("Pull with skopeo").input_value()
    assert command == f"skopeo copy docker://{reg.host}/demo/hello:1.0 oci:hello:1.0", command
    home = tmp_path / "home"
    certs = home / ".config" / "containers" / "certs.d" / reg.host
    certs.mkdir(parents=True)
    (certs / "ca.crt").write_bytes(reg.ca.read_bytes())
    auth = {"auths": {reg.host: {"auth": base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()}}}
    (tmp_path / "auth.json").write_text(json.dumps(auth))
    skopeo(*command.split()[1:], cwd=tmp_path,
           env={"HOME": str(home), "REGISTRY_AUTH_FILE": str(tmp_path / "auth.json"), "PATH": "/usr/bin:/bin"})
    pulled = json.loads((tmp_path / "hello" / "index.json").read_text())
    assert [m["digest"] for m in pulled["manifests"]] == [content.image.digest]


def test_admin_deletes_a_tag_and_the_api_no_longer_has_it(admin, reg, content):
    with reg.client() as c:
        push_image(c, "demo/hello", "doomed", make_image())
        assert c.get("/v2/demo/hello/manifests/doomed", headers={"Accept": OCI_MANIFEST}).status_code == 200
    page = admin
    page.goto(f"{reg.url}/console/r/demo/hello")
    page.once("dialog", lambda dialog: dialog.accept())  # "Delete tag doomed from demo/hello?"
    page.get_by_role("button", name="Delete doomed").click()
    expect(page.get_by_role("status")).to_have_text("Deleted tag doomed from demo/hello.")
    expect(page.get_by_role("link", name="doomed", exact=True)).to_have_count(0)
    with reg.client() as c:
        assert c.get("/v2/demo/hello/manifests/doomed", headers={"Accept": OCI_MANIFEST}).status_code == 404
        assert "doomed" not in c.get("/v2/demo/hello/tags/list").json()["tags"]
    with admin_api(reg) as api:  # audited as the API's own DELETE
        events = api.get("/_admin/audit", params={"kind": "write", "repo": "demo/hello"}).json()["events"]
    assert any(e["method"] == "DELETE" and e["path"] == "/v2/demo/hello/manifests/doomed" and e["user"] == "admin"
               and e["status"] == 202 for e in events), events


def test_a_reader_sees_no_admin_page_and_the_admin_api_refuses_them(reader, reg, content):
    page = reader
    nav = page.get_by_role("navigation", name="Main")
    expect(nav.get_by_role("link")).to_have_text(["Repositories"])
    expect(page.get_by_role("link", name="demo/hello")).to_be_visible()
    expect(page.get_by_role("link", name="secret/app")).to_have_count(0)  # not theirs to pull
    page.goto(f"{reg.url}/console/r/demo/hello")
    expect(page.get_by_role("button", name=re.compile("^Delete"))).to_have_count(0)
    expect(page.get_by_label("Visibility")).to_have_count(0)
    for path in ("/console/cluster", "/console/users", "/console/settings", "/console/gc", "/console/audit",
                 "/console/cluster.json", "/console/r/secret/app"):
        response = page.goto(f"{reg.url}{path}")
        assert response is not None and response.status == 403, (path, response and response.status)
    expect(page.get_by_role("heading", level=1)).to_have_text("Not allowed")
    # The server refuses what the page does not offer, even with the reader's own valid CSRF token.
    page.goto(f"{reg.url}/console/")
    token = csrf_of(page)
    refused = page.request.post(f"{reg.url}/console/r/demo/hello/-/delete", form={"csrf": token, "tag": "1.0"},
                                headers={"Origin": reg.url})
    assert refused.status == 403, refused.status
    refused = page.request.post(f"{reg.url}/console/users/add-user", headers={"Origin": reg.url},
                                form={"csrf": token, "name": "mallory", "password": "mallory-password"})
    assert refused.status == 403, refused.status
    with reg.client() as c:
        assert c.get("/v2/demo/hello/manifests/1.0", headers={"Accept": OCI_MANIFEST}).status_code == 200
    with admin_api(reg, READER, READER_PASSWORD) as api:
        assert api.get("/_admin/cluster/status").status_code == 403
        assert api.get("/_admin/users").status_code == 403
        assert api.put("/_admin/users/mallory", json={"password": "mallory-password"}).status_code == 403
    screenshot(page, "reader-repositories")


def test_payloads_in_labels_annotations_and_tags_render_as_text(admin, reg, content):
    config = canonical({"architecture": "amd64", "os": "linux", "config": {"Labels": {"evil": SCRIPT, "img": IMG}},
                        "rootfs": {"type": "layers", "diff_ids": []}})
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": descriptor("application/vnd.oci.image.config.v1+json", config), "layers": [],
                "annotations": {"org.opencontainers.image.description": SCRIPT, "x.img": IMG}}
    with reg.client() as c:
        push_blob(c, "demo/xss", config)
        digest = push_manifest(c, "demo/xss", "v1", manifest)
        # No tag can hold them: the registry refuses such a tag outright.
        bad = c.put("/v2/demo/xss/manifests/%3Cscript%3E", content=canonical(manifest),
                    headers={"Content-Type": OCI_MANIFEST})
        assert bad.status_code == 400, bad.text
    with httpx.Client(base_url=reg.url, verify=reg.ssl_context(), headers={"User-Agent": IMG}) as anonymous:
        assert anonymous.get("/v2/demo/xss/tags/list").status_code == 401  # audited (challenged), with its agent

    page = admin
    dialogs: list[str] = []

    def on_dialog(dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.goto(f"{reg.url}/console/r/demo/xss/-/manifest/{digest}")
    expect(page.locator("section", has=page.get_by_role("heading", name="Labels"))).to_contain_text(SCRIPT)
    expect(page.get_by_role("main")).to_contain_text(IMG)
    checks = [f"{reg.url}/console/r/demo/xss/-/manifest/{digest}", f"{reg.url}/console/?q={SCRIPT}",
              f"{reg.url}/console/r/demo/xss?q={IMG}", f"{reg.url}/console/r/demo/xss/-/manifest/{SCRIPT}",
              f"{reg.url}/console/audit?repo=demo/xss&kind=challenged"]
    for url in checks:
        page.goto(url)
        assert page.evaluate("window.__pwned") is None, url
        assert page.locator('img[src="x"]').count() == 0, url
    expect(page.get_by_role("main")).to_contain_text(IMG)  # the audit log shows the User-Agent, as text
    page.goto(f"{reg.url}/console/?q={SCRIPT}")
    expect(page.get_by_label("Search repositories")).to_have_value(SCRIPT)
    page.remove_listener("dialog", on_dialog)
    assert dialogs == []


def test_a_cross_site_form_post_is_refused(admin, reg, content):
    # Another site (another loopback address) whose page posts a form to the console on load.
    target = f"{reg.url}/console/r/demo/hello/-/delete"

    class Attacker(BaseHTTPRequestHandler):
        def do_GET(self):
            body = (f'<!doctype html><title>win a prize</title><form id="f" method="post" action="{target}">'
                    '<input name="tag" value="1.0"></form><script>document.getElementById("f").submit()</script>')
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.2", free_port()), Attacker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page = admin.context.new_page()  # the admin's own browser, signed in
        with page.expect_response(target) as posted:
            page.goto(f"http://127.0.0.2:{server.server_port}/")
        assert posted.value.status in (401, 403), posted.value.status
        page.close()
    finally:
        server.shutdown()
    # Even with the admin's session cookie in hand: no token, or another Origin, is refused.
    admin.goto(f"{reg.url}/console/")
    token = csrf_of(admin)
    request = admin.context.request
    for form, headers in (({"tag": "1.0"}, {"Origin": reg.url}),
                          ({"tag": "1.0", "csrf": "forged"}, {"Origin": reg.url}),
                          ({"tag": "1.0", "csrf": token}, {"Origin": "https://evil.example"}),
                          ({"tag": "1.0", "csrf": token}, {"Origin": "null"})):
        response = request.post(target, form=form, headers=headers)
        assert response.status == 403, (form, headers, response.status)
    with reg.client() as c:
        assert c.get("/v2/demo/hello/manifests/1.0", headers={"Accept": OCI_MANIFEST}).status_code == 200


def test_cookie_flags_and_security_headers(admin, reg, content):
    cookies = {c["name"]: c for c in admin.context.cookies()}
    session = cookies["__Host-moorage-session"]
    assert session["httpOnly"] and session["secure"] and session["sameSite"] == "Strict", session
    assert session["path"] == "/" and not session["domain"].startswith("."), session
    response = admin.goto(f"{reg.url}/console/")
    assert response is not None
    headers = response.headers
    assert headers["content-security-policy"] == CSP
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-store"
    # The raw Set-Cookie of a sign-in, as a client without a browser sees it.
    with httpx.Client(base_url=reg.url, verify=reg.ssl_context()) as c:
        form = c.get("/console/sign-in")
        token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        signed_in = c.post("/console/sign-in", headers={"Origin": reg.url},
                           data={"csrf": token, "username": "admin", "password": ADMIN_PASSWORD,
                                 "next": "//evil.example/console/"})
        assert signed_in.status_code == 303, signed_in.text
        assert signed_in.headers["location"] == "/console/"  # never elsewhere
        cookie = next(v for v in signed_in.headers.get_list("set-cookie") if v.startswith("__Host-moorage-session="))
        assert {"HttpOnly", "Secure", "SameSite=Strict", "Path=/"} <= {p.strip() for p in cookie.split(";")}, cookie
        assert "Domain" not in cookie and "Max-Age=300" in cookie  # token.lifetime_seconds
        js = c.get(re.search(r'src="(/console/static/console\.js\?v=\w+)"', form.text).group(1))
        assert js.headers["content-type"].startswith("text/javascript") and "innerHTML" not in js.text


def test_a_removed_user_is_signed_out_at_once(browser, reg, content, tmp_path):
    moorage("user", "add", "temp", "--password-file", str(_file(tmp_path / "pw", "temporary-password")),
            "--existing", reg.url)
    moorage("perm", "grant", "--user", "temp", "--repo", "demo/*", "--role", "read", "--existing", reg.url)
    context = new_context(browser)
    page = context.new_page()
    sign_in(page, reg.url, "temp", "temporary-password")
    expect(page.get_by_role("link", name="demo/hello")).to_be_visible()
    moorage("user", "remove", "temp", "--existing", reg.url)
    page.goto(f"{reg.url}/console/r/demo/hello")
    expect(page).to_have_url(re.compile(r"/console/sign-in\?next="))
    expect(page.get_by_role("heading", level=1)).to_have_text("Sign in to Moorage")
    context.close()


def test_signing_out_revokes_the_session_on_every_replica(reader, cluster3, reg):
    cookie = {c["name"]: c["value"] for c in reader.context.cookies()}["__Host-moorage-session"]
    other = cluster3.replicas[1]

    def status_with(registry: Registry) -> int:
        with httpx.Client(base_url=registry.url, verify=registry.ssl_context(),
                          cookies={"__Host-moorage-session": cookie}) as c:
            return c.get("/console/").status_code

    assert status_with(reg) == 200 and status_with(other) == 200  # any replica serves any session
    reader.get_by_role("button", name="Sign out").click()
    expect(reader.get_by_role("status")).to_have_text("You are signed out.")
    assert "__Host-moorage-session" not in {c["name"] for c in reader.context.cookies()}
    assert status_with(reg) == 303  # a copy of the cookie is worthless now, here and elsewhere
    wait_for(lambda: status_with(other) == 303, 5, "the sign-out to reach another replica")


def test_failed_sign_ins_are_slowed_down_and_audited(browser, reg, content):
    context = new_context(browser)
    page = context.new_page()
    page.goto(f"{reg.url}/console/sign-in")
    statuses = []
    for _ in range(6):
        page.get_by_label("User name").fill("admin-typo")
        page.get_by_label("Password").fill("wrong-password")
        with page.expect_response(f"{reg.url}/console/sign-in") as answer:
            page.get_by_role("button", name="Sign in").click()
        statuses.append(answer.value.status)
    assert statuses == [401] * 5 + [429], statuses
    expect(page.get_by_role("alert")).to_contain_text("too many failed logins")
    screenshot(page, "sign-in-refused", full_page=False)
    context.close()
    with admin_api(reg) as api:
        events = api.get("/_admin/audit", params={"kind": "login-failed", "user": "admin-typo"}).json()["events"]
    assert len(events) >= 5 and all(e["path"] == "/console/sign-in" for e in events), events


def test_settings_are_validated_as_the_cli_does_with_the_error_beside_the_field(admin, reg, content):
    cli = moorage("config", "set", "token.lifetime_seconds", "ten", "--existing", reg.url, check=False)
    assert cli.returncode != 0
    page = admin
    page.goto(f"{reg.url}/console/settings")
    field = page.get_by_label("token.lifetime_seconds")
    field.fill("ten")
    page.get_by_role("row").filter(has=field).get_by_role("button", name="Save").click()
    error = page.get_by_role("row").filter(has=page.get_by_label("token.lifetime_seconds")).get_by_role("alert")
    expect(error).to_be_visible()
    assert error.inner_text() in cli.stderr, (error.inner_text(), cli.stderr)
    expect(page.get_by_label("token.lifetime_seconds")).to_have_attribute("aria-invalid", "true")
    screenshot(page, "settings-error")
    field = page.get_by_label("gc.grace_seconds")
    field.fill("1800")
    page.get_by_role("row").filter(has=field).get_by_role("button", name="Save").click()
    expect(page.get_by_role("status")).to_have_text("gc.grace_seconds is now 1800.")
    assert moorage("config", "get", "gc.grace_seconds", "--existing", reg.url).stdout.strip() == "1800"
    page.get_by_role("row").filter(has=page.get_by_label("gc.grace_seconds")).get_by_role(
        "button", name="Reset").click()
    expect(page.get_by_role("status")).to_have_text("gc.grace_seconds is back to its default.")


def test_users_teams_grants_and_what_a_user_may_do(admin, reg, content):
    page = admin
    page.goto(f"{reg.url}/console/users")
    add = page.locator("form[action='/console/users/add-user']")
    add.get_by_label("Name").fill("carol")
    add.get_by_label("Password").fill("short")
    add.get_by_role("button", name="Add user").click()
    expect(page.locator("#add-user-password-error")).to_contain_text("too short")
    add = page.locator("form[action='/console/users/add-user']")
    add.get_by_label("Password").fill("carol-long-password")
    add.get_by_role("button", name="Add user").click()
    expect(page.get_by_role("status")).to_have_text("Added the user carol.")
    page.get_by_label("Team name").fill("builders")
    page.get_by_role("button", name="Create team").click()
    page.get_by_label("User to add to builders").select_option("carol")
    page.get_by_role("button", name="Add to builders").click()
    expect(page.get_by_role("status")).to_have_text("Added carol to builders.")
    grant = page.locator("form[action='/console/users/grant']")
    grant.get_by_label("To a").select_option("team")
    grant.get_by_label("Named").fill("builders")
    grant.get_by_label("Repositories").fill("ci/*")
    grant.get_by_label("Role").select_option("write")
    grant.get_by_role("button", name="Grant").click()
    expect(page.get_by_role("status")).to_have_text("Granted write on ci/* to builders.")
    check = page.get_by_role("region", name="What may a user do?")
    check.get_by_label("User").fill("carol")
    check.get_by_label("Repository").fill("ci/app")
    check.get_by_role("button", name="Check").click()
    expect(page.locator("#check-result")).to_have_text("carol may pull, push on ci/app.")
    screenshot(page, "users")
    with admin_api(reg) as api:  # the same answer as the admin API gives
        assert api.get("/_admin/access", params={"user": "carol", "repo": "ci/app"}).json()["actions"] == [
            "pull", "push"]
    page.get_by_label("New password for carol").fill("carol-new-password")
    page.get_by_role("button", name="Set password for carol").click()
    expect(page.get_by_role("status")).to_have_text("Set a new password for carol.")
    with admin_api(reg, "carol", "carol-new-password") as api:  # the new password is hers now (not an admin)
        assert api.get("/_admin/users").status_code == 403
    page.get_by_role("button", name="Revoke write on ci/* from builders").click()
    expect(page.get_by_role("status")).to_have_text("Revoked the grant on ci/* of the team builders.")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Remove carol", exact=True).click()
    expect(page.get_by_role("status")).to_have_text("Removed the user carol.")
    with admin_api(reg) as api:
        assert "carol" not in [u["name"] for u in api.get("/_admin/users").json()["users"]]
        assert api.get("/_admin/grants", params={"team": "builders"}).json()["grants"] == []


def test_an_admin_makes_a_repository_public_from_its_page(admin, reg, content):
    with reg.client() as c:
        push_image(c, "demo/opened", "v1", make_image(n_layers=1, layer_size=64))
    with reg.client(user=None) as anonymous:
        assert anonymous.get("/v2/demo/opened/tags/list").status_code == 401
    page = admin
    page.goto(f"{reg.url}/console/r/demo/opened")
    page.get_by_label("Visibility").select_option("public")
    page.get_by_role("button", name="Change").click()
    expect(page.get_by_role("status")).to_have_text("demo/opened is now public.")
    expect(page.locator(".facts .pill")).to_have_text("public")
    with reg.client(user=None) as anonymous:  # the registry's own rule now lets anyone pull it
        assert anonymous.get("/v2/demo/opened/tags/list").json()["tags"] == ["v1"]


def test_garbage_collection_dry_run_with_progress_and_history(admin, reg, content):
    page = admin
    page.goto(f"{reg.url}/console/gc")
    page.get_by_role("button", name="Start a dry run").click()
    expect(page.get_by_role("status")).to_contain_text("Started a dry run (run ")
    run_id = re.search(r"run ([0-9A-Za-z-]+)\)", page.get_by_role("status").inner_text()).group(1)
    row = page.locator(f'tr[data-run="{run_id}"]')
    expect(row).to_contain_text("dry run")
    expect(row.locator('[data-field="state"]')).to_have_text("done", timeout=30_000)  # the page follows it
    screenshot(page, "gc")


def test_audit_log_filters_and_pages(admin, reg, content):
    with reg.client() as c:
        for i in range(30):  # 90 writes: more than a page
            push_image(c, "audit/paged", f"t{i}", make_image(n_layers=1, layer_size=64))
    page = admin
    page.goto(f"{reg.url}/console/audit")
    page.get_by_label("Repository").fill("audit/paged")
    page.get_by_label("Kind").select_option("write")
    page.get_by_role("button", name="Filter").click()
    rows = page.locator("table.audit tbody tr")
    expect(rows).to_have_count(50)
    expect(rows.first).to_contain_text("PUT /v2/audit/paged/manifests/t29")
    first_page = rows.all_inner_texts()
    page.get_by_role("link", name="Older").click()
    expect(rows).to_have_count(40)
    assert not set(rows.all_inner_texts()) & set(first_page)
    expect(rows.last).to_contain_text("/v2/audit/paged/blobs/uploads/")
    page.get_by_label("Since (UTC)").fill("yesterday")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#audit-since-error")).to_contain_text("since takes epoch seconds or an ISO 8601 time")


def test_repositories_search_sort_and_paging_show_only_what_the_user_may_pull(browser, reg, content):
    with reg.client() as c:
        for i in range(30):
            push_image(c, f"demo/many-{i:02d}", "v1", make_image(n_layers=1, layer_size=64))
    context = new_context(browser)
    page = context.new_page()
    sign_in(page, reg.url, READER, READER_PASSWORD, then="/console/?q=many&per=25")
    names = page.locator("table.data tbody th a")
    expect(names).to_have_count(25)
    expect(names.first).to_have_text("demo/many-00")
    expect(page.get_by_role("navigation", name="Repository pages")).to_contain_text("1–25 of 30")
    page.get_by_role("link", name="Next").click()
    expect(names).to_have_count(5)
    expect(names.last).to_have_text("demo/many-29")
    page.get_by_role("link", name=re.compile("^Name")).click()  # now descending
    expect(names.first).to_have_text("demo/many-29")
    page.goto(f"{reg.url}/console/?q=app")
    expect(page.get_by_role("main")).to_contain_text("No repository you may pull")  # secret/app is not theirs
    context.close()


def test_every_page_passes_axe_and_is_photographed(browser, admin, reg, content):
    context = new_context(browser)
    page = context.new_page()
    pages = {}
    page.goto(f"{reg.url}/console/sign-in")
    pages["sign-in"] = axe_violations(page)
    screenshot(page, "sign-in", full_page=False)
    sign_in(page, reg.url, "admin", ADMIN_PASSWORD)
    for name, path in (("repositories", "/console/"), ("repository", "/console/r/demo/hello"),
                       ("untagged", "/console/r/demo/hello?view=untagged"),
                       ("image", f"/console/r/demo/hello/-/manifest/{content.image.digest}"),
                       ("index", f"/console/r/demo/hello/-/manifest/{content.index_digest}"),
                       ("referrer", f"/console/r/demo/hello/-/manifest/{content.sbom}"),
                       ("cluster", "/console/cluster"), ("users", "/console/users"),
                       ("settings", "/console/settings"), ("gc", "/console/gc"), ("audit", "/console/audit"),
                       ("not-found", "/console/r/demo/nothing-here/-/manifest/sha256:" + "0" * 64)):
        page.goto(f"{reg.url}{path}")
        if name == "repository":
            page.locator("details.pull summary").first.click()  # the copy-able commands open
        pages[name] = axe_violations(page)
        screenshot(page, name, full_page=name not in ("repositories", "audit"))
    page.set_viewport_size({"width": 390, "height": 844})  # a phone
    page.goto(f"{reg.url}/console/r/demo/hello")
    pages["repository-narrow"] = axe_violations(page)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # only the table scrolls sideways
    screenshot(page, "repository-narrow")
    context.close()
    dark = new_context(browser, color_scheme="dark")  # the same pages for people who asked for dark
    page = dark.new_page()
    sign_in(page, reg.url, "admin", ADMIN_PASSWORD)
    for name, path in (("repositories", "/console/"), ("image", f"/console/r/demo/hello/-/manifest/{content.sbom}"),
                       ("cluster", "/console/cluster"), ("settings", "/console/settings")):
        page.goto(f"{reg.url}{path}")
        pages[f"{name}-dark"] = axe_violations(page)
    screenshot(page, "settings-dark", full_page=False)
    dark.close()
    assert {name: found for name, found in pages.items() if found} == {}


def test_a_killed_replica_turns_red_on_the_cluster_page_within_3_seconds(admin, cluster3, reg):
    page = admin
    page.goto(f"{reg.url}/console/cluster")
    victim = cluster3.replicas[2]
    row = page.locator(f'tr[data-replica="{victim.replica_id}"]')
    expect(row.locator(".health")).to_have_text("healthy")
    expect(page.locator("#cluster-warnings")).not_to_contain_text("is down")
    victim.kill9()
    killed = time.monotonic()
    expect(row.locator(".health")).to_have_text("down", timeout=3000)
    took = time.monotonic() - killed
    print(f"the killed replica turned red {took:.2f} s after SIGKILL")
    assert took < 3.0, took
    expect(page.locator("#cluster-warnings")).to_contain_text(f"Replica {victim.replica_id} is down")
    expect(page.locator('[data-field="tolerates"]')).to_have_text("0 failures")
    screenshot(page, "cluster-replica-down")


def test_over_insecure_http_on_loopback_the_cookie_cannot_be_secure_but_is_otherwise_the_same(browser, tmp_path):
    plain = Registry(tmp_path / "data", extra_args=["--insecure-http"]).start()
    try:
        root = httpx.get(f"{plain.url}/", follow_redirects=False)
        assert root.status_code == 302 and root.headers["location"] == "/console/"
        assert '<a href="/console/">' in root.text  # `/` links to the console
        context = new_context(browser)
        page = context.new_page()
        sign_in(page, plain.url, "admin", ADMIN_PASSWORD)
        expect(page.get_by_role("heading", level=1)).to_have_text("Repositories")
        cookies = {c["name"]: c for c in context.cookies()}
        session = cookies["moorage-session"]  # no __Host- prefix: that needs Secure
        assert session["httpOnly"] and session["sameSite"] == "Strict" and not session["secure"], session
        context.close()
    finally:
        plain.stop()


def test_manifest_records_from_before_pushers_were_recorded_still_read():
    old = b'{"media_type": "application/vnd.oci.image.manifest.v1+json", "size": 2, "created": 1.5, "blobs": []}'
    record = decoder(ManifestRecord).decode(old)
    assert record.pushed_by is None and record.created == 1.5
