"""kiln.pipeline on a local Ray cluster the tests start themselves (2 CPUs): stages and
replicas give eager's answers, map keeps order, a killed stage actor is restarted and its
inputs retried (none lost, none answered twice), and a pipeline that cannot be placed is a
KilnError."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

import kiln
from kiln.zoo import get_model

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def assert_eager(got, model, x) -> None:
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_two_stages_match_eager_and_map_keeps_order(cluster) -> None:
    model, (x,) = get_model("lenet5")
    with kiln.pipeline(model, (x,), stages=2) as pipe:
        assert len(pipe.chains) == 1 and len(pipe.chains[0]) == 2
        assert_eager(pipe(x), model, x)
        xs = [torch.randn(x.shape, generator=torch.Generator().manual_seed(i)) for i in range(6)]
        outs = list(pipe.map(xs, window=3))
        assert len(outs) == len(xs)
        for out, xi in zip(outs, xs):
            assert_eager(out, model, xi)
        assert "pred. ms" in pipe.partition.table()
    with pytest.raises(kiln.KilnError, match="closed"):
        pipe(x)


def test_profile_balances_measured_kernel_times(cluster) -> None:
    model, (x,) = get_model("lenet5")
    with kiln.pipeline(model, (x,), stages=2, profile=True) as pipe:
        assert_eager(pipe(x), model, x)
        assert "cost: measured seconds per node (llvm kernel profile" in pipe.partition.table()
        assert all(s.predicted_s > 0 for s in pipe.partition.stages)
    seconds = {"conv1": 1.0}           # everything else free: the cut right after conv1
    with kiln.pipeline(model, (x,), stages=2, seconds=seconds) as pipe:
        assert pipe.partition.graphs[0].nodes[-1].name == "conv1"
        assert_eager(pipe(x), model, x)
    with pytest.raises(kiln.KilnError, match="not both"):
        kiln.pipeline(model, (x,), profile=True, seconds=seconds)


def test_replicas_share_the_inputs(cluster) -> None:
    model, (x,) = get_model("mlp")
    with kiln.pipeline(model, (x,), stages=1, replicas=2) as pipe:
        xs = [torch.randn(x.shape, generator=torch.Generator().manual_seed(i)) for i in range(8)]
        for out, xi in zip(pipe.map(xs), xs):
            assert_eager(out, model, xi)
        calls = [ray.get(chain[0].run.remote([xi.numpy() for xi in (x,)])) for chain in
                 pipe.chains]
        assert len(calls) == 2


def test_a_killed_stage_is_restarted_and_no_input_is_lost(cluster) -> None:
    model, (x,) = get_model("lenet5")
    xs = [torch.randn(x.shape, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    with kiln.pipeline(model, (x,), stages=2) as pipe:
        first = pipe.chains[0][0]
        pid = ray.get(first.pid.remote())
        results = pipe.map(xs, window=6)
        outs = [next(results)]
        os.kill(pid, signal.SIGKILL)          # the first stage's process dies mid-stream
        outs += list(results)
        assert len(outs) == len(xs)
        for out, xi in zip(outs, xs):
            assert_eager(out, model, xi)
        assert ray.get(first.pid.remote()) != pid     # Ray restarted the actor


def test_a_pipeline_that_cannot_be_placed_is_refused(cluster) -> None:
    model, (x,) = get_model("mlp")
    with pytest.raises(kiln.KilnError, match=r"needs 4 CPUs .* cluster has 2"):
        kiln.pipeline(model, (x,), stages=2, replicas=2)
    with pytest.raises(kiln.KilnError, match="replicas must be"):
        kiln.pipeline(model, (x,), replicas=0)


def test_wrong_inputs_are_refused_before_reaching_an_actor(cluster) -> None:
    model, (x,) = get_model("mlp")
    with kiln.pipeline(model, (x,), stages=2) as pipe:
        with pytest.raises(kiln.KilnError, match="expects"):
            pipe(torch.randn(3, 7))


def test_stages_export_as_artifacts_and_run_again_from_them(cluster, tmp_path) -> None:
    model, (x,) = get_model("lenet5")
    with kiln.pipeline(model, (x,), stages=2) as pipe:
        paths = pipe.export(tmp_path)
        want = pipe(x)
    assert [p.name for p in paths] == ["stage0.kiln", "stage1.kiln"]
    for p in paths:                      # each stage is an ordinary artifact
        assert kiln.load(p).inputs
    with kiln.pipeline(artifacts=paths) as again:
        np.testing.assert_array_equal(again(x), want)
        assert again.partition is None
    with pytest.raises(kiln.KilnError, match="stage 0 sends"):
        kiln.pipeline(artifacts=paths[::-1])
