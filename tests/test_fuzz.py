"""Property-based fuzzing of the whole HTTP API (schemathesis, from /openapi.json).

Every documented operation gets generated requests, valid and invalid by
the document (modes positive and negative), sent to a real replica of its
own: once as the cluster admin, once anonymously. For every answer: no 5xx
(503 included: a healthy single replica has quorum), an answer within
REQUEST_TIMEOUT (no hang), no Python traceback in the body, and a status,
content type, headers and body that conform to the document.

The admin pass leaves out the operations that change the cluster's
membership (join, promote, abandon, remove): with generated arguments they
would only test etcd, and a stray success would break the replica under
test; and the backup's binary downloads, which test_backup checks. They
are fuzzed anonymously, and test_cluster exercises them for real.
"""

from __future__ import annotations

import base64
import re
import time
from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance, response_headers_conformance, response_schema_conformance,
    status_code_conformance,
)

from conftest import ADMIN_PASSWORD, Registry, scratch
from moorage.api.openapi import document

pytestmark = pytest.mark.spec

# Bounds the file to about a minute on two cores: ~50 operations x 2 passes.
MAX_EXAMPLES = 10
REQUEST_TIMEOUT = 10.0
CLUSTER_CHANGES = r"^/_admin/cluster/(join|promote|abandon|replicas/)"
# And the backup's binary downloads (an etcd snapshot, blobs): test_backup checks them byte for byte.
BACKUP_DOWNLOADS = r"^/_admin/backup/(snapshot|blobs/)"
TRACEBACK = re.compile(r'Traceback \(most recent call last\)|File "[^"]+", line \d+')
BASIC = "Basic " + base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()

# The admin pass also runs schemathesis's coverage phase (boundary values,
# missing and mistyped parameters: deterministic and cheap per case); the
# anonymous pass mostly meets 401, so random cases suffice there.
ADMIN_SCHEMA = schemathesis.openapi.from_dict(document(), config=schemathesis.Config.from_dict(
    {"phases": {"coverage": {"enabled": True}}})).exclude(path_regex=CLUSTER_CHANGES) \
    .exclude(path_regex=BACKUP_DOWNLOADS)
SCHEMA = schemathesis.openapi.from_dict(document(), config=schemathesis.Config.from_dict(
    {"phases": {"coverage": {"enabled": False}}}))
STATS: Counter[str] = Counter()
STATUSES: Counter[str] = Counter()


@schemathesis.check
def no_traceback(ctx, response, case):
    """A response never shows the server's insides, whatever the request."""
    if TRACEBACK.search(response.text or ""):
        raise AssertionError(f"traceback in the response body: {response.text[:300]!r}")


@schemathesis.check
def no_unavailable(ctx, response, case):
    """503 is a 5xx too; a healthy single replica has no reason to send it."""
    if response.status_code >= 500:
        raise AssertionError(f"{response.status_code}: {response.text[:300]!r}")


CHECKS = [not_a_server_error, no_unavailable, no_traceback, status_code_conformance,
          content_type_conformance, response_headers_conformance, response_schema_conformance]
FUZZ_SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                         phases=[Phase.explicit, Phase.generate],
                         suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def target(request) -> Registry:
    reg = Registry(scratch(request, "fuzz") / "data").start()
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def session(target) -> requests.Session:
    with requests.Session() as s:
        s.verify = str(target.ca) if target.tls else True
        yield s


@pytest.fixture(scope="module", autouse=True)
def report(request):
    """Prints the figures the release note quotes, even without -s."""
    started = time.monotonic()
    yield
    line = (f"fuzz: {STATS['operations']} operation runs, {STATS['cases']} cases tried "
            f"({STATS['admin']} as admin, {STATS['anonymous']} anonymous), "
            f"failures found: {STATS['failures']}, in {time.monotonic() - started:.0f} s")
    statuses = "fuzz statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(STATUSES.items()))
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n{line}\n{statuses}")


def _run(case, target: Registry, session: requests.Session, who: str, headers: dict) -> None:
    STATS["cases"] += 1
    STATS[who] += 1
    try:
        response = case.call(base_url=target.url, session=session, headers=headers, timeout=REQUEST_TIMEOUT,
                             verify=session.verify)
        STATUSES[f"{who} {response.status_code}"] += 1
        case.validate_response(response, checks=CHECKS)
    except BaseException:
        STATS["failures"] += 1
        raise


_seen: set[str] = set()


def _count_operation(case, who: str) -> None:
    key = f"{who} {case.operation.label}"
    if key not in _seen:
        _seen.add(key)
        STATS["operations"] += 1


@ADMIN_SCHEMA.parametrize()
@FUZZ_SETTINGS
def test_fuzz_as_admin(case, target, session):
    _count_operation(case, "admin")
    _run(case, target, session, "admin", {"Authorization": BASIC})


@SCHEMA.parametrize()
@FUZZ_SETTINGS
def test_fuzz_anonymous(case, target, session):
    _count_operation(case, "anonymous")
    case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    _run(case, target, session, "anonymous", {})
