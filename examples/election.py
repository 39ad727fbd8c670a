"""Leader election: campaign, a timeout, proclaim, a guarded write, resign, observe.

    python examples/election.py [URL]       # URL defaults to http://localhost:2379
"""

import sys

import txaio
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater, react

from coord import Client, Failed, OpSet, Timeout, Transaction
from coord.recipes import Election, Session

URL = sys.argv[1] if len(sys.argv) > 1 else 'http://localhost:2379'


def report(leader):
    if leader is None:
        print('observed: no leader')
    else:
        print(f'observed: {leader.value.decode()} (token {leader.create_revision})')


@inlineCallbacks
def main(reactor):
    etcd = Client(reactor, URL)
    alice = Election((yield Session.create(etcd, ttl=10)), b'workers')
    bob = Election((yield Session.create(etcd, ttl=10)), b'workers')
    observation = alice.observe(report)         # the leader now, then every change
    yield observation.ready

    yield alice.campaign(b'alice')
    print(f'alice leads: {alice}')
    try:
        yield bob.campaign(b'bob', timeout=1)
    except Timeout:
        print('bob could not win within 1 s: alice still leads')

    yield alice.proclaim(b'alice-v2')
    # Written only if alice still leads when etcd applies it.
    yield etcd.submit(Transaction(compare=[alice.guard()],
                                  success=[OpSet(b'workers-owner', b'alice')]))
    print('guarded write done as leader')

    elected = bob.campaign(b'bob')
    yield alice.resign()                        # bob is elected at once
    yield elected
    try:
        yield etcd.submit(Transaction(compare=[alice.guard()],
                                      success=[OpSet(b'workers-owner', b'stale')]))
    except Failed:
        print("bob leads now; alice's stale guarded write was refused")
    yield bob.resign()
    while observation.leader is not None:       # until the observer has seen it
        yield deferLater(reactor, 0.05, lambda: None)
    observation.close()
    yield alice.session.close()
    yield bob.session.close()
    yield etcd.close()


if __name__ == '__main__':
    txaio.start_logging(level='info')
    react(main)
