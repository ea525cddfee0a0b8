"""The optimizer's one error: a model it cannot transform, with the reason why."""

from __future__ import annotations

from edgerun.runtime.errors import EdgerunError


class OptimizeError(EdgerunError, ValueError):
    """A model, its calibration data or a requested optimization cannot be used; says why."""

    kind = "optimize_error"
