"""The prefix mirror: a :class:`~coord.recipes._mirror_state.MirrorState` kept up to date
from etcd, its waits, and how recipes call user callbacks.

:class:`Mirror` reads every key under a prefix at one revision R (paged: every page at R,
so the pages make one state of the store) and watches it from R + 1 -- the read-then-watch
that never misses a change (DESIGN.md rules).  A revision's events come in one watch
response, in one reactor turn (:meth:`coord.Client.watch`): they are buffered until that
turn ends and applied a revision at a time, so its consumer gets one
:class:`~coord.recipes._mirror_state.Change` per revision.  When the watch cannot resume
(``Compacted``), the prefix is read afresh at a new revision and the difference comes as
one change (``resync``).  ``Unavailable`` and ``Timeout`` are retried after a growing
pause (a read is read again, a watch watched again from where it stopped; the first read
only if asked to, else :meth:`Mirror.start` fails with them); any other error ends the
mirror, as does a closed client.  A change its consumer fails to take is taken back and
the prefix read afresh.

Waits (:meth:`Mirror.wait`) are checked after each change; one for a revision the view
has not reached has the mirror confirm, with one small read, that nothing under the prefix
changed since the view's revision (:meth:`Mirror._check_progress`).

The state transitions are sans-IO, in :mod:`coord.recipes._mirror_state`; this module
only does the reads, the watch, the pauses and the timers.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import txaio
from twisted.internet import defer, task
from twisted.python.failure import Failure

from coord import errors
from coord.keyset import KeySet
from coord.recipes._loop import check_timeout, with_timeout
from coord.recipes._mirror_state import Change, MirrorState, View
from coord.types import Event, KeyValue

if TYPE_CHECKING:
    from coord.client import Client, WatchDeferred

__all__ = ["PAGE_SIZE", "Mirror", "MirrorPhase", "invoke"]

log = txaio.make_logger()  # type: ignore[attr-defined]  # set by txaio.use_twisted()

T = TypeVar("T")

# Keys per range request of a load.  The gateway has no practical response size limit
# (a 40 MiB range read works on 3.4.23 and 3.5.1 here), but pages bound the memory of one
# response and let a resync of a large prefix interleave with other work.
PAGE_SIZE = 2000

# A wait for a revision the view has not reached: how long the mirror lets the watch
# deliver before it asks etcd whether anything under the prefix changed at all; the pause
# doubles, up to PROGRESS_MAX_DELAY, while such checks leave a wait unsatisfied.
PROGRESS_DELAY = 0.05
PROGRESS_MAX_DELAY = 2.0

# Pauses before reading or watching again after Unavailable / Timeout (doubling), and
# after the consumer failed to take a change (a bug: read afresh, not in a tight loop).
PAUSE, MAX_PAUSE, BUG_PAUSE = 0.1, 2.0, 0.5


def invoke(callback: Callable[[Any], Any], value: Any, message: str, /,
           **fields: Any) -> None:
    """Call ``callback(value)``; log (``message``, ``fields``) an Exception it raises.

    A callback that returns a coroutine (an ``async def`` one) or a Deferred has it
    started and left to run: it is not awaited, and its failure is logged the same way.
    A BaseException that is not an Exception propagates.
    """
    try:
        result = callback(value)
    except Exception:
        log.failure(message, **fields)
        return
    if isinstance(result, Coroutine):
        result = defer.Deferred.fromCoroutine(result)
    if isinstance(result, defer.Deferred):
        result.addErrback(lambda failure: log.failure(message, failure, **fields))


class MirrorPhase(enum.Enum):
    NEW = "NEW"  # not started, or the first read failed
    LOADING = "LOADING"  # the first read
    WATCHING = "WATCHING"
    RESYNCING = "RESYNCING"  # reading afresh: after Compacted, or a change not taken
    CLOSED = "CLOSED"


class Mirror(Generic[T]):
    """Keeps a :class:`MirrorState` of the keys under ``keys`` in step with etcd.

    Args:
        client: the client to read and watch with.
        keys: the prefix (a :class:`~coord.keyset.KeySet`).
        on_change: called with each change of the view, the first load included, once
            the state has it.  If it raises, the change is taken back (it must leave its
            own state as it was): an Exception is logged and the prefix read afresh; a
            BaseException ends the mirror and propagates.
        on_end: called with None (the client was closed) or the error that ended the
            mirror by itself (not for :meth:`close`).
        closed_error: makes the exception waits fail with once the mirror ended.
        keep: what the state keeps per key (see :class:`MirrorState`).
        page_size: keys per range request.
        retry_first_read: retry the first read on Unavailable/Timeout (else
            :meth:`start` fails, and the mirror is NEW again).
        name: for the log.

    Attributes:
        state: the :class:`MirrorState`.  phase: a :class:`MirrorPhase`.
        resyncs: loads after the first.  watch: the current watch, if any.
        task: the read-then-watch loop while it runs.  waiters: the pending waits.
    """

    def __init__(self, client: Client, keys: KeySet, on_change: Callable[[Change[T]], None],
                 on_end: Callable[[BaseException | None], None],
                 closed_error: Callable[[], Exception],
                 keep: Callable[[KeyValue], T] | None = None, page_size: int = PAGE_SIZE,
                 retry_first_read: bool = False, name: str = "") -> None:
        self.client = client
        self.keys = keys
        self.state: MirrorState[T] = MirrorState(keep) if keep else MirrorState()
        self.phase = MirrorPhase.NEW
        self.resyncs = 0
        self.watch: WatchDeferred | None = None
        self.task: defer.Deferred[None] | None = None
        self.waiters: list[tuple[Callable[[], tuple[bool, Any]], defer.Deferred[Any],
                                 int | None]] = []
        self._on_change = on_change
        self._on_end = on_end
        self._closed_error = closed_error
        self._page_size = page_size
        self._retry_first = retry_first_read
        self._name = name or repr(keys.key)
        self._reactor = client.reactor
        self._started: defer.Deferred[None] | None = None
        self._io: defer.Deferred[Any] | None = None  # what the loop awaits
        self._again: float | None = None  # read afresh after this pause (a change not taken)
        self._backoff = PAUSE
        self._read_once = False  # a load completed once: the next ones are resyncs
        self._generation = 0  # of the watch: events of an earlier one are ignored
        self._flush_call: Any = None
        self._progress_call: Any = None
        self._progress_query: defer.Deferred[Any] | None = None
        self._progress_delay = PROGRESS_DELAY

    def __repr__(self) -> str:
        return f"<Mirror {self._name} {self.phase.name} revision={self.state.revision}>"

    @property
    def revision(self) -> int:
        return self.state.revision

    def view(self) -> View[T]:
        return self.state.view()

    # start and close --------------------------------------------------------------------------

    def start(self) -> defer.Deferred[None]:
        """Read, then watch.  Fires once ``on_change`` took the first load; fails with
        the first read's error (unless ``retry_first_read``).  Cancelling abandons it."""
        if self.phase is not MirrorPhase.NEW:
            raise errors.InvalidArgument(f"{self!r} was started already")
        self.phase = MirrorPhase.LOADING
        started = self._started = defer.Deferred(lambda _: self._stop_io())
        self.task = defer.Deferred.fromCoroutine(self._run())
        self.task.addBoth(self._ran)
        return started

    def close(self) -> None:
        """Stop: no ``on_change`` after this returns; waits fail.  Idempotent."""
        if self.phase is not MirrorPhase.CLOSED:
            self._end()

    def _end(self) -> None:
        self.phase = MirrorPhase.CLOSED
        self._drop_watch()
        if self._progress_call is not None and self._progress_call.active():
            self._progress_call.cancel()
        self._progress_call = None
        self._stop_io()
        query, self._progress_query = self._progress_query, None
        if query is not None:
            query.cancel()
        waiters, self.waiters = self.waiters, []
        for _, d, _ in waiters:
            if not d.called:
                d.errback(self._closed_error())

    def _stop_io(self) -> None:
        # Cancel what the loop awaits (never the loop itself while it runs: Twisted can
        # only cancel a coroutine that waits); the loop then sees the phase and ends.
        io, self._io = self._io, None
        if io is not None:
            io.cancel()

    def _ended_by_itself(self, error: BaseException | None) -> None:
        if self.phase is MirrorPhase.CLOSED:
            return
        if error is None:
            log.info("{name}: the client was closed: stopping", name=self._name)
        else:
            log.error("{name}: ended by {error!r}", name=self._name, error=error)
        self._end()
        self._on_end(error)

    def _ran(self, result: Any) -> None:
        self.task = None
        started, self._started = self._started, None
        if started is not None and not started.called:  # the first load did not complete
            if self.phase is not MirrorPhase.CLOSED:
                self.phase = MirrorPhase.NEW  # may be started again
            if isinstance(result, Failure):
                started.errback(result)
            else:
                started.errback(defer.CancelledError(f"{self!r} was closed while starting"))
        elif isinstance(result, Failure) and not result.check(defer.CancelledError):
            self._ended_by_itself(result.value)

    # the read-then-watch loop -----------------------------------------------------------------

    async def _await(self, d: defer.Deferred[Any]) -> Any:
        self._io = d
        try:
            return await d
        finally:
            if self._io is d:
                self._io = None

    def _closed(self) -> bool:
        """Whether the loop must end: closed, or the client was (which ends the mirror)."""
        if self.phase is MirrorPhase.CLOSED:
            return True
        if self.client.closed:
            self._ended_by_itself(None)
            return True
        return False

    async def _run(self) -> None:
        pause, read = 0.0, True
        while True:
            if pause:
                # In slices, to notice a closed client soon.
                end = self._reactor.seconds() + pause * (0.5 + random.random() / 2)
                while (left := end - self._reactor.seconds()) > 0 and not self._closed():
                    await self._await(task.deferLater(self._reactor, min(left, 0.5),
                                                      lambda: None))
            if self._closed():
                return
            try:
                if read:
                    loaded = await self._load()
                    if loaded is None:  # not taken by the consumer
                        pause = BUG_PAUSE
                        continue
                    watch, generation = loaded
                    read = False
                else:
                    watch, generation = self._watch()
                if self.phase is MirrorPhase.CLOSED:
                    return
                self.phase = MirrorPhase.WATCHING
                if self._started is not None:
                    started, self._started = self._started, None
                    started.callback(None)
                    if self.phase is MirrorPhase.CLOSED:
                        return
                self._want_progress()
                error = await self._watched(watch, generation)
            except defer.CancelledError:
                raise
            except Exception as exc:
                error = exc
            if self._closed():
                return
            if self._again is not None:  # a change not taken: read afresh
                pause, self._again, read = self._again, None, True
                continue
            if error is None:  # the client cancelled the watch, but is not closed
                error = errors.Unavailable("the watch was cancelled")
            if isinstance(error, errors.Compacted):
                log.info("{name}: {error}; reading the prefix afresh", name=self._name,
                         error=error)
                self.phase, pause, read = MirrorPhase.RESYNCING, 0.0, True
                continue
            if not isinstance(error, (errors.Unavailable, errors.Timeout)) or \
                    (not self.state.loaded and not self._retry_first):
                raise error
            pause, self._backoff = self._backoff, min(self._backoff * 2, MAX_PAUSE)
            log.warn("{name}: {what} failed ({error!r}); again in about {pause} s",
                     name=self._name, what="reading the prefix" if read else "the watch",
                     error=error, pause=pause)

    async def _load(self) -> tuple[WatchDeferred, int] | None:
        """Read the prefix, watch from the read's revision + 1, hand the load over.

        Returns:
            The watch and its generation; None if the consumer did not take the load.
        """
        revision, pages = await self._read()
        if self.phase is MirrorPhase.CLOSED:
            raise defer.CancelledError()
        self._backoff = PAUSE
        change = self.state.load(revision, pages)
        if self._read_once:
            self.resyncs += 1
            log.info("{name}: read afresh at revision {rev}: {n} keys differ",
                     name=self._name, rev=revision,
                     n=len(change.before.keys() | change.after.keys()))
        self._read_once = True
        # Watch from R + 1 before the consumer sees the read: it may look at the watch
        # (whose events wait for the end of this reactor turn).
        watched = self._watch()
        if not self._deliver(change):
            self._drop_watch()
            return None
        return watched  # (and the read's pages and change are let go)

    async def _read(self) -> tuple[int, list[list[KeyValue]]]:
        """Every key under the prefix as of one revision: ``(revision, pages of kvs)``.

        The first page is read at the current revision R; the next ones start after the
        last key so far and are read at R too, so all pages are of one revision (a
        compaction past R in between raises Compacted, and the read starts over).
        """
        while True:
            try:
                first = await self._await(self.client.get(self.keys, limit=self._page_size))
                revision = first.header.revision
                pages = [first.kvs]
                more = first.more
                while more and pages[-1]:
                    after = KeySet(pages[-1][-1].key + b"\0", self.keys.range_end)
                    page = await self._await(self.client.get(after, limit=self._page_size,
                                                             revision=revision))
                    pages.append(page.kvs)
                    more = page.more
                return revision, pages
            except errors.Compacted:
                continue  # compacted between two pages: read again at a newer revision

    def _watch(self) -> tuple[WatchDeferred, int]:
        """Watch from the view's revision + 1: the watch, and its generation."""
        self._generation += 1
        generation = self._generation

        def on_event(event: Event) -> None:
            if generation != self._generation:
                return
            self.state.pending.append(event)
            if self._flush_call is None:
                # The rest of this revision's events come in this same reactor turn
                # (one watch response): apply them together once it ends.
                self._flush_call = self._reactor.callLater(0, self._flush)

        # The one watch of the mirror.  On a stream of its own, not the client's shared
        # ones: a process has a mirror per prefix (a few), not thousands, and a prefix's
        # events can be many -- sharing would let one slow consumer hold up the streams
        # of every lock's `lost` (the hub delivers a stream's responses in order).
        watch = self.client.watch(self.keys, on_event, start_revision=self.state.revision + 1)
        self.watch = watch
        watch.watcher.ready.addCallbacks(self._watch_ready, lambda _: None)
        return watch, generation

    async def _watched(self, watch: WatchDeferred, generation: int) -> BaseException | None:
        """Wait until ``watch`` ends: None (cancelled) or the error that ended it.  The
        events it gave before it ended are applied."""
        error: BaseException | None = None
        try:
            await self._await(watch)
        except Exception as exc:
            error = exc
        if self.watch is watch:
            self.watch = None
        if generation == self._generation and self._flush_call is not None:
            self._flush_call.cancel()
            self._flush()
        return error

    def _watch_ready(self, _: Any) -> None:
        self._backoff = PAUSE

    def _flush(self) -> None:
        """Apply the buffered events, a revision at a time."""
        self._flush_call = None
        while self.phase is MirrorPhase.WATCHING:
            change = self.state.next_change()
            if change is None:
                return
            if not self._deliver(change):
                # Read the prefix afresh (the loop, once the watch is cancelled).
                self.phase, self._again = MirrorPhase.RESYNCING, BUG_PAUSE
                self._drop_watch()
                return

    def _drop_watch(self) -> None:
        """Cancel the watch, and forget what it buffered."""
        self._generation += 1
        self.state.pending.clear()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        watch, self.watch = self.watch, None
        if watch is not None:
            watch.cancel()

    def _deliver(self, change: Change[T]) -> bool:
        """Hand ``change`` to on_change, then check the waits.  False if on_change
        raised an Exception (logged; the change is taken back)."""
        try:
            self._on_change(change)
        except Exception:
            log.failure("{name}: taking the change to revision {rev} failed; reading the "
                        "prefix afresh", name=self._name, rev=change.revision)
            self.state.undo(change)
            return False
        except BaseException as exc:
            log.failure("{name}: {error!r} on the change to revision {rev}; stopping",
                        name=self._name, rev=change.revision, error=exc)
            self.state.undo(change)
            self._ended_by_itself(exc)
            raise
        if self.phase is not MirrorPhase.CLOSED:
            self._check_waiters()
        return True

    # waiting ----------------------------------------------------------------------------------

    def wait(self, test: Callable[[], tuple[bool, Any]], timeout: Any, what: str,
             revision: int | None = None) -> defer.Deferred[Any]:
        """Fire with ``test()[1]`` once ``test()[0]`` is true: checked now (once
        loaded) and after every change; fail with what ``test`` raises.

        Args:
            revision: the revision the test waits for, if any: while the view is
                behind it the mirror checks with etcd whether it is there already.
            what: for the Timeout's message.

        Raises:
            Timeout: not satisfied within ``timeout`` seconds (None: no limit).
            the closed error: the mirror ended (also before this call).

        Cancelling the Deferred stops the wait.
        """
        timeout = check_timeout(timeout)
        if self.phase is MirrorPhase.CLOSED:
            return defer.fail(self._closed_error())
        entry: tuple[Any, defer.Deferred[Any], int | None]

        def cancel(_: defer.Deferred[Any]) -> None:
            if entry in self.waiters:
                self.waiters.remove(entry)

        d: defer.Deferred[Any] = defer.Deferred(cancel)
        entry = (test, d, revision)
        self.waiters.append(entry)
        if self.state.loaded:
            self._check_waiters()
        return with_timeout(d, timeout, self._reactor, f"{self._name}: {what} within {timeout} s")

    def _check_waiters(self) -> None:
        """Fire the waits the view satisfies.  Re-entrant: a wait's continuation may
        wait again, cancel another wait or close the mirror."""
        ready: list[tuple[defer.Deferred[Any], Any]] = []
        for entry in list(self.waiters):
            if entry not in self.waiters:
                continue  # removed by a test (close(), cancel) meanwhile
            test, d, _ = entry
            if d.called:
                self.waiters.remove(entry)
                continue
            try:
                done, value = test()
            except Exception:
                done, value = True, Failure()
            if done and entry in self.waiters:
                self.waiters.remove(entry)
                ready.append((d, value))
        # Fire after the loop: continuations run with the list consistent, and may cancel
        # a wait of this same round (it is then skipped) or close (the rest then fail).
        for d, value in ready:
            if d.called:
                continue
            if self.phase is MirrorPhase.CLOSED:  # by an earlier continuation
                d.errback(self._closed_error())
            elif isinstance(value, Failure):
                d.errback(value)
            else:
                d.callback(value)
        self._want_progress()

    def _waiting_revision(self) -> int | None:
        """The lowest revision a wait waits for beyond the view, if any."""
        revisions = [r for _, d, r in self.waiters
                     if r is not None and r > self.state.revision and not d.called]
        return min(revisions) if revisions else None

    def _want_progress(self) -> None:
        if self._waiting_revision() is None:
            self._progress_delay = PROGRESS_DELAY
            return
        if self.phase is not MirrorPhase.WATCHING or self._progress_call is not None \
                or self._progress_query is not None:
            return
        self._progress_call = self._reactor.callLater(self._progress_delay,
                                                      self._check_progress)

    def _check_progress(self) -> None:
        """Move the view's revision forward without a change, for a wait's revision.

        The view is etcd's state of the prefix at any revision up to which nothing under
        the prefix changed.  Two ways to know it: the watch's own progress (every event
        before ``Watcher.revisions[0]`` was delivered -- a progress notification moves it
        without an event), and a read at the current revision H of the keys under the
        prefix with a mod revision after the view's: if there is none and the prefix
        holds as many keys as the view, then every key at H existed in the view with
        the same mod revision, so nothing changed up to H.  (A key created and deleted
        in between is no change of the state; the watch then delivers events at or
        before the view's new revision, which the state skips.)
        """
        self._progress_call = None
        if self.phase is not MirrorPhase.WATCHING or self._waiting_revision() is None:
            return
        watch = self.watch
        if watch is not None and not self.state.pending and self._flush_call is None:
            delivered = watch.watcher.revisions[0]
            if delivered is not None and delivered - 1 > self.state.revision:
                self._advance(delivered - 1)
                if self._waiting_revision() is None or self.phase is not MirrorPhase.WATCHING:
                    return
        revision, count = self.state.revision, len(self.state.entries)
        generation = self._generation
        query = self.client.get(self.keys, keys_only=True, limit=1,
                                min_mod_revision=revision + 1)
        self._progress_query = query

        def answered(result: Any) -> None:
            self._progress_query = None
            if generation != self._generation or self.phase is not MirrorPhase.WATCHING:
                self._want_progress()  # a resync ended meanwhile: check with the new watch
                return
            if self.state.revision == revision and not result.kvs and result.count == count:
                self._advance(result.header.revision)
            if self._waiting_revision() is not None:
                # Not satisfied: a change is on its way (its application checks again)
                # or the revision is in the future -- check again, less often.
                self._progress_delay = min(self._progress_delay * 2, PROGRESS_MAX_DELAY)
            self._want_progress()

        def failed(failure: Failure) -> None:
            self._progress_query = None
            if failure.check(defer.CancelledError) or self.client.closed:
                return
            log.debug("{name}: progress check failed: {error}", name=self._name,
                      error=failure.value)
            self._progress_delay = min(self._progress_delay * 2, PROGRESS_MAX_DELAY)
            self._want_progress()

        query.addCallbacks(answered, failed)

    def _advance(self, revision: int) -> None:
        change = self.state.advance(revision)
        if change is not None:
            self._deliver(change)
