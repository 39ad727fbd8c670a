"""Adversarial tests of the read-only transaction drain (coord._twisted.pool.drains,
coord._twisted.treq's _detached/_drain): connection accounting, repeated give-ups, close()
in every state, odd drained answers, nested transactions, both transports, recipes."""

from __future__ import annotations

import json
import time

import pytest
import pytest_twisted
from conftest import make_client
from helpers import sleep, wait_until
from test_drain import READ_ALL, fill, quiet, silent_gateway  # noqa: F401 (fixture)
from test_pool import ours, sockets_of, transport_for
from twisted.internet import defer, protocol, reactor, task

from coord import Client, KeySet, OpDel, OpGet, OpSet, Transaction, errors
from coord._twisted import pool as pool_module
from coord._twisted import treq as treq_module
from coord.client import _txn_writes

TXN = "/v3/kv/txn"
NO_LEADER = {"error": "etcdserver: no leader", "message": "etcdserver: no leader", "code": 14}


def http_answer(status=200, body=None, close=False):
    body = {} if body is None else body
    if status == 200:
        body = {"header": {}, **body}  # as every etcd answer (coord refuses one without)
    raw = json.dumps(body).encode()
    extra = b"Connection: close\r\n" if close else b""
    return (b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
            % (status, extra, len(raw), raw))


class _Scripted(protocol.Protocol):
    def connectionMade(self):
        self.factory.open.add(self)
        self.factory.connections += 1

    def connectionLost(self, reason=None):
        self.factory.open.discard(self)

    def dataReceived(self, data):
        for _ in range(data.count(b"POST ")):
            n = self.factory.requests
            self.factory.requests += 1
            action = self.factory.script(n)
            kind, delay, payload = action
            if kind == "hold":
                continue
            self.factory.timers.append(reactor.callLater(delay, self._act, kind, payload))

    def _act(self, kind, payload):
        if self.transport is None or self not in self.factory.open:
            return
        if kind == "answer":
            self.transport.write(payload)
        elif kind == "hangup":
            self.transport.abortConnection()
        elif kind == "partial":  # a head and part of the body, then nothing
            self.transport.write(payload)


class Scripted(protocol.Factory):
    """A gateway whose n-th request (0-based, over all connections) gets ``script(n)``:
    ("answer", delay, bytes), ("hangup", delay, None), ("partial", delay, bytes) or
    ("hold", 0, None)."""

    protocol = _Scripted

    def __init__(self, script):
        self.script = script
        self.requests = 0
        self.connections = 0
        self.open = set()
        self.timers = []


@pytest.fixture
def scripted():
    ports = []
    factories = []

    def start(script):
        factory = Scripted(script)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(port)
        factories.append(factory)
        return f"http://127.0.0.1:{port.getHost().port}", factory

    yield start
    for f in factories:
        for t in f.timers:
            if t.active():
                t.cancel()
        for p in list(f.open):
            p.transport.abortConnection()
    for port in ports:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))
    pytest_twisted.blockon(sleep(0.01))


def no_coord_timers():
    return [dc for dc in reactor.getDelayedCalls() if ours(dc)]


# ============================================================================================
# nested transactions: what counts as a write
# ============================================================================================


def test_txn_writes_sees_writes_in_nested_transactions():
    inner_put = Transaction(success=[OpSet(b"a", b"1")])
    inner_del = Transaction(failure=[OpGet(b"x"), Transaction(success=[OpDel(b"b")])])
    assert _txn_writes(Transaction(success=[inner_put]))
    assert _txn_writes(Transaction(failure=[OpGet(b"x"), inner_del]))
    assert _txn_writes(Transaction(success=[Transaction(failure=[Transaction(
        success=[OpSet(b"deep")])])]))
    only_gets = Transaction(success=[OpGet(b"a"), Transaction(success=[OpGet(b"b")],
                                                              failure=[Transaction()])],
                            failure=[Transaction(success=[OpGet(KeySet(b"p", prefix=True))])])
    assert not _txn_writes(only_gets)
    assert not _txn_writes(Transaction())


@pytest.mark.parametrize("nested, drains", [
    (Transaction(success=[OpGet(b"k/0")], failure=[Transaction(success=[OpSet(b"w", b"v")])]),
     False),
    (Transaction(success=[Transaction(failure=[OpDel(b"w")])]), False),
    (Transaction(success=[Transaction(success=[OpGet(b"k/0")]), OpGet(KeySet(b"k/", prefix=True))],
                 failure=[Transaction(success=[OpGet(b"x")])]), True),
], ids=["write-in-nested-failure", "delete-in-nested", "gets-only-nested"])
@pytest_twisted.ensureDeferred
async def test_nested_transactions_drain_only_when_read_only(etcd, pool_client, nested, drains):
    await pool_client.get(b"warm")
    pool = pool_client._transport._pools[0]
    (conn,) = pool.idle
    d = pool_client.submit(nested)
    assert conn.call is not None
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    if drains:
        assert conn.draining is not None and not conn.closed and conn in pool.all
        await wait_until(lambda: conn.draining is None, timeout=5)
        assert pool.idle == [conn]
    else:
        assert conn.closed and conn.draining is None and conn not in pool.all


# ============================================================================================
# connection accounting (coord's pool)
# ============================================================================================


@pytest_twisted.ensureDeferred
async def test_calls_queued_behind_a_drain_are_served_on_the_same_connection(etcd):
    client = Client(reactor, etcd.url, max_connections=1)
    try:
        await fill(client, 100)
        pool = client._transport._pools[0]
        (conn,) = pool.idle
        d = client.submit(READ_ALL)
        d.cancel()
        d.cancel()  # twice: nothing more happens
        with pytest.raises(defer.CancelledError):
            await d
        assert conn.draining is not None
        queued = [client.get(b"k/%04d" % i, timeout=5) for i in range(5)]
        queued.append(client.submit(READ_ALL, timeout=5))
        queued.append(client.set(b"k/new", b"v", timeout=5))
        assert len(pool.waiting) == 7 and pool.connecting == 0
        results = await defer.gatherResults(queued)
        assert [r.kvs[0].key for r in results[:5]] == [b"k/%04d" % i for i in range(5)]
        assert len(results[5].responses[0].kvs) == 100
        assert pool.all == {conn} and not conn.closed
        assert conn.draining is None
    finally:
        await client.close()
    await sleep(0.01)
    assert sockets_of(client._transport) == [] and no_coord_timers() == []


@pytest_twisted.ensureDeferred
async def test_queued_calls_time_out_then_get_a_new_connection_after_the_drain_limit(
        scripted, monkeypatch):
    monkeypatch.setattr(pool_module, "DRAIN_LIMIT", 0.3)
    # The first request (the dropped txn) is never answered; the others are, at once.
    url, server = scripted(lambda n: ("hold", 0, None) if n == 0
                           else ("answer", 0, http_answer(200, {"n": n})))
    transport = transport_for(url, max_connections=1)
    try:
        with pytest.raises(errors.Timeout):
            await transport.request(TXN, b"{}", False, 0.05)
        pool = transport._pools[0]
        (conn,) = pool.all
        assert conn.draining is not None
        short = transport.request("/v3/kv/range", b"{}", False, 0.1)
        long = transport.request("/v3/kv/range", b"{}", False, 3)
        started = time.monotonic()
        with pytest.raises(errors.Timeout):
            await short  # never got a connection: fails by its own timeout
        assert not long.called
        assert await long == {"header": {}, "n": 1}  # on a new connection, once the drain gave up
        assert 0.2 <= time.monotonic() - started < 2.0
        assert conn.closed and conn not in pool.all and len(pool.all) == 1
        assert server.connections == 2 and server.requests == 2
    finally:
        await transport.close()
    await sleep(0.01)
    assert sockets_of(transport) == [] and no_coord_timers() == []


@pytest.mark.parametrize("answer, reused", [
    (http_answer(500, {"error": "boom", "message": "boom", "code": 13}), True),
    (http_answer(503, NO_LEADER), True),
    (http_answer(200, {}, close=True), False),
    (http_answer(500, {"message": "x", "code": 13}, close=True), False),
], ids=["500", "no-leader", "200-connection-close", "500-connection-close"])
@pytest_twisted.ensureDeferred
async def test_drained_answer_kinds(scripted, answer, reused):
    url, server = scripted(lambda n: ("answer", 0.15, answer) if n == 0
                           else ("answer", 0, http_answer(200, {"n": n})))
    transport = transport_for(url, max_connections=1)
    try:
        d = transport.request(TXN, b"{}", False, 5)
        await wait_until(lambda: server.requests == 1)
        d.cancel()
        with pytest.raises(defer.CancelledError):
            await d
        pool = transport._pools[0]
        (conn,) = pool.all
        nxt = transport.request("/v3/kv/range", b"{}", False, 3)
        assert await nxt == {"header": {}, "n": 1}
        await sleep(0.3)  # a no-leader answer to the dropped call must not re-send it
        assert server.requests == 2
        assert (conn in pool.all and not conn.closed) is reused
        assert server.connections == (1 if reused else 2)
    finally:
        await transport.close()
    await sleep(0.01)
    assert sockets_of(transport) == [] and no_coord_timers() == []


@pytest_twisted.ensureDeferred
async def test_drain_ended_by_the_server_hanging_up_frees_the_pool(scripted):
    url, server = scripted(lambda n: ("hangup", 0.1, None) if n == 0
                           else ("answer", 0, http_answer(200, {"n": n})))
    transport = transport_for(url, max_connections=1)
    try:
        d = transport.request(TXN, b"{}", False, 0.02)
        with pytest.raises(errors.Timeout):
            await d
        (conn,) = transport._pools[0].all
        queued = transport.request("/v3/kv/range", b"{}", False, 3)
        assert await queued == {"header": {}, "n": 1}
        assert conn.closed and conn.draining is None
        assert server.requests == 2  # the dropped txn was not re-sent
    finally:
        await transport.close()
    await sleep(0.01)
    assert sockets_of(transport) == [] and no_coord_timers() == []


@pytest_twisted.ensureDeferred
async def test_pool_drain_limit_closes_a_connection_whose_answer_stalls(scripted, monkeypatch):
    # The counterpart of the treq test below: coord's pool aborts the connection.
    monkeypatch.setattr(pool_module, "DRAIN_LIMIT", 0.2)
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{\"header\":")
    url, server = scripted(lambda n: ("partial", 0, head) if n == 0
                           else ("answer", 0, http_answer(200, {"n": n})))
    transport = transport_for(url, max_connections=1)
    try:
        with pytest.raises(errors.Timeout):
            await transport.request(TXN, b"{}", False, 0.1)
        (conn,) = transport._pools[0].all
        # a queued call, served on a new connection once the stalled one is given up
        assert await transport.request("/v3/kv/range", b"{}", False, 3) == {"header": {}, "n": 1}
        assert conn.closed and server.connections == 2 and len(server.open) == 1
    finally:
        await transport.close()
    await sleep(0.05)
    assert not server.open and sockets_of(transport) == [] and no_coord_timers() == []


@pytest_twisted.ensureDeferred
async def test_queued_calls_behind_a_drain_fail_cleanly_when_etcd_dies(etcd_factory):
    server = etcd_factory()
    client = Client(reactor, server.url, max_connections=1)
    try:
        await fill(client, 50)
        server.pause()
        d = quiet(client.submit(READ_ALL, timeout=0.1))
        queued = [client.get(b"k/0000", timeout=5) for _ in range(3)]
        await sleep(0.2)
        assert d.called and not any(q.called for q in queued)
        server.kill()
        started = time.monotonic()
        for q in queued:
            with pytest.raises(errors.Unavailable):
                await q
        assert time.monotonic() - started < 3.0  # not their 5 s timeout
    finally:
        await client.close()
    await sleep(0.01)
    assert sockets_of(client._transport) == [] and no_coord_timers() == []


# ============================================================================================
# close() in every state (coord's pool)
# ============================================================================================


@pytest_twisted.ensureDeferred
async def test_close_twice_while_draining_on_several_endpoints(scripted, monkeypatch):
    monkeypatch.setattr(pool_module, "CLOSE_DRAIN_LIMIT", 0.3)
    url1, s1 = scripted(lambda n: ("hold", 0, None))
    url2, s2 = scripted(lambda n: ("answer", 0.1, http_answer(200)))
    transport = transport_for(url1, url2)
    a = quiet(transport.request(TXN, b"{}", False, 10))
    b = quiet(transport.request(TXN, b"{}", False, 10, endpoint=1))
    c = quiet(transport.request(TXN, b"{}", False, 10, endpoint=1))
    await wait_until(lambda: s1.requests == 1 and s2.requests == 2)
    c.cancel()  # then close() right after a cancel
    started = time.monotonic()
    first = transport.close()
    second = transport.close()
    assert not first.called and not second.called
    await first
    await second
    assert 0.25 <= time.monotonic() - started < 2.0
    for d in (a, b):
        assert d.called
    await sleep(0.01)
    assert sockets_of(transport) == [] and no_coord_timers() == []
    assert not s1.open and not s2.open
    third = transport.close()
    assert third.called


@pytest_twisted.ensureDeferred
async def test_cancel_after_timeout_then_close(silent_gateway, monkeypatch):  # noqa: F811
    monkeypatch.setattr(pool_module, "CLOSE_DRAIN_LIMIT", 0.2)
    url, server = silent_gateway
    transport = transport_for(url)
    d = transport.request(TXN, b"{}", False, 0.05)
    with pytest.raises(errors.Timeout):
        await d
    d.cancel()  # after the timeout: nothing
    (conn,) = transport._pools[0].all
    assert conn.draining is not None and not conn.closed
    started = time.monotonic()
    await transport.close()
    assert 0.15 <= time.monotonic() - started < 1.5  # CLOSE_DRAIN_LIMIT, not DRAIN_LIMIT
    assert conn.closed and conn.draining is None
    await sleep(0.01)
    assert sockets_of(transport) == [] and no_coord_timers() == []
    assert server.requests == 1


@pytest_twisted.ensureDeferred
async def test_drain_and_close_when_etcd_dies(etcd_factory, monkeypatch):
    monkeypatch.setattr(pool_module, "CLOSE_DRAIN_LIMIT", 5.0)
    server = etcd_factory()
    client = Client(reactor, server.url, max_connections=1)
    await fill(client, 50)
    server.pause()  # the txn's answer never comes while paused
    d = quiet(client.submit(READ_ALL, timeout=0.1))
    await sleep(0.2)
    assert d.called
    (conn,) = client._transport._pools[0].all
    assert conn.draining is not None
    closing = client.close()
    await sleep(0.05)
    assert not closing.called
    started = time.monotonic()
    server.kill()
    await closing  # the server's end of the connection ends the wait (not the 5 s)
    assert time.monotonic() - started < 3.0
    await sleep(0.01)
    assert sockets_of(client._transport) == [] and no_coord_timers() == []


# ============================================================================================
# treq: a dropped call must never be re-sent, and must not outlive close()
# ============================================================================================


@pytest.mark.parametrize("transport", ["pool", "treq"])
@pytest_twisted.ensureDeferred
async def test_a_dropped_read_only_txn_is_never_re_sent_after_a_no_leader_answer(
        scripted, transport):
    # The answer to the dropped call is "no leader": for a call still wanted this is
    # retried; a dropped one must be thrown away (docs: "a cancelled call is never re-sent").
    url, server = scripted(lambda n: ("answer", 0.1, http_answer(503, NO_LEADER)))
    client = make_client(url, transport)
    try:
        d = client.submit(READ_ALL, timeout=5)
        await wait_until(lambda: server.requests == 1, interval=0.005)
        d.cancel()
        with pytest.raises(defer.CancelledError):
            await d
        await sleep(0.8)
        assert server.requests == 1
    finally:
        await client.close()


@pytest.mark.parametrize("transport", ["pool", "treq"])
@pytest_twisted.ensureDeferred
async def test_a_dropped_read_only_txn_is_never_re_sent_to_another_endpoint(
        scripted, transport):
    # Endpoint 1 hangs up 0.1 s after the request came (say etcd died); the call was
    # already given up: nothing must reach endpoint 2.
    url1, s1 = scripted(lambda n: ("hangup", 0.1, None))
    url2, s2 = scripted(lambda n: ("answer", 0, http_answer(200)))
    client = make_client([url1, url2], transport)
    try:
        d = client.submit(READ_ALL, timeout=0.03)
        with pytest.raises(errors.Timeout):
            await d
        await sleep(0.4)
        assert s1.requests == 1
        assert s2.requests == 0
    finally:
        await client.close()


@pytest.mark.parametrize("transport", ["pool", "treq"])
@pytest_twisted.ensureDeferred
async def test_a_closing_client_re_sends_nothing(scripted, transport):
    url1, s1 = scripted(lambda n: ("hangup", 0.1, None))
    url2, s2 = scripted(lambda n: ("answer", 0, http_answer(200)))
    client = make_client([url1, url2], transport)
    d = quiet(client.submit(READ_ALL, timeout=5))
    await wait_until(lambda: s1.requests == 1, interval=0.005)
    await client.close()
    assert d.called
    await sleep(0.3)
    # the call dropped by close() was not re-sent elsewhere while the client closed
    assert s2.requests == 0
    assert not s1.open and not s2.open  # and left no connection open


@pytest_twisted.ensureDeferred
async def test_treq_drain_limit_closes_a_connection_whose_answer_stalls(scripted,
                                                                       monkeypatch):
    # The head and part of the body came, then nothing: after the drain limit the
    # connection must be closed (docs: "closed anyway if the answer has not come").
    monkeypatch.setattr(treq_module, "DRAIN_LIMIT", 0.2)
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{\"header\":")
    url, server = scripted(lambda n: ("partial", 0, head))
    client = make_client(url, "treq")
    try:
        with pytest.raises(errors.Timeout):
            await client.submit(READ_ALL, timeout=0.1)
        await wait_until(lambda: client._transport._draining == {}, timeout=3)
        await sleep(0.1)
        assert not server.open, "the stalled connection is still open after the drain limit"
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_treq_close_with_a_stalled_answer_leaves_no_connection(scripted, monkeypatch):
    monkeypatch.setattr(treq_module, "CLOSE_DRAIN_LIMIT", 0.2)
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{\"header\":")
    url, server = scripted(lambda n: ("partial", 0, head))
    client = make_client(url, "treq")
    d = quiet(client.submit(READ_ALL, timeout=5))
    await wait_until(lambda: server.requests == 1)
    await sleep(0.05)
    started = time.monotonic()
    await client.close()
    assert time.monotonic() - started < 2.0 and d.called
    assert client._transport._draining == {}
    await sleep(0.1)
    assert not server.open, "close() fired with the drained connection still open"


@pytest_twisted.ensureDeferred
async def test_treq_silent_gateway_drain_limit_and_close(silent_gateway,  # noqa: F811
                                                        monkeypatch):
    monkeypatch.setattr(treq_module, "DRAIN_LIMIT", 0.2)
    url, server = silent_gateway
    client = make_client(url, "treq")
    transport = client._transport
    for i in range(3):
        d = client.submit(READ_ALL)
        await wait_until(lambda i=i: server.requests == i + 1)
        d.cancel()
        d.cancel()
        with pytest.raises(defer.CancelledError):
            await d
        assert len(transport._draining) >= 1
    await wait_until(lambda: transport._draining == {}, timeout=3)
    assert server.requests == 3
    d = quiet(client.submit(READ_ALL, timeout=0.05))
    await sleep(0.1)
    assert d.called and len(transport._draining) == 1
    started = time.monotonic()
    await client.close()
    await client.close()
    assert time.monotonic() - started < 1.8
    assert transport._draining == {}
    assert transport._http._agent._pool._connections == {}


@pytest_twisted.ensureDeferred
async def test_treq_queued_and_repeated_drops_on_etcd(etcd):
    client = make_client(etcd.url, "treq")
    await fill(client, 100)
    transport = client._transport
    for i in range(20):
        d = quiet(client.submit(READ_ALL))
        await sleep(0.0005 * (i % 4))
        d.cancel()
    more = await defer.gatherResults([client.submit(READ_ALL, timeout=5) for _ in range(5)])
    assert all(len(r.responses[0].kvs) == 100 for r in more)
    await wait_until(lambda: transport._draining == {}, timeout=5)
    quiet(client.submit(READ_ALL))
    await client.close()
    assert transport._draining == {}
    assert transport._http._agent._pool._connections == {}


# ============================================================================================
# recipes that give up waiting, on a private etcd 3.5.1
# ============================================================================================


@pytest.mark.parametrize("transport", ["pool", "treq"])
@pytest_twisted.ensureDeferred
async def test_recipes_giving_up_never_crash_etcd(etcd_factory, transport):
    from coord.recipes import Election, Lock
    from coord.session import Session

    server = etcd_factory()
    client = make_client(server.url, transport, timeout=5)
    try:
        await fill(client, 200)
        a = await Session.create(client, ttl=10)
        b = await Session.create(client, ttl=10)
        holder = Lock(a, b"k/lock")
        await holder.acquire()
        leader = Election(a, b"k/el")
        await leader.campaign(b"L")
        for i in range(25):
            waiter = Lock(b, b"k/lock")
            with pytest.raises(errors.Timeout):
                await waiter.acquire(timeout=0.001 + 0.002 * (i % 5))
            el = Election(b, b"k/el")
            d = el.campaign(b"x")
            await task.deferLater(reactor, 0.001 * (i % 6), d.cancel)
            with pytest.raises(defer.CancelledError):
                await d
            assert server.died is None, server.crash_report()
        await sleep(0.3)
        assert server.died is None, server.crash_report()
        assert len((await client.submit(READ_ALL)).responses[0].kvs) >= 200
        await holder.release()
        await leader.resign()
        await a.close()
        await b.close()
    finally:
        await client.close()
