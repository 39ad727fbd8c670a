"""Queue and PriorityQueue against real etcd, across processes where it matters.

Run on both etcd versions:
``COORD_ETCD=/usr/bin/etcd COORD_ETCDCTL=/usr/bin/etcdctl pytest tests/test_queue.py``.
"""

from __future__ import annotations

import collections
import math
import os
import signal
import textwrap
import time

import pytest
import pytest_twisted
from helpers import (
    ROOT,
    defer_to_exit,
    deferred_readline,
    example,
    finish,
    keys_under,
    sleep,
    spawn,
    wait_until,
)
from twisted.internet import defer, reactor

from coord import (
    ClaimLost,
    Client,
    InvalidArgument,
    OpSet,
    OutcomeUnknown,
    SessionLost,
    Timeout,
    Unavailable,
)
from coord.recipes import Item, ItemState, PriorityQueue, Queue
from coord.recipes.queue import MAX_PRIORITY


async def nothing_left(client, name, items=0):
    """No waiter key and no claim under ``name``, and ``items`` items."""
    assert await keys_under(client, name + b"/waiters/") == []
    assert await keys_under(client, name + b"/claims/") == []
    assert len(await keys_under(client, name + b"/items/")) == items


# -- one process ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_put_get_ack_in_order(client, pool_client):
    """Through both transports: FIFO, the key layout, and nothing left after the acks."""
    from coord.session import Session

    session = await Session.create(client, ttl=5)
    queue = Queue(client, b"q1")
    try:
        await queue.start()
        await queue.start()  # once loaded: at once
        keys = [await queue.put(v) for v in (b"a", b"b", "c")]
        assert all(k.startswith(b"q1/items/") for k in keys)
        assert await keys_under(pool_client, b"q1/items/") == sorted(keys)
        got = []
        for _ in keys:
            item = await queue.get(session, timeout=5)
            assert isinstance(item, Item) and item.state is ItemState.CLAIMED and item.held
            claim = (await pool_client.get(item.claim_key)).kvs[0]
            assert claim.lease == session.lease_id  # a claim never without a lease
            assert claim.create_revision == item.claim_revision > item.revision
            got.append((item.value, item.key))
            await item.ack()
            assert item.state is ItemState.ACKED
            await item.ack()  # a second ack does nothing
        assert got == list(zip([b"a", b"b", b"c"], keys, strict=True))
        await nothing_left(pool_client, b"q1")
        assert queue.claimed == 3 and queue.conflicts == 0
    finally:
        queue.close()
        await session.close()


@pytest_twisted.ensureDeferred
async def test_release_gives_the_item_back_first(pool_client, sessions):
    (s,) = await sessions()
    queue = Queue(pool_client, b"q2")
    for v in (b"a", b"b"):
        await queue.put(v)
    first = await queue.get(s, timeout=5)
    await first.release()
    await first.release()  # idempotent
    assert first.state is ItemState.RELEASED
    with pytest.raises(ClaimLost):
        await first.ack()
    again = await queue.get(s, timeout=5)
    assert (again.value, again.revision) == (b"a", first.revision)
    assert again.claim_revision > first.claim_revision
    second = await queue.get(s, timeout=5)  # a consumer may hold several items
    assert second.value == b"b"
    await again.ack()
    await second.ack()
    await nothing_left(pool_client, b"q2")
    queue.close()


@pytest_twisted.ensureDeferred
async def test_a_release_that_failed_leaves_the_item_claimed_to_release_again(
        etcd, new_client, pool_client, sessions):
    """A release whose delete fails (etcd hung: no answer) is not taken as done: the
    item stays CLAIMED, and a second release sends the delete again."""
    from coord.session import Session

    consumer = new_client(etcd.url, timeout=1)
    session = await Session.create(consumer, ttl=30)
    queue = Queue(consumer, b"q-release")
    await queue.put(b"a")
    item = await queue.get(session, timeout=5)
    etcd.pause()
    try:
        with pytest.raises((Timeout, Unavailable)):
            await item.release()
    finally:
        etcd.resume()
    assert item.state is ItemState.CLAIMED
    await item.release()
    assert item.state is ItemState.RELEASED
    (other,) = await sessions()
    watcher = Queue(pool_client, b"q-release")
    again = await watcher.get(other, timeout=5)  # given back: another consumer has it
    assert (again.value, again.revision) == (b"a", item.revision)
    await again.ack()
    await nothing_left(pool_client, b"q-release")
    queue.close()
    watcher.close()
    await session.close()


@pytest_twisted.ensureDeferred
async def test_a_get_right_after_a_timed_out_get_waits_for_its_clean_up(
        etcd, new_client, pool_client):
    """A get of the same session while the timed-out one still removes its waiter key
    (etcd hung) is not refused: it waits for that removal, then takes its turn."""
    from coord.session import Session

    consumer = new_client(etcd.url, timeout=1)
    session = await Session.create(consumer, ttl=30)
    queue = Queue(consumer, b"q-again")
    first = queue.get(session, timeout=1.5)
    await wait_until(lambda: keys_under(pool_client, b"q-again/waiters/"))
    etcd.pause()  # the first get's removal of its waiter key hangs
    try:
        with pytest.raises(Timeout):
            await first
        second = queue.get(session, timeout=10)  # no InvalidArgument
        await sleep(0.2)
    finally:
        etcd.resume()
    await pool_client.set(b"q-again/items/x", b"x")
    item = await second
    assert item.value == b"x"
    await item.ack()
    await nothing_left(pool_client, b"q-again")
    queue.close()
    await session.close()


@pytest_twisted.ensureDeferred
async def test_ack_after_the_session_ended_raises_claim_lost(pool_client, sessions):
    a, b = await sessions(2)
    queue = Queue(pool_client, b"q3")
    await queue.put(b"job")
    item = await queue.get(a, timeout=5)
    await a.close()  # its lease goes, and the claim with it
    assert not item.held
    with pytest.raises(ClaimLost):
        await item.ack()
    assert len(await keys_under(pool_client, b"q3/items/")) == 1  # not deleted
    again = await queue.get(b, timeout=5)  # back in the queue
    assert again.key == item.key
    await defer.gatherResults([again.ack(), again.ack()])  # two at once: one transaction
    assert again.state is ItemState.ACKED
    await nothing_left(pool_client, b"q3")
    queue.close()


@pytest_twisted.ensureDeferred
async def test_ack_of_a_claim_deleted_by_hand_raises_claim_lost(pool_client, sessions):
    (s,) = await sessions()
    queue = Queue(pool_client, b"q4")
    await queue.put(b"job")
    item = await queue.get(s, timeout=5)
    await pool_client.delete(item.claim_key)
    with pytest.raises(ClaimLost, match="claim was deleted"):
        await item.ack()
    assert item.state is ItemState.RELEASED
    await nothing_left(pool_client, b"q4", items=1)
    queue.close()


@pytest_twisted.ensureDeferred
async def test_get_timeout_leaves_nothing(pool_client, sessions):
    a, b = await sessions(2)
    queue = Queue(pool_client, b"q5")
    start = time.monotonic()
    with pytest.raises(Timeout):
        await queue.get(a, timeout=0.3)  # the head, waiting for an item
    assert 0.3 <= time.monotonic() - start < 1.5
    await nothing_left(pool_client, b"q5")
    head = queue.get(a, timeout=10)
    await wait_until(lambda: keys_under(pool_client, b"q5/waiters/"))
    with pytest.raises(Timeout):
        await queue.get(b, timeout=0.3)  # queued behind the head
    assert len(await keys_under(pool_client, b"q5/waiters/")) == 1  # the head's only
    await queue.put(b"x")
    item = await head
    assert item.session is a
    await item.ack()
    await nothing_left(pool_client, b"q5")
    queue.close()


@pytest_twisted.ensureDeferred
async def test_get_cancel_leaves_nothing(pool_client, sessions):
    a, b = await sessions(2)
    queue = Queue(pool_client, b"q6")
    head = queue.get(a)
    behind = queue.get(b)
    await wait_until(lambda: _count(pool_client, b"q6/waiters/", 2))
    behind.cancel()
    with pytest.raises(defer.CancelledError):
        await behind
    head.cancel()
    with pytest.raises(defer.CancelledError):
        await head
    await nothing_left(pool_client, b"q6")
    # The next gets work as before (the same sessions).
    await queue.put(b"x")
    item = await queue.get(b, timeout=5)
    await item.ack()
    await nothing_left(pool_client, b"q6")
    queue.close()


async def _count(client, prefix, n):
    return len(await keys_under(client, prefix)) == n


@pytest_twisted.ensureDeferred
async def test_close_fails_the_gets_under_way(pool_client, sessions):
    (s,) = await sessions()
    queue = Queue(pool_client, b"q7")
    d = queue.get(s)
    await wait_until(lambda: _count(pool_client, b"q7/waiters/", 1))
    queue.close()
    with pytest.raises(defer.CancelledError):
        await d
    await nothing_left(pool_client, b"q7")
    with pytest.raises(defer.CancelledError):
        await queue.get(s, timeout=1)
    with pytest.raises(defer.CancelledError):
        await queue.start()


@pytest_twisted.ensureDeferred
async def test_session_lost_while_waiting(pool_client, sessions):
    a, b = await sessions(2)
    queue = Queue(pool_client, b"q8")
    head, behind = queue.get(a), queue.get(b)
    await wait_until(lambda: _count(pool_client, b"q8/waiters/", 2))
    await a.close()
    with pytest.raises(SessionLost):
        await head  # at once: not when an item comes
    await b.close()
    with pytest.raises(SessionLost):
        await behind
    await nothing_left(pool_client, b"q8")
    queue.close()


@pytest_twisted.ensureDeferred
async def test_waiter_key_deleted_while_waiting_raises_claim_lost(pool_client, sessions):
    (s,) = await sessions()
    queue = Queue(pool_client, b"qw")
    d = queue.get(s, timeout=10)
    await wait_until(lambda: _count(pool_client, b"qw/waiters/", 1))
    (key,) = await keys_under(pool_client, b"qw/waiters/")
    await pool_client.delete(key)
    with pytest.raises(ClaimLost, match="waiter key was deleted"):
        await d
    await queue.put(b"x")  # not claimed by the failed get
    await nothing_left(pool_client, b"qw", items=1)
    item = await queue.get(s, timeout=5)  # the session goes on
    await item.ack()
    queue.close()


@pytest_twisted.ensureDeferred
async def test_an_item_claimed_by_someone_else_is_skipped(pool_client, sessions):
    """A claim written by another program (here by hand) keeps its item from us until
    it goes; the claim transaction's guards would refuse it anyway."""
    (s,) = await sessions()
    queue = Queue(pool_client, b"qo")
    first = await queue.put(b"first")
    await queue.put(b"second")
    other = b"qo/claims/" + first[len(b"qo/items/"):]
    await pool_client.set(other, b"someone")
    item = await queue.get(s, timeout=5)
    assert item.value == b"second"
    await item.ack()
    await pool_client.delete(other)
    item = await queue.get(s, timeout=5)
    assert item.value == b"first"
    await item.ack()
    assert queue.conflicts == 0
    await nothing_left(pool_client, b"qo")
    queue.close()


@pytest.fixture
def own_client(etcd):
    """A Client of the test's own (its ``submit`` gets wrapped), closed after it."""
    client = Client(reactor, etcd.url)
    yield client
    pytest_twisted.blockon(client.close())


def lose_claim_answers(client, name, lost=1, refused=0):
    """Make ``client``'s claim transactions under ``name`` go wrong: the first ``lost``
    are sent and applied, then raise OutcomeUnknown (the answer lost); the next
    ``refused`` raise Unavailable unsent; later ones go through.  (Looks inside: wraps
    the client's ``submit``, as no etcd can be made to drop one answer on demand.)
    Returns the list of claim transactions attempted."""
    submit = client.submit
    attempts = []

    async def lossy(txn, *args, **kwargs):
        await submit(txn, *args, **kwargs)  # applied (or Failed, raised as it is)
        raise OutcomeUnknown("the answer was lost (test)")

    def wrapped(txn, *args, **kwargs):
        if any(isinstance(op, OpSet) and op.key.startswith(name + b"/claims/")
               for op in txn.success):
            attempts.append(txn)
            if len(attempts) <= lost:
                return defer.ensureDeferred(lossy(txn, *args, **kwargs))
            if len(attempts) <= lost + refused:
                return defer.fail(Unavailable("cannot connect (test)"))
        return submit(txn, *args, **kwargs)

    client.submit = wrapped
    return attempts


@pytest_twisted.ensureDeferred
async def test_a_claim_whose_answer_was_lost_is_sent_again_and_found_ours(
        own_client, pool_client, sessions):
    client = own_client
    (s,) = await sessions()
    queue = Queue(client, b"ql")
    await queue.put(b"job")
    attempts = lose_claim_answers(client, b"ql", lost=1, refused=1)
    item = await queue.get(s, timeout=10)
    # Sent three times: applied (answer lost), refused unsent, then refused by etcd
    # because our claim is there -- which its value tells is ours.
    assert item.value == b"job" and len(attempts) == 3
    assert len({id(t) for t in attempts}) == 1  # the same transaction each time
    assert queue.claimed == 1 and queue.conflicts == 0
    assert await keys_under(pool_client, b"ql/waiters/") == []  # handed on
    await item.ack()
    await nothing_left(pool_client, b"ql")
    queue.close()


@pytest_twisted.ensureDeferred
async def test_a_get_timing_out_after_a_lost_claim_answer_deletes_the_claim(
        own_client, pool_client, sessions):
    client = own_client
    (s,) = await sessions()
    queue = Queue(client, b"qu")
    await queue.put(b"job")
    # Every claim refused unsent (Unavailable): the get retries until its timeout.
    attempts = lose_claim_answers(client, b"qu", lost=0, refused=10**6)
    with pytest.raises(Timeout):
        await queue.get(s, timeout=1)
    assert len(attempts) >= 2
    await nothing_left(pool_client, b"qu", items=1)
    # The first claim applied and its answer lost, the next sends refused: the get
    # times out, and its clean-up deletes the claim it wrote (and its waiter key).
    queue2 = Queue(client, b"qu")
    del client.submit  # (undo the first wrapper)
    attempts = lose_claim_answers(client, b"qu", lost=1, refused=10**6)
    with pytest.raises(Timeout):
        await queue2.get(s, timeout=1)
    assert len(attempts) >= 2
    await nothing_left(pool_client, b"qu", items=1)
    queue.close()
    queue2.close()


@pytest_twisted.ensureDeferred
async def test_a_claim_refused_because_someone_claimed_first_goes_on(
        own_client, pool_client, sessions):
    """Another program claims the item just before our claim transaction: ours is
    refused (a conflict, counted), and the get takes the next item once its view
    shows that claim.  (Looks inside: the other claim is written from a wrapper of
    ``submit``, so that it comes at that exact moment.)"""
    (s,) = await sessions()
    queue = Queue(own_client, b"qx")
    first = await queue.put(b"first")
    await queue.put(b"second")
    submit = own_client.submit
    other = b"qx/claims/" + first[len(b"qx/items/"):]

    async def racing(txn, *args, **kwargs):
        if any(isinstance(op, OpSet) and op.key.startswith(b"qx/claims/")
               for op in txn.success):  # our first claim transaction
            del own_client.submit
            await pool_client.set(other, b"someone")
        return await submit(txn, *args, **kwargs)

    own_client.submit = lambda *a, **k: defer.ensureDeferred(racing(*a, **k))
    item = await queue.get(s, timeout=5)
    assert item.value == b"second"
    assert queue.conflicts == 1 and queue.claimed == 1
    await item.ack()
    await pool_client.delete(other)
    await nothing_left(pool_client, b"qx", items=1)
    queue.close()


@pytest_twisted.ensureDeferred
async def test_bad_input_is_refused_before_anything_is_sent(pool_client, sessions):
    (s,) = await sessions()
    with pytest.raises(TypeError, match="name"):
        Queue(pool_client, 3)
    with pytest.raises(InvalidArgument):
        Queue(pool_client, b"")
    queue, prio = Queue(pool_client, b"q9"), PriorityQueue(pool_client, b"q9p")
    with pytest.raises(TypeError, match="value"):
        queue.put(3)
    with pytest.raises(TypeError, match="session"):
        queue.get(pool_client)
    with pytest.raises(TypeError, match="timeout"):
        queue.get(s, timeout="1")
    for bad in (0, -1, math.nan):
        with pytest.raises(InvalidArgument, match="timeout"):
            queue.get(s, timeout=bad)
    for bad in (1.5, True, "1"):
        with pytest.raises(TypeError, match="priority"):
            prio.put(b"x", priority=bad)
    for bad in (-1, MAX_PRIORITY + 1):
        with pytest.raises(InvalidArgument, match="priority"):
            prio.put(b"x", priority=bad)
    d = queue.get(s)
    with pytest.raises(InvalidArgument, match="one at a time"):
        queue.get(s, timeout=1)
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    assert await keys_under(pool_client, b"q9") == []
    queue.close()
    prio.close()


@pytest_twisted.ensureDeferred
async def test_priority_order(pool_client, sessions):
    (s,) = await sessions()
    queue = PriorityQueue(pool_client, b"pq")
    puts = [(b"low-1", 1), (b"high-1", 9), (b"mid-1", 5), (b"high-2", 9), (b"low-2", 1),
            (b"zero", 0), (b"top", MAX_PRIORITY)]
    for value, priority in puts:
        key = await queue.put(value, priority=priority)
        assert key.startswith(b"pq/items/%05d/" % priority)
    got = []
    for _ in puts:
        item = await queue.get(s, timeout=5)
        got.append((item.value, item.priority))
        await item.ack()
    assert [v for v, _ in got] == [b"top", b"high-1", b"high-2", b"mid-1", b"low-1",
                                    b"low-2", b"zero"]
    await nothing_left(pool_client, b"pq")
    # A waiting consumer takes the highest of what is there when its turn comes.
    await queue.put(b"a", priority=2)
    item = await queue.get(s, timeout=5)
    assert item.value == b"a"
    await queue.put(b"b", priority=1)
    await queue.put(b"c", priority=3)
    await item.release()  # "a" (2) is back: "c" (3) goes first, then "a", then "b"
    order = []
    for _ in range(3):
        item = await queue.get(s, timeout=5)
        order.append(item.value)
        await item.ack()
    assert order == [b"c", b"a", b"b"]
    queue.close()


@pytest_twisted.ensureDeferred
async def test_a_compaction_while_waiting_loses_no_item(pool_client, sessions):
    (s,) = await sessions()
    queue = Queue(pool_client, b"qc")
    await queue.put(b"warm")
    (await queue.get(s, timeout=5)).ack()  # the mirror runs
    d = queue.get(s, timeout=10)
    await wait_until(lambda: _count(pool_client, b"qc/waiters/", 1))
    for i in range(5):
        await pool_client.set(b"elsewhere", b"%d" % i)
    revision = (await pool_client.get(b"elsewhere")).header.revision
    await pool_client.compact(revision)
    await queue.put(b"after")
    item = await d
    assert item.value == b"after"
    await item.ack()
    await nothing_left(pool_client, b"qc")
    queue.close()


@pytest_twisted.ensureDeferred
async def test_no_herd_with_8_waiting_consumers(etcd, pool_client):
    """8 consumers (each its own client, session and Queue) wait; 24 items come one by
    one.  Each item is claimed by one transaction that succeeds: no claim fails."""
    clients = [Client(reactor, etcd.url) for _ in range(8)]
    from coord.session import Session

    sessions = [await Session.create(c, ttl=5) for c in clients]
    queues = [Queue(c, b"herd") for c in clients]
    got: list[bytes] = []
    count = 24

    async def consume(queue, session):
        while len(got) < count:
            try:
                item = await queue.get(session, timeout=1)
            except Timeout:
                continue
            got.append(item.value)
            await item.ack()

    try:
        workers = [defer.ensureDeferred(consume(q, s))
                   for q, s in zip(queues, sessions, strict=True)]
        await wait_until(lambda: _count(pool_client, b"herd/waiters/", 8))
        for i in range(count):
            await queues[0].put(b"%02d" % i)
            await sleep(0.02)  # one at a time: every consumer is waiting again
        await defer.gatherResults(workers)
        assert sorted(got) == [b"%02d" % i for i in range(count)]
        assert got == sorted(got)  # FIFO: one consumer claims at a time, oldest first
        assert sum(q.claimed for q in queues) == count
        assert sum(q.conflicts for q in queues) == 0  # no race for an item
        assert len([q for q in queues if q.claimed]) >= 4  # turns go round
        await nothing_left(pool_client, b"herd")
    finally:
        for q in queues:
            q.close()
        for s in sessions:
            await s.close()
        for c in clients:
            await c.close()


# -- separate processes ---------------------------------------------------------------------

PRODUCER = textwrap.dedent("""
    import sys
    from twisted.internet import defer, task
    from coord import Client
    from coord.recipes import Queue

    url, name, producer, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    async def main(reactor):
        client = Client(reactor, url, timeout=5)
        queue = Queue(client, name)
        for i in range(count):  # one after another: each put answered before the next
            await queue.put(f"{producer}:{i}")
        print("done", flush=True)
        await client.close()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
""")

CONSUMER = textwrap.dedent("""
    import sys
    from twisted.internet import defer, task
    from coord import Client, Timeout
    from coord.recipes import Queue, Session

    url, name, mode = sys.argv[1], sys.argv[2], sys.argv[3]

    async def main(reactor):
        client = Client(reactor, url, timeout=5)
        session = await Session.create(client, ttl=2 if mode == "hold" else 5)
        queue = Queue(client, name)
        print("ready", flush=True)
        while True:
            try:
                item = await queue.get(session, timeout=1)
            except Timeout:
                if (await client.get(name + "-stop")).kvs:
                    break
                continue
            print("got", item.value.decode(), item.claim_revision, flush=True)
            if mode == "hold":  # take one item and never ack it: killed here
                print("holding", flush=True)
                await defer.Deferred()
            await item.ack()
            print("acked", item.value.decode(), flush=True)
        print("conflicts", queue.conflicts, flush=True)
        queue.close()
        await session.close()
        await client.close()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
""")


@pytest_twisted.ensureDeferred
@pytest.mark.slow
async def test_4_producers_4_consumers_one_killed_holding_an_item(etcd, pool_client):
    """Every item put is acked exactly once, the one the killed consumer held too; the
    first deliveries of each producer's items come in its put order.

    The ordering check: a delivery is a ``got VALUE CLAIM_REVISION`` line of a consumer
    (the claim's create revision: one order for all consumers).  An item's first
    delivery is its delivery with the lowest claim revision.  For each producer, its
    items sorted by first delivery must be in the order it put them (its puts were
    sequential: each answered before the next was sent)."""
    name, producers, per_producer = "mp", 4, 20
    consumers = [spawn(CONSUMER, etcd.url, name, "hold")] + \
        [spawn(CONSUMER, etcd.url, name, "work") for _ in range(3)]
    makers: list = []
    try:
        for c in consumers:
            line = await deferred_readline(c)
            assert line == "ready\n", line + c.stderr.read()
        makers = [spawn(PRODUCER, etcd.url, name, p, per_producer) for p in range(producers)]
        holder = consumers[0]
        held = None
        while held is None:
            line = await deferred_readline(holder)
            assert line, holder.stderr.read()
            if line.startswith("got "):
                held = line.split()
        assert (await deferred_readline(holder)) == "holding\n"
        os.kill(holder.pid, signal.SIGKILL)
        await defer_to_exit(holder)
        for m in makers:
            out, err = await defer_to_exit(m)
            assert m.returncode == 0 and out == "done\n", err
        # Everything acked: the held item came back once the killed consumer's lease
        # (TTL 2 s) expired.
        await wait_until(lambda: _count(pool_client, name.encode() + b"/items/", 0),
                         timeout=20, interval=0.1)
        await pool_client.set(name + "-stop", b"1")
        outputs = []
        for c in consumers[1:]:
            out, err = await defer_to_exit(c)
            assert c.returncode == 0, err
            outputs.append(out)
    finally:
        for p in consumers + makers:
            finish(p)
    lines = [line.split() for out in [f"got {held[1]} {held[2]}\n", *outputs]
             for line in out.splitlines()]
    acks = collections.Counter(line[1] for line in lines if line[0] == "acked")
    everything = {f"{p}:{i}" for p in range(producers) for i in range(per_producer)}
    assert set(acks) == everything  # none missing
    assert max(acks.values()) == 1  # none acked twice
    first: dict[str, int] = {}
    deliveries = collections.Counter()
    for line in lines:
        if line[0] == "got":
            deliveries[line[1]] += 1
            first[line[1]] = min(first.get(line[1], math.inf), int(line[2]))
    assert deliveries[held[1]] == 2  # the held item was delivered again
    for p in range(producers):
        mine = [f"{p}:{i}" for i in range(per_producer)]
        assert sorted(mine, key=first.__getitem__) == mine, p
    assert all(line == ["conflicts", "0"] for line in lines if line[0] == "conflicts")
    assert len([line for line in lines if line[0] == "conflicts"]) == 3
    await nothing_left(pool_client, name.encode())


PAUSED = textwrap.dedent("""
    import sys
    from twisted.internet import defer, task
    from coord import Client, ClaimLost
    from coord.recipes import Queue, Session

    url = sys.argv[1]

    async def main(reactor):
        client = Client(reactor, url, timeout=5)
        session = await Session.create(client, ttl=2)
        queue = Queue(client, "paused")
        item = await queue.get(session, timeout=10)
        print("got", item.value.decode(), flush=True)
        await task.deferLater(reactor, 0.5, lambda: None)  # SIGSTOPped here
        print("held", item.held, flush=True)
        try:
            await item.ack()
            print("acked", flush=True)
        except ClaimLost:
            print("ClaimLost", flush=True)
        queue.close()
        await client.close()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
""")


@pytest_twisted.ensureDeferred
async def test_a_consumer_paused_past_its_ttl_cannot_ack(etcd, pool_client, sessions):
    """SIGSTOP a consumer holding an item past its TTL: the item goes to another
    consumer, who acks it; the paused one's ack then raises ClaimLost (acked once)."""
    (s,) = await sessions()
    queue = Queue(pool_client, b"paused")
    await queue.put(b"job")
    paused = spawn(PAUSED, etcd.url)
    try:
        line = await deferred_readline(paused)
        assert line == "got job\n", line + paused.stderr.read()
        os.kill(paused.pid, signal.SIGSTOP)
        try:
            item = await queue.get(s, timeout=10)  # once its lease expired
            assert item.value == b"job"
            await item.ack()
        finally:
            os.kill(paused.pid, signal.SIGCONT)
        out, err = await defer_to_exit(paused)
        # ("held" may still say True: the resumed process runs its overdue timers in
        # order, this one before the session's deadline.  Only the ack's guard tells.)
        assert out.splitlines()[-1] == "ClaimLost" and "acked" not in out, out + err
    finally:
        finish(paused)
    await nothing_left(pool_client, b"paused")
    queue.close()


# -- the example -------------------------------------------------------------------------------


def test_example(etcd):
    out = example("work_queue.py", etcd.url)
    assert "got 'resize a.png'; giving it back" in out
    got = [line.split("got ", 1)[1] for line in out.splitlines() if "(put at revision" in line]
    assert [g.split(" (")[0] for g in got] == ["'resize a.png'", "'resize b.png'",
                                               "'resize c.png'"]
    assert "the queue is empty" in out
    assert "priority queue first: 'high' (priority 9)" in out


def test_docs_example_is_examples_work_queue_py():
    """docs/queue.md shows examples/work_queue.py verbatim."""
    text = (ROOT / "docs" / "queue.md").read_text()
    block = text.split("<!-- example: work_queue.py -->\n```python\n", 1)[1].split(
        "\n```\n", 1)[0]
    assert block + "\n" == (ROOT / "examples" / "work_queue.py").read_text()


@pytest_twisted.ensureDeferred
async def test_an_item_as_a_context_manager_is_acked_or_given_back(pool_client, sessions):
    (s,) = await sessions()
    queue = Queue(pool_client, b"q-with")
    await queue.put(b"a")
    await queue.put(b"b")
    with pytest.raises(RuntimeError, match="work failed"):
        async with await queue.get(s, timeout=5) as item:
            assert item.value == b"a"
            raise RuntimeError("work failed")
    assert item.state is ItemState.RELEASED  # given back at once: the oldest again
    async with await queue.get(s, timeout=5) as again:
        assert (again.value, again.revision) == (b"a", item.revision)
    assert again.state is ItemState.ACKED
    async with await queue.get(s, timeout=5) as last:
        assert last.value == b"b"
    await nothing_left(pool_client, b"q-with")
    queue.close()
