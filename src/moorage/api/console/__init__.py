"""The web console: server-rendered pages for people, on every replica at /console/.

`build` is the one function the HTTP wiring calls. The console is a client
of the same code as the APIs: repository pages read through the registry
layer and decide with `Auth`/`Access`; admin pages run the admin API's own
routes. Nothing here keeps state of its own but caches: any replica serves
any signed-in browser.

    app.py      routes, who may reach them, forms, CSRF and origin checks, errors
    session.py  the session cookie, sign-in, CSRF tokens
    render.py   Jinja2 templates (autoescaped), static files, security headers
    signin.py   sign in and out
    repos.py    repositories, a repository's tags, an image; delete, visibility
    manage.py   cluster, users and access, settings, garbage collection, audit log
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from aiohttp import web

from moorage.api.admin import AdminApi
from moorage.api.audit import RequestAudit
from moorage.api.auth import Auth
from moorage.api.console import manage, repos, signin
from moorage.api.console.app import Console
from moorage.registry.access import Access
from moorage.registry.repositories import Repositories

__all__ = ["Console", "build"]


def build(repositories: Repositories, auth: Auth, admin: AdminApi, audit: RequestAudit | None,
          refuse_writes: Callable[[], web.Response | None]) -> Console:
    """The console with all its routes; `refuse_writes` is the API's own check (read-only, no quorum)."""
    # Auth knows Access through a protocol; the console uses more of it (session revocation).
    console = Console(repositories, auth, cast(Access, auth.access), admin, audit, refuse_writes)
    console.add(signin.routes() + repos.routes() + manage.routes())
    return console
