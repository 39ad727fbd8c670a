"""Queue: put jobs, take them in order, give one back, ack; a priority queue.

    python examples/work_queue.py [URL]      # URL defaults to http://localhost:2379
"""

import sys

import txaio
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import react

from coord import Client, Timeout
from coord.recipes import PriorityQueue, Queue, Session

URL = sys.argv[1] if len(sys.argv) > 1 else 'http://localhost:2379'


@inlineCallbacks
def main(reactor):
    etcd = Client(reactor, URL)
    session = yield Session.create(etcd, ttl=10)   # a consumer's claims live on its lease

    jobs = Queue(etcd, b'example/jobs')
    for job in (b'resize a.png', b'resize b.png', b'resize c.png'):
        key = yield jobs.put(job)
        print(f'put {job.decode()!r} as {key.decode()}')

    item = yield jobs.get(session, timeout=5)
    print(f'got {item.value.decode()!r}; giving it back')
    yield item.release()                          # back at the head of the queue
    for _ in range(3):
        item = yield jobs.get(session, timeout=5)
        print(f'got {item.value.decode()!r} (put at revision {item.revision})')
        yield item.ack()                          # done: the item is deleted
    try:
        yield jobs.get(session, timeout=0.5)
    except Timeout:
        print('the queue is empty')

    urgent = PriorityQueue(etcd, b'example/urgent')
    yield urgent.put(b'low', priority=1)
    yield urgent.put(b'high', priority=9)
    item = yield urgent.get(session, timeout=5)
    print(f'priority queue first: {item.value.decode()!r} (priority {item.priority})')
    yield item.ack()
    item = yield urgent.get(session, timeout=5)
    yield item.ack()

    jobs.close()
    urgent.close()
    yield session.close()
    yield etcd.close()


if __name__ == '__main__':
    txaio.start_logging(level='info')
    react(main)
