"""Failover: a Client with two endpoints, the first of which is dead.

An endpoint that cannot be reached is skipped: nothing was sent to it, so even a write
is safe to send to the next one.  When every endpoint is down, calls raise Unavailable.

    python examples/failover.py [URL]      # URL defaults to http://localhost:2379
"""

import socket
import sys

import txaio
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import react

from coord import Client, Unavailable

URL = sys.argv[1] if len(sys.argv) > 1 else 'http://localhost:2379'


def dead_url():
    """A loopback URL nothing listens on (a port that was free a moment ago)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return f'http://127.0.0.1:{s.getsockname()[1]}'


@inlineCallbacks
def main(reactor):
    dead = dead_url()
    etcd = Client(reactor, [dead, URL], connect_timeout=2)
    print(f'client: {etcd}')

    revision = yield etcd.set(b'failover/key', b'written')
    result = yield etcd.get(b'failover/key')
    print(f'set at revision {revision.revision}, read back {result.kvs[0].value!r}')
    status = yield etcd.status()
    print(f'answered by member {status.header.member_id:x}')
    yield etcd.delete(b'failover/key')
    yield etcd.close()

    nowhere = Client(reactor, [dead], connect_timeout=2)
    try:
        yield nowhere.get(b'failover/key')
    except Unavailable as e:
        print(f'all endpoints down: Unavailable: {e}')
    yield nowhere.close()


if __name__ == '__main__':
    txaio.start_logging(level='info')
    react(main)
