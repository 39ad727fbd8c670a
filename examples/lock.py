"""Locks: a timeout, a fencing token, a guarded write, and a stale write refused.

    python examples/lock.py [URL]       # URL defaults to http://localhost:2379
"""

import sys

import txaio
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import react

from coord import Client, Failed, OpSet, Timeout, Transaction
from coord.recipes import Lock, Session

URL = sys.argv[1] if len(sys.argv) > 1 else 'http://localhost:2379'


@inlineCallbacks
def main(reactor):
    etcd = Client(reactor, URL)

    lock = yield etcd.lock(b'mylock', timeout=10)   # the guide's sketch: a session of its own
    print(f'acquired: {lock}')

    session = yield Session.create(etcd, ttl=10)
    other = Lock(session, b'mylock')
    try:
        yield other.acquire(timeout=1)
    except Timeout:
        print('could not acquire lock: timeout')

    # Written only if the lock is still ours when etcd applies it.
    yield etcd.submit(Transaction(compare=[lock.guard()],
                                  success=[OpSet(b'resource', b'%d' % lock.token)]))
    print(f'guarded write with token {lock.token}')
    yield lock.release()                                      # closes its session too

    yield other.acquire(timeout=10)
    print(f'then {other}: token {other.token} > {lock.token}')
    try:
        yield etcd.submit(Transaction(compare=[lock.guard()],
                                      success=[OpSet(b'resource', b'stale')]))
    except Failed:
        print('the first holder\'s late write was refused')
    yield other.release()
    yield session.close()
    yield etcd.close()


if __name__ == '__main__':
    txaio.start_logging(level='info')
    react(main)
