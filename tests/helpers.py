"""Helpers the test modules share (pytest puts tests/ on sys.path: ``from helpers import ...``)."""

from __future__ import annotations

import inspect
import json
import socket
import subprocess
import sys
from pathlib import Path

from twisted.internet import protocol, reactor, task, tcp
from twisted.internet.threads import deferToThread

from coord import KeySet

ROOT = Path(__file__).resolve().parent.parent


def dead_url():
    """A loopback URL where nothing listens."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def sleep(seconds):
    """A Deferred that fires after ``seconds`` of reactor time."""
    return task.deferLater(reactor, seconds, lambda: None)


async def wait_until(predicate, timeout=10.0, interval=0.02):
    """Poll ``predicate`` (plain or async) until true; AssertionError after ``timeout``."""
    for _ in range(int(timeout / interval)):
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        await sleep(interval)
    raise AssertionError("condition not met in time")


async def keys_under(client, prefix):
    """The keys under ``prefix``, in key order."""
    return [kv.key for kv in (await client.get(KeySet(prefix, prefix=True))).kvs]


async def count_is(client, prefix, n):
    return len(await keys_under(client, prefix)) == n


async def lease_ids(client):
    return sorted(lease.lease_id for lease in await client.leases())


def spawn(code, *args, **kwargs):
    """Run ``python -c code *args`` from the repository root, with text pipes."""
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def finish(proc):
    """Kill ``proc`` if it still runs; reap it and close its pipes."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def deferred_readline(proc):
    """A Deferred firing with ``proc``'s next stdout line (read in a thread)."""
    return deferToThread(proc.stdout.readline)


def defer_to_exit(proc, timeout=30):
    """A Deferred firing with ``(stdout, stderr)`` once ``proc`` exits."""
    return deferToThread(proc.communicate, timeout=timeout)


def preferred_url(client):
    """The URL of the endpoint ``client`` sends its next call to.  (Looks inside the
    client's transport: no public API tells, and none should be needed.)"""
    return client._transport.preferred.url


# -- scripted gateways: HTTP answers written by hand ----------------------------------------


def http_answer(status, body, chunk=None, interim=False):
    pre = b"HTTP/1.1 100 Continue\r\n\r\n" if interim else b""
    if chunk is None:
        return pre + (b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (status, len(body), body))
    out = [pre + b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n" % status]
    for i in range(0, len(body), chunk):
        piece = body[i:i + chunk]
        out.append(b"%x\r\n%s\r\n" % (len(piece), piece))
    out.append(b"0\r\n\r\n")
    return b"".join(out)


class _Scripted(protocol.Protocol):
    def connectionMade(self):
        self.factory.connections += 1

    def dataReceived(self, data):
        self.factory.seen.append(data)
        for _ in range(data.count(b"POST ")):
            self.factory.requests += 1
            action = self.factory.next_action()
            if action == "close":
                self.transport.abortConnection()
                return
            if action == "hold":
                self.factory.held.append(self)
            elif callable(action):
                action(self)
            else:
                self.transport.write(action)


class Scripted(protocol.Factory):
    """Answers request n with script[n] (the last entry repeats): bytes to write, "close"
    (drop the connection), "hold" (answer later with release()), or a callable."""

    protocol = _Scripted
    noisy = False

    def __init__(self, script):
        self.script = list(script)
        self.requests = 0
        self.connections = 0
        self.held = []
        self.seen = []

    def next_action(self):
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    def release(self, data):
        self.held.pop(0).transport.write(data)

    def drop_held(self):
        held, self.held = self.held, []
        for proto in held:
            proto.transport.abortConnection()


# -- a gateway scripted per request path, and the sockets of a transport --------------------

HEADER = {"cluster_id": "1", "member_id": "1", "revision": "5", "raft_term": "2"}
STATUS = {"header": HEADER, "version": "3.5.1", "dbSize": "1", "leader": "1",
          "raftIndex": "5", "raftTerm": "2"}
ANSWERS = {
    "/v3/maintenance/status": STATUS,
    "/v3/kv/range": {"header": HEADER},
    "/v3/kv/put": {"header": HEADER},
    "/v3/kv/txn": {"header": HEADER, "succeeded": True},
    "/v3/maintenance/defragment": {"header": HEADER},
}
HOLD = ("hold",)


def answer(delay=0.0, path=None, body=None):
    """A gateway action: the usual answer to ``path`` (or ``body``), after ``delay`` s."""
    return ("answer", delay, body if body is not None else ANSWERS.get(path, {}))




class _PathGatewayConnection(protocol.Protocol):
    """One connection to a :class:`PathGateway`: parses requests, acts as its script says."""

    def connectionMade(self):
        self.buffer = b""
        self.owed = []  # paths whose answer this connection still owes, in order
        self.factory.open.add(self)

    def connectionLost(self, reason=None):
        self.factory.open.discard(self)
        if self.owed:
            self.factory.dropped.extend(self.owed)  # closed by the client while owing

    def dataReceived(self, data):
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, rest = self.buffer.split(b"\r\n\r\n", 1)
            lines = head.split(b"\r\n")
            path = lines[0].split(b" ")[1].decode()
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.factory.requests.append((path, reactor.seconds()))
            action = self.factory.script(path)
            if action[0] == "hold":
                self.owed.append(path)  # owed for good
                continue
            _, delay, obj = action
            self.owed.append(path)
            self.factory.timers.append(reactor.callLater(delay, self._answer, path, obj))

    def _answer(self, path, obj):
        if self not in self.factory.open or path not in self.owed:
            return
        self.owed.remove(path)
        raw = json.dumps(obj).encode()
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw))


class PathGateway(protocol.Factory):
    """A scripted etcd gateway: ``script(path)`` says what each request gets
    (:data:`HOLD`: no answer ever; :func:`answer`).  Records every request
    (``requests``: (path, when)) and every answer owed on a connection the client
    closed (``dropped``)."""

    protocol = _PathGatewayConnection

    def __init__(self, script):
        self.script = script
        self.requests = []
        self.dropped = []
        self.open = set()
        self.timers = []

    def count(self, path, since=0.0):
        return sum(1 for p, t in self.requests if p == path and t >= since)


def sockets_of(transport):
    """The reactor's TCP client sockets connected (or connecting) for coord's pool
    ``transport``."""
    found = []
    for s in set(reactor.getReaders()) | set(reactor.getWriters()):
        if not isinstance(s, tcp.Client):
            continue
        pool = getattr(getattr(s, "protocol", None), "pool", None)
        if pool is None:
            pool = getattr(getattr(getattr(s, "connector", None), "factory", None), "pool", None)
        if pool is not None and pool.transport is transport:
            found.append(s)
    return found
