"""edgerun: one inference core for serverless functions, edge devices and a GPU fleet server."""

__version__ = "0.1.0"
