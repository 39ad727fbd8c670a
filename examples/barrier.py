"""Barriers: a Barrier released by a coordinator, and a DoubleBarrier of three workers.

    python examples/barrier.py [URL]    # URL defaults to http://localhost:2379
"""

import sys

import txaio
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.task import deferLater, react

from coord import Client
from coord.recipes import Barrier, DoubleBarrier, Session

URL = sys.argv[1] if len(sys.argv) > 1 else 'http://localhost:2379'


@inlineCallbacks
def main(reactor):
    etcd = Client(reactor, URL)

    gate = Barrier(etcd, b'example/deploy')
    print(f'held: {(yield gate.hold())}')          # True: we created the key
    waiting = gate.wait(timeout=10)                # a worker would wait like this
    yield deferLater(reactor, 0.2, lambda: None)
    yield gate.release()
    print(f'released at revision {(yield waiting)}')

    sessions = []
    for _ in range(3):
        sessions.append((yield Session.create(etcd, ttl=10)))
    workers = [DoubleBarrier(s, b'example/phase', count=3) for s in sessions]
    yield DeferredList([w.enter(timeout=10) for w in workers], fireOnOneErrback=True)
    print('all 3 entered')
    yield DeferredList([w.leave(timeout=10) for w in workers], fireOnOneErrback=True)
    print('all 3 left')
    for s in sessions:
        yield s.close()
    yield etcd.close()


if __name__ == '__main__':
    txaio.start_logging(level='info')
    react(main)
