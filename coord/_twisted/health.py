"""The I/O half of :class:`coord._failover.Health`, shared by both transports: the probe
timer, the probes themselves (a status request pinned to one endpoint), and moving the
watch streams off an endpoint that was demoted."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.python.failure import Failure

from coord import errors
from coord._failover import Health, Moved

__all__ = ["Monitor"]

STATUS_PATH = "/v3/maintenance/status"

# A live member answers a status request in milliseconds; a probe waits this long at most
# (or the attempt deadline, if that is shorter).
PROBE_TIMEOUT = 1.0


class _Transport(Protocol):
    reactor: Any
    closed: bool

    def request(self, path: str, body: bytes, write: bool, timeout: float | None,
                decode: Callable[[Any], Any] | None = None,
                endpoint: int | None = None) -> Any: ...

    def move_streams(self, index: int, exc: errors.CoordError) -> None: ...


class Monitor:
    """Demotes endpoints, probes the demoted ones (and those serving streams), and tells
    the transport when the preferred endpoint changed (``on_change``) or an endpoint's
    streams must move (``transport.move_streams``).

    Args:
        transport: the transport whose ``request`` sends the probes.
        count: how many endpoints.
        check_interval: seconds between checks of an endpoint serving streams (None:
            never checked, streams rely on their idle timeout).
        probe_timeout: seconds a probe waits for its answer.
        on_change: called after ``health.preferred`` changed.
    """

    def __init__(self, transport: _Transport, count: int, check_interval: float | None,
                 probe_timeout: float, on_change: Callable[[], None]) -> None:
        self.transport = transport
        self.health = Health(count, check_interval)
        self.probe_timeout = probe_timeout
        self.on_change = on_change
        self.urls: list[str] = []
        self._timer: Any = None
        self._timer_at = 0.0
        self._probes: set[Any] = set()

    def _now(self) -> float:
        return float(self.transport.reactor.seconds())

    def demote(self, index: int, why: str) -> None:
        """``index`` failed or seems hung: prefer others; move its streams if it was up."""
        preferred = self.health.preferred
        if self.health.demote(index, self._now()):
            self._moved(index, why)
        if self.health.preferred != preferred:
            self.on_change()
        self._schedule()

    def _moved(self, index: int, why: str, checked: bool = False) -> None:
        # A failed check of the streams' own member says that member cannot serve them
        # (Unavailable); a demotion for another call's reason, or a move back, does not.
        exc = errors.Unavailable(why) if checked else Moved(why)
        self.transport.move_streams(index, exc)

    def stream_opened(self, index: int) -> None:
        self.health.watch(index, 1, self._now())
        self._schedule()

    def stream_ended(self, index: int) -> None:
        self.health.watch(index, -1, self._now())
        self._schedule()

    # the timer and the probes ---------------------------------------------------------------

    def _schedule(self) -> None:
        if self.transport.closed:
            return
        at = self.health.next_wakeup()
        timer = self._timer
        if at is None:
            if timer is not None and timer.active():
                timer.cancel()
            self._timer = None
            return
        if timer is not None and timer.active():
            if at < self._timer_at:
                timer.reset(max(0.0, at - self._now()))
                self._timer_at = at
            return
        self._timer = self.transport.reactor.callLater(max(0.0, at - self._now()), self._run)
        self._timer_at = at

    def _run(self) -> None:
        self._timer = None
        if self.transport.closed:
            return
        for index in self.health.due(self._now()):
            self._probe(index)
        self._schedule()

    def _probe(self, index: int) -> None:
        d = self.transport.request(STATUS_PATH, b"{}", False, self.probe_timeout,
                                   endpoint=index)
        self._probes.add(d)

        def answered(status: Any) -> None:
            leader = int(status.get("leader", 0)) if isinstance(status, dict) else 0
            self._done(d, index, leader != 0,
                       "" if leader else "it answers a status request but has no leader")

        def failed(failure: Failure) -> None:
            self._done(d, index, False,
                       f"it does not answer a status request: {failure.getErrorMessage()}")

        d.addCallbacks(answered, failed)

    def _done(self, d: Any, index: int, ok: bool, why: str) -> None:
        self._probes.discard(d)
        if self.transport.closed:
            return
        preferred = self.health.preferred
        was_demoted = index in self.health.demoted
        url = self.urls[index] if index < len(self.urls) else f"endpoint {index}"
        if self.health.probed(index, ok, self._now()):
            self._moved(index, f"{url} seems hung ({why}); its watch streams move",
                        checked=True)
        if was_demoted and index not in self.health.demoted:
            # Streams made while every member was demoted may sit on one that still
            # is (and is never checked): move them to the one that answers again.
            for other in list(self.health.demoted):
                self._moved(other, f"{url} answers again; watch streams leave demoted "
                                   f"members")
        if self.health.preferred != preferred:
            self.on_change()
        self._schedule()

    def close(self) -> None:
        """Stop the timer and every probe still waiting for its answer."""
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        probes, self._probes = self._probes, set()
        for d in probes:
            d.cancel()
