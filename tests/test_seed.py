"""The original user guide's snippets (../shared/seed), run with only the import changed.

Each test body is the guide's snippet verbatim (inside the guide's boilerplate), with
assertions added after it.  Watch and Locks are tested at length in their own modules;
here their guide snippets run as written.
"""

from __future__ import annotations

import pytest_twisted
import txaio
from helpers import count_is, keys_under, lease_ids, wait_until
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, inlineCallbacks

from coord import Client, CompValue, Failed, KeySet, OpGet, OpSet, Timeout, Transaction


@pytest_twisted.inlineCallbacks
def test_status(client):
    status = yield client.status()
    print(status)
    assert status.version.startswith("3.")
    assert status.leader == status.header.member_id


@pytest_twisted.inlineCallbacks
def test_boilerplate_main(etcd):

    @inlineCallbacks
    def main(reactor):
        etcd_ = Client(reactor, etcd.url)
        status = yield etcd_.status()
        print(status)
        return etcd_, status

    etcd_, status = yield main(reactor)
    assert status.header.revision >= 1
    yield etcd_.close()


@pytest_twisted.inlineCallbacks
def test_setting_keys(client):
    etcd = client
    for i in range(10):
        etcd.set('mykey{}'.format(i).encode(), b'foobar')  # noqa: UP032 - the guide's text

    # The guide fires the sets without waiting; wait until all ten are visible.
    result = yield etcd.get(KeySet(b'mykey', prefix=True))
    while len(result.kvs) < 10:
        result = yield etcd.get(KeySet(b'mykey', prefix=True))
    assert [kv.key for kv in result.kvs] == [b'mykey%d' % i for i in range(10)]
    assert {kv.value for kv in result.kvs} == {b'foobar'}


@inlineCallbacks
def _ten_keys(etcd):
    for i in range(10):
        yield etcd.set(b'mykey%d' % i, b'foobar')


@pytest_twisted.inlineCallbacks
def test_getting_keys(client, capsys):
    etcd = client
    yield etcd.set(b'mykey', b'one')
    yield _ten_keys(etcd)

    result = yield etcd.get(b'mykey')
    if result.kvs:
        kv = result.kvs[0]
        print(kv)
    else:
        print('key not found')
    assert result.kvs[0].key == b'mykey' and result.kvs[0].value == b'one'

    result = yield etcd.get(KeySet(b'mykey1', b'mykey5'))
    for kv in result.kvs:
        print(kv)
    assert [kv.key for kv in result.kvs] == [b'mykey1', b'mykey2', b'mykey3', b'mykey4']

    result = yield etcd.get(KeySet(b'mykey', prefix=True))
    for kv in result.kvs:
        print(kv)
    assert len(result.kvs) == 11

    result = yield etcd.get(b'nosuchkey')
    if result.kvs:
        print(result.kvs[0])
    else:
        print('key not found')
    assert 'key not found' in capsys.readouterr().out


@pytest_twisted.inlineCallbacks
def test_deleting_keys(client):
    etcd = client
    yield _ten_keys(etcd)

    yield etcd.delete(b'mykey3')
    assert (yield etcd.get(b'mykey3')).kvs == []

    yield etcd.delete(KeySet(b'mykey3', b'mykey7'))
    remaining = yield etcd.get(KeySet(b'mykey', prefix=True))
    assert [kv.key for kv in remaining.kvs] == [b'mykey0', b'mykey1', b'mykey2', b'mykey7',
                                                b'mykey8', b'mykey9']

    yield etcd.set(b'mykey3', b'again')
    deleted = yield etcd.delete(KeySet(b'mykey3'), return_previous=True)
    print('deleted key-value pairs: {}'.format(deleted.previous))  # noqa: UP032
    assert deleted.deleted == 1
    assert [kv.value for kv in deleted.previous] == [b'again']


@pytest_twisted.inlineCallbacks
def test_transactions(client, capsys):
    etcd = client

    @inlineCallbacks
    def snippet():
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

    yield etcd.set(b'mykey1', b'other')
    yield snippet()
    assert 'transaction FAILED:' in capsys.readouterr().out
    assert (yield etcd.get(b'mykey2')).kvs[0].value == b'failure'

    yield etcd.set(b'mykey1', b'val1')
    yield snippet()
    assert 'transaction SUCCESS:' in capsys.readouterr().out
    assert (yield etcd.get(b'mykey1')).kvs[0].value == b'val2'
    assert (yield etcd.get(b'mykey2')).kvs[0].value == b'success'


@pytest_twisted.inlineCallbacks
def test_watching_keys(client, capsys):
    etcd = client
    reactor.callLater(0.3, etcd.set, b'mykey1', b'changed')

    # callback invoked for every change
    def on_change(kv):
        print('on_change: {}'.format(kv))  # noqa: UP032

    # start watching on set of keys with given prefix
    d = etcd.watch([KeySet(b'mykey', prefix=True)], on_change)
    print('watching ..')

    # stop after 1 second (the guide says 60)
    yield txaio.sleep(1)
    d.cancel()

    out = capsys.readouterr().out
    assert out.startswith('watching ..\n')
    assert "on_change: Event(type=<EventType.PUT: 'PUT'>, kv=KeyValue(key=b'mykey1', " \
           "value=b'changed'" in out
    assert (yield d) is None


@pytest_twisted.inlineCallbacks
def test_locks(client, capsys):
    etcd = client

    @inlineCallbacks
    def first():
        lock = yield etcd.lock(b'mylock')

        # now do something on the exclusively locked resource
        # or whatever the lock stands for or is associated with

        lock.release()
        return lock

    @inlineCallbacks
    def second():
        try:
            lock = yield etcd.lock(b'mylock', timeout=10)
        except Timeout:
            print('could not acquire lock: timeout')
        else:

            # operate on the locked resource

            lock.release()
            return lock

    held = yield etcd.lock(b'mylock')  # someone else holds it: the second snippet waits
    reactor.callLater(0.5, held.release)
    lock = yield second()
    assert lock.token > held.token
    lock = yield first()
    assert not lock.held
    # The unawaited release()s complete: no key and no lease remain.
    yield ensureDeferred(wait_until(lambda: count_is(etcd, b'mylock', 0)))

    @inlineCallbacks
    def timed_out():
        try:
            lock = yield etcd.lock(b'mylock', timeout=0.5)
        except Timeout:
            print('could not acquire lock: timeout')
        else:
            lock.release()

    held = yield etcd.lock(b'mylock')
    yield timed_out()
    assert 'could not acquire lock: timeout' in capsys.readouterr().out
    yield held.release()
    assert (yield ensureDeferred(keys_under(etcd, b'mylock'))) == []
    assert (yield ensureDeferred(lease_ids(etcd))) == []
