"""The fleet HTTP server: Open Inference Protocol v2 and TF Serving REST over FastAPI."""

from edgerun.adapters.http.app import create_app
from edgerun.adapters.http.server import serve

__all__ = ["create_app", "serve"]
