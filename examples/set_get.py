"""Set keys, then get one key, a key range and a key prefix (the guide's snippets).

    python examples/set_get.py [URL]       # URL defaults to http://localhost:2379
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

    status = yield etcd.status()
    print(status)

    # Set a value for some keys.  (The guide does not wait for the sets; here each one
    # is awaited with `yield`, so that the reads below are sure to see them.)
    for i in range(10):
        yield etcd.set('mykey{}'.format(i).encode(), b'foobar')

    # Get a value by key (no key is called b'mykey' exactly: "key not found").
    result = yield etcd.get(b'mykey')
    if result.kvs:
        kv = result.kvs[0]
        print(kv)
    else:
        print('key not found')

    # Iterate over key range [mykey1, mykey5): mykey1 .. mykey4.
    result = yield etcd.get(KeySet(b'mykey1', b'mykey5'))
    for kv in result.kvs:
        print(kv)

    # Iterate over keys with given prefix: all ten.
    result = yield etcd.get(KeySet(b'mykey', prefix=True))
    for kv in result.kvs:
        print(kv)

    yield etcd.close()


if __name__ == '__main__':
    txaio.start_logging(level='info')
    react(main)
