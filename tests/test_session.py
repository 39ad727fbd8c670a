"""Session: a kept-alive lease, its states and its `lost` notification.

Against real etcd with short TTLs, plus the deadline arithmetic on a fake clock (send
time, not reply time).
"""

from __future__ import annotations

import contextlib
import os
import subprocess

import pytest
import pytest_twisted
from helpers import lease_ids, sleep, wait_until
from twisted.internet import defer, reactor, task

from coord import Client, LeaseExpired, errors
from coord.recipes.lock import Lock
from coord.server import find_etcdctl
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
@pytest.mark.slow
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


# -- listeners: every change of state, once, in order ---------------------------------------

C, S, E, X = (SessionState.CONNECTED, SessionState.SUSPENDED, SessionState.EXPIRED,
              SessionState.CLOSED)


class Heard:
    """Listeners that record ``(name, old, new, reason)`` in one list, in call order."""

    def __init__(self):
        self.calls = []

    def listener(self, name):
        return lambda old, new, reason: self.calls.append((name, old, new, reason))

    def changes(self, name=None):
        return [(old, new) for n, old, new, _ in self.calls if name in (None, n)]


@contextlib.contextmanager
def logged_failures():
    """The failures logged (txaio -> twisted.logger) while the block runs."""
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)
        events[:] = [e for e in events if e.get("log_failure") is not None]


@pytest_twisted.ensureDeferred
async def test_listeners_hear_suspended_connected_and_expired_once_in_order(etcd_factory):
    server = etcd_factory()
    client = Client(reactor, server.url, timeout=2.0)
    try:
        session = await Session.create(client, ttl=2)
        heard = Heard()
        session.listen(heard.listener("a"))
        session.listen(heard.listener("b"))
        server.pause()  # unreachable: SUSPENDED ...
        try:
            await wait_until(lambda: session.state is S, timeout=3.0)
        finally:
            server.resume()  # ... and back before the deadline: CONNECTED
        await wait_until(lambda: session.state is C, timeout=3.0)
        server.pause()  # then unreachable past the deadline: EXPIRED
        try:
            reason = await session.lost
        finally:
            server.resume()
        await sleep(0.3)  # keep-alives have stopped: nothing more to hear
        assert heard.changes() == [(C, S), (C, S), (S, C), (S, C), (C, S), (C, S), (S, E),
                                   (S, E)]
        assert [n for n, *_ in heard.calls] == ["a", "b"] * 4  # in the order added
        suspended, _, connected, _, _, _, expired, _ = (r for *_, r in heard.calls)
        assert isinstance(suspended, errors.CoordError)  # the failed keep-alive's error
        assert connected is None
        assert expired is reason is session.reason
        await session.close()  # an EXPIRED session closes without a change of state
        assert len(heard.calls) == 8
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_listener_hears_expired_when_the_lease_is_revoked_elsewhere(pool_client,
                                                                          etcd):
    session = await Session.create(pool_client, ttl=3)
    heard = Heard()
    session.listen(heard.listener("a"))
    subprocess.run([find_etcdctl(), "--endpoints", etcd.url, "lease", "revoke",
                    f"{session.lease_id:x}"], check=True, capture_output=True, timeout=30,
                   env={**os.environ, "ETCDCTL_API": "3"})
    reason = await session.lost
    assert heard.calls == [("a", C, E, reason)]
    assert "expired or was revoked" in str(reason)
    await session.close()
    assert heard.calls == [("a", C, E, reason)]


@pytest_twisted.ensureDeferred
async def test_listener_hears_closed_from_close_and_nothing_after(pool_client):
    session = await Session.create(pool_client, ttl=5)
    heard = Heard()
    session.listen(heard.listener("a"))
    lost = session.lost
    order = []
    session.listen(lambda old, new, reason: order.append(("listener", lost.called)))
    await session.close()
    assert heard.calls == [("a", C, X, session.reason)]
    assert order == [("listener", False)]  # before `lost` fired
    await session.close()  # idempotent: no second report
    late = session.listen(heard.listener("late"))  # after the end: never called
    late()
    late()
    assert heard.calls == [("a", C, X, session.reason)]


@pytest_twisted.ensureDeferred
async def test_listener_that_raises_is_logged_and_stops_neither_the_others_nor_the_session(
        pool_client):
    session = await Session.create(pool_client, ttl=5)
    heard = Heard()

    def bad(old, new, reason):
        raise RuntimeError(f"listener failed on {new.name}")

    async def bad_later(old, new, reason):
        await sleep(0)
        raise ValueError("async listener failed")

    session.listen(bad)
    session.listen(bad_later)
    session.listen(heard.listener("after"))
    with logged_failures() as failures:
        await session.close()
        await sleep(0.05)
    assert heard.calls == [("after", C, X, session.reason)]
    assert session.state is X and (await pool_client.leases()) == []  # closed and revoked
    assert sorted(type(e["log_failure"].value).__name__ for e in failures) == [
        "RuntimeError", "ValueError"]


def test_listeners_on_a_fake_clock_raise_unsubscribe_and_reenter():
    session = fake_session(ttl=9)
    lease = session.lease
    heard = Heard()
    calls = []

    def bad(old, new, reason):
        calls.append(new)
        raise RuntimeError("boom")

    session.listen(bad)
    stop_a = session.listen(heard.listener("a"))
    session.listen(heard.listener("b"))
    with logged_failures() as failures:
        clock.advance(3)
        lease.refreshes[-1][1].errback(errors.Unavailable("refused"))  # CONNECTED -> SUSPENDED
        clock.advance(0.5)
        lease.refreshes[-1][1].errback(errors.Unavailable("refused"))  # still SUSPENDED
        clock.advance(0.5)
        lease.refreshes[-1][1].callback(9)  # SUSPENDED -> CONNECTED: the session went on
    assert calls == [S, C] and len(failures) == 2
    assert heard.changes("a") == heard.changes("b") == [(C, S), (S, C)]
    stop_a()
    stop_a()  # twice: nothing more
    # a listener that closes the session: the change it makes is reported after the one
    # it was told of, to everyone
    session.listen(lambda old, new, reason: new is S and session.close())
    clock.advance(3)
    lease.refreshes[-1][1].errback(errors.Timeout("no answer"))
    assert heard.changes("a") == [(C, S), (S, C)]  # unsubscribed
    assert heard.changes("b") == [(C, S), (S, C), (C, S), (S, X)]
    assert session.state is X and calls == [S, C, S, X]


def test_listen_needs_a_callable():
    session = fake_session()
    with pytest.raises(TypeError, match="callback must be callable, not NoneType"):
        session.listen(None)
    with pytest.raises(TypeError, match="callback must be callable, not str"):
        session.listen("print")


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
