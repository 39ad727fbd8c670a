"""Testing your own code against a real etcd with coord.testing (see docs/testing.md).

    pytest examples/testing/test_with_coord.py
"""

import pytest
import pytest_twisted
from twisted.internet import reactor

from coord import Client, KeySet, Timeout
from coord.recipes import Lock
from coord.testing import HOLD, answer


async def count_workers(client, timeout=None):   # the code under test
    result = await client.get(KeySet(b'workers/', prefix=True), count_only=True,
                              timeout=timeout)
    return result.count


@pytest_twisted.ensureDeferred
async def test_counts_the_workers(client):       # a Client on a clean etcd, closed after
    await client.set(b'workers/a', b'')
    await client.set(b'workers/b', b'')
    assert await count_workers(client) == 2


@pytest_twisted.ensureDeferred
async def test_one_holder_at_a_time(sessions):   # Sessions, closed (leases revoked) after
    first, second = await sessions(2, ttl=5)
    await Lock(first, b'jobs/nightly').acquire()
    with pytest.raises(Timeout):
        await Lock(second, b'jobs/nightly').acquire(timeout=0.2)


@pytest_twisted.ensureDeferred
async def test_gives_up_when_etcd_hangs(path_gateway):
    url, gateway = path_gateway(lambda path: HOLD)   # reads every request, answers none
    client = Client(reactor, url)
    try:
        with pytest.raises(Timeout):
            await count_workers(client, timeout=0.5)
    finally:
        await client.close()
    assert gateway.count('/v3/kv/range') >= 1


@pytest_twisted.ensureDeferred
async def test_a_slow_answer_is_still_taken(path_gateway):
    body = {'header': {'revision': '7'}, 'count': '3'}
    url, _ = path_gateway(lambda path: answer(0.3, body=body))   # 0.3 s late
    client = Client(reactor, url)
    try:
        assert await count_workers(client, timeout=5) == 3
    finally:
        await client.close()
