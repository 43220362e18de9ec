"""Digests: parsing, verification and the hashers behind them.

Only sha256 and sha512 are accepted, in their canonical lowercase hex form,
so a digest is always safe to use as a file name.
"""

from __future__ import annotations

import hashlib
import re

from moorage.registry.errors import DigestInvalid

_HEX_LEN = {"sha256": 64, "sha512": 128}
_DIGEST = re.compile(r"^(sha256|sha512):([a-f0-9]+)$")
# The grammar of the OCI image spec, to tell "malformed" from "unsupported".
_ANY_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")


def parse(digest: str) -> tuple[str, str]:
    """Split and validate a digest; raises DigestInvalid with the reason."""
    m = _DIGEST.match(digest)
    if m is None:
        if _ANY_DIGEST.match(digest):
            raise DigestInvalid(f"unsupported digest algorithm in {digest[:80]!r}",
                                {"supported": sorted(_HEX_LEN)})
        raise DigestInvalid(f"invalid digest {digest[:80]!r}")
    algorithm, hexdigest = m.groups()
    if len(hexdigest) != _HEX_LEN[algorithm]:
        raise DigestInvalid(f"a {algorithm} digest has {_HEX_LEN[algorithm]} hex digits, "
                            f"not {len(hexdigest)}")
    return algorithm, hexdigest


def is_digest(reference: str) -> bool:
    return ":" in reference


def new_hasher(algorithm: str = "sha256"):
    return hashlib.new(algorithm)


def of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
