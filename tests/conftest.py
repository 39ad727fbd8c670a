"""The suite's fixtures: coord.testing's (the pytest plugin, loaded by its entry point)
give the etcd servers, ``listen`` and ``path_gateway``; here the suite runs its client
tests through each transport."""

from __future__ import annotations

import pytest
import pytest_twisted
from helpers import make_client
from twisted.internet import reactor

from coord import Client
from coord.testing import SessionMaker

pytest_plugins = ["pytester"]  # for tests of coord.testing, the pytest plugin


@pytest.fixture(params=["pool", "treq"])
def transport(request):
    """Each client test runs through both transports."""
    return request.param


@pytest.fixture
def client(etcd, transport):
    """A Client on a clean keyspace, through each transport; closed after the test.
    (Overrides coord.testing's ``client``, which is coord's own pool only.)"""
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
    """coord.testing's ``sessions``, on ``pool_client`` (the suite's ``client`` runs
    through both transports; recipes need not)."""
    maker = SessionMaker(pool_client)
    yield maker
    maker.close_all()
