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
from kiln.distributed.pipeline import INLINE_BYTES, MAX_BATCH, _chunks, _per_chunk
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


def test_stage_actors_take_their_stage_with_each_call_not_in_the_constructor(cluster,
                                                                             capfd) -> None:
    """Restartable actors with object-store constructor arguments make Ray log an error-level
    notice (ray-project/ray#53727): the stages travel with the calls instead."""
    model, (x,) = get_model("mlp")
    with kiln.pipeline(model, (x,), stages=2) as pipe:
        assert_eager(pipe(x), model, x)
    err = capfd.readouterr().err
    assert "has constructor arguments in the object store" not in err


def test_replicas_share_the_inputs(cluster) -> None:
    model, (x,) = get_model("mlp")
    with kiln.pipeline(model, (x,), stages=1, replicas=2) as pipe:
        xs = [torch.randn(x.shape, generator=torch.Generator().manual_seed(i)) for i in range(8)]
        for out, xi in zip(pipe.map(xs), xs):
            assert_eager(out, model, xi)
        calls = [ray.get(chain[0].run.remote(pipe._stage(0), [xi.numpy() for xi in (x,)]))
                 for chain in pipe.chains]
        assert len(calls) == 2


def test_batches_give_the_single_input_answers_bit_for_bit(cluster) -> None:
    model, (x,) = get_model("lenet5")
    xs = [torch.randn(x.shape, generator=torch.Generator().manual_seed(i)) for i in range(7)]
    with kiln.pipeline(model, (x,), stages=2) as pipe:
        want = [pipe(xi) for xi in xs]
        assert len(pipe.stage_s) == 2 and all(t > 0 for t in pipe.stage_s)
        assert pipe.hop_s >= 0
        for batch in (1, 3, 16):
            got = list(pipe.map(iter(xs), batch=batch))     # an iterator: no len()
            assert len(got) == len(xs)
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w)
        # Every input's activations in one object-store object per batch, not inline chunks.
        pipe._per_in, pipe._per_out = 0, [0, 0]
        for g, w in zip(pipe.map(xs, batch=4), want):
            np.testing.assert_array_equal(g, w)
        with pytest.raises(kiln.KilnError, match="batch must be"):
            list(pipe.map(xs, batch=0))


def test_batch_size_weighs_hops_against_filling_the_pipeline(cluster) -> None:
    model, (x,) = get_model("lenet5")
    with kiln.pipeline(model, (x,), stages=2) as pipe:
        pipe.stage_s, pipe.hop_s = [5e-3, 4e-3], 2.5e-3
        assert pipe.batch_size(64) == 6                 # sqrt(64 x 2.5 / 5) = 5.7
        assert pipe.batch_size(4) == 1                  # two batches for every stage
        pipe.hop_s = 0.0
        assert pipe.batch_size(64) == 1                 # free hops: no batching
        pipe.stage_s, pipe.hop_s = [1e-6, 1e-6], 1.0
        assert pipe.batch_size(10_000) == MAX_BATCH


def test_chunks_stay_under_the_inline_limit() -> None:
    per = _per_chunk(10_000)
    assert per >= 1 and per * 10_000 < INLINE_BYTES
    assert _per_chunk(INLINE_BYTES) == 0
    assert _chunks(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert _chunks(list(range(7)), 0) == [list(range(7))]


@pytest.mark.parametrize("batch", [1, 2])
def test_a_killed_stage_is_restarted_and_no_input_is_lost(cluster, batch) -> None:
    model, (x,) = get_model("lenet5")
    xs = [torch.randn(x.shape, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    with kiln.pipeline(model, (x,), stages=2) as pipe:
        first = pipe.chains[0][0]
        pid = ray.get(first.pid.remote())
        results = pipe.map(xs, window=6, batch=batch)
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
