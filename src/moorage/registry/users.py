"""Users and their passwords, kept in etcd as argon2id hashes.

The first start creates `admin`; cluster admins add others. Hashing is
deliberately slow (argon2id), so it runs in a thread and never stalls the
event loop; verification is api/auth.py's, against the in-memory copy. Every write is one etcd transaction whose
comparisons carry its preconditions: removing a user removes its team
memberships and grants in the same transaction, and the last cluster admin
cannot be removed, however many admins try at once.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time

import msgspec
from argon2 import PasswordHasher

from moorage.meta import keys
from moorage.meta.etcd import KV, EtcdClient, TxnResult, cmp_absent, cmp_mod_revision, op_delete, op_put
from moorage.meta.index import Index

ADMIN = "admin"
_hasher = PasswordHasher()  # argon2id with the library's recommended cost

# User and team names: short, lowercase, never "/" (key prefixes rely on it).
_PRINCIPAL = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
# Optimistic writes retry this often when another writer changed what they read.
RETRIES = 5


class AccessError(Exception):
    """A refused user, team, grant or visibility change; `kind` is invalid, unknown or refused.

    `message` is one sentence for the admin API and the CLI; it never holds a password.
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


class UserRecord(msgspec.Struct, frozen=True):
    password_hash: str
    admin: bool
    created: float


_decode = msgspec.json.Decoder(UserRecord).decode


def decode_user(value: bytes) -> UserRecord:
    return _decode(value)


def check_principal(name: object, what: str = "user") -> str:
    """A user or team name, or AccessError(invalid)."""
    if not isinstance(name, str) or not _PRINCIPAL.match(name):
        shown = repr(name[:70]) if isinstance(name, str) else "missing"
        raise AccessError("invalid", f"invalid {what} name {shown}: use 1 to 64 of a-z, 0-9, '.', '_', '-', "
                                     "starting with a letter or digit")
    return name


def check_password(password: object) -> str:
    if not isinstance(password, str) or not password:
        raise AccessError("invalid", "a password is required")
    if len(password) < MIN_PASSWORD:
        raise AccessError("invalid", f"the password is too short: at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise AccessError("invalid", f"the password is too long: at most {MAX_PASSWORD} characters")
    return password


async def _hash(password: str) -> str:
    return await asyncio.get_running_loop().run_in_executor(None, _hasher.hash, password)


class Users:
    def __init__(self, client: EtcdClient, index: Index | None = None):
        self.client = client
        self.index = index

    async def _txn(self, compare=(), success=()) -> TxnResult:
        """A write acknowledged only once this replica's index has applied it (read-your-writes)."""
        result = await self.client.txn(compare, success)
        if result.succeeded and self.index is not None:
            await self.index.wait_applied(result.revision)
        return result

    async def ensure_admin(self, password: str | None) -> str | None:
        """Create `admin` if the cluster has none; returns a generated password to show once."""
        if await self.client.get(keys.user(ADMIN)) is not None:
            return None
        generated = None
        if not password:
            password = generated = secrets.token_urlsafe(18)
        digest = await _hash(password)
        record = msgspec.json.encode(UserRecord(password_hash=digest, admin=True, created=time.time()))
        result = await self._txn([cmp_absent(keys.user(ADMIN))], [op_put(keys.user(ADMIN), record)])
        return generated if result.succeeded else None

    async def add(self, name: str, password: str, admin: bool = False) -> UserRecord:
        """Create a user; refused when the name is taken."""
        check_principal(name)
        check_password(password)
        record = UserRecord(password_hash=await _hash(password), admin=bool(admin), created=time.time())
        result = await self._txn([cmp_absent(keys.user(name))], [op_put(keys.user(name), msgspec.json.encode(record))])
        if not result.succeeded:
            raise AccessError("refused", f"the user {name} already exists")
        return record

    async def _get(self, name: str) -> KV:
        kv = await self.client.get(keys.user(check_principal(name)))
        if kv is None:
            raise AccessError("unknown", f"no user {name}")
        return kv

    async def set_password(self, name: str, password: str) -> None:
        check_principal(name)
        check_password(password)
        digest = await _hash(password)
        for _ in range(RETRIES):
            kv = await self._get(name)
            record = msgspec.structs.replace(_decode(kv.value), password_hash=digest)
            key = keys.user(name)
            if (await self._txn([cmp_mod_revision(key, kv.mod_revision)],
                                [op_put(key, msgspec.json.encode(record))])).succeeded:
                return
        raise AccessError("refused", f"the user {name} kept changing while its password was set; try again")

    async def remove(self, name: str) -> None:
        """Delete a user with its memberships and grants; never the last cluster admin."""
        check_principal(name)
        for _ in range(RETRIES):
            kv = await self._get(name)
            key = keys.user(name)
            compare = [cmp_mod_revision(key, kv.mod_revision)]
            if _decode(kv.value).admin:
                other = await self._other_admin(name)
                if other is None:
                    raise AccessError("refused", f"the user {name} is the last cluster admin and cannot be "
                                                 "removed; make another admin first")
                # Two admins removing each other at once: one of these compares fails.
                compare.append(cmp_mod_revision(other.key, other.mod_revision))
            ops = [op_delete(key), op_delete(keys.memberships(name), prefix=True),
                   op_delete(keys.user_grants(name), prefix=True)]
            if (await self._txn(compare, ops)).succeeded:
                return
        raise AccessError("refused", f"the user {name} kept changing while being removed; try again")

    async def _other_admin(self, name: str) -> KV | None:
        _, kvs = await self.client.range_prefix(keys.USER)
        for kv in kvs:
            if kv.key != keys.user(name):
                try:
                    if _decode(kv.value).admin:
                        return kv
                except msgspec.DecodeError:
                    continue
        return None
