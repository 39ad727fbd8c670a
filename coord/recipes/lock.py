"""Lock: a distributed mutex, etcd's Go ``concurrency.Mutex`` algorithm and key layout.

Each contender writes one key, ``name + "/" + "%x" % lease_id`` (lowercase hex of its
session's lease), with an empty value and the session's lease.  The owner is the key
under ``name/`` with the lowest create revision.  A contender that is not the owner waits
for the deletion of the key created just before its own -- only that one: each release
wakes one waiter, in the order they came (FIFO) -- and checks again until no key before
its own remains.  The same layout as ``client/v3/concurrency/mutex.go``, so a coord lock,
a Go program's Mutex, etcd's lock service and ``etcdctl lock NAME`` exclude each other.

A lease-based lock alone is not mutual exclusion: a holder that pauses (GC, swap,
SIGSTOP, a long request) past its TTL loses the lock without running any code, and
then resumes believing it holds it.  Hence:

* ``lock.token`` -- our key's create revision, strictly increasing across successive
  holders (a fencing token to hand to the protected resource);
* ``lock.guard()`` -- a comparison (our key still exists with that create revision) to
  put in your own transactions, so a write to etcd happens only while the lock is held.

See ``docs/locks.md``.
"""

from __future__ import annotations

import enum
import weakref
from typing import Any

import txaio
from twisted.internet import defer

from coord import errors
from coord._checks import positive_int
from coord.client import MAX_LEASE_TTL
from coord.errors import LockLost, SessionLost
from coord.keyset import KeySet, as_bytes
from coord.recipes._wait import (
    Shared,
    check_timeout,
    delete_own_key,
    detached,
    remove_own_key,
    wait_fewer,
    watch_own_key,
    with_timeout,
)
from coord.session import DEFAULT_TTL, Session
from coord.txn import CompCreated, OpGet, OpSet, Transaction

__all__ = [
    "Lock",
    "LockLost",
    "LockState",
    "RWLock",
    "ReadLock",
    "Semaphore",
    "WriteLock",
    "acquire_lock",
]

log = txaio.make_logger()  # type: ignore[attr-defined]  # set by txaio.use_twisted()


MAX_INT64 = 2**63 - 1


class LockState(enum.Enum):
    UNLOCKED = "UNLOCKED"
    WAITING = "WAITING"  # our key is queued behind others (or being written)
    HELD = "HELD"
    LOST = "LOST"  # was held; our key was deleted or the session ended


# One live recipe object per key (prefix + lease hex): two objects on one session and one
# name would share a key, and one's release would delete the other's hold.
_owners: weakref.WeakValueDictionary[tuple[int, bytes], Any] = weakref.WeakValueDictionary()


def claim(owner: Any, session: Session, key: bytes) -> None:
    """Let ``owner`` use ``key`` of ``session``, unless another active object does.

    Raises:
        InvalidArgument: another lock object of the same session and name is in use.
    """
    other = _owners.get((id(session), key))
    if other is not None and other is not owner and other.active:
        raise errors.InvalidArgument(
            f"{other!r} of the same session already uses {key!r}: use one lock object per "
            "name and session (or another session)")
    _owners[(id(session), key)] = owner


class Lock:
    """A mutex named ``name`` held through ``session``'s lease.

    Args:
        session: a :class:`coord.session.Session`; its lease keeps our key alive.
        name: the lock's name (bytes or str); keys live under ``name + b"/"``.

    Attributes:
        name, prefix, key: the name, ``name/`` and our key ``name/<lease hex>``.
        token: our key's create revision once acquired (kept after a release or loss,
            so a stale ``guard()`` keeps failing); None before.
        revision: the store revision at which ownership was proven.
    """

    def __init__(self, session: Session, name: bytes | str) -> None:
        self._setup(session, name, b"", b"", 1)

    def _setup(self, session: Session, name: bytes | str, kind: bytes, blockers: bytes,
               permits: int) -> None:
        """Our key is ``name/<kind><lease hex>``; we hold when fewer than ``permits`` keys
        under ``name/<blockers>`` were created before ours."""
        if not isinstance(session, Session):
            raise TypeError(f"a {type(self).__name__} needs a coord.session.Session (from "
                            f"Session.create(client)), not {type(session).__name__}")
        name = check_name(name, type(self).__name__)
        self.session = session
        self.name = name
        self.prefix = name + b"/"
        self.key = self.prefix + kind + b"%x" % session.lease_id
        self._blockers = self.prefix + blockers
        self._permits = permits
        self.token: int | None = None
        self.revision: int | None = None
        self._client = session.client
        self._reactor = session.client.reactor
        self._state = LockState.UNLOCKED
        # The first keys that may hold (by create revision): in the enqueue transaction,
        # so the uncontended path is one round trip.
        self._owner = OpGet(KeySet(self._blockers, prefix=True), sort_order="ascend",
                            sort_target="create", limit=permits)
        self._acquiring: defer.Deferred[Any] | None = None
        self._busy: Shared | None = None  # a release or clean-up still running
        self._lost_reason: errors.CoordError | None = None
        self._observers: list[defer.Deferred[Any]] = []
        self._session_lost: defer.Deferred[Any] | None = None
        self._watch: Any = None
        self._owns_session = False

    def __repr__(self) -> str:
        token = f" token={self.token}" if self._state in (LockState.HELD, LockState.LOST) else ""
        return f"<{type(self).__name__} {self.name!r} {self._state.name}{token}>"

    @property
    def state(self) -> LockState:
        return self._state

    @property
    def held(self) -> bool:
        """Whether we hold the lock as far as we can tell: HELD and the session alive.

        Only ``guard()`` in a transaction *proves* it at the moment of a write.
        """
        return self._state is LockState.HELD and self.session.alive

    @property
    def active(self) -> bool:
        return (self._state in (LockState.WAITING, LockState.HELD)
                or (self._busy is not None and not self._busy.done))

    # acquire --------------------------------------------------------------------------------

    def acquire(self, timeout: float | None = None) -> defer.Deferred[Lock]:
        """Wait until the lock is ours.

        Args:
            timeout: seconds to wait at most (None or infinity: no limit; 0: do not
                wait -- take it if free, as :meth:`try_acquire`, else Timeout).

        Returns:
            Deferred firing with this Lock once held: ownership was proven inside a
            transaction (our key exists with our create revision, and no key before it).

        Raises:
            Timeout: not acquired in time; our waiter key has been removed (if etcd does
                not answer, Timeout comes at most ``CLEANUP_GRACE`` = 0.5 s late, and the
                removal goes on in the background; a later acquire waits for it).
            SessionLost: the session ended (before or while waiting).
            LockLost: our waiter key was deleted by someone else while waiting.
            InvalidArgument: this lock is already held or being acquired, or another lock
                object of the same session and name is in use; a negative or NaN
                ``timeout`` (raised at once, nothing written).
            TypeError: ``timeout`` is not a number (raised at once).

        Cancelling the Deferred stops waiting and removes our waiter key (the Deferred
        fails with CancelledError once it is removed).
        """
        timeout = check_timeout(timeout)
        if timeout == 0:
            # No wait at all: take it if it is free (as try_acquire), else Timeout.
            message = f"lock {self.name!r} is not free (timeout=0)"

            def free_or_timeout(held: bool) -> Lock:
                if not held:
                    raise errors.Timeout(message)
                return self

            return self.try_acquire().addCallback(free_or_timeout)
        self._begin()
        d = defer.Deferred.fromCoroutine(self._acquire())
        self._acquiring = d
        return with_timeout(d, timeout, self._reactor,
                            f"could not acquire lock {self.name!r} within {timeout} s")

    def _begin(self) -> None:
        if self._state in (LockState.WAITING, LockState.HELD):
            raise errors.InvalidArgument(f"{self!r} is already {self._state.name.lower()}")
        claim(self, self.session, self.key)
        self._state = LockState.WAITING
        self._lost_reason = None

    async def _acquire(self) -> Lock:
        client = self._client
        enqueue = None
        token = None
        try:
            if self._busy is not None:
                await self._busy.wait()  # a release or clean-up of ours still running
            self.session.check()
            # Go's tryAcquire: create our key unless it exists (then reuse it), and read the
            # owner in the same transaction, so the uncontended path is one round trip.
            enqueue = Shared(client.submit(self._enqueue_txn()))
            # Cancelling stops our wait, not the write: its outcome tells what to clean up.
            try:
                result = await enqueue.wait()
                token, owner, header = result.header.revision, result.responses[1].kvs, \
                    result.header
            except errors.Failed as failed:
                # Our key exists already (left over from an attempt whose clean-up could not
                # finish): reuse it, as Go's Mutex does.
                token = failed.responses[0].kvs[0].create_revision
                owner, header = failed.responses[1].kvs, failed.header
            if not self._free(owner, token):
                header = await self._wait(token)
            self.session.check()
        except BaseException as exc:
            self._state = LockState.UNLOCKED
            self._acquiring = None
            if enqueue is not None:
                self._busy = Shared(defer.Deferred.fromCoroutine(
                    remove_own_key(self, enqueue, token)))
                await detached(self._busy.wait())
            if isinstance(exc, errors.Failed):
                # The guard failed: our key is gone.  Say whether its lease ended with it.
                self.session.check()
                try:
                    await self.session.lease.remaining()
                except errors.LeaseNotFound as gone:
                    raise self.session.lease_gone(gone)
                except errors.CoordError:
                    pass
                raise LockLost(f"our waiter key {self.key!r} was deleted while waiting")
            if isinstance(exc, errors.LeaseNotFound) and not isinstance(exc, SessionLost):
                # etcd refused our key's lease: the session is over, say so at once.
                raise self.session.lease_gone(exc)
            raise
        self._acquiring = None
        self._held(token, header.revision)
        return self

    def _enqueue_txn(self) -> Transaction:
        return Transaction(
            compare=[CompCreated(self.key, "==", 0)],
            success=[OpSet(self.key, b"", lease=self.session.lease_id), self._owner],
            failure=[OpGet(self.key), self._owner])

    def _free(self, first: list[Any], token: int) -> bool:
        """Whether fewer than ``permits`` of the ``first`` blockers were created before us."""
        return len(first) < self._permits or first[-1].create_revision >= token

    async def _wait(self, token: int) -> Any:
        """Wait for the keys before ours to go; stop as soon as the session ends (Go's
        Mutex would go on waiting with a dead session until its predecessor leaves)."""
        waiting = defer.Deferred.fromCoroutine(wait_fewer(
            self._client, self._blockers, token - 1, self._permits,
            guard=[CompCreated(self.key, "==", token)]))
        ended = self.session.lost
        ended.addCallbacks(lambda _: waiting.cancel(), lambda _: None)
        try:
            return await waiting
        except defer.CancelledError:
            self.session.check()  # raises SessionLost if that is why the wait stopped
            raise
        finally:
            ended.cancel()

    def try_acquire(self) -> defer.Deferred[bool]:
        """Take the lock if nobody holds or waits for it; never wait.

        Returns:
            Deferred firing with True (held: ``token`` set) or False (someone holds or
            waits for it; we leave no key behind -- unlike Go's TryLock, which writes a
            waiter key and deletes it again, we write our key only if the prefix is empty).

        Raises:
            SessionLost: the session ended.
            InvalidArgument: as :meth:`acquire`.
        """
        self._begin()
        d = defer.Deferred.fromCoroutine(self._try())
        self._acquiring = d
        return d

    async def _try(self) -> bool:
        client = self._client
        attempt = None
        try:
            if self._busy is not None:
                await self._busy.wait()  # a release of ours still running: it goes first
            self.session.check()
            if self._permits == 1:
                # A comparison on a range holds when it holds for every key in it; on an
                # empty range it sees create revision 0 (etcd applyCompare): "no key".
                # So we write our key only if nobody holds or waits.
                txn = Transaction(
                    compare=[CompCreated(KeySet(self._blockers, prefix=True), "==", 0)],
                    success=[OpSet(self.key, b"", lease=self.session.lease_id), self._owner],
                    failure=[OpGet(self.key), self._owner])
            else:
                # "Fewer than N keys" is no comparison: write our key, look, and take it
                # back if no permit is free (as Go's TryLock does).
                txn = self._enqueue_txn()
            attempt = Shared(client.submit(txn))
            try:
                result = await attempt.wait()
                token, first, header = (result.header.revision, result.responses[1].kvs,
                                        result.header)
            except errors.Failed as failed:
                mine, first, header = (failed.responses[0].kvs, failed.responses[1].kvs,
                                       failed.header)
                token = mine[0].create_revision if mine else 0
            if not token or not self._free(first, token):
                if token:  # ours, just written or left over from an earlier attempt
                    await delete_own_key(self, token)
                self._state = LockState.UNLOCKED
                self._acquiring = None
                return False
            self.session.check()
        except BaseException as exc:
            self._state = LockState.UNLOCKED
            self._acquiring = None
            if attempt is not None:
                self._busy = Shared(defer.Deferred.fromCoroutine(
                    remove_own_key(self, attempt, None)))
                await detached(self._busy.wait())
            if isinstance(exc, errors.LeaseNotFound) and not isinstance(exc, SessionLost):
                raise self.session.lease_gone(exc)
            raise
        self._acquiring = None
        self._held(token, header.revision)
        return True

    # holding --------------------------------------------------------------------------------

    def _held(self, token: int, revision: int) -> None:
        self._state = LockState.HELD
        self.token = token
        self.revision = revision
        self._session_lost = self.session.lost
        self._session_lost.addCallbacks(self._lose, lambda _: None)
        if self._observers:
            self._watch_key()

    def guard(self) -> CompCreated:
        """A comparison that holds only while our key is the one we acquired.

        Put it in your own transactions -- ``Transaction(compare=[lock.guard()],
        success=[...])`` -- so the write happens only if the lock is still ours at the
        revision the transaction is applied (it fails with ``Failed`` otherwise).

        Raises:
            InvalidArgument: the lock was never acquired.
        """
        if self.token is None:
            raise errors.InvalidArgument(f"{self!r} was never acquired: no guard to give")
        return CompCreated(self.key, "==", self.token)

    @property
    def lost(self) -> defer.Deferred[errors.CoordError]:
        """A new Deferred that fires, with the reason, if the lock is lost while held:
        the session ends (:class:`SessionLost`) or our key is deleted (:class:`LockLost`).

        It concerns the current hold (or the next one, if read before acquiring); when
        the hold ends with :meth:`release` it never fires.  Once LOST it has fired already.
        Reading it while held starts a watch on our key (none runs otherwise).
        """
        if self._state is LockState.LOST and self._lost_reason is not None:
            return defer.succeed(self._lost_reason)
        d: defer.Deferred[errors.CoordError] = defer.Deferred(self._forget_observer)
        self._observers.append(d)
        if self._state is LockState.HELD and self._watch is None:
            self._watch_key()
        return d

    def _forget_observer(self, d: defer.Deferred[Any]) -> None:
        if d in self._observers:
            self._observers.remove(d)

    def _watch_key(self) -> None:
        watch_own_key(self, lambda: self._state is LockState.HELD, self._lose, LockLost)

    def _lose(self, reason: Any, token: int | None = None) -> None:
        if self._state is not LockState.HELD or (token is not None and token != self.token):
            return
        self._stop_holding(LockState.LOST)
        self._lost_reason = reason
        log.warn("{lock} lost: {reason}", lock=self, reason=reason)
        observers, self._observers = self._observers, []
        for d in observers:
            d.callback(reason)

    def _stop_holding(self, state: LockState) -> None:
        self._state = state
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
        session_lost, self._session_lost = self._session_lost, None
        if session_lost is not None and not session_lost.called:
            session_lost.cancel()

    # release --------------------------------------------------------------------------------

    def release(self) -> defer.Deferred[None]:
        """Give the lock up: delete our key, if it is still the one we acquired.

        Idempotent; a release while acquiring cancels the acquire.  Guarded on our create
        revision, so a late release never deletes a newer holder's key.

        Returns:
            Deferred firing with None once our key is gone.
        """
        if self._state is LockState.WAITING and self._acquiring is not None:
            # The acquire's Deferred fails with CancelledError once its key is removed.
            self._acquiring.cancel()
            return self._busy.wait() if self._busy is not None else defer.succeed(None)
        if self._state in (LockState.HELD, LockState.LOST):
            token = self.token
            self._stop_holding(LockState.UNLOCKED)
            self._observers = []  # the hold ended as asked: `lost` observers never fire
            if self._owns_session:
                # Revoking our lease deletes our key (and only ours) in one round trip.
                d = self.session.close()
            else:
                d = defer.Deferred.fromCoroutine(delete_own_key(self, token))
            self._busy = Shared(d)
        if self._busy is not None:
            return self._busy.wait()
        return defer.succeed(None)

    async def __aenter__(self) -> Lock:
        return await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


class ReadLock(Lock):
    """The shared side of a :class:`RWLock`: held alongside other readers, never alongside
    a writer.

    Our key is ``name/read/<lease hex>``.  We hold it once no *writer* key
    (``name/write/...``) created before ours remains: readers that came after a waiting
    writer wait for it (FIFO), so writers are not starved.  Go's contrib
    ``recipes/rwmutex.go`` algorithm, with coord's key layout (it is no etcdctl standard).
    """

    def __init__(self, session: Session, name: bytes | str) -> None:
        self._setup(session, name, b"read/", b"write/", 1)


class WriteLock(Lock):
    """The exclusive side of a :class:`RWLock`: our key is ``name/write/<lease hex>``; we
    hold it once no key at all (reader or writer) created before ours remains."""

    def __init__(self, session: Session, name: bytes | str) -> None:
        self._setup(session, name, b"write/", b"", 1)


class RWLock:
    """A readers-writer lock: ``rw.read`` (a :class:`ReadLock`) and ``rw.write`` (a
    :class:`WriteLock`), both on ``session``.

    Readers share, writers exclude everyone; the queue is FIFO by create revision, so a
    waiting writer holds back the readers that come after it.  Each side has the Lock
    interface (acquire with timeout and cancel, try_acquire, release, token, guard, lost,
    ``async with rw.read: ...``).
    """

    def __init__(self, session: Session, name: bytes | str) -> None:
        self.read = ReadLock(session, name)
        self.write = WriteLock(session, name)
        self.name = self.read.name

    def __repr__(self) -> str:
        return f"<RWLock {self.name!r} read={self.read.state.name} write={self.write.state.name}>"


class Semaphore(Lock):
    """At most ``permits`` holders at a time, FIFO.

    Our key is ``name/<lease hex>`` (a Semaphore with one permit is a :class:`Lock`); we
    hold a permit when fewer than ``permits`` keys under ``name/`` were created before
    ours.  All users of one name must agree on ``permits`` (it is not stored in etcd).
    Waiters watch the prefix's deletions and count those of the keys ahead of them,
    reading again only when a permit may be theirs.  ``token`` and ``guard()`` work as
    for a Lock (tokens increase in the order permits are granted).
    ``try_acquire()`` writes our key, looks, and deletes it if no permit is free.
    """

    def __init__(self, session: Session, name: bytes | str, permits: int) -> None:
        if isinstance(permits, bool) or not isinstance(permits, int):
            raise TypeError(f"permits must be an int, not {type(permits).__name__}")
        if not 1 <= permits <= MAX_INT64:
            raise errors.InvalidArgument(f"permits must be >= 1 and < 2**63, not {permits}")
        self.permits = permits
        self._setup(session, name, b"", b"", permits)


def acquire_lock(client: Any, name: bytes | str, timeout: float | None = None,
                 ttl: int = DEFAULT_TTL) -> defer.Deferred[Lock]:
    """The original guide's ``etcd.lock(name, timeout=...)``: a lock with a session of its own.

    Creates a :class:`Session` of ``ttl`` seconds and acquires ``Lock(session, name)``.
    The lock's :meth:`Lock.release` also closes that session (revoking its lease deletes
    our key).  If acquiring fails (Timeout, cancel), the session is closed too: no key
    and no lease are left behind.

    ``timeout=0`` means "do not wait", as for :meth:`Lock.acquire`: a free lock is taken
    (the session's grant and the lock's transaction are not bounded by it -- only each
    call's timeout); a held one raises Timeout once the session made for it is revoked.

    Returns:
        Deferred firing with the held :class:`Lock`.

    Raises:
        Timeout: not acquired within ``timeout`` seconds.
        TypeError, InvalidArgument: a bad ``name``, ``timeout`` (see
            :meth:`Lock.acquire`) or ``ttl`` (an int from 1 to etcd's largest TTL);
            raised at once, before anything is sent.
    """
    timeout = check_timeout(timeout)
    check_name(name, "Lock")
    ttl = positive_int("ttl", ttl, maximum=MAX_LEASE_TTL)
    reactor = client.reactor

    async def go() -> Lock:
        session = await Session.create(client, ttl)  # (a cancel here leaks no lease)
        try:
            lock = Lock(session, name)
            lock._owns_session = True
            # timeout=0: Lock.acquire's "take it if free" (it cannot be done within
            # 0 s of a timer: that would time out even a free lock).
            await lock.acquire(timeout=0 if timeout == 0 else None)
        except BaseException:
            await detached(session.close())
            raise
        return lock

    d = defer.Deferred.fromCoroutine(go())
    if timeout == 0:
        return d
    return with_timeout(d, timeout, reactor,
                        f"could not acquire lock {name!r} within {timeout} s")


def check_name(name: Any, kind: str) -> bytes:
    """A recipe's name as bytes; TypeError / InvalidArgument for what cannot be one."""
    name = as_bytes(name, "name")
    if not name:
        raise errors.InvalidArgument(f"a {kind}'s name must not be empty")
    return name
