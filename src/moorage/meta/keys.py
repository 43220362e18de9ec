"""The key layout in etcd, in one place.

    /moorage/blob/<digest>                           BlobRecord
    /moorage/repo/<name>@blob/<digest>               link: the blob is in the repository
    /moorage/repo/<name>@manifest/<digest>           ManifestRecord
    /moorage/repo/<name>@tag/<tag>                   the tagged manifest's digest
    /moorage/repo/<name>@referrer/<subject>/<digest> Referrer descriptor
    /moorage/upload/<id>                             UploadRecord, or a tombstone
    /moorage/secret/<name>                           a cluster-wide random secret
    /moorage/user/<name>                             a user (argon2id hash)
    /moorage/team/<team>                             TeamRecord
    /moorage/member/<user>/<team>                    the user is in the team (empty value)
    /moorage/grant/u/<user>/<pattern>                a user's role on repositories: {"role": ...}
    /moorage/grant/t/<team>/<pattern>                a team's role on repositories: {"role": ...}
    /moorage/visibility/<pattern>                    {"public": bool} for repositories
    /moorage/replica/<id>                            a replica's record and heartbeat
    /moorage/config/<key>                            a cluster setting (JSON value)
    /moorage/gc/lock                                 the collector's lease: one GC run at a time
    /moorage/gc/deleting/<digest>                    a blob file GC is deleting (leased marker)
    /moorage/gc/writing/<digest>/<id>                an object about to be written at the digest's
                                                     content address (the writer's intent; its commit
                                                     deletes it): how GC finds what a writer left on
                                                     a store it never lists (registry/placement.py)
    /moorage/gc/run/<id>                             a GC run's summary and progress
    /moorage/session-revoked/<id>                    a signed-out console session (leased: gone
                                                     once its token would have expired anyway)
    /moorage/webhook/endpoint/<name>                 a webhook endpoint (EndpointRecord)
    /moorage/webhook/q/<name>/<id>                   a batch of events waiting for delivery to it
    /moorage/webhook/lock/<name>                     the replica delivering to it (leased)
    /moorage/webhook/state/<name>                    how delivery to it went lately (DeliveryState)

Repository names may contain "/", never "@", so "@" ends the name and a
prefix scan of "<name>@" never strays into "<name>/other".

User and team names never contain "/", so "<user>/" is a prefix that holds
exactly one user's memberships or grants: deleting a user deletes them by
prefix in the same transaction. A <pattern> is a repository name,
"<namespace>/*" or "*".
"""

from __future__ import annotations

from dataclasses import dataclass

ROOT = b"/moorage/"
BLOB = ROOT + b"blob/"
REPO = ROOT + b"repo/"
UPLOAD = ROOT + b"upload/"
SECRET = ROOT + b"secret/"
USER = ROOT + b"user/"
REPLICA = ROOT + b"replica/"
CONFIG = ROOT + b"config/"
TEAM = ROOT + b"team/"
MEMBER = ROOT + b"member/"
GRANT = ROOT + b"grant/"
USER_GRANT = GRANT + b"u/"
TEAM_GRANT = GRANT + b"t/"
VISIBILITY = ROOT + b"visibility/"
GC = ROOT + b"gc/"
GC_LOCK = GC + b"lock"
GC_DELETING = GC + b"deleting/"
GC_RUN = GC + b"run/"
GC_WRITING = GC + b"writing/"
SESSION_REVOKED = ROOT + b"session-revoked/"
WEBHOOK = ROOT + b"webhook/"
WEBHOOK_ENDPOINT = WEBHOOK + b"endpoint/"
WEBHOOK_QUEUE = WEBHOOK + b"q/"
WEBHOOK_LOCK = WEBHOOK + b"lock/"
WEBHOOK_STATE = WEBHOOK + b"state/"


def blob(digest: str) -> bytes:
    return BLOB + digest.encode()


def repo_blob(repo: str, digest: str) -> bytes:
    return REPO + f"{repo}@blob/{digest}".encode()


def manifest(repo: str, digest: str) -> bytes:
    return REPO + f"{repo}@manifest/{digest}".encode()


def tag(repo: str, name: str) -> bytes:
    return REPO + f"{repo}@tag/{name}".encode()


def tags(repo: str) -> bytes:
    return REPO + f"{repo}@tag/".encode()


def referrer(repo: str, subject: str, digest: str) -> bytes:
    return REPO + f"{repo}@referrer/{subject}/{digest}".encode()


def upload(upload_id: str) -> bytes:
    return UPLOAD + upload_id.encode()


def secret(name: str) -> bytes:
    return SECRET + name.encode()


def user(name: str) -> bytes:
    return USER + name.encode()


def team(name: str) -> bytes:
    return TEAM + name.encode()


def member(user_name: str, team_name: str) -> bytes:
    return MEMBER + f"{user_name}/{team_name}".encode()


def memberships(user_name: str) -> bytes:
    """The prefix of every team membership of one user."""
    return MEMBER + f"{user_name}/".encode()


def user_grant(user_name: str, pattern: str) -> bytes:
    return USER_GRANT + f"{user_name}/{pattern}".encode()


def user_grants(user_name: str) -> bytes:
    return USER_GRANT + f"{user_name}/".encode()


def team_grant(team_name: str, pattern: str) -> bytes:
    return TEAM_GRANT + f"{team_name}/{pattern}".encode()


def team_grants(team_name: str) -> bytes:
    return TEAM_GRANT + f"{team_name}/".encode()


def visibility(pattern: str) -> bytes:
    return VISIBILITY + pattern.encode()


def split_pair(key: bytes, prefix: bytes) -> tuple[str, str] | None:
    """("<name>", "<rest>") of a key "<prefix><name>/<rest>"; None if malformed."""
    name, sep, rest = key[len(prefix):].decode(errors="replace").partition("/")
    return (name, rest) if sep and name and rest else None


def replica(replica_id: str) -> bytes:
    return REPLICA + replica_id.encode()


def config(key: str) -> bytes:
    return CONFIG + key.encode()


def gc_deleting(digest: str) -> bytes:
    return GC_DELETING + digest.encode()


def gc_writing(digest: str, intent_id: str) -> bytes:
    return GC_WRITING + f"{digest}/{intent_id}".encode()


def gc_writing_prefix(digest: str) -> bytes:
    """Every writer's intent for one digest (digests never contain "/")."""
    return GC_WRITING + f"{digest}/".encode()


def gc_run(run_id: str) -> bytes:
    return GC_RUN + run_id.encode()


def session_revoked(session_id: str) -> bytes:
    return SESSION_REVOKED + session_id.encode()


def webhook_endpoint(name: str) -> bytes:
    return WEBHOOK_ENDPOINT + name.encode()


def webhook_queue(name: str) -> bytes:
    """The prefix of one endpoint's queue (endpoint names never contain "/")."""
    return WEBHOOK_QUEUE + f"{name}/".encode()


def webhook_lock(name: str) -> bytes:
    return WEBHOOK_LOCK + name.encode()


def webhook_state(name: str) -> bytes:
    return WEBHOOK_STATE + name.encode()


def repo_manifests(repo: str) -> bytes:
    return REPO + f"{repo}@manifest/".encode()


@dataclass(frozen=True, slots=True)
class RepoKey:
    repo: str
    kind: str          # blob, manifest, tag, referrer
    name: str          # digest or tag
    subject: str = ""  # for referrers


def parse_repo_key(key: bytes) -> RepoKey | None:
    """Split a key under REPO; None for anything malformed."""
    try:
        repo, rest = key[len(REPO):].decode().split("@", 1)
        kind, name = rest.split("/", 1)
    except ValueError:
        return None
    if kind == "referrer":
        subject, _, name = name.partition("/")
        return RepoKey(repo, kind, name, subject)
    return RepoKey(repo, kind, name)
