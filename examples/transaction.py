"""A transaction: compare a value, then write on success or write and read on failure.

The function `guide_transaction` is the guide's snippet verbatim.  It runs twice: first
mykey1 is b'val1', so the comparison holds (SUCCESS) and sets mykey1 to b'val2'; the
second time it no longer holds (FAILED), and the failure branch runs.

    python examples/transaction.py [URL]   # URL defaults to http://localhost:2379
"""

import sys

import txaio
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import react

from coord import Client, CompValue, Failed, OpGet, OpSet, Transaction

URL = sys.argv[1] if len(sys.argv) > 1 else 'http://localhost:2379'


@inlineCallbacks
def guide_transaction(etcd):
    txn = Transaction(
        compare=[
            CompValue(b'mykey1', '==', b'val1')
        ],
        success=[
            OpSet(b'mykey1', b'val2'),
            OpSet(b'mykey2', b'success')
        ],
        failure=[
            OpSet(b'mykey2', b'failure'),
            OpGet(b'mykey1')
        ]
    )

    try:
        result = yield etcd.submit(txn)
    except Failed as failed:
        print('transaction FAILED:')
        for response in failed.responses:
            print(response)
    else:
        print('transaction SUCCESS:')
        for response in result.responses:
            print(response)


@inlineCallbacks
def main(reactor):
    etcd = Client(reactor, URL)
    yield etcd.set(b'mykey1', b'val1')

    yield guide_transaction(etcd)   # mykey1 == b'val1': SUCCESS
    yield guide_transaction(etcd)   # mykey1 == b'val2' now: FAILED

    for key in (b'mykey1', b'mykey2'):
        result = yield etcd.get(key)
        print(f'{key.decode()} = {result.kvs[0].value.decode()}')
    yield etcd.close()


if __name__ == '__main__':
    txaio.start_logging(level='info')
    react(main)
