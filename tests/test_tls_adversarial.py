"""Adversarial tests of coord's client TLS set-up (``coord._twisted.tls.client_tls``).

Everything runs against real etcd servers with a throwaway PKI made here:

* ``root`` -> ``i1`` -> ``i2``: a root CA and two levels of intermediate CAs;
* server A: mutual TLS, its certificate issued by the root, trusting the root only
  (``--trusted-ca-file``), so a client certificate issued by an intermediate is only
  accepted if the client presents the chain;
* server B: TLS only, its certificate issued by ``i1`` and served *without* its chain,
  so the client must trust ``i1`` from its ``ca_cert`` bundle (alone or with the root:
  every certificate of the bundle is a trust anchor, as in Go).

Both servers live for the module (each test uses its own keys); the client tests run
through both transports (the treq one with the tests' ``CoordTLSPolicy``, which is built
from ``client_tls`` too).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import uuid
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytest_twisted
import test_auth_tls
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from helpers import sleep
from test_auth_tls import _cert_pem, _make_ca, _org
from twisted.internet import protocol, reactor

from coord import Client, InvalidArgument, Unavailable
from coord.server import EtcdServer, ServerTLS

tls_client = test_auth_tls.tls_client  # the fixture: a Client through either transport

PEM = serialization.Encoding.PEM
NO_ENCRYPTION = serialization.NoEncryption()


def _key_bytes(key, fmt=serialization.PrivateFormat.PKCS8, encoding=PEM,
               encryption=NO_ENCRYPTION) -> bytes:
    return key.private_bytes(encoding, fmt, encryption)


def _leaf(issuer: x509.Certificate, issuer_key, key, usages, sans=None) -> x509.Certificate:
    """A leaf certificate for ``key`` (any type) signed by ``issuer`` (an EC CA)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = x509.CertificateBuilder().subject_name(_org(f"coord adversarial {uuid.uuid4()}")) \
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
    d: Path = tmp_path_factory.mktemp("adversarial-pki")
    p = SimpleNamespace(dir=d)
    p.root, p.root_key = _make_ca("adversarial root")
    p.i1, p.i1_key = _make_ca("adversarial intermediate 1", (p.root, p.root_key))
    p.i2, p.i2_key = _make_ca("adversarial intermediate 2", (p.i1, p.i1_key))
    p.other, _ = _make_ca("adversarial unrelated CA")
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
        ca = b"# the adversarial root\n\n" + ca + b"\n# end\n"
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
