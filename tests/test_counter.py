"""Counter: an int64 in one key, against real etcd; across processes and a member's death.

Run on both etcd versions:
``COORD_ETCD=/usr/bin/etcd COORD_ETCDCTL=/usr/bin/etcdctl pytest tests/test_counter.py``.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import pytest_twisted
from helpers import LossyProxy, example, finish, sleep, spawn
from twisted.internet import defer, reactor

from coord import (
    Client,
    Compacted,
    CounterOutcomeUnknown,
    Event,
    EventType,
    InvalidArgument,
    KeyValue,
    NotACounter,
    OutcomeUnknown,
    Timeout,
)
from coord.recipes import Counter
from coord.recipes import counter as counter_module
from coord.recipes.counter import INT64_MAX, INT64_MIN, Verdict, decode, first_after, judge
from coord.server import find_etcdctl
from coord.testing import PathGateway

ROOT = Path(__file__).resolve().parent.parent


async def mod_revision(client, key):
    found = await client.get(key)
    return found.kvs[0].mod_revision if found.kvs else 0


async def store_revision(client):
    return (await client.get(b"\0")).header.revision


# -- pure logic: tables ---------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "value"), [
    (b"0", 0), (b"42", 42), (b"-7", -7), (b"+5", 5), (b"007", 7), (b"12\n", 12),
    (b" 3 ", 3), (b"9223372036854775807", INT64_MAX), (b"-9223372036854775808", INT64_MIN),
])
def test_decode_accepts_decimal_int64(raw, value):
    assert decode(b"c", raw) == value


@pytest.mark.parametrize("raw", [
    b"", b" ", b"abc", b"1.5", b"1e3", b"0x10", b"1 2", b"--1", b"9223372036854775808",
    b"-9223372036854775809", b"99999999999999999999", "١٢".encode(), b"1_000", b"\x00",
])
def test_decode_refuses_anything_else(raw):
    with pytest.raises(NotACounter) as caught:
        decode(b"c", raw)
    assert caught.value.key == b"c" and caught.value.value == raw


def _put(value, mod=10, version=2, created=3):
    return Event(EventType.PUT, KeyValue(b"c", value, created, mod, version))


@pytest.mark.parametrize(("first", "verdict"), [
    (_put(b"15"), Verdict.OURS_OR_LOOKALIKE),
    (_put(b"16"), Verdict.NOT_OURS),
    (_put(b"+15"), Verdict.NOT_OURS),  # same number, other bytes: not our write
    (Event(EventType.DELETE, KeyValue(b"c", b"", 0, 10, 0)), Verdict.NOT_OURS),
])
def test_judge(first, verdict):
    assert judge(first, b"15") is verdict


_BASE = counter_module._Base(value=10, revision=7, after=7, version=2, created=3)
_ABSENT = counter_module._Base(value=0, revision=0, after=7)


@pytest.mark.parametrize(("base", "now", "shows"), [
    (_BASE, KeyValue(b"c", b"15", 3, 9, 3), True),  # one put since: it is the first
    (_BASE, KeyValue(b"c", b"15", 3, 9, 4), False),  # two puts since
    (_BASE, KeyValue(b"c", b"15", 8, 9, 3), False),  # deleted and created again
    (_BASE, None, False),  # deleted since
    (_ABSENT, KeyValue(b"c", b"15", 9, 9, 1), False),  # a create may follow a create+delete
])
def test_first_after_from_the_current_state(base, now, shows):
    first = first_after(base, now)
    assert (first is not None) is shows
    if shows:
        assert first.kv == now


# -- one process ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_get_add_set_and_the_layout(pool_client):
    counter = Counter(pool_client, b"hits")
    assert await counter.get() == 0
    assert (await pool_client.get(b"hits")).kvs == []  # get writes nothing
    assert await counter.add(5) == 5
    assert await counter.add(-8) == -3
    assert (await pool_client.get(b"hits")).kvs[0].value == b"-3"
    revision = await counter.set(100)
    assert await mod_revision(pool_client, b"hits") == revision
    assert await counter.get() == 100
    assert await Counter(pool_client, "hits").add(1) == 101  # str names too
    assert await Counter(pool_client, b"other", default=7).get() == 7
    assert await Counter(pool_client, b"other", default=7).add(1) == 8
    assert repr(counter).startswith("<Counter b'hits'")


@pytest_twisted.ensureDeferred
async def test_a_stale_hint_costs_a_retry_not_a_wrong_sum(pool_client):
    a, b = Counter(pool_client, b"c"), Counter(pool_client, b"c")
    assert await a.add(1) == 1
    assert await b.add(10) == 11  # a's hint (1 at its revision) is stale now
    assert await a.add(1) == 12
    assert await a.get() == 12


@pytest_twisted.ensureDeferred
async def test_values_set_by_hand_are_read(etcd, pool_client):
    etcdctl = find_etcdctl()
    subprocess.run([etcdctl, "--endpoints", etcd.url, "put", "shell", "41"], check=True,
                   capture_output=True, timeout=30)
    counter = Counter(pool_client, b"shell")
    assert await counter.add(1) == 42
    out = subprocess.run([etcdctl, "--endpoints", etcd.url, "get", "shell", "--print-value-only"],
                         check=True, capture_output=True, text=True, timeout=30).stdout
    assert out.strip() == "42"
    await pool_client.set(b"shell", b" 007\n")
    assert await counter.get() == 7
    assert await counter.compare_and_set(7, 8)
    assert (await pool_client.get(b"shell")).kvs[0].value == b"8"


@pytest_twisted.ensureDeferred
async def test_not_a_counter_writes_nothing(pool_client):
    await pool_client.set(b"junk", b"twelve")
    revision = await mod_revision(pool_client, b"junk")
    counter = Counter(pool_client, b"junk")
    for call in (counter.get, lambda: counter.add(1), lambda: counter.compare_and_set(0, 1)):
        with pytest.raises(NotACounter) as caught:
            await call()
        assert caught.value.value == b"twelve"
    # A counter whose hint was good, then spoiled by another writer:
    good = Counter(pool_client, b"spoiled")
    await good.add(1)
    await pool_client.set(b"spoiled", b"1.5")
    with pytest.raises(NotACounter):
        await good.add(1)
    assert await mod_revision(pool_client, b"junk") == revision
    assert (await pool_client.get(b"spoiled")).kvs[0].value == b"1.5"


@pytest_twisted.ensureDeferred
async def test_overflow_is_refused_and_writes_nothing(pool_client):
    counter = Counter(pool_client, b"big")
    await counter.set(INT64_MAX - 1)
    assert await counter.add(1) == INT64_MAX
    revision = await mod_revision(pool_client, b"big")
    with pytest.raises(InvalidArgument, match="int64"):
        await counter.add(1)
    await counter.set(INT64_MIN)
    revision = await mod_revision(pool_client, b"big")
    with pytest.raises(InvalidArgument):
        await counter.add(-1)
    assert await mod_revision(pool_client, b"big") == revision
    assert await counter.get() == INT64_MIN
    # A stale hint near the edge is not trusted to refuse: the fresh value is.
    other = Counter(pool_client, b"big")
    await other.set(INT64_MAX)
    await Counter(pool_client, b"big").set(0)
    assert await other.add(1) == 1


@pytest_twisted.ensureDeferred
async def test_bad_arguments_are_typed_and_send_nothing(pool_client):
    counter = Counter(pool_client, b"args")
    before = await store_revision(pool_client)
    for bad in (True, 1.0, "1", None, b"1"):
        with pytest.raises(TypeError, match="n must be an int"):
            counter.add(bad)
        with pytest.raises(TypeError, match="value must be an int"):
            counter.set(bad)
        with pytest.raises(TypeError, match="expected must be an int"):
            counter.compare_and_set(bad, 1)
        with pytest.raises(TypeError, match="new must be an int"):
            counter.compare_and_set(0, bad)
    for huge in (2**63, -(2**63) - 1):
        with pytest.raises(InvalidArgument, match="int64"):
            counter.add(huge)
        with pytest.raises(InvalidArgument, match="int64"):
            counter.set(huge)
    for timeout, exc in (("1", TypeError), (-1, InvalidArgument), (0, InvalidArgument),
                         (float("nan"), InvalidArgument)):
        with pytest.raises(exc, match="timeout"):
            counter.add(1, timeout=timeout)
        with pytest.raises(exc, match="timeout"):
            counter.get(timeout=timeout)
    with pytest.raises(InvalidArgument, match="name"):
        Counter(pool_client, b"")
    with pytest.raises(TypeError, match="name"):
        Counter(pool_client, 5)
    with pytest.raises(TypeError, match="default"):
        Counter(pool_client, b"x", default=0.5)
    with pytest.raises(TypeError, match="unique_writes"):
        Counter(pool_client, b"x", unique_writes=1)
    assert await store_revision(pool_client) == before


@pytest_twisted.ensureDeferred
async def test_compare_and_set(pool_client):
    counter = Counter(pool_client, b"cas")
    before = await store_revision(pool_client)
    assert not await counter.compare_and_set(5, 6)  # absent is 0, not 5
    assert await store_revision(pool_client) == before  # nothing written
    assert await counter.compare_and_set(0, 6)  # absent counts as the default
    revision = await mod_revision(pool_client, b"cas")
    assert not await counter.compare_and_set(0, 7)
    assert await mod_revision(pool_client, b"cas") == revision
    assert await counter.get() == 6
    # Another writer changed it: our hint (6) is stale; the fresh value decides.
    await Counter(pool_client, b"cas").set(9)
    assert not await counter.compare_and_set(6, 1)
    assert await counter.compare_and_set(9, 1)
    assert await counter.get() == 1
    # A hint that says "no" is not trusted: the counter was set to 50 behind our back.
    await pool_client.set(b"cas", b"50")
    assert await counter.compare_and_set(50, 51)


@pytest_twisted.ensureDeferred
async def test_a_counter_deleted_in_use_starts_again_from_its_default(pool_client):
    counter = Counter(pool_client, b"reset", default=100)
    assert await counter.add(1) == 101
    await pool_client.delete(b"reset")  # our hint (101 at its revision) is stale now
    assert await counter.add(1) == 101
    await pool_client.delete(b"reset")
    assert await counter.compare_and_set(101, 0) is False  # absent holds the default
    assert await counter.compare_and_set(100, 5)
    assert await counter.get() == 5


@pytest_twisted.ensureDeferred
async def test_through_treq(etcd):
    from helpers import make_client

    client = make_client(etcd.url, "treq")
    try:
        counter = Counter(client, b"treq")
        assert await counter.add(2) == 2
        assert await Counter(client, b"treq").add(3) == 5  # a stale hint for `counter`
        assert await counter.add(1) == 6
        assert await counter.compare_and_set(6, 0)
        assert await counter.get() == 0
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_concurrent_adds_from_two_clients(etcd):
    clients = [Client(reactor, etcd.url), Client(reactor, etcd.url)]
    try:
        counters = [Counter(c, b"shared") for c in clients for _ in range(2)]
        rounds = 25
        results = await defer.gatherResults([
            defer.ensureDeferred(_adds(counter, delta, rounds))
            for delta, counter in enumerate(counters, start=1)])
        final = await counters[0].get()
        assert final == sum(range(1, len(counters) + 1)) * rounds
        seen = sorted(v for values in results for v in values)
        assert len(set(seen)) == len(seen) == len(counters) * rounds  # every add saw its own
        assert seen[-1] == final
    finally:
        for c in clients:
            await c.close()


async def _adds(counter, delta, rounds):
    return [await counter.add(delta) for _ in range(rounds)]


# -- timeouts and cancels of contended adds ---------------------------------------------


def _always_conflicting(path):
    """A gateway where every transaction finds the counter changed (value 1 at a
    revision that never matches what was compared)."""
    from coord.testing import HEADER, STATUS, answer

    if path == "/v3/maintenance/status":
        return answer(body=STATUS)
    kv = {"key": "Yw==", "value": "MQ==", "create_revision": "2", "mod_revision": "3",
          "version": "1"}
    if path == "/v3/kv/range":
        return answer(body={"header": HEADER, "kvs": [kv], "count": "1"})
    _always_conflicting.round += 1
    kv = dict(kv, mod_revision=str(3 + _always_conflicting.round))
    return answer(body={"header": HEADER, "responses": [
        {"response_range": {"header": HEADER, "kvs": [kv], "count": "1"}}]})


@pytest_twisted.ensureDeferred
async def test_a_contended_add_times_out_with_nothing_in_flight(path_gateway):
    _always_conflicting.round = 0
    url, gateway = path_gateway(_always_conflicting)
    client = Client(reactor, url, timeout=5)
    try:
        counter = Counter(client, b"c")
        started = reactor.seconds()
        with pytest.raises(Timeout) as caught:
            await counter.add(1, timeout=0.3)
        assert not isinstance(caught.value, OutcomeUnknown)  # no write was owed then
        assert 0.3 <= reactor.seconds() - started < 1.0
        assert gateway.count("/v3/kv/txn") > 3  # it did retry, with pauses
        assert counter.unresolved == 0
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_cancel_a_contended_add_is_never_half_applied(etcd):
    """Adds are cancelled at many points while another client adds too: each cancelled
    add either reports its new value (its write was applied) or CancelledError (it was
    not), so the final value is exactly the sum of what was reported."""
    other_client, client = Client(reactor, etcd.url), Client(reactor, etcd.url)
    try:
        other, ours = Counter(other_client, b"cc"), Counter(client, b"cc")
        stop = []

        async def hammer():
            done = 0
            while not stop:
                await other.add(1000)
                done += 1
            return done

        hammering = defer.ensureDeferred(hammer())
        applied = cancelled = 0
        for i in range(40):
            d = ours.add(1)
            reactor.callLater(i * 0.0005, d.cancel)
            try:
                await d
                applied += 1
            except defer.CancelledError:
                cancelled += 1
        stop.append(True)
        hammered = await hammering
        assert await ours.get() == hammered * 1000 + applied
        assert cancelled > 0  # the test did cancel adds
    finally:
        await other_client.close()
        await client.close()


# -- lost answers: settled, never retried blindly ---------------------------------------------


async def _with_lossy(etcd, lose, before=None, unique_writes=False, start=10):
    proxy = LossyProxy(etcd.url, lose, before)
    client = Client(reactor, proxy.url, timeout=5)
    direct = Client(reactor, etcd.url)
    counter = Counter(client, b"lossy", unique_writes=unique_writes)
    await Counter(direct, b"lossy").set(start)
    return proxy, client, direct, counter


async def _close(*things):
    for thing in things:
        await thing.close()


@pytest_twisted.ensureDeferred
async def test_a_lost_request_is_resent_and_applied_once(etcd):
    proxy, client, direct, counter = await _with_lossy(etcd, "request")
    try:
        assert await counter.add(5) == 15
        assert proxy.lost
        assert await Counter(direct, b"lossy").get() == 15
        assert counter.resolved == 1 and counter.unresolved == 0
    finally:
        await _close(client, direct, proxy)


@pytest_twisted.ensureDeferred
async def test_a_lost_answer_of_an_applied_add_is_not_applied_twice(etcd):
    """Our add was applied, its answer lost: the re-sent copy fails, the first write after
    our base holds our value.  Without unique_writes that is not proof (another writer
    could have added 5 to 10 as well): CounterOutcomeUnknown, with what it needs to say."""
    proxy, client, direct, counter = await _with_lossy(etcd, "answer")
    try:
        base_revision = await mod_revision(direct, b"lossy")
        await counter.get()
        with pytest.raises(CounterOutcomeUnknown) as caught:
            await counter.add(5)
        assert proxy.lost
        error = caught.value
        assert (error.key, error.base, error.base_revision, error.value, error.delta) == \
            (b"lossy", 10, base_revision, 15, 5)
        assert "wrote that value" in error.reason
        assert await Counter(direct, b"lossy").get() == 15  # once, not twice
        assert counter.unresolved == 1
    finally:
        await _close(client, direct, proxy)


@pytest_twisted.ensureDeferred
async def test_a_lost_answer_with_unique_writes_is_settled_as_applied(etcd):
    proxy, client, direct, counter = await _with_lossy(etcd, "answer", unique_writes=True)
    try:
        assert await counter.add(5) == 15
        assert proxy.lost
        assert await Counter(direct, b"lossy").get() == 15
        assert counter.resolved == 1
        assert await counter.add(1) == 16  # and it goes on from there
    finally:
        await _close(client, direct, proxy)


@pytest_twisted.ensureDeferred
async def test_a_lost_add_that_another_write_beat_is_retried_from_the_fresh_value(etcd):
    """Our add's request is lost while another client adds twice: the re-sent copy fails,
    the key's version tells nothing (two puts since), so the watch from our base shows the
    first write after it: another value, so ours was not applied -- added once, now."""
    direct_holder = []

    async def others_write():
        other = Counter(direct_holder[0], b"lossy")
        await other.add(100)
        await other.add(1000)

    proxy = LossyProxy(etcd.url, "request", others_write)
    client, direct = Client(reactor, proxy.url, timeout=5), Client(reactor, etcd.url)
    direct_holder.append(direct)
    try:
        await Counter(direct, b"lossy").set(10)
        counter = Counter(client, b"lossy")
        assert await counter.add(5) == 1115
        assert proxy.lost and counter.resolved == 1
    finally:
        await _close(client, direct, proxy)


@pytest_twisted.ensureDeferred
async def test_a_lost_add_whose_history_was_compacted_is_unknown(etcd):
    direct_holder = []

    async def others_write_and_compact():
        other = Counter(direct_holder[0], b"lossy")
        await other.add(100)
        revision = await other.set(7)
        await direct_holder[0].compact(revision)

    proxy = LossyProxy(etcd.url, "request", others_write_and_compact)
    client, direct = Client(reactor, proxy.url, timeout=5), Client(reactor, etcd.url)
    direct_holder.append(direct)
    try:
        await Counter(direct, b"lossy").set(10)
        counter = Counter(client, b"lossy")
        with pytest.raises(CounterOutcomeUnknown, match="compacted") as caught:
            await counter.add(5)
        assert isinstance(caught.value.__cause__, Compacted)
        assert await Counter(direct, b"lossy").get() == 7
    finally:
        await _close(client, direct, proxy)


@pytest_twisted.ensureDeferred
async def test_a_lost_compare_and_set_is_settled_too(etcd):
    proxy, client, direct, counter = await _with_lossy(etcd, "answer", unique_writes=True)
    try:
        assert await counter.compare_and_set(10, 20)
        assert proxy.lost and counter.resolved == 1
        assert await Counter(direct, b"lossy").get() == 20
    finally:
        await _close(client, direct, proxy)


@pytest_twisted.ensureDeferred
async def test_an_add_whose_answer_never_comes_is_unknown_at_its_timeout(path_gateway):
    from coord.testing import HEADER, HOLD, answer

    def script(path):
        if path == "/v3/kv/range":
            return answer(body={"header": HEADER})
        return HOLD if path == "/v3/kv/txn" else answer(path=path)

    url, gateway = path_gateway(script)
    client = Client(reactor, url, timeout=5, attempt_timeout=None)
    try:
        with pytest.raises(CounterOutcomeUnknown, match="timeout") as caught:
            await Counter(client, b"c").add(3, timeout=0.3)
        assert (caught.value.base, caught.value.value) == (0, 3)
        assert gateway.count("/v3/kv/txn") == 1
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_set_whose_answer_never_comes_is_unknown_and_not_resent(path_gateway):
    from coord.testing import HOLD, answer

    url, gateway = path_gateway(lambda path: HOLD if path == "/v3/kv/put"
                                else answer(path=path))
    client = Client(reactor, url, timeout=5, attempt_timeout=None)
    try:
        with pytest.raises(OutcomeUnknown):
            await Counter(client, b"c").set(5, timeout=0.3)
        await sleep(0.2)
        assert gateway.count("/v3/kv/put") == 1
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_cancel_while_an_answer_that_never_comes_is_owed_is_unknown(path_gateway):
    """Cancelled while its write is in flight and no answer ever comes: the add says its
    outcome is unknown (not CancelledError, which would claim nothing was applied), and
    does not re-send."""
    from coord.testing import HEADER, HOLD, answer

    def script(path):
        if path == "/v3/kv/range":
            return answer(body={"header": HEADER})
        return HOLD if path == "/v3/kv/txn" else answer(path=path)

    url, gateway = path_gateway(script)
    client = Client(reactor, url, timeout=5, attempt_timeout=None)
    try:
        d = Counter(client, b"c").add(3, timeout=0.3)
        await sleep(0.1)
        d.cancel()
        with pytest.raises(CounterOutcomeUnknown, match="cancelled"):
            await d
        assert gateway.count("/v3/kv/txn") == 1
    finally:
        await client.close()


@pytest.mark.parametrize("twice", [False, True])
@pytest_twisted.ensureDeferred
async def test_cancel_while_the_answer_is_owed_waits_for_it(path_gateway, twice):
    """Cancelled while its write is in flight, an add waits for the answer: applied, it
    fires with the value after all."""
    from coord.testing import HEADER, answer

    def script(path):
        if path == "/v3/kv/range":
            return answer(body={"header": HEADER})
        if path == "/v3/kv/txn":
            return answer(0.2, body={"header": dict(HEADER, revision="6"), "succeeded": True,
                                     "responses": [{"response_put": {"header": HEADER}}]})
        return answer(path=path)

    url, gateway = path_gateway(script)
    assert isinstance(gateway, PathGateway)
    client = Client(reactor, url, timeout=5)
    try:
        d = Counter(client, b"c").add(3)
        await sleep(0.1)
        assert gateway.count("/v3/kv/txn") == 1
        d.cancel()
        if twice:
            await sleep(0.05)
            d.cancel()  # a second cancel does not hide the outcome either
        assert await d == 3
    finally:
        await client.close()


# -- several processes, a member killed ---------------------------------------------------------


WRITER = textwrap.dedent("""
    import json, sys
    from twisted.internet import defer, task
    from coord import Client, CounterOutcomeUnknown, Timeout, Unavailable
    from coord.recipes import Counter

    urls, delta, seconds = sys.argv[1].split(","), int(sys.argv[2]), float(sys.argv[3])

    # Looks inside (for the report only): how each lost answer was settled.
    from coord.recipes import counter as module
    verdicts, judge, first_change = {}, module.judge, Counter._first_change

    def counting_judge(first, value):
        verdict = judge(first, value)
        verdicts[verdict.name] = verdicts.get(verdict.name, 0) + 1
        return verdict

    async def counting_first_change(self, *args):
        verdicts["from history"] = verdicts.get("from history", 0) + 1
        return await first_change(self, *args)

    module.judge, Counter._first_change = counting_judge, counting_first_change

    async def main(reactor):
        client = Client(reactor, urls, timeout=10, attempt_timeout=1.0)
        counter = Counter(client, b"total", unique_writes=True)  # deltas are distinct
        ok = unknown = failed = 0
        print("ready", flush=True)
        end = reactor.seconds() + seconds
        while reactor.seconds() < end:
            try:
                await counter.add(delta, timeout=10)
                ok += 1
            except CounterOutcomeUnknown:
                unknown += 1
            except (Timeout, Unavailable):
                failed += 1  # nothing applied (an unknown outcome is the class above)
        print(json.dumps({"delta": delta, "ok": ok, "unknown": unknown, "failed": failed,
                          "resolved": counter.resolved, "verdicts": verdicts}), flush=True)
        await client.close()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
""")


@pytest.mark.slow
def test_8_writers_while_the_leader_is_killed_and_restarted(etcd_cluster):
    """The member all 8 writers talk to is killed twice: as the leader, then (restarted)
    as a follower.  Each writer adds its own delta, so a lost answer is settled exactly."""
    leader = etcd_cluster.wait_for_leader()
    # Every writer talks to the leader first (its URL first): it is the member killed.
    urls = [leader.url] + [m.url for m in etcd_cluster.members if m is not leader]
    writers = [spawn(WRITER, ",".join(urls), delta, 9.0) for delta in range(1, 9)]
    try:
        for w in writers:
            assert w.stdout.readline().strip() == "ready", w.stderr.read()
        time.sleep(2.0)
        leader.kill()  # writes in flight there are lost, mostly before being committed
        etcd_cluster.wait_for_leader(timeout=20, exclude=leader)
        time.sleep(1.0)
        leader.restart()
        etcd_cluster.wait_for_leader(timeout=20)
        time.sleep(1.5)
        # The writers are back on it (their first URL), a follower now: it forwards their
        # writes to the leader, which commits them; killed, it never answers -- applied
        # writes whose answer is lost.
        leader.kill()
        time.sleep(1.0)
        leader.restart()
        reports = []
        for w in writers:
            out, err = w.communicate(timeout=60)
            assert w.returncode == 0, err
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for w in writers:
            finish(w)
    etcd_cluster.wait_for_leader(timeout=20)
    found = etcd_cluster.members[0].post("/v3/kv/range", {"key": "dG90YWw="})
    import base64

    final = int(base64.b64decode(found["kvs"][0]["value"]))
    ok = sum(r["ok"] * r["delta"] for r in reports)
    unknown = sum(r["unknown"] * r["delta"] for r in reports)
    resolved = sum(r["resolved"] for r in reports)
    verdicts = {}
    for r in reports:
        for name, count in r["verdicts"].items():
            verdicts[name] = verdicts.get(name, 0) + count
    print(f"adds ok: {sum(r['ok'] for r in reports)}, settled after a lost answer: "
          f"{resolved} (by the first write after the base: {verdicts}; the rest by the "
          f"re-sent copy), unknown: {sum(r['unknown'] for r in reports)}, "
          f"failed (not applied): {sum(r['failed'] for r in reports)}")
    assert all(r["ok"] > 0 for r in reports), reports
    if unknown == 0:
        assert final == ok, reports
    else:  # some outcomes stayed unknown: each was applied at most once
        assert ok <= final <= ok + unknown, (final, reports)


# -- the example ------------------------------------------------------------------------------


def test_example_counter_py(etcd):
    out = example("counter.py", etcd.url)
    assert "4 workers added 1 each 25 times: 100" in out
    assert "compare_and_set(100, 0): True" in out
    assert "compare_and_set(100, 0): False" in out


def test_docs_example_is_examples_counter_py():
    """docs/counter.md shows examples/counter.py verbatim, and its measured figures."""
    text = (ROOT / "docs" / "counter.md").read_text()
    block = text.split("<!-- example: counter.py -->\n```python\n", 1)[1].split("```\n", 1)[0]
    assert block == (ROOT / "examples" / "counter.py").read_text()
    assert "adds/s" in text and "FIGURES" not in text
