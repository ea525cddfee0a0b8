"""The one data plane under every adapter: decode, route, run, encode, count; no web framework."""

from edgerun.adapters.dataplane.call import Attributes, Call, Reply
from edgerun.adapters.dataplane.hooks import Hook, HookChain, RequestId
from edgerun.adapters.dataplane.plane import DataPlane, InferResult

__all__ = ["Attributes", "Call", "DataPlane", "Hook", "HookChain", "InferResult", "Reply",
           "RequestId"]
