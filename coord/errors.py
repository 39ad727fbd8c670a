"""One exception tree for coord, and the one place that maps etcd's answers onto it.

Every failure a coord call can report is a :class:`CoordError`. Three families:

* :class:`EtcdError` -- etcd (through its JSON gateway) answered with an error body
  ``{"error": ..., "code": <gRPC status code>, "message": ...}``. The concrete class is
  chosen by :func:`from_gateway`, first by etcd's exact message (etcd's ``rpctypes``
  sentinels, e.g. ``"etcdserver: mvcc: required revision has been compacted"``), then by
  the gRPC code.
* :class:`Unavailable` -- no answer could be had from any endpoint.  Its subclass
  :class:`OutcomeUnknown` is raised when a *write* was sent and the connection broke
  (or the call timed out) before the answer arrived: the write may or may not have been
  applied, and coord never re-sends it by itself.
* Local misuse -- :class:`InvalidArgument` (also a ``ValueError``) for values etcd would
  refuse, raised before anything is sent.  Wrong *types* raise the builtin ``TypeError``.

:class:`MalformedAnswer` -- the server answered, but not as etcd's gateway does (a body
that is not JSON, not a JSON object, or lacks the ``header`` every etcd answer carries):
not transient, so not an :class:`Unavailable`, and not etcd's word, so not an
:class:`EtcdError`.

:class:`Timeout` and :class:`Failed` (a transaction whose comparisons did not hold) stand
on their own.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "NOT_PROPOSED",
    "AuthFailed",
    "AuthOldRevision",
    "ClaimLost",
    "Compacted",
    "ConfigDecodeError",
    "ConfigStopped",
    "CoordError",
    "CounterOutcomeUnknown",
    "EtcdError",
    "EtcdInvalidArgument",
    "EtcdOutcomeUnknown",
    "EtcdRequestTooLarge",
    "EtcdTooManyOperations",
    "EtcdUnavailable",
    "Failed",
    "FutureRevision",
    "InvalidArgument",
    "LeadershipLost",
    "LeaseExpired",
    "LeaseNotFound",
    "LockLost",
    "MalformedAnswer",
    "MemberExists",
    "MembershipLost",
    "NoLeader",
    "NoSpace",
    "NotACounter",
    "NotLeader",
    "OutcomeUnknown",
    "ParticipantLost",
    "PermissionDenied",
    "RequestTooLarge",
    "ResourceExhausted",
    "SessionLost",
    "Timeout",
    "TooManyOperations",
    "TooManyParticipants",
    "Unauthenticated",
    "Unavailable",
    "WriteTimeout",
    "for_write",
    "from_gateway",
]

# gRPC status codes (google.golang.org/grpc/codes), as the gateway reports them in "code".
OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
ALREADY_EXISTS = 6
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
FAILED_PRECONDITION = 9
ABORTED = 10
OUT_OF_RANGE = 11
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
DATA_LOSS = 15
UNAUTHENTICATED = 16


class CoordError(Exception):
    """Base class of every error coord raises (besides ``TypeError`` for wrong types)."""


class InvalidArgument(CoordError, ValueError):
    """A request etcd would refuse (empty key, negative TTL, ...), or that etcd refused
    with INVALID_ARGUMENT.  Raised locally before anything is sent where coord can tell."""


class TooManyOperations(InvalidArgument):
    """A transaction has more operations than etcd allows (``--max-txn-ops``, 128 by default)."""


class RequestTooLarge(InvalidArgument):
    """The request is bigger than etcd accepts (``--max-request-bytes``, 1.5 MiB by default)."""


class Timeout(CoordError):
    """The call did not complete within its timeout.

    For a write, the outcome is unknown: see :class:`WriteTimeout`.
    """


class Failed(CoordError):
    """A transaction's comparisons did not all hold; the ``failure`` branch ran.

    Attributes:
        responses: the responses of the failure branch's operations, in order.
        header: the response header (its revision is the store revision the
            transaction was evaluated at).
    """

    def __init__(self, responses: list[Any], header: Any = None) -> None:
        super().__init__(f"transaction failed ({len(responses)} failure responses)")
        self.responses = responses
        self.header = header


class Unavailable(CoordError):
    """No endpoint could serve the request (connection refused, reset, no leader...)."""


class OutcomeUnknown(Unavailable):
    """A write was sent but its answer never came: it may or may not have been applied.

    coord never re-sends such a write on its own; read the affected keys (or compare on
    revisions in a transaction) to find out what happened.
    """


class WriteTimeout(Timeout, OutcomeUnknown):
    """A write timed out after it was sent: its outcome is unknown (see :class:`OutcomeUnknown`)."""


class MalformedAnswer(CoordError):
    """The server's successful (HTTP 200) answer is not an etcd gateway answer: not JSON,
    not a JSON object, or without the ``header`` object etcd puts in every answer to the
    calls that have one.

    Something other than etcd's gateway answered (a proxy, another service on the port),
    or a bug broke the answer.  Not an :class:`Unavailable`: trying again (coord does not)
    would most likely get the same answer.  For a write, whether etcd applied it is
    unknown -- the request reached *something*.  (Not to be confused with the HTTP
    framing errors of ``coord._wire.http11``, which the transports report as Unavailable.)

    Attributes:
        body: the start of the answer's body (at most 200 bytes), or None.
    """

    def __init__(self, message: str, body: bytes | None = None) -> None:
        super().__init__(message)
        self.body = body


class EtcdError(CoordError):
    """etcd answered with an error.

    Attributes:
        code: the gRPC status code the gateway reported.
        message: etcd's message, e.g. ``"etcdserver: key is not provided"``.
    """

    def __init__(self, message: str, code: int = UNKNOWN) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class EtcdInvalidArgument(EtcdError, InvalidArgument):
    """etcd refused the request as invalid (gRPC INVALID_ARGUMENT)."""


class Compacted(EtcdError):
    """The requested revision has been compacted away.

    Attributes:
        compact_revision: the store's compaction revision when known (watches report it),
            else ``None``.
    """

    def __init__(self, message: str, code: int = OUT_OF_RANGE, compact_revision: int | None = None):
        super().__init__(message, code)
        self.compact_revision = compact_revision


class FutureRevision(EtcdError):
    """The requested revision is newer than the store's current revision."""


class LeaseNotFound(EtcdError):
    """The lease does not exist: it was never granted, was revoked, or has expired."""


class LeaseExpired(LeaseNotFound):
    """The lease existed but is gone now (etcd reported TTL -1 / 0 for it)."""


class Unauthenticated(EtcdError):
    """Authentication failed or is required (bad credentials, or an invalid token)."""


class AuthOldRevision(Unauthenticated):
    """The token predates a change of etcd's auth store (JWT tokens carry its revision):
    authenticating again gets a current one, which coord does once, transparently."""


class AuthFailed(Unauthenticated):
    """The user name or password was refused."""


class PermissionDenied(EtcdError):
    """The authenticated user lacks the permission for this request."""


class ResourceExhausted(EtcdError):
    """etcd is out of a resource (too many requests, ...)."""


class NoSpace(ResourceExhausted):
    """etcd raised its NOSPACE alarm: writes are refused until space is freed and the
    alarm is disarmed."""


class EtcdUnavailable(EtcdError, Unavailable):
    """etcd answered but cannot serve now (no leader, stopping, timeout inside etcd)."""


class EtcdOutcomeUnknown(EtcdUnavailable, OutcomeUnknown):
    """etcd answered a *write* with an unavailability that can come after the write was
    proposed ("request timed out", "leader changed", "server stopped"): it may still be
    applied.  coord does not re-send it."""


class EtcdRequestTooLarge(EtcdError, RequestTooLarge):
    """etcd refused the request as too large."""


class EtcdTooManyOperations(EtcdError, TooManyOperations):
    """etcd refused a transaction with too many operations."""


class NotLeader(CoordError):
    """A leader-only operation (``Election.proclaim``, a guarded write) was attempted by a
    campaign that does not lead."""


class NoLeader(CoordError):
    """An election has no leader right now (``Election.leader()``)."""


class SessionLost(LeaseExpired):
    """The session's lease is gone, or the session can no longer vouch for it.

    Raised by recipes asked to act on such a session, and passed to ``Session.lost``
    observers.  (A :class:`LeaseExpired`, so ``except LeaseExpired`` sees it.)
    """


class LockLost(CoordError):
    """The lock is not (or no longer) ours: our key was deleted by someone else."""


class LeadershipLost(CoordError):
    """This campaign led and no longer does: its key was deleted or its session ended."""


class ConfigStopped(CoordError):
    """The ConfigWatcher was stopped (or its client closed) while something waited on it."""


class ConfigDecodeError(CoordError, ValueError):
    """A config value under a watched prefix could not be decoded.

    Attributes:
        key: the key whose value failed to decode.
        revision: the mod revision of the value that failed.
    """

    def __init__(self, key: bytes, revision: int, cause: BaseException) -> None:
        super().__init__(f"cannot decode {key!r} at revision {revision}: {cause!r}")
        self.key = key
        self.revision = revision
        self.cause = cause


class NotACounter(CoordError, ValueError):
    """A Counter's key holds something that is not a decimal integer in int64 range.

    Attributes:
        key: the counter's key.
        value: what it holds.
    """

    def __init__(self, key: bytes, value: bytes) -> None:
        super().__init__(f"{key!r} holds {value[:40]!r}, not a decimal int64: not a counter")
        self.key = key
        self.value = value


class TooManyParticipants(CoordError):
    """A DoubleBarrier already has its ``count`` participants (Go's ErrTooManyClients)."""


class ClaimLost(CoordError):
    """A queue item's claim is not (or no longer) ours: the consumer's session ended or
    the claim was deleted, so the item went back to the queue (another consumer may take
    it); ``ack()`` was refused."""


class MembershipLost(CoordError):
    """A group member's key is gone: deleted by someone else, or its session ended."""


class ParticipantLost(CoordError):
    """A DoubleBarrier participant's waiter key was deleted by someone else (not by the
    end of its session's lease, which is SessionLost) while it entered or was in."""


class MemberExists(CoordError):
    """A group member id is in use by another session (its key carries another lease)."""


class CounterOutcomeUnknown(OutcomeUnknown):
    """A Counter write (``add``, ``compare_and_set``) was sent, its answer never came, and
    what etcd kept cannot tell whether it was applied.

    The write compared the key's mod revision with ``base_revision`` (the value then was
    ``base``) and would have written ``value``.  It was not re-sent blindly: see
    docs/counter.md, "When an answer is lost".

    Attributes:
        key: the counter's key.
        base: the value the write was computed from.
        base_revision: the revision at which the key held ``base``: its mod revision, or
            for an absent key the revision of the read that found it absent.
        value: what the write would have written (``base + delta`` for an add).
        delta: ``value - base``.
        reason: why it could not be told: the first write after ``base_revision`` wrote
            ``value`` (ours, or another writer's that wrote the same value from the same
            base); that history was compacted; or the timeout came first.
    """

    def __init__(self, key: bytes, base: int, base_revision: int, value: int,
                 reason: str) -> None:
        super().__init__(f"counter {key!r}: write of {value} (from {base} at revision "
                         f"{base_revision}) may or may not have been applied: {reason}")
        self.key = key
        self.base = base
        self.base_revision = base_revision
        self.value = value
        self.delta = value - base
        self.reason = reason


# etcd's exact messages (api/v3rpc/rpctypes/error.go), mapped to the class that carries them.
_BY_MESSAGE: dict[str, type[EtcdError]] = {
    "etcdserver: mvcc: required revision has been compacted": Compacted,
    "etcdserver: mvcc: required revision is a future revision": FutureRevision,
    "etcdserver: requested lease not found": LeaseNotFound,
    "etcdserver: lease not found": LeaseNotFound,
    "etcdserver: request is too large": EtcdRequestTooLarge,
    "etcdserver: too many operations in txn request": EtcdTooManyOperations,
    "etcdserver: mvcc: database space exceeded": NoSpace,
    "etcdserver: authentication failed, invalid user ID or password": AuthFailed,
    "etcdserver: invalid auth token": Unauthenticated,
    "etcdserver: revision of auth store is old": AuthOldRevision,  # 3.4
    "auth: revision in header is old": AuthOldRevision,  # 3.5
    "etcdserver: user name is empty": Unauthenticated,
    "etcdserver: permission denied": PermissionDenied,
    "etcdserver: no leader": EtcdUnavailable,
    "etcdserver: not leader": EtcdUnavailable,
    "etcdserver: leader changed": EtcdUnavailable,
    "etcdserver: request timed out": EtcdUnavailable,
    "etcdserver: request timed out, possibly due to previous leader failure": EtcdUnavailable,
    "etcdserver: request timed out, possibly due to connection lost": EtcdUnavailable,
    "etcdserver: server stopped": EtcdUnavailable,
    "etcdserver: too many requests": ResourceExhausted,
}

_GRPC_STATUS = re.compile(r"rpc error: code = (\w+) desc = (.*)", re.DOTALL)
_CODE_NAMES = {
    "Canceled": CANCELLED, "Unknown": UNKNOWN, "InvalidArgument": INVALID_ARGUMENT,
    "DeadlineExceeded": DEADLINE_EXCEEDED, "NotFound": NOT_FOUND,
    "AlreadyExists": ALREADY_EXISTS, "PermissionDenied": PERMISSION_DENIED,
    "ResourceExhausted": RESOURCE_EXHAUSTED, "FailedPrecondition": FAILED_PRECONDITION,
    "Aborted": ABORTED, "OutOfRange": OUT_OF_RANGE, "Unimplemented": UNIMPLEMENTED,
    "Internal": INTERNAL, "Unavailable": UNAVAILABLE, "DataLoss": DATA_LOSS,
    "Unauthenticated": UNAUTHENTICATED,
}

_BY_CODE: dict[int, type[EtcdError]] = {
    CANCELLED: EtcdUnavailable,  # the call was cut short inside etcd or the gateway
    DEADLINE_EXCEEDED: EtcdUnavailable,  # etcd's own deadline: a write may be applied
    INVALID_ARGUMENT: EtcdInvalidArgument,
    NOT_FOUND: EtcdError,
    PERMISSION_DENIED: PermissionDenied,
    RESOURCE_EXHAUSTED: ResourceExhausted,
    UNAVAILABLE: EtcdUnavailable,
    UNAUTHENTICATED: Unauthenticated,
}

# Unavailability etcd reports before it proposes anything: even a write was not applied.
NOT_PROPOSED = frozenset({
    "etcdserver: no leader",
    "etcdserver: not leader",
    "etcdserver: too many requests",
})


def for_write(exc: EtcdError, write: bool) -> EtcdError:
    """``exc`` as a write's final error: an unavailability that may come after the write
    was proposed becomes :class:`EtcdOutcomeUnknown`; one etcd reports before proposing
    ("no leader") stays :class:`EtcdUnavailable` -- nothing was applied."""
    if write and isinstance(exc, EtcdUnavailable) and not isinstance(exc, OutcomeUnknown) \
            and exc.message not in NOT_PROPOSED:
        return EtcdOutcomeUnknown(exc.message, exc.code)
    return exc


def from_gateway(body: Any, http_status: int | None = None) -> EtcdError:
    """Turn a gateway error body into the matching :class:`EtcdError`.

    Args:
        body: the decoded JSON error body (a dict with ``message``/``error`` and ``code``),
            or anything else if the body was not JSON.
        http_status: the HTTP status line's code, used in the message when the body is not
            an etcd error body.
    """
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        # A stream that fails before its first message: {"error": {"grpc_code": ..., ...}}.
        body = body["error"]
    if isinstance(body, dict):
        message = body.get("message") or body.get("error") or ""
        if not isinstance(message, str):
            message = repr(message)
        # Unary errors carry "code"; errors inside a stream carry "grpc_code".
        code = body.get("code", body.get("grpc_code", UNKNOWN))
        if not isinstance(code, int):
            code = UNKNOWN
    else:
        message, code = "", UNKNOWN
    if not message:
        message = f"etcd gateway answered HTTP {http_status} with {body!r:.200}"
    wrapped = _GRPC_STATUS.fullmatch(message)
    if wrapped:
        # A gRPC status printed as text (a watch's cancel_reason): "rpc error: code =
        # PermissionDenied desc = etcdserver: permission denied".
        message = wrapped.group(2)
        code = _CODE_NAMES.get(wrapped.group(1), code)
    cls = _BY_MESSAGE.get(message) or _BY_CODE.get(code, EtcdError)
    return cls(message, code)
