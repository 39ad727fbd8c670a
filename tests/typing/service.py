"""A small service written against coord's public API, as a user writes one: a nightly
job under a lock, locks and a campaign on a shared session, an observer of who leads.

It is not run: tests/test_packaging.py type-checks it with ``mypy --strict`` against
coord installed from a wheel, so an error here is one a user's mypy would report.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import react

from coord import (
    Client,
    CompValue,
    CoordError,
    Event,
    Failed,
    KeySet,
    Lease,
    OpSet,
    Revision,
    Timeout,
    Transaction,
)
from coord.recipes import (
    Election,
    Leader,
    Lock,
    Observation,
    Session,
    SessionState,
    run_as_leader,
)


def show_leader(leader: Leader | None) -> None:
    if leader is None:
        print("nobody leads")
    else:
        print(f"{leader.value!r} leads since revision {leader.create_revision}")


def on_config(event: Event) -> None:
    print(event.type.name, event.kv.key, event.kv.value)


def on_session(old: SessionState, new: SessionState, reason: BaseException | None) -> None:
    print(f"session {old.name} -> {new.name}: {reason}")


def on_lost(reason: CoordError) -> None:
    print("lost:", reason)


async def nightly(client: Client) -> int | None:
    """The guide's lock (a session of its own), guarding the job's write."""
    try:
        lock: Lock = await client.lock(b"jobs/nightly", timeout=10)
    except Timeout:
        return None
    try:
        result = await client.submit(Transaction(
            compare=[lock.guard()], success=[OpSet(b"jobs/nightly/last", b"done")]))
        return result.header.revision
    finally:
        await lock.release()


async def lead(election: Election) -> str:
    return f"led {election.name!r} with token {election.token}"


def lead_forever(client: Client) -> defer.Deferred[str]:
    done: defer.Deferred[str] = run_as_leader(client, b"workers", b"worker-2", lead, ttl=5)
    return done


async def main(reactor: IReactorTime) -> None:
    async with Client(reactor, ["http://127.0.0.1:2379"], timeout=5.0) as client:
        written: Revision = await client.set(b"config/app/port", b"8080")
        print(written.revision)
        found = await client.get(KeySet(b"config/app/", prefix=True))
        for kv in found.kvs:
            print(kv.key, kv.value, kv.mod_revision)
        try:
            await client.submit(Transaction(
                compare=[CompValue(b"config/app/port", "==", b"8080")],
                success=[OpSet(b"config/app/port", b"9090")]))
        except Failed:
            print("changed by someone else first")
        watching = client.watch([KeySet(b"config/app/", prefix=True)], on_config)
        async with client.events(b"config/app/port") as events:
            async for event in events:
                on_config(event)
                break
        watching.cancel()
        print(await nightly(client))

        lease: Lease = await client.lease(30)
        remaining: int = await lease.remaining()
        print(f"lease {lease.lease_id:x}: {remaining} s left")
        await lease.revoke()

        session = await Session.create(client, ttl=10)
        stop_listening = session.listen(on_session)
        async with session:
            db = Lock(session, "jobs/db")
            async with db:
                print("holding", db, "token", db.token, db.held)
            if await db.try_acquire():
                db.lost.addCallback(on_lost)
                await db.release()
            other = await Lock(session, b"jobs/other").acquire(timeout=2.5)
            await other.release()

            election = Election(session, b"workers")
            observation: Observation = election.observe(show_leader)
            first: Leader | None = await observation.ready
            show_leader(first)
            elected = await election.campaign(b"worker-1", timeout=30)
            elected.lost.addCallback(on_lost)
            proclaimed: int = await elected.proclaim("worker-1 v2")
            leader: Leader = await election.leader()
            print(proclaimed, leader.key, election.is_leader, election.state.name)
            await election.resign()
            observation.close()
            async with election.observe() as changes:
                async for change in changes:
                    show_leader(change)
                    break
        stop_listening()
        print(session.state.name, session.reason)
        print(await lead_forever(client))


if __name__ == "__main__":
    react(main)
