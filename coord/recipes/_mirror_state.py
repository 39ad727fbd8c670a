"""The state of a prefix mirror, without I/O: the keys under a prefix at one revision.

:class:`MirrorState` holds, per key under the prefix, an *entry* (what ``keep`` makes of
its :class:`~coord.types.KeyValue`: the KeyValue itself by default, or e.g. just its mod
revision) and the store revision the whole view reflects.  Its transitions each return
one :class:`Change`, the difference they made:

* :meth:`~MirrorState.load`: pages read at one revision replace the view (the first
  load, or a resync after ``Compacted``: then the difference is one change);
* :meth:`~MirrorState.add` buffers a watch response's events, and
  :meth:`~MirrorState.next_change` applies the buffered events of the oldest revision
  together -- one change per revision;
* :meth:`~MirrorState.advance`: nothing under the prefix changed up to a newer revision;
* :meth:`~MirrorState.undo` takes the last change back (its consumer could not take it).

No Twisted, no reactor: :mod:`coord.recipes._mirror` drives it with reads and a watch,
and ``tests/test_mirror.py`` checks it with tables.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Generic, TypeVar

import attrs

from coord.types import Event, EventType, KeyValue

__all__ = ["Change", "MirrorState", "View"]

T = TypeVar("T")


class View(Mapping[bytes, T]):
    """The entries under the prefix at one revision: an immutable mapping.

    Attributes:
        revision: the store revision it reflects.
    """

    __slots__ = ("_entries", "revision")

    def __init__(self, entries: dict[bytes, T], revision: int) -> None:
        self._entries = entries  # never changed while a View holds it (copy on write)
        self.revision = revision

    def __getitem__(self, key: bytes) -> T:
        return self._entries[key]

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<View revision={self.revision} keys={len(self._entries)}>"


@attrs.frozen
class Change(Generic[T]):
    """What one transition did to the view.  Only keys it touched appear.

    Attributes:
        revision: the view's revision after it.  previous_revision: before it.
        before: touched keys that were in the view, with their entries then.
        after: touched keys that are in the view now, with their new KeyValues
            (written at ``revision``, or read by the load).
        resync: a load that replaced an earlier view (after ``Compacted``, or an
            error), not one revision's events.
        first: the first load.
    """

    revision: int
    previous_revision: int
    before: Mapping[bytes, T]
    after: Mapping[bytes, KeyValue]
    resync: bool = False
    first: bool = False

    @property
    def added(self) -> dict[bytes, KeyValue]:
        return {k: kv for k, kv in self.after.items() if k not in self.before}

    @property
    def changed(self) -> dict[bytes, KeyValue]:
        """Keys written again (a rewrite of an equal value too: etcd recorded a write)."""
        return {k: kv for k, kv in self.after.items() if k in self.before}

    @property
    def removed(self) -> dict[bytes, T]:
        return {k: e for k, e in self.before.items() if k not in self.after}

    def __bool__(self) -> bool:
        return bool(self.before or self.after)


def _kv(kv: KeyValue) -> KeyValue:
    return kv


_GONE: Any = object()  # a key a revision's events created and deleted again


class MirrorState(Generic[T]):
    """Entries of the keys under a prefix, at one store revision.

    Args:
        keep: what to keep of each key's KeyValue (default: all of it).  Entries are
            compared with ``==`` to tell a resync which keys changed, so equal entries
            must mean the same mod revision (a KeyValue's or its mod revision do).

    Attributes:
        revision: the revision the view reflects (0: not loaded yet).
        loaded: a load completed.
        pending: buffered events, not applied yet (oldest first).
    """

    # (mypy cannot tie the default to T = KeyValue: hence the ignore.)
    def __init__(self, keep: Callable[[KeyValue], T] = _kv) -> None:  # type: ignore[assignment]
        self._keep = keep
        self._entries: dict[bytes, T] = {}
        self._view: View[T] | None = None  # shares _entries: copy before a change
        self.revision = 0
        self.loaded = False
        self.pending: collections.deque[Event] = collections.deque()

    def __repr__(self) -> str:
        return (f"<MirrorState revision={self.revision} keys={len(self._entries)} "
                f"pending={len(self.pending)}>")

    @property
    def entries(self) -> Mapping[bytes, T]:
        """The view now, read-only and live (it follows the changes)."""
        return MappingProxyType(self._entries)

    def view(self) -> View[T]:
        """The view now, immutable (later changes copy the entries first)."""
        if self._view is None or self._view.revision != self.revision:
            self._view = View(self._entries, self.revision)
        return self._view

    def _writable(self) -> dict[bytes, T]:
        if self._view is not None:
            self._entries = dict(self._entries)
            self._view = None
        return self._entries

    # transitions ------------------------------------------------------------------------------

    def load(self, revision: int, pages: Iterable[Iterable[KeyValue]]) -> Change[T]:
        """Replace the view with what was read at ``revision`` (pages of one read).

        Returns:
            The difference from the view before, as one change (every key added for
            the first load).  Buffered events at or before ``revision`` are dropped.
        """
        keep, old = self._keep, self._entries
        entries: dict[bytes, T] = {}
        before: dict[bytes, T] = {}
        after: dict[bytes, KeyValue] = {}
        for page in pages:
            for kv in page:
                key = kv.key
                entry = entries[key] = keep(kv)
                if key in old:
                    was = old[key]
                    if was == entry:
                        continue
                    before[key] = was
                after[key] = kv
        for key, was in old.items():
            if key not in entries:
                before[key] = was
        change = Change(revision, self.revision, before, after, resync=self.loaded,
                        first=not self.loaded)
        self._entries, self._view = entries, None
        self.revision, self.loaded = revision, True
        self.pending = collections.deque(e for e in self.pending if e.revision > revision)
        return change

    def add(self, events: Iterable[Event]) -> None:
        """Buffer events of a watch (in revision order), to apply with next_change()."""
        self.pending.extend(events)

    def next_change(self) -> Change[T] | None:
        """Apply the buffered events of the oldest revision, together.

        Call it once the revision's events are all buffered: etcd never splits one
        revision across watch responses.  Events at or before the view's revision (it
        was confirmed later, see :meth:`advance`) are dropped.

        Returns:
            The change, or None when no event is left.
        """
        pending = self.pending
        while pending and pending[0].revision <= self.revision:
            pending.popleft()
        if not pending:
            return None
        revision = pending[0].revision
        entries, keep = self._writable(), self._keep
        before: dict[bytes, T] = {}
        after: dict[bytes, KeyValue] = {}
        while pending and pending[0].revision == revision:
            event = pending.popleft()
            key = event.kv.key
            if key not in before and key not in after:
                before[key] = entries.get(key, _GONE)
            if event.type is EventType.DELETE:
                entries.pop(key, None)
                after.pop(key, None)
            else:
                entries[key] = keep(event.kv)
                after[key] = event.kv
        for key in [k for k, was in before.items() if was is _GONE]:
            del before[key]
        change = Change(revision, self.revision, before, after)
        self.revision = revision
        return change

    def advance(self, revision: int) -> Change[T] | None:
        """Nothing under the prefix changed up to ``revision``: the view reflects it.

        Returns:
            An empty change to the new revision, or None if the view is there already.
        """
        if revision <= self.revision:
            return None
        change: Change[T] = Change(revision, self.revision, {}, {})
        self.revision = revision
        return change

    def undo(self, change: Change[T]) -> None:
        """Take back ``change``, the last transition (its events are not buffered again)."""
        entries = self._writable()
        for key in change.after:
            if key not in change.before:
                del entries[key]
        entries.update(change.before)
        self.revision = change.previous_revision
        if change.first:
            self.loaded = False
