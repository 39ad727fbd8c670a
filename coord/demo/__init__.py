"""`coord demo`: coord at work against a real etcd.

* ``coord demo`` -- the recipes (:mod:`coord.demo.recipes`): worker processes share a
  lock, elect a leader and survive its death, lose a lock while frozen, meet at a
  barrier and react to a config change;
* ``coord demo --kv`` -- the KV client (:mod:`coord.demo.kv`): reads, writes, prefix
  reads, transactions, leases and compaction.

Both run against ``--url``, or against an embedded etcd (`coord.server.EtcdServer` on
free loopback ports) started before and stopped after, whatever happens.

This module imports neither Twisted nor the client, so that the worker processes
(``python -m coord.demo.worker``) load only what they use.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

__all__ = ["CheckFailed", "Checks", "main", "with_etcd"]


class CheckFailed(Exception):
    """A demo check did not hold."""


class Checks:
    """Counts the checks that held; the first one that does not raises CheckFailed."""

    def __init__(self) -> None:
        self.passed = 0

    def __call__(self, condition: object, what: str) -> None:
        # A plain `assert` would vanish under `python -O`; the demo must still check.
        if not condition:
            raise CheckFailed(what)
        self.passed += 1
        print(f"    ok  {what}", flush=True)


def with_etcd(url: str | None, run_at: Callable[[str], int]) -> int:
    """``run_at(url)``, or, when ``url`` is None, ``run_at`` an embedded etcd's URL.

    The embedded etcd is stopped when ``run_at`` returns or raises.

    Returns:
        ``run_at``'s exit status; 1 if no etcd could be started.
    """
    try:
        if url is not None:
            return run_at(url)
        return _embedded(run_at)
    except KeyboardInterrupt:
        # (While the reactor runs, Ctrl-C is the reactor's: this is a Ctrl-C outside it,
        # e.g. while etcd starts.)
        print("coord demo: interrupted", file=sys.stderr)
        return 130


def _embedded(run_at: Callable[[str], int]) -> int:
    from coord.server import EtcdNotFound, EtcdServer, EtcdStartError

    server = None
    try:
        try:
            server = EtcdServer()
            server.start()
        except (EtcdNotFound, EtcdStartError) as e:
            print(f"coord demo: cannot start an embedded etcd: {e}", file=sys.stderr)
            return 1
        print(f"started embedded etcd {server.version} at {server.url}", flush=True)
        return run_at(server.url)
    finally:
        if server is not None:
            running = server.running
            server.stop()
            if running:
                print("embedded etcd stopped", flush=True)


def main(args: argparse.Namespace) -> int:
    """Run the recipes demo, or the KV walk-through if ``args.kv``, against ``args.url``
    (None: an embedded etcd).

    Returns:
        The exit status: 0 when every check held, non-zero otherwise.
    """
    if getattr(args, "kv", False):
        from coord.demo import kv

        return with_etcd(args.url, kv.run_at)
    from coord.demo import recipes

    return with_etcd(args.url, recipes.run_at)
