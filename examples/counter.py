"""Counters: concurrent adds that never lose one, compare-and-set, and a shell's view.

    python examples/counter.py [URL]    # URL defaults to http://localhost:2379

The counter is the key b'visits', its value the decimal ASCII of an int64:
``etcdctl get visits`` shows it, ``etcdctl put visits 0`` resets it.
"""

import sys

import txaio
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import react

from coord import Client
from coord.recipes import Counter

URL = sys.argv[1] if len(sys.argv) > 1 else 'http://localhost:2379'


async def worker(etcd, times):
    counter = Counter(etcd, b'visits')                   # each worker its own handle
    for _ in range(times):
        await counter.add(1, timeout=10)                 # returns the new value


async def main(reactor):
    etcd = Client(reactor, URL)
    visits = Counter(etcd, b'visits')
    await visits.set(0)
    await gatherResults([ensureDeferred(worker(etcd, 25)) for _ in range(4)])
    print(f'4 workers added 1 each 25 times: {await visits.get()}')

    print(f'compare_and_set(100, 0): {await visits.compare_and_set(100, 0)}')
    print(f'compare_and_set(100, 0): {await visits.compare_and_set(100, 0)}')  # now 0

    await etcd.set(b'visits', b'41')                     # as `etcdctl put visits 41` would
    print(f'after a put by hand, add(1) gives {await visits.add(1)}')
    await etcd.delete(b'visits')
    print(f'deleted: get() gives the default, {await visits.get()}')
    await etcd.close()


if __name__ == '__main__':
    txaio.start_logging(level='info')
    react(main)
