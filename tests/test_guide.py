"""docs/high-availability.md, run: every command in it, in order, each on its own node.

The guide's nodes are hosts of their own (tests/hosts.py): registry-1 at
10.0.0.11, registry-2 at .12, registry-3 at .13 and the load balancer at
10.0.0.5, named registry.example.com, each a network namespace with the
guide's addresses and default ports, so every command runs as written but for
its paths, which become temporary directories (the shared storage one
directory all nodes see, as over NFS). Long-running commands (serve, join, lb
--watch) run in the background, as on their own nodes. Each command's printed lines must match the guide's, once
ids, numbers and addresses are set aside. HTML comments `<!-- test: kill
registry-2 -->` and `<!-- test: stop registry-1 -->` stand for what a person
does with their hands: a machine lost, a service stopped; `<!-- test: new
machines -->` for fresh nodes at the same addresses (everything running is
stopped, the paths are new), and `<!-- test: object store at IP:PORT -->` for
an S3 store the guide's operator already has: SeaweedFS on a host of its own,
serving HTTPS there with a certificate from its own CA (the guide's
/etc/moorage/s3-ca.crt) and taking the guide's credentials.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

import hosts
from conftest import ENV, wait_for
from seaweed import SeaweedFS

pytestmark = pytest.mark.cluster

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "high-availability.md"
BACKGROUND = ("moorage serve", "moorage join")
DIRECTIVE = re.compile(r"<!-- test: (kill|stop|new machines|object store at) ?([\w .:-]*?) -->")


@dataclass
class Node:
    name: str
    host: hosts.Host
    proc: subprocess.Popen | None = None
    log: Path | None = None


@dataclass
class Step:
    kind: str              # "run" or a directive ("kill", "stop", "new machines", "object store at")
    node: str
    text: str
    expected: list[str] = field(default_factory=list)


def steps() -> list[Step]:
    found: list[Step] = []
    node, in_block = "", False
    for line in GUIDE.read_text().splitlines():
        directive = DIRECTIVE.match(line)
        if directive:
            for target in directive.group(2).split() or [""]:
                found.append(Step(directive.group(1), target, ""))
        elif line.startswith("```console"):
            in_block = True
        elif line.startswith("```") and in_block:
            in_block = False
        elif in_block and line.startswith("# on "):
            node = line[5:].strip()
        elif in_block and line.startswith("$ "):
            found.append(Step("run", node, line[2:]))
        elif in_block and line.strip() and found:
            found[-1].expected.append(line)
    return found


# What the guide shows as samples and the run prints for real: learned from a
# command's output, substituted into the commands after it.
LEARNED = (re.compile(r"joined as replica ([0-9a-f]{12})"), re.compile(r"fingerprint (sha256:[0-9a-f]{64})"))


def shape(text: str) -> str:
    """A line with what varies from run to run set aside."""
    text = re.sub(r"sha256:[0-9a-f]{64}", "FINGERPRINT", text)
    text = re.sub(r"https?://\S+", "URL", text)
    text = re.sub(r"(?<![\w.])/[\w./-]+", "PATH", text)
    text = re.sub(r"\b[0-9a-f]{12}\b", "ID", text)
    text = re.sub(r"\d+", "N", text)
    return " ".join(text.split())


class Guide:
    def __init__(self, tmp: Path, net: hosts.Network):
        self.tmp = tmp
        self.net = net
        self.root = tmp               # where the nodes' paths are: new machines, a new root
        self.store: SeaweedFS | None = None
        self.nodes = {f"registry-{i}": Node(f"registry-{i}", net.host(f"registry-{i}", f"10.0.0.1{i}"))
                      for i in (1, 2, 3)}
        self.nodes["the load balancer"] = Node("lb", net.host("lb", "10.0.0.5"))
        net.name("registry.example.com", "10.0.0.5")
        self.ids: dict[str, str] = {}  # the guide's sample replica ids and CA fingerprint -> the real ones
        self.env = self.fresh_env()
        self.background: list[subprocess.Popen] = []

    @staticmethod
    def fresh_env() -> dict[str, str]:
        env = {k: v for k, v in ENV.items() if not k.startswith(("MOORAGE_", "AWS_"))}
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
        return env

    def translate(self, node: Node, command: str) -> str:
        command = command.replace("/mnt/registry", str(self.root / "shared-storage"))
        command = command.replace("/etc/haproxy/", f"{self.root}/haproxy-")
        if self.store is not None:
            command = command.replace("/etc/moorage/s3-ca.crt", str(self.store.ca_cert))
        command = re.sub(r"/var/lib/(moorage[\w-]*)", lambda m: f"{self.root}/{node.name}/{m.group(1)}", command)
        for sample, real in self.ids.items():
            command = command.replace(sample, real)
        if command.startswith("moorage lb haproxy") and "--watch" in command:
            command += f" --pidfile {self.tmp}/haproxy.pid"
        return command

    def run(self, step: Step) -> None:
        node = self.nodes[step.node]
        command = self.translate(node, step.text)
        if command.startswith("export "):
            for assignment in shlex.split(command)[1:]:
                key, _, value = assignment.partition("=")
                self.env[key] = value
            return
        if command.startswith(BACKGROUND) or "--watch" in command:
            self.start(node, command, step)
            return
        out = subprocess.run(node.host.run_prefix() + ["bash", "-c", command], capture_output=True, text=True, env=self.env,
                             timeout=120, stdin=subprocess.DEVNULL)
        assert out.returncode == 0, f"{command}\nexited {out.returncode}\n{out.stdout}\n{out.stderr}"
        self.expect(step, out.stdout + out.stderr, command)

    def start(self, node: Node, command: str, step: Step) -> None:
        node.log = self.tmp / f"{node.name}-{len(self.background)}.log"
        with open(node.log, "wb") as log:
            proc = subprocess.Popen(node.host.run_prefix() + ["bash", "-c", f"exec {command}"], stdout=log, stderr=subprocess.STDOUT,
                                    env=self.env, start_new_session=True, stdin=subprocess.DEVNULL)
        self.background.append(proc)
        if "--watch" in command:
            output = Path(command.split("--output ")[1].split()[0])
            deadline = time.monotonic() + 30
            while not output.exists():
                assert proc.poll() is None and time.monotonic() < deadline, node.log.read_text()
                time.sleep(0.2)
            return
        node.proc = proc
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"{command}\n{node.log.read_text()}"
            try:  # readiness only: whose certificate it is, is the commands' business
                if httpx.get(f"https://{node.host.ip}:5000/_ping", timeout=1, verify=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{command} did not start:\n{node.log.read_text()}"
            time.sleep(0.2)
        deadline = time.monotonic() + 15
        while step.expected and not all(shape(e) in shape(node.log.read_text()) for e in step.expected):
            assert time.monotonic() < deadline, f"{command}: expected\n{step.expected}\n{node.log.read_text()}"
            time.sleep(0.2)
        for line in step.expected:  # learn what the guide's sample ids and fingerprint stand for
            for pattern in LEARNED:
                sample, real = pattern.search(line), pattern.search(node.log.read_text())
                if sample and real:
                    self.ids[sample.group(1)] = real.group(1)

    def expect(self, step: Step, output: str, command: str) -> None:
        got = {shape(line) for line in output.splitlines()}
        for line in step.expected:
            assert shape(line) in got, f"{command}: the guide shows\n  {line}\nbut it printed\n{output}"

    def directive(self, step: Step) -> None:
        if step.kind == "new machines":
            self.close()
            for node in self.nodes.values():
                node.proc = None
            self.root = self.tmp / f"machines-{len(list(self.tmp.glob('machines-*'))) + 1}"
            self.env, self.ids = self.fresh_env(), {}
            return
        if step.kind == "object store at":
            ip, _, port = step.node.partition(":")
            host = self.net.host("objects", ip)
            # The guide's credentials are AWS's documented samples: this store takes exactly those.
            access, secret = (re.search(rf"{k}=(\S+)", GUIDE.read_text()).group(1)
                              for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))
            bucket = re.search(r"--storage s3://([\w.-]+)", GUIDE.read_text()).group(1)
            self.store = SeaweedFS(self.tmp / "seaweed", ip=ip, on=host, access_key=access, secret_key=secret,
                                   bucket=bucket)
            self.store.ports["s3.https"] = int(port)   # the store's host is its own: any port is free there
            self.store.start()
            return
        node = self.nodes[step.node]
        assert node.proc is not None, f"{step.kind} {step.node}: nothing runs there"
        if step.kind == "kill":
            os.killpg(node.proc.pid, signal.SIGKILL)
            node.proc.wait()
            time.sleep(2)  # long enough for status to notice, as a person would
        else:
            node.proc.send_signal(signal.SIGTERM)
            assert node.proc.wait(timeout=30) == 0

    def close(self) -> None:
        for proc in self.background:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=15)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.background = []


def check_shared_directory_cluster(guide: Guide, network: hosts.Network) -> None:
    """The end state the shared-directory part promises: the repaired replica serves with new ones
    joined, and a client reaches it through the load balancer by its name."""
    one = guide.nodes["registry-1"].host
    status = subprocess.run(one.run_prefix() + ["moorage", "status", "--existing", "https://10.0.0.11:5000",
                                                "--json"], capture_output=True, text=True, env=guide.env,
                            timeout=60)
    assert status.returncode == 0, status.stderr
    assert '"voters": 2' in status.stdout, status.stdout
    # A client reaches the cluster through the load balancer by its name, verifying the
    # replica's certificate for that name against the cluster CA; the replica sees the
    # client's own address through the PROXY header (the guide's proxy_protocol.from step).
    ca = guide.root / "registry-1" / "moorage" / "tls" / "ca.crt"
    probe = ("import httpx, sys; r = httpx.get('https://registry.example.com:5000/token?service=moorage', "
             "verify=sys.argv[1], auth=('admin', 'not-the-password')); print(r.status_code)")
    out = subprocess.run(network.client_host.run_prefix() + [sys.executable, "-c", probe, str(ca)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "401", out.stderr

    def failed_login_seen() -> str | None:
        audit = subprocess.run(one.run_prefix() + ["moorage", "audit", "--existing", "https://10.0.0.11:5000",
                                                   "--kind", "login-failed", "--json"],
                               capture_output=True, text=True, env=guide.env, timeout=60)
        assert audit.returncode == 0, audit.stderr
        return audit.stdout if re.search(r'"remote":\s*"10\.0\.0\.100"', audit.stdout) else None
    wait_for(failed_login_seen, 15, "the failed login, from the client's own address, in the audit")


def check_bucket_cluster(guide: Guide) -> None:
    """Three replicas sharing only the bucket: none has a blob directory, and each says so."""
    assert guide.store is not None
    for node in ("registry-1", "registry-2", "registry-3"):
        data = guide.root / node / "moorage"
        assert json.loads((data / "replica.json").read_text())["storage_dir"] == "s3://registry-blobs/prod"
        assert not (data / "blobs").exists(), f"{node} has a blob directory"
    status = subprocess.run(guide.nodes["registry-3"].host.run_prefix() + [
        "moorage", "status", "--existing", "https://10.0.0.13:5000", "--json"],
        capture_output=True, text=True, env=guide.env, timeout=60)
    assert status.returncode == 0, status.stderr
    assert '"voters": 3' in status.stdout and '"reachable": true' in status.stdout, status.stdout


def test_guide_commands_run_as_written(tmp_path, network):
    found = steps()
    assert sum(s.kind == "run" for s in found) >= 15, "the guide lost its commands"
    assert any(s.kind == "object store at" for s in found), "the guide lost its bucket set-up"
    guide = Guide(tmp_path, network)
    try:
        for step in found:
            if step.kind == "run":
                guide.run(step)
            else:
                if step.kind == "new machines":
                    check_shared_directory_cluster(guide, network)
                guide.directive(step)
        check_bucket_cluster(guide)
    finally:
        guide.close()
        if guide.store is not None:
            guide.store.stop()
