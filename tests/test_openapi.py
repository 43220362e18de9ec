"""The OpenAPI document covers every route the server has, and only those.

The routes are tables of patterns (Dispatcher.v2, Dispatcher.other,
AdminApi.routes: api/routes.py); the document is written by hand.
Each documented operation is turned into a concrete request (its path
parameters' examples filled in) and dispatched the way the server
dispatches it, so a route added without documentation, or documentation
of a route that does not exist, fails here.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from moorage.api import app
from moorage.api.admin import AdminApi
from moorage.api.openapi import document, document_json
from moorage.api.webhookadmin import webhook_routes

pytestmark = pytest.mark.spec

METHODS = ("get", "head", "put", "post", "patch", "delete")


def _operations() -> list[tuple[str, str]]:
    """(METHOD, concrete path) of every documented operation."""
    out = []
    for template, item in document()["paths"].items():
        for method, op in item.items():
            if method not in METHODS:
                continue
            path = template
            for param in op.get("parameters", []):
                if param["in"] == "path":
                    path = path.replace("{" + param["name"] + "}", param["example"])
            assert "{" not in path, (template, "a path parameter lacks an example")
            out.append((method.upper(), path))
    return out


def _dispatcher() -> app.Dispatcher:
    return app.Dispatcher(None, None, dict, lambda: (True, ""))  # routing only


def _repository_table(dispatcher: app.Dispatcher) -> list[tuple[re.Pattern, dict[str, object]]]:
    """The /v2/ routes on a repository, by pattern: (pattern, {method: route})."""
    table: dict[str, tuple[re.Pattern, dict[str, object]]] = {}
    for r in dispatcher.v2:
        if r.need in ("pull", "push", "delete"):
            table.setdefault(r.pattern.pattern, (r.pattern, {}))[1][r.method] = r
    return list(table.values())


def _admin_routes() -> list[tuple[str, re.Pattern]]:
    admin = AdminApi(SimpleNamespace(), SimpleNamespace(), access=SimpleNamespace(users=None), gc=SimpleNamespace(),
                     webhooks=webhook_routes(SimpleNamespace(), SimpleNamespace()))
    return [(r.method, r.pattern) for r in admin.routes]


def _other_paths() -> list[re.Pattern]:
    """The fixed paths outside /v2/ and /_admin/ the dispatcher answers (its `other` routes)."""
    return list({r.pattern.pattern: r.pattern for r in _dispatcher().other}.values())


def test_every_route_is_documented_and_nothing_else():
    ops = _operations()
    dispatcher = _dispatcher()
    table = _repository_table(dispatcher)
    assert {r.pattern.pattern for r in dispatcher.v2 if r.need not in ("pull", "push", "delete")} == \
        {r"^/v2/_catalog$", r"^/v2/?$"}, "the /v2/ routes besides a repository's are the base and the catalog"
    admin = _admin_routes()
    other = _other_paths()
    covered: set[tuple[int, str]] = set()
    covered_admin: set[int] = set()
    for method, path in ops:
        if path in ("/v2/", "/v2/_catalog"):
            assert method == "GET"
            continue
        if path.startswith("/v2/"):
            index = next((i for i, (p, _) in enumerate(table) if p.match(path)), None)
            assert index is not None, f"{method} {path} is documented but no route matches it"
            assert method in table[index][1], f"{method} {path}: the route has no {method}"
            covered.add((index, method))
        elif path.startswith("/_admin/"):
            index = next((i for i, (m, p) in enumerate(admin) if m == method and p.match(path)), None)
            assert index is not None, f"{method} {path} is documented but the admin API has no such route"
            covered_admin.add(index)
        else:
            assert any(p.match(path) for p in other), f"{method} {path} is documented but no route answers it"
    missing = [(table[i][0].pattern, m) for i, (_, methods) in enumerate(table) for m in methods
               if (i, m) not in covered]
    assert not missing, f"routes without documentation: {missing}"
    missing_admin = [(m, p.pattern) for i, (m, p) in enumerate(admin) if i not in covered_admin]
    assert not missing_admin, f"admin routes without documentation: {missing_admin}"
    documented_other = {path for _, path in ops if not path.startswith(("/v2/", "/_admin/"))}
    undocumented = [p.pattern for p in other if not any(p.match(path) for path in documented_other)]
    assert not undocumented, f"undocumented: {undocumented}"


def test_document_is_valid_openapi():
    schemathesis = pytest.importorskip("schemathesis")
    schema = schemathesis.openapi.from_dict(document())
    operations = [op for op in schema.get_all_operations()]
    assert len(operations) == len(_operations())
    assert all(r.ok() for r in operations), [r.err() for r in operations if not r.ok()]
    assert document_json().startswith(b'{"openapi":"3.0.3"')
