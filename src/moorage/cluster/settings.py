"""Cluster-wide settings: set once through any replica, applied by every replica.

Each setting is a key in etcd. Replicas learn of changes through the same
watch that feeds their index, so a change is applied everywhere within the
watch's latency (milliseconds), without a restart. Each replica reports the
revision it has applied in /health.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from moorage.meta import keys
from moorage.meta.etcd import EtcdClient, Event, op_delete

log = logging.getLogger(__name__)


class SettingError(ValueError):
    """A setting name or value the cluster does not accept; says why in one sentence."""


@dataclass(frozen=True)
class Setting:
    kind: type
    default: Any
    help: str
    choices: tuple = ()
    minimum: int | None = None
    check: Callable[[Any], str | None] | None = None   # a reason to refuse the value, or None
    # A secret (a token) is kept only as its sha256 and never shown: `matches` checks one.
    secret: bool = False

    def parse(self, key: str, raw: Any) -> Any:
        """A value from the CLI (a string) or from JSON, checked and typed; a secret's hash."""
        if self.secret:
            if not isinstance(raw, str) or len(raw.strip()) < MIN_SECRET:
                raise SettingError(f"{key} takes a secret of at least {MIN_SECRET} characters "
                                   "(e.g. `openssl rand -hex 32`)")
            return SECRET_HASH + hashlib.sha256(raw.strip().encode()).hexdigest()
        value = raw
        if isinstance(raw, str) and self.kind is not str:
            text = raw.strip().lower()
            if self.kind is bool:
                if text not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise SettingError(f"{key} takes true or false, not {raw!r}")
                value = text in ("true", "1", "yes", "on")
            else:
                try:
                    value = self.kind(text)
                except ValueError:
                    raise SettingError(f"{key} takes a whole number, not {raw!r}") from None
        if not isinstance(value, self.kind) or (self.kind is int and isinstance(value, bool)):
            raise SettingError(f"{key} takes a {self.kind.__name__}, not {raw!r}")
        if self.choices and value not in self.choices:
            raise SettingError(f"{key} takes one of {', '.join(self.choices)}, not {raw!r}")
        if self.minimum is not None and value < self.minimum:
            raise SettingError(f"{key} must be at least {self.minimum}, not {value}")
        if self.check is not None and (reason := self.check(value)):
            raise SettingError(f"{key} {reason}, not {raw!r}")
        return value


_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(text: str) -> float:
    """Seconds in "90s", "30m", "6h", "1d"; ValueError otherwise."""
    text = text.strip().lower()
    if len(text) < 2 or text[-1] not in _DURATION or not text[:-1].isdigit() or int(text[:-1]) < 1:
        raise ValueError(text)
    return int(text[:-1]) * _DURATION[text[-1]]


def _check_duration(value: str) -> str | None:
    try:
        duration_seconds(value)
    except ValueError:
        return "takes an interval such as 30m, 6h or 1d"
    return None


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_NETWORKS = 64


def parse_networks(value: str | None) -> tuple[Network, ...]:
    """Comma-separated addresses and CIDRs; ValueError names the bad one."""
    found = []
    for part in (value or "").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            found.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"has {part[:60]!r}, which is not an address or CIDR") from None
    if len(found) > MAX_NETWORKS:
        raise ValueError(f"takes at most {MAX_NETWORKS} addresses or CIDRs")
    return tuple(found)


def _check_networks(value: str) -> str | None:
    try:
        if not parse_networks(value):
            return "takes addresses or CIDRs, comma-separated (unset it to turn the PROXY protocol off)"
    except ValueError as e:
        return str(e)
    return None


MIN_SECRET = 16
SECRET_HASH = "sha256:"
SHOWN_SECRET = "(set)"


def secret_matches(stored: str | None, presented: str) -> bool:
    """Whether `presented` is the secret whose hash is `stored`, in constant time."""
    if not stored:
        return False
    digest = SECRET_HASH + hashlib.sha256(presented.strip().encode()).hexdigest()
    return hmac.compare_digest(digest.encode(), stored.encode())


SETTINGS: dict[str, Setting] = {
    "log.level": Setting(str, "info", "how much every replica logs",
                         choices=("debug", "info", "warning", "error")),
    "readonly": Setting(bool, False, "refuse every write with 405 UNSUPPORTED (maintenance)"),
    "upload.max_blob_bytes": Setting(int, 1 << 40, "largest blob a push may upload", minimum=1),
    "upload.max_manifest_bytes": Setting(int, 4 << 20, "largest manifest a push may store",
                                         minimum=1024),
    "token.lifetime_seconds": Setting(int, 300, "lifetime of issued bearer tokens", minimum=30),
    # Garbage collection (registry/gc.py).
    "gc.schedule": Setting(str, None, "collect garbage by itself this often (30m, 6h, 1d); unset: only "
                           "`moorage gc`", check=_check_duration),
    "gc.grace_seconds": Setting(int, 3600, "a blob younger than this is never collected", minimum=0),
    "gc.untagged_after_seconds": Setting(int, None, "collect untagged, unreferenced manifests older than "
                                         "this; unset: never", minimum=0),
    "gc.upload_max_age_seconds": Setting(int, 86400, "collect upload sessions idle longer than this",
                                         minimum=0),
    # The load balancers' addresses (api/proxy_protocol.py): connections from them must start with a
    # PROXY protocol v2 header naming the client; `moorage lb haproxy` then sends one.
    "proxy_protocol.from": Setting(str, None, "addresses or CIDRs (comma-separated) of load balancers that "
                                   "send the PROXY protocol v2; their connections must; unset: off",
                                   check=_check_networks),
    # Blob GETs on an object store (storage/s3/driver.py): a 307 to a presigned URL, or the bytes through
    # the replica (with Range). Written false at the first start by --s3-redirect=false.
    "storage.redirect": Setting(bool, True, "on an object store, answer blob GETs with a redirect to a "
                                "short-lived presigned URL; false: stream them through the replica"),
    # GET /metrics (api/metrics_endpoint.py) with `Authorization: Bearer <token>`.
    "metrics.token": Setting(str, None, "the bearer token Prometheus scrapes /metrics with (kept as a hash; "
                             "set it from a file: `moorage config set metrics.token --from-file FILE`)",
                             secret=True),
    "gc.debug_delay_ms": Setting(int, 0, "debugging and tests only: GC pauses this long between batches",
                                 minimum=0),
}


def setting(key: str) -> Setting:
    found = SETTINGS.get(key)
    if found is None:
        raise SettingError(f"unknown setting {key!r}; known: {', '.join(sorted(SETTINGS))}")
    return found


class ClusterSettings:
    """This replica's view of the settings, kept current by the index's watch."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {k: s.default for k, s in SETTINGS.items()}
        self.revision = 0
        self._listeners: list[Callable[[str, Any], None]] = []

    def on_change(self, listener: Callable[[str, Any], None]) -> None:
        self._listeners.append(listener)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def shown(self) -> dict[str, Any]:
        """The values as anyone may see them: a secret only says whether it is set."""
        return {k: (SHOWN_SECRET if SETTINGS[k].secret and v is not None else v) for k, v in self.values.items()}

    def apply(self, event: Event) -> None:
        key = event.kv.key[len(keys.CONFIG):].decode()
        spec = SETTINGS.get(key)
        if spec is None:
            return  # written by a newer version; not ours to apply
        if event.deleted:
            value = spec.default
        else:
            try:
                value = msgspec.json.decode(event.kv.value)
                if spec.secret:  # stored hashed: only its shape to check
                    if not (isinstance(value, str) and value.startswith(SECRET_HASH)):
                        raise SettingError(f"{key} is not a stored secret")
                else:
                    value = spec.parse(key, value)
            except (SettingError, msgspec.DecodeError) as e:
                log.warning("ignoring an invalid cluster setting", extra={"key": key, "error": str(e)})
                return
        self.values[key] = value
        self.revision = max(self.revision, event.kv.mod_revision)
        for listener in self._listeners:
            listener(key, value)


async def set_value(client: EtcdClient, key: str, raw: Any) -> tuple[Any, int]:
    """Validate and store a setting; returns the value and the revision it was written at."""
    value = setting(key).parse(key, raw)
    return value, await client.put(keys.config(key), msgspec.json.encode(value))


async def unset_value(client: EtcdClient, key: str) -> int:
    setting(key)
    return (await client.txn([], [op_delete(keys.config(key))])).revision
