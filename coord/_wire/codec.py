"""etcd JSON gateway codec: request dicts -> bytes, response JSON -> coord.types values.

Sans-IO: no reactor, no sockets.  Gateway rules (grpc-gateway's protobuf JSON mapping):

* every ``bytes`` field is base64; every int64 is a JSON string (numbers are accepted
  on input, so coord sends plain numbers);
* a field holding its zero value is omitted: absent ``kvs`` is ``[]``, absent
  ``succeeded`` is false, absent ``count`` is 0, a PUT event has no ``type``;
* field names are the proto names (``create_revision``), except where the proto itself
  is camelCase (StatusResponse's ``dbSize``, Member's ``peerURLs``).
"""

from __future__ import annotations

import json
import json.scanner
import re
from binascii import a2b_base64, b2a_base64
from typing import Any

import attrs

from coord import errors
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


def _bytes_default(value: object) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return b2a_base64(value, newline=False).decode("ascii")
    raise TypeError(f"cannot encode {type(value).__name__} for etcd")


_encoder = json.JSONEncoder(separators=(",", ":"), default=_bytes_default)


def encode(body: dict) -> bytes:
    """A request dict (bytes values allowed, encoded as base64) as a JSON body."""
    return _encoder.encode(body).encode("ascii")


# The JSON scanner itself (C), without JSONDecoder.raw_decode's Python frame around it.
_scan_once = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]


def decode(data: bytes) -> Any:
    """Parse a JSON body; a body that is not JSON becomes :class:`errors.MalformedAnswer`.

    etcd's bodies start with their JSON value and may end with a newline (streams): the
    scanner reads the value where it starts, skipping json.loads' two whitespace scans;
    what follows the value must be JSON whitespace only.  A value nested too deeply to
    parse (RecursionError) is refused the same way.
    """
    try:
        text = data.decode("utf-8")
        try:
            value, end = _scan_once(text, 0)
        except (StopIteration, ValueError):
            return json.loads(text)  # leading whitespace, or not JSON at all (raises)
        if end != len(text) and text[end:].strip(" \t\n\r"):
            raise ValueError("extra data after the JSON value")
        return value
    except (ValueError, RecursionError):
        raise errors.MalformedAnswer(
            f"etcd gateway sent a body that is not JSON: {data[:200]!r}", data[:200]) from None


def _malformed(obj: Any, wanted: str) -> errors.MalformedAnswer:
    shown = repr(obj)
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return errors.MalformedAnswer(
        f"the server's answer is not an etcd gateway answer ({wanted}): {shown}",
        shown.encode("utf-8", "replace"))


def json_object(obj: Any) -> dict:
    """``obj`` if it is a JSON object (a dict), else :class:`errors.MalformedAnswer`.

    For the answers that may lack a header: etcd's DefragmentResponse has none (3.4.23
    and 3.5.1 answer ``{}``), nor has 3.4's AlarmResponse (3.5 fills it in).
    """
    if type(obj) is dict:
        return obj
    raise _malformed(obj, "not a JSON object")


def unary(obj: Any) -> dict:
    """``obj`` if it is a unary etcd answer: a JSON object with a ``header`` object.

    Every answer coord reads carries one (``rpc.proto``: each response's ``header``
    field, filled in by etcd's server before the gateway writes it; checked on 3.4.23
    and 3.5.1 for every call coord makes), except those :func:`json_object` is for.
    A body such as ``[]``, ``null`` or ``{}`` comes from something that is not etcd.

    Raises:
        MalformedAnswer: it is not.
    """
    if type(obj) is dict and type(obj.get("header")) is dict:
        return obj
    raise _malformed(obj, "a JSON object with a header")


def b64(value: str | None) -> bytes:
    return a2b_base64(value) if value else b""


def header(obj: dict | None) -> Header:
    if not obj:
        return Header()
    g = obj.get
    return Header(int(g("cluster_id", 0)), int(g("member_id", 0)), int(g("revision", 0)),
                  int(g("raft_term", 0)))


def kv(obj: dict) -> KeyValue:
    g = obj.get
    value = g("value")
    return KeyValue(
        a2b_base64(obj["key"]),
        a2b_base64(value) if value else b"",
        int(g("create_revision", 0)),
        int(g("mod_revision", 0)),
        int(g("version", 0)),
        int(g("lease", 0)),
    )


# The answer decoders below take the JSON answer of their call and refuse one that is not
# etcd's (see unary).  A transaction's responses are decoded by the underscored ones: only
# the answer as a whole is checked (etcd gives each response a header of its own too, but
# with the revision alone, or empty for a nested transaction).


def _range(obj: dict) -> Range:
    kvs = obj.get("kvs")
    return Range([kv(x) for x in kvs] if kvs else [], int(obj.get("count", 0)),
                 bool(obj.get("more", False)), header(obj.get("header")))


def _put(obj: dict) -> Revision:
    h = header(obj.get("header"))
    prev = obj.get("prev_kv")
    return Revision(h.revision, kv(prev) if prev else None, h)


def _delete(obj: dict) -> Deleted:
    prev = obj.get("prev_kvs")
    return Deleted(int(obj.get("deleted", 0)), [kv(x) for x in prev] if prev else [],
                   header(obj.get("header")))


def _txn(obj: dict) -> TransactionResult:
    responses: list[Any] = []
    for item in obj.get("responses") or ():
        ((name, value),) = item.items()
        if name == "response_txn":
            responses.append(_txn(value))
        else:
            responses.append(_TXN_RESPONSES[name](value))
    return TransactionResult(bool(obj.get("succeeded", False)), responses,
                             header(obj.get("header")))


_TXN_RESPONSES = {
    "response_range": _range,
    "response_put": _put,
    "response_delete_range": _delete,
}


def range_response(obj: Any) -> Range:
    """A RangeResponse.  Raises MalformedAnswer for an answer that is not etcd's."""
    return _range(unary(obj))


def put_response(obj: Any) -> Revision:
    """A PutResponse.  Raises MalformedAnswer for an answer that is not etcd's."""
    return _put(unary(obj))


def delete_response(obj: Any) -> Deleted:
    """A DeleteRangeResponse.  Raises MalformedAnswer for an answer that is not etcd's."""
    return _delete(unary(obj))


def txn_response(obj: Any) -> TransactionResult:
    """A TxnResponse.  Raises MalformedAnswer for an answer that is not etcd's."""
    return _txn(unary(obj))


def header_response(obj: Any) -> Header:
    """The header of an answer that carries nothing else coord reads (compaction, lease
    revoke).  Raises MalformedAnswer for an answer that is not etcd's."""
    return header(unary(obj)["header"])


def keepalive_response(obj: Any) -> dict:
    """A LeaseKeepAliveResponse: the gateway serves keep-alives as a stream, so the answer
    is wrapped in ``{"result": ...}`` (an answer without the wrapping is taken as is).

    Raises:
        MalformedAnswer: an answer that is not etcd's.
    """
    obj = json_object(obj)
    result = obj.get("result", obj)
    return unary(result)


# Direct parses of the two answers a busy client gets most, in the exact shape etcd's
# gateway writes them (proto field order, zero values omitted, no whitespace): a put's
# header-only answer, and a range answer with at most one key.  Anything else -- another
# field, another order, an escape, a sign -- does not match and takes the JSON path, which
# gives the same value (tests/test_wire.py checks the two against each other).
_HEADER = (rb'\{"header":\{"cluster_id":"(\d+)","member_id":"(\d+)","revision":"(\d+)",'
           rb'"raft_term":"(\d+)"\}')
_HEADER_ONLY = re.compile(_HEADER + rb"\}")
# No key (a get of a missing key, a count-only get) or one key: one match either way.
_ONE_KV = re.compile(
    _HEADER + rb'(?:,"kvs":\[\{"key":"([A-Za-z0-9+/]+={0,2})"(?:,"create_revision":"(\d+)")?'
    rb'(?:,"mod_revision":"(\d+)")?(?:,"version":"(\d+)")?'
    rb'(?:,"value":"([A-Za-z0-9+/]*={0,2})")?(?:,"lease":"(\d+)")?\}\])?(,"more":true)?'
    rb'(?:,"count":"(\d+)")?\}')


# The direct parses build their values without attrs' __init__, which sets each field of
# a frozen class through object.__setattr__ by name: the slots' own descriptors do it in
# about 60% of the time.  Same objects (equal, same types): the tests compare them with
# the JSON path's, which goes through __init__.
_new = object.__new__


def _setters(cls: type, names: str) -> list[Any]:
    """The slot setters of ``cls``'s fields ``names``, which must be all its fields, in
    order, with nothing for construction to do but store them: attrs' own __init__, no
    __new__ of its own, no converter, validator, pre- or post-init step, and no slot but
    the fields' (such as a cached hash)."""
    fields = attrs.fields(cls)
    wanted = names.split()
    plain = (
        wanted == [f.name for f in fields]
        and all(f.converter is None and f.validator is None for f in fields)
        and cls.__new__ is object.__new__
        and not any(hasattr(cls, hook) for hook in (
            "__attrs_pre_init__", "__attrs_post_init__",
            "__attrs_init__"))  # attrs makes __attrs_init__ when the class has its own __init__
        and set(getattr(cls, "__slots__", ())) - {"__weakref__"} == set(wanted)
    )
    if not plain:
        raise TypeError(f"{cls.__name__} is no longer plain: build it with its __init__")
    return [cls.__dict__[name].__set__ for name in wanted]


_H = _setters(Header, "cluster_id member_id revision raft_term")
_KV = _setters(KeyValue, "key value create_revision mod_revision version lease")
_R = _setters(Range, "kvs count more header")
_REV = _setters(Revision, "revision previous header")


def _header(c: int, m: int, r: int, t: int) -> Header:
    h = _new(Header)
    _H[0](h, c)
    _H[1](h, m)
    _H[2](h, r)
    _H[3](h, t)
    return h


# How a streaming endpoint's answer starts when etcd refused it: HTTP 200, then
# {"error": {...}} instead of {"result": ...}.  The gateway serves a lease keep-alive as
# a stream, so a keep-alive etcd refuses ("no leader", a stale token) looks like this.
# No unary answer starts so (their first field is "header").
STREAM_ERROR = b'{"error":'


def answer(body: bytes, convert: Any = None) -> Any:
    """The value of a successful answer: ``convert(JSON of body)``, or the JSON itself.

    For :func:`put_response` and :func:`range_response`, the common shapes are parsed
    directly, values built without attrs' __init__ (see _setters): a third of the
    decoding cost of a small answer.

    ``convert`` (one of this module's answer decoders, or a function that calls one)
    refuses an answer that is not etcd's; without it, the answer must be a JSON object
    with a header (see :func:`unary`), returned as it is.

    Raises:
        MalformedAnswer: the body is not JSON, or not an etcd answer.
    """
    if convert is put_response:
        m = _HEADER_ONLY.fullmatch(body)
        if m is not None:
            c, mm, r, t = m.groups()
            revision = int(r)
            put = _new(Revision)
            _REV[0](put, revision)
            _REV[1](put, None)
            _REV[2](put, _header(int(c), int(mm), revision, int(t)))
            return put
    elif convert is range_response:
        m = _ONE_KV.fullmatch(body)
        if m is not None:
            c, mm, r, t, key, create, mod, version, value, lease, more, count = m.groups()
            kvs = []
            if key is not None:
                one = _new(KeyValue)
                _KV[0](one, a2b_base64(key))
                _KV[1](one, a2b_base64(value) if value else b"")
                _KV[2](one, int(create or 0))
                _KV[3](one, int(mod or 0))
                _KV[4](one, int(version or 0))
                _KV[5](one, int(lease or 0))
                kvs.append(one)
            got = _new(Range)
            _R[0](got, kvs)
            _R[1](got, int(count or 0))
            _R[2](got, more is not None)
            _R[3](got, _header(int(c), int(mm), int(r), int(t)))
            return got
    # (The direct parses above match only answers with a header: nothing to check there.)
    obj = decode(body)
    return unary(obj) if convert is None else convert(obj)


def status_response(obj: Any) -> Status:
    """A StatusResponse.  Raises MalformedAnswer for an answer that is not etcd's."""
    g = unary(obj).get
    return Status(
        header(g("header")),
        g("version", ""),
        int(g("dbSize", 0)),
        int(g("leader", 0)),
        int(g("raftIndex", 0)),
        int(g("raftTerm", 0)),
        int(g("raftAppliedIndex", 0)),
        int(g("dbSizeInUse", 0)),
        list(g("errors") or ()),
        bool(g("isLearner", False)),
    )


def member(obj: dict) -> Member:
    g = obj.get
    return Member(int(g("ID", 0)), g("name", ""), list(g("peerURLs") or ()),
                  list(g("clientURLs") or ()), bool(g("isLearner", False)))


def members_response(obj: Any) -> list[Member]:
    """A MemberListResponse's members.  Raises MalformedAnswer for an answer that is not
    etcd's."""
    return [member(m) for m in unary(obj).get("members") or ()]


def alarms(obj: Any) -> list[Alarm]:
    """An AlarmResponse's alarms.  etcd 3.4 sends no header with it (see json_object).

    Raises:
        MalformedAnswer: not a JSON object.
    """
    return [Alarm(int(a.get("memberID", 0)), AlarmType(a.get("alarm", "NONE")))
            for a in json_object(obj).get("alarms") or ()]


def defragment_response(obj: Any) -> None:
    """A DefragmentResponse: ``{}`` (etcd sends no header with it, see json_object).

    Raises:
        MalformedAnswer: not a JSON object.
    """
    json_object(obj)


def event(obj: dict) -> Event:
    prev = obj.get("prev_kv")
    return Event(EventType.DELETE if obj.get("type") == "DELETE" else EventType.PUT,
                 kv(obj["kv"]), kv(prev) if prev else None)
