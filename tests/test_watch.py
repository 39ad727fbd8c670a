"""Watches against real etcd: exactly-once delivery across restarts and failover."""

from __future__ import annotations

import gc

import pytest
import pytest_twisted
from helpers import dead_url, preferred_url, sleep, wait_until
from twisted.internet import defer, protocol, reactor, tcp

from coord import (
    Compacted,
    EtcdError,
    EventType,
    InvalidArgument,
    KeySet,
    OpSet,
    OutcomeUnknown,
    Timeout,
    Transaction,
    Unavailable,
)
from coord.testing import HEADER, HOLD, answer


def sockets_to(url):
    """The client sockets of this process still connected to ``url``'s port."""
    port = int(url.rsplit(":", 1)[1])
    return [o for o in gc.get_objects()
            if isinstance(o, tcp.Client) and o.connected and not o.disconnected
            and o.getPeer().port == port]


def sig(event):
    return (event.type, event.kv.key, event.kv.value, event.kv.mod_revision)


@pytest_twisted.ensureDeferred
async def test_events_types_and_prev_kv(client):
    seen = []
    d = client.watch([KeySet(b"w/", prefix=True)], seen.append, return_previous=True)
    await d.watcher.ready
    r1 = await client.set(b"w/a", b"1")
    r2 = await client.set(b"w/a", b"2")
    await client.set(b"other", b"x")
    r3 = (await client.delete(b"w/a")).header.revision
    await wait_until(lambda: len(seen) == 3)
    assert [e.type for e in seen] == [EventType.PUT, EventType.PUT, EventType.DELETE]
    assert [e.revision for e in seen] == [r1.revision, r2.revision, r3]
    assert seen[0].prev_kv is None
    assert seen[1].prev_kv.value == b"1"
    assert seen[2].kv.key == b"w/a" and seen[2].prev_kv.value == b"2"
    d.cancel()
    assert await d is None


@pytest_twisted.ensureDeferred
async def test_filters_and_start_revision(client):
    first = await client.set(b"f/a", b"1")
    await client.set(b"f/a", b"2")
    await client.delete(b"f/a")
    puts, deletes = [], []
    d1 = client.watch(KeySet(b"f/", prefix=True), puts.append, start_revision=first.revision,
                      filters=["nodelete"])
    d2 = client.watch([b"f/a"], deletes.append, start_revision=first.revision,
                      filters=["noput"])
    await wait_until(lambda: len(puts) == 2 and len(deletes) == 1)
    assert [e.kv.value for e in puts] == [b"1", b"2"]
    assert deletes[0].type is EventType.DELETE
    d1.cancel()
    d2.cancel()
    with pytest.raises(InvalidArgument):
        client.watch(b"f/a", puts.append, filters=["nothing"])


@pytest_twisted.ensureDeferred
async def test_several_keysets_one_stream(client):
    seen = []
    d = client.watch([b"one", KeySet(b"two/", prefix=True), KeySet(b"x", b"z")], seen.append)
    await d.watcher.ready
    for key in [b"one", b"two/1", b"y", b"zz", b"other"]:
        await client.set(key, b"v")
    await wait_until(lambda: len(seen) == 3)
    await sleep(0.1)
    assert sorted(e.kv.key for e in seen) == [b"one", b"two/1", b"y"]
    d.cancel()


@pytest_twisted.ensureDeferred
async def test_large_value_and_many_events_in_one_response(client):
    seen = []
    d = client.watch(KeySet(b"big/", prefix=True), seen.append)
    await d.watcher.ready
    value = bytes(range(256)) * 4096  # 1 MiB
    await client.set(b"big/1", value)
    from coord import OpSet, Transaction
    await client.submit(Transaction(success=[OpSet(b"big/t%03d" % i, b"x" * 1000)
                                             for i in range(100)]))
    await wait_until(lambda: len(seen) == 101)
    assert seen[0].kv.value == value
    # One transaction = one revision: its 100 events arrive together.
    assert len({e.revision for e in seen[1:]}) == 1
    d.cancel()


@pytest_twisted.ensureDeferred
async def test_callback_exception_is_logged_and_watch_goes_on(client):
    from twisted.logger import globalLogPublisher

    logged = []
    globalLogPublisher.addObserver(logged.append)
    seen = []

    def on_change(event):
        seen.append(event)
        if event.kv.value == b"boom":
            raise ValueError("callback bug")

    d = client.watch(b"k", on_change)
    try:
        await d.watcher.ready
        await client.set(b"k", b"boom")
        await client.set(b"k", b"fine")
        await wait_until(lambda: len(seen) == 2)
        assert [e.kv.value for e in seen] == [b"boom", b"fine"]
        failures = [e for e in logged if e.get("log_failure") is not None
                    and e["log_failure"].check(ValueError)]
        assert failures and b"boom" in repr(failures[0]["event"]).encode()
        for event in failures:  # handled: keep the test's error reporting quiet
            event["log_failure"].cleanFailure()
        assert not d.called
    finally:
        globalLogPublisher.removeObserver(logged.append)
        d.cancel()


@pytest_twisted.ensureDeferred
async def test_cancel_stops_delivery_and_closes_stream(etcd, client, transport):
    seen = []
    d = client.watch(b"k", seen.append)
    await d.watcher.ready
    await client.set(b"k", b"1")
    await wait_until(lambda: len(seen) == 1)
    watching = len(sockets_to(etcd.url))
    d.cancel()
    # Its connection is closed (through treq it was not: treq's collect() has no canceller).
    await wait_until(lambda: len(sockets_to(etcd.url)) == watching - 1, timeout=2)
    assert d.called and await d is None
    assert d.watcher._stream is None
    assert not client._transport._streams
    await client.set(b"k", b"2")
    await sleep(0.2)
    assert len(seen) == 1
    if transport == "pool":
        # The stream's own connection is gone (the pool only has the unary one).
        pool = client._transport._pools[0]
        assert all(conn.stream is None for conn in pool.all)


@pytest_twisted.ensureDeferred
async def test_compacted_start_revision_is_surfaced(client):
    first = await client.set(b"c", b"1")
    await client.set(b"c", b"2")
    third = await client.set(b"c", b"3")
    await client.compact(third.revision, physical=True)
    seen = []
    d = client.watch(b"c", seen.append, start_revision=first.revision)
    with pytest.raises(Compacted) as info:
        await d
    assert info.value.compact_revision == third.revision
    assert seen == []
    stream = client.events(b"c", start_revision=first.revision)
    with pytest.raises(Compacted):
        async for _ in stream:
            pass


@pytest_twisted.ensureDeferred
async def test_async_iterator(client):
    base = await client.set(b"it/0", b"0")
    for i in range(1, 5):
        await client.set(b"it/%d" % i, b"%d" % i)
    got = []
    async with client.events(KeySet(b"it/", prefix=True), start_revision=base.revision) as events:
        async for event in events:
            got.append(event.kv.value)
            if len(got) == 5:
                break
    assert got == [b"0", b"1", b"2", b"3", b"4"]


async def _writer(client, prefix, count, stop_after=None):
    """Puts and deletes under ``prefix``; writes whose outcome is unknown are tolerated."""
    done = 0
    while done < count:
        key = prefix + b"%d" % (done % 50)
        try:
            if done % 7 == 6:
                await client.delete(key)
            else:
                await client.set(key, b"%d" % done)
        except (OutcomeUnknown, Unavailable, Timeout):
            await sleep(0.05)
        done += 1


async def _ground_truth(client, prefix, start, end):
    """Every event in [start, end] from a fresh watch: etcd's own history."""
    truth = []
    d = client.watch(KeySet(prefix, prefix=True), truth.append, start_revision=start)
    await wait_until(lambda: truth and truth[-1].revision >= end, timeout=30)
    d.cancel()
    return [e for e in truth if e.revision <= end]


def _check_exactly_once(seen, truth):
    revisions = [e.revision for e in seen]
    assert revisions == sorted(revisions), "events out of order"
    assert len({sig(e) for e in seen}) == len(seen), "duplicate events"
    assert [sig(e) for e in seen] == [sig(e) for e in truth]


@pytest_twisted.ensureDeferred
@pytest.mark.slow
async def test_exactly_once_across_two_restarts(etcd_factory, new_client):
    server = etcd_factory()
    writer = new_client(server.url, timeout=5)
    watcher = new_client(server.url)
    seen = []
    start = (await writer.set(b"start", b"")).revision
    d = watcher.watch(KeySet(b"p/", prefix=True), seen.append, start_revision=start + 1)
    await d.watcher.ready
    restarts = []

    def restart():
        server.restart()
        restarts.append(1)

    reactor.callLater(1.0, restart)
    reactor.callLater(2.5, restart)
    await _writer(writer, b"p/", 5000)
    await wait_until(lambda: len(restarts) == 2, timeout=30)
    end = (await writer.set(b"p/end", b"")).revision
    truth = await _ground_truth(writer, b"p/", start + 1, end)
    await wait_until(lambda: seen and seen[-1].revision >= truth[-1].revision, timeout=30)
    d.cancel()
    assert d.watcher.reconnects >= 2
    assert len(truth) >= 4000
    _check_exactly_once(seen, truth)


@pytest_twisted.ensureDeferred
@pytest.mark.slow
async def test_exactly_once_when_the_watched_member_dies(etcd_cluster, new_client):
    writer = new_client(etcd_cluster.urls, timeout=5)
    watcher = new_client(etcd_cluster.urls)
    seen = []
    start = (await writer.set(b"start", b"")).revision
    d = watcher.watch(KeySet(b"p/", prefix=True), seen.append, start_revision=start + 1)
    await d.watcher.ready
    watched = d.watcher._stream.endpoint.url
    member = next(m for m in etcd_cluster.members if m.url == watched)
    reactor.callLater(0.5, member.kill)
    await _writer(writer, b"p/", 1500)
    end = (await writer.set(b"p/end", b"")).revision
    truth = await _ground_truth(writer, b"p/", start + 1, end)
    await wait_until(lambda: seen and seen[-1].revision >= truth[-1].revision, timeout=30)
    d.cancel()
    assert d.watcher.reconnects >= 1
    assert d.watcher._stream is None
    _check_exactly_once(seen, truth)


@pytest_twisted.ensureDeferred
async def test_hung_stream_is_noticed_and_resumed(etcd_cluster, new_client):
    watcher = new_client(etcd_cluster.urls)
    seen = []
    d = watcher.watch(b"k", seen.append, idle_timeout=1.0)
    await d.watcher.ready
    watched = d.watcher._stream.endpoint.url
    member = next(m for m in etcd_cluster.members if m.url == watched)
    member.pause()  # the connection stays open; nothing comes through
    try:
        others = [m.url for m in etcd_cluster.members if m is not member]
        other_writer = new_client(others, timeout=5)
        for _ in range(50):
            try:
                await other_writer.set(b"k", b"after-pause")
                break
            except (Unavailable, Timeout):
                await sleep(0.2)
        await wait_until(lambda: any(e.kv.value == b"after-pause" for e in seen), timeout=20)
        assert d.watcher.reconnects >= 1
    finally:
        member.resume()
        d.cancel()


@pytest_twisted.ensureDeferred
async def test_cancel_inside_the_callback_stops_the_rest_of_the_batch(client):
    seen = []

    def on_change(event):
        seen.append(event)
        d.cancel()

    d = client.watch(KeySet(b"b/", prefix=True), on_change)
    await d.watcher.ready
    # One transaction: three events of one revision, delivered in one response.
    await client.submit(Transaction(success=[OpSet(b"b/1", b"1"), OpSet(b"b/2", b"2"),
                                             OpSet(b"b/3", b"3")]))
    assert await d is None
    assert [e.kv.key for e in seen] == [b"b/1"]


@pytest_twisted.ensureDeferred
async def test_client_close_ends_its_watches(etcd, new_client):
    watching = new_client(etcd.url)
    d = watching.watch(b"k", lambda e: None)
    stream = watching.events(b"k")
    await d.watcher.ready
    await stream.ready
    await watching.close()
    assert await d is None  # as if cancelled: nothing to handle
    assert d.watcher._stream is None
    async for _ in stream:
        raise AssertionError("no event after close")
    assert not [c for c in reactor.getDelayedCalls()
                if getattr(c.func, "__self__", None) in (d.watcher, stream.watcher)]
    await wait_until(lambda: not sockets_to(etcd.url), timeout=2)  # the streams' too
    # A watch asked of a closed client ends at once, without a connection attempt.
    late = watching.watch(b"k", lambda e: None)
    assert late.called and await late is None


@pytest_twisted.ensureDeferred
async def test_client_close_while_a_watch_waits_to_reconnect(etcd_factory, new_client):
    server = etcd_factory()
    watching = new_client(server.url)
    d = watching.watch(b"k", lambda e: None)
    await d.watcher.ready
    server.kill()
    await wait_until(lambda: d.watcher._retry is not None)  # a reconnect is scheduled
    await watching.close()
    assert await d is None
    assert d.watcher._retry is None or not d.watcher._retry.active()
    server.restart()
    await sleep(0.3)
    assert d.watcher._stream is None  # no stream came back


@pytest_twisted.ensureDeferred
async def test_a_paused_event_stream_is_not_restarted_by_its_idle_timer(etcd, pool_client):
    first = (await pool_client.set(b"q/0", b"x" * 1000)).revision
    for i in range(1, 20):
        await pool_client.set(b"q/%d" % i, b"x" * 1000)
    async with pool_client.events(KeySet(b"q/", prefix=True), start_revision=first,
                                  idle_timeout=0.5) as events:
        events._high_water = 5
        await events.ready
        await sleep(1.5)  # not consuming: reading from etcd is paused
        assert events._paused, (len(events._queue), events.watcher)
        assert events.watcher.reconnects == 0, events.watcher
        got = []
        async for event in events:
            got.append(event.kv.key)
            if len(got) == 20:
                break
    assert got == [b"q/%d" % i for i in range(20)]


@pytest_twisted.ensureDeferred
async def test_a_quiet_watch_on_a_live_member_is_kept(client):
    seen = []
    d = client.watch(b"quiet", seen.append, idle_timeout=0.3)
    await d.watcher.ready
    stream = d.watcher._stream
    await sleep(1.5)  # several idle periods: each probe finds the member alive
    assert d.watcher.reconnects == 0
    assert d.watcher._stream is stream
    await client.set(b"quiet", b"now")
    await wait_until(lambda: len(seen) == 1)
    d.cancel()


# -- a watch that cannot succeed says so; one of a client that reached etcd resumes -------


class _NotEtcd(protocol.Protocol):
    """Answers once the whole request (head and Content-Length body) has come."""

    buffer = b""

    def dataReceived(self, data):
        self.buffer += data
        head, sep, body = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(body) >= length:
            self.transport.write(self.factory.answer)
            self.transport.loseConnection()


@pytest.fixture
def not_etcd():
    """``not_etcd(answer)``: the URL of a loopback server that answers every request with
    the bytes ``answer`` and hangs up."""
    ports = []

    def start(answer):
        factory = protocol.Factory.forProtocol(_NotEtcd)
        factory.answer = answer
        ports.append(reactor.listenTCP(0, factory, interface="127.0.0.1"))
        return f"http://127.0.0.1:{ports[-1].getHost().port}"

    yield start
    for port in ports:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest.mark.parametrize(
    ("server", "error"),
    [
        ("refused", Unavailable),  # nothing listens
        ("not HTTP", Unavailable),  # another protocol
        ("HTML 404", EtcdError),  # a web server
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_watch_that_cannot_succeed_fails_as_a_call_does(new_client, not_etcd,
                                                                server, error):
    if server == "refused":
        urls = [dead_url(), dead_url()]
    elif server == "not HTTP":
        urls = [not_etcd(b"SSH-2.0-OpenSSH_9.2\r\n")]
    else:
        urls = [not_etcd(b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\n"
                         b"Connection: close\r\nContent-Length: 9\r\n\r\n<h1>?</h1")]
    client = new_client(urls)
    with pytest.raises(error) as call_error:
        await client.get(b"k")
    d = client.watch(b"k", lambda e: None)
    started = reactor.seconds()
    with pytest.raises(error) as info:
        await d
    assert reactor.seconds() - started < 5  # at once, not never
    assert type(info.value) is type(call_error.value)
    with pytest.raises(error):
        await d.watcher.ready  # ready fails too: it never fires for a watch that failed
    if server == "refused":
        assert "no endpoint could serve it" in str(info.value)
        assert all(url in str(info.value) for url in urls)


@pytest_twisted.ensureDeferred
async def test_a_watch_of_a_client_that_reached_etcd_waits_out_an_outage(etcd_factory,
                                                                         new_client):
    server = etcd_factory()
    client = new_client(server.url, timeout=5)
    await client.set(b"k", b"1")
    server.stop()  # an outage: the watch is made while nothing answers
    seen = []
    d = client.watch(b"k", seen.append)
    await sleep(1.5)
    assert not d.called and d.watcher.reconnects >= 2  # still trying
    server.restart()
    await d.watcher.ready
    await client.set(b"k", b"2")
    await wait_until(lambda: [e.kv.value for e in seen] == [b"2"])
    d.cancel()
    await d


# -- bad arguments: refused at watch() / events(), before a stream is opened --------------------


def live_watchers(client):
    """The client's live Watchers (looks inside: a refused watch must have made none)."""
    return client._watchers


class Callback:
    def __call__(self, event):
        pass


@pytest.mark.parametrize(("on_change", "exc"), [
    (None, TypeError), (42, TypeError), ("print", TypeError), ([print], TypeError)])
@pytest_twisted.ensureDeferred
async def test_on_change_that_cannot_be_called_is_refused(client, on_change, exc):
    # Before: each event raised inside the stream reader and was skipped, silently.
    with pytest.raises(exc, match="on_change must be callable"):
        client.watch(b"k", on_change)
    assert live_watchers(client) == set()  # no Watcher made, no stream opened


@pytest.mark.parametrize(("idle_timeout", "exc"), [
    (0, InvalidArgument),  # before: ~3,000 status requests a second against etcd
    (-1, InvalidArgument), (float("nan"), InvalidArgument), (-float("inf"), InvalidArgument),
    ("60", TypeError), (True, TypeError)])
@pytest.mark.parametrize("api", ["watch", "events"])
@pytest_twisted.ensureDeferred
async def test_bad_idle_timeouts_are_refused(client, api, idle_timeout, exc):
    with pytest.raises(exc, match="idle_timeout"):
        if api == "watch":
            client.watch(b"k", print, idle_timeout=idle_timeout)
        else:
            client.events(b"k", idle_timeout=idle_timeout)
    assert live_watchers(client) == set()


@pytest.mark.parametrize(("call", "exc"), [
    (lambda c: c.watch([], print), InvalidArgument),
    (lambda c: c.watch(b"", print), InvalidArgument),
    (lambda c: c.watch(None, print), TypeError),
    (lambda c: c.watch(b"k", print, start_revision=-1), InvalidArgument),
    (lambda c: c.watch(b"k", print, start_revision="5"), TypeError),
    (lambda c: c.watch(b"k", print, filters=["noget"]), InvalidArgument),
    (lambda c: c.events(b"k", start_revision=1.5), TypeError),
])
@pytest_twisted.ensureDeferred
async def test_other_bad_watch_arguments_are_refused(client, call, exc):
    with pytest.raises(exc):
        call(client)
    assert live_watchers(client) == set()


@pytest.mark.parametrize("idle_timeout", [None, float("inf"), 0.5, 60])
@pytest_twisted.ensureDeferred
async def test_no_limit_and_finite_idle_timeouts_are_taken(client, idle_timeout):
    d = client.watch(b"k", Callback(), idle_timeout=idle_timeout)
    await d.watcher.ready
    assert d.watcher.idle_timeout == (None if idle_timeout in (None, float("inf"))
                                      else idle_timeout)


# -- watches across hung and slow members -------------------------------------------


@pytest.fixture
def slow_member(path_gateway):
    """``slow_member(delay)`` -> (url, helpers.PathGateway): a member that accepts
    connections and never answers a watch; a unary request gets a bare header after
    ``delay`` seconds (None: never)."""

    def start(delay):
        return path_gateway(lambda path: HOLD if path == "/v3/watch" or delay is None
                            else answer(delay, body={"header": HEADER}))

    return start


@pytest_twisted.ensureDeferred
async def test_a_watch_left_on_a_hung_member_moves_when_a_member_is_back(
        etcd_factory, new_client, slow_member):
    # Both members stop answering: the watch moves off the real one (its check fails) to
    # the hung one, demoted longest ago.  When the real one answers its probes again it
    # is preferred again -- and the watch must come back to it, not stay on the hung
    # member until its idle timeout (60 s).
    url_h, h = slow_member(None)
    server = etcd_factory()
    client = new_client([url_h, server.url], attempt_timeout=0.3, timeout=5)
    writer = new_client(server.url, timeout=5)
    await client.get(b"k")  # h does not answer: demoted; the server answers
    seen = []
    d = client.watch(b"k", seen.append)
    await d.watcher.ready
    server.pause()
    try:
        await wait_until(lambda: h.count("/v3/watch") > 0, timeout=6)
    finally:
        server.resume()
    await wait_until(lambda: preferred_url(client) == server.url, timeout=10)
    await writer.set(b"k", b"after")
    try:
        await wait_until(lambda: [e.kv.value for e in seen] == [b"after"], timeout=4)
    finally:
        d.cancel()


@pytest_twisted.ensureDeferred
async def test_a_fresh_watch_is_not_failed_by_slow_members(new_client, slow_member):
    # Two members answer after 1 s (attempt deadline 0.3 s): a read moves from the first
    # to the second and waits there for its answer -- it succeeds.  A watch made at the
    # same time must not fail as "no endpoint could serve it": no endpoint refused it.
    url_a, _ = slow_member(1.0)
    url_b, _ = slow_member(1.0)
    client = new_client([url_a, url_b], attempt_timeout=0.3, timeout=5)
    d = client.watch(b"k", lambda e: None)
    await client.get(b"k")  # a call succeeds
    await sleep(0.1)
    assert not d.called, d.result
    d.cancel()
    await d


# -- async on_change: run for every event, in order, failures logged -----------------------------


@pytest_twisted.ensureDeferred
async def test_async_on_change_is_run_for_every_event_and_its_failure_logged(client):
    from twisted.internet import defer
    from twisted.logger import globalLogPublisher

    logged = []
    globalLogPublisher.addObserver(logged.append)
    started, finished = [], []
    gate = defer.Deferred()

    async def on_change(event):
        started.append(event.kv.value)
        await gate  # not awaited by the watch: the next events start meanwhile
        if event.kv.value == b"boom":
            raise ValueError("async callback bug")
        finished.append(event.kv.value)

    d = client.watch(b"k", on_change)
    try:
        await d.watcher.ready
        for value in (b"1", b"boom", b"3"):
            await client.set(b"k", value)
        await wait_until(lambda: len(started) == 3)
        assert started == [b"1", b"boom", b"3"]  # each started at its event, in order
        assert finished == []
        gate.callback(None)
        await wait_until(lambda: len(finished) == 2)
        assert finished == [b"1", b"3"]
        failures = [e for e in logged if e.get("log_failure") is not None
                    and e["log_failure"].check(ValueError)]
        assert len(failures) == 1
        assert "watch callback" in failures[0]["log_format"]
        assert b"boom" in repr(failures[0]["event"]).encode()
        assert failures[0]["cb"] is on_change
        for event in failures:  # handled: keep the test's error reporting quiet
            event["log_failure"].cleanFailure()
        assert not d.called  # the watch goes on
        await client.set(b"k", b"4")
        await wait_until(lambda: finished == [b"1", b"3", b"4"])
    finally:
        globalLogPublisher.removeObserver(logged.append)
        d.cancel()


@pytest_twisted.ensureDeferred
async def test_a_watch_of_a_client_that_never_reached_etcd_fails_on_hung_and_dead(
        new_client, slow_member):
    # One member hangs, the other refuses: the watch fails, and says where it tried.
    url_h, _ = slow_member(None)
    urls = [url_h, dead_url()]
    client = new_client(urls, attempt_timeout=0.3)
    d = client.watch(b"k", lambda e: None)
    with pytest.raises(Unavailable) as info:
        await d
    assert all(url in str(info.value) for url in urls)
    with pytest.raises(Unavailable):
        await d.watcher.ready


@pytest_twisted.ensureDeferred
async def test_a_watch_moved_twice_quickly_delivers_exactly_once(etcd_cluster,
                                                                        new_client):
    # The watched member hangs; right after its stream moved, the member it moved to
    # hangs too (the first one runs again).  Under a stream of writes, every event comes
    # once, in order.
    writer = new_client(etcd_cluster.urls, timeout=5, attempt_timeout=0.5)
    watcher = new_client(etcd_cluster.urls, attempt_timeout=0.5)
    seen = []
    start = (await writer.set(b"start", b"")).revision
    d = watcher.watch(KeySet(b"p/", prefix=True), seen.append, start_revision=start + 1)
    await d.watcher.ready
    members = {m.url: m for m in etcd_cluster.members}
    first = members[d.watcher._stream.endpoint.url]
    paused = [first]

    def second_move():
        stream = d.watcher._stream
        url = getattr(getattr(stream, "endpoint", None), "url", None)
        if url is None or url == first.url:
            reactor.callLater(0.05, second_move)
            return
        first.resume()
        members[url].pause()
        paused.append(members[url])

    def first_move():
        first.pause()
        reactor.callLater(0.05, second_move)

    reactor.callLater(0.3, first_move)
    try:
        # write until the stream left the second member too (then a little more)
        deadline = reactor.seconds() + 15
        while (len(paused) < 2 or d.watcher.reconnects < 2) and reactor.seconds() < deadline:
            await _writer(writer, b"p/", 20)
        await _writer(writer, b"p/", 100)
    finally:
        for m in paused:
            m.resume()
    end = (await writer.set(b"p/end", b"")).revision
    # etcd's history, from one member with no failover in the way
    truth = await _ground_truth(new_client(etcd_cluster.wait_for_leader().url), b"p/",
                                start + 1, end)
    await wait_until(lambda: seen and seen[-1].revision >= truth[-1].revision, timeout=30)
    d.cancel()
    assert d.watcher.reconnects >= 2
    # writes that timed out on a hung member may be applied once it runs again, after
    # `end`: compare up to `end`
    seen = [e for e in seen if e.revision <= end]
    extra = sorted({sig(e) for e in seen} - {sig(e) for e in truth}, key=lambda s: s[3])
    lost = sorted({sig(e) for e in truth} - {sig(e) for e in seen}, key=lambda s: s[3])
    assert (extra, lost) == ([], []), (start, end)
    _check_exactly_once(seen, truth)


# -- shared watch streams (client.watch(..., shared=True), coord._watchhub) ----------------------


def hub_of(client):
    """The client's WatchHub (looks inside: how its shared streams are laid out)."""
    return client.watch_hub


@pytest.fixture
def one_fresh_stream(monkeypatch):
    """Only the first shared watch gets a stream of its own: later ones are merged with
    it (how watches come to share a stream when many exist)."""
    from coord import _watchhub

    monkeypatch.setattr(_watchhub, "FRESH_LIMIT", 1)


def stream_sizes(client):
    """The live watches each stream owns (streams being replaced left out)."""
    return sorted(s.alive for s in hub_of(client).streams if s.state.name != "RETIRING")


@pytest_twisted.ensureDeferred
async def test_a_watch_of_many_keysets_gets_every_create_answered(client):
    # The gateway used to drop the create requests it had not read when its first answer
    # went out (Go's server discards the rest of a body under 256 KiB): 300 key sets on
    # one unshared stream never became ready.
    keys = [b"many/%d" % i for i in range(300)]
    seen = []
    d = client.watch(keys, seen.append)
    await d.watcher.ready
    await client.set(keys[-1], b"v")
    await wait_until(lambda: [e.kv.key for e in seen] == [keys[-1]])
    d.cancel()


@pytest_twisted.ensureDeferred
async def test_shared_watches_use_at_most_eight_connections(etcd, client):
    from coord._watchhub import MAX_CONNECTIONS

    seen = {}
    watches = []
    for i in range(400):
        key = b"shared/%d" % i
        seen[key] = []
        watches.append(client.watch(key, seen[key].append, shared=True))
        if i % 40 == 0:
            await sleep(0)  # adds spread over reactor turns: fresh streams, then merges
            assert len(sockets_to(etcd.url)) <= MAX_CONNECTIONS + 1  # + the call's own
    for d in watches:
        await d.watcher.ready
    assert len(hub_of(client).streams) <= MAX_CONNECTIONS
    assert sum(stream_sizes(client)) == 400
    for i in range(0, 400, 7):
        await client.set(b"shared/%d" % i, b"v%d" % i)
    await wait_until(lambda: sum(map(len, seen.values())) == len(range(0, 400, 7)))
    await sleep(0.2)
    for key, events in seen.items():
        i = int(key.rsplit(b"/", 1)[1])
        assert [e.kv.value for e in events] == ([b"v%d" % i] if i % 7 == 0 else []), key
    assert len(sockets_to(etcd.url)) <= MAX_CONNECTIONS + 1
    for d in watches:
        d.cancel()
        await d
    await wait_until(lambda: not hub_of(client).streams)


@pytest_twisted.ensureDeferred
async def test_a_shared_watch_keeps_the_watcher_contract(client):
    first = await client.set(b"c/k", b"1")
    d_old = client.watch(b"c/k", [].append, shared=True, start_revision=first.revision)
    seen = []
    d = client.watch(b"c/k", seen.append, shared=True)
    assert d.watcher.ready is not d.watcher.ready  # a new Deferred per access
    await d.watcher.ready
    now = (await client.get(b"c/k")).header.revision
    assert d.watcher.revisions == [now + 1]  # delivers from creation revision + 1
    await d_old.watcher.ready
    assert d_old.watcher.revisions[0] >= first.revision
    await client.set(b"c/k", b"2")
    await wait_until(lambda: [e.kv.value for e in seen] == [b"2"])
    d.cancel()
    assert await d is None
    await client.set(b"c/k", b"3")
    await sleep(0.1)
    assert [e.kv.value for e in seen] == [b"2"]  # nothing after cancel
    assert not d_old.called  # its stream-mate goes on
    d_old.cancel()


@pytest_twisted.ensureDeferred
async def test_compacted_start_ends_only_that_shared_watch(client, one_fresh_stream):
    for i in range(5):
        await client.set(b"cmp/k", b"%d" % i)
    rev = (await client.set(b"cmp/k", b"last")).revision
    await client.compact(rev)
    good = []
    d_good = client.watch(b"cmp/k", good.append, shared=True)
    d_bad = client.watch(b"cmp/k", lambda e: None, start_revision=rev - 3, shared=True)
    with pytest.raises(Compacted) as info:
        await d_bad
    assert info.value.compact_revision == rev
    await d_good.watcher.ready
    assert d_good.watcher._members[0].stream is d_bad.watcher._members[0].stream  # mates
    await client.set(b"cmp/k", b"after")
    await wait_until(lambda: [e.kv.value for e in good] == [b"after"])
    assert not d_good.called
    d_good.cancel()


@pytest_twisted.ensureDeferred
async def test_cancelled_shared_watches_close_their_stream_when_all_are_dead(
        etcd, client, one_fresh_stream):
    await client.set(b"cx/warm", b"")  # the calls' own connection is open
    before = len(sockets_to(etcd.url))
    seen_a, seen_b = [], []
    d_a = client.watch(b"cx/a", seen_a.append, shared=True)
    d_b = client.watch(b"cx/b", seen_b.append, shared=True)
    await d_a.watcher.ready
    await d_b.watcher.ready
    assert stream_sizes(client) == [2]
    d_a.cancel()
    await client.set(b"cx/a", b"1")
    await client.set(b"cx/b", b"1")
    await wait_until(lambda: len(seen_b) == 1)
    assert seen_a == []  # dropped locally at once; the stream goes on for b
    await wait_until(lambda: len(hub_of(client).streams) == 1)  # the replaced one closed
    d_b.cancel()
    await wait_until(lambda: not hub_of(client).streams)
    await wait_until(lambda: len(sockets_to(etcd.url)) <= before)


@pytest_twisted.ensureDeferred
async def test_shared_watches_merged_under_writes_deliver_exactly_once(pool_client):
    # One watch per fresh stream until the fresh ones are used up; then, with writes
    # going on under p/, more watches force replacements that re-create the p/ watch on a
    # new stream while the old one still delivers: no event twice, none lost.
    client = pool_client
    start = (await client.set(b"start", b"")).revision
    seen = []
    d = client.watch(KeySet(b"p/", prefix=True), seen.append, start_revision=start + 1,
                     shared=True)
    await d.watcher.ready
    first_stream = d.watcher._members[0].stream  # (looks inside: the p/ watch must move)
    others = []
    for i in range(6):
        others.append(client.watch(b"o/%d" % i, lambda e: None, shared=True))
        await others[-1].watcher.ready
    writing = defer.ensureDeferred(_writer(client, b"p/", 600))
    for batch in range(12):
        for j in range(5 * batch + 1):
            others.append(client.watch(b"m/%d/%d" % (batch, j), lambda e: None, shared=True))
        await sleep(0.03)
    await writing
    for o in others:
        await o.watcher.ready
    assert hub_of(client).merges >= 1
    assert d.watcher._members[0].stream is not first_stream
    end = (await client.set(b"p/end", b"")).revision
    truth = await _ground_truth(client, b"p/", start + 1, end)
    await wait_until(lambda: seen and seen[-1].revision >= end, timeout=30)
    _check_exactly_once(seen, truth)
    d.cancel()
    for o in others:
        o.cancel()


@pytest_twisted.ensureDeferred
async def test_shared_watches_exactly_once_across_a_restart(etcd_factory, new_client):
    server = etcd_factory()
    writer = new_client(server.url, timeout=5)
    watcher = new_client(server.url)
    start = (await writer.set(b"start", b"")).revision
    seen = {n: [] for n in range(3)}
    ds = [watcher.watch(KeySet(b"p/%d/" % n, prefix=True), seen[n].append,
                        start_revision=start + 1, shared=True) for n in range(3)]
    for d in ds:
        await d.watcher.ready
    reactor.callLater(0.5, server.restart)
    for n in range(3):
        await _writer(writer, b"p/%d/" % n, 400)
    ends = [(await writer.set(b"p/%d/end" % n, b"")).revision for n in range(3)]
    for n in range(3):
        truth = await _ground_truth(writer, b"p/%d/" % n, start + 1, ends[n])
        await wait_until(lambda n=n: seen[n] and seen[n][-1].revision >= ends[n], timeout=30)
        _check_exactly_once(seen[n], truth)
    assert all(d.watcher.reconnects >= 1 for d in ds)
    for d in ds:
        d.cancel()


@pytest_twisted.ensureDeferred
async def test_shared_watches_move_off_a_hung_member(etcd_cluster, new_client):
    watcher = new_client(etcd_cluster.urls)
    seen = {n: [] for n in range(5)}
    ds = [watcher.watch(b"h/%d" % n, seen[n].append, idle_timeout=1.0, shared=True)
          for n in range(5)]
    for d in ds:
        await d.watcher.ready
    (url,) = {s.stream.endpoint.url for s in hub_of(watcher).streams}  # the preferred one
    member = next(m for m in etcd_cluster.members if m.url == url)
    member.pause()
    try:
        others = [m.url for m in etcd_cluster.members if m is not member]
        other_writer = new_client(others, timeout=5)
        for n in range(5):
            for _ in range(50):
                try:
                    await other_writer.set(b"h/%d" % n, b"after-pause")
                    break
                except (Unavailable, Timeout):
                    await sleep(0.2)
        await wait_until(lambda: all(len(seen[n]) == 1 for n in range(5)), timeout=20)
        assert all(d.watcher.reconnects >= 1 for d in ds)
    finally:
        member.resume()
        for d in ds:
            d.cancel()


@pytest_twisted.ensureDeferred
async def test_client_close_ends_its_shared_watches(etcd, new_client):
    client = new_client(etcd.url)
    ds = [client.watch(b"z/%d" % i, lambda e: None, shared=True) for i in range(3)]
    await ds[0].watcher.ready
    late = client.watch(b"z/late", lambda e: None, shared=True)  # still pending
    await client.close()
    for d in [*ds, late]:
        assert await d is None
    assert not hub_of(client).streams
    await wait_until(lambda: not sockets_to(etcd.url), timeout=2)
    after = client.watch(b"z/after", lambda e: None, shared=True)
    assert await after is None


# -- the hub's decisions (sans-IO: WatchHub.plan on stand-in streams) ---------------------------


class _Stand:
    """A stand-in for a shared stream: what WatchHub.plan reads."""

    def __init__(self, alive, state="LIVE", dead=0, victims=()):
        from coord._watchhub import StreamState

        self.alive, self.dead = alive, dead
        self.state = StreamState[state]
        self.victims = list(victims)

    def __repr__(self):
        return f"<{self.state.name} {self.alive}>"


def _hub(streams, pending):
    from coord._watchhub import WatchHub

    hub = WatchHub(reactor, None, lambda: False)
    hub.streams = [_Stand(*s) if isinstance(s, tuple) else _Stand(s) for s in streams]
    hub.pending = [object()] * pending
    return hub


@pytest.mark.parametrize(("streams", "pending", "kind", "victims"), [
    ([], 0, None, []),                                   # nothing to do
    ([], 1, "open", []),                                 # first watch: a stream of its own
    ([5, 5, 5, 5, 5, 5], 3, "open", []),                 # 6 streams: still fresh
    ([5, 5, 5, 5, 5, 5, 5], 3, "merge", [5]),            # at 7: merge with the smallest
    ([1, 1, 1, 9, 9, 9, 9], 1, "merge", [1, 1, 1]),      # ... and the next while no bigger
    ([100, 9, 9, 9, 9, 9, 9], 3, "merge", [9]),
    ([(5, "OPENING")] * 7, 3, None, []),                 # nothing live yet: wait for one
    ([5, 5, 5, 5, 5, 5, 5, (5, "RETIRING")], 3, None, []),   # 8 in use: wait
    ([5, 5, 5, 5, 5, 5, (5, "OPENING", 0, ["x"])], 3, None, []),  # a replacement in flight
    ([(10, "LIVE", 64), 5, 5, 5, 5, 5, 5], 0, "merge", [10, 5, 5, 5, 5, 5, 5]),  # dead-heavy
    ([(10, "LIVE", 64), 50], 0, "merge", [10]),          # rebuilt, small ones absorbed
    ([(100, "LIVE", 64), 5], 0, None, []),               # dead but not most of it: kept
    ([400] * 7, 1, "wait", []),                          # few new for a big merge: wait
    ([400] * 7, 100, "merge", [400]),                    # a quarter: at once
])
def test_hub_plan(streams, pending, kind, victims):
    plan = _hub(streams, pending).plan(0.0)
    if kind is None:
        assert plan is None
        return
    assert plan[0] == kind
    assert [v.alive for v in plan[1]] == victims


def test_hub_plan_merges_after_the_coalescing_delay():
    from coord._watchhub import coalesce_delay

    hub = _hub([400] * 7, 1)
    kind, _, wait = hub.plan(10.0)
    assert kind == "wait"
    assert wait == pytest.approx(coalesce_delay(400))
    assert hub.plan(10.0 + wait / 2)[0] == "wait"  # the same deadline, not a new one
    assert hub.plan(10.0 + wait)[0] == "merge"


@pytest.mark.parametrize(("n", "grace"), [(1, 0.25), (511, 0.25), (512, 0.35), (100_000, 2.0)])
def test_retire_grace(n, grace):
    from coord._watchhub import retire_grace

    assert retire_grace(n) == pytest.approx(grace)


class _FakeStream:
    endpoint = None

    def __init__(self, body):
        self.body, self.cancelled = body, False

    def cancel(self):
        self.cancelled = True

    def pause_reading(self, paused):
        pass


class _FakeTransport:
    """A transport that records the shared streams' bodies; the test plays etcd."""

    reached = True
    endpoints = ()
    has_credentials = False

    def __init__(self):
        self.streams = []

    def stream(self, path, body, on_message, on_end, endpoint=None):
        self.streams.append(_FakeStream(body))
        return self.streams[-1]


class _FakeClient:
    closed = False

    def __init__(self):
        from coord._watchhub import WatchHub

        self.watch_hub = WatchHub(reactor, _FakeTransport(), lambda: False)


def _shared(client, key, seen, start=None):
    from coord._watchhub import SharedWatcher

    return SharedWatcher(client, [KeySet(key)], seen.append, start, False, [], None)


def _created(watch_id, revision=10):
    return {"header": {"revision": str(revision)}, "watch_id": str(watch_id), "created": True}


def _events(watch_id, *revisions):
    return {"header": {"revision": str(max(revisions))}, "watch_id": str(watch_id),
            "events": [{"kv": {"key": _b64(b"k"), "mod_revision": str(r),
                               "create_revision": "1", "version": "1"}} for r in revisions]}


def test_a_shared_watch_cancelled_before_its_creation_leaves_its_stream_working(
        one_fresh_stream):
    client = _FakeClient()
    hub = client.watch_hub
    seen_a, seen_b = [], []
    a = _shared(client, b"a", seen_a)  # a stream of its own
    (first,) = hub.streams
    first.message(_created(1))
    b = _shared(client, b"b", seen_b)  # pending: merged with a's stream
    hub._run()
    merged = hub.streams[-1]
    assert [m.keys.key for m in merged.members] == [b"a", b"b"]
    b.cancel()  # before etcd answered its create
    merged.message(_created(1))
    merged.message(_created(2))
    assert merged.state.name == "LIVE"  # b's answer still counts
    merged.message(_events(2, 11))
    assert seen_b == []
    a.cancel()


@pytest.mark.parametrize(("old", "new", "delivered"), [
    # (events on the replaced stream, then on its replacement): each revision once
    ([(11,), (12,)], [(11, 12), (13,)], [11, 12, 13]),
    ([(11, 12, 13)], [(11,), (12, 13, 14)], [11, 12, 13, 14]),
    ([], [(11,), (12,)], [11, 12]),
    ([(11,), (12,), (13,)], [(11, 12, 13)], [11, 12, 13]),
])
def test_a_replaced_stream_and_its_replacement_deliver_each_event_once(
        one_fresh_stream, old, new, delivered):
    client = _FakeClient()
    hub = client.watch_hub
    seen = []
    w = _shared(client, b"k", seen)
    (first,) = hub.streams
    first.message(_created(1))  # delivers from 11
    _shared(client, b"other", [])
    hub._run()
    replacement = hub.streams[-1]
    assert first.state.name == "RETIRING"
    assert b'"start_revision":"11"' in replacement.stream.body.replace(b" ", b"") or \
        b'"start_revision":11' in replacement.stream.body.replace(b" ", b"")
    for revs in old:
        first.message(_events(1, *revs))
    replacement.message(_created(1))
    replacement.message(_created(2))
    for revs in new:
        replacement.message(_events(1, *revs))
    assert [e.kv.mod_revision for e in seen] == delivered
    assert w.revisions == [delivered[-1] + 1]
    w.cancel()


def test_a_body_of_several_creates_is_padded_past_the_gateways_discard_limit():
    from coord.watch import watch_body

    assert watch_body([b"{}\n"]) == b"{}\n"
    # A small body is read whole by the decoder's first read: no padding.
    assert watch_body([b"{}\n", b"{}\n"]) == b"{}\n{}\n"
    big = [b"{" + b" " * 300 + b"}\n"] * 2
    padded = watch_body(big)
    size = len(b"".join(big))
    assert padded.startswith(b"".join(big)) and padded[size:].strip() == b""
    assert len(padded) - size >= 256 * 1024


def _b64(data):
    import base64

    return base64.b64encode(data).decode()


@pytest.fixture
def app_user_server(etcd_factory):
    """An etcd with auth on: root, and user "app" (password "app-pw") allowed app/ only."""
    server = etcd_factory()
    server.post("/v3/auth/user/add", {"name": "root", "password": "root-pw"})
    server.post("/v3/auth/user/grant", {"user": "root", "role": "root"})
    server.post("/v3/auth/role/add", {"name": "app"})
    server.post("/v3/auth/role/grant", {"name": "app", "perm": {
        "permType": "READWRITE", "key": _b64(b"app/"), "range_end": _b64(b"app0")}})
    server.post("/v3/auth/user/add", {"name": "app", "password": "app-pw"})
    server.post("/v3/auth/user/grant", {"user": "app", "role": "app"})
    server.post("/v3/auth/enable", {})
    return server


@pytest_twisted.ensureDeferred
async def test_a_refused_key_ends_only_its_shared_watch(app_user_server, new_client,
                                                         one_fresh_stream):
    from coord import PermissionDenied

    client = new_client(app_user_server.url, user="app", password="app-pw", timeout=10)
    seen = []
    d_ok = client.watch(b"app/x", seen.append, shared=True)
    d_refused = client.watch(b"other", lambda e: None, shared=True)  # merged with it
    with pytest.raises(PermissionDenied):
        await d_refused
    await d_ok.watcher.ready
    await client.set(b"app/x", b"v")
    await wait_until(lambda: [e.kv.value for e in seen] == [b"v"])
    assert not d_ok.called
    d_ok.cancel()
