"""Watch throughput and delay: how fast events reach a callback while a writer puts flat out.

    python benchmarks/watch.py [--url URL] [--duration S] [--in-flight N]

Without --url an embedded etcd is started (coord.server.EtcdServer) and stopped after.
A writer keeps N puts in flight under one prefix for the duration; a watch on the prefix
counts events.  Reported: puts/s acknowledged, events/s delivered, the delay from a put's
reply to its event (p50/p99; negative when the event beat the reply, counted as 0), and
the largest backlog (puts acknowledged but not yet seen as events) -- it must stay bounded.
"""

from __future__ import annotations

import argparse
import time

from _stats import percentile
from twisted.internet import defer, task

from coord import Client, KeySet


async def run(reactor, url: str, duration: float, in_flight: int) -> None:
    writer = Client(reactor, url)
    watcher = Client(reactor, url)
    replied: dict[int, float] = {}
    delays: list[float] = []
    state = {"events": 0, "puts": 0, "backlog": 0, "stop": False}

    def on_change(event) -> None:
        state["events"] += 1
        t = replied.pop(event.revision, None)
        if t is not None:
            delays.append(max(0.0, time.perf_counter() - t))
        else:
            replied[event.revision] = -1.0  # the event beat the reply

    d = watcher.watch(KeySet(b"bench/watch/", prefix=True), on_change)
    await d.watcher.ready

    def put(i: int) -> None:
        if state["stop"]:
            return
        key = b"bench/watch/%d" % (i % 1000)
        writer.set(key, b"x" * 64).addCallback(done, i)

    def done(rev, i: int) -> None:
        state["puts"] += 1
        if replied.pop(rev.revision, None) == -1.0:
            delays.append(0.0)
        else:
            replied[rev.revision] = time.perf_counter()
        state["backlog"] = max(state["backlog"], state["puts"] - state["events"])
        put(i + in_flight)

    start = time.perf_counter()
    for i in range(in_flight):
        put(i)
    await task.deferLater(reactor, duration, lambda: None)
    state["stop"] = True
    elapsed = time.perf_counter() - start
    await task.deferLater(reactor, 1.0, lambda: None)  # let the last events arrive
    d.cancel()
    print(f"etcd at {url}, {duration:.0f} s, {in_flight} puts in flight")
    print(f"  puts acknowledged  {state['puts'] / elapsed:10.0f} /s")
    print(f"  events delivered   {state['events'] / elapsed:10.0f} /s")
    print(f"  delay reply->event p50 {percentile(delays, 0.5) * 1000:.2f} ms, "
          f"p99 {percentile(delays, 0.99) * 1000:.2f} ms")
    print(f"  largest backlog    {state['backlog']} events; "
          f"missing at end {state['puts'] - state['events']}")
    await writer.close()
    await watcher.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--in-flight", type=int, default=32)
    args = parser.parse_args()
    server = None
    url = args.url
    if url is None:
        from coord.server import EtcdServer

        server = EtcdServer().start()
        url = server.url
    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(
            run(reactor, url, args.duration, args.in_flight)))
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
