"""A real client against a real registry: skopeo pushes and pulls OCI and Docker images.

Images are built from random data as OCI image layouts on disk (real tar+gzip
layers, a proper config), copied into the registry with `skopeo copy`, pulled
back into fresh layouts and compared byte for byte.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import uuid

import pytest

from conftest import ADMIN_PASSWORD, DRIVERS, Registry, on_both_drivers
from layout import Layout, LayoutImage, read_layout
from oci import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    sha256,
)

pytestmark = pytest.mark.clients


@pytest.fixture(scope="module", params=DRIVERS)
def registry(request, registry):
    """Every round trip here runs on both blob drivers (the s3 one on a real SeaweedFS)."""
    return on_both_drivers(request, registry)

SKOPEO = shutil.which("skopeo") or "/usr/bin/skopeo"


# --------------------------------------------------------------------------- skopeo


def skopeo(*args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
    """Run skopeo; with check, assert it exited 0 and show its stderr if not."""
    cmd = [SKOPEO, "--insecure-policy", "--command-timeout", f"{int(timeout)}s", *args[:1], *creds(args),
           *args[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 10)
    if check:
        assert proc.returncode == 0, (
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


def creds(args: tuple[str, ...] | list[str]) -> list[str]:
    """The admin's `--creds` for the `docker://` references in a skopeo command,
    unless the command already says whose credentials to use (or none)."""
    if not args or any(a.split("=")[0].endswith(("creds", "username", "password", "registry-token")) for a in args):
        return []
    admin = f"admin:{ADMIN_PASSWORD}"
    if args[0] == "copy":
        return ((["--src-creds", admin] if args[-2].startswith("docker://") else [])
                + (["--dest-creds", admin] if args[-1].startswith("docker://") else []))
    return ["--creds", admin] if any(a.startswith("docker://") for a in args) else []


def tls(ref: str, side: str = "") -> list[str]:
    """skopeo's flags to trust the CA of the registry a `docker://` reference names
    (`side` is "src-" or "dest-" for copy): DATA_DIR/tls holds only the CA, as --cert-dir wants."""
    if not ref.startswith("docker://"):
        return []
    registry = Registry.started[f"https://{ref.removeprefix('docker://').split('/', 1)[0]}"]
    return [f"--{side}cert-dir", str(registry.cert_dir)]


def push(src: str, dest: str, *extra: str) -> None:
    skopeo("copy", *tls(dest, "dest-"), *extra, src, dest)


def pull(src: str, dest: str, *extra: str) -> None:
    skopeo("copy", *tls(src, "src-"), *extra, src, dest)


def inspect_raw(ref: str) -> bytes:
    out = subprocess.run(
        [SKOPEO, "--insecure-policy", "--command-timeout", "60s", "inspect", *creds(["inspect", ref]), "--raw",
         *tls(ref), ref],
        capture_output=True, timeout=70)
    assert out.returncode == 0, (ref, out.returncode, out.stderr.decode(errors="replace"))
    return out.stdout


def inspect(ref: str, *extra: str) -> dict:
    return json.loads(skopeo("inspect", *tls(ref), *extra, ref).stdout)


def assert_image_pulled(blobs: dict[str, bytes], image: LayoutImage) -> None:
    for blob in image.blobs:
        d = sha256(blob)
        assert d in blobs, f"{d} ({len(blob)} bytes) missing from pulled layout"
        assert blobs[d] == blob, f"{d} differs after the round trip"


@pytest.fixture
def rng() -> random.Random:
    seed = int.from_bytes(os.urandom(4), "big")
    print(f"random seed {seed}")
    return random.Random(seed)


@pytest.fixture
def repo() -> str:
    return f"skopeo/{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------------- tests


def test_layout_builder_is_valid_for_skopeo(tmp_path, rng):
    """The layouts built here are real OCI layouts: skopeo copies one locally, digests intact."""
    src = Layout(tmp_path / "src")
    img = src.image(rng, n_layers=2)
    src.tag("v1", OCI_MANIFEST, img.manifest)
    skopeo("copy", "--preserve-digests", "oci:" + str(src.path) + ":v1", f"oci:{tmp_path / 'dst'}:v1")
    refs, blobs = read_layout(tmp_path / "dst")
    assert refs["v1"]["digest"] == img.digest
    assert_image_pulled(blobs, img)


def test_oci_image_round_trip(registry, tmp_path, rng, repo):
    src = Layout(tmp_path / "src")
    img = src.image(rng, n_layers=4, max_file=256 * 1024)
    src.tag("v1", OCI_MANIFEST, img.manifest)
    ref = f"docker://{registry.host}/{repo}:v1"

    push(f"oci:{src.path}:v1", ref, "--preserve-digests")

    raw = inspect_raw(ref)
    assert raw == img.manifest, "the registry serves other manifest bytes than were pushed"
    info = inspect(ref)
    assert info["Digest"] == img.digest
    assert info["Layers"] == [sha256(layer) for layer in img.layers]
    assert info["Architecture"] == "amd64" and info["Os"] == "linux"
    assert inspect_raw(f"docker://{registry.host}/{repo}@{img.digest}") == img.manifest

    out = tmp_path / "out"
    pull(ref, f"oci:{out}:v1", "--preserve-digests")
    refs, blobs = read_layout(out)
    assert refs["v1"]["digest"] == img.digest
    assert refs["v1"]["mediaType"] == OCI_MANIFEST
    assert_image_pulled(blobs, img)

    # Pushing the same image again under another tag reuses the blobs and gives the same digest.
    push(f"oci:{src.path}:v1", f"docker://{registry.host}/{repo}:again", "--preserve-digests")
    assert inspect(f"docker://{registry.host}/{repo}:again")["Digest"] == img.digest


def test_multi_platform_index_round_trip(registry, tmp_path, rng, repo):
    src = Layout(tmp_path / "src")
    amd64 = src.image(rng, n_layers=3, arch="amd64")
    arm64 = src.image(rng, n_layers=2, arch="arm64", variant="v8")
    index = src.index([amd64, arm64])
    src.tag("multi", OCI_INDEX, index)
    ref = f"docker://{registry.host}/{repo}:multi"

    push(f"oci:{src.path}:multi", ref, "--all", "--preserve-digests")

    assert inspect_raw(ref) == index
    for img in (amd64, arm64):
        assert inspect_raw(f"docker://{registry.host}/{repo}@{img.digest}") == img.manifest
    # skopeo inspect reports the index's digest and the chosen platform's image.
    picked = inspect(ref, "--override-arch", "arm64", "--override-variant", "v8")
    assert picked["Digest"] == sha256(index)
    assert picked["Architecture"] == "arm64"
    assert picked["Layers"] == [sha256(layer) for layer in arm64.layers]
    picked = inspect(ref, "--override-arch", "amd64")
    assert picked["Digest"] == sha256(index)
    assert picked["Architecture"] == "amd64"
    assert picked["Layers"] == [sha256(layer) for layer in amd64.layers]
    assert inspect(f"docker://{registry.host}/{repo}@{arm64.digest}")["Digest"] == arm64.digest

    out = tmp_path / "out"
    pull(ref, f"oci:{out}:multi", "--all", "--preserve-digests")
    refs, blobs = read_layout(out)
    assert refs["multi"]["digest"] == sha256(index)
    assert refs["multi"]["mediaType"] == OCI_INDEX
    assert blobs[sha256(index)] == index
    assert_image_pulled(blobs, amd64)
    assert_image_pulled(blobs, arm64)

    # Without --all skopeo picks one platform from the index: only that image comes down.
    one = tmp_path / "one"
    pull(ref, f"oci:{one}:arm", "--override-arch", "arm64", "--override-variant", "v8")
    refs, blobs = read_layout(one)
    assert refs["arm"]["digest"] == arm64.digest
    assert_image_pulled(blobs, arm64)
    assert not set(map(sha256, amd64.layers)) & set(blobs)


def test_docker_v2s2_round_trip(registry, tmp_path, rng, repo):
    src = Layout(tmp_path / "src")
    img = src.image(rng, n_layers=3)
    src.tag("v1", OCI_MANIFEST, img.manifest)
    ref = f"docker://{registry.host}/{repo}:docker"

    push(f"oci:{src.path}:v1", ref, "--format", "v2s2")

    raw = inspect_raw(ref)
    manifest = json.loads(raw)
    assert manifest["mediaType"] == DOCKER_MANIFEST
    assert manifest["config"]["mediaType"] == DOCKER_CONFIG
    assert [layer["mediaType"] for layer in manifest["layers"]] == [DOCKER_LAYER] * 3
    assert [layer["digest"] for layer in manifest["layers"]] == [sha256(x) for x in img.layers]
    info = inspect(ref)
    assert info["Digest"] == sha256(raw)
    assert info["Layers"] == [sha256(x) for x in img.layers]

    # dir: keeps the manifest exactly as served; every blob must match what was pushed.
    out = tmp_path / "dir"
    pull(ref, f"dir:{out}", "--preserve-digests")
    assert (out / "manifest.json").read_bytes() == raw
    config_digest = manifest["config"]["digest"]
    config = (out / config_digest.removeprefix("sha256:")).read_bytes()
    assert sha256(config) == config_digest
    assert json.loads(config)["rootfs"] == json.loads(img.config)["rootfs"]
    for layer in img.layers:
        assert (out / sha256(layer).removeprefix("sha256:")).read_bytes() == layer

    # Pulling the Docker image by digest into an OCI layout converts the manifest, not the layers.
    oci_out = tmp_path / "oci"
    pull(f"docker://{registry.host}/{repo}@{sha256(raw)}", f"oci:{oci_out}:conv")
    refs, blobs = read_layout(oci_out)
    converted = json.loads(blobs[refs["conv"]["digest"]])
    assert converted["mediaType"] == OCI_MANIFEST
    for layer in img.layers:
        assert blobs[sha256(layer)] == layer


def test_list_tags(registry, tmp_path, rng, repo):
    src = Layout(tmp_path / "src")
    one, two = src.image(rng, n_layers=1), src.image(rng, n_layers=1)
    src.tag("one", OCI_MANIFEST, one.manifest)
    src.tag("two", OCI_MANIFEST, two.manifest)
    tags = ["latest", "v1.0", "v1.0.1-rc_1", "two"]
    for tag in tags[:3]:
        push(f"oci:{src.path}:one", f"docker://{registry.host}/{repo}:{tag}", "--preserve-digests")
    push(f"oci:{src.path}:two", f"docker://{registry.host}/{repo}:two", "--preserve-digests")

    listed = json.loads(skopeo("list-tags", *tls(f"docker://{registry.host}/{repo}"),
                               f"docker://{registry.host}/{repo}").stdout)
    assert listed["Repository"] == f"{registry.host}/{repo}"
    assert sorted(listed["Tags"]) == sorted(tags)
    assert inspect(f"docker://{registry.host}/{repo}:v1.0.1-rc_1")["Digest"] == one.digest
    assert inspect(f"docker://{registry.host}/{repo}:two")["Digest"] == two.digest


def test_delete_by_digest_and_by_tag(registry, tmp_path, rng, repo):
    src = Layout(tmp_path / "src")
    images = {name: src.image(rng, n_layers=1) for name in ("a", "b", "c")}
    for name, img in images.items():
        src.tag(name, OCI_MANIFEST, img.manifest)
        push(f"oci:{src.path}:{name}", f"docker://{registry.host}/{repo}:{name}", "--preserve-digests")
    base = f"docker://{registry.host}/{repo}"

    skopeo("delete", *tls(base), f"{base}@{images['a'].digest}")
    for ref in (f"{base}@{images['a'].digest}", f"{base}:a"):
        gone = skopeo("copy", *tls(ref, "src-"), ref, f"oci:{tmp_path / 'gone-a'}:x", check=False)
        assert gone.returncode != 0, f"pulling {ref} after its deletion succeeded"
        assert "manifest unknown" in gone.stderr.lower(), gone.stderr

    skopeo("delete", *tls(base), f"{base}:b")
    for ref in (f"{base}:b", f"{base}@{images['b'].digest}"):
        gone = skopeo("inspect", "--raw", *tls(ref), ref, check=False)
        assert gone.returncode != 0, f"inspecting {ref} after its deletion succeeded"
        assert "manifest unknown" in gone.stderr.lower(), gone.stderr

    # The untouched image is intact, and the listing only shows what is left.
    out = tmp_path / "c"
    pull(f"{base}:c", f"oci:{out}:c", "--preserve-digests")
    refs, blobs = read_layout(out)
    assert refs["c"]["digest"] == images["c"].digest
    assert_image_pulled(blobs, images["c"])
    listed = json.loads(skopeo("list-tags", *tls(base), base).stdout)
    assert listed["Tags"] == ["c"]

    # A deleted manifest can be pushed again.
    push(f"oci:{src.path}:a", f"{base}:a", "--preserve-digests")
    assert inspect_raw(f"{base}:a") == images["a"].manifest
