#!/usr/bin/env python
"""The cost of coord's own request path, without etcd: a real Client against canned answers.

    python benchmarks/client_path.py [--op put|get] [--inflight N] [--count N]
                                     [--rounds N] [--reactor]

A ``coord.Client`` sends real requests over loopback TCP to a fake server in this process,
which answers each with the bytes etcd's gateway sends for that request (taken from etcd
3.5.1).  Nothing else runs, so the figure is the client's alone: request building, the
pool, HTTP parsing, decoding, the Deferred, plus one send and one recv.  The fake server's
own work (a recv and a send per request, building the answer) is included; it is the same
for any version of coord.

By default the answers are read by calling the pool's socket reader directly; with
``--reactor`` each batch goes through one turn of Twisted's reactor instead
(``reactor.iterate``), which adds what the reactor costs per wake-up.

Timings on a shared machine are noisy; instruction counts are not.  Under valgrind the
difference of two runs with different ``--count`` gives instructions per request::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python benchmarks/client_path.py --count 320 --rounds 1     # "Collected : A"
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python benchmarks/client_path.py --count 1600 --rounds 1    # "Collected : B"
    # instructions per request = (B - A) / 1280
"""

from __future__ import annotations

import argparse
import base64
import select
import socket
import sys
import time
from typing import Any

KEY = b"coord-bench/key"
VALUE = b"0123456789abcdef" * 4
B64_KEY = base64.b64encode(KEY).decode()
B64_VALUE = base64.b64encode(VALUE).decode()


def answer(op: str, revision: int) -> bytes:
    """The gateway's answer to a put, or to a get of KEY, at ``revision``."""
    header = (f'{{"cluster_id":"324952591200643719","member_id":"3319814642761637952",'
              f'"revision":"{revision}","raft_term":"2"}}')
    if op == "put":
        body = f'{{"header":{header}}}'
    else:
        body = (f'{{"header":{header},"kvs":[{{"key":"{B64_KEY}","create_revision":"2",'
                f'"mod_revision":"5","version":"4","value":"{B64_VALUE}"}}],"count":"1"}}')
    return ("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            "Grpc-Metadata-Content-Type: application/grpc\r\n"
            f"Date: Fri, 27 Nov 2026 10:00:00 GMT\r\nContent-Length: {len(body)}\r\n\r\n"
            f"{body}").encode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--op", choices=("put", "get"), default="put")
    parser.add_argument("--inflight", type=int, default=1)
    parser.add_argument("--count", type=int, default=20000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reactor", action="store_true",
                        help="read answers through a reactor turn, not directly")
    args = parser.parse_args()

    from twisted.internet import reactor as the_reactor

    from coord import Client

    reactor: Any = the_reactor
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    client = Client(reactor, f"http://127.0.0.1:{listener.getsockname()[1]}",
                    max_connections=max(64, args.inflight))
    if args.op == "put":
        def call() -> Any:
            return client.set(KEY, VALUE)
    else:
        def call() -> Any:
            return client.get(KEY)
    done = [0]
    errors: list[Any] = []

    def ok(_: Any) -> None:
        done[0] += 1

    def failed(f: Any) -> None:
        errors.append(f)

    servers: list[socket.socket] = []
    revision = [10]

    def serve() -> None:
        for s in servers:
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            if data:
                revision[0] += 1
                s.send(answer(args.op, revision[0]))

    # Connect the pool's connections: the first batch of requests opens them.
    for d in [call() for _ in range(args.inflight)]:
        d.addCallbacks(ok, failed)
    deadline = time.monotonic() + 10
    while len(servers) < args.inflight and time.monotonic() < deadline:
        reactor.iterate(0.01)
        if select.select([listener], [], [], 0)[0]:
            s, _ = listener.accept()
            s.setblocking(False)
            servers.append(s)
    for _ in range(100):
        reactor.iterate(0)
    serve()
    while done[0] < args.inflight and not errors and time.monotonic() < deadline:
        reactor.iterate(0.001)
    if errors or done[0] < args.inflight:
        print(f"could not set up: {errors or 'no answers'}", file=sys.stderr)
        return 1

    reader = client._transport.reader  # the pool's socket reader (see coord/_twisted/pool.py)
    read = (lambda: reactor.iterate(0)) if args.reactor else reader.doRead

    def run(count: int) -> tuple[float, float]:
        done[0] = 0
        wall, cpu = time.perf_counter(), time.process_time()
        while done[0] < count:
            batch = [call() for _ in range(args.inflight)]
            serve()  # loopback delivers during send(): the answers are readable now
            goal = done[0] + args.inflight
            for d in batch:
                d.addCallbacks(ok, failed)
            while done[0] < goal:
                if errors:
                    raise SystemExit(f"request failed: {errors[0]}")
                read()
        return ((time.perf_counter() - wall) / done[0] * 1e6,
                (time.process_time() - cpu) / done[0] * 1e6)

    results = [run(args.count) for _ in range(args.rounds)]
    print(f"{args.op} x{args.inflight}{' via reactor' if args.reactor else ''}: "
          f"best of {args.rounds}: {min(r[0] for r in results):.1f} us wall, "
          f"{min(r[1] for r in results):.1f} us CPU per request")
    client.close()
    for s in servers:
        s.close()
    listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
