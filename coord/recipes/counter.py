"""Counter: an int64 in one etcd key, changed by compare-and-swap transactions.

The counter ``name`` is the single key ``name``; its value is the decimal ASCII of a
signed 64-bit integer (``b"42"``, ``b"-7"``), so ``etcdctl get name`` shows it and
``etcdctl put name 10`` sets it.  An absent key is the counter's ``default`` (0).

Every change is a transaction that compares the key's mod revision with the one the new
value was computed from (an absent key: mod revision 0) and whose failure branch reads the
key: an uncontended change is one round trip, and a conflict costs no extra read.

The trap this module avoids: a write whose answer was lost may or may not have been
applied, and re-sending a *computed* value blindly (``put(base + n)`` again, or a fresh
read-add-write) can add ``n`` twice.  Re-sending the *same* transaction (same compared
mod revision P > 0, same value) is safe: etcd applies at most one write comparing
``mod_revision == P``, since any write to the key moves its mod revision past P for good
(``mvcc`` revisions only grow).  So once etcd answers again the transaction is re-sent; if
that fails, the first write to the key after P tells whether ours was it.  See
:class:`Counter` and docs/counter.md.
"""

from __future__ import annotations

import enum
import random
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import defer
from twisted.python.failure import Failure

from coord import errors
from coord.errors import CounterOutcomeUnknown, InvalidArgument, NotACounter
from coord.keyset import KeySet
from coord.recipes._loop import (
    CLEANUP_GRACE,
    DEFAULT,
    Shared,
    check_name,
    check_timeout,
    sleep,
    start,
    with_timeout,
)
from coord.recipes._wait import watch
from coord.txn import CompModified, OpGet, OpSet, Transaction
from coord.types import Event, EventType, KeyValue, Range

if TYPE_CHECKING:
    from coord.client import Client

__all__ = ["Counter", "Verdict", "decode", "encode", "judge"]

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# What a counter's value may look like: an optional sign and digits, with ASCII white
# space around it tolerated (a shell's ``etcdctl put c "$(cmd)"`` may keep a newline).
_DECIMAL = re.compile(rb"[ \t\r\n]*([-+]?[0-9]{1,19})[ \t\r\n]*")

# Pauses between conflicting attempts (seconds): none after the first conflict (its
# failure branch read the key, so the retry is fresh), then random up to a cap that
# doubles, so contending writers spread out.
BACKOFF_FIRST = 0.001
BACKOFF_CAP = 0.05
# Pause before re-sending a transaction whose answer was lost, or a call no member
# could serve (etcd is electing a leader, a member restarts).
UNAVAILABLE_PAUSE = 0.1


def encode(value: int) -> bytes:
    """A counter value as stored: decimal ASCII."""
    return b"%d" % value


def decode(key: bytes, raw: bytes) -> int:
    """The int a counter's key holds.

    Raises:
        NotACounter: ``raw`` is not a decimal integer in int64 range.
    """
    match = _DECIMAL.fullmatch(raw)
    if match is None:
        raise NotACounter(key, raw)
    value = int(match.group(1))
    if not INT64_MIN <= value <= INT64_MAX:
        raise NotACounter(key, raw)
    return value


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise InvalidArgument(f"{name} must fit in an int64, not {value}")
    return value


@attrs.frozen
class _Base:
    """What a write is computed from: the key's value and its state at one revision.

    ``revision`` is what the write compares the mod revision with (0: absent);
    ``after`` is the revision from which a write to the key would be new to us: the mod
    revision, or for an absent key the revision of the read that found it absent.
    """

    value: int
    revision: int
    after: int
    version: int = 0
    created: int = 0


def _base_of(key: bytes, found: Range, default: int) -> _Base:
    if not found.kvs:
        return _Base(default, 0, found.header.revision)
    kv = found.kvs[0]
    return _Base(decode(key, kv.value), kv.mod_revision, kv.mod_revision, kv.version,
                 kv.create_revision)


class Verdict(enum.Enum):
    """What the first write to a key after our base revision says of our lost write."""

    NOT_OURS = "NOT_OURS"  # another value, or a delete: ours was not applied
    OURS_OR_LOOKALIKE = "OURS_OR_LOOKALIKE"  # our value: ours, or one just like it


def judge(first: Event, value: bytes) -> Verdict:
    """Judge a lost write of ``value`` (compared on a mod revision P) by ``first``, the
    first change of the key after P.  If ours was applied it is that change: a write
    comparing ``mod_revision == P`` applies only while nothing else wrote the key since.
    A change to another value (a different delta, a ``set``, a delete) is therefore not
    ours; one to our value may be ours or another writer's that wrote the same bytes
    from the same base -- etcd records nothing that tells them apart."""
    if first.type is EventType.PUT and first.kv.value == value:
        return Verdict.OURS_OR_LOOKALIKE
    return Verdict.NOT_OURS


def first_after(base: _Base, now: KeyValue | None) -> Event | None:
    """The first change after ``base`` if the key's state ``now`` shows it, else None.

    ``now`` is that first change when the key was present at ``base`` and has had
    exactly one put since: the same create revision (no delete in between) and one
    version more.  (From an absent base, a version-1 key may have been created and
    deleted before: only its history tells.)"""
    if now is not None and base.revision and now.create_revision == base.created \
            and now.version == base.version + 1:
        return Event(EventType.PUT, now)
    return None


class Counter:
    """A signed 64-bit counter in the key ``name``, shared by every process that names it.

    Args:
        client: a :class:`coord.Client`.
        name: the key (bytes or str, not empty).
        default: the value of an absent key (an int64; default 0).
        unique_writes: how an ``add`` or ``compare_and_set`` whose answer was lost is
            settled when the first write after its base wrote exactly its value (see
            :meth:`add`).  False (default): raise :class:`~coord.errors.CounterOutcomeUnknown`.
            True: take that write as ours -- right only if no other writer can write the
            same value from the same base (every writer adds a delta no other adds, or
            there is one writer).

    Methods return Deferreds.  Each takes ``timeout``: seconds for the whole call, retries
    included (default: the client's ``timeout``; None: no limit).

    Attributes:
        key: the counter's key, as given (as bytes).
        default: as given.
        unique_writes: as given.
        resolved: how many lost answers this object settled (applied or not, known).
        unresolved: how many it could not settle (CounterOutcomeUnknown raised).

    Raises:
        TypeError: ``name`` not bytes or str, ``default`` not an int, ``unique_writes``
            not a bool.
        InvalidArgument: an empty ``name``, ``default`` outside int64.
    """

    def __init__(self, client: Client, name: bytes | str, default: int = 0,
                 unique_writes: bool = False) -> None:
        self.client = client
        self.key = check_name(name, "Counter")
        self.default = _check_int("default", default)
        if not isinstance(unique_writes, bool):
            raise TypeError(f"unique_writes must be a bool, not {type(unique_writes).__name__}")
        self.unique_writes = unique_writes
        # The last state we saw (a hint: a write compares on it, and is told if stale).
        self._seen: _Base | None = None
        self.resolved = 0
        self.unresolved = 0

    def __repr__(self) -> str:
        seen = "" if self._seen is None else f" last={self._seen.value}@{self._seen.after}"
        return f"<Counter {self.key!r}{seen}>"

    # -- reads and blind writes ----------------------------------------------------------

    def get(self, timeout: Any = DEFAULT) -> defer.Deferred[int]:
        """The counter's value: ``default`` if the key is absent.

        Raises:
            NotACounter: the key holds something else.
            Timeout, Unavailable: as :meth:`coord.Client.get`.
        """
        timeout = self._timeout(timeout)

        async def read() -> int:
            return (await self._read(timeout)).value

        return start(read())

    def set(self, value: int, timeout: Any = DEFAULT) -> defer.Deferred[int]:
        """Write ``value`` (a plain put: whatever the counter held is replaced).

        Returns:
            Deferred firing with the revision of the write.

        Raises:
            TypeError: ``value`` not an int (a bool, a float, a str).
            InvalidArgument: ``value`` outside int64.  (Both at once, nothing sent.)
            OutcomeUnknown: sent, no answer: the put may or may not have been applied.
                It is not re-sent (a late copy could overwrite a newer value).
        """
        value = _check_int("value", value)
        timeout = self._timeout(timeout)

        async def put() -> int:
            written = await self.client.set(self.key, encode(value), timeout=timeout)
            self._seen = _Base(value, written.revision, written.revision)
            return written.revision

        return start(put())

    # -- compare-and-swap ------------------------------------------------------------------

    def add(self, n: int, timeout: Any = DEFAULT) -> defer.Deferred[int]:
        """Add ``n`` (negative to subtract) atomically.

        One transaction compares the key's mod revision with the last one seen and writes
        the sum; if another write came first, its failure branch read the key and the
        sum is computed again (after a short random pause when conflicts repeat).

        A lost answer (the connection broke, or a member failed, after the write was
        sent) is never settled by a blind retry.  The same transaction is re-sent once
        etcd answers again -- safe, as etcd applies at most one write comparing the key's
        mod revision with P.  If it fails, the first write after P tells: another value
        (or a delete) means ours was not applied, and the add goes on from the value
        read; our value means ours, or another writer's that added the same ``n`` from
        the same value -- :class:`~coord.errors.CounterOutcomeUnknown` unless
        ``unique_writes``.  From an absent key (P = 0) the re-sent transaction is safe
        only if nobody deletes the key meanwhile: a delete resets a counter in use and
        loses concurrent adds anyway.

        Returns:
            Deferred firing with the counter's new value.

        Raises:
            TypeError: ``n`` not an int (at once).
            InvalidArgument: ``n`` outside int64 (at once), or the sum would leave
                int64 (nothing written).
            NotACounter: the key holds something else (nothing written).
            Timeout: not done within ``timeout``; no write of this add was in flight
                then, so none was applied.  (A write in flight at the deadline gets
                ``CLEANUP_GRACE`` = 0.5 s more to answer: Timeout, or the result, may come
                that late.)
            CounterOutcomeUnknown: a write of this add may or may not have been applied:
                its base and value are attached (history compacted, timeout during a
                write, or a lookalike write as above).

        Cancelling stops the add.  A write already sent is not abandoned: its answer is
        awaited (at most until ``timeout``); if it was applied the Deferred fires with
        the new value after all, else with CancelledError, so the caller always knows.
        """
        n = _check_int("n", n)

        def plus(value: int) -> int:
            total = value + n
            if not INT64_MIN <= total <= INT64_MAX:
                raise InvalidArgument(f"{self.key!r}: {value} + {n} leaves int64; "
                                      "nothing written")
            return total

        return self._run(plus, self._timeout(timeout), f"add({n})")

    def compare_and_set(self, expected: int, new: int,
                        timeout: Any = DEFAULT) -> defer.Deferred[bool]:
        """Write ``new`` if the counter holds ``expected`` (``default`` counts for an
        absent key), atomically.

        The value is compared as a number (``b"007"`` written by hand holds 7), through
        the key's mod revision, in one transaction as for :meth:`add`.

        Returns:
            Deferred firing with True (written) or False (the counter held another
            value: nothing written).

        Raises and cancels as :meth:`add` (TypeError, InvalidArgument for
        ``expected`` or ``new``).
        """
        expected = _check_int("expected", expected)
        new = _check_int("new", new)

        def swap(value: int) -> int | None:
            return new if value == expected else None

        d = self._run(swap, self._timeout(timeout), f"compare_and_set({expected}, {new})")
        return d.addCallback(lambda written: written is not None)

    # -- the loop ---------------------------------------------------------------------------

    def _timeout(self, timeout: Any) -> float | None:
        if timeout is DEFAULT:
            return self.client.timeout
        return check_timeout(timeout, zero_ok=False)

    async def _read(self, timeout: float | None) -> _Base:
        found = await self.client.get(self.key, timeout=timeout)
        self._seen = _base_of(self.key, found, self.default)
        return self._seen

    def _run(self, compute: Callable[[int], int | None], timeout: float | None,
             what: str) -> defer.Deferred[Any]:
        # No with_timeout here: it would cut a write in flight.  Every wait of the loop
        # is bounded by the deadline instead (calls get what is left of it).
        deadline = None if timeout is None else self.client.reactor.seconds() + timeout
        message = f"counter {self.key!r}: {what} not done within {timeout} s"
        return start(self._change(compute, deadline, message))

    def _left(self, deadline: float | None, message: str) -> float | None:
        if deadline is None:
            return None
        left = deadline - self.client.reactor.seconds()
        if left <= 0:
            raise errors.Timeout(message)
        return left

    async def _change(self, compute: Callable[[int], int | None], deadline: float | None,
                      message: str) -> int | None:
        """Write ``compute(value)`` over the counter's value; None (nothing written) if
        ``compute`` says so of a fresh value."""
        base, fresh = self._seen, False
        conflicts = 0
        while True:
            if base is None:
                base, fresh = await self._retry_read(deadline, message), True
            try:
                value = compute(base.value)
            except InvalidArgument:
                if fresh:
                    raise
                base = None  # computed from a stale hint: read, then decide
                continue
            if value is None:
                if fresh:
                    return None
                base = None
                continue
            txn = Transaction(compare=[CompModified(self.key, "==", base.revision)],
                              success=[OpSet(self.key, encode(value))],
                              failure=[OpGet(self.key)])
            outcome = await self._write(txn, base, value, deadline, message)
            if isinstance(outcome, int):
                # Our put: one version more, the same creation (or this one, from absent);
                # created stays 0 (unknown) after a hint from set(), which first_after
                # then never trusts.
                self._seen = _Base(value, outcome, outcome, base.version + 1,
                                   base.created if base.revision else outcome)
                return value
            base, fresh = outcome, True
            self._seen = base
            conflicts += 1
            if conflicts > 1:
                cap = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (conflicts - 2))
                await self._pause(random.uniform(0, cap), deadline)

    async def _pause(self, delay: float, deadline: float | None) -> None:
        if deadline is not None:
            delay = min(delay, max(0.0, deadline - self.client.reactor.seconds()))
        await sleep(self.client.reactor, delay)

    async def _retry_read(self, deadline: float | None, message: str) -> _Base:
        while True:
            try:
                return await self._read(self._left(deadline, message))
            except errors.Timeout:
                raise errors.Timeout(message) from None
            except errors.Unavailable:
                await self._pause(UNAVAILABLE_PAUSE, deadline)

    async def _submit(self, txn: Transaction, base: _Base, value: int,
                      deadline: float | None, message: str) -> Any:
        """Send ``txn`` once.  If cancelled meanwhile, its answer is awaited all the same
        (it may be applied): applied, it is returned; not applied, CancelledError; no
        answer, CounterOutcomeUnknown."""
        # A write in flight at the deadline is given CLEANUP_GRACE more to answer: an
        # answer settles it (applied, or not: then Timeout), where cutting it at the
        # deadline would leave its outcome unknown.
        left = self._left(deadline, message)
        sent = Shared(self.client.submit(
            txn, timeout=None if left is None else left + CLEANUP_GRACE))
        cancelled = False
        while True:
            try:
                return await sent.wait()
            except defer.CancelledError:
                if sent.done:
                    raise
                cancelled = True  # (cancelled again: still the answer is awaited)
            except errors.Failed:
                if cancelled:
                    raise defer.CancelledError() from None
                raise
            except (errors.OutcomeUnknown, errors.Timeout) as e:
                if not cancelled:
                    raise
                self.unresolved += 1
                raise self._unknown(base, value, "cancelled while its answer was owed") \
                    from e

    async def _write(self, txn: Transaction, base: _Base, value: int,
                     deadline: float | None, message: str) -> int | _Base:
        """Apply ``txn`` (``base`` -> ``value``): the revision it was applied at, or the
        key's state when another write came first (nothing of ours applied)."""
        lost: errors.OutcomeUnknown | None = None
        while True:
            try:
                result = await self._submit(txn, base, value, deadline, message)
                if lost is not None:
                    self.resolved += 1
                return result.header.revision
            except errors.Failed as failed:
                if lost is None:
                    return _base_of(self.key, failed.responses[0], self.default)
                # The re-sent copy was not applied; was the first?
                return await self._settle(base, value, failed, deadline, message)
            except CounterOutcomeUnknown:
                raise  # settled as unknown already (cancelled while owed an answer)
            except errors.OutcomeUnknown as e:
                if deadline is not None and self.client.reactor.seconds() >= deadline:
                    self.unresolved += 1
                    raise self._unknown(base, value, "the timeout came first") from e
                lost = e  # re-send the same transaction: see the module docstring
            except errors.Timeout:
                if lost is None:
                    raise errors.Timeout(message) from None
                self.unresolved += 1
                raise self._unknown(base, value, "the timeout came first") from lost
            except errors.Unavailable:
                pass  # never sent, or refused before being proposed: nothing applied
            except defer.CancelledError:
                if lost is None:
                    raise
                self.unresolved += 1
                raise self._unknown(base, value, "cancelled while settling") from lost
            try:
                await self._pause(UNAVAILABLE_PAUSE, deadline)
            except defer.CancelledError:
                if lost is None:
                    raise
                self.unresolved += 1
                raise self._unknown(base, value, "cancelled while settling") from lost

    def _unknown(self, base: _Base, value: int, reason: str) -> CounterOutcomeUnknown:
        return CounterOutcomeUnknown(self.key, base.value, base.after, value, reason)

    async def _settle(self, base: _Base, value: int, failed: errors.Failed,
                      deadline: float | None, message: str) -> int | _Base:
        """Our lost write (``base`` -> ``value``) was re-sent and that copy failed: the
        revision ours was applied at, or the key's state now if it was not."""
        kvs = failed.responses[0].kvs
        first = first_after(base, kvs[0] if kvs else None)
        if first is None:
            try:
                first = await self._first_change(base.after, deadline, message)
            except errors.Compacted as e:
                self.unresolved += 1
                raise self._unknown(base, value, "the key's history after it was "
                                    "compacted") from e
            except errors.Timeout as e:
                self.unresolved += 1
                raise self._unknown(base, value, "the timeout came first") from e
            except defer.CancelledError as e:
                self.unresolved += 1
                raise self._unknown(base, value, "cancelled while settling") from e
            except errors.CoordError as e:  # a watch that ended otherwise: no guess
                self.unresolved += 1
                raise self._unknown(base, value, f"the key's history could not be read: "
                                    f"{e}") from e
        if judge(first, encode(value)) is Verdict.NOT_OURS:
            self.resolved += 1
            # Not ours: go on from the key's state now (NotACounter if it holds junk:
            # nothing of ours was applied, so that is the whole truth).
            return _base_of(self.key, failed.responses[0], self.default)
        if self.unique_writes:
            self.resolved += 1
            return first.kv.mod_revision
        self.unresolved += 1
        raise self._unknown(base, value, f"the first write after it (revision "
                            f"{first.kv.mod_revision}) wrote that value: ours, or "
                            "another writer's from the same base")

    async def _first_change(self, after: int, deadline: float | None,
                            message: str) -> Event:
        """The first change of the key after revision ``after`` (which exists: a write
        came since), from a watch started there."""
        seen: defer.Deferred[Event] = defer.Deferred()

        def on_change(event: Event) -> None:
            if not seen.called:
                seen.callback(event)

        def ended(result: Any) -> None:
            if not seen.called:  # (a cancelled watch fires None: after `seen`, here)
                seen.errback(result if isinstance(result, Failure)
                             else errors.EtcdError(f"the watch on {self.key!r} ended"))

        running = watch(self.client, KeySet(self.key), on_change, start_revision=after + 1)
        running.addBoth(ended)
        try:
            left = self._left(deadline, message)
            return await with_timeout(seen, left, self.client.reactor, message)
        finally:
            running.watcher.cancel()
