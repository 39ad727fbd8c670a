"""Transactions: comparisons, operations and the Transaction that groups them.

A transaction (``rpc.proto`` TxnRequest) is applied atomically at one revision: if every
comparison holds, the ``success`` operations run, else the ``failure`` operations.
:meth:`coord.Client.submit` returns the success responses or raises
:class:`coord.errors.Failed` carrying the failure responses.

Comparisons take a key or a :class:`~coord.keyset.KeySet` (a range comparison holds when
it holds for every key in the range) and an operator among ``==``, ``!=``, ``>``, ``<``.
A comparison on a key that does not exist sees version, create and mod revision 0 and
lease 0 -- so ``CompCreated(key, "==", 0)`` means "absent" -- but a *value* comparison
on a missing key never holds, whatever the operator (etcd's ``applyCompare``).
"""

from __future__ import annotations

from binascii import b2a_base64
from typing import Any, Union

import attrs

from coord.errors import InvalidArgument
from coord.keyset import KeyLike, KeySet, as_bytes

__all__ = [
    "CompCreated",
    "CompLease",
    "CompModified",
    "CompValue",
    "CompVersion",
    "OpDel",
    "OpGet",
    "OpSet",
    "Transaction",
]

_OPERATORS = {"==": "EQUAL", "!=": "NOT_EQUAL", ">": "GREATER", "<": "LESS"}
SORT_ORDERS = {None: "NONE", "none": "NONE", "ascend": "ASCEND", "descend": "DESCEND"}
SORT_TARGETS = {
    None: "KEY", "key": "KEY", "version": "VERSION", "create": "CREATE",
    "mod": "MOD", "value": "VALUE",
}


def _operator(compare: str) -> str:
    try:
        return _OPERATORS[compare]
    except (KeyError, TypeError):
        raise InvalidArgument(f"compare must be one of '==', '!=', '>', '<', not {compare!r}")


def _int(value: object, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise InvalidArgument(f"{name} must be >= {minimum}, not {value}")
    return value


def _compare_json(keys: KeySet, operator: str, target: str, field: str, value: Any) -> dict:
    body: dict[str, Any] = {"key": keys.key, "result": operator, "target": target, field: value}
    if keys.range_end is not None:
        body["range_end"] = keys.range_end
    return body


class _Compare:
    """Shared shape of the five comparisons: a key set, an operator and a target value."""

    _target = ""
    _field = ""
    key: KeySet
    compare: str

    def _json(self) -> dict:
        raise NotImplementedError


@attrs.frozen(init=False)
class CompValue(_Compare):
    """Compare the value of ``key`` (bytes order) with ``value``."""

    key: KeySet
    compare: str
    value: bytes

    def __init__(self, key: KeyLike, compare: str, value: bytes | str) -> None:
        _operator(compare)
        self.__attrs_init__(KeySet.of(key), compare, as_bytes(value, "value"))

    def _json(self) -> dict:
        return _compare_json(self.key, _OPERATORS[self.compare], "VALUE", "value", self.value)


def _revision_compare(target: str, field: str, attr_name: str) -> Any:
    """Build a comparison class on an integer field (version, revisions, lease)."""

    def __init__(self: Any, key: KeyLike, compare: str, value: int) -> None:
        _operator(compare)
        self.__attrs_init__(KeySet.of(key), compare, _int(value, attr_name))

    def _json(self: Any) -> dict:
        return _compare_json(self.key, _OPERATORS[self.compare], target, field,
                             getattr(self, attr_name))

    return __init__, _json


@attrs.frozen(init=False)
class CompVersion(_Compare):
    """Compare the version of ``key`` (modifications since creation; 0 = absent)."""

    key: KeySet
    compare: str
    version: int
    __init__, _json = _revision_compare("VERSION", "version", "version")


@attrs.frozen(init=False)
class CompCreated(_Compare):
    """Compare the create revision of ``key`` (0 = absent)."""

    key: KeySet
    compare: str
    created_revision: int
    __init__, _json = _revision_compare("CREATE", "create_revision", "created_revision")


@attrs.frozen(init=False)
class CompModified(_Compare):
    """Compare the mod revision of ``key`` (0 = absent)."""

    key: KeySet
    compare: str
    modified_revision: int
    __init__, _json = _revision_compare("MOD", "mod_revision", "modified_revision")


@attrs.frozen(init=False)
class CompLease(_Compare):
    """Compare the lease ID attached to ``key`` (0 = none)."""

    key: KeySet
    compare: str
    lease: int
    __init__, _json = _revision_compare("LEASE", "lease", "lease")


Comparison = CompValue | CompVersion | CompCreated | CompModified | CompLease


@attrs.frozen(init=False)
class OpGet:
    """Read ``key`` (a key or KeySet) inside a transaction; options as :meth:`Client.get`."""

    key: KeySet
    options: dict

    def __init__(self, key: KeyLike, **options: Any) -> None:
        self.__attrs_init__(KeySet.of(key), range_options(**options))

    def _json(self) -> dict:
        return {"request_range": range_json(self.key, self.options)}


@attrs.frozen(init=False)
class OpSet:
    """Write ``value`` at ``key`` inside a transaction; options as :meth:`Client.set`."""

    key: bytes
    value: bytes
    lease: int
    return_previous: bool
    ignore_value: bool
    ignore_lease: bool

    def __init__(self, key: bytes | str, value: bytes | str = b"", lease: Any = None,
                 return_previous: bool = False, ignore_value: bool = False,
                 ignore_lease: bool = False) -> None:
        key = as_bytes(key, "key")
        if not key:
            raise InvalidArgument("key must not be empty")
        value = as_bytes(value, "value")
        lease_id = lease_id_of(lease)
        if ignore_value and value:
            raise InvalidArgument("ignore_value=True keeps the current value: pass no value")
        if ignore_lease and lease_id:
            raise InvalidArgument("ignore_lease=True keeps the current lease: pass no lease")
        self.__attrs_init__(key, value, lease_id, bool(return_previous),
                            bool(ignore_value), bool(ignore_lease))

    def _json(self) -> dict:
        return {"request_put": put_json(self)}


@attrs.frozen(init=False)
class OpDel:
    """Delete ``key`` (a key or KeySet) inside a transaction."""

    key: KeySet
    return_previous: bool

    def __init__(self, key: KeyLike, return_previous: bool = False) -> None:
        self.__attrs_init__(KeySet.of(key), bool(return_previous))

    def _json(self) -> dict:
        return {"request_delete_range": delete_json(self.key, self.return_previous)}


Operation = Union[OpGet, OpSet, OpDel, "Transaction"]

# etcd's default --max-txn-ops; a transaction with more operations in one list is refused.
MAX_TXN_OPS = 128


@attrs.frozen(init=False)
class Transaction:
    """``Transaction(compare, success, failure)``: atomic compare-and-swap over keys.

    A Transaction is also an operation: nest it in another's ``success`` or ``failure``.

    Raises:
        TypeError: a comparison or operation of the wrong type.
        TooManyOperations: more than 128 comparisons, or operations in a branch.
    """

    compare: tuple
    success: tuple
    failure: tuple

    def __init__(self, compare: Any = None, success: Any = None, failure: Any = None) -> None:
        from coord.errors import TooManyOperations

        lists = []
        for name, items, kinds in (
            ("compare", compare, _Compare),
            ("success", success, (OpGet, OpSet, OpDel, Transaction)),
            ("failure", failure, (OpGet, OpSet, OpDel, Transaction)),
        ):
            items = tuple(items or ())
            for item in items:
                if not isinstance(item, kinds):
                    raise TypeError(f"Transaction {name} got {type(item).__name__}: {item!r}")
            if len(items) > MAX_TXN_OPS:
                raise TooManyOperations(
                    f"Transaction {name} has {len(items)} entries; etcd allows {MAX_TXN_OPS}")
            lists.append(items)
        self.__attrs_init__(*lists)

    def _json(self) -> dict:
        return {"request_txn": self.request_body()}

    def request_body(self) -> dict:
        """The gateway's JSON body of ``POST /v3/kv/txn`` for this transaction."""
        body: dict[str, Any] = {}
        if self.compare:
            body["compare"] = [c._json() for c in self.compare]
        if self.success:
            body["success"] = [op._json() for op in self.success]
        if self.failure:
            body["failure"] = [op._json() for op in self.failure]
        return body

    def payload_bytes(self) -> int:
        """Rough request size: the keys and values it carries (for the local size check)."""
        total = 0
        for c in self.compare:
            total += len(c.key.key) + len(getattr(c, "value", b""))
        for op in self.success + self.failure:
            if isinstance(op, Transaction):
                total += op.payload_bytes()
            elif isinstance(op, OpSet):
                total += len(op.key) + len(op.value)
            else:
                total += len(op.key.key)
        return total


# -- request bodies (also used by the client for plain get / set / delete) -------------------


def lease_id_of(lease: Any) -> int:
    """A lease argument as its ID: None -> 0, an int, or anything with ``lease_id``."""
    if lease is None:
        return 0
    lease_id = getattr(lease, "lease_id", lease)
    return _int(lease_id, "lease")


def range_options(limit: int | None = None, sort_order: str | None = None,
                  sort_target: str | None = None, revision: int | None = None,
                  keys_only: bool = False, count_only: bool = False,
                  serializable: bool = False, min_mod_revision: int | None = None,
                  max_mod_revision: int | None = None, min_create_revision: int | None = None,
                  max_create_revision: int | None = None) -> dict:
    """Validate get options and return them as RangeRequest JSON fields."""
    opts: dict[str, Any] = {}
    if limit is not None and _int(limit, "limit"):
        opts["limit"] = limit
    if sort_order not in SORT_ORDERS:
        raise InvalidArgument(f"sort_order must be 'ascend', 'descend' or None, not {sort_order!r}")
    if sort_target not in SORT_TARGETS:
        raise InvalidArgument(
            "sort_target must be one of 'key', 'version', 'create', 'mod', 'value', "
            f"not {sort_target!r}")
    if sort_order not in (None, "none"):
        opts["sort_order"] = SORT_ORDERS[sort_order]
    if sort_target not in (None, "key"):
        opts["sort_target"] = SORT_TARGETS[sort_target]
    for name, value in (("revision", revision), ("min_mod_revision", min_mod_revision),
                        ("max_mod_revision", max_mod_revision),
                        ("min_create_revision", min_create_revision),
                        ("max_create_revision", max_create_revision)):
        if value is not None and _int(value, name):
            opts[name] = value
    if keys_only:
        opts["keys_only"] = True
    if count_only:
        opts["count_only"] = True
    if serializable:
        opts["serializable"] = True
    return opts


def _b64(value: bytes) -> str:
    # Encoded here rather than by the JSON encoder's fallback: this is the hot path.
    return b2a_base64(value, newline=False).decode("ascii")


def keys_json(keys: KeySet) -> dict[str, Any]:
    """The ``key`` / ``range_end`` fields every request on a key set starts with."""
    body = {"key": _b64(keys.key)}
    if keys.range_end is not None:
        body["range_end"] = _b64(keys.range_end)
    return body


def range_json(keys: KeySet, options: dict) -> dict:
    body = keys_json(keys)
    if options:
        body.update(options)
    return body


def put_json(op: OpSet) -> dict:
    body: dict[str, Any] = {"key": _b64(op.key)}
    if op.value:
        body["value"] = _b64(op.value)
    if op.lease:
        body["lease"] = op.lease
    if op.return_previous:
        body["prev_kv"] = True
    if op.ignore_value:
        body["ignore_value"] = True
    if op.ignore_lease:
        body["ignore_lease"] = True
    return body


def delete_json(keys: KeySet, return_previous: bool) -> dict:
    body = keys_json(keys)
    if return_previous:
        body["prev_kv"] = True
    return body
