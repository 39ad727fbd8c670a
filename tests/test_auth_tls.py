"""TLS, mutual TLS and authentication against a real etcd, through both transports.

Throwaway certificates are made here with ``cryptography``: a CA, a server
certificate for 127.0.0.1 / localhost, a client certificate, and a second CA that
signed none of them. Auth tests run on private servers whose auth is switched on
through the JSON gateway, as an operator would.

The treq transport sends through an Agent the test builds; its TLS policy is made
from coord's own ``client_tls`` (so ``ca_cert`` as a path or as PEM bytes is
exercised there too).
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from helpers import sleep
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
