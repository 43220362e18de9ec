"""`moorage lb haproxy`: an HAProxy configuration for the cluster, printed once or kept current.

The replicas come from the admin API's cluster status. With --watch the
command stays in the foreground, writes the file, starts HAProxy (or runs the
user's reload command) and follows joins and removals by polling once a
second; HAProxy's own health checks handle replicas that die or recover,
which no poll could match for speed.

HAProxy checks the replicas' certificates against the cluster CA: the file
given with --ca-cert (or $MOORAGE_CA_CERT), or, when the CA was fetched and
checked with --ca-fingerprint, a copy written next to --output.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from moorage.cli.adminclient import AdminClient, add_cluster_options
from moorage.cli.errors import CliError
from moorage.cluster import haproxy

POLL_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0
# A status poll waits on every replica's /_ping (1.5 s at most) and etcd
# probes; longer than this and it is better to ask another replica.
POLL_TIMEOUT = httpx.Timeout(10.0, connect=3.0)
START_SECONDS = 10.0
DRAIN_SECONDS = 10.0
CHECK_SECONDS = 30.0
RELOAD_COMMAND_SECONDS = 60.0
SOCKET_PATH_MAX = 107  # sun_path, less the terminating NUL


def register(commands) -> None:
    p = commands.add_parser("lb", help="configure a load balancer in front of the replicas")
    kinds = p.add_subparsers(dest="lb", metavar="KIND", required=True)
    h = kinds.add_parser(
        "haproxy", help="an HAProxy configuration for every replica (printed, or kept current with --watch)",
        description="Print an HAProxy configuration that balances over every replica of the cluster, with "
                    "health checks on /_ping. HAProxy passes TLS through to the replicas (give each one "
                    "the load balancer's name with --tls-name) and checks them over TLS against the "
                    "cluster CA: the --ca-cert file, or with --ca-fingerprint a copy written next to "
                    "--output. When the cluster setting proxy_protocol.from is set, HAProxy sends the PROXY "
                    "protocol v2 (send-proxy-v2) so replicas see each client's address. With --watch, write "
                    "it to --output, run HAProxy (or --reload-command) and rewrite and reload it whenever "
                    "replicas join or are removed, or that setting changes.")
    add_cluster_options(h)
    h.add_argument("--watch", action="store_true",
                   help="keep the file current and HAProxy running until SIGTERM or Ctrl-C")
    h.add_argument("--output", metavar="FILE", type=Path,
                   help="write the configuration here (atomically) instead of printing it; needed with --watch")
    h.add_argument("--bind", default=haproxy.DEFAULT_BIND, metavar="HOST:PORT",
                   help=f"where HAProxy listens for clients (default: {haproxy.DEFAULT_BIND})")
    h.add_argument("--pidfile", metavar="FILE", type=Path,
                   help="with --watch: HAProxy's master pid goes here (default: the --output file + .pid)")
    h.add_argument("--reload-command", metavar="CMD",
                   help="with --watch: run this shell command after each rewrite (e.g. 'systemctl reload "
                        "haproxy') instead of running HAProxy here")
    h.set_defaults(run=run_haproxy)


def run_haproxy(args: argparse.Namespace) -> int:
    try:
        haproxy.check_bind(args.bind)
    except haproxy.ConfigError as e:
        raise CliError(str(e)) from None
    if args.watch:
        if args.output is None:
            raise CliError("--watch needs --output FILE: the configuration file HAProxy reads")
        return Watch(args).run()
    if args.pidfile or args.reload_command:
        raise CliError("--pidfile and --reload-command only apply with --watch")
    admin = AdminClient(args)
    try:
        status = admin.call("GET", "/_admin/cluster/status")
        text = render(args, status, stats_socket=None, ca_file=ca_file(args, admin, status))
    finally:
        admin.close()
    if args.output is None:
        sys.stdout.write(text)
    else:
        write_atomically(args.output, text)
    return 0


def ca_file(args: argparse.Namespace, admin: AdminClient, status: dict) -> str | None:
    """The CA file HAProxy verifies the replicas' certificates with (None: the system's store).

    The same trust the command itself used to reach the cluster: --ca-cert (or
    $MOORAGE_CA_CERT) as an absolute path, or the CA that --ca-fingerprint
    fetched and checked, copied next to the configuration.
    """
    if args.insecure_tls:
        return None
    if not args.ca_fingerprint:
        return str(Path(admin.ca_file).resolve()) if admin.ca_file else None
    if admin.ca_pem is None:
        return None
    if args.output is None:
        if not any(b.url.startswith("https://") for b in haproxy.backends(status)):
            return None
        raise CliError("HAProxy needs the cluster CA in a file to check the replicas: pass --ca-cert FILE, "
                       "or --output FILE to have it written next to the configuration")
    path = args.output.resolve().with_name(args.output.name + ".ca.crt")
    write_atomically(path, admin.ca_pem.decode("ascii"))
    return str(path)


def render(args: argparse.Namespace, status: dict, stats_socket: str | None, ca_file: str | None) -> str:
    options = haproxy.Options(bind=args.bind, stats_socket=stats_socket, ca_file=ca_file,
                              verify_tls=not args.insecure_tls, send_proxy=haproxy.sends_proxy(status))
    try:
        return haproxy.render(haproxy.backends(status), options)
    except haproxy.ConfigError as e:
        raise CliError(str(e)) from None


def write_atomically(path: Path, text: str) -> None:
    """Readers (HAProxy at a reload) see the old file or the new one, never half of one."""
    path = path.resolve()
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise CliError(f"cannot write {path}: {e.strerror or e}") from None


def haproxy_binary() -> str | None:
    # /usr/sbin is often not on a non-root user's PATH, and that is where Debian puts it.
    found = shutil.which("haproxy")
    if found:
        return found
    return "/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None


def _say(message: str) -> None:
    print(f"moorage: {message}", file=sys.stderr, flush=True)


class _Stop(Exception):
    """SIGTERM or SIGINT arrived while we were only waiting (polling or sleeping)."""


def _die_with_parent() -> None:
    # HAProxy follows us if we are SIGKILLed: an orphan would keep the port
    # and stop the next `moorage lb haproxy --watch` from binding it.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Watch:
    """The --watch loop: poll, rewrite and reload on a membership change, stop on a signal."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.output: Path = args.output.resolve()
        self.pidfile: Path = (args.pidfile or Path(f"{self.output}.pid")).resolve()
        if not self.output.parent.is_dir():
            raise CliError(f"--output: the directory {self.output.parent} does not exist")
        self.binary = haproxy_binary()
        if self.binary is None and not args.reload_command:
            raise CliError("HAProxy is not installed (apt-get install haproxy), or pass --reload-command "
                           "for an HAProxy run elsewhere")
        self.stats_socket: str | None = None
        if not args.reload_command:  # our own HAProxy runs as us, so it can create the socket there
            sock = f"{self.output}.sock"
            self.stats_socket = sock if len(sock) <= SOCKET_PATH_MAX else None
        self.proc: subprocess.Popen | None = None
        self.text: str | None = None
        self.names: list[str] = []
        self.stopping = False
        self.waiting = False
        self.reload_pending = False
        self.start_failing = False
        self.urls: list[str] = []
        self.existing = ""
        self.ca_file: str | None = None

    # -- signals -------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        if self.waiting:  # interrupt a poll or a sleep, never a write or a reload
            raise _Stop()

    def _wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))

    # -- the loop ------------------------------------------------------------

    def run(self) -> int:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        admin = AdminClient(self.args)
        admin.http.timeout = POLL_TIMEOUT
        self.existing = admin.url
        self.urls = [admin.url]
        try:
            # The first status must succeed: a wrong URL or password is a mistake to report, not retry.
            status = self._interruptible(lambda: admin.call("GET", "/_admin/cluster/status"))
            if status is None:
                return 130
            self.ca_file = ca_file(self.args, admin, status)
            self._apply(status, first=True)
            failures = 0
            while not self.stopping:
                self._interruptible(lambda: self._wait(POLL_SECONDS))
                if self.stopping:
                    break
                self._check_haproxy()
                status = self._interruptible(lambda: self._poll(admin))
                if self.stopping:
                    break
                if status is None:
                    failures += 1
                    if failures == 1:
                        _say(f"cannot reach the cluster ({', '.join(self.urls)}); keeping the current "
                             "configuration and retrying")
                    self._interruptible(lambda: self._wait(min(2.0 ** failures, MAX_BACKOFF_SECONDS)))
                    continue
                if failures:
                    _say(f"the cluster answers again (via {admin.url})")
                    failures = 0
                try:
                    self._apply(status, first=False)
                except CliError as e:  # e.g. the disk is full: say so, keep HAProxy as it is, try again
                    _say(f"{e}; trying again in a second")
                    self.text = None
        finally:
            admin.close()
            self._stop_haproxy()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return 0

    def _interruptible(self, call) -> Any:
        """Run `call`; None if a signal cut it short."""
        if self.stopping:
            return None
        self.waiting = True
        try:
            return call()
        except _Stop:
            return None
        finally:
            self.waiting = False

    def _poll(self, admin: AdminClient) -> dict | None:
        """The cluster status from the first replica that answers: the one that did last time
        first, then every other known one, so losing the --existing replica loses nothing."""
        for url in list(self.urls):
            admin.url = url
            admin.http.base_url = httpx.URL(url)
            try:
                status = admin.call("GET", "/_admin/cluster/status")
            except CliError:
                continue
            # The one that answered goes first next time, then every other replica; --existing
            # stays last even once removed, so the list never grows past the cluster's size + 1.
            known = [b.url for b in haproxy.backends(status)]
            self.urls = list(dict.fromkeys([url, *known, self.existing]))
            return status
        return None

    def _apply(self, status: dict, first: bool) -> None:
        text = render(self.args, status, self.stats_socket, self.ca_file)
        if text == self.text:
            if self.reload_pending:
                self._reload()
            return
        names = [b.replica_id for b in haproxy.backends(status)]
        # Every replica can answer the next poll, should the one we ask die.
        self.urls += [b.url for b in haproxy.backends(status) if b.url not in self.urls]
        problem = self._validate(text)
        if problem:
            if first:
                raise CliError(f"HAProxy rejects the configuration: {problem}")
            _say(f"HAProxy rejects the new configuration ({problem}); keeping the current one")
            self.text = text  # do not try the same text again every second
            return
        write_atomically(self.output, text)
        self.text = text
        added = sorted(set(names) - set(self.names))
        gone = sorted(set(self.names) - set(names))
        self.names = names
        if first:
            _say(f"wrote {self.output}: {len(names)} replica{'s' * (len(names) != 1)} "
                 f"({', '.join(names)}) behind {self.args.bind}")
            self._start_or_reload()
        else:
            change = ", ".join([f"+{n}" for n in added] + [f"-{n}" for n in gone])
            what = f"replicas changed ({change})" if change else "the PROXY protocol setting changed"
            _say(f"{what}; rewrote {self.output}")
            self._reload()

    def _validate(self, text: str) -> str | None:
        """HAProxy's own verdict on `text` (None: valid), so a bad file never reaches a reload."""
        if self.binary is None:
            return None
        try:
            with tempfile.NamedTemporaryFile("w", suffix=".cfg", dir=self.output.parent) as f:
                f.write(text)
                f.flush()
                out = subprocess.run([self.binary, "-c", "-q", "-f", f.name], capture_output=True, text=True,
                                     timeout=CHECK_SECONDS, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"`haproxy -c` did not run: {e}"
        if out.returncode == 0:
            return None
        alerts = [line for line in (out.stdout + out.stderr).splitlines() if "ALERT" in line]
        return (alerts[0] if alerts else f"`haproxy -c` exited {out.returncode}").strip()

    # -- HAProxy ---------------------------------------------------------------

    def _start_or_reload(self) -> None:
        if self.args.reload_command or (self.proc is not None and self.proc.poll() is None):
            self._reload()
        else:
            self._start()

    def _start(self) -> None:
        assert self.binary is not None
        self.pidfile.unlink(missing_ok=True)
        # -W: master-worker. The master stays our child, re-reads the file on
        # SIGUSR2 and starts a new worker while the old one finishes its
        # transfers: a reload drops no connection.
        cmd = [self.binary, "-W", "-f", str(self.output), "-p", str(self.pidfile)]
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        except OSError as e:
            raise CliError(f"cannot start HAProxy ({self.binary}): {e.strerror or e}") from None
        # The master writes the pid file once its listeners are bound.
        if self._wait_pidfile(START_SECONDS):
            _say(f"HAProxy started (master pid {self.proc.pid}), listening on {self.args.bind}")
            return
        if self.proc.poll() is not None:
            code, self.proc = self.proc.returncode, None
            raise CliError(f"HAProxy exited with status {code} at start; its messages are above "
                           f"(is {self.args.bind} already in use?)")
        raise CliError(f"HAProxy did not start within {START_SECONDS:.0f} seconds")

    def _wait_pidfile(self, seconds: float) -> bool:
        """True once the master has written its pid file; False if it died or took too long."""
        assert self.proc is not None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if self.pidfile.read_text().strip() == str(self.proc.pid):
                    return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def _reload(self) -> None:
        if self.args.reload_command:
            try:
                out = subprocess.run(self.args.reload_command, shell=True, timeout=RELOAD_COMMAND_SECONDS,
                                     stdin=subprocess.DEVNULL)
                ok, why = out.returncode == 0, f"exited {out.returncode}"
            except subprocess.TimeoutExpired:
                ok, why = False, f"ran past {RELOAD_COMMAND_SECONDS:.0f} seconds"
            if not ok:
                if not self.reload_pending:  # said once, not every second
                    _say(f"the reload command {why}; trying it again every second until it succeeds")
                self.reload_pending = True
            elif self.reload_pending:
                self.reload_pending = False
                _say("the reload command succeeded")
            return
        if self.proc is None or self.proc.poll() is not None:
            self._start()
            return
        # The re-executed master writes the pid file again once it has read the new file.
        # Waiting for that makes a reload whole before anything else is signalled: a
        # SIGUSR1 (stop) sent mid-reload is lost by HAProxy 2.6.
        self.pidfile.unlink(missing_ok=True)
        self.proc.send_signal(signal.SIGUSR2)
        if self._wait_pidfile(START_SECONDS):
            _say("HAProxy reloaded")
        else:
            _say(f"HAProxy did not confirm the reload within {START_SECONDS:.0f} seconds")

    def _check_haproxy(self) -> None:
        """Our HAProxy died (killed, crashed): start it again with the current file."""
        if self.args.reload_command or (self.proc is not None and self.proc.poll() is None):
            return
        if self.proc is not None:
            _say(f"HAProxy exited with status {self.proc.returncode}; starting it again")
            self.proc = None
        try:
            self._start()
        except CliError as e:
            if not self.start_failing:  # said once, not every second
                _say(f"{e}; trying again every second")
            self.start_failing = True
        else:
            self.start_failing = False

    def _stop_haproxy(self) -> None:
        """Soft stop (in-flight requests finish, within a bound), then a hard one."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGUSR1, DRAIN_SECONDS), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            try:  # the master passes USR1 and TERM on to its workers; KILL must reach them all itself
                if sig == signal.SIGKILL:
                    os.killpg(proc.pid, sig)
                else:
                    proc.send_signal(sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        try:
            if self.pidfile.read_text().strip() == str(proc.pid):
                self.pidfile.unlink()
        except OSError:
            pass
        if self.stats_socket:  # HAProxy leaves it behind
            Path(self.stats_socket).unlink(missing_ok=True)
        _say("HAProxy stopped")
