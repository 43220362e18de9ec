"""The test run's own housekeeping (its hooks are imported into conftest.py): what keeps
one run from harming the next or hiding a test.

- At the start, the disk its temp directories need is there, or the run stops in one sentence.
- Every collected test has a node id of its own, so xdist runs each one.
- `scratch`: a module- or session-scoped fixture's directory, removed once it passed, as pytest
  removes a passed test's `tmp_path` (`tmp_path_retention_policy = "failed"`, pyproject.toml).
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest

# What a run's temp directories reach at their peak (2.1 GB measured with two test processes),
# with room to spare: below it, the run would fail in dozens of places at once, each far from
# the cause (etcd members that cannot write their log, "No space left on device").
DISK_NEEDED = 4 << 30


def pytest_sessionstart(session: pytest.Session) -> None:
    if hasattr(session.config, "workerinput"):
        return   # an xdist worker: the controller checked
    where = Path(session.config.option.basetemp or tempfile.gettempdir())
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < DISK_NEEDED:
        pytest.exit(f"the suite needs {DISK_NEEDED >> 30} GiB free under {where} for its temp "
                    f"directories; there are {free / (1 << 30):.1f} GiB", returncode=2)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test has a node id of its own.

    schemathesis (4.32, under pytest 9) gives each API operation of a fuzz test the test's own
    node id. xdist's `--dist loadfile` (`make test`) schedules by node id, so it ran 2 of
    test_fuzz's 110 operations and reported nothing about the rest. The item's name does carry
    the operation: it becomes the node id's last part, as pytest does for a parametrized test.
    A duplicate left over stops the run, so no test can drop out silently again.
    """
    counts = Counter(item.nodeid for item in items)
    for item in items:
        if counts[item.nodeid] > 1 and item.parent is not None:
            unique = f"{item.parent.nodeid}::{item.name}"
            if hasattr(item, "_id"):   # pytest 9 keeps the id structured (_pytest.nodeid.NodeId)
                from _pytest.nodeid import NodeId
                item._id = NodeId.parse(unique)
            else:
                item._nodeid = unique
    again = [nodeid for nodeid, n in Counter(item.nodeid for item in items).items() if n > 1]
    if again:
        raise pytest.UsageError(f"tests share a node id, so xdist would run only one of each: {again[:5]}")


def scratch(request: pytest.FixtureRequest, name: str) -> Path:
    """A directory for a module- or session-scoped fixture, removed after its teardown when that
    teardown and every test meanwhile passed, as `tmp_path_retention_policy = "failed"`
    (pyproject.toml) removes a passed test's `tmp_path`.

    A run starts some 150 etcd members, and each preallocates 128 MB of write-ahead log: kept
    until the end, they filled a CI machine's disk. A failed test's directories stay, logs and all.
    """
    path = request.getfixturevalue("tmp_path_factory").mktemp(name)
    failed = request.session.testsfailed
    # Registered before the fixture yields, so it runs after the fixture's own teardown; the
    # directory goes once that teardown's report says it passed (pytest_runtest_logreport).
    request.addfinalizer(lambda: _torn_down.append((path, request.session, failed)))
    return path


_torn_down: list[tuple[Path, pytest.Session, int]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # In the process that ran the test: its teardown, fixtures' finalizers included, is over.
    if report.when != "teardown":
        return
    while _torn_down:
        path, session, failed = _torn_down.pop()
        if report.passed and session.testsfailed == failed:
            shutil.rmtree(path, ignore_errors=True)
