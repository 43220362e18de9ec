"""The `moorage` command's conventions, against a real replica.

On a replica's node the commands find it by themselves (its URL and CA from
--data-dir, default ./moorage-data); MOORAGE_URL serves scripts; missing
credentials are asked for at a terminal and named in one sentence
elsewhere; options go before or after positional arguments.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ADMIN_PASSWORD, ENV, MOORAGE, Registry, moorage

pytestmark = pytest.mark.cli

# The environment of a user on the node: no URL, no CA file, no credentials given.
BARE = {k: v for k, v in ENV.items() if not k.startswith("MOORAGE_")}
CREDENTIALS = {"MOORAGE_USERNAME": "admin", "MOORAGE_PASSWORD": ADMIN_PASSWORD}


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(MOORAGE + args, capture_output=True, text=True, timeout=60, cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL)


def one_sentence_error(out: subprocess.CompletedProcess, *words: str) -> None:
    assert out.returncode == 1 and out.stdout == "", (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moorage: ") and "Traceback" not in out.stderr, out.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture
def node(registry: Registry, tmp_path: Path) -> Path:
    """A working directory like the one `make run` leaves: ./moorage-data is the replica's."""
    (tmp_path / "moorage-data").symlink_to(registry.data_dir)
    return tmp_path


def test_on_the_node_commands_find_the_replica_and_its_ca(registry: Registry, node: Path, tmp_path: Path):
    status = json.loads(run(["status", "--json"], node, {**BARE, **CREDENTIALS}).stdout)
    assert [r["id"] for r in status["replicas"]] == [registry.replica_id]
    recorded = json.loads((registry.data_dir / "api.json").read_text())
    assert recorded == {"url": registry.url, "ca_cert": str(registry.ca)}
    # From elsewhere, --data-dir names it; $MOORAGE_URL (scripts) and --existing win over it.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run(["config", "get", "readonly", "--data-dir", str(registry.data_dir)], elsewhere, {**BARE, **CREDENTIALS})
    assert out.stdout.strip() == "false", out.stderr
    wrong = {**BARE, **CREDENTIALS, "MOORAGE_URL": "https://127.0.0.1:1"}
    one_sentence_error(run(["status"], node, wrong), "cannot reach https://127.0.0.1:1")
    assert run(["status", "--existing", registry.url], node, wrong).returncode == 0
    # Nowhere to go: one sentence naming the ways.
    one_sentence_error(run(["status"], elsewhere, {**BARE, **CREDENTIALS}), "--existing", "$MOORAGE_URL",
                       "--data-dir")


def test_missing_credentials_without_a_terminal_name_the_flag(node: Path):
    one_sentence_error(run(["status"], node, BARE), "--username", "$MOORAGE_USERNAME")
    one_sentence_error(run(["user", "list"], node, {**BARE, "MOORAGE_USERNAME": "admin"}),
                       "--password-stdin", "$MOORAGE_PASSWORD")
    out = subprocess.run(MOORAGE + ["status", "--username", "admin", "--password-stdin"], input=ADMIN_PASSWORD + "\n",
                         capture_output=True, text=True, timeout=60, cwd=node, env=BARE)
    assert out.returncode == 0 and "1 replica, 1 healthy" in out.stdout, out.stderr


def test_at_a_terminal_missing_credentials_are_asked_for(registry: Registry, node: Path):
    pid, fd = pty.fork()
    if pid == 0:  # the child: a session whose controlling terminal is the pty, as a login shell has
        os.chdir(node)
        os.execve(MOORAGE[0], MOORAGE + ["status"], BARE)
    seen = b""

    def expect(text: bytes, timeout: float = 30) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while text not in seen:
            assert time.monotonic() < deadline, f"no {text!r} in {seen!r}"
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    seen += os.read(fd, 4096)
                except OSError:  # the child is gone: nothing more to read
                    break
        assert text in seen, seen

    try:
        expect(b"Username: ")
        os.write(fd, b"admin\n")
        expect(b"Password: ")
        os.write(fd, ADMIN_PASSWORD.encode() + b"\n")
        expect(b"1 replica, 1 healthy")
        assert ADMIN_PASSWORD.encode() not in seen, "the password was echoed"
        _, code = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(code) == 0
    finally:
        os.close(fd)


@pytest.mark.parametrize("args", [
    ["config", "set", "{E}", "log.level", "info"],
    ["config", "set", "log.level", "{E}", "info"],
    ["config", "set", "log.level", "info", "{E}"],
    ["perm", "check", "{E}", "--repo", "cli/x", "--user", "admin"],
    ["repo", "visibility", "{E}", "cli-public/*", "public"],
    ["repo", "visibility", "cli-public/*", "{E}", "public"],
], ids=lambda a: "-".join(a).replace("{E}", "E"))
def test_options_before_or_after_positionals(registry: Registry, args: list[str]):
    out = moorage(*[x for a in args for x in (["--existing", registry.url] if a == "{E}" else [a])], "--json")
    assert json.loads(out.stdout), out.stdout
