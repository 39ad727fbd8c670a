"""`coord` subcommands for the recipes: ``lock``, ``elect``, ``observe``, ``barrier ...``,
``config dump|watch``.

``lock`` and ``elect`` use the Go recipes' keys (``NAME/<lease hex>``), so a ``coord lock``
and an ``etcdctl lock`` on one name exclude each other, and ``coord elect`` and ``etcdctl
elect`` campaign in one election.

Run with a COMMAND (after ``--``), ``lock`` and ``elect`` hold while it runs and end with
its exit status; the command gets what it needs to fence its writes in its environment.
If what was held is lost (the lease expired: this process paused or was cut off longer
than ``--ttl``; or someone deleted the key), the command is stopped (SIGTERM, then SIGKILL
after ``--kill-after``) after a message, and the exit status is 6.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from coord.cli import _output as out
from coord.cli._kv import _bytes
from coord.cli._options import EXIT_LOST, EXIT_OK, OptionError, parse_duration
from coord.cli._runtime import Child, Context, Stopped

__all__ = ["add_commands"]

DEFAULT_TTL = 10  # seconds, as etcdctl lock's --ttl (etcdctl elect's is 60)


def _command(ctx: Context) -> list[str] | None:
    """The COMMAND given after ``--`` (None if there was no ``--``), checked before
    anything is taken: ``--`` with nothing after it, a program that is not found, or a
    bad ``--kill-after`` is a usage error at once -- not after waiting for the lock.

    Raises:
        OptionError: as :meth:`coord.cli._runtime.Child.check`, or a bad --kill-after.
    """
    argv: list[str] | None = ctx.args.command
    if argv is not None:
        Child.check(argv)
        _seconds(ctx, "kill_after")
    return argv


def _seconds(ctx: Context, name: str) -> float | None:
    text = getattr(ctx.args, name)
    return None if text is None else parse_duration("--" + name.replace("_", "-"), text)


async def _session(ctx: Context) -> Any:
    from coord.recipes import Session

    if ctx.args.ttl < 1:
        raise OptionError("--ttl must be at least 1 (seconds)")
    return await ctx.until_stopped(Session.create(ctx.client, ttl=ctx.args.ttl))


async def _close(ctx: Context, session: Any, *held: Any) -> None:
    """Let go of ``held`` and revoke the session's lease (which deletes its keys even if
    a release failed); a failure here is reported, not raised."""
    for thing in held:
        try:
            await thing.release()
        except Exception as exc:
            ctx.say(f"could not release {thing.name!r} ({type(exc).__name__}: {exc}); "
                    "revoking its lease")
    try:
        await session.close()
    except Exception as exc:
        ctx.say(f"could not revoke lease {session.lease_id:x} ({type(exc).__name__}: "
                f"{exc}); it expires in {ctx.args.ttl}s")


async def _first(ctx: Context, **waits: defer.Deferred[Any]) -> tuple[str, Any]:
    """Which of ``waits`` (or the stop signal, as "stopped") fires first, and with what.
    The Deferreds are left as they are (not cancelled)."""
    result: defer.Deferred[tuple[str, Any]] = defer.Deferred()

    def fire(value: Any, name: str) -> Any:
        if not result.called:
            result.callback((name, value))
        return value

    for name, d in (*waits.items(), ("stopped", ctx.stopped)):
        d.addBoth(fire, name)
    return await result


def _describe(reason: Any) -> str:
    value = getattr(reason, "value", reason)
    return f"{type(value).__name__}: {value}"


async def _hold(ctx: Context, what: str, lost: defer.Deferred[Any], env: dict[str, str],
                shown: bytes) -> int:
    """While something is held: run the COMMAND (or, without one, print ``shown`` and wait
    for a stop signal); stop the command if ``lost`` fires.  Returns the exit status."""
    argv = ctx.args.command
    grace = _seconds(ctx, "kill_after") or 10.0
    if argv is None:
        ctx.write(shown)
        which, value = await _first(ctx, lost=lost)
        if which == "lost":
            ctx.say(f"lost {what}: {_describe(value)}")
            return EXIT_LOST
        return EXIT_OK
    child = Child(ctx.reactor, argv, env)
    which, value = await _first(ctx, ended=child.ended, lost=lost)
    if which == "ended":
        return int(value)
    if which == "lost":
        ctx.say(f"lost {what}: {_describe(value)}; stopping the command (pid {child.pid})")
        await child.stop(grace)
        return EXIT_LOST
    child.forward(int(value))
    await child.wait(grace)
    return 128 + int(value)


# lock ---------------------------------------------------------------------------------------


async def lock(ctx: Context) -> int:
    from coord.recipes import Lock

    _command(ctx)
    timeout = _seconds(ctx, "timeout")
    session = await _session(ctx)
    held = Lock(session, _bytes(ctx.args.name))
    try:
        await ctx.until_stopped(held.acquire(timeout=timeout))
        env = {"COORD_LOCK_KEY": held.key.decode("utf-8", "surrogateescape"),
               "COORD_FENCING_TOKEN": str(held.token),
               "COORD_LEASE_ID": out.hex_id(session.lease_id),
               # etcdctl lock's names, so a script written for it runs unchanged.
               "ETCD_LOCK_KEY": held.key.decode("utf-8", "surrogateescape"),
               "ETCD_LOCK_REV": str(held.revision)}
        if ctx.json:
            shown = out.json_line({"key": out.b64(held.key), "token": held.token,
                                   "revision": held.revision,
                                   "lease": out.hex_id(session.lease_id)})
        else:
            shown = held.key + b"\n"
        return await _hold(ctx, f"the lock {ctx.args.name!r}", held.lost, env, shown)
    finally:
        await _close(ctx, session, held)


# election -----------------------------------------------------------------------------------


def _leader_json(leader: Any) -> dict[str, Any]:
    if leader is None:
        return {"leader": None}
    return {"leader": {"key": out.b64(leader.key), "value": out.b64(leader.value),
                       "token": leader.create_revision, "lease": out.hex_id(leader.lease),
                       "revision": leader.revision}}


async def elect(ctx: Context) -> int:
    from coord.recipes import Election

    if ctx.args.listen:
        if ctx.args.value is not None or ctx.args.command is not None:
            raise OptionError("--listen takes only NAME")
        return await observe(ctx)
    if ctx.args.value is None:
        raise OptionError("elect needs NAME and VALUE (or --listen NAME)")
    _command(ctx)
    timeout = _seconds(ctx, "timeout")
    session = await _session(ctx)
    candidacy = Election(session, _bytes(ctx.args.name))
    try:
        await ctx.until_stopped(candidacy.campaign(_bytes(ctx.args.value), timeout=timeout))
        env = {"COORD_ELECTION_KEY": candidacy.key.decode("utf-8", "surrogateescape"),
               "COORD_FENCING_TOKEN": str(candidacy.token),
               "COORD_LEASE_ID": out.hex_id(session.lease_id)}
        if ctx.json:
            shown = out.json_line({"key": out.b64(candidacy.key),
                                   "value": out.b64(_bytes(ctx.args.value)),
                                   "token": candidacy.token,
                                   "lease": out.hex_id(session.lease_id)})
        else:
            shown = candidacy.key + b"\n" + _bytes(ctx.args.value) + b"\n"
        return await _hold(ctx, f"the leadership of {ctx.args.name!r}", candidacy.lost,
                           env, shown)
    finally:
        await _close(ctx, session, _Resign(candidacy))


class _Resign:
    """An Election's release is its resign()."""

    def __init__(self, candidacy: Any) -> None:
        self.name = candidacy.name
        self._candidacy = candidacy

    def release(self) -> defer.Deferred[None]:
        resigned: defer.Deferred[None] = self._candidacy.resign()
        return resigned


async def observe(ctx: Context) -> int:
    from coord.errors import NoLeader
    from coord.recipes import election

    def report(leader: Any) -> None:
        if ctx.json:
            ctx.write(out.json_line(_leader_json(leader)))
        elif leader is None:
            ctx.say(f"{ctx.args.name!r} has no leader")
        else:
            ctx.write(leader.key + b"\n" + leader.value + b"\n")

    # The observation rides out an unreachable or hung etcd, its first read included (it
    # reads again until it can): read the leader once first, so that a bad endpoint, a
    # hung server or a refused read ends this command as it ends the others (exit 3, 4,
    # 5) instead of waiting in silence.
    try:
        await ctx.until_stopped(election.leader(ctx.client, _bytes(ctx.args.name)))
    except NoLeader:
        pass
    except Stopped:
        return EXIT_OK
    observation = election.observe(ctx.client, _bytes(ctx.args.name), report)
    try:
        await ctx.until_stopped(observation.done)
    except Stopped:
        return EXIT_OK
    finally:
        observation.close()
    return EXIT_OK


# barriers -----------------------------------------------------------------------------------


async def barrier_hold(ctx: Context) -> int:
    from coord.recipes import Barrier

    if ctx.args.ttl is None:
        created = await Barrier(ctx.client, _bytes(ctx.args.name)).hold()
        ctx.write(out.json_line({"held": True, "created": created}) if ctx.json else
                  b"holding\n" if created else b"already held\n")
        return EXIT_OK
    session = await _session(ctx)
    barrier = Barrier(ctx.client, _bytes(ctx.args.name), session)
    try:
        created = await ctx.until_stopped(barrier.hold())
        ctx.write(out.json_line({"held": True, "created": created}) if ctx.json else
                  b"holding\n" if created else b"already held\n")
        if not created:
            return EXIT_OK  # someone else's hold: nothing of ours to keep
        which, value = await _first(ctx, lost=session.lost)
        if which == "lost":
            ctx.say(f"lost the barrier's session: {_describe(value)}")
            return EXIT_LOST
        return EXIT_OK
    finally:
        await _close(ctx, session)


async def barrier_release(ctx: Context) -> int:
    from coord.recipes import Barrier

    released = await Barrier(ctx.client, _bytes(ctx.args.name)).release()
    ctx.write(out.json_line({"released": released}) if ctx.json else
              b"released\n" if released else b"was not held\n")
    return EXIT_OK


async def barrier_wait(ctx: Context) -> int:
    from coord.recipes import Barrier

    timeout = _seconds(ctx, "timeout")
    barrier = Barrier(ctx.client, _bytes(ctx.args.name))
    # Barrier.wait rides out an unreachable or hung etcd (it reads again until it can):
    # one read first, so that a bad endpoint, a hung server or a refused read ends this
    # command as it ends the others (exit 3, 4, 5) instead of waiting in silence.
    await ctx.until_stopped(ctx.client.get(barrier.key, keys_only=True))
    revision = await ctx.until_stopped(barrier.wait(timeout=timeout))
    ctx.write(out.json_line({"released": True, "revision": revision}) if ctx.json else
              b"released\n")
    return EXIT_OK


async def barrier_enter(ctx: Context) -> int:
    from coord.recipes import DoubleBarrier

    if ctx.args.count < 1:
        raise OptionError("COUNT must be at least 1")
    _command(ctx)
    timeout = _seconds(ctx, "timeout")
    session = await _session(ctx)
    barrier = DoubleBarrier(session, _bytes(ctx.args.name), ctx.args.count)
    try:
        await ctx.until_stopped(barrier.enter(timeout=timeout))
        ctx.say(f"entered {ctx.args.name!r} with {ctx.args.count - 1} others")
        code = EXIT_OK
        if ctx.args.command is not None:
            env = {"COORD_BARRIER_KEY": barrier.key.decode("utf-8", "surrogateescape"),
                   "COORD_LEASE_ID": out.hex_id(session.lease_id)}
            code = await _hold(ctx, f"the barrier {ctx.args.name!r}", barrier.lost, env, b"")
            if code == EXIT_LOST or code > 128:
                return code
        await ctx.until_stopped(barrier.leave(timeout=timeout))
        ctx.say(f"left {ctx.args.name!r}")
        return code
    finally:
        await _close(ctx, session)


# config -------------------------------------------------------------------------------------


def _config_simple(values: Any) -> bytes:
    return b"".join(key + b"=" + value + b"\n" for key, value in sorted(values.items()))


async def _config(ctx: Context) -> Any:
    from coord.recipes import ConfigWatcher

    watcher = ConfigWatcher(ctx.client, _bytes(ctx.args.prefix))
    snapshot = await ctx.until_stopped(watcher.start(timeout=ctx.settings.command_timeout))
    if ctx.json:
        ctx.write(out.json_line({"revision": watcher.revision,
                                 "values": out.config_values(dict(snapshot))}))
    else:
        ctx.write(_config_simple(snapshot))
    return watcher


async def config_dump(ctx: Context) -> int:
    watcher = await _config(ctx)
    watcher.stop()
    return EXIT_OK


async def config_watch(ctx: Context) -> int:
    watcher = await _config(ctx)

    def show(change: Any) -> None:
        if ctx.json:
            ctx.write(out.json_line({
                "revision": change.revision, "resync": change.resync,
                "set": out.config_values({**change.added, **change.changed}),
                "deleted": [k.decode("utf-8", "backslashreplace") for k in change.removed]}))
            return
        lines = [b"PUT " + k + b"=" + v + b"\n"
                 for k, v in sorted({**change.added, **change.changed}.items())]
        lines += [b"DELETE " + k + b"\n" for k in sorted(change.removed)]
        ctx.write(b"".join(lines))

    watcher.on_change(show)
    try:
        await ctx.stopped
    finally:
        watcher.stop()
    return EXIT_OK


# the parsers --------------------------------------------------------------------------------


def _holding(parser: Any, ttl: int = DEFAULT_TTL, wait: bool = True) -> None:
    parser.add_argument("--ttl", type=int, default=ttl,
                        help="the session's lease TTL in seconds: how long after this "
                             "process stops keeping it alive that it is let go "
                             "(default: %(default)s)")
    if wait:
        parser.add_argument("--timeout", default=None,
                            help="give up waiting after this long, e.g. 30s (exit 4); "
                                 "default: wait as long as it takes")


def _runs_command(parser: Any) -> None:
    parser.add_argument("--kill-after", default=None,
                        help="after SIGTERM, SIGKILL the command if it has not ended "
                             "after this long (default: 10s)")
    parser.set_defaults(command=None)  # None: no `--`; [] is `--` with nothing after it
    # The COMMAND after `--` is split off argv before parsing (coord.cli.split_command):
    # an argparse REMAINDER would swallow the options that follow NAME.
    parser.usage = parser.format_usage().replace("usage: ", "", 1).rstrip() + \
        " [-- COMMAND [ARG ...]]"


def add_commands(commands: Any) -> None:
    """Register the subcommands (see :func:`coord.cli._kv.add_commands`)."""
    command = commands.command
    p = command("lock", lock, "take a lock, hold it while a command runs",
                "Take the lock NAME (waiting for it), then run COMMAND while holding it and "
                "exit with its status; without a COMMAND, print the lock's key and hold it "
                "until Ctrl-C or SIGTERM. The command's environment has COORD_LOCK_KEY, "
                "COORD_FENCING_TOKEN (the lock key's create revision: compare it to fence "
                "writes), COORD_LEASE_ID, and etcdctl's ETCD_LOCK_KEY and ETCD_LOCK_REV. "
                "If the lock is lost, the command is stopped and the exit status is 6. "
                "Shares its keys with `etcdctl lock` and Go's concurrency.Mutex.")
    p.add_argument("name", help="the lock's name (its key prefix)")
    _holding(p)
    _runs_command(p)

    p = command("elect", elect, "campaign in an election, lead while a command runs",
                "Campaign in the election NAME with VALUE; once leader, run COMMAND while "
                "leading and exit with its status, or without a COMMAND print the leader's "
                "key and value and lead until Ctrl-C or SIGTERM (then resign). The command's "
                "environment has COORD_ELECTION_KEY, COORD_FENCING_TOKEN and COORD_LEASE_ID. "
                "If the leadership is lost, the command is stopped and the exit status is 6. "
                "With --listen, observe instead (as `coord observe`). Shares its keys with "
                "`etcdctl elect` and Go's concurrency.Election.")
    p.add_argument("name", help="the election's name (its key prefix)")
    p.add_argument("value", nargs="?", default=None, help="this candidate's value")
    p.add_argument("-l", "--listen", action="store_true",
                   help="print each leader as it changes (as `coord observe`)")
    _holding(p, ttl=60)
    _runs_command(p)

    p = command("observe", observe, "print an election's leader at each change",
                "Print the leader of the election NAME (its key and value, as `etcdctl elect "
                "--listen` does) now and at each change, until Ctrl-C or SIGTERM.")
    p.add_argument("name", help="the election's name")

    barriers = commands.group(
        "barrier", help="barriers: hold, release, wait; enter a double barrier",
        description="Barriers (Go's recipe layout: the barrier is the key NAME).")
    p = command("hold", barrier_hold, "hold a barrier (waiters block)",
                "Hold the barrier NAME: `barrier wait NAME` blocks until it is released. "
                "Without --ttl the hold stays after this command exits, until `barrier "
                "release NAME`; with --ttl it is held by a lease until Ctrl-C or SIGTERM "
                "(or this process dies and the TTL passes).", group=barriers)
    p.add_argument("name", help="the barrier's key")
    p.add_argument("--ttl", type=int, default=None,
                   help="hold under a lease of this TTL, until stopped")
    p = command("release", barrier_release, "release a barrier",
                "Release the barrier NAME: every waiter goes on.", group=barriers)
    p.add_argument("name", help="the barrier's key")
    p = command("wait", barrier_wait, "wait until a barrier is released",
                "Wait until the barrier NAME is not held (at once if it is not).",
                group=barriers)
    p.add_argument("name", help="the barrier's key")
    p.add_argument("--timeout", default=None, help="give up after this long (exit 4)")
    p = command("enter", barrier_enter, "meet COUNT processes at a double barrier",
                "Enter the double barrier NAME: wait until COUNT participants have entered, "
                "run COMMAND (if any), then leave: wait until all have left.",
                group=barriers)
    p.add_argument("name", help="the barrier's name")
    p.add_argument("count", type=int, help="how many participants meet")
    _holding(p)
    _runs_command(p)

    configs = commands.group(
        "config", help="dump or watch a config prefix",
        description="A config is the keys under a prefix, read as one consistent snapshot "
                    "and kept up to date by a watch (coord.recipes.ConfigWatcher).")
    p = command("dump", config_dump, "print a config prefix",
                "Print every key under PREFIX as key=value, one consistent snapshot.",
                group=configs)
    p.add_argument("prefix", help="the config prefix, e.g. config/app/")
    p = command("watch", config_watch, "print a config prefix, then each change",
                "Print every key under PREFIX as key=value, then each change (PUT key=value, "
                "DELETE key) as it is applied, until Ctrl-C or SIGTERM.",
                group=configs)
    p.add_argument("prefix", help="the config prefix")
