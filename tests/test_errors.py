"""The error tree: gateway bodies and stream cancel reasons mapped to typed errors (tables)."""

from __future__ import annotations

import pytest

from coord import errors
from coord.lease import Lease


@pytest.mark.parametrize(("body", "cls", "message", "code"), [
    ({"error": "etcdserver: permission denied", "code": 7, "message": "etcdserver: permission "
      "denied"}, errors.PermissionDenied, "etcdserver: permission denied", 7),
    # A watch's cancel_reason is a gRPC status printed as text.
    ({"message": "rpc error: code = PermissionDenied desc = etcdserver: permission denied"},
     errors.PermissionDenied, "etcdserver: permission denied", errors.PERMISSION_DENIED),
    ({"message": "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token"},
     errors.Unauthenticated, "etcdserver: invalid auth token", errors.UNAUTHENTICATED),
    ({"message": "rpc error: code = Unavailable desc = etcdserver: no leader"},
     errors.EtcdUnavailable, "etcdserver: no leader", errors.UNAVAILABLE),
    ({"message": "rpc error: code = Internal desc = something new"},
     errors.EtcdError, "something new", errors.INTERNAL),
    # JWT tokens older than the auth store: re-authenticating cures it (3.4 and 3.5 words).
    ({"message": "etcdserver: revision of auth store is old", "code": 3},
     errors.AuthOldRevision, "etcdserver: revision of auth store is old", 3),
    ({"message": "auth: revision in header is old", "code": 2},
     errors.AuthOldRevision, "auth: revision in header is old", 2),
    # gRPC CANCELLED / DEADLINE_EXCEEDED: etcd or the gateway gave up on the call.
    ({"message": "context canceled", "code": 1}, errors.EtcdUnavailable, "context canceled", 1),
    ({"message": "context deadline exceeded", "code": 4}, errors.EtcdUnavailable,
     "context deadline exceeded", 4),
    ({"error": {"grpc_code": 16, "message": "etcdserver: user name is empty"}},
     errors.Unauthenticated, "etcdserver: user name is empty", 16),
])
def test_from_gateway(body, cls, message, code):
    exc = errors.from_gateway(body, 400)
    assert type(exc) is cls
    assert exc.message == message
    assert exc.code == code


@pytest.mark.parametrize(("message", "code", "write", "cls"), [
    # Refused before anything was proposed: nothing applied, even for a write.
    ("etcdserver: no leader", errors.UNAVAILABLE, True, errors.EtcdUnavailable),
    ("etcdserver: not leader", errors.UNAVAILABLE, True, errors.EtcdUnavailable),
    ("etcdserver: too many requests", errors.RESOURCE_EXHAUSTED, True, errors.ResourceExhausted),
    # May come after the write was proposed: its outcome is unknown.
    ("etcdserver: request timed out", errors.UNAVAILABLE, True, errors.EtcdOutcomeUnknown),
    ("etcdserver: leader changed", errors.UNAVAILABLE, True, errors.EtcdOutcomeUnknown),
    ("context deadline exceeded", errors.DEADLINE_EXCEEDED, True, errors.EtcdOutcomeUnknown),
    ("context canceled", errors.CANCELLED, True, errors.EtcdOutcomeUnknown),
    # Reads are never "outcome unknown".
    ("etcdserver: request timed out", errors.UNAVAILABLE, False, errors.EtcdUnavailable),
    ("context deadline exceeded", errors.DEADLINE_EXCEEDED, False, errors.EtcdUnavailable),
    ("etcdserver: permission denied", errors.PERMISSION_DENIED, True, errors.PermissionDenied),
])
def test_for_write(message, code, write, cls):
    exc = errors.for_write(errors.from_gateway({"message": message, "code": code}), write)
    assert type(exc) is cls
    assert exc.message == message
    assert isinstance(exc, errors.OutcomeUnknown) == (cls is errors.EtcdOutcomeUnknown)


@pytest.mark.parametrize(("answer", "alive"), [
    ({"header": {}, "ID": "7", "TTL": "5", "grantedTTL": "10"}, True),
    # TTL 0 is left out of the JSON: last second
    ({"header": {}, "ID": "7", "grantedTTL": "10"}, True),
    ({"header": {}, "ID": "7", "TTL": "0", "grantedTTL": "10"}, True),
    # the gateway's answer for a lease that is gone
    ({"header": {}, "ID": "7", "TTL": "-1"}, False),
    ({"header": {}, "ID": "7", "TTL": -1}, False),
])
def test_time_to_live_answer(answer, alive):
    lease = Lease(None, 7)
    if alive:
        assert lease._check_alive(answer) is answer
    else:
        with pytest.raises(errors.LeaseExpired):
            lease._check_alive(answer)
