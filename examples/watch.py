"""Watch keys with a prefix for changes (the guide's snippet), then cancel the watch.

Once the watch is in place the script changes a few keys itself, so that there is
something to see; change more meanwhile with e.g. `etcdctl put mykey7 hello`.

    python examples/watch.py [URL [SECONDS]]   # defaults: http://localhost:2379, 60 s
"""

# ruff: noqa: UP032 -- the guide's snippets use str.format; they are kept verbatim

import sys

import txaio
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import react

from coord import Client, KeySet

URL = sys.argv[1] if len(sys.argv) > 1 else 'http://localhost:2379'
SECONDS = float(sys.argv[2]) if len(sys.argv) > 2 else 60


@inlineCallbacks
def main(reactor):
    etcd = Client(reactor, URL)

    # callback invoked for every change
    def on_change(kv):
        print('on_change: {}'.format(kv))

    # start watching on set of keys with given prefix
    d = etcd.watch([KeySet(b'mykey', prefix=True)], on_change)
    print('watching ..')

    # (not in the guide) once etcd has created the watch, change some keys
    yield d.watcher.ready
    yield etcd.set(b'mykey1', b'one')
    yield etcd.set(b'mykey1', b'uno')
    yield etcd.delete(b'mykey1')
    yield etcd.set(b'otherkey', b'not watched')

    # stop after 60 seconds (SECONDS: the guide's 60 unless given)
    yield txaio.sleep(SECONDS)
    d.cancel()
    print('watch cancelled: {!r}'.format(d.watcher))
    yield etcd.close()


if __name__ == '__main__':
    txaio.start_logging(level='info')
    react(main)
