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
from coord.recipes import ConfigChange, ConfigSnapshot, ConfigState, ConfigStopped, ConfigWatcher

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
