"""ConfigWatcher: a consistent, live view of every key under a config prefix.

``start()`` reads the prefix at one revision R (paged: every page is read at R, so the
pages make one state of the store) and then watches it from R + 1 -- the read-then-watch
that never misses a change (DESIGN.md rules).  The watch (:meth:`coord.Client.watch`)
resumes by itself, exactly once, across broken streams, etcd restarts and endpoint
failover.

One view per revision: etcd gives a revision's events together (one transaction's puts
and deletes share a revision and arrive in one watch response, in one reactor turn), so
the events are buffered until the end of that reactor turn, grouped by mod revision and
applied a revision at a time.  Callbacks then see one :class:`ConfigChange` per
revision, and :meth:`ConfigWatcher.snapshot` only ever shows whole revisions (a revision
is decoded in full before the view changes): a snapshot is immutable as a mapping (the
watcher copies its dicts before changing them once a snapshot of them was handed out;
the decoded values themselves are shared, not copied).

The view's revision is a store revision at which etcd's state of the prefix is the view:
the read's, then each change's -- or a later one, when ``wait_revision`` has the watcher
confirm that nothing under the prefix changed since (``_check_progress``).  So
``wait_revision(await update(...))`` always returns, with the update in view.

A watch whose resume revision was compacted ends with :class:`~coord.errors.Compacted`
(``coord.watch``: etcd cancels such a watch with ``compact_revision`` set).  The watcher
then reads the prefix afresh at a new revision R' and reports the difference between the
old view and that read as *one* change (``resync=True``), then watches from R' + 1.  Any
other end of the watch does the same after a growing pause, logged.

A value that ``decode`` refuses is reported (:class:`~coord.errors.ConfigDecodeError`
with its key and revision, to ``on_error`` callbacks and the log); the view keeps the
key's last good value (or leaves a new key out), and the watch goes on.

See ``docs/config.md``.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import attrs
import txaio
from twisted.internet import defer, task
from twisted.python.failure import Failure

from coord import errors
from coord._checks import positive_int
from coord._sentinel import DEFAULT
from coord.errors import ConfigDecodeError, ConfigStopped
from coord.keyset import KeySet, as_bytes
from coord.recipes._loop import check_timeout, with_timeout
from coord.txn import CompModified, OpDel, OpSet, Transaction
from coord.types import Event, EventType, KeyValue

__all__ = [
    "ConfigChange",
    "ConfigSnapshot",
    "ConfigState",
    "ConfigStopped",
    "ConfigWatcher",
]

log = txaio.make_logger()  # type: ignore[attr-defined]  # set by txaio.use_twisted()

# Keys per range request of a load.  The gateway has no practical response size limit
# (a 40 MiB range read works on 3.4.23 and 3.5.1 here), but pages bound the memory of one
# response and let a resync of a large prefix interleave with other work.
PAGE_SIZE = 2000

# wait_revision(rev) for a revision the view has not reached: how long the watcher lets
# the watch deliver before it asks etcd whether anything under the prefix changed at all
# (see ConfigWatcher._check_progress); the pause doubles, up to PROGRESS_MAX_DELAY, while
# such checks leave a wait unsatisfied (a revision in the future).
PROGRESS_DELAY = 0.05
PROGRESS_MAX_DELAY = 2.0


class ConfigState(enum.Enum):
    NEW = "NEW"  # not started, or the first read failed
    LOADING = "LOADING"  # the first read
    WATCHING = "WATCHING"
    RESYNCING = "RESYNCING"  # reading afresh: the watch fell behind a compaction or ended
    STOPPED = "STOPPED"


class ConfigSnapshot(Mapping[bytes, Any]):
    """The decoded values under the prefix as of one revision: an immutable mapping.

    Keys are full keys (prefix included).  Equal to any mapping with the same items.

    Attributes:
        revision: the store revision this view reflects (the read's revision, or the
            revision of the last change applied).
    """

    __slots__ = ("_mods", "_values", "revision")

    def __init__(self, values: dict[bytes, Any], mods: dict[bytes, int], revision: int) -> None:
        self._values = values  # never changed once a snapshot holds it
        self._mods = mods
        self.revision = revision

    def __getitem__(self, key: bytes) -> Any:
        return self._values[key]

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"<ConfigSnapshot revision={self.revision} keys={len(self._values)}>"

    def mod_revision(self, key: bytes) -> int:
        """The mod revision of ``key``'s value in etcd at this revision (0: absent).

        For a key whose newest value failed to decode this is that value's revision,
        while the snapshot holds the last good one.
        """
        return self._mods.get(key, 0)


@attrs.frozen
class ConfigChange:
    """What one revision (or one resync) changed in the view.

    Attributes:
        revision: the revision the view reflects after the change.
        added: keys that appeared, with their values.
        changed: keys that were written and had a value before, with their new values.
        removed: keys that disappeared, with the values they had.
        previous, snapshot: the view before and after.
        resync: True when the change is the difference between the view and a fresh
            read (after a compaction or a watch that ended), not one revision's events.
    """

    revision: int
    added: Mapping[bytes, Any]
    changed: Mapping[bytes, Any]
    removed: Mapping[bytes, Any]
    previous: ConfigSnapshot
    snapshot: ConfigSnapshot
    resync: bool = False


def _identity(value: bytes) -> bytes:
    return value


_ABSENT = object()  # a key deleted by a revision being applied


class ConfigWatcher:
    """A live view of the keys under ``prefix``, decoded by ``decode``.

    Args:
        client: a :class:`coord.Client`.
        prefix: the config prefix (bytes or str, not empty), e.g. ``b"config/app/"``.
        decode: turns a value (bytes) into what the view holds, e.g. ``json.loads``
            (default: keep the bytes).  An exception from it is a decode error.
        encode: what :meth:`update` applies to values by default (e.g. ``json.dumps``);
            default: values must be bytes or str.
        page_size: keys per range request when reading the prefix.

    Attributes:
        prefix: the prefix.  state: a :class:`ConfigState`.
        resyncs: how many times the view was read afresh after the first read.

    Raises:
        TypeError: a prefix that is not bytes/str, a decode/encode that is not callable.
        InvalidArgument: an empty prefix (every key in etcd is not a config), a bad
            page size.
    """

    def __init__(self, client: Any, prefix: bytes | str,
                 decode: Callable[[bytes], Any] | None = None,
                 encode: Callable[[Any], bytes | str] | None = None,
                 page_size: int = PAGE_SIZE) -> None:
        prefix = as_bytes(prefix, "prefix")
        if not prefix:
            raise errors.InvalidArgument("a ConfigWatcher's prefix must not be empty")
        for name, fn in (("decode", decode), ("encode", encode)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, not {type(fn).__name__}")
        page_size = positive_int("page_size", page_size)
        self.client = client
        self.prefix = prefix
        self.keys = KeySet(prefix, prefix=True)
        self._decode = decode or _identity
        self._encode = encode
        self._page_size = page_size
        self._reactor = client.reactor
        self.state = ConfigState.NEW
        self.resyncs = 0
        # The view: decoded values and each key's mod revision in etcd.  Once a snapshot
        # shares these dicts (`_shared`), they are copied before the next change.
        self._values: dict[bytes, Any] = {}
        self._mods: dict[bytes, int] = {}
        self._errors: dict[bytes, ConfigDecodeError] = {}
        self._revision = 0
        self._loaded = False  # the first read completed (a view exists)
        self._snapshot: ConfigSnapshot | None = None
        self._shared = False  # a snapshot holds _values/_mods: copy them before a change
        self._on_change: list[Callable[[ConfigChange], Any]] = []
        self._on_error: list[Callable[[ConfigDecodeError], Any]] = []
        # (test, Deferred, revision awaited or None): see _wait and _check_waiters.
        self._waiters: list[tuple[Callable[[ConfigSnapshot], tuple[bool, Any]],
                                  defer.Deferred[Any], int | None]] = []
        self._watch: Any = None
        self._generation = 0  # of the watch: events of an earlier one are ignored
        self._pending: list[Event] = []
        self._flush_call: Any = None
        self._task: defer.Deferred[Any] | None = None  # the first read or a resync
        # Progress checks for wait_revision (see _check_progress).
        self._progress_call: Any = None
        self._progress_query: defer.Deferred[Any] | None = None
        self._progress_delay = PROGRESS_DELAY

    def __repr__(self) -> str:
        errs = f" errors={len(self._errors)}" if self._errors else ""
        return (f"<ConfigWatcher {self.prefix!r} {self.state.name} revision={self._revision} "
                f"keys={len(self._values)}{errs}>")

    # the view ---------------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        """The store revision the view reflects (0 before the first read).

        The view is etcd's state of the prefix at that revision: the read's revision,
        then the revision of each change applied -- or a later one, when a
        :meth:`wait_revision` made the watcher confirm that nothing under the prefix
        changed since.
        """
        return self._revision

    @property
    def decode_errors(self) -> Mapping[bytes, ConfigDecodeError]:
        """The keys whose newest value failed to decode, with the error (read-only).

        A live view: it follows the watcher, across resyncs too (a resync keeps the
        error of a key whose bad value is unchanged, reports and records those of new
        bad values, and drops the others).
        """
        return MappingProxyType(self._errors)

    def snapshot(self) -> ConfigSnapshot:
        """The view now: an immutable mapping of key -> decoded value, with its revision.

        Raises:
            InvalidArgument: the first read has not completed (also when the watcher
                was stopped before it did).
        """
        if not self._loaded:
            raise errors.InvalidArgument(f"{self!r} has no view yet: await start() first")
        return self._current()

    def _current(self) -> ConfigSnapshot:
        if self._snapshot is None:
            self._snapshot = ConfigSnapshot(self._values, self._mods, self._revision)
            self._shared = True  # copy the dicts before the next change
        return self._snapshot

    def get(self, key: bytes | str, default: Any = None) -> Any:
        """The decoded value of ``key`` in the view, or ``default``."""
        return self._values.get(as_bytes(key, "key"), default)

    def on_change(self, callback: Callable[[ConfigChange], Any]) -> Callable[[], None]:
        """Call ``callback(change)`` with a :class:`ConfigChange` for each revision that
        changes the view (and once per resync that does).  Not called for the first read.

        A callback's exception is logged and the watcher goes on.  A callback removed
        (or a watcher stopped) by an earlier callback of the same change is not called.

        Returns:
            A function that removes the callback.
        """
        return self._subscribe(self._on_change, callback)

    def on_error(self, callback: Callable[[ConfigDecodeError], Any]) -> Callable[[], None]:
        """Call ``callback(error)`` for each value that fails to decode (also on reads).

        Returns:
            A function that removes the callback.
        """
        return self._subscribe(self._on_error, callback)

    @staticmethod
    def _subscribe(callbacks: list[Any], callback: Any) -> Callable[[], None]:
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        callbacks.append(callback)

        def remove() -> None:
            if callback in callbacks:
                callbacks.remove(callback)

        return remove

    # start and stop ---------------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> defer.Deferred[ConfigSnapshot]:
        """Read the prefix, then watch it from the read's revision + 1.

        Args:
            timeout: seconds the first read may take, more than 0 (None or infinity:
                the client's per-call timeouts only).

        Returns:
            Deferred firing with the first :class:`ConfigSnapshot`.

        Raises:
            Timeout: the read did not complete in time (the watcher is back to NEW and
                may be started again).
            Unavailable, EtcdError: the read failed (idem).
            InvalidArgument: already started or stopped; a negative, NaN or 0 ``timeout``
                (a read cannot be done in no time: it would always time out).
            TypeError: ``timeout`` is not a number.

        Cancelling the Deferred abandons the read (the watcher is back to NEW).
        """
        timeout = check_timeout(timeout, zero_ok=False)
        if self.state is not ConfigState.NEW:
            raise errors.InvalidArgument(f"{self!r} was started already")
        self.state = ConfigState.LOADING
        d = defer.Deferred.fromCoroutine(self._start())
        self._task = d

        def failed(failure: Failure) -> Failure:
            if self.state is ConfigState.LOADING:
                self.state = ConfigState.NEW
            self._task = None
            return failure

        d.addErrback(failed)
        return with_timeout(d, timeout, self._reactor,
                            f"could not read config prefix {self.prefix!r} within {timeout} s")

    async def _start(self) -> ConfigSnapshot:
        await self._load(resync=False)
        if self.state is ConfigState.STOPPED:
            # stop() from an on_error callback of the first read: cancelling this
            # coroutine while it ran did nothing, so end it here.
            raise defer.CancelledError(f"{self!r} was stopped while starting")
        self._task = None
        self.state = ConfigState.WATCHING
        self._watch_from(self._revision + 1)
        self._check_waiters()
        return self.snapshot()

    def stop(self) -> None:
        """Stop watching: no callback after this returns; waiters fail with ConfigStopped.

        Idempotent.  The last view stays readable.
        """
        if self.state is ConfigState.STOPPED:
            return
        self.state = ConfigState.STOPPED
        self._generation += 1
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
        running, self._task = self._task, None
        if running is not None:
            running.cancel()
        for call in (self._flush_call, self._progress_call):
            if call is not None and call.active():
                call.cancel()
        self._flush_call = self._progress_call = None
        query, self._progress_query = self._progress_query, None
        if query is not None:
            query.cancel()
        self._pending = []
        waiters, self._waiters = self._waiters, []
        for _, d, _ in waiters:
            if not d.called:
                d.errback(ConfigStopped(f"{self!r} was stopped"))

    async def __aenter__(self) -> ConfigWatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()

    # reading ----------------------------------------------------------------------------------

    async def _read_pages(self) -> tuple[int, list[list[KeyValue]]]:
        """Every key under the prefix as of one revision: ``(revision, pages of kvs)``.

        The first page is read at the current revision R; the next ones start after the
        last key so far and are read at R too, so all pages are of one revision (a
        compaction past R in between raises Compacted, and the load starts over).
        """
        first = await self.client.get(self.keys, limit=self._page_size)
        revision = first.header.revision
        pages = [first.kvs]
        more = first.more
        while more and pages[-1]:
            after = KeySet(pages[-1][-1].key + b"\0", self.keys.range_end)
            page = await self.client.get(after, limit=self._page_size, revision=revision)
            pages.append(page.kvs)
            more = page.more
        return revision, pages

    async def _load(self, resync: bool) -> None:
        """Read the prefix and make it the view; for a resync, report the difference."""
        while True:
            try:
                revision, pages = await self._read_pages()
                break
            except errors.Compacted:
                continue  # compacted between two pages: read again at a newer revision
        old_values, old_mods, old_errors = self._values, self._mods, self._errors
        values: dict[bytes, Any] = {}
        mods: dict[bytes, int] = {}
        new_errors: dict[bytes, ConfigDecodeError] = {}
        failed: list[ConfigDecodeError] = []
        decoded: set[bytes] = set()  # keys whose value is new since the old view
        decode = self._decode
        # Nothing of the view changes until every value is decoded: a decode raising a
        # BaseException leaves the old view whole.
        for page in pages:
            for kv in page:
                key, mod = kv.key, kv.mod_revision
                mods[key] = mod
                if old_mods.get(key) == mod:  # unchanged since the old view
                    if key in old_values:
                        values[key] = old_values[key]
                    if key in old_errors:
                        new_errors[key] = old_errors[key]
                    continue
                try:
                    values[key] = decode(kv.value)
                    decoded.add(key)
                except Exception as exc:
                    error = ConfigDecodeError(key, mod, exc)
                    new_errors[key] = error
                    failed.append(error)
                    if key in old_values:
                        values[key] = old_values[key]  # the last good value
        previous = self._snapshot_for_change() if resync and self._loaded else None
        self._values, self._mods = values, mods
        self._shared = False
        # In place: decode_errors hands out a live read-only view of this dict.
        self._errors.clear()
        self._errors.update(new_errors)
        self._revision = revision
        self._snapshot = None
        self._loaded = True
        for error in failed:
            self._report(error)
            if self.state is ConfigState.STOPPED:
                return  # an on_error callback stopped us: nothing more
        if not resync:
            return
        self.resyncs += 1
        added = {k: v for k, v in values.items() if k not in old_values}
        changed = {k: values[k] for k in decoded if k in old_values}
        removed = {k: v for k, v in old_values.items() if k not in values}
        log.info("config {prefix!r} read afresh at revision {rev}: {a} added, "
                 "{c} changed, {r} removed", prefix=self.prefix, rev=revision,
                 a=len(added), c=len(changed), r=len(removed))
        if previous is not None:
            self._publish(previous, added, changed, removed, resync=True)
        else:
            self._check_waiters()

    # watching ---------------------------------------------------------------------------------

    def _watch_from(self, revision: int) -> None:
        self._generation += 1
        generation = self._generation

        def on_event(event: Event) -> None:
            if generation != self._generation:
                return
            self._pending.append(event)
            if self._flush_call is None:
                # The rest of this revision's events come in this same reactor turn
                # (one watch response): apply them together once it ends.
                self._flush_call = self._reactor.callLater(0, self._flush)

        self._watch = self.client.watch(self.keys, on_event, start_revision=revision)
        self._watch.addBoth(self._watch_ended, generation)

    def _flush(self) -> None:
        """Apply the buffered events, a revision at a time.

        Events stay in ``self._pending`` until their revision is taken for applying, so
        an exception never loses the revisions after it: an Exception (a bug: callbacks'
        and waiters' errors are caught earlier) is logged and the view is read afresh; a
        BaseException (KeyboardInterrupt, ... from ``decode`` or a callback) stops the
        watcher -- the view keeps the last whole revision -- and propagates.
        """
        self._flush_call = None
        pending = self._pending
        while pending and pending is self._pending and self.state is not ConfigState.STOPPED:
            revision = pending[0].kv.mod_revision
            n = 1
            while n < len(pending) and pending[n].kv.mod_revision == revision:
                n += 1
            batch = pending[:n]
            del pending[:n]
            if revision <= self._revision:
                continue  # the view reflects it already (see _check_progress)
            try:
                self._apply(batch)
            except Exception:
                log.failure("config {prefix!r}: applying revision {rev} failed; reading "
                            "the prefix afresh", prefix=self.prefix, rev=revision)
                self._restart()
                return
            except BaseException:
                log.failure("config {prefix!r}: decode or a callback raised on revision "
                            "{rev}; stopping", prefix=self.prefix, rev=revision)
                self.stop()
                raise

    def _apply(self, events: list[Event]) -> None:
        """Apply one revision's events to the view and report them as one change.

        All or nothing: every value is decoded before the view changes.
        """
        revision = events[0].kv.mod_revision
        old_values = self._values
        # 1. Decode (user code, may raise anything): stage the new state of each key.
        staged: dict[bytes, Any] = {}  # key -> new value, or _ABSENT
        staged_mods: dict[bytes, int | None] = {}  # None: the key is gone
        staged_errors: dict[bytes, ConfigDecodeError | None] = {}  # None: clear it
        written: set[bytes] = set()  # keys given a new good value
        failed: list[ConfigDecodeError] = []
        for event in events:
            key = event.kv.key
            if event.type is EventType.DELETE:
                staged[key] = _ABSENT
                staged_mods[key] = None
                staged_errors[key] = None
                written.discard(key)
                continue
            staged_mods[key] = revision
            try:
                staged[key] = self._decode(event.kv.value)
            except Exception as exc:
                error = ConfigDecodeError(key, revision, exc)
                staged_errors[key] = error
                failed.append(error)
                continue  # the view keeps the last good value, if any
            staged_errors[key] = None
            written.add(key)
        # 2. Apply (no user code): the view moves to the revision as a whole.
        previous = self._snapshot_for_change()
        before = {key: (key in old_values, old_values.get(key)) for key in staged_mods}
        if self._shared:  # copy on write: snapshots keep the old dicts
            self._values, self._mods = dict(self._values), dict(self._mods)
            self._shared = False
        values, mods, errs = self._values, self._mods, self._errors
        for key, value in staged.items():
            if value is _ABSENT:
                values.pop(key, None)
            else:
                values[key] = value
        for key, mod in staged_mods.items():
            if mod is None:
                mods.pop(key, None)
            else:
                mods[key] = mod
        for key, err in staged_errors.items():
            if err is None:
                errs.pop(key, None)
            else:
                errs[key] = err
        self._revision = revision
        self._snapshot = None
        # 3. Report.
        for error in failed:
            self._report(error)
            if self.state is ConfigState.STOPPED:
                return  # an on_error callback stopped us: no on_change, no waiter
        added, changed, removed = {}, {}, {}
        for key, (was, old) in before.items():
            if key in values:
                if not was:
                    added[key] = values[key]
                elif key in written:
                    changed[key] = values[key]
            elif was:
                removed[key] = old
        if previous is not None:
            self._publish(previous, added, changed, removed, resync=False)
        else:
            self._check_waiters()

    def _snapshot_for_change(self) -> ConfigSnapshot | None:
        """The view before a change, when a change object will need it (callbacks).

        Kept as the current snapshot, so that the change copies the dicts first.
        """
        return self._current() if self._on_change else None

    def _publish(self, previous: ConfigSnapshot, added: dict, changed: dict, removed: dict,
                 resync: bool) -> None:
        if added or changed or removed:
            change = ConfigChange(self._revision, MappingProxyType(added),
                                  MappingProxyType(changed), MappingProxyType(removed),
                                  previous, self._current(), resync)
            for callback in list(self._on_change):
                if self.state is ConfigState.STOPPED:
                    return  # stopped by an earlier callback: no callback after stop()
                if callback not in self._on_change:
                    continue  # removed by an earlier callback of this change
                try:
                    callback(change)
                except Exception:
                    log.failure("config callback {cb!r} raised on revision {rev}; the "
                                "watcher goes on", cb=callback, rev=self._revision)
        if self.state is not ConfigState.STOPPED:
            self._check_waiters()

    def _report(self, error: ConfigDecodeError) -> None:
        log.warn("config {prefix!r}: {error}; keeping the last good value",
                 prefix=self.prefix, error=error)
        for callback in list(self._on_error):
            if self.state is ConfigState.STOPPED:
                return
            if callback not in self._on_error:
                continue
            try:
                callback(error)
            except Exception:
                log.failure("config error callback {cb!r} raised", cb=callback)

    def _watch_ended(self, result: Any, generation: int) -> None:
        if generation != self._generation or self.state is ConfigState.STOPPED:
            if isinstance(result, Failure):
                result.trap(Exception)  # an earlier watch's end: nothing to report
            return
        self._watch = None
        # Events the watch gave before it ended belong to whole revisions: apply them.
        if self._flush_call is not None:
            self._flush_call.cancel()
            self._flush()
        if self.state is not ConfigState.WATCHING:
            return  # stopped by a callback, or the flush started a resync already
        if result is None or not isinstance(result, Failure):
            # Not cancelled by us: the client was closed.
            log.info("config {prefix!r}: the watch was cancelled (client closed?): stopping",
                     prefix=self.prefix)
            self.stop()
            return
        if result.check(errors.Compacted):
            log.info("config {prefix!r}: {error}; reading the prefix afresh",
                     prefix=self.prefix, error=result.value)
            delay = 0.0
        else:
            log.failure("config {prefix!r}: the watch ended; reading the prefix afresh",
                        failure=result, prefix=self.prefix)
            delay = 0.5
        self._start_resync(delay)

    def _restart(self) -> None:
        """Drop the watch and what it buffered, and read the prefix afresh."""
        self._generation += 1
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self._pending = []
        self._start_resync(0.5)

    def _start_resync(self, delay: float) -> None:
        self.state = ConfigState.RESYNCING
        self._task = defer.Deferred.fromCoroutine(self._resync(delay))

        def failed(failure: Failure) -> None:
            if not failure.check(defer.CancelledError):
                log.failure("config {prefix!r}: reading the prefix afresh failed",
                            failure=failure, prefix=self.prefix)

        self._task.addErrback(failed)

    def _client_closed(self) -> bool:
        if not self.client.closed:
            return False
        if self.state is not ConfigState.STOPPED:
            log.info("config {prefix!r}: the client was closed: stopping", prefix=self.prefix)
            self.stop()
        return True

    async def _resync(self, delay: float) -> None:
        backoff = 0.1
        try:
            while True:
                if delay:
                    # In slices, to notice a closed client soon.
                    end = self._reactor.seconds() + delay * (0.5 + random.random() / 2)
                    while (left := end - self._reactor.seconds()) > 0:
                        await task.deferLater(self._reactor, min(left, 0.5), lambda: None)
                        if self._client_closed():
                            return
                if self._client_closed():
                    return
                try:
                    await self._load(resync=True)
                    break
                except defer.CancelledError:
                    raise
                except Exception as exc:
                    if self.state is ConfigState.STOPPED or self._client_closed():
                        return
                    log.warn("config {prefix!r}: reading the prefix failed ({error!r}); "
                             "again", prefix=self.prefix, error=exc)
                    delay = backoff
                    backoff = min(backoff * 2, 5.0)
        except BaseException as exc:
            if not isinstance(exc, defer.CancelledError) and \
                    self.state is not ConfigState.STOPPED:
                self.stop()  # decode raised e.g. KeyboardInterrupt: see _flush
            raise
        if self.state is ConfigState.RESYNCING:
            self._task = None
            self.state = ConfigState.WATCHING
            self._watch_from(self._revision + 1)
            self._want_progress()

    # waiting ----------------------------------------------------------------------------------

    def wait_for(self, key: bytes | str, predicate: Callable[[Any], Any] | None = None,
                 timeout: float | None = None) -> defer.Deferred[Any]:
        """Wait until ``key`` is in the view and ``predicate(value)`` is true.

        Checked at once (if the view is loaded) and after every change of the view.

        Args:
            key: a key under the prefix.
            predicate: called with the decoded value (default: any value will do).
            timeout: seconds to wait at most (None: no limit).

        Returns:
            Deferred firing with the value that satisfied the predicate.

        Raises:
            Timeout: not satisfied in time.  ConfigStopped: the watcher stopped meanwhile.
            InvalidArgument: a key outside the prefix.  TypeError: a bad key or
            predicate.  Whatever ``predicate`` raises.

        Cancelling the Deferred stops the wait.
        """
        key = self._key(key)
        if predicate is not None and not callable(predicate):
            raise TypeError(f"predicate must be callable, not {type(predicate).__name__}")

        def test(snapshot: ConfigSnapshot) -> tuple[bool, Any]:
            if key not in snapshot:
                return False, None
            value = snapshot[key]
            return (predicate is None or bool(predicate(value))), value

        return self._wait(test, timeout, f"{key!r} did not satisfy {predicate!r}")

    def wait_revision(self, revision: int, timeout: float | None = None
                      ) -> defer.Deferred[ConfigSnapshot]:
        """Wait until the view reflects the store at ``revision`` or later; fires with
        its snapshot (whose ``revision`` is then >= ``revision``).

        Any revision will do: that of an :meth:`update` (also one that changed nothing
        under the prefix), of a write elsewhere, ``snapshot.revision + 1`` for "newer
        than this snapshot".  The view reaches it when the watch delivers a change at or
        after it, or -- when no change under the prefix comes -- once the watcher has
        confirmed with etcd (one small read, after a short pause) that nothing under the
        prefix changed since the view's revision.  A revision in the future is waited
        for.

        Raises:
            Timeout, ConfigStopped, TypeError, InvalidArgument: as :meth:`wait_for`.
        """
        if isinstance(revision, bool) or not isinstance(revision, int):
            raise TypeError(f"revision must be an int, not {type(revision).__name__}")
        if revision < 0:
            raise errors.InvalidArgument(f"revision must be >= 0, not {revision}")
        return self._wait(lambda snap: (snap.revision >= revision, snap), timeout,
                          f"revision {revision} not reached", revision)

    def _wait(self, test: Callable[[ConfigSnapshot], tuple[bool, Any]], timeout: Any,
              what: str, revision: int | None = None) -> defer.Deferred[Any]:
        timeout = check_timeout(timeout)
        if self.state is ConfigState.STOPPED:
            return defer.fail(ConfigStopped(f"{self!r} is stopped"))
        entry: tuple[Any, defer.Deferred[Any], int | None]

        def cancel(_: defer.Deferred[Any]) -> None:
            if entry in self._waiters:
                self._waiters.remove(entry)

        d: defer.Deferred[Any] = defer.Deferred(cancel)
        entry = (test, d, revision)
        self._waiters.append(entry)
        if self._loaded:
            self._check_waiters()
        return with_timeout(d, timeout, self._reactor,
                            f"config {self.prefix!r}: {what} within {timeout} s")

    def _check_waiters(self) -> None:
        """Fire the waiters the view satisfies.  Re-entrant: a waiter's continuation may
        wait again, cancel another waiter or stop the watcher."""
        if not self._waiters:
            self._want_progress()
            return
        snapshot = self._current()
        ready: list[tuple[defer.Deferred[Any], Any]] = []
        for entry in list(self._waiters):
            if entry not in self._waiters:
                continue  # removed by a predicate (stop(), cancel) meanwhile
            test, d, _ = entry
            if d.called:
                self._waiters.remove(entry)
                continue
            try:
                done, value = test(snapshot)
            except Exception:
                done, value = True, Failure()
            if done and entry in self._waiters:
                self._waiters.remove(entry)
                ready.append((d, value))
        # Fire after the loop: continuations run with the waiter list consistent, and
        # may cancel a waiter of this same round (it is then skipped) or stop() (the
        # rest then fail with ConfigStopped, as stop() promises).
        for d, value in ready:
            if d.called:
                continue
            if self.state is ConfigState.STOPPED:  # by an earlier continuation
                d.errback(ConfigStopped(f"{self!r} was stopped"))
            elif isinstance(value, Failure):
                d.errback(value)
            else:
                d.callback(value)
        self._want_progress()

    def _waiting_revision(self) -> int | None:
        """The lowest revision a wait_revision waits for beyond the view, if any."""
        revisions = [r for _, d, r in self._waiters
                     if r is not None and r > self._revision and not d.called]
        return min(revisions) if revisions else None

    def _want_progress(self) -> None:
        if self._waiting_revision() is None:
            self._progress_delay = PROGRESS_DELAY
            return
        if self.state is not ConfigState.WATCHING or self._progress_call is not None \
                or self._progress_query is not None:
            return
        self._progress_call = self._reactor.callLater(self._progress_delay,
                                                      self._check_progress)

    def _check_progress(self) -> None:
        """Move the view's revision forward without a change, for wait_revision.

        The view is etcd's state of the prefix at any revision up to which nothing under
        the prefix changed.  Two ways to know it: the watch's own progress (every event
        before ``Watcher.revisions[0]`` was delivered -- a progress notification moves it
        without an event), and a read at the current revision H of the keys under the
        prefix with a mod revision after the view's: if there is none and the prefix
        holds as many keys as the view, then every key at H existed in the view with
        the same mod revision, so nothing changed up to H.  (A key created and deleted
        in between is no change of the state; the watch then delivers events at or
        before the view's new revision, which the view skips.)
        """
        self._progress_call = None
        if self.state is not ConfigState.WATCHING or self._waiting_revision() is None:
            return
        watch = self._watch
        if watch is not None and not self._pending and self._flush_call is None:
            delivered = watch.watcher.revisions[0]
            if delivered is not None and delivered - 1 > self._revision:
                self._advance(delivered - 1)
                if self._waiting_revision() is None or self.state is not ConfigState.WATCHING:
                    return
        revision, count, generation = self._revision, len(self._mods), self._generation
        query = self.client.get(self.keys, keys_only=True, limit=1,
                                min_mod_revision=revision + 1)
        self._progress_query = query

        def answered(result: Any) -> None:
            self._progress_query = None
            if generation != self._generation or self.state is not ConfigState.WATCHING:
                self._want_progress()  # a resync ended meanwhile: check with the new watch
                return
            if self._revision == revision and not result.kvs and result.count == count:
                self._advance(result.header.revision)
            if self._waiting_revision() is not None:
                # Not satisfied: a change is on its way (its application checks again)
                # or the revision is in the future -- check again, less often.
                self._progress_delay = min(self._progress_delay * 2, PROGRESS_MAX_DELAY)
            self._want_progress()

        def failed(failure: Failure) -> None:
            self._progress_query = None
            if failure.check(defer.CancelledError) or self._client_closed():
                return
            log.debug("config {prefix!r}: progress check failed: {error}",
                      prefix=self.prefix, error=failure.value)
            self._progress_delay = min(self._progress_delay * 2, PROGRESS_MAX_DELAY)
            self._want_progress()

        query.addCallbacks(answered, failed)

    def _advance(self, revision: int) -> None:
        """The view (unchanged) is known to reflect ``revision``: a newer snapshot."""
        if revision <= self._revision:
            return
        self._revision = revision
        self._snapshot = None  # a new snapshot, of the same (shared) dicts
        self._check_waiters()

    # writing ----------------------------------------------------------------------------------

    def _key(self, key: Any) -> bytes:
        key = as_bytes(key, "key")
        if not key.startswith(self.prefix):
            raise errors.InvalidArgument(f"{key!r} is not under the prefix {self.prefix!r}")
        return key

    def update(self, values: Mapping[Any, Any] | None = None, delete: Iterable[Any] = (), *,
               encode: Callable[[Any], bytes | str] | None = None,
               expect: ConfigSnapshot | None = None,
               timeout: Any = DEFAULT) -> defer.Deferred[int]:
        """Write and delete several config keys atomically, in one transaction.

        Needs no :meth:`start` (unless ``expect`` comes from this watcher's view).

        Args:
            values: key -> value to write (keys under the prefix).
            delete: keys to delete.
            encode: applied to each value (default: the watcher's ``encode``; without
                one, values must be bytes or str).
            expect: a snapshot the update was computed from: the transaction holds
                only if no key under the prefix was created or written after
                ``expect.revision``, and no key this update writes or deletes was
                deleted since -- a read-modify-write fails instead of clobbering a
                change it did not see.  (A deletion of a key the update does not touch
                is not detected.)
            timeout: for the transaction (default: the client's).

        Returns:
            Deferred firing with the transaction's revision -- the store's revision when
            it changed nothing (deleted only missing keys).  ``wait_revision`` it to see
            the view reflect the update: read-your-writes, in both cases.

        Raises:
            Failed: ``expect`` did not hold; nothing was written.  Retry from a newer
                snapshot: ``wait_revision(failed.header.revision)`` waits until the view
                shows what the transaction saw.
            InvalidArgument: a key outside the prefix, a key both written and deleted,
                a key written twice (as str and bytes), nothing to do.
            TooManyOperations: more than 128 keys (or, with ``expect``, more than 127
                existing keys touched).
            TypeError: a key or encoded value that is not bytes/str.
        """
        if values is not None and not isinstance(values, Mapping):
            raise TypeError(f"values must be a mapping, not {type(values).__name__}")
        values = dict(values or {})
        if isinstance(delete, (bytes, str)):
            raise TypeError("delete takes a list of keys, not one key")
        writes: dict[bytes, Any] = {}
        for k, v in values.items():
            key = self._key(k)
            if key in writes:  # the same key as str and bytes: etcd refuses duplicates
                raise errors.InvalidArgument(f"{key!r} is given twice (as str and bytes)")
            writes[key] = v
        deletes = [self._key(k) for k in delete]
        if set(deletes) & writes.keys():
            raise errors.InvalidArgument("a key cannot be both written and deleted")
        if not writes and not deletes:
            raise errors.InvalidArgument("update() needs values to write or keys to delete")
        encode = encode if encode is not None else self._encode
        if encode is not None and not callable(encode):
            raise TypeError(f"encode must be callable, not {type(encode).__name__}")
        ops: list[Any] = [OpSet(k, as_bytes(encode(v) if encode else v, "value"))
                          for k, v in writes.items()]
        ops.extend(OpDel(k) for k in dict.fromkeys(deletes))
        compare: list[Any] = []
        if expect is not None:
            if not isinstance(expect, ConfigSnapshot):
                raise TypeError(f"expect must be a ConfigSnapshot, not {type(expect).__name__}")
            # Every key under the prefix last written at or before the snapshot's
            # revision (a range comparison holds when it holds for each key: rpc.proto
            # Compare.range_end) ...
            compare.append(CompModified(self.keys, "<", expect.revision + 1))
            # ... and each key we touch that existed then still exists with the same mod
            # revision (a deletion is invisible to the range comparison).
            for key in list(writes) + deletes:
                mod = expect.mod_revision(key)
                if mod:
                    compare.append(CompModified(key, "==", mod))
        d = self.client.submit(Transaction(compare=compare, success=ops), timeout=timeout)
        return d.addCallback(lambda result: result.header.revision)
