"""Twisted plumbing shared by the transports and the recipes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import defer
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from coord._twisted.pool import Endpoint
    from coord.errors import CoordError

__all__ = ["StreamTransport", "WatchStream", "at_most", "detached", "relay"]


class WatchStream(Protocol):
    """What ``StreamTransport.stream`` returns (both transports' streams have it)."""

    #: the endpoint serving the stream; None until it is opened (e.g. while waiting
    #: for a token).
    endpoint: Endpoint | None

    def cancel(self) -> None:
        """Close the stream now; neither callback is called after this."""

    def pause_reading(self, paused: bool) -> None:
        """Stop (True) or go on (False) reading: TCP pushes back to the server.  A
        transport that cannot pause does nothing."""


class StreamTransport(Protocol):
    """The part of a transport (:class:`coord._twisted.pool.HttpTransport`,
    :class:`coord._twisted.treq.TreqTransport`) that :mod:`coord.watch` uses: streams,
    the endpoints and their health, and the auth token.  Nothing else of a transport's
    state is read outside its module."""

    #: whether any request or stream was answered yet (see coord.watch)
    reached: bool

    @property
    def endpoints(self) -> list[Endpoint]: ...

    @property
    def has_credentials(self) -> bool: ...

    def stream(self, path: str, body: bytes, on_message: Callable[[Any], None],
               on_end: Callable[[CoordError | None], None],
               endpoint: int | None = None) -> WatchStream: ...

    def request(self, path: str, body: bytes, write: bool, timeout: float | None,
                decode: Callable[[Any], Any] | None = None,
                endpoint: int | None = None) -> defer.Deferred[Any]: ...

    def demote(self, endpoint: Endpoint) -> None:
        """Prefer other endpoints over ``endpoint`` (it seems hung)."""

    def forget_token(self) -> None:
        """Drop the auth token: the next request or stream authenticates again."""


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
