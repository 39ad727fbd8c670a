"""The owned-key core: the one lifecycle every key-holding recipe is a thin layer on.

A recipe object (a Lock, ReadLock, WriteLock, Semaphore or Election) owns one key of its
session's lease, ``name + "/" + kind + "%x" % lease_id``, and goes through:

1. **enqueue** -- one transaction writes our key unless it exists (a key this lease left
   behind is reused, its value and lease set, as Go's Mutex and Campaign do) and reads
   the first ``permits`` keys under the blockers' prefix (so an uncontended take is one
   round trip);
2. **wait** -- until fewer than ``permits`` blockers created before ours remain
   (:func:`coord.recipes._wait.wait_fewer`), stopped at once if the session ends or
   our key is deleted;
3. **prove** -- the read that ends the wait is guarded on our key's create revision:
   success is proven inside a transaction, never assumed;
4. **hold** -- ``token`` is our create revision (a fencing token), ``guard()`` the
   comparison that proves it in a write; ``lost`` fires if our key goes: with
   :class:`SessionLost` when the lease is gone (expired, revoked), with the recipe's
   own error (LockLost, LeadershipLost) when someone deleted the key while the lease
   lives;
5. **let go** -- a delete guarded on our create revision (idempotent; a late one never
   deletes a newer key); a timed-out, cancelled or failed take removes its key.

And the rule of one live object per key: two objects of one session and name would share
a key, and one's release would delete the other's hold.
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import txaio
from twisted.internet import defer

from coord import errors
from coord.errors import SessionLost
from coord.keyset import KeySet
from coord.recipes._loop import (
    Shared,
    bounded,
    check_name,
    sleep,
    start,
    with_timeout,
)
from coord.recipes._wait import KeyGone, wait_fewer, watch
from coord.session import Session
from coord.txn import CompCreated, CompLease, OpDel, OpGet, OpSet, Transaction
from coord.types import Event, EventType, Header, KeyValue, Range

__all__ = ["Enqueue", "NotFree", "OwnedKey", "Phase", "kvs", "unless_session_ends"]

log = txaio.make_logger()  # type: ignore[attr-defined]  # set by txaio.use_twisted()

# How long after giving up on a write of our key (its answer never came) we watch for it
# being applied after all, to delete the key it creates (see OwnedKey._sweep_late_write).
LATE_WRITE_WINDOW = 60.0

# How long the check "is our lease still there?" may take when our key is found deleted
# (after it, the loss is reported as a deletion).
LEASE_CHECK_TIMEOUT = 2.0


class Phase(enum.Enum):
    IDLE = "IDLE"
    WAITING = "WAITING"  # our key is queued behind others (or being written)
    HELD = "HELD"
    LOST = "LOST"  # was held; our key was deleted or the session ended


class NotFree(Exception):
    """A take that was not to wait found the blockers there (our key is removed)."""


async def unless_session_ends(session: Session, waiting: defer.Deferred[Any]) -> Any:
    """Await ``waiting``, cancelled at once if ``session`` ends.

    Raises:
        SessionLost: the session ended (before or while waiting).
        what ``waiting`` raises (CancelledError if cancelled otherwise).
    """
    ended = session.lost
    ended.addCallbacks(lambda _: waiting.cancel(), lambda _: None)
    try:
        return await waiting
    except defer.CancelledError:
        session.check()  # raises SessionLost if that is why the wait stopped
        raise
    finally:
        ended.cancel()


def kvs(response: Any) -> list[KeyValue]:
    """The key-values of a transaction's OpGet response."""
    assert isinstance(response, Range)
    return response.kvs


Enqueue = Callable[[], Awaitable[tuple[int, list[KeyValue], Header]]]

_owners: weakref.WeakValueDictionary[tuple[int, bytes], OwnedKey] = \
    weakref.WeakValueDictionary()


class OwnedKey:
    """One recipe key of ``session``'s lease: ``name/<kind><lease hex>``, held when fewer
    than ``permits`` keys under ``name/<blockers>`` were created before it.

    Attributes:
        session: the session whose lease our key has.
        name: the name (bytes).
        prefix: ``name/``.
        key: our key, ``name/<kind><lease hex>``.
        token: our key's create revision once held (kept after a release or loss, so a
            stale ``guard()`` keeps failing); None before.
        revision: the store revision at which holding was proven.
    """

    kind: ClassVar[bytes] = b""  # our key is name/<kind><lease hex>
    blocked_by: ClassVar[bytes] = b""  # ... held when few keys under name/<blocked_by>
    lost_error: ClassVar[type[errors.CoordError]] = errors.CoordError
    watch_while_held: ClassVar[bool] = False  # else only once `lost` is read

    def __init__(self, session: Session, name: bytes | str, permits: int = 1) -> None:
        if not isinstance(session, Session):
            raise TypeError(f"a {type(self).__name__} needs a coord.session.Session (from "
                            f"Session.create(client)), not {type(session).__name__}")
        self.session = session
        self.client = session.client
        self.name = check_name(name, type(self).__name__)
        self.prefix = self.name + b"/"
        self.key = self.prefix + self.kind + b"%x" % session.lease_id
        self.token: int | None = None
        self.revision: int | None = None
        self._blockers = self.prefix + self.blocked_by
        self._permits = permits
        # The first keys that may hold (by create revision): read in the enqueue
        # transaction, so the uncontended path is one round trip.
        self._first = OpGet(KeySet(self._blockers, prefix=True), sort_order="ascend",
                            sort_target="create", limit=permits)
        self._phase = Phase.IDLE
        self._pending: defer.Deferred[Any] | None = None  # the take under way
        self._attempt: Shared | None = None  # its write: what to clean up if it stops
        self._busy: Shared | None = None  # a release or clean-up still running
        self._lost_reason: errors.CoordError | None = None
        self._observers: list[defer.Deferred[Any]] = []
        self._session_lost: defer.Deferred[Any] | None = None
        self._watch: Any = None
        self._sweep: Any = None  # a watch for a late write (see _sweep_late_write)
        self._sweep_timer: Any = None

    @property
    def active(self) -> bool:
        """Whether this object waits, holds, or still cleans up."""
        return (self._phase in (Phase.WAITING, Phase.HELD)
                or (self._busy is not None and not self._busy.done))

    @property
    def _holding(self) -> bool:
        return self._phase is Phase.HELD and self.session.alive

    # taking -------------------------------------------------------------------------------

    def _run(self, take: Callable[[], Awaitable[Any]], timeout: float | None,
             message: str) -> defer.Deferred[Any]:
        """Start ``take()`` (a coroutine running :meth:`_obtain`) with a timeout."""
        if self._phase in (Phase.WAITING, Phase.HELD):
            raise errors.InvalidArgument(f"{self!r} is already {self._phase.name.lower()}")
        other = _owners.get((id(self.client), self.key))
        if other is not None and other is not self and other.active:
            raise errors.InvalidArgument(
                f"{other!r} of the same session already uses {self.key!r}: use one object "
                "per name and session (or another session)")
        if other is not None:
            other._stop_sweep()  # a take of this key reuses a late write's key
        self._stop_sweep()
        _owners[(id(self.client), self.key)] = self
        self._phase = Phase.WAITING
        self._lost_reason = None
        self._pending = start(take())
        return with_timeout(self._pending, timeout, self.client.reactor, message)

    async def _obtain(self, enqueue: Enqueue, wait: bool = True) -> None:
        """Enqueue our key, wait for the blockers before it (unless not ``wait``: then
        NotFree), and hold once proven.  On any failure or cancel our key is removed."""
        self._attempt = None
        token = None
        try:
            if self._busy is not None:
                await self._busy.wait()  # a release or clean-up of ours still running
            self.session.check()
            token, first, header = await enqueue()
            if not self._free(first, token):
                if not wait:
                    raise NotFree(f"{self.name!r} is not free")
                header = await self._wait(token)
            self.session.check()
        except GeneratorExit:
            # The coroutine is being closed (the interpreter exits, its Deferred was
            # garbage-collected): no clean-up I/O now -- awaiting here would make Python
            # report "coroutine ignored GeneratorExit".  The lease ends our key.
            raise
        except BaseException as exc:
            self._phase = Phase.IDLE
            self._pending = None
            if self._attempt is not None:
                busy = self._busy = Shared(start(self._remove(self._attempt, token)))

                async def removed() -> None:
                    await busy.wait()

                # At most CLEANUP_GRACE, as for a timed take: a hung etcd must not hold
                # a take that had no timer (try_acquire, timeout=0, None) until the
                # session's TTL.  The removal goes on; a later take or release waits.
                await bounded(self.client.reactor, removed())
            error = await self._failure(exc)
            if error is exc:
                raise
            raise error from None
        self._pending = None
        self._hold(token, header.revision)

    def _enqueue_txn(self, value: bytes, unless: Any = None) -> Transaction:
        """Write our key with ``value`` unless ``unless`` (default: our key exists) holds;
        read the first blockers either way, and our key if not written."""
        return Transaction(
            compare=[unless or CompCreated(self.key, "==", 0)],
            success=[OpSet(self.key, value, lease=self.session.lease_id), self._first],
            failure=[OpGet(self.key), self._first])

    async def _enqueue(self, value: bytes, txn: Transaction | None = None
                       ) -> tuple[int, list[KeyValue], Header]:
        """Write our key with ``value`` (by ``txn``, default :meth:`_enqueue_txn`) and read
        the first blockers.  A key of ours already there is reused, its value and lease
        set if they differ (Go's Campaign); with ``txn`` writing only into an empty
        prefix, token 0 says nothing was written."""
        self._attempt = Shared(self.client.submit(txn or self._enqueue_txn(value)))
        try:
            result = await self._attempt.wait()
            return result.header.revision, kvs(result.responses[1]), result.header
        except errors.Failed as failed:
            # (Cancelling stops our wait, not the write: its outcome says what to clean.)
            mine, first, header = kvs(failed.responses[0]), kvs(failed.responses[1]), \
                failed.header
            if not mine:
                self._attempt = None
                return 0, first, header
            token = mine[0].create_revision
            if mine[0].value != value or mine[0].lease != self.session.lease_id:
                # (A key written there by hand, without our lease, gets it: it cannot
                # outlive our session.)
                header = (await self.client.submit(self._put(token, value))).header
            return token, first, header

    def _put(self, token: int, value: bytes) -> Transaction:
        """Write ``value`` to our key if it is still the one created at ``token``."""
        return Transaction(compare=[CompCreated(self.key, "==", token)],
                           success=[OpSet(self.key, value, lease=self.session.lease_id)])

    def _free(self, first: list[KeyValue], token: int) -> bool:
        """Whether fewer than ``permits`` of the ``first`` blockers came before our key."""
        return token > 0 and (len(first) < self._permits
                              or first[-1].create_revision >= token)

    async def _wait(self, token: int) -> Header:
        """Wait for the blockers before our key; stop as soon as the session ends (Go's
        Mutex and Campaign go on waiting with a dead session)."""
        return await unless_session_ends(self.session, start(wait_fewer(
            self.client, self._blockers, token - 1, self._permits, self.key, token)))

    async def _failure(self, exc: BaseException) -> BaseException:
        """The error a failed take raises: why our key went, if it did."""
        if isinstance(exc, (errors.Failed, KeyGone)):  # a guard failed: our key is gone
            return await self._gone_reason("our waiting key was deleted")
        if isinstance(exc, errors.LeaseNotFound) and not isinstance(exc, SessionLost):
            return self.session.lease_gone(exc)  # etcd refused our key's lease
        return exc

    async def _gone_reason(self, message: str) -> errors.CoordError:
        """SessionLost if our lease is gone with our key (expired, revoked: the session
        ends at once), else ``lost_error`` (someone deleted the key)."""
        try:
            self.session.check()
            await self.session.lease.remaining(timeout=LEASE_CHECK_TIMEOUT)
        except errors.LeaseNotFound as gone:
            return self.session.lease_gone(gone)
        except errors.CoordError:
            pass  # cannot tell: it was deleted, as far as we know
        return self.lost_error(f"{self.key!r}: {message}")

    async def _remove(self, attempt: Shared, token: int | None) -> None:
        """Remove our key after a take that failed, timed out or was cancelled.

        An attempt etcd refused (PermissionDenied, LeaseNotFound, "no leader") wrote
        nothing: nothing to delete (and the delete would most likely be refused too)."""
        if token is None:
            try:
                token = (await attempt.wait()).header.revision
            except errors.Failed as failed:
                mine = kvs(failed.responses[0])
                if not mine:
                    return
                token = mine[0].create_revision
            except errors.EtcdError as refused:
                # etcd's answer to the transaction: not applied, unless it is an
                # unavailability that may come after the proposal (errors.for_write).
                if not isinstance(refused, errors.OutcomeUnknown):
                    return
            except Exception:
                pass  # outcome unknown: delete whatever key our lease has there
        if token is None:
            # The write may still be applied later (held in a proxy, a socket buffer,
            # etcd's queue): watch for it from the delete's revision on.
            revision = await self._delete(None)
            if revision is not None:
                self._sweep_late_write(revision)
            return
        await self._delete(token)

    async def _delete(self, token: int | None) -> int | None:
        """Delete our key if it is the one created at ``token`` (with no token: if it
        carries our lease).  Retried while the session lives: after it, the lease's end
        deletes the key anyway.  Returns the revision at which the key was known gone
        (None if the delete was given up)."""
        guard: Any = (CompCreated(self.key, "==", token) if token is not None
                      else CompLease(self.key, "==", self.session.lease_id))
        txn = Transaction(compare=[guard], success=[OpDel(self.key)])
        pause = 0.05
        while True:
            try:
                return (await self.client.submit(txn)).header.revision
            except errors.Failed as failed:
                return failed.header.revision  # already gone (or not ours)
            except (errors.Unavailable, errors.Timeout) as exc:
                if not self.session.alive:
                    return None
                log.warn("{owner}: deleting {key!r} failed ({error}); retrying",
                         owner=self, key=self.key, error=exc)
                await sleep(self.client.reactor, pause)
                pause = min(pause * 2, 1.0)
            except errors.EtcdError as exc:
                # etcd refused (permission denied...): its word, not a bug, so no
                # traceback.  The key goes with the session's lease anyway.
                log.warn("{owner}: etcd refused to delete {key!r} ({error}); it goes when "
                         "the session's lease ends", owner=self, key=self.key, error=exc)
                return None
            except Exception:
                log.failure("{owner}: deleting {key!r} failed", owner=self, key=self.key)
                return None

    def _sweep_late_write(self, revision: int) -> None:
        """For LATE_WRITE_WINDOW seconds after ``revision``, delete our key if a write
        whose outcome we did not learn creates it (with our lease) after all, unless a
        take of this key starts meanwhile (it then reuses the key, as Go's Mutex does).
        Go's Mutex leaves such a key in the queue until the session ends, blocking
        every other contender."""
        self._stop_sweep()

        def on_change(event: Event) -> None:
            if (self._sweep is running and event.type is EventType.PUT
                    and event.kv.lease == self.session.lease_id and self.session.alive):
                log.info("{owner}: a write given up on was applied late; deleting {key!r}",
                         owner=self, key=self.key)
                start(self._delete(event.kv.create_revision))

        running = watch(self.client, KeySet(self.key), on_change, start_revision=revision + 1)
        running.addErrback(lambda _: None)  # (a watch that cannot go on just stops)
        self._sweep = running
        self._sweep_timer = self.client.reactor.callLater(LATE_WRITE_WINDOW, self._stop_sweep)

    def _stop_sweep(self) -> None:
        running, self._sweep = self._sweep, None
        if running is not None:
            running.cancel()
        timer, self._sweep_timer = self._sweep_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    # holding ------------------------------------------------------------------------------

    def _hold(self, token: int, revision: int) -> None:
        self._phase = Phase.HELD
        self.token, self.revision = token, revision
        # The session's end is our loss, reported once the session has told everyone
        # (so a `session.lost` taken after ours has fired when `lost` fires).
        self._session_lost = self.session.lost
        self._session_lost.addCallbacks(
            lambda reason: self.client.reactor.callLater(0, self._lose, reason, token),
            lambda _: None)
        if self.watch_while_held or self._observers:
            self._watch_key()

    def guard(self) -> CompCreated:
        """A comparison that holds only while our key is the one we took.

        Put it in your own transactions -- ``Transaction(compare=[x.guard()],
        success=[...])`` -- so the write happens only if we still hold at the revision
        etcd applies it (it fails with ``Failed`` otherwise).

        Raises:
            InvalidArgument: never held (no token).
        """
        if self.token is None:
            raise self._never_held()
        return CompCreated(self.key, "==", self.token)

    def _never_held(self) -> errors.CoordError:
        return errors.InvalidArgument(f"{self!r} was never acquired: no guard to give")

    @property
    def lost(self) -> defer.Deferred[errors.CoordError]:
        """A new Deferred that fires with the reason if the hold ends without a release:
        :class:`~coord.errors.SessionLost` when the session's lease is gone (expired,
        revoked, or the session closed), else the recipe's loss error
        (:class:`~coord.errors.LockLost`, :class:`~coord.errors.LeadershipLost`: our key
        was deleted while the lease lives).

        It concerns the current hold (or the next one, if read before); a hold ended by
        release or resign never fires it.  Once LOST it has fired already.  Cancelling
        it just stops observing.  Reading it while held watches our key (a Lock watches
        it only then).
        """
        if self._phase is Phase.LOST and self._lost_reason is not None:
            return defer.succeed(self._lost_reason)
        d: defer.Deferred[errors.CoordError] = defer.Deferred(
            lambda d: self._observers.remove(d) if d in self._observers else None)
        self._observers.append(d)
        if self._phase is Phase.HELD and self._watch is None:
            self._watch_key()
        return d

    def _watch_key(self) -> None:
        """Watch our key while held: its deletion, or its re-creation under another
        create revision, is a loss.  A watch that ends by itself is followed by a read,
        and a key still ours is watched again from that read's revision."""
        token = self.token
        assert self.revision is not None

        def on_change(event: Event) -> None:
            if self._watch is running and (event.type is EventType.DELETE
                                           or event.kv.create_revision != token):
                self._stop_watch()
                self._lose_later(f"was deleted at revision {event.revision}", token)

        def ended(_: Any) -> None:
            if self._watch is running and self._phase is Phase.HELD and self.token == token:
                self._watch = None
                self.client.get(self.key).addCallbacks(recheck, lambda f: self._lose(
                    self.lost_error(f"cannot watch {self.key!r} any more: {f.value}"), token))

        def recheck(result: Any) -> None:
            if self._phase is not Phase.HELD or self.token != token:
                return
            if not result.kvs or result.kvs[0].create_revision != token:
                self._lose_later("was deleted", token)
            else:
                self.revision = result.header.revision
                self._watch_key()

        running = watch(self.client, KeySet(self.key), on_change,
                        start_revision=self.revision + 1)
        self._watch = running
        running.addBoth(ended)

    def _lose_later(self, message: str, token: int | None) -> None:
        start(self._gone_reason(message)).addCallback(self._lose, token)

    def _lose(self, reason: Any, token: int | None = None) -> None:
        if self._phase is not Phase.HELD or (token is not None and token != self.token):
            return
        self._stop(Phase.LOST)
        self._lost_reason = reason
        log.warn("{owner} lost: {reason}", owner=self, reason=reason)
        observers, self._observers = self._observers, []
        for d in observers:
            d.callback(reason)

    def _stop_watch(self) -> None:
        running, self._watch = self._watch, None
        if running is not None:
            running.cancel()

    def _stop(self, phase: Phase) -> None:
        self._phase = phase
        self._stop_watch()
        session_lost, self._session_lost = self._session_lost, None
        if session_lost is not None and not session_lost.called:
            session_lost.cancel()

    # letting go ---------------------------------------------------------------------------

    def _let_go(self) -> defer.Deferred[None]:
        """Release (or resign): cancel a take under way (it removes its key), or delete
        our key if it is still the one we took.  Idempotent."""
        if self._phase is Phase.WAITING and self._pending is not None:
            self._pending.cancel()  # fails with CancelledError once its key is removed
        elif self._phase in (Phase.HELD, Phase.LOST):
            token = self.token
            self._stop(Phase.IDLE)
            self._observers = []  # ended as asked: `lost` observers never fire
            self._busy = Shared(self._delete_held(token))
        return self._busy.wait() if self._busy is not None else defer.succeed(None)

    def _delete_held(self, token: int | None) -> defer.Deferred[None]:
        return start(self._delete(token))
