"""A read-only transaction given up before its answer came keeps its connection until the
answer comes (coord._twisted.pool.drains): closing the connection would cancel the
transaction inside etcd, and etcd 3.5.0-3.5.4 then panic ("unexpected error during txn",
etcd issue 14110).  On etcd 3.5.1 the first test crashed the server within 10 to 54
dropped transactions before the fix, for either transport and each way of giving up.
"""

from __future__ import annotations

import random
import time

import pytest
import pytest_twisted
from conftest import make_client
from helpers import sleep, wait_until
from test_pool import Gateway, ours, sockets_of, transport_for
from twisted.internet import defer, reactor, task

from coord import Client, KeySet, OpGet, OpSet, Transaction, errors
from coord._twisted import pool as pool_module

READ_ALL = Transaction(compare=[], success=[OpGet(KeySet(b"k/", prefix=True))], failure=[])


async def fill(client, n=300):
    """Keys for the transaction to read: etcd checks for cancellation per key found."""
    await defer.gatherResults([client.set(b"k/%04d" % i, b"x" * 100) for i in range(n)])


def quiet(d):
    d.addErrback(lambda f: None)
    return d


@pytest.fixture
def silent_gateway():
    """A gateway that reads every request and never answers: (url, its factory)."""
    factory = Gateway(None, None)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield f"http://127.0.0.1:{port.getHost().port}", factory
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


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
        assert server.requests == 1  # never re-sent
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
    await wait_until(lambda: server.requests == 1)
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
