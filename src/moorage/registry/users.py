"""Users and their passwords, kept in etcd as argon2id hashes.

The first start creates `admin`; cluster admins add others. Hashing is
deliberately slow (argon2id), so it runs in a thread and never stalls the
event loop; verification is api/auth.py's, against the in-memory copy
(meta/access.py). Every write is one etcd transaction (MetaStore) whose
comparisons carry its preconditions: removing a user removes its team
memberships and grants in the same transaction, and the last cluster admin
cannot be removed, however many admins try at once.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time

from argon2 import PasswordHasher

from moorage.meta.records import UserRecord
from moorage.meta.store import Change, MetaStore

ADMIN = "admin"
_hasher = PasswordHasher()  # argon2id with the library's recommended cost

# User and team names: short, lowercase, never "/" (key prefixes rely on it).
_PRINCIPAL = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MIN_PASSWORD = 8
MAX_PASSWORD = 1024


class AccessError(Exception):
    """A refused user, team, grant or visibility change; `kind` is invalid, unknown or refused.

    `message` is one sentence for the admin API and the CLI; it never holds a password.
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


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
    """Adding, changing and removing users: validated and hashed here, written by MetaStore."""

    def __init__(self, meta: MetaStore):
        self.meta = meta

    async def ensure_admin(self, password: str | None) -> str | None:
        """Create `admin` if the cluster has none; returns a generated password to show once."""
        if await self.meta.user_exists(ADMIN):
            return None
        generated = None
        if not password:
            password = generated = secrets.token_urlsafe(18)
        record = UserRecord(password_hash=await _hash(password), admin=True, created=time.time())
        return generated if await self.meta.add_user(ADMIN, record) else None

    async def add(self, name: str, password: str, admin: bool = False) -> UserRecord:
        """Create a user; refused when the name is taken."""
        check_principal(name)
        check_password(password)
        record = UserRecord(password_hash=await _hash(password), admin=bool(admin), created=time.time())
        if not await self.meta.add_user(name, record):
            raise AccessError("refused", f"the user {name} already exists")
        return record

    async def set_password(self, name: str, password: str) -> None:
        check_principal(name)
        check_password(password)
        done = await self.meta.set_password_hash(name, await _hash(password))
        if done is Change.MISSING:
            raise AccessError("unknown", f"no user {name}")
        if done is Change.CONFLICT:
            raise AccessError("refused", f"the user {name} kept changing while its password was set; try again")

    async def remove(self, name: str) -> None:
        """Delete a user with its memberships and grants; never the last cluster admin."""
        check_principal(name)
        done = await self.meta.remove_user(name)
        if done is Change.MISSING:
            raise AccessError("unknown", f"no user {name}")
        if done is Change.LAST_ADMIN:
            raise AccessError("refused", f"the user {name} is the last cluster admin and cannot be "
                                         "removed; make another admin first")
        if done is Change.CONFLICT:
            raise AccessError("refused", f"the user {name} kept changing while being removed; try again")
