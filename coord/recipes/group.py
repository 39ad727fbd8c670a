"""Group: membership with per-member data (a service registry), on the owned-key core.

Each member writes one key, ``name + "/" + member id``, whose value is its data, attached
to its session's lease: the key goes when the member leaves, when its process dies (the
lease expires) or when someone deletes it.  The member id is the caller's
(``Group(session, name, member=b"web-1")``) or, by default, the lowercase hex of the
session's lease ID (as a Lock's key), fixed when the Group is made: a re-join on a new
session keeps it.  Members never wait for one another: joining is one transaction.

* :meth:`Group.join` / :meth:`Group.update` / :meth:`Group.leave` -- the owned-key
  lifecycle (:mod:`coord.recipes._core`): a join written in a transaction that refuses a
  key of another lease (:class:`~coord.errors.MemberExists`), updates guarded on our
  key's create revision, a guarded and idempotent leave, a join that timed out or was
  cancelled removes what it wrote, and ``lost`` says why our key went
  (:class:`~coord.errors.SessionLost` or :class:`~coord.errors.MembershipLost`).
* :func:`members` -- every member and its data at one revision (paged reads, all at
  that revision).
* :func:`watch` -- the members now and every join, update and leave, one report per
  revision, from the prefix mirror (:mod:`coord.recipes._mirror`).
* re-joining (Curator's PersistentNode): ``Group(..., rejoin=True)`` makes a new session
  of the same TTL when ours ends, and joins again with our latest data;
  :meth:`Group.rejoin` does it once on a session of the caller's.

Ids with a ``/`` are refused, and keys deeper than ``name/<id>`` are not members: a
group ``svc`` does not count the members of a group ``svc/eu``.  See ``docs/group.md``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import txaio
from twisted.internet import defer
from twisted.python.failure import Failure

from coord import errors
from coord.errors import MemberExists, MembershipLost, SessionLost
from coord.keyset import KeySet, as_bytes
from coord.recipes._core import OwnedKey, Phase, _owners, kvs
from coord.recipes._loop import (
    Shared,
    callback,
    check_name,
    check_timeout,
    detached,
    positive_int,
    sleep,
    start,
    with_timeout,
)
from coord.recipes._mirror import PAGE_SIZE, Mirror, invoke
from coord.recipes._mirror_state import Change
from coord.session import Session
from coord.txn import CompCreated, OpGet, OpSet, Transaction
from coord.types import Header, KeyValue

if TYPE_CHECKING:
    from coord.client import Client

__all__ = [
    "Group",
    "GroupState",
    "GroupWatch",
    "Members",
    "MembershipChange",
    "members",
    "watch",
]

log = txaio.make_logger()  # type: ignore[attr-defined]  # set by txaio.use_twisted()

# Pauses between re-join attempts that failed for a reason time may cure (doubling).
REJOIN_PAUSE, REJOIN_MAX_PAUSE = 0.2, 5.0
_RETRY = (errors.Unavailable, errors.Timeout, SessionLost)


class GroupState(enum.Enum):
    """A :class:`Group` membership's state: OUT (not joined, never or left); JOINING
    (our key is being written); JOINED; LOST (was joined; our key was deleted or the
    session ended); REJOINING (lost, and joining again on a new session)."""

    OUT = "OUT"  # not joined (never, or left)
    JOINING = "JOINING"  # our key is being written
    JOINED = "JOINED"
    LOST = "LOST"  # was joined; our key was deleted or the session ended
    REJOINING = "REJOINING"  # lost, and joining again on a new session


_STATES = {Phase.IDLE: GroupState.OUT, Phase.WAITING: GroupState.JOINING,
           Phase.HELD: GroupState.JOINED, Phase.LOST: GroupState.LOST}


def _prefix(name: bytes | str) -> bytes:
    return check_name(name, "group") + b"/"


def _member_id(prefix: bytes, key: bytes) -> bytes | None:
    """The member id of ``key``, or None if it is no member of the group (deeper)."""
    member = key[len(prefix):]
    return member if member and b"/" not in member else None


def _id(member: Any) -> Any:
    return member.encode() if isinstance(member, str) else member


class Members(Mapping[bytes, bytes]):
    """The members of a group at one store revision: member id -> data, immutable.

    Ids are bytes; a str id is looked up as its UTF-8 (``"api-1" in members``).

    Attributes:
        revision: the store revision it reflects.
    """

    __slots__ = ("_kvs", "revision")

    def __init__(self, entries: dict[bytes, KeyValue], revision: int) -> None:
        self._kvs = entries  # never changed once a Members holds it
        self.revision = revision

    def __getitem__(self, member: bytes | str) -> bytes:
        return self._kvs[_id(member)].value

    def __contains__(self, member: object) -> bool:
        return _id(member) in self._kvs

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._kvs)

    def __len__(self) -> int:
        return len(self._kvs)

    def __repr__(self) -> str:
        return f"<Members revision={self.revision} {sorted(self._kvs)!r}>"

    def kv(self, member: bytes | str) -> KeyValue:
        """The member's key-value (key, create revision = when it joined, lease...)."""
        return self._kvs[_id(member)]

    def in_join_order(self) -> list[bytes]:
        """The member ids, oldest join (lowest create revision) first."""
        return sorted(self._kvs, key=lambda m: self._kvs[m].create_revision)


@attrs.frozen
class MembershipChange:
    """What one revision (or one resync) changed in a group.

    Attributes:
        revision: the store revision after it.
        joined: members that appeared, with their data.
        updated: members whose data was written again, with the new data.
        left: members that went (left, expired, deleted), with their last data.
        members: the :class:`Members` after the change.
        first: the first report (the members when watching started: all ``joined``).
        resync: the difference between the last view and a fresh read (after a
            compaction): a member that left and joined again meanwhile is in ``left``
            and in ``joined``.
    """

    revision: int
    joined: Mapping[bytes, bytes]
    updated: Mapping[bytes, bytes]
    left: Mapping[bytes, bytes]
    members: Members
    first: bool = False
    resync: bool = False


def diff(prefix: bytes, entries: dict[bytes, KeyValue], change: Change[KeyValue]
         ) -> tuple[dict[bytes, KeyValue], dict[bytes, bytes], dict[bytes, bytes],
                    dict[bytes, bytes]]:
    """What a mirror's ``change`` does to the members ``entries`` (id -> KeyValue), sans
    I/O: ``(new entries, joined, updated, left)``; ``entries`` is not changed.

    A key whose create revision differs from before (a resync over a leave and a join)
    left and joined; keys deeper than ``prefix + id`` are no members.
    """
    entries = dict(entries)
    joined: dict[bytes, bytes] = {}
    updated: dict[bytes, bytes] = {}
    left: dict[bytes, bytes] = {}
    for key, was in change.before.items():
        member = _member_id(prefix, key)
        if member is None:
            continue
        now = change.after.get(key)
        if now is None or now.create_revision != was.create_revision:
            left[member] = was.value
            del entries[member]
    for key, kv in change.after.items():
        member = _member_id(prefix, key)
        if member is None:
            continue
        if member in entries:
            updated[member] = kv.value
        else:
            joined[member] = kv.value
        entries[member] = kv
    return entries, joined, updated, left


async def _read(client: Client, prefix: bytes, page_size: int) -> Members:
    """Every member under ``prefix`` at one revision: the first page at the current
    revision R, the next ones after the last key so far, read at R too."""
    keys = KeySet(prefix, prefix=True)
    while True:
        try:
            page = await client.get(keys, limit=page_size)
            revision, found, more = page.header.revision, list(page.kvs), page.more
            while more and page.kvs:
                page = await client.get(KeySet(page.kvs[-1].key + b"\0", keys.range_end),
                                        limit=page_size, revision=revision)
                found += page.kvs
                more = page.more
        except errors.Compacted:
            continue  # R was compacted between two pages: read again at a newer one
        entries = {}
        for kv in found:
            member = _member_id(prefix, kv.key)
            if member is not None:
                entries[member] = kv
        return Members(entries, revision)


def members(client: Client, name: bytes | str, timeout: float | None = None,
            page_size: int = PAGE_SIZE) -> defer.Deferred[Members]:
    """The members of group ``name`` and their data, as of one store revision.

    Args:
        timeout: seconds the read may take (None: the client's per-call timeouts only).
        page_size: keys per range request; every page is read at the first one's
            revision, so the pages make one state of the store.

    Returns:
        Deferred firing with a :class:`Members` (``revision`` is the read's).

    Raises:
        Timeout: not read in time.
        TypeError, InvalidArgument: a bad argument (raised at once).

    Cancelling the Deferred abandons the read.
    """
    prefix = _prefix(name)
    timeout = check_timeout(timeout, zero_ok=False)
    page_size = positive_int("page_size", page_size)
    return with_timeout(start(_read(client, prefix, page_size)), timeout, client.reactor,
                        f"could not read group {prefix[:-1]!r} within {timeout} s")


class Group(OwnedKey):
    """Our membership of the group ``name``, through ``session``'s lease.

    Args:
        session: a :class:`coord.session.Session`; its lease keeps our key alive.
        name: the group's name (bytes or str); keys live under ``name + b"/"``.
        member: our member id (bytes or str, no ``/``); default: the session's lease
            ID in lowercase hex.  Fixed for the life of this object.
        rejoin: when the session ends while we are a member, make a new session of
            the same TTL (owned by this Group, closed by :meth:`leave`) and join again
            with our latest data (see :attr:`rejoined`).

    Attributes:
        name: the group's name (bytes).
        prefix: ``name/``.
        key: our key, ``name/<member id>``.
        member: our member id (bytes).
        data: our latest data (of the last join or update); None before.
        token: our key's create revision once joined (kept after a leave or loss).
        rejoins: how many times we joined again after a loss.

    Raises:
        TypeError: a bad session, name or member id.
        InvalidArgument: an empty name or member id, or one with a ``/``.
    """

    lost_error = MembershipLost
    watch_while_held = True  # a member's key is watched at once: `lost` and re-joins

    def __init__(self, session: Session, name: bytes | str, member: bytes | str | None = None,
                 rejoin: bool = False) -> None:
        super().__init__(session, name)
        if member is None:
            member = b"%x" % session.lease_id
        member = as_bytes(member, "member")
        if not member or b"/" in member:
            raise errors.InvalidArgument(f"a member id must be non-empty and have no '/', "
                                         f"not {member!r}")
        if not isinstance(rejoin, bool):
            raise TypeError(f"rejoin must be a bool, not {type(rejoin).__name__}")
        self.member = member
        self.key = self.prefix + member
        self.data: bytes | None = None
        self.rejoins = 0
        self._rejoin = rejoin
        self._ttl = session.ttl
        self._leases = {session.lease_id}  # ours, now or before: a key of theirs is ours
        self._owned: Session | None = None  # a session we made to re-join
        self._rejoining: defer.Deferred[Any] | None = None
        self._rejoined: list[defer.Deferred[Session]] = []
        self._watching_loss: defer.Deferred[Any] | None = None

    def __repr__(self) -> str:
        token = f" token={self.token}" if self._phase in (Phase.HELD, Phase.LOST) else ""
        return f"<Group {self.name!r} member={self.member!r} {self.state.name}{token}>"

    @property
    def state(self) -> GroupState:
        """OUT, JOINING, JOINED, LOST or REJOINING (see :class:`GroupState`)."""
        if self._rejoining is not None and self._phase is not Phase.HELD:
            return GroupState.REJOINING
        return _STATES[self._phase]

    @property
    def joined(self) -> bool:
        """Whether we are a member as far as we can tell (JOINED and the session alive)."""
        return self._holding

    @property
    def lost(self) -> defer.Deferred[errors.CoordError]:
        """A new Deferred firing with the reason our membership ended without a leave:
        :class:`~coord.errors.SessionLost` (the lease expired or was revoked, or the
        session could not keep it alive past its deadline) or
        :class:`~coord.errors.MembershipLost` (someone deleted our key while the lease
        lives).  It concerns the current membership (or the next, if read before
        joining); fired already once LOST; never for :meth:`leave`.  Cancelling it just
        stops observing."""
        return OwnedKey.lost.fget(self)  # type: ignore[attr-defined]  # a property

    # joining ------------------------------------------------------------------------------

    def join(self, data: bytes | str, timeout: float | None = None) -> defer.Deferred[Group]:
        """Join with ``data``: write our key, with our session's lease.

        A key of ours already there (written by an earlier join of this lease, or of a
        session of ours that ended but whose lease etcd still holds) is taken over: its
        data and lease are set, its create revision (``token``) kept.

        Args:
            data: what :func:`members` and watchers see for us (bytes or str).
            timeout: seconds the join may take (None: the client's per-call timeouts).

        Returns:
            Deferred firing with this Group once our key is written.

        Raises:
            MemberExists: our member id's key carries another session's lease, or a
                Group of another session of this client uses it (nothing is written,
                nothing deleted; raised at once in the second case).
            SessionLost: the session has ended.
            Timeout: not joined in time; what we may have written is removed.
            TypeError: ``data`` is not bytes or str, ``timeout`` not a number (at once).
            InvalidArgument: already joined, joining or re-joining, another Group object
                of this session uses our key, a ``timeout`` that is negative, NaN or 0
                (at once, nothing written).

        Cancelling the Deferred (or :meth:`leave`) removes our key if it was written.
        """
        data = as_bytes(data, "data")
        timeout = check_timeout(timeout, zero_ok=False)
        if self._rejoining is not None:
            raise errors.InvalidArgument(f"{self!r}: already joining again on its own")
        return self._join(data, timeout)

    def _join(self, data: bytes, timeout: float | None) -> defer.Deferred[Group]:
        other = _owners.get((id(self.client), self.key))
        if (other is not None and other is not self and other.active
                and other.session is not self.session):
            # (The core refuses two live objects of one client on one key; between
            # sessions that is a member id in use, as etcd would tell another client.)
            raise MemberExists(f"{other!r}, of another session of this client, uses "
                               f"{self.key!r}")

        async def take() -> Group:
            await self._obtain(lambda: self._write(data))
            self.data = data
            self._watch_loss()
            return self

        return self._run(take, timeout, f"could not join group {self.name!r} within "
                                        f"{timeout} s")

    async def _write(self, data: bytes) -> tuple[int, list[KeyValue], Header]:
        """The core's enqueue: our key unless it exists; nothing to wait for."""
        txn = Transaction(compare=[CompCreated(self.key, "==", 0)],
                          success=[OpSet(self.key, data, lease=self.session.lease_id)],
                          failure=[OpGet(self.key)])
        self._attempt = Shared(self.client.submit(txn))
        try:
            result = await self._attempt.wait()
            return result.header.revision, [], result.header
        except errors.Failed as failed:
            (mine,) = kvs(failed.responses[0])
            if mine.lease not in self._leases:
                # Not ours: never clean it up (the core would delete a failed take's key).
                self._attempt = None
                raise MemberExists(
                    f"{self.key!r} is in use by lease {mine.lease:#x} (another session)"
                ) from None
            header = failed.header
            if mine.value != data or mine.lease != self.session.lease_id:
                # (Guarded on its create revision: applies at most once, never to a
                # key someone else wrote after ours went.)
                header = (await self.client.submit(self._put(mine.create_revision,
                                                             data))).header
            return mine.create_revision, [], header

    def update(self, data: bytes | str) -> defer.Deferred[int]:
        """Set our data, if our key is still the one we joined with.

        Returns:
            Deferred firing with the store revision of the write.

        Raises:
            MembershipLost: our key is gone (deleted, or with our session's lease: the
                cause says which; ``lost`` fires too), or we are not joined.
            TypeError: ``data`` is not bytes or str (at once).
        """
        data = as_bytes(data, "data")
        return start(self._update(data))

    async def _update(self, data: bytes) -> int:
        reason = self._lost_reason
        if self._phase is Phase.LOST and reason is not None:
            raise MembershipLost(f"{self!r}: {reason}") from reason
        if self._phase is not Phase.HELD or self.token is None:
            raise MembershipLost(f"{self!r} is not a member: cannot update")
        token = self.token
        try:
            self.session.check()
            result = await self.client.submit(self._put(token, data))
        except SessionLost as ended:
            self._lose(ended, token)
            raise MembershipLost(f"{self!r}: {ended}") from ended
        except errors.Failed:
            reason = await self._gone_reason("was deleted")
            self._lose(reason, token)
            raise MembershipLost(f"{self.key!r} is gone: {reason}") from reason
        except errors.LeaseNotFound as gone:
            expired = self.session.lease_gone(gone)
            self._lose(expired, token)
            raise MembershipLost(f"{self!r}: {expired}") from expired
        if self.token == token:
            self.data = data
        return result.header.revision

    # re-joining ---------------------------------------------------------------------------

    def _watch_loss(self) -> None:
        if not self._rejoin:
            return
        lost = self._watching_loss = self.lost
        lost.addCallbacks(self._lost, lambda _: None)

    def _lost(self, reason: errors.CoordError) -> None:
        self._watching_loss = None
        if isinstance(reason, SessionLost) and self._rejoining is None:
            log.info("{g}: {reason}; joining again on a new session", g=self, reason=reason)
            self._rejoining = start(self._rejoin_loop())
            self._rejoining.addErrback(lambda f: f.trap(defer.CancelledError))

    async def _rejoin_loop(self) -> None:
        pause = REJOIN_PAUSE
        try:
            while True:
                try:
                    if not self.session.alive:
                        await self._use(await Session.create(self.client, self._ttl),
                                        owned=True)
                    assert self.data is not None
                    await self._join(self.data, None)
                    break
                except _RETRY as exc:
                    log.warn("{g}: re-joining failed ({error}); again in {pause} s",
                             g=self, error=exc, pause=pause)
                    await sleep(self.client.reactor, pause)
                    pause = min(pause * 2, REJOIN_MAX_PAUSE)
        except defer.CancelledError:
            self._rejoining = None
            raise
        except Exception as exc:
            self._rejoining = None
            log.error("{g}: re-joining stopped: {error}", g=self, error=exc)
            self._tell_rejoined(Failure())
            return
        self._rejoining = None
        self.rejoins += 1
        self._tell_rejoined(self.session)

    async def _use(self, session: Session, owned: bool) -> None:
        """Make ``session`` ours (closing a session we made before)."""
        old, self._owned = self._owned, (session if owned else None)
        self.session, self.client = session, session.client
        self._leases.add(session.lease_id)
        if old is not None and old is not session:
            await detached(old.close().addErrback(lambda _: None))

    def _tell_rejoined(self, result: Any) -> None:
        waiters, self._rejoined = self._rejoined, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    @property
    def rejoined(self) -> defer.Deferred[Session]:
        """A new Deferred firing with the new Session once we joined again after a
        loss (``rejoin=True``), or failing with the error that stopped re-joining (one
        time cannot cure, e.g. MemberExists or PermissionDenied: we stay out).
        Cancelling it just stops observing."""
        d: defer.Deferred[Session] = defer.Deferred(
            lambda d: self._rejoined.remove(d) if d in self._rejoined else None)
        self._rejoined.append(d)
        return d

    def rejoin(self, session: Session, timeout: float | None = None
               ) -> defer.Deferred[Group]:
        """Join again with our latest data, on ``session`` (say, one made after ours
        ended), under the same member id.

        Returns, raises and cancels as :meth:`join`; also raises InvalidArgument if we
        are joined or joining, or never joined (no data), and TypeError for a session
        that is not a Session.
        """
        if not isinstance(session, Session):
            raise TypeError(f"session must be a coord.session.Session, not "
                            f"{type(session).__name__}")
        timeout = check_timeout(timeout, zero_ok=False)
        if self.data is None:
            raise errors.InvalidArgument(f"{self!r} never joined: nothing to re-join with")
        if self._phase in (Phase.WAITING, Phase.HELD) or self._rejoining is not None:
            raise errors.InvalidArgument(f"{self!r} is {self.state.name.lower()}")

        async def go() -> Group:
            await self._use(session, owned=False)
            assert self.data is not None
            await self._join(self.data, timeout)
            self.rejoins += 1
            return self

        return start(go())

    # leaving ------------------------------------------------------------------------------

    def leave(self) -> defer.Deferred[None]:
        """Leave: delete our key, if it is still the one we joined with; stop re-joining
        and close the session this Group made for it, if any.

        Idempotent; guarded on our create revision (a late leave never deletes a newer
        key).  Leaving while joining cancels the join.

        Returns:
            Deferred firing with None once our key is gone.
        """
        rejoining, self._rejoining = self._rejoining, None
        if rejoining is not None:
            rejoining.cancel()
        if self._watching_loss is not None:
            watching, self._watching_loss = self._watching_loss, None
            watching.cancel()
        left = self._let_go()
        owned, self._owned = self._owned, None
        if owned is None:
            return left

        async def close() -> None:
            try:
                await left
            finally:
                await owned.close()

        return start(close())

    # reading and watching -----------------------------------------------------------------

    def members(self, timeout: float | None = None) -> defer.Deferred[Members]:
        """The group's members at one revision (see :func:`members`)."""
        return members(self.client, self.name, timeout)

    def watch(self, callback: Callable[[MembershipChange], Any] | None = None) -> GroupWatch:
        """The group's members now and at every change (see :func:`watch`)."""
        return watch(self.client, self.name, callback)


# watching -----------------------------------------------------------------------------------

def watch(client: Client, name: bytes | str,
          callback: Callable[[MembershipChange], Any] | None = None) -> GroupWatch:
    """Report the members of group ``name`` now and every join, update and leave.

    Args:
        client: a :class:`coord.Client` (watching writes nothing: no session needed).
        callback: called with a :class:`MembershipChange` for the members at the
            start (``first``) and then for each revision that changes them, in order.
            It may be ``async def``: its coroutine is started, not awaited.  An
            exception it raises is logged and watching goes on.

    Returns:
        A :class:`GroupWatch`.
    """
    if callback is not None:
        callback = _callback(callback)
    return GroupWatch(client, _prefix(name), callback)


def _callback(fn: Any) -> Any:
    return callback("callback", fn)


class GroupWatch:
    """The members of a group, kept up to date (made by :func:`watch`).

    On a prefix mirror: one read of the group at a revision, then a watch from the
    next, one report per revision in order, resumed after a broken stream; after a
    compaction the group is read again and the difference is one report (``resync``).
    ``Unavailable`` and ``Timeout`` are retried; another error ends it (``done``).

    Attributes:
        members: the :class:`Members` now (None before the first read).
    """

    def __init__(self, client: Client, prefix: bytes,
                 callback: Callable[[MembershipChange], Any] | None) -> None:
        self.prefix = prefix
        self.members: Members | None = None
        self._callback = callback
        self._entries: dict[bytes, KeyValue] = {}
        self._closed = False
        self._ready: defer.Deferred[Members] = defer.Deferred()
        self._ready_shared = Shared(self._ready)
        self._done: defer.Deferred[None] = defer.Deferred()
        self._done_shared = Shared(self._done)
        self._mirror: Mirror[KeyValue] = Mirror(
            client, KeySet(prefix, prefix=True), self._changed, self._ended,
            lambda: errors.CoordError(f"{self!r} closed"), retry_first_read=True,
            name=f"group {prefix[:-1]!r}")
        self._mirror.start().addErrback(self._not_started)

    def __repr__(self) -> str:
        state = "CLOSED" if self._closed else "WATCHING"
        count = 0 if self.members is None else len(self.members)
        return f"<GroupWatch {self.prefix[:-1]!r} {state} members={count}>"

    @property
    def resyncs(self) -> int:
        """How many times the group was read again (after a compaction)."""
        return self._mirror.resyncs

    @property
    def ready(self) -> defer.Deferred[Members]:
        """A new Deferred firing with the members at the start."""
        return self._ready_shared.wait()

    @property
    def done(self) -> defer.Deferred[None]:
        """A new Deferred firing with None once closed, or failing with the error that
        ended watching."""
        return self._done_shared.wait()

    def wait(self, predicate: Callable[[Members], Any], timeout: float | None = None
             ) -> defer.Deferred[Members]:
        """Fire with the members once ``predicate(members)`` is true: checked now (once
        read) and after every change.

        Raises:
            Timeout: not true within ``timeout`` seconds (None: no limit).
            CoordError: the watch was closed or ended.

        Cancelling the Deferred stops the wait.
        """
        _callback(predicate)

        def test() -> tuple[bool, Any]:
            current = self.members
            return (current is not None and bool(predicate(current))), current

        return self._mirror.wait(test, timeout, f"group {self.prefix[:-1]!r}: not as waited "
                                                "for")

    def _changed(self, change: Change[KeyValue]) -> None:
        if not change and not change.first:
            return  # a confirmed revision, nothing changed
        entries, joined, updated, left = diff(self.prefix, self._entries, change)
        self._entries = entries
        self.members = Members(entries, change.revision)
        if not (joined or updated or left or change.first) or self._closed:
            return
        report = MembershipChange(change.revision, joined, updated, left, self.members,
                                  first=change.first, resync=change.resync)
        if not self._ready.called:
            self._ready.callback(self.members)
            if self._closed:
                return
        if self._callback is not None:
            invoke(self._callback, report, "{w}: callback {cb!r} raised on revision {rev}; "
                   "watching goes on", w=self, cb=self._callback, rev=change.revision)

    def _not_started(self, failure: Failure) -> None:
        if not failure.check(defer.CancelledError):
            self._fail(failure.value)  # type: ignore[arg-type]  # a Failure has a value

    def _ended(self, error: BaseException | None) -> None:
        if error is None:
            self.close()
        else:
            self._fail(error)

    def _fail(self, exc: BaseException) -> None:
        if self._closed:
            return
        log.error("{w} ended: {error}", w=self, error=exc)
        self._closed = True
        self._mirror.close()
        if not self._ready.called:
            self._ready.errback(exc)
        self._done.errback(exc)

    def close(self) -> None:
        """Stop watching: no report after this returns; waits fail.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._mirror.close()
        if not self._ready.called:
            self._ready.errback(defer.CancelledError(f"{self!r} closed"))
        self._done.callback(None)

    cancel = close
