"""`edgerun optimize MODEL --device PROFILE [...] -o BUNDLE`: parse, run the pipeline, report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from edgerun.optimizers.pipeline import OptimizeReport

out = Console(highlight=False)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "optimize", help="quantize, prune or compile an ONNX model into a bundle for a device")
    parser.add_argument("model", type=Path, help="ONNX model file")
    parser.add_argument("--device", required=True,
                        help="device profile (its precision is the default for --quantize)")
    parser.add_argument("--quantize", choices=("int8", "fp16", "fp32"), default=None,
                        help="precision (default: the device profile's); int8 is static QDQ "
                             "with --calibration, dynamic without")
    parser.add_argument("--strict-fp16", action="store_true",
                        help="fp16: refuse a model float16 cannot hold (weights or activations "
                             "past 65504, or too small), instead of keeping those nodes float32")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="folder of .npy/.npz model inputs for int8 static quantization")
    parser.add_argument("--per-channel", action="store_true",
                        help="int8 weights quantized per output channel")
    parser.add_argument("--prune", type=float, default=None, metavar="RATIO",
                        help="prune this fraction of weights (or of channels with --structured)")
    parser.add_argument("--structured", action="store_true",
                        help="remove whole channels/units: a smaller, faster dense model")
    parser.add_argument("--compile", choices=("tvm",), default=None,
                        help="compile with TVM for the profile's target")
    parser.add_argument("--tune-trials", type=int, default=0,
                        help="MetaSchedule trials when compiling (0: no tuning)")
    parser.add_argument("--rpc", default=None, metavar="[KEY@]HOST:PORT",
                        help="measure the tuning trials on the device whose TVM RPC server "
                             "(python -m tvm.exec.rpc_server) listens there, or on a free "
                             "device registered under KEY with the TVM RPC tracker "
                             "(python -m tvm.exec.rpc_tracker) there")
    parser.add_argument("--force", action="store_true",
                        help="keep a compiled artifact even when it is slower than ONNX Runtime")
    parser.add_argument("--eval", type=Path, default=None, dest="eval_data",
                        help=".npz of model inputs (and `labels` for accuracy) to measure on")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="largest batch the bundle may run (default: no limit); 0 for a "
                             "model whose dim 0 is no batch (a sequence, say)")
    parser.add_argument("--name", default=None, help="bundle name (default: the file's stem)")
    parser.add_argument("--version", default="1", help="bundle version (default 1)")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="bundle folder, or a path ending in .tar.gz or .zip for an archive")
    parser.set_defaults(handler=_optimize)


def _flag(option: str, value: str | None = None) -> str:
    """An option as this command spells it: `--tune-trials`, `--compile tvm`."""
    flag = "--" + option.replace("_", "-")
    return flag if value is None else f"{flag} {value}"


def _optimize(args: argparse.Namespace) -> int:
    from edgerun.optimizers.errors import OptimizeError
    from edgerun.optimizers.pipeline import OptimizeOptions, check_combination, optimize

    if args.structured and args.prune is None:
        raise OptimizeError("--structured needs --prune RATIO (the fraction of channels to "
                            "remove, e.g. 0.5)")
    options = OptimizeOptions(
        device=args.device, quantize=args.quantize, calibration=args.calibration,
        per_channel=args.per_channel, prune=args.prune, structured=args.structured,
        compile=args.compile, tune_trials=args.tune_trials, rpc=args.rpc, force=args.force,
        eval_data=args.eval_data, name=args.name, version=args.version,
        strict_fp16=args.strict_fp16, max_batch_size=args.max_batch_size)
    check_combination(options, _flag)  # as optimize does, but naming the flags
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=out, transient=True) as progress:
        task = progress.add_task("starting")

        def step(description: str) -> None:
            progress.update(task, description=description)
            out.print(f"[dim]•[/] {escape(description)}")

        report = optimize(args.model, args.output, options, step)
    _print_report(report)
    return 0


def _size(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 1024 ** 2 else f"{n / 1024 ** 2:,.2f} MiB"


def _change(before: float | None, after: float | None, less: str, more: str) -> str:
    if not before or not after:
        return ""
    return f"{before / after:.2f}x {less}" if after <= before else f"{after / before:.2f}x {more}"


def _print_report(report: OptimizeReport) -> None:
    before, after = report.before, report.after
    out.print(f"[bold green]optimized[/] for {report.device}: "
              f"{', '.join(report.optimizations) or 'no changes (fp32)'} -> {report.bundle}")
    if report.prune is not None:
        p = report.prune
        what = "weights zero" if p.method == "unstructured" else "parameters removed"
        out.print(f"pruning: {p.sparsity:.1%} of {what}; " + "; ".join(p.layers))
    table = Table("", "before", "after", "change", title="report (measured on this host)")
    rows = [("model file", before.sizes.model, after.sizes.model),
            ("model file, gzip'd", before.sizes.model_gzip, after.sizes.model_gzip),
            ("bundle folder", before.sizes.bundle, after.sizes.bundle),
            ("bundle .tar.gz", before.sizes.bundle_targz, after.sizes.bundle_targz)]
    for label, b, a in rows:
        table.add_row(label, _size(b), _size(a), _change(b, a, "smaller", "larger"))
    for batch, b in before.latency_ms.items():
        a = after.latency_ms.get(batch)
        table.add_row(f"latency, batch {batch}", f"{b:.3f} ms" if b else "n/a",
                      f"{a:.3f} ms" if a else "n/a", _change(b, a, "faster", "slower"))
    if report.max_abs_error is not None:
        table.add_row("max abs error", "", f"{report.max_abs_error:.3g}", "")
    for output, (differ, rows) in report.changed_rows.items():
        table.add_row(f"rows changed, {escape(output)}", "", f"{differ} of {rows}",
                      f"{differ / rows:.1%}" if rows else "")
    if before.accuracy is not None:
        acc_after = after.accuracy
        table.add_row("accuracy", f"{before.accuracy:.2%}",
                      f"{acc_after:.2%}" if acc_after is not None else "n/a",
                      f"{(acc_after - before.accuracy) * 100:+.2f} points"
                      if acc_after is not None else "")
    out.print(table)
    if report.compile_report is not None:  # TVM's own figures, as its CompileReport prints them
        out.print(report.compile_report)
    for note in report.notes:
        out.print(f"[yellow]note[/]: {escape(note)}")
