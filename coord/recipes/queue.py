"""Queue: a FIFO work queue with at-least-once delivery; PriorityQueue: highest first.

Key layout under the queue's name (readable with ``etcdctl get --prefix NAME/``):

* ``NAME/items/<id>`` -- an item, its value the payload, no lease (it outlives its
  producer).  ``<id>`` is 14 hex digits of the put's wall-clock microseconds and 8
  random hex digits; a PriorityQueue's is ``<priority, 5 decimal digits>/<id>``.  The
  order of delivery is the item's *create revision* (etcd's order of the puts), not
  the id: the id only makes the key unique and roughly time-sorted for a reader.
* ``NAME/claims/<id>`` -- a consumer's claim on item ``<id>``, under the consumer's
  session lease (value ``<lease hex>/<waiter key's create revision>/<8 random hex>``,
  unique to the get that wrote it).  An item without a claim is
  in the queue; a claim's end (ack, release, or the session's lease ending with a
  crashed consumer) gives the item back or completes it.
* ``NAME/waiters/<lease hex>`` -- a consumer waiting in :meth:`Queue.get`: the recipe
  core's owned key (:class:`~coord.recipes._core.OwnedKey`), a FIFO turn like a Lock's.

No herd: consumers waiting in ``get`` take turns, FIFO by the create revision of their
waiter keys.  Each Queue object keeps one prefix mirror (:mod:`coord.recipes._mirror`)
of everything under ``NAME/`` (one read, then one long-lived watch), and a waiting
consumer acts only when that view shows no waiter key created before its own and an
unclaimed item: then it claims the oldest and deletes its waiter key in one
transaction, guarded on being the head (its key is there and every waiter key was
created at or after it).  One item makes one consumer act.  The next head sees, in its
view at the revision of that transaction, both the claim and its predecessor's
deletion, so it never races for the item just taken: a claim transaction fails only
if someone else wrote under the queue.  No consumer reads per get, and no waiter
watches a key of its own (the view is the watch).

See docs/queue.md.
"""

from __future__ import annotations

import enum
import heapq
import os
import time
from typing import TYPE_CHECKING, Any

import txaio
from twisted.internet import defer
from twisted.python.failure import Failure

from coord import errors
from coord.errors import ClaimLost
from coord.keyset import KeySet, as_bytes
from coord.recipes._core import OwnedKey, Phase, kvs, unless_session_ends
from coord.recipes._loop import (
    Shared,
    bounded,
    check_name,
    check_timeout,
    sleep,
    start,
    with_timeout,
)
from coord.recipes._mirror import Mirror
from coord.recipes._mirror_state import Change
from coord.session import Session
from coord.txn import CompCreated, CompValue, OpDel, OpGet, OpSet, Transaction
from coord.types import KeyValue

if TYPE_CHECKING:
    from coord.client import Client

__all__ = ["Item", "ItemState", "PriorityQueue", "Queue"]

log = txaio.make_logger()  # type: ignore[attr-defined]  # set by txaio.use_twisted()

MAX_PRIORITY = 99999  # five decimal digits in the key


class ItemState(enum.Enum):
    """A claimed :class:`Item`'s state: CLAIMED (ours until ack or release, or our
    session's end); ACKED (done: deleted); RELEASED (given back to the queue)."""

    CLAIMED = "CLAIMED"  # ours until ack or release (or our session's end)
    ACKED = "ACKED"  # done: deleted
    RELEASED = "RELEASED"  # given back to the queue


class _TurnGone(Exception):
    """Our waiter key is not in the view at a revision it was proven at."""


class _Turn(OwnedKey):
    """A consumer's place among the waiters of a queue: ``NAME/waiters/<lease hex>``.

    Taken at once, once written (the owned-key core's enqueue, clean-up on cancel and
    timeout, late-write sweep): whether it is the head is for the queue's view to tell
    and the claim transaction to prove (:meth:`Queue._claim`), not for a read.
    """

    kind = b"waiters/"
    blocked_by = b"waiters/"
    lost_error = ClaimLost

    def _free(self, first: list[KeyValue], token: int) -> bool:
        return token > 0  # written: our place is ours (the head is proven by the claim)

    def take(self) -> defer.Deferred[None]:
        """Write our waiter key (no timeout: the caller's get has one; cancel it)."""

        async def take() -> None:
            await self._obtain(lambda: self._enqueue(b""))

        return self._run(take, None, "")

    def handed_on(self) -> None:
        """Our key was deleted by the claim transaction: nothing is left to delete."""
        self._stop(Phase.IDLE)
        self._observers = []


class Item:
    """An item a consumer claimed by :meth:`Queue.get`.

    Attributes:
        queue: the Queue.
        session: the consumer's session (its lease holds the claim).
        id: the item's id (bytes: the key after ``NAME/items/``).
        key: its key.
        value: the payload (bytes).
        priority: its priority (0 for a plain Queue).
        revision: the item's create revision (the put's revision: the queue's order).
        claim_key: ``NAME/claims/<id>``.
        claim_revision: the claim's create revision.
        state: an :class:`ItemState`.
    """

    def __init__(self, queue: Queue, session: Session, id: bytes, value: bytes,
                 revision: int, claim_revision: int) -> None:
        self.queue = queue
        self.session = session
        self.id = id
        self.key = queue.items + id
        self.claim_key = queue.claims + id
        self.value = value
        self.priority = queue._priority_of(id)
        self.revision = revision
        self.claim_revision = claim_revision
        self.state = ItemState.CLAIMED
        self._busy: Shared | None = None  # a release
        self._acking: Shared | None = None

    def __repr__(self) -> str:
        return (f"<Item {self.key!r} {self.state.name} revision={self.revision} "
                f"claim={self.claim_revision}>")

    @property
    def held(self) -> bool:
        """Whether the claim is ours as far as we can tell (CLAIMED, session alive);
        only :meth:`ack` proves it."""
        return self.state is ItemState.CLAIMED and self.session.alive

    def _guard(self) -> CompCreated:
        return CompCreated(self.claim_key, "==", self.claim_revision)

    def ack(self) -> defer.Deferred[None]:
        """The item is done: delete it and our claim, if the claim is still ours.

        One transaction guarded on our claim's create revision: an item is never
        deleted without its claim.  A second ack after one that succeeded does
        nothing.

        Returns:
            Deferred firing with None once the item is deleted.

        Raises:
            ClaimLost: our claim is gone (the session ended, or the claim was released
                or deleted): the item went back to the queue, and another consumer may
                have it.  Nothing was deleted.
            OutcomeUnknown: no answer came: the item may be deleted or not; calling
                ack again is safe (the same guarded transaction applies at most once),
                but if it then raises ClaimLost, either ack may have been the one.
        """
        if self.state is ItemState.ACKED:
            return defer.succeed(None)
        if self.state is ItemState.RELEASED:
            return defer.fail(ClaimLost(f"{self!r} was released"))
        if self._acking is not None and not self._acking.done:
            return self._acking.wait()  # one under way: its outcome
        txn = Transaction(compare=[self._guard()],
                          success=[OpDel(self.key), OpDel(self.claim_key)])

        async def ack() -> None:
            try:
                await self.session.client.submit(txn)
            except errors.Failed:
                self.state = ItemState.RELEASED
                why = "the session ended" if not self.session.alive else \
                    "the claim was deleted"
                raise ClaimLost(f"{self!r}: not acked, our claim is gone ({why}); the "
                                "item is back in the queue") from None
            self.state = ItemState.ACKED

        self._acking = Shared(start(ack()))
        return self._acking.wait()

    def release(self) -> defer.Deferred[None]:
        """Give the item back at once (a nack): delete our claim, if it is still ours.

        The item is then the queue's oldest again (delivered before newer ones).
        Idempotent; a release of a claim already gone does nothing.  A release that
        failed (etcd unreachable, no answer) leaves the item CLAIMED: release again (or
        ack); the claim goes with the session's lease at the latest.

        Returns:
            Deferred firing with None once the claim is gone.

        Raises:
            Unavailable, Timeout, OutcomeUnknown: the delete failed or its answer never
                came (sending it again is safe: it is guarded on our claim).
        """
        if self.state is ItemState.ACKED:
            return defer.succeed(None)
        busy = self._busy
        if busy is None or (busy.done and isinstance(busy.result, Failure)):
            self.state = ItemState.RELEASED  # (an ack meanwhile is refused: ClaimLost)
            txn = Transaction(compare=[self._guard()], success=[OpDel(self.claim_key)])

            async def release() -> None:
                try:
                    await self.session.client.submit(txn)
                except errors.Failed:
                    pass  # gone already (our session ended, or deleted by hand)
                except BaseException:
                    # Not known to be deleted: still ours, to release again or ack
                    # (Lock.release retries a failed release the same way).
                    self.state = ItemState.CLAIMED
                    raise

            self._busy = busy = Shared(start(release()))
        return busy.wait()

    async def __aenter__(self) -> Item:
        """``async with await queue.get(session) as item:`` -- the block does the work;
        it is acked if the block ends normally, released (back to the queue at once) if
        it raises."""
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            await self.ack()
        elif self.state is ItemState.CLAIMED:
            await self.release()


def _entry(kv: KeyValue) -> int:
    return kv.create_revision * (1 << 32) + kv.mod_revision % (1 << 32)  # compact, unique


class Queue:
    """A FIFO queue named ``name``: producers :meth:`put`, consumers :meth:`get` and
    :meth:`Item.ack` (at-least-once: an item claimed by a consumer that dies returns
    to the queue when its session ends).

    Args:
        client: the :class:`coord.Client`.
        name: the queue's name (bytes or str); keys live under ``name + b"/"``.

    Attributes:
        name: the queue's name (bytes).
        items: the prefix of its items, ``name/items/``.
        claims: the prefix of its claims, ``name/claims/``.
        waiters: the prefix of its consumers' waiter keys, ``name/waiters/``.
        claimed: claim transactions that succeeded (this object's gets).
        conflicts: claim transactions that failed because the item was taken (or gone)
            meanwhile -- a herd would show here; with the turns it is 0 unless someone
            else writes under the queue.
    """

    def __init__(self, client: Client, name: bytes | str) -> None:
        self.client = client
        self.name = check_name(name, type(self).__name__)
        self.items = self.name + b"/items/"
        self.claims = self.name + b"/claims/"
        self.waiters = self.name + b"/waiters/"
        self.claimed = 0
        self.conflicts = 0
        # The mirror's range: all of NAME/ (keys of a queue named NAME/x... are ignored).
        self._keys = KeySet(self.name + b"/", prefix=True)
        self._mirror: Mirror[int] | None = None
        self._starting: Shared | None = None
        self._ended: BaseException | None = None
        self._closed = False
        self._getting: set[int] = set()  # lease IDs with a get under way
        # One waiter key object per session (the core allows one live object per key):
        # a get right after a timed-out one reuses it, and waits for its clean-up.
        self._turns: dict[int, _Turn] = {}
        self._pending: dict[bytes, int] = {}  # item id (claimed or not) -> create revision
        self._claimed_ids: set[bytes] = set()
        self._waiting: dict[bytes, int] = {}  # waiter key -> create revision
        self._heap: list[tuple[tuple[int, int], bytes]] = []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} items={len(self._pending)}>"

    # producing ---------------------------------------------------------------------------

    def _new_id(self, priority: int) -> bytes:
        return b"%014x%s" % (time.time_ns() // 1000, os.urandom(4).hex().encode())

    def _priority_of(self, id: bytes) -> int:
        return 0

    def put(self, value: bytes | str) -> defer.Deferred[bytes]:
        """Append an item: one transaction.

        Args:
            value: the payload (bytes, or str: UTF-8).

        Returns:
            Deferred firing with the item's key (``NAME/items/<id>``) once written;
            its create revision is its place in the queue.

        Raises:
            TypeError: ``value`` is not bytes or str (raised at once).
            OutcomeUnknown: no answer came; the item may or may not be in the queue
                (a put is not retried: another put would be another item).
        """
        return self._put(as_bytes(value, "value"), 0)

    def _put(self, value: bytes, priority: int) -> defer.Deferred[bytes]:
        async def put() -> bytes:
            while True:
                key = self.items + self._new_id(priority)
                # "Unless the key exists": an id drawn twice never overwrites an item.
                txn = Transaction(compare=[CompCreated(key, "==", 0)],
                                  success=[OpSet(key, value)])
                try:
                    await self.client.submit(txn)
                    return key
                except errors.Failed:
                    continue  # the id exists: draw another (nothing was written)

        return start(put())

    # the view of the items and claims ----------------------------------------------------

    def _order(self, id: bytes, created: int) -> tuple[int, int]:
        return (-self._priority_of(id), created)

    def _apply(self, change: Change[int]) -> None:
        """Keep the items, the claimed ids and the heap of candidates in step."""
        for key in change.before.keys() - change.after.keys():
            if key.startswith(self.items):
                self._pending.pop(key[len(self.items):], None)
            elif key.startswith(self.waiters):
                self._waiting.pop(key, None)
            elif key.startswith(self.claims):
                id = key[len(self.claims):]
                self._claimed_ids.discard(id)
                if id in self._pending:  # released: a candidate again
                    heapq.heappush(self._heap, (self._order(id, self._pending[id]), id))
        for key, kv in change.after.items():
            if key.startswith(self.items):
                id = key[len(self.items):]
                if self._pending.get(id) != kv.create_revision:
                    self._pending[id] = kv.create_revision
                    heapq.heappush(self._heap, (self._order(id, kv.create_revision), id))
            elif key.startswith(self.waiters):
                self._waiting[key] = kv.create_revision
            elif key.startswith(self.claims):
                self._claimed_ids.add(key[len(self.claims):])

    def _next(self) -> bytes | None:
        """The id of the first unclaimed item, or None.  (Entries of items claimed or
        gone are dropped; a released item is pushed again by :meth:`_apply`.)"""
        heap = self._heap
        while heap:
            (_, created), id = heap[0]
            if self._pending.get(id) != created or id in self._claimed_ids:
                heapq.heappop(heap)
                continue
            return id
        return None

    def start(self) -> defer.Deferred[None]:
        """Load this object's view of the queue now (the first :meth:`get` does it
        otherwise): one read of ``NAME/``, then a watch.

        Returns:
            Deferred firing with None once loaded (at once if it is).

        Raises:
            CancelledError: :meth:`close` was called.
            EtcdError, Unavailable: the read's error (``PermissionDenied``,
                ``Unavailable``...); the next start or get tries again.
        """
        return self._ensure_mirror().addCallback(lambda _: None)

    def _ensure_mirror(self) -> defer.Deferred[Any]:
        if self._closed:
            return defer.fail(defer.CancelledError(f"{self!r} was closed"))
        if self._starting is None or (self._starting.done and self._mirror is None):
            self._ended = None
            self._pending, self._claimed_ids, self._heap = {}, set(), []
            self._waiting = {}
            mirror: Mirror[int] = Mirror(
                self.client, self._keys, self._apply, self._mirror_ended,
                self._closed_error, keep=_entry, name=f"queue {self.name!r}")
            self._mirror = mirror

            def failed(failure: Any) -> Any:
                self._mirror = None  # the next get starts one afresh
                return failure

            self._starting = Shared(mirror.start().addErrback(failed))
        return self._starting.wait()

    def _mirror_ended(self, error: BaseException | None) -> None:
        self._ended = error or errors.Unavailable("the client was closed")
        self._mirror = None  # the next get starts one afresh

    def _closed_error(self) -> Exception:
        if self._closed:
            return defer.CancelledError(f"{self!r} was closed")
        # The mirror ended by itself (it logs why; etcd refused it, or the client was
        # closed): it fails its waits before it tells us the error.
        return errors.Unavailable(f"{self!r}: the view of the queue ended"
                                  + (f" ({self._ended!r})" if self._ended else ""))

    def close(self) -> None:
        """Stop this object's view of the queue; gets under way fail with
        CancelledError (their waiter keys removed).  Items and claims stay in etcd:
        claimed items are still to be acked or released.  Idempotent."""
        self._closed = True
        if self._mirror is not None:
            self._mirror.close()

    # consuming ---------------------------------------------------------------------------

    def get(self, session: Session, timeout: float | None = None) -> defer.Deferred[Item]:
        """Wait for and claim the oldest unclaimed item.

        Waiting consumers take turns (FIFO by their waiter keys): only the head acts on
        an item; it claims it and hands its turn on in one transaction.

        Args:
            session: the consumer's :class:`Session`; its lease holds the claim (and
                our waiter key), so the item returns to the queue when it ends.  One
                get at a time per session and queue (items already claimed may be
                held meanwhile: a consumer may hold many).
            timeout: seconds to wait at most (None or infinity: no limit; > 0).

        Returns:
            Deferred firing with the claimed :class:`Item`: our claim was written in
            a transaction that proved the item unclaimed at that revision.

        Raises:
            Timeout: nothing claimed in time; our waiter key is removed, no claim left.
            SessionLost: the session ended (before or while waiting).
            ClaimLost: our waiter key was deleted by someone else while waiting (or the
                item, by hand, while we claimed it).
            TypeError: ``session`` is not a Session; ``timeout`` not a number.
            InvalidArgument: ``timeout`` is 0, negative or NaN; another get of this
                session on this queue is under way (all raised at once).

        Cancelling the Deferred (or :meth:`close`) stops waiting, removes our waiter
        key and any claim it may have written, and fails it with CancelledError.
        """
        if not isinstance(session, Session):
            raise TypeError(f"session must be a coord.session.Session, not "
                            f"{type(session).__name__}")
        timeout = check_timeout(timeout, zero_ok=False)
        if session.lease_id in self._getting:
            raise errors.InvalidArgument(
                f"a get of this session on {self.name!r} is under way: one at a time per "
                "session (use another session to wait in parallel)")
        self._getting.add(session.lease_id)
        got = with_timeout(start(self._get(session)), timeout, self.client.reactor,
                           f"no item claimed from {self.name!r} within {timeout} s")
        # Done once the caller is told (a timed-out get may still remove its keys: the
        # next get of this session waits for that, see _turns).
        got.addBoth(self._got, session.lease_id)
        return got

    def _got(self, result: Any, lease_id: int) -> Any:
        self._getting.discard(lease_id)
        return result

    async def _get(self, session: Session) -> Item:
        await self._ensure_mirror()
        turn = self._turns.get(session.lease_id)
        if turn is None or turn.session is not session:
            for lease_id in [k for k, t in self._turns.items() if not t.session.alive]:
                del self._turns[lease_id]
            turn = self._turns[session.lease_id] = _Turn(session, self.name)
        await turn.take()  # our waiter key, written at turn.token
        assert turn.token is not None
        # This get's claims only (a waiter key our lease left behind is reused, with
        # its create revision: the random part tells two gets apart even then).
        value = b"%x/%d/%s" % (session.lease_id, turn.token, os.urandom(4).hex().encode())
        written: list[bytes] = []  # claims whose outcome we may not know
        seen = 0
        try:
            while True:
                id = await self._wait_item(session, turn, seen)
                outcome = await self._claim(session, turn, id, value, written)
                if isinstance(outcome, Item):
                    return outcome
                seen = outcome  # taken meanwhile: wait for the view to show it
        except GeneratorExit:
            raise  # the coroutine is being closed (the interpreter exits): no I/O now
        except _TurnGone:
            error = await turn._gone_reason("our waiter key was deleted")
            await bounded(self.client.reactor, self._clean(session, turn, value, written))
            raise error from None
        except BaseException:
            await bounded(self.client.reactor, self._clean(session, turn, value, written))
            raise

    async def _wait_item(self, session: Session, turn: _Turn, seen: int) -> bytes:
        """The first unclaimed item's id, once our view shows our waiter key first
        (and has reached revision ``seen``); stopped if the session ends (SessionLost).

        Every claim is written with the deletion of its consumer's waiter key (the
        claim transaction), and every consumer that claimed before our turn had its
        waiter key created before ours.  So once the view holds our waiter key and
        none created before it, it holds every claim written before our turn: the
        item we pick is not one just taken.  (The view at a revision is etcd's state
        at that revision: one change per revision, see coord.recipes._mirror.)"""
        mirror = self._mirror
        if mirror is None:  # ended (an error) or closed
            raise self._closed_error()
        assert turn.token is not None and turn.revision is not None
        token, proven = turn.token, turn.revision

        def test() -> tuple[bool, Any]:
            if self._waiting.get(turn.key) != token:
                if mirror.revision >= proven:  # it was there at `proven`: deleted since
                    raise _TurnGone()
                return False, None
            if mirror.revision < seen or min(self._waiting.values()) < token:
                return False, None
            id = self._next()
            return id is not None, id

        return await unless_session_ends(
            session, mirror.wait(test, None, "an item", revision=seen or None))

    async def _claim(self, session: Session, turn: _Turn, id: bytes, value: bytes,
                     written: list[bytes]) -> Item | int:
        """Claim item ``id`` and hand our turn on, in one transaction.

        Returns:
            The Item, or the revision at which it was found taken (or gone).
        """
        claim, key = self.claims + id, self.items + id
        created = self._pending[id]
        assert turn.token is not None
        # We are the head: our key is there, and every waiter key was created at or
        # after it (a comparison on a range holds when it holds for each key in it;
        # etcd's applyCompare).  The item is the one we saw, and nobody claims it.
        txn = Transaction(
            compare=[turn.guard(), CompCreated(KeySet(self.waiters, prefix=True), ">",
                                               turn.token - 1),
                     CompCreated(key, "==", created), CompCreated(claim, "==", 0)],
            success=[OpSet(claim, value, lease=session.lease_id), OpDel(turn.key),
                     OpGet(key)],
            failure=[OpGet(claim), OpGet(turn.key), OpGet(key)])
        written.append(claim)
        pause = 0.05
        while True:
            try:
                result = await self.client.submit(txn)
                kv, revision = kvs(result.responses[2])[0], result.header.revision
                break
            except errors.Failed as failed:
                mine, item = kvs(failed.responses[0]), kvs(failed.responses[2])
                if mine and mine[0].value == value and mine[0].lease == session.lease_id:
                    # A resend after an earlier send was applied: the claim is ours.
                    if item:
                        kv, revision = item[0], mine[0].create_revision
                        break
                    turn.handed_on()  # (that send deleted our waiter key)
                    await self._drop_claim(claim, value)  # the item was deleted by hand
                    written.remove(claim)
                    raise ClaimLost(f"{key!r} was deleted while we claimed it")
                written.remove(claim)
                if not kvs(failed.responses[1]):  # our waiter key is gone
                    raise await turn._gone_reason("our waiter key was deleted") from None
                self.conflicts += 1
                return failed.header.revision
            except (errors.Unavailable, errors.Timeout) as exc:
                # The answer never came (OutcomeUnknown) or etcd is unreachable.  Sending
                # the same transaction again is safe: its compares (our waiter key as
                # taken, no claim yet) let it apply at most once; the failure branch
                # tells an earlier send applied by our claim's value.
                session.check()
                log.warn("{queue}: claiming {key!r} failed ({error}); again",
                         queue=self, key=key, error=exc)
                await sleep(self.client.reactor, pause)
                pause = min(pause * 2, 1.0)
        written.remove(claim)
        turn.handed_on()
        self.claimed += 1
        return Item(self, session, id, kv.value, kv.create_revision, revision)

    async def _clean(self, session: Session, turn: _Turn, value: bytes,
                     written: list[bytes]) -> None:
        """After a failed, timed-out or cancelled get: delete a claim of this get that
        may have been written (its value is this get's), and our waiter key."""
        letting_go = turn._let_go()  # (at once: the next get of this session waits for it)
        for claim in written:
            await self._drop_claim(claim, value)
        await letting_go

    async def _drop_claim(self, claim: bytes, value: bytes) -> None:
        """Delete ``claim`` if it is this get's (its value)."""
        txn = Transaction(compare=[CompValue(claim, "==", value)], success=[OpDel(claim)])
        try:
            await self.client.submit(txn)
        except errors.Failed:
            pass  # not written (or gone with our lease)
        except Exception as exc:
            # The claim is under our lease: it goes when the session ends at the latest.
            log.warn("{queue}: could not delete {claim!r} ({error}); it goes with the "
                     "session's lease", queue=self, claim=claim, error=exc)


class PriorityQueue(Queue):
    """A queue delivering the highest priority first, FIFO (by put) within a priority.

    Items are ``NAME/items/<priority, 5 decimal digits>/<id>``; a key there without a
    valid priority (written by hand) counts as priority 0.
    """

    def put(self, value: bytes | str, priority: int = 0
            ) -> defer.Deferred[bytes]:
        """Append an item of ``priority`` (an int from 0 to 99999; higher goes first).

        Returns and raises as :meth:`Queue.put`; also TypeError for a non-int priority
        and InvalidArgument for one out of range (at once, nothing sent).
        """
        value = as_bytes(value, "value")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"priority must be an int, not {type(priority).__name__}")
        if not 0 <= priority <= MAX_PRIORITY:
            raise errors.InvalidArgument(
                f"priority must be from 0 to {MAX_PRIORITY}, not {priority}")
        return self._put(value, priority)

    def _new_id(self, priority: int) -> bytes:
        return b"%05d/%s" % (priority, super()._new_id(priority))

    def _priority_of(self, id: bytes) -> int:
        head = id[:6]
        if len(head) == 6 and head[5:] == b"/" and head[:5].isdigit():
            return int(head[:5])
        return 0
