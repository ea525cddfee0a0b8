"""MetaSchedule tuning on this host, its records cached so a model is tuned once per target.

Needs apache-tvm-ffi 0.1.14.post0 (0.1.15 segfaults in TuneContextInitialize), xgboost,
cloudpickle, tornado and psutil: the `tvm` extra pins them. The same steps as 0.27's
`static_shape_tuning` pipeline, with two changes measured on a busy 2-core machine: candidates
are built and timed in this process (TVM's LocalBuilder starts a new process pool, which imports
TVM, for every batch: up to 2 minutes a batch there, and its 30 s timeout failed every build;
starting LocalRunner's worker took 3 minutes), and the search population is sized to the budget.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TRIALS_FILE = "edgerun-trials.json"


def _in_process_builder() -> Any:
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export
    from tvm.ir.utils import derived_object

    @derived_object
    class InProcessBuilder(ms.builder.PyBuilder):
        def build(self, build_inputs: list[Any]) -> list[Any]:
            results = []
            for item in build_inputs:
                try:
                    path = default_export(default_build(item.mod, item.target, None))
                    results.append(ms.builder.BuilderResult(path, None))
                except Exception as exc:  # a failed candidate is a result, not a crash
                    results.append(ms.builder.BuilderResult(None, f"{type(exc).__name__}: {exc}"))
            return results

    return InProcessBuilder()


def _in_process_runner() -> Any:
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
                    seconds = local_runner._worker_func(
                        None, None, None, config, 1, str(item.artifact_path),
                        str(item.device_type), tuple(a.as_json() for a in item.args_info))
                    futures.append(local_runner.LocalRunnerFuture(res=seconds))
                except Exception as exc:  # a failed candidate is a result, not a crash
                    futures.append(local_runner.LocalRunnerFuture(
                        error_message=f"{type(exc).__name__}: {exc}"))
            return futures

    return InProcessRunner()


def tune(mod: Any, target: Any, work_dir: Path, trials: int, notes: list[str]) -> Any:
    """The module with tuned schedules applied; tunes only the trials not already recorded."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    work_dir.mkdir(parents=True, exist_ok=True)
    done_file = work_dir / TRIALS_FILE
    done = json.loads(done_file.read_text())["trials"] if done_file.is_file() else 0
    todo = max(0, trials - done)
    with target:
        mod = tvm.transform.Sequential([
            relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
            relax.get_pipeline("zero")])(mod)
        if todo:
            tasks = sum(1 for gv in mod.functions if not isinstance(mod[gv], relax.Function))
            per_task = max(1, -(-todo // max(1, tasks)))
            ms.relax_integration.tune_relax(
                mod=mod, params={}, target=target, work_dir=str(work_dir),
                max_trials_global=todo, max_trials_per_task=per_task,
                num_trials_per_iter=min(64, per_task),
                builder=_in_process_builder(),
                runner=_in_process_runner(),
                strategy=ms.search_strategy.EvolutionarySearch(
                    population_size=min(512, max(32, 16 * per_task))))
            done_file.write_text(json.dumps({"trials": done + todo}))
        mod = relax.transform.MetaScheduleApplyDatabase(str(work_dir))(mod)
    notes.append(f"tuning records {work_dir}: {done} trials cached, {todo} run now")
    return mod
