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
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.python.failure import Failure

from coord import errors
from coord.client import MAX_LEASE_TTL
from coord.errors import LockLost
from coord.keyset import KeySet
from coord.recipes._core import NotFree, OwnedKey, Phase
from coord.recipes._loop import (
    Shared,
    check_name,
    check_timeout,
    detached,
    positive_int,
    start,
    with_timeout,
)
from coord.session import DEFAULT_TTL, Session
from coord.txn import CompCreated

if TYPE_CHECKING:
    from coord.client import Client

__all__ = [
    "Lock",
    "LockState",
    "RWLock",
    "ReadLock",
    "Semaphore",
    "WriteLock",
    "acquire_lock",
]

MAX_INT64 = 2**63 - 1


class LockState(enum.Enum):
    """What a :class:`Lock` knows locally: UNLOCKED; WAITING (our key is queued behind
    others, or being written); HELD; LOST (was held; our key was deleted or the session
    ended)."""

    UNLOCKED = "UNLOCKED"
    WAITING = "WAITING"  # our key is queued behind others (or being written)
    HELD = "HELD"
    LOST = "LOST"  # was held; our key was deleted or the session ended


_STATES = {Phase.IDLE: LockState.UNLOCKED, Phase.WAITING: LockState.WAITING,
           Phase.HELD: LockState.HELD, Phase.LOST: LockState.LOST}


class Lock(OwnedKey):
    """A mutex named ``name`` held through ``session``'s lease.

    Args:
        session: a :class:`coord.session.Session`; its lease keeps our key alive.
        name: the lock's name (bytes or str); keys live under ``name + b"/"``.  Names
            nest as paths do: a lock ``jobs`` and a lock ``jobs/db`` exclude each other
            (as in Go and ``etcdctl lock``; see docs/locks.md).

    Attributes:
        name: the lock's name (bytes).
        prefix: ``name/``.
        key: our key, ``name/<lease hex>``.
        token: our key's create revision once acquired (kept after a release or loss,
            so a stale ``guard()`` keeps failing); None before.
        revision: the store revision at which ownership was proven.
    """

    lost_error = LockLost
    _owns_session = False  # acquire_lock's lock: release closes the session

    def __repr__(self) -> str:
        token = f" token={self.token}" if self._phase in (Phase.HELD, Phase.LOST) else ""
        return f"<{type(self).__name__} {self.name!r} {self.state.name}{token}>"

    @property
    def state(self) -> LockState:
        """UNLOCKED, WAITING, HELD or LOST, as far as we know locally (see
        :class:`LockState`)."""
        return _STATES[self._phase]

    @property
    def held(self) -> bool:
        """Whether we hold the lock as far as we can tell (HELD and the session alive).

        Only ``guard()`` in a transaction *proves* it at the moment of a write.
        """
        return self._holding

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
            SessionLost: the session ended, or its lease is gone (before or while
                waiting; told at once when our key goes with the lease).
            LockLost: our waiter key was deleted by someone else while waiting (told at
                once, not when the keys before it leave).
            InvalidArgument: this lock is already held or being acquired, or another lock
                object of the same session and name is in use; a negative or NaN
                ``timeout`` (raised at once, nothing written).
            TypeError: ``timeout`` is not a number (raised at once).

        Cancelling the Deferred stops waiting and removes our waiter key (the Deferred
        fails with CancelledError once it is removed).
        """
        timeout = check_timeout(timeout)
        if timeout == 0:
            message = f"lock {self.name!r} is not free (timeout=0)"

            def free_or_timeout(held: bool) -> Lock:
                if not held:
                    raise errors.Timeout(message)
                return self

            return self.try_acquire().addCallback(free_or_timeout)

        async def take() -> Lock:
            await self._obtain(lambda: self._enqueue(b""))
            return self

        return self._run(take, timeout,
                         f"could not acquire lock {self.name!r} within {timeout} s")

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
        txn = None
        if self._permits == 1:
            # A comparison on a range holds when it holds for every key in it; on an
            # empty range it sees create revision 0 (etcd applyCompare): "no key".  So
            # our key is written only if nobody holds or waits.
            txn = self._enqueue_txn(b"", CompCreated(KeySet(self._blockers, prefix=True),
                                                     "==", 0))
        # (With more permits "fewer than N keys" is no comparison: write our key, look,
        # and take it back if no permit is free, as Go's TryLock does.)

        async def take() -> bool:
            try:
                await self._obtain(lambda: self._enqueue(b"", txn), wait=False)
            except NotFree:
                return False
            return True

        return self._run(take, None, "")

    def _delete_held(self, token: int | None) -> defer.Deferred[None]:
        if self._owns_session:
            # Revoking our lease deletes our key (and only ours) in one round trip.
            return self.session.close()
        return super()._delete_held(token)

    def release(self) -> defer.Deferred[None]:
        """Give the lock up: delete our key, if it is still the one we acquired.

        Idempotent; a release while acquiring cancels the acquire.  Guarded on our create
        revision, so a late release never deletes a newer holder's key.

        Returns:
            Deferred firing with None once our key is gone.
        """
        busy = self._busy
        if (self._owns_session and self._phase is Phase.IDLE and busy is not None
                and busy.done and isinstance(busy.result, Failure)):
            # Closing our session failed (etcd unreachable): revoke again, as
            # Session.close does when called again.
            self._busy = Shared(self.session.close())
        return self._let_go()

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

    kind = b"read/"
    blocked_by = b"write/"


class WriteLock(Lock):
    """The exclusive side of a :class:`RWLock`: our key is ``name/write/<lease hex>``; we
    hold it once no key at all (reader or writer) created before ours remains."""

    kind = b"write/"


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
        super().__init__(session, name, permits)


def acquire_lock(client: Client, name: bytes | str, timeout: float | None = None,
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

    d = start(go())
    if timeout == 0:
        return d
    return with_timeout(d, timeout, client.reactor,
                        f"could not acquire lock {name!r} within {timeout} s")
