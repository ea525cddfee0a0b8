"""Micro-batching: concurrent requests in, one forward pass out, each caller its own rows back.

Requests are validated before they are queued, so a bad one never enters a batch. They wait in
one FIFO per shape key (the non-batch dims of every input), so requests that cannot be stacked
are never concatenated. Worker threads (one per model instance) form a batch when it is full,
when a preferred size is reached, or when the oldest request has waited `max_queue_delay_us`;
the forward pass runs on the worker, off any event loop. If a batch fails, its requests are run
one by one so only the culprit gets the error.

The delay is an upper bound: while requests arrive further apart than the delay (a moving
average of the gaps), a partial batch runs at once, since waiting would add latency and gain no
company. Under load the gaps are microseconds and batches fill as usual.

A stopping server calls `flush`: from then on nothing waits for company, so the requests it
holds are answered before it exits, not after a long delay (or cut off at its grace period).

The worker is woken only when the queue goes from empty to non-empty or a batch fills, and
asyncio callers are answered with one `call_soon_threadsafe` per loop per batch: under load
the cost per request stays a few microseconds.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgerun.runtime.errors import (Cancelled, DeadlineExceeded, EdgerunError, InferenceError,
                                    ModelNotReady, Overloaded)
from edgerun.runtime.metrics import REGISTRY, ModelMetrics, Registry
from edgerun.runtime.model import Model

log = logging.getLogger(__name__)

_PENDING, _TAKEN, _DROPPED = 0, 1, 2
Outputs = dict[str, np.ndarray]
Callback = Callable[["Outputs | None", "BaseException | None"], None]


#: The longest `max_queue_delay_us` (a minute): a batch held longer serves nobody, and past
#: about 9e15 us the batcher's timed wait overflows the platform's time_t and kills its thread.
MAX_QUEUE_DELAY_US = 60_000_000


@dataclass(frozen=True)
class BatchingConfig:
    """The knobs, named as in Triton's dynamic batcher; as there, `max_batch_size = 0` says
    the model has no batch axis, so requests are never stacked."""

    max_batch_size: int = 64
    max_queue_delay_us: int = 500
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024

    def __post_init__(self) -> None:
        object.__setattr__(self, "preferred_batch_sizes",
                           tuple(sorted(set(self.preferred_batch_sizes))))
        if self.max_batch_size < 0:
            raise ValueError("max_batch_size must be >= 1, or 0 for a model with no batch axis")
        if not 0 <= self.max_queue_delay_us <= MAX_QUEUE_DELAY_US:
            raise ValueError(f"max_queue_delay_us must lie in [0, {MAX_QUEUE_DELAY_US}] (a "
                             f"minute), got {self.max_queue_delay_us}")
        if self.max_queue_size < 1:
            raise ValueError("max_queue_size must be >= 1")
        if self.max_batch_size == 0 and self.preferred_batch_sizes:
            raise ValueError("preferred_batch_sizes are for a model that batches: "
                             "max_batch_size 0 says it has no batch axis")
        if any(not 1 <= size <= self.max_batch_size for size in self.preferred_batch_sizes):
            raise ValueError("preferred_batch_sizes must lie in [1, max_batch_size]")


class _Request:
    __slots__ = ("arrays", "rows", "key", "deadline", "enqueued", "state", "loop", "future",
                 "timer", "event", "callback", "value", "error")

    def __init__(self, arrays: dict[str, np.ndarray], rows: int, key: tuple,
                 deadline: float | None, loop: asyncio.AbstractEventLoop | None,
                 future: asyncio.Future[Outputs] | None,
                 event: threading.Event | None) -> None:
        self.arrays = arrays
        self.rows = rows
        self.key = key
        self.deadline = deadline
        self.enqueued = 0.0
        self.state = _PENDING
        self.loop = loop  # asyncio callers: settled on their loop
        self.future = future
        self.timer: asyncio.TimerHandle | None = None
        self.event = event  # thread callers: woken by the event
        self.callback: Callback | None = None  # fire-and-forget callers: run on the worker
        self.value: Outputs | None = None
        self.error: BaseException | None = None


class Pending:
    """A request a thread submitted: wait for it with `result()`, or `cancel()` it."""

    def __init__(self, batcher: MicroBatcher, request: _Request) -> None:
        self._batcher = batcher
        self._request = request

    def cancel(self) -> bool:
        """Withdraw the request if it has not started; True if it will never run."""
        return self._batcher._drop(self._request, Cancelled("request cancelled by the caller"))

    def result(self) -> Outputs:
        """Wait for the outputs; raises DeadlineExceeded if the deadline passed in the queue."""
        request = self._request
        assert request.event is not None
        if request.deadline is None:
            request.event.wait()
        # Event.wait overflows past TIMEOUT_MAX (about 292 years): a longer timeout would raise
        # after the request was queued, and it would run for nobody
        elif not request.event.wait(min(max(0.0, request.deadline - time.monotonic()),
                                        threading.TIMEOUT_MAX)):
            self._batcher._drop(request, self._batcher._deadline_error(request))
            request.event.wait()  # dropped now, or already running and about to answer
        if request.error is not None:
            raise request.error
        assert request.value is not None
        return request.value


class MicroBatcher:
    """Merges concurrent requests for one model into forward passes; threads and asyncio."""

    def __init__(self, models: Model | Sequence[Model], config: BatchingConfig | None = None,
                 *, registry: Registry = REGISTRY, **knobs: Any) -> None:
        instances = [models] if isinstance(models, Model) else list(models)
        if not instances:
            raise ValueError("MicroBatcher needs at least one model instance")
        self.config = config or BatchingConfig(**knobs)
        if self.config.max_batch_size == 0:
            for model in instances:
                model.unbatch()
        first = instances[0]
        self.name, self.version = first.name, first.version
        self.signature = first.signature
        self._names = tuple(spec.name for spec in self.signature.inputs)
        self._batchable = self.signature.batchable
        cap = self.config.max_batch_size
        if self.signature.max_batch_size:
            cap = min(cap, self.signature.max_batch_size)
        self._cap = cap
        preferred = tuple(p for p in self.config.preferred_batch_sizes if p <= cap)
        self._preferred = preferred
        self._wake_rows = preferred[0] if preferred else cap
        self._delay = self.config.max_queue_delay_us / 1e6
        self._validate = first.validate

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queues: dict[tuple, deque[_Request]] = {}
        self._rows: dict[tuple, int] = {}
        self._count = 0
        self._waiting = 0
        self._closing = False
        self._flushing = False  # set by `flush`: no batch waits for company any more
        self._gap = 0.0  # moving average of the time between arrivals; 0 until known
        self._rows_per_s = 0.0  # moving average of one worker's forward-pass throughput
        self._last_arrival: float | None = None

        self.metrics = ModelMetrics(self.name, self.version, registry)
        # counted until closed: a reload's new copy adds its own count to the series
        self._uncount = self.metrics.queue_depth.add_function(lambda: self._count)
        self._workers = [
            threading.Thread(target=self._work, args=(model.run,), daemon=True,
                             name=f"edgerun-batcher-{self.name}-{self.version}-{i}")
            for i, model in enumerate(instances)]
        for worker in self._workers:
            worker.start()

    # ----------------------------------------------------------------- callers
    @property
    def max_batch_size(self) -> int:
        """The most rows one forward pass takes: the config's, within the model's own limit
        (what metadata advertises; the config's alone promised more than the model takes)."""
        return self._cap

    @property
    def queue_depth(self) -> int:
        """Requests waiting (not yet in a forward pass)."""
        return self._count

    def submit(self, inputs: Mapping[str, Any], *, timeout: float | None = None) -> Pending:
        """Queue a request from a thread; `timeout` bounds its time in the queue."""
        request = self._request(inputs, timeout, None, None, threading.Event())
        self._enqueue(request)
        return Pending(self, request)

    def predict(self, inputs: Mapping[str, Any], *, timeout: float | None = None) -> Outputs:
        """Blocking call from any thread."""
        return self.submit(inputs, timeout=timeout).result()

    def submit_callback(self, inputs: Mapping[str, Any], callback: Callback, *,
                        timeout: float | None = None) -> None:
        """Queue a request whose answer goes to `callback(outputs, error)` on the worker thread.

        For callers that must not wait and have no event loop (shadow copies, say); the
        callback runs on the batcher's worker, so it must be quick and must not raise.
        Validation errors and a full queue raise here, before anything is queued.
        """
        request = self._request(inputs, timeout, None, None, None)
        request.callback = callback
        self._enqueue(request)

    async def predict_async(self, inputs: Mapping[str, Any], *,
                            timeout: float | None = None) -> Outputs:
        """Awaitable call; cancelling the awaiting task withdraws a request not yet running."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        request = self._request(inputs, timeout, loop, future, None)
        self._enqueue(request)
        if timeout is not None:
            request.timer = loop.call_later(timeout, self._expire, request)
        try:
            return await future
        except asyncio.CancelledError:
            self._drop(request, None)
            if request.timer is not None:  # it would hold the request's arrays until it fired
                request.timer.cancel()
            raise

    def _request(self, inputs: Mapping[str, Any], timeout: float | None,
                 loop: asyncio.AbstractEventLoop | None, future: asyncio.Future[Outputs] | None,
                 event: threading.Event | None) -> _Request:
        arrays = self._validate(inputs)
        names = self._names
        if not self._batchable:
            key, rows = (), 1
        elif len(names) == 1:
            array = arrays[names[0]]
            key, rows = (array.shape[1:],), array.shape[0]
        else:
            key = tuple([arrays[name].shape[1:] for name in names])
            rows = arrays[names[0]].shape[0]
        deadline = None if timeout is None else time.monotonic() + timeout
        return _Request(arrays, rows, key, deadline, loop, future, event)

    def _enqueue(self, request: _Request) -> None:
        with self._lock:
            if self._closing:
                raise ModelNotReady(f"model {self.name!r} version {self.version} is shutting "
                                    "down")
            if self._count >= self.config.max_queue_size:
                self.metrics.error(Overloaded.kind)
                wait = self._drain_estimate()
                raise Overloaded(f"model {self.name!r} version {self.version}: queue full "
                                 f"({self._count} requests waiting); retry in about "
                                 f"{wait:.2g} s", retry_after_s=wait)
            request.enqueued = now = time.monotonic()
            if self._last_arrival is not None:
                # a gap counts at most 4 delays, so an idle spell is forgotten in a few arrivals
                self._gap += 0.25 * (min(now - self._last_arrival, 4 * self._delay) - self._gap)
            self._last_arrival = now
            queue = self._queues.get(request.key)
            if queue is None:
                queue = self._queues[request.key] = deque()
                self._rows[request.key] = 0
            queue.append(request)
            self._count += 1
            rows = self._rows[request.key] = self._rows[request.key] + request.rows
            if self._waiting and (self._count == 1 or rows >= self._wake_rows):
                self._cond.notify()

    def _drain_estimate(self) -> float:
        """Seconds until the queue has room: its oldest batch's remaining delay, then the
        queued rows at the rows per second batches have run at (under the lock)."""
        oldest = min((queue[0].enqueued for queue in self._queues.values() if queue),
                     default=None)
        wait = 0.0 if oldest is None else max(0.0, oldest + self._delay - time.monotonic())
        rate = self._rows_per_s * len(self._workers)
        return wait + (sum(self._rows.values()) / rate if rate > 0 else 0.0)

    def _expire(self, request: _Request) -> None:
        self._drop(request, self._deadline_error(request))

    def _deadline_error(self, request: _Request) -> DeadlineExceeded:
        waited = time.monotonic() - request.enqueued
        return DeadlineExceeded(f"request for model {self.name!r} waited {waited * 1000:.1f} ms "
                                "in the queue, past its deadline; it was not run")

    def _drop(self, request: _Request, error: EdgerunError | None) -> bool:
        """Withdraw a queued request (deadline or cancel); False if it already started."""
        with self._lock:
            if request.state != _PENDING:
                return False
            self._discard(request)
        if error is not None:
            self.metrics.error(error.kind)
            self._answer([(request, None, error)])
        return True

    def _discard(self, request: _Request) -> None:
        # Under the lock: the request stays in its deque as a tombstone, skipped later; its
        # inputs go now (a tombstone behind a waiting batch held them, uncounted by
        # max_queue_size, so callers that gave up piled up memory past the queue's bound)
        request.state = _DROPPED
        request.arrays = {}
        self._count -= 1
        self._rows[request.key] -= request.rows

    # ----------------------------------------------------------------- workers
    def _work(self, run: Callable[[dict[str, np.ndarray]], Outputs]) -> None:
        while True:
            batch, expired = self._next_batch()
            if expired:
                self._answer([(r, None, self._deadline_error(r)) for r in expired])
                for _ in expired:
                    self.metrics.error(DeadlineExceeded.kind)
            if batch is None:
                return
            if batch:
                self._run(run, batch)
            del batch, expired  # kept while waiting, they held the last batch's arrays

    def _next_batch(self) -> tuple[list[_Request] | None, list[_Request]]:
        expired: list[_Request] = []
        with self._cond:
            while True:
                now = time.monotonic()
                heads = self._heads(now, expired)
                if not heads:
                    if self._closing:
                        return None, expired
                    if expired:
                        return [], expired
                    self._wait(None)
                    continue
                # the oldest batch that is due or full; a full batch of one shape never waits
                # for the delay of an older, partial batch of another
                for head in heads:
                    target = self._target_rows(head, now)
                    if target:
                        batch = self._collect(head.key, target, now, expired)
                        if self._count and self._waiting:
                            # what is left may be due too: an idle worker looks (it slept
                            # while this one ran, as enqueues wake it only on an empty queue
                            # or a full batch)
                            self._cond.notify()
                        return batch, expired
                if expired:
                    return [], expired
                self._wait(heads[0].enqueued + self._delay - now)

    def _wait(self, timeout: float | None) -> None:
        self._waiting += 1
        try:
            self._cond.wait(timeout)
        finally:
            self._waiting -= 1

    def _heads(self, now: float, expired: list[_Request]) -> list[_Request]:
        """The oldest live request of each shape, oldest first; drops tombstones and expired
        heads on the way."""
        heads = []
        for key in list(self._queues):
            queue = self._queues[key]
            while queue:
                head = queue[0]
                if head.state != _PENDING:
                    queue.popleft()
                elif head.deadline is not None and head.deadline <= now:
                    queue.popleft()
                    self._discard(head)
                    expired.append(head)
                else:
                    break
            if queue:
                heads.append(queue[0])
            else:
                del self._queues[key], self._rows[key]
        if len(heads) > 1:
            heads.sort(key=lambda request: request.enqueued)
        return heads

    def _target_rows(self, head: _Request, now: float) -> int:
        """How many rows to take now, or 0 to keep waiting for the batch to fill."""
        if not self._batchable:
            return 1
        rows = self._rows[head.key]
        if rows >= self._cap:
            return self._cap
        for size in reversed(self._preferred):
            if size <= rows:
                return size
        if (self._flushing or self._closing or now >= head.enqueued + self._delay
                or self._gap > self._delay):
            return max(rows, 1)  # requests of zero rows are due too: they must not wait forever
        return 0

    def _collect(self, key: tuple, target: int, now: float,
                 expired: list[_Request]) -> list[_Request]:
        queue = self._queues[key]
        batch: list[_Request] = []
        total = 0
        while queue:
            request = queue[0]
            if request.state != _PENDING:
                queue.popleft()
                continue
            if request.deadline is not None and request.deadline <= now:
                queue.popleft()
                self._discard(request)
                expired.append(request)
                continue
            if batch and total + request.rows > target:
                break
            queue.popleft()
            request.state = _TAKEN
            self._count -= 1
            self._rows[key] -= request.rows
            batch.append(request)
            total += request.rows
            if total >= target or not self._batchable:
                break
        if not queue:
            del self._queues[key], self._rows[key]
        return batch

    def _run(self, run: Callable[[dict[str, np.ndarray]], Outputs],
             batch: list[_Request]) -> None:
        start = time.monotonic()
        metrics = self.metrics
        metrics.queue_wait.observe_many([start - r.enqueued for r in batch])
        rows = sum(r.rows for r in batch)
        metrics.batch_size.observe(rows)
        try:
            if len(batch) == 1:
                arrays = batch[0].arrays
            else:
                arrays = {name: np.concatenate([r.arrays[name] for r in batch])
                          for name in self._names}
            answers = self._split(batch, run(arrays))
        except Exception as exc:
            answers = self._one_by_one(run, batch) if len(batch) > 1 \
                else [(batch[0], None, _as_error(exc))]
        elapsed = time.monotonic() - start
        metrics.inference.observe(elapsed)
        if elapsed > 0:
            self._rows_per_s += 0.2 * (rows / elapsed - self._rows_per_s)
        for _, _, error in answers:
            if error is not None:
                metrics.error(getattr(error, "kind", "internal"))
        self._answer(answers)

    def _split(self, batch: list[_Request], outputs: Outputs) -> list[tuple]:
        if len(batch) == 1:
            return [(batch[0], outputs, None)]
        total = sum(r.rows for r in batch)
        for name, array in outputs.items():
            if array.ndim == 0 or array.shape[0] != total:
                raise InferenceError(f"output {name!r} has {array.shape[:1]} rows for a batch "
                                     f"of {total}; the model does not batch on axis 0")
        answers = []
        offset = 0
        for request in batch:
            end = offset + request.rows
            answers.append((request, {n: a[offset:end] for n, a in outputs.items()}, None))
            offset = end
        return answers

    def _one_by_one(self, run: Callable[[dict[str, np.ndarray]], Outputs],
                    batch: list[_Request]) -> list[tuple]:
        answers = []
        for request in batch:
            try:
                answers.append((request, run(request.arrays), None))
            except Exception as exc:
                answers.append((request, None, _as_error(exc)))
        return answers

    def _answer(self, answers: Sequence[tuple[_Request, Outputs | None,
                                              BaseException | None]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple]] = {}
        last_loop, group = None, None
        for answer in answers:
            request = answer[0]
            loop = request.loop
            if loop is None:
                if request.callback is not None:
                    try:
                        request.callback(answer[1], answer[2])
                    except Exception:  # a callback's bug must not stop the worker
                        log.exception("batcher callback failed")
                    continue
                request.value, request.error = answer[1], answer[2]
                assert request.event is not None
                request.event.set()
                continue
            if loop is not last_loop:
                last_loop, group = loop, by_loop.setdefault(loop, [])
            group.append(answer)
        for loop, group in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, group)
            except RuntimeError:  # the caller's loop is closed: nobody is waiting
                pass

    # --------------------------------------------------------------- lifecycle
    def flush(self) -> None:
        """Stop waiting for batches to fill: what is queued runs now, and each request queued
        later at once, whatever `max_queue_delay_us` says.

        For a server that is stopping: its callers get their answers before the process
        exits instead of waiting out a long delay (and being cut off at the grace period).
        Requests are still taken until `close`, so one already accepted by a transport and
        not yet queued is answered too.
        """
        with self._cond:
            self._flushing = True
            self._cond.notify_all()

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with `drain`, queued ones still run before workers exit."""
        dropped: list[_Request] = []
        with self._cond:
            self._closing = True
            if not drain:
                for queue in self._queues.values():
                    for request in queue:
                        if request.state == _PENDING:
                            self._discard(request)
                            dropped.append(request)
            self._cond.notify_all()
        self._answer([(r, None, ModelNotReady(f"model {self.name!r} version {self.version} "
                                              "was unloaded before the request ran"))
                      for r in dropped])
        for worker in self._workers:
            worker.join(timeout)
        self._uncount()

    def __enter__(self) -> MicroBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_error(exc: Exception) -> EdgerunError:
    return exc if isinstance(exc, EdgerunError) else InferenceError(str(exc))


def _resolve(group: list[tuple[_Request, Outputs | None, BaseException | None]]) -> None:
    """Runs on the caller's event loop: settle every future of one batch."""
    for request, value, error in group:
        if request.timer is not None:
            request.timer.cancel()
        future = request.future
        assert future is not None
        if not future.done():
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)
