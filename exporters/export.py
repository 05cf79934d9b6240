"""One exporter object per model kind (models.spec.ModelKind): how its torch model becomes ONNX,
and what else an app needs beside model.onnx.

Adding a model kind = a ModelKind dataclass in models/spec.py naming its exporter, plus an
exporter object registered in EXPORTERS here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import onnx
import torch

from sqexport.exporters.onnx_export import export_torch
from sqexport.models.spec import ModelSpec

__all__ = ["Exporter", "TorchOnnxExporter", "OptimumExporter", "EXPORTERS", "exporter_for", "export_model"]


class Exporter(Protocol):
    name: str  # recorded in the report's export stages

    def export(self, spec: ModelSpec, model: torch.nn.Module, path: Path) -> onnx.ModelProto:
        """Write `model` (the spec's model or its compressed copy) to `path`; return the checked graph."""

    def artifacts(self, spec: ModelSpec, outdir: Path) -> list[str]:
        """Write what an app needs beside model.onnx into `outdir`; return the file names."""


class TorchOnnxExporter:
    """torch.onnx (TorchScript exporter, opset 17) with the spec's input/output names and dynamic axes."""

    name = "torch"

    def export(self, spec: ModelSpec, model: torch.nn.Module, path: Path) -> onnx.ModelProto:
        return export_torch(model, spec.example_inputs, spec.input_names, spec.output_names,
                            spec.dynamic_axes, path)

    def artifacts(self, spec: ModelSpec, outdir: Path) -> list[str]:
        return []


class OptimumExporter:
    """optimum's ONNX exporter for Hugging Face models; the tokenizer ships beside the model."""

    name = "optimum"

    def export(self, spec: ModelSpec, model: torch.nn.Module, path: Path) -> onnx.ModelProto:
        from sqexport.exporters.hf_export import export_hf

        return export_hf(spec, model, path)

    def artifacts(self, spec: ModelSpec, outdir: Path) -> list[str]:
        from sqexport.exporters.hf_export import save_tokenizer

        return save_tokenizer(spec, outdir)


EXPORTERS: dict[str, Exporter] = {e.name: e for e in (TorchOnnxExporter(), OptimumExporter())}


def exporter_for(spec: ModelSpec) -> Exporter:
    return EXPORTERS[spec.kind.exporter]


def export_model(spec: ModelSpec, model: torch.nn.Module, path: Path) -> onnx.ModelProto:
    return exporter_for(spec).export(spec, model, path)
