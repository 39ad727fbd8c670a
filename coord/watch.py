"""Watches that never lose or duplicate an event.

A :class:`Watcher` holds one streaming ``POST /v3/watch`` on a connection of its own,
with one etcd watcher per key set (several create requests in one body).  When the
stream breaks -- etcd restarts, the endpoint dies, the stream goes quiet for longer than
``idle_timeout`` -- it is created again, on the next endpoint if need be, from the
revision after the last one fully delivered:

* after a response with events, ``last event's mod_revision + 1``.  (Not the response
  header's revision: etcd stamps a catch-up batch with the *current* store revision even
  when more batches are still to come -- ``watchable_store.go`` syncWatchers -- so
  resuming from it could skip events.)  etcd never splits one revision's events across
  responses (coord does not ask for fragments), so a response ends on a whole revision;
* after a progress notification (sent only to watchers that are caught up), its
  header's revision + 1;
* after the creation of a watch that asked for no start revision, the creation
  header's revision + 1 -- so a resumed watch never skips what happened while the
  stream was down.

If the revision to resume from has been compacted, the watch ends with
:class:`~coord.errors.Compacted` (carrying ``compact_revision``); it never skips silently.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import txaio
from twisted.internet import defer
from twisted.python.failure import Failure

from coord import errors
from coord._failover import Moved
from coord._twisted import StreamTransport, WatchStream
from coord._wire import codec
from coord.keyset import KeyLike, KeySet
from coord.txn import keys_json
from coord.types import Event

if TYPE_CHECKING:
    from coord._watchhub import SharedWatcher

__all__ = ["EventStream", "Watcher"]

log = txaio.make_logger()  # type: ignore[attr-defined]  # set by txaio.use_twisted()

_FILTERS = {"noput": "NOPUT", "nodelete": "NODELETE"}

# etcd's default interval between progress notifications to a watch that asked for them
# (``--experimental-watch-progress-notify-interval``).
PROGRESS_INTERVAL = 600.0


# Go's HTTP/1 server (etcd's gateway) discards what is left of a request body when the
# handler first flushes its answer, if less than this is left (net/http server.go,
# chunkWriter.writeHeader, maxPostHandlerReadBytes = 256 KiB); with that much or more
# left it leaves the body alone (and closes the connection after the answer).  The
# gateway decodes a watch body one request at a time and flushes each answer, so the
# create requests it had not read when the first "created" answer went out were thrown
# away: seen on 3.5.1 and 3.4.23, 200 creates in one body got 10 and 64 answers, 3,000
# got 64 to 576 -- at random.  Whitespace after the requests (skipped by the gateway's
# JSON decoder) keeps 256 KiB unread until every request is read: 20,000 creates got
# 20,000 answers on both versions.  (It also explains why a chunked body that stays
# open gets no answer: the discard waits for the body's end.)  A body with one request
# needs no padding: the first answer can only follow the reading of that request.  Nor
# does a small one: the decoder's first read asks for at least 512 bytes (Go's
# encoding/json Decoder.refill, minRead) and gets what is buffered, and the head and
# body are written at once -- so a body of up to SMALL_BODY bytes is read whole before
# any answer.  (A lock waiter's watch -- its predecessor and its own key -- is one: the
# padding cost it 257 KiB per watch and a quarter of the contended lock's cycles/s.)
BODY_PADDING = b" " * (256 * 1024 + 1024)
SMALL_BODY = 448


def watch_body(requests: Sequence[bytes]) -> bytes:
    """The body of a ``POST /v3/watch`` creating ``requests`` (encoded create requests),
    padded so that the gateway reads all of them (see `BODY_PADDING`)."""
    body = b"".join(requests)
    if len(requests) == 1 or len(body) <= SMALL_BODY:
        return body
    return body + BODY_PADDING


def create_request(keys: KeySet, start: int | None, prev_kv: bool, filters: list[str]) -> dict:
    """A ``WatchRequest`` creating a watch of ``keys`` (from ``start``; None: from now),
    with progress notifications; shared by Watcher and coord._watchhub."""
    req = keys_json(keys)
    req["progress_notify"] = True
    if start:
        req["start_revision"] = start
    if prev_kv:
        req["prev_kv"] = True
    if filters:
        req["filters"] = filters
    return {"create_request": req}


class WatchDeferred(defer.Deferred):
    """What :meth:`Client.watch` returns: a Deferred with its :class:`Watcher` attached.

    ``cancel()`` stops the watch and fires this Deferred with None (not CancelledError:
    the original guide cancels without waiting, and that must not log an error).
    """

    watcher: Watcher | SharedWatcher


class Watcher:
    """One resumable watch over one or more key sets.  Made by :meth:`Client.watch`.

    Attributes:
        deferred: fires with None once the watch is cancelled (:meth:`cancel` or
            ``deferred.cancel()``), or fails with :class:`~coord.errors.Compacted` or
            another error that resuming cannot cure.
        revisions: per key set, the revision the watch resumes from if its stream breaks.
        reconnects: how many times the stream was created again.
    """

    def __init__(self, client: Any, keysets: Sequence[KeySet],
                 on_events: Callable[[list[Event]], None] | None, start_revision: int | None,
                 prev_kv: bool, filters: list[str], idle_timeout: float | None,
                 on_change: Callable[[Event], Any] | None = None) -> None:
        self._client = client
        self._reactor = client.reactor
        self._hub = client.watch_hub
        self._keysets = list(keysets)
        self._on_events = on_events
        self._on_change = on_change
        self._prev_kv = prev_kv
        self._filters = filters
        self.idle_timeout = idle_timeout
        self.revisions: list[int | None] = [start_revision] * len(self._keysets)
        self.reconnects = 0
        self._created = 0
        self._ids: dict[int, int] = {}
        self._stream: WatchStream | None = None
        self._retry: Any = None
        self._idle: Any = None
        self._backoff = 0.0
        self._auth_retried = False
        self._unreached: set[str] = set()  # endpoints that failed before any answer
        self._paused = False
        self._probe: defer.Deferred[Any] | None = None
        self._last_message = self._reactor.seconds()
        self._done = False
        self.deferred = WatchDeferred(lambda d: self._finish(None))
        self.deferred.watcher = self
        self._ready: list[defer.Deferred[None]] = []
        self._ready_result: Any = None  # once fired: True, or the error that ended it
        self._hub.watchers.add(self)
        self._connect()

    def __repr__(self) -> str:
        state = "DONE" if self._done else ("WATCHING" if self._stream else "RECONNECTING")
        keys = ", ".join(repr(k.key) for k in self._keysets)
        return f"<Watcher [{keys}] {state} revisions={self.revisions}>"

    @property
    def ready(self) -> defer.Deferred[None]:
        """A new Deferred that fires once etcd has created the watch (or it was cancelled
        first), or fails with the error that ended the watch before that.

        Each access gives a Deferred of its own, so a failure nobody asked about is not
        logged as unhandled (it is reported on :attr:`deferred`).
        """
        result = self._ready_result
        if result is True:
            return defer.succeed(None)
        if result is not None:
            return defer.fail(result)
        d: defer.Deferred[None] = defer.Deferred(self._ready.remove)
        self._ready.append(d)
        return d

    def _fire_ready(self, result: Any) -> None:
        if self._ready_result is not None:
            return
        self._ready_result = result
        waiting, self._ready = self._ready, []
        for d in waiting:
            if result is True:
                d.callback(None)
            else:
                d.errback(result)

    def cancel(self) -> None:
        """Stop now: no callback after this returns, and the stream's connection is closed."""
        self._finish(None)

    # stream lifecycle -----------------------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        if self._done:
            return
        if self._client.closed:
            self._finish(None)
            return
        self._created = 0
        self._ids = {}
        body = watch_body([
            codec.encode(create_request(keys, rev, self._prev_kv, self._filters))
            for keys, rev in zip(self._keysets, self.revisions, strict=True)
        ])
        self._stream = self._transport.stream("/v3/watch", body, self._message, self._ended)
        self._touch()

    def pause_reading(self, paused: bool) -> None:
        """Stop (or go on) reading the stream: TCP pushes back to etcd, which holds the
        events for a slow watcher.  No idle timeout runs while paused; a stream created
        again while paused starts paused."""
        self._paused = paused
        self._apply_pause()
        if paused:
            if self._idle is not None and self._idle.active():
                self._idle.cancel()
            self._idle = None
        else:
            self._touch()

    def _apply_pause(self) -> None:
        if self._stream is not None:
            self._stream.pause_reading(self._paused)

    @property
    def _transport(self) -> StreamTransport:
        return self._hub.transport

    def _touch(self) -> None:
        self._last_message = self._reactor.seconds()
        if self.idle_timeout is None or self._done or self._paused or self._probe is not None:
            return
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.idle_timeout)
        else:
            self._idle = self._reactor.callLater(self.idle_timeout, self._went_quiet)

    def _went_quiet(self) -> None:
        """No message for ``idle_timeout`` seconds: quiet keys, or a hung member?

        Ask the member that serves the stream (that member only) for its status.  If it
        answers and has a leader, the keys are just quiet: keep the stream -- re-creating
        it would gain nothing and could meet a compaction of the revision it resumes from.
        If it does not answer in time, or has no leader, create the stream again on
        another member.  etcd sends a progress notification every 10 minutes to a watch
        that asked for them: a stream silent for longer than that is re-created anyway.
        """
        self._idle = None
        stream = self._stream
        transport = self._transport
        endpoint = stream.endpoint if stream is not None else None
        quiet = self._reactor.seconds() - self._last_message

        def settled(probe: defer.Deferred[Any]) -> bool:
            if self._probe is not probe or self._stream is not stream:
                return False
            self._probe = None
            return True

        self._probe = probe_quiet_stream(
            transport, endpoint, quiet, self.idle_timeout or 0.0, "watch stream", settled,
            self._touch, lambda why: self._hung(endpoint, why))

    def _hung(self, endpoint: Any, why: str) -> None:
        log.info("{why}: creating the watch stream again", why=why)
        if endpoint is not None:
            # A hung member still accepts connections: prefer another one next time.
            self._transport.demote(endpoint)
        self._restart(errors.Unavailable(why))

    def _restart(self, reason: errors.CoordError) -> None:
        self._cancel_probe()
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.cancel()
        self._ended(reason, force=True)

    def _ended(self, reason: errors.CoordError | None, force: bool = False) -> None:
        if self._done:
            return
        endpoint = self._stream.endpoint if self._stream is not None else None
        self._stream = None
        if self._client.closed:
            self._finish(None)
            return
        if isinstance(reason, errors.Unauthenticated):
            self._auth_refused(reason)
            return
        if reason is not None and not isinstance(reason, errors.Unavailable) and not force:
            self._finish(reason)
            return
        if reason is not None and not force and not isinstance(reason, Moved) and \
                self._unreachable(endpoint, reason):
            return
        # Broken, ended or quiet: create it again after a short, growing, jittered pause.
        self.reconnects += 1
        self._backoff = min(max(self._backoff * 2, 0.05), 2.0)
        delay = self._backoff * (0.5 + random.random() / 2)
        log.debug("watch stream ended ({reason}); again in {delay:.2f} s", reason=reason,
                  delay=delay)
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        self._retry = self._reactor.callLater(delay, self._connect)

    def _unreachable(self, endpoint: Any, reason: errors.CoordError) -> bool:
        """Fail the watch, as a call fails, when no endpoint could serve it and the client
        has never been answered by one (a wrong port, a wrong CA, a server that is not
        etcd); returns whether it did.  Once the client has reached etcd, an unreachable
        cluster is an outage, and the watch resumes when it is back."""
        transport = self._transport
        if transport.reached or self._created or endpoint is None:
            return False
        self._unreached.add(endpoint.url)
        urls = [ep.url for ep in transport.endpoints]
        if not all(url in self._unreached for url in urls):
            return False
        self._finish(errors.Unavailable(
            f"watch: no endpoint could serve it (tried {', '.join(urls)}): {reason}"))
        return True

    def _cancel_probe(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.addErrback(lambda _: None)
            probe.cancel()

    def _message(self, msg: dict) -> None:
        if self._done:
            return
        self._cancel_probe()  # the stream lives
        if self._paused:
            self._apply_pause()  # a stream created again since the pause
        self._touch()
        watch_id = int(msg.get("watch_id", 0))
        if msg.get("canceled"):
            # Checked first: etcd refuses a create request (permission denied, a stale
            # token) with created *and* canceled set, and watch_id -1.
            self._canceled(msg, self._ids.get(watch_id))
            return
        if msg.get("created"):
            # Creation answers come in the order of the create requests; later messages
            # name their watcher by the ID the creation answer gave it.
            index = self._created
            self._ids[watch_id] = index
            self._created += 1
            if self.revisions[index] is None:
                self.revisions[index] = int(msg["header"]["revision"]) + 1
            if self._created == len(self._keysets):
                self._backoff = 0.0
                self._auth_retried = False
                self._fire_ready(True)
            return
        known = self._ids.get(watch_id)
        if known is None:
            return  # not one of ours (cannot happen on a stream of our own)
        index = known
        raw = msg.get("events")
        if not raw:
            # A progress notification: every event up to its revision has been delivered.
            rev = int(msg.get("header", {}).get("revision", 0))
            current = self.revisions[index]
            if rev and (current is None or rev + 1 > current):
                self.revisions[index] = rev + 1
            return
        events = [codec.event(e) for e in raw]
        # The whole response counts as delivered, even if cancel() stops delivery midway.
        self.revisions[index] = events[-1].kv.mod_revision + 1
        if self._on_events is not None:
            self._on_events(events)
            return
        on_change = self._on_change
        assert on_change is not None
        for event in events:
            if self._done:
                return  # cancelled by an earlier callback of this batch
            try:
                on_change(event)
            except Exception:
                log.failure("watch callback {cb!r} raised on {event!r}; the watch goes on",
                            cb=on_change, event=event)

    def _canceled(self, msg: dict, index: int | None) -> None:
        compact = int(msg.get("compact_revision", 0))
        if compact:
            start = self.revisions[index] if index is not None else None
            self._finish(errors.Compacted(
                f"watch from revision {start} failed: history before revision {compact} "
                f"is compacted", errors.OUT_OF_RANGE, compact))
            return
        reason = msg.get("cancel_reason") or "etcd cancelled the watch"
        exc = errors.from_gateway({"message": reason})
        if isinstance(exc, (errors.PermissionDenied, errors.Unauthenticated)):
            # etcd 3.4/3.5 answer a stale token with "permission denied" too: with
            # credentials, authenticate again once before believing it.
            self._auth_refused(exc)
            return
        self._finish(exc)

    def _auth_refused(self, exc: errors.EtcdError) -> None:
        transport = self._transport
        if isinstance(exc, errors.AuthFailed) or self._auth_retried or \
                not transport.has_credentials:
            self._finish(exc)
            return
        self._auth_retried = True
        transport.forget_token()
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.cancel()
        self._connect()

    def _finish(self, reason: errors.CoordError | None) -> None:
        if self._done:
            return
        self._done = True
        self._hub.watchers.discard(self)
        self._cancel_probe()
        for timer in (self._retry, self._idle):
            if timer is not None and timer.active():
                timer.cancel()
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.cancel()
        self._fire_ready(True if reason is None else reason)
        if not self.deferred.called:
            if reason is None:
                self.deferred.callback(None)
            else:
                self.deferred.errback(reason)


class EventStream:
    """``async for event in client.events(...)``: a watch as an async iterator.

    Same guarantees as :meth:`Client.watch`.  Events wait in a queue until iterated; when
    more than ``high_water`` are waiting, reading from etcd pauses (TCP pushes back to
    etcd, which holds the events for a slow watcher) until the queue drains.  Iteration
    ends after :meth:`close`; a failure of the watch (e.g. Compacted) is raised from it.
    """

    def __init__(self, client: Any, keysets: Sequence[KeySet], start_revision: int | None,
                 prev_kv: bool, filters: list[str], idle_timeout: float | None,
                 high_water: int = 10_000) -> None:
        self._queue: collections.deque[Event] = collections.deque()
        self._waiter: defer.Deferred[None] | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._high_water = high_water
        self._paused = False
        self.watcher = Watcher(client, keysets, self._push, start_revision, prev_kv, filters,
                               idle_timeout)
        self.watcher.deferred.addBoth(self._watch_done)

    def _push(self, events: list[Event]) -> None:
        self._queue.extend(events)
        if len(self._queue) > self._high_water and not self._paused:
            self._paused = True
            self.watcher.pause_reading(True)
        self._wake()

    def _watch_done(self, result: Any) -> None:
        if isinstance(result, Failure):
            self._error = result.value
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(None)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        while not self._queue:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            if self._closed:
                raise StopAsyncIteration
            self._waiter = defer.Deferred()
            await self._waiter
        event = self._queue.popleft()
        if self._paused and len(self._queue) < self._high_water // 10:
            self._paused = False
            self.watcher.pause_reading(False)
        return event

    @property
    def ready(self) -> defer.Deferred[None]:
        """Fires once etcd has created every watcher of this stream."""
        return self.watcher.ready

    def close(self) -> None:
        """Stop watching; iteration ends once the events already queued are consumed."""
        self.watcher.cancel()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def keysets_of(keys: KeyLike | Sequence[KeyLike]) -> list[KeySet]:
    """A watch's key argument as a list of KeySets (a single key or KeySet is allowed)."""
    if isinstance(keys, (bytes, str, KeySet)):
        return [KeySet.of(keys)]
    result = [KeySet.of(k) for k in keys]
    if not result:
        raise errors.InvalidArgument("watch needs at least one key or KeySet")
    return result


def filters_of(filters: Sequence[str] | None) -> list[str]:
    result = []
    for f in filters or ():
        try:
            result.append(_FILTERS[f.lower()])
        except (KeyError, AttributeError):
            raise errors.InvalidArgument(f"watch filters are 'noput' and 'nodelete', not {f!r}")
    return result


def probe_quiet_stream(transport: Any, endpoint: Any, quiet: float, idle_timeout: float,
                       what: str, settled: Callable[[defer.Deferred[Any]], bool],
                       alive: Callable[[], None], hung: Callable[[str], None]
                       ) -> defer.Deferred[Any] | None:
    """A watch stream was quiet for ``quiet`` seconds: ask its member (that one only)
    for its status.  ``alive()`` if it answers with a leader; ``hung(why)`` if it does
    not answer, has no leader, is gone from the endpoints, or the stream was quiet
    longer than etcd's progress interval allows.  Each outcome is acted on only if
    ``settled(probe)`` says the probe is still the current one (it clears it).

    Returns:
        The probe's Deferred, or None if ``hung`` was called at once.
    """
    if endpoint is None or endpoint not in transport.endpoints or \
            quiet > PROGRESS_INTERVAL + idle_timeout:
        hung(f"{what} quiet for {quiet:.0f} s")
        return None
    probe: defer.Deferred[Any] = transport.request(
        "/v3/maintenance/status", b"{}", False, min(max(idle_timeout / 2, 0.5), 5.0),
        endpoint=transport.endpoints.index(endpoint))

    def answered(status: dict) -> None:
        if not settled(probe):
            return
        if int(status.get("leader", 0)) == 0:
            hung(f"{endpoint.url} has no leader")
        else:
            alive()

    def failed(failure: Failure) -> None:
        if settled(probe):
            hung(f"{what} quiet for {quiet:.0f} s and {endpoint.url} does not answer: "
                 f"{failure.getErrorMessage()}")

    probe.addCallbacks(answered, failed)
    return probe
