"""MetaSchedule tuning on this host, its records cached so a model is tuned once per target.

Needs apache-tvm-ffi 0.1.14.post0 (0.1.15 segfaults in TuneContextInitialize), xgboost,
cloudpickle, tornado and psutil: the `tvm` extra pins them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TRIALS_FILE = "edgerun-trials.json"


def tune(mod: Any, target: Any, work_dir: Path, trials: int, notes: list[str]) -> Any:
    """The module with tuned schedules applied; tunes only the trials not already recorded."""
    from tvm import relax

    work_dir.mkdir(parents=True, exist_ok=True)
    done_file = work_dir / TRIALS_FILE
    done = json.loads(done_file.read_text())["trials"] if done_file.is_file() else 0
    todo = max(0, trials - done)
    tasks = _task_count(mod, target)
    pipeline = relax.get_pipeline("static_shape_tuning", total_trials=todo, target=target,
                                  work_dir=str(work_dir),
                                  max_trials_per_task=max(1, -(-todo // tasks)) if todo else None)
    tuned = pipeline(mod)
    if todo:
        done_file.write_text(json.dumps({"trials": done + todo}))
    notes.append(f"tuning records {work_dir}: {done} trials cached, {todo} run now")
    return tuned


def _task_count(mod: Any, target: Any) -> int:
    """About how many kernels MetaSchedule will tune (fused operators after legalization)."""
    from tvm import relax

    with target:
        lowered = relax.get_pipeline("zero")(mod)
    return max(1, sum(1 for gv in lowered.functions if not isinstance(lowered[gv],
                                                                         relax.Function)))
