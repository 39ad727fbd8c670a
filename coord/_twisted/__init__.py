"""Twisted plumbing shared by the transports and the recipes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

__all__ = ["at_most", "detached", "relay"]


def detached(d: defer.Deferred[Any],
             on_cancel: Callable[[], None] | None = None) -> defer.Deferred[Any]:
    """A Deferred that fires with ``d``'s result; cancelling it leaves ``d`` running
    (and calls ``on_cancel``, if given, first).

    For work that must finish even if its caller stops waiting: ``d`` should handle (log)
    its own failures, since once the caller has cancelled nobody sees them.
    """
    out: defer.Deferred[Any] = defer.Deferred(
        None if on_cancel is None else lambda _: on_cancel())

    def fire(result: Any) -> None:
        if not out.called:
            relay(result, out)

    d.addBoth(fire)
    return out


def relay(result: Any, out: defer.Deferred[Any]) -> None:
    """Fire ``out`` with ``result``: its errback for a Failure, else its callback."""
    if isinstance(result, Failure):
        out.errback(result)
    else:
        out.callback(result)


def at_most(reactor: Any, timer: Any, limit: float, func: Callable[[], Any]) -> Any:
    """A timer that fires within `limit` seconds: `timer` itself if it already does,
    moved earlier if it would fire later, or (`timer` None) a new one calling `func`."""
    if timer is None:
        return reactor.callLater(limit, func)
    if timer.getTime() - reactor.seconds() > limit:
        timer.reset(limit)
    return timer
