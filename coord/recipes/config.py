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
revision, and :meth:`ConfigWatcher.snapshot` only ever shows whole revisions: a snapshot
is immutable (the watcher copies its dicts before changing them once a snapshot of them
was handed out).

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
from coord._sentinel import DEFAULT
from coord.errors import ConfigDecodeError, ConfigStopped
from coord.keyset import KeySet, as_bytes
from coord.recipes._wait import check_timeout, with_timeout
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
        if isinstance(page_size, bool) or not isinstance(page_size, int):
            raise TypeError(f"page_size must be an int, not {type(page_size).__name__}")
        if page_size < 1:
            raise errors.InvalidArgument(f"page_size must be >= 1, not {page_size}")
        self.client = client
        self.prefix = prefix
        self.keys = KeySet(prefix, prefix=True)
        self._decode = decode or _identity
        self._encode = encode
        self._page_size = page_size
        self._reactor = client._reactor
        self.state = ConfigState.NEW
        self.resyncs = 0
        # The view: decoded values and each key's mod revision in etcd.  Once a snapshot
        # shares these dicts (`_shared`), they are copied before the next change.
        self._values: dict[bytes, Any] = {}
        self._mods: dict[bytes, int] = {}
        self._errors: dict[bytes, ConfigDecodeError] = {}
        self._revision = 0
        self._snapshot: ConfigSnapshot | None = None
        self._on_change: list[Callable[[ConfigChange], Any]] = []
        self._on_error: list[Callable[[ConfigDecodeError], Any]] = []
        self._waiters: list[tuple[Callable[[ConfigSnapshot], tuple[bool, Any]],
                                  defer.Deferred[Any]]] = []
        self._watch: Any = None
        self._generation = 0  # of the watch: events of an earlier one are ignored
        self._pending: list[Event] = []
        self._flush_call: Any = None
        self._task: defer.Deferred[Any] | None = None  # the first read or a resync

    def __repr__(self) -> str:
        errs = f" errors={len(self._errors)}" if self._errors else ""
        return (f"<ConfigWatcher {self.prefix!r} {self.state.name} revision={self._revision} "
                f"keys={len(self._values)}{errs}>")

    # the view ---------------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        """The revision the view reflects (0 before the first read)."""
        return self._revision

    @property
    def decode_errors(self) -> Mapping[bytes, ConfigDecodeError]:
        """The keys whose newest value failed to decode, with the error (read-only)."""
        return MappingProxyType(self._errors)

    def snapshot(self) -> ConfigSnapshot:
        """The view now: an immutable mapping of key -> decoded value, with its revision.

        Raises:
            InvalidArgument: the first read has not completed.
        """
        if self.state in (ConfigState.NEW, ConfigState.LOADING):
            raise errors.InvalidArgument(f"{self!r} has no view yet: await start() first")
        return self._current()

    def _current(self) -> ConfigSnapshot:
        if self._snapshot is None:
            self._snapshot = ConfigSnapshot(self._values, self._mods, self._revision)
        return self._snapshot

    def get(self, key: bytes | str, default: Any = None) -> Any:
        """The decoded value of ``key`` in the view, or ``default``."""
        return self._values.get(as_bytes(key, "key"), default)

    def on_change(self, callback: Callable[[ConfigChange], Any]) -> Callable[[], None]:
        """Call ``callback(change)`` with a :class:`ConfigChange` for each revision that
        changes the view (and once per resync that does).  Not called for the first read.

        A callback's exception is logged and the watcher goes on.

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
            timeout: seconds the first read may take (None: the client's per-call
                timeouts only).

        Returns:
            Deferred firing with the first :class:`ConfigSnapshot`.

        Raises:
            Timeout: the read did not complete in time (the watcher is back to NEW and
                may be started again).
            Unavailable, EtcdError: the read failed (idem).
            InvalidArgument: already started or stopped.

        Cancelling the Deferred abandons the read (the watcher is back to NEW).
        """
        timeout = check_timeout(timeout)
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
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self._pending = []
        waiters, self._waiters = self._waiters, []
        for _, d in waiters:
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
        previous = self._snapshot_for_change() if resync else None
        self._values, self._mods, self._errors = values, mods, new_errors
        self._revision = revision
        self._snapshot = None
        for error in failed:
            self._report(error)
        if previous is not None:
            self.resyncs += 1
            added = {k: v for k, v in values.items() if k not in old_values}
            changed = {k: values[k] for k in decoded if k in old_values}
            removed = {k: v for k, v in old_values.items() if k not in values}
            log.info("config {prefix!r} read afresh at revision {rev}: {a} added, "
                     "{c} changed, {r} removed", prefix=self.prefix, rev=revision,
                     a=len(added), c=len(changed), r=len(removed))
            self._publish(previous, added, changed, removed, resync=True)
        elif resync:
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
        self._flush_call = None
        pending, self._pending = self._pending, []
        start = 0
        for i in range(1, len(pending) + 1):
            if i == len(pending) or pending[i].kv.mod_revision != pending[start].kv.mod_revision:
                self._apply(pending[start:i])
                if self.state is ConfigState.STOPPED:
                    return  # a callback stopped us
                start = i

    def _apply(self, events: list[Event]) -> None:
        """Apply one revision's events to the view and report them as one change."""
        revision = events[0].kv.mod_revision
        previous = self._snapshot_for_change()
        if self._snapshot is not None:  # copy on write: the snapshot keeps the old dicts
            self._values, self._mods = dict(self._values), dict(self._mods)
            self._snapshot = None
        values, mods = self._values, self._mods
        before: dict[bytes, tuple[bool, Any]] = {}
        written: set[bytes] = set()
        failed: list[ConfigDecodeError] = []
        for event in events:
            key = event.kv.key
            if key not in before:
                before[key] = (key in values, values.get(key))
            if event.type is EventType.DELETE:
                values.pop(key, None)
                mods.pop(key, None)
                self._errors.pop(key, None)
                written.discard(key)
                continue
            mods[key] = revision
            try:
                values[key] = self._decode(event.kv.value)
            except Exception as exc:
                error = ConfigDecodeError(key, revision, exc)
                self._errors[key] = error
                failed.append(error)
                continue  # the view keeps the last good value, if any
            self._errors.pop(key, None)
            written.add(key)
        self._revision = revision
        for error in failed:
            self._report(error)
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
                try:
                    callback(change)
                except Exception:
                    log.failure("config callback {cb!r} raised on revision {rev}; the "
                                "watcher goes on", cb=callback, rev=self._revision)
        self._check_waiters()

    def _report(self, error: ConfigDecodeError) -> None:
        log.warn("config {prefix!r}: {error}; keeping the last good value",
                 prefix=self.prefix, error=error)
        for callback in list(self._on_error):
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
        if self.state is ConfigState.STOPPED:
            return
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
        self.state = ConfigState.RESYNCING
        self._task = defer.Deferred.fromCoroutine(self._resync(delay))
        self._task.addErrback(lambda f: f.trap(defer.CancelledError))

    async def _resync(self, delay: float) -> None:
        backoff = 0.1
        while True:
            if delay:
                await task.deferLater(self._reactor, delay * (0.5 + random.random() / 2),
                                      lambda: None)
            try:
                await self._load(resync=True)
                break
            except defer.CancelledError:
                raise
            except Exception as exc:
                log.warn("config {prefix!r}: reading the prefix failed ({error!r}); again",
                         prefix=self.prefix, error=exc)
                delay = backoff
                backoff = min(backoff * 2, 5.0)
        self._task = None
        if self.state is ConfigState.RESYNCING:
            self.state = ConfigState.WATCHING
            self._watch_from(self._revision + 1)

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
        """Wait until the view reflects ``revision`` or later; fires with its snapshot.

        ``revision`` should be that of a change under the prefix (an :meth:`update`'s
        result, or ``snapshot.revision + 1`` for "the next change"): the view's revision
        moves only with changes under the prefix.

        Raises:
            Timeout, ConfigStopped, TypeError, InvalidArgument: as :meth:`wait_for`.
        """
        if isinstance(revision, bool) or not isinstance(revision, int):
            raise TypeError(f"revision must be an int, not {type(revision).__name__}")
        if revision < 0:
            raise errors.InvalidArgument(f"revision must be >= 0, not {revision}")
        return self._wait(lambda snap: (snap.revision >= revision, snap), timeout,
                          f"revision {revision} not reached")

    def _wait(self, test: Callable[[ConfigSnapshot], tuple[bool, Any]], timeout: Any,
              what: str) -> defer.Deferred[Any]:
        timeout = check_timeout(timeout)
        if self.state is ConfigState.STOPPED:
            return defer.fail(ConfigStopped(f"{self!r} is stopped"))
        entry: tuple[Any, defer.Deferred[Any]]

        def cancel(_: defer.Deferred[Any]) -> None:
            if entry in self._waiters:
                self._waiters.remove(entry)

        d: defer.Deferred[Any] = defer.Deferred(cancel)
        entry = (test, d)
        self._waiters.append(entry)
        if self.state not in (ConfigState.NEW, ConfigState.LOADING):
            self._check_waiters()
        return with_timeout(d, timeout, self._reactor,
                            f"config {self.prefix!r}: {what} within {timeout} s")

    def _check_waiters(self) -> None:
        if not self._waiters:
            return
        snapshot = self._current()
        for entry in list(self._waiters):
            test, d = entry
            try:
                done, value = test(snapshot)
            except Exception:
                self._waiters.remove(entry)
                d.errback(Failure())
                continue
            if done:
                self._waiters.remove(entry)
                d.callback(value)

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
            Deferred firing with the transaction's revision (``wait_revision`` it to
            see the view reflect it).

        Raises:
            Failed: ``expect`` did not hold; nothing was written.  Retry from a newer
                snapshot (``wait_revision(expect.revision + 1)`` waits for the change).
            InvalidArgument: a key outside the prefix, a key both written and deleted,
                nothing to do.  TooManyOperations: more than 128 keys (or, with
                ``expect``, more than 127 existing keys touched).
            TypeError: a key or encoded value that is not bytes/str.
        """
        if values is not None and not isinstance(values, Mapping):
            raise TypeError(f"values must be a mapping, not {type(values).__name__}")
        values = dict(values or {})
        if isinstance(delete, (bytes, str)):
            raise TypeError("delete takes a list of keys, not one key")
        writes = {self._key(k): v for k, v in values.items()}
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
