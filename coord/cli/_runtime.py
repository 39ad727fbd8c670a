"""Running one client subcommand: the reactor, the client, signals, errors, exit status.

A command is ``async def command(ctx) -> int``.  :func:`run` makes the client from the
options, runs the command under the reactor, and turns what it raised into a message on
stderr and an exit status (see ``EXIT_*`` in :mod:`coord.cli._options`):

=====  ==============================================================================
0      done
1      etcd refused or failed the request (or a write's outcome is unknown)
2      bad usage: a bad option or argument
3      no endpoint could be reached
4      a timeout: a request's (``--command-timeout``), or a wait's (``--timeout``)
5      authentication failed, or permission denied
6      a lock, a leadership or a session was lost while it was held
128+N  stopped by signal N while a COMMAND ran (SIGINT: 130, SIGTERM: 143)
=====  ==============================================================================

SIGINT and SIGTERM end a command cleanly: what it holds is released and its session's
lease revoked before it exits.  A command that runs until it is stopped (``watch``,
``observe``, ``lock`` without a COMMAND...) exits 0 when stopped so.
"""

from __future__ import annotations

import argparse
import getpass
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.internet.task import react

from coord.cli import _options
from coord.cli._options import OptionError, Settings

__all__ = ["Child", "Context", "error_exit", "run"]


class Stopped(Exception):
    """SIGINT or SIGTERM arrived (``signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Context:
    """What a command runs with.

    Attributes:
        args: the parsed arguments.  settings: the client options.
        client: a :class:`coord.Client` on the endpoints.  reactor: the reactor.
        stopped: a Deferred that fires with the signal number at SIGINT or SIGTERM.
        name: the command's name for messages (``coord lock``).
    """

    def __init__(self, reactor: Any, args: argparse.Namespace, settings: Settings,
                 client: Any, name: str) -> None:
        self.reactor = reactor
        self.args = args
        self.settings = settings
        self.client = client
        self.name = name
        self.stopped: defer.Deferred[int] = defer.Deferred()

    @property
    def json(self) -> bool:
        return self.settings.output == "json"

    def write(self, data: bytes) -> None:
        """Write to stdout and flush (so a pipe reading a stream sees each record).

        If the reader has gone away (``coord observe NAME | head -2``), the command is
        stopped as by a signal (SIGPIPE): what it holds is released and it exits.
        """
        try:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            # Python ignores SIGPIPE, so the write fails instead of killing us (etcdctl
            # dies of it).  stdout now points at /dev/null: the interpreter's own flush
            # at exit would fail again and make the exit status 120 (Python's docs,
            # "Note on SIGPIPE").
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            _fire(self.stopped, signal.SIGPIPE)

    def say(self, message: str) -> None:
        """A message for the person at the terminal, on stderr."""
        print(f"{self.name}: {message}", file=sys.stderr, flush=True)

    def until_stopped(self, waiting: defer.Deferred[Any]) -> defer.Deferred[Any]:
        """``waiting``, cancelled if a stop signal comes first (then raises Stopped)."""
        result: defer.Deferred[Any] = defer.Deferred()
        stopping: list[int] = []

        def stop(signum: int) -> int:
            if not result.called:
                stopping.append(signum)
                waiting.cancel()  # calls done(), with its CancelledError (or its result)
            return signum

        def done(outcome: Any) -> None:
            if result.called:
                return
            if stopping:
                result.errback(Stopped(stopping[0]))
            else:
                result.callback(outcome)  # a Failure goes down the errback chain

        self.stopped.addCallback(stop)
        waiting.addBoth(done)
        return result


def error_exit(name: str, exc: BaseException) -> tuple[int, str]:
    """The exit status and message for an error a command raised."""
    from coord import errors

    text = str(exc) or type(exc).__name__
    kind = type(exc).__name__
    # The transport's OutcomeUnknown messages say so already ("...; the write may or may
    # not have been applied"): say it once.
    unknown = "" if "may or may not" in text else \
        " (the write may or may not have been applied)"
    if isinstance(exc, OptionError):
        return _options.EXIT_USAGE, text
    if isinstance(exc, errors.Timeout):
        extra = unknown if isinstance(exc, errors.OutcomeUnknown) else ""
        return _options.EXIT_TIMEOUT, f"timed out: {text}{extra}"
    if isinstance(exc, (errors.PermissionDenied, errors.Unauthenticated)):
        return _options.EXIT_DENIED, f"{kind}: {text}"
    if isinstance(exc, (errors.LockLost, errors.LeadershipLost, errors.SessionLost,
                        errors.ParticipantLost)):
        return _options.EXIT_LOST, f"{kind}: {text}"
    if isinstance(exc, errors.OutcomeUnknown):
        return _options.EXIT_ERROR, f"{kind}: {text}{unknown}"
    if isinstance(exc, errors.Unavailable):
        return _options.EXIT_UNAVAILABLE, f"cannot reach etcd: {text}"
    if isinstance(exc, (errors.InvalidArgument, TypeError)) and \
            not isinstance(exc, errors.EtcdError):
        return _options.EXIT_USAGE, text
    if isinstance(exc, errors.CoordError):
        return _options.EXIT_ERROR, f"{kind}: {text}"
    return _options.EXIT_ERROR, f"unexpected {kind}: {text}"


def _credentials(settings: Settings) -> tuple[str | None, str | None]:
    if settings.user is None or settings.password is not None:
        return settings.user, settings.password
    if not sys.stdin.isatty():
        raise OptionError(f"--user {settings.user}: no password (give user:password, "
                          "--password, or $ETCDCTL_PASSWORD)")
    return settings.user, getpass.getpass(f"Password for {settings.user}: ")


def make_client(reactor: Any, settings: Settings, urls: Sequence[str] | None = None) -> Any:
    """A Client on ``urls`` (default: the settings' endpoints) with the options' TLS,
    credentials and timeouts."""
    from coord import Client

    user, password = _credentials(settings)
    return Client(reactor, list(urls or settings.urls), timeout=settings.command_timeout,
                  connect_timeout=settings.dial_timeout, user=user, password=password,
                  ca_cert=settings.ca_cert, cert=settings.cert, key=settings.key,
                  attempt_timeout=min(2.0, settings.command_timeout))


def run(args: argparse.Namespace, command: Callable[[Context], Awaitable[int]],
        name: str) -> int:
    """Run ``command`` with a client from ``args`` and the environment; return its exit
    status (errors are printed on stderr as ``coord <name>: ...``)."""
    try:
        settings = _options.settings(args, os.environ)
    except OptionError as exc:
        print(f"coord {name}: {exc}", file=sys.stderr)
        return _options.EXIT_USAGE
    status = [_options.EXIT_ERROR]

    async def main(reactor: Any) -> None:
        # react() calls us before the reactor runs; the reactor installs its signal
        # handlers as it starts, and ours must replace them (below), so wait for that.
        running: defer.Deferred[None] = defer.Deferred()
        reactor.callWhenRunning(running.callback, None)
        await running
        try:
            client = make_client(reactor, settings)
        except Exception as exc:
            code, message = error_exit(name, exc)
            print(f"coord {name}: {message}", file=sys.stderr)
            status[0] = code
            return
        ctx = Context(reactor, args, settings, client, f"coord {name}")

        def on_signal(signum: int, frame: Any) -> None:
            reactor.callFromThread(_fire, ctx.stopped, signum)

        # Twisted's handlers would stop the reactor under our feet: a signal now ends the
        # command the way it chooses (releasing what it holds).
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        try:
            status[0] = await command(ctx)
        except Stopped as stop:
            status[0] = 128 + stop.signum
        except Exception as exc:
            code, message = error_exit(name, exc)
            ctx.say(message)
            status[0] = code
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            await client.close()

    try:
        react(main)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            return int(exit_.code) if isinstance(exit_.code, int) else _options.EXIT_ERROR
    return status[0]


def _fire(d: defer.Deferred[int], signum: int) -> None:
    if not d.called:
        d.callback(signum)


class _ChildProtocol(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.ended: defer.Deferred[int] = defer.Deferred()

    def processEnded(self, reason: Any) -> None:
        value = reason.value
        if isinstance(value, error.ProcessTerminated) and value.signal is not None:
            code = 128 + int(value.signal)
        else:
            code = int(getattr(value, "exitCode", 0) or 0)
        self.ended.callback(code)


class Child:
    """A COMMAND run while something is held: its stdin, stdout and stderr are ours, its
    environment ours plus ``env``.

    Attributes:
        ended: fires with its exit status (128+N if killed by signal N).
    """

    def __init__(self, reactor: Any, argv: Sequence[str], env: dict[str, str]) -> None:
        executable = self.check(argv)
        self._reactor = reactor
        self._proto = _ChildProtocol()
        self.ended = self._proto.ended
        environment = dict(os.environ)
        environment.update(env)
        self._process = reactor.spawnProcess(self._proto, executable, list(argv),
                                             env=environment, childFDs={0: 0, 1: 1, 2: 2})

    @staticmethod
    def check(argv: Sequence[str]) -> str:
        """The executable that would run ``argv`` (looked up on ``$PATH``), so that a
        command can refuse a COMMAND before it takes anything.

        Raises:
            OptionError: ``argv`` is empty (``--`` with nothing after it), or its program
                is not found.
        """
        if not argv:
            raise OptionError("no COMMAND after --")
        return _which(argv[0])

    @property
    def pid(self) -> int | None:
        pid: int | None = self._process.pid
        return pid

    def signal(self, signum: int) -> None:
        """Send ``signum`` unless it has ended."""
        if not self.ended.called:
            try:
                self._process.signalProcess(signum)
            except error.ProcessExitedAlready:
                pass

    def forward(self, signum: int) -> None:
        """Pass on a stop signal we got -- unless the terminal sent it to our whole
        process group (Ctrl-C at a terminal reaches the child already; a second SIGINT
        would interrupt its own clean-up)."""
        if signum == signal.SIGINT and _foreground():
            return
        self.signal(signum)

    async def stop(self, grace: float) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit status."""
        self.signal(signal.SIGTERM)
        return await self.wait(grace)

    async def wait(self, grace: float) -> int:
        """Wait ``grace`` seconds for it to end, then SIGKILL it; its exit status."""
        timer = self._reactor.callLater(grace, self.signal, signal.SIGKILL)
        try:
            return await self.ended
        finally:
            if timer.active():
                timer.cancel()


def _foreground() -> bool:
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def _which(program: str) -> str:
    if os.sep in program:
        return program
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(directory or ".", program)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise OptionError(f"{program}: command not found")
