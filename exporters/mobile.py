"""What a phone app ships: fixed input shapes, the ORT-format model and its required-operators config.

Shapes are fixed with onnxruntime.tools' own helpers (NNAPI only takes nodes whose shapes are
known). The ORT conversion runs onnxruntime's converter in a temp folder, optimization style
Fixed (optimizations baked in, nothing to replay at load) for ARM (`--target_platform arm` lets
the optimizer keep int8 x int8 QDQ pairs fused), with type reduction for a minimal build.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx

from sqexport.contracts.errors import ConfigError, ExportError
from sqexport.contracts.shapes import format_shape
from sqexport.exporters.graph import set_metadata

__all__ = ["input_dims", "resolve_fixed_shapes", "fix_shapes", "convert_to_ort", "ort_format_info",
           "ORT_CONFIG_NAME", "PREPROCESSING_KEY", "MIN_RUNTIME_FOR_FORMAT"]

ORT_CONFIG_NAME = "required_operators.config"
PREPROCESSING_KEY = "sqexport.preprocessing"  # metadata_props key; the .ort keeps metadata_props
# ORT format version -> first onnxruntime release that reads it (v5 dropped kernel def hashes in
# 1.13; v6 added float8 types in 1.16). A runtime reads its own format version and older ones.
MIN_RUNTIME_FOR_FORMAT = {"5": "1.13", "6": "1.16"}


def input_dims(model: onnx.ModelProto) -> dict[str, list]:
    """Graph inputs (initializers excluded) -> dims, a symbolic or unknown dim as its name or None."""
    inits = {i.name for i in model.graph.initializer} | {s.values.name for s in model.graph.sparse_initializer}
    return {i.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input if i.name not in inits}


def resolve_fixed_shapes(model: onnx.ModelProto, user: dict, example: dict | None) -> dict[str, list[int]]:
    """The shape each input is fixed to: the user's `--input-shape`, else the spec's example input
    (batch 1), else the graph's own static shape. Unknown names and rank mismatches are errors."""
    dims = input_dims(model)
    user = dict(user or {})
    if None in user:
        if len(dims) != 1:
            raise ConfigError(f"the model has {len(dims)} inputs ({', '.join(dims)}): "
                              "give --input-shape NAME=DxD for each")
        user = {next(iter(dims)): user.pop(None)}
    unknown = sorted(set(user) - set(dims))
    if unknown:
        raise ConfigError(f"--input-shape: no input named {', '.join(unknown)}; inputs: {', '.join(dims)}")
    # a symbolic dim shared between inputs (BERT's sequence length) takes the user's value everywhere
    params = {g: v for name, shape in user.items() for g, v in zip(dims[name], shape) if isinstance(g, str)}
    shapes = {}
    for name, d in dims.items():
        if name in user:
            shape = list(user[name])
        elif example is not None and name in example:
            shape = [1, *example[name].shape[1:]]
            shape = [params.get(g, s) for g, s in zip(d, shape)] if len(shape) == len(d) else shape
        elif all(isinstance(x, int) and x > 0 for x in d[1:]):
            shape = [1, *d[1:]]
        else:
            raise ConfigError(f"input {name} has dynamic dims {d}: give --input-shape {name}=...")
        if len(shape) != len(d):
            raise ConfigError(f"--input-shape {name}={format_shape(shape)}: the input has rank {len(d)}")
        clash = [i for i, (s, g) in enumerate(zip(shape, d)) if isinstance(g, int) and g > 0 and g != s]
        if clash:
            raise ConfigError(f"--input-shape {name}={format_shape(shape)}: dim {clash[0]} is fixed to "
                              f"{d[clash[0]]} in the model")
        shapes[name] = shape
    return shapes


def fix_shapes(src: Path, dst: Path, shapes: dict[str, list[int]], metadata: dict | None = None) -> None:
    """Write `src` with inputs fixed to `shapes`, outputs inferred, and `metadata` as metadata_props."""
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    model = onnx.load(str(src))
    try:
        for name, shape in shapes.items():
            make_input_shape_fixed(model.graph, name, shape)
        fix_output_shapes(model)
    except (ValueError, onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"cannot fix the input shapes: {str(exc).splitlines()[0]}") from None
    set_metadata(model, metadata or {})
    onnx.save(model, str(dst))


def _strip_paths(config: str) -> str:
    """The converter names the absolute path of every model in its header: keep file names only."""
    return re.sub(r"^(# - ).*?([^/\\]+)$", r"\1\2", config, flags=re.M)


def convert_to_ort(onnx_path: Path, outdir: Path) -> dict:
    """model.onnx -> outdir/model.ort + outdir/required_operators.config (via onnxruntime's converter)."""
    outdir = Path(outdir)
    with tempfile.TemporaryDirectory(prefix="sqexport-ort-") as tmp:
        src, out = Path(tmp) / "in", Path(tmp) / "out"
        src.mkdir()
        shutil.copyfile(onnx_path, src / "model.onnx")
        cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(src),
               "--output_dir", str(out), "--optimization_style", "Fixed", "--target_platform", "arm",
               "--enable_type_reduction"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        ort_file, configs = out / "model.ort", sorted(out.glob("*.config"))
        if proc.returncode != 0 or not ort_file.is_file() or not configs:
            last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
            raise ExportError(f"ORT format conversion failed: {last}")
        shutil.copyfile(ort_file, outdir / "model.ort")
        (outdir / ORT_CONFIG_NAME).write_text(_strip_paths(configs[0].read_text()))
    return {"ort": "model.ort", "operators_config": ORT_CONFIG_NAME, "optimization_style": "Fixed",
            "target_platform": "arm", "type_reduction": True, **ort_format_info(outdir / "model.ort")}


def ort_format_info(ort_path: Path) -> dict:
    """ORT format version written in the file, the oldest onnxruntime that reads it, and how many
    initializers it stores dense and sparse."""
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.InferenceSession import InferenceSession

    buf = Path(ort_path).read_bytes()
    session = InferenceSession.GetRootAsInferenceSession(buf, 0)
    version, graph = session.OrtVersion().decode(), session.Model().Graph()
    # the ORT format stores sparse initializers as such (densified when a session loads them)
    return {"ort_format_version": version, "min_onnxruntime": MIN_RUNTIME_FOR_FORMAT.get(version),
            "initializers": graph.InitializersLength(), "sparse_initializers": graph.SparseInitializersLength()}
