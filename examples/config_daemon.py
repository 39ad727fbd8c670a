"""A daemon that reloads when its config changes: a ConfigWatcher on config/daemon/.

    python examples/config_daemon.py [URL [SECONDS]]   # defaults: http://localhost:2379, 60 s

Change its config while it runs: `etcdctl put config/daemon/workers 8`.  A value that is
not JSON is reported and the last good value kept.
"""

import json
import sys

import txaio
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import react

from coord import Client
from coord.recipes import ConfigWatcher

URL = sys.argv[1] if len(sys.argv) > 1 else 'http://localhost:2379'
SECONDS = float(sys.argv[2]) if len(sys.argv) > 2 else 60
PREFIX = b'config/daemon/'
DEFAULTS = {PREFIX + b'workers': 2, PREFIX + b'greeting': 'hello'}


def reload(snapshot):
    # A real daemon would resize its worker pool, reopen its logs, ...
    settings = {key[len(PREFIX):].decode(): value for key, value in sorted(snapshot.items())}
    print(f'running with {settings}')


@inlineCallbacks
def main(reactor):
    etcd = Client(reactor, URL)
    config = ConfigWatcher(etcd, PREFIX, decode=json.loads, encode=json.dumps)
    snapshot = yield config.start(timeout=10)
    if not snapshot:   # first run: write the defaults, all in one transaction
        revision = yield config.update(DEFAULTS, expect=snapshot)
        snapshot = yield config.wait_revision(revision, timeout=10)
    print(f'config loaded at revision {snapshot.revision}')
    reload(snapshot)

    def on_change(change):
        names = [sorted(k[len(PREFIX):].decode() for k in keys)
                 for keys in (change.added, change.changed, change.removed)]
        print('config changed at revision {}: added {} changed {} removed {}'.format(
            change.revision, *names))
        reload(change.snapshot)

    config.on_change(on_change)
    config.on_error(lambda error: print(f'bad value for {error.key!r} ignored: {error.cause}'))

    yield txaio.sleep(SECONDS)
    config.stop()
    print(f'stopped: {config!r}')
    yield etcd.close()


if __name__ == '__main__':
    txaio.start_logging(level='info')
    react(main)
