"""Session: a kept-alive lease, its states and its `lost` notification.

Against real etcd with short TTLs, plus the deadline arithmetic on a fake clock (send
time, not reply time).
"""

from __future__ import annotations

import pytest
import pytest_twisted
from helpers import lease_ids, sleep, wait_until
from twisted.internet import defer, reactor, task

from coord import Client, LeaseExpired, errors
from coord.recipes.lock import Lock
from coord.session import Session, SessionLost, SessionState
from coord.testing import HEADER, HOLD, answer


@pytest_twisted.ensureDeferred
async def test_create_repr_and_close_revokes(pool_client):
    session = await Session.create(pool_client, ttl=5)
    assert session.state is SessionState.CONNECTED and session.alive
    assert session.ttl >= 5 and session.lease_id > 0
    assert repr(session) == f"<Session {session.lease_id:#x} ttl={session.ttl} CONNECTED>"
    await pool_client.set(b"s/k", b"v", lease=session.lease_id)
    lost = session.lost
    assert not lost.called
    await session.close()
    assert session.state is SessionState.CLOSED and not session.alive
    reason = await lost
    assert isinstance(reason, SessionLost) and isinstance(reason, LeaseExpired)
    assert "revoked" in str(reason)
    assert (await pool_client.get(b"s/k")).count == 0
    assert session.lease not in await pool_client.leases()
    await session.close()  # idempotent
    assert (await session.lost) is reason  # an ended session's `lost` has fired already
    with pytest.raises(SessionLost):
        session.check()


@pytest_twisted.ensureDeferred
async def test_keepalive_outlives_the_ttl(pool_client):
    session = await Session.create(pool_client, ttl=2)
    await pool_client.set(b"s/k", b"v", lease=session.lease_id)
    await sleep(5.0)  # two and a half TTLs
    assert session.state is SessionState.CONNECTED
    assert (await pool_client.get(b"s/k")).count == 1
    remaining = await session.lease.remaining()
    assert 0 < remaining <= session.ttl
    # the local deadline is at most a TTL away and at least 2/3 of it
    left = session.deadline - reactor.seconds()
    assert session.ttl / 3 <= left <= session.ttl + 0.1
    await session.close()


@pytest_twisted.ensureDeferred
async def test_revoked_elsewhere_is_lost_at_the_next_keepalive(pool_client):
    session = await Session.create(pool_client, ttl=3)
    lost = session.lost
    await session.lease.revoke()  # as `etcdctl lease revoke` would
    started = reactor.seconds()
    reason = await lost
    # noticed by the next keep-alive (every TTL/3), long before the deadline
    assert reactor.seconds() - started <= session.interval + 0.5
    assert session.state is SessionState.EXPIRED
    assert isinstance(reason, SessionLost) and "expired or was revoked" in str(reason)
    await session.close()  # nothing left to revoke; fine
    assert session.state is SessionState.EXPIRED


@pytest_twisted.ensureDeferred
async def test_unreachable_server_past_the_deadline_is_lost(etcd_factory):
    server = etcd_factory()
    client = Client(reactor, server.url, timeout=2.0)
    try:
        session = await Session.create(client, ttl=2)
        await client.set(b"s/k", b"v", lease=session.lease_id)
        lost = session.lost
        deadline = None
        server.pause()
        try:
            await wait_until(lambda: session.state is SessionState.SUSPENDED, timeout=3.0)
            deadline = session.deadline
            assert not lost.called
            reason = await lost
            now = reactor.seconds()
        finally:
            server.resume()
        assert session.state is SessionState.EXPIRED
        assert "no keep-alive answered" in str(reason)
        # lost at the deadline (the last answered keep-alive's send time + TTL), not later
        assert deadline - 0.05 <= now <= deadline + 0.5
        # and the lease is revoked in the background once the server answers again
        for _ in range(100):
            if (await client.get(b"s/k")).count == 0:
                break
            await sleep(0.1)
        assert (await client.get(b"s/k")).count == 0
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_orphan_leaves_the_lease(pool_client):
    session = await Session.create(pool_client, ttl=2)
    await pool_client.set(b"s/k", b"v", lease=session.lease_id)
    await session.close(orphan=True)
    assert session.state is SessionState.CLOSED
    assert "orphaned" in str(await session.lost)
    assert (await pool_client.get(b"s/k")).count == 1
    # nobody refreshes it any more: it expires after its TTL
    await sleep(session.ttl + 1.5)
    assert (await pool_client.get(b"s/k")).count == 0
    with pytest.raises(LeaseExpired):
        await session.lease.remaining()


@pytest_twisted.ensureDeferred
async def test_lost_observers_are_independent_and_cancellable(pool_client):
    session = await Session.create(pool_client, ttl=5)
    a, b, c = session.lost, session.lost, session.lost
    a.addCallback(lambda reason: "consumed")
    c.cancel()
    with pytest.raises(defer.CancelledError):
        await c
    await session.close()
    assert await a == "consumed"
    assert isinstance(await b, SessionLost)


def test_create_checks_ttl():
    client = Client(reactor, "http://127.0.0.1:1")
    with pytest.raises(TypeError):
        Session.create(client, ttl="10")
    with pytest.raises(errors.InvalidArgument):
        Session.create(client, ttl=0)


@pytest.mark.parametrize(("ttl", "exc"), [
    (0, errors.InvalidArgument), (-1, errors.InvalidArgument),
    (9_000_000_001, errors.InvalidArgument),  # above etcd's largest TTL (MaxLeaseTTL)
    ("10", TypeError), (1.5, TypeError), (True, TypeError), (None, TypeError)])
@pytest_twisted.ensureDeferred
async def test_bad_ttls_are_refused_at_once_and_grant_nothing(pool_client, ttl, exc):
    before = await pool_client.leases()
    with pytest.raises(exc, match="time_to_live"):  # raised by the call, not its Deferred
        Session.create(pool_client, ttl=ttl)
    assert await pool_client.leases() == before


@pytest.mark.parametrize(("lease_id", "exc"), [
    (0, errors.InvalidArgument), (-1, errors.InvalidArgument), ("1", TypeError),
    (True, TypeError), (None, TypeError)])
def test_resume_checks_the_lease_id(lease_id, exc):
    with pytest.raises(exc, match="lease_id"):
        Session.resume(Client(reactor, "http://127.0.0.1:1"), lease_id)


@pytest_twisted.ensureDeferred
async def test_session_huge_ttl_is_a_typed_error_and_leaks_nothing(pool_client):
    before = await lease_ids(pool_client)
    for ttl in (10**10, 2**63, 2**64 + 5):
        with pytest.raises(errors.CoordError):
            await Session.create(pool_client, ttl=ttl)
    assert await lease_ids(pool_client) == before
    # etcd's largest TTL (9e9 s) works, and the session's timers cope with it
    s = await Session.create(pool_client, ttl=9_000_000_000)
    lock = Lock(s, b"big")
    await lock.acquire(timeout=5)
    assert lock.held and s.state is SessionState.CONNECTED
    await lock.release()
    await s.close()
    assert await lease_ids(pool_client) == before


@pytest_twisted.ensureDeferred
async def test_close_that_failed_can_be_retried(etcd_factory):
    server = etcd_factory()
    client = Client(reactor, server.url, timeout=1.0)
    try:
        s = await Session.create(client, ttl=30)
        await client.set(b"k", b"v", lease=s.lease_id)
        server.pause()
        try:
            with pytest.raises((errors.Timeout, errors.Unavailable)):
                await s.close()
            assert s.state is SessionState.CLOSED
        finally:
            server.resume()
        await s.close()  # tries the revoke again
        assert (await client.get(b"k")).count == 0
        assert s.lease not in await client.leases()  # revoked, long before its 30 s TTL
    finally:
        await client.close()


# -- the deadline on a fake clock: counted from the keep-alive's send time -----------------


class FakeLease:
    def __init__(self, ttl):
        self.lease_id = 0x1234
        self.ttl = ttl
        self.refreshes = []  # (sent_at, Deferred)
        self.revoked = 0

    def refresh(self, timeout=None, attempt_timeout=None):
        d = defer.Deferred()
        self.refreshes.append((clock.seconds(), d))
        return d

    def revoke(self, timeout=None):
        self.revoked += 1
        return defer.succeed(None)


class FakeClient:
    attempt_timeout = 2.0

    def __init__(self, clock):
        self.reactor = clock  # Client.reactor

    def lease(self, ttl):
        return defer.succeed(FakeLease(ttl))


clock = task.Clock()


def fake_session(ttl=9):
    global clock
    clock = task.Clock()
    clock.advance(1000)
    sessions = []
    Session.create(FakeClient(clock), ttl=ttl).addCallback(sessions.append)
    return sessions[0]


def test_deadline_counts_from_the_send_time():
    session = fake_session(ttl=9)
    lease = session.lease
    assert session.deadline == 1009
    clock.advance(3)  # TTL/3: the first keep-alive goes out at 1003
    (sent, d), = lease.refreshes
    assert sent == 1003
    clock.advance(2)  # answered at 1005 ...
    d.callback(9)
    assert session.deadline == 1012  # ... but the lease is only sure until 1003 + 9
    assert session.state is SessionState.CONNECTED
    clock.advance(1)  # next keep-alive TTL/3 after the previous *send*: at 1006
    assert [s for s, _ in lease.refreshes] == [1003, 1006]


def test_failing_keepalives_suspend_then_expire_at_the_deadline():
    session = fake_session(ttl=9)
    lease = session.lease
    lost = session.lost
    clock.advance(3)
    lease.refreshes[-1][1].errback(errors.Unavailable("connection refused"))
    assert session.state is SessionState.SUSPENDED
    while clock.seconds() < 1008.9:
        clock.advance(0.1)
        for _, d in lease.refreshes:
            if not d.called:
                d.errback(errors.Timeout("no answer"))
    assert not lost.called and session.state is SessionState.SUSPENDED
    clock.advance(0.2)  # past 1009: the grant's send time + TTL
    assert session.state is SessionState.EXPIRED
    assert isinstance(lost.result, SessionLost)
    assert lease.revoked == 1  # given up: revoked in the background
    count = len(lease.refreshes)
    clock.advance(10)
    assert len(lease.refreshes) == count  # no keep-alive after the end


def test_a_late_answer_after_the_deadline_does_not_revive():
    session = fake_session(ttl=9)
    lease = session.lease
    clock.advance(3)
    _, d = lease.refreshes[-1]  # sent at 1003, hangs
    clock.advance(6.5)  # past 1009
    assert session.state is SessionState.EXPIRED
    assert d.called  # the pending keep-alive was cancelled
    count = len(lease.refreshes)
    clock.advance(10)
    assert len(lease.refreshes) == count


def test_ttl_zero_answer_is_lost_at_once():
    session = fake_session(ttl=9)
    lease = session.lease
    clock.advance(3)
    lease.refreshes[-1][1].errback(LeaseExpired("lease 0x1234 has expired or was revoked"))
    assert session.state is SessionState.EXPIRED
    assert "expired or was revoked" in str(session.reason)
    assert lease.revoked == 0  # etcd said it is gone: nothing to revoke


def test_suspended_then_answered_is_connected_again():
    session = fake_session(ttl=9)
    lease = session.lease
    clock.advance(3)
    lease.refreshes[-1][1].errback(errors.Unavailable("down"))
    assert session.state is SessionState.SUSPENDED
    clock.advance(0.5)
    sent, d = lease.refreshes[-1]
    assert sent == 1003.5
    d.callback(9)
    assert session.state is SessionState.CONNECTED
    assert session.deadline == 1012.5


# -- the keep-alive's attempt deadline ----------------------------------------------


def member(path_gateway, answers):
    """A scripted member on loopback: answers ``answers[path]`` at once, holds the rest."""
    return path_gateway(lambda path: answer(0.0, body=answers[path]) if path in answers
                        else HOLD)


@pytest_twisted.ensureDeferred
async def test_keep_alives_leave_a_member_that_holds_them_within_the_interval(
        path_gateway, new_client):
    # h grants the lease and answers status, but holds every keep-alive; g answers them.
    # With the client's attempt deadline at its default (2 s) and the session's interval
    # at 1 s, each keep-alive must leave h after a third of the interval -- in time.
    grant = {"header": HEADER, "ID": "7", "TTL": "3"}
    alive = {"result": {"header": HEADER, "ID": "7", "TTL": "3"}}
    status = {"header": HEADER, "version": "3.5.1", "leader": "1"}
    url_h, h = member(path_gateway, {"/v3/lease/grant": grant, "/v3/maintenance/status": status,
                       "/v3/lease/revoke": {"header": HEADER}})
    url_g, g = member(path_gateway, {"/v3/lease/keepalive": alive, "/v3/maintenance/status": status,
                       "/v3/lease/revoke": {"header": HEADER}})
    client = new_client([url_h, url_g], timeout=5)
    session = await Session.create(client, ttl=3)
    await sleep(3.5)  # longer than the TTL
    assert session.state is SessionState.CONNECTED and session.alive
    assert g.count("/v3/lease/keepalive") >= 3
    assert h.count("/v3/lease/keepalive") >= 1  # tried there first
    await session.close()
