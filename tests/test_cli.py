"""The `coord` command's options, output and store commands.

The pure rules (durations, endpoints, option precedence, the `--` split, output formats,
exit statuses) have table tests; the commands run as users run them, as subprocesses
against the suite's etcd, and their simple output is compared byte for byte with
etcdctl's for the same request.  (The recipe commands: tests/test_cli_recipes.py.)
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import run_coord as coord

from coord import errors
from coord.cli import _options, _output, build_parser, split_command
from coord.cli._options import OptionError, endpoint_urls, parse_duration, settings
from coord.cli._runtime import error_exit
from coord.server import find_etcdctl
from coord.types import Event, EventType, Header, KeyValue, Member, Status

# -- pure rules ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("5s", 5.0), ("500ms", 0.5), ("1m30s", 90.0), ("2.5", 2.5), ("1h", 3600.0),
    ("1.5s", 1.5), ("250us", 0.00025), ("10", 10.0), (" 3s ", 3.0), ("2m0.5s", 120.5),
])
def test_parse_duration(text, seconds):
    assert parse_duration("--x", text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "5x", "5 s", "-1", "0", "0s", "nan", "inf",
                                  "1s5", "ms", "--5s"])
def test_parse_duration_refuses(text):
    with pytest.raises(OptionError, match="--x"):
        parse_duration("--x", text)


@pytest.mark.parametrize("text, tls, urls", [
    ("127.0.0.1:2379", False, ["http://127.0.0.1:2379"]),
    ("127.0.0.1:2379", True, ["https://127.0.0.1:2379"]),
    ("a:1,b:2", False, ["http://a:1", "http://b:2"]),
    (" a:1 , b:2 ", False, ["http://a:1", "http://b:2"]),
    ("http://a:1,https://b:2", True, ["http://a:1", "https://b:2"]),
    ("[::1]:2379", False, ["http://[::1]:2379"]),
])
def test_endpoint_urls(text, tls, urls):
    assert endpoint_urls(text, tls) == urls


@pytest.mark.parametrize("text, message", [
    ("", "empty endpoint"), ("a:1,", "empty endpoint"), ("localhost", "not host:port"),
    ("a:b", "not host:port"), ("unix:///tmp/s", "only http"), (":2379", "not host:port"),
])
def test_endpoint_urls_refuses(text, message):
    with pytest.raises(OptionError, match=message):
        endpoint_urls(text, False)


def _settings(argv, env):
    args = build_parser().parse_args([*argv, "get", "k"])
    return settings(args, env)


@pytest.mark.parametrize("argv, env, urls", [
    ([], {}, ["http://127.0.0.1:2379"]),
    ([], {"ETCDCTL_ENDPOINTS": "e:1"}, ["http://e:1"]),
    ([], {"ETCDCTL_ENDPOINTS": "e:1", "COORD_ENDPOINTS": "c:1"}, ["http://c:1"]),
    (["--endpoints", "f:1"], {"ETCDCTL_ENDPOINTS": "e:1", "COORD_ENDPOINTS": "c:1"},
     ["http://f:1"]),
    ([], {"COORD_ENDPOINTS": ""}, ["http://127.0.0.1:2379"]),  # empty: not set
    ([], {"ETCDCTL_ENDPOINTS": "e:1", "ETCDCTL_CACERT": "/ca.pem"}, ["https://e:1"]),
])
def test_endpoints_precedence(argv, env, urls):
    assert _settings(argv, env).urls == urls


def test_options_after_the_subcommand_count_too():
    args = build_parser().parse_args(["get", "k", "--endpoints", "x:1", "-w", "json",
                                      "--command-timeout", "2s"])
    result = settings(args, {})
    assert (result.urls, result.output, result.command_timeout) == (["http://x:1"], "json",
                                                                    2.0)
    # ... and before it, without a subparser default overwriting them (SUPPRESS).
    args = build_parser().parse_args(["--endpoints", "y:1", "--key", "k.pem", "--cert",
                                      "c.pem", "get", "the-key"])
    result = settings(args, {})
    assert (result.urls, result.key, result.cert, args.key) == (
        ["https://y:1"], "k.pem", "c.pem", "the-key")


@pytest.mark.parametrize("argv, env, user, password", [
    (["--user", "alice:s3:cret"], {}, "alice", "s3:cret"),
    (["--user", "alice", "--password", "pw"], {}, "alice", "pw"),
    ([], {"ETCDCTL_USER": "bob:pw"}, "bob", "pw"),
    ([], {"COORD_USER": "carol", "ETCDCTL_PASSWORD": "pw"}, "carol", "pw"),
    (["--user", "dave"], {}, "dave", None),  # asked for at a terminal
    ([], {}, None, None),
])
def test_credentials(argv, env, user, password):
    result = _settings(argv, env)
    assert (result.user, result.password) == (user, password)


@pytest.mark.parametrize("argv, env, message", [
    (["--cert", "c.pem"], {}, "--cert and --key go together"),
    (["--key", "k.pem"], {}, "--cert and --key go together"),
    (["--password", "pw"], {}, "--password needs --user"),
    (["--user", ":pw"], {}, "user name is empty"),
    ([], {"ETCDCTL_DIAL_TIMEOUT": "soon"}, "--dial-timeout"),
    ([], {"ETCDCTL_WRITE_OUT": "table"}, "--write-out"),
    (["--endpoints", "nope"], {}, "not host:port"),
])
def test_settings_refuses(argv, env, message):
    with pytest.raises(OptionError, match=message):
        _settings(argv, env)


@pytest.mark.parametrize("argv, words, command", [
    (["lock", "L", "--", "echo", "hi"], ["lock", "L"], ["echo", "hi"]),
    (["lock", "L", "--ttl", "5", "--", "sh", "-c", "x -- y"], ["lock", "L", "--ttl", "5"],
     ["sh", "-c", "x -- y"]),
    (["--endpoints", "lock:1", "elect", "E", "v", "--"], ["--endpoints", "lock:1", "elect",
                                                          "E", "v"], []),
    (["-w", "json", "barrier", "enter", "B", "3", "--", "true"],
     ["-w", "json", "barrier", "enter", "B", "3"], ["true"]),
    (["get", "--", "-key"], ["get", "--", "-key"], None),  # `--` is argparse's here
    (["barrier", "wait", "--", "-b"], ["barrier", "wait", "--", "-b"], None),
    (["--endpoints", "elect", "get", "--", "-k"], ["--endpoints", "elect", "get", "--", "-k"],
     None),  # "elect" is the option's value, not the subcommand
    (["lock", "L"], ["lock", "L"], None),
])
def test_split_command(argv, words, command):
    assert split_command(argv) == (words, command)


KV = KeyValue(b"k", b"v", create_revision=3, mod_revision=5, version=2, lease=0x2a)


def test_output_formats():
    assert _output.kv_simple(KV) == b"k\nv\n"
    assert _output.kv_simple(KV, keys_only=True) == b"k\n\n"
    assert _output.kv_simple(KV, value_only=True) == b"v\n"
    assert _output.kv_json(KV) == {"key": "aw==", "create_revision": 3, "mod_revision": 5,
                                   "version": 2, "value": "dg==", "lease": "000000000000002a"}
    deleted = Event(EventType.DELETE, KeyValue(b"k", mod_revision=6), prev_kv=KV)
    assert _output.event_simple(deleted) == b"DELETE\nk\n\n"
    assert _output.event_simple(deleted, prev_kv=True) == b"DELETE\nk\nv\nk\n\n"
    assert _output.event_json(deleted)["revision"] == 6
    # A 64-bit ID is a hex string in JSON: as a number a double-based reader loses digits.
    header = Header(cluster_id=2**64 - 1, member_id=0x2E1259D415F2A040, revision=9)
    assert _output.header_json(header)["member_id"] == "2e1259d415f2a040"
    assert _output.header_json(header)["cluster_id"] == "ffffffffffffffff"
    status = Status(header, version="3.5.1", db_size=20480, leader=0x2E1259D415F2A040,
                    raft_index=8, raft_term=2, raft_applied_index=8)
    assert _output.status_simple("h:1", status) == \
        b"h:1, 2e1259d415f2a040, 3.5.1, 20 kB, true, false, 2, 8, 8, \n"
    member = Member(0xABC, "m1", ["http://p:1"], ["http://c:1", "http://c:2"])
    assert _output.member_simple(member) == \
        b"abc, started, m1, http://p:1, http://c:1,http://c:2, false\n"
    assert _output.member_simple(Member(0xABC)) == b"abc, unstarted, , , , false\n"
    assert _output.config_values({b"a": b"1", b"b": b"\xff"}) == {"a": "1",
                                                                 "b": {"base64": "/w=="}}


@pytest.mark.parametrize("size, text", [
    (0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (20480, "20 kB"), (2_500_000, "2.5 MB"),
    (10**13, "10 TB"), (10**16, "10000 TB"),
])
def test_human_size(size, text):
    assert _output.human_size(size) == text


@pytest.mark.parametrize("exc, code, text", [
    (errors.Unavailable("no endpoint"), 3, "cannot reach etcd: no endpoint"),
    (errors.OutcomeUnknown("lost"), 1, "may or may not have been applied"),
    (errors.Timeout("slow"), 4, "timed out: slow"),
    (errors.WriteTimeout("slow"), 4, "may or may not have been applied"),
    (errors.PermissionDenied("no", 7), 5, "PermissionDenied: no"),
    (errors.AuthFailed("bad", 3), 5, "AuthFailed: bad"),
    (errors.LockLost("gone"), 6, "LockLost: gone"),
    (errors.SessionLost("gone", 5), 6, "SessionLost"),
    (errors.LeadershipLost("gone"), 6, "LeadershipLost"),
    (errors.InvalidArgument("bad key"), 2, "bad key"),
    (errors.EtcdInvalidArgument("etcd says no", 3), 1, "EtcdInvalidArgument: etcd says no"),
    (errors.LeaseNotFound("no lease", 5), 1, "LeaseNotFound: no lease"),
    (OptionError("--x: bad"), 2, "--x: bad"),
    (RuntimeError("boom"), 1, "unexpected RuntimeError: boom"),
])
def test_error_exit(exc, code, text):
    got_code, message = error_exit("get", exc)
    assert got_code == code
    assert text in message


def test_exit_statuses_are_distinct():
    codes = [_options.EXIT_OK, _options.EXIT_ERROR, _options.EXIT_USAGE,
             _options.EXIT_UNAVAILABLE, _options.EXIT_TIMEOUT, _options.EXIT_DENIED,
             _options.EXIT_LOST]
    assert len(set(codes)) == len(codes)


# -- the commands, as subprocesses -------------------------------------------------------


def etcdctl(url, *argv, input=None):
    environment = dict(os.environ, ETCDCTL_API="3")
    return subprocess.run([find_etcdctl(), "--endpoints", url, *argv], env=environment,
                          input=input, capture_output=True, timeout=30)


def ok(result):
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def host(etcd):
    return etcd.url.split("://", 1)[1]


def test_put_get_del_as_etcdctl_prints_them(etcd):
    url = host(etcd)
    assert ok(coord("put", "app/a", "1", url=url)) == b"OK\n"
    assert ok(coord("put", "app/b", "two words", url=url)) == b"OK\n"
    assert ok(coord("put", "app/c", url=url, input=b"from stdin\n")) == b"OK\n"
    ok(etcdctl(url, "put", "other", "x"))
    for argv in (["get", "app/a"], ["get", "app/", "--prefix"], ["get", "app/a", "app/c"],
                 ["get", "app/", "--prefix", "--keys-only"],
                 ["get", "app/", "--prefix", "--print-value-only"],
                 ["get", "app/", "--prefix", "--limit", "2"],
                 ["get", "app/b", "--from-key"], ["get", "missing"],
                 ["get", "app/", "--prefix", "--sort-by", "value", "--order", "DESCEND"],
                 ["get", "app/", "--prefix", "--consistency", "s"]):
        assert ok(coord(*argv, url=url)) == ok(etcdctl(url, *argv)), argv
    assert ok(coord("get", "app/c", "--print-value-only", url=url)) == b"from stdin\n"
    assert ok(coord("get", "app/", "--prefix", "--count-only", url=url)) == b"3\n"
    first = json.loads(ok(coord("get", "app/a", "-w", "json", url=url)))
    ok(coord("put", "app/a", "changed", url=url))
    old = ok(coord("get", "app/a", "--rev", str(first["header"]["revision"]), url=url))
    assert old == ok(etcdctl(url, "get", "app/a", "--rev", str(first["header"]["revision"])))
    assert old == b"app/a\n1\n"
    assert ok(coord("del", "app/a", "--prev-kv", url=url)) == b"1\napp/a\nchanged\n"
    assert ok(coord("del", "app/", "--prefix", url=url)) == b"2\n"
    assert ok(coord("del", "app/", "--prefix", url=url)) == b"0\n"
    assert ok(etcdctl(url, "get", "", "--from-key", "--keys-only")) == b"other\n\n"


def test_get_json_matches_etcdctls_fields(etcd):
    url = host(etcd)
    ok(etcdctl(url, "put", "j/1", "\xff binary? no: text"))
    ok(coord("put", "j/2", "v2", url=url))
    ours = json.loads(ok(coord("get", "j/", "--prefix", "-w", "json", url=url)))
    theirs = json.loads(ok(etcdctl(url, "get", "j/", "--prefix", "-w", "json")))
    assert ours["count"] == theirs["count"] == 2
    assert ours["header"]["revision"] == theirs["header"]["revision"]
    assert ours["header"]["member_id"] == f"{theirs['header']['member_id']:016x}"
    for mine, etcds in zip(ours["kvs"], theirs["kvs"], strict=True):
        for field in ("key", "value", "create_revision", "mod_revision", "version"):
            assert mine[field] == etcds[field], field
    assert base64.b64decode(ours["kvs"][1]["value"]) == b"v2"


def test_put_options(etcd):
    url = host(etcd)
    lease = ok(coord("lease", "grant", "60", url=url)).split()[1].decode()
    assert ok(coord("put", "k", "v1", "--lease", lease, url=url)) == b"OK\n"
    assert ok(coord("put", "k", "v2", "--prev-kv", url=url)) == b"OK\nk\nv1\n"
    got = json.loads(ok(coord("get", "k", "-w", "json", url=url)))["kvs"][0]
    # etcd's Put without a lease detaches the key (Put's lease 0); --ignore-lease keeps it.
    assert "lease" not in got
    ok(coord("put", "k", "v3", "--lease", lease, url=url))
    ok(coord("put", "k", "v4", "--ignore-lease", url=url))
    assert json.loads(ok(coord("get", "k", "-w", "json", url=url)))["kvs"][0]["lease"] == lease
    ok(coord("put", "k", "--ignore-value", "--lease", lease, url=url))
    assert ok(coord("get", "k", "--print-value-only", url=url)) == b"v4\n"
    bad = coord("put", "k", "v", "--lease", "zz", url=url)
    assert bad.returncode == 2 and b"not a lease ID" in bad.stderr
    missing = coord("put", "k", "v", "--lease", "123", url=url)
    assert missing.returncode == 1 and b"LeaseNotFound" in missing.stderr


def test_put_json_and_del_json(etcd):
    url = host(etcd)
    put = json.loads(ok(coord("put", "k", "v", "--prev-kv", "-w", "json", url=url)))
    assert put["header"]["revision"] > 1 and "prev_kv" not in put
    put = json.loads(ok(coord("put", "k", "w", "--prev-kv", "-w", "json", url=url)))
    assert base64.b64decode(put["prev_kv"]["value"]) == b"v"
    gone = json.loads(ok(coord("del", "k", "--prev-kv", "-w", "json", url=url)))
    assert gone["deleted"] == 1 and base64.b64decode(gone["prev_kvs"][0]["value"]) == b"w"


@pytest.mark.parametrize("argv, message", [
    (["get", "k", "--limit", "-1"], "--limit"),
    (["get", "k", "--rev", "-2"], "--rev"),
    (["get", "a", "--prefix", "--from-key"], "cannot be combined"),
    (["get", "a", "z", "--prefix"], "cannot be combined"),
    (["get", "z", "a"], "must sort after"),
    (["get", ""], "must not be empty"),
    (["lease", "grant", "0"], "at least 1"),
    (["lease", "revoke", "-5"], "not a lease ID"),
    (["watch", "k", "--rev", "-1"], "--rev"),
    (["get", "k", "--dial-timeout", "fast"], "--dial-timeout"),
])
def test_bad_usage_exits_2_and_says_why(etcd, argv, message):
    result = coord(*argv, url=host(etcd))
    assert result.returncode == 2, result
    assert message in result.stderr.decode()
    assert result.stdout == b""


def test_a_future_revision_is_etcds_error(etcd):
    result = coord("get", "k", "--rev", "999999", url=host(etcd))
    assert result.returncode == 1
    assert b"FutureRevision" in result.stderr


def test_unreachable_exits_3_quickly_naming_the_endpoint():
    started = time.monotonic()
    result = coord("get", "k", url="127.0.0.1:1", env={"ETCDCTL_DIAL_TIMEOUT": "1s"})
    assert time.monotonic() - started < 15
    assert result.returncode == 3
    assert b"cannot reach etcd" in result.stderr and b"127.0.0.1:1" in result.stderr


def test_a_hung_member_times_out_with_exit_4(etcd_factory):
    server = etcd_factory()
    server.pause()
    try:
        started = time.monotonic()
        result = coord("get", "k", "--command-timeout", "1s", url=host(server))
        assert result.returncode == 4, result.stderr
        assert b"timed out" in result.stderr
        assert time.monotonic() - started < 15
    finally:
        server.resume()


def test_lease_commands_as_etcdctl_prints_them(etcd):
    url = host(etcd)
    granted = ok(coord("lease", "grant", "100", url=url)).decode()
    assert granted.startswith("lease ") and granted.endswith(" granted with TTL(100s)\n")
    lease = granted.split()[1]
    assert len(lease) == 16
    ok(coord("put", "a", "1", "--lease", lease, url=url))
    ok(coord("put", "b", "2", "--lease", lease, url=url))
    ttl = ok(coord("lease", "timetolive", lease, "--keys", url=url)).decode()
    theirs = ok(etcdctl(url, "lease", "timetolive", lease, "--keys")).decode()
    assert ttl.split("remaining")[0] == theirs.split("remaining")[0]
    # coord sorts the keys; etcdctl prints them in etcd's order, which varies.
    assert ttl.endswith("attached keys([a b])\n")
    assert sorted(theirs.split("attached keys([")[1].rstrip("])\n").split()) == ["a", "b"]
    assert ok(coord("lease", "list", url=url)) == ok(etcdctl(url, "lease", "list"))
    info = json.loads(ok(coord("lease", "ttl", lease, "--keys", "-w", "json", url=url)))
    assert info["granted_ttl"] == 100 and 90 <= info["ttl"] <= 100
    assert [base64.b64decode(k) for k in info["keys"]] == [b"a", b"b"]
    kept = ok(coord("lease", "keep-alive", lease, "--once", url=url)).decode()
    assert kept == f"lease {lease} keepalived with TTL(100)\n"
    assert ok(coord("lease", "revoke", lease, url=url)) == f"lease {lease} revoked\n".encode()
    assert ok(coord("get", "", "--from-key", url=url)) == b""  # its keys went with it
    assert ok(coord("lease", "timetolive", lease, url=url)) == \
        ok(etcdctl(url, "lease", "timetolive", lease)) == \
        f"lease {lease} already expired\n".encode()
    again = coord("lease", "revoke", lease, url=url)
    assert again.returncode == 1 and b"LeaseNotFound" in again.stderr
    assert ok(coord("lease", "list", "-w", "json", url=url)) == b'{"leases":[]}\n'


def test_lease_keep_alive_until_stopped(etcd):
    url = host(etcd)
    lease = ok(coord("lease", "grant", "3", url=url)).split()[1].decode()
    environment = dict(os.environ, COORD_ENDPOINTS=url)
    with subprocess.Popen([sys.executable, "-m", "coord.cli", "lease", "keep-alive", lease],
                          stdout=subprocess.PIPE, env=environment) as proc:
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            assert first == f"lease {lease} keepalived with TTL(3)\n".encode()
            assert proc.stdout.readline() == first  # again, a TTL/3 later
            time.sleep(3.5)  # longer than the TTL: alive only if kept alive
            info = ok(coord("lease", "timetolive", lease, url=url))
            assert b"remaining" in info
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            proc.kill()


def test_member_list_and_status(etcd):
    url = host(etcd)
    assert ok(coord("member", "list", url=url)) == ok(etcdctl(url, "member", "list"))
    members = json.loads(ok(coord("member", "list", "-w", "json", url=url)))["members"]
    assert members[0]["client_urls"] == [etcd.url]
    line = ok(coord("status", url=url)).decode()
    theirs = ok(etcdctl(url, "endpoint", "status")).decode()
    # Raft indexes move between the two calls (etcdctl's own requests); the rest agrees.
    assert line.split(", ")[:6] == theirs.split(", ")[:6]
    status = json.loads(ok(coord("endpoint", "status", "--cluster", "-w", "json", url=url)))
    assert [s["endpoint"] for s in status] == [url]
    assert status[0]["is_leader"] and status[0]["member_id"] == members[0]["id"]


def test_endpoint_health(etcd):
    url = host(etcd)
    healthy = ok(coord("endpoint", "health", url=url)).decode()
    assert healthy.startswith(f"{url} is healthy: successfully committed proposal: took = ")
    both = coord("endpoint", "health", url=f"{url},127.0.0.1:1",
                 env={"ETCDCTL_DIAL_TIMEOUT": "1s"})
    assert both.returncode == 1
    assert f"{url} is healthy".encode() in both.stdout
    assert b"127.0.0.1:1 is unhealthy: failed to commit proposal" in both.stderr
    assert b"unhealthy cluster" in both.stderr
    report = json.loads(ok(coord("endpoint", "health", "--cluster", "-w", "json", url=url)))
    assert report[0]["endpoint"] == url and report[0]["health"] is True


def test_endpoint_health_of_a_cluster_missing_a_member(etcd_cluster):
    member = etcd_cluster.members[0]
    urls = ",".join(host(m) for m in etcd_cluster.members)
    assert b"is healthy" in ok(coord("endpoint", "health", url=urls))
    member.kill()
    try:
        result = coord("endpoint", "health", url=urls, env={"ETCDCTL_DIAL_TIMEOUT": "1s"})
        assert result.returncode == 1
        assert f"{host(member)} is unhealthy".encode() in result.stderr
        assert result.stdout.count(b"is healthy") == 2
    finally:
        member.restart()
        etcd_cluster.wait_for_leader()


def test_watch_prints_changes_until_stopped(etcd):
    url = host(etcd)
    ok(coord("put", "w/old", "0", url=url))
    start = json.loads(ok(coord("get", "w/old", "-w", "json", url=url)))["header"]["revision"]
    environment = dict(os.environ, COORD_ENDPOINTS=url)
    argv = [sys.executable, "-m", "coord.cli", "watch", "w/", "--prefix", "--prev-kv"]
    json_argv = [sys.executable, "-m", "coord.cli", "watch", "w/old", "--rev", str(start),
                 "-w", "json"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, env=environment) as simple, \
            subprocess.Popen(json_argv, stdout=subprocess.PIPE, env=environment) as as_json:
        try:
            assert simple.stdout is not None and as_json.stdout is not None
            # The JSON watch starts at the old write's revision: its first event is it.
            first = json.loads(as_json.stdout.readline())
            assert (first["type"], first["revision"]) == ("PUT", start)
            time.sleep(1.0)  # the simple watch starts "from now": let it be created
            ok(coord("put", "w/a", "1", url=url))
            ok(coord("put", "w/a", "2", url=url))
            ok(coord("del", "w/a", url=url))
            lines = [simple.stdout.readline() for _ in range(3 + 5 + 5)]
            assert b"".join(lines) == (b"PUT\nw/a\n1\n" b"PUT\nw/a\n1\nw/a\n2\n"
                                       b"DELETE\nw/a\n2\nw/a\n\n")
            for proc in (simple, as_json):
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=10) == 0
        finally:
            simple.kill()
            as_json.kill()


def test_no_subcommand_is_a_usage_error():
    result = coord()
    assert result.returncode == 2 and b"usage: coord" in result.stderr


def test_the_guides_fenced_write_runs_under_coord_lock(etcd, tmp_path):
    """docs/cli.md's program, run as it says: under `coord lock`, its guarded write lands;
    with the token of a lock that has since changed hands, it is refused."""
    text = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", text, re.S)
    assert "http://127.0.0.1:2379" in snippet
    program = tmp_path / "write_report.py"
    program.write_text(snippet.replace("http://127.0.0.1:2379", etcd.url))
    url = host(etcd)
    ok(coord("lock", "jobs/nightly", "--", sys.executable, str(program), url=url))
    assert ok(coord("get", "jobs/nightly/report", "--print-value-only", url=url)) == b"done\n"
    # A late writer: the token it was given belongs to a lock that was released since.
    ok(coord("del", "jobs/nightly/report", url=url))
    script = f"echo $COORD_LOCK_KEY $COORD_FENCING_TOKEN > {tmp_path / 'token'}"
    ok(coord("lock", "jobs/nightly", "--", "sh", "-c", script, url=url))
    key, token = (tmp_path / "token").read_text().split()
    late = subprocess.run([sys.executable, str(program)], capture_output=True, timeout=30,
                          env=dict(os.environ, COORD_LOCK_KEY=key, COORD_FENCING_TOKEN=token))
    assert late.returncode == 1
    assert b"the lock was lost: the report was not written" in late.stderr
    assert ok(coord("get", "jobs/nightly/report", url=url)) == b""


def test_watch_of_an_unreachable_etcd_fails_at_once():
    # The watch itself would retry for ever: the command says so first.
    result = coord("watch", "k", url="127.0.0.1:1", env={"ETCDCTL_DIAL_TIMEOUT": "1s"})
    assert result.returncode == 3 and b"cannot reach etcd" in result.stderr
