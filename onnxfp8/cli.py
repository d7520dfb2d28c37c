"""The command line: a click group whose subcommands are thin wrappers around the Python API.

Exit codes (errors.EXIT_CODES, in every command's --help): 0 success, 1 a quality gate failed (a check
threshold, a lint finding), 2 bad input or usage (one line on stderr, naming the file or option and the
problem, never a traceback), 3 an internal error (one line; ONNXFP8_DEBUG=1 shows the traceback)."""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
from typing import Any, Dict, Optional

import click

from onnxfp8.config import ALL_FORMATS
from onnxfp8.errors import EXIT_CODES, EXIT_INTERNAL, OnnxFp8Error


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn):
    """Turn onnxfp8's errors (and any unexpected one) into one line on stderr and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from onnxfp8.outputs import Terminated

        try:
            return fn(*args, **kwargs)
        except OnnxFp8Error as e:
            if e.exit_code == EXIT_INTERNAL and os.environ.get("ONNXFP8_DEBUG"):
                raise
            hint = " (set ONNXFP8_DEBUG=1 for the traceback)" if e.exit_code == EXIT_INTERNAL else ""
            _fail(f"{e}{hint}", e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Terminated:
            _fail("terminated", 143)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except MemoryError:
            if os.environ.get("ONNXFP8_DEBUG"):
                raise
            _fail("out of memory; lower --batch-size or --max-memory (set ONNXFP8_DEBUG=1 for the traceback)",
                  EXIT_INTERNAL)
        except Exception as e:  # a bug: still one line, with a hint to get the traceback
            if os.environ.get("ONNXFP8_DEBUG"):
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            _fail(f"internal error: {type(e).__name__}: {first} (set ONNXFP8_DEBUG=1 for the traceback)",
                  EXIT_INTERNAL)

    return wrapper


class OnnxFp8Group(click.Group):
    """The group: every command's --help ends with the exit codes, and click's usage errors (an unknown
    option, a bad choice, a missing argument) are one line on stderr, exit 2."""

    def add_command(self, cmd, name=None):
        if not cmd.epilog:
            cmd.epilog = EXIT_CODES
        super().add_command(cmd, name)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        from onnxfp8.outputs import install_signal_handlers

        install_signal_handlers()
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            msg = " ".join(e.format_message().split())
            cmd = e.ctx.command_path if e.ctx is not None else (prog_name or "onnxfp8")
            click.echo(f"error: {msg} (see '{cmd} --help')", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=OnnxFp8Group, epilog=EXIT_CODES,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="onnxfp8")
def cli() -> None:
    """Quantize FP32 ONNX models to FP8 (E4M3, E5M2, E3M4) or INT8, and check how close they stay."""


def _split(values) -> tuple:
    out = []
    for v in values or ():
        out.extend(p.strip() for p in v.split(",") if p.strip())
    return tuple(out)


def verbosity_options(fn):
    """-q/--quiet and -v/--verbose, on every subcommand (tests/test_cli_verbosity.py fails a command without
    them), with one meaning: --quiet prints only errors and failures (nothing on success, no progress), --verbose
    prints everything the default output shortens (every layer, node, tensor or setting in full). Both at once
    is a usage error (exit 2)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if kwargs.get("quiet") and kwargs.get("verbose"):
            raise click.UsageError("-q/--quiet and -v/--verbose contradict each other: give one",
                                   ctx=click.get_current_context(silent=True))
        return fn(*args, **kwargs)

    wrapper = click.option("--verbose", "-v", is_flag=True,
                           help="Print more: every layer, node, tensor or setting in full.")(wrapper)
    wrapper = click.option("--quiet", "-q", is_flag=True,
                           help="Print only errors and failures (nothing on success, no progress).")(wrapper)
    return wrapper


def config_options(fn):
    """Options shared by every command that builds a QuantConfig."""
    opts = [
        click.option("--recipe", help="A built-in recipe (fp8-bert, nlp, cv, tensorrt: see `onnxfp8 recipes`) or a "
                                      "TOML/JSON file with any of these settings; flags given here win."),
        click.option("--target", type=click.Choice(["tensorrt"]), help="Only placements this runtime fuses into FP8 kernels (layers it cannot run stay FP32, with the reason)."),
        click.option("--format", "-f", "format_", help="Format of weights and activations: e4m3 (default), e5m2, e3m4, int8, or auto (per tensor, the candidate of --formats with the least error on the data)."),
        click.option("--weights-format", help="Format of weights (overrides --format; auto allowed)."),
        click.option("--activations-format", help="Format of activations (overrides --format; auto allowed)."),
        click.option("--formats", multiple=True, help="Candidates for --format auto and for tuning (--target-*) (comma separated, default e4m3,e5m2,int8: formats a runtime executes; add e3m4, emulate-only, explicitly, e.g. e4m3,e5m2,e3m4,int8; the first is the fallback)."),
        click.option("--scheme", type=click.Choice(["standard", "extended"]), help="standard (default): Conv/Gemm/MatMul/embeddings; extended: also LayerNorm, BatchNorm, Add/Mul, MatMul between activations, Softmax, pooling, Resize, Concat."),
        click.option("--dynamic/--static", default=None, help="Activation scales computed in the graph at run time (no activation calibration) or calibrated (default)."),
        click.option("--dynamic-granularity", type=click.Choice(["tensor", "token"]), help="With --dynamic: one scale per tensor (default) or per row/token of MatMul/Gemm inputs."),
        click.option("--style", type=click.Choice(["qdq", "emulate"]), help="qdq (default): Q/DQ nodes; emulate: Cast-based fake quantization, exact at every onnxruntime level."),
        click.option("--calibration", type=click.Choice(["max", "percentile", "mse", "entropy"]), help="Calibration method (default max)."),
        click.option("--percentile", type=float, help="Percentile for --calibration percentile (default 99.99)."),
        click.option("--calib-samples", type=int, help="Use at most N calibration samples."),
        click.option("--summary-samples", type=int, help="Measure the quantized model's output SQNR vs FP32 on the first N calibration samples (default: a sixteenth of the calibration samples, at least 8, at most 64; 0 skips it). The exact quantized run costs about 2.5 FP32 inferences per sample."),
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
        click.option("--save-stats", type=click.Path(), help="Write the calibration statistics (min/max and histograms of every calibrated tensor, tied to this graph and data) to FILE, so that other formats or methods can --load-stats them."),
        click.option("--load-stats", type=click.Path(), help="Use statistics written by --save-stats instead of running calibration (refused when FILE belongs to another model or data)."),
        click.option("--bn-recalibrate/--no-bn-recalibrate", default=None, help="Re-estimate BatchNorm statistics on the quantized model (BN left unfolded while quantizing), then fold BN and re-quantize the folded weights."),
        click.option("--bn-calib", type=click.Path(), help="Data for --bn-recalibrate (default: the calibration data)."),
        click.option("--bn-samples", type=int, help="Samples for --bn-recalibrate (default 4096, or all the data holds; with --augment the data is gone over again)."),
        click.option("--bn-mode", type=click.Choice(["shift", "replace"]), help="shift (default): move the stored statistics by the shift quantization causes on the data; replace: the quantized model's statistics on the data."),
        click.option("--bn-guard/--no-bn-guard", default=None, help="With --bn-recalibrate: keep the stored statistics when recalibration lowers accuracy (labels), top-1 agreement or output SQNR vs FP32 on the held-out calibration samples (default on)."),
        click.option("--bn-ranges/--no-bn-ranges", default=None, help="After --bn-recalibrate, re-measure activation ranges on the quantized model (max calibration)."),
        click.option("--augment", multiple=True, help="Augment the --bn-recalibrate data (NCHW images): flip,crop,jitter (comma separated)."),
        click.option("--augment-seed", type=int, help="Seed of --augment (default 0)."),
        click.option("--allow-empty", is_flag=True, default=None, help="Write the model even when no node gets quantized (without it that is an error, exit 2, naming the reasons)."),
        click.option("--equalize/--no-equalize", default=None, help="Cross-layer equalization (Nagel et al. 2019) of Conv/Gemm/MatMul pairs through Relu-like ops before quantizing (same FP32 function), with bias absorption and, unless --no-bias-correction, bias correction from the calibration data (docs/transforms.md)."),
        click.option("--bias-correction/--no-bias-correction", default=None, help="Correct the biases of quantized layers for the expected shift their weights' quantization causes (measured on the calibration data; default: on with --equalize)."),
        click.option("--smoothquant", is_flag=False, flag_value="auto", default=None, metavar="[ALPHA]", help="SmoothQuant (Xiao et al. 2022): move per-channel activation outliers of MatMul/Gemm inputs into the weights, folded into the op before where possible. ALPHA in [0, 1], or alone: alpha per layer from the calibration data (a grid search on the layer's own error); 'off' turns a recipe's off."),
        click.option("--transform-guard/--no-transform-guard", default=None, help="With --equalize / --smoothquant / --bias-correction: quantize without them first, then add them one at a time and keep each only when it raises the worst output's SQNR vs FP32 on held-out calibration samples (two folds, each half held out once) by 0.5 dB with a bootstrap 10 % bound >= 0 dB (default on; costs two quantizations per transform; the decisions are in the plan and the summary)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def build_config(kw: Dict[str, Any]):
    from onnxfp8.config import QuantConfig
    from onnxfp8.recipes import load_recipe, resolve_recipe

    data: Dict[str, Any] = {}
    recipe = kw.pop("recipe", None)
    if recipe:
        recipe = resolve_recipe(recipe)
        data.update(load_recipe(recipe))
    listy = {"op_types", "exclude_op", "include_node", "exclude_node", "providers", "formats", "augment"}
    rename = {"format_": "format", "exclude_op": "exclude_ops", "include_node": "include_nodes",
              "exclude_node": "exclude_nodes", "fold_bn": "fold_batchnorm"}
    for key, value in kw.items():
        if key in ("include_node", "exclude_node"):  # a regex may hold commas: split globs only
            value = tuple(p for v in value or () for p in ((v,) if v.startswith(("/", "re:")) else _split((v,))))
            if not value:
                continue
        elif key in listy:
            value = _split(value)
            if not value:
                continue
        if value is None:
            continue
        data[rename.get(key, key)] = value
    config = QuantConfig.from_dict(data, source=recipe or "options")
    _check_option_use(kw, config)
    return config


def _check_option_use(kw: Dict[str, Any], config) -> None:
    """Options that the configuration would silently ignore are errors naming the option."""
    from onnxfp8.errors import ConfigError

    if kw.get("percentile") is not None and config.calibration != "percentile" and not any(
            o.get("calibration") == "percentile" for o in config.overrides.values()):
        raise ConfigError(f"--percentile is only used with --calibration percentile (the calibration is "
                          f"{config.calibration})")
    if kw.get("transform_guard") is not None and not (config.equalize or config.smoothquant is not None
                                                      or config.bias_correction):
        raise ConfigError("--transform-guard is only used with --equalize, --smoothquant or --bias-correction")
    if not config.bn_recalibrate:
        for key in ("bn_calib", "bn_samples", "bn_mode", "bn_guard", "bn_ranges"):
            if kw.get(key) is not None:
                raise ConfigError(f"--{key.replace('_', '-')} is only used with --bn-recalibrate")


_THRESHOLD_FLAGS = ("min_sqnr", "min_cosine", "max_rel_error", "min_top1_agreement", "max_accuracy_loss")


def check_options(fn):
    """Options of the FP32-vs-quantized check, shared by `check` and `quantize --check`."""
    _t = "VALUE for every output or OUTPUT=VALUE for one (repeatable); 'none' turns it off."
    opts = [
        click.option("--labels", type=click.Path(), help="A .npy of class labels, one per sample in data order (or a 'label' key in the .npz files)."),
        click.option("--min-sqnr", multiple=True, help=f"Minimum output SQNR in dB (default 15). {_t}"),
        click.option("--min-cosine", multiple=True, help=f"Minimum cosine similarity (default 0.98). {_t}"),
        click.option("--max-rel-error", multiple=True, help=f"Maximum relative L2 error (default 0.2). {_t}"),
        click.option("--min-top1-agreement", multiple=True, help=f"Minimum top-1 agreement with FP32 of classifier outputs, a fraction or a percentage (default 90%). {_t}"),
        click.option("--max-accuracy-loss", multiple=True, help=f"Maximum relative accuracy loss with labels, a fraction or a percentage (default 1%). {_t}"),
        click.option("--min-layer-sqnr", type=float, help="Fail when a quantized layer's own SQNR (the error it adds alone, on FP32 inputs) is below this many dB; turns --layers on. Off by default: catches a layer a residual connection hides from the outputs."),
        click.option("--layers", "check_layers", is_flag=True, help="Also attribute the error to each quantized layer (cumulative and own SQNR, worst first)."),
        click.option("--reference", is_flag=True, help="Also run the quantized model in onnx.reference (a second runtime) on a few samples and report the largest difference; for small models."),
        click.option("--reference-samples", type=click.IntRange(min=1), default=4, show_default=True, help="Samples for --reference."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _pop_check_kw(kw: Dict[str, Any]) -> Dict[str, Any]:
    """Take the check options out of ``kw`` (thresholds parsed into a Thresholds)."""
    from onnxfp8.verify.check import Thresholds

    out = {k: kw.pop(k) for k in ("labels", "check_layers", "reference", "reference_samples")}
    raw = {k: kw.pop(k) for k in _THRESHOLD_FLAGS}
    min_layer_sqnr = kw.pop("min_layer_sqnr")
    flags = {"check_layers": "layers"}
    out["given"] = ["--" + flags.get(k, k).replace("_", "-") for k in list(raw) + ["labels", "check_layers", "reference"]
                    if (raw.get(k) if k in raw else out.get(k))]
    out["thresholds"] = Thresholds.from_options({k: v for k, v in raw.items() if v})
    if min_layer_sqnr is not None:
        out["given"].append("--min-layer-sqnr")
        out["thresholds"] = dataclasses.replace(out["thresholds"], min_layer_sqnr=min_layer_sqnr)
    return out


def _run_check(fp32, quant, data, ck: Dict[str, Any], json_path: Optional[str], quiet: bool, *, batch_size: int,
               samples: Optional[int], max_memory_mb: int, providers, threads: int,
               quant_name: Optional[str] = None, outs=None, verbose: bool = False) -> int:
    """Run the check, print the table, stage the JSON report in ``outs``; return the exit code (0 pass,
    1 fail). On a terminal (and without ``quiet``) a status line on stderr says what it is at (outputs, then
    each chunk of --layers) and for how long."""
    from onnxfp8.progress import status_for
    from onnxfp8.verify.check import check as run_check

    status = status_for(sys.stderr, quiet, "checking")
    try:
        report = run_check(fp32, quant, data, ck["thresholds"], labels=ck["labels"], layers=ck["check_layers"],
                           batch_size=batch_size, samples=samples, reference=ck["reference"],
                           reference_samples=ck["reference_samples"], max_memory_mb=max_memory_mb,
                           providers=providers, threads=threads, progress=status)
    finally:
        if status is not None:
            status.close()
    if quant_name:  # quantize --check hands over the model in memory: name the file it wrote
        report.quant = quant_name
    if json_path:
        outs.write_text(json_path, report.to_json())
    if not quiet:
        click.echo(report.summary(verbose=verbose))
    elif not report.passed:
        click.echo("\n".join(["FAIL:"] + [f"  {f}" for f in report.failures]), err=True)
    return report.exit_code


def tuning_options(fn):
    """Tuning to a target (quantize --target-*): onnxfp8/tuning/tune.py."""
    opts = [
        click.option("--target-cosine", type=float, help="Tune to this output cosine vs FP32 on --val (the FP8 paper's criterion: 0.995): search formats per tensor, the calibration method, then leave the most sensitive layers in FP32 until it holds; exit 1 when it cannot within --max-fallback (the best model found is written)."),
        click.option("--target-sqnr", type=float, help="Tune to this output SQNR (dB) vs FP32 on --val (as --target-cosine)."),
        click.option("--max-fallback", help="With a target: at most N layers, or P% of the quantized layers, left in high precision (default 10%)."),
        click.option("--tune-samples", type=int, help="With a target: use at most N validation samples."),
        click.option("--fallback-precision", type=click.Choice(["auto", "fp32"]), default=None, help="With a target: the precision of a layer left out of FP8: auto (default) = FP16 where the layer is FP16-safe on the calibration data (ranges within FP16's, weights that round cleanly), else FP32; fp32 = always FP32."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _pop_tuning_kw(kw: Dict[str, Any]) -> Dict[str, Any]:
    return {k: kw.pop(k) for k in ("target_cosine", "target_sqnr", "max_fallback", "tune_samples",
                                   "fallback_precision")}


def _tuning_target(tk: Dict[str, Any], ck: Dict[str, Any], do_check: bool, val):
    """The tuning target the options give (None: no tuning). --max-accuracy-loss with --val and without
    --check is a target (with labels); with --check it stays a check threshold."""
    from onnxfp8.errors import ConfigError
    from onnxfp8.tuning.evaluate import Target

    targets = []
    if tk["target_cosine"] is not None:
        targets.append(Target("cosine", tk["target_cosine"]))
    if tk["target_sqnr"] is not None:
        targets.append(Target("sqnr", tk["target_sqnr"]))
    if not do_check and val and "--max-accuracy-loss" in ck["given"]:
        loss = ck["thresholds"].max_accuracy_loss
        if loss is None or ck["thresholds"].overrides:
            raise ConfigError("--max-accuracy-loss as a tuning target takes one VALUE (a fraction or a percentage)")
        targets.append(Target("accuracy_loss", loss))
    if len(targets) > 1:
        raise ConfigError("give one tuning target: " + " or ".join(t.flag for t in targets))
    if targets and not val:
        raise ConfigError(f"{targets[0].flag} needs --val DIR: the target is judged on validation data, never on "
                          f"the calibration data")
    return targets[0] if targets else None


def _run_tuning(model, calib, output, plan_path, report_path, quiet, do_check, val, check_json, target, tk, ck, kw,
                verbose=False):
    """quantize --target-*: tune, write the chosen model, plan and report; exit 1 when the target is not met."""
    import json

    from onnxfp8.errors import ConfigError
    from onnxfp8.outputs import Outputs
    from onnxfp8.plan import json_plain
    from onnxfp8.progress import progress_for
    from onnxfp8.quantize import default_output
    from onnxfp8.tuning.tune import tune

    if not calib and not kw.get("load_stats"):
        raise ConfigError("tuning needs --calib DIR (or --load-stats FILE): it calibrates once and then searches")
    check_memory = kw.get("max_memory_mb") or 32
    config = build_config(kw)
    output = output or default_output(model, config)
    code = 0
    with Outputs() as outs:  # every file checked before any work, renamed into place together at the end
        outs.protect(val, "the validation data (--val)")
        outs.protect(ck["labels"], "--labels")
        outs.add(plan_path, "--plan")
        outs.add(report_path, "--report")
        outs.add(check_json, "--check-json")
        res = tune(model, calib, val, target, config, labels=ck["labels"], max_fallback=tk["max_fallback"],
                   output=output, samples=tk["tune_samples"], progress=progress_for(sys.stderr, quiet),
                   outputs=outs, fallback_precision=tk["fallback_precision"] or "auto")
        if plan_path:
            outs.write_text(plan_path, res.plan.to_json())
        if report_path:
            data = res.report.to_dict()
            data["tuning"] = res.tuning.to_dict()
            outs.write_text(report_path, json.dumps(json_plain(data), indent=1, allow_nan=False))
        if not quiet:
            click.echo(res.report.summary(verbose=verbose))
            click.echo(res.tuning.summary())
        if do_check:
            code = _run_check(model, res.model, val, ck, check_json, quiet, batch_size=config.batch_size,
                              samples=None, max_memory_mb=check_memory, providers=config.providers,
                              threads=config.threads, quant_name=str(output), outs=outs, verbose=verbose)
        outs.commit()
    if not quiet:
        click.echo(f"wrote {output}")
    if not res.met:
        click.echo(f"error: {res.tuning.message}", err=True)
        code = 1
    sys.exit(code)


@cli.command()
@click.argument("fp32", type=click.Path())
@click.argument("quant", type=click.Path())
@click.option("--data", "-d", required=True, type=click.Path(), help="Validation data: a folder of .npz/.npy files or one file (as for --calib).")
@click.option("--samples", type=click.IntRange(min=1), help="Use at most N samples.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Samples per onnxruntime run.")
@click.option("--json", "json_path", type=click.Path(), help="Write the whole report (JSON) here.")
@click.option("--max-memory", "max_memory_mb", type=click.IntRange(min=1), default=32, show_default=True, help="MB of tensors exposed per onnxruntime run by --layers (more: larger runs and fewer passes, faster).")
@click.option("--providers", multiple=True, help="onnxruntime execution providers (comma separated).")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="onnxruntime intra-op threads (default: all cores).")
@check_options
@verbosity_options
@handle_errors
def check(fp32, quant, data, samples, batch_size, json_path, max_memory_mb, providers, threads, quiet, verbose, **kw):
    """Check QUANT against FP32 on validation data: exit 0 when every threshold holds, 1 when one fails."""
    from onnxfp8.outputs import Outputs

    ck = _pop_check_kw(kw)
    with Outputs() as outs:
        outs.protect_model(fp32, "the FP32 model")
        outs.protect_model(quant, "the quantized model")
        outs.protect(data, "the validation data")
        outs.protect(ck["labels"], "--labels")
        outs.add(json_path, "--json")
        outs.validate()
        code = _run_check(fp32, quant, data, ck, json_path, quiet, batch_size=batch_size, samples=samples,
                          max_memory_mb=max_memory_mb, providers=_split(providers) or ("CPUExecutionProvider",),
                          threads=threads, outs=outs, verbose=verbose)
        outs.commit()
    sys.exit(code)


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--calib", "-c", type=click.Path(), help="Calibration data: a folder of .npz/.npy files or one file.")
@click.option("--output", "-o", type=click.Path(), help="Output model (default: <model>.<format>.onnx beside the input).")
@click.option("--plan", "plan_path", type=click.Path(), help="Write the quantization plan (JSON) here.")
@click.option("--report", "report_path", type=click.Path(), help="Write the full report (JSON) here.")
@click.option("--check", "do_check", is_flag=True, help="Then check the quantized model against MODEL on --val data (exit 1 when a threshold fails).")
@click.option("--val", type=click.Path(), help="Validation data for --check (same formats as --calib).")
@click.option("--check-json", type=click.Path(), help="With --check: write the check report (JSON) here.")
@tuning_options
@click.option("--apply-plan", "apply_plan", type=click.Path(), help="Rebuild the quantized model from a plan written by --plan (possibly edited: formats, scales, nodes left FP32), without calibration data; the settings come from the plan (--style, --providers, --threads may change).")
@check_options
@config_options
@verbosity_options
@handle_errors
def quantize(model, calib, output, plan_path, report_path, quiet, verbose, do_check, val, check_json, apply_plan,
             **kw):
    """Quantize MODEL to FP8 (or INT8) with calibration data (or from a saved plan: --apply-plan)."""
    from onnxfp8.errors import ConfigError
    from onnxfp8.quantize import default_output, quantize as run

    tk = _pop_tuning_kw(kw)
    ck = _pop_check_kw(kw)
    target = _tuning_target(tk, ck, do_check, val)
    if target is not None:
        if apply_plan:
            raise ConfigError(f"{target.flag} searches plans from calibration data; --apply-plan applies a given one")
        return _run_tuning(model, calib, output, plan_path, report_path, quiet, do_check, val, check_json, target,
                           tk, ck, kw, verbose=verbose)
    unused = [f for f, k in (("--max-fallback", "max_fallback"), ("--tune-samples", "tune_samples"),
                             ("--fallback-precision", "fallback_precision")) if tk[k] is not None]
    if unused:
        raise ConfigError(f"{unused[0]} is only used "
                          f"when tuning to a target (--target-cosine, --target-sqnr, --max-accuracy-loss with --val)")
    if do_check and not val:
        raise ConfigError("--check needs --val DIR (validation data)")
    if not do_check and (val or check_json or ck["given"]):
        used = "--val" if val else ("--check-json" if check_json else ck["given"][0])
        raise ConfigError(f"{used} is only used with --check")
    check_memory = kw.get("max_memory_mb") or 32  # --max-memory given: it bounds the --layers exposure too
    from onnxfp8.outputs import Outputs
    from onnxfp8.progress import progress_for

    if apply_plan:
        config, plan = _plan_config(apply_plan, calib, kw)
    else:
        config = build_config(kw)
    output = output or default_output(model, config)
    code = 0
    with Outputs() as outs:  # every file is checked before any work, and renamed into place together at the end
        outs.protect(val, "the validation data (--val)")
        outs.protect(ck["labels"], "--labels")
        outs.protect(apply_plan, "the plan (--apply-plan)")
        outs.add(plan_path, "--plan")
        outs.add(report_path, "--report")
        outs.add(check_json, "--check-json")
        if apply_plan:
            from onnxfp8.quantize import apply_plan as run_plan

            result = run_plan(model, plan, config=config, output=output, outputs=outs)
        else:
            result = run(model, calib, config=config, output=output, progress=progress_for(sys.stderr, quiet),
                         outputs=outs)
        if plan_path:
            outs.write_text(plan_path, result.plan.to_json())
        if report_path:
            outs.write_text(report_path, result.report.to_json())
        if not quiet:  # with what format auto chose where, and the dynamic scales
            click.echo(result.report.summary(verbose=verbose))
        if do_check:
            code = _run_check(model, result.model, val, ck, check_json, quiet, batch_size=config.batch_size,
                              samples=None, max_memory_mb=check_memory, providers=config.providers,
                              threads=config.threads, quant_name=str(output), outs=outs, verbose=verbose)
        outs.commit()
    if not quiet:
        click.echo(f"wrote {output}")
    sys.exit(code)


# what may change when a plan is applied: how the decisions are written out and run, not the decisions
_PLAN_FLAGS = ("style", "providers", "threads")


def _plan_config(path: str, calib, kw: Dict[str, Any]):
    """The plan at ``path`` and the config to apply it with: the plan's settings, with --style / --providers /
    --threads on top. Options that make decisions are refused: the plan holds them (edit the plan)."""
    from onnxfp8.config import QuantConfig
    from onnxfp8.errors import ConfigError
    from onnxfp8.plan import QuantPlan

    if calib:
        raise ConfigError(f"--calib: {path} holds the decisions, --apply-plan needs no data "
                          f"(measure the result with --check --val DIR)")
    for key, value in kw.items():
        if key not in _PLAN_FLAGS and value not in (None, ()):
            flag = {"format_": "format", "max_memory_mb": "max-memory", "fold_bn": "fold-bn"}.get(key, key)
            raise ConfigError(f"--{flag.replace('_', '-')}: the plan {path} holds the decisions; edit the plan "
                              f"instead of passing options with --apply-plan")
    plan = QuantPlan.load(path)
    data = dict(plan.config)
    for key in _PLAN_FLAGS:
        value = kw.get(key)
        if value not in (None, ()):
            data[key] = _split(value) if key == "providers" else value
    return QuantConfig.from_dict(data, source=f"{path} (config)"), plan


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--calib", "-c", type=click.Path(), help="Calibration data (calibrated once).")
@click.option("--val", required=True, type=click.Path(), help="Validation data: every layer's error is measured on it.")
@click.option("--labels", type=click.Path(), help="A .npy of class labels for --val (accuracy in the output-level figures).")
@click.option("--samples", type=int, help="Use at most N validation samples.")
@click.option("--top", type=int, default=5, show_default=True, help="Also measure the model outputs with only / all but each of the N most sensitive layers quantized (two whole-model runs each; 0: none).")
@click.option("--json", "json_path", type=click.Path(), help="Write the ranking (JSON) here.")
@click.option("--plot", "plot_path", type=click.Path(), help="Write a PNG bar chart of the per-layer, per-format own SQNR here (needs matplotlib: the plots extra).")
@click.option("--limit", type=int, default=20, show_default=True, help="Rows of the printed table (--verbose: all).")
@config_options
@verbosity_options
@handle_errors
def sensitivity(model, calib, val, labels, samples, top, json_path, plot_path, limit, quiet, verbose, **kw):
    """Per quantized layer: its error alone in each format (E4M3/E5M2/E3M4/INT8, all four unless --formats names
    some: it measures, it does not ship; which wins, by how much), ranked worst first (in --format, default
    E4M3), from shared passes over --val; the model outputs with only it quantized / only it in FP32 for the
    --top most sensitive layers."""
    from onnxfp8.errors import ConfigError
    from onnxfp8.progress import progress_for
    from onnxfp8.verify.sensitivity import sensitivity as run

    if not calib and not kw.get("load_stats"):
        raise ConfigError("sensitivity needs --calib DIR (or --load-stats FILE)")
    if top < 0:
        raise ConfigError(f"--top must be >= 0, got {top}")
    if plot_path:
        from onnxfp8.report.plots import require

        require()  # fail before the work, not after it
    from onnxfp8.recipes import load_recipe, resolve_recipe

    # --formats (or a recipe's formats) names the formats measured; else all four
    named = bool(_split(kw.get("formats"))) or (bool(kw.get("recipe")) and "formats" in load_recipe(
        resolve_recipe(kw["recipe"])))
    config = build_config(kw)
    from onnxfp8.outputs import Outputs

    with Outputs() as outs:
        outs.protect_model(model, "the input model")
        outs.protect(calib, "the calibration data")
        outs.protect(val, "the validation data (--val)")
        outs.protect(labels, "--labels")
        outs.add(json_path, "--json")
        outs.add(plot_path, "--plot")
        outs.validate()
        report = run(model, calib, val, config, formats=config.formats if named else ALL_FORMATS, labels=labels,
                     top=top, samples=samples,
                     progress=progress_for(sys.stderr, quiet))
        if json_path:
            outs.write_text(json_path, report.to_json())
        if plot_path:
            from onnxfp8.report.plots import sensitivity_png

            with open(outs.temporary(plot_path), "wb") as f:
                f.write(sensitivity_png(report))
        outs.commit()
    if not quiet:
        click.echo(report.summary(limit=len(report.layers) if verbose else limit))
        if verbose:
            click.echo("time: " + ", ".join(f"{k} {v:.2f} s" for k, v in report.timings.items())
                       + f"; total {report.seconds:.2f} s")


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--calib", "-c", required=True, type=click.Path(), help="Calibration data (calibrated once per scheme).")
@click.option("--val", required=True, type=click.Path(), help="Validation data: every configuration is scored on it.")
@click.option("--labels", type=click.Path(), help="A .npy of class labels for --val (accuracy; the criterion becomes < 1% relative accuracy loss).")
@click.option("--out", "out_dir", type=click.Path(), help="Folder for sweep.md, sweep.json and sweep.html (default: <model>.sweep beside the model).")
@click.option("--formats", "sweep_formats", default=",".join(ALL_FORMATS + ("auto",)), show_default=True, help="Formats to sweep (comma separated; default every format, E3M4 included: the sweep measures, it does not ship; auto: per tensor, from -f auto's default candidates e4m3,e5m2,int8).")
@click.option("--schemes", default="standard,extended", show_default=True, help="Schemes to sweep.")
@click.option("--calibrations", default="max,percentile,mse,entropy", show_default=True, help="Calibration methods to sweep.")
@click.option("--transforms", "sweep_transforms", default="", help="Also each format with each of these transforms on (equalize, smoothquant, bias_correction, or all; comma separated): a format x transform table, and the tuner tries them. Each row calibrates anew (a transform rewrites the graph).")
@click.option("--tune/--no-tune", "do_tune", default=True, show_default=True, help="Add the tuned result (quantize --target-* on the same statistics).")
@click.option("--target-cosine", type=float, help="The table's criterion and the tuner's target (default: cosine >= 0.995, or < 1% accuracy loss with labels).")
@click.option("--target-sqnr", type=float, help="Criterion and tuning target: output SQNR in dB.")
@click.option("--max-accuracy-loss", help="Criterion and tuning target with --labels: relative accuracy loss (1% or 0.01).")
@click.option("--max-fallback", help="Tuning: at most N or P% of the quantized layers in high precision (default 10%).")
@click.option("--samples", type=int, help="Use at most N validation samples.")
@click.option("--calib-samples", type=int, help="Use at most N calibration samples.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Samples per onnxruntime run.")
@verbosity_options
@handle_errors
def sweep(model, calib, val, labels, out_dir, sweep_formats, schemes, calibrations, sweep_transforms, do_tune,
          target_cosine, target_sqnr, max_accuracy_loss, max_fallback, samples, calib_samples, batch_size, quiet,
          verbose):
    """The paper's table for MODEL: formats x schemes x calibration methods, plus the tuned result (SQNR, cosine,
    accuracy, size, layers in fallback), as markdown, JSON and one self-contained HTML report with plots."""
    from onnxfp8.config import QuantConfig
    from onnxfp8.errors import ConfigError
    from onnxfp8.outputs import Outputs
    from onnxfp8.progress import progress_for
    from onnxfp8.report.html import render
    from onnxfp8.tuning.evaluate import Target
    from onnxfp8.tuning.sweep import sweep as run

    targets = []
    if target_cosine is not None:
        targets.append(Target("cosine", target_cosine))
    if target_sqnr is not None:
        targets.append(Target("sqnr", target_sqnr))
    if max_accuracy_loss is not None:
        from onnxfp8.verify.check import Thresholds

        targets.append(Target("accuracy_loss", Thresholds.from_options({"max_accuracy_loss": [max_accuracy_loss]})
                              .max_accuracy_loss))
    if len(targets) > 1:
        raise ConfigError("give one criterion: " + " or ".join(t.flag for t in targets))
    out_dir = out_dir or os.path.splitext(model)[0] + ".sweep"
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"{out_dir}: --out is not a folder")
    config = QuantConfig(batch_size=batch_size, calib_samples=calib_samples)
    from onnxfp8.tuning.sweep import TRANSFORM_ON

    transforms = _split((sweep_transforms,))
    if transforms == ("all",):
        transforms = list(TRANSFORM_ON)
    for t in transforms:
        if t not in TRANSFORM_ON:
            raise ConfigError(f"--transforms: unknown transform '{t}'; choose from {', '.join(TRANSFORM_ON)} or all")
    paths = {k: os.path.join(out_dir, f"sweep.{k}") for k in ("md", "json", "html")}
    os.makedirs(out_dir, exist_ok=True)
    with Outputs() as outs:
        outs.protect_model(model, "the input model")
        outs.protect(calib, "the calibration data")
        outs.protect(val, "the validation data (--val)")
        outs.protect(labels, "--labels")
        for k, p in paths.items():
            outs.add(p, f"--out ({os.path.basename(p)})")
        outs.validate()
        report = run(model, calib, val, config, formats=_split((sweep_formats,)), schemes=_split((schemes,)),
                     calibrations=_split((calibrations,)), labels=labels, target=targets[0] if targets else None,
                     tune=do_tune, max_fallback=max_fallback, samples=samples,
                     progress=progress_for(sys.stderr, quiet), transforms=transforms)
        outs.write_text(paths["md"], report.to_markdown())
        outs.write_text(paths["json"], report.to_json())
        outs.write_text(paths["html"], render(report))
        outs.commit()
    if not quiet:
        click.echo(report.to_markdown().rstrip())
        if verbose:  # the markdown shortens the sensitivity table to 20 layers and leaves times out
            if report.sensitivity is not None and len(report.sensitivity.layers) > 20:
                click.echo(report.sensitivity.summary(limit=len(report.sensitivity.layers)))
            click.echo("time per configuration: " + ", ".join(f"{r.label} {r.seconds:.2f} s" for r in report.rows))
            click.echo("time per phase: " + ", ".join(f"{k} {v:.2f} s" for k, v in report.timings.items()))
        click.echo("wrote " + ", ".join(paths.values()))


@cli.command()
@verbosity_options
@handle_errors
def formats(quiet, verbose):
    """List the formats with their bits, bias, range and ONNX type (--quiet: the names only; --verbose: also
    what each is for and what runs it)."""
    from onnxfp8.formats import FORMATS

    if quiet:
        for name in FORMATS:
            click.echo(name)
        return
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
    if verbose:
        from onnxfp8.config import AUTO_CANDIDATES

        for f in FORMATS.values():
            runs = ("emulated in float ops (no runtime executes it as 8-bit kernels)" if f.emulated else
                    "in -f auto's default candidates" if f.name in AUTO_CANDIDATES else "")
            click.echo(f"{f.name}: {f.description}" + (f"; {runs}" if runs else ""))


@cli.command()
@click.option("--show", "show", metavar="NAME", help="Print one recipe's file (settings and where they come from).")
@verbosity_options
@handle_errors
def recipes(show, quiet, verbose):
    """List the built-in recipes (use them with quantize --recipe NAME; --quiet: the names only; --verbose:
    also each recipe's settings)."""
    from onnxfp8.recipes import builtin_recipes, load_recipe, resolve_recipe

    if show:
        with open(resolve_recipe(show), encoding="utf-8") as f:
            click.echo(f.read().rstrip())
        return
    for name, info in builtin_recipes().items():
        click.echo(name if quiet else f"{name:10} {info.summary}")
        if verbose:
            settings = load_recipe(info.path)
            click.echo("           " + ", ".join(f"{k} = {v!r}" for k, v in settings.items()))


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--target", type=click.Choice(["tensorrt"]), default="tensorrt", show_default=True,
              help="The runtime whose Q/DQ fusion rules to check.")
@click.option("--json", "json_path", type=click.Path(), help="Write the findings (JSON) here.")
@click.option("--strict", is_flag=True, help="Warnings fail too (exit 1).")
@verbosity_options
@handle_errors
def lint(model, target, json_path, strict, quiet, verbose):
    """Report Q/DQ placements in MODEL that TARGET cannot fuse into FP8/INT8 kernels (exit 1 when found;
    --quiet: only the findings that fail, nothing when it passes; --verbose: also the Q/DQ nodes per type)."""
    from onnxfp8.outputs import Outputs
    from onnxfp8.verify.lint import lint_model

    with Outputs() as outs:
        outs.protect_model(model, "the linted model")
        outs.add(json_path, "--json")
        outs.validate()
        report = lint_model(model, target=target)
        if json_path:
            outs.write_text(json_path, report.to_json())
        outs.commit()
    code = report.exit_code(strict)
    if quiet:
        failing = [f for f in report.findings if f.severity == "error" or strict]
        if failing:
            click.echo("\n".join(f.line() for f in failing), err=True)
    else:
        click.echo(report.summary(verbose=verbose))
    sys.exit(code)


@cli.command()
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--out", "-o", default="examples", show_default=True, type=click.Path(),
              help="Folder for NAME.onnx and data/NAME/{calib,val}/.")
@click.option("--epochs", type=int, default=12, show_default=True, help="Training epochs of digits.")
@click.option("--samples", type=int, default=64, show_default=True,
              help="Calibration and validation samples of the seeded examples (cnn, mlp, transformer).")
@verbosity_options
@handle_errors
def example(names, out, epochs, samples, quiet, verbose):
    """Build bundled example models with their calibration and validation data (made in code, nothing
    downloaded). NAME: digits (default: a BatchNorm CNN trained here in seconds on real handwritten digits,
    validation data with labels), cnn, mlp, transformer (seeded weights, untrained)."""
    import time

    from onnxfp8.errors import ConfigError
    from onnxfp8.examples import NAMES, write_example

    names = names or ("digits",)
    for name in names:
        if name not in NAMES:
            raise ConfigError(f"unknown example '{name}' (known: {', '.join(NAMES)})")
    if epochs < 1 or samples < 1:
        raise ConfigError(f"--{'epochs' if epochs < 1 else 'samples'} must be at least 1")
    for name in names:
        start = time.perf_counter()
        info = write_example(name, out, epochs=epochs, calib=samples, val=samples)
        if quiet:
            continue
        what = f"trained {epochs} epochs, FP32 accuracy {100 * info['accuracy']:.2f}% on the held-out images" \
            if "accuracy" in info else "seeded weights"
        click.echo(f"wrote {info['model']} ({what}; {time.perf_counter() - start:.1f} s)")
        click.echo(f"  calibration data {info['calib']} ({info['calib_samples']} samples), validation data "
                   f"{info['val']} ({info['val_samples']} samples{' with labels' if info['labels'] else ''})")
        if verbose:
            click.echo(f"  inputs: {', '.join(_describe_inputs(str(info['model'])))}")
        click.echo(f"next: onnxfp8 quantize {info['model']} --calib {info['calib']} --check --val {info['val']}")


def _describe_inputs(path: str):
    import onnx

    m = onnx.load(path, load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    for i in m.graph.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        yield f"{i.name} {onnx.TensorProto.DataType.Name(t.elem_type).lower()} {dims}"


def main() -> None:
    cli(prog_name="onnxfp8")


if __name__ == "__main__":
    main()
