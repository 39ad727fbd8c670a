"""Delete one key, a key range, and a key set returning what was deleted (the guide's snippets).

    python examples/delete.py [URL]        # URL defaults to http://localhost:2379
"""

# ruff: noqa: UP032 -- the guide's snippets use str.format; they are kept verbatim

import sys

import txaio
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import react

from coord import Client, KeySet

URL = sys.argv[1] if len(sys.argv) > 1 else 'http://localhost:2379'


@inlineCallbacks
def main(reactor):
    etcd = Client(reactor, URL)
    for i in range(10):
        yield etcd.set('mykey{}'.format(i).encode(), b'foobar')

    # Delete a (single) key.  (The guide does not wait; here we do, with `yield`.)
    yield etcd.delete(b'mykey3')

    # Delete set of keys in given range [mykey3, mykey7): mykey4, mykey5, mykey6.
    yield etcd.delete(KeySet(b'mykey3', b'mykey7'))

    # Delete and return previous key-value pairs (mykey3 is gone already: none).
    deleted = yield etcd.delete(KeySet(b'mykey3'), return_previous=True)
    print('deleted key-value pairs: {}'.format(deleted.previous))

    # Delete the rest by prefix, returning what was deleted.
    deleted = yield etcd.delete(KeySet(b'mykey', prefix=True), return_previous=True)
    keys = ', '.join(kv.key.decode() for kv in deleted.previous)
    print(f'deleted {deleted.deleted} keys: {keys}')

    result = yield etcd.get(KeySet(b'mykey', prefix=True), count_only=True)
    print(f'keys left under mykey: {result.count}')
    yield etcd.close()


if __name__ == '__main__':
    txaio.start_logging(level='info')
    react(main)
