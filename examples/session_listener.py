"""A worker that pauses while its session is SUSPENDED, and stops when it is lost.

    python examples/session_listener.py [URL [SECONDS]]   # defaults: http://localhost:2379, 60 s

Stop etcd for a moment while it runs (`kill -STOP` its pid, then `kill -CONT`): the
worker pauses until the keep-alives are answered again; past the TTL it stops for good.
"""

import sys

import txaio
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import react

from coord import Client
from coord.session import Session, SessionState

URL = sys.argv[1] if len(sys.argv) > 1 else 'http://localhost:2379'
SECONDS = float(sys.argv[2]) if len(sys.argv) > 2 else 60


@inlineCallbacks
def main(reactor):
    etcd = Client(reactor, URL, timeout=2)
    session = yield Session.create(etcd, ttl=5)
    paused = []                               # non-empty while the lease may be gone

    def on_state(old, new, reason):           # called on every change, in order
        print(f'session {old.name} -> {new.name}')
        if new is SessionState.SUSPENDED:
            paused.append(reason)             # the keep-alive's error
            print(f'pausing work: {type(reason).__name__}')
        elif new is SessionState.CONNECTED:
            paused.clear()
            print('resuming work')

    session.listen(on_state)
    done = skipped = 0
    end = reactor.seconds() + SECONDS
    while reactor.seconds() < end and session.state in (SessionState.CONNECTED,
                                                         SessionState.SUSPENDED):
        if paused:
            skipped += 1
        else:
            done += 1                         # one unit of work, while the lease is ours
        yield txaio.sleep(0.1)
    print(f'work done: {done}, skipped while paused: {skipped}; '
          f'session {session.state.name}')
    yield session.close()
    yield etcd.close()


if __name__ == '__main__':
    txaio.start_logging(level='info')
    react(main)
