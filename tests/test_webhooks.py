"""Webhooks against a real HTTP receiver, from a cluster of three replicas on hosts of their own.

The receiver (tests/webhook_receiver.py) runs on the test's client host
(10.0.0.100) and records every body as it arrived. Each event must come in
distribution's envelope with its fields, signed; a receiver that is down for
a while (OUTAGE_SECONDS, longer than several retry intervals) gets every
event once it is back; and when the replica delivering an endpoint dies with
events pending, another replica takes the queue over and delivers them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import hosts
from conftest import ADMIN_PASSWORD, Registry, free_port, moorage, scratch, terminate, wait_for
from oci import new_repo, pull_manifest, push_image

pytestmark = pytest.mark.webhooks

RECEIVER = Path(__file__).resolve().parent / "webhook_receiver.py"
MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
SECRET = "a-secret-only-the-receiver-knows-" + os.urandom(4).hex()
# The receiver is down this long in the outage test: longer than several retry intervals
# (BACKOFF_MAX below); MOORAGE_TEST_OUTAGE_SECONDS shortens it while working on the code.
OUTAGE_SECONDS = float(os.environ.get("MOORAGE_TEST_OUTAGE_SECONDS", "30"))
BACKOFF_MAX = 4.0
LEASE_TTL = 10  # api/webhooks.py: a dead deliverer's lock is gone within this


class Receiver:
    def __init__(self, root: Path, host: str = hosts.CLIENT_IP):
        self.port = free_port()
        self.address = f"{host}:{self.port}"
        self.out = root / f"received-{self.port}.jsonl"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}/hook"

    def start(self) -> "Receiver":
        self.proc = subprocess.Popen([sys.executable, str(RECEIVER), "--listen", self.address, "--out", str(self.out)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == b"ready", line
        return self

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, timeout=10)
            self.proc = None

    def requests(self) -> list[dict]:
        if not self.out.exists():
            return []
        found = []
        for line in self.out.read_text().splitlines():
            r = json.loads(line)
            r["raw"] = base64.b64decode(r["body"])
            r["json"] = json.loads(r["raw"])
            found.append(r)
        return found

    def events(self, action: str | None = None) -> list[dict]:
        return [e for r in self.requests() for e in r["json"]["events"] if action is None or e["action"] == action]


@pytest.fixture(scope="module")
def receiver(trio, request) -> Iterator[Receiver]:
    r = Receiver(scratch(request, "receiver")).start()
    yield r
    r.stop()


def add_webhook(via: Registry, name: str, url: str, *args: str, secret: Path | None = None) -> dict:
    out = moorage("webhook", "add", name, "--url", url, *args, *(["--secret-file", str(secret)] if secret else []),
                  "--existing", via.url, "--json")
    return json.loads(out.stdout)


def webhooks(via: Registry) -> dict[str, dict]:
    return {w["name"]: w for w in json.loads(moorage("webhook", "list", "--existing", via.url, "--json").stdout)["webhooks"]}


def metric(reg: Registry, name: str, **labels: str) -> float:
    """A sample of a replica's /metrics (0 when absent), read as an admin."""
    r = httpx.get(reg.url + "/metrics", auth=("admin", ADMIN_PASSWORD), verify=reg.ssl_context(), timeout=10)
    assert r.status_code == 200, r.text
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def signed(request: dict, secret: str) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), request["raw"], hashlib.sha256).hexdigest()
    return hmac.compare_digest(request["headers"].get("Moorage-Signature", ""), expected)


def push_through(reg: Registry, repo: str, tag: str) -> str:
    with reg.client() as c:
        return push_image(c, repo, tag).digest


@pytest.fixture(scope="module")
def secret_file(request) -> Path:
    path = scratch(request, "secret") / "webhook.secret"
    path.write_text(SECRET + "\n")
    return path


# -- what an event says ----------------------------------------------------------------


def test_a_push_through_each_replica_is_one_signed_event_in_distributions_envelope(trio, receiver, secret_file):
    first = trio.replicas[0]
    shown = add_webhook(first, "ci", receiver.url, "--events", "push,delete", "--repository", "hooks/*",
                        "--header", "Authorization: Bearer receiver-token", secret=secret_file)
    assert shown["secret"] is True and shown["headers"] == ["Authorization"]
    assert SECRET not in json.dumps(shown) and "receiver-token" not in json.dumps(shown)

    pushed = {}
    for i, reg in enumerate(trio.replicas):
        repo = f"hooks/{new_repo('push')}"
        pushed[repo] = (push_through(reg, repo, f"v{i}"), reg, f"v{i}")
    with trio.replicas[0].client() as c:  # a repository no pattern covers: no event
        push_image(c, new_repo("elsewhere"), "v1")

    wait_for(lambda: len(receiver.events("push")) >= 3, 30, "three push events")
    time.sleep(1)  # nothing more is coming: exactly one event per push
    events = receiver.events()
    assert sorted(e["target"]["repository"] for e in events) == sorted(pushed), events
    for request in receiver.requests():
        assert request["headers"]["Content-Type"] == MEDIA_TYPE
        assert request["headers"]["Authorization"] == "Bearer receiver-token"
        assert signed(request, SECRET), request["headers"]
        tampered = dict(request, raw=request["raw"].replace(b'"push"', b'"pull"'))
        assert not signed(tampered, SECRET)
    for event in events:
        digest, reg, tag = pushed[event["target"]["repository"]]
        assert event["action"] == "push"
        target = event["target"]
        assert target["digest"] == digest and target["tag"] == tag
        assert target["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
        assert target["size"] == target["length"] > 0
        assert target["url"] == f"https://{reg.host}/v2/{target['repository']}/manifests/{digest}"
        assert event["request"]["method"] == "PUT" and event["request"]["addr"] == hosts.CLIENT_IP
        assert event["request"]["host"] == reg.host and event["request"]["useragent"].startswith("python-httpx")
        assert event["actor"] == {"name": "admin"}
        assert event["source"]["addr"] == reg.host and event["source"]["instanceID"]
        assert len(event["id"]) == 36 and event["timestamp"].endswith("Z")
    # The secret and the header's value are in no replica's log.
    for reg in trio.replicas:
        assert SECRET not in reg.log_path.read_text() and "receiver-token" not in reg.log_path.read_text()


def test_deletes_and_garbage_collection_are_events_too(trio, receiver):
    reg = trio.replicas[1]
    add_webhook(reg, "gc-watch", receiver.url, "--events", "gc")
    repo = f"hooks/{new_repo('delete')}"
    digest = push_through(reg, repo, "old")
    with reg.client() as c:
        assert c.delete(f"/v2/{repo}/manifests/old").status_code == 202
        assert c.delete(f"/v2/{repo}/manifests/{digest}").status_code == 202
    moorage("gc", "--existing", reg.url)
    wait_for(lambda: len([e for e in receiver.events("delete") if e["target"]["repository"] == repo]) == 2
             and receiver.events("gc"), 30, "two delete events and a gc event")
    deletes = [e for e in receiver.events("delete") if e["target"]["repository"] == repo]
    assert [d["target"].get("tag") for d in deletes] == ["old", None]
    assert [d["target"].get("digest") for d in deletes] == [None, digest]
    assert all(d["request"]["method"] == "DELETE" for d in deletes)
    gc = receiver.events("gc")[-1]
    assert gc["gc"]["result"] == "success" and gc["gc"]["manifests_deleted"] >= 0, gc
    moorage("webhook", "remove", "gc-watch", "--existing", reg.url)


def test_pull_events_only_for_endpoints_that_want_them_in_batches(trio, receiver):
    reg = trio.replicas[2]
    repo = f"pulls/{new_repo('pull')}"
    digest = push_through(reg, repo, "latest")
    add_webhook(reg, "pulls", receiver.url, "--events", "pull", "--repository", repo)
    before = len(receiver.requests())
    with reg.client() as c:
        for _ in range(30):
            pull_manifest(c, repo, "latest")
            assert c.head(f"/v2/{repo}/manifests/latest").status_code == 200  # a HEAD is no pull
    wait_for(lambda: len([e for e in receiver.events("pull") if e["target"]["repository"] == repo]) == 30, 30,
             "30 pull events")
    pulls = [e for e in receiver.events("pull") if e["target"]["repository"] == repo]
    assert all(p["target"]["digest"] == digest and p["target"]["tag"] == "latest" for p in pulls)
    assert all(p["request"]["method"] == "GET" for p in pulls)
    bodies = [r for r in receiver.requests()[before:] if r["json"]["events"][0]["action"] == "pull"]
    assert len(bodies) < 30, "pulls are written and sent in batches, not one by one"
    # `ci` (push, delete) hears of no pull.
    assert not any(e["action"] == "pull" and e["target"]["repository"] != repo for e in receiver.events())
    moorage("webhook", "remove", "pulls", "--existing", reg.url)


def test_a_full_backlog_drops_new_events_counts_them_and_never_slows_pushes(trio, tmp_path):
    reg = trio.replicas[0]
    nobody = f"http://{hosts.CLIENT_IP}:{free_port()}/hook"  # nothing listens: every attempt fails
    add_webhook(reg, "small", nobody, "--repository", "full/*", "--max-pending", "3", "--backoff-max", "1s")
    repo = f"full/{new_repo('backlog')}"
    for i in range(5):
        push_through(trio.replicas[i % 3], repo, f"t{i}")   # every push succeeds
    wait_for(lambda: webhooks(reg)["small"]["pending"] == 3, 10, "three pending events")
    dropped = sum(metric(r, "moorage_webhook_dropped_total", endpoint="small") for r in trio.replicas)
    assert dropped == 2
    assert any("webhook events dropped" in r.log_path.read_text() for r in trio.replicas)
    failed = wait_for(lambda: (n := sum(metric(r, "moorage_webhook_deliveries_total", endpoint="small",
                                                 result="failed") for r in trio.replicas)) >= 6 and n,
                      20, "failed attempts counted")
    assert failed >= 6
    listed = webhooks(reg)["small"]
    assert listed["failing_since"] and "cannot connect" in listed["last_error"], listed
    moorage("webhook", "remove", "small", "--existing", reg.url)
    assert "small" not in webhooks(trio.replicas[1])


def test_the_webhook_command_refuses_bad_input_in_one_sentence(trio, receiver, tmp_path):
    via = ("--existing", trio.replicas[0].url)
    for args, message in [
        (["--url", "ftp://example.com/"], "not an http:// or https:// URL"),
        (["--url", "http://u:p@10.0.0.100/"], "no user or password"),
        (["--url", receiver.url, "--header", "Content-Type: text/plain"], "set by the delivery itself"),
        (["--url", receiver.url, "--events", "push,reboot"], "webhook events are some of"),
        (["--url", receiver.url, "--repository", "../etc"], "invalid repository"),
        (["--url", receiver.url, "--timeout", "soon"], "--timeout takes a duration"),
        (["--url", receiver.url, "--secret-file", str(tmp_path / "missing")], "cannot read"),
    ]:
        out = moorage("webhook", "add", "bad", *args, *via, check=False)
        assert out.returncode == 1 and out.stderr.count("\n") == 1 and message in out.stderr, (args, out.stderr)
    out = moorage("webhook", "add", "BAD NAME", "--url", receiver.url, *via, check=False)
    assert out.returncode == 1 and "lowercase" in out.stderr
    out = moorage("webhook", "add", "ci", "--url", receiver.url, *via, check=False)
    assert out.returncode == 1 and "exists" in out.stderr
    out = moorage("webhook", "remove", "nope", *via, check=False)
    assert out.returncode == 1 and "no webhook named nope" in out.stderr
    nobody = f"http://{hosts.CLIENT_IP}:{free_port()}/hook"
    add_webhook(trio.replicas[0], "down", nobody, "--events", "gc")
    out = moorage("webhook", "test", "down", *via, check=False)
    assert out.returncode == 1 and "cannot connect" in out.stderr and out.stderr.count("\n") == 1, out.stderr
    out = moorage("webhook", "test", "ci", *via)
    assert "delivered to ci in" in out.stdout
    assert receiver.events("test")
    table = moorage("webhook", "list", *via).stdout
    assert "ci" in table and "down" in table and SECRET not in table
    moorage("webhook", "remove", "down", *via)


# -- delivery that survives ------------------------------------------------------------------


def test_a_receiver_down_for_a_while_gets_every_event_once_back_in_order(trio, receiver, secret_file):
    via = trio.replicas[0]
    add_webhook(via, "outage", receiver.url, "--repository", "outage/*", "--backoff-max", f"{BACKOFF_MAX:g}s",
                secret=secret_file)
    receiver.stop()
    started = time.monotonic()
    repo = f"outage/{new_repo('o')}"
    pushed = [push_through(trio.replicas[i % 3], repo, f"t{i}") for i in range(6)]

    def failed() -> float:
        return sum(metric(r, "moorage_webhook_deliveries_total", endpoint="outage", result="failed")
                   for r in trio.replicas)

    wait_for(lambda: failed() > 0, 15, "a failed delivery")
    assert webhooks(via)["outage"]["failing_since"]
    time.sleep(max(OUTAGE_SECONDS - (time.monotonic() - started), 0))
    attempts = failed() / 6   # each attempt sends the six events in one body
    assert attempts >= OUTAGE_SECONDS / BACKOFF_MAX / 2, f"only {attempts} attempts in {OUTAGE_SECONDS}s"
    assert webhooks(via)["outage"]["pending"] == 6
    receiver.start()
    wait_for(lambda: len([e for e in receiver.events("push") if e["target"]["repository"] == repo]) >= 6,
             BACKOFF_MAX * 2 + 10, "every event after the outage")
    got = [e["target"]["digest"] for e in receiver.events("push") if e["target"]["repository"] == repo]
    assert got == pushed, "in push order, each once"
    wait_for(lambda: webhooks(via)["outage"]["pending"] == 0 and not webhooks(via)["outage"]["failing_since"],
             10, "the queue empty and the endpoint healthy")
    assert all(signed(r, SECRET) for r in receiver.requests()
               if any(e.get("target", {}).get("repository") == repo for e in r["json"]["events"]))


def test_events_pending_on_a_replica_that_dies_are_delivered_by_another(trio, receiver):
    via = trio.replicas[1]
    add_webhook(via, "takeover", receiver.url, "--repository", "takeover/*", "--backoff-max", "2s")
    holder_id = wait_for(lambda: webhooks(via)["takeover"]["delivering_replica"], 10, "a deliverer")
    holder = next(r for r in trio.replicas if r.replica_id == holder_id)
    receiver.stop()
    repo = f"takeover/{new_repo('t')}"
    pushed = [push_through(holder, repo, f"t{i}") for i in range(3)]   # the deliverer took the pushes too
    wait_for(lambda: metric(holder, "moorage_webhook_deliveries_total", endpoint="takeover", result="failed") > 0,
             15, "the deliverer trying")
    holder.kill9()
    receiver.start()
    survivor = next(r for r in trio.replicas if r is not holder)
    wait_for(lambda: {e["target"]["digest"] for e in receiver.events("push")} >= set(pushed),
             LEASE_TTL + 20, "the pending events from another replica")
    listed = webhooks(survivor)["takeover"]
    assert listed["delivering_replica"] not in (None, holder_id), listed
    got = [e["target"]["digest"] for e in receiver.events("push") if e["target"]["repository"] == repo]
    assert [d for i, d in enumerate(got) if d not in got[:i]] == pushed, "in order (a repeat is allowed)"
    wait_for(lambda: webhooks(survivor)["takeover"]["pending"] == 0, 10, "the queue empty")
