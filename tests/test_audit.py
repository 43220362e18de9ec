"""The audit log: every write and every refused request, readable through the admin API.

The registry tests run real replicas and read the log back the way an
operator would (`moorage audit` and GET /_admin/audit); the first test drives
the AuditLog in-process against a real directory for what HTTP cannot reach
(retention, a line torn by a crash, a full queue).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
from datetime import datetime, timezone

import msgspec
import pytest

from conftest import ADMIN_PASSWORD, moorage, wait_for
from oci import new_repo, push_blob, push_image

from moorage.registry.audit import MAX_LIMIT, AuditEvent, AuditLog, AuditQuery, day_of

pytestmark = pytest.mark.security

FIELDS = {"time", "replica", "kind", "method", "path", "status", "user", "claimed", "remote",
          "forwarded", "agent", "repo", "detail", "via"}


def audit(registry, *args: str) -> dict:
    return json.loads(moorage("audit", "--existing", registry.url, "--json", *args).stdout)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


# -- the log itself ------------------------------------------------------------------


def _event(replica: str, ts: float, **kw) -> AuditEvent:
    return AuditEvent(time=ts, replica=replica, kind=kw.pop("kind", "write"), method="PUT",
                      path="/v2/x/manifests/a", status=kw.pop("status", 201), **kw)


def test_log_files_order_retention_torn_lines_and_drops(tmp_path):
    async def scenario():
        now = time.time()
        log = AuditLog(tmp_path, "aa11")
        await log.start()
        for i in range(5):
            log.record(_event("aa11", now - 10 + i, repo="r/one", user=f"u{i}"))
        log.record(_event("aa11", now - 86400, repo="r/old"))
        await log.close()
        other = AuditLog(tmp_path, "bb22")  # a second replica on the same storage
        await other.start()
        other.record(_event("bb22", now - 5.5, repo="r/one", kind="denied", status=401))
        # After start(), whose retention pass would have removed it at once.
        other.record(_event("bb22", now - 100 * 86400, repo="r/ancient"))
        await other.flush()

        today = tmp_path / "audit" / "aa11" / f"{day_of(now - 10)}.jsonl"
        assert today.exists() and (tmp_path / "audit" / "aa11" / f"{day_of(now - 86400)}.jsonl").exists()
        events, more, _ = await other.query(AuditQuery(repo="r/one"))
        assert not more
        assert [e.time for e in events] == sorted((e.time for e in events), reverse=True)
        assert [e.replica for e in events] == ["bb22"] + ["aa11"] * 5
        assert [e.user for e in events if e.replica == "aa11"] == ["u4", "u3", "u2", "u1", "u0"]
        assert (await other.query(AuditQuery(repo="r/one", limit=2)))[:2] == (events[:2], True)
        assert [e.repo for e in (await other.query(AuditQuery(since=now - 2 * 86400)))[0]][-1] == "r/old"
        assert (await other.query(AuditQuery(kind="denied")))[0][0].replica == "bb22"
        assert [e.user for e in (await other.query(AuditQuery(user="u2")))[0]] == ["u2"]
        assert (await other.query(AuditQuery(until=now - 50 * 86400)))[0][0].repo == "r/ancient"

        # Retention removes day files past 90 days, whoever wrote them.
        assert other.expire(time.time()) == 1
        assert not (await other.query(AuditQuery(repo="r/ancient")))[0]

        # A crash left half a line: it is skipped, and the next write starts a fresh line.
        with open(today, "ab") as f:
            f.write(b'{"time": 12')
        restarted = AuditLog(tmp_path, "aa11")
        await restarted.start()
        restarted.record(_event("aa11", time.time(), repo="r/after-crash"))
        await restarted.close()
        lines = today.read_bytes().split(b"\n")
        assert b'{"time": 12' in lines
        assert json.loads(lines[-2])["repo"] == "r/after-crash"
        assert [e.repo for e in (await other.query(AuditQuery(limit=10)))[0]][0] == "r/after-crash"

        # A full queue drops the oldest events and counts them.
        small = AuditLog(tmp_path, "cc33", queue_events=3)
        for i in range(5):
            small.record(_event("cc33", time.time(), repo="r/full", detail=str(i)))
        assert small.dropped == 2
        await small.start()
        await small.close()
        assert [e.detail for e in (await other.query(AuditQuery(repo="r/full")))[0]] == ["4", "3", "2"]
        await other.close()

    asyncio.run(scenario())


# -- through a real registry -------------------------------------------------------------


def test_push_and_delete_are_audited(registry):
    repo = new_repo("audit")
    started = time.time()
    with registry.client() as c:
        user = "admin"
        image = push_image(c, repo, "v1")
        assert c.get(f"/v2/{repo}/manifests/v1").status_code == 200  # reads are not audited
        assert c.get(f"/v2/{repo}/tags/list").status_code == 200
        r = c.delete(f"/v2/{repo}/manifests/{image.digest}")
        assert r.status_code == 202, r.text
    every = audit(registry, "--repo", repo)["events"]
    # Reads are not audited; refusals are (with Bearer auth, a client's first
    # request for a new scope goes without a token and gets the challenge).
    events = [e for e in every if e["kind"] == "write"]
    assert all(e["kind"] == "denied" and e["status"] == 401 for e in every if e["kind"] != "write"), every
    assert all(e["method"] not in ("GET", "HEAD") for e in events), events
    # Newest first: the delete, the manifest, then the blob uploads (config and two layers).
    assert [(e["method"], e["status"]) for e in events] == [("DELETE", 202), ("PUT", 201)] + [("POST", 201)] * 3
    delete, put = events[0], events[1]
    assert delete["path"] == f"/v2/{repo}/manifests/{image.digest}"
    assert put["path"] == f"/v2/{repo}/manifests/v1" and put["detail"] == image.digest
    for e in events:
        assert set(e) == FIELDS
        assert e["user"] == user and e["repo"] == repo and e["replica"] == registry.replica_id
        assert e["remote"] == "127.0.0.1" and e["forwarded"] is None
        assert e["agent"].startswith("python-httpx/")
        assert started - 1 <= e["time"] <= time.time()


def test_denied_requests_are_audited(registry):
    marker = f"198.51.100.{uuid.uuid4().int % 250 + 1}, {uuid.uuid4().hex[:8]}"
    repo = new_repo("denied")
    with registry.client() as c:
        r = c.get("/_admin/cluster/status", auth=("admin", "wrong-password"),
                  headers={"X-Forwarded-For": marker})
        assert r.status_code == 401
        # The protocol's first step, without credentials, is not an incident.
        c.get("/v2/", auth=None, headers={"X-Forwarded-For": marker})
        r = c.post(f"/v2/{repo}/blobs/uploads/", auth=("admin", "wrong-password"),
                   headers={"X-Forwarded-For": marker})
        assert r.status_code == 401
        r = c.put(f"/v2/{repo}/manifests/v1", auth=None, content=b"{}",
                  headers={"X-Forwarded-For": marker})
        assert r.status_code == 401
        # A failed login at the token endpoint (a user of its own: failures are throttled per user).
        r = c.get("/token", params={"service": "moorage", "scope": f"repository:{repo}:pull"},
                  auth=("mallory", "not-a-password"), headers={"X-Forwarded-For": marker})
        assert r.status_code == 401
    events = [e for e in audit(registry, "--kind", "denied", "--since", "5m", "--limit", "10000")["events"]
              if e["forwarded"] == marker]
    admin = [e for e in events if e["path"] == "/_admin/cluster/status"]
    assert len(admin) == 1, events
    assert admin[0]["method"] == "GET" and admin[0]["status"] == 401
    assert admin[0]["user"] is None and admin[0]["claimed"] == "admin"
    assert admin[0]["remote"] == "127.0.0.1" and admin[0]["replica"] == registry.replica_id
    assert not [e for e in events if e["path"] in ("/v2/", "/v2")]
    pushes = [e for e in events if e["repo"] == repo]
    assert {(e["method"], e["status"], e["claimed"]) for e in pushes} == {("POST", 401, "admin")}, pushes
    assert all(e["user"] is None for e in pushes)
    # Without credentials, the 401 is the challenge every client starts with: its own kind, kept apart.
    challenged = [e for e in audit(registry, "--kind", "challenged", "--since", "5m", "--limit", "10000")["events"]
                  if e["forwarded"] == marker]
    assert [(e["method"], e["status"], e["repo"], e["user"], e["claimed"]) for e in challenged] == [
        ("PUT", 401, repo, None, None)], challenged
    default = audit(registry, "--since", "5m", "--limit", "10000")
    assert not [e for e in default["events"] if e["kind"] == "challenged"] and default["challenged"] >= 1
    table = moorage("audit", "--since", "5m", "--existing", registry.url).stdout
    assert "without credentials in this period" in table and "--kind challenged" in table, table
    logins = [e for e in audit(registry, "--kind", "login-failed", "--since", "5m", "--limit", "10000")["events"]
              if e["forwarded"] == marker]
    assert [(e["path"], e["status"], e["claimed"], e["user"]) for e in logins] == [
        ("/token", 401, "mallory", None)], logins
    assert "incorrect" in logins[0]["detail"]
    # A user's failed attempts are found under that user's name.
    mine = audit(registry, "--user", "admin", "--kind", "denied", "--since", "5m", "--limit", "10000")
    assert admin[0] in mine["events"]


def test_admin_changes_are_audited_and_audit_needs_admin(registry):
    moorage("config", "set", "log.level", "info", "--existing", registry.url)  # the default: harmless
    events = audit(registry, "--kind", "admin", "--limit", "1")["events"]
    assert len(events) == 1
    e = events[0]
    assert (e["method"], e["path"], e["status"]) == ("PUT", "/_admin/config/log.level", 200)
    assert e["user"] == "admin" and e["replica"] == registry.replica_id
    with registry.client() as c:
        assert c.get("/_admin/audit", auth=None).status_code == 401
        assert c.get("/_admin/audit", auth=("admin", "nope")).status_code == 401


def test_query_filters(registry):
    a, b = new_repo("filter"), new_repo("filter")
    started = time.time()
    with registry.client() as c:
        push_blob(c, a, b"one")
        push_blob(c, a, b"two")
        push_blob(c, b, b"three")
        v2_user = "admin"
        admin = ("admin", ADMIN_PASSWORD)
        q = lambda **params: c.get("/_admin/audit", params=params, auth=admin)  # noqa: E731
        assert [e["repo"] for e in q(repo=a, kind="write").json()["events"]] == [a, a]
        assert [e["repo"] for e in q(repo=b, kind="write").json()["events"]] == [b]
        one = q(repo=a, kind="write", limit=1).json()
        assert one["count"] == 1 and one["truncated"] and one["events"][0]["detail"].startswith("sha256:")
        # With Bearer auth the client's first request went without a token: a challenge, no refusal.
        assert q(repo=a, kind="denied").json()["events"] == []
        challenged = q(repo=a, kind="challenged").json()["events"]
        assert len(challenged) == 1 and challenged[0]["claimed"] is None, challenged
        assert q(repo=a).json()["challenged"] == 1
        assert len(q(repo=a, kind="write", since=started - 1, until=time.time() + 1).json()["events"]) == 2
        assert len(q(repo=a, kind="write", since=iso(started - 1)).json()["events"]) == 2
        assert q(repo=a, since=time.time() + 60).json()["events"] == []
        assert q(repo=a, until=started - 60).json()["events"] == []
        if v2_user:
            assert len(q(repo=a, user=v2_user).json()["events"]) == 2
            assert q(repo=a, user="somebody-else").json()["events"] == []
        for bad in ({"kind": "nonsense"}, {"limit": "0"}, {"limit": "10001"}, {"limit": "x"},
                    {"since": "yesterday"}, {"since": "nan"}, {"color": "red"}):
            r = q(**bad)
            assert r.status_code == 400 and r.json()["error"], (bad, r.text)
    table = moorage("audit", "--existing", registry.url, "--repo", a, "--kind", "write").stdout
    lines = table.splitlines()
    assert lines[0].split() == ["TIME", "(UTC)", "REPLICA", "KIND", "USER", "FROM", "REQUEST", "STATUS", "DETAIL"]
    assert len(lines) == 3 and all(registry.replica_id in line and f"POST /v2/{a}/blobs/uploads/" in line
                                   for line in lines[1:]), table
    assert "no matching events" in moorage("audit", "--existing", registry.url, "--repo", new_repo()).stdout
    out = moorage("audit", "--existing", registry.url, "--since", "soon", check=False)
    assert out.returncode == 1 and "duration" in out.stderr


def test_log_is_json_lines_under_storage_audit_replica(registry):
    repo = new_repo("files")
    with registry.client() as c:
        push_blob(c, repo, b"layout")
    audit(registry, "--repo", repo)  # a query writes out what is queued first
    day_dir = registry.blob_dir / "audit" / registry.replica_id
    path = day_dir / f"{time.strftime('%Y-%m-%d', time.gmtime())}.jsonl"
    assert path.exists(), sorted(p.name for p in day_dir.iterdir())
    records = [json.loads(line) for line in path.read_text().splitlines()]
    mine = [r for r in records if r["repo"] == repo and r["kind"] == "write"]
    assert len(mine) == 1 and set(mine[0]) == FIELDS and mine[0]["method"] == "POST"


def test_any_replica_reads_the_whole_clusters_log(cluster):
    first = cluster.start_first()
    second = cluster.join(first)
    repo = new_repo("cluster")
    with second.client() as c:
        push_blob(c, repo, b"pushed through the second replica")

    def seen_from_first():
        events = audit(first, "--repo", repo, "--kind", "write")["events"]
        return events if events and events[0]["replica"] == second.replica_id else None
    events = wait_for(seen_from_first, 10, "the second replica's event, read through the first")
    assert events[0]["method"] == "POST" and events[0]["status"] == 201

    # Shutting down writes out what is still queued.
    with second.client() as c:
        push_blob(c, repo, b"just before shutdown")
    second.stop()
    events = audit(first, "--repo", repo, "--kind", "write")["events"]
    assert [e["replica"] for e in events] == [second.replica_id] * 2


def test_audit_pages_past_the_servers_limit(registry):
    """`--limit` past a page (10,000): the CLI pages with `until`, across events that share an instant."""
    repo = new_repo("paging")
    replica = "fa11" + uuid.uuid4().hex[:8]  # another replica's file on the shared storage, written directly
    day_dir = registry.blob_dir / "audit" / replica
    day_dir.mkdir(parents=True)
    start = time.time() - 2 * 86400  # days back: the other tests' `--since 5m` never read them
    total = MAX_LIMIT + 2_500
    # Three events per instant, so that page boundaries fall inside groups of equal times.
    events = [_event(replica, start + (i // 3) * 0.5, repo=repo, detail=str(i)) for i in range(total)]
    (day_dir / f"{day_of(start)}.jsonl").write_bytes(b"".join(msgspec.json.encode(e) + b"\n" for e in events))
    try:
        got = audit(registry, "--repo", repo, "--limit", str(total + 1000))
        assert got["count"] == total and not got["truncated"]
        # Newest first, each exactly once: the file read backwards, equal times included.
        assert [e["detail"] for e in got["events"]] == [str(i) for i in reversed(range(total))]
        cut = audit(registry, "--repo", repo, "--limit", str(MAX_LIMIT + 1))
        assert cut["count"] == MAX_LIMIT + 1 and cut["truncated"]
        assert [e["detail"] for e in cut["events"]] == [e["detail"] for e in got["events"][:MAX_LIMIT + 1]]
        table = moorage("audit", "--existing", registry.url, "--repo", repo, "--limit", "10001").stdout
        assert len(table.splitlines()) == 1 + 10_001 + 2 and "showing the newest 10001" in table
    finally:
        shutil.rmtree(day_dir)
