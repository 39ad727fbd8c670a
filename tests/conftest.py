"""Shared fixtures: a coord Client on the suite's etcd, through each transport."""

from __future__ import annotations

import pytest
import pytest_twisted
from helpers import PathGateway, sleep
from twisted.internet import defer, reactor
from twisted.web.client import Agent, HTTPConnectionPool

from coord import Client
from coord.session import Session

pytest_plugins = ["pytester"]  # for tests of coord.testing, the pytest plugin


def make_client(url, transport="pool", **kwargs):
    """A Client through coord's own pool, or through treq with a plain Agent."""
    if transport == "treq":
        pool = HTTPConnectionPool(reactor, persistent=True)
        kwargs["agent"] = Agent(reactor, pool=pool)
    return Client(reactor, url, **kwargs)


@pytest.fixture(params=["pool", "treq"])
def transport(request):
    """Each client test runs through both transports."""
    return request.param


@pytest.fixture
def client(etcd, transport):
    """A Client on a clean keyspace; closed after the test."""
    c = make_client(etcd.url, transport)
    yield c
    pytest_twisted.blockon(c.close())


@pytest.fixture
def new_client(transport):
    """``new_client(url, **kwargs)``: a Client through the test's transport, closed after."""
    made = []

    def new(url, **kwargs):
        c = make_client(url, transport, **kwargs)
        made.append(c)
        return c

    yield new
    for c in made:
        pytest_twisted.blockon(c.close())


@pytest.fixture
def pool_client(etcd):
    """A Client through coord's own pool only: for recipes, which do not depend on the
    transport (each recipe module has one test through treq)."""
    c = Client(reactor, etcd.url)
    yield c
    pytest_twisted.blockon(c.close())


@pytest.fixture
def sessions(pool_client):
    """``await sessions(n, ttl=5)``: n sessions on ``pool_client``, closed after the test."""
    made = []

    async def make(n=1, ttl=5):
        new = [await Session.create(pool_client, ttl=ttl) for _ in range(n)]
        made.extend(new)
        return new

    yield make
    errors = []
    for s in made:  # every one, even if closing an earlier one failed
        try:
            pytest_twisted.blockon(s.close())
        except Exception as e:
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.fixture
def listen():
    """``listen(factory)``: serve ``factory`` on a free loopback port; its http:// URL.
    Stopped after the test (see helpers.Scripted for a scripted gateway)."""
    ports = []

    def start(factory):
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(port)
        return f"http://127.0.0.1:{port.getHost().port}"

    yield start
    for port in ports:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest.fixture
def path_gateway():
    """``path_gateway(script)`` -> (url, helpers.PathGateway) on loopback; stopped after."""
    ports, made = [], []

    def start(script):
        factory = PathGateway(script)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(port)
        made.append(factory)
        return f"http://127.0.0.1:{port.getHost().port}", factory

    yield start
    for f in made:
        for t in f.timers:
            if t.active():
                t.cancel()
        for p in list(f.open):
            p.transport.abortConnection()
    for port in ports:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))
    pytest_twisted.blockon(sleep(0.01))
