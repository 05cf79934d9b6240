"""Click commands; thin: parse, build a Recipe, call the library, map errors to exit codes."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import click

from sqexport.contracts.errors import ConfigError, SqexportError, first_line
from sqexport.contracts.targets import bundle_target_names, target_names
from sqexport.contracts.tasks import hf_task_names
from sqexport.contracts.units import format_value
from sqexport.toolchain import signals
from sqexport.toolchain.settings import SETTINGS, check_setting

__all__ = ["main", "cli", "run_export_job", "sweep_jobs"]


class ToolError(click.ClickException):
    """A domain error shown as one line; exit 2 (bad input) unless the error says otherwise."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(_one_line(message))
        self.exit_code = exit_code


MAX_MESSAGE = 2000  # characters; a message quoting hostile input (a huge value) is cut here


def _one_line(message: str) -> str:
    """The contract is one line: a multi-line library message is joined, and cut if enormous."""
    line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return line if len(line) <= MAX_MESSAGE else line[:MAX_MESSAGE] + " ..."


def _interrupted_message(signum) -> str:
    return f"interrupted by {signals.Interrupted(signum)}; unfinished output removed"


class DefaultGroup(click.Group):
    """`sqexport MODEL ...` means `sqexport export MODEL ...`; every error is one line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click's standalone mode prints usage errors as four lines (usage, hint, blank, error):
        here every ClickException is one `Error: ...` line with its exit code."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo("Error: aborted", err=True)
            sys.exit(1)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `sqexport`: the help text, as click does
            click.echo(exc.ctx.get_help() if exc.ctx is not None else exc.format_message(), err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            message = _one_line(exc.format_message())
            if isinstance(exc, click.UsageError) and exc.ctx is not None:
                message += f" (see '{exc.ctx.command_path} --help')"
            click.echo(f"Error: {message}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["export", *args]
        return super().parse_args(ctx, args)


def _guard(fn, *args, **kwargs):
    """Run library code; domain errors become one-line messages with the right exit code."""
    try:
        return fn(*args, **kwargs)
    except SqexportError as exc:
        if signals.received():  # e.g. a library turned the interrupt into its own error
            raise ToolError(_interrupted_message(signals.received()), 128 + signals.received()) from None
        raise ToolError(str(exc), exc.exit_code) from None
    except signals.Interrupted as exc:
        raise ToolError(_interrupted_message(exc.signum), exc.exit_code) from None
    except KeyboardInterrupt:  # in-process callers (tests) that did not install the handlers
        raise ToolError(_interrupted_message(2), 130) from None
    except MemoryError:  # an input too large for this machine (a model, data, a shape)
        raise ToolError("out of memory: the model or its data is too large for this machine") from None
    except SystemExit as exc:  # the user's model code (a forward, a hook) cannot set sqexport's exit code
        raise ToolError(f"the model's code called sys.exit({exc.code!r}); sqexport stopped") from None
    except (RecursionError, GeneratorExit) as exc:
        raise ToolError(f"the input is nested too deeply or recursive ({type(exc).__name__})") from None
    except BaseException as exc:  # a BaseException subclass from the user's code
        if isinstance(exc, Exception):
            raise  # a bug: main() reports it as an internal error
        raise ToolError(f"the model's code raised {type(exc).__name__}: {first_line(exc)}") from None


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sqexport")
def cli():
    """sqexport: prune, quantize (int8 QDQ), export to ONNX and verify on onnxruntime.

    `sqexport MODEL [options]` is short for `sqexport export MODEL [options]`.
    """
    from sqexport.toolchain.quiet import quiet_libraries

    quiet_libraries()  # before any command imports onnxruntime


def _names(kind: str) -> list[str]:
    from sqexport.toolchain.builtin_methods import names

    return names(kind)


def _methods(kind: str) -> list[str]:
    return _names(kind) + ["none"]


class _MethodChoice(click.Choice):
    """The registry's method names, looked up when first needed: the registry imports torch, which
    takes seconds, and must not run at import time, before main() installs the signal handlers."""

    def __init__(self, kind: str, with_none: bool = True, extra: tuple[str, ...] = ()):
        self.kind, self.with_none, self.extra, self.case_sensitive = kind, with_none, extra, True

    @property
    def choices(self) -> tuple[str, ...]:
        return self.extra + tuple(_methods(self.kind) if self.with_none else _names(self.kind))


class _VariantChoice(click.Choice):
    """prune.sensitivity's variants, read from its module when first needed (it imports torch)."""

    def __init__(self):
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        from sqexport.toolchain.pruning.sensitivity_stage import SENSITIVITY_VARIANTS

        return SENSITIVITY_VARIANTS


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None)


class SettingType(click.ParamType):
    """A flag checked by toolchain.settings, so it has the same type and limits as the recipe key."""

    def __init__(self, setting: str):
        self.setting = setting
        self.name = setting

    def convert(self, value, param, ctx):
        kind = SETTINGS[self.setting].kind
        if isinstance(value, str):
            try:
                value = kind(value.strip())
            except ValueError:
                self.fail(f"must be {'an integer' if kind is int else 'a number'}, got {value!r}", param, ctx)
        try:
            return check_setting(self.setting, value, "")
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)

    def get_metavar(self, param, ctx=None):
        return "INTEGER" if SETTINGS[self.setting].kind is int else "FLOAT"


class InputPath(click.Path):
    """A path sqexport reads. When it exists it must be a regular file (or, where folders are
    accepted, a folder): a FIFO would block the run forever and a device stream without end. The
    same rule holds where the library opens it (contracts.files)."""

    def __init__(self, dir_okay: bool = True):
        super().__init__(dir_okay=dir_okay)

    def convert(self, value, param, ctx):
        import stat

        from sqexport.contracts.files import file_kind

        value = super().convert(value, param, ctx)
        try:
            mode = os.stat(value).st_mode
        except (OSError, ValueError):
            return value  # missing: the command says so in its own words
        if not (stat.S_ISREG(mode) or (self.dir_okay and stat.S_ISDIR(mode))):
            self.fail(f"{os.fsdecode(value)} is {file_kind(mode)}; sqexport reads regular files"
                      + (" and folders" if self.dir_okay else "") + " only", param, ctx)
        return value


def _validate_positive(ctx, param, value):
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"must be a finite number > 0, got {value}")
    return value


@cli.command("export")
@click.argument("model")
@click.option("--target", default="cpu", show_default=True, type=click.Choice(target_names()),
              help="Deployment target profile; mobile adds model.ort, NNAPI/CoreML coverage, ARM64 checks "
                   "(after `make arm64`) and <name>-mobile.zip.")
@click.option("--prune", default=None, type=_MethodChoice("prune"),
              help="Pruning method (`sqexport methods`) [magnitude; none for transformers, where "
                   "unstructured zeros without recovery cost fidelity and buy only size]. sensitivity "
                   "defaults to PFP (whole channels: real CPU speed on CNNs); --variant sipp-* for zeros.")
@click.option("--sparsity", default=None, type=SettingType("sparsity"),
              help="Fraction of prunable weights removed (magnitude, sensitivity), or of channels/heads/neurons "
                   "(structured); pqi picks its own sparsity (SAP rounds). [magnitude and structured: the largest "
                   "amount up to 0.5 whose pruned FP32 model keeps within 25% of the accuracy gate; others: 0.5]")
@click.option("--nm", default="2:4", show_default=True, help="N:M pattern for --prune nm.")
@click.option("--variant", default=None, type=_VariantChoice(),
              help="For --prune sensitivity: pfp removes whole channels (real CPU speed; the default for "
                   "CNNs), sipp-* zero single weights (size only) [pfp].")
@click.option("--rank-energy", type=SettingType("rank_energy"), default=None,
              help="--prune lowrank: keep the smallest rank holding this fraction of the squared "
                   "singular values, rounded up to a multiple of 8 [0.6].")
@click.option("--lowrank-eps", type=SettingType("lowrank_eps"), default=None,
              help="--prune lowrank: H-matrix Linears with relative Frobenius error <= EPS [off: plain SVD].")
@click.option("--quant", default="int8", show_default=True, type=_MethodChoice("quantize"),
              help="int8 = static QDQ (per-channel symmetric int8 weights, calibrated activations).")
@click.option("--observer", default=None, type=_MethodChoice("observer", with_none=False, extra=("auto",)),
              help="Activation range observer for static int8 [auto: min-max, or the 99.99th percentile "
                   "where that clearly keeps the calibration outputs closer to FP32].")
@click.option("--task", default=None, type=click.Choice(hf_task_names()),
              help="Override the task detected from a Hugging Face config.")
@click.option("--trust-remote-code", is_flag=True,
              help="Let a Hugging Face folder whose config names its own Python code (auto_map) run that "
                   "code; without it such a folder is refused (exit 2) and nothing of it runs.")
@click.option("--recover/--no-recover", default=None,
              help="Distillation fine-tuning from the dense model after pruning [off].")
@click.option("--recover-steps", type=click.IntRange(min=1), default=None,
              help="Recovery optimizer steps [as many as --recover-minutes allows].")
@click.option("--recover-minutes", type=float, default=None, callback=_validate_positive,
              help="Recovery wall-clock budget in minutes [10].")
@click.option("--recover-data", type=InputPath(dir_okay=False), default=None,
              help="More data for recovery (same formats as --calib-data); labels are used when present.")
@click.option("--auto", "auto", is_flag=True,
              help="Search structured sparsity x int8 mode x fallback (and recovery) for the fastest model that "
                   "passes the gates; every candidate measured is listed in the report's frontier.")
@click.option("--auto-minutes", type=float, default=None, callback=_validate_positive,
              help="Time budget of --auto's search in minutes [15]; the chosen model's verification comes on top.")
@click.option("--calib-data", type=InputPath(),
              help="Calibration data: text models .txt (one per line) or .jsonl ('text'); tensors .npy/.npz; "
                   "an image folder (one subfolder per class, or flat). User models without it: seeded "
                   "synthetic inputs.")
@click.option("--eval-data", type=InputPath(),
              help="Evaluation data, same formats; .jsonl may carry 'label', .npz 'labels', an image folder "
                   "its class subfolders. User models without it: every 4th sample of --calib-data.")
@click.option("--input-shape", "input_shape", multiple=True, metavar="[NAME=]DxDx...",
              help="Example input of a .pt/.pt2/pkg.module:factory model, batch first: 1x3x224x224 for "
                   "one input, NAME=1x3x224x224 per input (repeatable, or joined by commas); the batch dimension is exported dynamic. "
                   "With --target mobile it also fixes the mobile model's shapes (any model: NAME=1x128 for "
                   "text) [the model's example input, batch 1].")
@click.option("--image-size", default=None, metavar="HxW",
              help="Resize image-folder images to HxW (bilinear) [the model input's H x W].")
@click.option("--mean", default=None, metavar="M1,M2,...",
              help="Normalize image-folder pixels (in [0, 1]): (x - mean) / std, one value per channel or one for all [none].")
@click.option("--std", default=None, metavar="S1,S2,...", help="See --mean; every value > 0 [none].")
@click.option("--views", type=click.IntRange(1, 64), default=None,
              help="Image folders: N deterministic views per image (the whole image, then seeded crops and "
                   "mirrors), so a few photos still give a usable evaluation; a held-out split keeps an "
                   "image's views together [1 for a folder of 64 images or more; up to 8 for fewer, to give ~64 samples].")
@click.option("--max-accuracy-drop", type=SettingType("max_accuracy_drop"), default=None,
              help="Gate, in the metric's unit: points for top-1 [1.0], 1-cosine for embeddings [0.01].")
@click.option("--min-speedup", type=SettingType("min_speedup"), default=None,
              help="Gate: p50 speedup vs baseline.onnx, measured in the same run.")
@click.option("--max-latency-ms", type=SettingType("max_latency_ms"), default=None,
              help="Gate: p50 latency of model.onnx at --threads.")
@click.option("--threads", type=SettingType("threads"), default=None,
              help="onnxruntime intra-op threads for checks [all cores]; latency is also reported at 1.")
@click.option("--recipe", type=InputPath(dir_okay=False), default=None,
              help="YAML recipe with the same settings; flags given on the command line override it.")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Output folder [./sqexport-out/MODEL].")
@click.option("--seed", type=SettingType("seed"), default=0, show_default=True)
@click.option("--ray", "ray", default=None, metavar="local:N|auto|ADDRESS",
              help="With --auto: evaluate the candidates as Ray tasks, timing them only on nodes with the "
                   "resource sqexport-target-TARGET (local:N starts a local cluster; needs sqexport[ray]).")
@click.option("-q", "--quiet", is_flag=True,
              help="No progress and no summary; errors (and a failed gate) are still printed on stderr.")
@click.pass_context
def export_cmd(ctx, model, quiet, **opts):
    """Prune, quantize, export and verify MODEL; write the output folder and report.

    Progress goes to stderr: live bars on a terminal, plain lines otherwise. The summary goes to stdout.
    """
    from sqexport.toolchain.export_run import gate_failure, run_export
    from sqexport.toolchain.progress import make_progress

    def note(progress, text):  # e.g. synthetic data: said loudly, even with --quiet
        if quiet:
            click.secho(f"! {text}", fg="yellow", err=True)
        else:
            progress.message(f"! {text}")

    options = _guard(_typed_options, ctx, opts)
    run = _guard(run_export, model, options, lambda: make_progress(quiet), note)
    if not quiet:
        _print_summary(run.report, run.outdir)
    if not run.report["passed"]:
        raise ToolError(gate_failure(run.report, run.outdir), 1)


def _typed_options(ctx: click.Context, opts: dict):
    """The export options the user typed (a flag left at its default is not given)."""
    from sqexport.toolchain.export_options import option_values

    return option_values({k: v for k, v in opts.items() if _given(ctx, k) and v is not None})


def _print_summary(report: dict, outdir: Path) -> None:
    acc, lat, size = report["accuracy"], report["latency_ms"], report["size_bytes"]
    click.echo(f"{report['model']} -> {outdir}")
    click.echo(f"  accuracy  {acc['metric']}: baseline {format_value(acc['baseline'], acc['unit'])}  "
               f"model {format_value(acc['model'], acc['unit'])}  drop {format_value(acc['drop'], acc['drop_unit'])}"
               + (f"  ({acc['note'].split(':')[0]})" if acc.get("note") else ""))
    if acc.get("evidence") and "coarse estimate" in acc["evidence"]:  # under 100 samples or images
        click.echo(f"  evidence  {acc['evidence']}")
    from sqexport.runtime_check.other_outputs import describe, flagged

    for other in acc.get("other_outputs", []):
        click.echo(f"  {'! ' if flagged(other) else ''}output    {other['name']}: {describe(other)} "
                   "(not gated: the gate reads the first output)")
    click.echo(f"  sparsity  {report['sparsity']['overall']:.3f} of prunable weights")
    cov = (report.get("quantization") or {}).get("coverage")
    if cov:
        click.echo(f"  int8      {cov['int8']} of {cov['weight_layers']} weight layers"
                   + (f" ({len(cov['fp32'])} FP32, reasons in report.md)" if cov["fp32"] else ""))
    confirmed = (report.get("quantization") or {}).get("fallback_confirmation") or {}
    if confirmed.get("added_layers"):
        click.echo(f"  fallback  {confirmed['added_layers']} of the FP32 layers chosen on the evaluation split "
                   "(the prediction from calibration data missed there): the gate is not held out")
    click.echo(f"  size      {size['baseline']:,} B -> {size['model']:,} B ({size['compressed']:,} B zipped)")
    for entry in [lat] + ([lat["at_1_thread"]] if "at_1_thread" in lat else []):
        click.echo(f"  latency   {entry['threads']} thread(s): p50 {entry['baseline']['p50']:.3f} ms -> "
                   f"{entry['model']['p50']:.3f} ms ({entry['speedup']:.2f}x)")
    from sqexport.runtime_check.gates import slower_note

    if slower_note(lat):
        click.secho("  ! model.onnx is slower than baseline.onnx on this CPU (see the report's notes)", fg="yellow")
    _print_checks(report["checks"])


def _print_checks(checks: list[dict]) -> None:
    for c in checks:
        click.echo(f"  gate      {c['name']}: {format_value(c['value'], c['unit'])}, "
                   f"limit {format_value(c['limit'], c['unit'])}: {'ok' if c['passed'] else 'FAILED'}")


def run_export_job(argv, outdir: str) -> tuple[int, str]:
    """One sweep job: `sqexport export ARGV -o OUTDIR --quiet` in this process, through the export
    command itself (same parsing, same pipeline, same bytes); returns (exit code, one line)."""
    try:
        export_cmd.main(args=[*argv, "-o", outdir, "--quiet"], prog_name="sqexport export",
                        standalone_mode=False)
    except click.ClickException as exc:
        return exc.exit_code, _one_line(exc.format_message())
    except click.exceptions.Abort:
        return 130, _interrupted_message(2)
    except signals.Interrupted as exc:
        return exc.exit_code, _interrupted_message(exc.signum)
    except Exception as exc:  # a bug in one job must not end the sweep
        return 3, f"internal error ({type(exc).__name__}: {first_line(exc)})"
    return 0, "passed"


def _job_flags() -> dict:
    """The export options a sweep job may set, keyed by parameter name (the long flag, '_' for '-')."""
    from sqexport.toolchain.sweep_spec import NOT_IN_JOBS, Flag

    flags = {}
    for p in export_cmd.params:
        if isinstance(p, click.Option) and p.name not in NOT_IN_JOBS:
            flags[p.name] = Flag(next(o for o in p.opts if o.startswith("--")),
                                 p.secondary_opts[0] if p.secondary_opts else None,
                                 switch=p.is_flag and not p.secondary_opts, multiple=p.multiple)
    return flags


def _validate_job(argv: list[str], label: str) -> dict:
    """A job's command line checked as `sqexport export` checks it before loading the model;
    returns the options it sets, as parsed (the normalized spec)."""
    if argv[0].startswith("-"):
        raise ConfigError(f"{label}: model {argv[0]!r} looks like an option")
    try:
        ctx = export_cmd.make_context("export", list(argv))
    except click.exceptions.Exit:
        raise ConfigError(f"{label}: --help is not an option of a job") from None
    except click.ClickException as exc:
        raise ConfigError(f"{label}: {_one_line(exc.format_message())}") from None
    from sqexport.toolchain.export_options import (auto_config, build_recipe, image_prep, input_shapes,
                                                   without_recovery)

    try:
        options = _typed_options(ctx, {k: v for k, v in ctx.params.items() if k not in ("model", "quiet")})
        if auto_config(options) is not None:
            options = without_recovery(options)
        build_recipe(options)
        input_shapes(options.input_shape)
        image_prep(options.image_size, options.mean, options.std, options.views, options.seed)
    except SqexportError as exc:
        raise ConfigError(f"{label}: {_one_line(str(exc))}") from None
    return {k: list(v) if isinstance(v, tuple) else v for k, v in ctx.params.items() if _given(ctx, k)}


def _is_path_model(ref: str) -> bool:
    from sqexport.models.zoo import BUILTIN_MODELS

    return ref not in BUILTIN_MODELS and ":" not in ref.split("/")[-1]


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("sqexport")
    except metadata.PackageNotFoundError:
        return "unknown"


def sweep_jobs(path: Path) -> list:
    """The jobs of a sweep file, each checked as `sqexport export` checks its flags (ConfigError)."""
    from sqexport.toolchain.sweep_spec import load_sweep

    return load_sweep(path, _job_flags(), _validate_job, _is_path_model, _version())


def _sweep_line(r: dict) -> str:
    head = f"  {r['name']:<24} {r['status'] + (' (skipped)' if r['skipped'] else ''):<24}"
    if r.get("latency_p50_ms") is None or r.get("metric") is None:
        return f"{head} {r['message']}"
    return (f"{head} {r['metric_name']} {format_value(r['metric'], r.get('metric_unit'))}  "
            f"p50 {r['latency_p50_ms']:.3f} ms  ({r.get('speedup') or 0:.2f}x)")


@cli.command("sweep")
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "root", required=True, type=click.Path(file_okay=False),
              help="ROOT: each job writes ROOT/<name>/ (what `sqexport export ... -o ROOT/<name>` writes); "
                   "sweep.json, sweep.md and sweep-pareto.png go in ROOT.")
@click.option("--workers", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Jobs at a time, each in its own process (1: one after another in this process).")
@click.option("--ray", "ray", default=None, metavar="local:N|auto|ADDRESS",
              help="Run each job as a Ray task: local:N starts a local cluster with N CPUs, auto joins "
                   "the running one, or a cluster address (needs sqexport[ray]).")
@click.option("-q", "--quiet", is_flag=True, help="No progress and no summary; errors still go to stderr.")
def sweep_cmd(sweep_file, root, workers, ray, quiet):
    """Run the export jobs listed in SWEEP_FILE (YAML: `jobs:` with name, model and export options
    by long flag name, `-` as `_`) and report them together. A rerun skips jobs whose folder still
    matches its manifest and job spec.

    Exit code: 0 every job passed; 1 a job failed its gates; 2 bad input (the file, or a job's
    data); 3 a job hit an internal error.
    """
    from sqexport.toolchain.progress import make_progress
    from sqexport.toolchain.sweep import run_sweep

    ray_target = None
    if ray is not None:
        from sqexport.toolchain.ray_cluster import parse_ray_address, require_ray

        if workers != 1:
            raise ToolError("--workers runs processes on this machine; with --ray the cluster's CPUs decide")
        _guard(require_ray)
        ray_target = _guard(parse_ray_address, ray)
    jobs = _guard(sweep_jobs, Path(sweep_file))
    with make_progress(quiet) as progress:
        data = _guard(run_sweep, jobs, Path(root), Path(sweep_file), run_export_job, progress, workers, ray_target)
    if not quiet:
        for r in data["jobs"]:
            click.echo(_sweep_line(r))
        click.echo(f"{data['summary']['passed']}/{data['summary']['jobs']} job(s) passed -> {Path(root) / 'sweep.md'}")
    if data["exit_code"]:
        bad = [r for r in data["jobs"] if not r["passed"]]
        what = "; ".join(f"{r['name']}: {r['message']}" if r["exit_code"] != 1 else f"{r['name']}: gate failed"
                         for r in bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ToolError(f"{len(bad)} of {len(jobs)} job(s) did not pass ({what}); sweep report written to "
                        f"{Path(root) / 'sweep.md'}", data["exit_code"])


@cli.command("check")
@click.argument("model_onnx", type=InputPath(dir_okay=False))
@click.option("--baseline", type=InputPath(dir_okay=False), default=None, help="FP32 reference ONNX.")
@click.option("--eval-data", type=InputPath(), default=None,
              help=".npy/.npz inputs (optional 'labels'), .txt/.jsonl text when a tokenizer sits "
                   "beside MODEL_ONNX (sqexport export writes one), or an image folder shaped by the "
                   "model's input; without it, seeded synthetic inputs.")
@click.option("--image-size", default=None, metavar="HxW",
              help="Resize image-folder images to HxW [the model input's H x W].")
@click.option("--mean", default=None, metavar="M1,M2,...", help="Image-folder normalization (x - mean) / std, one value per channel or one for all [none].")
@click.option("--std", default=None, metavar="S1,S2,...", help="See --mean; every value > 0 [none].")
@click.option("--target", default="cpu", show_default=True, type=click.Choice(target_names()),
              help="mobile also reports which nodes NNAPI and CoreML would take (onnxruntime's usability "
                   "checker), as `export --target mobile` does.")
@click.option("--threads", type=SettingType("threads"), default=None)
@click.option("--max-accuracy-drop", type=SettingType("max_accuracy_drop"), default=None)
@click.option("--min-speedup", type=SettingType("min_speedup"), default=None)
@click.option("--max-latency-ms", type=SettingType("max_latency_ms"), default=None)
@click.option("--arch", type=click.Choice(["arm64"]), default=None,
              help="Also run the file on aarch64 onnxruntime under emulation at three CPU tiers "
                   "(needs `make arm64`); outputs must match this host's and the accuracy gate must hold.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def check_cmd(model_onnx, baseline, eval_data, image_size, mean, std, target, threads, max_accuracy_drop,
              min_speedup, max_latency_ms, arch, as_json):
    """Verify an existing .onnx or .ort model (accuracy vs --baseline, latency, gates)."""
    from sqexport.runtime_check.gates import Gates
    from sqexport.toolchain.check_run import run_check
    from sqexport.toolchain.export_options import image_prep

    gates = Gates(max_accuracy_drop, min_speedup, max_latency_ms)
    prep = _guard(image_prep, image_size, mean, std)
    result = _guard(run_check, Path(model_onnx), Path(baseline) if baseline else None,
                    Path(eval_data) if eval_data else None, prep, threads, gates, arch, target)
    found = "baseline_from" in result
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        acc, lat = result["accuracy"], result["latency_ms"]
        click.echo(f"{model_onnx}: data {result['data']}; baseline {result['baseline'] or 'none'}"
                   + (" (from the output folder)" if found else ""))
        if acc.get("model") is not None:
            click.echo(f"  accuracy  {acc['metric']}: model {format_value(acc['model'], acc['unit'])}"
                       + (f"  baseline {format_value(acc['baseline'], acc['unit'])}"
                          if acc.get("baseline") is not None else ""))
        if acc.get("note"):
            click.echo(f"  note      {acc['note']}")
        click.echo(f"  latency   p50 {lat['model']['p50']:.3f} ms at {lat['threads']} thread(s)"
                   + (f", {lat['speedup']:.2f}x vs baseline" if "speedup" in lat else ""))
        for tier, t in (result.get("arm64") or {}).get("tiers", {}).items():
            click.echo(f"  arm64     {tier:<10} max |diff| vs x86 {t['vs_x86']['max_abs_diff']:.3g} "
                       f"(tolerance {t['vs_x86']['tolerance']:.3g}), {t['accuracy']['metric']} "
                       f"{t['accuracy']['model']:.4f}")
        for note in (result.get("mobile_usability") or {}).get("notes", []):
            click.echo(f"  mobile    {note}")
        if (result.get("host_int8") or {}).get("pairs"):
            click.echo(f"  warning   {result['host_int8']['note']}")
        _print_checks(result["checks"])
    if not result["passed"]:
        raise ToolError("gate failed", 1)


@cli.command("inspect")
@click.argument("model_onnx", type=InputPath(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def inspect_cmd(model_onnx, as_json):
    """Per-weight sparsity, QDQ coverage, dtypes and sizes of an ONNX model."""
    from sqexport.runtime_check.inspect_model import inspect_onnx

    info = _guard(inspect_onnx, Path(model_onnx))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['file']}  opset {info['opset']}  {info['nodes']} nodes")
    click.echo(f"  QuantizeLinear {info['quantize_linear']}  DequantizeLinear {info['dequantize_linear']}  "
               f"quantized compute nodes {info['quantized_compute_nodes']}/{info['compute_nodes']}")
    click.echo(f"  size {info['size_bytes']['raw']:,} B ({info['size_bytes']['compressed']:,} B zipped); "
               f"weights {info['weight_bytes']:,} B, sparsity {info['weight_sparsity']:.3f}")
    click.echo(f"  {'weight':<48} {'op':<7} {'dtype':<7} {'shape':<18} {'sparsity':>8} {'act QDQ':>7}")
    for w in info["weights"]:
        click.echo(f"  {w['name'][:48]:<48} {w['op']:<7} {w['dtype']:<7} {str(w['shape']):<18} "
                   f"{w['sparsity']:>8.3f} {'yes' if w['activation_qdq'] else 'no':>7}")


@cli.command("package")
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--target", type=click.Choice(bundle_target_names()), required=True, help="What to package for.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Zip to write [OUTDIR/<name>-mobile.zip].")
def package_cmd(outdir, target, output):
    """Build <name>-mobile.zip from the output folder of `sqexport MODEL --target mobile`."""
    from sqexport.toolchain.packaging import package_outdir

    info = _guard(package_outdir, Path(outdir), Path(output) if output else None)
    click.echo(f"{info['path']}: {info['bytes']:,} bytes, {len(info['files'])} files ({', '.join(info['files'])})")


@cli.command("bench")
@click.argument("model_or_bundle", type=InputPath())
@click.option("--device", required=True, metavar="local|ssh://user@host[:port]|adb[:serial]",
              help="Where to run: this machine, a host over ssh/scp, or an Android device over adb.")
@click.option("--device-cmd", default=None, metavar="TEMPLATE",
              help="Replace the run command; placeholders {python} {runner} {model} {reference} {dir} "
                   "{threads} {iters}.")
@click.option("--perf-test", type=InputPath(dir_okay=False), default=None,
              help="Push and run this onnxruntime_perf_test binary instead of the Python runner "
                   "(its 'Average inference time cost' line is parsed).")
@click.option("--device-python", default=None, help="Python on the device [local: this one; ssh: python3; "
                                                    "adb: Termux's python3].")
@click.option("--threads", "thread_list", default="1,2", show_default=True, help="Thread counts to time.")
@click.option("--iters", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--max-device-latency-ms", type=float, default=None, callback=_validate_positive,
              help="Gate: p50 on the device (best thread count).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bench_cmd(model_or_bundle, device, device_cmd, perf_test, device_python, thread_list, iters,
              max_device_latency_ms, as_json):
    """Latency of a mobile bundle (or .ort/.onnx) on a device, with the bundled runner."""
    import re

    from sqexport.toolchain.bench import bench

    if not re.fullmatch(r"\d+(,\d+)*", thread_list) or "0" in thread_list.split(","):
        raise ToolError(f"--threads {thread_list}: expected thread counts like 1,2")
    res = _guard(bench, Path(model_or_bundle), device, device_cmd, perf_test, device_python, thread_list, iters,
                 max_device_latency_ms)
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        click.echo(f"{model_or_bundle} on {res['device']} ({res.get('cpu')}, {res.get('machine')}, "
                   f"onnxruntime {res.get('onnxruntime')})")
        for t, v in res["latency_ms"].items():
            click.echo(f"  latency   {t} thread(s): p50 {v['p50']:.3f} ms  p90 {v['p90']:.3f} ms")
        click.echo(f"  model     sha256 {'matches' if res['same_model'] else 'DIFFERS'}; reference: {res['reproduction']}")
        for c in res["checks"]:
            click.echo(f"  gate      {c['name']}: {c['value']:.4g} vs {c['limit']:.4g} {'ok' if c['passed'] else 'FAILED'}")
        if res["report"]:
            click.echo(f"  report    device_latency written to {res['report']}")
        elif res.get("report_note"):
            click.echo(f"  report    {res['report_note']}")
    if not res["passed"]:
        raise ToolError("device gate failed: " + ", ".join(c["name"] for c in res["checks"] if not c["passed"]), 1)


@cli.command("models")
def models_cmd():
    """List the built-in models."""
    from sqexport.models.zoo import BUILTIN_MODELS, DEFAULT_MODEL

    for name, (summary, _) in sorted(BUILTIN_MODELS.items()):
        click.echo(f"{name:<12} {summary}{'  [default]' if name == DEFAULT_MODEL else ''}")


@cli.command("methods")
def methods_cmd():
    """List the pruning, transform and quantization methods and the activation observers."""
    from sqexport.toolchain.builtin_methods import entries
    from sqexport.toolchain.stages import STAGE_KINDS

    none = {"prune": "no pruning", "quantize": "FP32 export of the (pruned) model"}
    for kind in STAGE_KINDS + ("observer",):
        if kind == "observer":
            click.echo(f"{kind:<9} {'auto':<12} the default: min-max, or percentile where it clearly keeps the "
                       "calibration outputs closer to FP32")
        for e in [e for e in entries() if e.kind == kind]:
            click.echo(f"{e.kind:<9} {e.name:<12} {e.summary}")
        if kind in none:
            click.echo(f"{kind:<9} {'none':<12} {none[kind]}")


def _exit_interrupted(signum: int):
    with signals.deferred():
        click.echo(f"Error: {_interrupted_message(signum)}", err=True)
    sys.exit(128 + signum)


def main(argv=None):
    """The console script: signals and unexpected errors become one line and an exit code."""
    signals.install()
    debug = os.environ.get("SQEXPORT_DEBUG")
    try:
        cli.main(args=argv, prog_name="sqexport", standalone_mode=True)
    except SystemExit:
        raise
    except signals.Interrupted as exc:  # outside any _guard (argument parsing, imports)
        _exit_interrupted(exc.signum)
    except Exception as exc:  # a bug, not bad input: keep it to one line unless debugging
        if signals.received():
            _exit_interrupted(signals.received())
        if debug:
            raise
        click.echo(f"Error: internal error ({type(exc).__name__}: {first_line(exc)}); rerun with "
                   "SQEXPORT_DEBUG=1 for a traceback", err=True)
        sys.exit(3)
