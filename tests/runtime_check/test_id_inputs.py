"""Synthetic ids for `sqexport check` stay inside the tables they index: the bound comes from the
graph (a Gather on a constant table, through Cast / Unsqueeze ...)."""
from __future__ import annotations

import onnx
import torch
from torch import nn

from sqexport.runtime_check.id_inputs import id_bounds


class TwoTables(nn.Module):
    def __init__(self):
        super().__init__()
        self.words = nn.Embedding(100, 4)
        self.small = nn.Embedding(30, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, ids, other):
        return self.fc(self.words(ids).mean(1) + self.small(ids.int()).mean(1) + self.small(other).mean(1) * 0)


def _export(tmp_path) -> tuple[str, onnx.ModelProto]:
    path = tmp_path / "m.onnx"
    torch.onnx.export(TwoTables().eval(), (torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)),
                      str(path), input_names=["ids", "other"], output_names=["y"],
                      dynamic_axes={"ids": {0: "b"}, "other": {0: "b"}, "y": {0: "b"}}, opset_version=17, dynamo=False)
    return str(path), onnx.load(str(path))


def test_the_smallest_table_an_input_indexes_bounds_it(tmp_path):
    _, model = _export(tmp_path)
    assert id_bounds(model) == {"ids": 30, "other": 30}  # ids reaches the 30-row table through a Cast


def test_check_runs_a_small_vocabulary_model_on_synthetic_ids(tmp_path, run_cli):
    path, _ = _export(tmp_path)
    r = run_cli(["check", path, "--baseline", path])
    assert r.exit_code == 0, r.output
    assert "top1_agreement: model 100.00 %" in r.output


def test_float_models_have_no_bounds(tmp_path):
    path = tmp_path / "f.onnx"
    torch.onnx.export(nn.Linear(3, 2).eval(), (torch.rand(1, 3),), str(path), opset_version=17, dynamo=False)
    assert id_bounds(onnx.load(str(path))) == {}
