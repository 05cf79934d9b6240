"""The user's own PyTorch model: a TorchScript file (.pt), an ExportedProgram (.pt2) or
`pkg.module:factory` (a callable returning an nn.Module), with --input-shape for the example input.

Files are rebuilt as nn.Modules with real Conv/Linear/BatchNorm layers (models.graph_module), so
pruning and quantization treat them like any other torch model. The model has no data of its own:
models.data supplies calibration and evaluation data (user files, a held-out split or seeded
synthetic inputs).
"""
from __future__ import annotations

import copy
import importlib
import inspect
import logging
import re
import sys
import traceback
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sqexport.contracts.errors import ConfigError, Interruption, ModelLoadError, SqexportError
from sqexport.contracts.files import require_regular
from sqexport.contracts.shapes import parse_input_shapes
from sqexport.models.spec import ModelSpec

__all__ = ["FACTORY_RE", "MODEL_SUFFIXES", "is_user_model", "parse_input_shapes", "load_user_model",
           "load_module_model"]

FACTORY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
MODEL_SUFFIXES = (".pt", ".pth", ".pt2")
DEFAULT_INPUT = "input"
SUPPORTED = ("TorchScript (.pt, torch.jit.save), ExportedProgram (.pt2, torch.export.save) or "
             "pkg.module:factory returning an nn.Module")
Shapes = dict  # input name (None = the only input) -> shape tuple


def is_user_model(ref: str) -> bool:
    return bool(FACTORY_RE.match(ref)) or Path(ref).suffix in MODEL_SUFFIXES


# ---------------------------------------------------------------- loading the module

def _import_factory(ref: str) -> nn.Module:
    module_name, _, attr = ref.partition(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: the current folder is importable
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ModelLoadError(f"cannot import '{module_name}' for {ref}: {exc} (run from the folder that "
                             "holds the package, or put it on PYTHONPATH)") from None
    except _PASS_THROUGH:
        raise
    except BaseException as exc:  # anything the user's module does while importing, sys.exit() included
        raise ModelLoadError(f"importing '{module_name}' for {ref} {_ended(exc)}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ModelLoadError(f"module '{module_name}' has no attribute '{attr}'")
    if not callable(factory):
        raise ModelLoadError(f"{ref} is a {type(factory).__name__}, not a callable returning an nn.Module")
    try:
        model = factory()
    except _PASS_THROUGH:
        raise
    except BaseException as exc:  # the factory cannot end sqexport (sys.exit, builtins:exit) or set its exit code
        raise ModelLoadError(f"{ref}() {_ended(exc)}") from None
    if not isinstance(model, (nn.Module, torch.export.ExportedProgram)):
        raise ModelLoadError(f"{ref}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


# A signal (toolchain.signals) or Ctrl-C during the user's code is still an interruption of sqexport.
_PASS_THROUGH = (KeyboardInterrupt, Interruption, SqexportError)


def _ended(exc: BaseException, needs: str = "a factory that returns a model") -> str:
    """How the user's code ended, for a one-line message: `called sys.exit(4)`, `failed: ...`."""
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r}); sqexport needs {needs}"
    return f"failed: {type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class _Lines(logging.Handler):
    """Keeps the last line of each record (torch logs a whole traceback as one warning)."""

    def __init__(self, lines: list[str]):
        super().__init__(logging.DEBUG)
        self.lines = lines

    def emit(self, record):
        text = record.getMessage() + ("\n" + "".join(traceback.format_exception(*record.exc_info))
                                      if record.exc_info else "")
        last = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if last:
            self.lines.append(last[-1])


# loaders and the export tracer: both log whole tracebacks (or guard dumps) before raising
_TORCH_LOADERS = ("torch.export", "torch._export", "torch.jit", "torch.serialization", "torch._dynamo",
                  "torch.fx.experimental.symbolic_shapes")


@contextmanager
def _torch_quiet():
    """torch.export.load logs a 13-line traceback (and torch warns) before raising on a damaged
    file, and torch.export / the TorchScript converter log guard dumps on capture failures: keep
    that off the console (the one-line error says why) and hand back the last line of
    each record its loaders logged."""
    lines: list[str] = []
    handler = _Lines(lines)
    loggers = [logging.getLogger(name) for name in _TORCH_LOADERS]
    saved = [(lg.handlers[:], lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [handler], False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield lines
    finally:
        for lg, (handlers, propagate) in zip(loggers, saved):
            lg.handlers, lg.propagate = handlers, propagate


def _load_file(path: Path):
    if not path.is_file():
        require_regular(path, "model file", ModelLoadError)  # a FIFO or device says so; a missing file:
        raise ModelLoadError(f"no such model file: {path}")
    if path.suffix == ".pt2":
        with _torch_quiet() as logged:
            try:
                return torch.export.load(str(path))
            except Exception as exc:
                reason = (logged[-1] if logged else _first_line(exc)).split(". ")[0]
                raise ModelLoadError(f"{path} is not an ExportedProgram (torch.export.save) file: "
                                     f"{reason}; supported: {SUPPORTED}") from None
    try:
        with _torch_quiet():
            return torch.jit.load(str(path), map_location="cpu")
    except Exception:
        raise ModelLoadError(f"{path} is not a TorchScript file (a state_dict or a pickled module holds no "
                             f"architecture sqexport can run); supported: {SUPPORTED}") from None


# ---------------------------------------------------------------- inputs

def _forward_names(model: nn.Module, given: Shapes | None = None) -> list[str] | None:
    """Required positional parameters of forward(), and those with a default that `given` (from
    --input-shape) names (a Hugging Face model's `input_ids=None`), in forward()'s order; None when
    it takes *args."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    named = set(given or ())
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            and (p.default is p.empty or p.name in named)]


def _script_names(ts) -> list[str]:
    return [re.sub(r"\.\d+$", "", i.debugName()) for i in list(ts.graph.inputs())[1:]]


def _program_inputs(ep) -> dict[str, tuple[tuple, torch.dtype]]:
    """User inputs of an ExportedProgram with their recorded shapes (None = symbolic) and dtypes."""
    out = {}
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in ep.graph_signature.user_inputs:
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise ModelLoadError(f"the exported program's input '{node.name}' is not a tensor")
            shape = tuple(d if isinstance(d, int) else None for d in val.shape)
            out[node.name] = (shape, val.dtype)
    return out


def _resolve_shapes(names: list[str] | None, given: Shapes, known: dict | None = None) -> dict[str, tuple]:
    """Input name -> full example shape, from --input-shape and what the model file records."""
    known = known or {}
    if None in given:
        if names is not None and len(names) > 1:
            raise ConfigError(f"the model takes {len(names)} inputs ({', '.join(names)}): "
                              "give --input-shape NAME=shape for each")
        return {(names or [DEFAULT_INPUT])[0]: given[None]}
    names = names if names is not None else (list(given) or [DEFAULT_INPUT])
    unknown = [n for n in given if n not in names]
    if unknown:
        joined = any(ch in n for n in unknown for ch in "=; ")  # several shapes in one value, not joined by commas
        raise ConfigError(f"--input-shape names unknown input(s) {', '.join(unknown)}; "
                          f"the model's inputs: {', '.join(names)}"
                          + ("; give several as NAME=shape,NAME=shape or repeat --input-shape" if joined else ""))
    shapes = {}
    for name in names:
        if name in given:
            shapes[name] = given[name]
        elif name in known and all(d is not None for d in known[name][0][1:]):
            shapes[name] = (known[name][0][0] or 1,) + tuple(known[name][0][1:])
        else:
            raise ConfigError(f"the example input shape of '{name}' is not known: give --input-shape "
                              f"{'' if len(names) == 1 else name + '='}1x3x224x224 (the model's real shape)")
    return shapes


# ---------------------------------------------------------------- building the ModelSpec

def _embedding_rows(model: nn.Module) -> int | None:
    """Rows of the smallest embedding table (nn.Embedding / EmbeddingBag, also inside TorchScript);
    None without one."""
    rows = []
    for m in model.modules():
        kind = m.original_name if isinstance(m, torch.jit.ScriptModule) else type(m).__name__
        weight = getattr(m, "weight", None)
        if kind in ("Embedding", "EmbeddingBag") and isinstance(weight, torch.Tensor) and weight.ndim == 2:
            rows.append(int(weight.shape[0]))
    return min(rows) if rows else None


def _index_inputs(model: nn.Module, shapes: dict[str, tuple]) -> dict[str, torch.dtype]:
    """Inputs the model reads as indices (token or category ids into an embedding table): int64.
    --input-shape carries no dtype, so a model with embedding tables whose float example fails is
    tried with each input, then all of them, as int64 ids (zeros: a valid row of every table); the
    first combination that runs decides, the others stay float. A model that fails every way is
    left float: its own error is reported when the example runs."""
    if _embedding_rows(model) is None:
        return {}
    model.eval()  # probing in train mode would move BatchNorm statistics (the run uses eval mode anyway)

    def runs(ids: tuple[str, ...]) -> bool:
        args = [torch.zeros(s, dtype=torch.int64) if n in ids else torch.rand(s) for n, s in shapes.items()]
        try:
            with torch.no_grad():
                model(*args)
            return True
        except _PASS_THROUGH:
            raise
        except BaseException:  # a failing forward (also sys.exit inside it) is the caller's to report
            return False

    names = list(shapes)
    if runs(()):
        return {}
    for ids in [(n,) for n in names] + ([tuple(names)] if len(names) > 1 else []):
        if runs(ids):
            return {n: torch.int64 for n in ids}
    return {}


def _as_module(obj, shapes: dict[str, tuple], dtypes: dict[str, torch.dtype] | None = None) -> nn.Module:
    """nn.Module with real layers: TorchScript and ExportedProgram are rebuilt (graph_module)."""
    if isinstance(obj, torch.jit.ScriptModule):
        from torch._export.converter import TS2EPConverter

        # a batch of 2 keeps the converter from specializing the batch dimension to 1
        args = tuple(torch.rand((2,) + tuple(s[1:])).to((dtypes or {}).get(n, torch.float32)) for n, s in shapes.items())
        try:
            with _torch_quiet():  # the converter warns about unused BN counters
                try:
                    obj = TS2EPConverter(obj, args).convert()
                except Exception:  # sizes the traced graph computes as tensors ("same" padding)
                    obj = _batch_dynamic_converter(TS2EPConverter)(obj, args).convert()
        except Exception as exc:
            hint = ""
            from sqexport.models.graph_module import clashing_names

            clash = clashing_names(obj)
            if clash:  # each such name fails in its own way inside torch's converter
                hint = (f"; torch's TorchScript converter cannot keep top-level attribute(s) named like a GraphModule's "
                        f"own ({', '.join(clash)}): rename them, or give the model as a pkg.module:factory or a .pt2 "
                        "(torch.export.save)")
            raise ModelLoadError(f"cannot convert the TorchScript model (with input shape(s) "
                                 f"{_fmt_shapes(shapes)}): {type(exc).__name__}: {_first_line(exc)}{hint}") from None
    if isinstance(obj, torch.export.ExportedProgram):
        return _rebuilt(obj, shapes)
    return obj.eval()


def _batch_dynamic_converter(base):
    """torch's TorchScript converter retraces with every dimension dynamic; a traced graph that
    computes padding from H and W as tensors ("same" padding) then needs data-dependent guards.
    This variant keeps only the batch dimension dynamic, the rest at the example's sizes."""

    class BatchDynamic(base):
        def retrace_as_exported_program(self, gm, name_to_constant):
            from torch.export import Dim

            original = torch.export._trace._export

            def export_batch_dynamic(mod, args, dynamic_shapes=None, **kwargs):
                shapes = tuple([Dim.AUTO] + [Dim.STATIC] * (a.dim() - 1) if isinstance(a, torch.Tensor) else None
                               for a in args)
                return original(mod, args, dynamic_shapes=shapes, **kwargs)
            torch.export._trace._export = export_batch_dynamic
            try:
                return super().retrace_as_exported_program(gm, name_to_constant)
            finally:
                torch.export._trace._export = original
    return BatchDynamic


def _rebuilt(ep: torch.export.ExportedProgram, shapes: dict[str, tuple]) -> torch.fx.GraphModule:
    from sqexport.models.graph_module import module_from_program

    gm = module_from_program(ep)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, name in zip(placeholders, shapes):
        node.target = name  # the input names sqexport reports and feeds by keyword
    gm.recompile()
    return gm


def normalized_factory_model(model: nn.Module, shapes: dict[str, tuple],
                             dtypes: dict[str, torch.dtype]) -> tuple[nn.Module, dict]:
    """The factory's model rebuilt from its torch.export program, so layers are recognized by what
    they compute: a BatchNorm subclass that applies its activation inside becomes a BatchNorm2d plus
    that activation (BN folding then sees conv -> bn), a pad + conv wrapper ("same" padding) a pad
    and a Conv2d, and F.conv2d / F.linear calls inside forward real modules. A model torch.export
    cannot capture (data-dependent control flow, say) is kept as written, with the reason."""
    names = list(shapes)
    # a batch of 2 with a dynamic batch dimension: the ONNX export keeps the batch dynamic
    args = tuple(torch.rand((2,) + tuple(s[1:])).to(dtypes.get(n, torch.float32)) for n, s in shapes.items())
    batch = torch.export.Dim("batch", min=1)
    try:
        with _torch_quiet():
            ep = torch.export.export(model.eval(), args, dynamic_shapes=tuple({0: batch} for _ in names))
            rebuilt = _rebuilt(ep, shapes)
            with torch.no_grad():
                expected = _outputs(rebuilt(*args))
                same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(_outputs(model(*args)), expected))
    except Exception as exc:  # any failure to capture: the model as written still works, less covered
        return model.eval(), {"rebuilt": False, "why": f"torch.export could not capture forward(): "
                                                        f"{type(exc).__name__}: {_first_line(exc)[:300]}"}
    if not same:
        return model.eval(), {"rebuilt": False, "why": "the rebuilt graph's outputs differ from the model's"}
    frozen = _trace_freezes_batch(rebuilt, args, expected)
    if frozen:
        return model.eval(), {"rebuilt": False, "why": f"the rebuilt graph's trace {frozen}"}
    return rebuilt, {"rebuilt": True, "why": "rebuilt from torch.export: Conv/Linear/BatchNorm found by the "
                                             "aten op they call, whatever the module class"}


def _trace_freezes_batch(model: nn.Module, pair: tuple[torch.Tensor, ...], expected: list[torch.Tensor]) -> str | None:
    """Why a trace at batch 1 (what the ONNX export records) fails at batch 2, or None; `expected` is
    `model`'s output on `pair`.

    The ONNX exporter traces; a size the rebuilt graph computes with an aten call the tracer cannot
    follow is recorded as a constant, and the ONNX graph then runs at the traced batch size only."""
    try:
        with _torch_quiet(), torch.no_grad():
            traced = torch.jit.trace(model, tuple(a[:1] for a in pair), check_trace=False, strict=False)
            ok = all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(expected, _outputs(traced(*pair))))
    except Exception as exc:
        return f"fails at another batch size ({type(exc).__name__}: {_first_line(exc)[:200]})"
    return None if ok else "computes other outputs at another batch size than the traced one"


def _fmt_shapes(shapes: dict[str, tuple]) -> str:
    return ", ".join(f"{n}={'x'.join(map(str, s))}" for n, s in shapes.items())


def _outputs(out) -> list[torch.Tensor]:
    if isinstance(out, Mapping):  # a Hugging Face ModelOutput or a dict: its tensors in order
        out = tuple(out.values())
    if isinstance(out, torch.Tensor):
        outs = [out]
    elif isinstance(out, (tuple, list)) and out and all(isinstance(t, torch.Tensor) for t in out):
        outs = list(out)
    else:
        raise ModelLoadError(f"the model returns a {type(out).__name__}; sqexport needs a tensor or a tuple of tensors")
    if any(t.ndim == 0 for t in outs):  # nothing to batch, compare per sample or export with a batch axis
        raise ModelLoadError("the model returns a scalar; sqexport needs outputs with a batch dimension first "
                             "(shape (N, ...))")
    return outs


def _run(model: nn.Module, feed: dict[str, np.ndarray]) -> list[torch.Tensor]:
    with torch.no_grad():
        return _outputs(model(**{k: torch.from_numpy(v) for k, v in feed.items()}))


def _check_batches(model: nn.Module, example: dict[str, np.ndarray]) -> list[torch.Tensor]:
    """Run the example, and batch 2: the ONNX export makes the batch dimension dynamic."""
    try:
        outs = _run(model, example)
    except _PASS_THROUGH:
        raise
    except BaseException as exc:
        raise ModelLoadError(f"the model fails on the example input {_fmt_shapes({k: v.shape for k, v in example.items()})}: "
                             f"{_ended(exc, 'a forward that returns outputs').removeprefix('failed: ')}") from None
    pair = {k: np.concatenate([v[:1], v[:1]]) for k, v in example.items()}
    try:
        _run(model, pair)
    except _PASS_THROUGH:
        raise
    except BaseException as exc:
        raise ModelLoadError(f"the model runs at batch size {len(next(iter(example.values())))} only "
                             f"({type(exc).__name__}: {_first_line(exc)}); sqexport needs a dynamic batch "
                             "dimension (torch.export: dynamic_shapes={'x': {0: Dim('batch')}})") from None
    return outs


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def _flatten_first(outputs: list[np.ndarray], batch: dict) -> np.ndarray:
    out = outputs[0]
    return out.reshape(len(out), -1)


def _logits(outputs: list[np.ndarray], batch: dict) -> np.ndarray:
    return outputs[0]


def load_user_model(ref: str, input_shapes: Shapes | None = None) -> ModelSpec:
    """Load a .pt / .pt2 / pkg.module:factory model; its spec has no data yet (models.data adds it)."""
    given = input_shapes or {}
    factory = bool(FACTORY_RE.match(ref)) and not Path(ref).exists()
    obj = _import_factory(ref) if factory else _load_file(Path(ref))
    known, dtypes = {}, {}
    if isinstance(obj, torch.export.ExportedProgram):
        known = _program_inputs(obj)
        names = list(known)
        dtypes = {n: d for n, (_, d) in known.items()}
    elif isinstance(obj, torch.jit.ScriptModule):
        names = _script_names(obj)
    else:
        names = _forward_names(obj, given)
    shapes = _resolve_shapes(names, given, known)
    precision = None
    if not isinstance(obj, (torch.export.ExportedProgram, torch.jit.ScriptModule)):
        obj, precision = _as_float32(obj)
    if not isinstance(obj, torch.export.ExportedProgram):
        dtypes = _index_inputs(obj, shapes)
    model = _as_module(obj, shapes, dtypes)
    capture = None
    if factory and not isinstance(obj, torch.export.ExportedProgram):
        model, capture = normalized_factory_model(model, shapes, dtypes)
    example = _random_example(shapes, dtypes)
    kind = "factory" if factory else ("ExportedProgram" if Path(ref).suffix == ".pt2" else "TorchScript")
    return _user_spec(model, ref if factory else Path(ref).stem, example, kind, ref, capture, precision)


def load_module_model(module: nn.Module, input_shapes: Shapes | None = None, example_inputs=None) -> ModelSpec:
    """A torch.nn.Module object handed to the Python API, checked and captured as a factory's
    model is. Its example input comes from `input_shapes` (as --input-shape gives them) or from
    `example_inputs` (a tensor, a tuple of tensors in forward()'s order, or a dict by name). The run
    works on a copy: the caller's module keeps its weights and its train/eval mode."""
    ref = f"{type(module).__module__}.{type(module).__qualname__}"
    names = _forward_names(module, input_shapes)
    if example_inputs is not None and input_shapes:
        raise ConfigError("give input_shape or example_inputs for the nn.Module, not both")
    if example_inputs is not None:
        example = _named_example(example_inputs, names)
        shapes = {n: tuple(v.shape) for n, v in example.items()}
        dtypes = {n: torch.from_numpy(v).dtype for n, v in example.items()}
    elif input_shapes:
        shapes, dtypes, example = _resolve_shapes(names, input_shapes), None, None
    else:
        raise ConfigError(f"an nn.Module ({type(module).__name__}) needs an example input: pass "
                          "input_shape=(1, 3, 224, 224) (batch first) or example_inputs=<tensor or tuple of tensors>")
    try:
        own = copy.deepcopy(module)
    except Exception as exc:  # a module holding an uncopyable object (a lock, an open file)
        raise ModelLoadError(f"cannot copy the {type(module).__name__} module ({type(exc).__name__}: "
                             f"{_first_line(exc)}); sqexport runs on a copy so the caller's module stays "
                             "unchanged") from None
    own, precision = _as_float32(own)
    if dtypes is None:  # found on the copy: probing runs forward, the caller's module stays untouched
        dtypes = _index_inputs(own, shapes)
    if example is not None:  # a half-precision example for a half-precision module: float32 as the model now is
        example = {n: v.astype(np.float32) if v.dtype == np.float16 else v for n, v in example.items()}
        dtypes = {n: torch.from_numpy(v).dtype for n, v in example.items()}
    model, capture = normalized_factory_model(own, shapes, dtypes)
    return _user_spec(model, type(module).__name__, example if example is not None else _random_example(shapes, dtypes),
                      "nn.Module", ref, capture, precision)


def _named_example(example_inputs, names: list[str] | None) -> dict[str, np.ndarray]:
    """example_inputs as {input name: numpy array}, named by forward()'s parameters."""
    if isinstance(example_inputs, dict):
        unknown = [str(k) for k in example_inputs if names is not None and k not in names]
        if unknown:
            raise ConfigError(f"example_inputs names unknown input(s) {', '.join(unknown)}; "
                              f"forward() takes: {', '.join(names)}")
        missing = [n for n in names or () if n not in example_inputs]
        if missing:
            raise ConfigError(f"example_inputs lacks input(s) {', '.join(missing)} of forward()")
        # forward()'s order: the capture passes the inputs positionally
        items = [(n, example_inputs[n]) for n in names] if names is not None else list(example_inputs.items())
    else:
        values = list(example_inputs) if isinstance(example_inputs, (tuple, list)) else [example_inputs]
        if names is not None and len(values) != len(names):
            raise ConfigError(f"example_inputs holds {len(values)} tensor(s); forward() takes {len(names)} "
                              f"({', '.join(names) or 'none'})")
        if names is None:
            names = [DEFAULT_INPUT] if len(values) == 1 else [f"{DEFAULT_INPUT}_{i}" for i in range(len(values))]
        items = list(zip(names, values))
    example = {}
    for name, value in items:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        if not isinstance(value, np.ndarray):
            raise ConfigError(f"example_inputs['{name}'] is a {type(value).__name__}; give torch tensors or numpy arrays")
        if value.ndim == 0 or value.shape[0] == 0:
            raise ConfigError(f"example_inputs['{name}'] has shape {tuple(value.shape)}; sqexport needs the batch "
                              "dimension first, with at least one sample")
        example[name] = np.array(value, copy=True)  # the caller's tensor is not shared with the run
    return example


def _random_example(shapes: dict[str, tuple], dtypes: dict[str, torch.dtype]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)  # example values only matter for tracing; fixed for reproducibility
    return {n: rng.random(s, dtype=np.float32).astype(_np_dtype(dtypes.get(n, torch.float32)))
            for n, s in shapes.items()}


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _as_float32(model: nn.Module) -> tuple[nn.Module, dict | None]:
    """A model held in float16 / bfloat16 (a half-precision checkpoint) in float32, and the
    report's record of it: calibration, pruning and int8 scales are computed in FP32, and every
    float16 / bfloat16 value is exact in float32, so the weights are the user's own."""
    tensors = list(model.parameters()) + list(model.buffers())
    low = sorted({str(t.dtype).removeprefix("torch.") for t in tensors if t.dtype in _HALF_DTYPES})
    if not low:
        return model, None
    return model.float(), {"from": low, "to": "float32",
                           "why": "the model's weights were converted exactly to float32, the precision sqexport "
                                  "calibrates and quantizes in; baseline.onnx is this float32 model"}


def _user_spec(model: nn.Module, name: str, example: dict[str, np.ndarray], kind: str, ref: str,
               capture: dict | None, precision: dict | None = None) -> ModelSpec:
    """The spec of a user model (no data yet), after checking it runs on its example at two batch sizes."""
    shapes = {n: tuple(v.shape) for n, v in example.items()}
    if not any(p.numel() for p in model.parameters()):
        raise ModelLoadError(f"{ref} has no parameters (weights): there is nothing to prune or quantize")
    outs = _check_batches(model, example)
    output_names = ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))]
    classifier = outs[0].ndim == 2
    return ModelSpec(
        name=name,
        model=model,
        task="image-classification" if classifier else "feature-extraction",
        input_names=list(shapes),
        output_names=output_names,
        example_inputs=example,
        calib_batches=[],
        eval_batches=[],
        dynamic_axes={**{n: {0: "batch"} for n in shapes}, **{n: {0: "batch"} for n in output_names}},
        postprocess=_logits if classifier else _flatten_first,
        description=f"user model ({kind}), input {_fmt_shapes(shapes)}, "
                    + (f"{outs[0].shape[1]} classes" if classifier else f"output {tuple(outs[0].shape[1:])}"),
        source={"kind": kind, "ref": ref, "input_shapes": {n: list(s) for n, s in shapes.items()},
                **({"graph_capture": capture} if capture else {}),
                **({"precision": precision} if precision else {}),
                "task_from": "2-D output: classification (top-1)" if classifier
                else "non-2-D output: cosine of the flattened output vs FP32"},
    )
