"""Run the fleet server on uvicorn (uvloop and httptools when installed)."""

from __future__ import annotations

from pathlib import Path

import uvicorn

from edgerun.adapters.http.app import create_app
from edgerun.adapters.http.fastpath import FastPath
from edgerun.runtime.batcher import BatchingConfig
from edgerun.runtime.repository import Repository


def serve(repository_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
          device: str | None = None, poll_interval: float | None = None,
          batching: BatchingConfig | None = None, max_body_bytes: int = 64 << 20,
          access_log: bool = False, log_level: str = "info") -> None:
    """Serve every model in `repository_dir` until interrupted; drains on shutdown."""
    repository = Repository(repository_dir, device, default_batching=batching)
    app = create_app(repository, max_body_bytes=max_body_bytes, poll_interval=poll_interval)
    uvicorn.run(FastPath(app), host=host, port=port, access_log=access_log,
                log_level=log_level, timeout_graceful_shutdown=30, proxy_headers=False)
