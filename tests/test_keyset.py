"""KeySet, prefix_range_end and as_bytes against etcd's (key, range_end) semantics.

etcd (rpc.proto, RangeRequest): no range_end is the single key; range_end b"\\0" is every
key >= key; otherwise the half-open range [key, range_end).  A prefix p is every key that
starts with p.  Expectations here are written out by hand or derived from ``startswith``,
never from the code under test.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor

from coord import Client, CompValue, OpSet
from coord.errors import InvalidArgument
from coord.keyset import KeySet, as_bytes, prefix_range_end

SETTINGS = settings(max_examples=400, deadline=None, database=None)

# Bytes biased towards the interesting bytes for prefix arithmetic: 0xff (carry), 0xfe
# (becomes 0xff), 0x00 (the "no bound" sentinel) and 0x01.
_edge_byte = st.sampled_from([b"\x00", b"\x01", b"\xfe", b"\xff", b"\xff", b"\xff", b"a", b"b"])
edgy = st.lists(_edge_byte, max_size=8).map(b"".join)
any_bytes = st.one_of(st.binary(max_size=8), edgy)
keys = any_bytes.filter(bool)  # etcd keys are never empty


def in_etcd_range(k: bytes, key: bytes, range_end: bytes | None) -> bool:
    """etcd's membership rule for (key, range_end), written from rpc.proto."""
    if range_end is None:
        return k == key
    if k < key:
        return False
    return range_end == b"\0" or k < range_end


# -- table tests ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "key", "range_end"),
    [
        (b"", b"\0", b"\0"),  # every key
        (b"\xff", b"\xff", b"\0"),  # nothing to increment: no upper bound
        (b"\xff\xff", b"\xff\xff", b"\0"),
        (b"\xff\xff\xff", b"\xff\xff\xff", b"\0"),
        (b"a\xff", b"a\xff", b"b"),
        (b"a\xff\xff", b"a\xff\xff", b"b"),
        (b"abc", b"abc", b"abd"),
        (b"a", b"a", b"b"),
        (b"\x00", b"\x00", b"\x01"),
        (b"\x00\xff", b"\x00\xff", b"\x01"),
        (b"\xfe", b"\xfe", b"\xff"),
        (b"\xfe\xff", b"\xfe\xff", b"\xff"),
        (b"\xff\xfe", b"\xff\xfe", b"\xff\xff"),
        (b"a\xfe\xff", b"a\xfe\xff", b"a\xff"),
        (b"/config/", b"/config/", b"/config0"),
        ("/ключ/", "/ключ/".encode(), "/ключ0".encode()),  # str is UTF-8 encoded
    ],
)
def test_prefix_table(prefix, key, range_end):
    ks = KeySet(prefix, prefix=True)
    assert ks.key == key
    assert ks.range_end == range_end
    assert ks.type == "prefix"
    raw = prefix.encode() if isinstance(prefix, str) else prefix
    assert prefix_range_end(raw) == range_end


@pytest.mark.parametrize(
    ("prefix", "inside", "outside"),
    [
        (b"", [b"\0", b"a", b"\xff", b"\xff\xff\xff"], [b""]),
        (b"\xff",
         [b"\xff", b"\xff\x00", b"\xff\xff", b"\xff\xff\xff\xff"],
         [b"\xfe", b"\xfe\xff", b"a"]),
        (b"\xff\xff",
         [b"\xff\xff", b"\xff\xff\x00", b"\xff\xff\xff"],
         [b"\xff", b"\xff\xfe\xff", b"\xfe"]),
        (b"a\xff",
         [b"a\xff", b"a\xff\x00", b"a\xff\xff\xff"],
         [b"a", b"a\xfe", b"b", b"b\x00", b"a\xfe\xff"]),
        (b"abc",
         [b"abc", b"abc\x00", b"abcd", b"abc\xff\xff"],
         [b"ab", b"abd", b"abb\xff", b"abd\x00", b"b"]),
    ],
)
def test_prefix_membership_table(prefix, inside, outside):
    ks = KeySet(prefix, prefix=True)
    for k in inside:
        assert k in ks, k
    for k in outside:
        assert k not in ks, k


@pytest.mark.parametrize(
    ("args", "key", "range_end", "kind"),
    [
        ((b"k",), b"k", None, "single"),
        (("k",), b"k", None, "single"),
        (("é",), b"\xc3\xa9", None, "single"),
        ((b"\0",), b"\0", None, "single"),
        ((b"a", b"b"), b"a", b"b", "range"),
        (("a", "c"), b"a", b"c", "range"),
        ((b"a", b"a\x00"), b"a", b"a\x00", "range"),  # the smallest non-empty range
        ((b"a", b"\0"), b"a", b"\0", "range"),  # every key >= a
        ((b"\0", b"\0"), b"\0", b"\0", "range"),  # every key
        ((b"\xff", b"\0"), b"\xff", b"\0", "range"),
    ],
)
def test_constructor_table(args, key, range_end, kind):
    ks = KeySet(*args)
    assert (ks.key, ks.range_end, ks.type) == (key, range_end, kind)


def test_range_membership():
    ks = KeySet(b"b", b"d")
    assert b"b" in ks
    assert b"b\x00" in ks
    assert b"c\xff\xff" in ks
    assert b"d" not in ks
    assert b"a\xff" not in ks
    assert b"d\x00" not in ks
    open_ended = KeySet(b"b", b"\0")
    assert b"b" in open_ended
    assert b"\xff\xff\xff" in open_ended
    assert b"a\xff" not in open_ended


def test_single_membership():
    ks = KeySet(b"k")
    assert b"k" in ks
    assert b"k\x00" not in ks
    assert b"j" not in ks
    assert b"" not in ks


@pytest.mark.parametrize("other", [None, 1, 1.0, [b"k"], (b"k",), object()])
def test_in_with_non_bytes_is_false(other):
    assert (other in KeySet(b"k")) is False
    assert (other in KeySet(b"", prefix=True)) is False


def test_equality_and_hash():
    assert KeySet("a") == KeySet(b"a")
    assert hash(KeySet("a")) == hash(KeySet(b"a"))
    assert KeySet(b"a", b"b") != KeySet(b"a")
    # Same (key, range_end) but made differently: the type tells them apart.
    assert KeySet(b"a", prefix=True) != KeySet(b"a", b"b")
    assert KeySet(b"a", prefix=True).type != KeySet(b"a", b"b").type


def test_frozen():
    ks = KeySet(b"a")
    with pytest.raises(AttributeError):
        ks.key = b"b"  # type: ignore[misc]


def test_of():
    ks = KeySet(b"a", prefix=True)
    assert KeySet.of(ks) is ks
    assert KeySet.of("x") == KeySet(b"x")
    assert KeySet.of(b"x").type == "single"
    with pytest.raises(TypeError, match="mykey"):
        KeySet.of(3, "mykey")
    with pytest.raises(InvalidArgument):
        KeySet.of(b"")


@pytest.mark.parametrize("prefix", [False, None, 0])
def test_falsy_prefix_means_single(prefix):
    assert KeySet(b"a", prefix=prefix).type == "single"


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [None, 1, 1.5, True, [b"a"], (b"a",), {b"a": 1}, object()])
def test_bad_key_type(bad):
    with pytest.raises(TypeError, match=r"\bkey\b"):
        KeySet(bad)
    with pytest.raises(TypeError, match=r"\bkey\b"):
        KeySet(bad, prefix=True)
    with pytest.raises(TypeError, match=r"\bkey\b"):
        KeySet(bad, b"z")


@pytest.mark.parametrize("bad", [1, 1.5, True, [b"z"], object()])
def test_bad_range_end_type(bad):
    with pytest.raises(TypeError, match="range_end"):
        KeySet(b"a", bad)


def test_type_errors_are_not_invalid_argument():
    with pytest.raises(TypeError) as info:
        KeySet(5)
    assert not isinstance(info.value, InvalidArgument)


@pytest.mark.parametrize(
    "call",
    [
        lambda: KeySet(b""),
        lambda: KeySet(""),
        lambda: KeySet(b"", b"z"),  # empty range start
        lambda: KeySet("", "z"),
        lambda: KeySet(b"", b"\0"),
        lambda: KeySet(b"b", b"a"),  # end before start
        lambda: KeySet(b"b", b"b"),  # empty range
        lambda: KeySet(b"b\x00", b"b"),
        lambda: KeySet(b"b", b""),  # empty end sorts before any start
        lambda: KeySet(b"\xff", b"\xfe"),
        lambda: KeySet(b"a", b"b", prefix=True),  # both a range end and a prefix
        lambda: KeySet(b"a", b"\0", prefix=True),
        lambda: KeySet(b"", b"", prefix=True),
    ],
)
def test_invalid_argument(call):
    with pytest.raises(InvalidArgument):
        call()


def test_invalid_argument_is_value_error():
    with pytest.raises(ValueError):
        KeySet(b"")


# A str that UTF-8 cannot encode (a lone surrogate, as os.fsdecode makes of undecodable
# bytes): UnicodeEncodeError before, now InvalidArgument naming the argument.
LONE = "a\ud800"
_client = Client(reactor, "http://127.0.0.1:1")  # nothing is ever sent: every call refuses


@pytest.mark.parametrize(("call", "named"), [
    (lambda: as_bytes(LONE, "thing"), "thing"),
    (lambda: KeySet(LONE), "key"),
    (lambda: KeySet(LONE, prefix=True), "key"),
    (lambda: KeySet(b"a", LONE), "range_end"),
    (lambda: OpSet(b"k", LONE), "value"),
    (lambda: OpSet(LONE, b"v"), "key"),
    (lambda: CompValue(b"k", "==", LONE), "value"),
    (lambda: _client.set(LONE, b"v"), "key"),
    (lambda: _client.set(b"k", LONE), "value"),
    (lambda: _client.get(LONE), "key"),
    (lambda: _client.delete(LONE), "key"),
    (lambda: _client.watch(LONE, print), "key"),
    (lambda: _client.lock(LONE), "name"),
])
def test_str_that_utf8_cannot_encode_is_invalid_argument(call, named):
    with pytest.raises(InvalidArgument) as info:
        call()
    message = str(info.value)
    assert message.startswith(named + " ") and "UTF-8" in message
    assert "'\\ud800' at position 1" in message  # the culprit, not the whole value


def test_as_bytes():
    assert as_bytes(b"x", "n") == b"x"
    assert as_bytes("é", "n") == b"\xc3\xa9"
    assert as_bytes("", "n") == b""
    assert type(as_bytes(bytearray(b"ab"), "n")) is bytes
    with pytest.raises(TypeError, match="thing must be bytes or str, not int"):
        as_bytes(3, "thing")
    with pytest.raises(TypeError, match="NoneType"):
        as_bytes(None, "thing")


# -- properties ----------------------------------------------------------------------------


@st.composite
def prefix_and_key(draw):
    """A prefix and a key that often (not always) starts with it."""
    p = draw(any_bytes)
    k = draw(st.one_of(keys, any_bytes.map(lambda s: p + s).filter(bool)))
    return p, k


@SETTINGS
@given(prefix_and_key())
@example((b"", b"\x00"))
@example((b"\xff", b"\xff"))
@example((b"\xff", b"\xfe\xff"))
@example((b"\xff\xff", b"\xff\xfe"))
@example((b"a\xff", b"b"))
@example((b"a\xff", b"a\xfe\xff\xff"))
def test_prefix_membership_is_startswith(pk):
    p, k = pk
    ks = KeySet(p, prefix=True)
    expected = k.startswith(p)
    assert (k in ks) is expected
    # The fields themselves, read with etcd's rule, say the same.
    assert in_etcd_range(k, ks.key, ks.range_end) is expected
    # The end etcd sees is either "no bound" or strictly after the prefix.
    assert ks.range_end == b"\0" or ks.range_end > p


@SETTINGS
@given(any_bytes, any_bytes)
def test_prefix_range_end_is_tight(p, x):
    """No smaller bound would do: every x below the end is <= some key under p."""
    end = prefix_range_end(p)
    ks = KeySet(p, prefix=True)
    if end == b"\0":
        # No finite bound exists exactly when p is all 0xff (or empty): then for any x there
        # is a key under p that sorts after x.
        assert p.strip(b"\xff") == b""
        return
    # The end itself is outside the prefix, and not in the set.
    assert not end.startswith(p)
    assert end not in ks
    # Anything smaller than the end is below some key under the prefix.
    if x < end:
        witness = p + b"\xff" * (len(x) + 1)
        assert witness.startswith(p)
        assert witness in ks
        assert witness >= x


@SETTINGS
@given(any_bytes)
def test_no_finite_end_only_for_all_ff(p):
    end = prefix_range_end(p)
    all_ff = all(b == 0xFF for b in p)
    assert (end == b"\0") is all_ff


@SETTINGS
@given(keys, keys, keys)
def test_range_membership_property(a, b, k):
    if a == b:
        return
    lo, hi = min(a, b), max(a, b)
    if hi == b"\0":
        return
    ks = KeySet(lo, hi)
    assert (k in ks) is (lo <= k < hi)
    if lo != b"\0":  # (hi, b"\0") is the open-ended range >= hi, not a reversed one
        with pytest.raises(InvalidArgument):
            KeySet(hi, lo)


@SETTINGS
@given(keys, keys)
def test_single_membership_property(a, k):
    assert (k in KeySet(a)) is (k == a)


@SETTINGS
@given(keys, keys)
def test_open_ended_range_property(a, k):
    assert (k in KeySet(a, b"\0")) is (k >= a)


@SETTINGS
@given(st.text(max_size=6))
def test_str_and_bytes_agree(s):
    encoded = s.encode("utf-8")
    assert KeySet(s, prefix=True) == KeySet(encoded, prefix=True)
    if s:
        assert KeySet(s) == KeySet(encoded)
