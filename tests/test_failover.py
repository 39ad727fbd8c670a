"""Failover (coord._failover, and both transports acting on it): its sans-IO rules as
tables, then timeouts, cancellation, unknown outcomes and hung members against real,
misbehaving etcds -- a 3-member cluster with a member stopped by SIGSTOP -- and scripted
gateways (coord.testing)."""

from __future__ import annotations

import json
import time

import pytest
import pytest_twisted
from helpers import (
    NO_LEADER_BODY,
    dead_url,
    preferred_url,
    range_body,
    sleep,
    sockets_of,
    transport_for,
    wait_until,
)
from twisted.internet import defer, reactor

from coord import (
    Client,
    KeySet,
    OpGet,
    OpSet,
    OutcomeUnknown,
    Timeout,
    Transaction,
    Unavailable,
    WriteTimeout,
    errors,
)
from coord._failover import REPEATABLE, Expiry, Health, Plan, expiry_demotes, on_attempt_expired
from coord._wire import codec
from coord.recipes import Lock
from coord.session import Session, SessionLost, SessionState
from coord.testing import HOLD, Scripted, answer, http_answer

# ============================================================================================
# Plan: which endpoint next, and what an answer or a failure means (no I/O)
# ============================================================================================


@pytest.mark.parametrize(
    ("start", "count", "write", "pinned", "expected"),
    [
        (0, 1, False, False, [0, 0]),  # a read: one extra try (a stale kept-alive socket)
        (0, 1, True, False, [0, 0]),  # an unsent write is as safe to try again
        (1, 3, False, False, [1, 2, 0, 1]),
        (2, 3, True, False, [2, 0, 1, 2]),
        (1, 3, False, True, [1, 1]),  # pinned: that endpoint only
        (2, 3, True, True, [2, 2]),
    ],
)
def test_plan_order(start, count, write, pinned, expected):
    plan = Plan(start, count, write, pinned)
    got = []
    while (index := plan.next_index()) is not None:
        got.append(index)
    assert got == expected
    assert plan.next_index() is None  # stays exhausted
    assert plan.tried() == list(dict.fromkeys(expected))


@pytest.mark.parametrize(
    ("write", "sent", "may"),
    [(False, False, True), (False, True, True), (True, False, True), (True, True, False)],
)
def test_plan_may_resend(write, sent, may):
    assert Plan.may_resend(write, sent) is may


def gateway_error(message, code):
    return errors.from_gateway({"error": message, "message": message, "code": code})


@pytest.mark.parametrize(
    ("message", "code", "write", "retry", "cls", "unknown"),
    [
        # "no leader" is refused before anything is proposed: retried, and when the
        # pauses run out it is EtcdUnavailable for a write too -- the outcome is known.
        ("etcdserver: no leader", 14, True, True, errors.EtcdUnavailable, False),
        ("etcdserver: no leader", 14, False, True, errors.EtcdUnavailable, False),
        # may come after the write was proposed
        ("etcdserver: request timed out", 14, True, False, errors.EtcdOutcomeUnknown, True),
        ("etcdserver: request timed out", 14, False, True, errors.EtcdUnavailable, False),
        ("etcdserver: leader changed", 14, True, False, errors.EtcdOutcomeUnknown, True),
        # gRPC CANCELLED / DEADLINE_EXCEEDED: the gateway gave up waiting, etcd may not have
        ("context canceled", 1, True, False, errors.OutcomeUnknown, True),
        ("context deadline exceeded", 4, True, False, errors.OutcomeUnknown, True),
        # ... and a read retries them like any unavailability
        ("context canceled", 1, False, True, errors.EtcdError, False),
        ("context deadline exceeded", 4, False, True, errors.EtcdError, False),
        # refused: nothing applied
        ("etcdserver: key is not provided", 3, True, False, errors.EtcdInvalidArgument, False),
        ("etcdserver: requested lease not found", 5, True, False, errors.LeaseNotFound, False),
    ],
)
def test_plan_answers(message, code, write, retry, cls, unknown):
    exc = gateway_error(message, code)
    assert Plan.may_retry_answer(write, exc) is retry
    final = Plan.answer_error(write, exc)
    assert isinstance(final, cls)
    assert isinstance(final, errors.OutcomeUnknown) is unknown
    assert final.message == message and final.code == code


def run_plan(plan):
    got = []
    while (index := plan.next_index()) is not None:
        got.append(index)
    return got


@pytest.mark.parametrize(
    ("start", "order", "expected"),
    [
        # the first attempt's endpoint first, then the given order without it
        (0, [0, 1, 2], [0, 1, 2, 0]),
        (1, [2, 0, 1], [1, 2, 0, 1]),
        (2, [0, 1, 2], [2, 0, 1, 2]),
        (0, [1, 2, 0], [0, 1, 2, 0]),  # 0 is demoted (last in the order), but went first
    ],
)
def test_plan_follows_the_given_order(start, order, expected):
    plan = Plan(start, len(order), False, order=order)
    assert run_plan(plan) == expected
    assert plan.tried() == list(dict.fromkeys(expected))


def test_plan_untried():
    plan = Plan(0, 3, False)
    seen = []
    while plan.next_index() is not None:
        seen.append(plan.untried())
    # after the 1st and 2nd attempt one remains untried; after the 3rd and the extra, none
    assert seen == [True, True, False, False]


# -- what an attempt that got no answer in time does ---------------------------------------


def plan_after(attempts, count=3, pinned=False):
    plan = Plan(0, count, False, pinned=pinned)
    for _ in range(attempts):
        plan.next_index()
    return plan


@pytest.mark.parametrize(
    ("path", "write", "attempts", "count", "pinned", "expected", "demotes"),
    [
        # a read moves on while an endpoint is left untried, and demotes the silent one
        ("/v3/kv/range", False, 1, 3, False, Expiry.MOVE, True),
        ("/v3/kv/range", False, 2, 3, False, Expiry.MOVE, True),
        ("/v3/kv/txn", False, 1, 3, False, Expiry.MOVE, True),  # a read-only transaction
        ("/v3/lease/keepalive", False, 1, 2, False, Expiry.MOVE, True),
        ("/v3/maintenance/status", False, 1, 2, False, Expiry.MOVE, True),
        # every endpoint had its try: the last one is left to answer (slow, not hung?)
        ("/v3/kv/range", False, 3, 3, False, Expiry.WAIT, True),
        # a write fails (outcome unknown, never re-sent) and demotes
        ("/v3/kv/put", True, 1, 3, False, Expiry.FAIL, True),
        ("/v3/kv/txn", True, 3, 3, False, Expiry.FAIL, True),
        ("/v3/lease/grant", True, 1, 2, False, Expiry.FAIL, True),
        # one endpoint: nowhere else to go, nothing to demote
        ("/v3/kv/range", False, 1, 1, False, Expiry.WAIT, False),
        ("/v3/kv/put", True, 1, 1, False, Expiry.WAIT, False),
        # pinned to one member (status of that member, defragment): waits, never demotes
        ("/v3/maintenance/status", False, 1, 3, True, Expiry.WAIT, False),
        ("/v3/maintenance/defragment", False, 1, 3, True, Expiry.WAIT, False),
        # a defragment blocks its member for as long as it takes: no deadline, no demotion
        ("/v3/maintenance/defragment", False, 1, 3, False, Expiry.WAIT, False),
    ],
)
def test_attempt_expired(path, write, attempts, count, pinned, expected, demotes):
    plan = plan_after(attempts, count, pinned)
    assert on_attempt_expired(path, write, plan) is expected
    assert expiry_demotes(path, write, plan) is demotes


def test_repeatable_requests_change_nothing():
    # Every path on the list is one the client sends with write=False.
    assert "/v3/kv/put" not in REPEATABLE and "/v3/kv/deleterange" not in REPEATABLE
    assert "/v3/lease/grant" not in REPEATABLE and "/v3/lease/revoke" not in REPEATABLE
    assert "/v3/maintenance/defragment" not in REPEATABLE


# -- Health: demotion, order, probes and checks --------------------------------------------


def test_health_demotes_and_orders_the_demoted_last():
    h = Health(3)
    assert h.preferred == 0 and h.order() == [0, 1, 2]
    assert h.demote(0, now=10.0) is True
    assert h.demote(0, now=11.0) is False  # already demoted: nothing changes
    assert h.preferred == 1 and h.order() == [1, 2, 0]
    assert h.order(2) == [2, 1, 0]  # a plan that started at 2 wraps round, demoted last
    assert h.demote(1, now=12.0) is True
    assert h.preferred == 2 and h.order() == [2, 0, 1]  # longest demoted first
    assert h.demote(2, now=13.0) is True
    assert h.preferred == 0 and h.order() == [0, 1, 2]  # all demoted: oldest first
    assert h.demote(0, now=14.0) is False  # failed again: to the back of the demoted
    assert h.preferred == 1 and h.order() == [1, 2, 0]


def test_health_probes_a_demoted_endpoint_with_a_growing_pause():
    h = Health(2, check_interval=None, probe_after=0.25, probe_max=1.0)
    h.demote(0, now=100.0)
    assert h.next_wakeup() == 100.25
    assert h.due(100.2) == []
    assert h.due(100.25) == [0]
    assert h.due(100.3) == [] and h.next_wakeup() is None  # being probed: not again
    pauses = []
    now = 100.25
    for _ in range(4):
        assert h.probed(0, ok=False, now=now) is False
        at = h.next_wakeup()
        pauses.append(round(at - now, 2))
        now = at
        assert h.due(now) == [0]
    assert pauses == [0.5, 1.0, 1.0, 1.0]  # doubling, capped
    assert h.probed(0, ok=True, now=now) is False
    assert h.demoted == {} and h.preferred == 0 and h.next_wakeup() is None


def test_health_waits_longer_for_an_endpoint_that_fails_again_soon_after():
    h = Health(2, check_interval=None, probe_after=0.25, probe_max=5.0)
    first = []
    now = 0.0
    for _ in range(4):
        h.demote(0, now)
        at = h.next_wakeup()
        first.append(round(at - now, 6))
        h.due(at)
        h.probed(0, ok=True, now=at)  # the probe says fine; the next call hangs again
        now = at + 0.3
    assert first == [0.25, 1.0, 4.0, 5.0]
    h.demote(1, now=100.0)  # long after any restoration: the first pause again
    assert h.next_wakeup() == 100.25


def test_health_comes_back_to_the_first_endpoint():
    h = Health(3)
    h.demote(0, now=0.0)
    assert h.preferred == 1
    h.due(1.0)
    h.probed(0, ok=True, now=1.0)
    assert h.preferred == 0  # back in the order the endpoints were given


def test_health_checks_endpoints_that_serve_streams():
    h = Health(3, check_interval=1.0)
    h.watch(1, 1, now=0.0)
    h.watch(1, 1, now=0.5)  # a second stream: the check stays where it was
    assert h.next_wakeup() == 1.0
    assert h.due(1.0) == [1]
    assert h.probed(1, ok=True, now=1.01) is False
    assert h.next_wakeup() == 2.01
    h.due(2.01)
    assert h.probed(1, ok=False, now=3.0) is True  # a failed check demotes: streams move
    assert h.preferred == 0 and 1 in h.demoted
    h.watch(1, -1, now=3.0)
    h.watch(1, -1, now=3.0)
    h.due(h.next_wakeup())
    h.probed(1, ok=True, now=4.0)  # restored; no stream left, so no more checks
    assert h.demoted == {} and h.next_wakeup() is None


def test_health_without_checks_and_with_one_endpoint():
    h = Health(2, check_interval=None)
    h.watch(0, 1, now=0.0)
    assert h.next_wakeup() is None  # streams are not checked
    one = Health(1)
    assert one.demote(0, now=0.0) is False  # nowhere else to go
    one.watch(0, 1, now=0.0)
    assert one.due(100.0) == [] and one.preferred == 0



@pytest_twisted.ensureDeferred
async def test_unreachable_endpoint_is_skipped(etcd, new_client):
    client = new_client([dead_url(), etcd.url])
    try:
        await client.set(b"k", b"v")  # a write never sent to the dead endpoint is safe to move
        assert (await client.get(b"k")).kvs[0].value == b"v"
        status = await client.status()
        assert status.version
    finally:
        pass


@pytest_twisted.ensureDeferred
async def test_all_endpoints_down_is_unavailable(new_client):
    client = new_client([dead_url(), dead_url()])
    try:
        with pytest.raises(Unavailable) as info:
            await client.get(b"k")
        assert not isinstance(info.value, OutcomeUnknown)
        with pytest.raises(Unavailable) as info:
            await client.set(b"k", b"v")
        assert not isinstance(info.value, OutcomeUnknown)  # never sent: outcome known
    finally:
        pass


@pytest_twisted.ensureDeferred
async def test_timeouts_on_a_paused_server(etcd_factory, new_client):
    server = etcd_factory()
    client = new_client(server.url, timeout=0.5)
    try:
        await client.set(b"k", b"v")
        server.pause()
        with pytest.raises(Timeout) as info:
            await client.get(b"k")
        assert not isinstance(info.value, OutcomeUnknown)
        with pytest.raises(WriteTimeout) as winfo:
            await client.set(b"k", b"w", timeout=0.3)
        assert isinstance(winfo.value, OutcomeUnknown)
        assert "may or may not" in str(winfo.value)
        server.resume()
        # The timed-out write may have been applied after all: the value is one or the other.
        value = (await client.get(b"k", timeout=5)).kvs[0].value
        assert value in (b"v", b"w")
    finally:
        server.resume()
        pass


@pytest_twisted.ensureDeferred
async def test_cancel_a_pending_call(etcd_factory, new_client):
    server = etcd_factory()
    client = new_client(server.url)
    try:
        await client.get(b"warm")
        server.pause()
        d = client.get(b"k")
        await sleep(0.1)
        d.cancel()
        with pytest.raises(defer.CancelledError):
            await d
        server.resume()
        assert (await client.get(b"k", timeout=5)).kvs == []
    finally:
        server.resume()
        pass


@pytest_twisted.ensureDeferred
async def test_server_restart_between_calls(etcd_factory, new_client, transport):
    server = etcd_factory()
    client = new_client(server.url)
    try:
        await client.set(b"k", b"1")
        server.restart()  # blocks the reactor: the old connections' FINs are unread
        # A write on a kept-alive connection the server closed must not be lost or
        # reported as unknown: coord's pool notices the closed connection first.  An Agent
        # cannot tell, so through treq the write may say its outcome is unknown -- but
        # never fail silently, and the next one succeeds.
        try:
            await client.set(b"k", b"2")
        except OutcomeUnknown:
            if transport == "pool":
                raise
            await client.set(b"k", b"2")
        assert (await client.get(b"k")).kvs[0].value == b"2"
    finally:
        pass


@pytest_twisted.ensureDeferred
async def test_write_sent_then_connection_lost_is_outcome_unknown(etcd_cluster, new_client):
    a, b, c = etcd_cluster.members
    client = new_client([a.url, b.url, c.url])
    try:
        await client.set(b"k", b"before")
        a.pause()
        d = client.set(b"k", b"after")  # written into a's socket; a cannot answer
        await sleep(0.2)
        a.kill()
        with pytest.raises(OutcomeUnknown) as info:
            await d
        assert "not re-sent" in str(info.value)
        # The client moved on to a live member; the value is one or the other.
        assert (await client.get(b"k")).kvs[0].value in (b"before", b"after")
    finally:
        pass


@pytest_twisted.ensureDeferred
async def test_read_sent_then_connection_lost_is_retried(etcd_cluster, new_client):
    a, b, c = etcd_cluster.members
    client = new_client([a.url, b.url, c.url])
    try:
        await client.set(b"k", b"v")
        a.pause()
        d = client.get(b"k")
        await sleep(0.2)
        a.kill()
        assert (await d).kvs[0].value == b"v"  # re-sent to b
    finally:
        pass


@pytest_twisted.ensureDeferred
async def test_leader_killed_cluster_keeps_serving(etcd_cluster, new_client):
    client = new_client(etcd_cluster.urls)
    try:
        await client.set(b"k", b"1")
        leader = etcd_cluster.leader()
        leader.kill()
        etcd_cluster.wait_for_leader(timeout=30, exclude=[leader])
        for i in range(20):
            try:
                await client.set(b"k", b"%d" % i)
            except OutcomeUnknown:
                pass  # a write in flight to the dead member: allowed, never silent
        assert (await client.get(KeySet(b"k"))).kvs[0].value == b"19"
    finally:
        pass


# ============================================================================================
# A hung member (SIGSTOP) in a 3-member cluster: calls, sessions and watches leave it
# ============================================================================================

ATTEMPT = 1.0  # the clients' attempt_timeout here (default 2 s), to keep the tests short


def members_with_first(cluster, role):
    """The cluster's members, the leader (or a follower) first: the client's preferred."""
    leader = cluster.wait_for_leader()
    if role == "leader":
        first = leader
    else:
        first = next(m for m in cluster.members if m is not leader)
    return [first] + [m for m in cluster.members if m is not first]


async def read_for(client, seconds, key=b"k"):
    """Read ``key`` one call after another for ``seconds``: (calls, failures, longest gap
    between two successful calls, or from the start to the first)."""
    start = last_ok = reactor.seconds()
    calls, failures, gap = 0, [], 0.0
    while reactor.seconds() - start < seconds:
        calls += 1
        try:
            await client.get(key)
        except Exception as e:
            failures.append(e)
            continue
        now = reactor.seconds()
        gap = max(gap, now - last_ok)
        last_ok = now
    return calls, failures, gap


@pytest.mark.parametrize("role", ["follower", "leader"])
@pytest_twisted.ensureDeferred
async def test_reads_leave_a_hung_preferred_member(etcd_cluster, new_client, role):
    members = members_with_first(etcd_cluster, role)
    hung = members[0]
    client = new_client([m.url for m in members], timeout=10, attempt_timeout=ATTEMPT)
    await client.set(b"k", b"v")
    hung.pause()
    try:
        calls, failures, gap = await read_for(client, 3.0)
        assert failures == [], failures  # no read fails
        # The first read waited one attempt deadline, then went elsewhere; the next ones
        # go straight to a healthy member.
        assert gap < ATTEMPT + 1.0, gap
        assert calls > 10 and preferred_url(client) != hung.url
    finally:
        hung.resume()
    # The hung member answers its probe again: it is preferred again.
    await wait_until(lambda: preferred_url(client) == hung.url, timeout=15)
    assert (await client.get(b"k")).kvs[0].value == b"v"


@pytest_twisted.ensureDeferred
async def test_a_write_to_a_hung_member_is_outcome_unknown_and_the_next_goes_elsewhere(
        etcd_cluster, new_client):
    members = members_with_first(etcd_cluster, "follower")
    hung = members[0]
    client = new_client([m.url for m in members], timeout=10, attempt_timeout=ATTEMPT)
    await client.set(b"k", b"0")
    hung.pause()
    try:
        started = reactor.seconds()
        with pytest.raises(WriteTimeout) as info:
            await client.set(b"k", b"1")
        assert isinstance(info.value, OutcomeUnknown) and "not re-sent" in str(info.value)
        assert reactor.seconds() - started < ATTEMPT + 1.0  # the attempt deadline, not 10 s
        for i in range(2, 6):
            await client.set(b"k", b"%d" % i)  # each goes to a healthy member
        assert (await client.get(b"k")).kvs[0].value == b"5"
    finally:
        hung.resume()
    # The write that timed out reached the hung member, which may apply it once it runs
    # again -- after the writes made since: that is what "outcome unknown" means (guard
    # writes with a comparison where that matters).  But it was never sent twice: six
    # puts at most (version 6), five if it was not applied.
    await wait_until(lambda: preferred_url(client) == hung.url, timeout=15)
    await sleep(0.5)
    kv = (await client.get(b"k")).kvs[0]
    assert (kv.version, kv.value) in ((5, b"5"), (6, b"5"), (6, b"1")), kv


@pytest.mark.parametrize("role", ["follower", "leader"])
@pytest_twisted.ensureDeferred
@pytest.mark.slow
async def test_session_and_lock_survive_a_hung_preferred_member(etcd_cluster, new_client, role):
    members = members_with_first(etcd_cluster, role)
    hung = members[0]
    client = new_client([m.url for m in members], timeout=10)  # default attempt_timeout
    session = await Session.create(client, ttl=5)
    lock = Lock(session, b"jobs/db")
    await lock.acquire(timeout=5)
    lost = lock.lost
    hung.pause()
    try:
        await sleep(10.0)  # twice the TTL
        assert session.state is SessionState.CONNECTED and session.alive
        assert not lost.called
        await client.submit(Transaction(compare=[lock.guard()],
                                        success=[OpSet(b"jobs/db/last", b"ours")]))
    finally:
        hung.resume()
    assert (await client.get(b"jobs/db/last")).kvs[0].value == b"ours"
    await sleep(2.0)
    if role == "follower":
        assert session.alive and not lost.called
    elif session.reason is not None:
        # etcd < 3.5.11 / 3.4.28: the old leader, running again, may revoke the leases
        # that expired by its own clock before it learns it lost the leadership (etcd
        # issues 12528, 15247).  Then the session and the lock must say so.
        assert isinstance(session.reason, SessionLost)
        await wait_until(lambda: lost.called)
    await lock.release()
    await session.close()


@pytest.mark.parametrize("role", ["follower", "leader"])
@pytest_twisted.ensureDeferred
async def test_a_watch_moves_off_a_hung_member_exactly_once(etcd_cluster, new_client, role):
    members = members_with_first(etcd_cluster, role)
    hung = members[0]
    client = new_client([m.url for m in members], attempt_timeout=ATTEMPT)
    writer = new_client([m.url for m in members[1:]], attempt_timeout=ATTEMPT)
    seen = []
    d = client.watch(KeySet(b"w/", prefix=True), seen.append)
    await d.watcher.ready
    await writer.set(b"w/0", b"before")
    await wait_until(lambda: len(seen) == 1)
    hung.pause()
    try:
        # With the leader hung, writes fail until the others elect a new one; each try
        # writes a key of its own, so whatever was applied shows once in the store.
        written = await put_until_done(writer, b"w/1-")
        await wait_until(lambda: any(e.kv.key.startswith(b"w/1-") for e in seen), timeout=10)
        # health check interval (1 s) + the check's deadline (1 s) + a new stream
        assert reactor.seconds() - written < 4.0
        await put_until_done(writer, b"w/2-")
    finally:
        hung.resume()
    await put_until_done(writer, b"w/3-")
    await sleep(1.0)
    stored = (await writer.get(KeySet(b"w/", prefix=True), sort_target="mod")).kvs
    assert [(e.kv.key, e.kv.mod_revision) for e in seen] == \
        [(kv.key, kv.mod_revision) for kv in stored]  # none lost, none twice, in order
    assert d.watcher.reconnects >= 1
    d.cancel()
    await d


async def put_until_done(client, prefix):
    """Put ``prefix + n`` for n = 0, 1, ... until one put succeeds; when it succeeded."""
    for n in range(30):
        try:
            await client.set(prefix + b"%d" % n, b"v")
            return reactor.seconds()
        except (OutcomeUnknown, Unavailable):
            await sleep(0.1)
    raise AssertionError(f"no put of {prefix!r} succeeded")


@pytest_twisted.ensureDeferred
@pytest.mark.slow
async def test_every_attempt_expires_at_its_own_deadline(etcd, listen, new_client):
    # Two members hang (they take requests and never answer), the third is etcd.  A
    # read sent 1 s after another must leave each hung member 2 s after it got there,
    # even when the first read's move set the deadline timer for later.
    status = http_answer(200, b'{"header":{"revision":"1"},"version":"3.5.1","leader":"1"}')
    a, b = Scripted(["hold"]), Scripted([status, "hold"])
    b_url = listen(b)
    client = new_client([listen(a), b_url, etcd.url], timeout=20, attempt_timeout=2.0)
    await client.status(endpoint=b_url)  # b has an idle connection: a move there is at once
    first = client.get(b"k")
    await sleep(1.0)
    started = reactor.seconds()
    second = client.get(b"k")
    assert (await first).kvs == []
    assert (await second).kvs == []
    # 2 s on a, 2 s on b: 4 s; 5 s if its attempt on a waited for the first read's
    # deadline on b
    assert reactor.seconds() - started < 4.6
    ranges = [sum(data.count(b"/v3/kv/range") for data in gw.seen) for gw in (a, b)]
    assert ranges == [2, 2]  # each read tried each hung member once (the rest: probes)


# ============================================================================================
# failover with the lazily made plan
# ============================================================================================


@pytest.mark.parametrize("write", [False, True])
@pytest_twisted.ensureDeferred
async def test_plan_starts_where_the_first_attempt_went(write):
    urls = [dead_url(), dead_url(), dead_url()]
    t = transport_for(*urls)
    try:
        t._preferred = 1
        d = t.request("/v3/kv/range", b"{}", write, 5)
        # The preferred endpoint changes before the first attempt fails: the retries
        # still follow on from the endpoint the first attempt went to.
        t._preferred = 2
        with pytest.raises(errors.Unavailable) as info:
            await d
        assert not isinstance(info.value, errors.OutcomeUnknown)
        assert f"(tried {urls[1]}, {urls[2]}, {urls[0]})" in str(info.value)
    finally:
        await t.close()


@pytest_twisted.ensureDeferred
async def test_unreachable_first_endpoint_then_etcd(etcd):
    dead = dead_url()
    client = Client(reactor, [dead, etcd.url], timeout=5)
    try:
        call_plans = []
        real = client._transport._dispatch

        def spy(call, exc=None):
            call_plans.append(call.plan)
            real(call, exc)

        client._transport._dispatch = spy
        await client.set(b"k", b"v")  # never sent to the dead one: safe to move on
        assert call_plans == [None]  # the plan was made by the retry, not before
        assert (await client.get(b"k")).kvs[0].value == b"v"
        assert client._transport.preferred.url == etcd.url
        assert len(call_plans) == 1  # later calls go straight to etcd
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_sent_read_is_retried_sent_write_is_not(listen, etcd):
    closer = Scripted(["close"])
    curl = listen(closer)
    t = transport_for(curl, etcd.url)
    try:
        r = await t.request("/v3/kv/range", b'{"key":"Zm9v"}', False, 5, codec.range_response)
        assert r.kvs == [] and closer.requests == 1
        assert t.preferred.url == etcd.url
    finally:
        await t.close()
    t = transport_for(curl, etcd.url)
    try:
        body = codec.encode({"key": b"w", "value": b"1"})
        with pytest.raises(errors.OutcomeUnknown):
            await t.request("/v3/kv/put", body, True, 5, codec.put_response)
        assert closer.requests == 2  # not re-sent anywhere
        r = await t.request("/v3/kv/range", codec.encode({"key": b"w"}), False, 5,
                            codec.range_response)
        assert r.kvs == []
    finally:
        await t.close()


@pytest_twisted.ensureDeferred
async def test_reads_broken_after_sending_all_move_on_and_writes_do_not(listen, etcd):
    gw = Scripted(["hold"])
    closer = Scripted(["close"])
    t = transport_for(listen(gw), listen(closer), etcd.url)
    try:
        reads = [t.request("/v3/kv/range", codec.encode({"key": b"r%d" % i}), False, 5,
                           codec.range_response) for i in range(3)]
        write = t.request("/v3/kv/put", codec.encode({"key": b"w", "value": b"1"}), True, 5)
        await wait_until(lambda: len(gw.held) == 4)
        gw.drop_held()  # all four were sent; their connections break one after another
        for r in await defer.gatherResults(reads):
            assert r.kvs == [] and r.header.revision > 0
        with pytest.raises(errors.OutcomeUnknown):
            await write
        # Each read: endpoint 0 (sent, broken), then 1 (the closer, sent, broken), then 2.
        assert closer.requests == 3 and gw.requests == 4
        assert t.preferred.url == etcd.url
        r = await t.request("/v3/kv/range", codec.encode({"key": b"w"}), False, 5,
                            codec.range_response)
        assert r.kvs == []  # the write was not re-sent anywhere
    finally:
        await t.close()


INVALID_TOKEN = json.dumps({"error": "etcdserver: invalid auth token", "code": 16,
                            "message": "etcdserver: invalid auth token"}).encode()


@pytest_twisted.ensureDeferred
async def test_authentication_through_a_failover_and_a_token_refresh(listen):
    a, b = range_body(b"a", b"A"), range_body(b"b", b"B")
    gw = Scripted([http_answer(200, b'{"header":{},"token":"T1"}'), http_answer(200, a, 3),
                   http_answer(401, INVALID_TOKEN), http_answer(200, b'{"header":{},"token":"T2"}'),
                   http_answer(200, b)])
    t = transport_for(dead_url(), listen(gw), credentials=("u", "p"))
    try:
        # The authentication request fails over from the dead endpoint to the gateway.
        assert (await t.request("/v3/kv/range", b"{}", False, 5,
                                codec.range_response)).kvs[0].value == b"A"
        assert (await t.request("/v3/kv/range", b"{}", False, 5,
                                codec.range_response)).kvs[0].value == b"B"
        assert gw.requests == 5
        seen = b"".join(gw.seen)
        assert seen.count(b"/v3/auth/authenticate") == 2
        assert seen.count(b"Authorization: T1") == 2 and seen.count(b"Authorization: T2") == 1
    finally:
        await t.close()


@pytest_twisted.ensureDeferred
async def test_answered_calls_are_never_expired_later(etcd):
    t = transport_for(etcd.url)
    calls = []
    expired = []
    real_add = t._deadlines.add
    real_expire = t._deadlines._expire

    def add(call, timeout):
        calls.append(call)
        real_add(call, timeout)

    def expire(call, timeout):
        expired.append(call)
        real_expire(call, timeout)

    t._deadlines.add = add
    t._deadlines._expire = expire
    try:
        for timeout in (0.2, 0.1, 0.15):
            await t.request("/v3/kv/range", b'{"key":"Zm9v"}', False, timeout,
                            codec.range_response)
            await t.request("/v3/kv/put", b'{"key":"Zm9v"}', True, timeout,
                            codec.put_response)
        assert len(calls) == 6 and all(c.done for c in calls)
        await sleep(0.3)
        assert expired == []
        assert t._deadlines._timer is None and t._deadlines._fifos == {}
    finally:
        await t.close()


@pytest_twisted.ensureDeferred
async def test_single_endpoint_gets_exactly_one_extra_try(listen):
    closer = Scripted(["close"])
    url = listen(closer)
    t = transport_for(url)
    try:
        with pytest.raises(errors.Unavailable) as info:
            await t.request("/v3/kv/range", b"{}", False, 5)
        assert closer.requests == 2 and url in str(info.value)
    finally:
        await t.close()


@pytest_twisted.ensureDeferred
async def test_no_leader_moves_on_to_the_next_endpoint(listen, etcd, monkeypatch):
    monkeypatch.setattr(Plan, "UNAVAILABLE_PAUSES", (0.01,) * 3)
    gw = Scripted([http_answer(503, NO_LEADER_BODY)])
    t = transport_for(listen(gw), etcd.url)
    try:
        rev = await t.request("/v3/kv/put", codec.encode({"key": b"n", "value": b"1"}), True,
                              5, codec.put_response)
        assert gw.requests == 1 and t.preferred.url == etcd.url
        r = await t.request("/v3/kv/range", codec.encode({"key": b"n"}), False, 5,
                            codec.range_response)
        assert r.kvs[0].value == b"1" and r.kvs[0].mod_revision == rev.revision
    finally:
        await t.close()


@pytest_twisted.ensureDeferred
async def test_no_leader_then_answer_on_the_same_endpoint(listen, monkeypatch):
    monkeypatch.setattr(Plan, "UNAVAILABLE_PAUSES", (0.01,) * 3)
    ok = range_body(b"k", b"v")
    gw = Scripted([http_answer(503, NO_LEADER_BODY), http_answer(503, NO_LEADER_BODY, 3),
                   http_answer(200, ok, 4)])
    t = transport_for(listen(gw))
    try:
        r = await t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        assert r == codec.range_response(json.loads(ok))
        assert gw.requests == 3
    finally:
        await t.close()


@pytest_twisted.ensureDeferred
async def test_pinned_requests_never_move(listen, etcd):
    closer = Scripted(["close"])
    curl = listen(closer)
    dead = dead_url()
    t = transport_for(curl, etcd.url, dead)
    try:
        with pytest.raises(errors.Unavailable) as info:
            await t.request("/v3/maintenance/status", b"{}", False, 5, endpoint=0)
        assert closer.requests == 2 and etcd.url not in str(info.value)
        with pytest.raises(errors.Unavailable) as info:
            await t.request("/v3/maintenance/status", b"{}", False, 5, endpoint=2)
        assert dead in str(info.value) and etcd.url not in str(info.value)
        status = await t.request("/v3/maintenance/status", b"{}", False, 5,
                                 codec.status_response, endpoint=1)
        assert status.version
        r = await t.request("/v3/kv/range", b'{"key":"Zm9v"}', False, 5, codec.range_response)
        assert r.kvs == []
    finally:
        await t.close()


# ============================================================================================
# attacks on failover: scripted gateways that hang, answer late or answer only
# status; probe rates; close(); queued calls; writes and read-only transactions; the
# watchdog; one endpoint; pinned calls; no deadlines and no checks
# ============================================================================================

READ_TXN = Transaction(compare=[], success=[OpGet(b"k")])
WRITE_TXN = Transaction(compare=[], success=[OpSet(b"k", b"v")])


def fast(path):
    return answer(0.0, path)


def hung(path):
    return HOLD


def coord_timers():
    """The reactor's timers that belong to coord's transports (looks inside the reactor:
    what close() must leave behind is nothing)."""
    return [dc for dc in reactor.getDelayedCalls()
            if getattr(dc.func, "__module__", "").startswith("coord._twisted.")]


def status_and(script):
    """A script that answers status at once (with a leader) and ``script`` otherwise."""
    return lambda path: fast(path) if path == STATUS_PATH else script(path)


STATUS_PATH = "/v3/maintenance/status"
RANGE = "/v3/kv/range"
TXN = "/v3/kv/txn"
PUT = "/v3/kv/put"


@pytest_twisted.ensureDeferred
async def test_one_endpoint_has_no_attempt_deadline_and_no_probes(path_gateway, new_client):
    # One endpoint: nowhere else to go, so a slow answer is waited for (read or write),
    # nothing is re-sent, and nothing probes it.
    url, gw = path_gateway(lambda path: answer(0.6, path))
    client = new_client(url, attempt_timeout=0.1, timeout=5)
    await client.get(b"k")
    await client.set(b"k", b"v")  # no WriteTimeout
    await client.submit(READ_TXN)
    assert (gw.count(RANGE), gw.count(PUT), gw.count(TXN)) == (1, 1, 1)
    await sleep(0.5)
    assert gw.count(STATUS_PATH) == 0


@pytest_twisted.ensureDeferred
async def test_one_endpoint_with_a_watch_does_not_spin(etcd, new_client):
    # A single-endpoint client serving a watch: Health has nothing to check, so the
    # monitor must not wake up at all, let alone in a loop.
    client = new_client(etcd.url)
    d = client.watch(KeySet(b"w/", prefix=True), lambda e: None)
    await d.watcher.ready
    await sleep(1.1)  # past the first check's due time
    cpu = time.process_time()
    await sleep(1.0)
    used = time.process_time() - cpu
    d.cancel()
    assert used < 0.4, f"{used:.2f} s of CPU in 1 s of an idle watch"




# Known intermittent fault: a read next to a hung member sometimes stalls until its 5 s
# call timeout although the other member answers at once.  Seen first through the treq
# transport (a loaded 2-core box, 1 run in ~3 full suites), then once through the pool
# transport too (CI, Python 3.10, the suite without its slow tests): so it lies in what
# both share (coord/_failover.py, or the scripted gateway these tests run in-process),
# not in treq.  Not yet explained.  Marked so it is reported (XPASS/XFAIL), not hidden.
def read_stall_known(request, transport):
    request.applymarker(pytest.mark.xfail(
        reason=f"{transport}: a read next to a hung member can stall to its call timeout "
               "(intermittent, under investigation)", strict=False))


@pytest_twisted.ensureDeferred
async def test_a_demoted_endpoint_is_probed_with_a_growing_pause(path_gateway, new_client,
                                                                 request, transport):
    read_stall_known(request, transport)
    url_h, h = path_gateway(hung)
    url_g, g = path_gateway(fast)
    client = new_client([url_h, url_g], attempt_timeout=0.3, timeout=5)
    await client.get(b"k")  # waits 0.3 s on h, then g answers
    start = reactor.seconds()
    calls, failures, _ = await read_for(client, 3.0)
    assert failures == [] and calls > 20
    assert h.count(RANGE) == 1  # never tried again: it never answered a probe
    probes = h.count(STATUS_PATH, since=start)
    assert 1 <= probes <= 6, probes  # 0.25 s, then doubling: not a storm
    assert g.count(STATUS_PATH) == 0  # nothing checks a member that serves no stream


@pytest_twisted.ensureDeferred
async def test_a_hundred_watches_cost_one_check_per_interval(path_gateway, new_client):
    url_a, a = path_gateway(lambda path: fast(path) if path == STATUS_PATH else HOLD)
    url_b, b = path_gateway(fast)
    client = new_client([url_a, url_b], health_check_interval=0.5)
    watches = [client.watch(b"w/%d" % i, lambda e: None) for i in range(100)]
    await sleep(0.2)
    start = reactor.seconds()
    await sleep(2.0)
    checks = a.count(STATUS_PATH, since=start)
    assert 2 <= checks <= 8, checks  # one per interval for the member, not per watch
    assert b.count(STATUS_PATH) == 0 and b.count("/v3/watch") == 0
    for d in watches:
        d.cancel()


@pytest_twisted.ensureDeferred
async def test_close_while_probing_and_checking_leaves_nothing(path_gateway, new_client,
                                                                      transport):
    # h hangs (demoted, probed); g serves the watch (checked) and holds a read-only
    # transaction (drained by close()); a second read-only transaction was given up.
    url_h, h = path_gateway(hung)
    url_g, g = path_gateway(lambda path: HOLD if path in (TXN, "/v3/watch") else fast(path))
    client = new_client([url_h, url_g], attempt_timeout=0.3, timeout=5)
    await client.get(b"k")  # h demoted after 0.3 s; g answers
    w = client.watch(b"w", lambda e: None)
    given_up = client.submit(READ_TXN, timeout=0.2)
    d = client.submit(READ_TXN)
    with pytest.raises(Timeout):
        await given_up
    await sleep(1.3)  # h is being probed, g's stream checked
    assert h.count(STATUS_PATH) >= 1 and g.count(STATUS_PATH) >= 1
    await client.close()
    with pytest.raises((Unavailable, defer.CancelledError)):
        await d
    await w
    assert coord_timers() == []
    if transport == "pool":
        assert sockets_of(client._transport) == []
    await sleep(0.1)
    assert not h.open and not g.open  # every connection closed
    seen = len(h.requests) + len(g.requests)
    await sleep(1.0)
    assert len(h.requests) + len(g.requests) == seen  # no probe after close


@pytest.mark.parametrize("kind", ["range", "read-only txn"])
@pytest_twisted.ensureDeferred
async def test_calls_queued_for_a_hung_endpoint_move_on(path_gateway, kind):
    # Two connections per endpoint: two calls are sent to the hung member, two wait for
    # a connection to it.  The waiting ones were never sent: when the member is demoted
    # they must go elsewhere too, within the call's timeout -- not wait behind
    # connections that drain (a read-only transaction's stays open up to DRAIN_LIMIT).
    url_h, _ = path_gateway(hung)
    url_g, _ = path_gateway(fast)
    client = Client(reactor, [url_h, url_g], attempt_timeout=0.3, timeout=3,
                    max_connections=2)
    try:
        call = (lambda: client.get(b"k")) if kind == "range" else \
            (lambda: client.submit(READ_TXN))
        started = reactor.seconds()
        results = await defer.DeferredList([call() for _ in range(4)], consumeErrors=True)
        took = reactor.seconds() - started
        failed = [r.value for ok, r in results if not ok]
        assert failed == [], failed
        assert took < 2.0, took
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_read_only_txn_that_moved_drains_and_is_sent_once_each(path_gateway,
                                                                              new_client):
    # h answers after 1.2 s: the attempt deadline (0.3 s) moves the transaction to g;
    # h's connection must stay open until h answers (etcd issue 14110), and neither
    # member gets it twice.
    url_h, h = path_gateway(lambda path: answer(1.2, path))
    url_g, g = path_gateway(fast)
    client = new_client([url_h, url_g], attempt_timeout=0.3, timeout=5)
    await client.submit(READ_TXN)
    await sleep(1.4)
    assert TXN not in h.dropped  # (a probe's status request may be dropped: it is cheap)
    assert (h.count(TXN), g.count(TXN)) == (1, 1)


@pytest_twisted.ensureDeferred
async def test_a_read_only_txn_given_up_on_every_hung_endpoint(path_gateway, new_client):
    # Both members hang for 1.5 s; the caller gives up after 0.8 s.  Each got the
    # transaction once, neither connection was closed before its answer, nothing more
    # was sent after the caller gave up.
    url_a, a = path_gateway(lambda path: answer(1.5, path))
    url_b, b = path_gateway(lambda path: answer(1.5, path))
    client = new_client([url_a, url_b], attempt_timeout=0.3)
    with pytest.raises(Timeout):
        await client.submit(READ_TXN, timeout=0.8)
    await sleep(1.4)
    assert TXN not in a.dropped and TXN not in b.dropped
    assert (a.count(TXN), b.count(TXN)) == (1, 1)


@pytest.mark.parametrize("write", ["put", "txn"])
@pytest_twisted.ensureDeferred
async def test_a_write_is_never_re_sent_after_its_attempt_deadline(path_gateway, new_client,
                                                                         write):
    url_h, h = path_gateway(hung)
    url_g, g = path_gateway(fast)
    client = new_client([url_h, url_g], attempt_timeout=0.3, timeout=5)
    go = (lambda: client.set(b"k", b"v")) if write == "put" else \
        (lambda: client.submit(WRITE_TXN))
    path = PUT if write == "put" else TXN
    with pytest.raises(WriteTimeout):
        await go()
    await sleep(0.5)
    assert (h.count(path), g.count(path)) == (1, 0)
    await go()  # the next one goes to g
    assert (h.count(path), g.count(path)) == (1, 1)


@pytest_twisted.ensureDeferred
async def test_every_attempt_gets_its_deadline_not_a_later_one(path_gateway, new_client):
    # Two reads sent to a hung member 0.05 s apart: each must move on one attempt
    # deadline after it was sent.  (The first one's move must not push the second's
    # deadline back to the moved attempt's.)
    url_h, h = path_gateway(hung)
    url_g, _ = path_gateway(fast)
    client = new_client([url_h, url_g], attempt_timeout=1.0, timeout=10)
    await client.status(endpoint=url_g)  # an idle connection to g, for the first move
    first = client.get(b"k")
    await sleep(0.05)
    started = reactor.seconds()
    await client.get(b"k")
    took = reactor.seconds() - started
    await first
    assert h.count(RANGE) == 2  # both were sent to h
    assert took < 1.5, f"the second read moved on after {took:.2f} s (attempt 1.0 s)"


@pytest_twisted.ensureDeferred
async def test_a_member_that_answers_status_but_hangs_on_reads(path_gateway, new_client,
                                                                request, transport):
    read_stall_known(request, transport)
    # The probe (a status request) says h is fine; its reads hang.  Reads must not keep
    # paying the attempt deadline on h: most reads in a window go straight to g.
    url_h, h = path_gateway(status_and(hung))
    url_g, _ = path_gateway(fast)
    client = new_client([url_h, url_g], attempt_timeout=0.3, timeout=5)
    slow = 0
    start = reactor.seconds()
    while reactor.seconds() - start < 4.0:
        t = reactor.seconds()
        await client.get(b"k")
        if reactor.seconds() - t > 0.25:
            slow += 1
    assert slow <= 4, f"{slow} reads waited for the hung member in 4 s ({h.count(RANGE)} " \
                      f"ranges sent to it)"


@pytest_twisted.ensureDeferred
async def test_pinned_calls_wait_for_their_member_and_demote_nothing(path_gateway,
                                                                           new_client):
    # status and defragment pinned to a slow member: no attempt deadline (nowhere else
    # to go), not sent to the other member, and the slow member is not demoted.
    url_s, s = path_gateway(lambda path: answer(0.6, path))
    url_g, g = path_gateway(fast)
    client = new_client([url_s, url_g], attempt_timeout=0.2, timeout=5)
    await client.status(endpoint=url_s)
    await client.defragment(endpoint=url_s)
    assert (s.count(STATUS_PATH), s.count("/v3/maintenance/defragment")) == (1, 1)
    assert g.requests == []
    assert preferred_url(client) == url_s


@pytest_twisted.ensureDeferred
async def test_no_attempt_deadline_and_no_checks(path_gateway, new_client):
    # attempt_timeout=None: a slow member is waited for (read and write), nothing moves;
    # health_check_interval=None: a member serving a watch is never asked for its status.
    url_s, s = path_gateway(lambda path: HOLD if path == "/v3/watch" else answer(0.6, path))
    url_g, g = path_gateway(fast)
    client = new_client([url_s, url_g], attempt_timeout=None, health_check_interval=None,
                        timeout=5)
    w = client.watch(b"w", lambda e: None)
    await client.get(b"k")
    await client.set(b"k", b"v")
    await client.submit(READ_TXN)
    await sleep(1.2)
    assert (s.count(RANGE), s.count(PUT), s.count(TXN)) == (1, 1, 1)
    assert g.requests == []
    assert s.count(STATUS_PATH) == 0
    assert not w.called
    w.cancel()
