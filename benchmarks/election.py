"""Election failover time: after a resign and after a crash (kill -9 of the leader).

    python benchmarks/election.py [--url URL] [--rounds 20] [--candidates 5] [--ttl 2]
                                  [--plot FILE [--plot-size WxH]]

Without --url an embedded etcd is started (coord.server.EtcdServer; $COORD_ETCD picks
the binary) and stopped after.  N candidate processes (5 by default), each with its own
client and a session of --ttl seconds, campaign in one election.  Each notes the time
(CLOCK_MONOTONIC, shared by the processes) its ``campaign()`` returned.

* resign: the leader is told (on its stdin) to resign; it notes the time, calls
  ``resign()`` and campaigns again (to the back of the queue).  Failover = the next
  leader's election time minus the resign call.
* crash: the parent notes the time and kills the leader with SIGKILL, then starts a
  new candidate so that N stand again.  Nobody deletes the dead leader's key: etcd does,
  when its lease expires, up to TTL seconds after the last keep-alive (sent every
  TTL/3), plus etcd's lease expiry check (every 500 ms).  Failover = the next leader's
  election time minus the kill.

Reported: p50 and p99 (over --rounds rounds each) of both, in milliseconds.  ``--plot
FILE`` also draws both distributions to the PNG FILE, side by side (their scales differ
a thousandfold), one ECDF each with p50 and p99 marked; it needs matplotlib (``pip
install 'coord[plot]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import _plot
from _stats import percentile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- a candidate (runs in its own process) ---------------------------------------------------


def candidate(url: str, path: str, ttl: int) -> None:
    from twisted.internet import defer, task
    from twisted.internet.threads import deferToThread

    from coord import Client
    from coord.recipes import Election, Session

    pid = os.getpid()

    def log(*words: object) -> None:
        with open(path, "a") as f:
            f.write(" ".join(map(str, words)) + "\n")

    async def main(reactor) -> None:
        client = Client(reactor, url)
        session = await Session.create(client, ttl=ttl)
        election = Election(session, b"bench/election")
        log("ready", pid)
        while True:
            await election.campaign(str(pid))
            log("leader", pid, election.token, time.monotonic())
            command = (await deferToThread(sys.stdin.readline)).strip()
            if command != "resign":
                break
            log("resign", pid, election.token, time.monotonic())
            await election.resign()
        await session.close()
        await client.close()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


# -- the parent ------------------------------------------------------------------------------


class Candidates:
    def __init__(self, url: str, path: str, ttl: int) -> None:
        self.url, self.path, self.ttl = url, path, ttl
        self.procs: dict[int, subprocess.Popen] = {}

    def spawn(self) -> None:
        p = subprocess.Popen([sys.executable, __file__, "--candidate", self.url, self.path,
                              str(self.ttl)], cwd=ROOT, stdin=subprocess.PIPE, text=True)
        self.procs[p.pid] = p

    def log(self) -> list[list[str]]:
        with open(self.path) as f:
            return [line.split() for line in f.read().splitlines()]

    def wait_for(self, kind: str, count: int, timeout: float = 30.0) -> list[str]:
        """The count-th line of ``kind``, once written."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            lines = [line for line in self.log() if line[0] == kind]
            if len(lines) >= count:
                return lines[count - 1]
            time.sleep(0.002)
        raise SystemExit(f"no {kind} #{count} within {timeout} s")

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()


def measure(url: str, rounds: int, n: int, ttl: int) -> tuple[str, list[float], list[float]]:
    """Run the rounds and print the figures; return etcd's version and the failover
    times (ms) after a resign and after a crash."""
    with urllib.request.urlopen(urllib.request.Request(
            url + "/v3/maintenance/status", b"{}", method="POST"), timeout=5) as r:
        version = json.load(r)["version"]
    print(f"etcd {version} at {url}: {n} candidate processes, session TTL {ttl} s, "
          f"{rounds} rounds each, {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "log")
        open(path, "w").close()
        c = Candidates(url, path, ttl)
        try:
            for _ in range(n):
                c.spawn()
            c.wait_for("ready", n)
            leaders = 1
            leader = c.wait_for("leader", leaders)
            resign = []
            for i in range(rounds):
                proc = c.procs[int(leader[1])]
                proc.stdin.write("resign\n")
                proc.stdin.flush()
                resigned = c.wait_for("resign", i + 1)
                leaders += 1
                leader = c.wait_for("leader", leaders)
                resign.append((float(leader[3]) - float(resigned[3])) * 1000)
            crash = []
            ready = n
            for _ in range(rounds):
                killed_at = time.monotonic()
                os.kill(int(leader[1]), signal.SIGKILL)
                leaders += 1
                leader = c.wait_for("leader", leaders, timeout=ttl + 30)
                crash.append((float(leader[3]) - killed_at) * 1000)
                c.spawn()  # N candidates again, queued before the next round
                ready += 1
                c.wait_for("ready", ready)
                time.sleep(0.2)  # its campaign's first transaction
        finally:
            c.stop()
    for label, values in (("after resign", resign), ("after crash (kill -9)", crash)):
        print(f"failover {label:<22} p50 {percentile(values, 0.5):8.1f} ms"
              f"   p99 {percentile(values, 0.99):8.1f} ms"
              f"   (min {min(values):.1f}, max {max(values):.1f})", flush=True)
    return version, resign, crash


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--candidate":
        candidate(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--ttl", type=int, default=2)
    _plot.add_arguments(parser)
    args = parser.parse_args()
    _plot.check(args)
    if args.url:
        version, resign, crash = measure(args.url, args.rounds, args.candidates, args.ttl)
    else:
        from coord.server import EtcdServer

        with EtcdServer() as server:
            version, resign, crash = measure(server.url, args.rounds, args.candidates,
                                             args.ttl)
    if args.plot:
        _plot.write(
            args.plot,
            f"Election failover time, {args.candidates} candidate processes, "
            f"session TTL {args.ttl} s, {args.rounds} rounds each, etcd {version}",
            [("after resign(): the resign() call to the next leader's campaign() "
              "return (ms)", {"coord Election": resign}),
             ("after kill -9 of the leader: the kill to the next leader's campaign() "
              "return (ms)", {"coord Election": crash})], args.plot_size)
        print(f"plot: {args.plot}", flush=True)


if __name__ == "__main__":
    main()
