"""Many held locks in one process: connections, memory, idle CPU and `lost` latency.

    python benchmarks/scale.py [--url URL] [--counts 10,1000,10000] [--modes shared,unshared]
                               [--deletions 30] [--idle 3] [--nofile N] [--json]

Without --url an embedded etcd is started (coord.server.EtcdServer; $COORD_ETCD picks
the binary) and stopped after.  Each (mode, N) runs in a fresh process: one client, one
session, N locks (``Lock(session, f"scale/{i}")``) acquired, and each one's ``lost``
awaited (reading ``lost`` starts the watch on the lock's key).  Reported:

* connections: the process's TCP sockets to etcd's port (/proc/self/fd and
  /proc/net/tcp), the most seen while the locks were taken (sampled every 20 ms:
  replacements of shared streams included) and once settled; and of them, the most
  watch streams (the client's calls -- 4 acquisitions in flight, ``max_connections=4``
  -- and the session's keep-alive use the others);
* memory per held lock: the growth of the process's RSS over the N locks, / N;
* idle CPU: the client's CPU (user + system) over ``--idle`` seconds with nothing to do,
  as a share of one core, and etcd's over the same seconds (from /proc/<pid>/stat, when
  the benchmark started etcd itself);
* lost latency: ``etcdctl del`` of one lock's key, run as a subprocess, to that lock's
  ``lost`` firing, p50 / p99 over ``--deletions`` locks.  It includes etcdctl's start
  (its whole run, for comparison, is in the last column).

Modes: ``shared`` is what the recipes do (``client.watch(..., shared=True)``: the
watches share at most 8 streams); ``unshared`` makes every watch a stream -- an HTTP
connection -- of its own, as before shared streams (``shared=False`` forced on the
client's watch calls).  A run that needs more file descriptors than the soft limit
(RLIMIT_NOFILE; ``--nofile`` sets it, e.g. 1024, the usual default) stops before it
starts, with a message saying so, instead of failing with EMFILE midway.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

from _stats import percentile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# acquisitions in flight (and the client's max_connections)
INFLIGHT = 4

# descriptors a run uses besides its watch streams: the calls' connections, etcdctl's
# pipes, the interpreter's own files
SPARE_FDS = 64


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def sockets_to(port: int) -> int:
    """This process's TCP sockets whose remote port is ``port``."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                    if remote_port == port and fields[9] in inodes and fields[3] == "01":
                        count += 1  # ESTABLISHED
        except FileNotFoundError:
            pass
    return count


def cpu_of(pid: int | None) -> float | None:
    """User + system seconds of process ``pid`` (None: unknown)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the worker (one process per mode and N) --------------------------------------------------


def worker(mode: str, count: int, url: str, deletions: int, idle: float,
           etcd_pid: int | None, etcdctl: str) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = (count if mode == "unshared" else 8) + SPARE_FDS
    if needed > soft:
        print(json.dumps({"error": f"needs ~{needed} open files (one connection per watch) "
                                   f"but the soft limit (ulimit -n) is {soft}: not run"}))
        return

    from twisted.internet import defer, task
    from twisted.internet.threads import deferToThread

    from coord import Client
    from coord.recipes import Lock
    from coord.session import Session

    port = int(url.rsplit(":", 1)[1])

    async def main(reactor) -> None:
        client = Client(reactor, url, timeout=60, max_connections=INFLIGHT)
        if mode == "unshared":
            watch = client.watch

            def unshared(*args, **kwargs):
                kwargs["shared"] = False
                return watch(*args, **kwargs)

            client.watch = unshared  # type: ignore[method-assign]
        session = await Session.create(client, ttl=60)
        await client.get(b"warm-up")
        base = rss_bytes()
        peak = [0]
        streams = [0]
        hub = client.watch_hub  # (looks inside: how many streams the watches hold)

        def sample() -> None:
            peak[0] = max(peak[0], sockets_to(port))
            held = len(hub.streams) if mode == "shared" else len(hub.watchers)
            streams[0] = max(streams[0], held)

        sampler = task.LoopingCall(sample)
        sampler.start(0.02)
        locks: dict[int, Lock] = {}
        lost_at: dict[int, float] = {}
        started = time.monotonic()

        async def take(i: int) -> None:
            lock = Lock(session, f"scale/{i}")
            await lock.acquire(timeout=60)
            locks[i] = lock
            lock.lost.addCallback(lambda _, i=i: lost_at.setdefault(i, time.monotonic()))

        for first in range(0, count, INFLIGHT):
            await defer.gatherResults(
                [defer.ensureDeferred(take(i))
                 for i in range(first, min(count, first + INFLIGHT))], consumeErrors=True)
        acquire_s = time.monotonic() - started
        await task.deferLater(reactor, 2.0 + count / 5000, lambda: None)  # settle
        sampler.stop()
        settled = sockets_to(port)
        peak[0] = max(peak[0], settled)
        per_lock = (rss_bytes() - base) / count

        cpu0, etcd0, t0 = time.process_time(), cpu_of(etcd_pid), time.monotonic()
        await task.deferLater(reactor, idle, lambda: None)
        wall = time.monotonic() - t0
        client_cpu = (time.process_time() - cpu0) / wall
        etcd1 = cpu_of(etcd_pid)
        etcd_cpu = (etcd1 - etcd0) / wall if etcd0 is not None and etcd1 is not None else None

        chosen = random.Random(1).sample(sorted(locks), min(deletions, count))
        latencies, ctl_runs = [], []
        for i in chosen:
            key = locks[i].key
            spawned = time.monotonic()
            await deferToThread(subprocess.run, [etcdctl, "--endpoints", url, "del", key],
                                check=True, capture_output=True)
            ctl_runs.append((time.monotonic() - spawned) * 1000)
            for _ in range(500):
                if i in lost_at:
                    break
                await task.deferLater(reactor, 0.01, lambda: None)
            if i not in lost_at:
                raise SystemExit(f"lock {i}: lost did not fire within 5 s of its deletion")
            latencies.append((lost_at[i] - spawned) * 1000)
        print(json.dumps({
            "mode": mode, "count": count, "acquire_s": acquire_s,
            "peak_connections": peak[0], "connections": settled,
            "peak_streams": streams[0],
            "bytes_per_lock": per_lock, "client_cpu": client_cpu, "etcd_cpu": etcd_cpu,
            "lost_p50_ms": percentile(latencies, 0.5),
            "lost_p99_ms": percentile(latencies, 0.99),
            "etcdctl_p50_ms": percentile(ctl_runs, 0.5)}), flush=True)
        await session.close()
        await client.close()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


# -- the parent -------------------------------------------------------------------------------


def run_one(mode: str, count: int, url: str, args: argparse.Namespace,
            etcd_pid: int | None, etcdctl: str) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", mode, str(count), url, str(args.deletions),
         str(args.idle), str(etcd_pid or 0), etcdctl],
        cwd=ROOT, capture_output=True, text=True, timeout=600 + count / 10)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"mode": mode, "count": count, "error": f"exited {proc.returncode}: "
                                                      + " | ".join(tail)}
    result = json.loads(lines[-1])
    result.setdefault("mode", mode)
    result.setdefault("count", count)
    return result


def row(r: dict) -> str:
    head = f"{r['mode']:<9} {r['count']:>6}"
    if "error" in r:
        return f"{head}  {r['error']}"
    etcd = f"{r['etcd_cpu'] * 100:5.1f}%" if r.get("etcd_cpu") is not None else "   n/a"
    return (f"{head} {r['peak_connections']:>5} {r['connections']:>7} {r['peak_streams']:>7} "
            f"{r['bytes_per_lock'] / 1024:9.1f} {r['client_cpu'] * 100:8.1f}% {etcd:>7} "
            f"{r['lost_p50_ms']:8.1f} {r['lost_p99_ms']:8.1f} {r['etcdctl_p50_ms']:8.1f}"
            f" {r['acquire_s']:8.1f}")


HEADER = ("mode           N  peak settled streams  KiB/lock idle CPU    etcd  lost p50 "
          "lost p99  etcdctl  acquire\n"
          "                  conns  conns    peak              client    CPU       ms "
          "      ms       ms        s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="an etcd to use (default: start one)")
    parser.add_argument("--counts", default="10,1000,10000",
                        help="how many locks, comma-separated (default: 10,1000,10000)")
    parser.add_argument("--modes", default="shared,unshared",
                        help="shared and/or unshared (default: both)")
    parser.add_argument("--deletions", type=int, default=30,
                        help="locks deleted with etcdctl to time `lost` (default: 30)")
    parser.add_argument("--idle", type=float, default=3.0,
                        help="seconds of idle CPU measurement (default: 3)")
    parser.add_argument("--nofile", type=int,
                        help="set the soft open-files limit of the workers (e.g. 1024)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    modes = args.modes.split(",")
    if args.nofile:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # inherited by the workers (and not by an etcd started before: it keeps its own)
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, hard))

    from coord.server import EtcdServer, binary_version, find_etcd, find_etcdctl

    def measure(url: str, etcd_pid: int | None) -> None:
        etcdctl = find_etcdctl()
        results = []
        if not args.json:
            print(f"etcd at {url}, etcdctl {binary_version(etcdctl)}, {os.cpu_count()} CPUs, "
                  f"soft open-files limit {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}")
            print(HEADER, flush=True)
        for mode in modes:
            for count in counts:
                r = run_one(mode, count, url, args, etcd_pid, etcdctl)
                results.append(r)
                if not args.json:
                    print(row(r), flush=True)
        if args.json:
            print(json.dumps(results, indent=1))

    if args.url:
        measure(args.url, None)
        return
    # etcd gets a limit of its own high enough for the unshared runs' connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = EtcdServer(find_etcd())
    server.start()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        measure(server.url, server.pid)
    finally:
        server.stop()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        mode, count, url, deletions, idle, pid, etcdctl = sys.argv[2:9]
        worker(mode, int(count), url, int(deletions), float(idle), int(pid) or None, etcdctl)
    else:
        main()
