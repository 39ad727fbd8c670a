"""Group membership: how long until every member's watch has seen a new member join.

    python benchmarks/group.py [--url URL] [--members 20] [--rounds 20]

Without --url an embedded etcd is started (coord.server.EtcdServer; $COORD_ETCD picks
the binary) and stopped after.  Two measurements in the same run, each with fresh
processes:

* group: N member processes (20 by default), each with its own client and session,
  join the group ``bench/group`` and watch it (``Group.watch``, on the prefix mirror).
  A joiner process then joins a new member, round after round: it notes the time
  (CLOCK_MONOTONIC, shared by the processes) just before ``join()``; each member notes
  when its watch reports the new member.  Latency = the last member's time minus the
  join's start.  After each round the new member leaves, and every watch sees it go,
  before the next round.
* reference (the floor): N processes each with one bare ``client.watch`` of the
  prefix; the joiner does a bare ``client.set`` of a key (no session, no
  transaction, no mirror).  Latency = the last watch's event minus the put's start.

Reported: p50 and p99 over the rounds of both (and of the join / put call itself), in
milliseconds, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import subprocess
import sys
import time
import urllib.request

from _stats import percentile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = b"bench/group"


def say(*words: object) -> None:
    sys.stdout.write(" ".join(map(str, words)) + "\n")
    sys.stdout.flush()


# -- the processes ---------------------------------------------------------------------------


def member(mode: str, url: str, index: int) -> None:
    """A member (group) or a bare watcher (ref): says "seen ID TIME" per new member."""
    from twisted.internet import defer, task
    from twisted.internet.threads import deferToThread

    from coord import Client, KeySet
    from coord.recipes import Group, Session
    from coord.types import EventType

    async def main(reactor) -> None:
        client = Client(reactor, url)
        if mode == "group":
            session = await Session.create(client, ttl=10)
            group = Group(session, NAME, member=f"m{index}")
            await group.join(b"10.0.0.%d:80" % index)

            def changed(change) -> None:
                now = time.monotonic()
                for joined in change.joined:
                    say("seen", joined.decode(), now)
                for left in change.left:
                    say("gone", left.decode())

            watching = group.watch(changed)
            await watching.ready
        else:
            prefix = NAME + b"/"

            def event(e) -> None:
                now = time.monotonic()
                key = e.kv.key[len(prefix):].decode()
                say("seen" if e.type is EventType.PUT else "gone", key, now)

            watched = client.watch(KeySet(prefix, prefix=True), event)
            await watched.watcher.ready
        say("ready")
        await deferToThread(sys.stdin.read)  # until the parent closes our stdin
        if mode == "group":
            watching.close()
            await group.leave()
            await session.close()
        else:
            watched.addErrback(lambda _: None)
            watched.cancel()
        await client.close()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


def joiner(mode: str, url: str) -> None:
    """Reads "join K" / "leave K"; says "joined K START END" / "left K"."""
    from twisted.internet import defer, task
    from twisted.internet.threads import deferToThread

    from coord import Client
    from coord.recipes import Group, Session

    async def main(reactor) -> None:
        client = Client(reactor, url)
        session = await Session.create(client, ttl=10) if mode == "group" else None
        groups = {}
        while True:
            line = (await deferToThread(sys.stdin.readline)).split()
            if not line:
                break
            command, k = line
            key = NAME + b"/j" + k.encode()
            if command == "join":
                if mode == "group":
                    group = groups[k] = Group(session, NAME, member="j" + k)
                    started = time.monotonic()
                    await group.join(b"10.0.1.1:80")
                else:
                    started = time.monotonic()
                    await client.set(key, b"10.0.1.1:80")
                say("joined", k, started, time.monotonic())
            else:
                if mode == "group":
                    await groups.pop(k).leave()
                else:
                    await client.delete(key)
                say("left", k)
        if session is not None:
            await session.close()
        await client.close()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


# -- the parent ------------------------------------------------------------------------------


class Run:
    """N watching processes and a joiner, read line by line."""

    def __init__(self, mode: str, url: str, n: int) -> None:
        self.selector = selectors.DefaultSelector()
        self.buffers: dict[int, bytes] = {}
        self.members = [self._spawn("--member", mode, url, str(i)) for i in range(n)]
        self.joiner = self._spawn("--joiner", mode, url)
        self.lines: list[tuple[subprocess.Popen, list[str]]] = []

    def _spawn(self, *argv: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, __file__, *argv], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        os.set_blocking(p.stdout.fileno(), False)
        self.selector.register(p.stdout, selectors.EVENT_READ, p)
        self.buffers[p.pid] = b""
        return p

    def read(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            p = key.data
            data = os.read(p.stdout.fileno(), 65536)
            if not data:
                self.selector.unregister(p.stdout)
                if p.poll() not in (None, 0):
                    raise SystemExit(f"process {p.pid} exited {p.returncode}")
                continue
            self.buffers[p.pid] += data
            *lines, self.buffers[p.pid] = self.buffers[p.pid].split(b"\n")
            self.lines += [(p, line.decode().split()) for line in lines]

    def wait(self, test, timeout: float = 60.0) -> list[tuple[subprocess.Popen, list[str]]]:
        """Read until ``test(process, words)`` holds for the lines read; those lines."""
        end = time.monotonic() + timeout
        while True:
            found = [(p, w) for p, w in self.lines if test(p, w)]
            if found:
                return found
            left = end - time.monotonic()
            if left <= 0:
                raise SystemExit(f"timed out waiting ({len(self.lines)} lines read)")
            self.read(left)

    def from_all(self, word: str, member: str | None, timeout: float = 60.0) -> list[list[str]]:
        """The lines ``word [member ...]`` of every watching process, once all said it."""
        procs = set(self.members)
        end = time.monotonic() + timeout
        while True:
            got = {p: w for p, w in self.lines if w[:1] == [word]
                   and (member is None or w[1:2] == [member]) and p in procs}
            if len(got) == len(procs):
                return list(got.values())
            left = end - time.monotonic()
            if left <= 0:
                raise SystemExit(f"not every process said {word} {member or ''} in time")
            self.read(left)

    def tell(self, line: str) -> None:
        self.joiner.stdin.write(line.encode() + b"\n")
        self.joiner.stdin.flush()

    def stop(self) -> None:
        for p in [*self.members, self.joiner]:
            try:
                p.stdin.close()
            except OSError:
                pass
        for p in [*self.members, self.joiner]:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def measure_mode(mode: str, url: str, n: int, rounds: int) -> tuple[list[float], list[float]]:
    run = Run(mode, url, n)
    seen, calls = [], []
    try:
        run.from_all("ready", None, timeout=120)
        for k in range(rounds):
            run.tell(f"join {k}")
            lines = run.from_all("seen", f"j{k}")
            ((_, joined),) = run.wait(lambda p, w, k=k: w[:2] == ["joined", str(k)])
            started, returned = float(joined[2]), float(joined[3])
            seen.append((max(float(w[2]) for w in lines) - started) * 1000)
            calls.append((returned - started) * 1000)
            run.tell(f"leave {k}")
            run.from_all("gone", f"j{k}")
            run.wait(lambda p, w, k=k: w[:2] == ["left", str(k)])
            run.lines.clear()
    finally:
        run.stop()
    return seen, calls


def measure(url: str, n: int, rounds: int) -> None:
    with urllib.request.urlopen(urllib.request.Request(
            url + "/v3/maintenance/status", b"{}", method="POST"), timeout=5) as r:
        version = json.load(r)["version"]
    print(f"etcd {version} at {url}: {n} watching processes, {rounds} joins, "
          f"{os.cpu_count()} CPUs", flush=True)
    results = {}
    for mode, label in (("group", "Group.join seen by every member's watch"),
                        ("ref", "bare put seen by every bare client.watch")):
        results[mode] = measure_mode(mode, url, n, rounds)
        seen, calls = results[mode]
        print(f"{label:<42} p50 {percentile(seen, 0.5):7.1f} ms   p99 "
              f"{percentile(seen, 0.99):7.1f} ms   (the call itself: p50 "
              f"{percentile(calls, 0.5):.1f} ms)", flush=True)
    g, r = results["group"][0], results["ref"][0]
    print(f"ratio group / reference: p50 {percentile(g, 0.5) / percentile(r, 0.5):.2f}   "
          f"p99 {percentile(g, 0.99) / percentile(r, 0.99):.2f}", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--member":
        member(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--joiner":
        joiner(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url")
    parser.add_argument("--members", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    if args.url:
        measure(args.url, args.members, args.rounds)
    else:
        from coord.server import EtcdServer

        with EtcdServer() as server:
            measure(server.url, args.members, args.rounds)


if __name__ == "__main__":
    main()
