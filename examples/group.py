"""Group membership: two members join a service registry, a watcher sees every change.

    python examples/group.py [URL]       # URL defaults to http://localhost:2379
"""

import sys

import txaio
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import react

from coord import Client
from coord.recipes import Group, Session
from coord.recipes.group import members, watch

URL = sys.argv[1] if len(sys.argv) > 1 else 'http://localhost:2379'


def report(change):
    for member, data in change.joined.items():
        print(f'{member.decode()} joined: {data.decode()}')
    for member, data in change.updated.items():
        print(f'{member.decode()} updated: {data.decode()}')
    for member in change.left:
        print(f'{member.decode()} left')


@inlineCallbacks
def main(reactor):
    etcd = Client(reactor, URL)
    watching = watch(etcd, b'services/api', report)     # the members now, then each change
    yield watching.ready

    one = Group((yield Session.create(etcd, ttl=10)), b'services/api', member='api-1')
    two = Group((yield Session.create(etcd, ttl=10)), b'services/api', member='api-2')
    yield one.join(b'10.0.0.1:8080')                     # keys services/api/api-1 ...
    yield two.join(b'10.0.0.2:8080')
    found = yield members(etcd, b'services/api')         # every member at one revision
    print(f'members at revision {found.revision}: '
          f'{[m.decode() for m in found.in_join_order()]}')

    yield two.update(b'10.0.0.2:8081')                   # only while our key is ours
    yield one.leave()
    yield two.leave()
    yield watching.wait(lambda current: not current, timeout=5)
    watching.close()
    yield one.session.close()
    yield two.session.close()
    yield etcd.close()


if __name__ == '__main__':
    txaio.start_logging(level='info')
    react(main)
