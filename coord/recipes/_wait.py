"""The one wait primitive the recipes share: wait until the keys before ours are gone.

This is etcd's ``concurrency/key.go`` (``waitDeletes``), with two changes:

* every read is a transaction guarded by the caller's comparisons (e.g. "our key still
  exists with our create revision"), so the read that finds no key left before ours
  also proves, at that same revision, that we still hold our place.  A recipe never
  reports success it has not proved inside a transaction.
* the watch on the predecessor is created at the store's current revision, not at the
  read's revision + 1.  etcd serves a watch that starts behind the current revision from
  its "unsynced" group, which catches up on a ~100 ms loop (``watchable_store.go``
  syncWatchersLoop; DESIGN.md "Performance notes"): under contention every waiter's read
  is soon behind.  A watch created at the current revision is synced at once.  To miss
  nothing in between, when the watch was created after the read's revision the
  predecessor is read again: if it is still there (same create revision) no deletion
  happened up to that read, and the watch covers everything after it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import txaio
from twisted.internet import defer, task
from twisted.python.failure import Failure

from coord import _checks, errors
from coord._twisted import detached, relay
from coord.keyset import KeySet
from coord.txn import CompCreated, CompLease, OpDel, OpGet, Transaction
from coord.types import EventType, Header, KeyValue

log = txaio.make_logger()  # type: ignore[attr-defined]  # set by txaio.use_twisted()

# Create the predecessor's watch at the current revision (and read the key again if the
# store moved since our read) rather than at the read's revision + 1 as Go does: see the
# module docstring.  benchmarks/lock.py --go-watch turns it off to compare.
WATCH_AT_CURRENT_REVISION = True

__all__ = [
    "Shared",
    "check_timeout",
    "delete_own_key",
    "detached",
    "remove_own_key",
    "wait_delete",
    "wait_deletes",
    "wait_fewer",
    "with_timeout",
]


async def wait_deletes(client: Any, prefix: bytes, max_create_revision: int,
                       guard: Sequence[Any] = ()) -> Header:
    """Wait until no key under ``prefix`` has a create revision <= ``max_create_revision``.

    Each round reads the last key created at or before ``max_create_revision`` (sorted by
    create revision, descending, limit 1) and waits for the deletion of that key only --
    the waiter's immediate predecessor -- so each release wakes exactly one waiter.

    Args:
        client: a :class:`coord.Client`.
        prefix: the recipe's key prefix (e.g. ``b"jobs/db/"``).
        max_create_revision: keys created after this revision are not waited for
            (ours and those behind us).
        guard: comparisons checked atomically with every read (e.g. our key still
            exists with our create revision).

    Returns:
        The header of the read that found no key left: at its revision the guard held
        and nothing before ours remained.

    Raises:
        Failed: the guard did not hold (our key is gone).
        Unavailable, Timeout, ...: a read or the watch failed for good.

    Cancelling the returned coroutine's Deferred stops the wait and closes its watch.
    """
    keys = KeySet(prefix, prefix=True)
    last = OpGet(keys, sort_order="descend", sort_target="create", limit=1,
                 max_create_revision=max_create_revision)
    read = Transaction(compare=list(guard), success=[last])
    while True:
        result = await client.submit(read)
        (found,) = result.responses
        if not found.kvs:
            return result.header
        try:
            await wait_delete(client, found.kvs[0], result.header.revision)
        except errors.Compacted:
            continue  # the watch fell behind a compaction: read again (DESIGN.md rules)


async def wait_delete(client: Any, kv: KeyValue, read_revision: int) -> None:
    """Wait until ``kv.key`` (as read at ``read_revision``) is deleted.

    Raises:
        EtcdError, Compacted: the watch ended with an error (a watch that ends is never
            taken for a deletion).
    """

    def still_there() -> defer.Deferred[set[bytes]]:
        return client.get(kv.key).addCallback(
            lambda r: {kv.key} if r.kvs and r.kvs[0].create_revision == kv.create_revision
            else set())

    await _until_fewer(client, KeySet(kv.key), {kv.key}, 1, read_revision, still_there)


async def wait_fewer(client: Any, prefix: bytes, max_create_revision: int, permits: int,
                     guard: Sequence[Any] = ()) -> Header:
    """Wait until fewer than ``permits`` keys under ``prefix`` have a create revision <=
    ``max_create_revision`` (a semaphore's "a permit is free for us").

    :func:`wait_deletes` is this with ``permits=1``, and waits on one key only.  With more
    permits any one of the keys before ours may be the one that frees a permit, so the
    waiter reads their names once and watches the prefix for deletions, counting those
    of the keys it read (keys created later sort after ours and never count).  Only when
    the count drops below ``permits`` does it read again, in a transaction with ``guard``:
    a release wakes only the waiters it may let in.

    Returns, raises and cancels as :func:`wait_deletes`.
    """
    if permits == 1:
        return await wait_deletes(client, prefix, max_create_revision, guard)
    keys = KeySet(prefix, prefix=True)
    before = OpGet(keys, keys_only=True, max_create_revision=max_create_revision)
    read = Transaction(compare=list(guard), success=[before])

    def still_there() -> defer.Deferred[set[bytes]]:
        d = client.get(keys, keys_only=True, max_create_revision=max_create_revision)
        return d.addCallback(lambda r: {kv.key for kv in r.kvs})

    while True:
        result = await client.submit(read)
        (found,) = result.responses
        if len(found.kvs) < permits:
            return result.header
        try:
            await _until_fewer(client, keys, {kv.key for kv in found.kvs}, permits,
                               result.header.revision, still_there)
        except errors.Compacted:
            continue


async def _until_fewer(client: Any, keys: KeySet, names: set[bytes], permits: int,
                       read_revision: int,
                       still_there: Callable[[], defer.Deferred[set[bytes]]]) -> None:
    """Watch ``keys`` for deletions until fewer than ``permits`` of ``names`` (present at
    ``read_revision``) remain.  ``still_there()`` reads which of them exist now: it is
    called when the watch was created after ``read_revision`` (see the module docstring)."""
    done: defer.Deferred[None] = defer.Deferred()

    def gone(removed: set[bytes]) -> None:
        names.difference_update(removed)
        if len(names) < permits and not done.called:
            done.callback(None)

    def on_change(event: Any) -> None:
        if event.type is EventType.DELETE:
            gone({event.kv.key})

    def ended(result: Any) -> None:
        if not done.called:
            done.errback(result if isinstance(result, Failure) else errors.EtcdError(
                f"the watch on {keys.key!r} ended before the deletions awaited"))

    if WATCH_AT_CURRENT_REVISION:
        watch = client.watch(keys, on_change, filters=["noput"], shared=True)
    else:
        watch = client.watch(keys, on_change, filters=["noput"],
                             start_revision=read_revision + 1)
    watcher = watch.watcher
    watch.addBoth(ended)
    check: defer.Deferred[Any] | None = None

    def created(_: Any) -> None:
        nonlocal check
        # The watch delivers every event after revisions[0] - 1 (its creation revision);
        # what was deleted between our read and then, a fresh read tells.
        if not done.called and watcher.revisions[0] - 1 > read_revision:
            check = still_there()
            check.addCallback(lambda present: gone(names - present))
            check.addErrback(failed)

    def failed(failure: Failure) -> None:
        if not done.called and not failure.check(defer.CancelledError):
            done.errback(failure)

    watcher.ready.addCallbacks(created, lambda _: None)  # a failure is reported by `ended`
    try:
        await done
    finally:
        watcher.cancel()
        if check is not None and not check.called:
            check.cancel()


async def remove_own_key(owner: Any, attempt: Shared, token: int | None) -> None:
    """Remove a recipe's key after a failed, timed out or cancelled attempt to take it.

    ``owner`` is the recipe (a Lock or an Election: its ``key``, ``session``,
    ``_client``, ``_reactor``).  ``attempt`` is the transaction that writes the key: its
    success branch creates it at the transaction's revision; its failure branch reads it
    first.  ``token``, if known, is the key's create revision.

    An attempt that etcd refused (PermissionDenied, LeaseNotFound, "no leader"...) wrote
    nothing: there is nothing to delete, and a delete would most likely be refused too
    (a user who may not write the prefix may not delete there either).
    """
    if token is None:
        try:
            token = (await attempt.wait()).header.revision
        except errors.Failed as failed:
            mine = failed.responses[0].kvs
            if not mine:
                return
            token = mine[0].create_revision
        except errors.EtcdError as refused:
            # etcd's answer to the transaction itself: it was not applied -- unless it
            # is an unavailability that may come after the proposal (errors.for_write
            # made it an OutcomeUnknown then).
            if not isinstance(refused, errors.OutcomeUnknown):
                return
            token = None
        except Exception:
            token = None  # unknown outcome: delete whatever key our lease has there
    await delete_own_key(owner, token)


async def delete_own_key(owner: Any, token: int | None) -> None:
    """Delete ``owner``'s key if it is still the one created at ``token`` (a late delete
    never removes a newer key); with no token, if it carries the session's lease.
    Guarded deletes are idempotent, so they are retried while the session lives (after
    it, the lease's end deletes the key anyway)."""
    key, session = owner.key, owner.session
    if token is not None:
        guard: Any = CompCreated(key, "==", token)
    else:
        guard = CompLease(key, "==", session.lease_id)
    txn = Transaction(compare=[guard], success=[OpDel(key)])
    pause = 0.05
    while True:
        try:
            await owner._client.submit(txn)
            return
        except errors.Failed:
            return  # already gone (or not ours)
        except (errors.Unavailable, errors.Timeout) as exc:
            if not session.alive:
                return
            log.warn("{owner}: deleting {key!r} failed ({error}); retrying", owner=owner,
                     key=key, error=exc)
            await task.deferLater(owner._reactor, pause, lambda: None)
            pause = min(pause * 2, 1.0)
        except errors.EtcdError as exc:
            # etcd refused the delete (permission denied...): its word, not a bug here,
            # so no traceback.  The key goes with the session's lease anyway.
            log.warn("{owner}: etcd refused to delete {key!r} ({error}); it goes when "
                     "the session's lease ends", owner=owner, key=key, error=exc)
            return
        except Exception:
            log.failure("{owner}: deleting {key!r} failed", owner=owner, key=key)
            return


def watch_own_key(owner: Any, holds: Callable[[], bool],
                  lose: Callable[[errors.CoordError, int], None],
                  lost: type[errors.CoordError]) -> None:
    """Watch ``owner``'s key while ``holds()``: its deletion, or its re-creation under
    another create revision, is a loss, reported as ``lose(reason, token)``.

    ``owner`` is the recipe (a Lock or an Election): its ``key``, ``token`` (the key's
    create revision), ``revision`` (watched from after it), ``session``, ``_client``,
    and ``_watch``, set here to the running watch's Deferred (the owner cancels it when
    it lets go).  The reason is a ``lost(...)``, or the session's own SessionLost when
    the session is past its deadline (say the process was paused: the lease's expiry is
    the reason, even if the deletion's event came before the session's timer).  A watch
    that ends by itself (not cancelled: ``owner._watch`` is still this one) is followed
    by a read, and a key still ours is watched again from that read's revision.
    """
    token = owner.token
    assert owner.revision is not None

    def on_change(event: Any) -> None:
        if owner.token == token and (event.type is EventType.DELETE
                                     or event.kv.create_revision != token):
            reason = lost(f"{owner.key!r} was deleted at revision {event.revision}")
            if not owner.session.alive:
                try:
                    owner.session.check()
                except errors.SessionLost as ended:
                    reason = ended
            lose(reason, token)

    def ended(result: Any) -> None:
        if owner._watch is watch and holds() and owner.token == token:
            owner._watch = None
            owner._client.get(owner.key).addCallbacks(recheck, lambda f: lose(
                lost(f"cannot watch {owner.key!r} any more: {f.value}"), token))

    def recheck(result: Any) -> None:
        if not holds() or owner.token != token:
            return
        if not result.kvs or result.kvs[0].create_revision != token:
            lose(lost(f"{owner.key!r} was deleted"), token)
        else:
            owner.revision = result.header.revision
            watch_own_key(owner, holds, lose, lost)

    watch = owner._client.watch(owner.key, on_change, owner.revision + 1, shared=True)
    owner._watch = watch
    watch.addBoth(ended)


class Shared:
    """One Deferred's outcome, for any number of waiters (none consumes it).

    ``wait()`` gives a new Deferred per waiter; cancelling it stops that waiter only.
    """

    def __init__(self, d: defer.Deferred[Any]) -> None:
        self.done = False
        self.result: Any = None
        self._waiters: list[defer.Deferred[Any]] = []
        d.addBoth(self._fire)

    def _fire(self, result: Any) -> None:
        self.done = True
        self.result = result
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            self._deliver(w)

    def _deliver(self, w: defer.Deferred[Any]) -> None:
        if isinstance(self.result, Failure):
            w.errback(self.result)
        else:
            w.callback(self.result)

    def wait(self) -> defer.Deferred[Any]:
        w: defer.Deferred[Any] = defer.Deferred(self._waiters.remove)
        if self.done:
            self._deliver(w)
        else:
            self._waiters.append(w)
        return w


# How long past its deadline a timed-out wait waits for its clean-up before it raises
# Timeout anyway (a hung etcd must not hold the caller hostage; the clean-up goes on).
CLEANUP_GRACE = 0.5


def with_timeout(d: defer.Deferred[Any], timeout: float | None, reactor: Any,
                 message: str) -> defer.Deferred[Any]:
    """Cancel ``d`` after ``timeout`` seconds and fail with :class:`~coord.errors.Timeout`.

    ``d`` (usually a coroutine's Deferred) gets to clean up on cancellation: the Timeout
    is raised once ``d`` has finished, or :data:`CLEANUP_GRACE` seconds after the
    deadline if its clean-up takes longer (etcd hung); that clean-up then goes on in the
    background.  Cancelling the returned Deferred cancels ``d`` and waits for it.
    """
    if timeout is None:
        return d
    out: defer.Deferred[Any] = defer.Deferred(lambda _: d.cancel())
    timers: list[Any] = []

    def give_up() -> None:
        if not out.called:
            out.errback(errors.Timeout(message))

    def expire() -> None:
        timers.append(reactor.callLater(CLEANUP_GRACE, give_up))
        d.cancel()

    timers.append(reactor.callLater(timeout, expire))

    def done(result: Any) -> None:
        for timer in timers:
            if timer.active():
                timer.cancel()
        if out.called:
            if isinstance(result, Failure) and not result.check(defer.CancelledError):
                log.failure("after its Timeout: {message}", result, message=message)
            return
        if len(timers) > 1 and isinstance(result, Failure) and \
                result.check(defer.CancelledError):
            out.errback(errors.Timeout(message))
        else:
            relay(result, out)

    d.addBoth(done)
    return out


def check_timeout(timeout: Any, zero_ok: bool = True) -> float | None:
    """A recipe's wait timeout: None (or infinity) for no limit, else seconds >= 0 -- 0
    meaning "do not wait" where the recipe can tell at once (``zero_ok``).

    Raises:
        TypeError: not a number (a str, a bool).
        InvalidArgument: negative, NaN, or 0 when not ``zero_ok``.
    """
    return _checks.seconds("timeout", timeout, zero_ok=zero_ok)
