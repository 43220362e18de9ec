"""The cluster admins' pages: cluster, users and access, settings, garbage collection, audit log.

Each reads and changes through the admin API's own routes (`Ctx.admin_call`),
so a value refused here is refused with the same sentence as by
`moorage config set`, `moorage user add` or `/_admin/` directly.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from moorage.api.console.app import PREFIX, Ctx, Refused, admin_error
from moorage.api.routes import ADMIN, Route, route
from moorage.cluster.settings import SETTINGS
from moorage.registry.access import ROLES
from moorage.registry.audit import KINDS
from moorage.registry.users import AccessError, check_principal

AUDIT_PAGE = 50


# -- cluster ------------------------------------------------------------------------------

def rules_of_thumb(status: dict[str, Any]) -> list[dict[str, str]]:
    """The product's sizing advice, applied to the cluster as it is now."""
    voters, tolerates, best = status["voters"], status["tolerates"], status["tolerates_when_healthy"]
    out = []
    if not status["quorum"]:
        out.append({"level": "danger", "text": "No quorum: a majority of the replicas is unreachable, so "
                    "every write is refused (pulls of what is known go on). Bring replicas back."})
    for row in status["replicas"]:
        if not row["healthy"] and row["role"] != "learner":
            out.append({"level": "danger", "text": f"Replica {row['id']} is down ({row['api']}). The cluster "
                        f"now tolerates {tolerates} failure{'s' if tolerates != 1 else ''} instead of {best}: "
                        "don't leave it offline for long; bring it back, or remove it with moorage remove."})
        elif row["role"] == "learner":
            out.append({"level": "info", "text": f"Replica {row['id']} is joining (a learner until it has "
                        "caught up); it does not count for quorum yet."})
    if voters == 1:
        out.append({"level": "info", "text": "One replica tolerates no failure. Join two more for high "
                    "availability."})
    elif voters == 2:
        out.append({"level": "warning", "text": "Two replicas tolerate no failure, no more than one does, and "
                    "every write waits for both: add a third."})
    elif voters % 2 == 0:
        out.append({"level": "warning", "text": f"{voters} replicas tolerate {best} failures, as {voters - 1} "
                    "would, while every write waits for more of them: use an odd number."})
    if voters > 7:
        out.append({"level": "warning", "text": f"{voters} replicas: more than seven slow every write (each is "
                    "replicated to a majority) for little more tolerance."})
    return out


def cluster_view(status: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    rows = [{**r, "seen_ago": _ago(r.get("last_seen"), now),
             "state": "healthy" if r["healthy"] else ("joining" if r["role"] == "learner" else "down")}
            for r in status["replicas"]]
    healthy_urls = [r["url"] for r in rows if r["healthy"] and r.get("url")]
    join = None
    if healthy_urls:
        fingerprint = f" --ca-fingerprint {status['ca_fingerprint']}" if status.get("ca_fingerprint") else ""
        join = (f"moorage join --existing {healthy_urls[0]}{fingerprint} --data-dir /var/lib/moorage "
                "--listen NEW_HOST:5000 --storage-dir SHARED_STORAGE_DIR")
    return {"replicas": rows, "voters": status["voters"], "healthy": status["healthy"],
            "tolerates": status["tolerates"], "tolerates_when_healthy": status["tolerates_when_healthy"],
            "quorum": status["quorum"], "storage": status.get("storage") or {},
            "ca_fingerprint": status.get("ca_fingerprint"), "warnings": rules_of_thumb(status),
            "join": join, "time": now}


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "never"
    return f"{max(0.0, now - ts):.1f} s ago"


async def _status(ctx: Ctx) -> dict[str, Any]:
    status, answer = await ctx.admin_call("GET", "/_admin/cluster/status")
    if status >= 400:
        raise Refused(status, admin_error(answer))
    return cluster_view(answer)


async def cluster(ctx: Ctx) -> web.StreamResponse:
    return ctx.page("cluster.html", title="Cluster", section="cluster", c=await _status(ctx))


async def cluster_json(ctx: Ctx) -> web.StreamResponse:
    return web.json_response(await _status(ctx))


# -- users, teams, grants, visibility ---------------------------------------------------------

# Each form: the admin API call it makes, and its fields (the first takes errors no other field claims).
_ACCESS_FORMS: dict[str, tuple[str, ...]] = {
    "add-user": ("name", "password", "admin"),
    "remove-user": ("name",),
    "password": ("name", "password"),
    "add-team": ("team",),
    "remove-team": ("team",),
    "add-member": ("user", "team"),
    "remove-member": ("user", "team"),
    "grant": ("name", "repo", "role"),
    "revoke": ("name", "repo"),
    "visibility": ("repo", "visibility"),
}


def _field_of(form: str, message: str) -> str:
    fields = _ACCESS_FORMS.get(form, ("name",))
    lowered = message.lower()
    for word, field in (("password", "password"), ("team", "team"), ("role", "role"),
                        ("repositor", "repo"), ("visibility", "visibility"), ("user", "user")):
        if word in lowered and field in fields:
            return field
    return fields[0]


async def users(ctx: Ctx, errors: dict | None = None, status: int = 200) -> web.StreamResponse:
    listings = {}
    for key, path in (("users", "/_admin/users"), ("teams", "/_admin/teams"), ("grants", "/_admin/grants"),
                      ("visibility", "/_admin/visibility")):
        code, answer = await ctx.admin_call("GET", path)
        if code >= 400:
            raise Refused(code, admin_error(answer))
        listings[key] = answer[key]
    check = None
    check_user, check_repo = ctx.query("user", limit=64), ctx.query("repo", limit=255)
    if check_repo:
        query = {"repo": check_repo, **({"user": check_user} if check_user else {})}
        code, answer = await ctx.admin_call("GET", "/_admin/access", query=query)
        check = answer if code < 400 else {"error": admin_error(answer)}
    return ctx.page("users.html", status, title="Users and access", section="users", roles=list(ROLES),
                    check=check, check_user=check_user, check_repo=check_repo, errors=errors or {},
                    values=ctx.form, **listings)


async def access_change(ctx: Ctx, form: str) -> web.StreamResponse:
    f = ctx.form
    try:
        method, path, body, done = _access_call(form, f)
    except AccessError as e:
        return await users(ctx, {form: {_field_of(form, e.message): e.message}}, 400)
    code, answer = await ctx.admin_call(method, path, body)
    if code >= 400:
        message = admin_error(answer)
        return await users(ctx, {form: {_field_of(form, message): message}}, code)
    return ctx.redirect(f"{PREFIX}/users", done)


def _access_call(form: str, f: dict[str, str]) -> tuple[str, str, dict, str]:
    """(method, admin path, body, what to say when done) for one of the page's forms."""
    if form == "add-user":
        name = check_principal(f.get("name", ""))
        return ("PUT", f"/_admin/users/{name}", {"password": f.get("password", ""), "admin": "admin" in f},
                f"Added the user {name}.")
    if form == "remove-user":
        name = check_principal(f.get("name", ""))
        return "DELETE", f"/_admin/users/{name}", {}, f"Removed the user {name}."
    if form == "password":
        name = check_principal(f.get("name", ""))
        return ("PUT", f"/_admin/users/{name}/password", {"password": f.get("password", "")},
                f"Set a new password for {name}.")
    if form in ("add-team", "remove-team"):
        team = check_principal(f.get("team", ""), "team")
        if form == "add-team":
            return "PUT", f"/_admin/teams/{team}", {}, f"Created the team {team}."
        return "DELETE", f"/_admin/teams/{team}", {}, f"Deleted the team {team}."
    if form in ("add-member", "remove-member"):
        team, user = check_principal(f.get("team", ""), "team"), check_principal(f.get("user", ""))
        if form == "add-member":
            return "PUT", f"/_admin/teams/{team}/members/{user}", {}, f"Added {user} to {team}."
        return "DELETE", f"/_admin/teams/{team}/members/{user}", {}, f"Removed {user} from {team}."
    if form in ("grant", "revoke"):
        kind = f.get("kind") if f.get("kind") in ("user", "team") else "user"
        body = {kind: f.get("name", ""), "repo": f.get("repo", "")}
        if form == "grant":
            body["role"] = f.get("role", "")
            return "PUT", "/_admin/grants", body, f"Granted {body['role']} on {body['repo']} to {body[kind]}."
        return "DELETE", "/_admin/grants", body, f"Revoked the grant on {body['repo']} of the {kind} {body[kind]}."
    if form == "visibility":
        body = {"repo": f.get("repo", ""), "visibility": f.get("visibility", "")}
        return "PUT", "/_admin/visibility", body, f"{body['repo']}: visibility set to {body['visibility']}."
    raise AccessError("invalid", "unknown form")


def _access_route(form: str) -> Route:
    async def handler(ctx: Ctx) -> web.StreamResponse:
        return await access_change(ctx, form)
    return route("POST", rf"^/console/users/{form}$", handler, ADMIN)


# -- settings -----------------------------------------------------------------------------

async def settings(ctx: Ctx, errors: dict | None = None, status: int = 200) -> web.StreamResponse:
    code, answer = await ctx.admin_call("GET", "/_admin/config")
    if code >= 400:
        raise Refused(code, admin_error(answer))
    rows = []
    for key, spec in SETTINGS.items():
        current = answer["settings"].get(key, {}).get("value", spec.default)
        rows.append({"key": key, "help": spec.help, "value": current, "default": spec.default,
                     "kind": spec.kind.__name__, "choices": list(spec.choices),
                     "is_default": current == spec.default,
                     "shown": _setting_text(current), "default_shown": _setting_text(spec.default)})
    return ctx.page("settings.html", status, title="Settings", section="settings", rows=rows,
                    revision=answer.get("revision"), errors=errors or {}, values=ctx.form)


def _setting_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


async def settings_change(ctx: Ctx) -> web.StreamResponse:
    key = ctx.form.get("key", "")
    if key not in SETTINGS:
        raise Refused(400, "There is no such setting.")
    if ctx.form.get("action") == "unset":
        code, answer = await ctx.admin_call("DELETE", f"/_admin/config/{key}")
        done = f"{key} is back to its default."
    else:
        code, answer = await ctx.admin_call("PUT", f"/_admin/config/{key}", {"value": ctx.form.get("value", "")})
        done = f"{key} is now {_setting_text(answer.get('value')) if isinstance(answer, dict) else ''}."
    if code >= 400:
        return await settings(ctx, {"setting": {key: admin_error(answer)}}, code)
    return ctx.redirect(f"{PREFIX}/settings", done)


# -- garbage collection ---------------------------------------------------------------------

async def _runs(ctx: Ctx) -> list[dict[str, Any]]:
    code, answer = await ctx.admin_call("GET", "/_admin/gc")
    if code >= 400:
        raise Refused(code, admin_error(answer))
    return answer["runs"]


async def gc(ctx: Ctx) -> web.StreamResponse:
    runs = await _runs(ctx)
    return ctx.page("gc.html", title="Garbage collection", section="gc", runs=runs,
                    running=any(r["state"] == "running" for r in runs))


async def gc_json(ctx: Ctx) -> web.StreamResponse:
    return web.json_response({"runs": await _runs(ctx), "time": time.time()})


async def gc_start(ctx: Ctx) -> web.StreamResponse:
    dry_run = ctx.form.get("dry_run") == "true"
    code, answer = await ctx.admin_call("POST", "/_admin/gc", {"dry_run": dry_run})
    if code >= 400:
        raise Refused(code, admin_error(answer))
    return ctx.redirect(f"{PREFIX}/gc", f"Started {'a dry run' if dry_run else 'garbage collection'} "
                                        f"(run {answer.get('id', '')}).")


# -- audit log ----------------------------------------------------------------------------

async def audit(ctx: Ctx) -> web.StreamResponse:
    filters = {k: ctx.query(k, limit=255).strip() for k in ("user", "repo", "kind", "since", "until")}
    query = {k: v for k, v in filters.items() if v}
    query["limit"] = str(AUDIT_PAGE)
    code, answer = await ctx.admin_call("GET", "/_admin/audit", query=query)
    errors, events, older, challenged = {}, [], None, 0
    if code >= 400:
        message = admin_error(answer)
        field = next((k for k in filters if message.startswith(k)), "since")
        errors = {"audit": {field: message}}
    else:
        events, challenged = answer["events"], answer.get("challenged", 0)
        if answer.get("truncated") and events:
            # The next page: strictly older than the last event shown.
            older = str(ctx.request.rel_url.update_query(until=f"{events[-1]['time'] - 1e-6:.6f}"))
    return ctx.page("audit.html", 400 if errors else 200, title="Audit log", section="audit", events=events,
                    filters=filters, kinds=KINDS, older=older, errors=errors, challenged=challenged,
                    challenged_url=str(ctx.request.rel_url.update_query(kind="challenged")),
                    newest=_without(ctx, "until") if filters["until"] else None)


def _without(ctx: Ctx, name: str) -> str:
    url = ctx.request.rel_url
    return str(url.with_query({k: v for k, v in url.query.items() if k != name}))


def routes() -> list[Route]:
    return [
        route("GET", r"^/console/cluster$", cluster, ADMIN),
        route("GET", r"^/console/cluster\.json$", cluster_json, ADMIN),
        route("GET", r"^/console/users$", users, ADMIN),
        *[_access_route(form) for form in _ACCESS_FORMS],
        route("GET", r"^/console/settings$", settings, ADMIN),
        route("POST", r"^/console/settings$", settings_change, ADMIN),
        route("GET", r"^/console/gc$", gc, ADMIN),
        route("GET", r"^/console/gc\.json$", gc_json, ADMIN),
        route("POST", r"^/console/gc$", gc_start, ADMIN),
        route("GET", r"^/console/audit$", audit, ADMIN),
    ]
