"""docker (Debian's docker.io: the docker CLI and its own dockerd) logs in, pushes and pulls.

The test starts a dockerd of its own (its data, socket and containerd under
the test's directory; no network setup, no containers run): pushing and
pulling are the daemon's work, so the real client is the pair. dockerd
counts 127.0.0.0/8 registries as insecure by default, which for HTTPS means
it does not check the certificate; certificates are tested with skopeo and
oras, this test is about docker's token login, push and pull.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from conftest import ADMIN_PASSWORD, Registry, moorage, scratch, terminate, wait_for
from layout import Layout
from oci import OCI_MANIFEST, new_repo
from test_skopeo import skopeo

pytestmark = pytest.mark.clients

DOCKERD = shutil.which("dockerd") or "/usr/sbin/dockerd"
DOCKER = shutil.which("docker") or "/usr/bin/docker"


class Docker:
    def __init__(self, root: Path):
        self.root = root
        self.sock = root / "docker.sock"
        self.config = root / "client"  # docker login writes here, not to ~/.docker
        self.log = root / "dockerd.log"
        self.proc = subprocess.Popen(
            [DOCKERD, "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
             "--pidfile", str(root / "dockerd.pid"), "--host", f"unix://{self.sock}",
             "--iptables=false", "--ip6tables=false", "--bridge=none", "--storage-driver=vfs"],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        wait_for(self._ready, 60, "dockerd to start")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, f"dockerd exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
        return self.run("version", check=False).returncode == 0

    def run(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([DOCKER, "--config", str(self.config), "--host", f"unix://{self.sock}", *args],
                             capture_output=True, text=True, timeout=180, input=input)
        if check:
            assert out.returncode == 0, f"docker {' '.join(args)}: {out.stderr}\n{self.log.read_text()[-3000:]}"
        return out

    def stop(self) -> None:
        terminate(self.proc)


@pytest.fixture(scope="module")
def docker(request) -> Iterator[Docker]:
    d = Docker(scratch(request, "docker"))
    yield d
    d.stop()


def test_docker_logs_in_pushes_and_pulls(docker: Docker, registry: Registry, tmp_path):
    # An image for the daemon: an OCI layout, turned into a docker archive by skopeo, loaded.
    layout = Layout(tmp_path / "layout")
    image = layout.image(random.Random(7), n_layers=2)
    layout.tag("v1", OCI_MANIFEST, image.manifest)
    skopeo("copy", f"oci:{layout.path}:v1", f"docker-archive:{tmp_path / 'image.tar'}:moorage-test/hello:v1")
    docker.run("load", "--input", str(tmp_path / "image.tar"))
    repo = new_repo("docker")
    ref = f"{registry.host}/{repo}:v1"
    docker.run("tag", "moorage-test/hello:v1", ref)

    # A wrong password is refused at login; the right one gets in (docker trades it for tokens).
    bad = docker.run("login", "--username", "admin", "--password-stdin", registry.host, input="wrong\n", check=False)
    assert bad.returncode != 0 and "unauthorized" in bad.stderr.lower(), bad.stderr
    out = docker.run("login", "--username", "admin", "--password-stdin", registry.host, input=ADMIN_PASSWORD + "\n")
    assert "Login Succeeded" in out.stdout, out.stdout

    pushed = docker.run("push", ref).stdout
    digest = next(w for w in pushed.split() if w.startswith("sha256:"))
    with registry.client() as c:
        r = c.get(f"/v2/{repo}/manifests/v1", headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
        assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == digest
        config = r.json()["config"]["digest"]

    # Gone from the daemon, then pulled back: the same image (its config digest is its id).
    docker.run("rmi", ref, "moorage-test/hello:v1")
    pulled = docker.run("pull", ref).stdout
    assert digest in pulled, pulled
    inspected = json.loads(docker.run("image", "inspect", ref).stdout)[0]
    assert inspected["Id"] == config and f"{registry.host}/{repo}@{digest}" in inspected["RepoDigests"]
    assert len(inspected["RootFS"]["Layers"]) == len(image.layers)

    # The push is in the audit log under the user docker logged in as.
    events = json.loads(moorage("audit", "--repo", repo, "--kind", "write", "--json",
                                "--existing", registry.url).stdout)["events"]
    assert events and {e["user"] for e in events} == {"admin"}
    docker.run("logout", registry.host)
    assert not json.loads((docker.config / "config.json").read_text()).get("auths", {}).get(registry.host)
