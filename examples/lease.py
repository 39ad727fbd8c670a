"""Leases: grant one, attach keys, refresh it, ask what remains, revoke it.

Keys written with `lease=` live as long as the lease: revoking it (or letting it expire)
deletes them.  A lease that is gone raises LeaseExpired.

    python examples/lease.py [URL]         # URL defaults to http://localhost:2379
"""

import sys

import txaio
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import react

from coord import Client, KeySet, LeaseExpired

URL = sys.argv[1] if len(sys.argv) > 1 else 'http://localhost:2379'


@inlineCallbacks
def main(reactor):
    etcd = Client(reactor, URL)

    lease = yield etcd.lease(10)                      # seconds
    print(f'lease granted: {lease} (ttl {lease.ttl} s)')

    yield etcd.set(b'session/alice', b'online', lease=lease)
    yield etcd.set(b'session/bob', b'online', lease=lease.lease_id)   # or its ID

    ttl = yield lease.refresh()                       # one keep-alive
    print(f'refreshed: ttl {ttl} s')
    print(f'remaining: {(yield lease.remaining())} s')
    print(f'keys: {sorted((yield lease.keys()))}')     # etcd lists them in no order

    yield lease.revoke()                              # deletes the keys too
    result = yield etcd.get(KeySet(b'session/', prefix=True))
    print(f'revoked; keys left under session/: {result.count}')

    try:
        yield lease.remaining()
    except LeaseExpired as e:
        print(f'LeaseExpired: {e}')
    yield etcd.close()


if __name__ == '__main__':
    txaio.start_logging(level='info')
    react(main)
