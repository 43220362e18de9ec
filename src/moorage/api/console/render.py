"""HTML for the console: Jinja2 templates (autoescaped: whatever a client pushed renders as
text), the static files beside them, and the headers every console response carries.

No inline script or style anywhere, so the Content-Security-Policy allows
only this host's own files.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from typing import Any

import jinja2
from aiohttp import web

from moorage import __version__
from moorage.units import human_bytes

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), clipboard-write=(self)",
}
STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
STATIC_PREFIX = "/console/static/"


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    content_type: str
    version: str


def _load_static() -> dict[str, StaticFile]:
    found = {}
    for entry in resources.files(__package__).joinpath("static").iterdir():
        suffix = entry.name[entry.name.rfind("."):]
        if suffix in STATIC_TYPES:
            body = entry.read_bytes()
            found[entry.name] = StaticFile(body, STATIC_TYPES[suffix], hashlib.sha256(body).hexdigest()[:12])
    return found


def size(n: int | None) -> str:
    return "–" if n is None else human_bytes(n)


def utc(ts: float | None) -> str:
    if not ts:
        return "–"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso(ts: float | None) -> str:
    if not ts:
        return ""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def ago(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "never"
    seconds = max(0, int((now or time.time()) - ts))
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute")):
        if seconds >= size:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''} ago"
    return f"{seconds} second{'s' if seconds != 1 else ''} ago"


def short_digest(digest: str | None) -> str:
    if not digest:
        return ""
    algorithm, _, hexdigest = digest.partition(":")
    return f"{algorithm}:{hexdigest[:12]}"


_DIGEST = re.compile(r"\b(sha256|sha512):([0-9a-f]{12})[0-9a-f]{52,116}\b")


def shorten_digests(text: str) -> str:
    """Digests within a sentence cut to their first 12 digits (the page keeps the whole text in a title)."""
    return _DIGEST.sub(r"\1:\2…", text)


class Renderer:
    def __init__(self) -> None:
        self.static = _load_static()
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader(__package__, "templates"),
            autoescape=True,  # every template, whatever its name: nothing a client pushed is ever markup
            undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.env.filters.update(bytes=size, utc=utc, iso=iso, ago=ago, short=short_digest,
                                shorten_digests=shorten_digests)
        self.env.globals.update(static=self.static_url, version=__version__)

    def static_url(self, name: str) -> str:
        return f"{STATIC_PREFIX}{name}?v={self.static[name].version}"

    def page(self, template: str, status: int = 200, **context: Any) -> web.Response:
        body = self.env.get_template(template).render(**context)
        return web.Response(status=status, text=body, content_type="text/html", charset="utf-8")

    def static_response(self, name: str) -> web.Response | None:
        found = self.static.get(name)
        if found is None:
            return None
        # Links carry the content's hash, so a browser may keep a file as long as it likes.
        return web.Response(body=found.body, content_type=found.content_type,
                            headers={"Cache-Control": "public, max-age=31536000, immutable"})


def secure_headers(response: web.StreamResponse, started: float) -> None:
    response.headers.update(SECURITY_HEADERS)
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.2f}"
