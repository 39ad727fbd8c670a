"""The scripts in benchmarks/ still run: each worker once, briefly, against the suite's etcd.

They measure speed, which no test here judges; these only check that a user who runs them
gets figures and not a traceback -- and that the socket reference worker of kv.py reads
what etcd sends (chunked answers) and says so when a connection is cut mid-answer, and
that ``--plot`` writes a PNG of the size asked for (or refuses at once without
matplotlib).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

from coord.server import _free_ports

ROOT = Path(__file__).resolve().parent.parent
KV = ROOT / "benchmarks" / "kv.py"


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc


@pytest.mark.parametrize("worker", ["coord", "socket", "twisted"])
@pytest.mark.parametrize(("op", "inflight"), [("put", 1), ("get", 4)])
def test_kv_worker(etcd, worker, op, inflight):
    if op == "get":  # the key a get reads exists (the parent writes it before any worker)
        run(str(KV), "--worker", worker, "put", "1", etcd.url, "0.1")
    out = run(str(KV), "--worker", worker, op, str(inflight), etcd.url, "0.3").stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert "error" not in result, result
    assert result["requests"] > 0
    assert 0.25 < result["seconds"] < 1.0
    assert result["cpu"] >= 0


@pytest.mark.parametrize("worker", ["coord", "socket", "twisted"])
def test_kv_worker_reports_an_unreachable_etcd(worker):
    (unused_port,) = _free_ports(1)  # free now, and nothing listens there
    proc = subprocess.run([sys.executable, str(KV), "--worker", worker, "put", "2",
                           f"http://127.0.0.1:{unused_port}", "0.3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "requests" not in result
    assert "refused" in result["error"].lower() or "unavailable" in result["error"].lower(), \
        result


def test_kv_report_marks_the_reference(etcd):
    proc = run(str(KV), "--url", etcd.url, "--rounds", "1", "--duration", "1",
               "--ops", "put", "--concurrency", "1", "--contenders", "coord,socket",
               "--json")
    report = json.loads(proc.stdout)
    assert report["contenders"] == ["coord", "socket"]
    (row,) = report["results"]
    assert row["contenders"]["coord"]["median"] > 0
    assert row["contenders"]["socket"]["median"] > 0
    # The reference is in no target: without wrk or a gRPC client there is nothing to check.
    assert report["targets"] == []
    assert any("a reference, not an etcd client" in n for n in report["notes"])


def test_client_path():
    out = run(str(ROOT / "benchmarks" / "client_path.py"), "--count", "200", "--rounds", "1",
              "--inflight", "4").stdout
    assert "per request" in out


def load_kv():
    """benchmarks/kv.py as a module (it is a script, not part of the package)."""
    module = sys.modules.get("kv_benchmark")
    if module is None:
        spec = importlib.util.spec_from_file_location("kv_benchmark", KV)
        module = importlib.util.module_from_spec(spec)
        sys.modules["kv_benchmark"] = module  # its dataclass looks itself up there
        spec.loader.exec_module(module)
    return module


SIZED = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
TRAILERS = (b"HTTP/1.1 200 OK\r\nTrailer: Grpc-Trailer-Content-Type\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
            b"Grpc-Trailer-Content-Type: application/grpc\r\n\r\n")


@pytest.mark.parametrize("answer", [SIZED, CHUNKED, TRAILERS,
                                    SIZED.replace(b"Content-Length", b"content-length")])
def test_socket_worker_answer_end(answer):
    answer_end = load_kv().answer_end
    assert answer_end(answer) == len(answer)
    assert answer_end(answer + SIZED) == len(answer)  # the next answer is not this one's
    for cut in range(len(answer)):
        assert answer_end(answer[:cut]) is None, cut


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\n",  # neither a length nor chunks
])
def test_socket_worker_answer_end_refuses(answer):
    with pytest.raises(ValueError):
        load_kv().answer_end(answer)


@pytest.mark.slow
def test_failover_round():
    # One short round: a 3-member cluster of its own, the preferred follower frozen 1 s.
    out = run(str(ROOT / "benchmarks" / "failover.py"), "--freeze", "1", "--readers", "1",
              "--transports", "pool", "--roles", "follower", "--modes", "on").stdout
    lines = out.splitlines()
    row = next(line for line in lines if line.startswith("pool ") and "follower" in line)
    assert "kept" in row and "0.0%" in row, out


# ============================================================================================
# the socket reference worker of benchmarks/kv.py
# ============================================================================================

KV_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "kv.py"


def kv_worker(*argv, timeout=60):
    """Run ``kv.py *argv``: (exit code, its last stdout line as JSON, stderr)."""
    proc = subprocess.run([sys.executable, str(KV_SCRIPT), *argv], capture_output=True,
                          text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    return proc.returncode, json.loads(lines[-1]) if lines else None, proc.stderr


def test_socket_worker_reads_answers_etcd_sends_chunked(etcd):
    # Go's net/http sends an answer of more than about 2 kB chunked, without a
    # Content-Length: a get of a 3000-byte value is one.
    for op in ("put", "get"):
        rc, result, err = kv_worker("--value-size", "3000", "--worker", "socket", op, "1",
                                    etcd.url, "0.2")
        assert rc == 0 and result is not None and "error" not in result, (op, result, err)
        assert result["requests"] > 0


@pytest.mark.parametrize("partial", [
    b"HTTP/1.1 200 OK\r\nContent-Len",  # the head cut short
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",  # no body
    b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"header":',  # part of the body
])
def test_socket_worker_reports_a_connection_closed_mid_answer(partial):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def serve():
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(partial)  # then close

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        rc, result, err = kv_worker("--worker", "socket", "get", "1",
                                    f"http://127.0.0.1:{server.getsockname()[1]}", "0.2",
                                    timeout=30)
    finally:
        thread.join(5)
        server.close()
    # Not a measurement of 0 requests: the worker must say the connection was closed.
    assert rc == 1 and result is not None and "closed" in result.get("error", ""), \
        (result, err)


@pytest.mark.slow
def test_scale_round(etcd):
    # 10 locks, each mode; and an unshared run that the open-files limit cannot hold stops
    # with a message before it starts
    proc = run(str(ROOT / "benchmarks" / "scale.py"), "--url", etcd.url, "--counts", "10",
               "--deletions", "2", "--idle", "0.2", "--json")
    shared, unshared = json.loads(proc.stdout)
    assert (shared["mode"], unshared["mode"]) == ("shared", "unshared")
    for r in (shared, unshared):
        assert "error" not in r, r
        assert r["lost_p50_ms"] > 0
    assert shared["peak_streams"] <= 8
    assert unshared["peak_streams"] == 10
    proc = run(str(ROOT / "benchmarks" / "scale.py"), "--url", etcd.url, "--counts", "2000",
               "--modes", "unshared", "--nofile", "1024", "--json")
    (refused,) = json.loads(proc.stdout)
    assert "soft limit" in refused["error"] and "1024" in refused["error"], refused


def test_barrier_benchmark_prints_figures(etcd):
    out = run(str(ROOT / "benchmarks" / "barrier.py"), "--url", etcd.url, "--rounds", "1",
              "--waiters", "2", "--parties", "2").stdout
    assert re.search(r"Barrier.wait, 2 waiter processes +p50 +[\d.]+ ms +p99 +[\d.]+ ms", out), out
    assert re.search(r"reference: bare client.watch, 2 processes +p50 +[\d.]+ ms", out), out
    assert re.search(r"ratio recipe/reference: p50 [\d.]+", out), out
    assert re.search(r"DoubleBarrier.enter, 2 processes +p50 +[\d.]+ ms", out), out


@pytest.mark.slow
def test_work_queue_round(etcd):
    """benchmarks/work_queue.py: a short run prints each measurement with figures."""
    proc = run(str(ROOT / "benchmarks" / "work_queue.py"), "--url", etcd.url,
               "--duration", "1", "--interval", "50")
    lines = proc.stdout.splitlines()
    counts = {}
    for label in ("reference: put + watch + delete, 1", "Queue, 1 consumer",
                  "Queue, 4 consumers (processes)", "reference: put + watch, 1 watching",
                  "Queue, 4 consumers waiting"):
        (line,) = [x for x in lines if x.startswith(label)]
        assert "p50" in line and "p99" in line, proc.stdout
        counts[label] = float(line[len(label):].split()[0])
    # (A 1 s window on a loaded machine may catch no ack of one measurement: speed is
    # not judged here; that the Queue delivered in them is.)
    assert counts["Queue, 4 consumers waiting"] > 0, proc.stdout
    assert counts["Queue, 1 consumer"] + counts["Queue, 4 consumers (processes)"] > 0, \
        proc.stdout


def test_group_round(etcd):
    out = run(str(ROOT / "benchmarks" / "group.py"), "--url", etcd.url, "--members", "2",
              "--rounds", "2").stdout
    assert "2 watching processes, 2 joins" in out, out
    for label in ("Group.join seen by every member's watch",
                  "bare put seen by every bare client.watch"):
        line = next(line for line in out.splitlines() if line.startswith(label))
        p50 = float(line.split("p50")[1].split("ms")[0])
        assert 0 < p50 < 5000, line
    assert "ratio group / reference: p50" in out


@pytest.mark.slow
def test_counter_round(etcd):
    # 1 and 2 writers, briefly: a table with adds/s next to puts/s, as ratios
    proc = run(str(ROOT / "benchmarks" / "counter.py"), "--url", etcd.url, "--duration",
               "0.3", "--rounds", "1", "--writers", "1,2", "--json")
    lines = proc.stdout.strip().splitlines()
    assert lines[1].split()[:4] == ["writers", "put/s", "add/s", "add/put"], proc.stdout
    table = json.loads(lines[-1])
    for writers in ("1", "2"):
        row = table[writers]
        assert row["put_per_s"] > 0 and row["add_per_s"] > 0, row
        assert row["ratio"] == row["add_per_s"] / row["put_per_s"]
        assert row["requests_per_add"] >= 1
        assert row["client_us"]["add"] > 0
        assert 0 < row["add_p50_ms"] <= row["add_p99_ms"]


# ============================================================================================
# --plot FILE: the latency distribution as a PNG (benchmarks/_plot.py)
# ============================================================================================

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """The (type, payload) chunks of the PNG ``data``, each one's CRC checked."""
    assert data[:8] == PNG_SIGNATURE, data[:8]
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind, payload = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length:at + 12 + length])
        assert zlib.crc32(kind + payload) == crc, kind
        chunks.append((kind, payload))
        at += 12 + length
    return chunks


def check_png(path: Path, width: int, height: int) -> None:
    """``path`` is a whole PNG of ``width`` x ``height`` pixels with a figure in it."""
    data = path.read_bytes()
    chunks = png_chunks(data)
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    w, h, depth, colour = struct.unpack(">IIBB", chunks[0][1][:10])
    assert (w, h) == (width, height)
    assert (depth, colour) == (8, 6), (depth, colour)  # 8-bit RGBA, as Agg writes
    # Every row is there: a filter byte and 4 bytes a pixel.
    pixels = zlib.decompress(b"".join(p for kind, p in chunks if kind == b"IDAT"))
    assert len(pixels) == height * (1 + 4 * width)
    # Axes, labels and title alone (no curve, no legend) make ~17 kB at 640x400; a
    # figure with its curves and legend ~40 kB or more.
    assert len(data) > 25_000, len(data)


def test_lock_plot(etcd, tmp_path):
    png = tmp_path / "lock.png"
    out = run(str(ROOT / "benchmarks" / "lock.py"), "--url", etcd.url, "--duration", "0.3",
              "--contenders", "2", "--etcd-lock-service", "--plot", str(png),
              "--plot-size", "640x400").stdout
    assert f"plot: {png}" in out, out
    check_png(png, 640, 400)


def test_election_plot(etcd, tmp_path):
    png = tmp_path / "election.png"
    out = run(str(ROOT / "benchmarks" / "election.py"), "--url", etcd.url, "--rounds", "2",
              "--candidates", "2", "--ttl", "1", "--plot", str(png),
              "--plot-size", "700x450").stdout
    assert "failover after resign" in out and "failover after crash" in out, out
    assert f"plot: {png}" in out, out
    check_png(png, 700, 450)


def refused(tmp_path: Path, script: str, *argv: str,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with ``argv`` against an etcd that is not there: it must stop with
    status 2 before trying it (it would fail otherwise, differently and later)."""
    (unused_port,) = _free_ports(1)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--url",
                           f"http://127.0.0.1:{unused_port}", *argv],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == "", proc.stdout  # not one figure, not the etcd line
    assert time.monotonic() - started < 20
    return proc


@pytest.mark.parametrize("script", ["lock.py", "election.py"])
def test_plot_without_matplotlib(tmp_path, script):
    hidden = tmp_path / "hidden"
    (hidden / "matplotlib").mkdir(parents=True)
    (hidden / "matplotlib" / "__init__.py").write_text(
        'raise ImportError("No module named \'matplotlib\' (hidden for this test)")\n')
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hidden),
                                                       env.get("PYTHONPATH")]))
    png = tmp_path / "out.png"
    proc = refused(tmp_path, script, "--plot", str(png), env=env)
    assert "matplotlib" in proc.stderr and "pip install 'coord[plot]'" in proc.stderr, \
        proc.stderr
    assert not png.exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["--plot", "no/such/directory/out.png"], "does not exist"),
    (["--plot", "out.png", "--plot-size", "640"], "not WIDTHxHEIGHT"),
    (["--plot", "out.png", "--plot-size", "64x400"], "width 64 is outside 200..4000"),
])
@pytest.mark.parametrize("script", ["lock.py", "election.py"])
def test_plot_refuses_a_bad_request(tmp_path, script, argv, message):
    proc = refused(tmp_path, script, *argv)
    assert message in proc.stderr, proc.stderr
    assert not (tmp_path / "out.png").exists()
