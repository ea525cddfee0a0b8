"""MicroBatcher: merged passes give each caller its own rows; limits, deadlines, isolation."""

from __future__ import annotations

import asyncio
import gc
import math
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgerun.runtime import (Cancelled, DeadlineExceeded, InferenceError, InvalidInput,
                             MicroBatcher, Model, ModelNotReady, Overloaded)
from edgerun.runtime.metrics import Registry
from tests.helpers import Recording, centered_onnx, gather_onnx, gram_onnx, identity_onnx


@pytest.fixture
def recording(mlp_model) -> Recording:
    return Recording(mlp_model)


def batcher_for(model: Model, **knobs) -> MicroBatcher:
    return MicroBatcher(model, registry=Registry(), **knobs)


def queued_together(batcher: MicroBatcher, model: Recording, first: np.ndarray,
                    inputs: tuple[np.ndarray, ...]) -> list:
    """`inputs` queued while the worker is held on `first`, so they meet in one queue, as
    callers who arrive together do; the pending answers."""
    model.hold()
    held = batcher.submit({"x": first})
    assert model.entered.wait(5)
    pending = [batcher.submit({"x": x}) for x in inputs]
    model.release()
    held.result()
    return pending


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)


def test_concurrent_results_match_unbatched_predictions(recording):
    data = rows(200)
    expected = recording.predict({"x": data})["y"]
    with batcher_for(recording, max_batch_size=16, max_queue_delay_us=5000) as batcher:
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(lambda i: batcher.predict({"x": data[i:i + 1]}),
                                    range(len(data))))
    for i, result in enumerate(results):
        np.testing.assert_allclose(result["y"], expected[i:i + 1], rtol=1e-5, atol=1e-6)
    assert max(recording.batch_rows()[1:]) > 1, "requests were merged"


def test_each_asyncio_caller_gets_its_own_rows_in_order(recording):
    data = rows(300, seed=3)

    async def main():
        with batcher_for(recording, max_batch_size=32, max_queue_delay_us=2000) as batcher:
            # uneven requests: 1, 2 or 3 rows each, so offsets inside a batch vary
            sizes = [1 + i % 3 for i in range(100)]
            starts = np.cumsum([0] + sizes[:-1])
            outs = await asyncio.gather(*(batcher.predict_async({"x": data[s:s + n]})
                                          for s, n in zip(starts, sizes)))
            return list(zip(starts, sizes, outs))

    for start, n, out in asyncio.run(main()):
        expected = recording.predict({"x": data[start:start + n]})["y"]
        np.testing.assert_allclose(out["y"], expected, rtol=1e-5, atol=1e-6)
    assert max(recording.batch_rows()) > 3


def test_max_batch_size_is_respected(recording):
    with batcher_for(recording, max_batch_size=8, max_queue_delay_us=20_000) as batcher:
        recording.hold()
        first = batcher.submit({"x": rows(1)})
        assert recording.entered.wait(5)
        pending = [batcher.submit({"x": rows(1, seed=i)}) for i in range(40)]
        assert batcher.queue_depth == 40
        recording.release()
        for p in [first, *pending]:
            p.result()
    sizes = recording.batch_rows()
    assert sizes[0] == 1 and sizes[1:] == [8] * 5


def test_requests_larger_than_the_batch_run_alone(recording):
    with batcher_for(recording, max_batch_size=4) as batcher:
        out = batcher.predict({"x": rows(10)})
    assert out["y"].shape == (10, 4)
    assert recording.batch_rows() == [10]


@pytest.mark.timeout(30)
def test_requests_of_zero_rows_are_answered(recording):
    """A batch of nothing but empty requests once spun the worker forever (0 rows to take)."""
    with batcher_for(recording, max_batch_size=8, max_queue_delay_us=1000) as batcher:
        alone = batcher.predict({"x": rows(0)}, timeout=5)
        empty = batcher.submit({"x": rows(0)})
        full = batcher.submit({"x": rows(2)})
        assert empty.result()["y"].shape == (0, 4) and full.result()["y"].shape == (2, 4)
    assert alone["y"].shape == (0, 4)


def test_a_lone_request_waits_at_most_the_queue_delay(recording):
    delay = 0.2
    with batcher_for(recording, max_batch_size=64, max_queue_delay_us=int(delay * 1e6)) as b:
        start = time.monotonic()
        b.predict({"x": rows(1)})
        waited = time.monotonic() - start
    assert delay * 0.9 <= waited < delay + 2.0, waited
    assert recording.batch_rows() == [1]


def test_sparse_requests_stop_waiting_for_company(recording):
    delay = 0.1
    waits = []
    with batcher_for(recording, max_batch_size=64, max_queue_delay_us=int(delay * 1e6)) as b:
        for _ in range(6):
            start = time.monotonic()
            b.predict({"x": rows(1)})
            waits.append(time.monotonic() - start)
            time.sleep(3 * delay)  # arrivals far apart: nobody will join a batch
    assert waits[0] >= delay * 0.9, "with nothing known of the load, the delay applies"
    assert max(waits[-2:]) < delay / 2, waits
    assert recording.batch_rows()[:6] == [1] * 6


def test_a_full_batch_or_a_preferred_size_does_not_wait_for_the_delay(recording):
    with batcher_for(recording, max_batch_size=4, max_queue_delay_us=60_000_000) as batcher:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: batcher.predict({"x": rows(1)}), range(4)))
    assert recording.batch_rows() == [4]
    recording.batches.clear()
    with batcher_for(recording, max_batch_size=16, preferred_batch_sizes=(2,),
                     max_queue_delay_us=60_000_000) as batcher:
        pending = [batcher.submit({"x": rows(1)}) for _ in range(4)]
        for p in pending:
            p.result()
    assert recording.batch_rows() == [2, 2]


def test_preferred_sizes_shape_the_batches(recording):
    with batcher_for(recording, max_batch_size=16, preferred_batch_sizes=(4, 8),
                     max_queue_delay_us=1000) as batcher:
        recording.hold()
        first = batcher.submit({"x": rows(1)})
        assert recording.entered.wait(5)
        pending = [batcher.submit({"x": rows(1)}) for _ in range(13)]
        recording.release()
        for p in [first, *pending]:
            p.result()
    assert recording.batch_rows() == [1, 8, 4, 1]


def test_full_queue_is_refused_at_once_and_the_rest_still_run(recording):
    with batcher_for(recording, max_batch_size=1, max_queue_size=2) as batcher:
        recording.hold()
        running = batcher.submit({"x": rows(1)})
        assert recording.entered.wait(5)
        queued = [batcher.submit({"x": rows(1)}) for _ in range(2)]
        start = time.monotonic()
        with pytest.raises(Overloaded, match="queue full"):
            batcher.submit({"x": rows(1)})
        assert time.monotonic() - start < 1.0
        recording.release()
        for p in [running, *queued]:
            assert p.result()["y"].shape == (1, 4)
        assert batcher.metrics._errors.labels("mlp", "1", "overloaded").value == 1


def test_expired_request_never_runs(recording):
    marker = np.full((1, 8), 7.0, np.float32)
    with batcher_for(recording, max_batch_size=8) as batcher:
        recording.hold()
        running = batcher.submit({"x": rows(1)})
        assert recording.entered.wait(5)
        late = batcher.submit({"x": marker}, timeout=0.05)
        with pytest.raises(DeadlineExceeded, match="past its deadline; it was not run"):
            late.result()
        recording.release()
        running.result()
        batcher.predict({"x": rows(1)})
    assert not any(np.any(np.all(b["x"] == 7.0, axis=1)) for b in recording.batches)


def test_expired_asyncio_request_never_runs(recording):
    marker = np.full((1, 8), 9.0, np.float32)

    async def main():
        with batcher_for(recording, max_batch_size=8) as batcher:
            recording.hold()
            running = asyncio.ensure_future(batcher.predict_async({"x": rows(1)}))
            await asyncio.get_running_loop().run_in_executor(None, recording.entered.wait, 5)
            start = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                await batcher.predict_async({"x": marker}, timeout=0.05)
            assert time.monotonic() - start < 1.0, "the deadline fires while the worker is busy"
            recording.release()
            await running

    asyncio.run(main())
    assert not any(np.any(np.all(b["x"] == 9.0, axis=1)) for b in recording.batches)


def test_cancelled_requests_never_run(recording):
    marker = np.full((1, 8), 5.0, np.float32)

    async def main(batcher):
        task = asyncio.ensure_future(batcher.predict_async({"x": marker}))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with batcher_for(recording, max_batch_size=8) as batcher:
        recording.hold()
        running = batcher.submit({"x": rows(1)})
        assert recording.entered.wait(5)
        withdrawn = batcher.submit({"x": marker})
        assert withdrawn.cancel()
        with pytest.raises(Cancelled):
            withdrawn.result()
        asyncio.run(main(batcher))
        assert batcher.queue_depth == 0
        recording.release()
        running.result()
        assert not running.cancel(), "a request that ran cannot be withdrawn"
    assert not any(np.any(np.all(b["x"] == 5.0, axis=1)) for b in recording.batches)


def test_a_cancelled_asyncio_request_lets_go_of_its_arrays(recording):
    # its deadline timer stayed scheduled after the cancel and held the request, arrays and
    # all, for the whole timeout: clients that disconnect under load piled up their inputs
    async def main(batcher):
        marker = np.full((1, 8), 5.0, np.float32)
        alive = weakref.ref(marker)
        task = asyncio.ensure_future(batcher.predict_async({"x": marker}, timeout=60))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        del task, marker
        recording.release()
        await asyncio.get_running_loop().run_in_executor(None, running.result)
        await asyncio.sleep(0.05)  # the worker drops the withdrawn request from its queue
        gc.collect()
        assert alive() is None, "a withdrawn request is held until its timeout fires"

    with batcher_for(recording, max_batch_size=8) as batcher:
        recording.hold()
        running = batcher.submit({"x": rows(1)})
        assert recording.entered.wait(5)
        asyncio.run(main(batcher))


def test_withdrawn_requests_behind_a_waiting_batch_let_go_of_their_arrays(recording):
    # a withdrawn request stayed in its queue, inputs and all, until the batch in front of it
    # ran (up to max_queue_delay_us); the queue no longer counted it, so callers that gave up
    # and retried held memory far past max_queue_size
    with batcher_for(recording, max_batch_size=64, max_queue_delay_us=60_000_000,
                     max_queue_size=2) as batcher:
        waiting = batcher.submit({"x": rows(1)})
        alive = []
        for _ in range(20):
            marker = rows(1)
            alive.append(weakref.ref(marker))
            assert batcher.submit({"x": marker}).cancel()
            del marker
        gc.collect()
        assert batcher.queue_depth == 1
        assert not any(ref() is not None for ref in alive), "withdrawn inputs are held"
        batcher.flush()
        assert waiting.result()["y"].shape == (1, 4)
    assert recording.batch_rows() == [1]


def test_an_idle_worker_holds_nothing_of_the_last_batch(mlp_model):
    # the worker's loop kept its last batch while it waited for the next: a big request's
    # inputs and outputs stayed in memory for as long as no other request came
    with batcher_for(mlp_model, max_batch_size=8) as batcher:
        marker = rows(4)
        inputs = weakref.ref(marker)
        outputs = weakref.ref(batcher.predict({"x": marker})["y"])
        del marker
        deadline = time.monotonic() + 5
        while (inputs() is not None or outputs() is not None) and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.01)
        assert inputs() is None and outputs() is None, "the idle worker holds the last batch"


@pytest.mark.parametrize("timeout", [math.inf, 1e13])
def test_a_timeout_longer_than_a_thread_can_wait_is_no_deadline(recording, timeout):
    # Event.wait raised OverflowError after the request was queued: the caller got an
    # untyped error (a 500 over MQTT or Lambda) and the request ran for nobody
    with batcher_for(recording, max_batch_size=8) as batcher:
        assert batcher.predict({"x": rows(1)}, timeout=timeout)["y"].shape == (1, 4)
        assert batcher.queue_depth == 0
    assert recording.batch_rows() == [1]


def test_mixed_shapes_are_never_concatenated(make_bundle):
    model = Recording(Model.load(make_bundle(identity_onnx("float32", ["b", "n"]))))
    with batcher_for(model, max_batch_size=16, max_queue_delay_us=1000) as batcher:
        model.hold()
        first = batcher.submit({"x": np.zeros((1, 2), np.float32)})
        assert model.entered.wait(5)
        inputs = [np.full((1, 2 + i % 2), i, np.float32) for i in range(8)]
        pending = [batcher.submit({"x": x}) for x in inputs]
        model.release()
        first.result()
        for x, p in zip(inputs, pending):
            np.testing.assert_array_equal(p.result()["y"], x)
    shapes = [b["x"].shape for b in model.batches]
    assert shapes == [(1, 2), (4, 2), (4, 3)]


def test_a_dim_0_the_model_also_names_past_axis_0_is_never_batched(make_bundle):
    # x ["n", 2] -> x @ x.T ["n", "n"]: two requests of 2 rows were run as one of 4, and each
    # got 2 rows of 4 columns, two of them computed from the other caller's input
    bundle = make_bundle(gram_onnx())
    assert not bundle.signature.batchable
    model = Recording(Model.load(bundle))
    mine, theirs = np.eye(2, dtype=np.float32), np.full((2, 2), 3, np.float32)
    with batcher_for(model, max_batch_size=16, max_queue_delay_us=1000) as batcher:
        pending = queued_together(batcher, model, mine, (mine, theirs))
        for x, answer in zip((mine, theirs), pending):
            np.testing.assert_array_equal(answer.result()["gram"], x @ x.T)
    assert [b["x"].shape for b in model.batches] == [(2, 2)] * 3


@pytest.mark.parametrize("declared", ["batcher", "bundle"])
def test_max_batch_size_0_declares_no_batch_axis_so_sequences_are_never_stacked(make_bundle,
                                                                               declared):
    # x ["seq"] -> x - mean(x): dim 0 looks like a batch, so two callers' sequences were
    # stacked into one and each got its tokens centred on the other's mean too
    bundle = make_bundle(centered_onnx(), max_batch_size=0 if declared == "bundle" else None)
    assert bundle.signature.batchable is (declared == "batcher")
    model = Recording(Model.load(bundle))
    knobs = {"max_batch_size": 0} if declared == "batcher" else {}
    mine, theirs = np.array([1, 2, 3], np.float32), np.array([10, 30], np.float32)
    with batcher_for(model, max_queue_delay_us=1000, **knobs) as batcher:
        assert not batcher.signature.batchable
        pending = queued_together(batcher, model, mine, (mine, theirs))
        for x, answer in zip((mine, theirs), pending):
            np.testing.assert_allclose(answer.result()["centered"], x - x.mean())
    assert [b["x"].shape for b in model.batches] == [(3,), (3,), (2,)]


def test_a_full_batch_of_one_shape_does_not_wait_behind_a_partial_one_of_another(make_bundle):
    # the worker once looked at the oldest request only: a full batch of 4 waited out the
    # partial batch's 60 s delay
    model = Recording(Model.load(make_bundle(identity_onnx("float32", ["b", "n"]))))
    with batcher_for(model, max_batch_size=4, max_queue_delay_us=60_000_000) as batcher, \
            ThreadPoolExecutor(5) as pool:
        partial = pool.submit(batcher.predict, {"x": np.zeros((1, 3), np.float32)})
        time.sleep(0.05)
        full = [pool.submit(batcher.predict, {"x": np.full((1, 2), i, np.float32)})
                for i in range(4)]
        for i, answer in enumerate(full):
            np.testing.assert_array_equal(answer.result(timeout=10)["y"], [[i, i]])
        assert [b["x"].shape for b in model.batches] == [(4, 2)]
        assert not partial.done()
        batcher.close()  # the partial one is answered at the drain
        assert partial.result(timeout=10)["y"].shape == (1, 3)


def test_a_failing_request_does_not_fail_its_neighbours(make_bundle):
    model = Recording(Model.load(make_bundle(gather_onnx(), name="lookup")))
    with batcher_for(model, max_batch_size=8, max_queue_delay_us=1000) as batcher:
        model.hold()
        first = batcher.submit({"idx": [0]})
        assert model.entered.wait(5)
        good1 = batcher.submit({"idx": [1]})
        bad = batcher.submit({"idx": [99]})
        good2 = batcher.submit({"idx": [2, 3]})
        model.release()
        first.result()
        np.testing.assert_array_equal(good1.result()["rows"], [[3, 4, 5]])
        np.testing.assert_array_equal(good2.result()["rows"], [[6, 7, 8], [9, 10, 11]])
        with pytest.raises(InferenceError, match="model 'lookup'"):
            bad.result()
        assert batcher.predict({"idx": [4]})["rows"].tolist() == [[12, 13, 14]]
    assert [b["idx"].tolist() for b in model.batches[:2]] == [[0], [1, 99, 2, 3]]


def test_invalid_requests_fail_at_submit_and_never_enter_a_batch(recording):
    with batcher_for(recording) as batcher:
        with pytest.raises(InvalidInput, match="input 'x': dim 1 must be 8"):
            batcher.submit({"x": np.zeros((1, 3), np.float32)})
        assert batcher.queue_depth == 0
    assert recording.batches == []


def test_close_drains_queued_requests(recording):
    batcher = batcher_for(recording, max_batch_size=2, max_queue_delay_us=10_000_000)
    pending = [batcher.submit({"x": rows(1)}) for _ in range(5)]
    batcher.close(drain=True)
    assert all(p.result()["y"].shape == (1, 4) for p in pending)
    with pytest.raises(ModelNotReady, match="shutting down"):
        batcher.submit({"x": rows(1)})


def test_flush_runs_the_queue_now_and_later_requests_at_once(recording):
    """A stopping server's batchers wait out no batching delay: what is queued runs as one
    batch at once, and requests still come in (one a transport took just before the stop)
    and run at once too. The 30 s deadlines fail the test, not the 60 s delay."""
    batcher = batcher_for(recording, max_batch_size=64, max_queue_delay_us=60_000_000)
    data = rows(5, seed=7)
    try:
        queued = [batcher.submit({"x": data[i:i + 1]}, timeout=30) for i in range(3)]
        batcher.flush()
        answers = [p.result()["y"] for p in queued]
        later = batcher.submit({"x": data[3:5]}, timeout=30).result()["y"]
        assert recording.batch_rows() == [3, 2]
    finally:
        batcher.close()
    expected = recording.predict({"x": data})["y"]
    np.testing.assert_allclose(np.concatenate([*answers, later]), expected, rtol=1e-5,
                               atol=1e-6)


def test_close_without_drain_fails_what_is_queued(recording):
    batcher = batcher_for(recording, max_batch_size=1)
    recording.hold()
    running = batcher.submit({"x": rows(1)})
    assert recording.entered.wait(5)
    queued = batcher.submit({"x": rows(1)})
    closer = threading.Thread(target=batcher.close, kwargs={"drain": False})
    closer.start()
    with pytest.raises(ModelNotReady, match="unloaded before the request ran"):
        queued.result()
    recording.release()
    closer.join(5)
    assert running.result()["y"].shape == (1, 4)


def test_metrics_record_batches_and_queue_wait(recording):
    with batcher_for(recording, max_batch_size=4, max_queue_delay_us=1000) as batcher:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: batcher.predict({"x": rows(1)}), range(16)))
        metrics = batcher.metrics
        assert metrics.batch_size.sum == 16
        assert metrics.batch_size.count == len(recording.batches)
        assert metrics.queue_wait.count == 16
        assert metrics.inference.count == len(recording.batches)
        assert metrics.queue_depth.value == 0


def test_several_model_instances_share_one_queue(mlp_bundle):
    instances = [Recording(Model.load(mlp_bundle, intra_op_threads=1)) for _ in range(2)]
    with batcher_for(instances, max_batch_size=4, max_queue_delay_us=500) as batcher:
        with ThreadPoolExecutor(16) as pool:
            outs = list(pool.map(lambda i: batcher.predict({"x": rows(1, seed=i)}), range(200)))
    assert len(outs) == 200
    assert all(instance.batches for instance in instances), "both instances ran batches"


def test_a_model_that_cannot_batch_runs_queued_requests_on_every_idle_instance(make_bundle):
    # a fixed-shape model's requests each make a batch of their own; the second instance was
    # woken only at max_batch_size queued rows, so a request waited behind a busy instance
    # while the other slept (and under load, it slept as long as the queue never emptied)
    bundle = make_bundle(identity_onnx("float32", [1, 8]), name="fixed")
    instances = [Recording(Model.load(bundle, intra_op_threads=1)) for _ in range(2)]
    with batcher_for(instances, max_batch_size=8, max_queue_delay_us=500) as batcher:
        assert not batcher.signature.batchable
        for instance in instances:
            instance.hold()
        pending = [batcher.submit({"x": np.full((1, 8), i, np.float32)}) for i in range(2)]
        entered = [instance.entered.wait(10) for instance in instances]
        for instance in instances:
            instance.release()
        for i, request in enumerate(pending):
            np.testing.assert_array_equal(request.result()["y"], np.full((1, 8), i))
    assert entered == [True, True], "both instances took a request"


def test_a_due_batch_of_another_shape_runs_on_an_idle_instance(make_bundle):
    # enqueues wake a worker only on an empty queue or a full batch: the due batch of a
    # second shape waited behind the first's forward pass while the other instance slept
    bundle = make_bundle(identity_onnx("float32", ["b", "n"]))
    instances = [Recording(Model.load(bundle, intra_op_threads=1)) for _ in range(2)]
    with batcher_for(instances, max_batch_size=8, max_queue_delay_us=0) as batcher:
        for instance in instances:
            instance.hold()
        pending = [batcher.submit({"x": np.ones((1, n), np.float32)}) for n in (2, 3)]
        entered = [instance.entered.wait(10) for instance in instances]
        for instance in instances:
            instance.release()
        assert [p.result()["y"].shape for p in pending] == [(1, 2), (1, 3)]
    assert entered == [True, True], "both instances took a batch"


# ------------------------------------------------------------- property: merge and split
_DTYPES = ["bool", "uint8", "int32", "int64", "float16", "float32", "float64", "string"]
_models: dict[str, Model] = {}


def _identity_model(dtype: str, tmp_path_factory) -> Model:
    if dtype not in _models:
        from edgerun.runtime import create_bundle

        folder = tmp_path_factory.mktemp(f"identity-{dtype}")
        source = folder / "m.onnx"
        source.write_bytes(identity_onnx(dtype, ["b", "n"]))
        _models[dtype] = Model.load(create_bundle(source, folder / "bundle", name="id",
                                                  version="1"), intra_op_threads=1)
    return _models[dtype]


def _arrays(dtype: str):
    if dtype == "string":
        elements = st.text(max_size=5)
        np_dtype = object
    else:
        np_dtype = np.dtype(dtype)
        elements = None
    shape = st.tuples(st.integers(1, 4), st.integers(0, 3))
    return hnp.arrays(np_dtype, shape, elements=elements)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data(), dtype=st.sampled_from(_DTYPES),
       max_batch=st.integers(1, 6), preferred=st.lists(st.integers(1, 6), max_size=2))
def test_property_merge_then_split_returns_each_request_exactly(
        tmp_path_factory, data, dtype, max_batch, preferred):
    inputs = data.draw(st.lists(_arrays(dtype), min_size=1, max_size=12))
    model = Recording(_identity_model(dtype, tmp_path_factory))
    preferred = tuple(p for p in preferred if p <= max_batch)
    with batcher_for(model, max_batch_size=max_batch, preferred_batch_sizes=preferred,
                     max_queue_delay_us=2000) as batcher:
        model.hold()
        pending = [batcher.submit({"x": x}) for x in inputs]
        model.release()
        outputs = [p.result()["y"] for p in pending]
    for x, y in zip(inputs, outputs):
        assert y.shape == x.shape
        if dtype == "string":
            assert y.tolist() == x.tolist()
        else:
            assert y.dtype == x.dtype
            np.testing.assert_array_equal(y, x)
    for batch in model.batches:
        x = batch["x"]
        lone = any(len(i) == x.shape[0] and i.shape == x.shape for i in inputs)
        assert x.shape[0] <= max_batch or lone, "only a single oversize request may exceed"
