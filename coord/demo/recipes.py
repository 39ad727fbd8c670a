"""`coord demo`: coord's recipes at work, in worker processes that share one etcd.

Four worker processes (``python -m coord.demo.worker``, see :mod:`coord.demo.worker`)
each run their own coord client.  This process -- the demo -- starts them, sends them
commands on their stdin and reads their reports from their stdout (one JSON object a
line), and checks what they report against what etcd holds:

1. lock -- the workers increment one counter, read then write, each write guarded by a
   shared :class:`~coord.recipes.Lock` (its fencing token); the counter must end equal
   to the increments etcd acknowledged, and the values in token order must be 1..N;
2. election -- the workers campaign (:class:`~coord.recipes.Election`); the demo kills
   the leader with SIGKILL and measures the time until an observer sees the next in line
   lead (about one session TTL: the dead leader's key goes when its lease expires);
3. paused holder -- a lock holder frozen with SIGSTOP past its lease's TTL loses the
   lock to another worker; thawed, it makes its guarded write, which etcd refuses;
4. barrier -- the workers wait at a :class:`~coord.recipes.Barrier` the demo holds,
   and all pass once it releases it;
5. config -- a worker runs a :class:`~coord.recipes.ConfigWatcher` (a daemon's live
   config) and reacts to the demo's changes; the reaction time is measured.

Every step has a timeout, and a worker that dies unexpectedly or reports an error ends
the demo at once.  On every path -- success, failure, Ctrl-C (SIGINT) or SIGTERM -- the
workers are stopped (asked to exit, SIGKILLed if they do not), the leases of their
sessions revoked and the keys under ``coord-demo/`` deleted, then checked gone.  The
demo ends with a summary table; its exit status is 0 if every check held, 1 if one did
not (the message on stderr says which and why), 130 if interrupted.  Run one demo at a
time against a server: a second one would share ``coord-demo/`` (and delete it first).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
import textwrap
import time
import traceback
from collections.abc import Coroutine
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.task import deferLater, react
from twisted.python.failure import Failure

import coord
from coord import Client, CoordError, KeySet, Lease, LeaseNotFound, OpSet, Transaction
from coord.demo import CheckFailed, Checks
from coord.demo._process import DemoFailed, Timeline, WorkerProcess, process_state
from coord.recipes import Barrier
from coord.recipes.election import Leader, observe

__all__ = ["Demo", "DemoFailed", "WorkerProcess", "run", "run_at"]

PREFIX = "coord-demo/"
NAMES = ("w1", "w2", "w3", "w4")
INCREMENTS = 5  # per worker
SHORT_TTL = 2  # seconds: the election's and the paused holder's sessions
READY_TIMEOUT = 30.0  # worker start-up: a Python interpreter importing Twisted and coord
STEP_TIMEOUT = 15.0  # any other wait for a report or for etcd
EXIT_TIMEOUT = 5.0  # a worker asked to exit, before it is SIGKILLed
CLEANUP_TIMEOUT = 10.0  # revoking leases and deleting keys
HELD_BACK = 0.3  # seconds the barrier stays held once every worker waits
WIDTH = 92  # of the explanations


def say(line: str = "") -> None:
    print(line, flush=True)


def explain(text: str) -> None:
    """Print ``text`` as an indented paragraph (what a scenario shows, and why it matters)."""
    for line in textwrap.wrap(text, width=WIDTH - 3):
        say("   " + line)


def _settings(values: dict[str, Any]) -> str:
    return ", ".join(f"{name} = {value!r}" for name, value in values.items()) or "nothing"


def _change(report: dict[str, Any]) -> str:
    """A worker's ``reconfigured`` report, in words."""
    parts = [f"{name} {old!r} -> {new!r}" for name, (old, new) in report["changed"].items()]
    parts += [f"new {name} = {value!r}" for name, value in report["added"].items()]
    parts += [f"{name} removed" for name in report["removed"]]
    return ", ".join(parts) or "nothing"


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


@attrs.define
class Row:
    """One line of the summary table."""

    scenario: str
    shown: str = ""
    measured: str = ""
    result: str = "not run"


class Demo:
    """The recipes demo against the etcd at ``url`` (see the module's docstring).

    Attributes:
        status: the exit status once :meth:`run` has returned (0 ok, 1 failed,
            130 interrupted).
        workers: the worker processes, by name.
    """

    def __init__(self, reactor: Any, url: str) -> None:
        self.reactor = reactor
        self.url = url
        self.client = Client(reactor, url, timeout=5)
        self.check = Checks()
        self.workers: dict[str, WorkerProcess] = {}
        self.leases: set[int] = set()  # of the workers' sessions, as they report them
        self.interrupted = False
        self.connected = False  # etcd answered: there may be something to clean up
        self.cleaning = False
        self.status = 0
        self.rows = [Row("lock"), Row("election"), Row("paused holder"), Row("barrier"),
                     Row("config")]
        self._trouble: DemoFailed | None = None
        self._waits: list[tuple[defer.Deferred[Any], defer.Deferred[Any]]] = []

    # waiting, with a timeout, unless a worker fails -------------------------------------------

    def trouble(self, message: str) -> None:
        """A worker died or failed: fail every wait under way, and the next ones."""
        if self._trouble is not None:
            return
        self._trouble = DemoFailed(message)
        waits, self._waits = self._waits, []
        for out, inner in waits:
            if not out.called:
                out.errback(DemoFailed(message))
            inner.cancel()

    def within(self, what: str, awaited: defer.Deferred[Any] | Coroutine[Any, Any, Any],
               seconds: float = STEP_TIMEOUT, workers: bool = True) -> defer.Deferred[Any]:
        """``awaited``'s result, or DemoFailed naming ``what`` if it takes more than
        ``seconds`` (it is then cancelled) or, unless not ``workers``, if a worker dies
        or fails (before or meanwhile)."""
        inner = (awaited if isinstance(awaited, defer.Deferred)
                 else defer.Deferred.fromCoroutine(awaited))
        if workers and self._trouble is not None:
            inner.cancel()
            inner.addErrback(lambda _: None)
            return defer.fail(DemoFailed(str(self._trouble)))

        def cancel(out: defer.Deferred[Any]) -> None:
            out.errback(defer.CancelledError(what))  # (not what `inner` fails with now)
            inner.cancel()

        out: defer.Deferred[Any] = defer.Deferred(cancel)

        def timed_out() -> None:
            if not out.called:
                out.errback(DemoFailed(f"{what}: nothing within {seconds:g} s"))
            inner.cancel()

        timer = self.reactor.callLater(seconds, timed_out)

        def settle(result: Any) -> None:
            if timer.active():
                timer.cancel()
            self._waits[:] = [w for w in self._waits if w[0] is not out]
            if not out.called:
                if isinstance(result, Failure):
                    out.errback(result)
                else:
                    out.callback(result)

        if workers:
            self._waits.append((out, inner))
        inner.addBoth(settle)
        return out

    def sleep(self, seconds: float) -> defer.Deferred[None]:
        return deferLater(self.reactor, seconds, lambda: None)

    def every(self, event: str, workers: list[WorkerProcess]) -> defer.Deferred[Any]:
        """The next report of ``event`` from each of ``workers``, as a list."""
        def first_error(failure: Failure) -> Failure:
            error = failure.value
            if isinstance(error, defer.FirstError):
                return error.subFailure  # the reason, not gatherResults' wrapper
            return failure

        return defer.gatherResults([w.expect(event) for w in workers],
                                   consumeErrors=True).addErrback(first_error)

    @property
    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.workers.values() if w.alive]

    # the run ----------------------------------------------------------------------------------

    async def run(self) -> int:
        """Run the scenarios, clean up, print the summary; returns the exit status."""
        started = time.monotonic()
        failure: str | None = None
        current: Row | None = None
        try:
            await self.connect()
            await self.start_workers()
            scenarios = (self.lock, self.election, self.paused_holder, self.barrier,
                         self.config)
            for row, scenario in zip(self.rows, scenarios, strict=True):
                current = row
                say()
                row.shown, row.measured = await scenario()
                row.result = "ok"
                current = None
        except DemoFailed as e:
            failure = str(e)
        except (CheckFailed, CoordError) as e:
            what = "check did not hold" if isinstance(e, CheckFailed) else type(e).__name__
            failure = f"{what}: {e}"
        except defer.CancelledError:
            if not self.interrupted:
                traceback.print_exc()
            failure = "interrupted" if self.interrupted else "unexpected cancellation"
        except Exception as e:
            traceback.print_exc()  # a bug, in coord or in the demo: show where
            failure = f"unexpected error: {type(e).__name__}: {e}"
        if current is not None:
            current.result = "interrupted" if self.interrupted else "FAILED"
        self.cleaning = True
        problems = await self.cleanup()
        if failure is None and problems:
            failure = "; ".join(problems)
        if self.connected:
            self.summary()
        elapsed = time.monotonic() - started
        if self.interrupted:
            outcome = "; ".join(problems) or "workers stopped, nothing left behind"
            print(f"demo interrupted; {outcome} ({elapsed:.1f} s)", file=sys.stderr)
            return 130
        if failure is not None:
            where = f"{current.scenario}: " if current is not None else ""
            print(f"demo FAILED: {where}{failure}", file=sys.stderr)
            return 1
        say(f"demo ok: {len(self.rows)} scenarios, {self.check.passed} checks passed, "
            f"nothing left behind ({elapsed:.1f} s)")
        return 0

    async def connect(self) -> None:
        try:
            status = await self.within(f"reaching etcd at {self.url}", self.client.status())
        except CoordError as e:
            raise DemoFailed(f"cannot reach etcd at {self.url}: {type(e).__name__}: {e}")
        self.connected = True
        say(f"coord demo: coordination recipes at work, on etcd {status.version} at {self.url}")
        say(f"  {len(NAMES)} worker processes ({', '.join(NAMES)}), each with its own coord "
            "client, share this etcd.")
        say("  This process (the demo) drives them, and checks what they report against what "
            "etcd holds.")
        say(f"  Everything is kept under {PREFIX} and removed at the end.")
        # Leftovers of an interrupted run (their leases expire by themselves).
        await self.within("deleting leftovers", self.client.delete(KeySet(PREFIX, prefix=True)))

    async def start_workers(self) -> None:
        say()
        say(f"starting {len(NAMES)} worker processes (python -m coord.demo.worker)")
        env = dict(os.environ)
        # The workers import the coord this demo runs, wherever it was imported from.
        root = os.path.dirname(os.path.dirname(os.path.abspath(coord.__file__)))
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        for name in NAMES:
            worker = WorkerProcess(name, self.trouble)
            worker.listeners.append(self._note_session)
            self.workers[name] = worker
            self.reactor.spawnProcess(
                worker, sys.executable,
                [sys.executable, "-m", "coord.demo.worker", self.url, name, str(os.getpid())],
                env=env)
        ready = await self.within("starting the workers",
                                  self.every("ready", list(self.workers.values())),
                                  READY_TIMEOUT)
        say("  " + ", ".join(f"{r['worker']} (pid {r['pid']})" for r in ready) + " ready")

    def _note_session(self, report: dict[str, Any]) -> None:
        if report["event"] == "session":
            self.leases.add(report["lease"])

    # 1. lock ----------------------------------------------------------------------------------

    async def lock(self) -> tuple[str, str]:
        workers = self.alive
        total = INCREMENTS * len(workers)
        lock, counter = PREFIX + "locks/counter", PREFIX + "counter"
        say(f"1. lock: {len(workers)} processes take turns at one counter")
        explain(f"Each worker, {INCREMENTS} times: acquire the lock {lock}, read {counter}, "
                "write it + 1, release. A read-then-write is safe only if nobody writes in "
                "between: the lock lets one process at a time do it. Each write is guarded by "
                "the lock: a transaction that applies only if the writer's lock key still has "
                "the create revision it had when acquired (the lock's fencing token, larger "
                "for each new holder).")
        increments: list[dict[str, Any]] = []
        refused: list[dict[str, Any]] = []

        def show(report: dict[str, Any]) -> None:
            if report["event"] == "increment":
                increments.append(report)
                say(f"   {report['worker']} holds the lock (token {report['token']}): "
                    f"counter -> {report['value']}")
            elif report["event"] == "refused":
                refused.append(report)
                say(f"   {report['worker']}: its guarded write of {report['value']} was refused")

        for worker in workers:
            worker.listeners.append(show)
        started = time.monotonic()
        try:
            for worker in workers:
                worker.send("count", lock=lock, counter=counter, times=INCREMENTS)
            await self.within("the workers' increments", self.every("counted", workers))
        finally:
            for worker in workers:
                worker.listeners.remove(show)
        elapsed = time.monotonic() - started
        stored = await self.within("reading the counter", self.client.get(counter))
        value = int(stored.kvs[0].value) if stored.kvs else 0
        in_order = sorted(increments, key=lambda r: r["token"])
        turns = sum(a["worker"] != b["worker"] for a, b in itertools.pairwise(in_order))
        say(f"   {len(increments)} increments in {elapsed:.2f} s; the lock changed hands "
            f"{turns} times")
        self.check(len(increments) == total and not refused,
                   f"etcd acknowledged all {total} guarded increments")
        self.check(value == len(increments),
                   f"the counter reads {value}: the number of acknowledged increments "
                   "(no update lost)")
        self.check([r["value"] for r in in_order] == list(range(1, len(in_order) + 1)),
                   f"in token order the values written are 1, 2, ..., {len(in_order)}: "
                   "each holder saw the last one's write")
        return (f"{len(workers)} processes, {len(increments)} guarded increments; counter = "
                f"{value}", f"{elapsed:.2f} s ({len(increments) / elapsed:.0f} increments/s)")

    # 2. election ------------------------------------------------------------------------------

    async def election(self) -> tuple[str, str]:
        workers = self.alive
        name = PREFIX + "election"
        say(f"2. election: {len(workers)} workers elect a leader; the demo kills it; the next "
            "in line takes over")
        explain(f"Each worker campaigns with its name as value, on a session whose lease has "
                f"a TTL of {SHORT_TTL} s (etcd raises a TTL below its minimum). The leader is "
                "the candidate whose key is oldest; each other waits for the key just before "
                "its own. A killed leader cannot resign: its key stays until its lease "
                "expires, so the failover takes about one TTL (etcd looks for expired leases "
                "twice a second).")
        leaders = Timeline()
        observation = observe(self.client, name, leaders.add)
        try:
            for worker in workers:
                worker.send("campaign", election=name, ttl=SHORT_TTL)
            queued = await self.within("the candidates' keys", self.every("candidate", workers))
            line = [r["worker"] for r in sorted(queued, key=lambda r: r["create_revision"])]
            ttl = max(r["ttl"] for r in queued)
            say(f"   in line, by their keys' create revisions: {', '.join(line)} (etcd "
                f"granted a TTL of {ttl} s)")
            first, successor = self.workers[line[0]], self.workers[line[1]]
            elected = await self.within(f"{first.name} elected", first.expect("elected"))
            await self.within("observing the leader", leaders.wait(
                lambda leader: leader is not None and leader.value == first.name.encode()))
            say(f"   {first.name} leads (token {elected['token']}): its campaign returned, and "
                "the demo's observer of the election sees it")
            self.check(not any(w.has("elected") for w in workers if w is not first),
                       f"{first.name} alone was elected")

            since = len(leaders.items)
            first.expected_end = True
            killed = time.monotonic()
            first.signal(signal.SIGKILL)
            say(f"   killing the leader {first.name} (pid {first.pid}) with SIGKILL: no clean-up "
                "code of it runs")

            def new_leader(leader: Leader | None) -> bool:
                return leader is not None and leader.value != first.name.encode()

            seen_at, new = await self.within("a new leader after the kill",
                                             leaders.wait(new_leader, since), ttl + STEP_TIMEOUT)
            failover = seen_at - killed
            took = await self.within(f"{successor.name} elected", successor.expect("elected"))
            how = await self.within(f"{first.name} ending", first.ended)
            say(f"   {new.value.decode()} leads {failover:.2f} s after the kill (token "
                f"{took['token']}), once {first.name}'s lease expired and etcd deleted its key")
        finally:
            observation.close()
        self.check(how == "killed by SIGKILL", f"{first.name} was killed by SIGKILL")
        self.check(new.value == successor.name.encode(),
                   f"the next in line, {successor.name}, took over")
        self.check(not any(w.has("elected") for w in self.alive if w is not successor),
                   f"{successor.name} alone was elected")
        # Not before the dead leader's lease could have expired (keep-alives every TTL/3:
        # it had at least 2/3 of its TTL left), and within a TTL plus etcd's expiry loop
        # (which runs every 500 ms).
        self.check(ttl / 3 <= failover <= ttl + 2.0,
                   f"the failover took {failover:.2f} s: about the lease's TTL ({ttl} s)")
        for worker in self.alive:
            worker.send("resign")
        await self.within("the candidates resigning", self.every("resigned", self.alive))
        left = await self.within("reading the election", self.client.get(
            KeySet(name + "/", prefix=True), count_only=True))
        self.check(left.count == 0, "after the others resigned, the election has no keys left")
        return (f"leader {first.name} SIGKILLed; {successor.name}, next in line, took over",
                f"failover {failover:.2f} s (TTL {ttl} s)")

    # 3. paused holder -------------------------------------------------------------------------

    async def paused_holder(self) -> tuple[str, str]:
        holder, taker = self.alive[:2]
        lock, resource = PREFIX + "locks/resource", PREFIX + "resource"
        say("3. paused holder: a holder frozen past its TTL loses the lock, and its late write "
            "is refused")
        explain("A process can stop for longer than its lease's TTL without running a line "
                "of code (a GC pause, swapping, SIGSTOP, a VM migration). Its lease expires, "
                "another process takes the lock, and the frozen one resumes believing it "
                "still holds it: only a write guarded by the lock keeps the data safe.")
        holder.send("hold", lock=lock, ttl=SHORT_TTL)
        held = await self.within(f"{holder.name} holding the lock", holder.expect("holding"))
        say(f"   {holder.name} holds the lock (token {held['token']}, lease TTL {held['ttl']} s) "
            f"and is about to write {resource}")
        holder.frozen = True
        frozen = time.monotonic()
        holder.signal(signal.SIGSTOP)
        await self.within(f"{holder.name} stopping", self._until_state(holder, stopped=True))
        say(f"   froze {holder.name} (SIGSTOP); the demo gives it the order to write, which it "
            "will read once thawed")
        holder.send("write", key=resource,
                    value=f"written by {holder.name} with token {held['token']}")
        taker.send("take", lock=lock, key=resource, ttl=SHORT_TTL,
                   value=f"written by {taker.name} with token {{token}}")
        say(f"   {taker.name} asks for the lock")
        took = await self.within(f"{taker.name} taking the lock", taker.expect("took"),
                                 held["ttl"] + STEP_TIMEOUT)
        say(f"   {taker.name} got it after {took['waited']:.2f} s, when {holder.name}'s lease "
            f"expired (token {took['token']})")
        wrote = await self.within(f"{taker.name} writing", taker.expect("written"))
        say(f"   {taker.name} wrote {resource} at revision {wrote['revision']}")
        rest = held["ttl"] + 0.2 - (time.monotonic() - frozen)
        if rest > 0:
            await self.sleep(rest)  # frozen for longer than the whole TTL, to be plain
        assert holder.pid is not None
        still_stopped = process_state(holder.pid) in ("T", "t", None)  # (None: no procfs)
        holder.signal(signal.SIGCONT)
        holder.frozen = False
        frozen_for = time.monotonic() - frozen
        say(f"   thawed {holder.name} after {frozen_for:.1f} s; it goes on with its write, "
            f"guarded by its token {held['token']}")
        late = await self.within(f"{holder.name}'s late write",
                                 holder.expect("refused", "written"))
        if late["believed"] == "HELD":
            say("   its lock object still said HELD: it ran no code while frozen, and had not "
                "noticed the loss")
        else:
            say(f"   its lock object said {late['believed']} (it noticed the loss first; code "
                "that writes without looking would not)")
        say("   etcd refused the write: the guard's compare failed" if late["event"] == "refused"
            else "   etcd APPLIED the write")
        stored = await self.within(f"reading {resource}", self.client.get(resource))
        value = stored.kvs[0].value.decode() if stored.kvs else None
        say(f"   {resource} = {value!r}")
        self.check(still_stopped and frozen_for > held["ttl"],
                   f"{holder.name} stayed frozen {frozen_for:.1f} s, longer than its lease's "
                   f"TTL ({held['ttl']} s)")
        self.check(took["token"] > held["token"],
                   f"{taker.name}'s token {took['token']} is larger than {holder.name}'s "
                   f"{held['token']}")
        self.check(late["event"] == "refused", f"{holder.name}'s late guarded write was refused")
        self.check(value == f"written by {taker.name} with token {took['token']}"
                   and stored.kvs[0].mod_revision == wrote["revision"],
                   f"{resource} holds {taker.name}'s write, and only it")
        return (f"{holder.name} frozen {frozen_for:.1f} s > TTL; {taker.name} took the lock; "
                f"late write refused", f"{taker.name} waited {took['waited']:.2f} s")

    async def _until_state(self, worker: WorkerProcess, stopped: bool) -> None:
        """Wait until the kernel shows ``worker`` stopped (or not): signals are delivered
        asynchronously.  Returns at once without procfs."""
        assert worker.pid is not None
        while True:
            state = process_state(worker.pid)
            if state is None or (state in "Tt") == stopped:
                return
            await self.sleep(0.005)

    # 4. barrier -------------------------------------------------------------------------------

    async def barrier(self) -> tuple[str, str]:
        workers = self.alive
        name = PREFIX + "barrier"
        say(f"4. barrier: {len(workers)} workers wait at a barrier until the demo releases it")
        explain("A barrier holds a group back until something is ready (a migration done, "
                "a deploy allowed). It is held while its key exists; waiting is a watch, so "
                "the release reaches every waiter at once.")
        gate = Barrier(self.client, name)
        held = await self.within("holding the barrier", gate.hold())
        say(f"   the demo holds the barrier {name}")
        for worker in workers:
            worker.send("barrier", name=name, timeout=STEP_TIMEOUT)
        await self.within("the workers waiting", self.every("waiting", workers))
        await self.sleep(HELD_BACK)
        early = [w.name for w in workers if w.has("passed")]
        say(f"   {', '.join(w.name for w in workers)} wait; after {HELD_BACK} s "
            + (f"{', '.join(early)} passed already" if early else "none has passed")
            + "; the demo releases it")
        released_at = time.monotonic()
        released = await self.within("releasing the barrier", gate.release())
        passed = await self.within("the workers passing", self.every("passed", workers))
        delays = [(r["received"] - released_at) * 1000 for r in passed]
        for report, delay in zip(passed, delays, strict=True):
            say(f"   {report['worker']} passed {delay:.0f} ms after the release (at revision "
                f"{report['revision']})")
        self.check(held, "the demo held the barrier (it created its key)")
        self.check(not early, f"no worker passed while it was held ({HELD_BACK} s)")
        self.check(released and len(passed) == len(workers),
                   f"all {len(workers)} passed once it was released")
        return (f"{len(workers)} workers held back, all passed on release",
                f"all through in {max(delays):.0f} ms")

    # 5. config --------------------------------------------------------------------------------

    async def config(self) -> tuple[str, str]:
        daemon = self.alive[-1]
        prefix = PREFIX + "config/"
        say(f"5. config: a daemon ({daemon.name}) reacts to config changes")
        explain(f"The daemon watches {prefix} with a ConfigWatcher: a live, consistent view "
                "of every key under the prefix (one read, then a watch). Each change reaches "
                "it as one event per revision, with the old and new values: no polling, no "
                "restart.")
        await self.within("writing the config", self.client.set(prefix + "log_level",
                                                                 json.dumps("info")))
        daemon.send("config", prefix=prefix)
        first = await self.within(f"{daemon.name} reading the config", daemon.expect("configured"))
        say(f"   {daemon.name} starts with {_settings(first['config'])} (revision "
            f"{first['revision']})")
        self.check(first["config"] == {"log_level": "info"},
                   "the daemon's first view is the config in etcd")

        sent = time.monotonic()
        written = await self.within("changing the config", self.client.set(
            prefix + "log_level", json.dumps("debug")))
        say(f"   the demo sets log_level = 'debug' (revision {written.revision})")
        change = await self.within(f"{daemon.name} reacting", daemon.expect("reconfigured"))
        reaction = (change["received"] - sent) * 1000
        say(f"   {daemon.name} applies {_change(change)} at revision {change['revision']}, "
            f"{reaction:.0f} ms after the write")
        self.check(change["revision"] == written.revision
                   and change["changed"] == {"log_level": ["info", "debug"]}
                   and not change["added"] and not change["removed"],
                   "the daemon saw the change, with the old and new values, at the write's "
                   "revision")

        sent = time.monotonic()
        both = await self.within("changing two keys", self.client.submit(Transaction(
            success=[OpSet(prefix + "pool_size", json.dumps(16)),
                     OpSet(prefix + "timeout_ms", json.dumps(500))])))
        say(f"   the demo adds pool_size = 16 and timeout_ms = 500 in one transaction (revision "
            f"{both.header.revision})")
        second = await self.within(f"{daemon.name} reacting", daemon.expect("reconfigured"))
        reaction2 = (second["received"] - sent) * 1000
        say(f"   {daemon.name} applies {_change(second)} at revision {second['revision']}, "
            f"{reaction2:.0f} ms after the write")
        self.check(second["revision"] == both.header.revision
                   and second["added"] == {"pool_size": 16, "timeout_ms": 500}
                   and not second["changed"] and not second["removed"],
                   "both keys reached it as one change, at one revision: never half of it")
        return (f"daemon {daemon.name} applied 2 changes, each whole",
                f"reactions {reaction:.0f} ms, {reaction2:.0f} ms")

    # the end ----------------------------------------------------------------------------------

    async def cleanup(self) -> list[str]:
        """Stop the workers, revoke their sessions' leases, delete the demo's keys, and
        check that nothing is left.  Never raises: returns what went wrong."""
        problems: list[str] = []
        if self.workers or self.connected:
            say()
            say("cleaning up")
        if self.workers:
            say(f"   {await self.stop_workers()}")
            still = [w.name for w in self.alive]
            if still:
                problems.append(f"workers {', '.join(still)} still run")
        if self.connected:
            try:
                await self.within("cleaning up etcd", self.clean_etcd(), CLEANUP_TIMEOUT,
                                  workers=False)
            except DemoFailed as e:
                problems.append(f"clean-up: {e}")
            except (CheckFailed, CoordError) as e:
                problems.append(f"clean-up: {type(e).__name__}: {e}")
        await self.client.close()
        return problems

    async def stop_workers(self) -> str:
        """Ask each live worker to exit (thawing a frozen one first); SIGKILL those still
        running after EXIT_TIMEOUT.  Returns what was done."""
        running = self.alive
        if not running:
            ends = ", ".join(f"{w.name}: {w.exit}" for w in self.workers.values())
            return f"the workers had ended ({ends})"
        for worker in running:
            worker.expected_end = True
            if worker.frozen:
                worker.signal(signal.SIGCONT)
            worker.send("exit")
        ended = defer.DeferredList([w.ended for w in running], consumeErrors=True)
        try:
            await ended.addTimeout(EXIT_TIMEOUT, self.reactor)
        except defer.TimeoutError:
            pass
        killed = [w for w in running if w.alive]
        for worker in killed:
            worker.signal(signal.SIGKILL)
        if killed:
            last = defer.DeferredList([w.ended for w in killed], consumeErrors=True)
            try:
                await last.addTimeout(EXIT_TIMEOUT, self.reactor)
            except defer.TimeoutError:
                pass
        still = [w.name for w in running if w.alive]
        text = f"asked {', '.join(w.name for w in running)} to exit"
        if killed:
            text += f"; SIGKILLed {', '.join(w.name for w in killed)}, which did not"
        if still:
            text += f"; {', '.join(still)} STILL RUNNING"
        return text

    async def clean_etcd(self) -> None:
        """Revoke the leases of the workers' sessions that are still alive (and of any
        key under PREFIX), delete the keys under PREFIX, and check both gone."""
        everything = KeySet(PREFIX, prefix=True)
        under = await self.client.get(everything, keys_only=True)
        ours = set(self.leases) | {kv.lease for kv in under.kvs if kv.lease}
        revoked = 0
        for lease_id in sorted(ours):
            try:
                await Lease(self.client, lease_id).revoke()
                revoked += 1
            except LeaseNotFound:
                pass  # closed by its worker, or expired (a killed or frozen worker's)
        deleted = (await self.client.delete(everything)).deleted
        left = (await self.client.get(everything, count_only=True)).count
        lingering = ours & {lease.lease_id for lease in await self.client.leases()}
        if ours:
            others = len(ours) - revoked
            fates = ([f"{revoked} still lived (revoked now)"] if revoked else []) + (
                [f"{others} closed by their workers or expired"] if others else [])
            say(f"   the workers' sessions had {_count(len(ours), 'lease')}: {', '.join(fates)}")
        say(f"   deleted {_count(deleted, 'key')} under {PREFIX}")
        self.check(left == 0 and not lingering,
                   f"nothing left: no key under {PREFIX}, none of the {len(ours)} leases")

    def summary(self) -> None:
        header = Row("scenario", "what was shown", "measured", "result")
        rows = [header, *self.rows]
        widths = [max(len(getattr(r, f)) for r in rows) for f in ("scenario", "shown", "measured")]
        say("summary")
        for row in rows:
            say(f"  {row.scenario:<{widths[0]}}  {row.shown:<{widths[1]}}  "
                f"{row.measured:<{widths[2]}}  {row.result}")


_demos: list[Demo] = []


def run(reactor: Any, url: str) -> defer.Deferred[None]:
    """The demo, run by `react`; raises SystemExit with a non-zero status on failure.

    Ctrl-C (or SIGTERM) makes the reactor shut down: a "before shutdown" trigger then
    cancels the step under way and holds the shutdown until the clean-up is done.
    """
    demo = Demo(reactor, url)
    _demos.append(demo)
    task = defer.Deferred.fromCoroutine(demo.run())

    def interrupted() -> defer.Deferred[None] | None:
        if task.called:
            return None
        demo.interrupted = True
        done: defer.Deferred[None] = defer.Deferred()

        def finished(result: Any) -> Any:
            done.callback(None)
            return result

        task.addBoth(finished)
        # A second Ctrl-C would only make the reactor say it is stopping already.
        signal.signal(signal.SIGINT, lambda *_: say("still cleaning up: a few seconds more"))
        if not demo.cleaning:  # (a clean-up under way goes on to its end)
            say()
            say("interrupted: stopping the workers and cleaning up")
            task.cancel()
        return done

    reactor.addSystemEventTrigger("before", "shutdown", interrupted)

    def ended(status: int) -> None:
        demo.status = status
        if status:
            raise SystemExit(status)

    return task.addCallback(ended)


def run_at(url: str) -> int:
    """Run the demo against ``url`` on the reactor.

    Returns:
        The exit status: 0 when every check held, 1 otherwise, 130 if interrupted.
    """
    try:
        react(run, (url,))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        # Should the reactor have stopped before the clean-up ended (it should not):
        # no worker outlives the demo.
        for demo in _demos:
            for worker in demo.workers.values():
                if worker.alive and worker.pid is not None:
                    try:
                        os.kill(worker.pid, signal.SIGKILL)
                    except OSError:
                        pass
    return 0  # pragma: no cover - react always exits
