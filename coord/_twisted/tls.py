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


def _certificates(value: bytes | str, what: str) -> list[Any]:
    """Every certificate in a PEM file or PEM bytes, in order (at least one)."""
    from cryptography import x509

    pem = _pem(value, what)
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise errors.InvalidArgument(f"{what} holds no readable PEM certificate: {e}")


def _private_key(value: bytes | str) -> Any:
    from cryptography.hazmat.primitives import serialization

    pem = _pem(value, "key")
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError as e:  # encrypted, and no password given
        raise errors.InvalidArgument(f"key is encrypted; give it unencrypted: {e}")
    except ValueError as e:
        raise errors.InvalidArgument(f"key is not a readable PEM private key: {e}")


def _public_der(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def client_tls(ca_cert: bytes | str | None, cert: bytes | str | None,
               key: bytes | str | None) -> Callable[[Any], Any]:
    """A callable giving, per endpoint, the client TLS options coord connects with.

    The server's certificate must be valid for the endpoint's host name or IP address
    and signed by a certificate of ``ca_cert`` (every certificate of the bundle is
    trusted), or by the platform's trust store when ``ca_cert`` is None.  ``cert`` may
    hold the client certificate's chain after it (intermediate CAs), which is presented
    with it, as etcdctl does.

    Raises:
        InvalidArgument: a file cannot be read, holds no certificate or no unencrypted
            private key, or ``key`` is not the key of ``cert``'s (first) certificate.
    """
    try:
        from OpenSSL.crypto import X509
        from twisted.internet import ssl
    except ImportError as e:  # pragma: no cover - depends on the install
        raise errors.InvalidArgument(f"https endpoints need pip install 'coord[tls]': {e}")
    if (cert is None) != (key is None):
        raise errors.InvalidArgument("a client certificate needs its key, and the key its cert")
    if ca_cert is not None:
        # Twisted's trust roots hold pyOpenSSL certificates (its X509Store wants them).
        trust = ssl.trustRootFromCertificates(
            [ssl.Certificate(X509.from_cryptography(c))
             for c in _certificates(ca_cert, "ca_cert")])
    else:
        trust = ssl.platformTrust()
    # The client certificate goes to Twisted as cryptography objects, which pyOpenSSL
    # takes as they are: Twisted's own PrivateCertificate would hand pyOpenSSL the X509 and
    # PKey objects it deprecates (a DeprecationWarning on every connection; under
    # -W error the TLS set-up fails).
    extra: dict[str, Any] = {}
    if cert is not None and key is not None:
        leaf, *chain = _certificates(cert, "cert")
        private = _private_key(key)
        if _public_der(private.public_key()) != _public_der(leaf.public_key()):
            raise errors.InvalidArgument(
                "key is not the private key of cert (their public keys differ)")
        extra = {"privateKey": private, "certificate": leaf, "extraCertChain": chain}
    cache: dict[str, Any] = {}

    def options(endpoint: Any) -> Any:
        creator = cache.get(endpoint.host)
        if creator is None:
            creator = cache[endpoint.host] = ssl.optionsForClientTLS(
                endpoint.host, trustRoot=trust, extraCertificateOptions=dict(extra))
        return creator

    return options
