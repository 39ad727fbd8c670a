"""What the transports say when a connection fails: Twisted's and OpenSSL's words, plus
what they leave out.

* A plain ``http://`` connection that a server closes before any answer -- what a
  TLS-only etcd does with plain HTTP (seen on 3.5.1: "Connection was closed cleanly") --
  gets a hint to try ``https://``.
* A TLS handshake refused with OpenSSL's bare "certificate verify failed" gets OpenSSL's
  reason ("certificate has expired", "unable to get local issuer certificate", ...): the
  chain the server presented is checked again against the connection's own trust store,
  which reports the verify error that the handshake's error leaves out.

Only the messages change: the errors' classes, and what is retried, stay the
transports' decision.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure

__all__ = ["connection_lost", "request_failed", "tls_only_hint", "verify_reason"]

VERIFY_FAILED = "certificate verify failed"


def tls_only_hint(url: str) -> str:
    """The hint for a plain-HTTP endpoint that closed the connection without an answer."""
    https = "https://" + url.split("://", 1)[-1]
    return (f"the server closed the connection without an answer; is it TLS-only? "
            f"try {https}")


def connection_lost(conn: Any, reason: Failure) -> str:
    """Why a connection of coord's pool was lost (``conn`` a ``pool._Connection``)."""
    message = reason.getErrorMessage()
    endpoint = conn.pool.endpoint
    if endpoint.tls:
        if VERIFY_FAILED in message:
            why = verify_reason(getattr(conn.transport, "getHandle", lambda: None)())
            if why:
                return f"{message}: {why}"
        return message
    # No answer was ever completed on it (status 0) and it ended at the server's wish.
    if not conn.status and reason.check(ConnectionDone, ConnectionLost):
        return f"{message} ({tls_only_hint(endpoint.url)})"
    return message


def request_failed(exc: BaseException, endpoint: Any) -> str:
    """Why a request through an Agent (the treq transport) failed: ``repr(exc)``, with
    the TLS-only hint when a plain-HTTP server closed the connection before answering
    (Agent's ResponseNeverReceived).  A certificate's verify error cannot be told here:
    the Agent's TLS connection is not in reach."""
    from twisted.web.client import ResponseNeverReceived

    text = repr(exc)
    if not endpoint.tls and isinstance(exc, ResponseNeverReceived) and any(
            isinstance(r, Failure) and r.check(ConnectionDone, ConnectionLost)
            for r in exc.reasons):
        return f"{text} ({tls_only_hint(endpoint.url)})"
    return text


def verify_reason(connection: Any) -> str | None:
    """OpenSSL's verify error for the certificate chain ``connection`` (a pyOpenSSL
    ``Connection`` whose handshake failed) was given, e.g. "certificate has expired";
    None if it cannot be told (no chain received, or the chain passes this check: the
    handshake checked more, such as the host name or the certificate's purpose)."""
    if connection is None:
        return None
    try:
        from OpenSSL import crypto
    except ImportError:  # pragma: no cover - no TLS support installed
        return None
    try:
        chain = connection.get_peer_cert_chain()
        if not chain:
            return None
        store = connection.get_context().get_cert_store()
        crypto.X509StoreContext(store, chain[0], chain[1:]).verify_certificate()
    except crypto.X509StoreContextError as e:
        return str(e)
    except Exception:
        return None  # only a message is at stake: never fail the error path itself
    return None
