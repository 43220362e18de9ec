"""What the metadata stores raise when etcd does not answer: one error, translated here once.

etcd's client raises EtcdUnavailable (meta/etcd.py) on a timeout or without
quorum. The stores the registry writes through (MetaStore, GcStore) turn it
into MetadataUnavailable at their boundary (`boundary`), so no caller above
meta/ ever names etcd: the registry answers it with the spec's UNAVAILABLE,
a 503 (registry/errors.py).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from moorage.meta.etcd import EtcdUnavailable

P = ParamSpec("P")
T = TypeVar("T")


class MetadataUnavailable(Exception):
    """The metadata store (the etcd quorum) cannot be reached; writes must wait. str() is one sentence."""

    @classmethod
    def because(cls, cause: Exception) -> "MetadataUnavailable":
        return cls("writes are refused: the metadata store did not answer; this replica has lost "
                   f"contact with the etcd quorum or its etcd is down ({cause})")


def boundary(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """A store's method as callers above meta/ see it: EtcdUnavailable becomes MetadataUnavailable."""

    @functools.wraps(method)
    async def translated(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except EtcdUnavailable as e:
            raise MetadataUnavailable.because(e) from None

    return translated
