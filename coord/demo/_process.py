"""The demo's side of its worker processes: a process protocol that reads their reports.

Each worker (:mod:`coord.demo.worker`) takes commands on its stdin and writes reports on
its stdout, one JSON object a line.  :class:`WorkerProcess` keeps the reports in order
until they are asked for (:meth:`WorkerProcess.expect`), and tells the demo at once when
its worker reports an error, writes a line that is not a report, or dies without being
told to; :class:`Timeline` keeps values with the time they came (the election's leaders,
as an observer sees them).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.python.failure import Failure

__all__ = ["DemoFailed", "Timeline", "WorkerProcess", "exit_description", "process_state"]


class DemoFailed(Exception):
    """A step did not go as it should (a timeout, a worker that died or failed); the
    message says which step and why."""


def exit_description(reason: object) -> str:
    if isinstance(reason, ProcessTerminated) and reason.signal is not None:
        return f"killed by {signal.Signals(reason.signal).name}"
    if isinstance(reason, (ProcessDone, ProcessTerminated)):
        return f"exit status {reason.exitCode}"
    return str(reason)


def process_state(pid: int) -> str | None:
    """The state letter of process ``pid`` (``T``: stopped), or None without procfs."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # "pid (comm) S ...": the state letter follows the last ")".
            return stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


class WorkerProcess(protocol.ProcessProtocol):
    """One worker process: commands go to its stdin, reports come from its stdout.

    Reports are kept in order until :meth:`expect` takes them; ``listeners`` see each
    one as it arrives (with ``received``, the demo's ``time.monotonic()`` of its
    arrival, added).  ``trouble(message)`` is called when the worker reports an error,
    writes a line that is not JSON, or exits without being told to (``expected_end``).
    """

    def __init__(self, name: str, trouble: Callable[[str], None]) -> None:
        self.name = name
        self.pid: int | None = None
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.expected_end = False
        self.frozen = False  # SIGSTOPped by the demo
        self.exit: str | None = None  # how it ended, once it has
        self.ended: defer.Deferred[str] = defer.Deferred()
        self._trouble = trouble
        self._buffer = b""
        self._stderr = b""
        self._reports: list[dict[str, Any]] = []
        self._waiters: list[tuple[tuple[str, ...], defer.Deferred[dict[str, Any]]]] = []

    def __repr__(self) -> str:
        return f"<WorkerProcess {self.name} pid={self.pid} exit={self.exit}>"

    @property
    def alive(self) -> bool:
        return self.exit is None

    def send(self, op: str, **fields: Any) -> None:
        """Write the command ``op`` with ``fields`` to the worker's stdin."""
        transport: Any = self.transport
        if self.alive and transport is not None:
            transport.write(json.dumps({"op": op, **fields}).encode() + b"\n")

    def signal(self, signum: signal.Signals) -> None:
        """Send ``signum`` to the worker, unless it has ended."""
        transport: Any = self.transport
        if self.alive and transport is not None:
            try:
                transport.signalProcess(int(signum))
            except (OSError, ProcessExitedAlready):
                pass  # it has just ended: processEnded is on its way

    def expect(self, *events: str) -> defer.Deferred[dict[str, Any]]:
        """The first report, kept or to come, whose event is one of ``events``.

        Fails with DemoFailed if the worker exits first.  Cancelling stops waiting.
        """
        for i, report in enumerate(self._reports):
            if report["event"] in events:
                return defer.succeed(self._reports.pop(i))
        if not self.alive:
            return defer.fail(DemoFailed(self._ended_message(events)))

        def cancel(d: defer.Deferred[dict[str, Any]]) -> None:
            self._waiters[:] = [w for w in self._waiters if w[1] is not d]

        d: defer.Deferred[dict[str, Any]] = defer.Deferred(cancel)
        self._waiters.append((events, d))
        return d

    def has(self, event: str) -> bool:
        """Whether a report of ``event`` came that no :meth:`expect` took."""
        return any(report["event"] == event for report in self._reports)

    def stderr_tail(self, lines: int = 6) -> str:
        text = self._stderr.decode(errors="replace").strip()
        return "\n".join(text.splitlines()[-lines:])

    def _ended_message(self, events: tuple[str, ...]) -> str:
        tail = self.stderr_tail()
        return (f"worker {self.name} (pid {self.pid}) ended ({self.exit}) before reporting "
                f"{' or '.join(events)}" + (f"; its last words:\n{tail}" if tail else ""))

    # ProcessProtocol ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid

    def outReceived(self, data: bytes) -> None:
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                report = json.loads(line)
                if not isinstance(report.get("event"), str):
                    raise ValueError("no event")
            except (ValueError, AttributeError):
                self._trouble(f"worker {self.name} wrote a line that is not a report: "
                              f"{line[:200]!r}")
                continue
            report["received"] = time.monotonic()
            self._deliver(report)

    def _deliver(self, report: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            listener(report)
        if report["event"] == "error":
            self._trouble(f"worker {self.name}: {report.get('op')} failed: {report['error']}")
            return
        for i, (events, d) in enumerate(self._waiters):
            if report["event"] in events:
                del self._waiters[i]
                d.callback(report)
                return
        self._reports.append(report)

    def errReceived(self, data: bytes) -> None:
        self._stderr = (self._stderr + data)[-8000:]

    def processEnded(self, reason: Failure) -> None:
        self.exit = exit_description(reason.value or reason)
        self.frozen = False
        if not self.expected_end:
            tail = self.stderr_tail()
            self._trouble(f"worker {self.name} (pid {self.pid}) died unexpectedly: "
                          f"{self.exit}" + (f"; its last words:\n{tail}" if tail else ""))
        waiters, self._waiters = self._waiters, []
        for events, d in waiters:
            d.errback(DemoFailed(self._ended_message(events)))
        self.ended.callback(self.exit)


class Timeline:
    """Values as they came, each with the demo's ``time.monotonic()`` of its arrival."""

    def __init__(self) -> None:
        self.items: list[tuple[float, Any]] = []
        self._waits: list[tuple[Callable[[Any], bool], defer.Deferred[tuple[float, Any]]]] = []

    def add(self, value: Any) -> None:
        item = (time.monotonic(), value)
        self.items.append(item)
        for wait in list(self._waits):
            if wait[0](value):
                self._waits.remove(wait)
                wait[1].callback(item)

    def wait(self, test: Callable[[Any], bool], since: int = 0
             ) -> defer.Deferred[tuple[float, Any]]:
        """The first ``(time, value)`` from index ``since`` on whose value passes ``test``."""
        for item in self.items[since:]:
            if test(item[1]):
                return defer.succeed(item)

        def cancel(d: defer.Deferred[tuple[float, Any]]) -> None:
            self._waits[:] = [w for w in self._waits if w[1] is not d]

        d: defer.Deferred[tuple[float, Any]] = defer.Deferred(cancel)
        self._waits.append((test, d))
        return d
