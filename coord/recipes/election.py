"""Election: leader election, etcd's Go ``concurrency.Election`` keys and transactions.

Each candidate writes one key, ``name + "/" + "%x" % lease_id`` (lowercase hex of its
session's lease), whose value is its proposal, attached to the session's lease.  The
leader is the key under ``name/`` with the lowest create revision; the others wait for
the deletion of the key created just before theirs.  The same layout and transactions
as ``client/v3/concurrency/election.go``, so coord candidates, Go programs, ``etcdctl
elect NAME PROPOSAL`` and ``etcdctl elect -l NAME`` all take part in one election.  The
lifecycle (enqueue, wait, prove, hold, lose, resign) is the owned-key core's
(:mod:`coord.recipes._core`); this module adds proposals, ``proclaim``, reading and
observing the leader, and :func:`run_as_leader`.

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
* :meth:`Election.resume` (Go's ``ResumeElection``) keeps the trailing ``/`` of the
  prefix, which Go's drops (so its Leader and Observe there also see ``name2/...`` keys).

A leader elected through a lease is not alone for sure: a leader that pauses (GC, swap,
SIGSTOP) past its TTL loses its key without running any code, another is elected, and
the first resumes believing it leads.  :meth:`Election.guard` is the comparison that
makes a write happen only while this campaign leads.  See ``docs/election.md``.
"""

from __future__ import annotations

import collections
import enum
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import txaio
from twisted.internet import defer
from twisted.python.failure import Failure

from coord import errors
from coord.client import MAX_LEASE_TTL
from coord.errors import LeadershipLost, NoLeader, NotLeader, SessionLost
from coord.keyset import KeySet, as_bytes
from coord.recipes._core import Enqueue, NotFree, OwnedKey, Phase, kvs
from coord.recipes._loop import (
    Shared,
    bounded,
    callback,
    check_name,
    check_timeout,
    detached,
    first,
    positive_int,
    seconds,
    sleep,
    start,
)
from coord.recipes._mirror import Mirror, invoke
from coord.recipes._mirror_state import Change
from coord.session import DEFAULT_TTL, Session
from coord.txn import CompCreated, OpGet, Transaction
from coord.types import Header, KeyValue

if TYPE_CHECKING:
    from coord.client import Client

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
    """What an :class:`Election` knows locally: IDLE; CAMPAIGNING (our key is queued
    behind others, or being written); LEADER; LOST (led; our key was deleted or the
    session ended)."""

    IDLE = "IDLE"
    CAMPAIGNING = "CAMPAIGNING"  # our key is queued behind others (or being written)
    LEADER = "LEADER"
    LOST = "LOST"  # led; our key was deleted or the session ended


_STATES = {Phase.IDLE: ElectionState.IDLE, Phase.WAITING: ElectionState.CAMPAIGNING,
           Phase.HELD: ElectionState.LEADER, Phase.LOST: ElectionState.LOST}


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
        """The Leader that the key-value ``kv`` names, as of store revision ``revision``."""
        return cls(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.lease, revision)

    def same(self, other: Leader | None) -> bool:
        """Whether ``other`` is the same leader with the same value (revisions aside)."""
        return other is not None and (self.key, self.create_revision, self.value) == (
            other.key, other.create_revision, other.value)


def _prefix(name: bytes | str) -> bytes:
    return check_name(name, "election") + b"/"


class Election(OwnedKey):
    """A candidacy in the election called ``name``, through ``session``'s lease.

    Args:
        session: a :class:`coord.session.Session`; its lease keeps our key alive.
        name: the election's name (bytes or str); keys live under ``name + b"/"``.

    Attributes:
        name: the election's name (bytes).
        prefix: ``name/``.
        key: our key, ``name/<lease hex>``.
        token: our key's create revision once elected (Go's ``Rev()``), kept after a
            resign or loss so that a stale :meth:`guard` keeps failing; None before.
        revision: the store revision at which our leadership was proven.
        value: our current proposal (after :meth:`campaign` / :meth:`proclaim`).
    """

    lost_error = LeadershipLost
    watch_while_held = True

    def __init__(self, session: Session, name: bytes | str) -> None:
        super().__init__(session, name)
        self.value: bytes | None = None

    def __repr__(self) -> str:
        token = (f" token={self.token} value={self.value!r}"
                 if self._phase in (Phase.HELD, Phase.LOST) else "")
        return f"<Election {self.name!r} {self.state.name}{token}>"

    @property
    def state(self) -> ElectionState:
        """IDLE, CAMPAIGNING, LEADER or LOST, as far as we know locally (see
        :class:`ElectionState`)."""
        return _STATES[self._phase]

    @property
    def is_leader(self) -> bool:
        """Whether we lead as far as we can tell (LEADER and the session alive).

        Only :meth:`guard` in a transaction *proves* it at the moment of a write.
        """
        return self._holding

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
            SessionLost: the session ended, or its lease is gone (before or while
                waiting; told at once when our key goes with the lease).
            LeadershipLost: our candidate key was deleted by someone else while waiting
                (told at once).

        Cancelling the Deferred (or :meth:`resign`) stops waiting and removes our key;
        the Deferred fails with CancelledError once it is removed.
        """
        value = as_bytes(value, "value")
        return self._campaign(lambda: self._enqueue(value), timeout, value)

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
        return self._campaign(self._adopt, timeout, None)

    def _campaign(self, enqueue: Enqueue, timeout: float | None, value: bytes | None
                  ) -> defer.Deferred[Election]:
        timeout = check_timeout(timeout)

        async def take() -> Election:
            self._proposal = value  # (resume's: read with our key)
            try:
                # timeout=0 is decided here, not by a timer of 0 s (which would cancel
                # even a free campaign's first transaction).
                await self._obtain(enqueue, wait=timeout != 0)
            except NotFree:
                raise errors.Timeout(f"{self.name!r} has a leader, not elected (timeout=0)")
            self.value = self._proposal
            return self

        return self._run(take, None if timeout == 0 else timeout,
                         f"not elected leader of {self.name!r} within {timeout} s")

    async def _adopt(self) -> tuple[int, list[KeyValue], Header]:
        """Resume's enqueue: read our key (it must exist, with our lease) and the first."""
        found = await self.client.submit(Transaction(success=[OpGet(self.key), self._first]))
        mine = kvs(found.responses[0])
        if not mine:
            raise NotLeader(f"{self.key!r} does not exist: no campaign to resume")
        if mine[0].lease != self.session.lease_id:
            raise errors.InvalidArgument(
                f"{self.key!r} is attached to lease {mine[0].lease:#x}, not to our session's")
        self._attempt = Shared(defer.succeed(None))  # clean up our key if we stop
        self._proposal = mine[0].value
        return mine[0].create_revision, kvs(found.responses[1]), found.header

    def _never_held(self) -> errors.CoordError:
        return NotLeader(f"{self!r} was never elected: no guard to give")

    def guard(self) -> CompCreated:
        """A comparison that holds only while this campaign leads: our key still exists
        with the create revision it had when we were elected.

        Put it in your own transactions -- ``Transaction(compare=[election.guard()],
        success=[...])`` -- so a write happens only if we lead at the revision etcd
        applies it (it fails with ``Failed`` otherwise).

        Raises:
            NotLeader: this campaign was never elected.
        """
        return super().guard()

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
        return start(self._proclaim(value))

    async def _proclaim(self, value: bytes) -> int:
        if self._phase is not Phase.HELD or self.token is None:
            raise NotLeader(f"{self!r} does not lead: cannot proclaim")
        token = self.token
        try:
            self.session.check()
            result = await self.client.submit(self._put(token, value))
        except SessionLost as ended:
            self._lose(ended, token)
            raise NotLeader(f"{self!r}: {ended}")
        except errors.Failed:
            self._lose(await self._gone_reason("was deleted: no longer leader"), token)
            raise NotLeader(f"{self.key!r} is gone: no longer leader")
        except errors.LeaseNotFound as gone:
            self._lose(self.session.lease_gone(gone), token)
            raise NotLeader(f"{self!r}: our lease is gone")
        if self.token == token:
            self.value = value
        return result.header.revision

    def resign(self) -> defer.Deferred[None]:
        """Stop leading (or campaigning): delete our key, if it is still ours.

        The next candidate is elected as soon as etcd applies the delete.  Idempotent;
        guarded on our create revision, so a late resign never deletes a newer key.
        Resigning while campaigning cancels the campaign.

        Returns:
            Deferred firing with None once our key is gone.
        """
        return self._let_go()

    def leader(self) -> defer.Deferred[Leader]:
        """The current leader (see :func:`leader`)."""
        return leader(self.client, self.name)

    def observe(self, callback: Callable[[Leader | None], Any] | None = None) -> Observation:
        """Every leader change of this election (see :func:`observe`)."""
        return observe(self.client, self.name, callback)


def leader(client: Client, name: bytes | str) -> defer.Deferred[Leader]:
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



# run_as_leader ---------------------------------------------------------------------------------

# Errors after which run_as_leader campaigns again (after a pause) instead of failing.
_RETRY = (errors.Unavailable, errors.Timeout, SessionLost, LeadershipLost)


def run_as_leader(client: Client, name: bytes | str, value: bytes | str,
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
    callback("fn", fn)
    ttl = positive_int("ttl", ttl, maximum=MAX_LEASE_TTL)
    retry_pause = seconds("retry_pause", retry_pause, none_ok=False, zero_ok=True)
    return start(_run_as_leader(client, prefix[:-1], value, fn, ttl, retry_pause))


def _call(fn: Callable[[Election], Any], election: Election) -> defer.Deferred[Any]:
    try:
        result = fn(election)
    except BaseException:
        return defer.fail()
    if isinstance(result, defer.Deferred):
        return result
    if inspect.iscoroutine(result):
        return start(result)
    return defer.succeed(result)


async def _run_as_leader(client: Client, name: bytes, value: bytes,
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
                await sleep(reactor, retry_pause)
                continue
            lost = election.lost
            running = _call(fn, election)
            work = Shared(running)
            try:
                kind, result = await first(done=work.wait(), lost=lost)
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
        await bounded(reactor, _leave(election, session))


async def _leave(election: Election | None, session: Session | None) -> None:
    if election is not None:
        await election.resign().addErrback(lambda _: None)
    if session is not None:
        await session.close().addErrback(
            lambda f: log.warn("closing {s}: {error}", s=session, error=f.value))
