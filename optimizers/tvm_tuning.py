"""MetaSchedule tuning, its records cached so a model is tuned once per target.

Needs apache-tvm-ffi 0.1.14.post0 (0.1.15 segfaults in TuneContextInitialize), xgboost,
cloudpickle, tornado and psutil: the `tvm` extra pins them. The same steps as 0.27's
`static_shape_tuning` pipeline, with two changes measured on a busy 2-core machine: candidates
are built and timed in this process (TVM's LocalBuilder starts a new process pool, which imports
TVM, for every batch: up to 2 minutes a batch there, and its 30 s timeout failed every build;
starting LocalRunner's worker took 3 minutes), and the search population is sized to the budget.
Candidates are timed on a thread of their own whose TVM pool has the profile's thread count, the
one the bundle is served at (`runtime.backends.tvm.threads_for`); over RPC, on a pool of the
profile's `intra_op_threads` on the device (else the device's default).

For a device that cannot run here (an ARM board), `rpc=RpcDevice(host, port)` measures the
candidates on the device's TVM RPC server instead (or on a device a TVM RPC tracker hands out
by key); they are linked here into shared libraries by the profile's cross compiler, so the
device needs TVM's runtime and no compiler.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRIALS_FILE = "edgerun-trials.json"
#: Seconds an RPC session may last on the device before its server ends it.
RPC_SESSION_TIMEOUT_S = 300
#: Seconds a device may take to accept an RPC session: a frozen board (its TCP stack still
#: accepting, its server stopped) would otherwise hang the compile forever.
RPC_CONNECT_TIMEOUT_S = 60.0
#: Devices asked of the tracker before a connect gives up, as TVM's TrackerSession.request.
TRACKER_REQUESTS = 5
#: Seconds the up-front probe waits for the server (or tracker) to accept a TCP connection.
RPC_PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class RpcDevice:
    """A TVM RPC server on the device (`python -m tvm.exec.rpc_server`) that measures the
    candidates built here: tuning for an ARM board from an x86 host.

    Reached directly at HOST:PORT, or, with a `key`, through the TVM RPC tracker at HOST:PORT
    (`python -m tvm.exec.rpc_tracker`) that hands out any free device registered under that
    key: how a farm of boards is shared.
    """

    host: str
    port: int
    key: str | None = None

    @classmethod
    def parse(cls, address: str, option: str = "rpc") -> RpcDevice:
        """HOST:PORT of a server or KEY@HOST:PORT of a tracker, or ValueError naming it as
        `option` (the parameter or flag it came from: `rpc`, `--rpc`)."""
        key, at, rest = address.rpartition("@")
        host, _, port = rest.rpartition(":")
        if (at and not key) or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{option} {address!r}: expected HOST:PORT of a TVM RPC server, or "
                             "KEY@HOST:PORT of a TVM RPC tracker and a device key")
        return cls(host.strip("[]"), int(port), key or None)

    def __str__(self) -> str:
        address = f"{self.host}:{self.port}"
        return address if self.key is None else f"{self.key}@{address}"

    def unreachable(self, timeout: float = RPC_PROBE_TIMEOUT_S) -> str | None:
        """Why nothing accepts a TCP connection at HOST:PORT within `timeout` ("Connection
        refused", "timed out", an unknown host), or None: a probe cheap enough to run before
        any work, where TVM's own connect comes only at compile time."""
        try:
            socket.create_connection((self.host, self.port), timeout=timeout).close()
        except OSError as exc:
            return exc.strerror or str(exc) or type(exc).__name__
        return None

    def connect(self) -> Any:
        """A new session (the server forks a process for it); through the tracker, on
        whichever device under the key is free, waiting while all are busy. A device that
        takes over RPC_CONNECT_TIMEOUT_S to accept it is TimeoutError, naming it."""
        from tvm import rpc
        from tvm.rpc import base

        if self.key is None:
            return _within(RPC_CONNECT_TIMEOUT_S, f"the TVM RPC server at {self}",
                           lambda: rpc.connect(self.host, self.port,
                                               session_timeout=RPC_SESSION_TIMEOUT_S))
        # TrackerSession.request, split: the wait for a free device is unbounded (a farm may
        # be busy), the handshake with the device it hands out is not. A device that refuses
        # the session (its match key went stale, it went away) is asked for again, as in TVM's.
        tracker = rpc.connect_tracker(self.host, self.port)
        refused: list[str] = []
        try:
            for _ in range(TRACKER_REQUESTS):
                base.sendjson(tracker._sock, [base.TrackerCode.REQUEST, self.key, "", 1])
                answer = base.recvjson(tracker._sock)
                if answer[0] != base.TrackerCode.SUCCESS:
                    raise RuntimeError(f"the TVM RPC tracker {self.host}:{self.port} answered "
                                       f"{answer}")
                host, port, match_key = answer[1]
                try:
                    return _within(RPC_CONNECT_TIMEOUT_S, f"the {self.key!r} device at "
                                   f"{host}:{port} the tracker handed out",
                                   lambda: rpc.connect(host, port, match_key,
                                                       session_timeout=RPC_SESSION_TIMEOUT_S))
                except TimeoutError:  # a hung device: named, not handed out again and again
                    raise
                except Exception as exc:  # TVM's errors for a refused session
                    refused.append(f"{host}:{port}: {_first_line(exc)}")
        finally:
            tracker.close()
        raise RuntimeError(f"every {self.key!r} device the tracker handed out refused the "
                           f"session ({'; '.join(refused)})")

    def check(self) -> None:
        """Fail before tuning, naming the address (and key), when nothing answers there."""
        from edgerun.optimizers.tvm import CompileError

        if self.key is not None:
            self._check_tracker()
        try:
            self.connect()
        except TimeoutError as exc:  # something listens there, and hangs
            raise CompileError(f"{exc}; restart the device's RPC server") from exc
        except Exception as exc:  # TVM wraps socket errors in its own types
            if self.key is not None:
                raise CompileError(f"the TVM RPC tracker {self.host}:{self.port} gave no "
                                   f"session on a {self.key!r} device ({_first_line(exc)})"
                                   ) from exc
            raise CompileError(f"no TVM RPC server answers at {self} ({_first_line(exc)}); "
                               "start one on the device: python -m tvm.exec.rpc_server "
                               f"--host 0.0.0.0 --port {self.port}") from exc

    def _check_tracker(self) -> None:
        """The tracker answers and has a device under the key; a request for a key nobody
        registered would otherwise wait forever."""
        from edgerun.optimizers.tvm import CompileError

        address = f"{self.host}:{self.port}"
        try:  # TVM's own connect retries for a minute before it gives up
            socket.create_connection((self.host, self.port), timeout=10).close()
            keys = tracker_keys(self.host, self.port)
        except Exception as exc:
            raise CompileError(f"no TVM RPC tracker answers at {address} ({_first_line(exc)}); "
                               "start one: python -m tvm.exec.rpc_tracker --host 0.0.0.0 "
                               f"--port {self.port}") from exc
        if self.key not in keys:
            raise CompileError(f"no device is registered under key {self.key!r} at the TVM RPC "
                               f"tracker {address} (keys there: {', '.join(keys) or 'none'}); "
                               f"on the device: python -m tvm.exec.rpc_server --tracker "
                               f"{address} --key {self.key}")


def tracker_keys(host: str, port: int) -> list[str]:
    """The device keys registered at the TVM RPC tracker at HOST:PORT, sorted (the tracker
    lists each server's key as "server:KEY")."""
    from tvm import rpc

    tracker = rpc.connect_tracker(host, port)
    try:
        servers = tracker.summary()["server_info"]
    finally:
        tracker.close()
    return sorted({server["key"].split(":", 1)[-1] for server in servers})


def _within(seconds: float, what: str, call: Callable[[], Any]) -> Any:
    """`call()`'s result, or TimeoutError naming `what` after `seconds`. TVM's connect is
    native code that no Python timeout reaches: it is left waiting on a daemon thread."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # handed to the caller
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name="edgerun-rpc-connect", daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        raise TimeoutError(f"{what} did not accept a session within {seconds:g} s (a hung "
                           "device?)")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def _last_lines(exc: BaseException, limit: int = 400) -> str:
    """The end of an error's text, where TVM's RPC errors say what failed on the device."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text[-limit:]}"


def _first_line(exc: BaseException) -> str:
    return next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def _in_process_builder(export: Callable[[Any, str], None], scratch: Path,
                        trials: list[int]) -> Any:
    """A MetaSchedule builder in this process; one entry in `trials` per candidate it is
    given, a trial as MetaSchedule counts them."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build
    from tvm.ir.utils import derived_object

    @derived_object
    class InProcessBuilder(ms.builder.PyBuilder):
        def build(self, build_inputs: list[Any]) -> list[Any]:
            results = []
            for item in build_inputs:
                trials.append(1)
                try:
                    path = tempfile.mkdtemp(dir=scratch)
                    export(default_build(item.mod, item.target, None), path)
                    results.append(ms.builder.BuilderResult(path_in(path), None))
                except Exception as exc:  # a failed candidate is a result, not a crash
                    results.append(ms.builder.BuilderResult(None, f"{type(exc).__name__}: {exc}"))
            return results

    return InProcessBuilder()


def path_in(folder: str) -> str:
    """The one artifact an export wrote into `folder`."""
    (artifact,) = Path(folder).iterdir()
    return str(artifact)


def tar_export(module: Any, folder: str) -> None:
    """MetaSchedule's default: objects in a tar, linked where they are loaded (this host)."""
    from tvm.support.tar import tar

    module.export_library(str(Path(folder) / f"candidate.{tar.output_format}"), fcompile=tar)


def shared_library_export(fcompile: Any) -> Callable[[Any, str], None]:
    """A shared library linked here by `fcompile` (the profile's cross compiler): the device
    needs no compiler to load it."""

    def export(module: Any, folder: str) -> None:
        module.export_library(str(Path(folder) / "candidate.so"), fcompile=fcompile)

    return export


def _in_process_runner(measure: Callable[[Any, Any], Any],
                       failed: Callable[[Exception], str]) -> Any:
    """A MetaSchedule runner that times each candidate in this process with `measure(config,
    item)`; a candidate that raises becomes a failed result whose message is `failed(exc)`."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.runner import local_runner

    config = ms.runner.EvaluatorConfig._normalized(None)

    @derived_object
    class InProcessRunner(ms.runner.PyRunner):
        def run(self, runner_inputs: list[Any]) -> list[Any]:
            futures = []
            for item in runner_inputs:
                try:
                    futures.append(local_runner.LocalRunnerFuture(res=measure(config, item)))
                except Exception as exc:  # a failed candidate is a result, not a crash
                    futures.append(local_runner.LocalRunnerFuture(error_message=failed(exc)))
            return futures

    return InProcessRunner()


def _local_runner(timer: ThreadPoolExecutor) -> Any:
    """TVM's LocalRunner steps on this host, on `timer`'s one thread (see `_timing_thread`)."""
    from tvm.s_tir.meta_schedule.runner import local_runner

    def measure(config: Any, item: Any) -> Any:
        return timer.submit(
            local_runner._worker_func, None, None, None, config, 1, str(item.artifact_path),
            str(item.device_type), tuple(a.as_json() for a in item.args_info)).result()

    return _in_process_runner(measure, lambda exc: f"{type(exc).__name__}: {exc}")


def _timing_thread(threads: int) -> ThreadPoolExecutor:
    """One new thread whose TVM pool has `threads` workers (0: TVM's default), unbound, as the
    runtime runs the artifact (`threads_for`, `use_threads`, TVM_BIND_THREADS=0): the calling
    thread's pool has TVM's default size (half the logical CPUs on x86), or the size it was
    first made with, which no later call raises, so candidates were timed at another thread
    count than they are served at and the schedule fastest there was picked."""
    from edgerun.runtime.backends.tvm import use_threads

    def start() -> None:
        os.environ.setdefault("TVM_BIND_THREADS", "0")
        use_threads(threads)

    return ThreadPoolExecutor(1, thread_name_prefix="edgerun-tvm-tune", initializer=start)


def _rpc_runner(device: RpcDevice, errors: list[str], runs: list[int], threads: int = 0) -> Any:
    """TVM's RPC runner steps (upload, random inputs, time_evaluator, clean up) run from this
    process, one session per candidate as RPCRunner does, without its worker pool (which
    starts a process importing TVM: minutes on a busy 2-core host). Each session's pool is
    sized to `threads` first (0: the device's default), the count the bundle is served at
    there: the server's default (half the logical CPUs on x86) may be another."""
    from tvm.s_tir.meta_schedule.runner import rpc_runner

    from edgerun.runtime.backends.tvm import use_threads_on

    def session(_config: Any) -> Any:
        connected = device.connect()
        use_threads_on(connected, threads)
        return connected

    def measure(config: Any, item: Any) -> Any:
        runs.append(1)
        return rpc_runner._worker_func(
            session, None, None, None, None, None, config, 1,
            str(item.artifact_path), str(item.device_type),
            tuple(a.as_json() for a in item.args_info))

    def failed(exc: Exception) -> str:
        errors.append(_last_lines(exc))
        return f"{type(exc).__name__} on {device}: {exc}"

    return _in_process_runner(measure, failed)


def tune(mod: Any, target: Any, work_dir: Path, trials: int, notes: list[str], *,
         rpc: RpcDevice | None = None, fcompile: Any = None, threads: int = 0) -> Any:
    """The module with tuned schedules applied; tunes only the trials not already recorded,
    and records those MetaSchedule ran. Only kernels with static shapes can be tuned (its
    DisallowDynamicLoop): the budget is shared among those, the others keep TVM's default
    schedules, and a model with none runs no trial (its note says so). Candidates run on a
    TVM pool of `threads` (the profile's count, as served; 0: TVM's default), here, or with
    `rpc` linked by `fcompile` and measured on the device."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    work_dir.mkdir(parents=True, exist_ok=True)
    done_file = work_dir / TRIALS_FILE
    done = json.loads(done_file.read_text())["trials"] if done_file.is_file() else 0
    todo = max(0, trials - done)
    ran: list[int] = []
    with target:
        mod = tvm.transform.Sequential([
            relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
            relax.get_pipeline("zero")])(mod)
        tasks = ms.relax_integration.extract_tasks(mod, target, params={}) if todo else []
        tunable = [task for task in tasks if _static(task)]
        if tunable:
            _tune_tasks(tunable, target, work_dir, todo, ran, notes, rpc, fcompile, threads)
            done_file.write_text(json.dumps({"trials": done + len(ran)}))
        mod = relax.transform.MetaScheduleApplyDatabase(str(work_dir))(mod)
    notes.append(_tuning_note(work_dir, done, todo, len(ran), len(tunable), len(tasks), rpc))
    return mod


def _tuning_note(work_dir: Path, done: int, todo: int, ran: int, tunable: int, kernels: int,
                 rpc: RpcDevice | None) -> str:
    """What tuning did: the trials MetaSchedule ran and on how many kernels, not the trials
    asked for: one with a symbolic shape is never tuned, and a model of those alone runs none."""
    note = f"tuning records {work_dir}: {done} trials cached, {ran} run now"
    if not todo:
        return note
    if not tunable:
        why = f"every kernel ({kernels}) has a symbolic shape" if kernels else "no kernels"
        return f"{note}: nothing to tune, {why}; the library keeps TVM's default schedules"
    note += (f" ({f'measured on {rpc} over TVM RPC' if rpc else 'measured on this host'})"
             f" on {tunable} of {kernels} kernels")
    if tunable < kernels:
        note += f", {kernels - tunable} with a symbolic shape left untuned"
    if ran < todo:
        note += f"; MetaSchedule found no candidates for the other {todo - ran} asked for"
    return note


def _static(task: Any) -> bool:
    """Whether MetaSchedule can tune the task: its DisallowDynamicLoop postprocessor rejects
    every candidate of a kernel with a loop over a symbolic extent (a sequence length)."""
    from tvm import s_tir
    from tvm.s_tir.meta_schedule.postproc import DisallowDynamicLoop

    return bool(DisallowDynamicLoop().apply(s_tir.Schedule(task.dispatched[0])))


def _tune_tasks(tasks: list[Any], target: Any, work_dir: Path, todo: int, ran: list[int],
                notes: list[str], rpc: RpcDevice | None, fcompile: Any, threads: int) -> None:
    """`tune_relax`'s steps on the tunable tasks only; one entry in `ran` per trial run."""
    from tvm.s_tir import meta_schedule as ms

    per_task = max(1, -(-todo // len(tasks)))
    errors: list[str] = []
    runs: list[int] = []
    _drop_unnamed_log_handlers()
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        extracted_tasks=tasks, work_dir=str(work_dir),
        strategy=ms.search_strategy.EvolutionarySearch(
            population_size=min(512, max(32, 16 * per_task))))
    with tempfile.TemporaryDirectory(prefix="edgerun-tuning-") as scratch, \
            _timing_thread(threads) as timer:
        export = shared_library_export(fcompile) if rpc else tar_export
        ms.tune.tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=str(work_dir),
            max_trials_global=todo, max_trials_per_task=per_task,
            num_trials_per_iter=min(64, per_task),
            builder=_in_process_builder(export, Path(scratch), ran),
            runner=_rpc_runner(rpc, errors, runs, threads) if rpc else _local_runner(timer))
    if rpc and runs and len(errors) == len(runs):
        from edgerun.optimizers.tvm import CompileError

        raise CompileError(f"every tuning candidate ({len(runs)}) failed on the device "
                           f"at {rpc}, e.g. {errors[0]}; is that device a "
                           f"{_triple(target)}?")
    if errors:
        notes.append(f"{len(errors)} of {len(runs)} candidates failed on {rpc}, e.g. "
                     f"{errors[0]}")


def _drop_unnamed_log_handlers() -> None:
    """MetaSchedule (extracted_tasks_to_tune_contexts) rebuilds its logger's configuration
    from the names of the handlers on it and fails on one without a name ("'NoneType' object
    has no attribute 'format'"), such as a log-capture handler added after an earlier tune in
    the process; the rebuilt configuration replaces that logger's handlers anyway."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    for handler in [h for h in logger.handlers if h.get_name() is None]:
        logger.removeHandler(handler)


def _triple(target: Any) -> str:
    """The target's LLVM triple, as the candidates were compiled for it."""
    return str(target.attrs.get("mtriple", "")) or "host-like machine"
