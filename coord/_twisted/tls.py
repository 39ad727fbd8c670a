"""TLS options for https endpoints (needs ``twisted[tls]``: pyOpenSSL, service_identity)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from coord import errors

__all__ = ["client_tls"]


def _pem(value: bytes | str | os.PathLike[str], what: str) -> bytes:
    """PEM given as bytes or text, or read from a file path.

    An error quotes a path only if it is printable and short, and never a key's.
    """
    if isinstance(value, bytes) and b"-----BEGIN" in value:
        return value
    if isinstance(value, str) and "-----BEGIN" in value:
        return value.encode("ascii", "replace")
    try:
        path = os.fsdecode(value)
    except TypeError:
        raise errors.InvalidArgument(
            f"{what} must be PEM bytes or text, or a file path, not {type(value).__name__}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except (OSError, ValueError) as e:  # ValueError: a NUL in the "path" (DER bytes?)
        # A key's "path" may be the key itself, mistyped: never quoted.
        quote = what != "key" and len(path) < 256 and path.isprintable()
        shown = repr(path) if quote else "the path given (not shown)"
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise errors.InvalidArgument(
            f"cannot read {what} from {shown}: {why}; give PEM bytes or text, or a PEM "
            "file's path") from None


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


class _TrustAnchors:
    """The certificates of ``ca_cert`` as trust anchors, each of them, root or not.

    OpenSSL by default accepts a server's chain only when it ends at a self-signed root
    among the trusted certificates; Go (etcd, etcdctl ``--cacert``) trusts any certificate
    of the bundle, an intermediate CA too.  X509_V_FLAG_PARTIAL_CHAIN makes OpenSSL do
    the same.  (``_addCACertsToContext`` is the one method of Twisted's IOpenSSLTrustRoot,
    the interface of ``optionsForClientTLS``'s ``trustRoot``; Twisted calls it when it makes
    a connection's TLS context.)
    """

    def __init__(self, certificates: list[Any]) -> None:
        from OpenSSL.crypto import X509

        # The store wants pyOpenSSL's certificates.
        self._certificates = [X509.from_cryptography(c) for c in certificates]

    def _addCACertsToContext(self, context: Any) -> None:
        from OpenSSL.crypto import X509StoreFlags

        store = context.get_cert_store()
        for certificate in self._certificates:
            store.add_cert(certificate)
        store.set_flags(X509StoreFlags.PARTIAL_CHAIN)


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
        from twisted.internet import ssl
        from twisted.internet._sslverify import IOpenSSLTrustRoot  # trustRoot's interface
        from zope.interface import alsoProvides
    except ImportError as e:  # pragma: no cover - depends on the install
        raise errors.InvalidArgument(f"https endpoints need pip install 'coord[tls]': {e}")
    if (cert is None) != (key is None):
        raise errors.InvalidArgument("a client certificate needs its key, and the key its cert")
    if ca_cert is not None:
        trust: Any = _TrustAnchors(_certificates(ca_cert, "ca_cert"))
        alsoProvides(trust, IOpenSSLTrustRoot)
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
