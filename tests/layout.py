"""OCI image layout directories built from random data, for tests and demos.

`python tests/layout.py DIR [TAG]` writes a small, valid single-image layout
that `skopeo copy oci:DIR:TAG docker://...` can push.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from oci import OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, descriptor, sha256  # noqa: E402

REF_NAME = "org.opencontainers.image.ref.name"


def tar_gz_layer(rng: random.Random, n_files: int, max_file: int) -> tuple[bytes, bytes]:
    """A real gzip-compressed tar of random files; returns (compressed, uncompressed)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        top = f"d{rng.randrange(1 << 30):x}"
        info = tarfile.TarInfo(top)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
        tar.addfile(info)
        for i in range(n_files):
            data = rng.randbytes(rng.randrange(1, max_file))
            info = tarfile.TarInfo(f"{top}/file-{i}.bin")
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000 + i
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo(f"{top}/link")
        link.type, link.linkname, link.mtime = tarfile.SYMTYPE, "file-0.bin", 1_700_000_000
        tar.addfile(link)
    uncompressed = raw.getvalue()
    return gzip.compress(uncompressed, compresslevel=1, mtime=0), uncompressed


@dataclass
class LayoutImage:
    manifest: bytes
    config: bytes
    layers: list[bytes]
    platform: dict

    @property
    def digest(self) -> str:
        return sha256(self.manifest)

    @property
    def blobs(self) -> list[bytes]:
        return [self.manifest, self.config, *self.layers]


@dataclass
class Layout:
    """An OCI image layout directory being written: oci-layout, index.json, blobs/sha256."""

    path: Path
    refs: list[dict] = field(default_factory=list)
    blobs: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        (self.path / "blobs" / "sha256").mkdir(parents=True)
        (self.path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        self._write_index()

    def add_blob(self, data: bytes) -> str:
        digest = sha256(data)
        (self.path / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(data)
        self.blobs[digest] = data
        return digest

    def tag(self, tag: str, media_type: str, data: bytes) -> None:
        self.refs.append(descriptor(media_type, data, annotations={REF_NAME: tag}))
        self._write_index()

    def _write_index(self) -> None:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.refs}
        (self.path / "index.json").write_text(json.dumps(index, indent=2))

    def image(self, rng: random.Random, n_layers: int = 3, arch: str = "amd64",
              variant: str | None = None, max_file: int = 96 * 1024) -> LayoutImage:
        layers, diff_ids = [], []
        for _ in range(n_layers):
            compressed, uncompressed = tar_gz_layer(rng, rng.randrange(2, 8), max_file)
            layers.append(compressed)
            diff_ids.append(sha256(uncompressed))
        platform = {"architecture": arch, "os": "linux", **({"variant": variant} if variant else {})}
        config = json.dumps({
            "created": "2024-01-02T03:04:05Z",
            **platform,
            "config": {"Env": ["PATH=/usr/bin:/bin", f"NONCE={rng.randrange(1 << 62)}"],
                       "Cmd": ["/bin/sh"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": "2024-01-02T03:04:05Z", "created_by": f"layer {i}"}
                        for i in range(n_layers)],
        }, indent=2).encode()
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, config),
            "layers": [descriptor(OCI_LAYER, layer) for layer in layers],
            "annotations": {"org.opencontainers.image.title": f"moorage-test-{arch}"},
        }, indent=3).encode()
        for blob in (config, *layers, manifest):
            self.add_blob(blob)
        return LayoutImage(manifest, config, layers, platform)

    def index(self, images: list[LayoutImage]) -> bytes:
        index = json.dumps({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [descriptor(OCI_MANIFEST, img.manifest, platform=img.platform)
                          for img in images],
        }, indent=2).encode()
        self.add_blob(index)
        return index


def read_layout(path: Path) -> tuple[dict[str, dict], dict[str, bytes]]:
    """A layout on disk: ({tag: top-level descriptor}, {digest: bytes}), checking every blob."""
    assert json.loads((path / "oci-layout").read_text())["imageLayoutVersion"]
    index = json.loads((path / "index.json").read_text())
    refs = {d["annotations"][REF_NAME]: d for d in index["manifests"]
            if REF_NAME in d.get("annotations", {})}
    blobs = {}
    for f in (path / "blobs" / "sha256").iterdir():
        data = f.read_bytes()
        assert sha256(data) == "sha256:" + f.name, f"{f} does not hash to its name"
        blobs["sha256:" + f.name] = data
    return refs, blobs




def main(argv: list[str]) -> int:
    if not argv or len(argv) > 2:
        print("usage: python tests/layout.py DIR [TAG]", file=sys.stderr)
        return 2
    path, tag = Path(argv[0]), (argv[1] if len(argv) > 1 else "v1")
    if path.exists():
        print(f"layout: {path} already exists", file=sys.stderr)
        return 1
    layout = Layout(path)
    image = layout.image(random.Random())
    layout.tag(tag, OCI_MANIFEST, image.manifest)
    print(f"wrote {path} with {tag} = {image.digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
