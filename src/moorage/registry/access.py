"""Who may do what to which repository: users, teams, grants and visibility.

Every replica keeps all of it in memory, fed by the index's etcd watch
(`Index.subscribe`), so an access decision is a handful of dict lookups and
never an etcd read. Changes reach every replica within the watch's latency.

A grant gives a user or a team a role on a pattern: a repository name,
`<namespace>/*` (every repository under `<namespace>/`, at any depth) or `*`
(every repository). Roles: read (pull), write (pull, push), admin (pull,
push, delete). A user may do the union of what its own grants and its teams'
grants allow; cluster admins may do everything.

Visibility marks a pattern public or private; the most specific pattern that
says anything decides (the exact name, then the longest namespace, then `*`),
and a repository nothing speaks for is private. Anyone, even anonymous, may
pull a public repository.

Writes are etcd transactions whose comparisons carry their preconditions (a
grant names a user or team that exists, a member joins a team that exists),
so a write racing a deletion can never leave a dangling record behind.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import msgspec

from moorage.meta import keys
from moorage.meta.etcd import (
    EtcdClient, Event, TxnResult, cmp_absent, cmp_exists, cmp_prefix_unchanged, op_delete, op_put,
)
from moorage.meta.index import Index
from moorage.registry.errors import NameInvalid
from moorage.registry.names import check_name
from moorage.registry.users import RETRIES, AccessError, UserRecord, Users, check_principal, decode_user

__all__ = ["Access", "AccessError", "ROLES", "check_pattern", "patterns_for"]

log = logging.getLogger(__name__)

PULL, PUSH, DELETE = "pull", "push", "delete"
ROLES: dict[str, frozenset[str]] = {
    "read": frozenset({PULL}),
    "write": frozenset({PULL, PUSH}),
    "admin": frozenset({PULL, PUSH, DELETE}),
}
EVERYTHING = ROLES["admin"]
NOTHING: frozenset[str] = frozenset()
PUBLIC = ROLES["read"]
# Subjects of grants, as spelled in keys and in the admin API.
USER, TEAM = "user", "team"


class TeamRecord(msgspec.Struct, frozen=True):
    created: float


class GrantRecord(msgspec.Struct, frozen=True):
    role: str


class VisibilityRecord(msgspec.Struct, frozen=True):
    public: bool


_team = msgspec.json.Decoder(TeamRecord)
_grant = msgspec.json.Decoder(GrantRecord)
_visibility = msgspec.json.Decoder(VisibilityRecord)
_encode = msgspec.json.encode


def check_pattern(pattern: object) -> str:
    """A repository name, `<namespace>/*` or `*`; else AccessError(invalid)."""
    if not isinstance(pattern, str) or not pattern:
        raise AccessError("invalid", "a repository is required: a name, NAMESPACE/* or *")
    if pattern == "*":
        return pattern
    name = pattern[:-2] if pattern.endswith("/*") else pattern
    try:
        check_name(name)
    except NameInvalid:
        raise AccessError("invalid", f"invalid repository {pattern[:100]!r}: use a repository name, "
                                     "NAMESPACE/* or *") from None
    return pattern


def check_role(role: object) -> str:
    if role not in ROLES:
        shown = repr(role[:20]) if isinstance(role, str) else "missing"
        raise AccessError("invalid", f"invalid role {shown}: use read, write or admin")
    return role  # type: ignore[return-value]


def patterns_for(repo: str) -> list[str]:
    """Every pattern that covers `repo`, most specific first: the name, its namespaces
    from the longest, then `*`."""
    found = [repo]
    at = repo.rfind("/")
    while at > 0:
        found.append(repo[:at] + "/*")
        at = repo.rfind("/", 0, at)
    found.append("*")
    return found


def _covers(pattern: str, repo: str) -> bool:
    return pattern == "*" or pattern == repo or (pattern.endswith("/*") and repo.startswith(pattern[:-1]))


class Access:
    """The in-memory access model of one replica, and the writes that change it.

    Construct it before `index.start()`: it subscribes to the index, which
    feeds it the records already in etcd on load and every change after.
    """

    def __init__(self, client: EtcdClient, index: Index):
        self.client = client
        self.index = index
        self.users = Users(client, index)
        self._reset()
        # One reset for all: a reload after compaction must forget what was deleted meanwhile.
        index.subscribe(keys.USER, self._on_user, reset=self._reset)
        index.subscribe(keys.TEAM, self._on_team)
        index.subscribe(keys.MEMBER, self._on_member)
        index.subscribe(keys.GRANT, self._on_grant)
        index.subscribe(keys.VISIBILITY, self._on_visibility)
        index.subscribe(keys.SESSION_REVOKED, self._on_session_revoked)

    # -- decisions (the hot path: dict lookups only) -------------------------------

    def user(self, name: str) -> UserRecord | None:
        return self._users.get(name)

    def is_admin(self, name: str | None) -> bool:
        record = self._users.get(name) if name is not None else None
        return record is not None and record.admin

    def is_public(self, repo: str, covering: list[str] | None = None) -> bool:
        for pattern in covering or patterns_for(repo):
            public = self._visibility.get(pattern)
            if public is not None:
                return public
        return False

    def actions(self, user: str | None, repo: str) -> frozenset[str]:
        """What `user` (None: anonymous) may do to `repo`: a subset of pull, push, delete.

        A user who does not exist (deleted since its token was issued) gets
        no more than anonymous does.
        """
        covering = patterns_for(repo)
        base = PUBLIC if self.is_public(repo, covering) else NOTHING
        record = self._users.get(user) if user is not None else None
        if record is None or user is None:
            return base
        if record.admin:
            return EVERYTHING
        allowed = set(base)
        subjects = [(USER, user)] + [(TEAM, t) for t in self._memberships.get(user, ()) if t in self._teams]
        for subject in subjects:
            grants = self._grants.get(subject)
            if grants:
                for pattern in covering:
                    role = grants.get(pattern)
                    if role is not None:
                        allowed |= ROLES[role]
        return frozenset(allowed) if len(allowed) != len(base) else base

    def session_revoked(self, session_id: str) -> bool:
        """Whether a console session was signed out (api/console/session.py)."""
        return session_id in self._revoked_sessions

    # -- the watch ------------------------------------------------------------------

    def _reset(self) -> None:
        self._users: dict[str, UserRecord] = {}
        self._teams: dict[str, TeamRecord] = {}
        self._memberships: dict[str, set[str]] = {}               # user -> teams
        self._grants: dict[tuple[str, str], dict[str, str]] = {}  # (user|team, name) -> pattern -> role
        self._visibility: dict[str, bool] = {}
        self._revoked_sessions: set[str] = set()

    def _on_user(self, ev: Event) -> None:
        name = ev.kv.key[len(keys.USER):].decode(errors="replace")
        if ev.deleted:
            self._users.pop(name, None)
        else:
            self._users[name] = decode_user(ev.kv.value)

    def _on_team(self, ev: Event) -> None:
        name = ev.kv.key[len(keys.TEAM):].decode(errors="replace")
        if ev.deleted:
            self._teams.pop(name, None)
        else:
            self._teams[name] = _team.decode(ev.kv.value)

    def _on_member(self, ev: Event) -> None:
        pair = keys.split_pair(ev.kv.key, keys.MEMBER)
        if pair is None:
            return
        user, team = pair
        if ev.deleted:
            teams = self._memberships.get(user)
            if teams is not None:
                teams.discard(team)
                if not teams:
                    del self._memberships[user]
        else:
            self._memberships.setdefault(user, set()).add(team)

    def _on_grant(self, ev: Event) -> None:
        key = ev.kv.key
        if key.startswith(keys.USER_GRANT):
            kind, pair = USER, keys.split_pair(key, keys.USER_GRANT)
        elif key.startswith(keys.TEAM_GRANT):
            kind, pair = TEAM, keys.split_pair(key, keys.TEAM_GRANT)
        else:
            return
        if pair is None:
            return
        subject, pattern = (kind, pair[0]), pair[1]
        if ev.deleted:
            grants = self._grants.get(subject)
            if grants is not None:
                grants.pop(pattern, None)
                if not grants:
                    del self._grants[subject]
            return
        role = _grant.decode(ev.kv.value).role
        if role not in ROLES:
            log.warning("ignoring a grant with an unknown role", extra={"key": key[:200], "role": role[:20]})
            return
        self._grants.setdefault(subject, {})[pattern] = role

    def _on_visibility(self, ev: Event) -> None:
        pattern = ev.kv.key[len(keys.VISIBILITY):].decode(errors="replace")
        if ev.deleted:
            self._visibility.pop(pattern, None)
        else:
            self._visibility[pattern] = _visibility.decode(ev.kv.value).public

    def _on_session_revoked(self, ev: Event) -> None:
        session_id = ev.kv.key[len(keys.SESSION_REVOKED):].decode(errors="replace")
        if ev.deleted:
            self._revoked_sessions.discard(session_id)
        else:
            self._revoked_sessions.add(session_id)

    # -- listings (after a sync, so another replica's write just acknowledged shows) ---

    async def list_users(self) -> list[dict[str, Any]]:
        await self.index.sync()
        return [{"name": name, "admin": r.admin, "created": r.created,
                 "teams": sorted(t for t in self._memberships.get(name, ()) if t in self._teams)}
                for name, r in sorted(self._users.items())]

    async def list_teams(self) -> list[dict[str, Any]]:
        await self.index.sync()
        members: dict[str, list[str]] = {}
        for user, teams in self._memberships.items():
            for team in teams:
                members.setdefault(team, []).append(user)
        return [{"name": name, "created": r.created, "members": sorted(members.get(name, []))}
                for name, r in sorted(self._teams.items())]

    async def list_grants(self, user: str | None = None, team: str | None = None,
                          repo: str | None = None) -> list[dict[str, str]]:
        """Grants, optionally of one user or team; `repo` keeps the grants whose
        pattern is exactly `repo` when it is a pattern, else those that cover it."""
        if user is not None:
            check_principal(user)
        if team is not None:
            check_principal(team, "team")
        if repo is not None:
            check_pattern(repo)
        await self.index.sync()
        out = []
        for (kind, name), grants in sorted(self._grants.items()):
            if (user is not None and (kind, name) != (USER, user)) or \
                    (team is not None and (kind, name) != (TEAM, team)):
                continue
            for pattern, role in sorted(grants.items()):
                if repo is not None and not (pattern == repo if repo.endswith("*") else _covers(pattern, repo)):
                    continue
                out.append({kind: name, "repo": pattern, "role": role})
        return out

    async def list_visibility(self) -> list[dict[str, str]]:
        await self.index.sync()
        return [{"repo": p, "visibility": "public" if public else "private"}
                for p, public in sorted(self._visibility.items())]

    async def explain(self, user: str | None, repo: str) -> dict[str, Any]:
        """What `user` may do to `repo` and why it may pull anonymously or not."""
        if user is not None:
            check_principal(user)
        try:
            check_name(repo)
        except NameInvalid:
            raise AccessError("invalid", f"invalid repository name {repo[:100]!r}") from None
        # Sync before any lookup: a user deleted through another replica a
        # moment ago must not still be found here.
        await self.index.sync()
        if user is not None and self._users.get(user) is None:
            raise AccessError("unknown", f"no user {user}")
        return {"user": user, "repo": repo, "public": self.is_public(repo),
                "actions": sorted(self.actions(user, repo))}

    # -- writes -----------------------------------------------------------------------

    async def _txn(self, compare: Iterable = (), success: Iterable = ()) -> TxnResult:
        result = await self.client.txn(list(compare), list(success))
        if result.succeeded:
            await self.index.wait_applied(result.revision)
        return result

    async def create_team(self, name: str) -> dict[str, Any]:
        check_principal(name, "team")
        created = time.time()
        result = await self._txn([cmp_absent(keys.team(name))],
                                 [op_put(keys.team(name), _encode(TeamRecord(created=created)))])
        if not result.succeeded:
            raise AccessError("refused", f"the team {name} already exists")
        return {"name": name, "created": created, "members": []}

    async def delete_team(self, name: str) -> None:
        """Delete a team, its memberships and its grants in one transaction."""
        check_principal(name, "team")
        for _ in range(RETRIES):
            revision, kvs = await self.client.range_prefix(keys.MEMBER)
            members = [kv.key for kv in kvs if (keys.split_pair(kv.key, keys.MEMBER) or ("", ""))[1] == name]
            # A membership added after our read fails the range compare, so none is left behind.
            result = await self._txn(
                [cmp_exists(keys.team(name)), cmp_prefix_unchanged(keys.MEMBER, revision)],
                [op_delete(keys.team(name)), op_delete(keys.team_grants(name), prefix=True)]
                + [op_delete(k) for k in members])
            if result.succeeded:
                return
            if await self.client.get(keys.team(name)) is None:
                raise AccessError("unknown", f"no team {name}")
        raise AccessError("refused", f"the team {name} kept changing while being deleted; try again")

    async def add_member(self, team: str, user: str) -> None:
        check_principal(team, "team")
        check_principal(user)
        result = await self._txn([cmp_exists(keys.team(team)), cmp_exists(keys.user(user))],
                                 [op_put(keys.member(user, team), b"")])
        if not result.succeeded:
            await self._missing(team=team, user=user)

    async def remove_member(self, team: str, user: str) -> None:
        check_principal(team, "team")
        check_principal(user)
        key = keys.member(user, team)
        if not (await self._txn([cmp_exists(key)], [op_delete(key)])).succeeded:
            await self._missing(team=team, user=user, otherwise=AccessError(
                "unknown", f"the user {user} is not a member of the team {team}"))

    async def grant(self, kind: str, name: str, pattern: str, role: str) -> dict[str, str]:
        """Give a user or team `role` on `pattern`, replacing the role it had there."""
        key, subject = self._grant_key(kind, name, pattern)
        check_role(role)
        result = await self._txn([cmp_exists(subject)], [op_put(key, _encode(GrantRecord(role=role)))])
        if not result.succeeded:
            await self._missing(**{kind: name})
        return {kind: name, "repo": pattern, "role": role}

    async def revoke(self, kind: str, name: str, pattern: str) -> None:
        key, _ = self._grant_key(kind, name, pattern)
        if not (await self._txn([cmp_exists(key)], [op_delete(key)])).succeeded:
            raise AccessError("unknown", f"the {kind} {name} has no grant on {pattern}")

    async def set_visibility(self, pattern: str, public: bool | None) -> dict[str, str]:
        """Mark `pattern` public or private; None forgets it (the next broader pattern decides)."""
        check_pattern(pattern)
        key = keys.visibility(pattern)
        if public is None:
            await self._txn([], [op_delete(key)])
            return {"repo": pattern, "visibility": "inherited"}
        await self._txn([], [op_put(key, _encode(VisibilityRecord(public=public)))])
        return {"repo": pattern, "visibility": "public" if public else "private"}

    async def revoke_session(self, session_id: str, seconds: int) -> None:
        """Sign a console session out on every replica, for `seconds` (past its token's expiry:
        then the key's lease ends and it goes by itself)."""
        lease = await self.client.grant_lease(max(int(seconds), 1))
        await self._txn([], [op_put(keys.session_revoked(session_id), b"", lease)])

    @staticmethod
    def _grant_key(kind: str, name: str, pattern: str) -> tuple[bytes, bytes]:
        check_pattern(pattern)
        if kind == USER:
            check_principal(name)
            return keys.user_grant(name, pattern), keys.user(name)
        if kind == TEAM:
            check_principal(name, "team")
            return keys.team_grant(name, pattern), keys.team(name)
        raise AccessError("invalid", "a grant needs either user or team")

    async def _missing(self, team: str | None = None, user: str | None = None,
                       otherwise: AccessError | None = None) -> None:
        """Raise AccessError(unknown) for whichever of `team` and `user` does not exist."""
        if team is not None and await self.client.get(keys.team(team)) is None:
            raise AccessError("unknown", f"no team {team}")
        if user is not None and await self.client.get(keys.user(user)) is None:
            raise AccessError("unknown", f"no user {user}")
        raise otherwise or AccessError("refused", "the change collided with another one; try again")
