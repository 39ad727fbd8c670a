"""Barrier and DoubleBarrier against real etcd, across processes where it matters.

Run on both etcd versions:
``COORD_ETCD=/usr/bin/etcd COORD_ETCDCTL=/usr/bin/etcdctl pytest tests/test_barrier.py``.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import textwrap
import time

import pytest
import pytest_twisted
from helpers import (
    LossyProxy,
    Proxy,
    b64,
    count_is,
    defer_to_exit,
    deferred_readline,
    example,
    finish,
    keys_under,
    lease_ids,
    sleep,
    spawn,
    wait_until,
)
from twisted.internet import defer, reactor

from coord import (
    Client,
    InvalidArgument,
    KeySet,
    OutcomeUnknown,
    ParticipantLost,
    SessionLost,
    Timeout,
    TooManyParticipants,
    Unavailable,
)
from coord.recipes import Barrier, DoubleBarrier, DoubleBarrierState, Session
from coord.server import find_etcdctl
from coord.testing import answer, raw

# -- Barrier ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_hold_wait_release(pool_client):
    barrier = Barrier(pool_client, b"deploy")
    assert await barrier.hold() is True
    assert await barrier.hold() is False  # already held: left as it is
    kv = (await pool_client.get(b"deploy")).kvs[0]  # Go's layout: the name itself, empty
    assert (kv.value, kv.lease, kv.version) == (b"", 0, 1)
    with pytest.raises(Timeout, match="deploy"):
        await barrier.wait(timeout=0.3)
    with pytest.raises(Timeout, match="deploy"):
        await barrier.wait(timeout=0)
    waiting = [Barrier(pool_client, "deploy").wait(timeout=10) for _ in range(3)]
    await sleep(0.2)
    assert not any(d.called for d in waiting)
    assert await barrier.release() is True
    revisions = [await d for d in waiting]
    deleted_at = (await pool_client.get(b"deploy")).header.revision
    assert revisions == [deleted_at] * 3  # the DELETE's revision
    assert await barrier.release() is False
    assert await barrier.wait(timeout=0) == deleted_at  # not held: at once
    assert await barrier.wait() == deleted_at
    assert await keys_under(pool_client, b"deploy") == []


@pytest_twisted.ensureDeferred
async def test_a_put_is_not_a_release_and_a_rehold_after_a_release_is(pool_client):
    barrier = Barrier(pool_client, b"re")
    await barrier.hold()
    d = barrier.wait(timeout=10)
    await sleep(0.1)
    await pool_client.set(b"re", b"changed")  # still held
    await sleep(0.2)
    assert not d.called
    # released and held again at once: the DELETE event is the proof, the waiter goes
    await barrier.release()
    await barrier.hold()
    await d
    await barrier.release()


@pytest_twisted.ensureDeferred
async def test_wait_cancel_and_bad_input(pool_client, sessions):
    barrier = Barrier(pool_client, b"c")
    await barrier.hold()
    d = barrier.wait(timeout=10)
    await sleep(0.1)
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    d = barrier.wait()  # no timeout: cancel only
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    await barrier.release()
    with pytest.raises(TypeError, match="Client"):
        Barrier("http://x", b"n")
    with pytest.raises(TypeError, match="name"):
        Barrier(pool_client, 5)
    with pytest.raises(InvalidArgument, match="name"):
        Barrier(pool_client, b"")
    with pytest.raises(TypeError, match="session"):
        Barrier(pool_client, b"n", session=object())
    other = Client(reactor, "http://127.0.0.1:1")
    try:
        (s,) = await sessions()
        with pytest.raises(InvalidArgument, match="same client"):
            Barrier(other, b"n", session=s)
    finally:
        await other.close()
    with pytest.raises(TypeError, match="timeout"):
        barrier.wait(timeout="1")
    with pytest.raises(InvalidArgument, match="timeout"):
        barrier.wait(timeout=-1)


@pytest_twisted.ensureDeferred
async def test_hold_with_a_session_goes_with_its_lease(pool_client, sessions):
    (s,) = await sessions()
    barrier = Barrier(pool_client, b"leased", session=s)
    assert await barrier.hold() is True
    assert (await pool_client.get(b"leased")).kvs[0].lease == s.lease_id
    d = Barrier(pool_client, b"leased").wait(timeout=10)
    await sleep(0.1)
    assert not d.called
    await s.close()  # its lease revoked: the barrier is released
    await d
    with pytest.raises(SessionLost):
        await barrier.hold()  # a session that ended: nothing sent
    assert await keys_under(pool_client, b"leased") == []


@pytest.mark.parametrize("lose", ["answer", "request"])
@pytest_twisted.ensureDeferred
async def test_a_session_hold_whose_answer_was_lost_is_settled(etcd, pool_client, lose):
    """With a session, a hold whose answer never came is sent again: True once, whether
    the first send was applied (the key found carries our lease) or not."""
    proxy = LossyProxy(etcd.url, lose, match=b64(b"lossy/gate"))
    client = Client(reactor, proxy.url, timeout=5)
    try:
        session = await Session.create(client, ttl=30)
        barrier = Barrier(client, b"lossy/gate", session=session)
        assert await barrier.hold() is True
        assert proxy.lost
        (kv,) = (await pool_client.get(b"lossy/gate")).kvs
        assert (kv.lease, kv.version) == (session.lease_id, 1)  # written once
        assert await barrier.hold() is False  # a later call: held already
        await session.close()
        assert await keys_under(pool_client, b"lossy/") == []
    finally:
        await client.close()
        await proxy.close()


@pytest_twisted.ensureDeferred
async def test_a_hold_without_a_session_whose_answer_was_lost_is_unknown(etcd, pool_client):
    """Without a session nothing tells a lost hold's key from anyone's: OutcomeUnknown."""
    proxy = LossyProxy(etcd.url, "answer", match=b64(b"lossy/bare"))
    client = Client(reactor, proxy.url, timeout=5)
    try:
        with pytest.raises(OutcomeUnknown):
            await Barrier(client, b"lossy/bare").hold()
        assert await keys_under(pool_client, b"lossy/bare") == [b"lossy/bare"]
        assert await Barrier(client, b"lossy/bare").release() is True
    finally:
        await client.close()
        await proxy.close()


@pytest_twisted.ensureDeferred
async def test_closing_the_client_is_no_release(etcd, pool_client):
    other = Client(reactor, etcd.url)
    await Barrier(pool_client, b"closing").hold()
    d = Barrier(other, b"closing").wait(timeout=10)
    await sleep(0.2)
    await other.close()  # its watch ends as if cancelled, its reads fail
    with pytest.raises(Unavailable, match="closed"):
        await d
    await Barrier(pool_client, b"closing").release()


def _b64(data):
    return base64.b64encode(data).decode()


@pytest_twisted.ensureDeferred
async def test_a_watch_etcd_cancels_is_no_release(path_gateway):
    """etcd ends the watch (a cancel that is no compaction): the waiter reads again and
    watches again -- as long as the key exists it waits; the read that finds none ends it."""
    header = {"cluster_id": "1", "member_id": "2", "revision": "7", "raft_term": "1"}
    held = {"kvs": [{"key": _b64(b"gw"), "create_revision": "5", "mod_revision": "5",
                     "version": "1"}], "count": "1", "header": header}
    state = {"held": True}
    lines = [{"result": {"header": header, "created": True, "watch_id": "1"}},
             {"result": {"header": header, "watch_id": "1", "canceled": True,
                         "cancel_reason": "watch cancelled by a test"}}]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    stream = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(body), body))

    def script(path):
        if path == "/v3/kv/range":
            return answer(body=held if state["held"] else {"header": header})
        if path == "/v3/watch":
            return raw(stream)
        return answer(path=path)

    url, gateway = path_gateway(script)
    client = Client(reactor, url)
    try:
        d = Barrier(client, b"gw").wait(timeout=10)
        await wait_until(lambda: gateway.count("/v3/kv/range") >= 3, timeout=5)
        assert not d.called  # each closed watch led to a read, none to a release
        assert gateway.count("/v3/watch") >= 2
        state["held"] = False
        assert await d == 7
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_compaction_while_disconnected_is_no_release(etcd_factory):
    server = etcd_factory()  # a private server: this test compacts its history
    near = Client(reactor, server.url)
    proxy = Proxy(server.url)
    far = Client(reactor, proxy.url, timeout=2.0)
    try:
        barrier = Barrier(near, b"compact")
        await barrier.hold()
        d = Barrier(far, b"compact").wait(timeout=30)
        await sleep(0.3)
        await proxy.cut()
        for i in range(5):
            await near.set(b"other", b"%d" % i)
        current = (await near.get(b"other")).header.revision
        await near.compact(current, physical=True)
        proxy.restore()  # the watch resumes behind the compaction: Compacted
        await sleep(1.0)
        assert not d.called  # read again: still held
        await barrier.release()
        assert await d > current
    finally:
        await far.close()
        await proxy.close()
        await near.close()


@pytest_twisted.ensureDeferred
@pytest.mark.slow
async def test_a_paused_or_killed_etcd_is_no_release_and_a_release_while_away_is_seen(
        etcd_factory):
    server = etcd_factory()
    near = Client(reactor, server.url, timeout=2.0)
    proxy = Proxy(server.url)
    far = Client(reactor, proxy.url, timeout=2.0)
    try:
        barrier = Barrier(near, b"down")
        await barrier.hold()
        d = Barrier(far, b"down").wait(timeout=30)
        await sleep(0.3)
        await defer_to_thread(server.pause)  # etcd hangs (SIGSTOP) while the waiter waits
        paused = Barrier(far, b"down").wait(timeout=30)  # its read hangs, times out: again
        await sleep(2.5)
        assert not d.called and not paused.called
        await defer_to_thread(server.resume)
        await sleep(0.5)
        assert not d.called and not paused.called
        server.kill()  # etcd crashes while the waiter waits
        late = Barrier(far, b"down").wait(timeout=30)  # its reads fail: it reads again
        await sleep(1.0)
        assert not d.called and not late.called
        await defer_to_thread(server.restart)
        await wait_until(lambda: near.get(b"x").addCallbacks(lambda _: True,
                                                             lambda _: False), timeout=20)
        await sleep(0.5)
        assert not d.called and not late.called  # still held after the restart
        await proxy.cut()
        await barrier.release()  # while the waiter is away
        await sleep(0.3)
        assert not d.called
        proxy.restore()
        await d  # the watch resumed and delivered the DELETE
        await late
        await paused
    finally:
        await far.close()
        await proxy.close()
        await near.close()


def defer_to_thread(fn):
    from twisted.internet.threads import deferToThread

    return deferToThread(fn)


def etcdctl(url, *args):
    return subprocess.run([find_etcdctl(), "--endpoints", url, *args], check=True,
                          capture_output=True, text=True, timeout=30).stdout


@pytest_twisted.ensureDeferred
async def test_etcdctl_holds_and_releases_a_barrier(etcd, pool_client):
    """The key is the name itself (Go's layout): etcdctl put / del hold and release it."""
    await defer_to_thread(lambda: etcdctl(etcd.url, "put", "ctl/gate", ""))
    assert await Barrier(pool_client, b"ctl/gate").hold() is False  # held already
    d = Barrier(pool_client, b"ctl/gate").wait(timeout=10)
    await sleep(0.2)
    assert not d.called
    await defer_to_thread(lambda: etcdctl(etcd.url, "del", "ctl/gate"))
    await d
    await Barrier(pool_client, b"ctl/gate").hold()
    out = await defer_to_thread(lambda: etcdctl(etcd.url, "get", "ctl/gate", "-w", "json"))
    assert json.loads(out)["kvs"][0]["key"] == _b64(b"ctl/gate")


WAITER = textwrap.dedent("""
    import sys, time
    from twisted.internet import defer, task
    from coord import Client
    from coord.recipes import Barrier

    async def main(reactor):
        client = Client(reactor, sys.argv[1])
        barrier = Barrier(client, sys.argv[2])
        # (a read first, so that "waiting" means held and watched)
        await client.get(sys.argv[2])
        d = barrier.wait(timeout=30)
        print("waiting", flush=True)
        await d
        print("released", time.time(), flush=True)
        await client.close()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
""")

HOLDER = textwrap.dedent("""
    import sys
    from twisted.internet import defer, task, threads
    from coord import Client
    from coord.recipes import Barrier, Session

    async def main(reactor):
        client = Client(reactor, sys.argv[1])
        session = await Session.create(client, ttl=3) if sys.argv[3] == "lease" else None
        barrier = Barrier(client, sys.argv[2], session=session)
        print("held", await barrier.hold(), flush=True)
        await threads.deferToThread(sys.stdin.readline)
        print("released", await barrier.release(), flush=True)
        await client.close()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
""")


def _spawn_stdin(code, *args):
    import subprocess

    return spawn(code, *args, stdin=subprocess.PIPE)


@pytest_twisted.ensureDeferred
async def test_five_waiter_processes_released_by_another_process(etcd, pool_client):
    holder = _spawn_stdin(HOLDER, etcd.url, "gate", "none")
    waiters = []
    try:
        assert (await deferred_readline(holder)).split() == ["held", "True"]
        waiters = [spawn(WAITER, etcd.url, "gate") for _ in range(5)]
        for w in waiters:
            assert (await deferred_readline(w)).strip() == "waiting"
        await sleep(0.5)
        assert all(w.poll() is None for w in waiters)  # held: nobody passes
        released_at = time.time()
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert (await deferred_readline(holder)).split() == ["released", "True"]
        for w in waiters:
            out, err = await defer_to_exit(w)
            assert w.returncode == 0, err
            woken = float(out.split()[-1])
            assert released_at <= woken < released_at + 10
        assert await keys_under(pool_client, b"gate") == []
    finally:
        for p in [holder, *waiters]:
            finish(p)


@pytest_twisted.ensureDeferred
async def test_a_sigkilled_holder_releases_its_waiters_after_its_ttl(etcd, pool_client):
    holder = _spawn_stdin(HOLDER, etcd.url, "crash", "lease")
    waiters = []
    try:
        assert (await deferred_readline(holder)).split() == ["held", "True"]
        waiters = [spawn(WAITER, etcd.url, "crash") for _ in range(2)]
        for w in waiters:
            assert (await deferred_readline(w)).strip() == "waiting"
        os.kill(holder.pid, signal.SIGKILL)
        killed_at = time.time()
        for w in waiters:
            out, err = await defer_to_exit(w)
            assert w.returncode == 0, err
            woken = float(out.split()[-1])
            # the key went with the lease (TTL 3 s), not at once
            assert killed_at + 0.5 < woken < killed_at + 10, woken - killed_at
        assert await keys_under(pool_client, b"crash") == []
    finally:
        for p in [holder, *waiters]:
            finish(p)


@pytest_twisted.ensureDeferred
async def test_through_each_transport(client):
    barrier = Barrier(client, b"tr")
    assert await barrier.hold() is True
    d = barrier.wait(timeout=10)
    await sleep(0.1)
    assert not d.called
    await barrier.release()
    await d
    s = await Session.create(client, ttl=5)
    try:
        one = DoubleBarrier(s, b"tr1", 1)  # count 1: enter opens at once, leave is the last
        await one.enter(timeout=10)
        await one.leave(timeout=10)
    finally:
        await s.close()
    assert await keys_under(client, b"tr") == []


# -- DoubleBarrier --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_double_barrier_enter_and_leave(pool_client, sessions):
    a, b, c = await sessions(3)
    ba, bb, bc = (DoubleBarrier(s, b"phase", 3) for s in (a, b, c))
    da, db = ba.enter(timeout=10), bb.enter(timeout=10)
    await wait_until(lambda: count_is(pool_client, b"phase/waiters/", 2))
    await sleep(0.2)
    assert not da.called and not db.called
    assert ba.state is DoubleBarrierState.ENTERING
    assert await bc.enter(timeout=10) is bc  # the third: opens it
    await da
    await db
    assert {x.state for x in (ba, bb, bc)} == {DoubleBarrierState.ENTERED}
    # Go's layout: name/waiters/<lease hex> under each lease, name/ready without one
    got = (await pool_client.get(KeySet(b"phase/", prefix=True))).kvs
    assert {kv.key: kv.lease for kv in got} == {
        b"phase/waiters/%x" % a.lease_id: a.lease_id,
        b"phase/waiters/%x" % b.lease_id: b.lease_id,
        b"phase/waiters/%x" % c.lease_id: c.lease_id, b"phase/ready": 0}
    ready = next(kv for kv in got if kv.key == b"phase/ready")
    assert ba.opened == bb.opened == bc.opened == ready.mod_revision
    la, lb = ba.leave(timeout=10), bb.leave(timeout=10)
    await wait_until(lambda: count_is(pool_client, b"phase/waiters/", 1))
    await sleep(0.2)
    assert not la.called and not lb.called  # c is still in
    await bc.leave(timeout=10)
    await la
    await lb
    assert await keys_under(pool_client, b"phase/") == []  # the last leaver took ready
    assert {x.state for x in (ba, bb, bc)} == {DoubleBarrierState.IDLE}
    # a second round with the same objects
    rounds = [x.enter(timeout=10) for x in (ba, bb, bc)]
    for d in rounds:
        await d
    for d in [x.leave(timeout=10) for x in (ba, bb, bc)]:
        await d
    assert await keys_under(pool_client, b"phase/") == []


@pytest.mark.parametrize("lose", ["answer", "request"])
@pytest_twisted.ensureDeferred
async def test_a_ready_write_whose_answer_was_lost_is_settled(etcd, pool_client, sessions,
                                                               lose):
    """The count-th entrant's write of ``ready`` loses its answer: it is sent again (it
    applies at most once: ready not written since our key), and both participants
    enter, with ready written once."""
    proxy = LossyProxy(etcd.url, lose, match=b64(b"lossy/phase/ready"))
    client = Client(reactor, proxy.url, timeout=5)
    try:
        (first,) = await sessions()
        last = await Session.create(client, ttl=30)
        waiting = DoubleBarrier(first, b"lossy/phase", 2).enter(timeout=10)
        await wait_until(lambda: count_is(pool_client, b"lossy/phase/waiters/", 1))
        opener = DoubleBarrier(last, b"lossy/phase", 2)
        assert await opener.enter(timeout=10) is opener
        assert (await waiting).state is DoubleBarrierState.ENTERED
        assert proxy.lost
        (ready,) = (await pool_client.get(b"lossy/phase/ready")).kvs
        assert ready.version == 1 and opener.opened == ready.mod_revision
        await last.close()
    finally:
        await client.close()
        await proxy.close()


@pytest_twisted.ensureDeferred
async def test_too_many_participants_leave_no_key(pool_client, sessions):
    a, b, c = await sessions(3)
    ba, bb = DoubleBarrier(a, b"two", 2), DoubleBarrier(b, b"two", 2)
    d = ba.enter(timeout=10)
    await bb.enter(timeout=10)
    await d
    with pytest.raises(TooManyParticipants, match="two"):
        await DoubleBarrier(c, b"two", 2).enter(timeout=10)
    assert await count_is(pool_client, b"two/waiters/", 2)
    la = ba.leave(timeout=10)  # (it waits for bb's leave)
    await bb.leave(timeout=10)
    await la
    assert await keys_under(pool_client, b"two/") == []


@pytest_twisted.ensureDeferred
async def test_enter_timeout_and_cancel_leave_nothing_behind(pool_client, sessions):
    (a,) = await sessions()
    leases = await lease_ids(pool_client)
    lone = DoubleBarrier(a, b"lone", 2)
    with pytest.raises(Timeout, match="lone"):
        await lone.enter(timeout=0.3)
    assert await keys_under(pool_client, b"lone/") == []
    assert lone.state is DoubleBarrierState.IDLE
    d = lone.enter(timeout=10)
    await wait_until(lambda: count_is(pool_client, b"lone/waiters/", 1))
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    await wait_until(lambda: count_is(pool_client, b"lone/", 0), timeout=2)
    assert await lease_ids(pool_client) == leases  # no lease made or left


@pytest_twisted.ensureDeferred
async def test_a_leave_that_times_out_has_left(pool_client, sessions):
    """A leave's Timeout: our key is gone all the same; the other's leave does not wait
    for us, and, the last one, takes ``ready``."""
    a, b = await sessions(2)
    ba, bb = DoubleBarrier(a, b"lt", 2), DoubleBarrier(b, b"lt", 2)
    d = ba.enter(timeout=10)
    await bb.enter(timeout=10)
    await d
    with pytest.raises(Timeout, match="lt"):
        await ba.leave(timeout=0.3)
    assert await keys_under(pool_client, b"lt/") == [b"lt/ready", bb.key]
    await bb.leave(timeout=10)
    assert await keys_under(pool_client, b"lt/") == []
    assert ba.state is bb.state is DoubleBarrierState.IDLE


@pytest_twisted.ensureDeferred
async def test_a_ready_left_behind_lets_no_later_round_in(pool_client, sessions):
    """A crashed last leaver leaves ``ready``; entrants ignore a ready older than their key."""
    await pool_client.set(b"stale/ready", b"")
    a, b = await sessions(2)
    ba = DoubleBarrier(a, b"stale", 2)
    with pytest.raises(Timeout):
        await ba.enter(timeout=0.5)
    d = ba.enter(timeout=10)
    await wait_until(lambda: count_is(pool_client, b"stale/waiters/", 1))
    await sleep(0.2)
    assert not d.called
    bb = DoubleBarrier(b, b"stale", 2)
    await bb.enter(timeout=10)
    await d
    la = ba.leave(timeout=10)
    await bb.leave(timeout=10)
    await la
    assert await keys_under(pool_client, b"stale/") == []


@pytest_twisted.ensureDeferred
async def test_an_entrant_that_drops_out_is_replaced(pool_client, sessions):
    """An entrant whose session ends while it waits drops out (SessionLost, its key
    gone): the others go on waiting, and a newcomer takes its place."""
    x, y, z, w = await sessions(4)
    bx, by, bz, bw = (DoubleBarrier(s, b"drop", 3) for s in (x, y, z, w))
    dx = bx.enter(timeout=10)
    await wait_until(lambda: count_is(pool_client, b"drop/waiters/", 1))
    dy = by.enter(timeout=10)
    await wait_until(lambda: count_is(pool_client, b"drop/waiters/", 2))
    await y.close()
    with pytest.raises(SessionLost):
        await dy
    assert by.state is DoubleBarrierState.IDLE
    dz = bz.enter(timeout=10)
    await wait_until(lambda: count_is(pool_client, b"drop/waiters/", 2))
    await sleep(0.2)
    assert not dx.called and not dz.called  # two of three: still waiting
    await bw.enter(timeout=10)
    await dx
    await dz
    for d in [b.leave(timeout=10) for b in (bx, bz, bw)]:
        await d
    assert await keys_under(pool_client, b"drop/") == []


@pytest_twisted.ensureDeferred
async def test_a_waiter_key_deleted_by_someone_else(pool_client, sessions):
    (a,) = await sessions()
    ba = DoubleBarrier(a, b"del", 2)
    d = ba.enter(timeout=10)
    await wait_until(lambda: count_is(pool_client, b"del/waiters/", 1))
    await pool_client.delete(ba.key)
    with pytest.raises(ParticipantLost):
        await d
    assert await keys_under(pool_client, b"del/") == []


@pytest_twisted.ensureDeferred
async def test_double_barrier_bad_input(pool_client, sessions):
    (s,) = await sessions()
    with pytest.raises(TypeError, match="count"):
        DoubleBarrier(s, b"x", "3")
    with pytest.raises(TypeError, match="count"):
        DoubleBarrier(s, b"x", True)
    with pytest.raises(InvalidArgument, match="count"):
        DoubleBarrier(s, b"x", 0)
    with pytest.raises(TypeError, match="Session"):
        DoubleBarrier(pool_client, b"x", 2)
    with pytest.raises(InvalidArgument, match="name"):
        DoubleBarrier(s, b"", 2)
    x = DoubleBarrier(s, b"x", 2)
    with pytest.raises(InvalidArgument, match="not entered"):
        x.leave()
    with pytest.raises(InvalidArgument, match="timeout"):
        x.enter(timeout=0)
    with pytest.raises(TypeError, match="timeout"):
        x.enter(timeout="2")
    d = x.enter(timeout=5)
    with pytest.raises(InvalidArgument, match="already"):
        x.enter(timeout=5)
    with pytest.raises(InvalidArgument, match="same session"):
        DoubleBarrier(s, b"x", 2).enter(timeout=5)
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    await wait_until(lambda: count_is(pool_client, b"x/", 0), timeout=2)  # removed after


PARTICIPANT = textwrap.dedent("""
    import sys, time
    from twisted.internet import defer, task, threads
    from coord import Client
    from coord.recipes import DoubleBarrier, Session

    async def main(reactor):
        client = Client(reactor, sys.argv[1])
        session = await Session.create(client, ttl=3)
        barrier = DoubleBarrier(session, b"dbl", int(sys.argv[2]))
        print("entering", time.time(), flush=True)
        await barrier.enter(timeout=30)
        print("entered", time.time(), flush=True)
        await threads.deferToThread(sys.stdin.readline)
        print("leaving", time.time(), flush=True)
        await barrier.leave(timeout=30)
        print("left", time.time(), flush=True)
        await session.close()
        await client.close()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
""")


async def _line(proc, word):
    line = await deferred_readline(proc)
    assert line.split()[:1] == [word], line
    return float(line.split()[1])


@pytest_twisted.ensureDeferred
@pytest.mark.slow
async def test_four_processes_enter_and_leave_one_sigkilled(etcd, pool_client):
    """Four processes enter (each returns only once the fourth called enter); then one is
    SIGKILLed, the three others leave: their leave returns once its lease ended (TTL 3 s)."""
    procs = []
    try:
        entering = []
        for _ in range(4):
            p = _spawn_stdin(PARTICIPANT, etcd.url, 4)
            procs.append(p)
            entering.append(await _line(p, "entering"))
            if len(procs) < 4:
                n = len(procs)
                await wait_until(lambda: count_is(pool_client, b"dbl/waiters/", n),  # noqa: B023
                                 timeout=10)
        entered = [await _line(p, "entered") for p in procs]
        assert min(entered) >= max(entering)
        os.kill(procs[0].pid, signal.SIGKILL)
        killed_at = time.time()
        for p in procs[1:]:
            p.stdin.write("leave\n")
            p.stdin.flush()
        for p in procs[1:]:
            await _line(p, "leaving")
        left = [await _line(p, "left") for p in procs[1:]]
        assert min(left) > killed_at + 0.5  # they waited for the crashed one's lease
        assert max(left) < killed_at + 10
        for p in procs[1:]:
            _, err = await defer_to_exit(p)
            assert p.returncode == 0, err
        # the last leaver by its own delete is none of them (the crashed key went last):
        # ready may stay, harmlessly; no waiter key does
        assert await keys_under(pool_client, b"dbl/waiters/") == []
    finally:
        for p in procs:
            finish(p)


@pytest_twisted.ensureDeferred
async def test_four_processes_leave_together(etcd, pool_client):
    procs = [_spawn_stdin(PARTICIPANT, etcd.url, 4) for _ in range(4)]
    try:
        entering = [await _line(p, "entering") for p in procs]
        entered = [await _line(p, "entered") for p in procs]
        assert min(entered) >= max(entering)
        leaving = []
        for p in procs:
            p.stdin.write("leave\n")
            p.stdin.flush()
            leaving.append(await _line(p, "leaving"))
            await sleep(0.1)
        left = [await _line(p, "left") for p in procs]
        assert min(left) >= max(leaving)
        for p in procs:
            _, err = await defer_to_exit(p)
            assert p.returncode == 0, err
        assert await keys_under(pool_client, b"dbl/") == []
    finally:
        for p in procs:
            finish(p)


def test_example(etcd):
    out = example("barrier.py", etcd.url)
    assert "released" in out and "all 3 entered" in out and "all 3 left" in out, out


@pytest_twisted.ensureDeferred
async def test_double_barrier_as_a_context_manager(pool_client, sessions):
    """``async with`` enters, and leaves when the block ends (also by an exception)."""
    a, b = await sessions(2)
    inside = []

    async def participant(session, fail):
        async with DoubleBarrier(session, b"with", 2) as phase:
            inside.append(phase.state)
            if fail:
                raise RuntimeError("the work failed")

    ok = defer.ensureDeferred(participant(a, False))
    failing = defer.ensureDeferred(participant(b, True))
    await ok
    with pytest.raises(RuntimeError, match="the work failed"):
        await failing
    assert inside == [DoubleBarrierState.ENTERED] * 2
    assert await keys_under(pool_client, b"with/") == []  # both left, ready deleted
