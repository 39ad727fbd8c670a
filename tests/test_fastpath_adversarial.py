"""Adversarial tests for the answer fast path (codec.answer / decode / header), the pool's
connection-as-parser (a unary connection's body pieces go straight into a reused list),
the lazily made retry plan, and Deadlines' remembered timer time.

The codec parts compare the direct parses with the JSON path (``convert(decode(body))``)
on bodies built to sit at the edge of the regular expressions; the pool parts run against
the suite's etcd, through proxies that split etcd's bytes, and against scripted gateways.
"""

from __future__ import annotations

import base64
import collections
import copy
import json
import pickle
import socket
import subprocess
import sys
import threading
import weakref
from pathlib import Path
from urllib.parse import urlsplit

import attrs
import pytest
import pytest_twisted
from helpers import Scripted, dead_url, http_answer, sleep, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task
from twisted.protocols import portforward

from coord import Client, KeySet, errors
from coord._failover import Plan
from coord._twisted.pool import (
    Deadlines,
    HttpTransport,
    _Call,
    _Connection,
    parse_endpoint,
)
from coord._wire import codec
from coord._wire.http11 import ProtocolError, ResponseParser
from coord.lease import Lease
from coord.types import Header, KeyValue

# ============================================================================================
# codec.answer == convert(decode(body)), value or exception type
# ============================================================================================

CONVERTERS = [codec.range_response, codec.put_response, codec.delete_response,
              codec.txn_response, None]


def outcome(fn, *args):
    try:
        return ("value", fn(*args))
    except Exception as e:  # the exception's type is what must agree
        return ("raises", type(e))


def reference(body, convert):
    def run():
        obj = codec.decode(body)
        return codec.unary(obj) if convert is None else convert(obj)

    return outcome(run)


def assert_same(body, convert):
    expected = reference(body, convert)
    got = outcome(codec.answer, body, convert)
    assert got == expected, (body[:300], convert)
    if got[0] == "value" and convert is codec.range_response:
        r = got[1]
        assert type(r.count) is int and type(r.more) is bool
        for kv in r.kvs:
            assert type(kv.key) is bytes and type(kv.value) is bytes
            assert all(type(x) is int for x in (kv.create_revision, kv.mod_revision,
                                                kv.version, kv.lease))
        assert all(type(x) is int for x in (r.header.cluster_id, r.header.member_id,
                                            r.header.revision, r.header.raft_term))
    return got


def fast_hit(body):
    return bool(codec._HEADER_ONLY.fullmatch(body) or codec._ONE_KV.fullmatch(body))


HDR = b'{"header":{"cluster_id":"11","member_id":"22","revision":"%s","raft_term":"3"}'


def hdr(rev=b"5"):
    return HDR % rev


def one_kv(kv_fields, tail=b"", rev=b"5"):
    return hdr(rev) + b',"kvs":[{' + kv_fields + b"}]" + tail + b"}"


# (body, whether the direct parse takes it: a table row that never reaches the direct
# parse would only compare the JSON path with itself)
EDGE_BODIES = [
    (hdr() + b"}", True),
    (hdr(b"007") + b"}", True),  # leading zeros
    (hdr(b"0") + b"}", True),
    (hdr(b"00000000000000000000000000000000000000042") + b"}", True),
    (hdr(b"18446744073709551616123456789") + b"}", True),  # beyond int64
    (hdr(b"9" * 4301) + b"}", True),  # beyond int()'s digit limit: ValueError both ways
    (hdr(b"0" * 4400 + b"1") + b"}", True),
    (hdr("١٢٣".encode()) + b"}", False),  # unicode digits: int() takes them, \d does not
    (hdr(b"-3") + b"}", False),
    (hdr(b"+3") + b"}", False),
    (hdr(b"1_000") + b"}", False),
    (hdr(b" 7") + b"}", False),
    (hdr(b"") + b"}", False),
    (hdr() + b"}\n", False),  # etcd's stream framing
    (hdr() + b"} \t\r\n", False),
    (b" " + hdr() + b"}", False),
    (hdr() + b"}x", False),
    (hdr() + b"}}", False),
    (hdr() + b"}\xff", False),  # not UTF-8
    (hdr() + b',"count":"0"}', True),  # not etcd's (it omits a zero), same value
    (hdr() + b',"count":"2"}', True),  # count_only answer
    (hdr() + b',"more":true,"count":"2"}', True),
    (hdr() + b',"kvs":[]}', False),
    (one_kv(b'"key":"Zm9v"'), True),  # keys_only, nothing else
    (one_kv(b'"key":"Zm9v","value":""'), True),  # empty value field
    (one_kv(b'"key":"Zm9v","value":"=="'), True),
    (one_kv(b'"key":"Zm9v","value":"="'), True),
    (one_kv(b'"key":"Zg=="'), True),
    (one_kv(b'"key":"Zg="'), True),  # bad padding: binascii.Error both ways
    (one_kv(b'"key":"Zg"'), True),  # no padding
    (one_kv(b'"key":"Z"'), True),
    (one_kv(b'"key":"Zg==Zg=="'), False),  # padding in the middle
    (one_kv(b'"key":"Z===" '), False),
    (one_kv(b'"key":"=="'), False),
    (one_kv(b'"key":""'), False),  # empty key
    (one_kv(b'"key":"Zm9v","value":"Y=Fy"'), False),
    (one_kv(b'"key":"Zm9v","value":"YmFy"'), True),
    (one_kv(b'"key":"Zm9v","value":"YmFy","lease":"7587858"'), True),  # lease field
    (one_kv(b'"key":"Zm9v","lease":"1"'), True),
    (one_kv(b'"key":"Zm9v","value":"YmFy"', b',"more":true'), True),  # more, no count
    (one_kv(b'"key":"Zm9v","value":"YmFy"', b',"more":false'), False),
    (one_kv(b'"key":"Zm9v","value":"YmFy"', b',"more":true,"count":"3"'), True),
    (one_kv(b'"key":"Zm9v","value":"YmFy"', b',"count":"1","more":true'), False),
    (one_kv(b'"key":"Zm9v","value":"YmFy"', b',"count":"007"'), True),
    (one_kv(b'"key":"Zm9v","value":"YmFy"', b',"count":"1","count":"2"'), False),  # dup
    (one_kv(b'"key":"Zm9v","key":"YmFy"'), False),  # duplicate field: JSON keeps the last
    (one_kv(b'"key":"Zm9v","create_revision":"2","create_revision":"3"'), False),
    (one_kv(b'"key":"Zm9v","create_revision":"2","mod_revision":"3","version":"1",'
            b'"value":"YmFy","lease":"9"', b',"count":"1"'), True),
    (one_kv(b'"key":"Zm9v","create_revision":"007","mod_revision":"0","version":"00"'),
     True),
    (one_kv(b'"key":"Zm9v","mod_revision":"3","create_revision":"2"'), False),  # order
    (one_kv(b'"key":"Zm9v","create_revision":2'), False),  # a JSON number
    (one_kv(b'"key":"Zm9v","create_revision":"2\\u0030"'), False),  # an escape
    (one_kv(b'"key":"Zm9v\\/"'), False),
    (one_kv(b'"key":"Zm9v","value":null'), False),
    (one_kv(b'"key":"Zm9v"', b',"count":null'), False),
    (hdr() + b',"kvs":[{"key":"Zm9v"},{"key":"YmFy"}],"count":"2"}', False),
    (hdr() + b',"kvs":[{"key":"Zm9v"}],"kvs":[]}', False),
    (hdr() + b',"prev_kv":{"key":"Zm9v","value":"YmFy"}}', False),  # put, return_previous
    (b'{"header":{"cluster_id":"1","member_id":"2","revision":"3","raft_term":"4",'
     b'"extra":"5"}}', False),
    (b'{"header":{"cluster_id":"1","member_id":"2","revision":"3"}}', False),  # one missing
    (b'{"header":{}}', False),
    (b'{"header":null}', False),
    (b'{"header":[1]}', False),
    (b'{"header":"x"}', False),
    (b"{}", False),
    (b"null", False),
    (b"[]", False),
    (b"", False),
    (b"   ", False),
    (b"<html>", False),
    (b"\xef\xbb\xbf{}", False),  # a UTF-8 byte order mark
    (b"[" * 3000 + b"]" * 3000, False),  # deeper than the recursion limit
]


@pytest.mark.parametrize(("body", "fast"), EDGE_BODIES)
def test_answer_equals_json_path_on_edge_bodies(body, fast):
    assert fast_hit(body) is fast
    for convert in CONVERTERS:
        assert_same(body, convert)


def test_answer_big_value_and_real_shapes():
    value = bytes(range(256)) * 400
    body = one_kv(b'"key":"%s","create_revision":"2","mod_revision":"9","version":"4",'
                  b'"value":"%s"' % (base64.b64encode(b"k" * 300), base64.b64encode(value)),
                  b',"count":"1"')
    assert fast_hit(body)
    got = assert_same(body, codec.range_response)
    assert got[1].kvs[0].value == value and got[1].kvs[0].key == b"k" * 300


# A grammar around the two shapes: every field can be missing, mis-typed, escaped, out of
# order, duplicated; numbers and base64 take their odd forms.
nums = st.one_of(
    st.integers(min_value=0, max_value=2**70).map(str),
    st.sampled_from(["0", "00", "007", "-1", "+1", "1_0", "١٢", " 1", "", "1e3", "1.0",
                     "9" * 4301]),
)
b64s = st.one_of(
    st.binary(max_size=20).map(lambda b: base64.b64encode(b).decode()),
    st.binary(min_size=1, max_size=20).map(lambda b: base64.b64encode(b).decode().rstrip("=")),
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=",
            max_size=10),
    st.sampled_from(["", "=", "==", "Zg=", "Zg==Zg==", "Z", "\\u005a\\u0067\\u003d\\u003d"]),
)


def jstr(s):
    return '"' + s + '"'


@st.composite
def near_etcd_bodies(draw):
    def num_field(name):
        how = draw(st.sampled_from(["str", "str", "str", "num", "null", "escaped"]))
        n = draw(nums)
        if how == "num":
            return f'"{name}":{n if n.isdigit() else "1"}'
        if how == "null":
            return f'"{name}":null'
        if how == "escaped" and n:
            return f'"{name}":"\\u00{ord(n[0]):02x}{n[1:]}"'
        return f'"{name}":{jstr(n)}'

    def maybe(items):
        kept = [x for x in items if draw(st.booleans()) or x.startswith('"key"')]
        if draw(st.integers(0, 9)) == 0 and kept:
            kept.append(draw(st.sampled_from(kept)))  # a duplicate field
        if draw(st.integers(0, 9)) == 0:
            kept = draw(st.permutations(kept))
        return ",".join(kept)

    head_fields = [num_field(n) for n in ("cluster_id", "member_id", "revision", "raft_term")]
    if draw(st.integers(0, 5)) == 0:
        head = maybe(head_fields)
    else:
        head = ",".join(head_fields)
    parts = ['"header":{' + head + "}"]
    shape = draw(st.sampled_from(["header", "one", "one", "one", "two", "prev"]))
    kv = maybe([f'"key":{jstr(draw(b64s))}', num_field("create_revision"),
                num_field("mod_revision"), num_field("version"),
                f'"value":{jstr(draw(b64s))}', num_field("lease")])
    if shape == "one":
        parts.append('"kvs":[{' + kv + "}]")
    elif shape == "two":
        parts.append('"kvs":[{' + kv + '},{"key":"Zm9v"}]')
    elif shape == "prev":
        parts.append('"prev_kv":{' + kv + "}")
    if draw(st.booleans()):
        parts.append('"more":' + draw(st.sampled_from(["true", "true", "false", '"true"'])))
    if draw(st.booleans()):
        parts.append(num_field("count"))
    body = "{" + ",".join(parts) + "}"
    body = draw(st.sampled_from(["", "", "", " ", "\n"])) + body
    body += draw(st.sampled_from(["", "", "", "\n", " \r\n", "x", "\x0c", "\u00a0"]))
    return body.encode()


@given(near_etcd_bodies())
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_answer_equals_json_path_on_near_etcd_bodies(body):
    for convert in (codec.range_response, codec.put_response):
        assert_same(body, convert)


@given(st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_answer_equals_json_path_on_any_bytes(body):
    for convert in CONVERTERS:
        assert_same(body, convert)


# ============================================================================================
# decode: the scanner called directly
# ============================================================================================


@pytest.mark.parametrize(
    "body",
    [b"{}", b" {}", b"\n{}\n", b"\t\r\n {}", b"{} ", b'{"a":1}\n', b"[1, 2]", b"1", b'"s"',
     b"null", b"true", b"NaN", b"-Infinity", b'{"a":"\\u00e9"}', '{"a":"é"}'.encode(),
     b'{"a":1,"a":2}', b"1 ", b" 1 "],
)
def test_decode_takes_json_like_json_loads(body):
    assert json.dumps(codec.decode(body)) == json.dumps(json.loads(body))


@pytest.mark.parametrize(
    "body",
    [b"", b" ", b"\n", b"{", b"{}x", b"{} x", b" {} x", b"{}{}", b"1 2", b"\xff", b"{}\xff",
     b"\xef\xbb\xbf{}", b"<html>", b"{'a': 1}", b"{}\x00", b'{"a":"\x01"}', b"nul",
     b"[1,]", b" \x0c{}"],
)
def test_decode_refuses_what_is_not_json(body):
    with pytest.raises(errors.MalformedAnswer):
        codec.decode(body)


@pytest.mark.parametrize("tail", ["\x0b", "\x0c", "\x1c", "\u00a0", "\u2028"])
def test_decode_refuses_non_json_whitespace_after_the_value(tail):
    with pytest.raises(errors.MalformedAnswer):
        codec.decode(("{}" + tail).encode())


def test_decode_refuses_nesting_too_deep_to_parse():
    # A RecursionError from the parser is a body coord cannot take: the same typed error.
    with pytest.raises(errors.MalformedAnswer):
        codec.decode(b"[" * 100000 + b"]" * 100000)


# ============================================================================================
# header(): subscript fast path == the get() path
# ============================================================================================


def header_by_get(obj):
    if not obj:
        return Header()
    g = obj.get
    return Header(int(g("cluster_id", 0)), int(g("member_id", 0)), int(g("revision", 0)),
                  int(g("raft_term", 0)))


@given(st.dictionaries(
    st.sampled_from(["cluster_id", "member_id", "revision", "raft_term", "other"]),
    st.one_of(st.integers(0, 2**64).map(str), st.integers(0, 9), st.just(None),
              st.sampled_from(["x", "007", ""]))))
@settings(max_examples=500, deadline=None)
def test_header_fast_path_equals_get_path(obj):
    assert outcome(codec.header, obj) == outcome(header_by_get, obj)


# ============================================================================================
# _Connection as its own parser: body pieces in a reused list (sans I/O)
# ============================================================================================


class _StubReader:
    def remove(self, conn):
        pass


class _StubTransport:
    def __init__(self):
        self.reader = _StubReader()
        self.answers = []

    def call_answered(self, call, status, body):
        self.answers.append((call, status, body))


class _StubPool:
    def __init__(self, tls=False):
        self.transport = _StubTransport()
        self.endpoint = parse_endpoint("https://127.0.0.1:1" if tls else "http://127.0.0.1:1")
        self.ready = 0
        self.gone = 0
        self.queue = []

    def connection_ready(self, conn):
        self.ready += 1
        if self.queue:
            conn.call = self.queue.pop(0)  # as the real pool sends a waiting call

    def connection_gone(self, conn):
        self.gone += 1


class _FakeCall:
    conn = None


def range_body(key, value, rev=5):
    return one_kv(b'"key":"%s","create_revision":"2","mod_revision":"%d","version":"1",'
                  b'"value":"%s"' % (base64.b64encode(key), rev, base64.b64encode(value)),
                  b',"count":"1"', rev=b"%d" % rev)


ANSWERS = [
    (200, range_body(b"big", b"B" * 5000), 7, True),
    (200, range_body(b"s", b"x"), None, False),
    (200, hdr() + b"}", 1, False),
    (400, b'{"error":"etcdserver: mvcc: required revision is a future revision",'
          b'"code":11,"message":"etcdserver: mvcc: required revision is a future revision"}',
     3, False),
    (200, b"", None, False),  # an empty body
    (200, b"", 5, True),
    (200, range_body(b"k", b""), None, True),
    (503, b"not json", 2, False),
    (200, range_body(b"last", b"L"), 1, False),
]


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 64, 100000])
def test_connection_consecutive_answers_never_bleed(piece):
    pool = _StubPool()
    conn = _Connection(pool)
    chunks = conn._chunks
    assert conn.on_body.__self__ is chunks  # the bound list.append itself
    stream = b"".join(http_answer(s, b, c, i) for s, b, c, i in ANSWERS)
    calls = [_FakeCall() for _ in ANSWERS]
    conn.call = calls[0]
    pool.queue = calls[1:]
    for i in range(0, len(stream), piece):
        conn.dataReceived(stream[i:i + piece])
    assert [(c, s, b) for c, s, b in pool.transport.answers] == \
        [(c, s, b) for c, (s, b, _, _) in zip(calls, ANSWERS, strict=True)]
    assert conn._chunks is chunks and chunks == []  # cleared, not replaced
    assert pool.ready == len(ANSWERS) and pool.gone == 0 and not conn.closed


def test_connection_answer_without_a_call_does_not_leak_into_the_next():
    pool = _StubPool()
    conn = _Connection(pool)
    conn.dataReceived(http_answer(200, b'{"stray":1}', 3))  # nobody asked
    conn.call = call = _FakeCall()
    conn.dataReceived(http_answer(200, b"{}"))
    assert pool.transport.answers == [(call, 200, b"{}")]


def test_connection_close_answer_aborts_after_handing_the_body():
    pool = _StubPool()
    conn = _Connection(pool)
    conn.call = call = _FakeCall()
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")
    assert pool.transport.answers == [(call, 200, b"{}")]
    assert conn.closed and pool.ready == 0 and pool.gone == 1


class _StubStream:
    def __init__(self):
        self.events = []

    def head(self, status):
        self.events.append(("head", status))

    def data(self, data):
        self.events.append(("data", data))

    def ended(self, exc):
        self.events.append(("ended", exc))


def test_stream_connection_hands_pieces_to_its_stream():
    pool = _StubPool()
    stream = _StubStream()
    conn = _Connection(pool, stream)
    assert conn.on_body.__func__ is _Connection.on_body
    lines = b'{"result":{"a":1}}\n{"result":{"b":2}}\n'
    raw = http_answer(200, lines, 5, interim=True)
    for i in range(len(raw)):
        conn.dataReceived(raw[i:i + 1])
    assert stream.events[0] == ("head", 200)
    assert b"".join(d for k, d in stream.events if k == "data") == lines
    assert stream.events[-1] == ("ended", None)
    assert conn._chunks == [] and pool.transport.answers == []


# ============================================================================================
# scripted gateways and a proxy that splits etcd's bytes
# ============================================================================================



class _SplitClient(portforward.ProxyClient):
    """etcd -> client bytes in pieces of ``factory.piece`` bytes, one piece per turn."""

    def connectionMade(self):
        self.queue = collections.deque()
        self.pumping = False
        super().connectionMade()

    def dataReceived(self, data):
        n = self.peer.factory.piece
        self.queue.extend(data[i:i + n] for i in range(0, len(data), n))
        if not self.pumping:
            self.pumping = True
            reactor.callLater(0, self.pump)

    def pump(self):
        if not self.queue or self.peer is None:
            self.pumping = False
            return
        self.peer.transport.write(self.queue.popleft())
        self.peer.factory.pieces += 1
        reactor.callLater(0, self.pump)


class _SplitClientFactory(portforward.ProxyClientFactory):
    protocol = _SplitClient
    noisy = False


class _SplitServer(portforward.ProxyServer):
    clientProtocolFactory = _SplitClientFactory

    def connectionMade(self):
        self.factory.accepted += 1
        super().connectionMade()


class SplitProxy(portforward.ProxyFactory):
    protocol = _SplitServer
    noisy = False

    def __init__(self, host, port, piece):
        super().__init__(host, port)
        self.piece = piece
        self.pieces = 0
        self.accepted = 0


@pytest.fixture
def split_proxy(etcd, listen):
    def start(piece):
        parts = urlsplit(etcd.url)
        factory = SplitProxy(parts.hostname, parts.port, piece)
        return listen(factory), factory

    return start


NO_LEADER = json.dumps({"error": "etcdserver: no leader", "message": "etcdserver: no leader",
                        "code": 14}).encode()


def transport_for(*urls, **kwargs):
    return HttpTransport(reactor, [parse_endpoint(u) for u in urls], **kwargs)


async def closing(thing):
    await thing.close()


# ============================================================================================
# consecutive answers on one kept-alive connection, against etcd
# ============================================================================================


async def mixed_sequence(client):
    big = bytes(range(256)) * 64
    await client.set(b"t/big", big)
    await client.set(b"t/small", b"s")
    await client.set(b"t/empty", b"")
    everything = KeySet(b"t/", prefix=True)
    for _ in range(2):
        r = await client.get(b"t/big")
        assert [(kv.key, kv.value) for kv in r.kvs] == [(b"t/big", big)] and r.count == 1
        r = await client.get(b"t/small")
        assert [(kv.key, kv.value) for kv in r.kvs] == [(b"t/small", b"s")]
        r = await client.get(b"t/missing")
        assert r.kvs == [] and r.count == 0 and r.more is False
        r = await client.get(b"t/empty")
        assert [(kv.key, kv.value) for kv in r.kvs] == [(b"t/empty", b"")]
        with pytest.raises(errors.EtcdError):
            await client.get(b"t/small", revision=10**9)  # an error answer in between
        r = await client.get(everything, keys_only=True)
        assert [kv.key for kv in r.kvs] == [b"t/big", b"t/empty", b"t/small"]
        assert all(kv.value == b"" for kv in r.kvs)
        r = await client.get(everything, count_only=True)
        assert r.kvs == [] and r.count == 3
        r = await client.get(everything, limit=1)
        assert [kv.key for kv in r.kvs] == [b"t/big"] and r.more is True and r.count == 3
        r = await client.get(b"t/small")
        assert r.kvs[0].value == b"s"
    rev = await client.set(b"t/small", b"t")
    r = await client.get(b"t/small")
    assert r.kvs[0].value == b"t" and r.kvs[0].mod_revision == rev.revision
    assert r.header.revision == rev.revision and r.kvs[0].version == 2


@pytest_twisted.ensureDeferred
async def test_consecutive_answers_do_not_bleed(etcd, new_client):
    client = new_client(etcd.url)
    await mixed_sequence(client)


@pytest_twisted.ensureDeferred
async def test_consecutive_answers_on_one_pooled_connection(etcd):
    client = Client(reactor, etcd.url, max_connections=1, timeout=10)
    try:
        await client.get(b"warm")
        pool = client._transport._pools[0]
        (conn,) = pool.all
        chunks = conn._chunks
        await mixed_sequence(client)
        assert pool.all == {conn} and conn._chunks is chunks and chunks == []
    finally:
        await client.close()


@pytest.mark.parametrize("piece", [1, 3, 1000])
@pytest_twisted.ensureDeferred
async def test_answers_split_in_many_pieces(split_proxy, piece):
    url, proxy = split_proxy(piece)
    client = Client(reactor, url, max_connections=1, timeout=20)
    try:
        big = b"v" * (3000 if piece < 10 else 60000)
        await client.set(b"big", big)
        await client.set(b"small", b"s")
        for _ in range(2):
            assert (await client.get(b"big")).kvs[0].value == big
            assert (await client.get(b"small")).kvs[0].value == b"s"
            assert (await client.get(b"none")).kvs == []
        assert proxy.accepted == 1  # all on one kept-alive connection
        assert proxy.pieces > 7
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_concurrent_answers_reach_their_own_calls(etcd):
    client = Client(reactor, etcd.url, max_connections=3, timeout=10)
    try:
        values = {b"k%03d" % i: b"%d" % i * (1 + (i * 37) % 500) for i in range(60)}
        await defer.gatherResults([client.set(k, v) for k, v in values.items()])
        keys = list(values) * 3
        results = await defer.gatherResults([client.get(k) for k in keys])
        for k, r in zip(keys, results, strict=True):
            assert [(kv.key, kv.value) for kv in r.kvs] == [(k, values[k])]
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_watch_through_a_splitting_proxy(split_proxy, etcd):
    url, _ = split_proxy(2)
    watching = Client(reactor, url, timeout=10)
    writer = Client(reactor, etcd.url, timeout=10)
    seen = []
    try:
        d = watching.watch(KeySet(b"w/", prefix=True), seen.append)
        await d.watcher.ready
        await writer.set(b"w/a", b"1" * 500)
        await writer.set(b"w/b", b"2")
        await writer.delete(b"w/a")
        await wait_until(lambda: len(seen) == 3)
        assert [(e.kv.key, e.kv.value) for e in seen] == \
            [(b"w/a", b"1" * 500), (b"w/b", b"2"), (b"w/a", b"")]
        d.cancel()
        await d
    finally:
        await watching.close()
        await writer.close()


# ============================================================================================
# HTTP oddities from a scripted gateway
# ============================================================================================


@pytest_twisted.ensureDeferred
async def test_chunked_interim_and_plain_answers_on_one_connection(listen):
    a = range_body(b"a", b"A" * 100)
    b = range_body(b"b", b"B")
    gw = Scripted([http_answer(200, a, 1, interim=True), http_answer(200, b),
                   http_answer(200, hdr() + b"}", 2), http_answer(200, b'{"header":{}}')])
    t = transport_for(listen(gw), max_connections=1)
    try:
        ra = await t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        rb = await t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        rc = await t.request("/v3/kv/put", b"{}", True, 5, codec.put_response)
        rd = await t.request("/v3/kv/range", b"{}", False, 5)
        assert ra == codec.range_response(json.loads(a))
        assert rb == codec.range_response(json.loads(b))
        assert rc.revision == 5 and rc.previous is None
        assert rd == {"header": {}}
        assert gw.connections == 1
    finally:
        await t.close()


@pytest_twisted.ensureDeferred
async def test_undecodable_200_fails_only_its_own_call(listen):
    ok = range_body(b"k", b"v")
    gw = Scripted([http_answer(200, b"<html>"), http_answer(200, one_kv(b'"key":"Zg="')),
                   http_answer(200, ok)])
    t = transport_for(listen(gw), max_connections=1)
    try:
        with pytest.raises(errors.MalformedAnswer):
            await t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        with pytest.raises(ValueError):  # binascii.Error, as from the JSON path
            await t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        r = await t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        assert r.kvs[0].value == b"v"
        assert gw.connections == 1
    finally:
        await t.close()


@pytest_twisted.ensureDeferred
async def test_bad_http_read_goes_to_the_next_endpoint(listen, etcd):
    gw = Scripted([b"NOT HTTP AT ALL\r\n\r\n"])
    url = listen(gw)
    t = transport_for(url, etcd.url)
    try:
        r = await t.request("/v3/kv/range", b'{"key":"Zm9v"}', False, 5, codec.range_response)
        assert r.kvs == [] and r.header.revision > 0
        assert gw.requests == 1 and t.preferred.url == etcd.url
    finally:
        await t.close()
    t = transport_for(url, etcd.url)
    try:
        with pytest.raises(errors.OutcomeUnknown):  # a write that was sent: not re-sent
            await t.request("/v3/kv/put", b'{"key":"Zm9v"}', True, 5)
        assert gw.requests == 2
    finally:
        await t.close()


@pytest_twisted.ensureDeferred
async def test_deeply_nested_error_body_fails_the_call_promptly(listen):
    deep = b"[" * 5000 + b"]" * 5000
    gw = Scripted([http_answer(500, deep)])
    t = transport_for(listen(gw))
    try:
        with pytest.raises(errors.CoordError) as info:
            await t.request("/v3/kv/range", b"{}", False, 0.5)
        assert not isinstance(info.value, errors.Timeout)
    finally:
        await t.close()


# ============================================================================================
# failover with the lazily made plan
# ============================================================================================


@pytest.mark.parametrize("write", [False, True])
@pytest_twisted.ensureDeferred
async def test_plan_starts_where_the_first_attempt_went(write):
    urls = [dead_url(), dead_url(), dead_url()]
    t = transport_for(*urls)
    try:
        t._preferred = 1
        d = t.request("/v3/kv/range", b"{}", write, 5)
        # The preferred endpoint changes before the first attempt fails: the retries
        # still follow on from the endpoint the first attempt went to.
        t._preferred = 2
        with pytest.raises(errors.Unavailable) as info:
            await d
        assert not isinstance(info.value, errors.OutcomeUnknown)
        assert f"(tried {urls[1]}, {urls[2]}, {urls[0]})" in str(info.value)
    finally:
        await t.close()


@pytest_twisted.ensureDeferred
async def test_unreachable_first_endpoint_then_etcd(etcd):
    dead = dead_url()
    client = Client(reactor, [dead, etcd.url], timeout=5)
    try:
        call_plans = []
        real = client._transport._dispatch

        def spy(call, exc=None):
            call_plans.append(call.plan)
            real(call, exc)

        client._transport._dispatch = spy
        await client.set(b"k", b"v")  # never sent to the dead one: safe to move on
        assert call_plans == [None]  # the plan was made by the retry, not before
        assert (await client.get(b"k")).kvs[0].value == b"v"
        assert client._transport.preferred.url == etcd.url
        assert len(call_plans) == 1  # later calls go straight to etcd
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_sent_read_is_retried_sent_write_is_not(listen, etcd):
    closer = Scripted(["close"])
    curl = listen(closer)
    t = transport_for(curl, etcd.url)
    try:
        r = await t.request("/v3/kv/range", b'{"key":"Zm9v"}', False, 5, codec.range_response)
        assert r.kvs == [] and closer.requests == 1
        assert t.preferred.url == etcd.url
    finally:
        await t.close()
    t = transport_for(curl, etcd.url)
    try:
        body = codec.encode({"key": b"w", "value": b"1"})
        with pytest.raises(errors.OutcomeUnknown):
            await t.request("/v3/kv/put", body, True, 5, codec.put_response)
        assert closer.requests == 2  # not re-sent anywhere
        r = await t.request("/v3/kv/range", codec.encode({"key": b"w"}), False, 5,
                            codec.range_response)
        assert r.kvs == []
    finally:
        await t.close()


@pytest_twisted.ensureDeferred
async def test_reads_broken_after_sending_all_move_on_and_writes_do_not(listen, etcd):
    gw = Scripted(["hold"])
    closer = Scripted(["close"])
    t = transport_for(listen(gw), listen(closer), etcd.url)
    try:
        reads = [t.request("/v3/kv/range", codec.encode({"key": b"r%d" % i}), False, 5,
                           codec.range_response) for i in range(3)]
        write = t.request("/v3/kv/put", codec.encode({"key": b"w", "value": b"1"}), True, 5)
        await wait_until(lambda: len(gw.held) == 4)
        gw.drop_held()  # all four were sent; their connections break one after another
        for r in await defer.gatherResults(reads):
            assert r.kvs == [] and r.header.revision > 0
        with pytest.raises(errors.OutcomeUnknown):
            await write
        # Each read: endpoint 0 (sent, broken), then 1 (the closer, sent, broken), then 2.
        assert closer.requests == 3 and gw.requests == 4
        assert t.preferred.url == etcd.url
        r = await t.request("/v3/kv/range", codec.encode({"key": b"w"}), False, 5,
                            codec.range_response)
        assert r.kvs == []  # the write was not re-sent anywhere
    finally:
        await t.close()


INVALID_TOKEN = json.dumps({"error": "etcdserver: invalid auth token", "code": 16,
                            "message": "etcdserver: invalid auth token"}).encode()


@pytest_twisted.ensureDeferred
async def test_authentication_through_a_failover_and_a_token_refresh(listen):
    a, b = range_body(b"a", b"A"), range_body(b"b", b"B")
    gw = Scripted([http_answer(200, b'{"header":{},"token":"T1"}'), http_answer(200, a, 3),
                   http_answer(401, INVALID_TOKEN), http_answer(200, b'{"header":{},"token":"T2"}'),
                   http_answer(200, b)])
    t = transport_for(dead_url(), listen(gw), credentials=("u", "p"))
    try:
        # The authentication request fails over from the dead endpoint to the gateway.
        assert (await t.request("/v3/kv/range", b"{}", False, 5,
                                codec.range_response)).kvs[0].value == b"A"
        assert (await t.request("/v3/kv/range", b"{}", False, 5,
                                codec.range_response)).kvs[0].value == b"B"
        assert gw.requests == 5
        seen = b"".join(gw.seen)
        assert seen.count(b"/v3/auth/authenticate") == 2
        assert seen.count(b"Authorization: T1") == 2 and seen.count(b"Authorization: T2") == 1
    finally:
        await t.close()


@pytest_twisted.ensureDeferred
async def test_answered_calls_are_never_expired_later(etcd):
    t = transport_for(etcd.url)
    calls = []
    expired = []
    real_add = t._deadlines.add
    real_expire = t._deadlines._expire

    def add(call, timeout):
        calls.append(call)
        real_add(call, timeout)

    def expire(call, timeout):
        expired.append(call)
        real_expire(call, timeout)

    t._deadlines.add = add
    t._deadlines._expire = expire
    try:
        for timeout in (0.2, 0.1, 0.15):
            await t.request("/v3/kv/range", b'{"key":"Zm9v"}', False, timeout,
                            codec.range_response)
            await t.request("/v3/kv/put", b'{"key":"Zm9v"}', True, timeout,
                            codec.put_response)
        assert len(calls) == 6 and all(c.done for c in calls)
        await sleep(0.3)
        assert expired == []
        assert t._deadlines._timer is None and t._deadlines._fifos == {}
    finally:
        await t.close()


@pytest_twisted.ensureDeferred
async def test_single_endpoint_gets_exactly_one_extra_try(listen):
    closer = Scripted(["close"])
    url = listen(closer)
    t = transport_for(url)
    try:
        with pytest.raises(errors.Unavailable) as info:
            await t.request("/v3/kv/range", b"{}", False, 5)
        assert closer.requests == 2 and url in str(info.value)
    finally:
        await t.close()


@pytest_twisted.ensureDeferred
async def test_no_leader_moves_on_to_the_next_endpoint(listen, etcd, monkeypatch):
    monkeypatch.setattr(Plan, "UNAVAILABLE_PAUSES", (0.01,) * 3)
    gw = Scripted([http_answer(503, NO_LEADER)])
    t = transport_for(listen(gw), etcd.url)
    try:
        rev = await t.request("/v3/kv/put", codec.encode({"key": b"n", "value": b"1"}), True,
                              5, codec.put_response)
        assert gw.requests == 1 and t.preferred.url == etcd.url
        r = await t.request("/v3/kv/range", codec.encode({"key": b"n"}), False, 5,
                            codec.range_response)
        assert r.kvs[0].value == b"1" and r.kvs[0].mod_revision == rev.revision
    finally:
        await t.close()


@pytest_twisted.ensureDeferred
async def test_no_leader_then_answer_on_the_same_endpoint(listen, monkeypatch):
    monkeypatch.setattr(Plan, "UNAVAILABLE_PAUSES", (0.01,) * 3)
    ok = range_body(b"k", b"v")
    gw = Scripted([http_answer(503, NO_LEADER), http_answer(503, NO_LEADER, 3),
                   http_answer(200, ok, 4)])
    t = transport_for(listen(gw))
    try:
        r = await t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        assert r == codec.range_response(json.loads(ok))
        assert gw.requests == 3
    finally:
        await t.close()


@pytest_twisted.ensureDeferred
async def test_pinned_requests_never_move(listen, etcd):
    closer = Scripted(["close"])
    curl = listen(closer)
    dead = dead_url()
    t = transport_for(curl, etcd.url, dead)
    try:
        with pytest.raises(errors.Unavailable) as info:
            await t.request("/v3/maintenance/status", b"{}", False, 5, endpoint=0)
        assert closer.requests == 2 and etcd.url not in str(info.value)
        with pytest.raises(errors.Unavailable) as info:
            await t.request("/v3/maintenance/status", b"{}", False, 5, endpoint=2)
        assert dead in str(info.value) and etcd.url not in str(info.value)
        status = await t.request("/v3/maintenance/status", b"{}", False, 5,
                                 codec.status_response, endpoint=1)
        assert status.version
        r = await t.request("/v3/kv/range", b'{"key":"Zm9v"}', False, 5, codec.range_response)
        assert r.kvs == []
    finally:
        await t.close()


# ============================================================================================
# cancelling
# ============================================================================================


@pytest_twisted.ensureDeferred
async def test_cancel_in_flight_call_next_call_gets_its_own_answer(listen):
    a, b = range_body(b"a", b"A"), range_body(b"b", b"B")
    gw = Scripted(["hold", http_answer(200, b)])
    t = transport_for(listen(gw), max_connections=1)
    try:
        d1 = t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        d2 = t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        await wait_until(lambda: gw.held)
        d1.cancel()
        gw.release(http_answer(200, a))  # too late: that connection was dropped
        with pytest.raises(defer.CancelledError):
            await d1
        assert (await d2).kvs[0].value == b"B"
        assert gw.requests == 2 and gw.connections == 2
    finally:
        await t.close()


@pytest_twisted.ensureDeferred
async def test_cancel_queued_call_keeps_the_connection(listen):
    a, c = range_body(b"a", b"A"), range_body(b"c", b"C")
    gw = Scripted(["hold", http_answer(200, c)])
    t = transport_for(listen(gw), max_connections=1)
    try:
        d1 = t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        d2 = t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        d3 = t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        await wait_until(lambda: gw.held)
        d2.cancel()
        with pytest.raises(defer.CancelledError):
            await d2
        gw.release(http_answer(200, a, 2))
        assert (await d1).kvs[0].value == b"A"
        assert (await d3).kvs[0].value == b"C"
        assert gw.requests == 2 and gw.connections == 1
    finally:
        await t.close()


@pytest_twisted.ensureDeferred
async def test_cancel_in_the_callback_of_the_previous_answer(listen):
    a, b = range_body(b"a", b"A"), range_body(b"b", b"B")
    gw = Scripted([http_answer(200, a), http_answer(200, b)])
    t = transport_for(listen(gw), max_connections=1)
    try:
        await t.request("/v3/kv/range", b"{}", False, 5)  # a connection
        gw.script = [http_answer(200, a), http_answer(200, b)]
        d1 = t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        d2 = t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        # d2 goes out on the connection as d1's answer is handed over: cancel it then
        d1.addCallback(lambda r: (d2.cancel(), r)[1])
        assert (await d1).kvs[0].value == b"A"
        with pytest.raises(defer.CancelledError):
            await d2
        await sleep(0.05)  # d2's request (if it got there) is answered into the void
        gw.script = [http_answer(200, range_body(b"c", b"C"))]
        d3 = t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        assert (await d3).kvs[0].value == b"C"
    finally:
        await t.close()


# ============================================================================================
# Deadlines
# ============================================================================================

TIMEOUTS = [0.0, 0.0625, 0.125, 0.25, 0.5, 1.0, 2.0]  # exact in binary: no rounding


@given(st.lists(st.one_of(
    st.tuples(st.just("add"), st.sampled_from(TIMEOUTS)),
    st.tuples(st.just("advance"), st.sampled_from([0.0, 0.0625, 0.125, 0.375, 1.0])),
    st.tuples(st.just("answer"), st.integers(0, 100)),
), max_size=80))
@settings(max_examples=400, deadline=None)
def test_deadlines_expire_every_call_once_never_early_never_late(ops):
    clock = task.Clock()
    expired = []

    def expire(c, timeout):
        expired.append((c, timeout, clock.seconds()))
        c.fail(errors.Timeout("t"))

    deadlines = Deadlines(clock, expire)
    calls = []

    def check(moved):
        now = clock.seconds()
        live = [(c, dl) for c, dl, _ in calls if not c.done]
        if moved:
            assert not [c for c, dl in live if dl <= now]  # none overdue
        pending = clock.getDelayedCalls()
        assert len(pending) <= 1
        if live:
            assert deadlines._timer is not None and pending == [deadlines._timer]
            assert deadlines._timer.getTime() <= min(dl for _, dl in live)
        if deadlines._timer is not None:
            assert deadlines._timer_at == deadlines._timer.getTime()

    for op, arg in ops:
        if op == "add":
            c = _Call("/p", b"{}", False)
            c.deferred.addErrback(lambda f: None)
            deadlines.add(c, arg)
            calls.append((c, clock.seconds() + arg, arg))
        elif op == "advance":
            clock.advance(arg)
        elif calls:
            c = calls[arg % len(calls)][0]
            if not c.done:
                c.done = True  # answered (as call_answered does)
                c.deferred.callback(None)
        check(op == "advance")
    clock.advance(10.0)
    check(True)
    assert clock.getDelayedCalls() == []
    by_call = {id(c): (dl, t) for c, dl, t in calls}
    seen = [id(c) for c, _, _ in expired]
    assert len(seen) == len(set(seen))
    for c, timeout, at in expired:
        dl, t = by_call[id(c)]
        assert timeout == t and at >= dl


def test_deadlines_shorter_timeout_added_later():
    clock = task.Clock()
    out = []
    deadlines = Deadlines(clock, lambda c, t: (out.append((t, clock.seconds())),
                                               c.fail(Exception())))
    made = []

    def add(timeout):
        c = _Call("/p", b"{}", False)
        c.deferred.addErrback(lambda f: None)
        made.append(c)
        deadlines.add(c, timeout)
        return c

    add(2.0)  # due 2.0
    clock.advance(0.5)
    add(1.0)  # due 1.5: earlier, added later
    clock.advance(0.25)
    add(0.25)  # due 1.0: earlier still
    add(0.5)  # due 1.25
    assert len(clock.getDelayedCalls()) == 1
    assert deadlines._timer.getTime() == 1.0
    clock.advance(0.25)
    assert out == [(0.25, 1.0)]
    made[0].done = True  # the 2.0 one is answered
    add(0.125)  # at 1.0, due 1.125
    assert deadlines._timer.getTime() == 1.125
    for _ in range(4):
        clock.advance(0.125)
    assert out == [(0.25, 1.0), (0.125, 1.125), (0.5, 1.25), (1.0, 1.5)]
    clock.advance(1.0)
    assert len(out) == 4 and clock.getDelayedCalls() == []
    add(0.5)  # after everything: a fresh timer
    assert deadlines._timer.getTime() == clock.seconds() + 0.5
    clock.advance(0.5)
    assert len(out) == 5


@pytest_twisted.ensureDeferred
async def test_timeouts_fire_in_deadline_order_on_the_reactor(listen):
    gw = Scripted(["hold"])
    t = transport_for(listen(gw))
    order = []
    try:
        ds = []
        for timeout, write in ((0.7, False), (0.3, True), (0.5, False)):
            d = t.request("/v3/kv/range", b"{}", write, timeout)
            d.addErrback(lambda f, to=timeout: order.append((to, type(f.value))))
            ds.append(d)
        await wait_until(lambda: gw.requests == 3, timeout=2)
        await sleep(0.05)
        late = t.request("/v3/kv/range", b"{}", False, 0.1)  # shorter, added later
        late.addErrback(lambda f: order.append((0.1, type(f.value))))
        await defer.DeferredList([*ds, late])
        assert order == [(0.1, errors.Timeout), (0.3, errors.WriteTimeout),
                         (0.5, errors.Timeout), (0.7, errors.Timeout)]
    finally:
        await t.close()


# ============================================================================================
# a streaming endpoint's refusal inside HTTP 200 (the lease keep-alive)
# ============================================================================================

STREAM_NO_LEADER = json.dumps({"error": {"grpc_code": 14, "http_code": 503,
                                         "message": "etcdserver: no leader",
                                         "http_status": "Service Unavailable"}}).encode()
STREAM_DENIED = json.dumps({"error": {"grpc_code": 7, "http_code": 403,
                                      "message": "etcdserver: permission denied",
                                      "http_status": "Forbidden"}}).encode()
KEPT_ALIVE = (b'{"result":{"header":{"cluster_id":"1","member_id":"2","revision":"3",'
              b'"raft_term":"4"},"ID":"7","TTL":"30"}}')


@pytest_twisted.ensureDeferred
async def test_keepalive_refused_in_a_200_answer_is_retried_like_any_refusal(listen, new_client):
    # "no leader" is retried (after a pause) whatever the status line said.
    gw = Scripted([http_answer(200, STREAM_NO_LEADER), http_answer(200, KEPT_ALIVE)])
    client = new_client(listen(gw), timeout=5)
    assert await Lease(client, 7).refresh() == 30
    assert gw.requests == 2


@pytest_twisted.ensureDeferred
async def test_keepalive_denied_in_a_200_answer_is_its_error(listen, new_client):
    gw = Scripted([http_answer(200, STREAM_DENIED), http_answer(200, KEPT_ALIVE)])
    client = new_client(listen(gw), timeout=5)
    with pytest.raises(errors.PermissionDenied):
        await Lease(client, 7).refresh()
    assert gw.requests == 1  # not retried


# ############################################################################################
# REVIEW (heads=False, the merged _ONE_KV, values built through slot descriptors, the
# socket benchmark worker): adversarial tests added in review.
# ############################################################################################

# ============================================================================================
# review: the merged _ONE_KV against the JSON path
# ============================================================================================

BIG = b"9" * 4301  # beyond int()'s digit limit: ValueError

MERGED_EDGE_BODIES = [
    (hdr() + b',"more":true}', True),  # more, no kvs, no count
    (hdr() + b',"more":true,"more":true}', False),
    (hdr() + b',"count":"3","more":true}', False),  # order
    (hdr() + b',"count":2}', False),  # a JSON number
    (hdr() + b',"count":""}', False),
    (hdr() + b',"kvs":[{}]}', False),
    (hdr() + b',"kvs":null}', False),
    (hdr() + b',"kvs":[],"count":"2"}', False),
    (hdr() + b',"kvs":[{"key":"Zm9v"}],"kvs":[{"key":"YmFy"}]}', False),
    (hdr() + b',"kvs":[{"key":"Zm9v"}],"more":true,"count":"0"}', True),  # count < len(kvs)
    (hdr() + b',"count":"' + b"1" * 300 + b'"}', True),  # a big int, the same both ways
    (hdr() + b',"count":"' + BIG + b'"}', True),
    (hdr(BIG) + b',"count":"2"}', True),
    # Which error comes first: the key's base64 (binascii.Error), then count, then header.
    (one_kv(b'"key":"Zg="', b',"count":"' + BIG + b'"'), True),
    (one_kv(b'"key":"Zm9v","value":"Zg="', b',"count":"1"', rev=BIG), True),
    (one_kv(b'"key":"Zm9v","lease":"' + BIG + b'"', b',"count":"' + BIG + b'"', rev=BIG), True),
    (one_kv(b'"key":"Zg=","lease":"' + BIG + b'"'), True),
    (one_kv(b'"key":"Zm9v","value":"YmFy","value":"YmFy"'), False),
    (one_kv(b'"key":"Zm9v"', b',"more":true,"more":true'), False),
    (one_kv(b'"key":"Zm9v"', b',"more":false,"count":"1"'), False),
    (one_kv(b'"key":"Zm9v===="'), False),
    (one_kv(b'"key":"Zm9v","value":"YmFy==="'), False),
    (one_kv(b'"key":"+/+/","value":"////"'), True),
    (one_kv(b'"key":"Zm9v","mod_revision":"3"', b',"more":true'), True),
    (hdr()[:-1] + b',"extra":"1"},"count":"2"}', False),
    (hdr() + b',"count":"2"}\x00', False),
    (hdr() + b',"count":"2"}\n', False),
    (hdr() + b',"count":"2"}{}', False),
    (hdr() + b"}" + hdr() + b"}", False),
    (b"{" + hdr()[1:] + b"}", True),  # (the same body: a sanity check of the table)
]


@pytest.mark.parametrize(("body", "fast"), MERGED_EDGE_BODIES)
def test_review_merged_regex_equals_json_path(body, fast):
    assert fast_hit(body) is fast
    for convert in CONVERTERS:
        assert_same(body, convert)


# ============================================================================================
# review: values built without __init__ are the same objects in every way a user can tell
# ============================================================================================

U64 = st.integers(0, 2**64 - 1)
I64 = st.integers(0, 2**63 - 1)


def b64str(data):
    return base64.b64encode(data).decode()


@st.composite
def etcd_answers(draw):
    """A put's or a range's answer in etcd's own shape (the direct parse takes it)."""
    body: dict = {"header": {"cluster_id": str(draw(U64)), "member_id": str(draw(U64)),
                             "revision": str(draw(I64)), "raft_term": str(draw(I64))}}
    if draw(st.booleans()):
        return json.dumps(body, separators=(",", ":")).encode(), codec.put_response
    if draw(st.booleans()):
        kv = {"key": b64str(draw(st.binary(min_size=1, max_size=30)))}
        for name in ("create_revision", "mod_revision", "version", "value", "lease"):
            if name == "value":
                value = draw(st.binary(max_size=30))
                if value:
                    kv["value"] = b64str(value)
            else:
                n = draw(st.one_of(st.just(0), I64))
                if n:
                    kv[name] = str(n)
        body["kvs"] = [kv]
    if draw(st.booleans()):
        body["more"] = True
    count = draw(st.one_of(st.just(0), I64))
    if count:
        body["count"] = str(count)
    return json.dumps(body, separators=(",", ":")).encode(), codec.range_response


def assert_indistinguishable(got, expected):
    assert type(got) is type(expected)
    if isinstance(expected, list):
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            assert_indistinguishable(g, e)
        return
    if not attrs.has(type(expected)):
        assert got == expected
        return
    assert got == expected and expected == got and not got != expected
    assert repr(got) == repr(expected)
    assert attrs.asdict(got) == attrs.asdict(expected)
    assert attrs.astuple(got) == attrs.astuple(expected)
    assert outcome(hash, got) == outcome(hash, expected)  # (a Range holds a list: TypeError)
    assert not hasattr(got, "__dict__") and weakref.ref(got)() is got
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        assert pickle.dumps(got, proto) == pickle.dumps(expected, proto)
        again = pickle.loads(pickle.dumps(got, proto))
        assert type(again) is type(expected) and again == expected
    for other in (copy.copy(got), copy.deepcopy(got), attrs.evolve(got)):
        assert type(other) is type(expected) and other == expected
    for field in attrs.fields(type(expected)):
        value = getattr(got, field.name)  # every slot is set (an unset one raises)
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            setattr(got, field.name, value)
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            delattr(got, field.name)
        assert_indistinguishable(value, getattr(expected, field.name))
        changed = attrs.evolve(got, **{field.name: value})
        assert changed == expected and changed is not got


@given(etcd_answers())
@settings(max_examples=300, deadline=None)
def test_review_direct_values_are_indistinguishable_from_init_built_ones(answer):
    raw, convert = answer
    assert fast_hit(raw)
    assert_indistinguishable(codec.answer(raw, convert), convert(json.loads(raw)))


@pytest.mark.parametrize("raw", [
    hdr() + b"}",  # a missing key
    hdr() + b',"count":"2"}',  # count only
    one_kv(b'"key":"Zm9v","value":"YmFy"'),
])
def test_review_each_range_gets_its_own_kvs_list(raw):
    # The JSON path makes a new list per answer: a user may append to r.kvs, and a list
    # shared between answers would carry that into every later answer.
    a = codec.answer(raw, codec.range_response)
    b = codec.answer(raw, codec.range_response)
    assert a.kvs is not b.kvs
    a.kvs.append(KeyValue(b"junk"))
    clean = codec.range_response(json.loads(raw))
    assert b == clean and codec.answer(raw, codec.range_response) == clean


# ============================================================================================
# review: _setters must refuse every class whose construction does more than store fields
# ============================================================================================


@attrs.frozen
class _PreInit:
    a: int = 0

    def __attrs_pre_init__(self):
        pass


@attrs.frozen(init=False)
class _OwnInit:
    a: int = 0

    def __init__(self, a=0):
        self.__attrs_init__(abs(a))  # __init__ does more than store: a direct build differs


@attrs.frozen
class _OwnNew:
    a: int = 0

    def __new__(cls, *args, **kwargs):  # e.g. interning: object.__new__ would bypass it
        return super().__new__(cls)


@pytest.mark.parametrize("cls", [_PreInit, _OwnInit, _OwnNew])
def test_review_setters_refuse_classes_whose_construction_does_more(cls):
    with pytest.raises(TypeError, match="no longer plain"):
        codec._setters(cls, "a")


# ============================================================================================
# review: ResponseParser(heads=False) gives the same answers, without heads
# ============================================================================================


class _Recorder(ResponseParser):
    def __init__(self, heads):
        self.events = []
        super().__init__(heads)

    def on_head(self, status):
        self.events.append(("head", status))

    def on_body(self, body):
        if self.events and self.events[-1][0] == "body":
            self.events[-1] = ("body", self.events[-1][1] + body)
        else:
            self.events.append(("body", body))

    def on_complete(self):
        self.events.append(("complete", self.status, self.keep_alive))


ODD_STREAM = [  # (bytes, the events with heads)
    (b"HTTP/1.1 100 Continue\r\n\r\n"
     b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
     [("head", 200), ("body", b"{}"), ("complete", 200, True)]),
    (b"HTTP/1.1 204 No Content\r\n\r\n", [("head", 204), ("complete", 204, True)]),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n",  # no body, whatever it says
     [("head", 304), ("complete", 304, True)]),
    (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
     [("head", 404), ("complete", 404, True)]),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Service Unavailable\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n",
     [("head", 503), ("body", b"abcde"), ("complete", 503, True)]),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx",
     [("head", 200), ("body", b"x"), ("complete", 200, True)]),
    (b"HTTP/1.1 500 Internal\r\nConnection: close\r\nContent-Length: 1\r\n\r\n!",
     [("head", 500), ("body", b"!"), ("complete", 500, False)]),
]
ODD_BYTES = b"".join(raw for raw, _ in ODD_STREAM)
ODD_EVENTS = [e for _, events in ODD_STREAM for e in events]


def _splits(data):
    yield [data]
    yield [data[i:i + 1] for i in range(len(data))]
    yield [data[i:i + 7] for i in range(0, len(data), 7)]
    for at in range(1, len(data)):
        yield [data[:at], data[at:]]


@pytest.mark.parametrize("heads", [True, False])
def test_review_parser_odd_answers_back_to_back_at_every_split(heads):
    expected = ODD_EVENTS if heads else [e for e in ODD_EVENTS if e[0] != "head"]
    for pieces in _splits(ODD_BYTES):
        parser = _Recorder(heads)
        for piece in pieces:
            parser.feed(piece)
        assert parser.events == expected, pieces[0][-40:]


@pytest.mark.parametrize("heads", [True, False])
def test_review_parser_refuses_an_upgrade_and_garbage_after_an_answer(heads):
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    for bad in (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade"
                b"\r\n\r\n", b"NOT HTTP\r\n\r\n"):
        parser = _Recorder(heads)
        with pytest.raises(ProtocolError):
            parser.feed(ok + bad)
        assert parser.events[-2:] == [("body", b"{}"), ("complete", 200, True)]
        assert (("head", 200) in parser.events) is heads


# ============================================================================================
# review: a call's connection (heads=False) still hands each answer's own status over
# ============================================================================================


def test_review_call_connection_makes_no_head_call_a_stream_connection_does():
    pool = _StubPool()
    conn = _Connection(pool)
    heads = []
    conn.on_head = heads.append  # the hook _headers_complete would call
    conn.call = call = _FakeCall()
    conn.dataReceived(http_answer(404, b"{}", 1, interim=True))
    assert heads == [] and pool.transport.answers == [(call, 404, b"{}")]
    stream = _StubStream()
    sconn = _Connection(_StubPool(), stream)
    sconn.dataReceived(http_answer(503, b"{}", interim=True))
    assert stream.events[0] == ("head", 503) and stream.events[-1] == ("ended", None)


ODD_ANSWERS = [  # (bytes, status and body call_answered must get)
    (b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + http_answer(200, b'{"a":1}'),
     200, b'{"a":1}'),
    (b"HTTP/1.1 204 No Content\r\n\r\n", 204, b""),
    (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", 404, b""),
    (http_answer(503, NO_LEADER, 4, interim=True), 503, NO_LEADER),
    (http_answer(200, hdr() + b"}", 2), 200, hdr() + b"}"),
    (http_answer(429, b"{}"), 429, b"{}"),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 500 X\r\nConnection: close\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 500, b"{}"),
]


@pytest.mark.parametrize("piece", [1, 2, 5, 100000])
def test_review_call_connection_hands_each_answers_own_status(piece):
    pool = _StubPool()
    conn = _Connection(pool)
    calls = [_FakeCall() for _ in ODD_ANSWERS]
    conn.call = calls[0]
    pool.queue = calls[1:]
    stream = b"".join(raw for raw, _, _ in ODD_ANSWERS)
    for i in range(0, len(stream), piece):
        conn.dataReceived(stream[i:i + piece])
    assert pool.transport.answers == [(c, s, b) for c, (_, s, b)
                                      in zip(calls, ODD_ANSWERS, strict=True)]
    assert conn.closed and pool.gone == 1 and pool.ready == len(ODD_ANSWERS) - 1


@pytest_twisted.ensureDeferred
async def test_review_error_status_with_an_answer_shaped_body_fails_the_call(listen):
    # The body would parse as a fine answer: only the status tells it is not one.
    ok = range_body(b"k", b"v")
    gw = Scripted([http_answer(200, ok), http_answer(502, ok, 3, interim=True),
                   http_answer(500, hdr() + b"}", interim=True), http_answer(200, ok, 1)])
    t = transport_for(listen(gw), max_connections=1)
    try:
        r = await t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        assert r.kvs[0].value == b"v"
        with pytest.raises(errors.EtcdError, match="HTTP 502"):
            await t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        with pytest.raises(errors.CoordError, match="HTTP 500"):
            await t.request("/v3/kv/put", b"{}", True, 5, codec.put_response)
        r = await t.request("/v3/kv/range", b"{}", False, 5, codec.range_response)
        assert r == codec.range_response(json.loads(ok))
        assert gw.connections == 1 and gw.requests == 4
    finally:
        await t.close()


# ============================================================================================
# review: the socket reference worker of benchmarks/kv.py
# ============================================================================================

KV_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "kv.py"


def kv_worker(*argv, timeout=60):
    """Run ``kv.py *argv``: (exit code, its last stdout line as JSON, stderr)."""
    proc = subprocess.run([sys.executable, str(KV_SCRIPT), *argv], capture_output=True,
                          text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    return proc.returncode, json.loads(lines[-1]) if lines else None, proc.stderr


def test_review_socket_worker_reads_answers_etcd_sends_chunked(etcd):
    # Go's net/http sends an answer of more than about 2 kB chunked, without a
    # Content-Length: a get of a 3000-byte value is one.
    for op in ("put", "get"):
        rc, result, err = kv_worker("--value-size", "3000", "--worker", "socket", op, "1",
                                    etcd.url, "0.2")
        assert rc == 0 and result is not None and "error" not in result, (op, result, err)
        assert result["requests"] > 0


@pytest.mark.parametrize("partial", [
    b"HTTP/1.1 200 OK\r\nContent-Len",  # the head cut short
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",  # no body
    b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"header":',  # part of the body
])
def test_review_socket_worker_reports_a_connection_closed_mid_answer(partial):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def serve():
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(partial)  # then close

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        rc, result, err = kv_worker("--worker", "socket", "get", "1",
                                    f"http://127.0.0.1:{server.getsockname()[1]}", "0.2",
                                    timeout=30)
    finally:
        thread.join(5)
        server.close()
    # Not a measurement of 0 requests: the worker must say the connection was closed.
    assert rc == 1 and result is not None and "closed" in result.get("error", ""), \
        (result, err)
