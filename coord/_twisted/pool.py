"""The default transport: keep-alive HTTP/1.1 connections to etcd's JSON gateway.

One :class:`HttpTransport` serves a client.  Per endpoint it keeps a pool of persistent
connections, each carrying one request at a time (the gateway answers in order, but a
slow request would hold up everything pipelined behind it).  Requests beyond the pool's
size wait in a queue.

Failover and retry follow the rules of :mod:`coord._failover` (sans-IO, shared with the
treq transport): a request never written moves on; a read whose connection broke after
it was written is re-sent elsewhere, a write never is (``OutcomeUnknown``); an attempt
that gets no answer within ``attempt_timeout`` moves a read on and fails a write with
``WriteTimeout``, and demotes its endpoint; "no leader" is retried after a pause;
"invalid auth token" makes the transport authenticate again and re-send once; a *pinned*
request (``request(..., endpoint=i)``: member-specific maintenance such as status or
defragment) goes to that endpoint only.  Demoted endpoints are probed in the background
by a :class:`~coord._twisted.health.Monitor`, which also checks the endpoints that
serve streams and moves their streams when one stops answering.

The attempt deadlines cost no timer per request: each connection notes when it sent its
request, and one watchdog timer, set for the oldest request's deadline, runs while
requests are in flight.

After :meth:`HttpTransport.close` (once its Deferred fired) nothing is left: no connection
(not even one still being made), no timer; later calls fail at once with
``Unavailable("client closed")``.

A read-only transaction dropped before its answer came (cancelled, timed out, or failed by
close) keeps its connection until the answer comes, for at most `DRAIN_LIMIT` seconds:
closing it would cancel the transaction inside etcd, which crashes etcd 3.5.0-3.5.4 (see
:func:`drains`).

This is the only module (with :mod:`coord._twisted.treq`) that touches sockets.
"""

from __future__ import annotations

import collections
import math
import select
import socket
from collections.abc import Callable
from time import monotonic
from typing import Any
from urllib.parse import urlsplit

import attrs
import txaio
from twisted.internet import defer, protocol, tcp
from twisted.internet.interfaces import IHandshakeListener
from twisted.python.failure import Failure
from zope.interface import implementer

from coord import errors
from coord._failover import Expiry, Plan, expiry_demotes, on_attempt_expired
from coord._twisted import at_most
from coord._twisted._explain import connection_lost
from coord._twisted.health import PROBE_TIMEOUT, Monitor
from coord._wire import codec
from coord._wire.http11 import ProtocolError, ResponseParser, build_request, request_head
from coord._wire.stream import LineSplitter

__all__ = ["Endpoint", "HttpTransport", "parse_endpoint"]

log = txaio.make_logger()  # type: ignore[attr-defined]  # set by txaio.use_twisted()

_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT

# A connection idle for more than this is peeked at (one non-blocking recv) before it
# is used: did the server close it?  0: every reuse.  The peek costs a system call, a
# few microseconds against the 100+ of a request; skipping it for connections idle
# under 0.1 s let a write go out on a connection the server had closed just after its
# last answer (etcd restarted within 0.1 s, a proxy's tiny idle timeout), where it
# fails after being sent, with an unknown outcome.
STALE_CHECK_AFTER = 0.0

TXN_PATH = "/v3/kv/txn"

# How long a dropped read-only transaction's answer is awaited (see drains()) before its
# connection is closed after all: on cancel or timeout, and on close().
DRAIN_LIMIT = 10.0
CLOSE_DRAIN_LIMIT = 1.0


def drains(path: str, write: bool) -> bool:
    """Whether a call dropped before its answer came (cancelled, timed out, or failed by
    close()) keeps its connection open until the answer comes, instead of closing it.

    True for a read-only transaction.  Closing the connection cancels the request inside
    etcd, and etcd 3.5.0 to 3.5.4 panic, and exit, when a read-only transaction is
    cancelled while it runs ("panic: unexpected error during txn", etcd issue 14110;
    fixed in 3.5.5).  A Go client cancelling its context crashes those servers the same
    way; a recipe that gives up waiting (a lock's timeout, a cancelled campaign) must
    not.  Any other request is safe to cancel, and its connection is closed as before.
    """
    return path == TXN_PATH and not write


@attrs.frozen
class Endpoint:
    """One etcd client URL, e.g. ``http://127.0.0.1:2379``."""

    url: str
    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_endpoint(url: object) -> Endpoint:
    """Parse ``http://host:port`` or ``https://host:port`` (path, query not allowed)."""
    if isinstance(url, bytes):
        try:
            url = url.decode("ascii")
        except UnicodeDecodeError:
            raise errors.InvalidArgument(f"endpoint {url!r} is not an ASCII URL") from None
    if not isinstance(url, str):
        raise TypeError(f"url must be an endpoint URL string, not {type(url).__name__}")
    try:
        parts = urlsplit(url)
    except ValueError as e:  # "http://[::1": urllib's bare "Invalid IPv6 URL"
        raise errors.InvalidArgument(f"endpoint {url!r} is not a valid URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.InvalidArgument(f"endpoint must look like http://host:port, not {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise errors.InvalidArgument(f"endpoint {url!r} must not have a path or query")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 2379)
    except ValueError:
        raise errors.InvalidArgument(f"endpoint {url!r} has an invalid port")
    return Endpoint(url.rstrip("/"), parts.scheme, parts.hostname, port)


class _Call:
    """One request in flight: its bytes, its Deferred, its deadline and its retry plan."""

    __slots__ = ("attempt_timeout", "auth_retried", "body", "conn", "decode", "deferred",
                 "done", "endpoint", "path", "pinned", "plan", "sent", "unavailable_retries",
                 "write")

    def __init__(self, path: str, body: bytes, write: bool,
                 decode: Callable[[Any], Any] | None = None) -> None:
        self.path = path
        self.body = body
        self.write = write
        self.decode = decode
        self.deferred: defer.Deferred[Any] = defer.Deferred(self._cancel)
        self.plan: Plan | None = None
        self.endpoint: _EndpointPool | None = None
        self.conn: _Connection | None = None
        self.sent = False
        self.done = False
        self.auth_retried = False
        self.unavailable_retries = 0
        self.pinned: int | None = None
        self.attempt_timeout: float | None = None  # None: the transport's

    def _cancel(self, d: defer.Deferred[Any]) -> None:
        # Deferred.cancel() errbacks with CancelledError after this returns.
        self.done = True
        self._cleanup()

    def _cleanup(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None and conn.call is self:
            # The answer is still owed on this connection: it cannot carry another request
            # before that answer is read (and thrown away), or the connection closed.
            conn.call = None
            if drains(self.path, self.write):
                conn.drain(DRAIN_LIMIT)
            else:
                conn.abort()
        elif not self.sent and self.endpoint is not None:
            self.endpoint.forget(self)  # still queued for a connection

    def fail(self, exc: BaseException) -> None:
        if not self.done:
            self.done = True
            self._cleanup()
            self.deferred.errback(Failure(exc))


@implementer(IHandshakeListener)
class _Connection(protocol.Protocol, ResponseParser):
    """One HTTP/1.1 connection: carries one call at a time, or one stream for good.

    It is its own response parser (the hooks below), so httptools calls straight into it.
    """

    def __init__(self, pool: _EndpointPool, stream: _Stream | None = None) -> None:
        self.stream = stream
        self._chunks: list[bytes] = []
        if stream is None:
            # An answer's body pieces go straight into the list: httptools calls this
            # bound C method, no Python frame per piece.
            self.on_body = self._chunks.append  # type: ignore[method-assign,assignment]
        # A call's connection needs whole answers only (the status comes with on_complete).
        ResponseParser.__init__(self, heads=stream is not None)
        self.pool = pool
        # Over TLS, bytes written before the handshake completes wait in the TLS layer:
        # if the handshake fails, nothing reached etcd, whatever was "written".
        self.handshaking = pool.endpoint.tls
        self.idle_since = 0.0
        self.deadline = 0.0  # the attempt deadline of `call`'s request (monotonic())
        self.call: _Call | None = None
        self.connected = False
        self.closed = False
        self._socket: Any = None
        self.fd: int | None = None
        # While an answer nobody waits for is owed (see drain()): the timer that closes
        # the connection if it does not come, and Deferreds fired when the connection is
        # gone (for close()).
        self.draining: Any = None
        self._gone: list[defer.Deferred[None]] = []

    # wiring ---------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            set_nodelay(True)
        # A plain TCP transport: write straight to the socket (see write()).
        self._socket = self.transport.socket if type(self.transport) is tcp.Client else None
        if self.stream is not None:
            self.stream.connected(self)
        else:
            if self._socket is not None:
                self.pool.transport.reader.add(self)
            self.pool.connection_ready(self)

    def read_ready(self) -> None:
        """Our reader saw this socket readable: read it here (see :class:`_Reader`)."""
        try:
            data = self._socket.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            try:
                self.feed(data)
            except ProtocolError as e:
                self._bad_http(e)
        else:
            # End of stream or an error: Twisted's own read path tells which, and closes.
            self.pool.transport.reader.remove(self)
            if not self.closed:
                self.transport.startReading()  # type: ignore[union-attr]

    def send(self, call: _Call, data: bytes) -> None:
        self.call = call
        call.conn = self
        call.sent = True
        transport = self.pool.transport
        if transport.attempt_timeout is not None:
            self.deadline = at = monotonic() + (call.attempt_timeout or transport.attempt_timeout)
            if transport.watchdog is None or at < transport.watchdog_at:
                transport.arm_watchdog(at)
        try:
            self.write(data)
        except OSError as e:
            # Not one byte left this host: the request was not sent, whatever it is, and
            # may go to the next endpoint.
            self.call = None
            call.conn = None
            call.sent = False
            self.abort()
            self.pool.transport.call_broken(call, errors.Unavailable(
                f"cannot send to {self.pool.endpoint.url}: {e}"))

    def write(self, data: bytes) -> None:
        """Send ``data`` now if the socket takes it, else through Twisted's buffer.

        Twisted's ``transport.write`` only buffers: the bytes leave on the next reactor
        turn, after two epoll_ctl calls to watch for writability and stop again.  A
        request is small and the connection idle, so a direct send almost always takes
        it whole -- that saves a third of the per-request CPU (measured with cProfile).

        Raises:
            OSError: the direct send failed and sent nothing (the connection is broken).
                Once some bytes went out, the rest goes through Twisted, which reports
                a failure as a lost connection.
        """
        sock = self._socket
        t: Any = self.transport
        if sock is not None and not t._tempDataLen and t.offset == len(t.dataBuffer):
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0  # the socket's buffer is full: Twisted sends it when it drains
            if sent == len(data):
                return
            data = data[sent:]
        t.write(data)

    def stale(self) -> bool:
        """Whether the server has closed this idle connection (we just did not hear yet).

        When etcd restarts, or a proxy drops idle connections, the FIN may still sit
        unread when the next request picks the connection: a write sent there would
        fail after it was sent, with an unknown outcome.  One non-blocking peek tells.
        """
        sock = self._socket
        if sock is None:
            return False
        try:
            sock.recv(1, _PEEK)
        except BlockingIOError:
            return False  # nothing to read: alive
        except OSError:
            return True
        return True  # EOF (b"") or bytes nobody asked for: either way, unusable

    def abort(self) -> None:
        self._stop_draining()
        if not self.closed:
            self.closed = True
            self.pool.transport.reader.remove(self)
            self.pool.connection_gone(self)
            if self.transport is not None:
                self.transport.abortConnection()

    def drain(self, limit: float) -> None:
        """Read the owed answer of a dropped call, then serve the pool again; close the
        connection if the answer does not come within `limit` seconds (see `drains`)."""
        if not self.closed:
            self.draining = at_most(self.pool.transport.reactor, self.draining, limit,
                                    self.abort)

    def _stop_draining(self) -> None:
        timer, self.draining = self.draining, None
        if timer is not None and timer.active():
            timer.cancel()

    def gone(self) -> defer.Deferred[None]:
        """A Deferred that fires once this connection is closed."""
        d: defer.Deferred[None] = defer.Deferred()
        if self.connected:
            self._gone.append(d)
        else:
            d.callback(None)
        return d

    def dataReceived(self, data: bytes) -> None:
        try:
            self.feed(data)
        except ProtocolError as e:
            self._bad_http(e)

    def _bad_http(self, e: ProtocolError) -> None:
        self._broken(errors.Unavailable(f"bad HTTP from {self.pool.endpoint.url}: {e}"))
        self.abort()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.connected = False
        self._stop_draining()
        gone, self._gone = self._gone, []
        for d in gone:
            d.callback(None)
        self.pool.transport.reader.remove(self)
        if not self.closed:
            self.closed = True
            self.pool.connection_gone(self)
        self._broken(errors.Unavailable(
            f"connection to {self.pool.endpoint.url} lost: {connection_lost(self, reason)}"))

    def handshakeCompleted(self) -> None:
        self.handshaking = False

    def _broken(self, exc: errors.CoordError) -> None:
        call, self.call = self.call, None
        if call is not None:
            call.conn = None
            if self.handshaking:
                call.sent = False  # the TLS handshake failed: the request never left
            self.pool.transport.call_broken(call, exc)
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.ended(exc)

    # ResponseParser hooks ----------------------------------------------------------------------

    def on_head(self, status: int) -> None:
        if self.stream is not None:
            self.stream.head(status)

    def on_body(self, body: bytes) -> None:
        # A stream's connection only: a call's connection appends to _chunks directly.
        if self.stream is not None:
            self.stream.data(body)

    def on_complete(self) -> None:
        stream = self.stream
        if stream is not None:
            self.stream = None
            self.abort()
            stream.ended(None)
            return
        call = self.call
        self.call = None
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if not self.keep_alive:
            self.abort()
        if call is None:
            if self.draining is not None:  # the answer of a dropped call: serve again
                self._stop_draining()
                if self.pool.transport.closed:
                    self.abort()
                elif not self.closed:
                    self.pool.connection_ready(self)
            return
        call.conn = None
        if not self.closed:
            self.pool.connection_ready(self)
        self.pool.transport.call_answered(call, self.status, body)


class _Factory(protocol.ClientFactory):
    """Makes one connection for a pool; the pool keeps it while it connects (to stop it
    on close)."""

    noisy = False  # no "Starting factory" line per connection in the log

    def __init__(self, pool: _EndpointPool) -> None:
        self.pool = pool
        self.connector: Any = None

    def buildProtocol(self, addr: Any) -> _Connection:
        self.pool.connectors.discard(self)
        return _Connection(self.pool)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.pool.connectors.discard(self)
        self.pool.connect_failed(reason)


def _stop_connecting(connector: Any) -> None:
    if connector is not None and connector.state == "connecting":
        connector.stopConnecting()


class _EndpointPool:
    """Connections to one endpoint: idle ones, a count of all, and calls waiting for one."""

    def __init__(self, transport: HttpTransport, endpoint: Endpoint, index: int) -> None:
        self.transport = transport
        self.endpoint = endpoint
        self.index = index
        self.idle: list[_Connection] = []
        self.all: set[_Connection] = set()
        self.connecting = 0
        self.connectors: set[_Factory] = set()
        self.waiting: collections.deque[_Call] = collections.deque()
        self.heads: dict[str, bytes] = {}

    def head(self, path: str) -> bytes:
        head = self.heads.get(path)
        if head is None:
            head = self.heads[path] = request_head(self.endpoint.netloc, path,
                                                   self.transport.extra_headers())
        return head

    def submit(self, call: _Call) -> None:
        call.endpoint = self
        while self.idle:
            conn = self.idle.pop()
            if monotonic() - conn.idle_since >= STALE_CHECK_AFTER and conn.stale():
                conn.abort()
                continue
            conn.send(call, build_request(self.head(call.path), call.body))
            return
        self.waiting.append(call)
        if len(self.all) + self.connecting < self.transport.max_connections:
            self.connect()

    def connect(self) -> None:
        self.connecting += 1
        factory = _Factory(self)
        self.connectors.add(factory)
        factory.connector = self.transport.connect(self.endpoint, factory)

    def forget(self, call: _Call) -> None:
        try:
            self.waiting.remove(call)
        except ValueError:
            pass

    def connection_ready(self, conn: _Connection) -> None:
        if conn not in self.all:
            self.connecting -= 1
            if self.transport.closed:
                conn.abort()  # made while (or just before) the transport closed
                return
            self.all.add(conn)
        while self.waiting:
            call = self.waiting.popleft()
            if not call.done:
                conn.send(call, build_request(self.head(call.path), call.body))
                return
        conn.idle_since = monotonic()
        self.idle.append(conn)

    def connection_gone(self, conn: _Connection) -> None:
        self.all.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        # A call waiting for a connection while the pool was full would otherwise wait
        # until its timeout (or forever): the pool has room again.
        if self.waiting and not self.transport.closed and \
                len(self.all) + self.connecting < self.transport.max_connections:
            self.connect()

    def connect_failed(self, reason: Failure) -> None:
        self.connecting -= 1
        exc = errors.Unavailable(f"cannot connect to {self.endpoint.url}: "
                                 f"{reason.getErrorMessage()}")
        self.transport.endpoint_down(self, str(exc))
        # The endpoint is unreachable: every call waiting for it moves on (none was sent).
        waiting, self.waiting = self.waiting, collections.deque()
        for call in waiting:
            if not call.done:
                self.transport.call_broken(call, exc)

    def close(self) -> list[defer.Deferred[None]]:
        """Close every connection but those draining (see `drains`), which get
        `CLOSE_DRAIN_LIMIT` seconds at most; returns Deferreds firing when they are gone."""
        for factory in list(self.connectors):
            _stop_connecting(factory.connector)  # its calls were failed already
        self.connectors.clear()
        gone = []
        for conn in list(self.all):
            if conn.draining is not None and not conn.closed:
                conn.drain(CLOSE_DRAIN_LIMIT)
                if conn.fd is not None:  # the transport's reader closes next: let
                    self.transport.reader.remove(conn)  # Twisted read this one again
                    conn.transport.startReading()  # type: ignore[union-attr]
                gone.append(conn.gone())
            else:
                conn.abort()
        self.idle.clear()
        return gone


class _Reader:
    """Reads the transport's pooled plain-TCP connections in one reactor event.

    The reactor wraps each readable socket's ``doRead`` in its logging context
    (``callWithLogger``: ~6 us per event, measured).  Instead, the pool's sockets sit in an
    epoll set of our own, and the reactor watches only that set: one reactor event per
    wake-up reads every connection that has an answer.  A connection whose socket reached
    its end (or failed) goes back to Twisted, whose read path then closes it as usual.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._epoll: Any = None
        self._conns: dict[int, _Connection] = {}
        self.enabled = hasattr(select, "epoll")

    def fileno(self) -> int:
        return self._epoll.fileno() if self._epoll is not None else -1

    def logPrefix(self) -> str:
        return "coord"

    def add(self, conn: _Connection) -> None:
        if not self.enabled:
            return
        if self._epoll is None:
            self._epoll = select.epoll()
            self._reactor.addReader(self)
        fd = conn._socket.fileno()
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except FileExistsError:  # a closed socket's number, reused
            self._epoll.modify(fd, select.EPOLLIN)
        conn.transport.stopReading()  # type: ignore[union-attr]
        self._conns[fd] = conn
        conn.fd = fd

    def remove(self, conn: _Connection) -> None:
        fd = conn.fd
        if fd is None or self._conns.get(fd) is not conn:
            return
        conn.fd = None
        del self._conns[fd]
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass

    def doRead(self) -> None:
        conns = self._conns
        if len(conns) == 1:
            # The one socket in the set is the readable one: no poll needed (one request
            # in flight is the latency case, where a system call more shows).
            ready: Any = ((next(iter(conns)), 0),)
        else:
            ready = self._epoll.poll(0)
        for fd, _ in ready:
            conn = conns.get(fd)
            if conn is not None:
                try:
                    conn.read_ready()
                except Exception:
                    # Never out of here: the reactor would drop the reader, and with it
                    # every connection in it.  (Callbacks' errors stay in Deferreds.)
                    log.failure("reading {conn!r}", conn=conn)
                    conn.abort()

    def connectionLost(self, reason: Any) -> None:
        self.close()

    def close(self) -> None:
        self.enabled = False  # a connection made after this is read by Twisted (and aborted)
        if self._epoll is not None:
            self._reactor.removeReader(self)
            self._epoll.close()
            self._epoll = None
        self._conns.clear()


class Deadlines:
    """Call timeouts with one reactor timer, instead of a DelayedCall per call.

    Calls are filed in a FIFO per timeout value, so each FIFO is in deadline order (a
    client mostly uses one timeout); finished calls are dropped when they reach a FIFO's
    head.  The timer is set for the earliest head.
    """

    def __init__(self, reactor: Any, expire: Callable[[_Call, float], None]) -> None:
        self._reactor = reactor
        self._seconds = reactor.seconds
        self._expire = expire
        self._fifos: dict[float, collections.deque[tuple[float, _Call]]] = {}
        self._timer: Any = None
        self._timer_at = 0.0  # when self._timer fires
        self._firing = False

    def add(self, call: _Call, timeout: float) -> None:
        deadline = self._seconds() + timeout
        fifo = self._fifos.get(timeout)
        if fifo is None:
            fifo = self._fifos[timeout] = collections.deque()
        while fifo and fifo[0][1].done:
            fifo.popleft()
        if fifo:
            # Later than this FIFO's head, for which the timer is set already (or earlier).
            fifo.append((deadline, call))
            return
        fifo.append((deadline, call))
        if self._firing:
            return  # _fire() sets the timer when it is done
        if self._timer is None:
            self._timer = self._reactor.callLater(timeout, self._fire)
            self._timer_at = deadline
        elif deadline < self._timer_at:
            self._timer.reset(timeout)
            self._timer_at = deadline

    def _fire(self) -> None:
        # Expiring a call runs its errbacks, which may clear() (close the client) or add()
        # calls: add() only files them while this runs, and the timer is set once, at the
        # end, from whatever FIFOs exist then.
        self._timer = None
        self._firing = True
        try:
            now = self._seconds()
            for timeout, fifo in list(self._fifos.items()):
                while fifo and self._fifos.get(timeout) is fifo and \
                        (fifo[0][1].done or fifo[0][0] <= now):
                    _, call = fifo.popleft()
                    if not call.done:
                        self._expire(call, timeout)
        finally:
            self._firing = False
            self._schedule()

    def _schedule(self) -> None:
        earliest = None
        for timeout, fifo in list(self._fifos.items()):
            while fifo and fifo[0][1].done:
                fifo.popleft()
            if not fifo:
                del self._fifos[timeout]
            elif earliest is None or fifo[0][0] < earliest:
                earliest = fifo[0][0]
        timer = self._timer
        if earliest is None:
            if timer is not None and timer.active():
                timer.cancel()
            self._timer = None
            return
        delay = max(0.0, earliest - self._seconds())
        if timer is not None and timer.active():
            timer.reset(delay)
        else:
            self._timer = self._reactor.callLater(delay, self._fire)
        self._timer_at = earliest

    def clear(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._fifos.clear()


class HttpTransport:
    """The default transport (see the module docstring).

    Args:
        reactor: the Twisted reactor.
        endpoints: parsed endpoints, in order of preference.
        connect_timeout: seconds allowed for a TCP (and TLS) connect.
        max_connections: most connections per endpoint (requests beyond wait).
        tls: a callable ``(Endpoint) -> IOpenSSLClientConnectionCreator`` for https.
        credentials: ``(user, password)`` to authenticate with, or None.
        attempt_timeout: seconds one attempt waits for its answer before the endpoint
            is presumed hung (see :func:`coord._failover.on_attempt_expired`); None: no
            attempt deadline.  It applies only with several endpoints.
        check_interval: seconds between checks of an endpoint that serves streams
            (None: never).
    """

    def __init__(self, reactor: Any, endpoints: list[Endpoint], connect_timeout: float = 5.0,
                 max_connections: int = 64, tls: Callable[[Endpoint], Any] | None = None,
                 credentials: tuple[str, str] | None = None,
                 attempt_timeout: float | None = 2.0,
                 check_interval: float | None = 1.0) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self._tls = tls
        self._pools = [_EndpointPool(self, ep, i) for i, ep in enumerate(endpoints)]
        self._preferred = 0
        # With one endpoint there is nowhere else to go: no attempt deadline, no watchdog.
        self.attempt_timeout = attempt_timeout if len(endpoints) > 1 else None
        self.watchdog: Any = None
        self.watchdog_at = math.inf
        self.monitor = Monitor(self, len(endpoints), check_interval,
                               min(PROBE_TIMEOUT, attempt_timeout or PROBE_TIMEOUT),
                               self._preference_changed)
        self.monitor.urls = [ep.url for ep in endpoints]
        # Whether any call was answered yet: a watch that cannot reach any endpoint of a
        # client that never reached one fails, as a call does (see coord.watch).
        self.reached = False
        self._credentials = credentials
        self._token: str | None = None
        self._authenticating: defer.Deferred[None] | None = None
        self._auth_waiters: list[tuple[Callable[[], None], Callable[[BaseException], None]]] = []
        self._streams: set[_Stream] = set()
        self._pauses: dict[_Call, Any] = {}  # DelayedCalls re-sending after "no leader"
        self.closed = False
        self._deadlines = Deadlines(reactor, self._timed_out)
        self.reader = _Reader(reactor)

    @property
    def endpoints(self) -> list[Endpoint]:
        return [p.endpoint for p in self._pools]

    @property
    def preferred(self) -> Endpoint:
        return self._pools[self._preferred].endpoint

    @property
    def has_credentials(self) -> bool:
        """Whether the transport authenticates (a refused token is worth one retry)."""
        return self._credentials is not None

    def extra_headers(self) -> dict[str, str]:
        return {"Authorization": self._token} if self._token else {}

    def connect(self, endpoint: Endpoint, factory: protocol.ClientFactory) -> Any:
        """Start connecting; returns the connector (to stop it, see close())."""
        if endpoint.tls:
            if self._tls is None:
                raise errors.InvalidArgument(f"{endpoint.url} needs TLS options")
            return self.reactor.connectSSL(endpoint.host, endpoint.port, factory,
                                           self._tls(endpoint), timeout=self.connect_timeout)
        return self.reactor.connectTCP(endpoint.host, endpoint.port, factory,
                                       timeout=self.connect_timeout)

    # unary calls ------------------------------------------------------------------------------

    def request(self, path: str, body: bytes, write: bool, timeout: float | None,
                decode: Callable[[Any], Any] | None = None,
                endpoint: int | None = None,
                attempt_timeout: float | None = None) -> defer.Deferred[Any]:
        """POST ``body`` to ``path``; the Deferred fires with the decoded JSON answer.

        Args:
            write: whether the request may change state (decides what is safe to re-send).
            timeout: seconds for the whole call, retries included; None for no limit.
            decode: applied to the JSON answer before the Deferred fires (saves a
                callback per request); what it raises fails the call.
            endpoint: the index (in :attr:`endpoints`) of the one endpoint to ask, for
                member-specific calls (status, defragment, alarms of *that* member):
                never sent to another one; None (the default) for any endpoint, with
                failover.
            attempt_timeout: this call's attempt deadline, if not the transport's.

        Raises:
            InvalidArgument: ``endpoint`` is not an index of :attr:`endpoints` (raised
                at once, not through the Deferred).

        The Deferred fails with ``Unavailable("client closed")`` at once after close().
        Cancelling the Deferred drops the call (and the connection, if the request was
        already written).
        """
        if endpoint is not None and not 0 <= endpoint < len(self._pools):
            raise errors.InvalidArgument(
                f"endpoint index {endpoint} is not one of the {len(self._pools)} endpoints")
        call = _Call(path, body, write, decode)
        if self.closed:
            call.fail(errors.Unavailable("client closed"))
            return call.deferred
        if timeout is not None:
            self._deadlines.add(call, timeout)
        call.pinned = endpoint
        call.attempt_timeout = attempt_timeout
        if self._credentials is not None and self._token is None and path != AUTH_PATH:
            self._wait_for_token(call)
        elif endpoint is None:
            # The first attempt goes to the preferred endpoint, as a fresh plan says: the
            # plan itself is made only if a retry needs it (see _dispatch).
            self._pools[self._preferred].submit(call)
        else:
            call.plan = self._plan(call)
            self._dispatch(call)
        return call.deferred

    def _plan(self, call: _Call) -> Plan:
        if call.pinned is not None:
            return Plan(call.pinned, len(self._pools), call.write, pinned=True)
        return Plan(self._preferred, len(self._pools), call.write,
                    order=self.monitor.health.order(self._preferred))

    def _plan_of(self, call: _Call) -> Plan:
        """The call's plan; made now, if only its first attempt was made (see request)."""
        plan = call.plan
        if plan is None:
            # Only its first attempt was made, to the preferred endpoint of the time.
            start = call.endpoint.index  # type: ignore[union-attr]
            plan = call.plan = Plan(start, len(self._pools), call.write,
                                    order=self.monitor.health.order(start))
            plan.next_index()
        return plan

    def _dispatch(self, call: _Call, exc: errors.CoordError | None = None) -> None:
        """Send ``call`` to its plan's next endpoint; when none is left, fail it with
        Unavailable naming the endpoints tried (and ``exc``, the last failure)."""
        if self.closed:
            call.fail(errors.Unavailable("client closed"))
            return
        plan = self._plan_of(call)
        index = plan.next_index()
        if index is not None:
            self._pools[index].submit(call)
            return
        if exc is not None and type(exc) is not errors.Unavailable:
            call.fail(exc)  # an error of its own kind (an etcd answer): keep it
            return
        tried = ", ".join(self._pools[i].endpoint.url for i in plan.tried())
        last = f": {exc}" if exc is not None else ""
        call.fail(errors.Unavailable(f"{call.path}: no endpoint could serve it "
                                     f"(tried {tried}){last}"))

    def _resend(self, call: _Call) -> None:
        self._pauses.pop(call, None)
        if not call.done:
            self._dispatch(call)

    def _timed_out(self, call: _Call, timeout: float) -> None:
        # No demotion here: a call's own timeout says how long its caller waits, not that
        # the member is hung (only an attempt deadline says that).
        what = f"{call.path} did not complete within {timeout} s"
        if call.write and call.sent:
            call.fail(errors.WriteTimeout(what + "; the write may or may not have been applied"))
        else:
            call.fail(errors.Timeout(what))

    # attempt deadlines --------------------------------------------------------------------

    def arm_watchdog(self, at: float) -> None:
        """Set the watchdog for an attempt deadline at ``at`` (``monotonic()`` time): called
        by a connection that sends while no watchdog is set, or one set for later."""
        delay = max(0.0, at - monotonic())
        if self.watchdog is not None and self.watchdog.active():
            self.watchdog.reset(delay)
        else:
            self.watchdog = self.reactor.callLater(delay, self._watch_attempts)
        self.watchdog_at = at

    def _watch_attempts(self) -> None:
        """Expire every attempt past its deadline; set the timer for the earliest one left."""
        self.watchdog = None
        if self.closed or self.attempt_timeout is None:
            return
        now = monotonic()
        earliest = math.inf
        for pool in self._pools:
            for conn in list(pool.all):
                call = conn.call
                if call is None or call.done:
                    continue
                if conn.deadline <= now:
                    self._attempt_expired(call, conn, call.attempt_timeout or self.attempt_timeout)
                elif conn.deadline < earliest:
                    earliest = conn.deadline
        # (A call moved on above set the watchdog for its new attempt, which may be later
        # than an attempt still waiting here.)
        if earliest != math.inf and (self.watchdog is None or earliest < self.watchdog_at):
            self.arm_watchdog(earliest)

    def _attempt_expired(self, call: _Call, conn: _Connection, limit: float) -> None:
        plan = self._plan_of(call)
        url = conn.pool.endpoint.url
        what = f"{url} did not answer {call.path} within {limit} s (attempt_timeout)"
        decision = on_attempt_expired(call.path, call.write, plan)
        if decision is Expiry.WAIT:
            # No deadline for this attempt after all: wait for its answer, until the
            # call's own timeout.  (Never looked at again by the watchdog.)
            conn.deadline = math.inf
        if expiry_demotes(call.path, call.write, plan):
            self.endpoint_down(conn.pool, what)
        if decision is Expiry.FAIL:
            call.fail(errors.WriteTimeout(
                f"{what}; the write may or may not have been applied; it is not re-sent"))
        elif decision is Expiry.MOVE and not call.done:
            # Let go of this attempt as a cancel would (a read-only transaction's
            # connection drains: see drains()), then send it to the next endpoint.
            call._cleanup()
            call.sent = False
            self._dispatch(call, errors.Unavailable(what))

    # endpoint health --------------------------------------------------------------------------

    def demote(self, endpoint: Endpoint) -> None:
        """Prefer other endpoints over ``endpoint`` (it seems hung) until it answers a
        probe again."""
        for pool in self._pools:
            if pool.endpoint == endpoint:
                self.endpoint_down(pool, f"{endpoint.url} seems hung")

    def endpoint_down(self, pool: _EndpointPool, why: str = "") -> None:
        self.monitor.demote(pool.index, why or f"{pool.endpoint.url} failed")
        if len(self._pools) > 1 and pool.waiting and not self.closed:
            # Calls still waiting for one of its connections were never sent: safe to
            # move, and better than waiting behind the ones that hang (or drain) there.
            waiting, pool.waiting = pool.waiting, collections.deque()
            exc = errors.Unavailable(why or f"{pool.endpoint.url} failed")
            for call in waiting:
                if not call.done and call.pinned is None:
                    self._dispatch(call, exc)
                elif not call.done:
                    pool.waiting.append(call)

    def _preference_changed(self) -> None:
        self._preferred = self.monitor.health.preferred

    def move_streams(self, index: int, exc: errors.CoordError) -> None:
        """End every stream on endpoint ``index`` with ``exc`` (its owner creates it again,
        on the endpoint preferred now)."""
        for stream in list(self._streams):
            if stream.index == index:
                stream.cancel()
                stream.on_end(exc)

    def call_broken(self, call: _Call, exc: errors.CoordError) -> None:
        """The call's connection failed (or never connected)."""
        if call.done:
            return
        if not Plan.may_resend(call.write, call.sent):
            call.fail(errors.OutcomeUnknown(
                f"{exc}; the write to {call.path} was sent, so it may or may not have "
                "been applied; it is not re-sent"))
            return
        if call.sent:
            self.endpoint_down(call.endpoint, str(exc))  # type: ignore[arg-type]
        call.sent = False
        self._dispatch(call, exc)

    def call_answered(self, call: _Call, status: int, body: bytes) -> None:
        if call.done:
            return
        if status == 200 and not body.startswith(codec.STREAM_ERROR):
            try:
                result = codec.answer(body, call.decode)
            except Exception as e:
                call.fail(e)
                return
            # No clean-up (see _Call.fail): an answered call holds no connection and
            # waits in no queue.
            call.done = True
            self.reached = True
            call.deferred.callback(result)
            return
        try:
            obj = codec.decode(body)
        except errors.CoordError:
            obj = body
        exc = errors.from_gateway(obj, status)
        if Plan.may_retry_answer(call.write, exc) and \
                call.unavailable_retries < len(Plan.UNAVAILABLE_PAUSES):
            # Another member may have a leader, or this one soon will: try again shortly.
            self.endpoint_down(call.endpoint, str(exc))  # type: ignore[arg-type]
            call.sent = False
            pause = Plan.UNAVAILABLE_PAUSES[call.unavailable_retries]
            call.unavailable_retries += 1
            call.plan = self._plan(call)
            self._pauses[call] = self.reactor.callLater(pause, self._resend, call)
        elif isinstance(exc, errors.Unauthenticated) and self._credentials is not None \
                and not call.auth_retried and call.path != AUTH_PATH:
            # The token expired (or the server restarted): get a new one, send once more.
            call.auth_retried = True
            call.sent = False
            self._set_token(None)
            self._wait_for_token(call)
        else:
            call.fail(Plan.answer_error(call.write, exc))

    # authentication -------------------------------------------------------------------------

    def _wait_for_token(self, call: _Call) -> None:
        def go() -> None:
            if not call.done:
                call.plan = self._plan(call)
                self._dispatch(call)

        self.after_token(go, call.fail)

    def after_token(self, go: Callable[[], None],
                    fail: Callable[[BaseException], None]) -> None:
        """Run ``go`` once a token is at hand (authenticating first), or ``fail``."""
        if self._credentials is None or self._token is not None:
            go()
            return
        self._auth_waiters.append((go, fail))
        if self._authenticating is None:
            self._authenticating = self._authenticate()

    def forget_token(self) -> None:
        """The server refused our token: the next request authenticates again."""
        self._set_token(None)

    def _authenticate(self) -> defer.Deferred[None]:
        user, password = self._credentials  # type: ignore[misc]
        d = self.request(AUTH_PATH, codec.encode({"name": user, "password": password}),
                         False, self.connect_timeout * 2)

        def got(obj: dict) -> None:
            self._authenticating = None
            self._set_token(obj.get("token"))
            waiters, self._auth_waiters = self._auth_waiters, []
            for go, _ in waiters:
                go()

        def failed(f: Failure) -> None:
            self._authenticating = None
            waiters, self._auth_waiters = self._auth_waiters, []
            for _, fail in waiters:
                fail(f.value or errors.Unauthenticated("authentication failed"))

        d.addCallbacks(got, failed)
        return d

    def _set_token(self, token: str | None) -> None:
        self._token = token
        for pool in self._pools:
            pool.heads.clear()

    # streams ----------------------------------------------------------------------------------

    def stream(self, path: str, body: bytes, on_message: Callable[[Any], None],
               on_end: Callable[[errors.CoordError | None], None],
               endpoint: int | None = None) -> _Stream:
        """Open a streaming POST on a connection of its own (see :class:`_Stream`)."""
        stream = _Stream(self, path, body, on_message, on_end)
        if self.closed:
            stream.ended(errors.Unavailable("client closed"))
            return stream

        def go() -> None:
            if not stream.finished:
                stream.open(self._preferred if endpoint is None else endpoint)

        def fail(exc: BaseException) -> None:
            stream.ended(exc if isinstance(exc, errors.CoordError)
                         else errors.Unavailable(str(exc)))

        self.after_token(go, fail)
        return stream

    def close(self) -> defer.Deferred[None]:
        """Drop every connection (also those still connecting), stop every timer, and
        fail pending calls with ``Unavailable("client closed")``; so do later calls.

        A connection that owes the answer of a read-only transaction is closed once that
        answer came, or after `CLOSE_DRAIN_LIMIT` seconds (see `drains`); the Deferred
        fires when every connection is closed."""
        self.closed = True
        self._deadlines.clear()
        self.monitor.close()
        watchdog, self.watchdog = self.watchdog, None
        if watchdog is not None and watchdog.active():
            watchdog.cancel()
        pauses, self._pauses = self._pauses, {}
        for call, timer in pauses.items():
            if timer.active():
                timer.cancel()
            call.fail(errors.Unavailable("client closed"))
        for stream in list(self._streams):
            stream.cancel()
        waiters, self._auth_waiters = self._auth_waiters, []
        for _, fail in waiters:
            fail(errors.Unavailable("client closed"))
        draining = []
        for pool in self._pools:
            waiting, pool.waiting = pool.waiting, collections.deque()
            for call in waiting:
                call.fail(errors.Unavailable("client closed"))
            for conn in list(pool.all):
                if conn.call is not None:
                    conn.call.fail(errors.Unavailable("client closed"))
            draining += pool.close()
        self.reader.close()
        if not draining:
            return defer.succeed(None)
        return defer.gatherResults(draining).addCallback(lambda _: None)


AUTH_PATH = "/v3/auth/authenticate"


class _Stream:
    """A streaming answer (watch, keep-alive) on its own connection.

    ``on_message`` gets each decoded JSON message; ``on_end`` is called once, with None
    when the server ended the stream, or with the error that ended it (an
    :class:`~coord.errors.EtcdError` for an error status, Unavailable for a broken
    connection).  ``cancel()`` closes the connection and calls neither.
    """

    def __init__(self, transport: HttpTransport, path: str, body: bytes,
                 on_message: Callable[[Any], None],
                 on_end: Callable[[errors.CoordError | None], None]) -> None:
        self.transport = transport
        self.path = path
        self.body = body
        self.on_message = on_message
        self.on_end = on_end
        self.status = 0
        self.splitter = LineSplitter()
        self.conn: _Connection | None = None
        self.endpoint: Endpoint | None = None
        self.finished = False
        self.connector: Any = None
        self.index = -1
        self._error_body: list[bytes] = []

    def open(self, index: int) -> None:
        pool = self.transport._pools[index]
        self.endpoint = pool.endpoint
        self.index = index
        self.transport._streams.add(self)
        self.transport.monitor.stream_opened(index)
        self.connector = self.transport.connect(pool.endpoint, _StreamFactory(pool, self))

    def _forget(self) -> None:
        self.finished = True
        if self in self.transport._streams:
            self.transport._streams.discard(self)
            self.transport.monitor.stream_ended(self.index)

    def connected(self, conn: _Connection) -> None:
        if self.finished:
            conn.abort()
            return
        self.conn = conn
        pool = conn.pool
        try:
            conn.write(build_request(pool.head(self.path), self.body))
        except OSError as e:
            conn.abort()
            self.ended(errors.Unavailable(f"cannot send to {pool.endpoint.url}: {e}"))

    def connect_failed(self, pool: _EndpointPool, reason: Failure) -> None:
        if self.finished:
            return  # cancelled while connecting
        exc = errors.Unavailable(
            f"cannot connect to {pool.endpoint.url}: {reason.getErrorMessage()}")
        self.ended(exc)
        self.transport.endpoint_down(pool, str(exc))

    def head(self, status: int) -> None:
        self.status = status
        if status == 200:
            self.transport.reached = True

    def data(self, data: bytes) -> None:
        if self.status != 200:
            self._error_body.append(data)
            return
        for line in self.splitter.feed(data):
            if self.finished:
                return
            try:
                obj = codec.decode(line)
            except errors.CoordError as e:
                self.cancel()
                self.on_end(e)
                return
            error_obj = obj.get("error") if isinstance(obj, dict) else None
            if error_obj is not None:
                # A stream ends with {"error": {...}} when the server aborts it.
                self.cancel()
                self.on_end(errors.from_gateway(error_obj, self.status))
                return
            self.on_message(obj.get("result", obj))

    def ended(self, exc: errors.CoordError | None) -> None:
        if self.finished:
            return
        self._forget()
        if exc is None and self.status != 200:
            body = b"".join(self._error_body)
            try:
                obj = codec.decode(body)
            except errors.CoordError:
                obj = body
            exc = errors.from_gateway(obj, self.status)
        self.on_end(exc)

    def pause_reading(self, paused: bool) -> None:
        """Stop (or go on) reading from the connection: TCP pushes back to the server.
        Before the connection is made this does nothing (the caller applies it again
        on the first message)."""
        transport = self.conn.transport if self.conn is not None else None
        if transport is not None:
            (transport.pauseProducing if paused else transport.resumeProducing)()

    def cancel(self) -> None:
        """Stop the stream now: close its connection; no more callbacks."""
        if self.finished:
            return
        self._forget()
        if self.conn is not None:
            self.conn.stream = None
            self.conn.abort()
        else:
            _stop_connecting(self.connector)


class _StreamFactory(protocol.ClientFactory):
    noisy = False
    def __init__(self, pool: _EndpointPool, stream: _Stream) -> None:
        self.pool = pool
        self.stream = stream

    def buildProtocol(self, addr: Any) -> _Connection:
        return _Connection(self.pool, self.stream)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.stream.connect_failed(self.pool, reason)
