"""Lock throughput and handoff delay.

    python benchmarks/lock.py [--url URL] [--duration S] [--contenders N] [--go-watch]
                              [--etcd-lock-service] [--plot FILE [--plot-size WxH]]

Without --url an embedded etcd is started (coord.server.EtcdServer; $COORD_ETCD picks
the binary) and stopped after.  Two measurements, each in fresh processes:

* uncontended: one process, one session, one Lock: ``acquire()`` then ``release()`` in
  a loop.  Reported: cycles/s and gateway requests per cycle (target: one to acquire,
  one to release).
* contended: N processes (8 by default), each with its own client and session, loop
  ``acquire(); release()`` on the same lock.  Each writes, per hold, its token, the
  time it learnt it holds the lock and the time it called release (CLOCK_MONOTONIC,
  shared by the processes).  Sorted by token, the handoff delay is the next holder's
  acquire time minus the previous holder's release call.  Reported: cycles/s and the
  handoff delay p50/p99, also counted from the previous release's reply (the delete is
  applied by then: what remains is the watch event and the new holder's check).

``--go-watch`` makes waiters watch their predecessor from the read's revision + 1 as Go's
Mutex does (instead of at the current revision; see coord/recipes/_wait.py), to show
what etcd's slow "unsynced" watch catch-up costs.  ``--etcd-lock-service`` adds the same
contended loop through etcd's own server-side lock service (``/v3/lock/lock`` on the
gateway, which runs Go's Mutex inside etcd) for comparison.

``--plot FILE`` also draws the contended runs' handoff delays (coord's and each
reference's: python-etcd3, the lock service) to the PNG FILE, one ECDF each with p50 and
p99 marked; it needs matplotlib (``pip install 'coord[plot]'``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

import _plot
from _stats import percentile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- workers (run in their own processes) ---------------------------------------------------


def worker(kind: str, url: str, duration: float, go_watch: bool) -> None:
    from twisted.internet import defer, task

    from coord import Client
    from coord.recipes import Lock, Session, _wait

    if go_watch:
        _wait.WATCH_AT_CURRENT_REVISION = False

    async def main(reactor) -> None:
        client = Client(reactor, url)
        requests = [0]
        transport = client._transport
        original = transport.request

        def counting(*args, **kwargs):
            requests[0] += 1
            return original(*args, **kwargs)

        transport.request = counting
        session = await Session.create(client, ttl=10)
        lock = Lock(session, b"bench/lock")
        await lock.acquire()  # warm up: connections open
        await lock.release()
        # start together (the parent gives a start time a little in the future)
        await task.deferLater(reactor, max(0.0, START - time.monotonic()), lambda: None)
        holds = []
        requests[0] = 0
        end = time.monotonic() + duration
        while time.monotonic() < end:
            await lock.acquire()
            acquired = time.monotonic()
            released = time.monotonic()
            await lock.release()
            holds.append((lock.token, acquired, released, time.monotonic()))
        print(json.dumps({"holds": holds, "requests": requests[0]}), flush=True)
        await session.close()
        await client.close()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


def service_worker(url: str, duration: float) -> None:
    """The same loop through etcd's lock service: POST /v3/lock/lock, /v3/lock/unlock."""
    from twisted.internet import defer, task

    from coord import Client

    async def main(reactor) -> None:
        client = Client(reactor, url)
        lease = await client.lease(10)
        name = "YmVuY2gvc2VydmljZQ=="  # base64 of bench/service

        def call(path, body):
            return client.call(path, body, True, None)

        await task.deferLater(reactor, max(0.0, START - time.monotonic()), lambda: None)
        holds = []
        end = time.monotonic() + duration
        while time.monotonic() < end:
            got = await call("/v3/lock/lock", {"name": name, "lease": lease.lease_id})
            acquired = time.monotonic()
            token = int(got["header"]["revision"])
            released = time.monotonic()
            await call("/v3/lock/unlock", {"key": got["key"]})
            holds.append((token, acquired, released, time.monotonic()))
        print(json.dumps({"holds": holds, "requests": 2 * len(holds)}), flush=True)
        await lease.revoke()
        await client.close()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


def etcd3_worker(url: str, duration: float) -> None:
    """The same loop with python-etcd3's Lock (gRPC), run by the interpreter given with
    --etcd3-python.  Its Lock has no fencing token: holds are ordered by acquire time."""
    from urllib.parse import urlsplit

    import etcd3  # type: ignore[import-not-found]

    parts = urlsplit(url)
    client = etcd3.client(host=parts.hostname, port=parts.port)
    lock = client.lock("bench-etcd3", ttl=10)
    lock.acquire()
    lock.release()
    time.sleep(max(0.0, START - time.monotonic()))
    holds = []
    end = time.monotonic() + duration
    while time.monotonic() < end:
        lock.acquire()
        acquired = time.monotonic()
        released = time.monotonic()
        lock.release()
        holds.append((acquired, acquired, released, time.monotonic()))
    print(json.dumps({"holds": holds, "requests": None}), flush=True)
    client.close()


START = 0.0


# -- the parent -----------------------------------------------------------------------------


def run_workers(kind: str, n: int, url: str, duration: float, go_watch: bool,
                python: str = sys.executable) -> list[dict]:
    start = time.monotonic() + 2.0
    procs = [subprocess.Popen(
        [python, __file__, "--worker", kind, url, str(duration), str(start),
         "1" if go_watch else "0"], cwd=ROOT, stdout=subprocess.PIPE, text=True,
        # python-etcd3's watch threads complain when its client closes: noise, not news
        stderr=subprocess.DEVNULL if kind == "etcd3" else None)
        for _ in range(n)]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=duration + 60)
        if p.returncode != 0:
            raise SystemExit(f"worker failed ({p.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def report(label: str, results: list[dict], duration: float) -> list[float]:
    """Print one line of figures for ``results``; return the handoff delays (ms)."""
    holds = sorted(h for r in results for h in r["holds"])
    cycles = len(holds)
    counted = [r["requests"] for r in results if r["requests"] is not None]
    handoffs = [(b[1] - a[2]) * 1000 for a, b in itertools.pairwise(holds)]
    after_reply = [max(0.0, b[1] - a[3]) * 1000 for a, b in itertools.pairwise(holds)]
    tokens = [h[0] for h in holds]
    assert len(set(tokens)) == len(tokens), "two holds with one token"
    overlap = sum(1 for a, b in itertools.pairwise(holds) if b[1] < a[2])
    per_cycle = (f"{sum(counted) / max(cycles, 1):5.2f}" if len(counted) == len(results)
                 else "  n/a")
    line = f"{label:<34} {cycles / duration:8.0f} cycles/s  {per_cycle} requests/cycle"
    if len(results) > 1:
        line += (f"  handoff p50 {percentile(handoffs, 0.5):6.2f} ms"
                 f"  p99 {percentile(handoffs, 0.99):6.2f} ms"
                 f"  (from the release's reply: p50 {percentile(after_reply, 0.5):5.2f}"
                 f" p99 {percentile(after_reply, 0.99):6.2f})")
        if overlap:
            line += f"  OVERLAPS: {overlap}"
    print(line, flush=True)
    return handoffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--contenders", type=int, default=8)
    parser.add_argument("--go-watch", action="store_true")
    parser.add_argument("--etcd-lock-service", action="store_true")
    parser.add_argument("--etcd3-python", metavar="PYTHON",
                        help="an interpreter with python-etcd3 installed: its Lock runs the "
                             "same loops (python-etcd3 needs protobuf<4; see README.md)")
    _plot.add_arguments(parser)
    args = parser.parse_args()
    _plot.check(args)

    def measure(url: str) -> None:
        import urllib.request

        with urllib.request.urlopen(urllib.request.Request(
                url + "/v3/maintenance/status", b"{}", method="POST"), timeout=5) as r:
            version = json.load(r)["version"]
        print(f"etcd {version} at {url}, {args.duration:.0f} s per measurement, "
              f"{os.cpu_count()} CPUs")
        handoffs = {}  # the plot's series: the contended runs
        report("coord uncontended (1 process)",
               run_workers("coord", 1, url, args.duration, args.go_watch), args.duration)
        handoffs["coord (--go-watch)" if args.go_watch else "coord"] = report(
            f"coord {args.contenders} contenders (processes)",
            run_workers("coord", args.contenders, url, args.duration, args.go_watch),
            args.duration)
        if args.etcd3_python:
            report("python-etcd3 uncontended",
                   run_workers("etcd3", 1, url, args.duration, False, args.etcd3_python),
                   args.duration)
            handoffs["python-etcd3"] = report(
                f"python-etcd3 {args.contenders} contenders",
                run_workers("etcd3", args.contenders, url, args.duration, False,
                            args.etcd3_python), args.duration)
        if args.etcd_lock_service:
            handoffs["etcd lock service"] = report(
                f"etcd lock service, {args.contenders} contenders",
                run_workers("service", args.contenders, url, args.duration, False),
                args.duration)
        if args.plot:
            _plot.write(
                args.plot,
                f"Lock handoff delay, {args.contenders} contender processes, "
                f"{args.duration:g} s per run, etcd {version}",
                [("handoff delay: previous holder's release() call to the next holder's "
                  "acquire() return (ms)", handoffs)], args.plot_size)
            print(f"plot: {args.plot}", flush=True)

    if args.url:
        measure(args.url)
    else:
        from coord.server import EtcdServer

        with EtcdServer() as server:
            measure(server.url)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, url, duration, start, go_watch = sys.argv[2:7]
        START = float(start)
        if kind == "service":
            service_worker(url, float(duration))
        elif kind == "etcd3":
            etcd3_worker(url, float(duration))
        else:
            worker(kind, url, float(duration), go_watch == "1")
    else:
        main()
