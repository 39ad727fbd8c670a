"""TLS, mutual TLS and authentication against a real etcd, through both transports.

Throwaway certificates are made here with ``cryptography``: a CA, a server
certificate for 127.0.0.1 / localhost, a client certificate, and a second CA that
signed none of them. Auth tests run on private servers whose auth is switched on
through the JSON gateway, as an operator would.

The treq transport sends through an Agent the test builds; its TLS policy is made
from coord's own ``client_tls`` (so ``ca_cert`` as a path or as PEM bytes is
exercised there too).

The client's TLS set-up (key types and formats, chains, PEM as tools write it, CA
bundles, what is refused when the Client is made) runs against two more servers and a
PKI with intermediates of its own (see that section).
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import time
import uuid
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from helpers import run_coord, sleep
from twisted.internet import defer, protocol, reactor
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from coord import (
    Client,
    EtcdError,
    InvalidArgument,
    KeySet,
    OutcomeUnknown,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from coord._twisted.tls import client_tls
from coord.errors import AuthFailed
from coord.server import EtcdRequestError, EtcdServer, EtcdStartError, ServerTLS


def b64(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data).decode()


# -- certificates --------------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _org(organization: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=1))


def _make_ca(common_name: str,
             parent: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
             ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A root CA, or with ``parent`` an intermediate CA signed by it."""
    key = ec.generate_private_key(ec.SECP256R1())
    issuer, signer = (_name(common_name), key) if parent is None else (parent[0].subject,
                                                                       parent[1])
    builder = _validity(x509.CertificateBuilder()).subject_name(_name(common_name)).issuer_name(
        issuer).public_key(key.public_key()).serial_number(
        x509.random_serial_number()).add_extension(
        x509.BasicConstraints(ca=True, path_length=None), critical=True).add_extension(
        x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                      content_commitment=False, key_encipherment=False,
                      data_encipherment=False, key_agreement=False, encipher_only=False,
                      decipher_only=False), critical=True).add_extension(
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    return builder.sign(signer, hashes.SHA256()), key


def _expired(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - datetime.timedelta(days=10)).not_valid_after(
        now - datetime.timedelta(days=1))


def _make_leaf(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, subject: x509.Name,
               usages: list[x509.ObjectIdentifier],
               sans: list[x509.GeneralName] | None = None, validity: Any = _validity,
               ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = validity(x509.CertificateBuilder()).subject_name(subject).issuer_name(
        ca.subject).public_key(key.public_key()).serial_number(
        x509.random_serial_number()).add_extension(
        x509.BasicConstraints(ca=False, path_length=None), critical=True).add_extension(
        x509.ExtendedKeyUsage(usages), critical=False).add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Paths (and PEM bytes) of a throwaway PKI, written to a temporary directory.

    ``server.pem`` is valid for IP 127.0.0.1 and DNS localhost; it allows clientAuth as
    well, because etcd's own gateway presents it to etcd's gRPC server, which under
    --client-cert-auth verifies it as a client certificate.

    ``client.pem`` has no CommonName: with --client-cert-auth *and* auth enabled, etcd's
    gateway answers HTTP 400 to any client certificate that has one (a CN would name the
    etcd user over gRPC, which the gateway cannot pass on). ``client-cn.pem`` has one.
    """
    directory: Path = tmp_path_factory.mktemp("pki")
    ca, ca_key = _make_ca("coord test CA")
    other_ca, _ = _make_ca("coord unrelated CA")
    server, server_key = _make_leaf(
        ca, ca_key, _name("coord test server"),
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    client, client_key = _make_leaf(ca, ca_key, _org("coord test client"),
                                    [ExtendedKeyUsageOID.CLIENT_AUTH])
    # The server certificate, expired yesterday.
    expired, expired_key = _make_leaf(
        ca, ca_key, _name("coord expired server"), [ExtendedKeyUsageOID.SERVER_AUTH],
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], validity=_expired)
    client_cn, client_cn_key = _make_leaf(ca, ca_key, _name("root"),
                                          [ExtendedKeyUsageOID.CLIENT_AUTH])
    # A client certificate issued by an intermediate CA, which the server does not know:
    # it trusts the root only, so the client must present the intermediate with it.
    intermediate, intermediate_key = _make_ca("coord test intermediate", (ca, ca_key))
    chained, chained_key = _make_leaf(intermediate, intermediate_key,
                                      _org("coord chained client"),
                                      [ExtendedKeyUsageOID.CLIENT_AUTH])
    files = {
        "ca": _cert_pem(ca),
        "ca_bundle": _cert_pem(other_ca) + _cert_pem(ca),  # the right CA comes second
        "chained": _cert_pem(chained) + _cert_pem(intermediate),
        "chained_leaf": _cert_pem(chained),
        "chained_key": _key_pem(chained_key),
        "encrypted_key": client_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret")),
        "other_ca": _cert_pem(other_ca),
        "server": _cert_pem(server),
        "server_key": _key_pem(server_key),
        "client": _cert_pem(client),
        "client_key": _key_pem(client_key),
        "client_cn": _cert_pem(client_cn),
        "client_cn_key": _key_pem(client_cn_key),
        "expired": _cert_pem(expired),
        "expired_key": _key_pem(expired_key),
    }
    result = SimpleNamespace()
    for name, data in files.items():
        path = directory / f"{name.replace('_', '-')}.pem"
        path.write_bytes(data)
        setattr(result, name, str(path))
        setattr(result, name + "_pem", data)
    return result


def server_tls(certs: SimpleNamespace, mtls: bool = False) -> ServerTLS:
    return ServerTLS(certs.server, certs.server_key, certs.ca, client_cert_auth=mtls,
                     client_cert_file=certs.client if mtls else None,
                     client_key_file=certs.client_key if mtls else None)


# -- clients -------------------------------------------------------------------------------------


@implementer(IPolicyForHTTPS)
class CoordTLSPolicy:
    """An Agent TLS policy with coord's own client options (trust root, client cert)."""

    def __init__(self, ca_cert, cert=None, key=None):
        self._options = client_tls(ca_cert, cert, key)

    def creatorForNetloc(self, hostname, port):
        return self._options(SimpleNamespace(host=hostname.decode("ascii")))


@pytest.fixture
def tls_client(transport):
    """``tls_client(url, ca_cert=, cert=, key=, **kwargs)``: a Client through the test's
    transport (treq: an Agent whose TLS policy trusts ``ca_cert``); closed after the test."""
    made = []

    def new(url, ca_cert=None, cert=None, key=None, **kwargs):
        if transport == "treq":
            pool = HTTPConnectionPool(reactor, persistent=True)
            agent = Agent(reactor, contextFactory=CoordTLSPolicy(ca_cert, cert, key), pool=pool)
            client = Client(reactor, url, agent=agent, **kwargs)
        else:
            client = Client(reactor, url, ca_cert=ca_cert, cert=cert, key=key, **kwargs)
        made.append(client)
        return client

    yield new
    for client in made:
        pytest_twisted.blockon(client.close())


class Events:
    """A watch callback that collects events and lets a test wait for the n-th."""

    def __init__(self):
        self.events = []
        self._waiters = []

    def __call__(self, event):
        self.events.append(event)
        for count, d in list(self._waiters):
            if len(self.events) >= count:
                self._waiters.remove((count, d))
                d.callback(None)

    def wait_for(self, count, timeout=10.0):
        if len(self.events) >= count:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append((count, d))
        return d.addTimeout(timeout, reactor)


# -- coord.server with TLS (synchronous) --------------------------------------------------------


def test_server_tls_url_and_post(etcd_factory, certs):
    # The tuple form: (cert_file, key_file, ca_file, client_cert_auth).
    server = etcd_factory(tls=(certs.server, certs.server_key, certs.ca, False))
    assert server.url.startswith("https://127.0.0.1:")
    assert server.version_info >= (3, 4)
    server.post("/v3/kv/put", {"key": b64("k"), "value": b64("v")})
    assert server.post("/v3/kv/range", {"key": b64("k")})["kvs"][0]["value"] == b64("v")
    assert "--trusted-ca-file" not in " ".join(server._args())  # (it would require client certs)


def test_server_mtls_post_with_client_cert(etcd_factory, certs):
    server = etcd_factory(tls=server_tls(certs, mtls=True))
    args = server._args()
    assert f"--trusted-ca-file={certs.ca}" in args and "--client-cert-auth" in args
    server.post("/v3/kv/put", {"key": b64("k"), "value": b64("v")})
    # Without a client cert, etcd refuses the handshake.
    no_cert = ServerTLS(certs.server, certs.server_key, certs.ca).opener()
    with pytest.raises(OSError):
        no_cert.open(server.url + "/version", timeout=5).close()
    # The default client cert for post() is the server's own (it allows clientAuth).
    default = EtcdServer(tls=(certs.server, certs.server_key, certs.ca, True),
                         client_port=server.client_port)
    assert default.post("/v3/kv/range", {"key": b64("k")})["kvs"][0]["value"] == b64("v")


def test_server_tls_settings_are_checked():
    with pytest.raises(ValueError, match="ca_file"):
        ServerTLS("s.pem", "s-key.pem", None, True)
    with pytest.raises(ValueError, match="go together"):
        ServerTLS("s.pem", "s-key.pem", "ca.pem", True, client_cert_file="c.pem")
    with pytest.raises(TypeError):
        ServerTLS.of("s.pem")  # type: ignore[arg-type]
    assert ServerTLS.of(("s.pem", "k.pem")) == ServerTLS("s.pem", "k.pem")
    assert ServerTLS(Path("s.pem"), Path("k.pem")).cert_file == "s.pem"  # type: ignore[arg-type]


def test_server_start_fails_fast_on_an_untrusted_certificate(certs):
    server = EtcdServer(tls=ServerTLS(certs.server, certs.server_key, certs.other_ca),
                        start_timeout=30)
    started = time.monotonic()
    try:
        with pytest.raises(EtcdStartError, match="cannot verify etcd's TLS certificate"):
            server.start()
    finally:
        server.stop()
    assert time.monotonic() - started < 10
    assert server.pid is None


# -- TLS through the client -----------------------------------------------------------------------


@pytest.mark.parametrize("ca_form", ["path", "pem"])
@pytest_twisted.ensureDeferred
async def test_tls_set_get(etcd_factory, certs, tls_client, ca_form):
    server = etcd_factory(tls=server_tls(certs))
    ca_cert = certs.ca if ca_form == "path" else certs.ca_pem
    client = tls_client(server.url, ca_cert=ca_cert)
    rev = await client.set(b"tls/k", b"v")
    got = await client.get(b"tls/k")
    assert got.kvs[0].value == b"v" and got.kvs[0].mod_revision == rev.revision
    assert (await client.status()).version == server.version


@pytest.mark.parametrize("trust", ["other_ca", "platform"])
@pytest_twisted.ensureDeferred
async def test_tls_untrusted_server_is_unavailable(etcd_factory, certs, tls_client, trust):
    server = etcd_factory(tls=server_tls(certs))
    ca_cert = certs.other_ca if trust == "other_ca" else None
    client = tls_client(server.url, ca_cert=ca_cert, timeout=20)
    started = time.monotonic()
    with pytest.raises(Unavailable) as info:
        await client.get(b"k")
    assert "certificate verify failed" in str(info.value)
    with pytest.raises(Unavailable):
        await client.set(b"k", b"v")
    assert time.monotonic() - started < 5  # failed at once, not after the timeout
    assert server.post("/v3/kv/range", {"key": b64("k")}).get("count") is None  # nothing written


@pytest_twisted.ensureDeferred
async def test_tls_write_refused_in_handshake_is_not_outcome_unknown(
        etcd_factory, certs, tls_client):
    server = etcd_factory(tls=server_tls(certs))
    client = tls_client(server.url, ca_cert=certs.other_ca, timeout=20)
    with pytest.raises(Unavailable) as info:
        await client.set(b"k", b"v")
    # No byte of the write left the TLS layer: its outcome is known (not applied).
    assert not isinstance(info.value, OutcomeUnknown), info.value


@pytest_twisted.ensureDeferred
async def test_mtls_requires_the_client_certificate(etcd_factory, certs, tls_client):
    server = etcd_factory(tls=server_tls(certs, mtls=True))
    without = tls_client(server.url, ca_cert=certs.ca, timeout=20)
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await without.get(b"k")
    with pytest.raises(Unavailable):
        await without.set(b"k", b"nope")
    assert time.monotonic() - started < 5
    client = tls_client(server.url, ca_cert=certs.ca_pem, cert=certs.client, key=certs.client_key)
    assert (await client.get(b"k")).kvs == []  # the refused write was not applied
    await client.set(b"k", b"v")
    assert (await client.get(b"k")).kvs[0].value == b"v"
    # Key and certificate as PEM bytes work the same.
    pem = tls_client(server.url, ca_cert=certs.ca_pem, cert=certs.client_pem,
                     key=certs.client_key_pem)
    assert (await pem.get(b"k")).kvs[0].value == b"v"


@pytest_twisted.ensureDeferred
async def test_tls_trusts_every_certificate_of_a_ca_bundle(etcd_factory, certs, tls_client):
    server = etcd_factory(tls=server_tls(certs))
    client = tls_client(server.url, ca_cert=certs.ca_bundle, timeout=20)
    await client.set(b"k", b"v")
    assert (await client.get(b"k")).kvs[0].value == b"v"


@pytest_twisted.ensureDeferred
async def test_mtls_presents_the_client_certificate_chain(etcd_factory, certs, tls_client):
    server = etcd_factory(tls=server_tls(certs, mtls=True))
    leaf_only = tls_client(server.url, ca_cert=certs.ca, cert=certs.chained_leaf,
                           key=certs.chained_key, timeout=20)
    with pytest.raises(Unavailable):  # etcd cannot link the leaf to the CA it trusts
        await leaf_only.get(b"k")
    client = tls_client(server.url, ca_cert=certs.ca, cert=certs.chained,
                        key=certs.chained_key, timeout=20)
    await client.set(b"k", b"v")
    assert (await client.get(b"k")).kvs[0].value == b"v"


@pytest.mark.parametrize(("field", "value", "message"), [
    ("ca_cert", b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
     "ca_cert holds no readable PEM certificate"),
    ("ca_cert", "client_key", "ca_cert holds no readable PEM certificate"),  # a key, no cert
    ("ca_cert", "/nonexistent/ca.pem", "cannot read ca_cert from '/nonexistent/ca.pem'"),
    ("cert", "client_key", "cert holds no readable PEM certificate"),
    ("key", "client", "key is not a readable PEM private key"),
    ("key", "encrypted_key", "key is encrypted"),
    ("key", "client_cn_key", "key is not the private key of cert"),
])
def test_tls_files_are_checked_when_the_client_is_made(certs, field, value, message):
    kwargs = {"ca_cert": certs.ca, "cert": certs.client, "key": certs.client_key}
    kwargs[field] = getattr(certs, value) if hasattr(certs, str(value)) else value
    with pytest.raises(InvalidArgument) as info:
        Client(reactor, "https://127.0.0.1:2379", **kwargs)
    assert message in str(info.value), info.value


@pytest_twisted.ensureDeferred
async def test_mtls_watch_delivers_events(etcd_factory, certs, tls_client):
    server = etcd_factory(tls=server_tls(certs, mtls=True))
    client = tls_client(server.url, ca_cert=certs.ca, cert=certs.client, key=certs.client_key)
    seen = Events()
    d = client.watch(KeySet(b"w/", prefix=True), seen)
    await d.watcher.ready
    await client.set(b"w/1", b"a")
    await client.set(b"w/2", b"b")
    await seen.wait_for(2)
    assert [(e.kv.key, e.kv.value) for e in seen.events] == [(b"w/1", b"a"), (b"w/2", b"b")]
    d.cancel()
    await d


@pytest_twisted.ensureDeferred
async def test_ca_cert_with_agent_is_honoured_or_refused(etcd_factory, certs):
    server = etcd_factory(tls=server_tls(certs))
    pool = HTTPConnectionPool(reactor, persistent=True)
    try:
        client = Client(reactor, server.url, ca_cert=certs.ca, agent=Agent(reactor, pool=pool),
                        timeout=10)
    except InvalidArgument:
        return  # refusing the combination is a fine answer
    try:
        await client.set(b"k", b"v")  # ca_cert honoured
    finally:
        await client.close()


# -- TLS set-up of the client (coord._twisted.tls.client_tls), edge by edge -----------------------
#
# A throwaway PKI made here: ``root`` -> ``i1`` -> ``i2``, a root CA and two levels of
# intermediate CAs.  Server A: mutual TLS, its certificate issued by the root, trusting the
# root only (``--trusted-ca-file``), so a client certificate issued by an intermediate is
# only accepted if the client presents the chain.  Server B: TLS only, its certificate
# issued by ``i1`` and served *without* its chain, so the client must trust ``i1`` from its
# ``ca_cert`` bundle (alone or with the root: every certificate of the bundle is a trust
# anchor, as in Go).  Both servers live for the module (each test uses its own keys); the
# client tests run through both transports (``tls_client``).

PEM = serialization.Encoding.PEM
NO_ENCRYPTION = serialization.NoEncryption()


def _key_bytes(key, fmt=serialization.PrivateFormat.PKCS8, encoding=PEM,
               encryption=NO_ENCRYPTION) -> bytes:
    return key.private_bytes(encoding, fmt, encryption)


def _leaf(issuer: x509.Certificate, issuer_key, key, usages, sans=None) -> x509.Certificate:
    """A leaf certificate for ``key`` (any type) signed by ``issuer`` (an EC CA)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = x509.CertificateBuilder().subject_name(_org(f"coord edge {uuid.uuid4()}")) \
        .issuer_name(issuer.subject).public_key(key.public_key()) \
        .serial_number(x509.random_serial_number()) \
        .not_valid_before(now - datetime.timedelta(minutes=5)) \
        .not_valid_after(now + datetime.timedelta(days=1)) \
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True) \
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False) \
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


LOCAL = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
SERVER_USAGES = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
CLIENT_USAGES = [ExtendedKeyUsageOID.CLIENT_AUTH]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    d: Path = tmp_path_factory.mktemp("edge-pki")
    p = SimpleNamespace(dir=d)
    p.root, p.root_key = _make_ca("edge-pki root")
    p.i1, p.i1_key = _make_ca("edge-pki intermediate 1", (p.root, p.root_key))
    p.i2, p.i2_key = _make_ca("edge-pki intermediate 2", (p.i1, p.i1_key))
    p.other, _ = _make_ca("edge-pki unrelated CA")
    # Servers.
    p.a_key = ec.generate_private_key(ec.SECP256R1())
    p.a = _leaf(p.root, p.root_key, p.a_key, SERVER_USAGES, LOCAL)
    p.b_key = ec.generate_private_key(ec.SECP256R1())
    p.b = _leaf(p.i1, p.i1_key, p.b_key, SERVER_USAGES, LOCAL)
    # Client keys of every kind, each with a certificate from the root.
    p.keys = {
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "ec384": ec.generate_private_key(ec.SECP384R1()),
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
    }
    p.certs = {kind: _leaf(p.root, p.root_key, key, CLIENT_USAGES)
               for kind, key in p.keys.items()}
    # A client certificate two intermediates below the root.
    p.deep_key = ec.generate_private_key(ec.SECP256R1())
    p.deep = _leaf(p.i2, p.i2_key, p.deep_key, CLIENT_USAGES)

    def write(name: str, data: bytes) -> str:
        path = d / name
        path.write_bytes(data)
        return str(path)

    p.write = write
    p.root_file = write("root.pem", _cert_pem(p.root))
    p.b_ca_file = write("b-ca.pem", _cert_pem(p.i1) + _cert_pem(p.root))
    p.a_file = write("a.pem", _cert_pem(p.a))
    p.a_key_file = write("a-key.pem", _key_bytes(p.a_key))
    p.b_file = write("b.pem", _cert_pem(p.b))  # the leaf only: etcd serves no chain
    p.b_key_file = write("b-key.pem", _key_bytes(p.b_key))
    p.ec_file = write("ec.pem", _cert_pem(p.certs["ec"]))
    p.ec_key_file = write("ec-key.pem", _key_bytes(p.keys["ec"]))
    return p


@pytest.fixture(scope="module")
def server_a(pki):
    """Mutual TLS; trusts the root only."""
    tls = ServerTLS(pki.a_file, pki.a_key_file, pki.root_file, client_cert_auth=True,
                    client_cert_file=pki.ec_file, client_key_file=pki.ec_key_file)
    with EtcdServer(tls=tls) as server:
        yield server


@pytest.fixture(scope="module")
def server_b(pki):
    """TLS only; its certificate comes from intermediate i1 and is served alone."""
    with EtcdServer(tls=ServerTLS(pki.b_file, pki.b_key_file, pki.b_ca_file)) as server:
        yield server


async def _round_trip(client) -> None:
    key = f"adv/{uuid.uuid4()}".encode()
    await client.set(key, b"v")
    assert (await client.get(key)).kvs[0].value == b"v"


# -- client certificates: key types and key file formats -----------------------------------------

TRADITIONAL = serialization.PrivateFormat.TraditionalOpenSSL
PKCS8 = serialization.PrivateFormat.PKCS8
EC_PARAMETERS = b"-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n"


@pytest.mark.parametrize(("kind", "key_format"), [
    ("rsa", "pkcs1"),        # BEGIN RSA PRIVATE KEY
    ("rsa", "pkcs8"),
    ("ec", "sec1"),          # BEGIN EC PRIVATE KEY
    ("ec", "sec1+params"),   # as `openssl ecparam -genkey` writes it
    ("ec384", "pkcs8"),
    ("ed25519", "pkcs8"),
])
@pytest_twisted.ensureDeferred
async def test_mtls_every_key_type_and_format(server_a, pki, tls_client, kind, key_format):
    key = pki.keys[kind]
    if key_format == "pkcs8":
        key_pem = _key_bytes(key, PKCS8)
    else:
        key_pem = _key_bytes(key, TRADITIONAL)
        assert (b"RSA PRIVATE KEY" if kind == "rsa" else b"EC PRIVATE KEY") in key_pem
        if key_format == "sec1+params":
            key_pem = EC_PARAMETERS + key_pem
    client = tls_client(server_a.url, ca_cert=pki.root_file, cert=_cert_pem(pki.certs[kind]),
                        key=key_pem, timeout=20)
    await _round_trip(client)


# -- client certificate chains --------------------------------------------------------------------


@pytest.mark.parametrize(("chain", "accepted"), [
    ("deep i2 i1", True),
    ("deep i2 i1 root", True),  # the root too, as some tools write it
    ("deep i2", False),  # i1 missing: the server cannot reach its root (proves i1 is sent)
])
@pytest_twisted.ensureDeferred
async def test_mtls_presents_two_levels_of_intermediates(server_a, pki, tls_client, chain,
                                                          accepted):
    pem = b"".join(_cert_pem(getattr(pki, name)) for name in chain.split())
    client = tls_client(server_a.url, ca_cert=pki.root_file, cert=pem,
                        key=_key_bytes(pki.deep_key), timeout=20)
    if accepted:
        await _round_trip(client)
    else:
        with pytest.raises(Unavailable):
            await client.get(b"adv/k")


def test_chain_in_the_wrong_order_is_refused_when_the_client_is_made(pki):
    # etcdctl (Go's tls.X509KeyPair) also takes the first certificate as the client's.
    pem = _cert_pem(pki.i2) + _cert_pem(pki.deep) + _cert_pem(pki.i1)
    with pytest.raises(InvalidArgument, match="key is not the private key of cert"):
        Client(reactor, "https://127.0.0.1:2379", ca_cert=pki.root_file, cert=pem,
               key=_key_bytes(pki.deep_key))


# -- how files are written in the wild -----------------------------------------------------------


def _crlf(pem: bytes) -> bytes:
    return pem.replace(b"\n", b"\r\n")


@pytest.mark.parametrize("framing", [
    "crlf",            # files from Windows
    "bag-attributes",  # `openssl pkcs12 -nodes` output
    "text-before",     # `openssl x509 -text` output, easy-rsa's issued/*.crt
    "combined",        # one file with the key and the chain, given as both cert and key
])
@pytest_twisted.ensureDeferred
async def test_mtls_files_as_tools_write_them(server_a, pki, tls_client, framing):
    chain = [_cert_pem(pki.deep), _cert_pem(pki.i2), _cert_pem(pki.i1)]
    key = _key_bytes(pki.deep_key)
    ca = _cert_pem(pki.root)
    if framing == "crlf":
        cert, key, ca = _crlf(b"".join(chain)), _crlf(key), _crlf(ca)
    elif framing == "bag-attributes":
        cert = b"".join(b"Bag Attributes\n    friendlyName: c\nsubject=/O=x\nissuer=/CN=y\n" + c
                        for c in chain)
        key = b"Bag Attributes\n    localKeyID: 01 02\nKey Attributes: <No Attributes>\n" + key
        ca = b"Bag Attributes\n    friendlyName: root\n" + ca
    elif framing == "text-before":
        cert = b"".join(b"Certificate:\n    Data:\n        Version: 3 (0x2)\n" + c for c in chain)
        ca = b"# the edge-pki root\n\n" + ca + b"\n# end\n"
    else:
        cert = key = pki.write("combined.pem", key + b"".join(chain))
    client = tls_client(server_a.url, ca_cert=ca, cert=cert, key=key, timeout=20)
    await _round_trip(client)


@pytest.mark.parametrize("form", ["str path", "bytes path", "pathlib.Path", "PEM bytes"])
@pytest_twisted.ensureDeferred
async def test_mtls_argument_forms(server_a, pki, tls_client, form):
    files = {"ca_cert": pki.root_file, "cert": pki.ec_file, "key": pki.ec_key_file}
    if form == "bytes path":
        files = {k: os.fsencode(v) for k, v in files.items()}
    elif form == "pathlib.Path":
        files = {k: Path(v) for k, v in files.items()}
    elif form == "PEM bytes":
        files = {k: Path(v).read_bytes() for k, v in files.items()}
    client = tls_client(server_a.url, timeout=20, **files)
    await _round_trip(client)


@pytest_twisted.ensureDeferred
async def test_mtls_platform_trust_with_a_client_chain(server_a, pki, tls_client, monkeypatch):
    # ca_cert=None: the platform's trust store, which OpenSSL takes from $SSL_CERT_FILE.
    monkeypatch.setenv("SSL_CERT_FILE", pki.root_file)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    chain = _cert_pem(pki.deep) + _cert_pem(pki.i2) + _cert_pem(pki.i1)
    client = tls_client(server_a.url, ca_cert=None, cert=chain, key=_key_bytes(pki.deep_key),
                        timeout=20)
    await _round_trip(client)


@pytest_twisted.ensureDeferred
async def test_no_warning_on_any_tls_path(server_a, server_b, pki, tls_client, monkeypatch):
    # Explicit, not only through the suite's filterwarnings=error: a warning raised inside
    # the handshake could be swallowed into a connection failure and retried.
    monkeypatch.setenv("SSL_CERT_FILE", pki.root_file)
    chain = _cert_pem(pki.deep) + _cert_pem(pki.i2) + _cert_pem(pki.i1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for kind in ("rsa", "ed25519"):
            await _round_trip(tls_client(server_a.url, ca_cert=pki.root_file,
                                         cert=_cert_pem(pki.certs[kind]),
                                         key=_key_bytes(pki.keys[kind]), timeout=20))
        await _round_trip(tls_client(server_a.url, ca_cert=None, cert=chain,
                                     key=_key_bytes(pki.deep_key), timeout=20))
        await _round_trip(tls_client(server_b.url, ca_cert=pki.b_ca_file, timeout=20))
    assert [str(w.message) for w in caught] == []


# -- ca_cert bundles ------------------------------------------------------------------------------


@pytest.mark.parametrize(("bundle", "trusted"), [
    ("i1 root", True),
    ("root i1", True),
    ("other root i1 root i1", True),  # duplicates, as concatenated bundles have
    ("root", False),                  # the server's issuer missing: proves i1 is used
    ("other", False),
])
@pytest_twisted.ensureDeferred
async def test_ca_bundle_with_the_servers_intermediate(server_b, pki, tls_client, bundle,
                                                       trusted):
    ca = b"".join(_cert_pem(getattr(pki, name)) for name in bundle.split())
    client = tls_client(server_b.url, ca_cert=ca, timeout=20)
    if trusted:
        await _round_trip(client)
    else:
        with pytest.raises(Unavailable, match="certificate verify failed"):
            await client.get(b"adv/k")


@pytest_twisted.ensureDeferred
async def test_ca_bundle_with_comments_crlf_and_a_key_in_it(server_b, pki, tls_client):
    ca = (b"# CA bundle, rotated 2026-11\r\n\r\n" + _crlf(_cert_pem(pki.other))
          + b"\r\n# the key of the old CA, left in by mistake\r\n" + _crlf(_key_bytes(pki.i1_key))
          + b"intermediate:\r\n" + _crlf(_cert_pem(pki.i1)) + b"root:\r\n"
          + _crlf(_cert_pem(pki.root)))
    client = tls_client(server_b.url, ca_cert=pki.write("messy-bundle.pem", ca), timeout=20)
    await _round_trip(client)


@pytest_twisted.ensureDeferred
async def test_ca_cert_of_the_servers_intermediate_alone_is_trusted(server_b, pki, tls_client):
    client = tls_client(server_b.url, ca_cert=_cert_pem(pki.i1), timeout=20)
    await _round_trip(client)


# -- refused when the Client is made ---------------------------------------------------------------


def _make(pki, url="https://127.0.0.1:2379", **kwargs):
    args = {"ca_cert": pki.root_file, "cert": pki.ec_file, "key": pki.ec_key_file}
    args.update(kwargs)
    return Client(reactor, url, **args)


def _names(message: str, field: str) -> bool:
    """Whether an error message is about ``field`` (it says so first)."""
    return message.startswith((f"{field} ", f"cannot read {field} from "))


@pytest.mark.parametrize("field", ["ca_cert", "cert", "key"])
@pytest.mark.parametrize("content", ["empty file", "directory", "DER file", "garbage",
                                     "wrong PEM kind"])
def test_bad_files_are_invalid_argument_naming_the_argument(pki, field, content):
    if content == "empty file":
        value = pki.write(f"empty-{field}.pem", b"")
    elif content == "directory":
        value = str(pki.dir)
    elif content == "DER file":
        der = (_key_bytes(pki.keys["ec"], encoding=serialization.Encoding.DER) if field == "key"
               else pki.certs["ec"].public_bytes(serialization.Encoding.DER))
        value = pki.write(f"der-{field}.der", der)
    elif content == "garbage":
        value = pki.write(f"garbage-{field}.pem", b"-----BEGIN CERTIFICATE-----\n!!\n"
                          b"-----END CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----\n!!\n"
                          b"-----END PRIVATE KEY-----\n")
    else:  # a key where a certificate belongs and the other way round
        value = pki.ec_file if field == "key" else pki.ec_key_file
    with pytest.raises(InvalidArgument) as info:
        _make(pki, **{field: value})
    assert _names(str(info.value), field), info.value


@pytest.mark.parametrize("field", ["ca_cert", "cert", "key"])
def test_der_bytes_are_invalid_argument_naming_the_argument(pki, field):
    der = (_key_bytes(pki.keys["ec"], encoding=serialization.Encoding.DER) if field == "key"
           else pki.certs["ec"].public_bytes(serialization.Encoding.DER))
    with pytest.raises(InvalidArgument) as info:
        _make(pki, **{field: der})
    assert _names(str(info.value), field), info.value


def test_pem_text_is_pem_and_a_secret_is_never_echoed(pki):
    pem = _key_bytes(pki.keys["ec"]).decode()
    client = _make(pki, key=pem)  # PEM as str is PEM, not a file name
    closed = client.close()
    assert closed.called
    # Text that is neither PEM nor a readable file: refused, and not quoted back.
    secret = pem.splitlines()[1]
    for junk in (secret, secret + "\n" + secret):
        with pytest.raises(InvalidArgument) as info:
            _make(pki, key=junk)
        assert secret not in str(info.value), "the value is in the error message"
        assert _names(str(info.value), "key"), info.value


@pytest.mark.parametrize(("cert", "key", "message"), [
    ("ec", "rsa", "key is not the private key of cert"),
    ("rsa", "ec", "key is not the private key of cert"),
    ("ed25519", "other ed25519", "key is not the private key of cert"),
    ("ec", "other ec", "key is not the private key of cert"),       # same curve, other key
    ("deep chain", "i1", "key is not the private key of cert"),     # a chain cert's key
    ("rsa", "rsa encrypted pkcs1", "key is encrypted"),             # Proc-Type: 4,ENCRYPTED
])
def test_mismatched_and_encrypted_keys(pki, cert, key, message):
    certs = dict(pki.certs)
    certs["deep chain"] = pki.deep
    keys = {**pki.keys, "other ed25519": ed25519.Ed25519PrivateKey.generate(),
            "other ec": ec.generate_private_key(ec.SECP256R1()), "i1": pki.i1_key}
    if key == "rsa encrypted pkcs1":
        key_pem = _key_bytes(pki.keys["rsa"], TRADITIONAL,
                             encryption=serialization.BestAvailableEncryption(b"pw"))
        assert b"Proc-Type: 4,ENCRYPTED" in key_pem
    else:
        key_pem = _key_bytes(keys[key])
    cert_pem = _cert_pem(certs[cert])
    if cert == "deep chain":
        cert_pem += _cert_pem(pki.i2) + _cert_pem(pki.i1)
    with pytest.raises(InvalidArgument, match=message):
        _make(pki, cert=cert_pem, key=key_pem)


class _Counting(protocol.ServerFactory):
    def __init__(self):
        self.connections = 0

    def buildProtocol(self, addr):
        self.connections += 1
        return protocol.Protocol()


@pytest_twisted.ensureDeferred
async def test_a_refused_client_starts_nothing(pki):
    factory = _Counting()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        url = f"https://127.0.0.1:{port.getHost().port}"
        readers, writers = set(reactor.getReaders()), set(reactor.getWriters())
        calls = set(reactor.getDelayedCalls())
        for kwargs in ({"key": pki.ec_file}, {"key": _key_bytes(pki.keys["rsa"])},
                       {"ca_cert": "/nonexistent"}, {"cert": pki.ec_key_file}):
            with pytest.raises(InvalidArgument):
                _make(pki, url, **kwargs)
        await sleep(0.3)
        assert factory.connections == 0
        assert set(reactor.getReaders()) == readers and set(reactor.getWriters()) == writers
        assert set(reactor.getDelayedCalls()) - calls == set()
    finally:
        await port.stopListening()


# -- what a failed connection says ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_http_to_a_tls_only_etcd_hints_at_tls(etcd_factory, certs, new_client):
    # etcd closes a plain-HTTP connection to its TLS port without a word; all the
    # message said was "Connection was closed cleanly".
    server = etcd_factory(tls=server_tls(certs))
    plain = server.url.replace("https://", "http://")
    client = new_client(plain, timeout=10)
    with pytest.raises(Unavailable) as info:
        await client.get(b"k")
    assert "is it TLS-only? try " + server.url in str(info.value)
    with pytest.raises(OutcomeUnknown) as written:  # a write was sent: outcome unknown
        await client.set(b"k", b"v")
    assert "TLS-only" in str(written.value)


class _Silent(protocol.Protocol):
    def dataReceived(self, data):
        pass


@pytest.fixture
def expired_tls_server(certs):
    """An https URL whose server presents a certificate (of the test CA) expired
    yesterday; it never gets past the handshake, so it needs no etcd behind it."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from twisted.internet import ssl

    options = ssl.CertificateOptions(
        privateKey=load_pem_private_key(certs.expired_key_pem, None),
        certificate=x509.load_pem_x509_certificate(certs.expired_pem))
    port = reactor.listenSSL(0, protocol.Factory.forProtocol(_Silent), options,
                             interface="127.0.0.1")
    yield f"https://127.0.0.1:{port.getHost().port}"
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest_twisted.ensureDeferred
async def test_expired_server_certificate_says_so(expired_tls_server, certs, tls_client,
                                                  transport):
    client = tls_client(expired_tls_server, ca_cert=certs.ca, timeout=10)
    for call in (lambda: client.get(b"k"), lambda: client.set(b"k", b"v")):
        with pytest.raises(Unavailable) as info:  # (not sent: the handshake failed)
            await call()
        assert not isinstance(info.value, OutcomeUnknown)
        assert "certificate verify failed" in str(info.value)
        if transport == "pool":
            # OpenSSL's reason, which its handshake error leaves out.
            assert "certificate has expired" in str(info.value)
        # (Through an Agent the TLS connection is out of coord's reach: OpenSSL's words.)


# -- auth -----------------------------------------------------------------------------------------

ROOT_PASSWORD = "root-secret"
ALICE_PASSWORD = "alice-secret"
ALICE_PREFIX = b"app/"


def authenticate(server: EtcdServer, name: str, password: str) -> str:
    token: str = server.post("/v3/auth/authenticate", {"name": name, "password": password})[
        "token"]
    return token


def as_root(server: EtcdServer, path: str, body: dict) -> dict:
    """A gateway request made with a fresh root token (auth must be enabled)."""
    token = authenticate(server, "root", ROOT_PASSWORD)
    return server.post(path, body, headers={"Authorization": token})  # type: ignore[no-any-return]


def enable_auth(server: EtcdServer) -> None:
    """Users root (role root) and alice (role app: read-write on app/...), then auth on."""
    server.post("/v3/auth/user/add", {"name": "root", "password": ROOT_PASSWORD})
    server.post("/v3/auth/user/grant", {"user": "root", "role": "root"})
    server.post("/v3/auth/role/add", {"name": "app"})
    server.post("/v3/auth/role/grant", {"name": "app", "perm": {
        "permType": "READWRITE", "key": b64(ALICE_PREFIX), "range_end": b64(b"app0")}})
    server.post("/v3/auth/user/add", {"name": "alice", "password": ALICE_PASSWORD})
    server.post("/v3/auth/user/grant", {"user": "alice", "role": "app"})
    server.post("/v3/auth/enable", {})
    # From now on the gateway wants a token.
    status = as_root(server, "/v3/auth/status", {}) if server.version_info >= (3, 5) else None
    assert status is None or status.get("enabled") is True


@pytest.fixture
def auth_server(etcd_factory):
    server = etcd_factory()
    enable_auth(server)
    return server


@pytest.fixture
def short_token_server(etcd_factory):
    """Auth on, simple tokens that expire after 1 s unused (3.4 and 3.5 both take the flag)."""
    server = etcd_factory(extra_args=["--auth-token=simple", "--auth-token-ttl=1"])
    enable_auth(server)
    return server


@pytest_twisted.ensureDeferred
async def test_auth_root_can_set_and_get(auth_server, new_client):
    client = new_client(auth_server.url, user="root", password=ROOT_PASSWORD)
    rev = await client.set(b"k", b"v")
    got = await client.get(b"k")
    assert got.kvs[0].value == b"v" and got.kvs[0].mod_revision == rev.revision
    # Concurrent first calls share one authentication and all succeed.
    results = await defer.gatherResults(
        [client.get(b"k") for _ in range(5)] + [client.set(b"k2", b"x")])
    assert all(r.kvs[0].value == b"v" for r in results[:5])
    # The server really refuses the same request without a token.
    with pytest.raises(Exception, match="user name is empty"):
        auth_server.post("/v3/kv/range", {"key": b64("k")})


@pytest_twisted.ensureDeferred
async def test_auth_bad_password_is_auth_failed(auth_server, new_client):
    client = new_client(auth_server.url, user="root", password="wrong", timeout=10)
    with pytest.raises(AuthFailed):
        await client.get(b"k")
    with pytest.raises(AuthFailed):
        await client.set(b"k", b"v")
    unknown = new_client(auth_server.url, user="nobody", password="x", timeout=10)
    with pytest.raises(AuthFailed):
        await unknown.get(b"k")


@pytest_twisted.ensureDeferred
async def test_auth_watch_with_bad_password_fails(auth_server, new_client):
    client = new_client(auth_server.url, user="root", password="wrong", timeout=10)
    d = client.watch(b"k", lambda e: None)
    try:
        await sleep(2)
        reconnects = d.watcher.reconnects
        with pytest.raises(AuthFailed):
            await d.addTimeout(1, reactor)
    finally:
        d.cancel()
    assert reconnects == 0


@pytest_twisted.ensureDeferred
async def test_auth_no_credentials_is_unauthenticated(auth_server, new_client):
    client = new_client(auth_server.url, timeout=10)
    with pytest.raises(Unauthenticated) as info:
        await client.get(b"k")
    assert not isinstance(info.value, AuthFailed)
    assert "user name is empty" in str(info.value)
    with pytest.raises(Unauthenticated):
        await client.set(b"k", b"v")
    assert (await client.status()).version  # Status needs no auth


@pytest_twisted.ensureDeferred
async def test_auth_limited_user_inside_and_outside_its_prefix(auth_server, new_client):
    alice = new_client(auth_server.url, user="alice", password=ALICE_PASSWORD, timeout=10)
    await alice.set(b"app/config", b"1")
    assert (await alice.get(b"app/config")).kvs[0].value == b"1"
    assert (await alice.get(KeySet(ALICE_PREFIX, prefix=True))).count == 1
    with pytest.raises(PermissionDenied):
        await alice.set(b"other", b"x")
    with pytest.raises(PermissionDenied):
        await alice.get(b"other")
    with pytest.raises(PermissionDenied):
        await alice.get(KeySet(b"", prefix=True))  # every key: more than app/
    with pytest.raises(PermissionDenied):
        await alice.delete(b"other")
    # Root sees alice's write; alice's refused write left nothing.
    root = new_client(auth_server.url, user="root", password=ROOT_PASSWORD)
    assert (await root.get(b"app/config")).kvs[0].value == b"1"
    assert (await root.get(b"other")).kvs == []
    # A watch inside the prefix works.
    seen = Events()
    d = alice.watch(KeySet(ALICE_PREFIX, prefix=True), seen)
    await d.watcher.ready
    await root.set(b"app/x", b"2")
    await seen.wait_for(1)
    assert seen.events[0].kv.key == b"app/x"
    d.cancel()
    await d


@pytest_twisted.ensureDeferred
async def test_auth_watch_outside_prefix_is_permission_denied(auth_server, new_client):
    alice = new_client(auth_server.url, user="alice", password=ALICE_PASSWORD, timeout=10)
    d = alice.watch(b"other", lambda e: None)
    try:
        with pytest.raises(EtcdError) as info:
            await d.watcher.ready.addTimeout(5, reactor)
        assert isinstance(info.value, PermissionDenied), repr(info.value)
        with pytest.raises(PermissionDenied):
            await d
    finally:
        d.cancel()


@pytest_twisted.ensureDeferred
@pytest.mark.slow
async def test_auth_token_expiry_is_transparent(short_token_server, new_client):
    client = new_client(short_token_server.url, user="root", password=ROOT_PASSWORD, timeout=10)
    await client.set(b"k", b"v1")
    first_token = client._transport._token
    assert first_token
    await sleep(2.5)
    # The token is gone on the server: the first request is refused, re-authenticates and
    # is sent once more, transparently.
    with pytest.raises(EtcdRequestError, match="invalid auth token"):
        short_token_server.post("/v3/kv/range", {"key": b64("k")},
                                headers={"Authorization": first_token})
    assert (await client.get(b"k")).kvs[0].value == b"v1"
    assert client._transport._token not in (None, first_token)
    await sleep(2.5)
    # A write too, and concurrent calls that all meet the expired token at once.
    results = await defer.gatherResults(
        [client.set(b"k", b"v2")] + [client.get(KeySet(b"k", prefix=True)) for _ in range(4)])
    assert all(r.count == 1 for r in results[1:])
    assert (await client.get(b"k")).kvs[0].value == b"v2"


@pytest_twisted.ensureDeferred
async def test_auth_after_etcd_restart(auth_server, new_client, transport):
    client = new_client(auth_server.url, user="root", password=ROOT_PASSWORD, timeout=10)
    await client.set(b"k", b"v1")
    token = client._transport._token
    auth_server.restart()  # simple tokens live in memory only: ours is gone
    assert (await client.get(b"k")).kvs[0].value == b"v1"
    assert client._transport._token not in (None, token)
    await client.set(b"k", b"v2")
    assert (await client.get(b"k")).kvs[0].value == b"v2"
    auth_server.restart()
    if transport == "treq":
        # treq cannot tell that the restart closed its kept-alive connections: the first
        # write after it would fail with OutcomeUnknown (documented in coord._twisted.treq).
        await client.get(b"k")
    await client.set(b"k", b"v3")  # (through the pool: the first request with the lost token)
    assert (await client.get(b"k")).kvs[0].value == b"v3"


@pytest_twisted.ensureDeferred
async def test_auth_watch_created_after_token_expiry(short_token_server, new_client):
    client = new_client(short_token_server.url, user="root", password=ROOT_PASSWORD, timeout=10)
    writer = new_client(short_token_server.url, user="root", password=ROOT_PASSWORD, timeout=10)
    await client.set(b"w/0", b"before")  # authenticates
    await sleep(2.5)  # the token expires
    seen = Events()
    d = client.watch(KeySet(b"w/", prefix=True), seen)
    try:
        await d.watcher.ready.addTimeout(10, reactor)
        await writer.set(b"w/1", b"after")  # (writer's own token: client's stays stale)
        await seen.wait_for(1, timeout=3)
        assert [(e.kv.key, e.kv.value) for e in seen.events] == [(b"w/1", b"after")]
    finally:
        d.cancel()


@pytest_twisted.ensureDeferred
async def test_auth_watch_survives_etcd_restart(auth_server, new_client):
    client = new_client(auth_server.url, user="root", password=ROOT_PASSWORD, timeout=10)
    seen = Events()
    d = client.watch(KeySet(b"w/", prefix=True), seen)
    try:
        await d.watcher.ready
        await client.set(b"w/1", b"a")
        await seen.wait_for(1)
        auth_server.restart()  # the stream breaks and the token is lost with the restart
        await sleep(1)  # the watcher creates its stream again (with the lost token)
        assert d.watcher.reconnects >= 1
        writer = new_client(auth_server.url, user="root", password=ROOT_PASSWORD, timeout=10)
        await writer.set(b"w/2", b"b")
        await seen.wait_for(2, timeout=3)
        assert [e.kv.key for e in seen.events] == [b"w/1", b"w/2"]
        assert not d.called
    finally:
        d.cancel()


@pytest.fixture
def jwt_server(etcd_factory, tmp_path):
    """Auth on, with JWT tokens (ES256, a throwaway key pair)."""
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = tmp_path / "jwt.key", tmp_path / "jwt.pub"
    private.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    server = etcd_factory(extra_args=[
        f"--auth-token=jwt,pub-key={public},priv-key={private},sign-method=ES256,ttl=60s"])
    enable_auth(server)
    return server


@pytest_twisted.ensureDeferred
async def test_auth_jwt_tokens(jwt_server, new_client):
    client = new_client(jwt_server.url, user="alice", password=ALICE_PASSWORD, timeout=10)
    await client.set(b"app/k", b"v")
    assert client._transport._token.count(".") == 2  # a JWT
    assert (await client.get(b"app/k")).kvs[0].value == b"v"
    with pytest.raises(PermissionDenied):
        await client.get(b"other")


@pytest.mark.parametrize("tokens", ["simple", "jwt"])
@pytest_twisted.ensureDeferred
async def test_auth_survives_an_auth_store_change(request, new_client, tokens):
    # A simple token is checked against the current auth store; a JWT carries the auth
    # store's revision from when it was issued, and etcd refuses it once the store moved:
    # "etcdserver: revision of auth store is old".
    server = request.getfixturevalue("auth_server" if tokens == "simple" else "jwt_server")
    client = new_client(server.url, user="root", password=ROOT_PASSWORD, timeout=10)
    await client.set(b"k", b"v1")  # authenticated
    as_root(server, "/v3/auth/user/add", {"name": "bob", "password": "bob-secret"})
    assert (await client.get(b"k")).kvs[0].value == b"v1"
    await client.set(b"k", b"v2")


@pytest_twisted.ensureDeferred
async def test_auth_over_mutual_tls(etcd_factory, certs, tls_client):
    server = etcd_factory(tls=server_tls(certs, mtls=True))
    enable_auth(server)
    client = tls_client(server.url, ca_cert=certs.ca, cert=certs.client, key=certs.client_key,
                        user="alice", password=ALICE_PASSWORD)
    await client.set(b"app/k", b"v")
    assert (await client.get(b"app/k")).kvs[0].value == b"v"
    with pytest.raises(PermissionDenied):
        await client.get(b"other")
    seen = Events()
    d = client.watch(b"app/k", seen)
    await d.watcher.ready
    await client.set(b"app/k", b"w")
    await seen.wait_for(1)
    d.cancel()
    await d
    # etcd's gateway refuses a client certificate with a CommonName once auth is on.
    named = tls_client(server.url, ca_cert=certs.ca, cert=certs.client_cn,
                       key=certs.client_cn_key, user="alice", password=ALICE_PASSWORD)
    with pytest.raises(EtcdError, match="CommonName of client"):
        await named.get(b"app/k")


# -- recipes refused by etcd's permissions --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_refused_lock_and_campaign_clean_up_quietly(auth_server, new_client):
    """A lock or campaign on a prefix its user may not write is refused (PermissionDenied):
    its transaction wrote nothing, so nothing is deleted -- before, the clean-up tried to
    delete the key it never wrote, was refused again, and logged a traceback."""
    from twisted.logger import globalLogPublisher

    from coord.recipes import Election, Lock
    from coord.session import Session

    alice = new_client(auth_server.url, user="alice", password=ALICE_PASSWORD, timeout=10)
    root = new_client(auth_server.url, user="root", password=ROOT_PASSWORD, timeout=10)
    logged: list[dict] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        session = await Session.create(alice, ttl=10)
        try:
            with pytest.raises(PermissionDenied):
                await Lock(session, b"locks/db").acquire(timeout=5)
            with pytest.raises(PermissionDenied):
                await Lock(session, b"locks/db2").try_acquire()
            with pytest.raises(PermissionDenied):
                await Election(session, b"leader").campaign(b"alice", timeout=5)
            with pytest.raises(PermissionDenied):
                await alice.lock(b"locks/db3", timeout=5)  # its own session: revoked
            await sleep(0.2)  # a clean-up in the background would have run by now
        finally:
            await session.close()
    finally:
        globalLogPublisher.removeObserver(logged.append)
    failures = [e for e in logged if e.get("log_failure") is not None]
    assert failures == [], [e["log_failure"].getTraceback() for e in failures]
    assert not [e for e in logged if "delet" in str(e.get("log_format", ""))]
    assert (await root.get(KeySet(b"", prefix=True), count_only=True)).count == 0
    assert await root.leases() == []


# -- the coord command -------------------------------------------------------------------


def test_coord_command_over_mutual_tls(etcd_factory, certs):
    """etcdctl's TLS flags (and their $ETCDCTL_ forms): https is implied by them."""
    server = etcd_factory(tls=server_tls(certs, mtls=True))
    endpoint = server.url.split("://", 1)[1]
    flags = ["--cacert", certs.ca, "--cert", certs.client, "--key", certs.client_key]
    assert run_coord("put", "k", "v", *flags, url=endpoint).stdout == b"OK\n"
    env = {"ETCDCTL_CACERT": certs.ca, "ETCDCTL_CERT": certs.client,
           "ETCDCTL_KEY": certs.client_key}
    assert run_coord("get", "k", url=endpoint, env=env).stdout == b"k\nv\n"
    # No client certificate: the server refuses the handshake.
    refused = run_coord("get", "k", "--cacert", certs.ca, url=endpoint)
    assert refused.returncode == 3 and b"cannot reach etcd" in refused.stderr
    # A CA that did not sign the server's certificate.
    untrusted = run_coord("get", "k", "--cacert", certs.other_ca, "--cert", certs.client,
                          "--key", certs.client_key, url=endpoint)
    assert untrusted.returncode == 3 and b"cannot reach etcd" in untrusted.stderr
    # An encrypted key is refused before anything is sent, saying so.
    encrypted = run_coord("get", "k", "--cacert", certs.ca, "--cert", certs.client,
                          "--key", certs.encrypted_key, url=endpoint)
    assert encrypted.returncode == 2 and b"encrypted" in encrypted.stderr
    assert run_coord("get", "k", "--cacert", certs.ca, "--cert", certs.client,
                     url=endpoint).returncode == 2  # a certificate needs its key
