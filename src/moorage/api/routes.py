"""One route type for every path a replica answers: /v2/, /_admin/, the web console and the rest.

A route is a method, a pattern matched against the raw (still
percent-encoded) path, a handler, and what the caller needs: on /v2/ the
action it takes on the repository the path names (pull, push, delete),
elsewhere who may come at all (anyone, a signed-in user, a cluster admin).
Each surface's front door (api/app.py, api/admin.py, api/console/app.py)
checks the need before the handler runs; the handlers' arguments are the
surface's own.

A table holds each pattern once, with its routes by method, in the order
given: a path is matched once, the first pattern that matches decides, and
the method is then one dict lookup. The manifest GET, the hottest request,
costs one regular expression.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

# What a route needs of its caller. On /v2/, the action on the repository...
PULL, PUSH, DELETE = "pull", "push", "delete"
# ...elsewhere, who may come at all.
ANYONE, USER, ADMIN = "anyone", "user", "admin"
# A route for every method of its path (the handler answers the ones it does not take).
ANY = "*"

Handler = Callable[..., Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: re.Pattern
    handler: Handler
    need: str = ANYONE
    metric: str = "other"   # the `handler` label of its request metrics (metrics.HANDLERS)


def route(method: str, pattern: str, handler: Handler, need: str = ANYONE, metric: str = "other") -> Route:
    return Route(method, re.compile(pattern), handler, need, metric)


class Routes:
    def __init__(self, routes: Iterable[Route] = ()):
        self._table: list[tuple[re.Pattern, dict[str, Route]]] = []
        self.add(routes)

    def add(self, routes: Iterable[Route]) -> None:
        for r in routes:
            for pattern, methods in self._table:
                if pattern.pattern == r.pattern.pattern:
                    methods[r.method] = r
                    break
            else:
                self._table.append((r.pattern, {r.method: r}))

    def __iter__(self) -> Iterator[Route]:
        for _, methods in self._table:
            yield from methods.values()

    def match(self, method: str, path: str) -> tuple[Route | None, re.Match | None, tuple[str, ...]]:
        """The route of `method` on `path` and the path's match; or None, None and the methods
        the path's pattern takes (none when no pattern matches)."""
        for pattern, methods in self._table:
            m = pattern.match(path)
            if m is not None:
                found = methods.get(method) or methods.get(ANY)
                return (found, m, ()) if found is not None else (None, None, tuple(methods))
        return None, None, ()
