"""One exporter object per model kind."""
import torch

from sqexport.exporters.export import EXPORTERS, OptimumExporter, TorchOnnxExporter, exporter_for
from sqexport.models.spec import HFFolder, ModelKind, ModelSpec, TorchModule


def _spec(kind: ModelKind) -> ModelSpec:
    return ModelSpec(name="m", model=torch.nn.Linear(2, 2), task="image-classification", input_names=["x"],
                     output_names=["y"], example_inputs={}, calib_batches=[], eval_batches=[], kind=kind)


def test_each_model_kind_names_a_registered_exporter():
    assert isinstance(exporter_for(_spec(TorchModule())), TorchOnnxExporter)
    assert isinstance(exporter_for(_spec(HFFolder("/some/folder"))), OptimumExporter)
    assert set(EXPORTERS) == {TorchModule.exporter, HFFolder.exporter}
    assert _spec(TorchModule()).kind == TorchModule()  # the default kind


def test_torch_exporter_writes_a_checked_graph_and_no_extra_files(tmp_path):
    import numpy as np

    spec = _spec(TorchModule())
    spec.example_inputs = {"x": np.ones((1, 2), np.float32)}
    exporter = exporter_for(spec)
    graph = exporter.export(spec, spec.model, tmp_path / "m.onnx")
    assert [i.name for i in graph.graph.input] == ["x"] and (tmp_path / "m.onnx").is_file()
    assert exporter.artifacts(spec, tmp_path) == []
