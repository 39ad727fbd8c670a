"""The prefix mirror: its sans-IO state (coord.recipes._mirror_state) in tables, without
etcd; its I/O (coord.recipes._mirror) against a real etcd: read then watch, one change
per revision, resync after Compacted, retries, errors that end it, waits, callbacks.
"""

from __future__ import annotations

from base64 import b64encode

import pytest
import pytest_twisted
from helpers import sleep, wait_until
from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher

from coord import Client, KeySet, OpDel, OpSet, PermissionDenied, Transaction, Unavailable
from coord.recipes._mirror import Mirror, MirrorPhase, invoke
from coord.recipes._mirror_state import Change, MirrorState, View
from coord.types import Event, EventType, KeyValue


def kv(key: bytes, mod: int, value: bytes = b"v", create: int | None = None) -> KeyValue:
    return KeyValue(key, value, create or mod, mod, 1, 0)


def put(key: bytes, rev: int, value: bytes = b"v", create: int | None = None) -> Event:
    return Event(EventType.PUT, kv(key, rev, value, create))


def delete(key: bytes, rev: int) -> Event:
    return Event(EventType.DELETE, KeyValue(key, b"", 0, rev, 0, 0))


def summary(change: Change | None) -> tuple | None:
    """(revision, added, changed, removed) as sorted key lists."""
    if change is None:
        return None
    return (change.revision, sorted(change.added), sorted(change.changed),
            sorted(change.removed))


def loaded(*kvs: KeyValue, revision: int = 10, keep=None) -> MirrorState:
    state = MirrorState(keep) if keep else MirrorState()
    state.load(revision, [list(kvs)])
    return state


# -- the state: loads ---------------------------------------------------------------------------


@pytest.mark.parametrize(("old", "pages", "expected"), [
    # first load: every key is added
    (None, [[kv(b"a", 3), kv(b"b", 4)]], (10, [b"a", b"b"], [], [])),
    (None, [], (10, [], [], [])),
    # pages of one read are one state
    (None, [[kv(b"a", 3)], [kv(b"b", 4)], []], (10, [b"a", b"b"], [], [])),
    # resync: unchanged keys are no change; a moved mod revision is (an equal value too)
    ([kv(b"a", 3), kv(b"b", 4)], [[kv(b"a", 3), kv(b"b", 8)]], (10, [], [b"b"], [])),
    ([kv(b"a", 3), kv(b"b", 4)], [[kv(b"a", 3)]], (10, [], [], [b"b"])),
    ([kv(b"a", 3)], [[kv(b"a", 3), kv(b"c", 9)]], (10, [b"c"], [], [])),
    # deleted and created again while away: changed
    ([kv(b"a", 3)], [[kv(b"a", 9, create=9)]], (10, [], [b"a"], [])),
    ([kv(b"a", 3), kv(b"b", 4)], [], (10, [], [], [b"a", b"b"])),
])
def test_load(old, pages, expected):
    state = loaded(*old, revision=5) if old is not None else MirrorState()
    change = state.load(10, pages)
    assert summary(change) == expected
    assert change.resync is (old is not None) and change.first is (old is None)
    assert change.previous_revision == (5 if old is not None else 0)
    assert state.revision == 10 and state.loaded
    assert dict(state.entries) == {x.key: x for page in pages for x in page}


def test_load_drops_buffered_events_it_covers():
    state = loaded(kv(b"a", 3), revision=5)
    state.add([put(b"a", 6), put(b"b", 11)])
    state.load(10, [[kv(b"a", 6)]])
    assert [e.revision for e in state.pending] == [11]


# -- the state: events, a revision at a time ------------------------------------------------------


@pytest.mark.parametrize(("events", "expected"), [
    # one transaction: one change, its puts and deletes together
    ([put(b"a", 11), put(b"c", 11), delete(b"b", 11)],
     [(11, [b"c"], [b"a"], [b"b"])]),
    # a catch-up: several revisions in one response, one change each, in order
    ([put(b"a", 11), delete(b"a", 12), put(b"a", 13, create=13)],
     [(11, [], [b"a"], []), (12, [], [], [b"a"]), (13, [b"a"], [], [])]),
    # a delete of a key the view does not hold (e.g. created and deleted while away):
    # a change with nothing in it
    ([delete(b"zz", 11)], [(11, [], [], [])]),
    # created and deleted within one revision: no key touched
    ([put(b"n", 11), delete(b"n", 11)], [(11, [], [], [])]),
    # events at or before the view's revision (confirmed by a progress check) are skipped
    ([put(b"a", 9), put(b"b", 10), put(b"c", 12)], [(12, [b"c"], [], [])]),
    ([], []),
])
def test_next_change_groups_a_revisions_events(events, expected):
    state = loaded(kv(b"a", 3), kv(b"b", 4))
    state.add(events)
    changes = []
    while (change := state.next_change()) is not None:
        changes.append(change)
    assert [summary(c) for c in changes] == expected
    assert [c.previous_revision for c in changes] == [10, *[c.revision for c in changes]][
        :len(changes)]
    assert not state.pending
    if changes:
        assert state.revision == changes[-1].revision


def test_state_follows_the_events():
    state = loaded(kv(b"a", 3), kv(b"b", 4))
    state.add([put(b"a", 11, b"new"), delete(b"b", 11), put(b"c", 12)])
    while state.next_change():
        pass
    assert dict(state.entries) == {b"a": kv(b"a", 11, b"new"), b"c": kv(b"c", 12)}


def test_change_keeps_what_was_there_before():
    state = loaded(kv(b"a", 3, b"old"), kv(b"b", 4))
    state.add([put(b"a", 11, b"new"), delete(b"b", 11)])
    change = state.next_change()
    assert change.before == {b"a": kv(b"a", 3, b"old"), b"b": kv(b"b", 4)}
    assert change.after == {b"a": kv(b"a", 11, b"new")}
    assert change.removed == {b"b": kv(b"b", 4)} and bool(change)


@pytest.mark.parametrize(("revision", "expected"), [(9, None), (10, None), (15, 15)])
def test_advance(revision, expected):
    state = loaded(kv(b"a", 3))
    change = state.advance(revision)
    assert (None if change is None else change.revision) == expected
    assert state.revision == max(10, revision)
    assert change is None or not change


def test_keep_decides_the_entries():
    state = loaded(kv(b"a", 3), keep=lambda kv: kv.mod_revision)
    assert dict(state.entries) == {b"a": 3}
    change = state.load(20, [[kv(b"a", 3, b"other value, same revision"), kv(b"b", 7)]])
    assert summary(change) == (20, [b"b"], [], [])
    assert change.before == {} and change.after == {b"b": kv(b"b", 7)}


# -- the state: undo, views -----------------------------------------------------------------------


@pytest.mark.parametrize("transition", [
    lambda s: s.load(20, [[kv(b"a", 15), kv(b"x", 16)]]),
    lambda s: (s.add([put(b"a", 11), delete(b"b", 11), put(b"x", 11)]), s.next_change())[1],
    lambda s: s.advance(30),
])
def test_undo_takes_the_last_change_back(transition):
    state = loaded(kv(b"a", 3), kv(b"b", 4))
    before = dict(state.entries)
    state.undo(transition(state))
    assert dict(state.entries) == before and state.revision == 10 and state.loaded


def test_undo_of_the_first_load():
    state = MirrorState()
    state.undo(state.load(5, [[kv(b"a", 3)]]))
    assert not state.loaded and state.revision == 0 and not state.entries


def test_views_are_immutable_and_copied_on_write():
    state = loaded(kv(b"a", 3))
    first = state.view()
    assert isinstance(first, View) and first.revision == 10 and state.view() is first
    live = state.entries
    state.add([put(b"b", 11)])
    state.next_change()
    assert dict(first) == {b"a": kv(b"a", 3)} and first.revision == 10
    assert set(live) == {b"a"}  # the live view of the old dict: a new one was made
    second = state.view()
    assert set(second) == {b"a", b"b"} and second.revision == 11
    state.advance(12)
    third = state.view()
    assert third.revision == 12 and third is not second and dict(third) == dict(second)
    with pytest.raises(TypeError):
        first[b"a"] = kv(b"a", 1)  # type: ignore[index]


def test_without_views_changes_are_made_in_place():
    state = loaded(kv(b"a", 3))
    live = state.entries
    state.add([put(b"b", 11)])
    state.next_change()
    assert set(live) == {b"a", b"b"}  # no view was handed out: no copy


# -- invoke: plain and async callbacks ------------------------------------------------------------


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)
    for event in events:
        if event.get("log_failure") is not None:
            event["log_failure"].cleanFailure()


def _failures(events):
    return [e for e in events if e.get("log_failure") is not None]


def test_invoke_logs_plain_and_async_failures_with_the_value(logged):
    started = []

    def plain(value):
        raise RuntimeError("plain")

    async def coroutine(value):
        started.append(value)
        await defer.succeed(None)
        raise KeyError("async")

    def deferred(value):
        return defer.fail(ValueError("deferred"))

    for callback in (plain, coroutine, deferred):
        invoke(callback, 42, "{cb!r} raised on {value!r}", cb=callback, value=42)
    assert started == [42]  # started at once, not awaited
    failures = _failures(logged)
    assert [f["log_failure"].type for f in failures] == [RuntimeError, KeyError, ValueError]
    assert all(f["value"] == 42 for f in failures)


def test_invoke_does_not_wait_for_a_coroutine():
    gate = defer.Deferred()
    seen = []

    async def slow(value):
        await gate
        seen.append(value)

    invoke(slow, 1, "x")
    invoke(slow, 2, "x")
    assert seen == []
    gate.callback(None)
    assert seen == [1, 2]


def test_invoke_lets_base_exceptions_through():
    class Fatal(BaseException):
        pass

    def fatal(value):
        raise Fatal()

    with pytest.raises(Fatal):
        invoke(fatal, 1, "x")


# -- the I/O, against etcd -------------------------------------------------------------------------

P = b"mir/"


class Recorder:
    """A mirror of P whose changes and end are recorded."""

    def __init__(self, client, **kwargs):
        self.changes: list[Change] = []
        self.ends: list = []
        self.mirror = Mirror(client, KeySet(P, prefix=True), self.changes.append,
                             self.ends.append, lambda: RuntimeError("closed"), **kwargs)

    async def etcd_state(self, client, revision=None):
        result = await client.get(KeySet(P, prefix=True), revision=revision)
        return {x.key: x for x in result.kvs}


@pytest_twisted.ensureDeferred
async def test_read_then_watch_one_change_per_revision(pool_client):
    await pool_client.set(b"mir/a", b"1")
    rec = Recorder(pool_client, page_size=1)
    await pool_client.set(b"mir/b", b"2")
    await rec.mirror.start()
    try:
        (first,) = rec.changes
        assert first.first and set(first.added) == {b"mir/a", b"mir/b"}
        assert rec.mirror.phase is MirrorPhase.WATCHING and rec.mirror.watch is not None
        txn = await pool_client.submit(Transaction(success=[
            OpSet(b"mir/a", b"10"), OpDel(b"mir/b"), OpSet(b"mir/c", b"3"),
            OpSet(b"elsewhere", b"x")]))
        await wait_until(lambda: len(rec.changes) == 2)
        change = rec.changes[1]
        assert summary(change) == (txn.header.revision, [b"mir/c"], [b"mir/a"], [b"mir/b"])
        assert dict(rec.mirror.state.entries) == await rec.etcd_state(pool_client)
    finally:
        rec.mirror.close()
    assert rec.mirror.phase is MirrorPhase.CLOSED and rec.mirror.watch is None
    assert rec.ends == []  # closed by its owner: on_end is not called


@pytest_twisted.ensureDeferred
async def test_compacted_is_one_resync_change(etcd_factory):
    server = etcd_factory()
    client = Client(reactor, server.url, timeout=5)
    rec = Recorder(client)
    try:
        await client.submit(Transaction(success=[OpSet(b"mir/%d" % i, b"0") for i in range(3)]))
        await rec.mirror.start()
        await rec.mirror.watch.watcher.ready
        server.restart()  # the stream breaks; write and compact before it resumes
        for key, value in ((b"mir/0", b"9"), (b"mir/7", b"7")):
            server.post("/v3/kv/put", {"key": b64encode(key).decode(),
                                       "value": b64encode(value).decode()})
        server.post("/v3/kv/deleterange", {"key": b64encode(b"mir/1").decode()})
        rev = int(server.post("/v3/kv/range", {"key": "eA=="})["header"]["revision"])
        server.post("/v3/kv/compaction", {"revision": rev, "physical": True})
        await wait_until(lambda: rec.mirror.resyncs == 1, timeout=20)
        change = rec.changes[-1]
        assert change.resync and change.revision >= rev
        assert summary(change)[1:] == ([b"mir/7"], [b"mir/0"], [b"mir/1"])
        await wait_until(lambda: rec.mirror.phase is MirrorPhase.WATCHING)
        rev = (await client.set(b"mir/8", b"8")).revision
        await wait_until(lambda: rec.changes[-1].revision == rev, timeout=10)
        assert dict(rec.mirror.state.entries) == await rec.etcd_state(client)
    finally:
        rec.mirror.close()
        await client.close()


class ScriptedClient(Client):
    """A Client whose range reads fail with the errors in ``failures`` first."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.failures: list[Exception] = []

    def get(self, key, **kwargs):
        if self.failures:
            return defer.fail(self.failures.pop(0))
        return super().get(key, **kwargs)


@pytest_twisted.ensureDeferred
async def test_unavailable_is_retried_after_a_pause(etcd):
    client = ScriptedClient(reactor, etcd.url)
    rec = Recorder(client, retry_first_read=True)
    try:
        client.failures = [Unavailable("simulated"), Unavailable("simulated")]
        t0 = reactor.seconds()
        await rec.mirror.start()
        assert reactor.seconds() - t0 >= 0.1  # two pauses, the second longer
        assert not client.failures and rec.changes[0].first and rec.mirror.resyncs == 0
    finally:
        rec.mirror.close()
        await client.close()


@pytest_twisted.ensureDeferred
async def test_the_first_read_fails_start_without_retry_first_read(etcd):
    client = ScriptedClient(reactor, etcd.url)
    rec = Recorder(client)
    try:
        client.failures = [Unavailable("simulated")]
        with pytest.raises(Unavailable):
            await rec.mirror.start()
        assert rec.mirror.phase is MirrorPhase.NEW and rec.mirror.task is None
        await rec.mirror.start()  # may be started again
        assert rec.mirror.phase is MirrorPhase.WATCHING
    finally:
        rec.mirror.close()
        await client.close()


@pytest_twisted.ensureDeferred
async def test_an_incurable_error_ends_the_mirror(etcd):
    client = ScriptedClient(reactor, etcd.url)
    rec = Recorder(client, retry_first_read=True)
    try:
        client.failures = [PermissionDenied("simulated")]
        with pytest.raises(PermissionDenied):
            await rec.mirror.start()  # not retried
        await rec.mirror.start()
        # Later: a watch that etcd refuses ends the mirror, which says why.
        waiting = rec.mirror.wait(lambda: (False, None), None, "never")
        rec.mirror.watch.errback(PermissionDenied("watch refused"))
        await wait_until(lambda: rec.ends)
        (error,) = rec.ends
        assert isinstance(error, PermissionDenied) and str(error) == "watch refused"
        assert rec.mirror.phase is MirrorPhase.CLOSED
        with pytest.raises(RuntimeError, match="closed"):
            await waiting
    finally:
        rec.mirror.close()
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_change_the_consumer_cannot_take_is_undone_and_read_afresh(pool_client):
    taken = []

    def on_change(change):
        if len(taken) == 1 and not change.resync:
            taken.append("refused")
            raise RuntimeError("consumer bug")
        taken.append(change)

    mirror = Mirror(pool_client, KeySet(P, prefix=True), on_change, lambda e: None,
                    lambda: RuntimeError("closed"))
    await mirror.start()
    try:
        rev = (await pool_client.set(b"mir/a", b"1")).revision
        await wait_until(lambda: len(taken) == 3, timeout=10)
        assert taken[1] == "refused"
        resync = taken[2]
        assert resync.resync and set(resync.added) == {b"mir/a"} and resync.revision >= rev
        assert mirror.resyncs == 1
    finally:
        mirror.close()


@pytest_twisted.ensureDeferred
async def test_closing_the_client_ends_the_mirror(etcd):
    client = Client(reactor, etcd.url)
    rec = Recorder(client)
    await rec.mirror.start()
    await client.close()
    await wait_until(lambda: rec.ends == [None])
    assert rec.mirror.phase is MirrorPhase.CLOSED


@pytest_twisted.ensureDeferred
async def test_wait_for_a_revision_elsewhere_is_confirmed_with_etcd(pool_client):
    rec = Recorder(pool_client)
    await rec.mirror.start()
    try:
        elsewhere = (await pool_client.set(b"elsewhere", b"1")).revision
        mirror = rec.mirror
        got = await mirror.wait(lambda: (mirror.revision >= elsewhere, mirror.revision), 10,
                                "the revision", elsewhere)
        assert got >= elsewhere and len(rec.changes) == 2 and not rec.changes[1]
        # a wait for a count, as a barrier would
        d = mirror.wait(lambda: (len(mirror.state.entries) >= 2, None), 10, "two keys")
        await pool_client.set(b"mir/1", b"")
        await sleep(0.1)
        assert not d.called
        await pool_client.set(b"mir/2", b"")
        await d
        assert not mirror.waiters
    finally:
        rec.mirror.close()


# -- recipes on the mirror: async observe callbacks -----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_async_observe_callback_is_started_not_awaited(pool_client, logged):
    from coord.recipes.election import observe

    gate = defer.Deferred()
    started, finished = [], []

    async def report(leader):
        started.append(leader)
        await gate
        finished.append(leader)
        raise RuntimeError("async observer bug")

    observation = observe(pool_client, b"obs-async", report)
    try:
        assert await observation.ready is None
        await pool_client.set(b"obs-async/1", b"me")
        await wait_until(lambda: len(started) == 2)
        assert started[0] is None and started[1].value == b"me" and finished == []
        gate.callback(None)
        assert finished == started
        failures = _failures(logged)
        assert [f["state"] for f in failures] == started  # logged with the state given
        assert not observation.done.called
    finally:
        observation.close()
