"""`edgerun package lambda|gcf`: a bundle and its runtime as a serverless deployment package."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

out = Console(highlight=False)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("package", help="build deployment packages for serverless "
                                                 "targets")
    sub = parser.add_subparsers(dest="package_command", required=True, metavar="TARGET")
    lam = sub.add_parser(
        "lambda", help="the SAM function's deployment zip for one architecture",
        description="Build DIR/function.zip: the function module, the parts of edgerun it "
                    "imports, its dependencies for Python 3.12 on the architecture, and the "
                    "bundle as model/ (EDGERUN_MODEL=model), with Python 3.12 byte code.")
    lam.add_argument("bundle", type=Path, help="bundle folder or archive (.tar.gz, .zip)")
    lam.add_argument("--arch", required=True, choices=["arm64", "x86_64"],
                     help="the function's architecture (template.yaml's Architecture)")
    lam.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    lam.add_argument("--unzipped", action="store_true",
                     help="write the package's files into the folder instead of a zip (what "
                          "sam build's makefile build method expects)")
    lam.add_argument("--python", default=None, metavar="PATH",
                     help="a Python 3.12 to compile byte code with (default: found on PATH, in "
                          "pyenv or uv)")
    lam.set_defaults(handler=_lambda)
    gcf = sub.add_parser(
        "gcf", help="the Cloud Functions source folder for gcloud functions deploy --source",
        description="Write DIR: main.py (entry points infer and pubsub), the parts of edgerun "
                    "it imports, the bundle as model/ (EDGERUN_MODEL=model) and "
                    "requirements.txt.")
    gcf.add_argument("bundle", type=Path, help="bundle folder or archive (.tar.gz, .zip)")
    gcf.add_argument("-o", "--output", type=Path, required=True,
                     help="output folder (new or empty)")
    gcf.set_defaults(handler=_gcf)


def _gcf(args: argparse.Namespace) -> int:
    from edgerun.adapters.gcf.packaging import package_gcf

    folder = package_gcf(args.bundle, args.output)
    out.print(f"wrote {folder}; deploy it with:\n  gcloud functions deploy edgerun-infer --gen2 "
              f"--runtime python312 --source {folder} --entry-point infer --trigger-http "
              "--set-env-vars EDGERUN_MODEL=model")
    return 0


def _lambda(args: argparse.Namespace) -> int:
    from edgerun.adapters.aws_lambda.packaging import (DIRECT_UPLOAD_LIMIT, UNZIPPED_LIMIT,
                                                       package_lambda)

    with out.status(f"building the {args.arch} package (downloading wheels on first use)"):
        report = package_lambda(args.bundle, args.arch, args.output, unzipped=args.unzipped,
                                python312=args.python)
    table = Table(title="Lambda deployment package", show_header=False)
    table.add_row("package", str(report.path))
    table.add_row("architecture", report.architecture)
    table.add_row("files", str(report.files))
    table.add_row("unzipped", f"{report.unzipped_bytes / 2**20:.1f} MB "
                              f"({report.fraction_of_limit:.0%} of Lambda's "
                              f"{UNZIPPED_LIMIT // 2**20} MB limit)")
    if report.zipped_bytes is not None:
        table.add_row("zipped", f"{report.zipped_bytes / 2**20:.1f} MB")
    table.add_row("byte code", report.bytecode)
    table.add_row("largest", ", ".join(f"{name} {size / 2**20:.1f} MB"
                                       for name, size in report.largest[:4]))
    out.print(table)
    if report.zipped_bytes is not None and report.zipped_bytes > DIRECT_UPLOAD_LIMIT:
        out.print(f"[yellow]note[/]: over {DIRECT_UPLOAD_LIMIT // 2**20} MB zipped: upload it "
                  "through S3 (sam deploy does)")
    return 0
