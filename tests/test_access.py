"""Users, teams, grants and visibility: the access model through its CLI and admin API.

Every decision is read back from a real replica (`moorage perm check`, the
admin API's /_admin/access), which answers from the in-memory model its etcd
watch keeps: what is asserted here is what the /v2 enforcement sees.
"""

from __future__ import annotations

import json
import uuid

import pytest

from conftest import ADMIN_PASSWORD, moorage

pytestmark = pytest.mark.security


def _id() -> str:
    return uuid.uuid4().hex[:8]


def cli(registry, *args: str, check: bool = True, json_out: bool = False):
    out = moorage(*args, "--existing", registry.url, *(["--json"] if json_out else []), check=check)
    return json.loads(out.stdout) if json_out and check else out


def actions(registry, repo: str, user: str | None = None) -> list[str]:
    """What `user` (None: anonymous) may do to `repo`, as the replica's Access decides it."""
    with admin_http(registry) as admin:
        r = admin.get("/_admin/access", params={"repo": repo, **({"user": user} if user else {})})
        assert r.status_code == 200, r.text
        return r.json()["actions"]


@pytest.fixture
def password_file(tmp_path):
    path = tmp_path / "password"
    path.write_text("correct horse battery\n")
    return path


def add_user(registry, name: str, password_file, *extra: str) -> None:
    cli(registry, "user", "add", name, "--password-file", str(password_file), *extra)


def admin_http(registry, **kw):
    """The admin API keeps HTTP Basic, whatever /v2 uses."""
    return registry.client(auth=kw.pop("auth", ("admin", ADMIN_PASSWORD)), **kw)


def fails(out, *fragments: str) -> str:
    """A refused command: exit 1 and one sentence on stderr that says why."""
    assert out.returncode == 1, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moorage: "), out.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_grants_match_exact_namespace_and_union_with_teams(registry, password_file):
    s = _id()
    alice, team, ns = f"alice-{s}", f"dev-{s}", f"ns{s}"
    add_user(registry, alice, password_file)
    cli(registry, "team", "create", team)
    cli(registry, "team", "add-member", team, alice)
    assert actions(registry, f"{ns}/app", alice) == []
    cli(registry, "perm", "grant", "--user", alice, "--repo", f"{ns}/*", "--role", "read")
    cli(registry, "perm", "grant", "--team", team, "--repo", f"{ns}/app", "--role", "write")
    cli(registry, "perm", "grant", "--team", team, "--repo", f"{ns}/ops/*", "--role", "admin")
    # The namespace covers any depth; the exact grant adds push; the team's namespace grant adds delete.
    assert actions(registry, f"{ns}/other", alice) == ["pull"]
    assert actions(registry, f"{ns}/a/b/c", alice) == ["pull"]
    assert actions(registry, f"{ns}/app", alice) == ["pull", "push"]
    assert actions(registry, f"{ns}/ops/deep/tool", alice) == ["delete", "pull", "push"]
    # A namespace pattern covers what is under it, not the namespace itself nor a longer name.
    assert actions(registry, ns, alice) == []
    assert actions(registry, f"{ns}x/app", alice) == []
    assert actions(registry, f"{ns}/app", None) == []
    # Grants apply through the team only while the user is in it.
    cli(registry, "team", "remove-member", team, alice)
    assert actions(registry, f"{ns}/app", alice) == ["pull"]
    # A grant's role is replaced, and revoked.
    cli(registry, "perm", "grant", "--user", alice, "--repo", f"{ns}/*", "--role", "write")
    assert actions(registry, f"{ns}/app", alice) == ["pull", "push"]
    cli(registry, "perm", "revoke", "--user", alice, "--repo", f"{ns}/*")
    assert actions(registry, f"{ns}/app", alice) == []
    grants = cli(registry, "perm", "list", "--team", team, json_out=True)["grants"]
    assert grants == [{"team": team, "repo": f"{ns}/app", "role": "write"},
                      {"team": team, "repo": f"{ns}/ops/*", "role": "admin"}]
    covering = cli(registry, "perm", "list", "--repo", f"{ns}/ops/x", json_out=True)["grants"]
    assert covering == [{"team": team, "repo": f"{ns}/ops/*", "role": "admin"}]
    table = cli(registry, "perm", "list", "--team", team).stdout
    assert table.splitlines()[0].split() == ["USER", "TEAM", "REPO", "ROLE"] and f"{ns}/ops/*" in table


def test_most_specific_visibility_wins(registry):
    ns = f"vis{_id()}"
    cli(registry, "repo", "visibility", f"{ns}/*", "public")
    cli(registry, "repo", "visibility", f"{ns}/inner/*", "private")
    cli(registry, "repo", "visibility", f"{ns}/inner/shown", "public")
    cli(registry, "repo", "visibility", f"{ns}/hidden", "private")
    assert actions(registry, f"{ns}/app") == ["pull"]
    assert actions(registry, f"{ns}/hidden") == []
    assert actions(registry, f"{ns}/inner/x/y") == []
    assert actions(registry, f"{ns}/inner/shown") == ["pull"]
    assert actions(registry, f"other{ns}/app") == []  # nothing speaks for it: private
    check = cli(registry, "perm", "check", "--repo", f"{ns}/app").stdout.strip()
    assert cli(registry, "perm", "check", "--repo", f"{ns}/hidden", json_out=True) == \
        {"user": None, "repo": f"{ns}/hidden", "public": False, "actions": []}
    assert check == f"anonymous may pull on {ns}/app (public)"
    # Public repositories are pulled by every user too, with nothing granted.
    listed = cli(registry, "repo", "list-visibility", json_out=True)["visibility"]
    assert {"repo": f"{ns}/hidden", "visibility": "private"} in listed
    assert {"repo": f"{ns}/*", "visibility": "public"} in listed
    cli(registry, "repo", "visibility", f"{ns}/hidden", "inherit")
    assert actions(registry, f"{ns}/hidden") == ["pull"]
    assert f"{ns}/inner/shown  public" in cli(registry, "repo", "list-visibility").stdout


def test_removing_a_user_removes_its_grants_and_memberships(registry, password_file):
    s = _id()
    bob, team = f"bob-{s}", f"ops-{s}"
    add_user(registry, bob, password_file)
    cli(registry, "team", "create", team)
    cli(registry, "team", "add-member", team, bob)
    cli(registry, "perm", "grant", "--user", bob, "--repo", f"r{s}/app", "--role", "admin")
    cli(registry, "perm", "grant", "--team", team, "--repo", f"r{s}/*", "--role", "read")
    users = {u["name"]: u for u in cli(registry, "user", "list", json_out=True)["users"]}
    assert users[bob]["teams"] == [team] and users[bob]["admin"] is False
    assert "password" not in json.dumps(users[bob])
    out = cli(registry, "user", "remove", bob).stdout
    assert out.strip() == f"removed the user {bob} with its grants and team memberships"
    assert bob not in {u["name"] for u in cli(registry, "user", "list", json_out=True)["users"]}
    assert cli(registry, "perm", "list", "--user", bob, json_out=True)["grants"] == []
    teams = {t["name"]: t for t in cli(registry, "team", "list", json_out=True)["teams"]}
    assert teams[team]["members"] == []
    # A new user of the same name inherits nothing.
    add_user(registry, bob, password_file)
    assert actions(registry, f"r{s}/app", bob) == []
    # Deleting a team takes its grants with it; its former members keep their own.
    cli(registry, "team", "add-member", team, bob)
    assert actions(registry, f"r{s}/app", bob) == ["pull"]
    cli(registry, "team", "delete", team)
    assert actions(registry, f"r{s}/app", bob) == []
    assert cli(registry, "perm", "list", "--team", team, json_out=True)["grants"] == []
    cli(registry, "team", "create", team)
    assert {t["name"]: t for t in cli(registry, "team", "list", json_out=True)["teams"]}[team]["members"] == []
    table = cli(registry, "user", "list").stdout.splitlines()
    assert table[0].split() == ["USER", "ADMIN", "TEAMS", "CREATED"]
    assert any(line.split()[:3] == [bob, "no", "-"] for line in table)


def test_bad_input_gets_one_sentence_and_exit_1(registry, password_file, tmp_path):
    s = _id()
    user, team = f"carol-{s}", f"qa-{s}"
    short = tmp_path / "short"
    short.write_text("seven77\n")
    huge = tmp_path / "huge"
    huge.write_text("x" * 1025)
    fails(cli(registry, "user", "add", "Carol", "--password-file", str(password_file), check=False),
          "invalid user name 'Carol'")
    fails(cli(registry, "user", "add", user, "--password-file", str(short), check=False),
          "too short: at least 8 characters")
    fails(cli(registry, "user", "add", user, "--password-file", str(huge), check=False),
          "too long: at most 1024 characters")
    fails(cli(registry, "user", "add", user, "--password-file", str(tmp_path / "none"), check=False),
          "cannot read --password-file")
    add_user(registry, user, password_file)
    fails(cli(registry, "user", "add", user, "--password-file", str(password_file), check=False),
          f"the user {user} already exists")
    fails(cli(registry, "team", "create", "a/b", check=False), "invalid team name 'a/b'")
    cli(registry, "team", "create", team)
    fails(cli(registry, "team", "create", team, check=False), f"the team {team} already exists")
    fails(cli(registry, "perm", "grant", "--user", user, "--repo", "x/app", "--role", "owner", check=False),
          "invalid role 'owner': use read, write or admin")
    fails(cli(registry, "perm", "grant", "--user", user, "--repo", "x/*/y", "--role", "read", check=False),
          "invalid repository 'x/*/y': use a repository name, NAMESPACE/* or *")
    with admin_http(registry) as admin:
        for pattern in ("X/app", "x/", "*/x", "../etc", "x/**", "x/*/", "", "a" * 300, 7):
            r = admin.put("/_admin/grants", json={"user": user, "repo": pattern, "role": "read"})
            expected = "invalid repository" if isinstance(pattern, str) and pattern else "a repository is required"
            assert r.status_code == 400 and r.json()["error"].startswith(expected), (pattern, r.text)
        for bad in ({"user": user, "repo": "x/app"}, {"user": user, "repo": "x/app", "role": "READ"},
                    {"user": 5, "repo": "x/app", "role": "read"}, {"repo": "x/app", "role": "read"}):
            r = admin.put("/_admin/grants", json=bad)
            assert r.status_code == 400 and list(r.json()) == ["error"], (bad, r.text)
        for password in ("", "short", "x" * 1025, None, 12345678):
            r = admin.put(f"/_admin/users/x{user}", json={"password": password})
            assert r.status_code == 400 and "password" in r.json()["error"], (password, r.text)
    fails(cli(registry, "perm", "grant", "--user", f"nobody-{s}", "--repo", "x/app", "--role", "read",
              check=False), f"no user nobody-{s}")
    fails(cli(registry, "perm", "grant", "--team", f"nobody-{s}", "--repo", "x/app", "--role", "read",
              check=False), f"no team nobody-{s}")
    fails(cli(registry, "perm", "revoke", "--user", user, "--repo", "x/app", check=False),
          f"the user {user} has no grant on x/app")
    fails(cli(registry, "team", "add-member", team, f"nobody-{s}", check=False), f"no user nobody-{s}")
    fails(cli(registry, "team", "remove-member", team, user, check=False),
          f"the user {user} is not a member of the team {team}")
    fails(cli(registry, "team", "delete", f"nobody-{s}", check=False), f"no team nobody-{s}")
    fails(cli(registry, "user", "remove", f"nobody-{s}", check=False), f"no user nobody-{s}")
    fails(cli(registry, "repo", "visibility", "x/app", "secret", check=False),
          "visibility takes public, private or inherit")
    fails(cli(registry, "perm", "check", "--repo", "x/app", "--user", f"nobody-{s}", check=False),
          f"no user nobody-{s}")
    # Nothing half-made along the way.
    assert cli(registry, "perm", "list", "--user", user, json_out=True)["grants"] == []


def test_admin_api_surface(registry, password_file):
    s = _id()
    name = f"dave-{s}"
    with registry.client() as anonymous:
        r = anonymous.put(f"/_admin/users/{name}", json={"password": "long enough password"})
        assert r.status_code == 401
    with admin_http(registry) as admin:
        r = admin.put(f"/_admin/users/{name}", json={"password": "long enough password", "admin": True})
        assert r.status_code == 200 and r.json()["admin"] is True
        assert "long enough password" not in r.text and "hash" not in r.text
        r = admin.put(f"/_admin/users/{name}", json={"password": "long enough password"})
        assert r.status_code == 409 and r.json() == {"error": f"the user {name} already exists"}
        r = admin.put(f"/_admin/users/x{name}", content=b"[1, 2]")
        assert r.status_code == 400 and r.json() == {"error": "the request body must be a JSON object"}
        r = admin.put(f"/_admin/users/x{name}", json={"password": "long enough password", "admin": "yes"})
        assert r.status_code == 400
        r = admin.put("/_admin/grants", json={"user": name, "team": name, "repo": "x", "role": "read"})
        assert r.status_code == 400 and "exactly one of user or team" in r.json()["error"]
        r = admin.get("/_admin/grants", params={"repo": "BAD"})
        assert r.status_code == 400
        r = admin.post("/_admin/users")
        assert r.status_code == 405
        r = admin.get("/_admin/access", params={"user": name, "repo": "any/thing"})
        assert r.json() == {"user": name, "repo": "any/thing", "public": False,
                            "actions": ["delete", "pull", "push"]}
    # The new cluster admin may use the admin API; a new password replaces the old one.
    with admin_http(registry, auth=(name, "long enough password")) as dave:
        assert dave.get("/_admin/users").status_code == 200
    new = password_file.parent / "new"
    new.write_text("a different password\n")
    assert cli(registry, "user", "passwd", name, "--password-file", str(new)).stdout.strip() == \
        f"changed the password of {name}"
    with admin_http(registry, auth=(name, "long enough password")) as dave:
        assert dave.get("/_admin/users").status_code == 401
    with admin_http(registry, auth=(name, "a different password")) as dave:
        assert dave.get("/_admin/users").status_code == 200
    # A user who is not a cluster admin may not.
    add_user(registry, f"erin-{s}", password_file)
    with admin_http(registry, auth=(f"erin-{s}", "correct horse battery")) as erin:
        r = erin.get("/_admin/users")
        assert r.status_code == 403 and r.json() == {"error": f"the user erin-{s} is not a cluster admin"}
    cli(registry, "user", "remove", name)


def test_the_last_cluster_admin_cannot_be_removed(fresh_registry, password_file, tmp_path):
    reg = fresh_registry
    fails(cli(reg, "user", "remove", "admin", check=False),
          "the user admin is the last cluster admin and cannot be removed")
    out = cli(reg, "user", "add", "root2", "--password-file", str(password_file), "--admin", json_out=True)
    assert out["name"] == "root2" and out["admin"] is True and "password" not in json.dumps(out)
    # Everything, everywhere: cluster admins get all, and `*` makes every repository public.
    assert actions(reg, "any/repo/at/all", "root2") == ["delete", "pull", "push"]
    cli(reg, "repo", "visibility", "*", "public")
    assert actions(reg, "any/repo") == ["pull"]
    cli(reg, "user", "add", "frank", "--password-file", str(password_file))
    assert actions(reg, "any/repo", "frank") == ["pull"]
    cli(reg, "perm", "grant", "--user", "frank", "--repo", "*", "--role", "write")
    assert actions(reg, "any/repo", "frank") == ["pull", "push"]
    cli(reg, "user", "remove", "admin")
    env = {"MOORAGE_USERNAME": "root2", "MOORAGE_PASSWORD": "correct horse battery"}
    out = moorage("user", "remove", "root2", "--existing", reg.url, env=env, check=False)
    fails(out, "the user root2 is the last cluster admin")
    listed = json.loads(moorage("user", "list", "--existing", reg.url, "--json", env=env).stdout)["users"]
    assert [(u["name"], u["admin"]) for u in listed] == [("frank", False), ("root2", True)]
    # Still true after a restart: the model is rebuilt from etcd.
    reg.restart()
    assert json.loads(moorage("perm", "check", "--user", "frank", "--repo", "a/b", "--existing", reg.url,
                              "--json", env=env).stdout)["actions"] == ["pull", "push"]


def test_every_replica_decides_alike(cluster):
    """Written through one replica, the model is what every replica's watch has applied."""
    a = cluster.start_first()
    b = cluster.join(a)
    with admin_http(a) as on_a, admin_http(b) as on_b:
        assert on_a.put("/_admin/users/gina", json={"password": "gina's password"}).status_code == 200
        assert on_a.put("/_admin/teams/web").status_code == 200
        assert on_a.put("/_admin/teams/web/members/gina").status_code == 200
        assert on_a.put("/_admin/grants", json={"team": "web", "repo": "site/*", "role": "write"}).status_code == 200
        assert on_a.put("/_admin/visibility", json={"repo": "site/docs", "visibility": "public"}).status_code == 200
        assert actions(b, "site/app", "gina") == ["pull", "push"]
        assert actions(b, "site/docs") == ["pull"]
        assert on_b.get("/_admin/teams").json()["teams"][0]["members"] == ["gina"]
        assert on_b.delete("/_admin/users/gina").status_code == 200
        r = on_a.get("/_admin/access", params={"user": "gina", "repo": "site/app"})
        assert r.status_code == 404 and r.json() == {"error": "no user gina"}
        assert on_a.get("/_admin/teams").json()["teams"][0]["members"] == []
