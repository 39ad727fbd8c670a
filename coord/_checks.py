"""Argument checks shared by the client, its transports and the recipes.

Each function takes the argument's *name* (for the message) and its value, and returns
the value in the form the caller uses, or raises before anything is sent:

* ``TypeError`` naming the argument for a value of the wrong type (as
  :func:`coord.keyset.as_bytes` does for keys);
* :class:`coord.errors.InvalidArgument` (also a ``ValueError``) naming the argument for a
  value of the right type that makes no sense (negative, NaN, zero where zero would
  fail every call or spin).

No Twisted import: usable from the sans-IO layer, the transports and the recipes alike.
Checks cost a few type tests; hot paths call them only for values that differ from
their defaults.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Literal, overload

from coord.errors import InvalidArgument

__all__ = ["callback", "positive_int", "seconds"]


@overload
def seconds(name: str, value: Any, *, none_ok: Literal[False],
            zero_ok: bool = False) -> float: ...


@overload
def seconds(name: str, value: Any, *, none_ok: bool = True,
            zero_ok: bool = False) -> float | None: ...


def seconds(name: str, value: Any, *, none_ok: bool = True,
            zero_ok: bool = False) -> float | None:
    """A duration in seconds (a timeout, an interval), as a float; None for "no limit".

    Args:
        name: the argument's name, for the error message.
        value: an int or float (any ``numbers.Real`` but bool), or None.
        none_ok: whether None ("no limit", "never") is allowed.  Infinity means the same,
            so it is returned as None when ``none_ok``, and refused otherwise (a value
            that must be finite: Twisted's timers and connect timeouts take no infinity).
        zero_ok: whether 0 is allowed.  Refused by default: a call timeout of 0 fails
            every call (a write after it was sent, outcome unknown), an idle timeout or
            interval of 0 spins.  Allowed for "do not wait" (``Lock.acquire(timeout=0)``).

    Returns:
        ``float(value)``, or None for None or infinity (if ``none_ok``).

    Raises:
        TypeError: not a number (a str such as ``"5"``, a bool), or None when not
            ``none_ok``.
        InvalidArgument: negative, NaN, zero (unless ``zero_ok``), infinity (unless
            ``none_ok``), or an int too large to be a float.
    """
    if value is None:
        if none_ok:
            return None
        raise TypeError(f"{name} must be a number of seconds, not None")
    # bool is an int: True would be a one-second timeout nobody meant.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "a number of seconds or None" if none_ok else "a number of seconds"
        raise TypeError(f"{name} must be {kind}, not {type(value).__name__}")
    try:
        result = float(value)
    except OverflowError:
        raise InvalidArgument(f"{name} is too large: {value}") from None
    if result == math.inf:
        if none_ok:
            return None
        raise InvalidArgument(f"{name} must be a finite number of seconds, not {value}")
    if not result >= 0:  # also NaN, for which every comparison is false
        raise InvalidArgument(f"{name} must be a number of seconds >= 0, not {value}")
    if result == 0 and not zero_ok:
        raise InvalidArgument(f"{name} must be more than 0 seconds, not {value}")
    return result


def positive_int(name: str, value: Any, *, maximum: int | None = None) -> int:
    """An int >= 1 (a count, a size, a TTL), at most ``maximum`` if given.

    Anything with ``__index__`` (numpy's integers) counts as an int; bool and float do
    not (``2.0`` would hide a computation that went wrong).

    Raises:
        TypeError: not an int.
        InvalidArgument: less than 1, or more than ``maximum``.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not bool")
    try:
        result = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None
    if result < 1:
        raise InvalidArgument(f"{name} must be positive, not {result}")
    if maximum is not None and result > maximum:
        raise InvalidArgument(f"{name} must be at most {maximum}, not {result}")
    return result


def callback(name: str, value: Any) -> Any:
    """A callable, returned as is.

    Raises:
        TypeError: ``value`` is not callable (None included).
    """
    if not callable(value):
        raise TypeError(f"{name} must be callable, not {type(value).__name__}")
    return value
