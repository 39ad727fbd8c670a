"""ConfigWatcher: how long loading a large config prefix takes, and memory per key.

    python benchmarks/config.py [--url URL] [--keys 10000,100000] [--value-size 48]
                                [--page-size 2000] [--rounds 3]

Without --url an embedded etcd is started (coord.server.EtcdServer; $COORD_ETCD picks
the binary) and stopped after.  For each key count N it writes N keys under
``bench/config/N/`` (JSON objects of about ``--value-size`` bytes, 128 per transaction),
then reports:

* load: ``ConfigWatcher.start()`` from the first request to the view (the paged range
  reads at one revision, base64/JSON parsing, decoding every value) -- the median and
  the best of ``--rounds``, with ``decode=json.loads`` and with raw bytes (no decode);
* memory per key: what the view retains once loaded (``tracemalloc``, after a garbage
  collection: keys, decoded values, the key -> value and key -> mod revision dicts),
  with ``json.loads`` and with raw bytes, and the peak during the (json) load, all
  divided by N.  Measured in a separate round:
  tracemalloc slows the load down;
* change: the delay from a put's reply to the change callback, with a snapshot held
  by the callback (so each revision copies the view's dicts: the worst case).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import tracemalloc

from twisted.internet import defer, task

from coord import Client, OpSet, Transaction
from coord.recipes import ConfigWatcher


async def fill(client: Client, prefix: bytes, n: int, value_size: int) -> None:
    filler = "x" * max(0, value_size - 30)
    batch: list[OpSet] = []
    in_flight: list[defer.Deferred] = []
    for i in range(n):
        value = json.dumps({"n": i, "enabled": True, "s": filler}).encode()
        batch.append(OpSet(prefix + b"key-%07d" % i, value))
        if len(batch) == 128 or i == n - 1:
            in_flight.append(client.submit(Transaction(success=batch)))
            batch = []
            if len(in_flight) == 8:
                await defer.gatherResults(in_flight, consumeErrors=True)
                in_flight = []
    if in_flight:
        await defer.gatherResults(in_flight, consumeErrors=True)


async def load_time(client: Client, prefix: bytes, decode, page_size: int) -> float:
    config = ConfigWatcher(client, prefix, decode=decode, page_size=page_size)
    t0 = time.perf_counter()
    await config.start()
    elapsed = time.perf_counter() - t0
    config.stop()
    return elapsed


async def memory(client: Client, prefix: bytes, n: int, page_size: int,
                 decode) -> tuple[float, float]:
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    config = ConfigWatcher(client, prefix, decode=decode, page_size=page_size)
    await config.start()
    config.stop()
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(config.snapshot()) == n
    return (current - base) / n, (peak - base) / n


async def change_delay(reactor, client: Client, prefix: bytes, rounds: int = 50) -> float:
    config = ConfigWatcher(client, prefix, decode=json.loads)
    await config.start()
    await config._watch.watcher.ready
    seen: dict[int, float] = {}
    held = []
    config.on_change(lambda change: (seen.__setitem__(change.revision, time.perf_counter()),
                                     held.append(change.snapshot)))
    delays = []
    for i in range(rounds):
        revision = (await client.set(prefix + b"key-%07d" % i, b'{"n": -1}')).revision
        replied = time.perf_counter()
        while revision not in seen:
            await task.deferLater(reactor, 0.0005, lambda: None)
        delays.append(max(0.0, seen[revision] - replied))
        del held[:-1]
    config.stop()
    return statistics.median(delays)


async def run(reactor, url: str, counts: list[int], value_size: int, page_size: int,
              rounds: int) -> None:
    client = Client(reactor, url, timeout=120)
    status = await client.status()
    print(f"etcd {status.version} at {url}; values ~{value_size} bytes, "
          f"pages of {page_size} keys, {rounds} rounds")
    print(f"{'keys':>8} {'load json (median/best)':>26} {'load raw bytes':>18} "
          f"{'memory/key json':>16} {'raw':>6} {'peak/key':>9} {'change delay':>13}")
    for n in counts:
        prefix = b"bench/config/%d/" % n
        t0 = time.perf_counter()
        await fill(client, prefix, n, value_size)
        filled = time.perf_counter() - t0
        js = [await load_time(client, prefix, json.loads, page_size) for _ in range(rounds)]
        raw = [await load_time(client, prefix, None, page_size) for _ in range(rounds)]
        per_key, peak = await memory(client, prefix, n, page_size, json.loads)
        raw_key, _ = await memory(client, prefix, n, page_size, None)
        delay = await change_delay(reactor, client, prefix)
        print(f"{n:>8} {statistics.median(js) * 1000:>15.0f} / {min(js) * 1000:>4.0f} ms "
              f"{statistics.median(raw) * 1000:>15.0f} ms {per_key:>14.0f} B "
              f"{raw_key:>4.0f} B {peak:>7.0f} B {delay * 1000:>10.2f} ms   "
              f"(written in {filled:.1f} s)")
    await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url")
    parser.add_argument("--keys", default="10000,100000")
    parser.add_argument("--value-size", type=int, default=48)
    parser.add_argument("--page-size", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    counts = [int(k) for k in args.keys.split(",")]
    server = None
    url = args.url
    if url is None:
        from coord.server import EtcdServer

        server = EtcdServer().start()
        url = server.url
    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(
            run(reactor, url, counts, args.value_size, args.page_size, args.rounds)))
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
