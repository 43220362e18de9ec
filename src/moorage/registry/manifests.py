"""Manifest parsing and validation: what a manifest references and declares.

Accepts the OCI image manifest and index and Docker's schema2 manifest and
manifest list. The result names every blob and child manifest that must exist
before the manifest may be stored, and the subject and artifact type the
referrers API needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from moorage.meta.records import Referrer
from moorage import digest as digests
from moorage.registry.errors import ManifestInvalid

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = IMAGE_TYPES | INDEX_TYPES

# Layers that live elsewhere (Windows base layers and the like) are not
# expected in the registry; their descriptors carry `urls`.
_FOREIGN = ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            "application/vnd.oci.image.layer.nondistributable")


@dataclass(slots=True)
class ParsedManifest:
    media_type: str
    blobs: list[str] = field(default_factory=list)
    children: list[str] = field(default_factory=list)
    subject: str | None = None
    artifact_type: str | None = None
    annotations: dict[str, str] | None = None

    def referrer(self, digest: str, size: int) -> Referrer | None:
        if self.subject is None:
            return None
        return Referrer(media_type=self.media_type, digest=digest, size=size,
                        artifact_type=self.artifact_type, annotations=self.annotations)


def _descriptor(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ManifestInvalid(f"{where} is not a descriptor")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise ManifestInvalid(f"{where} has no mediaType")
    if not isinstance(digest, str):
        raise ManifestInvalid(f"{where} has no digest")
    try:
        digests.parse(digest)
    except digests.DigestError as e:
        raise ManifestInvalid(f"{where}: {e.message}") from None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestInvalid(f"{where} has no valid size")
    return value


def _annotations(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ManifestInvalid("annotations must map strings to strings")
    return value or None


def _media_type(doc: dict, content_type: str | None) -> str:
    declared = doc.get("mediaType")
    content_type = (content_type or "").split(";")[0].strip() or None
    if declared is not None and not isinstance(declared, str):
        raise ManifestInvalid("mediaType must be a string")
    if declared and content_type in MANIFEST_TYPES and declared != content_type:
        raise ManifestInvalid(f"mediaType {declared} does not match Content-Type {content_type}")
    media_type = declared or (content_type if content_type in MANIFEST_TYPES else None)
    if media_type is None:
        # OCI makes mediaType optional; the shape tells which kind it is.
        media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if media_type not in MANIFEST_TYPES:
        raise ManifestInvalid(f"unsupported manifest media type {media_type!r}",
                              {"supported": sorted(MANIFEST_TYPES)})
    return media_type


def parse(body: bytes, content_type: str | None) -> ParsedManifest:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestInvalid(f"manifest is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ManifestInvalid("manifest must be a JSON object")
    if doc.get("schemaVersion") != 2:
        raise ManifestInvalid("schemaVersion must be 2")
    media_type = _media_type(doc, content_type)
    parsed = ParsedManifest(media_type=media_type, annotations=_annotations(doc.get("annotations")))

    artifact_type = doc.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise ManifestInvalid("artifactType must be a string")

    if media_type in IMAGE_TYPES:
        config = _descriptor(doc.get("config"), "config")
        layers = doc.get("layers", [])
        if not isinstance(layers, list):
            raise ManifestInvalid("layers must be a list")
        parsed.blobs.append(config["digest"])
        for i, layer in enumerate(layers):
            layer = _descriptor(layer, f"layers[{i}]")
            if layer.get("urls") and layer["mediaType"].startswith(_FOREIGN):
                continue
            parsed.blobs.append(layer["digest"])
        # The referrers API reports an image's artifactType, else its config's type.
        parsed.artifact_type = artifact_type or config["mediaType"]
    else:
        children = doc.get("manifests")
        if not isinstance(children, list):
            raise ManifestInvalid("an index must list its manifests")
        for i, child in enumerate(children):
            parsed.children.append(_descriptor(child, f"manifests[{i}]")["digest"])
        parsed.artifact_type = artifact_type

    subject = doc.get("subject")
    if subject is not None:
        parsed.subject = _descriptor(subject, "subject")["digest"]
    return parsed
