"""`edgerun serve`: the fleet server (HTTP, and OIP v2 gRPC) over a repository or one model."""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path
from types import FrameType

from edgerun.cli.arguments import port, positive
from edgerun.devices import load_profile
from edgerun.runtime.batcher import BatchingConfig
from edgerun.runtime.repository import exit_if_still_loading

log = logging.getLogger(__name__)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "serve", help="serve a model repository over Open Inference Protocol v2 and TF Serving",
        description="Serve DIR/<model>/<version>/ bundles (--repository DIR; a model's optional "
                    "DIR/<model>/config.toml sets its version policy, batching and traffic "
                    "split), or the one model KServe mounts (--model-dir /mnt/models: a bundle "
                    "folder or archive, or a bare model file such as model.onnx).")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--repository", type=Path, help="model repository folder")
    where.add_argument("--model-dir", type=Path,
                       help="serve the single model in this folder (or file), as KServe mounts it")
    parser.add_argument("--model-name", default=None,
                        help="with --model-dir: the name to serve it under (default: the "
                             "bundle's name, or the model file's stem)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=port, default=8000)
    parser.add_argument("--grpc-port", type=port, default=None,
                        help="also serve OIP v2 gRPC (inference.GRPCInferenceService) here")
    parser.add_argument("--device", default=None, help="device profile (default: cpu)")
    parser.add_argument("--poll-interval", type=positive(float), default=None,
                        metavar="SECONDS",
                        help="with --repository: watch the folder and hot-swap changes every "
                             "SECONDS")
    defaults = BatchingConfig()
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                        help="for every model whose config.toml [batching] sets no "
                             "max_batch_size (default %(default)s); 0: the model has no batch "
                             "axis, requests are never stacked")
    parser.add_argument("--max-queue-delay-us", type=int, default=defaults.max_queue_delay_us,
                        help="for every model whose config.toml [batching] sets no "
                             "max_queue_delay_us (default %(default)s)")
    parser.add_argument("--max-queue-size", type=int, default=defaults.max_queue_size,
                        help="for every model whose config.toml [batching] sets no "
                             "max_queue_size (default %(default)s)")
    parser.add_argument("--max-body-bytes", type=positive(int), default=64 << 20,
                        help="larger request bodies get 413 (default 64 MiB)")
    parser.add_argument("--keep-alive", type=positive(float), default=75.0, metavar="SECONDS",
                        help="close an idle HTTP connection after SECONDS (default 75, as "
                             "nginx: above a load balancer's or proxy's own idle timeout, "
                             "which must close first); a request head not whole within "
                             "SECONDS (at most 60) of its first byte gets 408")
    parser.add_argument("--api-keys", type=Path, default=None, metavar="FILE",
                        help="require 'Authorization: Bearer <key>' on every route but health "
                             "and readiness, checked against this tokens file (hashes, "
                             "reloaded when it changes; see edgerun fleet token create)")
    parser.add_argument("--metrics", choices=["open", "closed"], default="closed",
                        help="with --api-keys: whether /metrics needs a read key "
                             "(default closed)")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(handler=_serve)


#: Set by a SIGTERM during start-up: the SystemExit raised then can land in code that
#: swallows every exception (a Cython module's start-up, say), so start-up checks it too.
_stop_asked = False


def _stop_starting(signum: int, frame: FrameType | None) -> None:
    """SIGTERM before the server's own handlers (its event loop's) replace this one: end at
    once with status 0, as a stop during a load does. Without a handler, a PID 1 (a container
    with no init) ignores SIGTERM, and start-up went on into serving."""
    global _stop_asked
    _stop_asked = True
    exit_if_still_loading(0)  # a loading thread started: leave it, as the server does
    raise SystemExit(0)


def _serve(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _stop_starting)
    if args.grpc_port is not None and args.grpc_port == args.port != 0:
        # else one server took it and the other said "address already in use", of a port
        # nothing else held
        raise ValueError(f"--grpc-port {args.port} is --port too: HTTP and gRPC need a port "
                         "each")  # exit status 2
    if args.model_dir is not None and args.poll_interval is not None:
        # its one version is read once: a poll would never load what replaced it
        raise ValueError("--poll-interval goes with --repository: --model-dir serves one "
                         "model, fixed at start-up")  # exit status 2
    try:
        from edgerun.adapters.http import serve
    except ImportError as exc:
        raise ModuleNotFoundError(f"edgerun serve needs the server extra: pip install "
                                  f"'edgerun[server]' ({exc})", name=exc.name) from None
    hooks = []
    if args.api_keys is not None:
        from edgerun.adapters.auth import ApiKeyHook, TokenStore
        hooks.append(ApiKeyHook(TokenStore(args.api_keys), metrics_open=args.metrics == "open"))
    elif args.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("serving on %s without --api-keys: every route is open to the network",
                    args.host)
    batching = BatchingConfig(max_batch_size=args.max_batch_size,
                              max_queue_delay_us=args.max_queue_delay_us,
                              max_queue_size=args.max_queue_size)
    device = load_profile(args.device)
    if args.model_dir is not None:
        from edgerun.runtime.sources import SingleModelSource
        source = SingleModelSource(args.model_dir, args.model_name, batching, device=device)
    else:
        if args.model_name is not None:
            raise ValueError("--model-name goes with --model-dir")  # exit status 2
        source = args.repository
    if _stop_asked:  # its SystemExit was swallowed on the way
        raise SystemExit(0)
    serve(source, host=args.host, port=args.port, grpc_port=args.grpc_port, device=device,
          poll_interval=args.poll_interval, batching=batching,
          max_body_bytes=args.max_body_bytes, keep_alive_s=args.keep_alive,
          access_log=args.access_log,
          log_level=args.log_level, hooks=hooks, exit_unless_loaded=args.model_dir is not None)
    exit_if_still_loading(0)
    return 0
