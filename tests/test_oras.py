"""The Python ORAS client (oras-py) against a real replica, with its default token auth.

oras-py logs in, pushes an artifact, pushes a second one whose `subject` is
the first (a referrer, as signatures and SBOMs are attached), and pulls them
back. It answers a pull's challenge first (it checks whether each blob is
there) and pushes with that same token, so this is the client that needs a
token to carry every action its user may do on the repository.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import oras.client
import oras.oci
import pytest

from conftest import ADMIN_PASSWORD, Registry
from oci import new_repo

pytestmark = pytest.mark.clients

ARTIFACT_TYPE = "application/vnd.moorage.test.report"


def client(registry: Registry, tmp_path: Path, user: str, password: str) -> oras.client.OrasClient:
    c = oras.client.OrasClient(hostname=registry.host, tls_verify=str(registry.ca))  # auth_backend="token"
    # Its login writes a docker config: a scratch one, never the user's.
    c.login(username=user, password=password, hostname=registry.host,
            config_path=str(tmp_path / "docker-config.json"))
    return c


def test_oras_py_pushes_an_artifact_a_referrer_and_pulls_them(registry: Registry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # oras-py pushes files relative to the working directory
    monkeypatch.setenv("HOME", str(tmp_path))  # and reads ~/.docker/config.json: ours is empty
    repo = new_repo("oras")
    target = f"{registry.host}/{repo}:v1"
    Path("report.json").write_text(json.dumps({"passed": 42}))
    Path("notes").mkdir()
    Path("notes/readme.txt").write_text("a directory goes up as a tar.gz layer\n")

    c = client(registry, tmp_path, "admin", ADMIN_PASSWORD)
    pushed = c.push(target=target, files=[f"report.json:{ARTIFACT_TYPE}", "notes"])
    assert pushed.status_code == 201, pushed.text
    digest = pushed.headers["Docker-Content-Digest"]
    manifest = c.get_manifest(target)
    subject = oras.oci.Subject.from_manifest(manifest)
    assert subject.digest == digest  # what oras-py sent is what we stored, byte for byte

    # A referrer: an artifact about the first one, found through the referrers API.
    Path("signature.txt").write_text("signed\n")
    ref_target = f"{registry.host}/{repo}:v1-signature"
    signed = c.push(target=ref_target, files=["signature.txt"], subject=subject,
                    manifest_annotations={"moorage.test": "signature"})
    assert signed.status_code == 201, signed.text
    with registry.client() as http:
        found = http.get(f"/v2/{repo}/referrers/{digest}").json()["manifests"]
    assert [m["digest"] for m in found] == [signed.headers["Docker-Content-Digest"]], found
    assert found[0]["annotations"] == {"moorage.test": "signature"}

    # A fresh client (no token yet) pulls both back.
    out = tmp_path / "pulled"
    puller = client(registry, tmp_path, "admin", ADMIN_PASSWORD)
    files = puller.pull(target=target, outdir=str(out))
    assert sorted(os.path.basename(f) for f in files) == ["notes", "report.json"]
    assert json.loads((out / "report.json").read_text()) == {"passed": 42}
    assert (out / "notes" / "readme.txt").read_text() == "a directory goes up as a tar.gz layer\n"
    files = puller.pull(target=ref_target, outdir=str(tmp_path / "sig"))
    assert (tmp_path / "sig" / "signature.txt").read_text() == "signed\n"
    assert asdict(subject)["size"] == len(json.dumps(manifest).encode())
