"""Barrier and DoubleBarrier: etcd's Go ``contrib/recipes`` barriers, same key layout.

* :class:`Barrier` -- one key, ``name`` itself, with an empty value.  The barrier is held
  while the key exists: ``hold()`` creates it (only if absent), ``release()`` deletes it,
  ``wait()`` returns once it does not exist.  Go's ``recipe.Barrier`` uses the same key,
  so Go programs, ``etcdctl put NAME ""`` / ``etcdctl del NAME`` and coord share one.
* :class:`DoubleBarrier` -- ``count`` participants meet twice: ``enter()`` returns once
  ``count`` have entered, ``leave()`` once all have left.  Each participant owns
  ``name/waiters/<lease hex>`` under its session's lease; the ``count``-th to enter writes
  ``name/ready``.  Go's ``recipe.DoubleBarrier`` uses the same prefix and ready key (its
  waiter keys are ``name/waiters/<nanoseconds>``), so both can share one barrier.

Where coord departs from Go, on purpose:

* a wait ends only on proof: a read that finds the key gone, or a DELETE event of it (a
  PUT of ``ready`` after our key for ``enter``).  A watch that ends -- closed, cancelled
  by etcd, behind a compaction -- or an unreachable server leads to a new read and a new
  watch, never to a release.  Go's ``WaitEvents`` returns (success) when its watch
  channel closes;
* ``ready`` is judged by its mod revision, never by its existence: it opens the barrier
  for us only if it was written after our waiter key.  So a ``ready`` left behind (by a
  last leaver that crashed, or a round whose enter was given up) never lets a later
  round pass.  (Go also waits for a PUT after its key's revision.)  It has no lease, as
  Go's: a participant that crashes after writing it must not take it away from those
  still to see it;
* ``leave()`` deletes our key first, then waits until no waiter key of our round (created
  before ``ready``) remains; the leaver whose delete left none deletes ``ready``, guarded
  on its mod revision so a later round's is never touched.

See ``docs/barrier.md``.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import txaio
from twisted.internet import defer
from twisted.python.failure import Failure

from coord import errors
from coord.errors import ParticipantLost, TooManyParticipants
from coord.keyset import KeySet
from coord.recipes._core import OwnedKey, Phase, kvs, unless_session_ends
from coord.recipes._loop import (
    Shared,
    check_name,
    check_timeout,
    positive_int,
    sleep,
    start,
    with_timeout,
)
from coord.recipes._wait import KeyGone, watch
from coord.session import Session
from coord.txn import CompCreated, CompModified, OpDel, OpGet, OpSet, Transaction
from coord.types import Event, EventType, Header, KeyValue

if TYPE_CHECKING:
    from coord.client import Client

__all__ = ["Barrier", "DoubleBarrier", "DoubleBarrierState"]

log = txaio.make_logger()  # type: ignore[attr-defined]  # set by txaio.use_twisted()

# Pauses between re-reads after a watch ended or a read failed (etcd unreachable): they
# grow from RETRY_MIN to RETRY_MAX, and start again after a wait that got an answer.
RETRY_MIN = 0.05
RETRY_MAX = 1.0

# The largest DoubleBarrier count accepted (a bound on a typo, not on etcd: the enter
# transaction reads at most `count` waiter keys).
MAX_COUNT = 2**31 - 1


class _Ended(Exception):
    """The watch stopped before the proof came (closed, cancelled by etcd, failed)."""


# Read: returns (revision of the read, None if done else the test of each event).  The
# test returns True once an event proves the wait over, and may raise to end it.
Read = Callable[[], Awaitable[tuple[int, "Callable[[Event], bool] | None"]]]


async def _until(client: Client, keys: list[KeySet], read: Read,
                 filters: list[str] | None = None) -> int:
    """Read; until the read says done, watch ``keys`` and apply its event test; read
    again whenever the watch ends without the proof.  Returns the revision of the read
    or event that proved it.

    The watch is created at the store's current revision (as ``_wait.wait_fewer``: a
    watch created behind the head is served by etcd's ~100 ms catch-up loop); when it
    was created after our read's revision, the read is made again so that nothing in
    between is missed.

    Raises:
        what ``read`` or an event test raises; EtcdError for a refusal that reading
        again cannot cure (PermissionDenied...); Unavailable once our client is closed.
        Otherwise Unavailable, Timeout, Compacted and a watch that ends are retried:
        only a read or an event ends the wait.
    """
    pause = RETRY_MIN
    while True:
        try:
            revision, test = await read()
        except (errors.Unavailable, errors.Timeout) as exc:
            if client.closed:
                raise  # our own client was closed: no read will ever answer
            # etcd unreachable (killed, paused, partitioned): read again later.
            log.info("barrier read failed ({error}); again in {pause} s", error=exc,
                     pause=pause)
            await sleep(client.reactor, pause)
            pause = min(pause * 2, RETRY_MAX)
            continue
        if test is None:
            return revision
        try:
            return await _watch_once(client, keys, revision, test, read, filters)
        except (_Ended, errors.Compacted, errors.Unavailable) as exc:
            if client.closed:
                raise errors.Unavailable(f"client closed while waiting ({exc})") from None
            # Not a release: a watch that ends proves nothing (Go's WaitEvents takes a
            # closed channel for the event).  Read again, watch again.
            log.info("barrier watch ended ({error}); reading again", error=exc)
            await sleep(client.reactor, pause)
            pause = min(pause * 2, RETRY_MAX)


async def _watch_once(client: Client, keys: list[KeySet], read_revision: int,
                      test: Callable[[Event], bool], read: Read,
                      filters: list[str] | None) -> int:
    done: defer.Deferred[int] = defer.Deferred()
    tests = [test]  # the first read's test, and the re-read's (see `created`)
    seen: list[Event] = []  # events before the re-read's answer, to replay into its test
    recording = True

    def apply(check: Callable[[Event], bool], event: Event) -> None:
        try:
            if check(event) and not done.called:
                done.callback(event.revision)
        except Exception as exc:
            if not done.called:
                done.errback(exc)

    def on_change(event: Event) -> None:
        if done.called:
            return
        if recording:
            seen.append(event)
        for check in list(tests):
            apply(check, event)

    def ended(result: Any) -> None:
        if done.called:
            return
        if isinstance(result, Failure):
            if isinstance(result.value, errors.CoordError) and not isinstance(
                    result.value, (errors.Compacted, errors.Unavailable)):
                done.errback(_Ended(str(result.value)))
            else:
                done.errback(result)
        else:
            done.errback(_Ended("the watch was closed"))

    running = watch(client, keys, on_change, filters=filters)
    watcher = running.watcher
    running.addBoth(ended)
    check: defer.Deferred[Any] | None = None

    def created(_: Any) -> None:
        nonlocal check, recording
        if done.called or watcher.revisions[0] - 1 <= read_revision:
            recording = False
            seen.clear()
            return  # the watch covers everything after our read

        def reread(found: tuple[int, Any]) -> None:
            nonlocal recording
            revision, again = found
            recording = False
            if done.called:
                return
            if again is None:
                done.callback(revision)
                return
            # What the re-read saw includes every event up to its revision; the later
            # ones the watch delivered meanwhile are replayed into its test.
            for event in seen:
                if event.revision > revision:
                    apply(again, event)
            seen.clear()
            tests.append(again)

        def failed(f: Failure) -> None:
            if not done.called and not f.check(defer.CancelledError):
                done.errback(f)

        check = start(read())
        check.addCallbacks(reread, failed)

    watcher.ready.addCallbacks(created, lambda _: None)  # a failure comes to `ended`
    try:
        return await done
    finally:
        # The watch is closed on the next reactor turn: the waiter returns first (closing
        # a stream is a socket's teardown, not part of the wake-up; events after `done`
        # are ignored meanwhile).
        client.reactor.callLater(0, watcher.cancel)
        if check is not None and not check.called:
            check.cancel()


def _timed(d: defer.Deferred[Any], timeout: float | None, client: Client,
           message: str) -> defer.Deferred[Any]:
    return with_timeout(d, timeout, client.reactor, message)


class Barrier:
    """A barrier named ``name``: held while the key ``name`` exists.

    Args:
        client: a :class:`coord.Client`.
        name: the barrier's key (bytes or str), exactly as Go's ``NewBarrier(client, name)``.
        session: a :class:`coord.session.Session` (optional): ``hold()`` then writes the
            key under its lease, so the barrier is released when the lease ends (a
            holder that crashes releases it after its TTL).  Without it the key has no
            lease (as Go's): it stays until ``release()``.

    Raises:
        TypeError: ``client`` is not a Client, ``session`` not a Session, ``name`` not
            bytes or str.
        InvalidArgument: an empty ``name``; a ``session`` of another client.
    """

    def __init__(self, client: Client, name: bytes | str, session: Session | None = None
                 ) -> None:
        from coord.client import Client

        if not isinstance(client, Client):
            raise TypeError(f"a Barrier needs a coord.Client, not {type(client).__name__}")
        if session is not None and not isinstance(session, Session):
            raise TypeError(f"session must be a coord.recipes.Session or None, not "
                            f"{type(session).__name__}")
        if session is not None and session.client is not client:
            raise errors.InvalidArgument("session must be a session of the same client")
        self.client = client
        self.session = session
        self.name = self.key = check_name(name, "Barrier")

    def __repr__(self) -> str:
        lease = f" lease={self.session.lease_id:#x}" if self.session is not None else ""
        return f"<Barrier {self.name!r}{lease}>"

    def hold(self) -> defer.Deferred[bool]:
        """Create the barrier's key if it does not exist (one transaction: create
        revision == 0), under the session's lease if there is one.

        With a session, a write whose answer never came is settled: the same
        transaction is sent again until etcd answers (it applies at most once while the
        key exists), and a key found there with our session's lease is ours.  That
        lasts at most as long as the session (then SessionLost); cancelling the
        Deferred stops it.

        Returns:
            Deferred firing with True if this call created the key, False if the
            barrier was already held (by anyone: its key is left as it is).

        Raises:
            SessionLost: the session has ended (nothing sent) or its lease is gone.
            OutcomeUnknown: without a session only: the answer never came, and the key
                may or may not have been written.  A later ``hold()`` returns False
                either way (an empty key without a lease names no holder): call
                ``release()`` if you meant to hold it, or hold with ``session=``.
        """
        lease = self.session.lease_id if self.session is not None else None
        txn = Transaction(compare=[CompCreated(self.key, "==", 0)],
                          success=[OpSet(self.key, b"", lease=lease)],
                          failure=[OpGet(self.key, keys_only=True)])

        async def go() -> bool:
            pause, resent = RETRY_MIN, False
            while True:
                if self.session is not None:
                    self.session.check()
                try:
                    await self.client.submit(txn)
                    return True
                except errors.Failed as failed:
                    found = kvs(failed.responses[0])
                    # A resend finding our lease's key: an earlier send of ours applied.
                    return bool(resent and found and found[0].lease == lease)
                except errors.LeaseNotFound as gone:
                    if self.session is None or isinstance(gone, errors.SessionLost):
                        raise
                    raise self.session.lease_gone(gone) from None
                except (errors.Unavailable, errors.Timeout) as exc:
                    if self.session is None:
                        raise
                    # Sending the same transaction again is safe: "no key" lets it
                    # apply at most once while the key lives, and the key carries our
                    # lease if it was ours.
                    log.warn("{barrier}: hold failed ({error}); sending it again",
                             barrier=self, error=exc)
                    resent = True
                    await sleep(self.client.reactor, pause)
                    pause = min(pause * 2, RETRY_MAX)

        return start(go())

    def release(self) -> defer.Deferred[bool]:
        """Delete the barrier's key, whoever holds it (as Go's Release): every waiter
        returns.

        Returns:
            Deferred firing with True if a key was deleted, False if it was not held.

        Raises:
            OutcomeUnknown: the answer never came (``release()`` again is safe, but would
                also delete a hold made in between).
        """

        async def go() -> bool:
            return bool((await self.client.delete(self.key)).deleted)

        return start(go())

    def wait(self, timeout: float | None = None) -> defer.Deferred[int]:
        """Wait until the barrier is not held: a read finds no key, or a DELETE of it is
        seen.  A closed watch, a compaction or an unreachable etcd leads to reading again
        (never to a release).

        Args:
            timeout: seconds to wait at most (None or infinity: no limit; 0: one read --
                Timeout if held).

        Returns:
            Deferred firing with the revision at which the barrier was seen released.

        Raises:
            Timeout: still held after ``timeout`` seconds (the message names the barrier).
            TypeError, InvalidArgument: a bad ``timeout`` (raised at once).
            EtcdError: etcd refused a read (PermissionDenied...).
            Unavailable: the client was closed (never a release).

        Cancelling the Deferred stops the wait (its watch is closed).
        """
        timeout = check_timeout(timeout)
        key = self.key

        def released(event: Event) -> bool:
            return event.type is EventType.DELETE

        async def read() -> tuple[int, Callable[[Event], bool] | None]:
            result = await self.client.get(key, keys_only=True)
            return result.header.revision, (released if result.kvs else None)

        message = f"barrier {self.name!r} still held after {timeout} s"
        if timeout == 0:

            async def once() -> int:
                revision, held = await read()
                if held is not None:
                    raise errors.Timeout(message)
                return revision

            return start(once())
        return _timed(start(_until(self.client, [KeySet(key)], read, ["noput"])), timeout,
                      self.client, message)


class DoubleBarrierState(enum.Enum):
    """A :class:`DoubleBarrier` participant's state: IDLE (not entered, or left);
    ENTERING (our waiter key is written, or being written; waiting); ENTERED; LOST (was
    entered; our key was deleted or the session ended)."""

    IDLE = "IDLE"  # not entered (or left)
    ENTERING = "ENTERING"  # our waiter key is written (or being written); waiting
    ENTERED = "ENTERED"
    LOST = "LOST"  # was entered; our key was deleted or the session ended


_STATES = {Phase.IDLE: DoubleBarrierState.IDLE, Phase.WAITING: DoubleBarrierState.ENTERING,
           Phase.HELD: DoubleBarrierState.ENTERED, Phase.LOST: DoubleBarrierState.LOST}


class DoubleBarrier(OwnedKey):
    """``count`` participants meet at ``name``: :meth:`enter` returns once ``count`` have
    entered, :meth:`leave` once all have left.

    Our waiter key is ``name/waiters/<lease hex>`` under ``session``'s lease (so one
    session takes part once: use one session per participant); the ``count``-th to
    enter writes ``name/ready`` (no lease).  A participant that crashes drops out when
    its lease ends (see docs/barrier.md "Failures").

    Args:
        session: a :class:`coord.session.Session`.
        name: the barrier's name (bytes or str).
        count: how many participants enter (an int, 1 or more).  All participants must
            agree on it (it is not stored in etcd).

    Attributes:
        name: the barrier's name (bytes).
        key: our waiter key, ``name/waiters/<lease hex>``.
        ready: the key ``name/ready``.
        token: our waiter key's create revision once entered; None before.
        opened: the mod revision of the ``ready`` write that let us in.
    """

    kind = b"waiters/"
    blocked_by = b"waiters/"
    lost_error = ParticipantLost

    def __init__(self, session: Session, name: bytes | str, count: int) -> None:
        count = positive_int("count", count, maximum=MAX_COUNT)
        super().__init__(session, name, permits=count)
        self.count = count
        self.ready = self.prefix + b"ready"
        self.opened: int | None = None
        self._seen: list[KeyValue] = []

    def __repr__(self) -> str:
        token = f" token={self.token}" if self._phase in (Phase.HELD, Phase.LOST) else ""
        return f"<DoubleBarrier {self.name!r} count={self.count} {self.state.name}{token}>"

    @property
    def state(self) -> DoubleBarrierState:
        """IDLE, ENTERING, ENTERED or LOST (see :class:`DoubleBarrierState`)."""
        return _STATES[self._phase]

    # entering -----------------------------------------------------------------------------

    def enter(self, timeout: float | None = None) -> defer.Deferred[DoubleBarrier]:
        """Write our waiter key and wait until ``count`` participants have entered.

        Args:
            timeout: seconds to wait at most (None or infinity: no limit; more than 0).

        Returns:
            Deferred firing with this DoubleBarrier once ``name/ready`` was written after
            our key (by us, if we are the ``count``-th, or by the one who is).

        Raises:
            TooManyParticipants: ``count`` keys were under ``name/waiters/`` before ours
                (our key is removed).
            Timeout: fewer than ``count`` entered in time; our waiter key is removed.
                (If the ``count``-th entered at that very moment, the others may have
                passed counting us: they then do not wait for us in ``leave``.)
            SessionLost: the session ended or its lease is gone.
            ParticipantLost: our waiter key was deleted by someone else meanwhile.
            InvalidArgument: already entering or entered, another object of this
                session and name is in use, or a bad ``timeout`` (raised at once).
            TypeError: ``timeout`` is not a number.

        Cancelling the Deferred stops waiting and removes our waiter key.  Neither a
        Timeout nor a cancel writes ``ready``; a ``ready`` we wrote before stays, and
        lets no later round in (it is older than their keys).
        """
        timeout = check_timeout(timeout, zero_ok=False)

        async def take() -> DoubleBarrier:
            self.opened = None
            await self._obtain(lambda: self._enqueue(b""))
            return self

        return self._run(take, timeout, f"double barrier {self.name!r}: fewer than "
                         f"{self.count} entered within {timeout} s")

    def _free(self, first: list[KeyValue], token: int) -> bool:
        # Never free at once: _wait decides (too many, the count-th, or wait for ready).
        self._seen = first
        return False

    async def _wait(self, token: int) -> Any:
        """Too many before us, or we are the count-th (write ready), or wait for it."""
        first, count = self._seen, self.count
        if len(first) >= count and first[count - 1].create_revision < token:
            raise TooManyParticipants(
                f"double barrier {self.name!r} has its {count} participants already")
        guard = CompCreated(self.key, "==", token)
        if len(first) >= count:
            # ``count`` keys are in and ours is the count-th (a later one was refused
            # above): open the barrier, if our key is still there.
            return await self._open(token, guard)
        return await unless_session_ends(self.session, start(self._wait_ready(token, guard)))

    async def _open(self, token: int, guard: CompCreated) -> Header:
        """Write ``ready`` (we are the count-th), if our key is still there.

        A write whose answer never came is sent again until etcd answers: it also
        compares that ``ready`` was not written since our key was created, so it
        applies at most once, and a ``ready`` found written after our key is ours (an
        earlier send).  Giving up instead would leave the others either through
        without us, or waiting for good."""
        txn = Transaction(compare=[guard, CompModified(self.ready, "<", token)],
                          success=[OpSet(self.ready, b"")],
                          failure=[OpGet(self.key, keys_only=True),
                                   OpGet(self.ready, keys_only=True)])
        pause = RETRY_MIN
        while True:
            self.session.check()
            try:
                result = await self.client.submit(txn)
                self.opened = result.header.revision
                return result.header
            except errors.Failed as failed:
                mine, ready = kvs(failed.responses[0]), kvs(failed.responses[1])
                if not mine or mine[0].create_revision != token:
                    raise KeyGone(f"{self.key!r} was deleted") from None
                self.opened = ready[0].mod_revision  # (written after our key: open)
                return failed.header
            except (errors.Unavailable, errors.Timeout) as exc:
                log.warn("{barrier}: writing {ready!r} failed ({error}); sending it again",
                         barrier=self, ready=self.ready, error=exc)
                await sleep(self.client.reactor, pause)
                pause = min(pause * 2, RETRY_MAX)

    async def _wait_ready(self, token: int, guard: CompCreated) -> Any:
        read_ready = Transaction(compare=[guard], success=[OpGet(self.ready)])
        headers: dict[int, Any] = {}

        def opens(event: Event) -> bool:
            if event.kv.key == self.key:
                if event.type is EventType.DELETE or event.kv.create_revision != token:
                    raise KeyGone(f"{self.key!r} was deleted at revision {event.revision}")
                return False
            if event.type is EventType.PUT and event.kv.mod_revision > token:
                self.opened = event.kv.mod_revision
                return True
            return False

        async def read() -> tuple[int, Callable[[Event], bool] | None]:
            try:
                result = await self.client.submit(read_ready)
            except errors.Failed:
                raise KeyGone(f"{self.key!r} was deleted") from None
            headers[result.header.revision] = result.header
            found = kvs(result.responses[0])
            if found and found[0].mod_revision > token:
                self.opened = found[0].mod_revision
                return result.header.revision, None
            return result.header.revision, opens

        revision = await _until(self.client, [KeySet(self.ready), KeySet(self.key)], read)
        # (A proof by an event has no header of its own: its revision is as good.)
        return headers.get(revision) or Header(revision=revision)

    # leaving ------------------------------------------------------------------------------

    def leave(self, timeout: float | None = None) -> defer.Deferred[None]:
        """Delete our waiter key and wait until every participant of our round has left
        (no waiter key created before ``ready`` remains).

        Args:
            timeout: seconds to wait at most (None or infinity: no limit; more than 0).

        Returns:
            Deferred firing with None once all have left.  The last to leave also
            deletes ``ready`` (guarded on its mod revision).

        Raises:
            Timeout: some are still in after ``timeout`` seconds.  Our key is deleted
                all the same (we have left; the others' leave does not wait for us).
            InvalidArgument: not entered (raised at once); a bad ``timeout``.
            TypeError: ``timeout`` is not a number.

        Cancelling the Deferred stops the wait; our key's delete goes on.  A lost
        participant (LOST: its key went with its lease) may leave too: it only waits.
        """
        timeout = check_timeout(timeout, zero_ok=False)
        if self._phase not in (Phase.HELD, Phase.LOST) or self.opened is None:
            raise errors.InvalidArgument(f"{self!r} has not entered: nothing to leave")
        token, opened = self.token, self.opened
        assert token is not None
        self._stop(Phase.IDLE)
        self._observers = []
        busy = self._busy = Shared(start(self._depart(token, opened)))

        async def go() -> None:
            remaining = await busy.wait()
            if remaining:
                await self._others_left(opened)

        return _timed(start(go()), timeout, self.client, f"double barrier {self.name!r}: "
                      f"not all have left within {timeout} s")

    async def __aenter__(self) -> DoubleBarrier:
        """``async with DoubleBarrier(...) as phase:`` enters (no timeout) ..."""
        return await self.enter()

    async def __aexit__(self, *exc: object) -> None:
        """... and leaves when the block ends, however it ends (no timeout)."""
        await self.leave()

    def _round(self, opened: int) -> OpGet:
        """Our round's waiter keys: those created before ``ready`` was written."""
        return OpGet(KeySet(self._blockers, prefix=True), keys_only=True,
                     max_create_revision=opened - 1)

    async def _depart(self, token: int, opened: int) -> int:
        """Delete our key (if still ours) and count those of our round left; the last
        deletes ``ready``.  Returns how many are left (-1: unknown, the session ended
        while etcd could not be reached)."""
        txn = Transaction(compare=[CompCreated(self.key, "==", token)],
                          success=[OpDel(self.key), self._round(opened)],
                          failure=[self._round(opened)])
        pause = RETRY_MIN
        while True:
            try:
                result = await self.client.submit(txn)
                left = kvs(result.responses[1])
                break
            except errors.Failed as failed:  # our key was gone already (lease, by hand)
                left = kvs(failed.responses[0])
                break
            except (errors.Unavailable, errors.Timeout) as exc:
                if self.client.closed:
                    raise
                if not self.session.alive:
                    # Our key goes with the lease anyway; whether others remain, the
                    # wait's own reads will tell.
                    return -1
                # Sending the same transaction again is safe: its compare (our key with
                # our create revision) makes it delete at most once; a second finds the
                # key gone and only reads.
                log.info("{owner}: leaving failed ({error}); again", owner=self, error=exc)
                await sleep(self.client.reactor, pause)
                pause = min(pause * 2, RETRY_MAX)
        if not left:
            # The last of our round: ``ready`` goes, unless a later round wrote it again.
            try:
                await self.client.submit(Transaction(
                    compare=[CompModified(self.ready, "==", opened)],
                    success=[OpDel(self.ready)]))
            except errors.Failed:
                pass
            except errors.CoordError as exc:
                # Harmless if it stays: a later round's entrants ignore an older ready.
                log.info("{owner}: could not delete {ready!r} ({error}); it is harmless",
                         owner=self, ready=self.ready, error=exc)
        return len(left)

    async def _others_left(self, opened: int) -> None:
        """Wait until no waiter key created before ``opened`` remains."""
        async def read() -> tuple[int, Callable[[Event], bool] | None]:
            result = await self.client.get(KeySet(self._blockers, prefix=True),
                                           keys_only=True, max_create_revision=opened - 1)
            names = {kv.key for kv in result.kvs}
            if not names:
                return result.header.revision, None

            def gone(event: Event) -> bool:
                names.discard(event.kv.key)
                return not names

            return result.header.revision, gone

        await _until(self.client, [KeySet(self._blockers, prefix=True)], read, ["noput"])

