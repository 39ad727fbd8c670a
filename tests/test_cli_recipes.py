"""The `coord` command's recipe subcommands (lock, elect, observe, barrier, config) and
the runtime's exit statuses, run as real processes against a real etcd.

Each test starts ``python -m coord.cli`` (this tree's, through PYTHONPATH) with its
stdout and stderr in files, and checks what is left in etcd (keys, leases) and which
processes still run.  The COMMANDs are small shell scripts that write files in the
test's directory (their environment, a pid, start and end markers) and wait for a
``go`` file, so the test decides when they end.

Run on both etcd versions:
``COORD_ETCD=/usr/bin/etcd COORD_ETCDCTL=/usr/bin/etcdctl pytest tests/test_cli_recipes.py``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from operator import attrgetter
from pathlib import Path
from typing import Any

import pytest
from helpers import dead_url

from coord.cli import build_parser, main
from coord.cli._options import GLOBAL_OPTIONS
from coord.server import find_etcdctl

ROOT = Path(__file__).resolve().parent.parent

# The variables the command reads its options from: a test passes its own, so that the
# caller's environment (say, an ETCDCTL_ENDPOINTS) cannot change what is tested.
OPTION_VARIABLES = {
    f"{prefix}_{flag.lstrip('-').replace('-', '_').upper()}"
    for prefix in ("COORD", "ETCDCTL")
    for flag in [*(flag for flag, _ in GLOBAL_OPTIONS), "--write-out"]
}

SIGNAL_NAME = attrgetter("name")

# A COMMAND that records its pid and waits for the file `go` (then exits with $1).
WAIT_FOR_GO = 'echo $$ > "$0.pid"; while [ ! -e go ]; do sleep 0.02; done; exit "${1:-0}"'


def environment(**extra: str) -> dict[str, str]:
    """This process's environment without the option variables, with PYTHONPATH on
    this tree, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in OPTION_VARIABLES}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def wait_for(condition: Callable[[], Any], timeout: float = 10.0,
             what: str = "the condition") -> Any:
    """Poll ``condition`` until it returns something true (returned); AssertionError
    naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not so within {timeout} s")
        time.sleep(0.02)


def stays_false(condition: Callable[[], Any], seconds: float = 0.3) -> bool:
    """True if ``condition`` stays false for ``seconds`` (for "this has not happened":
    there is nothing to poll for but the time that lets it happen)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return False
        time.sleep(0.02)
    return not condition()


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def processes_in(directory: Path) -> list[int]:
    """The pids of the processes whose working directory is ``directory``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/cwd") == str(directory):
                    found.append(int(entry))
            except OSError:  # gone meanwhile, or not ours to look at
                pass
    return found


def stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP took effect)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] == "T"


# -- etcd's state, read through its JSON gateway ------------------------------------------------


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


def kvs(server: Any, prefix: str) -> list[dict[str, Any]]:
    """The key-values under ``prefix`` ("": all): key and value (str), create_revision
    and lease (ints), in key order."""
    raw = prefix.encode()
    # ("" is every key: from "\0" to the end, rpc.proto's RangeRequest.)
    span = (raw, prefix_end(raw)) if raw else (b"\0", b"\0")
    answer = server.post("/v3/kv/range", {"key": b64(span[0]), "range_end": b64(span[1])})
    return [{"key": base64.b64decode(kv["key"]).decode(),
             "value": base64.b64decode(kv.get("value", "")).decode(),
             "create_revision": int(kv["create_revision"]),
             "lease": int(kv.get("lease", 0))}
            for kv in answer.get("kvs", [])]


def keys(server: Any, prefix: str) -> list[str]:
    return [kv["key"] for kv in kvs(server, prefix)]


def leases(server: Any) -> list[int]:
    return sorted(int(lease["ID"]) for lease in
                  server.post("/v3/lease/leases", {}).get("leases", []))


def revision(server: Any) -> int:
    return int(server.post("/v3/kv/range", {"key": b64("\0")})["header"]["revision"])


def put(server: Any, key: str, value: str) -> int:
    """Put ``key``; the revision it was written at."""
    answer = server.post("/v3/kv/put", {"key": b64(key), "value": b64(value)})
    return int(answer["header"]["revision"])


def delete(server: Any, key: str) -> int:
    answer = server.post("/v3/kv/deleterange", {"key": b64(key)})
    return int(answer["header"]["revision"])


def settled(server: Any, prefix: str, timeout: float = 5.0) -> None:
    """Wait until nothing is under ``prefix`` and no lease is left."""
    wait_for(lambda: not kvs(server, prefix) and not leases(server), timeout,
             f"no key under {prefix!r} and no lease (keys {keys(server, prefix)}, "
             f"leases {leases(server)})")


# -- the processes ------------------------------------------------------------------------------


class Proc:
    """A process with stdin from /dev/null and its stdout and stderr in files."""

    def __init__(self, argv: list[str], directory: Path, tag: str,
                 env: dict[str, str]) -> None:
        self.tag = tag
        self.out_path = directory / f"{tag}.out"
        self.err_path = directory / f"{tag}.err"
        self.started = time.monotonic()
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=err, cwd=directory, env=env)

    def __repr__(self) -> str:
        return f"<Proc {self.tag} pid={self.pid} rc={self.popen.poll()}>"

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def out(self) -> str:
        return self.out_path.read_text()

    @property
    def err(self) -> str:
        return self.err_path.read_text()

    def lines(self) -> list[str]:
        return self.out.splitlines()

    def wait_lines(self, n: int, timeout: float = 10.0) -> list[str]:
        """Wait until stdout has at least ``n`` complete lines; they."""
        def enough() -> list[str] | None:
            text = self.out
            done = text[:text.rfind("\n") + 1].splitlines()
            return done if len(done) >= n else None

        return wait_for(enough, timeout, f"{self.tag} printed {n} lines "
                        f"(stdout {self.out!r}, stderr {self.err!r})")

    def send(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float = 10.0) -> int:
        """Its exit status (a signal N as -N, as subprocess says it)."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.tag} still runs after {timeout} s "
                                 f"(stdout {self.out!r}, stderr {self.err!r})") from None

    @property
    def running(self) -> bool:
        return self.popen.poll() is None


class Procs:
    """Starts `coord` and etcdctl processes in the test's directory; ``end()`` kills
    whatever still runs, the COMMANDs whose pids were read included."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._started: list[Proc] = []
        self._pids: list[int] = []

    def coord(self, url: str | None, *args: str, tag: str = "coord",
              env: dict[str, str] | None = None) -> Proc:
        endpoint = ["--endpoints", url] if url is not None else []
        argv = [sys.executable, "-m", "coord.cli", *endpoint, *args]
        return self._start(argv, tag, env if env is not None else environment())

    def etcdctl(self, url: str, *args: str, tag: str = "etcdctl") -> Proc:
        argv = [find_etcdctl(), "--endpoints", url, *args]
        return self._start(argv, tag, environment(ETCDCTL_API="3"))

    def _start(self, argv: list[str], tag: str, env: dict[str, str]) -> Proc:
        taken = {p.tag for p in self._started}
        unique, n = tag, 1
        while unique in taken:
            n += 1
            unique = f"{tag}{n}"
        proc = Proc(argv, self.dir, unique, env)
        self._started.append(proc)
        return proc

    def pid(self, name: str, timeout: float = 10.0) -> int:
        """The pid a COMMAND wrote to ``name.pid`` (waited for); killed at the end."""
        path = self.dir / f"{name}.pid"

        def written() -> int | None:
            text = path.read_text() if path.exists() else ""
            return int(text) if text.endswith("\n") else None

        pid: int = wait_for(written, timeout, f"{path.name} written")
        self._pids.append(pid)
        return pid

    def go(self) -> None:
        (self.dir / "go").touch()

    def file(self, name: str) -> Path:
        return self.dir / name

    def end(self) -> None:
        for proc in self._started:
            if proc.running:
                proc.popen.kill()
            proc.popen.wait()
        # Every process started here runs in this directory, the COMMANDs and theirs
        # included: whatever still runs in it is ours (an etcdctl killed above leaves its
        # COMMAND running, for one).
        for pid in {*self._pids, *processes_in(self.dir)}:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    made = Procs(tmp_path)
    try:
        yield made
    finally:
        made.end()


def run(url: str | None, *args: str, env: dict[str, str] | None = None,
        timeout: float = 20.0, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `coord` to the end: its exit status, stdout and stderr (text)."""
    endpoint = ["--endpoints", url] if url is not None else []
    try:
        return subprocess.run([sys.executable, "-m", "coord.cli", *endpoint, *args],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              env=env if env is not None else environment(),
                              timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"coord {' '.join(args)} still ran after {timeout} s "
                             f"(stderr {exc.stderr!r})") from None


def read_env(path: Path) -> dict[str, str]:
    """The ``env`` output a COMMAND wrote to ``path``: its COORD_ and ETCD_ variables."""
    wait_for(lambda: path.exists() and path.read_text().endswith("\n"), 10,
             f"{path.name} written")
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k: v for k, v in pairs if k.startswith(("COORD_", "ETCD_"))}


# -- lock -----------------------------------------------------------------------------------------


def test_lock_runs_the_command_with_the_lock_in_its_environment(etcd, procs):
    """While the COMMAND runs its lock key exists; its environment names the key, its
    create revision (the fencing token), the lease, and etcdctl's two variables; its
    exit status is coord's; nothing is left afterwards.  (It waited for another holder
    first, so that the token, the key's create revision, differs from ETCD_LOCK_REV, the
    revision at which the lock was taken: after the other's key was deleted.)"""
    first = procs.coord(etcd.url, "lock", "jobs/db", tag="first")
    first.wait_lines(1)
    lock = procs.coord(etcd.url, "lock", "jobs/db", "--",
                       "sh", "-c", "env > env.txt; " + WAIT_FOR_GO, "cmd", "7")
    wait_for(lambda: len(keys(etcd, "jobs/db/")) == 2, 10, "the second queued")
    first.send(signal.SIGTERM)
    assert first.wait() == 0
    env = read_env(procs.file("env.txt"))
    procs.pid("cmd")
    [held] = kvs(etcd, "jobs/db/")
    assert env["COORD_LOCK_KEY"] == env["ETCD_LOCK_KEY"] == held["key"]
    assert int(env["COORD_FENCING_TOKEN"]) == held["create_revision"]
    assert int(env["COORD_LEASE_ID"], 16) == held["lease"]
    assert held["key"] == f"jobs/db/{held['lease']:x}"  # Go's layout, as etcdctl's
    assert held["create_revision"] < int(env["ETCD_LOCK_REV"]) <= revision(etcd)
    wait_for(lambda: leases(etcd) == [held["lease"]], 5, "the first's lease revoked")
    procs.go()
    assert lock.wait() == 7
    settled(etcd, "jobs/db/")


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGUSR1], ids=SIGNAL_NAME)
def test_lock_a_command_killed_by_a_signal_gives_128_plus_its_number(etcd, signum):
    result = run(etcd.url, "lock", "L", "--", "sh", "-c", f"kill -{int(signum)} $$")
    assert result.returncode == 128 + signum, result.stderr
    settled(etcd, "L/")


def test_lock_options_may_follow_the_name(etcd, procs):
    """`lock NAME --ttl 5 -- cmd`: the --ttl after NAME is the session's TTL."""
    lock = procs.coord(etcd.url, "lock", "L", "--ttl", "5", "--", "sh", "-c", WAIT_FOR_GO,
                       "cmd")
    procs.pid("cmd")
    [lease] = leases(etcd)
    ttl = etcd.post("/v3/lease/timetolive", {"ID": str(lease)})
    assert int(ttl["grantedTTL"]) == 5
    procs.go()
    assert lock.wait() == 0
    settled(etcd, "L/")


def test_lock_with_nothing_after_the_separator_is_a_usage_error(etcd):
    result = run(etcd.url, "lock", "L", "--", timeout=10)
    assert result.returncode == 2
    assert "COMMAND" in result.stderr
    assert result.stdout == ""
    settled(etcd, "L/", timeout=0.5)  # nothing was taken


@pytest.mark.parametrize(("args", "named"), [
    (("--", "no-such-command-here"), "no-such-command-here"),
    (("--kill-after", "soon", "--", "true"), "--kill-after"),
], ids=["unknown command", "bad --kill-after"])
def test_lock_a_bad_command_is_a_usage_error_before_the_lock_is_taken(etcd, procs, args,
                                                                      named):
    holder = procs.coord(etcd.url, "lock", "L")
    [key] = holder.wait_lines(1)
    # Checked only once the lock is held, this would wait for the holder.
    result = run(etcd.url, "lock", "L", *args, timeout=10)
    assert result.returncode == 2
    assert named in result.stderr
    assert keys(etcd, "L/") == [key]


def test_lock_timeout_while_held_elsewhere_exits_4_and_leaves_no_waiter(etcd, procs):
    holder = procs.coord(etcd.url, "lock", "L")
    [key] = holder.wait_lines(1)
    [holder_lease] = leases(etcd)
    started = time.monotonic()
    result = run(etcd.url, "lock", "L", "--timeout", "1s", "--", "touch", "ran",
                 cwd=procs.dir)
    assert result.returncode == 4, result.stderr
    assert 0.9 < time.monotonic() - started < 6
    assert "timed out" in result.stderr and "'L'" in result.stderr
    assert not procs.file("ran").exists()
    assert keys(etcd, "L/") == [key]  # the waiter's key is gone, the holder's stays
    wait_for(lambda: leases(etcd) == [holder_lease], 5, "the waiter's lease revoked")
    holder.send(signal.SIGTERM)
    assert holder.wait() == 0
    settled(etcd, "L/")


def test_lock_a_stop_signal_while_waiting_leaves_no_waiter(etcd, procs):
    holder = procs.coord(etcd.url, "lock", "L")
    [key] = holder.wait_lines(1)
    waiter = procs.coord(etcd.url, "lock", "L", "--", "touch", "ran", tag="waiter")
    wait_for(lambda: len(keys(etcd, "L/")) == 2, 10, "the waiter queued")
    waiter.send(signal.SIGTERM)
    assert waiter.wait() == 128 + signal.SIGTERM
    assert not procs.file("ran").exists()
    assert keys(etcd, "L/") == [key]
    holder.send(signal.SIGTERM)
    assert holder.wait() == 0
    settled(etcd, "L/")


def test_lock_processes_exclude_each_other(etcd, procs):
    """Five `coord lock` processes each read a counter from a file, pause, and write
    it back plus one: with exclusion no increment is lost and no run overlaps another.
    The first to run waits until all five are queued (`go`), so that without exclusion
    the others would run meanwhile."""
    procs.file("counter").write_text("0\n")
    script = ('echo "start $$" >> log; n=$(cat counter); '
              'if [ "$n" = 0 ]; then while [ ! -e go ]; do sleep 0.02; done; fi; '
              'sleep 0.05; echo $((n + 1)) > counter; echo "end $$" >> log')
    lockers = [procs.coord(etcd.url, "lock", "counter", "--", "sh", "-c", script)
               for _ in range(5)]
    wait_for(lambda: len(keys(etcd, "counter/")) == 5, 15, "all five queued")
    procs.go()
    assert [p.wait(30) for p in lockers] == [0] * 5
    assert procs.file("counter").read_text() == "5\n"
    log = [line.split() for line in procs.file("log").read_text().splitlines()]
    assert [what for what, _ in log] == ["start", "end"] * 5
    assert all(log[i][1] == log[i + 1][1] for i in range(0, 10, 2))  # one run's pair
    settled(etcd, "counter/")


@pytest.mark.parametrize("first", ["coord", "etcdctl"])
def test_lock_coord_and_etcdctl_exclude_each_other(etcd, procs, first):
    """A `coord lock` and an `etcdctl lock` on one name: the second's command starts
    only after the first's ended, whichever came first."""
    def locker(who: str, script: str) -> Proc:
        if who == "coord":
            return procs.coord(etcd.url, "lock", "shared", "--", "sh", "-c", script, tag=who)
        return procs.etcdctl(etcd.url, "lock", "shared", "--", "sh", "-c", script, tag=who)

    second = "etcdctl" if first == "coord" else "coord"
    log = procs.file("log")
    a = locker(first, f'echo "{first} start" >> log; '
                      f'while [ ! -e go ]; do sleep 0.02; done; echo "{first} end" >> log')
    wait_for(lambda: log.exists() and log.read_text(), 10, f"{first} holds")
    b = locker(second, f'echo "{second} start" >> log; echo "{second} end" >> log')
    wait_for(lambda: len(keys(etcd, "shared/")) == 2, 10, f"{second} queued")
    assert stays_false(lambda: f"{second} start" in log.read_text())
    procs.go()
    assert a.wait() == 0, a.err
    assert b.wait() == 0, b.err
    assert log.read_text().splitlines() == [
        f"{first} start", f"{first} end", f"{second} start", f"{second} end"]
    # etcdctl deletes its key but leaves its session's lease to expire; coord's is revoked.
    assert keys(etcd, "shared/") == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=SIGNAL_NAME)
def test_lock_without_a_command_holds_until_a_stop_signal(etcd, procs, signum):
    lock = procs.coord(etcd.url, "lock", "L")
    [key] = lock.wait_lines(1)
    [held] = kvs(etcd, "L/")
    assert held["key"] == key and held["lease"] == int(key.rsplit("/", 1)[1], 16)
    assert stays_false(lambda: not lock.running, 0.2)
    lock.send(signum)
    assert lock.wait() == 0, lock.err
    settled(etcd, "L/")


def test_lock_without_a_command_lost_exits_6(etcd, procs):
    lock = procs.coord(etcd.url, "lock", "L")
    [key] = lock.wait_lines(1)
    delete(etcd, key)
    assert lock.wait() == 6, lock.err
    assert "lost the lock 'L'" in lock.err
    settled(etcd, "L/")


def test_lock_json_output_names_key_token_and_lease(etcd, procs):
    lock = procs.coord(etcd.url, "-w", "json", "lock", "L")
    [line] = lock.wait_lines(1)
    shown = json.loads(line)
    [held] = kvs(etcd, "L/")
    assert base64.b64decode(shown["key"]).decode() == held["key"]
    assert shown["token"] == held["create_revision"]
    assert int(shown["lease"], 16) == held["lease"]
    lock.send(signal.SIGTERM)
    assert lock.wait() == 0
    settled(etcd, "L/")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=SIGNAL_NAME)
def test_lock_a_stop_signal_stops_the_command_and_releases(etcd, procs, signum):
    lock = procs.coord(etcd.url, "lock", "L", "--", "sh", "-c",
                       'echo $$ > cmd.pid; exec sleep 30')
    pid = procs.pid("cmd")
    assert keys(etcd, "L/")
    lock.send(signum)
    assert lock.wait() == 128 + signum, lock.err
    assert not alive(pid)
    settled(etcd, "L/")


@pytest.mark.parametrize("how", ["delete the key", "revoke the lease"])
def test_lock_lost_while_the_command_runs_stops_it_and_exits_6(etcd, procs, how):
    lock = procs.coord(etcd.url, "lock", "L", "--", "sh", "-c",
                       'echo $$ > cmd.pid; exec sleep 30')
    pid = procs.pid("cmd")
    [held] = kvs(etcd, "L/")
    if how == "delete the key":
        delete(etcd, held["key"])
    else:
        etcd.post("/v3/lease/revoke", {"ID": str(held["lease"])})
    assert lock.wait() == 6, lock.err
    assert "lost the lock 'L'" in lock.err
    assert "stopping the command" in lock.err
    assert not alive(pid)
    settled(etcd, "L/")


def test_lock_lost_a_command_ignoring_sigterm_is_killed_after_kill_after(etcd, procs):
    lock = procs.coord(etcd.url, "lock", "L", "--kill-after", "1s", "--", "sh", "-c",
                       'trap "" TERM; echo $$ > cmd.pid; exec sleep 30')
    pid = procs.pid("cmd")
    [held] = kvs(etcd, "L/")
    delete(etcd, held["key"])
    lost = time.monotonic()
    wait_for(lambda: "lost the lock" in lock.err, 5, "the loss reported")
    assert stays_false(lambda: not alive(pid), 0.4)  # it ignored the SIGTERM
    assert lock.wait() == 6, lock.err
    assert 0.9 < time.monotonic() - lost < 6
    assert not alive(pid)
    settled(etcd, "L/")


def test_lock_paused_holder_past_its_ttl_loses_the_lock(etcd_factory, procs):
    """A holder SIGSTOPped longer than its --ttl: its lease expires, another process
    takes the lock meanwhile; once resumed, the first reports the loss, stops its
    command and exits 6."""
    server = etcd_factory()
    first = procs.coord(server.url, "lock", "L", "--ttl", "2", "--", "sh", "-c",
                        'echo $$ > cmd.pid; exec sleep 30')
    pid = procs.pid("cmd")
    first.send(signal.SIGSTOP)
    wait_for(lambda: stopped(first.pid), 5, "the holder stopped")
    second = run(server.url, "lock", "L", "--timeout", "15s", "--", "sh", "-c",
                 'echo "$COORD_FENCING_TOKEN" > second.token', cwd=procs.dir)
    assert second.returncode == 0, second.stderr
    assert procs.file("second.token").read_text().strip().isdigit()
    assert alive(pid)  # the first's command still ran, not knowing
    first.send(signal.SIGCONT)
    assert first.wait() == 6, first.err
    assert "lost the lock 'L'" in first.err
    assert not alive(pid)
    settled(server, "L/")


def test_lock_cut_off_from_etcd_past_its_ttl_stops_the_command(etcd_factory, procs):
    server = etcd_factory()
    lock = procs.coord(server.url, "lock", "L", "--ttl", "2", "--", "sh", "-c",
                       'echo $$ > cmd.pid; exec sleep 30')
    pid = procs.pid("cmd")
    server.kill()
    assert lock.wait() == 6, lock.err
    assert "lost the lock 'L'" in lock.err and "SessionLost" in lock.err
    assert not alive(pid)


# -- elect and observe ----------------------------------------------------------------------------


def test_elect_runs_the_command_as_leader(etcd, procs):
    elect = procs.coord(etcd.url, "elect", "E", "me", "--", "sh", "-c",
                        "env > env.txt; " + WAIT_FOR_GO, "cmd", "5")
    env = read_env(procs.file("env.txt"))
    procs.pid("cmd")
    [leader] = kvs(etcd, "E/")
    assert env["COORD_ELECTION_KEY"] == leader["key"] == f"E/{leader['lease']:x}"
    assert leader["value"] == "me"
    assert int(env["COORD_FENCING_TOKEN"]) == leader["create_revision"]
    assert int(env["COORD_LEASE_ID"], 16) == leader["lease"]
    procs.go()
    assert elect.wait() == 5
    settled(etcd, "E/")


def test_elect_without_a_command_prints_key_and_value_and_resigns_on_sigterm(etcd, procs):
    elect = procs.coord(etcd.url, "elect", "E", "leader-1")
    key, value = elect.wait_lines(2)
    [leader] = kvs(etcd, "E/")
    assert (key, value) == (leader["key"], leader["value"]) == (key, "leader-1")
    elect.send(signal.SIGTERM)
    assert elect.wait() == 0, elect.err
    settled(etcd, "E/")


def test_elect_timeout_exits_4_and_leaves_no_candidate(etcd, procs):
    leader = procs.coord(etcd.url, "elect", "E", "first")
    key, _ = leader.wait_lines(2)
    result = run(etcd.url, "elect", "E", "second", "--timeout", "1s", "--", "touch", "ran",
                 cwd=procs.dir)
    assert result.returncode == 4, result.stderr
    assert "timed out" in result.stderr
    assert not procs.file("ran").exists()
    assert keys(etcd, "E/") == [key]
    leader.send(signal.SIGTERM)
    assert leader.wait() == 0
    settled(etcd, "E/")


def test_elect_leadership_lost_stops_the_command_and_exits_6(etcd, procs):
    elect = procs.coord(etcd.url, "elect", "E", "me", "--", "sh", "-c",
                        'echo $$ > cmd.pid; exec sleep 30')
    pid = procs.pid("cmd")
    [leader] = kvs(etcd, "E/")
    delete(etcd, leader["key"])
    assert elect.wait() == 6, elect.err
    assert "lost the leadership of 'E'" in elect.err
    assert not alive(pid)
    settled(etcd, "E/")


def test_elect_coord_and_etcdctl_campaign_in_one_election(etcd, procs):
    """coord A leads; etcdctl B and coord C queue.  Only one leads at a time (B prints
    nothing while A leads; C's command does not start while B leads), and `coord
    observe`, `coord elect --listen` and `etcdctl elect -l` report the same leaders."""
    a = procs.coord(etcd.url, "elect", "E", "a", tag="a")
    key_a, _ = a.wait_lines(2)
    # The observers start with A leading: each reports it first, so none can miss it.
    observers = [procs.coord(etcd.url, "observe", "E", tag="observe"),
                 procs.coord(etcd.url, "elect", "--listen", "E", tag="listen"),
                 procs.etcdctl(etcd.url, "elect", "-l", "E", tag="ctl-listen")]
    for observer in observers:
        assert observer.wait_lines(2) == [key_a, "a"]
    b = procs.etcdctl(etcd.url, "elect", "E", "b", tag="b")
    wait_for(lambda: len(keys(etcd, "E/")) == 2, 10, "etcdctl campaigns")
    c = procs.coord(etcd.url, "elect", "E", "c", "--", "sh", "-c",
                    'echo "$COORD_ELECTION_KEY" > c.leads; ' + WAIT_FOR_GO, "cmd", tag="c")
    wait_for(lambda: len(keys(etcd, "E/")) == 3, 10, "coord C campaigns")
    key_b, key_c = keys_by_value(etcd, "b"), keys_by_value(etcd, "c")
    assert stays_false(lambda: b.out)  # A leads: etcdctl waits
    a.send(signal.SIGTERM)
    assert a.wait() == 0
    assert b.wait_lines(2) == [key_b, "b"]
    assert stays_false(lambda: procs.file("c.leads").exists())  # B leads: C waits
    b.send(signal.SIGINT)  # etcdctl resigns on SIGINT (SIGTERM would just end it)
    assert b.wait() == 0, b.err
    assert wait_for(lambda: procs.file("c.leads").exists() and
                    procs.file("c.leads").read_text()) == key_c + "\n"
    procs.go()
    assert c.wait() == 0
    expected = [key_a, "a", key_b, "b", key_c, "c"]
    for observer in observers:
        assert observer.wait_lines(6) == expected, observer.tag
    for observer in observers:
        observer.send(signal.SIGINT)
    assert [o.wait() for o in observers] == [0, 0, 0]
    assert keys(etcd, "E/") == []
    coords = {int(k.rsplit("/", 1)[1], 16) for k in (key_a, key_c)}
    assert not coords & set(leases(etcd))  # etcdctl's sessions expire; coord's are revoked


def keys_by_value(server: Any, value: str) -> str:
    [key] = [kv["key"] for kv in kvs(server, "E/") if kv["value"] == value]
    return key


def test_observe_json_lines_parse_and_follow_the_leader(etcd, procs):
    observer = procs.coord(etcd.url, "-w", "json", "observe", "E")
    assert [json.loads(line) for line in observer.wait_lines(1)] == [{"leader": None}]
    candidate = procs.coord(etcd.url, "elect", "E", "v1")
    candidate.wait_lines(2)
    [leader] = kvs(etcd, "E/")
    shown = json.loads(observer.wait_lines(2)[1])["leader"]
    assert base64.b64decode(shown["key"]).decode() == leader["key"]
    assert base64.b64decode(shown["value"]) == b"v1"
    assert shown["token"] == leader["create_revision"]
    assert int(shown["lease"], 16) == leader["lease"]
    assert shown["revision"] >= leader["create_revision"]
    candidate.send(signal.SIGTERM)
    assert candidate.wait() == 0
    assert json.loads(observer.wait_lines(3)[2]) == {"leader": None}
    observer.send(signal.SIGTERM)
    assert observer.wait() == 0
    settled(etcd, "E/")


# -- barriers -------------------------------------------------------------------------------------


def test_barrier_hold_without_ttl_stays_until_released(etcd, procs):
    hold = run(etcd.url, "barrier", "hold", "B")
    assert (hold.returncode, hold.stdout) == (0, "holding\n"), hold.stderr
    [held] = kvs(etcd, "B")
    assert held["key"] == "B" and held["lease"] == 0  # no lease: it outlives the command
    again = run(etcd.url, "barrier", "hold", "B")
    assert (again.returncode, again.stdout) == (0, "already held\n")
    timed = run(etcd.url, "barrier", "wait", "B", "--timeout", "0.5s")
    assert timed.returncode == 4 and "timed out" in timed.stderr
    waiter = procs.coord(etcd.url, "barrier", "wait", "B")
    assert stays_false(lambda: not waiter.running, 0.5)
    released = run(etcd.url, "barrier", "release", "B")
    assert (released.returncode, released.stdout) == (0, "released\n")
    assert waiter.wait() == 0, waiter.err
    assert waiter.out == "released\n"
    assert keys(etcd, "B") == []
    not_held = run(etcd.url, "barrier", "release", "B")
    assert (not_held.returncode, not_held.stdout) == (0, "was not held\n")


def test_barrier_wait_returns_at_once_when_not_held(etcd):
    result = run(etcd.url, "-w", "json", "barrier", "wait", "B", "--timeout", "5s")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["released"] is True


def test_barrier_hold_with_ttl_holds_until_stopped(etcd, procs):
    hold = procs.coord(etcd.url, "barrier", "hold", "B", "--ttl", "5")
    assert hold.wait_lines(1) == ["holding"]
    [held] = kvs(etcd, "B")
    assert held["lease"] in leases(etcd)
    waiter = procs.coord(etcd.url, "barrier", "wait", "B", tag="waiter")
    assert stays_false(lambda: not waiter.running, 0.3)
    hold.send(signal.SIGTERM)
    assert hold.wait() == 0, hold.err
    assert waiter.wait() == 0, waiter.err
    settled(etcd, "B")


def test_barrier_hold_with_ttl_reports_its_lease_lost(etcd, procs):
    hold = procs.coord(etcd.url, "barrier", "hold", "B", "--ttl", "5")
    hold.wait_lines(1)
    [held] = kvs(etcd, "B")
    etcd.post("/v3/lease/revoke", {"ID": str(held["lease"])})
    assert hold.wait() == 6, hold.err
    assert "lost the barrier's session" in hold.err
    settled(etcd, "B")


def test_barrier_enter_runs_no_command_before_all_entered(etcd, procs):
    """Three `barrier enter D 3 -- cmd`: two entered, no command runs; the third enters
    and all three run theirs."""
    script = 'echo "run $COORD_BARRIER_KEY" >> log; exit 3'
    log = procs.file("log")
    entrants = [procs.coord(etcd.url, "barrier", "enter", "D", "3", "--",
                            "sh", "-c", script) for _ in range(2)]
    wait_for(lambda: len(keys(etcd, "D/waiters/")) == 2, 10, "two entered")
    assert stays_false(log.exists)
    entrants.append(procs.coord(etcd.url, "barrier", "enter", "D", "3", "--",
                                "sh", "-c", script))
    # Each ran its command, then left (the last to leave removes `ready`), and exits
    # with its command's status.
    assert [p.wait() for p in entrants] == [3, 3, 3], [p.err for p in entrants]
    runs = sorted(line.split()[1] for line in log.read_text().splitlines())
    assert len(set(runs)) == 3 and all(k.startswith("D/waiters/") for k in runs)
    settled(etcd, "D/")


def test_barrier_enter_fewer_than_count_times_out_and_leaves_nothing(etcd, procs):
    entrants = [procs.coord(etcd.url, "barrier", "enter", "D", "3", "--timeout", "1s",
                            "--", "touch", "ran") for _ in range(2)]
    assert [p.wait() for p in entrants] == [4, 4]
    assert all("fewer than 3 entered" in p.err for p in entrants)
    assert not procs.file("ran").exists()
    settled(etcd, "D/")


# -- config ---------------------------------------------------------------------------------------


def test_config_dump_prints_the_prefix(etcd):
    put(etcd, "cfg/b", "2")
    last = put(etcd, "cfg/a", "1")
    put(etcd, "cfgx", "outside")
    simple = run(etcd.url, "config", "dump", "cfg/")
    assert (simple.returncode, simple.stdout) == (0, "cfg/a=1\ncfg/b=2\n"), simple.stderr
    as_json = run(etcd.url, "-w", "json", "config", "dump", "cfg/")
    assert as_json.returncode == 0
    document = json.loads(as_json.stdout)
    assert document["values"] == {"cfg/a": "1", "cfg/b": "2"}
    assert document["revision"] == last + 1  # the read's (cfgx's put came after)


@pytest.mark.parametrize("output", ["simple", "json"])
def test_config_watch_prints_the_prefix_then_each_change(etcd, procs, output):
    put(etcd, "cfg/a", "1")
    put(etcd, "cfg/b", "2")
    watch = procs.coord(etcd.url, "-w", output, "config", "watch", "cfg/")
    first = watch.wait_lines(1 if output == "json" else 2)
    changed = put(etcd, "cfg/a", "3")
    deleted = delete(etcd, "cfg/b")
    put(etcd, "cfgx", "outside")
    added = put(etcd, "cfg/c", "x")
    if output == "simple":
        assert first == ["cfg/a=1", "cfg/b=2"]
        assert watch.wait_lines(5)[2:] == ["PUT cfg/a=3", "DELETE cfg/b", "PUT cfg/c=x"]
    else:
        assert json.loads(first[0])["values"] == {"cfg/a": "1", "cfg/b": "2"}
        changes = [json.loads(line) for line in watch.wait_lines(4)[1:]]
        assert [(c["revision"], c["set"], c["deleted"]) for c in changes] == [
            (changed, {"cfg/a": "3"}, []), (deleted, {}, ["cfg/b"]),
            (added, {"cfg/c": "x"}, [])]
    assert stays_false(lambda: len(watch.lines()) > (4 if output == "json" else 5), 0.2)
    watch.send(signal.SIGTERM)
    assert watch.wait() == 0, watch.err


@pytest.mark.parametrize("args", [
    ("lock", "L", "--ttl", "0", "--", "touch", "ran"),
    ("lock", "L", "--timeout", "soon", "--", "touch", "ran"),
    ("elect", "E", "--", "touch", "ran"),  # no VALUE
    ("elect", "--listen", "E", "v"),
    ("barrier", "enter", "D", "0", "--", "touch", "ran"),
], ids=" ".join)
def test_recipe_usage_errors_exit_2_and_take_nothing(etcd, procs, args):
    result = run(etcd.url, *args, timeout=10, cwd=procs.dir)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"coord {args[0]}")
    assert not procs.file("ran").exists()
    assert kvs(etcd, "") == [] and leases(etcd) == []


# -- a reader that goes away --------------------------------------------------------------------


@pytest.mark.parametrize("command", ["observe", "config watch"])
def test_a_stream_ends_when_its_reader_goes_away(etcd, procs, command):
    """`coord observe NAME | head -2`: once the pipe's reader is gone, the next write
    fails and the command exits (as etcdctl, which dies of SIGPIPE), instead of running
    on, writing to nobody."""
    args = ["observe", "E"] if command == "observe" else ["config", "watch", "cfg/"]
    put(etcd, "cfg/a", "1")
    leader = procs.coord(etcd.url, "elect", "E", "first", tag="leader")
    leader.wait_lines(2)
    stream = subprocess.Popen([sys.executable, "-m", "coord.cli", "--endpoints", etcd.url,
                               *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=environment(), cwd=procs.dir)
    try:
        assert stream.stdout is not None
        assert stream.stdout.readline()  # the first report: it runs
        stream.stdout.close()
        if command == "observe":
            leader.send(signal.SIGTERM)  # a change to report: no leader, then...
            procs.coord(etcd.url, "elect", "E", "second", tag="second").wait_lines(2)
        else:
            put(etcd, "cfg/a", "2")
        assert stream.wait(10) == 0
        assert "Traceback" not in stream.stderr.read().decode()
    finally:
        if stream.poll() is None:
            stream.kill()
        stream.wait()
        stream.stderr.close()


# -- the runtime's exit statuses ------------------------------------------------------------------

# One of each kind of recipe command, with what it needs to get going.
RECIPE_COMMANDS = [
    ("lock", "L", "--", "true"),
    ("elect", "E", "v", "--", "true"),
    ("observe", "E"),
    ("barrier", "hold", "B"),
    ("barrier", "release", "B"),
    ("barrier", "wait", "B"),
    ("barrier", "enter", "D", "2", "--", "true"),
    ("config", "dump", "cfg/"),
    ("config", "watch", "cfg/"),
]


@pytest.mark.parametrize("args", RECIPE_COMMANDS, ids=" ".join)
def test_unreachable_endpoint_exits_3_quickly_naming_it(args):
    url = dead_url()
    started = time.monotonic()
    result = run(url, *args, timeout=15)
    assert result.returncode == 3, result.stderr
    assert time.monotonic() - started < 8
    assert url.split("//")[1] in result.stderr


def test_paused_etcd_with_a_command_timeout_exits_4(etcd_factory, procs):
    server = etcd_factory()
    server.pause()
    running = {args: procs.coord(server.url, "--command-timeout", "1s", *args)
               for args in RECIPE_COMMANDS}
    codes = {" ".join(args): p.wait(15) for args, p in running.items()}
    assert codes == {" ".join(args): 4 for args in RECIPE_COMMANDS}, \
        {" ".join(args): p.err for args, p in running.items()}
    assert all("timed out" in p.err for p in running.values())
    # A write's unknown outcome is said, and once (the lease grant's, the txn's...).
    assert "may or may not have been applied" in running[RECIPE_COMMANDS[0]].err
    assert all(p.err.count("may or may not") <= 1 for p in running.values())
    assert all(time.monotonic() - p.started < 12 for p in running.values())


def etcdctl(server: Any, *args: str, user: str | None = None) -> str:
    who = ["--user", user] if user else []
    result = subprocess.run([find_etcdctl(), "--endpoints", server.url, *who, *args],
                            capture_output=True, text=True, timeout=20,
                            env=environment(ETCDCTL_API="3"))
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_auth_permission_denied_and_wrong_password_exit_5(etcd_factory, tmp_path):
    server = etcd_factory()
    etcdctl(server, "user", "add", "root:rootpw")
    etcdctl(server, "user", "grant-role", "root", "root")
    etcdctl(server, "user", "add", "nobody:nobodypw")  # no role: may read or write nothing
    etcdctl(server, "auth", "enable")
    denied = run(server.url, "--user", "nobody:nobodypw", "lock", "L", "--", "touch", "ran",
                 cwd=tmp_path)
    assert denied.returncode == 5, denied.stderr
    assert not (tmp_path / "ran").exists()
    assert "PermissionDenied" in denied.stderr
    denied = run(server.url, "--user", "nobody", "--password", "nobodypw",
                 "config", "dump", "cfg/")
    assert denied.returncode == 5, denied.stderr
    assert "PermissionDenied" in denied.stderr
    wrong = run(server.url, "--user", "nobody:wrong", "config", "dump", "cfg/")
    assert wrong.returncode == 5, wrong.stderr
    assert "Unauthenticated" in wrong.stderr or "authentication" in wrong.stderr
    # The denied lock's session lease (a grant needs no permission) was revoked.
    assert "found 0 leases" in etcdctl(server, "lease", "list", user="root:rootpw")


def endpoint_env(coord_env: str | None, etcdctl_env: str | None) -> dict[str, str]:
    extra = {}
    if coord_env is not None:
        extra["COORD_ENDPOINTS"] = coord_env
    if etcdctl_env is not None:
        extra["ETCDCTL_ENDPOINTS"] = etcdctl_env
    return environment(**extra)


# (--endpoints, $COORD_ENDPOINTS, $ETCDCTL_ENDPOINTS): which one is used.
ENDPOINT_CASES = [
    ("live", "dead", "dead"),
    ("dead", "live", "live"),
    (None, "live", "dead"),
    (None, "dead", "live"),
    (None, None, "live"),
]


@pytest.mark.parametrize(("flag", "coord_env", "etcdctl_env"), ENDPOINT_CASES)
def test_endpoints_flag_beats_coord_endpoints_beats_etcdctl_endpoints(
        etcd, flag, coord_env, etcdctl_env):
    put(etcd, "cfg/a", "1")
    dead = dead_url().split("//")[1]
    live = etcd.url.split("//")[1]
    pick = {"live": live, "dead": dead, None: None}
    used = flag or coord_env or etcdctl_env
    result = run(pick[flag], "config", "dump", "cfg/",
                 env=endpoint_env(pick[coord_env], pick[etcdctl_env]), timeout=15)
    if used == "live":
        assert (result.returncode, result.stdout) == (0, "cfg/a=1\n"), result.stderr
    else:
        assert result.returncode == 3 and dead in result.stderr, result.stderr


def test_endpoints_default_to_127_0_0_1_2379():
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 2379)) == 0:
            pytest.skip("something listens on 127.0.0.1:2379")
    result = run(None, "config", "dump", "cfg/", env=endpoint_env(None, None), timeout=15)
    assert result.returncode == 3
    assert "127.0.0.1:2379" in result.stderr


# -- --help ---------------------------------------------------------------------------------------


def command_paths(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
                  ) -> Iterator[tuple[tuple[str, ...], str]]:
    """``(words, prog)`` of every subcommand and sub-subcommand of ``parser`` (aliases
    included: their prog is the command's own name).  argparse has no public way to
    list a parser's subparsers: this reads its ``_actions``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub.prog
                yield from command_paths(sub, (*path, name))


COMMAND_PATHS = dict(command_paths(build_parser()))


def test_every_recipe_command_is_listed():
    """The walk finds the recipe commands (so the test below covers something)."""
    for path in [("lock",), ("elect",), ("observe",), ("barrier", "hold"),
                 ("barrier", "release"), ("barrier", "wait"), ("barrier", "enter"),
                 ("config", "dump"), ("config", "watch")]:
        assert path in COMMAND_PATHS


@pytest.mark.parametrize("path", [(), *COMMAND_PATHS], ids=lambda p: " ".join(p) or "coord")
def test_help_exits_0_and_prints_usage(path, capsys):
    """`coord ... --help` (run in this process: the parser is the command's) exits 0
    with a usage naming the command."""
    with pytest.raises(SystemExit) as exit_:
        main([*path, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {COMMAND_PATHS.get(path, 'coord')} ")
    assert "-h, --help" in out
    # A group lists its commands; a command says what it does beyond its usage.
    children = [p[-1] for p in COMMAND_PATHS if p[:-1] == path]
    assert all(child in out for child in children)
    assert len(out.split("\n\n", 1)[1]) > 60


def test_help_through_the_command_line():
    result = run(None, "lock", "--help", timeout=15)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: coord lock")
    assert "COORD_FENCING_TOKEN" in result.stdout
