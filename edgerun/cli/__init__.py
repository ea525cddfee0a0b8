"""The `edgerun` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape

from edgerun import __version__
from edgerun.cli import (build, bundle, daemon, demo, devices, fleet, keys, optimize, package,
                         predict, serve)
from edgerun.runtime.errors import EdgerunError

# Errors are never wrapped: a path or a topic broken over two lines cannot be grepped or pasted.
err = Console(stderr=True, soft_wrap=True)

#: The extra that installs each optional module, by its top-level name: commands import them
#: when first needed, so one missing is known only then.
EXTRAS = {"cryptography": "ota", "paho": "mqtt", "tvm": "tvm", "tvm_ffi": "tvm",
          "xgboost": "tvm", "sklearn": "demo", "skl2onnx": "demo", "uvicorn": "server",
          "fastapi": "server", "grpc": "grpc", "google": "grpc", "mangum": "lambda",
          "awslambdaric": "lambda", "functions_framework": "gcf", "psycopg": "fleet",
          "onnxconverter_common": "optimize", "ai_edge_litert": "tflite"}


def missing_module(command: str, exc: ModuleNotFoundError) -> str:
    """One line naming the module a command needs and the extra that installs it."""
    if "pip install" in str(exc):  # the raiser named the extra already
        return str(exc)
    module = (exc.name or "").partition(".")[0]
    extra = EXTRAS.get(module)
    install = f"pip install 'edgerun[{extra}]'" if extra else f"install {module}"
    return f"edgerun {command} needs {module or exc}, which is not installed: {install}"


def reader_gone() -> int:
    """Exit quietly when what reads stdout has stopped (`edgerun ... | head`), as rich's own
    output does: Python's recipe (the signal module's note on SIGPIPE), stdout pointed at
    /dev/null so the exit's flush of what is left cannot fail once more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgerun", description="Bundle, verify and serve models with one inference core.")
    parser.add_argument("--version", action="version", version=f"edgerun {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (bundle, keys, predict, demo, serve, optimize, devices, package, daemon,
                   build, fleet):
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _run(argv)
        finally:  # --help and --version too: a reader gone (`| head`) is met here, not at
            sys.stdout.flush()  # the exit's flush, which would print a traceback of it
    except BrokenPipeError:
        return reader_gone()


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except BrokenPipeError:  # not an error of the command's: `main` ends it quietly
        raise
    except EdgerunError as exc:
        err.print(f"[bold red]error[/] ({exc.kind}): {escape(str(exc))}", highlight=False)
        return 2
    except ModuleNotFoundError as exc:  # an optional dependency, not edgerun's own code
        if args.verbose or (exc.name or "").partition(".")[0] == "edgerun":
            raise
        err.print(f"[bold red]error[/]: {escape(missing_module(args.command, exc))}",
                  highlight=False)
        return 2
    except (ValueError, OSError) as exc:  # a bad profile or config file, a missing path
        if args.verbose:
            raise
        err.print(f"[bold red]error[/]: {escape(str(exc))}", highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
