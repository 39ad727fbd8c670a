"""Adversarial tests for leader election (issue 6), against a real etcd.

Written by a reviewer to break ``coord.recipes.election``: bad input, races between a
fire-and-forget resign and a new campaign, third parties writing our key, re-entrant
callbacks, a hung etcd, restarts with compaction, a killed cluster member, resume with
the wrong lease, and ``etcdctl elect -l`` against repeated proclaims.  Four of them found
bugs (an unchecked retry_pause, a stray key adopted without our lease, a report after
close(), run_as_leader's cancel waiting on a hung etcd), since fixed.

Run on both etcd versions: ``COORD_ETCD=/usr/bin/etcd COORD_ETCDCTL=/usr/bin/etcdctl
pytest tests/test_election_adversarial.py``.
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import subprocess
import time

import pytest
import pytest_twisted
from helpers import count_is, deferred_readline, finish, keys_under, lease_ids, sleep, wait_until
from twisted.internet import defer, reactor

from coord import (
    Client,
    Failed,
    InvalidArgument,
    LeadershipLost,
    NoLeader,
    NotLeader,
    OpSet,
    SessionLost,
    Timeout,
    Transaction,
)
from coord.recipes import Election, ElectionState, run_as_leader
from coord.recipes.election import leader, observe
from coord.server import find_etcdctl
from coord.session import Session


def changes(reports):
    return [None if r is None else (r.key, r.value) for r in reports]


async def settle(client, prefix, expected_keys, expected_leases, timeout=5.0):
    async def ok():
        return (await keys_under(client, prefix) == expected_keys
                and await lease_ids(client) == expected_leases)

    await wait_until(ok, timeout=timeout, interval=0.05)


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


# -- observe across a restart with a compaction, and a killed cluster member ------------------


@pytest_twisted.ensureDeferred
async def test_observe_across_a_restart_and_a_compaction(etcd_factory):
    from test_election import Proxy

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


# -- resume ------------------------------------------------------------------------------------


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


# -- run_as_leader -----------------------------------------------------------------------------


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
