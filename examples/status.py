"""Print the status of the etcd member that answers (the guide's boilerplate).

    python examples/status.py [URL]        # URL defaults to http://localhost:2379
"""

import sys

import txaio
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import react

from coord import Client

URL = sys.argv[1] if len(sys.argv) > 1 else 'http://localhost:2379'


@inlineCallbacks
def main(reactor):
    etcd = Client(reactor, URL)

    status = yield etcd.status()
    print(status)

    print(f'etcd version: {status.version}')
    print(f'leader: {status.leader:x} (answered by {status.header.member_id:x})')
    print(f'revision: {status.header.revision}')
    print(f'database size: {status.db_size} bytes')

    members = yield etcd.members()
    for member in members:
        print('member {:x} {!r}: {}'.format(member.id, member.name, ', '.join(member.client_urls)))

    yield etcd.close()


if __name__ == '__main__':
    txaio.start_logging(level='info')
    react(main)
