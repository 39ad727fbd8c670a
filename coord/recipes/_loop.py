"""The loop services the recipes use, in one place: a shared outcome, a timeout that lets
its work clean up, a pause, and the argument checks of a wait.

Only this module and the Deferreds the recipes return know which loop runs: an asyncio
layer would give these same services (DESIGN.md "Portability").
"""

from __future__ import annotations

from typing import Any

import txaio
from twisted.internet import defer, task
from twisted.python.failure import Failure

from coord import _checks
from coord._sentinel import DEFAULT
from coord._twisted import detached, relay
from coord.errors import InvalidArgument, Timeout
from coord.keyset import as_bytes

__all__ = [
    "CLEANUP_GRACE",
    "DEFAULT",
    "Shared",
    "bounded",
    "callback",
    "check_name",
    "check_timeout",
    "detached",
    "first",
    "positive_int",
    "seconds",
    "sleep",
    "start",
    "with_timeout",
]

log = txaio.make_logger()  # type: ignore[attr-defined]  # set by txaio.use_twisted()

# How long past its deadline a timed-out wait waits for its clean-up before it raises
# Timeout anyway (a hung etcd must not hold the caller hostage; the clean-up goes on).
CLEANUP_GRACE = 0.5

callback = _checks.callback
positive_int = _checks.positive_int
seconds = _checks.seconds


class Shared:
    """One Deferred's outcome, for any number of waiters (none consumes it).

    ``wait()`` gives a new Deferred per waiter; cancelling it stops that waiter only.
    """

    def __init__(self, d: defer.Deferred[Any]) -> None:
        self.done = False
        self.result: Any = None
        self._waiters: list[defer.Deferred[Any]] = []
        d.addBoth(self._fire)

    def _fire(self, result: Any) -> None:
        self.done, self.result = True, result
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            relay(result, w)
        # Returns None: a failure is the waiters' to handle, never "unhandled" here.

    def wait(self) -> defer.Deferred[Any]:
        w: defer.Deferred[Any] = defer.Deferred(self._waiters.remove)
        if self.done:
            relay(self.result, w)
        else:
            self._waiters.append(w)
        return w


def first(**waits: defer.Deferred[Any]) -> defer.Deferred[tuple[str, Any]]:
    """A Deferred firing with ``(name, result)`` of the first of ``waits`` to fire (a
    failure comes as its Failure, not as an error).  Cancelling it cancels none of them."""
    out: defer.Deferred[tuple[str, Any]] = defer.Deferred()

    def fired(result: Any, name: str) -> None:
        if not out.called:
            out.callback((name, result))

    for name, d in waits.items():
        d.addBoth(fired, name)
    return out


def start(work: Any) -> defer.Deferred[Any]:
    """Run the coroutine ``work``; its Deferred (cancel it to cancel the coroutine)."""
    return defer.Deferred.fromCoroutine(work)


def sleep(reactor: Any, delay: float) -> defer.Deferred[None]:
    """A Deferred firing with None after ``delay`` seconds (cancel: stop waiting)."""
    return task.deferLater(reactor, delay, lambda: None)


def with_timeout(d: defer.Deferred[Any], timeout: float | None, reactor: Any,
                 message: str) -> defer.Deferred[Any]:
    """Cancel ``d`` after ``timeout`` seconds and fail with :class:`~coord.errors.Timeout`.

    ``d`` (usually a coroutine's Deferred) gets to clean up on cancellation: the Timeout
    is raised once ``d`` has finished, or :data:`CLEANUP_GRACE` seconds after the
    deadline if its clean-up takes longer (etcd hung); that clean-up then goes on in the
    background.  Cancelling the returned Deferred cancels ``d`` and waits for it.
    """
    if timeout is None:
        return d
    out: defer.Deferred[Any] = defer.Deferred(lambda _: d.cancel())
    timers: list[Any] = []

    def give_up() -> None:
        if not out.called:
            out.errback(Timeout(message))

    def expire() -> None:
        timers.append(reactor.callLater(CLEANUP_GRACE, give_up))
        d.cancel()

    timers.append(reactor.callLater(timeout, expire))

    def done(result: Any) -> None:
        for timer in timers:
            if timer.active():
                timer.cancel()
        if out.called:
            if isinstance(result, Failure) and not result.check(defer.CancelledError):
                log.failure("after its Timeout: {message}", result, message=message)
            return
        if len(timers) > 1 and isinstance(result, Failure) and \
                result.check(defer.CancelledError):
            out.errback(Timeout(message))
        else:
            relay(result, out)

    d.addBoth(done)
    return out


async def bounded(reactor: Any, work: Any) -> None:
    """Wait for the coroutine ``work`` at most CLEANUP_GRACE seconds; it goes on anyway
    (a hung etcd must not hold a clean-up's caller)."""
    done = Shared(start(work))
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


def check_timeout(timeout: Any, zero_ok: bool = True) -> float | None:
    """A recipe's wait timeout: None (or infinity) for no limit, else seconds >= 0 -- 0
    meaning "do not wait" where the recipe can tell at once (``zero_ok``).

    Raises:
        TypeError: not a number (a str, a bool).
        InvalidArgument: negative, NaN, or 0 when not ``zero_ok``.
    """
    return _checks.seconds("timeout", timeout, zero_ok=zero_ok)


def check_name(name: Any, kind: str) -> bytes:
    """A recipe's name as bytes.

    Raises:
        TypeError: not bytes or str (or not UTF-8 encodable).
        InvalidArgument: empty.
    """
    name = as_bytes(name, "name")
    if not name:
        raise InvalidArgument(f"a {kind}'s name must not be empty")
    return name
