"""A transport through a user-supplied Twisted ``IAgent``, via treq.

For what coord's own pool does not do: HTTP proxies, custom TLS policies, anything an
Agent can be wrapped with.  Slower than :class:`~coord._twisted.pool.HttpTransport`
(Agent costs about 1 ms of CPU per request), with the same retry rules (see
:mod:`coord._twisted.pool`): a request that never reached an endpoint moves on to the
next; a read whose connection broke is re-sent; a write that was sent is never re-sent.

One difference: coord's pool checks that a kept-alive connection is still open before it
writes on it, so a server restart between two writes costs nothing.  An Agent's pool
cannot be asked, so through this transport the first write after the server closed its
idle connections can fail with :class:`~coord.errors.OutcomeUnknown`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import treq
from twisted.internet import defer, error, protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from coord import errors
from coord._failover import Expiry, Plan, expiry_demotes, on_attempt_expired
from coord._twisted import at_most, detached, relay
from coord._twisted._explain import request_failed
from coord._twisted.health import PROBE_TIMEOUT, Monitor
from coord._twisted.pool import (
    AUTH_PATH,
    CLOSE_DRAIN_LIMIT,
    DRAIN_LIMIT,
    Endpoint,
    drains,
)
from coord._wire import codec
from coord._wire.stream import LineSplitter

__all__ = ["TreqTransport"]

_NOT_SENT = (error.ConnectError, error.DNSLookupError)


class TreqTransport:
    """Requests through ``agent`` (see the module docstring); the arguments are
    :class:`~coord._twisted.pool.HttpTransport`'s."""

    def __init__(self, reactor: Any, endpoints: list[Endpoint], agent: Any,
                 credentials: tuple[str, str] | None = None,
                 attempt_timeout: float | None = 2.0,
                 check_interval: float | None = 1.0) -> None:
        self.reactor = reactor
        self.endpoints = endpoints
        self._http = treq.client.HTTPClient(agent)
        self._preferred = 0
        self.attempt_timeout = attempt_timeout if len(endpoints) > 1 else None
        self.monitor = Monitor(self, len(endpoints), check_interval,
                               min(PROBE_TIMEOUT, attempt_timeout or PROBE_TIMEOUT),
                               self._preference_changed)
        self.monitor.urls = [ep.url for ep in endpoints]
        self.reached = False
        self._credentials = credentials
        self._token: str | None = None
        self._auth_lock = defer.DeferredLock()
        self._pending: set[defer.Deferred[Any]] = set()
        # Requests whose caller gave up, left to finish (see drains): the timer ending each.
        self._draining: dict[defer.Deferred[Any], Any] = {}
        self._streams: set[_TreqStream] = set()
        self.closed = False

    @property
    def preferred(self) -> Endpoint:
        """The endpoint the next call goes to first."""
        return self.endpoints[self._preferred]

    @property
    def has_credentials(self) -> bool:
        """Whether the transport authenticates (a refused token is worth one retry)."""
        return self._credentials is not None

    def _headers(self) -> Headers:
        headers = Headers({b"Content-Type": [b"application/json"]})
        if self._token:
            headers.setRawHeaders(b"Authorization", [self._token.encode("latin-1")])
        return headers

    def request(self, path: str, body: bytes, write: bool, timeout: float | None,
                decode: Callable[[Any], Any] | None = None,
                endpoint: int | None = None,
                attempt_timeout: float | None = None) -> defer.Deferred[Any]:
        """As :meth:`HttpTransport.request`; ``endpoint`` pins the call to that endpoint."""
        if self.closed:
            return defer.fail(errors.Unavailable("the client is closed"))
        state: dict[str, Any] = {"sent": False}
        d = defer.Deferred.fromCoroutine(self._request(path, body, write, state, endpoint,
                                                       attempt_timeout))
        if drains(path, write):
            d = self._detached(d, state)
        self._pending.add(d)
        d.addBoth(self._forget, d)
        if timeout is not None:
            def timed_out(result: Any, t: float) -> Any:
                what = f"{path} did not complete within {t} s"
                if write and state["sent"]:
                    raise errors.WriteTimeout(what + "; the write may or may not have been applied")
                raise errors.Timeout(what)
            d.addTimeout(timeout, self.reactor, onTimeoutCancel=timed_out)
        # Without a decode, the answer must still be etcd's (as the pool's codec.answer).
        d.addCallback(codec.unary if decode is None else decode)
        return d

    def _detached(self, inner: defer.Deferred[Any], state: dict) -> defer.Deferred[Any]:
        """A Deferred with `inner`'s result, whose cancel (or timeout) leaves the request
        on the wire to finish for `DRAIN_LIMIT` seconds at most, and never sent again (a
        read-only transaction: see drains)."""
        def give_up() -> None:
            state["dropped"] = True  # _request sends it nowhere else
            self._drain(inner, DRAIN_LIMIT)

        return detached(inner, give_up)

    def _drain(self, inner: defer.Deferred[Any], limit: float) -> None:
        timer = self._draining.get(inner)
        self._draining[inner] = at_most(self.reactor, timer, limit, inner.cancel)
        if timer is None:
            inner.addBoth(self._drained, inner)

    def _drained(self, result: Any, inner: defer.Deferred[Any]) -> None:
        timer = self._draining.pop(inner, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _forget(self, result: Any, d: defer.Deferred[Any]) -> Any:
        self._pending.discard(d)
        return result

    def _plan(self, write: bool, pinned: int | None) -> Plan:
        if pinned is not None:
            return Plan(pinned, len(self.endpoints), write, pinned=True)
        return Plan(self._preferred, len(self.endpoints), write,
                    order=self.monitor.health.order(self._preferred))

    def _attempt(self, url: str, body: bytes) -> defer.Deferred[tuple[int, bytes]]:
        """One POST: fires with the answer's status and body; cancelling it closes its
        connection."""
        d = self._http.post(url, data=body, headers=self._headers())
        return d.addCallback(
            lambda response: _read_body(response).addCallback(
                lambda content: (response.code, content)))

    async def _answer(self, attempt: defer.Deferred[tuple[int, bytes]], path: str,
                      write: bool, plan: Plan, index: int, limit: float | None,
                      state: dict) -> tuple[int, bytes] | None:
        """The attempt's answer; None if it moved on (see coord._failover).

        Raises:
            WriteTimeout: a write got no answer within ``limit`` seconds.
        """
        if limit is None:
            return await attempt
        outcome = await _within(attempt, limit, self.reactor)
        if outcome is not _EXPIRED:
            return outcome
        url = self.endpoints[index].url
        what = f"{url} did not answer {path} within {limit} s (attempt_timeout)"
        decision = on_attempt_expired(path, write, plan)
        if expiry_demotes(path, write, plan):
            self._endpoint_down(index, what)
        if decision is Expiry.WAIT or state.get("dropped"):
            return await attempt
        if decision is Expiry.FAIL:
            attempt.cancel()
            attempt.addErrback(lambda _: None)
            raise errors.WriteTimeout(
                f"{what}; the write may or may not have been applied; it is not re-sent")
        # MOVE: let go of this attempt (a read-only transaction's finishes where it is:
        # see drains) and try the next endpoint.
        if drains(path, write):
            self._drain(attempt, DRAIN_LIMIT)
        else:
            attempt.cancel()
            attempt.addErrback(lambda _: None)
        return None

    async def _request(self, path: str, body: bytes, write: bool, state: dict,
                       pinned: int | None = None,
                       attempt_timeout: float | None = None) -> Any:
        if self._credentials is not None and self._token is None and path != AUTH_PATH:
            await self._authenticate()
        auth_retried = False
        unavailable_retries = 0
        plan = self._plan(write, pinned)
        last: errors.CoordError = errors.Unavailable("no endpoint")
        while True:
            if state.get("dropped"):
                # Its caller gave up; it was only left to finish where it was sent.
                raise defer.CancelledError()
            index = plan.next_index()
            if index is None:
                raise last
            endpoint = self.endpoints[index]
            state["sent"] = True
            limit = None
            if self.attempt_timeout is not None:
                limit = attempt_timeout or self.attempt_timeout
            try:
                answer = await self._answer(self._attempt(endpoint.url + path, body), path,
                                            write, plan, index, limit, state)
            except errors.WriteTimeout:
                raise
            except Exception as e:
                if _cancelled(e):
                    # Agent reports a cancelled request as ResponseNeverReceived: stop here,
                    # never try another endpoint on behalf of a cancelled (or timed-out) call.
                    raise defer.CancelledError() from e
                if state.get("dropped"):
                    # Given up and left to finish (see drains): what became of it says
                    # nothing to act on -- as the pool's drained connection.
                    raise defer.CancelledError() from e
                sent = not _never_sent(e)
                state["sent"] = sent
                last = errors.Unavailable(f"{endpoint.url}{path}: {request_failed(e, endpoint)}")
                self._endpoint_down(index, str(last))
                if not Plan.may_resend(write, sent):
                    raise errors.OutcomeUnknown(
                        f"{last}; the write was sent, so it may or may not have been applied; "
                        "it is not re-sent")
                continue
            if answer is None:  # no answer in time: moved on
                state["sent"] = False
                last = errors.Unavailable(f"{endpoint.url} did not answer {path} within "
                                          f"{limit} s (attempt_timeout)")
                continue
            code, content = answer
            if code == 200 and not content.startswith(codec.STREAM_ERROR):
                self.reached = True
                return codec.decode(content)
            try:
                obj = codec.decode(content)
            except errors.CoordError:
                obj = content
            exc = errors.from_gateway(obj, code)
            if Plan.may_retry_answer(write, exc) and \
                    unavailable_retries < len(Plan.UNAVAILABLE_PAUSES):
                last = exc
                self._endpoint_down(index, str(exc))
                await deferLater(self.reactor, Plan.UNAVAILABLE_PAUSES[unavailable_retries],
                                 lambda: None)
                unavailable_retries += 1
                plan = self._plan(write, pinned)
                continue
            if (isinstance(exc, errors.Unauthenticated) and self._credentials is not None
                    and not auth_retried and path != AUTH_PATH):
                auth_retried = True
                self._token = None
                await self._authenticate()
                plan = self._plan(write, pinned)
                continue
            raise errors.for_write(exc, write)

    def demote(self, endpoint: Endpoint) -> None:
        """Prefer other endpoints over ``endpoint`` (it seems hung) until it answers a
        probe again."""
        if endpoint in self.endpoints:
            self._endpoint_down(self.endpoints.index(endpoint), f"{endpoint.url} seems hung")

    def _endpoint_down(self, index: int, why: str = "") -> None:
        self.monitor.demote(index, why or f"{self.endpoints[index].url} failed")

    def _preference_changed(self) -> None:
        self._preferred = self.monitor.health.preferred

    def move_streams(self, index: int, exc: errors.CoordError) -> None:
        """End every stream on endpoint ``index`` with ``exc`` (see HttpTransport)."""
        for stream in list(self._streams):
            if stream.index == index:
                stream.cancel()
                stream.on_end(exc)

    async def _authenticate(self) -> None:
        await self._auth_lock.acquire()
        try:
            if self._token is None:
                user, password = self._credentials  # type: ignore[misc]
                obj = await self.request(AUTH_PATH, codec.encode(
                    {"name": user, "password": password}), False, 10.0)
                self._token = obj.get("token")
        finally:
            self._auth_lock.release()

    def stream(self, path: str, body: bytes, on_message: Callable[[Any], None],
               on_end: Callable[[errors.CoordError | None], None],
               endpoint: int | None = None) -> _TreqStream:
        stream = _TreqStream(self, on_message, on_end)
        index = self._preferred if endpoint is None else endpoint

        def go(_: Any = None) -> None:
            if not stream.finished:
                stream.open(self.endpoints[index].url + path, body, index)

        if self._credentials is not None and self._token is None:
            d = defer.Deferred.fromCoroutine(self._authenticate())
            d.addCallbacks(go, lambda f: stream._end(
                f.value if isinstance(f.value, errors.CoordError)
                else errors.Unavailable(str(f.value))))
        else:
            go()
        return stream

    def forget_token(self) -> None:
        """The server refused our token: the next request authenticates again."""
        self._token = None

    def close(self) -> defer.Deferred[None]:
        """Cancel every call and stream; a read-only transaction's request is given
        `CLOSE_DRAIN_LIMIT` seconds to finish first (see drains).  Then close the Agent
        pool's idle connections; the Deferred fires when that is done."""
        self.closed = True
        self.monitor.close()
        for stream in list(self._streams):
            stream.cancel()
        for d in list(self._pending):
            d.cancel()
        waits = []
        for inner in list(self._draining):
            self._drain(inner, CLOSE_DRAIN_LIMIT)
            finished: defer.Deferred[None] = defer.Deferred()
            inner.addBoth(_fire, finished)
            waits.append(finished)
        pool = getattr(self._http._agent, "_pool", None)

        def close_cached(_: Any = None) -> Any:
            return pool.closeCachedConnections() if pool is not None else None

        if waits:
            return defer.gatherResults(waits).addCallback(close_cached)
        return defer.maybeDeferred(close_cached).addCallback(lambda _: None)


class _Body(protocol.Protocol):
    """Collects a response's body into `done` (or hands each piece to `on_data`, and
    `done` fires with b""); cancelling `done` closes the connection.  (treq's
    ``content()`` and ``collect()`` cannot be cancelled: a body that stalls, or a watch
    stream, would keep its connection open for good.)"""

    def __init__(self, on_data: Callable[[bytes], None] | None = None) -> None:
        self.chunks: list[bytes] = []
        self.on_data = on_data
        self.done: defer.Deferred[bytes] = defer.Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        if self.on_data is None:
            self.chunks.append(data)
            return
        try:
            self.on_data(data)
        except Exception:
            if not self.done.called:
                self.done.errback(Failure())
            self.transport.stopProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):  # PotentialDataLoss: no length
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)

    def _cancel(self, d: defer.Deferred[bytes]) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # IResponse.deliverBody: closes the connection


def _read_body(response: Any,
               on_data: Callable[[bytes], None] | None = None) -> defer.Deferred[bytes]:
    body = _Body(on_data)
    response.deliverBody(body)
    return body.done


def _fire(_: object, d: defer.Deferred[None]) -> None:
    d.callback(None)


_EXPIRED = object()


def _within(d: defer.Deferred[Any], seconds: float, reactor: Any) -> defer.Deferred[Any]:
    """A Deferred with ``d``'s result, or ``_EXPIRED`` after ``seconds`` -- leaving ``d``
    running then.  Cancelling it cancels ``d``."""
    out: defer.Deferred[Any] = defer.Deferred(lambda _: d.cancel())
    def expire() -> None:
        if not out.called:
            out.callback(_EXPIRED)

    timer = reactor.callLater(seconds, expire)

    def fire(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        if not out.called:
            relay(result, out)
            return None
        return result  # d outlived the deadline: its result is for whoever waits on it now

    d.addBoth(fire)
    return out


def _never_sent(e: BaseException) -> bool:
    """Whether the request surely never reached etcd: no connection, or no TLS session
    (bytes written before a failed handshake never left the TLS layer)."""
    if isinstance(e, _NOT_SENT):
        return True
    try:
        from OpenSSL import SSL
    except ImportError:  # pragma: no cover - no TLS support installed
        return False
    return any(r.check(SSL.Error) for r in getattr(e, "reasons", ()) or ())


def _cancelled(e: BaseException) -> bool:
    if isinstance(e, defer.CancelledError):
        return True
    return any(r.check(defer.CancelledError) for r in getattr(e, "reasons", ()) or ())


class _TreqStream:
    def __init__(self, transport: TreqTransport, on_message: Callable[[Any], None],
                 on_end: Callable[[errors.CoordError | None], None]) -> None:
        self.transport = transport
        self.on_message = on_message
        self.on_end = on_end
        self.splitter = LineSplitter()
        self.finished = False
        self.endpoint: Endpoint | None = None
        self.index = -1
        self._d: defer.Deferred[Any] | None = None

    def open(self, url: str, body: bytes, index: int) -> None:
        self.endpoint = self.transport.endpoints[index]
        self.index = index
        self.transport._streams.add(self)
        self.transport.monitor.stream_opened(index)
        d = self.transport._http.post(url, data=body, headers=self.transport._headers(),
                                      unbuffered=True)
        self._d = d

        def got_response(response: Any) -> Any:
            if response.code != 200:
                return _read_body(response).addCallback(self._error, response.code)
            self.transport.reached = True
            collected = _read_body(response, self._data)
            self._d = collected
            return collected.addCallback(lambda _: self._end(None))

        def failed(f: Failure) -> None:
            if f.check(defer.CancelledError) or self.finished:
                return
            exc = errors.Unavailable(f"stream {url}: {f.getErrorMessage()}")
            self._end(exc)
            if not f.check(ResponseNeverReceived):
                self.transport._endpoint_down(index, str(exc))

        d.addCallback(got_response).addErrback(failed)

    def _error(self, content: bytes, status: int) -> None:
        try:
            obj = codec.decode(content)
        except errors.CoordError:
            obj = content
        self._end(errors.from_gateway(obj, status))

    def _data(self, data: bytes) -> None:
        for line in self.splitter.feed(data):
            if self.finished:
                return
            obj = codec.decode(line)
            if isinstance(obj, dict) and obj.get("error") is not None:
                self.cancel()
                self.on_end(errors.from_gateway(obj["error"]))
                return
            self.on_message(obj.get("result", obj))

    def _forget(self) -> None:
        self.finished = True
        if self in self.transport._streams:
            self.transport._streams.discard(self)
            self.transport.monitor.stream_ended(self.index)

    def _end(self, exc: errors.CoordError | None) -> None:
        if not self.finished:
            self._forget()
            self.on_end(exc)

    def pause_reading(self, paused: bool) -> None:
        """Does nothing: treq delivers a body through the Agent's protocol, which offers
        no way to stop reading (a watch through treq is not paused)."""

    def cancel(self) -> None:
        if not self.finished:
            self._forget()
            if self._d is not None:
                self._d.cancel()
