#!/usr/bin/env python
"""Put/get throughput of coord's Client against wrk (and other Python etcd clients).

    python benchmarks/kv.py [--url URL] [--duration S] [--rounds N] [--value-size B]
                            [--json [FILE]]

Without ``--url`` an embedded etcd is started (``coord.server.EtcdServer``, free loopback
ports, temporary data) and stopped again at the end, also on an error or Ctrl-C.

Contenders, each measured in a fresh process per (operation, in-flight) case:

* ``wrk``    -- the C load generator, on the same gateway URL with the same JSON body: the
  ceiling an HTTP/1.1 client can reach on this machine;
* ``coord``  -- ``coord.Client``; C "workers" each send the next request from the callback
  of the previous one (no coroutine per request), as wrk's event loop does;
* ``etcd3``  -- python-etcd3 (blocking gRPC, one thread per in-flight request), if importable;
* ``aetcd``  -- aetcd (asyncio gRPC, one task per in-flight request), if importable;
* ``socket``, ``twisted`` -- references, run only when named in ``--contenders``: the same
  requests from raw sockets and an epoll loop, or from a bare Twisted protocol with
  httptools (no JSON, no Deferred), to show what Python itself and Twisted itself cost.

The machine is assumed noisy (etcd and the client share the CPU), so the contenders are
interleaved: every round measures every case with every contender, in an order rotated
from round to round, and the report gives the median of the rounds.  See README.md.

This file is also its own worker: ``kv.py --worker coord put 32 URL DURATION`` runs one
measurement and prints one JSON line.  Only the standard library is imported at the top, so
the worker can run under another interpreter (``--etcd3-python``, ``--aetcd-python``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any
from urllib.parse import urlsplit

KEY = b"coord-bench/key"
OPS = ("put", "get")
CONCURRENCY = (1, 32)
PYTHON_CONTENDERS = ("coord", "etcd3", "aetcd", "socket", "twisted")
GRPC = {"etcd3": "python-etcd3", "aetcd": "aetcd"}
# Run only when asked for (--contenders): a reference for what Python itself costs, not an
# etcd client, so not one of the targets' "other Python clients".
REFERENCES = {"socket": "raw sockets and an epoll loop in Python, no HTTP library or JSON",
              "twisted": "a bare Twisted protocol with httptools, no JSON, no Deferred"}
TARGET_RATIO = 0.85
# Python workers run this long before the clock starts (imports are done before that):
# connections are open and the interpreter's caches warm, as in a long-running program.
WARMUP = 0.3


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def value_of(size: int) -> bytes:
    return (b"0123456789abcdef" * (size // 16 + 1))[:size]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def gateway_body(op: str, value: bytes) -> str:
    """The JSON body coord sends for this operation (coord omits an empty value)."""
    body = {"key": b64(KEY)}
    if op == "put" and value:
        body["value"] = b64(value)
    return json.dumps(body, separators=(",", ":"))


def gateway_path(op: str) -> str:
    return "/v3/kv/put" if op == "put" else "/v3/kv/range"


def gateway_request(op: str, value: bytes, netloc: str) -> bytes:
    """The whole HTTP/1.1 request the references send, as wrk's script does."""
    body = gateway_body(op, value).encode()
    return (f"POST {gateway_path(op)} HTTP/1.1\r\nHost: {netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


# ------------------------------------------------------------------------------ workers
#
# Each worker runs WARMUP seconds, then counts the requests completed during ``duration``
# seconds, and prints {"requests": N, "seconds": T, "cpu": CPU seconds of the worker,
# "server_cpu": CPU seconds of etcd or null}, or {"error": "..."}.


def cpu_seconds() -> float:
    """CPU time (user + system, all threads) this process has used."""
    times = os.times()
    return times.user + times.system


def process_cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system) process `pid` has used, from /proc; None if unknown."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # utime and stime are fields 14 and 15 of stat(5); fields[0] is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Window:
    """The measured stretch of a worker's run: requests, wall time, client and server CPU."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.start_mark: tuple | None = None
        self.stop_mark: tuple | None = None

    def _mark(self, count: int) -> tuple:
        return (count, time.perf_counter(), cpu_seconds(), process_cpu_seconds(self.server_pid))

    def start(self, count: int) -> None:
        self.start_mark = self._mark(count)

    def stop(self, count: int) -> None:
        self.stop_mark = self._mark(count)

    def result(self) -> dict[str, Any]:
        if self.start_mark is None or self.stop_mark is None:
            return failure("the measurement did not complete")
        (c0, t0, cpu0, s0), (c1, t1, cpu1, s1) = self.start_mark, self.stop_mark
        return {"requests": c1 - c0, "seconds": t1 - t0, "cpu": cpu1 - cpu0,
                "server_cpu": None if s0 is None or s1 is None else s1 - s0}


def failure(error: str) -> dict[str, Any]:
    return {"error": error}


def worker_coord(op: str, inflight: int, url: str, duration: float, value: bytes,
                 window: Window) -> dict:
    from twisted.internet import reactor as the_reactor

    from coord import Client

    reactor: Any = the_reactor
    client = Client(reactor, url, max_connections=max(64, inflight))
    call = client.set if op == "put" else client.get
    args: tuple = (KEY, value) if op == "put" else (KEY,)
    state: dict[str, Any] = {"done": 0, "stopping": False, "error": None, "running": inflight}

    def finished() -> None:
        state["running"] -= 1
        if state["running"] == 0 and reactor.running:
            reactor.stop()

    def failed(reason: Any) -> None:
        if state["error"] is None:
            state["error"] = f"{reason.type.__name__}: {reason.getErrorMessage()}"
        state["stopping"] = True
        finished()

    def answered(_: Any) -> None:
        # Each of the `inflight` workers sends its next request from here: no coroutine,
        # no extra Deferred chain -- the same loop as wrk's.
        state["done"] += 1
        if state["stopping"]:
            finished()
        else:
            call(*args).addCallbacks(answered, failed)

    def start_clock() -> None:
        window.start(state["done"])
        reactor.callLater(duration, stop_clock)

    def stop_clock() -> None:
        window.stop(state["done"])
        state["stopping"] = True  # the requests in flight end their workers

    def begin() -> None:
        for _ in range(inflight):
            call(*args).addCallbacks(answered, failed)
        reactor.callLater(WARMUP, start_clock)

    reactor.callWhenRunning(begin)
    reactor.run()
    client.close()
    return failure(state["error"]) if state["error"] else window.result()


def worker_etcd3(op: str, inflight: int, url: str, duration: float, value: bytes,
                 window: Window) -> dict:
    import threading

    import etcd3

    parts = urlsplit(url)
    client = etcd3.client(host=parts.hostname, port=parts.port or 2379)
    counts = [0] * inflight
    errors: list[str] = []
    stop = threading.Event()

    def loop(slot: int) -> None:
        # One blocking call at a time per thread: `inflight` threads share the client.
        try:
            if op == "put":
                while not stop.is_set():
                    client.put(KEY, value)
                    counts[slot] += 1
            else:
                while not stop.is_set():
                    client.get(KEY)
                    counts[slot] += 1
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
            stop.set()

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(inflight)]
    for thread in threads:
        thread.start()
    if not stop.wait(WARMUP):
        window.start(sum(counts))
        if not stop.wait(duration):
            window.stop(sum(counts))
    stop.set()
    for thread in threads:
        thread.join(10)
    with contextlib.suppress(Exception):
        client.close()
    return failure(errors[0]) if errors else window.result()


def worker_aetcd(op: str, inflight: int, url: str, duration: float, value: bytes,
                 window: Window) -> dict:
    import asyncio

    import aetcd

    async def main() -> dict:
        parts = urlsplit(url)
        counts = [0] * inflight
        stop = asyncio.Event()
        async with aetcd.Client(host=parts.hostname, port=parts.port or 2379) as client:

            async def loop(slot: int) -> None:
                # One task per request in flight, each awaiting its call in turn.
                if op == "put":
                    while not stop.is_set():
                        await client.put(KEY, value)
                        counts[slot] += 1
                else:
                    while not stop.is_set():
                        await client.get(KEY)
                        counts[slot] += 1

            tasks = [asyncio.ensure_future(loop(i)) for i in range(inflight)]
            try:
                done, _ = await asyncio.wait(tasks, timeout=WARMUP)
                if not done:
                    window.start(sum(counts))
                    done, _ = await asyncio.wait(tasks, timeout=duration)
                    if not done:
                        window.stop(sum(counts))
            finally:
                stop.set()
                await asyncio.wait(tasks, timeout=10)
            for task in tasks:
                error = task.exception() if task.done() and not task.cancelled() else None
                if error is not None:
                    return failure(f"{type(error).__name__}: {error}")
            return window.result()

    return asyncio.run(main())


def answer_end(data: bytes) -> int | None:
    """Where the HTTP answer at the start of ``data`` ends; None if it is not all there.

    etcd's gateway sends a small answer with a Content-Length, a bigger one (more than
    about 2 kB) chunked.  Raises ValueError for an answer other than 200 OK.
    """
    end_of_head = data.find(b"\r\n\r\n")
    if end_of_head < 0:
        return None
    if not data.startswith(b"HTTP/1.1 200 "):
        raise ValueError(f"etcd answered {data[:40]!r}")
    head = data[:end_of_head].lower()
    at = head.find(b"\r\ncontent-length:")
    if at >= 0:
        at += len(b"\r\ncontent-length:")
        line_end = head.find(b"\r\n", at)
        end = end_of_head + 4 + int(head[at:] if line_end < 0 else head[at:line_end])
        return end if len(data) >= end else None
    if b"\r\ntransfer-encoding: chunked" not in head:
        raise ValueError("an answer with neither a Content-Length nor chunks")
    at = end_of_head + 4
    while True:  # chunks: a hex size line (maybe with extensions), data, CRLF; 0 ends them
        line_end = data.find(b"\r\n", at)
        if line_end < 0:
            return None
        size = int(data[at:line_end].split(b";")[0], 16)
        if size == 0:  # then trailer lines, up to an empty one
            end = data.find(b"\r\n\r\n", line_end - 2)
            return None if end < 0 else end + 4
        at = line_end + 2 + size + 2


def worker_socket(op: str, inflight: int, url: str, duration: float, value: bytes,
                  window: Window) -> dict:
    """The floor for any Python client: raw sockets and an epoll loop, nothing else.

    No HTTP library (the answer's end is found from its Content-Length or its chunks, see
    answer_end), no JSON, no result objects, no Deferred: what is left is the
    interpreter's own cost of a wake-up, a recv and a send.  A reference, not an etcd
    client -- it is not one of the "other Python clients" of the targets.
    """
    import select
    import socket

    parts = urlsplit(url)
    request = gateway_request(op, value, parts.netloc)
    poller = select.epoll()
    socks: dict[int, socket.socket] = {}
    pending: dict[int, bytes] = {}
    for _ in range(inflight):
        sock = socket.create_connection((parts.hostname, parts.port or 2379))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        socks[sock.fileno()] = sock
        pending[sock.fileno()] = b""
        poller.register(sock.fileno(), select.EPOLLIN)
        sock.send(request)
    done = 0
    start_at = time.perf_counter() + WARMUP
    stop_at = start_at + duration
    started = False
    try:
        while True:
            for fd, _ in poller.poll(1.0):
                received = socks[fd].recv(65536)
                if not received:
                    return failure("etcd closed a connection")
                data = pending[fd] + received
                try:
                    end = answer_end(data)
                except ValueError as e:
                    return failure(str(e))
                if end is None:
                    pending[fd] = data
                    continue
                pending[fd] = data[end:]
                done += 1
                socks[fd].send(request)
            now = time.perf_counter()
            if not started and now >= start_at:
                window.start(done)
                started = True
            elif started and now >= stop_at:
                window.stop(done)
                return window.result()
    finally:
        for sock in socks.values():
            sock.close()
        poller.close()


def worker_twisted(op: str, inflight: int, url: str, duration: float, value: bytes,
                   window: Window) -> dict:
    """The floor for a client built as coord is: Twisted's reactor and protocols, httptools.

    One ``Protocol`` per request in flight, each its own httptools parser; the next request
    is written (``transport.write``) as soon as an answer is complete.  No JSON, no result
    objects, no Deferred, no pool: what is left is the reactor's dispatch and the HTTP
    parser.  A reference, not an etcd client.
    """
    import httptools
    from twisted.internet import protocol
    from twisted.internet import reactor as the_reactor

    reactor: Any = the_reactor
    parts = urlsplit(url)
    request = gateway_request(op, value, parts.netloc)
    state: dict[str, Any] = {"done": 0, "stopping": False, "error": None, "running": inflight}

    def finished() -> None:
        state["running"] -= 1
        if state["running"] == 0 and reactor.running:
            reactor.stop()

    class Bare(protocol.Protocol):
        transport: Any  # a TCP connection (setTcpNoDelay), not just any ITransport
        ended = False

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)
            self.parser = httptools.HttpResponseParser(self)
            self.transport.write(request)

        def end(self, error: str | None = None) -> None:
            """This connection's worker is done (once), with an error if it went wrong."""
            if self.ended:
                return
            self.ended = True
            if error is not None and state["error"] is None:
                state["error"] = error
            if error is not None:
                state["stopping"] = True
            self.transport.abortConnection()
            finished()

        def dataReceived(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError as e:
                self.end(f"bad HTTP from etcd: {e}")

        def on_message_complete(self) -> None:
            status = self.parser.get_status_code()
            if status != 200:
                self.end(f"etcd answered {status}")
                return
            state["done"] += 1
            if state["stopping"]:
                self.end()
            else:
                self.transport.write(request)

        def connectionLost(self, reason: Any = None) -> None:
            self.end(None if state["stopping"] else "etcd closed a connection")

    def start_clock() -> None:
        window.start(state["done"])
        reactor.callLater(duration, stop_clock)

    def stop_clock() -> None:
        window.stop(state["done"])
        state["stopping"] = True

    class Connector(protocol.ClientFactory):
        protocol = Bare

        def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
            state["error"] = f"cannot connect: {reason.getErrorMessage()}"
            state["stopping"] = True
            finished()

    def begin() -> None:
        for _ in range(inflight):
            reactor.connectTCP(parts.hostname, parts.port or 2379, Connector())
        reactor.callLater(WARMUP, start_clock)

    reactor.callWhenRunning(begin)
    reactor.run()
    return failure(state["error"]) if state["error"] else window.result()


WORKERS = {"coord": worker_coord, "etcd3": worker_etcd3, "aetcd": worker_aetcd,
           "socket": worker_socket, "twisted": worker_twisted}


def run_worker(argv: list[str], value_size: int, server_pid: int | None) -> int:
    contender, op, inflight, url, duration = argv
    try:
        result = WORKERS[contender](op, int(inflight), url, float(duration),
                                    value_of(value_size), Window(server_pid))
    except Exception as e:  # reported to the parent, which notes it and goes on
        result = failure(f"{type(e).__name__}: {e}")
    print(json.dumps(result), flush=True)
    return 0 if "error" not in result else 1


# ------------------------------------------------------------------------------ the parent


@dataclasses.dataclass
class Sample:
    """One measurement: requests per second, and CPU microseconds per request spent by the
    client and (when its pid is known) by etcd."""

    rps: float
    client_cpu_us: float
    server_cpu_us: float | None


class Contender:
    name = ""
    note = ""
    server_pid: int | None = None

    def measure(self, op: str, inflight: int) -> tuple[Sample | None, str | None]:
        """(sample, None), or (None, why it failed)."""
        raise NotImplementedError


class Wrk(Contender):
    name = "wrk"

    def __init__(self, url: str, duration: int, value: bytes, tmpdir: str) -> None:
        self.url = url
        self.duration = duration
        self.scripts = {}
        for op in OPS:
            path = os.path.join(tmpdir, f"{op}.lua")
            with open(path, "w") as script:
                script.write('wrk.method = "POST"\n'
                             f"wrk.body = '{gateway_body(op, value)}'\n"
                             'wrk.headers["Content-Type"] = "application/json"\n')
            self.scripts[op] = path

    def measure(self, op: str, inflight: int) -> tuple[Sample | None, str | None]:
        # One thread: Python's clients are single-threaded too, and -c1 needs -t1.
        command = ["wrk", "-t1", f"-c{inflight}", f"-d{self.duration}s", "-s",
                   self.scripts[op], self.url + gateway_path(op)]
        before = children_cpu_seconds()
        server_before = process_cpu_seconds(self.server_pid)
        try:
            proc = subprocess.run(command, capture_output=True, text=True,
                                  timeout=self.duration + 60)
        except subprocess.TimeoutExpired:
            return None, "wrk did not finish"
        cpu = children_cpu_seconds() - before
        server_after = process_cpu_seconds(self.server_pid)
        out = proc.stdout
        match = re.search(r"Requests/sec:\s*([\d.]+)", out)
        total = re.search(r"(\d+) requests in", out)
        if proc.returncode != 0 or match is None or total is None:
            return None, f"wrk failed: {(proc.stderr or out).strip()[-300:]}"
        bad = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
        if bad:
            return None, f"wrk got {bad.group(1)} error responses"
        errors = re.search(r"Socket errors:.*", out)
        if errors:
            return None, f"wrk: {errors.group(0)}"
        requests = max(1, int(total.group(1)))
        server = (None if server_before is None or server_after is None
                  else 1e6 * (server_after - server_before) / requests)
        return Sample(float(match.group(1)), 1e6 * cpu / requests, server), None


class PythonWorker(Contender):
    def __init__(self, name: str, python: str, url: str, duration: int,
                 value_size: int) -> None:
        self.name = name
        self.python = python
        self.url = url
        self.duration = duration
        self.value_size = value_size
        if name in GRPC:
            self.note = f"{GRPC[name]} talks gRPC to the same port, not the JSON gateway"
        elif name in REFERENCES:
            self.note = f"a reference, not an etcd client: {REFERENCES[name]}"

    def measure(self, op: str, inflight: int) -> tuple[Sample | None, str | None]:
        command = [self.python, os.path.abspath(__file__), "--value-size",
                   str(self.value_size), "--worker", self.name, op, str(inflight),
                   self.url, str(self.duration)]
        if self.server_pid:
            command += ["--server-pid", str(self.server_pid)]
        try:
            proc = subprocess.run(command, capture_output=True, text=True,
                                  timeout=self.duration + 60)
        except subprocess.TimeoutExpired:
            return None, f"{self.name} worker did not finish"
        lines = proc.stdout.strip().splitlines()
        try:
            result = json.loads(lines[-1])
        except (IndexError, ValueError):
            return None, f"{self.name} worker crashed: {proc.stderr.strip()[-300:]}"
        if "error" in result:
            return None, f"{self.name}: {result['error']}"
        requests = max(1, result["requests"])
        server = result["server_cpu"]
        return Sample(requests / result["seconds"], 1e6 * result["cpu"] / requests,
                      None if server is None else 1e6 * server / requests), None


def children_cpu_seconds() -> float:
    """CPU time (user + system) used by this process's waited-for children."""
    times = os.times()
    return times.children_user + times.children_system


def importable(python: str, module: str) -> str | None:
    """None if `python` can import `module`, else why not (one line)."""
    try:
        proc = subprocess.run([python, "-c", f"import {module}"], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if proc.returncode == 0:
        return None
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    error = next((line for line in reversed(lines) if re.match(r"\w+(Error|Exception)", line)),
                 lines[-1] if lines else "import failed")
    return error.strip()[:200]


def gateway(url: str, path: str, body: dict | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data,
                                     method="GET" if data is None else "POST")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as response:
        return json.loads(response.read() or b"{}")


def median(samples: list[float]) -> float | None:
    return statistics.median(samples) if samples else None


def benchmark(args: argparse.Namespace, url: str, version: str,
              server_pid: int | None) -> dict:
    value = value_of(args.value_size)
    # The key exists before anything reads it; every put overwrites it.
    gateway(url, "/v3/kv/put", {"key": b64(KEY), "value": b64(value)})
    notes: list[str] = []
    tmpdir = tempfile.mkdtemp(prefix="coord-bench-")
    try:
        contenders: list[Contender] = []
        if shutil.which("wrk"):
            contenders.append(Wrk(url, args.duration, value, tmpdir))
        else:
            notes.append("wrk: not on PATH, skipped (apt-get install wrk); no coord/wrk ratio")
        pythons = {"coord": sys.executable, "etcd3": args.etcd3_python,
                   "aetcd": args.aetcd_python, "socket": sys.executable,
                   "twisted": sys.executable}
        for name in PYTHON_CONTENDERS:
            if name not in args.contenders:
                continue
            why = importable(pythons[name], name)
            if why is not None:
                notes.append(f"{name}: not importable by {pythons[name]} ({why}), skipped")
                continue
            worker = PythonWorker(name, pythons[name], url, args.duration, args.value_size)
            if worker.note:
                notes.append(f"{name}: {worker.note}")
            contenders.append(worker)
        if "wrk" not in args.contenders:
            contenders = [c for c in contenders if c.name != "wrk"]
        for contender in contenders:
            contender.server_pid = server_pid

        cases = [(op, c) for op in args.ops for c in args.concurrency]
        # (op, in-flight, contender) -> {round: Sample}
        samples: dict[tuple[str, int, str], dict[int, Sample]] = {
            (op, c, k.name): {} for op, c in cases for k in contenders}
        failures: dict[str, str] = {}
        for rnd in range(args.rounds):
            shift = rnd % max(1, len(contenders))
            order = contenders[shift:] + contenders[:shift]
            log(f"round {rnd + 1}/{args.rounds}: " + ", ".join(k.name for k in order))
            for op, inflight in cases:
                line = []
                for contender in order:
                    sample: Sample | None
                    sample, error = contender.measure(op, inflight)
                    if sample is None:
                        failures.setdefault(f"{contender.name} {op} x{inflight}", str(error))
                        line.append(f"{contender.name} failed")
                    else:
                        samples[(op, inflight, contender.name)][rnd] = sample
                        line.append(f"{contender.name} {sample.rps:.0f}")
                log(f"  {op} x{inflight}: " + ", ".join(line))
        for what, error in failures.items():
            notes.append(f"{what}: {error}")
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)

    results = []
    for op, inflight in cases:
        row: dict[str, Any] = {"op": op, "inflight": inflight, "contenders": {}}
        for k in contenders:
            runs = samples[(op, inflight, k.name)]
            server = [x.server_cpu_us for x in runs.values() if x.server_cpu_us is not None]
            row["contenders"][k.name] = {
                "median": median([x.rps for x in runs.values()]),
                "runs": [runs[r].rps if r in runs else None for r in range(args.rounds)],
                "client_cpu_us_per_request": median([x.client_cpu_us for x in runs.values()]),
                "server_cpu_us_per_request": median(server),
            }
        wrk_runs = samples.get((op, inflight, "wrk"), {})
        coord_runs = samples.get((op, inflight, "coord"), {})
        wrk_med = row["contenders"].get("wrk", {}).get("median")
        coord_med = row["contenders"].get("coord", {}).get("median")
        row["coord_per_wrk"] = coord_med / wrk_med if wrk_med and coord_med else None
        # coord/wrk within each round (the two ran close together in time)
        row["coord_per_wrk_runs"] = [coord_runs[r].rps / wrk_runs[r].rps
                                     for r in range(args.rounds)
                                     if r in coord_runs and r in wrk_runs]
        results.append(row)
    return {
        "etcd_version": version,
        "url": url,
        "rounds": args.rounds,
        "duration": args.duration,
        "value_size": args.value_size,
        "warmup": WARMUP,
        "contenders": [k.name for k in contenders],
        "results": results,
        "targets": targets(results, [k.name for k in contenders]),
        "notes": notes,
    }


def targets(results: list[dict], names: list[str]) -> list[dict]:
    """The issue's targets: coord >= 0.85x wrk; coord ahead of every other Python client."""
    checks = []
    others = [n for n in names if n in GRPC]
    for row in results:
        case = f"{row['op']} x{row['inflight']}"
        ratio = row["coord_per_wrk"]
        if ratio is not None:
            checks.append({"case": case, "target": f"coord >= {TARGET_RATIO}x wrk",
                           "met": ratio >= TARGET_RATIO})
        coord = row["contenders"].get("coord", {}).get("median")
        for name in others:
            theirs = row["contenders"][name]["median"]
            if coord is not None and theirs is not None:
                checks.append({"case": case, "target": f"coord > {name}",
                               "met": coord > theirs})
    return checks


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return [fmt(headers)] + [fmt(r) for r in rows]


def render(report: dict) -> str:
    names = report["contenders"]
    ratio_columns = "coord" in names and "wrk" in names
    headers = ["op", "in-flight"]
    for name in names:
        headers.append(f"{name} (gRPC)" if name in GRPC else
                       f"{name} (ref)" if name in REFERENCES else name)
        if name == "coord" and ratio_columns:
            headers += ["coord/wrk", "per round"]
    rows, cpu_rows = [], []
    for row in report["results"]:
        cells = [row["op"], str(row["inflight"])]
        cpu_cells = list(cells)
        for name in names:
            entry = row["contenders"][name]
            cells.append("-" if entry["median"] is None else f"{entry['median']:.0f}")
            client = entry["client_cpu_us_per_request"]
            server = entry["server_cpu_us_per_request"]
            cpu_cells.append(("-" if client is None else f"{client:.0f}")
                             + ("" if server is None else f" / {server:.0f}"))
            if name == "coord" and ratio_columns:
                ratio = row["coord_per_wrk"]
                cells.append("-" if ratio is None else f"{ratio:.2f}")
                per = row["coord_per_wrk_runs"]
                cells.append(" ".join(f"{r:.2f}" for r in per) if per else "-")
        rows.append(cells)
        cpu_rows.append(cpu_cells)
    out = [f"etcd {report['etcd_version']} at {report['url']}, {report['rounds']} rounds x "
           f"{report['duration']} s, {report['value_size']}-byte value, median req/s"]
    out += _table(headers, rows)
    with_server = any(e["server_cpu_us_per_request"] is not None
                      for row in report["results"] for e in row["contenders"].values())
    out += ["", "CPU per request, microseconds (user+system, median): client"
            + (" / etcd" if with_server else "")]
    out += _table(["op", "in-flight", *names], cpu_rows)
    if report["targets"]:
        out += ["", f"targets: coord >= {TARGET_RATIO:g}x wrk, coord ahead of every other "
                "Python client"]
        for row in report["results"]:
            case = f"{row['op']} x{row['inflight']}"
            missed = [c["target"] for c in report["targets"]
                      if c["case"] == case and not c["met"]]
            out.append(f"  {case:<8} " + ("met" if not missed else
                                          "MISSED: " + ", ".join(missed)))
    out += [f"note: {n}" for n in report["notes"]]
    return "\n".join(out)


def parse_list(kind: type, allowed: tuple | None = None) -> Any:
    def parse(text: str) -> list:
        items = [kind(x) for x in text.split(",") if x.strip()]
        if not items or (allowed is not None and any(x not in allowed for x in items)):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {allowed}")
        return items
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="put/get throughput of coord vs wrk (and other Python etcd clients)")
    parser.add_argument("--url", metavar="URL",
                        help="etcd client URL (http://host:port); default: start an embedded "
                        "etcd (coord.server.EtcdServer; $COORD_ETCD picks the binary)")
    parser.add_argument("--duration", type=int, default=3, metavar="S",
                        help="seconds per measurement (default 3; whole seconds, as wrk "
                        "takes them)")
    parser.add_argument("--rounds", type=int, default=3, metavar="N",
                        help="rounds (default 3); the median is reported")
    parser.add_argument("--value-size", type=int, default=64, metavar="B",
                        help="value size in bytes (default 64)")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="print the report as JSON instead of the table; with FILE, "
                        "write the JSON there and print the table")
    parser.add_argument("--ops", type=parse_list(str, OPS), default=list(OPS),
                        help="operations, comma-separated (default put,get)")
    parser.add_argument("--concurrency", type=parse_list(int), default=list(CONCURRENCY),
                        help="requests in flight, comma-separated (default 1,32)")
    parser.add_argument("--contenders", type=parse_list(str, ("wrk", *PYTHON_CONTENDERS)),
                        default=["wrk", *(n for n in PYTHON_CONTENDERS if n not in REFERENCES)],
                        help="which to run, of wrk,coord,etcd3,aetcd,socket,twisted "
                        "(default all available but the references, socket and twisted)")
    parser.add_argument("--etcd3-python", default=sys.executable, metavar="PYTHON",
                        help="interpreter that has python-etcd3 (it needs protobuf<4, which "
                        "aetcd does not accept); default this one")
    parser.add_argument("--aetcd-python", default=sys.executable, metavar="PYTHON",
                        help="interpreter that has aetcd; default this one")
    parser.add_argument("--server-pid", type=int, metavar="PID",
                        help="pid of the etcd behind --url (same machine), to report its CPU "
                        "per request; known for the embedded etcd")
    parser.add_argument("--worker", nargs=5, metavar=("CLIENT", "OP", "INFLIGHT", "URL", "S"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args.worker, args.value_size, args.server_pid)
    if args.duration < 1 or args.rounds < 1 or args.value_size < 0:
        parser.error("--duration and --rounds must be at least 1, --value-size at least 0")
    if args.url and urlsplit(args.url).scheme != "http":
        parser.error("--url must be http://host:port (wrk and the gRPC clients get no TLS here)")

    # SIGTERM ends the run like Ctrl-C: the embedded etcd is stopped on the way out.
    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    server = None
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            from coord.server import EtcdServer

            log("starting an embedded etcd ...")
            server = EtcdServer().start()
            url = server.url
        version = gateway(url, "/version").get("etcdserver", "?")
        log(f"etcd {version} at {url}")
        pid = server.pid if server is not None else args.server_pid
        report = benchmark(args, url, version, pid)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if server is not None:
            server.stop()
            log("embedded etcd stopped")
    if args.json and args.json != "-":
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
    print(json.dumps(report, indent=2) if args.json == "-" else render(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
