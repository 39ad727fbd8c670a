"""The default transport (coord._twisted.pool): its sans-IO decisions as tables, and its
I/O against a real etcd -- or, where etcd cannot be made to answer so on demand, against a
scripted gateway socket that answers what a gateway answers (a "no leader" error, a gRPC
DEADLINE_EXCEEDED)."""

from __future__ import annotations

import json
import socket

import pytest
import pytest_twisted
from helpers import dead_url, ours, sleep, sockets_of, transport_for, wait_until
from twisted.internet import defer, protocol, reactor, task

from coord import Client, errors
from coord._failover import Plan
from coord._twisted.pool import Deadlines, _Call
from coord._wire import codec

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
