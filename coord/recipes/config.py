"""ConfigWatcher: a consistent, live view of every key under a config prefix, decoded.

The view comes from a prefix mirror (:mod:`coord.recipes._mirror`): one read of the
prefix at a revision R (paged, every page at R), then a watch from R + 1 that resumes by
itself across broken streams, etcd restarts and failover; one change per revision; a
fresh read after ``Compacted`` whose difference is one change (``resync=True``).  This
module adds what config needs on top: values decoded by ``decode`` (a value it refuses
is reported as :class:`~coord.errors.ConfigDecodeError` and the key keeps its last good
value), immutable :class:`ConfigSnapshot` mappings (the dicts are copied before a change
once a snapshot holds them; the decoded values are shared), :class:`ConfigChange` reports
to ``on_change`` callbacks (plain or ``async def``), ``wait_for`` / ``wait_revision``, and
atomic, optionally guarded, multi-key updates.

A mirror change is decoded in full before the view moves, so a snapshot and a callback
only ever see whole revisions.  The view's revision is a store revision at which etcd's
state of the prefix is the view: the read's, each change's, or a later one that the
mirror confirmed for ``wait_revision``.

See ``docs/config.md``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import attrs
import txaio
from twisted.internet import defer

from coord import errors
from coord.errors import ConfigDecodeError, ConfigStopped
from coord.keyset import KeySet, as_bytes
from coord.recipes._loop import DEFAULT, check_timeout, positive_int, with_timeout
from coord.recipes._mirror import PAGE_SIZE, Mirror, MirrorPhase, invoke
from coord.recipes._mirror_state import Change
from coord.txn import CompModified, OpDel, OpSet, Transaction
from coord.types import KeyValue

log = txaio.make_logger()  # type: ignore[attr-defined]  # set by txaio.use_twisted()

if TYPE_CHECKING:
    from coord.client import Client

__all__ = [
    "ConfigChange",
    "ConfigSnapshot",
    "ConfigState",
    "ConfigWatcher",
]


class ConfigState(enum.Enum):
    """A :class:`ConfigWatcher`'s state: NEW (not started, or the first read failed);
    LOADING (the first read); WATCHING; RESYNCING (reading afresh: the watch fell behind
    a compaction); STOPPED."""

    NEW = "NEW"  # not started, or the first read failed
    LOADING = "LOADING"  # the first read
    WATCHING = "WATCHING"
    RESYNCING = "RESYNCING"  # reading afresh: the watch fell behind a compaction
    STOPPED = "STOPPED"


_STATES = {phase: ConfigState[phase.name] for phase in MirrorPhase
           if phase is not MirrorPhase.CLOSED} | {MirrorPhase.CLOSED: ConfigState.STOPPED}


class ConfigSnapshot(Mapping[bytes, Any]):
    """The decoded values under the prefix as of one revision: an immutable mapping.

    Keys are full keys (prefix included).  Equal to any mapping with the same items.

    Attributes:
        revision: the store revision this view reflects (the read's revision, or the
            revision of the last change applied).
    """

    __slots__ = ("_mods", "_values", "revision")

    def __init__(self, values: dict[bytes, Any], mods: Mapping[bytes, int],
                 revision: int) -> None:
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
        previous: the view before the change.
        snapshot: the view after it.
        resync: True when the change is the difference between the view and a fresh
            read (after a compaction), not one revision's events.
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


def _mod_revision(kv: KeyValue) -> int:
    return kv.mod_revision


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
        prefix: the prefix.

    Raises:
        TypeError: a prefix that is not bytes/str, a decode/encode that is not callable.
        InvalidArgument: an empty prefix (every key in etcd is not a config), a bad
            page size.
    """

    def __init__(self, client: Client, prefix: bytes | str,
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
        # The mirror keeps each key's mod revision; the watcher, the decoded values.
        self._mirror: Mirror[int] = Mirror(
            client, self.keys, self._apply, lambda error: None,
            lambda: ConfigStopped(f"{self!r} is stopped"), keep=_mod_revision,
            page_size=page_size, name=f"config {prefix!r}")
        # Once a snapshot shares _values (`_shared`), it is copied before the next change.
        self._values: dict[bytes, Any] = {}
        self._shared = False
        self._errors: dict[bytes, ConfigDecodeError] = {}
        self._revision = 0
        self._loaded = False  # the first read was applied (a view exists)
        # The view now, once asked for.  Kept while there are on_change callbacks: each
        # change's `previous` (the mirror's state has moved on when the change comes).
        self._snapshot: ConfigSnapshot | None = None
        self._on_change: list[Callable[[ConfigChange], Any]] = []
        self._on_error: list[Callable[[ConfigDecodeError], Any]] = []

    def __repr__(self) -> str:
        errs = f" errors={len(self._errors)}" if self._errors else ""
        return (f"<ConfigWatcher {self.prefix!r} {self.state.name} revision={self._revision} "
                f"keys={len(self._values)}{errs}>")

    # What tests and benchmarks look at: the mirror's watch, waits and loop.
    _watch = property(lambda self: self._mirror.watch)
    _waiters = property(lambda self: self._mirror.waiters)
    _task = property(lambda self: self._mirror.task)

    # the view ---------------------------------------------------------------------------------

    @property
    def state(self) -> ConfigState:
        """NEW, LOADING, WATCHING, RESYNCING (reading afresh) or STOPPED."""
        return _STATES[self._mirror.phase]

    @property
    def resyncs(self) -> int:
        """How many times the view was read afresh after the first read."""
        return self._mirror.resyncs

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
            self._snapshot = ConfigSnapshot(self._values, self._mirror.view(), self._revision)
            self._shared = True  # copy the dict before the next change
        return self._snapshot

    def get(self, key: bytes | str, default: Any = None) -> Any:
        """The decoded value of ``key`` in the view, or ``default``."""
        return self._values.get(as_bytes(key, "key"), default)

    def on_change(self, callback: Callable[[ConfigChange], Any]) -> Callable[[], None]:
        """Call ``callback(change)`` with a :class:`ConfigChange` for each revision that
        changes the view (and once per resync that does).  Not called for the first read.

        A callback's exception is logged and the watcher goes on.  An ``async def``
        callback (or one returning a Deferred) is started and left to run: it is *not*
        awaited before the next change is reported; its failure is logged with the
        change it was given.  A callback removed (or a watcher stopped) by an earlier
        callback of the same change is not called.

        Returns:
            A function that removes the callback.
        """
        remove = self._subscribe(self._on_change, callback)
        if self._loaded:
            self._current()  # the next change's `previous`
        return remove

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
        d = self._mirror.start().addCallback(lambda _: self.snapshot())
        return with_timeout(d, timeout, self.client.reactor,
                            f"could not read config prefix {self.prefix!r} within {timeout} s")

    def stop(self) -> None:
        """Stop watching: no callback after this returns; waiters fail with ConfigStopped.

        Idempotent.  The last view stays readable.
        """
        self._mirror.close()

    async def __aenter__(self) -> ConfigWatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()

    # applying the mirror's changes ------------------------------------------------------------

    def _apply(self, change: Change[int]) -> None:
        """Make a change of the mirror (a revision, a load, a confirmed revision) the
        view's, and report it.

        All or nothing: every value is decoded before the view changes, so a decode
        that raises (a BaseException too) leaves the view at the last whole revision
        (the mirror then takes its change back).
        """
        if not change and not change.first:  # a confirmed revision: the same view, newer
            self._revision, self._snapshot = change.revision, None
            if self._on_change:
                self._current()
            return
        decoded, failed, gone = _decoded(self._decode, change)  # 1. user code: may raise
        # 2. Apply (no user code): the view moves to the revision as a whole.  A key
        # whose new value failed keeps its last good value (or stays out).
        old = self._values
        previous = self._snapshot if self._on_change and not change.first else None
        if change.first:
            values = decoded
        else:
            values = dict(old) if self._shared else old
            values.update(decoded)
            for key in gone:
                values.pop(key, None)
        errs = self._errors  # in place: decode_errors is a live view of it
        for key in gone:
            errs.pop(key, None)
        for key in decoded:
            errs.pop(key, None)
        errs.update((error.key, error) for error in failed)
        self._values, self._shared = values, False
        self._revision, self._snapshot, self._loaded = change.revision, None, True
        # 3. Report.
        try:
            self._report(change, failed, previous, old, decoded, gone)
        except BaseException:
            self._current()  # the view as it is: the mirror takes its change back
            raise
        if self._on_change:
            self._current()  # the next change's `previous`

    def _report(self, change: Change[int], failed: list[ConfigDecodeError],
                previous: ConfigSnapshot | None, old: dict[bytes, Any],
                decoded: dict[bytes, Any], gone: list[bytes]) -> None:
        for error in failed:
            self._call(self._on_error, error, "config error callback {cb!r} raised")
        if previous is None or self.state is ConfigState.STOPPED:
            return
        added = MappingProxyType({k: v for k, v in decoded.items() if k not in old})
        changed = MappingProxyType({k: v for k, v in decoded.items() if k in old})
        removed = MappingProxyType({k: old[k] for k in gone if k in old})
        if added or changed or removed:
            report = ConfigChange(change.revision, added, changed, removed, previous,
                                  self._current(), change.resync)
            self._call(self._on_change, report, "config callback {cb!r} raised on "
                       "revision {rev}; the watcher goes on", rev=change.revision)

    def _call(self, callbacks: list[Any], value: Any, message: str, **fields: Any) -> None:
        if isinstance(value, ConfigDecodeError):
            log.warn("config {prefix!r}: {error}; keeping the last good value",
                     prefix=self.prefix, error=value)
        for callback in list(callbacks):
            if self.state is ConfigState.STOPPED:
                return  # stopped by an earlier callback: no callback after stop()
            if callback in callbacks:  # not removed by an earlier callback
                invoke(callback, value, message, cb=callback, value=value, **fields)

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
            Timeout: not satisfied in time.
            ConfigStopped: the watcher stopped meanwhile.
            InvalidArgument: a key outside the prefix.
            TypeError: a bad key or predicate.
            Exception: whatever ``predicate`` raises.

        Cancelling the Deferred stops the wait.
        """
        key = self._key(key)
        if predicate is not None and not callable(predicate):
            raise TypeError(f"predicate must be callable, not {type(predicate).__name__}")

        def test() -> tuple[bool, Any]:
            values = self._values
            if key not in values:
                return False, None
            value = values[key]
            return (predicate is None or bool(predicate(value))), value

        return self._mirror.wait(test, timeout, f"{key!r} did not satisfy {predicate!r}")

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

        def test() -> tuple[bool, Any]:
            return self._revision >= revision, self._current()

        return self._mirror.wait(test, timeout, f"revision {revision} not reached", revision)

    # writing ----------------------------------------------------------------------------------

    def _key(self, key: Any) -> bytes:
        return _under(self.keys, key)

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
        txn = _update_transaction(self.keys, values, delete,
                                  encode if encode is not None else self._encode, expect)
        d = self.client.submit(txn, timeout=timeout)
        return d.addCallback(lambda result: result.header.revision)


def _decoded(decode: Callable[[bytes], Any], change: Change[int]
             ) -> tuple[dict[bytes, Any], list[ConfigDecodeError], list[bytes]]:
    """A mirror change decoded: (key -> value for the good new values, the decode
    errors, the keys gone).  Raises what ``decode`` raises that is no Exception."""
    decoded: dict[bytes, Any] = {}
    failed: list[ConfigDecodeError] = []
    for key, kv in change.after.items():
        try:
            decoded[key] = decode(kv.value)
        except Exception as exc:
            failed.append(ConfigDecodeError(key, kv.mod_revision, exc))
    return decoded, failed, [key for key in change.before if key not in change.after]


def _under(keys: KeySet, key: Any) -> bytes:
    key = as_bytes(key, "key")
    if not key.startswith(keys.key):
        raise errors.InvalidArgument(f"{key!r} is not under the prefix {keys.key!r}")
    return key


def _update_transaction(keys: KeySet, values: Mapping[Any, Any] | None, delete: Iterable[Any],
                        encode: Callable[[Any], bytes | str] | None,
                        expect: ConfigSnapshot | None) -> Transaction:
    """The transaction of :meth:`ConfigWatcher.update` (its arguments checked)."""
    if values is not None and not isinstance(values, Mapping):
        raise TypeError(f"values must be a mapping, not {type(values).__name__}")
    values = dict(values or {})
    if isinstance(delete, (bytes, str)):
        raise TypeError("delete takes a list of keys, not one key")
    writes: dict[bytes, Any] = {}
    for k, v in values.items():
        key = _under(keys, k)
        if key in writes:  # the same key as str and bytes: etcd refuses duplicates
            raise errors.InvalidArgument(f"{key!r} is given twice (as str and bytes)")
        writes[key] = v
    deletes = [_under(keys, k) for k in delete]
    if set(deletes) & writes.keys():
        raise errors.InvalidArgument("a key cannot be both written and deleted")
    if not writes and not deletes:
        raise errors.InvalidArgument("update() needs values to write or keys to delete")
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
        compare.append(CompModified(keys, "<", expect.revision + 1))
        # ... and each key we touch that existed then still exists with the same mod
        # revision (a deletion is invisible to the range comparison).
        for key in list(writes) + deletes:
            mod = expect.mod_revision(key)
            if mod:
                compare.append(CompModified(key, "==", mod))
    return Transaction(compare=compare, success=ops)
