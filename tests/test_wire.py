"""Sans-IO parts of the client: JSON codec, error mapping, HTTP/1.1 framing, line splitting,
and the JSON of transactions.

Every expectation is written out by hand (from etcd's rpc.proto / the gateway's actual
output) or computed with an independent tool (stdlib base64/json, httptools' request
parser), never by calling the function under test -- except for the answer fast path
(codec.answer, decode, header), whose direct parses are compared with the JSON path
(``convert(decode(body))``) on bodies built to sit at the edge of its regular expressions.
"""

from __future__ import annotations

import base64
import copy
import json
import pickle
import weakref

import attrs
import httptools
import pytest
from helpers import hdr, one_kv
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coord import KeySet, errors
from coord._wire import codec
from coord._wire.http11 import ProtocolError, ResponseParser, build_request, request_head
from coord._wire.stream import LineSplitter
from coord.lease import Lease
from coord.txn import (
    CompCreated,
    CompLease,
    CompModified,
    CompValue,
    CompVersion,
    OpDel,
    OpGet,
    OpSet,
    Transaction,
)
from coord.types import (
    Alarm,
    AlarmType,
    Deleted,
    Event,
    EventType,
    Header,
    KeyValue,
    Member,
    Range,
    Revision,
    Status,
    TransactionResult,
)

SETTINGS = settings(max_examples=200, deadline=None, database=None)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


# ============================================================================================
# codec: encode
# ============================================================================================


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, b"{}"),
        ({"key": b"foo"}, b'{"key":"Zm9v"}'),
        ({"key": b"foo", "range_end": b"\0"}, b'{"key":"Zm9v","range_end":"AA=="}'),
        ({"key": b"\xff"}, b'{"key":"/w=="}'),
        ({"key": b""}, b'{"key":""}'),
        ({"key": bytearray(b"ab")}, b'{"key":"YWI="}'),
        ({"key": memoryview(b"abc")}, b'{"key":"YWJj"}'),
        ({"ttl": 5, "ID": 0}, b'{"ttl":5,"ID":0}'),
        ({"prev_kv": True, "keys_only": False}, b'{"prev_kv":true,"keys_only":false}'),
        ({"compare": [{"key": b"k", "value": b"v"}]},
         b'{"compare":[{"key":"aw==","value":"dg=="}]}'),
        ({"name": "é"}, b'{"name":"\\u00e9"}'),  # str stays text, escaped to ASCII
        ({"big": 2**63 - 1}, b'{"big":9223372036854775807}'),
    ],
)
def test_encode_table(body, expected):
    out = codec.encode(body)
    assert out == expected
    assert type(out) is bytes


@pytest.mark.parametrize("bad", [{1, 2}, object(), 1j])
def test_encode_rejects_unknown_types(bad):
    with pytest.raises(TypeError):
        codec.encode({"x": bad})


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64),
                         st.text(max_size=10))
field_names = st.text(st.characters(codec="ascii", categories=["L", "N"]) | st.just("_"),
                      min_size=1, max_size=8)


@SETTINGS
@given(st.dictionaries(field_names, st.one_of(st.binary(max_size=40), json_scalars,
                                              st.lists(st.binary(max_size=10), max_size=3)),
                       max_size=6))
def test_encode_roundtrip(body):
    out = codec.encode(body)
    # Compact: exactly what json.dumps gives with bytes replaced by their base64 text.
    def expect(v):
        if isinstance(v, bytes):
            return base64.b64encode(v).decode()
        if isinstance(v, list):
            return [expect(x) for x in v]
        return v

    expected = {k: expect(v) for k, v in body.items()}
    assert out == json.dumps(expected, separators=(",", ":")).encode("ascii")
    back = codec.decode(out)
    assert back == expected
    for k, v in body.items():
        if isinstance(v, bytes):
            assert base64.b64decode(back[k], validate=True) == v
        elif isinstance(v, list):
            assert [base64.b64decode(x, validate=True) for x in back[k]] == v


# ============================================================================================
# codec: decode
# ============================================================================================


@pytest.mark.parametrize(
    "data",
    [b"", b" ", b"not json", b"{", b'{"a":1', b"<html>502 Bad Gateway</html>",
     b'{"a":1}{"b":2}', b'{"a":1}\n{"b":2}', b"\xff\xfe", b'{"a":"\xff"}', b"{'a': 1}"],
)
def test_decode_not_json(data):
    with pytest.raises(errors.MalformedAnswer) as info:
        codec.decode(data)
    assert "not JSON" in str(info.value)
    assert info.value.body == data[:200]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"{}", {}),
        (b'{"a":"1"}', {"a": "1"}),
        (b' {"a": [1, 2]} \n', {"a": [1, 2]}),
        (b'"x"', "x"),
        ('{"k":"é"}'.encode(), {"k": "é"}),
    ],
)
def test_decode_json(data, expected):
    assert codec.decode(data) == expected


# ============================================================================================
# codec: response decoders
# ============================================================================================

HDR_JSON = {"cluster_id": "324952591200643719", "member_id": "3319814642761637952",
            "revision": "2", "raft_term": "2"}
HDR = Header(324952591200643719, 3319814642761637952, 2, 2)
FOO_JSON = {"key": "Zm9v", "create_revision": "2", "mod_revision": "2", "version": "1",
            "value": "YmFy"}
FOO = KeyValue(b"foo", b"bar", 2, 2, 1, 0)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, Header()),
        ({}, Header()),
        (HDR_JSON, HDR),
        ({"revision": "3"}, Header(0, 0, 3, 0)),
        # uint64 IDs beyond int64, and plain JSON numbers, are both accepted.
        ({"cluster_id": "18446744073709551615", "member_id": 7, "revision": 9,
          "raft_term": "1"}, Header(18446744073709551615, 7, 9, 1)),
    ],
)
def test_header_table(raw, expected):
    assert codec.header(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (FOO_JSON, FOO),
        # Value omitted: the empty value (or keys_only).
        ({"key": "Zm9v", "create_revision": "5", "mod_revision": "6", "version": "2"},
         KeyValue(b"foo", b"", 5, 6, 2, 0)),
        ({"key": "Zm9v", "value": ""}, KeyValue(b"foo", b"", 0, 0, 0, 0)),
        # Only the key: a DELETE event's kv carries little more.
        ({"key": "Zm9v", "mod_revision": "9"}, KeyValue(b"foo", b"", 0, 9, 0, 0)),
        ({"key": b64(b"\xff\x00\xfe"), "value": b64(b"\x00" * 7), "lease": "7587862072907265348"},
         KeyValue(b"\xff\x00\xfe", b"\x00" * 7, 0, 0, 0, 7587862072907265348)),
        ({"key": "AA==", "create_revision": 3, "mod_revision": 4, "version": 1, "value": "YQ==",
          "lease": 0}, KeyValue(b"\0", b"a", 3, 4, 1, 0)),
    ],
)
def test_kv_table(raw, expected):
    got = codec.kv(raw)
    assert got == expected
    assert type(got.create_revision) is int and type(got.lease) is int


RANGE_REAL = (
    b'{"header":{"cluster_id":"324952591200643719","member_id":"3319814642761637952",'
    b'"revision":"2","raft_term":"2"},"kvs":[{"key":"Zm9v","create_revision":"2",'
    b'"mod_revision":"2","version":"1","value":"YmFy"}],"count":"1"}'
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (RANGE_REAL, Range([FOO], 1, False, HDR)),
        # Nothing found: no kvs, no count.
        (b'{"header":{"revision":"7"}}', Range([], 0, False, Header(0, 0, 7, 0))),
        # count_only: a count and no kvs.
        (b'{"header":{"revision":"7"},"count":"12"}', Range([], 12, False, Header(0, 0, 7, 0))),
        # A limit cut the answer short.
        (b'{"header":{"revision":"7"},"kvs":[{"key":"YQ=="},{"key":"Yg=="}],"more":true,'
         b'"count":"5"}',
         Range([KeyValue(b"a"), KeyValue(b"b")], 5, True, Header(0, 0, 7, 0))),
        (b'{"header":{},"kvs":[],"count":"0"}', Range([], 0, False, Header())),
        # Absent count is 0 even when kvs are present (the zero value, not len(kvs)).
        (b'{"header":{},"kvs":[{"key":"YQ=="}]}', Range([KeyValue(b"a")], 0, False, Header())),
        (b'{"header":{}}', Range()),
    ],
)
def test_range_response_table(raw, expected):
    got = codec.range_response(codec.decode(raw))
    assert got == expected
    assert isinstance(got.kvs, list)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"header":{"cluster_id":"1","member_id":"2","revision":"3","raft_term":"4"}}',
         Revision(3, None, Header(1, 2, 3, 4))),
        (b'{"header":{"revision":"3"},"prev_kv":' + json.dumps(FOO_JSON).encode() + b"}",
         Revision(3, FOO, Header(0, 0, 3, 0))),
        (b'{"header":{}}', Revision(0, None, Header())),
    ],
)
def test_put_response_table(raw, expected):
    assert codec.put_response(codec.decode(raw)) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"header":{"revision":"4"},"deleted":"2"}', Deleted(2, [], Header(0, 0, 4, 0))),
        (b'{"header":{"revision":"4"}}', Deleted(0, [], Header(0, 0, 4, 0))),
        (b'{"header":{"revision":"4"},"deleted":"1","prev_kvs":[' + json.dumps(FOO_JSON).encode()
         + b"]}", Deleted(1, [FOO], Header(0, 0, 4, 0))),
    ],
)
def test_delete_response_table(raw, expected):
    assert codec.delete_response(codec.decode(raw)) == expected


TXN_REAL = {
    "header": {**HDR_JSON, "revision": "3"},
    "succeeded": True,
    "responses": [
        {"response_range": {"header": {"revision": "2"}, "kvs": [FOO_JSON], "count": "1"}},
        {"response_put": {"header": {"revision": "3"}, "prev_kv": FOO_JSON}},
        {"response_delete_range": {"header": {"revision": "3"}}},
        {"response_txn": {"header": {}, "succeeded": True, "responses": [
            {"response_put": {"header": {"revision": "3"}}},
            {"response_txn": {"responses": [{"response_range": {"header": {"revision": "3"}}}]}},
        ]}},
    ],
}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (TXN_REAL, TransactionResult(True, [
            Range([FOO], 1, False, Header(0, 0, 2, 0)),
            Revision(3, FOO, Header(0, 0, 3, 0)),
            Deleted(0, [], Header(0, 0, 3, 0)),
            TransactionResult(True, [
                Revision(3, None, Header(0, 0, 3, 0)),
                TransactionResult(False, [Range([], 0, False, Header(0, 0, 3, 0))], Header()),
            ], Header()),
        ], Header(324952591200643719, 3319814642761637952, 3, 2))),
        # Failed, no operations in the failure branch: no "succeeded", no "responses".
        ({"header": {"revision": "9"}}, TransactionResult(False, [], Header(0, 0, 9, 0))),
        ({"header": {"revision": "9"}, "succeeded": False, "responses": []},
         TransactionResult(False, [], Header(0, 0, 9, 0))),
        ({"header": {}, "succeeded": True}, TransactionResult(True, [], Header())),
        # A sub-response whose fields are all zero values is an empty object (its header
        # is not checked: only the answer's).
        ({"header": {}, "responses": [{"response_put": {}}, {"response_delete_range": {}},
                                      {"response_range": {}}]},
         TransactionResult(False, [Revision(0), Deleted(), Range()], Header())),
    ],
)
def test_txn_response_table(raw, expected):
    got = codec.txn_response(raw)
    assert got == expected
    assert [type(r) for r in got.responses] == [type(r) for r in expected.responses]


STATUS_REAL = (
    b'{"header":{"cluster_id":"14841639068965178418","member_id":"10276657743932975437",'
    b'"revision":"1","raft_term":"2"},"version":"3.5.1","dbSize":"20480",'
    b'"leader":"10276657743932975437","raftIndex":"4","raftTerm":"2",'
    b'"raftAppliedIndex":"4","dbSizeInUse":"16384"}'
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (STATUS_REAL, Status(Header(14841639068965178418, 10276657743932975437, 1, 2), "3.5.1",
                             20480, 10276657743932975437, 4, 2, 4, 16384, [], False)),
        (b'{"header":{},"version":"3.4.27","dbSize":"1","leader":"5","raftIndex":"6",'
         b'"raftTerm":"7","raftAppliedIndex":"8","dbSizeInUse":"9",'
         b'"errors":["memberID:1 alarm:NOSPACE "],"isLearner":true}',
         Status(Header(), "3.4.27", 1, 5, 6, 7, 8, 9, ["memberID:1 alarm:NOSPACE "], True)),
        (b'{"header":{}}', Status(Header())),
    ],
)
def test_status_response_table(raw, expected):
    assert codec.status_response(codec.decode(raw)) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"ID": "10276657743932975437", "name": "default",
          "peerURLs": ["http://localhost:2380"], "clientURLs": ["http://localhost:2379"]},
         Member(10276657743932975437, "default", ["http://localhost:2380"],
                ["http://localhost:2379"], False)),
        # A learner / a member added but not started yet: no name, no client URLs.
        ({"ID": "3", "peerURLs": ["http://10.0.0.3:2380"], "isLearner": True},
         Member(3, "", ["http://10.0.0.3:2380"], [], True)),
        ({}, Member(0)),
    ],
)
def test_member_table(raw, expected):
    assert codec.member(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"header": HDR_JSON}, []),
        ({"header": HDR_JSON, "alarms": []}, []),
        ({"header": HDR_JSON, "alarms": [{"memberID": "3319814642761637952", "alarm": "NOSPACE"}]},
         [Alarm(3319814642761637952, AlarmType.NOSPACE)]),
        ({"alarms": [{"memberID": "1", "alarm": "CORRUPT"}, {"memberID": "2"}]},
         [Alarm(1, AlarmType.CORRUPT), Alarm(2, AlarmType.NONE)]),
    ],
)
def test_alarms_table(raw, expected):
    assert codec.alarms(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # A PUT event has no "type": PUT is the enum's zero value.
        ({"kv": FOO_JSON}, Event(EventType.PUT, FOO, None)),
        ({"type": "PUT", "kv": FOO_JSON}, Event(EventType.PUT, FOO, None)),
        ({"type": "DELETE", "kv": {"key": "Zm9v", "mod_revision": "3"}},
         Event(EventType.DELETE, KeyValue(b"foo", b"", 0, 3, 0, 0), None)),
        ({"type": "DELETE", "kv": {"key": "Zm9v", "mod_revision": "3"}, "prev_kv": FOO_JSON},
         Event(EventType.DELETE, KeyValue(b"foo", mod_revision=3), FOO)),
        ({"kv": {**FOO_JSON, "mod_revision": "4", "version": "2", "value": "YmF6"},
          "prev_kv": FOO_JSON},
         Event(EventType.PUT, KeyValue(b"foo", b"baz", 2, 4, 2, 0), FOO)),
    ],
)
def test_event_table(raw, expected):
    got = codec.event(raw)
    assert got == expected
    assert got.revision == expected.kv.mod_revision


# ============================================================================================
# errors.from_gateway
# ============================================================================================


def _err(message, code):
    return {"error": message, "code": code, "message": message}


@pytest.mark.parametrize(
    ("body", "status", "cls", "code", "message"),
    [
        (_err("etcdserver: mvcc: required revision has been compacted", 11), 400,
         errors.Compacted, 11, "etcdserver: mvcc: required revision has been compacted"),
        (_err("etcdserver: mvcc: required revision is a future revision", 11), 400,
         errors.FutureRevision, 11, "etcdserver: mvcc: required revision is a future revision"),
        (_err("etcdserver: requested lease not found", 5), 404,
         errors.LeaseNotFound, 5, "etcdserver: requested lease not found"),
        (_err("etcdserver: key is not provided", 3), 400,
         errors.InvalidArgument, 3, "etcdserver: key is not provided"),
        (_err("etcdserver: duplicate key given in txn request", 3), 400,
         errors.InvalidArgument, 3, "etcdserver: duplicate key given in txn request"),
        (_err("etcdserver: invalid auth token", 16), 401,
         errors.Unauthenticated, 16, "etcdserver: invalid auth token"),
        (_err("etcdserver: permission denied", 7), 403,
         errors.PermissionDenied, 7, "etcdserver: permission denied"),
        (_err("etcdserver: request is too large", 3), 400,
         errors.RequestTooLarge, 3, "etcdserver: request is too large"),
        (_err("etcdserver: too many operations in txn request", 3), 400,
         errors.TooManyOperations, 3, "etcdserver: too many operations in txn request"),
        (_err("etcdserver: no leader", 14), 503,
         errors.Unavailable, 14, "etcdserver: no leader"),
        (_err("etcdserver: request timed out", 14), 503,
         errors.Unavailable, 14, "etcdserver: request timed out"),
        (_err("some brand new failure", 14), 503,
         errors.Unavailable, 14, "some brand new failure"),
        (_err("etcdserver: mvcc: database space exceeded", 8), 429,
         errors.NoSpace, 8, "etcdserver: mvcc: database space exceeded"),
        (_err("etcdserver: authentication failed, invalid user ID or password", 3), 400,
         errors.AuthFailed, 3, "etcdserver: authentication failed, invalid user ID or password"),
        (_err("context deadline exceeded", 4), 504,
         errors.EtcdError, 4, "context deadline exceeded"),
        # Only "message" or only "error".
        ({"message": "etcdserver: permission denied", "code": 7}, 403,
         errors.PermissionDenied, 7, "etcdserver: permission denied"),
        ({"error": "etcdserver: no leader", "code": 14}, 503,
         errors.Unavailable, 14, "etcdserver: no leader"),
        # Errors inside a stream say "grpc_code" (grpc-gateway's StreamError).
        ({"grpc_code": 11, "http_code": 400,
          "message": "etcdserver: mvcc: required revision has been compacted",
          "http_status": "Bad Request"}, 200,
         errors.Compacted, 11, "etcdserver: mvcc: required revision has been compacted"),
        ({"grpc_code": 14, "http_code": 503, "message": "whatever", "http_status": "x"}, 200,
         errors.Unavailable, 14, "whatever"),
        ({"grpc_code": 16, "message": "etcdserver: invalid auth token"}, 200,
         errors.Unauthenticated, 16, "etcdserver: invalid auth token"),
    ],
)
def test_from_gateway_table(body, status, cls, code, message):
    exc = errors.from_gateway(body, status)
    assert isinstance(exc, cls), type(exc)
    assert isinstance(exc, errors.EtcdError)
    assert exc.code == code
    assert exc.message == message
    assert str(exc) == message


def test_from_gateway_exact_classes():
    assert type(errors.from_gateway(
        _err("etcdserver: mvcc: required revision has been compacted", 11), 400)) \
        is errors.Compacted
    assert errors.from_gateway(
        _err("etcdserver: mvcc: required revision has been compacted", 11)).compact_revision \
        is None
    # An InvalidArgument from etcd is also an EtcdError and a ValueError.
    exc = errors.from_gateway(_err("etcdserver: key is not provided", 3), 400)
    assert isinstance(exc, ValueError)
    # Not Unavailable: a compacted read is not worth retrying elsewhere.
    assert not isinstance(errors.from_gateway(_err("x", 11), 400), errors.Unavailable)
    # The message wins over the code: "no leader" with some other code is still Unavailable.
    assert isinstance(errors.from_gateway(_err("etcdserver: no leader", 2)), errors.Unavailable)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"<html><body>502 Bad Gateway</body></html>", 502),
        ("upstream connect error", 503),
        (None, 500),
        ([1, 2], 500),
        (42, 418),
        ({}, 404),
        ({"code": 14}, 503),
        ({"error": "", "message": "", "code": 2}, 500),
    ],
)
def test_from_gateway_not_an_error_body(body, status):
    exc = errors.from_gateway(body, status)
    assert isinstance(exc, errors.EtcdError)
    assert str(status) in exc.message
    assert str(status) in str(exc)


def test_from_gateway_non_error_body_keeps_code():
    exc = errors.from_gateway({"code": 14}, 503)
    assert isinstance(exc, errors.Unavailable)
    assert exc.code == 14
    assert errors.from_gateway(b"junk", 502).code == 2  # UNKNOWN


def test_from_gateway_non_int_code_is_unknown():
    exc = errors.from_gateway({"message": "boom", "code": "14"}, 500)
    assert exc.code == 2
    assert type(exc) is errors.EtcdError


# grpc-gateway v1 (etcd 3.4/3.5) answers a stream that fails before its first message with
# the error's HTTP status and the body {"error": {<StreamError>}}; the transports hand that
# whole body to from_gateway (pool._Stream.ended, treq).
STREAM_ERROR_BODY = {"error": {"grpc_code": 16, "http_code": 401,
                               "message": "etcdserver: invalid auth token",
                               "http_status": "Unauthorized"}}


def test_from_gateway_wrapped_stream_error_returns_an_error():
    exc = errors.from_gateway(STREAM_ERROR_BODY, 401)
    assert isinstance(exc, errors.EtcdError)


def test_from_gateway_wrapped_stream_error_is_mapped():
    exc = errors.from_gateway(STREAM_ERROR_BODY, 401)
    assert isinstance(exc, errors.Unauthenticated)
    assert exc.code == 16
    assert exc.message == "etcdserver: invalid auth token"


# ============================================================================================
# http11: request bytes
# ============================================================================================


def parse_request(data: bytes):
    """Parse request bytes with httptools' request parser (an independent check)."""

    class P:
        def __init__(self):
            self.headers = []
            self.body = b""
            self.url = b""
            self.complete = 0

        def on_url(self, url):
            self.url += url

        def on_header(self, name, value):
            self.headers.append((name, value))

        def on_body(self, body):
            self.body += body

        def on_message_complete(self):
            self.complete += 1

    p = P()
    parser = httptools.HttpRequestParser(p)
    parser.feed_data(data)
    return p, parser


def test_request_head_exact():
    head = request_head("127.0.0.1:2379", "/v3/kv/range")
    assert head == (b"POST /v3/kv/range HTTP/1.1\r\nHost: 127.0.0.1:2379\r\n"
                    b"Content-Type: application/json\r\nAccept: application/json\r\n"
                    b"Content-Length: ")
    req = build_request(head, b'{"key":"Zm9v"}')
    assert req == head + b'14\r\n\r\n{"key":"Zm9v"}'


def test_request_head_with_headers():
    head = request_head("h", "/v3/kv/put", {"Authorization": "tok.en.1"})
    assert b"\r\nAuthorization: tok.en.1\r\n" in head
    assert head.endswith(b"\r\nContent-Length: ")


@pytest.mark.parametrize(
    "body",
    [b"", b"{}", b'{"key":"Zm9v"}', "é€".encode(), b"\r\n\r\n", b"x" * 100_000, bytes(range(256))],
)
def test_build_request_parses_back(body):
    head = request_head("example:2379", "/v3/kv/put", {"Authorization": "abc"})
    req = build_request(head, body)
    p, parser = parse_request(req)
    assert p.complete == 1
    assert parser.get_method() == b"POST"
    assert p.url == b"/v3/kv/put"
    assert p.body == body
    headers = {k.lower(): v for k, v in p.headers}
    assert headers[b"content-length"] == str(len(body)).encode()
    assert headers[b"host"] == b"example:2379"
    assert headers[b"authorization"] == b"abc"
    assert headers[b"content-type"] == b"application/json"


def test_two_requests_back_to_back_parse():
    head = request_head("h", "/v3/kv/range")
    p, _ = parse_request(build_request(head, b'{"a":1}') + build_request(head, b"{}"))
    assert p.complete == 2
    assert p.body == b'{"a":1}{}'


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "abc\r\nX-Injected: 1"},
        {"Authorization": "abc\n"},
        {"Authorization": "\rabc"},
        {"X-Evil\r\nX-Injected": "1"},
        {"X-Evil\n": "1"},
    ],
)
def test_request_head_rejects_line_breaks(headers):
    with pytest.raises(ValueError):
        request_head("h", "/v3/kv/range", headers)


# ============================================================================================
# http11: ResponseParser
# ============================================================================================


def parse(pieces, parser_out=None, heads=True, statuses=None):
    """Feed pieces to a fresh ResponseParser; return its events with body pieces merged.

    Events: ("head", status), ("body", bytes), ("complete", keep_alive).  ``heads`` is the
    parser's argument; ``statuses`` (a list) gets the status seen by each on_complete.
    """
    events: list = []

    def on_body(b):
        assert isinstance(b, bytes)
        if events and events[-1][0] == "body":
            events[-1] = ("body", events[-1][1] + b)
        else:
            events.append(("body", b))

    class Recorder(ResponseParser):
        def on_head(self, status):
            events.append(("head", status))

        def on_body(self, body):
            on_body(body)

        def on_complete(self):
            events.append(("complete", self.keep_alive))
            if statuses is not None:
                statuses.append(self.status)

    parser = Recorder(heads=heads)
    for piece in pieces:
        parser.feed(piece)
    if parser_out is not None:
        parser_out.append(parser)
    return events


RANGE_BODY = RANGE_REAL

CONTENT_LENGTH = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"Grpc-Metadata-Content-Type: application/grpc\r\n"
    b"Date: Tue, 07 May 2024 10:00:00 GMT\r\n"
    b"Content-Length: " + str(len(RANGE_BODY)).encode() + b"\r\n"
    b"\r\n" + RANGE_BODY
)

WATCH_1 = b'{"result":{"header":{"revision":"1"},"created":true}}\n'
WATCH_2 = (b'{"result":{"header":{"revision":"2"},"events":[{"kv":{"key":"Zm9v",'
           b'"create_revision":"2","mod_revision":"2","version":"1","value":"YmFy"}}]}}\n')

# etcd 3.4's gateway: chunked, announcing a trailer that follows the last chunk.
CHUNKED_TRAILER = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"Grpc-Metadata-Content-Type: application/grpc\r\n"
    b"Trailer: Grpc-Trailer-Content-Type\r\n"
    b"Date: Tue, 07 May 2024 10:00:00 GMT\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
    + b"%x\r\n" % len(WATCH_1) + WATCH_1 + b"\r\n"
    + b"%X\r\n" % len(WATCH_2) + WATCH_2 + b"\r\n"
    b"0\r\n"
    b"Grpc-Trailer-Content-Type: application/grpc\r\n"
    b"\r\n"
)

CHUNKED_PLAIN = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n"
    b"1;ext=1\r\nd\r\n"  # a chunk extension
    b"0\r\n\r\n"
)

ERROR_BODY = (b'{"error":"etcdserver: requested lease not found","code":5,'
              b'"message":"etcdserver: requested lease not found"}')
ERROR_404 = (
    b"HTTP/1.1 404 Not Found\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n" % len(ERROR_BODY) + ERROR_BODY
)

EMPTY_204 = b"HTTP/1.1 204 No Content\r\nDate: x\r\n\r\n"
ZERO_LENGTH = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
CLOSE = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"
HTTP10 = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}"
HTTP10_KEEPALIVE = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n{}"
LOWERCASE_HEADERS = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nCONNECTION: Keep-Alive\r\n\r\nabc"

RESPONSE_TABLE = [
    pytest.param([CONTENT_LENGTH], [("head", 200), ("body", RANGE_BODY), ("complete", True)],
                 id="content-length"),
    pytest.param([CHUNKED_TRAILER],
                 [("head", 200), ("body", WATCH_1 + WATCH_2), ("complete", True)],
                 id="chunked-with-trailer"),
    pytest.param([CHUNKED_PLAIN], [("head", 200), ("body", b"abcd"), ("complete", True)],
                 id="chunked-extension"),
    pytest.param([ERROR_404], [("head", 404), ("body", ERROR_BODY),
                               ("complete", True)], id="error-404"),
    pytest.param([EMPTY_204], [("head", 204), ("complete", True)], id="204-no-body"),
    pytest.param([ZERO_LENGTH], [("head", 200), ("complete", True)], id="zero-length"),
    pytest.param([CONTENT_LENGTH + CHUNKED_TRAILER + ERROR_404],
                 [("head", 200), ("body", RANGE_BODY), ("complete", True),
                  ("head", 200), ("body", WATCH_1 + WATCH_2), ("complete", True),
                  ("head", 404), ("body", ERROR_BODY),
                  ("complete", True)], id="keep-alive-three-in-a-row"),
    pytest.param([ZERO_LENGTH + EMPTY_204 + CLOSE],
                 [("head", 200), ("complete", True), ("head", 204), ("complete", True),
                  ("head", 503), ("body", b"{}"), ("complete", False)],
                 id="keep-alive-then-close"),
    pytest.param([CLOSE], [("head", 503), ("body", b"{}"), ("complete", False)],
                 id="connection-close"),
    pytest.param([HTTP10], [("head", 200), ("body", b"{}"), ("complete", False)],
                 id="http-1.0"),
    pytest.param([HTTP10_KEEPALIVE], [("head", 200), ("body", b"{}"), ("complete", True)],
                 id="http-1.0-keep-alive"),
    pytest.param([LOWERCASE_HEADERS], [("head", 200), ("body", b"abc"), ("complete", True)],
                 id="header-case"),
    # A response whose body has not fully arrived yet: no completion.
    pytest.param([CONTENT_LENGTH[:-5]], [("head", 200), ("body", RANGE_BODY[:-5])],
                 id="partial-body"),
    pytest.param([CHUNKED_TRAILER[:-2]], [("head", 200), ("body", WATCH_1 + WATCH_2)],
                 id="partial-trailer"),
    pytest.param([CONTENT_LENGTH.split(b"\r\n\r\n")[0]], [], id="partial-head"),
]


@pytest.mark.parametrize(("pieces", "expected"), RESPONSE_TABLE)
def test_response_table(pieces, expected):
    assert parse(pieces) == expected


@pytest.mark.parametrize(("pieces", "expected"), RESPONSE_TABLE)
def test_response_one_byte_at_a_time(pieces, expected):
    data = b"".join(pieces)
    assert parse([data[i:i + 1] for i in range(len(data))]) == expected


@pytest.mark.parametrize(("pieces", "expected"), RESPONSE_TABLE)
def test_response_split_everywhere(pieces, expected):
    data = b"".join(pieces)
    for i in range(len(data) + 1):
        assert parse([data[:i], data[i:]]) == expected, i


@SETTINGS
@given(st.data())
def test_response_arbitrary_pieces(data):
    stream = CONTENT_LENGTH + CHUNKED_TRAILER + EMPTY_204 + ERROR_404 + CLOSE
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=30)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert parse(pieces) == [
        ("head", 200), ("body", RANGE_BODY), ("complete", True),
        ("head", 200), ("body", WATCH_1 + WATCH_2), ("complete", True),
        ("head", 204), ("complete", True),
        ("head", 404), ("body", ERROR_BODY), ("complete", True),
        ("head", 503), ("body", b"{}"), ("complete", False),
    ]


def heads_and_completions(expected):
    """The table's events without heads, and the status each completed answer had."""
    status, statuses = None, []
    for kind, value in expected:
        if kind == "head":
            status = value
        elif kind == "complete":
            statuses.append(status)
    return [e for e in expected if e[0] != "head"], statuses


@pytest.mark.parametrize(("pieces", "expected"), RESPONSE_TABLE)
def test_response_table_without_heads(pieces, expected):
    # heads=False (a call's connection): no on_head, and the status is set by the time
    # on_complete runs -- whole or split, the same answers.
    events, statuses = heads_and_completions(expected)
    data = b"".join(pieces)
    for split in (pieces, [data[i:i + 1] for i in range(len(data))]):
        seen: list = []
        assert parse(split, heads=False, statuses=seen) == events
        assert seen == statuses


def test_interim_100_continue_without_heads():
    seen: list = []
    assert parse([b"HTTP/1.1 100 Continue\r\n\r\n" + ERROR_404], heads=False,
                 statuses=seen) == [("body", ERROR_BODY), ("complete", True)]
    assert seen == [404]


def test_status_and_keep_alive_attributes():
    out: list = []
    parse([ZERO_LENGTH], out)
    assert out[0].status == 200
    assert out[0].keep_alive is True
    out.clear()
    parse([ERROR_404 + CLOSE], out)
    assert out[0].status == 503
    assert out[0].keep_alive is False


@pytest.mark.parametrize(
    "data",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 OK\r\n\r\n",  # no status code
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/9.9 200 OK\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",  # a TLS handshake on a plain port
        b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # bad chunk size
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXX",  # no CRLF after data
        b"HTTP/1.1 200 OK\r\nBad Header Name: x\r\n\r\n",
        CLOSE + ZERO_LENGTH,  # bytes after Connection: close
        ZERO_LENGTH + b"junk that is not a response\r\n\r\n",
    ],
)
def test_response_garbage(data):
    with pytest.raises(ProtocolError):
        parse([data])
    # Fed one byte at a time, the error still surfaces as ProtocolError.
    with pytest.raises(ProtocolError):
        parse([data[i:i + 1] for i in range(len(data))])


def test_response_upgrade_is_protocol_error():
    with pytest.raises(ProtocolError):
        parse([b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"])


def test_interim_100_continue_is_not_a_response():
    events = parse([b"HTTP/1.1 100 Continue\r\n\r\n" + ZERO_LENGTH])
    assert events == [("head", 200), ("complete", True)]


def test_callback_errors_propagate_with_their_cause():
    def boom(body):
        raise KeyError("from the callback")

    class Boom(ResponseParser):
        def on_body(self, body):
            boom(body)

    parser = Boom()
    with pytest.raises(Exception) as info:
        parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
    # Whatever the wrapper, the callback's own exception must be reachable.
    seen = []
    exc: BaseException | None = info.value
    while exc is not None and len(seen) < 10:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    assert any(isinstance(e, KeyError) for e in seen)


# ============================================================================================
# http11: ResponseParser(heads=False) gives the same answers, without heads
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
def test_parser_odd_answers_back_to_back_at_every_split(heads):
    expected = ODD_EVENTS if heads else [e for e in ODD_EVENTS if e[0] != "head"]
    for pieces in _splits(ODD_BYTES):
        parser = _Recorder(heads)
        for piece in pieces:
            parser.feed(piece)
        assert parser.events == expected, pieces[0][-40:]


@pytest.mark.parametrize("heads", [True, False])
def test_parser_refuses_an_upgrade_and_garbage_after_an_answer(heads):
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    for bad in (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade"
                b"\r\n\r\n", b"NOT HTTP\r\n\r\n"):
        parser = _Recorder(heads)
        with pytest.raises(ProtocolError):
            parser.feed(ok + bad)
        assert parser.events[-2:] == [("body", b"{}"), ("complete", 200, True)]
        assert (("head", 200) in parser.events) is heads


# ============================================================================================
# stream.LineSplitter
# ============================================================================================

json_line = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8)),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6,
).map(lambda obj: json.dumps({"result": obj}, ensure_ascii=False).encode())
lines_strategy = st.lists(st.one_of(json_line, st.just(b"")), max_size=12)


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted(set(cuts))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


@SETTINGS
@given(lines_strategy, st.booleans(), st.data())
def test_line_splitter_property(lines, trailing_newline, data):
    joined = b"\n".join(lines) + (b"\n" if trailing_newline else b"")
    cuts = data.draw(st.lists(st.integers(0, len(joined)), max_size=20))
    splitter = LineSplitter()
    got: list[bytes] = []
    fed = 0
    for piece in cut(joined, cuts):
        out = splitter.feed(piece)
        assert isinstance(out, list)
        got.extend(out)
        fed += len(piece)
        # The pending tail: what follows the last newline fed so far.
        so_far = joined[:fed]
        assert splitter.buffered == len(so_far) - (so_far.rfind(b"\n") + 1)
        assert all(line for line in got)
    complete = lines if trailing_newline else lines[:-1]
    assert got == [line for line in complete if line != b""]
    expected_tail = b"" if trailing_newline or not lines else lines[-1]
    assert splitter.buffered == len(expected_tail)
    # The tail is completed by a later newline.
    if expected_tail:
        assert splitter.feed(b"\n") == [expected_tail]
        assert splitter.buffered == 0


@pytest.mark.parametrize(
    ("pieces", "expected", "buffered"),
    [
        ([], [], 0),
        ([b""], [], 0),
        ([b"\n"], [], 0),
        ([b"\n\n\n"], [], 0),
        ([b"{}"], [], 2),
        ([b"{}\n"], [b"{}"], 0),
        ([b"{", b"}", b"\n"], [b"{}"], 0),
        ([b"{}\n{"], [b"{}"], 1),
        ([b"{}\n{", b"", b"}\n"], [b"{}", b"{}"], 0),
        ([b"a\n\nb\n"], [b"a", b"b"], 0),
        ([b"a\r\n"], [b"a\r"], 0),  # a CR stays: JSON parsers accept it as whitespace
        ([b"a\nb", b"c\nd"], [b"a", b"bc"], 1),
        ([b"  \n\t\n", b"x\n"], [b"x"], 0),  # whitespace-only lines are blank
    ],
)
def test_line_splitter_table(pieces, expected, buffered):
    splitter = LineSplitter()
    got = []
    for piece in pieces:
        got.extend(splitter.feed(piece))
    assert got == expected
    assert splitter.buffered == buffered


def test_line_splitter_big_line():
    big = b'{"result":{"events":[{"kv":{"key":"' + b"A" * (1 << 20) + b'"}}]}}'
    data = b'{"result":{"created":true}}\n' + big + b"\n" + b'{"x":1}\n'
    splitter = LineSplitter()
    got = []
    step = 64 * 1024
    for i in range(0, len(data), step):
        piece = data[i:i + step]
        got.extend(splitter.feed(piece))
        if not got or got[-1] != b'{"x":1}':
            assert splitter.buffered < len(big) + 1
    assert got == [b'{"result":{"created":true}}', big, b'{"x":1}']
    assert len(got[1]) > 1 << 20
    assert splitter.buffered == 0


# ============================================================================================
# txn: comparisons, operations, Transaction
# ============================================================================================


class FakeLease:
    def __init__(self, lease_id):
        self.lease_id = lease_id


@pytest.mark.parametrize(
    ("comp", "expected"),
    [
        (CompCreated(b"k", "==", 0),
         {"key": b"k", "result": "EQUAL", "target": "CREATE", "create_revision": 0}),
        (CompModified("k", "!=", 7),
         {"key": b"k", "result": "NOT_EQUAL", "target": "MOD", "mod_revision": 7}),
        (CompVersion(b"k", ">", 2),
         {"key": b"k", "result": "GREATER", "target": "VERSION", "version": 2}),
        (CompLease(b"k", "<", 7587862072907265348),
         {"key": b"k", "result": "LESS", "target": "LEASE", "lease": 7587862072907265348}),
        (CompValue(b"k", "==", b"v"),
         {"key": b"k", "result": "EQUAL", "target": "VALUE", "value": b"v"}),
        (CompValue("k", "!=", "é"),
         {"key": b"k", "result": "NOT_EQUAL", "target": "VALUE", "value": b"\xc3\xa9"}),
        (CompValue(b"k", "==", b""),
         {"key": b"k", "result": "EQUAL", "target": "VALUE", "value": b""}),
        # A KeySet comparison carries its range end.
        (CompVersion(KeySet(b"a", b"c"), ">", 0),
         {"key": b"a", "range_end": b"c", "result": "GREATER", "target": "VERSION", "version": 0}),
        (CompModified(KeySet(b"a\xff", prefix=True), "<", 10),
         {"key": b"a\xff", "range_end": b"b", "result": "LESS", "target": "MOD",
          "mod_revision": 10}),
        (CompCreated(KeySet(b"", prefix=True), "==", 0),
         {"key": b"\0", "range_end": b"\0", "result": "EQUAL", "target": "CREATE",
          "create_revision": 0}),
        (CompValue(KeySet(b"x", b"\0"), "==", b"v"),
         {"key": b"x", "range_end": b"\0", "result": "EQUAL", "target": "VALUE", "value": b"v"}),
    ],
)
def test_comparison_json(comp, expected):
    assert comp._json() == expected


def test_comparison_json_wire_bytes():
    comp = CompValue(KeySet(b"a\xff", prefix=True), "==", b"\x00")
    body = json.loads(codec.encode(comp._json()))
    assert body == {"key": "Yf8=", "range_end": "Yg==", "result": "EQUAL", "target": "VALUE",
                    "value": "AA=="}


@pytest.mark.parametrize("op", ["=", "<>", ">=", "<=", "eq", "EQUAL", "", " ==", None, 1, ["=="]])
@pytest.mark.parametrize("cls", [CompCreated, CompModified, CompVersion, CompLease])
def test_comparison_bad_operator_int(cls, op):
    with pytest.raises(errors.InvalidArgument):
        cls(b"k", op, 1)


@pytest.mark.parametrize("op", ["=", ">=", "<=", "!", None, ("==",)])
def test_comparison_bad_operator_value(op):
    with pytest.raises(errors.InvalidArgument):
        CompValue(b"k", op, b"v")


@pytest.mark.parametrize("cls", [CompCreated, CompModified, CompVersion, CompLease])
def test_comparison_bad_values(cls):
    with pytest.raises(TypeError):
        cls(b"k", "==", "1")
    with pytest.raises(TypeError):
        cls(b"k", "==", 1.0)
    with pytest.raises(TypeError):
        cls(b"k", "==", True)
    with pytest.raises(TypeError):
        cls(b"k", "==", None)
    with pytest.raises(errors.InvalidArgument):
        cls(b"k", "==", -1)
    with pytest.raises(TypeError):
        cls(5, "==", 1)
    with pytest.raises(errors.InvalidArgument):
        cls(b"", "==", 1)


def test_comp_value_bad_value():
    with pytest.raises(TypeError, match="value"):
        CompValue(b"k", "==", 5)


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        (OpGet(b"k"), {"request_range": {"key": b"k"}}),
        (OpGet(KeySet(b"a", prefix=True)), {"request_range": {"key": b"a", "range_end": b"b"}}),
        (OpGet(KeySet(b"a", b"c"), limit=10, sort_order="descend", sort_target="mod",
               revision=5, keys_only=True, count_only=True, serializable=True),
         {"request_range": {"key": b"a", "range_end": b"c", "limit": 10,
                            "sort_order": "DESCEND", "sort_target": "MOD", "revision": 5,
                            "keys_only": True, "count_only": True, "serializable": True}}),
        (OpGet(b"k", limit=0, revision=0, sort_order="none", sort_target="key"),
         {"request_range": {"key": b"k"}}),
        (OpGet(b"k", min_mod_revision=1, max_mod_revision=2, min_create_revision=3,
               max_create_revision=4),
         {"request_range": {"key": b"k", "min_mod_revision": 1, "max_mod_revision": 2,
                            "min_create_revision": 3, "max_create_revision": 4}}),
        (OpSet(b"k", b"v"), {"request_put": {"key": b"k", "value": b"v"}}),
        (OpSet("k"), {"request_put": {"key": b"k"}}),
        (OpSet(b"k", b"v", lease=7, return_previous=True),
         {"request_put": {"key": b"k", "value": b"v", "lease": 7, "prev_kv": True}}),
        (OpSet(b"k", lease=FakeLease(7587862072907265348)),
         {"request_put": {"key": b"k", "lease": 7587862072907265348}}),
        (OpSet(b"k", lease=Lease(None, 99)), {"request_put": {"key": b"k", "lease": 99}}),
        (OpSet(b"k", ignore_value=True, lease=5),
         {"request_put": {"key": b"k", "lease": 5, "ignore_value": True}}),
        (OpSet(b"k", b"v", ignore_lease=True),
         {"request_put": {"key": b"k", "value": b"v", "ignore_lease": True}}),
        (OpDel(b"k"), {"request_delete_range": {"key": b"k"}}),
        (OpDel(KeySet(b"", prefix=True), return_previous=True),
         {"request_delete_range": {"key": b"\0", "range_end": b"\0", "prev_kv": True}}),
    ],
)
def test_operation_json(op, expected):
    # Compared as sent: bytes may be base64-encoded early (hot path) or by the encoder.
    assert json.loads(codec.encode(op._json())) == as_sent(expected)


def as_sent(obj):
    """``obj`` as the gateway receives it: bytes as base64 strings (written independently)."""
    if isinstance(obj, bytes):
        return base64.b64encode(obj).decode("ascii")
    if isinstance(obj, dict):
        return {k: as_sent(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [as_sent(v) for v in obj]
    return obj


def test_opset_ignore_value_with_value():
    with pytest.raises(errors.InvalidArgument):
        OpSet(b"k", b"v", ignore_value=True)
    with pytest.raises(errors.InvalidArgument):
        OpSet(b"k", "v", ignore_value=True)
    with pytest.raises(errors.InvalidArgument):
        OpSet(b"k", ignore_lease=True, lease=3)
    with pytest.raises(errors.InvalidArgument):
        OpSet(b"k", ignore_lease=True, lease=FakeLease(3))
    # No value / no lease is fine.
    assert OpSet(b"k", b"", ignore_value=True).ignore_value is True
    assert OpSet(b"k", ignore_lease=True, lease=None).ignore_lease is True


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"key": b""}, errors.InvalidArgument),
        ({"key": 1}, TypeError),
        ({"key": b"k", "value": 1}, TypeError),
        ({"key": b"k", "lease": "7"}, TypeError),
        ({"key": b"k", "lease": True}, TypeError),
        ({"key": b"k", "lease": -1}, errors.InvalidArgument),
        ({"key": b"k", "lease": FakeLease("7")}, TypeError),
        ({"key": b"k", "lease": FakeLease(-2)}, errors.InvalidArgument),
    ],
)
def test_opset_bad(kwargs, exc):
    with pytest.raises(exc):
        OpSet(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"limit": -1}, errors.InvalidArgument),
        ({"limit": 1.5}, TypeError),
        ({"revision": -1}, errors.InvalidArgument),
        ({"revision": "5"}, TypeError),
        ({"sort_order": "up"}, errors.InvalidArgument),
        ({"sort_target": "size"}, errors.InvalidArgument),
        ({"min_mod_revision": True}, TypeError),
        ({"bogus": 1}, TypeError),
    ],
)
def test_opget_bad(kwargs, exc):
    with pytest.raises(exc):
        OpGet(b"k", **kwargs)


def test_transaction_json():
    inner = Transaction([CompVersion(b"x", "==", 0)], [OpSet(b"x", b"1")])
    txn = Transaction(
        compare=[CompCreated(b"k", "==", 0), CompValue(KeySet(b"p", prefix=True), "!=", b"z")],
        success=[OpSet(b"k", b"v"), OpGet(b"k"), inner],
        failure=[OpDel(b"k", return_previous=True)],
    )
    assert json.loads(codec.encode(txn._json())) == as_sent({"request_txn": {
        "compare": [
            {"key": b"k", "result": "EQUAL", "target": "CREATE", "create_revision": 0},
            {"key": b"p", "range_end": b"q", "result": "NOT_EQUAL", "target": "VALUE",
             "value": b"z"},
        ],
        "success": [
            {"request_put": {"key": b"k", "value": b"v"}},
            {"request_range": {"key": b"k"}},
            {"request_txn": {
                "compare": [{"key": b"x", "result": "EQUAL", "target": "VERSION",
                             "version": 0}],
                "success": [{"request_put": {"key": b"x", "value": b"1"}}],
            }},
        ],
        "failure": [{"request_delete_range": {"key": b"k", "prev_kv": True}}],
    }})
    assert Transaction()._json() == {"request_txn": {}}
    # Any iterable of items, kept as tuples.
    t = Transaction(iter([CompCreated(b"k", "==", 0)]), (OpGet(b"k") for _ in range(2)))
    assert t.compare == (CompCreated(b"k", "==", 0),)
    assert len(t.success) == 2


def comps(n):
    return [CompVersion(b"k%d" % i, "==", 0) for i in range(n)]


def ops(n):
    return [OpGet(b"k%d" % i) for i in range(n)]


@pytest.mark.parametrize("where", ["compare", "success", "failure"])
def test_transaction_128_is_fine(where):
    items = comps(128) if where == "compare" else ops(128)
    txn = Transaction(**{where: items})
    assert len(getattr(txn, where)) == 128
    # The limit is per list, not in total.
    Transaction(comps(128), ops(128), ops(128))


@pytest.mark.parametrize("where", ["compare", "success", "failure"])
@pytest.mark.parametrize("n", [129, 200])
def test_transaction_too_many(where, n):
    items = comps(n) if where == "compare" else ops(n)
    with pytest.raises(errors.TooManyOperations) as info:
        Transaction(**{where: items})
    assert isinstance(info.value, errors.InvalidArgument)
    assert where in str(info.value)


def test_nested_transaction_too_many():
    with pytest.raises(errors.TooManyOperations):
        Transaction(success=[Transaction(failure=ops(129))])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"compare": [OpGet(b"k")]}, "compare"),
        ({"compare": [b"k"]}, "compare"),
        ({"compare": [Transaction()]}, "compare"),
        ({"success": [CompVersion(b"k", "==", 0)]}, "success"),
        ({"success": [{"request_put": {"key": b"k"}}]}, "success"),
        ({"success": [None]}, "success"),
        ({"failure": ["k"]}, "failure"),
        ({"failure": [OpGet(b"k"), 5]}, "failure"),
    ],
)
def test_transaction_wrong_item_types(kwargs, name):
    with pytest.raises(TypeError, match=name):
        Transaction(**kwargs)


def test_transaction_not_iterable():
    with pytest.raises(TypeError):
        Transaction(compare=CompVersion(b"k", "==", 0))
    with pytest.raises(TypeError):
        Transaction(success=OpGet(b"k"))


def test_frozen_operations():
    op = OpSet(b"k", b"v")
    with pytest.raises(AttributeError):
        op.value = b"w"  # type: ignore[misc]
    assert OpSet(b"k", "v") == OpSet("k", b"v")
    assert CompValue("k", "==", "v") == CompValue(KeySet(b"k"), "==", b"v")


@pytest.mark.parametrize(
    ("message", "write", "unknown"),
    [
        ("etcdserver: request timed out", True, True),
        ("etcdserver: leader changed", True, True),
        ("etcdserver: server stopped", True, True),
        ("etcdserver: request timed out", False, False),
        ("etcdserver: mvcc: required revision has been compacted", True, False),
    ],
)
def test_for_write_marks_unavailable_writes_as_outcome_unknown(message, write, unknown):
    exc = errors.for_write(errors.from_gateway({"message": message, "code": 14}), write)
    assert isinstance(exc, errors.OutcomeUnknown) is unknown
    assert exc.message == message
    if unknown:
        assert isinstance(exc, errors.Unavailable)


# ============================================================================================
# codec.answer: the direct parses of put and range answers equal the JSON path
# ============================================================================================

int64s = st.integers(min_value=0, max_value=2**63 - 1)


def go_json(message):
    """JSON as etcd's gateway writes it: fields in proto order (a dict's order), zero values
    left out; a list is a repeated message field."""
    parts = []
    for name, value in message.items():
        if value in (0, b"", None, False, [], {}):
            continue
        if isinstance(value, bool):
            text = "true"
        elif isinstance(value, int):
            text = f'"{value}"'
        elif isinstance(value, bytes):
            text = json.dumps(base64.b64encode(value).decode())
        elif isinstance(value, list):
            text = "[" + ",".join(go_json(v) for v in value) + "]"
        else:
            text = go_json(value)
        parts.append(f'"{name}":{text}')
    return "{" + ",".join(parts) + "}"


headers_st = st.tuples(int64s, int64s, int64s, int64s).map(
    lambda h: {"cluster_id": h[0], "member_id": h[1], "revision": h[2], "raft_term": h[3]})
kvs_st = st.tuples(st.binary(min_size=1, max_size=12), st.binary(max_size=12), int64s,
                   int64s, int64s, int64s).map(
    lambda k: {"key": k[0], "create_revision": k[2], "mod_revision": k[3],
               "version": k[4], "value": k[1], "lease": k[5]})


@given(headers_st, st.lists(kvs_st, max_size=2), st.booleans(), int64s, st.booleans())
@settings(max_examples=300)
def test_answer_range_equals_json_path(header_fields, kvs, more, count, spaced):
    body = go_json({"header": header_fields, "kvs": kvs, "more": more, "count": count})
    if spaced:
        body = body.replace(",", ", ")  # another writer's spacing: the JSON path must take it
    raw = body.encode()
    expected = codec.range_response(json.loads(raw))
    assert codec.answer(raw, codec.range_response) == expected


@given(headers_st, st.one_of(st.none(), kvs_st))
@settings(max_examples=300)
def test_answer_put_equals_json_path(header_fields, prev):
    raw = go_json({"header": header_fields, "prev_kv": prev}).encode()
    expected = codec.put_response(json.loads(raw))
    got = codec.answer(raw, codec.put_response)
    assert got == expected
    assert type(got.revision) is int


@pytest.mark.parametrize(
    "raw",
    [
        RANGE_REAL,
        # A real put answer, and the same with its fields in another order.
        b'{"header":{"cluster_id":"1","member_id":"2","revision":"3","raft_term":"4"}}',
        b'{"header":{"member_id":"2","cluster_id":"1","revision":"3","raft_term":"4"}}',
        # An escaped character in the base64 (legal JSON): not the direct parse's shape.
        b'{"header":{"cluster_id":"1","member_id":"2","revision":"3","raft_term":"4"},'
        b'"kvs":[{"key":"Zm9v\\u003d","value":"YmFy"}],"count":"1"}',
        # Negative numbers (not etcd's, but JSON): the JSON path's int() takes them.
        b'{"header":{"cluster_id":"1","member_id":"2","revision":"-3","raft_term":"4"}}',
        # A field the direct parse does not know.
        b'{"header":{"cluster_id":"1","member_id":"2","revision":"3","raft_term":"4"},'
        b'"kvs":[{"key":"Zm9v","extra":"1"}],"count":"1"}',
    ],
)
def test_answer_table_equals_json_path(raw):
    for convert in (codec.range_response, codec.put_response):
        try:
            expected = convert(json.loads(raw))
        except Exception as e:
            with pytest.raises(type(e)):
                codec.answer(raw, convert)
        else:
            assert codec.answer(raw, convert) == expected
    assert codec.answer(raw) == json.loads(raw)


def test_answer_not_json():
    with pytest.raises(errors.MalformedAnswer):
        codec.answer(b"<html>", codec.range_response)


# ============================================================================================
# codec.answer: the direct parses equal convert(decode(body)), value or exception type
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
# codec.answer: the one-kv pattern (_ONE_KV) on its edge bodies, against the JSON path
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
def test_merged_regex_equals_json_path(body, fast):
    assert fast_hit(body) is fast
    for convert in CONVERTERS:
        assert_same(body, convert)


# ============================================================================================
# codec.decode: the scanner called directly
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
# codec.header: the subscript fast path equals the get() path
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
# codec: values built without __init__ are the same objects in every way a user can tell
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
def test_direct_values_are_indistinguishable_from_init_built_ones(answer):
    raw, convert = answer
    assert fast_hit(raw)
    assert_indistinguishable(codec.answer(raw, convert), convert(json.loads(raw)))


@pytest.mark.parametrize("raw", [
    hdr() + b"}",  # a missing key
    hdr() + b',"count":"2"}',  # count only
    one_kv(b'"key":"Zm9v","value":"YmFy"'),
])
def test_each_range_gets_its_own_kvs_list(raw):
    # The JSON path makes a new list per answer: a user may append to r.kvs, and a list
    # shared between answers would carry that into every later answer.
    a = codec.answer(raw, codec.range_response)
    b = codec.answer(raw, codec.range_response)
    assert a.kvs is not b.kvs
    a.kvs.append(KeyValue(b"junk"))
    clean = codec.range_response(json.loads(raw))
    assert b == clean and codec.answer(raw, codec.range_response) == clean


# ============================================================================================
# codec._setters: refused for every class whose construction does more than store fields
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
def test_setters_refuse_classes_whose_construction_does_more(cls):
    with pytest.raises(TypeError, match="no longer plain"):
        codec._setters(cls, "a")


# ============================================================================================
# codec: answers that are not etcd's
# ============================================================================================

# What etcd's gateway answers on 3.4.23 and 3.5.1 (curl, one answer per call coord makes):
# every one carries a header -- a keep-alive's inside "result" -- except a defragment's
# ({} on both) and an alarm's on 3.4 ({} or {"alarms": [...]}).
NOT_OBJECTS = [b"[]", b"null", b'"header"', b"1", b"true", b"[{}]"]
NO_HEADER = [b"{}", b'{"header":null}', b'{"header":[]}', b'{"header":"x"}', b'{"header":1}',
             b'{"kvs":[],"count":"0"}', b'{"result":{"ID":"7","TTL":"5"}}']

ANSWER_DECODERS = [
    codec.range_response, codec.put_response, codec.delete_response, codec.txn_response,
    codec.status_response, codec.members_response, codec.header_response,
    codec.keepalive_response, codec.unary,
]


@pytest.mark.parametrize("convert", ANSWER_DECODERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("raw", NOT_OBJECTS + NO_HEADER)
def test_answers_without_a_header_are_refused(convert, raw):
    with pytest.raises(errors.MalformedAnswer) as info:
        convert(json.loads(raw))
    assert "not an etcd gateway answer" in str(info.value)
    # Through codec.answer too: the direct parses (put, range) fall back to the same check.
    with pytest.raises(errors.MalformedAnswer):
        codec.answer(raw, convert)


@pytest.mark.parametrize("raw", NOT_OBJECTS + NO_HEADER)
def test_answer_without_a_decoder_needs_a_header(raw):
    with pytest.raises(errors.MalformedAnswer):
        codec.answer(raw)


@pytest.mark.parametrize("convert", [codec.alarms, codec.defragment_response],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("raw", NOT_OBJECTS)
def test_headerless_answers_must_still_be_objects(convert, raw):
    with pytest.raises(errors.MalformedAnswer):
        codec.answer(raw, convert)


@pytest.mark.parametrize(("convert", "raw", "expected"), [
    (codec.defragment_response, b"{}", None),  # 3.4.23 and 3.5.1
    (codec.alarms, b"{}", []),  # 3.4.23: no header, no alarm
    (codec.alarms, b'{"alarms":[{"memberID":"1","alarm":"NOSPACE"}]}',
     [Alarm(1, AlarmType.NOSPACE)]),  # 3.4.23 with an alarm
    (codec.keepalive_response, b'{"result":{"header":{"revision":"3"},"ID":"7"}}',
     {"header": {"revision": "3"}, "ID": "7"}),  # a revoked lease: no TTL
    (codec.header_response, b'{"header":{"revision":"3"}}', Header(0, 0, 3, 0)),
    (codec.members_response, b'{"header":{"raft_term":"2"},"members":[{"ID":"5"}]}',
     [Member(5)]),  # 3.4 and 3.5 leave the revision out of a member list's header
])
def test_answers_etcd_gives_are_taken(convert, raw, expected):
    assert codec.answer(raw, convert) == expected


def test_malformed_answer_is_not_transient_nor_etcds():
    exc = errors.MalformedAnswer("x")
    assert isinstance(exc, errors.CoordError)
    assert not isinstance(exc, (errors.Unavailable, errors.EtcdError, errors.InvalidArgument))
    assert errors.MalformedAnswer.__name__ in errors.__all__
    import coord

    assert coord.MalformedAnswer is errors.MalformedAnswer


def test_answer_direct_parses_take_etcds_own_answers():
    # The shapes etcd writes are the ones parsed directly (else the tests above would only
    # ever compare the JSON path with itself).
    assert codec._ONE_KV.fullmatch(RANGE_REAL)
    put = b'{"header":{"cluster_id":"1","member_id":"2","revision":"3","raft_term":"4"}}'
    assert codec._HEADER_ONLY.fullmatch(put)
    # A get of a missing key, and a count-only get, in the same one match.
    assert codec._ONE_KV.fullmatch(put)
    assert codec._ONE_KV.fullmatch(put[:-1] + b',"count":"3"}')
    assert codec.answer(put[:-1] + b',"more":true,"count":"3"}', codec.range_response) == \
        Range([], 3, True, Header(1, 2, 3, 4))


def test_answer_values_are_whole_attrs_objects():
    # The direct parses build values without __init__: they must be the same objects in
    # every way a user can tell -- equal, same hash and repr, frozen, picklable, evolvable.
    put = b'{"header":{"cluster_id":"1","member_id":"2","revision":"3","raft_term":"4"}}'
    for raw, convert in ((RANGE_REAL, codec.range_response), (put, codec.put_response),
                         (put, codec.range_response)):
        got = codec.answer(raw, convert)
        expected = convert(json.loads(raw))
        assert got == expected and repr(got) == repr(expected)
        assert hash(got.header) == hash(expected.header)  # (a Range holds a list: no hash)
        if convert is codec.put_response:
            assert hash(got) == hash(expected)
        assert pickle.loads(pickle.dumps(got)) == expected
        assert attrs.evolve(got) == expected
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            got.header = None
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            got.header.revision = 0


@pytest.mark.parametrize("field", [
    attrs.field(default=0, converter=int),
    attrs.field(default=0, validator=attrs.validators.instance_of(int)),
])
def test_answer_setters_refuse_a_class_init_would_do_more_for(field):
    @attrs.frozen
    class Changed:
        a: int = 0
        b: int = field

    with pytest.raises(TypeError, match="no longer plain"):
        codec._setters(Changed, "a b")

    @attrs.frozen
    class PostInit:
        a: int = 0

        def __attrs_post_init__(self):
            pass

    with pytest.raises(TypeError, match="no longer plain"):
        codec._setters(PostInit, "a")

    @attrs.frozen(cache_hash=True)
    class CachedHash:
        a: int = 0

    with pytest.raises(TypeError, match="no longer plain"):
        codec._setters(CachedHash, "a")
    with pytest.raises(TypeError, match="no longer plain"):
        codec._setters(Header, "member_id cluster_id revision raft_term")  # order
