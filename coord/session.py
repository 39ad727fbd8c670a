"""Session: one lease kept alive for the recipes that share it, and a say on when it is gone.

A recipe's keys (a lock's waiter key, an election candidate) are attached to the session's
lease, so they vanish when the process dies or stops refreshing.  The session refreshes
the lease every TTL/3 and keeps a *local deadline*: the send time of the last answered
keep-alive plus the TTL that keep-alive returned.  The send time, not the reply's arrival:
etcd restarts the lease's clock when it receives the request, which is after we sent it,
so a deadline counted from the send time never outlives the lease on the server.

States (:class:`SessionState`):

* CONNECTED -- the last keep-alive was answered;
* SUSPENDED -- keep-alives are failing (server unreachable, timeouts), the deadline has
  not passed: the lease may still be alive, keep-alives go on;
* EXPIRED -- the lease is gone: etcd answered a keep-alive with TTL <= 0 (it expired or
  was revoked), or no keep-alive was answered before the deadline;
* CLOSED -- :meth:`Session.close` was called.

EXPIRED and CLOSED are final.  On entering either, every Deferred obtained from
:attr:`Session.lost` fires with the reason (an exception instance, passed as the result,
never as a failure).  :meth:`Session.listen` is called on every change of state, the
final ones included (Curator's ConnectionStateListener), so a daemon can pause its work
while SUSPENDED.  A session that gives up at its deadline also revokes the lease in
the background, so that keys the server may still hold do not outlive our say-so.

Based on etcd's ``client/v3/concurrency/session.go`` (one lease per session, ``Done()``,
``Orphan()``, ``Close()`` revoking it).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import txaio
from twisted.internet import defer
from twisted.python.failure import Failure

from coord import _checks, errors
from coord.errors import SessionLost

if TYPE_CHECKING:
    from coord.client import Client
    from coord.lease import Lease

__all__ = ["Session", "SessionState"]

log = txaio.make_logger()  # type: ignore[attr-defined]  # set by txaio.use_twisted()

DEFAULT_TTL = 10

# Pause between keep-alives while they fail (capped by TTL/3).
RETRY_PAUSE = 0.5


class SessionState(enum.Enum):
    """A :class:`Session`'s state: CONNECTED, SUSPENDED, EXPIRED or CLOSED (see the
    module's docstring; EXPIRED and CLOSED are final)."""

    CONNECTED = "CONNECTED"
    SUSPENDED = "SUSPENDED"
    EXPIRED = "EXPIRED"
    CLOSED = "CLOSED"


class _Listener:
    """One :meth:`Session.listen` subscription (compared by identity: a callback added
    twice is two subscriptions)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[SessionState, SessionState, BaseException | None], Any],
                 ) -> None:
        self.fn = fn


class Session:
    """One lease, kept alive; made by :meth:`Session.create`.

    Attributes:
        client: the :class:`coord.Client` the session (and its recipes) use.
        lease: the session's :class:`coord.Lease`.
        lease_id: the lease's ID (recipes write ``"%x" % lease_id`` into their keys).
        ttl: the TTL etcd granted, in seconds.
        deadline: ``reactor.seconds()`` time until which the lease is known to live.
        reason: why the session ended (a :class:`SessionLost`), or None while it lives.
    """

    def __init__(self, client: Client, lease: Lease, sent_at: float) -> None:
        self.client = client
        self.lease = lease
        self.lease_id = lease.lease_id
        self.ttl = int(lease.ttl or DEFAULT_TTL)
        self._reactor = client.reactor
        self._state = SessionState.CONNECTED
        self.deadline = sent_at + self.ttl
        self.reason: SessionLost | None = None
        self._observers: list[defer.Deferred[Any]] = []
        self._inflight: defer.Deferred[int] | None = None
        self._orphaned = False
        self._revoked = False
        self._revoking: defer.Deferred[Any] | None = None
        self._close_waiters: list[defer.Deferred[None]] = []
        self._listeners: list[_Listener] = []
        self._pending: list[tuple[SessionState, SessionState, BaseException | None]] = []
        self._dispatching = False
        self._next = self._reactor.callLater(
            max(0.0, sent_at + self.interval - self._reactor.seconds()), self._keepalive)
        self._expiry = self._reactor.callLater(
            max(0.0, self.deadline - self._reactor.seconds()), self._deadline_passed)

    @classmethod
    def create(cls, client: Client, ttl: int = DEFAULT_TTL) -> defer.Deferred[Session]:
        """Grant a lease of ``ttl`` seconds and keep it alive.

        Returns:
            Deferred firing with the :class:`Session` (etcd may grant a longer TTL than
            asked for: it has a minimum).

        Raises:
            TypeError, InvalidArgument: ``ttl`` is not a positive int.

        Cancelling the Deferred never leaves a lease behind: a grant already on its way
        is waited for in the background and revoked.
        """
        sent_at = client.reactor.seconds()
        granting = client.lease(ttl)
        out: defer.Deferred[Session] = defer.Deferred()  # cancel(): CancelledError at once

        def granted(result: Any) -> None:
            if out.called:  # cancelled while the grant was on its way
                if not isinstance(result, Failure):
                    result.revoke().addErrback(lambda f: log.warn(
                        "revoking lease {id:#x} granted after a cancel: {error}",
                        id=result.lease_id, error=f.value))
            elif isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(cls(client, result, sent_at))

        granting.addBoth(granted)
        return out

    @classmethod
    def resume(cls, client: Client, lease_id: int) -> defer.Deferred[Session]:
        """A Session on an existing lease (say, of this program before a restart).

        Go's ``NewSession(WithLease(id))``: save ``session.lease_id`` somewhere that
        survives the restart (and close nothing on the way out), then resume within the
        TTL.  Recipes find their keys again by the lease (``Election.resume``; a Lock of
        the same name reuses its key).

        Returns:
            Deferred firing with the Session, once a keep-alive of the lease was answered.

        Raises:
            TypeError, InvalidArgument: ``lease_id`` is not a positive int.
            SessionLost: the lease is gone (expired or revoked).
        """
        if isinstance(lease_id, bool) or not isinstance(lease_id, int):
            raise TypeError(f"lease_id must be an int, not {type(lease_id).__name__}")
        if lease_id <= 0:
            raise errors.InvalidArgument(f"lease_id must be positive, not {lease_id}")
        from coord.lease import Lease

        async def go() -> Session:
            sent_at = client.reactor.seconds()
            try:
                ttl = await Lease(client, lease_id).refresh()
            except errors.LeaseNotFound as gone:
                raise SessionLost(f"lease {lease_id:#x} has expired or was revoked ({gone})")
            return cls(client, Lease(client, lease_id, ttl), sent_at)

        return defer.Deferred.fromCoroutine(go())

    def __repr__(self) -> str:
        return f"<Session {self.lease_id:#x} ttl={self.ttl} {self._state.name}>"

    @property
    def state(self) -> SessionState:
        """CONNECTED, SUSPENDED, EXPIRED or CLOSED (see :class:`SessionState`)."""
        return self._state

    @property
    def interval(self) -> float:
        """Seconds between keep-alives, a third of the TTL (as etcd's own clients do)."""
        return self.ttl / 3.0

    @property
    def alive(self) -> bool:
        """Whether the lease is still ours as far as we can tell -- CONNECTED or SUSPENDED,
        and the deadline not passed (even if the reactor has not yet run its timer, as
        after a long pause of the process)."""
        return self.reason is None and self._reactor.seconds() < self.deadline

    @property
    def lost(self) -> defer.Deferred[SessionLost]:
        """A new Deferred that fires with the reason (a :class:`SessionLost`) when the
        session ends: lease expired or revoked, deadline passed, or closed.

        Each access gives a Deferred of its own (so one observer's callbacks do not change
        what another sees); once the session has ended it has already fired.
        Cancelling it just stops observing.
        """
        if self.reason is not None:
            return defer.succeed(self.reason)
        d: defer.Deferred[SessionLost] = defer.Deferred(self._observers.remove)
        self._observers.append(d)
        return d

    def listen(self, callback: Callable[[SessionState, SessionState, BaseException | None],
                                        Any]) -> Callable[[], None]:
        """Call ``callback(old_state, new_state, reason)`` on every change of state.

        The changes: CONNECTED -> SUSPENDED (a keep-alive failed; ``reason`` is its
        error), SUSPENDED -> CONNECTED (answered again; ``reason`` None), and CONNECTED
        or SUSPENDED -> EXPIRED or CLOSED (``reason`` the :class:`SessionLost`, as
        :attr:`reason`).  Each change is reported once, to every listener in the order
        they were added, after the session's state (and :attr:`reason`) changed and
        before the Deferreds of :attr:`lost` fire; nothing is reported when the state
        stays the same (keep-alives failing again while SUSPENDED).  If a callback
        changes the state itself (say it calls :meth:`close`), that change is queued and
        reported once every listener has heard of the current one (so each hears of
        every change, in order; the :attr:`lost` Deferreds may then fire first).  A
        listener added from inside a callback hears of the next change.

        A callback that raises is logged; the other listeners and the session go on.
        One that returns a coroutine (an ``async def``) or a Deferred is not waited
        for: the coroutine is started, and a failure of either is logged.

        A listener added after the session ended is never called (the session's state
        can no longer change; read :attr:`state` or :attr:`reason`).

        Args:
            callback: called as ``callback(old_state, new_state, reason)``.

        Returns:
            A callable that unsubscribes (at once: a change being reported is not
            reported to it any more); calling it again does nothing.

        Raises:
            TypeError: ``callback`` is not callable.
        """
        entry = _Listener(_checks.callback("callback", callback))
        if self.reason is None:
            self._listeners.append(entry)

        def unsubscribe() -> None:
            if entry in self._listeners:
                self._listeners.remove(entry)

        return unsubscribe

    def _changed(self, old: SessionState, reason: BaseException | None) -> None:
        """Tell the listeners that the state went from ``old`` to the current one.

        A change made from inside a listener is queued, and reported to every listener
        once the current one has been: each listener hears of every change, in order.
        """
        new = self._state
        if new is old:
            return
        self._pending.append((old, new, reason))
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while self._pending:
                change = self._pending.pop(0)
                for entry in list(self._listeners):
                    if entry in self._listeners:  # not unsubscribed by an earlier one
                        self._call_listener(entry.fn, *change)
        finally:
            self._dispatching = False
        if self.reason is not None:
            self._listeners.clear()  # final: there is nothing more to report

    def _call_listener(self, fn: Callable[..., Any], old: SessionState, new: SessionState,
                       reason: BaseException | None) -> None:
        try:
            result = fn(old, new, reason)
        except Exception:
            self._listener_failed(Failure(), fn, old, new)
            return
        if isinstance(result, Coroutine):
            result = defer.Deferred.fromCoroutine(result)
        if isinstance(result, defer.Deferred):
            result.addErrback(self._listener_failed, fn, old, new)

    def _listener_failed(self, failure: Failure, fn: Callable[..., Any], old: SessionState,
                         new: SessionState) -> None:
        log.failure("{session}: listener {cb!r} failed on {old} -> {new}; the session goes on",
                    failure, session=self, cb=fn, old=old.name, new=new.name)

    def check(self) -> None:
        """Raise the reason the session ended, if it has.

        Raises:
            SessionLost: the session is EXPIRED or CLOSED.
        """
        if self.reason is not None:
            raise self.reason
        if self._reactor.seconds() >= self.deadline:
            self._deadline_passed()
            raise self.reason  # type: ignore[misc]  # set by _deadline_passed

    # keep-alive ---------------------------------------------------------------------------

    def _keepalive(self) -> None:
        self._next = None
        sent_at = self._reactor.seconds()
        # Bounded by the keep-alive interval: a hung request must not stop the next one.
        # A member that does not answer within a third of it is left for the next one
        # (with several endpoints), so one hung member cannot starve the lease.
        attempt = self.interval / 3
        if self.client.attempt_timeout is not None:
            attempt = min(attempt, self.client.attempt_timeout)
        d = self.lease.refresh(timeout=max(self.interval, 0.1),
                               attempt_timeout=max(attempt, 0.05))
        self._inflight = d
        d.addCallbacks(self._refreshed, self._refresh_failed, callbackArgs=(sent_at,))

    def _refreshed(self, ttl: int, sent_at: float) -> None:
        self._inflight = None
        if self.reason is not None:
            return
        self.deadline = max(self.deadline, sent_at + ttl)
        if self._state is SessionState.SUSPENDED:
            log.info("{session}: keep-alive answered again", session=self)
        old, self._state = self._state, SessionState.CONNECTED
        now = self._reactor.seconds()
        self._expiry.reset(max(0.0, self.deadline - now))
        self._next = self._reactor.callLater(max(0.0, sent_at + self.interval - now),
                                             self._keepalive)
        self._changed(old, None)

    def _refresh_failed(self, failure: Failure) -> None:
        self._inflight = None
        if self.reason is not None or failure.check(defer.CancelledError):
            return
        if failure.check(errors.LeaseNotFound):
            # etcd answered: the lease is gone (TTL <= 0, or not found).  Lost, at once.
            self.lease_gone(failure.value)
            return
        if self._state is SessionState.CONNECTED:
            log.warn("{session}: keep-alive failed ({error}); retrying until the lease's "
                     "deadline", session=self, error=failure.value)
        old, self._state = self._state, SessionState.SUSPENDED
        self._next = self._reactor.callLater(min(RETRY_PAUSE, self.interval), self._keepalive)
        self._changed(old, failure.value)

    def lease_gone(self, error: BaseException | None) -> SessionLost:
        """Tell the session that etcd refused its lease as not found (for recipes whose
        write with the lease failed so): it ends at once, as if a keep-alive had said so.

        Returns:
            The session's reason (the existing one if it had ended already).
        """
        if self.reason is None:
            self._end(SessionState.EXPIRED,
                      SessionLost(f"lease {self.lease_id:#x} has expired or was revoked "
                                  f"(etcd: {error})"))
        assert self.reason is not None
        return self.reason

    def _deadline_passed(self) -> None:
        if self.reason is not None:
            return
        self._end(SessionState.EXPIRED,
                  SessionLost(f"lease {self.lease_id:#x}: no keep-alive answered within its "
                              f"{self.ttl} s TTL; presumed expired"))
        # The server may still hold the lease (our keep-alives may have reached it even if
        # the answers did not reach us): revoke it so its keys do not outlive our word.
        d = self.lease.revoke(timeout=max(float(self.ttl), 1.0))
        d.addErrback(lambda f: log.debug("{session}: revoke after expiry: {error}",
                                         session=self, error=f.value))

    # ending -------------------------------------------------------------------------------

    def _end(self, state: SessionState, reason: SessionLost) -> None:
        old, self._state = self._state, state
        self.reason = reason
        for timer in (self._next, self._expiry):
            if timer is not None and timer.active():
                timer.cancel()
        self._next = self._expiry = None
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            inflight.cancel()
        if state is SessionState.EXPIRED:
            log.warn("{session}: lost: {reason}", session=self, reason=reason)
        self._changed(old, reason)
        observers, self._observers = self._observers, []
        for d in observers:
            d.callback(reason)

    def close(self, orphan: bool = False) -> defer.Deferred[None]:
        """End the session: stop the keep-alives and revoke the lease (deleting its keys).

        Idempotent: a later call fires once the revoke is done (and tries it again if it
        failed).  Closing an EXPIRED session does nothing more.

        Args:
            orphan: leave the lease alone; it (and its keys) expire after the TTL, or
                can be kept alive by someone else who knows :attr:`lease_id`.

        Returns:
            Deferred firing with None once the lease is revoked (a lease that is already
            gone is fine).

        Raises:
            Unavailable, Timeout: the revoke could not be done; the lease then expires
                after its TTL.
        """
        if self.reason is None:
            what = "orphaned" if orphan else "revoked"
            self._orphaned = orphan  # before _end: its listeners may call close() again
            self._end(SessionState.CLOSED,
                      SessionLost(f"session closed; lease {self.lease_id:#x} {what}"))
        if self._state is SessionState.EXPIRED or self._orphaned or self._revoked:
            return defer.succeed(None)
        if self._revoking is None:
            self._revoking = self.lease.revoke()
            self._revoking.addBoth(self._revoke_done)
        d: defer.Deferred[None] = defer.Deferred()
        self._close_waiters.append(d)
        return d

    def _revoke_done(self, outcome: Any) -> None:
        self._revoking = None
        waiters, self._close_waiters = self._close_waiters, []
        if isinstance(outcome, Failure) and not outcome.check(errors.LeaseNotFound):
            for d in waiters:
                d.errback(outcome)
            return
        self._revoked = True
        for d in waiters:
            d.callback(None)

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
