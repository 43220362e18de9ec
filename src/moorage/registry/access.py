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

Writes are etcd transactions (MetaStore) whose comparisons carry their
preconditions (a grant names a user or team that exists, a member joins a
team that exists), so a write racing a deletion can never leave a dangling
record behind. The records themselves are kept in memory by meta/access.py;
this module decides with them.
"""

from __future__ import annotations

import time
from typing import Any

from moorage.meta.access import TEAM, USER, AccessRecords
from moorage.meta.index import Index
from moorage.meta.records import TeamRecord, UserRecord
from moorage.meta.store import Change, MetaStore
from moorage.registry.errors import NameInvalid
from moorage.registry.names import check_name
from moorage.registry.users import AccessError, Users, check_principal

__all__ = ["Access", "AccessError", "ROLES", "TEAM", "USER", "check_pattern", "patterns_for"]

PULL, PUSH, DELETE = "pull", "push", "delete"
ROLES: dict[str, frozenset[str]] = {
    "read": frozenset({PULL}),
    "write": frozenset({PULL, PUSH}),
    "admin": frozenset({PULL, PUSH, DELETE}),
}
EVERYTHING = ROLES["admin"]
NOTHING: frozenset[str] = frozenset()
PUBLIC = ROLES["read"]


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
    """Who may do what on this replica, and the changes to it.

    Construct it before `index.start()`: its records (meta/access.py) subscribe
    to the index, which feeds them what is already in etcd and every change after.
    """

    def __init__(self, meta: MetaStore, index: Index):
        self.meta = meta
        self.index = index
        self.records = AccessRecords(index, ROLES)
        self.users = Users(meta)

    # -- decisions (the hot path: dict lookups only) -------------------------------

    def user(self, name: str) -> UserRecord | None:
        return self.records.users.get(name)

    def is_admin(self, name: str | None) -> bool:
        record = self.records.users.get(name) if name is not None else None
        return record is not None and record.admin

    def is_public(self, repo: str, covering: list[str] | None = None) -> bool:
        visibility = self.records.visibility
        for pattern in covering or patterns_for(repo):
            public = visibility.get(pattern)
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
        r = self.records
        record = r.users.get(user) if user is not None else None
        if record is None or user is None:
            return base
        if record.admin:
            return EVERYTHING
        allowed = set(base)
        subjects = [(USER, user)] + [(TEAM, t) for t in r.memberships.get(user, ()) if t in r.teams]
        for subject in subjects:
            grants = r.grants.get(subject)
            if grants:
                for pattern in covering:
                    role = grants.get(pattern)
                    if role is not None:
                        allowed |= ROLES[role]
        return frozenset(allowed) if len(allowed) != len(base) else base

    def session_revoked(self, session_id: str) -> bool:
        """Whether a console session was signed out (api/console/session.py)."""
        return session_id in self.records.revoked_sessions

    # -- listings (after a sync, so another replica's write just acknowledged shows) ---

    async def list_users(self) -> list[dict[str, Any]]:
        await self.index.sync()
        r = self.records
        return [{"name": name, "admin": u.admin, "created": u.created,
                 "teams": sorted(t for t in r.memberships.get(name, ()) if t in r.teams)}
                for name, u in sorted(r.users.items())]

    async def list_teams(self) -> list[dict[str, Any]]:
        await self.index.sync()
        members: dict[str, list[str]] = {}
        for user, teams in self.records.memberships.items():
            for team in teams:
                members.setdefault(team, []).append(user)
        return [{"name": name, "created": t.created, "members": sorted(members.get(name, []))}
                for name, t in sorted(self.records.teams.items())]

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
        for (kind, name), grants in sorted(self.records.grants.items()):
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
                for p, public in sorted(self.records.visibility.items())]

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
        if user is not None and self.records.users.get(user) is None:
            raise AccessError("unknown", f"no user {user}")
        return {"user": user, "repo": repo, "public": self.is_public(repo),
                "actions": sorted(self.actions(user, repo))}

    # -- writes -----------------------------------------------------------------------

    async def create_team(self, name: str) -> dict[str, Any]:
        check_principal(name, "team")
        created = time.time()
        if not await self.meta.add_team(name, TeamRecord(created=created)):
            raise AccessError("refused", f"the team {name} already exists")
        return {"name": name, "created": created, "members": []}

    async def delete_team(self, name: str) -> None:
        """Delete a team, its memberships and its grants in one transaction."""
        check_principal(name, "team")
        done = await self.meta.remove_team(name)
        if done is Change.MISSING:
            raise AccessError("unknown", f"no team {name}")
        if done is Change.CONFLICT:
            raise AccessError("refused", f"the team {name} kept changing while being deleted; try again")

    async def add_member(self, team: str, user: str) -> None:
        check_principal(team, "team")
        check_principal(user)
        if not await self.meta.add_member(team, user):
            await self._missing(team=team, user=user)

    async def remove_member(self, team: str, user: str) -> None:
        check_principal(team, "team")
        check_principal(user)
        if not await self.meta.remove_member(team, user):
            await self._missing(team=team, user=user, otherwise=AccessError(
                "unknown", f"the user {user} is not a member of the team {team}"))

    async def grant(self, kind: str, name: str, pattern: str, role: str) -> dict[str, str]:
        """Give a user or team `role` on `pattern`, replacing the role it had there."""
        self._check_grant(kind, name, pattern)
        check_role(role)
        if not await self.meta.put_grant(kind, name, pattern, role):
            await self._missing(**{kind: name})
        return {kind: name, "repo": pattern, "role": role}

    async def revoke(self, kind: str, name: str, pattern: str) -> None:
        self._check_grant(kind, name, pattern)
        if not await self.meta.delete_grant(kind, name, pattern):
            raise AccessError("unknown", f"the {kind} {name} has no grant on {pattern}")

    async def set_visibility(self, pattern: str, public: bool | None) -> dict[str, str]:
        """Mark `pattern` public or private; None forgets it (the next broader pattern decides)."""
        check_pattern(pattern)
        await self.meta.set_visibility(pattern, public)
        return {"repo": pattern, "visibility": "inherited" if public is None else "public" if public else "private"}

    async def revoke_session(self, session_id: str, seconds: int) -> None:
        """Sign a console session out on every replica, for `seconds` (past its token's expiry:
        then the key's lease ends and it goes by itself)."""
        await self.meta.revoke_session(session_id, seconds)

    @staticmethod
    def _check_grant(kind: str, name: str, pattern: str) -> None:
        check_pattern(pattern)
        if kind == USER:
            check_principal(name)
        elif kind == TEAM:
            check_principal(name, "team")
        else:
            raise AccessError("invalid", "a grant needs either user or team")

    async def _missing(self, team: str | None = None, user: str | None = None,
                       otherwise: AccessError | None = None) -> None:
        """Raise AccessError(unknown) for whichever of `team` and `user` does not exist."""
        if team is not None and not await self.meta.team_exists(team):
            raise AccessError("unknown", f"no team {team}")
        if user is not None and not await self.meta.user_exists(user):
            raise AccessError("unknown", f"no user {user}")
        raise otherwise or AccessError("refused", "the change collided with another one; try again")
