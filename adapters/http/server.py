"""Run the fleet server on uvicorn (uvloop and httptools when installed)."""

from __future__ import annotations

from pathlib import Path

import uvicorn

from edgerun.adapters.dataplane import DataPlane
from edgerun.adapters.http.app import create_app
from edgerun.adapters.http.asgi import EdgerunASGI
from edgerun.runtime.batcher import BatchingConfig
from edgerun.runtime.repository import Repository


def serve(repository_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
          device: str | None = None, poll_interval: float | None = None,
          batching: BatchingConfig | None = None, max_body_bytes: int = 64 << 20,
          access_log: bool = False, log_level: str = "info") -> None:
    """Serve every model in `repository_dir` until interrupted; drains on shutdown.

    The repository loads in the background while the port opens (readiness turns 200 once
    every model is loaded); the app itself never loads or unloads models.
    """
    repository = Repository(repository_dir, device, default_batching=batching)
    repository.start_loading(poll_interval)
    plane = DataPlane(repository)
    app = EdgerunASGI(plane, max_body_bytes=max_body_bytes,
                      fallback=create_app(plane, max_body_bytes=max_body_bytes))
    try:
        uvicorn.run(app, host=host, port=port, access_log=access_log, log_level=log_level,
                    timeout_graceful_shutdown=30, proxy_headers=False, lifespan="on")
    finally:
        repository.close()
