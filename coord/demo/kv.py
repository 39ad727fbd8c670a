"""`coord demo --kv`: the KV client at work against a real etcd, end to end, in a few seconds.

It reads the member's status, writes config-like keys and reads them back by prefix,
does a compare-and-swap transaction that succeeds and one that fails, attaches a key
to a lease and revokes the lease, compacts history and reads a compacted revision.
Every step is checked; the first check that does not hold ends the demo with exit
status 1.  On success the last line is ``demo ok: N checks passed``.

Everything it writes is under the prefix ``coord-demo/`` and deleted at the end, but
the compaction discards the history (older revisions) of the *whole* keyspace up to
the demo's own writes: point ``--url`` at a scratch etcd, or leave it out to run an
embedded one (`coord.server.EtcdServer` on free loopback ports, stopped at the end).
"""

from __future__ import annotations

import sys
import time
import traceback
from typing import Any

from twisted.internet.task import react

from coord import (
    Client,
    Compacted,
    CompModified,
    CoordError,
    Failed,
    KeySet,
    LeaseExpired,
    OpGet,
    OpSet,
    Transaction,
)
from coord.demo import CheckFailed, Checks

__all__ = ["run", "run_at"]

PREFIX = b"coord-demo/"

CONFIG = {
    b"config/app/db_host": b"db.internal",
    b"config/app/db_port": b"5432",
    b"config/app/workers": b"8",
    b"config/app/feature_x": b"off",
}


def _show(kv: Any) -> str:
    return f"{kv.key.decode()} = {kv.value.decode()!r} (mod_revision {kv.mod_revision})"


async def _status(etcd: Client, check: Checks) -> None:
    print("status")
    status = await etcd.status()
    print(f"  etcd {status.version}, member {status.header.member_id:x}, "
          f"leader {status.leader:x}, revision {status.header.revision}")
    check(status.version.startswith("3."), "the server speaks etcd v3")
    check(status.leader != 0, "the cluster has a leader")


async def _config(etcd: Client, check: Checks) -> None:
    print("write config keys, read them back by prefix")
    revisions = []
    for key, value in CONFIG.items():
        written = await etcd.set(PREFIX + key, value)
        revisions.append(written.revision)
        print(f"  set {(PREFIX + key).decode()} = {value.decode()!r} "
              f"at revision {written.revision}")
    check(revisions == sorted(set(revisions)), "each write got a new, higher revision")

    result = await etcd.get(KeySet(PREFIX + b"config/app/", prefix=True))
    for kv in result.kvs:
        print(f"  got {_show(kv)}")
    expected = {PREFIX + key: value for key, value in CONFIG.items()}
    check({kv.key: kv.value for kv in result.kvs} == expected,
          f"a prefix read returns exactly the {len(CONFIG)} keys written")
    check([kv.key for kv in result.kvs] == sorted(expected), "keys come back in key order")

    page = await etcd.get(KeySet(PREFIX + b"config/app/", prefix=True), limit=2)
    print(f"  limit=2: {len(page.kvs)} keys, count {page.count}, more={page.more}")
    check(len(page.kvs) == 2 and page.more and page.count == len(CONFIG),
          "a limited read says more keys remain")


async def _compare_and_swap(etcd: Client, check: Checks) -> None:
    print("compare-and-swap transactions")
    key = PREFIX + b"config/app/workers"
    current = (await etcd.get(key)).kvs[0]
    print(f"  read {_show(current)}")
    # Write only if nobody changed the key since we read it.
    txn = Transaction(
        compare=[CompModified(key, "==", current.mod_revision)],
        success=[OpSet(key, b"16")],
        failure=[OpGet(key)],
    )
    result = await etcd.submit(txn)
    print(f"  mod_revision == {current.mod_revision}: succeeded, "
          f"written at revision {result.header.revision}")
    check(result.succeeded, "the transaction succeeds while the key is unchanged")
    check((await etcd.get(key)).kvs[0].value == b"16", "its write is visible")

    try:
        await etcd.submit(txn)  # the same comparison again: the key has changed since
    except Failed as failed:
        now = failed.responses[0].kvs[0]
        print(f"  mod_revision == {current.mod_revision} again: Failed; the failure branch "
              f"read {_show(now)}")
        check(now.value == b"16", "a stale compare-and-swap raises Failed, writes nothing")
    else:
        check(False, "a stale compare-and-swap raises Failed")


async def _lease(etcd: Client, check: Checks) -> None:
    print("lease")
    lease = await etcd.lease(10)
    key = PREFIX + b"members/worker-1"
    await etcd.set(key, b"alive", lease=lease)
    print(f"  granted {lease}; set {key.decode()} with it")
    check(await lease.keys() == [key], "the lease lists the key attached to it")
    check((await etcd.get(key)).kvs[0].lease == lease.lease_id, "the key names its lease")
    remaining = await lease.remaining()
    print(f"  {remaining} s remaining; revoking")
    await lease.revoke()
    check((await etcd.get(key)).kvs == [], "revoking the lease deleted the key")
    try:
        await lease.remaining()
    except LeaseExpired:
        check(True, "a revoked lease raises LeaseExpired")
    else:
        check(False, "a revoked lease raises LeaseExpired")


async def _compaction(etcd: Client, check: Checks) -> None:
    print("history and compaction")
    key = PREFIX + b"counter"
    revisions = [(await etcd.set(key, str(n))).revision for n in (1, 2, 3)]
    old = await etcd.get(key, revision=revisions[0])
    print(f"  set {key.decode()} to 1, 2, 3 at revisions {revisions}; "
          f"as of {revisions[0]}: {old.kvs[0].value!r}")
    check(old.kvs[0].value == b"1", "an old revision can be read")
    await etcd.compact(revisions[-1])
    print(f"  compacted at revision {revisions[-1]}")
    try:
        await etcd.get(key, revision=revisions[0])
    except Compacted as e:
        print(f"  read as of {revisions[0]}: Compacted: {e}")
        check(True, "reading a compacted revision raises Compacted")
    else:
        check(False, "reading a compacted revision raises Compacted")
    now = await etcd.get(key, revision=revisions[-1])
    check(now.kvs[0].value == b"3", "the compaction revision itself is still readable")


async def _cleanup(etcd: Client, check: Checks) -> None:
    print("clean up")
    deleted = await etcd.delete(KeySet(PREFIX, prefix=True))
    print(f"  deleted {deleted.deleted} keys under {PREFIX.decode()}")
    left = await etcd.get(KeySet(PREFIX, prefix=True), count_only=True)
    check(deleted.deleted == len(CONFIG) + 1 and left.count == 0,
          f"the demo's {len(CONFIG) + 1} keys are gone")


async def run(reactor: Any, url: str) -> None:
    """The demo proper, run by `react`; raises SystemExit(1) when a check fails."""
    started = time.monotonic()
    check = Checks()
    etcd = Client(reactor, url, timeout=10)
    print(f"coord demo against {url}")
    try:
        await etcd.delete(KeySet(PREFIX, prefix=True))  # leftovers of an interrupted run
        for step in (_status, _config, _compare_and_swap, _lease, _compaction, _cleanup):
            await step(etcd, check)
    except CheckFailed as e:
        print(f"demo FAILED: check did not hold: {e}", file=sys.stderr)
        raise SystemExit(1)
    except CoordError as e:
        print(f"demo FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(1)
    except Exception:
        traceback.print_exc()  # a bug, in coord or in the demo: show where
        print("demo FAILED: unexpected error", file=sys.stderr)
        raise SystemExit(1)
    finally:
        await etcd.close()
    elapsed_ms = (time.monotonic() - started) * 1000
    print(f"demo ok: {check.passed} checks passed ({elapsed_ms:.0f} ms)")


def run_at(url: str) -> int:
    """Run the walk-through against ``url`` on the reactor.

    Returns:
        The exit status: 0 when every check held, 1 otherwise.
    """
    try:
        react(run, (url,))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0  # pragma: no cover - react always exits
