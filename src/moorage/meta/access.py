"""Users, teams, memberships, grants, visibility and signed-out console sessions, as etcd holds them.

Every replica keeps all of it in memory, fed by the index's etcd watch
(`Index.subscribe`), so an access decision (registry/access.py) is a
handful of dict lookups and never an etcd read; changes reach every replica
within the watch's latency. Writes are MetaStore's (meta/store.py).
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from moorage.meta import keys
from moorage.meta.etcd import Event
from moorage.meta.index import Index
from moorage.meta.records import GrantRecord, TeamRecord, UserRecord, VisibilityRecord, decoder

log = logging.getLogger(__name__)

# Subjects of grants, as spelled in keys and in the admin API.
USER, TEAM = "user", "team"

_user = decoder(UserRecord)
_team = decoder(TeamRecord)
_grant = decoder(GrantRecord)
_visibility = decoder(VisibilityRecord)


def decode_user(value: bytes) -> UserRecord:
    return _user.decode(value)


class AccessRecords:
    """This replica's copy of the access records. Construct it before `index.start()`:
    it subscribes to the index, which feeds it the records already in etcd on load
    and every change after. Grants with a role outside `roles` are ignored (logged)."""

    def __init__(self, index: Index, roles: Collection[str]):
        self._roles = roles
        self._reset()
        # One reset for all: a reload after compaction must forget what was deleted meanwhile.
        index.subscribe(keys.USER, self._on_user, reset=self._reset)
        index.subscribe(keys.TEAM, self._on_team)
        index.subscribe(keys.MEMBER, self._on_member)
        index.subscribe(keys.GRANT, self._on_grant)
        index.subscribe(keys.VISIBILITY, self._on_visibility)
        index.subscribe(keys.SESSION_REVOKED, self._on_session_revoked)

    def _reset(self) -> None:
        self.users: dict[str, UserRecord] = {}
        self.teams: dict[str, TeamRecord] = {}
        self.memberships: dict[str, set[str]] = {}               # user -> teams
        self.grants: dict[tuple[str, str], dict[str, str]] = {}  # (user|team, name) -> pattern -> role
        self.visibility: dict[str, bool] = {}
        self.revoked_sessions: set[str] = set()

    def _on_user(self, ev: Event) -> None:
        name = ev.kv.key[len(keys.USER):].decode(errors="replace")
        if ev.deleted:
            self.users.pop(name, None)
        else:
            self.users[name] = decode_user(ev.kv.value)

    def _on_team(self, ev: Event) -> None:
        name = ev.kv.key[len(keys.TEAM):].decode(errors="replace")
        if ev.deleted:
            self.teams.pop(name, None)
        else:
            self.teams[name] = _team.decode(ev.kv.value)

    def _on_member(self, ev: Event) -> None:
        pair = keys.split_pair(ev.kv.key, keys.MEMBER)
        if pair is None:
            return
        user, team = pair
        if ev.deleted:
            teams = self.memberships.get(user)
            if teams is not None:
                teams.discard(team)
                if not teams:
                    del self.memberships[user]
        else:
            self.memberships.setdefault(user, set()).add(team)

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
            grants = self.grants.get(subject)
            if grants is not None:
                grants.pop(pattern, None)
                if not grants:
                    del self.grants[subject]
            return
        role = _grant.decode(ev.kv.value).role
        if role not in self._roles:
            log.warning("ignoring a grant with an unknown role", extra={"key": key[:200], "role": role[:20]})
            return
        self.grants.setdefault(subject, {})[pattern] = role

    def _on_visibility(self, ev: Event) -> None:
        pattern = ev.kv.key[len(keys.VISIBILITY):].decode(errors="replace")
        if ev.deleted:
            self.visibility.pop(pattern, None)
        else:
            self.visibility[pattern] = _visibility.decode(ev.kv.value).public

    def _on_session_revoked(self, ev: Event) -> None:
        session_id = ev.kv.key[len(keys.SESSION_REVOKED):].decode(errors="replace")
        if ev.deleted:
            self.revoked_sessions.discard(session_id)
        else:
            self.revoked_sessions.add(session_id)
