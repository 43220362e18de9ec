"""Digests: parsing, verification and the hashers behind them.

Only sha256 and sha512 are accepted, in their canonical lowercase hex form,
so a digest is always safe to use as a file name or an object key. Every
layer needs digests (storage names blobs by them), so this module sits below
them all and raises its own error: the registry turns it into the spec's
DIGEST_INVALID where a client sent the digest (registry/names.py).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

_HEX_LEN = {"sha256": 64, "sha512": 128}
_DIGEST = re.compile(r"^(sha256|sha512):([a-f0-9]+)$")
# The grammar of the OCI image spec, to tell "malformed" from "unsupported".
_ANY_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
SUPPORTED = tuple(sorted(_HEX_LEN))


class DigestError(ValueError):
    """Not a digest this registry accepts; `message` says why in one sentence, `detail` for the client."""

    def __init__(self, message: str, detail: Any = None):
        super().__init__(message)
        self.message = message
        self.detail = detail


def parse(digest: str) -> tuple[str, str]:
    """Split and validate a digest: (algorithm, hex); raises DigestError with the reason."""
    m = _DIGEST.match(digest)
    if m is None:
        if _ANY_DIGEST.match(digest):
            raise DigestError(f"unsupported digest algorithm in {digest[:80]!r}", {"supported": list(SUPPORTED)})
        raise DigestError(f"invalid digest {digest[:80]!r}")
    algorithm, hexdigest = m.groups()
    if len(hexdigest) != _HEX_LEN[algorithm]:
        raise DigestError(f"a {algorithm} digest has {_HEX_LEN[algorithm]} hex digits, not {len(hexdigest)}")
    return algorithm, hexdigest


def is_digest(reference: str) -> bool:
    return ":" in reference


def new_hasher(algorithm: str = "sha256"):
    return hashlib.new(algorithm)


def of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
