"""Helpers the test modules share (pytest puts tests/ on sys.path: ``from helpers import ...``)."""

from __future__ import annotations

import base64
import inspect
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from twisted.internet import base, defer, reactor, task, tcp
from twisted.internet.threads import deferToThread
from twisted.protocols import portforward
from twisted.web.client import Agent, HTTPConnectionPool

from coord import Client, KeySet
from coord._twisted.pool import HttpTransport, parse_endpoint

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
EXAMPLE_TIMEOUT = 60


def make_client(url, transport="pool", **kwargs):
    """A Client through coord's own pool, or through treq with a plain Agent."""
    if transport == "treq":
        pool = HTTPConnectionPool(reactor, persistent=True)
        kwargs["agent"] = Agent(reactor, pool=pool)
    return Client(reactor, url, **kwargs)


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


async def settle(client, prefix, expected_keys, expected_leases, timeout=5.0):
    """Wait until ``prefix`` holds just ``expected_keys`` and the leases are ``expected_leases``."""

    async def ok():
        return (await keys_under(client, prefix) == expected_keys
                and await lease_ids(client) == expected_leases)

    await wait_until(ok, timeout=timeout, interval=0.05)


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


# -- answers as etcd's gateway writes them ------------------------------------------------------

_HEADER = b'{"header":{"cluster_id":"11","member_id":"22","revision":"%s","raft_term":"3"}'
NO_LEADER_BODY = json.dumps({"error": "etcdserver: no leader", "message": "etcdserver: no leader",
                             "code": 14}).encode()


def hdr(rev=b"5"):
    """The start of an answer: ``{"header":{...}`` at revision ``rev`` (bytes), unclosed."""
    return _HEADER % rev


def one_kv(kv_fields, tail=b"", rev=b"5"):
    """A range answer with one key-value of ``kv_fields`` (the JSON inside its braces)."""
    return hdr(rev) + b',"kvs":[{' + kv_fields + b"}]" + tail + b"}"


def range_body(key, value, rev=5):
    """A range answer finding ``key`` = ``value``, as etcd writes it."""
    return one_kv(b'"key":"%s","create_revision":"2","mod_revision":"%d","version":"1",'
                  b'"value":"%s"' % (base64.b64encode(key), rev, base64.b64encode(value)),
                  b',"count":"1"', rev=b"%d" % rev)


# -- examples/ scripts, run as users run them -------------------------------------------------


def run(*argv: str) -> str:
    """Run ``python *argv`` from the repository root; return its stdout (exit 0 or fail)."""
    proc = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
        timeout=EXAMPLE_TIMEOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{output}"
    assert "Traceback" not in output, output
    return proc.stdout


def example(name: str, url: str) -> str:
    """Run ``examples/name`` with ``url`` as its argument; its stdout."""
    return run(str(EXAMPLES / name), url)


def lines_after(output: str, marker: str) -> list[str]:
    """The lines after the first one containing ``marker``."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if marker in line:
            return lines[i + 1:]
    raise AssertionError(f"{marker!r} not in output:\n{output}")


# -- coord's pool transport: made directly, its sockets and its timers ----------------------


def transport_for(*urls, **kwargs):
    """coord's pool transport (no Client) on ``urls``."""
    return HttpTransport(reactor, [parse_endpoint(u) for u in urls], **kwargs)


def ours(delayed_call) -> bool:
    """Whether a reactor DelayedCall belongs to coord's transport or a socket it opened
    (not to a recipe's session another test may have left behind)."""
    func = delayed_call.func
    owner = getattr(func, "__self__", None)
    if isinstance(owner, (tcp.BaseClient, base.BaseConnector)):
        return True
    return getattr(func, "__module__", "").startswith("coord._twisted.")


def no_coord_timers():
    """The reactor's pending DelayedCalls that are coord transport's (see `ours`)."""
    return [dc for dc in reactor.getDelayedCalls() if ours(dc)]


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


# -- sessions whose lease check cannot reach etcd (the recipe core's tests) ------------


async def session_checked_through(client, hung_client, ttl=30):
    """A Session on ``client`` whose lease is refreshed and checked (``remaining()``)
    through ``hung_client``, which never answers: the core's lease check, when our key
    goes, cannot reach etcd (the keys, watches and transactions still can)."""
    from coord.lease import Lease

    granted = await client.lease(ttl)
    lease = Lease(hung_client, granted.lease_id, granted.ttl)
    from coord.session import Session

    return Session(client, lease, client.reactor.seconds())


async def end_checked_session(client, session):
    """Close a session of :func:`session_checked_through`: orphan it (its own lease
    handle cannot reach etcd) and revoke the lease through ``client``."""
    from coord.errors import LeaseNotFound
    from coord.lease import Lease

    await session.close(orphan=True)
    try:
        await Lease(client, session.lease_id).revoke()
    except LeaseNotFound:
        pass


def hung_gateway(listen, new_client):
    """A gateway that accepts every request and answers none; a Client on it."""
    from coord.testing import Scripted

    gateway = Scripted(["hold"])
    return gateway, new_client(listen(gateway), timeout=10)


# -- proxies to etcd ------------------------------------------------------


def b64(data: bytes) -> bytes:
    """``data`` as the gateway's JSON carries it."""
    return base64.b64encode(data)


class LossyProxy:
    """A TCP proxy to etcd that loses the answer of the first transaction whose request
    holds ``match`` (bytes; the JSON body has keys in base64, see :func:`b64`), one of
    two ways.

    ``lose="answer"``: the request reaches etcd (it is applied), and the connection is
    cut when etcd's answer comes.  ``lose="request"``: ``before`` (an async function) runs,
    then the connection is cut without the request going on.  Later requests pass.
    """

    def __init__(self, url, lose, before=None, match=b""):
        host, port = urlsplit(url).hostname, urlsplit(url).port
        self.lose, self.before = lose, before
        self.pending, self.lost, self.conns = True, False, []
        proxy = self

        class Back(portforward.ProxyClient):
            def dataReceived(self, data):
                if self.peer.cut_answer:
                    proxy.lost = True
                    self.peer.transport.abortConnection()
                    self.transport.abortConnection()
                    return
                super().dataReceived(data)

        class BackFactory(portforward.ProxyClientFactory):
            protocol = Back

        class Server(portforward.ProxyServer):
            clientProtocolFactory = BackFactory
            cut_answer = False

            def connectionMade(self):
                proxy.conns.append(self)
                super().connectionMade()

            def dataReceived(self, data):
                if proxy.pending and b"/v3/kv/txn" in data and match in data:
                    proxy.pending = False
                    if proxy.lose == "answer":
                        self.cut_answer = True
                    else:
                        self.transport.pauseProducing()
                        defer.ensureDeferred(self._drop())
                        return
                super().dataReceived(data)

            async def _drop(self):
                if proxy.before is not None:
                    await proxy.before()
                proxy.lost = True
                self.transport.abortConnection()

        factory = portforward.ProxyFactory(host, port)
        factory.protocol = Server
        self.listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.listening.getHost().port}"

    async def close(self):
        await self.listening.stopListening()
        for conn in self.conns:
            conn.transport.abortConnection()
            if conn.peer is not None and conn.peer.transport is not None:
                conn.peer.transport.abortConnection()


class Proxy:
    """A TCP proxy to etcd that can cut every connection and refuse new ones, to
    disconnect one client while the others go on."""

    def __init__(self, url):
        host, port = urlsplit(url).hostname, urlsplit(url).port
        self.connections = []
        proxy = self

        class Server(portforward.ProxyServer):
            def connectionMade(self):
                proxy.connections.append(self)
                super().connectionMade()

        self.factory = portforward.ProxyFactory(host, int(port))
        self.factory.protocol = Server
        self.listening = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.port = self.listening.getHost().port
        self.url = f"http://127.0.0.1:{self.port}"

    async def cut(self):
        await self.listening.stopListening()
        for conn in self.connections:
            conn.transport.abortConnection()
        self.connections = []

    def restore(self):
        self.listening = reactor.listenTCP(self.port, self.factory, interface="127.0.0.1")

    async def close(self):
        await self.cut()


def run_coord(*argv, url=None, env=None, input=None, timeout=30):
    """Run the `coord` command (``python -m coord.cli argv...``) as a user would, with
    ``$COORD_ENDPOINTS`` set to ``url`` and no etcdctl settings inherited; the
    CompletedProcess (stdout and stderr as bytes)."""
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith(("COORD_ENDPOINTS", "ETCDCTL_"))}
    if url is not None:
        environment["COORD_ENDPOINTS"] = url
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "coord.cli", *argv], env=environment,
                          input=input, capture_output=True, timeout=timeout)
