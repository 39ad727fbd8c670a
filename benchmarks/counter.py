"""Counter throughput: adds/s with 1 and N writer processes, next to a plain put.

    python benchmarks/counter.py [--url URL] [--duration S] [--rounds R] [--writers 1,8]

Without --url an embedded etcd is started (coord.server.EtcdServer; $COORD_ETCD picks
the binary) and stopped after.  Each measurement runs W writer processes at once, each
with its own client, in a loop on one key for S seconds:

* ``add``: ``Counter(client, b"bench/counter").add(1)`` -- a transaction comparing the
  key's mod revision, retried on conflict (with W > 1 writers the writers conflict).
* ``put``: ``client.set(b"bench/counter", b"<n>")`` on the same key: one plain write per
  call, nothing compared -- the ceiling an add can reach.

Rounds interleave the two (the order alternates), and the table shows medians: ops/s,
``add/put`` (the ratio of the medians, and per round), gateway requests per add (1 when
uncontended; more when conflicts made it retry), the p50 and p99 time of one add (over
all writers: with several, how long a writer waits for its turn), and CPU per operation:
the writers' (user + system) and etcd's (when its pid is known: the embedded etcd, or
--server-pid).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# (the scripts' directory is sys.path[0]: `python benchmarks/counter.py`)
from kv import cpu_seconds, process_cpu_seconds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = b"bench/counter"


# -- a writer (its own process) -------------------------------------------------------------


def worker(kind: str, url: str, duration: float, start_at: float) -> None:
    from twisted.internet import defer, task

    from coord import Client
    from coord.recipes import Counter

    async def main(reactor) -> None:
        client = Client(reactor, url)
        requests = [0]
        original = client._transport.request  # count gateway requests (no public API)

        def counting(*args, **kwargs):
            requests[0] += 1
            return original(*args, **kwargs)

        client._transport.request = counting
        counter = Counter(client, KEY)
        n = 0

        async def one() -> None:
            nonlocal n
            n += 1
            if kind == "add":
                await counter.add(1, timeout=30)
            else:
                await client.set(KEY, b"%d" % n)

        await one()  # connected, and the counter's hint is set
        await task.deferLater(reactor, max(0.0, start_at - time.monotonic()), lambda: None)
        ops, requests[0] = 0, 0
        cpu0, t0 = cpu_seconds(), time.monotonic()
        end = t0 + duration
        latencies = []
        now = t0
        while now < end:
            await one()
            ops += 1
            done = time.monotonic()
            latencies.append(done - now)
            now = done
        elapsed, cpu = time.monotonic() - t0, cpu_seconds() - cpu0
        print(json.dumps({"ops": ops, "seconds": elapsed, "cpu": cpu,
                          "requests": requests[0], "latencies": latencies}), flush=True)
        await client.close()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


# -- the parent -----------------------------------------------------------------------------


def measure(kind: str, writers: int, url: str, duration: float,
            server_pid: int | None) -> dict:
    start_at = time.monotonic() + 1.5 + 0.1 * writers  # after every writer has connected
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", kind, url,
                               str(duration), str(start_at)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
             for _ in range(writers)]
    time.sleep(max(0.0, start_at - time.monotonic()))
    server0 = process_cpu_seconds(server_pid)
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=duration + 60)
        if p.returncode != 0:
            raise SystemExit(f"a {kind} writer failed ({p.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    server1 = process_cpu_seconds(server_pid)
    ops = sum(r["ops"] for r in results)
    latencies = sorted(x for r in results for x in r["latencies"])
    seconds = max(r["seconds"] for r in results)
    return {
        "rate": ops / seconds,
        "p50_ms": 1e3 * percentile(latencies, 0.5),
        "p99_ms": 1e3 * percentile(latencies, 0.99),
        "requests_per_op": sum(r["requests"] for r in results) / max(ops, 1),
        "client_us": 1e6 * sum(r["cpu"] for r in results) / max(ops, 1),
        # etcd's CPU over the window (and the writers' exits: a few ms), per operation
        "server_us": None if server0 is None or server1 is None
        else 1e6 * (server1 - server0) / max(ops, 1),
    }


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(len(values) * p))]


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def run(url: str, args: argparse.Namespace, server_pid: int | None) -> dict:
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(
            url + "/v3/maintenance/status", b"{}", method="POST"), timeout=5) as r:
        version = json.load(r)["version"]
    writers = [int(w) for w in args.writers.split(",")]
    samples: dict[tuple[str, int], list[dict]] = {}
    for round_ in range(args.rounds):
        for w in writers:
            order = ["put", "add"] if round_ % 2 == 0 else ["add", "put"]
            for kind in order:
                samples.setdefault((kind, w), []).append(
                    measure(kind, w, url, args.duration, server_pid))
    print(f"etcd {version} at {url}, {args.rounds} rounds x {args.duration:g} s, "
          f"{os.cpu_count()} CPUs, medians")
    print(f"{'writers':<8} {'put/s':>7} {'add/s':>7} {'add/put':>8}  {'per round':<20} "
          f"{'req/add':>7}  {'add p50/p99 ms':>14}  {'client CPU/op us':>17}  "
          f"{'etcd CPU/op us':>15}")
    table = {}
    for w in writers:
        puts, adds = samples[("put", w)], samples[("add", w)]
        put_rate = median([s["rate"] for s in puts])
        add_rate = median([s["rate"] for s in adds])
        assert put_rate is not None and add_rate is not None
        per_round = " ".join(f"{a['rate'] / p['rate']:.2f}"
                             for a, p in zip(adds, puts, strict=True))
        row = {
            "put_per_s": put_rate, "add_per_s": add_rate, "ratio": add_rate / put_rate,
            "requests_per_add": median([s["requests_per_op"] for s in adds]),
            "add_p50_ms": median([s["p50_ms"] for s in adds]),
            "add_p99_ms": median([s["p99_ms"] for s in adds]),
            "client_us": {"put": median([s["client_us"] for s in puts]),
                          "add": median([s["client_us"] for s in adds])},
            "server_us": {"put": median([s["server_us"] for s in puts]),
                          "add": median([s["server_us"] for s in adds])},
        }
        table[w] = row
        print(f"{w:<8} {put_rate:7.0f} {add_rate:7.0f} {row['ratio']:7.2f}x  {per_round:<20} "
              f"{fmt(row['requests_per_add'], '.2f'):>7}  "
              f"{fmt(row['add_p50_ms'], '.2f'):>6} {fmt(row['add_p99_ms'], '.1f'):>7}  "
              f"{fmt(row['client_us']['put']):>8} {fmt(row['client_us']['add']):>8}  "
              f"{fmt(row['server_us']['put']):>7} {fmt(row['server_us']['add']):>7}",
              flush=True)
    print("(client and etcd CPU columns: put, then add)")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url")
    parser.add_argument("--server-pid", type=int, help="etcd's pid, for its CPU (with --url)")
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--writers", default="1,8", help="writer processes, e.g. 1,8")
    parser.add_argument("--json", action="store_true", help="also print the table as JSON")
    args = parser.parse_args()
    if args.url:
        table = run(args.url, args, args.server_pid)
    else:
        from coord.server import EtcdServer

        with EtcdServer() as server:
            table = run(server.url, args, server.pid)
    if args.json:
        print(json.dumps(table))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, url, duration, start_at = sys.argv[2:6]
        worker(kind, url, float(duration), float(start_at))
    else:
        main()
