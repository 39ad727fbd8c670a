"""KeySet: a single key, a ``[start, end)`` range, or every key under a prefix.

etcd addresses keys with a pair ``(key, range_end)`` (``rpc.proto``, RangeRequest):

* no ``range_end``: the single key ``key``;
* ``range_end`` greater than ``key``: the keys in ``[key, range_end)``;
* ``range_end == b"\\0"``: every key ``>= key``; with ``key == b"\\0"`` too, every key.

A prefix ``p`` is the range ``[p, p + 1)`` where ``p + 1`` is ``p`` with its trailing
``0xff`` bytes dropped and its new last byte incremented (``b"a\\xff"`` -> ``b"b"``).  A
prefix with no byte left to increment (``b""``, ``b"\\xff\\xff"``) has no upper bound, so
its range end is ``b"\\0"``; the empty prefix is every key, ``(b"\\0", b"\\0")``.
"""

from __future__ import annotations

from typing import Union

import attrs

from coord.errors import InvalidArgument

__all__ = ["KeySet", "as_bytes", "prefix_range_end"]

# A key argument: bytes, str (encoded as UTF-8), or a KeySet where ranges are allowed.
KeyLike = Union[bytes, str, "KeySet"]


def as_bytes(value: object, name: str) -> bytes:
    """Return ``value`` as bytes: bytes as is, str UTF-8 encoded.

    Raises:
        TypeError: ``value`` is neither bytes (bytearray, memoryview) nor str; the
            message names it (``name``).
        InvalidArgument: a str that UTF-8 cannot encode (a lone surrogate such as
            ``"\\ud800"``, as ``os.fsdecode`` makes of undecodable bytes); the message
            names it.
    """
    if type(value) is bytes:
        return value
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError as e:
            # Quote only the culprit: a value may be large, or secret.
            raise InvalidArgument(
                f"{name} cannot be encoded as UTF-8: {value[e.start:e.end]!r} at position "
                f"{e.start} ({e.reason}); give bytes instead") from None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{name} must be bytes or str, not {type(value).__name__}")


def prefix_range_end(prefix: bytes) -> bytes:
    """The exclusive end of the range holding every key that starts with ``prefix``.

    ``b"\\0"`` (no upper bound) when every byte of ``prefix`` is 0xff or it is empty.
    """
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"
    return stripped[:-1] + bytes((stripped[-1] + 1,))


@attrs.frozen(init=False)
class KeySet:
    """A set of keys: ``KeySet(key)``, ``KeySet(start, end)`` or ``KeySet(p, prefix=True)``.

    Attributes:
        key: the key, the range's first key, or the prefix.
        range_end: ``None`` for a single key; else the range's exclusive end as etcd
            wants it (``b"\\0"`` meaning no upper bound).
        type: ``"single"``, ``"range"`` or ``"prefix"``.

    Raises:
        TypeError: a key or range end that is not bytes or str.
        InvalidArgument: an empty single key or range start, both a range end and
            ``prefix=True``, a range end not after its start, or a str key or range
            end that cannot be UTF-8 encoded.
    """

    key: bytes
    range_end: bytes | None
    type: str

    def __init__(self, key: bytes | str, range_end: bytes | str | None = None,
                 prefix: bool | None = None) -> None:
        key = as_bytes(key, "key")
        if prefix:
            if range_end is not None:
                raise InvalidArgument("KeySet takes either range_end or prefix=True, not both")
            end = prefix_range_end(key)
            kind = "prefix"
            if not key:
                key = b"\0"  # etcd refuses an empty key; (\0, \0) is every key.
        elif range_end is not None:
            end = as_bytes(range_end, "range_end")
            if not key:
                raise InvalidArgument("a key range's start must not be empty")
            if end != b"\0" and end <= key:
                raise InvalidArgument(
                    f"a key range's end must sort after its start: [{key!r}, {end!r})")
            kind = "range"
        else:
            if not key:
                raise InvalidArgument("key must not be empty")
            end = None
            kind = "single"
        self.__attrs_init__(key, end, kind)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` (bytes) belongs to this set."""
        if not isinstance(key, bytes):
            return False
        if self.range_end is None:
            return key == self.key
        if key < self.key:
            return False
        return self.range_end == b"\0" or key < self.range_end

    @classmethod
    def of(cls, key: KeyLike, name: str = "key") -> KeySet:
        """``key`` as a KeySet: a KeySet as is, bytes or str as a single key."""
        if isinstance(key, KeySet):
            return key
        return cls(as_bytes(key, name))
