"""Barrier wake-up and DoubleBarrier enter latency, across processes.

    python benchmarks/barrier.py [--url URL] [--rounds R] [--waiters 10,50] [--parties 10]

Without --url an embedded etcd is started (coord.server.EtcdServer; $COORD_ETCD picks
the binary) and stopped after.  Every process has its own client; times are
``time.time()`` on this one machine, written by each process and read by the parent.

* barrier wake-up: N waiter processes (10 and 50 by default) each call
  ``Barrier(client, name).wait()`` on a held barrier; the parent releases it.  Reported:
  the delay from the parent's ``release()`` call to each waiter's return, p50/p99 over
  all waiters and rounds, and p50 of the last waiter of each round.  Side by side, the
  reference: the same waiters with a bare ``client.watch`` on the key's deletion (no
  read, no recipe), and the ratio.
* double barrier enter: P processes (10 by default); P - 1 enter and wait, then the
  last enters.  Reported: the delay from the last entrant's ``enter()`` call to each
  participant's return (p50/p99 over all, p50 of each round's slowest).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import time
import urllib.request

from _stats import percentile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = b"bench/barrier"
PHASE = b"bench/phase"


# -- workers (run in their own processes; one line per round on stdin and stdout) ------------


def waiter(kind: str, url: str) -> None:
    from twisted.internet import defer, task, threads

    from coord import Client
    from coord.recipes import Barrier

    async def main(reactor) -> None:
        client = Client(reactor, url)
        await client.get(NAME)  # connections open before the first round
        print("ready", flush=True)
        while (await threads.deferToThread(sys.stdin.readline)).strip() == "go":
            if kind == "recipe":
                d = Barrier(client, NAME).wait(timeout=60)
            else:  # the reference: a bare watch for the key's deletion
                d = defer.Deferred()

                def on_change(event, d=d):
                    if not d.called:
                        d.callback(None)

                w = client.watch(NAME, on_change, filters=["noput"])
            await task.deferLater(reactor, 0.2, lambda: None)  # (its watch is created)
            print("waiting", flush=True)
            await d
            woken = time.time()
            if kind != "recipe":
                w.cancel()
            print(json.dumps({"woken": woken}), flush=True)
        await client.close()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


def party(url: str, count: int) -> None:
    from twisted.internet import defer, task, threads

    from coord import Client
    from coord.recipes import DoubleBarrier, Session

    async def main(reactor) -> None:
        client = Client(reactor, url)
        session = await Session.create(client, ttl=10)
        barrier = DoubleBarrier(session, PHASE, count)
        print("ready", flush=True)
        while (await threads.deferToThread(sys.stdin.readline)).strip() == "go":
            called = time.time()
            await barrier.enter(timeout=60)
            entered = time.time()
            print(json.dumps({"called": called, "entered": entered}), flush=True)
            await threads.deferToThread(sys.stdin.readline)  # "leave"
            await barrier.leave(timeout=60)
            print("left", flush=True)
        await session.close()
        await client.close()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


# -- the parent -----------------------------------------------------------------------------


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, "--worker", *args], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def expect(proc: subprocess.Popen[str], word: str | None = None) -> str:
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if not line:
        raise SystemExit(f"a worker exited ({proc.wait()})")
    if word is not None and line.strip() != word:
        raise SystemExit(f"a worker said {line!r}, not {word!r}")
    return line


def tell(procs: list[subprocess.Popen[str]], line: str) -> None:
    for p in procs:
        p.stdin.write(line + "\n")  # type: ignore[union-attr]
        p.stdin.flush()  # type: ignore[union-attr]


def stop(procs: list[subprocess.Popen[str]]) -> None:
    tell(procs, "stop")
    for p in procs:
        p.communicate(timeout=60)


def call(url: str, path: str, body: dict) -> dict:
    """One gateway call from the parent (plain HTTP: the parent runs no reactor, so the
    release is a bare delete, as ``Barrier.release()`` sends)."""
    with urllib.request.urlopen(urllib.request.Request(
            url + path, json.dumps(body).encode(), method="POST"), timeout=10) as r:
        return json.load(r)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def barrier_run(url: str, kind: str, n: int, rounds: int) -> tuple[list[float], list[float]]:
    """All wake-up delays (ms) and each round's slowest."""
    procs = [spawn("waiter", kind, url) for _ in range(n)]
    delays: list[float] = []
    slowest: list[float] = []
    try:
        for p in procs:
            expect(p, "ready")
        for _ in range(rounds):
            call(url, "/v3/kv/put", {"key": b64(NAME), "value": ""})  # held
            tell(procs, "go")
            for p in procs:
                expect(p, "waiting")
            time.sleep(0.1)
            released = time.time()
            call(url, "/v3/kv/deleterange", {"key": b64(NAME)})
            woken = [json.loads(expect(p))["woken"] for p in procs]
            ms = [(w - released) * 1000 for w in woken]
            delays.extend(ms)
            slowest.append(max(ms))
    finally:
        stop(procs)
    return delays, slowest


def double_run(url: str, n: int, rounds: int) -> tuple[list[float], list[float]]:
    procs = [spawn("party", url, str(n)) for _ in range(n)]
    prefix = PHASE + b"/waiters/"
    end = prefix[:-1] + b"0"  # (the prefix's range end: "/" + 1)
    delays: list[float] = []
    slowest: list[float] = []
    try:
        for p in procs:
            expect(p, "ready")
        for _ in range(rounds):
            tell(procs[:-1], "go")
            while int(call(url, "/v3/kv/range", {"key": b64(prefix), "range_end": b64(end),
                                                 "count_only": True}).get("count", 0)) < n - 1:
                time.sleep(0.01)
            time.sleep(0.2)
            tell(procs[-1:], "go")
            got = [json.loads(expect(p)) for p in procs]
            last = got[-1]["called"]
            ms = [(g["entered"] - last) * 1000 for g in got]
            delays.extend(ms)
            slowest.append(max(ms))
            tell(procs, "leave")
            for p in procs:
                expect(p, "left")
    finally:
        stop(procs)
    return delays, slowest


def line(label: str, delays: list[float], slowest: list[float]) -> str:
    return (f"{label:<46} p50 {percentile(delays, 0.5):7.2f} ms  p99 "
            f"{percentile(delays, 0.99):7.2f} ms  slowest/round p50 "
            f"{percentile(slowest, 0.5):7.2f} ms")


def measure(url: str, rounds: int, waiters: list[int], parties: int) -> None:
    with urllib.request.urlopen(urllib.request.Request(
            url + "/v3/maintenance/status", b"{}", method="POST"), timeout=5) as r:
        version = json.load(r)["version"]
    print(f"etcd {version} at {url}, {rounds} rounds each, {os.cpu_count()} CPUs", flush=True)
    for n in waiters:
        recipe = barrier_run(url, "recipe", n, rounds)
        bare = barrier_run(url, "watch", n, rounds)
        print(line(f"Barrier.wait, {n} waiter processes", *recipe), flush=True)
        print(line(f"  reference: bare client.watch, {n} processes", *bare), flush=True)
        print(f"  ratio recipe/reference: p50 "
              f"{percentile(recipe[0], 0.5) / percentile(bare[0], 0.5):.2f}  p99 "
              f"{percentile(recipe[0], 0.99) / percentile(bare[0], 0.99):.2f}", flush=True)
    if parties > 1:
        print(line(f"DoubleBarrier.enter, {parties} processes",
                   *double_run(url, parties, rounds)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--waiters", default="10,50",
                        help="comma-separated waiter process counts")
    parser.add_argument("--parties", type=int, default=10)
    args = parser.parse_args()
    waiters = [int(x) for x in args.waiters.split(",") if x]
    if args.url:
        measure(args.url, args.rounds, waiters, args.parties)
    else:
        from coord.server import EtcdServer

        with EtcdServer() as server:
            measure(server.url, args.rounds, waiters, args.parties)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        if sys.argv[2] == "waiter":
            waiter(sys.argv[3], sys.argv[4])
        else:
            party(sys.argv[3], int(sys.argv[4]))
    else:
        main()
