"""Repository and tag name grammar of the OCI distribution spec.

Names never reach the filesystem (blobs are addressed by digest only), but
they are keys in etcd and parts of URLs, so they are checked at the edge.
"""

from __future__ import annotations

import re

from moorage.registry.errors import ManifestInvalid, NameInvalid

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
