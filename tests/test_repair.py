"""Disaster recovery: `moorage emergency-repair` after a majority of replicas is lost for good.

Real processes throughout: a three-replica cluster made with `moorage join`, each
replica on a host of its own (the repair runs on the survivor's),
two of its replicas killed with SIGKILL (replica and etcd member at once), the
survivor stopped, repaired, restarted, and grown back to three.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ENV, MOORAGE, Cluster, Registry, moorage
from oci import OCI_MANIFEST, Image, new_repo, push_image, sha256

pytestmark = pytest.mark.cluster


@pytest.fixture
def cluster(hosts_cluster: Cluster) -> Cluster:
    """Each replica on a host of its own (conftest's `three` builds on this)."""
    return hosts_cluster


def tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under `path` with its size and mtime: proof a refusal changed nothing."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in path.rglob("*") if p.is_file()}


def one_sentence_refusal(out: subprocess.CompletedProcess, *words: str) -> None:
    assert out.returncode == 1, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moorage: ") and "Traceback" not in out.stderr, out.stderr
    for word in words:
        assert word in lines[0], lines[0]


def at_terminal(args: list[str], answer: str, prefix: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run a command with a pseudo-terminal as stdin/stdout, answer its prompt, return (code, output)."""
    main, child = pty.openpty()
    proc = subprocess.Popen(prefix + MOORAGE + args, stdin=child, stdout=child, stderr=child, env=ENV)
    os.close(child)
    out, answered, deadline = b"", False, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(main, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            if not answered and b'Type "yes" to continue:' in out:
                os.write(main, answer.encode() + b"\n")
                answered = True
            if proc.poll() is not None and not ready:
                break
        return proc.wait(timeout=5), out.decode(errors="replace")
    finally:
        os.close(main)
        if proc.poll() is None:
            proc.kill()


def pull_all(reg: Registry, images: dict[str, tuple[str, Image]]) -> None:
    with reg.client() as c:
        for ref, (repo, image) in images.items():
            r = c.get(f"/v2/{repo}/manifests/{ref}", headers={"Accept": OCI_MANIFEST})
            assert r.status_code == 200 and r.content == image.manifest, (ref, r.status_code)
            for blob in [image.config, *image.layers]:
                r = c.get(f"/v2/{repo}/blobs/{sha256(blob)}")
                assert r.status_code == 200 and r.content == blob, (ref, sha256(blob))


def test_repair_after_losing_two_of_three_then_grow_back(three: Cluster):
    survivor, b, c = three.replicas
    repo = new_repo("dr")
    images: dict[str, tuple[str, Image]] = {}
    with survivor.client() as ca, b.client() as cb:
        for i in range(3):
            images[f"a{i}"] = (repo, push_image(ca, repo, f"a{i}"))
            images[f"b{i}"] = (repo, push_image(cb, repo, f"b{i}"))
    data = str(survivor.data_dir)

    # A running replica is refused, and so is one whose cluster still has quorum.
    one_sentence_refusal(moorage("emergency-repair", "--data-dir", data, "--yes", check=False, on=survivor.on),
                         "seems to be running", "stop it first")
    survivor.stop()
    one_sentence_refusal(moorage("emergency-repair", "--data-dir", data, "--yes", check=False, on=survivor.on),
                         "still has quorum", "moorage remove")
    survivor.start()
    assert three.status(survivor)["voters"] == 3

    # The majority is lost for good; the survivor is stopped.
    b.kill9()
    c.kill9()
    survivor.stop()
    lost = {b.replica_id, c.replica_id}

    # Without --yes and without a terminal: one sentence, nothing touched.
    before = tree(survivor.data_dir)
    one_sentence_refusal(moorage("emergency-repair", "--data-dir", data, check=False, on=survivor.on), "--yes")
    assert tree(survivor.data_dir) == before

    # At a terminal it says what it drops, and "no" cancels.
    code, shown = at_terminal(["emergency-repair", "--data-dir", data], "no", survivor.on.run_prefix())
    assert code == 1 and "cancelled; nothing was changed" in shown, shown
    assert all(rid in shown for rid in lost) and "--force-new-cluster" in shown
    assert "may be missing" in shown and "no longer be part of the cluster" in shown

    out = moorage("emergency-repair", "--data-dir", data, "--yes", timeout=90, on=survivor.on)
    assert "is now a cluster of one" in out.stdout and f"moorage serve --data-dir {data}" in out.stdout
    assert all(rid in out.stdout for rid in lost), out.stdout
    print(out.stdout)

    survivor.start()
    pull_all(survivor, images)
    status = three.status(survivor)
    assert status["voters"] == 1 and status["healthy"] == 1 and status["tolerates"] == 0, status
    assert [r["id"] for r in status["replicas"]] == [survivor.replica_id], status
    with survivor.client() as ca:
        images["after"] = (repo, push_image(ca, repo, "after"))

    # New replicas join the repaired cluster as usual.
    d = three.join(survivor)
    e = three.join(survivor)
    status = three.status(d)
    assert status["voters"] == 3 and status["healthy"] == 3 and status["tolerates"] == 1, status
    assert {r["id"] for r in status["replicas"]} == {survivor.replica_id, d.replica_id, e.replica_id}
    pull_all(e, images)
    with d.client() as cd:
        images["grown"] = (repo, push_image(cd, repo, "grown"))
    pull_all(survivor, images)


def test_refuses_a_directory_without_a_replica(tmp_path):
    one_sentence_refusal(moorage("emergency-repair", "--data-dir", str(tmp_path), "--yes", check=False),
                         "holds no replica")
    assert list(tmp_path.iterdir()) == []
