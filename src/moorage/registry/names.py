"""What clients name things by: repository names, tags and digests, checked at the edge.

Names never reach the storage (blobs are addressed by digest only), but
they are keys in etcd and parts of URLs. A digest's grammar is moorage/digest.py's;
here a bad one becomes the spec's DIGEST_INVALID.
"""

from __future__ import annotations

import re

from moorage import digest
from moorage.registry.errors import DigestInvalid, ManifestInvalid, NameInvalid

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$")
# The reference registry's bound; long names make long keys and long URLs.
MAX_NAME_LENGTH = 255


def check_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH:
        raise NameInvalid(f"repository name longer than {MAX_NAME_LENGTH} characters",
                          {"length": len(name)})
    if not _NAME.match(name):
        raise NameInvalid(f"invalid repository name {name[:100]!r}",
                          {"grammar": "[a-z0-9]+((.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((.|_|__|-+)[a-z0-9]+)*)*"})
    return name


def check_tag(tag: str) -> str:
    if not _TAG.match(tag):
        # The spec has no TAG_INVALID; the reference registry and the
        # conformance suite treat a bad tag as a bad manifest reference.
        raise ManifestInvalid(f"invalid tag {tag[:130]!r}",
                              {"grammar": "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}"})
    return tag


def is_valid_tag(tag: str) -> bool:
    return bool(_TAG.match(tag))


def check_digest(value: str) -> tuple[str, str]:
    """(algorithm, hex) of a digest a client sent; DigestInvalid with the reason otherwise."""
    try:
        return digest.parse(value)
    except digest.DigestError as e:
        raise DigestInvalid(e.message, e.detail) from None
