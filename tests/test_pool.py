"""The default transport (coord._twisted.pool): its sans-IO decisions as tables, and its
I/O against a real etcd -- or, where etcd cannot be made to answer so on demand, against a
scripted gateway socket that answers what a gateway answers (a "no leader" error, a gRPC
DEADLINE_EXCEEDED).  Also: Deadlines' one timer, the connection as its own parser (sans
I/O, with stubs), consecutive and split answers through a proxy that cuts etcd's bytes
into pieces, HTTP oddities, and cancelling calls in every state."""

from __future__ import annotations

import collections
import json
import socket
from urllib.parse import urlsplit

import pytest
import pytest_twisted
from helpers import (
    NO_LEADER_BODY,
    dead_url,
    hdr,
    one_kv,
    ours,
    range_body,
    sleep,
    sockets_of,
    transport_for,
    wait_until,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, protocol, reactor, task
from twisted.protocols import portforward

from coord import Client, KeySet, errors
from coord._failover import Plan
from coord._twisted.pool import (
    Deadlines,
    _Call,
    _Connection,
    parse_endpoint,
)
from coord._wire import codec
from coord.testing import Scripted, http_answer

# ============================================================================================
# Deadlines (one timer; re-entrant expiry)
# ============================================================================================


def call(path="/v3/kv/range"):
    return _Call(path, b"{}", False)


def test_deadlines_expire_in_order_with_one_timer():
    clock = task.Clock()
    expired = []
    deadlines = Deadlines(clock, lambda c, t: (expired.append((c, t)), c.fail(Exception())))
    a, b, c = call(), call(), call()
    for x in (a, b, c):
        x.deferred.addErrback(lambda f: None)
    deadlines.add(a, 1.0)
    clock.advance(0.5)
    deadlines.add(b, 1.0)
    deadlines.add(c, 0.2)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0.2)
    assert expired == [(c, 0.2)]
    clock.advance(0.3)
    assert expired == [(c, 0.2), (a, 1.0)]
    clock.advance(0.5)
    assert expired == [(c, 0.2), (a, 1.0), (b, 1.0)]
    assert clock.getDelayedCalls() == []


def test_deadlines_clear_during_expiry():
    clock = task.Clock()
    deadlines: Deadlines
    seen = []

    def expire(c, timeout):
        seen.append(c)
        deadlines.clear()  # e.g. a callback closes the client

    deadlines = Deadlines(clock, expire)
    a, b = call(), call()
    deadlines.add(a, 1.0)
    deadlines.add(b, 1.0)
    clock.advance(1.0)  # used to raise KeyError
    assert seen == [a]  # cleared: b is no longer timed
    assert clock.getDelayedCalls() == []


def test_deadlines_add_during_expiry():
    clock = task.Clock()
    deadlines: Deadlines
    later = call()
    seen = []

    def expire(c, timeout):
        seen.append(c)
        c.fail(Exception())
        if c is not later:
            deadlines.clear()
            deadlines.add(later, 1.0)  # same timeout, FIFO re-created under the loop

    deadlines = Deadlines(clock, expire)
    first = call()
    first.deferred.addErrback(lambda f: None)
    later.deferred.addErrback(lambda f: None)
    deadlines.add(first, 1.0)
    clock.advance(1.0)
    assert seen == [first]
    assert len(clock.getDelayedCalls()) == 1  # one timer, not two
    clock.advance(1.0)
    assert seen == [first, later]
    assert clock.getDelayedCalls() == []


def test_deadlines_add_other_timeout_during_expiry():
    clock = task.Clock()
    deadlines: Deadlines
    other = call()
    seen = []

    def expire(c, timeout):
        seen.append(c)
        c.fail(Exception())
        if c is not other:
            deadlines.add(other, 0.5)

    deadlines = Deadlines(clock, expire)
    first = call()
    for x in (first, other):
        x.deferred.addErrback(lambda f: None)
    deadlines.add(first, 1.0)
    clock.advance(1.0)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0.5)
    assert seen == [first, other]
    assert clock.getDelayedCalls() == []


# ============================================================================================
# Deadlines: every call expires once, never early, never late
# ============================================================================================

TIMEOUTS = [0.0, 0.0625, 0.125, 0.25, 0.5, 1.0, 2.0]  # exact in binary: no rounding


@given(st.lists(st.one_of(
    st.tuples(st.just("add"), st.sampled_from(TIMEOUTS)),
    st.tuples(st.just("advance"), st.sampled_from([0.0, 0.0625, 0.125, 0.375, 1.0])),
    st.tuples(st.just("answer"), st.integers(0, 100)),
), max_size=80))
@settings(max_examples=400, deadline=None)
def test_deadlines_expire_every_call_once_never_early_never_late(ops):
    clock = task.Clock()
    expired = []

    def expire(c, timeout):
        expired.append((c, timeout, clock.seconds()))
        c.fail(errors.Timeout("t"))

    deadlines = Deadlines(clock, expire)
    calls = []

    def check(moved):
        now = clock.seconds()
        live = [(c, dl) for c, dl, _ in calls if not c.done]
        if moved:
            assert not [c for c, dl in live if dl <= now]  # none overdue
        pending = clock.getDelayedCalls()
        assert len(pending) <= 1
        if live:
            assert deadlines._timer is not None and pending == [deadlines._timer]
            assert deadlines._timer.getTime() <= min(dl for _, dl in live)
        if deadlines._timer is not None:
            assert deadlines._timer_at == deadlines._timer.getTime()

    for op, arg in ops:
        if op == "add":
            c = _Call("/p", b"{}", False)
            c.deferred.addErrback(lambda f: None)
            deadlines.add(c, arg)
            calls.append((c, clock.seconds() + arg, arg))
        elif op == "advance":
            clock.advance(arg)
        elif calls:
            c = calls[arg % len(calls)][0]
            if not c.done:
                c.done = True  # answered (as call_answered does)
                c.deferred.callback(None)
        check(op == "advance")
    clock.advance(10.0)
    check(True)
    assert clock.getDelayedCalls() == []
    by_call = {id(c): (dl, t) for c, dl, t in calls}
    seen = [id(c) for c, _, _ in expired]
    assert len(seen) == len(set(seen))
    for c, timeout, at in expired:
        dl, t = by_call[id(c)]
        assert timeout == t and at >= dl


def test_deadlines_shorter_timeout_added_later():
    clock = task.Clock()
    out = []
    deadlines = Deadlines(clock, lambda c, t: (out.append((t, clock.seconds())),
                                               c.fail(Exception())))
    made = []

    def add(timeout):
        c = _Call("/p", b"{}", False)
        c.deferred.addErrback(lambda f: None)
        made.append(c)
        deadlines.add(c, timeout)
        return c

    add(2.0)  # due 2.0
    clock.advance(0.5)
    add(1.0)  # due 1.5: earlier, added later
    clock.advance(0.25)
    add(0.25)  # due 1.0: earlier still
    add(0.5)  # due 1.25
    assert len(clock.getDelayedCalls()) == 1
    assert deadlines._timer.getTime() == 1.0
    clock.advance(0.25)
    assert out == [(0.25, 1.0)]
    made[0].done = True  # the 2.0 one is answered
    add(0.125)  # at 1.0, due 1.125
    assert deadlines._timer.getTime() == 1.125
    for _ in range(4):
        clock.advance(0.125)
    assert out == [(0.25, 1.0), (0.125, 1.125), (0.5, 1.25), (1.0, 1.5)]
    clock.advance(1.0)
    assert len(out) == 4 and clock.getDelayedCalls() == []
    add(0.5)  # after everything: a fresh timer
    assert deadlines._timer.getTime() == clock.seconds() + 0.5
    clock.advance(0.5)
    assert len(out) == 5


@pytest_twisted.ensureDeferred
async def test_timeouts_fire_in_deadline_order_on_the_reactor(listen):
    gw = Scripted(["hold"])
    t = transport_for(listen(gw))
    order = []
    try:
        ds = []
        for timeout, write in ((0.7, False), (0.3, True), (0.5, False)):
            d = t.request("/v3/kv/range", b"{}", write, timeout)
            d.addErrback(lambda f, to=timeout: order.append((to, type(f.value))))
            ds.append(d)
        await wait_until(lambda: gw.requests == 3, timeout=2)
        await sleep(0.05)
        late = t.request("/v3/kv/range", b"{}", False, 0.1)  # shorter, added later
        late.addErrback(lambda f: order.append((0.1, type(f.value))))
        await defer.DeferredList([*ds, late])
        assert order == [(0.1, errors.Timeout), (0.3, errors.WriteTimeout),
                         (0.5, errors.Timeout), (0.7, errors.Timeout)]
    finally:
        await t.close()


# ============================================================================================
# _Connection as its own parser: body pieces in a reused list (sans I/O)
# ============================================================================================


class _StubReader:
    def remove(self, conn):
        pass


class _StubTransport:
    def __init__(self):
        self.reader = _StubReader()
        self.answers = []

    def call_answered(self, call, status, body):
        self.answers.append((call, status, body))


class _StubPool:
    def __init__(self, tls=False):
        self.transport = _StubTransport()
        self.endpoint = parse_endpoint("https://127.0.0.1:1" if tls else "http://127.0.0.1:1")
        self.ready = 0
        self.gone = 0
        self.queue = []

    def connection_ready(self, conn):
        self.ready += 1
        if self.queue:
            conn.call = self.queue.pop(0)  # as the real pool sends a waiting call

    def connection_gone(self, conn):
        self.gone += 1


class _FakeCall:
    conn = None




ANSWERS = [
    (200, range_body(b"big", b"B" * 5000), 7, True),
    (200, range_body(b"s", b"x"), None, False),
    (200, hdr() + b"}", 1, False),
    (400, b'{"error":"etcdserver: mvcc: required revision is a future revision",'
          b'"code":11,"message":"etcdserver: mvcc: required revision is a future revision"}',
     3, False),
    (200, b"", None, False),  # an empty body
    (200, b"", 5, True),
    (200, range_body(b"k", b""), None, True),
    (503, b"not json", 2, False),
    (200, range_body(b"last", b"L"), 1, False),
]


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 64, 100000])
def test_connection_consecutive_answers_never_bleed(piece):
    pool = _StubPool()
    conn = _Connection(pool)
    chunks = conn._chunks
    assert conn.on_body.__self__ is chunks  # the bound list.append itself
    stream = b"".join(http_answer(s, b, c, i) for s, b, c, i in ANSWERS)
    calls = [_FakeCall() for _ in ANSWERS]
    conn.call = calls[0]
    pool.queue = calls[1:]
    for i in range(0, len(stream), piece):
        conn.dataReceived(stream[i:i + piece])
    assert [(c, s, b) for c, s, b in pool.transport.answers] == \
        [(c, s, b) for c, (s, b, _, _) in zip(calls, ANSWERS, strict=True)]
    assert conn._chunks is chunks and chunks == []  # cleared, not replaced
    assert pool.ready == len(ANSWERS) and pool.gone == 0 and not conn.closed


def test_connection_answer_without_a_call_does_not_leak_into_the_next():
    pool = _StubPool()
    conn = _Connection(pool)
    conn.dataReceived(http_answer(200, b'{"stray":1}', 3))  # nobody asked
    conn.call = call = _FakeCall()
    conn.dataReceived(http_answer(200, b"{}"))
    assert pool.transport.answers == [(call, 200, b"{}")]


def test_connection_close_answer_aborts_after_handing_the_body():
    pool = _StubPool()
    conn = _Connection(pool)
    conn.call = call = _FakeCall()
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")
    assert pool.transport.answers == [(call, 200, b"{}")]
    assert conn.closed and pool.ready == 0 and pool.gone == 1


class _StubStream:
    def __init__(self):
        self.events = []

    def head(self, status):
        self.events.append(("head", status))

    def data(self, data):
        self.events.append(("data", data))

    def ended(self, exc):
        self.events.append(("ended", exc))


def test_stream_connection_hands_pieces_to_its_stream():
    pool = _StubPool()
    stream = _StubStream()
    conn = _Connection(pool, stream)
    assert conn.on_body.__func__ is _Connection.on_body
    lines = b'{"result":{"a":1}}\n{"result":{"b":2}}\n'
    raw = http_answer(200, lines, 5, interim=True)
    for i in range(len(raw)):
        conn.dataReceived(raw[i:i + 1])
    assert stream.events[0] == ("head", 200)
    assert b"".join(d for k, d in stream.events if k == "data") == lines
    assert stream.events[-1] == ("ended", None)
    assert conn._chunks == [] and pool.transport.answers == []


# ============================================================================================
# _Connection: a call's connection (heads=False) still hands each answer's own status over
# ============================================================================================


def test_call_connection_makes_no_head_call_a_stream_connection_does():
    pool = _StubPool()
    conn = _Connection(pool)
    heads = []
    conn.on_head = heads.append  # the hook _headers_complete would call
    conn.call = call = _FakeCall()
    conn.dataReceived(http_answer(404, b"{}", 1, interim=True))
    assert heads == [] and pool.transport.answers == [(call, 404, b"{}")]
    stream = _StubStream()
    sconn = _Connection(_StubPool(), stream)
    sconn.dataReceived(http_answer(503, b"{}", interim=True))
    assert stream.events[0] == ("head", 503) and stream.events[-1] == ("ended", None)


ODD_ANSWERS = [  # (bytes, status and body call_answered must get)
    (b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + http_answer(200, b'{"a":1}'),
     200, b'{"a":1}'),
    (b"HTTP/1.1 204 No Content\r\n\r\n", 204, b""),
    (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", 404, b""),
    (http_answer(503, NO_LEADER_BODY, 4, interim=True), 503, NO_LEADER_BODY),
    (http_answer(200, hdr() + b"}", 2), 200, hdr() + b"}"),
    (http_answer(429, b"{}"), 429, b"{}"),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 500 X\r\nConnection: close\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 500, b"{}"),
]


@pytest.mark.parametrize("piece", [1, 2, 5, 100000])
def test_call_connection_hands_each_answers_own_status(piece):
    pool = _StubPool()
    conn = _Connection(pool)
    calls = [_FakeCall() for _ in ODD_ANSWERS]
    conn.call = calls[0]
    pool.queue = calls[1:]
    stream = b"".join(raw for raw, _, _ in ODD_ANSWERS)
    for i in range(0, len(stream), piece):
        conn.dataReceived(stream[i:i + piece])
    assert pool.transport.answers == [(c, s, b) for c, (_, s, b)
                                      in zip(calls, ODD_ANSWERS, strict=True)]
    assert conn.closed and pool.gone == 1 and pool.ready == len(ODD_ANSWERS) - 1


@pytest_twisted.ensureDeferred
async def test_error_status_with_an_answer_shaped_body_fails_the_call(listen):
    # The body would parse as a fine answer: only the status tells it is not one.
    ok = range_body(b"k", b"v")
    gw = Scripted([http_answer(200, ok), http_answer(502, ok, 3, interim=True),
                   http_answer(500, hdr() + b"}", interim=True), http_answer(200, ok, 1)])
    t = transport_for(listen(gw), max_connections=1)
    try:
        r = await t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        assert r.kvs[0].value == b"v"
        with pytest.raises(errors.EtcdError, match="HTTP 502"):
            await t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        with pytest.raises(errors.CoordError, match="HTTP 500"):
            await t.request("/v3/kv/put", b"{}", True, 5, codec.put_response)
        r = await t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        assert r == codec.range_response(json.loads(ok))
        assert gw.connections == 1 and gw.requests == 4
    finally:
        await t.close()


# ============================================================================================
# A scripted gateway: answers every request with one fixed HTTP response (or holds it)
# ============================================================================================


class _Gateway(protocol.Protocol):
    def dataReceived(self, data):
        self.factory.requests += data.count(b"POST ")
        if self.factory.answer is None:
            return  # hold: never answer
        for _ in range(data.count(b"POST ")):
            self.transport.write(self.factory.answer)


class Gateway(protocol.Factory):
    protocol = _Gateway

    def __init__(self, status, body):
        self.requests = 0
        if status is None:
            self.answer = None
        else:
            raw = json.dumps(body).encode()
            self.answer = (b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (status, len(raw), raw))


@pytest.fixture
def gateway():
    ports = []

    def start(status, body=None):
        factory = Gateway(status, body)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(port)
        return f"http://127.0.0.1:{port.getHost().port}", factory

    yield start
    for port in ports:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


NO_LEADER = {"error": "etcdserver: no leader", "message": "etcdserver: no leader", "code": 14}


# ============================================================================================
# bugs: each test failed before its fix
# ============================================================================================


@pytest_twisted.ensureDeferred
async def test_queued_call_is_sent_when_a_busy_connection_drops(etcd):
    client = Client(reactor, etcd.url, max_connections=1)
    try:
        await client.get(b"warm")
        first = client.get(b"k")  # on the only connection
        second = client.get(b"k", timeout=3)  # waits for it
        first.cancel()  # drops that connection: a new one must carry the waiting call
        with pytest.raises(defer.CancelledError):
            await first
        assert (await second).kvs == []
    finally:
        await client.close()


def test_exhausted_plan_fails_the_call():
    transport = transport_for(dead_url(), dead_url())
    c = _Call("/v3/kv/range", b"{}", False)
    c.plan = Plan(0, 2, False)
    while c.plan.next_index() is not None:
        pass
    transport._dispatch(c)
    assert c.deferred.called
    failure = []
    c.deferred.addErrback(failure.append)
    exc = failure[0].value
    assert type(exc) is errors.Unavailable
    for ep in transport.endpoints:
        assert ep.url in str(exc)


@pytest_twisted.ensureDeferred
async def test_all_endpoints_down_names_every_endpoint():
    urls = [dead_url(), dead_url()]
    client = Client(reactor, urls)
    try:
        for d in (client.get(b"k"), client.set(b"k", b"v")):
            with pytest.raises(errors.Unavailable) as info:
                await d
            assert not isinstance(info.value, errors.OutcomeUnknown)
            for url in urls:
                assert url in str(info.value)
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_close_while_connecting_leaves_nothing(etcd):
    client = Client(reactor, etcd.url)
    d = client.get(b"k")  # its connection is still being made
    await client.close()
    with pytest.raises(errors.Unavailable, match="client closed"):
        await d
    await sleep(0.2)
    assert sockets_of(client._transport) == []
    assert [dc for dc in reactor.getDelayedCalls() if ours(dc)] == []
    # after close: fail at once
    d = client.get(b"k")
    assert d.called
    with pytest.raises(errors.Unavailable, match="client closed"):
        await d
    ended = []
    client._transport.stream("/v3/watch", b"{}", lambda m: None, ended.append)
    assert len(ended) == 1 and isinstance(ended[0], errors.Unavailable)
    await sleep(0.1)
    assert sockets_of(client._transport) == []


@pytest_twisted.ensureDeferred
async def test_close_with_calls_and_idle_connections_leaves_nothing(etcd):
    client = Client(reactor, etcd.url, timeout=5)
    await defer.gatherResults([client.get(b"k") for _ in range(8)])
    pending = [client.get(b"k") for _ in range(4)]
    await client.close()
    for d in pending:
        with pytest.raises(errors.Unavailable):
            await d
    await sleep(0.2)
    assert sockets_of(client._transport) == []
    assert [dc for dc in reactor.getDelayedCalls() if ours(dc)] == []


@pytest_twisted.ensureDeferred
async def test_close_cancels_the_no_leader_pause(gateway, monkeypatch):
    monkeypatch.setattr(Plan, "UNAVAILABLE_PAUSES", (0.5,) * 4)
    url, server = gateway(503, NO_LEADER)
    transport = transport_for(url)
    d = transport.request("/v3/kv/put", b"{}", True, 10)
    await wait_until(lambda: server.requests == 1)
    await sleep(0.05)  # the answer came: the pause timer is set
    await transport.close()
    with pytest.raises(errors.Unavailable, match="client closed"):
        await d
    await sleep(0.01)  # the aborted connection's connectionLost (a 0 s call) runs
    assert [dc for dc in reactor.getDelayedCalls() if ours(dc)] == []
    await sleep(0.7)
    assert server.requests == 1  # never re-sent


@pytest_twisted.ensureDeferred
async def test_exhausted_no_leader_is_unavailable_not_unknown(gateway, monkeypatch):
    monkeypatch.setattr(Plan, "UNAVAILABLE_PAUSES", (0.01, 0.01))
    url, server = gateway(503, NO_LEADER)
    transport = transport_for(url)
    try:
        with pytest.raises(errors.EtcdUnavailable) as info:
            await transport.request("/v3/kv/put", b"{}", True, 10)
        assert not isinstance(info.value, errors.OutcomeUnknown)
        assert server.requests == 3
    finally:
        await transport.close()


@pytest.mark.parametrize(("status", "code"), [(408, 1), (504, 4)])
@pytest_twisted.ensureDeferred
async def test_cancelled_or_deadline_exceeded_write_is_outcome_unknown(gateway, status, code):
    body = {"error": "context deadline exceeded", "message": "context deadline exceeded",
            "code": code}
    url, server = gateway(status, body)
    transport = transport_for(url)
    try:
        with pytest.raises(errors.OutcomeUnknown):
            await transport.request("/v3/kv/put", b"{}", True, 10)
        assert server.requests == 1  # not re-sent
    finally:
        await transport.close()


@pytest_twisted.ensureDeferred
async def test_write_that_failed_to_send_goes_to_the_next_endpoint(etcd):
    client = Client(reactor, [etcd.url, etcd.url])  # twice: two endpoints, one server
    try:
        await client.set(b"k", b"1")
        (conn,) = client._transport._pools[0].idle
        conn.transport.socket.shutdown(socket.SHUT_WR)  # send() now fails with EPIPE
        # Nothing left this host: the write was not sent, and may go elsewhere.
        assert (await client.set(b"k", b"2")).revision > 0
        assert (await client.get(b"k")).kvs[0].value == b"2"
    finally:
        await client.close()


# ============================================================================================
# pinned requests (member-specific maintenance)
# ============================================================================================


@pytest_twisted.ensureDeferred
async def test_pinned_request_goes_to_that_member(etcd_cluster):
    client = Client(reactor, etcd_cluster.urls)
    transport = client._transport
    try:
        ids = []
        for i in range(len(etcd_cluster.urls)):
            status = await transport.request("/v3/maintenance/status", b"{}", False, 5,
                                             codec.status_response, endpoint=i)
            ids.append(status.header.member_id)
        assert len(set(ids)) == len(ids)
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_pinned_request_does_not_fail_over(etcd):
    dead = dead_url()
    client = Client(reactor, [etcd.url, dead])
    try:
        with pytest.raises(errors.Unavailable) as info:
            await client._transport.request("/v3/maintenance/status", b"{}", False, 5,
                                            endpoint=1)
        assert dead in str(info.value)
        assert etcd.url not in str(info.value)
        status = await client._transport.request("/v3/maintenance/status", b"{}", False, 5,
                                                 endpoint=0)
        assert status["version"]
        with pytest.raises(errors.InvalidArgument):
            client._transport.request("/v3/maintenance/status", b"{}", False, 5, endpoint=2)
    finally:
        await client.close()




@pytest_twisted.ensureDeferred
async def test_reader_serves_many_connections_and_hands_eof_back(etcd_factory):
    server = etcd_factory()
    client = Client(reactor, server.url, timeout=5)
    reader = client._transport.reader
    try:
        await client.set(b"k", b"v")
        results = await defer.gatherResults([client.get(b"k") for _ in range(32)])
        assert all(r.kvs[0].value == b"v" for r in results)
        pool = client._transport._pools[0]
        if reader.enabled:
            # every pooled connection is read by the reader, not by its own reactor event
            assert {conn.fd for conn in pool.all} == set(reader._conns)
            assert reader in reactor.getReaders()
            assert not any(conn.transport in reactor.getReaders() for conn in pool.all)
        server.kill()  # every idle connection reaches its end: Twisted closes them
        await wait_until(lambda: not pool.all, timeout=5)
        assert reader._conns == {}
    finally:
        await client.close()
    assert reader not in reactor.getReaders()


# ============================================================================================
# a proxy that splits etcd's bytes
# ============================================================================================



class _SplitClient(portforward.ProxyClient):
    """etcd -> client bytes in pieces of ``factory.piece`` bytes, one piece per turn."""

    def connectionMade(self):
        self.queue = collections.deque()
        self.pumping = False
        super().connectionMade()

    def dataReceived(self, data):
        n = self.peer.factory.piece
        self.queue.extend(data[i:i + n] for i in range(0, len(data), n))
        if not self.pumping:
            self.pumping = True
            reactor.callLater(0, self.pump)

    def pump(self):
        if not self.queue or self.peer is None:
            self.pumping = False
            return
        self.peer.transport.write(self.queue.popleft())
        self.peer.factory.pieces += 1
        reactor.callLater(0, self.pump)


class _SplitClientFactory(portforward.ProxyClientFactory):
    protocol = _SplitClient
    noisy = False


class _SplitServer(portforward.ProxyServer):
    clientProtocolFactory = _SplitClientFactory

    def connectionMade(self):
        self.factory.accepted += 1
        super().connectionMade()


class SplitProxy(portforward.ProxyFactory):
    protocol = _SplitServer
    noisy = False

    def __init__(self, host, port, piece):
        super().__init__(host, port)
        self.piece = piece
        self.pieces = 0
        self.accepted = 0


@pytest.fixture
def split_proxy(etcd, listen):
    def start(piece):
        parts = urlsplit(etcd.url)
        factory = SplitProxy(parts.hostname, parts.port, piece)
        return listen(factory), factory

    return start




# ============================================================================================
# consecutive answers on one kept-alive connection, against etcd
# ============================================================================================


async def mixed_sequence(client):
    big = bytes(range(256)) * 64
    await client.set(b"t/big", big)
    await client.set(b"t/small", b"s")
    await client.set(b"t/empty", b"")
    everything = KeySet(b"t/", prefix=True)
    for _ in range(2):
        r = await client.get(b"t/big")
        assert [(kv.key, kv.value) for kv in r.kvs] == [(b"t/big", big)] and r.count == 1
        r = await client.get(b"t/small")
        assert [(kv.key, kv.value) for kv in r.kvs] == [(b"t/small", b"s")]
        r = await client.get(b"t/missing")
        assert r.kvs == [] and r.count == 0 and r.more is False
        r = await client.get(b"t/empty")
        assert [(kv.key, kv.value) for kv in r.kvs] == [(b"t/empty", b"")]
        with pytest.raises(errors.EtcdError):
            await client.get(b"t/small", revision=10**9)  # an error answer in between
        r = await client.get(everything, keys_only=True)
        assert [kv.key for kv in r.kvs] == [b"t/big", b"t/empty", b"t/small"]
        assert all(kv.value == b"" for kv in r.kvs)
        r = await client.get(everything, count_only=True)
        assert r.kvs == [] and r.count == 3
        r = await client.get(everything, limit=1)
        assert [kv.key for kv in r.kvs] == [b"t/big"] and r.more is True and r.count == 3
        r = await client.get(b"t/small")
        assert r.kvs[0].value == b"s"
    rev = await client.set(b"t/small", b"t")
    r = await client.get(b"t/small")
    assert r.kvs[0].value == b"t" and r.kvs[0].mod_revision == rev.revision
    assert r.header.revision == rev.revision and r.kvs[0].version == 2


@pytest_twisted.ensureDeferred
async def test_consecutive_answers_do_not_bleed(etcd, new_client):
    client = new_client(etcd.url)
    await mixed_sequence(client)


@pytest_twisted.ensureDeferred
async def test_consecutive_answers_on_one_pooled_connection(etcd):
    client = Client(reactor, etcd.url, max_connections=1, timeout=10)
    try:
        await client.get(b"warm")
        pool = client._transport._pools[0]
        (conn,) = pool.all
        chunks = conn._chunks
        await mixed_sequence(client)
        assert pool.all == {conn} and conn._chunks is chunks and chunks == []
    finally:
        await client.close()


@pytest.mark.parametrize("piece", [1, 3, 1000])
@pytest_twisted.ensureDeferred
async def test_answers_split_in_many_pieces(split_proxy, piece):
    url, proxy = split_proxy(piece)
    client = Client(reactor, url, max_connections=1, timeout=20)
    try:
        big = b"v" * (3000 if piece < 10 else 60000)
        await client.set(b"big", big)
        await client.set(b"small", b"s")
        for _ in range(2):
            assert (await client.get(b"big")).kvs[0].value == big
            assert (await client.get(b"small")).kvs[0].value == b"s"
            assert (await client.get(b"none")).kvs == []
        assert proxy.accepted == 1  # all on one kept-alive connection
        assert proxy.pieces > 7
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_concurrent_answers_reach_their_own_calls(etcd):
    client = Client(reactor, etcd.url, max_connections=3, timeout=10)
    try:
        values = {b"k%03d" % i: b"%d" % i * (1 + (i * 37) % 500) for i in range(60)}
        await defer.gatherResults([client.set(k, v) for k, v in values.items()])
        keys = list(values) * 3
        results = await defer.gatherResults([client.get(k) for k in keys])
        for k, r in zip(keys, results, strict=True):
            assert [(kv.key, kv.value) for kv in r.kvs] == [(k, values[k])]
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_watch_through_a_splitting_proxy(split_proxy, etcd):
    url, _ = split_proxy(2)
    watching = Client(reactor, url, timeout=10)
    writer = Client(reactor, etcd.url, timeout=10)
    seen = []
    try:
        d = watching.watch(KeySet(b"w/", prefix=True), seen.append)
        await d.watcher.ready
        await writer.set(b"w/a", b"1" * 500)
        await writer.set(b"w/b", b"2")
        await writer.delete(b"w/a")
        await wait_until(lambda: len(seen) == 3)
        assert [(e.kv.key, e.kv.value) for e in seen] == \
            [(b"w/a", b"1" * 500), (b"w/b", b"2"), (b"w/a", b"")]
        d.cancel()
        await d
    finally:
        await watching.close()
        await writer.close()


# ============================================================================================
# HTTP oddities from a scripted gateway
# ============================================================================================


@pytest_twisted.ensureDeferred
async def test_chunked_interim_and_plain_answers_on_one_connection(listen):
    a = range_body(b"a", b"A" * 100)
    b = range_body(b"b", b"B")
    gw = Scripted([http_answer(200, a, 1, interim=True), http_answer(200, b),
                   http_answer(200, hdr() + b"}", 2), http_answer(200, b'{"header":{}}')])
    t = transport_for(listen(gw), max_connections=1)
    try:
        ra = await t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        rb = await t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        rc = await t.request("/v3/kv/put", b"{}", True, 5, codec.put_response)
        rd = await t.request("/v3/kv/range", b"{}", False, 5)
        assert ra == codec.range_response(json.loads(a))
        assert rb == codec.range_response(json.loads(b))
        assert rc.revision == 5 and rc.previous is None
        assert rd == {"header": {}}
        assert gw.connections == 1
    finally:
        await t.close()


@pytest_twisted.ensureDeferred
async def test_undecodable_200_fails_only_its_own_call(listen):
    ok = range_body(b"k", b"v")
    gw = Scripted([http_answer(200, b"<html>"), http_answer(200, one_kv(b'"key":"Zg="')),
                   http_answer(200, ok)])
    t = transport_for(listen(gw), max_connections=1)
    try:
        with pytest.raises(errors.MalformedAnswer):
            await t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        with pytest.raises(ValueError):  # binascii.Error, as from the JSON path
            await t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        r = await t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        assert r.kvs[0].value == b"v"
        assert gw.connections == 1
    finally:
        await t.close()


@pytest_twisted.ensureDeferred
async def test_bad_http_read_goes_to_the_next_endpoint(listen, etcd):
    gw = Scripted([b"NOT HTTP AT ALL\r\n\r\n"])
    url = listen(gw)
    t = transport_for(url, etcd.url)
    try:
        r = await t.request("/v3/kv/range", b'{"key":"Zm9v"}', False, 5, codec.range_response)
        assert r.kvs == [] and r.header.revision > 0
        assert gw.requests == 1 and t.preferred.url == etcd.url
    finally:
        await t.close()
    t = transport_for(url, etcd.url)
    try:
        with pytest.raises(errors.OutcomeUnknown):  # a write that was sent: not re-sent
            await t.request("/v3/kv/put", b'{"key":"Zm9v"}', True, 5)
        assert gw.requests == 2
    finally:
        await t.close()


@pytest_twisted.ensureDeferred
async def test_deeply_nested_error_body_fails_the_call_promptly(listen):
    deep = b"[" * 5000 + b"]" * 5000
    gw = Scripted([http_answer(500, deep)])
    t = transport_for(listen(gw))
    try:
        with pytest.raises(errors.CoordError) as info:
            await t.request("/v3/kv/range", b"{}", False, 0.5)
        assert not isinstance(info.value, errors.Timeout)
    finally:
        await t.close()


# ============================================================================================
# cancelling a call
# ============================================================================================


@pytest_twisted.ensureDeferred
async def test_cancel_in_flight_call_next_call_gets_its_own_answer(listen):
    a, b = range_body(b"a", b"A"), range_body(b"b", b"B")
    gw = Scripted(["hold", http_answer(200, b)])
    t = transport_for(listen(gw), max_connections=1)
    try:
        d1 = t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        d2 = t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        await wait_until(lambda: gw.held)
        d1.cancel()
        gw.release(http_answer(200, a))  # too late: that connection was dropped
        with pytest.raises(defer.CancelledError):
            await d1
        assert (await d2).kvs[0].value == b"B"
        assert gw.requests == 2 and gw.connections == 2
    finally:
        await t.close()


@pytest_twisted.ensureDeferred
async def test_cancel_queued_call_keeps_the_connection(listen):
    a, c = range_body(b"a", b"A"), range_body(b"c", b"C")
    gw = Scripted(["hold", http_answer(200, c)])
    t = transport_for(listen(gw), max_connections=1)
    try:
        d1 = t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        d2 = t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        d3 = t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        await wait_until(lambda: gw.held)
        d2.cancel()
        with pytest.raises(defer.CancelledError):
            await d2
        gw.release(http_answer(200, a, 2))
        assert (await d1).kvs[0].value == b"A"
        assert (await d3).kvs[0].value == b"C"
        assert gw.requests == 2 and gw.connections == 1
    finally:
        await t.close()


@pytest_twisted.ensureDeferred
async def test_cancel_in_the_callback_of_the_previous_answer(listen):
    a, b = range_body(b"a", b"A"), range_body(b"b", b"B")
    gw = Scripted([http_answer(200, a), http_answer(200, b)])
    t = transport_for(listen(gw), max_connections=1)
    try:
        await t.request("/v3/kv/range", b"{}", False, 5)  # a connection
        gw.script = [http_answer(200, a), http_answer(200, b)]
        d1 = t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        d2 = t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        # d2 goes out on the connection as d1's answer is handed over: cancel it then
        d1.addCallback(lambda r: (d2.cancel(), r)[1])
        assert (await d1).kvs[0].value == b"A"
        with pytest.raises(defer.CancelledError):
            await d2
        await sleep(0.05)  # d2's request (if it got there) is answered into the void
        gw.script = [http_answer(200, range_body(b"c", b"C"))]
        d3 = t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        assert (await d3).kvs[0].value == b"C"
    finally:
        await t.close()


# ============================================================================================
# a server that closes each connection as soon as it has answered
# ============================================================================================


class _ClosingServer(portforward.ProxyServer):
    """To etcd, and back; once a whole answer is back (Content-Length), the client's
    connection is closed: a keep-alive connection a server (or a proxy with a tiny
    idle timeout) closes at once, answer and FIN in one write."""

    def connectionMade(self):
        self.answer = b""
        super().connectionMade()


class _ClosingClient(portforward.ProxyClient):
    def dataReceived(self, data):
        server = self.peer
        server.answer += data
        head, sep, body = server.answer.partition(b"\r\n\r\n")
        length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:")]
        server.transport.write(data)
        if sep and length and len(body) >= length[0]:
            server.transport.loseConnection()  # after the answer: one write, then FIN


class _ClosingClientFactory(portforward.ProxyClientFactory):
    protocol = _ClosingClient


@pytest_twisted.ensureDeferred
async def test_a_write_right_after_the_server_closed_an_idle_connection_is_not_lost(etcd):
    """The server closes each connection right after its answer.  A write sent in the
    same reactor turn as that answer (the FIN unread yet) must not go on the closed
    connection: there it would fail after being sent, with an unknown outcome.  Every
    reused connection is peeked at first, however short its idle time."""
    parts = urlsplit(etcd.url)
    factory = portforward.ProxyFactory(parts.hostname, parts.port)
    factory.protocol = _ClosingServer
    _ClosingServer.clientProtocolFactory = _ClosingClientFactory
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = Client(reactor, f"http://127.0.0.1:{port.getHost().port}", timeout=5)
    try:
        for i in range(10):
            await client.get(b"k")
            await client.set(b"k", b"v%d" % i)  # at once: the same turn as the answer
        assert (await client.get(b"k")).kvs[0].value == b"v9"
    finally:
        await client.close()
        await port.stopListening()
