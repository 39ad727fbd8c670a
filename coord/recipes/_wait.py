"""Waiting for the keys queued before ours: etcd's ``concurrency/key.go`` (``waitDeletes``),
generalised to N permits, with three changes.

* Every read is a transaction guarded on our own key (it exists with our create
  revision), so the read that finds fewer than N keys before ours also proves, at that
  revision, that we still hold our place.  A recipe never reports success it has not
  proved inside a transaction.
* Our own key is watched as well as the keys before it: a waiter whose key is deleted
  (by hand, or with its lease) is told at once, not when its predecessor leaves (as Go's
  Mutex is).
* The watch is created at the store's current revision, not at the read's revision + 1.
  etcd serves a watch that starts behind the current revision from its "unsynced" group,
  which catches up on a ~100 ms loop (``watchable_store.go`` syncWatchersLoop; DESIGN.md
  "Performance notes"): under contention every waiter's read is soon behind.  To miss
  nothing in between, when the watch was created after the read's revision the read is
  made again: what it still finds was not deleted up to then, and the watch covers
  everything after.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.python.failure import Failure

from coord import errors
from coord.keyset import KeySet
from coord.txn import CompCreated, OpGet, Transaction
from coord.types import Event, EventType, Header

if TYPE_CHECKING:
    from coord.client import Client

__all__ = ["KeyGone", "wait_fewer", "watch"]

# Create the waiter's watch at the current revision (and read again if the store moved
# since our read) rather than at the read's revision + 1 as Go does: see the module
# docstring.  benchmarks/lock.py --go-watch turns it off to compare.
WATCH_AT_CURRENT_REVISION = True


class KeyGone(Exception):
    """Our own key was deleted (or its guard failed) while we waited."""


def watch(client: Client, keys: Any, on_change: Any, start_revision: int | None = None,
          filters: list[str] | None = None) -> Any:
    """The recipes' one way to watch: ``client.watch`` on the client's shared streams
    (a process holding thousands of locks keeps a few connections)."""
    return client.watch(keys, on_change, start_revision=start_revision, filters=filters,
                        shared=True)


async def wait_fewer(client: Client, prefix: bytes, max_create_revision: int, permits: int,
                     own: bytes, token: int) -> Header:
    """Wait until fewer than ``permits`` keys under ``prefix`` have a create revision <=
    ``max_create_revision``, while our key ``own`` (created at ``token``) stays.

    With one permit the waiter watches only the last key before ours (each release wakes
    exactly one waiter, FIFO).  With more, any key before ours may free a permit: the
    waiter watches the prefix's deletions, counting those of the keys it read, and reads
    again only when the count drops below ``permits``.

    Returns:
        The header of the guarded read that found fewer than ``permits`` keys.

    Raises:
        KeyGone: our key was deleted, or is not the one created at ``token``.
        Unavailable, Timeout, EtcdError...: a read or the watch failed for good.

    Cancelling the coroutine's Deferred stops the wait and closes its watch.
    """
    keys = KeySet(prefix, prefix=True)
    if permits == 1:  # Go's waitDeletes: the last key created before ours
        before = OpGet(keys, sort_order="descend", sort_target="create", limit=1,
                       keys_only=True, max_create_revision=max_create_revision)
    else:
        before = OpGet(keys, keys_only=True, max_create_revision=max_create_revision)
    read = Transaction(compare=[CompCreated(own, "==", token)], success=[before])

    async def ahead() -> tuple[set[tuple[bytes, int]], Header]:
        try:
            result = await client.submit(read)
        except errors.Failed:
            raise KeyGone(f"{own!r} was deleted") from None
        found = result.responses[0].kvs  # type: ignore[union-attr]
        return {(kv.key, kv.create_revision) for kv in found}, result.header

    while True:
        names, header = await ahead()
        if len(names) < permits:
            return header
        watched = KeySet(next(iter(names))[0]) if permits == 1 else keys
        try:
            await _until_fewer(client, [watched, KeySet(own)], own, names, permits,
                               header.revision, ahead)
        except errors.Compacted:
            continue  # the watch fell behind a compaction: read again (DESIGN.md rules)


async def _until_fewer(client: Client, keysets: list[KeySet], own: bytes,
                       names: set[tuple[bytes, int]], permits: int, read_revision: int,
                       ahead: Any) -> None:
    """Watch ``keysets`` for deletions until fewer than ``permits`` of ``names`` (present
    at ``read_revision``) remain; raise KeyGone if ``own`` is deleted first."""
    done: defer.Deferred[None] = defer.Deferred()
    left = {key for key, _ in names}

    def gone(removed: set[bytes]) -> None:
        left.difference_update(removed)
        if len(left) < permits and not done.called:
            done.callback(None)

    def on_change(event: Event) -> None:
        if event.type is not EventType.DELETE or done.called:
            return
        if event.kv.key == own:
            done.errback(KeyGone(f"{own!r} was deleted at revision {event.revision}"))
        else:
            gone({event.kv.key})

    def failed(result: Any) -> None:
        if not done.called:
            if isinstance(result, Failure):
                if not result.check(defer.CancelledError):
                    done.errback(result)
            else:
                done.errback(errors.EtcdError(
                    f"the watch on {keysets[0].key!r} ended before the deletions awaited"))

    start = None if WATCH_AT_CURRENT_REVISION else read_revision + 1
    running = watch(client, keysets, on_change, start_revision=start, filters=["noput"])
    watcher = running.watcher
    running.addBoth(failed)
    check: defer.Deferred[Any] | None = None

    def created(_: Any) -> None:
        nonlocal check
        # The watch delivers every event after revisions[0] - 1 (its creation revision);
        # what was deleted between our read and then, a fresh read tells.
        if not done.called and watcher.revisions[0] - 1 > read_revision:
            check = defer.Deferred.fromCoroutine(ahead())
            check.addCallbacks(
                lambda found: gone({key for key, rev in names if (key, rev) not in found[0]}),
                failed)

    watcher.ready.addCallbacks(created, lambda _: None)  # a failure is reported by `failed`
    try:
        await done
    finally:
        watcher.cancel()
        if check is not None and not check.called:
            check.cancel()
