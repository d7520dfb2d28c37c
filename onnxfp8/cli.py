"""The command line: a click group whose subcommands are thin wrappers around the Python API.

Exit codes: 0 success, 1 a check or lint found problems (or a pass failed), 2 bad input (one line on stderr,
naming the file and the problem, never a traceback)."""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Dict, Optional

import click

from onnxfp8.errors import OnnxFp8Error


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn):
    """Turn onnxfp8's errors (and any unexpected one) into one line on stderr and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OnnxFp8Error as e:
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except MemoryError:
            _fail("out of memory; lower --batch-size or --max-memory", 1)
        except Exception as e:  # a bug: still one line, with a hint to get the traceback
            if os.environ.get("ONNXFP8_DEBUG"):
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            _fail(f"internal error: {type(e).__name__}: {first} (set ONNXFP8_DEBUG=1 for the traceback)", 1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="onnxfp8")
def cli() -> None:
    """Quantize FP32 ONNX models to FP8 (E4M3, E5M2, E3M4) or INT8, and check how close they stay."""


def _split(values) -> tuple:
    out = []
    for v in values or ():
        out.extend(p.strip() for p in v.split(",") if p.strip())
    return tuple(out)


def config_options(fn):
    """Options shared by every command that builds a QuantConfig."""
    opts = [
        click.option("--recipe", type=click.Path(dir_okay=False), help="TOML/JSON recipe with any of these settings."),
        click.option("--format", "-f", "format_", help="Format of weights and activations: e4m3 (default), e5m2, e3m4, int8."),
        click.option("--weights-format", help="Format of weights (overrides --format)."),
        click.option("--activations-format", help="Format of activations (overrides --format)."),
        click.option("--style", type=click.Choice(["qdq", "emulate"]), help="qdq (default): Q/DQ nodes; emulate: Cast-based fake quantization, exact at every onnxruntime level."),
        click.option("--calibration", type=click.Choice(["max", "percentile", "mse", "entropy"]), help="Calibration method (default max)."),
        click.option("--percentile", type=float, help="Percentile for --calibration percentile (default 99.99)."),
        click.option("--calib-samples", type=int, help="Use at most N calibration samples."),
        click.option("--batch-size", type=int, help="Samples per onnxruntime run (default 16)."),
        click.option("--op-types", multiple=True, help="Operator types to quantize (comma separated)."),
        click.option("--exclude-op", multiple=True, help="Operator types to keep FP32 (comma separated)."),
        click.option("--include-node", multiple=True, help="Only quantize nodes matching these globs or /regexes/."),
        click.option("--exclude-node", multiple=True, help="Keep nodes matching these globs or /regexes/ FP32."),
        click.option("--keep-first-last/--no-keep-first-last", default=None, help="Keep the first and last compute layers FP32."),
        click.option("--per-channel/--per-tensor", default=None, help="Weight scales per output channel (default) or per tensor."),
        click.option("--fold-bn/--no-fold-bn", default=None, help="Fold BatchNormalization into the preceding op (default on)."),
        click.option("--providers", multiple=True, help="onnxruntime execution providers (comma separated)."),
        click.option("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)."),
        click.option("--max-memory", "max_memory_mb", type=int, help="Memory budget in MB for tensors exposed per batch during calibration."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def build_config(kw: Dict[str, Any]):
    from onnxfp8.config import QuantConfig, load_recipe_file

    data: Dict[str, Any] = {}
    recipe = kw.pop("recipe", None)
    if recipe:
        data.update(load_recipe_file(recipe))
    mapping = {"format_": "format"}
    listy = {"op_types", "exclude_op", "include_node", "exclude_node", "providers"}
    rename = {"exclude_op": "exclude_ops", "include_node": "include_nodes", "exclude_node": "exclude_nodes",
              "fold_bn": "fold_batchnorm"}
    for key, value in kw.items():
        if key in listy:
            value = _split(value)
            if not value:
                continue
        if value is None:
            continue
        data[rename.get(key, mapping.get(key, key))] = value
    return QuantConfig.from_dict(data, source=recipe or "options")


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--calib", "-c", type=click.Path(), help="Calibration data: a folder of .npz/.npy files or one file.")
@click.option("--output", "-o", type=click.Path(), help="Output model (default: <model>.<format>.onnx beside the input).")
@click.option("--plan", "plan_path", type=click.Path(), help="Write the quantization plan (JSON) here.")
@click.option("--report", "report_path", type=click.Path(), help="Write the full report (JSON) here.")
@click.option("--quiet", "-q", is_flag=True, help="Print only errors.")
@config_options
@handle_errors
def quantize(model, calib, output, plan_path, report_path, quiet, **kw):
    """Quantize MODEL to FP8 (or INT8) with calibration data."""
    from onnxfp8.quantize import default_output, quantize as run

    config = build_config(kw)
    output = output or default_output(model, config)
    result = run(model, calib, config=config, output=output)
    if plan_path:
        _write_text(plan_path, result.plan.to_json())
    if report_path:
        _write_text(report_path, result.report.to_json())
    if not quiet:
        click.echo(result.report.summary())
        click.echo(f"wrote {output}")


def _write_text(path: str, text: str) -> None:
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".onnxfp8-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@cli.command()
@handle_errors
def formats():
    """List the formats with their bits, bias, range and ONNX type."""
    from onnxfp8.formats import FORMATS

    header = f"{'format':7} {'bits':>5} {'bias':>4} {'max':>9} {'min normal':>12} {'min subnormal':>14} {'inf':>4} {'NaN':>20}  ONNX dtype"
    click.echo(header)
    for f in FORMATS.values():
        bits = f"{f.exponent_bits}.{f.mantissa_bits}" if f.kind == "float" else "int"
        if f.onnx_dtype is None:
            dtype = "emulated"
        else:
            import onnx

            dtype = onnx.TensorProto.DataType.Name(f.onnx_dtype)
        click.echo(f"{f.name:7} {bits:>5} {f.bias:>4} {f.max:>9g} {f.min_normal:>12.6g} {f.min_subnormal:>14.6g} "
                   f"{'yes' if f.has_inf else 'no':>4} {f.nan:>20}  {dtype}")


def main() -> None:
    cli(prog_name="onnxfp8")


if __name__ == "__main__":
    main()
