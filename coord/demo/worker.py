"""A worker process of ``coord demo``: a coord client of its own, driven over stdin and stdout.

    python -m coord.demo.worker URL NAME PARENT_PID

The demo (:mod:`coord.demo.recipes`) writes commands to our stdin and reads our reports
from our stdout, one JSON object a line each way.  A command is ``{"op": OP, ...}``; a
report is ``{"event": EVENT, "worker": NAME, ...}``.  Every session we create is
reported (``session``, with its lease ID) before it is used, so that the demo can revoke
its lease if we die (a worker killed between a grant and its report leaves that lease to
expire by itself).  A command that fails is reported as ``error``, with the exception's
type and message (and a traceback on stderr if it is not a coord error).

Operations (keys and names are given in full by the demo):

* ``count`` -- ``times`` times: acquire the lock ``lock``, read the counter ``counter``,
  write it + 1 in a transaction guarded by the lock, release (``increment`` for each
  write etcd acknowledged, ``refused`` for a guard that failed; ``counted`` at the end);
* ``campaign`` / ``resign`` -- stand for election ``election`` with our name as the
  proposal, on a session of ``ttl`` seconds (``candidate`` once our key is written,
  ``elected`` once we lead); resign (``resigned``);
* ``hold`` / ``write`` -- acquire ``lock`` on a session of ``ttl`` seconds (``holding``),
  then wait for the ``write`` command and write ``value`` to ``key`` guarded by the lock
  (``written`` or ``refused``);
* ``take`` -- acquire ``lock`` (``took``, with how long it waited), write ``value`` to
  ``key`` guarded by the lock (``written``), release;
* ``barrier`` -- wait at the Barrier ``name`` (``waiting``, then ``passed``);
* ``config`` -- watch the config prefix ``prefix`` with a ConfigWatcher, values decoded
  as JSON (``configured`` with the first view, then ``reconfigured`` for each change:
  ``changed`` names with [old, new] values, ``added`` and ``removed`` names with their
  values; names are relative to the prefix);
* ``exit`` -- stop the watcher, close every session (revoking its lease), close the
  client, report ``bye`` and exit 0.

The worker exits too when its stdin closes (the demo is gone), and on Linux the kernel
SIGKILLs it when the demo dies (``PR_SET_PDEATHSIG``), so that not even a demo killed
with SIGKILL leaves a worker behind.  It ignores SIGINT: a Ctrl-C in the terminal, which
reaches the whole process group, is the demo's to handle.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Coroutine
from typing import Any

import txaio
from twisted.internet import defer, stdio
from twisted.internet.task import deferLater, react
from twisted.protocols.basic import LineReceiver

from coord import Client, CoordError, Failed, OpSet, Transaction
from coord.recipes import Barrier, ConfigChange, ConfigWatcher, Election, Lock, Session

# How long `exit` may spend closing sessions and the client (etcd may be unreachable).
EXIT_BUDGET = 3.0


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL us when the demo's thread that spawned us exits
    (prctl(2) PR_SET_PDEATHSIG, Linux); exit at once if the demo is gone already."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        # The demo died before the prctl: the signal will never come.
        sys.exit(1)


class Worker(LineReceiver):
    """The worker's side of the channel (stdin and stdout), and its operations."""

    delimiter = b"\n"

    def __init__(self, reactor: Any, url: str, name: str) -> None:
        self.reactor = reactor
        self.name = name
        self.client = Client(reactor, url, timeout=5)
        self.sessions: list[Session] = []
        self.granting: list[defer.Deferred[Session]] = []  # sessions on their way
        self.candidacy: Election | None = None
        self.write_order: defer.Deferred[tuple[str, str]] | None = None
        self.config: ConfigWatcher | None = None
        self.done: defer.Deferred[None] = defer.Deferred()
        self.stopping = False

    # the channel ------------------------------------------------------------------

    def emit(self, event: str, **fields: Any) -> None:
        """Report ``event`` with ``fields`` on stdout (dropped once stdout is closed)."""
        line = json.dumps({"event": event, "worker": self.name, **fields})
        transport: Any = self.transport
        if transport is not None:
            transport.write(line.encode() + b"\n")

    def connectionMade(self) -> None:
        self.emit("ready", pid=os.getpid())

    def lineReceived(self, line: bytes) -> None:
        try:
            command = json.loads(line)
            op = command.pop("op")
            if self.stopping:
                return  # exiting: no new work
            handler: Callable[..., Coroutine[Any, Any, None]] = getattr(self, "op_" + op)
            running = handler(**command)
        except Exception as e:
            self.emit("error", op=None, error=f"bad command {line!r}: {e!r}")
            return
        defer.Deferred.fromCoroutine(running).addErrback(self.failed, op)

    def failed(self, failure: Any, op: str) -> None:
        if self.stopping:
            return  # what the exit cut short (a wait, a session closed under it)
        error = failure.value
        if not isinstance(error, CoordError):
            traceback.print_exception(type(error), error, error.__traceback__)
        self.emit("error", op=op, error=f"{type(error).__name__}: {error}")

    def connectionLost(self, reason: Any = None) -> None:
        # stdin closed: the demo is gone (or it closed our stdin to end us).
        if not self.stopping:
            defer.Deferred.fromCoroutine(self.op_exit())

    async def session(self, ttl: int) -> Session:
        """A new session, reported (``session``) before it is used; `exit` closes it."""
        granting = Session.create(self.client, ttl)
        self.granting.append(granting)
        try:
            session = await granting
        finally:
            self.granting.remove(granting)
        self.sessions.append(session)  # (before `exit`, which waits for the grants, goes on)
        self.emit("session", lease=session.lease_id, ttl=session.ttl)
        if self.stopping:
            raise defer.CancelledError("exiting")
        return session

    async def end(self, session: Session) -> None:
        await session.close()
        self.sessions.remove(session)

    # operations ---------------------------------------------------------------------

    async def op_count(self, lock: str, counter: str, times: int) -> None:
        session = await self.session(10)
        mutex = Lock(session, lock)
        for _ in range(times):
            await mutex.acquire(timeout=20)
            try:
                now = await self.client.get(counter)
                value = int(now.kvs[0].value) + 1 if now.kvs else 1
                # Written only if our lock key is still the one we acquired (its
                # create revision, the fencing token) when etcd applies the write.
                guarded = Transaction(compare=[mutex.guard()],
                                      success=[OpSet(counter, b"%d" % value)])
                try:
                    written = await self.client.submit(guarded)
                except Failed:
                    self.emit("refused", token=mutex.token, value=value)
                else:
                    self.emit("increment", value=value, token=mutex.token,
                              revision=written.header.revision)
            finally:
                await mutex.release()
        await self.end(session)
        self.emit("counted")

    async def op_campaign(self, election: str, ttl: int) -> None:
        session = await self.session(ttl)
        self.candidacy = candidacy = Election(session, election)
        elected = candidacy.campaign(self.name)
        # Our place in the line is our key's create revision: report it once written.
        while True:
            found = await self.client.get(candidacy.key)
            if found.kvs:
                self.emit("candidate", key=candidacy.key.decode(), ttl=session.ttl,
                          create_revision=found.kvs[0].create_revision)
                break
            if elected.called:
                break  # failed (or resigned) before its key was seen
            await deferLater(self.reactor, 0.01, lambda: None)
        try:
            await elected
        except defer.CancelledError:
            return  # resigned before being elected
        self.emit("elected", token=candidacy.token, revision=candidacy.revision)

    async def op_resign(self) -> None:
        candidacy, self.candidacy = self.candidacy, None
        if candidacy is not None:
            await candidacy.resign()
            await self.end(candidacy.session)
        self.emit("resigned")

    async def op_hold(self, lock: str, ttl: int) -> None:
        session = await self.session(ttl)
        mutex = Lock(session, lock)
        await mutex.acquire(timeout=10)
        self.write_order = defer.Deferred()
        self.emit("holding", token=mutex.token, lease=session.lease_id, ttl=session.ttl)
        key, value = await self.write_order
        # What this process believes when it writes: its lock object has not heard
        # of any loss if it could not run (frozen) while the lease expired.
        believed = mutex.state.name
        try:
            await self.client.submit(Transaction(compare=[mutex.guard()],
                                                 success=[OpSet(key, value)]))
        except Failed:
            self.emit("refused", token=mutex.token, believed=believed)
        else:
            self.emit("written", token=mutex.token, believed=believed)
        await mutex.release()  # (guarded: never deletes a newer holder's key)
        await self.end(session)

    async def op_write(self, key: str, value: str) -> None:
        if self.write_order is None or self.write_order.called:
            raise RuntimeError("write: no lock held by `hold` waits for a write")
        self.write_order.callback((key, value))

    async def op_take(self, lock: str, key: str, value: str, ttl: int) -> None:
        session = await self.session(ttl)
        mutex = Lock(session, lock)
        started = time.monotonic()
        await mutex.acquire(timeout=20)
        self.emit("took", token=mutex.token, waited=time.monotonic() - started)
        written = await self.client.submit(Transaction(
            compare=[mutex.guard()], success=[OpSet(key, value.format(token=mutex.token))]))
        self.emit("written", token=mutex.token, revision=written.header.revision)
        await mutex.release()
        await self.end(session)

    async def op_barrier(self, name: str, timeout: float) -> None:
        waiting = Barrier(self.client, name).wait(timeout=timeout)
        self.emit("waiting")
        revision = await waiting
        self.emit("passed", revision=revision)

    async def op_config(self, prefix: str) -> None:
        self.config = watcher = ConfigWatcher(self.client, prefix, decode=json.loads)
        snapshot = await watcher.start(timeout=10)
        start = len(watcher.prefix)

        def changed(change: ConfigChange) -> None:
            # The daemon's reaction: here, reporting what it applies (names relative to
            # the prefix; old and new values of each changed key).
            self.emit("reconfigured", revision=change.revision,
                      changed={k[start:].decode(): [change.previous[k], v]
                               for k, v in change.changed.items()},
                      added={k[start:].decode(): v for k, v in change.added.items()},
                      removed={k[start:].decode(): v for k, v in change.removed.items()})

        watcher.on_change(changed)
        self.emit("configured", revision=snapshot.revision,
                  config={k[start:].decode(): v for k, v in snapshot.items()})

    async def op_exit(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        if self.config is not None:
            self.config.stop()
        deadline = self.reactor.seconds() + EXIT_BUDGET
        try:
            # A lease being granted is one to revoke too: wait for the grants first.
            granted = defer.DeferredList(list(self.granting), consumeErrors=True)
            await granted.addTimeout(EXIT_BUDGET, self.reactor)
            # The sessions before the client: closing it would cut their revokes short.
            closing = defer.DeferredList([s.close() for s in self.sessions], consumeErrors=True)
            await closing.addTimeout(max(0.1, deadline - self.reactor.seconds()), self.reactor)
        except defer.TimeoutError:
            pass  # etcd did not answer in time: the leases expire by themselves
        await self.client.close()
        self.emit("bye")
        transport: Any = self.transport
        if transport is not None:
            transport.loseConnection()
        self.reactor.callLater(0, self.done.callback, None)


def main(reactor: Any, url: str, name: str) -> defer.Deferred[None]:
    """The worker, run by `react`: fires once ``exit`` was done or stdin closed."""
    txaio.start_logging(level="warn", out=sys.stderr)  # type: ignore[attr-defined]
    worker = Worker(reactor, url, name)
    stdio.StandardIO(worker)
    return worker.done


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python -m coord.demo.worker URL NAME PARENT_PID")
    _die_with_parent(int(sys.argv[3]))
    # Twisted installs its SIGINT handler only if SIGINT has Python's default handler.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    react(main, (sys.argv[1], sys.argv[2]))
