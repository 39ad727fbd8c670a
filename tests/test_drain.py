"""A read-only transaction given up before its answer came keeps its connection until the
answer comes (coord._twisted.pool.drains): closing the connection would cancel the
transaction inside etcd, and etcd 3.5.0-3.5.4 then panic ("unexpected error during txn",
etcd issue 14110).  On etcd 3.5.1 the first test crashed the server within 10 to 54
dropped transactions before the fix, for either transport and each way of giving up.

Then what counts as read-only (nested transactions), the pool's connection accounting
around a drain, close() in every state, a dropped call never re-sent (both transports),
and recipes giving up -- on real etcds and on coord.testing's PathGateway.
"""

from __future__ import annotations

import itertools
import json
import random
import time

import pytest
import pytest_twisted
from helpers import (
    make_client,
    no_coord_timers,
    ours,
    sleep,
    sockets_of,
    transport_for,
    wait_until,
)
from twisted.internet import defer, reactor, task

from coord import Client, KeySet, OpDel, OpGet, OpSet, Transaction, errors
from coord._twisted import pool as pool_module
from coord._twisted import treq as treq_module
from coord.client import _txn_writes
from coord.testing import HOLD, hangup, raw

READ_ALL = Transaction(compare=[], success=[OpGet(KeySet(b"k/", prefix=True))], failure=[])


async def fill(client, n=300):
    """Keys for the transaction to read: etcd checks for cancellation per key found."""
    await defer.gatherResults([client.set(b"k/%04d" % i, b"x" * 100) for i in range(n)])


def quiet(d):
    d.addErrback(lambda f: None)
    return d


TXN = "/v3/kv/txn"
NO_LEADER = {"error": "etcdserver: no leader", "message": "etcdserver: no leader", "code": 14}


def reply(status=200, body=None, close=False):
    """The bytes of a gateway's answer (a 200 one with the header every etcd answer has:
    coord refuses one without)."""
    body = {} if body is None else body
    if status == 200:
        body = {"header": {}, **body}
    raw_body = json.dumps(body).encode()
    extra = b"Connection: close\r\n" if close else b""
    return (b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n"
            b"\r\n%s" % (status, extra, len(raw_body), raw_body))


def nth(script):
    """A coord.testing.PathGateway script from ``script(n)``, called with the request's
    number (0-based, over all connections) rather than its path."""
    count = itertools.count()
    return lambda path: script(next(count))


@pytest.fixture
def silent_gateway(path_gateway):
    """A gateway that reads every request and never answers: (url, its PathGateway)."""
    return path_gateway(lambda path: HOLD)


@pytest_twisted.ensureDeferred
async def test_dropped_read_only_txns_do_not_crash_etcd(etcd_factory, new_client):
    server = etcd_factory()
    client = new_client(server.url)
    await fill(client)
    rng = random.Random(14110)
    for _ in range(120):  # cancelled while etcd runs it, or before, or after
        d = quiet(client.submit(READ_ALL))
        await task.deferLater(reactor, rng.random() * 0.004, d.cancel)
    for _ in range(120):  # timed out
        quiet(client.submit(READ_ALL, timeout=0.0005 + rng.random() * 0.004))
        await sleep(0.005)
    for _ in range(60):  # cut short by close()
        other = new_client(server.url)
        quiet(other.submit(READ_ALL))
        await sleep(rng.random() * 0.004)
        await other.close()
    await sleep(0.3)
    assert server.died is None, server.crash_report()
    assert len((await client.submit(READ_ALL)).responses[0].kvs) == 300


@pytest_twisted.ensureDeferred
async def test_read_only_txns_timed_out_on_a_paused_etcd_do_not_crash_it(etcd_factory,
                                                                         new_client):
    # etcd runs the requests it received while stopped once it continues: a request whose
    # connection was closed meanwhile runs cancelled.
    server = etcd_factory()
    client = new_client(server.url, timeout=5)
    await fill(client, 50)
    for _ in range(3):
        server.pause()
        calls = [client.submit(READ_ALL, timeout=0.2) for _ in range(8)]
        for d in calls:
            with pytest.raises(errors.Timeout):
                await d
        server.resume()
        await sleep(0.3)
        assert server.died is None, server.crash_report()
    assert len((await client.submit(READ_ALL)).responses[0].kvs) == 50


@pytest_twisted.ensureDeferred
async def test_a_drained_connection_serves_the_next_call(etcd):
    client = Client(reactor, etcd.url, max_connections=1)
    try:
        await fill(client, 50)
        pool = client._transport._pools[0]
        (conn,) = pool.idle
        d = client.submit(READ_ALL)
        assert conn.call is not None  # written: its answer is owed on this connection
        d.cancel()
        with pytest.raises(defer.CancelledError):
            await d  # at once: the caller does not wait for the drain
        assert conn.draining is not None and not conn.closed
        await wait_until(lambda: conn.draining is None, timeout=5)
        assert pool.idle == [conn] and pool.all == {conn}
        assert (await client.get(b"k/0000")).kvs[0].value == b"x" * 100
        assert pool.all == {conn}  # no new connection was needed
    finally:
        await client.close()


@pytest.mark.parametrize("call", ["put", "range", "write txn"])
@pytest_twisted.ensureDeferred
async def test_other_cancelled_calls_still_close_their_connection(etcd, pool_client, call):
    await pool_client.get(b"warm")
    pool = pool_client._transport._pools[0]
    (conn,) = pool.idle
    d = {"put": lambda: pool_client.set(b"k", b"v"),
         "range": lambda: pool_client.get(b"k"),
         "write txn": lambda: pool_client.submit(Transaction(
             compare=[], success=[OpSet(b"k", b"v")], failure=[]))}[call]()
    assert conn.call is not None
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    assert conn.closed and conn.draining is None and conn not in pool.all


@pytest_twisted.ensureDeferred
async def test_an_answer_that_never_comes_ends_the_drain_after_the_limit(silent_gateway,
                                                                          monkeypatch):
    monkeypatch.setattr(pool_module, "DRAIN_LIMIT", 0.3)
    url, server = silent_gateway
    transport = transport_for(url)
    try:
        started = time.monotonic()
        with pytest.raises(errors.Timeout):
            await transport.request("/v3/kv/txn", b"{}", False, 0.1)
        (conn,) = transport._pools[0].all  # kept: the answer may still come
        assert conn.draining is not None and not conn.closed
        await wait_until(lambda: conn.closed, timeout=5, interval=0.01)
        assert 0.3 <= time.monotonic() - started < 2.0
        assert len(server.requests) == 1  # never re-sent
        await sleep(0.01)  # the aborted connection's connectionLost runs
        assert not transport._pools[0].all and sockets_of(transport) == []
        assert [dc for dc in reactor.getDelayedCalls() if ours(dc)] == []
    finally:
        await transport.close()


@pytest_twisted.ensureDeferred
async def test_close_waits_for_a_drain_at_most_the_close_limit(silent_gateway, monkeypatch):
    monkeypatch.setattr(pool_module, "CLOSE_DRAIN_LIMIT", 0.3)
    url, server = silent_gateway
    transport = transport_for(url)
    d = transport.request("/v3/kv/txn", b"{}", False, 10)
    await wait_until(lambda: len(server.requests) == 1)
    started = time.monotonic()
    await transport.close()
    assert 0.25 <= time.monotonic() - started < 2.0
    with pytest.raises(errors.Unavailable, match="client closed"):
        await d
    assert sockets_of(transport) == []
    assert [dc for dc in reactor.getDelayedCalls() if ours(dc)] == []


@pytest_twisted.ensureDeferred
async def test_close_ends_once_the_drained_answer_came(etcd, pool_client):
    await fill(pool_client, 50)
    transport = pool_client._transport
    d = pool_client.submit(READ_ALL)
    started = time.monotonic()
    await pool_client.close()
    assert time.monotonic() - started < 0.9  # the answer came; not the 1 s limit
    with pytest.raises(errors.Unavailable, match="client closed"):
        await d
    assert sockets_of(transport) == []
    assert [dc for dc in reactor.getDelayedCalls() if ours(dc)] == []


@pytest_twisted.ensureDeferred
async def test_treq_close_with_a_drained_txn_leaves_no_connection(etcd):
    client = make_client(etcd.url, "treq")
    await fill(client, 50)
    d = quiet(client.submit(READ_ALL))
    await sleep(0.001)
    await client.close()
    assert d.called
    agent_pool = client._transport._http._agent._pool
    assert agent_pool._connections == {}
    assert client._transport._draining == {}


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
        path_gateway, monkeypatch):
    monkeypatch.setattr(pool_module, "DRAIN_LIMIT", 0.3)
    # The first request (the dropped txn) is never answered; the others are, at once.
    url, server = path_gateway(nth(lambda n: HOLD if n == 0
                                               else raw(reply(200, {"n": n}))))
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
        assert server.connections == 2 and len(server.requests) == 2
    finally:
        await transport.close()
    await sleep(0.01)
    assert sockets_of(transport) == [] and no_coord_timers() == []


@pytest.mark.parametrize("answer, reused", [
    (reply(500, {"error": "boom", "message": "boom", "code": 13}), True),
    (reply(503, NO_LEADER), True),
    (reply(200, {}, close=True), False),
    (reply(500, {"message": "x", "code": 13}, close=True), False),
], ids=["500", "no-leader", "200-connection-close", "500-connection-close"])
@pytest_twisted.ensureDeferred
async def test_drained_answer_kinds(path_gateway, answer, reused):
    url, server = path_gateway(nth(lambda n: raw(answer, 0.15) if n == 0
                                               else raw(reply(200, {"n": n}))))
    transport = transport_for(url, max_connections=1)
    try:
        d = transport.request(TXN, b"{}", False, 5)
        await wait_until(lambda: len(server.requests) == 1)
        d.cancel()
        with pytest.raises(defer.CancelledError):
            await d
        pool = transport._pools[0]
        (conn,) = pool.all
        nxt = transport.request("/v3/kv/range", b"{}", False, 3)
        assert await nxt == {"header": {}, "n": 1}
        await sleep(0.3)  # a no-leader answer to the dropped call must not re-send it
        assert len(server.requests) == 2
        assert (conn in pool.all and not conn.closed) is reused
        assert server.connections == (1 if reused else 2)
    finally:
        await transport.close()
    await sleep(0.01)
    assert sockets_of(transport) == [] and no_coord_timers() == []


@pytest_twisted.ensureDeferred
async def test_drain_ended_by_the_server_hanging_up_frees_the_pool(path_gateway):
    url, server = path_gateway(nth(lambda n: hangup(0.1) if n == 0
                                               else raw(reply(200, {"n": n}))))
    transport = transport_for(url, max_connections=1)
    try:
        d = transport.request(TXN, b"{}", False, 0.02)
        with pytest.raises(errors.Timeout):
            await d
        (conn,) = transport._pools[0].all
        queued = transport.request("/v3/kv/range", b"{}", False, 3)
        assert await queued == {"header": {}, "n": 1}
        assert conn.closed and conn.draining is None
        assert len(server.requests) == 2  # the dropped txn was not re-sent
    finally:
        await transport.close()
    await sleep(0.01)
    assert sockets_of(transport) == [] and no_coord_timers() == []


@pytest_twisted.ensureDeferred
async def test_pool_drain_limit_closes_a_connection_whose_answer_stalls(path_gateway, monkeypatch):
    # The counterpart of the treq test below: coord's pool aborts the connection.
    monkeypatch.setattr(pool_module, "DRAIN_LIMIT", 0.2)
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{\"header\":")
    url, server = path_gateway(nth(lambda n: raw(head) if n == 0
                                               else raw(reply(200, {"n": n}))))
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
async def test_close_twice_while_draining_on_several_endpoints(path_gateway, monkeypatch):
    monkeypatch.setattr(pool_module, "CLOSE_DRAIN_LIMIT", 0.3)
    url1, s1 = path_gateway(lambda path: HOLD)
    url2, s2 = path_gateway(lambda path: raw(reply(200), 0.1))
    transport = transport_for(url1, url2)
    a = quiet(transport.request(TXN, b"{}", False, 10))
    b = quiet(transport.request(TXN, b"{}", False, 10, endpoint=1))
    c = quiet(transport.request(TXN, b"{}", False, 10, endpoint=1))
    await wait_until(lambda: len(s1.requests) == 1 and len(s2.requests) == 2)
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
async def test_cancel_after_timeout_then_close(silent_gateway, monkeypatch):
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
    assert len(server.requests) == 1


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



@pytest.mark.parametrize("transport", ["pool", "treq"])
@pytest_twisted.ensureDeferred
async def test_a_dropped_read_only_txn_is_never_re_sent_after_a_no_leader_answer(
        path_gateway, transport):
    # The answer to the dropped call is "no leader": for a call still wanted this is
    # retried; a dropped one must be thrown away (docs: "a cancelled call is never re-sent").
    url, server = path_gateway(lambda path: raw(reply(503, NO_LEADER), 0.1))
    client = make_client(url, transport)
    try:
        d = client.submit(READ_ALL, timeout=5)
        await wait_until(lambda: len(server.requests) == 1, interval=0.005)
        d.cancel()
        with pytest.raises(defer.CancelledError):
            await d
        await sleep(0.8)
        assert len(server.requests) == 1
    finally:
        await client.close()


@pytest.mark.parametrize("transport", ["pool", "treq"])
@pytest_twisted.ensureDeferred
async def test_a_dropped_read_only_txn_is_never_re_sent_to_another_endpoint(
        path_gateway, transport):
    # Endpoint 1 hangs up 0.1 s after the request came (say etcd died); the call was
    # already given up: nothing must reach endpoint 2.
    url1, s1 = path_gateway(lambda path: hangup(0.1))
    url2, s2 = path_gateway(lambda path: raw(reply(200)))
    client = make_client([url1, url2], transport)
    try:
        d = client.submit(READ_ALL, timeout=0.03)
        with pytest.raises(errors.Timeout):
            await d
        await sleep(0.4)
        assert len(s1.requests) == 1
        assert len(s2.requests) == 0
    finally:
        await client.close()


@pytest.mark.parametrize("transport", ["pool", "treq"])
@pytest_twisted.ensureDeferred
async def test_a_closing_client_re_sends_nothing(path_gateway, transport):
    url1, s1 = path_gateway(lambda path: hangup(0.1))
    url2, s2 = path_gateway(lambda path: raw(reply(200)))
    client = make_client([url1, url2], transport)
    d = quiet(client.submit(READ_ALL, timeout=5))
    await wait_until(lambda: len(s1.requests) == 1, interval=0.005)
    await client.close()
    assert d.called
    await sleep(0.3)
    # the call dropped by close() was not re-sent elsewhere while the client closed
    assert len(s2.requests) == 0
    assert not s1.open and not s2.open  # and left no connection open


@pytest_twisted.ensureDeferred
async def test_treq_drain_limit_closes_a_connection_whose_answer_stalls(path_gateway,
                                                                       monkeypatch):
    # The head and part of the body came, then nothing: after the drain limit the
    # connection must be closed (docs: "closed anyway if the answer has not come").
    monkeypatch.setattr(treq_module, "DRAIN_LIMIT", 0.2)
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{\"header\":")
    url, server = path_gateway(lambda path: raw(head))
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
async def test_treq_close_with_a_stalled_answer_leaves_no_connection(path_gateway, monkeypatch):
    monkeypatch.setattr(treq_module, "CLOSE_DRAIN_LIMIT", 0.2)
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{\"header\":")
    url, server = path_gateway(lambda path: raw(head))
    client = make_client(url, "treq")
    d = quiet(client.submit(READ_ALL, timeout=5))
    await wait_until(lambda: len(server.requests) == 1)
    await sleep(0.05)
    started = time.monotonic()
    await client.close()
    assert time.monotonic() - started < 2.0 and d.called
    assert client._transport._draining == {}
    await sleep(0.1)
    assert not server.open, "close() fired with the drained connection still open"


@pytest_twisted.ensureDeferred
async def test_treq_silent_gateway_drain_limit_and_close(silent_gateway,
                                                        monkeypatch):
    monkeypatch.setattr(treq_module, "DRAIN_LIMIT", 0.2)
    url, server = silent_gateway
    client = make_client(url, "treq")
    transport = client._transport
    for i in range(3):
        d = client.submit(READ_ALL)
        await wait_until(lambda i=i: len(server.requests) == i + 1)
        d.cancel()
        d.cancel()
        with pytest.raises(defer.CancelledError):
            await d
        assert len(transport._draining) >= 1
    await wait_until(lambda: transport._draining == {}, timeout=3)
    assert len(server.requests) == 3
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
