"""How the `coord` command prints what etcd answered: pure functions from coord's result
types to bytes, in two formats.

``simple`` is etcdctl's simple format, so a script written for etcdctl's output reads
coord's: a key-value is its key and its value on two lines; ``--keys-only`` gives the key
and an empty line; a lease is ``%016x``.

``json`` is one JSON document per answer (one per line for a stream: ``watch``,
``observe``, ``config watch``).  Keys and values are base64, as in etcd's own JSON, since
they are bytes; revisions and counts are numbers; **IDs (member, cluster, lease) are hex
strings**, as the simple format prints them: a 64-bit ID as a JSON number loses its low
digits in any reader that parses numbers as doubles (JavaScript, jq).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from typing import Any

from coord.types import Event, Header, KeyValue, Member, Status

__all__ = [
    "b64",
    "config_values",
    "event_json",
    "event_simple",
    "header_json",
    "hex_id",
    "human_size",
    "json_line",
    "kv_json",
    "kv_simple",
    "member_json",
    "member_simple",
    "status_json",
    "status_simple",
]


def json_line(document: Any) -> bytes:
    """One JSON document on one line."""
    return json.dumps(document, separators=(",", ":"), sort_keys=False).encode() + b"\n"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hex_id(number: int) -> str:
    """An etcd ID as etcdctl prints it: 16 hex digits."""
    return f"{number:016x}"


def header_json(header: Header) -> dict[str, Any]:
    return {"cluster_id": hex_id(header.cluster_id), "member_id": hex_id(header.member_id),
            "revision": header.revision, "raft_term": header.raft_term}


def kv_json(kv: KeyValue, keys_only: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"key": b64(kv.key), "create_revision": kv.create_revision,
                           "mod_revision": kv.mod_revision, "version": kv.version}
    if not keys_only:
        out["value"] = b64(kv.value)
    if kv.lease:
        out["lease"] = hex_id(kv.lease)
    return out


def kv_simple(kv: KeyValue, keys_only: bool = False, value_only: bool = False) -> bytes:
    """etcdctl's simple format: key and value lines; keys only: key and an empty line."""
    if value_only:
        return kv.value + b"\n"
    if keys_only:
        return kv.key + b"\n\n"
    return kv.key + b"\n" + kv.value + b"\n"


def event_simple(event: Event, prev_kv: bool = False) -> bytes:
    """etcdctl watch's simple format: the type, then (with ``prev_kv``) the previous
    key-value, then the key-value (a delete's value is empty)."""
    out = event.type.value.encode() + b"\n"
    if prev_kv and event.prev_kv is not None:
        out += kv_simple(event.prev_kv)
    return out + kv_simple(event.kv)


def event_json(event: Event) -> dict[str, Any]:
    out: dict[str, Any] = {"type": event.type.value, "revision": event.revision,
                           "kv": kv_json(event.kv)}
    if event.prev_kv is not None:
        out["prev_kv"] = kv_json(event.prev_kv)
    return out


def human_size(size: int) -> str:
    """A size as etcdctl prints db sizes (``20 kB``: powers of 1000)."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" or value >= 10 else \
                f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def status_simple(endpoint: str, status: Status) -> bytes:
    """etcdctl endpoint status's simple line: endpoint, ID, version, db size, is leader,
    is learner, raft term, raft index, raft applied index, errors."""
    member = status.header.member_id
    fields = [endpoint, f"{member:x}", status.version, human_size(status.db_size),
              str(status.leader == member).lower(), str(status.is_learner).lower(),
              str(status.raft_term), str(status.raft_index),
              str(status.raft_applied_index), ", ".join(status.errors)]
    return ", ".join(fields).encode() + b"\n"


def status_json(endpoint: str, status: Status) -> dict[str, Any]:
    return {"endpoint": endpoint, "member_id": hex_id(status.header.member_id),
            "version": status.version, "db_size": status.db_size,
            "db_size_in_use": status.db_size_in_use, "leader": hex_id(status.leader),
            "is_leader": status.leader == status.header.member_id,
            "is_learner": status.is_learner, "raft_term": status.raft_term,
            "raft_index": status.raft_index,
            "raft_applied_index": status.raft_applied_index,
            "revision": status.header.revision, "errors": list(status.errors)}


def member_simple(member: Member) -> bytes:
    """etcdctl member list's simple line: ID, status, name, peer URLs, client URLs, is
    learner (a member that has not started yet has no name)."""
    fields = [f"{member.id:x}", "started" if member.name else "unstarted", member.name,
              ",".join(member.peer_urls), ",".join(member.client_urls),
              str(member.is_learner).lower()]
    return ", ".join(fields).encode() + b"\n"


def member_json(member: Member) -> dict[str, Any]:
    return {"id": hex_id(member.id), "name": member.name,
            "peer_urls": list(member.peer_urls), "client_urls": list(member.client_urls),
            "is_learner": member.is_learner}


def _text(value: bytes) -> Any:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": b64(value)}


def config_values(values: Mapping[bytes, bytes] | Iterable[tuple[bytes, bytes]]
                  ) -> dict[str, Any]:
    """Config keys and values as JSON: text (UTF-8), or ``{"base64": ...}`` for a value
    that is not UTF-8.  Keys are decoded the same way (a non-UTF-8 key is escaped)."""
    items = values.items() if isinstance(values, Mapping) else values
    return {key.decode("utf-8", "backslashreplace"): _text(value) for key, value in items}
