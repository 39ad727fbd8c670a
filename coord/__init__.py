"""coord: an etcd v3 client for Twisted, with coordination recipes.

The names here are the public API; see ``docs/`` for the guide.
"""

import txaio

txaio.use_twisted()

from coord.client import Client  # noqa: E402
from coord.errors import (  # noqa: E402
    Compacted,
    ConfigDecodeError,
    ConfigStopped,
    CoordError,
    EtcdError,
    Failed,
    FutureRevision,
    InvalidArgument,
    LeadershipLost,
    LeaseExpired,
    LeaseNotFound,
    LockLost,
    MalformedAnswer,
    NoLeader,
    NotLeader,
    OutcomeUnknown,
    PermissionDenied,
    RequestTooLarge,
    SessionLost,
    Timeout,
    TooManyOperations,
    Unauthenticated,
    Unavailable,
    WriteTimeout,
)
from coord.keyset import KeySet  # noqa: E402
from coord.lease import Lease  # noqa: E402
from coord.txn import (  # noqa: E402
    CompCreated,
    CompLease,
    CompModified,
    CompValue,
    CompVersion,
    OpDel,
    OpGet,
    OpSet,
    Transaction,
)
from coord.types import (  # noqa: E402
    Alarm,
    AlarmType,
    Deleted,
    Event,
    EventType,
    Header,
    KeyValue,
    Member,
    Range,
    Revision,
    Status,
    TransactionResult,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "Alarm",
    "AlarmType",
    "Client",
    "CompCreated",
    "CompLease",
    "CompModified",
    "CompValue",
    "CompVersion",
    "Compacted",
    "ConfigDecodeError",
    "ConfigStopped",
    "CoordError",
    "Deleted",
    "EtcdError",
    "Event",
    "EventType",
    "Failed",
    "FutureRevision",
    "Header",
    "InvalidArgument",
    "KeySet",
    "KeyValue",
    "LeadershipLost",
    "Lease",
    "LeaseExpired",
    "LeaseNotFound",
    "LockLost",
    "MalformedAnswer",
    "Member",
    "NoLeader",
    "NotLeader",
    "OpDel",
    "OpGet",
    "OpSet",
    "OutcomeUnknown",
    "PermissionDenied",
    "Range",
    "RequestTooLarge",
    "Revision",
    "SessionLost",
    "Status",
    "Timeout",
    "TooManyOperations",
    "Transaction",
    "TransactionResult",
    "Unauthenticated",
    "Unavailable",
    "WriteTimeout",
]
