"""Lease: a handle on one etcd lease (grant with :meth:`coord.Client.lease`).

Keys written with ``lease=`` are deleted when the lease expires or is revoked.  A lease
expires ``ttl`` seconds after its last refresh; :meth:`Lease.refresh` is one keep-alive.
(A :class:`coord.session.Session` keeps a lease alive for you.)

Each method takes ``timeout=`` as every :class:`coord.Client` call does (default: the
client's); one that is not a number raises ``TypeError``, a negative, NaN or 0 one
:class:`~coord.errors.InvalidArgument`, at once and before anything is sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer

from coord import errors
from coord._sentinel import DEFAULT
from coord._wire import codec
from coord.types import Header, LeaseTimeToLive

if TYPE_CHECKING:
    from coord.client import Client

__all__ = ["Lease"]


class Lease:
    """A granted lease.

    Attributes:
        lease_id: the lease's ID (an int64).
        ttl: the TTL the server granted, in seconds (None for a handle from
            :meth:`Client.leases`, which does not tell).
        header: the header of the grant's answer.
    """

    def __init__(self, client: Client, lease_id: int, ttl: int | None = None,
                 header: Header | None = None) -> None:
        self._client = client
        self.lease_id = lease_id
        self.ttl = ttl
        self.header = header

    def __repr__(self) -> str:
        return f"<Lease {self.lease_id:#x} ttl={self.ttl}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Lease) and other.lease_id == self.lease_id

    def __hash__(self) -> int:
        return hash(self.lease_id)

    def refresh(self, timeout: Any = DEFAULT,
                attempt_timeout: float | None = None) -> defer.Deferred[int]:
        """Keep the lease alive once (``LeaseKeepAlive``).

        Args:
            timeout: seconds for the call (default: the client's).
            attempt_timeout: seconds before a member that has not answered is left for
                the next one (default: the client's ``attempt_timeout``).

        Returns:
            Deferred firing with the TTL, in seconds, the lease has again.

        Raises:
            LeaseExpired: the lease is gone (expired or revoked); etcd answers a
                keep-alive for such a lease with TTL 0.
        """
        return self._client.call("/v3/lease/keepalive", {"ID": self.lease_id}, False, timeout,
                                     decode=self._refreshed, attempt_timeout=attempt_timeout)

    def _refreshed(self, obj: Any) -> int:
        if isinstance(obj, dict) and "error" in obj:
            raise errors.from_gateway(obj["error"])
        result = codec.keepalive_response(obj)
        ttl = int(result.get("TTL", 0))
        if ttl <= 0:
            raise errors.LeaseExpired(f"lease {self.lease_id:#x} has expired or was revoked",
                                      errors.NOT_FOUND)
        return ttl

    def _time_to_live(self, keys: bool, timeout: Any) -> defer.Deferred[Any]:
        body: dict[str, Any] = {"ID": self.lease_id}
        if keys:
            body["keys"] = True
        return self._client.call("/v3/lease/timetolive", body, False, timeout,
                                     decode=self._check_alive)

    def _check_alive(self, obj: Any) -> dict:
        # The gateway answers an unknown or expired lease with HTTP 200 and TTL -1: that is
        # an error, not a remaining time.  An omitted TTL is 0 (proto3 JSON leaves zeros
        # out): a live lease in its last second.
        obj = codec.unary(obj)
        if int(obj.get("TTL", 0)) < 0:
            raise errors.LeaseExpired(f"lease {self.lease_id:#x} has expired or was revoked",
                                      errors.NOT_FOUND)
        return obj

    def remaining(self, timeout: Any = DEFAULT) -> defer.Deferred[int]:
        """Seconds until the lease expires unless refreshed.

        Raises:
            LeaseExpired: the lease is gone.
        """
        return self._time_to_live(False, timeout).addCallback(lambda obj: int(obj.get("TTL", 0)))

    def keys(self, timeout: Any = DEFAULT) -> defer.Deferred[list[bytes]]:
        """The keys attached to the lease, sorted.

        Raises:
            LeaseExpired: the lease is gone.
        """
        d = self._time_to_live(True, timeout)
        return d.addCallback(lambda obj: sorted(codec.b64(k) for k in obj.get("keys") or ()))

    def time_to_live(self, keys: bool = False,
                     timeout: Any = DEFAULT) -> defer.Deferred[LeaseTimeToLive]:
        """The lease's remaining and granted TTL, and with ``keys`` its keys
        (``LeaseTimeToLive``).

        Returns:
            Deferred firing with a :class:`~coord.types.LeaseTimeToLive`.

        Raises:
            LeaseExpired: the lease is gone.
        """
        def info(obj: dict) -> LeaseTimeToLive:
            return LeaseTimeToLive(
                lease_id=self.lease_id, ttl=int(obj.get("TTL", 0)),
                granted_ttl=int(obj.get("grantedTTL", 0)),
                keys=sorted(codec.b64(k) for k in obj.get("keys") or ()),
                header=codec.header(obj.get("header")))

        return self._time_to_live(keys, timeout).addCallback(info)

    def revoke(self, timeout: Any = DEFAULT) -> defer.Deferred[Header]:
        """Revoke the lease now, deleting its keys.

        Returns:
            Deferred firing with the header of the answer.

        Raises:
            LeaseNotFound: the lease was already gone.
        """
        return self._client.call("/v3/lease/revoke", {"ID": self.lease_id}, True, timeout,
                                     decode=codec.header_response)
