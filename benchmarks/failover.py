"""A hung member: what a client sees while its preferred etcd member is frozen (SIGSTOP).

    python benchmarks/failover.py [--freeze 10] [--readers 4] [--attempt-timeout 2]
                                  [--transports pool,treq] [--roles follower,leader]
                                  [--modes on,off]

A 3-member cluster is started (coord.server.EtcdCluster; $COORD_ETCD picks the binary).
Each round makes a client with every endpoint, the frozen-to-be member first (so it is
the preferred one: a follower, or the leader), and runs, all at once:

* ``--readers`` readers, each reading one key in a loop, one call after another;
* one writer, putting one key in a loop (a write that times out on the frozen member is
  reported, as it must be, as WriteTimeout: its outcome is unknown);
* a Session of TTL 5 s holding a Lock, whose ``lost`` is watched;
* a watch of a prefix, fed by a second client on the two other members with one put
  every 50 ms; the delay of each event (its put's answer to its arrival) is noted, and
  when the watch's stream was created again after the freeze began ("watch moved").

One second in, the member is frozen for ``--freeze`` seconds, then resumed; the round
goes on 3 s more.  Reported per round, over the freeze and the 3 s after it: calls and
the share that failed, the longest gap between two successful calls (per caller),
whether the session and the lock were kept (and if not, why), when the watch moved, its
longest event delay, and events lost or delivered twice.  Mode ``off`` is the same
client with ``attempt_timeout=None, health_check_interval=None`` (how coord behaved
before attempt deadlines): the comparison in one run.

A frozen *leader* can cost the session although every keep-alive was answered: etcd
3.5.0-3.5.10 and 3.4.0-3.4.27 let the old leader, once it runs again, revoke the leases
that expired by its own clock before it notices it lost the leadership (etcd issues
12528 and 15247, fixed by etcd pull request 16822).  The session then reports it
(``SessionLost``), which is all a client can do.
"""

from __future__ import annotations

import argparse
import sys
import time

from twisted.internet import defer, task

ROOT_HINT = "run from the repository root: python benchmarks/failover.py"


async def sleep(reactor, seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


class Caller:
    """Counts one loop's calls, failures and the longest gap between two successes."""

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self.calls = self.failed = self.unknown = 0
        self.gap = 0.0
        self.last_ok: float | None = None
        self.counting = False

    def start(self) -> None:
        self.counting = True
        self.last_ok = self.reactor.seconds()

    def ok(self) -> None:
        now = self.reactor.seconds()
        if self.counting:
            self.calls += 1
            if self.last_ok is not None:
                self.gap = max(self.gap, now - self.last_ok)
        self.last_ok = now

    def fail(self, exc: Exception) -> None:
        from coord import OutcomeUnknown

        if self.counting:
            self.calls += 1
            self.failed += 1
            self.unknown += isinstance(exc, OutcomeUnknown)


async def round_(reactor, cluster, transport: str, role: str, mode: str, args) -> dict:
    from twisted.web.client import Agent, HTTPConnectionPool

    from coord import Client, KeySet
    from coord.recipes import Lock, Session

    leader = cluster.wait_for_leader()
    first = leader if role == "leader" else next(m for m in cluster.members if m is not leader)
    members = [first] + [m for m in cluster.members if m is not first]
    options: dict = {"timeout": 10.0}
    if mode == "on":
        options["attempt_timeout"] = args.attempt_timeout
    else:
        options.update(attempt_timeout=None, health_check_interval=None)
    if transport == "treq":
        options["agent"] = Agent(reactor, pool=HTTPConnectionPool(reactor))
    client = Client(reactor, [m.url for m in members], **options)
    feeder = Client(reactor, [m.url for m in members[1:]], timeout=10.0)
    await client.set(b"bench/k", b"v")
    session = await Session.create(client, ttl=5)
    lock = Lock(session, b"bench/lock")
    await lock.acquire(timeout=10)
    lost = lock.lost
    session_lost = session.lost

    readers = [Caller(reactor) for _ in range(args.readers)]
    writer = Caller(reactor)
    running = True

    async def read_loop(c: Caller) -> None:
        while running:
            try:
                await client.get(b"bench/k")
                c.ok()
            except Exception as e:
                c.fail(e)

    async def write_loop(c: Caller) -> None:
        n = 0
        while running:
            n += 1
            try:
                await client.set(b"bench/w", b"%d" % n)
                c.ok()
            except Exception as e:
                c.fail(e)

    put_at: dict[bytes, float] = {}
    delays: list[float] = []
    seen: list[bytes] = []

    def on_event(event) -> None:
        seen.append(event.kv.key)
        at = put_at.get(event.kv.key)
        if at is not None and counting_watch[0]:
            delays.append(reactor.seconds() - at)

    counting_watch = [False]
    watch = client.watch(KeySet(b"bench/feed/", prefix=True), on_event)
    await watch.watcher.ready

    written: list[bytes] = []

    async def feed_loop() -> None:
        n = 0
        while running:
            n += 1
            key = b"bench/feed/%06d" % n
            try:
                await feeder.set(key, b"x")
                put_at[key] = reactor.seconds()
                written.append(key)
            except Exception:
                pass  # a put during the election; it may still show up (checked below)
            await sleep(reactor, 0.05)

    moved: list[float] = []

    async def watch_moves() -> None:
        # when the watch's stream was created again after the freeze (Watcher.reconnects)
        before = watch.watcher.reconnects
        frozen_at = reactor.seconds()
        while running and not moved:
            if watch.watcher.reconnects > before:
                moved.append(reactor.seconds() - frozen_at)
            await sleep(reactor, 0.01)

    loops = [defer.ensureDeferred(read_loop(c)) for c in readers]
    loops.append(defer.ensureDeferred(write_loop(writer)))
    loops.append(defer.ensureDeferred(feed_loop()))
    await sleep(reactor, 1.0)
    for c in [*readers, writer]:
        c.start()
    counting_watch[0] = True
    first.pause()
    loops.append(defer.ensureDeferred(watch_moves()))
    try:
        await sleep(reactor, args.freeze)
    finally:
        first.resume()
    await sleep(reactor, 3.0)
    running = False
    await defer.DeferredList(loops)
    await sleep(reactor, 1.0)
    stored = (await feeder.get(KeySet(b"bench/feed/", prefix=True), keys_only=True)).kvs
    truth = [kv.key for kv in stored]
    result = {
        "transport": transport, "role": role, "mode": mode,
        "reads": sum(c.calls for c in readers),
        "reads_failed": sum(c.failed for c in readers),
        "read_gap": max(c.gap for c in readers),
        "writes": writer.calls, "writes_failed": writer.failed, "writes_unknown": writer.unknown,
        "write_gap": writer.gap,
        "session_kept": not session_lost.called, "lock_kept": not lost.called,
        "why_lost": session.reason if session_lost.called else
        (lost.result if lost.called else None),
        "watch_delay": max(delays) if delays else float("nan"),
        "watch_moved": moved[0] if moved else float("nan"),
        "events_lost": len(set(truth) - set(seen)),
        "events_twice": len(seen) - len(set(seen)),
    }
    watch.cancel()
    try:
        await lock.release()
    except Exception:
        pass
    await session.close()
    await client.delete(KeySet(b"bench/", prefix=True))
    await client.close()
    await feeder.close()
    return result


def report(rows: list[dict]) -> None:
    head = ("transport", "frozen", "mode", "reads", "failed", "read gap", "writes", "failed",
            "write gap", "session", "lock", "watch moved", "event delay", "lost/twice")
    lines = [head]
    for r in rows:
        lines.append((
            r["transport"], r["role"], r["mode"], str(r["reads"]),
            f"{100 * r['reads_failed'] / max(r['reads'], 1):.1f}%", f"{r['read_gap']:.2f} s",
            str(r["writes"]), f"{r['writes_failed']} ({r['writes_unknown']} unknown)",
            f"{r['write_gap']:.2f} s", "kept" if r["session_kept"] else "LOST",
            "kept" if r["lock_kept"] else "LOST",
            "no" if r["watch_moved"] != r["watch_moved"] else f"{r['watch_moved']:.2f} s",
            f"{r['watch_delay']:.2f} s",
            f"{r['events_lost']}/{r['events_twice']}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--freeze", type=float, default=10.0, help="seconds frozen (10)")
    parser.add_argument("--readers", type=int, default=4, help="concurrent readers (4)")
    parser.add_argument("--attempt-timeout", type=float, default=2.0,
                        help="the client's attempt_timeout in mode 'on' (2)")
    parser.add_argument("--transports", default="pool,treq")
    parser.add_argument("--roles", default="follower,leader")
    parser.add_argument("--modes", default="on,off")
    args = parser.parse_args(argv)

    from coord.server import EtcdCluster

    rows: list[dict] = []

    async def run(reactor) -> None:
        with EtcdCluster(3) as cluster:
            print(f"etcd {cluster.members[0].version}, freeze {args.freeze} s, "
                  f"attempt_timeout {args.attempt_timeout} s", flush=True)
            for transport in args.transports.split(","):
                for role in args.roles.split(","):
                    for mode in args.modes.split(","):
                        started = time.monotonic()
                        row = await round_(reactor, cluster, transport, role, mode, args)
                        rows.append(row)
                        print(f"  {transport} {role} {mode}: done in "
                              f"{time.monotonic() - started:.0f} s", flush=True)
                        cluster.restore()
        report(rows)
        for r in rows:
            if r["why_lost"] is not None:
                print(f"{r['transport']} {r['role']} {r['mode']}: {r['why_lost']}")

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


if __name__ == "__main__":
    sys.exit(main())
