"""Queue throughput (put to ack) and handoff delay, next to a bare put + watch floor.

    python benchmarks/work_queue.py [--url URL] [--duration S] [--interval MS]

(Not ``queue.py``: a script's directory comes first on ``sys.path``, and a file named
queue.py there would hide the standard library's ``queue`` from Twisted.)

Without --url an embedded etcd is started (coord.server.EtcdServer; $COORD_ETCD picks
the binary) and stopped after.  Each measurement runs in fresh processes: one producer
process and C consumer processes, each with its own client (and session).  Every value
carries the producer's CLOCK_MONOTONIC time before its put was sent (one clock for all
processes of the machine).

* throughput (C = 1 and 4): the producer puts flat out (4 puts in flight) for
  --duration seconds; each consumer loops ``item = get(); item.ack()``.  Reported:
  items acked per second during the window, and the put-to-ack delay p50/p99.
* handoff (C = 4, all waiting): the producer puts one item every --interval ms, one at
  a time; reported: the put-to-``get()``-returning delay p50/p99 in the consumer that
  got it.

The reference, side by side: the same producer, and consumers that watch the items'
prefix with a bare ``client.watch`` (no claim, no turn, no session) and delete each
item they see, one after another -- what a handoff costs with one put, one watch event
and one delete: the floor under the recipe (which adds a claim transaction and, among
several consumers, the turn's handover).  It runs with one consumer: more would each
take every item (a bare watch has no way to share them out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _stats import percentile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = b"bench/queue"


# -- workers (run in their own processes) ---------------------------------------------------


def producer(url: str, start: float, duration: float, interval: float) -> None:
    from twisted.internet import defer, task

    from coord import Client
    from coord.recipes import Queue

    async def main(reactor) -> None:
        client = Client(reactor, url)
        queue = Queue(client, NAME)
        await client.get(b"warm-up")
        await task.deferLater(reactor, max(0.0, start - time.monotonic()), lambda: None)
        end = start + duration
        puts = [0]

        async def loop() -> None:
            while time.monotonic() < end:
                await queue.put(b"%.6f" % time.monotonic())
                puts[0] += 1
                if interval:
                    await task.deferLater(reactor, interval, lambda: None)

        await defer.gatherResults([defer.ensureDeferred(loop())
                                   for _ in range(1 if interval else 4)])
        print(json.dumps({"puts": puts[0]}), flush=True)
        await client.close()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


def consumer(kind: str, url: str) -> None:
    """Take items until killed; print ``put got acked`` times per item, as it goes."""
    from twisted.internet import defer, task

    from coord import Client, KeySet, Timeout
    from coord.recipes import Queue, Session

    def record(put: bytes, got: float) -> None:
        print(put.decode(), got, time.monotonic(), flush=True)

    async def main(reactor) -> None:
        client = Client(reactor, url)
        if kind == "queue":
            session = await Session.create(client, ttl=10)
            queue = Queue(client, NAME)
            await queue.start()  # its view loaded: the first get is not slower
            print("ready", flush=True)
            while True:
                try:
                    item = await queue.get(session, timeout=5)
                except Timeout:
                    continue
                got = time.monotonic()
                await item.ack()
                record(item.value, got)
        else:
            events: defer.DeferredQueue = defer.DeferredQueue()
            watch = client.watch(KeySet(NAME + b"/items/", prefix=True),
                                 lambda e: events.put((e, time.monotonic())),
                                 filters=["nodelete"])
            await watch.watcher.ready
            print("ready", flush=True)
            while True:
                event, got = await events.get()
                await client.delete(event.kv.key)
                record(event.kv.value, got)

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


# -- the parent -----------------------------------------------------------------------------


def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--worker", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)


def clear(url: str) -> None:
    """Delete every key under NAME/ (items left over, and the waiter keys and claims of
    the consumers just terminated, whose leases live on for their TTL)."""
    import base64
    import urllib.request

    prefix = NAME + b"/"
    body = json.dumps({"key": base64.b64encode(prefix).decode(),
                       "range_end": base64.b64encode(prefix[:-1] + b"0").decode()})
    urllib.request.urlopen(urllib.request.Request(url + "/v3/kv/deleterange",
                                                  body.encode(), method="POST"), timeout=5)


def run(kind: str, consumers: int, url: str, duration: float, interval: float
        ) -> tuple[float, list[tuple[float, float, float]]]:
    """Run one measurement; the window's start and every consumer's records."""
    clear(url)
    procs = [spawn("consumer", kind, url) for _ in range(consumers)]
    try:
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline() != "ready\n":
                raise SystemExit("a consumer failed to start")
        start = time.monotonic() + 1.0
        maker = spawn("producer", url, str(start), str(duration), str(interval))
        maker.communicate(timeout=duration + 60)
        if maker.returncode != 0:
            raise SystemExit(f"the producer failed ({maker.returncode})")
        time.sleep(0.5)  # the last handoffs
    finally:
        for p in procs:
            p.kill()  # (its records are printed as it goes)
    records = []
    for p in procs:
        out, _ = p.communicate(timeout=30)
        records.extend(tuple(map(float, line.split())) for line in out.splitlines()
                       if len(line.split()) == 3)
    return start, records  # type: ignore[return-value]


def throughput(label: str, kind: str, consumers: int, url: str, duration: float) -> None:
    start, records = run(kind, consumers, url, duration, 0.0)
    acked = [r for r in records if start <= r[2] <= start + duration]
    delays = [(r[2] - r[0]) * 1000 for r in acked]
    print(f"{label:<40} {len(acked) / duration:8.0f} items/s   put to ack p50 "
          f"{percentile(delays, 0.5):7.1f} ms  p99 {percentile(delays, 0.99):7.1f} ms",
          flush=True)


def handoff(label: str, kind: str, consumers: int, url: str, duration: float,
            interval: float) -> None:
    _, records = run(kind, consumers, url, duration, interval)
    delays = [(r[1] - r[0]) * 1000 for r in records]
    print(f"{label:<40} {len(records):8d} items     put to get  p50 "
          f"{percentile(delays, 0.5):7.2f} ms  p99 {percentile(delays, 0.99):7.2f} ms",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--interval", type=float, default=20.0, help="ms between puts "
                        "in the handoff measurement")
    args = parser.parse_args()
    interval = args.interval / 1000

    def measure(url: str) -> None:
        import urllib.request

        with urllib.request.urlopen(urllib.request.Request(
                url + "/v3/maintenance/status", b"{}", method="POST"), timeout=5) as r:
            version = json.load(r)["version"]
        print(f"etcd {version} at {url}, {args.duration:.0f} s per measurement, "
              f"{os.cpu_count()} CPUs")
        throughput("reference: put + watch + delete, 1", "watch", 1, url, args.duration)
        throughput("Queue, 1 consumer", "queue", 1, url, args.duration)
        throughput("Queue, 4 consumers (processes)", "queue", 4, url, args.duration)
        handoff("reference: put + watch, 1 watching", "watch", 1, url, args.duration,
                interval)
        handoff("Queue, 4 consumers waiting", "queue", 4, url, args.duration, interval)

    if args.url:
        measure(args.url)
    else:
        from coord.server import EtcdServer

        with EtcdServer() as server:
            measure(server.url)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        if sys.argv[2] == "producer":
            producer(sys.argv[3], float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]))
        else:
            consumer(sys.argv[3], sys.argv[4])
    else:
        main()
