"""Users and their passwords, kept in etcd as argon2id hashes.

For now Moorage knows one user, `admin`, whom the cluster commands (join,
remove, config) authenticate as. Verification is deliberately slow (argon2id),
so it runs in a thread and never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import secrets
import time

import msgspec
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from moorage.meta import keys
from moorage.meta.etcd import EtcdClient, cmp_absent, op_put

ADMIN = "admin"
_hasher = PasswordHasher()  # argon2id with the library's recommended cost


class UserRecord(msgspec.Struct, frozen=True):
    password_hash: str
    admin: bool
    created: float


_decode = msgspec.json.Decoder(UserRecord).decode


class Users:
    def __init__(self, client: EtcdClient):
        self.client = client

    async def ensure_admin(self, password: str | None) -> str | None:
        """Create `admin` if the cluster has none; returns a generated password to show once."""
        if await self.client.get(keys.user(ADMIN)) is not None:
            return None
        generated = None
        if not password:
            password = generated = secrets.token_urlsafe(18)
        digest = await asyncio.get_running_loop().run_in_executor(None, _hasher.hash, password)
        record = msgspec.json.encode(UserRecord(password_hash=digest, admin=True, created=time.time()))
        result = await self.client.txn([cmp_absent(keys.user(ADMIN))], [op_put(keys.user(ADMIN), record)])
        return generated if result.succeeded else None

    async def verify(self, name: str, password: str) -> UserRecord | None:
        """The user, if `password` is theirs.

        A serializable read: the local member answers without quorum, so an
        admin can still log in to see what is wrong with the cluster.
        """
        kv = await self.client.get(keys.user(name), serializable=True)
        if kv is None:
            return None
        record = _decode(kv.value)
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, _hasher.verify, record.password_hash, password)
        except (VerificationError, InvalidHashError):
            return None
        return record
