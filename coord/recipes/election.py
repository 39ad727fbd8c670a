"""Election: leader election, etcd's Go ``concurrency.Election`` keys and transactions.

Each candidate writes one key, ``name + "/" + "%x" % lease_id`` (lowercase hex of its
session's lease), whose value is its proposal, attached to the session's lease.  The
leader is the key under ``name/`` with the lowest create revision; the others wait for
the deletion of the key created just before theirs (``_wait.wait_deletes``).  The same
layout and transactions as ``client/v3/concurrency/election.go``, so coord candidates,
Go programs, ``etcdctl elect NAME PROPOSAL`` and ``etcdctl elect -l NAME`` all take part
in one election.

Where coord departs from Go, on purpose:

* a campaign succeeds only once a *transaction* has shown, at one revision, that our key
  still exists with our create revision and that no key before it remains -- never
  after our session ended while we waited (Go's Campaign returns success when the
  predecessors are gone, without checking that its own key is still there);
* :meth:`Election.observe` keeps a model of every key under the prefix, from one read
  and a watch that resumes where it stopped, and reports the leader as of each
  revision: every change (a new leader, a new value, no leader) once and in order.
  Go's Observe takes the first PUT of a watch response for the leader once the election
  was empty, which can name a candidate that is already gone (etcd issue 18163), and
  never reports "no leader";
* :func:`resume` (Go's ``ResumeElection``) keeps the trailing ``/`` of the prefix, which
  Go's drops (so its Leader and Observe there also see ``name2/...`` keys).

A leader elected through a lease is not alone for sure: a leader that pauses (GC, swap,
SIGSTOP) past its TTL loses its key without running any code, another is elected, and
the first resumes believing it leads.  :meth:`Election.guard` is the comparison that
makes a write happen only while this campaign leads.  See ``docs/election.md``.
"""

from __future__ import annotations

import collections
import enum
import inspect
import weakref
from collections.abc import Callable
from typing import Any

import attrs
import txaio
from twisted.internet import defer, task
from twisted.python.failure import Failure

from coord import _checks, errors
from coord.client import MAX_LEASE_TTL
from coord.errors import LeadershipLost, NoLeader, NotLeader, SessionLost
from coord.keyset import KeySet, as_bytes
from coord.recipes._wait import (
    CLEANUP_GRACE,
    Shared,
    check_timeout,
    delete_own_key,
    detached,
    remove_own_key,
    wait_deletes,
    watch_own_key,
    with_timeout,
)
from coord.session import DEFAULT_TTL, Session
from coord.txn import CompCreated, OpGet, OpSet, Transaction
from coord.types import KeyValue, Range

__all__ = [
    "Election",
    "ElectionState",
    "Leader",
    "Observation",
    "leader",
    "observe",
    "run_as_leader",
]

log = txaio.make_logger()  # type: ignore[attr-defined]  # set by txaio.use_twisted()


class ElectionState(enum.Enum):
    IDLE = "IDLE"
    CAMPAIGNING = "CAMPAIGNING"  # our key is queued behind others (or being written)
    LEADER = "LEADER"
    LOST = "LOST"  # led; our key was deleted or the session ended


@attrs.frozen
class Leader:
    """An election's leader, as read or observed.

    Attributes:
        key: the leader's key (``name/<lease hex>``).
        value: its proposal.
        create_revision: the key's create revision (the leader's ``token``).
        mod_revision: the revision of its last proclaim.
        lease: the lease the key is attached to.
        revision: the store revision at which this was the leader (of the read, or of
            the change that made it so).
    """

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int = 0
    lease: int = 0
    revision: int = 0

    @classmethod
    def of(cls, kv: KeyValue, revision: int) -> Leader:
        return cls(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.lease, revision)

    def same(self, other: Leader | None) -> bool:
        """Whether ``other`` is the same leader with the same value (revisions aside)."""
        return other is not None and (self.key, self.create_revision, self.value) == (
            other.key, other.create_revision, other.value)


def _kvs(response: Any) -> list[KeyValue]:
    """The key-values of a transaction's OpGet response."""
    assert isinstance(response, Range)
    return response.kvs


def _prefix(name: bytes | str) -> bytes:
    name = as_bytes(name, "name")
    if not name:
        raise errors.InvalidArgument("an election's name must not be empty")
    return name + b"/"


def _first(prefix: bytes) -> OpGet:
    """Go's ``WithFirstCreate``: the key under ``prefix`` with the lowest create revision."""
    return OpGet(KeySet(prefix, prefix=True), sort_order="ascend", sort_target="create",
                 limit=1)


# One live Election per key: two objects on one lease and name would share a key, and
# one's resign would delete the other's candidacy.
_owners: weakref.WeakValueDictionary[bytes, Election] = weakref.WeakValueDictionary()


class Election:
    """A candidacy in the election called ``name``, through ``session``'s lease.

    Args:
        session: a :class:`coord.session.Session`; its lease keeps our key alive.
        name: the election's name (bytes or str); keys live under ``name + b"/"``.

    Attributes:
        name, prefix, key: the name, ``name/`` and our key ``name/<lease hex>``.
        token: our key's create revision once elected (Go's ``Rev()``), kept after a
            resign or loss so that a stale :meth:`guard` keeps failing; None before.
        revision: the store revision at which our leadership was proven.
        value: our current proposal (after :meth:`campaign` / :meth:`proclaim`).
    """

    def __init__(self, session: Session, name: bytes | str) -> None:
        if not isinstance(session, Session):
            raise TypeError(f"session must be a coord Session, not {type(session).__name__}")
        self.prefix = _prefix(name)
        self.name = self.prefix[:-1]
        self.session = session
        self.key = self.prefix + b"%x" % session.lease_id
        self.token: int | None = None
        self.revision: int | None = None
        self.value: bytes | None = None
        self._client = session.client
        self._reactor = session.client.reactor
        self._state = ElectionState.IDLE
        self._campaigning: defer.Deferred[Any] | None = None
        self._busy: Shared | None = None  # a resign or clean-up still running
        self._lost_reason: errors.CoordError | None = None
        self._observers: list[defer.Deferred[Any]] = []
        self._session_lost: defer.Deferred[Any] | None = None
        self._watch: Any = None

    def __repr__(self) -> str:
        token = (f" token={self.token} value={self.value!r}"
                 if self._state in (ElectionState.LEADER, ElectionState.LOST) else "")
        return f"<Election {self.name!r} {self._state.name}{token}>"

    @property
    def state(self) -> ElectionState:
        return self._state

    @property
    def is_leader(self) -> bool:
        """Whether we lead as far as we can tell: LEADER and the session alive.

        Only :meth:`guard` in a transaction *proves* it at the moment of a write.
        """
        return self._state is ElectionState.LEADER and self.session.alive

    @property
    def active(self) -> bool:
        return (self._state in (ElectionState.CAMPAIGNING, ElectionState.LEADER)
                or (self._busy is not None and not self._busy.done))

    # campaign -------------------------------------------------------------------------------

    def campaign(self, value: bytes | str, timeout: float | None = None
                 ) -> defer.Deferred[Election]:
        """Stand for election with ``value`` and wait until we lead.

        Go's Campaign: our key is created with ``value`` unless it exists (a campaign of
        this lease is already queued: it is reused, its value updated), then we wait for
        every key created before ours to go.

        Args:
            value: our proposal (bytes or str), what :meth:`leader` and observers see.
            timeout: seconds to wait at most (None or infinity: no limit; 0: do not
                wait -- lead at once if no candidate came before us, else Timeout, our
                key removed; as ``Lock.acquire(timeout=0)``).

        Returns:
            Deferred firing with this Election once it leads: proven inside a
            transaction (our key exists with our create revision, no key before it).

        Raises:
            TypeError: ``value`` is not bytes or str, ``timeout`` not a number (raised
                at once).
            InvalidArgument: already campaigning or leading, or another Election object
                of the same session and name is in use, a negative or NaN ``timeout``
                (raised at once, nothing written).
            Timeout: not elected in time; our key has been removed.
            SessionLost: the session ended (before or while waiting).
            LeadershipLost: our candidate key was deleted by someone else while waiting.

        Cancelling the Deferred (or :meth:`resign`) stops waiting and removes our key;
        the Deferred fails with CancelledError once it is removed.
        """
        value = as_bytes(value, "value")
        timeout = check_timeout(timeout)
        return self._start(self._campaign(value, wait=timeout != 0), timeout,
                           f"not elected leader of {self.name!r} within {timeout} s")

    def resume(self, timeout: float | None = None) -> defer.Deferred[Election]:
        """Take up the candidacy our session's lease already has (Go's ResumeElection).

        For a process that restarted with the lease of its predecessor (see
        :meth:`Session.resume`): if our key exists, it is adopted with its value and
        create revision -- a leader leads again at once, with the same ``token``; a
        queued candidate goes on waiting in its place.

        Returns, raises and cancels as :meth:`campaign`, and also raises:
            NotLeader: this lease has no key in the election (nothing to resume);
                nothing is written.
        """
        timeout = check_timeout(timeout)
        return self._start(self._campaign(None, wait=timeout != 0), timeout,
                           f"not elected leader of {self.name!r} within {timeout} s")

    def _start(self, coro: Any, timeout: float | None, message: str) -> defer.Deferred[Any]:
        if self._state in (ElectionState.CAMPAIGNING, ElectionState.LEADER):
            coro.close()
            raise errors.InvalidArgument(f"{self!r} is already {self._state.name.lower()}")
        other = _owners.get(self.key)
        if other is not None and other is not self and other.active:
            coro.close()
            raise errors.InvalidArgument(
                f"{other!r} of the same session already uses {self.key!r}: use one Election "
                "object per name and session (or another session)")
        _owners[self.key] = self
        self._state = ElectionState.CAMPAIGNING
        self._lost_reason = None
        d = defer.Deferred.fromCoroutine(coro)
        self._campaigning = d
        if timeout == 0:
            return d  # the campaign does not wait (see _campaign): no timer to run out
        return with_timeout(d, timeout, self._reactor, message)

    async def _campaign(self, value: bytes | None, wait: bool = True) -> Election:
        """Campaign with ``value``, or (None) resume the key our lease has; with ``wait``
        false, raise Timeout instead of waiting for the candidates before us."""
        client, key = self._client, self.key
        enqueue = None
        token = None
        try:
            if self._busy is not None:
                await self._busy.wait()  # a resign or clean-up of ours still running
            self.session.check()
            if value is None:
                found = await client.submit(Transaction(success=[OpGet(key),
                                                                 _first(self.prefix)]))
                if not _kvs(found.responses[0]):
                    raise NotLeader(f"{key!r} does not exist: no campaign to resume")
                mine = _kvs(found.responses[0])[0]
                if mine.lease != self.session.lease_id:
                    raise errors.InvalidArgument(
                        f"{key!r} is attached to lease {mine.lease:#x}, not to our session's")
                enqueue = Shared(defer.succeed(None))  # clean up our key if we stop
                token, value = mine.create_revision, mine.value
                first, header = _kvs(found.responses[1]), found.header
            else:
                # Go's Campaign: create our key unless it exists; read the first key in
                # the same transaction, so an uncontended campaign is one round trip.
                enqueue = Shared(client.submit(Transaction(
                    compare=[CompCreated(key, "==", 0)],
                    success=[OpSet(key, value, lease=self.session.lease_id),
                             _first(self.prefix)],
                    failure=[OpGet(key), _first(self.prefix)])))
                try:
                    result = await enqueue.wait()
                    token, first, header = (result.header.revision, _kvs(result.responses[1]),
                                            result.header)
                except errors.Failed as failed:
                    # Our key is there already (an earlier campaign of this lease):
                    # reuse it, updating its value as Go does (guarded, as a proclaim).
                    mine = _kvs(failed.responses[0])[0]
                    token, first, header = (mine.create_revision, _kvs(failed.responses[1]),
                                            failed.header)
                    if mine.value != value or mine.lease != self.session.lease_id:
                        # (A key written there without our lease -- by hand, say -- is
                        # attached to it, so it cannot outlive our session.)
                        header = (await client.submit(self._put(token, value))).header
            if not first or first[0].create_revision < token:
                if not wait and first:
                    # (A timer of 0 s would cancel even a free campaign's first
                    # transaction: "do not wait" is decided here instead.)
                    raise errors.Timeout(
                        f"{self.name!r} has a leader, not elected (timeout=0)")
                header = await self._wait(token)
            self.session.check()
        except BaseException as exc:
            self._state = ElectionState.IDLE
            self._campaigning = None
            if enqueue is not None:
                self._busy = Shared(defer.Deferred.fromCoroutine(
                    remove_own_key(self, enqueue, token)))
                await detached(self._busy.wait())
            if isinstance(exc, errors.Failed):
                # A guard failed: our key is gone.  Say whether its lease went with it.
                raise await self._key_gone("our candidate key was deleted while waiting")
            if isinstance(exc, errors.LeaseNotFound) and not isinstance(exc, SessionLost):
                raise self.session.lease_gone(exc)  # etcd refused our key's lease
            raise
        self._campaigning = None
        self._lead(token, header.revision, value)
        return self

    def _put(self, token: int, value: bytes) -> Transaction:
        """Go's Proclaim: write ``value`` to our key if it is still the one of ``token``."""
        return Transaction(compare=[CompCreated(self.key, "==", token)],
                           success=[OpSet(self.key, value, lease=self.session.lease_id)])

    async def _key_gone(self, message: str) -> errors.CoordError:
        """The error for "our key is gone": SessionLost if the lease went, else
        LeadershipLost (someone deleted the key)."""
        try:
            self.session.check()
            await self.session.lease.remaining()
        except errors.LeaseNotFound as gone:
            return self.session.lease_gone(gone)
        except errors.CoordError:
            pass
        return LeadershipLost(f"{self.key!r}: {message}")

    async def _wait(self, token: int) -> Any:
        """Wait for the keys before ours to go; stop as soon as the session ends (Go's
        Campaign goes on waiting with a dead session, and may then report success)."""
        waiting = defer.Deferred.fromCoroutine(wait_deletes(
            self._client, self.prefix, token - 1, guard=[CompCreated(self.key, "==", token)]))
        ended = self.session.lost
        ended.addCallbacks(lambda _: waiting.cancel(), lambda _: None)
        try:
            return await waiting
        except defer.CancelledError:
            self.session.check()  # raises SessionLost if that is why the wait stopped
            raise
        finally:
            ended.cancel()

    # leading --------------------------------------------------------------------------------

    def _lead(self, token: int, revision: int, value: bytes) -> None:
        self._state = ElectionState.LEADER
        self.token, self.revision, self.value = token, revision, value
        self._session_lost = self.session.lost
        self._session_lost.addCallbacks(self._lose, lambda _: None)
        self._watch_key()

    def guard(self) -> CompCreated:
        """A comparison that holds only while this campaign leads: our key still exists
        with the create revision it had when we were elected.

        Put it in your own transactions -- ``Transaction(compare=[election.guard()],
        success=[...])`` -- so a write happens only if we lead at the revision etcd
        applies it (it fails with ``Failed`` otherwise).

        Raises:
            NotLeader: this campaign was never elected.
        """
        if self.token is None:
            raise NotLeader(f"{self!r} was never elected: no guard to give")
        return CompCreated(self.key, "==", self.token)

    def proclaim(self, value: bytes | str) -> defer.Deferred[int]:
        """Change our proposal while we lead, without a new election (Go's Proclaim).

        Guarded on our key's create revision: it never writes a key we no longer hold.

        Returns:
            Deferred firing with the store revision of the write.

        Raises:
            TypeError: ``value`` is not bytes or str (raised at once).
            NotLeader: we do not lead (never elected, resigned, or leadership lost --
                then ``lost`` fires, if it had not).
        """
        value = as_bytes(value, "value")
        return defer.Deferred.fromCoroutine(self._proclaim(value))

    async def _proclaim(self, value: bytes) -> int:
        if self._state is not ElectionState.LEADER or self.token is None:
            raise NotLeader(f"{self!r} does not lead: cannot proclaim")
        token = self.token
        try:
            self.session.check()
            result = await self._client.submit(self._put(token, value))
        except SessionLost as ended:
            self._lose(ended, token)
            raise NotLeader(f"{self!r}: {ended}")
        except errors.Failed:
            self._lose(await self._key_gone("was deleted: no longer leader"), token)
            raise NotLeader(f"{self.key!r} is gone: no longer leader")
        except errors.LeaseNotFound as gone:
            self._lose(self.session.lease_gone(gone), token)
            raise NotLeader(f"{self!r}: our lease is gone")
        if self.token == token:
            self.value = value
        return result.header.revision

    @property
    def lost(self) -> defer.Deferred[errors.CoordError]:
        """A new Deferred that fires, with the reason, if leadership is lost: the session
        ends (:class:`SessionLost`) or our key is deleted (:class:`LeadershipLost`).

        It concerns the current leadership (or the next one, if read before being
        elected); when leadership ends with :meth:`resign` it never fires.  Once LOST
        it has fired already.  Cancelling it just stops observing.
        """
        if self._state is ElectionState.LOST and self._lost_reason is not None:
            return defer.succeed(self._lost_reason)
        d: defer.Deferred[errors.CoordError] = defer.Deferred(self._observers.remove)
        self._observers.append(d)
        return d

    def _watch_key(self) -> None:
        """Watch our key while we lead: its deletion (or re-creation) is a loss."""
        watch_own_key(self, lambda: self._state is ElectionState.LEADER, self._lose,
                      LeadershipLost)

    def _lose(self, reason: Any, token: int | None = None) -> None:
        if self._state is not ElectionState.LEADER or (token is not None
                                                        and token != self.token):
            return
        self._stop_leading(ElectionState.LOST)
        self._lost_reason = reason
        log.warn("{e} lost leadership: {reason}", e=self, reason=reason)
        observers, self._observers = self._observers, []
        for d in observers:
            d.callback(reason)

    def _stop_leading(self, state: ElectionState) -> None:
        self._state = state
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
        session_lost, self._session_lost = self._session_lost, None
        if session_lost is not None and not session_lost.called:
            session_lost.cancel()

    # resign ---------------------------------------------------------------------------------

    def resign(self) -> defer.Deferred[None]:
        """Stop leading (or campaigning): delete our key, if it is still ours.

        The next candidate is elected as soon as etcd applies the delete.  Idempotent;
        guarded on our create revision, so a late resign never deletes a newer key.
        Resigning while campaigning cancels the campaign.

        Returns:
            Deferred firing with None once our key is gone.
        """
        if self._state is ElectionState.CAMPAIGNING and self._campaigning is not None:
            # The campaign's Deferred fails with CancelledError once its key is removed.
            self._campaigning.cancel()
            return self._busy.wait() if self._busy is not None else defer.succeed(None)
        if self._state in (ElectionState.LEADER, ElectionState.LOST):
            token = self.token
            self._stop_leading(ElectionState.IDLE)
            self._observers = []  # ended as asked: `lost` observers never fire
            self._busy = Shared(defer.Deferred.fromCoroutine(delete_own_key(self, token)))
        if self._busy is not None:
            return self._busy.wait()
        return defer.succeed(None)

    # reading --------------------------------------------------------------------------------

    def leader(self) -> defer.Deferred[Leader]:
        """The current leader (see :func:`leader`)."""
        return leader(self._client, self.name)

    def observe(self, callback: Callable[[Leader | None], Any] | None = None) -> Observation:
        """Every leader change of this election (see :func:`observe`)."""
        return observe(self._client, self.name, callback)


def leader(client: Any, name: bytes | str) -> defer.Deferred[Leader]:
    """The current leader of election ``name`` (Go's Leader): its key, value and revisions.

    Returns:
        Deferred firing with a :class:`Leader`.

    Raises:
        NoLeader: nobody stands for election.
    """
    prefix = _prefix(name)

    def found(result: Any) -> Leader:
        if not result.kvs:
            raise NoLeader(f"election {prefix[:-1]!r} has no leader")
        return Leader.of(result.kvs[0], result.header.revision)

    return client.get(KeySet(prefix, prefix=True), sort_order="ascend", sort_target="create",
                      limit=1).addCallback(found)


# observe ------------------------------------------------------------------------------------

# The observe part's own imports, kept in its region (E402) while the rest of the module
# is rewritten elsewhere; they belong with the others at the top.
from coord.client import Client  # noqa: E402
from coord.recipes._mirror import Mirror, invoke  # noqa: E402
from coord.recipes._mirror_state import Change  # noqa: E402


def observe(client: Client, name: bytes | str,
            callback: Callable[[Leader | None], Any] | None = None) -> Observation:
    """Report the leader of election ``name`` now and at every change, until closed.

    Args:
        client: a :class:`coord.Client` (no session needed: observing writes nothing).
        name: the election's name.
        callback: called with a :class:`Leader`, or None for "no leader", for the
            current state and then each change; without one, iterate over the returned
            :class:`Observation` (``async for leader in observation: ...``).  It may be
            an ``async def`` function (or return a Deferred): each report's coroutine is
            started and left to run -- it is *not* awaited before the next report, nor
            cancelled by close(); its failure is logged with the report it was given.

    Returns:
        An :class:`Observation`.  See it for what is reported and when.
    """
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, not {type(callback).__name__}")
    return Observation(client, _prefix(name), callback)


class Observation:
    """The leader of an election, now and at every change (made by :func:`observe`).

    What it reports: the leader (a :class:`Leader`) or None (no candidate at all) as of
    each store revision at which it differs from the last report -- a new leader, or the
    same leader with a new value -- once each, in revision order (``leader.revision``).
    The leader is the key with the lowest create revision in a prefix mirror
    (:mod:`coord.recipes._mirror`): one read of every key under the election's prefix,
    then a watch from the revision after it, one change per revision, so every report
    is the true state at its revision: after a broken connection the watch resumes where
    it stopped and the changes missed meanwhile are reported then, in order.  If etcd
    compacted them away the prefix is read again and only the current state is
    reported, if it differs (``resyncs`` counts these).  ``Unavailable`` and ``Timeout``
    are retried after a pause; another error ends the observation (``done``).

    The first report is the state when the observation starts.  Reports go to the
    callback, or else wait in a queue for ``async for``.

    Attributes:
        leader: the last state reported (None before the first, or for no leader).
    """

    def __init__(self, client: Client, prefix: bytes,
                 callback: Callable[[Leader | None], Any] | None) -> None:
        self.prefix = prefix
        self._callback = callback
        self.leader: Leader | None = None
        self._reported = False
        self._queue: collections.deque[Leader | None] = collections.deque()
        self._waiter: defer.Deferred[None] | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._ready: defer.Deferred[Leader | None] = defer.Deferred()
        self._ready_shared = Shared(self._ready)
        self._done: defer.Deferred[None] = defer.Deferred()
        self._done_shared = Shared(self._done)
        self._mirror: Mirror[KeyValue] = Mirror(
            client, KeySet(prefix, prefix=True), self._changed, self._ended,
            lambda: errors.CoordError("observation closed"), retry_first_read=True,
            name=f"observation {prefix[:-1]!r}")
        self._mirror.start().addErrback(self._not_started)

    def __repr__(self) -> str:
        state = "CLOSED" if self._closed else "OBSERVING"
        return f"<Observation {self.prefix[:-1]!r} {state} leader={self.leader!r}>"

    _watch = property(lambda self: self._mirror.watch)  # what tests look at

    @property
    def resyncs(self) -> int:
        """How many times the prefix was read again (after a compaction)."""
        return self._mirror.resyncs

    @property
    def ready(self) -> defer.Deferred[Leader | None]:
        """A new Deferred firing with the first report (the state at the start)."""
        return self._ready_shared.wait()

    @property
    def done(self) -> defer.Deferred[None]:
        """A new Deferred firing with None once closed, or failing with the error that
        ended the observation (one that reconnecting and reading again cannot cure,
        e.g. PermissionDenied)."""
        return self._done_shared.wait()

    def _changed(self, change: Change[KeyValue]) -> None:
        if self._closed or not (change or change.first):
            return
        candidates = self._mirror.state.entries
        state: Leader | None = None
        if candidates:
            kv = min(candidates.values(), key=lambda kv: kv.create_revision)
            state = Leader.of(kv, change.revision)
        if self._reported and (state is self.leader is None
                               or (state is not None and state.same(self.leader))):
            return
        self._reported = True
        self.leader = state
        if not self._ready.called:
            self._ready.callback(state)
            if self._closed:
                return  # closed by code that awaited `ready`: nothing after close()
        if self._callback is not None:
            invoke(self._callback, state, "{o}: callback {cb!r} raised on {state!r}; "
                   "observing goes on", o=self, cb=self._callback, state=state)
        else:
            self._queue.append(state)
            self._wake()

    def _not_started(self, failure: Failure) -> None:
        if not failure.check(defer.CancelledError):  # (that is close())
            self._fail(failure.value)  # type: ignore[arg-type]  # a Failure has a value

    def _ended(self, error: BaseException | None) -> None:
        if error is None:
            self.close()  # the client was closed
        else:
            self._fail(error)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(None)

    def _fail(self, exc: BaseException) -> None:
        if self._closed:
            return
        log.error("{o} ended: {error}", o=self, error=exc)
        self._error = exc
        self._end()
        if not self._ready.called:
            self._ready.errback(exc)
        self._done.errback(exc)

    def _end(self) -> None:
        self._closed = True
        self._mirror.close()
        self._wake()

    def close(self) -> None:
        """Stop observing: no report after this returns.  Iteration ends once the
        reports already queued are consumed."""
        if self._closed:
            return
        self._end()
        if not self._ready.called:
            self._ready.errback(defer.CancelledError("observation closed"))
        self._done.callback(None)

    cancel = close

    def __aiter__(self) -> Observation:
        return self

    async def __anext__(self) -> Leader | None:
        while not self._queue:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            if self._closed:
                raise StopAsyncIteration
            self._waiter = defer.Deferred()
            await self._waiter
        return self._queue.popleft()

    async def __aenter__(self) -> Observation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


# process restarts ------------------------------------------------------------------------------


# run_as_leader ---------------------------------------------------------------------------------

# Errors after which run_as_leader campaigns again (after a pause) instead of failing.
_RETRY = (errors.Unavailable, errors.Timeout, SessionLost, LeadershipLost)


def run_as_leader(client: Any, name: bytes | str, value: bytes | str,
                  fn: Callable[[Election], Any], *, ttl: int = DEFAULT_TTL,
                  retry_pause: float = 1.0) -> defer.Deferred[Any]:
    """Campaign; while leader run ``fn(election)``; when leadership is lost, cancel it and
    campaign again.  The shape a worker wants.

    Each campaign uses a session of ``ttl`` seconds (a new one once the previous one
    ended).  ``fn`` gets the elected :class:`Election` (for ``guard()``, ``token``,
    ``proclaim``) and may return a value, a Deferred or a coroutine.  If leadership is
    lost while it runs, its Deferred is cancelled (a coroutine sees CancelledError at its
    current ``await``) and, once it has finished, a new campaign starts.  A campaign
    that fails for a reason time may cure (server unreachable, session lost, key
    deleted) is tried again after ``retry_pause`` seconds.

    Returns:
        Deferred firing with ``fn``'s result once it finishes while leader (then we
        resign and close the session), or failing with its error (likewise).

    Raises:
        TypeError: bad ``name``, ``value`` or ``fn``; a ``ttl`` that is not an int, a
            ``retry_pause`` that is not a number (raised at once).
        InvalidArgument: an empty ``name``, a ``ttl`` below 1 or above etcd's largest,
            a negative, NaN or infinite ``retry_pause`` (raised at once).

    Cancelling the Deferred cancels ``fn`` if it runs, resigns and closes the session.
    """
    prefix = _prefix(name)
    value = as_bytes(value, "value")
    _checks.callback("fn", fn)
    ttl = _checks.positive_int("ttl", ttl, maximum=MAX_LEASE_TTL)
    retry_pause = _checks.seconds("retry_pause", retry_pause, none_ok=False, zero_ok=True)
    return defer.Deferred.fromCoroutine(
        _run_as_leader(client, prefix[:-1], value, fn, ttl, retry_pause))


def _call(fn: Callable[[Election], Any], election: Election) -> defer.Deferred[Any]:
    try:
        result = fn(election)
    except BaseException:
        return defer.fail()
    if isinstance(result, defer.Deferred):
        return result
    if inspect.iscoroutine(result):
        return defer.Deferred.fromCoroutine(result)
    return defer.succeed(result)


async def _run_as_leader(client: Any, name: bytes, value: bytes,
                         fn: Callable[[Election], Any], ttl: int, retry_pause: float) -> Any:
    reactor = client.reactor
    session: Session | None = None
    election: Election | None = None
    try:
        while True:
            try:
                if session is None or not session.alive:
                    if session is not None:
                        await detached(session.close())
                    session = None
                    session = await Session.create(client, ttl)  # a cancel leaks no lease
                    election = Election(session, name)
                assert election is not None
                await election.campaign(value)
            except _RETRY as exc:
                log.warn("campaign for {name!r} failed ({error}); again in {pause} s",
                         name=name, error=exc, pause=retry_pause)
                await task.deferLater(reactor, retry_pause, lambda: None)
                continue
            lost = election.lost
            running = _call(fn, election)
            work = Shared(running)
            outcome: defer.Deferred[tuple[str, Any]] = defer.Deferred()

            def finished(result: Any, outcome: Any = outcome) -> None:
                if not outcome.called:
                    outcome.callback(("done", result))

            def ended(reason: Any, outcome: Any = outcome) -> None:
                if not outcome.called:
                    outcome.callback(("lost", reason))

            work.wait().addBoth(finished)
            lost.addCallbacks(ended, lambda _: None)
            try:
                kind, result = await outcome
            except defer.CancelledError:
                lost.cancel()
                running.cancel()
                await detached(work.wait().addErrback(lambda _: None))
                raise
            if kind == "done":
                lost.cancel()
                if isinstance(result, Failure):
                    result.raiseException()
                return result
            log.warn("{e}: leadership lost ({reason}); stopping {fn!r} and campaigning again",
                     e=election, reason=result, fn=fn)
            running.cancel()
            await detached(work.wait().addErrback(lambda _: None))
            await detached(election.resign())  # from LOST back to IDLE (deletes nothing new)
    finally:
        # Resign and close, waiting at most CLEANUP_GRACE for them (etcd may hang): they
        # go on in the background after that; the lease's TTL bounds them anyway.
        await _bounded(reactor, _leave(election, session))


async def _leave(election: Election | None, session: Session | None) -> None:
    if election is not None:
        await election.resign().addErrback(lambda _: None)
    if session is not None:
        await session.close().addErrback(
            lambda f: log.warn("closing {s}: {error}", s=session, error=f.value))


async def _bounded(reactor: Any, work: Any) -> None:
    """Wait for the coroutine ``work`` at most CLEANUP_GRACE seconds; it goes on anyway."""
    done = Shared(defer.Deferred.fromCoroutine(work))
    waiting = done.wait()
    timer = reactor.callLater(CLEANUP_GRACE, waiting.cancel)
    try:
        await detached(waiting)
    except defer.CancelledError:
        log.info("clean-up still running after {grace} s: left to finish in the background",
                 grace=CLEANUP_GRACE)
    finally:
        if timer.active():
            timer.cancel()

