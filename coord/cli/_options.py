"""The options every client subcommand takes, named as etcdctl names them, and the pure
decisions made from them: which endpoints, which credentials, which timeouts.

Each option is looked up in this order: the flag, ``$COORD_<NAME>``, ``$ETCDCTL_<NAME>``
(``NAME`` is the flag's name in capitals, ``-`` as ``_``: ``--dial-timeout`` is
``$ETCDCTL_DIAL_TIMEOUT``, as etcdctl reads it), then the default.  Nothing here does I/O,
so every rule has a table test (tests/test_cli.py).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = [
    "DEFAULT_ENDPOINT",
    "EXIT_DENIED",
    "EXIT_ERROR",
    "EXIT_LOST",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "OptionError",
    "Settings",
    "add_global_options",
    "endpoint_urls",
    "parse_duration",
    "settings",
]

DEFAULT_ENDPOINT = "127.0.0.1:2379"

# Exit statuses (docs/cli.md lists them).  2 is argparse's own for a usage error.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_TIMEOUT = 4
EXIT_DENIED = 5
EXIT_LOST = 6


class OptionError(Exception):
    """An option's value is not usable (exit status 2, with this message)."""


# (flag, help).  Each is also $COORD_<NAME>, then $ETCDCTL_<NAME>.  Their dests are
# "opt_<name>": `--key` must not collide with a command's KEY argument.
GLOBAL_OPTIONS: tuple[tuple[str, str], ...] = (
    ("--endpoints", "comma-separated etcd endpoints, host:port or URLs "
     f"(default: {DEFAULT_ENDPOINT})"),
    ("--cacert", "verify the server with this CA bundle (PEM file); implies https"),
    ("--cert", "client certificate (PEM file) for mutual TLS; implies https"),
    ("--key", "the client certificate's key (PEM file, unencrypted)"),
    ("--user", "user name, or user:password (asks for the password if it is not given)"),
    ("--password", "the user's password (instead of user:password)"),
    ("--dial-timeout", "time allowed to connect to an endpoint, e.g. 2s, 500ms "
     "(default: 2s)"),
    ("--command-timeout", "time allowed for each request, e.g. 5s (default: 5s)"),
)


def add_global_options(parser: argparse.ArgumentParser) -> None:
    """Add the client options to ``parser`` (the top-level parser and every subcommand's:
    they may come before or after the subcommand's name, as etcdctl allows).

    Their defaults are SUPPRESS: an option given before the subcommand is not overwritten
    by the subcommand parser's default (argparse copies a subparser's defaults over the
    parent's values).
    """
    group = parser.add_argument_group("connection options (also $COORD_<NAME>, "
                                      "$ETCDCTL_<NAME>)")
    for flag, help_text in GLOBAL_OPTIONS:
        group.add_argument(flag, dest=_dest(flag), default=argparse.SUPPRESS, help=help_text,
                           metavar=flag.lstrip("-").replace("-", "_").upper())
    group.add_argument("-w", "--write-out", "--output", dest=_dest("--write-out"),
                       choices=("simple", "json"), default=argparse.SUPPRESS,
                       help="output format (default: simple)")


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(name: str, text: str) -> float:
    """Seconds from a duration as etcdctl writes it (Go's ``time.ParseDuration``: ``5s``,
    ``500ms``, ``1m30s``) or a plain number of seconds (``2.5``).

    Raises:
        OptionError: not a duration, or not more than 0.
    """
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        pos, seconds = 0, 0.0
        for match in _DURATION.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNIT[match.group(2)]
            pos = match.end()
        if pos != len(text) or not text:
            raise OptionError(f"{name}: {text!r} is not a duration (e.g. 5s, 500ms, 1m)")
    if not math.isfinite(seconds) or seconds <= 0:
        raise OptionError(f"{name}: {text!r} must be more than 0")
    return seconds


def endpoint_urls(text: str, tls: bool) -> list[str]:
    """The URLs of a comma-separated endpoint list.

    ``host:port`` becomes ``http://host:port``, or ``https://`` when ``tls`` (a CA, a
    certificate or a key was given, as etcdctl decides); a URL keeps its scheme.

    Raises:
        OptionError: an empty list, an empty item, a scheme other than http/https, or a
            host without a port.
    """
    urls = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise OptionError(f"--endpoints: {text!r} has an empty endpoint")
        if "://" in item:
            scheme = item.split("://", 1)[0].lower()
            if scheme not in ("http", "https"):
                raise OptionError(f"--endpoints: {item!r}: only http:// and https:// "
                                  "endpoints are supported")
            urls.append(item)
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise OptionError(f"--endpoints: {item!r} is not host:port or a URL")
        urls.append(("https://" if tls else "http://") + item)
    return urls


@attrs.frozen
class Settings:
    """What the client options came to.

    Attributes:
        urls: the endpoint URLs, in order.
        ca_cert, cert, key: PEM file paths (or None).
        user, password: credentials (both or neither; the password may still be None if
            it is to be asked for).
        dial_timeout, command_timeout: seconds.
        output: ``"simple"`` or ``"json"``.
    """

    urls: list[str]
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = None
    dial_timeout: float = 2.0
    command_timeout: float = 5.0
    output: str = "simple"


def _dest(flag: str) -> str:
    return "opt_" + flag.lstrip("-").replace("-", "_")


def _lookup(args: argparse.Namespace, env: Mapping[str, str], flag: str) -> str | None:
    value = getattr(args, _dest(flag), None)
    if value is not None:
        return str(value)
    name = flag.lstrip("-").replace("-", "_").upper()
    for var in (f"COORD_{name}", f"ETCDCTL_{name}"):
        if env.get(var):
            return env[var]
    return None


def settings(args: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    """The settings from parsed ``args`` and the environment ``env``.

    Raises:
        OptionError: a bad endpoint list, duration or output format; a key without a
            certificate; a password without a user.
    """
    get: Any = lambda flag: _lookup(args, env, flag)  # noqa: E731
    ca_cert, cert, key = get("--cacert"), get("--cert"), get("--key")
    if (cert is None) != (key is None):
        raise OptionError("--cert and --key go together (a client certificate and its key)")
    urls = endpoint_urls(get("--endpoints") or DEFAULT_ENDPOINT,
                         tls=any(v is not None for v in (ca_cert, cert, key)))
    user, password = get("--user"), get("--password")
    if user is not None and password is None and ":" in user:
        user, password = user.split(":", 1)
    if password is not None and user is None:
        raise OptionError("--password needs --user")
    if user == "":
        raise OptionError("--user: the user name is empty")
    output = get("--write-out") or "simple"
    if output not in ("simple", "json"):
        raise OptionError(f"--write-out: {output!r} is not one of simple, json")
    dial = get("--dial-timeout")
    command = get("--command-timeout")
    return Settings(
        urls=urls, ca_cert=ca_cert, cert=cert, key=key, user=user, password=password,
        dial_timeout=parse_duration("--dial-timeout", dial) if dial else 2.0,
        command_timeout=parse_duration("--command-timeout", command) if command else 5.0,
        output=output)
