"""Group membership against real etcd: one process, then member processes that join,
leave, are killed and paused past their TTL (and re-join).

Run on both etcd versions:
``COORD_ETCD=/usr/bin/etcd COORD_ETCDCTL=/usr/bin/etcdctl pytest tests/test_group.py``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import pytest_twisted
from helpers import (
    Proxy,
    defer_to_exit,
    deferred_readline,
    example,
    finish,
    hung_gateway,
    keys_under,
    lease_ids,
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
    Lease,
    MemberExists,
    MembershipLost,
    OpSet,
    SessionLost,
    Timeout,
    Transaction,
)
from coord.recipes import Group, GroupState, Members, MembershipChange
from coord.recipes._mirror_state import MirrorState
from coord.recipes.group import diff, members, watch
from coord.server import find_etcdctl
from coord.session import Session
from coord.types import Event, EventType, KeyValue

ROOT = Path(__file__).resolve().parent.parent

TTL = 2  # seconds: the member processes' sessions


def hexid(session):
    return b"%x" % session.lease_id


# -- the watch's diff, sans I/O: a mirror's changes as joins, updates and leaves ----------------


def kv(key, value, create, mod=None):
    return KeyValue(key, value, create, mod or create, 1, 0)


def put(key, value, create, mod=None):
    return Event(EventType.PUT, kv(key, value, create, mod))


def delete(key, rev):
    return Event(EventType.DELETE, KeyValue(key, b"", 0, rev))


# (events of one revision, or a load as ("load", revision, kvs)) -> joined, updated, left
DIFF_TABLE = [
    ([put(b"g/a", b"1", 2)], {b"a": b"1"}, {}, {}),
    ([put(b"g/a", b"2", 2, 3)], {}, {b"a": b"2"}, {}),
    ([put(b"g/a/deep", b"x", 4)], {}, {}, {}),  # a nested group's key: no member
    ([put(b"g/b", b"b", 5), put(b"g/c", b"c", 5)], {b"b": b"b", b"c": b"c"}, {}, {}),
    ([delete(b"g/a", 6)], {}, {}, {b"a": b"2"}),
    ([delete(b"g/a/deep", 7)], {}, {}, {}),
    # a resync: b left and joined again meanwhile (another create revision), c was
    # updated, d joined
    (("load", 20, [kv(b"g/b", b"b2", 15), kv(b"g/c", b"c2", 5, 16), kv(b"g/d", b"d", 17)]),
     {b"b": b"b2", b"d": b"d"}, {b"c": b"c2"}, {b"b": b"b"}),
    (("load", 30, []), {}, {}, {b"b": b"b2", b"c": b"c2", b"d": b"d"}),
]


def test_diff_table():
    state = MirrorState()
    state.load(1, [])
    entries = {}
    for step, joined, updated, left in DIFF_TABLE:
        if isinstance(step, tuple):
            change = state.load(step[1], [step[2]])
            assert change.resync
        else:
            state.add(step)
            change = state.next_change()
        new, j, u, gone = diff(b"g/", entries, change)
        assert (j, u, gone) == (joined, updated, left), step
        assert entries is not new  # the old entries (a Members holds them) are kept
        entries = new
        assert set(entries) == {k[2:] for k in state.entries if b"/" not in k[2:]}


# -- one process ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_join_update_leave(pool_client, sessions):
    (s,) = await sessions()
    group = Group(s, "svc")
    assert group.member == hexid(s) and group.key == b"svc/" + hexid(s)
    assert repr(group) == f"<Group b'svc' member={hexid(s)!r} OUT>"
    assert await group.join(b"10.0.0.1:80") is group
    kv = (await pool_client.get(group.key)).kvs[0]
    assert (kv.value, kv.lease, kv.create_revision) == (b"10.0.0.1:80", s.lease_id,
                                                         group.token)
    assert group.joined and group.state is GroupState.JOINED and group.data == b"10.0.0.1:80"
    revision = await group.update("10.0.0.1:81")  # str is UTF-8
    kv = (await pool_client.get(group.key)).kvs[0]
    assert kv.value == b"10.0.0.1:81" and kv.mod_revision == revision
    assert kv.create_revision == group.token and group.data == b"10.0.0.1:81"
    found = await group.members()
    assert dict(found) == {group.member: b"10.0.0.1:81"} and found.revision >= revision
    assert found.kv(group.member).lease == s.lease_id
    await group.leave()
    assert await keys_under(pool_client, b"svc/") == []
    assert group.state is GroupState.OUT and not group.joined
    await group.leave()  # idempotent
    with pytest.raises(MembershipLost):
        await group.update(b"x")  # not a member
    first = group.token
    await group.join(b"again")
    assert group.token > first
    await group.leave()


@pytest_twisted.ensureDeferred
async def test_member_ids_given_and_in_use(etcd, pool_client, sessions):
    a, b = await sessions(2)
    web = Group(a, b"svc", member="web-1")
    await web.join(b"a")
    assert web.key == b"svc/web-1"
    with pytest.raises(MemberExists):  # another session of the same client: told at once
        Group(b, b"svc", member=b"web-1").join(b"b")
    elsewhere = Client(reactor, etcd.url)  # as another process would
    c = await Session.create(elsewhere, ttl=5)
    other = Group(c, b"svc", member=b"web-1")
    try:
        with pytest.raises(MemberExists):
            await other.join(b"b")  # another session's key: refused, never deleted
    finally:
        await c.close()
        await elsewhere.close()
    kv = (await pool_client.get(b"svc/web-1")).kvs[0]
    assert (kv.value, kv.lease) == (b"a", a.lease_id)
    assert other.state is GroupState.OUT
    # A key of our own lease already there is taken over (same create revision).
    created = (await pool_client.set(b"svc/web-2", b"old", lease=b.lease_id)).revision
    mine = Group(b, b"svc", member="web-2")
    await mine.join(b"new")
    assert mine.token == created and (await pool_client.get(b"svc/web-2")).kvs[0].value == b"new"
    # Two objects of one session on one key: refused.
    with pytest.raises(InvalidArgument):
        Group(b, b"svc", member="web-2").join(b"x")
    await web.leave()
    await mine.leave()
    assert await keys_under(pool_client, b"svc/") == []


@pytest_twisted.ensureDeferred
async def test_bad_input_is_typed_and_writes_nothing(pool_client, sessions):
    (s,) = await sessions()
    before = await lease_ids(pool_client)
    with pytest.raises(TypeError, match=r"coord\.session\.Session"):
        Group(pool_client, b"g")
    with pytest.raises(TypeError, match="name"):
        Group(s, 42)
    with pytest.raises(InvalidArgument):
        Group(s, b"")
    with pytest.raises(TypeError, match="member"):
        Group(s, b"g", member=7)
    for bad in (b"", b"a/b"):
        with pytest.raises(InvalidArgument, match="member id"):
            Group(s, b"g", member=bad)
    with pytest.raises(TypeError, match="rejoin"):
        Group(s, b"g", rejoin="yes")
    group = Group(s, b"g")
    with pytest.raises(TypeError, match="data"):
        group.join(42)
    with pytest.raises(TypeError, match="data"):
        group.join(None)
    for timeout, exc in ((-1, InvalidArgument), (0, InvalidArgument),
                         (float("nan"), InvalidArgument), ("1", TypeError)):
        with pytest.raises(exc, match="timeout"):
            group.join(b"x", timeout=timeout)
    with pytest.raises(TypeError, match="data"):
        group.update(3.5)
    with pytest.raises(TypeError, match="session"):
        group.rejoin(pool_client)
    with pytest.raises(InvalidArgument, match="never joined"):
        group.rejoin(s)
    with pytest.raises(TypeError, match="page_size"):
        members(pool_client, b"g", page_size="2")
    with pytest.raises(InvalidArgument, match="timeout"):
        members(pool_client, b"g", timeout=0)
    with pytest.raises(TypeError, match="callback"):
        watch(pool_client, b"g", callback=3)
    assert await keys_under(pool_client, b"g") == []
    assert await lease_ids(pool_client) == before


@pytest_twisted.ensureDeferred
async def test_members_is_one_revision_across_pages(pool_client, sessions):
    all_sessions = await sessions(7)
    groups = [Group(s, b"reg", member=f"m{i}") for i, s in enumerate(all_sessions)]
    for i, g in enumerate(groups):
        await g.join(b"%d" % i)
    await pool_client.set(b"reg/m0/sub", b"a nested group's key")  # not a member of reg
    await pool_client.set(b"reg2/x", b"another group")
    stop = False

    async def churn():
        n = 0
        while not stop:
            await groups[n % 7].update(b"v%d" % n)
            n += 1

    running = defer.ensureDeferred(churn())
    try:
        for _ in range(5):
            found = await members(pool_client, b"reg", page_size=2)
            at = await pool_client.get(KeySet(b"reg/", prefix=True), revision=found.revision)
            expected = {kv.key[4:]: kv.value for kv in at.kvs if b"/" not in kv.key[4:]}
            assert dict(found) == expected and len(found) == 7
            assert found.in_join_order() == [b"m%d" % i for i in range(7)]
            # A str id reads as its UTF-8, as the member= it was given as
            assert "m3" in found and found["m3"] == found[b"m3"]
            assert found.kv("m3").key == b"reg/m3" and "m9" not in found
    finally:
        stop = True
        await running
    for g in groups:
        await g.leave()


@pytest_twisted.ensureDeferred
async def test_lost_when_deleted_or_session_ends(pool_client, sessions):
    a, b = await sessions(2)
    deleted = Group(a, b"l")
    await deleted.join(b"a")
    lost = deleted.lost
    await pool_client.delete(deleted.key)
    reason = await lost
    assert isinstance(reason, MembershipLost) and not isinstance(reason, SessionLost)
    assert deleted.state is GroupState.LOST and not deleted.joined
    with pytest.raises(MembershipLost):
        await deleted.update(b"x")
    with pytest.raises(Failed):  # a stale guard keeps failing
        await pool_client.submit(Transaction(compare=[deleted.guard()],
                                             success=[OpSet(b"l-res", b"x")]))
    await deleted.leave()
    revoked = Group(b, b"l")
    await revoked.join(b"b")
    lost = revoked.lost
    await Lease(pool_client, b.lease_id).revoke()
    assert isinstance(await lost, SessionLost)
    with pytest.raises(MembershipLost) as raised:
        await revoked.update(b"x")
    assert isinstance(raised.value.__cause__, SessionLost)
    await revoked.leave()


@pytest_twisted.ensureDeferred
async def test_update_of_a_deleted_member_is_membership_lost(pool_client, sessions):
    (s,) = await sessions()
    group = Group(s, b"u")
    await group.join(b"a")
    lost = group.lost
    await pool_client.delete(group.key)
    with pytest.raises(MembershipLost):
        await group.update(b"b")  # guarded: never re-creates our key
    assert await keys_under(pool_client, b"u/") == []
    assert isinstance(await lost, MembershipLost)


@pytest_twisted.ensureDeferred
async def test_cancel_and_timeout_leave_nothing(pool_client, sessions, listen, new_client):
    (s,) = await sessions()
    group = Group(s, b"c")
    d = group.join(b"x")  # cancelled with its transaction in flight
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    await wait_until(lambda: group.state is GroupState.OUT and not group.active)
    assert await keys_under(pool_client, b"c/") == []
    d = group.join(b"x")  # leave() while joining gives the join up
    await group.leave()
    with pytest.raises(defer.CancelledError):
        await d
    assert await keys_under(pool_client, b"c/") == []
    await group.join(b"y")  # and the object can join again
    await group.leave()
    # etcd does not answer: Timeout, in time; nothing reached etcd
    gateway, hung = hung_gateway(listen, new_client)
    granted = await pool_client.lease(30)
    session = Session(hung, Lease(hung, granted.lease_id, granted.ttl), hung.reactor.seconds())
    try:
        started = time.monotonic()
        with pytest.raises(Timeout):
            await Group(session, b"c").join(b"z", timeout=0.5)
        assert time.monotonic() - started < 1.5
        assert await keys_under(pool_client, b"c/") == []
    finally:
        gateway.drop_held()
        await session.close(orphan=True)
        await granted.revoke()


@pytest_twisted.ensureDeferred
async def test_watch_reports_every_change_once_in_order(pool_client, sessions):
    a, b = await sessions(2)
    early = Group(a, b"w", member="early")
    await early.join(b"e")
    seen: list[MembershipChange] = []
    watching = watch(pool_client, b"w", seen.append)
    start = await watching.ready
    assert dict(start) == {b"early": b"e"}
    late = Group(b, b"w", member="late")
    await late.join(b"l")
    await late.update(b"l2")
    await pool_client.set(b"w/late/deeper", b"not a member")
    await early.leave()
    await pool_client.delete(late.key)
    await watching.wait(lambda m: not m, timeout=5)
    watching.close()
    assert [(c.first, dict(c.joined), dict(c.updated), dict(c.left)) for c in seen] == [
        (True, {b"early": b"e"}, {}, {}),
        (False, {b"late": b"l"}, {}, {}),
        (False, {}, {b"late": b"l2"}, {}),
        (False, {}, {}, {b"early": b"e"}),
        (False, {}, {}, {b"late": b"l2"}),
    ]
    revisions = [c.revision for c in seen]
    assert revisions == sorted(set(revisions))
    assert isinstance(seen[1].members, Members) and dict(seen[1].members) == {
        b"early": b"e", b"late": b"l"}
    await late.leave()


# -- re-joining (in one process: a lease revoked by another client) --------------------------


@pytest_twisted.ensureDeferred
async def test_rejoin_after_the_lease_is_revoked(pool_client, sessions):
    (s,) = await sessions(ttl=5)
    group = Group(s, b"r", rejoin=True)
    member = group.member
    await group.join(b"v1")
    await group.update(b"v2")
    seen: list[MembershipChange] = []
    watching = watch(pool_client, b"r", seen.append)
    await watching.ready
    rejoined, lost = group.rejoined, group.lost
    await Lease(pool_client, s.lease_id).revoke()  # as etcd does when the TTL passes
    assert isinstance(await lost, SessionLost)
    new = await rejoined
    assert new is group.session and new is not s and new.ttl == s.ttl
    assert group.state is GroupState.JOINED and group.rejoins == 1
    assert group.member == member  # the same id, on the new lease
    kv = (await pool_client.get(group.key)).kvs[0]
    assert (kv.value, kv.lease) == (b"v2", new.lease_id)
    await watching.wait(lambda m: m.get(member) == b"v2" and len(seen) == 3, timeout=5)
    assert [(dict(c.joined), dict(c.left)) for c in seen] == [
        ({member: b"v2"}, {}), ({}, {member: b"v2"}), ({member: b"v2"}, {})]
    watching.close()
    await group.leave()  # closes the session it made: its lease is gone too
    assert await keys_under(pool_client, b"r/") == []
    assert new.lease_id not in await lease_ids(pool_client)


@pytest_twisted.ensureDeferred
async def test_a_deleted_member_is_not_rejoined(pool_client, sessions):
    (s,) = await sessions()
    group = Group(s, b"d", rejoin=True)
    await group.join(b"v")
    lost = group.lost
    await pool_client.delete(group.key)  # an eviction, not an expiry
    assert isinstance(await lost, MembershipLost)
    await sleep(0.3)
    assert group.state is GroupState.LOST and await keys_under(pool_client, b"d/") == []
    await group.leave()


@pytest_twisted.ensureDeferred
async def test_explicit_rejoin_on_a_new_session(pool_client, sessions):
    a, b = await sessions(2)
    group = Group(a, b"e", member="me")
    await group.join(b"data")
    lost = group.lost
    await a.close()
    assert isinstance(await lost, SessionLost)
    assert await keys_under(pool_client, b"e/") == []
    with pytest.raises(SessionLost):
        await group.join(b"x")  # our session ended
    await group.rejoin(b)
    kv = (await pool_client.get(b"e/me")).kvs[0]
    assert (kv.value, kv.lease) == (b"data", b.lease_id) and group.session is b
    with pytest.raises(InvalidArgument):
        group.rejoin(b)  # joined already
    await group.leave()
    assert b.alive  # the caller's session: not closed by leave


@pytest_twisted.ensureDeferred
async def test_rejoin_takes_over_our_key_of_a_lease_etcd_still_holds(pool_client, sessions):
    """Our session ended on our side (deadline, close(orphan=True)) while etcd still
    holds its lease and our key: a re-join takes the key over (its lease set to the new
    session's, its create revision kept), so watchers see one update, not a leave."""
    a, b = await sessions(2)
    group = Group(a, b"o", member="me")
    await group.join(b"data")
    token = group.token
    await a.close(orphan=True)  # the lease lives on in etcd
    assert (await pool_client.get(b"o/me")).kvs[0].lease == a.lease_id
    await group.rejoin(b)
    kv = (await pool_client.get(b"o/me")).kvs[0]
    assert (kv.lease, kv.create_revision, group.token) == (b.lease_id, token, token)
    await Lease(pool_client, a.lease_id).revoke()  # the old lease's end spares our key
    assert (await pool_client.get(b"o/me")).kvs[0].lease == b.lease_id
    await group.leave()
    assert await keys_under(pool_client, b"o/") == []


@pytest_twisted.ensureDeferred
async def test_members_and_watch_wait_time_out(pool_client, listen, new_client):
    gateway, hung = hung_gateway(listen, new_client)
    try:
        started = time.monotonic()
        with pytest.raises(Timeout):
            await members(hung, b"x", timeout=0.3)
        assert time.monotonic() - started < 1.5
    finally:
        gateway.drop_held()
    watching = watch(pool_client, b"x")
    await watching.ready
    with pytest.raises(Timeout):
        await watching.wait(lambda m: len(m) > 0, timeout=0.2)
    d = watching.wait(lambda m: len(m) > 0)
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    assert watching._mirror.waiters == []  # nothing left waiting
    watching.close()
    with pytest.raises(Exception, match="closed"):
        await watching.wait(lambda m: True)


@pytest_twisted.ensureDeferred
async def test_on_a_cluster_when_the_watched_member_is_killed(etcd_cluster):
    """The member serving the watch dies: the watch resumes on another (nothing missed
    or repeated), the members' sessions and keys live on, updates and joins go on."""
    urls = [m.url for m in etcd_cluster.members]
    client = Client(reactor, urls, timeout=3.0)
    made = []
    try:
        seen: list[MembershipChange] = []
        watching = watch(client, b"cl", seen.append)
        await watching.ready
        served_by = getattr(watching._mirror.watch.watcher._stream, "endpoint", None)
        (victim,) = [m for m in etcd_cluster.members
                     if served_by is not None and served_by.url == m.url]
        for _ in range(2):
            made.append(await Session.create(client, ttl=15))
        a, b = Group(made[0], b"cl", member="a"), Group(made[1], b"cl", member="b")
        await a.join(b"a1")
        await watching.wait(lambda m: b"a" in m, timeout=10)
        victim.kill()
        # the victim may have been raft's leader: wait until the others take writes
        await wait_until(lambda: client.set(b"probe", b"x").addCallbacks(
            lambda _: True, lambda _: False), timeout=40, interval=0.2)
        await a.update(b"a2")
        await b.join(b"b1")
        await a.leave()
        await watching.wait(lambda m: dict(m) == {b"b": b"b1"}, timeout=20)
        assert b.joined and made[0].alive
        assert [(dict(c.joined), dict(c.updated), dict(c.left)) for c in seen] == [
            ({}, {}, {}), ({b"a": b"a1"}, {}, {}), ({}, {b"a": b"a2"}, {}),
            ({b"b": b"b1"}, {}, {}), ({}, {}, {b"a": b"a2"})]
        await b.leave()
        watching.close()
    finally:
        for s in made:
            await s.close().addErrback(lambda _: None)
        await client.close()


@pytest_twisted.ensureDeferred
async def test_watch_across_a_compaction_reports_the_difference(etcd_factory):
    server = etcd_factory()  # a private server: this test compacts its history
    client = Client(reactor, server.url)
    proxy = Proxy(server.url)
    far = Client(reactor, proxy.url, timeout=2.0)
    made = [await Session.create(client, ttl=5) for _ in range(3)]
    try:
        a, b = Group(made[0], b"cw", member="a"), Group(made[1], b"cw", member="b")
        c = Group(made[2], b"cw", member="c")
        await a.join(b"a1")
        await b.join(b"b1")
        seen: list[MembershipChange] = []
        watching = watch(far, b"cw", seen.append)
        await watching.ready
        await proxy.cut()
        await a.update(b"a2")
        await b.leave()
        await b.join(b"b2")  # left and joined again: another create revision
        await c.join(b"c")
        current = (await client.get(b"none")).header.revision
        await client.compact(current, physical=True)
        proxy.restore()
        await watching.wait(lambda m: dict(m) == {b"a": b"a2", b"b": b"b2", b"c": b"c"},
                            timeout=15)
        assert watching.resyncs == 1
        last = seen[-1]
        assert last.resync and len(seen) == 2
        assert (dict(last.joined), dict(last.updated), dict(last.left)) == (
            {b"b": b"b2", b"c": b"c"}, {b"a": b"a2"}, {b"b": b"b1"})
        watching.close()
    finally:
        await proxy.cut()
        await far.close()
        for s in made:
            await s.close()
        await client.close()


# -- member processes ---------------------------------------------------------------------------

MEMBER = textwrap.dedent("""
    import os, sys
    from twisted.internet import defer, task
    from twisted.internet.threads import deferToThread
    from coord import Client
    from coord.recipes import Group, Session

    url, n, ttl, rejoin = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    pid = os.getpid()

    def say(*words):
        print(*words, flush=True)

    async def main(reactor):
        client = Client(reactor, url, timeout=5)
        session = await Session.create(client, ttl=ttl)
        group = Group(session, b"five", member=f"p{pid}", rejoin=rejoin)
        watching = group.watch()
        await group.join(f"{pid}:v1")
        await watching.wait(lambda m: len(m) >= n, timeout=30)
        say("all", pid)
        while True:
            command = (await deferToThread(sys.stdin.readline)).strip()
            if command == "update":
                await group.update(f"{pid}:v2")
                say("updated", pid)
            elif command.startswith("gone "):
                gone = command.split()[1].encode()
                await watching.wait(lambda m: gone not in m, timeout=30)
                say("saw-gone", pid)
            elif command == "rejoined?":
                new = await group.rejoined
                say("rejoined", pid, "%x" % new.lease_id, group.rejoins)
            else:
                break
        watching.close()
        await group.leave()
        say("left", pid)
        await session.close()
        await client.close()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
""")


def tell(proc, line):
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


async def said(proc, word, timeout=30):
    """The member's next line, which must start with ``word``."""
    line = await deferred_readline(proc).addTimeout(timeout, reactor)
    assert line.split()[:1] == [word], (line, proc.poll())
    return line.split()


def member_proc(url, n, rejoin=False):
    return spawn(MEMBER, url, n, TTL, int(rejoin), stdin=subprocess.PIPE)


@pytest_twisted.ensureDeferred
async def test_five_member_processes(etcd, pool_client):
    seen: list[MembershipChange] = []
    watching = watch(pool_client, b"five", seen.append)
    await watching.ready
    procs = [member_proc(etcd.url, 5) for _ in range(5)]
    try:
        for p in procs:  # each one's own watch saw all five
            await said(p, "all")
        ids = {b"p%d" % p.pid for p in procs}
        await watching.wait(lambda m: set(m) == ids, timeout=5)
        leaver, killed = procs[0], procs[1]
        tell(leaver, "leave")
        await said(leaver, "left")
        await watching.wait(lambda m: b"p%d" % leaver.pid not in m, timeout=5)
        killed_at = time.monotonic()
        killed.kill()  # nobody deletes its key: its lease ends it
        for p in procs[2:]:
            tell(p, f"gone p{killed.pid}")
        await watching.wait(lambda m: b"p%d" % killed.pid not in m, timeout=TTL + 5)
        assert time.monotonic() - killed_at < TTL + 1.5
        for p in procs[2:]:  # the other members' watches saw it leave too
            await said(p, "saw-gone", timeout=5)
        tell(procs[2], "update")
        await said(procs[2], "updated")
        await watching.wait(lambda m: m.get(b"p%d" % procs[2].pid, b"").endswith(b"v2"),
                            timeout=5)
        # the history in etcd, event by event, is what the watch reported
        history = await pool_client.get(KeySet(b"five/", prefix=True))
        assert set(watching.members) == {kv.key[5:] for kv in history.kvs}
    finally:
        for p in procs:
            finish(p)
        watching.close()
    reports = [(c.revision, kind, member) for c in seen
               for kind, part in (("join", c.joined), ("update", c.updated),
                                  ("leave", c.left)) for member in part]
    assert [r[0] for r in reports] == sorted(r[0] for r in reports)
    joins = [m for _, kind, m in reports if kind == "join"]
    leaves = [m for _, kind, m in reports if kind == "leave"]
    assert sorted(joins) == sorted(ids) and len(joins) == 5  # each join once
    assert leaves == [b"p%d" % leaver.pid, b"p%d" % killed.pid]  # once each, in order
    assert [m for _, kind, m in reports if kind == "update"] == [b"p%d" % procs[2].pid]


@pytest_twisted.ensureDeferred
async def test_member_paused_past_its_ttl_rejoins(etcd, pool_client):
    seen: list[MembershipChange] = []
    watching = watch(pool_client, b"five", seen.append)
    await watching.ready
    proc = member_proc(etcd.url, 1, rejoin=True)
    try:
        await said(proc, "all")
        member = b"p%d" % proc.pid
        tell(proc, "update")
        await said(proc, "updated")
        old_lease = (await pool_client.get(b"five/" + member)).kvs[0].lease
        tell(proc, "rejoined?")
        await sleep(0.3)  # it waits for `rejoined` now
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            await watching.wait(lambda m: member not in m, timeout=TTL + 5)  # expired
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        line = await said(proc, "rejoined", timeout=15)
        new_lease = int(line[2], 16)
        assert new_lease != old_lease and line[3] == "1"
        await watching.wait(lambda m: m.get(member) == b"%d:v2" % proc.pid, timeout=5)
        kv = (await pool_client.get(b"five/" + member)).kvs[0]
        assert kv.lease == new_lease and kv.value == b"%d:v2" % proc.pid
        tell(proc, "leave")
        await said(proc, "left")
        await watching.wait(lambda m: not m, timeout=5)
        await wait_until(lambda: defer.succeed(proc.poll() is not None), timeout=10)
        assert proc.returncode == 0
    finally:
        finish(proc)
        watching.close()
    assert [(dict(c.joined), dict(c.updated), dict(c.left)) for c in seen[1:]] == [
        ({member: b"%d:v1" % proc.pid}, {}, {}),
        ({}, {member: b"%d:v2" % proc.pid}, {}),
        ({}, {}, {member: b"%d:v2" % proc.pid}),  # the lease expired while it was paused
        ({member: b"%d:v2" % proc.pid}, {}, {}),  # re-joined with its latest data
        ({}, {}, {member: b"%d:v2" % proc.pid}),  # left
    ]
    assert await lease_ids(pool_client) == []  # its sessions are closed


@pytest_twisted.ensureDeferred
async def test_etcdctl_reads_the_layout_and_its_writes_are_members(etcd, pool_client, sessions):
    (s,) = await sessions()
    group = Group(s, b"services/api", member="api-1")
    await group.join(b"10.0.0.1:80")
    env = {**os.environ, "ETCDCTL_API": "3"}
    out, _ = await defer_to_exit(subprocess.Popen(
        [find_etcdctl(), "--endpoints", etcd.url, "get", "--prefix", "services/api/"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    assert out.splitlines() == ["services/api/api-1", "10.0.0.1:80"]
    # a member registered by hand (no lease: it stays until deleted) is a member too
    await defer_to_exit(subprocess.Popen(
        [find_etcdctl(), "--endpoints", etcd.url, "put", "services/api/manual", "10.0.0.9:80"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    assert dict(await group.members()) == {b"api-1": b"10.0.0.1:80", b"manual": b"10.0.0.9:80"}
    await pool_client.delete(b"services/api/manual")
    await group.leave()


def test_docs_example_is_examples_group_py():
    """docs/group.md shows examples/group.py verbatim."""
    text = (ROOT / "docs" / "group.md").read_text()
    block = text.split("<!-- example: group.py -->\n```python\n", 1)[1].split("\n```\n", 1)[0]
    assert block + "\n" == (ROOT / "examples" / "group.py").read_text()


# -- through treq, and the example -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_through_treq(etcd):
    from helpers import make_client

    client = make_client(etcd.url, "treq")
    try:
        session = await Session.create(client, ttl=5)
        group = Group(session, b"t")
        watching = group.watch()
        await group.join(b"x")
        await watching.wait(lambda m: dict(m) == {group.member: b"x"}, timeout=5)
        assert dict(await group.members()) == {group.member: b"x"}
        await group.leave()
        await watching.wait(lambda m: not m, timeout=5)
        watching.close()
        await session.close()
    finally:
        await client.close()


def test_example(etcd):
    out = example("group.py", etcd.url)
    assert re.search(r"members at revision \d+: \['api-1', 'api-2'\]", out), out
    assert "api-2 updated: 10.0.0.2:8081" in out
    assert "api-1 left" in out
    assert "api-2 left" in out
    left = etcd.post("/v3/kv/range", {"key": "c2VydmljZXMvYXBpLw==",
                                      "range_end": "c2VydmljZXMvYXBpMA=="})
    assert int(left.get("count", 0)) == 0
    assert not etcd.post("/v3/lease/leases", {}).get("leases")
