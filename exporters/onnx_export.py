"""torch -> ONNX. Torch models go through torch.onnx (TorchScript exporter, opset 17);
Hugging Face models through optimum's exporter (exporters.hf_export)."""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import onnx
import torch

from sqexport.contracts.errors import ExportError, first_line

__all__ = ["OPSET", "export_torch", "check_model"]

OPSET = 17


def export_torch(model: torch.nn.Module, example_inputs: dict, input_names: list[str],
                 output_names: list[str], dynamic_axes: dict, path: Path) -> onnx.ModelProto:
    args = tuple(torch.from_numpy(example_inputs[n]) for n in input_names)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), args, str(path), input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes,
                              opset_version=OPSET, do_constant_folding=True, dynamo=False)
    except Exception as exc:  # the exporter raises many unrelated types
        raise ExportError(f"torch.onnx export failed: {type(exc).__name__}: {first_line(exc)}") from exc
    return check_model(path)


def check_model(path: Path) -> onnx.ModelProto:
    try:
        onnx.checker.check_model(str(path))
        return onnx.load(str(path))
    except Exception as exc:
        raise ExportError(f"{path.name} fails the ONNX checker: {first_line(exc)}") from exc
