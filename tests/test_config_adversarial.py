"""Adversarial tests for ConfigWatcher (issue 7), against real etcd.

Re-entrant callbacks and waiters, stop() from inside callbacks, revisions outside the
prefix, prefix edge cases, big values, paused etcd, a closed client mid-resync, two
watchers agreeing, and update() corner cases.  Each bug found here (once a strict xfail)
has its test.

Run on both etcd versions:
``COORD_ETCD=/usr/bin/etcd COORD_ETCDCTL=/usr/bin/etcdctl pytest tests/test_config_adversarial.py``.
"""

from __future__ import annotations

import json
import random
from base64 import b64encode

import pytest
import pytest_twisted
from helpers import sleep, wait_until
from twisted.internet import defer, reactor

from coord import (
    Client,
    Failed,
    InvalidArgument,
    KeySet,
    OpDel,
    OpSet,
    Timeout,
    TooManyOperations,
    Transaction,
    Unavailable,
)
from coord.recipes import ConfigState, ConfigStopped, ConfigWatcher

P = b"cfg/"


def _b64(data: bytes) -> str:
    return b64encode(data).decode()


async def etcd_view(client, prefix=P, revision=None, decode=lambda v: v):
    result = await client.get(KeySet(prefix, prefix=True), revision=revision)
    return {kv.key: decode(kv.value) for kv in result.kvs}


def _gateway_put(server, key, value):
    return int(server.post("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})
               ["header"]["revision"])


def _compact_behind_the_watchers_back(server, puts):
    """Restart etcd, write and compact before the reactor runs again: the resumed watch
    meets a compacted revision (Compacted), and the watcher must read afresh."""
    server.restart()
    for key, value in puts.items():
        _gateway_put(server, key, value)
    revision = int(server.post("/v3/kv/range", {"key": _b64(b"x")})["header"]["revision"])
    server.post("/v3/kv/compaction", {"revision": revision, "physical": True})
    return revision


# -- callbacks that stop the watcher --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stop_in_on_change_callback_stops_the_next_callbacks(pool_client):
    config = ConfigWatcher(pool_client, P)
    calls = []

    def stopper(change):
        calls.append("stopper")
        config.stop()

    config.on_change(stopper)
    config.on_change(lambda change: calls.append(("after stop", config.state)))
    await config.start(timeout=10)
    try:
        await pool_client.set(b"cfg/a", b"1")
        await wait_until(lambda: calls)
        await sleep(0.2)
        assert config.state is ConfigState.STOPPED
        assert calls == ["stopper"]
    finally:
        config.stop()


@pytest_twisted.ensureDeferred
async def test_stop_in_on_error_callback_during_the_watch(pool_client):
    config = ConfigWatcher(pool_client, P, decode=json.loads)
    changes = []
    errors_seen = []

    def on_error(error):
        errors_seen.append(error.key)
        config.stop()

    config.on_error(on_error)
    config.on_change(changes.append)
    await config.start(timeout=10)
    try:
        await pool_client.submit(Transaction(success=[OpSet(b"cfg/bad", b"{"),
                                                      OpSet(b"cfg/good", b"1")]))
        await wait_until(lambda: errors_seen)
        await sleep(0.2)
        assert config.state is ConfigState.STOPPED
        assert changes == []  # no callback after stop() returned
    finally:
        config.stop()


@pytest_twisted.ensureDeferred
async def test_stop_in_on_error_callback_during_start_is_final(pool_client):
    await pool_client.set(b"cfg/bad", b"{not json")
    config = ConfigWatcher(pool_client, P, decode=json.loads)
    changes = []
    config.on_error(lambda error: config.stop())  # "refuse to run with a bad config"
    config.on_change(changes.append)
    d = config.start(timeout=10)
    try:
        try:
            await d
        except defer.CancelledError:
            pass  # either outcome of start() is acceptable; coming back to life is not
        assert config.state is ConfigState.STOPPED
        await pool_client.set(b"cfg/other", b"1")
        await sleep(0.3)
        assert changes == []
        assert config.state is ConfigState.STOPPED
    finally:
        config.stop()


@pytest_twisted.ensureDeferred
async def test_stop_in_a_waiter_continuation_during_a_resync(etcd_factory):
    """A wait_for satisfied by a resync, whose continuation stops the watcher: the
    resync must not start a new watch afterwards."""
    server = etcd_factory()
    client = Client(reactor, server.url, timeout=5)
    config = ConfigWatcher(client, P)
    changes = []
    config.on_change(changes.append)
    try:
        await client.set(b"cfg/a", b"1")
        await config.start(timeout=10)
        await config._watch.watcher.ready
        waiting = config.wait_for(b"cfg/new", timeout=20)
        waiting.addCallback(lambda value: config.stop())
        _compact_behind_the_watchers_back(server, {b"cfg/zz": b"y", b"cfg/new": b"x"})
        await waiting
        assert config.state is ConfigState.STOPPED
        await client.set(b"cfg/b", b"2")
        await sleep(0.3)
        assert config.state is ConfigState.STOPPED and config._watch is None
        assert len(changes) == 1 and changes[0].resync
    finally:
        config.stop()
        await client.close()


# -- re-entrant waiters -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_waiter_continuation_that_waits_again_loses_nothing(etcd_factory):
    server = etcd_factory()
    client = Client(reactor, server.url, timeout=5)
    config = ConfigWatcher(client, P)
    try:
        await client.set(b"cfg/seed", b"0")
        await config.start(timeout=10)
        await config._watch.watcher.ready
        later = []

        def then_wait_again(value):  # e.g. `await wait_for(a); await wait_for(b)`
            d = config.wait_for(b"cfg/never")
            d.addErrback(lambda f: f.trap(ConfigStopped))
            later.append(d)
            return value

        first = config.wait_for(b"cfg/a", timeout=20).addCallback(then_wait_again)
        second = config.wait_for(b"cfg/b", timeout=20)
        # Catch-up after a restart: three revisions arrive in one watch response.
        server.restart()
        server.post("/v3/kv/txn", {"success": [
            {"request_put": {"key": _b64(b"cfg/a"), "value": _b64(b"1")}},
            {"request_put": {"key": _b64(b"cfg/b"), "value": _b64(b"2")}}]})
        _gateway_put(server, b"cfg/c", b"3")
        last = _gateway_put(server, b"cfg/d", b"4")
        assert await first == b"1" and await second == b"2"
        await config.wait_revision(last, timeout=5)
        assert config.snapshot() == await etcd_view(client)
    finally:
        config.stop()
        await client.close()


@pytest_twisted.ensureDeferred
async def test_waiter_cancelled_by_another_waiters_continuation(pool_client):
    """wait_for(a) and wait_for(b) satisfied by one change; a's continuation cancels b
    (a race: first of two keys).  b must end cancelled, and the watcher go on."""
    config = ConfigWatcher(pool_client, P)
    await config.start(timeout=10)
    try:
        b = config.wait_for(b"cfg/b", timeout=10)
        a = config.wait_for(b"cfg/a", timeout=10)
        a.addCallback(lambda v: (b.cancel(), v)[1])
        b.addErrback(lambda f: f.trap(defer.CancelledError) and "cancelled")
        # b was registered first: a's continuation runs after b fired -- cancel is a no-op.
        await pool_client.submit(Transaction(success=[OpSet(b"cfg/a", b"1"),
                                                      OpSet(b"cfg/b", b"2")]))
        assert await a == b"1"
        assert await b in (b"2", "cancelled")
        rev = (await pool_client.set(b"cfg/c", b"3")).revision
        await config.wait_revision(rev, timeout=10)
        assert not config._waiters
    finally:
        config.stop()


@pytest_twisted.ensureDeferred
async def test_waiter_cancelled_by_an_earlier_waiters_continuation(etcd_factory):
    server = etcd_factory()
    client = Client(reactor, server.url, timeout=5)
    config = ConfigWatcher(client, P)
    try:
        await client.set(b"cfg/seed", b"0")
        await config.start(timeout=10)
        await config._watch.watcher.ready
        a = config.wait_for(b"cfg/a", timeout=20)
        b = config.wait_for(b"cfg/b", timeout=20)
        a.addCallback(lambda v: (b.cancel(), v)[1])  # first of two: cancel the other
        b.addErrback(lambda f: f.trap(defer.CancelledError) and "cancelled")
        server.restart()
        server.post("/v3/kv/txn", {"success": [
            {"request_put": {"key": _b64(b"cfg/a"), "value": _b64(b"1")}},
            {"request_put": {"key": _b64(b"cfg/b"), "value": _b64(b"2")}}]})
        last = _gateway_put(server, b"cfg/c", b"3")
        assert await a == b"1"
        assert await b == "cancelled"
        await config.wait_revision(last, timeout=5)
        assert config.snapshot() == await etcd_view(client)
    finally:
        config.stop()
        await client.close()


@pytest_twisted.ensureDeferred
async def test_waiter_continuation_that_stops_the_watcher(etcd_factory):
    """wait_for(a) and wait_for(b) satisfied by one revision of a catch-up response; a's
    continuation stops the watcher: b fails with ConfigStopped (nothing fires after
    stop() returned), nothing escapes into the reactor, the later revisions are not
    applied, and the view is whole."""
    server = etcd_factory()
    client = Client(reactor, server.url, timeout=5)
    config = ConfigWatcher(client, P)
    changes = []
    config.on_change(changes.append)
    try:
        await client.set(b"cfg/seed", b"0")
        await config.start(timeout=10)
        await config._watch.watcher.ready
        a = config.wait_for(b"cfg/a", timeout=20)
        b = config.wait_for(b"cfg/b", timeout=20)
        a.addCallback(lambda v: (config.stop(), v)[1])
        server.restart()
        txn = server.post("/v3/kv/txn", {"success": [
            {"request_put": {"key": _b64(b"cfg/a"), "value": _b64(b"1")}},
            {"request_put": {"key": _b64(b"cfg/b"), "value": _b64(b"2")}}]})
        _gateway_put(server, b"cfg/c", b"3")
        assert await a == b"1"
        with pytest.raises(ConfigStopped):
            await b
        await sleep(0.3)
        assert config.state is ConfigState.STOPPED and config._watch is None
        assert config.revision == int(txn["header"]["revision"])
        assert config.snapshot() == await etcd_view(client, revision=config.revision)
        assert [c.revision for c in changes] == [config.revision]
    finally:
        config.stop()
        await client.close()


@pytest_twisted.ensureDeferred
async def test_callback_removed_by_an_earlier_callback_of_the_same_change(pool_client):
    config = ConfigWatcher(pool_client, P)
    calls = []
    removers = {}

    def first(change):
        calls.append("first")
        removers["second"]()

    config.on_change(first)
    removers["second"] = config.on_change(lambda change: calls.append("second"))
    config.on_change(lambda change: calls.append("third"))
    await config.start(timeout=10)
    try:
        rev = (await pool_client.set(b"cfg/a", b"1")).revision
        await config.wait_revision(rev, timeout=10)
        assert calls == ["first", "third"]
    finally:
        config.stop()


# -- revisions outside the prefix ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_revisions_outside_the_prefix(pool_client):
    """Only keys under the prefix count: a transaction touching both is one change with
    the inside keys only; a revision with outside keys only calls nothing and does not
    move the view's revision by itself; wait_revision() of such a revision returns (the
    view reflects it) without a change.  Keys equal to the prefix, and of a longer
    prefix, count."""
    await pool_client.set(b"cfg", b"outside")  # shorter than the prefix: outside
    config = ConfigWatcher(pool_client, P)
    changes = []
    config.on_change(changes.append)
    first = await config.start(timeout=10)
    try:
        assert first == {}
        txn = await pool_client.submit(Transaction(success=[
            OpSet(b"cfg/", b"prefix itself"), OpSet(b"cfg0", b"outside"),
            OpSet(b"cfg/sub/x", b"nested"), OpDel(b"cfg")]))
        rev = txn.header.revision
        await config.wait_revision(rev, timeout=10)
        (change,) = changes
        assert dict(change.added) == {b"cfg/": b"prefix itself", b"cfg/sub/x": b"nested"}
        assert not change.changed and not change.removed
        outside = (await pool_client.set(b"cfh/x", b"1")).revision
        await pool_client.delete(b"cfg0")
        await pool_client.delete(b"cfg/missing")  # deletes nothing: no event at all
        await sleep(0.3)
        assert len(changes) == 1
        assert config.revision == rev < outside  # no change under the prefix: no move
        # wait_revision(revision of a change elsewhere): once the watcher has confirmed
        # that nothing under the prefix changed, the view (unchanged) reflects it.
        before = config.snapshot()
        snap = await config.wait_revision(outside, timeout=10)
        assert snap.revision >= outside and config.revision == snap.revision
        assert snap == before and len(changes) == 1
        assert snap == await etcd_view(pool_client, revision=snap.revision)
        rev2 = (await pool_client.set(b"cfg/", b"again")).revision
        assert (await config.wait_revision(rev2, timeout=10)).revision == rev2
        assert len(changes) == 2 and changes[1].previous.revision == snap.revision
        assert config.snapshot() == await etcd_view(pool_client)
        # A raw transaction that writes and deletes the same key: etcd refuses it whole.
        with pytest.raises(InvalidArgument):
            await pool_client.submit(Transaction(success=[OpSet(b"cfg/k", b"1"),
                                                          OpDel(b"cfg/k")]))
        await sleep(0.2)
        assert len(changes) == 2 and b"cfg/k" not in config.snapshot()
    finally:
        config.stop()


@pytest_twisted.ensureDeferred
async def test_wait_revision_of_an_update_that_deleted_nothing(pool_client):
    await pool_client.set(b"cfg/a", b"1")
    config = ConfigWatcher(pool_client, P)
    await config.start(timeout=10)
    try:
        await pool_client.set(b"elsewhere", b"x")  # the store's revision moves on
        rev = await config.update(delete=[b"cfg/already-gone"])
        # The documented pattern: wait until the view shows the update.
        snap = await config.wait_revision(rev, timeout=3)
        assert b"cfg/already-gone" not in snap and snap.revision >= rev
        assert snap == await etcd_view(pool_client, revision=snap.revision)
        # A key deleted by someone else, then "deleted" again by us: the view shows it
        # gone once wait_revision(our revision) returns.
        await pool_client.delete(b"cfg/a")
        rev = await config.update(delete=[b"cfg/a"])
        snap = await config.wait_revision(rev, timeout=3)
        assert b"cfg/a" not in snap and snap == {}
        # A revision in the future is waited for (checks back off), then reached.
        future = config.wait_revision(rev + 3, timeout=10)
        await sleep(0.3)
        assert not future.called
        for key in (b"x1", b"x2", b"x3"):
            await pool_client.set(key, b"1")  # outside the prefix
        assert (await future).revision >= rev + 3 and not config.snapshot()
    finally:
        config.stop()


@pytest_twisted.ensureDeferred
async def test_progress_beyond_events_still_in_flight(pool_client):
    """The view is confirmed at a revision H while the watch still holds a key created
    and deleted before H (the state at H is the view's): those events are skipped, the
    view stays etcd's state, and no change goes backwards."""
    await pool_client.set(b"cfg/a", b"1")
    config = ConfigWatcher(pool_client, P)
    changes = []
    config.on_change(changes.append)
    await config.start(timeout=10)
    try:
        await config._watch.watcher.ready
        config._watch.watcher.pause_reading(True)
        await pool_client.set(b"cfg/tmp", b"x")
        await pool_client.delete(b"cfg/tmp")
        here = (await pool_client.set(b"elsewhere", b"1")).revision
        snap = await config.wait_revision(here, timeout=10)
        assert snap.revision >= here and snap == {b"cfg/a": b"1"}
        config._watch.watcher.pause_reading(False)
        last = (await pool_client.set(b"cfg/b", b"2")).revision
        await config.wait_revision(last, timeout=10)
        assert config.revision == last
        assert config.snapshot() == await etcd_view(pool_client)
        # The paused stream held the put and delete of cfg/tmp (at or before `here`):
        # skipped, so the one change is cfg/b's, and it is etcd's state at its revision.
        assert [c.revision for c in changes] == [last]
        assert changes[0].previous.revision == snap.revision
        assert changes[0].snapshot == await etcd_view(pool_client, revision=last)
    finally:
        config.stop()


@pytest_twisted.ensureDeferred
async def test_two_watchers_see_the_same_sequence(pool_client, etcd):
    """Two watchers (two clients, one with page_size=1) on one prefix, under random
    transactions of puts and deletes inside and outside it: the same (revision, view)
    sequence, each view being etcd's state at that revision."""
    other = Client(reactor, etcd.url)
    configs = [ConfigWatcher(pool_client, P), ConfigWatcher(other, P, page_size=1)]
    seen = [[], []]
    for config, log in zip(configs, seen, strict=True):
        config.on_change(lambda ch, log=log: log.append((ch.revision, dict(ch.snapshot))))
    rng = random.Random(77)
    try:
        await pool_client.submit(Transaction(success=[OpSet(b"cfg/%02d" % i, b"0")
                                                      for i in range(20)]))
        firsts = [await c.start(timeout=10) for c in configs]
        assert firsts[0] == firsts[1]
        last_inside = 0
        for i in range(60):
            ops = []
            for k in rng.sample(range(30), rng.randint(1, 5)):
                key = (b"cfg/%02d" if k < 20 else b"cfh/%02d") % k
                ops.append(OpDel(key) if rng.random() < 0.3 else OpSet(key, b"%d" % i))
            rev = (await pool_client.submit(Transaction(success=ops))).header.revision
            if any(isinstance(op, OpSet) and op.key.startswith(P) for op in ops):
                last_inside = rev
        for c in configs:
            await c.wait_revision(last_inside, timeout=10)
        assert configs[0].revision == configs[1].revision == last_inside
        start_rev = max(f.revision for f in firsts)
        seq = [s for s in seen[0] if s[0] > start_rev]
        assert seq == [s for s in seen[1] if s[0] > start_rev]
        for revision, view in seq:
            assert view == await etcd_view(pool_client, revision=revision)
        assert configs[0].snapshot() == configs[1].snapshot() == await etcd_view(pool_client)
    finally:
        for c in configs:
            c.stop()
        await other.close()


# -- resyncs ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_resyncs_are_counted_without_on_change_callbacks(etcd_factory):
    server = etcd_factory()
    client = Client(reactor, server.url, timeout=5)
    config = ConfigWatcher(client, P)
    try:
        await client.set(b"cfg/a", b"1")
        await config.start(timeout=10)
        await config._watch.watcher.ready
        _compact_behind_the_watchers_back(server, {b"cfg/b": b"2", b"cfg/c": b"3"})
        await wait_until(lambda: config.get(b"cfg/c") == b"3"
                         and config.state is ConfigState.WATCHING, timeout=20)
        assert config.snapshot() == await etcd_view(client)
        assert config.resyncs == 1
    finally:
        config.stop()
        await client.close()


class FlakyClient(Client):
    """A Client whose range reads fail with Unavailable while ``down`` is set."""

    down = False
    failed_reads = 0

    def get(self, key, **kwargs):
        if self.down:
            self.failed_reads += 1
            return defer.fail(Unavailable("simulated: reads fail"))
        return super().get(key, **kwargs)


@pytest_twisted.ensureDeferred
async def test_closing_the_client_during_a_resync_stops_the_watcher(etcd_factory):
    server = etcd_factory()
    client = FlakyClient(reactor, server.url, timeout=5)
    config = ConfigWatcher(client, P)
    try:
        await client.set(b"cfg/a", b"1")
        await config.start(timeout=10)
        await config._watch.watcher.ready
        waiting = config.wait_for(b"cfg/never")
        client.down = True
        _compact_behind_the_watchers_back(server, {b"cfg/b": b"2", b"cfg/c": b"3"})
        await wait_until(lambda: client.failed_reads >= 1, timeout=20)
        assert config.state is ConfigState.RESYNCING
        await client.close()
        client.down = False  # the reads now fail because the client is closed
        await wait_until(lambda: config.state is ConfigState.STOPPED, timeout=4)
        with pytest.raises(ConfigStopped):
            await waiting
    finally:
        config.stop()
        waiting.addErrback(lambda f: None)
        if not client.closed:
            await client.close()


@pytest_twisted.ensureDeferred
async def test_resync_with_a_bad_value_and_a_deleted_then_recreated_key(etcd_factory):
    """A resync keeps the last good value of a key now bad (and reports the error), and a
    key deleted and created again while the watch was away counts as changed."""
    server = etcd_factory()
    client = Client(reactor, server.url, timeout=5)
    config = ConfigWatcher(client, P, decode=json.loads)
    changes, errs = [], []
    config.on_change(changes.append)
    config.on_error(errs.append)
    try:
        await client.submit(Transaction(success=[OpSet(b"cfg/keep", b"1"),
                                                  OpSet(b"cfg/gets-bad", b"2"),
                                                  OpSet(b"cfg/reborn", b"3")]))
        first = await config.start(timeout=10)
        errors_view = config.decode_errors  # a live view: it follows the resync
        assert not errors_view
        await config._watch.watcher.ready
        server.restart()
        server.post("/v3/kv/deleterange", {"key": _b64(b"cfg/reborn")})
        _gateway_put(server, b"cfg/reborn", b"3")
        _gateway_put(server, b"cfg/gets-bad", b"{")
        revision = int(server.post("/v3/kv/range", {"key": _b64(b"x")})["header"]["revision"])
        server.post("/v3/kv/compaction", {"revision": revision, "physical": True})
        await wait_until(lambda: changes, timeout=20)
        (change,) = changes
        assert change.resync and change.previous == first
        assert dict(change.changed) == {b"cfg/reborn": 3}
        assert not change.added and not change.removed
        assert config.snapshot() == {b"cfg/keep": 1, b"cfg/gets-bad": 2, b"cfg/reborn": 3}
        assert [e.key for e in errs] == [b"cfg/gets-bad"]
        assert set(config.decode_errors) == set(errors_view) == {b"cfg/gets-bad"}
        assert config.resyncs == 1
    finally:
        config.stop()
        await client.close()


@pytest_twisted.ensureDeferred
async def test_an_error_applying_a_revision_reads_afresh(pool_client):
    """An Exception escaping the application of a revision (a bug) loses nothing: it is
    logged, the rest of the response is dropped and the prefix read afresh."""

    class Broken(ConfigWatcher):
        broken = 1

        def _apply(self, events):
            if self.broken:
                self.broken -= 1
                raise RuntimeError("simulated bug")
            super()._apply(events)

    config = Broken(pool_client, P)
    await config.start(timeout=10)
    try:
        await pool_client.submit(Transaction(success=[OpSet(b"cfg/a", b"1")]))
        rev = (await pool_client.set(b"cfg/b", b"2")).revision
        snap = await config.wait_revision(rev, timeout=10)
        await wait_until(lambda: config.state is ConfigState.WATCHING)
        assert config.resyncs == 1 and not config.broken
        assert snap == await etcd_view(pool_client, revision=snap.revision)
        rev = (await pool_client.set(b"cfg/c", b"3")).revision
        assert await config.wait_revision(rev, timeout=10) == await etcd_view(pool_client)
    finally:
        config.stop()


# -- decode and callbacks raising BaseException --------------------------------------------------


class Fatal(BaseException):
    """Not an Exception (like KeyboardInterrupt, SystemExit, asyncio.CancelledError)."""


@pytest_twisted.ensureDeferred
async def test_decode_raising_base_exception_does_not_tear_the_view(pool_client):
    await pool_client.submit(Transaction(success=[OpSet(b"cfg/a", b"1"), OpSet(b"cfg/b", b"1")]))

    def decode(value):
        if value == b"fatal":
            raise Fatal("decode gave up")
        return value

    config = ConfigWatcher(pool_client, P, decode=decode)
    first = await config.start(timeout=10)
    try:
        # One revision: a first, b second (keys in a txn's events come in op order).
        await pool_client.submit(Transaction(success=[OpSet(b"cfg/a", b"2"),
                                                      OpSet(b"cfg/b", b"fatal")]))
        await sleep(0.5)
        snap = config.snapshot()
        state = await etcd_view(pool_client, revision=snap.revision)
        # Whatever it does with the BaseException, the view is one revision of etcd
        # (decoded; a key whose value cannot be decoded keeps its last good value).
        assert dict(snap) in ({**state, b"cfg/b": b"1"}, dict(first))
        # What it does (docs/config.md): the view keeps the last whole revision, and
        # the watcher stops (a BaseException is no bad value; it propagates).
        assert snap == first and snap.revision == first.revision
        assert config.state is ConfigState.STOPPED
    finally:
        config.stop()


# -- update() corner cases ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_update_refuses_the_same_key_twice_as_str_and_bytes(pool_client):
    config = ConfigWatcher(pool_client, P)
    try:
        with pytest.raises(InvalidArgument, match="cfg/a"):
            config.update({"cfg/a": b"from str", b"cfg/a": b"from bytes"})
    finally:
        await sleep(0.1)  # let a transaction sent by mistake finish before the next test


@pytest_twisted.ensureDeferred
async def test_update_corner_cases(pool_client):
    await pool_client.set(b"cfg/old", b"1")
    calls = []

    def encode(value):
        calls.append(value)
        if value == "boom":
            raise ValueError("cannot encode")
        return json.dumps(value)

    config = ConfigWatcher(pool_client, P, decode=json.loads, encode=encode)
    before = (await pool_client.get(b"x")).header.revision
    # encode fails on the second value: nothing is written, the error is encode's own.
    with pytest.raises(ValueError, match="cannot encode"):
        config.update({b"cfg/a": 1, b"cfg/b": "boom", b"cfg/c": 3}, delete=[b"cfg/old"])
    assert (await pool_client.get(b"x")).header.revision == before
    # encode returning something that is not bytes/str: TypeError, nothing written.
    with pytest.raises(TypeError):
        config.update({b"cfg/a": 1}, encode=lambda v: v)
    with pytest.raises(TypeError):
        config.update(delete=[b"cfg/old", 5])
    with pytest.raises(InvalidArgument):
        config.update(delete=[])
    with pytest.raises(InvalidArgument, match="not under the prefix"):
        config.update(delete=[b"cfg"])  # the prefix without its slash is outside
    assert (await pool_client.get(b"x")).header.revision == before
    # The prefix itself is a key under the prefix.
    rev = await config.update({b"cfg/": {"root": True}}, delete=[b"cfg/old", b"cfg/old"])
    await config.start(timeout=10)
    try:
        assert config.snapshot() == {b"cfg/": {"root": True}}
        assert config.revision == rev
        # expect= with 128 existing keys touched: 129 comparisons, refused before sending.
        await pool_client.submit(Transaction(success=[OpSet(b"cfg/%03d" % i, b"0")
                                                      for i in range(128)]))
        await config.wait_for(b"cfg/127", timeout=10)
        snap = config.snapshot()
        with pytest.raises(TooManyOperations):
            config.update({b"cfg/%03d" % i: 1 for i in range(128)}, expect=snap)
        # A stale snapshot (an unrelated key under the prefix changed): Failed, nothing written.
        stale = config.snapshot()
        rev = await config.update({b"cfg/000": 5})
        await config.wait_revision(rev, timeout=10)
        with pytest.raises(Failed):
            await config.update({b"cfg/001": 7}, expect=stale)
        assert (await pool_client.get(b"cfg/001")).kvs[0].value == b"0"
        # A write outside the prefix does not make a snapshot stale.
        fresh = config.snapshot()
        await pool_client.set(b"cfh", b"1")
        rev = await config.update({b"cfg/001": 7}, expect=fresh)
        assert (await config.wait_revision(rev, timeout=10))[b"cfg/001"] == 7
    finally:
        config.stop()


# -- re-entrant callbacks -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_callbacks_that_update_wait_and_subscribe(pool_client):
    """A callback that writes through update(), waits with wait_for(), registers and
    removes callbacks: each change still reaches the callbacks registered before it, once,
    in revision order, and the watcher goes on."""
    config = ConfigWatcher(pool_client, P, decode=json.loads, encode=json.dumps)
    log, late, waited = [], [], []
    pending, removers = [], []

    def main(change):
        log.append(change.revision)
        if b"cfg/step" in change.changed or b"cfg/step" in change.added:
            step = change.snapshot[b"cfg/step"]
            if step < 3:
                # Re-entrant: write the next step, and wait for it from inside a callback.
                pending.append(config.update({b"cfg/step": step + 1}))
                w = config.wait_for(b"cfg/step", lambda v, s=step: v == s + 1, timeout=10)
                pending.append(w.addCallback(waited.append))
            if step == 1:
                removers.append(config.on_change(late.append))  # from the next change on

    config.on_change(main)
    await config.start(timeout=10)
    try:
        await config.update({b"cfg/step": 0})
        await config.wait_for(b"cfg/step", lambda v: v == 3, timeout=10)
        await wait_until(lambda: len(waited) == 3)
        assert waited == [1, 2, 3]
        assert log == sorted(log) and len(log) == 4
        assert [c.snapshot[b"cfg/step"] for c in late] == [2, 3]
        (remove_late,) = removers
        remove_late()
        rev = await config.update({b"cfg/other": 1})
        await config.wait_revision(rev, timeout=10)
        assert len(late) == 2 and len(log) == 5
    finally:
        config.stop()


# -- prefixes, sizes ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_prefix_ff_and_nested_prefixes_with_paging(pool_client):
    """Prefix b"\\xff" (its range has no end: every key >= it) and b"\\xff\\xff", read in
    pages of 2, plus a prefix that is a prefix of the other's keys."""
    keys = [b"\xfe\xff", b"\xff", b"\xff\x00", b"\xff\xff", b"\xff\xff\x00", b"\xff\xff\xff",
            b"\xff\xff\xff\xff", b"\xffa"]
    await pool_client.submit(Transaction(success=[OpSet(k, k) for k in keys]))
    outer = ConfigWatcher(pool_client, b"\xff", page_size=2)
    inner = ConfigWatcher(pool_client, b"\xff\xff", page_size=2)
    outer_changes, inner_changes = [], []
    outer.on_change(outer_changes.append)
    inner.on_change(inner_changes.append)
    try:
        o = await outer.start(timeout=10)
        i = await inner.start(timeout=10)
        assert sorted(o) == sorted(k for k in keys if k.startswith(b"\xff"))
        assert sorted(i) == sorted(k for k in keys if k.startswith(b"\xff\xff"))
        txn = await pool_client.submit(Transaction(success=[
            OpSet(b"\xff\xff\xff\xff\xff", b"new"), OpDel(b"\xffa"), OpSet(b"\xfe", b"out")]))
        await outer.wait_revision(txn.header.revision, timeout=10)
        await inner.wait_revision(txn.header.revision, timeout=10)
        assert dict(outer_changes[0].added) == dict(inner_changes[0].added) == {
            b"\xff\xff\xff\xff\xff": b"new"}
        assert dict(outer_changes[0].removed) == {b"\xffa": b"\xffa"}
        assert not inner_changes[0].removed
        assert outer.snapshot() == await etcd_view(pool_client, b"\xff")
        assert inner.snapshot() == await etcd_view(pool_client, b"\xff\xff")
        with pytest.raises(InvalidArgument):
            inner.wait_for(b"\xff\x00")
    finally:
        outer.stop()
        inner.stop()


@pytest_twisted.ensureDeferred
async def test_one_mib_values(pool_client):
    big = [bytes([65 + i]) * (1024 * 1024) for i in range(3)]
    await pool_client.set(b"cfg/big0", big[0])
    config = ConfigWatcher(pool_client, P, page_size=1)
    changes = []
    config.on_change(changes.append)
    snap = await config.start(timeout=20)
    try:
        assert snap[b"cfg/big0"] == big[0]
        await pool_client.set(b"cfg/big1", big[1])
        rev = await config.update({b"cfg/big0": big[2]})
        await config.wait_revision(rev, timeout=20)
        assert config.snapshot() == {b"cfg/big0": big[2], b"cfg/big1": big[1]}
        assert len(changes) == 2 and changes[-1].previous[b"cfg/big0"] == big[0]
    finally:
        config.stop()


# -- lifecycle ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_lifecycle_misuse(pool_client):
    config = ConfigWatcher(pool_client, P)
    config.stop()  # before start: stopped for good
    config.stop()
    assert config.state is ConfigState.STOPPED
    with pytest.raises(InvalidArgument):
        config.start()
    with pytest.raises(ConfigStopped):
        await config.wait_for(b"cfg/x")
    with pytest.raises(ConfigStopped):
        await config.wait_revision(1)

    config = ConfigWatcher(pool_client, P)
    d = config.start()
    with pytest.raises(InvalidArgument):
        config.start()  # while loading
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    assert config.state is ConfigState.NEW and config._task is None
    assert await config.start(timeout=10) == {}
    with pytest.raises(InvalidArgument):
        config.start()
    config.stop()
    config.stop()
    with pytest.raises(InvalidArgument):
        config.start()  # after stop
    assert config.snapshot() == {}  # the last view stays readable
    # A watcher on a prefix that is a bool/int/None: TypeError.
    for bad in (True, 5, None, 1.5):
        with pytest.raises(TypeError):
            ConfigWatcher(pool_client, bad)
    with pytest.raises(TypeError):
        ConfigWatcher(pool_client, P, page_size=True)
    with pytest.raises(TypeError):
        ConfigWatcher(pool_client, P, encode=b"json")


@pytest_twisted.ensureDeferred
async def test_paused_etcd(etcd_factory):
    """A hung etcd: start(timeout=) gives Timeout promptly and leaves the watcher NEW;
    once etcd resumes, start() works and a watch across a pause loses nothing."""
    server = etcd_factory()
    client = Client(reactor, server.url, timeout=20)
    config = ConfigWatcher(client, P)
    try:
        await client.set(b"cfg/a", b"1")
        server.pause()
        t0 = reactor.seconds()
        with pytest.raises(Timeout):
            await config.start(timeout=1)
        assert reactor.seconds() - t0 < 4
        assert config.state is ConfigState.NEW
        server.resume()
        assert await config.start(timeout=10) == {b"cfg/a": b"1"}
        await config._watch.watcher.ready
        waiting = config.wait_for(b"cfg/b", timeout=20)
        server.pause()
        await sleep(1.5)
        server.resume()
        await client.set(b"cfg/b", b"2")
        assert await waiting == b"2"
        assert config.snapshot() == await etcd_view(client)
    finally:
        if server.paused:
            server.resume()
        config.stop()
        await client.close()


@pytest_twisted.ensureDeferred
async def test_snapshot_of_a_watcher_stopped_before_its_first_read(pool_client):
    await pool_client.set(b"cfg/a", b"1")
    config = ConfigWatcher(pool_client, P)
    d = config.start()
    config.stop()  # during the first read
    with pytest.raises(defer.CancelledError):
        await d
    with pytest.raises(InvalidArgument):
        config.snapshot()
