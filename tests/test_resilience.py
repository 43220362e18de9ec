"""What a replica does when its etcd member misbehaves: hangs, dies, or outlives it.

The etcd member is a real child process; the tests stop, kill and resume it
with signals, as a hung or crashed machine would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import pytest

from conftest import wait_for
from oci import OCI_MANIFEST, assert_oci_error, new_repo, push_blob, push_image, sha256

pytestmark = pytest.mark.cluster


def etcd_pid(registry) -> int:
    out = subprocess.run(["pgrep", "-P", str(registry.proc.pid), "etcd"], capture_output=True, text=True)
    pids = out.stdout.split()
    assert len(pids) == 1, f"expected one etcd child of {registry.proc.pid}, found {pids}"
    return int(pids[0])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes. It may also
    # be reaped between the two calls, and then /proc no longer has it.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False




def test_hung_etcd_refuses_writes_with_503_and_keeps_serving_pulls(fresh_registry):
    repo = new_repo("hung")
    with fresh_registry.client(timeout=30) as c:
        image = push_image(c, repo, "v1")
        pid = etcd_pid(fresh_registry)
        os.kill(pid, signal.SIGSTOP)
        try:
            # Pulls of what the replica knows keep working, and promptly.
            started = time.monotonic()
            for _ in range(5):
                r = c.get(f"/v2/{repo}/manifests/v1", headers={"Accept": OCI_MANIFEST})
                assert r.status_code == 200 and r.content == image.manifest
                blob = c.get(f"/v2/{repo}/blobs/{sha256(image.layers[0])}")
                assert blob.status_code == 200 and blob.content == image.layers[0]
            assert time.monotonic() - started < 15

            # A write is refused with a 503 that names the cause, not a hang or a 500.
            r = c.put(f"/v2/{repo}/manifests/v2", content=image.manifest,
                      headers={"Content-Type": OCI_MANIFEST})
            assert r.status_code == 503, (r.status_code, r.text)
            err = r.json()["errors"][0]
            assert err["code"] == "UNAVAILABLE" and "metadata store" in err["message"], err
            r = c.post(f"/v2/{repo}/blobs/uploads/", params={"digest": sha256(b"x")}, content=b"x")
            assert r.status_code == 503, (r.status_code, r.text)
        finally:
            os.kill(pid, signal.SIGCONT)

        # Once etcd answers again, writes go through without a restart.
        def write_ok():
            try:
                return push_blob(c, repo, os.urandom(64))
            except AssertionError:
                return None
        wait_for(write_ok, 30, "writes to work again after SIGCONT")
        assert c.get(f"/v2/{repo}/manifests/v1", headers={"Accept": OCI_MANIFEST}).content == image.manifest


def test_killed_etcd_is_restarted_by_its_replica(fresh_registry):
    repo = new_repo("restart")
    with fresh_registry.client(timeout=30) as c:
        image = push_image(c, repo, "v1")
        old = etcd_pid(fresh_registry)
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: not alive(old), 10, "etcd to die")

        def restarted():
            try:
                pid = etcd_pid(fresh_registry)
            except AssertionError:
                return None
            return pid if pid != old else None
        wait_for(restarted, 20, "the replica to start a new etcd")

        def write_ok():
            try:
                return push_image(c, repo, "v2")
            except (AssertionError, httpx.HTTPError):
                return None
        wait_for(write_ok, 30, "writes after etcd's restart")
        r = c.get(f"/v2/{repo}/manifests/v1", headers={"Accept": OCI_MANIFEST})
        assert r.status_code == 200 and r.content == image.manifest
    assert fresh_registry.proc.poll() is None


def test_etcd_dies_with_its_replica(fresh_registry):
    """kill -9 of the replica alone (not its process group) leaves no orphan etcd."""
    pid = etcd_pid(fresh_registry)
    os.kill(fresh_registry.proc.pid, signal.SIGKILL)
    fresh_registry.proc.wait()
    wait_for(lambda: not alive(pid), 10, "the orphaned etcd to exit")
    # And the same data directory starts again, with everything in it.
    fresh_registry.start()
    with fresh_registry.client() as c:
        assert c.get("/v2/").status_code == 200


def test_second_replica_on_the_same_ports_fails_with_one_sentence(fresh_registry, tmp_path):
    from conftest import Registry

    clash = Registry(tmp_path / "other", port=fresh_registry.port,
                     etcd_client_port=fresh_registry.etcd_client_port,
                     etcd_peer_port=fresh_registry.etcd_peer_port)
    clash.data_dir.mkdir(parents=True)
    out = subprocess.run(clash.command(), capture_output=True, text=True, timeout=90)
    assert out.returncode == 1, (out.returncode, out.stderr)
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("moorage: ") and ("in use" in last or "etcd exited" in last), out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    # The first replica is unharmed.
    with fresh_registry.client() as c:
        assert c.get("/v2/").status_code == 200


def test_unknown_endpoint_and_method_get_oci_errors(client):
    assert_oci_error(client.post("/v2/_catalog"), 405, "UNSUPPORTED")
    r = client.request("PATCH", f"/v2/{new_repo()}/manifests/latest")
    assert_oci_error(r, 405, "UNSUPPORTED")
    assert "PUT" in r.headers["Allow"]
