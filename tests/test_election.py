"""Election: Go-compatible leader election against real etcd, across processes where it
matters, and against ``etcdctl elect`` in both directions.

Run on both etcd versions:
``COORD_ETCD=/usr/bin/etcd COORD_ETCDCTL=/usr/bin/etcdctl pytest tests/test_election.py``.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import pytest_twisted
from helpers import (
    Proxy,
    count_is,
    defer_to_exit,
    deferred_readline,
    end_checked_session,
    example,
    finish,
    hung_gateway,
    keys_under,
    lease_ids,
    session_checked_through,
    settle,
    sleep,
    spawn,
    wait_until,
)
from twisted.internet import defer, reactor

from coord import (
    Client,
    Failed,
    InvalidArgument,
    KeySet,
    LeadershipLost,
    Lease,
    NoLeader,
    NotLeader,
    OpSet,
    RequestTooLarge,
    SessionLost,
    Timeout,
    Transaction,
)
from coord.recipes import Election, ElectionState, Leader, run_as_leader
from coord.recipes.election import leader, observe
from coord.server import find_etcdctl
from coord.session import Session

ROOT = Path(__file__).resolve().parent.parent
TTL = 2  # seconds: the candidates' sessions in the cross-process tests


def changes(reports):
    """Reports as (key, value) pairs, None for "no leader"."""
    return [None if r is None else (r.key, r.value) for r in reports]


# -- one process ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_uncontended_campaign_and_resign(pool_client, sessions):
    (session,) = await sessions()
    election = Election(session, "workers")
    assert repr(election) == "<Election b'workers' IDLE>"
    assert election.key == b"workers/" + (b"%x" % session.lease_id)  # Go's layout
    assert await election.campaign(b"me") is election
    kv = (await pool_client.get(election.key)).kvs[0]
    assert kv.value == b"me" and kv.lease == session.lease_id
    assert election.token == kv.create_revision and election.value == b"me"
    assert election.is_leader and election.state is ElectionState.LEADER
    assert repr(election) == f"<Election b'workers' LEADER token={election.token} value=b'me'>"
    current = await election.leader()
    assert (current.key, current.value, current.create_revision) == (
        election.key, b"me", election.token)
    assert current.revision >= election.revision
    await election.resign()
    assert await keys_under(pool_client, b"workers/") == []
    assert election.state is ElectionState.IDLE and not election.is_leader
    with pytest.raises(NoLeader):
        await election.leader()
    await election.resign()  # idempotent
    first = election.token
    await election.campaign("again")  # str is UTF-8
    assert election.token > first and (await leader(pool_client, b"workers")).value == b"again"
    await election.resign()


@pytest_twisted.ensureDeferred
async def test_resign_elects_the_next_at_once_in_order(pool_client, sessions):
    all_sessions = await sessions(4)
    elections = [Election(s, b"queue") for s in all_sessions]
    await elections[0].campaign(b"0")
    pending = []
    for i, e in enumerate(elections[1:], 1):
        pending.append(e.campaign(b"%d" % i))
        await wait_until(lambda i=i: count_is(pool_client, b"queue/", i + 1))
    await sleep(0.2)
    assert not any(d.called for d in pending)
    for i in range(1, 4):
        started = time.monotonic()
        await elections[i - 1].resign()
        await pending[i - 1]
        assert time.monotonic() - started < 0.1  # the bar, in one process
        assert elections[i].is_leader and elections[i].token > elections[i - 1].token
        assert not any(d.called for d in pending[i:])
    await elections[3].resign()


@pytest_twisted.ensureDeferred
async def test_proclaim(pool_client, sessions):
    a, b = await sessions(2)
    ea, eb = Election(a, b"p"), Election(b, b"p")
    with pytest.raises(NotLeader):
        await ea.proclaim(b"x")  # never elected
    await ea.campaign(b"v1")
    revision = await ea.proclaim(b"v2")
    kv = (await pool_client.get(ea.key)).kvs[0]
    assert kv.value == b"v2" and kv.mod_revision == revision and kv.lease == a.lease_id
    assert kv.create_revision == ea.token and ea.value == b"v2"
    d = eb.campaign(b"w")
    await wait_until(lambda: count_is(pool_client, b"p/", 2))
    with pytest.raises(NotLeader):
        await eb.proclaim(b"x")  # campaigning is not leading
    assert (await pool_client.get(eb.key)).kvs[0].value == b"w"
    await ea.resign()
    with pytest.raises(NotLeader):
        await ea.proclaim(b"v3")  # resigned
    await d
    await eb.proclaim(b"w2")
    assert (await eb.leader()).value == b"w2"
    await eb.resign()


@pytest_twisted.ensureDeferred
async def test_campaign_reuses_an_existing_key_and_updates_its_value(pool_client, sessions):
    """Go's Campaign: a key of our lease already there (an earlier campaign) is reused."""
    (s,) = await sessions()
    election = Election(s, b"reuse")
    created = (await pool_client.set(election.key, b"old", lease=s.lease_id)).revision
    await election.campaign(b"new")
    assert election.token == created
    assert (await pool_client.get(election.key)).kvs[0].value == b"new"
    await election.resign()


@pytest_twisted.ensureDeferred
async def test_timeout_and_cancel_leave_no_key(pool_client, sessions):
    a, b = await sessions(2)
    holder = Election(a, b"to")
    await holder.campaign(b"h")
    waiter = Election(b, b"to")
    started = time.monotonic()
    with pytest.raises(Timeout):
        await waiter.campaign(b"w", timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 2.0
    assert waiter.state is ElectionState.IDLE
    assert await keys_under(pool_client, b"to/") == [holder.key]
    d = waiter.campaign(b"w")  # cancelled while waiting
    await wait_until(lambda: count_is(pool_client, b"to/", 2))
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    assert await keys_under(pool_client, b"to/") == [holder.key]
    d = waiter.campaign(b"w")  # cancelled with its first transaction in flight
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    assert await keys_under(pool_client, b"to/") == [holder.key]
    d = waiter.campaign(b"w")  # resign() while campaigning gives the campaign up
    await wait_until(lambda: count_is(pool_client, b"to/", 2))
    await waiter.resign()
    with pytest.raises(defer.CancelledError):
        await d
    assert await keys_under(pool_client, b"to/") == [holder.key]
    with pytest.raises(Timeout):
        await waiter.campaign(b"w", timeout=0)
    assert await keys_under(pool_client, b"to/") == [holder.key]
    await holder.resign()


@pytest_twisted.ensureDeferred
async def test_bad_input_is_refused_and_leaves_nothing(pool_client, sessions):
    (s,) = await sessions()
    before = await lease_ids(pool_client)
    with pytest.raises(TypeError):
        Election(s, 42)
    with pytest.raises(TypeError):
        Election(pool_client, b"x")  # a client is not a session
    with pytest.raises(InvalidArgument):
        Election(s, b"")
    election = Election(s, b"bad")
    with pytest.raises(TypeError):
        election.campaign(42)
    with pytest.raises(TypeError):
        election.campaign(b"v", timeout="soon")
    with pytest.raises(InvalidArgument):
        election.campaign(b"v", timeout=-1)
    with pytest.raises(TypeError):
        election.proclaim(None)
    with pytest.raises(RequestTooLarge):
        await election.campaign(b"x" * (2 * 1024 * 1024))
    assert election.state is ElectionState.IDLE
    with pytest.raises(NotLeader):
        election.guard()  # never elected
    with pytest.raises(TypeError):
        observe(pool_client, b"bad", callback="print")
    with pytest.raises(TypeError):
        run_as_leader(pool_client, b"bad", b"v", fn=None)
    with pytest.raises(TypeError):
        Session.resume(pool_client, "1")
    with pytest.raises(InvalidArgument):
        Session.resume(pool_client, 0)
    # one Election object per session and name; one campaign at a time
    await election.campaign(b"v")
    with pytest.raises(InvalidArgument):
        election.campaign(b"v")
    with pytest.raises(InvalidArgument):
        Election(s, b"bad").campaign(b"v")
    await election.resign()
    assert await keys_under(pool_client, b"bad/") == []
    assert await lease_ids(pool_client) == before


BAD_WAIT_TIMEOUTS = [
    (-1, InvalidArgument), (-0.5, InvalidArgument), (math.nan, InvalidArgument),
    (-math.inf, InvalidArgument), ("5", TypeError), (True, TypeError), ([5], TypeError),
]


@pytest.mark.parametrize(("timeout", "exc"), BAD_WAIT_TIMEOUTS)
@pytest_twisted.ensureDeferred
async def test_bad_campaign_timeouts_are_refused_and_leave_nothing(pool_client, sessions,
                                                                   timeout, exc):
    (s,) = await sessions()
    election = Election(s, b"bt")
    with pytest.raises(exc, match="timeout"):
        election.campaign(b"v", timeout=timeout)
    with pytest.raises(exc, match="timeout"):
        election.resume(timeout=timeout)
    assert election.state is ElectionState.IDLE
    assert await keys_under(pool_client, b"bt/") == []


@pytest.mark.parametrize(("kwargs", "exc", "named"), [
    ({"ttl": 0}, InvalidArgument, "ttl"), ({"ttl": -5}, InvalidArgument, "ttl"),
    ({"ttl": 9_000_000_001}, InvalidArgument, "ttl"), ({"ttl": "10"}, TypeError, "ttl"),
    ({"ttl": 2.5}, TypeError, "ttl"),
    ({"retry_pause": -1}, InvalidArgument, "retry_pause"),
    ({"retry_pause": math.nan}, InvalidArgument, "retry_pause"),
    ({"retry_pause": math.inf}, InvalidArgument, "retry_pause"),
    ({"retry_pause": None}, TypeError, "retry_pause"),
    ({"retry_pause": "1"}, TypeError, "retry_pause"),
])
@pytest_twisted.ensureDeferred
async def test_bad_run_as_leader_options_are_refused_at_once(pool_client, kwargs, exc, named):
    before = await lease_ids(pool_client)
    with pytest.raises(exc, match=named):  # raised by the call: nothing started
        run_as_leader(pool_client, b"bt", b"v", lambda e: None, **kwargs)
    assert await lease_ids(pool_client) == before
    assert await keys_under(pool_client, b"bt/") == []


@pytest_twisted.ensureDeferred
async def test_campaign_with_timeout_zero_leads_a_free_election(pool_client, sessions):
    """timeout=0 means "do not wait", as Lock.acquire(timeout=0): elected at once if no
    candidate came before us (a 0 s timer cancelled even that before), else Timeout at
    once, our key removed."""
    a, b = await sessions(2)
    first = Election(a, b"z0")
    await first.campaign(b"a", timeout=0)
    assert first.is_leader and await keys_under(pool_client, b"z0/") == [first.key]
    second = Election(b, b"z0")
    started = time.monotonic()
    with pytest.raises(Timeout, match="timeout=0"):
        await second.campaign(b"b", timeout=0)
    assert time.monotonic() - started < 2.0
    assert second.state is ElectionState.IDLE
    assert await keys_under(pool_client, b"z0/") == [first.key]
    await first.resign()
    await second.campaign(b"b", timeout=0)  # free now
    assert second.is_leader
    await second.resign()
    assert await keys_under(pool_client, b"z0/") == []


@pytest_twisted.ensureDeferred
async def test_guard_and_lost_when_the_key_is_deleted(pool_client, sessions):
    (s,) = await sessions()
    election = Election(s, b"g")
    await election.campaign(b"me")
    lost = election.lost
    await pool_client.submit(Transaction(compare=[election.guard()],
                                         success=[OpSet(b"res", b"1")]))
    await pool_client.delete(election.key)  # an operator removes it (etcdctl del)
    reason = await lost
    assert isinstance(reason, LeadershipLost)
    assert election.state is ElectionState.LOST and not election.is_leader
    assert isinstance(await election.lost, LeadershipLost)  # fired already
    with pytest.raises(Failed):
        await pool_client.submit(Transaction(compare=[election.guard()],
                                             success=[OpSet(b"res", b"2")]))
    with pytest.raises(NotLeader):
        await election.proclaim(b"x")
    assert (await pool_client.get(b"res")).kvs[0].value == b"1"
    await election.resign()
    assert election.state is ElectionState.IDLE
    # a proclaim that finds the key gone reports the loss too
    await election.campaign(b"me")
    lost = election.lost
    await pool_client.delete(election.key)
    with pytest.raises(NotLeader):
        await election.proclaim(b"x")
    assert isinstance(await lost, LeadershipLost)
    assert await keys_under(pool_client, b"g/") == []
    await election.resign()


@pytest_twisted.ensureDeferred
async def test_a_campaign_never_succeeds_after_its_session_ended(pool_client, sessions):
    """Go's Campaign returns success once its predecessors are gone, even if its own key
    went with its expired session meanwhile; coord's proves its key in the final read."""
    a, b = await sessions(2, ttl=5)
    holder, waiter = Election(a, b"dead"), Election(b, b"dead")
    await holder.campaign(b"h")
    d = waiter.campaign(b"w")
    await wait_until(lambda: count_is(pool_client, b"dead/", 2))
    # The lease ends on the server; the holder resigns before the waiter's session can
    # notice (its next keep-alive is seconds away): only the guarded read stands between.
    await b.lease.revoke()
    await holder.resign()
    with pytest.raises(SessionLost):
        await d
    assert waiter.state is ElectionState.IDLE and not b.alive
    assert await keys_under(pool_client, b"dead/") == []
    with pytest.raises(SessionLost):
        await waiter.campaign(b"w")


@pytest_twisted.ensureDeferred
async def test_candidate_key_deleted_while_waiting(pool_client, sessions):
    a, b = await sessions(2)
    holder, waiter = Election(a, b"gone"), Election(b, b"gone")
    await holder.campaign(b"h")
    d = waiter.campaign(b"w")
    await wait_until(lambda: count_is(pool_client, b"gone/", 2))
    await pool_client.delete(waiter.key)
    await holder.resign()
    with pytest.raises(LeadershipLost):
        await d
    assert waiter.state is ElectionState.IDLE and b.alive
    await waiter.campaign(b"w")  # the session is fine: it can stand again
    await waiter.resign()


@pytest_twisted.ensureDeferred
async def test_session_end_while_leading_fires_lost(pool_client, sessions):
    (s,) = await sessions(ttl=5)
    election = Election(s, b"sl")
    await election.campaign(b"me")
    lost = election.lost
    await s.lease.revoke()
    reason = await lost
    assert isinstance(reason, (SessionLost, LeadershipLost))
    assert election.state is ElectionState.LOST
    with pytest.raises(Failed):
        await pool_client.submit(Transaction(compare=[election.guard()],
                                             success=[OpSet(b"res", b"x")]))
    with pytest.raises(SessionLost):
        await election.campaign(b"me")  # noticed by the next keep-alive at the latest


@pytest_twisted.ensureDeferred
async def test_unreachable_server_past_the_ttl_loses_leadership(etcd_factory):
    server = etcd_factory()
    client = Client(reactor, server.url, timeout=2.0)
    try:
        session = await Session.create(client, ttl=2)
        election = Election(session, b"far")
        await election.campaign(b"me")
        lost = election.lost
        server.pause()
        try:
            reason = await lost  # at the session's deadline, while etcd cannot answer
            assert isinstance(reason, SessionLost)
            assert not election.is_leader and election.state is ElectionState.LOST
        finally:
            server.resume()
        await wait_until(lambda: count_is(client, b"far/", 0))
    finally:
        await client.close()


# -- bad input ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_bad_timeouts_are_typed_and_write_nothing(pool_client, sessions):
    (s,) = await sessions()
    election = Election(s, b"bt")
    for bad, error in ((math.nan, InvalidArgument), (-math.inf, InvalidArgument),
                       (-0.001, InvalidArgument), (True, TypeError), ("1", TypeError)):
        with pytest.raises(error, match="timeout"):
            election.campaign(b"v", timeout=bad)
        with pytest.raises(error, match="timeout"):
            election.resume(timeout=bad)
        assert election.state is ElectionState.IDLE
    for bad in (None, 1, ["v"], object()):
        with pytest.raises(TypeError, match="value"):
            election.campaign(bad)
    for bad in (None, 1, 1.5, ["a"], object()):
        with pytest.raises(TypeError, match="name"):
            Election(s, bad)
        with pytest.raises(TypeError, match="name"):
            leader(pool_client, bad)
        with pytest.raises(TypeError, match="name"):
            observe(pool_client, bad)
    await sleep(0.2)
    assert await keys_under(pool_client, b"") == []
    assert await lease_ids(pool_client) == [s.lease_id]
    # nothing stuck: an infinite timeout means none
    await election.campaign(b"v", timeout=math.inf)
    await election.resign()


@pytest_twisted.ensureDeferred
async def test_run_as_leader_bad_ttl_leaks_nothing(pool_client):
    before = await lease_ids(pool_client)
    for bad in (0, -1, True, 1.5, "5", math.nan):
        try:
            d = run_as_leader(pool_client, b"rbt", b"v", lambda e: None, ttl=bad)
        except (TypeError, InvalidArgument):
            continue
        with pytest.raises((TypeError, InvalidArgument)):
            await d
    await sleep(0.2)
    assert await lease_ids(pool_client) == before
    assert await keys_under(pool_client, b"rbt/") == []


@pytest_twisted.ensureDeferred
async def test_run_as_leader_bad_retry_pause_is_refused_at_once(pool_client, sessions):
    (holder_session,) = await sessions()
    holder = Election(holder_session, b"rbp")
    await holder.campaign(b"h")
    outcome = []
    for bad in (math.nan, -1.0):
        try:
            d = run_as_leader(pool_client, b"rbp", b"v", lambda e: None, retry_pause=bad)
        except (TypeError, InvalidArgument) as exc:
            outcome.append(type(exc).__name__)
            continue
        # accepted: make the campaign fail in a retryable way (its key deleted)
        await wait_until(lambda: count_is(pool_client, b"rbp/", 2))
        keys = await keys_under(pool_client, b"rbp/")
        (theirs,) = [k for k in keys if k != holder.key]
        await pool_client.delete(theirs)
        await holder.resign()  # the waiter reads again: its key is gone -> a retry
        try:
            await defer.ensureDeferred(_first_of(d, 3.0))
            outcome.append("no error")
        except Exception as exc:
            outcome.append(type(exc).__name__)
        await settle(pool_client, b"rbp/", [], [holder_session.lease_id])
        await holder.campaign(b"h")
    await holder.resign()
    assert outcome == ["InvalidArgument", "InvalidArgument"]


async def _first_of(d, timeout):
    """``d``'s outcome, or cancel it after ``timeout`` s (then CancelledError)."""
    timer = reactor.callLater(timeout, d.cancel)
    try:
        return await d
    finally:
        if timer.active():
            timer.cancel()


# -- campaign races -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_campaign_while_campaigning_is_refused_and_the_first_goes_on(pool_client,
                                                                            sessions):
    a, b = await sessions(2)
    holder, waiter = Election(a, b"cc"), Election(b, b"cc")
    await holder.campaign(b"h")
    d = waiter.campaign(b"w1")
    with pytest.raises(InvalidArgument):
        waiter.campaign(b"w2")  # at once, nothing sent
    with pytest.raises(InvalidArgument):
        waiter.resume()
    await wait_until(lambda: count_is(pool_client, b"cc/", 2))
    assert (await pool_client.get(waiter.key)).kvs[0].value == b"w1"
    await holder.resign()
    await d
    assert waiter.is_leader and waiter.value == b"w1"
    assert (await leader(pool_client, b"cc")).value == b"w1"
    await waiter.resign()


@pytest_twisted.ensureDeferred
async def test_fire_and_forget_resign_then_campaign_again(pool_client, sessions):
    """resign() not awaited, then campaign() at once: the resign's delete must not remove
    the new candidacy, and the new campaign must not adopt the old key."""
    (s,) = await sessions()
    election = Election(s, b"ff")
    for _ in range(5):
        await election.campaign(b"one")
        first = election.token
        election.resign()  # not awaited
        await election.campaign(b"two")
        assert election.token > first
        await sleep(0.1)
        kvs = (await pool_client.get(election.key)).kvs
        assert kvs and kvs[0].create_revision == election.token and kvs[0].value == b"two"
        assert election.is_leader
        await election.resign()
    assert await keys_under(pool_client, b"ff/") == []


@pytest_twisted.ensureDeferred
async def test_resign_right_after_a_contended_campaign_starts_then_campaign(pool_client,
                                                                           sessions):
    """resign() with the first transaction in flight, then campaign at once: the clean-up
    (which learns our token only when that transaction answers) must not delete the key of
    the new campaign."""
    a, b = await sessions(2)
    holder, waiter = Election(a, b"rr"), Election(b, b"rr")
    await holder.campaign(b"h")
    for _ in range(5):
        d1 = waiter.campaign(b"w1")
        waiter.resign()  # not awaited
        d2 = waiter.campaign(b"w2")
        with pytest.raises(defer.CancelledError):
            await d1
        await wait_until(lambda: count_is(pool_client, b"rr/", 2))
        await sleep(0.2)
        kvs = (await pool_client.get(waiter.key)).kvs
        assert kvs and kvs[0].value == b"w2"
        assert waiter.state is ElectionState.CAMPAIGNING and not d2.called
        d2.cancel()
        with pytest.raises(defer.CancelledError):
            await d2
        assert await keys_under(pool_client, b"rr/") == [holder.key]
    await holder.resign()


@pytest_twisted.ensureDeferred
async def test_two_election_objects_on_one_lease_cannot_delete_each_other(pool_client,
                                                                          sessions):
    (s,) = await sessions()
    a = Election(s, b"two")
    await a.campaign(b"a")
    b = Election(s, b"two")
    with pytest.raises(InvalidArgument):
        b.campaign(b"b")
    await b.resign()  # never campaigned: must delete nothing
    assert (await pool_client.get(a.key)).kvs[0].value == b"a"
    with pytest.raises(NotLeader):
        await b.proclaim(b"b")
    assert a.is_leader
    await a.resign()


# -- third parties on our key ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_proclaim_after_our_key_was_recreated_by_a_third_party(pool_client, sessions):
    """Someone deletes our key and writes it again (same name, no lease): it is not ours
    any more.  proclaim must say NotLeader, leave their value, and `lost` must fire."""
    (s,) = await sessions()
    election = Election(s, b"recreated")
    await election.campaign(b"mine")
    lost = election.lost
    await pool_client.delete(election.key)
    await pool_client.set(election.key, b"theirs")
    reason = await _first_of(lost, 5)
    assert isinstance(reason, LeadershipLost)
    with pytest.raises(NotLeader):
        await election.proclaim(b"mine again")
    kv = (await pool_client.get(election.key)).kvs[0]
    assert (kv.value, kv.lease) == (b"theirs", 0)
    with pytest.raises(Failed):
        await pool_client.submit(Transaction(compare=[election.guard()],
                                             success=[OpSet(b"res", b"x")]))
    await election.resign()  # guarded: their key stays
    assert (await pool_client.get(election.key)).kvs[0].value == b"theirs"
    await pool_client.delete(election.key)


@pytest_twisted.ensureDeferred
async def test_campaign_does_not_adopt_a_key_outside_our_lease(pool_client):
    s = await Session.create(pool_client, ttl=5)
    election = Election(s, b"adopt")
    await pool_client.set(election.key, b"v")  # a stray key with our name, no lease
    try:
        await election.campaign(b"v", timeout=5)
        adopted = True
    except (InvalidArgument, LeadershipLost, NotLeader):
        adopted = False
    await s.close()
    left = await keys_under(pool_client, b"adopt/")
    await pool_client.delete(election.key)
    # either refused, or the key is ours (attached to our lease: gone with the session)
    assert left == [] or not adopted, (adopted, left)
    assert left == []


# -- leader() -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_leader_of_names_that_are_prefixes_of_each_other(pool_client, sessions):
    a, b = await sessions(2)
    e, e2 = Election(a, b"e"), Election(b, b"e2")
    with pytest.raises(NoLeader):
        await leader(pool_client, b"e")
    await e2.campaign(b"in e2")  # "e2/..." does not sort under "e/"
    with pytest.raises(NoLeader):
        await leader(pool_client, b"e")
    seen = []
    observation = observe(pool_client, b"e", seen.append)
    await observation.ready
    await e.campaign(b"in e", timeout=5)  # not blocked by e2's leader
    await e2.proclaim(b"in e2 v2")
    await e.resign()
    await wait_until(lambda: len(seen) == 3)
    await sleep(0.1)
    assert changes(seen) == [None, (e.key, b"in e"), None]
    assert (await leader(pool_client, "e2")).value == b"in e2 v2"
    observation.close()
    await e2.resign()


@pytest_twisted.ensureDeferred
async def test_leader_with_only_a_waiting_candidate(pool_client, sessions):
    """The leader's key is gone but the next candidate has not yet run its check: etcd's
    rule (lowest create revision) names it the leader already, as Go's Leader does."""
    a, b = await sessions(2)
    ea, eb = Election(a, b"wc"), Election(b, b"wc")
    await ea.campaign(b"a")
    d = eb.campaign(b"b")
    await wait_until(lambda: count_is(pool_client, b"wc/", 2))
    await pool_client.delete(ea.key)  # not a resign: ea has not noticed yet either
    current = await leader(pool_client, b"wc")
    assert (current.key, current.value) == (eb.key, b"b")
    await d
    assert eb.token == current.create_revision
    await eb.resign()
    await ea.resign()


# -- lost, and re-entrant calls from callbacks ----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_campaign_again_from_the_lost_callback(pool_client, sessions):
    (s,) = await sessions()
    election = Election(s, b"reent")
    await election.campaign(b"first")
    first = election.token
    again = []
    other = election.lost  # a second observer, fired after the first one's campaign

    def on_lost(reason):
        again.append(election.campaign(b"second", timeout=5))

    election.lost.addCallback(on_lost)
    await pool_client.delete(election.key)
    await wait_until(lambda: again)
    await again[0]
    assert isinstance(await other, LeadershipLost)
    assert election.is_leader and election.token > first and election.value == b"second"
    kv = (await pool_client.get(election.key)).kvs[0]
    assert (kv.create_revision, kv.value) == (election.token, b"second")
    # the new leadership has its own `lost`: a stale observer of the old one does not
    # fire again, the new one fires on the new loss
    lost = election.lost
    await sleep(0.2)
    assert not lost.called
    await pool_client.delete(election.key)
    assert isinstance(await _first_of(lost, 5), LeadershipLost)
    await election.resign()


@pytest_twisted.ensureDeferred
async def test_resign_from_the_lost_callback_fires_the_other_observers(pool_client, sessions):
    (s,) = await sessions()
    election = Election(s, b"reres")
    await election.campaign(b"x")
    fired = []
    election.lost.addCallback(lambda r: (fired.append(1), election.resign()))
    election.lost.addCallback(lambda r: fired.append(2))
    await pool_client.delete(election.key)
    await wait_until(lambda: len(fired) == 2)
    assert election.state is ElectionState.IDLE
    await election.campaign(b"y", timeout=5)
    await election.resign()


# -- observe --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_observe_reports_every_change_once_in_order(pool_client, sessions):
    a, b = await sessions(2)
    seen = []
    observation = observe(pool_client, b"obs", seen.append)
    assert await observation.ready is None  # nobody stands yet
    iterated = Election(a, b"obs").observe()  # the same, as an async iterator
    assert await iterated.ready is None
    ea, eb = Election(a, b"obs"), Election(b, b"obs")
    await ea.campaign(b"a1")
    d = eb.campaign(b"b1")
    await wait_until(lambda: count_is(pool_client, b"obs/", 2))
    await ea.proclaim(b"a1")  # the same value: no change
    await ea.proclaim(b"a2")
    await ea.resign()
    await d
    await pool_client.set(b"obs-other", b"x")  # outside the prefix
    await eb.proclaim(b"b2")
    await eb.resign()
    await ea.campaign(b"a3")
    await ea.resign()
    expected = [None, (ea.key, b"a1"), (ea.key, b"a2"), (eb.key, b"b1"), (eb.key, b"b2"),
                None, (ea.key, b"a3"), None]
    await wait_until(lambda: len(seen) == len(expected), timeout=5)
    await sleep(0.1)
    assert changes(seen) == expected
    revisions = [r.revision for r in seen if r is not None]
    assert revisions == sorted(revisions)
    assert seen[3].create_revision == eb.token
    got = []
    safety = reactor.callLater(10, iterated.close)  # never hang the suite
    async for report in iterated:
        got.append(report)
        if len(got) == len(expected):
            iterated.close()
    safety.cancel()
    assert changes(got) == expected
    observation.close()
    assert await observation.done is None
    assert repr(observation).startswith("<Observation b'obs' CLOSED")


@pytest_twisted.ensureDeferred
async def test_observe_starts_with_the_current_leader(pool_client, sessions):
    a, b = await sessions(2)
    ea, eb = Election(a, b"cur"), Election(b, b"cur")
    await ea.campaign(b"a")
    d = eb.campaign(b"b")
    await wait_until(lambda: count_is(pool_client, b"cur/", 2))
    async with eb.observe() as observation:
        first = await observation.ready
        assert isinstance(first, Leader) and (first.key, first.value) == (ea.key, b"a")
        assert first.create_revision == ea.token
        await ea.resign()
        await d
        reports = [await observation.__anext__(), await observation.__anext__()]
    assert changes(reports) == [(ea.key, b"a"), (eb.key, b"b")]
    await eb.resign()


async def _changes_while_disconnected(etcd, sessions, pool_client, compact):
    proxy = Proxy(etcd.url)
    far = Client(reactor, proxy.url, timeout=2.0)
    try:
        a, b, c = await sessions(3)
        ea, eb, ec = Election(a, b"dis"), Election(b, b"dis"), Election(c, b"dis")
        await ea.campaign(b"a")
        seen = []
        observation = observe(far, b"dis", seen.append)
        await observation.ready
        await proxy.cut()
        # The shape of etcd issue 18163: several candidates come and go while the
        # observer is away; it must never name one that is not the leader then.
        db = eb.campaign(b"b")
        await wait_until(lambda: count_is(pool_client, b"dis/", 2))
        await ea.resign()
        await db
        await eb.proclaim(b"b2")
        dc = ec.campaign(b"c")
        await wait_until(lambda: count_is(pool_client, b"dis/", 2))
        await eb.resign()
        await dc
        if compact:
            current = (await pool_client.get(b"dis-none")).header.revision
            await pool_client.compact(current, physical=True)
        await sleep(0.3)
        proxy.restore()
        await wait_until(lambda: seen and seen[-1] is not None and seen[-1].value == b"c",
                         timeout=10)
        await ec.proclaim(b"c2")
        await wait_until(lambda: seen[-1].value == b"c2", timeout=5)
        await sleep(0.1)
        observation.close()
        await ec.resign()
        return changes(seen), observation.resyncs, (ea.key, eb.key, ec.key)
    finally:
        await far.close()
        await proxy.close()


@pytest_twisted.ensureDeferred
async def test_observe_across_a_disconnect(etcd, pool_client, sessions):
    seen, resyncs, (ka, kb, kc) = await _changes_while_disconnected(
        etcd, sessions, pool_client, compact=False)
    # what happened while away is reported after the reconnect, in order, once each
    assert seen == [(ka, b"a"), (kb, b"b"), (kb, b"b2"), (kc, b"c"), (kc, b"c2")]
    assert resyncs == 0


@pytest_twisted.ensureDeferred
async def test_observe_across_a_compaction(etcd_factory):
    server = etcd_factory()  # a private server: this test compacts its history
    client = Client(reactor, server.url)
    made = []

    async def sessions(n):
        made.extend([await Session.create(client, ttl=5) for _ in range(n)])
        return made[-n:]

    try:
        seen, resyncs, (ka, _, kc) = await _changes_while_disconnected(
            server, sessions, client, compact=True)
        # the history missed is gone: the current leader is reported, once
        assert seen == [(ka, b"a"), (kc, b"c"), (kc, b"c2")]
        assert resyncs == 1
    finally:
        for s in made:
            await s.close()
        await client.close()


@pytest_twisted.ensureDeferred
async def test_observe_callback_that_raises_does_not_stop_reports(pool_client, sessions):
    (s,) = await sessions()
    election = Election(s, b"oraise")
    seen = []

    def callback(state):
        seen.append(state)
        raise RuntimeError("observer bug")

    observation = observe(pool_client, b"oraise", callback)
    await observation.ready
    await election.campaign(b"a")
    await election.proclaim(b"b")
    await election.resign()
    await wait_until(lambda: len(seen) == 4)
    assert changes(seen) == [None, (election.key, b"a"), (election.key, b"b"), None]
    assert not observation.done.called
    observation.close()


@pytest_twisted.ensureDeferred
async def test_observe_callback_that_closes_gets_nothing_more(pool_client, sessions):
    (s,) = await sessions()
    election = Election(s, b"oclose")
    await election.campaign(b"a")
    seen = []
    observation = None

    def callback(state):
        seen.append(state)
        if state is not None and state.value == b"b":
            observation.close()

    observation = observe(pool_client, b"oclose", callback)
    await observation.ready
    # several revisions in one watch response: closing on the first must stop the rest
    await election.proclaim(b"b")
    await election.proclaim(b"c")
    await election.proclaim(b"d")
    await election.resign()
    assert await _first_of(observation.done, 5) is None
    await sleep(0.3)
    assert changes(seen) == [(election.key, b"a"), (election.key, b"b")]


@pytest_twisted.ensureDeferred
async def test_close_right_after_ready_reports_nothing_more(pool_client):
    seen = []
    observation = observe(pool_client, b"oready", seen.append)
    await observation.ready
    observation.close()
    after_close = list(seen)
    iterated = observe(pool_client, b"oready")
    await iterated.ready
    iterated.close()
    await sleep(0.1)
    got = [r async for r in iterated]
    assert (after_close, seen, got) == ([], [], [])


@pytest_twisted.ensureDeferred
async def test_observe_callback_drives_the_election_reentrantly(pool_client, sessions):
    """An observer that resigns the leader as soon as it sees it, and campaigns the other
    when it sees no leader: every report must still be the truth, in order, once each."""
    a, b = await sessions(2)
    ea, eb = Election(a, b"odrive"), Election(b, b"odrive")
    seen, first, second = [], [], []
    done = defer.Deferred()

    # The observer may see a candidate lead before its campaign() has returned (the watch
    # event can come before the transaction's answer), and resign() while campaigning
    # gives the campaign up: resign once the campaign has returned.
    def callback(state):
        seen.append(state)
        if state is not None and state.key == ea.key:
            first[0].addCallback(lambda _: ea.resign())
        elif state is not None and state.key == eb.key:
            second[0].addCallback(lambda _: eb.resign())
        elif state is None and len(seen) == 3:
            second.append(eb.campaign(b"b", timeout=5))
        elif state is None and len(seen) == 5:
            done.callback(None)

    watcher = observe(pool_client, b"odrive")  # a second observer, as an iterator
    await watcher.ready
    observation = observe(pool_client, b"odrive", callback)
    await observation.ready
    first.append(ea.campaign(b"a"))
    await _first_of(done, 10)
    await first[0]
    await second[0]
    assert changes(seen) == [None, (ea.key, b"a"), None, (eb.key, b"b"), None]
    got = []
    while len(got) < 5:
        got.append(await _first_of(defer.ensureDeferred(watcher.__anext__()), 5))
    assert changes(got) == changes(seen)
    assert [r.revision for r in got if r] == [r.revision for r in seen if r]
    observation.close()
    watcher.close()


@pytest_twisted.ensureDeferred
async def test_two_observers_agree_under_churn(pool_client, sessions):
    all_sessions = await sessions(4)
    elections = [Election(s, b"churn") for s in all_sessions]
    one, two = [], []
    o1 = observe(pool_client, b"churn", one.append)
    await o1.ready
    o2 = observe(pool_client, b"churn", two.append)
    await o2.ready
    pending = []
    for i, e in enumerate(elections):  # queued in this order
        pending.append(e.campaign(b"%d" % i))
        await wait_until(lambda i=i: count_is(pool_client, b"churn/", i + 1))
    for round_ in range(3):
        for i, e in enumerate(elections):
            await _first_of(pending[i], 5)
            await e.proclaim(b"%d-%d" % (i, round_))
            await e.resign()
            pending[i] = e.campaign(b"%d" % i)
    for i, e in enumerate(elections):
        pending[i].cancel()
        pending[i].addErrback(lambda f: None)
        await e.resign()
    await wait_until(lambda: one and one[-1] is None and two and two[-1] is None)
    await sleep(0.2)
    assert changes(one) == changes(two)
    assert [r.revision for r in one if r] == [r.revision for r in two if r]
    revs = [r.revision for r in one if r]
    assert revs == sorted(revs) and len(set(revs)) == len(revs)
    # no two consecutive reports are the same state
    assert all(changes([x]) != changes([y]) for x, y in itertools.pairwise(one))
    o1.close()
    o2.close()


# -- observe across a restart with a compaction, and a killed cluster member ------------------


@pytest_twisted.ensureDeferred
async def test_observe_across_a_restart_and_a_compaction(etcd_factory):
    server = etcd_factory()
    client = Client(reactor, server.url, timeout=5.0)
    proxy = Proxy(server.url)
    far = Client(reactor, proxy.url, timeout=2.0)
    made = []
    try:
        for _ in range(3):
            made.append(await Session.create(client, ttl=20))
        ea, eb, ec = (Election(s, b"rc") for s in made)
        await ea.campaign(b"a")
        seen = []
        observation = observe(far, b"rc", seen.append)
        await observation.ready
        await proxy.cut()
        db = eb.campaign(b"b")
        await wait_until(lambda: count_is(client, b"rc/", 2))
        await ea.resign()
        await db
        dc = ec.campaign(b"c")
        await wait_until(lambda: count_is(client, b"rc/", 2))
        await eb.resign()
        await dc
        current = (await client.get(b"none")).header.revision
        await client.compact(current, physical=True)
        server.restart()
        await wait_until(lambda: client.get(b"none").addCallbacks(lambda _: True,
                                                                  lambda _: False),
                         timeout=20)
        proxy.restore()
        await wait_until(lambda: seen and seen[-1] is not None and seen[-1].value == b"c",
                         timeout=15)
        await ec.proclaim(b"c2")
        await wait_until(lambda: seen[-1].value == b"c2", timeout=10)
        await sleep(0.1)
        assert changes(seen) == [(ea.key, b"a"), (ec.key, b"c"), (ec.key, b"c2")]
        assert observation.resyncs == 1
        assert not observation.done.called
        observation.close()
        await ec.resign()
    finally:
        for s in made:
            await s.close()
        await far.close()
        await proxy.close()
        await client.close()


@pytest_twisted.ensureDeferred
async def test_observe_on_a_cluster_when_the_observed_member_is_killed(etcd_cluster):
    members = etcd_cluster.members
    watcher = Client(reactor, [m.url for m in members], timeout=3.0)
    writer = None
    made = []
    try:
        seen = []
        observation = observe(watcher, b"cl", seen.append)
        await observation.ready
        stream = observation._watch.watcher._stream
        served_by = getattr(stream, "endpoint", None)
        (victim,) = [m for m in members if served_by is not None and served_by.url == m.url]
        writer = Client(reactor, [m.url for m in members if m is not victim], timeout=5.0)
        for _ in range(2):
            made.append(await Session.create(writer, ttl=15))
        ea, eb = (Election(s, b"cl") for s in made)
        await ea.campaign(b"a")
        await wait_until(lambda: len(seen) == 2)
        victim.kill()
        # the victim may have been raft's leader: wait until the others take writes
        await wait_until(lambda: writer.set(b"probe", b"x").addCallbacks(
            lambda _: True, lambda _: False), timeout=40, interval=0.2)
        db = eb.campaign(b"b", timeout=20)
        await wait_until(lambda: count_is(writer, b"cl/", 2), timeout=20)
        await ea.resign()
        await db
        await eb.proclaim(b"b2")
        await wait_until(lambda: seen and seen[-1] is not None and seen[-1].value == b"b2",
                         timeout=20)
        await eb.resign()
        await wait_until(lambda: seen[-1] is None, timeout=10)
        assert changes(seen) == [None, (ea.key, b"a"), (eb.key, b"b"), (eb.key, b"b2"), None]
        observation.close()
    finally:
        for s in made:
            await s.close().addErrback(lambda _: None)
        await watcher.close()
        if writer is not None:
            await writer.close()


# -- resume --------------------------------------------------------------------------------

RESTARTED = textwrap.dedent("""
    import os, sys
    from twisted.internet import defer, task
    from coord import Client
    from coord.recipes import Election
    from coord.session import Session

    async def main(reactor):
        client = Client(reactor, sys.argv[1])
        session = await Session.create(client, ttl=5)
        election = Election(session, b"resume")
        await election.campaign(b"first life")
        print(session.lease_id, election.token, flush=True)
        os._exit(0)  # a crash: nothing closed, the lease lives on until its TTL

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
""")


@pytest_twisted.ensureDeferred
async def test_resume_after_a_restart(etcd, pool_client, sessions):
    # a key that sorts under "resume" without the '/' (Go's ResumeElection drops it)
    await pool_client.set(b"resume2/x", b"not a candidate")
    out, _ = await defer_to_exit(spawn(RESTARTED, etcd.url))
    lease_id, token = map(int, out.split())
    (other,) = await sessions()
    waiter = Election(other, b"resume")
    d = waiter.campaign(b"waiting")
    seen = []
    observation = observe(pool_client, b"resume", seen.append)
    await wait_until(lambda: count_is(pool_client, b"resume/", 2))
    session = await Session.resume(pool_client, lease_id)
    try:
        election = Election(session, b"resume")
        assert await election.resume(timeout=5) is election
        assert election.is_leader and election.token == token
        assert election.value == b"first life"
        current = await election.leader()
        assert (current.key, current.create_revision) == (election.key, token)
        await election.proclaim(b"second life")
        await sleep(0.3)
        assert not d.called  # nobody else was elected meanwhile
        await election.resign()
        await d
        await wait_until(lambda: len(seen) == 3)
        assert changes(seen) == [(election.key, b"first life"), (election.key, b"second life"),
                                 (waiter.key, b"waiting")]
        with pytest.raises(NotLeader):
            await election.resume()  # no key of ours any more: nothing to resume
        assert await keys_under(pool_client, b"resume/") == [waiter.key]
    finally:
        observation.close()
        await session.close()
        await waiter.resign()
    with pytest.raises(SessionLost):
        await Session.resume(pool_client, lease_id)  # revoked by close()


@pytest_twisted.ensureDeferred
async def test_resume_with_the_wrong_lease_or_election_writes_and_deletes_nothing(pool_client,
                                                                                  sessions):
    lease = await pool_client.lease(10)
    other = await pool_client.lease(10)
    # this lease stands in election "ra", not in "rb"
    await pool_client.set(b"ra/%x" % lease.lease_id, b"in ra", lease=lease.lease_id)
    # "rc/<lease hex>" exists but is attached to another lease
    await pool_client.set(b"rc/%x" % lease.lease_id, b"foreign", lease=other.lease_id)
    session = await Session.resume(pool_client, lease.lease_id)
    try:
        with pytest.raises(NotLeader):
            await Election(session, b"rb").resume(timeout=5)
        with pytest.raises(NotLeader):
            await Election(session, b"r").resume(timeout=5)  # "ra/..." is not under "r/"
        with pytest.raises(InvalidArgument):
            await Election(session, b"rc").resume(timeout=5)
        await sleep(0.1)
        assert await keys_under(pool_client, b"r") == [b"ra/%x" % lease.lease_id,
                                                        b"rc/%x" % lease.lease_id]
        kv = (await pool_client.get(b"rc/%x" % lease.lease_id)).kvs[0]
        assert (kv.value, kv.lease) == (b"foreign", other.lease_id)
        # the right one resumes, with its value and token
        resumed = Election(session, b"ra")
        await resumed.resume(timeout=5)
        assert resumed.is_leader and resumed.value == b"in ra"
        await resumed.resign()
    finally:
        await session.close()
        await other.revoke()
    with pytest.raises(SessionLost):
        await Session.resume(pool_client, lease.lease_id)


@pytest_twisted.ensureDeferred
async def test_resume_a_queued_candidacy_keeps_its_place_and_token(pool_client, sessions):
    (h,) = await sessions()
    holder = Election(h, b"rq")
    await holder.campaign(b"h")
    lease = await pool_client.lease(10)
    key = b"rq/%x" % lease.lease_id
    token = (await pool_client.set(key, b"queued", lease=lease.lease_id)).revision
    (late,) = await sessions()
    later = Election(late, b"rq")
    dl = later.campaign(b"later")
    await wait_until(lambda: count_is(pool_client, b"rq/", 3))
    session = await Session.resume(pool_client, lease.lease_id)
    try:
        resumed = Election(session, b"rq")
        d = resumed.resume()
        await sleep(0.3)
        assert not d.called and resumed.state is ElectionState.CAMPAIGNING
        await holder.resign()
        await _first_of(d, 5)
        assert resumed.is_leader and resumed.token == token and resumed.value == b"queued"
        assert not dl.called
        await resumed.resign()
        await dl
    finally:
        await session.close()
    await later.resign()


@pytest_twisted.ensureDeferred
async def test_resume_on_an_expired_lease(pool_client):
    lease = await pool_client.lease(2)
    await pool_client.set(b"rx/%x" % lease.lease_id, b"v", lease=lease.lease_id)
    await sleep(3.5)
    with pytest.raises(SessionLost):
        await Session.resume(pool_client, lease.lease_id)
    assert await keys_under(pool_client, b"rx/") == []


# -- run_as_leader ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_run_as_leader_cancels_on_loss_and_campaigns_again(pool_client):
    before = await lease_ids(pool_client)
    runs, cancelled = [], []

    async def work(election):
        runs.append(election)
        assert election.is_leader
        try:
            await defer.Deferred()  # work until cancelled
        except defer.CancelledError:
            cancelled.append(election.token)
            raise

    d = run_as_leader(pool_client, b"ral", b"me", work)
    d.cancel()  # with its session's lease grant in flight: no lease is left
    with pytest.raises(defer.CancelledError):
        await d
    await sleep(0.2)
    assert await lease_ids(pool_client) == before
    d = run_as_leader(pool_client, b"ral", b"me", work, ttl=2, retry_pause=0.1)
    await wait_until(lambda: len(runs) == 1)
    first = runs[0].token
    await pool_client.delete(runs[0].key)  # leadership lost: the key is gone
    await wait_until(lambda: len(runs) == 2)
    assert cancelled == [first] and runs[1].token > first
    await runs[1].session.lease.revoke()  # the session ends: a new one is made
    await wait_until(lambda: len(runs) == 3, timeout=5)
    assert runs[2].session is not runs[1].session and len(cancelled) == 2
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    assert len(cancelled) == 3
    assert await keys_under(pool_client, b"ral/") == []
    assert await lease_ids(pool_client) == before

    # fn's outcome is run_as_leader's; it resigns and closes its session after
    async def done(election):
        await election.proclaim(b"finishing")
        return election.token

    assert isinstance(await run_as_leader(pool_client, "ral", "me", done), int)

    def fails(election):
        raise ValueError("boom")

    with pytest.raises(ValueError):
        await run_as_leader(pool_client, b"ral", b"me", fails)
    assert await keys_under(pool_client, b"ral/") == []
    assert await lease_ids(pool_client) == before


@pytest_twisted.ensureDeferred
async def test_through_treq(etcd):
    from twisted.web.client import Agent, HTTPConnectionPool

    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=True))
    client = Client(reactor, etcd.url, agent=agent)
    try:
        a, b = await Session.create(client, 5), await Session.create(client, 5)
        seen = []
        observation = observe(client, b"tr", seen.append)
        await observation.ready
        ea, eb = Election(a, b"tr"), Election(b, b"tr")
        await ea.campaign(b"a")
        d = eb.campaign(b"b", timeout=10)
        await sleep(0.2)
        await ea.resign()
        await d
        await eb.resign()
        await wait_until(lambda: len(seen) == 4)
        assert changes(seen) == [None, (ea.key, b"a"), (eb.key, b"b"), None]
        observation.close()
        await a.close()
        await b.close()
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_run_as_leader_fn_ignoring_cancellation_never_overlaps_the_next(pool_client):
    running, overlaps, runs = [], [], []

    async def stubborn(election):
        if running:
            overlaps.append(len(runs))
        running.append(election)
        runs.append(election.token)
        try:
            try:
                await defer.Deferred()
            except defer.CancelledError:
                await sleep(0.7)  # ignores the cancel for a while, then returns
                return "ignored"
        finally:
            running.remove(election)

    d = run_as_leader(pool_client, b"stub", b"me", stubborn, ttl=5, retry_pause=0.1)
    await wait_until(lambda: len(runs) == 1)
    (key,) = await keys_under(pool_client, b"stub/")
    await pool_client.delete(key)  # leadership lost: fn is cancelled, and ignores it
    await wait_until(lambda: len(runs) == 2, timeout=5)
    assert overlaps == [] and runs[1] > runs[0]
    # fn returning after its cancel is not taken for "finished while leader"
    assert not d.called
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await _first_of(d, 5)
    assert running == []
    await wait_until(lambda: count_is(pool_client, b"stub/", 0))


@pytest_twisted.ensureDeferred
async def test_run_as_leader_fn_resigning_itself(pool_client, sessions):
    """fn resigns and returns: run_as_leader returns its result, leaves nothing."""
    before = await lease_ids(pool_client)

    async def fn(election):
        await election.resign()
        with pytest.raises(NotLeader):
            await election.proclaim(b"x")
        return "bye"

    assert await _first_of(run_as_leader(pool_client, b"self", b"me", fn), 10) == "bye"
    await settle(pool_client, b"self/", [], before)


# -- a hung etcd ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_campaign_timeout_and_observe_close_when_etcd_hangs(etcd_factory):
    server = etcd_factory()
    client = Client(reactor, server.url, timeout=5.0)
    try:
        a, b = await Session.create(client, ttl=10), await Session.create(client, ttl=10)
        holder, waiter = Election(a, b"hang"), Election(b, b"hang")
        await holder.campaign(b"h")
        d = waiter.campaign(b"w")  # queued, then etcd hangs
        await wait_until(lambda: count_is(client, b"hang/", 2))
        fresh = Election(b, b"hang-free")
        server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(Timeout):
                await fresh.campaign(b"x", timeout=0.5)  # its first transaction hangs
            assert time.monotonic() - started < 2.0
            observation = observe(client, b"hang")  # its watch or read hangs
            await sleep(0.2)
            started = time.monotonic()
            observation.close()
            assert await _first_of(observation.done, 2) is None
            d.cancel()  # the queued campaign: its clean-up hangs too
            await sleep(0.2)
        finally:
            server.resume()
        with pytest.raises(defer.CancelledError):
            await _first_of(d, 10)
        # nothing left of the timed-out and the cancelled campaigns
        await settle(client, b"hang", [holder.key], sorted([a.lease_id, b.lease_id]),
                     timeout=10)
        await holder.resign()
        await a.close()
        await b.close()
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_run_as_leader_fn_cancelled_by_the_deadline_when_etcd_hangs(etcd_factory):
    """etcd stops answering while fn runs: fn must be cancelled no later than the
    session's local deadline (before the server could let its lease expire and elect
    another), and run_as_leader must campaign again once etcd is back."""
    server = etcd_factory()
    client = Client(reactor, server.url, timeout=2.0)
    runs, cancelled = [], []

    async def work(election):
        runs.append(time.monotonic())
        try:
            await defer.Deferred()
        except defer.CancelledError:
            cancelled.append(time.monotonic())
            raise

    try:
        d = run_as_leader(client, b"rhang", b"me", work, ttl=2, retry_pause=0.2)
        await wait_until(lambda: runs)
        paused_at = time.monotonic()
        server.pause()
        try:
            await wait_until(lambda: cancelled, timeout=6)
            assert cancelled[0] - paused_at <= 2.0 + 0.1
        finally:
            server.resume()
        await wait_until(lambda: len(runs) == 2, timeout=20)
        d.cancel()
        with pytest.raises(defer.CancelledError):
            await d
        await settle(client, b"rhang/", [], [], timeout=10)
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_run_as_leader_cancel_is_prompt_when_etcd_hangs(etcd_factory):
    server = etcd_factory()
    client = Client(reactor, server.url, timeout=4.0)
    runs = []
    try:
        d = run_as_leader(client, b"rcancel", b"me", lambda e: (runs.append(e),
                                                                defer.Deferred())[1],
                          ttl=10)
        await wait_until(lambda: runs)
        server.pause()
        try:
            started = time.monotonic()
            d.cancel()
            with pytest.raises(defer.CancelledError):
                await _first_of(d, 15)
            elapsed = time.monotonic() - started
        finally:
            server.resume()
        await settle(client, b"rcancel/", [], [], timeout=15)
        assert elapsed < 1.5, elapsed
    finally:
        await client.close()


# -- five candidates in separate processes -------------------------------------------------------

CANDIDATE = textwrap.dedent("""
    import os, sys, time
    from twisted.internet import defer, task
    from twisted.internet.threads import deferToThread
    from coord import Client, Failed, OpSet, Transaction
    from coord.recipes import Election
    from coord.session import Session

    url, path, ttl = sys.argv[1], sys.argv[2], int(sys.argv[3])
    pid = os.getpid()

    def log(*words):
        with open(path, "a") as f:
            f.write(" ".join(map(str, words)) + "\\n")

    async def main(reactor):
        client = Client(reactor, url, timeout=5)
        session = await Session.create(client, ttl=ttl)
        election = Election(session, b"five")
        log("ready", pid)
        while True:
            await election.campaign(str(pid), timeout=60)
            log("leader", pid, election.token, time.time())
            await election.proclaim(f"{pid} leads")
            command = deferToThread(sys.stdin.readline)
            while not command.called:  # guarded writes while leader, until told
                txn = Transaction(compare=[election.guard()],
                                  success=[OpSet(b"five-resource", b"%d" % election.token)])
                try:
                    result = await client.submit(txn)
                except Failed:
                    log("refused", pid, election.token, election.state.name)
                    os._exit(0)
                log("wrote", pid, election.token, result.header.revision)
                await task.deferLater(reactor, 0.1, lambda: None)
            if (await command).strip() != "resign":
                break
            log("resign", pid, election.token, time.time())
            await election.resign()
        await session.close()
        await client.close()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
""")


def read_log(path):
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


@pytest_twisted.ensureDeferred
@pytest.mark.slow
async def test_five_candidate_processes(etcd, pool_client, tmp_path):
    path = tmp_path / "log"
    seen = []
    observation = observe(pool_client, b"five", seen.append)
    await observation.ready
    procs = {}
    for _ in range(5):
        p = subprocess.Popen([sys.executable, "-c", CANDIDATE, etcd.url, str(path), str(TTL)],
                             cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        procs[p.pid] = p

    def leaders():
        return [line for line in read_log(path) if line[0] == "leader"]

    async def next_leader(count, timeout):
        """The count-th leader's pid and election time, once it made a guarded write."""
        await wait_until(lambda: len(leaders()) >= count, timeout=timeout, interval=0.01)
        line = leaders()[count - 1]
        await wait_until(lambda: ["wrote", *line[1:3]] in [w[:3] for w in read_log(path)])
        return int(line[1]), float(line[3])

    try:
        await wait_until(lambda: count_is(pool_client, b"five/", 5), timeout=30)
        current, _ = await next_leader(1, 10)
        count = 1
        # resign -> the next leader within 100 ms (twice)
        for _ in range(2):
            procs[current].stdin.write("resign\n")
            procs[current].stdin.flush()
            count += 1
            new, elected_at = await next_leader(count, 5)
            (resigned_at,) = [float(line[3]) for line in read_log(path)
                              if line[0] == "resign" and int(line[1]) == current][-1:]
            assert new != current
            assert elected_at - resigned_at < 0.1, elected_at - resigned_at
            current = new
        # kill -9 -> the next leader within TTL + 1 s
        killed_at = time.time()
        procs[current].kill()
        count += 1
        new, elected_at = await next_leader(count, TTL + 5)
        assert new != current and elected_at - killed_at < TTL + 1, elected_at - killed_at
        current = new
        # SIGSTOP past the TTL: another is elected; the stopped one, resumed, is refused
        stopped = current
        os.kill(stopped, signal.SIGSTOP)
        try:
            stopped_at = time.time()
            count += 1
            new, elected_at = await next_leader(count, TTL + 5)
            assert elected_at - stopped_at < TTL + 1
        finally:
            os.kill(stopped, signal.SIGCONT)
        # Its stdin stays open until it was refused: communicate() closes it, and a
        # candidate reading EOF leaves before it tries its next write.
        await wait_until(lambda: any(line[0] == "refused" for line in read_log(path)),
                         timeout=10)
        _, err = await defer_to_exit(procs[stopped])
        assert procs[stopped].returncode == 0, err
        refused = [line for line in read_log(path) if line[0] == "refused"]
        assert [line[1] for line in refused] == [str(stopped)]
        # a last resign, so that every candidate alive led or waits
        procs[new].stdin.write("resign\n")
        procs[new].stdin.flush()
        count += 1
        await next_leader(count, 5)
        await sleep(0.3)
    finally:
        for p in procs.values():
            finish(p)
        observation.close()
    log = read_log(path)
    # Two leaders' guarded writes never both succeed: by revision, tokens never go back.
    writes = sorted((int(line[3]), int(line[2])) for line in log if line[0] == "wrote")
    tokens = [token for _, token in writes]
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == count  # every leader wrote
    # observe saw each change once, in order: every leader with its first value and then
    # with the one it proclaimed.
    expected = []
    for line in leaders():
        expected += [(line[1], int(line[2])), (f"{line[1]} leads", int(line[2]))]
    observed = [(r.value.decode(), r.create_revision) for r in seen if r is not None]
    assert seen[0] is None and None not in seen[1:]
    assert observed == expected


# -- etcdctl elect interop ----------------------------------------------------------------------


def etcdctl_elect(url, *args):
    env = {**os.environ, "ETCDCTL_API": "3"}
    return subprocess.Popen([find_etcdctl(), "--endpoints", url, "elect", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


async def read_leader(proc):
    """What ``etcdctl elect`` prints for a leader: its key, then its value."""
    key = (await deferred_readline(proc)).strip()
    value = (await deferred_readline(proc)).strip()
    return key.encode(), value.encode()


@pytest_twisted.ensureDeferred
async def test_etcdctl_leads_coord_follows(etcd, pool_client, sessions):
    ctl = etcdctl_elect(etcd.url, "interop", "from-etcdctl")
    try:
        ctl_key, ctl_value = await read_leader(ctl)
        assert ctl_value == b"from-etcdctl" and ctl_key.startswith(b"interop/")
        current = await leader(pool_client, "interop")
        assert (current.key, current.value) == (ctl_key, ctl_value)
        (s,) = await sessions()
        election = Election(s, "interop")
        seen = []
        observation = election.observe(seen.append)
        d = election.campaign(b"from-coord", timeout=10)
        await sleep(0.5)
        assert not d.called
        ctl.send_signal(signal.SIGINT)  # etcdctl resigns on SIGINT
        await d
        assert election.is_leader
        assert (await pool_client.get(ctl_key)).count == 0
        await wait_until(lambda: len(seen) == 2)
        assert changes(seen) == [(ctl_key, b"from-etcdctl"), (election.key, b"from-coord")]
        observation.close()
        await election.resign()
    finally:
        finish(ctl)


@pytest_twisted.ensureDeferred
async def test_coord_leads_etcdctl_observes_and_follows(etcd, pool_client, sessions):
    (s,) = await sessions()
    election = Election(s, "interop")
    await election.campaign(b"coord-1")
    listener = etcdctl_elect(etcd.url, "-l", "interop")
    follower = None
    try:
        assert await read_leader(listener) == (election.key, b"coord-1")
        await election.proclaim(b"coord-2")
        assert await read_leader(listener) == (election.key, b"coord-2")
        follower = etcdctl_elect(etcd.url, "interop", "ctl-2")
        await wait_until(lambda: count_is(pool_client, b"interop/", 2))
        keys = await pool_client.get(KeySet(b"interop/", prefix=True), sort_target="create",
                                     sort_order="ascend")
        ours, theirs = keys.kvs
        assert ours.key == election.key and theirs.key == b"interop/%x" % theirs.lease
        line = deferred_readline(follower)
        await sleep(0.3)
        assert not line.called  # etcdctl waits behind us
        await election.resign()
        assert (await line).strip().encode() == theirs.key
        assert (await deferred_readline(follower)).strip() == "ctl-2"
        assert await read_leader(listener) == (theirs.key, b"ctl-2")
        # and while etcdctl leads, coord waits
        with pytest.raises(Timeout):
            await election.campaign(b"coord-3", timeout=0.3)
        follower.send_signal(signal.SIGINT)
        await election.campaign(b"coord-3", timeout=10)
        assert election.token > theirs.create_revision
        assert await read_leader(listener) == (election.key, b"coord-3")
        await election.resign()
    finally:
        listener.send_signal(signal.SIGINT)
        finish(listener)
        if follower is not None:
            finish(follower)


# -- etcdctl elect -l while coord proclaims ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_etcdctl_listener_follows_repeated_proclaims(etcd, pool_client, sessions):
    (s,) = await sessions()
    election = Election(s, b"ctl-l")
    await election.campaign(b"v00")
    env = {**os.environ, "ETCDCTL_API": "3"}
    listener = subprocess.Popen([find_etcdctl(), "--endpoints", etcd.url, "elect", "-l",
                                 "ctl-l"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
    try:
        assert (await deferred_readline(listener)).strip().encode() == election.key
        assert (await deferred_readline(listener)).strip() == "v00"
        for i in range(1, 30):
            await election.proclaim(b"v%02d" % i)
        values = []
        while not values or values[-1] != "v29":
            key = (await _first_of(deferred_readline(listener), 10)).strip().encode()
            assert key == election.key
            values.append((await _first_of(deferred_readline(listener), 10)).strip())
        assert values == sorted(set(values))  # in order, never an old value again
        assert values == [f"v{i:02d}" for i in range(1, 30)]
        # coord's own view agrees
        assert (await election.leader()).value == b"v29"
    finally:
        listener.send_signal(signal.SIGINT)
        finish(listener)
        await election.resign()


# -- the example ---------------------------------------------------------------------------------


def test_example(etcd):
    out = example("election.py", etcd.url)
    assert re.search(r"alice leads: <Election b'workers' LEADER token=(\d+) value=b'alice'>",
                     out), out
    assert "bob could not win within 1 s: alice still leads" in out
    assert re.search(r"observed: alice \(token \d+\)", out)
    assert re.search(r"observed: alice-v2 \(token \d+\)", out)
    assert "guarded write done as leader" in out
    assert re.search(r"observed: bob \(token \d+\)", out)
    assert "bob leads now; alice's stale guarded write was refused" in out
    assert "observed: no leader" in out
    left = etcd.post("/v3/kv/range", {"key": "d29ya2Vycy8=", "range_end": "d29ya2VyczA="})
    assert int(left.get("count", 0)) == 0  # nothing left under workers/
    assert not etcd.post("/v3/lease/leases", {}).get("leases")


def test_docs_example_is_examples_election_py():
    """docs/election.md shows examples/election.py verbatim."""
    text = (ROOT / "docs" / "election.md").read_text()
    block = text.split("<!-- example: election.py -->\n```python\n", 1)[1].split("\n```\n", 1)[0]
    assert block + "\n" == (ROOT / "examples" / "election.py").read_text()


# -- loss reasons ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_revoked_lease_of_the_leader_is_session_lost_at_once(pool_client, sessions):
    """The leader's lease is revoked (as by `etcdctl lease revoke`): `election.lost`
    fires with the session's SessionLost, not LeadershipLost, and the session has ended
    by then (not a keep-alive later)."""
    (session,) = await sessions(1)
    election = Election(session, b"erev")
    await election.campaign(b"v")
    lost = election.lost
    await sleep(0.1)
    started = time.monotonic()
    await Lease(pool_client, session.lease_id).revoke()
    reason = await lost
    assert isinstance(reason, SessionLost) and not isinstance(reason, LeadershipLost)
    assert reason is session.reason and session.state.name == "EXPIRED"
    assert time.monotonic() - started < session.interval
    assert election.state is ElectionState.LOST


@pytest_twisted.ensureDeferred
async def test_candidate_whose_key_is_deleted_is_told_at_once(pool_client, sessions):
    a, b, c = await sessions(3)
    ea, eb, ec = Election(a, b"edel"), Election(b, b"edel"), Election(c, b"edel")
    await ea.campaign(b"a")
    db = eb.campaign(b"b")
    await wait_until(lambda: count_is(pool_client, b"edel/", 2))
    dc = ec.campaign(b"c")
    await wait_until(lambda: count_is(pool_client, b"edel/", 3))
    await sleep(0.2)
    await pool_client.delete(eb.key)
    await wait_until(lambda: db.called, timeout=2)
    with pytest.raises(LeadershipLost):
        await db
    assert ea.is_leader and not dc.called and b.alive
    await ea.resign()
    await dc
    assert ec.is_leader
    await ec.resign()


# -- the owned-key core: races and loss reasons ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_leader_key_deleted_while_the_lease_check_hangs_is_leadership_lost_in_time(
        client, new_client, listen):
    """The leader's key is deleted while its lease lives and the lease check cannot
    reach etcd: `lost` fires with LeadershipLost once the check's 2 s are up; the
    session lives on; proclaim says NotLeader.  Through each transport."""
    from coord.recipes import _core

    gateway, hung = hung_gateway(listen, new_client)
    session = await session_checked_through(client, hung)
    try:
        election = Election(session, b"ehung")
        await election.campaign(b"v")
        lost = election.lost
        await sleep(0.1)
        started = time.monotonic()
        await client.delete(election.key)
        reason = await lost
        took = time.monotonic() - started
        assert isinstance(reason, LeadershipLost) and not isinstance(reason, SessionLost)
        assert _core.LEASE_CHECK_TIMEOUT - 0.2 <= took < _core.LEASE_CHECK_TIMEOUT + 1.5
        assert session.reason is None and election.state is ElectionState.LOST
        with pytest.raises(NotLeader):
            await election.proclaim(b"w")
        assert await keys_under(client, b"ehung/") == []
        await election.resign()
        assert election.state is ElectionState.IDLE
    finally:
        gateway.drop_held()
        await end_checked_session(client, session)


@pytest_twisted.ensureDeferred
async def test_resign_during_the_lease_check_returns_at_once_and_lost_never_fires(
        pool_client, new_client, listen):
    gateway, hung = hung_gateway(listen, new_client)
    session = await session_checked_through(pool_client, hung)
    try:
        election = Election(session, b"eres")
        await election.campaign(b"v")
        old = election.token
        lost = election.lost
        await sleep(0.1)
        await pool_client.delete(election.key)
        await sleep(0.3)  # the watch saw it; the check hangs
        started = time.monotonic()
        await election.resign()
        assert time.monotonic() - started < 0.5
        assert election.state is ElectionState.IDLE
        await election.campaign(b"again")
        assert election.token > old and election.is_leader
        await sleep(2.3)  # past the check's timeout
        assert not lost.called and election.is_leader
        assert (await election.leader()).value == b"again"
        await election.resign()
        assert await keys_under(pool_client, b"eres/") == []
    finally:
        gateway.drop_held()
        await end_checked_session(pool_client, session)


@pytest_twisted.ensureDeferred
async def test_revoked_lease_of_leader_and_candidate_is_session_lost_through_each_transport(
        client):
    leader_session = await Session.create(client, ttl=6)
    candidate_session = await Session.create(client, ttl=6)
    try:
        first, second = Election(leader_session, b"etrev"), Election(candidate_session, b"etrev")
        await first.campaign(b"a")
        lost = first.lost
        d = second.campaign(b"b", timeout=30)
        await wait_until(lambda: count_is(client, b"etrev/", 2))
        await sleep(0.2)
        started = time.monotonic()
        await Lease(client, candidate_session.lease_id).revoke()
        with pytest.raises(SessionLost) as raised:
            await d
        assert time.monotonic() - started < candidate_session.interval
        assert raised.value is candidate_session.reason
        assert candidate_session.state.name == "EXPIRED"
        assert first.is_leader and not lost.called
        started = time.monotonic()
        await Lease(client, leader_session.lease_id).revoke()
        reason = await lost
        assert reason is leader_session.reason and leader_session.state.name == "EXPIRED"
        assert time.monotonic() - started < leader_session.interval
        with pytest.raises(NotLeader):
            await first.proclaim(b"x")
        assert await keys_under(client, b"etrev/") == []
        assert await lease_ids(client) == []
    finally:
        await leader_session.close()
        await candidate_session.close()


@pytest_twisted.ensureDeferred
async def test_a_lease_revoked_behind_the_session_fails_campaign_and_resume(
        pool_client, sessions):
    """The session has not noticed its lease is revoked: campaign (with and without
    timeout=0) writes with a lease etcd refuses and raises SessionLost, ending the
    session at once; resume finds no key (it went with the lease).  Nothing written."""
    for how in ("campaign", "timeout=0", "resume"):
        (s,) = await sessions(1, ttl=30)
        election = Election(s, b"ebrev")
        if how == "resume":
            await election.campaign(b"v")
            await Lease(pool_client, s.lease_id).revoke()
            await wait_until(lambda e=election: e.state is ElectionState.LOST, timeout=2)
            with pytest.raises(SessionLost):
                await election.resume()
        else:
            await Lease(pool_client, s.lease_id).revoke()
            assert s.alive
            with pytest.raises(SessionLost) as raised:
                await election.campaign(b"v", timeout=0 if how == "timeout=0" else None)
            assert raised.value is s.reason
        assert s.state.name == "EXPIRED", how
        assert await keys_under(pool_client, b"ebrev/") == []


@pytest_twisted.ensureDeferred
async def test_campaign_timeout_zero_behind_a_leader_removes_only_our_key(
        client):
    """campaign(timeout=0) with a leader there: Timeout, our key removed, the leader's
    key untouched; with nobody there: leads at once.  Through each transport."""
    a = await Session.create(client, ttl=5)
    b = await Session.create(client, ttl=5)
    try:
        ea, eb = Election(a, b"ezero"), Election(b, b"ezero")
        await ea.campaign(b"a")
        with pytest.raises(Timeout):
            await eb.campaign(b"b", timeout=0)
        assert eb.state is ElectionState.IDLE
        assert await keys_under(client, b"ezero/") == [ea.key]
        assert ea.is_leader and (await ea.leader()).value == b"a"
        await ea.resign()
        assert await eb.campaign(b"b", timeout=0) is eb
        assert eb.is_leader
        await eb.resign()
        assert await keys_under(client, b"ezero/") == []
    finally:
        await a.close()
        await b.close()


@pytest_twisted.ensureDeferred
async def test_leader_key_recreated_under_our_name_is_leadership_lost_and_resign_spares_it(
        pool_client, sessions):
    (s,) = await sessions()
    election = Election(s, b"erec")
    await election.campaign(b"v")
    lost = election.lost
    await sleep(0.1)
    await pool_client.delete(election.key)
    await pool_client.set(election.key, b"other", lease=s.lease_id)
    reason = await lost
    assert isinstance(reason, LeadershipLost) and s.alive
    with pytest.raises(NotLeader):
        await election.proclaim(b"mine")
    with pytest.raises(Failed):
        await pool_client.submit(Transaction(compare=[election.guard()],
                                             success=[OpSet(b"res", b"1")]))
    await election.resign()
    assert (await pool_client.get(election.key)).kvs[0].value == b"other"


@pytest_twisted.ensureDeferred
async def test_resumed_leader_and_candidate_are_told_when_their_keys_go(etcd, pool_client,
                                                                         sessions):
    """Election.resume (a restarted process: another client, the same lease) adopts our
    key: a leader leads at once with its old token and loses with LeadershipLost when
    the key is deleted; a resumed candidate is told at once when its key is deleted.  A
    resume with no key raises NotLeader and writes nothing."""
    a, b = await sessions(2)
    first, candidate = Election(a, b"eresume"), Election(b, b"eresume")
    await first.campaign(b"a")
    d = candidate.campaign(b"b", timeout=30)
    await wait_until(lambda: count_is(pool_client, b"eresume/", 2))
    restarted = Client(reactor, etcd.url)
    try:
        ra = await Session.resume(restarted, a.lease_id)
        rb = await Session.resume(restarted, b.lease_id)
        resumed, queued = Election(ra, b"eresume"), Election(rb, b"eresume")
        await resumed.resume()
        assert resumed.token == first.token and resumed.value == b"a" and resumed.is_leader
        dq = queued.resume(timeout=30)
        await sleep(0.3)
        assert not dq.called and queued.state is ElectionState.CAMPAIGNING
        await pool_client.delete(queued.key)
        await wait_until(lambda: dq.called and d.called, timeout=2)
        for waiting in (dq, d):
            with pytest.raises(LeadershipLost):
                await waiting
        lost = resumed.lost
        await pool_client.delete(resumed.key)
        assert isinstance(await lost, LeadershipLost)
        with pytest.raises(NotLeader):
            await resumed.resume()
        assert await keys_under(pool_client, b"eresume/") == []
        await ra.close(orphan=True)
        await rb.close(orphan=True)
    finally:
        await restarted.close()


@pytest_twisted.ensureDeferred
async def test_an_election_and_a_lock_of_one_session_and_name_share_a_key_and_exclude(
        pool_client, sessions):
    """Go's layout gives a Lock and an Election of one name and session the same key: a
    second object on it is refused while the first is in use (its release would delete
    the other's hold)."""
    from coord.recipes.lock import Lock

    (s,) = await sessions()
    election, lock = Election(s, b"shared"), Lock(s, b"shared")
    assert election.key == lock.key
    await election.campaign(b"v")
    with pytest.raises(InvalidArgument):
        lock.acquire()
    with pytest.raises(InvalidArgument):
        lock.try_acquire()
    await election.resign()
    await lock.acquire()
    with pytest.raises(InvalidArgument):
        election.campaign(b"v")
    await lock.release()
    assert await keys_under(pool_client, b"shared/") == []


@pytest_twisted.ensureDeferred
async def test_campaign_timeout_zero_is_not_held_hostage_by_a_hung_etcd(etcd_factory):
    """campaign(timeout=0) says "do not wait": if etcd hangs it ends within the client's
    timeout plus the clean-up grace (typed), not after the session's 30 s TTL while the
    removal of a key that may have been written is retried."""
    from coord import errors
    from coord.recipes import _loop

    server = etcd_factory()
    client = Client(reactor, server.url, timeout=1.0)
    session = None
    try:
        session = await Session.create(client, ttl=30)
        election = Election(session, b"ehang")
        server.pause()
        try:
            started = time.monotonic()
            with pytest.raises((errors.Timeout, errors.Unavailable)):
                await election.campaign(b"v", timeout=0)
            assert time.monotonic() - started < client.timeout + _loop.CLEANUP_GRACE + 1.5
            assert election.state is ElectionState.IDLE
        finally:
            server.resume()
        # (a key of ours etcd wrote only after it resumed is reused: we lead)
        assert await election.campaign(b"v", timeout=0) is election
        await election.resign()
        assert await keys_under(client, b"ehang/") == []
    finally:
        if session is not None:
            await session.close()
        await client.close()
