"""TLS options for https endpoints (needs ``twisted[tls]``: pyOpenSSL, service_identity)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from coord import errors

__all__ = ["client_tls"]


def _pem(value: bytes | str, what: str) -> bytes:
    """PEM bytes as given, or read from a file path."""
    if isinstance(value, bytes) and b"-----BEGIN" in value:
        return value
    path = os.fsdecode(value)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise errors.InvalidArgument(f"cannot read {what} from {path!r}: {e}")


def client_tls(ca_cert: bytes | str | None, cert: bytes | str | None,
               key: bytes | str | None) -> Callable[[Any], Any]:
    """A callable giving, per endpoint, the client TLS options coord connects with.

    The server's certificate must be valid for the endpoint's host name or IP address
    and signed by ``ca_cert`` (or the platform's trust store when ``ca_cert`` is None).
    """
    try:
        from twisted.internet import ssl
    except ImportError as e:  # pragma: no cover - depends on the install
        raise errors.InvalidArgument(f"https endpoints need pip install 'coord[tls]': {e}")
    if (cert is None) != (key is None):
        raise errors.InvalidArgument("a client certificate needs its key, and the key its cert")
    trust = ssl.Certificate.loadPEM(_pem(ca_cert, "ca_cert")) if ca_cert is not None \
        else ssl.platformTrust()
    client = None
    if cert is not None and key is not None:
        client = ssl.PrivateCertificate.loadPEM(_pem(key, "key") + b"\n" + _pem(cert, "cert"))
    cache: dict[str, Any] = {}

    def options(endpoint: Any) -> Any:
        creator = cache.get(endpoint.host)
        if creator is None:
            kwargs: dict[str, Any] = {"trustRoot": trust}
            if client is not None:
                kwargs["clientCertificate"] = client
            creator = cache[endpoint.host] = ssl.optionsForClientTLS(endpoint.host, **kwargs)
        return creator

    return options
