"""Failover decisions, sans-IO: where a call goes next, what a failure or a silent member
means, which endpoints are demoted, and when they are probed.

Both transports (:mod:`coord._twisted.pool`, :mod:`coord._twisted.treq`) act on these
decisions; nothing here does I/O or reads a clock (times are passed in), so every rule
is tested with tables (tests/test_failover.py).

The rules:

* A request that never reached an endpoint (connect refused, a send that failed before
  its first byte left) may go to the next endpoint, whatever it is (:meth:`Plan.may_resend`).
* A *read* whose connection broke after it was written is sent again elsewhere; a
  *write* is not: its outcome is unknown.
* An *attempt* has a deadline of its own (``attempt_timeout``), shorter than the call's
  timeout: a member that takes longer is presumed hung (a GC pause, a full disk, a
  stopped VM; a hung member still accepts connections, so nothing else tells).  What
  then happens is :func:`on_attempt_expired`: a request that is safe to repeat moves to
  the next endpoint; a write fails with ``WriteTimeout`` (outcome unknown, never
  re-sent); and either way the endpoint is demoted so that the next calls go elsewhere.
* An answer "no leader" is retried after a pause (:meth:`Plan.may_retry_answer`).
* A demoted endpoint is tried last and probed in the background (a status request to
  it alone) until it answers with a leader; then it is preferred again in the order the
  endpoints were given (:class:`Health`).
* An endpoint that serves a watch stream is checked the same way every
  ``check_interval`` seconds, since a stream carries no answer to time: a check that
  fails demotes the endpoint, and its streams are created again elsewhere.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from coord import errors

__all__ = ["REPEATABLE", "Expiry", "Health", "Moved", "Plan", "on_attempt_expired"]


class Moved(errors.Unavailable):
    """A stream the client ended itself, to move it off a member it demoted (for a
    reason of another call's, say): no sign that the stream's own member refused it."""

# Requests that are safe *and cheap* to send again to another member when one does not
# answer in time: they change nothing (a keep-alive only extends a lease that is alive
# anyway).  A read-only transaction counts too (see on_attempt_expired).  Other
# non-writes are not on the list: a defragment blocks its member for as long as it takes,
# and sending it to the next member would block that one as well.
REPEATABLE = frozenset({
    "/v3/kv/range",
    "/v3/kv/txn",
    "/v3/lease/keepalive",
    "/v3/lease/timetolive",
    "/v3/lease/leases",
    "/v3/maintenance/status",
    "/v3/maintenance/alarm",
    "/v3/cluster/member/list",
    "/v3/auth/authenticate",
})


class Plan:
    """Which endpoint a call tries next, and whether a failure may be retried.

    Bookkeeping for one call.  Endpoints are tried in ``order`` (by default the rotation
    of ``count`` endpoints that starts at ``start``), each at most once, except that the
    first one gets one extra try (a kept-alive connection that the server had just closed
    is indistinguishable from a dead server until we try again).  Only a call that may be
    re-sent gets there (see :meth:`may_resend`), so the extra try is safe for a write
    too: it was never sent.  A *pinned* plan tries endpoint ``start`` only (twice).
    """

    __slots__ = ("attempts", "budget", "count", "order", "pinned", "start")

    def __init__(self, start: int, count: int, write: bool = False, pinned: bool = False,
                 order: Sequence[int] | None = None) -> None:
        self.start = start
        self.pinned = pinned
        if pinned:
            self.order: tuple[int, ...] = (start,)
        elif order is None:
            self.order = tuple((start + i) % count for i in range(count))
        else:
            self.order = (start, *(i for i in order if i != start))
        self.count = len(self.order)
        self.attempts = 0
        self.budget = self.count + 1

    def next_index(self) -> int | None:
        """The endpoint index for the next attempt, or None when the budget is spent."""
        if self.attempts >= self.budget:
            return None
        index = self.order[self.attempts % self.count]
        self.attempts += 1
        return index

    def untried(self) -> bool:
        """Whether an endpoint remains that this plan has not tried yet."""
        return self.attempts < self.count

    def tried(self) -> list[int]:
        """The endpoint indexes tried so far, each once, in order."""
        return list(self.order[:min(self.attempts, self.count)])

    @staticmethod
    def may_resend(write: bool, sent: bool) -> bool:
        """Whether a call that failed in transport may go to another endpoint."""
        return not (write and sent)

    # Pauses before re-sending a request that etcd refused as unavailable (an election
    # is under way); about 3 s in all, within which a cluster elects a new leader.
    UNAVAILABLE_PAUSES = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0)

    @staticmethod
    def may_retry_answer(write: bool, exc: errors.EtcdError) -> bool:
        """Whether an error answer may be retried (after a pause, on the next endpoint).

        "no leader" is refused before anything is proposed: safe for any request.  Other
        unavailability ("leader changed", "request timed out") may come after a write was
        proposed, so only reads retry them.
        """
        if exc.message == "etcdserver: no leader":
            return True
        return not write and isinstance(exc, errors.EtcdUnavailable)

    @staticmethod
    def answer_error(write: bool, exc: errors.EtcdError) -> errors.EtcdError:
        """The error a call fails with after etcd answered ``exc`` (not retried, or the
        retries ran out).  An answered call was sent, so for a write the question is
        whether etcd may have applied it: :func:`errors.for_write` decides (an
        unavailability after the proposal, a CANCELLED or DEADLINE_EXCEEDED gRPC status:
        unknown; "no leader": known, nothing applied)."""
        return errors.for_write(exc, write)


class Expiry(enum.Enum):
    """What a call does when its attempt's deadline passes (see on_attempt_expired)."""

    MOVE = "move"  # send it to the plan's next endpoint; demote this one
    FAIL = "fail"  # a write: fail with WriteTimeout (outcome unknown); demote this one
    WAIT = "wait"  # no deadline applies: wait for the answer, until the call's own timeout


def on_attempt_expired(path: str, write: bool, plan: Plan) -> Expiry:
    """What a call does when its current attempt got no answer within the attempt
    deadline.

    With one endpoint, or pinned to one (member-specific maintenance), there is nowhere
    else to go: the call waits, bounded by its own timeout.  A write fails at once with
    an unknown outcome -- it may have been applied, so it is never re-sent -- and its
    endpoint is demoted, so the *next* calls go elsewhere.  A request on
    :data:`REPEATABLE` moves on to an endpoint the plan has not tried yet; when every
    endpoint has had its try, the last one is left to answer (a member can be slow rather
    than hung).  Any other non-write (a defragment) has no attempt deadline.
    """
    if plan.pinned or plan.count == 1:
        return Expiry.WAIT
    if write:
        return Expiry.FAIL
    if path in REPEATABLE and plan.untried():
        return Expiry.MOVE
    return Expiry.WAIT


def expiry_demotes(path: str, write: bool, plan: Plan) -> bool:
    """Whether an expired attempt demotes its endpoint: whenever the call had somewhere
    else to go and the request is one that a healthy member answers quickly (not a
    defragment)."""
    return not plan.pinned and plan.count > 1 and (write or path in REPEATABLE)


class Health:
    """Which endpoints are demoted, the order calls try them in, and when to probe.

    ``preferred`` is the first endpoint, in the order the endpoints were given, that is
    not demoted (when all are, the one demoted longest ago).  A demoted endpoint is
    probed ``probe_after`` seconds after its demotion, then with a doubling pause up to
    ``probe_max``, until a probe succeeds; it is then restored.  One demoted again within
    ``2 * probe_max`` of its restoration waits four times its last pause (up to
    ``probe_max``) for its first probe: it answers probes but not the calls it gets.
    An endpoint that is not
    demoted but serves watch streams (see :meth:`watch`) is checked every
    ``check_interval`` seconds; a failed check demotes it.

    The transport asks :meth:`due` for the probes to send when :meth:`next_wakeup`
    comes, and reports each outcome to :meth:`probed`.  With one endpoint nothing is
    ever demoted or probed: there is nowhere else to go, and calls retry it anyway.
    """

    def __init__(self, count: int, check_interval: float | None = 1.0,
                 probe_after: float = 0.25, probe_max: float = 5.0) -> None:
        self.count = count
        self.check_interval = check_interval
        self.probe_after = probe_after
        self.probe_max = probe_max
        self.preferred = 0
        self.demoted: dict[int, float] = {}  # index -> when it was demoted
        self._pause: dict[int, float] = {}  # index -> the pause before its next probe
        self._next: dict[int, float] = {}  # index -> when its next probe or check is due
        self._probing: set[int] = set()
        self._streams: dict[int, int] = {}  # index -> streams it serves
        self._restored: dict[int, float] = {}  # index -> when it was last restored

    def __repr__(self) -> str:
        return (f"<Health preferred={self.preferred} demoted={sorted(self.demoted)} "
                f"probing={sorted(self._probing)}>")

    def order(self, start: int = 0) -> list[int]:
        """Every endpoint, in the order a call that started at ``start`` tries them: the
        ones not demoted, in the order given from ``start`` on (wrapping round), then
        the demoted ones, longest demoted first."""
        up = [i for i in ((start + k) % self.count for k in range(self.count))
              if i not in self.demoted]
        return up + sorted(self.demoted, key=self.demoted.__getitem__)

    def demote(self, index: int, now: float) -> bool:
        """Take ``index`` out of first place (it failed or seems hung).

        Returns:
            True if it was not demoted before (its streams should then move elsewhere).
            A demoted endpoint that fails again goes to the back of the demoted ones
            (when all are demoted, calls then take turns among them).
        """
        if self.count == 1:
            return False
        if index in self.demoted:
            self.demoted[index] = now
            self._update()
            return False
        self.demoted[index] = now
        # One that fails again soon after it was restored (it answers a status request
        # but not the calls it gets: a stuck apply loop, say) waits longer each time.
        pause = self.probe_after
        restored = self._restored.get(index)
        if restored is not None and now - restored < 2 * self.probe_max:
            pause = min(self._pause.get(index, self.probe_after) * 4, self.probe_max)
        self._pause[index] = pause
        self._next[index] = now + pause
        self._update()
        return True

    def _update(self) -> None:
        self.preferred = self.order()[0]

    def watch(self, index: int, delta: int, now: float) -> None:
        """A stream to ``index`` was opened (``delta`` 1) or ended (-1)."""
        if self.count == 1:
            return  # nowhere to move a stream to: nothing to check
        n = self._streams.get(index, 0) + delta
        if n > 0:
            self._streams[index] = n
            if n == delta and index not in self.demoted and self.check_interval is not None:
                self._next[index] = now + self.check_interval
        else:
            self._streams.pop(index, None)
            if index not in self.demoted:
                self._next.pop(index, None)

    def next_wakeup(self) -> float | None:
        """When the next probe or check is due (None: nothing to probe)."""
        due = [t for i, t in self._next.items() if i not in self._probing]
        return min(due) if due else None

    def due(self, now: float) -> list[int]:
        """The endpoints to probe now; each counts as being probed until :meth:`probed`."""
        if self.count == 1:
            return []
        ready = [i for i, t in self._next.items() if t <= now and i not in self._probing]
        self._probing.update(ready)
        return sorted(ready)

    def probed(self, index: int, ok: bool, now: float) -> bool:
        """The probe of ``index`` answered (``ok``: with a leader) or did not.

        Returns:
            True if this demoted ``index`` (a check of an endpoint that serves streams
            failed): its streams should move elsewhere.
        """
        self._probing.discard(index)
        if index in self.demoted:
            if ok:
                del self.demoted[index]
                self._restored[index] = now  # its pause is kept (see demote)
                self._next.pop(index, None)
                if self._streams.get(index) and self.check_interval is not None:
                    self._next[index] = now + self.check_interval
                self._update()
            else:
                pause = self._pause[index] = min(self._pause[index] * 2, self.probe_max)
                self._next[index] = now + pause
            return False
        if ok:
            if self._streams.get(index) and self.check_interval is not None:
                self._next[index] = now + self.check_interval
            else:
                self._next.pop(index, None)
            return False
        return self.demote(index, now)
