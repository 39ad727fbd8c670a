"""coord._checks: the argument checks every option and call uses, as tables."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from coord import InvalidArgument
from coord._checks import callback, positive_int, seconds

# -- seconds ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "kwargs", "expected"), [
    (5, {}, 5.0),
    (0.25, {}, 0.25),
    (Fraction(1, 4), {}, 0.25),
    (10**300, {}, 1e300),
    (None, {}, None),
    (math.inf, {}, None),  # infinity is "no limit", as None
    (0, {"zero_ok": True}, 0.0),
    (0.0, {"zero_ok": True}, 0.0),
    (3, {"none_ok": False}, 3.0),
])
def test_seconds_takes(value, kwargs, expected):
    got = seconds("t", value, **kwargs)
    assert got == expected
    assert got is None or type(got) is float


@pytest.mark.parametrize(("value", "kwargs", "exc", "words"), [
    (-1, {}, InvalidArgument, ">= 0"),
    (-0.001, {}, InvalidArgument, ">= 0"),
    (-math.inf, {}, InvalidArgument, ">= 0"),
    (math.nan, {}, InvalidArgument, ">= 0"),
    (0, {}, InvalidArgument, "more than 0"),
    (0.0, {}, InvalidArgument, "more than 0"),
    (-1, {"zero_ok": True}, InvalidArgument, ">= 0"),
    (math.nan, {"zero_ok": True}, InvalidArgument, ">= 0"),
    (math.inf, {"none_ok": False}, InvalidArgument, "finite"),
    (10**400, {}, InvalidArgument, "too large"),
    (None, {"none_ok": False}, TypeError, "not None"),
    ("5", {}, TypeError, "not str"),
    (b"5", {}, TypeError, "not bytes"),
    (True, {}, TypeError, "not bool"),
    (False, {"zero_ok": True}, TypeError, "not bool"),
    ([1], {}, TypeError, "not list"),
    (1j, {}, TypeError, "not complex"),
])
def test_seconds_refuses(value, kwargs, exc, words):
    with pytest.raises(exc) as info:
        seconds("my_timeout", value, **kwargs)
    assert type(info.value) is exc  # TypeError is not an InvalidArgument, nor vice versa
    assert "my_timeout" in str(info.value) and words in str(info.value)


def test_invalid_argument_is_a_value_error():
    with pytest.raises(ValueError):
        seconds("t", -1)


# -- positive_int -----------------------------------------------------------------------------


class Index:
    """An int-like object (numpy's integers have __index__)."""

    def __index__(self):
        return 7


@pytest.mark.parametrize(("value", "kwargs", "expected"), [
    (1, {}, 1),
    (2**70, {}, 2**70),
    (Index(), {}, 7),
    (10, {"maximum": 10}, 10),
])
def test_positive_int_takes(value, kwargs, expected):
    got = positive_int("n", value, **kwargs)
    assert got == expected and type(got) is int


@pytest.mark.parametrize(("value", "kwargs", "exc", "words"), [
    (0, {}, InvalidArgument, "positive"),
    (-3, {}, InvalidArgument, "positive"),
    (11, {"maximum": 10}, InvalidArgument, "at most 10"),
    (True, {}, TypeError, "not bool"),
    (1.0, {}, TypeError, "not float"),
    ("64", {}, TypeError, "not str"),
    (None, {}, TypeError, "not NoneType"),
])
def test_positive_int_refuses(value, kwargs, exc, words):
    with pytest.raises(exc) as info:
        positive_int("max_things", value, **kwargs)
    assert type(info.value) is exc
    assert "max_things" in str(info.value) and words in str(info.value)


# -- callback ---------------------------------------------------------------------------------


async def _coroutine_function(event):
    pass


@pytest.mark.parametrize("value", [print, lambda e: None, _coroutine_function, Index])
def test_callback_takes_callables(value):
    assert callback("cb", value) is value


@pytest.mark.parametrize("value", [None, 1, "print", b"x", [print]])
def test_callback_refuses_what_cannot_be_called(value):
    with pytest.raises(TypeError, match="on_change must be callable, not"):
        callback("on_change", value)
