"""examples/serve.py: replicas of a kiln-compiled model on Ray answer every request as eager
PyTorch does, one at a time and streamed (a small model, a few requests)."""

from __future__ import annotations

import os

import pytest

ray = pytest.importorskip("ray")

from kiln.examples.serve import main  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_replicas_serve_every_request(cluster, capsys) -> None:
    rows = main(["--model", "lenet5", "--replicas", "2", "--requests", "8"])
    printed = capsys.readouterr().out
    assert [r["replicas"] for r in rows] == [1, 2]
    for r in rows:
        assert r["answered"] == 8 and r["max_diff"] <= 1e-4
        assert 0 < r["p50_ms"] <= r["p95_ms"] and r["throughput"] > 0
    assert "replicas serve" in printed and "req/s" in printed
    assert ray.is_initialized()          # the example leaves a cluster it did not start
