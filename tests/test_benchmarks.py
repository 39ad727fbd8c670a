"""The scripts in benchmarks/ still run: each worker once, briefly, against the suite's etcd.

They measure speed, which no test here judges; these only check that a user who runs them
gets figures and not a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KV = ROOT / "benchmarks" / "kv.py"


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc


@pytest.mark.parametrize("worker", ["coord", "socket"])
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
