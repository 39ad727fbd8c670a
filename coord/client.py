"""Client: etcd v3 over the JSON gateway, every call a Deferred.

Usable with ``yield`` in ``inlineCallbacks`` and with ``await`` in ``async def`` code::

    etcd = Client(reactor, "http://localhost:2379")
    rev = yield etcd.set(b"k", b"v")
    res = yield etcd.get(KeySet(b"k", prefix=True))

Every call takes ``timeout=`` (seconds, more than 0; ``None`` or infinity for no limit),
defaulting to the client's ``timeout``.  A read that times out raises
:class:`~coord.errors.Timeout`; a write that times out after it was sent raises
:class:`~coord.errors.WriteTimeout`, whose outcome is unknown.  Cancelling a call's
Deferred abandons it.  A ``timeout`` that is not a number raises ``TypeError``, one that
is negative, NaN or 0 raises :class:`~coord.errors.InvalidArgument` -- at once, before
anything is sent.  An answer that is not etcd's raises
:class:`~coord.errors.MalformedAnswer`.
"""

from __future__ import annotations

from binascii import b2a_base64
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import txaio
from twisted.internet import defer

from coord import _checks, errors
from coord._sentinel import DEFAULT
from coord._twisted.pool import HttpTransport, parse_endpoint
from coord._watchhub import SharedWatcher, WatchHub
from coord._wire import codec
from coord.keyset import KeyLike, KeySet
from coord.lease import Lease
from coord.txn import (
    OpSet,
    Transaction,
    delete_json,
    put_json,
    range_json,
    range_options,
)
from coord.types import (
    Alarm,
    Deleted,
    Event,
    Header,
    Member,
    Range,
    Revision,
    Status,
    TransactionResult,
)
from coord.watch import (
    EventStream,
    WatchDeferred,
    Watcher,
    filters_of,
    keysets_of,
)

if TYPE_CHECKING:
    from coord.recipes.lock import Lock

__all__ = ["Client"]

log = txaio.make_logger()  # type: ignore[attr-defined]  # set by txaio.use_twisted()

# etcd's default --max-request-bytes (1.5 MiB).
MAX_REQUEST_BYTES = 1536 * 1024

# The longest TTL etcd grants (lease.MaxLeaseTTL, lease/lessor.go): a longer one is refused
# with "etcdserver: too large lease TTL" (seen on 3.4.23 and 3.5.1).
MAX_LEASE_TTL = 9_000_000_000


class Client:
    """An etcd v3 client.

    Args:
        reactor: the Twisted reactor.
        url: one endpoint URL (``"http://127.0.0.1:2379"``) or a list of them, in order of
            preference.  With several, an unreachable endpoint is skipped.
        timeout: default seconds per call, more than 0 (``None`` or infinity: no limit).
        connect_timeout: seconds allowed to open a connection: finite and more than 0.
        user, password: authenticate as this user (both str); the token is obtained on
            first use and obtained again when etcd says it expired.
        ca_cert, cert, key: for https endpoints: the CA certificates to trust (a
            bundle; default: the system's trust store), and a client certificate (with
            its chain of intermediate CAs, if any, after it) and its unencrypted key
            for mutual TLS.  Each is PEM bytes or text, or a PEM file's path.
        agent: a Twisted ``IAgent`` (proxy, custom TLS, ...) to send requests through
            instead of coord's own connection pool (via treq).
        max_connections: most connections per endpoint in the default transport (an
            int >= 1).
        max_request_bytes: the server's ``--max-request-bytes`` (an int >= 1); a write
            bigger than this raises :class:`~coord.errors.RequestTooLarge` before it is
            sent.
        attempt_timeout: with several endpoints, seconds one attempt of a call waits
            for its answer before the member is presumed hung (a stopped process, a
            full disk: it still accepts connections).  A read (range, read-only
            transaction, status, lease keep-alive...) then moves on to the next
            endpoint, within the call's ``timeout``; a write fails with
            :class:`~coord.errors.WriteTimeout` (it may have been applied, so it is
            never re-sent); either way the member is demoted and the next calls go
            elsewhere until it answers a probe again.  ``None``: no attempt deadline.
        health_check_interval: with several endpoints, seconds between checks (a
            status request) of a member that serves watch streams; a member that does
            not answer within 1 s (or ``attempt_timeout`` if shorter), or has no
            leader, is demoted and its watches resume on another member.  ``None``:
            no checks (a watch then notices a hung member after its ``idle_timeout``).

    Raises:
        TypeError: ``url`` not a URL string (or a list of them); ``timeout`` or
            ``connect_timeout`` not a number (a str, a bool); ``user`` or ``password``
            not a str; ``max_connections`` or ``max_request_bytes`` not an int;
            ``attempt_timeout`` or ``health_check_interval`` not a number or None.
        InvalidArgument: a malformed endpoint URL, or an https one with TLS unavailable;
            a negative or NaN ``timeout``, ``connect_timeout``, ``attempt_timeout`` or
            ``health_check_interval``, any of them 0, an infinite ``connect_timeout``;
            ``max_connections`` or ``max_request_bytes`` below 1; with an https
            endpoint, a ``ca_cert``, ``cert`` or ``key`` that cannot be read, holds no
            certificate or key, or a key that is encrypted or not ``cert``'s.
    """

    def __init__(self, reactor: Any, url: str | bytes | Sequence[str], *,
                 timeout: float | None = 30.0, connect_timeout: float = 5.0,
                 user: str | None = None, password: str | None = None,
                 ca_cert: bytes | str | None = None, cert: bytes | str | None = None,
                 key: bytes | str | None = None, agent: Any = None,
                 max_connections: int = 64,
                 max_request_bytes: int = MAX_REQUEST_BYTES,
                 attempt_timeout: float | None = 2.0,
                 health_check_interval: float | None = 1.0) -> None:
        # Every option is checked here, before anything is made: a bad one would only
        # fail later, inside a timer or a request (a negative connect timeout made
        # Twisted's callLater assert, in a call queued for the first request).
        if isinstance(url, (str, bytes)):
            urls: list[Any] = [url]
        else:
            try:
                urls = list(url)
            except TypeError:  # None, a number...: say which argument, and what it takes
                raise TypeError(f"url must be an endpoint URL (str) or a list of them, not "
                                f"{type(url).__name__}") from None
        if not urls:
            raise errors.InvalidArgument("Client needs at least one endpoint URL")
        endpoints = [parse_endpoint(u) for u in urls]
        if (user is None) != (password is None):
            raise errors.InvalidArgument("user and password go together")
        for name, text in (("user", user), ("password", password)):
            if text is not None and not isinstance(text, str):
                raise TypeError(f"{name} must be a str, not {type(text).__name__}")
        credentials = (user, password) if user is not None and password is not None else None
        timeout = _checks.seconds("timeout", timeout)
        connect_timeout = _checks.seconds("connect_timeout", connect_timeout, none_ok=False)
        max_connections = _checks.positive_int("max_connections", max_connections)
        max_request_bytes = _checks.positive_int("max_request_bytes", max_request_bytes)
        attempt_timeout = _checks.seconds("attempt_timeout", attempt_timeout)
        health_check_interval = _checks.seconds("health_check_interval", health_check_interval)
        self._reactor = reactor
        self._closed = False
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self.max_request_bytes = max_request_bytes
        if agent is not None:
            if ca_cert is not None or cert is not None or key is not None:
                raise errors.InvalidArgument(
                    "ca_cert, cert and key are for coord's own transport; with agent=..., "
                    "give the Agent a contextFactory (BrowserLikePolicyForHTTPS or your own "
                    "IPolicyForHTTPS) that trusts your CA and presents your certificate")
            from coord._twisted.treq import TreqTransport

            self._transport: Any = TreqTransport(reactor, endpoints, agent,
                                                 credentials=credentials,
                                                 attempt_timeout=attempt_timeout,
                                                 check_interval=health_check_interval)
        else:
            tls = None
            if any(ep.tls for ep in endpoints):
                from coord._twisted.tls import client_tls

                tls = client_tls(ca_cert, cert, key)
            self._transport = HttpTransport(reactor, endpoints, connect_timeout=connect_timeout,
                                            max_connections=max_connections, tls=tls,
                                            credentials=credentials,
                                            attempt_timeout=attempt_timeout,
                                            check_interval=health_check_interval)
        #: Internal (for coord.watch, not for applications): every watch of this client
        #: and the shared streams of its ``shared=True`` watches; it holds the only
        #: reference to the transport that watch code uses (its public stream surface,
        #: coord._twisted.StreamTransport).
        self.watch_hub = WatchHub(reactor, self._transport, lambda: self._closed)
        self._watchers = self.watch_hub.watchers

    def __repr__(self) -> str:
        urls = ", ".join(ep.url for ep in self._transport.endpoints)
        return f"<coord.Client {urls}>"

    # plumbing -------------------------------------------------------------------------------

    def call(self, path: str, body: dict, write: bool, timeout: Any = DEFAULT,
             decode: Callable[[Any], Any] | None = None,
             endpoint: str | None = None,
             attempt_timeout: float | None = None) -> defer.Deferred[Any]:
        """One gateway call, ``POST path`` with the JSON ``body``: what every method
        here (and :class:`~coord.Lease`) is made of, for a gateway method the client
        does not wrap.

        Args:
            path: the gateway path, e.g. ``"/v3/maintenance/status"``.
            body: the request as the gateway's JSON (bytes fields base64, int64 as
                strings: see :mod:`coord._wire.codec`).
            write: whether the call changes etcd's state: a write is never re-sent
                once it may have been applied (:class:`~coord.errors.WriteTimeout`).
            timeout: seconds for the whole call (default: the client's ``timeout``).
            decode: turns the answer's JSON into the result (default: the JSON).
            endpoint: send to this endpoint URL only (no failover).
            attempt_timeout: this call's attempt deadline (default: the client's).

        Returns:
            Deferred firing with the decoded answer.

        Raises:
            EtcdError: etcd's error (or one of its subclasses).
            Unavailable, Timeout: as for every call.
        """
        if timeout is DEFAULT:
            timeout = self.timeout
        else:
            timeout = _checks.seconds("timeout", timeout)
        if endpoint is None and attempt_timeout is None:
            return self._transport.request(path, codec.encode(body), write, timeout, decode)
        return self._transport.request(
            path, codec.encode(body), write, timeout, decode,
            endpoint=None if endpoint is None else self._endpoint_index(endpoint),
            attempt_timeout=attempt_timeout)

    def _endpoint_index(self, url: str) -> int:
        urls = [ep.url for ep in self._transport.endpoints]
        wanted = parse_endpoint(url).url
        if wanted not in urls:
            raise errors.InvalidArgument(
                f"{url!r} is not one of this client's endpoints ({', '.join(urls)})")
        return urls.index(wanted)

    def _check_size(self, size: int) -> None:
        if size > self.max_request_bytes:
            raise errors.RequestTooLarge(
                f"request carries {size} bytes of keys and values; etcd accepts at most "
                f"{self.max_request_bytes} (--max-request-bytes)")

    # KV ---------------------------------------------------------------------------------------

    def set(self, key: bytes | str, value: bytes | str = b"", lease: Any = None,
            return_previous: bool = False, ignore_value: bool = False,
            ignore_lease: bool = False, timeout: Any = DEFAULT) -> defer.Deferred[Revision]:
        """Write ``value`` at ``key`` (``Put``).

        Args:
            lease: a :class:`Lease` or lease ID to attach the key to (0/None: none).
            return_previous: also return the key's previous state.
            ignore_value: keep the current value (only change the lease).
            ignore_lease: keep the current lease (only change the value).

        Returns:
            Deferred firing with a :class:`~coord.types.Revision`.

        Raises:
            TypeError: key or value not bytes/str.
            InvalidArgument: empty key.
            RequestTooLarge: key and value bigger than the server accepts.
            LeaseNotFound: the lease does not exist.
        """
        if type(key) is bytes and key and type(value) is bytes and lease is None \
                and not (return_previous or ignore_value or ignore_lease):
            # The common case, without the general path's objects (measured: a third of
            # the client's CPU per put went to building the body).
            self._check_size(len(key) + len(value))
            if value:
                body = b'{"key":"%s","value":"%s"}' % (
                    b2a_base64(key, newline=False), b2a_base64(value, newline=False))
            else:
                body = b'{"key":"%s"}' % b2a_base64(key, newline=False)
            return self._transport.request(
                "/v3/kv/put", body, True,
                self.timeout if timeout is DEFAULT else _checks.seconds("timeout", timeout),
                codec.put_response)
        op = OpSet(key, value, lease, return_previous, ignore_value, ignore_lease)
        self._check_size(len(op.key) + len(op.value))
        return self.call("/v3/kv/put", put_json(op), True, timeout,
                             decode=codec.put_response)

    def get(self, key: KeyLike, limit: int | None = None, sort_order: str | None = None,
            sort_target: str | None = None, revision: int | None = None,
            keys_only: bool = False, count_only: bool = False, serializable: bool = False,
            min_mod_revision: int | None = None, max_mod_revision: int | None = None,
            min_create_revision: int | None = None, max_create_revision: int | None = None,
            timeout: Any = DEFAULT) -> defer.Deferred[Range]:
        """Read a key, or a :class:`KeySet` (``Range``).

        Args:
            limit: at most this many keys (0/None: no limit); ``Range.more`` tells if
                more remain.
            sort_order: ``"ascend"``, ``"descend"`` or None.
            sort_target: ``"key"``, ``"version"``, ``"create"``, ``"mod"`` or ``"value"``.
            revision: read the store as of this revision (0/None: latest).
            keys_only: leave values out.
            count_only: return only the count.
            serializable: answer from the member's local copy (may be stale).
            min_mod_revision, max_mod_revision: filter keys by their mod revision.
            min_create_revision, max_create_revision: filter keys by their create
                revision.

        Returns:
            Deferred firing with a :class:`~coord.types.Range`.

        Raises:
            Compacted: ``revision`` was compacted.
            FutureRevision: it is in the future.
        """
        if type(key) is bytes and key and limit is None and sort_order is None \
                and sort_target is None and revision is None and not keys_only \
                and not count_only and not serializable and min_mod_revision is None \
                and max_mod_revision is None and min_create_revision is None \
                and max_create_revision is None:
            # The common case: one key, no options (see set()).
            return self._transport.request(
                "/v3/kv/range", b'{"key":"%s"}' % b2a_base64(key, newline=False), False,
                self.timeout if timeout is DEFAULT else _checks.seconds("timeout", timeout),
                codec.range_response)
        keys = KeySet.of(key)
        body = range_json(keys, range_options(
            limit, sort_order, sort_target, revision, keys_only, count_only, serializable,
            min_mod_revision, max_mod_revision, min_create_revision, max_create_revision))
        return self.call("/v3/kv/range", body, False, timeout,
                             decode=codec.range_response)

    def delete(self, key: KeyLike, return_previous: bool = False,
               timeout: Any = DEFAULT) -> defer.Deferred[Deleted]:
        """Delete a key, or every key of a :class:`KeySet` (``DeleteRange``).

        Returns:
            Deferred firing with :class:`~coord.types.Deleted` (count, previous values
            when ``return_previous``).
        """
        body = delete_json(KeySet.of(key), bool(return_previous))
        return self.call("/v3/kv/deleterange", body, True, timeout,
                             decode=codec.delete_response)

    def submit(self, txn: Transaction, timeout: Any = DEFAULT) -> defer.Deferred[TransactionResult]:
        """Apply a :class:`Transaction` atomically.

        Returns:
            Deferred firing with a :class:`~coord.types.TransactionResult` when every
            comparison held (its ``responses`` are the success branch's).

        Raises:
            Failed: a comparison did not hold; ``.responses`` holds the failure
                branch's responses.
        """
        if not isinstance(txn, Transaction):
            raise TypeError(f"submit() takes a Transaction, not {type(txn).__name__}")
        self._check_size(txn.payload_bytes())
        write = _txn_writes(txn)
        return self.call("/v3/kv/txn", txn.request_body(), write, timeout,
                             decode=_txn_outcome)

    def compact(self, revision: int, physical: bool = False,
                timeout: Any = DEFAULT) -> defer.Deferred[Header]:
        """Discard history before ``revision`` (``Compact``).

        Args:
            physical: wait until the compaction is physically applied.

        Raises:
            Compacted: ``revision`` is at or below an earlier compaction.
            FutureRevision: ``revision`` is above the current revision.
        """
        if isinstance(revision, bool) or not isinstance(revision, int):
            raise TypeError(f"revision must be an int, not {type(revision).__name__}")
        if revision <= 0:
            raise errors.InvalidArgument(f"revision must be positive, not {revision}")
        body: dict[str, Any] = {"revision": revision}
        if physical:
            body["physical"] = True
        return self.call("/v3/kv/compaction", body, True, timeout,
                             decode=codec.header_response)

    # watches ----------------------------------------------------------------------------------

    def watch(self, keys: Any, on_change: Callable[[Event], Any],
              start_revision: int | None = None, return_previous: bool = False,
              filters: Sequence[str] | None = None,
              idle_timeout: float | None = 60.0, shared: bool = False) -> WatchDeferred:
        """Call ``on_change(event)`` for every change to ``keys``, until cancelled.

        Every event is delivered exactly once, in revision order per key set, across
        broken streams, etcd restarts and endpoint failover (see :mod:`coord.watch`).
        The events of one revision are delivered together, in one reactor turn.

        Args:
            keys: a key, a :class:`KeySet`, or a list of them (one stream serves all;
                order is per key set, and overlapping key sets see an event twice).
            on_change: called with each :class:`~coord.types.Event`.  If it raises, the
                exception is logged with the event and the watch goes on.  It may be an
                ``async def`` function (or any callable returning a coroutine): each
                event's coroutine is started when the event is delivered, in order, and
                runs on its own -- it is *not* awaited before the next event is
                delivered, nor cancelled with the watch; if it fails, its exception is
                logged with the event, as a plain callback's.
            start_revision: deliver changes from this revision on (default: from now).
            return_previous: events carry ``prev_kv``, the key-value before the change.
            filters: ``["noput"]`` and/or ``["nodelete"]`` to leave such events out.
            idle_timeout: seconds without a message after which the stream is assumed
                hung and created again: more than 0 (``None`` or infinity: never).
            shared: watch on streams shared with this client's other ``shared=True``
                watches (see :mod:`coord._watchhub`) instead of a stream -- an HTTP
                connection -- of its own.  Saves: all of a client's shared watches use
                at most 8 connections to etcd (and their file descriptors), however many
                there are; cancelling one closes nothing.  Costs: when 7 shared streams
                exist already, a new watch starts only once a replacement stream
                (merging it with existing watches) is created -- a few milliseconds to
                about a second with thousands of watches (merges wait a little to
                batch new watches); and a slow ``on_change`` holds up its stream-mates.
                Guarantees are the same (exactly once, in order, resumed across broken
                streams and failover, Compacted and other errors per watch, ``ready``,
                ``cancel``); ``d.watcher`` is a :class:`~coord._watchhub.SharedWatcher`
                with the same attributes.  With several shared watches, the shortest
                ``idle_timeout`` of a stream's watches applies to that stream.

        Returns:
            A Deferred (with ``.watcher``, a :class:`~coord.watch.Watcher`): it fires with
            None when cancelled -- ``d.cancel()`` stops delivery at once and closes the
            stream -- and fails with :class:`~coord.errors.Compacted` when the revision
            to deliver from has been compacted, or another error resuming cannot cure.
            ``d.watcher.ready`` fires once etcd has created the watch.

        Raises:
            TypeError: ``on_change`` not callable; a key, ``start_revision`` or
                ``idle_timeout`` of the wrong type.
            InvalidArgument: no key, an empty key, a negative ``start_revision``, an
                unknown filter, a negative, NaN or 0 ``idle_timeout``.
        """
        keysets = keysets_of(keys)
        _check_revision(start_revision)
        callback = _Callback(_checks.callback("on_change", on_change))
        idle_timeout = _checks.seconds("idle_timeout", idle_timeout)
        if shared:
            return SharedWatcher(self, keysets, callback, start_revision or None,
                                 bool(return_previous), filters_of(filters),
                                 idle_timeout).deferred
        watcher = Watcher(self, keysets, None, start_revision or None, bool(return_previous),
                          filters_of(filters), idle_timeout, on_change=callback)
        return watcher.deferred

    def events(self, keys: Any, start_revision: int | None = None,
               return_previous: bool = False, filters: Sequence[str] | None = None,
               idle_timeout: float | None = 60.0) -> EventStream:
        """The changes to ``keys`` as an async iterator (``async for event in ...``).

        Same arguments, guarantees and argument errors as :meth:`watch`; call ``close()``
        (or use ``async with``) to stop.  A Compacted start revision is raised from the
        loop.
        """
        keysets = keysets_of(keys)
        _check_revision(start_revision)
        idle_timeout = _checks.seconds("idle_timeout", idle_timeout)
        return EventStream(self, keysets, start_revision or None, bool(return_previous),
                           filters_of(filters), idle_timeout)

    # leases -----------------------------------------------------------------------------------

    def lease(self, time_to_live: int, lease_id: int | None = None,
              timeout: Any = DEFAULT) -> defer.Deferred[Lease]:
        """Grant a lease (``LeaseGrant``).

        Args:
            time_to_live: seconds the lease lives without a refresh (etcd may grant
                more: it has a minimum TTL).
            lease_id: ask for this ID (None/0: the server picks one).

        Returns:
            Deferred firing with a :class:`~coord.lease.Lease`.
        """
        # etcd itself raises a TTL <= 0 to its minimum (2 s, seen on 3.4.23 and 3.5.1):
        # refused here, as a computation gone wrong more likely than a wish for that.
        time_to_live = _checks.positive_int("time_to_live", time_to_live,
                                            maximum=MAX_LEASE_TTL)
        body: dict[str, Any] = {"TTL": time_to_live}
        if lease_id:
            if isinstance(lease_id, bool) or not isinstance(lease_id, int):
                raise TypeError(f"lease_id must be an int, not {type(lease_id).__name__}")
            if lease_id < 0:
                raise errors.InvalidArgument(f"lease_id must be positive, not {lease_id}")
            body["ID"] = lease_id
        d = self.call("/v3/lease/grant", body, True, timeout, decode=codec.unary)

        def granted(obj: dict) -> Lease:
            if obj.get("error"):
                raise errors.EtcdError(obj["error"])
            return Lease(self, int(obj["ID"]), int(obj.get("TTL", 0)),
                         codec.header(obj.get("header")))

        return d.addCallback(granted)

    def leases(self, timeout: Any = DEFAULT) -> defer.Deferred[list[Lease]]:
        """Every lease the cluster holds (``LeaseLeases``), as :class:`Lease` handles."""
        d = self.call("/v3/lease/leases", {}, False, timeout, decode=codec.unary)
        return d.addCallback(
            lambda obj: [Lease(self, int(x["ID"])) for x in obj.get("leases") or ()])

    # maintenance and cluster ----------------------------------------------------------------

    def status(self, timeout: Any = DEFAULT, endpoint: str | None = None,
               ) -> defer.Deferred[Status]:
        """The status of the member that answers (version, leader, db size, ...).

        Args:
            endpoint: ask this member (one of the client's URLs) and no other: fails
                with Unavailable if it cannot answer.  By default any member answers.
        """
        return self.call("/v3/maintenance/status", {}, False, timeout,
                             decode=codec.status_response, endpoint=endpoint)

    def alarms(self, timeout: Any = DEFAULT) -> defer.Deferred[list[Alarm]]:
        """The alarms raised in the cluster (NOSPACE, CORRUPT)."""
        return self.call("/v3/maintenance/alarm", {"action": "GET"}, False, timeout,
                             decode=codec.alarms)

    def disarm(self, alarm: Alarm, timeout: Any = DEFAULT) -> defer.Deferred[list[Alarm]]:
        """Deactivate ``alarm`` (after the cause was fixed, e.g. space freed)."""
        body = {"action": "DEACTIVATE", "memberID": alarm.member_id, "alarm": alarm.alarm.value}
        return self.call("/v3/maintenance/alarm", body, True, timeout,
                             decode=codec.alarms)

    def defragment(self, timeout: Any = DEFAULT, endpoint: str | None = None,
                   ) -> defer.Deferred[None]:
        """Defragment a member's backend database (it blocks meanwhile).

        Args:
            endpoint: the member to defragment (one of the client's URLs); only that
                member is asked.  By default, the member that answers -- with several
                endpoints, name one: defragmenting is per member.
        """
        return self.call("/v3/maintenance/defragment", {}, False, timeout,
                             decode=codec.defragment_response, endpoint=endpoint)

    def members(self, timeout: Any = DEFAULT) -> defer.Deferred[list[Member]]:
        """The cluster's members (``MemberList``)."""
        return self.call("/v3/cluster/member/list", {}, False, timeout,
                             decode=codec.members_response)

    # recipes ----------------------------------------------------------------------------------

    def lock(self, name: bytes | str, timeout: float | None = None,
             ttl: int = 10) -> defer.Deferred[Lock]:
        """Wait for, and hold, the lock called ``name`` (the guide's ``etcd.lock(...)``).

        The lock has a session (a lease of ``ttl`` seconds, kept alive) of its own; its
        ``release()`` revokes that lease.  Same key layout as etcd's Go ``Mutex`` and
        ``etcdctl lock``.  See :class:`coord.recipes.Lock` for fencing tokens and guards,
        and for several locks sharing one session.

        ``timeout`` is seconds to wait at most (None or infinity: no limit); 0 means "do
        not wait", as for ``Lock.acquire``: a free lock is taken, a held one raises
        Timeout at once.

        Raises:
            Timeout: not held within ``timeout`` seconds (no key and no lease remain).
            TypeError, InvalidArgument: a bad ``name``, ``timeout`` (not a number;
                negative or NaN) or ``ttl`` (not an int from 1 to etcd's largest TTL);
                raised at once, before a lease is granted.
        """
        from coord.recipes.lock import acquire_lock

        return acquire_lock(self, name, timeout=timeout, ttl=ttl)

    # lifetime ---------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def reactor(self) -> Any:
        """The reactor the client runs on (its clock and timers), which recipes and
        sessions built on this client schedule their work with."""
        return self._reactor

    def close(self) -> defer.Deferred[None]:
        """Close every connection; pending calls fail with Unavailable, watches end (their
        Deferreds fire with None, as if cancelled), later calls fail at once.

        The Deferred fires once every connection is closed: at once, except that a
        connection owing the answer of a read-only transaction waits up to 1 s for it
        (closing it earlier can crash etcd 3.5.0-3.5.4; see "Timeouts and
        cancellation" in docs/client.md)."""
        self._closed = True
        for watcher in list(self.watch_hub.watchers):
            watcher.cancel()
        self.watch_hub.close()
        return self._transport.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _Callback:
    """A watch's ``on_change``, run so that an ``async def`` one runs too.

    A coroutine function called per event returns a coroutine that nobody would run (the
    events were lost, with only a RuntimeWarning "never awaited"): it is started here,
    with Deferred.fromCoroutine (which runs it up to its first wait at once, so the
    coroutines start in event order), and its failure is logged as the Watcher logs a
    plain callback's exception.  A plain callback's exception goes on to the Watcher,
    which logs it.  (A Deferred a callback returns is left alone: it is the caller's.)
    The repr is the callback's, for the Watcher's log line.
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Event], Any]) -> None:
        self.fn = fn

    def __repr__(self) -> str:
        return repr(self.fn)

    def __call__(self, event: Event) -> None:
        result = self.fn(event)
        if result is not None and isinstance(result, Coroutine):
            defer.Deferred.fromCoroutine(result).addErrback(self._failed, event)

    def _failed(self, failure: Any, event: Event) -> None:
        log.failure("watch callback {cb!r} raised on {event!r}; the watch goes on",
                    failure, cb=self.fn, event=event)


def _check_revision(revision: Any) -> None:
    if revision is None:
        return
    if isinstance(revision, bool) or not isinstance(revision, int):
        raise TypeError(f"start_revision must be an int, not {type(revision).__name__}")
    if revision < 0:
        raise errors.InvalidArgument(f"start_revision must be >= 0, not {revision}")


def _txn_writes(txn: Transaction) -> bool:
    """Whether a transaction may write (if every operation is a read, re-sending is safe)."""
    for op in txn.success + txn.failure:
        if isinstance(op, Transaction):
            if _txn_writes(op):
                return True
        elif not hasattr(op, "options"):  # OpSet, OpDel
            return True
    return False


def _txn_outcome(obj: dict) -> TransactionResult:
    result = codec.txn_response(obj)
    if not result.succeeded:
        raise errors.Failed(result.responses, result.header)
    return result
