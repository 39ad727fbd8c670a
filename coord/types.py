"""Frozen values that coord's calls return.

Every int64 of etcd's API is a Python ``int`` here (the gateway sends them as JSON
strings), every bytes field is ``bytes``, and a field the gateway omitted has its zero
value (``0``, ``b""``, ``False``, ``[]``), as protobuf's JSON mapping prescribes.
"""

from __future__ import annotations

import enum

import attrs

__all__ = [
    "Alarm",
    "AlarmType",
    "Deleted",
    "Event",
    "EventType",
    "Header",
    "KeyValue",
    "LeaseTimeToLive",
    "Member",
    "Range",
    "Revision",
    "Status",
    "TransactionResult",
]


@attrs.frozen
class Header:
    """The response header etcd puts on every answer (``etcdserverpb.ResponseHeader``).

    Attributes:
        cluster_id: the cluster's ID.
        member_id: the ID of the member that answered.
        revision: the key-value store revision when the request was applied; for a
            watch response, the revision the response reflects.
        raft_term: the raft term when the request was applied.
    """

    cluster_id: int = 0
    member_id: int = 0
    revision: int = 0
    raft_term: int = 0


@attrs.frozen
class KeyValue:
    """One key's state (``mvccpb.KeyValue``).

    Attributes:
        key: the key.
        value: the value (``b""`` when the read asked for keys only).
        create_revision: revision of the last creation of this key.
        mod_revision: revision of the last modification of this key.
        version: number of modifications since the key was created (a delete resets it to 0).
        lease: ID of the lease attached to the key, 0 for none.
    """

    key: bytes
    value: bytes = b""
    create_revision: int = 0
    mod_revision: int = 0
    version: int = 0
    lease: int = 0


@attrs.frozen
class Range:
    """The answer to a get (``RangeResponse``).

    Attributes:
        kvs: the matching key-values (empty when the read asked for the count only).
        count: the number of keys in the range (may exceed ``len(kvs)`` with a limit).
        more: whether more keys remain beyond ``kvs`` (a limit cut the answer short).
        header: the response header.
    """

    kvs: list[KeyValue] = attrs.field(factory=list)
    count: int = 0
    more: bool = False
    header: Header = attrs.field(factory=Header)


@attrs.frozen
class Revision:
    """The answer to a set (``PutResponse``).

    Attributes:
        revision: the store revision of the write.
        previous: the key's previous state when asked for with ``return_previous``
            (``None`` if not asked for or the key did not exist).
        header: the response header.
    """

    revision: int
    previous: KeyValue | None = None
    header: Header = attrs.field(factory=Header)


@attrs.frozen
class Deleted:
    """The answer to a delete (``DeleteRangeResponse``).

    Attributes:
        deleted: how many keys were deleted.
        previous: the deleted key-values when asked for with ``return_previous``.
        header: the response header.
    """

    deleted: int = 0
    previous: list[KeyValue] = attrs.field(factory=list)
    header: Header = attrs.field(factory=Header)


@attrs.frozen
class TransactionResult:
    """The answer to a transaction (``TxnResponse``).

    Attributes:
        succeeded: whether every comparison held (the ``success`` branch ran).
        responses: one response per operation of the branch that ran: :class:`Range`,
            :class:`Revision`, :class:`Deleted` or (nested) :class:`TransactionResult`.
            etcd gives these inner responses only a revision in their header (cluster
            and member ID, raft term are 0); a nested transaction's header is all 0.
        header: the response header.
    """

    succeeded: bool = False
    responses: list[Range | Revision | Deleted | TransactionResult] = attrs.field(factory=list)
    header: Header = attrs.field(factory=Header)


class EventType(enum.Enum):
    """What an :class:`Event` did to its key: PUT or DELETE."""

    PUT = "PUT"
    DELETE = "DELETE"


@attrs.frozen
class Event:
    """One change seen by a watch (``mvccpb.Event``).

    Attributes:
        type: PUT or DELETE.
        kv: the key-value after the change (for DELETE: the key, with ``mod_revision``
            the deletion's revision).
        prev_kv: the key-value before the change, when the watch asked for it.
        revision: the store revision of the change (``kv.mod_revision``).
    """

    type: EventType
    kv: KeyValue
    prev_kv: KeyValue | None = None

    @property
    def revision(self) -> int:
        """The revision of the change (the key-value's mod revision)."""
        return self.kv.mod_revision


@attrs.frozen
class Status:
    """A member's status (``StatusResponse``)."""

    header: Header
    version: str = ""
    db_size: int = 0
    leader: int = 0
    raft_index: int = 0
    raft_term: int = 0
    raft_applied_index: int = 0
    db_size_in_use: int = 0
    errors: list[str] = attrs.field(factory=list)
    is_learner: bool = False


@attrs.frozen
class LeaseTimeToLive:
    """A lease's time to live (``LeaseTimeToLiveResponse``).

    Attributes:
        lease_id: the lease's ID.
        ttl: seconds until it expires unless refreshed (0: in its last second).
        granted_ttl: the TTL it was granted (or last refreshed with), in seconds.
        keys: the keys attached to it, sorted (only when asked for).
        header: the answer's header.
    """

    lease_id: int
    ttl: int
    granted_ttl: int
    keys: list[bytes] = attrs.field(factory=list)
    header: Header = attrs.field(factory=Header)


@attrs.frozen
class Member:
    """A cluster member (``etcdserverpb.Member``)."""

    id: int
    name: str = ""
    peer_urls: list[str] = attrs.field(factory=list)
    client_urls: list[str] = attrs.field(factory=list)
    is_learner: bool = False


class AlarmType(enum.Enum):
    """An :class:`Alarm`'s kind, as etcd names it: NONE, NOSPACE or CORRUPT."""

    NONE = "NONE"
    NOSPACE = "NOSPACE"
    CORRUPT = "CORRUPT"


@attrs.frozen
class Alarm:
    """An alarm raised on a member (``AlarmMember``)."""

    member_id: int
    alarm: AlarmType
