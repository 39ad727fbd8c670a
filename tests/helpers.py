"""Helpers the test modules share (pytest puts tests/ on sys.path: ``from helpers import ...``)."""

from __future__ import annotations

import inspect
import socket
import subprocess
import sys
from pathlib import Path

from twisted.internet import protocol, reactor, task
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
