"""One entry point for exporting a ModelSpec's (possibly compressed) torch model."""
from __future__ import annotations

from pathlib import Path

import onnx
import torch

from exporters.onnx_export import export_torch
from models.spec import ModelSpec

__all__ = ["export_model"]


def export_model(spec: ModelSpec, model: torch.nn.Module, path: Path) -> onnx.ModelProto:
    if spec.exporter == "optimum":
        from exporters.hf_export import export_hf

        return export_hf(spec, model, path)
    return export_torch(model, spec.example_inputs, spec.input_names, spec.output_names,
                        spec.dynamic_axes, path)
