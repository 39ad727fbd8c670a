"""Client core against a real etcd: KV options, transactions, leases, maintenance, bad input."""

from __future__ import annotations

import json
import math

import pytest
import pytest_twisted
from helpers import sleep
from twisted.internet import reactor
from twisted.web.client import Agent

from coord import (
    Alarm,
    AlarmType,
    Client,
    Compacted,
    CompCreated,
    CompLease,
    CompModified,
    CompValue,
    CompVersion,
    Failed,
    FutureRevision,
    InvalidArgument,
    KeySet,
    LeaseExpired,
    LeaseNotFound,
    MalformedAnswer,
    OpDel,
    OpGet,
    OpSet,
    Range,
    RequestTooLarge,
    Revision,
    Timeout,
    TooManyOperations,
    Transaction,
    TransactionResult,
    Unavailable,
    errors,
)
from coord.lease import Lease
from coord.testing import Scripted, http_answer
from coord.types import Deleted

# -- KV ----------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_set_returns_revision_and_previous(client):
    first = await client.set(b"k", b"v1")
    assert isinstance(first, Revision) and first.previous is None
    second = await client.set("k", "v2", return_previous=True)
    assert second.revision == first.revision + 1
    assert second.previous.value == b"v1"
    assert second.previous.mod_revision == first.revision
    kv = (await client.get(b"k")).kvs[0]
    assert (kv.value, kv.version, kv.create_revision, kv.mod_revision) == (
        b"v2", 2, first.revision, second.revision)


@pytest_twisted.ensureDeferred
async def test_set_binary_and_empty_values(client):
    value = bytes(range(256)) * 4
    await client.set(b"\x00\xffbin", value)
    assert (await client.get(b"\x00\xffbin")).kvs[0].value == value
    await client.set(b"empty", b"")
    kv = (await client.get(b"empty")).kvs[0]
    assert kv.value == b"" and kv.version == 1


@pytest_twisted.ensureDeferred
async def test_ignore_value_and_ignore_lease(client):
    lease = await client.lease(30)
    await client.set(b"k", b"v", lease=lease)
    await client.set(b"k", ignore_value=True)  # keeps the value, drops the lease
    kv = (await client.get(b"k")).kvs[0]
    assert kv.value == b"v" and kv.lease == 0
    await client.set(b"k", b"v", lease=lease.lease_id)
    await client.set(b"k", b"w", ignore_lease=True)
    kv = (await client.get(b"k")).kvs[0]
    assert kv.value == b"w" and kv.lease == lease.lease_id
    await lease.revoke()


@pytest_twisted.ensureDeferred
async def test_get_range_options(client):
    revs = {}
    for name in [b"a", b"b", b"c", b"d", b"e"]:
        revs[name] = (await client.set(b"r/" + name, name * 3)).revision
    prefix = KeySet(b"r/", prefix=True)

    limited = await client.get(prefix, limit=2)
    assert [kv.key for kv in limited.kvs] == [b"r/a", b"r/b"]
    assert limited.count == 5 and limited.more is True

    desc = await client.get(prefix, sort_order="descend", sort_target="key")
    assert [kv.key for kv in desc.kvs] == [b"r/e", b"r/d", b"r/c", b"r/b", b"r/a"]

    keys_only = await client.get(prefix, keys_only=True)
    assert all(kv.value == b"" for kv in keys_only.kvs) and len(keys_only.kvs) == 5

    counted = await client.get(prefix, count_only=True)
    assert counted.kvs == [] and counted.count == 5

    serial = await client.get(b"r/a", serializable=True)
    assert serial.kvs[0].value == b"aaa"

    old = await client.get(prefix, revision=revs[b"b"])
    assert [kv.key for kv in old.kvs] == [b"r/a", b"r/b"]

    newer = await client.get(prefix, min_mod_revision=revs[b"d"])
    assert [kv.key for kv in newer.kvs] == [b"r/d", b"r/e"]
    older = await client.get(prefix, max_create_revision=revs[b"b"])
    assert [kv.key for kv in older.kvs] == [b"r/a", b"r/b"]

    everything = await client.get(KeySet(b"", prefix=True))
    assert len(everything.kvs) == 5
    open_ended = await client.get(KeySet(b"r/c", b"\0"))
    assert [kv.key for kv in open_ended.kvs] == [b"r/c", b"r/d", b"r/e"]


@pytest_twisted.ensureDeferred
async def test_get_missing_key_is_empty_not_error(client):
    result = await client.get(b"missing")
    assert isinstance(result, Range)
    assert result.kvs == [] and result.count == 0 and result.more is False
    assert result.header.revision >= 1


@pytest_twisted.ensureDeferred
async def test_delete_counts_and_previous(client):
    for i in range(5):
        await client.set(b"d/%d" % i, b"%d" % i)
    none = await client.delete(b"nothing")
    assert isinstance(none, Deleted) and none.deleted == 0 and none.previous == []
    some = await client.delete(KeySet(b"d/1", b"d/3"), return_previous=True)
    assert some.deleted == 2
    assert [kv.key for kv in some.previous] == [b"d/1", b"d/2"]
    rest = await client.delete(KeySet(b"d/", prefix=True))
    assert rest.deleted == 3 and rest.previous == []


@pytest_twisted.ensureDeferred
async def test_compact_then_old_revision_is_compacted(client):
    first = await client.set(b"c", b"1")
    second = await client.set(b"c", b"2")
    await client.set(b"c", b"3")
    await client.compact(second.revision, physical=True)
    with pytest.raises(Compacted) as info:
        await client.get(b"c", revision=first.revision)
    assert "compacted" in info.value.message
    assert (await client.get(b"c", revision=second.revision)).kvs[0].value == b"2"
    with pytest.raises(Compacted):
        await client.compact(first.revision)


@pytest_twisted.ensureDeferred
async def test_future_revision(client):
    rev = (await client.set(b"f", b"1")).revision
    with pytest.raises(FutureRevision):
        await client.get(b"f", revision=rev + 1000)


# -- transactions ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_txn_every_comparison_target(client):
    lease = await client.lease(30)
    put = await client.set(b"t", b"m", lease=lease)
    await client.set(b"t", b"m", lease=lease)  # version 2
    cases = [
        (CompValue(b"t", "==", b"m"), True), (CompValue(b"t", "!=", b"m"), False),
        (CompValue(b"t", ">", b"a"), True), (CompValue(b"t", "<", b"a"), False),
        (CompVersion(b"t", "==", 2), True), (CompVersion(b"t", ">", 2), False),
        (CompVersion(b"t", "<", 3), True), (CompVersion(b"t", "!=", 2), False),
        (CompCreated(b"t", "==", put.revision), True),
        (CompCreated(b"t", ">", put.revision), False),
        (CompModified(b"t", ">", put.revision), True),
        (CompModified(b"t", "<", put.revision), False),
        (CompLease(b"t", "==", lease.lease_id), True), (CompLease(b"t", "==", 0), False),
        (CompCreated(b"absent", "==", 0), True), (CompVersion(b"absent", ">", 0), False),
    ]
    for comparison, expected in cases:
        txn = Transaction(compare=[comparison], success=[OpGet(b"t")], failure=[OpGet(b"t")])
        if expected:
            result = await client.submit(txn)
            assert isinstance(result, TransactionResult) and result.succeeded, comparison
        else:
            with pytest.raises(Failed):
                await client.submit(txn)
    await lease.revoke()


@pytest_twisted.ensureDeferred
async def test_txn_range_comparison(client):
    for i in range(3):
        await client.set(b"g/%d" % i, b"x")
    ok = Transaction(compare=[CompValue(KeySet(b"g/", prefix=True), "==", b"x")],
                     success=[OpSet(b"g/ok", b"1")])
    await client.submit(ok)
    await client.set(b"g/1", b"y")
    bad = Transaction(compare=[CompValue(KeySet(b"g/0", b"g/3"), "==", b"x")],
                      success=[OpSet(b"g/ok", b"2")])
    with pytest.raises(Failed):
        await client.submit(bad)
    assert (await client.get(b"g/ok")).kvs[0].value == b"1"


@pytest_twisted.ensureDeferred
async def test_txn_responses_and_nested(client):
    await client.set(b"n/a", b"1")
    txn = Transaction(
        compare=[CompVersion(b"n/a", ">", 0)],
        success=[
            OpGet(KeySet(b"n/", prefix=True)),
            OpSet(b"n/b", b"2", return_previous=True),
            OpDel(b"n/a", return_previous=True),
            Transaction(compare=[CompCreated(b"n/c", "==", 0)], success=[OpSet(b"n/c", b"3")],
                        failure=[OpGet(b"n/c")]),
        ],
    )
    result = await client.submit(txn)
    rng, put, dele, nested = result.responses
    assert [kv.key for kv in rng.kvs] == [b"n/a"]
    assert isinstance(put, Revision) and put.previous is None
    assert isinstance(dele, Deleted) and dele.deleted == 1 and dele.previous[0].value == b"1"
    assert isinstance(nested, TransactionResult) and nested.succeeded
    assert put.revision == result.header.revision
    assert (await client.get(b"n/c")).kvs[0].value == b"3"


@pytest_twisted.ensureDeferred
async def test_txn_failed_carries_failure_responses(client):
    txn = Transaction(compare=[CompValue(b"nope", "==", b"x")],
                      success=[OpSet(b"s", b"1")], failure=[OpSet(b"f", b"1"), OpGet(b"f")])
    with pytest.raises(Failed) as info:
        await client.submit(txn)
    put, get = info.value.responses
    assert isinstance(put, Revision) and get.kvs[0].value == b"1"
    assert info.value.header.revision == put.revision
    assert (await client.get(b"s")).kvs == []


@pytest_twisted.ensureDeferred
async def test_txn_empty_compare_succeeds(client):
    result = await client.submit(Transaction(success=[OpSet(b"e", b"1")]))
    assert result.succeeded


# -- leases ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_lease_lifecycle(client):
    lease = await client.lease(20)
    assert lease.ttl == 20 and lease.lease_id > 0
    assert 18 <= await lease.remaining() <= 20
    await client.set(b"l/1", b"a", lease=lease)
    await client.set(b"l/2", b"b", lease=lease)
    assert sorted(await lease.keys()) == [b"l/1", b"l/2"]
    info = await lease.time_to_live()
    assert (info.lease_id, info.granted_ttl, info.keys) == (lease.lease_id, 20, [])
    assert 18 <= info.ttl <= 20 and info.header.revision > 0
    assert (await lease.time_to_live(keys=True)).keys == [b"l/1", b"l/2"]
    assert await lease.refresh() == 20
    assert lease in await client.leases()
    await lease.revoke()
    assert (await client.get(KeySet(b"l/", prefix=True))).kvs == []
    assert lease not in await client.leases()
    with pytest.raises(LeaseExpired):
        await lease.remaining()
    with pytest.raises(LeaseExpired):
        await lease.keys()
    with pytest.raises(LeaseExpired):
        await lease.time_to_live()
    with pytest.raises(LeaseExpired):
        await lease.refresh()
    with pytest.raises(LeaseNotFound):
        await lease.revoke()


@pytest_twisted.ensureDeferred
async def test_lease_with_chosen_id(client):
    lease = await client.lease(10, lease_id=0x1234abcd)
    assert lease.lease_id == 0x1234abcd
    await lease.revoke()


@pytest_twisted.ensureDeferred
async def test_lease_expires_and_deletes_keys(client):
    lease = await client.lease(1)
    await client.set(b"exp", b"x", lease=lease)
    for _ in range(60):
        if not (await client.get(b"exp")).kvs:
            break
        await sleep(0.1)
    assert (await client.get(b"exp")).kvs == []
    with pytest.raises(LeaseExpired):
        await lease.remaining()


@pytest_twisted.ensureDeferred
async def test_set_with_unknown_lease(client):
    with pytest.raises(LeaseNotFound):
        await client.set(b"k", b"v", lease=0x7777)
    assert (await client.get(b"k")).kvs == []


# -- a streaming endpoint's refusal inside HTTP 200 (the lease keep-alive) ----------------


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


# -- maintenance ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_maintenance(client, etcd):
    status = await client.status()
    assert status.db_size > 0 and status.raft_index > 0 and status.leader
    members = await client.members()
    assert len(members) == 1 and etcd.url in members[0].client_urls
    assert members[0].id == status.header.member_id
    assert await client.alarms() == []
    assert await client.defragment() is None


# -- bad input: typed errors, nothing sent -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_bad_input(client):
    with pytest.raises(TypeError, match="key"):
        client.set(42, b"v")
    with pytest.raises(TypeError, match="value"):
        client.set(b"k", 3.5)
    with pytest.raises(InvalidArgument, match="empty"):
        client.set(b"", b"v")
    with pytest.raises(InvalidArgument, match="empty"):
        client.get(b"")
    with pytest.raises(TypeError, match="key"):
        client.delete(None)
    with pytest.raises(InvalidArgument):
        client.lease(-1)
    with pytest.raises(InvalidArgument):
        client.lease(0)
    with pytest.raises(TypeError):
        client.lease("10")
    with pytest.raises(RequestTooLarge):
        client.set(b"big", b"x" * (1536 * 1024 + 1))
    with pytest.raises(TooManyOperations):
        Transaction(success=[OpSet(b"k%d" % i, b"v") for i in range(129)])
    with pytest.raises(InvalidArgument):
        client.get(b"k", sort_order="sideways")
    with pytest.raises(TypeError):
        client.submit([OpSet(b"k", b"v")])
    with pytest.raises(RequestTooLarge):
        client.submit(Transaction(success=[OpSet(b"k%d" % i, b"x" * 20000) for i in range(100)]))
    # Nothing reached etcd.
    assert (await client.get(KeySet(b"", prefix=True))).kvs == []


@pytest_twisted.ensureDeferred
async def test_server_side_limits_are_typed(client):
    # 128 operations is etcd's default limit: allowed.
    ops = [OpSet(b"m%03d" % i, b"v") for i in range(128)]
    await client.submit(Transaction(success=ops))
    assert (await client.get(KeySet(b"m", prefix=True), count_only=True)).count == 128
    # Just under the local limit but over the server's (it counts the whole request).
    with pytest.raises(RequestTooLarge):
        await client.set(b"big", b"x" * (1536 * 1024 - 10))
    assert (await client.get(b"big")).kvs == []
    # A value of 1 MiB is fine.
    await client.set(b"mib", b"y" * (1 << 20))
    assert len((await client.get(b"mib")).kvs[0].value) == 1 << 20


@pytest_twisted.ensureDeferred
async def test_member_specific_maintenance_asks_that_member_only(etcd_cluster, new_client):
    client = new_client(etcd_cluster.urls, timeout=3)
    for member in etcd_cluster.members:
        status = await client.status(endpoint=member.url)
        assert status.header.member_id == (await new_client(member.url).status()).header.member_id
    down = etcd_cluster.members[0]
    down.pause()  # accepts connections, answers nothing
    try:
        with pytest.raises(Timeout):
            await client.status(endpoint=down.url, timeout=1)
        with pytest.raises(Timeout):
            await client.defragment(endpoint=down.url, timeout=1)
    finally:
        down.resume()
    down.kill()  # refuses connections: unpinned calls go elsewhere, pinned ones do not
    with pytest.raises(Unavailable):
        await client.status(endpoint=down.url)
    with pytest.raises(Unavailable):
        await client.defragment(endpoint=down.url)
    assert (await client.status()).header.member_id != 0  # another member answers
    with pytest.raises(InvalidArgument, match="not one of this client's endpoints"):
        client.status(endpoint="http://127.0.0.1:1")


# -- bad options: refused when the client is made ----------------------------------------------


@pytest.mark.parametrize(("kwargs", "exc", "named"), [
    # timeout (per call, default): a number of seconds > 0, or None / infinity
    ({"timeout": -1}, InvalidArgument, "timeout"),
    ({"timeout": math.nan}, InvalidArgument, "timeout"),
    ({"timeout": 0}, InvalidArgument, "timeout"),
    ({"timeout": -math.inf}, InvalidArgument, "timeout"),
    ({"timeout": "5"}, TypeError, "timeout"),
    ({"timeout": True}, TypeError, "timeout"),
    # connect_timeout: Twisted's callLater asserted on a negative one (gone under -O),
    # 0 made every connect fail, None and infinity are no finite connect timeout
    ({"connect_timeout": -1}, InvalidArgument, "connect_timeout"),
    ({"connect_timeout": math.nan}, InvalidArgument, "connect_timeout"),
    ({"connect_timeout": 0}, InvalidArgument, "connect_timeout"),
    ({"connect_timeout": math.inf}, InvalidArgument, "connect_timeout"),
    ({"connect_timeout": None}, TypeError, "connect_timeout"),
    ({"connect_timeout": "5"}, TypeError, "connect_timeout"),
    # max_connections <= 0: every call waited for a connection until its timeout
    ({"max_connections": 0}, InvalidArgument, "max_connections"),
    ({"max_connections": -1}, InvalidArgument, "max_connections"),
    ({"max_connections": 1.5}, TypeError, "max_connections"),
    ({"max_connections": "64"}, TypeError, "max_connections"),
    ({"max_connections": None}, TypeError, "max_connections"),
    ({"max_request_bytes": 0}, InvalidArgument, "max_request_bytes"),
    ({"max_request_bytes": "1"}, TypeError, "max_request_bytes"),
    # attempt_timeout / health_check_interval: None turns them off; 0 would expire every
    # attempt at once (or check without pause)
    ({"attempt_timeout": 0}, InvalidArgument, "attempt_timeout"),
    ({"attempt_timeout": -2}, InvalidArgument, "attempt_timeout"),
    ({"attempt_timeout": math.nan}, InvalidArgument, "attempt_timeout"),
    ({"attempt_timeout": "2"}, TypeError, "attempt_timeout"),
    ({"health_check_interval": 0}, InvalidArgument, "health_check_interval"),
    ({"health_check_interval": -1}, InvalidArgument, "health_check_interval"),
    ({"health_check_interval": "1"}, TypeError, "health_check_interval"),
    ({"user": 5, "password": "x"}, TypeError, "user"),
    ({"user": "u", "password": b"x"}, TypeError, "password"),
    ({"user": "u"}, InvalidArgument, "password"),
])
@pytest.mark.parametrize("agent", [False, True], ids=["pool", "treq"])
def test_bad_options_are_refused(kwargs, exc, named, agent):
    if agent:
        kwargs = {**kwargs, "agent": Agent(reactor)}
    with pytest.raises(exc) as info:
        Client(reactor, "http://127.0.0.1:2379", **kwargs)
    assert type(info.value) is exc
    assert named in str(info.value)


@pytest.mark.parametrize(("url", "exc", "words"), [
    (None, TypeError, "url must be"),
    (5, TypeError, "url must be"),
    ([None], TypeError, "url must be"),
    ([], InvalidArgument, "at least one"),
    ("http://[::1", InvalidArgument, "not a valid URL"),  # urllib's bare ValueError before
    ("http://[::1]:2379/v3", InvalidArgument, "path"),
    ("ftp://127.0.0.1", InvalidArgument, "http://host:port"),
    ("127.0.0.1:2379", InvalidArgument, "http://host:port"),
    ("http://127.0.0.1:99999", InvalidArgument, "port"),
    (b"http://\xff", InvalidArgument, "ASCII"),
])
def test_bad_urls_are_refused(url, exc, words):
    with pytest.raises(exc) as info:
        Client(reactor, url)
    assert type(info.value) is exc
    assert words in str(info.value)


@pytest.mark.parametrize(("timeout", "expected"), [
    (None, None), (math.inf, None), (2, 2.0), (0.5, 0.5)])
@pytest_twisted.ensureDeferred
async def test_no_limit_and_finite_timeouts_are_taken(timeout, expected):
    client = Client(reactor, "http://[::1]:2379", timeout=timeout)
    assert client.timeout == expected
    await client.close()


# -- bad per-call timeouts: refused before anything is sent ------------------------------------

BAD_TIMEOUTS = [
    (-1, InvalidArgument), (-0.001, InvalidArgument), (math.nan, InvalidArgument),
    (0, InvalidArgument), (-math.inf, InvalidArgument),
    ("5", TypeError), (True, TypeError), ([1], TypeError),
]

CALLS = {
    # the fast paths (bytes key, no options) and the general ones
    "set": lambda c, t: c.set(b"k", b"v", timeout=t),
    "set(options)": lambda c, t: c.set("k", "v", return_previous=True, timeout=t),
    "get": lambda c, t: c.get(b"k", timeout=t),
    "get(range)": lambda c, t: c.get(KeySet(b"k", prefix=True), timeout=t),
    "delete": lambda c, t: c.delete(b"k", timeout=t),
    "submit": lambda c, t: c.submit(Transaction(success=[OpSet(b"k", b"v")]), timeout=t),
    "compact": lambda c, t: c.compact(1, timeout=t),
    "lease": lambda c, t: c.lease(10, timeout=t),
    "leases": lambda c, t: c.leases(timeout=t),
    "status": lambda c, t: c.status(timeout=t),
    "alarms": lambda c, t: c.alarms(timeout=t),
    "disarm": lambda c, t: c.disarm(Alarm(1, AlarmType.NOSPACE), timeout=t),
    "defragment": lambda c, t: c.defragment(timeout=t),
    "members": lambda c, t: c.members(timeout=t),
}


@pytest.mark.parametrize(("timeout", "exc"), BAD_TIMEOUTS)
@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
@pytest_twisted.ensureDeferred
async def test_bad_call_timeouts_are_refused_before_sending(pool_client, call, timeout, exc):
    with pytest.raises(exc, match="timeout"):
        call(pool_client, timeout)
    # Nothing was written, no lease granted (and the client still works).
    assert (await pool_client.get(KeySet(b"", prefix=True))).kvs == []
    assert await pool_client.leases() == []


LEASE_CALLS = {
    "refresh": lambda lease, t: lease.refresh(timeout=t),
    "remaining": lambda lease, t: lease.remaining(timeout=t),
    "keys": lambda lease, t: lease.keys(timeout=t),
    "revoke": lambda lease, t: lease.revoke(timeout=t),
}


@pytest.mark.parametrize("call", LEASE_CALLS.values(), ids=LEASE_CALLS.keys())
@pytest_twisted.ensureDeferred
async def test_bad_lease_call_timeouts_are_refused_before_sending(pool_client, call):
    lease = await pool_client.lease(30)
    try:
        for timeout, exc in BAD_TIMEOUTS:
            with pytest.raises(exc, match="timeout"):
                call(lease, timeout)
        assert lease in await pool_client.leases()  # not revoked
    finally:
        await lease.revoke()


@pytest.mark.parametrize(("ttl", "exc"), [
    (0, InvalidArgument), (-1, InvalidArgument), (9_000_000_001, InvalidArgument),
    ("10", TypeError), (1.5, TypeError), (True, TypeError), (None, TypeError)])
@pytest_twisted.ensureDeferred
async def test_bad_lease_ttls_are_refused_before_sending(pool_client, ttl, exc):
    with pytest.raises(exc, match="time_to_live"):
        pool_client.lease(ttl)
    assert await pool_client.leases() == []


@pytest_twisted.ensureDeferred
async def test_good_call_timeouts_are_taken(pool_client):
    await pool_client.set(b"k", b"v", timeout=math.inf)
    assert (await pool_client.get(b"k", timeout=None)).kvs[0].value == b"v"
    assert (await pool_client.delete(b"k", timeout=2)).deleted == 1
    lease = await pool_client.lease(9_000_000_000, timeout=5)  # etcd's longest TTL
    assert lease.ttl == 9_000_000_000
    await lease.revoke(timeout=math.inf)


# -- answers that are not etcd's ---------------------------------------------------------------

NOT_ETCD = [b"[]", b"null", b"{}", b'"ok"', b'{"header":null}', b"<html>ok</html>"]


@pytest.mark.parametrize("body", NOT_ETCD)
@pytest_twisted.ensureDeferred
async def test_answers_that_are_not_etcds_are_malformed(listen, new_client, body):
    # Whatever answers 200 with these is not etcd's gateway: every call says so, typed,
    # and is not retried (a MalformedAnswer is no Unavailable).
    gw = Scripted([http_answer(200, body)])
    client = new_client(listen(gw), timeout=5)
    calls = [
        lambda: client.get(b"k"), lambda: client.get(KeySet(b"k", prefix=True)),
        lambda: client.set(b"k", b"v"), lambda: client.delete(b"k"),
        lambda: client.submit(Transaction(success=[OpGet(b"k")])),
        lambda: client.compact(5), lambda: client.lease(10), lambda: client.leases(),
        lambda: client.status(), lambda: client.members(),
        lambda: Lease(client, 7).refresh(), lambda: Lease(client, 7).remaining(),
        lambda: Lease(client, 7).revoke(),
    ]
    for call in calls:
        with pytest.raises(MalformedAnswer) as info:
            await call()
        assert not isinstance(info.value, Unavailable)
    assert gw.requests == len(calls)  # one request each: nothing re-sent


@pytest.mark.parametrize("body", [b"[]", b"null", b'"ok"'])
@pytest_twisted.ensureDeferred
async def test_headerless_answers_must_still_be_objects(listen, new_client, body):
    # etcd answers a defragment with {} (3.4 and 3.5) and 3.4 an alarm with no header:
    # those are taken, but not what is no JSON object at all.
    gw = Scripted([http_answer(200, b"{}"), http_answer(200, b"{}"), http_answer(200, body)])
    client = new_client(listen(gw), timeout=5)
    assert await client.defragment() is None
    assert await client.alarms() == []
    with pytest.raises(MalformedAnswer):
        await client.alarms()
    with pytest.raises(MalformedAnswer):
        await client.defragment()

