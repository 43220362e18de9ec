"""The admin API's garbage collection (routes for AdminApi).

    POST /_admin/gc          {dry_run?: bool}: start a run on this replica; the run's record
                             (its id, state "running"); 409 while another run holds the lock
    GET  /_admin/gc          {"runs": [run, ...]}: every kept run, newest first
    GET  /_admin/gc/<id>     one run: state, phase, counts marked and swept, bytes freed

Any replica answers GET for any run: the records are in etcd.
"""

from __future__ import annotations

from moorage.api.routes import ADMIN, Route, route
from moorage.cluster.operations import ClusterError
from moorage.registry.gc_runner import GcRunner


def gc_routes(runner: GcRunner) -> list[Route]:
    return [
        route("POST", r"^/_admin/gc$", lambda r, b: runner.start(dry_run=_dry_run(b)), ADMIN),
        route("GET", r"^/_admin/gc$", lambda r, b: runner.history(), ADMIN),
        route("GET", r"^/_admin/gc/([0-9A-Za-z-]{1,64})$", lambda r, b, run_id: runner.get(run_id), ADMIN),
    ]


def _dry_run(body) -> bool:
    value = body.get("dry_run", False) if isinstance(body, dict) else False
    if not isinstance(value, bool):
        raise ClusterError("invalid", "dry_run takes true or false")
    return value
