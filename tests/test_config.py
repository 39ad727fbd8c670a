"""ConfigWatcher against real etcd: one view per revision, across restarts, failover and
compaction; decode errors; wait_for; atomic (and guarded) multi-key updates; the example.

Run on both etcd versions:
``COORD_ETCD=/usr/bin/etcd COORD_ETCDCTL=/usr/bin/etcdctl pytest tests/test_config.py``.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from base64 import b64encode

import pytest
import pytest_twisted
from helpers import ROOT, defer_to_exit, deferred_readline, finish, sleep, wait_until
from twisted.internet import defer, reactor

from coord import (
    Client,
    ConfigDecodeError,
    ConfigStopped,
    Failed,
    InvalidArgument,
    KeySet,
    OpDel,
    OpSet,
    OutcomeUnknown,
    Timeout,
    TooManyOperations,
    Transaction,
    Unavailable,
)
from coord.recipes import ConfigChange, ConfigSnapshot, ConfigState, ConfigWatcher

P = b"cfg/"


async def read_state(client, prefix=P, revision=None, decode=json.loads):
    """etcd's own state of ``prefix`` (decoded) at ``revision`` (default: now)."""
    result = await client.get(KeySet(prefix, prefix=True), revision=revision)
    return {kv.key: decode(kv.value) for kv in result.kvs}, result.header.revision


class Recorder:
    """Records every change a watcher reports and checks each against the one before."""

    def __init__(self, config):
        self.changes: list[ConfigChange] = []
        self.errors: list[ConfigDecodeError] = []
        config.on_change(self.changes.append)
        config.on_error(self.errors.append)

    def check_chain(self, first: ConfigSnapshot):
        """Each change goes from the previous view to the next, and says what differs."""
        previous = first
        for change in self.changes:
            assert change.revision > previous.revision
            assert change.previous == previous
            assert change.snapshot.revision == change.revision
            expected = dict(previous)
            for key in change.removed:
                assert expected.pop(key) == change.removed[key]
            for key, value in {**change.added, **change.changed}.items():
                assert (key in expected) == (key in change.changed)
                expected[key] = value
            assert expected == change.snapshot
            previous = change.snapshot
        return previous


async def check_states_existed(client, changes, decode=json.loads, since=0):
    """Every view a callback saw is etcd's state of the prefix at that revision."""
    for change in changes:
        if change.revision >= since:
            state, _ = await read_state(client, revision=change.revision, decode=decode)
            assert state == change.snapshot, f"revision {change.revision}"


async def etcd_view(client, prefix=P, revision=None, decode=lambda v: v):
    result = await client.get(KeySet(prefix, prefix=True), revision=revision)
    return {kv.key: decode(kv.value) for kv in result.kvs}


def _gateway_put(server, key, value):
    return int(server.post("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})
               ["header"]["revision"])


# -- basics -------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_view_and_one_change_per_revision(client):
    """(Both transports.)  A transaction's puts and deletes are one change, at its revision."""
    await client.set(b"cfg/a", b"1")
    await client.set(b"cfg/b", b'{"x": 2}')
    await client.set(b"cfg/c", b"3")
    await client.set(b"cfgother", b"4")
    config = ConfigWatcher(client, P, decode=json.loads)
    rec = Recorder(config)
    first = await config.start(timeout=10)
    try:
        assert first == {b"cfg/a": 1, b"cfg/b": {"x": 2}, b"cfg/c": 3}
        assert first.revision == config.revision
        assert config.get(b"cfg/a") == 1 and config.get("cfg/zz", "no") == "no"
        assert repr(config) == f"<ConfigWatcher b'cfg/' WATCHING revision={first.revision} keys=3>"
        txn = await client.submit(Transaction(success=[
            OpSet(b"cfg/a", b"10"), OpSet(b"cfg/d", b'"new"'), OpDel(b"cfg/c"),
            OpSet(b"cfgother", b"5")]))
        rev = txn.header.revision
        snap = await config.wait_revision(rev, timeout=10)
        assert snap.revision == rev
        (change,) = rec.changes
        assert change.revision == rev and not change.resync
        assert change.added == {b"cfg/d": "new"}
        assert change.changed == {b"cfg/a": 10}
        assert change.removed == {b"cfg/c": 3}
        # Snapshots are immutable: the first one still shows its revision.
        assert first == {b"cfg/a": 1, b"cfg/b": {"x": 2}, b"cfg/c": 3}
        with pytest.raises(TypeError):
            first[b"cfg/a"] = 2  # type: ignore[index]
        assert config.snapshot() == (await read_state(client))[0]
        # A rewrite of the same value is a change (etcd recorded a write); a delete of a
        # missing key or a write elsewhere is none.
        rev2 = (await client.set(b"cfg/a", b"10")).revision
        await client.delete(b"cfg/missing")
        await config.wait_revision(rev2, timeout=10)
        assert rec.changes[-1].changed == {b"cfg/a": 10}
        rec.check_chain(first)
        await check_states_existed(client, rec.changes)
    finally:
        config.stop()
    assert config.state is ConfigState.STOPPED


@pytest_twisted.ensureDeferred
async def test_paged_read_is_one_revision_while_writers_write(pool_client):
    """Pages of 7 keys, all read at the first page's revision, while keys keep changing."""
    await pool_client.submit(Transaction(success=[OpSet(b"cfg/%03d" % i, b"0")
                                                  for i in range(100)]))
    stop = []

    async def churn():
        i = 0
        while not stop:
            await pool_client.submit(Transaction(success=[
                OpSet(b"cfg/%03d" % (i % 100), b"%d" % i), OpDel(b"cfg/%03d" % ((i + 50) % 100)),
            ]))
            i += 1

    writer = defer.ensureDeferred(churn())
    try:
        for _ in range(5):
            config = ConfigWatcher(pool_client, P, decode=json.loads, page_size=7)
            snap = await config.start(timeout=10)
            config.stop()
            state, _ = await read_state(pool_client, revision=snap.revision)
            assert state == snap
    finally:
        stop.append(True)
        await writer


@pytest.mark.parametrize(("call", "exc", "named"), [
    # start(): a read cannot be done in 0 s, so timeout=0 could only ever time out
    (lambda c: c.start(timeout=0), InvalidArgument, "timeout"),
    (lambda c: c.start(timeout=math.nan), InvalidArgument, "timeout"),
    (lambda c: c.start(timeout=-math.inf), InvalidArgument, "timeout"),
    (lambda c: c.start(timeout=True), TypeError, "timeout"),
    # waits: 0 is "do not wait" there; the rest is refused
    (lambda c: c.wait_for(b"cfg/x", timeout=-1), InvalidArgument, "timeout"),
    (lambda c: c.wait_for(b"cfg/x", timeout=math.nan), InvalidArgument, "timeout"),
    (lambda c: c.wait_revision(5, timeout="1"), TypeError, "timeout"),
    # update(): the transaction's timeout, checked as every client call's
    (lambda c: c.update({b"cfg/a": b"1"}, timeout=0), InvalidArgument, "timeout"),
    (lambda c: c.update({b"cfg/a": b"1"}, timeout=-1), InvalidArgument, "timeout"),
    (lambda c: c.update({b"cfg/a": b"1"}, timeout="5"), TypeError, "timeout"),
    (lambda c: c.update({"cfg/\ud800": b"1"}), InvalidArgument, "key"),
])
@pytest_twisted.ensureDeferred
async def test_bad_timeouts_are_refused_and_write_nothing(pool_client, call, exc, named):
    config = ConfigWatcher(pool_client, P)
    with pytest.raises(exc, match=named):
        call(config)
    assert config.state is ConfigState.NEW
    assert (await pool_client.get(KeySet(P, prefix=True))).kvs == []


@pytest.mark.parametrize(("page_size", "exc"), [
    (0, InvalidArgument), (-1, InvalidArgument), (1.5, TypeError), ("7", TypeError),
    (True, TypeError)])
def test_bad_page_sizes_are_refused(page_size, exc):
    with pytest.raises(exc, match="page_size"):
        ConfigWatcher(Client(reactor, "http://127.0.0.1:1"), P, page_size=page_size)


@pytest_twisted.ensureDeferred
async def test_bad_arguments(pool_client):
    with pytest.raises(TypeError, match="prefix"):
        ConfigWatcher(pool_client, 42)
    with pytest.raises(InvalidArgument):
        ConfigWatcher(pool_client, b"")
    with pytest.raises(TypeError, match="decode"):
        ConfigWatcher(pool_client, P, decode="json")
    with pytest.raises(InvalidArgument):
        ConfigWatcher(pool_client, P, page_size=0)
    config = ConfigWatcher(pool_client, "cfg/")  # str is UTF-8 encoded
    assert config.prefix == P
    with pytest.raises(InvalidArgument):
        config.snapshot()  # not started
    with pytest.raises(TypeError, match="timeout"):
        config.start(timeout="1")
    with pytest.raises(InvalidArgument):
        config.start(timeout=-1)
    assert config.state is ConfigState.NEW
    await config.start()
    try:
        with pytest.raises(InvalidArgument):
            config.start()
        with pytest.raises(InvalidArgument, match="not under the prefix"):
            config.wait_for(b"other/x")
        with pytest.raises(TypeError):
            config.wait_for(b"cfg/x", predicate=3)
        with pytest.raises(TypeError):
            config.wait_for(1.5)
        with pytest.raises(TypeError, match="timeout"):
            config.wait_for(b"cfg/x", timeout=[])
        with pytest.raises(TypeError):
            config.wait_revision("3")
        with pytest.raises(TypeError):
            config.on_change(None)
        with pytest.raises(InvalidArgument, match="not under the prefix"):
            config.update({b"elsewhere": b"1"})
        with pytest.raises(InvalidArgument):
            config.update({b"cfg/a": b"1"}, delete=[b"cfg/a"])
        with pytest.raises(InvalidArgument):
            config.update({})
        with pytest.raises(TypeError, match="delete"):
            config.update(delete=b"cfg/a")
        with pytest.raises(TypeError, match="value"):
            config.update({b"cfg/a": 1})  # no encode: values must be bytes/str
        with pytest.raises(TypeError, match="mapping"):
            config.update([b"cfg/a"])
        with pytest.raises(TypeError, match="ConfigSnapshot"):
            config.update({b"cfg/a": b"1"}, expect=5)
        with pytest.raises(TooManyOperations):
            config.update({b"cfg/%d" % i: b"" for i in range(129)})
    finally:
        config.stop()
    with pytest.raises(ConfigStopped):
        await config.wait_for(b"cfg/x")


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


# -- decode errors ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_decode_error_is_reported_and_last_good_value_kept(pool_client):
    await pool_client.set(b"cfg/good", b"1")
    bad_at_start = (await pool_client.set(b"cfg/bad", b"{nope")).revision
    config = ConfigWatcher(pool_client, P, decode=json.loads)
    rec = Recorder(config)
    first = await config.start()
    try:
        assert first == {b"cfg/good": 1}  # a key with no good value yet is left out
        (error,) = rec.errors
        assert isinstance(error, ConfigDecodeError) and isinstance(error, ValueError)
        assert (error.key, error.revision) == (b"cfg/bad", bad_at_start)
        assert isinstance(error.cause, json.JSONDecodeError)
        assert set(config.decode_errors) == {b"cfg/bad"}
        assert "errors=1" in repr(config)

        # A bad value for a known key: reported, and the view keeps the last good one.
        r1 = (await pool_client.set(b"cfg/good", b"not json")).revision
        await wait_until(lambda: len(rec.errors) == 2)
        assert (rec.errors[1].key, rec.errors[1].revision) == (b"cfg/good", r1)
        assert config.get(b"cfg/good") == 1 and config.revision == r1
        assert not rec.changes  # nothing in the view changed
        assert config.snapshot().mod_revision(b"cfg/good") == r1  # etcd's own revision

        # The watcher goes on: a good value, in the same transaction as another bad one.
        txn = await pool_client.submit(Transaction(success=[
            OpSet(b"cfg/good", b"2"), OpSet(b"cfg/bad", b"[1]"), OpSet(b"cfg/new", b"}")]))
        await config.wait_revision(txn.header.revision, timeout=10)
        (change,) = rec.changes
        assert change.changed == {b"cfg/good": 2} and change.added == {b"cfg/bad": [1]}
        assert set(config.decode_errors) == {b"cfg/new"}
        # Deleting a key whose value is bad clears its error.
        await pool_client.delete(b"cfg/new")
        await wait_until(lambda: not config.decode_errors)
        assert len(rec.changes) == 1
    finally:
        config.stop()


@pytest_twisted.ensureDeferred
async def test_change_after_a_revision_with_only_a_bad_value(pool_client):
    """A revision that changes nothing in the view, then one that does: the second
    change's ``previous`` is still the view before it (copy on write)."""
    config = ConfigWatcher(pool_client, P, decode=json.loads)
    rec = Recorder(config)
    first = await config.start()
    try:
        await pool_client.set(b"cfg/a", b"{bad")
        await wait_until(lambda: rec.errors)
        rev = (await pool_client.set(b"cfg/b", b"1")).revision
        await wait_until(lambda: rec.changes)
        rev = (await pool_client.set(b"cfg/b", b"2")).revision
        await wait_until(lambda: len(rec.changes) == 2)
        assert config.revision == rev
        assert rec.changes[0].previous == {} and rec.changes[1].previous == {b"cfg/b": 1}
        rec.check_chain(first)
    finally:
        config.stop()


@pytest_twisted.ensureDeferred
async def test_callback_exceptions_are_logged_and_the_watcher_goes_on(pool_client):
    from twisted.logger import globalLogPublisher

    logged = []
    globalLogPublisher.addObserver(logged.append)
    config = ConfigWatcher(pool_client, P)
    seen = []

    def broken(change):
        raise RuntimeError("callback bug")

    config.on_change(broken)
    remove = config.on_change(seen.append)
    await config.start()
    try:
        await pool_client.set(b"cfg/a", b"1")
        await wait_until(lambda: len(seen) == 1)
        remove()
        await pool_client.set(b"cfg/a", b"2")
        await config.wait_for(b"cfg/a", lambda v: v == b"2", timeout=10)
        assert len(seen) == 1
        failures = [e for e in logged if e.get("log_failure") is not None
                    and e["log_failure"].check(RuntimeError)]
        assert len(failures) == 2
        for event in failures:
            event["log_failure"].cleanFailure()
    finally:
        globalLogPublisher.removeObserver(logged.append)
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


# -- waiting ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_wait_for(pool_client):
    await pool_client.set(b"cfg/x", b"1")
    config = ConfigWatcher(pool_client, P, decode=json.loads)
    early = config.wait_for(b"cfg/x")  # before start: checked once the view is read
    await config.start()
    try:
        assert await early == 1
        assert await config.wait_for(b"cfg/x", lambda v: v >= 1) == 1  # holds already
        later = config.wait_for(b"cfg/x", lambda v: v > 3, timeout=10)
        for v in (2, 3, 4, 5):
            await pool_client.set(b"cfg/x", b"%d" % v)
        assert await later == 4
        # Timeout: the waiter is gone afterwards.
        with pytest.raises(Timeout):
            await config.wait_for(b"cfg/x", lambda v: v > 100, timeout=0.2)
        assert not config._waiters
        # Cancel.
        d = config.wait_for(b"cfg/y")
        d.cancel()
        with pytest.raises(defer.CancelledError):
            await d
        assert not config._waiters
        # A predicate that raises fails the wait with its exception.
        with pytest.raises(KeyError):
            await config.wait_for(b"cfg/x", lambda v: {}[v], timeout=10)
        # Deleted then written again.
        absent = config.wait_for(b"cfg/z", timeout=10)
        await pool_client.set(b"cfg/z", b'"here"')
        assert await absent == "here"
        # stop() fails the waiters that remain.
        pending = config.wait_for(b"cfg/never")
        pending_rev = config.wait_revision(config.revision + 1000)
    finally:
        config.stop()
    with pytest.raises(ConfigStopped):
        await pending
    with pytest.raises(ConfigStopped):
        await pending_rev


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


# -- atomic updates -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_update_writes_and_deletes_in_one_transaction(pool_client):
    await pool_client.set(b"cfg/old", b"1")
    config = ConfigWatcher(pool_client, P, decode=json.loads, encode=json.dumps)
    rec = Recorder(config)
    first = await config.start()
    try:
        rev = await config.update({b"cfg/a": {"n": 1}, "cfg/b": [1, 2]}, delete=[b"cfg/old"])
        snap = await config.wait_revision(rev, timeout=10)
        assert snap == {b"cfg/a": {"n": 1}, b"cfg/b": [1, 2]}
        (change,) = rec.changes
        assert change.revision == rev
        assert set(change.added) == {b"cfg/a", b"cfg/b"} and set(change.removed) == {b"cfg/old"}
        # encode= per call; a raw bytes value with encode=bytes
        rev = await config.update({b"cfg/raw": b"7"}, encode=bytes)
        await config.wait_revision(rev, timeout=10)
        assert config.get(b"cfg/raw") == 7
        rec.check_chain(first)
    finally:
        config.stop()
    # update() needs no start()
    writer = ConfigWatcher(pool_client, P)
    await writer.update({b"cfg/c": b"3"})
    assert (await pool_client.get(b"cfg/c")).kvs[0].value == b"3"


@pytest_twisted.ensureDeferred
async def test_guarded_update_refuses_a_change_it_did_not_see(pool_client):
    await pool_client.set(b"cfg/a", b"1")
    await pool_client.set(b"cfg/b", b"1")
    config = ConfigWatcher(pool_client, P, decode=json.loads, encode=json.dumps)
    await config.start()
    try:
        snap = config.snapshot()
        # Another writer changes a key we do not touch: refused (it may matter to us).
        await pool_client.set(b"cfg/b", b"2")
        with pytest.raises(Failed) as failed:
            await config.update({b"cfg/a": 5}, expect=snap)
        # The view catches up with what the transaction saw.
        seen = await config.wait_revision(failed.value.header.revision, timeout=10)
        assert seen[b"cfg/b"] == 2
        # ... or creates one: refused.
        snap = await config.wait_revision(snap.revision + 1, timeout=10)
        await pool_client.set(b"cfg/new", b"0")
        with pytest.raises(Failed):
            await config.update({b"cfg/a": 5}, expect=snap)
        # ... or deletes one we touch: refused (a deletion leaves no mod revision to see).
        snap = await config.wait_revision(snap.revision + 1, timeout=10)
        await pool_client.delete(b"cfg/a")
        with pytest.raises(Failed):
            await config.update({b"cfg/a": 5}, expect=snap)
        with pytest.raises(Failed):
            await config.update(delete=[b"cfg/a"], expect=snap)
        assert (await pool_client.get(b"cfg/a")).kvs == []
        # From a current snapshot it goes through.
        snap = await config.wait_revision(snap.revision + 1, timeout=10)
        rev = await config.update({b"cfg/a": 6}, expect=snap)
        assert (await config.wait_revision(rev, timeout=10))[b"cfg/a"] == 6
    finally:
        config.stop()


@pytest_twisted.ensureDeferred
async def test_read_modify_write_loses_no_update(pool_client, etcd):
    """Two watchers (two clients) increment one counter 30 times each, concurrently."""
    await pool_client.set(b"cfg/counter", b"0")
    other = Client(reactor, etcd.url)
    configs = [ConfigWatcher(c, P, decode=json.loads, encode=json.dumps)
               for c in (pool_client, other)]
    retries = []

    async def increment(config, times):
        for _ in range(times):
            while True:
                snap = config.snapshot()
                try:
                    await config.update({b"cfg/counter": snap[b"cfg/counter"] + 1}, expect=snap)
                    break
                except Failed:
                    retries.append(1)
                    await config.wait_revision(snap.revision + 1, timeout=10)

    try:
        for config in configs:
            await config.start()
        await defer.gatherResults([defer.ensureDeferred(increment(c, 30)) for c in configs],
                                  consumeErrors=True)
        assert (await pool_client.get(b"cfg/counter")).kvs[0].value == b"60"
        assert retries  # they did collide
    finally:
        for config in configs:
            config.stop()
        await other.close()


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


# -- stop ---------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stop_ends_the_watch_and_leaves_nothing_running(pool_client):
    config = ConfigWatcher(pool_client, P)
    seen = []
    config.on_change(seen.append)
    async with config:
        await config._watch.watcher.ready
        await pool_client.set(b"cfg/a", b"1")
        await wait_until(lambda: seen)
    assert config.state is ConfigState.STOPPED
    assert config._watch is None and not pool_client._transport._streams
    assert not [c for c in reactor.getDelayedCalls()
                if getattr(c.func, "__self__", None) is config]
    await pool_client.set(b"cfg/a", b"2")
    await sleep(0.2)
    assert len(seen) == 1 and config.get(b"cfg/a") == b"1"  # the last view stays readable
    config.stop()  # idempotent


@pytest_twisted.ensureDeferred
async def test_closing_the_client_stops_the_watcher(etcd):
    client = Client(reactor, etcd.url)
    config = ConfigWatcher(client, P)
    await config.start()
    waiting = config.wait_for(b"cfg/never")
    await client.close()
    with pytest.raises(ConfigStopped):
        await waiting
    assert config.state is ConfigState.STOPPED


class CompactingClient(Client):
    """A Client that, before the second page of a read, writes a key and compacts the
    store up to the newest revision: the read's fixed revision is gone."""

    pages = 0

    def get(self, key, **kwargs):
        if kwargs.get("revision") is None:
            return super().get(key, **kwargs)
        self.pages += 1
        if self.pages != 1:
            return super().get(key, **kwargs)

        async def compact_then_get():
            rev = (await self.set(b"cfg/zz-late", b"late")).revision
            await self.compact(rev, physical=True)
            return await super(CompactingClient, self).get(key, **kwargs)

        return defer.ensureDeferred(compact_then_get())


@pytest_twisted.ensureDeferred
async def test_a_compaction_between_pages_starts_the_read_again(etcd):
    client = CompactingClient(reactor, etcd.url)
    try:
        await client.submit(Transaction(success=[OpSet(b"cfg/%02d" % i, b"%d" % i)
                                                 for i in range(20)]))
        config = ConfigWatcher(client, P, page_size=5)
        snap = await config.start(timeout=10)
        config.stop()
        assert client.pages > 4  # the first read's second page failed; all read again
        assert len(snap) == 21 and snap[b"cfg/zz-late"] == b"late"
        assert snap == {kv.key: kv.value for kv in
                        (await client.get(KeySet(P, prefix=True), revision=snap.revision)).kvs}
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_stop_during_start_and_a_start_that_fails(etcd_factory):
    server = etcd_factory()
    client = Client(reactor, server.url, timeout=1, connect_timeout=0.5)
    try:
        config = ConfigWatcher(client, P)
        d = config.start()
        config.stop()
        with pytest.raises(defer.CancelledError):
            await d
        assert config.state is ConfigState.STOPPED
        server.kill()
        config = ConfigWatcher(client, P)
        with pytest.raises((Unavailable, Timeout)):
            await config.start(timeout=5)
        assert config.state is ConfigState.NEW  # may be started again
        server.restart()
        assert await config.start(timeout=10) == {}
        config.stop()
    finally:
        await client.close()


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
        _compact_behind_the_watchers_back(server, {b"cfg/zz": b"y", b"cfg/new": b"x"}, ())
        await waiting
        assert config.state is ConfigState.STOPPED
        await client.set(b"cfg/b", b"2")
        await sleep(0.3)
        assert config.state is ConfigState.STOPPED and config._watch is None
        assert len(changes) == 1 and changes[0].resync
    finally:
        config.stop()
        await client.close()


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


# -- compaction, restarts, failover -------------------------------------------------------------


def _b64(data: bytes) -> str:
    return b64encode(data).decode()


def _compact_behind_the_watchers_back(server, puts, deletes):
    """Restart etcd, write and compact through the gateway, all before the reactor runs
    again: every watch stream broke and none is back, so each resumes from a compacted
    revision (a synced watch is never cancelled by a compaction)."""
    server.restart()
    for key, value in puts.items():
        server.post("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})
    for key in deletes:
        server.post("/v3/kv/deleterange", {"key": _b64(key)})
    revision = int(server.post("/v3/kv/range", {"key": _b64(b"x")})["header"]["revision"])
    server.post("/v3/kv/compaction", {"revision": revision, "physical": True})
    return revision


@pytest_twisted.ensureDeferred
async def test_compaction_resync_is_reported_as_one_change(etcd_factory):
    server = etcd_factory()
    client = Client(reactor, server.url, timeout=5)
    config = ConfigWatcher(client, P, decode=json.loads)
    rec = Recorder(config)
    try:
        await client.submit(Transaction(success=[OpSet(b"cfg/%d" % i, b"%d" % i)
                                                 for i in range(5)]))
        first = await config.start()
        await config._watch.watcher.ready
        compacted = _compact_behind_the_watchers_back(
            server, {b"cfg/0": b"100", b"cfg/9": b"9", b"cfg/1": b"1"}, [b"cfg/2", b"cfg/3"])
        await wait_until(lambda: config.resyncs == 1, timeout=20)
        (change,) = rec.changes
        assert change.resync and change.revision >= compacted
        assert change.added == {b"cfg/9": 9}
        assert change.changed == {b"cfg/0": 100, b"cfg/1": 1}  # rewritten, even if equal
        assert change.removed == {b"cfg/2": 2, b"cfg/3": 3}
        rec.check_chain(first)
        assert config.snapshot() == (await read_state(client))[0]
        # ... and it watches again from there.
        rev = (await client.set(b"cfg/4", b"44")).revision
        assert (await config.wait_revision(rev, timeout=10))[b"cfg/4"] == 44
        assert config.state is ConfigState.WATCHING
    finally:
        config.stop()
        await client.close()


@pytest_twisted.ensureDeferred
async def test_catch_up_after_a_restart_is_one_change_per_revision(etcd_factory):
    """A resumed watch catches up with several revisions in one response: each is its
    own change, applied whole (a transaction's put and delete together)."""
    server = etcd_factory()
    client = Client(reactor, server.url, timeout=5)
    config = ConfigWatcher(client, P)
    rec = Recorder(config)
    flushed = []
    mirror = config._mirror  # looks inside: the mirror's flush of buffered events
    flush = mirror._flush

    def counting_flush():
        flushed.append(len({e.revision for e in mirror.state.pending}))
        flush()

    mirror._flush = counting_flush
    try:
        await client.set(b"cfg/a", b"0")
        first = await config.start()
        await config._watch.watcher.ready
        server.restart()  # the stream breaks; the reactor does not run until we await
        revisions = [int(server.post("/v3/kv/put", {"key": _b64(b"cfg/a"), "value": _b64(b"1")})
                         ["header"]["revision"])]
        revisions.append(int(server.post("/v3/kv/txn", {"success": [
            {"request_put": {"key": _b64(b"cfg/b"), "value": _b64(b"2")}},
            {"request_delete_range": {"key": _b64(b"cfg/a")}}]})["header"]["revision"]))
        revisions.append(int(server.post("/v3/kv/put", {"key": _b64(b"cfg/c"), "value": _b64(b"3")})
                             ["header"]["revision"]))
        await config.wait_revision(revisions[-1], timeout=20)
        assert [c.revision for c in rec.changes] == revisions
        assert [(dict(c.added), dict(c.changed), dict(c.removed)) for c in rec.changes] == [
            ({}, {b"cfg/a": b"1"}, {}),
            ({b"cfg/b": b"2"}, {}, {b"cfg/a": b"1"}),
            ({b"cfg/c": b"3"}, {}, {}),
        ]
        rec.check_chain(first)
        assert max(flushed) == 3  # the three revisions came in one reactor turn
        assert config.resyncs == 0
    finally:
        config.stop()
        await client.close()


async def _random_transactions(rng, writer, count, keys=200, restart_every=None, server=None):
    """``count`` transactions of 1-6 puts and deletes over ``keys`` keys (seeded);
    restarts ``server`` after every ``restart_every``-th.  A write whose outcome is unknown
    is tolerated: the checks read etcd, they do not trust the writer."""
    last = 0
    for i in range(count):
        ops = []
        for k in rng.sample(range(keys), rng.randint(1, 6)):
            key = b"cfg/%03d" % k
            if rng.random() < 0.3:
                ops.append(OpDel(key))
            else:
                ops.append(OpSet(key, json.dumps({"v": rng.randint(0, 999)}).encode()))
        try:
            last = (await writer.submit(Transaction(success=ops))).header.revision
        except (OutcomeUnknown, Unavailable, Timeout):
            await sleep(0.05)
        if restart_every and (i + 1) % restart_every == 0:
            server.restart()
    return last


@pytest_twisted.ensureDeferred
async def test_random_updates_restarts_and_a_compaction(etcd_factory):
    """The issue's test: puts and deletes over 200 keys, several per transaction,
    interleaved with etcd restarts and a compaction.  Every view a callback saw was
    etcd's state at its revision, and the final view equals a fresh read."""
    rng = random.Random(20240607)
    server = etcd_factory()
    writer = Client(reactor, server.url, timeout=5)
    watcher = Client(reactor, server.url)
    config = ConfigWatcher(watcher, P, decode=json.loads)
    rec = Recorder(config)
    try:
        await _random_transactions(rng, writer, 100)
        first = await config.start(timeout=10)
        # Phase 1: two restarts while writing.
        last = await _random_transactions(rng, writer, 300, restart_every=100, server=server)
        await config.wait_revision(last, timeout=30)
        assert config._watch.watcher.reconnects >= 2
        seen_before = len(rec.changes)
        await check_states_existed(writer, rec.changes)  # before compacting their revisions
        # The compaction: the watch cannot resume, the watcher reads afresh.
        rng_keys = rng.sample(range(200), 20)
        compacted = _compact_behind_the_watchers_back(
            server, {b"cfg/%03d" % k: b'{"v": -1}' for k in rng_keys[:10]},
            [b"cfg/%03d" % k for k in rng_keys[10:]])
        await wait_until(lambda: config.resyncs == 1, timeout=20)
        resync = rec.changes[seen_before]
        assert resync.resync and resync.revision >= compacted
        assert [c.resync for c in rec.changes] == [False] * seen_before + [True]
        # Phase 2: more writes, one more restart.
        last = await _random_transactions(rng, writer, 200, restart_every=120, server=server)
        await config.wait_revision(last, timeout=30)
        assert config.snapshot() == (await read_state(writer))[0]
        final = rec.check_chain(first)
        assert final == config.snapshot()
        await check_states_existed(writer, rec.changes, since=compacted)
        assert len(rec.changes) > 400 and not rec.errors
    finally:
        config.stop()
        await writer.close()
        await watcher.close()


@pytest_twisted.ensureDeferred
async def test_failover_when_the_watched_member_dies(etcd_cluster):
    rng = random.Random(7)
    writer = Client(reactor, etcd_cluster.urls, timeout=5)
    watcher = Client(reactor, etcd_cluster.urls)
    config = ConfigWatcher(watcher, P, decode=json.loads)
    rec = Recorder(config)
    try:
        await _random_transactions(rng, writer, 30)
        first = await config.start(timeout=10)
        await config._watch.watcher.ready
        watched = config._watch.watcher._stream.endpoint.url
        member = next(m for m in etcd_cluster.members if m.url == watched)
        await _random_transactions(rng, writer, 50)
        member.kill()
        last = await _random_transactions(rng, writer, 150)
        await config.wait_revision(last, timeout=30)
        assert config._watch.watcher.reconnects >= 1
        assert config._watch.watcher._stream.endpoint.url != watched
        assert config.snapshot() == (await read_state(writer))[0]
        rec.check_chain(first)
        await check_states_existed(writer, rec.changes)
        assert config.resyncs == 0  # the watch resumed: no fresh read needed
    finally:
        config.stop()
        await writer.close()
        await watcher.close()


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
        _compact_behind_the_watchers_back(server, {b"cfg/b": b"2", b"cfg/c": b"3"}, ())
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
        _compact_behind_the_watchers_back(server, {b"cfg/b": b"2", b"cfg/c": b"3"}, ())
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


# -- the example --------------------------------------------------------------------------------


async def _line_matching(proc, pattern, lines):
    while True:
        line = await deferred_readline(proc)
        assert line, "".join(lines) + proc.stderr.read()
        lines.append(line)
        if re.search(pattern, line):
            return line


@pytest_twisted.ensureDeferred
async def test_example_config_daemon_reloads(etcd, pool_client):
    script = ROOT / "examples" / "config_daemon.py"
    proc = subprocess.Popen([sys.executable, str(script), etcd.url, "4"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    try:
        await _line_matching(proc, r"running with \{'greeting': 'hello', 'workers': 2\}", lines)
        await pool_client.set(b"config/daemon/workers", b"8")
        await _line_matching(proc, r"running with \{'greeting': 'hello', 'workers': 8\}", lines)
        await pool_client.set(b"config/daemon/greeting", b"{oops")
        await _line_matching(proc, r"bad value for b'config/daemon/greeting'", lines)
        await pool_client.submit(Transaction(success=[
            OpSet(b"config/daemon/greeting", b'"bonjour"'), OpDel(b"config/daemon/workers")]))
        await _line_matching(proc, r"running with \{'greeting': 'bonjour'\}", lines)
        out, err = await defer_to_exit(proc)
    finally:
        finish(proc)
    output = "".join(lines) + out
    assert proc.returncode == 0, output + err
    assert "Traceback" not in output + err
    assert re.search(r"config loaded at revision \d+", output)
    assert "changed ['workers']" in output
    assert "added [] changed ['greeting'] removed ['workers']" in output
    assert "stopped" in output


# -- async callbacks ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_async_on_change_is_started_not_awaited_and_its_failure_logged(pool_client):
    """An ``async def`` on_change runs for each change; the next change is reported
    without waiting for it; its exception is logged with the change it was given."""
    from twisted.logger import globalLogPublisher

    logged = []
    globalLogPublisher.addObserver(logged.append)
    config = ConfigWatcher(pool_client, P)
    gate = defer.Deferred()
    started, finished = [], []

    async def slow(change):
        started.append(change.revision)
        await gate
        finished.append(change.revision)
        if change.snapshot.get(b"cfg/a") == b"boom":
            raise RuntimeError("async callback bug")

    config.on_change(slow)
    await config.start(timeout=10)
    try:
        r1 = (await pool_client.set(b"cfg/a", b"1")).revision
        r2 = (await pool_client.set(b"cfg/a", b"boom")).revision
        await config.wait_revision(r2, timeout=10)
        assert started == [r1, r2] and finished == []  # both started, none awaited
        gate.callback(None)
        assert finished == [r1, r2]
        (failure,) = [e for e in logged if e.get("log_failure") is not None]
        assert failure["log_failure"].check(RuntimeError)
        assert failure["value"].revision == r2  # the change it was given
        failure["log_failure"].cleanFailure()
        assert config.state is ConfigState.WATCHING
    finally:
        globalLogPublisher.removeObserver(logged.append)
        config.stop()
