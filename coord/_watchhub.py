"""Shared watch streams: many watches of one client on a few ``POST /v3/watch`` streams.

Why: every gateway watch stream is an HTTP connection of its own.  A process holding
1,100 locks and reading each one's ``lost`` had 1,100 sockets open to etcd and died with
``EMFILE`` under the usual limit of 1,024 open files.  With ``client.watch(...,
shared=True)`` the watches of one client share at most :data:`MAX_CONNECTIONS` streams.

What the gateway allows (DESIGN.md, "One HTTP connection per gateway watch"): one body
with several newline-delimited create requests and a Content-Length creates several
watches on one stream; a body that stays open gets no answer.  So a stream's set of
watches is fixed when it is created, and adding a watch means creating a stream.  The
:class:`WatchHub` decides which stream each new watch goes to:

* while fewer than ``MAX_CONNECTIONS - 1`` streams exist, a new watch gets a stream of
  its own at once: as prompt as an unshared watch (a lock handoff's waiter watch is not
  slowed down when few watches exist);
* at that limit, the new watches are merged with the smallest stream(s) into one
  *replacement* stream, created on the one connection kept spare for it.  The old
  stream is kept until the replacement's watches are all created (and a short grace
  after, see :func:`retire_grace`), so nothing is lost meanwhile; every event is
  delivered once because each watch keeps the revision it delivers from next
  (``next``), and an event older than that -- from whichever stream -- is dropped;
* merges coalesce: a replacement is made at once only if the new watches are at
  least a quarter of the stream(s) it rebuilds, else after a delay that grows with
  their size (:func:`coalesce_delay`), during which more new watches gather.  Adding
  10,000 watches one after another thus re-creates each watch a few times, not once
  per add;
* a cancelled watch's events are dropped at once, locally; its stream is closed when
  all its watches are dead, and rebuilt (as a merge victim) when most of it is dead.

Ownership is what keeps the guarantees simple: every watch is *owned* by exactly one
stream, the one that resumes it if it breaks (from ``next``, like
:class:`coord.watch.Watcher`).  A replacement owns its watches from the moment it is
made; the streams it replaces only *retire*: they still deliver (deduplicated), are
never created again, and close once the replacement is fully created (or when they
break).  A per-watch error (a compacted start revision, permission denied on one key)
is taken from the owning stream only and ends that watch only; an error of the whole
stream (an HTTP error status, unreachable endpoints) ends the watches it owns.

Create requests carry explicit ``watch_id``s (``WatchCreateRequest.watch_id``, rpc.proto,
etcd 3.4+), 1..n per stream: answers and events name them on 3.4.23 and 3.5.1 (tried:
created, compacted-cancel and event answers all carry the id asked for).  An answer
whose id is not ours (etcd 3.4 refuses a create with ``watch_id`` -1) is matched to the
oldest create still unanswered: creation answers come in request order (etcd's
``recvLoop`` sends them through one channel), so the fallback is the same rule the
unshared Watcher relies on.

The decisions (:meth:`WatchHub.plan`) are plain bookkeeping on the hub's state; the
stream objects do the I/O.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Sequence
from typing import Any

import txaio
from twisted.internet import defer

from coord import errors
from coord._failover import Moved
from coord._twisted import StreamTransport, WatchStream
from coord._wire import codec
from coord.keyset import KeySet
from coord.types import Event
from coord.watch import (
    WatchDeferred,
    create_request,
    probe_quiet_stream,
    watch_body,
)

__all__ = ["MAX_CONNECTIONS", "SharedWatcher", "WatchHub"]

log = txaio.make_logger()  # type: ignore[attr-defined]  # set by txaio.use_twisted()

# Most connections all shared streams of one client use, replacements in flight included.
MAX_CONNECTIONS = 8
# New watches get a stream of their own while fewer than this many streams exist; the
# connections above it are kept for a replacement.
FRESH_LIMIT = MAX_CONNECTIONS - 1
# A stream whose dead watches are at least this many, and at least as many as its live
# ones, is rebuilt without them (when a connection is free for it).
DEAD_REBUILD = 64


def coalesce_delay(rebuilt: int) -> float:
    """Seconds a merge that re-creates ``rebuilt`` watches for fewer than a quarter as
    many new ones waits for more new watches: 0.5 ms per watch re-created (at most 1 s),
    so a trickle of new watches costs etcd at most ~2,000 re-created watches a second."""
    return min(1.0, 0.0005 * rebuilt)


def retire_grace(count: int) -> float:
    """Seconds a replaced stream is kept after its replacement is fully created.

    A watch created behind the store's revision starts in etcd's "unsynced" group and
    catches up on a 100 ms loop, at most 512 watches per pass (``watchable_store.go``
    syncWatchersLoop, maxWatchersPerSync; DESIGN.md "Performance notes").  The old,
    synced stream goes on delivering meanwhile (deduplicated), so a rebuild does not
    delay the events of the watches it moves."""
    return min(2.0, 0.15 + 0.1 * (count // 512 + 1))


class StreamState(enum.Enum):
    OPENING = "OPENING"  # request sent, creation answers outstanding
    LIVE = "LIVE"  # every create answered
    WAITING = "WAITING"  # broken; created again after a pause
    RETIRING = "RETIRING"  # replaced: delivers, never created again, closes soon
    CLOSED = "CLOSED"


class _Member:
    """One key set of one shared watch: what a stream creates and delivers to."""

    __slots__ = ("alive", "created", "filters", "index", "keys", "next", "prev_kv",
                 "stream", "watcher")

    def __init__(self, watcher: SharedWatcher, index: int, keys: KeySet,
                 start: int | None, prev_kv: bool, filters: list[str]) -> None:
        self.watcher = watcher
        self.index = index
        self.keys = keys
        self.next = start  # the revision delivered next; None: from creation on
        self.prev_kv = prev_kv
        self.filters = filters
        self.alive = True
        self.created = False
        self.stream: _HubStream | None = None  # the owner

    def request(self, watch_id: int) -> bytes:
        req = create_request(self.keys, self.next, self.prev_kv, self.filters)
        req["create_request"]["watch_id"] = watch_id
        return codec.encode(req)


class _HubStream:
    """One shared ``POST /v3/watch``: owns ``members`` (in request order)."""

    def __init__(self, hub: WatchHub, members: list[_Member],
                 victims: Sequence[_HubStream] = ()) -> None:
        self.hub = hub
        self.members = members
        self.victims = list(victims)  # streams this one replaces, retired once LIVE
        self.state = StreamState.OPENING
        self.ids: dict[int, _Member] = {}
        self.unanswered: dict[int, _Member] = {}  # by watch_id, in request order
        self.idle_for: float | None = None  # the shortest idle_timeout of its watches
        self.dead = 0
        self.refused = False  # a create was refused for permission since the last retry
        self.auth_retried = False
        self.stream: WatchStream | None = None
        self.ever_created = False
        self.attempt = 0
        self.backoff = 0.0
        self.timer: Any = None  # retry, retire or idle timer (one at a time per role)
        self.idle: Any = None
        self.probe: defer.Deferred[Any] | None = None
        self.last_message = 0.0
        for m in members:
            m.stream = self

    def __repr__(self) -> str:
        return f"<shared watch stream {self.state.name} watches={self.alive}>"

    @property
    def alive(self) -> int:
        return len(self.members) - self.dead

    def idle_timeout(self) -> float | None:
        timeouts = [m.watcher.idle_timeout for m in self.members
                    if m.alive and m.watcher.idle_timeout is not None]
        return min(timeouts) if timeouts else None

    # lifecycle ---------------------------------------------------------------------------

    def connect(self) -> None:
        self.timer = None
        if self.state is StreamState.CLOSED:
            return
        if self.hub.closed():
            self.close()
            return
        if self.dead:
            self.members = [m for m in self.members if m.alive]
            self.dead = 0
        if not self.members:
            self.close()
            return
        self.state = StreamState.OPENING
        self.ids = {i: m for i, m in enumerate(self.members, 1)}
        self.unanswered = dict(self.ids)
        self.refused = False
        self.idle_for = self.idle_timeout()
        body = watch_body([m.request(i) for i, m in self.ids.items()])
        self.attempt += 1
        attempt = self.attempt
        stream = self.hub.transport.stream("/v3/watch", body, self.message, self.ended)
        # A stream can end inside transport.stream (a token that cannot be had): then
        # this attempt is over already, and another may have begun.
        if self.attempt == attempt and self.state is StreamState.OPENING:
            self.stream = stream
            self.touch()

    def close(self) -> None:
        if self.state is StreamState.CLOSED:
            return
        self.state = StreamState.CLOSED
        self.cancel_probe()
        for timer in (self.timer, self.idle):
            if timer is not None and timer.active():
                timer.cancel()
        self.timer = self.idle = None
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.cancel()
        self.hub.stream_closed(self)

    def retire(self) -> None:
        """Replaced: deliver (deduplicated) until closed; never create again."""
        if self.state is StreamState.CLOSED:
            return
        self.state = StreamState.RETIRING
        for timer in (self.timer, self.idle):
            if timer is not None and timer.active():
                timer.cancel()
        self.timer = self.idle = None
        self.cancel_probe()
        if self.stream is None:
            self.close()

    def member_dead(self) -> None:
        self.dead += 1
        if self.state is not StreamState.RETIRING and self.alive == 0:
            for victim in self.victims:
                victim.close()
            self.close()

    # messages ----------------------------------------------------------------------------

    def message(self, msg: dict) -> None:
        if self.state is StreamState.CLOSED:
            return
        self.cancel_probe()  # the stream lives
        self.touch()
        watch_id = int(msg.get("watch_id", 0))
        if msg.get("created"):
            if watch_id not in self.unanswered:
                if not self.unanswered:
                    return
                # etcd 3.4 refuses a create with watch_id -1: the oldest unanswered one
                watch_id = next(iter(self.unanswered))
            del self.unanswered[watch_id]
        member = self.ids.get(watch_id)
        if member is None or not member.alive:
            # cancelled: dropped locally (its creation still counts towards LIVE)
            self.check_answered()
            return
        owner = member.stream is self
        if msg.get("canceled"):
            # Checked before "created": etcd refuses a create with both set.
            del self.ids[watch_id]
            if owner:
                self.canceled(member, msg)
            self.check_answered()
            return
        if msg.get("created"):
            if owner:
                if member.next is None:
                    member.next = int(msg["header"]["revision"]) + 1
                member.created = True
                member.watcher.member_created()
            self.check_answered()
            return
        raw = msg.get("events")
        if not raw:
            # A progress notification: on this stream, every event of this watch up to
            # its revision has come (and been delivered, or dropped as already
            # delivered from another stream).
            rev = int(msg.get("header", {}).get("revision", 0))
            if rev and member.next is not None and rev + 1 > member.next:
                member.next = rev + 1
            return
        events = [codec.event(e) for e in raw]
        start = member.next or 0
        if events[-1].kv.mod_revision < start:
            return  # delivered already, from the stream that replaces this one
        if events[0].kv.mod_revision < start:
            events = [e for e in events if e.kv.mod_revision >= start]
        member.next = events[-1].kv.mod_revision + 1
        member.watcher.deliver(events)

    def check_answered(self) -> None:
        if self.unanswered or self.state is not StreamState.OPENING:
            return
        self.state = StreamState.LIVE
        self.ever_created = True
        self.backoff = 0.0
        if not self.refused:
            self.auth_retried = False
        victims, self.victims = self.victims, []
        if victims:
            grace = retire_grace(len(self.members))
            for victim in victims:
                if victim.state is StreamState.RETIRING:
                    victim.timer = self.hub.reactor.callLater(grace, victim.close)
        self.hub.kick()

    def canceled(self, member: _Member, msg: dict) -> None:
        compact = int(msg.get("compact_revision", 0))
        if compact:
            member.watcher.fail(errors.Compacted(
                f"watch from revision {member.next} failed: history before revision "
                f"{compact} is compacted", errors.OUT_OF_RANGE, compact))
            return
        reason = msg.get("cancel_reason") or "etcd cancelled the watch"
        exc = errors.from_gateway({"message": reason})
        if isinstance(exc, (errors.PermissionDenied, errors.Unauthenticated)) and \
                not isinstance(exc, errors.AuthFailed):
            # etcd 3.4/3.5 answer a stale token with "permission denied" too: with
            # credentials, authenticate again once (for the whole stream: the token is
            # the stream's) before believing it.
            self.refused = True
            if self.hub.transport.has_credentials and not self.auth_retried:
                self.auth_retried = True
                self.hub.transport.forget_token()
                self.restart_now()
                return
        member.watcher.fail(exc)

    def restart_now(self) -> None:
        self.cancel_probe()
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.cancel()
        if self.idle is not None and self.idle.active():
            self.idle.cancel()
        self.idle = None
        self.connect()

    # ends and resumes -----------------------------------------------------------------------

    def ended(self, reason: errors.CoordError | None, force: bool = False) -> None:
        if self.state is StreamState.CLOSED:
            return
        endpoint = self.stream.endpoint if self.stream is not None else None
        self.stream = None
        self.cancel_probe()
        if self.idle is not None and self.idle.active():
            self.idle.cancel()
        self.idle = None
        if self.state is StreamState.RETIRING or self.hub.closed():
            self.close()
            return
        if isinstance(reason, errors.Unauthenticated):
            if self.hub.transport.has_credentials and not self.auth_retried and \
                    not isinstance(reason, errors.AuthFailed):
                self.auth_retried = True
                self.hub.transport.forget_token()
                self.connect()
                return
            self.fail_all(reason)
            return
        if reason is not None and not isinstance(reason, errors.Unavailable) and not force:
            self.fail_all(reason)
            return
        if reason is not None and not force and not isinstance(reason, Moved) and \
                self.hub.unreachable(self, endpoint, reason):
            return
        for watcher in {m.watcher for m in self.members if m.alive}:
            watcher.reconnects += 1
        self.state = StreamState.WAITING
        self.backoff = min(max(self.backoff * 2, 0.05), 2.0)
        delay = self.backoff * (0.5 + random.random() / 2)
        log.debug("shared watch stream ended ({reason}); again in {delay:.2f} s",
                  reason=reason, delay=delay)
        self.timer = self.hub.reactor.callLater(delay, self.connect)

    def fail_all(self, reason: errors.CoordError) -> None:
        for watcher in {m.watcher for m in self.members if m.alive}:
            watcher.fail(reason)
        self.close()

    # a hung member ----------------------------------------------------------------------------

    def touch(self) -> None:
        reactor = self.hub.reactor
        self.last_message = reactor.seconds()
        timeout = self.idle_for
        if timeout is None or self.state is StreamState.RETIRING or self.probe is not None:
            return
        if self.idle is not None and self.idle.active():
            self.idle.reset(timeout)
        else:
            self.idle = reactor.callLater(timeout, self.went_quiet)

    def went_quiet(self) -> None:
        """As :meth:`coord.watch.Watcher._went_quiet`: ask the stream's member for its
        status; keep the stream if it answers with a leader, else create it again
        elsewhere."""
        self.idle = None
        transport = self.hub.transport
        stream = self.stream
        endpoint = stream.endpoint if stream is not None else None
        timeout = self.idle_for
        quiet = self.hub.reactor.seconds() - self.last_message
        if timeout is None:
            return

        def settled(probe: defer.Deferred[Any]) -> bool:
            if self.probe is not probe or self.stream is not stream:
                return False
            self.probe = None
            return True

        self.probe = probe_quiet_stream(
            transport, endpoint, quiet, timeout, "shared watch stream", settled,
            self.touch, lambda why: self.hung(endpoint, why))

    def hung(self, endpoint: Any, why: str) -> None:
        log.info("{why}: creating the shared watch stream again", why=why)
        if endpoint is not None:
            self.hub.transport.demote(endpoint)
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.cancel()
        self.ended(errors.Unavailable(why), force=True)

    def cancel_probe(self) -> None:
        probe, self.probe = self.probe, None
        if probe is not None:
            probe.addErrback(lambda _: None)
            probe.cancel()


class WatchHub:
    """Every watch of one client (:attr:`watchers`, which ``Client.close`` ends) and the
    shared streams of its ``shared=True`` watches.  Made by the Client; ``client.watch_hub``.

    Args:
        reactor: the client's reactor.
        transport: the client's transport (its public stream surface only).
        closed: whether the client is closed.
    """

    def __init__(self, reactor: Any, transport: StreamTransport,
                 closed: Callable[[], bool]) -> None:
        self.reactor = reactor
        self.transport = transport
        self.closed = closed
        self.watchers: set[Any] = set()
        self.streams: list[_HubStream] = []
        self.pending: list[_Member] = []
        self._flush: Any = None
        self._hold_until: float | None = None  # a merge waits for more new watches
        self._unreached: set[str] = set()
        # counters, for tests and benchmarks: streams made fresh / as replacements, and
        # watches re-created by replacements
        self.opened = 0
        self.merges = 0
        self.recreated = 0

    def __repr__(self) -> str:
        return (f"<WatchHub streams={[s.alive for s in self.streams]} "
                f"pending={len(self.pending)}>")

    @property
    def connections(self) -> int:
        """Streams that hold (or will hold again) a connection."""
        return len(self.streams)

    def add(self, members: list[_Member]) -> None:
        self.pending.extend(members)
        if self.connections < FRESH_LIMIT and not self.closed():
            # Few streams: a stream of their own now, as an unshared watch gets (waiting
            # for the end of the reactor turn cost a lock handoff's waiter ~0.3 ms).
            if self._flush is not None and self._flush.active():
                self._flush.cancel()
            self._run()
        else:
            self.kick()

    def kick(self) -> None:
        """Look at the pending watches after this reactor turn (at the limit, what is
        added in one turn goes to one replacement)."""
        if self._flush is None and not self.closed():
            self._flush = self.reactor.callLater(0, self._run)

    def _run(self) -> None:
        self._flush = None
        if self.closed():
            return
        self.pending = [m for m in self.pending if m.alive]
        plan = self.plan(self.reactor.seconds())
        if plan is None:
            return
        kind, victims, wait = plan
        if kind == "wait":
            self._flush = self.reactor.callLater(wait, self._run)
            return
        moved = [m for v in victims for m in v.members if m.alive]
        members = moved + self.pending
        self.pending = []
        self._hold_until = None
        if victims:
            self.merges += 1
            self.recreated += len(moved)
        else:
            self.opened += 1
        stream = _HubStream(self, members, victims)
        self.streams.append(stream)
        for victim in victims:
            victim.retire()
        stream.connect()

    def plan(self, now: float) -> tuple[str, list[_HubStream], float] | None:
        """Decide what to do with the pending watches and dead-heavy streams: ``None``
        (nothing, or nothing until a stream closes or becomes live), ``("open", [], 0)``
        (a stream of their own), ``("merge", victims, 0)`` (a replacement of
        ``victims`` that also creates them) or ``("wait", [], seconds)`` (look again
        then: a merge coalescing)."""
        live = [s for s in self.streams if s.state is StreamState.LIVE and not s.victims]
        dirty = [s for s in live if s.dead >= DEAD_REBUILD and s.dead >= s.alive]
        if not self.pending and not dirty:
            return None
        if self.pending and self.connections < FRESH_LIMIT:
            return ("open", [], 0.0)
        if self.connections >= MAX_CONNECTIONS or not live:
            return None  # a replacement in flight or retiring: it kicks when done
        if any(s.victims or s.state is StreamState.RETIRING for s in self.streams):
            return None  # one replacement at a time
        # Merge every dead-heavy stream and the smallest stream, and the next smallest
        # while it is at most half of what is merged so far: stream sizes stay roughly
        # geometric, so as streams grow each watch is re-created O(log N) times, not
        # once per add; equal streams are not all rebuilt into one.
        victims = list(dirty)
        size = sum(s.alive for s in victims)
        for s in sorted(live, key=lambda s: s.alive):
            if s in victims:
                continue
            if victims and 2 * s.alive > size + len(self.pending):
                break
            victims.append(s)
            size += s.alive
        if not self.pending or len(self.pending) * 4 >= size or dirty:
            return ("merge", victims, 0.0)
        if self._hold_until is None:
            self._hold_until = now + coalesce_delay(size)
        if now < self._hold_until:
            return ("wait", [], self._hold_until - now)
        return ("merge", victims, 0.0)

    def stream_closed(self, stream: _HubStream) -> None:
        if stream in self.streams:
            self.streams.remove(stream)
        self.kick()

    def unreachable(self, stream: _HubStream, endpoint: Any,
                    reason: errors.CoordError) -> bool:
        """As :meth:`coord.watch.Watcher._unreachable`, for a stream's watches."""
        transport = self.transport
        if transport.reached or stream.ever_created or endpoint is None:
            return False
        self._unreached.add(endpoint.url)
        urls = [ep.url for ep in transport.endpoints]
        if not all(url in self._unreached for url in urls):
            return False
        stream.fail_all(errors.Unavailable(
            f"watch: no endpoint could serve it (tried {', '.join(urls)}): {reason}"))
        return True

    def close(self) -> None:
        if self._flush is not None and self._flush.active():
            self._flush.cancel()
        self._flush = None
        for stream in list(self.streams):
            stream.close()
        self.pending = []


class SharedWatcher:
    """A :class:`coord.watch.Watcher` whose key sets are watched on the client's shared
    streams (``client.watch(..., shared=True)``).  Same attributes and contract:
    ``deferred``, ``ready``, ``revisions``, ``reconnects``, ``cancel()``.

    ``revisions`` are the revisions delivered next: the one each key set resumes from.
    """

    def __init__(self, client: Any, keysets: Sequence[KeySet],
                 on_change: Callable[[Event], Any], start_revision: int | None,
                 prev_kv: bool, filters: list[str], idle_timeout: float | None) -> None:
        self._hub: WatchHub = client.watch_hub
        self._on_change = on_change
        self.idle_timeout = idle_timeout
        self.reconnects = 0
        self._members = [_Member(self, i, keys, start_revision, prev_kv, filters)
                         for i, keys in enumerate(keysets)]
        self._created = 0
        self._done = False
        self.deferred = WatchDeferred(lambda d: self._finish(None))
        self.deferred.watcher = self
        self._ready: list[defer.Deferred[None]] = []
        self._ready_result: Any = None
        if client.closed:
            self._finish(None)
            return
        self._hub.watchers.add(self)
        self._hub.add(self._members)

    def __repr__(self) -> str:
        state = "DONE" if self._done else ("WATCHING" if self._created == len(self._members)
                                           else "CREATING")
        keys = ", ".join(repr(m.keys.key) for m in self._members)
        return f"<SharedWatcher [{keys}] {state} revisions={self.revisions}>"

    @property
    def revisions(self) -> list[int | None]:
        return [m.next for m in self._members]

    @property
    def ready(self) -> defer.Deferred[None]:
        """As :attr:`coord.watch.Watcher.ready`: a new Deferred per access, firing once
        etcd created every key set's watch, failing with the error that ended it first."""
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
        """Stop now: no callback after this returns.  The shared stream goes on for the
        other watches (it is closed once none of its watches is left)."""
        self._finish(None)

    def pause_reading(self, paused: bool) -> None:
        """Does nothing: a shared stream carries other watches too."""

    # called by the streams ----------------------------------------------------------------

    def member_created(self) -> None:
        self._created += 1
        if self._created == len(self._members):
            self._fire_ready(True)

    def deliver(self, events: list[Event]) -> None:
        on_change = self._on_change
        for event in events:
            if self._done:
                return  # cancelled by an earlier callback of this batch
            try:
                on_change(event)
            except Exception:
                log.failure("watch callback {cb!r} raised on {event!r}; the watch goes on",
                            cb=on_change, event=event)

    def fail(self, reason: errors.CoordError) -> None:
        self._finish(reason)

    def _finish(self, reason: errors.CoordError | None) -> None:
        if self._done:
            return
        self._done = True
        self._hub.watchers.discard(self)
        for m in self._members:
            if m.alive:
                m.alive = False
                if m.stream is not None:
                    m.stream.member_dead()
        self._fire_ready(True if reason is None else reason)
        if not self.deferred.called:
            if reason is None:
                self.deferred.callback(None)
            else:
                self.deferred.errback(reason)
