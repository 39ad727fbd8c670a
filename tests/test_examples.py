"""The scripts in examples/ and `coord demo`, run as users run them: as subprocesses.

Each runs against a real etcd with a timeout, must exit 0, and must print the lines
that show it did what it says (not merely that it ran).
"""

from __future__ import annotations

import base64
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import EXAMPLE_TIMEOUT as TIMEOUT
from helpers import EXAMPLES, ROOT, dead_url, example, lines_after, run


def test_every_example_is_tested():
    """Each script in examples/ is run by some test (here or in a recipe's own test file)."""
    tests = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    untested = [p.name for p in EXAMPLES.glob("*.py") if f'"{p.name}"' not in tests]
    assert not untested, f"examples no test runs: {untested}"


def test_status(etcd):
    out = example("status.py", etcd.url)
    assert "Status(header=Header(" in out
    version = re.search(r"etcd version: (\S+)", out)
    assert version and version.group(1) == etcd.version
    leader = re.search(r"leader: ([0-9a-f]+) \(answered by ([0-9a-f]+)\)", out)
    assert leader and leader.group(1) == leader.group(2)  # a single member leads itself
    assert re.search(r"member [0-9a-f]+ 'coord': " + re.escape(etcd.url), out)


def test_set_get(etcd):
    out = example("set_get.py", etcd.url)
    assert "Status(header=Header(" in out
    after = "\n".join(lines_after(out, "key not found"))
    keys = re.findall(r"KeyValue\(key=b'(mykey\d)', value=b'foobar'", after)
    range_keys = ["mykey1", "mykey2", "mykey3", "mykey4"]  # [mykey1, mykey5)
    prefix_keys = [f"mykey{i}" for i in range(10)]
    assert keys == range_keys + prefix_keys


def test_delete(etcd):
    out = example("delete.py", etcd.url)
    assert "deleted key-value pairs: []" in out  # mykey3 was deleted by the first snippet
    assert "deleted 6 keys: mykey0, mykey1, mykey2, mykey7, mykey8, mykey9" in out
    assert "keys left under mykey: 0" in out
    everything = etcd.post("/v3/kv/range", {"key": "AA==", "range_end": "AA==",
                                            "count_only": True})
    assert int(everything.get("count", 0)) == 0


def test_transaction(etcd):
    out = example("transaction.py", etcd.url)
    success = lines_after(out, "transaction SUCCESS:")
    assert "transaction FAILED:" in "\n".join(success)  # first SUCCESS, then FAILED
    assert sum("Revision(revision=" in line for line in success[:2]) == 2  # two OpSets
    failed = lines_after(out, "transaction FAILED:")
    assert "Revision(revision=" in failed[0]  # OpSet(b'mykey2', b'failure')
    assert "Range(kvs=[KeyValue(key=b'mykey1', value=b'val2'" in failed[1]  # OpGet(b'mykey1')
    assert "mykey1 = val2" in out
    assert "mykey2 = failure" in out


def test_lease(etcd):
    out = example("lease.py", etcd.url)
    granted = re.search(r"lease granted: <Lease 0x[0-9a-f]+ ttl=10> \(ttl 10 s\)", out)
    assert granted, out
    assert "refreshed: ttl 10 s" in out
    remaining = re.search(r"remaining: (\d+) s", out)
    assert remaining and 0 < int(remaining.group(1)) <= 10
    assert "keys: [b'session/alice', b'session/bob']" in out
    assert "revoked; keys left under session/: 0" in out
    assert re.search(r"LeaseExpired: lease 0x[0-9a-f]+ has expired or was revoked", out)
    assert etcd.post("/v3/lease/leases", {}).get("leases", []) == []


def test_failover(etcd):
    out = example("failover.py", etcd.url)
    client = re.search(r"client: <coord.Client (\S+), (\S+)>", out)
    assert client and client.group(2) == etcd.url
    assert re.search(r"set at revision \d+, read back b'written'", out)
    assert re.search(r"answered by member [0-9a-f]+", out)
    down = re.search(r"all endpoints down: Unavailable: (.*)", out)
    assert down, out
    assert f"no endpoint could serve it (tried {client.group(1)})" in down.group(1)
    assert f"cannot connect to {client.group(1)}" in down.group(1)


def test_watch(etcd):
    out = run(str(EXAMPLES / "watch.py"), etcd.url, "1")  # watch for 1 s, not 60
    events = re.findall(r"on_change: Event\(type=<EventType\.(\w+): '\w+'>, "
                        r"kv=KeyValue\(key=b'(\w+)', value=b'(\w*)'", out)
    # The writes to mykey1, in order; the write to otherkey is outside the prefix.
    assert events == [("PUT", "mykey1", "one"), ("PUT", "mykey1", "uno"),
                      ("DELETE", "mykey1", "")]
    assert lines_after(out, "watching ..")
    assert re.search(r"watch cancelled: <Watcher \[b'mykey'\] DONE", out)


# -- `coord demo --kv`: the KV walk-through ---------------------------------------------------

KV_DEMO_STEPS = [
    "status",
    "write config keys, read them back by prefix",
    "compare-and-swap transactions",
    "lease",
    "history and compaction",
    "clean up",
]


def check_kv_demo(out: str, url: str) -> None:
    lines = out.splitlines()
    assert f"coord demo against {url}" in lines
    assert [line for line in lines if line in KV_DEMO_STEPS] == KV_DEMO_STEPS
    passed = [line for line in lines if line.startswith("    ok  ")]
    summary = re.search(r"^demo ok: (\d+) checks passed", out, re.MULTILINE)
    assert summary, out
    assert int(summary.group(1)) == len(passed) >= 15
    for shown in ("mod_revision == ", "again: Failed; the failure branch read",
                  "reading a compacted revision raises Compacted",
                  "revoking the lease deleted the key"):
        assert shown in out


def test_kv_demo_against_url(etcd_factory):
    # A private server: the demo compacts history, which the shared one should keep.
    server = etcd_factory()
    out = run("-m", "coord.cli", "demo", "--kv", "--url", server.url)
    check_kv_demo(out, server.url)
    assert_nothing_left(server)


def test_kv_demo_twice_against_the_same_server(etcd_factory):
    server = etcd_factory()
    for _ in range(2):  # a second compaction, at a later revision, must work too
        check_kv_demo(run("-m", "coord.cli", "demo", "--kv", "--url", server.url), server.url)


def test_kv_demo_embedded():
    out = run("-m", "coord.cli", "demo", "--kv")
    started = re.search(r"^started embedded etcd 3\.\S+ at (http://127\.0\.0\.1:\d+)$", out,
                        re.MULTILINE)
    assert started, out
    check_kv_demo(out, started.group(1))
    assert out.splitlines()[-1] == "embedded etcd stopped"


def test_kv_demo_fails_on_an_unreachable_server():
    proc = subprocess.run(
        [sys.executable, "-m", "coord.cli", "demo", "--kv", "--url", "http://127.0.0.1:1"],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert proc.returncode == 1
    assert "demo FAILED: Unavailable: " in proc.stderr
    assert "cannot connect to http://127.0.0.1:1" in proc.stderr
    assert "demo ok" not in proc.stdout


# -- `coord demo`: the recipes, in worker processes --------------------------------------------


def assert_nothing_left(server) -> None:
    """No key at all and no lease on ``server`` (a private one)."""
    keys = server.post("/v3/kv/range", {"key": "AA==", "range_end": "AA==", "count_only": True})
    assert int(keys.get("count", 0)) == 0
    assert server.post("/v3/lease/leases", {}).get("leases", []) == []


def demo_workers(url: str) -> list[int]:
    """Pids of the live worker processes of a demo against ``url`` (from their command
    lines: ``python -m coord.demo.worker URL NAME PARENT``; a zombie has none)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # not a process, or gone meanwhile
        if b"coord.demo.worker" in argv and url.encode() in argv:
            found.append(int(proc.name))
    return found


def worker_pids(out: str) -> dict[str, int]:
    """The workers' pids, from the demo's line ``w1 (pid 123), ... ready``."""
    ready = re.search(r"^  (w\d \(pid \d+\)(, )?)+ ready$", out, re.MULTILINE)
    assert ready, out
    return {name: int(pid) for name, pid in re.findall(r"(w\d) \(pid (\d+)\)", ready.group(0))}


def summary_rows(out: str) -> dict[str, list[str]]:
    """The summary table: scenario -> [what was shown, measured, result]."""
    lines = out.splitlines()
    header = lines.index("summary") + 1
    assert re.match(r"^  scenario +what was shown +measured +result$", lines[header]), out
    rows = {}
    for line in lines[header + 1:]:
        if not line.startswith("  "):
            break
        name, *cells = re.split(r" {2,}", line.strip())
        rows[name] = cells
    return rows


def check_recipes_demo(out: str) -> None:
    """Everything the recipes demo claims, read back from what it printed."""
    rows = summary_rows(out)
    assert list(rows) == ["lock", "election", "paused holder", "barrier", "config"], out
    assert all(cells[-1] == "ok" for cells in rows.values()), rows
    done = re.search(r"^demo ok: 5 scenarios, (\d+) checks passed, nothing left behind "
                     r"\(([\d.]+) s\)$", out, re.MULTILINE)
    assert done, out
    assert int(done.group(1)) == len(re.findall(r"^    ok  ", out, re.MULTILINE)) >= 20
    assert float(done.group(2)) < 40

    # lock: every acknowledged increment, its token and value; in token order 1..N.
    increments = [(int(t), int(v)) for t, v in re.findall(
        r"^   w\d holds the lock \(token (\d+)\): counter -> (\d+)$", out, re.MULTILINE)]
    assert len(increments) == 20
    assert [v for _, v in sorted(increments)] == list(range(1, 21))
    assert "the counter reads 20: the number of acknowledged increments" in out
    assert rows["lock"][0] == "4 processes, 20 guarded increments; counter = 20"

    # election: the leader killed, the next in line took over, after about a TTL.
    line = re.search(r"^   in line, by their keys' create revisions: (w\d), (w\d), (w\d), "
                     r"(w\d) \(etcd granted a TTL of \d+ s\)$", out, re.MULTILINE)
    assert line, out
    first, second = line.group(1), line.group(2)
    assert rows["election"][0] == f"leader {first} SIGKILLed; {second}, next in line, took over"
    failover = re.fullmatch(r"failover ([\d.]+) s \(TTL (\d+) s\)", rows["election"][1])
    assert failover, rows
    seconds, ttl = float(failover.group(1)), int(failover.group(2))
    assert ttl >= 2 and ttl / 3 <= seconds <= ttl + 2, failover.group(0)
    assert f"    ok  {first} was killed by SIGKILL" in out

    # paused holder: frozen past its TTL, the other took the lock, the late write refused.
    paused = re.search(r"^    ok  (w\d)'s late guarded write was refused$", out, re.MULTILINE)
    assert paused, out
    holder = paused.group(1)
    taker = re.search(r"^    ok  (w\d)'s token (\d+) is larger than " + holder + r"'s (\d+)$",
                      out, re.MULTILINE)
    assert taker and int(taker.group(2)) > int(taker.group(3)), out
    frozen = re.search(r"^    ok  " + holder + r" stayed frozen ([\d.]+) s, longer than its "
                       r"lease's TTL \((\d+) s\)$", out, re.MULTILINE)
    assert frozen and float(frozen.group(1)) > int(frozen.group(2)) >= 2, out
    assert "etcd refused the write: the guard's compare failed" in out
    stored = re.search(r"^   coord-demo/resource = 'written by (w\d) with token (\d+)'$", out,
                       re.MULTILINE)
    assert stored and stored.groups() == taker.group(1, 2), out
    assert rows["paused holder"][0].endswith("late write refused")

    # barrier: all three remaining workers passed, after the release.
    passed = re.findall(r"^   (w\d) passed (\d+) ms after the release", out, re.MULTILINE)
    assert len(passed) == 3 and len({w for w, _ in passed}) == 3, out
    assert "    ok  no worker passed while it was held" in out
    assert "    ok  all 3 passed once it was released" in out

    # config: the daemon applied each change, at its revision.
    assert re.search(r"^   (w\d) applies log_level 'info' -> 'debug' at revision (\d+), \d+ ms "
                     r"after the write$", out, re.MULTILINE), out
    assert re.search(r"^   w\d applies new pool_size = 16, new timeout_ms = 500 at revision",
                     out, re.MULTILINE), out
    assert "    ok  both keys reached it as one change, at one revision" in out
    reactions = re.fullmatch(r"reactions (\d+) ms, (\d+) ms", rows["config"][1])
    assert reactions and all(int(ms) < 5000 for ms in reactions.groups()), rows

    # clean-up, checked by the demo itself (and by the tests, on the server).
    assert re.search(r"^    ok  nothing left: no key under coord-demo/, none of the \d+ leases$",
                     out, re.MULTILINE), out


def test_demo_against_url(etcd_factory):
    # A server with etcd's default raft timing, whose smallest lease TTL is 2 s.
    server = etcd_factory(extra_args=["--heartbeat-interval=100", "--election-timeout=1000"])
    out = run("-m", "coord.cli", "demo", "--url", server.url)
    assert out.startswith(f"coord demo: coordination recipes at work, on etcd {server.version} "
                          f"at {server.url}\n")
    check_recipes_demo(out)
    assert len(worker_pids(out)) == 4
    assert demo_workers(server.url) == []
    assert_nothing_left(server)


def test_demo_embedded():
    out = run("-m", "coord.cli", "demo")
    started = re.search(r"^started embedded etcd 3\.\S+ at (http://127\.0\.0\.1:(\d+))$", out,
                        re.MULTILINE)
    assert started, out
    check_recipes_demo(out)
    assert out.splitlines()[-1] == "embedded etcd stopped"
    assert demo_workers(started.group(1)) == []
    with pytest.raises(OSError):  # the embedded etcd is gone
        socket.create_connection(("127.0.0.1", int(started.group(2))), timeout=2).close()


def test_demo_fails_on_an_unreachable_server():
    url = dead_url()
    proc = subprocess.run([sys.executable, "-m", "coord.cli", "demo", "--url", url], cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"demo FAILED: cannot reach etcd at {url}: Unavailable: ")
    assert f"cannot connect to {url}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "starting" not in proc.stdout and "demo ok" not in proc.stdout
    assert demo_workers(url) == []


def start_demo(url):
    """``coord demo --url url`` as a process, and a queue of its stdout lines."""
    proc = subprocess.Popen([sys.executable, "-m", "coord.cli", "demo", "--url", url], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc, _lines(proc)


def end_demo(proc, lines, seen):
    """Wait for the demo to exit; its status, the rest of its stdout, and its stderr."""
    try:
        while (line := lines.get(timeout=TIMEOUT)) is not None:
            seen.append(line)
        proc.wait(timeout=TIMEOUT)
        return proc.returncode, "\n".join(seen), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_demo_fails_when_a_worker_dies(etcd_factory):
    server = etcd_factory()
    proc, lines = start_demo(server.url)
    seen: list[str] = []
    pids = worker_pids(_until(lines, " ready", seen, timeout=TIMEOUT))
    # Once it holds the lock: the demo knows its session's lease (a worker killed between
    # a grant and its report would leave the lease to expire by itself).
    _until(lines, "w3 holds the lock", seen)
    os.kill(pids["w3"], signal.SIGKILL)  # not the demo's doing
    status, out, err = end_demo(proc, lines, seen)
    assert status == 1, out + err
    assert f"worker w3 (pid {pids['w3']}) died unexpectedly: killed by SIGKILL" in err
    assert "Traceback" not in err
    # The scenario under way failed; those before it passed, none after it ran.
    results = [cells[-1] for cells in summary_rows(out).values()]
    failed = results.index("FAILED")
    assert set(results[:failed]) <= {"ok"} and set(results[failed + 1:]) <= {"not run"}
    assert "demo ok" not in out
    assert re.search(r"^    ok  nothing left: no key under coord-demo/", out, re.MULTILINE), out
    assert demo_workers(server.url) == []
    assert_nothing_left(server)


@pytest.mark.parametrize("during", ["1. lock", "froze w"])
def test_demo_interrupted(etcd_factory, during):
    """Ctrl-C (SIGINT) during the lock scenario, or while a worker is frozen (SIGSTOP):
    the workers are stopped, the keys and leases removed, the exit status is 130."""
    server = etcd_factory()
    proc, lines = start_demo(server.url)
    seen: list[str] = []
    _until(lines, during, seen, timeout=TIMEOUT)
    proc.send_signal(signal.SIGINT)
    status, out, err = end_demo(proc, lines, seen)
    assert status == 130, out + err
    assert "interrupted: stopping the workers and cleaning up" in out
    assert "interrupted" in [cells[-1] for cells in summary_rows(out).values()]
    assert err.strip().splitlines()[-1].startswith("demo interrupted; workers stopped")
    assert "Traceback" not in err
    assert demo_workers(server.url) == []
    assert_nothing_left(server)


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_boilerplate(script):
    """Each example follows the guide's boilerplate and takes the URL from argv[1]."""
    text = (EXAMPLES / script).read_text()
    assert "txaio.start_logging(level='info')" in text
    assert "react(main)" in text
    assert "sys.argv[1] if len(sys.argv) > 1 else 'http://localhost:2379'" in text
    assert 20 <= len(text.splitlines()) <= 70


def _lines(proc):
    """A queue of ``proc``'s stdout lines, read in a thread (None at the end)."""
    lines: queue.Queue = queue.Queue()

    def read():
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def _until(lines, wanted, seen, timeout=15):
    while True:
        line = lines.get(timeout=timeout)
        assert line is not None, f"{wanted!r} never printed:\n" + "\n".join(seen)
        seen.append(line)
        if wanted in line:  # (txaio's logging puts a timestamp first)
            return line


def test_session_listener_pauses_while_suspended(etcd_factory):
    server = etcd_factory()
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / "session_listener.py"), server.url,
                             "5"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen: list[str] = []
    try:
        lines = _lines(proc)
        time.sleep(1.0)  # working
        server.pause()  # unreachable: the keep-alives fail, the worker pauses
        try:
            _until(lines, "session CONNECTED -> SUSPENDED", seen)
            assert re.search(r" pausing work: (Timeout|Unavailable)$", lines.get(timeout=5))
            time.sleep(0.5)
        finally:
            server.resume()
        _until(lines, "session SUSPENDED -> CONNECTED", seen)
        assert lines.get(timeout=5).endswith(" resuming work")
        last = _until(lines, "work done: ", seen)
        assert lines.get(timeout=15).endswith(" session CONNECTED -> CLOSED")  # close()
        assert "Main loop terminated" in lines.get(timeout=15)  # and nothing else
        assert lines.get(timeout=15) is None
        proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == 0
    done, skipped = map(int, re.search(
        r" work done: (\d+), skipped while paused: (\d+); session CONNECTED$", last).groups())
    assert done > 0 and skipped >= 3, last  # paused for at least 0.5 s of 0.1 s ticks


def test_docs_session_listener_example_is_the_script():
    """docs/locks.md shows examples/session_listener.py verbatim (run above)."""
    text = (DOCS / "locks.md").read_text()
    block = text.split("<!-- example: session_listener.py -->\n```python\n", 1)[1]
    assert block.split("\n```\n", 1)[0] + "\n" == (EXAMPLES / "session_listener.py").read_text()


def test_testing_example_is_a_passing_suite(etcd):
    """docs/testing.md's example, run as a user's own pytest run: coord.testing's client,
    sessions and path_gateway (this suite's conftest.py is not loaded there)."""
    out = run("-m", "pytest", "-q", "-p", "no:cacheprovider",
              str(EXAMPLES / "testing" / "test_with_coord.py"))
    assert re.search(r"^4 passed\b", out, re.MULTILINE), out


def test_docs_testing_example_is_the_file():
    """docs/testing.md shows examples/testing/test_with_coord.py verbatim (run above)."""
    text = (DOCS / "testing.md").read_text()
    block = text.split("<!-- example: testing/test_with_coord.py -->\n```python\n", 1)[1]
    assert (block.split("\n```\n", 1)[0] + "\n"
            == (EXAMPLES / "testing" / "test_with_coord.py").read_text())


# -- the docs: every example is named there, every Python snippet there is valid Python ------

DOCS = ROOT / "docs"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.DOTALL | re.MULTILINE)


def test_docs_name_every_example():
    docs = "".join(page.read_text() for page in DOCS.glob("*.md"))
    for script in EXAMPLES.glob("*.py"):
        assert f"examples/{script.name}" in docs


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_docs_snippets_compile(page):
    blocks = python_blocks(DOCS / page)
    assert blocks
    for block in blocks:
        # Snippets are module code, or the body of a generator (`yield`, the guide's
        # inlineCallbacks style) or of a coroutine (`await`, `async with`).
        body = "\n".join("    " + line for line in block.replace("...", "pass").splitlines())
        for source in (block, f"def snippet():\n{body}\n", f"async def snippet():\n{body}\n"):
            try:
                compile(source, page, "exec")
                break
            except SyntaxError:
                continue
        else:
            compile(block, page, "exec")  # raise the module-level SyntaxError


def test_docs_transaction_snippet_is_the_example():
    """The guide's transaction snippet is the same text in the docs and in the example."""
    (snippet,) = [b for b in python_blocks(DOCS / "client.md") if "transaction FAILED" in b]
    example_text = (EXAMPLES / "transaction.py").read_text()
    indented = "".join("    " + line if line.strip() else line
                       for line in snippet.splitlines(keepends=True))
    assert indented in example_text


def test_lock(etcd):
    out = example("lock.py", etcd.url)
    held = re.search(r"acquired: <Lock b'mylock' HELD token=(\d+)>", out)
    assert held, out
    assert "could not acquire lock: timeout" in out
    assert f"guarded write with token {held.group(1)}" in out
    then = re.search(r"then <Lock b'mylock' HELD token=(\d+)>: token (\d+) > (\d+)", out)
    assert then and int(then.group(1)) > int(held.group(1)) == int(then.group(3))
    assert "the first holder's late write was refused" in out
    resource = etcd.post("/v3/kv/range", {"key": "cmVzb3VyY2U="})  # b"resource"
    assert resource["kvs"][0]["value"] == base64.b64encode(held.group(1).encode()).decode()
    left = etcd.post("/v3/kv/range", {"key": "bXlsb2Nr", "range_end": "bXlsb2Ns"})  # mylock*
    assert int(left.get("count", 0)) == 0
    assert not etcd.post("/v3/lease/leases", {}).get("leases")
