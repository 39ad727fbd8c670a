"""`coord` subcommands for the key-value store and the cluster, in etcdctl's terms:
``status``, ``get``, ``put``, ``del``, ``watch``, ``lease ...``, ``member list``,
``endpoint health|status``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from twisted.internet import defer, task

from coord.cli import _output as out
from coord.cli._options import EXIT_ERROR, EXIT_OK, OptionError
from coord.cli._runtime import Context, Stopped, make_client

__all__ = ["add_commands"]


def _bytes(text: str) -> bytes:
    # What the shell gave us, back to the bytes it came from (an undecodable byte in
    # argv arrives as a surrogate escape: PEP 383).
    return text.encode("utf-8", "surrogateescape")


def _keyset(ctx: Context) -> Any:
    """The key, range, prefix or from-key the arguments name."""
    from coord import KeySet

    args = ctx.args
    key = _bytes(args.key)
    given = [name for name, on in (("--prefix", args.prefix),
                                    ("--from-key", getattr(args, "from_key", False)),
                                    ("range_end", args.range_end is not None)) if on]
    if len(given) > 1:
        raise OptionError(f"{' and '.join(given)} cannot be combined")
    if args.prefix:
        return KeySet(key, prefix=True)
    if getattr(args, "from_key", False):
        return KeySet(key or b"\0", b"\0")
    if args.range_end is not None:
        return KeySet(key, _bytes(args.range_end))
    return KeySet(key)


_SORT_TARGET = {"CREATE": "create", "KEY": "key", "MODIFY": "mod", "VALUE": "value",
                "VERSION": "version"}


async def get(ctx: Context) -> int:
    args = ctx.args
    if args.limit is not None and args.limit < 0:
        raise OptionError("--limit must be 0 (no limit) or more")
    if args.rev is not None and args.rev < 0:
        raise OptionError("--rev must be 0 (latest) or more")
    sort_target = _SORT_TARGET[args.sort_by] if args.sort_by else None
    sort_order = args.order.lower() if args.order else ("ascend" if sort_target else None)
    result = await ctx.client.get(
        _keyset(ctx), limit=args.limit or None, revision=args.rev or None,
        keys_only=args.keys_only, count_only=args.count_only, sort_order=sort_order,
        sort_target=sort_target, serializable=args.consistency == "s")
    if ctx.json:
        document: dict[str, Any] = {"header": out.header_json(result.header),
                                    "kvs": [out.kv_json(kv, args.keys_only)
                                            for kv in result.kvs],
                                    "count": result.count, "more": result.more}
        ctx.write(out.json_line(document))
    elif args.count_only:
        ctx.write(b"%d\n" % result.count)
    else:
        ctx.write(b"".join(out.kv_simple(kv, args.keys_only, args.print_value_only)
                           for kv in result.kvs))
    return EXIT_OK


def _lease_id(text: str) -> int:
    try:
        value = int(text, 16)
    except ValueError:
        raise OptionError(f"{text!r} is not a lease ID (hex, as `lease grant` prints it)")
    if not 0 < value < 2**63:
        raise OptionError(f"{text!r} is not a lease ID (1 to 7fffffffffffffff)")
    return value


async def put(ctx: Context) -> int:
    args = ctx.args
    value = _bytes(args.value) if args.value is not None else sys.stdin.buffer.read()
    if args.value is None and value.endswith(b"\n"):
        value = value[:-1]  # `echo v | coord put k`: the newline is the shell's, not v's
    lease = _lease_id(args.lease) if args.lease else None
    result = await ctx.client.set(_bytes(args.key), value, lease=lease,
                                  return_previous=args.prev_kv,
                                  ignore_value=args.ignore_value,
                                  ignore_lease=args.ignore_lease)
    if ctx.json:
        document: dict[str, Any] = {"header": out.header_json(result.header)}
        if result.previous is not None:
            document["prev_kv"] = out.kv_json(result.previous)
        ctx.write(out.json_line(document))
    else:
        ctx.write(b"OK\n" + (out.kv_simple(result.previous) if result.previous else b""))
    return EXIT_OK


async def delete(ctx: Context) -> int:
    args = ctx.args
    result = await ctx.client.delete(_keyset(ctx), return_previous=args.prev_kv)
    if ctx.json:
        ctx.write(out.json_line({"header": out.header_json(result.header),
                                 "deleted": result.deleted,
                                 "prev_kvs": [out.kv_json(kv) for kv in result.previous]}))
    else:
        ctx.write(b"%d\n" % result.deleted + b"".join(out.kv_simple(kv)
                                                      for kv in result.previous))
    return EXIT_OK


async def watch(ctx: Context) -> int:
    args = ctx.args
    if args.rev is not None and args.rev < 0:
        raise OptionError("--rev must be 0 (from now) or more")

    def show(event: Any) -> None:
        if ctx.json:
            ctx.write(out.json_line(out.event_json(event)))
        else:
            ctx.write(out.event_simple(event, args.prev_kv))

    keys = _keyset(ctx)
    # A watch retries an unreachable etcd for ever; a first read says at once if it is.
    await ctx.client.get(keys, count_only=True)
    watching = ctx.client.watch(keys, show, start_revision=args.rev or None,
                                return_previous=args.prev_kv)
    try:
        await ctx.until_stopped(watching)
    except Stopped:
        return EXIT_OK
    return EXIT_OK


# leases -------------------------------------------------------------------------------------


async def lease_grant(ctx: Context) -> int:
    if ctx.args.ttl < 1:
        raise OptionError("TTL must be at least 1 (seconds)")
    lease = await ctx.client.lease(ctx.args.ttl)
    if ctx.json:
        ctx.write(out.json_line({"id": out.hex_id(lease.lease_id), "ttl": lease.ttl}))
    else:
        ctx.write(b"lease %s granted with TTL(%ds)\n" % (out.hex_id(lease.lease_id).encode(),
                                                         lease.ttl))
    return EXIT_OK


def _lease(ctx: Context) -> Any:
    from coord import Lease

    return Lease(ctx.client, _lease_id(ctx.args.id))


async def lease_revoke(ctx: Context) -> int:
    lease = _lease(ctx)
    header = await lease.revoke()
    if ctx.json:
        ctx.write(out.json_line({"id": out.hex_id(lease.lease_id),
                                 "header": out.header_json(header)}))
    else:
        ctx.write(b"lease %s revoked\n" % out.hex_id(lease.lease_id).encode())
    return EXIT_OK


async def lease_timetolive(ctx: Context) -> int:
    from coord import LeaseExpired

    lease = _lease(ctx)
    ident = out.hex_id(lease.lease_id)
    try:
        info = await lease.time_to_live(keys=ctx.args.keys)
    except LeaseExpired:
        # etcdctl says so and exits 0: an expired lease is an answer, not an error.
        if ctx.json:
            ctx.write(out.json_line({"id": ident, "ttl": -1, "granted_ttl": 0}))
        else:
            ctx.write(b"lease %s already expired\n" % ident.encode())
        return EXIT_OK
    if ctx.json:
        document: dict[str, Any] = {"id": ident, "ttl": info.ttl,
                                    "granted_ttl": info.granted_ttl}
        if ctx.args.keys:
            document["keys"] = [out.b64(k) for k in info.keys]
        ctx.write(out.json_line(document))
    else:
        line = b"lease %s granted with TTL(%ds), remaining(%ds)" % (
            ident.encode(), info.granted_ttl, info.ttl)
        if ctx.args.keys:
            line += b", attached keys([%s])" % b" ".join(info.keys)
        ctx.write(line + b"\n")
    return EXIT_OK


async def lease_list(ctx: Context) -> int:
    leases = await ctx.client.leases()
    ids = [out.hex_id(lease.lease_id) for lease in leases]
    if ctx.json:
        ctx.write(out.json_line({"leases": ids}))
    else:
        ctx.write(f"found {len(ids)} leases\n".encode() + b"".join(i.encode() + b"\n"
                                                                    for i in ids))
    return EXIT_OK


async def lease_keep_alive(ctx: Context) -> int:
    lease = _lease(ctx)
    ident = out.hex_id(lease.lease_id)
    while True:
        ttl = await lease.refresh()
        if ctx.json:
            ctx.write(out.json_line({"id": ident, "ttl": ttl}))
        else:
            ctx.write(b"lease %s keepalived with TTL(%d)\n" % (ident.encode(), ttl))
        if ctx.args.once:
            return EXIT_OK
        try:
            await ctx.until_stopped(task.deferLater(ctx.reactor, max(ttl / 3.0, 0.5)))
        except Stopped:
            return EXIT_OK


# cluster ------------------------------------------------------------------------------------


async def member_list(ctx: Context) -> int:
    members = await ctx.client.members()
    if ctx.json:
        ctx.write(out.json_line({"members": [out.member_json(m) for m in members]}))
    else:
        ctx.write(b"".join(out.member_simple(m) for m in members))
    return EXIT_OK


async def _endpoints(ctx: Context) -> list[str]:
    """The endpoints to ask: the options', or with --cluster every member's client URLs."""
    if not getattr(ctx.args, "cluster", False):
        return list(ctx.settings.urls)
    members = await ctx.client.members()
    urls = [url for m in members for url in m.client_urls]
    if not urls:
        raise OptionError("--cluster: the members list no client URLs")
    return urls


def _shown(url: str) -> str:
    """An endpoint as the user wrote it (etcdctl prints host:port)."""
    return url.split("://", 1)[1] if "://" in url else url


async def status(ctx: Context) -> int:
    urls = await _endpoints(ctx)
    answers = await defer.DeferredList([ctx.client.status(endpoint=url) for url in urls],
                                       consumeErrors=True)
    documents, failed = [], 0
    for url, (ok, result) in zip(urls, answers, strict=True):
        if not ok:
            failed += 1
            ctx.say(f"{_shown(url)}: {type(result.value).__name__}: {result.value}")
            continue
        if ctx.json:
            documents.append(out.status_json(_shown(url), result))
        else:
            ctx.write(out.status_simple(_shown(url), result))
    if ctx.json:
        ctx.write(out.json_line(documents))
    if failed == len(urls):
        # Every endpoint failed: the same status as the error a request would raise.
        raise answers[0][1].value
    return EXIT_ERROR if failed else EXIT_OK


async def _health(ctx: Context, url: str) -> dict[str, Any]:
    """One endpoint's health, as etcdctl judges it: a linearizable read (it goes through
    raft: a member without a quorum cannot answer it) with no NOSPACE alarm raised."""
    from coord import PermissionDenied

    client = make_client(ctx.reactor, ctx.settings, [url])
    started = time.monotonic()
    try:
        try:
            await client.get(b"health")
        except PermissionDenied:
            pass  # etcdctl too: the cluster answered, the user may not read the key
        alarms = await client.alarms()
        took = time.monotonic() - started
        if any(a.alarm.name == "NOSPACE" for a in alarms):
            return {"endpoint": _shown(url), "health": False, "took": _ms(took),
                    "error": "alarm NOSPACE is raised"}
        return {"endpoint": _shown(url), "health": True, "took": _ms(took)}
    except Exception as exc:
        return {"endpoint": _shown(url), "health": False,
                "took": _ms(time.monotonic() - started),
                "error": f"{type(exc).__name__}: {exc}"}
    finally:
        await client.close()


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}ms"


async def endpoint_health(ctx: Context) -> int:
    urls = await _endpoints(ctx)
    results = await defer.gatherResults([defer.ensureDeferred(_health(ctx, url))
                                         for url in urls])
    if ctx.json:
        ctx.write(out.json_line(results))
    for result in results:
        if ctx.json:
            continue
        if result["health"]:
            ctx.write(f"{result['endpoint']} is healthy: successfully committed proposal: "
                      f"took = {result['took']}\n".encode())
        else:
            sys.stderr.write(f"{result['endpoint']} is unhealthy: failed to commit "
                             f"proposal: {result['error']}\n")
    if all(r["health"] for r in results):
        return EXIT_OK
    ctx.say("unhealthy cluster")
    return EXIT_ERROR


# the parsers --------------------------------------------------------------------------------


def _key_arguments(parser: Any, what: str, from_key: bool = True) -> None:
    parser.add_argument("key", help=f"the key (or the range's start) to {what}")
    parser.add_argument("range_end", nargs="?", default=None,
                        help="the end of a key range [key, range_end) (optional)")
    parser.add_argument("--prefix", action="store_true",
                        help="every key that starts with KEY")
    if from_key:
        parser.add_argument("--from-key", action="store_true",
                            help="every key from KEY on (byte order)")


def add_commands(commands: Any) -> None:
    """Register the store and cluster commands on ``commands`` (a
    :class:`coord.cli.Commands`)."""
    command = commands.command
    p = command("get", get, "read keys",
                "Read a key, a range [KEY, RANGE_END), or every key with a prefix. "
                "Prints each key and its value on two lines, as etcdctl does.")
    _key_arguments(p, "read")
    p.add_argument("--rev", type=int, default=None,
                   help="read the store as of this revision (default: the latest)")
    p.add_argument("--keys-only", action="store_true", help="print the keys only")
    p.add_argument("--print-value-only", action="store_true", help="print the values only")
    p.add_argument("--count-only", action="store_true", help="print the number of keys only")
    p.add_argument("--limit", type=int, default=None, help="at most this many keys")
    p.add_argument("--sort-by", choices=sorted(_SORT_TARGET), type=str.upper, default=None,
                   help="sort by this (default: by key)")
    p.add_argument("--order", choices=("ASCEND", "DESCEND"), type=str.upper, default=None,
                   help="sort order (with --sort-by)")
    p.add_argument("--consistency", choices=("l", "s"), default="l",
                   help="l: linearizable (default); s: serializable (the member's own "
                        "copy, possibly stale)")

    p = command("put", put, "write a key",
                "Write VALUE at KEY (VALUE from stdin if not given, without its final "
                "newline). Prints OK.")
    p.add_argument("key", help="the key")
    p.add_argument("value", nargs="?", default=None, help="the value (default: stdin)")
    p.add_argument("--lease", default=None, help="attach the key to this lease (hex ID)")
    p.add_argument("--prev-kv", action="store_true", help="also print the previous value")
    p.add_argument("--ignore-value", action="store_true",
                   help="keep the current value (change only the lease)")
    p.add_argument("--ignore-lease", action="store_true",
                   help="keep the current lease (change only the value)")

    p = command("del", delete, "delete keys",
                "Delete a key, a range or a prefix. Prints the number of keys deleted.")
    _key_arguments(p, "delete")
    p.add_argument("--prev-kv", action="store_true", help="also print the deleted values")

    p = command("watch", watch, "print changes to keys as they happen",
                "Print every change to a key, a range or a prefix (PUT or DELETE, the key, "
                "the value) until Ctrl-C or SIGTERM. Resumes across broken connections "
                "and failover without losing or repeating a change.")
    _key_arguments(p, "watch", from_key=False)
    p.add_argument("--rev", type=int, default=None,
                   help="start from this revision (default: from now)")
    p.add_argument("--prev-kv", action="store_true",
                   help="also print the key-value before each change")

    leases = commands.group(
        "lease", help="grant, revoke and inspect leases",
        description="Leases: a key written with --lease ID is deleted when its lease expires "
                    "(TTL seconds after its last keep-alive) or is revoked.")
    p = command("grant", lease_grant, "grant a lease", "Grant a lease of TTL seconds.",
                group=leases)
    p.add_argument("ttl", type=int, help="seconds")
    p = command("revoke", lease_revoke, "revoke a lease (deleting its keys)",
                "Revoke a lease: every key attached to it is deleted.",
                group=leases)
    p.add_argument("id", help="the lease ID (hex)")
    p = command("timetolive", lease_timetolive, "a lease's remaining time",
                "Print a lease's granted TTL and remaining time.", group=leases,
                aliases=["ttl"])
    p.add_argument("id", help="the lease ID (hex)")
    p.add_argument("--keys", action="store_true", help="also print the attached keys")
    command("list", lease_list, "list the leases", "List every lease's ID.",
            group=leases)
    p = command("keep-alive", lease_keep_alive, "keep a lease alive",
                "Refresh a lease until Ctrl-C or SIGTERM (or once, with --once).",
                group=leases)
    p.add_argument("id", help="the lease ID (hex)")
    p.add_argument("--once", action="store_true", help="refresh once and exit")

    members = commands.group(
        "member", help="cluster members",
        description="The cluster's members, as the endpoints' cluster knows them.")
    command("list", member_list, "list the members",
            "List the members: ID, status, name, peer URLs, client URLs, is learner.",
            group=members)

    endpoints = commands.group(
        "endpoint", help="endpoint health and status",
        description="Ask each endpoint (or with --cluster, each member) on its own.")
    p = command("health", endpoint_health, "check each endpoint's health",
                "Check that each endpoint can serve a linearizable read (through raft) "
                "and has no NOSPACE alarm. Exits 1 if any is unhealthy.",
                group=endpoints)
    p.add_argument("--cluster", action="store_true",
                   help="check every member's client URLs, not only --endpoints")
    p = command("status", status, "each endpoint's status",
                "Print each endpoint's status (as `coord status`).",
                group=endpoints)
    p.add_argument("--cluster", action="store_true",
                   help="every member's client URLs, not only --endpoints")
    p = command("status", status, "the status of each endpoint",
                "Print each endpoint's status: endpoint, member ID, version, db size, is "
                "leader, is learner, raft term, raft index, raft applied index, errors.")
    p.add_argument("--cluster", action="store_true",
                   help="every member's client URLs, not only --endpoints")
